"""The bad-input table as a whole: at least 60 rows over ``ngmm``, ``predict``, ``save/load``
and the CLI, with distinct ids."""

from __future__ import annotations

from tests.bad_input import test_data_table, test_files_table, test_formula_table


def test_the_table_has_60_distinct_rows() -> None:
    rows = [*test_data_table.CASES, *test_formula_table.CASES, *test_files_table.CASES]
    ids = [c.id for c in rows]
    assert len(rows) >= 60
    assert len(set(ids)) == len(ids), sorted(i for i in ids if ids.count(i) > 1)
