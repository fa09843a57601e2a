"""Apply masks to a Hugging Face LLaMA-family model with hooks, and prune its weights physically.

Mask placement (the same for eager, sdpa and flash attention):
- hidden: scales the embedding output and each branch output before the residual add; every RMSNorm takes
  its variance over kept dims only; the final norm's output is scaled too (so a tied lm_head matches);
- layer: scales both branch outputs of a layer;
- heads: per query head h = g * Q + s, the gate kv[g] * query[s] scales the attention output before o_proj;
- intermediate: scales the input of down_proj.
"""

from __future__ import annotations

import torch
from torch import nn

from composer_shear.shapes import ModelShape, ShapeError


def decoder(hf_model: nn.Module):
    """The LlamaModel-like body of a *ForCausalLM, checked for the standard module names."""
    body = getattr(hf_model, 'model', None)
    ok = body is not None and all(hasattr(body, n) for n in ('embed_tokens', 'layers', 'norm'))
    if ok:
        layer = body.layers[0]
        ok = all(hasattr(layer, n) for n in ('self_attn', 'mlp', 'input_layernorm', 'post_attention_layernorm'))
        ok = ok and all(hasattr(layer.self_attn, n) for n in ('q_proj', 'k_proj', 'v_proj', 'o_proj'))
        ok = ok and all(hasattr(layer.mlp, n) for n in ('gate_proj', 'up_proj', 'down_proj'))
    if not ok:
        raise ShapeError(f'{type(hf_model).__name__} is not a LLaMA-family causal LM '
                         '(expected model.embed_tokens, model.layers[i].self_attn.{q,k,v,o}_proj, '
                         'mlp.{gate,up,down}_proj, RMSNorms)')
    return body


def head_gates(z: dict, source: ModelShape):
    """[L, H] gate per query head from the KV-group and query-slot masks, or None."""
    if 'kv' not in z and 'query' not in z:
        return None
    L, G, Q = source.num_hidden_layers, source.num_key_value_heads, source.queries_per_group
    kv = z['kv'] if 'kv' in z else torch.ones(L, G, device=z['query'].device)
    q = z['query'] if 'query' in z else torch.ones(L, Q, device=kv.device)
    return (kv[:, :, None] * q[:, None, :]).reshape(L, G * Q)


class MaskedForward:
    """Hooks on an HF model reading the current masks; `set(z)` installs masks, `set(None)` disables."""

    def __init__(self, hf_model: nn.Module, source: ModelShape):
        self.source = source
        self.z = None
        self.handles = []
        body = decoder(hf_model)
        self.handles.append(body.embed_tokens.register_forward_hook(self._scale_hidden))
        self.handles.append(body.norm.register_forward_hook(self._final_norm))
        for i, layer in enumerate(body.layers):
            self.handles.append(layer.self_attn.register_forward_hook(self._branch(i, tuple_out=True)))
            self.handles.append(layer.mlp.register_forward_hook(self._branch(i, tuple_out=False)))
            self.handles.append(layer.self_attn.o_proj.register_forward_pre_hook(self._heads(i)))
            self.handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._intermediate(i)))
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                self.handles.append(norm.register_forward_hook(self._norm))

    def set(self, z: dict | None):
        if z is None:
            self.z = None
            return
        heads = head_gates(z, self.source)
        self.z = {
            'hidden': z.get('hidden'),
            'layer': z.get('layer'),
            'heads': heads,
            'intermediate': z.get('intermediate'),
            'kept_hidden': (z['hidden'] != 0).sum().clamp(min=1) if 'hidden' in z else None,
        }
        branch = []  # per layer: the scale of both branch outputs (layer gate x hidden mask)
        for i in range(self.source.num_hidden_layers):
            scale = z['layer'][i] if 'layer' in z else None
            if 'hidden' in z:
                scale = z['hidden'] if scale is None else z['hidden'] * scale
            branch.append(scale)
        self.z['branch'] = branch

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    # hooks -------------------------------------------------------------------------------------------
    def _scale_hidden(self, module, args, out):
        if self.z is not None and self.z['hidden'] is not None:
            return out * self.z['hidden'].to(out.dtype)

    def _branch(self, i, tuple_out):
        def hook(module, args, out):
            if self.z is None or self.z['branch'][i] is None:
                return None
            if tuple_out:
                return (out[0] * self.z['branch'][i].to(out[0].dtype),) + tuple(out[1:])
            return out * self.z['branch'][i].to(out.dtype)
        return hook

    def _heads(self, i):
        def hook(module, args):
            if self.z is None or self.z['heads'] is None:
                return None
            x = args[0]
            gates = self.z['heads'][i].to(x.dtype)
            y = x.reshape(*x.shape[:-1], gates.shape[0], -1) * gates[:, None]
            return (y.reshape(x.shape),) + tuple(args[1:])
        return hook

    def _intermediate(self, i):
        def hook(module, args):
            if self.z is None or self.z['intermediate'] is None:
                return None
            return (args[0] * self.z['intermediate'][i].to(args[0].dtype),) + tuple(args[1:])
        return hook

    def _masked_rms(self, module, x):
        # Pruned dims of the residual stream are exactly 0, so summing over all dims and dividing by the
        # kept count is the mean over kept dims.
        xf = x.to(torch.float32)
        var = xf.pow(2).sum(-1, keepdim=True) / self.z['kept_hidden'].to(torch.float32)
        return module.weight * (xf * torch.rsqrt(var + module.variance_epsilon)).to(x.dtype)

    def _norm(self, module, args, out):
        if self.z is None or self.z['hidden'] is None:
            return None
        return self._masked_rms(module, args[0])

    def _final_norm(self, module, args, out):
        if self.z is None or self.z['hidden'] is None:
            return None
        y = self._masked_rms(module, args[0])
        return y * self.z['hidden'].to(y.dtype)


# physical pruning ------------------------------------------------------------------------------------

def _kept(z: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(z != 0, as_tuple=True)[-1]


def _uniform_count(name: str, rows: list[torch.Tensor]) -> int:
    counts = {int(r.numel()) for r in rows}
    if len(counts) != 1:
        raise ShapeError(f'{name} masks keep different counts in different layers ({sorted(counts)}); '
                         'export needs exact-target (uniform) masks')
    return counts.pop()


def weights_to_prune(sd: dict, source: ModelShape) -> dict:
    """An HF state dict without what pruning does not touch: rotary buffers and a tied lm_head."""
    sd = {k: v for k, v in sd.items() if 'rotary_emb' not in k}
    if source.tie_word_embeddings:
        sd.pop('lm_head.weight', None)
    return sd


def prune_state_dict(sd: dict, source: ModelShape, z: dict) -> tuple[dict, ModelShape]:
    """Fold deterministic (possibly soft) masks into the weights of an HF state dict and drop every pruned
    row, column, head and layer. Returns the new state dict (HF key names) and its shape."""
    L, hd, Q = source.num_hidden_layers, source.head_dim, source.queries_per_group
    G = source.num_key_value_heads
    f32 = lambda t: t.to(torch.float32)  # noqa: E731
    zl = f32(z['layer']) if 'layer' in z else torch.ones(L)
    zh = f32(z['hidden']) if 'hidden' in z else torch.ones(source.hidden_size)
    zkv = f32(z['kv']) if 'kv' in z else torch.ones(L, G)
    zq = f32(z['query']) if 'query' in z else torch.ones(L, Q)
    zi = f32(z['intermediate']) if 'intermediate' in z else torch.ones(L, source.intermediate_size)
    gates = (zkv[:, :, None] * zq[:, None, :]).reshape(L, G * Q)

    layers = _kept(zl).tolist()
    if not layers:
        raise ShapeError('the layer mask removes every layer')
    d = _kept(zh)
    if d.numel() == 0:
        raise ShapeError('the hidden mask removes every dimension')
    groups = [_kept(zkv[i]) for i in layers]
    slots = [_kept(zq[i]) for i in layers]
    inter = [_kept(zi[i]) for i in layers]
    kv_t, q_t, i_t = (_uniform_count('kv', groups), _uniform_count('query', slots),
                      _uniform_count('intermediate', inter))
    if kv_t == 0 or q_t == 0 or i_t == 0:
        raise ShapeError('a mask removes every head or every intermediate channel of a layer')

    def cast(t, like):
        return t.to(like.dtype)

    out = {}
    emb = sd['model.embed_tokens.weight']
    out['model.embed_tokens.weight'] = cast(f32(emb)[:, d] * zh[d], emb)
    out['model.norm.weight'] = sd['model.norm.weight'][d].clone()
    if not source.tie_word_embeddings:
        lm = sd['lm_head.weight']
        out['lm_head.weight'] = cast(f32(lm)[:, d] * zh[d], lm)
    for new, old in enumerate(layers):
        src, dst = f'model.layers.{old}.', f'model.layers.{new}.'
        g, s, ii = groups[new], slots[new], inter[new]
        heads = (g[:, None] * Q + s[None, :]).reshape(-1)
        q_rows = (heads[:, None] * hd + torch.arange(hd)).reshape(-1)
        kv_rows = (g[:, None] * hd + torch.arange(hd)).reshape(-1)
        branch = zl[old] * zh[d]  # output scale of both branches, on kept hidden dims
        head_cols = gates[old][heads].repeat_interleave(hd)

        def take(name, rows=None, cols=None, row_scale=None, col_scale=None, src=src, dst=dst):
            w = sd[src + name]
            t = f32(w)
            if rows is not None:
                t = t.index_select(0, rows)
            if cols is not None:
                t = t.index_select(1, cols)
            if row_scale is not None:
                t = t * (row_scale[:, None] if t.dim() == 2 else row_scale)
            if col_scale is not None:
                t = t * col_scale[None, :]
            out[dst + name] = cast(t, w)

        take('input_layernorm.weight', rows=d)
        take('post_attention_layernorm.weight', rows=d)
        take('self_attn.q_proj.weight', rows=q_rows, cols=d)
        take('self_attn.k_proj.weight', rows=kv_rows, cols=d)
        take('self_attn.v_proj.weight', rows=kv_rows, cols=d)
        take('self_attn.o_proj.weight', rows=d, cols=q_rows, row_scale=branch, col_scale=head_cols)
        take('mlp.gate_proj.weight', rows=ii, cols=d)
        take('mlp.up_proj.weight', rows=ii, cols=d)
        take('mlp.down_proj.weight', rows=d, cols=ii, row_scale=branch, col_scale=zi[old][ii])
        if source.qkv_bias:
            take('self_attn.q_proj.bias', rows=q_rows)
            take('self_attn.k_proj.bias', rows=kv_rows)
            take('self_attn.v_proj.bias', rows=kv_rows)
        if source.o_bias:
            take('self_attn.o_proj.bias', rows=d, row_scale=branch)
        if source.mlp_bias:
            take('mlp.gate_proj.bias', rows=ii)
            take('mlp.up_proj.bias', rows=ii)
            take('mlp.down_proj.bias', rows=d, row_scale=branch)
    shape = source.replace(num_hidden_layers=len(layers), hidden_size=int(d.numel()),
                           num_key_value_heads=kv_t, num_attention_heads=kv_t * q_t, intermediate_size=i_t)
    return out, shape
