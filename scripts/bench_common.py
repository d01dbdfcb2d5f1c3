"""What the benchmark and soak scripts share: the commit and the machine they record,
and starting a manager of their own in a folder."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def git(*args: str) -> str | None:
    """A read-only git query; None when git or the repository is not there."""
    try:
        done = subprocess.run(
            ["git", "--no-optional-locks", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def launch_manager(
    folder: Path, config: dict[str, Any], models: list[dict[str, Any]], python: str = ""
) -> subprocess.Popen[bytes]:
    """Write `config` and the registry of `models` into `folder` and start a manager on
    them, its output in `folder/manager.log`. The caller's POOL_* variables (keys, paths)
    are left out: they would change what is measured."""
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "registry.json").write_text(json.dumps({"models": models}, indent=2))
    env = {k: v for k, v in os.environ.items() if not k.startswith("POOL_")}
    with (folder / "manager.log").open("ab") as out:
        return subprocess.Popen(
            [
                *(python or sys.executable, "-m", "pool_manager"),
                *("--config", str(folder / "config.json")),
                *("--registry", str(folder / "registry.json")),
            ],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
