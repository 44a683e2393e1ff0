"""The device layer, on CPU: cuda and npu calls faked where they cannot run here."""
import subprocess
import sys

import pytest
import torch

from starcoder_tp.device import Device


def test_backends_and_devices_per_kind():
    assert [Device(k).backend for k in ("cpu", "cuda", "npu")] == ["gloo", "nccl", "hccl"]
    assert Device("cpu").torch_device(3) == torch.device("cpu")
    assert Device("cuda", device_id=2).torch_device(1) == torch.device("cuda", 3)  # rank r: device_id + r
    with pytest.raises(ValueError, match="device 'tpu' is not supported"):
        Device("tpu")
    with pytest.raises(ValueError, match="device id must be >= 0, got -1"):
        Device("cuda", -1)


def test_cpu_memory_is_the_process_peak_rss():
    assert Device("cpu").peak_memory_bytes() > 10 << 20


def test_cuda_unavailable_or_too_few_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="--device cuda: no cuda device is available"):
        Device("cuda").check_available(2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    Device("cuda").check_available(2)
    with pytest.raises(ValueError, match="--device-id 1 with 2 rank\\(s\\) needs devices 1..2, but only 2 cuda"):
        Device("cuda", 1).check_available(2)


def test_cuda_sync_and_memory_go_to_torch_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set", str(d))))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 123)
    device = Device("cuda", 1)
    assert device.bind(1) == torch.device("cuda", 2)
    device.synchronize()
    assert device.peak_memory_bytes() == 123
    assert calls == [("set", "cuda:2"), "sync"]


def test_npu_without_torch_npu_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # makes the import fail
    with pytest.raises(RuntimeError, match="--device npu needs the Ascend adapter torch_npu"):
        Device("npu").check_available(2)


# Naming privateuse1 "npu" cannot be undone inside a process, and once it is named
# torch.compile refuses every later graph ("Device 'npu' does not have a corresponding
# module"), so this fake runs in a child interpreter of its own.
NPU_FAKE = """
import sys, types, torch
from starcoder_tp.device import Device
calls = []
sys.modules["torch_npu"] = types.ModuleType("torch_npu")
torch.npu = types.SimpleNamespace(
    is_available=lambda: True, device_count=lambda: 2, set_device=lambda d: calls.append(("set", str(d))),
    synchronize=lambda: calls.append("sync"), max_memory_allocated=lambda: 456,
    reset_peak_memory_stats=lambda: calls.append("reset"))
torch.utils.rename_privateuse1_backend("npu")  # what importing the real torch_npu does
device = Device("npu", 0)
device.check_available(2)  # a 310P duo card: two chips
assert device.bind(1) == torch.device("npu", 1), device.bind(1)  # set_device(device_id + rank)
device.synchronize()
device.reset_peak_memory()
assert device.peak_memory_bytes() == 456
assert calls == [("set", "npu:1"), "sync", "reset"], calls
print("npu fake ok")
"""


def test_npu_calls_go_to_torch_npu_only_when_asked():
    proc = subprocess.run([sys.executable, "-c", NPU_FAKE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "npu fake ok" in proc.stdout, proc.stdout + proc.stderr


def test_this_process_has_no_npu_backend_named():
    """Guards the isolation above: a test that names privateuse1 here breaks torch.compile for the rest of the run."""
    assert torch._C._get_privateuse1_backend_name() == "privateuseone"


CHILD_PEAK = """
from starcoder_tp.device import Device
device = Device("cpu")
device.reset_peak_memory()
print(device.peak_memory_bytes())
"""


def test_a_cpu_ranks_peak_memory_is_its_own_not_its_parents():
    """A rank is spawned (fork, then exec) from a process that may hold gigabytes (pytest with a
    comparison's side B, a notebook): getrusage's peak counts the parent's RSS at the fork."""
    hog = torch.ones(1536 * 2**20 // 4)  # 1.5 GiB, every page written
    proc = subprocess.run([sys.executable, "-c", CHILD_PEAK], capture_output=True, text=True, timeout=300)
    del hog
    assert proc.returncode == 0, proc.stderr
    child_peak = int(proc.stdout.split()[-1])
    assert 0 < child_peak < 2**30, f"the child reports {child_peak / 2**20:.0f} MiB with a parent of 1.5 GiB"


def test_a_cpu_peak_counts_from_its_reset():
    from starcoder_tp.device import reset_peak_rss

    device = Device("cpu")
    if not reset_peak_rss():
        pytest.skip("this kernel offers no reset of the RSS high-water mark (/proc/self/clear_refs)")
    device.reset_peak_memory()
    before = device.peak_memory_bytes()
    block = torch.ones(256 * 2**20 // 4)  # 256 MiB written
    during = device.peak_memory_bytes()
    assert during >= before + 200 * 2**20, (before, during)
    del block  # a block this large is a mapping of its own: unmapped when freed
    device.reset_peak_memory()
    after = device.peak_memory_bytes()
    assert after <= during - 200 * 2**20, (during, after)
