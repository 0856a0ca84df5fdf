"""Grounded reasons: the sentences the generator may say (and fine-tuning teaches), and their checker.

A reason is only worth showing if it is true of THIS shopper and THIS item. `write_reason` picks the strongest
evidence that holds, in this order, and says it in one short sentence that names what it rests on:

====================  =====================================================  ==========================================
evidence              sentence                                               confirmed when
====================  =====================================================  ==========================================
query term            ``Matches your search for "drill".``                   the term is in the query and in the item
complement (cart)     ``Goes with the Arclite Slim Phone in your cart.``     the item's category complements it
complement (history)  ``Goes with your Arclite Slim Phone.``                 the same, for a shown history item
same brand            ``Same brand as your Arclite Slim Phone.``             both items have that brand
same category         ``An alternative to your Arclite Slim Phone.``         both are in the same leaf category
same department       ``More Electronics, like your recent picks.``          a shown history item is in that department
co-bought (history)   ``Often bought with your recent items.``               item-kNN ranked it in its top 10 from a
                                                                             shown history (not a cart request)
co-bought (cart)      ``Often bought with the items in your cart.``          item-kNN did, from the cart
next step             ``A common next step after your recent items.``        the sequential model did, with a history
                                                                             or cart to follow
similar               ``Similar to what you have been browsing.``            the dense retriever did from the history
                                                                             alone (no query, no cart)
popular               ``The shop's #3 most popular item.``                   the item is in the catalog's top 5% by
                                                                             popularity, at that rank (`popular_items`)
new department        ``Something new for you from Beauty.``                 no shown history item is in that department
====================  =====================================================  ==========================================

A sentence about "your recent items" or "what you have been browsing" needs a history to be about: for a new shopper
the same retriever evidence is simply not said. Popularity is evidence only for the catalog's real best sellers
(top `POPULAR_SHARE` of the catalog by the popularity model's weighted counts, and at least `POPULAR_MIN_WEIGHT`):
a rank in the popularity signal's own list is not, since in a small shop every candidate is "top 20".

The last one is the honest reason of a diversity pick: the category-diversity step brings in items from departments
the shopper has not touched, where nothing personal holds; saying that it broadens their picks is true, checkable
and tells the shopper why it is there (reported apart from the personal evidence in the fine-tuning results).

Items are named by `short_name` (the title up to its first comma or bracket, at most five words) so a sentence fits
the generator's reason budget (`GeneratorConfig.max_reason_tokens`). Only history items the prompt actually shows
may be cited (the caller passes them). Complements come from the catalog owner (for the demo shop:
`SyntheticData.complements`); without them that evidence is simply never used.

`check_reason` reads a sentence back with the same patterns and confirms its evidence against the catalog: what
the "≥ 95% of reasons cite confirmed evidence" measure counts (finetune/train.py reports it). `verify_reason` also
accepts the honest no-evidence sentences when the department they name is the item's: every served reason must pass
it (tests/test_reasons_property.py).

The K reasons of one list differ where the evidence differs: `distinct_choices` moves a sentence an earlier pick of
the same list already uses behind the pick's other true sentences (or drops it from the model's choices), so five
picks with different evidence never share one generic line. docs/reasons.md shows examples.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from retrieval.catalog import Catalog
from retrieval.types import Candidate, Item

MAX_NAME_WORDS = 5
CO_BOUGHT_RANK = 10  # a signal "backs" a reason only when it ranked the item this high
# "Popular" means a real best seller: the top 5% of the catalog by the popularity model's weighted counts (a view
# weighs 1, a purchase 5, decayed by age), and a weight of at least 3 (about three recent views), so that a shop
# with little traffic has no "best sellers" to speak of.
POPULAR_SHARE = 0.05
POPULAR_MIN_WEIGHT = 3.0
_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset("and the for with from your you are this that not but any all new set pack size".split())  # noqa: SIM905


def short_name(title: str) -> str:
    """'Arclite Slim Phone Case for 6.1-inch, Midnight Blue' -> 'Arclite Slim Phone Case'.

    The title up to its first comma, bracket or separator, at most `MAX_NAME_WORDS` words, trailing small words
    dropped: a name a shopper recognises in ~6-10 tokens.
    """
    head = re.split(r"\s*[,(\[|/:;]\s*|\s+-\s+", title.strip(), maxsplit=1)[0].strip()
    words = head.split()[:MAX_NAME_WORDS] or title.split()[:MAX_NAME_WORDS]
    while len(words) > 2 and words[-1].lower() in {"for", "with", "and", "of", "the", "in", "to", "a"}:
        words.pop()
    return " ".join(words)


@dataclass(frozen=True)
class ReasonContext:
    """What a reason may rest on: the shown history and cart, the query, the candidate's retrieval evidence."""

    catalog: Catalog
    history: tuple[str, ...] = ()  # item ids the prompt shows, oldest first
    cart: tuple[str, ...] = ()
    query: str | None = None
    complements: Mapping[str, frozenset[str]] = field(default_factory=dict)  # leaf path -> complement leaf paths
    popular: Mapping[str, int] = field(default_factory=dict)  # best seller id -> its rank (`popular_items`)

    @property
    def mode(self) -> str:
        """What the retrievers were answering (as `RetrievalRequest.mode`): 'cart', 'query' or 'user'."""
        return "cart" if self.cart else "query" if self.query else "user"

    def recent_first(self) -> list[Item]:
        return [self.catalog[i] for i in reversed(self.history) if i in self.catalog]

    def cart_items(self) -> list[Item]:
        return [self.catalog[i] for i in self.cart if i in self.catalog]


def popular_items(
    catalog: Catalog, counts: np.ndarray, share: float = POPULAR_SHARE, min_weight: float = POPULAR_MIN_WEIGHT
) -> dict[str, int]:
    """The catalog's best sellers, id -> rank (1 = most popular): the top `share` of its items by `counts` (the
    popularity model's weighted counts, aligned with the catalog's rows; at least one item), keeping only those
    weighing `min_weight` or more. Ties keep catalog order."""
    counts = np.asarray(counts, dtype=np.float64)
    if len(counts) != len(catalog):
        raise ValueError(f"popularity counts cover {len(counts)} items, the catalog has {len(catalog)}")
    top = np.argsort(-counts, kind="stable")[: max(1, int(len(counts) * share))]
    return {catalog.items[r].id: rank for rank, r in enumerate(top, start=1) if counts[r] >= min_weight}


def _leaf(item: Item) -> str:
    return " > ".join(item.category)


def _complements(ctx: ReasonContext, a: Item, b: Item) -> bool:
    """True when b's category is a complement of a's (either direction: a case goes with a phone and back)."""
    la, lb = _leaf(a), _leaf(b)
    return lb in ctx.complements.get(la, frozenset()) or la in ctx.complements.get(lb, frozenset())


def _query_terms(ctx: ReasonContext, item: Item) -> list[str]:
    if not ctx.query:
        return []
    text = set(_WORD.findall(f"{item.title} {' '.join(item.category)} {item.brand}".lower()))
    terms = [w for w in _WORD.findall(ctx.query.lower()) if len(w) >= 3 and w not in _STOP and w in text]
    return sorted(dict.fromkeys(terms), key=len, reverse=True)


def _new_department(item: Item, recent: Sequence[Item]) -> bool:
    """The item's department is one no shown history item is in (and there is a history to differ from)."""
    return bool(item.category) and bool(recent) and all(h.category[:1] != item.category[:1] for h in recent)


def _signal_rank(candidate: Candidate | None, name: str) -> int | None:
    if candidate is None or name not in candidate.sources:
        return None
    return candidate.sources[name].rank


def _ranked(signal: str) -> Callable[[ReasonContext, Item, Candidate | None], bool]:
    """The retriever `signal` ranked the candidate within CO_BOUGHT_RANK."""

    def holds(ctx: ReasonContext, item: Item, candidate: Candidate | None) -> bool:
        rank = _signal_rank(candidate, signal)
        return rank is not None and rank <= CO_BOUGHT_RANK

    return holds


def _has_history(ctx: ReasonContext, item: Item) -> bool:
    return any(i != item.id for i in ctx.history)


@dataclass(frozen=True)
class _Evidence:
    """Evidence that is a fact about the shop rather than about one named item: its wordings and when it holds."""

    kind: str
    wordings: tuple[str, ...]
    holds: Callable[[ReasonContext, Item, Candidate | None], bool]


# Each generic sentence comes in a few wordings, so that the K lines of one answer never copy each other (the
# decoder forbids a reason copying 6 tokens of an earlier one; see generator/decoding.py). One table for saying and
# for checking. Sentences about "your recent items" need a shown history; "browsing" is only true of the dense
# retriever's user mode (in query and cart mode it matched the query or the cart).
_SIGNAL_EVIDENCE = (
    _Evidence(
        "co-bought",
        ("Often bought with your recent items.", "Shoppers who bought your recent items often add this."),
        lambda ctx, it, c: ctx.mode != "cart" and _has_history(ctx, it) and _ranked("itemknn")(ctx, it, c),
    ),
    _Evidence(
        "co-bought",
        ("Often bought with the items in your cart.", "Shoppers often add this to a cart like yours."),
        lambda ctx, it, c: ctx.mode == "cart" and _ranked("itemknn")(ctx, it, c),
    ),
    _Evidence(
        "next",
        ("A common next step after your recent items.", "Often chosen next after items like yours."),
        lambda ctx, it, c: (_has_history(ctx, it) or bool(ctx.cart)) and _ranked("sasrec")(ctx, it, c),
    ),
    _Evidence(
        "similar",
        ("Similar to what you have been browsing.", "Close to the items you looked at recently."),
        lambda ctx, it, c: ctx.mode == "user" and _has_history(ctx, it) and _ranked("dense")(ctx, it, c),
    ),
    _Evidence(
        "popular",
        ("Popular with other shoppers.", "A best seller with other shoppers."),
        lambda ctx, it, c: it.id in ctx.popular,
    ),
)
# Popularity is said by rank, the most specific wording, so best sellers side by side say different things (the
# generic wordings above are still confirmed when true: an adapter trained before may write them).
_POPULAR_RANKED = "The shop's #{} most popular item."
_EXPLORE = ("Something new for you from {}.", "Broadens your picks with {}.")
# No evidence at all: says so honestly, claiming nothing (no "well-reviewed": there are no reviews to back it), in
# wordings that start differently. `check_reason` never confirms these; `verify_reason` checks the department.
_NONE = ("Worth a look in {}.", "Another choice from {}.", "Also consider this {} item.", "One more option from {}.")


def reason_options(item: Item, ctx: ReasonContext, candidate: Candidate | None = None) -> list[tuple[str, str]]:
    """Every (evidence kind, sentence) that holds for `item`, strongest first; the last few ("none") always hold."""
    out: list[tuple[str, str]] = []
    for term in _query_terms(ctx, item)[:3]:  # several, longest first: picks matching different words say so
        out.append(("query", f'Matches your search for "{term}".'))
    for c in ctx.cart_items():
        if c.id != item.id and _complements(ctx, c, item):
            out.append(("complement", f"Goes with the {short_name(c.title)} in your cart."))
    recent = [h for h in ctx.recent_first() if h.id != item.id]
    for h in recent:
        if _complements(ctx, h, item):
            out.append(("complement", f"Goes with your {short_name(h.title)}."))
            break
    for h in recent:
        if item.brand and h.brand == item.brand:
            out.append(("brand", f"Same brand as your {short_name(h.title)}."))
            break
    for h in recent:
        if item.category and h.category == item.category:
            out.append(("category", f"An alternative to your {short_name(h.title)}."))
            break
    if item.category and any(h.category[:1] == item.category[:1] for h in recent):
        out.append(("department", f"More {item.category[0]}, like your recent picks."))
    for evidence in _SIGNAL_EVIDENCE:
        if evidence.kind == "popular" and item.id in ctx.popular:  # said by its rank: the most specific wording
            out.append(("popular", _POPULAR_RANKED.format(ctx.popular[item.id])))
        elif evidence.holds(ctx, item, candidate):
            out.extend((evidence.kind, s) for s in evidence.wordings)
    if _new_department(item, recent):
        out.extend(("explore", s.format(item.category[0])) for s in _EXPLORE)
    department = item.category[0] if item.category else "this shop"
    out.extend(("none", s.format(department)) for s in _NONE)
    return out


def grounded_sentences(
    item: Item,
    ctx: ReasonContext,
    candidate: Candidate | None = None,
    *,
    fits: Callable[[str], bool] = lambda _: True,
) -> list[str]:
    """What the generator may say about `item` (the choices of its constrained reason decoding): every sentence
    whose evidence holds and that `fits` (the token budget), strongest first; only when none does, the honest
    no-evidence sentences."""
    options = [(kind, sentence) for kind, sentence in reason_options(item, ctx, candidate) if fits(sentence)]
    backed = [sentence for kind, sentence in options if kind != "none"]
    return backed or [sentence for kind, sentence in options if kind == "none"]


def write_reason(
    item: Item,
    ctx: ReasonContext,
    candidate: Candidate | None = None,
    *,
    fits: Callable[[str], bool] = lambda _: True,
    avoid: Iterable[str] = (),
) -> tuple[str, str]:
    """(evidence kind, sentence): the strongest option that `fits` (e.g. the token budget) and is not in `avoid`."""
    used = set(avoid)
    options = reason_options(item, ctx, candidate)
    for kind, sentence in options:
        if sentence not in used and fits(sentence):
            return kind, sentence
    return options[-1]


# --- checking a generated reason --------------------------------------------------------------------------------

_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("query", re.compile(r'^Matches your search for "(?P<term>[^"]+)"\.?$')),
    ("complement-cart", re.compile(r"^Goes with the (?P<name>.+) in your cart\.?$")),
    ("complement", re.compile(r"^Goes with your (?P<name>.+?)\.?$")),
    ("brand", re.compile(r"^Same brand as your (?P<name>.+?)\.?$")),
    ("category", re.compile(r"^An alternative to your (?P<name>.+?)\.?$")),
    ("department", re.compile(r"^More (?P<dept>.+), like your recent picks\.?$")),
    ("explore", re.compile(r"^(?:Something new for you from|Broadens your picks with) (?P<dept>.+?)\.?$")),
    ("popular", re.compile(r"^The shop's #(?P<rank>\d+) most popular item\.?$")),
)
_SIGNAL_SENTENCES = {s: evidence for evidence in _SIGNAL_EVIDENCE for s in evidence.wordings}
_NONE_PATTERNS = tuple(re.compile("^" + re.escape(s).replace(r"\{\}", "(?P<dept>.+)") + "$") for s in _NONE)


def _named(items: Sequence[Item], name: str) -> list[Item]:
    """Items a mention refers to: its short name, or any prefix of its title of at least two words ("Globetrek
    Explorer Compression Packing Cubes Set" names "Globetrek Explorer Compression Packing Cubes Set of 6, Silver")."""
    n = " ".join(name.split()).lower()
    out = []
    for it in items:
        title = " ".join(it.title.split()).lower()
        prefix = title.startswith(n) and (len(title) == len(n) or not title[len(n)].isalnum())
        if n == short_name(it.title).lower() or (len(n.split()) >= 2 and prefix):
            out.append(it)
    return out


def check_reason(reason: str, item: Item, ctx: ReasonContext, candidate: Candidate | None = None) -> str | None:
    """The evidence kind a reason cites if the catalog confirms it, else None (unverifiable or false).

    A sentence outside the patterns above is unverifiable, so it counts as unconfirmed: the measure is "cites
    checkable, true evidence", not "sounds plausible".
    """
    text = reason.strip()
    if text in _SIGNAL_SENTENCES:
        evidence = _SIGNAL_SENTENCES[text]
        return evidence.kind if evidence.holds(ctx, item, candidate) else None
    recent = [h for h in ctx.recent_first() if h.id != item.id]
    for kind, pattern in _PATTERNS:
        m = pattern.match(text)
        if m is None:
            continue
        if kind == "query":
            return kind if m["term"].lower() in _query_terms(ctx, item) else None
        if kind == "complement-cart":
            ok = any(_complements(ctx, c, item) for c in _named(ctx.cart_items(), m["name"]))
            return "complement" if ok else None
        if kind == "complement":
            return kind if any(_complements(ctx, h, item) for h in _named(recent, m["name"])) else None
        if kind == "brand":
            return kind if any(item.brand and h.brand == item.brand for h in _named(recent, m["name"])) else None
        if kind == "category":
            return (
                kind if any(item.category and h.category == item.category for h in _named(recent, m["name"])) else None
            )
        if kind == "department":
            dept = m["dept"].strip()
            ok = bool(item.category) and item.category[0] == dept and any(h.category[:1] == (dept,) for h in recent)
            return kind if ok else None
        if kind == "popular":
            return kind if ctx.popular.get(item.id) == int(m["rank"]) else None
        if kind == "explore":
            return kind if item.category[:1] == (m["dept"].strip(),) and _new_department(item, recent) else None
    return None


def verify_reason(reason: str, item: Item, ctx: ReasonContext, candidate: Candidate | None = None) -> str | None:
    """`check_reason`, plus "none" for an honest no-evidence sentence that names the item's own department: None
    only for a sentence that is false or unverifiable. What every served reason must pass."""
    kind = check_reason(reason, item, ctx, candidate)
    if kind is not None:
        return kind
    department = item.category[0] if item.category else "this shop"
    for pattern in _NONE_PATTERNS:
        m = pattern.match(reason.strip())
        if m is not None and m["dept"] == department:
            return "none"
    return None


def prefer_fresh(sentences: Sequence[str], used: Iterable[str]) -> list[str]:
    """`sentences` (one pick's true sentences, strongest first) without those an earlier pick of the same list
    already leads with, so that the reasons of a list differ where the evidence does. A repeat is kept when dropping
    it would leave only no-evidence sentences where there was evidence: repeating true evidence beats hiding it."""
    seen = set(used)
    fresh = [s for s in sentences if s not in seen]
    if len(fresh) == len(sentences):
        return list(sentences)
    if fresh and (not all(map(_is_none_sentence, fresh)) or all(map(_is_none_sentence, sentences))):
        return fresh
    return list(sentences)


def distinct_choices(per_pick: Sequence[Sequence[str]]) -> list[list[str]]:
    """`prefer_fresh` along one list: each pick's sentences, avoiding what the picks before it lead with (each
    pick's first sentence is its planned reason: what a fallback says, and what later picks avoid)."""
    leads: list[str] = []
    out: list[list[str]] = []
    for sentences in per_pick:
        choices = prefer_fresh(sentences, leads)
        out.append(choices)
        if choices:
            leads.append(choices[0])
    return out


def _is_none_sentence(sentence: str) -> bool:
    return any(p.match(sentence) for p in _NONE_PATTERNS)
