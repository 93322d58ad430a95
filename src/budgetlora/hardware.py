"""What this machine offers, asked once: native bf16 on the CPU, the cores free for us, and a run's peak memory.

bf16 autocast halves a CPU step only where the processor multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere
it is emulated and slower than fp32, so `precision auto` asks the processor rather than guessing from its vendor.
"""
from __future__ import annotations

import functools
import os
import threading
import time

import torch


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AVX512-BF16 or AMX-BF16). torch's own probe where this
    build has one, else the kernel's CPU flags (Linux); False when neither answers."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(p is not None for p in probes):
        try:
            return any(bool(p()) for p in probes)
        except RuntimeError:
            pass
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(setting: str, device_type: str | None = None) -> str:
    """train.precision as it runs here: 'fp32', 'bf16' or 'fp16'. auto: bf16 on a GPU that has it and on a CPU with
    native bf16, fp32 elsewhere. fp16 has no CPU kernels worth having, so it runs as fp32 there."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "auto":
        if device_type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if setting == "fp16" and device_type != "cuda":
        return "fp32"
    return setting


def inference_dtype(setting: str, device) -> torch.dtype | None:
    """The autocast dtype for evaluation and prediction, or None for plain fp32: a run predicts in the precision it
    trains in on this device (bf16; fp16 on a GPU without bf16)."""
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda") or resolve_precision(setting, device_type) == "fp32":
        return None
    if device_type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def free_cores(window: float = 0.25) -> int:
    """The cores this process may use that other work is not using right now: the CPUs in its affinity mask less
    the cores found busy over a short window (Linux /proc/stat; a core counts as busy above 60% use), at least 1.
    The load average would be simpler but lags a minute behind, so it still counts a job that just ended.
    Oversubscribed OpenMP threads spin-wait on each other and slow a step several-fold, so fewer threads on a busy
    machine is faster, not slower."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    busy = busy_cores(window)
    return max(1, min(cores, cores - int(busy + 0.4)))


def busy_cores(window: float = 0.25) -> float:
    """How many cores' worth of time the whole machine spent working over `window` seconds (/proc/stat); where
    that cannot be read, the 1-minute load average."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0)  # total, idle + iowait

    try:
        (t0, i0), _ = sample(), time.sleep(window)
        t1, i1 = sample()
        ncpu = os.cpu_count() or 1
        return ncpu * (1 - (i1 - i0) / (t1 - t0)) if t1 > t0 else 0.0
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return 0.0


def set_threads(requested: int) -> int:
    """torch's intra-op threads for this process: `requested`, or with 0 the free cores (CPU only; a GPU run's
    host threads only feed the device). An explicit OMP_NUM_THREADS is respected. Returns the count in force."""
    if requested > 0:
        torch.set_num_threads(requested)
    elif not torch.cuda.is_available() and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(free_cores())
    return torch.get_num_threads()


def rss_bytes() -> int:
    """Resident memory of this process now (Linux /proc), else its peak so far (getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def process_peak_rss_mb() -> float:
    """The highest resident memory this process has reached (the kernel's own high-water mark: no sampling gap)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / 2**20 if sys.platform == "darwin" else peak / 2**10, 1)


class PeakMemory:
    """Peak resident memory while the block runs (sampled every 50 ms, so each run in a process gets its own
    peak), and the accelerator's peak allocation where there is one."""

    def __init__(self, every: float = 0.05):
        self.every, self.peak, self.start = every, 0, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> "PeakMemory":
        self.start = self.peak = rss_bytes()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.peak = max(self.peak, rss_bytes())

    def as_dict(self) -> dict:
        """The fields every run records (MiB)."""
        self.peak = max(self.peak, rss_bytes())
        out = {"peak_rss_mb": round(self.peak / 2**20, 1), "start_rss_mb": round(self.start / 2**20, 1)}
        if torch.cuda.is_available():
            out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out


def trim_memory() -> None:
    """Hand freed heap pages back to the OS (glibc only). Activations of many distinct batch shapes leave the
    allocator's arenas holding gigabytes that no tensor uses; this returns them between phases of a run. A collection
    first: a finished run's model and optimizer sit in reference cycles (hooks, closures) until one runs."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
