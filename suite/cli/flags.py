"""The command line's flags: those of `bench`, `probe` and `profile` derived from the option schema
(`suite.core.options.OPTIONS`, the same as the experiment files), and the checked argument types."""
from __future__ import annotations

import argparse

from suite.core.options import OPTIONS, Option, Trial
from suite.experiment.criteria import MAX_CONFIRM_ROUNDS


def _parse_value(option: Option, text: str):
    """Turn a flag's text into the option's type, checked as the experiment files are (range included);
    raise argparse.ArgumentTypeError (exit 2) with the fix."""
    value = _convert(option, text)
    problem = None if option.choices else option.check(value)  # argparse checks choices itself
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r} {problem}")
    return value


def _convert(option: Option, text: str):
    low = text.strip().lower()
    if option.nullable and low in ("none", "null"):
        return None
    if bool in option.types and low in ("true", "yes", "1", "false", "no", "0"):
        return low in ("true", "yes", "1")
    for kind in (int, float):
        if kind in option.types:
            try:
                return kind(text)
            except ValueError:
                if str not in option.types:
                    raise argparse.ArgumentTypeError(f"{text!r} is not {option.type_name()}") from None
    return text


def add_option_flags(parser: argparse.ArgumentParser, groups: tuple[str, ...], *, also: tuple[str, ...] = (),
                     defaults: dict | None = None) -> None:
    """One flag per option of the groups (and the options named in `also`), named, typed and documented by the schema."""
    defaults = defaults or {}
    for option in OPTIONS:
        if option.group not in groups and option.name not in also:
            continue
        flag = "--" + option.name.replace("_", "-")
        default = defaults.get(option.name, option.default)
        names = [flag, *option.cli]
        help_text = option.help.replace("%", "%%")  # argparse %-formats help: "within 5%" crashed --help
        if option.types == (bool,):
            parser.add_argument(*names, dest=option.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
            continue
        kwargs = dict(dest=option.name, default=default, help=f"{help_text} (default: {default!r})",
                      type=lambda text, o=option: _parse_value(o, text))
        if option.name == "model":
            kwargs.update(required=True, default=None, help=help_text)
        if option.choices:
            kwargs["choices"] = option.choices
            kwargs["metavar"] = "{" + ",".join(c or "''" for c in option.choices) + "}"
        parser.add_argument(*names, **kwargs)


def trial_from_args(args: argparse.Namespace) -> Trial:
    values = {o.name: getattr(args, o.name) for o in OPTIONS if hasattr(args, o.name)}
    return Trial(**values)


def whole_number(text: str, what: str, low: int, high: float = float("inf")) -> int:
    """`text` as a whole number in [low, high], else an argparse error naming what it counts."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        bound = f"from {low} to {high:,}" if high != float("inf") else f"of at least {low}"
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of {what} {bound}")
    return value


def positive_int(text: str) -> int:
    return whole_number(text, "workers", 1)


def confirm_rounds(text: str) -> int:
    return whole_number(text, "re-measurement rounds", 1, MAX_CONFIRM_ROUNDS)


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive, finite number of seconds")
    return value
