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
    fsdp2_mesh,
    load_teacher,
    load_teacher_sharded,
    local_parameter_bytes,
    safetensors_files,
    shard_teacher,
    teacher_config,
    teacher_forward,
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
        self.teacher_read = 0  # the bytes of teacher weights this rank read from disk
        self._vocab_size: int | None = None

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
        self._vocab_size = student.config.vocab_size
        teacher_config(path, self.teacher_precision, vocab_size=self._vocab_size)  # bad input before any weight

    def _place(self, state: State, logger: Logger) -> None:
        """Read the teacher once the student is distributed: under FSDP2 each rank reads only its own shards (from
        ``.safetensors``); otherwise whole, then placed like the student."""
        if self.teacher is not None:
            return
        mesh = fsdp2_mesh(state.model)
        if mesh is not None and safetensors_files(self.teacher_path) is not None:
            self.teacher, self.teacher_read = load_teacher_sharded(self.teacher_path, mesh, self.teacher_precision,
                                                                   self._vocab_size)
        else:
            if mesh is not None:
                log.warning('shear_distill: %s has no .safetensors weights, so every rank reads the whole teacher '
                            'before sharding it', self.teacher_path)
            teacher = load_teacher(self.teacher_path, self.teacher_precision, vocab_size=self._vocab_size)
            self.teacher_read = local_parameter_bytes(teacher)
            self.teacher = shard_teacher(teacher, state.model, state.device)
        self.teacher_bytes = local_parameter_bytes(self.teacher)
        logger.log_hyperparameters({'shear_distill/teacher': self.teacher_path,
                                    'shear_distill/teacher_bytes_per_rank': self.teacher_bytes,
                                    'shear_distill/teacher_bytes_read_per_rank': self.teacher_read})

    def teacher_outputs(self, state: State) -> tuple[torch.Tensor, Any]:
        """The teacher's final hidden states and output layer on the current microbatch (or its logits and None),
        under the run's precision context: `composer_shear.kd.teacher_forward`."""
        from composer.core.precision import get_precision_context
        batch = state.batch
        inputs = {k: batch[k] for k in ('input_ids', 'attention_mask', 'position_ids') if k in batch}
        return teacher_forward(self.teacher, inputs,
                               lambda: get_precision_context(state.precision, state.precision_config))

    def kd_loss(self, state: State) -> torch.Tensor:
        """The distillation term of the current microbatch."""
        outputs, batch = state.outputs, state.batch
        logits = outputs['logits'] if isinstance(outputs, Mapping) else outputs.logits
        labels = batch.get('labels')
        if labels is None:  # no labels: every attended token counts, as it would for the CE
            labels = batch['input_ids'].masked_fill(batch.get('attention_mask', 1) == 0, IGNORE_INDEX)
        hidden, head = self.teacher_outputs(state)
        return distillation_loss(logits, hidden, labels, self.temperature, self.kd_type, self.top_k,
                                 teacher_head=head)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), 'teacher': self.teacher_path}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get('teacher')
        if saved and self.teacher_path and saved != self.teacher_path:
            log.warning('shear_distill: the checkpoint was trained with teacher %s, this run uses %s', saved,
                        self.teacher_path)
