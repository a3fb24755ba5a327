"""One side of an A/B re-measurement: a process that holds one trial's step warm and times rounds on request.

`suite compare --confirm` (`suite.gate.abtest`) starts one of these per side, each with its own
code: the current side from this checkout, the baseline side from the files of the baseline's
commit (`PYTHONPATH` pointing at that tree). Both processes build the same configuration, warm
it up once, then time short rounds in turn (A B B A ...), so the two sides are measured in the same
minutes of the machine, and neither process pays for a tower build or a warm-up per round.

Protocol: one JSON object per line on stdin, one JSON reply per line on the original stdout
(everything else the process prints goes to stderr):

    {"op": "env", "device": "cpu"}                    -> {"ok": true, "env": {...}}   (capture_env)
    {"op": "prepare", "trial": {...}, "phase": "infer"|"train", "threads": 2}
                                                      -> {"ok": true, "step_ms": 1.2, "warmup_steps": 9}
    {"op": "round", "steps": 40}                      -> {"ok": true, "times_ms": [...], "calib_ms": 3.1}
    {"op": "fork"}                                    -> {"ok": true, "pid": ..., "forked": true}
    {"op": "end"}                                     -> {"ok": true}   (the forked child exits)
    {"op": "quit"}

"fork" starts a block of an A/B experiment in a fresh process: the zygote (which imported torch and
timm once) forks a child that answers the following requests until "end". A process of the same
code carries a speed bias of its own for its whole life, so each block is one sample of it. Where
CUDA is already initialized (a child could not use it) the zygote serves the block itself.

`calib_ms` is the calibration workload timed right after the round: a fixed matmul chain that
does not depend on the trial, so its drift is the machine's drift (`suite.gate.abtest` reports
figures relative to it as well as raw). Errors are replies (`{"ok": false, "error": ...}`), never a
crash of the protocol.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time

CALIB_SIZE = 192  # the calibration matmul: (CALIB_SIZE x CALIB_SIZE) @ (CALIB_SIZE x CALIB_SIZE), float32
CALIB_REPS = 5  # timed repetitions per round; their median is the round's calib_ms
CALIB_CHAIN = 8  # matmuls per repetition
_STATE = {"child": False}  # True in a block's forked child (which exits at "end")


class _Side:
    def __init__(self) -> None:
        self.step = self.inputs = self.tower = None
        self.device = "cpu"
        self._calib = None

    def env(self, device: str) -> dict:
        from suite.machine.env import capture_env
        from suite.sweep.trial import trial_env

        trial_env(device)  # holds the allocator steady first, as every measuring worker does
        return dataclasses.asdict(capture_env(device))

    def prepare(self, trial_values: dict, phase: str, threads: int | None) -> dict:
        import torch

        from suite.core.options import Trial
        from suite.machine.device import resolve_device
        from suite.measurement.steps import make_inputs, step_fn
        from suite.measurement.timing import warm_up
        from suite.tower.model import build_tower

        if threads:
            torch.set_num_threads(int(threads))
        self.release()
        trial = Trial(**trial_values)
        self.device = resolve_device(trial.device)
        torch.manual_seed(0)
        self.tower = build_tower(trial)
        self.step = step_fn(phase, self.tower, trial, self.device)
        self.inputs = make_inputs(trial, self.device, trial.batch_size)
        steps, steady, step_ms = warm_up(self.step, self.inputs, warmup=trial.warmup, device=self.device)
        return {"step_ms": step_ms, "warmup_steps": steps, "warmup_steady": steady}

    def round(self, steps: int) -> dict:
        from suite.measurement.timing import timed_round

        if self.step is None:
            raise RuntimeError("no trial prepared: send 'prepare' first")
        times = timed_round(self.step, self.inputs, int(steps), self.device)
        return {"times_ms": times, "calib_ms": self.calibrate()}

    def calibrate(self) -> float:
        """The calibration workload's time (ms): the same fixed matmul chain on the same device, every round."""
        import torch

        if self._calib is None:
            g = torch.Generator().manual_seed(0)
            self._calib = torch.randn(CALIB_SIZE, CALIB_SIZE, generator=g).to(self.device)
        x = self._calib
        times = []
        for _ in range(CALIB_REPS):
            if self.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            y = x
            for _ in range(CALIB_CHAIN):
                y = torch.tanh(y @ x)
            if self.device == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def release(self) -> None:
        self.step = self.inputs = self.tower = None
        from suite.sweep.trial import release_memory

        release_memory()


def serve(lines, reply) -> None:
    """Answer requests from `lines` (an iterable of JSON texts) through `reply(dict)` until "quit"."""
    side = _Side()
    for line in lines:
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
            op = msg.get("op")
            if op == "quit":
                return
            if op == "fork":  # a fresh process for the next block, without importing torch again
                if _fork_block(reply):
                    continue  # the child serves the block's requests until "end"
                continue  # the parent: its child has ended the block
            if op == "end":
                reply({"ok": True})
                if _STATE["child"]:
                    os._exit(0)
                side.release()
                continue
            if op == "env":
                out = {"env": side.env(msg.get("device", "cpu"))}
            elif op == "prepare":
                out = side.prepare(msg["trial"], msg["phase"], msg.get("threads"))
            elif op == "round":
                out = side.round(msg["steps"])
            else:
                raise ValueError(f"unknown op {op!r}")
            reply({"ok": True, **out})
        except Exception as exc:  # noqa: BLE001 - a failed request is a reply; the driver decides
            from suite.core.errors import one_line

            reply({"ok": False, "error": f"{type(exc).__name__}: {one_line(exc)}"})


def _fork_block(reply) -> bool:
    """Fork a child that serves the next requests (True in the child); the parent waits for it to end.

    The zygote only imported torch and timm (no tensor work, so no thread pool exists yet), so the
    child starts clean, and each block of an A/B experiment gets a process of its own: its own heap,
    threads and memory layout, whose speed bias is then one sample, not the whole experiment's.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # a forked child cannot use CUDA: the block runs here
        reply({"ok": True, "pid": os.getpid(), "forked": False})
        return True
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        _STATE["child"] = True
        reply({"ok": True, "pid": os.getpid(), "forked": True})
        return True
    os.waitpid(pid, 0)
    return False


def main() -> None:
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # library prints must not corrupt the protocol
    sys.stdout = sys.stderr

    def reply(obj: dict) -> None:
        protocol.write(json.dumps(obj, default=str) + "\n")
        protocol.flush()

    import suite.tower.model  # noqa: F401 - torch and timm, imported once by the zygote every block forks from

    serve(_lines(sys.stdin), reply)


def _lines(stream):
    """Lines of `stream` read one at a time (no read-ahead: a forked child must see every request after its fork)."""
    while True:
        line = stream.readline()
        if not line:
            return
        yield line


if __name__ == "__main__":
    main()
