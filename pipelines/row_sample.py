"""A bounded sample of predicted rows, the same whatever order the shards arrive in: the MLflow table and the
plots of a test set too large to hold (the paper's Traffic test set has millions of forecast windows)."""

import hashlib
import heapq


def key_rank(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class RowSample:
    """At most `size` rows: those whose keys hash lowest, a spread over the whole test set rather than its first
    shards; every row while there are no more than `size`."""

    def __init__(self, size: int):
        if size < 0:
            raise ValueError(f"a sample of {size} rows: give 0 or more")
        self.size, self.seen = size, 0
        self._kept: list[tuple[int, int, dict]] = []  # (-rank, arrival, row): a max-heap of the kept ranks

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            self.seen += 1
            entry = (-key_rank(row["key"]), self.seen, row)  # arrival breaks ties: rows are never compared
            if len(self._kept) < self.size:
                heapq.heappush(self._kept, entry)
            elif self.size and entry[0] > self._kept[0][0]:
                heapq.heapreplace(self._kept, entry)

    def rows(self) -> list[dict]:
        """The kept rows, by key."""
        return sorted((row for _, _, row in self._kept), key=lambda r: r["key"])
