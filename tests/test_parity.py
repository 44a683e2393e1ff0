"""Greedy tokens of the tensor-parallel runtime against transformers' generate (the reference)."""
import pytest
import torch

from model_files import NEW_TOKENS, copy_in_layout, write_small_model
from starcoder_tp.testing.compare import check_outputs_equal, check_topk_close
from starcoder_tp.testing.runners import HFRunner


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_fp32_tokens_identical_to_transformers(tp_runners, hf_reference, prompts, world_size):
    assert len({len(p) for p in prompts}) == len(prompts), "the batch must be ragged"
    out = tp_runners(world_size).generate_greedy(prompts, NEW_TOKENS)
    assert [len(row) for row in out.output_ids] == [NEW_TOKENS] * len(prompts)
    check_outputs_equal(outputs_0=hf_reference, outputs_1=out, name_0="transformers", name_1=f"tp{world_size}")


def test_fp32_tokens_identical_over_torch_distributed_collectives(tp_runners, hf_reference, prompts):
    """The same with gloo's collectives instead of the shared-memory ones (as under torchrun)."""
    out = tp_runners(2, comm="dist").generate_greedy(prompts, NEW_TOKENS)
    check_outputs_equal(outputs_0=hf_reference, outputs_1=out, name_0="transformers", name_1="tp2-gloo")


def test_batch_rows_do_not_depend_on_each_other(tp_runners, hf_reference, prompts):
    """Each prompt alone gives what it gives inside the padded batch."""
    runner = tp_runners(2)
    for row, prompt in enumerate(prompts[:2]):
        alone = runner.generate_greedy([prompt], NEW_TOKENS).output_ids[0]
        assert alone == hf_reference.output_ids[row]


def test_outputs_are_not_degenerate(hf_reference):
    """A model that repeats one token would let a broken cache or position pass unseen."""
    for row in hf_reference.output_ids:
        assert len(set(row)) >= 16, row


@pytest.mark.parametrize("world_size", [2, 4])
def test_multi_head_config_identical_to_transformers(tmp_path_factory, tp_runners, world_size):
    src = write_small_model(tmp_path_factory.mktemp("mha") / "m", multi_query=False, vocab_size=1001)
    prompts = [[5, 17, 900, 3], [44] * 9, [1000, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
    reference = HFRunner(src).generate_greedy(prompts, 80)
    out = tp_runners(world_size, model_dir=src).generate_greedy(prompts, 80)
    check_outputs_equal(outputs_0=reference, outputs_1=out, name_0="transformers", name_1=f"tp{world_size}-mha")


@pytest.mark.parametrize("layout", ["index", "bin"])
def test_other_checkpoint_layouts_identical_to_transformers(tmp_path_factory, tp_runners, embedded_dir,
                                                           hf_reference, prompts, layout):
    src = copy_in_layout(embedded_dir, tmp_path_factory.mktemp(layout) / "m", layout)
    out = tp_runners(2, model_dir=src).generate_greedy(prompts, NEW_TOKENS)
    check_outputs_equal(outputs_0=hf_reference, outputs_1=out, name_0="transformers", name_1=f"tp2-{layout}")


def test_bf16_follows_the_top5_rule(tp_runners, embedded_dir, prompts):
    reference = HFRunner(embedded_dir, dtype="bfloat16").generate_greedy(prompts, NEW_TOKENS, topk=5)
    out = tp_runners(2, "bfloat16").generate_greedy(prompts, NEW_TOKENS, topk=5)
    firsts = check_topk_close(outputs_0=reference, outputs_1=out, name_0="transformers-bf16", name_1="tp2-bf16")
    print("first difference per prompt (bf16):", firsts)


def test_topk_logprobs_match_the_reference_in_fp32(tp_runners, embedded_dir, prompts):
    reference = HFRunner(embedded_dir).generate_greedy(prompts[:2], 8, topk=5)
    out = tp_runners(2).generate_greedy(prompts[:2], 8, topk=5)
    assert out.topk_ids == reference.topk_ids
    torch.testing.assert_close(torch.tensor(out.topk_logprobs), torch.tensor(reference.topk_logprobs),
                               atol=1e-4, rtol=0)
