"""Hard-concrete (L0) masks, their Lagrangian constraints, and the mask module attached to a model.

Constants follow Louizos et al. (2018) as used by Sheared-LLaMA: stretch (gamma, zeta) = (-0.1, 1.1),
temperature 2/3, log-alpha kept in [-ln 100, ln 100], eval masks sharpened by 0.8.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from composer_shear.errors import ShapeError
from composer_shear.shapes import STRUCTURE_MODULES, TARGET_FIELDS, ModelShape, embedding_params, layer_params

GAMMA, ZETA = -0.1, 1.1
BETA = 2.0 / 3.0
EPS = 1e-6
LOG_ALPHA_MAX = math.log(100.0)
SHARPEN = 0.8
MASKS_ATTR = 'shear_masks'  # the mask module's name on a ComposerModel
LAMBDAS = 'lambdas'  # the multipliers' name in ShearMasks.fp32
# the value kept entries of deterministic (eval, export) masks take: 1, or their soft value (the paper's)
MASK_VALUES = ('binary', 'soft')
DEFAULT_MASK_VALUES = 'binary'
# log(-gamma / zeta): the expected score is sigmoid(log_alpha - BETA * this)
_LOG_RATIO = math.log(-GAMMA / ZETA)


def sample(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One training-time draw of the stretched, rectified hard-concrete gate, in [0, 1]."""
    device = generator.device if generator is not None else log_alpha.device
    u = torch.rand(log_alpha.shape, generator=generator, device=device, dtype=log_alpha.dtype)
    u = (u * (1 - 2 * EPS) + EPS).to(log_alpha.device)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def expected_score(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(gate != 0): the expected L0 contribution of each entry."""
    p_zero = torch.sigmoid(BETA * _LOG_RATIO - log_alpha).clamp(EPS, 1 - EPS)
    return 1.0 - p_zero


def soft_value(log_alpha: torch.Tensor) -> torch.Tensor:
    """The value a kept entry takes in a deterministic mask."""
    return torch.sigmoid(log_alpha / BETA * SHARPEN)


def log_alpha_for_score(score: torch.Tensor | float, limit: float = LOG_ALPHA_MAX) -> torch.Tensor:
    """The log alpha whose expected score (P(gate != 0)) is `score`: the inverse of `expected_score`, clamped to
    the range log alpha is kept in ([-limit, limit])."""
    score = torch.as_tensor(score, dtype=torch.float32).clamp(EPS, 1 - EPS)
    return (BETA * _LOG_RATIO - torch.logit(1 - score)).clamp(-limit, limit)


def below_half(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(gate < 0.5) of each entry's training draw: the gate is below 0.5 exactly when the uniform noise u is below
    sigmoid(-log_alpha) (the stretch maps s = 0.5 to 0.5)."""
    return torch.sigmoid(-log_alpha)


def selection_log_alpha(keep: torch.Tensor, target: int, limit: float = LOG_ALPHA_MAX) -> torch.Tensor:
    """Log alpha for a 0/1 selection `keep` ([size] or [rows, size], `target` ones per row): unselected entries at
    the lower clamp (-`limit`), selected ones at the value that makes each row's expected count exactly `target`,
    so that the exact-target deterministic masks are the selection and the expected sparsity is the target's (where
    the clamps allow: with almost nothing pruned the selected entries stop at the upper clamp, about 0.2 % short at
    the paper's ln 100; with more than ~95 % pruned the floor's 0.047 per entry alone exceeds the target). A wider
    `limit` lowers the floor, so the selected entries sit nearer certainty (ln 1e4: floor 0.0005)."""
    size = keep.shape[-1]
    floor = float(expected_score(torch.tensor(-limit)))
    score = 1.0 - (size - target) / max(target, 1) * floor
    high = log_alpha_for_score(max(score, floor + 1e-4), limit)
    return torch.where(keep.bool(), high, torch.full_like(keep, -limit, dtype=torch.float32))


def expected_keep(log_alpha: torch.Tensor) -> torch.Tensor:
    """Per row: how many entries a deterministic mask keeps when no exact target is imposed."""
    n = log_alpha.shape[-1]
    zeros = torch.round(n - expected_score(log_alpha).sum(-1))
    return (n - zeros).long().clamp(0, n)


def deterministic(log_alpha: torch.Tensor, keep: int | torch.Tensor, binary: bool = False) -> torch.Tensor:
    """Keep exactly `keep` entries per row (an int or a tensor over rows): the largest log-alpha,
    ties broken by lower index; kept entries hold 1 (`binary`) or their soft value, the rest are 0."""
    order = torch.sort(log_alpha.detach(), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    keep = torch.as_tensor(keep, device=log_alpha.device)
    if keep.dim() < rank.dim():
        keep = keep.unsqueeze(-1)
    value = torch.ones_like(log_alpha) if binary else soft_value(log_alpha)
    return torch.where(rank < keep, value, torch.zeros_like(log_alpha))


@dataclass(frozen=True)
class Structure:
    """One prunable structure: `rows` independent rows of `size` entries, `target` kept per row."""
    name: str
    rows: int  # 0 means a single 1-D row (layer, hidden)
    size: int
    target: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The mask's tensor shape: (rows, size), or (size,) for a single row."""
        return (self.rows, self.size) if self.rows else (self.size,)

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.target / self.size


def structures_for(source: ModelShape, target: ModelShape, modules: Iterable[str],
                   hold: Iterable[str] = ()) -> list[Structure]:
    """The masks a pruning run needs, in the fixed order of `STRUCTURE_MODULES`. A structure whose target keeps
    every entry (e.g. 3 -> 3 query slots) gets no mask: it has nothing to choose, and its constraint could never be
    met (the expected sparsity at the upper clamp is 0.002, not 0), so its multiplier would grow without bound.
    Structures named in `hold` are listed even then (a budget run holds every mask a searched shape may need)."""
    modules, hold = set(modules), set(hold)
    rows = {'layer': 0, 'hidden': 0}  # one row; the others have a row per layer
    size, keep = structure_sizes(source), structure_sizes(target)
    out = []
    for name, module in STRUCTURE_MODULES.items():
        if module not in modules or (keep[name] == size[name] and name not in hold):
            continue
        out.append(Structure(name, rows.get(name, source.num_hidden_layers), size[name], keep[name]))
    return out


def structure_sizes(shape: ModelShape) -> dict[str, int]:
    """Entries per row of each structure for a model of `shape`."""
    return {'layer': shape.num_hidden_layers, 'hidden': shape.hidden_size, 'kv': shape.num_key_value_heads,
            'query': shape.queries_per_group, 'intermediate': shape.intermediate_size}


def full_masks(z: Mapping[str, torch.Tensor], source: ModelShape) -> dict[str, torch.Tensor]:
    """`z` with every structure present: a structure that is not pruned counts as all kept (ones)."""
    device = next(iter(z.values())).device if z else None
    L = source.num_hidden_layers
    shapes = {'layer': (L,), 'hidden': (source.hidden_size,), 'kv': (L, source.num_key_value_heads),
              'query': (L, source.queries_per_group), 'intermediate': (L, source.intermediate_size)}
    return {k: z[k] if k in z else torch.ones(shape, device=device) for k, shape in shapes.items()}


def head_gates(z: Mapping[str, torch.Tensor], source: ModelShape) -> torch.Tensor | None:
    """[L, H] gate per query head h = g * Q + s: kv[g] * query[s]; None when heads are not pruned."""
    if 'kv' not in z and 'query' not in z:
        return None
    z = full_masks(z, source)
    L = source.num_hidden_layers
    return (z['kv'][:, :, None] * z['query'][:, None, :]).reshape(L, source.num_attention_heads)


class ShearMasks(nn.Module):
    """All mask logits (log alpha) and Lagrange multipliers of a pruning run.

    The target shape is a persistent buffer, so a checkpoint's model weights alone are enough to export.
    Every parameter is read through `forward`, so FSDP can shard this module like any other.

    `hold` names structures to hold a mask for even when the target keeps them whole (a budget run, whose target is
    chosen after the masks exist: :meth:`retarget`). Such a mask is inactive: it is not applied, takes no part in
    the Lagrangian, and gets a zero gradient (so DDP and FSDP see every parameter used) and so never moves.
    """

    def __init__(self, source: ModelShape, target: ModelShape, modules: Iterable[str],
                 init_log_alpha: float = LOG_ALPHA_MAX, init_noise: float = 0.0, seed: int = 0,
                 values: str = DEFAULT_MASK_VALUES, limit: float = LOG_ALPHA_MAX, hold: Iterable[str] = ()) -> None:
        super().__init__()
        self.source, self.pruning_modules = source, tuple(modules)
        self.limit = float(limit)  # log alpha is kept in [-limit, limit] (clamp_masks)
        self.held = structures_for(source, target, self.pruning_modules, hold)  # every structure with a parameter
        self.retarget(target)
        gen = torch.Generator().manual_seed(seed)
        self.log_alpha = nn.ParameterDict()
        for s in self.held:
            value = torch.full(s.shape, float(init_log_alpha))
            if init_noise:
                value += init_noise * torch.randn(s.shape, generator=gen)
            self.log_alpha[s.name] = nn.Parameter(value.clamp(-self.limit, self.limit))
        # lambdas[i] = (lambda_1, lambda_2) of held structure i
        self.lambdas = nn.Parameter(torch.zeros(len(self.held), 2))
        if values not in MASK_VALUES:
            raise ValueError(f'mask values must be one of {", ".join(MASK_VALUES)}, got {values!r}')
        # 1: kept entries of deterministic masks are 1; 0: their soft value. A buffer, so that export folds what
        # the run evaluated with.
        self.register_buffer('binary_values', torch.tensor(int(values == 'binary')))
        # Exact fp32 values of the parameters, for forwards whose parameters FSDP mixed precision has cast to a lower
        # precision (refresh_fp32). A plain attribute: no wrapper, cast, state dict or `.to` sees it.
        self.fp32: dict[str, torch.Tensor] = {}

    def retarget(self, target: ModelShape) -> None:
        """Aim the masks at `target`: the structures it prunes become the active ones (each must be held), the
        others inactive. The ``target_shape`` buffer follows (set it on every rank)."""
        active = structures_for(self.source, target, self.pruning_modules)
        held = {s.name for s in self.held}
        missing = [s.name for s in active if s.name not in held]
        if missing:
            raise ShapeError(f'target {target.target_dict()} prunes {missing}, for which these masks hold no logits')
        self.target, self.structures = target, active
        self._rows = [[s.name for s in self.held].index(s.name) for s in active]
        buffer = target_buffer(target)
        if 'target_shape' in self._buffers:
            self.target_shape.copy_(buffer.to(self.target_shape.device))
        else:
            self.register_buffer('target_shape', buffer)

    @property
    def binary(self) -> bool:
        """Whether deterministic masks keep entries at 1 (else at their soft value)."""
        return bool(self.binary_values.item())

    def _exact(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """`param` in fp32 with its exact value. Under FSDP mixed precision the forward sees the parameter cast to
        `param_dtype` (bf16 keeps 8 bits: logits 0.016 apart tie); the value then comes from the fp32 copy that
        `refresh_fp32` keeps, while the gradient still flows to the cast parameter (and FSDP reduces it as usual)."""
        if param.dtype == torch.float32:
            return param
        copy = self.fp32.get(name)
        if copy is None or copy.shape != param.shape or copy.device != param.device \
                or not torch.equal(copy.to(param.dtype), param.detach()):
            raise RuntimeError(f'shear_masks: {name} is held in {param.dtype} (FSDP mixed precision) and its fp32 copy '
                               'is missing or stale: call clamp_masks(masks) after wrapping the model and after every '
                               'optimizer step')
        return param.float() + (copy - param.detach().float())

    def snapshot(self) -> MaskSnapshot:
        """Full (unsharded), detached CPU copies of everything, with the exact-target masks."""
        return self('snapshot')

    def forward(
        self, mode: str = 'sample', progress: float | None = None, generator: torch.Generator | None = None
    ) -> MaskSnapshot | tuple[dict[str, torch.Tensor], torch.Tensor | None, dict[str, torch.Tensor | float] | None]:
        """mode: 'sample' (training draw), 'expected' (keep round(expected) per row),
        'target' (keep exactly the target per row), 'snapshot' (a MaskSnapshot). With `progress` in [0, 1]
        (the Lagrangian warm-up), also returns the Lagrangian and detached statistics. `generator` drives the
        sampling noise."""
        log_alpha = {s.name: self._exact(s.name, self.log_alpha[s.name]) for s in self.structures}
        binary = mode != 'sample' and self.binary
        if mode == 'snapshot':
            cpu = lambda t: t.detach().float().cpu().clone()  # noqa: E731  (a copy: FSDP frees unsharded params)
            return MaskSnapshot(
                self.source, self.target, {k: cpu(v) for k, v in log_alpha.items()}, cpu(self.lambdas)[self._rows],
                {s.name: cpu(deterministic(log_alpha[s.name], s.target, binary)) for s in self.structures}, binary)
        if mode == 'sample':
            z = {k: sample(v, generator) for k, v in log_alpha.items()}
        elif mode == 'expected':
            z = {k: deterministic(v, expected_keep(v), binary) for k, v in log_alpha.items()}
        elif mode == 'target':
            z = {s.name: deterministic(log_alpha[s.name], s.target, binary) for s in self.structures}
        else:
            raise ValueError(f'unknown mask mode {mode!r}')
        if progress is None:
            return z, None, None
        lambdas = self._exact(LAMBDAS, self.lambdas)
        lam = lambdas.detach().clone()  # a copy for logging: FSDP frees the unsharded parameter after forward
        lag = lambdas.new_zeros(())
        if len(self._rows) < len(self.held):  # inactive masks: a zero gradient, so that every parameter is used
            idle = [s.name for s in self.held if s.name not in log_alpha]
            lag = lag + 0.0 * (lambdas.sum() + sum(self.log_alpha[n].sum() for n in idle))
        stats = {}
        scores = {k: expected_score(v) for k, v in log_alpha.items()}
        for i, s in zip(self._rows, self.structures, strict=True):
            sparsity = 1.0 - scores[s.name].sum(-1) / s.size
            goal = s.target_sparsity * min(max(progress, 0.0), 1.0)
            gap = sparsity - goal
            lag = lag + (lambdas[i, 0] * gap + lambdas[i, 1] * gap * gap).mean()
            stats[f'lambda_1/{s.name}'] = lam[i, 0]
            stats[f'lambda_2/{s.name}'] = lam[i, 1]
            stats[f'target_sparsity/{s.name}'] = goal
            stats[f'expected_sparsity/{s.name}'] = sparsity.detach().mean()
            # how often a training draw scales an entry the exact-target masks keep below 0.5
            kept = deterministic(log_alpha[s.name], s.target, binary=True).bool()
            if kept.any():
                stats[f'kept_below_half/{s.name}'] = below_half(log_alpha[s.name].detach())[kept].mean()
        stats.update(expected_shape(self.source, {k: v.detach() for k, v in scores.items()}))
        return z, lag, stats


@torch.no_grad()
def refresh_fp32(masks: nn.Module) -> None:
    """Copy the exact fp32 values of the mask logits and multipliers into ``ShearMasks.fp32``, gathered whole from
    whatever shards them: an FSDP1 wrapper (``summon_full_params`` gathers in full precision), FSDP2 DTensors
    (``full_tensor``), or plain parameters. Every rank must call it (it may communicate); the forward then reads these
    values instead of the ones FSDP mixed precision casts. Call it after the parameters change: `clamp_masks` does.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    module = masks.module if isinstance(masks, FSDP) else masks

    def read() -> dict[str, torch.Tensor]:
        params = {s.name: module.log_alpha[s.name] for s in module.structures}
        params[LAMBDAS] = module.lambdas
        out = {}
        for name, p in params.items():
            p = p.detach()
            p = p.full_tensor() if hasattr(p, 'full_tensor') else p
            out[name] = p.float().clone()
        return out

    if isinstance(masks, FSDP):
        with FSDP.summon_full_params(masks, writeback=False):
            module.fp32 = read()
    else:
        module.fp32 = read()


@dataclass
class MaskSnapshot:
    source: ModelShape
    target: ModelShape
    log_alpha: dict = field(default_factory=dict)
    lambdas: torch.Tensor | None = None
    z: dict = field(default_factory=dict)  # exact-target deterministic masks
    binary: bool = False  # kept entries of z are 1 (else their soft value)


def target_buffer(target: ModelShape) -> torch.Tensor:
    """The target shape as a tensor (TARGET_FIELDS order), stored with the masks."""
    return torch.tensor([target.target_dict()[k] for k in TARGET_FIELDS])


def target_from_buffer(source: ModelShape, buffer: torch.Tensor) -> ModelShape:
    """Inverse of `target_buffer`."""
    return source.replace(**dict(zip(TARGET_FIELDS, (int(v) for v in buffer.tolist()), strict=True)))


def expected_shape(source: ModelShape, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Expected sizes and parameter count, from per-entry keep probabilities (or 0/1 keep indicators).
    Missing structures count as fully kept."""
    full = full_masks(scores, source)
    layer, hidden = full['layer'], full['hidden'].sum()
    kv, query, inter = full['kv'].sum(-1), full['query'].sum(-1), full['intermediate'].sum(-1)
    heads = kv * query
    params = (layer * layer_params(hidden, kv, heads, source.head_dim, inter, source.qkv_bias, source.o_bias,
                                   source.mlp_bias)).sum()
    params = params + embedding_params(hidden, source.vocab_size, source.tie_word_embeddings)
    kept = layer.sum().clamp(min=1e-12)
    return {
        'expected/num_hidden_layers': layer.sum(),
        'expected/hidden_size': hidden,
        'expected/num_attention_heads': (layer * heads).sum() / kept,
        'expected/num_key_value_heads': (layer * kv).sum() / kept,
        'expected/intermediate_size': (layer * inter).sum() / kept,
        'expected/num_params': params,
    }
