"""The seekable batch stream and the client's on-disk state store."""

import os
import threading
import time

import pytest
import torch
from torch.utils.data import DataLoader

from fedgrow_core.clients.state_store import ClientStateStore
from fedgrow_core.data.batch_stream import BatchStream

ROWS, BATCH, SEED = 10, 4, 7  # 3 batches per epoch, the last one of 2 rows


def _stream():
    return BatchStream(ROWS, BATCH, SEED, lambda sampler: DataLoader(list(range(ROWS)), BATCH, sampler=sampler))


def _draw(stream, n):
    return [next(stream).tolist() for _ in range(n)]


def test_epochs_are_the_distributed_sampler_permutations():
    batches = _draw(_stream(), 9)
    for epoch in range(3):
        # independent computation: DistributedSampler(shuffle=True, seed) draws randperm with seed + epoch
        expected = torch.randperm(ROWS, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
        got = [i for batch in batches[3 * epoch : 3 * epoch + 3] for i in batch]
        assert got == expected
    assert [len(b) for b in batches[:3]] == [4, 4, 2]
    assert batches[:3] != batches[3:6]  # reshuffled each epoch


@pytest.mark.parametrize("step", [0, 2, 3, 5, 7])
def test_seek_continues_exactly_where_a_stream_drawn_from_zero_is(step):
    reference = _draw(_stream(), step + 5)
    stream = _stream()
    stream.seek(step)
    assert stream.position == step
    assert _draw(stream, 5) == reference[step:]
    assert stream.position == step + 5


@pytest.mark.parametrize("step", [2, 3, 5, 6])  # inside an epoch, and at the end of the first and second
def test_a_stream_that_seeks_draws_from_torchs_stream_where_one_that_iterated_does(step):
    """Each epoch's ``DataLoader`` iterator takes its base seed from torch's global stream when it starts."""
    iterated = _stream()
    _draw(iterated, step)  # the held client: got to ``step`` by iterating
    sought = _stream()
    sought.seek(step)  # the client built again: seeks to ``step`` (before the round's seed is set)
    after = []
    for stream in (iterated, sought):
        torch.manual_seed(0)  # the round's seed
        batches = _draw(stream, 4)
        after.append((batches, torch.rand(3).tolist()))  # what the round draws next (e.g. dropout masks)
    assert after[0] == after[1]


def test_bad_positions_and_sizes_are_refused():
    with pytest.raises(ValueError, match="step = -1"):
        _stream().seek(-1)
    with pytest.raises(ValueError, match="num_rows >= 1"):
        BatchStream(0, BATCH, SEED, lambda s: None)


def test_client_state_store_keeps_the_newest_rounds_atomically(tmp_path):
    store = ClientStateStore(tmp_path / "state")
    assert store.rounds() == [] and store.latest(at_most=5) is None
    for r in (1, 2, 3):
        store.save(r, {"local.width": torch.full((2, 2), float(r)), "data.steps": torch.tensor(3 * r)})
    assert store.rounds() == [2, 3]
    assert store.latest(at_most=2) == 2 and store.latest(at_most=1) is None
    state = store.load(3)
    assert torch.equal(state["local.width"], torch.full((2, 2), 3.0)) and int(state["data.steps"]) == 9
    assert not list((tmp_path / "state").glob(".*"))  # no temporary file left
    with pytest.raises(FileNotFoundError, match="round 1"):
        store.load(1)
    with pytest.raises(ValueError, match="keep = 1"):
        ClientStateStore(tmp_path, keep=1)


def test_a_save_in_two_steps_renames_only_on_commit_and_leaves_nothing_on_abort(tmp_path, monkeypatch):
    """``begin_save`` writes the file and syncs it in a thread; the round appears on ``commit``, never on ``abort``."""
    store = ClientStateStore(tmp_path, keep=2)
    store.save(1, {"w": torch.zeros(3)})
    store.save(2, {"w": torch.ones(3)})
    synced = threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd):
        assert threading.current_thread() is not threading.main_thread()  # the caller's thread goes on meanwhile
        time.sleep(0.2)
        real_fsync(fd)
        synced.set()

    monkeypatch.setattr(os, "fsync", slow_fsync)
    pending = store.begin_save(3, {"w": torch.full((3,), 3.0)})
    assert store.rounds() == [1, 2] and not synced.is_set()  # written, not yet synced nor renamed
    assert pending.commit() == store.file(3) and synced.is_set()
    assert store.rounds() == [2, 3] and torch.equal(store.load(3)["w"], torch.full((3,), 3.0))
    store.begin_save(4, {"w": torch.full((3,), 4.0)}).abort()
    assert store.rounds() == [2, 3] and not list(tmp_path.glob(".*"))  # as before the save: no temporary file


def test_a_commit_removes_temporary_files_a_killed_process_left_for_rounds_up_to_its_own(tmp_path):
    store = ClientStateStore(tmp_path)
    stale = [tmp_path / ".round-1.safetensors.111.222.tmp", tmp_path / ".round-2.safetensors.111.222.tmp"]
    newer = tmp_path / ".round-3.safetensors.333.444.tmp"  # a round after the one kept: not ours to judge
    for path in (*stale, newer):
        path.write_bytes(b"partial")
    store.save(2, {"w": torch.ones(3)})
    assert store.rounds() == [2] and not any(p.exists() for p in stale) and newer.exists()


def test_a_failed_fsync_renames_nothing_and_is_raised_in_the_caller(tmp_path, monkeypatch):
    store = ClientStateStore(tmp_path)
    store.save(1, {"w": torch.zeros(3)})

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    pending = store.begin_save(2, {"w": torch.ones(3)})
    with pytest.raises(OSError, match="Input/output error"):
        pending.commit()
    assert store.rounds() == [1] and not list(tmp_path.glob(".*"))


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here: a file's pages stay cached")
@pytest.mark.parametrize("cache_pages", [True, False])
def test_a_store_that_will_not_read_back_drops_each_file_from_the_page_cache_once_it_is_on_disk(
    tmp_path, monkeypatch, cache_pages
):
    """``cache_pages=False``: after the fsync, and before the rename, the file's pages are dropped (DONTNEED)."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(("fsync", os.fstat(fd).st_ino)) or real_fsync(fd))
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, *args: calls.append(("fadvise", os.fstat(fd).st_ino, *args)))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append(("replace", os.stat(a).st_ino)) or real_replace(a, b))
    store = ClientStateStore(tmp_path, cache_pages=cache_pages)
    state = {"optimizer.0.exp_avg": torch.arange(6.0).reshape(2, 3), "data.steps": torch.tensor(4)}
    path = store.save(1, state)
    inode = path.stat().st_ino
    dropped = [("fadvise", inode, 0, 0, os.POSIX_FADV_DONTNEED)] if not cache_pages else []
    assert calls == [("fsync", inode), *dropped, ("replace", inode)]
    loaded = store.load(1)  # whatever the cache holds, the file reads back whole
    assert all(torch.equal(loaded[k], v) for k, v in state.items()) and set(loaded) == set(state)
