"""Fine-tuning benchmark: tune on a dataset's logs, then compare on its TEST users (leave-one-out, full ranking,
history excluded) retrieval order, the untuned LLM, the tuned LLM alone, and the tuned LLM with the fusion weight
fitted on validation — NDCG@10 and Recall@10 with 95% bootstrap CIs, through `shoprec eval` (eval/harness.py).

    python -m eval.bench.finetune --data ml-100k --work /work/var/finetune --out eval/results/finetune-ml-100k.json

Where text should matter, measured the same way (`--parts`): the cold-items split (every event of 10% of the items
held out; users whose next item is one of them), the pipeline against the retrieval order; and LLMRank's protocol
(the target + 19 random items), the tuned LLM against SASRec on the same candidates.

The adapter and the generated eval configs go to `--work` (outside the repository for research-licensed data);
the results JSON (metrics only) goes to `--out`, with the adapter's manifest (training curve, fitted weight,
timings) folded in; parts not run now are kept from an earlier run. `make bench-finetune` runs it on ml-100k and
Office.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retrieval.persist import atomic_write_json

SIGNALS = ("popularity", "itemknn", "bm25", "dense")  # the eval configs' fusion (SASRec is left to the retrieval bench)


def _config(
    path: Path,
    name: str,
    system: str,
    *,
    adapter: Path | None = None,
    llm_weight: float | None = None,
    signals: Sequence[str] = SIGNALS,
    new_item_share: float = 0.0,
) -> Path:
    lines = [f'name = "{name}"', f'system = "{system}"', f"signals = {json.dumps(list(signals))}"]
    if new_item_share:
        lines.append(f"new_item_share = {new_item_share}")
    if system == "llm":
        lines.append("reasons = false")
        if adapter is not None:
            lines.append(f'adapter = "{adapter}"')
        lines += ["[generator]", f"llm_weight = {llm_weight}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


PARTS = ("main", "cold", "llmrank")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="ml-100k")
    ap.add_argument("--work", type=Path, required=True, help="Adapter and configs (outside the repo).")
    ap.add_argument("--out", type=Path, required=True, help="Results JSON (parts not run now are kept).")
    ap.add_argument("--users", type=int, default=200, help="Test users evaluated (seeded sample).")
    ap.add_argument("--skip-train", action="store_true", help="Reuse the adapter already in --work.")
    ap.add_argument(
        "--parts",
        default=",".join(PARTS),
        help="main: leave-one-out test users, full ranking; cold: the cold-items split (pipeline vs retrieval "
        "order on users whose next item no model saw used); llmrank: LLMRank's protocol (target + 19 random "
        "items), the tuned LLM vs SASRec on the same candidates.",
    )
    ap.add_argument(
        "--finetune-args",
        default="--rank 8 --alpha 16 --dropout 0 --lr 5e-4 --positions 2 --rank-examples 600 --reasons-per-case 1 "
        "--epochs 0.65 --batch 1 --grad-accum 8 --valid-cases 100 --eval-every 52 --patience 3 --select-by fused "
        "--reason-check 10 --threads 1 --max-per-category 0 "
        "--signals " + ",".join(SIGNALS),
        help="Flags passed to `shoprec finetune`.",
    )
    ap.add_argument(
        "--finetune-extra",
        default="",
        help="Flags appended to --finetune-args; a flag given twice takes the later value (e.g. '--max-steps 64').",
    )
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    if set(parts) - set(PARTS):
        raise SystemExit(f"unknown parts {sorted(set(parts) - set(PARTS))}; valid: {', '.join(PARTS)}")
    # `python -m shoprec.cli` (not the console script) so a run from an exported copy uses that copy's code.
    shoprec = [sys.executable, "-m", "shoprec.cli"]
    work = args.work / args.data
    adapter = work / "adapter"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict[str, Any] = {}
    if args.out.exists():
        result = json.loads(args.out.read_text(encoding="utf-8"))
    if not args.skip_train:
        cmd = [
            *shoprec,
            "finetune",
            "--data",
            args.data,
            "--out",
            str(adapter),
            *args.finetune_args.split(),
            *args.finetune_extra.split(),
        ]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        result["train_seconds"] = round(time.perf_counter() - t0, 1)
    manifest = json.loads((adapter / "manifest.json").read_text(encoding="utf-8"))
    w = float(manifest["fusion"]["llm_weight"])

    def evaluate(key: str, configs: list[Path], *extra: str) -> None:
        out = work / f"{key}.json"
        cmd = [*shoprec, "eval", "--data", args.data, "--users", str(args.users), "--out", str(out), *extra]
        for c in configs:
            cmd += ["--config", str(c)]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        result[key] = json.loads(out.read_text(encoding="utf-8"))
        _write(args.out, result)

    result.update(
        {
            "dataset": args.data,
            "adapter_manifest": {
                k: manifest[k]
                for k in ("peft", "train_config", "data", "fusion", "validation", "reasons", "steps", "train_seconds")
                if k in manifest
            },
            "curve": json.loads((adapter / "validation_curve.json").read_text(encoding="utf-8")),
        }
    )
    retrieval = _config(work / "retrieval.toml", "retrieval order", "fusion")
    untuned = _config(work / "untuned.toml", "untuned LLM", "llm", llm_weight=1.0)
    tuned = _config(work / "tuned.toml", "tuned LLM alone", "llm", adapter=adapter, llm_weight=1.0)
    fused = _config(work / "fused.toml", f"tuned LLM + fusion (w={w:g})", "llm", adapter=adapter, llm_weight=w)
    if "main" in parts:
        result["protocol"] = "leave-one-out test users, full ranking, history excluded; LLM re-ranks the fused top-20"
        evaluate("eval", [retrieval, untuned, tuned, fused])
    if "cold" in parts:  # the pipeline as served (tuned + fitted blend) against the retrieval order it re-ranks,
        # without and with the fused list's new-item places (2 of the 20 candidates)
        share = 0.1
        fresh = [
            _config(work / "retrieval-new.toml", "retrieval order + new-item places", "fusion", new_item_share=share),
            _config(
                work / "fused-new.toml",
                f"tuned LLM + fusion (w={w:g}) + new-item places",
                "llm",
                adapter=adapter,
                llm_weight=w,
                new_item_share=share,
            ),
            _config(
                work / "tuned-new.toml",
                "tuned LLM alone + new-item places",
                "llm",
                adapter=adapter,
                llm_weight=1.0,
                new_item_share=share,
            ),
        ]
        evaluate("cold_items", [retrieval, fused, *fresh], "--split", "cold-items")
    if "llmrank" in parts:  # the same 20 candidates for both: the target and 19 random items the user never touched
        sasrec = _config(work / "sasrec.toml", "SASRec", "sasrec")
        evaluate("llmrank", [sasrec, untuned, tuned], "--protocol", "sampled")
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    _write(args.out, result)
    print(f"results in {args.out}")


def _write(path: Path, result: dict[str, Any]) -> None:
    atomic_write_json(path, result, indent=2)


if __name__ == "__main__":
    main()
