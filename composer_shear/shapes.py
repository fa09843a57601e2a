"""Model shapes: read from a Hugging Face LLaMA-family config, count parameters, validate targets."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from composer_shear.errors import ShapeError

if TYPE_CHECKING:
    import torch

SUPPORTED_MODEL_TYPES = ('llama', 'mistral', 'qwen2')

# The fields a target may set, named as in the HF config.
TARGET_FIELDS = (
    'num_hidden_layers',
    'hidden_size',
    'num_attention_heads',
    'num_key_value_heads',
    'intermediate_size',
)

# Which pruning module changes which target field.
MODULE_FIELDS = {
    'layer': ('num_hidden_layers',),
    'hidden': ('hidden_size',),
    'head': ('num_attention_heads', 'num_key_value_heads'),
    'intermediate': ('intermediate_size',),
}
PRUNING_MODULES = tuple(MODULE_FIELDS)

# The mask structures, in their fixed order, and the pruning module that owns each.
STRUCTURE_MODULES = {
    'layer': 'layer',
    'hidden': 'hidden',
    'kv': 'head',       # KV groups
    'query': 'head',    # query slots shared by every group (absent for MHA)
    'intermediate': 'intermediate',
}

# The paper's targets from Llama-2-7B (Xia et al. 2023, Table 8 / reference scripts).
PRESETS: dict[str, dict[str, int]] = {
    '1.3b': dict(num_hidden_layers=24, hidden_size=2048, num_attention_heads=16,
                 num_key_value_heads=16, intermediate_size=5504),
    '2.7b': dict(num_hidden_layers=32, hidden_size=2560, num_attention_heads=20,
                 num_key_value_heads=20, intermediate_size=6912),
    '370m': dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=8,
                 num_key_value_heads=8, intermediate_size=2816),
}


def layer_params(hidden: int | float | torch.Tensor, kv_heads: int | float | torch.Tensor,
                 heads: int | float | torch.Tensor, head_dim: int | float | torch.Tensor,
                 intermediate: int | float | torch.Tensor, qkv_bias: bool, o_bias: bool,
                 mlp_bias: bool) -> int | float | torch.Tensor:
    """Parameters of one decoder layer. Works on ints, floats or tensors (expected sizes)."""
    q = hidden * heads * head_dim + (heads * head_dim if qkv_bias else 0)
    kv = 2 * (hidden * kv_heads * head_dim + (kv_heads * head_dim if qkv_bias else 0))
    o = heads * head_dim * hidden + (hidden if o_bias else 0)
    mlp = 3 * hidden * intermediate + ((2 * intermediate + hidden) if mlp_bias else 0)
    norms = 2 * hidden
    return q + kv + o + mlp + norms


def embedding_params(hidden: int | float | torch.Tensor, vocab: int, tied: bool) -> int | float | torch.Tensor:
    """Input embedding, final norm and (untied) lm_head."""
    return vocab * hidden * (1 if tied else 2) + hidden


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Read the shape of an HF LLaMA-family config (an object or a dict)."""
        get = (lambda k, d=None: config.get(k, d)) if isinstance(config, Mapping) else \
            (lambda k, d=None: getattr(config, k, d))
        model_type = get('model_type')
        missing = [k for k in ('num_hidden_layers', 'hidden_size', 'num_attention_heads', 'intermediate_size',
                               'vocab_size') if get(k) is None]
        if missing and model_type in SUPPORTED_MODEL_TYPES:
            raise ShapeError(f'the {model_type} config lacks {", ".join(missing)}')
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ShapeError(
                f'model_type {model_type!r} is not LLaMA-family; supported: {", ".join(SUPPORTED_MODEL_TYPES)}')
        heads = int(get('num_attention_heads'))
        hidden = int(get('hidden_size'))
        head_dim = get('head_dim') or hidden // heads
        if model_type == 'qwen2':
            qkv_bias, o_bias, mlp_bias = True, False, False
        elif model_type == 'llama':
            qkv_bias = o_bias = bool(get('attention_bias', False))
            mlp_bias = bool(get('mlp_bias', False))
        else:
            qkv_bias = o_bias = mlp_bias = False
        return cls(
            model_type=model_type,
            num_hidden_layers=int(get('num_hidden_layers')),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=int(get('num_key_value_heads') or heads),
            head_dim=int(head_dim),
            intermediate_size=int(get('intermediate_size')),
            vocab_size=int(get('vocab_size')),
            tie_word_embeddings=bool(get('tie_word_embeddings', False)),
            qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias,
        )

    @property
    def queries_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def num_params(self) -> int:
        """Exactly sum(p.numel()) of the HF model of this shape (tied weights once)."""
        per_layer = layer_params(self.hidden_size, self.num_key_value_heads, self.num_attention_heads,
                                 self.head_dim, self.intermediate_size, self.qkv_bias, self.o_bias,
                                 self.mlp_bias)
        return self.num_hidden_layers * per_layer + embedding_params(
            self.hidden_size, self.vocab_size, self.tie_word_embeddings)

    def target_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in TARGET_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **fields) -> ModelShape:
        return dataclasses.replace(self, **fields)

    def resolve_target(self, target: Mapping[str, Any] | str | None,
                       pruning_modules: str | Iterable[str] = PRUNING_MODULES) -> ModelShape:
        """Turn a target (dict of HF field names, `{'preset': name}` or a preset name) into a
        validated ModelShape. Raises ShapeError naming the offending field."""
        modules = validate_pruning_modules(pruning_modules)
        if target is None:
            raise ShapeError('target is required: give HF config fields or preset: 1.3b|2.7b|370m')
        if isinstance(target, str):
            target = {'preset': target}
        target = dict(target)
        if 'preset' in target:
            name = str(target.pop('preset'))
            if name not in PRESETS:
                raise ShapeError(f'target.preset {name!r} is unknown; choose one of {sorted(PRESETS)}')
            target = {**PRESETS[name], **target}
        unknown = sorted(set(target) - set(TARGET_FIELDS))
        if unknown:
            raise ShapeError(f'target.{unknown[0]} is not a target field; valid fields: {", ".join(TARGET_FIELDS)}')
        values = self.target_dict()
        for key, value in target.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ShapeError(f'target.{key} must be a positive integer, got {value!r}')
            values[key] = value
        # MHA sources keep MHA unless told otherwise: heads given alone sets kv heads too.
        if ('num_attention_heads' in target and 'num_key_value_heads' not in target
                and self.num_key_value_heads == self.num_attention_heads):
            values['num_key_value_heads'] = values['num_attention_heads']
        for key in TARGET_FIELDS:
            if values[key] > getattr(self, key):
                raise ShapeError(f'target.{key}={values[key]} exceeds the source model\'s {getattr(self, key)}')
        heads, kv = values['num_attention_heads'], values['num_key_value_heads']
        if heads % kv:
            raise ShapeError(f'target.num_attention_heads={heads} is not a multiple of '
                             f'target.num_key_value_heads={kv}')
        if heads // kv > self.queries_per_group:
            raise ShapeError(
                f'target.num_key_value_heads={kv}: {heads // kv} query heads per KV group exceed the '
                f'source\'s {self.queries_per_group}; use at least '
                f'{-(-heads // self.queries_per_group)} KV heads')
        for module, fields in MODULE_FIELDS.items():
            if module in modules:
                continue
            for field in fields:
                if values[field] != getattr(self, field):
                    raise ShapeError(f'target.{field}={values[field]} differs from the source '
                                     f'({getattr(self, field)}) but {module!r} is not in pruning_modules')
        return self.replace(**values)


def validate_pruning_modules(modules: str | Iterable[str]) -> tuple[str, ...]:
    """The pruning modules in canonical order; ShapeError naming an unknown one."""
    if isinstance(modules, str):
        modules = [modules]
    modules = tuple(modules)
    if not modules:
        raise ShapeError(f'pruning_modules is empty; choose from {list(PRUNING_MODULES)}')
    for m in modules:
        if m not in PRUNING_MODULES:
            raise ShapeError(f'pruning_modules: {m!r} is unknown; choose from {list(PRUNING_MODULES)}')
    return tuple(m for m in PRUNING_MODULES if m in modules)
