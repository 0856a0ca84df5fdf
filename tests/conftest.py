"""Shared fixtures: a small synthetic shop (the project's own data, so tests run anywhere) and the real encoder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A bug inside the generator fails the test instead of becoming a silent retrieval fallback (model failures still
# fall back): generator.recommender.RAISE_ENV
os.environ.setdefault("SHOPREC_RAISE_MODEL_ERRORS", "1")

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


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL server started for this test session (tests/pg.py); skips when no server binaries exist."""
    from tests.pg import find_bin_dir, running_server

    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries not found (Debian's postgresql package: `make sysdeps`)")
    with running_server(bin_dir) as server:
        yield server


@pytest.fixture(scope="session")
def api_shop_home(tmp_path_factory) -> Path:
    """A tiny shop's home (SQLite store + built index, tests/api_server.py) built once; copy it before writing."""
    from tests.api_server import build_home, tiny_shop

    home = tmp_path_factory.mktemp("api-template") / "home"
    build_home(home, tiny_shop())
    return home
