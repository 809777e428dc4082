"""Checkpoints of neural fits (``Control(checkpoint=..., checkpoint_every=...)``, issue 17).

A fit killed (SIGKILL, in a subprocess) after a checkpoint and started again ends with the
same estimates as an uninterrupted fit with the same seed -- compared **bit for bit**
(``==`` on float64): on the CPU a fit is deterministic in any process (module docs of
:mod:`ngmm_formula.train`), and the checkpoint restores every state that the rest of the
training reads (weights, AdamW's moments, the scheduler, early stopping, numpy's and torch's
generators, the warm starts of the modes). A checkpoint of another fit is refused with a
message naming what differs, and a write interrupted half-way leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from ngmm_formula import CheckpointError, Control, NGMMError, ngmm, train
from ngmm_formula import checkpoint as ckpt
from ngmm_formula.datasets import simulate_grouped

ROOT = Path(__file__).resolve().parents[1]

# dropout and input noise on: the torch generators must be restored too
FORMULA = "y ~ nn(x1, x2, hidden=(8, 8), dropout=0.1) + x3 + (1 | g)"
# 60 epochs of 5 steps, no early stopping (min_steps not reached): long enough to kill
# the fit between its first checkpoint (epoch 4) and its end
OPTIONS: dict[str, Any] = dict(epochs=60, patience=10, min_steps=250, batch_groups=8,
                               progress=False)
SEED = 7


def data(seed: int = 3) -> pd.DataFrame:
    return simulate_grouped(n_groups=40, n_per_group=10, family="binomial", effect="sine",
                            seed=seed)


def fit(**control: Any) -> Any:
    return ngmm(FORMULA, data(), "binomial", control=Control(**{**OPTIONS, **control}),
                seed=SEED)


def identical(a: Any, b: Any) -> None:
    """The same estimates to the last bit."""
    assert a.fixef.index.equals(b.fixef.index)
    assert np.array_equal(a.fixef.to_numpy(), b.fixef.to_numpy())
    assert np.array_equal(a.theta, b.theta)
    assert a.loglik == b.loglik
    assert a.history.train == b.history.train and a.history.validation == b.history.validation
    assert a.history.best_epoch == b.history.best_epoch
    assert np.array_equal(a.predict(type="link"), b.predict(type="link"))


@pytest.fixture(scope="module")
def uninterrupted() -> Any:
    return fit()


KILLED_FIT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from tests.test_checkpoint import fit
    fit(checkpoint={path!r}, checkpoint_every=4)
    print("finished")
""")


def test_fit_killed_after_a_checkpoint_resumes_to_the_same_estimates(
        uninterrupted: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL to a subprocess fitting with checkpoints, as soon as the first checkpoint
    exists; the same call in this process resumes from it and ends where the uninterrupted
    fit ended, bit for bit."""
    path = tmp_path / "fit.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_FIT.format(root=str(ROOT),
                                                                     path=str(path))],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (out, err)
    assert b"finished" not in out
    saved = torch.load(path, weights_only=True)
    assert 4 <= saved["epoch"] < uninterrupted.history.epochs  # killed mid-training

    restored: list[int] = []
    restore = train._restore
    monkeypatch.setattr(train, "_restore", lambda saved, *a: (restored.append(saved["epoch"]),
                                                               restore(saved, *a)))
    resumed = fit(checkpoint=path, checkpoint_every=4)
    assert restored == [saved["epoch"]]
    identical(resumed, uninterrupted)
    # the file now holds the end of training: the same call again skips it
    again = fit(checkpoint=path, checkpoint_every=4)
    assert restored[-1] == uninterrupted.history.epochs
    identical(again, uninterrupted)


def test_interrupted_write_keeps_the_previous_checkpoint(
        uninterrupted: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash in the middle of the third write (half the bytes written, then an error)
    leaves the second checkpoint, whole and loadable, and no temporary file; the fit
    started again resumes from it to the uninterrupted estimates."""
    path = tmp_path / "fit.ckpt"
    writes: list[int] = []
    dump = ckpt._dump

    def crash_on_third(payload: Any, f: Any) -> None:
        writes.append(payload["epoch"])
        if len(writes) == 3:
            f.write(b"\x80\x02half a checkpoint")
            raise OSError("disk pulled out mid-write")
        dump(payload, f)

    monkeypatch.setattr(ckpt, "_dump", crash_on_third)
    with pytest.raises(OSError, match="mid-write"):
        fit(checkpoint=path, checkpoint_every=5)
    monkeypatch.setattr(ckpt, "_dump", dump)
    assert writes == [5, 10, 15]
    assert [p.name for p in tmp_path.iterdir()] == ["fit.ckpt"]  # no temporary file left
    saved = torch.load(path, weights_only=True)
    assert saved["epoch"] == 10 and saved["format"] == ckpt.FORMAT
    identical(fit(checkpoint=path, checkpoint_every=5), uninterrupted)


def test_ensemble_resumes_in_its_second_member(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Two networks trained one after the other: a crash during the second one's training
    resumes it (the first runs again from its start, without overwriting the file)."""
    options = dict(epochs=8, ensemble=2)
    reference = fit(**options)
    path = tmp_path / "fit.ckpt"
    writes: list[tuple[int, int]] = []
    write = ckpt.Checkpoints.write

    def crash_in_second_member(self: ckpt.Checkpoints, state: Any) -> None:
        writes.append((self.loop, state["epoch"]))
        write(self, state)
        if (self.loop, state["epoch"]) == (1, 3):
            raise RuntimeError("killed")

    monkeypatch.setattr(ckpt.Checkpoints, "write", crash_in_second_member)
    with pytest.raises(RuntimeError, match="killed"):
        fit(**options, checkpoint=path, checkpoint_every=3)
    assert writes == [(0, 3), (0, 6), (0, 8), (1, 3)]
    writes.clear()
    identical(fit(**options, checkpoint=path, checkpoint_every=3), reference)
    assert writes == [(1, 6), (1, 8)]  # nothing written while the first member ran again


def test_checkpoint_in_the_middle_of_a_pass_resumes_that_pass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``steps_per_epoch`` an epoch may end inside a pass over the groups (36 training
    groups in minibatches of 8: 5 steps a pass, epochs of 2, 2 and 1 steps); a fit that
    crashes after the checkpoint of epoch 10 (the first epoch of the fourth pass) resumes
    the rest of that pass and ends where the uninterrupted fit ended, bit for bit."""
    options = dict(epochs=20, steps_per_epoch=2, folds=1)  # one loop, one split
    reference = fit(**options)
    path = tmp_path / "fit.ckpt"
    write = ckpt.Checkpoints.write

    def crash_after_epoch_10(self: ckpt.Checkpoints, state: Any) -> None:
        write(self, state)
        if state["epoch"] == 10:
            assert state["pass"]["order"] is not None and state["pass"]["taken"] == 2
            raise RuntimeError("killed")

    monkeypatch.setattr(ckpt.Checkpoints, "write", crash_after_epoch_10)
    with pytest.raises(RuntimeError, match="killed"):
        fit(**options, checkpoint=path, checkpoint_every=5)
    monkeypatch.setattr(ckpt.Checkpoints, "write", write)
    identical(fit(**options, checkpoint=path, checkpoint_every=5), reference)


def test_write_checkpoint_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.ckpt"
    ckpt.write_checkpoint(path, {"x": torch.arange(3.0), "note": "first"})

    def fail(payload: Any, f: Any) -> None:
        f.write(b"garbage")
        raise KeyboardInterrupt  # not even an Exception: the temporary file still goes

    monkeypatch.setattr(ckpt, "_dump", fail)
    with pytest.raises(KeyboardInterrupt):
        ckpt.write_checkpoint(path, {"x": torch.arange(5.0), "note": "second"})
    assert [p.name for p in tmp_path.iterdir()] == ["c.ckpt"]
    back = torch.load(path, weights_only=True)
    assert back["note"] == "first" and torch.equal(back["x"], torch.arange(3.0))


@pytest.mark.parametrize("change, differs", [
    (dict(seed=8), "seed"),
    (dict(data=data(seed=4)), "data .sha256."),
    (dict(formula="y ~ nn(x1, x2, hidden=(8, 8), dropout=0.1) + (1 | g)"), "formula"),
    (dict(control=dict(lr=2e-3)), r"Control.lr: '0.001' in the file, '0.002' now"),
])
def test_checkpoint_of_another_fit_is_refused(tmp_path: Path, change: dict[str, Any],
                                             differs: str) -> None:
    path = tmp_path / "fit.ckpt"
    quick = dict(epochs=2, checkpoint=path, checkpoint_every=1)
    fit(**quick)
    assert path.exists()
    kw: dict[str, Any] = dict(formula=FORMULA, data=data(), family="binomial", seed=SEED)
    options = {**OPTIONS, **quick, **change.pop("control", {})}
    kw.update(change)
    with pytest.raises(CheckpointError, match=f"written by another fit .*{differs}"):
        ngmm(control=Control(**options), **kw)


def test_checkpoint_errors_and_options(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot be read as a training checkpoint"):
        fit(epochs=2, checkpoint=bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        fit(epochs=2, checkpoint=tmp_path / "no" / "such" / "dir.ckpt")
    with pytest.raises(NGMMError, match="checkpoint is not available with approx='variat"):
        ngmm(FORMULA, data(), "binomial", approx="variational",
             control=Control(checkpoint=tmp_path / "v.ckpt"))
    for options, name in [(dict(checkpoint_every=0), "checkpoint_every"),
                          (dict(checkpoint_every=2.5), "checkpoint_every"),
                          (dict(checkpoint=""), "checkpoint"), (dict(checkpoint=3), "checkpoint")]:
        with pytest.raises(NGMMError, match=f"invalid {name}="):
            Control(**options)
