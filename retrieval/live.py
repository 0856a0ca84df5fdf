"""A live retrieval index: a built `FusionRetriever` plus everything that happened since it was built.

`shoprec index` trains every signal on a snapshot of the store. A shop does not stop for it: shoppers click and buy,
merchandisers add, reprice and delete products. `LiveIndex` applies those changes in place, so that

- an event counts in the NEXT request: popularity counts and item-kNN co-occurrence are updated incrementally
  (SASRec and item-kNN also read the shopper's fresh history from the store at query time, see shoprec/service.py);
- a new or edited product is searchable and recommendable at once: its text is embedded with the same encoder
  and BM25-scored with the main index's IDF, beside the main indexes, and merged at query time;
- a deleted product (or an out-of-stock one, under the in-stock filter) is never retrieved again.

Rows never move: new items are appended to the catalog, deleted ones are *retired* (kept as rows, always masked),
so every signal's score vector stays aligned with the catalog. A signal that knows nothing of a new item (SASRec)
gives it no score; the content signals (dense, BM25) and the live popularity counts do.

What is approximate until the next `shoprec index` (or `fold`) rebuilds from scratch:
- item-kNN: a new event pairs its item with the user's recent items (the `window` most recent, decayed by distance
  as in `fit`), normalised with the fitted pair mass plus the live mass; the fitted pairs are neither renormalised
  nor re-pruned, and user damping is not applied to live pairs;
- popularity: a live event weighs its type weight times its recency relative to the fit's reference time (untimed
  data: as the newest event); older events of the same user are not decayed further;
- SASRec's weights do not change: a new item is not in its vocabulary (it reads fresh histories, though);
- BM25 scores a new or edited item with the main index's document frequencies and average length (a word the main
  index never saw counts as appearing in the live items that have it).

Thread safety: one writer at a time (`_update` mutex); the expensive preparation of an update (diffing, embedding
titles) runs outside the read/write lock, and only the short in-place apply takes it exclusively. `retrieve` takes
the shared side, so many requests run concurrently and never see a half-applied update. `catalog` and
`item_vectors` are immutable snapshots swapped by reference: read them once per request.

Replicas: each `shoprec serve` process holds its own LiveIndex; `sync(store)` catches up with what other replicas
wrote to the shared store (its change feeds), skipping the events this process already applied itself.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from retrieval.base import Ranked
from retrieval.catalog import Catalog
from retrieval.fusion import FusionRetriever
from retrieval.types import Candidate, Interaction, Item, RetrievalRequest

# How many of a user's most recent items a live event is paired with (item-kNN's own `window` when smaller).
RECENT_ITEMS = 20
# Users whose recent items are kept in memory for pairing (least recently active dropped first).
MAX_USERS_IN_MEMORY = 100_000
# Events this process applied itself and expects to read back from the store's feed (bounded: a store that never
# echoes them, e.g. no store at all, must not grow memory).
MAX_PENDING_EVENTS = 100_000


class ChangeFeed(Protocol):
    """What `LiveIndex.sync` reads from the store (retrieval/store.py provides these)."""

    def events_since(self, seq: int) -> list[tuple[int, Interaction]]: ...

    def last_event_seq(self) -> int: ...

    def item_changes_since(self, version: int) -> tuple[int, list[Item], list[str]]: ...


class _ReadWriteLock:
    """Many readers or one writer. A waiting writer holds back new readers, so a stream of requests cannot starve
    an update. Not re-entrant: nothing that holds the read side may ask for it again."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class LiveIndex:
    """A loaded FusionRetriever plus what happened since it was built: new/changed/deleted items and new events.

    `LiveIndex(fusion, catalog)` takes the index built for `fusion.catalog` and brings it to `catalog`, the items
    as they are now (usually the store's): items not in the index are added, changed ones updated, missing ones
    deleted. `encoder` embeds new item texts; by default the dense signal's own encoder. `store`, when given, is
    where a user's recent items are read the first time a live event of theirs is paired (item-kNN).
    `event_seq` / `item_version` are the store feed positions the index was built at (`LiveIndex.open` reads them
    from the index manifest); when unknown, the first `sync` starts from the store's current position.
    """

    def __init__(
        self,
        fusion: FusionRetriever,
        catalog: Catalog,
        *,
        encoder: Any | None = None,
        store: Any | None = None,
        event_seq: int | None = None,
        item_version: int | None = None,
    ) -> None:
        missing = [n for n, r in fusion.retrievers.items() if not hasattr(r, "update_rows")]
        if missing:
            raise TypeError(
                f"retriever(s) {', '.join(missing)} cannot be updated live (no update_rows method); "
                "serve them from a rebuilt index instead"
            )
        self._fusion = fusion
        self._rows: Catalog = fusion.catalog  # every row the signals know, including retired (deleted) ones
        dense = fusion.retrievers.get("dense")
        self._encoder = encoder if encoder is not None else getattr(dense, "encoder", None)
        self._store = store
        self._event_seq = event_seq
        self._item_version = item_version
        self._rw = _ReadWriteLock()
        self._update = threading.RLock()  # one writer at a time (re-entrant: sync calls upsert/apply)
        self._recent: OrderedDict[str, deque[int]] = OrderedDict()
        self._pending: Counter[Interaction] = Counter()
        self._pending_order: deque[Interaction] = deque()
        self._view: tuple[Catalog, np.ndarray | None] = (self._rows, getattr(dense, "vectors", None))
        self.stats: Counter[str] = Counter()  # what was applied: events, unknown_item_events, items_added, ...
        self._reconcile(catalog)

    # ------------------------------------------------------------------ construction from disk

    @classmethod
    def open(cls, directory: str | Path, store: Any, *, encoder: Any | None = None, **opts: Any) -> LiveIndex:
        """Load the index at `directory` (against the catalog it was built for, saved beside it) and bring it up to
        date with `store`: its current items, then the events written after the build (when the build recorded
        the store's event position; otherwise from now on)."""
        from retrieval.index import load_index, read_manifest

        manifest = read_manifest(Path(directory))
        fusion = load_index(Path(directory), None, encoder=encoder, **opts)
        source = manifest.get("store_state") or {}
        live = cls(
            fusion,
            Catalog(store.items()),
            encoder=encoder,
            store=store,
            event_seq=source.get("last_event_seq"),
            item_version=source.get("item_version"),
        )
        live.sync(store)
        return live

    # ------------------------------------------------------------------ reads

    @property
    def catalog(self) -> Catalog:
        """Current items, including ones added since the build, without deleted ones (an immutable snapshot)."""
        return self._view[0]

    @property
    def item_vectors(self) -> np.ndarray | None:
        """Dense item vectors aligned with `self.catalog` (for diversity); None without a dense signal."""
        return self._view[1]

    def vectors_for(self, item_ids: Sequence[str]) -> np.ndarray | None:
        """Dense vectors of these items (ids of `catalog`), read from ONE snapshot of catalog and vectors, so a
        concurrent update cannot misalign them; None without a dense signal."""
        catalog, vectors = self._view
        if vectors is None:
            return None
        return vectors[[catalog.index[i] for i in item_ids]]

    @property
    def fusion(self) -> FusionRetriever:
        """The underlying fused retriever (its catalog holds retired rows too)."""
        return self._fusion

    def retrieve(self, request: RetrievalRequest, k: int) -> list[Candidate]:
        """The top-k fused candidates for the request, as `FusionRetriever.retrieve`, over the live catalog."""
        return self.ranked(request, k).candidates()

    def ranked(self, request: RetrievalRequest, k: int) -> Ranked:
        """`FusionRetriever.ranked` over the live catalog (the evidence it builds later reads its own arrays only)."""
        with self._rw.read():
            return self._fusion.ranked(request, k)

    def score(self, request: RetrievalRequest) -> np.ndarray | None:
        """Fused scores over every row of the live row catalog (retired rows included; mask them yourself)."""
        with self._rw.read():
            return self._fusion.score(request)

    # ------------------------------------------------------------------ events

    def apply_events(self, events: Sequence[Interaction]) -> None:
        """Count new events at once: popularity, and item-kNN co-occurrence of each event's item with the user's
        recent items. Events naming an item unknown to this index are skipped (counted in `stats`)."""
        with self._update:
            self._apply_events(events)
            for ev in events:  # so that `sync` does not count them a second time when the store echoes them
                self._pending[ev] += 1
                self._pending_order.append(ev)
            while len(self._pending_order) > MAX_PENDING_EVENTS:
                old = self._pending_order.popleft()
                if self._pending[old] > 0:
                    self._pending[old] -= 1
                    if not self._pending[old]:
                        del self._pending[old]

    def _apply_events(self, events: Sequence[Interaction]) -> None:
        known = [ev for ev in events if ev.item_id in self._rows.index]
        self.stats["unknown_item_events"] += len(events) - len(known)
        if not known:
            return
        knn = self._fusion.retrievers.get("itemknn")
        window = min(RECENT_ITEMS, getattr(getattr(knn, "config", None), "window", RECENT_ITEMS))
        transitions: list[tuple[list[int], int]] = []
        batch = Counter(known)
        for ev in known:
            recent = self._recent_items(ev.user_id, window, batch)
            row = self._rows.index[ev.item_id]
            transitions.append((list(recent), row))
            recent.append(row)
        with self._rw.write():
            pop = self._fusion.retrievers.get("popularity")
            if pop is not None:
                pop.add_events(known)  # type: ignore[attr-defined]
            if knn is not None:
                knn.add_transitions(transitions)  # type: ignore[attr-defined]
        self.stats["events"] += len(known)

    def _recent_items(self, user: str, window: int, batch: Counter[Interaction]) -> deque[int]:
        """The user's recent item rows (oldest first), from memory, else from the store without this batch."""
        recent = self._recent.get(user)
        if recent is None:
            recent = deque(maxlen=window)
            if self._store is not None:
                skip = Counter(batch)
                for ev in self._store.history(user, limit=window + sum(batch.values())):
                    if skip[ev] > 0:  # the caller may have written this batch to the store already
                        skip[ev] -= 1
                    elif ev.item_id in self._rows.index:
                        recent.append(self._rows.index[ev.item_id])
            self._recent[user] = recent
            while len(self._recent) > MAX_USERS_IN_MEMORY:
                self._recent.popitem(last=False)
        self._recent.move_to_end(user)
        return recent

    # ------------------------------------------------------------------ items

    def upsert_items(self, items: Sequence[Item]) -> None:
        """Add new items and update changed ones; each is searchable and recommendable when this returns."""
        with self._update:
            self._upsert(items)

    def delete_items(self, item_ids: Sequence[str]) -> None:
        """Retire items: they are never retrieved again (unknown ids are ignored)."""
        with self._update:
            retire = [i for i in dict.fromkeys(item_ids) if i in self._rows.index and i not in self._rows.retired]
            if retire:
                self._install(self._rows.updated(retire=retire), [], None)
                self.stats["items_deleted"] += len(retire)

    def _upsert(self, items: Sequence[Item]) -> None:
        rows_cat = self._rows
        latest = {it.id: it for it in items}  # the last version of an id in the batch wins
        changed: list[Item] = []
        for it in latest.values():
            if it.id in rows_cat.index and rows_cat[it.id] == it and it.id not in rows_cat.retired:
                continue  # nothing new (e.g. the store echoing this process's own write)
            changed.append(it)
        if not changed:
            return
        new_cat = rows_cat.updated(changed)
        # rows whose indexed text is new or different: the content signals must (re)score them
        content = [
            new_cat.index[it.id] for it in changed if it.id not in rows_cat.index or rows_cat[it.id].text() != it.text()
        ]
        vectors = None
        dense = self._fusion.retrievers.get("dense")
        if dense is not None and content:
            if self._encoder is None:
                raise ValueError("a live dense index needs an encoder to embed new items; pass encoder=")
            vectors = self._encoder.encode([new_cat.items[r].text() for r in content])
        n_new = len(new_cat) - len(rows_cat)
        self._install(new_cat, content, vectors)
        self.stats["items_added"] += n_new
        self.stats["items_updated"] += len(changed) - n_new

    def _install(self, new_cat: Catalog, content_rows: list[int], vectors: np.ndarray | None) -> None:
        """Swap the new row catalog into every signal (exclusively), then publish the shopper-facing snapshot."""
        with self._rw.write():
            for retriever in self._fusion.retrievers.values():
                if retriever.name == "dense":
                    retriever.update_rows(new_cat, content_rows, vectors=vectors)  # type: ignore[attr-defined]
                else:
                    retriever.update_rows(new_cat, content_rows)  # type: ignore[attr-defined]
            self._fusion.catalog = new_cat
            self._rows = new_cat
        dense = self._fusion.retrievers.get("dense")
        all_vectors = getattr(dense, "vectors", None)
        if new_cat.retired and all_vectors is not None:
            alive_rows = [i for i, it in enumerate(new_cat.items) if it.id not in new_cat.retired]
            all_vectors = all_vectors[alive_rows]
        self._view = (new_cat.alive(), all_vectors)

    def _reconcile(self, catalog: Catalog) -> None:
        """Bring the index's items to `catalog`: add and update what differs, retire what is gone."""
        with self._update:
            self._upsert(catalog.items)
            gone = [i for i in self._rows.ids if i not in catalog.index]
            if gone:
                self.delete_items(gone)
            else:
                self._install(self._rows, [], None)  # publish the first snapshot

    # ------------------------------------------------------------------ replicas

    def sync(self, store: ChangeFeed) -> dict[str, int]:
        """Catch up with the store's change feeds (other replicas' writes): item changes first, then events.

        Returns counts: items_changed, items_deleted, events (applied), events_skipped (already applied here).
        """
        with self._update:
            t0 = time.perf_counter()
            version, changed, deleted = store.item_changes_since(self._item_version or 0)
            self._item_version = version
            before = Counter(self.stats)
            if changed:
                self._upsert(changed)
            upserted = {it.id for it in changed}
            gone = [i for i in deleted if i not in upserted]
            if gone:
                self.delete_items(gone)
            if self._event_seq is None:  # unknown build position: count from now on (documented)
                self._event_seq = store.last_event_seq()
                feed: list[tuple[int, Interaction]] = []
            else:
                feed = store.events_since(self._event_seq)
            fresh: list[Interaction] = []
            skipped = 0
            for seq, ev in feed:
                self._event_seq = max(self._event_seq, seq)
                if self._pending[ev] > 0:  # applied by this process already
                    self._pending[ev] -= 1
                    if not self._pending[ev]:
                        del self._pending[ev]
                    skipped += 1
                else:
                    fresh.append(ev)
            if fresh:
                self._apply_events(fresh)
            self.stats["sync_seconds_total_ms"] += round((time.perf_counter() - t0) * 1000)
            return {
                "items_changed": self.stats["items_added"]
                - before["items_added"]
                + self.stats["items_updated"]
                - before["items_updated"],
                "items_deleted": self.stats["items_deleted"] - before["items_deleted"],
                "events": len(fresh),
                "events_skipped": skipped,
            }

    def reload(self, directory: str | Path, store: Any) -> None:
        """Swap in the index at `directory` (rebuilt by `shoprec index` or `fold`), caught up with `store`.

        The new index is loaded and caught up outside the lock; requests keep being served by the old one until
        the swap. What the old one had applied live is in the store, so the new one counts it once: from its
        build (events up to the build's recorded position) or from the catch-up (events after it)."""
        fresh = LiveIndex.open(directory, store, encoder=self._encoder)
        with self._update:
            fresh.sync(store)  # what arrived while it loaded; no other update runs until the swap is done
            with self._rw.write():
                self._fusion, self._rows, self._view = fresh._fusion, fresh._rows, fresh._view
                self._event_seq, self._item_version = fresh._event_seq, fresh._item_version
                self._recent, self._pending, self._pending_order = fresh._recent, Counter(), deque()
                self._store = store
            self.stats["reloads"] += 1

    def fold(self, directory: str | Path, store: Any, **build_opts: Any) -> None:
        """Rebuild the index from the store into `directory` (what `shoprec index` does: every signal retrained,
        live deltas folded into the main indexes) and swap it in. Takes minutes; requests are served meanwhile.
        `build_opts` go to `retrieval.index.build_index` (encoder, sasrec_config, ...)."""
        from retrieval.index import build_index, read_store_histories

        build_opts.setdefault("encoder", self._encoder)
        histories, state = read_store_histories(store)
        build_index(Catalog(store.items()), histories, Path(directory), store_state=state, **build_opts)
        del histories
        self.reload(directory, store)

    @property
    def positions(self) -> dict[str, int | None]:
        """The store feed positions this index has caught up to (event seq, item version)."""
        return {"last_event_seq": self._event_seq, "item_version": self._item_version}
