"""Starting a manager of one's own in a folder: its config and registry written there, its
output appended to `manager.log` there. The tests, the benchmarks and the soak all start
their managers this way, so they run the pool exactly as each other does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CONFIG_FILE = "model_pool_config.json"
REGISTRY_FILE = "model_pool_registry.json"
LOG_FILE = "manager.log"
# `python -m pool_manager` runs from the folder that holds this package, so it imports
# this very copy of it, installed or not.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def write_setup(folder: Path, config: dict[str, Any], models: list[dict[str, Any]]) -> None:
    """Write `config` and the registry of `models` into `folder`, as a manager reads them."""
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    (folder / REGISTRY_FILE).write_text(json.dumps({"models": models}, indent=2))


def manager_command(config: Path, registry: Path, python: str = "") -> list[str]:
    """The command line of a manager on these files (run it with `cwd=PACKAGE_ROOT`)."""
    return [
        *(python or sys.executable, "-m", "pool_manager"),
        *("--config", str(config)),
        *("--registry", str(registry)),
    ]


def start_manager_process(
    folder: Path, env: Mapping[str, str] | None = None, python: str = ""
) -> subprocess.Popen[bytes]:
    """Start `python -m pool_manager` on the config and registry in `folder`, its output
    appended to `folder/manager.log`. Does not wait for it to answer.

    `env` is the manager's whole environment; by default this process's less its POOL_*
    variables (keys, paths, the port), so that only the config says how the manager runs.
    `python` is the interpreter (default: this one). Raises OSError if it cannot start.
    """
    if env is None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("POOL_")}
    with (folder / LOG_FILE).open("ab") as out:
        return subprocess.Popen(
            manager_command(folder / CONFIG_FILE, folder / REGISTRY_FILE, python),
            cwd=PACKAGE_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
        )


def launch_manager(
    folder: Path,
    config: dict[str, Any],
    models: list[dict[str, Any]],
    env: Mapping[str, str] | None = None,
    python: str = "",
) -> subprocess.Popen[bytes]:
    """`write_setup` then `start_manager_process`: a new manager on `config` and `models`."""
    write_setup(folder, config, models)
    return start_manager_process(folder, env, python)
