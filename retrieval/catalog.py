"""The catalog: items in a fixed order, so that every retriever can score all items as one numpy vector."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from retrieval.types import Filters, Item


class Catalog:
    """An ordered, immutable set of items with an id -> row index map.

    Row indices are the shared coordinate system of all retrievers: `scores[i]` is about `catalog.items[i]`.
    `retired` ids keep their rows (so every score array stays aligned) but `mask` always drops them: that is how
    a live index (retrieval/live.py) deletes an item without rebuilding.
    """

    def __init__(self, items: Iterable[Item], *, retired: Iterable[str] = ()) -> None:
        self.items: tuple[Item, ...] = tuple(items)
        self.index: dict[str, int] = {}
        for i, item in enumerate(self.items):
            if item.id in self.index:
                raise ValueError(f"duplicate item id {item.id!r} in catalog")
            self.index[item.id] = i
        self._prices = np.array([np.nan if it.price is None else it.price for it in self.items], dtype=np.float64)
        self._in_stock = np.array([it.in_stock for it in self.items], dtype=bool)
        self._paths = [" > ".join(it.category) for it in self.items]
        self._categories: dict[int, tuple[str, ...]] = {}  # level -> categories_at(level)
        self.retired: frozenset[str] = frozenset(retired)
        unknown = self.retired - self.index.keys()
        if unknown:
            raise ValueError(f"retired item id(s) not in the catalog: {', '.join(sorted(unknown)[:5])}")
        self._retired_rows = np.array(sorted(self.index[i] for i in self.retired), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.index

    def __getitem__(self, item_id: str) -> Item:
        return self.items[self.index[item_id]]

    @property
    def ids(self) -> list[str]:
        return [it.id for it in self.items]

    def rows(self, item_ids: Sequence[str]) -> list[int]:
        """Row indices of the given ids, silently skipping ids that are not in the catalog."""
        return [self.index[i] for i in item_ids if i in self.index]

    def updated(self, items: Sequence[Item] = (), *, retire: Sequence[str] = ()) -> Catalog:
        """A new catalog: `items` replace the rows with their ids (un-retiring them) or are appended in order, and
        `retire` ids (already in the catalog) are retired. Existing rows never move, so the row indices of every
        retriever built on this catalog stay valid for the first `len(self)` rows."""
        replaced = {it.id: it for it in items}
        rows = [replaced.pop(it.id, it) for it in self.items]
        retired = (self.retired - {it.id for it in items}) | frozenset(retire)
        return Catalog([*rows, *replaced.values()], retired=retired)

    def alive(self) -> Catalog:
        """The catalog without its retired items (rows renumbered): what a shopper can still be shown."""
        if not self.retired:
            return self
        return Catalog(it for it in self.items if it.id not in self.retired)

    def texts(self) -> list[str]:
        return [it.text() for it in self.items]

    def categories_at(self, level: int) -> tuple[str, ...]:
        """Each row's category path cut to `level` levels (computed once per level: the catalog is immutable)."""
        got = self._categories.get(level)
        if got is None:
            got = self._categories[level] = tuple(it.category_at(level) for it in self.items)
        return got

    def mask(self, filters: Filters, history: Sequence[str] = ()) -> np.ndarray:
        """Boolean vector: True where an item passes the hard filters."""
        keep = np.ones(len(self.items), dtype=bool)
        keep[self._retired_rows] = False  # deleted items are never retrieved, whatever the filters
        if filters.categories:
            prefixes = tuple(filters.categories)
            keep &= np.array(
                [any(p == c or p.startswith(c + " > ") for c in prefixes) for p in self._paths], dtype=bool
            )
        if filters.min_price is not None:
            keep &= np.nan_to_num(self._prices, nan=-1.0) >= filters.min_price
        if filters.max_price is not None:
            keep &= np.nan_to_num(self._prices, nan=np.inf) <= filters.max_price
        if filters.in_stock_only:
            keep &= self._in_stock
        if filters.exclude_history and history:
            keep[self.rows(history)] = False
        if filters.exclude:
            keep[self.rows(filters.exclude)] = False
        return keep
