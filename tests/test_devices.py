"""devices.py: device, precision and RNG-state choices, with the CUDA facts passed in (no GPU needed)."""
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import devices  # noqa: E402
import files  # noqa: E402


@pytest.mark.parametrize("requested, local_rank, cuda, expected", [
    (None, 0, False, "cpu"), (None, 3, True, "cuda:3"), ("cuda", 2, True, "cuda:2"),   # plain cuda: this rank's GPU
    ("cuda:1", 3, True, "cuda:1"), ("cpu", 1, True, "cpu"), (torch.device("cuda"), 1, True, "cuda:1")])
def test_a_plain_cuda_device_is_this_ranks_gpu(requested, local_rank, cuda, expected):
    device = devices.resolve_device(requested, local_rank, cuda)
    assert device == torch.device(expected) and (device.type != "cuda" or device.index is not None)


@pytest.mark.parametrize("name, device_type, native, expected", [
    ("auto", "cpu", False, "fp32"), ("auto", "cuda", True, "bf16"),
    ("auto", "cuda", False, "fp16"),        # V100, T4, 20-series: bf16 only emulated -> fp16 with a scaler
    ("bf16", "cuda", False, "bf16"), ("fp32", "cuda", True, "fp32")])
def test_auto_precision_needs_native_bf16(name, device_type, native, expected):
    assert devices.choose_precision(name, device_type, native) == expected


@pytest.mark.parametrize("name, device_type, native, exact, expected", [
    ("auto", "cpu", False, False, "fp32"), ("auto", "cuda", True, False, "bf16"),
    ("auto", "cuda", False, False, "fp16"),
    ("auto", "cuda", True, True, "fp32"),    # parity modes (--asr, --modelscope-padding): ModelScope's fp32
    ("bf16", "cuda", True, True, "bf16"),    # an explicit --dtype is used as given
    ("fp32", "cuda", True, False, "fp32")])
def test_decode_precision_is_half_on_a_gpu_unless_exact_fp32_is_wanted(name, device_type, native, exact, expected):
    assert devices.decode_precision(name, device_type, native, exact_fp32=exact) == expected


@pytest.mark.parametrize("device_type, exact, expected", [("cuda", False, True), ("cuda", True, False),
                                                          ("cpu", False, False)])
def test_tf32_only_on_cuda_and_not_where_exact_fp32_is_wanted(device_type, exact, expected):
    assert devices.tf32_allowed(device_type, exact_fp32=exact) is expected


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9: allow_tf32 flags")
def test_set_tf32_sets_the_cuda_switches_and_leaves_them_alone_off_cuda():
    # the switches are process-wide flags, settable without a GPU; the test puts them back
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = (matmul.fp32_precision, conv.fp32_precision)
    try:
        assert devices.set_tf32(torch.device("cuda", 0)) is True
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        assert devices.set_tf32(torch.device("cpu"), exact_fp32=True) is False       # CPU: untouched
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        assert devices.set_tf32(torch.device("cuda", 0), exact_fp32=True) is False
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


def test_bad_device_names_are_input_errors():
    for name in ("gpu0", "mps"):
        with pytest.raises(files.InputError, match=name):
            devices.parse_device(name)


class FakeCuda:
    """torch.cuda as far as rng_state/set_rng_state use it, with `count` GPUs."""

    def __init__(self, count):
        self.count, self.restored = count, []

    def device_count(self):
        return self.count

    def get_rng_state(self, device):
        return torch.full((4,), device.index, dtype=torch.uint8)

    def set_rng_state(self, state, device):
        if (device.index or 0) >= self.count:
            raise RuntimeError("no such device")            # what torch does for a GPU that is not there
        self.restored.append((device.index, state.tolist()))


def test_rng_state_holds_this_ranks_gpu_only_and_restores_on_fewer_gpus():
    node = FakeCuda(8)
    state = devices.rng_state(torch.device("cuda", 5), node)
    assert state["cuda"].tolist() == [5] * 4                   # rank 5's own stream, not all eight
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    one_gpu = FakeCuda(1)
    devices.set_rng_state({**devices.rng_state(torch.device("cuda", 0), one_gpu), "cuda": state["cuda"]},
                          torch.device("cuda", 0), one_gpu)   # resumed on a one-GPU machine as rank 0
    assert one_gpu.restored == [(0, [5] * 4)]
    # the checkpoints of before: every visible GPU's state in a list; a rank takes its own entry, if there is one
    old = {**state, "cuda": [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]}
    devices.set_rng_state(old, torch.device("cuda", 0), one_gpu)
    assert one_gpu.restored[-1] == (0, [0] * 4)
    devices.set_rng_state({**old, "cuda": old["cuda"][:1]}, torch.device("cuda", 3), FakeCuda(8))  # no entry: kept
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    saved = devices.rng_state(torch.device("cpu"))
    assert saved["cuda"] is None
    random.random(), np.random.rand(), torch.rand(1)
    devices.set_rng_state(saved, torch.device("cpu"))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_gpu_feeding_defaults(monkeypatch, tmp_path):
    """On a GPU: DataLoader workers (up to 4 a rank, one core left to each rank) and a disk feature cache shared by
    runs; on a CPU neither (the model takes the time); explicit values win."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))   # the cores this process may use
    assert devices.default_workers(cuda, 1) == 4 and devices.default_workers(cuda, 8) == 1
    assert devices.default_workers(cpu, 1) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)                           # the machine's: not ours
    assert devices.default_workers(cuda, 2) == 0                     # one core a rank: the loop keeps it
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert devices.feature_cache_dir("auto", cuda) == tmp_path / "image" / "fbank"
    assert devices.feature_cache_dir("auto", cpu) is None and devices.feature_cache_dir("none", cuda) is None
    assert devices.feature_cache_dir("/x/feats", cpu) == Path("/x/feats")


@pytest.mark.parametrize("name, device_type, native, warned", [
    ("bf16", "cpu", False, "AVX512-BF16"), ("bf16", "cpu", True, None), ("fp32", "cpu", False, None),
    ("bf16", "cuda", False, "--dtype fp16"), ("bf16", "cuda", True, None), ("fp16", "cuda", False, None)])
def test_bf16_where_it_is_only_emulated_is_said(name, device_type, native, warned):
    warning = devices.precision_warning(name, device_type, native)
    assert (warning is None) == (warned is None) and (warned is None or warned in warning)
    assert isinstance(devices.native_bf16(torch.device("cpu")), bool)     # this CPU's fact, whichever it is


def test_usable_gpu_memory_is_this_process_share_and_what_others_leave():
    gib = 2**30
    assert devices.usable_gpu_bytes(141 * gib, 140 * gib, fraction=24 / 141) == 24 * gib   # a 24 GiB share of an H200
    assert devices.usable_gpu_bytes(24 * gib, 10 * gib, allocated=2 * gib) == 12 * gib     # another process holds 14
    assert devices.usable_gpu_bytes(24 * gib, 23 * gib) == 23 * gib
    assert devices.gpu_bytes(torch.device("cpu")) == 0
