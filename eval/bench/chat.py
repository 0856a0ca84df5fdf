"""Latency of a chat turn on the demo shop: first cards (retrieval) and the whole turn with reasons (transformers).

Run: `python -m eval.bench.chat --home var/demo --out eval/results/chat-latency.json` (a built demo home: `shoprec
demo --home var/demo`). Each conversation is 4 turns a new shopper would type ("wireless headphones under $80",
"cheaper", "not that brand", "more like the second one", and other starts); the whole set runs `--rounds` times
after one warm-up conversation (the first model call pays one-time costs). k = 5, score mode, grounded reasons,
the demo adapter when present. Targets (issue 15): first cards <= 1 s p50, whole turn <= 4 s p50.

What is timed, per turn, from the message to: `first_cards` — the first SSE event's content (parse + retrieval +
diversity, no model); `turn` — the final answer with the LLM's order and reasons. Writes JSON with p50/p90/max
and the machine; the box's load is recorded (os.getloadavg) because the 2 cores are shared.

`--http`: the same conversations as a shopper's browser sends them — a real `shoprec serve` subprocess on
127.0.0.1, `POST /v1/chat` with SSE, timed at the client when the `cards` event and the `final` event arrive (so
HTTP, JSON, the service's micro-batcher and its time budget are in the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.persist import atomic_write_json

CONVERSATIONS = [
    ["wireless headphones under $80", "cheaper", "not that brand", "more like the second one"],
    ["a tent for camping", "under 150", "not the first one", "something cheaper"],
    ["coffee maker", "between 30 and 120 dollars", "no Aurelon", "like the third one"],
    ["dog food", "cheaper", "not that brand", "add the first one to my cart"],
    ["a sketchbook for my daughter", "under 20€", "more like the second one", "cheaper"],
]


def run(home: Path, rounds: int, threads: int, conversations: int = len(CONVERSATIONS)) -> dict[str, Any]:
    import torch

    from shoprec.chat.turn import ChatEngine
    from shoprec.config import Settings
    from shoprec.demo import demo_adapter
    from shoprec.service import Shoprec

    torch.set_num_threads(threads)
    adapter = demo_adapter()
    svc = Shoprec(Settings(home=home, adapter=str(adapter) if adapter else None))
    t0 = time.perf_counter()
    engine = ChatEngine(svc.catalog, svc.recommender(), history=lambda u: [e.item_id for e in svc.store.history(u)])
    load_s = time.perf_counter() - t0

    def conversation(turns: list[str]) -> list[dict[str, Any]]:
        state = None
        out = []
        for message in turns:
            t = time.perf_counter()
            first = None
            last = None
            for answer in engine.run(message, state):
                if first is None and answer.cards:
                    first = (time.perf_counter() - t) * 1000
                last = answer
            total = (time.perf_counter() - t) * 1000
            assert last is not None
            state = last.state
            out.append(
                {"message": message, "kind": last.kind, "first_cards_ms": first, "turn_ms": total,
                 "fallback": last.fallback_reason, "cards": len(last.cards)}
            )  # fmt: skip
        return out

    conversation(CONVERSATIONS[0])  # warm-up
    load0 = os.getloadavg()
    turns = [t for _ in range(rounds) for conv in CONVERSATIONS[:conversations] for t in conversation(conv)]
    load1 = os.getloadavg()
    return _summary(turns, threads, load0, load1, adapter, load_s) | {"via": "in-process ChatEngine.run"}


def _summary(turns: list[dict[str, Any]], threads: int, load0: Any, load1: Any, adapter: Any, load_s: float) -> dict:
    firsts = [t["first_cards_ms"] for t in turns if t["first_cards_ms"] is not None]
    whole = [t["turn_ms"] for t in turns if t["kind"] == "picks"]

    def pct(v: list[float]) -> dict[str, float]:
        return {q: round(float(np.percentile(v, p)), 1) for q, p in (("p50", 50), ("p90", 90))} | {
            "max": round(float(max(v)), 1),
            "n": len(v),
        }

    return {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": threads,
        },
        "load_average_1m": {"before": round(load0[0], 2), "after": round(load1[0], 2)},
        "model": {"adapter": str(adapter) if adapter else None, "load_s": round(load_s, 1)},
        "first_cards_ms": pct(firsts),
        "turn_with_reasons_ms": pct(whole),
        "fallbacks": sum(t["fallback"] is not None for t in turns),
        "targets": {"first_cards_p50_ms": 1000, "turn_p50_ms": 4000},
        "turns": turns,
    }


def run_http(home: Path, rounds: int, threads: int, conversations: int = len(CONVERSATIONS)) -> dict[str, Any]:
    import httpx

    from eval.bench.load import start_server
    from shoprec.demo import demo_adapter

    adapter = demo_adapter()
    config: dict[str, Any] = {"allow_anonymous_local": True, "llm_backend": "transformers"}
    if adapter:
        config["adapter"] = str(adapter)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the server's torch threads (inherited by the subprocess)
    t0 = time.perf_counter()
    proc, url = start_server(home, config, home / "bench-chat-serve.log")
    load_s = time.perf_counter() - t0

    def turn(http: httpx.Client, message: str, cid: str | None) -> tuple[dict[str, Any], str]:
        t = time.perf_counter()
        first = None
        final: dict[str, Any] = {}
        event = ""
        with http.stream("POST", url + "/v1/chat", json={"message": message, "conversation_id": cid, "stream": True},
                         headers={"Accept": "text/event-stream"}) as r:  # fmt: skip
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    out = json.loads(line[6:])
                    if event == "error":
                        raise RuntimeError(f"the server answered an error event: {out}")
                    if first is None and out["answer"]["cards"]:
                        first = (time.perf_counter() - t) * 1000
                    final = out
        answer = final["answer"]
        row = {"message": message, "kind": answer["kind"], "first_cards_ms": first,
               "turn_ms": (time.perf_counter() - t) * 1000, "fallback": answer["fallback_reason"],
               "cards": len(answer["cards"])}  # fmt: skip
        return row, final["conversation_id"]

    def conversation(http: httpx.Client, turns: list[str]) -> list[dict[str, Any]]:
        cid, out = None, []
        for message in turns:
            row, cid = turn(http, message, cid)
            out.append(row)
        return out

    try:
        with httpx.Client(timeout=120) as http:
            conversation(http, CONVERSATIONS[0])  # warm-up
            load0 = os.getloadavg()
            turns = [
                t for _ in range(rounds) for conv in CONVERSATIONS[:conversations] for t in conversation(http, conv)
            ]
            load1 = os.getloadavg()
    finally:
        proc.terminate()
        proc.wait(30)
    return _summary(turns, threads, load0, load1, adapter, load_s) | {"via": f"HTTP: shoprec serve, SSE ({url})"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, default=Path("var/demo"))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--conversations", type=int, default=len(CONVERSATIONS), help="How many of the 4-turn scripts.")
    ap.add_argument("--http", action="store_true", help="Through a real `shoprec serve` and SSE, timed at the client.")
    ap.add_argument("--out", type=Path, default=Path("eval/results/chat-latency.json"))
    args = ap.parse_args(argv)
    result = (run_http if args.http else run)(args.home, args.rounds, args.threads, args.conversations)
    print(json.dumps({k: v for k, v in result.items() if k != "turns"}, indent=2))
    atomic_write_json(args.out, result)  # a stopped run never leaves half a result file
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
