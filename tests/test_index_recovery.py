"""Index folders survive killed processes: a swap interrupted between its renames is completed or undone at the
next load, and the temp folders of killed builds are removed at the next build (but not a live build's)."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from retrieval.index import read_manifest
from retrieval.persist import atomic_directory, recover_directory, remove_orphan_temps


def _index(folder: Path, version: str) -> Path:
    """A stand-in index folder whose manifest says which version it is."""
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"format_version": 1, "version": version}))
    return folder


def test_killed_after_moving_the_old_index_aside_restores_it(tmp_path: Path) -> None:
    # the state the two-rename swap left when killed between its renames: no index, the old one aside, and the
    # new one as a temp folder nobody can tell is complete
    _index(tmp_path / ".index.old-k2j4h1x9", "old")
    _index(tmp_path / ".index.a1b2c3d4.tmp", "new?")
    assert read_manifest(tmp_path / "index")["version"] == "old"
    assert not list(tmp_path.glob(".index.old-*"))


def test_a_complete_new_index_waiting_to_move_in_is_promoted(tmp_path: Path) -> None:
    _index(tmp_path / ".index.old-k2j4h1x9", "old")
    _index(tmp_path / ".index.new-p9q8r7s6", "new")  # renamed to .new-* only once fully written
    assert read_manifest(tmp_path / "index")["version"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_killed_before_moving_the_old_index_aside_finishes_the_swap(tmp_path: Path) -> None:
    _index(tmp_path / "index", "old")
    _index(tmp_path / ".index.new-p9q8r7s6", "new")
    assert recover_directory(tmp_path / "index") == "promoted"
    assert read_manifest(tmp_path / "index")["version"] == "new"
    assert not list(tmp_path.glob(".index.old-*")) and not list(tmp_path.glob(".index.new-*"))


def test_nothing_to_recover_writes_nothing(tmp_path: Path) -> None:
    _index(tmp_path / "index", "only")
    assert recover_directory(tmp_path / "index") is None
    assert [p.name for p in tmp_path.iterdir()] == ["index"]


_KILL_MID_SWAP = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from retrieval.persist import atomic_directory

    target = Path(sys.argv[1])
    real_rename = os.rename
    calls = []
    def rename(src, dst):
        calls.append(dst)
        if len(calls) == int(sys.argv[2]):  # killed right before this rename
            os.kill(os.getpid(), signal.SIGKILL)
        real_rename(src, dst)
    os.rename = rename
    with atomic_directory(target) as tmp:
        (tmp / "manifest.json").write_text('{"format_version": 1, "version": "new"}')
    """
)


@pytest.mark.parametrize("killed_before_rename", [1, 2, 3])
def test_a_build_killed_at_any_rename_leaves_a_loadable_index(tmp_path: Path, killed_before_rename: int) -> None:
    _index(tmp_path / "index", "old")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_MID_SWAP, str(tmp_path / "index"), str(killed_before_rename)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    version = read_manifest(tmp_path / "index")["version"]
    # before the finished temp folder was marked complete the old index stays; after, the new one wins
    assert version == ("old" if killed_before_rename == 1 else "new")
    with atomic_directory(tmp_path / "index") as tmp:  # the next build cleans what the killed one left
        (tmp / "manifest.json").write_text('{"format_version": 1, "version": "next"}')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_orphan_temp_folders_are_removed_but_a_build_in_progress_is_kept(tmp_path: Path) -> None:
    orphan = _index(tmp_path / ".index.deadbeef.tmp", "killed build")
    busy = _index(tmp_path / ".index.livebild.tmp", "another process's build")
    fd = os.open(busy, os.O_RDONLY)  # what a running build holds on its temp folder
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with atomic_directory(tmp_path / "index") as tmp:
            (tmp / "manifest.json").write_text('{"format_version": 1}')
        assert not orphan.exists()
        assert busy.exists()
    finally:
        os.close(fd)
    assert remove_orphan_temps(tmp_path / "index") == [busy]  # once its owner is gone, it goes too
    other = _index(tmp_path / ".index-other.deadbeef.tmp", "another target's")
    remove_orphan_temps(tmp_path / "index")
    assert other.exists()


def test_fusion_fit_holds_out_a_capped_seeded_sample_of_users(tmp_path: Path, small_shop) -> None:
    """Bounded index cost on big logs: the fusion weights are fitted on at most `max_fusion_cases` held-out users
    (a seeded sample), and only those users lose their last event for training."""
    from retrieval.catalog import Catalog
    from retrieval.events import histories
    from retrieval.index import build_index, holdout_last, load_index

    hist = histories(small_shop.interactions)
    train, held = holdout_last(hist, max_users=40, seed=0)
    assert len(held) == 40 and held == holdout_last(hist, max_users=40, seed=0)[1]
    assert sum(len(v) for v in train.values()) == sum(len(v) for v in hist.values()) - 40
    catalog = Catalog(small_shop.items)
    build_index(catalog, hist, tmp_path / "index", names=("popularity", "itemknn"), max_fusion_cases=40)
    assert read_manifest(tmp_path / "index")["fusion_fit"]["cases"] == 40
    # the catalog the index was built for travels with it
    assert load_index(tmp_path / "index", None).catalog.ids == catalog.ids


def test_compact_histories_train_the_same_signals(small_shop) -> None:
    """`read_histories` (one small slotted object per event, for 1M-event builds) gives every signal the same
    training data as `histories` over validated `Interaction`s."""
    import numpy as np

    from retrieval.catalog import Catalog
    from retrieval.events import histories
    from retrieval.index import fit_signals, read_histories

    full, compact = histories(small_shop.interactions), read_histories(iter(small_shop.interactions))
    assert list(full) == list(compact)
    for user in full:
        a, b = full[user], compact[user]
        assert [(e.item_id, e.type, e.value, e.timestamp, e.position) for e in a] == [
            (e.item_id, e.type, e.value, e.timestamp, e.position) for e in b
        ]
    catalog = Catalog(small_shop.items)
    one = fit_signals(catalog, full, ("popularity", "itemknn"))
    two = fit_signals(catalog, compact, ("popularity", "itemknn"))
    np.testing.assert_array_equal(one["popularity"].counts, two["popularity"].counts)
    assert (one["itemknn"].next != two["itemknn"].next).nnz == 0


def test_item_knn_pruning_in_blocks_keeps_the_same_neighbours(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pruning a block of rows at a time (bounded memory at 1M events) selects exactly what one sort selects."""
    import numpy as np
    import scipy.sparse as sp

    import retrieval.collaborative as collaborative

    rng = np.random.default_rng(0)
    for trial in range(10):
        n = int(rng.integers(5, 200))
        m = sp.random(n, n, density=float(rng.uniform(0.05, 0.9)), random_state=trial, format="csr")
        m.data = np.round(m.data * 5) / 5  # many ties: the column order must break them the same way
        top = int(rng.integers(1, 40))
        whole = collaborative._prune(m.copy(), top)
        monkeypatch.setattr(collaborative, "_PRUNE_BLOCK", int(rng.integers(1, 50)))
        blocks = collaborative._prune(m.copy(), top)
        monkeypatch.undo()
        assert whole.nnz == blocks.nnz and (whole != blocks).nnz == 0


def test_sasrec_loss_in_chunks_has_the_same_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training SASRec a chunk of positions at a time (bounded memory at 1M events) gives the loss and gradients
    of one full-softmax cross-entropy over the whole batch."""
    import torch
    import torch.nn.functional as F

    import retrieval.sequential as sequential

    torch.manual_seed(0)
    enc = torch.nn.Linear(8, 8)
    emb = torch.nn.Parameter(torch.randn(31, 8))
    x, target = torch.randn(50, 8), torch.randint(0, 30, (50,))

    F.cross_entropy(enc(x) @ emb[1:].T, target).backward()
    expected = (enc.weight.grad.clone(), emb.grad.clone())
    enc.zero_grad()
    emb.grad = None
    monkeypatch.setattr(sequential, "_LOSS_CHUNK", 7)
    loss = sequential._softmax_loss_backward(enc(x), emb, target)
    assert loss == pytest.approx(F.cross_entropy(enc(x) @ emb[1:].T, target).item(), rel=1e-5)
    torch.testing.assert_close(enc.weight.grad, expected[0])
    torch.testing.assert_close(emb.grad, expected[1])
