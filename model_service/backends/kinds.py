"""What each backend kind can do, what its registry entry needs, and how its server is
probed: the one place to look (and to change) when a kind is added.

The manager validates registry entries and probes servers with these; the worker picks
how to serve a model and which endpoints answer 400 with them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BackendKind:
    name: str
    # Runs the model in the worker's own process (weights in its memory, an engine
    # thread), rather than forwarding to a server that runs it.
    local: bool
    # What the worker serves for it; what it cannot serve answers 400.
    generates: bool = True  # /v1/chat/completions, /v1/completions
    embeds: bool = True  # /v1/embeddings
    tools: bool = True  # `tools` on chat
    # Registry fields of which at least one must be set, with what to say otherwise.
    needs_one_of: tuple[str, ...] = ()
    # The path (after the server's base URL) that says the server is up (None: nothing
    # to probe), and the config key giving a default base URL.
    probe_path: str | None = None
    default_base_url_key: str | None = None

    def check(self, settings: Mapping[str, Any]) -> None:
        """Raise ValueError when the entry lacks what this kind needs."""
        if self.needs_one_of and not any(settings.get(f) for f in self.needs_one_of):
            fields = " or ".join(self.needs_one_of)
            raise ValueError(f"a {self.name} model needs {fields}")

    def base_url(self, settings: Mapping[str, Any], config: Mapping[str, Any]) -> str | None:
        """The server's base URL for an entry (None for a local kind)."""
        base = settings.get("base_url")
        if not base and self.default_base_url_key:
            base = config.get(self.default_base_url_key)
        return str(base).rstrip("/") if base else None

    def probe_url(self, settings: Mapping[str, Any], config: Mapping[str, Any]) -> str | None:
        base = self.base_url(settings, config)
        return f"{base}{self.probe_path}" if base and self.probe_path else None


KINDS: dict[str, BackendKind] = {
    kind.name: kind
    for kind in (
        # Local kinds also count a prompt's tokens (/v1/count_tokens): the tokenizer is here.
        BackendKind("llama_cpp", local=True, needs_one_of=("model_path", "package_file")),
        # Any OpenAI-compatible server; requests go through as they are.
        BackendKind("openai", local=False, needs_one_of=("base_url",), probe_path="/models"),
        # An Ollama server; requests are translated to its /api/chat, /api/embed.
        BackendKind(
            "ollama",
            local=False,
            probe_path="/api/version",
            default_base_url_key="ollama_base_url",
        ),
    )
}


def kind_of(name: str) -> BackendKind:
    """The kind named `name`. Raises ValueError for an unknown one."""
    try:
        return KINDS[name]
    except KeyError:
        known = ", ".join(KINDS)
        raise ValueError(f"unknown backend {name!r}: one of {known}") from None
