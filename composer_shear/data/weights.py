"""Domain weights: validation and the dynamic batch loading update (Xia et al. 2023, Algorithm 1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from composer_shear.errors import ConfigError

UPDATE_TYPES = ('doremi', 'constant')
EXCESS_TYPES = ('absolute', 'relative')


def per_domain(values: ArrayLike | dict[str, Any], domains: Sequence[str], name: str) -> list:
    """A list in domain order from a list or a dict keyed by domain (whose keys must be exactly the domains)."""
    if not isinstance(values, dict):
        return values
    missing, extra = sorted(set(domains) - set(values)), sorted(set(values) - set(domains))
    if missing or extra:
        raise ConfigError(f'{name}: its domains differ from the streams: missing {missing}, unknown {extra}')
    return [values[d] for d in domains]


def numbers(values: Sequence[Any], name: str) -> np.ndarray:
    """`values` as float64, each a real number (not a string or a bool), else an error naming `name`."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise ConfigError(f'{name} must be a list of numbers (or a dict by domain), got {values!r}')
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating):
            raise ConfigError(f'{name} must hold numbers, got {v!r} ({type(v).__name__})')
    return np.asarray(list(values), dtype=np.float64)


def check_proportions(proportions: ArrayLike | dict[str, float], domains: Sequence[str],
                      name: str = 'initial_proportions') -> np.ndarray:
    """Proportions as a float64 array, one per domain, non-negative and summing to 1 (+- 1e-6)."""
    p = numbers(per_domain(proportions, domains, name), name)
    if p.shape != (len(domains),):
        raise ConfigError(f'{name} has {p.size} values for {len(domains)} domains {list(domains)}')
    if (p < 0).any() or not np.isfinite(p).all():
        raise ConfigError(f'{name} must be finite and non-negative, got {p.tolist()}')
    if abs(p.sum() - 1.0) > 1e-6:
        raise ConfigError(f'{name} must sum to 1 (+-1e-6), got {p.sum():.8f}')
    return p  # as given (not renormalized), so checkpointed weights round-trip bit for bit


def update_domain_weights(weights: ArrayLike, losses: ArrayLike, reference: ArrayLike, update_type: str = 'doremi',
                          clip_negative_excess: bool = True, smoothing: float = 1e-4, step_size: float = 1.0,
                          excess: str = 'absolute', max_weight: float | None = None) -> np.ndarray:
    """One dynamic-loading step (Xia et al. 2023, Algorithm 1), a pure function.

    Excess loss d = loss - reference (``excess='relative'``: minus its mean over domains, so that only the domains
    that degraded more than the average gain weight), clipped at 0 unless ``clip_negative_excess=False`` (as the
    reference code does); ``doremi``: w' = normalize(w * exp(step_size * d)), mixed with the uniform:
    (1 - c) w' + c / k, renormalized (c = `smoothing`); with `max_weight`, no domain ends above it (what a capped
    domain loses is shared by the others in proportion to their weights). ``constant`` returns the weights
    unchanged. The defaults are the paper's rule.

    Args:
        weights: the current domain weights (sum 1).
        losses: each domain's eval loss, in the same order.
        reference: each domain's reference loss (a scaling-law prediction or the source model's loss).
        update_type: ``doremi`` or ``constant``.
        clip_negative_excess: count a negative excess as 0.
        smoothing: weight of the uniform mix.
        step_size: eta, the multiplier of the excess in the exponent (the paper: 1).
        excess: ``absolute`` (the paper) or ``relative`` (to the mean excess over domains).
        max_weight: the largest weight any domain may get, in [1/k, 1] (None: no cap).

    Returns:
        The new weights (float64).

    Example:
        >>> update_domain_weights([0.5, 0.5], losses=[2.5, 2.0], reference=[2.0, 2.0]).round(4)
        array([0.6224, 0.3776])
        >>> update_domain_weights([0.5, 0.5], losses=[2.5, 2.0], reference=[2.0, 2.0], max_weight=0.55).round(4)
        array([0.55, 0.45])
    """
    w = np.asarray(weights, dtype=np.float64)
    if update_type == 'constant':
        return w.copy()
    if update_type != 'doremi':
        raise ConfigError(f'update_type {update_type!r} is unknown; choose from {UPDATE_TYPES}')
    d = np.asarray(losses, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    if excess == 'relative':
        d = d - d.mean()
    elif excess != 'absolute':
        raise ConfigError(f'excess {excess!r} is unknown; choose from {EXCESS_TYPES}')
    if clip_negative_excess:
        d = np.maximum(d, 0.0)
    logits = np.log(w) + step_size * d
    alpha = np.exp(logits - logits.max())
    alpha /= alpha.sum()
    new = (1.0 - smoothing) * alpha + smoothing / len(w)
    new = new / new.sum()
    return new if max_weight is None else cap_weights(new, max_weight)


def cap_weights(weights: ArrayLike, max_weight: float) -> np.ndarray:
    """`weights` (sum 1) with none above `max_weight`: each capped domain's surplus goes to the uncapped ones in
    proportion to their weights, repeated until none exceeds the cap (at most k rounds).

    Example:
        >>> cap_weights([0.9, 0.08, 0.02], 0.5).round(4)
        array([0.5, 0.4, 0.1])
    """
    w = np.asarray(weights, dtype=np.float64).copy()
    if max_weight * len(w) < 1 - 1e-12:
        raise ConfigError(f'max_weight {max_weight} is below 1/{len(w)}: the weights could not sum to 1')
    capped = np.zeros(len(w), dtype=bool)
    for _ in range(len(w)):
        over = (w > max_weight) & ~capped
        if not over.any():
            break
        capped |= over
        free = 1.0 - max_weight * capped.sum()
        rest = w[~capped]
        w[capped] = max_weight
        if rest.size:
            w[~capped] = rest / rest.sum() * free if rest.sum() > 0 else free / rest.size
    return w
