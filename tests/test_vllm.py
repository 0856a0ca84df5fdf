"""The vLLM backends: constraints as data, the in-engine logits processor, parity with transformers, adapters.

The first half runs anywhere (no vllm): specs round-trip as JSON and rebuild controllers that decide exactly as the
directly built ones, and the engine-side masking (`SpecMasker`) keeps only what a controller allows. The second half
(marked `vllm`) runs in .venv-vllm on the real engine, in-process and against a real `vllm serve` on loopback
(tests/vllm_support.py starts one per session): label log-probabilities match the transformers backend (float32),
random candidate sets and category rules give 0 invalid, duplicate or quota-violating picks and 0 parse failures,
an adapter changes the scores, and two adapters served by one engine in the same batch each give their own.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from generator.backends.fake import FakeBackend
from generator.constraints import CategoryConstraint, allowed_next, check_picks, feasible
from generator.decoding import PicksController, ReasonController, build_controller
from generator.spec import SPEC_KEY, ForcedSpec, PicksSpec, ReasonSpec, TokenSetSpec, spec_from_json
from tests.vllm_support import adapters, require_vllm, vllm_backend, vllm_server, vllm_server_backend

LABELS = tuple("ABCDEFGHIJKLMNOPQRST")


def _walk(ctrl: object, pick: int = 0, steps: int = 80) -> list[int]:
    """Follow a controller, taking its `pick`-th allowed token (mod the count) each step, until done."""
    ids: list[int] = []
    for _ in range(steps):
        if ctrl.done(ids):  # type: ignore[attr-defined]
            break
        allowed = np.asarray(ctrl.allowed(ids)).tolist()  # type: ignore[attr-defined]
        ids.append(int(allowed[(pick + len(ids)) % len(allowed)]))
    return ids


# --- anywhere: specs and the masking logic ---------------------------------------------------------------------------


def test_spec_rebuilds_the_same_controller_across_json() -> None:
    tok = FakeBackend().tokenizer
    constraint = CategoryConstraint(max_per_category=1, min_categories=3)
    cats = ("x > a", "x > b", "x", "y", "y", "z")
    spec = PicksSpec(
        labels=LABELS[:6],
        k=3,
        categories=cats,
        constraint=constraint,
        max_reason_tokens=8,
        reason_choices={1: ("Goes with your tent.",)},
    )
    direct = PicksController(
        tok,
        LABELS[:6],
        3,
        functools.partial(allowed_next, constraint, ["x", "x", "x", "y", "y", "z"], k=3),
        max_reason_tokens=8,
        reason_choices={1: ["Goes with your tent."]},
    )
    rebuilt = build_controller(spec_from_json(spec.to_json()), tok)
    assert isinstance(rebuilt, PicksController) and rebuilt.spec is not None
    assert rebuilt.spec.label_token_ids == tuple(direct.label_ids)  # filled in for the receiver to check
    for pick in range(5):  # different paths through the state machine decide identically
        assert _walk(rebuilt, pick) == _walk(direct, pick)
        picks = rebuilt.parse(_walk(rebuilt, pick))
        assert check_picks([p.label for p in picks], LABELS[:6], list(cats), 3, constraint) == []


def test_reason_controller_carries_its_spec() -> None:
    tok = FakeBackend().tokenizer
    ctrl = ReasonController(
        tok, ["C"], first_number=2, prefilled=True, max_reason_tokens=6, reason_choices={0: ["Hi."]}
    )
    assert isinstance(ctrl.spec, ReasonSpec)
    again = build_controller(spec_from_json(ctrl.spec.to_json()), tok)
    assert _walk(again) == _walk(ctrl) and again.max_new_tokens == ctrl.max_new_tokens


def test_bad_specs_name_the_problem() -> None:
    with pytest.raises(ValueError, match="k=5 picks asked for but only 2 labels"):
        PicksSpec(labels=("A", "B"), k=5)
    with pytest.raises(ValueError, match="needs the candidates' categories"):
        PicksSpec(labels=("A", "B"), k=1, constraint=CategoryConstraint(max_per_category=1))
    with pytest.raises(ValueError, match="kind"):
        spec_from_json(json.dumps({"kind": "regex", "pattern": "x"}))
    tok = FakeBackend().tokenizer
    with pytest.raises(ValueError, match="different tokenizers"):
        build_controller(PicksSpec(labels=("A", "B"), label_token_ids=(1, 2), k=1), tok)
    assert PicksController(tok, ["A", "B"], 1, lambda chosen: np.ones(2, dtype=bool)).spec is None  # arbitrary fn


def test_controllers_without_a_spec_are_refused_by_the_engines() -> None:
    from generator.backends.vllm_backend import controller_spec_json

    class Plain:
        def allowed(self, generated: Sequence[int]) -> list[int]:
            return [1]

        def done(self, generated: Sequence[int]) -> bool:
            return True

    with pytest.raises(TypeError, match="must carry a generator.spec"):
        controller_spec_json(Plain())  # type: ignore[arg-type]
    assert controller_spec_json(None) is None
    assert json.loads(controller_spec_json(build_controller(ForcedSpec(token_ids=(5,)), FakeBackend().tokenizer)) or "")


def test_spec_masker_keeps_only_allowed_tokens_then_eos() -> None:
    torch = pytest.importorskip("torch")
    from generator.backends.vllm_logits import SpecMasker, masker_for

    tok = FakeBackend().tokenizer
    eos = tok.eos_token_id
    masker = SpecMasker(build_controller(TokenSetSpec(token_ids=(7, 9), n=2), tok), eos)
    row = torch.arange(tok.vocab_size, dtype=torch.float32)
    out = masker([], row.clone())
    assert torch.isfinite(out).nonzero().flatten().tolist() == [7, 9] and out[9] == 9.0  # values kept
    assert torch.isfinite(masker([7, 9], row.clone())).nonzero().flatten().tolist() == [eos]  # done: EOS only
    # the engine-side masker of a picks spec never lets a chosen label or a full category through
    spec = PicksSpec(
        labels=LABELS[:4], k=2, categories=("x", "x", "y", "z"), constraint=CategoryConstraint(max_per_category=1)
    )
    m = masker_for(spec.to_json(), tok)
    ctrl = m.controller
    ids = _walk(ctrl, 0)
    for n in range(len(ids)):
        allowed = torch.isfinite(m(ids[:n], row.clone())).nonzero().flatten().tolist()
        assert allowed == sorted(np.asarray(ctrl.allowed(ids[:n])).tolist())
    with pytest.raises(ValueError):
        masker_for('{"kind": "picks", "labels": []}', tok)


def test_the_in_process_engine_has_lora_slots_only_when_an_adapter_can_be_asked_for(tmp_path, monkeypatch) -> None:
    """vLLM on CPU runs its model uncompiled when LoRA is on (the base model's score mode: 1.8 req/s at 32 in flight
    without LoRA slots, 1.1-1.2 with): the service turns them on only when adapters are configured or asked for,
    and then for every backend of the process (all adapters share one engine)."""
    import generator.backends
    from shoprec.config import Settings
    from shoprec.service import Shoprec

    made: list[tuple[str, dict]] = []
    monkeypatch.setattr(generator.backends, "make_backend", lambda name, **kw: made.append((name, kw)) or object())

    def loras(asked: str | None, **settings: object) -> object:
        made.clear()
        Shoprec(Settings(home=tmp_path, llm_backend="vllm", **settings)).backend_for(asked)
        return made[0][1].get("max_loras")

    assert loras(None) == 0
    assert loras(str(tmp_path / "a")) == 4
    assert loras(None, adapters={"tuned": str(tmp_path / "a")}) == 4  # the base-model requests share the engine
    assert loras(None, adapter=str(tmp_path / "a")) == 4
    made.clear()
    Shoprec(Settings(home=tmp_path, llm_backend="transformers")).backend_for(None)
    assert "max_loras" not in made[0][1]  # only the vLLM engine has LoRA slots


def test_serve_command_loads_the_processor_and_the_adapters(tmp_path) -> None:
    from generator.backends.vllm_server import PROCESSOR, serve_command
    from shoprec.cli_llm import parse_adapters

    cmd = serve_command("/models/x", {"demo": str(tmp_path)}, port=8123, dtype="float32")
    text = " ".join(cmd)
    assert f"--logits-processors {PROCESSOR}" in text and "--enable-prefix-caching" in text
    assert f"--lora-modules demo={tmp_path.resolve()}" in text and "--port 8123" in text and "/models/x" in cmd
    assert "--enable-lora" not in " ".join(serve_command("/models/x"))
    with pytest.raises(ValueError, match="no adapter_config.json"):
        parse_adapters([f"x={tmp_path}"])
    (tmp_path / "adapter_config.json").write_text("{}")
    assert parse_adapters([f"x={tmp_path}", str(tmp_path)]) == {"x": str(tmp_path), tmp_path.name: str(tmp_path)}
    assert SPEC_KEY == "shoprec_spec"


# --- on the real engine (.venv-vllm) ---------------------------------------------------------------------------------


def _engine(name: str):  # type: ignore[no-untyped-def]
    require_vllm()
    return vllm_backend() if name == "vllm" else vllm_server_backend()


@functools.cache
def _transformers_fp32():  # type: ignore[no-untyped-def]
    import torch

    from generator.backends import make_backend

    torch.set_num_threads(1)
    return make_backend("transformers", dtype="float32", prefix_cache_mb=0)


def _ranking_prompts(tok, n: int, seed: int) -> tuple[list[str], list[list[str]]]:  # type: ignore[no-untyped-def]
    """Prompts shaped like the recommender's: a shopper, m labelled candidates, 'Answer: (' at the end."""
    rng = np.random.default_rng(seed)
    words = ["tent", "lamp", "kettle", "jacket", "boots", "stove", "mug", "rope", "map", "pan", "sock", "hat"]
    prompts, labels = [], []
    for _ in range(n):
        m = int(rng.integers(3, 21))
        lines = [f"({LABELS[j]}) {' '.join(rng.choice(words, 3))}" for j in range(m)]
        user = "Recently bought: " + ", ".join(rng.choice(words, 4)) + ".\nCandidates:\n" + "\n".join(lines)
        prompts.append(tok.chat_template([{"role": "user", "content": user + "\nPick the best one."}]) + "Answer: (")
        labels.append(list(LABELS[:m]))
    return prompts, labels


ENGINE_NAMES = [
    pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.slow]),
    pytest.param("vllm-server", marks=[pytest.mark.vllm, pytest.mark.slow]),
]


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_label_scores_match_transformers(name: str) -> None:
    engine = _engine(name)
    prompts, labels = _ranking_prompts(engine.tokenizer, 16, seed=1)
    got = engine.label_logprobs(prompts, labels)
    want = _transformers_fp32().label_logprobs(prompts, labels)
    diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
    top1 = np.mean([int(np.argmax(g) == np.argmax(w)) for g, w in zip(got, want, strict=True)])
    print(f"{name}: max |log p(vLLM) - log p(transformers)| = {diff:.2e}, top-1 agreement {top1:.0%}")
    assert diff < 1e-3 and top1 == 1.0


def _random_request(rng: np.random.Generator) -> tuple[int, tuple[str, ...], CategoryConstraint]:
    while True:
        m = int(rng.integers(4, 21))
        cats = tuple(f"dept{int(c)}" for c in rng.integers(0, int(rng.integers(2, 6)), size=m))
        k = int(rng.integers(2, min(m, 6) + 1))
        constraint = CategoryConstraint(
            max_per_category=int(rng.integers(1, 3)), min_categories=int(rng.integers(1, min(k, 3) + 1))
        )
        if feasible(constraint, list(cats), k) is None:
            return k, cats, constraint


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_random_constraints_give_only_valid_picks(name: str) -> None:
    engine = _engine(name)
    tok = engine.tokenizer
    rng = np.random.default_rng(7)
    prompts, _ = _ranking_prompts(tok, 12, seed=2)
    ctrls, cases = [], []
    for _ in prompts:
        k, cats, constraint = _random_request(rng)
        spec = PicksSpec(labels=LABELS[: len(cats)], k=k, categories=cats, constraint=constraint, max_reason_tokens=8)
        ctrls.append(PicksController.from_spec(tok, spec))
        cases.append((k, cats, constraint))
    outs = engine.generate(prompts, ctrls, max_new_tokens=max(c.max_new_tokens for c in ctrls))
    for ctrl, out, (k, cats, constraint) in zip(ctrls, outs, cases, strict=True):
        assert out.finish_reason == "stop", out
        picks = ctrl.parse(out.token_ids)  # raises on any token outside the format
        labels = [p.label for p in picks]
        assert check_picks(labels, LABELS[: len(cats)], list(cats), k, constraint) == [], out.text


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_constrained_generation_matches_transformers(name: str) -> None:
    """The same controller inside the engine decides as it does in the transformers loop: same tokens."""
    engine = _engine(name)
    tok = engine.tokenizer
    prompts, _ = _ranking_prompts(tok, 4, seed=3)
    specs = [ReasonSpec(labels=("B",), prefilled=True, max_reason_tokens=10) for _ in prompts]
    rows = [p + "B)" for p in prompts]
    got = engine.generate(rows, [build_controller(s, tok) for s in specs], max_new_tokens=12)
    want = _transformers_fp32().generate(rows, [build_controller(s, tok) for s in specs], max_new_tokens=12)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_adapters_change_scores_and_coexist_on_one_engine(name: str) -> None:
    engine = _engine(name)
    prompts, labels = _ranking_prompts(engine.tokenizer, 4, seed=4)
    demo = engine.with_adapter(adapters()["demo"])
    other = engine.with_adapter(adapters()["demo-x3"])
    base_scores = engine.label_logprobs(prompts, labels)
    alone = {"demo": demo.label_logprobs(prompts, labels), "demo-x3": other.label_logprobs(prompts, labels)}
    for scores in alone.values():
        assert max(float(np.abs(a - b).max()) for a, b in zip(scores, base_scores, strict=True)) > 1e-3
    assert max(float(np.abs(a - b).max()) for a, b in zip(alone["demo"], alone["demo-x3"], strict=True)) > 1e-3
    # both adapters (and the base model) in flight at once: one engine batches them, each keeps its own scores
    together: dict[str, list] = {}
    threads = [
        threading.Thread(target=lambda n=n, b=b: together.__setitem__(n, b.label_logprobs(prompts, labels)))
        for n, b in (("demo", demo), ("demo-x3", other), ("base", engine))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n, want in (*alone.items(), ("base", base_scores)):
        for a, b in zip(together[n], want, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-3)


@pytest.mark.vllm
@pytest.mark.slow
def test_server_refuses_an_adapter_it_does_not_serve(tmp_path) -> None:
    require_vllm()
    from generator.backends import make_backend
    from generator.model import ModelSpec

    with pytest.raises(ValueError, match="does not serve the adapter"):
        make_backend(
            "vllm-server", base_url=vllm_server(), dtype="float32", model_spec=ModelSpec(adapter=str(tmp_path))
        )
    with pytest.raises(RuntimeError, match="400"):
        vllm_server_backend()._post({"model": "shoprec-base", "prompt": [1, 2], "vllm_xargs": {SPEC_KEY: "{}"}}, 30)


@pytest.mark.vllm
@pytest.mark.slow
def test_recommender_on_vllm(small_shop) -> None:
    """The whole pipeline on vLLM, both modes: valid, grounded, no fallback; in score mode the same ranked picks as
    the transformers backend (float32 both: the label scores agree, see above)."""
    require_vllm()
    from generator.recommender import GeneratorConfig, Recommender
    from retrieval.catalog import Catalog
    from retrieval.events import histories
    from retrieval.fusion import FusionRetriever
    from retrieval.index import fit_signals
    from retrieval.types import RetrievalRequest

    catalog = Catalog(small_shop.items)
    hist = histories(small_shop.interactions)
    retriever = FusionRetriever(catalog, list(fit_signals(catalog, hist, ("popularity", "itemknn", "bm25")).values()))
    requests = [RetrievalRequest(user_id=u, history=tuple(e.item_id for e in hist[u])) for u in sorted(hist)[:2]]
    on_vllm = Recommender(retriever, catalog, vllm_backend())
    for mode in ("score", "generate"):
        cfg = GeneratorConfig(mode=mode, timeout_s=300)
        for out in on_vllm.recommend_batch(requests, cfg):
            assert not out.fallback, out.fallback_reason
            ids = [p.item_id for p in out.picks]
            cats = [catalog[i].category_at(cfg.constraint.level) for i in ids]
            assert len(set(ids)) == cfg.k and check_picks(ids, ids, cats, cfg.k, cfg.constraint) == []
            assert all(p.reason.strip() for p in out.picks)
    cfg = GeneratorConfig(timeout_s=300)
    want = Recommender(retriever, catalog, _transformers_fp32()).recommend_batch(requests, cfg)
    got = on_vllm.recommend_batch(requests, cfg)
    assert [[p.item_id for p in r.picks] for r in got] == [[p.item_id for p in r.picks] for r in want]
