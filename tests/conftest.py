"""Shared fixtures: a small synthetic shop (the project's own data, so tests run anywhere) and the real encoder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def small_shop():
    """A small but structured demo shop: ~400 items in 6 categories, 120 users."""
    from retrieval.synthetic import SyntheticConfig, generate

    return generate(SyntheticConfig(seed=1, n_items=400, n_users=120, n_categories=6))


@pytest.fixture(scope="session")
def encoder():
    from retrieval.embed import Encoder

    return Encoder()


@pytest.fixture(scope="session")
def shop_dir(tmp_path_factory, small_shop) -> Path:
    """The small shop written in the generic format, as a user would hand it to `shoprec ingest`."""
    from retrieval.loaders import write_generic

    d = tmp_path_factory.mktemp("shop") / "data"
    write_generic(small_shop.items, small_shop.interactions, d)
    return d
