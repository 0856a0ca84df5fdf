"""`shoprec serve --workers 2` over real HTTP: both worker processes take connections (each listens on its own
SO_REUSEPORT socket), a worker killed while serving is restarted, SIGTERM stops them all, and a taken port is one
clear error before any worker starts."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.api_server import SHOPREC, Server, copy_home

pytestmark = pytest.mark.slow  # two worker processes load the index


def _pids_serving(url: str, connections: int) -> set[int]:
    """The worker pid behind each of `connections` fresh TCP connections (one request on each)."""
    pids = set()
    for _ in range(connections):
        with httpx.Client(base_url=url, timeout=30) as http:  # a new client: a new connection, a new source port
            r = http.get("/healthz")
            assert r.status_code == 200
            pids.add(r.json()["pid"])
    return pids


def test_two_workers_share_connections_restart_and_stop(tmp_path: Path, api_shop_home: Path) -> None:
    home = copy_home(api_shop_home, tmp_path / "home")
    server = Server(home, config={"llm_backend": "none", "allow_anonymous_local": True}, workers=2).start()
    try:
        assert server.proc is not None
        supervisor = psutil.Process(server.proc.pid)
        workers = {c.pid for c in supervisor.children()}
        # 24 connections: each lands on either socket by the kernel's hash, so all on one worker has p = 2^-23
        seen = _pids_serving(server.url, 24)
        assert len(seen) == 2, f"one worker took every connection: {seen}"
        assert seen <= workers
        r = httpx.post(server.url + "/v1/recommend", json={"user": "u-workers", "k": 3}, timeout=60)
        assert r.status_code == 200 and len(r.json()["picks"]) == 3

        victim = sorted(seen)[0]
        time.sleep(max(0.0, 21 - (time.time() - supervisor.create_time())))  # past the start-up window
        psutil.Process(victim).kill()  # a crash while serving: the supervisor starts a new worker
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                now = _pids_serving(server.url, 16)
            except (httpx.HTTPError, AssertionError):
                now = set()
            if len(now) == 2 and victim not in now:
                break
            time.sleep(1)
        else:
            pytest.fail(f"the killed worker was not replaced:\n{server.log()}")

        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in now | seen)
    finally:
        server.stop()


def test_a_taken_port_is_one_clear_error(tmp_path: Path, api_shop_home: Path) -> None:
    home = copy_home(api_shop_home, tmp_path / "home")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(
            [str(SHOPREC), "--home", str(home), "serve", "--port", str(port), "--workers", "2"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode != 0
    assert f"--port {port}" in r.stdout + r.stderr and "Fix:" in r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
