"""The SDK's public surface."""

from __future__ import annotations

import inspect
from pathlib import Path

import tether


def test_all_is_sorted_and_complete() -> None:
    """tether.__all__ is sorted, and lists every public name the package has (each
    imported at first use)."""
    assert tether.__all__ == sorted(tether.__all__)
    for name in tether.__all__:
        getattr(tether, name)
    public = {
        n for n, v in vars(tether).items() if not n.startswith("_") and not inspect.ismodule(v)
    }
    assert public == set(tether.__all__)


def test_every_error_derives_from_tether_error() -> None:
    """Every exception the SDK exports is a TetherError."""
    for name in tether.__all__:
        obj = getattr(tether, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            assert issubclass(obj, tether.TetherError), name


def test_package_is_typed() -> None:
    """The SDK ships py.typed so type checkers use its annotations."""
    assert (Path(tether.__file__).parent / "py.typed").is_file()


def test_target_precedence(monkeypatch: object) -> None:
    """Target: argument, else $TETHER_ADDRESS, else unix:tether.sock."""
    import pytest

    mp = pytest.MonkeyPatch()
    try:
        from tether._messages import resolve_target

        assert resolve_target(None) == "unix:tether.sock"
        mp.setenv("TETHER_ADDRESS", "127.0.0.1:7700")
        assert resolve_target(None) == "127.0.0.1:7700"
        assert resolve_target("unix:/tmp/x.sock") == "unix:/tmp/x.sock"
    finally:
        mp.undo()


def test_run_keys_are_deterministic() -> None:
    """A run derives keys run_id:step, one step per call, so a replay gets the same keys."""
    client = tether.Client("unix:/nonexistent.sock")
    try:
        first, second = client.run("r1"), client.run("r1")
        keys = [first.next_key(), first.next_key("explicit"), first.next_key()]
        assert keys == ["r1:1", "explicit", "r1:3"]
        assert second.next_key() == "r1:1"
    finally:
        client.close()
