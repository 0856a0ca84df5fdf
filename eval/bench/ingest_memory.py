"""Peak memory and time of `shoprec ingest` on a large events file: the check that ingest streams.

Run: `python -m eval.bench.ingest_memory --out eval/results/ingest_memory.json [--events 1000000] [--reingest]`
(`--events 50000` is a seconds-long smoke run).

In a temp folder it writes the synthetic demo shop's items (retrieval/synthetic.py, the catalog `shoprec demo`
uses) and N events over those item ids in the generic JSONL format (docs/data-format.md): users drawn from a
pool of N/20, items Zipf-like, one timestamp per event, a type mix of views, carts and purchases. Then it runs
`shoprec ingest` on that folder as a user would, in a subprocess, and records the subprocess's own peak resident
memory (`wait4`'s ru_maxrss) and wall time. With `--reingest` it ingests the same folder a second time, which
must add 0 events, and records that run too. Target (issue 12): peak < 1 GB for 1M events.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def write_shop(folder: Path, n_events: int, seed: int = 0) -> dict[str, Any]:
    """The demo catalog's items.jsonl and `n_events` events over its item ids; returns the file sizes."""
    from retrieval.loaders import write_generic
    from retrieval.synthetic import SyntheticConfig, generate

    data = generate(SyntheticConfig(seed=seed))
    write_generic(data.items, [], folder)
    ids = [it.id for it in data.items]
    rng = random.Random(seed)
    weights = [1.0 / (rank + 10) for rank in range(len(ids))]  # Zipf-like popularity, as shops have
    n_users = max(1, n_events // 20)
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    types = ["view"] * 8 + ["cart"] + ["purchase"]
    with (folder / "events.jsonl").open("w", encoding="utf-8") as f:
        batch = 10_000
        for start in range(0, n_events, batch):
            n = min(batch, n_events - start)
            items = rng.choices(ids, weights=weights, k=n)
            lines = []
            for k, item in enumerate(items):
                row = {
                    "user_id": f"U{rng.randrange(n_users):07d}",
                    "item_id": item,
                    "type": rng.choice(types),
                    "timestamp": (t0 + timedelta(seconds=start + k)).isoformat(),  # distinct: no accidental dups
                }
                lines.append(json.dumps(row) + "\n")
            f.write("".join(lines))
    return {
        "items": len(ids),
        "events": n_events,
        "users_pool": n_users,
        "items_bytes": (folder / "items.jsonl").stat().st_size,
        "events_bytes": (folder / "events.jsonl").stat().st_size,
    }


def run_ingest(folder: Path, home: Path) -> dict[str, Any]:
    """`shoprec ingest FOLDER --json` in a subprocess: its peak RSS, wall time and summary."""
    env = {**os.environ, "SHOPREC_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("SHOPREC_CONFIG", None)
    env.pop("SHOPREC_STORE", None)
    cmd = [sys.executable, "-m", "shoprec.cli", "ingest", str(folder), "--json"]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the maximum over all children
        wall = time.perf_counter() - start
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if code != 0:
        raise SystemExit(f"ingest failed ({code}): {stderr.decode()[-2000:]}")
    summary = json.loads(stdout)
    peak_kb = usage.ru_maxrss  # kilobytes on Linux
    return {
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "wall_s": round(wall, 1),
        "events_per_s": round(summary["interactions"] / wall),
        "new_events": summary["new_events"],
        "duplicate_events": summary["duplicate_events"],
        "store_counts": summary["store_counts"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "ingest_memory.json")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--reingest", action="store_true", help="Ingest the same folder again (must add 0).")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="shoprec-ingest-bench-") as tmp:
        folder, home = Path(tmp) / "data", Path(tmp) / "home"
        t = time.perf_counter()
        data = write_shop(folder, args.events)
        data["generate_s"] = round(time.perf_counter() - t, 1)
        load_before = os.getloadavg()
        runs = {"first": run_ingest(folder, home)}
        if args.reingest:
            runs["again"] = run_ingest(folder, home)
        store = home / "shoprec.db"
        with sqlite3.connect(store) as conn:  # fold the WAL in, so the size is the store's
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        store_mb = round(store.stat().st_size / 2**20, 1)

    result = {
        "what": "peak RSS and wall time of `shoprec ingest` (a subprocess) on a generic-format JSONL folder",
        "data": data,
        "runs": runs,
        "store_mb": store_mb,
        "target": "peak < 1024 MB for 1M events (issue 12)",
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1_5_15_before": [round(x, 2) for x in load_before],
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "platform": platform.platform(),
        },
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
