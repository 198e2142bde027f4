"""Facts about this machine's CPUs that pick thread counts."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask, e.g. a container's CPU set)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity API on macOS and Windows
        return os.cpu_count() or 1


def physical_cores() -> int:
    """Physical cores this process may use: hyperthread siblings share one core's matmul units.

    ggml's matmul threads gain nothing from a sibling hyperthread and lose at every barrier when
    one is parked, so llama.cpp's own tools run one thread per physical core.
    """
    import psutil

    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    logical = psutil.cpu_count(logical=True) or physical
    allowed = usable_cpus()
    # Scale to the affinity mask: a container given half the logical CPUs gets about half the cores.
    return max(1, min(allowed, round(physical * allowed / logical)))
