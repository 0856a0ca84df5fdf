"""Markdown reports and plots of evaluation results (`eval.harness` JSON): tables, the accuracy–diversity curve.

`markdown(result)` is what `shoprec eval` writes next to its JSON, and `html(result, plot)` the same report as
one self-contained HTML page (the plot embedded); `summary_table(results)` is the README's results table over
several datasets; `plot_curve` draws NDCG@10 against category coverage@5 (matplotlib, lazily imported, Agg
backend: no display needed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def ci(m: Sequence[float] | None, digits: int = 4) -> str:
    """ "mean [low, high]" or "—" for a metric that does not apply."""
    if m is None:
        return "—"
    return f"{m[0]:.{digits}f} [{m[1]:.{digits - 1}f}, {m[2]:.{digits - 1}f}]"


def _mean(m: Sequence[float] | None, digits: int = 3) -> str:
    return "—" if m is None else f"{m[0]:.{digits}f}"


def _is_llm(s: Mapping[str, Any]) -> bool:
    return bool(s["config"]["system"] == "llm")


def system_rows(result: Mapping[str, Any]) -> list[str]:
    """One Markdown table row per system: accuracy with CIs, diversity, output checks and latency."""
    rows = []
    for name, s in result["systems"].items():
        m, a = s["metrics"], s["aggregate"]
        llm = _is_llm(s)
        rows.append(
            "| "
            + " | ".join(
                [
                    name
                    if s.get("users", result["test_users"]) == result["test_users"]
                    else f"{name} (n={s['users']})",
                    ci(m["ndcg@10"]),
                    ci(m["recall@10"]),
                    _mean(m["mrr@10"]),
                    _mean(m["coverage@5"]),
                    _mean(m["ild@5"]),
                    _mean(m["alpha_ndcg@10"]),
                    _mean(m["novelty@10"], 2),
                    f"{a['catalog_coverage@10']:.3f}",
                    f"{a['gini@10']:.3f}",
                    _mean(m["valid"]) if llm else "—",
                    _mean(m["grounded"]) if llm else "—",
                    f"{a['latency_ms']['p50']:.1f} / {a['latency_ms']['p99']:.1f}",
                ]
            )
            + " |"
        )
    return rows


HEADER = (
    "| system | NDCG@10 | Recall@10 | MRR@10 | cov@5 | ILD@5 | α-NDCG@10 | novelty | cat. cov | Gini | valid | "
    "grounded | p50 / p99 ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def curve_rows(result: Mapping[str, Any]) -> list[str]:
    rows = []
    for base, c in result.get("curve", {}).items():
        for p in c["points"]:
            mark = " ✔" if p["meets_target"] else ""
            rows.append(
                f"| {base} | {p['setting']}{mark} | {ci(p['ndcg@10'])} | {_pct(p['ndcg_change'])} | "
                f"{_mean(p['coverage@5'])} | {_pct(p['coverage_change'])} | {_mean(p['ild@5'])} |"
            )
    return rows


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:+.1%}"


def markdown(result: Mapping[str, Any], plot: str | None = None) -> str:
    """A self-contained report of one run."""
    r = result
    lines = [
        f"# Evaluation: {r['dataset']} ({r['protocol']} protocol, {r['split']} split)",
        "",
        f"{r['test_users']} of {r['test_users_total']} test users (seed {r['seed']}); {r['items']} items, "
        f"{r['events']} events; categories counted at level {r['category_level']}. Data hash `{r['data_hash'][:16]}`, "
        f"code `{r.get('code_version', 'unknown')}`. Means with 95% bootstrap CIs over users.",
        "",
        HEADER,
        *system_rows(r),
        "",
        "valid: the model's own output was used (no fallback) and had no unknown, repeated or rule-breaking pick; "
        "grounded: share of reasons that cite something the data confirms (`eval.metrics.reason_grounded`); "
        "latency: per request, retrieval excluded for the LLM stage.",
    ]
    for name, s in r["systems"].items():
        fb = s["aggregate"].get("fallback_reasons") or {}
        if fb:
            lines.append(f"\n{name}: fallbacks {fb}")
    if r.get("curve"):
        lines += [
            "",
            "## Accuracy–diversity curve",
            "",
            "| system | setting | NDCG@10 | ΔNDCG | cov@5 | Δcov | ILD@5 |",
            "|---|---|---|---|---|---|---|",
            *curve_rows(r),
            "",
        ]
        for base, c in r["curve"].items():
            t = c["target"]
            verdict = f"met by **{t['best_setting']}**" if t["met"] else "**not met** by any setting"
            lines.append(f"- {base}: target ({t['rule']}, reference: {c['reference']}) {verdict}.")
        if plot:
            lines += ["", f"![accuracy-diversity curve]({plot})"]
    if r.get("position_bias"):
        lines += ["", "## Position bias", "", "```", str(r["position_bias"]), "```"]
    m = r.get("machine", {})
    lines += [
        "",
        f"Machine: {m.get('cpus')} CPUs, {m.get('platform')}, load {m.get('loadavg_start')}; "
        f"{r.get('seconds')} s in all.",
        "",
    ]
    return "\n".join(lines)


_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; white-space: nowrap; }
th { background: #f3f3f3; } tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; } code { background: #f3f3f3; padding: 0 3px; }
"""


def html(result: Mapping[str, Any], plot: Path | None = None) -> str:
    """The Markdown report as one HTML page that needs no other file: the curve plot, when given, is embedded.

    Rendered by markdown-it-py (CommonMark with tables); every string of the result is escaped by the renderer,
    so a dataset or system name cannot inject markup.
    """
    import base64
    import html as html_lib

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown(result, None))
    if plot is not None:
        data = base64.b64encode(plot.read_bytes()).decode("ascii")
        body += f'<h2>Plot</h2>\n<p><img alt="accuracy-diversity curve" src="data:image/png;base64,{data}"></p>\n'
    title = html_lib.escape(f"shoprec evaluation: {result['dataset']}")
    return (
        f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
        f"<style>{_CSS}</style>\n</head>\n<body>\n{body}</body>\n</html>\n"
    )


def plot_curve(result: Mapping[str, Any], path: Path) -> Path | None:
    """NDCG@10 (y) against category coverage@5 (x) for every point of every curve; None when there is no curve."""
    curves = result.get("curve")
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6.5 * len(curves), 4.8), squeeze=False)
    for ax, (base, c) in zip(axes[0], curves.items(), strict=True):
        families: dict[str, list[Any]] = {}
        for p in c["points"]:
            families.setdefault(p["setting"].split(" ")[0], []).append(p)
        for fam, pts in families.items():
            xs = [p["coverage@5"][0] for p in pts]
            ys = [p["ndcg@10"][0] for p in pts]
            ax.scatter(xs, ys, label=fam, s=28)
            for p, x, y in zip(pts, xs, ys, strict=True):
                if p["meets_target"]:
                    ax.annotate(p["setting"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ref = next(p for p in c["points"] if p["setting"] == c["reference"])
        x0, y0 = ref["coverage@5"][0], ref["ndcg@10"][0]
        ax.axvline(1.3 * x0, ls=":", c="grey", lw=0.8)
        ax.axhline(0.97 * y0, ls=":", c="grey", lw=0.8)
        ax.set_xlabel(f"category coverage@5 (level {result['category_level']})")
        ax.set_ylabel("NDCG@10")
        ax.set_title(f"{result['dataset']}: {base} ({result['test_users']} users)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short_version(version: str) -> str:
    """'5a63ed2...' -> '5a63ed2'; a note after the hash ('(exported copy)', '+dirty') is kept."""
    head, _, note = version.partition(" ")
    dirty = "+dirty" if head.endswith("+dirty") else ""
    return (head.removesuffix("+dirty")[:12] + dirty + (" " + note if note else "")).strip()


def summary_table(results: Sequence[Mapping[str, Any]]) -> str:
    """The README table: every dataset's systems, plus each curve's target verdict."""
    lines = [HEADER.replace("| system |", "| dataset | system |").replace("|---|", "|---|---|", 1)]
    notes = []
    for r in results:
        # a run over every test user (e.g. a fusion-only curve) sits next to the 200-user runs: say so in the row
        everyone = r["test_users"] == r["test_users_total"]
        label = f"{r['dataset']} (all {r['test_users']} users)" if everyone else r["dataset"]
        for row in system_rows(r):
            lines.append(f"| {label} {row}")
        notes.append(
            f"- {r['dataset']}: {r['protocol']} protocol, {r['test_users']} of {r['test_users_total']} test users, "
            f"categories at level {r['category_level']}, {r.get('seconds')} s; "
            f"code `{_short_version(r.get('code_version', '?'))}`."
        )
        for base, c in r.get("curve", {}).items():
            t = c["target"]
            best = next((p for p in c["points"] if p["setting"] == t["best_setting"]), None)
            if best is not None:
                notes.append(
                    f"  - curve {base}: target met by {best['setting']} (coverage@5 {_pct(best['coverage_change'])}, "
                    f"NDCG@10 {_pct(best['ndcg_change'])})."
                )
            else:
                closest = max(
                    (p for p in c["points"] if p["ndcg_change"] is not None and p["ndcg_change"] >= -0.03),
                    key=lambda p: p["coverage@5"][0],
                    default=None,
                )
                extra = (
                    f"; the most coverage within -3% NDCG@10: {closest['setting']} "
                    f"(coverage@5 {_pct(closest['coverage_change'])}, NDCG@10 {_pct(closest['ndcg_change'])})"
                    if closest
                    else ""
                )
                notes.append(f"  - curve {base}: target not met{extra}.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
