"""Test helpers for the HTTP service: build a tiny shop (store + index) and run `shoprec serve` on a free port.

The server is the real thing: the `shoprec` console script in a subprocess, reached over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

SHOPREC = Path(sys.executable).with_name("shoprec")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_in_thread(app: Any) -> tuple[str, Any]:
    """Run an in-process `app` under uvicorn in a thread on a free loopback port: real HTTP to an app a test can
    still reach into. Returns (base url, server); set `server.should_exit = True` to stop it."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the service failed to start (its log above says why)")
        if time.monotonic() > deadline:
            raise RuntimeError("the service did not start within 120 s")
        time.sleep(0.1)
    return f"http://127.0.0.1:{server.config.port}", server


def tiny_shop(seed: int = 3) -> Any:
    """~200 items in 6 categories, 80 users: small enough to index in seconds, structured enough to recommend."""
    from retrieval.synthetic import SyntheticConfig, generate

    return generate(SyntheticConfig(seed=seed, n_items=200, n_users=80, n_categories=6))


def build_home(home: Path, shop: Any, store: str | None = None) -> None:
    """Ingest `shop` into the store (default <home>/shoprec.db) and build the index in <home>/index."""
    from shoprec.config import Settings
    from shoprec.service import Shoprec

    svc = Shoprec(Settings(home=home, store=store, sasrec_epochs=1))
    svc.store.ingest(shop.items, shop.interactions)
    svc.build_index(log=lambda m: None)
    svc.store.close()


def copy_home(template: Path, dst_home: Path) -> Path:
    """A private copy of a built home (store + index): each server writes only to its own."""
    shutil.copytree(template, dst_home, ignore=shutil.ignore_patterns("serve-*"))
    return dst_home


def copy_index(src_home: Path, dst_home: Path) -> None:
    """Reuse a built index for another store holding the same catalog (saves the embedding time)."""
    shutil.copytree(src_home / "index", dst_home / "index")


class Server:
    """`shoprec --home HOME [--store URL] --config CONFIG serve --port P` in a subprocess."""

    def __init__(
        self, home: Path, *, store: str | None = None, config: dict[str, Any] | None = None, workers: int = 1
    ) -> None:
        self.home, self.store, self.workers = home, store, workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = home / f"serve-{self.port}.toml"
        lines = ["[shoprec]"]
        for k, v in (config or {}).items():
            lines.append(f"{k} = {_toml(v)}")
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.log_path = home / f"serve-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 120.0) -> Server:
        cmd = [str(SHOPREC), "--home", str(self.home), "--config", str(self.config_path)]
        if self.store:
            cmd += ["--store", self.store]
        cmd += ["serve", "--port", str(self.port), "--log-level", "warning", "--workers", str(self.workers)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"shoprec serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"shoprec serve not ready within {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers, no flush: what a crash or an OOM kill does."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + "}"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
