"""How many cores this process may use."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores the scheduler lets us run on (a container's or taskset's limit), at least 1.

    `os.cpu_count()` counts the machine's; threads beyond the allowed cores spin and wait.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1
