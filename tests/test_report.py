"""The README's results sections are regenerated from the benchmark JSON (eval/bench/report.py)."""

from __future__ import annotations

import json
from pathlib import Path

from eval.bench.report import update_readme


def _system(ndcg: float, system: str = "fusion") -> dict:
    m = {k: [ndcg, ndcg - 0.01, ndcg + 0.01] for k in ("ndcg@10", "recall@10", "mrr@10", "coverage@5", "ild@5")}
    m.update({k: [0.5, 0.4, 0.6] for k in ("alpha_ndcg@10", "novelty@10", "valid", "grounded")})
    agg = {"catalog_coverage@10": 0.2, "gini@10": 0.8, "latency_ms": {"p50": 1.0, "p99": 2.0}}
    return {"metrics": m, "aggregate": agg, "config": {"system": system}}


def _run(dataset: str, systems: dict) -> dict:
    return {"dataset": dataset, "protocol": "full", "test_users": 200, "test_users_total": 943, "category_level": 1,
            "seconds": 1.0, "code_version": "abc1234 (exported copy)", "systems": systems}  # fmt: skip


def test_readme_sections_come_from_the_json(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "eval-ml-100k.json").write_text(json.dumps(_run("ml-100k", {"fusion": _system(0.1454)})))
    finetune = {
        "dataset": "ml-100k",
        "adapter_manifest": {
            "peft": {"rank": 8, "target_modules": "all-linear"},
            "train_config": {"lr": 5e-4, "select_by": "fused"},
            "data": {"options": {"rank_loss": "labels"}, "examples": {"examples": 560}},
            "fusion": {"llm_weight": 0.0},
            "validation": {"best": {"step": 0, "retrieval": {"ndcg@10": [0.1175]}, "llm": {"ndcg@10": [0.1109]}}},
            "reasons": {"confirmed": 47, "checked": 50},
            "steps": 160,
            "train_seconds": 2622.6,
        },
        "train_seconds": 2790.1,
        "curve": [{"step": 0, "llm_ndcg@10": 0.1054}, {"step": 52, "llm_ndcg@10": 0.0923}],
        "eval": _run(
            "ml-100k",
            {
                "retrieval order": {**_system(0.5), "per_user": {"ndcg@10": [1.0, 0.0] * 20}},
                "tuned LLM + fusion (w=0)": {**_system(0.5, "llm"), "per_user": {"ndcg@10": [1.0, 0.0] * 20}},
                "untuned LLM": {**_system(0.5, "llm"), "per_user": {"ndcg@10": [1.0, 0.0] * 20}},
                "tuned LLM alone": {**_system(0.1321, "llm"), "per_user": {"ndcg@10": [0.0, 0.0] * 20}},
            },
        ),
        "llmrank": _run("ml-100k", {"SASRec": _system(0.6012, "sasrec")}),
        "note": "Resumed once.",
    }
    (results / "finetune-ml-100k.json").write_text(json.dumps(finetune))
    readme = tmp_path / "README.md"
    stale = "old text\n"
    readme.write_text(
        f"intro\n<!-- results:eval -->\n{stale}<!-- /results:eval -->\n"
        f"<!-- results:finetune -->\n{stale}<!-- /results:finetune -->\nend\n"
    )
    assert update_readme(readme, results) == ["eval", "finetune"]
    text = readme.read_text()
    assert stale not in text and text.startswith("intro\n") and text.endswith("end\n")
    assert "| ml-100k | fusion | 0.1454 [0.135, 0.155]" in text
    assert "| ml-100k | tuned LLM alone | 0.1321" in text  # the fine-tuning run's rows join the eval table
    assert "listwise label loss on 560 examples, lr 0.0005, 160 steps (best checkpoint by fused" in text
    assert "validation NDCG@10: step 0, the untuned weights); 2622.6 s" in text
    assert "47/50" in text and "Resumed once." in text
    assert "(2790.1 s for the whole `shoprec finetune` command)" in text
    assert "by step: 0: 0.1054, 52: 0.0923." in text
    assert "| SASRec | 0.6012 [0.591, 0.611] |" in text  # the LLMRank part
    # the targets as paired tests on the same users: the blend that serves retrieval order is identical to it;
    # a tuned model that loses every user the untuned one won is called worse, with its direction
    assert (
        "- tuned LLM + fusion (w=0) vs retrieval order (B vs A): no detectable difference on NDCG@10: the same "
        "value for every one of the 40 users" in text
    )
    assert "- tuned LLM alone vs untuned LLM (B vs A): B worse on NDCG@10 by -0.5000" in text
    assert "SASRec (B vs A)" not in text  # SASRec is only in the LLMRank part, with no per-user values here
    assert "code `abc1234 (exported copy)`" in text


def test_every_evaluation_gets_an_html_page(tmp_path: Path) -> None:
    from eval.bench.report import write_html_reports

    run = {**_run("office", {"fusion": _system(0.0578)}), "split": "loo", "seed": 0, "items": 2420, "events": 53258,
           "data_hash": "f" * 64}  # fmt: skip
    (tmp_path / "eval-office.json").write_text(json.dumps(run))
    (tmp_path / "finetune-office.json").write_text(json.dumps({"dataset": "office"}))  # not an eval: no page
    pages = write_html_reports(tmp_path)
    assert [p.name for p in pages] == ["eval-office.html"]
    page = pages[0].read_text()
    assert "<td>fusion</td>\n<td>0.0578 [0.048, 0.068]</td>" in page and "<img" not in page  # no plot, no image
