"""The shape search: which shape under a parameter budget keeps the most of the source.

Every candidate from :func:`~composer_shear.budget.candidate_shapes` is pruned one-shot from the same importance
scores (no recomputation per shape) and scored on held-out sequences: the next-token loss, or the KL divergence to
the source. Optionally the best ``top_k`` are trained briefly with distillation from the source (``probe_steps``)
and scored again, since a shape's one-shot loss need not predict how well it recovers; the winner is the best after
probing. This is the score-every-candidate search of Minitron (Muralidharan et al. 2024, as ModelOpt's
``mcore_minitron`` mode runs it) on the masks and surgery of this package.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from composer_shear.budget import Budget, SearchSpace, candidate_shapes, count, describe_shape
from composer_shear.errors import ShapeError
from composer_shear.kd import distillation_loss
from composer_shear.masks import MaskSnapshot, structures_for
from composer_shear.oneshot import oneshot_masks
from composer_shear.shapes import STRUCTURE_MODULES, ModelShape
from composer_shear.surgery import build_model, prune_to_target

__all__ = ['SCORES', 'Candidate', 'SearchResult', 'evaluate', 'masks_to_hold', 'probe', 'prune_shape', 'score_masked',
           'search_shapes', 'spread']

SCORES = ('loss', 'kl')


@dataclass
class Candidate:
    """One searched shape: its parameters, its one-shot score and (when probed) its score after probing."""
    shape: ModelShape
    params: int
    non_embedding_params: int
    score: float
    seconds: float
    probe_score: float | None = None

    def row(self) -> dict[str, Any]:
        return self.shape.target_dict() | {'params': self.params, 'non_embedding_params': self.non_embedding_params,
                                           'score': self.score, 'probe_score': self.probe_score,
                                           'seconds': round(self.seconds, 3)}

    @property
    def final(self) -> float:
        return self.score if self.probe_score is None else self.probe_score


@dataclass
class SearchResult:
    """The candidates scored (in search order), the winner, and what the search saw."""
    budget: Budget
    best: Candidate
    candidates: list[Candidate]
    enumerated: int
    score: str
    probe_steps: int
    seconds: float
    space: SearchSpace = field(default_factory=SearchSpace)

    def to_dict(self) -> dict[str, Any]:
        return {'budget': {'kind': self.budget.kind, 'value': self.budget.value, 'fixed': self.budget.fixed},
                'space': asdict(self.space), 'score': self.score, 'probe_steps': self.probe_steps,
                'enumerated': self.enumerated, 'scored': len(self.candidates), 'seconds': round(self.seconds, 2),
                'best': self.best.row(), 'candidates': [c.row() for c in self.candidates]}


def spread(items: Sequence[Any], k: int) -> list[Any]:
    """`k` items evenly spaced over `items` (all of them when there are no more than `k`), first and last included.

    Example:
        >>> spread(list(range(10)), 4)
        [0, 3, 6, 9]
    """
    n = len(items)
    if n <= k:
        return list(items)
    if k == 1:
        return [items[0]]
    return [items[round(i * (n - 1) / (k - 1))] for i in range(k)]


def prune_shape(state: Mapping[str, torch.Tensor], config: Any, scores: Mapping[str, torch.Tensor],
                source: ModelShape, shape: ModelShape, modules: Sequence[str]) -> nn.Module:
    """The source (its CPU state dict `state` and `config`) pruned one-shot to `shape` by the importance
    `scores`."""
    z = oneshot_masks(scores, source, shape, modules)
    pruned, new_config = prune_to_target(dict(state), MaskSnapshot(source, shape, z=z), config)
    return build_model(pruned, new_config)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[torch.Tensor], score: str = 'loss',
             teacher: nn.Module | None = None) -> float:
    """The token-weighted mean next-token CE of `model` on `batches` (``score='loss'``), or its forward KL to
    `teacher`'s next-token distributions (``'kl'``). Batches are ``input_ids`` tensors on the model's device."""
    if score not in SCORES:
        raise ShapeError(f'score must be one of {", ".join(SCORES)}, got {score!r}')
    if score == 'kl' and teacher is None:
        raise ValueError('score kl needs the teacher (the source model)')
    model.eval()
    total, tokens = 0.0, 0
    for ids in batches:
        logits = model(input_ids=ids).logits.float()
        n = ids[:, 1:].numel()
        if score == 'loss':
            value = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction='sum').item()
        else:
            value = distillation_loss(logits, teacher(input_ids=ids).logits.float(), ids).item() * n
        total, tokens = total + value, tokens + n
    return total / max(tokens, 1)


def probe(model: nn.Module, teacher: nn.Module, batches: Sequence[torch.Tensor], steps: int,
          lr: float = 1e-4) -> nn.Module:
    """Train `model` in place for `steps` steps of forward-KL distillation from `teacher` on `batches` (cycled),
    AdamW at a constant `lr`, in fp32 master weights when the model is in a lower precision; returns it in eval
    mode."""
    dtype = next(model.parameters()).dtype
    model.float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    autocast = torch.autocast(next(model.parameters()).device.type, dtype=dtype, enabled=dtype != torch.float32)
    for step in range(steps):
        ids = batches[step % len(batches)]
        with torch.no_grad():
            target = teacher(input_ids=ids).logits.float()
        with autocast:
            logits = model(input_ids=ids).logits
        loss = distillation_loss(logits.float(), target, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.to(dtype).eval()


def search_shapes(model: nn.Module, budget: Budget, scores: Mapping[str, torch.Tensor],
                  held_out: Sequence[torch.Tensor], space: SearchSpace | None = None, max_candidates: int = 48,
                  score: str = 'loss', probe_steps: int = 0, top_k: int = 3,
                  probe_batches: Sequence[torch.Tensor] = (), probe_lr: float = 1e-4,
                  progress: bool = True, log: Callable[[str], None] | None = None) -> SearchResult:
    """Pick the best shape under `budget`: enumerate, score up to `max_candidates` of them (evenly spread over the
    layers, hidden sizes and heads when there are more) by one-shot pruning with `scores` (from
    :func:`~composer_shear.oneshot.importance`) and their `score` on `held_out`; with `probe_steps`, train the best
    `top_k` that long with distillation on `probe_batches` and score them again.

    Args:
        model: the source Hugging Face causal LM (left unchanged; also the teacher for ``kl`` and probing).
        budget: from :func:`~composer_shear.budget.parse_target`.
        scores: the source's importance scores.
        held_out: ``input_ids`` batches on the model's device, disjoint from the calibration ones.
        space: the shapes allowed (grid, tolerance, depth and width limits, pruning modules).

    Returns:
        The :class:`SearchResult`; ``result.best.shape`` is the winner.

    Example:
        >>> result = search_shapes(model, parse_target('params=75M'), importance(model, calib), held_out)
        >>> small = prune_shape(model.state_dict(), model.config, scores, source, result.best.shape, MODULES)
    """
    from tqdm import tqdm
    if score not in SCORES:
        raise ShapeError(f'score must be one of {", ".join(SCORES)}, got {score!r}')
    start = time.perf_counter()
    space = space or SearchSpace()
    source = ModelShape.from_config(model.config)
    shapes = candidate_shapes(source, budget, space)
    chosen = spread(shapes, max_candidates)
    if log and len(chosen) < len(shapes):
        log(f'{len(shapes)} shapes fit {budget.describe()}; scoring {len(chosen)} spread over them '
            f'(max_candidates)')
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    teacher = model.eval()
    candidates = []
    for shape in tqdm(chosen, desc='shapes', unit='shape', disable=not progress):
        t = time.perf_counter()
        small = prune_shape(state, model.config, scores, source, shape, space.pruning_modules).to(device, dtype)
        value = evaluate(small, held_out, score, teacher)
        candidates.append(Candidate(shape, count(shape, 'params'), count(shape, 'non_embedding_params'), value,
                                    time.perf_counter() - t))
        del small
    if probe_steps:
        if not probe_batches:
            raise ValueError('probe_steps needs probe_batches')
        best_k = sorted(candidates, key=lambda c: c.score)[:top_k]
        for c in tqdm(best_k, desc='probe', unit='shape', disable=not progress):
            t = time.perf_counter()
            small = prune_shape(state, model.config, scores, source, c.shape, space.pruning_modules)
            small = probe(small.to(device, dtype), teacher, probe_batches, probe_steps, probe_lr)
            c.probe_score = evaluate(small, held_out, score, teacher)
            c.seconds += time.perf_counter() - t
            del small
        pool = best_k
    else:
        pool = candidates
    best = min(pool, key=lambda c: c.final)
    if log:
        log(f'best: {describe_shape(best.shape)} ({best.params:,} parameters, {score} {best.final:.4f})')
    return SearchResult(budget, best, candidates, len(shapes), score, probe_steps, time.perf_counter() - start,
                        space)


def masks_to_hold(source: ModelShape, shapes: Sequence[ModelShape], modules: Sequence[str]) -> list[str]:
    """The mask structures any of `shapes` prunes: what a run must hold logits for before it picks one."""
    names = {s.name for shape in shapes for s in structures_for(source, shape, modules)}
    return [n for n in STRUCTURE_MODULES if n in names]


@torch.no_grad()
def score_masked(masks: nn.Module, shapes: Sequence[ModelShape], scores: Mapping[str, torch.Tensor],
                 batches: Sequence[torch.Tensor], forward: Callable[[torch.Tensor], Any],
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[float]:
    """Each shape's next-token loss on `batches`, computed through the masked source with the shape's one-shot
    selection installed in the hooks: the pruned model's loss (masked = exported), with no model built, so it runs
    on a model that DDP or FSDP wraps (`forward(ids)` calls it; `reduce` sums over ranks, so every rank gets the
    same losses). The hooks are cleared afterwards.

    Example:
        >>> losses = score_masked(masks, shapes, importance(model, calib), held_out, lambda ids: model(input_ids=ids))
    """
    source = masks.source
    modules = list(masks.pruning_modules)
    out = []
    try:
        for shape in shapes:
            z = oneshot_masks(scores, source, shape, modules)
            device = batches[0].device
            masks.hooks.set({k: v.to(device) for k, v in z.items()})
            total = torch.zeros(2, dtype=torch.float64)
            for ids in batches:
                logits = forward(ids).logits.float()
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction='sum')
                total += torch.tensor([loss.item(), ids[:, 1:].numel()], dtype=torch.float64)
            if reduce is not None:
                total = reduce(total)
            out.append(float(total[0] / total[1]))
    finally:
        masks.hooks.set(None)
    return out
