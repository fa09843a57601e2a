"""Apply masks to a Hugging Face LLaMA-family model with forward hooks on its standard module names.

Mask placement (the same for eager, sdpa and flash attention):
- hidden: scales the embedding output and each branch output before the residual add; every RMSNorm takes
  its variance over kept dims only; the final norm's output is scaled too (so a tied lm_head matches);
- layer: scales both branch outputs of a layer;
- heads: per query head h = g * Q + s, the gate kv[g] * query[s] scales the attention output before o_proj;
- intermediate: scales the input of down_proj.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from composer_shear.errors import ShapeError
from composer_shear.masks import head_gates
from composer_shear.shapes import ModelShape

__all__ = ['MaskedForward', 'decoder']


def decoder(hf_model: nn.Module) -> nn.Module:
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


class MaskedForward:
    """Hooks on an HF model reading the current masks; `set(z)` installs masks, `set(None)` disables."""

    def __init__(self, hf_model: nn.Module, source: ModelShape) -> None:
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

    def set(self, z: dict[str, torch.Tensor] | None) -> None:
        """Install masks (structure name -> tensor; a missing structure is not masked), or None to disable."""
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

    def remove(self) -> None:
        """Remove every hook: the model computes as if it had never been masked."""
        for h in self.handles:
            h.remove()
        self.handles = []

    # hooks -------------------------------------------------------------------------------------------
    def _scale_hidden(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
        if self.z is not None and self.z['hidden'] is not None:
            return out * self.z['hidden'].to(out.dtype)

    def _branch(self, i: int, tuple_out: bool) -> Callable[..., torch.Tensor | tuple[Any, ...] | None]:
        def hook(module: nn.Module, args: tuple[Any, ...],
                 out: torch.Tensor | tuple[Any, ...]) -> torch.Tensor | tuple[Any, ...] | None:
            if self.z is None or self.z['branch'][i] is None:
                return None
            if tuple_out:
                return (out[0] * self.z['branch'][i].to(out[0].dtype),) + tuple(out[1:])
            return out * self.z['branch'][i].to(out.dtype)
        return hook

    def _heads(self, i: int) -> Callable[..., tuple[Any, ...] | None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if self.z is None or self.z['heads'] is None:
                return None
            x = args[0]
            gates = self.z['heads'][i].to(x.dtype)
            y = x.reshape(*x.shape[:-1], gates.shape[0], -1) * gates[:, None]
            return (y.reshape(x.shape),) + tuple(args[1:])
        return hook

    def _intermediate(self, i: int) -> Callable[..., tuple[Any, ...] | None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if self.z is None or self.z['intermediate'] is None:
                return None
            return (args[0] * self.z['intermediate'][i].to(args[0].dtype),) + tuple(args[1:])
        return hook

    def _masked_rms(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # Pruned dims of the residual stream are exactly 0, so summing over all dims and dividing by the
        # kept count is the mean over kept dims.
        xf = x.to(torch.float32)
        var = xf.pow(2).sum(-1, keepdim=True) / self.z['kept_hidden'].to(torch.float32)
        return module.weight * (xf * torch.rsqrt(var + module.variance_epsilon)).to(x.dtype)

    def _norm(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
        if self.z is None or self.z['hidden'] is None:
            return None
        return self._masked_rms(module, args[0])

    def _final_norm(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
        if self.z is None or self.z['hidden'] is None:
            return None
        y = self._masked_rms(module, args[0])
        return y * self.z['hidden'].to(y.dtype)
