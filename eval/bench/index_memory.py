"""Peak memory and time of `shoprec index` on a 1M-event store: the check that indexing stays bounded.

Run: `python -m eval.bench.index_memory --out eval/results/index_memory.json [--events 1000000]
[--sasrec-epochs 3] [--cache /tmp/shoprec-index-bench]` (`--events 50000` is a minute-long smoke run).

The events come from the demo shop's own simulator (retrieval/synthetic.py: the same catalog config as `shoprec
demo`, more users), so co-occurrence and sequences have the structure item-kNN and SASRec are built for, not
uniform noise. They are written to a SQLite store in this (unmeasured) process, chunk by chunk. Then `shoprec
index` runs in a subprocess, as a user would run it, and we record its own peak resident memory (`wait4`'s
ru_maxrss), wall time, its RSS sampled every 0.5 s from /proc (with the log line printed at that moment, so the
memory can be attributed to a phase), and the index manifest (the fusion fit's held-out cases and recall).
SASRec's epochs are capped (`--sasrec-epochs`, via the config file) so the run fits the time budget; every
other setting is the default. Target (issue 12): peak < 1 GB, and the fusion fit finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def make_store(home: Path, n_events: int, seed: int = 0) -> dict[str, Any]:
    """A store holding the demo catalog and ~`n_events` simulated events (users scaled to reach the count)."""
    from retrieval.store import open_store
    from retrieval.synthetic import SyntheticConfig, generate

    probe = generate(SyntheticConfig(seed=seed, n_users=400))
    per_user = len(probe.interactions) / 400
    n_users = max(1, round(n_events / per_user))
    t0 = time.perf_counter()
    data = generate(SyntheticConfig(seed=seed, n_users=n_users))
    generated = time.perf_counter() - t0
    home.mkdir(parents=True, exist_ok=True)
    store = open_store(home / "shoprec.db")
    store.ingest(data.items, data.interactions, chunk_size=50_000)
    counts = store.counts()
    store.close()
    return {"users": n_users, "generate_s": round(generated, 1), "store_counts": counts}


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_index(home: Path, sasrec_epochs: int) -> dict[str, Any]:
    """`shoprec index` in a subprocess: peak RSS, wall time, an RSS timeline labelled by the log, the manifest."""
    config = home / "bench.toml"
    config.write_text(f"sasrec_epochs = {sasrec_epochs}\n", encoding="utf-8")
    env = {**os.environ, "SHOPREC_HOME": str(home), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    for name in ("SHOPREC_CONFIG", "SHOPREC_STORE", "SHOPREC_INDEX"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "shoprec.cli", "--config", str(config), "index"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[tuple[float, str]] = []
    samples: list[tuple[float, float, str]] = []

    def read_log() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "%|" not in line and line.strip():  # progress bars say nothing the phase lines do not
                log.append((time.perf_counter() - start, line.rstrip()))

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    while True:  # wait4 (not Popen.poll, which would reap the child) gives this child's own rusage at exit
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        rss = _rss_mb(proc.pid)
        if rss is not None:
            samples.append((round(time.perf_counter() - start, 1), round(rss, 1), log[-1][1] if log else "start"))
        time.sleep(0.5)
    wall = time.perf_counter() - start
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    reader.join(timeout=5)
    if code != 0:
        raise SystemExit(f"index failed ({code}): " + "\n".join(line for _, line in log[-30:]))
    manifest = json.loads((home / "index" / "manifest.json").read_text())
    peak_mb = usage.ru_maxrss / 1024  # kilobytes on Linux
    by_phase: dict[str, float] = {}
    for _, rss, phase in samples:
        by_phase[phase] = max(by_phase.get(phase, 0.0), rss)
    return {
        "peak_rss_mb": round(peak_mb, 1),
        "wall_s": round(wall, 1),
        "log": [f"{t:7.1f}s  {line}" for t, line in log],
        "peak_rss_mb_after_log_line": by_phase,
        "rss_timeline": samples,
        "manifest": {
            k: manifest[k] for k in ("n_items", "n_users", "n_events", "signals", "fusion_fit", "build_seconds")
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "index_memory.json")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--sasrec-epochs", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=None, help="Keep/reuse the generated store in this folder.")
    args = parser.parse_args(argv)

    import tempfile

    tmp = None if args.cache else tempfile.TemporaryDirectory(prefix="shoprec-index-bench-")
    home = args.cache if args.cache else Path(tmp.name)  # type: ignore[union-attr]
    try:
        marker = home / "data.json"
        if marker.is_file() and json.loads(marker.read_text())["requested_events"] == args.events:
            data = json.loads(marker.read_text())
        else:
            data = {"requested_events": args.events, **make_store(home, args.events)}
            marker.write_text(json.dumps(data))
        load_before = os.getloadavg()
        run = run_index(home, args.sasrec_epochs)
        load_after = os.getloadavg()
    finally:
        if tmp is not None:
            tmp.cleanup()

    result = {
        "what": "peak RSS and wall time of `shoprec index` (a subprocess) on a store of simulated demo-shop events",
        "data": data,
        "sasrec_epochs": args.sasrec_epochs,
        "run": run,
        "target": "peak < 1024 MB for 1M events, fusion fit finished (issue 12)",
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1_5_15_before": [round(x, 2) for x in load_before],
            "load_avg_1_5_15_after": [round(x, 2) for x in load_after],
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    summary = {k: v for k, v in run.items() if k not in ("rss_timeline", "log")}
    print(json.dumps({"data": data, **summary, "log": run["log"]}, indent=2))


if __name__ == "__main__":
    main()
