"""devices.py: where a run computes and how it draws random numbers: device, precision and RNG state choices.

Plain functions, with the machine's facts passed in where a test on a CPU must stand in for a GPU (CUDA present,
native bf16, the number of GPUs): resolve_device, choose_precision, decode_precision, tf32_allowed, rng_state /
set_rng_state take them as arguments.
"""
import os
import random
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import files


def parse_device(name):
    """--device of decode.py and train.py -> torch.device; a bad name or an absent GPU is an InputError."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise files.InputError(f"--device {name!r}: not a device; expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise files.InputError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise files.InputError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); use cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise files.InputError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def resolve_device(requested, local_rank, cuda_available):
    """--device (None, cpu, cuda, cuda:N) -> the device of this rank: default its GPU if there is one, else the CPU;
    a plain "cuda" means this rank's GPU, cuda:LOCAL_RANK (set_device and DDP's device_ids need an index)."""
    device = torch.device(requested) if requested is not None else torch.device("cuda" if cuda_available else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def choose_precision(name, device_type, bf16_native):
    """--dtype -> fp32 | bf16 | fp16. auto: fp32 off CUDA; bf16 where the GPU computes it natively (Ampere and
    later); fp16 with a gradient scaler on GPUs that would only emulate bf16 (V100, T4, 20-series): slow."""
    if name != "auto":
        return name
    return "fp32" if device_type != "cuda" else ("bf16" if bf16_native else "fp16")


def decode_precision(name, device_type, bf16_native, exact_fp32=False):
    """decode.py --dtype -> fp32 | bf16 | fp16, the dtype the model is cast to for inference. auto: fp32 where exact
    fp32 is wanted (the parity modes --asr and --modelscope-padding) and off CUDA, else as choose_precision (bf16
    where native, fp16 elsewhere; inference needs no gradient scaler). An explicit name is used as given."""
    return choose_precision("fp32" if name == "auto" and exact_fp32 else name, device_type, bf16_native)


def tf32_allowed(device_type, exact_fp32=False):
    """Whether fp32 matmuls and convolutions may run on TF32 tensor cores (a 10-bit mantissa for the products,
    fp32 sums: ~1e-3 relative error per product, several times faster): on CUDA, unless exact fp32 is wanted."""
    return device_type == "cuda" and not exact_fp32


def set_tf32(device, exact_fp32=False):
    """Sets this process's TF32 switches for fp32 matmuls and cuDNN convolutions by tf32_allowed. -> whether TF32
    is on. Off CUDA nothing is touched (CPU matmuls keep their own precision setting)."""
    if device.type != "cuda":
        return False
    allow = tf32_allowed(device.type, exact_fp32)
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):   # torch >= 2.9: mixing in allow_tf32 is an error
        torch.backends.cuda.matmul.fp32_precision = "tf32" if allow else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if allow else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = allow
        torch.backends.cudnn.allow_tf32 = allow
    return allow


def native_bf16(device):
    """Whether this device computes bf16 itself: a GPU of compute capability 8.0 on (torch.cuda.is_bf16_supported()
    also counts emulation), a CPU with AVX512-BF16 or AMX (what oneDNN's bf16 kernels need)."""
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a torch without oneDNN: no bf16 kernels either
            return False
    if device.type != "cuda":
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3: no such argument; bf16 tensor cores arrived with compute capability 8.0
        return torch.cuda.get_device_capability(device)[0] >= 8


def precision_warning(name, device_type, bf16_native):
    """A warning for bf16 asked for where it is only emulated, else None."""
    if name != "bf16" or bf16_native:
        return None
    if device_type == "cpu":
        return ("warning: this CPU has no bf16 instructions (AVX512-BF16 or AMX), so bf16 is emulated: its matrix "
                "products ran ~70x slower than fp32 on an AVX2 CPU (measured 2026-11-30); --dtype fp32 is faster")
    return "warning: this GPU emulates bf16 (compute capability < 8.0), which is slow; --dtype fp16 is faster"


def resolve_precision(name, device):
    """-> (name, autocast context, GradScaler)."""
    name = choose_precision(name, device.type, native_bf16(device))
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")
    return name, autocast, scaler


def rng_state(device, cuda=torch.cuda):
    """This rank's random streams: python, numpy, torch's CPU one and its own GPU's (only this rank's device, not
    every visible one: a run saved on an 8-GPU node may resume on one GPU). cuda: stands in for torch.cuda in tests."""
    np_state = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
            "torch": torch.get_rng_state(),
            "cuda": cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device, cuda=torch.cuda):
    """Restores rng_state(device). Checkpoints written before kept a list of every visible GPU's state: this
    device's entry is used when it exists. On a machine without that GPU the GPU stream is left as seeded."""
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    gpu = state.get("cuda")
    if isinstance(gpu, list):
        index = device.index or 0
        gpu = gpu[index] if device.type == "cuda" and index < len(gpu) else None
    if gpu is not None and device.type == "cuda" and (device.index or 0) < cuda.device_count():
        cuda.set_rng_state(gpu, device)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
# processes and input pipeline of a run


def start_distributed(device, backend=None, hours=3.0):
    """-> (device, rank, world size). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK. backend: nccl on GPUs, gloo on CPUs
    unless given (decoding exchanges Python objects: gloo). hours: how long a rank may wait for the others (training:
    rank 0 evaluates alone while they wait at a barrier; decoding: ranks with a lighter shard wait for the rest)."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.is_available())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"),
                                timeout=timedelta(hours=hours))
    return device, rank, world


def usable_gpu_bytes(total, free, fraction=1.0, allocated=0):
    """GPU memory this process may fill: its share of the card (torch.cuda.set_per_process_memory_fraction), and no
    more than what other processes leave free (free excludes what this process already holds)."""
    return min(total * fraction, free + allocated)


def gpu_bytes(device):
    """usable_gpu_bytes of this process's GPU; 0 on a CPU."""
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return usable_gpu_bytes(total, free, torch.cuda.get_per_process_memory_fraction(device),
                            torch.cuda.memory_reserved(device))


def default_workers(device, ranks_on_this_machine):
    """DataLoader workers per rank when --workers is not given: on a GPU up to 4, as the CPU cores allow (one core
    stays with each rank's own loop), so that fbank and collation overlap the GPU's work; on a CPU 0 (the cores
    already run the model)."""
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores // max(1, ranks_on_this_machine) - 1))


def feature_cache_dir(name, device):
    """--feature-cache -> folder or None: auto = a cache shared by runs on a GPU (where recomputing every row's
    fbank every epoch would starve it), none on a CPU (the model, not fbank, takes the time)."""
    if name == "none" or (name == "auto" and device.type != "cuda"):
        return None
    if name == "auto":
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "image" / "fbank"
    return Path(name)
