"""Training step time and peak memory of ShearPruning versus the same model without it (CPU, fp32).

Two Composer Trainers (llm-foundry ``ComposerHFCausalLM`` around one random LLaMA model) live in one process:
``plain`` (no algorithm) and ``pruned`` (``ShearPruning`` on all four structures). After untimed warm-up steps,
they train in R rounds of K steps each, the order of the arms alternating per round, so both see the same machine
conditions. A Callback times every step from BATCH_START to BATCH_END (no eval, no checkpoints).

Then, with torch directly on the pruned arm's model, it breaks the overhead down into
  (a) the mask module's forward ``masks('sample', progress=1.0)``, also with ``hooks.set(z)`` and the
      backward of the Lagrangian,
  (b) the hooks: forward + backward of the HF model with masks set versus ``hooks.set(None)``,
and it measures the peak RSS of each arm in a child process (``--arm ARM --memory-only``).

Run: ``.venv/bin/python bench/mask_overhead.py`` (see bench/README.md). The last line printed is
``mask_overhead_ratio: X.XXX``: median pruned step time / median plain step time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings('ignore', message='.*use_auth_token.*', category=FutureWarning)  # llm-foundry -> HF

from _harness import StepTimer, fmt_ms, interleaved, measure_memory, memory_child, print_memory, print_step_table  # noqa: E402
from composer import Trainer  # noqa: E402
from composer.devices import DeviceCPU  # noqa: E402
from composer.optim import DecoupledAdamW  # noqa: E402
from composer.utils import dist  # noqa: E402
from llmfoundry.models.hf import ComposerHFCausalLM  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from composer_shear.algorithm import ShearPruning  # noqa: E402
from composer_shear.testing import Tokens, loader, save_tiny  # noqa: E402

SOURCE = dict(num_hidden_layers=8, hidden_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
              intermediate_size=1376, vocab_size=8192)
TARGET = dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=688)
MODULES = ('layer', 'hidden', 'head', 'intermediate')
ARMS = ('plain', 'pruned')


def make_model_dir(folder: Path, seq: int) -> Path:
    if not (folder / 'config.json').exists():
        save_tiny(folder, kind='gqa', attn='sdpa', max_position_embeddings=max(seq, 128), **SOURCE)
    return folder


def build(arm: str, model_dir: Path, args, n_steps: int):
    """A Trainer for one arm, with its StepTimer (and its ShearPruning for the pruned arm)."""
    dist.initialize_dist(DeviceCPU())
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = ComposerHFCausalLM(tok, pretrained_model_name_or_path=str(model_dir), pretrained=True,
                               attn_implementation='sdpa', use_train_metrics=False)
    opt = DecoupledAdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    algo = None
    if arm == 'pruned':
        algo = ShearPruning(target=TARGET, pruning_modules=MODULES, lag_lr=0.1, lagrangian_warmup='100ba')
    timer = StepTimer()
    data = Tokens((n_steps + 1) * args.batch, args.seq, SOURCE['vocab_size'])
    trainer = Trainer(
        model=model, optimizers=opt, train_dataloader=loader(data, args.batch), max_duration=None,
        algorithms=[algo] if algo else [], callbacks=[timer], device='cpu', precision='fp32', seed=17,
        progress_bar=False, log_to_console=False, loggers=[], device_train_microbatch_size=args.batch,
        save_folder=None, run_name=f'bench-{arm}')
    return trainer, timer, algo


# breakdown: torch directly on the pruned arm's model -------------------------------------------------------

def breakdown(trainer, algo: ShearPruning, args) -> dict:
    state = trainer.state
    hf = state.model.model
    masks = ShearPruning.masks(state)
    hooks = masks.hooks
    hf.train()
    ids = Tokens(args.batch, args.seq, SOURCE['vocab_size'], seed=3).ids
    batch = {'input_ids': ids, 'attention_mask': torch.ones_like(ids), 'labels': ids.clone()}

    def zero():
        hf.zero_grad(set_to_none=True)
        masks.zero_grad(set_to_none=True)

    # (a) the mask module alone
    fwd, full = [], []
    for i in range(args.mask_reps + 5):
        t0 = time.perf_counter()
        z, lag, _ = masks('sample', progress=1.0)
        t1 = time.perf_counter()
        hooks.set(z)
        lag.backward()
        t2 = time.perf_counter()
        if i >= 5:
            fwd.append(t1 - t0)
            full.append(t2 - t0)
        zero()

    # (b) the hooks: forward + backward with masks set vs hooks disabled, interleaved
    fb = {'on': [], 'off': []}
    for i in range(args.hook_reps + 1):
        for mode in (('on', 'off') if i % 2 == 0 else ('off', 'on')):
            if mode == 'on':
                z, _, _ = masks('sample', progress=1.0)
                hooks.set(z)
            else:
                hooks.set(None)
            t0 = time.perf_counter()
            hf(**batch).loss.backward()
            dt = time.perf_counter() - t0
            zero()
            if i > 0:  # the first pair is warm-up
                fb[mode].append(dt)
    hooks.set(None)
    return {'mask_fwd': statistics.median(fwd), 'mask_fwd_set_bwd': statistics.median(full),
            'fb_on': statistics.median(fb['on']), 'fb_off': statistics.median(fb['off'])}


# main ------------------------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--batch', type=int, default=2, help='batch size (= microbatch size)')
    p.add_argument('--seq', type=int, default=512, help='sequence length')
    p.add_argument('--rounds', type=int, default=5, help='timed rounds (arm order alternates per round)')
    p.add_argument('--steps', type=int, default=5, help='timed steps per arm per round')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps per arm before the rounds')
    p.add_argument('--threads', type=int, default=2, help='torch.set_num_threads')
    p.add_argument('--hook-reps', type=int, default=3, help='forward+backward pairs (hooks on/off) in (b)')
    p.add_argument('--mask-reps', type=int, default=50, help='mask module calls timed in (a)')
    p.add_argument('--mem-steps', type=int, default=2,
                   help='steps run by each memory child (the peak is reached in step 2, once Adam has state)')
    p.add_argument('--default-malloc', action='store_true',
                   help='run the memory children without MALLOC_MMAP_THRESHOLD_=1MiB (peak RSS then partly '
                        'measures glibc heap retention)')
    p.add_argument('--skip-memory', action='store_true', help='no peak-RSS children')
    p.add_argument('--skip-breakdown', action='store_true', help='no (a)/(b) breakdown')
    p.add_argument('--model-dir', help='an existing model folder (default: a fresh one in a temp dir)')
    p.add_argument('--arm', choices=ARMS, help='with --memory-only: be the memory child of this arm (JSON line)')
    p.add_argument('--memory-only', action='store_true',
                   help='only the peak-memory comparison (with --arm: the child process of one arm)')
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.memory_only and args.arm:
        trainer, _, _ = build(args.arm, Path(args.model_dir), args, args.mem_steps)
        memory_child(args.arm, trainer, args.mem_steps)
        return

    with tempfile.TemporaryDirectory(prefix='mask_overhead_') as tmp:
        model_dir = make_model_dir(Path(args.model_dir or Path(tmp) / 'model'), args.seq)
        if args.memory_only:
            print_memory(memory(args, model_dir), args.mem_steps, not args.default_malloc)
        else:
            run(args, model_dir)


def memory(args, model_dir: Path) -> dict:
    argv = ['--model-dir', str(model_dir), '--batch', str(args.batch), '--seq', str(args.seq),
            '--threads', str(args.threads), '--mem-steps', str(args.mem_steps)]
    return measure_memory(__file__, ARMS, argv, not args.default_malloc)


def run(args, model_dir: Path):
    # memory first, while this process is still small
    mem = None if args.skip_memory else memory(args, model_dir)
    n_steps = args.warmup + args.rounds * args.steps
    arms = {arm: build(arm, model_dir, args, n_steps) for arm in ARMS}
    algo = arms['pruned'][2]
    src, tgt = algo.source, algo.target_shape
    print(f'model: {src.target_dict()} vocab {src.vocab_size}, {src.num_params() / 1e6:.1f}M params; '
          f'target {tgt.target_dict()}; modules {list(MODULES)}')
    print(f'batch {args.batch} x seq {args.seq}, fp32, CPU, torch threads {torch.get_num_threads()}; '
          f'warm-up {args.warmup}, {args.rounds} rounds x {args.steps} steps per arm')

    times, per_round = interleaved({arm: arms[arm][:2] for arm in ARMS}, args.warmup, args.rounds, args.steps)
    med = {arm: statistics.median(t) for arm, t in times.items()}
    ratio = med['pruned'] / med['plain']
    print_step_table(times)
    round_ratios = [m['pruned'] / m['plain'] for m in per_round]
    best = min(times['pruned']) / min(times['plain'])
    print(f'ratio pruned/plain: median-of-steps {ratio:.3f}, min-of-steps {best:.3f}, '
          f'per-round {min(round_ratios):.3f}..{max(round_ratios):.3f}')

    if not args.skip_breakdown:
        b = breakdown(arms['pruned'][0], algo, args)
        plain = med['plain']
        hooks = b['fb_on'] - b['fb_off']
        over = med['pruned'] - plain
        print()
        print(f'breakdown (fractions of the plain step, {fmt_ms(plain).strip()}; torch directly, medians)')
        rows = [
            ('(a) masks("sample", progress=1.0) forward', b['mask_fwd']),
            ('    ... + hooks.set(z) + Lagrangian backward', b['mask_fwd_set_bwd']),
            (f'(b) hooks: fwd+bwd with masks {fmt_ms(b["fb_on"]).strip()} - disabled {fmt_ms(b["fb_off"]).strip()}',
             hooks),
            ('total overhead in the Trainer (pruned - plain step)', over),
            ('rest (trainer - (a+) - (b): optimizer groups, events, noise)', over - b['mask_fwd_set_bwd'] - hooks),
        ]
        for name, v in rows:
            print(f'  {name:<78}{fmt_ms(v):>12}{v / plain:>9.1%}')

    if mem is not None:
        print()
        print_memory(mem, args.mem_steps, not args.default_malloc)

    print(f'mask_overhead_ratio: {ratio:.3f}')


if __name__ == '__main__':
    main()
