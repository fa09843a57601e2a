"""What differs between the transformers releases this package runs on (4.51, pinned by llm-foundry, and 5.x): each
difference in one place."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ['dtype_kwargs', 'no_init_weights']


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The ``from_pretrained`` / ``from_config`` keyword that sets the weights' dtype (``dtype`` in transformers 5,
    where ``torch_dtype`` is deprecated; ``torch_dtype`` before)."""
    import transformers
    major = int(transformers.__version__.split('.')[0])
    return {'dtype' if major >= 5 else 'torch_dtype': dtype}


def no_init_weights() -> Any:
    """transformers' context that skips weight initialisation (its module moved in transformers 5)."""
    try:
        from transformers.initialization import no_init_weights as context
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights as context
    return context()
