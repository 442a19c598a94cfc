"""A Bloom filter of journaled (run, key) pairs: "surely absent" answered without I/O.

The journal asks it before reading the store for a call to an idempotent upstream: a key the
filter has never seen is surely new, so the call runs at once and its entry is written when
it completes. A "maybe" costs one read, as without the filter. It never forgets: a removed
entry is at worst a false "maybe", and past its capacity it answers "maybe" more and more
often, which is slower but never wrong.
"""

from __future__ import annotations

import hashlib

DEFAULT_CAPACITY = 1 << 20  # entries before the false-positive rate exceeds ~1%
BITS_PER_ENTRY = 10
HASHES = 7


class KeyFilter:
    """A Bloom filter over (run_id, key), sized for `capacity` entries."""

    __slots__ = ("_bits", "_size", "count")

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._size = capacity * BITS_PER_ENTRY
        self._bits = bytearray((self._size + 7) // 8)
        self.count = 0

    def _positions(self, run_id: str, key: str) -> list[int]:
        digest = hashlib.blake2b(f"{run_id}\0{key}".encode(), digest_size=16).digest()
        a = int.from_bytes(digest[:8], "little")
        b = int.from_bytes(digest[8:], "little") | 1
        return [(a + i * b) % self._size for i in range(HASHES)]

    def add(self, run_id: str, key: str) -> None:
        for position in self._positions(run_id, key):
            self._bits[position >> 3] |= 1 << (position & 7)
        self.count += 1

    def may_contain(self, run_id: str, key: str) -> bool:
        bits = self._bits
        return all(bits[p >> 3] & (1 << (p & 7)) for p in self._positions(run_id, key))
