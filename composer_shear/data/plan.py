"""The sampling plan of one interval (epoch) of the dynamic loader: which sample of which domain goes to which
rank, worker and batch. Pure functions of small state, so that resume state is O(domains).

Each domain is read through a seeded permutation of its samples ("pass" p of domain d uses the permutation
seeded by (seed, d, p)); a cursor per domain says how far the current pass has been read. When a domain is
exhausted, the next pass starts with a fresh permutation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def quota(proportions, total: int) -> np.ndarray:
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

    def to_dict(self):
        return {'passes': list(map(int, self.passes)), 'offsets': list(map(int, self.offsets))}


def permutation(seed: int, domain: int, pass_: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, domain, pass_]).permutation(size)


def take(cursor: Cursor, counts, sizes, seed: int) -> tuple[list[np.ndarray], Cursor, list[int]]:
    """The next `counts[d]` local sample indices of every domain, the cursor after them, and the domains that
    ran out (and were reshuffled) on the way."""
    out, passes, offsets, wrapped = [], list(cursor.passes), list(cursor.offsets), []
    for d, (n, size) in enumerate(zip(counts, sizes, strict=True)):
        parts = []
        while n > 0:
            perm = permutation(seed, d, passes[d], size)
            step = min(n, size - offsets[d])
            parts.append(perm[offsets[d]:offsets[d] + step])
            offsets[d] += int(step)
            n -= step
            if offsets[d] == size:
                passes[d], offsets[d] = passes[d] + 1, 0
                wrapped.append(d)
        out.append(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))
    return out, Cursor(passes, offsets), wrapped


@dataclass
class Plan:
    """One interval: `epoch`, the domain cursor at its start and end, and the proportions it used."""
    epoch: int
    proportions: list
    start: Cursor
    end: Cursor
    counts: list
    skip: int = 0  # global samples of this interval already consumed (resume)

    def to_dict(self):
        return {'epoch': self.epoch, 'proportions': [float(x) for x in self.proportions],
                'start': self.start.to_dict(), 'end': self.end.to_dict(), 'counts': list(map(int, self.counts)),
                'skip': int(self.skip)}

    @classmethod
    def from_dict(cls, d):
        return cls(d['epoch'], d['proportions'], Cursor(**d['start']), Cursor(**d['end']), d['counts'], d['skip'])


def make_plan(epoch: int, proportions, start: Cursor, total: int, sizes, seed: int, skip: int = 0) -> tuple[Plan, list]:
    counts = quota(proportions, total)
    _, end, wrapped = take(start, counts, sizes, seed)
    return Plan(epoch, list(proportions), start, end, counts.tolist(), skip), wrapped


def interval_samples(plan: Plan, sizes, seed: int) -> np.ndarray:
    """Global (domain, local index) pairs of the whole interval, in a seeded random order: shape [total, 2]."""
    picks, _, _ = take(plan.start, plan.counts, sizes, seed)
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
