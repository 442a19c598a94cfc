"""The journal's key filter: never a false 'absent'."""

from __future__ import annotations

from sidecar.journal.keyfilter import KeyFilter


def test_added_keys_are_always_maybe() -> None:
    """Every added (run, key) is reported as possibly present (no false negatives)."""
    keys = KeyFilter(capacity=1000)
    added = [(f"run-{i % 7}", f"key-{i}") for i in range(5000)]  # five times its capacity
    for run_id, key in added:
        keys.add(run_id, key)
    assert all(keys.may_contain(run_id, key) for run_id, key in added)


def test_unknown_keys_are_mostly_absent() -> None:
    """Within capacity, unknown keys are reported absent (false positives about 1%)."""
    keys = KeyFilter(capacity=10_000)
    for i in range(10_000):
        keys.add("r", f"k{i}")
    false = sum(keys.may_contain("r", f"other{i}") for i in range(10_000))
    assert false < 300


def test_run_and_key_do_not_blur() -> None:
    """('a', 'b:c') and ('a:b', 'c') are different pairs."""
    keys = KeyFilter(capacity=100)
    keys.add("a", "b:c")
    assert keys.may_contain("a", "b:c")
    assert not keys.may_contain("a:b", "c")
