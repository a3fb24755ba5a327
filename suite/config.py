"""Experiment files: loading, validation and grid expansion into `Trial` records.

An experiment file (YAML, safe loader) looks like::

    name: smoke
    device: cpu                      # any trial option may sit at the top level, in `measure:` or `probe:`
    measure: {mode: both, warmup: 2, iters: 5}
    probe: {dataset: digits}
    grid:                            # any trial option; a scalar or a list (an axis)
      model: [test_vit, test_resnet]
      pool: [avg, abs_attn]
    include: [{model: test_convnext, pool: max}]   # extra combinations (values may be lists)
    exclude: [{model: test_vit, pool: abs_attn}]   # drop grid points matching every key given
    select: {objective: max probe_top1, constraints: ["train_peak_mem_mib <= 20480"]}
    compare: {train_samples_per_sec: -5%}          # regression thresholds for `suite compare`
    run: {timeout_s: 600, workers: 1, backend: local, out: runs/smoke}

Every problem found is reported at once, each naming the file, the key path and the value, with
the closest valid name suggested. Option names and types come from `suite.options.OPTIONS`.
Checking model names needs timm (and so torch); everything else here is light.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from suite.criteria import parse_select, parse_thresholds
from suite.errors import ConfigError, close_matches, suggest  # noqa: F401 - ConfigError re-exported
from suite.options import BACKENDS, OPTION_BY_NAME, OPTIONS, Trial, options_in

SECTIONS = ("name", "description", "measure", "probe", "grid", "include", "exclude", "select", "compare", "run")
RUN_KEYS = {"timeout_s": (int, float), "workers": (int,), "backend": (str,), "address": (str,), "out": (str,)}


@dataclass(frozen=True)
class Experiment:
    """A validated experiment: its trials and the settings around them."""

    name: str
    source: str
    trials: tuple  # tuple[Trial, ...], grid order, no duplicates
    description: str = ""
    select: dict | None = None
    compare: dict | None = None
    run: dict = field(default_factory=dict)
    text: str = ""  # the file as written, stored with the results

    @property
    def axes(self) -> list[str]:
        """Options that take more than one value across the trials."""
        return [o.name for o in OPTIONS if len({repr(getattr(t, o.name)) for t in self.trials}) > 1]


def _check_value(path: str, name: str, value: Any, problems: list[str]) -> None:
    option = OPTION_BY_NAME[name]
    problem = option.check(value)
    if problem:
        hint = suggest(value, option.choices) if option.choices and isinstance(value, str) else ""
        problems.append(f"{path}: {value!r} {problem}{hint}")


def _check_options(path: str, block: Any, problems: list[str], *, allowed, lists: bool) -> dict:
    """Check a mapping of option -> value (or list of values when `lists`); return the valid part."""
    if not isinstance(block, dict):
        problems.append(f"{path}: expected a mapping of option: value, got {type(block).__name__} {block!r}")
        return {}
    names = [o.name for o in allowed]
    good = {}
    for key, value in block.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            problems.append(f"{where}: unknown option {key!r}{suggest(key, names)}")
            continue
        if isinstance(value, list):
            if not lists:
                problems.append(f"{where}: a list is only allowed under grid/include/exclude, got {value!r}")
                continue
            if not value:
                problems.append(f"{where}: empty list; give at least one value")
                continue
            before = len(problems)
            for i, item in enumerate(value):
                _check_value(f"{where}[{i}]", key, item, problems)
            if len(problems) == before:
                good[key] = list(dict.fromkeys(value))  # de-duplicate, keep order
        else:
            before = len(problems)
            _check_value(where, key, value, problems)
            if len(problems) == before:
                good[key] = [value] if lists else value
    return good


def _expand(axes: dict[str, list]) -> list[dict]:
    names = list(axes)
    return [dict(zip(names, combo)) for combo in itertools.product(*(axes[n] for n in names))]


def _matches(trial, rule: dict[str, list]) -> bool:
    return all(getattr(trial, k) in values for k, values in rule.items())


def parse_experiment(data: Any, source: str = "<experiment>", text: str = "") -> Experiment:
    """Validate a loaded experiment mapping and expand it into trials (no model-name check)."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError(source, [f"expected a mapping at the top level, got {type(data).__name__}"])
    option_names = [o.name for o in OPTIONS]
    fixed: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS:
            continue
        if key in option_names:
            fixed.update(_check_options("", {key: value}, problems, allowed=OPTIONS, lists=False))
        else:
            problems.append(f"{key}: unknown key{suggest(key, list(SECTIONS) + option_names)}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append(f"name: required, a non-empty string (got {name!r})")
    for section, groups in (("measure", ("measure",)), ("probe", ("probe",))):
        if section in data:
            fixed.update(_check_options(section, data[section], problems, allowed=options_in(*groups), lists=False))
    grid = _check_options("grid", data.get("grid", {}), problems, allowed=OPTIONS, lists=True)
    overlap = sorted(set(grid) & set(fixed))
    for key in overlap:
        problems.append(f"grid.{key}: also set outside the grid; set it in one place")

    def entries(section: str) -> list[dict]:
        raw = data.get(section, [])
        if not isinstance(raw, list):
            problems.append(f"{section}: expected a list of mappings, got {type(raw).__name__}")
            return []
        return [_check_options(f"{section}[{i}]", e, problems, allowed=OPTIONS, lists=True) for i, e in enumerate(raw)]

    includes, excludes = entries("include"), entries("exclude")
    has_model = "model" in grid or "model" in fixed
    if not has_model and (grid or not includes or not all("model" in e for e in includes)):
        problems.append("grid.model: required (at least one timm model name), e.g. grid: {model: [resnet50]}")

    run = data.get("run", {}) or {}
    if not isinstance(run, dict):
        problems.append(f"run: expected a mapping, got {type(run).__name__}")
        run = {}
    for key, value in run.items():
        if key not in RUN_KEYS:
            problems.append(f"run.{key}: unknown key{suggest(key, RUN_KEYS)}")
        elif not isinstance(value, RUN_KEYS[key]) or isinstance(value, bool):
            problems.append(f"run.{key}: {value!r} has the wrong type")
        elif key == "backend" and value not in BACKENDS:
            problems.append(f"run.backend: {value!r} must be one of {BACKENDS}{suggest(value, BACKENDS)}")
        elif key in ("timeout_s", "workers") and value <= 0:
            problems.append(f"run.{key}: {value!r} must be positive")

    select = data.get("select")
    if select is not None:
        try:
            parse_select(select, where="select")
        except ValueError as exc:
            problems.append(str(exc))
    compare = data.get("compare")
    if compare is not None:
        try:
            parse_thresholds(compare)
        except ValueError as exc:
            problems.append(f"compare: {exc}")
    if problems:
        raise ConfigError(source, problems)

    trials: list = []
    if grid or not includes:
        for point in _expand(grid):
            trial = Trial(**{**fixed, **point})
            if not any(_matches(trial, rule) for rule in excludes):
                trials.append(trial)
    single = {k: v[0] for k, v in grid.items() if len(v) == 1}
    for entry in includes:
        for point in _expand(entry):
            trials.append(Trial(**{**fixed, **single, **point}))
    trials = list({t.trial_id: t for t in trials}.values())  # first occurrence wins, order kept
    if not trials:
        raise ConfigError(source, ["the grid expands to no trials (exclude removed them all?)"])
    return Experiment(
        name=name.strip(), source=source, trials=tuple(trials), description=str(data.get("description", "")),
        select=select, compare=compare, run=dict(run), text=text,
    )


def check_models(exp: Experiment) -> None:
    """Unknown timm model names, with close matches, raised as a ConfigError. Imports timm."""
    import timm

    problems = []
    for model in sorted({t.model for t in exp.trials}):
        base = model.split(".", 1)[0]
        if model.startswith(("hf-hub:", "hf_hub:", "local-dir:")) or timm.is_model(base):
            continue
        matches = close_matches(base, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(m) for m in matches)}?" if matches else " (see timm.list_models())"
        problems.append(f"model: {model!r} is not a timm model{hint}")
    for trial in exp.trials:
        weights = trial.pretrained
        if isinstance(weights, str) and _looks_like_path(weights) and not Path(weights).expanduser().exists():
            problems.append(f"pretrained: checkpoint file {weights!r} does not exist")
    if problems:
        raise ConfigError(exp.source, sorted(set(problems)))


def _looks_like_path(value: str) -> bool:
    return "/" in value or value.endswith((".safetensors", ".pth", ".pt", ".bin", ".ckpt"))


def load_experiment(path: str | Path, *, check_names: bool = True) -> Experiment:
    """Read, validate and expand an experiment file. Raises ConfigError (exit code 2 on the CLI)."""
    import yaml

    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the file: {exc.strerror or exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"not valid YAML: {exc}"]) from None
    exp = parse_experiment(data, source, text)
    if check_names:
        check_models(exp)
    return exp
