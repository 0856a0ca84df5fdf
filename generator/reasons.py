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
co-bought             ``Often bought with your recent items.``               item-kNN retrieved it within its top 10
next step             ``A common next step after your recent items.``        the sequential model did, within top 10
similar               ``Similar to what you have been browsing.``            the dense retriever did, within top 10
popular               ``Popular with other shoppers.``                       popularity did, within top 20
new department        ``Something new for you from Beauty.``                 no shown history item is in that department
====================  =====================================================  ==========================================

The last one is the honest reason of a diversity pick: the category-diversity step brings in items from departments
the shopper has not touched, where nothing personal holds; saying that it broadens their picks is true, checkable
and tells the shopper why it is there (reported apart from the personal evidence in the fine-tuning results).

Items are named by `short_name` (the title up to its first comma or bracket, at most five words) so a sentence fits
the generator's reason budget (`GeneratorConfig.max_reason_tokens`). Only history items the prompt actually shows
may be cited (the caller passes them). Complements come from the catalog owner (for the demo shop:
`SyntheticData.complements`); without them that evidence is simply never used.

`check_reason` reads a sentence back with the same patterns and confirms its evidence against the catalog: what
the "≥ 95% of reasons cite confirmed evidence" measure counts (finetune/train.py reports it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from retrieval.catalog import Catalog
from retrieval.types import Candidate, Item

MAX_NAME_WORDS = 5
CO_BOUGHT_RANK = 10  # a signal "backs" a reason only when it ranked the item this high
POPULAR_RANK = 20
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

    def recent_first(self) -> list[Item]:
        return [self.catalog[i] for i in reversed(self.history) if i in self.catalog]

    def cart_items(self) -> list[Item]:
        return [self.catalog[i] for i in self.cart if i in self.catalog]


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


# Each generic sentence comes in a few wordings, so that the K lines of one answer never copy each other (the
# decoder forbids a reason copying 6 tokens of an earlier one; see generator/decoding.py).
_CO_BOUGHT = ("Often bought with your recent items.", "Shoppers who bought your recent items often add this.")
_NEXT = ("A common next step after your recent items.", "Often chosen next after items like yours.")
_SIMILAR = ("Similar to what you have been browsing.", "Close to the items you looked at recently.")
_POPULAR = ("Popular with other shoppers.", "A best seller with other shoppers.")
# Retriever evidence: (kind, signal, best rank that backs it, wordings); one table for saying and for checking.
_SIGNAL_EVIDENCE = (
    ("co-bought", "itemknn", CO_BOUGHT_RANK, _CO_BOUGHT),
    ("next", "sasrec", CO_BOUGHT_RANK, _NEXT),
    ("similar", "dense", CO_BOUGHT_RANK, _SIMILAR),
    ("popular", "popularity", POPULAR_RANK, _POPULAR),
)
_EXPLORE = ("Something new for you from {}.", "Broadens your picks with {}.")
# No evidence at all: says so honestly (the checker never confirms these), in wordings that start differently.
_NONE = ("A well-reviewed pick in {}.", "Worth a look in {}.", "Another choice from {}.", "Also consider this {} item.")


def reason_options(item: Item, ctx: ReasonContext, candidate: Candidate | None = None) -> list[tuple[str, str]]:
    """Every (evidence kind, sentence) that holds for `item`, strongest first; the last few ("none") always hold."""
    out: list[tuple[str, str]] = []
    for term in _query_terms(ctx, item)[:1]:
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
    for kind, signal, limit, wordings in _SIGNAL_EVIDENCE:
        rank = _signal_rank(candidate, signal)
        if rank is not None and rank <= limit:
            out.extend((kind, s) for s in wordings)
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
)
_SIGNAL_SENTENCES = {s: (kind, signal, limit) for kind, signal, limit, wordings in _SIGNAL_EVIDENCE for s in wordings}


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
        kind, signal, limit = _SIGNAL_SENTENCES[text]
        rank = _signal_rank(candidate, signal)
        return kind if rank is not None and rank <= limit else None
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
        if kind == "explore":
            return kind if item.category[:1] == (m["dept"].strip(),) and _new_department(item, recent) else None
    return None
