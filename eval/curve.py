"""The accuracy–diversity curve: one base system under a sweep of diversity settings, NDCG@10 vs coverage@5.

For each base config of a run that is the fusion (retrieval order + the diversity step) or the LLM stage in score
mode, the sweep holds everything fixed but the step after ranking: pure relevance, MMR over λ with category or
embedding similarity, DPP, and hard per-category quotas, each over a pool of the top 20 or 50 candidates (the LLM
stage keeps its own n_candidates: the pool is what it scored). Categories are counted at the run's metric level.

The target (issue 5): a setting that raises category coverage@5 by >= 30% over pure relevance while losing
<= 3% relative NDCG@10. `summarise_curve` reports every point, whether the target is met, and by which setting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from eval.config import EvalConfig

COVERAGE_GAIN = 0.30  # relative gain in category coverage@5 the target asks for
NDCG_LOSS = 0.03  # relative NDCG@10 loss it allows
SEP = " / "


def _settings(level: int, pools: Sequence[int], embeddings: bool) -> list[tuple[str, dict[str, Any], str]]:
    """(label, generator overrides, similarity) of every point of the sweep."""
    out: list[tuple[str, dict[str, Any], str]] = []
    for n in pools:
        out.append((f"relevance n={n}", {"n_candidates": n}, "category"))
        for d in (0.1, 0.2, 0.3, 0.5, 0.7):
            mmr = {"n_candidates": n, "diversity_method": "mmr", "diversity": d}
            out.append((f"mmr-category d={d} n={n}", mmr, "category"))
        for d in (0.3, 0.5, 0.7) if embeddings else ():
            out.append(
                (
                    f"mmr-embedding d={d} n={n}",
                    {"n_candidates": n, "diversity_method": "mmr", "diversity": d},
                    "embedding",
                )
            )
        out.append(
            (f"dpp-category d=0.5 n={n}", {"n_candidates": n, "diversity_method": "dpp", "diversity": 0.5}, "category")
        )
        for cap in (1, 2):
            quota = {"n_candidates": n, "constraint": {"max_per_category": cap, "level": level}}
            out.append((f"quota max{cap}/cat n={n}", quota, "category"))
    return out


def curve_configs(configs: Sequence[EvalConfig], level: int, embeddings: bool = True) -> list[EvalConfig]:
    """The sweep around the first fusion config and the first score-mode LLM config of `configs`.

    `embeddings`: whether the run has item embeddings (a dense signal); without them the embedding-MMR points
    are left out rather than silently computed on categories.
    """
    bases: list[EvalConfig] = []
    for system in ("fusion", "llm"):
        for c in configs:
            if c.system == system and c.perturb == "none" and c.generator_config().mode == "score":
                bases.append(c)
                break
    out = []
    for base in bases:
        own_n = base.generator_config().n_candidates
        pools = (20, 50) if base.system == "fusion" else (own_n,)
        for label, overrides, sim in _settings(level, pools, embeddings):
            if base.system == "llm":
                overrides = {k: v for k, v in overrides.items() if k != "n_candidates"}
                label = label.rsplit(" n=", 1)[0]
            gen = {**base.generator, "diversity": 0.0, "diversity_method": "none", "constraint": {}, **overrides}
            # the LLM's reasons do not move the curve; skipping them keeps the sweep to one LLM pass per user
            out.append(
                base.model_copy(
                    update={"name": f"{base.label}{SEP}{label}", "generator": gen, "similarity": sim, "reasons": False}
                )
            )
    return out


def summarise_curve(systems: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per base system: every point (NDCG@10, coverage@5, ILD@5 with CIs) and the target check against relevance."""
    curves: dict[str, Any] = {}
    for name, s in systems.items():
        base, _, label = name.partition(SEP)
        m = s["metrics"]
        point = {
            "setting": label,
            "ndcg@10": m["ndcg@10"],
            "coverage@5": m["coverage@5"],
            "ild@5": m["ild@5"],
            "recall@10": m["recall@10"],
        }
        curves.setdefault(base, {"points": []})["points"].append(point)
    for curve in curves.values():
        pts = curve["points"]
        ref = next((p for p in pts if p["setting"].startswith("relevance")), pts[0])
        # the largest pool's pure relevance is the reference: that is the list a user gets with diversity off
        refs = [p for p in pts if p["setting"].startswith("relevance")]
        if refs:
            ref = refs[-1]
        n0, c0 = ref["ndcg@10"][0], ref["coverage@5"][0]
        best = None
        for p in pts:
            n, c = p["ndcg@10"][0], p["coverage@5"][0]
            p["ndcg_change"] = round((n - n0) / n0, 4) if n0 > 0 else None
            p["coverage_change"] = round((c - c0) / c0, 4) if c0 > 0 else None
            ok = n0 > 0 and c0 > 0 and c >= (1 + COVERAGE_GAIN) * c0 and n >= (1 - NDCG_LOSS) * n0
            p["meets_target"] = bool(ok)
            if ok and (best is None or c > best["coverage@5"][0]):
                best = p
        curve["reference"] = ref["setting"]
        curve["target"] = {
            "rule": f"coverage@5 >= +{COVERAGE_GAIN:.0%} and NDCG@10 >= -{NDCG_LOSS:.0%} vs pure relevance",
            "met": best is not None,
            "best_setting": best["setting"] if best else None,
        }
    return curves
