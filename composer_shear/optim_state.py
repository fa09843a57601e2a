"""Carry the pruning stage's Adam state over to continued pre-training.

Export keeps a sub-network of the source's weights; the Adam moments of those weights are the same slices of the
source's moments. `composer-shear export --optimizer-state` writes them next to the pruned model
(``optimizer_state.safetensors``: first and second moments per parameter, and the step count), and the
``carry_optimizer_state`` callback puts them into the continued stage's optimizer before its first step, so that the
weights go on with their moments instead of a fresh Adam state (which takes steps of about the learning rate in every
coordinate at first).

Example (YAML, the continued stage):
    callbacks:
      carry_optimizer_state: {path: runs/pruned}
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger

from composer_shear.errors import ConfigError, ExportError

log = logging.getLogger(__name__)

__all__ = ['OPTIMIZER_FILE', 'CarryOptimizerState', 'load_moments', 'prune_moments', 'read_adam_moments',
           'save_moments']

OPTIMIZER_FILE = 'optimizer_state.safetensors'
MOMENTS = ('exp_avg', 'exp_avg_sq')


def read_adam_moments(checkpoint: str | os.PathLike, prefix: str = 'model.') -> tuple[dict, dict, int]:
    """The Adam moments of the HF weights in a whole Composer checkpoint, by HF parameter name (`prefix`, the
    ComposerModel's attribute, removed), and the step count. Mask logits and multipliers are left out."""
    path = Path(checkpoint)
    if path.is_dir():
        raise ExportError(f'{path}: carrying the optimizer state needs a whole checkpoint (a .pt file; set '
                          'fsdp_config.state_dict_type: full for the pruning stage)')
    ckpt = torch.load(path, map_location='cpu', weights_only=False, mmap=True)
    optimizers = ckpt['state'].get('optimizers') or {}
    if len(optimizers) != 1:
        raise ExportError(f'{path} holds {len(optimizers)} optimizers; carrying the state needs exactly one')
    state = next(iter(optimizers.values()))['state']
    first, second, steps = {}, {}, set()
    for name, s in state.items():
        name = name.removeprefix('module.')
        if not name.startswith(prefix) or not all(k in s for k in MOMENTS):
            continue
        first[name[len(prefix):]], second[name[len(prefix):]] = s['exp_avg'].float(), s['exp_avg_sq'].float()
        steps.add(int(float(s['step'])))
    if not first:
        raise ExportError(f'{path} holds no Adam moments for the model\'s weights')
    return first, second, max(steps)


def prune_moments(first: dict, second: dict, weights: dict, prune: Any) -> tuple[dict, dict]:
    """The moments of the pruned model's weights: `prune` (the export's weight surgery, a function of a full HF state
    dict, with binary mask values: pure selection of rows, columns, heads and layers) applied to both moments.
    Parameters without a moment (a head tied to the embedding) take zeros and are dropped afterwards."""
    def full(moments: dict) -> dict:
        return {k: moments[k] if k in moments else torch.zeros_like(w, dtype=torch.float32) for k, w in weights.items()}
    pruned_first, pruned_second = prune(full(first)), prune(full(second))
    # layers are renumbered, and every layer weight has moments; outside the layers, keep what had them
    kept = {k for k in pruned_first if k.startswith('model.layers.') or k in first}
    return ({k: v for k, v in pruned_first.items() if k in kept},
            {k: v for k, v in pruned_second.items() if k in kept})


def save_moments(folder: str | os.PathLike, first: dict, second: dict, step: int) -> None:
    """Write ``optimizer_state.safetensors`` into `folder`."""
    from safetensors.torch import save_file
    tensors = {f'{m}/{k}': v.contiguous() for m, moments in zip(MOMENTS, (first, second), strict=True)
               for k, v in moments.items()}
    save_file(tensors, str(Path(folder) / OPTIMIZER_FILE), metadata={'step': json.dumps(int(step))})


def load_moments(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """Read what `save_moments` wrote (`path`: the file or the exported folder holding it)."""
    from safetensors import safe_open
    path = Path(path)
    if path.is_dir():
        path = path / OPTIMIZER_FILE
    if not path.exists():
        raise ConfigError(f'carry_optimizer_state.path: {path} does not exist (export with --optimizer-state)')
    out: dict[str, dict] = {m: {} for m in MOMENTS}
    with safe_open(str(path), framework='pt') as f:
        step = int(json.loads(f.metadata()['step']))
        for key in f.keys():
            moment, name = key.split('/', 1)
            out[moment][name] = f.get_tensor(key)
    return out['exp_avg'], out['exp_avg_sq'], step


class CarryOptimizerState(Callback):
    """Before the first step of a fresh run, set the optimizer's Adam state of each HF weight from an exported
    ``optimizer_state.safetensors`` (YAML name ``carry_optimizer_state``). A resumed run keeps its checkpoint's state.

    Args:
        path: the exported folder (or the file itself).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        file = Path(path) / OPTIMIZER_FILE if Path(path).is_dir() else Path(path)
        if not file.exists():  # checked now, before the model is built; read at the first step of a fresh run
            raise ConfigError(f'carry_optimizer_state.path: {file} does not exist (export with --optimizer-state)')

    def fit_start(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) > 0:
            return
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        if any(isinstance(m, FSDP) for m in state.model.modules()):
            raise ConfigError('carry_optimizer_state does not support FSDP1 (flat parameters); use FSDP2 '
                              '(FSDP_VERSION=2) or DDP')
        model = state.model.module if isinstance(state.model, torch.nn.parallel.DistributedDataParallel) \
            else state.model
        params = dict(model.model.named_parameters())
        first, second, step = load_moments(self.path)
        unknown = sorted(set(first) - set(params))
        if unknown:
            raise ConfigError(f'carry_optimizer_state.path: {self.path} has moments for {unknown[0]}, which this model '
                              'does not have (not the model this stage trains?)')
        opt = state.optimizers[0]
        for name, p in params.items():
            if name not in first:
                continue
            if first[name].shape != p.shape:
                raise ConfigError(f'carry_optimizer_state.path: {self.path}: {name} has shape '
                                  f'{tuple(first[name].shape)}, the model\'s is {tuple(p.shape)}')
            opt.state[p] = {'step': torch.tensor(float(step), device=p.device),
                            'exp_avg': _like(first[name], p), 'exp_avg_sq': _like(second[name], p)}
        log.info('carry_optimizer_state: Adam state of %d weights from %s (step %d)', len(first), self.path, step)


def _like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`value` laid out as `param`: the same dtype and device, and sharded as it is under FSDP2."""
    value = value.to(device=param.device if not hasattr(param, 'device_mesh') else 'cpu', dtype=param.dtype)
    if hasattr(param, 'device_mesh'):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements)
    return value
