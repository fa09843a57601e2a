"""Peak extra host memory of the distillation loss (forward + backward) at a 128k vocabulary: the plain formula through
autograd, the fused loss with the teacher's logits made whole, and the fused loss with the teacher's output layer
applied block by block (what ``shear_distill`` does), at two numbers of positions (CPU, fp32).

The setting is Llama-3's vocabulary (128,256 tokens) and SmolLM2-135M's hidden size (576): the student's logits
(positions x vocabulary, fp32, requiring a gradient), the teacher's final hidden states and its output layer exist
before the measurement, as they do when the loss runs. Each arm runs in its own child process (glibc returns freed
large blocks to the system at once: ``MALLOC_MMAP_THRESHOLD_=1MiB``); the peak RSS (VmHWM, reset just before the
loss) minus the RSS before it is the loss's extra memory, the teacher's logits included when an arm makes them whole.
The table also gives it in units of one logits tensor (positions x vocabulary x 4 bytes): what grows with tokens x
vocabulary. Its bound for ``fused+head``: one such tensor (the gradient with respect to the student's logits, which
the backward of the output layer needs anyway) plus a working set of a few blocks of ``2**25`` fp32 elements
(``composer_shear.kd.BLOCK_ELEMENTS``), whatever the number of positions.

Run: ``.venv/bin/python bench/kd_memory.py``. The last line is ``kd_memory_ratio: X.XXX``: the extra memory of
``fused+head`` over that of ``formula`` at the smaller number of positions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ARMS = ('formula', 'fused', 'fused+head')
MALLOC_ENV = {'MALLOC_MMAP_THRESHOLD_': str(2 ** 20)}


def rss_kb(field: str) -> int:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ':'))


def child(arm: str, positions: int, vocab: int, hidden: int) -> dict:
    """One arm's loss forward + backward; its extra peak RSS (KiB) and time."""
    import torch

    from composer_shear.kd import distillation_loss
    torch.set_num_threads(2)
    torch.manual_seed(0)  # the output layer's initialisation: the same teacher in every child
    gen = torch.Generator().manual_seed(0)
    batch = 2
    seq = positions // batch
    student = torch.randn(batch, seq, vocab, generator=gen).requires_grad_(True)
    states = torch.randn(batch, seq, hidden, generator=gen)
    head = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    with open('/proc/self/clear_refs', 'w') as f:  # reset VmHWM to the current RSS
        f.write('5')
    before = rss_kb('VmRSS')
    start = time.perf_counter()
    if arm == 'fused+head':
        loss = distillation_loss(student, states, labels, teacher_head=head)
    else:
        with torch.no_grad():
            teacher = head(states)
        if arm == 'fused':
            loss = distillation_loss(student, teacher, labels)
        else:
            s = torch.log_softmax(student[:, :-1].float(), -1)
            t = torch.log_softmax(teacher[:, :-1].float(), -1)
            loss = (t.exp() * (t - s)).sum(-1).mean()
    loss.backward()
    seconds = time.perf_counter() - start
    return {'arm': arm, 'positions': positions, 'extra_kb': rss_kb('VmHWM') - before, 'seconds': seconds,
            'loss': loss.item()}


def run_child(arm: str, positions: int, args) -> dict:
    cmd = [sys.executable, __file__, '--child', arm, '--vocab', str(args.vocab), '--hidden', str(args.hidden),
           '--positions', str(positions)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV})
    if res.returncode != 0:
        raise RuntimeError(f'{arm} at {positions} positions failed:\n{res.stderr[-3000:]}')
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--vocab', type=int, default=128256, help='vocabulary size (Llama-3: 128,256)')
    p.add_argument('--hidden', type=int, default=576, help="the teacher's hidden size")
    p.add_argument('--positions', default='1024,4096',
                   help='comma-separated numbers of positions (2 sequences each); the formula runs at the first')
    p.add_argument('--child', choices=ARMS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, int(args.positions), args.vocab, args.hidden)))
        return
    from composer_shear.kd import block_rows
    sizes = [int(x) for x in args.positions.split(',')]
    print(f'vocabulary {args.vocab:,}, teacher hidden size {args.hidden}, fp32, CPU; blocks of '
          f'{block_rows(args.vocab)} positions; one logits tensor = positions x vocabulary x 4 bytes')
    print(f'{"arm":<12}{"positions":>10}{"extra peak":>14}{"in logits":>11}{"time":>10}{"loss":>12}')
    rows = []
    for positions in sizes:
        for arm in ARMS:
            if arm == 'formula' and positions != sizes[0]:
                continue  # ~10 logits tensors: kept to the smaller size
            r = run_child(arm, positions, args)
            logits_kb = positions * args.vocab * 4 / 1024
            print(f'{arm:<12}{positions:>10,}{r["extra_kb"] / 1024:>10.0f} MiB{r["extra_kb"] / logits_kb:>10.2f}x'
                  f'{r["seconds"]:>9.2f}s{r["loss"]:>12.6f}', flush=True)
            rows.append(r)
    first = {r['arm']: r for r in rows if r['positions'] == sizes[0]}
    for positions in sizes[1:]:
        big = next(r for r in rows if r['arm'] == 'fused+head' and r['positions'] == positions)
        grew = (big['extra_kb'] - first['fused+head']['extra_kb']) / 1024
        logits = (positions - sizes[0]) * args.vocab * 4 / 2 ** 20
        print(f'fused+head, {sizes[0]:,} -> {positions:,} positions: +{grew:.0f} MiB extra for +{logits:.0f} MiB of '
              f'logits (the gradient)')
    print(f'kd_memory_ratio: {first["fused+head"]["extra_kb"] / first["formula"]["extra_kb"]:.3f}')


if __name__ == '__main__':
    main()
