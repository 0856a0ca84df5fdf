"""Lexical retrieval: BM25 (via bm25s) over each item's text, for exact words, brands and model numbers.

Text is lowercased, split into word tokens of 2+ characters, stripped of English stopwords and lightly stemmed
(plural endings only, a variant of Harman's "S" stemmer: no PyStemmer needed). What it does not do: no synonyms, no typo
tolerance, no phrase matching; those are the dense retriever's job.
bm25s is imported lazily, so importing this module stays cheap.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.base import ScoringRetriever
from retrieval.catalog import Catalog
from retrieval.dense import atomic_directory, catalog_fingerprint, read_json, write_json
from retrieval.types import RetrievalRequest

LEXICAL_FORMAT_VERSION = 1
# Bump when tokenisation changes: an index built with other tokens would silently match less.
TOKENIZER_VERSION = "v1-lower-w2-stopen-plural"
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


class BM25Retriever(ScoringRetriever):
    """BM25 over `item.text()`. Rows that match no query term are -inf (not retrieved).

    Query mode -> the query; user mode -> the titles of the last `history_titles` history items; cart mode ->
    the cart's titles. No text to match (or no term in the vocabulary) -> None.
    """

    name = "bm25"

    def __init__(self, catalog: Catalog, bm25: Any, *, history_titles: int = 3) -> None:
        super().__init__(catalog)
        n_docs = int(bm25.scores["num_docs"])
        if n_docs != len(catalog):
            raise ValueError(f"BM25 index has {n_docs} documents, the catalog {len(catalog)} items")
        self.bm25 = bm25
        self.history_titles = history_titles
        self._stopwords = _stopwords()

    @classmethod
    def build(
        cls, catalog: Catalog, *, k1: float = 1.5, b: float = 0.75, progress: bool = False, **options: Any
    ) -> BM25Retriever:
        import bm25s

        if len(catalog) == 0:
            raise ValueError("cannot build a BM25 index for an empty catalog")
        stop = _stopwords()
        corpus = [tokenize(text, stop) for text in catalog.texts()]
        bm25 = bm25s.BM25(k1=k1, b=b)
        bm25.index(corpus, show_progress=progress)
        return cls(catalog, bm25, **options)

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
        token_ids = self.bm25.get_tokens_ids(tokenize(text, self._stopwords))
        if not token_ids:
            return None
        scores = np.asarray(self.bm25.get_scores_from_ids(token_ids), dtype=np.float32)
        scores[scores <= 0] = -np.inf
        return scores

    # ---- persistence

    def save(self, directory: str | Path) -> None:
        """Save atomically to `directory` (the bm25s index plus a manifest tying it to this catalog)."""
        with atomic_directory(directory) as tmp:
            self.bm25.save(str(tmp / BM25_SUBDIR), show_progress=False)
            write_json(
                tmp / LEXICAL_FILE,
                {
                    "format_version": LEXICAL_FORMAT_VERSION,
                    "tokenizer": TOKENIZER_VERSION,
                    "n_items": len(self.catalog),
                    "catalog_sha256": catalog_fingerprint(self.catalog),
                    "options": {"history_titles": self.history_titles},
                },
            )

    @classmethod
    def load(cls, directory: str | Path, catalog: Catalog) -> BM25Retriever:
        """Load a retriever saved by `save`; refuses an index built for another catalog or tokenizer."""
        import bm25s

        directory = Path(directory)
        meta = read_json(directory / LEXICAL_FILE, "BM25 index")
        if meta.get("format_version") != LEXICAL_FORMAT_VERSION or meta.get("tokenizer") != TOKENIZER_VERSION:
            raise ValueError(
                f"BM25 index at {directory} was written by another version (format "
                f"{meta.get('format_version')}, tokenizer {meta.get('tokenizer')!r}; this code uses "
                f"{LEXICAL_FORMAT_VERSION}, {TOKENIZER_VERSION!r}); rebuild it with `shoprec index`"
            )
        if meta.get("catalog_sha256") != catalog_fingerprint(catalog):
            raise ValueError(
                f"BM25 index at {directory} was built for a different catalog ({meta.get('n_items')} items, "
                f"this one has {len(catalog)} or lists other ids); rebuild it with `shoprec index`"
            )
        bm25 = bm25s.BM25.load(str(directory / BM25_SUBDIR), show_progress=False)
        return cls(catalog, bm25, **dict(meta.get("options", {})))
