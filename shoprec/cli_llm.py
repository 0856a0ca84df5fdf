"""`shoprec serve-llm`: start the OpenAI-compatible vLLM server that the `vllm-server` backend talks to.

It converts the configured model once (the embedded GGUF becomes an HF folder: vLLM on CPU cannot read GGUF), then
replaces itself with exactly `generator.backends.vllm_server.serve_command`: ``vllm serve FOLDER`` with shoprec's
logits processor, prefix caching and each adapter as a LoRA module. Adapters served: the configured `adapter`, the
`adapters` table of the settings, and every ``--adapter NAME=FOLDER``. Needs vllm in the same environment
(`make venv-vllm`; docs/vllm.md). Point shoprec at it with ``SHOPREC_LLM_BACKEND=vllm-server`` (and
``SHOPREC_VLLM_URL`` when it is not http://127.0.0.1:8000).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer


def parse_adapters(items: list[str]) -> dict[str, str]:
    """'NAME=FOLDER' (or a bare FOLDER, named after it) -> {name: folder}; ValueError naming a bad item."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep:
            name, folder = Path(item).name, item
        if not name or not folder:
            raise ValueError(f"--adapter {item!r}: expected NAME=FOLDER. Fix: e.g. --adapter demo=path/to/adapter")
        if not (Path(folder).expanduser() / "adapter_config.json").is_file():
            raise ValueError(f"--adapter {item!r}: {folder} has no adapter_config.json. Fix: pass a PEFT folder.")
        out[name] = folder
    return out


def register(app: typer.Typer, friendly_errors: Callable[[Any], Any]) -> None:
    cli: Any = sys.modules[friendly_errors.__module__]

    @app.command("serve-llm")
    @friendly_errors
    def serve_llm(
        host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
        port: int = typer.Option(8000, "--port", min=1, max=65535),
        adapter: list[str] = typer.Option([], "--adapter", help="NAME=FOLDER of a LoRA adapter to serve (repeatable)."),
        dtype: str = typer.Option("auto", "--dtype", help="auto | bfloat16 | float32 (auto: bf16 where native)."),
        max_model_len: int = typer.Option(4096, "--max-model-len", min=256, help="Longest prompt + output, tokens."),
        max_loras: int = typer.Option(4, "--max-loras", min=1, help="Adapters one engine step may mix."),
        print_only: bool = typer.Option(False, "--print", help="Print the vllm command and exit."),
    ) -> None:
        """Start `vllm serve` on the converted model with shoprec's logits processor and the adapters."""
        from generator.backends.vllm_backend import lora_rank
        from generator.backends.vllm_server import serve_command, serve_env
        from generator.model import ModelSpec, resolve_dtype, resolve_model_path

        settings = cli._settings()
        adapters = dict(settings.adapters)
        if settings.adapter:
            adapters.setdefault(Path(settings.adapter).name, settings.adapter)
        adapters.update(parse_adapters(adapter))
        dt = resolve_dtype(dtype)  # type: ignore[arg-type]
        path = resolve_model_path(ModelSpec(model=settings.llm_model), dtype=dt)
        rank = max([16, *(lora_rank(p) for p in adapters.values())])
        cmd = serve_command(
            path,
            adapters,
            host=host,
            port=port,
            dtype=dt,
            max_model_len=max_model_len,
            max_loras=max_loras,
            max_lora_rank=rank,
        )
        if print_only:
            sys.stdout.write(shlex.join(cmd) + "\n")
            return
        sys.stdout.flush()
        os.execve(cmd[0], cmd, serve_env())
