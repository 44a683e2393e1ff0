"""The shared-memory collectives: exact sums in rank order, chunking, and a bounded wait."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from starcoder_tp import shm_comm

pytestmark = pytest.mark.skipif(not shm_comm.supported(), reason="shared-memory collectives need x86-64 and /dev/shm")


def _rank(rank, world_size, path, queue):
    try:
        _collectives(rank, world_size, path, queue)
    except Exception:
        import traceback
        queue.put((rank, {"error": traceback.format_exc()}))
        raise


def _collectives(rank, world_size, path, queue):
    comm = shm_comm.ShmComm(path, rank, world_size, timeout_s=30, slot_bytes=4096)
    out = {}
    for n, dtype in ((7, torch.float32), (3000, torch.float32), (2500, torch.bfloat16), (1, torch.float64)):
        gen = torch.Generator().manual_seed(1000 * rank + n)
        t = torch.randn(n, generator=gen).to(dtype)
        out[(n, str(dtype))] = comm.all_reduce_(t.clone())
    # The same shapes exchanged in and out of inference mode, both orders (the model runs in it,
    # the timers' collectives outside it): the slots' views serve both.
    for key, inference in (("in_then_out", (True, False)), ("out_then_in", (False, True))):
        sums = []
        for mode in inference:
            with torch.inference_mode(mode):
                size = 5 if key == "in_then_out" else 6
                sums.append(comm.all_reduce_(torch.full((size,), float(rank + 1))))
                sums.append(comm.all_gather(torch.full((size,), float(rank))).sum(0))
        out[key] = torch.stack([s.clone() for s in sums])
    strided = torch.arange(12, dtype=torch.float32).view(3, 4).t() * (rank + 1)  # non-contiguous
    out["strided"] = comm.all_reduce_(strided)
    out["gather"] = comm.all_gather(torch.tensor([rank, 10 * rank], dtype=torch.float64))
    # Larger than a slot (4096 bytes): [5, 300] float32 = 6000 bytes, gathered in two chunks (sampling's logits).
    out["big_gather"] = comm.all_gather(torch.arange(1500, dtype=torch.float32).view(5, 300) + 10000 * rank)
    # Plain lists: a torch tensor sent through a queue would need this process to stay alive.
    queue.put((rank, {key: value.tolist() for key, value in out.items()}))


@pytest.mark.parametrize("world_size", [2, 3])
def test_all_reduce_and_all_gather_are_exact_and_identical_on_every_rank(world_size):
    path = shm_comm.create_segment(world_size, slot_bytes=4096)
    try:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_rank, args=(r, world_size, path, queue)) for r in range(world_size)]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(30)
    finally:
        os.unlink(path)
    failed = {r: out["error"] for r, out in results.items() if "error" in out}
    assert not failed, failed
    for (n, dtype) in [(7, "torch.float32"), (3000, "torch.float32"), (2500, "torch.bfloat16"), (1, "torch.float64")]:
        parts = [torch.randn(n, generator=torch.Generator().manual_seed(1000 * r + n)).to(getattr(torch, dtype[6:]))
                 for r in range(world_size)]
        expected = parts[0].clone()
        for p in parts[1:]:
            expected += p  # the same order as the ranks sum in
        for r in range(world_size):
            assert results[r][(n, dtype)] == expected.tolist(), (n, dtype, r)
    ranks_sum, ids_sum = world_size * (world_size + 1) / 2, world_size * (world_size - 1) / 2
    for key, size in (("in_then_out", 5), ("out_then_in", 6)):
        assert all(results[r][key] == [[ranks_sum] * size, [ids_sum] * size] * 2 for r in range(world_size)), key
    strided = sum(torch.arange(12, dtype=torch.float32).view(3, 4).t() * (r + 1) for r in range(world_size))
    assert all(results[r]["strided"] == strided.tolist() for r in range(world_size))
    gathered = [[float(r), 10.0 * r] for r in range(world_size)]
    assert all(results[r]["gather"] == gathered for r in range(world_size))
    big = torch.stack([torch.arange(1500, dtype=torch.float32).view(5, 300) + 10000 * r for r in range(world_size)])
    assert all(results[r]["big_gather"] == big.tolist() for r in range(world_size))


def test_a_missing_rank_is_named_after_the_timeout():
    path = shm_comm.create_segment(2, slot_bytes=4096)
    try:
        comm = shm_comm.ShmComm(path, 0, 2, timeout_s=0.5, slot_bytes=4096)
        with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] did not reach collective #1 within 0s"):
            comm.all_reduce_(torch.ones(4))
    finally:
        os.unlink(path)
