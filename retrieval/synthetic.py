"""A deterministic synthetic shop: a ~2,400-item catalog and an event log with structure a recommender can learn.

Used by the demo, by tests that must run anywhere, and as a sanity dataset for retrievers. What is built in:

- a 20-category taxonomy (2-3 levels) with made-up brands in budget/mid/premium tiers; prices are lognormal per
  subcategory and tier, titles read like "Voltix Slim Shockproof Phone Case for 6.1-inch, Midnight Blue";
- ~50 chains of complementary subcategories (smartphone -> phone case -> charger, printer -> ink -> paper, ...);
- users with Dirichlet category affinities, a price band and brand loyalty, who browse in sessions that stay in one
  category, sometimes cart and buy, and after a purchase often go on to a complement (same or next session);
- long-tailed (Zipf) item appeal, short cold-ish users, and brand-new items with no events at all (cold start).

What it does not do: ratings, returns, search queries, seasonality, or prices that change over time.
Numpy only, and every random draw comes from one `numpy.random.default_rng(seed)` in a fixed order, so the same
config gives byte-identical data on every machine. `python -m retrieval.synthetic --out DIR` writes it to disk.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import numpy as np

from retrieval.types import Interaction, InteractionType, Item

# --------------------------------------------------------------------------------------------------------------------
# Taxonomy: top-level categories with brands and title adjectives, then leaf subcategories with their vocabularies.
# --------------------------------------------------------------------------------------------------------------------

TIERS = ("budget", "mid", "premium")
_TIER_PRICE = (0.55, 1.0, 2.1)  # price multiplier of a tier relative to the subcategory's mid-tier median
_PRICE_SIGMA = 0.25  # lognormal spread within one subcategory and tier
# Rows: the user's price band; columns: the item's tier. Off-band items still get some attention.
_TIER_MATCH = np.array([[1.0, 0.35, 0.06], [0.4, 1.0, 0.4], [0.08, 0.45, 1.0]])


@dataclass(frozen=True)
class _Top:
    name: str
    brands: tuple[tuple[str, ...], ...]  # brand names per tier: budget, mid, premium (two each)
    adjectives: tuple[str, ...]  # title adjectives: "Voltix *Slim* Phone Case"


@dataclass(frozen=True)
class _Leaf:
    path: tuple[str, ...]
    nouns: tuple[str, ...]  # product nouns for the title; for books and games, the genre
    price: float  # median price of a mid-tier item
    features: tuple[str, ...]  # phrases the description is built from
    variant: tuple[str, tuple[str, ...]] | None  # (attribute, values): shown in the title and kept as an attribute
    variant_fmt: str  # how the variant reads in the title, e.g. "for {}"
    attrs: tuple[tuple[str, tuple[str, ...]], ...]  # further attributes, kept but not in the title
    colored: bool  # whether items get a color (shown at the end of the title)
    kind: str  # "product", "book" or "game": books and games get made-up titles instead of brand + noun
    words: tuple[tuple[str, ...], tuple[str, ...]]  # (adjectives, nouns) for book and game titles

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def key(self) -> str:
        return " > ".join(self.path)


# The vocabulary is data (package data, next to this module): 20 top-level categories, 154 leaf subcategories, the
# complement chains and the names titles are made of. The order of every list is part of the seed's meaning.
TAXONOMY_FILE = "data/synthetic_taxonomy.json"


def _load_taxonomy() -> dict[str, Any]:
    text = resources.files("retrieval").joinpath(TAXONOMY_FILE).read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def _leaf(d: dict[str, Any]) -> _Leaf:
    variant = d["variant"]
    return _Leaf(
        path=tuple(d["path"]),
        nouns=tuple(d["nouns"]),
        price=d["price"],
        features=tuple(d["features"]),
        variant=(variant["name"], tuple(variant["values"])) if variant else None,
        variant_fmt=d["variant_fmt"],
        attrs=tuple((a["name"], tuple(a["values"])) for a in d["attrs"]),
        colored=d["colored"],
        kind=d["kind"],
        words=(tuple(d["words"]["adjectives"]), tuple(d["words"]["nouns"])),
    )


_TAXONOMY = _load_taxonomy()
_TOPS: tuple[_Top, ...] = tuple(
    _Top(t["name"], tuple(tuple(t["brands"][tier]) for tier in TIERS), tuple(t["adjectives"]))
    for t in _TAXONOMY["tops"]
)
MAX_CATEGORIES = len(_TOPS)
_LEAVES: tuple[_Leaf, ...] = tuple(_leaf(d) for d in _TAXONOMY["leaves"])
# Chains of complementary subcategories (leaf names): each link a -> b means "after buying an a, people look for a b".
_COMPLEMENT_CHAINS: tuple[tuple[str, ...], ...] = tuple(tuple(c) for c in _TAXONOMY["complement_chains"])
_COLORS: tuple[str, ...] = tuple(_TAXONOMY["colors"])
_FIRST_NAMES: tuple[str, ...] = tuple(_TAXONOMY["first_names"])
_LAST_NAMES: tuple[str, ...] = tuple(_TAXONOMY["last_names"])
_MEDIA_TITLES: tuple[str, ...] = tuple(_TAXONOMY["media_titles"])


def _leaf_by_name() -> dict[str, _Leaf]:
    by_name: dict[str, _Leaf] = {}
    for leaf in _LEAVES:
        if leaf.name in by_name:
            raise ValueError(f"leaf subcategory name {leaf.name!r} is used twice; complement chains need unique names")
        by_name[leaf.name] = leaf
    return by_name


_LEAF_BY_NAME = _leaf_by_name()

# --------------------------------------------------------------------------------------------------------------------
# Config and result
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticConfig:
    """How big the synthetic shop is and how its users behave. Every default is the demo's dataset."""

    seed: int = 0  # the only source of randomness: same config -> byte-identical data
    n_items: int = 2400  # catalog size, cold items included
    n_users: int = 800
    n_categories: int = 20  # top-level categories used, taken in a fixed order (at most 20)
    sessions_per_user: tuple[int, int] = (3, 10)  # inclusive range for regular users; ~4-5 events per session
    short_user_fraction: float = 0.12  # users with a single 2-4 event session (cold-ish users)
    new_item_fraction: float = 0.05  # items created in the last `new_item_days` with no interactions (cold start)
    new_item_days: int = 14
    out_of_stock_fraction: float = 0.03
    complement_prob: float = 0.55  # after a purchase, how often the user goes on to a complement subcategory
    start: datetime = datetime(2023, 1, 1, tzinfo=UTC)  # first possible event
    days: int = 730  # length of the event log; the data's "now" is start + days

    def __post_init__(self) -> None:
        if not 1 <= self.n_categories <= MAX_CATEGORIES:
            raise ValueError(f"`n_categories` must be between 1 and {MAX_CATEGORIES}, got {self.n_categories}.")
        n_leaves = sum(1 for leaf in _LEAVES if leaf.path[0] in {t.name for t in _TOPS[: self.n_categories]})
        if self.n_items < n_leaves:
            raise ValueError(
                f"`n_items` must be at least {n_leaves} (one per subcategory of {self.n_categories} categories), "
                f"got {self.n_items}; raise it or lower `n_categories`."
            )
        if self.n_users < 1:
            raise ValueError(f"`n_users` must be at least 1, got {self.n_users}.")
        lo, hi = self.sessions_per_user
        if not 1 <= lo <= hi:
            raise ValueError(f"`sessions_per_user` must be (lo, hi) with 1 <= lo <= hi, got {self.sessions_per_user}.")
        for name in ("short_user_fraction", "new_item_fraction", "out_of_stock_fraction", "complement_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be between 0 and 1, got {value}.")
        if self.new_item_fraction >= 0.5:
            raise ValueError(f"`new_item_fraction` must be below 0.5, got {self.new_item_fraction}.")
        if self.new_item_days < 1:
            raise ValueError(f"`new_item_days` must be at least 1, got {self.new_item_days}.")
        if self.days < 4 * self.new_item_days:
            raise ValueError(f"`days` must be at least 4 * new_item_days = {4 * self.new_item_days}, got {self.days}.")
        if self.start.utcoffset() != timedelta(0):
            raise ValueError(f"`start` must be a UTC datetime (tzinfo=UTC), got {self.start.isoformat()}.")

    @property
    def now(self) -> datetime:
        """The end of the simulated period: cold items are created in the days just before it."""
        return self.start + timedelta(days=self.days)


@dataclass(frozen=True)
class SyntheticData:
    """A generated shop: the catalog, the event log and the ground truth behind them."""

    items: list[Item]  # ordered by id; ids follow creation time, so the newest items have the largest ids
    interactions: list[Interaction]  # grouped by user, each user's events in time order
    complements: dict[str, list[str]]  # leaf path -> leaf paths whose items complement it (' > '-joined)
    cold_item_ids: list[str]  # items created in the last days before `now`, with no interactions
    brand_tiers: dict[str, str]  # brand -> "budget", "mid" or "premium" (prices follow the tier)
    now: datetime  # the end of the simulated period
    config: SyntheticConfig = field(repr=False)

    def summary(self) -> dict[str, object]:
        """Headline counts, for the CLI and the demo."""
        types = Counter(ev.type.value for ev in self.interactions)
        return {
            "items": len(self.items),
            "users": len({ev.user_id for ev in self.interactions}),
            "events": len(self.interactions),
            "events_by_type": {t.value: types.get(t.value, 0) for t in InteractionType if types.get(t.value)},
            "top_categories": len({it.category[0] for it in self.items}),
            "subcategories": len({it.category for it in self.items}),
            "cold_items": len(self.cold_item_ids),
            "out_of_stock": sum(not it.in_stock for it in self.items),
        }


# --------------------------------------------------------------------------------------------------------------------
# Catalog
# --------------------------------------------------------------------------------------------------------------------


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _lower(phrase: str) -> str:
    """Lower-case a title noun for running text, keeping acronyms and model names: 'USB-C Fast Charger' ->
    'USB-C fast charger'."""

    def word(w: str) -> str:
        return "-".join(p.lower() if p[:1].isupper() and p[1:].islower() else p for p in w.split("-"))

    return " ".join(word(w) for w in phrase.split(" "))


def _article(phrase: str) -> str:
    """'a'/'an' for a singular noun phrase, '' for a plural one ('solar path lights')."""
    last = phrase.rsplit(" ", 1)[-1].lower()
    if last.endswith("s") and not last.endswith(("ss", "us", "as", "is")):
        return ""
    if phrase.lower().startswith(("uni", "use")):
        return "a"  # "a universal", "a useful": the vowel is sounded "yu"
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def _with_article(phrase: str) -> str:
    """The phrase with its article, capitalised to start a sentence: 'A slim phone case', 'Solar path lights'."""
    text = f"{_article(phrase)} {phrase}".strip()
    return text[:1].upper() + text[1:]


def _price(rng: np.random.Generator, median: float, tier: int) -> float:
    p = median * _TIER_PRICE[tier] * float(rng.lognormal(0.0, _PRICE_SIGMA))
    if p >= 10:
        return round(round(p) - 0.01, 2)  # charm pricing: 24.99, 449.99
    return round(max(round(p, 1), 0.5) - 0.01, 2)  # 7.49, 0.49


@dataclass
class _Draft:
    """One item before ids are assigned (ids follow creation time, which is decided later)."""

    leaf: int
    title: str
    brand: str
    tier: int
    price: float
    description: str
    attributes: dict[str, str]


def _media_title(rng: np.random.Generator, leaf: _Leaf) -> str:
    adjs, nouns = leaf.words
    n, n2 = (nouns[i] for i in rng.choice(len(nouns), size=2, replace=False))
    return _choice(rng, _MEDIA_TITLES).format(a=_choice(rng, adjs), n=n, n2=n2)


def _draft(rng: np.random.Generator, leaf_idx: int, leaf: _Leaf, top: _Top) -> _Draft:
    """Draw one item of a leaf subcategory: brand and tier, price, title, attributes and description."""
    tier = int(rng.choice(3, p=[0.35, 0.4, 0.25]))
    brand = _choice(rng, top.brands[tier])
    attributes: dict[str, str] = {}
    variant = ""
    if leaf.variant is not None:
        key, values = leaf.variant
        attributes[key] = _choice(rng, values)
        variant = leaf.variant_fmt.format(attributes[key])
    for key, values in leaf.attrs:
        attributes[key] = _choice(rng, values)
    noun = _choice(rng, leaf.nouns)
    f1, f2, f3 = (leaf.features[i] for i in rng.choice(len(leaf.features), size=3, replace=False))

    if leaf.kind == "product":
        adj = _choice(rng, top.adjectives)
        while adj in noun.split():  # no "Daily Daily Moisturizer"
            adj = _choice(rng, top.adjectives)
        title = f"{brand} {adj} {noun}" + (f" {variant}" if variant else "")
        if leaf.colored:
            attributes["color"] = _choice(rng, _COLORS)
            title += f", {attributes['color']}"
        thing = f"{_lower(adj)} {_lower(noun)}"
        first = f"{_with_article(thing)} with {f1} and {f2}."
    else:
        core = _media_title(rng, leaf)
        genre = _lower(noun)
        if leaf.kind == "book":
            attributes["author"] = f"{_choice(rng, _FIRST_NAMES)} {_choice(rng, _LAST_NAMES)}"
            attributes["pages"] = str(int(rng.integers(120, 640)))
            title = f"{core}: {_with_article(noun)} ({variant})"
            first = f"{_with_article(genre)} by {attributes['author']} with {f1} and {f2}."
        else:
            title = f"{core} ({variant}, {attributes['edition']})"
            first = f"{_with_article(genre)} for {variant} with {f1} and {f2}."

    sentences = [first]
    if rng.random() < 0.6:
        material = attributes.get("material")
        sentences.append(f"Made of {_lower(material)}." if material else f"It also offers {f3}.")
    if rng.random() < 0.5:
        sentences.append(
            (
                "Great value for everyday use.",
                f"A dependable pick from {brand}.",
                f"Backed by {brand}'s 2-year warranty.",
            )[tier]
        )
    return _Draft(leaf_idx, title, brand, tier, _price(rng, leaf.price, tier), " ".join(sentences), attributes)


_ROMAN = ("", "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X")


def _unique_title(rng: np.random.Generator, draft: _Draft, leaf: _Leaf, top: _Top, seen: set[str]) -> _Draft:
    """Redraw a few times when a title is taken; then number it like a product line ("... II, Black")."""
    for _ in range(4):
        if draft.title not in seen:
            break
        draft = _draft(rng, draft.leaf, leaf, top)
    head, sep, tail = draft.title.rpartition(", ") if "color" in draft.attributes else (draft.title, "", "")
    k = 2
    while draft.title in seen:
        draft.title = f"{head} {_ROMAN[k] if k < len(_ROMAN) else k}{sep}{tail}"
        k += 1
    seen.add(draft.title)
    return draft


# --------------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _LeafPool:
    """The warm (non-cold) items of one leaf, sorted by creation time, so the items on sale at time t are a prefix."""

    rows: np.ndarray  # indices into the final item list
    created: np.ndarray  # creation time, seconds since config.start
    appeal: np.ndarray  # Zipf-like popularity within the leaf
    tier: np.ndarray
    brand: np.ndarray  # brand index within the top category (0..5)


def generate(config: SyntheticConfig = SyntheticConfig()) -> SyntheticData:
    """Build the synthetic catalog and event log described by `config` (deterministic in `config`)."""
    rng = np.random.default_rng(config.seed)
    tops = _TOPS[: config.n_categories]
    top_names = [t.name for t in tops]
    leaves = [leaf for leaf in _LEAVES if leaf.path[0] in top_names]
    leaf_top = np.array([top_names.index(leaf.path[0]) for leaf in leaves])
    span = config.days * 86400
    cold_window = config.new_item_days * 86400

    # --- catalog: every leaf gets one item, the rest follow leaf popularity (popular leaves are also bigger)
    leaf_pop = rng.gamma(2.0, 1.0, size=len(leaves))
    counts = np.ones(len(leaves), dtype=np.int64) + rng.multinomial(
        config.n_items - len(leaves), leaf_pop / leaf_pop.sum()
    )
    seen: set[str] = set()
    drafts: list[_Draft] = []
    first_of_leaf: list[bool] = []
    for li, leaf in enumerate(leaves):
        top = tops[leaf_top[li]]
        for j in range(int(counts[li])):
            drafts.append(_unique_title(rng, _draft(rng, li, leaf, top), leaf, top, seen))
            first_of_leaf.append(j == 0)

    # Cold items never include a leaf's first item, so every leaf always has something on sale.
    n_cold = min(round(config.new_item_fraction * config.n_items), config.n_items - len(leaves))
    eligible = np.flatnonzero(~np.array(first_of_leaf))
    cold = np.zeros(len(drafts), dtype=bool)
    cold[rng.choice(eligible, size=n_cold, replace=False)] = True
    # Creation times (seconds since start): first items up to 120 days before the log starts, the rest spread over
    # the log (more early on), cold ones in the last `new_item_days`.
    pre = 120 * 86400
    created = np.where(
        np.array(first_of_leaf),
        -rng.integers(0, pre, size=len(drafts)),
        -pre + (rng.beta(1.0, 1.4, size=len(drafts)) * (span - cold_window - 86400 + pre)).astype(np.int64),
    )
    created = np.where(cold, span - rng.integers(0, cold_window, size=len(drafts)), created)
    in_stock = rng.random(len(drafts)) >= config.out_of_stock_fraction

    order = np.lexsort((np.arange(len(drafts)), created))  # ids follow creation time; ties by draft order
    items: list[Item] = []
    row_of_draft = np.empty(len(drafts), dtype=np.int64)
    for row, d in enumerate(order):
        dr = drafts[int(d)]
        row_of_draft[d] = row
        items.append(
            Item(
                id=f"P{row + 1:06d}",
                title=dr.title,
                category=leaves[dr.leaf].path,
                brand=dr.brand,
                price=dr.price,
                description=dr.description,
                attributes=dr.attributes,
                created_at=config.start + timedelta(seconds=int(created[d])),
                in_stock=bool(in_stock[d]),
            )
        )
    cold_rows = sorted(int(row_of_draft[d]) for d in np.flatnonzero(cold))

    brand_index = {b: i for t in tops for i, b in enumerate(b for tier in t.brands for b in tier)}
    pools: list[_LeafPool] = []
    leaf_of_draft = np.array([d.leaf for d in drafts])
    for li in range(len(leaves)):
        ds = np.flatnonzero((leaf_of_draft == li) & ~cold)
        ds = ds[np.argsort(created[ds], kind="stable")]
        ranks = rng.permutation(len(ds))  # appeal rank is independent of age
        pools.append(
            _LeafPool(
                rows=row_of_draft[ds],
                created=created[ds],
                appeal=1.0 / (ranks + 1.0) ** 1.1,
                tier=np.array([drafts[int(d)].tier for d in ds]),
                brand=np.array([brand_index[drafts[int(d)].brand] for d in ds]),
            )
        )

    # --- complements, as leaf indices and as ' > '-joined paths
    leaf_index = {leaf.name: i for i, leaf in enumerate(leaves)}
    comp_idx: list[list[int]] = [[] for _ in leaves]
    for chain in _COMPLEMENT_CHAINS:
        for a, b in zip(chain, chain[1:], strict=False):
            if a in leaf_index and b in leaf_index and leaf_index[b] not in comp_idx[leaf_index[a]]:
                comp_idx[leaf_index[a]].append(leaf_index[b])
    complements = {leaves[a].key: [leaves[b].key for b in bs] for a, bs in enumerate(comp_idx) if bs}

    # --- users and their sessions
    sim = _Simulator(rng, config, pools, leaf_top, leaf_pop, comp_idx, len(tops))
    interactions: list[Interaction] = []
    width = max(4, len(str(config.n_users)))
    types = (InteractionType.VIEW, InteractionType.CART, InteractionType.PURCHASE)
    for u in range(config.n_users):
        user_id = f"U{u + 1:0{width}d}"
        for pos, (t, row, kind) in enumerate(sim.user()):
            interactions.append(
                Interaction(
                    user_id=user_id,
                    item_id=items[row].id,
                    type=types[kind],
                    timestamp=config.start + timedelta(seconds=t),
                    position=pos,
                )
            )

    brand_tiers = {b: TIERS[k] for t in tops for k, tier in enumerate(t.brands) for b in tier}
    return SyntheticData(
        items=items,
        interactions=interactions,
        complements=complements,
        cold_item_ids=[items[r].id for r in cold_rows],
        brand_tiers=brand_tiers,
        now=config.now,
        config=config,
    )


_VIEW, _CART, _PURCHASE = 0, 1, 2


class _Simulator:
    """Draws one user at a time: tastes first, then a sequence of sessions of (seconds, item row, event kind)."""

    def __init__(
        self,
        rng: np.random.Generator,
        config: SyntheticConfig,
        pools: list[_LeafPool],
        leaf_top: np.ndarray,
        leaf_pop: np.ndarray,
        comp_idx: list[list[int]],
        n_tops: int,
    ) -> None:
        self.rng = rng
        self.config = config
        self.pools = pools
        self.comp_idx = comp_idx
        self.span = config.days * 86400
        self.n_tops = n_tops
        self.top_leaves = [np.flatnonzero(leaf_top == c) for c in range(n_tops)]
        self.top_leaf_cum = [np.cumsum(leaf_pop[ls]) for ls in self.top_leaves]
        self.leaf_top = leaf_top
        self.top_pop = rng.gamma(3.0, 1.0, size=n_tops)  # some categories are busier than others
        # per-user state, set by user()
        self.events: list[tuple[int, int, int]] = []
        self.t = 0
        self.band = 1
        self.fav_brand = np.zeros(n_tops, dtype=np.int64)
        self.loyalty = 1.0

    def _pick(self, weights: np.ndarray) -> int:
        cum = np.cumsum(weights)
        return min(int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right")), len(weights) - 1)

    def _weights(self, leaf: int) -> tuple[_LeafPool, np.ndarray]:
        """This user's taste for the items of a leaf on sale now: appeal x price-band match x brand loyalty."""
        pool = self.pools[leaf]
        k = max(1, int(np.searchsorted(pool.created, self.t, side="right")))
        loyal = pool.brand[:k] == self.fav_brand[self.leaf_top[leaf]]
        w = pool.appeal[:k] * _TIER_MATCH[self.band, pool.tier[:k]] * np.where(loyal, self.loyalty, 1.0)
        return pool, w

    def _emit(self, row: int, kind: int, gap: float) -> None:
        self.t += int(gap)
        self.events.append((self.t, row, kind))

    def _browse(self, leaf: int, n_views: int, cart_p: float, side_leaf: int | None = None) -> bool:
        """View distinct items of a leaf (a few from `side_leaf` mixed in, more if the leaf has too few items on
        sale); with `cart_p` cart one of the leaf's items, and buy 60% of carted items. Returns whether it bought."""
        rng = self.rng
        pool, w = self._weights(leaf)
        n = min(n_views, len(w))
        viewed = np.argsort(-(np.log(w) + rng.gumbel(size=len(w))), kind="stable")[:n]  # weighted, no repeats
        side: list[int] = []
        if side_leaf is not None and n_views > 1:
            side_pool, side_w = self._weights(side_leaf)
            n_side = int(rng.binomial(n_views - 1, 0.2)) + n_views - n
            side = [int(side_pool.rows[self._pick(side_w)]) for _ in range(n_side)]
        views = [int(pool.rows[i]) for i in viewed] + side
        for v in rng.permutation(len(views)):
            self._emit(views[int(v)], _VIEW, 15 + rng.exponential(70.0))
        if rng.random() >= cart_p:
            return False
        chosen = int(pool.rows[viewed[self._pick(w[viewed])]])
        self._emit(chosen, _CART, 10 + rng.exponential(40.0))
        if rng.random() >= 0.6:
            return False
        self._emit(chosen, _PURCHASE, 60 + rng.exponential(240.0))
        return True

    def _complement(self, leaf: int) -> int | None:
        options = self.comp_idx[leaf]
        if not options or self.rng.random() >= self.config.complement_prob:
            return None
        return options[int(self.rng.integers(len(options)))]

    def user(self) -> list[tuple[int, int, int]]:
        rng, cfg = self.rng, self.config
        # Tastes: 2-4 favourite categories (busy categories are favoured more often), a price band, a loyal brand.
        k = int(rng.choice([2, 3, 4], p=[0.35, 0.4, 0.25]))
        k = min(k, self.n_tops)
        favs = rng.choice(self.n_tops, size=k, replace=False, p=self.top_pop / self.top_pop.sum())
        alpha = np.full(self.n_tops, 0.05)
        alpha[favs] = 2.0
        affinity = np.cumsum(rng.dirichlet(alpha))
        self.band = int(rng.choice(3, p=[0.35, 0.45, 0.2]))
        same_tier = rng.random(self.n_tops) < 0.7  # loyal brand usually in the user's own price band
        self.fav_brand = np.where(
            same_tier, 2 * self.band + rng.integers(0, 2, size=self.n_tops), rng.integers(0, 6, size=self.n_tops)
        )
        self.loyalty = 1.0 + 6.0 * float(rng.beta(2.0, 3.0))

        short = rng.random() < cfg.short_user_fraction
        n_sessions = 1 if short else int(rng.integers(cfg.sessions_per_user[0], cfg.sessions_per_user[1] + 1))
        first = int(rng.integers(0, int(self.span * 0.85)))
        last = first + int(rng.uniform(0.15, 1.0) * (self.span - 86400 - first))
        starts = np.sort(rng.integers(first, max(last, first + 1), size=n_sessions))

        self.events = []
        self.t = 0
        pending: int | None = None  # a complement leaf the user comes back for in the next session
        for s in starts:
            self.t = max(int(s), self.t + 1800)  # sessions never overlap
            if self.t >= self.span:
                break
            cat = min(int(np.searchsorted(affinity, rng.random() * affinity[-1], side="right")), self.n_tops - 1)
            leaves, cum = self.top_leaves[cat], self.top_leaf_cum[cat]
            leaf = int(leaves[min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(leaves) - 1)])
            others = leaves[leaves != leaf]
            side = int(others[int(rng.integers(len(others)))]) if len(others) else None
            if short:
                self._browse(leaf, int(rng.integers(2, 5)), cart_p=0.0, side_leaf=side)
                continue
            if pending is not None:
                leaf, chained, pending = pending, pending, None
                bought = self._browse(leaf, 1 + int(rng.integers(3)), cart_p=1.0)
            else:
                bought = self._browse(leaf, 2 + int(rng.poisson(2.5)), cart_p=0.42, side_leaf=side)
                chained = leaf
            # After a purchase the user often wants what goes with it: now, or when they come back.
            for _ in range(3):
                if not bought:
                    break
                target = self._complement(chained)
                if target is None:
                    break
                if rng.random() < 0.5:
                    pending = target
                    break
                bought = self._browse(target, 1 + int(rng.integers(3)), cart_p=1.0)
                chained = target
        return self.events


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """Write the synthetic shop as items.jsonl + events.jsonl: `python -m retrieval.synthetic --out DIR`."""
    parser = argparse.ArgumentParser(prog="python -m retrieval.synthetic", description=main.__doc__)
    parser.add_argument("--out", required=True, help="directory to write items.jsonl and events.jsonl into")
    parser.add_argument("--seed", type=int, default=SyntheticConfig.seed)
    parser.add_argument("--items", type=int, default=SyntheticConfig.n_items)
    parser.add_argument("--users", type=int, default=SyntheticConfig.n_users)
    args = parser.parse_args(argv)
    try:
        config = SyntheticConfig(seed=args.seed, n_items=args.items, n_users=args.users)
    except ValueError as e:
        parser.error(str(e))
    from retrieval.loaders import write_generic  # lazy: the loaders module is not needed to generate

    t0 = time.perf_counter()
    data = generate(config)
    write_generic(data.items, data.interactions, args.out)
    summary = data.summary()
    print(
        f"wrote {summary['items']} items and {summary['events']} events to {args.out} ({time.perf_counter() - t0:.1f}s)"
    )
    print(summary)


if __name__ == "__main__":
    main()
