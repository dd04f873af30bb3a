"""A client's private state on its own disk, one ``safetensors`` file per round, written atomically.

A ClientApp keeps its private state (Local-LiGO, head, optimiser moments, batch
position) between rounds. :class:`ClientStateStore` writes it after every round
to ``<folder>/round-<r>.safetensors`` (a temporary file, fsync, then
``os.replace``) and keeps the newest ``keep`` rounds: the ClientApp's
``Context.state`` names the newest file, and a resumed run (``resume-from``), a
restarted SuperNode or another process picks up the state of the last round
the server has checkpointed.
A file that cannot be read (truncated, damaged), or whose header does not carry
the metadata the caller requires (which run wrote it), is skipped for the one
before it (:meth:`ClientStateStore.load_latest`). Nothing in this folder is ever sent.

:meth:`ClientStateStore.begin_save` writes the file and leaves its fsync to a
thread, for a caller with work to do meanwhile that does not change the state
(the ClientApp evaluates the trained model); :meth:`PendingSave.commit` waits for
the fsync and renames, so a round's file is on disk before the round's reply
leaves either way.

A store that is told its files will seldom be read back (``cache_pages=False``:
a simulation worker, which usually still holds a node's client when the node is
next sampled) asks the kernel to drop each file's pages from the page cache once
they are on disk (``posix_fadvise(POSIX_FADV_DONTNEED)`` after the fsync); a
file read back later (another worker serves the node, or its client was let go)
comes from the disk. Fifty nodes' states would otherwise fill gigabytes of page
cache, and on a machine whose free memory was never touched (a fresh virtual
machine) each new page of it is slow to allocate (measured in
``docs/testing.md``, the scale benchmark's trace).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

_LOG = logging.getLogger(__name__)
_ROUND_FILE = re.compile(r"^round-(\d+)\.safetensors$")
_TEMP_FILE = re.compile(r"^\.round-(\d+)\.safetensors\..+\.tmp$")


class ClientStateStore:
    """Round-keyed private state of one client in ``folder``.

    Parameters
    ----------
    folder : str or Path
        Created on the first :meth:`save`.
    keep : int
        Newest rounds kept on disk (>= 2, so that the round before a server
        checkpoint survives a crash after the client's next save).
    cache_pages : bool
        Whether a written file's pages may stay in the page cache (default).
        ``False``: once a file is on disk its pages are dropped from the cache,
        for a caller that will seldom read it back (module doc); a later
        :meth:`load` reads it from disk. Where ``os.posix_fadvise`` is missing
        (macOS, Windows) the pages stay.

    Raises
    ------
    ValueError
        If ``keep`` < 2.
    """

    def __init__(self, folder: str | Path, keep: int = 2, cache_pages: bool = True) -> None:
        if keep < 2:
            raise ValueError(f"keep = {keep}: expected an integer >= 2")
        self.folder = Path(folder)
        self.keep = keep
        self.cache_pages = cache_pages

    def rounds(self) -> list[int]:
        """Rounds with a saved state, ascending."""
        if not self.folder.is_dir():
            return []
        found = (_ROUND_FILE.match(p.name) for p in self.folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def save(self, server_round: int, state: dict[str, Tensor], metadata: Mapping[str, str] | None = None) -> Path:
        """Write ``state`` as round ``server_round`` (temporary file, fsync, then rename); drop older rounds.

        ``metadata`` (strings) goes into the safetensors header, e.g. which run wrote the state.
        ``state`` is read before this returns and never kept (it may be the client's own tensors).

        Returns
        -------
        Path
            The round's file.
        """
        return self.begin_save(server_round, state, metadata).commit()

    def begin_save(
        self, server_round: int, state: dict[str, Tensor], metadata: Mapping[str, str] | None = None
    ) -> PendingSave:
        """:meth:`save` in two steps: write ``state`` to a temporary file now, and start its fsync in a thread.

        Nothing is renamed or dropped until :meth:`PendingSave.commit`; :meth:`PendingSave.abort`
        removes the temporary file.

        Parameters
        ----------
        server_round : int
            The round the state is kept after.
        state : dict of str to Tensor
            Read before this returns and never kept (it may be the client's own tensors).
        metadata : mapping of str to str, optional
            For the safetensors header.

        Returns
        -------
        PendingSave
            The save, to commit or abort (one of them, once).

        Raises
        ------
        Exception
            Whatever ``safetensors`` raises writing the file, or ``RuntimeError`` if the thread cannot
            start (no temporary file is left).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.file(server_round)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=dict(metadata or {}))
            return PendingSave(tmp, path, drop_pages=not self.cache_pages, prune=lambda: self.prune(server_round))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def prune(self, server_round: int) -> None:
        """Drop all but the newest ``keep`` rounds, and temporary files of rounds up to ``server_round``.

        A temporary file outlives its save only when the process died before committing or aborting it
        (a SuperNode killed mid-round); once a round at least as new is kept it is never needed.

        Parameters
        ----------
        server_round : int
            The round just kept (:meth:`PendingSave.commit`); temporary files of later rounds stay.
        """
        for old in self.rounds()[: -self.keep]:
            (self.folder / f"round-{old}.safetensors").unlink(missing_ok=True)
        for tmp in self.folder.glob(".round-*.safetensors.*.tmp"):
            found = _TEMP_FILE.match(tmp.name)
            if found and int(found.group(1)) <= server_round:
                tmp.unlink(missing_ok=True)

    def latest(self, at_most: int) -> int | None:
        """The newest saved round ``<= at_most``, or ``None``."""
        eligible = [r for r in self.rounds() if r <= at_most]
        return eligible[-1] if eligible else None

    def file(self, server_round: int) -> Path:
        """The path of round ``server_round``'s state (whether or not it exists)."""
        return self.folder / f"round-{server_round}.safetensors"

    def _saved(self, server_round: int) -> str:
        path = self.file(server_round)
        if not path.is_file():
            raise FileNotFoundError(f"no client state for round {server_round} in {self.folder}")
        return str(path)

    def load(self, server_round: int) -> dict[str, Tensor]:
        """The state saved as round ``server_round`` (CPU tensors).

        Raises
        ------
        FileNotFoundError
            If that round was not saved (or was dropped).
        """
        return load_file(self._saved(server_round))

    def metadata(self, server_round: int) -> dict[str, str]:
        """The header metadata :meth:`save` wrote with round ``server_round`` (empty if none).

        Raises
        ------
        FileNotFoundError
            If that round was not saved (or was dropped).
        """
        with safe_open(self._saved(server_round), "pt") as f:
            return dict(f.metadata() or {})

    def load_latest(
        self, at_most: int, require: Mapping[str, str] | None = None, above: int = 0
    ) -> tuple[int, dict[str, Tensor]] | None:
        """The newest readable state saved for a round in ``(above, at_most]``, as ``(round, state)``, or ``None``.

        A newest file that cannot be read (truncated, damaged), or whose
        metadata lacks an item of ``require``, is logged and skipped for the one
        before it.

        Parameters
        ----------
        at_most : int
            The newest round wanted.
        require : mapping of str to str, optional
            Header metadata the file must carry (which run wrote it).
        above : int
            Rounds ``<= above`` (state the caller already holds) are not read at all.
        """
        for server_round in reversed([r for r in self.rounds() if above < r <= at_most]):
            try:
                found = self.metadata(server_round)
                if any(found.get(k) != v for k, v in (require or {}).items()):
                    _LOG.warning("client state of round %d was written by another run; not loaded", server_round)
                    continue
                return server_round, self.load(server_round)
            except Exception as err:  # noqa: BLE001 - safetensors raises its own type for a damaged file
                _LOG.warning("client state of round %d unreadable (%s); trying the round before", server_round, err)
        return None


class PendingSave:
    """A round's state in a temporary file whose fsync runs in a thread (:meth:`ClientStateStore.begin_save`).

    Parameters
    ----------
    tmp, path : Path
        The temporary file, and the round's file it becomes on :meth:`commit`.
    drop_pages : bool
        Drop the file's pages from the page cache once it is on disk (``posix_fadvise``; advice only).
    prune : callable
        Called after the rename (:meth:`ClientStateStore.prune`).

    Raises
    ------
    RuntimeError
        If the thread cannot start.
    """

    def __init__(self, tmp: Path, path: Path, drop_pages: bool, prune: Callable[[], None]) -> None:
        self.tmp, self.path, self.drop_pages, self._prune = tmp, path, drop_pages, prune
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._sync, name=f"fsync {path.name}", daemon=True)
        self._thread.start()

    def _sync(self) -> None:
        try:
            with open(self.tmp, "rb+") as f:
                os.fsync(f.fileno())
                if self.drop_pages and hasattr(os, "posix_fadvise"):
                    with contextlib.suppress(OSError):  # advice only: the file is written either way
                        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # on disk: its pages are clean
        except BaseException as err:  # noqa: BLE001 - handed to commit(), in the caller's thread
            self._error = err

    def commit(self) -> Path:
        """Wait for the fsync, rename the file into place, then prune the store.

        Returns
        -------
        Path
            The round's file.

        Raises
        ------
        OSError
            From the fsync or the rename (the temporary file is removed, the round is not kept).
        """
        self._thread.join()
        try:
            if self._error is not None:
                raise self._error
            os.replace(self.tmp, self.path)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        self._prune()
        return self.path

    def abort(self) -> None:
        """Wait for the fsync and remove the temporary file: the store is as it was before the save.

        Raises
        ------
        OSError
            If the temporary file exists and cannot be removed.
        """
        self._thread.join()
        self.tmp.unlink(missing_ok=True)
