"""What the step-time benchmarks share: a step timer, interleaved rounds of two Trainers, and peak memory measured
in one child process per arm (bench/mask_overhead.py, bench/distill_overhead.py)."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

from composer import Callback, Trainer

# glibc keeps freed heap memory (and raises its mmap threshold after each large free), so by default the RSS peak
# partly measures allocator retention, which varies from run to run. With a fixed 1 MiB threshold every tensor of
# 1 MiB or more is its own mapping, returned on free, and the peak RSS follows the live tensors.
MALLOC_ENV = {'MALLOC_MMAP_THRESHOLD_': str(1 << 20)}


class StepTimer(Callback):
    """perf_counter() at BATCH_START and BATCH_END of every training step (`sync`: after waiting for the GPU, and
    the peak GPU memory allocated during its own steps in `peak_bytes`, so that interleaved arms are measured apart)."""

    def __init__(self, sync: bool = False):
        self.times: list[float] = []
        self._start = None
        self.sync = sync
        self.peak_bytes = 0

    def _now(self) -> float:
        if self.sync:
            import torch
            torch.cuda.synchronize()
        return time.perf_counter()

    def batch_start(self, state, logger):
        if self.sync:
            import torch
            torch.cuda.reset_peak_memory_stats()
        self._start = self._now()

    def batch_end(self, state, logger):
        self.times.append(self._now() - self._start)
        if self.sync:
            import torch
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated())


def fmt_ms(seconds: float) -> str:
    return f'{seconds * 1e3:9.1f} ms'


def proc_status_kb(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise KeyError(field)


def interleaved(arms: dict[str, tuple[Trainer, StepTimer]], warmup: int, rounds: int,
                steps: int) -> tuple[dict[str, list[float]], list[dict[str, float]]]:
    """Untimed warm-up steps per arm, then `rounds` rounds of `steps` steps per arm, the arms' order alternating per
    round so that both see the same machine conditions; prints each round's medians. Returns every timed step per
    arm and each round's medians."""
    names = list(arms)
    for trainer, timer in arms.values():
        trainer.fit(duration=f'{warmup}ba')
        timer.times.clear()
    per_round = []
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        med = {}
        for name in order:
            trainer, timer = arms[name]
            trainer.fit(duration=f'{steps}ba')
            med[name] = statistics.median(timer.times[-steps:])
        per_round.append(med)
        print(f'  round {r + 1} ({order[0]} first): ' + '  '.join(f'{n} {fmt_ms(med[n])}' for n in names)
              + f'  ratio {med[names[1]] / med[names[0]]:.3f}', flush=True)
    return {name: timer.times for name, (_, timer) in arms.items()}, per_round


def print_step_table(times: dict[str, list[float]]) -> None:
    print(f'\n{"step time":<12}{"median":>12}{"mean":>12}{"min":>12}{"max":>12}{"n":>5}')
    for name, t in times.items():
        print(f'{name:<12}{fmt_ms(statistics.median(t)):>12}{fmt_ms(statistics.mean(t)):>12}{fmt_ms(min(t)):>12}'
              f'{fmt_ms(max(t)):>12}{len(t):>5}')


def memory_child(arm: str, trainer: Trainer, steps: int) -> None:
    """Run `steps` steps of one arm and print a JSON line. The peak is VmHWM (this address space's peak RSS):
    ru_maxrss is the same kind of number but survives fork+exec, so in a child of a big process it reports the
    parent's RSS. Both are printed."""
    before = proc_status_kb('VmRSS')
    trainer.fit(duration=f'{steps}ba')
    print(json.dumps({'arm': arm, 'rss_before_fit_kb': before, 'peak_kb': proc_status_kb('VmHWM'),
                      'ru_maxrss_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def measure_memory(script: str, arms: Sequence[str], argv: Sequence[str], malloc_env: bool = True) -> dict:
    """Run ``python script --arm ARM --memory-only *argv`` once per arm (each calls `memory_child`); their JSON."""
    env = {**MALLOC_ENV, **os.environ} if malloc_env else dict(os.environ)
    out = {}
    for arm in arms:
        cmd = [sys.executable, script, '--arm', arm, '--memory-only', *argv]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise RuntimeError(f'memory child for {arm} failed:\n{res.stderr[-4000:]}')
        out[arm] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def print_memory(mem: dict, steps: int, malloc_env: bool = True) -> None:
    """The per-arm peak-RSS table and the ratio of the second arm's peak over the first's."""
    malloc = 'MALLOC_MMAP_THRESHOLD_=1MiB' if malloc_env else 'default malloc'
    print(f'peak memory (child per arm, {steps} steps, {malloc})')
    print(f'  {"":<12}{"peak RSS (VmHWM)":>16}{"RSS before fit":>18}{"peak - before":>16}{"ru_maxrss":>14}')
    for arm, m in mem.items():
        print(f'  {arm:<12}{m["peak_kb"] / 1024:>12.0f} MiB{m["rss_before_fit_kb"] / 1024:>14.0f} MiB'
              f'{(m["peak_kb"] - m["rss_before_fit_kb"]) / 1024:>12.0f} MiB{m["ru_maxrss_kb"] / 1024:>10.0f} MiB')
    (a, ma), (b, mb) = list(mem.items())[:2]
    inc = {arm: m['peak_kb'] - m['rss_before_fit_kb'] for arm, m in mem.items()}
    print(f'peak-RSS ratio {b}/{a}: {mb["peak_kb"] / ma["peak_kb"]:.3f} '
          f'(training increment, peak - before fit: {inc[b] / max(inc[a], 1):.3f})')
