"""Result records: frozen dataclasses with units in the field names.

Field names that timm's `benchmark.py` also reports keep timm's names (`infer_samples_per_sec`,
`infer_step_time` (ms), `infer_batch_size`, `infer_img_size`, `param_count` (millions),
`infer_gmacs` (per image), and the `train_` twins), so rows line up with timm's published CSVs.

This module must stay light: no torch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

STATUSES = ("ok", "skipped", "oom", "error", "crashed", "timeout")


@dataclass(frozen=True)
class MeasureResult:
    """What `suite.measurement.engine.measure(trial)` returns. A phase not measured leaves its fields None."""

    # model
    param_count: float | None = None  # millions, total
    trainable_param_count: float | None = None  # millions, after lock
    layer_groups: int | None = None
    feature_shape: str | None = None  # trunk output before the head, e.g. "96x7x7" or "197x192"
    grad_checkpointing_active: bool | None = None
    weights_note: str | None = None  # what loading the weights changed, e.g. "pos_embed resampled from 10x10 to 6x6"
    # inference
    infer_samples_per_sec: float | None = None
    infer_step_time: float | None = None  # ms, median
    infer_step_time_iqr: float | None = None  # ms
    infer_batch_size: int | None = None
    infer_img_size: int | None = None
    infer_gmacs: float | None = None  # per image; MACs = FLOPs / 2
    infer_gflops: float | None = None  # per image
    infer_tflops: float | None = None  # achieved, TFLOP/s
    infer_mfu: float | None = None  # achieved / device peak, 0..1
    infer_peak_mem_mib: float | None = None
    infer_peak_reserved_mib: float | None = None  # CUDA only
    infer_noisy: bool | None = None
    infer_rss_growth_mib: float | None = None  # CPU: resident-set growth of the memory pass (secondary)
    infer_warmup_steps: int | None = None  # warm-up steps run: at least `warmup`, until the step time was steady
    infer_warmup_steady: bool | None = None  # False: warm-up hit its time limit before the step time settled
    infer_timed_rounds: int | None = None  # timed rounds run (at least 2; more while they disagreed)
    infer_timed_steps: int | None = None  # timed steps in all rounds (`iters` per round, more under `min_time_s`)
    infer_timing_steady: bool | None = None  # False: no two timed rounds agreed within 5% (also flagged noisy)
    # training
    train_samples_per_sec: float | None = None
    train_step_time: float | None = None
    train_step_time_iqr: float | None = None
    train_batch_size: int | None = None
    train_img_size: int | None = None
    train_gmacs: float | None = None  # per image, forward + backward (+ optimizer: no matmuls)
    train_gflops: float | None = None
    train_tflops: float | None = None
    train_mfu: float | None = None
    train_peak_mem_mib: float | None = None
    train_peak_reserved_mib: float | None = None
    train_noisy: bool | None = None
    train_rss_growth_mib: float | None = None  # CPU: resident-set growth of the memory pass (secondary)
    train_warmup_steps: int | None = None  # warm-up steps run: at least `warmup`, until the step time was steady
    train_warmup_steady: bool | None = None  # False: warm-up hit its time limit before the step time settled
    train_timed_rounds: int | None = None  # timed rounds run (at least 2; more while they disagreed)
    train_timed_steps: int | None = None  # timed steps in all rounds (`iters` per round, more under `min_time_s`)
    train_timing_steady: bool | None = None  # False: no two timed rounds agreed within 5% (also flagged noisy)
    train_skipped_steps: int | None = None  # optimizer steps the fp16 gradient scaler skipped while timing
    # how it was measured
    device_peak_tflops: float | None = None  # measured dense matmul peak at this precision
    mem_method: str | None = None  # how peak memory was measured (live tensors, own untimed pass)
    mfu_note: str | None = None  # why {phase}_mfu is empty: a figure that cannot be a utilisation is not shown
    compile_time_s: float | None = None  # excluded from timings
    compile_graphs: int | None = None  # graphs dynamo compiled for this trial (0 would mean eager: an error)
    compile_graph_breaks: int | None = None
    measured_time_s: float | None = None  # wall time of the timed + warm-up work, for overhead accounting
    # memory breakdown at the peak of the memory pass (issue 11), MiB; the parts add up to the phase's
    # peak_mem_mib (CPU: exactly; CUDA: to within what the allocator adds, see suite.measurement.memory).
    # activations = the rest: saved activations, the input batch, temporaries. None: not watched.
    infer_weights_mib: float | None = None
    infer_activations_mib: float | None = None
    train_weights_mib: float | None = None
    train_grads_mib: float | None = None
    train_optimizer_mib: float | None = None
    train_activations_mib: float | None = None
    # capacity: peak_mem_mib = fixed_mem_mib + mem_per_sample_mib * batch, from memory passes at two
    # batch sizes; max_batch = the largest batch predicted under capacity_budget_mib (suite.measurement.capacity)
    capacity_budget_mib: float | None = None  # mem_budget_mib, else the device's memory
    infer_fixed_mem_mib: float | None = None
    infer_mem_per_sample_mib: float | None = None
    infer_max_batch: int | None = None
    infer_max_batch_measured: int | None = None  # max_batch: true (GPU: real OOMs; CPU: live-tensor peak)
    infer_max_batch_error: float | None = None  # predicted / measured - 1
    train_fixed_mem_mib: float | None = None
    train_mem_per_sample_mib: float | None = None
    train_max_batch: int | None = None
    train_max_batch_measured: int | None = None
    train_max_batch_error: float | None = None
    # checks that the settings took effect (suite.measurement.footprint)
    lock_ok: bool | None = None  # trainable parameters = head + the last unlocked_groups groups
    train_state_ok: bool | None = None  # gradients and optimizer state only for trainable parameters
    check_reason: str | None = None  # why a check failed ("" when all passed)


@dataclass(frozen=True)
class ProbeResult:
    """What the linear probe returns."""

    probe_top1: float | None = None  # percent
    probe_top5: float | None = None  # percent; None with 5 classes or fewer
    probe_balanced_accuracy: float | None = None  # percent, mean per-class recall
    probe_C: float | None = None  # chosen on the validation split
    probe_val_top1: float | None = None  # percent, validation accuracy at the chosen C
    probe_solver: str | None = None  # which logistic-regression solver fitted it
    probe_knn_top1: float | None = None  # percent, cosine k=20
    probe_n_train: int | None = None
    probe_n_val: int | None = None
    probe_n_test: int | None = None
    probe_n_classes: int | None = None
    probe_extract_samples_per_sec: float | None = None
    probe_cache_hit: bool | None = None
    probe_skipped_images: int | None = None
    probe_time_s: float | None = None
    # uncertainty and what was probed (issue 13)
    probe_top1_lo: float | None = None  # percent, 95% Wilson interval of probe_top1
    probe_top1_hi: float | None = None
    probe_balanced_accuracy_lo: float | None = None  # percent, 95% interval (per-class normal approx.)
    probe_balanced_accuracy_hi: float | None = None
    probe_test_set: str | None = None  # hash of the test images and labels: paired tests need equal ones
    probe_test_correct: str | None = None  # hex bits, correct per test image in test order (suite.core.stats)
    probe_shots: dict | None = None  # few-shot: {"k": {"mean", "std", "min", "max", "top1": [per seed], "seeds"}}


@dataclass(frozen=True)
class Env:
    """Where a result was measured. Rows from different environments are never merged."""

    env_torch: str | None = None
    env_timm: str | None = None
    env_cuda: str | None = None
    env_cudnn: str | None = None
    env_device: str | None = None  # "cpu" or the GPU's name
    env_driver: str | None = None
    env_cpu: str | None = None
    env_threads: int | None = None
    env_allocator: str | None = None  # e.g. "glibc 2.36 steady (...)": another allocator is another environment
    env_python: str | None = None
    env_platform: str | None = None
    env_git_commit: str | None = None

    def key(self) -> str:
        """The store's key of an environment (its rows' primary key with trial_id, and what `--resume` matches):
        device, versions, allocator. Kept as it was so older stores resume; comparing two runs checks
        every field of `ENV_IDENTITY` instead (the thread count of a worker is not known to the driver
        that resumes, so it cannot be part of this key)."""
        return "|".join(str(x) for x in (self.env_device, self.env_torch, self.env_timm, self.env_cuda,
                                         self.env_allocator))


@dataclass(frozen=True)
class TrialRecord:
    """One row of the results store: the trial's configuration, its status and all its results."""

    trial: Any  # suite.core.options.Trial
    status: str
    reason: str = ""
    measure: MeasureResult = field(default_factory=MeasureResult)
    probe: ProbeResult = field(default_factory=ProbeResult)
    env: Env = field(default_factory=Env)
    started_at: float | None = None  # unix time
    finished_at: float | None = None

    def flat(self) -> dict[str, Any]:
        """One flat dict: trial_id, config fields, status, reason, result and env fields."""
        row = {"trial_id": self.trial.trial_id, "env_key": self.env.key()}
        row.update(dataclasses.asdict(self.trial))
        row.update(status=self.status, reason=self.reason, started_at=self.started_at, finished_at=self.finished_at)
        for part in (self.measure, self.probe, self.env):
            row.update(dataclasses.asdict(part))
        return row


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


# What changes a timing: two rows that differ in any of these were measured in different environments
# and are not compared (`suite.gate.compare`). A field a row does not record (an older store) is unknown, not different.
ENV_IDENTITY = ("env_device", "env_driver", "env_cuda", "env_cpu", "env_threads", "env_torch", "env_timm",
                "env_allocator")

RESULT_COLUMNS = field_names(MeasureResult) + field_names(ProbeResult)
ENV_COLUMNS = field_names(Env)
