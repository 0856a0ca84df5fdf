"""Build, save and load the whole retrieval stage: every signal plus the fusion weights, in one folder.

Layout of an index folder:
    manifest.json     format version, catalog fingerprint, signals, fusion config, build facts
    <signal>/         one sub-folder per signal, written by that signal's own `save`
The folder is written next to its final place and swapped in with a rename, so a crash mid-build leaves the
previous index untouched. Loading checks the catalog fingerprint, so an index never silently serves a catalog it
was not built for.

Fusion weights: when enough users have >= 3 events, every signal is trained without each user's last event and
the per-mode weights are fitted on those held-out events (one leave-one-out validation pass). Serving then uses
the full history at query time. This costs one training run instead of two, at the price of one event per user.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, overload

import numpy as np

from retrieval.base import Retriever
from retrieval.catalog import Catalog
from retrieval.fusion import FusionConfig, FusionRetriever, SignalLists, fit_weights
from retrieval.types import Interaction, InteractionType, RetrievalRequest

FORMAT_VERSION = 1
MIN_USERS_TO_FIT_FUSION = 30
# Held-out users the fusion weights are fitted on, at most (a seeded sample): on 1M events the fit over every
# user did not finish in 15 minutes; 2,000 cases give Recall@20 within about +-0.01 (binomial SE at 0.3).
MAX_FUSION_CASES = 2_000
CATALOG_FILE = "catalog.jsonl"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Signal:
    """One retrieval signal: how to train it from histories, and how to load it back."""

    name: str
    fit: Callable[[Catalog, Mapping[str, Sequence[Interaction]], dict[str, Any]], Retriever]
    load: Callable[[Path, Catalog, dict[str, Any]], Retriever]


def _fit_popularity(catalog: Catalog, hist: Mapping[str, Sequence[Interaction]], opts: dict[str, Any]) -> Retriever:
    from retrieval.popularity import PopularityRetriever

    r = PopularityRetriever(catalog)
    r.fit(hist)
    return r


def _fit_itemknn(catalog: Catalog, hist: Mapping[str, Sequence[Interaction]], opts: dict[str, Any]) -> Retriever:
    from retrieval.collaborative import ItemKNNRetriever

    r = ItemKNNRetriever(catalog)
    r.fit(hist)
    return r


def _fit_sasrec(catalog: Catalog, hist: Mapping[str, Sequence[Interaction]], opts: dict[str, Any]) -> Retriever:
    from retrieval.sequential import SASRecConfig, SequentialRetriever

    cfg = opts.get("sasrec_config") or SASRecConfig()
    r = SequentialRetriever(catalog, cfg)
    r.fit(hist, validation=opts.get("sasrec_validation"))  # None: SASRec holds out each user's last event
    return r


def _fit_dense(catalog: Catalog, hist: Mapping[str, Sequence[Interaction]], opts: dict[str, Any]) -> Retriever:
    from retrieval.dense import DenseRetriever

    # Batches of 16 texts: the encoder's attention buffers grow with batch x length^2, and the longest texts come
    # first. On the demo catalog batch 64 added ~630 MB to the build's peak RSS, 16 about a quarter of that
    # (eval/bench/index_memory.py), at the same speed on CPU.
    return DenseRetriever.build(
        catalog,
        opts["encoder"],
        flat_threshold=opts.get("flat_threshold", 50_000),
        batch_size=opts.get("embed_batch_size", 16),
        progress=opts.get("progress", True),
    )


def _fit_bm25(catalog: Catalog, hist: Mapping[str, Sequence[Interaction]], opts: dict[str, Any]) -> Retriever:
    from retrieval.lexical import BM25Retriever

    return BM25Retriever.build(catalog)


def _load_popularity(d: Path, catalog: Catalog, opts: dict[str, Any]) -> Retriever:
    from retrieval.popularity import PopularityRetriever

    return PopularityRetriever.load(d, catalog)


def _load_itemknn(d: Path, catalog: Catalog, opts: dict[str, Any]) -> Retriever:
    from retrieval.collaborative import ItemKNNRetriever

    return ItemKNNRetriever.load(d, catalog)


def _load_sasrec(d: Path, catalog: Catalog, opts: dict[str, Any]) -> Retriever:
    from retrieval.sequential import SequentialRetriever

    return SequentialRetriever.load(d, catalog)


def _load_dense(d: Path, catalog: Catalog, opts: dict[str, Any]) -> Retriever:
    from retrieval.dense import DenseRetriever

    return DenseRetriever.load(d, catalog, opts["encoder"])


def _load_bm25(d: Path, catalog: Catalog, opts: dict[str, Any]) -> Retriever:
    from retrieval.lexical import BM25Retriever

    return BM25Retriever.load(d, catalog)


# The one place where signals are registered; the order is the build order (cheap ones first).
SIGNALS: dict[str, Signal] = {
    s.name: s
    for s in (
        Signal("popularity", _fit_popularity, _load_popularity),
        Signal("itemknn", _fit_itemknn, _load_itemknn),
        Signal("bm25", _fit_bm25, _load_bm25),
        Signal("dense", _fit_dense, _load_dense),
        Signal("sasrec", _fit_sasrec, _load_sasrec),
    )
}


def get_signal(name: str) -> Signal:
    if name not in SIGNALS:
        raise ValueError(f"unknown retrieval signal {name!r}; valid signals: {', '.join(SIGNALS)}")
    return SIGNALS[name]


def catalog_text_fingerprint(catalog: Catalog) -> str:
    """sha256 over the items' ids and indexed texts, in catalog order: an index is stale when any text changed
    (`retrieval.persist.catalog_ids_fingerprint` covers the ids' order only, for models indexed by row)."""
    h = hashlib.sha256()
    for item in catalog.items:
        h.update(item.id.encode())
        h.update(b"\x00")
        h.update(item.text().encode())
        h.update(b"\x01")
    return h.hexdigest()


class CompactEvent:
    """One event as the signals' `fit` read it: `Interaction`'s attributes on a small slotted object, made on
    access from a user's columns (`UserEvents`) and dropped after use. Read-only by convention."""

    __slots__ = ("user_id", "item_id", "type", "value", "timestamp", "position")

    def __init__(
        self,
        user_id: str,
        item_id: str,
        type: InteractionType,
        value: float | None,
        timestamp: datetime | None,
        position: int | None,
    ) -> None:
        self.user_id = user_id
        self.item_id = item_id
        self.type = type
        self.value = value
        self.timestamp = timestamp
        self.position = position


_TYPES = tuple(InteractionType)
_NO_TIME = np.iinfo(np.int64).min  # column sentinels for None
_NO_POSITION = -1  # positions are >= 0 by validation


class UserEvents(Sequence[Interaction]):
    """One user's events, oldest first, as slices of shared numpy columns: ~30 bytes per event instead of ~740 for
    an `Interaction` (training reads every event of the store at once: 1M events took ~0.75 GB as models).

    Indexing or iterating yields `CompactEvent`s with `Interaction`'s attributes; slicing gives another view.
    """

    __slots__ = ("_user", "_ids", "_cols")

    def __init__(self, user: str, ids: Sequence[str], cols: tuple[np.ndarray, ...]) -> None:
        self._user = user
        self._ids = ids  # item id by code, shared by every user
        self._cols = cols  # item code, type code, value (nan = None), micros, position

    def __len__(self) -> int:
        return len(self._cols[0])

    @overload
    def __getitem__(self, i: int) -> Interaction: ...

    @overload
    def __getitem__(self, i: slice) -> UserEvents: ...

    def __getitem__(self, i: int | slice) -> Interaction | UserEvents:
        if isinstance(i, slice):
            return UserEvents(self._user, self._ids, tuple(c[i] for c in self._cols))
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        return self._event(*(c[i].item() for c in self._cols))

    def __iter__(self) -> Iterator[Interaction]:
        for row in zip(*(c.tolist() for c in self._cols), strict=True):
            yield self._event(*row)

    def _event(self, item: int, kind: int, value: float, micros: int, position: int) -> Interaction:
        return CompactEvent(  # type: ignore[return-value]
            self._user,
            self._ids[item],
            _TYPES[kind],
            None if value != value else value,  # nan: no value
            None if micros == _NO_TIME else _EPOCH + timedelta(microseconds=micros),
            None if position == _NO_POSITION else position,
        )


def _micros_of(ts: datetime | None) -> int:
    if ts is None:
        return int(_NO_TIME)
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)  # the data types document naive timestamps as UTC
    delta = ts - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def read_histories(events: Iterable[Interaction]) -> dict[str, Sequence[Interaction]]:
    """Each user's events, oldest first (as `retrieval.events.histories`: by time, then position, then input
    order; users in order of first appearance), held as compact columns (`UserEvents`) for training.

    Streams `events` (e.g. a store's pages) into typed columns; the signals only read events' attributes.
    """
    from array import array

    users: dict[str, int] = {}
    items: dict[str, int] = {}
    type_code = {t: k for k, t in enumerate(_TYPES)}
    user_col, item_col, type_col = array("i"), array("i"), array("b")
    value_col, micros_col, position_col = array("d"), array("q"), array("q")
    for ev in events:
        user_col.append(users.setdefault(ev.user_id, len(users)))
        item_col.append(items.setdefault(ev.item_id, len(items)))
        type_col.append(type_code[ev.type])
        value_col.append(np.nan if ev.value is None else ev.value)
        micros_col.append(_micros_of(ev.timestamp))
        position_col.append(_NO_POSITION if ev.position is None else ev.position)
    user = np.frombuffer(user_col, dtype=np.int32)
    micros = np.frombuffer(micros_col, dtype=np.int64)
    position = np.frombuffer(position_col, dtype=np.int64)
    # a missing time or position sorts as 0, as in `events.histories`; ties keep the input order (stable)
    order = np.lexsort(
        (np.arange(len(user)), np.where(position < 0, 0, position), np.where(micros == _NO_TIME, 0, micros), user)
    )
    cols = tuple(
        np.frombuffer(c, dtype=d)[order]
        for c, d in ((item_col, np.int32), (type_col, np.int8), (value_col, np.float64), (micros_col, np.int64))
    ) + (position[order],)
    bounds = np.searchsorted(user[order], np.arange(len(users) + 1))  # each user's slice of the sorted columns
    del order, user, user_col, item_col, type_col, value_col, micros_col, position_col
    ids = list(items)
    return {
        name: UserEvents(name, ids, tuple(c[bounds[code] : bounds[code + 1]] for c in cols))
        for name, code in users.items()
    }


def read_store_histories(store: Any, page: int = 10_000) -> tuple[dict[str, Sequence[Interaction]], dict[str, int]]:
    """A store's events as compact training histories (`read_histories`), read page by page, and the store's
    feed positions they were read at: exactly the events up to that event seq, so that a live index started
    from this build (retrieval/live.py) catches up from there without counting any event twice."""
    state = {"last_event_seq": int(store.last_event_seq()), "item_version": int(store.item_version())}

    def events() -> Iterator[Interaction]:
        seq = 0
        while seq < state["last_event_seq"]:
            batch = store.events_since(seq, limit=page)
            if not batch:
                return
            for s, ev in batch:
                if s > state["last_event_seq"]:
                    return
                yield ev
            seq = batch[-1][0]

    return read_histories(events()), state


def fit_signals(
    catalog: Catalog,
    histories: Mapping[str, Sequence[Interaction]],
    names: Sequence[str] = tuple(SIGNALS),
    *,
    log: Callable[[str], None] = lambda _: None,
    **opts: Any,
) -> dict[str, Retriever]:
    """Train (or build) each named signal on `histories`."""
    out: dict[str, Retriever] = {}
    for name in names:
        t0 = time.perf_counter()
        out[name] = get_signal(name).fit(catalog, histories, opts)
        log(f"{name}: built in {time.perf_counter() - t0:.1f}s")
    return out


def holdout_last(
    histories: Mapping[str, Sequence[Interaction]],
    min_events: int = 3,
    *,
    max_users: int | None = None,
    seed: int = 0,
) -> tuple[dict[str, Sequence[Interaction]], list[tuple[tuple[str, ...], str]]]:
    """Split off the last event of each long enough user: (training histories, [(history, target)]).

    With `max_users`, only a seeded random sample of that many eligible users is held out (the others train on
    their whole history): the fusion fit's cost grows with its cases, and 2,000 cases already pin Recall@20
    down to about +-0.01. Training histories share the input's lists where nothing was held out (no copies).
    """
    eligible = sorted(u for u, evs in histories.items() if len(evs) >= min_events)
    if max_users is not None and len(eligible) > max_users:
        rng = np.random.default_rng(seed)
        eligible = sorted(eligible[i] for i in rng.choice(len(eligible), size=max_users, replace=False))
    chosen = set(eligible)
    train: dict[str, Sequence[Interaction]] = {}
    held: list[tuple[tuple[str, ...], str]] = []
    for user in sorted(histories):
        evs = histories[user]
        if user in chosen:
            train[user] = evs[:-1]
            held.append((tuple(e.item_id for e in evs[:-1]), evs[-1].item_id))
        else:
            train[user] = evs
    return train, held


def fit_fusion(
    fusion: FusionRetriever, cases: Sequence[tuple[tuple[str, ...], str]], *, k: int = 20
) -> dict[str, float]:
    """Fit the user-mode fusion weights on (history, target) cases; returns the validation Recall@k per step."""
    names = list(fusion.retrievers)
    prepared: list[tuple[SignalLists, int]] = []
    for hist, target in cases:
        if target not in fusion.catalog.index:
            continue
        lists = fusion.signal_lists(RetrievalRequest(history=hist), names=names)
        prepared.append((lists, fusion.catalog.index[target]))
    cfg = fusion.config
    default_recall = _recall(prepared, cfg.weights["user"], cfg.rrf_k, len(fusion.catalog), k, cfg.method)
    weights, rrf_k, recall, method = fit_weights(prepared, names, len(fusion.catalog), k=k)
    if recall > default_recall:
        fusion.config = dataclasses.replace(  # the fitted rule; the rest (depth, new-item places) as it was
            fusion.config, weights={**fusion.config.weights, "user": weights}, rrf_k=rrf_k, method=method
        )
    return {"default_recall": default_recall, "fitted_recall": max(recall, default_recall), "cases": len(prepared)}


def _recall(
    prepared: Sequence[tuple[SignalLists, int]], ws: Mapping[str, float], rk: float, n: int, k: int, method: str
) -> float:
    from retrieval.fusion import fuse_lists

    hits = 0
    for lists, target in prepared:
        fused = fuse_lists(lists, ws, rk, n, method)
        t = fused[target]
        if t > float("-inf") and int((fused >= t).sum()) <= k:
            hits += 1
    return hits / max(len(prepared), 1)


def _large_frees_back_to_the_os() -> None:
    """Pin glibc's mmap threshold at 1 MB for this process (a no-op off glibc).

    glibc raises the threshold as large blocks are freed (up to 32 MB); after that, training's freed tensors and
    arrays stay in the heap, fragmented, and the resident size only grows: one SASRec epoch on 1M events added
    757 MB to the peak, 538 MB with the threshold pinned (eval/bench/index_memory.py). Results are unchanged.
    """
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to pin
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3 = M_MMAP_THRESHOLD


def build_index(
    catalog: Catalog,
    histories: Mapping[str, Sequence[Interaction]],
    directory: Path,
    *,
    names: Sequence[str] = tuple(SIGNALS),
    fit_fusion_weights: bool = True,
    max_fusion_cases: int | None = MAX_FUSION_CASES,
    store_state: Mapping[str, int] | None = None,
    log: Callable[[str], None] = lambda _: None,
    **opts: Any,
) -> FusionRetriever:
    """Train every signal, fit the fusion weights, and write it all to `directory` atomically.

    `max_fusion_cases`: the fusion weights are fitted on the held-out last events of at most this many users (a
    seeded sample; None = every user with >= 3 events). `store_state`: the store's feed positions the histories
    were read at (e.g. {"last_event_seq": ...}), recorded so that a live index catches up from there.
    """
    directory = Path(directory)
    t0 = time.perf_counter()
    _large_frees_back_to_the_os()
    train, held = holdout_last(histories, max_users=max_fusion_cases)
    use_holdout = fit_fusion_weights and len(held) >= MIN_USERS_TO_FIT_FUSION
    retrievers = fit_signals(catalog, train if use_holdout else histories, names, log=log, **opts)
    fusion = FusionRetriever(catalog, list(retrievers.values()))
    fusion_report: dict[str, Any] = {"fitted": False}
    if use_holdout:
        fusion_report = {"fitted": True, **fit_fusion(fusion, held)}
        log(
            f"fusion: weights fitted on {fusion_report['cases']} held-out events "
            f"(Recall@20 {fusion_report['default_recall']:.3f} -> {fusion_report['fitted_recall']:.3f})"
        )
    manifest = {
        "format_version": FORMAT_VERSION,
        "catalog_fingerprint": catalog_text_fingerprint(catalog),
        "n_items": len(catalog),
        "n_users": len(histories),
        "n_events": sum(len(v) for v in histories.values()),
        "signals": list(retrievers),
        "fusion": fusion.config.to_dict(),
        "fusion_fit": fusion_report,
        "store_state": dict(store_state or {}),
        "build_seconds": round(time.perf_counter() - t0, 2),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_atomically(directory, retrievers, manifest, catalog)
    return fusion


def _write_atomically(
    directory: Path, retrievers: Mapping[str, Retriever], manifest: dict[str, Any], catalog: Catalog
) -> None:
    from retrieval.persist import atomic_directory

    with atomic_directory(directory) as tmp:
        for name, r in retrievers.items():
            r.save(tmp / name)  # type: ignore[attr-defined]
        # The catalog the signals' rows refer to: a live index (retrieval/live.py) loads the index against it
        # after the store's items have changed, then applies the changes.
        with open(tmp / CATALOG_FILE, "w", encoding="utf-8") as f:
            for item in catalog.items:
                f.write(item.model_dump_json() + "\n")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")


def read_catalog(directory: Path) -> Catalog:
    """The catalog an index was built for (saved beside it since live updates exist)."""
    from retrieval.types import Item

    path = Path(directory) / CATALOG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"the index at {directory} does not hold the catalog it was built for (no {CATALOG_FILE}; it was built "
            "by an older shoprec). Fix: rebuild it with `shoprec index`."
        )
    with open(path, encoding="utf-8") as f:
        return Catalog(Item.model_validate_json(line) for line in f if line.strip())


def read_manifest(directory: Path) -> dict[str, Any]:
    from retrieval.persist import recover_directory

    # a build killed in the middle of its swap left the index aside: put the complete version back first
    action = recover_directory(directory)
    if action is not None:
        logging.getLogger(__name__).warning("index at %s: an interrupted swap was recovered (%s)", directory, action)
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no retrieval index at {directory} (missing manifest.json). Fix: run `shoprec index`.")
    manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"index at {directory} has format {manifest.get('format_version')}, this shoprec reads "
            f"{FORMAT_VERSION}. Fix: rebuild it with `shoprec index`."
        )
    return manifest


def load_index(directory: Path, catalog: Catalog | None, **opts: Any) -> FusionRetriever:
    """Load every signal and the fusion config; the catalog must be the one the index was built for (None: the
    one saved with the index)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if catalog is None:
        catalog = read_catalog(directory)
    if manifest["catalog_fingerprint"] != catalog_text_fingerprint(catalog):
        raise ValueError(
            f"the index at {directory} was built for a different catalog ({manifest['n_items']} items; the store "
            f"now has {len(catalog)}, or their texts changed). Fix: rebuild it with `shoprec index`."
        )
    retrievers = [get_signal(name).load(directory / name, catalog, opts) for name in manifest["signals"]]
    return FusionRetriever(catalog, retrievers, FusionConfig.from_dict(manifest["fusion"]))
