"""`poolctl`: the pool manager's command line (written in full by a later change)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("poolctl: not implemented yet", file=sys.stderr)
    return 2
