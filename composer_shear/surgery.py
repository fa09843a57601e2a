"""Physical pruning: fold deterministic masks into the weights of a Hugging Face LLaMA-family model and drop
every pruned row, column, head and layer; build the smaller model's config and the model itself.

Shapes in comments: L layers, G KV groups, Q query heads per group, hd head dim, d hidden, I intermediate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from composer_shear._hf import no_init_weights
from composer_shear.errors import ExportError, ShapeError
from composer_shear.masks import MaskSnapshot, full_masks
from composer_shear.shapes import ModelShape

__all__ = ['build_model', 'check_keys', 'prune_state_dict', 'prune_to_target', 'pruned_config', 'weights_to_prune']


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
    f32 = lambda t: t.detach().cpu().to(torch.float32)  # noqa: E731
    full = {k: f32(v) for k, v in full_masks(z, source).items()}
    zl, zh, zkv, zq, zi = (full[k] for k in ('layer', 'hidden', 'kv', 'query', 'intermediate'))
    gates = (zkv[:, :, None] * zq[:, None, :]).reshape(L, G * Q)  # [L, H]

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

    def cast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
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

        def take(name: str, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                 row_scale: torch.Tensor | None = None, col_scale: torch.Tensor | None = None, src: str = src,
                 dst: str = dst) -> None:
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


def pruned_config(config: Any, shape: ModelShape, dtype: torch.dtype,
                  layers: Sequence[int] | None = None) -> Any:
    """A config of the source's class with the pruned shape (head_dim written explicitly). `layers`: the source
    layers kept, in order, for per-layer config fields (transformers 5's ``layer_types``); default the first ones.

    Raises:
        ShapeError: the installed transformers cannot hold this shape in the source's config class (transformers 5
            requires ``hidden_size`` to be a multiple of ``num_attention_heads``, whatever ``head_dim`` is).
    """
    from transformers import AutoConfig
    d = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
    for key, value in shape.target_dict().items():
        d[key] = value
    d['head_dim'] = shape.head_dim
    d.pop('torch_dtype', None)
    d['dtype' if 'dtype' in d else 'torch_dtype'] = str(dtype).removeprefix('torch.')  # transformers 5: dtype
    layers = list(range(shape.num_hidden_layers)) if layers is None else list(layers)
    if isinstance(d.get('layer_types'), list):  # one entry per layer (transformers 5): those of the kept layers
        d['layer_types'] = [d['layer_types'][i] for i in layers]
    d.pop('_name_or_path', None)
    d.pop('quantization_config', None)
    model_type = d.pop('model_type')
    try:
        return AutoConfig.for_model(model_type, **d)
    except Exception as e:  # transformers 5 raises huggingface_hub's StrictDataclassClassValidationError
        import transformers
        raise ShapeError(f'transformers {transformers.__version__} cannot hold the target shape '
                         f'{shape.target_dict()} in a {type(config).__name__}: {getattr(e, "__cause__", None) or e}'
                         ) from None


def check_keys(sd: dict[str, torch.Tensor], config: Any) -> None:
    """Strict check: exactly the keys and shapes the target architecture expects."""
    from transformers import AutoModelForCausalLM
    # import the modeling module first: a first import under the meta device breaks torch._dynamo's own import
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    with torch.device('meta'):
        ref = model_class(config)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop('lm_head.weight', None)
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or unexpected:
        raise ExportError(f'pruned weights do not match the target architecture: missing {missing[:5]}, '
                          f'unexpected {unexpected[:5]}')
    bad = [(k, got[k], expected[k]) for k in expected if got[k] != expected[k]]
    if bad:
        raise ExportError(f'pruned weight shapes differ from the target architecture: {bad[:5]}')


def prune_to_target(hf_sd: dict[str, torch.Tensor], snap: MaskSnapshot, config: Any,
                    dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], Any]:
    """Fold a snapshot's exact-target masks into an HF state dict: (pruned weights in `dtype`, default the
    source's; the pruned config), checked strictly against the target architecture."""
    pruned, shape = prune_state_dict(weights_to_prune(hf_sd, snap.source), snap.source, snap.z)
    if shape != snap.target:
        raise ExportError(f'pruned shape {shape.target_dict()} differs from the target {snap.target.target_dict()}')
    dtype = dtype or hf_sd['model.embed_tokens.weight'].dtype
    pruned = {k: v.to(dtype).contiguous() for k, v in pruned.items()}
    layers = (snap.z['layer'] != 0).nonzero().flatten().tolist() if 'layer' in snap.z else None
    new_config = pruned_config(config, shape, dtype, layers)
    check_keys(pruned, new_config)
    return pruned, new_config


def build_model(sd: dict[str, torch.Tensor], config: Any) -> Any:
    """The Hugging Face model of `config`'s class holding exactly the weights `sd` (checked strictly), in eval
    mode, in the weights' dtype, with tied weights tied."""
    from transformers import AutoModelForCausalLM
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    with no_init_weights():  # every weight is overwritten below
        model = model_class(config)
    fp32_buffers = [(m, n, b) for m in model.modules() for n, b in m._buffers.items()
                    if b is not None and b.is_floating_point()]
    # the weights' dtype for parameters only: buffers (RoPE's inv_freq) stay fp32, as from_pretrained keeps them
    model.to(next(iter(sd.values())).dtype)
    for module, name, buffer in fp32_buffers:
        module._buffers[name] = buffer
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed = {'lm_head.weight'} if config.tie_word_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise ExportError(f'pruned weights do not load: missing {missing[:5]}, unexpected {unexpected[:5]}')
    model.tie_weights()
    return model.eval()
