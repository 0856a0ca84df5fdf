"""Shared vLLM fixtures for the tests: ONE in-process engine and ONE real `vllm serve` per test session.

Both need vllm (the `.venv-vllm` environment, `make venv-vllm`); where it is missing, `require_vllm()` skips. The
server is started exactly as a user starts it, ``shoprec serve-llm`` on 127.0.0.1, with two adapters: the shipped
demo adapter and a perturbed copy (its LoRA B weights tripled, made in a temporary folder), and stopped (its whole
process group) when the session ends. Everything runs in float32 so label scores can be compared with the
transformers backend's.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO_ADAPTER = REPO / "generator" / "adapters" / "demo"
HAS_VLLM = importlib.util.find_spec("vllm") is not None
SERVER_START_S = 300  # engine start ~20-50 s on 2 free cores; far longer while other jobs load the machine


def require_vllm() -> None:
    if not HAS_VLLM:
        pytest.skip("vllm is not installed here: these tests run in .venv-vllm (`make test-vllm`)")


@functools.cache
def adapters() -> dict[str, str]:
    """name -> folder: the demo adapter and a perturbed copy of it (so the two give different outputs)."""
    from safetensors.torch import load_file, save_file

    tmp = Path(tempfile.mkdtemp(prefix="shoprec-adapters-"))
    atexit.register(shutil.rmtree, tmp, True)
    copy = tmp / "demo-x3"
    shutil.copytree(DEMO_ADAPTER, copy)
    weights = load_file(str(copy / "adapter_model.safetensors"))
    save_file({k: v * 3 if "lora_B" in k else v for k, v in weights.items()}, str(copy / "adapter_model.safetensors"))
    return {"demo": str(DEMO_ADAPTER), "demo-x3": str(copy)}


@functools.cache
def vllm_backend() -> Any:
    """The in-process vLLM backend on the base model (float32), started once per session."""
    require_vllm()
    from generator.backends import make_backend

    return make_backend("vllm", dtype="float32")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@functools.cache
def vllm_server() -> str:
    """Start `shoprec serve-llm` on a free loopback port with both adapters; its base URL once it is healthy."""
    require_vllm()
    import httpx

    port = _free_port()
    cmd = [str(Path(sys.executable).parent / "shoprec"), "serve-llm", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--dtype", "float32"]
    for name, folder in adapters().items():
        cmd += ["--adapter", f"{name}={folder}"]
    log = tempfile.NamedTemporaryFile(prefix="vllm-serve-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)

    def stop() -> None:  # the server and its engine-core child: the process group we started
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    atexit.register(stop)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"`{' '.join(cmd)}` exited with {proc.returncode}:\n{Path(log.name).read_text()[-3000:]}"
            )
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop()
    raise RuntimeError(
        f"vllm serve did not become healthy in {SERVER_START_S} s:\n{Path(log.name).read_text()[-3000:]}"
    )


@functools.cache
def vllm_server_backend() -> Any:
    """The `vllm-server` backend on the session's server, base model."""
    from generator.backends import make_backend

    return make_backend("vllm-server", base_url=vllm_server(), dtype="float32")
