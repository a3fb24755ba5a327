"""How long will a sweep take? An estimate from earlier results, for `suite validate`. Light: no torch."""
from __future__ import annotations

from pathlib import Path

from suite.results.store import DEFAULT_NAME, load_results


def estimate_cost(exp, out_dir: Path, skip: set[str] = frozenset()) -> str:
    """One line: the estimated run time, from earlier rows of the same trials or models.

    A trial measured before costs what it cost then; a new trial costs the median of earlier
    trials of the same model, else the median of all earlier trials. Without earlier results
    there is nothing honest to say, and the line says so.
    """
    db = out_dir / DEFAULT_NAME
    if not db.exists():
        return f"cost estimate: no earlier results at {db} (run once to get estimates)"
    df = load_results(db)
    df = df[df["finished_at"].notna() & df["started_at"].notna()]
    if df.empty:
        return f"cost estimate: {db} has no timed trials yet"
    df = df.assign(seconds=df["finished_at"] - df["started_at"])
    by_trial = df.groupby("trial_id")["seconds"].median().to_dict()
    by_model = df.groupby("model")["seconds"].median().to_dict()
    overall = float(df["seconds"].median())
    total, known, guessed = 0.0, 0, 0
    for trial in exp.trials:
        if trial.trial_id in skip:
            continue
        if trial.trial_id in by_trial:
            total += by_trial[trial.trial_id]
            known += 1
        else:
            total += by_model.get(trial.model, overall)
            guessed += 1
    return (f"cost estimate: ~{total / 60:.1f} min of trial time ({known} trials measured before, "
            f"{guessed} estimated from similar trials in {db}), plus worker start-up")
