"""Design studies: Optuna over the physics of the training data, generated, trained on and scored in the loop.

A study whose search space holds keys ``datasets.NAME.<recipe key>`` designs its declared dataset NAME: every trial
draws those recipe values (``datasets.pool.imaging.defocus_A.high``, ``datasets.pool.simulation.n_phonons``,
``datasets.pool.structure.particle.kind.weights.0``...), generates NAME with them at the declared size and seed
(the same for every trial: the data differ in what they hold, not in how much, and share their random draws), trains
on it and is scored with the study's objective, pruned across epochs like any trial.

* The search space is checked against the recipe schema before anything runs: the recipe is validated at every
  corner of the space (each numeric parameter at its low and high end, each categorical one at every choice), so a
  range that can cross another (a defocus ``low`` that can exceed ``high``) or particles that can outgrow the field
  of view are refused at load, naming the corner. Every trial's recipe is validated again before it generates.
* A trial's data lie in ``<data_root>/NAME-<identity>``, the identity being the recipe's hash with the size and the
  seed: a recipe that an earlier trial made is reused, not made again. Generation goes through the claims database
  like any of the study's datasets (:mod:`experiments.datasets`): exactly once, resumed after a kill with the content
  hash of an uninterrupted run. A trial killed before its slot recorded it is re-run with the same values
  (:func:`experiments.study.run_trial`), so its half-made data are resumed, not abandoned.
* Each trial's run has its dataset as an MLflow input, its recipe values as ``trial.datasets...`` params, the
  recipe's hash and content hash as ``design.NAME.*`` params and the full recipe as ``design/NAME.recipe.yaml``.
* When the trials are settled, the best trial's recipe is written as a recipe file
  (``<data_root>/<study>-design/best-NAME.yaml``, the exact resolved recipe, with the ``datagen generate`` command
  that remakes the trial's data in its header), and the declared test (``confirm:``, :class:`~.specs.Confirm`) runs
  as a sweep of its own, ``<study>-confirm-t<trial>``: subsets ``best`` and ``default`` on fresh data of the same
  size, every seed, one two-sided comparison per benchmark, Holm-adjusted.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
from pathlib import Path

import yaml

from hrtem_core.config import apply_overrides, config_hash, read_yaml_mapping, set_dotted
from hrtem_core.errors import ConfigError, InputError
from hrtem_core.files import write_atomic
from mlplatform.analysis import min_attainable_p_test

from .datasets import recipe_of, recipe_source

PREFIX = "datasets."
FIXED = ("n", "seed", "recipe", "set")  # a dataset's own keys: every trial's data keep them
MAX_CORNERS = 4096
ARMS = ("best", "default")


def recipe_params(spec) -> dict[str, dict[str, str]]:
    """Designed dataset -> {recipe key: search-space key}, in declaration order (empty for other studies)."""
    out: dict[str, dict[str, str]] = {}
    for key in getattr(spec, "search_space", {}):
        if key.startswith(PREFIX):
            name, _, rest = key[len(PREFIX):].partition(".")
            out.setdefault(name, {})[rest] = key
    return out


def designed(spec) -> list[str]:
    return list(recipe_params(spec))


def overrides(values: dict) -> list[str]:
    """Recipe values as ``key=value`` overrides (JSON values read back as YAML: the same numbers and strings)."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def _train_and_benchmark_datasets(exp) -> tuple[set[str], set[str]]:
    config = exp.config()
    paths = {str(exp.spec.dataset_path(n)): n for n in exp.spec.datasets}
    return ({paths[r.path] for r in config.data.train if r.path in paths},
            {paths[b.path] for b in config.benchmarks if b.path in paths})


def check_design(exp) -> None:
    """What a design study's definition must satisfy, checked at load (before any dataset, trial or run): the
    designed datasets are declared and trained on (not benchmarks), the search space names recipe keys (not the size
    or seed) with numeric or categorical parameters, the recipe is valid at every corner of the space, and the
    declared confirmation can reach its alpha. ConfigError naming the key, the value and what is allowed."""
    spec, where = exp.spec, f"study {exp.source}"
    params = recipe_params(spec)
    if not params:
        if spec.confirm is not None:
            raise ConfigError(f"{where}: confirm: is the test of a design study (a search space with keys "
                              "datasets.NAME.<recipe key>); this study designs no dataset")
        return
    train, bench = _train_and_benchmark_datasets(exp)
    for name, keys in params.items():
        for rkey, skey in keys.items():
            if name not in spec.datasets:
                raise ConfigError(f"{where}: search_space {skey}: dataset {name!r} is not declared in datasets "
                                  f"({', '.join(spec.datasets) or 'none declared'})")
            ds = spec.datasets[name]
            if not rkey:
                raise ConfigError(f"{where}: search_space {skey}: name a recipe key after the dataset, e.g. "
                                  f"datasets.{name}.imaging.focal_spread_A")
            head = rkey.split(".")[0]
            if head in FIXED:
                raise ConfigError(f"{where}: search_space {skey}: a design study varies the recipe of dataset "
                                  f"{name!r}, not its {head}: every trial generates it with n={ds.n} and "
                                  f"seed={ds.seed} (the same size, so that trials differ in what their data hold, "
                                  "not in how much)")
            if spec.search_space[skey].type == "template":
                raise ConfigError(f"{where}: search_space {skey}: type template fills text (curation filters); a "
                                  "recipe value is drawn with type float, int or categorical")
        if name not in train:
            raise ConfigError(f"{where}: search_space designs dataset {name!r}, but the trials do not train on it "
                              f"(data.train reads {', '.join(sorted(train)) or 'no declared dataset'}): add "
                              f"{{dataset: {name}}} to data.train")
        if name in bench:
            raise ConfigError(f"{where}: dataset {name!r} is designed by the search space and is also a benchmark: "
                              "every trial would be scored on other data; benchmark a dataset of its own")
        _check_corners(exp, name, keys)
    if spec.confirm is not None:
        _check_confirm(exp, params)


def _corner_values(p) -> list:
    """The values of one parameter at the corners of the space: its ends, or every choice."""
    if p.type == "categorical":
        return list(p.choices)
    low, high = p.low, p.high
    if p.step:  # Optuna's highest value on the grid
        high = low + math.floor((high - low) / p.step + 1e-9) * p.step
    if p.type == "int":
        return [int(low), int(high)]
    return [float(low), float(high)]


def _check_corners(exp, name: str, keys: dict[str, str]) -> None:
    space = exp.spec.search_space
    axes = [(skey, rkey, _corner_values(space[skey])) for rkey, skey in keys.items()]
    total = math.prod(len(values) for _, _, values in axes)
    corners = itertools.product(*(values for _, _, values in axes))
    if total > MAX_CORNERS:  # a fixed, seeded sample of the corners (the first and last always among them)
        rng = random.Random(0)
        picks = [tuple(v[0] for _, _, v in axes), tuple(v[-1] for _, _, v in axes)]
        picks += [tuple(rng.choice(v) for _, _, v in axes) for _ in range(MAX_CORNERS - 2)]
        corners = iter(picks)

    recipe_of(exp, name)  # the declared recipe itself, with errors naming its own overrides
    source = recipe_source(exp, name)
    from datagen.recipe import available_recipes, recipe_from_dict

    path = available_recipes().get(source, Path(source))
    declared = apply_overrides(read_yaml_mapping(path, "recipe"), exp.spec.datasets[name].overrides())

    def problem(corner) -> str | None:
        data = copy.deepcopy(declared)
        try:
            for (_, rkey, _), value in zip(axes, corner):
                set_dotted(data, rkey, value)
            recipe_from_dict(data, (), source)
        except InputError as exc:
            return str(exc)
        return None

    for corner in corners:
        why = problem(corner)
        if why is None:
            continue
        # name the parameters that make it invalid: those whose other end (or choice) alone makes it valid
        culprits = [i for i, (_, _, values) in enumerate(axes)
                    if any(problem(corner[:i] + (v,) + corner[i + 1:]) is None for v in values if v != corner[i])]
        shown = culprits or range(len(axes))
        at = ", ".join(f"{axes[i][0]}={corner[i]!r}" for i in shown)
        raise ConfigError(f"study {exp.source}: search_space: the recipe of dataset {name!r} is not valid where "
                          f"{at}{' (with the other parameters at an end of their range)' if culprits else ''}: "
                          f"every draw must give a valid recipe, narrow the range. {why}")


def _check_confirm(exp, params: dict) -> None:
    spec, c = exp.spec, exp.spec.confirm
    where = f"study {exp.source}: confirm"
    known = [b.name for b in exp.config().benchmarks]
    chosen = confirm_benchmarks(exp)
    for b in chosen:
        if b not in known:
            raise ConfigError(f"{where}: benchmarks: {b!r} is not one of the study's benchmarks ({', '.join(known)})")
    if not chosen:
        raise ConfigError(f"{where}: the study scores no benchmark to compare the recipes on")
    for name in params:
        if spec.datasets[name].seed == c.data_seed:
            raise ConfigError(f"{where}: data_seed {c.data_seed} is the seed dataset {name!r} was designed on: the "
                              "test needs fresh data (another seed)")
    n, k = len(c.seeds), len(chosen)
    floor = min_attainable_p_test(c.test, n, n)
    if floor * k >= c.alpha:
        raise ConfigError(f"{where}: a two-sided {c.test} test on {n} seeds per recipe cannot give p below "
                          f"{floor:.3g}; Holm over the {k} benchmarks makes that {floor * k:.3g} >= alpha = "
                          f"{c.alpha}: use more seeds or fewer benchmarks")


def confirm_benchmarks(exp) -> list[str]:
    """The benchmarks the confirmation compares on: the declared ones, or every benchmark with the objective's
    first."""
    c = exp.spec.confirm
    names = [b.name for b in exp.config().benchmarks]
    if c is not None and c.benchmarks is not None:
        return list(c.benchmarks)
    metric = exp.spec.objective.metric
    first = [n for n in names if metric == f"ood/{n}/dice"]
    return first + [n for n in names if n not in first]


# -- one trial -------------------------------------------------------------------------------------------------------

def folder_name(name: str, recipe, n: int, seed: int) -> str:
    """The folder of a designed dataset: its name and identity (recipe hash, size, seed)."""
    return f"{name}-{config_hash({'recipe': recipe.hash(), 'n': n, 'seed': seed})[:12]}"


def trial_experiment(exp, sampled: dict) -> tuple:
    """(the trial's experiment: its designed datasets with the drawn recipe values, in their own folders; the
    training values; name -> the designed recipe). A study that designs nothing: (exp, sampled, {})."""
    params = recipe_params(exp.spec)
    if not params:
        return exp, sampled, {}
    train_values = {k: v for k, v in sampled.items() if not k.startswith(PREFIX)}
    spec = exp.spec.model_copy(deep=True)
    recipes = {}
    for name, keys in params.items():
        values = overrides({rkey: sampled[skey] for rkey, skey in keys.items()})
        recipe = recipe_of(exp, name, values)
        ds = spec.datasets[name]
        spec.datasets[name] = ds.model_copy(update={"set": ds.overrides() + values})
        spec._folders[name] = folder_name(name, recipe, ds.n, ds.seed)
        recipes[name] = recipe
    return type(exp)(spec, exp.base, exp.source, exp.cli_sets), train_values, recipes


# -- after the trials: the best recipe and the declared test ---------------------------------------------------------

def design_dir(exp) -> Path:
    return Path(exp.spec.data_root) / f"{exp.name}-design"


def best_recipe_file(exp, name: str, best, content_hash: str | None = None) -> Path:
    """Write the best trial's recipe of dataset ``name`` (exactly the resolved recipe the trial generated with) as
    ``best-NAME.yaml``; its header says how it was found and the command that remakes the trial's data."""
    _, _, recipes = trial_experiment(exp, best.params)
    recipe, ds = recipes[name], exp.spec.datasets[name]
    folder = exp.spec.dataset_path(folder_name(name, recipe, ds.n, ds.seed))
    path = design_dir(exp) / f"best-{name}.yaml"
    chosen = {rkey: best.params[skey] for rkey, skey in recipe_params(exp.spec)[name].items()}
    header = [
        f"Best recipe of dataset {name!r} found by design study {exp.name!r} (trial {best.number}, objective "
        f"{exp.spec.objective.aggregate} {exp.spec.objective.metric} = {best.value:.4f}).",
        f"Declared recipe: {exp.spec.datasets[name].recipe}; the study's overrides, then the trial's values:",
        *(f"  {k}: {json.dumps(v)}" for k, v in chosen.items()),
        f"The trial's data ({folder}{', content ' + content_hash[:12] if content_hash else ''}) are remade by:",
        f"  python -m datagen generate --recipe {path} --n {ds.n} --seed {ds.seed} --name {name} --out DIR",
        "New data from it: the same command with another --seed.",
    ]
    text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(recipe.resolved(), sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.encode())
    return path


def confirm_name(exp, best) -> str:
    return f"{exp.name}-confirm-t{best.number}"


def confirm_sweep_file(exp, best, best_files: dict[str, Path]) -> Path:
    """Write the declared test as a sweep file (``confirm-t<trial>.yaml`` beside the best recipes) and return its
    path: subsets ``best`` and ``default``, each training on its recipe's fresh data, the study's training settings
    with the best trial's training values, the confirm seeds, one comparison per benchmark."""
    spec, c = exp.spec, exp.spec.confirm
    out_dir = design_dir(exp)
    here = out_dir.absolute()
    params = recipe_params(spec)

    def rel(path: Path) -> str:  # beside the sweep file: relative to it; elsewhere: absolute
        path = path.absolute()
        return path.name if path.parent == here else str(path.resolve())

    def source(ds) -> str:  # a recipe file of the study, seen from the sweep file (a preset stays a name)
        from datagen.recipe import available_recipes

        if ds.recipe in available_recipes():
            return ds.recipe
        candidate = Path(exp.source).parent / ds.recipe
        return rel(candidate) if candidate.is_file() else ds.recipe

    datasets = {}
    for name, ds in spec.datasets.items():
        if name not in params:
            datasets[name] = {"recipe": source(ds), "n": ds.n, "seed": ds.seed, "set": ds.set}
    renamed: dict[str, dict[str, str]] = {arm: {} for arm in ARMS}
    for name in params:
        ds = spec.datasets[name]
        for arm in ARMS:
            arm_name = f"{name}-{arm}"
            while arm_name in datasets:
                arm_name += "x"
            renamed[arm][name] = arm_name
            if arm == "best":
                datasets[arm_name] = {"recipe": rel(best_files[name]), "n": ds.n, "seed": c.data_seed}
            else:
                datasets[arm_name] = {"recipe": source(ds), "n": ds.n, "seed": c.data_seed, "set": ds.set}
    train = _raw_train(exp)
    train_values = {k: v for k, v in best.params.items() if not k.startswith(PREFIX)}
    subsets = []
    for arm in ARMS:
        entries = [{**e, "dataset": renamed[arm].get(e.get("dataset"), e.get("dataset"))} if isinstance(e, dict)
                   and "dataset" in e else e for e in train]
        # the training values after data.train, which they may refine (data.train.0.max_samples)
        subsets.append({"name": arm, "set": {"data.train": entries, **train_values}})
    chosen = confirm_benchmarks(exp)
    sweep = {
        "kind": "sweep",
        "name": confirm_name(exp, best),
        "base": rel((Path(exp.source).parent / spec.base).resolve()),
        "data_root": spec.data_root,  # relative to the working directory, as the study's
        "datasets": datasets,
        "set": {k: v for k, v in spec.set.items() if not (k == "data.train" or k.startswith("data.train."))},
        "subsets": subsets,
        "seeds": list(c.seeds),
        "comparisons": [{"name": f"best-vs-default-{b}",
                         "hypothesis": f"Training on the best recipe of study {exp.name} (trial {best.number}) "
                                       f"changes Dice on {b} compared with the default recipe.",
                         "a": {"subset": "best"}, "b": {"subset": "default"}, "benchmark": b, "test": c.test}
                        for b in chosen],
        "alpha": c.alpha,
    }
    path = out_dir / f"confirm-t{best.number}.yaml"
    header = (f"# The test declared by design study {exp.name!r} (its confirm: section), written when its trials were "
              f"settled:\n# trial {best.number}'s recipe against the declared default, on fresh data (seed "
              f"{c.data_seed}), {len(c.seeds)} seeds each.\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (header + yaml.safe_dump(sweep, sort_keys=False)).encode())
    return path


def _raw_train(exp) -> list:
    """``data.train`` as the study's base and ``set`` write it (dataset names, not paths)."""
    import copy

    from hrtem_core.config import set_dotted

    data = copy.deepcopy(exp.base)
    for key, value in exp.spec.set.items():
        set_dotted(data, key, copy.deepcopy(value))
    return list((data.get("data") or {}).get("train") or [])


def confirm_findings(tracking_uri: str, sweep: str):
    """The confirmation sweep's findings table (``mlplatform.report_data.findings`` on its recorded runs)."""
    from mlplatform.report_data import collect_sweep, declared_findings

    return declared_findings(collect_sweep(tracking_uri, sweep)[0])

