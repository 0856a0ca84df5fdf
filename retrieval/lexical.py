"""Lexical retrieval: BM25 (via bm25s) over each item's text, for exact words, brands and model numbers.

Text is lowercased, split into word tokens of 2+ characters, stripped of English stopwords and lightly stemmed
(plural endings only, a variant of Harman's "S" stemmer: no PyStemmer needed). What it does not do: no synonyms, no typo
tolerance, no phrase matching; those are the dense retriever's job.

An item is indexed under each field's DISTINCT words (title, category path, brand, description: `document_tokens`),
the title's counted `TITLE_WEIGHT` times (a field weight, as in BM25F), so its length is its number of distinct words
per field. Keyword stuffing gains nothing: a description repeating "wireless headphones" 300 times counts those
words once, as an honest one does, where BM25 over the whole text ranked such an item first for "wireless
headphones" in the demo shop. eval/bench/stuffing.py measures the attack and what the change does to search and
next-item quality (eval/results/stuffing.json; docs/reasons.md sums it up). Indexes built before (tokenizer
"v1-...") still load and score as they were built; `shoprec index` rebuilds them with the damping.
bm25s is imported lazily, so importing this module stays cheap.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.base import ScoringRetriever
from retrieval.catalog import Catalog
from retrieval.dense import read_json, write_json
from retrieval.persist import atomic_directory, catalog_ids_fingerprint
from retrieval.types import Item, RetrievalRequest

LEXICAL_FORMAT_VERSION = 1
# Bump when tokenisation changes: an index built with other tokens would silently match less.
TOKENIZER_VERSION = "v2-lower-w2-stopen-plural-distinct-per-field-title2"
WHOLE_TEXT_TOKENIZER = "v1-lower-w2-stopen-plural"  # before: every occurrence in the whole text (still loads)
TOKENIZERS = (TOKENIZER_VERSION, WHOLE_TEXT_TOKENIZER)
# Counting each field's words once loses the "this word is repeated, so the item is about it" signal that honest
# descriptions carry; weighting the title (where a product says what it is) twice gives it back where it is reliable:
# Office known-item search MRR .880 whole text, .851 distinct words alone, .889 with the title weighted 2.
TITLE_WEIGHT = 2
BM25_SUBDIR = "bm25"
LEXICAL_FILE = "lexical.json"

_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # bm25s's default pattern: words of two or more characters


def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


def s_stem(word: str) -> str:
    """Fold English plurals to the singular, in the spirit of Harman's (1991) "S" stemmer, and nothing else.

    batteries -> battery, glasses -> glass, boxes -> box, watches -> watch, shoes -> shoe; bus, glass kept.
    Query and documents go through the same function, so an odd stem (cookies -> cooky) still matches.
    """
    if len(word) <= 3:
        return word
    if word.endswith("ies") and not word.endswith(("eies", "aies")):
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "zes", "ches", "shes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def tokenize(text: str, stopwords: frozenset[str] | None = None) -> list[str]:
    """Lowercase word tokens of 2+ characters, stopwords removed, plurals folded."""
    stop = _stopwords() if stopwords is None else stopwords
    return [s_stem(t) for t in _TOKEN.findall(text.lower()) if t not in stop]


def document_tokens(item: Item, stopwords: frozenset[str] | None = None, version: str = TOKENIZER_VERSION) -> list[str]:
    """The tokens `item` is indexed under: each field's distinct tokens in order (title, category path, brand,
    description), the title's `TITLE_WEIGHT` times; with the older `WHOLE_TEXT_TOKENIZER` every token of
    `item.text()`."""
    stop = _stopwords() if stopwords is None else stopwords
    if version == WHOLE_TEXT_TOKENIZER:
        return tokenize(item.text(), stop)
    if version != TOKENIZER_VERSION:
        raise ValueError(f"unknown BM25 tokenizer {version!r}; known: {', '.join(TOKENIZERS)}")
    out = list(dict.fromkeys(tokenize(item.title, stop))) * TITLE_WEIGHT  # distinct, first occurrence first
    for text in (" ".join(item.category), item.brand, item.description):
        out.extend(dict.fromkeys(tokenize(text, stop)))
    return out


class BM25Retriever(ScoringRetriever):
    """BM25 over `item.text()`. Rows that match no query term are -inf (not retrieved).

    Query mode -> the query; user mode -> the titles of the last `history_titles` history items; cart mode ->
    the cart's titles. No text to match (or no term in the vocabulary) -> None.
    """

    name = "bm25"

    def __init__(
        self,
        catalog: Catalog,
        bm25: Any,
        *,
        history_titles: int = 3,
        avgdl: float | None = None,
        tokenizer: str = TOKENIZER_VERSION,
    ) -> None:
        super().__init__(catalog)
        n_docs = int(bm25.scores["num_docs"])
        if n_docs != len(catalog):
            raise ValueError(f"BM25 index has {n_docs} documents, the catalog {len(catalog)} items")
        self.bm25 = bm25
        self.history_titles = history_titles
        self.tokenizer = tokenizer  # how documents were tokenised (`document_tokens`); queries always by `tokenize`
        self._stopwords = _stopwords()
        self.n_indexed = n_docs
        # Average indexed document length in tokens: what live documents are length-normalised against
        # (`update_rows`); computed from the catalog on first need when an older index did not record it.
        self.avgdl = avgdl
        self._live_docs: dict[int, Counter[str]] = {}  # row -> token counts, for rows added or edited live
        self._live_postings: dict[str, dict[int, int]] = {}  # token -> {row: term frequency}

    @classmethod
    def build(
        cls,
        catalog: Catalog,
        *,
        k1: float = 1.5,
        b: float = 0.75,
        progress: bool = False,
        tokenizer: str = TOKENIZER_VERSION,
        **options: Any,
    ) -> BM25Retriever:
        import bm25s

        if len(catalog) == 0:
            raise ValueError("cannot build a BM25 index for an empty catalog")
        stop = _stopwords()
        corpus = [document_tokens(item, stop, tokenizer) for item in catalog.items]
        bm25 = bm25s.BM25(k1=k1, b=b)
        bm25.index(corpus, show_progress=progress)
        avgdl = float(np.mean([len(doc) for doc in corpus]))
        return cls(catalog, bm25, avgdl=avgdl, tokenizer=tokenizer, **options)

    def query_text(self, request: RetrievalRequest) -> str | None:
        """The text this request is matched with, or None when there is none."""
        mode = request.mode
        if mode == "query":
            return request.query
        ids: Sequence[str] = request.cart if mode == "cart" else request.history[-self.history_titles :]
        titles = [self.catalog[i].title for i in ids if i in self.catalog]
        return " ".join(titles) if titles else None

    def score(self, request: RetrievalRequest) -> np.ndarray | None:
        text = self.query_text(request)
        if not text:
            return None
        tokens = tokenize(text, self._stopwords)
        token_ids = self.bm25.get_tokens_ids(tokens)
        live = self._live_scores(tokens) if self._live_docs else {}
        if not token_ids and not live:
            return None
        scores = np.zeros(len(self.catalog), dtype=np.float32)
        if token_ids:
            scores[: self.n_indexed] = self.bm25.get_scores_from_ids(token_ids)
        if self._live_docs:  # merge the delta: live rows score by their current text only
            scores[list(self._live_docs)] = 0.0
            for row, s in live.items():
                scores[row] = s
        scores[scores <= 0] = -np.inf
        return scores

    # ---- live updates (retrieval/live.py)

    def update_rows(self, catalog: Catalog, rows: Sequence[int] = ()) -> None:
        """Serve `catalog`, which extends the indexed one (same first rows, more appended), where `rows` are new
        or edited items: their current text is kept in a small in-memory delta index and scored with the main
        index's document frequencies and average length, so their scores compare with the main index's."""
        n_old = len(self.catalog)
        if len(catalog) < n_old or catalog.ids[:n_old] != self.catalog.ids[:n_old]:
            raise ValueError("update_rows needs a catalog that extends this one (same ids in the same first rows)")
        if self.avgdl is None:  # an index saved before avgdl was recorded: measure the indexed texts once
            docs = [document_tokens(it, self._stopwords, self.tokenizer) for it in self.catalog.items[: self.n_indexed]]
            self.avgdl = float(np.mean([len(doc) for doc in docs]))
        for row in rows:
            for token in self._live_docs.pop(row, Counter()):
                self._live_postings[token].pop(row, None)
            counts = Counter(document_tokens(catalog.items[row], self._stopwords, self.tokenizer))
            self._live_docs[row] = counts
            for token, tf in counts.items():
                self._live_postings.setdefault(token, {})[row] = tf
        self.catalog = catalog

    def _live_scores(self, tokens: Sequence[str]) -> dict[int, float]:
        """BM25 (Lucene variant, bm25s's default) of the live rows for these query tokens.

        idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5)) with N and df from the main index; a token the main index
        never saw takes its df from the live rows. tf part: tf / (tf + k1 (1 - b + b dl / avgdl)).
        """
        n = self.n_indexed
        k1, b = float(self.bm25.k1), float(self.bm25.b)
        avgdl = self.avgdl or 1.0
        indptr = self.bm25.scores["indptr"]
        vocab = self.bm25.vocab_dict
        out: dict[int, float] = {}
        for token in tokens:  # a repeated query token counts again, as in bm25s
            postings = self._live_postings.get(token)
            if not postings:
                continue
            tid = vocab.get(token)
            df = int(indptr[tid + 1] - indptr[tid]) if tid is not None else len(postings)
            idf = math.log(1.0 + (n - df + 0.5) / (df + 0.5))
            for row, tf in postings.items():
                dl = sum(self._live_docs[row].values())
                out[row] = out.get(row, 0.0) + idf * tf / (tf + k1 * (1.0 - b + b * dl / avgdl))
        return out

    # ---- persistence

    def save(self, directory: str | Path) -> None:
        """Save atomically to `directory` (the bm25s index plus a manifest tying it to this catalog)."""
        with atomic_directory(directory) as tmp:
            self.bm25.save(str(tmp / BM25_SUBDIR), show_progress=False)
            write_json(
                tmp / LEXICAL_FILE,
                {
                    "format_version": LEXICAL_FORMAT_VERSION,
                    "tokenizer": self.tokenizer,
                    "n_items": len(self.catalog),
                    "catalog_sha256": catalog_ids_fingerprint(self.catalog),
                    "options": {"history_titles": self.history_titles},
                    "avgdl": self.avgdl,
                },
            )

    @classmethod
    def load(cls, directory: str | Path, catalog: Catalog) -> BM25Retriever:
        """Load a retriever saved by `save`; refuses an index built for another catalog or tokenizer."""
        import bm25s

        directory = Path(directory)
        meta = read_json(directory / LEXICAL_FILE, "BM25 index")
        if meta.get("format_version") != LEXICAL_FORMAT_VERSION or meta.get("tokenizer") not in TOKENIZERS:
            raise ValueError(
                f"BM25 index at {directory} was written by another version (format "
                f"{meta.get('format_version')}, tokenizer {meta.get('tokenizer')!r}; this code reads format "
                f"{LEXICAL_FORMAT_VERSION} with tokenizer {' or '.join(map(repr, TOKENIZERS))}); rebuild it with "
                "`shoprec index`"
            )
        if meta.get("catalog_sha256") != catalog_ids_fingerprint(catalog):
            raise ValueError(
                f"BM25 index at {directory} was built for a different catalog ({meta.get('n_items')} items, "
                f"this one has {len(catalog)} or lists other ids); rebuild it with `shoprec index`"
            )
        bm25 = bm25s.BM25.load(str(directory / BM25_SUBDIR), show_progress=False)
        options = dict(meta.get("options", {}))
        return cls(catalog, bm25, avgdl=meta.get("avgdl"), tokenizer=meta["tokenizer"], **options)
