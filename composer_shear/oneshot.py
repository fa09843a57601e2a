"""One-shot structured pruning to an exact shape from activation importance (the baseline of the miniature
reproduction), the way Minitron (Muralidharan et al. 2024) and ShortGPT (Men et al. 2024) rank structures:

- hidden channel: mean |RMSNorm output| over tokens, summed over every norm of every layer;
- attention head: mean L2 norm of its output (the input of `o_proj`) over tokens; a KV group scores the sum of its
  heads, a query slot the sum over groups (so every group keeps the same slots, as export requires);
- MLP channel: mean |input of `down_proj`| over tokens;
- layer: block influence, mean (1 - cos(layer input, layer output)) over tokens.

The top-scoring structures are kept (exactly the target per row) and the weights pruned with the same
`prune_state_dict` as the Sheared export, with masks of exactly 1 on what is kept.
"""

from __future__ import annotations

import torch

from composer_shear.llama import decoder, prune_state_dict, weights_to_prune
from composer_shear.masks import structures_for
from composer_shear.shapes import ModelShape


@torch.no_grad()
def importance(model, batches) -> dict[str, torch.Tensor]:
    """Scores per structure name (layer [L], hidden [d], heads [L, H], intermediate [L, I]) over `batches`
    (an iterable of input_ids tensors)."""
    source = ModelShape.from_config(model.config)
    body = decoder(model)
    L, H, hd = source.num_hidden_layers, source.num_attention_heads, source.head_dim
    acc = {'hidden': torch.zeros(source.hidden_size), 'heads': torch.zeros(L, H),
           'intermediate': torch.zeros(L, source.intermediate_size), 'layer': torch.zeros(L)}
    tokens = 0
    handles = []

    def add(name, i=None, fn=None):
        def hook(module, args, out=None):
            x = (args[0] if out is None else out).float().flatten(0, -2)
            value = fn(x)
            if i is None:
                acc[name] += value
            else:
                acc[name][i] += value
        return hook

    def influence(i):
        def hook(module, args, kwargs, out):
            x = (args[0] if args else kwargs['hidden_states']).float().flatten(0, -2)
            y = (out[0] if isinstance(out, tuple) else out).float().flatten(0, -2)
            acc['layer'][i] += (1 - torch.cosine_similarity(x, y, dim=-1)).sum()
        return hook

    per_head = lambda x: x.view(x.shape[0], H, hd).norm(dim=-1).sum(0)  # noqa: E731
    for i, layer in enumerate(body.layers):
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            handles.append(norm.register_forward_hook(add('hidden', fn=lambda x: x.abs().sum(0))))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(add('heads', i, per_head)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(add('intermediate', i,
                                                                         lambda x: x.abs().sum(0))))
        handles.append(layer.register_forward_hook(influence(i), with_kwargs=True))
    model.eval()
    try:
        for ids in batches:
            model(input_ids=ids)
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return {k: v / max(tokens, 1) for k, v in acc.items()}


def oneshot_masks(scores: dict, source: ModelShape, target: ModelShape, modules) -> dict[str, torch.Tensor]:
    """Binary masks keeping exactly the target per row: the highest scores (ties: lower index)."""
    G, Q = source.num_key_value_heads, source.queries_per_group
    heads = scores['heads'].view(-1, G, Q)
    by_name = {'layer': scores['layer'], 'hidden': scores['hidden'], 'kv': heads.sum(-1),
               'query': heads.sum(-2), 'intermediate': scores['intermediate']}
    z = {}
    for s in structures_for(source, target, modules):
        order = torch.sort(by_name[s.name], dim=-1, descending=True, stable=True).indices[..., :s.target]
        z[s.name] = torch.zeros(s.shape).scatter_(-1, order, 1.0)
    return z


def prune_oneshot(model, target: dict, batches, modules=('layer', 'hidden', 'head', 'intermediate')):
    """Returns (pruned HF state dict, its shape) for `model` pruned to `target` (HF field names or a preset)."""
    source = ModelShape.from_config(model.config)
    goal = source.resolve_target(target, modules)
    z = oneshot_masks(importance(model, batches), source, goal, modules)
    return prune_state_dict(weights_to_prune(model.state_dict(), source), source, z)
