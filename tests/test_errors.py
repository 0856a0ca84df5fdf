"""Bad input a user can hand the CLI ends as one line naming the file or flag and the fix, exit code 2 — never a
traceback; and the generator's catch-all fallback hides no bug of ours (issue 12, findings 5, 7 and 8)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from shoprec.cli import app

runner = CliRunner()
DEMO_ADAPTER = Path(__file__).resolve().parents[1] / "generator" / "adapters" / "demo"
DEEP = "[" * 100_000 + "]" * 100_000  # Python's parsers raise RecursionError on this, not a decode error


@pytest.fixture()
def empty_home(tmp_path, monkeypatch):
    """An empty shop folder and no config file: the errors below must come before the store or index is read."""
    monkeypatch.setenv("SHOPREC_HOME", str(tmp_path / "home"))
    for var in ("SHOPREC_CONFIG", "SHOPREC_LLM_BACKEND", "SHOPREC_ADAPTER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _one_clear_line(r, *needles: str) -> None:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output, r.output
    for n in needles:
        assert n in r.output, (n, r.output)


# --- adapters --------------------------------------------------------------------------------------------------


def _adapter(tmp_path: Path) -> Path:
    out = tmp_path / "adapter"
    shutil.copytree(DEMO_ADAPTER, out)
    return out


def _write_lora(a: Path, a_shape: tuple[int, int], b_shape: tuple[int, int]) -> None:
    """One LoRA pair on layer 0's q_proj (SmolLM2-135M: 576 -> 576) with the given shapes."""
    from safetensors.numpy import save_file

    name = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{name}.lora_A.weight": np.zeros(a_shape, np.float32),
        f"{name}.lora_B.weight": np.zeros(b_shape, np.float32),
    }
    save_file(tensors, str(a / "adapter_model.safetensors"))


def _truncated(a: Path) -> str:
    w = a / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return "adapter_model.safetensors"


def _header_cut(a: Path) -> str:
    w = a / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    return "adapter_model.safetensors"


def _wrong_rank(a: Path) -> str:  # adapter_config.json says r=4, the tensors have rank 5
    _write_lora(a, a_shape=(5, 576), b_shape=(576, 5))
    return "adapter_model.safetensors"


def _wrong_base(a: Path) -> str:  # rank 4 as configured, but trained on a model with another hidden size
    _write_lora(a, a_shape=(4, 768), b_shape=(768, 4))
    return "another model"


def _garbage_config(a: Path) -> str:
    (a / "adapter_config.json").write_text("{ this is not json", encoding="utf-8")
    return "adapter_config.json"


def _not_lora_config(a: Path) -> str:
    (a / "adapter_config.json").write_text('{"peft_type": "LORA", "r": "four"}', encoding="utf-8")
    return "adapter_config.json"


def _deep_config(a: Path) -> str:
    (a / "adapter_config.json").write_text(DEEP, encoding="utf-8")
    return "adapter_config.json"


def _deep_manifest(a: Path) -> str:
    (a / "manifest.json").write_text(DEEP, encoding="utf-8")
    return "manifest.json"


def _no_config(a: Path) -> str:
    (a / "adapter_config.json").unlink()
    return "adapter_config.json"


@pytest.mark.parametrize(
    "damage",
    [_truncated, _header_cut, _wrong_rank, _wrong_base, _garbage_config, _not_lora_config, _deep_config,
     _deep_manifest, _no_config],
)  # fmt: skip
def test_a_bad_adapter_is_one_line_naming_the_file(empty_home, damage):
    adapter = _adapter(empty_home)
    needle = damage(adapter)
    r = runner.invoke(app, ["recommend", "--user", "u1", "--adapter", str(adapter)])
    _one_clear_line(r, needle, "Fix")


def test_the_shipped_adapter_passes_the_check():
    from generator.model import check_adapter, ensure_hf_model

    check_adapter(DEMO_ADAPTER, base=ensure_hf_model())  # no error: the check accepts what finetune writes


# --- 100k-deep JSON / TOML wherever users hand the project a file ------------------------------------------------


def test_deeply_nested_catalog_row_is_a_rejected_row(empty_home):
    data = empty_home / "shop"
    data.mkdir()
    (data / "items.jsonl").write_text('{"id": "a", "title": "Pen"}\n' + DEEP + "\n", encoding="utf-8")
    (data / "events.jsonl").write_text('{"user_id": "u", "item_id": "a"}\n', encoding="utf-8")
    r = runner.invoke(app, ["ingest", str(data)])
    _one_clear_line(r, "items.jsonl:2", "nested too deeply")


def test_deeply_nested_config_files(empty_home):
    toml = empty_home / "deep.toml"
    toml.write_text("a = " + DEEP + "\n", encoding="utf-8")
    r = runner.invoke(app, ["--config", str(toml), "candidates", "--user", "u"])
    _one_clear_line(r, "deep.toml", "nested too deeply")
    cfg = empty_home / "deep.json"
    cfg.write_text(DEEP, encoding="utf-8")
    r = runner.invoke(app, ["eval", "--data", "demo", "--config", str(cfg)])
    _one_clear_line(r, "deep.json", "nested too deeply")
    cfg.write_text("[1, 2]", encoding="utf-8")  # valid JSON, but not a config object
    r = runner.invoke(app, ["eval", "--data", "demo", "--config", str(cfg)])
    _one_clear_line(r, "deep.json", "object")
    toml.write_text("system = " + "{ a = " * 50_000 + "1" + " }" * 50_000 + "\n", encoding="utf-8")
    r = runner.invoke(app, ["eval", "--data", "demo", "--config", str(toml)])
    _one_clear_line(r, "deep.toml", "nested too deeply")


# --- flags that cannot work -------------------------------------------------------------------------------------


def test_bogus_prompt_variant_is_rejected_even_without_the_model(empty_home):
    r = runner.invoke(app, ["recommend", "--user", "u", "--no-llm", "--prompt", "bogus"])
    _one_clear_line(r, "--prompt", "'bogus'", "rank, rank_terse")


# --- after `make demo`: the next command points at the demo's folder ----------------------------------------------


def test_after_the_demo_the_missing_index_error_points_at_var_demo(empty_home, monkeypatch):
    monkeypatch.delenv("SHOPREC_HOME")  # the default home var/, as a new user has it
    (empty_home / "var" / "demo" / "index").mkdir(parents=True)
    (empty_home / "var" / "demo" / "index" / "manifest.json").write_text("{}", encoding="utf-8")
    from shoprec.errors import demo_hint

    hint = demo_hint(Path("var"), Path("var/index"))
    assert "--home var/demo" in hint and "SHOPREC_HOME=var/demo" in hint
    assert demo_hint(Path("var/demo"), Path("var/demo/index")) == ""  # already there: no hint
    r = runner.invoke(app, ["candidates", "--user", "U0002"])
    _one_clear_line(r, "--home var/demo")


def test_the_demo_prints_its_next_commands_with_its_home():
    from shoprec.demo import next_commands

    text = next_commands(Path("var/demo"), "U0002")
    assert "shoprec --home var/demo candidates --user U0002" in text
    assert "SHOPREC_HOME=var/demo" in text


# --- the generator's fallback keeps the product guarantee but hides no bug ----------------------------------------


@pytest.fixture(scope="module")
def parts(small_shop):
    from retrieval.catalog import Catalog
    from retrieval.events import histories
    from retrieval.fusion import FusionRetriever
    from retrieval.index import fit_signals
    from retrieval.types import RetrievalRequest

    catalog = Catalog(small_shop.items)
    hist = histories(small_shop.interactions)
    retriever = FusionRetriever(catalog, list(fit_signals(catalog, hist, ("popularity",)).values()))
    user = sorted(hist)[0]
    return catalog, retriever, RetrievalRequest(user_id=user, history=tuple(e.item_id for e in hist[user]))


def _buggy_recommender(parts):
    from generator.backends import make_backend
    from generator.recommender import Recommender

    catalog, retriever, _ = parts

    class Buggy(Recommender):
        def _score_mode(self, prepared):  # our own code failing, not the model
            raise KeyError("a bug in the pipeline")

    return Buggy(retriever, catalog, make_backend("fake"))


def test_a_bug_in_the_pipeline_fails_under_tests(parts):
    with pytest.raises(KeyError, match="a bug in the pipeline"):
        _buggy_recommender(parts).recommend(parts[2])


def test_in_production_a_bug_falls_back_with_its_traceback_logged(parts, monkeypatch, caplog):
    from generator.recommender import RAISE_ENV

    monkeypatch.delenv(RAISE_ENV)
    with caplog.at_level(logging.ERROR, logger="generator.recommender"):
        out = _buggy_recommender(parts).recommend(parts[2])
    assert out.fallback and out.fallback_reason.startswith("internal error: KeyError")
    assert len(out.picks) == 5
    record = next(r for r in caplog.records if r.name == "generator.recommender")
    assert record.exc_info and record.exc_info[0] is KeyError  # the traceback is kept in the log


def test_a_model_failure_still_falls_back_under_tests(parts, caplog):
    from generator.backends import make_backend
    from generator.recommender import Recommender

    catalog, retriever, request = parts
    fake = make_backend("fake")

    class OutOfMemory:
        tokenizer = fake.tokenizer

        def label_logprobs(self, prompts, labels):
            raise RuntimeError("CUDA out of memory")

        def generate(self, *args, **kwargs):
            raise RuntimeError("CUDA out of memory")

    with caplog.at_level(logging.WARNING, logger="generator.recommender"):
        out = Recommender(retriever, catalog, OutOfMemory()).recommend(request)  # type: ignore[arg-type]
    assert out.fallback and out.fallback_reason == "model error: RuntimeError: CUDA out of memory"
    record = next(r for r in caplog.records if r.name == "generator.recommender")
    assert record.exc_info and record.exc_info[0] is RuntimeError


def test_results_file_json_is_unchanged_by_the_persistence_helpers(tmp_path):
    """The one atomic JSON writer keeps the result files' bytes (indent 1, sorted keys) and leaves no temp file."""
    from eval.harness import write_json

    path = tmp_path / "r" / "x.json"
    write_json(path, {"b": np.float64(0.5), "a": [1, 2]})
    assert path.read_text() == json.dumps({"a": [1, 2], "b": 0.5}, indent=1, sort_keys=True) + "\n"
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]
