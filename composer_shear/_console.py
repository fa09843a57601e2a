"""A quiet console: silence, precisely, the warnings the stack prints on every run that are known to be harmless
here, and nothing else. Called by the entry points (`train.py`, `composer-shear`, the demo), never on import."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

__all__ = ['quiet_known_warnings']

TIED_HEAD = "newly initialized: ['lm_head.weight']"


class _TiedHeadFilter(logging.Filter):
    """Drops transformers' "newly initialized: ['lm_head.weight']" for a model whose head is tied to its input
    embedding (llm-foundry's empty-weights pre-load reports the tied head as missing; it is not)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return TIED_HEAD not in record.getMessage()


def tied_head(model_dir: str | os.PathLike | None) -> bool:
    """Whether the HF model folder's config ties the LM head to the input embedding."""
    try:
        return bool(json.loads(Path(str(model_dir), 'config.json').read_text()).get('tie_word_embeddings'))
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def quiet_known_warnings(model_dir: str | os.PathLike | None = None) -> None:
    """Ignore transformers' `use_auth_token` FutureWarning (llm-foundry still passes it), torch's `pin_memory`
    warning on a machine without an accelerator, and, when `model_dir` ties its head, the false "lm_head.weight
    newly initialized" message."""
    warnings.filterwarnings('ignore', message='The `use_auth_token` argument is deprecated', category=FutureWarning,
                            module='transformers')
    warnings.filterwarnings('ignore', message=".*'pin_memory' argument is set as true but no accelerator",
                            category=UserWarning, module='torch.utils.data')
    if tied_head(model_dir):
        logger = logging.getLogger('transformers.modeling_utils')
        if not any(isinstance(f, _TiedHeadFilter) for f in logger.filters):
            logger.addFilter(_TiedHeadFilter())
