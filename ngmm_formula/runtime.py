"""Process start-up for the parts of the package that fit in worker processes (the parametric
bootstrap of :mod:`ngmm_formula.inference`, :func:`ngmm_formula.distributed.fit_distributed`).

A leaf: it imports nothing of the package (the forkserver's preload names modules by string,
and the server process imports them, not this one).
"""

from __future__ import annotations

from typing import Any

__all__ = ["mp_context"]


def mp_context() -> Any:
    """forkserver where available: one server process imports torch and the package once,
    and the workers are forked from it (cheap, and safe: the server never ran torch's
    thread pools, unlike this process); spawn elsewhere."""
    import multiprocessing as mp

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["ngmm_formula.api", "ngmm_formula.inference"])
        return ctx
    return mp.get_context("spawn")
