"""One learning-rate schedule over several runs (YAML scheduler name ``staged_cosine_with_warmup``).

The pruning stage and the continued pre-training after export are separate Composer runs (the model changes shape
in between), but the weights should see one warm-up and one decay over the whole token budget, as a recipe that
never stops would. Each stage names the schedule over the whole budget and where it starts in it::

    # pruning stage: steps 0-99 of a 300-step schedule
    scheduler: {name: staged_cosine_with_warmup, t_warmup: 30ba, t_max: 300ba, alpha_f: 0.1}
    # continued stage: steps 100-299 of the same schedule
    scheduler: {name: staged_cosine_with_warmup, t_warmup: 30ba, t_max: 300ba, alpha_f: 0.1, t_start: 100ba}

With ``t_start: 0ba`` and ``t_max`` equal to the run's duration it is Composer's ``cosine_with_warmup``.
"""

from __future__ import annotations

import math

from composer.core import State, Time, TimeUnit
from composer.optim import ComposerScheduler

from composer_shear.errors import ConfigError

__all__ = ['StagedCosineWithWarmup', 'staged_cosine']


def staged_cosine(step: int, t_warmup: int, t_max: int, alpha_f: float) -> float:
    """The multiplier of the learning rate at global step `step`: linear from 0 over `t_warmup` steps, then a
    cosine from 1 down to `alpha_f` at `t_max` (held there after).

    Example:
        >>> staged_cosine(15, t_warmup=30, t_max=300, alpha_f=0.1)
        0.5
    """
    if step < t_warmup:
        return step / t_warmup
    frac = min(1.0, (step - t_warmup) / (t_max - t_warmup)) if t_max > t_warmup else 1.0
    return alpha_f + (1 - alpha_f) * 0.5 * (1 + math.cos(math.pi * frac))


def _batches(value: str | int, key: str) -> int:
    """A Composer time in batches (`300ba`, or an int), named in the error otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = f'{value}ba'
    try:
        t = Time.from_timestring(str(value))
    except Exception as e:
        raise ConfigError(f'scheduler.{key} {value!r} is not a Composer time such as 300ba') from e
    if t.unit != TimeUnit.BATCH:
        raise ConfigError(f'scheduler.{key} must be in batches (e.g. 300ba), got {value!r}: a fraction of one '
                          'stage\'s duration cannot describe a schedule over several stages')
    return int(t.value)


class StagedCosineWithWarmup(ComposerScheduler):
    """Cosine decay with linear warm-up over `t_max` batches of several runs, of which this run is the part that
    starts at batch `t_start`.

    Args:
        t_warmup: warm-up length over the whole schedule (batches, e.g. ``30ba``).
        t_max: length of the whole schedule (batches): every stage's duration together.
        alpha_f: final multiplier.
        t_start: where this run starts in the schedule (``0ba`` for the first stage).

    Example:
        >>> from composer import Trainer
        >>> sched = StagedCosineWithWarmup(t_warmup='30ba', t_max='300ba', t_start='100ba')
        >>> trainer = Trainer(..., schedulers=sched, max_duration='200ba')
    """

    def __init__(self, t_warmup: str | int, t_max: str | int, alpha_f: float = 0.0, t_start: str | int = '0ba') -> None:
        self.t_warmup, self.t_max = _batches(t_warmup, 't_warmup'), _batches(t_max, 't_max')
        self.t_start = _batches(t_start, 't_start')
        if not 0 <= self.t_warmup <= self.t_max or self.t_max <= 0:
            raise ConfigError(f'scheduler: need 0 <= t_warmup ({self.t_warmup}ba) <= t_max ({self.t_max}ba), '
                              't_max > 0')
        if not 0 <= self.t_start < self.t_max:
            raise ConfigError(f'scheduler.t_start {self.t_start}ba must lie in the schedule [0, {self.t_max}ba)')
        if isinstance(alpha_f, bool) or not isinstance(alpha_f, (int, float)) or not 0 <= alpha_f <= 1:
            raise ConfigError(f'scheduler.alpha_f must be in [0, 1], got {alpha_f!r}')
        self.alpha_f = float(alpha_f)

    def __call__(self, state: State, ssr: float = 1.0) -> float:
        step = self.t_start + int(state.timestamp.batch)
        end = state.max_duration
        if end is not None and end.unit == TimeUnit.BATCH and self.t_start + end.value > self.t_max:
            raise ConfigError(f'scheduler: this stage runs to batch {self.t_start + end.value} of the schedule '
                              f'(t_start {self.t_start}ba + max_duration {end}), past t_max {self.t_max}ba')
        if self.t_start and int(state.timestamp.batch) == 0 and not any(o.state for o in state.optimizers or ()):
            # Composer sets the rate for step k + 1 from timestamp k (after step k), so a run's steps use f(0), f(0),
            # f(1), ...: before this stage's first step an uninterrupted run would be at f(t_start - 1)
            step -= 1
        return staged_cosine(step, self.t_warmup, self.t_max, self.alpha_f)
