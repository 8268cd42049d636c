"""A log-linear latency histogram in microseconds: constant memory, mergeable across processes.

Values below 128 µs get one bucket each. Above, every power of two is cut into 64 buckets, so a
bucket is at most 1/64 (1.6 %) of its values wide, and a percentile read from it is within 1.6 % of
the exact one. 40 powers of two cover more than ten days, far beyond any benchmark.
"""

from __future__ import annotations

from collections.abc import Iterable

SUB_BITS = 6
LINEAR_LIMIT = 2 << SUB_BITS
"""Values below this (128 µs) have a bucket each."""
BUCKETS = (40 << SUB_BITS) + LINEAR_LIMIT


def bucket_of(value: int) -> int:
    """Return the bucket index of a non-negative value (negative values count as 0)."""
    if value < LINEAR_LIMIT:
        return value if value > 0 else 0
    shift = value.bit_length() - SUB_BITS - 1
    return min((shift << SUB_BITS) + (value >> shift), BUCKETS - 1)


def bucket_value(index: int) -> int:
    """Return the midpoint of a bucket, the value a percentile in it reports."""
    if index < LINEAR_LIMIT:
        return index
    shift = (index >> SUB_BITS) - 1
    low = (index - (shift << SUB_BITS)) << shift
    return low + ((1 << shift) >> 1)


class Histogram:
    """Counts of latencies; `add` is the hot path and costs a few bytecode operations."""

    __slots__ = ("count", "counts", "maximum")

    def __init__(self) -> None:
        self.counts = [0] * BUCKETS
        self.count = 0
        self.maximum = 0

    def add(self, value: int) -> None:
        if value < LINEAR_LIMIT:
            self.counts[value if value > 0 else 0] += 1
        else:
            # `bucket_of`, inlined: this runs once per delivered message.
            shift = value.bit_length() - SUB_BITS - 1
            self.counts[min((shift << SUB_BITS) + (value >> shift), BUCKETS - 1)] += 1
            if value > self.maximum:
                self.maximum = value
        self.count += 1

    def merge(self, other: Histogram) -> None:
        self.counts = [mine + theirs for mine, theirs in zip(self.counts, other.counts, strict=True)]
        self.count += other.count
        self.maximum = max(self.maximum, other.maximum)

    def percentile(self, fraction: float) -> int | None:
        """Return the value below which `fraction` of the counts fall, or None when empty."""
        if self.count == 0:
            return None
        target = min(int(fraction * self.count), self.count - 1)
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen > target:
                return min(bucket_value(index), self.maximum) if self.maximum else bucket_value(index)
        return self.maximum

    def to_sparse(self) -> list[list[int]]:
        """Return the non-empty buckets as [index, count] pairs, for JSON."""
        return [[index, count] for index, count in enumerate(self.counts) if count]

    @classmethod
    def from_sparse(cls, pairs: Iterable[Iterable[int]], maximum: int = 0) -> Histogram:
        histogram = cls()
        for index, count in pairs:
            histogram.counts[index] += count
            histogram.count += count
        histogram.maximum = maximum
        return histogram
