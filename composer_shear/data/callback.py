"""DynamicLoading (YAML name `dynamic_loading`): re-weight the training domains after each evaluation."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from composer.core import Callback, State
from composer.loggers import Logger
from numpy.typing import ArrayLike

from composer_shear._io import run_folder, write_text
from composer_shear.data.weights import (
    EXCESS_TYPES,
    UPDATE_TYPES,
    check_proportions,
    numbers,
    per_domain,
    update_domain_weights,
)
from composer_shear.errors import ConfigError
from composer_shear.precision import warn_if_buffers_rounded

if TYPE_CHECKING:
    from composer_shear.data.dynamic import DynamicStreamingDataset

log = logging.getLogger(__name__)

# The paper's scaling-law reference losses for Llama-2-7B targets (domain order of the RedPajama sample).
REFERENCE_PRESETS = {
    '1.3b': {'cc': 1.9643, 'github': 0.7459, 'book': 2.1393, 'stackexchange': 1.6117, 'wiki': 1.7590,
             'arxiv': 1.4449, 'c4-rp': 2.1251},
    '2.7b': {'cc': 1.8712, 'github': 0.6883, 'book': 2.0325, 'stackexchange': 1.5353, 'wiki': 1.6297,
             'arxiv': 1.3560, 'c4-rp': 2.0328},
}
METRIC = 'LanguageCrossEntropy'
HISTORY_FILE = 'dynamic_loading.json'
# where a continued stage's mix starts: the previous stage's final weights, or `initial_proportions`
INITIAL_CHOICES = ('initial_mix', 'pruning_end')


def read_previous_stage(path: str, domains: Sequence[str]) -> dict[str, Any]:
    """The end of a previous stage from its history file (``dynamic_loading.json``, written at its end): its final
    weights and where its loader stopped. Errors name ``dynamic_loading.continue_from``."""
    name = f'dynamic_loading.continue_from ({path})'
    try:
        saved = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f'{name}: no such file; give the previous stage\'s {HISTORY_FILE}') from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f'{name} is not a readable JSON file ({e})') from e
    if not isinstance(saved, dict) or 'loader' not in saved:
        raise ConfigError(f'{name} has no loader state: the previous stage did not finish (the state is written at '
                          'its end) or was written by an older version')
    if list(saved.get('domains', [])) != list(domains):
        raise ConfigError(f'{name}: its domains {saved.get("domains")} differ from dynamic_loading.domains '
                          f'{list(domains)}')
    history = saved.get('history') or []
    saved['final'] = history[-1]['weights'] if history else saved['initial']
    return saved


def read_reference(reference: str | Sequence[float] | dict[str, float], domains: Sequence[str]) -> np.ndarray:
    """Reference losses from a list, a dict by domain, a preset name or a JSON file (written by
    `composer-shear reference-loss`)."""
    name = 'dynamic_loading.reference_loss'
    if isinstance(reference, str):
        if reference in REFERENCE_PRESETS:
            reference = REFERENCE_PRESETS[reference]
        else:
            path = Path(reference)
            if not path.exists():
                raise ConfigError(f'{name}: {reference!r} is neither a preset ({sorted(REFERENCE_PRESETS)}) '
                                 'nor an existing JSON file')
            try:
                reference = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConfigError(f'{name}: {path} is not a readable JSON file ({e})') from e
            if isinstance(reference, dict):
                reference = reference.get('losses', reference)
            name = f'{name} ({path})'
    ref = numbers(per_domain(reference, domains, name), name)
    if ref.shape != (len(domains),):
        raise ConfigError(f'{name} has {ref.size} values for {len(domains)} domains {list(domains)}')
    if not np.isfinite(ref).all():
        bad = [d for d, v in zip(domains, ref, strict=True) if not np.isfinite(v)]
        raise ConfigError(f'{name} must be finite: {bad} are {[float(v) for v in ref if not np.isfinite(v)]}')
    return ref


def interval_of(eval_interval: Any) -> Any:
    """The Composer Time an evaluator's interval function was made from (None for a custom function)."""
    import inspect

    from composer.core import Time
    try:
        found = inspect.getclosurevars(eval_interval).nonlocals.get('time_interval')
    except TypeError:
        return None
    return found if isinstance(found, Time) else None


def warn_if_too_small(ds: DynamicStreamingDataset, state: State) -> list[str]:
    """Warn, with numbers, about domains that the run will read more than once at the current proportions."""
    from composer.core import TimeUnit
    if state.max_duration is None:
        return []
    unit, value = state.max_duration.unit, state.max_duration.value
    if unit == TimeUnit.EPOCH:
        needed = value * ds.epoch_size
    elif unit == TimeUnit.BATCH:
        needed = value * ds.batch * ds.world
    elif unit == TimeUnit.SAMPLE:
        needed = value
    else:
        return []
    messages = []
    for d, w, n in zip(ds.domains, ds.proportions, ds.sizes, strict=True):
        want = w * needed
        if want > n:
            messages.append(f'{d}: ~{want:,.0f} samples wanted at proportion {w:.4f} over {needed:,} samples, '
                            f'{n:,} available ({want / n:.1f} passes)')
    if messages:
        log.warning('dynamic_loading: the data is too small for max_duration at the current proportions; these '
                    'domains will be reshuffled and read again:\n  %s', '\n  '.join(messages))
    return messages


class DynamicLoading(Callback):
    """After each evaluation, move the training mix toward the domains whose eval loss exceeds the reference
    (Xia et al. 2023, Algorithm 1), and push the new proportions to the `dynamic_text` dataset. The weights
    live in this callback's checkpointed state; every rank computes the same ones from the synced metrics.

    Per-domain losses are read from evaluators labelled with the domain names (`eval_loaders` with
    `label: <domain>`), metric LanguageCrossEntropy (token-weighted, summed over ranks). After each update rank 0
    rewrites `history_file` (default `{save_folder}/dynamic_loading.json`, else `{run_name}/dynamic_loading.json`):
    domains, reference losses, initial weights and every update's batch, losses and weights; at the end of training
    it adds where the loader stopped (``loader``: each domain's cursor, the data seed and sizes).

    A later stage (continued pre-training after export) goes on from there with ``continue_from: <that file>``: its
    loader reads each domain from where the previous stage stopped (no sequence is seen twice), and its mix starts
    from ``initial``: ``initial_mix`` (``initial_proportions``) or ``pruning_end`` (the previous stage's final
    weights).

    Example (YAML, the continued stage):
        callbacks:
          dynamic_loading:
            domains: [cc, github, book, stackexchange, wiki, arxiv, c4-rp]
            initial_proportions: [0.67, 0.045, 0.045, 0.02, 0.045, 0.025, 0.15]
            reference_loss: 1.3b
            continue_from: runs/prune/dynamic_loading.json
            initial: initial_mix
    """

    def __init__(self, domains: Iterable[str], initial_proportions: ArrayLike | dict[str, float],
                 reference_loss: str | Sequence[float] | dict[str, float], update_type: str = 'doremi',
                 clip_negative_excess: bool = True, smoothing: float = 1e-4, step_size: float = 1.0,
                 excess: str = 'absolute', max_weight: float | None = None,
                 history_file: str | None = None, continue_from: str | None = None,
                 initial: str = 'initial_mix') -> None:
        self.domains = list(domains)
        self.weights = check_proportions(initial_proportions, self.domains, 'dynamic_loading.initial_proportions')
        if initial not in INITIAL_CHOICES:
            raise ConfigError(f'dynamic_loading.initial must be one of {", ".join(INITIAL_CHOICES)}, got {initial!r}')
        if initial == 'pruning_end' and continue_from is None:
            raise ConfigError('dynamic_loading.initial: pruning_end needs continue_from (the pruning stage\'s '
                              f'{HISTORY_FILE})')
        self.continue_from, self.initial_choice = continue_from, initial
        self.previous = None if continue_from is None else read_previous_stage(continue_from, self.domains)
        if initial == 'pruning_end':
            self.weights = check_proportions(self.previous['final'], self.domains, 'dynamic_loading.continue_from')
        self.initial = self.weights.tolist()
        self.history_file = history_file
        self.reference = read_reference(reference_loss, self.domains)
        if update_type not in UPDATE_TYPES:
            raise ConfigError(f'dynamic_loading.update_type {update_type!r} is unknown; choose from {UPDATE_TYPES}')
        self.update_type = update_type
        self.clip = bool(clip_negative_excess)
        if not 0 <= smoothing < 1:
            raise ConfigError(f'dynamic_loading.smoothing must be in [0, 1), got {smoothing}')
        self.smoothing = float(smoothing)
        if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not step_size > 0:
            raise ConfigError(f'dynamic_loading.step_size must be a positive number, got {step_size!r}')
        self.step_size = float(step_size)
        if excess not in EXCESS_TYPES:
            raise ConfigError(f'dynamic_loading.excess {excess!r} is unknown; choose from {EXCESS_TYPES}')
        self.excess = excess
        if max_weight is not None and (isinstance(max_weight, bool) or not isinstance(max_weight, (int, float))
                                       or not 1 / len(self.domains) <= max_weight <= 1):
            raise ConfigError(f'dynamic_loading.max_weight must be in [1/{len(self.domains)}, 1] (one over the '
                              f'number of domains), got {max_weight!r}')
        self.max_weight = None if max_weight is None else float(max_weight)
        self.history: list[dict] = []  # [{'batch', 'weights', 'losses'}]
        self._loader_end: dict | None = None  # where the loader stopped (fit_end), for a later stage

    def _dataset(self, state: State) -> DynamicStreamingDataset:
        ds = getattr(state.train_dataloader, 'dataset', None)
        if ds is None or not hasattr(ds, 'set_proportions'):
            raise ConfigError('dynamic_loading needs the dynamic_text train loader')
        if list(ds.domains) != self.domains:
            raise ConfigError(f'dynamic_loading.domains {self.domains} differ from the train loader\'s '
                             f'domains {list(ds.domains)}')
        return ds

    def init(self, state: State, logger: Logger) -> None:
        warn_if_buffers_rounded(state)  # continued pre-training has no other part of this package to say it

    def fit_start(self, state: State, logger: Logger) -> None:
        """Check that the domains are evaluated once per loader interval, push the current weights to the train
        dataset (and, for a fresh run with `continue_from`, the previous stage's cursors) and warn about domains too
        small for the run."""
        ds = self._dataset(state)
        self._check_eval_interval(state, ds)
        if self.previous is not None and int(state.timestamp.batch) == 0:  # a resumed run has its own cursors
            self._carry_on(ds)
        ds.set_proportions(self.weights)
        warn_if_too_small(ds, state)

    def _carry_on(self, ds: DynamicStreamingDataset) -> None:
        """Start the loader where the previous stage's stopped: the same permutations (data seed and domain sizes
        must match), each domain's cursor where it was."""
        loader, name = self.previous['loader'], f'dynamic_loading.continue_from ({self.continue_from})'
        if int(loader['seed']) != ds.seed:
            raise ConfigError(f'{name}: the previous stage read the data with train_loader.dataset.seed '
                              f'{loader["seed"]}, this one with {ds.seed}: set the same seed, or the cursors mean '
                              'other sequences')
        if list(loader['sizes']) != list(ds.sizes):
            raise ConfigError(f'{name}: the previous stage\'s domains held {loader["sizes"]} samples, this data '
                              f'{ds.sizes}: continue on the same prepared data')
        ds.carry_on(loader['cursor'], int(loader['epoch']))
        log.info('dynamic_loading: continuing the previous stage\'s data at %s (mix: %s)',
                 dict(zip(self.domains, loader['cursor']['offsets'], strict=True)), self.initial_choice)

    def fit_end(self, state: State, logger: Logger) -> None:
        """Record where the loader stopped in the history file, for a later stage's `continue_from`."""
        ds = self._dataset(state)
        end = ds.state_dict(0)
        self._loader_end = {'seed': ds.seed, 'sizes': list(ds.sizes), 'epoch': int(end['epoch']),
                            'cursor': end['cursor']}
        self.write_history(state)

    @staticmethod
    def _batches_per_interval(ds: DynamicStreamingDataset) -> int:
        return ds.epoch_size // (ds.world * ds.batch)

    def _check_eval_interval(self, state: State, ds: DynamicStreamingDataset) -> None:
        """Each re-weighting must see the losses of one whole loader interval: the domains' evaluators must run
        every epoch (the loader's interval) or every as many batches or samples."""
        from composer.core import TimeUnit
        n = self._batches_per_interval(ds)
        for evaluator in state.evaluators:
            if evaluator.label not in self.domains:
                continue
            t = interval_of(evaluator.eval_interval)
            if t is None:
                continue  # a custom function: checked at each evaluation instead
            if (t.unit, t.value) not in ((TimeUnit.EPOCH, 1), (TimeUnit.BATCH, n), (TimeUnit.SAMPLE, ds.epoch_size)):
                raise ConfigError(f'eval_interval {t} of evaluator {evaluator.label!r} differs from the dynamic_text '
                                  f'interval of {n} batches (dataset.epoch_size {ds.epoch_size} / global batch '
                                  f'{ds.world * ds.batch}): set eval_interval: 1ep, so that each re-weighting '
                                  'follows one interval')

    def eval_after_all(self, state: State, logger: Logger) -> None:
        """Update the weights from the per-domain eval losses, push them to the dataset and log them."""
        if not state.eval_metrics:
            return
        ds = self._dataset(state)
        n, batch = self._batches_per_interval(ds), int(state.timestamp.batch)
        elapsed = state.get_elapsed_duration()
        if batch % n and (elapsed is None or elapsed < 1):  # the end-of-training evaluation may fall mid-interval
            raise ConfigError(f'dynamic_loading: an evaluation at batch {batch} falls inside a dynamic_text interval '
                              f'of {n} batches: set eval_interval: 1ep')
        losses = []
        for d in self.domains:
            metrics = state.eval_metrics.get(f'eval/{d}') or state.eval_metrics.get(d)
            if not metrics or METRIC not in metrics:
                raise ConfigError(f'dynamic_loading: no eval loader labelled {d!r} with {METRIC}')
            losses.append(float(metrics[METRIC].compute()))
        self.weights = update_domain_weights(self.weights, losses, self.reference, self.update_type, self.clip,
                                             self.smoothing, self.step_size, self.excess, self.max_weight)
        self.history.append({'batch': int(state.timestamp.batch), 'losses': losses, 'weights': self.weights.tolist()})
        ds.set_proportions(self.weights)
        self.write_history(state)
        logger.log_metrics({f'metrics/dynamic_loading/{d}_excess_loss': loss - r
                            for d, loss, r in zip(self.domains, losses, self.reference, strict=True)})

    def write_history(self, state: State) -> None:
        """Rank 0 writes the weight history as JSON (replaced atomically at each update)."""
        from composer.utils import dist
        if dist.get_global_rank() != 0:
            return
        path = Path(self.history_file) if self.history_file else run_folder(state, None, HISTORY_FILE)
        saved = {'domains': self.domains, 'reference_loss': self.reference.tolist(), 'update_type': self.update_type,
                 'step_size': self.step_size, 'excess': self.excess, 'max_weight': self.max_weight,
                 'initial': self.initial, 'history': self.history}
        if self._loader_end is not None:
            saved['loader'] = self._loader_end
        write_text(path, json.dumps(saved, indent=1))

    def batch_end(self, state: State, logger: Logger) -> None:
        """Log the current domain weights."""
        logger.log_metrics({f'metrics/train/{d}_weight': float(w) for d, w in zip(self.domains, self.weights,
                                                                                   strict=True)})

    def state_dict(self) -> dict[str, Any]:
        """The weights and their update history (checkpointed). The history is one JSON string: a sharded
        checkpoint stores each entry of a nested list as its own key, and a run resumed with an empty history would
        then ask for a key the checkpoint lacks."""
        return {'weights': self.weights.tolist(), 'history': json.dumps(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the weights and history of `state_dict` (a list: a checkpoint of an earlier version)."""
        self.weights = check_proportions(state['weights'], self.domains, 'checkpointed weights')
        history = state.get('history', [])
        self.history = json.loads(history) if isinstance(history, str) else list(history)
