"""The single source of option names, types and defaults.

Every option a trial can take is declared once here. The experiment files (`config.py`), the
Python API (`Trial`) and the CLI flags of `suite bench|probe|profile` (`cli.py`) are all derived
from `OPTIONS`, so names and defaults cannot drift apart.

This module must stay light: no torch, no timm.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable

# Pool names the tower understands. Whether a given trunk supports one is decided by the tower.
POOLS = ("avg", "max", "avgmax", "catavgmax", "token", "map", "", "abs_attn", "rot_attn")
# "" (open_clip's `timm_proj: null`): the trunk's own classifier head, resized to embed_dim, is the projection;
# "none": no projection, the trunk's pooled features pass through.
PROJS = ("linear", "mlp", "none", "")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
MODES = ("both", "infer", "train")
DATASETS = ("none", "digits", "imagefolder", "synthetic", "textures")
PROBE_FEATURES = ("pooled", "projected")  # what the probe reads: before or after the projection head
BACKENDS = ("local", "ray")  # how a sweep runs its trials (the experiment's run.backend)


@dataclass(frozen=True)
class Option:
    """One trial option.

    Attributes:
        name: field name in `Trial`, key in experiment files, `--name-with-dashes` on the CLI.
        types: accepted Python types of a value (bool is never accepted as int).
        default: the default value.
        help: one line for `--help` and docs/options.md.
        group: `tower`, `measure` or `probe`; decides the CLI command that shows it.
        choices: the allowed values, when the set is closed.
        nullable: whether `None` (YAML `null`) is a valid value.
        cli: extra CLI spellings (e.g. `--lock`).
        identity: whether the option changes what is measured (part of `trial_id`).
        hashed_at_default: False for options added after results were first stored: they enter
            `trial_id` only when set to another value, so stored trials keep their ids (resume and
            `suite compare` against an old baseline still match them).
        minimum: the smallest valid number (numbers only), with `why` saying what it is for.
        maximum: the largest valid number (rates), or None.
        why: why the range is what it is, shown with a value out of range.
        parse: for a string with its own syntax, a function that raises ValueError on a bad value.
    """

    name: str
    types: tuple[type, ...]
    default: Any
    help: str
    group: str
    choices: tuple | None = None
    nullable: bool = False
    cli: tuple[str, ...] = ()
    identity: bool = True
    hashed_at_default: bool = True
    minimum: float = 0
    maximum: float | None = None
    why: str = ""
    parse: Any = None

    def check(self, value: Any) -> str | None:
        """Return a problem with `value`, or None when it is valid."""
        if value is None:
            return None if self.nullable else "must not be null"
        if isinstance(value, bool) and bool not in self.types:
            return f"must be {self.type_name()}, got a boolean"
        if isinstance(value, int) and not isinstance(value, bool) and float in self.types and int not in self.types:
            value = float(value)
        if not isinstance(value, self.types):
            return f"must be {self.type_name()}, got {type(value).__name__} {value!r}"
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(repr(c) for c in self.choices)}"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return self._range_problem(value)
        if self.parse is not None:
            try:
                self.parse(value)
            except ValueError as exc:
                return str(exc)
        return None

    def _range_problem(self, value: float) -> str | None:
        why = f" ({self.why})" if self.why else ""
        if value != value or value in (float("inf"), float("-inf")):
            return "must be a finite number"
        if value < self.minimum:
            return "must not be negative" if self.minimum == 0 else f"must be at least {self.minimum:g}{why}"
        if self.maximum is not None and value > self.maximum:
            return f"must be at most {self.maximum:g}{why}"
        return None

    def type_name(self) -> str:
        names = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}
        text = " or ".join(names[t] for t in self.types)
        return text + (" or null" if self.nullable else "")


def parse_shots(text: str) -> list[int | None]:
    """'1,5,10,all' -> [1, 5, 10, None] (None: every training image), each k once, in order.

    Raises:
        ValueError: an entry that is not a positive integer or 'all'.
    """
    out: list[int | None] = []
    for part in (p.strip() for p in str(text).split(",")):
        if part.lower() in ("all", "null", "none"):
            out.append(None)
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise ValueError(f"has {part!r}, which is not a positive integer or 'all'; write e.g. '1,5,10,all'")
    return list(dict.fromkeys(out))


def shots_text(value: Any) -> Any:
    """The canonical string of a few-shot list as an experiment file may write it: [1, 5, null] -> '1,5,all'.

    Other values (a string, null, something invalid that the option's check will name) pass unchanged.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list) and all(v is None or (isinstance(v, (int, str)) and not isinstance(v, bool))
                                       for v in value):
        return ",".join("all" if v is None else str(v) for v in value)
    return value


OPTIONS: tuple[Option, ...] = (
    # --- the tower (open_clip TimmModel constructor, plus lock and checkpointing) ---
    Option("model", (str,), None, "timm model name, e.g. vit_base_patch16_224", "tower"),
    Option("embed_dim", (int,), 512, "output embedding width of the projection head", "tower",
           minimum=1),
    Option("image_size", (int,), 224, "input resolution (square)", "tower", minimum=1),
    Option("pool", (str,), "avg", "pooling: avg|max|avgmax|catavgmax|token|map|'' (trunk default)|abs_attn|rot_attn", "tower", POOLS),
    Option("proj", (str,), "linear", "projection: linear|mlp|none (trunk features)|'' (the trunk's own head at embed_dim)", "tower", PROJS),
    Option("proj_bias", (bool,), False, "bias in the projection", "tower"),
    Option("drop", (float,), 0.0, "dropout before the projection", "tower", maximum=1, why="a rate"),
    Option("drop_path", (float,), None, "stochastic depth rate (models that accept it)", "tower", nullable=True,
           maximum=1, why="a rate"),
    Option("patch_drop", (float,), None, "patch dropout rate (ViT-like models)", "tower", nullable=True, maximum=1,
           why="a rate"),
    Option(
        "pretrained", (bool, str), False,
        "weights: false (random init), true (timm hub), a hub tag, or a local checkpoint path", "tower",
    ),
    Option(
        "unlocked_groups", (int,), None,
        "lock the trunk leaving the last N layer groups trainable (null: not locked)", "tower",
        nullable=True, cli=("--lock",),
    ),
    Option("freeze_bn_stats", (bool,), False, "freeze BatchNorm statistics of locked groups", "tower"),
    Option("grad_checkpointing", (bool,), False, "gradient checkpointing in the trunk", "tower"),
    # --- how it is measured ---
    Option("device", (str,), "auto", "cpu|cuda|auto", "measure", DEVICES),
    Option("precision", (str,), "fp32", "fp32|bf16|fp16 (autocast)", "measure", PRECISIONS),
    Option("batch_size", (int,), 32, "batch size (the upper bound when auto_batch_size)", "measure", minimum=1),
    Option("auto_batch_size", (bool,), False, "back off from batch_size on OOM to the largest that fits", "measure"),
    Option("channels_last", (bool,), False, "channels_last memory format", "measure"),
    Option("compile", (bool,), False, "torch.compile the tower (compile time reported apart)", "measure"),
    Option("compile_backend", (str,), "inductor", "torch.compile backend (inductor, aot_eager, cudagraphs, ...)",
           "measure", hashed_at_default=False),
    Option("mode", (str,), "both", "what to measure: infer|train|both", "measure", MODES),
    Option("warmup", (int,), 5, "minimum untimed warm-up steps (warm-up then runs until the step time is steady)", "measure"),
    Option("iters", (int,), 20, "timed steps per round (at least two rounds, more until two agree within 5%)", "measure", minimum=1,
           why="at least one step must be timed"),
    Option("min_time_s", (float,), 0.0,
           "seconds a timed round lasts at least: fast steps get more than iters (sized from the warm-up's step "
           "time); 0: exactly iters", "measure", hashed_at_default=False, why="seconds"),
    Option("noise_threshold", (float,), 0.1, "flag a timing whose IQR/median exceeds this", "measure", identity=False),
    Option("max_batch", (bool,), False, "also search the largest batch that fits mem_budget_mib (GPU: real OOMs)",
           "measure", hashed_at_default=False),
    Option("mem_budget_mib", (float,), None, "memory budget of the capacity figures (null: the device's memory)",
           "measure", nullable=True, hashed_at_default=False, minimum=1, why="MiB of memory"),
    # --- the linear probe ---
    Option("dataset", (str,), "none", "probe data: none|digits|imagefolder|synthetic|textures", "probe", DATASETS),
    Option("root", (str,), None, "image folder for dataset=imagefolder", "probe", nullable=True),
    Option("max_per_class", (int,), None, "cap images per class (quick runs)", "probe", nullable=True, minimum=3,
           why="each class needs an image in train, val and test; raise it or use null for no cap"),
    Option("probe_batch_size", (int,), 64, "batch size of feature extraction", "probe", identity=False,
           minimum=1),
    Option("knn", (bool,), False, "also report cosine kNN (k=20) accuracy", "probe"),
    Option("seed", (int,), 0, "seed of random-init weights, data splits and the classifier", "probe"),
    Option("skip_bad_images", (bool,), False, "skip unreadable images instead of failing", "probe"),
    Option("probe_features", (str,), "pooled",
           "features probed: pooled (the trunk's, before the projection head) or projected (after it)",
           "probe", PROBE_FEATURES, hashed_at_default=False),
    Option("shots", (str,), None,
           "few-shot probes: labeled images per class, e.g. '1,5,10,all' or [1, 5, 10, null] (null: none)",
           "probe", nullable=True, hashed_at_default=False, parse=parse_shots),
    Option("shot_seeds", (int,), 3, "seeds (samples of the training split) per few-shot k", "probe",
           hashed_at_default=False),
)

OPTION_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}


def options_in(*groups: str) -> tuple[Option, ...]:
    return tuple(o for o in OPTIONS if o.group in groups)


def _default(name: str) -> Any:
    return OPTION_BY_NAME[name].default


def canonical(option: Option, value: Any) -> Any:
    """`value` as hashed: an integer given for a float option (YAML `drop: 0`) counts as that float,
    so it names the same trial as `0.0` from the CLI or the default (the dataclass already equates them)."""
    if option.types == (float,) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def sha256_json(obj: Any, length: int = 16) -> str:
    """A short stable hash of a JSON-able value (keys sorted; other objects by `str`)."""
    blob = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class Trial:
    """One configuration to measure: a tower, how it is measured, and the probe.

    The fields are exactly `OPTIONS`, in order, with the schema's defaults (a test checks the two
    agree); see `OPTIONS` for what each means.
    """

    model: str
    # the tower
    embed_dim: int = _default("embed_dim")
    image_size: int = _default("image_size")
    pool: str = _default("pool")
    proj: str = _default("proj")
    proj_bias: bool = _default("proj_bias")
    drop: float = _default("drop")
    drop_path: float | None = _default("drop_path")
    patch_drop: float | None = _default("patch_drop")
    pretrained: bool | str = _default("pretrained")
    unlocked_groups: int | None = _default("unlocked_groups")
    freeze_bn_stats: bool = _default("freeze_bn_stats")
    grad_checkpointing: bool = _default("grad_checkpointing")
    # how it is measured
    device: str = _default("device")
    precision: str = _default("precision")
    batch_size: int = _default("batch_size")
    auto_batch_size: bool = _default("auto_batch_size")
    channels_last: bool = _default("channels_last")
    compile: bool = _default("compile")
    compile_backend: str = _default("compile_backend")
    mode: str = _default("mode")
    warmup: int = _default("warmup")
    iters: int = _default("iters")
    min_time_s: float = _default("min_time_s")
    noise_threshold: float = _default("noise_threshold")
    max_batch: bool = _default("max_batch")
    mem_budget_mib: float | None = _default("mem_budget_mib")
    # the linear probe
    dataset: str = _default("dataset")
    root: str | None = _default("root")
    max_per_class: int | None = _default("max_per_class")
    probe_batch_size: int = _default("probe_batch_size")
    knn: bool = _default("knn")
    seed: int = _default("seed")
    skip_bad_images: bool = _default("skip_bad_images")
    probe_features: str = _default("probe_features")
    shots: str | None = _default("shots")
    shot_seeds: int = _default("shot_seeds")

    @property
    def trial_id(self) -> str:
        """Stable hash of everything that changes what the trial measures."""
        ident = {o.name: canonical(o, getattr(self, o.name)) for o in OPTIONS
                 if o.identity and (o.hashed_at_default or getattr(self, o.name) != o.default)}
        return sha256_json(ident)

    @property
    def label(self) -> str:
        """Short human label: the model and the identity options that differ from the defaults."""
        return trial_label(self, [o.name for o in OPTIONS[1:] if o.identity and o.name not in _UNLABELED])

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Options a short label leaves out: how long or on what data it is measured, not what is measured.
_UNLABELED = {"device", "mode", "warmup", "iters", "min_time_s", "dataset", "root", "max_per_class", "knn", "seed", "skip_bad_images",
              "shots", "shot_seeds"}


# --- labels: how a trial is named everywhere ----------------------------------------------

# Short names for the few long option names in labels and table headers.
SHORT = {"unlocked_groups": "lock", "grad_checkpointing": "ckpt", "freeze_bn_stats": "freeze_bn"}


def get(row, name: str) -> Any:
    """row[name] of a result row (a dict, a pandas row) or a `Trial`'s attribute; None for a missing
    column or a NaN, numpy scalars unwrapped."""
    try:
        value = row[name]
    except (KeyError, IndexError):
        return None
    except TypeError:  # a Trial or another record: its attribute
        value = getattr(row, name, None)
    return plain(value)


def plain(value: Any) -> Any:
    """A Python value for a cell: numpy scalars unwrapped, NaN as None."""
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and value != value else value  # NaN is missing


def same_config(name: str, a: Any, b: Any) -> bool:
    """Equal as configuration values (0 == 0.0, but True != 1 and None != 0)."""
    return config_value(name, a) == config_value(name, b)


def config_value(name: str, value: Any) -> str:
    """A config value as the report shows it."""
    if name == "unlocked_groups" and value is None:
        return "off"  # not locked, distinct from "locked, 0 groups unlocked"
    if value is None:
        return "default"
    if isinstance(value, bool):
        return "on" if value else "off"
    if value == "":
        return "''"  # pool '' (no pooling) must stay visible
    if isinstance(value, float) and value.is_integer():
        return f"{value:g}"
    return str(value)


def trial_label(row, axes: Iterable[str]) -> str:
    """Model plus the options of `axes` that differ from their defaults, e.g. 'vit pool=token ckpt'.

    The one labeller: live sweep lines, the report, compare and export all name trials with it.
    `row` is a dict, a pandas row or a `Trial`.
    """
    parts = [str(get(row, "model"))]
    for name in axes:
        value, default = get(row, name), OPTION_BY_NAME[name].default
        if same_config(name, value, default):
            continue
        short = SHORT.get(name, name)
        parts.append(short if value is True else f"{short}={config_value(name, value)}")
    return " ".join(parts)


def trial_problems(trial) -> list[str]:
    """Type/choice problems of a trial's values, as 'name: problem' strings."""
    out = []
    for o in OPTIONS:
        problem = o.check(getattr(trial, o.name))
        if problem:
            out.append(f"{o.name}: {problem}")
    return out
