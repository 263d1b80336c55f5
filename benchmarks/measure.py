"""Timing and peak-memory measurement on CPU and CUDA.

Peak memory:

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated before.
- CPU: the resident-set high-water mark of the process (``VmHWM``, reset by writing ``5`` to
  ``/proc/self/clear_refs``) minus the resident set before the call. During the measurement glibc is told
  (``mallopt``) to serve every block of 64 KiB or more with ``mmap`` and to return freed memory at once, so the
  resident set follows the live tensor bytes and its high-water mark is their peak (plus the few MB of
  small-object heap). Timing runs with glibc's steady-state settings instead (page faults from fresh ``mmap``
  calls would distort it). Linux only; elsewhere memory is reported as ``None``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_LIBC = None


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    return (
        _LIBC is not None
        and _LIBC.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
        and _LIBC.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    )


def _timing_mode() -> None:
    """glibc's steady state: blocks up to 32 MiB reused from the heap (what a long training run sees)."""
    _mallopt(32 << 20, 256 << 20)


def _memory_mode() -> bool:
    """Every block of 64 KiB or more mmap-ed and returned at free: resident set = live bytes."""
    return _mallopt(1 << 16, 1 << 16)


def _configure_glibc() -> bool:
    global _LIBC
    if not sys.platform.startswith("linux"):
        return False
    try:
        _LIBC = ctypes.CDLL("libc.so.6")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        ok = _memory_mode()
        _timing_mode()
        return ok
    except (OSError, AttributeError):
        _LIBC = None
        return False


_CPU_PEAK_OK = _configure_glibc()
CPU_MEMORY_METHOD = (
    "peak resident set (VmHWM reset via /proc/self/clear_refs) with glibc mmap threshold 64 KiB"
    if _CPU_PEAK_OK
    else "unavailable on this platform"
)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated by ``fn()`` above what was live before it (its result included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak
    if not _CPU_PEAK_OK:
        fn()
        return None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    result = fn()
    peak = _status("VmHWM") - before
    del result
    return max(peak, 0)


class memory_mode:
    """Context for CPU peak measurements: glibc mmap-s every block ≥ 64 KiB and frees it at once.

    Enter it before building the inputs of the measured calls (blocks allocated under the timing settings may
    stay resident in the heap and hide or inflate later peaks); timing runs outside it.
    """

    def __enter__(self) -> None:
        if _CPU_PEAK_OK:
            _memory_mode()
            _LIBC.malloc_trim(0)

    def __exit__(self, *exc: object) -> None:
        if _CPU_PEAK_OK:
            _timing_mode()


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn`` (CUDA events on the measured device's stream on GPU)."""
    if device.type == "cuda":
        with torch.cuda.device(device):  # events on the measured device's stream (cuda:1 too)
            stream = torch.cuda.current_stream(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved_median_times(
    fns: Mapping[str, Callable[[], object]], device: torch.device, warmup: int = 1, repeats: int = 3
) -> dict[str, float]:
    """Median seconds of each ``fn`` over ``repeats`` rounds that call every ``fn`` once, after ``warmup`` calls of
    each.

    Round-robin instead of one ``fn`` after the other: a slow drift of the machine (another job, a shared VM's
    neighbours) is spread over every ``fn`` instead of being charged to whichever ran at the time, so the ratios
    between them (a head against the conv) keep their meaning on a noisy machine.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_seconds(fn, device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def median_time(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 3) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls (CUDA events on GPU)."""
    return interleaved_median_times({"fn": fn}, device, warmup, repeats)["fn"]


#: aten ops that make the host wait for the device on CUDA (a scalar read, or an output size that depends on
#: the data: ``.item()``, ``bool(t)``, ``nonzero`` (boolean indexing), ``unique``, ``masked_select``)
SYNC_OPS = frozenset(
    {
        "aten::_local_scalar_dense",
        "aten::is_nonzero",
        "aten::nonzero",
        "aten::_unique",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
        "aten::masked_select",
    }
)
#: leaf aten ops that only make views or allocate (no kernel on CUDA)
_NO_KERNEL = frozenset(
    "aten::" + name
    for name in (
        "empty empty_strided empty_like view as_strided reshape _reshape_alias _unsafe_view permute transpose t "
        "expand expand_as slice select unsqueeze squeeze detach alias lift_fresh unbind split split_with_sizes "
        "chunk narrow view_as flatten unflatten resize_ set_ result_type broadcast_tensors numpy_T contiguous"
    ).split()
)


def _inside_sync(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in SYNC_OPS:
            return True
        parent = parent.cpu_parent
    return False


class _CrossDeviceCopies(TorchDispatchMode):
    """Counts the ops that copy a tensor between devices (``.to(device)``, ``copy_`` from another device): on
    CUDA a host-to-device copy from pageable memory blocks the host, a device-to-host copy waits for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in ("_to_copy", "copy_", "to") and isinstance(args[0], torch.Tensor):
            source = args[1] if name == "copy_" else args[0]
            target = args[0] if name == "copy_" else out
            if isinstance(source, torch.Tensor) and isinstance(target, torch.Tensor) and source.device != target.device:
                self.copies += 1
        return out


def count_ops(fn: Callable[[], object]) -> dict[str, int]:
    """Kernel-launching aten ops and host-synchronising ops of one call of ``fn`` (torch profiler, CPU).

    ``ops`` counts the leaf aten ops that compute (views and allocations excluded): on CUDA each is at least one
    kernel launch. ``syncs`` counts the :data:`SYNC_OPS` calls (on CUDA each waits for the device to drain) and
    the copies between devices. Device-independent, so a CPU run already tells how a step will behave on a GPU.
    """
    from torch.profiler import ProfilerActivity, profile

    copies = _CrossDeviceCopies()
    with profile(activities=[ProfilerActivity.CPU]) as prof, copies:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    ops = sum(1 for e in events if not e.cpu_children and e.name not in _NO_KERNEL)
    syncs = sum(1 for e in events if e.name in SYNC_OPS and not _inside_sync(e))
    return {"ops": ops, "syncs": syncs + copies.copies}


#: the dispatched aten ops that only make views or allocate (no kernel on CUDA), left out by :func:`count_aten_ops`
#: (the set of the op counts that first measured the heads on an H200, so the figures compare; and split_with_sizes)
_VIEWS = frozenset(
    "view _unsafe_view reshape expand permute transpose t unsqueeze squeeze slice select as_strided alias detach "
    "split split_with_sizes chunk unbind narrow diagonal unflatten flatten empty empty_like new_empty lift_fresh "
    "_to_copy_noop".split()
)


class _AtenOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in _VIEWS:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def count_aten_ops(fn: Callable[[], object]) -> int:
    """The aten ops one call of ``fn`` dispatches, views and allocations excluded: each is at least one kernel
    launch on CUDA. Runs on any device, ``meta`` included (no data: a whole model's step in seconds, no GPU)."""
    counter = _AtenOps()
    with counter:
        fn()
    return counter.ops


def count_cuda_kernels(fn: Callable[[], object]) -> int:
    """CUDA kernels one call of ``fn`` launches, as the profiler records them (memory copies and sets included)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)


class _GemmFlops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry = flop_registry
        self.flops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func.overloadpacket)
        if formula is not None:
            dtype = next(str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, torch.Tensor))
            self.flops[dtype] = self.flops.get(dtype, 0) + int(formula(*args, **kwargs, out_val=out))
        return out


def gemm_flops_by_dtype(fn: Callable[[], object]) -> dict[str, int]:
    """The matrix-product work (matmuls, convolutions and their backward: ``torch.utils.flop_counter``'s formulas)
    one call of ``fn`` dispatches, by the dtype of the products' inputs: ``{"bfloat16": flops, "float32": ...}``.
    Under autocast it tells which products still run in float32."""
    counter = _GemmFlops()
    with counter:
        fn()
    return counter.flops


def machine(device: torch.device) -> dict[str, object]:
    """What a result file records of the machine: the device's name, torch's threads, the CPUs, torch's version."""
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} CPU",
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
