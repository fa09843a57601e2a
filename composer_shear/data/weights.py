"""Domain weights: validation and the dynamic batch loading update (Xia et al. 2023, Algorithm 1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from composer_shear.errors import ConfigError

UPDATE_TYPES = ('doremi', 'constant')


def per_domain(values: ArrayLike | dict[str, Any], domains: Sequence[str], name: str) -> list:
    """A list in domain order from a list or a dict keyed by domain (whose keys must be exactly the domains)."""
    if not isinstance(values, dict):
        return values
    missing, extra = sorted(set(domains) - set(values)), sorted(set(values) - set(domains))
    if missing or extra:
        raise ConfigError(f'{name}: its domains differ from the streams: missing {missing}, unknown {extra}')
    return [values[d] for d in domains]


def check_proportions(proportions: ArrayLike | dict[str, float], domains: Sequence[str],
                      name: str = 'initial_proportions') -> np.ndarray:
    """Proportions as a float64 array, one per domain, non-negative and summing to 1 (+- 1e-6)."""
    p = np.asarray(per_domain(proportions, domains, name), dtype=np.float64)
    if p.shape != (len(domains),):
        raise ConfigError(f'{name} has {p.size} values for {len(domains)} domains {list(domains)}')
    if (p < 0).any() or not np.isfinite(p).all():
        raise ConfigError(f'{name} must be finite and non-negative, got {p.tolist()}')
    if abs(p.sum() - 1.0) > 1e-6:
        raise ConfigError(f'{name} must sum to 1 (+-1e-6), got {p.sum():.8f}')
    return p  # as given (not renormalized), so checkpointed weights round-trip bit for bit


def update_domain_weights(weights: ArrayLike, losses: ArrayLike, reference: ArrayLike, update_type: str = 'doremi',
                          clip_negative_excess: bool = True, smoothing: float = 1e-4) -> np.ndarray:
    """One dynamic-loading step (Xia et al. 2023, Algorithm 1), a pure function.

    Excess loss d = max(loss - reference, 0) (unclipped with ``clip_negative_excess=False``, as the reference
    code does); ``doremi``: w' = normalize(w * exp(d)), then mixed with the uniform: (1 - c) w' + c / k,
    renormalized (c = `smoothing`). ``constant`` returns the weights unchanged.

    Args:
        weights: the current domain weights (sum 1).
        losses: each domain's eval loss, in the same order.
        reference: each domain's reference loss (a scaling-law prediction or the source model's loss).
        update_type: ``doremi`` or ``constant``.
        clip_negative_excess: count a loss below its reference as 0 excess.
        smoothing: weight of the uniform mix.

    Returns:
        The new weights (float64).

    Example:
        >>> update_domain_weights([0.5, 0.5], losses=[2.5, 2.0], reference=[2.0, 2.0]).round(4)
        array([0.6224, 0.3776])
    """
    w = np.asarray(weights, dtype=np.float64)
    if update_type == 'constant':
        return w.copy()
    if update_type != 'doremi':
        raise ConfigError(f'update_type {update_type!r} is unknown; choose from {UPDATE_TYPES}')
    excess = np.asarray(losses, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    if clip_negative_excess:
        excess = np.maximum(excess, 0.0)
    logits = np.log(w) + excess
    alpha = np.exp(logits - logits.max())
    alpha /= alpha.sum()
    new = (1.0 - smoothing) * alpha + smoothing / len(w)
    return new / new.sum()
