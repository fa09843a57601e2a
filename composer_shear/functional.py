"""The functional API: targeted structured pruning without a Composer Trainer.

These functions do the work; the `shear_pruning` Algorithm and the CLI are plumbing over them (the way Composer's
algorithms call their ``apply_*`` functions). A plain PyTorch loop prunes a model like this::

    masks = apply_shear_pruning(model, {'preset': '1.3b'}, optimizers=opt)
    for step, batch in enumerate(batches):
        lagrangian, _ = sample_masks(masks, progress=min(step / warmup_steps, 1.0))
        loss = model(**batch).loss + lagrangian
        loss.backward()
        opt.step()
        opt.zero_grad()
        clamp_masks(masks)
    small = prune_model(model, masks)      # a smaller, dense Hugging Face model
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from composer_shear.data.weights import update_domain_weights
from composer_shear.errors import ConfigError, ShapeError
from composer_shear.hooks import MaskedForward
from composer_shear.masks import (
    DEFAULT_MASK_VALUES,
    LOG_ALPHA_MAX,
    MASK_VALUES,
    MASKS_ATTR,
    ShearMasks,
    expected_score,
    refresh_fp32,
    selection_log_alpha,
)
from composer_shear.oneshot import oneshot_masks, prune_oneshot
from composer_shear.shapes import PRUNING_MODULES, STRUCTURE_MODULES, ModelShape, validate_pruning_modules
from composer_shear.surgery import build_model, prune_to_target, pruned_config

log = logging.getLogger(__name__)

__all__ = ['apply_shear_pruning', 'ascend_multipliers', 'clamp_masks', 'hf_model_of', 'init_masks_from_importance',
           'prune_model', 'prune_oneshot', 'sample_masks', 'set_eval_masks', 'settle_masks', 'update_domain_weights']

Target = Mapping[str, Any] | str
MULTIPLIER_UPDATES = ('adam', 'ascent')


def hf_model_of(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM itself: `model`, or the `.model` of a ComposerModel (DDP unwrapped)."""
    from transformers import PreTrainedModel
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if isinstance(model, PreTrainedModel):
        return model
    hf = getattr(model, 'model', None)
    if hf is None or not hasattr(hf, 'config'):
        raise ShapeError(f'{type(model).__name__} is not a Hugging Face model and does not wrap one '
                         '(use llm-foundry\'s hf_causal_lm or composer\'s HuggingFaceModel)')
    return hf


def apply_shear_pruning(model: nn.Module, target: Target, pruning_modules: Sequence[str] = PRUNING_MODULES,
                        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
                        lag_lr: float = 1.0, init_log_alpha: float = LOG_ALPHA_MAX, init_noise: float = 0.0,
                        seed: int = 0, mask_values: str = DEFAULT_MASK_VALUES,
                        multiplier_update: str = 'adam', log_alpha_max: float = LOG_ALPHA_MAX,
                        hold: Sequence[str] = ()) -> ShearMasks:
    """Attach hard-concrete masks and their Lagrange multipliers to a LLaMA-family model.

    Creates a :class:`ShearMasks` for the exact `target` shape (validated against the model before anything
    changes), installs forward hooks that apply the current masks (``masks.hooks``; no mask is applied until
    :func:`sample_masks` or :func:`set_eval_masks` installs one), and, with `optimizers`, adds two parameter
    groups to the first: the mask logits at ``+lag_lr`` and the multipliers at ``-lag_lr`` (gradient ascent),
    both without weight decay (with ``multiplier_update='ascent'`` the multipliers get no group: call
    :func:`ascend_multipliers` after each optimizer step).

    Args:
        model: a Hugging Face LLaMA-family causal LM, or a ComposerModel wrapping one (``.model``). A
            ComposerModel gets the masks as its ``shear_masks`` child, so checkpoints, DDP and FSDP treat them
            as weights; a bare HF model does not (its ``save_pretrained`` stays unchanged).
        target: HF config field names (``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``,
            ``num_key_value_heads``, ``intermediate_size``) or ``{'preset': '1.3b' | '2.7b' | '370m'}``.
        pruning_modules: any subset of ``layer``, ``hidden``, ``head``, ``intermediate``.
        optimizers: the optimizer (or a list; the first is used) that trains the model.
        lag_lr: learning rate of the masks (+) and of the multipliers (-).
        init_log_alpha: initial mask logit (the reference's effective value, ln 100, keeps everything).
        init_noise: standard deviation of Gaussian noise added to the initial logits.
        seed: seed of that noise (the same on every rank).
        mask_values: the value kept entries take in deterministic masks (evaluation and export): ``binary``
            (1) or ``soft`` (sigmoid(0.8 log alpha / beta), the paper's). Stored with the masks.
        multiplier_update: ``adam`` (the paper's: the multipliers are a group of the optimizer at ``-lag_lr``, so
            each moves by about the learning rate per step whatever its gradient) or ``ascent`` (plain gradient
            ascent, lambda += lr * dL/dlambda, by :func:`ascend_multipliers`).
        log_alpha_max: the mask logits are kept in [-log_alpha_max, log_alpha_max] (the paper's ln 100). A wider
            range lowers the keep probability of dropped entries (0.047 at ln 100, 0.0005 at ln 1e4), so that the
            kept ones can sit nearer certainty while the expected shape is the target: less structured dropout.
        hold: mask structures (``layer``, ``hidden``, ``kv``, ``query``, ``intermediate``) to hold logits for even
            when `target` keeps them whole, so that ``masks.retarget`` can later aim at a shape that prunes them
            (a budget run chooses its shape after the masks exist).

    Returns:
        The mask module, on the model's device.

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_pretrained('SmolLM2-135M')
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        >>> masks = apply_shear_pruning(model, {'num_hidden_layers': 24, 'hidden_size': 480,
        ...                                     'num_attention_heads': 6, 'num_key_value_heads': 2,
        ...                                     'intermediate_size': 1152}, optimizers=opt)
    """
    if isinstance(lag_lr, bool) or not isinstance(lag_lr, (int, float)) or lag_lr <= 0:
        raise ConfigError(f'lag_lr must be a positive number, got {lag_lr!r}')
    if mask_values not in MASK_VALUES:
        raise ConfigError(f'mask_values must be one of {", ".join(MASK_VALUES)}, got {mask_values!r}')
    if multiplier_update not in MULTIPLIER_UPDATES:
        raise ConfigError(f'multiplier_update must be one of {", ".join(MULTIPLIER_UPDATES)}, '
                          f'got {multiplier_update!r}')
    if isinstance(log_alpha_max, bool) or not isinstance(log_alpha_max, (int, float)) \
            or not 0 < log_alpha_max < float('inf'):
        raise ConfigError(f'log_alpha_max must be a positive number, got {log_alpha_max!r}')
    hf = hf_model_of(model)
    source = ModelShape.from_config(hf.config)
    modules = validate_pruning_modules(pruning_modules)
    target_shape = source.resolve_target(target, modules)
    pruned_config(hf.config, target_shape, torch.float32)  # a shape the installed transformers cannot hold: now
    owner = None if model is hf else model
    if owner is not None and hasattr(owner, MASKS_ATTR):
        raise ShapeError(f'the model already has a {MASKS_ATTR!r} module: apply shear pruning once')
    device = next(hf.parameters()).device
    if device.type == 'meta':
        device = torch.device('cpu')
    masks = ShearMasks(source, target_shape, modules, init_log_alpha=init_log_alpha, init_noise=init_noise,
                       seed=seed, values=mask_values, limit=log_alpha_max, hold=hold).to(device)
    masks.hooks = MaskedForward(hf, source)
    if owner is not None:
        setattr(owner, MASKS_ATTR, masks)
    if isinstance(optimizers, torch.optim.Optimizer):
        optimizers = [optimizers]
    if optimizers:
        opt = optimizers[0]
        lr = float(lag_lr)
        opt.add_param_group({'params': list(masks.log_alpha.values()), 'lr': lr, 'initial_lr': lr,
                             'weight_decay': 0.0})
        if multiplier_update == 'adam':
            opt.add_param_group({'params': [masks.lambdas], 'lr': -lr, 'initial_lr': -lr, 'weight_decay': 0.0})
    log.info('shear pruning: %s -> %s (%d -> %d params), masks %s', source.target_dict(),
             target_shape.target_dict(), source.num_params(), target_shape.num_params(),
             [s.name for s in masks.structures])
    return masks


def sample_masks(masks: nn.Module, progress: float,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Draw training masks, install them in the hooks and return the Lagrangian term and detached statistics.

    Call once per forward pass. `masks` may be the :class:`ShearMasks` or a DDP/FSDP wrapper of it (it is
    called through ``__call__`` so that FSDP gathers its shards).

    Args:
        masks: what :func:`apply_shear_pruning` returned (or its wrapper).
        progress: fraction of the Lagrangian warm-up done, in [0, 1]; the target sparsity of each structure is
            this fraction of its final value.
        generator: drives the sampling noise (default: torch's global generator).

    Returns:
        ``(lagrangian, stats)``: add the scalar to the loss; stats hold every multiplier, target and expected
        sparsity, and the expected shape.

    Example:
        >>> lagrangian, stats = sample_masks(masks, progress=min(step / 640, 1.0))
        >>> loss = model(**batch).loss + lagrangian
    """
    z, lagrangian, stats = masks('sample', progress=progress, generator=generator)
    masks.hooks.set(z)
    return lagrangian, stats


def settle_masks(masks: nn.Module, progress: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Train with the exact-target deterministic masks (what export keeps: no sampling, kept entries at their export
    value) for a settled phase at the end of pruning: install them and return a zero Lagrangian that still touches
    every mask parameter (so DDP sees a gradient for each), with the usual statistics. Keep the mask and multiplier
    learning rates at 0 meanwhile, so that the selection stays what it is.

    Example:
        >>> lagrangian, _ = settle_masks(masks)   # the model trains the sub-network export will keep
        >>> loss = model(**batch).loss + lagrangian
    """
    z, lagrangian, stats = masks('target', progress=progress)
    masks.hooks.set(z)
    return lagrangian * 0.0, stats


@torch.no_grad()
def set_eval_masks(masks: nn.Module, exact_target: bool = True) -> None:
    """Install deterministic masks for evaluation: exactly the target count per row (what export keeps), or
    the count the masks currently expect (``exact_target=False``).

    Example:
        >>> set_eval_masks(masks)   # the model now computes what the exported model computes
    """
    z, _, _ = masks('target' if exact_target else 'expected')
    masks.hooks.set(z)


@torch.no_grad()
def init_masks_from_importance(masks: ShearMasks, scores: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Start the masks from a one-shot ranking: set every log alpha so that the exact-target deterministic masks
    keep exactly what `prune_oneshot` would keep and the expected shape already equals the target (the Lagrangian
    starts satisfied). Kept entries share one value per structure, the others sit at the lower clamp, so training
    can move structures across the boundary from there.

    Args:
        masks: the mask module (`apply_shear_pruning`'s result, or the model's ``shear_masks``).
        scores: `composer_shear.oneshot.importance`'s statistics (per layer, hidden channel, head, MLP channel).

    Returns:
        The expected sparsity of each structure after initialisation (the target's, up to the clamps).

    Example:
        >>> from composer_shear.oneshot import importance
        >>> init_masks_from_importance(masks, importance(model, calibration_batches))
    """
    from contextlib import nullcontext

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    modules = {STRUCTURE_MODULES[s.name] for s in masks.structures}
    keep = oneshot_masks(scores, masks.source, masks.target, modules)
    sparsity = {}
    # an FSDP1 wrapper holds flat shards: write the whole parameters, FSDP scatters them back
    whole = FSDP.summon_full_params(masks, writeback=True) if isinstance(masks, FSDP) else nullcontext()
    with whole:
        for s in masks.structures:
            log_alpha = selection_log_alpha(keep[s.name], s.target, masks.limit)
            param = masks.log_alpha[s.name]
            value = log_alpha.to(param.device, param.dtype)
            if hasattr(param, 'device_mesh'):  # an FSDP2-sharded parameter (DTensor): copy the local shard
                from torch.distributed.tensor import distribute_tensor
                value = distribute_tensor(value, param.device_mesh, param.placements)
            param.copy_(value)
            sparsity[s.name] = float(1 - expected_score(log_alpha).sum(-1).mean() / s.size)
    refresh_fp32(masks)
    return sparsity


@torch.no_grad()
def ascend_multipliers(masks: nn.Module, lr: float) -> None:
    """One plain gradient-ascent step of the Lagrange multipliers, lambda += lr * dL/dlambda, and their gradient
    cleared (for ``multiplier_update='ascent'``, after each optimizer step; a no-op before the first backward).
    The step is proportional to the constraint gap, so the multipliers settle where the gap closes instead of
    moving by the learning rate at every step as Adam's normalised steps do.

    Example:
        >>> opt.step(); ascend_multipliers(masks, lr=1.0); clamp_masks(masks)
    """
    lambdas = masks.lambdas
    if lambdas.grad is not None:
        lambdas.add_(lambdas.grad, alpha=float(lr))
        lambdas.grad = None


@torch.no_grad()
def clamp_masks(masks: nn.Module) -> None:
    """Keep every mask logit in [-limit, limit] (``ShearMasks.limit``, default ln 100) and refresh the exact fp32
    values the forward reads under FSDP mixed precision (call after each optimizer step on every rank, and once after
    wrapping the model with FSDP).

    Example:
        >>> opt.step(); clamp_masks(masks)
    """
    limit = getattr(masks, 'limit', LOG_ALPHA_MAX)
    for p in masks.log_alpha.values():
        p.clamp_(-limit, limit)
    refresh_fp32(masks)


@torch.no_grad()
def prune_model(model: nn.Module, masks: nn.Module, dtype: torch.dtype | None = None) -> Any:
    """The smaller dense model: the exact-target deterministic masks folded into the weights and every pruned
    row, column, head and layer dropped. Same weights as ``composer-shear export`` writes; the source model and
    its masks are left unchanged.

    Args:
        model: the masked model (an HF causal LM or a ComposerModel wrapping one).
        masks: its :class:`ShearMasks` (or an FSDP wrapper of it).
        dtype: weight dtype of the result (default: the source's).

    Returns:
        A ``PreTrainedModel`` of the source's class with the target shape, in eval mode, on the CPU.

    Example:
        >>> small = prune_model(model, masks)
        >>> small.save_pretrained('pruned')
    """
    hf = hf_model_of(model)
    sd = {k: v.detach().cpu() for k, v in hf.state_dict().items()}
    pruned, config = prune_to_target(sd, masks('snapshot'), hf.config, dtype)
    return build_model(pruned, config)
