"""The shared server-sent-events parser of the streaming adapters."""

from __future__ import annotations

from sidecar.upstreams._sse import SSEParser


def feed_all(parts: list[bytes]) -> tuple[list[bytes], bytes | None]:
    parser = SSEParser()
    events = [event for part in parts for event in parser.feed(part)]
    return events, parser.finish()


def test_events_split_anywhere() -> None:
    """Events come out whole however the bytes are split, with any line ending."""
    text = b'event: a\ndata: {"x":1}\n\r\ndata: 2\r\rdata: 3\r\n\r\n'
    whole, _ = feed_all([text])
    assert whole == [b'{"x":1}', b"2", b"3"]
    for size in (1, 2, 3, 7):
        parts = [text[i : i + size] for i in range(0, len(text), size)]
        assert feed_all(parts) == (whole, None)


def test_multiline_data_comments_and_other_fields() -> None:
    """Data lines join with LF; comments, `event:`, `id:` and `data` look-alikes are ignored."""
    events, _ = feed_all([b": ping\nevent: x\nid: 4\ndatax: no\ndata:a\ndata: b\n\n\n"])
    assert events == [b"a\nb"]


def test_unterminated_last_event() -> None:
    """An event the body did not terminate comes from finish(); nothing more after it."""
    parser = SSEParser()
    assert parser.feed(b"data: 1\n\ndata: [DONE]") == [b"1"]
    assert parser.finish() == b"[DONE]"
    assert parser.finish() is None
