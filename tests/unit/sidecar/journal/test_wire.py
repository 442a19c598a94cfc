"""Stream framing in the journal."""

from __future__ import annotations

from sidecar.journal.wire import frame, unframe


def test_frame_round_trip() -> None:
    """Framed chunks come back identical, in order, including empty and binary ones."""
    chunks = [b'{"a":1}', b"", b"\x00\xff\n\r", b"x" * 70_000]
    assert list(unframe(frame(chunks))) == chunks


def test_empty_stream() -> None:
    """No chunks frame to nothing and unframe to nothing."""
    assert frame([]) == b""
    assert list(unframe(b"")) == []
