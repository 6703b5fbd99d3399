"""Curation: indexing through the sample contract, the filter language, caps, the structure split, subset names."""

import hashlib
import io
import json
import random
import shutil
import tarfile

import pytest

from hrtem_core.errors import InputError

from mlplatform.curation import (CurationError, FilterError, SampleRecord, compile_filter, known_fields,
                                 scan_dataset, select, split_by_structure, subset_name)


@pytest.fixture(scope="module")
def ds(tiny_dataset):
    return tiny_dataset(12, 3, base=["output.structures_per_shard=2"])  # the preset's 96 px images


@pytest.fixture(scope="module")
def index(ds):
    return scan_dataset(ds)


def _write_dataset(root, samples, name="exp"):
    """A dataset by the contract alone (no datagen): {key: meta}; arrays are junk bytes nobody should decode."""
    root.mkdir(parents=True)
    with tarfile.open(root / "shard-000000.tar", "w") as tar:
        for key, meta in samples.items():
            for ext, data in (("image.npy", b"not an array"), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    sha256 = hashlib.sha256((root / "shard-000000.tar").read_bytes()).hexdigest()  # a manifest lists every shard's
    (root / "manifest.json").write_text(json.dumps({
        "name": name, "content_hash": "f" * 64, "n_samples": len(samples),
        "shards": [{"name": "shard-000000.tar", "sha256": sha256, "n_samples": len(samples)}]}))
    return root


# ----------------------------------------------------------------------------------------------------- indexing
def test_scan_follows_the_manifest(ds, index):
    manifest = json.loads((ds / "manifest.json").read_text())
    assert index.name == manifest["name"] == "tiny-seed3"
    assert index.content_hash == manifest["content_hash"] and index.path == str(ds.resolve())
    assert index.n_samples == manifest["n_samples"] == 12
    keys = [r.key for r in index.records]
    assert keys == sorted(keys) and keys[:3] == ["0000000_00", "0000000_01", "0000001_00"]
    for r in index.records:
        assert r.structure_id == f"{index.content_hash[:16]}/{int(r.key.split('_')[0])}"
        assert r.meta["id"].endswith(r.key) and r.shard.startswith(index.path) and r.dataset_name == "tiny-seed3"
    assert len({r.structure_id for r in index.records}) == 6
    assert len(set(index.records)) == 12  # hashable although meta is a dict


def test_scan_reads_only_the_json_members(ds, monkeypatch):
    opened = []
    real = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m: opened.append(m.name) or real(self, m))
    import numpy
    monkeypatch.setattr(numpy, "load", lambda *a, **k: pytest.fail("an array was decoded"))
    assert scan_dataset(ds).n_samples == 12
    assert len(opened) == 12 and all(n.endswith(".json") for n in opened)


def test_scan_errors_name_the_problem(ds, tmp_path):
    with pytest.raises(CurationError, match=r"nowhere.*no manifest\.json"):
        scan_dataset(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    shutil.copytree(ds, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps(dict(manifest, n_samples=13)))
    with pytest.raises(InputError, match="'n_samples' 13 does not match the 12 samples its shards list"):
        scan_dataset(bad)  # the manifest is checked against itself before any shard is opened
    (bad / "manifest.json").write_text(json.dumps(manifest))
    (bad / "shard-000001.tar").write_bytes(b"\0garbage" * 100)
    with pytest.raises(CurationError, match="shard-000001.tar"):
        scan_dataset(bad)
    (bad / "shard-000001.tar").unlink()
    with pytest.raises(CurationError, match="shard-000001.tar: unreadable"):
        scan_dataset(bad)


def test_structure_id_falls_back_to_the_key_prefix(tmp_path):
    ix = scan_dataset(_write_dataset(tmp_path / "exp", {"img0001_a": {"source": {"x": 1}},
                                                        "img0002_a": {"source": {"x": 2}}}))
    assert [r.structure_id for r in ix.records] == ["ffffffffffffffff/img0001", "ffffffffffffffff/img0002"]


def test_known_fields_are_dotted_leaves(index):
    fields = known_fields(index.records)
    assert {"imaging.defocus_A", "structure.has_twin", "seed.structure", "imaging.aberrations.C30_A",
            "structure.center_px", "split", "id"} <= fields
    assert "imaging" not in fields and "imaging.aberrations" not in fields


# ------------------------------------------------------------------------------------------------ filter grammar
CASES = [  # (filter, the same condition written by hand in Python)
    ("imaging.defocus_A >= -200 and imaging.defocus_A <= 200 and structure.n_defects >= 1",
     lambda m: -200 <= m["imaging"]["defocus_A"] <= 200 and m["structure"]["n_defects"] >= 1),
    ("-200 <= imaging.defocus_A <= 200", lambda m: -200 <= m["imaging"]["defocus_A"] <= 200),
    ("imaging.defocus_A > 0", lambda m: m["imaging"]["defocus_A"] > 0),
    ("structure.has_twin", lambda m: m["structure"]["has_twin"]),
    ("not structure.has_stacking_fault", lambda m: not m["structure"]["has_stacking_fault"]),
    ("structure.has_twin or structure.has_stacking_fault",
     lambda m: m["structure"]["has_twin"] or m["structure"]["has_stacking_fault"]),
    ("structure.material == 'Au'", lambda m: m["structure"]["material"] == "Au"),
    ("structure.material != 'Au'", lambda m: False),
    ("structure.kind in ['fcc_sphere', 'decahedron']", lambda m: m["structure"]["kind"] in ("fcc_sphere",)),
    ("structure.kind not in ('fcc_sphere',)", lambda m: False),
    ("(imaging.defocus_A < -100 or imaging.defocus_A > 100) and not (structure.n_defects == 0)",
     lambda m: abs(m["imaging"]["defocus_A"]) > 100 and m["structure"]["n_defects"] != 0),
    ("abs(imaging.defocus_A) < 250", lambda m: abs(m["imaging"]["defocus_A"]) < 250),
    ("imaging.defocus_A * 2 + 100 > -imaging.C10_A / 2",
     lambda m: m["imaging"]["defocus_A"] * 2 + 100 > -m["imaging"]["C10_A"] / 2),
    ("max(imaging.shape) == 96 and min(1, 2, 3) == 1", lambda m: max(m["imaging"]["shape"]) == 96),
    ("imaging.dose_e_per_A2 - 500 >= 0", lambda m: m["imaging"]["dose_e_per_A2"] >= 500),
    ("seed.variant == 1 and seed.structure in [0, 2, 4]",
     lambda m: m["seed"]["variant"] == 1 and m["seed"]["structure"] in (0, 2, 4)),
    ("split == 'train' and structure.radius_A > 7.5",
     lambda m: m["split"] == "train" and m["structure"]["radius_A"] > 7.5),
    ("imaging.aberrations.C30_A < 0", lambda m: m["imaging"]["aberrations"]["C30_A"] < 0),
    ("True", lambda m: True),
    ("structure.has_twin == True", lambda m: m["structure"]["has_twin"] is True),
]


@pytest.mark.parametrize("expr,expected", CASES, ids=[c[0] for c in CASES])
def test_filter_matches_hand_computed(index, expr, expected):
    f = compile_filter(expr, known_fields(index.records))
    assert [r.key for r in index.records if f(r.meta)] == [r.key for r in index.records if expected(r.meta)]


def test_filter_cases_are_not_trivial(index):
    # the grammar cases above must discriminate on this data, or they test little
    sizes = [sum(bool(e(r.meta)) for r in index.records) for _, e in CASES]
    assert sum(0 < s < len(index.records) for s in sizes) >= 10


def test_filter_reports_fields_used(index):
    f = compile_filter("structure.has_twin and abs(imaging.defocus_A) < 3", known_fields(index.records))
    assert f.fields == {"structure.has_twin", "imaging.defocus_A"}


def test_missing_field_compares_false():
    f = compile_filter("structure.n_defects >= 1", {"structure.n_defects"})
    assert f({"structure": {"n_defects": 2}}) and not f({"source": {}})
    assert not compile_filter("structure.n_defects + 1 < 5", {"structure.n_defects"})({})
    assert not compile_filter("structure.n_defects != 3", {"structure.n_defects"})({})
    assert not compile_filter("structure.has_twin", {"structure.has_twin"})({})
    assert compile_filter("not structure.has_twin", {"structure.has_twin"})({})  # documented: negates the False


def test_unknown_field_suggests_close_matches(index):
    kf = known_fields(index.records)
    with pytest.raises(FilterError, match=r"unknown field 'imaging\.defocs_A'; did you mean imaging\.defocus_A"):
        compile_filter("imaging.defocs_A > 0", kf)
    with pytest.raises(FilterError, match=r"unknown field 'defocus_A'; did you mean imaging\.defocus_A"):
        compile_filter("defocus_A > 0", kf)
    with pytest.raises(FilterError, match=r"'imaging\.aberrations' is a section.*imaging\.aberrations\.C30_A"):
        compile_filter("imaging.aberrations > 0", kf)


def test_syntax_error_has_position(index):
    with pytest.raises(FilterError, match=r"syntax error at column 20") as err:
        compile_filter("structure.has_twin structure.n_defects", known_fields(index.records))
    assert "structure.has_twin structure.n_defects\n" in str(err.value)
    with pytest.raises(FilterError, match="syntax error at the end"):
        compile_filter("imaging.defocus_A >=", known_fields(index.records))
    with pytest.raises(FilterError, match="empty"):
        compile_filter("  ", set())


@pytest.mark.parametrize("expr,what", [
    ("__import__('os')", "calling '__import__'"),
    ("open('x') == 1", "calling 'open'"),
    ("'a'.upper() == 'A'", "calling \"'a'.upper\""),
    ("(1).real == 1", "attribute access on anything but a metadata field"),
    ("''.__class__ == 1", "attribute access"),
    ("(lambda: 1)() == 1", "calling"),
    ("lambda: 1", "lambda"),
    ("imaging.shape[0] > 1", "subscripting"),
    ("[x for x in imaging.shape]", "list comprehension"),
    ("any(x > 1 for x in imaging.shape)", "calling 'any'"),
    ("{k: 1 for k in imaging.shape}", "dict comprehension"),
    ("imaging.defocus_A ** 2 > 1", r"'\*\*'"),
    ("imaging.defocus_A if structure.has_twin else 0", "conditional"),
    ("structure.has_twin is True", "'is'"),
    ("f'{imaging.defocus_A}' == '1'", "f-string"),
    ("abs(x=imaging.defocus_A) > 1", "positional"),
    ("structure.__class__ == 1", "unknown field 'structure.__class__'"),
])
def test_forbidden_constructs_are_refused(index, expr, what):
    with pytest.raises(FilterError, match=what):
        compile_filter(expr, known_fields(index.records))


def test_evaluation_errors_name_the_sample(index):
    kf = known_fields(index.records)
    with pytest.raises(FilterError, match=r"sample tiny-seed3/0000000_00: cannot compare 'Au' with 3"):
        compile_filter("structure.material > 3", kf)(index.records[0].meta)
    with pytest.raises(FilterError, match="arithmetic needs numbers"):
        compile_filter("structure.material * 1000000000 == ''", kf)(index.records[0].meta)
    with pytest.raises(FilterError, match="division by zero"):
        compile_filter("imaging.defocus_A / 0 > 1", kf)(index.records[0].meta)


# ------------------------------------------------------------------------------------------------------ select
def test_empty_selection_says_what_was_checked(index):
    with pytest.raises(CurationError, match=r"filter 'imaging.defocus_A > 1e6' selected none of the 12 samples"):
        select(index, "imaging.defocus_A > 1e6")


def test_select_without_filter_or_caps_keeps_everything_in_order(index):
    shuffled = random.Random(1).sample(index.records, len(index.records))
    assert select(shuffled) == select(index) == index.records
    assert select(index, "structure.n_defects >= 1") == [r for r in index.records if r.meta["structure"]["n_defects"]]


def test_caps_are_reproducible_seeded_and_nested(index):
    pick = lambda seed, n: [r.key for r in select(index, max_samples=n, seed=seed)]  # noqa: E731
    assert pick(0, 5) == pick(0, 5) and len(pick(0, 5)) == 5 and pick(0, 5) == sorted(pick(0, 5))
    assert len({tuple(pick(s, 5)) for s in range(6)}) > 1
    assert set(pick(2, 4)) < set(pick(2, 8))  # a smaller cap picks a subset of a larger one
    assert select(index, max_samples=100) == index.records


def test_per_structure_cap(index):
    picks = {}
    for seed in range(6):
        sel = select(index, max_images_per_structure=1, seed=seed)
        assert len(sel) == 6 and len({r.structure_id for r in sel}) == 6
        assert sel == select(list(reversed(index.records)), max_images_per_structure=1, seed=seed)
        picks[seed] = tuple(r.key for r in sel)
    assert len(set(picks.values())) > 1
    both = select(index, "structure.n_defects >= 1", max_images_per_structure=1, max_samples=2, seed=0)
    assert len(both) == 2 and len({r.structure_id for r in both}) == 2
    assert all(r.meta["structure"]["n_defects"] >= 1 for r in both)
    with pytest.raises(CurationError, match="max_samples must be >= 1"):
        select(index, max_samples=0)


# ------------------------------------------------------------------------------------------------------- split
@pytest.mark.parametrize("fraction,n_val", [(0.2, 1), (0.34, 2), (0.5, 3), (0.01, 1), (0.99, 5)])
def test_split_keeps_structures_whole(index, fraction, n_val):
    train, val = split_by_structure(index.records, fraction, seed=7)
    ts, vs = {r.structure_id for r in train}, {r.structure_id for r in val}
    assert len(vs) == n_val and not ts & vs and len(ts) + len(vs) == 6
    assert sorted(train + val, key=lambda r: r.key) == index.records
    shuffled = random.Random(3).sample(index.records, len(index.records))
    assert split_by_structure(shuffled, fraction, seed=7) == (train, val)


def test_split_is_seeded_and_needs_two_structures(index):
    vals = {tuple(sorted({r.structure_id for r in split_by_structure(index.records, 0.34, s)[1]})) for s in range(8)}
    assert len(vals) > 1
    one = [r for r in index.records if r.key.startswith("0000000_")]
    with pytest.raises(CurationError, match="at least 2 structures"):
        split_by_structure(one, 0.2, 0)
    with pytest.raises(CurationError, match="val_fraction"):
        split_by_structure(index.records, 1.0, 0)


# ------------------------------------------------------------------------------------------------------- names
def test_subset_names_are_readable_and_distinct(ds):
    plain = subset_name([{"path": str(ds)}])
    assert plain.startswith("tiny-seed3-") and plain == subset_name([{"path": str(ds)}])
    long1 = "imaging.defocus_A >= -200 and imaging.defocus_A <= 200 and structure.n_defects >= 1"
    long2 = long1.replace(">= 1", ">= 2")
    a, b = subset_name([{"path": str(ds), "filter": long1}]), subset_name([{"path": str(ds), "filter": long2}])
    assert a.startswith("tiny-seed3[imaging.defocus_A>=-200") and "..." in a and a != b and len(a) <= 70
    capped = subset_name([{"path": str(ds), "filter": "structure.has_twin", "max_samples": 5}], seed=1)
    assert capped.startswith("tiny-seed3[structure.has_twin](max5)-")
    assert capped != subset_name([{"path": str(ds), "filter": "structure.has_twin", "max_samples": 5}], seed=2)
    assert subset_name([{"path": str(ds), "name": "sim"}, {"path": str(ds), "filter": "structure.has_twin"}]
                       ).startswith("sim+tiny-seed3[structure.has_twin]-")


def test_records_are_plain_values():
    r = SampleRecord("d", "/p", "0" * 64, "/p/s.tar", "k_00", "0/k", {"a": 1})
    assert r == SampleRecord("d", "/p", "0" * 64, "/p/s.tar", "k_00", "0/k", {"a": 2}) and hash(r)
