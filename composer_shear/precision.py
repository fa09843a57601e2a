"""Mixed-precision settings that would make the trained model differ from the exported one.

FSDP1 mixed precision casts a module's floating-point buffers to ``buffer_dtype`` in place, and Composer's
``mixed_precision: DEFAULT`` (and ``PURE``) sets it to the run's 16-bit precision. A LLaMA-family model's one such
buffer is the rotary embedding's ``inv_freq``: rounded to bf16 (relative error up to 0.4 %), the rotary phase drifts
with the position, so the model trains and evaluates with other positional encodings than the exported model,
which recomputes them in fp32. FSDP2 leaves buffers alone. The shipped YAMLs keep buffers fp32; a run whose settings
would round them is warned once, naming the key.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ['KEEP_BUFFERS_FP32', 'rounded_buffers', 'warn_if_buffers_rounded']

# the fsdp_config.mixed_precision the shipped YAMLs use: Composer's DEFAULT with fp32 buffers
KEEP_BUFFERS_FP32 = {'param_dtype': 'bf16', 'reduce_dtype': 'fp32', 'buffer_dtype': 'fp32'}
_warned: set[str] = set()


def buffer_dtype(precision: Any, mixed_precision: Any) -> torch.dtype | None:
    """The dtype FSDP1 casts buffers to under Composer's `precision` and ``fsdp_config.mixed_precision`` (a name or
    a mapping), or None when it leaves them alone."""
    from composer.distributed.mosaic_parallelism import get_mixed_precision
    return get_mixed_precision(precision, mixed_precision)[3]


def rounded_buffers(model: nn.Module, dtype: torch.dtype | None) -> list[str]:
    """Names of `model`'s floating-point buffers that a cast to `dtype` would make less precise."""
    if dtype is None:
        return []
    return [name for name, b in model.named_buffers()
            if b.is_floating_point() and torch.finfo(dtype).bits < torch.finfo(b.dtype).bits]


def warn_if_buffers_rounded(state: Any) -> bool:
    """At ``Event.INIT``: warn (once per process) when the run's FSDP1 mixed precision will round the model's
    floating-point buffers. Returns whether it would.

    Example:
        >>> warn_if_buffers_rounded(state)   # in an Algorithm's or Callback's INIT
    """
    config = getattr(state, 'fsdp_config', None)
    if config is None or getattr(state, 'fsdp_config_version', 1) != 1:
        return False
    mixed = getattr(config, 'mixed_precision', 'DEFAULT')
    dtype = buffer_dtype(state.precision, mixed)
    names = rounded_buffers(state.model, dtype)
    if not names:
        return False
    key = f'{mixed}:{dtype}'
    if key not in _warned:
        _warned.add(key)
        log.warning('fsdp_config.mixed_precision: %s casts buffers to %s under FSDP1, which rounds %s (the rotary '
                    'frequencies: the model trains and evaluates with other positions than the exported model '
                    'computes); set fsdp_config.mixed_precision.buffer_dtype: fp32, e.g. mixed_precision: %s',
                    mixed, dtype, names[0] if len(names) == 1 else f'{names[0]} and {len(names) - 1} more',
                    KEEP_BUFFERS_FP32)
    return True
