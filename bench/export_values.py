"""Soft or binary mask values at export: the per-domain eval loss of the model exported from one pruning
checkpoint both ways, side by side.

With `shear_pruning.mask_values: soft` (the paper's code), export folds each kept entry's deterministic mask value
(sigmoid(0.8 log alpha / beta): 0.996 at the upper clamp, 0.004 at the lower) into the weights; with `binary` (the
default) kept entries are 1. This exports one checkpoint both ways and measures each right after export.

    python bench/export_values.py --checkpoint repro_out/sheared/prune/latest-rank0.pt \\
        --source $(composer-shear assets) --data repro_out/data --domains cc,github,book,stackexchange,wiki,arxiv,c4-rp

Last line: `binary_minus_soft_avg_loss <nat>` (negative: binary exports a better model).
"""

from __future__ import annotations

import argparse
import sys

import torch


def export_both(checkpoint: str, source: str) -> dict:
    """{'soft': model, 'binary': model}: the exact-target selection with soft or 0/1 kept values."""
    from transformers import AutoConfig

    from composer_shear.export import masks_from_state, read_checkpoint, split_model_state
    from composer_shear.shapes import ModelShape
    from composer_shear.surgery import build_model, prune_to_target
    config = AutoConfig.from_pretrained(source)
    hf_sd, mask_sd = split_model_state(read_checkpoint(checkpoint)[0])
    masks = masks_from_state(ModelShape.from_config(config), mask_sd)
    models = {}
    for kind in ('soft', 'binary'):
        masks.binary_values.fill_(int(kind == 'binary'))
        with torch.no_grad():
            snap = masks.snapshot()
        pruned, new_config = prune_to_target(hf_sd, snap, config, torch.float32)
        models[kind] = build_model(pruned, new_config)
    return models


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', required=True, help='a Composer checkpoint of a shear_pruning run')
    p.add_argument('--source', required=True, help='the source HF folder (config)')
    p.add_argument('--data', required=True, help='prepare-data output (its eval split is used)')
    p.add_argument('--domains', required=True, help='comma-separated domains')
    p.add_argument('--seq', type=int, default=64)
    p.add_argument('--seqs', type=int, default=64, help='eval sequences per domain')
    args = p.parse_args(argv)
    from composer_shear.data.reference import eval_loss
    domains = args.domains.split(',')
    models = export_both(args.checkpoint, args.source)
    losses = {kind: {d: eval_loss(m, args.data, d, args.seq, batch_size=8, max_batches=max(1, args.seqs // 8))[0]
                     for d in domains} for kind, m in models.items()}
    print('| values | ' + ' | '.join(domains) + ' | average |')
    print('|---' * (len(domains) + 2) + '|')
    avg = {}
    for kind, ls in losses.items():
        avg[kind] = sum(ls.values()) / len(ls)
        print(f'| {kind} | ' + ' | '.join(f'{ls[d]:.3f}' for d in domains) + f' | {avg[kind]:.3f} |')
    print(f'binary_minus_soft_avg_loss {avg["binary"] - avg["soft"]:.4f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
