"""The generator benchmark (`eval.bench.generator`): its quick mode on the fake backend (JSON structure, zero invalid
outputs), the real SmolLM2 over a few random requests, and the parallel reason rows it measures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.bench import generator as bench
from generator.backends.fake import FakeBackend
from generator.decoding import ReasonController
from tests.test_backends import one_torch_thread, real_backend

INVALID = ("parse_failures", "out_of_candidates", "duplicates", "wrong_length", "constraint_violations")


def test_quick_run_with_the_fake_backend(tmp_path: Path) -> None:
    out = tmp_path / "generator.json"
    bench.main(["--quick", "--backend", "fake", "--out", str(out)])
    report = json.loads(out.read_text())
    assert {"machine", "validity", "latency", "bias", "peak_rss_mb"} <= set(report)
    assert all("load_avg_before" in report[s] and "torch_threads" in report[s] for s in ("validity", "latency", "bias"))
    v = report["validity"]
    assert v["requests"] == bench.QUICK["requests"] and v["parsed_share"] == 1.0 and v["all_valid"]
    assert set(INVALID) <= set(v["invalid"]) and all(n == 0 for n in v["invalid"].values()), v["invalid"]
    assert v["fallbacks"] == 0, v["fallback_reasons"]
    lat = report["latency"]["ms"]
    for part in ("one_pass_ranking", "reasons", "score_e2e", "generate_e2e", "one_pass_ranking_terse"):
        assert 0 < lat[part]["p50"] <= lat[part]["p95"]
    assert lat["reasons_pick_prompt"]["n"] == bench.QUICK["latency_requests"]
    tokens = report["latency"]["prompt_tokens_mean"]
    assert 0 < tokens["rank_terse"] < tokens["rank"]
    assert report["latency"]["throughput"]["score_requests_per_s"] > 0
    conds = report["bias"]["conditions"]
    assert set(conds) == {"first_passes1", "last_passes1", "first_passes3", "last_passes3"}
    assert all(1 <= c["mean_rank"] <= 20 and 0 <= c["ndcg@10"][0] <= 1 for c in conds.values())
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.slow
def test_real_model_random_requests_are_all_valid(tmp_path: Path) -> None:
    out = tmp_path / "generator.json"
    argv = ["--sections", "validity", "--requests", "10", "--group-size", "5", "--datasets", "demo"]
    with one_torch_thread():
        bench.main([*argv, "--reason-tokens", "8", "--threads", "1", "--out", str(out)], backend=real_backend())
    v = json.loads(out.read_text())["validity"]
    assert v["requests"] == 10 and all(n == 0 for n in v["invalid"].values()), v["invalid"]
    assert v["fallbacks"] == 0, (v["fallback_reasons"], v["fallback_examples"])


def test_one_reason_row_per_pick_prefilled() -> None:
    """What score mode decodes: a row starting at "i. (L)" (already in the prompt) that writes only the reason."""
    backend = FakeBackend(seed=5)
    tok = backend.tokenizer
    prompt = tok.chat_template([{"role": "user", "content": "Candidates: (A) tent (K) boots"}])
    forced = ReasonController(tok, ["K"], first_number=3, max_reason_tokens=6)
    ctl = ReasonController(tok, ["K"], first_number=3, max_reason_tokens=6, prefilled=True)
    assert ctl.prompt_suffix == "3. (K)"
    assert ctl.max_new_tokens == forced.max_new_tokens - len(tok.encode("3. (K)"))
    (out,) = backend.generate([prompt + ctl.prompt_suffix], [ctl], max_new_tokens=ctl.max_new_tokens)
    assert out.finish_reason == "stop" and out.text.endswith("\n") and "(" not in out.text[:1]
    (pick,) = ctl.parse(out.token_ids)
    assert pick.label == "K" and any(c.isalpha() for c in pick.reason) and len(pick.reason_ids) <= 6
    (out,) = backend.generate([prompt], [forced], max_new_tokens=forced.max_new_tokens)
    assert out.text.startswith("3. (K) ") and [p.label for p in forced.parse(out.token_ids)] == ["K"]
