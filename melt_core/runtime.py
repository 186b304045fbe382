"""Devices and memory measurement for generation and profiling.

Peak memory is measured where it can be read exactly: on CUDA the caching allocator's peak
(``torch.cuda.max_memory_allocated``); on CPU the process's resident set size (RSS). The kernel's
own RSS peak (``getrusage``) covers the whole process life and cannot be reset, so ``PeakMemory``
samples the current RSS from a background thread to get the peak of one block of work.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

import torch

from .errors import DeviceNotAvailableError, InvalidArgumentError, NotEnoughMemoryError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; a device
    this machine does not have is an error, not a silent fallback."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise InvalidArgumentError(f"unknown device {str(name)!r}; use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceNotAvailableError(
                f"device {str(name)!r} is not available: torch {torch.__version__} sees no CUDA GPU; use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceNotAvailableError(
                f"device {str(name)!r} is not available: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceNotAvailableError(f"device {str(name)!r} is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise InvalidArgumentError(f"device type {device.type!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


THREADS_ENV = "MELT_THREADS"
TORCH_DEFAULT_THREADS = torch.get_num_threads()  # torch's choice (physical cores), before anyone changes it


def default_threads() -> int:
    """CPU threads for torch when none are asked for: ``$MELT_THREADS``, else the cores this process
    may use, shared among the processes of a distributed launch, less those other work keeps busy
    (the 1-minute load average). torch's own default (every physical core) collapses when another
    job holds some of them: its threads then wait on each other."""
    if os.environ.get(THREADS_ENV):
        text = os.environ[THREADS_ENV]
        if not text.strip().isdigit():
            raise InvalidArgumentError(f"{THREADS_ENV} must be a whole number of threads, got {text!r}")
        return validate_threads(int(text), THREADS_ENV)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(TORCH_DEFAULT_THREADS, cores - busy) // processes)


def validate_threads(threads: int, name: str = "--threads") -> int:
    if threads < 1:
        raise InvalidArgumentError(f"{name} must be >= 1, got {threads}")
    limit = 4 * (os.cpu_count() or 1)  # beyond that threads only wait; thread pools fail to start at 10^5
    if threads > limit:
        raise InvalidArgumentError(f"{name} must be at most {limit} (4 x the {os.cpu_count()} cores), got {threads}")
    return threads


def set_threads(threads: int | None = None) -> int:
    """Use ``threads`` CPU threads for torch's kernels (None: ``default_threads()``); returns the count."""
    threads = default_threads() if threads is None else validate_threads(threads)
    torch.set_num_threads(threads)
    return threads


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so that wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def current_rss_bytes() -> int | None:
    """The process's resident set size now (Linux ``/proc/self/statm``); None where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def release_free_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``) so that the RSS baseline does
    not include memory a later allocation would silently reuse; a no-op elsewhere."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_rss_bytes() -> int | None:
    """The process's peak RSS over its whole life (``getrusage``); None where unavailable."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def memory_now(device: torch.device) -> int:
    """Memory in use now: CUDA allocated bytes, or the process RSS (0 where unreadable)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return current_rss_bytes() or 0


def peak_memory_so_far(device: torch.device) -> tuple[int | None, str]:
    """(peak bytes, what was measured): the CUDA allocator's peak since the last reset, or the
    process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_allocator_peak"
    return peak_rss_bytes(), "process_peak_rss"


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB' (binary units), for messages."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _meminfo_available() -> int | None:
    """MemAvailable (free RAM plus what the kernel can reclaim), else free pages; None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    """What a cgroup v2 memory limit leaves this process's group (a container's limit); None: no limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        return None if limit == "max" else max(0, int(limit) - int(used))
    except (OSError, ValueError):
        return None


def available_memory(device: torch.device | str) -> int | None:
    """Bytes a new allocation on ``device`` can use now: free CUDA memory, or the RAM the kernel
    reports as available (within a container's limit); None where melt cannot tell (mps)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    known = [n for n in (_meminfo_available(), _cgroup_available()) if n is not None]
    return min(known) if known else None


def check_fits(nbytes: int, device: torch.device | str, what: str, lower: str = "") -> None:
    """Refuse an allocation of ``nbytes`` that cannot fit in ``device``'s available memory, before
    it is made: the kernel would otherwise kill the process, or swap it to a standstill. ``what``
    names the allocation; ``lower``: the flags that size it (``--loops, --batch-size``)."""
    device = torch.device(device)
    if device.type == "meta":
        return
    available = available_memory(device)
    if available is not None and nbytes > available:
        hint = f"; lower {lower}" if lower else ""
        raise NotEnoughMemoryError(
            f"{what} needs {human_bytes(nbytes)}, but only {human_bytes(available)} of memory is available "
            f"on {device}{hint}"
        )


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class PeakMemory:
    """Peak memory of a block of work, and its baseline just before it.

    ``with PeakMemory(device) as pm: ...`` then ``pm.baseline``, ``pm.peak``, ``pm.delta`` (peak -
    baseline) in bytes and ``pm.kind``. On CUDA: allocated bytes and the allocator's peak (exact).
    On CPU: the RSS sampled every ``interval`` seconds by a thread (torch kernels release the GIL)
    and at every ``sample()`` call; a peak shorter than the interval can be missed.
    """

    def __init__(self, device: torch.device, interval: float = 0.0005) -> None:
        self.device = device
        self.interval = interval
        self.kind = "cuda_allocated" if device.type == "cuda" else "process_rss"
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        if self.device.type != "cuda":
            rss = current_rss_bytes()
            if rss is not None:
                self.peak = max(self.peak, rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.empty_cache()
            self.baseline = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            release_free_heap()
            rss = current_rss_bytes()
            if rss is None:  # no /proc: fall back to the (unresettable) lifetime peak
                self.kind = "process_peak_rss"
                rss = peak_rss_bytes() or 0
            self.baseline = rss
            self.peak = rss
            if self.kind == "process_rss":
                self._thread = threading.Thread(target=self._run, daemon=True)
                self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.sample()
        else:
            self.peak = max(self.peak, peak_rss_bytes() or 0)

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.baseline)
