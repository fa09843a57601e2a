"""ShearPruning: targeted structured pruning as a Composer Algorithm (YAML name `shear_pruning`)."""

from __future__ import annotations

import logging

import numpy as np
import torch
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger

from composer_shear.llama import MaskedForward
from composer_shear.masks import LOG_ALPHA_MAX, ShearMasks
from composer_shear.shapes import PRUNING_MODULES, ModelShape, ShapeError, validate_pruning_modules

log = logging.getLogger(__name__)

MASKS_ATTR = 'shear_masks'  # the mask module's name on the ComposerModel
INIT_KEYS = ('log_alpha', 'noise', 'seed')


def unwrap(model):
    """The ComposerModel inside a DDP wrapper."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def hf_model_of(composer_model):
    hf = getattr(composer_model, 'model', None)
    if hf is None or not hasattr(hf, 'config'):
        raise ShapeError(f'{type(composer_model).__name__} does not wrap a Hugging Face model '
                         '(use llm-foundry\'s hf_causal_lm or composer\'s HuggingFaceModel)')
    return hf


class ShearPruning(Algorithm):
    """Learn hard-concrete masks over layers, hidden dims, attention heads (GQA-aware) and MLP channels,
    constrained by Lagrange multipliers to reach an exact target shape.

    Args:
        target: HF config field names (num_hidden_layers, hidden_size, num_attention_heads,
            num_key_value_heads, intermediate_size) or ``{'preset': '1.3b'|'2.7b'|'370m'}``.
        pruning_modules: any subset of layer, head, intermediate, hidden.
        lag_lr: learning rate of the masks (+) and of the multipliers (-, gradient ascent).
        lagrangian_warmup: time over which the target sparsities rise linearly from 0 (e.g. '640ba', '0.2dur').
        eval_target_shape: evaluate with exactly-target masks (else the expected count per row).
        init: ``log_alpha`` (initial value, default ln 100), ``noise`` (std of added Gaussian noise,
            default 0), ``seed`` (noise seed; identical on every rank).
    """

    def __init__(self, target=None, pruning_modules=PRUNING_MODULES, lag_lr: float = 1.0,
                 lagrangian_warmup: str = '0.2dur', eval_target_shape: bool = False, init: dict | None = None):
        self.target = dict(target) if isinstance(target, dict) else target
        if self.target is None:
            raise ShapeError('shear_pruning.target is required (HF config fields or preset: 1.3b|2.7b|370m)')
        self.pruning_modules = validate_pruning_modules(pruning_modules)
        if not isinstance(lag_lr, (int, float)) or isinstance(lag_lr, bool) or lag_lr <= 0:
            raise ValueError(f'shear_pruning.lag_lr must be a positive number, got {lag_lr!r}')
        self.lag_lr = float(lag_lr)
        try:
            self.warmup = Time.from_timestring(str(lagrangian_warmup))
        except Exception as e:
            raise ValueError(f'shear_pruning.lagrangian_warmup {lagrangian_warmup!r} is not a Composer time '
                             f'string (e.g. 640ba, 0.2dur)') from e
        self.eval_target_shape = bool(eval_target_shape)
        init = dict(init or {})
        unknown = sorted(set(init) - set(INIT_KEYS))
        if unknown:
            raise ValueError(f'shear_pruning.init.{unknown[0]} is unknown; valid keys: {", ".join(INIT_KEYS)}')
        self.init = {'log_alpha': LOG_ALPHA_MAX, 'noise': 0.0, 'seed': 0, **init}
        self.source: ModelShape | None = None
        self.target_shape: ModelShape | None = None
        self.hooks: MaskedForward | None = None
        self.stats: dict = {}
        self._lag = None
        self._microbatch = 0

    # Composer plumbing ---------------------------------------------------------------------------------
    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.BATCH_START, Event.BEFORE_FORWARD, Event.AFTER_LOSS, Event.EVAL_START,
                         Event.BATCH_END)

    def apply(self, event: Event, state: State, logger: Logger):
        if event == Event.INIT:
            self._attach(state)
        elif event == Event.BATCH_START:
            self._microbatch = 0
        elif event == Event.BEFORE_FORWARD:
            z, self._lag, stats = self.masks(state)('sample', progress=self.progress(state),
                                                    generator=self._noise(state))
            self._microbatch += 1
            self.hooks.set(z)
            self.stats = stats
        elif event == Event.AFTER_LOSS:
            self._add_lagrangian(state)
        elif event == Event.EVAL_START:
            with torch.no_grad():
                z, _, _ = self.masks(state)('target' if self.eval_target_shape else 'expected')
            self.hooks.set(z)
        elif event == Event.BATCH_END:
            with torch.no_grad():
                for p in self.masks(state).log_alpha.values():
                    p.clamp_(-LOG_ALPHA_MAX, LOG_ALPHA_MAX)

    @staticmethod
    def masks(state: State) -> ShearMasks:
        return getattr(unwrap(state.model), MASKS_ATTR)

    def _noise(self, state: State) -> torch.Generator:
        """The mask noise of this rank, step and microbatch: a function of them alone (not of a global RNG
        stream), so a resumed run draws exactly the masks an uninterrupted run draws."""
        from composer.utils import dist
        key = [state.rank_zero_seed, dist.get_global_rank(), int(state.timestamp.batch), self._microbatch]
        return torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1))

    def progress(self, state: State) -> float:
        """Fraction of the Lagrangian warm-up done."""
        if self.warmup.value == 0:
            return 1.0
        if self.warmup.unit == TimeUnit.DURATION:
            elapsed = state.get_elapsed_duration()
            done = 1.0 if elapsed is None else elapsed.value
        else:
            done = state.timestamp.get(self.warmup.unit).value
        return min(done / self.warmup.value, 1.0)

    def _attach(self, state: State):
        model = unwrap(state.model)
        hf = hf_model_of(model)
        self.source = ModelShape.from_config(hf.config)
        self.target_shape = self.source.resolve_target(self.target, self.pruning_modules)
        if hasattr(model, MASKS_ATTR):
            raise ShapeError(f'the model already has a {MASKS_ATTR!r} module: list shear_pruning once')
        device = next(hf.parameters()).device
        if device.type == 'meta':
            device = torch.device('cpu')
        masks = ShearMasks(self.source, self.target_shape, self.pruning_modules,
                           init_log_alpha=self.init['log_alpha'], init_noise=self.init['noise'],
                           seed=self.init['seed']).to(device)
        setattr(model, MASKS_ATTR, masks)
        self.hooks = MaskedForward(hf, self.source)
        fsdp = getattr(state, 'fsdp_config', None)
        if getattr(fsdp, 'activation_checkpointing', False) and getattr(fsdp, 'activation_checkpointing_reentrant',
                                                                        False):
            # Reentrant recomputation backpropagates each layer separately through the masks sampled once per
            # microbatch, which fails ("backward through the graph a second time"); non-reentrant does not.
            fsdp.activation_checkpointing_reentrant = False
            log.warning('shear_pruning: fsdp_config.activation_checkpointing_reentrant set to false')
        if state.optimizers:
            opt = state.optimizers[0]
            opt.add_param_group({'params': list(masks.log_alpha.values()), 'lr': self.lag_lr,
                                 'initial_lr': self.lag_lr, 'weight_decay': 0.0})
            opt.add_param_group({'params': [masks.lambdas], 'lr': -self.lag_lr,
                                 'initial_lr': -self.lag_lr, 'weight_decay': 0.0})
        else:
            log.warning('shear_pruning: no optimizer, masks and multipliers will not be trained')
        log.info('shear_pruning: %s -> %s (%d -> %d params), masks %s', self.source.target_dict(),
                 self.target_shape.target_dict(), self.source.num_params(), self.target_shape.num_params(),
                 [s.name for s in masks.structures])

    def _add_lagrangian(self, state: State):
        if self._lag is None:
            return
        loss = state.loss
        if isinstance(loss, dict):  # another algorithm already split the loss
            ce, extra = loss['total'], {k: v for k, v in loss.items() if k != 'total'}
        else:
            ce, extra = loss, {'ce': loss}
        state.loss = {**extra, 'lag': self._lag, 'total': ce + self._lag}
        self._lag = None

    def state_dict(self):
        out = super().state_dict()
        if self.target_shape is not None:
            out.update(source=self.source.to_dict(), target=self.target_shape.to_dict(),
                       pruning_modules=list(self.pruning_modules))
        return out

    def load_state_dict(self, state):
        saved = state.get('target')
        if saved is not None and self.target_shape is not None and saved != self.target_shape.to_dict():
            raise ShapeError(f'the checkpoint was pruned toward {saved} but shear_pruning.target is now '
                             f'{self.target_shape.to_dict()}')
