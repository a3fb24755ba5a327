"""The measurement engine on CPU with timm's tiny test models (and on CUDA behind the gpu marker)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import suite.measurement.engine as m
from suite.core.errors import UnsupportedConfig
from suite.core.options import Trial
from suite.measurement.engine import measure
from suite.measurement.steps import infer_step_fn, make_inputs, train_step_fn
from suite.tower.model import build_tower

# Tiny and quick: the numbers are meaningless, the plumbing is what is checked. The device is
# pinned: on a GPU machine `auto` would pick CUDA and these tests are about the CPU path.
QUICK = dict(image_size=64, batch_size=4, warmup=1, iters=2, embed_dim=32, device="cpu")


def trial(**kwargs) -> Trial:
    return Trial(**{"model": "test_resnet", **QUICK, **kwargs})


def tower_of(t: Trial, seed: int = 0):
    torch.manual_seed(seed)
    return build_tower(t)


@pytest.fixture(scope="module")
def roofline(tmp_path_factory, _one_torch_thread):
    """One device-peak cache for the module: the peak is measured once, not once per test."""
    return tmp_path_factory.mktemp("roofline")


@pytest.fixture(scope="module")
def resnet_both(roofline):
    return measure(trial(mode="both"), cache_dir=roofline)




# --- the record ------------------------------------------------------------------------------

def test_record_fields_are_present_and_sane(resnet_both):
    r = resnet_both
    for phase in ("infer", "train"):
        for name in ("samples_per_sec", "step_time", "gmacs", "gflops", "tflops", "mfu", "peak_mem_mib"):
            value = getattr(r, f"{phase}_{name}")
            assert value is not None and value > 0, f"{phase}_{name}={value}"
        assert getattr(r, f"{phase}_warmup_steps") >= 1
        assert getattr(r, f"{phase}_timed_steps") == QUICK["iters"] * getattr(r, f"{phase}_timed_rounds")
        assert getattr(r, f"{phase}_batch_size") == 4
        assert getattr(r, f"{phase}_img_size") == 64
        assert isinstance(getattr(r, f"{phase}_noisy"), bool)
        assert getattr(r, f"{phase}_gflops") == pytest.approx(2 * getattr(r, f"{phase}_gmacs"))
        # samples/s and step time describe the same median
        assert getattr(r, f"{phase}_samples_per_sec") == pytest.approx(4 / (getattr(r, f"{phase}_step_time") / 1e3))
    assert 0 < r.trainable_param_count <= r.param_count
    assert r.layer_groups and r.layer_groups > 0
    assert r.feature_shape and "x" in r.feature_shape
    assert r.grad_checkpointing_active is False
    assert r.train_gmacs == pytest.approx(3 * r.infer_gmacs, rel=0.1)  # forward + backward
    assert r.train_peak_mem_mib > r.infer_peak_mem_mib  # grads, optimizer state, saved activations
    assert r.device_peak_tflops > 0 and r.mem_method.startswith("live tensors")
    assert r.measured_time_s > 0 and r.compile_time_s is None
    assert r.infer_peak_reserved_mib is None  # CUDA only
    assert r.train_skipped_steps == 0  # fp32: the optimizer stepped every time
    # peak memory holds the weights: at least their size, in both phases
    weights_mib = r.param_count * 1e6 * 4 / 2**20
    assert r.infer_peak_mem_mib > weights_mib and r.train_peak_mem_mib > 3 * weights_mib  # + grads, 2 Adam moments


def test_mode_leaves_the_other_phase_empty(roofline):
    r = measure(trial(mode="infer", iters=1, warmup=0), cache_dir=roofline)
    assert r.infer_samples_per_sec > 0 and r.infer_timed_steps == r.infer_timed_rounds  # one step a round
    assert all(v is None for k, v in dataclasses.asdict(r).items() if k.startswith("train_"))


def test_min_time_s_lengthens_the_rounds_of_a_fast_step(roofline):
    r = measure(trial(mode="infer", iters=2, min_time_s=0.2), cache_dir=roofline)
    per_round = r.infer_timed_steps / r.infer_timed_rounds
    assert per_round > 2 and per_round * r.infer_step_time >= 0.2e3 * 0.5  # sized from the warm-up's steps


def test_a_callers_tower_is_given_back_as_it_came(roofline):
    """The train steps change weights and norm statistics; a later figure must not depend on them."""
    t = trial(mode="both")
    tower = tower_of(t).eval()
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    measure(t, tower=tower, cache_dir=roofline)
    after = tower.state_dict()
    assert not tower.training and all(torch.equal(before[k], after[k]) for k in before)
    # ... which is a real restore: one train step on the same tower (same seed) changes its state.
    train_step_fn(tower, t, "cpu")(make_inputs(t, "cpu", t.batch_size))
    assert any(not torch.equal(before[k], v) for k, v in tower.state_dict().items())


def test_flops_are_counted_once_per_tower_configuration(resnet_both, roofline, monkeypatch):
    import suite.measurement.flops

    monkeypatch.setattr(suite.measurement.flops, "count_flops", lambda *a, **k: pytest.fail("FLOPs counted again"))
    r = measure(trial(mode="both", batch_size=2, iters=1, warmup=0), cache_dir=roofline)
    assert (r.infer_gmacs, r.train_gmacs) == (resnet_both.infer_gmacs, resnet_both.train_gmacs)
    assert r.infer_batch_size == 2


def test_roofline_is_cached(roofline, resnet_both):
    from suite.measurement.roofline import device_peak_tflops, forget_peaks

    files = list(roofline.glob("peak-*.json"))
    assert len(files) == 1 and '"precision": "fp32"' in files[0].read_text()
    forget_peaks()  # as in a new process: read from disk, not measured again
    assert device_peak_tflops("cpu", "fp32", cache_dir=roofline) == resnet_both.device_peak_tflops


# --- what the tower's options change ---------------------------------------------------------

def test_lock_lowers_trainable_params_and_training_flops(roofline):
    results = [measure(trial(mode="train", iters=1, warmup=0, unlocked_groups=lock), cache_dir=roofline)
               for lock in (None, 1, 0)]
    trainable = [r.trainable_param_count for r in results]
    train_gmacs = [r.train_gmacs for r in results]
    assert trainable[0] > trainable[1] > trainable[2] > 0  # the head always trains
    assert train_gmacs[0] > train_gmacs[1] > train_gmacs[2]
    assert len({r.param_count for r in results}) == 1


def test_grad_checkpointing_changes_nothing_numerically():
    from suite.measurement.flops import count_flops

    plain_trial, ckpt_trial = trial(model="test_vit"), trial(model="test_vit", grad_checkpointing=True)
    plain, ckpt = tower_of(plain_trial), tower_of(ckpt_trial)
    assert ckpt.grad_checkpointing and not plain.grad_checkpointing
    x = make_inputs(plain_trial, "cpu", 4)
    torch.testing.assert_close(infer_step_fn(plain, plain_trial, "cpu")(x), infer_step_fn(ckpt, ckpt_trial, "cpu")(x))
    step_plain, step_ckpt = train_step_fn(plain, plain_trial, "cpu"), train_step_fn(ckpt, ckpt_trial, "cpu")
    for _ in range(2):  # the second loss is after an optimizer step: equal only if the gradients were
        torch.testing.assert_close(step_plain(x), step_ckpt(x))
    # Model FLOPs: the recomputed forward is not counted (it shows as lower throughput instead).
    assert count_flops(ckpt, x, train=True) == count_flops(plain, x, train=True)
    assert ckpt.grad_checkpointing  # and counting left it on


# --- how it is measured: precision, memory format --------------------------------------------

def _record_inputs(tower) -> list[torch.Tensor]:
    """Capture what the first convolution of the trunk receives and computes with."""
    seen: list = []
    conv = next(mod for mod in tower.trunk.modules() if isinstance(mod, torch.nn.Conv2d))
    conv.register_forward_hook(lambda mod, args, out: seen.append((args[0], mod.weight, out)))
    return seen


@pytest.mark.parametrize(
    "precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_precision_is_applied_in_both_steps(precision, dtype):
    t = trial(precision=precision)
    tower = tower_of(t)
    seen = _record_inputs(tower)
    x = make_inputs(t, "cpu", 4)
    out = infer_step_fn(tower, t, "cpu")(x)
    assert out.dtype == dtype  # the linear projection ran under autocast
    loss = train_step_fn(tower, t, "cpu")(x)
    assert torch.isfinite(loss)
    assert [o.dtype for _, _, o in seen] == [dtype, dtype]


def test_precision_that_cannot_take_effect_is_unsupported(monkeypatch, roofline):
    from contextlib import nullcontext

    monkeypatch.setattr(m, "_FLOP_CACHE", {})  # the check runs with the FLOP count
    monkeypatch.setattr(m, "autocast", lambda device, dtype: nullcontext())  # autocast silently off
    with pytest.raises(UnsupportedConfig, match="precision='bf16' did not take effect"):
        measure(trial(precision="bf16", mode="infer", iters=1, warmup=0), cache_dir=roofline)


def test_channels_last_is_applied():
    t = trial(channels_last=True)
    tower = tower_of(t)
    seen = _record_inputs(tower)
    x = make_inputs(t, "cpu", 4)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    infer_step_fn(tower, t, "cpu")(x)
    train_step_fn(tower, t, "cpu")(x)
    for inp, weight, _ in seen:
        assert inp.is_contiguous(memory_format=torch.channels_last)
        assert weight.is_contiguous(memory_format=torch.channels_last)


def test_inputs_are_fresh_random_images():
    t = trial()
    a, b = make_inputs(t, "cpu", 3), make_inputs(t, "cpu", 3)
    assert a.shape == (3, 3, 64, 64) and a.dtype == torch.float32
    assert a.std() > 0.5 and not torch.equal(a, b)


def test_nothing_to_train_is_unsupported():
    t = trial(mode="train")
    tower = tower_of(t)
    tower.requires_grad_(False)
    with pytest.raises(UnsupportedConfig, match="no trainable parameters"):
        train_step_fn(tower, t, "cpu")


# --- out of memory ---------------------------------------------------------------------------

# What torch's CPU allocator raises: a plain RuntimeError, not torch.OutOfMemoryError.
CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
           "you tried to allocate 1125899906842624 bytes. Error code 12 (Cannot allocate memory)")


def _oom_above(monkeypatch, tower, limit: int, error=None):
    """Make `tower` fail like an allocator would for batches above `limit`."""
    forward = tower.forward

    def failing(x):
        if x.shape[0] > limit:
            if error is not None:
                raise error
            raise torch.OutOfMemoryError(f"simulated: batch {x.shape[0]} > {limit}")
        return forward(x)

    monkeypatch.setattr(tower, "forward", failing)


def test_oom_with_auto_batch_size_backs_off_and_records_the_batch(monkeypatch, roofline):
    t = trial(batch_size=16, auto_batch_size=True, iters=1, warmup=0)
    tower = tower_of(t)
    _oom_above(monkeypatch, tower, 5)
    r = measure(t, tower=tower, cache_dir=roofline)
    assert r.infer_batch_size == 4 and r.train_batch_size == 4  # 16 -> 8 -> 4
    assert r.infer_samples_per_sec == pytest.approx(4 / (r.infer_step_time / 1e3))


def test_oom_without_auto_batch_size_raises(monkeypatch, roofline):
    from suite.sweep.trial import classify

    t = trial(batch_size=16, iters=1, warmup=0)
    tower = tower_of(t)
    _oom_above(monkeypatch, tower, 5)
    with pytest.raises(torch.OutOfMemoryError) as info:
        measure(t, tower=tower, cache_dir=roofline)
    assert classify(info.value)[0] == "oom"  # what the sweep records


def test_cpu_allocator_failure_is_an_oom_and_backs_off(monkeypatch, roofline):
    from suite.sweep.trial import classify

    t = trial(batch_size=16, auto_batch_size=True, iters=1, warmup=0)
    tower = tower_of(t)
    _oom_above(monkeypatch, tower, 5, error=RuntimeError(CPU_OOM))
    r = measure(t, tower=tower, cache_dir=roofline)
    assert r.infer_batch_size == 4 and r.train_batch_size == 4
    assert classify(RuntimeError(CPU_OOM))[0] == "oom"
    assert classify(MemoryError())[0] == "oom"
    assert classify(RuntimeError("boom"))[0] == "error"


def test_other_errors_do_not_back_off(monkeypatch, roofline):
    t = trial(batch_size=16, auto_batch_size=True, iters=1, warmup=0)
    tower = tower_of(t)
    _oom_above(monkeypatch, tower, 5, error=RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        measure(t, tower=tower, cache_dir=roofline)


# --- devices and compile ---------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_path(roofline):
    r = measure(trial(device="cuda", precision="bf16", channels_last=True, iters=5), cache_dir=roofline)
    assert r.infer_samples_per_sec > 0 and r.train_samples_per_sec > 0
    assert r.mem_method.startswith("live tensors: cuda")
    assert r.train_peak_mem_mib > r.infer_peak_mem_mib > 0
    assert r.train_peak_reserved_mib >= r.train_peak_mem_mib
    assert 0 < r.infer_mfu < 1.5 and r.device_peak_tflops > 1


def test_unused_trial_options_are_checked_before_work(roofline):
    with pytest.raises(ValueError, match="batch_size=0"):
        measure(trial(batch_size=0), cache_dir=roofline)
    with pytest.raises(ValueError, match="mode='fast'"):
        measure(trial(mode="fast"), cache_dir=roofline)


def test_cpu_trial_creates_no_cuda_context(roofline):
    measure(trial(mode="infer", iters=1), cache_dir=roofline)
    assert not torch.cuda.is_initialized()


# --- memory: breakdown, capacity line, settings checks (issue 11) ------------------------------

def test_memory_breakdown_capacity_and_checks_are_recorded(resnet_both):
    import math

    r = resnet_both
    phases = {"infer": ("weights", "activations"), "train": ("weights", "grads", "optimizer", "activations")}
    for phase, parts in phases.items():
        peak = getattr(r, f"{phase}_peak_mem_mib")
        assert sum(getattr(r, f"{phase}_{p}_mib") for p in parts) == pytest.approx(peak, rel=1e-9)  # CPU: one count
        fixed, per_sample = getattr(r, f"{phase}_fixed_mem_mib"), getattr(r, f"{phase}_mem_per_sample_mib")
        assert fixed > 0 and per_sample > 0
        assert fixed + 4 * per_sample == pytest.approx(peak)  # the line goes through the measured point
        assert getattr(r, f"{phase}_max_batch") == math.floor((r.capacity_budget_mib - fixed) / per_sample)
        assert getattr(r, f"{phase}_max_batch_measured") is None  # max_batch: false
    assert r.train_weights_mib == r.infer_weights_mib == pytest.approx(r.param_count * 1e6 * 4 / 2**20, rel=0.01)
    assert r.train_optimizer_mib >= 2 * r.trainable_param_count * 1e6 * 4 / 2**20 * 0.999  # AdamW's two moments
    assert r.capacity_budget_mib > 100  # the machine's RAM (no mem_budget_mib given)
    assert (r.lock_ok, r.train_state_ok, r.check_reason) == (True, True, "")


def test_capacity_line_predicts_the_peak_of_a_larger_batch(roofline):
    small = measure(trial(mode="train", iters=1, warmup=0, batch_size=4), cache_dir=roofline)
    large = measure(trial(mode="train", iters=1, warmup=0, batch_size=12), cache_dir=roofline)
    predicted = small.train_fixed_mem_mib + 12 * small.train_mem_per_sample_mib
    assert predicted == pytest.approx(large.train_peak_mem_mib, rel=0.1)


def test_max_batch_search_on_cpu_finds_the_largest_batch_under_the_budget(roofline):
    from suite.measurement.footprint import memory_pass
    from suite.measurement.memory import MemoryBaseline

    t = trial(mode="train", iters=1, warmup=0, max_batch=True, mem_budget_mib=30.0)
    r = measure(t, cache_dir=roofline)
    found = r.train_max_batch_measured
    assert r.capacity_budget_mib == 30.0 and found > 4
    assert r.train_max_batch_error == pytest.approx(r.train_max_batch / found - 1)
    assert abs(r.train_max_batch_error) < 0.1
    tower = tower_of(t)
    peaks = [memory_pass("train", tower, t, "cpu", make_inputs(t, "cpu", b), MemoryBaseline("cpu"))[0].peak_mib
             for b in (found, found + 1)]
    assert peaks[0] <= 30.0 < peaks[1]


def test_grad_checkpointing_lowers_train_activations(roofline):
    # The smoke sweep's size (96 px, batch 8): smaller, the peak moves into the optimizer step, where
    # activations are gone and checkpointing cannot show.
    off, on = (measure(trial(model="test_vit", mode="train", iters=1, warmup=0, grad_checkpointing=ckpt,
                             image_size=96, batch_size=8), cache_dir=roofline) for ckpt in (False, True))
    assert on.grad_checkpointing_active and on.train_activations_mib < 0.8 * off.train_activations_mib
    assert on.train_weights_mib == off.train_weights_mib


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_breakdown_adds_up_and_max_batch_search_runs(roofline):
    """Untested here (no GPU in CI): the parts come from the dispatch mode, the total from the allocator."""
    r = measure(trial(model="test_vit", device="cuda", mode="train", iters=2, max_batch=True, mem_budget_mib=1024.0),
                cache_dir=roofline)
    parts = r.train_weights_mib + r.train_grads_mib + r.train_optimizer_mib + r.train_activations_mib
    assert parts == pytest.approx(r.train_peak_mem_mib, rel=0.05)
    assert r.train_max_batch_measured > 4 and abs(r.train_max_batch_error) < 0.25
