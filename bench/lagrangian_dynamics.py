"""The constraint dynamics alone: how closely the expected sparsity tracks the target under Adam multipliers (the
paper's) and under plain gradient ascent (`shear_pruning.multiplier_update: ascent`), at the paper's schedule
and at the reproduction's.

No language model: the mask logits and multipliers of SmolLM2-135M's demo target (30 -> 24 layers, hidden 576 ->
480, 3 -> 2 KV groups, intermediate 1536 -> 1152) are trained on the Lagrangian plus a constant pull toward keeping
every entry (`--pull`: the language-model loss's preference for more capacity, per unit of expected score), with
the schedules of a real run: the mask learning rate lag_lr follows linear warm-up + cosine decay to 10 % (the
paper's `scheduler`), the target rises linearly over the Lagrangian warm-up. Reports, per arm, the worst
deviation of any structure's expected sparsity from its final target after the warm-up, the deviation at the end,
and the largest |lambda_1|.

    python bench/lagrangian_dynamics.py

Last line: `ascent_over_adam_worst_deviation <ratio>` at the short schedule (below 1: ascent tracks closer).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from composer_shear.masks import LOG_ALPHA_MAX, ShearMasks, expected_score
from composer_shear.shapes import ModelShape

SOURCE = dict(model_type='llama', num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
              head_dim=64, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)
TARGET = dict(num_hidden_layers=24, hidden_size=480, num_attention_heads=6, num_key_value_heads=2,
              intermediate_size=1152)
SCHEDULES = {  # steps, Lagrangian warm-up, learning-rate warm-up
    'paper (3,200 steps)': (3200, 640, 320),
    'reproduction (100 steps)': (100, 25, 10),
}


def lr_factor(step: int, steps: int, warmup: int, alpha_f: float = 0.1) -> float:
    """Composer's cosine_with_warmup: linear from 0 over `warmup`, then cosine down to `alpha_f`."""
    if step < warmup:
        return step / warmup
    frac = (step - warmup) / max(steps - warmup, 1)
    return alpha_f + (1 - alpha_f) * 0.5 * (1 + math.cos(math.pi * frac))


def simulate(update: str, steps: int, lag_warmup: int, lr_warmup: int, lag_lr: float, pull: float) -> dict:
    """Train the masks and multipliers on the Lagrangian (+ pull); returns the deviations and |lambda_1| max."""
    torch.manual_seed(0)
    source = ModelShape(**SOURCE)
    masks = ShearMasks(source, source.resolve_target(TARGET, ['layer', 'hidden', 'head', 'intermediate']),
                       ['layer', 'hidden', 'head', 'intermediate'])
    groups = [{'params': list(masks.log_alpha.values()), 'lr': lag_lr}]
    if update == 'adam':
        groups.append({'params': [masks.lambdas], 'lr': -lag_lr})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    base = [g['lr'] for g in opt.param_groups]
    worst = end = lam_max = 0.0
    for step in range(steps):
        for g, b in zip(opt.param_groups, base, strict=True):
            g['lr'] = b * lr_factor(step, steps, lr_warmup)
        _, lag, stats = masks('sample', progress=min(step / lag_warmup, 1.0))
        keep = sum(expected_score(v).mean() for v in masks.log_alpha.values())
        (lag - pull * keep).backward()
        opt.step()
        if update == 'ascent':
            with torch.no_grad():
                masks.lambdas.add_(masks.lambdas.grad, alpha=opt.param_groups[0]['lr'])
        opt.zero_grad()
        masks.lambdas.grad = None
        with torch.no_grad():
            for p in masks.log_alpha.values():
                p.clamp_(-LOG_ALPHA_MAX, LOG_ALPHA_MAX)
        dev = max(abs(float(stats[f'expected_sparsity/{s.name}']) - s.target_sparsity) for s in masks.structures)
        if step >= lag_warmup:
            worst = max(worst, dev)
        end = dev
        lam_max = max(lam_max, float(masks.lambdas[:, 0].abs().max()))
    return {'worst': worst, 'end': end, 'lambda_1': lam_max}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--lag-lr', type=float, default=1.0)
    p.add_argument('--pull', type=float, default=0.05, help='constant reward per unit of mean keep probability')
    args = p.parse_args(argv)
    print(f'lag_lr {args.lag_lr}, pull {args.pull}; deviation = |expected - target sparsity|, worst structure')
    print('| schedule | multipliers | worst deviation after warm-up | deviation at the end | max abs lambda_1 |')
    print('|---|---|---|---|---|')
    ratio = None
    for name, (steps, lag_warmup, lr_warmup) in SCHEDULES.items():
        res = {u: simulate(u, steps, lag_warmup, lr_warmup, args.lag_lr, args.pull) for u in ('adam', 'ascent')}
        for u, r in res.items():
            print(f'| {name} | {u} | {r["worst"]:.3f} | {r["end"]:.3f} | {r["lambda_1"]:.2f} |')
        ratio = res['ascent']['worst'] / max(res['adam']['worst'], 1e-12)
    print(f'ascent_over_adam_worst_deviation {ratio:.3f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
