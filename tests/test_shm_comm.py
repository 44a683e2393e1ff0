"""The shared-memory collectives: exact sums in rank order, chunking, and a bounded wait."""

import pytest
import torch
import torch.multiprocessing as mp

from starcoder_tp import rowdot, shm_comm

pytestmark = pytest.mark.skipif(not shm_comm.supported(), reason="shared-memory collectives need x86-64 and /dev/shm")


def _rank(rank, world_size, path, queue, publishing="copied", small="python"):
    try:
        _collectives(rank, world_size, path, queue, publishing, small)
    except Exception:
        import traceback
        queue.put((rank, {"error": traceback.format_exc()}))
        raise


def _collectives(rank, world_size, path, queue, publishing, small):
    comm = shm_comm.ShmComm(path, rank, world_size, timeout_s=30, slot_bytes=4096)
    small_calls = [0]  # all-reduces by shm_reduce.c (its calls that publish: one that waits on calls it again)
    if small == "C" or (small == "rank 0 in C" and rank == 0):  # (the others in Python: the protocol is one)
        small_all_reduce = rowdot.small_all_reduce()

        def counted(view, seq, buf, n, bf16, publish, wait_s):
            small_calls[0] += publish
            return small_all_reduce(view, seq, buf, n, bf16, publish, wait_s)
        comm.use_small_reduce(counted)
    streamed = [0]  # stream_copy.c's calls
    if publishing != "copied":  # all-reduces of 64 bytes or more by stream_copy.c (a 7-float one copied),
        shm_comm.STREAM_MIN_BYTES, shm_comm.PROBE_EVERY = 64, 8  # or both ways, probed
        stream_copy = rowdot.stream_copy()
        comm._stream_copy, comm.publishing = lambda *a: streamed.__setitem__(0, streamed[0] + 1) or stream_copy(*a), \
            publishing
    out = {}
    for i in range(10):  # one chunk each (4000 bytes): a probe's four turns, then its way
        out[f"one_chunk_{i}"] = comm.all_reduce_(torch.full((1000,), float(rank + i)))
    for n, dtype in CASES:
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
    # A bound all-reduce (a fused decode step's partial): the same sums, at each call what the tensor holds then;
    # one by shm_reduce.c where this rank runs it, else none (the caller's all_reduce_ then).
    held = torch.zeros(9)
    bound = comm.bound_all_reduce_(held)
    out["bound_made"] = torch.tensor([bound is not None])
    for i in range(3):
        held.fill_(float(rank + 2 * i))
        (bound or (lambda: comm.all_reduce_(held)))()
        out[f"bound_{i}"] = held.clone()
    strided = torch.arange(12, dtype=torch.float32).view(3, 4).t() * (rank + 1)  # non-contiguous
    out["strided"] = comm.all_reduce_(strided)
    out["gather"] = comm.all_gather(torch.tensor([rank, 10 * rank], dtype=torch.float64))
    # Larger than a slot (4096 bytes): [5, 300] float32 = 6000 bytes, gathered in two chunks (sampling's logits).
    out["big_gather"] = comm.all_gather(torch.arange(1500, dtype=torch.float32).view(5, 300) + 10000 * rank)
    # Plain lists: a torch tensor sent through a queue would need this process to stay alive.
    out = {key: value.tolist() for key, value in out.items()}
    out["ways"] = [streamed[0], comm.probes.calls, comm.probes.won[False] + comm.probes.won[True],
                   comm.probes.won[True]]
    out["small_calls"] = small_calls[0]
    queue.put((rank, out))


# (n, dtype) all-reduced from seeded random parts: sums whose rounding (bf16's at every step) shows the order.
# With 4096-byte slots: 7 fp32 and 31 bf16 in one call of shm_reduce.c where it runs; 3000 fp32 and 2500 bf16 in
# chunks, in Python; float64 in Python (shm_reduce.c takes fp32 and bf16).
CASES = ((7, torch.float32), (31, torch.bfloat16), (3000, torch.float32), (2500, torch.bfloat16), (1, torch.float64),
         (0, torch.float32))  # (an empty one: no exchange either way, so that ranks on either path stay in step)
# Which all-reduces shm_reduce.c runs with 4096-byte slots: the ten of 4000 bytes, 7 fp32, 31 bf16, the
# inference-mode four, the three bound, the strided one; with STREAM_MIN_BYTES at 64 (streamed, probed) only those
# under 64 bytes.
SMALL_CALLS = {"copied": 20, "streamed": 10, "probed": 10}


@pytest.mark.parametrize("publishing, small", [("copied", "python"), ("streamed", "python"), ("probed", "python"),
                                               ("copied", "C"), ("probed", "C"), ("copied", "rank 0 in C")])
@pytest.mark.parametrize("world_size", [2, 3])
def test_all_reduce_and_all_gather_are_exact_and_identical_on_every_rank(world_size, publishing, small):
    if publishing != "copied" and rowdot.stream_copy() is None:
        pytest.skip(f"stream_copy.c not built here ({rowdot.library()[1]})")
    if small != "python" and rowdot.small_all_reduce() is None:
        pytest.skip(f"shm_reduce.c not built here ({rowdot.library()[1]})")
    path = shm_comm.create_segment(world_size, slot_bytes=4096)
    try:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_rank, args=(r, world_size, path, queue, publishing, small))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(30)
    finally:
        shm_comm.remove_segment(path)
    failed = {r: out["error"] for r, out in results.items() if "error" in out}
    assert not failed, failed
    for (n, dtype) in CASES:
        parts = [torch.randn(n, generator=torch.Generator().manual_seed(1000 * r + n)).to(dtype)
                 for r in range(world_size)]
        expected = parts[0].clone()
        for p in parts[1:]:
            expected += p  # the same order as the ranks sum in
        for r in range(world_size):
            assert results[r][(n, str(dtype))] == expected.tolist(), (n, dtype, r)
    ranks_sum, ids_sum = world_size * (world_size + 1) / 2, world_size * (world_size - 1) / 2
    for key, size in (("in_then_out", 5), ("out_then_in", 6)):
        assert all(results[r][key] == [[ranks_sum] * size, [ids_sum] * size] * 2 for r in range(world_size)), key
    strided = sum(torch.arange(12, dtype=torch.float32).view(3, 4).t() * (r + 1) for r in range(world_size))
    assert all(results[r]["strided"] == strided.tolist() for r in range(world_size))
    gathered = [[float(r), 10.0 * r] for r in range(world_size)]
    assert all(results[r]["gather"] == gathered for r in range(world_size))
    big = torch.stack([torch.arange(1500, dtype=torch.float32).view(5, 300) + 10000 * r for r in range(world_size)])
    assert all(results[r]["big_gather"] == big.tolist() for r in range(world_size))
    for i in range(10):
        assert all(results[r][f"one_chunk_{i}"] == [float(ids_sum + world_size * i)] * 1000 for r in range(world_size))
    # 12 large all-reduces (10 of one chunk, 3000 floats in 3, 2500 bf16 in 2): 15 chunks, copied or streamed
    for r in range(world_size):
        copies, calls, probes, streaming = results[r]["ways"]
        if publishing == "copied":
            assert (copies, calls, probes) == (0, 0, 0), r
        elif publishing == "streamed":
            assert (copies, calls, probes) == (15, 0, 0), r
        else:  # probed: calls 1-4 the first probe (2 streamed), 5-8 its way (4 chunks, if streaming), 9 streamed
            # (the second probe's first turn), 10 copied, 11-12 copied (the probe's turn, another size)
            assert calls == 12 and probes == 1 and copies == 3 + 4 * streaming, (r, copies, calls, probes, streaming)
        in_c = small == "C" or (small == "rank 0 in C" and r == 0)
        assert results[r]["small_calls"] == (SMALL_CALLS[publishing] if in_c else 0), r
        assert results[r]["bound_made"] == [in_c], r
        for i in range(3):
            assert results[r][f"bound_{i}"] == [ids_sum + 2 * i * world_size] * 9, (r, i)


@pytest.mark.parametrize("small", ["python", "C"])
def test_a_missing_rank_is_named_after_the_timeout(small):
    if small == "C" and rowdot.small_all_reduce() is None:
        pytest.skip(f"shm_reduce.c not built here ({rowdot.library()[1]})")
    path = shm_comm.create_segment(2, slot_bytes=4096)
    try:
        comm = shm_comm.ShmComm(path, 0, 2, timeout_s=0.5, slot_bytes=4096)
        comm.use_small_reduce(rowdot.small_all_reduce() if small == "C" else None)
        with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] did not reach collective #1 within 0s"):
            comm.all_reduce_(torch.ones(4))
    finally:
        shm_comm.remove_segment(path)


def _probed(probes, calls):
    """Run `calls` ((bytes, {streamed: seconds})) through `probes`; the ways taken, and which were timed."""
    taken = []
    for nbytes, seconds in calls:
        streamed, timed = probes.next()
        taken.append((streamed, timed))
        if timed:
            probes.record(streamed, seconds[streamed], nbytes)
    return taken


def test_probes_time_both_ways_twice_and_keep_the_faster_until_the_next_probe(monkeypatch):
    monkeypatch.setattr(shm_comm, "PROBE_EVERY", 6)
    probes = shm_comm.Probes()
    fast_streamed = (2 << 20, {True: 250e-6, False: 1000e-6})
    taken = _probed(probes, [fast_streamed] * 6)
    assert taken == [(False, True), (True, True), (True, True), (False, True), (True, False), (True, False)]
    fast_copied = (2 << 20, {True: 300e-6, False: 150e-6})
    taken = _probed(probes, [fast_copied] * 6)
    assert taken[:4] == [(True, True), (False, True), (False, True), (True, True)], "this probe streams first"
    assert taken[4:] == [(False, False)] * 2 and probes.won == {True: 1, False: 1} and probes.calls == 12


def test_a_probe_keeps_each_ways_least_time():
    probes = shm_comm.Probes()
    # copied 100 then (preempted) 900; streamed 200 twice: copied's least (100) is less
    taken = []
    for seconds in (100e-6, 200e-6, 200e-6, 900e-6):
        streamed, timed = probes.next()
        taken.append(streamed)
        probes.record(streamed, seconds, 2 << 20)
    assert taken == [False, True, True, False] and probes.streaming is False and probes.won[False] == 1


def test_a_probe_passes_over_other_sizes_then_starts_again_at_one(monkeypatch):
    monkeypatch.setattr(shm_comm, "PROBE_EVERY", 64)
    probes = shm_comm.Probes()
    a, b = (2 << 20, {False: 1000e-6, True: 250e-6}), (64 << 10, {False: 60e-6, True: 27e-6})
    taken = _probed(probes, [a, b, a, b, a, b, a])  # A's turns interleaved with B's: A's four count
    assert [t for t in taken] == [(False, True), (True, True), (True, True), (True, True), (True, True),
                                  (False, True), (False, True)]
    assert probes.won == {True: 1, False: 0}
    probes = shm_comm.Probes()  # the probe's size never again: after PROBE_MISSES others, it starts at theirs
    taken = _probed(probes, [a] + [b] * (shm_comm.PROBE_MISSES + 5))
    assert probes.won == {True: 1, False: 0} and taken[-1] == (True, False)
    assert sum(timed for _, timed in taken) == 1 + shm_comm.PROBE_MISSES + 4


def test_a_probe_that_cannot_end_is_dropped_and_the_way_kept(monkeypatch):
    monkeypatch.setattr(shm_comm, "PROBE_EVERY", 1000)
    probes = shm_comm.Probes()
    probes.streaming = True  # (as a probe before it left it)
    a, b = (2 << 20, {False: 1000e-6, True: 250e-6}), (64 << 10, {False: 60e-6, True: 27e-6})
    taken = _probed(probes, [a] + ([b] * 5 + [a] * 5) * 4)  # runs of 5: each restart cut short by the other size
    timed = [t for _, t in taken]
    assert timed[:shm_comm.PROBE_MOST + 1] == [True] * (shm_comm.PROBE_MOST + 1)
    assert not any(timed[shm_comm.PROBE_MOST + 1:]), "no all-reduce timed past the bound"
    assert probes.won == {True: 0, False: 0} and probes.streaming is True
    assert all(way for way, t in taken if not t), "the way it had"


def test_a_bad_stream_setting_is_refused_naming_it_before_any_rank_is_spawned(monkeypatch):
    from starcoder_tp.group_spec import GroupSpec
    monkeypatch.setenv(shm_comm.STREAM_ENV, "on")
    with pytest.raises(ValueError, match=r"STARCODER_TP_SHM_STREAM='on': expected auto \(probed\), 0"):
        GroupSpec("unused", 2)
    GroupSpec("unused", 1)  # (one rank: no shared memory, nothing to set)


def test_a_bad_small_reduce_setting_is_refused_naming_it_before_any_rank_is_spawned(monkeypatch):
    from starcoder_tp.group_spec import GroupSpec
    monkeypatch.setenv(shm_comm.SMALL_ENV, "yes")
    with pytest.raises(ValueError, match=r"STARCODER_TP_SHM_SMALL='yes': expected 0 \(in Python\) or 1"):
        GroupSpec("unused", 2)


def test_a_probe_times_a_ranks_copies_and_sums_not_its_waits(monkeypatch):
    """The other rank arrives a second late at every chunk: the probe's time leaves that out."""
    clock = [0.0]
    monkeypatch.setattr(shm_comm.time, "perf_counter", lambda: clock[0])
    path = shm_comm.create_segment(2, slot_bytes=4096)
    try:
        comm = shm_comm.ShmComm(path, 0, 2, timeout_s=5, slot_bytes=4096)
        comm._stream_copy, comm.publishing = (lambda *a: None), "probed"
        monkeypatch.setattr(shm_comm, "STREAM_MIN_BYTES", 64)

        def late_rank_1(seq):
            clock[0] += 1.0
            comm._flags_np[1] = seq

        monkeypatch.setattr(comm, "_wait", late_rank_1)
        recorded = []
        monkeypatch.setattr(comm.probes, "record", lambda *a: recorded.append(a))
        comm.all_reduce_(torch.ones(3000))  # 3 chunks: 3 s waited
        assert recorded == [(False, 0.0, 12000)], "the waits are not the way's"
    finally:
        shm_comm.remove_segment(path)


@pytest.mark.parametrize("wanted, publishing", [("auto", "probed"), ("0", "copied"), ("1", "streamed")])
def test_the_publishing_is_probed_unless_set(monkeypatch, wanted, publishing):
    if rowdot.stream_copy() is None:
        pytest.skip(f"stream_copy.c not built here ({rowdot.library()[1]})")
    monkeypatch.setenv(shm_comm.STREAM_ENV, wanted)
    path = shm_comm.create_segment(2)
    try:
        comm = shm_comm.ShmComm(path, 0, 2, timeout_s=1)
        assert comm.use_stream_copy(rowdot.stream_copy()) == publishing == comm.publishing
        assert comm.use_stream_copy(None) == "copied", "no library: copied whatever is asked"
        monkeypatch.setenv(shm_comm.STREAM_ENV, "yes")
        with pytest.raises(ValueError, match=r"STARCODER_TP_SHM_STREAM='yes': expected auto \(probed\), 0"):
            comm.use_stream_copy(rowdot.stream_copy())
    finally:
        shm_comm.remove_segment(path)


def test_stream_copy_copies_every_byte_at_any_alignment():
    copy = rowdot.stream_copy()
    if copy is None:
        pytest.skip(f"stream_copy.c not built here ({rowdot.library()[1]})")
    src = torch.randint(0, 256, (5000,), dtype=torch.uint8)
    for dst_offset, src_offset, n in ((0, 0, 4096), (3, 5, 4000), (16, 1, 17), (7, 0, 9), (0, 0, 0), (1, 2, 4990)):
        dst = torch.zeros(5000, dtype=torch.uint8)
        copy(dst.data_ptr() + dst_offset, src.data_ptr() + src_offset, n)
        assert torch.equal(dst[dst_offset:dst_offset + n], src[src_offset:src_offset + n]), (dst_offset, src_offset, n)
        assert not dst[:dst_offset].any() and not dst[dst_offset + n:].any(), "nothing written outside"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shm_reduce_c_sums_in_rank_order_rounding_each_sum_as_torch_add_does(dtype):
    """Rank 0 of three by shm_reduce.c, the other two ranks' parts written into their slots here: every sum
    rounded as torch.add rounds it (bf16: to nearest even at each step, ties included), in rank order."""
    if rowdot.small_all_reduce() is None:
        pytest.skip(f"shm_reduce.c not built here ({rowdot.library()[1]})")
    gen = torch.Generator().manual_seed(7)
    scales = 2.0 ** torch.randint(-20, 20, (3, 4000), generator=gen)
    parts = (torch.randn(3, 4000, generator=gen) * scales).to(dtype)
    # ties: 1 + 2^-8 is halfway between two bf16s (to even: 1), 1 + 3 * 2^-8 too (to even: 1 + 2^-6); inf, -0
    parts[:, :6] = torch.tensor([[1.0, 1.0, float("inf"), -0.0, 3.0, 1.0], [2.0 ** -8, 3 * 2.0 ** -8, 1.0, -0.0, -3.0, 0],
                                 [0, 0, 2.0, -0.0, 2.0 ** -30, 2.0 ** -8]]).to(dtype)
    path = shm_comm.create_segment(3, slot_bytes=16384)
    try:
        comm = shm_comm.ShmComm(path, 0, 3, timeout_s=30, slot_bytes=16384)
        comm.use_small_reduce(rowdot.small_all_reduce())
        every = comm._slots(1, parts.shape[1], dtype)[1]  # collective #1's slots
        every[1].copy_(parts[1]), every[2].copy_(parts[2])
        comm._flags_np[1] = comm._flags_np[2] = 1
        got = comm.all_reduce_(parts[0].clone())
    finally:
        shm_comm.remove_segment(path)
    expected = torch.add(parts[0], parts[1]).add_(parts[2])
    assert comm._seq == 1 and comm._flags_np[0] == 1
    differ = (got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)
              != expected.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)).nonzero().flatten()
    assert differ.numel() == 0, [(i.item(), parts[:, i].tolist(), got[i].item(), expected[i].item()) for i in differ[:5]]


def test_ctrl_c_reaches_a_rank_waiting_in_shm_reduce_c(tmp_path):
    """A rank waits in shm_reduce.c for a rank that never comes, with a collective timeout of 10 minutes; SIGINT,
    sent once its flag shows it inside the call, ends it by KeyboardInterrupt, not at the timeout: the C
    call waits SMALL_WAIT_S at most before Python gets control back."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    from waiting import until

    if rowdot.small_all_reduce() is None:
        pytest.skip(f"shm_reduce.c not built here ({rowdot.library()[1]})")
    path = shm_comm.create_segment(2, slot_bytes=4096)
    script = textwrap.dedent(f"""
        import torch
        from starcoder_tp import rowdot, shm_comm
        comm = shm_comm.ShmComm({path!r}, 0, 2, timeout_s=600, slot_bytes=4096)
        comm.use_small_reduce(rowdot.small_all_reduce())
        try:
            comm.all_reduce_(torch.ones(16))
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    """)
    try:
        watcher = shm_comm.ShmComm(path, 1, 2, timeout_s=30, slot_bytes=4096)  # (rank 1's view: reads rank 0's flag)
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            until(lambda: watcher._flags_np[0] == 1 or proc.poll() is not None, "rank 0's publishing", timeout=120)
            assert proc.poll() is None, proc.communicate()
            os.kill(proc.pid, signal.SIGINT)
            out, err = proc.communicate(timeout=120)  # (bounds it: the timeout would be 600 s)
        finally:
            proc.kill()
    finally:
        shm_comm.remove_segment(path)
    assert out == "interrupted\n", err


def test_the_plan_line_says_how_the_ranks_all_reduce(monkeypatch):
    from starcoder_tp.comm import TPGroup

    monkeypatch.delenv(shm_comm.SMALL_ENV, raising=False)
    path = shm_comm.create_segment(2, slot_bytes=4096)
    try:
        comm = shm_comm.ShmComm(path, 0, 2, timeout_s=30, slot_bytes=4096)
        group = TPGroup(0, 2, shm=comm)
        assert group.describe() == "; all-reduce copied"
        comm.use_small_reduce(lambda *args: -1)  # (a stand-in: only whether one is in use is read)
        assert group.describe() == "; all-reduce copied,small-in-C"  # (one item: "name value", no space in the value)
        comm.use_small_reduce(None)
        assert group.describe() == "; all-reduce copied" and TPGroup(0, 2).describe() == ""
    finally:
        shm_comm.remove_segment(path)
