"""Domain weights: validation and the dynamic batch loading update (Xia et al. 2023, Algorithm 1)."""

from __future__ import annotations

import numpy as np

UPDATE_TYPES = ('doremi', 'constant')


def per_domain(values, domains, name) -> list:
    """A list in domain order from a list or a dict keyed by domain (whose keys must be exactly the domains)."""
    if not isinstance(values, dict):
        return values
    missing, extra = sorted(set(domains) - set(values)), sorted(set(values) - set(domains))
    if missing or extra:
        raise ValueError(f'{name}: its domains differ from the streams: missing {missing}, unknown {extra}')
    return [values[d] for d in domains]


def check_proportions(proportions, domains, name='initial_proportions') -> np.ndarray:
    """Proportions as a float64 array, one per domain, non-negative and summing to 1 (+- 1e-6)."""
    p = np.asarray(per_domain(proportions, domains, name), dtype=np.float64)
    if p.shape != (len(domains),):
        raise ValueError(f'{name} has {p.size} values for {len(domains)} domains {list(domains)}')
    if (p < 0).any() or not np.isfinite(p).all():
        raise ValueError(f'{name} must be finite and non-negative, got {p.tolist()}')
    if abs(p.sum() - 1.0) > 1e-6:
        raise ValueError(f'{name} must sum to 1 (+-1e-6), got {p.sum():.8f}')
    return p  # as given (not renormalized), so checkpointed weights round-trip bit for bit


def update_weights(weights, losses, reference, update_type='doremi', clip_negative_excess=True,
                   smoothing=1e-4) -> np.ndarray:
    """One dynamic-loading step. Excess loss d = max(loss - reference, 0) (or unclipped);
    doremi: w' = normalize(w * exp(d)); then mix with the uniform: (1 - c) w' + c / k, renormalized.
    `constant` returns the weights unchanged."""
    w = np.asarray(weights, dtype=np.float64)
    if update_type == 'constant':
        return w.copy()
    if update_type != 'doremi':
        raise ValueError(f'update_type {update_type!r} is unknown; choose from {UPDATE_TYPES}')
    excess = np.asarray(losses, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    if clip_negative_excess:
        excess = np.maximum(excess, 0.0)
    logits = np.log(w) + excess
    alpha = np.exp(logits - logits.max())
    alpha /= alpha.sum()
    new = (1.0 - smoothing) * alpha + smoothing / len(w)
    return new / new.sum()
