"""Remote backends' API keys: where they may come from, and never showing them.

A registry entry names its key, it never holds it (seed 004: secure API key storage):
- `api_key_env`: an environment variable of the manager whose name starts with
  `POOL_SECRET_`. Only those: an admin who could name any variable could send, say,
  `POOL_ADMIN_KEY` or a cloud credential to a URL of their choosing.
- `api_key_file`: a file name in the secrets folder (`$POOL_SECRETS_DIR`, else
  `~/.config/model-pool/secrets`), owned by the manager's user and readable by no one
  else (mode 0600 or 0400). A name, not a path, for the same reason.
The manager reads the key when the model loads and hands it to that model's worker with
its settings; workers never inherit the secrets. Errors name the variable or file, never
the value, and URLs are shown with their password masked (`redact_url`).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

SECRET_ENV_PREFIX = "POOL_SECRET_"
SECRETS_DIR_ENV = "POOL_SECRETS_DIR"
SECRET_ENV_PATTERN = re.compile(rf"^{SECRET_ENV_PREFIX}[A-Z0-9_]{{1,64}}$")
SECRET_FILE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_KEY_BYTES = 8192


class SecretError(Exception):
    """A key that cannot be read; the message names where it was looked for."""


def check_secret_env_name(name: str) -> str:
    """Raises ValueError unless `name` may hold a remote key."""
    if not SECRET_ENV_PATTERN.match(name):
        raise ValueError(
            f"api_key_env must name a variable {SECRET_ENV_PREFIX}<NAME> (capitals, digits "
            f"and _): the manager lends only those to remote backends, got {name!r}"
        )
    return name


def check_secret_file_name(name: str) -> str:
    """Raises ValueError unless `name` is a plain file name (no folders)."""
    if not SECRET_FILE_PATTERN.match(name) or ".." in name:
        raise ValueError(
            "api_key_file must be a file name in the secrets folder (letters, digits, "
            f". _ -; no '/'), got {name!r}"
        )
    return name


def secrets_dir() -> Path:
    configured = os.environ.get(SECRETS_DIR_ENV)
    return Path(configured) if configured else Path.home() / ".config" / "model-pool" / "secrets"


def read_api_key(settings: dict[str, Any]) -> str | None:
    """The key a remote model's entry names, or None when it names none.

    Raises SecretError when the variable is unset, or the file is missing, readable by
    others, not ours or empty.
    """
    env_name = settings.get("api_key_env")
    if env_name:
        value = os.environ.get(check_secret_env_name(str(env_name)), "").strip()
        if not value:
            raise SecretError(f"environment variable {env_name} (the API key) is not set")
        return value
    file_name = settings.get("api_key_file")
    if not file_name:
        return None
    path = secrets_dir() / check_secret_file_name(str(file_name))
    try:
        with path.open("rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise SecretError(f"API key file {path} is not a regular file")
            if info.st_uid != os.geteuid() or info.st_mode & 0o077:
                raise SecretError(
                    f"API key file {path} must belong to this user and be readable by no "
                    "one else (chmod 600)"
                )
            value = handle.read(MAX_KEY_BYTES).decode("utf-8", "replace").strip()
    except OSError as exc:
        raise SecretError(f"API key file {path} cannot be read: {exc.strerror}") from None
    if not value:
        raise SecretError(f"API key file {path} is empty")
    return value


def redact_url(url: str) -> str:
    """`url` with the password of its user part masked: `http://me:***@host/v1`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<an invalid URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
