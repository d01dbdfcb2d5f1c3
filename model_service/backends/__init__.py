"""Inference backends a worker can host; one module per backend."""

from model_service.backends.base import Backend, BackendError, RenderedPrompt, SamplingParams

__all__ = ["Backend", "BackendError", "RenderedPrompt", "SamplingParams", "create_backend"]


def create_backend(settings: dict[str, object]) -> Backend:
    """Build the backend a model's registry entry names (not loaded yet)."""
    kind = settings.get("backend", "llama_cpp")
    if kind == "llama_cpp":
        from model_service.backends.llama_cpp import LlamaCppBackend

        return LlamaCppBackend(settings)
    raise BackendError(f"unknown backend {kind!r}")
