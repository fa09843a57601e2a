"""The distillation loss and the teacher's loading and placement: torch and transformers only (no Composer), so a
plain training loop, or a machine without Composer, uses them as they are. The ``shear_distill`` Algorithm
(:mod:`composer_shear.distill`) is plumbing over these.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from composer_shear._hf import dtype_kwargs
from composer_shear.errors import ConfigError
from composer_shear.hooks import decoder

__all__ = ['IGNORE_INDEX', 'KD_TYPES', 'PRECISIONS', 'block_rows', 'compose_loss', 'distillation_loss',
           'fsdp2_mesh', 'load_teacher', 'load_teacher_sharded', 'local_parameter_bytes', 'safetensors_files',
           'shard_teacher', 'teacher_config', 'teacher_forward']

KD_TYPES = ('forward_kl', 'reverse_kl')
PRECISIONS = {'fp32': torch.float32, 'bf16': torch.bfloat16}
IGNORE_INDEX = -100  # Hugging Face's (and llm-foundry's) label of a token that takes no loss


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float = 1.0, kd_type: str = 'forward_kl', top_k: int | None = None,
                      ignore_index: int = IGNORE_INDEX,
                      teacher_head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """KL divergence between the teacher's and the student's next-token distributions, per token, averaged.

    Position ``t`` of the logits predicts ``labels[:, t + 1]`` (the causal-LM shift Hugging Face's loss uses); a
    position whose next label is `ignore_index` (padding, masked prompt) is left out, as it is from the CE.

    Args:
        student_logits: ``(batch, seq, vocab)``; gradients flow through it.
        teacher_logits: ``(batch, seq, vocab)``; treated as constant. With `teacher_head`: the teacher's final
            hidden states ``(batch, seq, hidden)`` instead, and the head makes its logits block by block.
        labels: ``(batch, seq)`` token ids with `ignore_index` where no loss is taken.
        temperature: both distributions are softened as ``softmax(logits / T)``; the KL is multiplied by ``T**2``
            (Hinton et al. 2015) so that its gradients keep their scale.
        kd_type: ``forward_kl`` = KL(teacher || student) (mode-covering; Minitron's), ``reverse_kl`` =
            KL(student || teacher) (mode-seeking).
        top_k: forward KL over the teacher's `top_k` most likely tokens only, the teacher renormalised over them
            (the student keeps its full-vocabulary normalisation).
        ignore_index: the label of tokens that take no loss.
        teacher_head: the teacher's output layer (hidden states -> logits, no gradient); given, the teacher's
            logits are never held for all positions at once (``top_k`` still makes them whole).

    Returns:
        A scalar (0 with a gradient path when no token counts).

    Example:
        >>> kd = distillation_loss(student(**batch).logits, teacher_logits, batch['labels'], temperature=2.0)
    """
    if kd_type not in KD_TYPES:
        raise ConfigError(f'kd_type must be one of {", ".join(KD_TYPES)}, got {kd_type!r}')
    if top_k is not None and teacher_head is not None:
        with torch.no_grad():
            teacher_logits, teacher_head = teacher_head(teacher_logits), None
    if student_logits.shape[:-1] != teacher_logits.shape[:-1] or (
            teacher_head is None and student_logits.shape != teacher_logits.shape):
        raise ValueError(f'student logits {tuple(student_logits.shape)} and teacher '
                         f'{"logits" if teacher_head is None else "hidden states"} {tuple(teacher_logits.shape)} '
                         'differ in shape')
    keep = labels[:, 1:] != ignore_index
    if top_k is not None:
        if kd_type != 'forward_kl':
            raise ConfigError('top_k is only defined for kd_type forward_kl')
        return _top_k_kl(student_logits, teacher_logits, keep, temperature, top_k)
    count = int(keep.sum())
    if count == 0:
        return student_logits.sum() * 0.0
    weights = keep.float() * (temperature ** 2 / count)  # the mean over kept tokens, x T^2
    return _FusedKL.apply(student_logits, teacher_logits.detach(), weights, float(temperature),
                          kd_type == 'reverse_kl', teacher_head)


def _top_k_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, keep: torch.Tensor, temperature: float,
              top_k: int) -> torch.Tensor:
    """Forward KL over the teacher's top-k tokens (teacher renormalised over them), through autograd."""
    student = student_logits[:, :-1][keep].float() / temperature  # (tokens, vocab)
    teacher = teacher_logits[:, :-1][keep].detach().float() / temperature
    if student.shape[0] == 0:
        return student_logits.sum() * 0.0
    values, index = teacher.topk(min(top_k, teacher.shape[-1]), dim=-1)
    teacher_log = F.log_softmax(values, dim=-1)
    student_log = F.log_softmax(student, dim=-1).gather(-1, index)
    return (teacher_log.exp() * (teacher_log - student_log)).sum(-1).mean() * temperature ** 2


BLOCK_ELEMENTS = 2 ** 25  # positions x vocabulary of one fp32 working block (128 MiB), whatever the vocabulary


def block_rows(vocab_size: int) -> int:
    """Positions per working block of the KD loss: 682 at 49,152 tokens, 261 at 128,256."""
    return max(1, BLOCK_ELEMENTS // vocab_size)


class _FusedKL(torch.autograd.Function):
    """sum over positions of weight * KL(next-token distributions), full vocabulary, with the gradient with respect to
    the student's logits computed in the forward pass, block by block: the autograd graph of the plain formula keeps
    about ten (tokens x vocab) fp32 tensors alive; this keeps one, the gradient, in the logits' dtype, and a working
    set of a few fp32 blocks of `block_rows` positions (with a teacher head, the teacher's logits exist one block at
    a time too).

    d KL(t || s) / d z_s = (p_s - p_t) / T;  d KL(s || t) / d z_s = p_s * (log p_s - log p_t - KL) / T."""

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, temperature: float,
                reverse: bool, head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        grad = torch.zeros_like(student)  # the last position predicts nothing
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        step = block_rows(student.shape[-1])
        for b in range(student.shape[0]):
            kept = weights[b] > 0
            rows = None if bool(kept.all()) else kept.nonzero().squeeze(-1)  # None: every position (a view)
            n = kept.numel() if rows is None else rows.numel()
            for i in range(0, n, step):
                r = slice(i, min(i + step, n)) if rows is None else rows[i:i + step]
                s = F.log_softmax(student[b, r].float() / temperature, dim=-1)
                t = teacher[b, r] if head is None else head(teacher[b, r])
                t = F.log_softmax(t.float() / temperature, dim=-1)
                w = weights[b, r].unsqueeze(-1)
                if reverse:
                    p = s.exp()
                    diff = s.sub_(t)  # log p_s - log p_t
                    kl = (p * diff).sum(-1, keepdim=True)
                    g = diff.sub_(kl).mul_(p)
                else:
                    p = t.exp()
                    kl = (p * (t - s)).sum(-1, keepdim=True)
                    g = s.exp_().sub_(p)
                total += (w * kl).sum()
                grad[b, r] = g.mul_(w / temperature).to(grad.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        # in place: no second logits-sized tensor (a graph is backpropagated once; Composer never retains it)
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None, None, None


def compose_loss(loss: torch.Tensor | Mapping[str, torch.Tensor], kd: torch.Tensor,
                 alpha: float) -> dict[str, torch.Tensor]:
    """The loss dict Composer backpropagates: ``total = (1 - alpha) * ce + alpha * kd + other terms``.

    `loss` is the model's CE, or a dict from another algorithm with ``ce`` and ``total`` (e.g. ``shear_pruning``'s
    ``lag`` term, which is kept). ``alpha`` 0 gives exactly the CE, 1 exactly the KD (no zero-weighted term is added,
    so alpha 0 trains bit for bit as without distillation).

    Example:
        >>> state.loss = compose_loss(state.loss, kd, alpha=0.5)   # {'ce', 'kd', 'total'}
    """
    if isinstance(loss, Mapping):
        if 'ce' not in loss:
            raise ValueError(f'shear_distill: the loss is a dict without a "ce" entry ({", ".join(loss)}); '
                             'cannot tell which term to distil')
        ce, others = loss['ce'], {k: v for k, v in loss.items() if k not in ('ce', 'kd', 'total')}
    else:
        ce, others = loss, {}
    if alpha == 0:
        total = ce
    elif alpha == 1:
        total = kd
    else:
        total = (1 - alpha) * ce + alpha * kd
    for term in others.values():
        total = total + term
    return {'ce': ce, **others, 'kd': kd, 'total': total}


def teacher_config(folder: str | os.PathLike, precision: str = 'fp32', vocab_size: int | None = None) -> Any:
    """The teacher's Hugging Face config, checked (no weights are read): a folder with ``config.json``, a known
    precision, the student's vocabulary.

    Raises:
        ConfigError: a missing folder, an unknown precision, or another vocabulary.
    """
    from transformers import AutoConfig
    if precision not in PRECISIONS:
        raise ConfigError(f'shear_distill.teacher_precision must be one of {", ".join(PRECISIONS)}, got {precision!r}')
    folder = Path(folder)
    if not (folder / 'config.json').is_file():
        raise ConfigError(f'shear_distill.teacher: {folder} is not a Hugging Face model folder (no config.json)')
    config = AutoConfig.from_pretrained(folder)
    if vocab_size is not None and config.vocab_size != vocab_size:
        raise ConfigError(f'shear_distill.teacher: {folder} has a vocabulary of {config.vocab_size} tokens, the '
                          f'student {vocab_size}; distillation needs the same tokenizer')
    return config


def _frozen(teacher: nn.Module) -> nn.Module:
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def load_teacher(folder: str | os.PathLike, precision: str = 'fp32', vocab_size: int | None = None) -> nn.Module:
    """Load a whole frozen teacher (eval mode, no gradients) from a Hugging Face folder.

    Args:
        folder: an HF causal-LM folder (config and weights).
        precision: ``fp32`` or ``bf16`` (the teacher's weights and forward).
        vocab_size: the student's vocabulary size; a teacher with another one is refused.

    Raises:
        ConfigError: a missing folder, an unknown precision, or another vocabulary.

    Example:
        >>> teacher = load_teacher('SmolLM2-135M', 'bf16', vocab_size=student.config.vocab_size)
    """
    from transformers import AutoModelForCausalLM
    config = teacher_config(folder, precision, vocab_size)
    return _frozen(AutoModelForCausalLM.from_pretrained(folder, config=config, **dtype_kwargs(PRECISIONS[precision])))


def safetensors_files(folder: str | os.PathLike) -> dict[str, Path] | None:
    """Tensor name -> the ``.safetensors`` file holding it, from ``model.safetensors`` or its index; None when the
    folder has neither (e.g. ``pytorch_model.bin``)."""
    import json
    folder = Path(folder)
    index = folder / 'model.safetensors.index.json'
    if index.is_file():
        return {name: folder / file for name, file in json.loads(index.read_text())['weight_map'].items()}
    single = folder / 'model.safetensors'
    if not single.is_file():
        return None
    from safetensors import safe_open
    with safe_open(single, framework='pt') as f:
        return {name: single for name in f.keys()}


def fsdp2_mesh(model: nn.Module) -> Any:
    """The device mesh of `model`'s FSDP2-sharded parameters, or None when it is not FSDP2-sharded."""
    from torch.distributed.tensor import DTensor
    return next((p.device_mesh for p in model.parameters() if isinstance(p, DTensor)), None)


def _fully_shard(teacher: nn.Module, mesh: Any) -> None:
    """FSDP2 over `mesh`: each decoder layer, then the root (embeddings, final norm, output layer)."""
    from torch.distributed.fsdp import fully_shard
    for layer in decoder(teacher).layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(teacher, mesh=mesh, reshard_after_forward=True)


def load_teacher_sharded(folder: str | os.PathLike, mesh: Any, precision: str = 'fp32',
                         vocab_size: int | None = None) -> tuple[nn.Module, int]:
    """Build the teacher FSDP2-sharded over `mesh` without ever holding it whole: built on the meta device, sharded
    like `shard_teacher` does, then each rank reads from the ``.safetensors`` files only the rows of its own shards
    (host memory per rank: its shards, plus one tensor's rows at a time). The shards are on the mesh's device
    (the current CUDA device for a ``cuda`` mesh).

    Returns:
        The teacher and the bytes of weights this rank read (counted in the teacher's dtype).

    Raises:
        ConfigError: as `teacher_config`, or a folder without ``.safetensors`` files or missing a tensor.

    Example:
        >>> teacher, read = load_teacher_sharded('Llama-3.1-8B', fsdp2_mesh(student), 'bf16')
    """
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from transformers import AutoModelForCausalLM

    config = teacher_config(folder, precision, vocab_size)
    files = safetensors_files(folder)
    if files is None:
        raise ConfigError(f'shear_distill.teacher: {folder} has no .safetensors weights to read by shard')
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (RoPE's) computed on the CPU
        teacher = AutoModelForCausalLM.from_config(config, **dtype_kwargs(PRECISIONS[precision]))
    teacher.tie_weights()  # not done on the meta device (tie_word_embeddings: the output layer is the embedding)
    _frozen(teacher)
    buffers = {name: b.clone() for name, b in teacher.named_buffers()}
    _fully_shard(teacher, mesh)
    device = torch.device('cuda', torch.cuda.current_device()) if mesh.device_type == 'cuda' else mesh.device_type
    teacher.to_empty(device=device)  # this rank's shards, uninitialised (and empty buffers)
    for name, b in teacher.named_buffers():
        b.copy_(buffers[name])
    handles, read = {}, 0
    try:
        for name, param in teacher.named_parameters():
            if name not in files:
                raise ConfigError(f'shear_distill.teacher: {folder} has no tensor {name}')
            if files[name] not in handles:
                handles[files[name]] = safe_open(files[name], framework='pt')
            local = param.to_local()
            shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
            if local.numel() == 0:
                continue
            rows = handles[files[name]].get_slice(name)[offset[0]:offset[0] + shape[0]]  # FSDP2 shards dim 0
            local.copy_(rows.to(local.dtype))
            read += rows.numel() * local.element_size()
    finally:
        handles.clear()
    return teacher, read


def shard_teacher(teacher: nn.Module, student: nn.Module, device: Any = None) -> nn.Module:
    """Place a whole `teacher` the way `student` is distributed: sharded over the same device mesh when the student
    is FSDP2 (``fully_shard`` per decoder layer, then the root), wrapped per decoder layer when it is FSDP1,
    otherwise a whole replica moved to `device` (a Composer device or a torch device).

    Returns:
        The teacher to call (the FSDP1 wrapper, or `teacher` itself).

    Example:
        >>> teacher = shard_teacher(load_teacher('SmolLM2-135M'), state.model, state.device)
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    mesh = fsdp2_mesh(student)
    if mesh is not None:
        _fully_shard(teacher, mesh)
        return teacher
    if any(isinstance(m, FSDP) for m in student.modules()):
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        layer_cls = type(decoder(teacher).layers[0])
        return FSDP(teacher, auto_wrap_policy=ModuleWrapPolicy({layer_cls}), use_orig_params=True,
                    device_id=torch.cuda.current_device() if torch.cuda.is_available() else None)
    if device is not None:
        return device.module_to_device(teacher) if hasattr(device, 'module_to_device') else teacher.to(device)
    return teacher


@torch.no_grad()
def teacher_forward(teacher: nn.Module, inputs: Mapping[str, torch.Tensor],
                    context: Callable[[], Any] = nullcontext) -> tuple[torch.Tensor, Callable | None]:
    """The teacher's forward for `distillation_loss`: its final hidden states and its output layer, to make the
    logits block by block (`teacher_head`), or its logits and None for a teacher whose logits are more than its
    output layer (final soft-capping) or that FSDP1 wraps whole.

    Args:
        teacher: the frozen teacher (whole, or FSDP2-sharded as `shard_teacher` or `load_teacher_sharded` leave it).
        inputs: ``input_ids`` and optionally ``attention_mask``, ``position_ids``.
        context: entered for the forward and for each call of the head (e.g. the run's autocast).

    Example:
        >>> hidden, head = teacher_forward(teacher, {'input_ids': ids})
        >>> kd = distillation_loss(student_logits, hidden, labels, teacher_head=head)
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    head = getattr(teacher, 'lm_head', None)
    capped = getattr(getattr(teacher, 'config', None), 'final_logit_softcapping', None)
    if isinstance(teacher, FSDP) or not isinstance(head, nn.Module) or capped:
        with context():
            return teacher(**inputs, use_cache=False).logits, None
    teacher.lm_head = nn.Identity()  # the forward stops at the final norm
    try:
        with context():
            hidden = teacher(**inputs, use_cache=False).logits
    finally:
        teacher.lm_head = head
    if isinstance(teacher, FSDPModule):
        teacher.unshard()  # collective on every rank; a no-op while the root's parameters are still gathered

    def apply(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), context():
            return head(x)

    return hidden, apply


def local_parameter_bytes(module: nn.Module) -> int:
    """Bytes of `module`'s parameters held by this rank (a sharded parameter counts its local shard)."""
    from torch.distributed.tensor import DTensor
    total = 0
    for p in module.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total
