"""What the script leaves in --out: gpu_check.json (every figure) and gpu_check.md (the summary)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from suite.core.options import plain


def jsonable(value: Any) -> Any:
    """JSON-able: containers walked (sets and tuples as lists), cells as `suite.core.options.plain`
    gives them (numpy scalars unwrapped, NaN as None), anything else as its text."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    value = plain(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def line(name: str, status: str, figure: str, elapsed: float, total: float) -> str:
    """One printed line per check: elapsed (and running total), status, name, figure."""
    return f"[{elapsed:6.1f}s | {total:6.1f}s] {status:4s}  {name:16s} {figure}"


def write_json(path: Path, header: dict, rows: list[dict]) -> None:
    path.write_text(json.dumps(jsonable({**header, "checks": rows}), indent=1))


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_markdown(path: Path, header: dict, rows: list[dict]) -> None:
    """The summary table, then each check's notes and failure reason; figures stay in the JSON."""
    env = header.get("env") or {}
    lines = [
        f"# GPU check: {header['card']}", "",
        f"{header['verdict']} · {header['counts']} · {header['wall_s']:.0f} s "
        f"(budget {header['budget_s']:.0f} s) · {time.strftime('%Y-%m-%d %H:%M', time.gmtime(header['finished_at']))} UTC",
        "",
        f"torch {env.get('env_torch')} · timm {env.get('env_timm')} · CUDA {env.get('env_cuda')} · "
        f"cuDNN {env.get('env_cudnn')} · driver {env.get('env_driver')} · commit {env.get('env_git_commit')}",
        "",
        f"Command: `python -m benchmarks.gpu_check {' '.join(header.get('argv') or ['--out', 'DIR'])}`. Every figure is in "
        "`gpu_check.json`; the sweep's report is under `reports/` (copy it to the repository's `reports/`).",
        "",
        "| check | status | figure | criterion | s |",
        "|---|---|---|---|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | **{r['status']}** | {_cell(r['figure'])} | {_cell(r['criterion'])} | "
                     f"{r['elapsed_s']:.1f} |")
    if header.get("not_yet_run"):
        lines += ["", f"Not run yet (the run was still going or was cut short): {', '.join(header['not_yet_run'])}"]
    details = [r for r in rows if r["notes"] or r["error"]]
    if details:
        lines += ["", "## Notes", ""]
        for r in details:
            for note in r["notes"]:
                lines.append(f"- **{r['name']}**: {note}")
            if r["error"]:
                lines.append(f"- **{r['name']}** raised: `{_cell(r['error'].strip().splitlines()[-1])}` "
                             "(traceback in the JSON)")
    path.write_text("\n".join(lines) + "\n")
