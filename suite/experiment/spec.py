"""Experiment files: loading, validation and grid expansion into `Trial` records.

An experiment file (YAML, safe loader) looks like::

    name: smoke
    device: cpu                      # any trial option may sit at the top level, in `measure:` or `probe:`
    measure: {mode: both, warmup: 2, iters: 5}
    probe: {dataset: [digits, textures], shots: [1, 5, 10, null]}   # a list outside grid is an axis, except shots
    grid:                            # any trial option; a scalar or a list (an axis)
      model: [test_vit, test_resnet]
      pool: [avg, abs_attn]
    include: [{model: test_convnext, pool: max}]   # extra combinations (values may be lists)
    exclude: [{model: test_vit, pool: abs_attn}]   # drop grid points matching every key given
    select: {objective: max probe_top1, constraints: ["train_peak_mem_mib <= 20480"]}
    compare: {train_samples_per_sec: -5%}          # regression thresholds for `suite compare`
    run: {timeout_s: 600, workers: 1, backend: local, out: runs/smoke}

Every problem found is reported at once, each naming the file, the key path and the value, with
the closest valid name suggested. Option names and types come from `suite.core.options.OPTIONS`.
Checking model names needs timm (and so torch); everything else here is light.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from suite.core.errors import ConfigError, suggest  # noqa: F401 - ConfigError re-exported
from suite.core.options import BACKENDS, OPTION_BY_NAME, OPTIONS, Trial, options_in, shots_text
from suite.experiment.checks import check_models
from suite.experiment.criteria import parse_select, parse_thresholds

SECTIONS = ("name", "description", "measure", "probe", "grid", "include", "exclude", "select", "compare", "run")
RUN_KEYS = {"timeout_s": (int, float), "workers": (int,), "backend": (str,), "address": (str,), "out": (str,)}
# Above this many trials a grid is refused unless confirmed (`--yes`, `max_trials=None`): a typo in a
# grid can ask for millions of trials, which would take days and gigabytes before the first one runs.
MAX_TRIALS = 10_000
# Refused even with --yes: a grid this large cannot be expanded in memory (each trial ~2 KB; 3 million
# took 5.6 GB) nor run (at least OVERHEAD_S_PER_TRIAL each: 14 h of overhead here); split it.
HARD_MAX_TRIALS = 100_000
# The sweep's own cost per trial (worker hand-off, store commit; benchmarks/README.md): a floor, not an estimate.
OVERHEAD_S_PER_TRIAL = 0.5


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
    warnings: tuple = ()  # tuple[str, ...]: legal but probably not meant (an exclude rule that matches nothing)

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
        if isinstance(value, list):  # callers pass lists only with lists=True (an axis)
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


def _fixed_or_axis(path: str, block: Any, allowed, fixed: dict, axes: dict, problems: list[str]) -> None:
    """Options outside the grid: a scalar goes to `fixed`, a list to `axes` (as if written under grid)."""
    if not isinstance(block, dict):
        _check_options(path, block, problems, allowed=allowed, lists=False)  # names the problem
        return
    for key, value in block.items():
        if key == "shots":
            value = shots_text(value)  # [1, 5, 10, null] outside the grid: one trial's few-shot ks
        if isinstance(value, list):
            good = _check_options(path, {key: value}, problems, allowed=allowed, lists=True)
            _unswept_identity(path, good, problems)
            axes.update(good)
        else:
            fixed.update(_check_options(path, {key: value}, problems, allowed=allowed, lists=False))


def _expand(axes: dict[str, list]):
    """Every combination of the axes' values, one at a time (never the whole grid in memory)."""
    names = list(axes)
    return (dict(zip(names, combo)) for combo in itertools.product(*(axes[n] for n in names)))


def count_trials(grid: dict[str, list], includes: list[dict]) -> int:
    """Grid points plus include combinations, before exclude and de-duplication: counted, not expanded."""
    count = math.prod(len(v) for v in grid.values()) if grid or not includes else 0
    return count + sum(math.prod(len(v) for v in entry.values()) for entry in includes)


def _too_many(count: int, limit: int, *, hard: bool = False) -> str:
    floor_h = count * OVERHEAD_S_PER_TRIAL / 3600
    return (f"the grid expands to {count:,} trials (before exclude), above the limit of {limit:,}: that is at least "
            f"{floor_h:,.1f} h of the sweep's own overhead ({OVERHEAD_S_PER_TRIAL} s per trial) before any measuring; "
            "shrink the grid or split it into several experiments"
            + (f"; even --yes allows no more than {HARD_MAX_TRIALS:,} trials" if hard
               else ", or confirm with --yes (max_trials=None)"))


def _name_problems(name: str) -> list[str]:
    """A name is the run's folder under runs/: a plain folder name, never a path that leaves it."""
    text = name.strip()
    if any(c in text for c in "/\\\0") or text in (".", "..") or text.startswith("."):
        return [f"name: {name!r} must be a plain folder name (the run is written to runs/<name>): no '/', '\\', "
                "'..' or leading '.'; use letters, digits, '-', '_' and '.'"]
    return []


def _unswept_identity(path: str, block: dict[str, list], problems: list[str]) -> None:
    """A list of values for an option that is not part of a trial's identity would collapse to one trial."""
    for key, values in block.items():
        if len(values) > 1 and not OPTION_BY_NAME[key].identity:
            problems.append(f"{path + '.' if path else ''}{key}: {values!r} cannot be swept: {key} does not change what is measured "
                            "(it is not part of a trial's identity), so every value would name the same trial; "
                            "give one value")


def _matches(trial, rule: dict[str, list]) -> bool:
    return all(getattr(trial, k) in values for k, values in rule.items())


def _check_run(run: Any, problems: list[str]) -> dict:
    """The `run:` block (timeout_s, workers, backend, address, out), its problems appended."""
    if not isinstance(run, dict):
        problems.append(f"run: expected a mapping, got {type(run).__name__}")
        return {}
    for key, value in run.items():
        if key not in RUN_KEYS:
            problems.append(f"run.{key}: unknown key{suggest(key, RUN_KEYS)}")
        elif not isinstance(value, RUN_KEYS[key]) or isinstance(value, bool):
            problems.append(f"run.{key}: {value!r} has the wrong type")
        elif key == "backend" and value not in BACKENDS:
            problems.append(f"run.backend: {value!r} must be one of {BACKENDS}{suggest(value, BACKENDS)}")
        elif key in ("timeout_s", "workers") and not 0 < value < math.inf:
            problems.append(f"run.{key}: {value!r} must be positive (and finite)")
    return run


def parse_experiment(data: Any, source: str = "<experiment>", text: str = "", *,
                     max_trials: int | None = MAX_TRIALS) -> Experiment:
    """Validate a loaded experiment mapping and expand it into trials (no model-name check).

    Args:
        max_trials: refuse a grid of more trials than this (None: no limit).
    """
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError(source, [f"expected a mapping at the top level, got {type(data).__name__}"])
    option_names = [o.name for o in OPTIONS]
    fixed: dict[str, Any] = {}
    outside: dict[str, list] = {}  # a list outside the grid (`probe: {dataset: [digits, textures]}`): an axis
    for key, value in data.items():
        if key in SECTIONS:
            continue
        if key in option_names:
            _fixed_or_axis("", {key: value}, OPTIONS, fixed, outside, problems)
        else:
            problems.append(f"{key}: unknown key{suggest(key, list(SECTIONS) + option_names)}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append(f"name: required, a non-empty string (got {name!r})")
    else:
        problems += _name_problems(name)
    for section, groups in (("measure", ("measure",)), ("probe", ("probe",))):
        if section in data:
            _fixed_or_axis(section, data[section], options_in(*groups), fixed, outside, problems)
    grid = _check_options("grid", data.get("grid", {}), problems, allowed=OPTIONS, lists=True)
    _unswept_identity("grid", grid, problems)
    for key in sorted(set(grid) & (set(fixed) | set(outside))):
        problems.append(f"grid.{key}: also set outside the grid; set it in one place")
    grid.update(outside)

    def entries(section: str) -> list[dict]:
        raw = data.get(section, [])
        if not isinstance(raw, list):
            problems.append(f"{section}: expected a list of mappings, got {type(raw).__name__}")
            return []
        out = [_check_options(f"{section}[{i}]", e, problems, allowed=OPTIONS, lists=True) for i, e in enumerate(raw)]
        if section == "include":
            for i, entry in enumerate(out):
                _unswept_identity(f"include[{i}]", entry, problems)
        return out

    includes, excludes = entries("include"), entries("exclude")
    has_model = "model" in grid or "model" in fixed
    if not has_model and (grid or not includes or not all("model" in e for e in includes)):
        problems.append("grid.model: required (at least one timm model name), e.g. grid: {model: [resnet50]}")

    run = _check_run(data.get("run", {}) or {}, problems)
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

    count = count_trials(grid, includes)  # counted, not expanded: before any memory is spent on trials
    if max_trials is not None and count > max_trials:
        raise ConfigError(source, [_too_many(count, max_trials, hard=count > HARD_MAX_TRIALS)])
    if count > HARD_MAX_TRIALS:
        raise ConfigError(source, [_too_many(count, HARD_MAX_TRIALS, hard=True)])
    trials, warnings = _expand_trials(grid, fixed, includes, excludes, source)
    return Experiment(
        name=name.strip(), source=source, trials=tuple(trials), description=str(data.get("description", "")),
        select=select, compare=compare, run=dict(run), text=text, warnings=tuple(warnings),
    )


def _expand_trials(grid: dict, fixed: dict, includes: list[dict], excludes: list[dict],
                   source: str) -> tuple[list, list[str]]:
    """The trials (grid order, then includes; each once) and warnings about exclude rules that matched nothing.

    Raises:
        ConfigError: two entries name the same trial with different values of a non-identity option,
            or nothing is left.
    """
    trials: list = []
    used = [False] * len(excludes)
    if grid or not includes:
        for point in _expand(grid):
            trial = Trial(**{**fixed, **point})
            hits = [i for i, rule in enumerate(excludes) if _matches(trial, rule)]
            for i in hits:
                used[i] = True
            if not hits:
                trials.append(trial)
    single = {k: v[0] for k, v in grid.items() if len(v) == 1}
    for entry in includes:
        trials.extend(Trial(**{**fixed, **single, **point}) for point in _expand(entry))
    unique: dict = {}
    problems = []
    for trial in trials:
        first = unique.setdefault(trial.trial_id, trial)  # the first occurrence wins, order kept
        if first != trial:
            diff = ", ".join(f"{o.name}: {getattr(first, o.name)!r} vs {getattr(trial, o.name)!r}" for o in OPTIONS
                             if getattr(first, o.name) != getattr(trial, o.name))
            problems.append(f"include: {trial.label} is given twice with different settings that do not change "
                            f"what is measured ({diff}); give one value")
    if problems:
        raise ConfigError(source, sorted(set(problems)))
    if not unique:
        raise ConfigError(source, ["the grid expands to no trials (exclude removed them all?)"])
    warnings = [f"exclude[{i}]: {rule} matches no trial of the grid; check its names and values"
                for i, rule in enumerate(excludes) if not used[i]]
    return list(unique.values()), warnings


def _unique_key_loader():
    """A yaml SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently).

    Merge keys (`<<: *defaults`) work as in YAML 1.1: the merged keys come first, a key written
    beside them overrides them (that is not a key given twice)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *defaults`: merged by SafeLoader below; a key written here overrides it
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice in one mapping (lines {seen[key]} and {line}); "
                        "keep one (list several values in one key to sweep them)", key_node.start_mark)
                seen.setdefault(key, line)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def read_utf8(path: str | Path, source: str) -> str:
    """The file's text; a file that is not UTF-8 is a ConfigError naming the byte, its position and line."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the file: {exc.strerror or exc}"]) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, column = raw.count(b"\n", 0, exc.start) + 1, exc.start - raw.rfind(b"\n", 0, exc.start)
        raise ConfigError(source, [f"not UTF-8: byte 0x{raw[exc.start]:02x} at byte position {exc.start} (line {line}, "
                                   f"column {column}) cannot be decoded ({exc.reason}); save the file as UTF-8"]) from None


def load_experiment(path: str | Path, *, check_names: bool = True, max_trials: int | None = MAX_TRIALS) -> Experiment:
    """Read, validate and expand an experiment file. Raises ConfigError (exit code 2 on the CLI).

    Args:
        check_names: also check model names and weights with timm (imports torch).
        max_trials: refuse a grid of more trials than this (None: no limit).
    """
    import yaml

    source = str(path)
    text = read_utf8(path, source)
    try:
        data = yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"not valid YAML: {exc}"]) from None
    exp = parse_experiment(data, source, text, max_trials=max_trials)
    if check_names:
        notes = check_models(exp)
        exp = replace(exp, warnings=exp.warnings + tuple(notes))
    return exp
