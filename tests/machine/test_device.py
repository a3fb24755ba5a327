"""Device resolution, precision table and strict fp32: one home, one exception type."""
from __future__ import annotations

import pytest
import torch

from suite.core.errors import SuiteError, UnsupportedConfig
from suite.machine.device import autocast_dtype, cuda_in_use, resolve_device, strict_fp32


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SuiteError, match="device='tpu'"):
        resolve_device("tpu")
    with pytest.raises(SuiteError, match="did you mean 'cpu'"):
        resolve_device("cpi")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cuda_without_cuda_is_unsupported_everywhere():
    with pytest.raises(UnsupportedConfig, match="device='cuda'"):
        resolve_device("cuda")


def test_autocast_dtypes():
    assert autocast_dtype("fp32", "cpu") is None
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert autocast_dtype("fp16", "cpu") is torch.float16
    with pytest.raises(SuiteError, match="did you mean 'bf16'"):
        autocast_dtype("bf61", "cpu")


def test_cuda_in_use_never_initializes_cuda():
    assert cuda_in_use() == torch.cuda.is_initialized()
    if not torch.cuda.is_available():
        assert not torch.cuda.is_initialized()


def _tf32_state():
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    return matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _set_tf32_state(state) -> None:
    """Put back what `_tf32_state` returned, through the same API."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = state
    else:
        matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = state


def test_fp32_on_cuda_turns_tf32_off_and_restores_it():
    """cuDNN allows TF32 by default; "fp32" trials must not silently run at TF32 (either flag API)."""
    before = _tf32_state()
    try:
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            torch.backends.cudnn.conv.fp32_precision = "tf32"
            with strict_fp32("cuda", "fp32"):
                assert _tf32_state() == ("ieee", "ieee")
            assert _tf32_state() == ("tf32", "tf32")
        else:
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
            with strict_fp32("cuda", "fp32"):
                assert _tf32_state() == (False, False)
            assert _tf32_state() == (True, True)
        with strict_fp32("cuda", "bf16"):
            assert _tf32_state()[1] in (True, "tf32")  # autocast precisions are left alone
        with strict_fp32("cpu", "fp32"):
            assert _tf32_state()[1] in (True, "tf32")  # nothing to do on CPU
    finally:
        _set_tf32_state(before)
    assert _tf32_state() == before


def test_tf32_allowed_switches_both_ways_and_restores():
    """The one TF32 switch (strict_fp32 turns TF32 off with it, the GPU check's comparison on)."""
    from suite.machine.device import tf32_allowed, tf32_enabled

    before = _tf32_state()
    try:
        with tf32_allowed(True):
            assert tf32_enabled() is True
            with tf32_allowed(False):
                assert tf32_enabled() is False
            assert tf32_enabled() is True
    finally:
        _set_tf32_state(before)
    assert _tf32_state() == before


def test_tf32_enabled_reads_after_a_legacy_flag_and_strict_fp32():
    """Found on an H200 (torch 2.11): a user sets the legacy flag, strict_fp32 uses the new API, and
    reading the legacy flag then raises. tf32_enabled must answer from the API that decides."""
    from suite.machine.device import tf32_enabled

    matmul = torch.backends.cuda.matmul
    before = _tf32_state()
    try:
        matmul.allow_tf32 = True
        assert tf32_enabled() is True
        with strict_fp32("cuda", "fp32"):
            assert tf32_enabled() is False
        assert tf32_enabled() is True
        assert matmul.allow_tf32 is True  # the user's legacy setting is back and readable
    finally:
        _set_tf32_state(before)
