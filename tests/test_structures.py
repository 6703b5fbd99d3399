"""Structure stage: particle shapes, metals, several and off-field particles (no simulation: fast).

The imaging physics of these structures (fringe spacings, masks) is checked in test_physics.py; here the atoms and
the metadata. Reference values (nearest-neighbour distances, volumes, hull areas) are computed here.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy.spatial import ConvexHull, cKDTree

from datagen.recipe import (CIRCUMRADIUS_PER_RADIUS, FCC_KINDS, RecipeError, load_recipe, recipe_from_dict)
from datagen.seeding import Streams
from datagen.structures import SubstrateBank, build_scene, field_window_A

# room-temperature lattice constants (Å) and Z, written out here rather than read from datagen
METALS = {"Au": (4.07825, 79), "Pt": (3.9242, 78), "Pd": (3.8907, 46), "Ag": (4.0853, 47)}


def recipe(particle: dict, cell_A: float = 40.0, crop_px: int | None = None, thickness_A: float = 0.0):
    return recipe_from_dict({
        "name": "structures-test",
        "structure": {"particle": {"radius_A": 9.0, "margin_A": 1.0, **particle},
                      "substrate": {"thickness_A": thickness_A, "bank_size": 1}, "cell": {"extent_A": cell_A}},
        "imaging": {"pixel_size_A": 0.25, "crop_px": crop_px},
    })


def scene(r, seed: int = 0, structure: int = 0):
    return build_scene(r, Streams(seed, structure), SubstrateBank(r, seed))


def test_preset_recipes_keep_their_hash():
    """New particle options appear in the resolved recipe only where set: presets written before them hash as
    before (these are the hashes of the recipes before the options existed), so their datasets keep their content
    hash too (tests/test_generate.py and the manual check in the README pin the samples)."""
    assert load_recipe("tiny").hash() == "464cd7c5583497a677b9a166858ded3059151e662df5044b414d5bcacb1c1454"
    assert load_recipe("au-small").hash() == "8665d3ab6858192e718854cfd7c46a978f1fd189ecad061784833268b20e6c6c"
    assert load_recipe("au-large").hash() == "4613ba37660987b7267118f44620b2b197f0341dcd4db7e9b75cd795de7490cd"
    assert load_recipe("cdse").hash() == "398edb71c2555b111fe89177933d68e12c6d369b29fea69f13bc50eba60f6c34"
    for name in ("fcc-mixed", "fcc-multi", "pt-small", "pd-small", "ag-small"):  # workers rebuild it from JSON
        r = load_recipe(name)
        assert recipe_from_dict(r.resolved()).resolved() == r.resolved()
    sphere = scene(recipe({"kind": "fcc_sphere", "element": "Au"})).metadata
    assert "particles" not in sphere and "n_particles" not in sphere  # the old metadata, key for key


@pytest.mark.parametrize("element", list(METALS))
@pytest.mark.parametrize("kind", FCC_KINDS)
def test_every_kind_and_metal_builds_its_lattice(kind, element):
    a, z = METALS[element]
    r = recipe({"kind": kind, "element": element, "radius_A": 9.0})
    assert r.structure.particle.lattice_A == pytest.approx(a)  # looked up, not given
    t0 = time.perf_counter()
    sc = scene(r)
    seconds = time.perf_counter() - t0
    m = sc.metadata
    xyz = sc.positions[sc.is_particle]
    assert set(sc.numbers[sc.is_particle]) == {z}
    assert m["kind"] == kind and m["material"] == element and m["lattice_A"] == pytest.approx(a)
    # nearest neighbours at a / sqrt(2): the FCC lattice of this metal (in every twinned segment)
    d, _ = cKDTree(xyz).query(xyz, k=2)
    nn = np.median(d[:, 1])
    assert nn == pytest.approx(a / math.sqrt(2), rel=1e-3)
    # size: radius_A is the radius of the sphere of equal volume (N atoms of a^3 / 4 each)
    r_eq = (3 * len(xyz) * a**3 / 4 / (4 * math.pi)) ** (1 / 3)
    assert r_eq == pytest.approx(m["radius_A"], rel=0.12)
    if kind in ("fcc_decahedron", "fcc_icosahedron"):
        assert m["radius_A"] == pytest.approx(r_eq, rel=1e-9)  # whole shells: the size it has is recorded
        assert m["multiply_twinned"] and m["has_twin"] and m["n_twins"] == (5 if kind == "fcc_decahedron" else 30)
    else:
        assert m["radius_A"] == 9.0
    centre = np.array(m["center_A"])
    reach = np.linalg.norm(xyz - centre, axis=1).max()
    assert reach <= CIRCUMRADIUS_PER_RADIUS[kind] * m["radius_A"] + 0.01
    if kind == "fcc_sphere":  # a lone sphere of one metal keeps the metadata it always had
        assert "particles" not in m
    else:
        assert m["n_particles"] == 1 and len(m["particles"]) == 1 and m["particles"][0]["visible_fraction"] == 1.0
    print(f"{kind} {element}: {len(xyz)} atoms, r_eq {r_eq:.2f} Å (radius_A {m['radius_A']:.2f}), nn {nn:.4f} Å, "
          f"circumradius / radius {reach / m['radius_A']:.3f}, built in {seconds * 1e3:.0f} ms")


@pytest.mark.parametrize("kind", ["fcc_wulff", "fcc_octahedron", "fcc_decahedron", "fcc_icosahedron"])
def test_circumradius_bound_holds_over_draws(kind):
    """CIRCUMRADIUS_PER_RADIUS (used to validate that particles fit) bounds every shape the builders make."""
    r = recipe({"kind": kind, "element": "Pt", "radius_A": {"dist": "uniform", "low": 4, "high": 12},
                "facets": {"marks_reentrance": {"dist": "choice", "values": [0, 1, 2]}}}, cell_A=60.0)
    worst = 0.0
    for s in range(8):
        m = scene(r, structure=s).metadata
        worst = max(worst, m["circumradius_A"] / m["radius_A"])
    print(f"{kind}: largest circumradius / radius over 8 draws {worst:.3f} (bound {CIRCUMRADIUS_PER_RADIUS[kind]})")
    assert worst <= CIRCUMRADIUS_PER_RADIUS[kind]


def test_faceted_particles_take_planar_defects():
    r = recipe({"kind": {"dist": "choice", "values": ["fcc_wulff", "fcc_octahedron"]}, "element": "Au",
                "radius_A": 10.0, "defects": {"n": 2, "twin_fraction": 1.0, "min_separation_planes": 2}})
    for s in range(3):
        m = scene(r, structure=s).metadata
        assert m["n_defects"] == 2 and m["n_twins"] == 2 and m["has_twin"]
        assert len(m["defects"]) == 2 and all(d["type"] == "twin" for d in m["defects"])


def test_kind_and_element_are_drawn_per_structure():
    r = recipe({"kind": {"dist": "choice", "values": list(FCC_KINDS)},
                "element": {"dist": "choice", "values": list(METALS)}, "radius_A": 4.0})
    assert r.structure.particle.lattice_A is None
    seen = [(m["kind"], m["element"], m["lattice_A"]) for m in (scene(r, structure=s).metadata for s in range(16))]
    assert {k for k, _, _ in seen} == set(FCC_KINDS) and {e for _, e, _ in seen} == set(METALS)
    assert all(a == METALS[e][0] for _, e, a in seen)
    # the same seed draws the same kind and metal
    again = scene(r, structure=5).metadata
    assert (again["kind"], again["element"]) == seen[5][:2]


def _composed(count, off=0.0, kind="fcc_sphere", radius=6.0):
    return recipe({"kind": kind, "element": "Pd", "radius_A": radius, "count": count, "min_gap_A": 1.0,
                   "off_field_probability": off}, cell_A=64.0, crop_px=160)


def test_several_particles_do_not_overlap_and_stay_in_the_field():
    r = _composed(3)
    x0, side = field_window_A(r)
    assert side == 40.0 and x0 == 12.0
    for s in range(2):
        sc = scene(r, structure=s)
        m = sc.metadata
        parts = m["particles"]
        assert m["n_particles"] == len(parts) == len(sc.particles) == 3 and m["n_off_field"] == 0
        assert sc.field_origin_A == (x0, x0) and m["field_origin_A"] == [x0, x0]
        for i, p in enumerate(parts):
            c = np.array(p["center_A"][:2])
            assert np.all(c - p["radius_A"] - 1.0 >= x0 - 1e-9) and np.all(c + p["radius_A"] + 1.0 <= x0 + side)
            for q in parts[i + 1:]:
                assert np.hypot(*(c - q["center_A"][:2])) >= p["radius_A"] + q["radius_A"] + 1.0
        # atoms: one cluster per particle, each inside its sphere
        xyz = sc.positions[sc.is_particle]
        owner = np.argmin([np.linalg.norm(xyz - p["center_A"], axis=1) for p in parts], axis=0)
        assert np.bincount(owner).tolist() == [p["n_atoms_particle"] for p in parts]
        # scalars: the largest particle's geometry, defect counts over all particles
        primary = max(range(3), key=lambda i: parts[i]["radius_A"])
        assert m["primary_particle"] == primary and m["center_A"] == parts[primary]["center_A"]
        assert m["n_defects"] == sum(p["n_defects"] for p in parts)
        assert m["n_atoms_particle"] == sum(p["n_atoms_particle"] for p in parts) == int(sc.is_particle.sum())


def test_off_field_particle_crosses_an_edge_and_records_its_visible_part():
    r = _composed(1, off=1.0, kind="fcc_icosahedron", radius=5.0)
    x0, side = field_window_A(r)
    fractions = []
    for s in range(6):
        m = scene(r, structure=s).metadata
        (p,) = m["particles"]
        assert p["off_field"] and m["n_off_field"] == 1
        c = np.array(p["center_A"][:2])
        edge = np.min(np.abs(np.concatenate([c - x0, c - (x0 + side)])))
        assert edge <= 0.5 * p["circumradius_A"] + 1e-9
        # the visible part, recomputed here from the atoms' projected hull, clipped to the field
        sc = scene(r, structure=s)
        xy = sc.positions[sc.is_particle][:, :2]
        hull = ConvexHull(xy)
        g = np.stack(np.meshgrid(*[np.arange(xy[:, k].min(), xy[:, k].max(), 0.05) for k in (0, 1)]), -1).reshape(-1, 2)
        inside_hull = np.all(g @ hull.equations[:, :2].T + hull.equations[:, 2] <= 0, axis=1)
        in_field = np.all((g >= x0) & (g < x0 + side), axis=1)
        expected = (inside_hull & in_field).sum() / inside_hull.sum()
        assert p["visible_fraction"] == pytest.approx(expected, abs=0.02)
        fractions.append(p["visible_fraction"])
    print("visible fractions", np.round(fractions, 3))
    assert 0.1 < min(fractions) and max(fractions) < 0.9


def test_substrate_makes_room_for_embedded_faceted_particles():
    r = recipe({"kind": "fcc_octahedron", "element": "Ag", "radius_A": 8.0, "embed_A": 2.0}, thickness_A=10.0)
    sc = scene(r)
    carbon = sc.positions[~sc.is_particle]
    metal = sc.positions[sc.is_particle]
    assert sc.metadata["embed_A"] == 2.0 and metal[:, 2].min() == pytest.approx(2.0 + 10.0 - 2.0)
    d, _ = cKDTree(metal).query(carbon)
    assert d.min() > 4.0853 / math.sqrt(2)


@pytest.mark.parametrize(
    "particle, fragment",
    [
        ({"kind": "cube"}, "structure.particle.kind='cube' is not a particle kind; allowed: fcc_sphere"),
        ({"kind": {"dist": "choice", "values": ["fcc_wulff", "wurtzite_sphere"]}}, "a choice may only hold FCC kinds"),
        ({"element": {"dist": "choice", "values": ["Au", "Qq"]}}, "'Qq' is not a chemical element"),
        ({"kind": "fcc_wulff", "element": "Cu"}, "element='Cu' has no tabulated lattice constant"),
        ({"element": {"dist": "choice", "values": ["Au", "Pt"]}, "lattice_A": 4.0}, "lattice_A=4.0 cannot hold"),
        ({"count": 0}, "particles per image must round to 1..50"),
        ({"count": {"dist": "choice", "values": [1, 8]}}, "structure.particle.count up to 8 particles"),
        ({"off_field_probability": 0.5}, "off_field_probability=0.5 needs room outside the field of view"),
        ({"kind": "fcc_octahedron", "radius_A": 12.0}, "circumscribed radius up to 18.0 Å for kind fcc_octahedron"),
    ],
)
def test_bad_particle_options_name_key_value_and_what_is_allowed(particle, fragment):
    with pytest.raises(RecipeError) as err:
        recipe(particle, cell_A=40.0, crop_px=120)
    assert fragment in str(err.value)


def test_decahedron_sizes_are_counted_right():
    """The size search counts decahedron atoms from two builds per (p, r) (linear in q): check against ASE."""
    from ase.cluster import Decahedron

    from datagen.structures import _n_atoms

    for size in [(3, 1, 0), (5, 2, 1), (7, 3, 2), (10, 5, 1), (13, 4, 0)]:
        assert _n_atoms("fcc_decahedron", size) == len(Decahedron("Au", *size, latticeconstant=4.0))


def test_per_element_phonon_sigma_draws_the_same_stream_scaled_per_metal():
    """particle_phonon_sigma: element displaces each FCC metal with its own Debye-Waller sigma and everything else
    with phonon_sigma_A, from the same seeded draws; the default keeps the old, single-sigma displacements."""
    from types import SimpleNamespace

    from datagen.recipe import Simulation, phonon_sigma_A
    from datagen.seeding import Streams
    from datagen.simulate.backend import phonon_displacements

    numbers = np.array([79] * 4000 + [78] * 4000 + [6] * 4000)  # Au, Pt, C
    scene = SimpleNamespace(numbers=numbers, substrate=None, is_particle=numbers != 6)
    plain = Simulation(n_phonons=2, phonon_sigma_A=0.1)
    per_metal = Simulation(n_phonons=2, phonon_sigma_A=0.1, particle_phonon_sigma="element")
    assert "particle_phonon_sigma" not in plain.model_dump() and per_metal.model_dump()["particle_phonon_sigma"]
    a = phonon_displacements(scene, plain, Streams(3, 0))
    b = phonon_displacements(scene, per_metal, Streams(3, 0))
    carbon = numbers == 6
    assert np.array_equal(a[:, carbon], b[:, carbon])  # same stream, same sigma
    for z, element in ((79, "Au"), (78, "Pt")):
        sel = numbers == z
        np.testing.assert_allclose(b[:, sel], a[:, sel] * phonon_sigma_A(element) / 0.1, rtol=1e-12)
        assert b[:, sel].std() == pytest.approx(phonon_sigma_A(element), rel=0.03)
