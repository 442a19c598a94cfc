"""The `tether` command's arguments: options of `runs` before or after its action."""

from __future__ import annotations

import pytest

from sidecar.cli import build_parser


@pytest.mark.parametrize(
    ("argv", "address", "timeout_s"),
    [
        (["runs", "list", "--address", "unix:x.sock"], "unix:x.sock", 10.0),
        (["runs", "--address", "unix:y.sock", "list"], "unix:y.sock", 10.0),
        (["runs", "list"], None, 10.0),
        (["runs", "show", "run-1", "--timeout-s", "3"], None, 3.0),
        (["runs", "--timeout-s", "4", "show", "run-1"], None, 4.0),
        (["runs", "resolve", "run-1", "k", "--retry", "--address", "unix:z.sock"], "unix:z.sock",
         10.0),
    ],
)  # fmt: skip
def test_runs_options_go_before_or_after_the_action(
    argv: list[str], address: str | None, timeout_s: float
) -> None:
    """`tether runs list --address X` and `tether runs --address X list` mean the same."""
    args = build_parser().parse_args(argv)
    assert (args.address, args.timeout_s) == (address, timeout_s)
