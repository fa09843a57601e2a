"""ShearPruning: targeted structured pruning as a Composer Algorithm (YAML name ``shear_pruning``).

Plumbing over :mod:`composer_shear.functional`: masks are attached at ``INIT`` (and, with ``init.from:
activations``, set from the first training batch's activation ranking at its ``BATCH_START``), drawn at
``BEFORE_FORWARD``,
their Lagrangian added to the loss at ``AFTER_LOSS``, deterministic masks installed at ``EVAL_START`` and the
logits clamped at ``BATCH_END``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger
from torch import nn

from composer_shear.budget import BUDGET_KINDS, Budget, SearchSpace, candidate_shapes, describe_shape, parse_target
from composer_shear.errors import ConfigError, ShapeError
from composer_shear.functional import (
    MULTIPLIER_UPDATES,
    apply_shear_pruning,
    ascend_multipliers,
    clamp_masks,
    hf_model_of,
    init_masks_from_importance,
    sample_masks,
    set_eval_masks,
    settle_masks,
)
from composer_shear.masks import (
    DEFAULT_MASK_VALUES,
    LOG_ALPHA_MAX,
    MASK_VALUES,
    MASKS_ATTR,
    ShearMasks,
    refresh_fp32,
    target_from_buffer,
)
from composer_shear.precision import warn_if_buffers_rounded
from composer_shear.search import masks_to_hold, score_masked, spread
from composer_shear.shapes import PRUNING_MODULES, ModelShape, validate_pruning_modules

log = logging.getLogger(__name__)

__all__ = ['ShearPruning']

INIT_KEYS = ('from', 'batches', 'log_alpha', 'noise', 'seed')
SEARCH_KEYS = ('max_candidates', 'held_out_batches', 'multiple_of', 'tolerance', 'max_depth_pruning',
               'max_width_pruning')
INIT_FROM = ('constant', 'activations')
MASK_LR_SCHEDULES = ('model', 'constant')


def unwrap(model: nn.Module) -> nn.Module:
    """The ComposerModel inside a DDP wrapper."""
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


class ShearPruning(Algorithm):
    """Learn hard-concrete masks over layers, hidden dims, attention heads (GQA-aware) and MLP channels,
    constrained by Lagrange multipliers to reach an exact target shape.

    Args:
        target: HF config field names (num_hidden_layers, hidden_size, num_attention_heads,
            num_key_value_heads, intermediate_size) or ``{'preset': '1.3b'|'2.7b'|'370m'}``, or a parameter
            budget: ``{params: 75M}`` / ``{non_embedding_params: 50M}``, optionally with fields to fix. A budget is
            resolved at the first step by the shape search of ``composer-shear prune`` (every candidate's one-shot
            selection scored through the masked model on the run's first batches, identically on every rank), the
            masks then start at the chosen shape's one-shot selection (``init.from: activations`` is implied), and
            the choice is stored in the checkpoint, so a resumed run does not search again.
        search: the budget search's settings: ``max_candidates`` (16), ``held_out_batches`` (1; the global batches
            after the ``init.batches`` ones, read ahead: needs the ``dynamic_text`` loader), ``multiple_of`` (64),
            ``tolerance`` (0.05), ``max_depth_pruning`` and ``max_width_pruning`` (0.5).
        pruning_modules: any subset of layer, head, intermediate, hidden.
        lag_lr: learning rate of the masks (+) and of the multipliers (-, gradient ascent).
        lagrangian_warmup: time over which the target sparsities rise linearly from 0 (e.g. '640ba', '0.2dur').
        eval_target_shape: evaluate with exactly-target masks (else the expected count per row).
        mask_lr_schedule: ``model`` (the paper's: the mask and multiplier learning rates follow the run's
            scheduler, so they are 0 at step 1 under a warm-up) or ``constant`` (``lag_lr`` at every step).
        multiplier_update: ``adam`` (the paper's: the multipliers are an optimizer group at ``-lag_lr``) or
            ``ascent`` (plain gradient ascent after each optimizer step, at the masks' learning rate).
        mask_values: the value kept entries take in deterministic masks, at evaluation and in the export:
            ``binary`` (1; the default, measured better right after export) or ``soft`` (the paper's).
        init: ``from``: ``constant`` (the paper's: every log alpha at ``log_alpha``, default ln 100, plus
            Gaussian ``noise`` of that std, default 0, drawn with ``seed``, identical on every rank) or
            ``activations`` (at the first step, the one-shot activation ranking of the run's first ``batches``
            global batches, default 1, all ranks' statistics summed, sets the masks so that they select what
            ``prune_oneshot`` would and the expected shape is already the target; the target then applies from step
            0, without warm-up; a resumed run does not recompute it; ``batches`` above 1 needs the ``dynamic_text``
            loader, which reads them ahead without consuming them).
        settle: the length of a settled phase at the end of the run (a Composer time: ``0.2dur``, ``40ba``;
            default none): the masks are fixed at the exact-target selection with their export values (no
            sampling, no Lagrangian, mask and multiplier learning rates 0), so the run trains exactly the
            sub-network export keeps, and export changes nothing.
        log_alpha_max: the mask logits' range [-log_alpha_max, log_alpha_max] (default ln 100, the paper's). Wider
            (e.g. 9.21, ln 1e4) lets the kept entries of an ``init.from: activations`` start sit near certainty
            while the Lagrangian is satisfied: at ln 100 a kept KV group is below 0.5 on about 11 % of draws,
            at ln 1e4 on 0.1 % (logged as ``pruning/kept_below_half/<structure>``).

    Example:
        >>> from composer import Trainer
        >>> pruning = ShearPruning(target={'preset': '1.3b'}, lagrangian_warmup='640ba')
        >>> trainer = Trainer(model=composer_model, algorithms=[pruning], max_duration='3200ba', ...)
    """

    def __init__(self, target: Mapping[str, Any] | str | None = None,
                 pruning_modules: Sequence[str] = PRUNING_MODULES, lag_lr: float = 1.0,
                 search: Mapping[str, Any] | None = None,
                 lagrangian_warmup: str = '0.2dur', eval_target_shape: bool = False,
                 init: Mapping[str, Any] | None = None, mask_lr_schedule: str = 'model',
                 mask_values: str = DEFAULT_MASK_VALUES, multiplier_update: str = 'adam',
                 settle: str | None = None, log_alpha_max: float = LOG_ALPHA_MAX) -> None:
        if target is None:
            raise ConfigError('shear_pruning.target is required (HF config fields or preset: 1.3b|2.7b|370m)')
        self.target = dict(target) if isinstance(target, Mapping) else target
        try:
            self.pruning_modules = validate_pruning_modules(pruning_modules)
        except ShapeError as e:
            raise ConfigError(f'shear_pruning.{e}') from None
        self.budget = self._read_budget(target)
        self.search = self._read_search(search)
        if isinstance(lag_lr, bool) or not isinstance(lag_lr, (int, float)) or lag_lr <= 0:
            raise ConfigError(f'shear_pruning.lag_lr must be a positive number, got {lag_lr!r}')
        self.lag_lr = float(lag_lr)
        try:
            self.warmup = Time.from_timestring(str(lagrangian_warmup))
        except Exception as e:
            raise ConfigError(f'shear_pruning.lagrangian_warmup {lagrangian_warmup!r} is not a Composer time '
                              f'string (e.g. 640ba, 0.2dur)') from e
        self.eval_target_shape = bool(eval_target_shape)
        init = dict(init or {})
        unknown = sorted(set(init) - set(INIT_KEYS))
        if unknown:
            raise ConfigError(f'shear_pruning.init.{unknown[0]} is unknown; valid keys: {", ".join(INIT_KEYS)}')
        if self.budget is not None:
            if init.get('from', 'activations') != 'activations':
                raise ConfigError('shear_pruning.init.from must be activations with a budget target (the search '
                                  'ranks the structures from them)')
            init['from'] = 'activations'
        self.init = {'from': 'constant', 'batches': 1, 'log_alpha': LOG_ALPHA_MAX, 'noise': 0.0, 'seed': 0, **init}
        if self.init['from'] not in INIT_FROM:
            raise ConfigError(f'shear_pruning.init.from must be one of {", ".join(INIT_FROM)}, '
                              f'got {self.init["from"]!r}')
        if isinstance(self.init['batches'], bool) or not isinstance(self.init['batches'], int) \
                or self.init['batches'] < 1:
            raise ConfigError(f'shear_pruning.init.batches must be a positive integer, got {self.init["batches"]!r}')
        self._initialized = self.init['from'] == 'constant'  # activations: at the first BATCH_START
        if mask_lr_schedule not in MASK_LR_SCHEDULES:
            raise ConfigError(f'shear_pruning.mask_lr_schedule must be one of {", ".join(MASK_LR_SCHEDULES)}, '
                              f'got {mask_lr_schedule!r}')
        self.mask_lr_schedule = mask_lr_schedule
        if mask_values not in MASK_VALUES:
            raise ConfigError(f'shear_pruning.mask_values must be one of {", ".join(MASK_VALUES)}, '
                              f'got {mask_values!r}')
        self.mask_values = mask_values
        if multiplier_update not in MULTIPLIER_UPDATES:
            raise ConfigError(f'shear_pruning.multiplier_update must be one of {", ".join(MULTIPLIER_UPDATES)}, '
                              f'got {multiplier_update!r}')
        self.multiplier_update = multiplier_update
        self.settle = None
        if settle is not None:
            try:
                self.settle = Time.from_timestring(str(settle))
            except Exception as e:
                raise ConfigError(f'shear_pruning.settle {settle!r} is not a Composer time string (e.g. 0.2dur, '
                                  '40ba)') from e
            if self.settle.unit not in (TimeUnit.DURATION, TimeUnit.BATCH) or self.settle.value < 0 \
                    or (self.settle.unit == TimeUnit.DURATION and self.settle.value >= 1):
                raise ConfigError(f'shear_pruning.settle must be batches (40ba) or a fraction of the run below 1 '
                                  f'(0.2dur), got {settle!r}')
        if isinstance(log_alpha_max, bool) or not isinstance(log_alpha_max, (int, float)) \
                or not 0 < log_alpha_max < float('inf'):
            raise ConfigError(f'shear_pruning.log_alpha_max must be a positive number, got {log_alpha_max!r}')
        self.log_alpha_max = float(log_alpha_max)
        self._settled = False
        self._settle_from: int | None = None  # the first settled batch, when the run's length is known in batches
        self.source: ModelShape | None = None
        self.target_shape: ModelShape | None = None
        self.searched: dict[str, Any] | None = None  # the budget search's result (in the checkpoint)
        self._candidates: list[ModelShape] = []
        self.stats: dict[str, torch.Tensor] = {}
        self._lag: torch.Tensor | None = None
        self._microbatch = 0

    @staticmethod
    def _read_budget(target: Mapping[str, Any] | str) -> Budget | None:
        """The target's budget, or None for a shape; ConfigError naming a bad key or value."""
        if isinstance(target, Mapping) and not any(k in target for k in BUDGET_KINDS):
            return None
        if isinstance(target, str) and '=' not in target:  # a preset name
            return None
        try:
            parsed = parse_target(target)
        except ShapeError as e:
            raise ConfigError(f'shear_pruning.{e}' if str(e).startswith('target') else f'shear_pruning.target: {e}'
                              ) from None
        return parsed if isinstance(parsed, Budget) else None

    def _read_search(self, search: Mapping[str, Any] | None) -> dict[str, Any]:
        search = dict(search or {})
        if search and self.budget is None:
            raise ConfigError('shear_pruning.search applies to a budget target (target: {params: ...})')
        unknown = sorted(set(search) - set(SEARCH_KEYS))
        if unknown:
            raise ConfigError(f'shear_pruning.search.{unknown[0]} is unknown; valid keys: {", ".join(SEARCH_KEYS)}')
        search = {'max_candidates': 16, 'held_out_batches': 1, **search}
        for key in ('max_candidates', 'held_out_batches'):
            value = search[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f'shear_pruning.search.{key} must be a positive integer, got {value!r}')
        try:
            self._space(search).check()
        except ShapeError as e:
            raise ConfigError(f'shear_pruning.search.{e}') from None
        return search

    def _space(self, search: Mapping[str, Any] | None = None) -> SearchSpace:
        search = self.search if search is None else search
        return SearchSpace(**{k: v for k, v in search.items() if k not in ('max_candidates', 'held_out_batches')},
                           pruning_modules=self.pruning_modules)

    def __repr__(self) -> str:
        return (f'ShearPruning(target={self.target!r}, pruning_modules={list(self.pruning_modules)}, '
                f'lag_lr={self.lag_lr}, lagrangian_warmup={self.warmup}, init={self.init}, '
                f'mask_lr_schedule={self.mask_lr_schedule!r}, mask_values={self.mask_values!r}, '
                f'multiplier_update={self.multiplier_update!r}, settle={self.settle}, '
                f'log_alpha_max={self.log_alpha_max})')

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.FIT_START, Event.BATCH_START, Event.BEFORE_FORWARD, Event.AFTER_LOSS,
                         Event.EVAL_START, Event.AFTER_TRAIN_BATCH, Event.BATCH_END)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._attach(state)
        elif event == Event.FIT_START:  # after wrapping and any checkpoint load: the fp32 values the forward reads
            if self.budget is not None:
                self._follow_buffer(state)
            refresh_fp32(self.masks(state))  # (then clamp_masks at each BATCH_END, the init after its copy)
            self._plan_settle(state)
        elif event == Event.BATCH_START:
            self._microbatch = 0
            if not self._initialized:
                self._init_from_activations(state)
            if self.settled(state):
                self._freeze_masks(state)
            elif self.mask_lr_schedule == 'constant':
                self._constant_mask_lr(state)
        elif event == Event.BEFORE_FORWARD:
            if self.settled(state):
                self._lag, self.stats = settle_masks(self.masks(state), self.progress(state))
            else:
                self._lag, self.stats = sample_masks(self.masks(state), self.progress(state), self._noise(state))
            self._microbatch += 1
        elif event == Event.AFTER_LOSS:
            self._add_lagrangian(state)
        elif event == Event.AFTER_TRAIN_BATCH:
            if self.multiplier_update == 'ascent' and not self.settled(state):
                ascend_multipliers(self.masks(state), self._mask_lr(state))
        elif event == Event.EVAL_START:
            refresh_fp32(self.masks(state))
            set_eval_masks(self.masks(state), exact_target=self.eval_target_shape)
        elif event == Event.BATCH_END:
            clamp_masks(self.masks(state))

    @staticmethod
    def masks(state: State) -> ShearMasks:
        """The run's mask module (or its FSDP wrapper)."""
        return getattr(unwrap(state.model), MASKS_ATTR)

    def _noise_key(self, state: State) -> list[int]:
        """What the mask noise is drawn from: the seed, this rank, the step and the microbatch."""
        from composer.utils import dist
        return [state.rank_zero_seed, dist.get_global_rank(), int(state.timestamp.batch), self._microbatch]

    def _noise(self, state: State) -> torch.Generator:
        """The mask noise of this rank, step and microbatch: a function of them alone (not of a global RNG
        stream), so a resumed run draws exactly the masks an uninterrupted run draws."""
        key = self._noise_key(state)
        return torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1))

    def _init_from_activations(self, state: State) -> None:
        """Set the masks from the activation ranking of this step's global batch (masks off, no gradients)."""
        from composer.core.precision import get_precision_context
        from composer.utils import dist

        from composer_shear.oneshot import importance
        self._initialized = True
        if int(state.timestamp.batch) > 0:  # a checkpoint from before this option was recorded: keep its masks
            log.warning('shear_pruning: init.from activations skipped, the run resumes at batch %d',
                        int(state.timestamp.batch))
            return
        n = self.init['batches']
        m = self.search['held_out_batches'] if self.budget is not None else 0
        if n + m == 1:
            batches = [state.batch['input_ids']]
        else:  # the run's own first n (+ m) batches, read ahead without consuming them
            dataset = getattr(state.dataloader, 'dataset', None)
            if not hasattr(dataset, 'peek'):
                if m:
                    raise ConfigError(f'shear_pruning.target: a budget reads {n} + {m} batches ahead (init.batches + '
                                      'search.held_out_batches), which needs the dynamic_text train loader; with '
                                      f'{type(dataset).__name__} give a shape target')
                raise ConfigError(f'shear_pruning.init.batches: {n} needs the dynamic_text train loader (it reads '
                                  f'the first batches ahead); with {type(dataset).__name__} use batches: 1')
            batches = [state.device.tensor_to_device(b['input_ids']) for b in dataset.peek(n + m)]
        batches, held_out = batches[:n], batches[n:]
        masks = self.masks(state)
        masks.hooks.set(None)

        def forward(ids: torch.Tensor) -> Any:
            with get_precision_context(state.precision, state.precision_config):
                return state.model({'input_ids': ids, 'attention_mask': torch.ones_like(ids)})

        def reduce(t: torch.Tensor) -> torch.Tensor:
            t = state.device.tensor_to_device(t.clone())
            dist.all_reduce(t)
            return t.cpu()

        scores = importance(hf_model_of(unwrap(state.model)), batches, forward, reduce)
        if self.budget is not None:
            self._search(state, masks, scores, held_out, forward, reduce)
        sparsity = init_masks_from_importance(masks, scores)
        log.info('shear_pruning: masks initialised from the activations of %d sequences per rank; expected '
                 'sparsity %s', sum(len(b) for b in batches), {k: round(v, 4) for k, v in sparsity.items()})

    def _search(self, state: State, masks: nn.Module, scores: Mapping[str, torch.Tensor],
                held_out: Sequence[torch.Tensor], forward: Any, reduce: Any) -> None:
        """Score every candidate through the masked model, aim the masks at the best (ties: the first)."""
        import time
        start = time.perf_counter()
        model = state.model
        training = model.training
        model.eval()
        try:
            losses = score_masked(masks, self._candidates, scores, held_out, forward, reduce)
        finally:
            model.train(training)
        best = min(range(len(losses)), key=lambda i: losses[i])
        shape = self._candidates[best]
        self._retarget(masks, shape)
        from composer.utils import dist
        # the mean over ranks, so that every rank records (and checkpoints) the same search
        seconds = float(reduce(torch.tensor([time.perf_counter() - start], dtype=torch.float64))[0])
        self.searched = {'budget': self.budget.describe(), 'shape': shape.target_dict(), 'params': shape.num_params(),
                         'loss': losses[best], 'seconds': round(seconds / dist.get_world_size(), 2),
                         'candidates': [c.target_dict() | {'params': c.num_params(), 'loss': loss}
                                        for c, loss in zip(self._candidates, losses, strict=True)]}
        log.info('shear_pruning: searched %d shapes under %s; chose %s (%d parameters, held-out loss %.4f)',
                 len(losses), self.budget.describe(), describe_shape(shape), shape.num_params(), losses[best])

    def _retarget(self, masks: nn.Module, shape: ModelShape) -> None:
        module = getattr(masks, 'module', masks)  # an FSDP1 wrapper holds the ShearMasks as .module
        module.retarget(shape)
        self.target_shape = shape

    def _follow_buffer(self, state: State) -> None:
        """After a checkpoint load: aim the masks at the shape the stored search chose (their target buffer)."""
        masks = self.masks(state)
        module = getattr(masks, 'module', masks)
        stored = target_from_buffer(module.source, module.target_shape.cpu())
        if stored != module.target:
            self._retarget(masks, stored)

    @staticmethod
    def _groups_of(state: State, params: Iterable[torch.Tensor]) -> list[dict[str, Any]]:
        """The optimizer param groups holding any of `params`."""
        ids = {id(p) for p in params}
        return [g for opt in state.optimizers for g in opt.param_groups if any(id(p) in ids for p in g['params'])]

    def _mask_lr(self, state: State) -> float:
        """The learning rate the mask logits stepped with in this batch (lag_lr times the schedule, or lag_lr)."""
        groups = self._groups_of(state, self.masks(state).log_alpha.values())
        return abs(float(groups[0]['lr'])) if groups else 0.0  # no optimizer: nothing is trained

    def _plan_settle(self, state: State) -> None:
        """The first settled batch, from the run's length in batches (max_duration in batches, or in epochs of a
        loader of known length); checked before the first step."""
        if self.settle is None:
            return
        end = state.max_duration
        total = None
        if end is not None and end.unit == TimeUnit.BATCH:
            total = int(end.value)
        elif end is not None and end.unit == TimeUnit.EPOCH and state.dataloader_len is not None:
            total = int(end.value) * int(state.dataloader_len)
        if self.settle.unit == TimeUnit.BATCH:
            if total is None:
                raise ConfigError(f'shear_pruning.settle {self.settle} in batches needs the run\'s length in batches '
                                  f'(max_duration {end}); use a fraction (e.g. 0.2dur)')
            if self.settle.value >= total:
                raise ConfigError(f'shear_pruning.settle {self.settle} covers the whole run of {total} batches: the '
                                  'masks would never be trained')
            self._settle_from = total - int(self.settle.value)
        elif total is not None:
            self._settle_from = math.ceil(total * (1 - self.settle.value) - 1e-9)

    def settled(self, state: State) -> bool:
        """Whether this batch lies in the settled phase (the last `settle` of the run)."""
        if self.settle is None or state.max_duration is None:
            return False
        if self._settle_from is not None:
            return int(state.timestamp.batch) >= self._settle_from
        elapsed = state.get_elapsed_duration()  # a length in tokens or samples: the fraction done
        return elapsed is not None and elapsed.value >= 1 - self.settle.value - 1e-9

    def _freeze_masks(self, state: State) -> None:
        """The mask and multiplier groups step at learning rate 0 in this batch (Adam's momentum would otherwise
        still move them); log once when the settled phase begins."""
        for group in self._groups_of(state, self.masks(state).parameters()):
            group['lr'] = 0.0
        if not self._settled:
            self._settled = True
            log.info('shear_pruning: settled phase from batch %d: training the exact-target sub-network',
                     int(state.timestamp.batch))

    def _constant_mask_lr(self, state: State) -> None:
        """Undo the scheduler for the mask and multiplier groups: this step runs them at +-lag_lr (the scheduler
        recomputes every group's rate from its initial one, so this does not compound)."""
        for group in self._groups_of(state, self.masks(state).parameters()):
            group['lr'] = group['initial_lr']

    def progress(self, state: State) -> float:
        """Fraction of the Lagrangian warm-up done (1 when the masks start at the target)."""
        if self.init['from'] == 'activations' or self.warmup.value == 0:
            return 1.0
        if self.warmup.unit == TimeUnit.DURATION:
            elapsed = state.get_elapsed_duration()
            done = 1.0 if elapsed is None else elapsed.value
        else:
            done = state.timestamp.get(self.warmup.unit).value
        return min(done / self.warmup.value, 1.0)

    def _attach(self, state: State) -> None:
        target, hold = self.target, ()
        if self.budget is not None:  # masks for every structure a candidate prunes, aimed at the first candidate
            source = ModelShape.from_config(hf_model_of(unwrap(state.model)).config)
            self._candidates = spread(candidate_shapes(source, self.budget, self._space()),
                                      self.search['max_candidates'])
            hold = masks_to_hold(source, self._candidates, self.pruning_modules)
            target = self._candidates[0].target_dict()
        masks = apply_shear_pruning(unwrap(state.model), target, self.pruning_modules, state.optimizers,
                                    lag_lr=self.lag_lr, init_log_alpha=self.init['log_alpha'],
                                    init_noise=self.init['noise'], seed=self.init['seed'],
                                    mask_values=self.mask_values, multiplier_update=self.multiplier_update,
                                    log_alpha_max=self.log_alpha_max, hold=hold)
        self.source, self.target_shape = masks.source, masks.target
        warn_if_buffers_rounded(state)
        fsdp = getattr(state, 'fsdp_config', None)
        if getattr(fsdp, 'activation_checkpointing', False) and getattr(fsdp, 'activation_checkpointing_reentrant',
                                                                        False):
            # Reentrant recomputation backpropagates each layer separately through the masks sampled once per
            # microbatch, which fails ("backward through the graph a second time"); non-reentrant does not.
            fsdp.activation_checkpointing_reentrant = False
            log.warning('shear_pruning: fsdp_config.activation_checkpointing_reentrant set to false')
        if not state.optimizers:
            log.warning('shear_pruning: no optimizer, masks and multipliers will not be trained')

    def _add_lagrangian(self, state: State) -> None:
        if self._lag is None:
            return
        loss = state.loss
        if isinstance(loss, dict):  # another algorithm already split the loss
            ce, extra = loss['total'], {k: v for k, v in loss.items() if k != 'total'}
        else:
            ce, extra = loss, {'ce': loss}
        state.loss = {**extra, 'lag': self._lag, 'total': ce + self._lag}
        self._lag = None

    def state_dict(self) -> dict[str, Any]:
        """The same keys before and after the shape is known: a sharded checkpoint loads only the keys the resuming
        run's own state has, so the shape (and the budget search's result) travel as one JSON string."""
        out = super().state_dict()
        out['initialized'] = self._initialized
        out['log_alpha_max'] = self.log_alpha_max
        shape = {'searched': self.searched}
        if self.target_shape is not None:
            shape.update(source=self.source.to_dict(), target=self.target_shape.to_dict(),
                         pruning_modules=list(self.pruning_modules))
        out['shape'] = json.dumps(shape, default=float)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if 'shape' in state:  # else a checkpoint of an earlier version, with these keys at the top
            state = {**state, **json.loads(state['shape'])}
        self._initialized = self._initialized or bool(state.get('initialized', False))
        saved_max = state.get('log_alpha_max', LOG_ALPHA_MAX)
        if abs(saved_max - self.log_alpha_max) > 1e-9:
            raise ConfigError(f'shear_pruning.log_alpha_max is {self.log_alpha_max} but the checkpoint was trained '
                              f'with {saved_max}: resume with the same value (another range would re-clamp the masks)')
        self.searched = state.get('searched', self.searched)
        saved = state.get('target')
        if self.budget is not None:  # the shape was chosen by the stored search: FIT_START follows it
            if self.searched is not None and self.searched['budget'] != self.budget.describe():
                raise ShapeError(f'the checkpoint searched a shape under {self.searched["budget"]} but '
                                 f'shear_pruning.target is now {self.budget.describe()}')
        elif saved is not None and self.target_shape is not None and saved != self.target_shape.to_dict():
            raise ShapeError(f'the checkpoint was pruned toward {saved} but shear_pruning.target is now '
                             f'{self.target_shape.to_dict()}')
