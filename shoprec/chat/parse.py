"""Deterministic parsers: one shopper message + the current state -> the slots it sets, no model involved.

What they read (each a small, documented rule set; the labelled set eval/data/chat_requests.jsonl measures them):

- prices: "under $50", "less than 40 euros", "over 20", "at least 15", "between 10 and 30", "$10-$30", "around 60",
  "budget 80", number formats "1.234,50 €", "1,234.50", "50€", "€ 50", "EUR 50", small number words ("fifty");
  relative: "cheaper" -> below the middle price of the cards last shown, "cheaper than the second one" -> below
  that card's price, "more expensive" / "pricier" -> above the middle price;
- brands: the catalog's own brand names (a typo within difflib ratio 0.8 of a single-word brand counts), negated
  by a cue before them in the same clause ("no Sony", "not Acme", "without", "except", "anything but", "avoid")
  or "not that brand" -> the brand of the referenced card (else the first card);
- ordinals and item references: "the second one", "#2", "number 3", "the last one" -> a card of the last shown
  list; with "like/similar" it is a reference item, with "not/no/remove/hide/don't like" it is rejected, with
  "add/buy/take/cart" it goes in the cart;
- categories: the catalog's own category names at every level (leaf or parent words, singular or plural, typos
  via difflib), the most specific match wins;
- attributes: the catalog's own attribute values (e.g. colours) mentioned as whole words;
- injected instructions ("ignore previous instructions", "system prompt", "you are now ...") and off-topic
  messages (no word the catalog knows, no slot): flagged, so the turn changes nothing but its answer's text.

What is left of the message after these is the soft wish (`wanted`), stripped of filler words.
"""

from __future__ import annotations

import difflib
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from retrieval.types import Item
from shoprec.chat.state import ChatState

# --- numbers ---------------------------------------------------------------------------------------------------------

_CURRENCY = r"(?:\$|€|£|usd|euros?|eur|dollars?|bucks|pounds?|gbp|chf)(?![a-z])"
# 1.234,50 / 1,234.50 / 1234.5 / 1234,50 / 50
_NUM = r"\d{1,3}(?:[.,\s]\d{3})+(?:[.,]\d{1,2})?|\d+(?:[.,]\d{1,2})?"
_WORD_NUMBERS = {
    "ten": 10,
    "fifteen": 15,
    "twenty": 20,
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "sixty": 60,
    "seventy": 70,
    "eighty": 80,
    "ninety": 90,
    "hundred": 100,
    "a hundred": 100,
    "one hundred": 100,
    "two hundred": 200,
    "five hundred": 500,
    "a thousand": 1000,
    "one thousand": 1000,
}
_WORDNUM = "|".join(sorted((re.escape(w) for w in _WORD_NUMBERS), key=len, reverse=True))
# an amount: optional currency before, the number (digits or words, an optional k), optional currency after
_AMOUNT = rf"(?:{_CURRENCY}\s?)?(?:{_NUM}|{_WORDNUM})(?:\s?k\b)?(?:\s?{_CURRENCY})?"


def parse_number(text: str) -> float:
    """One amount as written -> a float: '1.234,50 €' -> 1234.5, '1,234.50' -> 1234.5, '50k' -> 50000.

    A separator followed by exactly three digits is a thousands separator unless it is the only one and the
    amount is written with a comma-decimal elsewhere; a separator followed by one or two digits at the end is
    the decimal point. ValueError when there is no number.
    """
    t = re.sub(rf"^\s*{_CURRENCY}\s*|\s*{_CURRENCY}\s*$", "", text.strip().lower())
    mult = 1.0
    if re.search(r"\d\s?k$", t):
        t, mult = t[:-1].strip(), 1000.0
    if t in _WORD_NUMBERS:
        return _WORD_NUMBERS[t] * mult
    digits = re.sub(r"\s", "", t)
    m = re.fullmatch(r"(\d+(?:[.,]\d{3})*)(?:[.,](\d{1,2}))?", digits)
    if m is None:
        raise ValueError(f"not an amount: {text!r}")
    whole = re.sub(r"[.,]", "", m.group(1))
    frac = m.group(2) or ""
    return (float(whole) + (float("0." + frac) if frac else 0.0)) * mult


# --- the result of parsing one message ---------------------------------------------------------------------------


@dataclass
class Parsed:
    """The slots one message sets; None / empty = not mentioned."""

    min_price: float | None = None
    max_price: float | None = None
    category: str | None = None
    brands: list[str] = field(default_factory=list)
    excluded_brands: list[str] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)
    references: list[str] = field(default_factory=list)  # item ids
    rejected: list[str] = field(default_factory=list)
    cart: list[str] = field(default_factory=list)
    wanted: str = ""
    injection: bool = False
    off_topic: bool = False
    unknown_words: bool = False  # no slot, and none of its words is in the catalog (a hint of off-topic)
    anchored: bool = False  # a slot or a relative cue ("cheaper"): the message refers to the catalog or the state
    reset: bool = False  # "start over"

    def slots(self) -> dict[str, object]:
        """The slot values as plain data (what the labelled set is scored on)."""
        return {
            "min_price": self.min_price,
            "max_price": self.max_price,
            "category": self.category,
            "brands": sorted(self.brands),
            "excluded_brands": sorted(self.excluded_brands),
            "attributes": dict(sorted(self.attributes.items())),
            "references": list(self.references),
            "rejected": list(self.rejected),
            "cart": list(self.cart),
        }


# --- the catalog's vocabulary ------------------------------------------------------------------------------------


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w&'\- ]+", " ", text.lower())).strip()


def _singular(word: str) -> str:
    for suffix, repl in (("ies", "y"), ("ches", "ch"), ("shes", "sh"), ("sses", "ss"), ("s", "")):
        if word.endswith(suffix) and len(word) > len(suffix) + 2 and not word.endswith("ss"):
            return word[: -len(suffix)] + repl
    return word


def _sing_phrase(phrase: str) -> str:
    return " ".join(_singular(w) for w in phrase.split())


_STOP = frozenset(
    (  # filler words: never a wish, never a category on their own
        "a", "an", "the", "and", "or", "for", "of", "to", "in", "on", "with", "my", "me", "i", "im", "i'm", "we", "you",
        "your", "it", "its", "is", "are", "be", "some", "any", "something", "thing", "things", "one", "ones", "please",
        "want", "need", "looking", "look", "find", "show", "get", "give", "like", "would", "love", "buy", "gift",
        "present", "new", "good", "nice", "best", "great", "really", "very", "just", "also", "more", "less", "than",
        "that", "this", "these", "those", "there", "here", "what", "which", "who", "can", "could", "should", "do",
        "does", "not", "no", "but", "so", "as", "at", "by", "from", "about", "around", "under", "over", "below",
        "above", "between", "cheap", "cheaper", "expensive", "pricier", "budget", "price", "prices", "dollars", "euros",
        "bucks",
        "max", "maximum", "min", "minimum", "least", "most", "up", "him", "her", "his", "them", "they", "their", "dad",
        "mom", "mum", "son", "daughter", "friend", "wife", "husband", "kid", "kids", "boy", "girl", "someone", "likes",
        "loves", "enjoys", "add", "remove", "hide", "cart", "basket", "instead", "else", "other", "another", "again",
        "too", "only", "except", "without", "avoid", "nothing", "brand", "brands", "ideally", "preferably", "if",
        "have", "got", "idea", "searching", "help", "possible", "made", "skip", "exclude", "excluding", "never", "non",
        "dont", "don't",
    )
)  # fmt: skip


class CatalogVocab:
    """The words a shop's catalog knows: category names -> paths, brands, attribute values, content words."""

    def __init__(self, items: Iterable[Item]) -> None:
        names: dict[str, set[str]] = defaultdict(set)  # normalised (singular) name -> category path prefixes
        part_names: dict[str, set[str]] = defaultdict(set)  # a part of a name ("cameras" of "Cameras & Photo")
        brands: dict[str, str] = {}
        attrs: dict[str, tuple[str, str]] = {}
        attr_conflicts: set[str] = set()
        words: set[str] = set()
        departments: set[str] = set()
        for it in items:
            if it.category:
                departments.add(it.category[0])
            for level in range(1, len(it.category) + 1):
                path = " > ".join(it.category[:level])
                name = _norm(it.category[level - 1])
                names[_sing_phrase(name)].add(path)
                for part in re.split(r"\s*(?:&|,| and )\s*", name):  # "Sports & Outdoors" -> sports, outdoors
                    if part and part != name:
                        part_names[_sing_phrase(part)].add(path)
            if it.brand:
                brands[_norm(it.brand)] = it.brand
            for key, value in it.attributes.items():
                v = _norm(value)
                if v and not any(c.isdigit() for c in v) and len(v) > 2:
                    if v in attrs and attrs[v][0] != key:
                        attr_conflicts.add(v)
                    attrs.setdefault(v, (key, value))
            words.update(_singular(w) for w in _norm(it.text()).split() if len(w) > 2)
        # a name under several paths means its most general one when they nest, else it is ambiguous
        self.categories: dict[str, str] = {}
        # a whole category name wins over a part of another one: "cameras" is Cameras, not Cameras & Photo
        for name, paths in [*part_names.items(), *names.items()]:
            shortest = min(paths, key=len)
            if all(p == shortest or p.startswith(shortest + " > ") for p in paths):
                self.categories[name] = shortest
        self.brands = brands  # normalised -> as written in the catalog
        # a brand's words with any punctuation or spaces between them: "LW Measurements, LLC" and "A.T. Cross" are
        # found as typed ("lw measurements, llc", "a.t. cross") and without the punctuation
        self.brand_patterns = [
            (re.compile(r"(?<![\w])" + r"[^\w&']+".join(map(re.escape, norm.split())) + r"(?![\w])"), brand)
            for norm, brand in brands.items()
        ]
        self.attributes = {v: kv for v, kv in attrs.items() if v not in attr_conflicts}
        self.words = frozenset(words)
        self.departments = tuple(sorted(departments))
        self._category_keys = sorted(self.categories)
        self._single_word_brands = [b for b in brands if " " not in b and len(b) >= 5]


# --- rules -------------------------------------------------------------------------------------------------------

_ORDINALS = {
    "first": 1,
    "1st": 1,
    "second": 2,
    "2nd": 2,
    "third": 3,
    "3rd": 3,
    "fourth": 4,
    "4th": 4,
    "fifth": 5,
    "5th": 5,
    "sixth": 6,
    "6th": 6,
    "last": -1,
    "top": 1,
}
_ORD_RE = re.compile(
    r"(?:\b(?:the\s+)?(" + "|".join(_ORDINALS) + r")\s+(?:one|item|product|card|option|pick)s?\b|(first|second|third"
    r"|fourth|fifth|last|1st|2nd|3rd|4th|5th)\b|(?:#|\bnumber\s+|\bno\.\s*|\bitem\s+|\boption\s+)(\d)\b)"
)
_INJECTION = re.compile(
    r"ignore (?:all |any |the |your )?(?:previous|prior|above|earlier|preceding)|ignore (?:all |your )?instructions"
    r"|disregard (?:all |the |your )?(?:previous|prior|above|instructions|rules)|system prompt|you are now\b"
    r"|act as (?:a|an)\b|new instructions|developer mode|jailbreak|reveal (?:your|the) (?:prompt|instructions)"
    r"|forget (?:all |your |everything|previous)|<\|im_start\|>|\bpretend (?:to be|you are)",
    re.I,
)
_NEGATORS = (
    r"no|not|non|without|except|excluding|exclude|avoid|never|but not|anything but|other than|nothing from|"
    r"none from|don't want|dont want|do not want|don't like|dont like|do not like|hate|skip|drop|no more|not from"
)
_NEG_RE = re.compile(rf"\b(?:{_NEGATORS})\b[^.,;!?]*$", re.I)
_REJECT_CUE = re.compile(
    r"\b(?:not|no|remove|hide|drop|skip|without|don't like|dont like|do not like|hate|not the|get rid of|"
    r"don't want|dont want|do not want|nope)\b",
    re.I,
)
_REF_CUE = re.compile(
    r"\b(?:like|similar|more of|same as|closer to|along the lines|in the style of|resembl\w*|such as)\b", re.I
)
_CART_CUE = re.compile(r"\b(?:add|buy|take|cart|basket|order|purchase|get me)\b", re.I)
_OFF_TOPIC = re.compile(
    r"\b(?:weather|joke|poem|song lyrics|story|news|politics?|election|who are you|your name|how are you|capital of"
    r"|translate|homework|meaning of life|write (?:me )?(?:a|an) (?:essay|email|letter|code))\b",
    re.I,
)
_RESET = re.compile(r"\b(?:start over|start again|reset|new search|clear (?:everything|all|filters))\b", re.I)

_BETWEEN = re.compile(rf"\b(?:between|from)\s+({_AMOUNT})\s+(?:and|to|-)\s+({_AMOUNT})", re.I)
_RANGE = re.compile(rf"({_AMOUNT})\s*(?:-|–|to)\s*({_AMOUNT})", re.I)
_MAX = re.compile(
    rf"(?:\bunder|\bbelow|\bless than|\bcheaper than|\bat most|\bup to|\bno more than|\bnot more than|\bmax(?:imum)?"
    rf"|\bwithin|\bbudget(?: is| of)?|\bbelow|\bnot over|\bnot above|<=?|\blower than|\bnothing over|\bno higher than"
    rf"|\bnothing above|\bunder the|\bspend(?:ing)?(?: up to| at most)?|\bbudget:?|\bcap(?:ped)? at)"
    rf"\s*:?\s*({_AMOUNT})",
    re.I,
)
_MAX_AFTER = re.compile(rf"({_AMOUNT})\s+(?:max|maximum|or less|tops|at most|budget|or under|or below|limit)\b", re.I)
_MIN = re.compile(
    rf"(?:\bover|\babove|\bmore than|\bat least|\bminimum|\bmin|\bstarting at|\bpricier than|\bhigher than"
    rf"|\bmore expensive than|>=?|\bno less than|\bnot less than|\bnot under)\s*:?\s*({_AMOUNT})",
    re.I,
)
_MIN_AFTER = re.compile(rf"({_AMOUNT})\s+(?:or more|and up|and above|plus|minimum|or higher|or above)\b", re.I)
_AROUND = re.compile(rf"\b(?:around|about|roughly|approximately|approx\.?|~)\s*({_AMOUNT})", re.I)
_FOR_AMOUNT = re.compile(rf"\bfor\s+({_AMOUNT})", re.I)
_CHEAPER = re.compile(r"\b(?:cheaper|less expensive|lower price[sd]?|more affordable|budget option|cheapest)\b", re.I)
_PRICIER = re.compile(r"\b(?:more expensive|pricier|higher end|high-end|premium|fancier|more upmarket)\b", re.I)
_FILLER = re.compile(
    r"\b(?:i(?:'m| am)? (?:want|need|would like|looking for|look for|searching for)|show me|can you (?:find|show)"
    r"(?: me)?|could you (?:find|show)(?: me)?|please|find me|get me|i'd like|i want|i need|looking for|"
    r"recommend(?: me)?|suggest(?: me)?|something|anything|some|any|maybe|thanks?|thank you|hi|hello|hey)\b",
    re.I,
)


def _is_currency_only(amount: str) -> bool:
    return _amount(amount) is None


def _amount(text: str) -> float | None:
    try:
        return parse_number(text)
    except ValueError:
        return None


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


class Parser:
    """Parse messages against one catalog's vocabulary (built once per shop)."""

    def __init__(self, vocab: CatalogVocab) -> None:
        self.vocab = vocab

    # public ---------------------------------------------------------------------------------------------------
    def parse(self, message: str, state: ChatState | None = None) -> Parsed:
        """The slots `message` sets, given the current state (for ordinals and relative prices)."""
        state = state or ChatState()
        out = Parsed()
        text = message.strip()
        if _INJECTION.search(text):
            out.injection = True
            return out  # an injected instruction changes nothing: not even the parts around it
        if _RESET.search(text):
            out.reset = True
        rest = self._prices(text, state, out)
        rest = self._ordinals(rest, state, out)
        rest = self._brands(rest, text, state, out)
        rest = self._attributes(rest, out)
        rest = self._category(rest, out)
        wanted = _FILLER.sub(" ", rest)
        wanted = re.sub(r"[^\w&'\- ]+", " ", wanted)
        words = [w for w in wanted.split() if w.lower() not in _STOP]
        out.wanted = " ".join(words)
        has_slot = any(v not in (None, [], {}, "") for v in out.slots().values()) or out.reset
        known = [w for w in words if _singular(w.lower()) in self.vocab.words]
        relative = _CHEAPER.search(text) or _PRICIER.search(text)
        # off-topic: a known off-topic form ("capital of France", "tell me a joke"). Words none of which the catalog
        # knows are only a hint (`unknown_words`): "a nice perfume for my wife" is shopping in a shop whose titles
        # say "Eau de Parfum"; the turn decides by how close the best product is (the dense similarity). A message
        # of filler words only ("something nice") is a broad request, which the turn may answer with a question.
        out.anchored = has_slot or bool(relative)
        if not out.anchored and _OFF_TOPIC.search(text):
            out.off_topic = True
        elif not out.anchored and words and not known:
            out.unknown_words = True
        return out

    # prices -----------------------------------------------------------------------------------------------------
    def _prices(self, text: str, state: ChatState, out: Parsed) -> str:
        def take(m: re.Match[str]) -> str:
            return text[: m.start()] + " " + text[m.end() :]

        for rx in (_BETWEEN, _RANGE):
            m = rx.search(text)
            if m and not (_is_currency_only(m.group(1)) or _is_currency_only(m.group(2))):
                lo, hi = _amount(m.group(1)), _amount(m.group(2))
                # a range needs a price-like context: a currency, or "between", or a price word in the message
                pricey = rx is _BETWEEN or re.search(_CURRENCY, m.group(0), re.I) or re.search(r"price|budget|\$", text)
                if lo is not None and hi is not None and lo <= hi and pricey:
                    out.min_price, out.max_price = lo, hi
                    text = take(m)
                    break
        for rx, slot in (
            (_MAX, "max_price"),
            (_MAX_AFTER, "max_price"),
            (_MIN, "min_price"),
            (_MIN_AFTER, "min_price"),
        ):
            m = rx.search(text)
            if m and not _is_currency_only(m.group(1)) and getattr(out, slot) is None:
                value = _amount(m.group(1))
                if value is not None:
                    setattr(out, slot, value)
                    text = take(m)
        if out.min_price is None and out.max_price is None:
            m = _AROUND.search(text)
            if m and (value := _amount(m.group(1))) is not None:
                out.min_price, out.max_price = round(value * 0.8, 2), round(value * 1.2, 2)
                text = take(m)
        if out.max_price is None:
            m = _FOR_AMOUNT.search(text)
            if m and re.search(_CURRENCY, m.group(1), re.I) and (value := _amount(m.group(1))) is not None:
                out.max_price = value  # "headphones for $40": a budget
                text = take(m)
        if out.max_price is None and out.min_price is None:
            # a bare amount with a currency anywhere: a budget ("50 euros, red")
            m = re.search(rf"(?:{_CURRENCY}\s?(?:{_NUM})|(?:{_NUM})\s?{_CURRENCY})", text, re.I)
            if m and (value := _amount(m.group(0))) is not None:
                out.max_price = value
                text = take(m)
        shown = state.shown_prices()
        if out.max_price is None and _CHEAPER.search(text):
            ref = self._ordinal_items(text, state)
            prices = [s.price for s in ref if s.price is not None]
            if prices:
                out.max_price = round(min(prices) - 0.01, 2)
            elif shown:
                out.max_price = round(_median(shown) - 0.01, 2)  # strictly below the middle card: prices drop
            text = _CHEAPER.sub(" ", text)
        if out.min_price is None and _PRICIER.search(text) and shown:
            out.min_price = round(_median(shown) + 0.01, 2)
            text = _PRICIER.sub(" ", text)
        return text

    # ordinals and item references -------------------------------------------------------------------------------
    def _ordinal_items(self, text: str, state: ChatState) -> list:  # type: ignore[type-arg]
        found = []
        for m in _ORD_RE.finditer(text):
            word = m.group(1) or m.group(2)
            n = _ORDINALS[word.lower()] if word else int(m.group(3))
            idx = len(state.shown) - 1 if n == -1 else n - 1
            if 0 <= idx < len(state.shown):
                found.append(state.shown[idx])
        return found

    def _ordinals(self, text: str, state: ChatState, out: Parsed) -> str:
        if not state.shown:
            return text
        pieces = []
        last = 0
        for m in _ORD_RE.finditer(text):
            word = m.group(1) or m.group(2)
            n = _ORDINALS[word.lower()] if word else int(m.group(3))
            idx = len(state.shown) - 1 if n == -1 else n - 1
            if not 0 <= idx < len(state.shown):
                continue
            item_id = state.shown[idx].item_id
            before = text[max(0, m.start() - 40) : m.start()]
            clause = re.split(r"[.,;!?]|\bbut\b|\band\b", before)[-1]
            if re.search(r"\bthat brand\b|\bbrand\b", text[m.end() : m.end() + 25] + clause, re.I):
                pieces.append(text[last : m.start()])
                last = m.end()
                continue  # "not the brand of the second one": the brand rule reads it
            after = re.split(r"[.,;!?]|\bbut\b|\band\b", text[m.end() : m.end() + 40])[0]
            if re.search(r"\bthan\s*$", clause, re.I):  # "cheaper than the second one": the price rule read it
                pieces.append(text[last : m.start()])
                last = m.end()
                continue
            if _CART_CUE.search(clause) or _CART_CUE.search(after):
                out.cart.append(item_id)
            elif _REJECT_CUE.search(clause):
                out.rejected.append(item_id)
            elif _REF_CUE.search(clause) or re.search(r"\b(?:cheaper|pricier|expensive)\b", clause, re.I):
                if not re.search(r"\bcheaper|pricier|expensive\b", clause, re.I):
                    out.references.append(item_id)
            else:
                out.references.append(item_id)  # "the second one, in red": a pointer to build on
            pieces.append(text[last : m.start()])
            last = m.end()
        pieces.append(text[last:])
        return " ".join(pieces)

    # brands -----------------------------------------------------------------------------------------------------
    def _brands(self, text: str, message: str, state: ChatState, out: Parsed) -> str:
        low = text.lower()
        spans: list[tuple[int, int, str]] = []
        for pattern, brand in self.vocab.brand_patterns:
            for m in pattern.finditer(low):
                spans.append((m.start(), m.end(), brand))
        covered = [(s, e) for s, e, _ in spans]
        for m in re.finditer(r"[a-z][a-z'\-]{4,}", low):  # typos of single-word brands
            if any(s <= m.start() < e for s, e in covered) or _singular(m.group(0)) in self.vocab.categories:
                continue
            close = difflib.get_close_matches(m.group(0), self.vocab._single_word_brands, n=1, cutoff=0.8)
            if close and m.group(0) not in self.vocab.words:
                spans.append((m.start(), m.end(), self.vocab.brands[close[0]]))
        for start, _end, brand in sorted(spans):
            if _NEG_RE.search(low[max(0, start - 30) : start]):
                if brand not in out.excluded_brands:
                    out.excluded_brands.append(brand)
            elif brand not in out.brands:
                out.brands.append(brand)
        that = re.search(r"\b(?:that|this|the same|those|these)\s+brands?\b|\bbrand of\b", low)
        if that and state.shown and _NEG_RE.search(low[: that.start()]):
            refs = self._ordinal_items(message, state) or [state.shown[0]]
            for s in refs:
                if s.brand and s.brand not in out.excluded_brands:
                    out.excluded_brands.append(s.brand)
            out.references = [r for r in out.references if r not in {s.item_id for s in refs}]
            low = low[: that.start()] + " " + low[that.end() :]
        for start, end, _ in sorted(spans, reverse=True):
            low = low[:start] + " " + low[end:]
        return low

    # attributes -------------------------------------------------------------------------------------------------
    def _attributes(self, text: str, out: Parsed) -> str:
        for value, (key, written) in self.vocab.attributes.items():
            if value in self.vocab.categories:
                continue
            rx = rf"(?<![\w]){re.escape(value)}(?![\w])"
            if re.search(rx, text):
                out.attributes[key] = written
                text = re.sub(rx, " ", text)
        return text

    # categories -------------------------------------------------------------------------------------------------
    def _category(self, text: str, out: Parsed) -> str:
        words = re.findall(r"[\w'&\-]+", text.lower())
        best: tuple[int, int, str, tuple[int, int]] | None = None  # (n words, depth, path, span)
        for n in (4, 3, 2, 1):
            for i in range(len(words) - n + 1):
                gram = words[i : i + n]
                if n == 1 and (gram[0] in _STOP or len(gram[0]) < 3):
                    continue
                phrase = _sing_phrase(" ".join(gram))
                path = self.vocab.categories.get(phrase)
                if path is None and len(phrase) >= 5:
                    close = difflib.get_close_matches(phrase, self.vocab._category_keys, n=1, cutoff=0.86)
                    path = self.vocab.categories[close[0]] if close else None
                if path is None:
                    continue
                key = (n, path.count(" > "))
                if best is None or key > best[:2]:
                    best = (n, path.count(" > "), path, (i, i + n))
        if best is None:
            return text
        out.category = best[2]
        i, j = best[3]
        return " ".join(words[:i] + words[j:])


# --- applying a parse to the state ---------------------------------------------------------------------------


def apply(state: ChatState, parsed: Parsed) -> ChatState:
    """The state after one parsed message. Injected / off-topic messages leave it as it was (turn count aside)."""
    if parsed.injection or parsed.off_topic:
        return state.model_copy(update={"turns": state.turns + 1})
    base = ChatState(cart=state.cart) if parsed.reset else state
    update: dict[str, object] = {"turns": state.turns + 1}
    # a category the state did not have: a (new) kind of product, so the old wish, brands and attributes go
    new_topic = parsed.category is not None and parsed.category != base.category and bool(base.wanted or base.category)
    if parsed.category is not None:
        update["category"] = parsed.category
    if new_topic:  # a different kind of product: the old wish, brands and attributes no longer apply
        update.update(wanted=parsed.wanted, brands=(), attributes={}, reference_items=())
    elif parsed.wanted:
        seen = set(base.wanted.lower().split())
        extra = [w for w in parsed.wanted.split() if w.lower() not in seen]
        update["wanted"] = " ".join([base.wanted, *extra]).strip()
    lo = parsed.min_price if parsed.min_price is not None else base.min_price
    hi = parsed.max_price if parsed.max_price is not None else base.max_price
    if parsed.max_price is not None and parsed.min_price is None and lo is not None and lo > hi:  # type: ignore[operator]
        lo = None  # "under 20" after "over 50": the newer bound wins
    if parsed.min_price is not None and parsed.max_price is None and hi is not None and lo > hi:  # type: ignore[operator]
        hi = None
    update["min_price"], update["max_price"] = lo, hi
    excluded = tuple(dict.fromkeys([*base.excluded_brands, *parsed.excluded_brands]))
    wanted_brands = [b for b in (*(() if new_topic else base.brands), *parsed.brands) if b not in excluded]
    update["excluded_brands"] = tuple(b for b in excluded if b not in parsed.brands)  # asking again lifts a ban
    update["brands"] = tuple(dict.fromkeys(wanted_brands))
    if parsed.attributes:
        update["attributes"] = {**({} if new_topic else base.attributes), **parsed.attributes}
    if parsed.references:
        update["reference_items"] = tuple(parsed.references)
    if parsed.rejected:
        update["rejected"] = tuple(dict.fromkeys([*base.rejected, *parsed.rejected]))
    if parsed.cart:
        update["cart"] = tuple(dict.fromkeys([*base.cart, *parsed.cart]))
    return ChatState.model_validate({**base.model_dump(), **update})
