"""`shoprec serve --workers N`: N uvicorn processes on one port, each listening on its own socket (SO_REUSEPORT).

Why not uvicorn's `workers=N`: its processes share ONE listening socket, and the process whose event loop wakes
first accepts every connection waiting. Clients that open their keep-alive connections together (a load
balancer's pool, a benchmark's 16 clients) then land on one process, and the other cores idle: measured on the
2-core box at 16 clients, retrieval mode, two workers, the same run gave 168 answers/s in one try (one process
busy) and 294 in the next. With SO_REUSEPORT the kernel spreads each new connection over the processes' sockets
by a hash of its address pair, independently of who is awake.

The supervisor (this process) serves nothing: it checks the port, starts the workers, restarts one that dies
while serving, stops them all on SIGINT/SIGTERM, and gives up (exit status of the worker) when a worker dies
during its start-up, which is a configuration error that a restart would only repeat.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import time
from typing import Any

# A worker that exits this soon after its start failed to start (bad settings, missing index): not restarted.
STARTUP_S = 20.0
# How long the workers get to finish their requests on SIGTERM before they are killed.
STOP_GRACE_S = 15.0


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _worker(host: str, port: int, uvicorn_kwargs: dict[str, Any]) -> None:
    """One worker process: its own SO_REUSEPORT socket, one uvicorn server on it."""
    import uvicorn

    config = uvicorn.Config(host=host, port=port, **uvicorn_kwargs)
    sock = _listening_socket(host, port)
    sock.listen(config.backlog)
    uvicorn.Server(config).run(sockets=[sock])


def serve_workers(host: str, port: int, workers: int, uvicorn_kwargs: dict[str, Any]) -> int:
    """Run `workers` worker processes until SIGINT/SIGTERM; the exit status for the command line.

    Raises OSError (address in use, no such address) before any worker starts."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise OSError("--workers > 1 needs SO_REUSEPORT (Linux, BSD, macOS); run one worker per process instead")
    # Bound, never listening: it reserves the port for the workers' sockets (same user, SO_REUSEPORT) and turns
    # "address in use" into one error here instead of N dying workers; a socket that does not listen receives
    # no connections.
    guard = _listening_socket(host, port)
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no forked threads or locks
    procs: list[Any] = [None] * workers
    started = [0.0] * workers
    stopping = False
    status = 0

    def start(i: int) -> None:
        procs[i] = ctx.Process(target=_worker, args=(host, port, uvicorn_kwargs), name=f"shoprec-worker-{i}")
        procs[i].start()
        started[i] = time.monotonic()

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i in range(workers):
            start(i)
        print(f"shoprec: {workers} workers on http://{host}:{port} (supervisor pid {os.getpid()})", flush=True)
        while not stopping:
            time.sleep(0.2)
            for i, p in enumerate(procs):
                if p.is_alive() or stopping:
                    continue
                code = p.exitcode
                if time.monotonic() - started[i] < STARTUP_S:
                    print(f"shoprec: worker {i} exited during start-up (status {code}); stopping", file=sys.stderr)
                    status = code or 1
                    stopping = True
                    break
                print(f"shoprec: worker {i} (pid {p.pid}) exited (status {code}); restarting it", file=sys.stderr)
                start(i)
    finally:
        for p in procs:
            if p is not None and p.is_alive():
                p.terminate()  # SIGTERM: uvicorn finishes the requests in flight
        deadline = time.monotonic() + STOP_GRACE_S
        for p in procs:
            if p is not None:
                p.join(max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    p.kill()
                    p.join()
        guard.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return status
