"""malloc.py: a CPU rank's glibc malloc keeps freed blocks (page faults counted, not time)."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from starcoder_tp import malloc, panels
from starcoder_tp.kernels import Choice
from starcoder_tp.linear import Linear
from starcoder_tp.malloc import HUGE_PAGE_BYTES, MALLOC_ENV, THP_ENV, THP_SETTING, malloc_choice
from starcoder_tp.comm import TPGroup
from starcoder_tp.files import STARCODER2_MODEL_DIR
from starcoder_tp.device import Device
from starcoder_tp.timing import timed_generate
from starcoder_tp.model import load_model
from starcoder_tp.group_spec import GroupSpec
from starcoder_tp.shard import load_part, shard_checkpoint

# Blocks of a prefill's sizes (9 to 48 MiB), allocated, touched and freed in turn, eight times;
# the page faults of each round. glibc maps the large ones afresh at each allocation.
ROUNDS = """
import resource, sys, torch
from starcoder_tp.malloc import tune_malloc
print(tune_malloc())
def round_faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for mib in (9, 48, 8, 32, 33):
        block = torch.ones(mib << 20, dtype=torch.uint8)
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(*[round_faults() for _ in range(8)])
"""
PAGES_PER_ROUND = (9 + 48 + 8 + 32 + 33) << 8  # 4 KiB pages


def rounds(choice: str) -> tuple[str, list[int]]:
    out = subprocess.run([sys.executable, "-c", ROUNDS], capture_output=True, text=True, check=True, timeout=120,
                         env={**os.environ, MALLOC_ENV: choice}).stdout.split("\n")
    return out[0], [int(v) for v in out[1].split()]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator set up here is glibc's")
def test_a_tuned_rank_reuses_freed_blocks_where_glibc_maps_them_afresh():
    done, tuned = rounds("tuned")
    assert done == "tuned"
    assert max(tuned[-3:]) <= PAGES_PER_ROUND // 100, f"page faults per round, tuned: {tuned}"
    done, system = rounds("system")
    assert done == "system"
    assert min(system[-3:]) >= PAGES_PER_ROUND // 2, f"glibc as it is faults in every round: {system}"


def test_a_bad_choice_is_refused_naming_it_before_any_rank_is_spawned(monkeypatch):
    monkeypatch.setenv(MALLOC_ENV, "jemalloc")
    with pytest.raises(ValueError, match=r"STARCODER_TP_MALLOC='jemalloc': expected one of \['tuned', 'system'\]"):
        GroupSpec("unused", 1)
    monkeypatch.setenv(MALLOC_ENV, "system")
    assert malloc_choice() == "system"
    monkeypatch.delenv(MALLOC_ENV)
    assert malloc_choice() == "tuned"


HUGE = """
import torch
from starcoder_tp.malloc import enable_huge_pages
print(enable_huge_pages())
block = torch.ones(64 << 20, dtype=torch.uint8)  # a laid-out weight's size: its pages touched
print([int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages:")][0])
"""


def huge(env: dict[str, str]) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if k not in (THP_ENV, MALLOC_ENV)}
    out = subprocess.run([sys.executable, "-c", HUGE], capture_output=True, text=True, check=True, timeout=120,
                         env={**clean, **env}).stdout.split("\n")
    return out[0], int(out[1])


THP_MODE = THP_SETTING.read_text() if THP_SETTING.is_file() else "[never]"


@pytest.mark.skipif("[never]" in THP_MODE or not os.path.isfile("/proc/self/smaps_rollup"),
                    reason=f"transparent huge pages are off here ({THP_SETTING}: {THP_MODE.strip()})")
def test_a_rank_asks_for_huge_pages_unless_told_otherwise():
    done, kb = huge({})
    assert done == "2 MiB pages" and kb >= 32 << 10, (done, kb)  # most of the 64 MiB block
    assert huge({MALLOC_ENV: "system"}) == ("system", 0), "glibc and the kernel as they are"
    assert huge({THP_ENV: "0"}) == (f"{THP_ENV}=0 (as set)", 0), "the user's own setting stands"


def file_mappings() -> list[tuple[int, int, str]]:
    """This process's mappings of files: (start, end, path)."""
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = (int(v, 16) for v in fields[0].split("-"))
            spans.append((start, end, fields[5]))
    return spans


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings from /proc/self/maps")
def test_a_cpu_model_with_plain_kernels_holds_its_weights_in_its_own_memory_not_in_the_part_files_mapping(
        tmp_path, embedded_dir):
    shard_checkpoint(embedded_dir, tmp_path / "s", 1)
    part_files = {str(p.resolve()) for p in (tmp_path / "s").rglob("*.safetensors")}
    assert part_files
    _, mapped = load_part(tmp_path / "s", 0, 1)  # as load_file returns them: in the file's mapping
    spans = [(a, b) for a, b, path in file_mappings() if path in part_files]
    assert any(a <= t.data_ptr() < b for t in mapped.values() for a, b in spans), "the premise: load_file maps"
    del mapped
    model = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="plain")
    still = [path for _, _, path in file_mappings() if path in part_files]
    assert not still, f"the part's files are still mapped after the load: {still}"
    tensors = list(model.state_dict().values())
    assert all(t.data_ptr() % 64 == 0 for t in tensors if t.numel()), "owned blocks are 64-byte aligned"


def part_spans(part_files: set[str]) -> list[tuple[int, int]]:
    return [(a, b) for a, b, path in file_mappings() if path in part_files]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings from /proc/self/maps")
@pytest.mark.parametrize("kernels", ["gemv", "onednn", "panels"])  # layouts that keep the plain weight, or not
def test_linear_weights_stay_in_the_parts_mapping_until_laid_out_and_nothing_after(tmp_path, embedded_dir, prompts,
                                                                                    kernels):
    if kernels == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN is not in this torch build")
    if kernels == "panels" and not panels.supports(torch.ones(16, 16)):
        pytest.skip("panels need AVX2 and the built library")
    shard_checkpoint(embedded_dir, tmp_path / "s", 1)
    part_files = {str(p.resolve()) for p in (tmp_path / "s").rglob("*.safetensors")}
    plain = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="plain")
    assert not part_spans(part_files), "kernels 'plain' lays nothing out: every weight is copied at load"
    model = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels=kernels)
    spans = part_spans(part_files)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    wte = model.transformer.wte
    assert model.config.tie_word_embeddings, "the embedded model's lm_head is its embedding"
    assert linears and all(any(a <= m.weight.data_ptr() < b for a, b in spans) and m.in_file for m in linears), \
        "a linear weight is read from the part's mapping until its lay-out"
    assert wte.in_file and any(a <= wte.weight.data_ptr() < b for a, b in spans), "the tied embedding too"
    others = [t for name, t in model.state_dict().items() if name != "transformer.wte.weight" and not any(
        name == f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Linear))]
    assert not any(a <= t.data_ptr() < b for t in others if t.numel() for a, b in spans), "the rest is copied at load"
    out = timed_generate(model, Device("cpu"), prompts, 6, topk=3)
    assert not part_spans(part_files), "laid out, no weight is read from the part's mapping: the file is unmapped"
    assert not any(m.in_file for m in linears) and not wte.in_file
    assert all(m.weight.numel() == 0 if kernels != "gemv" else m.weight.data_ptr() % 64 == 0 for m in linears)
    if kernels == "panels":  # the embedding reads its rows from the lm_head's panels: one copy of the weight
        assert wte.weight.numel() == 0 and wte.panels is model.lm_head_packed is not None
    else:
        assert wte.panels is None and wte.weight.data_ptr() % 64 == 0, "the lm_head's and the embedding's weight, own"
    ref = timed_generate(plain, Device("cpu"), prompts, 6, topk=3)
    assert torch.equal(out.output_ids, ref.output_ids)
    torch.testing.assert_close(out.topk_logprobs, ref.topk_logprobs, rtol=1e-4, atol=1e-4)


def test_a_weight_the_load_joins_is_its_own_already_and_only_the_files_are_left_in_the_mapping(tmp_path):
    """StarCoder2's q, k and v are joined into one c_attn at load (a tensor of the process's own): not
    marked as the file's, so that a plain layout does not copy it again."""
    shard_checkpoint(STARCODER2_MODEL_DIR, tmp_path / "s", 1)
    model = load_model(tmp_path / "s", TPGroup(0, 1), torch.device("cpu"), kernels="gemv")
    marks = {name.split(".", 3)[-1]: m.in_file for name, m in model.named_modules()
             if isinstance(m, Linear) and name.startswith("transformer.h.0.")}
    assert marks == {"attn.c_attn": False, "attn.c_proj": True, "mlp.c_fc": True, "mlp.c_proj": True}, marks


# A weight placed where the rank asked for huge pages, in a process of its own (c10 reads its
# setting once): where it starts, and how many of its 4 KiB pages belong to a transparent huge page
# (/proc/kpageflags, bit 22, by each page's frame from /proc/self/pagemap: root only).
PLACED = """
import struct, torch
from starcoder_tp import malloc
print(*malloc.as_a_cpu_rank())  # as a rank sets itself up
reused = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(24)]  # blocks below c10's advice
del reused  # the heap's pages touched in 4 KiB pages, then freed: the weight reuses them
weight = malloc.copy_of(torch.arange(9 << 18, dtype=torch.float32).view(1152, -1))  # 2.25 MiB
assert torch.equal(weight, torch.arange(9 << 18, dtype=torch.float32).view(1152, -1))
huge = pages = 0
try:
    with open("/proc/self/pagemap", "rb") as pagemap, open("/proc/kpageflags", "rb") as flags:
        for page in range(weight.data_ptr() >> 12, (weight.data_ptr() + (9 << 20 >> 2)) >> 12):
            pagemap.seek(page * 8)
            frame = struct.unpack("Q", pagemap.read(8))[0] & ((1 << 55) - 1)
            flags.seek(frame * 8)
            huge += struct.unpack("Q", flags.read(8))[0] >> 22 & 1
            pages += 1
except OSError as error:
    print("unreadable", error)
print(weight.data_ptr() % (2 << 20), huge, pages)
"""


@pytest.mark.skipif("[never]" in THP_MODE or not os.path.isfile("/proc/kpageflags"),
                    reason=f"no transparent huge pages here ({THP_SETTING}: {THP_MODE.strip()}) or no /proc/kpageflags")
def test_a_ranks_weight_starts_on_a_huge_page_and_is_held_in_huge_pages_even_in_reused_heap():
    clean = {k: v for k, v in os.environ.items() if k not in (THP_ENV, MALLOC_ENV)}
    out = subprocess.run([sys.executable, "-c", PLACED], capture_output=True, text=True, timeout=120, env=clean)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.split("\n") if line]
    assert lines[0] == "tuned 2 MiB pages", lines
    if lines[1].startswith("unreadable"):
        pytest.skip(f"the pages' flags cannot be read here (root only): {lines[1]}")
    offset, huge, pages = (int(v) for v in lines[1].split())
    # c10 alone aligns a block to 4 KiB: a 2.25 MiB weight then got no huge page at all here. (At
    # least its first 2 MiB: a system short of whole huge pages may not give the second.)
    assert offset == 0 and pages == 576 and huge >= 512, f"offset {offset}; {huge} of {pages} pages huge"


def test_empty_places_only_where_huge_pages_were_asked_for_and_the_tensor_is_large(monkeypatch):
    monkeypatch.delenv(THP_ENV, raising=False)
    assert not malloc.places_in_huge_pages(64 << 20)
    monkeypatch.setenv(THP_ENV, "1")
    assert malloc.places_in_huge_pages(malloc.HUGE_PAGE_MIN_BYTES)
    assert not malloc.places_in_huge_pages(malloc.HUGE_PAGE_MIN_BYTES - 1)
    monkeypatch.setenv(THP_ENV, "0")  # the user's own setting
    assert not malloc.places_in_huge_pages(64 << 20)


@pytest.mark.skipif(platform.system() != "Linux", reason="placement uses Linux's madvise")
def test_placed_copies_keep_values_and_start_on_a_2_mib_boundary(monkeypatch):
    monkeypatch.setenv(THP_ENV, "1")
    weight = torch.randn(1152, 1024).to(torch.bfloat16)  # 2.25 MiB
    copy = malloc.copy_of(weight)
    assert torch.equal(copy, weight) and copy.is_contiguous() and copy.data_ptr() % HUGE_PAGE_BYTES == 0
    assert copy.untyped_storage().nbytes() >= 4 << 20, "whole huge pages: the copy's block spans 4 MiB"
    assert malloc.placed(copy) is copy, "placed once: not copied again"
    moved = malloc.placed(weight)
    assert moved is not weight and torch.equal(moved, weight) and moved.data_ptr() % HUGE_PAGE_BYTES == 0
    small = torch.randn(64, 64)
    assert malloc.placed(small) is small
    state = malloc.owned_copies({"big": weight, "small": small})
    assert state["big"].data_ptr() % HUGE_PAGE_BYTES == 0 and torch.equal(state["big"], weight)
    assert torch.equal(state["small"], small) and state["small"].data_ptr() != small.data_ptr()
    monkeypatch.delenv(THP_ENV)
    assert malloc.placed(weight) is weight, "not asked for: the tensor as it is"


@pytest.mark.skipif(platform.system() != "Linux", reason="placement uses Linux's madvise")
@pytest.mark.skipif(not panels.supports(torch.zeros(1024, 1024)), reason="panels.c does not run here")
def test_panels_and_a_weight_laid_out_plain_again_are_placed(monkeypatch):
    monkeypatch.setenv(THP_ENV, "1")
    linear = Linear(1024, 768, bias=False)  # 3 MiB in fp32
    with torch.no_grad():
        linear.weight.copy_(torch.randn(768, 1024))
    plain = linear.weight.detach().clone()
    assert linear.use_kernels(Choice("panels", "panels"), 4)
    assert linear.packed.data_ptr() % HUGE_PAGE_BYTES == 0, "the panels the kernel reads at every step"
    assert not linear.use_kernels(Choice("rowdot", "plain"), 4)
    assert torch.equal(linear.weight, plain) and linear.weight.data_ptr() % HUGE_PAGE_BYTES == 0


@pytest.mark.skipif(platform.system() != "Linux", reason="placement uses Linux's madvise")
def test_the_plans_copies_lie_side_by_side_in_one_placed_block(monkeypatch):
    from starcoder_tp.kernel_timing import side_by_side

    monkeypatch.setattr(malloc, "places_in_huge_pages", lambda nbytes: True)
    weight = torch.randn(1152, 1024).to(torch.bfloat16)  # 2.25 MiB: rounded up, each copy would take 4 MiB
    ticks = []
    copies = side_by_side(weight, 5, lambda: ticks.append(1))
    assert len(copies) == 5 == len(ticks) and all(torch.equal(c, weight) and c.is_contiguous() for c in copies)
    starts = [c.data_ptr() for c in copies]
    assert starts[0] % HUGE_PAGE_BYTES == 0, "the block starts on a huge page"
    assert [b - a for a, b in zip(starts, starts[1:])] == [weight.numel() * 2] * 4, "no rounding between copies"
    assert side_by_side(weight, 0) == []
    with torch.inference_mode():  # as a plan measured at a request's first decode batch
        made = side_by_side(weight, 2)
    with torch.inference_mode(False), torch.no_grad():  # as kernels.measure lays weights out
        made += side_by_side(weight, 2)
    made += side_by_side(weight.requires_grad_(), 2)
    assert all(torch.equal(c, weight) for c in made)
