"""Every code block of README.md runs as written.

Each ```python block is executed in a fresh namespace, in a temporary folder (the blocks
write files such as ``sleep.ngmm``); each ```bash block runs in bash with ``ngmm`` meaning
this checkout's command line. A block whose first line is ``# not run by the tests: ...``
(it needs a GPU, several machines, installs packages) is skipped; one whose first line is
``# slow: ...`` runs only with ``-m slow``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

NOT_RUN = "# not run by the tests:"
SLOW = "# slow:"


def _blocks() -> list[tuple[str, int, str]]:
    """(language, first line number, code) of every fenced python or bash block."""
    out = []
    text = README.read_text(encoding="utf-8")
    for m in re.finditer(r"^```(python|bash)\n(.*?)^```", text, re.S | re.M):
        line = text.count("\n", 0, m.start()) + 1
        out.append((m.group(1), line, m.group(2)))
    return out


def _params() -> list[object]:
    params = []
    for lang, line, code in _blocks():
        first = code.lstrip().splitlines()[0] if code.strip() else ""
        marks: list[pytest.MarkDecorator] = []
        if first.startswith(NOT_RUN):
            marks.append(pytest.mark.skip(reason=first[len(NOT_RUN):].strip()))
        elif first.startswith(SLOW):
            marks.append(pytest.mark.slow)
        params.append(pytest.param(lang, code, id=f"{lang}-line{line}", marks=marks))
    return params


def test_readme_has_blocks_and_markers_are_known() -> None:
    blocks = _blocks()
    assert sum(lang == "python" for lang, _, _ in blocks) >= 6
    for _, line, code in blocks:
        first = code.lstrip().splitlines()[0]
        if first.lower().startswith(("# not run", "# slow")):
            assert first.startswith((NOT_RUN, SLOW)), f"README line {line}: {first}"


@pytest.mark.parametrize(("lang", "code"), _params())
def test_readme_block_runs(lang: str, code: str, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    if lang == "python":
        namespace: dict[str, object] = {"__name__": "__readme__"}
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102
        try:
            import matplotlib.pyplot as plt
        except ImportError:
            pass
        else:
            plt.close("all")
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    script = f'ngmm() {{ "{sys.executable}" -m ngmm_formula.cli "$@"; }}\nset -e\n{code}'
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
