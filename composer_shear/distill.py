"""Knowledge distillation from a frozen teacher (by default the source model) as a Composer Algorithm
(YAML name ``shear_distill``), in both stages: while pruning and in continued pre-training.

The loss becomes ``(1 - alpha) * CE + alpha * KD`` (plus ``shear_pruning``'s Lagrangian when it runs), where KD is the
KL divergence between the teacher's and the student's next-token distributions at temperature ``T``, scaled by
``T**2`` and averaged over exactly the tokens the CE averages over (labels other than ``-100``). Composer logs
``loss/train/ce``, ``loss/train/kd`` and ``loss/train/total``.

The teacher is frozen (eval mode, ``requires_grad=False``), outside the model: not in the optimizer, not in a
checkpoint (a resumed run reloads it from its folder). Under DDP each rank holds a replica; under FSDP it is sharded
the way the student is (FSDP2: ``fully_shard`` on each decoder layer and the root over the student's device mesh;
FSDP1: wrapped per decoder layer), so a large teacher is never replicated per GPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from torch import nn

from composer_shear.errors import ConfigError
from composer_shear.functional import hf_model_of
from composer_shear.kd import (
    IGNORE_INDEX,
    KD_TYPES,
    PRECISIONS,
    compose_loss,
    distillation_loss,
    load_teacher,
    local_parameter_bytes,
    shard_teacher,
)
from composer_shear.precision import warn_if_buffers_rounded

log = logging.getLogger(__name__)

__all__ = ['ShearDistill']  # the loss and the teacher's loading: composer_shear.kd

class ShearDistill(Algorithm):
    """Distil a frozen teacher into the model being pruned or trained: ``loss = (1 - alpha) CE + alpha KD``.

    Args:
        teacher: an HF model folder; default: the model's own ``pretrained_model_name_or_path`` at INIT (in the
            pruning stage, the source model; set it explicitly for continued pre-training).
        alpha: weight of the distillation term in [0, 1]; 1 = distillation only (Minitron's choice).
        temperature: softmax temperature of both distributions (> 0); the KL is scaled by ``T**2``.
        kd_type: ``forward_kl`` (default) or ``reverse_kl``.
        teacher_precision: ``fp32`` or ``bf16``.
        top_k: distil over the teacher's top-k tokens only (forward KL).

    Example:
        >>> from composer import Trainer
        >>> trainer = Trainer(model=composer_model, algorithms=[ShearPruning(target={'preset': '1.3b'}),
        ...                   ShearDistill(alpha=1.0)], max_duration='3200ba', ...)

    In an llm-foundry YAML::

        algorithms:
          shear_distill: {alpha: 1.0, temperature: 1.0, teacher_precision: bf16}
    """

    def __init__(self, teacher: str | os.PathLike | None = None, alpha: float = 1.0, temperature: float = 1.0,
                 kd_type: str = 'forward_kl', teacher_precision: str = 'fp32', top_k: int | None = None) -> None:
        def number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        if not number(alpha) or not 0 <= alpha <= 1:
            raise ConfigError(f'shear_distill.alpha must be a number in [0, 1], got {alpha!r}')
        if not number(temperature) or temperature <= 0:
            raise ConfigError(f'shear_distill.temperature must be a positive number, got {temperature!r}')
        if kd_type not in KD_TYPES:
            raise ConfigError(f'shear_distill.kd_type must be one of {", ".join(KD_TYPES)}, got {kd_type!r}')
        if teacher_precision not in PRECISIONS:
            raise ConfigError(f'shear_distill.teacher_precision must be one of {", ".join(PRECISIONS)}, '
                              f'got {teacher_precision!r}')
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ConfigError(f'shear_distill.top_k must be a positive integer, got {top_k!r}')
        if top_k is not None and kd_type != 'forward_kl':
            raise ConfigError('shear_distill.top_k is only defined for kd_type: forward_kl')
        if teacher is not None and not (Path(teacher) / 'config.json').is_file():
            raise ConfigError(f'shear_distill.teacher: {teacher} is not a Hugging Face model folder (no config.json)')
        self.teacher_path = None if teacher is None else str(teacher)
        self.alpha, self.temperature, self.kd_type = float(alpha), float(temperature), kd_type
        self.teacher_precision, self.top_k = teacher_precision, top_k
        self.teacher: nn.Module | None = None
        self.teacher_bytes = 0  # this rank's teacher parameter bytes, once placed
        self._placed = False

    def __repr__(self) -> str:
        return (f'ShearDistill(teacher={self.teacher_path!r}, alpha={self.alpha}, temperature={self.temperature}, '
                f'kd_type={self.kd_type!r}, teacher_precision={self.teacher_precision!r}, top_k={self.top_k})')

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.FIT_START, Event.AFTER_LOSS)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._load(state)
        elif event == Event.FIT_START:
            self._place(state, logger)
        elif event == Event.AFTER_LOSS:
            self._place(state, logger)
            state.loss = compose_loss(state.loss, self.kd_loss(state), self.alpha)

    def _load(self, state: State) -> None:
        student = hf_model_of(state.model)
        path = self.teacher_path or getattr(student.config, '_name_or_path', '')
        if not path or not (Path(path) / 'config.json').is_file():
            raise ConfigError('shear_distill.teacher is not set and the model was not loaded from a local folder '
                              f'({path!r}); name the teacher\'s Hugging Face folder')
        if self.teacher_path is None and not any(type(a).__name__ == 'ShearPruning' for a in state.algorithms):
            log.warning('shear_distill: the teacher defaults to the model\'s own starting point (%s); in continued '
                        'pre-training set shear_distill.teacher to the source model', path)
        self.teacher_path = str(path)
        warn_if_buffers_rounded(state)
        self.teacher = load_teacher(path, self.teacher_precision, vocab_size=student.config.vocab_size)

    def _place(self, state: State, logger: Logger) -> None:
        if self._placed:
            return
        self.teacher = shard_teacher(self.teacher, state.model, state.device)
        self.teacher_bytes = local_parameter_bytes(self.teacher)
        self._placed = True
        logger.log_hyperparameters({'shear_distill/teacher': self.teacher_path,
                                    'shear_distill/teacher_bytes_per_rank': self.teacher_bytes})

    @torch.no_grad()
    def teacher_logits(self, state: State) -> torch.Tensor:
        """The teacher's logits on the current microbatch (under the run's precision context)."""
        from composer.core.precision import get_precision_context
        batch = state.batch
        inputs = {k: batch[k] for k in ('input_ids', 'attention_mask', 'position_ids') if k in batch}
        with get_precision_context(state.precision, state.precision_config):
            return self.teacher(**inputs, use_cache=False).logits

    def kd_loss(self, state: State) -> torch.Tensor:
        """The distillation term of the current microbatch."""
        outputs, batch = state.outputs, state.batch
        logits = outputs['logits'] if isinstance(outputs, Mapping) else outputs.logits
        labels = batch.get('labels')
        if labels is None:  # no labels: every attended token counts, as it would for the CE
            labels = batch['input_ids'].masked_fill(batch.get('attention_mask', 1) == 0, IGNORE_INDEX)
        return distillation_loss(logits, self.teacher_logits(state), labels, self.temperature, self.kd_type,
                                 self.top_k)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), 'teacher': self.teacher_path}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get('teacher')
        if saved and self.teacher_path and saved != self.teacher_path:
            log.warning('shear_distill: the checkpoint was trained with teacher %s, this run uses %s', saved,
                        self.teacher_path)
