"""The recommendation pipeline: validity guarantees, fallback, and both modes (fake backend for logic; the real
SmolLM2 backend in the slow test at the end)."""

from __future__ import annotations

import numpy as np
import pytest

from generator.backends import make_backend
from generator.constraints import CategoryConstraint, check_picks
from generator.reasons import ReasonContext, check_reason, grounded_sentences
from generator.recommender import GeneratorConfig, Recommender
from retrieval.catalog import Catalog
from retrieval.events import histories
from retrieval.fusion import FusionRetriever
from retrieval.index import fit_signals
from retrieval.types import RetrievalRequest


@pytest.fixture(scope="module")
def parts(small_shop):
    catalog = Catalog(small_shop.items)
    hist = histories(small_shop.interactions)
    signals = fit_signals(catalog, hist, ("popularity", "itemknn", "bm25"))
    return catalog, hist, FusionRetriever(catalog, list(signals.values()))


def _requests(hist, n):
    users = sorted(hist)[:n]
    return [RetrievalRequest(user_id=u, history=tuple(e.item_id for e in hist[u])) for u in users]


def _assert_valid(rec, catalog, retriever, request, cfg):
    cands = [c.item_id for c in retriever.retrieve(request, cfg.n_candidates * 5)]
    ids = [p.item_id for p in rec.picks]
    cats = [catalog[i].category_at(cfg.constraint.level) for i in ids]
    assert len(ids) == cfg.k and len(set(ids)) == cfg.k
    assert set(ids) <= set(cands)
    assert check_picks(ids, ids, cats, cfg.k, cfg.constraint) == []
    assert [p.rank for p in rec.picks] == list(range(1, cfg.k + 1))
    assert all(p.reason.strip() for p in rec.picks)


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_random_constraints_never_violated_fake_backend(parts, mode):
    catalog, hist, retriever = parts
    rec = Recommender(retriever, catalog, make_backend("fake", seed=3))
    rng = np.random.default_rng(0)
    for request in _requests(hist, 40):
        k = int(rng.integers(2, 7))
        cfg = GeneratorConfig(
            mode=mode,
            k=k,
            diversity=float(rng.random()),
            diversity_method=str(rng.choice(["none", "mmr", "dpp"])),
            constraint=CategoryConstraint(
                max_per_category=int(rng.integers(1, 4)), min_categories=int(rng.integers(1, min(k, 4) + 1))
            ),
        )
        out = rec.recommend(request, cfg)
        assert not out.fallback, out.fallback_reason
        _assert_valid(out, catalog, retriever, request, cfg)


def test_no_backend_is_retrieval_mode_not_a_failure(parts):
    catalog, hist, retriever = parts
    request = _requests(hist, 1)[0]
    out = Recommender(retriever, catalog, None).recommend(request)
    assert out.mode == "retrieval" and not out.fallback and len(out.picks) == 5
    cfg = GeneratorConfig()
    _assert_grounded(out, catalog, retriever, request, cfg, min(cfg.max_history, cfg.reason_history))


class Broken:
    def __init__(self, fake, error=None, finish=None):
        self.fake, self.error, self.finish = fake, error, finish
        self.tokenizer = fake.tokenizer

    def label_logprobs(self, prompts, labels):
        if self.error:
            raise self.error
        return self.fake.label_logprobs(prompts, labels)

    def generate(self, prompts, controllers=None, max_new_tokens=256, timeout_s=None):
        outs = self.fake.generate(prompts, controllers, max_new_tokens, timeout_s)
        if self.finish:
            outs = [o.model_copy(update={"finish_reason": self.finish}) for o in outs]
        return outs


@pytest.mark.parametrize(
    "backend_kwargs, why",
    [({"error": RuntimeError("CUDA out of memory")}, "model error: RuntimeError"), ({"finish": "timeout"}, "timeout")],
)
def test_failures_fall_back_to_a_valid_diverse_list(parts, backend_kwargs, why):
    catalog, hist, retriever = parts
    backend = Broken(make_backend("fake"), **backend_kwargs)
    cfg = GeneratorConfig(constraint=CategoryConstraint(max_per_category=1))
    request = _requests(hist, 2)[1]
    out = Recommender(retriever, catalog, backend).recommend(request, cfg)
    assert out.fallback and why in out.fallback_reason
    _assert_valid(out, catalog, retriever, request, cfg)
    assert len({p.category for p in out.picks}) == 5  # the cap of 1 per category held in the fallback too
    _assert_grounded(out, catalog, retriever, request, cfg, min(cfg.max_history, cfg.reason_history))


def test_constraint_widens_candidates_or_says_why(parts):
    catalog, hist, retriever = parts
    request = _requests(hist, 1)[0]
    rec = Recommender(retriever, catalog, make_backend("fake"))
    cfg = GeneratorConfig(k=5, n_candidates=5, constraint=CategoryConstraint(min_categories=5))
    out = rec.recommend(request, cfg)
    assert len({p.category for p in out.picks}) == 5
    with pytest.raises(ValueError, match="category constraint cannot be met.*Fix"):
        rec.recommend(request, GeneratorConfig(k=8, constraint=CategoryConstraint(min_categories=8)))  # 6 exist
    with pytest.raises(ValueError, match="min_categories=6 cannot be met with k=5"):
        GeneratorConfig(k=5, constraint=CategoryConstraint(min_categories=6))


class _CategoryLast:
    """The real retriever's full ranking with every item of one category moved to the end: that category is
    missing from any list shorter than the rest of the catalog."""

    def __init__(self, retriever, catalog, category):
        self.retriever, self.catalog, self.category = retriever, catalog, category

    def retrieve(self, request, k):
        full = self.retriever.retrieve(request, len(self.catalog))
        last = [c for c in full if self.catalog[c.item_id].category_at(1) == self.category]
        return ([c for c in full if c not in last] + last)[:k]


def test_constraint_looks_past_the_wide_list_for_a_needed_category(parts):
    catalog, hist, retriever = parts
    request = _requests(hist, 1)[0]
    rarest = min(
        {it.category_at(1) for it in catalog.items}, key=lambda c: sum(it.category_at(1) == c for it in catalog.items)
    )
    shallow = _CategoryLast(retriever, catalog, rarest)
    assert rarest not in {catalog[c.item_id].category_at(1) for c in shallow.retrieve(request, 200)}
    cfg = GeneratorConfig(k=6, constraint=CategoryConstraint(max_per_category=1))  # the shop has 6 categories
    out = Recommender(shallow, catalog, make_backend("fake")).recommend(request, cfg)
    assert len({p.category for p in out.picks}) == 6 and rarest in {p.category for p in out.picks}


def _assert_grounded(out, catalog, retriever, request, cfg, history_shown):
    """Every reason is a sentence generator.reasons proves for its pick; the checker confirms it unless it is
    the honest no-evidence sentence (only allowed when nothing else holds)."""
    popular = Recommender(retriever, catalog, None).popular_items()  # the catalog's best sellers
    ctx = ReasonContext(catalog, tuple(request.history[-history_shown:]), query=request.query, popular=popular)
    by_id = {c.item_id: c for c in retriever.retrieve(request, 500)}
    confirmed = 0
    for p in out.picks:
        item, cand = catalog[p.item_id], by_id[p.item_id]
        options = grounded_sentences(item, ctx, cand)
        assert p.reason in options, p
        if check_reason(p.reason, item, ctx, cand) is not None:
            confirmed += 1
        else:  # the no-evidence sentence, only for an item nothing checkable backs
            assert all(check_reason(o, item, ctx, cand) is None for o in options), (p, options)
    return confirmed


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_grounded_reasons_are_true_fake_backend(parts, mode):
    catalog, hist, retriever = parts
    rec = Recommender(retriever, catalog, make_backend("fake", seed=5))
    cfg = GeneratorConfig(mode=mode, k=4, max_reason_tokens=64)  # the fake tokenizer spells words out
    shown = cfg.max_history if mode == "generate" else cfg.reason_history_shown
    confirmed = 0
    for request in _requests(hist, 12):
        out = rec.recommend(request, cfg)
        assert not out.fallback, out.fallback_reason
        confirmed += _assert_grounded(out, catalog, retriever, request, cfg, shown)
    assert confirmed > 0


@pytest.mark.slow
def test_real_model_both_modes(parts):
    catalog, hist, retriever = parts
    backend = make_backend("transformers")
    rec = Recommender(retriever, catalog, backend)
    request = _requests(hist, 3)[2]
    for mode in ("score", "generate"):
        cfg = GeneratorConfig(mode=mode, timeout_s=300)
        out = rec.recommend(request, cfg)
        assert not out.fallback, out.fallback_reason
        _assert_valid(out, catalog, retriever, request, cfg)
        for p in out.picks:
            assert any(ch.isalpha() for ch in p.reason) and "1.1.1" not in p.reason
        shown = cfg.max_history if mode == "generate" else cfg.reason_history_shown
        _assert_grounded(out, catalog, retriever, request, cfg, shown)
