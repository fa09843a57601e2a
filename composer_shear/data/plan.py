"""The sampling plan of one interval (epoch) of the dynamic loader: which sample of which domain goes to which
rank, worker and batch. Pure functions of small state, so that resume state is O(domains).

Each domain is read through a seeded permutation of its samples ("pass" p of domain d uses the permutation
seeded by (seed, d, p)); a cursor per domain says how far the current pass has been read. When a domain is
exhausted, the next pass starts with a fresh permutation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike


def quota(proportions: ArrayLike, total: int) -> np.ndarray:
    """Integer samples per domain summing to `total` (largest remainder)."""
    p = np.asarray(proportions, dtype=np.float64)
    raw = p / p.sum() * total
    counts = np.floor(raw).astype(np.int64)
    rest = total - counts.sum()
    if rest:
        order = np.argsort(-(raw - counts), kind='stable')
        counts[order[:rest]] += 1
    return counts


@dataclass
class Cursor:
    """Where each domain's reading stands: pass number and position in that pass's permutation."""
    passes: list = field(default_factory=list)
    offsets: list = field(default_factory=list)

    @classmethod
    def start(cls, k: int) -> Cursor:
        return cls([0] * k, [0] * k)

    def to_dict(self) -> dict[str, list[int]]:
        """JSON-serializable form (plain ints)."""
        return {'passes': list(map(int, self.passes)), 'offsets': list(map(int, self.offsets))}


def permutation(seed: int, domain: int, pass_: int, size: int, cache: dict | None = None) -> np.ndarray:
    """The reading order of one pass over a domain. `cache` (kept by persistent workers) holds the current pass
    of each domain, so a permutation is built once per pass rather than once per interval."""
    if cache is not None and cache.get(domain, (None,))[0] == (seed, pass_, size):
        return cache[domain][1]
    perm = np.random.default_rng([seed, domain, pass_]).permutation(size)
    if cache is not None:
        cache[domain] = ((seed, pass_, size), perm)
    return perm


def advance(cursor: Cursor, counts: Sequence[int] | np.ndarray, sizes: Sequence[int]) -> tuple[Cursor, list[int]]:
    """The cursor after reading `counts[d]` samples of every domain, and the domains that ran out on the way."""
    passes, offsets, wrapped = list(cursor.passes), list(cursor.offsets), []
    for d, (n, size) in enumerate(zip(counts, sizes, strict=True)):
        total = offsets[d] + int(n)
        # samples read a second time: past the end in this interval, or a new pass that starts with it (a domain
        # read exactly to its end has not run out yet)
        if total > size or (n > 0 and offsets[d] == 0 and passes[d] > 0):
            wrapped.append(d)
        passes[d] += total // size
        offsets[d] = total % size
    return Cursor(passes, offsets), wrapped


def take(cursor: Cursor, counts: Sequence[int], sizes: Sequence[int], seed: int,
         cache: dict | None = None) -> list[np.ndarray]:
    """The next `counts[d]` local sample indices of every domain; a domain that runs out is reshuffled (its next
    pass) and read again."""
    out = []
    for d, (n, size) in enumerate(zip(counts, sizes, strict=True)):
        pass_, offset, parts = cursor.passes[d], cursor.offsets[d], []
        while n > 0:
            step = min(n, size - offset)
            parts.append(permutation(seed, d, pass_, size, cache)[offset:offset + step])
            n, offset = n - step, offset + step
            if offset == size:
                pass_, offset = pass_ + 1, 0
        out.append(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))
    return out


@dataclass
class Plan:
    """One interval: `epoch`, the domain cursor at its start and end, and the proportions it used."""
    epoch: int
    proportions: list
    start: Cursor
    end: Cursor
    counts: list
    skip: int = 0  # global samples of this interval already consumed (resume)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form (plain ints and floats)."""
        return {'epoch': self.epoch, 'proportions': [float(x) for x in self.proportions],
                'start': self.start.to_dict(), 'end': self.end.to_dict(), 'counts': list(map(int, self.counts)),
                'skip': int(self.skip)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """Inverse of `to_dict`."""
        return cls(d['epoch'], d['proportions'], Cursor(**d['start']), Cursor(**d['end']), d['counts'], d['skip'])


def make_plan(epoch: int, proportions: Sequence[float] | np.ndarray, start: Cursor, total: int, sizes: Sequence[int],
              seed: int, skip: int = 0) -> tuple[Plan, list]:
    """The plan of interval `epoch` (`total` samples at `proportions` from `start`), and the domains that run out."""
    counts = quota(proportions, total)
    end, wrapped = advance(start, counts, sizes)
    return Plan(epoch, list(proportions), start, end, counts.tolist(), skip), wrapped


def interval_samples(plan: Plan, sizes: Sequence[int], seed: int, cache: dict | None = None) -> np.ndarray:
    """Global (domain, local index) pairs of the whole interval, in a seeded random order: shape [total, 2]."""
    picks = take(plan.start, plan.counts, sizes, seed, cache)
    pairs = np.concatenate([np.stack([np.full(len(p), d), p], 1) for d, p in enumerate(picks)] or
                           [np.zeros((0, 2), dtype=np.int64)])
    order = np.random.default_rng([seed, 1_000_003, plan.epoch]).permutation(len(pairs))
    return pairs[order].astype(np.int64)


def worker_slice(pairs: np.ndarray, skip: int, rank: int, world: int, worker: int, workers: int,
                 batch: int) -> np.ndarray:
    """The samples one dataloader worker of one rank yields, in order. Ranks take interleaved samples; within a
    rank, device batch b goes to worker b % workers (the order torch's DataLoader returns them in)."""
    per_rank = len(pairs) // world
    mine = pairs[rank::world][:per_rank]
    n_batches = per_rank // batch
    # after a reset torch's DataLoader asks worker 0 first, so batch b of what is left goes to worker b % workers
    mine = mine[skip // world:n_batches * batch]
    idx = [b for b in range(len(mine) // batch) if b % workers == worker]
    if not idx:
        return np.zeros((0, 2), dtype=np.int64)
    return np.concatenate([mine[b * batch:(b + 1) * batch] for b in idx])
