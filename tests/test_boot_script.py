"""``fit.confint("boot")`` pasted into a script without ``if __name__ == "__main__":``.

The bootstrap's worker processes import the main script again (Python's multiprocessing
does), which re-ran the script's fits in every worker and died there with multiprocessing's
"bootstrapping phase" RuntimeError and a BrokenProcessPool. Now one NGMMError, raised before
any worker starts, names the guard and ``workers=1``; ``workers=1`` runs without the guard.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """\
from ngmm_formula import ngmm, datasets
print("script body runs", flush=True)
cbpp = datasets.load("cbpp")
fit = ngmm("cbind(incidence, size - incidence) ~ period + (1 | herd)", cbpp, "binomial")
ci = fit.confint("boot", data=cbpp, nsim=2, workers={workers})
print("intervals", ci.shape)
"""


def _run(tmp_path: Path, workers: int) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "boot_script.py"
    script.write_text(SCRIPT.format(workers=workers))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)


def test_unguarded_script_gets_one_clear_error(tmp_path: Path) -> None:
    r = _run(tmp_path, workers=2)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ngmm_formula.errors.NGMMError: confint('boot', workers=2) "
                           "refits in worker processes"), r.stderr
    assert "boot_script.py" in last and 'if __name__ == "__main__":' in last
    assert "workers=1" in last
    # the script ran once: no worker re-ran it, no multiprocessing bootstrapping error
    assert r.stdout.count("script body runs") == 1
    assert "bootstrapping phase" not in r.stderr and "BrokenProcessPool" not in r.stderr


def test_unguarded_script_with_one_worker_runs(tmp_path: Path) -> None:
    r = _run(tmp_path, workers=1)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("script body runs") == 1 and "intervals (5, 2)" in r.stdout
