"""Dense (embedding) retrieval: a FAISS inner-product index over item vectors, and the retriever built on it.

`VectorIndex` wraps one FAISS index: exact flat search for small catalogs, IVF (inverted lists, exact scores
inside the probed lists) for large ones; `eval/bench/faiss_scale.py` measures why IVF is the large-catalog default.
Indexes are saved atomically with a manifest (model, dimension, kind, parameters, checksum), so a query is never
embedded with one model and matched against vectors of another.

`DenseRetriever` embeds item texts once; at request time it embeds the query, or builds a user profile from the
history, or averages the cart, and scores catalog rows by cosine similarity. Items with no interactions are
retrievable by content alone, which is what makes it the cold-start signal.

faiss is imported lazily (inside functions), so importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.base import ScoringRetriever
from retrieval.catalog import Catalog
from retrieval.embed import TextEncoder
from retrieval.persist import (  # the swap helpers lived here: still importable from this module
    atomic_directory,
    catalog_ids_fingerprint,
    recover_directory,  # noqa: F401
    remove_orphan_temps,  # noqa: F401
)
from retrieval.types import RetrievalRequest

INDEX_FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
VECTORS_FILE = "vectors.npy"
DENSE_FILE = "dense.json"
KINDS = ("flat", "ivf", "hnsw")

# Below this many vectors exact search is fast enough (~2.5 ms per query at 50k x 384 on one core; it scales
# linearly: ~50 ms at 1M) and scores every row exactly; above it an approximate index pays off.
DEFAULT_FLAT_THRESHOLD = 50_000
# IVF search width: lists probed per query as a share of all lists. On the 1M clustered benchmark
# (eval/results/faiss_scale.json, nlist 4000) 8 lists already reach recall@100 0.95 at 0.25 ms; the default,
# 1/128 of the lists (31), reaches 0.996 at ~0.7 ms: a margin for real data and for the top-1000 the dense
# retriever asks for. Small indexes probe at least 16 lists, because their lists mix several true clusters.
DEFAULT_NPROBE_SHARE = 1 / 128
DEFAULT_MIN_NPROBE = 16
# HNSW (kind="hnsw", never chosen by "auto"): with efConstruction 40 it stayed below recall@100 0.95 at 1M
# on the benchmark even at efSearch 384, and builds ~1.7x slower than IVF. efSearch is raised to k when searching.
DEFAULT_HNSW_M = 32
DEFAULT_EF_CONSTRUCTION = 40
DEFAULT_EF_SEARCH = 128


# --------------------------------------------------------------------------------------------- persistence


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"no {what} at {path.parent} (missing {path.name}); build it with `shoprec index`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rebuild the index with `shoprec index`") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object; rebuild the index with `shoprec index`")
    return data


# --------------------------------------------------------------------------------------------- the index


def _as_matrix(vectors: np.ndarray, what: str) -> np.ndarray:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-d (n, dim) array, got shape {x.shape}")
    return x


def default_nlist(n: int) -> int:
    """IVF list count: ~4*sqrt(n) (FAISS's rule of thumb), capped so each list gets >= 39 training points."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def default_nprobe(nlist: int) -> int:
    return min(nlist, max(DEFAULT_MIN_NPROBE, round(nlist * DEFAULT_NPROBE_SHARE)))


class VectorIndex:
    """A FAISS inner-product index (vectors are expected L2-normalised, so scores are cosines).

    Kinds: "flat" (exact), "ivf" (IndexIVFFlat: k-means lists, exact scores within the `nprobe` probed lists),
    "hnsw" (IndexHNSWFlat graph). `params` holds what was used to build and search, and is saved in the manifest.
    """

    def __init__(self, index: Any, kind: str, params: dict[str, Any]) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; valid kinds: {', '.join(KINDS)}")
        self.index = index
        self.kind = kind
        self.params = dict(params)
        self._apply_search_params()

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def __repr__(self) -> str:
        return f"VectorIndex(kind={self.kind!r}, n={len(self)}, dim={self.dim}, params={self.params})"

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def exact(self) -> bool:
        return self.kind == "flat"

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        kind: str = "auto",
        *,
        flat_threshold: int = DEFAULT_FLAT_THRESHOLD,
        nlist: int | None = None,
        nprobe: int | None = None,
        train_size: int | None = None,
        hnsw_m: int = DEFAULT_HNSW_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef_search: int = DEFAULT_EF_SEARCH,
        seed: int = 0,
        progress: bool = False,
        chunk_size: int = 50_000,
    ) -> VectorIndex:
        """Build an index over `vectors` (n, dim).

        kind="auto" picks "flat" when n < flat_threshold, else "ivf". IVF trains k-means on at most
        `train_size` (default 40 * nlist, FAISS's recommended minimum) randomly chosen vectors.
        """
        import faiss
        from tqdm.auto import tqdm

        x = _as_matrix(vectors, "vectors")
        n, dim = x.shape
        if n == 0:
            raise ValueError("cannot build an index over 0 vectors")
        if kind == "auto":
            kind = "flat" if n < flat_threshold else "ivf"
        params: dict[str, Any]
        if kind == "flat":
            index: Any = faiss.IndexFlatIP(dim)
            params = {}
        elif kind == "ivf":
            nlist = nlist or default_nlist(n)
            if not 1 <= nlist <= n:
                raise ValueError(f"nlist must be between 1 and the number of vectors ({n}), got {nlist}")
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            train_size = min(n, train_size or 40 * nlist)
            rng = np.random.default_rng(seed)
            sample = x if train_size >= n else x[np.sort(rng.choice(n, train_size, replace=False))]
            index.train(sample)
            params = {"nlist": nlist, "nprobe": nprobe or default_nprobe(nlist), "train_size": train_size}
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            params = {"M": hnsw_m, "efConstruction": ef_construction, "efSearch": ef_search}
        else:
            raise ValueError(f"unknown index kind {kind!r}; valid kinds: auto, {', '.join(KINDS)}")
        with tqdm(total=n, desc=f"indexing ({kind})", unit="vec", disable=not progress) as bar:
            for start in range(0, n, chunk_size):
                index.add(x[start : start + chunk_size])
                bar.update(min(chunk_size, n - start))
        return cls(index, kind, params)

    def _apply_search_params(self) -> None:
        if self.kind == "ivf":
            self.index.nprobe = int(self.params["nprobe"])
        elif self.kind == "hnsw":
            self.index.hnsw.efSearch = int(self.params["efSearch"])

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Trade recall for speed at search time (IVF: nprobe; HNSW: efSearch)."""
        if nprobe is not None:
            if self.kind != "ivf":
                raise ValueError(f"nprobe applies to ivf indexes, this one is {self.kind!r}")
            self.params["nprobe"] = int(nprobe)
        if ef_search is not None:
            if self.kind != "hnsw":
                raise ValueError(f"ef_search applies to hnsw indexes, this one is {self.kind!r}")
            self.params["efSearch"] = int(ef_search)
        self._apply_search_params()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product for each query row: (scores, rows), both (nq, k); missing hits are row -1."""
        q = _as_matrix(queries, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index has {self.dim}")
        k = max(1, min(int(k), len(self)))
        if self.kind == "hnsw" and int(self.params["efSearch"]) < k:
            import faiss

            # The graph search keeps efSearch candidates; fewer than k would cap what comes back. Per-call
            # parameters, not a changed attribute, so concurrent searches do not interfere.
            params = faiss.SearchParametersHNSW(efSearch=k)  # type: ignore[attr-defined]  # (SWIG, untyped)
            scores, rows = self.index.search(q, k, params=params)
        else:
            scores, rows = self.index.search(q, k)
        return scores, rows

    # ---- persistence

    def write_into(self, directory: Path, model_name: str) -> dict[str, Any]:
        """Write the index file and its manifest into an existing (temporary) directory; returns the manifest.

        Use `save` unless you are composing a larger atomic directory (as `DenseRetriever.save` does).
        """
        import faiss

        index_path = directory / INDEX_FILE
        faiss.write_index(self.index, str(index_path))
        manifest = {
            "format_version": INDEX_FORMAT_VERSION,
            "model_name": model_name,
            "dim": self.dim,
            "kind": self.kind,
            "params": self.params,
            "n_vectors": len(self),
            "index_file": INDEX_FILE,
            "index_sha256": file_sha256(index_path),
            "faiss_version": faiss.__version__,
        }
        _write_manifest(directory / MANIFEST_FILE, manifest)
        return manifest

    def save(self, directory: str | Path, model_name: str) -> None:
        """Save atomically to `directory` (replacing any previous index there only once fully written)."""
        with atomic_directory(directory) as tmp:
            self.write_into(tmp, model_name)

    @classmethod
    def load(cls, directory: str | Path, expected_model: str, expected_dim: int) -> VectorIndex:
        """Load an index saved by `save`, refusing one built for another model or dimension, or corrupted."""
        import faiss

        directory = Path(directory)
        manifest = read_json(directory / MANIFEST_FILE, "vector index")
        version = manifest.get("format_version")
        if version != INDEX_FORMAT_VERSION:
            raise ValueError(
                f"index at {directory} has format version {version}, this code reads {INDEX_FORMAT_VERSION}; "
                f"rebuild it with `shoprec index`"
            )
        if manifest.get("model_name") != expected_model:
            raise ValueError(
                f"index at {directory} was built with embedding model {manifest.get('model_name')!r}, but the "
                f"encoder in use is {expected_model!r}; rebuild the index with `shoprec index` (or load the "
                f"model it was built with)"
            )
        if manifest.get("dim") != expected_dim:
            raise ValueError(
                f"index at {directory} holds {manifest.get('dim')}-d vectors, but the encoder produces "
                f"{expected_dim}-d vectors; rebuild the index with `shoprec index`"
            )
        index_path = directory / str(manifest.get("index_file", INDEX_FILE))
        if not index_path.is_file():
            raise ValueError(f"index file {index_path} is missing; rebuild the index with `shoprec index`")
        digest = file_sha256(index_path)
        if digest != manifest.get("index_sha256"):
            raise ValueError(
                f"checksum mismatch for {index_path} (sha256 {digest}, manifest says "
                f"{manifest.get('index_sha256')}): the file is corrupted or was changed; rebuild the index "
                f"with `shoprec index`"
            )
        index = faiss.read_index(str(index_path))
        if int(index.ntotal) != manifest.get("n_vectors") or int(index.d) != expected_dim:
            raise ValueError(
                f"index at {directory} does not match its manifest (n={index.ntotal}, d={index.d}); "
                f"rebuild it with `shoprec index`"
            )
        return cls(index, str(manifest["kind"]), dict(manifest.get("params", {})))


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    # A separate function so tests can simulate a crash between writing the index and its manifest.
    write_json(path, manifest)


# --------------------------------------------------------------------------------------------- the retriever


def _unit(v: np.ndarray) -> np.ndarray | None:
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0.0:
        return None
    return (v / norm).astype(np.float32)


class DenseRetriever(ScoringRetriever):
    """Scores catalog rows by cosine similarity between item embeddings and a request vector.

    The request vector: query mode -> the query's embedding, blended with `profile_weight` of the user profile
    when there is a history (personalised search); user mode -> the user profile, a recency-weighted mean of the
    history's item vectors (weight halves every `half_life` items back); cart mode -> the mean of the cart's
    vectors. With an exact (flat) index every row gets a score; with an approximate one only the top
    `approx_candidates` rows do (the rest are -inf), so very selective filters can leave fewer than k results.
    """

    name = "dense"

    def __init__(
        self,
        catalog: Catalog,
        encoder: TextEncoder,
        vectors: np.ndarray,
        index: VectorIndex,
        *,
        profile_weight: float = 0.2,
        half_life: float = 5.0,
        max_history: int = 50,
        approx_candidates: int = 1000,
    ) -> None:
        super().__init__(catalog)
        vectors = _as_matrix(vectors, "vectors")
        if vectors.shape != (len(catalog), encoder.dim):
            raise ValueError(
                f"vectors have shape {vectors.shape}, expected ({len(catalog)}, {encoder.dim}) "
                f"(one {encoder.dim}-d row per catalog item); rebuild with `shoprec index`"
            )
        if len(index) != len(catalog) or index.dim != encoder.dim:
            raise ValueError(
                f"index has {len(index)} vectors of dimension {index.dim}, expected {len(catalog)} of "
                f"dimension {encoder.dim}; rebuild with `shoprec index`"
            )
        if not 0.0 <= profile_weight <= 1.0:
            raise ValueError(f"profile_weight must be in [0, 1], got {profile_weight}")
        if half_life <= 0:
            raise ValueError(f"half_life must be positive, got {half_life}")
        self.encoder = encoder
        self.vectors = vectors
        self.index = index
        self.profile_weight = profile_weight
        self.half_life = half_life
        self.max_history = max_history
        self.approx_candidates = approx_candidates
        # Rows whose vector is not (or no longer) the one in the FAISS index: items added or edited live
        # (`update_rows`). They are scored exactly beside the index's search: the small "delta index".
        self.live_rows = np.empty(0, dtype=np.int64)

    @classmethod
    def build(
        cls,
        catalog: Catalog,
        encoder: TextEncoder,
        *,
        kind: str = "auto",
        flat_threshold: int = DEFAULT_FLAT_THRESHOLD,
        batch_size: int = 64,
        progress: bool = True,
        **options: Any,
    ) -> DenseRetriever:
        """Embed every item's text and index the vectors. `options` go to the retriever (profile_weight, ...)."""
        if len(catalog) == 0:
            raise ValueError("cannot build a dense index for an empty catalog")
        vectors = encoder.encode(catalog.texts(), batch_size=batch_size, progress=progress)
        index = VectorIndex.build(vectors, kind=kind, flat_threshold=flat_threshold, progress=progress)
        return cls(catalog, encoder, vectors, index, **options)

    # ---- request vectors

    def embed_query(self, query: str) -> np.ndarray:
        return self.encoder.encode([query])[0]

    def user_profile(self, history: Sequence[str]) -> np.ndarray | None:
        """Recency-weighted mean of the history's vectors (most recent weighs most), unit length; None if empty."""
        rows = self.catalog.rows(list(history)[-self.max_history :])
        if not rows:
            return None
        age = np.arange(len(rows) - 1, -1, -1, dtype=np.float32)  # 0 for the most recent
        weights = 0.5 ** (age / self.half_life)
        return _unit(weights @ self.vectors[rows])

    def cart_vector(self, cart: Sequence[str]) -> np.ndarray | None:
        rows = self.catalog.rows(list(cart))
        if not rows:
            return None
        return _unit(self.vectors[rows].mean(axis=0))

    def request_vector(self, request: RetrievalRequest) -> np.ndarray | None:
        mode = request.mode
        if mode == "cart":
            return self.cart_vector(request.cart)
        if mode == "query":
            assert request.query is not None
            q = self.embed_query(request.query)
            profile = self.user_profile(request.history) if self.profile_weight > 0 else None
            if profile is None:
                return q
            return _unit((1.0 - self.profile_weight) * q + self.profile_weight * profile)
        return self.user_profile(request.history)

    # ---- scoring

    def score(self, request: RetrievalRequest) -> np.ndarray | None:
        q = self.request_vector(request)
        if q is None:
            return None
        vectors = self.vectors  # one reference: a live update swaps in a new array, never edits this one
        if self.index.exact:
            return vectors @ q  # every row, live ones included
        scores, rows = self.index.search(q[None, :], self.approx_candidates)
        out = np.full(len(vectors), -np.inf, dtype=np.float32)
        hit = rows[0] >= 0
        out[rows[0][hit]] = scores[0][hit]
        live = self.live_rows
        if len(live):  # merge the delta: exact scores for rows the FAISS index does not hold as they are now
            out[live] = vectors[live] @ q
        return out

    # ---- live updates (retrieval/live.py)

    def update_rows(self, catalog: Catalog, rows: Sequence[int] = (), *, vectors: np.ndarray | None = None) -> None:
        """Serve `catalog`, which extends the indexed one (same first rows, more appended), where `rows` (new or
        edited items) get fresh vectors: `vectors` aligned with `rows`, or embedded here with the encoder.

        The FAISS index is not rebuilt: those rows are searched exactly beside it and merged (`score`). Arrays are
        replaced, never edited in place, so a request that read the old ones finishes with a consistent view."""
        n_old = len(self.catalog)
        if len(catalog) < n_old or catalog.ids[:n_old] != self.catalog.ids[:n_old]:
            raise ValueError("update_rows needs a catalog that extends this one (same ids in the same first rows)")
        at = np.asarray(list(rows), dtype=np.int64)
        if len(catalog) > n_old and not np.isin(np.arange(n_old, len(catalog)), at).all():
            raise ValueError("every row added to the catalog needs a vector: list it in `rows`")
        if vectors is None:
            vectors = self.encoder.encode([catalog.items[int(r)].text() for r in at])
        fresh = _as_matrix(vectors, "vectors")
        if fresh.shape != (len(at), self.encoder.dim):
            raise ValueError(f"vectors have shape {fresh.shape}, expected ({len(at)}, {self.encoder.dim})")
        grown = np.zeros((len(catalog), self.vectors.shape[1]), dtype=np.float32)
        grown[:n_old] = self.vectors
        grown[at] = fresh
        self.vectors = grown
        if not self.index.exact:
            self.live_rows = np.union1d(self.live_rows, at)
        self.catalog = catalog

    # ---- persistence

    def save(self, directory: str | Path) -> None:
        """Save vectors, index and manifests atomically to `directory`."""
        with atomic_directory(directory) as tmp:
            np.save(tmp / VECTORS_FILE, self.vectors, allow_pickle=False)
            self.index.write_into(tmp, self.encoder.name)
            write_json(
                tmp / DENSE_FILE,
                {
                    "format_version": INDEX_FORMAT_VERSION,
                    "n_items": len(self.catalog),
                    "catalog_sha256": catalog_ids_fingerprint(self.catalog),
                    "vectors_sha256": file_sha256(tmp / VECTORS_FILE),
                    "options": {
                        "profile_weight": self.profile_weight,
                        "half_life": self.half_life,
                        "max_history": self.max_history,
                        "approx_candidates": self.approx_candidates,
                    },
                },
            )

    @classmethod
    def load(cls, directory: str | Path, catalog: Catalog, encoder: TextEncoder) -> DenseRetriever:
        """Load a retriever saved by `save`; refuses a different model, dimension or catalog, or corrupt files."""
        directory = Path(directory)
        meta = read_json(directory / DENSE_FILE, "dense index")
        index = VectorIndex.load(directory, expected_model=encoder.name, expected_dim=encoder.dim)
        if meta.get("catalog_sha256") != catalog_ids_fingerprint(catalog):
            raise ValueError(
                f"dense index at {directory} was built for a different catalog ({meta.get('n_items')} items, "
                f"this one has {len(catalog)} or lists other ids); rebuild it with `shoprec index`"
            )
        vectors_path = directory / VECTORS_FILE
        if not vectors_path.is_file() or file_sha256(vectors_path) != meta.get("vectors_sha256"):
            raise ValueError(f"{vectors_path} is missing or fails its checksum; rebuild the index with `shoprec index`")
        vectors = np.load(vectors_path, allow_pickle=False)
        return cls(catalog, encoder, vectors, index, **dict(meta.get("options", {})))
