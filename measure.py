"""measure.py: how the benchmarks measure: clocks (wall and process CPU time of repeated runs), peak memory (CUDA
allocator or the process's peak RSS), the machine's load and busiest other processes, and a measured matmul roof
for MFU. bench.py's sections time the project's own code with these; nothing here knows the model."""
import collections
import contextlib
import os
import re
import statistics
import subprocess
import time

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runs:
    """Wall-clock and process CPU time of repeated runs. CPU time (all threads of this process) is reported beside
    the wall clock because on a shared machine the wall clock also counts time other processes took."""

    def __init__(self):
        self.wall, self.cpu = [], []

    @contextlib.contextmanager
    def timed(self):
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.wall.append(time.perf_counter() - wall)
        self.cpu.append(time.process_time() - cpu)

    def report(self):
        return {"best_s": min(self.wall), "median_s": statistics.median(self.wall),
                "runs_s": [round(t, 4) for t in self.wall], "cpu_best_s": min(self.cpu)}


def _proc_status_kb(field):
    try:
        with open("/proc/self/status") as f:
            return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))
    except (OSError, AttributeError):
        return None


class PeakMemory:
    """Peak memory inside a `with` block. CUDA: torch.cuda.max_memory_allocated. CPU: the process's peak resident
    set (VmHWM), reset at entry through /proc/self/clear_refs (Linux); None where that is not possible."""

    def __init__(self, device):
        self.device, self.peak_mb, self.start_mb, self.reserved_mb = device, None, None, None

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")                          # 5 = reset the peak RSS to the current RSS
                self.start_mb = _proc_status_kb("VmRSS") / 1024
            except (OSError, TypeError):
                self.start_mb = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.reserved_mb = torch.cuda.max_memory_reserved(self.device) / 2**20
        elif self.start_mb is not None:
            self.peak_mb = _proc_status_kb("VmHWM") / 1024
        return False

    def report(self):
        if self.peak_mb is None:
            return {"peak_mb": None, "kind": "unavailable"}
        kind = "torch.cuda.max_memory_allocated" if self.device.type == "cuda" else "process peak RSS"
        return {"peak_mb": round(self.peak_mb, 1), "start_mb": round(self.start_mb, 1),
                "growth_mb": round(self.peak_mb - self.start_mb, 1), "kind": kind,
                "reserved_peak_mb": None if self.reserved_mb is None else round(self.reserved_mb, 1)}


def load_average():
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def busy_processes(limit=5):
    """Other processes using CPU right now (ps), so a report says what it competed with."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()[1:]
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out:
        pid, pcpu, etime, args = line.split(None, 3)
        if int(pid) != os.getpid() and float(pcpu) >= 10.0 and not args.startswith("ps "):
            rows.append(f"{pid} {pcpu}% {args[:100]}")
    return rows[:limit]


def matmul_peak_flops(device, dtype, seconds=1.0):
    """Measured dense matmul throughput (FLOP/s) for square matrices in dtype: the roof MFU is reported against."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    sync(device)
    iters, start = 0, time.perf_counter()
    while True:
        a @ b
        iters += 1
        if iters % 5 == 0:
            sync(device)
            if time.perf_counter() - start >= seconds:
                break
    return 2 * n**3 * iters / (time.perf_counter() - start)


class Stopwatch:
    """Seconds spent inside the wrapped callables, by name: where a long recording's decoding time goes."""

    def __init__(self):
        self.spent = collections.Counter()

    def wrap(self, owner, name, label):
        inner = getattr(owner, name)

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                self.spent[label] += time.perf_counter() - t
        setattr(owner, name, timed)
