"""The application core shared by the CLI and the HTTP API (shoprec/api.py): store + index -> candidates.

It resolves a user's history from the store, validates request fields against the catalog (an unknown cart item
is a request error naming the field, not a silent drop), and asks the fused retriever for candidates.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from retrieval.catalog import Catalog
from retrieval.fusion import FusionRetriever
from retrieval.types import Candidate, Filters, RetrievalRequest
from shoprec.config import Settings


class RequestError(ValueError):
    """A request field is invalid: the message names the field and the fix."""


_category_paths: weakref.WeakKeyDictionary[Catalog, frozenset[str]] = weakref.WeakKeyDictionary()


def check_categories(catalog: Catalog, categories: Sequence[str]) -> None:
    """RequestError for a category filter that no catalog category path starts with (it would silently match
    nothing), naming the close matches by spelling (difflib) or else the top-level categories."""
    import difflib

    if not categories:
        return
    paths = _category_paths.get(catalog)
    if paths is None:  # once per catalog: a live catalog is a new object after each change
        paths = frozenset(" > ".join(it.category[:n]) for it in catalog.items for n in range(1, len(it.category) + 1))
        _category_paths[catalog] = paths
    for wanted in categories:
        if wanted in paths:
            continue
        close = difflib.get_close_matches(wanted, sorted(paths), n=5, cutoff=0.6)
        close += [p for p in sorted(paths) if wanted.lower() in p.lower() and p not in close][: 5 - len(close)]
        hint = close or sorted({p.split(" > ")[0] for p in paths})[:10]
        raise RequestError(
            f"--category / filters.categories: {wanted!r} matches no catalog category. Fix: use a category path "
            f"(levels joined with ' > '), e.g. {', '.join(repr(h) for h in hint) or 'none: no item has a category'}."
        )


class Shoprec:
    """One shop: its store, catalog and retrieval index, opened lazily from Settings."""

    def __init__(self, settings: Settings, *, create_store: bool = True) -> None:
        self.settings = settings
        self.create_store = create_store  # False: a missing store is an error (read-only commands), not a new file

    @cached_property
    def store(self) -> Any:
        from retrieval.store import open_store  # SQLite or PostgreSQL, by URL

        return open_store(self.settings.store_url, create=self.create_store)

    @cached_property
    def catalog(self) -> Catalog:
        return Catalog(self.store.items())

    @cached_property
    def encoder(self) -> Any:
        from retrieval.embed import Encoder

        return Encoder(self.settings.embedding_model)

    @cached_property
    def retriever(self) -> FusionRetriever:
        import dataclasses

        from retrieval.index import load_index

        fusion = load_index(self.settings.index_path, self.catalog, encoder=self.encoder)
        if self.settings.new_item_share:  # a serving choice: no re-indexing needed
            fusion.config = dataclasses.replace(fusion.config, new_item_share=self.settings.new_item_share)
        return fusion

    @cached_property
    def live(self) -> Any:
        """The index that serves requests and takes writes without a rebuild (retrieval.live.LiveIndex)."""
        try:
            from retrieval.live import LiveIndex
        except ImportError:  # without the live layer the built index serves as is (no incremental updates)
            return self.retriever
        # the index as built, brought up to date with the store's items and the events written since the build
        return LiveIndex.open(self.settings.index_path, self.store, encoder=self.encoder)

    @property
    def backend(self) -> Any:
        """The LLM backend (transformers on CPU by default) with the configured adapter, loaded on first use."""
        return self.backend_for(self.settings.adapter)

    def backend_for(self, adapter: str | None) -> Any:
        """The LLM backend with this adapter folder on top (None: the base model); one per adapter, cached."""
        from generator.backends import make_backend
        from generator.model import ModelSpec

        backends: dict[str | None, Any] = self.__dict__.setdefault("_backends", {})
        if adapter not in backends:
            if self.settings.llm_backend == "fake":  # deterministic stand-in for tests and dry runs
                backends[adapter] = make_backend("fake")
            else:
                spec = ModelSpec(model=self.settings.llm_model, adapter=adapter)
                kwargs: dict[str, Any] = {}
                if self.settings.llm_backend == "vllm":
                    # LoRA slots only where an adapter can be asked for: with LoRA on, vLLM on CPU runs its model
                    # uncompiled, and the base model's score mode at 32 in flight went from 1.1-1.2 to 1.8 req/s
                    # without them (docs/vllm.md). One value per process: every adapter shares one engine.
                    configured = self.settings.adapter is not None or bool(self.settings.adapters)
                    kwargs["max_loras"] = 4 if configured or adapter is not None else 0
                backends[adapter] = make_backend(self.settings.llm_backend, model_spec=spec, **kwargs)
        return backends[adapter]

    def recommender(self, *, use_llm: bool = True, retriever: Any = None, adapter: str | None = None) -> Any:
        """The generator pipeline over `retriever` (default: the built index) with `adapter` (default: configured)."""
        from generator.model import ModelSpec, adapter_generator_settings, check_adapter, resolve_model_path
        from generator.recommender import GeneratorConfig, Recommender

        adapter = adapter if adapter is not None else self.settings.adapter
        if use_llm and adapter is not None and self.settings.llm_backend != "fake":
            # a bad adapter folder is one error naming its file, in milliseconds, before the index and model load
            check_adapter(adapter, base=resolve_model_path(ModelSpec(model=self.settings.llm_model)))
        retriever = retriever if retriever is not None else self.retriever
        catalog = getattr(retriever, "catalog", self.catalog)
        vectors = getattr(retriever, "item_vectors", None)
        if vectors is None:
            vectors = getattr(self.retriever.retrievers.get("dense"), "vectors", None)
        # A shoprec-trained adapter carries the LLM/retrieval blend fitted on its validation users and the prompt
        # settings it was trained with: serve with both.
        config = GeneratorConfig(**adapter_generator_settings(adapter))  # type: ignore[arg-type]
        backend = self.backend_for(adapter) if use_llm else None
        return Recommender(retriever, catalog, backend, config=config, item_vectors=vectors)

    def build_index(self, log: Callable[[str], None] = print) -> FusionRetriever:
        """Train every signal from the store's events and write the index folder (atomically)."""
        from retrieval.index import build_index, read_store_histories
        from retrieval.sequential import SASRecConfig

        if len(self.catalog) == 0:
            raise RequestError("the store has no items. Fix: run `shoprec ingest PATH` first.")
        # SASRec's defaults are the setting measured best on ml-100k and Office (retrieval/sequential.py, and
        # eval/bench/retrieval.py); epochs may be capped for demos
        cfg = SASRecConfig(seed=self.settings.seed, epochs=self.settings.sasrec_epochs or SASRecConfig.epochs)
        # compact histories (memory ~100 B per event), and the store position a live index catches up from
        events, store_state = read_store_histories(self.store)
        fusion = build_index(
            self.catalog,
            events,
            self.settings.index_path,
            fit_fusion_weights=self.settings.fit_fusion,
            store_state=store_state,
            log=log,
            encoder=self.encoder,
            sasrec_config=cfg,
            flat_threshold=self.settings.dense_flat_threshold,
        )
        self.__dict__["retriever"] = fusion
        return fusion

    def request(
        self,
        *,
        user: str | None = None,
        query: str | None = None,
        cart: Sequence[str] = (),
        filters: Filters | None = None,
        catalog: Catalog | None = None,
        history_limit: int | None = None,
    ) -> RetrievalRequest:
        """Build a request, pulling the user's history from the store. Unknown users are cold users.

        `catalog`: the one to check ids against (the live index's, when serving); `history_limit`: only the newest
        events of a long history (the prompt shows ~10; the service bounds the work per request)."""
        catalog = catalog if catalog is not None else self.catalog
        unknown = [i for i in cart if i not in catalog]
        if unknown:
            raise RequestError(
                f"cart: unknown item id(s) {', '.join(unknown)}. Fix: use ids from the catalog "
                f"(e.g. {', '.join(catalog.ids[:3])})."
            )
        if filters is not None:
            check_categories(catalog, filters.categories)
        history: tuple[str, ...] = ()
        if user is not None:
            items = self.store.history_items(user, limit=history_limit)
            history = tuple(i for i in items if i in catalog)
        return RetrievalRequest(
            user_id=user, history=history, query=query, cart=tuple(cart), filters=filters or Filters()
        )

    def candidates(self, request: RetrievalRequest, k: int = 20) -> list[Candidate]:
        if k < 1:
            raise RequestError(f"k must be >= 1, got {k}.")
        return self.retriever.retrieve(request, k)

    def describe(self, candidates: Sequence[Candidate]) -> list[dict[str, Any]]:
        """Candidates joined with their items, as plain dicts (the --json output)."""
        out = []
        for rank, c in enumerate(candidates, start=1):
            item = self.catalog[c.item_id]
            out.append(
                {
                    "rank": rank,
                    "item_id": c.item_id,
                    "title": item.title,
                    "category": " > ".join(item.category),
                    "brand": item.brand,
                    "price": item.price,
                    "score": round(c.score, 6),
                    "signals": {n: {"rank": e.rank, "score": round(e.score, 6)} for n, e in c.sources.items()},
                }
            )
        return out


def default_settings_for(home: Path) -> Settings:
    return Settings(home=home)
