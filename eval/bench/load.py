"""Load benchmark of the HTTP service: throughput and latency of POST /v1/recommend under concurrent clients.

Run: `python -m eval.bench.load --out eval/results/load.json` (the issue's protocol: 2 minutes per level, ~17 min
in all with startup). `--duration 20` for a quick run. Writes the JSON and a plot (same name, .png).

What it does: builds (or reuses, `--home`) the synthetic demo shop's store and index, starts `shoprec serve` in a
subprocess on 127.0.0.1 with the real model (SmolLM2-135M, the configured adapter), then for each mode (retrieval,
score) and each level of concurrency (1, 4, 16, 64 clients) runs closed-loop async httpx clients for `--duration`
seconds or `--max-requests` requests, whichever comes first: each client sends a request, waits for the answer,
sends the next. Users are drawn from the store's users (one in ten unknown: cold start), seeded. A 429 or 503 with
Retry-After (the server's `--overload reject`) is obeyed: the client waits as told, then sends the same request
again, as urllib3's Retry does.

Reported per level: requests, throughput (answers/s), latency p50/p90/p99/max (ms, client side, over every
answer), status counts (5xx counted apart), the fallback rate (answers flagged `fallback`) and the causes, the
model's own answers per second (what batching is judged on), and with retries the shopper's wait (first try to
answer) and the Retry-After waits obeyed. The
server's limits are the defaults (`request_budget_s` 10, `llm_queue_max` 64, `llm_batch_max` 16) unless flags
say otherwise; keys are off (`allow_anonymous_local` on loopback), so the rate limiter is not what is measured.

The box may be shared: the JSON records the CPU count and the load average before and after each level.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from eval.bench import cpu_facts

LEVELS = (1, 4, 16, 64)
MODES = ("retrieval", "score")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_shop(home: Path, n_items: int, seed: int) -> None:
    """The synthetic shop (demo generator) ingested and indexed in `home`, unless an index is already there."""
    if (home / "index" / "manifest.json").is_file():
        return
    from retrieval.synthetic import SyntheticConfig, generate
    from shoprec.config import Settings
    from shoprec.service import Shoprec

    shop = generate(SyntheticConfig(seed=seed, n_items=n_items))
    svc = Shoprec(Settings(home=home, sasrec_epochs=10))
    svc.store.ingest(shop.items, shop.interactions)
    svc.build_index(log=lambda m: print("  " + m, flush=True))


def start_server(
    home: Path, config: dict[str, Any], log_path: Path, workers: int = 1
) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    cfg = home / "load-serve.toml"
    cfg.write_text("[shoprec]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()), encoding="utf-8")
    exe = Path(sys.executable).with_name("shoprec")
    cmd = [str(exe), "--home", str(home), "--config", str(cfg), "serve", "--port", str(port), "--log-level", "warning"]
    cmd += ["--workers", str(workers)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"shoprec serve exited: {log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("shoprec serve did not become ready in 300 s")


class _Connection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON: a load client lean enough to share the box.

    Why not httpx: on this 2-core box the client runs beside the server, and httpx spent ~1.0 ms of CPU per
    request (a quarter of a core at 16 clients), CPU the server then lacked. This client writes the request and
    reads the status line, the headers and a Content-Length body (what uvicorn sends for JSON), ~0.1-0.2 ms.
    `--client httpx` keeps the old client, to compare."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, bytes, float | None]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        payload = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        )
        self.writer.write(head.encode() + payload)
        try:
            raw = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            await self.close()
            raise ConnectionError(f"the server closed the connection: {e}") from None
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
        length = headers.get("content-length")
        if length is None:
            await self.close()
            raise ConnectionError("a response without Content-Length (chunked?): this client does not read those")
        data = await self.reader.readexactly(int(length))
        retry_after = headers.get("retry-after")
        return status, data, float(retry_after) if retry_after else None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def run_level(
    url: str,
    mode: str,
    clients: int,
    duration_s: float,
    max_requests: int,
    users: list[str],
    k: int,
    seed: int,
    client_kind: str = "raw",
) -> dict[str, Any]:
    rng = random.Random(seed)
    latencies: list[float] = []  # every response, ms
    answers: list[float] = []  # every 200, ms from the shopper's first try (Retry-After waits included)
    waited: list[float] = []  # Retry-After values obeyed, s
    statuses: Counter[str] = Counter()
    fallbacks: Counter[str] = Counter()
    details: Counter[str] = Counter()
    started = [0]
    t_end = time.monotonic() + duration_s
    parsed = urllib.parse.urlsplit(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80

    async def client(http: httpx.AsyncClient | None) -> None:
        conn = _Connection(host, port)
        try:
            while time.monotonic() < t_end and started[0] < max_requests:
                user = rng.choice(users) if rng.random() > 0.1 else f"cold-{rng.randrange(10**6)}"
                body = {"user": user, "k": k, "mode": mode}
                first = time.perf_counter()
                # one shopper's request: sent again after Retry-After on 429/503, as urllib3's Retry does
                while time.monotonic() < t_end and started[0] < max_requests:
                    started[0] += 1
                    t0 = time.perf_counter()
                    try:
                        if http is not None:
                            r = await http.post("/v1/recommend", json=body)
                            retry = r.headers.get("retry-after")
                            status, data, wait = r.status_code, r.content, float(retry) if retry else None
                        else:
                            status, data, wait = await conn.post("/v1/recommend", body)
                    except (httpx.HTTPError, ConnectionError, OSError) as e:
                        statuses[f"error:{type(e).__name__}"] += 1
                        break
                    latencies.append((time.perf_counter() - t0) * 1000)
                    statuses[str(status)] += 1
                    if status in (429, 503) and wait is not None:
                        waited.append(wait)
                        await asyncio.sleep(min(wait, max(0.0, t_end - time.monotonic())))
                        continue
                    if status == 200:
                        answers.append((time.perf_counter() - first) * 1000)
                        answer = json.loads(data)
                        if answer["fallback"]:
                            reason = str(answer["fallback_reason"])
                            fallbacks[reason.split(":")[0]] += 1
                            # the numbers out: "no model answer within the N s budget" (the model's work wasted) vs
                            # "the budget would run out before the model's answer" (no model call spent)
                            details[re.sub(r"\d+(\.\d+)?", "N", reason)[:120]] += 1
                    break
        finally:
            await conn.close()

    load_before = os.getloadavg()
    cpu_before = time.process_time()
    t0 = time.monotonic()
    if client_kind == "httpx":
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
            await asyncio.gather(*(client(http) for _ in range(clients)))
    else:
        await asyncio.gather(*(client(None) for _ in range(clients)))
    wall = time.monotonic() - t0
    client_cpu_s = time.process_time() - cpu_before
    lat = np.array(latencies) if latencies else np.array([np.nan])
    ok = statuses.get("200", 0)
    return {
        "mode": mode,
        "clients": clients,
        "requests": sum(statuses.values()),
        "wall_s": round(wall, 2),
        "throughput_rps": round(ok / wall, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p90_ms": round(float(np.percentile(lat, 90)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "max_ms": round(float(np.max(lat)), 1),
        "status": dict(statuses),
        "errors_5xx": sum(v for s, v in statuses.items() if s.startswith("5")),
        "transport_errors": sum(v for s, v in statuses.items() if s.startswith("error")),
        "rejected_429_503": statuses.get("429", 0) + statuses.get("503", 0),
        "fallback_rate": round(sum(fallbacks.values()) / max(ok, 1), 4),
        # answers the model made (not the retrieval fallback): what batching is judged on
        "model_answers": ok - sum(fallbacks.values()),
        "model_throughput_rps": round((ok - sum(fallbacks.values())) / wall, 3),
        "fallback_causes": dict(fallbacks),
        "fallback_reasons": dict(details.most_common(8)),
        # with overload 'reject': what a shopper waited for an answer, retries after Retry-After included
        "answer_p50_ms": round(float(np.percentile(answers, 50)), 1) if answers else None,
        "answer_p99_ms": round(float(np.percentile(answers, 99)), 1) if answers else None,
        "retry_after_obeyed": len(waited),
        "retry_after_mean_s": round(float(np.mean(waited)), 2) if waited else None,
        # the load client's own CPU per request: it shares the box with the server
        "client": client_kind,
        "client_cpu_ms_per_request": round(1000 * client_cpu_s / max(sum(statuses.values()), 1), 3),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def score_targets(levels: list[dict[str, Any]]) -> dict[str, Any]:
    """Score mode at 16 clients vs 1, counting only the model's answers: a fallback is a retrieval answer, and
    counting it would credit batching with throughput the model never produced."""
    s1 = next((r for r in levels if r["mode"] == "score" and r["clients"] == 1), None)
    s16 = next((r for r in levels if r["mode"] == "score" and r["clients"] == 16), None)
    if not (s1 and s16):
        return {}
    ratio = s16["model_throughput_rps"] / max(s1["model_throughput_rps"], 1e-9)
    return {"score_model_throughput_16_vs_1>=2x": {"value": round(ratio, 2), "met": ratio >= 2}}


def plot(levels: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode in MODES:
        rows = [r for r in levels if r["mode"] == mode]
        if not rows:
            continue
        x = [r["clients"] for r in rows]
        axes[0].plot(x, [r["throughput_rps"] for r in rows], marker="o", label=f"{mode}: all answers")
        if mode != "retrieval":
            model = [r.get("model_throughput_rps", 0.0) for r in rows]
            axes[0].plot(x, model, marker="s", linestyle=":", label=f"{mode}: model answers (no fallback)")
        axes[1].plot(x, [r["p50_ms"] for r in rows], marker="o", label=f"{mode} p50")
        axes[1].plot(x, [r["p99_ms"] for r in rows], marker="x", linestyle="--", label=f"{mode} p99")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.legend()
    axes[0].set_yscale("log")  # the model's answers (~0.1-1/s) and retrieval's (~500/s) on one axis
    axes[0].set_ylabel("answers / s")
    axes[0].set_title("throughput of POST /v1/recommend")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("latency (ms)")
    axes[1].set_title("latency (client side)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("eval/results/load.json"))
    ap.add_argument("--home", type=Path, default=Path("var/bench-load"), help="Shop home (built when missing).")
    ap.add_argument("--items", type=int, default=2000, help="Items of the synthetic shop when it is built.")
    ap.add_argument("--duration", type=float, default=120.0, help="Seconds per level (the issue: >= 120).")
    ap.add_argument("--max-requests", type=int, default=100_000, help="Requests per level at most.")
    ap.add_argument("--levels", type=int, nargs="+", default=list(LEVELS))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=["retrieval", "score", "generate"])
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--budget", type=float, default=10.0, help="The server's request_budget_s.")
    ap.add_argument(
        "--overload",
        choices=["fallback", "reject"],
        default="fallback",
        help="The server's overload policy past the model's capacity: the flagged retrieval answer, or 429 + "
        "Retry-After (the clients wait as told, then send the same request again).",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="Server worker processes (each loads the index and model).")
    ap.add_argument(
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="Load client: a lean keep-alive HTTP/1.1 client (default) or httpx (~1 ms of CPU per request more).",
    )
    ap.add_argument("--note", default="", help="What else ran on the box (recorded in the JSON).")
    ap.add_argument(
        "--keep-other-modes",
        action="store_true",
        help="Keep the levels of modes not run now from the existing --out file (rerun one mode).",
    )
    args = ap.parse_args()

    args.home.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    build_shop(args.home, args.items, args.seed)
    from retrieval.store import open_store

    with open_store(args.home / "shoprec.db", create=False) as store:
        users = store.users()
        counts = store.counts()
    config = {
        "allow_anonymous_local": True,
        "request_budget_s": args.budget,
        "llm_backend": "transformers",
        "overload": args.overload,
    }
    proc, url = start_server(args.home, config, args.out.with_suffix(".server.log"), args.workers)
    levels = []
    try:
        for mode in args.modes:
            # one warm-up request per mode: the first model call pays one-off costs
            httpx.post(url + "/v1/recommend", json={"user": users[0], "mode": mode}, timeout=120)
            for clients in args.levels:
                row = asyncio.run(
                    run_level(
                        url, mode, clients, args.duration, args.max_requests, users, args.k, args.seed, args.client
                    )
                )
                levels.append(row)
                print(json.dumps(row), flush=True)
        metrics = httpx.get(url + "/metrics", timeout=30).text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()

    if args.keep_other_modes and args.out.is_file():
        kept = [r for r in json.loads(args.out.read_text(encoding="utf-8"))["levels"] if r["mode"] not in args.modes]
        for r in kept:
            r.setdefault("run", "earlier run, kept with --keep-other-modes")
        levels = kept + levels

    def at(mode: str, clients: int) -> dict[str, Any] | None:
        return next((r for r in levels if r["mode"] == mode and r["clients"] == clients), None)

    targets: dict[str, Any] = {}
    r16 = at("retrieval", 16)
    if r16:
        targets["retrieval_p50_ms_at_16<=30"] = {"value": r16["p50_ms"], "met": r16["p50_ms"] <= 30}
        targets["retrieval_p99_ms_at_16<=150"] = {"value": r16["p99_ms"], "met": r16["p99_ms"] <= 150}
    targets.update(score_targets(levels))
    targets["no_5xx"] = {
        "value": sum(r["errors_5xx"] for r in levels),
        "met": all(r["errors_5xx"] == 0 for r in levels),
    }
    batch_lines = [line for line in metrics.splitlines() if line.startswith("shoprec_llm_batch_size_")]
    result = {
        "benchmark": "HTTP load: POST /v1/recommend, closed-loop async clients on loopback",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            **cpu_facts(),
            "shared_box": "yes: other work may run at the same time; see loadavg per level",
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset (torch picks)"),
            "note": args.note,
        },
        "shop": {"home": str(args.home), **counts},
        "server": {**config, "workers": args.workers, "llm_model": "embedded:SmolLM2-135M-Instruct"},
        "protocol": {
            "duration_s_per_level": args.duration,
            "max_requests_per_level": args.max_requests,
            "k": args.k,
            "cold_share": 0.1,
            "client": args.client,
        },
        "levels": levels,
        "targets": targets,
        "llm_batch_size_histogram": batch_lines,
        "total_s": round(time.monotonic() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    plot(levels, args.out.with_suffix(".png"))
    print(json.dumps(targets, indent=2))


if __name__ == "__main__":
    main()
