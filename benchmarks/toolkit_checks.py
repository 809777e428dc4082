"""The toolkit's statistical checks at the issue's sizes, printed (issue 18).

The tests assert the same criteria on fewer sets (``tests/test_residuals.py``,
``tests/test_intervals.py``; the 200- and 100-set residual checks are marked ``slow``); this
script prints the measured values::

    OMP_NUM_THREADS=1 python benchmarks/toolkit_checks.py      # about 1 minute

* simulated residuals: KS p value of the uniformity tests' p values over 200 data sets from a
  correctly specified model (target > 0.05); share of 100 over-dispersed Poisson sets whose
  dispersion test rejects (target >= 0.9);
* prediction intervals: coverage of 95 % intervals for rows of known and of new groups over
  50 linear and 20 neural simulated sets (target 93-97 %).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_intervals import _coverage  # noqa: E402
from tests.test_residuals import _dispersion_rejections, _uniformity_pvalues  # noqa: E402


def main() -> None:
    t0 = time.perf_counter()
    ks = stats.kstest(_uniformity_pvalues(200), "uniform").pvalue
    print(f"uniformity: KS p of 200 p values {ks:.3f} (> 0.05)")
    print(f"dispersion: rejected in {_dispersion_rejections(100, od=0.5):.0%} of 100 "
          "over-dispersed sets (>= 90 %)")
    for neural, n_sets in ((False, 50), (True, 20)):
        res = np.array([_coverage(seed, neural) for seed in range(n_sets)])
        rows = res[:, 0].sum()
        print(f"{'neural' if neural else 'linear'} prediction intervals, {n_sets} sets: "
              f"coverage known groups {res[:, 1].sum() / rows:.3f}, new groups "
              f"{res[:, 2].sum() / rows:.3f} (0.93-0.97)")
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
