"""`suite profile` writes a trace that torch-tb-profiler's own parser reads."""
from __future__ import annotations

from suite.core.options import Trial


def test_trace_is_readable_by_the_tensorboard_plugin(tmp_path):
    import pytest

    from suite.measurement.profile import profile_trial

    trial = Trial(model="test_vit", image_size=160, embed_dim=32, batch_size=2, device="cpu")
    table = profile_trial(trial, tmp_path, steps=2, phase="train")
    assert table.startswith("**Top operators by self CPU time**")
    assert "| `aten::" in table  # real operators, not an empty table
    traces = list(tmp_path.glob("*.pt.trace.json"))
    assert len(traces) == 1
    # Writing the trace needs only torch; reading it back needs the plugin (not on every machine).
    pytest.importorskip("torch_tb_profiler")
    from torch_tb_profiler.profiler.data import RunProfileData
    from torch_tb_profiler.profiler.run_generator import RunGenerator

    worker = traces[0].name.split(".")[0]
    data = RunProfileData.parse(worker, None, str(traces[0]), str(tmp_path / "cache"))
    profile = RunGenerator(worker, None, data).generate_run_profile()
    assert profile.views, "the plugin found no views in the trace"
    op_names = {row["name"] for row in profile.operation_table_by_name["data"]}
    assert any(name.startswith("aten::") for name in op_names)
    assert any("addmm" in name or "linear" in name for name in op_names)  # the ViT's matmuls were traced


def test_bad_arguments_are_input_errors(tmp_path):
    import pytest

    from suite.core.errors import SuiteError
    from suite.measurement.profile import profile_trial

    trial = Trial(model="test_vit", device="cpu")
    with pytest.raises(SuiteError, match="phase"):
        profile_trial(trial, tmp_path, phase="both")
    with pytest.raises(SuiteError, match="steps: 0"):
        profile_trial(trial, tmp_path, steps=0)


def test_operator_table_counts_operators_only():
    """As on the first H200 run: the step range, the optimizer's annotation and the kernels
    themselves came in the key averages next to the operators and took the table over."""
    from types import SimpleNamespace

    from suite.measurement.profile import operator_table

    def event(key, self_us, device_type="DeviceType.CPU", annotation=False):
        return SimpleNamespace(key=key, count=3, self_device_time_total=self_us, device_time_total=self_us,
                               device_type=device_type, is_user_annotation=annotation)

    kernel = "void at::native::batch_norm_backward_kernel<" + "c10::BFloat16, " * 200 + ">"
    table = operator_table([event("ProfilerStep*", 83_000, annotation=True),
                            event("Optimizer.step#AdamW.step", 10_000, annotation=True),
                            event("aten::convolution_backward", 6_000), event("aten::addmm", 2_000),
                            event(kernel, 5_000, device_type="DeviceType.CUDA")],
                           device_time=True, top=10, title="t")
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == ["aten::convolution_backward", "aten::addmm"]
    assert "| 75.0% |" in rows[0] and "| 25.0% |" in rows[1]  # shares of the operators' time
    assert all(len(line) < 200 for line in table.splitlines())
