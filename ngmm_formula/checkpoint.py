"""Checkpoints of long neural fits (``Control(checkpoint=path, checkpoint_every=k)``).

A checkpoint is one file holding everything that the training loop of
:mod:`ngmm_formula.train` needs to go on exactly where it was: the weights of the networks
and of the linear part, the optimiser's moments, the learning-rate scheduler, early
stopping's state (best score, best weights, epochs without improvement, epoch, optimiser
steps, the curves so far), the random generators of the trainer (numpy's for the order of the
minibatches, torch's for dropout and for the input noise) and the warm starts of the
conditional modes. With these a fit restarted after a crash ends with the same estimates as
an uninterrupted one, bit for bit on the CPU (the steps before training -- the GLMM start,
the validation split -- are deterministic and are simply run again).

**Fingerprint.** The file also holds a description of the fit it belongs to (formula,
family, approximation, number of observations, a SHA-256 of the data as the trainer sees it,
the options of :class:`~ngmm_formula.control.Control` that change the result, the seed);
resuming from a file written for another fit raises :class:`~ngmm_formula.errors.
CheckpointError` naming what differs.

**Format.** Data, not code: ``torch.save`` of a dictionary of tensors, dictionaries, lists
and plain numbers and strings, read back with ``torch.load(..., weights_only=True)``, which
refuses anything else (no class is unpickled; numpy's generator state travels as JSON text).

**Atomic writes.** The file is written to a temporary file in the same directory, flushed
and ``fsync``-ed, then moved over the old one with :func:`os.replace` (atomic on POSIX and
Windows), and the directory is ``fsync``-ed: a crash at any moment leaves either the previous
checkpoint or the new one, never a truncated file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ngmm_formula.errors import CheckpointError

__all__ = ["FORMAT", "VERSION", "Checkpoints", "read_checkpoint", "write_checkpoint"]

#: The ``format`` entry of every checkpoint file.
FORMAT = "ngmm_formula training checkpoint"
#: Version of the layout; a file of another version is refused.
VERSION = 1


def write_checkpoint(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (temporary file, fsync, :func:`os.replace`).

    Parameters
    ----------
    path : path-like
        The checkpoint file; its directory must exist.
    payload : mapping
        Tensors, dictionaries, lists, tuples, numbers, strings, booleans and None only.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            _dump({"format": FORMAT, "version": VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _dump(payload: Mapping[str, Any], f: Any) -> None:
    """The serialisation itself (a separate function so that tests can make it fail)."""
    torch.save(dict(payload), f)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_checkpoint(path: str | os.PathLike[str],
                    fingerprint: Mapping[str, str]) -> dict[str, Any]:
    """Read the checkpoint at ``path`` and check that it belongs to the fit ``fingerprint``.

    Parameters
    ----------
    path : path-like
    fingerprint : mapping of str to str
        The description of the fit being run (see the module docs).

    Returns
    -------
    dict
        The payload given to :func:`write_checkpoint`, with ``format`` and ``version``.

    Raises
    ------
    CheckpointError
        The file cannot be read as a checkpoint, is of another format version, or belongs to
        another fit (the message names the entries of the fingerprint that differ).
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"Control.checkpoint={str(path)!r} cannot be read as a training checkpoint "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "delete it to start afresh") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"Control.checkpoint={str(path)!r} is not an ngmm_formula "
                              "training checkpoint; delete it or choose another path")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"Control.checkpoint={str(path)!r} has format version {payload.get('version')!r}, "
            f"this version of ngmm_formula reads version {VERSION}; delete it to start afresh")
    saved = payload.get("fingerprint", {})
    differ = [k for k in sorted(set(saved) | set(fingerprint))
              if saved.get(k) != fingerprint.get(k)]
    if differ:
        shown = "; ".join(f"{k}: {_short(saved.get(k))} in the file, "
                          f"{_short(fingerprint.get(k))} now" for k in differ)
        raise CheckpointError(
            f"Control.checkpoint={str(path)!r} was written by another fit ({shown}): "
            "resuming from it would mix two fits. Delete the file, or choose another "
            "checkpoint path, to start this fit afresh")
    return payload


def _short(value: str | None, width: int = 60) -> str:
    if value is None:
        return "absent"
    return repr(value if len(value) <= width else value[:width - 3] + "...")


class Checkpoints:
    """The checkpoints of one fit: what to resume from, and when to write.

    A fit may run several training loops (an ensemble's members, the folds of
    ``Control.folds``); they are numbered in the order they run, and the file holds the state
    of one of them. When a fit is restarted, the loops before the saved one run again from
    their start (deterministically: they end as before) without writing, the saved one
    resumes from its state, and the later ones write as usual.

    Parameters
    ----------
    path : path-like
        ``Control.checkpoint``.
    every : int
        ``Control.checkpoint_every``: write after every ``every``-th epoch (and at the end of
        every loop).
    fingerprint : mapping of str to str
        The description of the fit (:func:`read_checkpoint`).
    """

    def __init__(self, path: str | os.PathLike[str], every: int,
                 fingerprint: Mapping[str, str]):
        self.path = Path(path)
        self.every = every
        self.fingerprint = dict(fingerprint)
        if not self.path.parent.is_dir():
            raise CheckpointError(f"Control.checkpoint={str(path)!r}: the directory "
                                  f"{str(self.path.parent)!r} does not exist")
        self.saved = read_checkpoint(self.path, self.fingerprint) if self.path.exists() else None
        self.loop = -1

    def start_loop(self) -> dict[str, Any] | None:
        """Number the next training loop; return the saved state when it is this loop's."""
        self.loop += 1
        if self.saved is not None and int(self.saved["loop"]) == self.loop:
            return self.saved
        return None

    def due(self, epoch: int, last: bool) -> bool:
        """Whether to write after ``epoch`` (``last``: the loop ends after it)."""
        behind = self.saved is not None and self.loop < int(self.saved["loop"])
        return not behind and (last or epoch % self.every == 0)

    def write(self, state: Mapping[str, Any]) -> None:
        """Write this loop's ``state`` (with the fingerprint and the loop's number)."""
        write_checkpoint(self.path, {**state, "loop": self.loop,
                                     "fingerprint": self.fingerprint})
