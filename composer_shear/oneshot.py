"""One-shot structured pruning to an exact shape from activation importance (the baseline of the miniature
reproduction), the way Minitron (Muralidharan et al. 2024) and ShortGPT (Men et al. 2024) rank structures:

- hidden channel: mean |RMSNorm output| over tokens, summed over every norm of every layer;
- attention head: mean L2 norm of its output (the input of `o_proj`) over tokens; a KV group scores the sum of its
  heads, a query slot the sum over groups (so every group keeps the same slots, as export requires);
- MLP channel: mean |input of `down_proj`| over tokens;
- layer: block influence, mean (1 - cos(layer input, layer output)) over tokens.

The top-scoring structures are kept (exactly the target per row) and the weights pruned by the same surgery as
the Sheared export, with masks of exactly 1 on what is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from composer_shear.hooks import decoder
from composer_shear.masks import MaskSnapshot, structures_for
from composer_shear.shapes import PRUNING_MODULES, ModelShape, validate_pruning_modules
from composer_shear.surgery import build_model, prune_to_target, pruned_config

__all__ = ['importance', 'oneshot_masks', 'prune_oneshot', 'structure_scores']


@torch.no_grad()
def importance(model: nn.Module, batches: Iterable[torch.Tensor],
               forward: Callable[[torch.Tensor], Any] | None = None,
               reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Scores per structure name (layer [L], hidden [d], heads [L, H], intermediate [L, I]) over `batches`
    (an iterable of input_ids tensors), averaged over their tokens.

    `forward(ids)` runs the model (default ``model(input_ids=ids)``; e.g. through a DDP or FSDP wrapper, whose
    hooks must run); `reduce` sums a tensor over ranks (e.g. an all-reduce) before averaging, so that every rank
    gets the scores of all ranks' batches. The model's training mode is restored."""
    source = ModelShape.from_config(model.config)
    body = decoder(model)
    L, H, hd = source.num_hidden_layers, source.num_attention_heads, source.head_dim
    acc = {'hidden': torch.zeros(source.hidden_size), 'heads': torch.zeros(L, H),
           'intermediate': torch.zeros(L, source.intermediate_size), 'layer': torch.zeros(L)}
    tokens = 0
    handles = []

    def add(name: str, i: int | None = None,
            fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor | None = None) -> None:
            x = (args[0] if out is None else out).float().flatten(0, -2)
            value = fn(x).cpu()
            if i is None:
                acc[name] += value
            else:
                acc[name][i] += value
        return hook

    def influence(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 out: torch.Tensor | tuple[Any, ...]) -> None:
            x = (args[0] if args else kwargs['hidden_states']).float().flatten(0, -2)
            y = (out[0] if isinstance(out, tuple) else out).float().flatten(0, -2)
            acc['layer'][i] += (1 - torch.cosine_similarity(x, y, dim=-1)).sum().cpu()
        return hook

    per_head = lambda x: x.view(x.shape[0], H, hd).norm(dim=-1).sum(0)  # noqa: E731
    for i, layer in enumerate(body.layers):
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            handles.append(norm.register_forward_hook(add('hidden', fn=lambda x: x.abs().sum(0))))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(add('heads', i, per_head)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(add('intermediate', i,
                                                                         lambda x: x.abs().sum(0))))
        handles.append(layer.register_forward_hook(influence(i), with_kwargs=True))
    training = model.training
    model.eval()
    try:
        for ids in batches:
            model(input_ids=ids) if forward is None else forward(ids)
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    if reduce is not None:
        acc = {k: reduce(v) for k, v in acc.items()}
        tokens = int(reduce(torch.tensor([float(tokens)])).item())
    return {k: v / max(tokens, 1) for k, v in acc.items()}


def structure_scores(scores: Mapping[str, torch.Tensor], source: ModelShape) -> dict[str, torch.Tensor]:
    """`importance`'s scores per mask structure (layer, hidden, kv, query, intermediate), in each mask's shape: a KV
    group scores the sum of its heads, a query slot the sum over groups."""
    G, Q = source.num_key_value_heads, source.queries_per_group
    heads = scores['heads'].view(-1, G, Q)
    return {'layer': scores['layer'], 'hidden': scores['hidden'], 'kv': heads.sum(-1), 'query': heads.sum(-2),
            'intermediate': scores['intermediate']}


def oneshot_masks(scores: Mapping[str, torch.Tensor], source: ModelShape, target: ModelShape,
                  modules: Iterable[str]) -> dict[str, torch.Tensor]:
    """Binary masks keeping exactly the target per row: the highest scores (ties: lower index)."""
    by_name = structure_scores(scores, source)
    z = {}
    for s in structures_for(source, target, modules):
        order = torch.sort(by_name[s.name], dim=-1, descending=True, stable=True).indices[..., :s.target]
        z[s.name] = torch.zeros(s.shape).scatter_(-1, order, 1.0)
    return z


def prune_oneshot(model: nn.Module, target: Mapping[str, Any] | str, batches: Iterable[torch.Tensor],
                  pruning_modules: Sequence[str] = PRUNING_MODULES) -> Any:
    """One-shot structured pruning to an exact shape: rank structures by their activations on `batches` and
    keep the best, the way Minitron ranks width and ShortGPT ranks depth.

    Args:
        model: a Hugging Face LLaMA-family causal LM (left unchanged).
        target: HF config field names or ``{'preset': ...}``, as for :func:`apply_shear_pruning`.
        batches: calibration ``input_ids`` tensors ([batch, seq]).
        pruning_modules: which of ``layer``, ``hidden``, ``head``, ``intermediate`` to prune.

    Returns:
        The pruned ``PreTrainedModel`` (the source's class and dtype, eval mode, CPU).

    Example:
        >>> calib = [torch.randint(0, 49152, (8, 256)) for _ in range(4)]
        >>> small = prune_oneshot(model, {'num_hidden_layers': 24, 'hidden_size': 480}, calib,
        ...                       pruning_modules=('layer', 'hidden'))
    """
    source = ModelShape.from_config(model.config)
    modules = validate_pruning_modules(pruning_modules)
    goal = source.resolve_target(target, modules)
    pruned_config(model.config, goal, torch.float32)  # a shape the installed transformers cannot hold: now
    z = oneshot_masks(importance(model, batches), source, goal, modules)
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    snap = MaskSnapshot(source, goal, z=z)
    pruned, config = prune_to_target(sd, snap, model.config)
    return build_model(pruned, config)
