"""Targets as a user writes them, and the shapes a parameter budget allows: no torch, so a command checks them
before it loads a model.

A target is either a shape (HF config field names, or a preset) or a **budget**: ``params`` (every parameter, as
``model.num_parameters()`` counts them, tied weights once) or ``non_embedding_params`` (the decoder layers only). A
budget may be combined with shape fields, which then stay fixed while the search picks the rest.

Example:
    >>> parse_target('params=75M')
    Budget(kind='params', value=75000000, fixed={})
    >>> parse_target('num_hidden_layers=24,hidden_size=480')
    {'num_hidden_layers': 24, 'hidden_size': 480}
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from composer_shear.errors import ShapeError
from composer_shear.shapes import (
    MODULE_FIELDS,
    PRESETS,
    PRUNING_MODULES,
    TARGET_FIELDS,
    ModelShape,
    embedding_params,
    validate_pruning_modules,
)

__all__ = ['BUDGET_KINDS', 'Budget', 'SearchSpace', 'candidate_shapes', 'count', 'describe_shape', 'parse_number',
           'parse_target']

BUDGET_KINDS = ('params', 'non_embedding_params')
_SUFFIX = {'': 1, 'K': 10**3, 'M': 10**6, 'B': 10**9}
_NUMBER = re.compile(r'(?:\d+(?:_\d+)*|\d*\.\d+|\d+\.)(?:[eE][+-]?\d+)?')


def parse_number(text: str | int | float, name: str = 'value') -> int:
    """A positive whole number written as ``75000000``, ``75_000_000``, ``7.5e7``, ``75M``, ``1.2B`` or ``500K``;
    ShapeError naming `name` for anything else (``75MB``, ``-1``, ``7.5``, ``1e-3``).

    Example:
        >>> parse_number('7.5e7'), parse_number('75M'), parse_number('1.5B')
        (75000000, 75000000, 1500000000)
    """
    if isinstance(text, bool):
        raise ShapeError(f'{name} must be a positive whole number, got {text!r}')
    if isinstance(text, int):
        value = text
    else:
        s = str(text).strip()
        suffix = s[-1:].upper() if s[-1:].upper() in ('K', 'M', 'B') else ''
        body = s[:-1] if suffix else s
        if not _NUMBER.fullmatch(body) or (suffix and re.search('[eE]', body)):
            raise ShapeError(f'{name}={text!r} is not a number (write e.g. 75M, 7.5e7 or 75_000_000)')
        exact = float(body.replace('_', '')) * _SUFFIX[suffix]
        value = round(exact)
        if not math.isclose(exact, value, rel_tol=0, abs_tol=1e-6 * max(1.0, exact)):
            raise ShapeError(f'{name}={text!r} is not a whole number')
    if value < 1:
        raise ShapeError(f'{name} must be a positive whole number, got {text!r}')
    return value


@dataclass(frozen=True)
class Budget:
    """A parameter budget (`kind` one of BUDGET_KINDS) with the shape fields the user fixed."""
    kind: str
    value: int
    fixed: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f'{self.kind} <= {self.value:,}' + ''.join(f', {k}={v}' for k, v in self.fixed.items())


def count(shape: ModelShape, kind: str) -> int:
    """A shape's parameters as `kind` counts them."""
    total = shape.num_params()
    if kind == 'non_embedding_params':
        return total - embedding_params(shape.hidden_size, shape.vocab_size, shape.tie_word_embeddings)
    return total


def parse_target(target: str | Mapping[str, Any]) -> dict[str, Any] | Budget:
    """A target from the command line (``key=value,key=value``) or a YAML mapping: the shape fields (a dict, as
    ``ModelShape.resolve_target`` takes it) or a :class:`Budget`. ShapeError names an unknown key or a malformed
    value."""
    if isinstance(target, str):
        items = {}
        for part in (p.strip() for p in target.split(',')):
            if not part:
                continue
            if '=' not in part:
                raise ShapeError(f'target {part!r} is not key=value (e.g. params=75M or num_hidden_layers=24)')
            key, value = (s.strip() for s in part.split('=', 1))
            if key in items:
                raise ShapeError(f'target.{key} is given twice')
            items[key] = value
        target = items
    target = dict(target)
    if not target:
        raise ShapeError('target is empty: give a budget (params=75M) or shape fields (num_hidden_layers=24,...)')
    known = (*TARGET_FIELDS, 'preset', *BUDGET_KINDS)
    for key in target:
        if key not in known:
            raise ShapeError(f'target.{key} is not a target key; valid keys: {", ".join(known)}')
    kinds = [k for k in BUDGET_KINDS if k in target]
    if len(kinds) > 1:
        raise ShapeError(f'target: give one budget, not both {" and ".join(kinds)}')
    shape: dict[str, Any] = {}
    if 'preset' in target:
        if kinds:
            raise ShapeError('target.preset fixes every field; it cannot be combined with a budget')
        shape['preset'] = str(target.pop('preset'))
        if shape['preset'] not in PRESETS:
            raise ShapeError(f'target.preset {shape["preset"]!r} is unknown; choose one of {sorted(PRESETS)}')
    for key in TARGET_FIELDS:
        if key in target:
            shape[key] = parse_number(target[key], f'target.{key}')
    if kinds:
        return Budget(kinds[0], parse_number(target[kinds[0]], f'target.{kinds[0]}'), shape)
    return shape


@dataclass(frozen=True)
class SearchSpace:
    """Which shapes a budget search may build.

    Args:
        multiple_of: hidden and intermediate sizes on this grid (the source's own size is always allowed).
        tolerance: a candidate holds between ``(1 - tolerance) * budget`` and the budget.
        max_depth_pruning: at most this fraction of the layers removed.
        max_width_pruning: at most this fraction of the hidden size, the heads and the intermediate size removed.
        pruning_modules: which structures may shrink (the others keep the source's size).
    """
    multiple_of: int = 64
    tolerance: float = 0.05
    max_depth_pruning: float = 0.5
    max_width_pruning: float = 0.5
    pruning_modules: tuple[str, ...] = PRUNING_MODULES

    def check(self) -> None:
        if isinstance(self.multiple_of, bool) or not isinstance(self.multiple_of, int) or self.multiple_of < 1:
            raise ShapeError(f'multiple_of must be a positive integer, got {self.multiple_of!r}')
        for name in ('tolerance', 'max_depth_pruning', 'max_width_pruning'):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ShapeError(f'{name} must be in [0, 1), got {value!r}')
        validate_pruning_modules(self.pruning_modules)


def _grid(size: int, low: float, step: int) -> list[int]:
    """Sizes <= `size` on the `step` grid and >= `low`, plus `size` itself."""
    values = {v for v in range(step, size + 1, step) if v >= low}
    return sorted(values | {size})


def candidate_shapes(source: ModelShape, budget: Budget, space: SearchSpace | None = None) -> list[ModelShape]:
    """Every uniform shape the search may build under `budget`: the layers, hidden size and KV groups × query slots
    (whole groups, the same slots in every group) enumerated, the intermediate size the largest on the grid that
    fits; kept when its count is within the tolerance below the budget. Sorted by (layers, hidden, heads, KV heads).

    Raises:
        ShapeError: the budget exceeds the source, is below the smallest shape the space can build, or a fixed
            field is invalid for the source.
    """
    space = space or SearchSpace()
    space.check()
    modules = validate_pruning_modules(space.pruning_modules)
    have = count(source, budget.kind)
    if budget.value > have:
        raise ShapeError(f'target.{budget.kind}={budget.value:,} exceeds the source model\'s {have:,}')
    fixed = dict(budget.fixed)
    if fixed:  # validated against the source as a shape would be (fields beyond the source, GQA)
        source.resolve_target(fixed, PRUNING_MODULES)
    w = space.max_width_pruning
    free = {f: any(m in modules for m, fs in MODULE_FIELDS.items() if f in fs) and f not in fixed
            for f in TARGET_FIELDS}
    L = (range(max(1, math.ceil(source.num_hidden_layers * (1 - space.max_depth_pruning))),
               source.num_hidden_layers + 1) if free['num_hidden_layers']
         else [fixed.get('num_hidden_layers', source.num_hidden_layers)])
    D = (_grid(source.hidden_size, source.hidden_size * (1 - w), space.multiple_of) if free['hidden_size']
         else [fixed.get('hidden_size', source.hidden_size)])
    heads = list(_heads(source, fixed, free, w))
    if not heads:
        raise ShapeError(f'target: no head count allowed (max_width_pruning {w} with the fixed fields {fixed})')
    grid = _grid(source.intermediate_size, source.intermediate_size * (1 - w), space.multiple_of)
    h_min, kv_min = min(heads, key=sum)
    smallest = source.replace(num_hidden_layers=L[0], hidden_size=D[0], num_attention_heads=h_min,
                              num_key_value_heads=kv_min,
                              intermediate_size=grid[0] if free['intermediate_size']
                              else fixed.get('intermediate_size', source.intermediate_size))
    if count(smallest, budget.kind) > budget.value:
        raise ShapeError(f'target.{budget.kind}={budget.value:,} is below the smallest shape the search may build '
                         f'({count(smallest, budget.kind):,}: max_depth_pruning {space.max_depth_pruning}, '
                         f'max_width_pruning {w}, multiple_of {space.multiple_of})')
    low = budget.value * (1 - space.tolerance)
    out = []
    for n_layers in L:
        for d in D:
            for h, kv in heads:
                base = source.replace(num_hidden_layers=n_layers, hidden_size=d, num_attention_heads=h,
                                      num_key_value_heads=kv, intermediate_size=0)
                for i in _intermediates(source, base, budget, fixed, free, grid):
                    shape = base.replace(intermediate_size=i)
                    if low <= count(shape, budget.kind) <= budget.value:
                        out.append(shape)
    if not out:
        raise ShapeError(f'no shape within {space.tolerance:.0%} below target.{budget.kind}={budget.value:,} on the '
                         f'multiple_of {space.multiple_of} grid; raise the tolerance or lower multiple_of')
    return sorted(out, key=lambda s: (s.num_hidden_layers, s.hidden_size, s.num_attention_heads,
                                      s.num_key_value_heads))


def _heads(source: ModelShape, fixed: Mapping[str, int], free: Mapping[str, bool],
           w: float) -> Iterator[tuple[int, int]]:
    """(query heads, KV heads) pairs: whole KV groups, the same number of query slots in each group."""
    G, Q = source.num_key_value_heads, source.queries_per_group
    for g in range(1, G + 1):
        for q in range(1, Q + 1):
            h = g * q
            if not free['num_key_value_heads'] and g != fixed.get('num_key_value_heads', G):
                continue
            if not free['num_attention_heads'] and h != fixed.get('num_attention_heads', source.num_attention_heads):
                continue
            narrow = h < source.num_attention_heads * (1 - w)
            if (free['num_attention_heads'] or free['num_key_value_heads']) and narrow:
                continue
            yield h, g


def _intermediates(source: ModelShape, base: ModelShape, budget: Budget, fixed: Mapping[str, int],
                   free: Mapping[str, bool], grid: list[int]) -> list[int]:
    """The intermediate size for a shape whose other fields are set: the largest on the grid that fits."""
    if not free['intermediate_size']:
        return [fixed.get('intermediate_size', source.intermediate_size)]
    without = count(base, budget.kind)
    per_channel = count(base.replace(intermediate_size=1), budget.kind) - without
    room = (budget.value - without) // per_channel
    fits = [i for i in grid if i <= room]
    return fits[-1:]


def describe_shape(shape: ModelShape) -> str:
    return (f'{shape.num_hidden_layers} layers, hidden {shape.hidden_size}, {shape.num_attention_heads} heads / '
            f'{shape.num_key_value_heads} KV, intermediate {shape.intermediate_size}')
