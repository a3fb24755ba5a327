"""`suite profile` writes a trace that torch-tb-profiler's own parser reads."""
from __future__ import annotations

from suite.options import Trial


def test_trace_is_readable_by_the_tensorboard_plugin(tmp_path):
    import pytest

    from suite.profile import profile_trial

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

    from suite.errors import SuiteError
    from suite.profile import profile_trial

    trial = Trial(model="test_vit", device="cpu")
    with pytest.raises(SuiteError, match="phase"):
        profile_trial(trial, tmp_path, phase="both")
    with pytest.raises(SuiteError, match="steps: 0"):
        profile_trial(trial, tmp_path, steps=0)
