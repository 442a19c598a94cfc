"""The statements and plans both SQL journal stores share: rendering and retention's record."""

from __future__ import annotations

from typing import Any

from sidecar.config import RetentionConfig
from sidecar.journal.sql import SQLITE, Dialect, Done, Queries, SqlPlan, Statement, advance

# Spelled like PostgreSQL's, with a retention lock (several sidecars, one journal).
SHARED = Dialect("%s", "tether_", "SELECT lock")


def drive(plan: SqlPlan[Any], replies: list[Any]) -> tuple[list[Statement], Any]:
    """Run a plan against canned replies; returns the statements it asked for and its value."""
    asked: list[Statement] = []
    answer: Any = None
    while not isinstance(step := advance(plan, answer), Done):
        asked.append(step)
        answer = replies.pop(0)
    return asked, step.value


def test_dialects_render_parameters_and_tables() -> None:
    """One statement, two spellings: `?` and bare tables for SQLite, `%s` and tether_* for
    PostgreSQL."""
    assert Queries(SQLITE).get_sql.endswith("FROM entries WHERE run_id = ? AND key = ?")
    assert Queries(SHARED).get_sql.endswith("FROM tether_entries WHERE run_id = %s AND key = %s")


def test_a_skipped_pass_keeps_the_runs_to_look_at() -> None:
    """A pass that does not get the retention lock (another sidecar's runs) changes nothing:
    the runs written since the last pass are looked at by the next one."""
    queries = Queries(SHARED)
    queries.touched.all = False
    queries.touched.entries.add("run-1")
    asked, removed = drive(queries.expire(RetentionConfig(), 100.0), [(False,)])
    queries.touched.committed()
    assert len(asked) == 1 and removed.entries == 0
    assert queries.touched.entries == {"run-1"} and not queries.touched.all


def test_a_pass_looks_only_at_runs_written_and_over_the_limit() -> None:
    """After a committed pass, the next looks up only the runs written since, in one
    statement, and prunes only those over the limit."""
    queries = Queries(SQLITE)
    rules = RetentionConfig(max_entries_per_run=2)
    queries.touched.all = False
    queries.touched.entries.update({"a", "b"})
    replies = [0, 0, [("b",)], (7,), 5, 0]  # by age x2, over the limit, oldest kept, pruned, runs
    asked, removed = drive(queries.expire(rules, 100.0), replies)
    assert "run_id IN (?, ?)" in asked[2].sql and asked[2].args == ("a", "b", 2)
    assert asked[3].args == ("b", 1) and asked[4].args == ("b", 7)
    assert removed.entries == 5 and queries.touched.all  # until the pass commits
    queries.touched.committed()
    assert not queries.touched.all and not queries.touched.entries
