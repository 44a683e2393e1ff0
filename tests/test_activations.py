"""The tanh GELU's split form (activations.py): the fused op's values, taken only where the
calibration measured that it pays, by every rank alike, and recorded in the kernel plan."""
import pytest
import torch
import torch.nn.functional as F

from starcoder_tp import activations, kernels
from starcoder_tp.activations import TANH_GELU, calibrate, split_from, tanh_gelu_split
from starcoder_tp.comm import TPGroup
from starcoder_tp.device import Device
from starcoder_tp.model import load_model
from starcoder_tp.shard import shard_checkpoint
from starcoder_tp.timing import timed_generate


@pytest.fixture
def gelu_state(monkeypatch):
    """TANH_GELU as a fresh process has it, and the attention's forms uncalibrated (a model loaded
    by an earlier test calibrates them, and the plan's line names them); restored afterwards."""
    from starcoder_tp.attention import PREFILL_FORM
    from starcoder_tp.decode_attention import DECODE_FORM

    monkeypatch.setattr(TANH_GELU, "split_from", None)
    monkeypatch.setattr(TANH_GELU, "calibrated", "")
    monkeypatch.setattr(PREFILL_FORM, "blocks_at", frozenset())
    monkeypatch.setattr(PREFILL_FORM, "rows", PREFILL_FORM.rows)
    monkeypatch.setattr(PREFILL_FORM, "batched_rows", PREFILL_FORM.batched_rows)
    monkeypatch.setattr(PREFILL_FORM, "calibrated", "")
    monkeypatch.setattr(PREFILL_FORM, "softmax", PREFILL_FORM.softmax)
    monkeypatch.setattr(DECODE_FORM, "calibrated", "")
    return TANH_GELU


@pytest.mark.parametrize("shape", [(7,), (3, 4096), (513, 1000)])  # blocks that do not divide the size
@pytest.mark.parametrize("threads", [1, 2])
def test_split_form_gives_the_fused_values(shape, threads, monkeypatch):
    monkeypatch.setattr(activations, "BLOCK_PER_THREAD", 1 << 10)  # several blocks even at small sizes
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        x = torch.randn(*shape) * 4
        x.view(-1)[:4] = torch.tensor([0.0, -30.0, 30.0, -3.5])  # saturated tanh, both ways
        split, fused = tanh_gelu_split(x), F.gelu(x, approximate="tanh")
    finally:
        torch.set_num_threads(before)
    exact = F.gelu(x.double(), approximate="tanh")
    assert split.shape == x.shape and split.dtype == torch.float32
    # The same formula: within fp32 rounding of the exact value, as the fused op is.
    torch.testing.assert_close(split.double(), exact, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(split, fused, rtol=2e-6, atol=2e-6)


def test_the_split_form_runs_only_where_calibrated_and_fp32_eager(gelu_state):
    x = torch.randn(4, 1024)  # 4096 elements
    assert torch.equal(gelu_state(x), F.gelu(x, approximate="tanh")), "uncalibrated: the fused op"
    gelu_state.split_from = 4096
    assert torch.equal(gelu_state(x), tanh_gelu_split(x))
    assert not torch.equal(tanh_gelu_split(x), F.gelu(x, approximate="tanh")), "the forms must be told apart"
    small = x[:3].contiguous()  # 3072 elements: below the size
    assert torch.equal(gelu_state(small), F.gelu(small, approximate="tanh"))
    half = x.bfloat16()
    assert torch.equal(gelu_state(half), F.gelu(half, approximate="tanh")), "bf16 keeps the fused op"
    strided = torch.randn(1024, 8).t()
    assert torch.equal(gelu_state(strided), F.gelu(strided, approximate="tanh"))
    tracked = x.clone().requires_grad_()
    assert gelu_state(tracked).requires_grad, "autograd keeps the fused op (the split one writes in place)"


@pytest.mark.parametrize("small, large, expected", [
    ({"fused": 0.010, "split": 0.020}, {"fused": 0.80, "split": 0.85}, None),  # slower at the large size
    ({"fused": 0.010, "split": 0.020}, {"fused": 0.80, "split": 0.80}, None),  # a tie is not a gain
    # fused 0.002 + 1.5e-6 n, split 0.015 + 1.1e-6 n: crossover 32500 elements
    ({"fused": 0.002 + 1.5e-6 * 4096, "split": 0.015 + 1.1e-6 * 4096},
     {"fused": 0.002 + 1.5e-6 * 2 ** 19, "split": 0.015 + 1.1e-6 * 2 ** 19}, 32768),
    ({"fused": 0.020, "split": 0.010}, {"fused": 0.80, "split": 0.50}, 1),  # faster everywhere
    ({"fused": 0.020, "split": 0.010}, {"fused": 0.50, "split": 0.49}, 1),  # faster by its fixed cost
])
def test_split_from_timings(small, large, expected):
    assert split_from(small, large, (4096, 2 ** 19)) == expected


def test_split_from_refuses_sizes_out_of_order():
    with pytest.raises(ValueError, match=r"\(4096, 4096\)"):
        split_from({"fused": 1, "split": 1}, {"fused": 1, "split": 1}, (4096, 4096))


def test_calibrate_takes_the_slowest_ranks_timings_once(gelu_state):
    seen = []

    def slowest(local: torch.Tensor) -> torch.Tensor:
        # Another rank on which the split form lost: its timings are the ones all ranks take.
        seen.append(local.clone())
        return torch.tensor([0.01, 0.02, 0.80, 0.90], dtype=torch.float64)

    assert calibrate(slowest).startswith("tanh gelu fused")
    assert len(seen) == 1 and seen[0].shape == (4,) and bool((seen[0] > 0).all()), "this rank's own timings"
    assert gelu_state.split_from is None
    assert calibrate(slowest) == gelu_state.calibrated and len(seen) == 1, "measured once per process"
    assert kernels.describe({}) == "gelu:tanh fused"


def test_the_plan_names_and_is_keyed_on_the_form(gelu_state):
    calibrate(lambda local: torch.tensor([0.002, 0.010, 0.80, 0.50], dtype=torch.float64))
    assert gelu_state.split_from == 2 ** 15  # crossover ~29.6 thousand elements
    key = kernels.plan_key({"8x8:float32": torch.ones(8, 8)}, 1, 1)
    assert key["tanh_gelu"] == "split"
    plan = {"8x8:float32": kernels.Choice("plain", "plain")}
    assert kernels.describe(plan) == "8x8:float32 plain/plain/plain; gelu:tanh split>=32768"


def test_a_model_generates_the_same_tokens_with_either_form(tmp_path, embedded_dir, prompts, gelu_state):
    shard_checkpoint(embedded_dir, tmp_path / "s", 1)
    model = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="plain")
    assert model.config.activation_function == "gelu_pytorch_tanh"
    fused = timed_generate(model, Device("cpu"), prompts, 16, topk=5)
    gelu_state.split_from = 1  # every call of the MLP's activation split
    calls = []
    real = activations.tanh_gelu_split
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(activations, "tanh_gelu_split", lambda x: calls.append(x.shape) or real(x))
        split = timed_generate(model, Device("cpu"), prompts, 16, topk=5)
    assert len(calls) >= model.config.n_layer * 16, "every layer's activation, every step"
    assert torch.equal(fused.output_ids, split.output_ids)
    torch.testing.assert_close(fused.topk_logprobs, split.topk_logprobs, rtol=1e-4, atol=1e-4)


def test_every_kernel_mode_calibrates_the_form_and_a_plan_is_keyed_on_it(tmp_path, embedded_dir, gelu_state,
                                                                         monkeypatch):
    """use_kernels on an fp32 tanh-GELU model: the form is measured in a fixed mode too (it is
    not a linear's kernel), and under `auto` before the plan's key, which names it."""
    from starcoder_tp.attention import PREFILL_FORM
    monkeypatch.setattr(PREFILL_FORM, "calibrated", PREFILL_FORM.calibrated)  # (measured here too: restored)
    for name in ("blocks_at", "rows", "batched_rows", "softmax"):
        monkeypatch.setattr(PREFILL_FORM, name, getattr(PREFILL_FORM, name))
    shard_checkpoint(embedded_dir, tmp_path / "s", 1)
    model = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="plain")
    model.use_kernels("onednn", 1)
    assert gelu_state.calibrated, "a fixed mode measures the form too"
    form = "fused" if gelu_state.split_from is None else f"split>={gelu_state.split_from}"
    assert f"; gelu:tanh {form}" in model.kernels_summary()
    monkeypatch.setattr(gelu_state, "calibrated", "")
    keys = []
    real_key = kernels.plan_key
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "plan_key",
                      lambda *a, **k: keys.append((bool(gelu_state.calibrated), real_key(*a, **k))) or keys[-1][1])
        model.use_kernels("auto", 1)
    assert keys and keys[0][0], "measured before the plan's key"
    assert keys[0][1]["tanh_gelu"] == ("fused" if gelu_state.split_from is None else "split")
