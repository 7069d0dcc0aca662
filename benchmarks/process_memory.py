"""Peak memory of the running process, for benchmarks that run each measurement in a process of its own."""

import resource
from pathlib import Path


def peak_memory_mb() -> float:
    """This process's peak resident memory. Not getrusage's ru_maxrss, which a process started by fork and exec
    inherits from its parent's size at the fork; the kernel's high-water mark starts again at exec."""
    status = Path("/proc/self/status")
    if status.exists():
        return int(next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
