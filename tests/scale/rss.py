"""Memory readings for the child processes of the memory tests (Linux /proc).

VmHWM, not getrusage's ru_maxrss: a child started by subprocess (fork/vfork + exec) keeps the
ru_maxrss of the pytest process that started it (Linux preserves it across exec), so in a full
test session its "peak" is the parent's several GB and growth measured against it is zero.
VmHWM belongs to the child's own address space, which exec makes new.
"""

from __future__ import annotations

from pathlib import Path

AVAILABLE = Path("/proc/self/status").is_file()


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def current_rss() -> int:
    """Resident memory now (bytes)."""
    return _status_bytes("VmRSS")


def peak_rss() -> int:
    """Highest resident memory of this process since it was exec'd (bytes)."""
    return _status_bytes("VmHWM")
