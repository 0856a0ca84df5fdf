"""Regenerate the README's results tables from the JSON files in eval/results/ (run by `make bench`), and each
evaluation's HTML report (`eval-*.html`: its Markdown report as one page, with its curve plot embedded).

Each table lives between `<!-- results:NAME -->` and `<!-- /results:NAME -->` markers in README.md or a
docs/ page; only the text between the markers is replaced, so the prose around it stays hand-written.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from retrieval.persist import atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "eval" / "results"


def _ci(m: list[float]) -> str:
    return f"{m[0]:.4f} [{m[1]:.3f}, {m[2]:.3f}]"


def retrieval_table(r: dict[str, Any]) -> str:
    lines = [
        "| dataset | signal | Recall@20 | Recall@50 | NDCG@10 |",
        "|---|---|---|---|---|",
    ]
    for ds, d in r["datasets"].items():
        for name, m in d["results"].items():
            label = f"**{name}**" if name == "fusion" else name
            lines.append(f"| {ds} | {label} | {_ci(m['recall@20'])} | {_ci(m['recall@50'])} | {_ci(m['ndcg@10'])} |")
    checks = []
    for ds, d in r["datasets"].items():
        c = d["checks"]
        checks.append(
            f"- {ds}: {d['test_users']} test users, {d['items']} items; fusion beats every signal on Recall@20: "
            f"**{c['fusion_beats_every_signal_recall@20']}** (best single: {c['best_single_signal']}{_paired(c)}); "
            f"fusion / popularity Recall@20 = **{c['fusion_vs_popularity_recall@20']}x**; "
            f"SASRec NDCG@10 = **{c['sasrec_ndcg@10']:.4f}**; fitted weights {d['fusion_weights']['weights']} "
            f"(rrf_k {d['fusion_weights']['rrf_k']}); train {d['seconds']['fit']} s, total {d['seconds']['total']} s."
        )
    m = r["machine"]
    foot = f"\nMachine: {m['cpus']} CPUs, {m['platform']}, torch {m['torch']}. Seed {r['seed']}.\n"
    return "\n".join(lines) + "\n\n" + "\n".join(checks) + "\n" + foot


def _paired(c: dict[str, Any]) -> str:
    p = c.get("fusion_minus_best_single_recall@20_paired")
    if not p:
        return ""
    return f", paired difference {p[0]:+.4f} [{p[1]:+.4f}, {p[2]:+.4f}]"


def faiss_table(r: dict[str, Any]) -> str:
    cfg = r["config"]
    lines = [
        f"{cfg['n']:,} clustered {cfg['dim']}-d vectors, {cfg['queries']} held-out queries, one query at a time on "
        f"{cfg['search_threads']} thread; exact search: {r['clustered']['brute_force_single_query_ms']:.1f} ms/query.",
        "",
        "| index | build s | RSS +MiB | setting | recall@100 | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for idx in r["clustered"]["indexes"]:
        for p in idx["sweep"]:
            key = "nprobe" if idx["kind"] == "ivf" else "efSearch"
            mark = " (default)" if p.get("default") else ""
            lines.append(
                f"| {idx['kind']} | {idx['build_s']:.0f} | {idx['rss_increase_bytes'] / 2**20:.0f} | "
                f"{key} {p[key]}{mark} | {p['recall_at_k']:.3f} | {p['p50_ms']:.2f} | {p['p99_ms']:.2f} |"
            )
    load = r["machine"].get("loadavg_start")
    if load:
        lines.append(f"\nLoad average at the start of the run: {load[0]:.1f} (p99 suffers when the cores are shared).")
    return "\n".join(lines) + "\n"


def eval_table(results: Path = RESULTS) -> str | None:
    """The evaluation table (eval/report_eval.py) over every eval-<dataset>.json, ml-100k first."""
    from eval.report_eval import summary_table

    files = sorted(results.glob("eval-*.json"), key=lambda p: (p.stem != "eval-ml-100k", p.stem))
    if not files:
        return None
    runs = [json.loads(p.read_text(encoding="utf-8")) for p in files]
    # the fine-tuning bench's runs (eval/bench/finetune.py) on the same users: retrieval order, untuned, tuned
    runs += [json.loads(p.read_text(encoding="utf-8"))["eval"] for p in sorted(results.glob("finetune-*.json"))]
    table = summary_table(runs)
    for p in sorted(results.glob("ab-*.json")):
        ab = json.loads(p.read_text(encoding="utf-8"))
        table += (
            f"- Offline A/B on {ab['dataset']} ({ab['users']} users, {ab['protocol']} protocol), "
            f"A = `{ab['a']['spec']}`, B = `{ab['b']['spec']}`: {ab['verdict']}.\n"
        )
    return table


def _curve(curve: list[dict[str, Any]]) -> str:
    """The validation curve in one sentence: the model alone's NDCG@10 at each validated step."""
    points = [f"{p['step']}: {p['llm_ndcg@10']:.4f}" for p in curve if p.get("llm_ndcg@10") is not None]
    return f" Validation curve, tuned LLM alone NDCG@10 by step: {', '.join(points)}." if points else ""


def _chosen_step(best: dict[str, Any]) -> str:
    """Which checkpoint the run exported (absent from runs older than the field)."""
    if "step" not in best:
        return ""
    return ": step 0, the untuned weights" if best["step"] == 0 else f": step {best['step']}"


def finetune_table(results: Path = RESULTS) -> str | None:
    """Per fine-tuning run (eval/bench/finetune.py): training, then each protocol's rows with 95% CIs."""
    files = sorted(results.glob("finetune-*.json"), key=lambda p: (p.stem != "finetune-ml-100k", p.stem))
    if not files:
        return None
    out: list[str] = []
    titles = {
        "eval": "leave-one-out test users, full ranking",
        "cold_items": "cold items: users whose next item no model saw used (10% of items held out)",
        "llmrank": "LLMRank's protocol: the target + 19 random items, the same candidates for every system",
    }
    for path in files:
        r = json.loads(path.read_text(encoding="utf-8"))
        m = r["adapter_manifest"]
        v = m["validation"]["best"]
        reasons = m.get("reasons", {})
        seconds = m.get("train_seconds", r.get("train_seconds", "?"))
        opts = m.get("data", {}).get("options", {})
        loss = {"labels": "listwise label loss", "answer": "answer-text loss"}.get(opts.get("rank_loss", "answer"))
        n_ex = m.get("data", {}).get("examples", {}).get("examples")
        out.append(
            f"**{r['dataset']}** — LoRA r={m['peft']['rank']} on {m['peft']['target_modules']}, {loss}"
            + (f" on {n_ex} examples" if n_ex else "")
            + f", lr {m['train_config']['lr']}, {m.get('steps', '?')} steps"
            + f" (best checkpoint by {m['train_config'].get('select_by', 'llm')} validation NDCG@10"
            + _chosen_step(v)
            + ")"
            + f"; {seconds} s of training and validation on this box"
            + (f" ({r['train_seconds']} s for the whole `shoprec finetune` command)" if "train_seconds" in r else "")
            + "; "
            f"validation NDCG@10 retrieval {v['retrieval']['ndcg@10'][0]:.4f}, tuned LLM {v['llm']['ndcg@10'][0]:.4f}, "
            f"fitted blend weight {m['fusion']['llm_weight']:g}; reasons citing confirmed evidence: "
            f"{reasons.get('confirmed', '?')}/{reasons.get('checked', '?')}."
            + _curve(r.get("curve", []))
            + (f" {r['note']}" if r.get("note") else "")
        )
        out.append("")
        for key, title in titles.items():
            run = r.get(key)
            if not run:
                continue
            out.append(f"*{title}* ({run['test_users']} users)")
            out.append("")
            out.append("| system | NDCG@10 | Recall@10 |")
            out.append("|---|---|---|")
            for name, s in run["systems"].items():
                out.append(f"| {name} | {_ci(s['metrics']['ndcg@10'])} | {_ci(s['metrics']['recall@10'])} |")
            out.append("")
            out += _target_tests(run["systems"])
    return "\n".join(out)


# The targets as paired tests on the same users (A, B): the served blend against the order it re-ranks,
# the tuned model against the untuned one, and against the sequential baseline on LLMRank's candidates.
_PAIRS = (
    ("retrieval order", "tuned LLM + fusion"),
    ("untuned LLM", "tuned LLM alone"),
    ("SASRec", "tuned LLM alone"),
)


def _target_tests(systems: dict[str, Any]) -> list[str]:
    """One line per target pair present in a run: B vs A on NDCG@10, paired CI and test (eval/ab.py)."""
    from eval.ab import compare

    def find(prefix: str) -> str | None:
        # exact name, or the name with a suffix such as "(w=0)"; never a "+ new-item places" variant
        names = [n for n in systems if (n == prefix or n.startswith(prefix + " (")) and "places" not in n]
        return names[0] if names else None

    lines = []
    for a_prefix, b_prefix in _PAIRS:
        a, b = find(a_prefix), find(b_prefix)
        values = [systems[n].get("per_user", {}).get("ndcg@10") for n in (a, b) if n]
        if a is None or b is None or None in values:
            continue
        lines.append(f"- {b} vs {a} (B vs A): {compare(values[0], values[1])['verdict']}.")
    return [*lines, ""] if lines else []


def generator_table(r: dict[str, Any]) -> str:
    """Validity counts, position bias and latency of eval/bench/generator.py, whichever sections were run."""
    out: list[str] = []
    v = r.get("validity")
    if v:
        state = "complete" if v.get("finished", True) else "stopped early; counts up to the last finished group"
        bad = sum(v["invalid"].values())
        out.append(
            f"**Validity** ({state}): {v['requests']} of {v.get('requests_planned', v['requests'])} random requests "
            f"with the real model, {bad} invalid outputs {v['invalid']}, parsed share {v['parsed_share']}, "
            f"{v['fallbacks']} fallbacks {v['fallback_reasons'] or ''}."
        )
        out.append("")
        out.append("| dataset | requests | score mode | generate mode | invalid |")
        out.append("|---|---|---|---|---|")
        keys = ("parse_failures", "out_of_candidates", "duplicates", "wrong_length", "constraint_violations")
        for ds, d in v["by_dataset"].items():
            invalid = sum(d.get(k, 0) for k in keys)
            out.append(
                f"| {ds} | {d.get('requests', 0)} | {d.get('mode_score', 0)} | {d.get('mode_generate', 0)} "
                f"| {invalid} |"
            )
        out.append("")
    b = r.get("bias")
    if b:
        out.append(f"**Position bias** ({b['dataset']}, {b['users']} users; {b['protocol']}).")
        out.append("")
        out.append("| target placed | shuffled passes | mean rank | NDCG@10 [95% CI] | HR@1 | first listed wins |")
        out.append("|---|---|---|---|---|---|")
        for c in b["conditions"].values():
            n = c["ndcg@10"]
            out.append(
                f"| {'first' if c['target_position'] == 1 else 'last'} | {c['shuffle_passes']} | "
                f"{c['mean_rank']:.2f} | {n[0]:.3f} [{n[1]:.3f}, {n[2]:.3f}] | {c['hr@1']:.2f} | "
                f"{c['first_listed_wins']:.2f} |"
            )
        out.append(f"\nRandom ranker NDCG@10: {b['random_ranker_ndcg@10']:.3f}.")
        out.append("")
    lat = r.get("latency")
    if lat:
        out += _latency_rows(lat)
    m = r.get("machine", {})
    threads = (v or {}).get("torch_threads") or m.get("torch_threads")  # what the sections ran with
    out.append(f"Machine: {m.get('cpus')} CPUs, torch {m.get('torch')}, {threads} torch thread(s).")
    if r.get("note"):
        out.append(f"Note: {r['note']}.")
    if lat and lat.get("note"):
        out.append(f"Latency: {lat['note']}.")
    return "\n".join(out) + "\n"


# Latency rows in reading order: (key in the JSON, what it measures, target p50 in ms or None)
LATENCY_ROWS = (
    ("one_pass_ranking", "one-pass ranking, `rank` prompt", 250),
    ("reasons", "the 5 reasons (rows reuse the ranking prompt's cached keys/values)", None),
    ("score_e2e", "score mode end to end: ranking + diversity + 5 reasons", 3000),
    ("one_pass_ranking_terse", "one-pass ranking, `rank_terse` prompt", 250),
    ("score_e2e_terse", "score mode end to end, `rank_terse` prompt", 3000),
    ("reasons_pick_prompt", "the 5 reasons from one-pick prompts (`reason_prompt='pick'`)", None),
    ("generate_e2e", "generate mode end to end (ranked list and reasons decoded)", None),
    ("retrieve", "retrieval (fusion, demo shop)", None),
)


def _latency_rows(lat: dict[str, Any]) -> list[str]:
    tokens = lat.get("prompt_tokens_mean", {})
    out = [
        f"**Latency** (demo shop, 20 candidates, 5 picks, one request at a time, each a new shopper; prompts of "
        f"{tokens.get('rank', '?')} tokens (`rank`) and {tokens.get('rank_terse', '?')} (`rank_terse`) on average).",
        "",
        "| what | p50 ms | p95 ms | n | target p50 |",
        "|---|---|---|---|---|",
    ]
    for key, what, target in LATENCY_ROWS:
        s = lat["ms"].get(key)
        if not s:
            continue
        verdict = "" if target is None else f"≤ {target}: {'met' if s['p50'] <= target else '**not met**'}"
        out.append(f"| {what} | {s['p50']:.0f} | {s['p95']:.0f} | {s['n']} | {verdict} |")
    t = lat.get("throughput", {})
    out += [
        "",
        f"Batched throughput ({t.get('batch')} requests per call): score mode {t.get('score_requests_per_s')} req/s, "
        f"generate mode {t.get('generate_requests_per_s')} req/s. Peak RSS {lat.get('peak_rss_mb')} MB.",
        "",
    ]
    return out


TABLES: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "retrieval": ("retrieval.json", retrieval_table),
    "faiss": ("faiss_scale.json", faiss_table),
    "generator": ("generator.json", generator_table),
}


def _splice(m: re.Match[str], table: str) -> str:
    return m.group(1) + table + m.group(3)


def update_readme(readme: Path = ROOT / "README.md", results: Path = RESULTS) -> list[str]:
    text = readme.read_text(encoding="utf-8")
    done = []
    for name, (fname, render) in TABLES.items():
        path = results / fname
        pattern = re.compile(rf"(<!-- results:{name} -->\n)(.*?)(<!-- /results:{name} -->)", re.S)
        if not path.is_file() or not pattern.search(text):
            continue
        table = render(json.loads(path.read_text(encoding="utf-8")))
        text = pattern.sub(functools.partial(_splice, table=table), text)
        done.append(name)
    for name, make in (("eval", eval_table), ("finetune", finetune_table)):
        pattern = re.compile(rf"(<!-- results:{name} -->\n)(.*?)(<!-- /results:{name} -->)", re.S)
        md = make(results) if pattern.search(text) else None
        if md is not None:
            text = pattern.sub(functools.partial(_splice, table=md), text)
            done.append(name)
    atomic_write_text(readme, text)
    return done


def write_html_reports(results: Path = RESULTS) -> list[Path]:
    """An HTML page next to every evaluation result (eval-*.json), written atomically; the pages written."""
    from eval.report_eval import html

    pages = []
    for path in sorted(results.glob("eval-*.json")):
        result = json.loads(path.read_text(encoding="utf-8"))
        if "systems" not in result:
            continue
        plot = path.with_suffix(".png")
        page = path.with_suffix(".html")
        atomic_write_text(page, html(result, plot if plot.is_file() else None))
        pages.append(page)
    return pages


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--readme",
        type=Path,
        action="append",
        help="A Markdown page with results markers (repeatable); default: README.md and every docs/*.md page.",
    )
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    # the tables live where a reader looks for them: the README's short summary, the long ones in docs/
    pages = args.readme or [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        done = update_readme(page, args.results)
        if done:
            shown = page.relative_to(ROOT) if page.is_relative_to(ROOT) else page
            print(f"{shown}: tables regenerated: {', '.join(done)}")
    pages = write_html_reports(args.results)
    print(f"HTML reports: {', '.join(p.name for p in pages) or 'none'}")


if __name__ == "__main__":
    main()
