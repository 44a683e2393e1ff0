"""argmax.py / argmax.c: the greedy pick's row maxima, the same values and indices as torch's max."""
import pytest
import torch

from starcoder_tp import argmax

needs_kernel = pytest.mark.skipif(not argmax.available(), reason="argmax.c is not built or this CPU lacks AVX-512")
DTYPES = [torch.float32, torch.bfloat16]


def check_same(logits: torch.Tensor) -> None:
    values, index = argmax.ours(logits)
    want_values, want_index = logits.max(dim=-1)
    assert torch.equal(index, want_index), f"indices: ours {index.tolist()}, torch {want_index.tolist()}"
    want = want_values.float()
    assert torch.equal(values.isnan(), want.isnan()) and torch.equal(values.nan_to_num(), want.nan_to_num()), \
        f"values: ours {values.tolist()}, torch {want_values.tolist()}"


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 15, 16, 17, 63, 100, 127, 1000, 49152])  # (63, 127: four vectors past the last step)
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_random_rows_match_torch_max(dtype, n, rows):
    check_same(torch.randn(rows, n, generator=torch.Generator().manual_seed(n + rows)).to(dtype))


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_go_to_the_first_index_within_and_across_lanes(dtype):
    logits = torch.randint(0, 3, (32, 1000), generator=torch.Generator().manual_seed(1)).to(dtype)  # many ties
    logits[0] = 1.0  # one value throughout
    logits[1, [999, 3, 500]] = 7.0  # the first in a later lane than the last
    logits[2, [16, 17, 31]] = 7.0  # lane 0 and 1 of the second vector, lane 15
    logits[3, [998, 999]] = 7.0  # in the masked tail only
    logits[4, [5, 21]] = float("inf")
    logits[5] = -0.0
    logits[5, 40] = 0.0  # -0 == 0: the first wins
    # argmax.c's chains take 16-value vectors in turn (4 a step): the first in a later chain's vector
    # of one step (20, in chain 1) against a later step's first chain (64); and in the last vectors
    # past the whole steps (960...999: chain 0 from 960, chain 1 from 976).
    logits[6, [64, 20]] = 7.0
    logits[7, [976, 975]] = 7.0
    check_same(logits)
    assert argmax.ours(logits)[1][:8].tolist() == [0, 3, 16, 998, 5, 0, 20, 975]


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_counts_as_the_largest_the_first_one_wins_and_all_minus_inf_gives_zero(dtype):
    logits = torch.randn(4, 300).to(dtype)
    logits[0, [250, 30]] = float("nan")
    logits[1, 299] = float("nan")
    logits[1, 0] = float("inf")
    logits[2] = float("-inf")
    check_same(logits)
    assert argmax.ours(logits)[1][:3].tolist() == [30, 299, 0]


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_of_a_wider_tensor_are_read_at_its_stride(dtype):
    wide = torch.randn(5, 64).to(dtype)
    view = wide[:, 8:40]  # a rank's vocabulary shard of gathered logits
    assert view.stride() == (64, 1)
    check_same(view)


def test_what_it_does_not_take_falls_back_or_is_refused_naming_it():
    for logits in (torch.randn(4, 8).half(), torch.randn(8, 4).t(), torch.randn(8), torch.randn(2, 0)):
        assert not argmax.supports(logits)
        with pytest.raises(ValueError, match=r"argmax\.ours: logits \[.*\] torch\.\w+ on cpu \(strides"):
            argmax.ours(logits)


def test_row_max_runs_ours_only_where_calibrated_so(monkeypatch):
    logits = torch.randn(3, 40)
    calls = []
    monkeypatch.setattr(argmax, "_run", lambda x: calls.append(x) or x.max(dim=-1))
    monkeypatch.setattr(argmax, "supports", lambda x: True)
    monkeypatch.setattr(argmax, "PICK_FORM", {})
    argmax.row_max(logits)
    assert not calls, "not calibrated at this shape: torch's max"
    argmax.PICK_FORM[(3, 40, torch.float32)] = False
    argmax.row_max(logits)
    assert not calls
    argmax.PICK_FORM[(3, 40, torch.float32)] = True
    argmax.row_max(logits)
    argmax.row_max(logits.to(torch.bfloat16))
    assert len(calls) == 1, "only at the shape and dtype measured"


def test_calibrate_takes_the_faster_form_once_per_shape(monkeypatch):
    monkeypatch.setattr(argmax, "PICK_FORM", {})
    monkeypatch.setattr(argmax, "supports", lambda x: True)
    timings = iter([{"torch": 0.4, "ours": 0.1}, {"torch": 0.1, "ours": 0.4}])
    monkeypatch.setattr(argmax, "time_forms", lambda forms: next(timings))
    assert argmax.calibrate(16, 64, torch.bfloat16).startswith("ours (16x64: argmax.c 0.100 vs torch 0.400 ms)")
    assert argmax.calibrate(1, 64, torch.bfloat16).startswith("torch")
    assert argmax.PICK_FORM == {(16, 64, torch.bfloat16): True, (1, 64, torch.bfloat16): False}
    assert argmax.calibrate(16, 64, torch.bfloat16) == "ours (measured before)", "once per shape and process"


def test_calibrate_leaves_torch_where_the_kernel_does_not_run(monkeypatch):
    monkeypatch.setattr(argmax, "PICK_FORM", {})
    monkeypatch.setattr(argmax, "available", lambda: False)
    assert argmax.calibrate(4, 64, torch.float32) == "torch (argmax.c does not run here)"
    assert argmax.PICK_FORM == {(4, 64, torch.float32): False}


def test_describe_names_the_form_measured_at_the_batch_and_vocabulary(monkeypatch):
    monkeypatch.setattr(argmax, "PICK_FORM", {(16, 64, torch.bfloat16): True, (1, 64, torch.bfloat16): False})
    assert argmax.describe(16, 64) == "; pick:ours"
    assert argmax.describe(1, 64) == "; pick:torch"
    assert argmax.describe(4, 64) == "", "not measured at that batch: nothing claimed"


@needs_kernel
def test_a_model_notes_its_pick_form_at_each_batch_and_its_tokens_do_not_change(embedded_dir, tmp_path, monkeypatch):
    from starcoder_tp.comm import TPGroup
    from starcoder_tp.model import load_model
    from starcoder_tp.shard import shard_checkpoint

    monkeypatch.setattr(argmax, "PICK_FORM", {})
    shard_checkpoint(embedded_dir, tmp_path / "s", 1)
    model = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="plain")
    ids = torch.randint(1, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model.setup_cache(3, 16)
        assert set(argmax.PICK_FORM) == {(3, model.local_vocab, model.transformer.ln_f.weight.dtype)}
        logits = model(ids, torch.arange(9).expand(3, 9), 0)
        picks = {}
        for form in (True, False):
            argmax.PICK_FORM[(3, model.local_vocab, logits.dtype)] = form
            picks[form] = model.pick_greedy(logits)
    assert torch.equal(picks[True], picks[False]) and torch.equal(picks[False], logits.argmax(dim=-1))
