"""The checks of an experiment that need timm (and so torch): model names with close matches,
checkpoint files, hub weights that cannot be had offline, torch.compile backends.

`spec` parses and checks everything else without torch; `load_experiment` runs these after it.
"""
from __future__ import annotations

from pathlib import Path

from suite.core.errors import ConfigError, close_matches, suggest
from suite.tower.hub import hub_weights_problem, looks_like_path


def check_models(exp) -> list[str]:
    """Of an `Experiment`'s trials: raise unknown model names (with close matches), missing checkpoints, hub weights that cannot be had
    offline and unknown compile backends as a ConfigError; return warnings (weights that each trial will
    download). Imports timm (and torch._dynamo when a trial compiles).
    """
    import timm

    problems, notes = [], []
    for model in sorted({t.model for t in exp.trials}):
        base = model.split(".", 1)[0]
        if model.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
            problems.append(f"model: {model!r}: hub and local-dir model names are not supported as model; give the "
                            "timm architecture as model and the weights as pretrained, e.g. "
                            "{model: vit_base_patch16_224, pretrained: 'hf-hub:timm/vit_base_patch16_224.augreg_in21k'}")
            continue
        if timm.is_model(base):
            continue
        matches = close_matches(base, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(m) for m in matches)}?" if matches else " (see timm.list_models())"
        problems.append(f"model: {model!r} is not a timm model{hint}")
    for model, weights in sorted({(t.model, t.pretrained) for t in exp.trials}, key=repr):
        if isinstance(weights, str) and looks_like_path(weights) and not Path(weights).expanduser().exists():
            problems.append(f"pretrained: checkpoint file {weights!r} does not exist")
        elif not problems:
            problem, note = hub_weights_problem(model, weights)
            problems += [problem] if problem else []
            notes += [note] if note else []
    problems += _compile_problems(exp)
    if problems:
        raise ConfigError(exp.source, sorted(set(problems)))
    return notes


def compile_backends() -> list[str]:
    """The torch.compile backends this torch knows (debug and experimental ones included). Imports torch."""
    import torch._dynamo

    return list(torch._dynamo.list_backends(exclude_tags=()))


def _compile_problems(exp) -> list[str]:
    """Unknown `compile_backend` names of the compiled trials, found before a tower is built."""
    asked = sorted({t.compile_backend for t in exp.trials if t.compile})
    if not asked:
        return []
    known = compile_backends()
    return [f"compile_backend: {name!r} is not a torch.compile backend{suggest(name, known) or ''}; "
            f"known: {', '.join(known)}" for name in asked if name not in known]
