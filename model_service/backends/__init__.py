"""Inference backends a worker can host; one module per backend."""

from typing import Any

from model_service.backends.base import Backend, BackendError, RenderedPrompt, SamplingParams

__all__ = ["Backend", "BackendError", "RenderedPrompt", "SamplingParams", "create_backend"]


def create_backend(settings: dict[str, object], preloaded: Any = None) -> Backend:
    """Build the backend a model's registry entry names (not loaded yet).

    `preloaded`: its weights, if a spare loaded them ahead (model_service.preload).
    """
    kind = settings.get("backend", "llama_cpp")
    if kind == "llama_cpp":
        from model_service.backends.llama_cpp import LlamaCppBackend

        return LlamaCppBackend(settings, preloaded)
    raise BackendError(f"unknown backend {kind!r}")
