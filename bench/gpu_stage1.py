"""GPU check, stage 1: the functional core on one GPU with nothing but torch, transformers and this repository's
source (no Composer, llm-foundry, streaming or omegaconf: the lent GPU machine has none of them).

Rows, each printed and appended to ``OUT/gpu_check.md`` / ``gpu_check.jsonl`` as soon as it is measured:

1. **masked = exported** (random LLaMA of SmolLM2-135M's shape, random deterministic masks over every structure):
   the hooked model's logits against ``prune_model``'s smaller model on the device, in fp32 with TF32 off (the CPU
   tests' tolerance, 1e-4) and in bf16 (reported).
2. **training step, plain vs masked** (random 1.1B LLaMA, TinyLlama's shape, bf16 autocast, AdamW): the same model
   and optimizer, hooks off (plain) or masks drawn per step with the Lagrangian added and ``clamp_masks`` after
   the step (masked), timed in interleaved rounds; ms/step, tokens/s, the ratio, peak memory per arm.
3. **one-shot ranking + export of the 1.1B model**: ``importance`` on calibration batches, the exact-target masks,
   masked logits against the exported model's (bf16), the exported parameter count against the target's.
4. **distillation loss at a 128k vocabulary** (Llama-3's 128,256): ``distillation_loss`` forward + backward against
   the textbook fp32 formula: value, gradient, time and peak memory of each.
5. **torch.compile of the masked model** (8 layers of the SmolLM2 shape, masks drawn per step): logits and loss
   against eager, compiled graphs, step time eager vs compiled.

``--cpu`` runs the same code on the CPU at tiny sizes (what the test suite does). Last line: ``checks failed: N of
M``. Run on the GPU machine with ``bash bench/gpu_check.sh`` (bench/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from _table import Table

TOLERANCE_FP32 = 1e-4  # the CPU tests' tolerance for masked vs exported logits
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, tie_word_embeddings=True, max_position_embeddings=2048)
SMOLLM2_TARGET = dict(num_hidden_layers=24, hidden_size=480, num_attention_heads=6, num_key_value_heads=2,
                      intermediate_size=1152)  # the demo's target
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False,
                max_position_embeddings=2048)  # TinyLlama-1.1B's shape
LLAMA_1B_TARGET = dict(num_hidden_layers=16, hidden_size=1536, num_attention_heads=24, num_key_value_heads=4,
                       intermediate_size=4096)
ALL = ('layer', 'hidden', 'head', 'intermediate')
# sizes that fit an 80 GB card (the 1.1B step peaks near 40 GiB) and a single call of a few minutes; --cpu: tiny
SIZES = {
    'gpu': dict(mid=SMOLLM2, mid_target=SMOLLM2_TARGET, big=LLAMA_1B, big_target=LLAMA_1B_TARGET, batch=4,
                seq=2048, calib=4, kd_tokens=8192, kd_vocab=128256, compile_layers=8, compile_backend='inductor'),
    'cpu': dict(mid={}, mid_target=None, big=dict(num_hidden_layers=6), big_target=None, batch=2, seq=32, calib=2,
                kd_tokens=64, kd_vocab=1024, compile_layers=2, compile_backend='aot_eager'),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default=os.environ.get('OUT'), help='folder for gpu_check.md/.jsonl (default: $OUT)')
    p.add_argument('--cpu', action='store_true', help='run on the CPU at tiny sizes (the test)')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps per arm')
    p.add_argument('--rounds', type=int, default=3, help='timed rounds (the arm order alternates)')
    p.add_argument('--steps', type=int, default=5, help='timed steps per arm per round')
    p.add_argument('--only', help='comma-separated checks to run (default all): ' + ','.join(CHECKS))
    args = p.parse_args(argv)
    for name in ('warmup', 'rounds', 'steps'):
        if getattr(args, name) < (0 if name == 'warmup' else 1):
            p.error(f'--{name} must be at least {0 if name == "warmup" else 1}, got {getattr(args, name)}')
    args.only = args.only.split(',') if args.only else list(CHECKS)
    unknown = [c for c in args.only if c not in CHECKS]
    if unknown:
        p.error(f'--only: unknown check {unknown[0]!r}; choose from {", ".join(CHECKS)}')
    return args


# helpers --------------------------------------------------------------------------------------------------------

class Device:
    """Where the checks run, with its synchronisation and peak-memory reading."""

    def __init__(self, cpu: bool) -> None:
        import torch
        self.torch = torch
        self.name = 'cpu' if cpu else 'cuda'
        self.cuda = not cpu

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    @contextlib.contextmanager
    def peak(self) -> Iterator[dict]:
        """Peak GPU memory allocated inside the block (GiB; None on the CPU), in the yielded dict's 'gib'."""
        out = {'gib': None}
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        yield out
        if self.cuda:
            self.torch.cuda.synchronize()
            out['gib'] = self.torch.cuda.max_memory_allocated() / 2 ** 30

    def memory(self, gib: float | None) -> str:
        return f'peak {gib:.1f} GiB' if gib is not None else 'peak memory: CPU, not measured'


def random_model(config_kw: dict, device: Device, seed: int = 0, attn: str = 'sdpa') -> tuple:
    """A random LLaMA of `config_kw` (over the tiny test config's defaults) on the device, fp32, eval mode."""
    from composer_shear.testing import llama_config, tiny_model
    config = llama_config('gqa', **config_kw)
    return tiny_model(config, attn=attn, seed=seed).to(device.name), config


def target_of(sizes: dict, key: str) -> dict:
    from composer_shear.testing import TARGET
    return dict(sizes[key] or TARGET)


def timed(device: Device, fn: Callable[[], object]) -> float:
    device.sync()
    start = time.perf_counter()
    fn()
    device.sync()
    return time.perf_counter() - start


def ids_for(config, batch: int, seq: int, seed: int, device: Device):
    import torch
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, config.vocab_size, (batch, seq), generator=gen).to(device.name)


# 1. masked = exported ------------------------------------------------------------------------------------------

def check_equivalence(table: Table, device: Device, sizes: dict) -> None:
    import torch

    from composer_shear.functional import prune_model
    from composer_shear.hooks import MaskedForward
    from composer_shear.testing import random_masks
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, config = random_model(sizes['mid'], device)
    masks = random_masks(config, target_of(sizes, 'mid_target'), list(ALL), seed=0)
    snap = masks.snapshot()
    small = prune_model(model.cpu(), masks)  # the export's weights; the source is left unchanged
    hooks = MaskedForward(model, masks.source)
    ids = ids_for(config, 2, min(sizes['seq'], 256), 1, device)
    for dtype, tol in ((torch.float32, TOLERANCE_FP32), (torch.bfloat16, None)):
        big = model.to(device=device.name, dtype=dtype)
        hooks.set({k: v.to(device=device.name, dtype=dtype) for k, v in snap.z.items()})
        with torch.no_grad():
            masked = big(ids).logits.float()
            exported = small.to(device=device.name, dtype=dtype)(ids).logits.float()
        diff = (masked - exported).abs().max().item()
        name = str(dtype).removeprefix('torch.')
        table.add('masked = exported', f'{name}{", TF32 off" if tol else ""}, {device.name}, random masks',
                  f'max abs logit diff {diff:.2e} (max |logit| {masked.abs().max().item():.2f})'
                  + (f', tolerance {tol:g}' if tol else ''), diff <= tol if tol else math.isfinite(diff))
    hooks.remove()


# 2. training step, plain vs masked ----------------------------------------------------------------------------------

def check_training(table: Table, device: Device, sizes: dict, args: argparse.Namespace) -> float | None:
    import torch

    from composer_shear.functional import apply_shear_pruning, clamp_masks, sample_masks
    model, config = random_model(sizes['big'], device)
    model.train()
    fused = {'fused': True} if device.cuda else {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, **fused)
    masks = apply_shear_pruning(model, target_of(sizes, 'big_target'), ALL, optimizers=opt, lag_lr=0.01)
    ids = ids_for(config, sizes['batch'], sizes['seq'], 2, device)
    autocast = torch.autocast(device.name, dtype=torch.bfloat16)

    def step(arm: str) -> None:
        if arm == 'masked':
            lagrangian, _ = sample_masks(masks, progress=1.0)
        else:
            masks.hooks.set(None)
            lagrangian = 0.0
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss + lagrangian
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if arm == 'masked':
            clamp_masks(masks)

    arms = ('plain', 'masked')
    times = {arm: [] for arm in arms}
    peaks = {arm: 0.0 for arm in arms}
    for arm in arms:
        for _ in range(args.warmup):
            step(arm)
    for r in range(args.rounds):
        for arm in (arms if r % 2 == 0 else arms[::-1]):
            with device.peak() as peak:
                for _ in range(args.steps):
                    times[arm].append(timed(device, lambda a=arm: step(a)))
            peaks[arm] = max(peaks[arm], peak['gib'] or 0.0)
    tokens = sizes['batch'] * sizes['seq']
    params = sum(p.numel() for p in model.parameters()) / 1e9
    median = {arm: statistics.median(t) for arm, t in times.items()}
    for arm in arms:
        ratio = f', x{median["plain"] / median[arm]:.3f} of plain tokens/s' if arm != 'plain' else ''
        gib = peaks[arm] if device.cuda else None
        table.add('training step, bf16 autocast', f'{arm}, {params:.2f}B random LLaMA, {sizes["batch"]} x '
                  f'{sizes["seq"]} tokens', f'{median[arm] * 1e3:.1f} ms/step, {tokens / median[arm]:,.0f} '
                  f'tokens/s{ratio}, {device.memory(gib)}', None)
    masks.hooks.remove()
    return median['plain'] / median['masked']


# 3. one-shot ranking + export of the 1.1B model ------------------------------------------------------------------

def check_oneshot(table: Table, device: Device, sizes: dict) -> None:
    import torch

    from composer_shear.hooks import MaskedForward
    from composer_shear.masks import MaskSnapshot
    from composer_shear.oneshot import importance, oneshot_masks
    from composer_shear.shapes import ModelShape
    from composer_shear.surgery import build_model, prune_to_target
    model, config = random_model(sizes['big'], device)
    source = ModelShape.from_config(config)
    target = source.resolve_target(target_of(sizes, 'big_target'), ALL)
    calib = [ids_for(config, sizes['batch'], sizes['seq'], 10 + i, device) for i in range(sizes['calib'])]
    scores = {}
    with device.peak() as peak:
        seconds = timed(device, lambda: scores.update(importance(model, calib)))
    table.add('one-shot ranking', f'{sizes["calib"]} x {sizes["batch"]} x {sizes["seq"]} tokens, '
              f'{source.num_params() / 1e9:.2f}B', f'{seconds:.1f} s, {device.memory(peak["gib"])}', True)
    z = oneshot_masks(scores, source, target, ALL)
    start = time.perf_counter()
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    pruned, new_config = prune_to_target(sd, MaskSnapshot(source, target, z=z), config, torch.bfloat16)
    small = build_model(pruned, new_config).to(device.name)
    seconds = time.perf_counter() - start
    exported = sum(p.numel() for p in small.parameters())
    table.add('one-shot export', f'-> {target.target_dict()}', f'{exported:,} parameters (target '
              f'{target.num_params():,}), {seconds:.1f} s on the CPU', exported == target.num_params())
    hooks = MaskedForward(model.to(torch.bfloat16), source)
    hooks.set({k: v.to(device.name, torch.bfloat16) for k, v in z.items()})
    ids = calib[0][:2, :256]
    with torch.no_grad():
        masked, out = model(ids).logits.float(), small(ids).logits.float()
    diff = (masked - out).abs().max().item()
    table.add('one-shot masked = exported', f'bf16, {device.name}', f'max abs logit diff {diff:.2e} (max |logit| '
              f'{masked.abs().max().item():.2f})', math.isfinite(diff))
    hooks.remove()


# 4. distillation loss at a 128k vocabulary ------------------------------------------------------------------------

def check_distillation(table: Table, device: Device, sizes: dict) -> None:
    import torch
    import torch.nn.functional as F

    from composer_shear.kd import distillation_loss
    n, vocab = sizes['kd_tokens'], sizes['kd_vocab']
    gen = torch.Generator().manual_seed(3)
    student = (3 * torch.randn(1, n, vocab, generator=gen)).to(device.name, torch.bfloat16)
    teacher = (3 * torch.randn(1, n, vocab, generator=gen)).to(device.name, torch.bfloat16)
    labels = torch.randint(0, vocab, (1, n), generator=gen).to(device.name)

    def fused() -> tuple:
        s = student.clone().requires_grad_(True)
        loss = distillation_loss(s, teacher, labels)
        loss.backward()
        return loss.detach(), s.grad

    def textbook() -> tuple:  # KL(teacher || student) in fp32 at every position but the last (the causal shift)
        s = student.clone().requires_grad_(True)
        lt, ls = F.log_softmax(teacher[:, :-1].float(), -1), F.log_softmax(s[:, :-1].float(), -1)
        loss = (lt.exp() * (lt - ls)).sum(-1).mean()
        loss.backward()
        return loss.detach(), s.grad

    results = {}
    for name, fn in (('fused', fused), ('fp32 formula', textbook)):
        fn()  # warm-up (kernels, allocator)
        with device.peak() as peak:
            out = {}
            seconds = timed(device, lambda f=fn, o=out: o.update(result=f()))
        results[name] = (*out['result'], seconds, peak['gib'])
    (a, ga, ta, ma), (b, gb, tb, mb) = results['fused'], results['fp32 formula']
    value = abs(a.float() - b.float()).item() / max(abs(b.item()), 1e-12)
    grad = ((ga.float() - gb.float()).abs().max() / gb.float().abs().max()).item()
    ok = value < 1e-3 and grad < 2e-2
    memory = f', peak {ma:.1f} vs {mb:.1f} GiB' if device.cuda else ''
    table.add('distillation loss, forward + backward', f'{n:,} tokens x {vocab:,} vocab, bf16 logits',
              f'fused {ta * 1e3:.0f} ms vs fp32 formula {tb * 1e3:.0f} ms{memory}; relative difference: value '
              f'{value:.1e}, gradient {grad:.1e}', ok)


# 5. torch.compile of the masked model ------------------------------------------------------------------------------

def check_compile(table: Table, device: Device, sizes: dict, args: argparse.Namespace) -> None:
    import torch

    from composer_shear.functional import apply_shear_pruning, sample_masks
    kw = {**sizes['mid'], 'num_hidden_layers': sizes['compile_layers']}
    model, config = random_model(kw, device)
    model.train()
    target = {**target_of(sizes, 'mid_target'), 'num_hidden_layers': max(1, sizes['compile_layers'] - 1)}
    masks = apply_shear_pruning(model, target, ALL)
    ids = ids_for(config, sizes['batch'], min(sizes['seq'], 1024), 4, device)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=sizes['compile_backend'])
    autocast = torch.autocast(device.name, dtype=torch.bfloat16)

    def step(m, seed: int) -> tuple:
        sample_masks(masks, 1.0, torch.Generator().manual_seed(seed))
        with autocast:
            out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return out.logits.detach().float(), out.loss.detach().float()

    start = time.perf_counter()
    try:
        got = step(compiled, 0)
    except Exception as e:  # report what fails (the check exists to find out)
        table.add('torch.compile, masked model', f'{sizes["compile_backend"]}, {device.name}',
                  f'failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}', False)
        return
    first = time.perf_counter() - start
    want = step(model, 0)
    diff = (got[0] - want[0]).abs().max().item()
    scale = want[0].abs().max().item()
    loss = abs(got[1] - want[1]).item() / abs(want[1]).item()
    times = {'eager': [], 'compiled': []}
    for r in range(args.rounds):
        for name in (('eager', 'compiled') if r % 2 == 0 else ('compiled', 'eager')):
            m = model if name == 'eager' else compiled
            times[name] += [timed(device, lambda s=s, m=m: step(m, s)) for s in range(1, args.steps + 1)]
    from torch._dynamo.utils import counters
    graphs = counters['stats'].get('unique_graphs', 0)
    eager, fast = statistics.median(times['eager']), statistics.median(times['compiled'])
    table.add('torch.compile, masked model', f'{sizes["compile_backend"]}, {sizes["compile_layers"]} layers, '
              f'{device.name}, bf16 autocast', f'logits max diff {diff:.2e} (max |logit| {scale:.2f}), loss '
              f'{loss:.1e} relative; {graphs} graph(s), first step {first:.0f} s; {eager * 1e3:.1f} -> '
              f'{fast * 1e3:.1f} ms/step (x{eager / fast:.2f})', loss < 1e-2 and math.isfinite(diff))
    masks.hooks.remove()


CHECKS = ('equivalence', 'training', 'oneshot', 'distillation', 'compile')


# main ------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import transformers
    if not args.cpu and not torch.cuda.is_available():
        print('gpu_stage1: no CUDA device here, nothing to check (--cpu runs the same checks on the CPU)')
        return 0
    device = Device(args.cpu)
    sizes = SIZES['cpu' if args.cpu else 'gpu']
    table = Table(Path(args.out) if args.out else None)
    name = 'CPU' if args.cpu else torch.cuda.get_device_name(0)
    missing = [m for m in ('composer', 'llmfoundry', 'streaming', 'omegaconf') if not importable(m)]
    table.add('stage 1 environment', name, f'Python {platform.python_version()}, torch {torch.__version__}, '
              f'transformers {transformers.__version__}; not installed: {", ".join(missing) or "none"}', None)
    ratio = None
    for check in args.only:
        start = time.perf_counter()
        try:
            if check == 'equivalence':
                check_equivalence(table, device, sizes)
            elif check == 'training':
                ratio = check_training(table, device, sizes, args)
            elif check == 'oneshot':
                check_oneshot(table, device, sizes)
            elif check == 'distillation':
                check_distillation(table, device, sizes)
            elif check == 'compile':
                check_compile(table, device, sizes, args)
        except Exception as e:  # one failed check must not lose the others' rows
            traceback.print_exc()
            table.add(check, 'error', f'{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""}', False)
        if device.cuda:
            torch.cuda.empty_cache()
        print(f'[{check}: {time.perf_counter() - start:.0f} s]', flush=True)
    print(f'checks failed: {len(table.failed)} of {table.checked}')
    print(f'masked_step_throughput_ratio: {ratio:.3f}' if ratio else 'masked_step_throughput_ratio: n/a')
    return 1 if table.failed else 0


def importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


if __name__ == '__main__':
    sys.exit(main())
