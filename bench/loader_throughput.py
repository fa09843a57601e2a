"""Samples per second of the `dynamic_text` loader (DynamicStreamingDataset) versus llm-foundry's plain
StreamingTextDataset, over the same MDS data, and how long a proportion update takes to reach the workers.

Both arms read the same prepared domains (`DATA/train/<domain>`, written by `composer-shear prepare-data`) with the
same proportions, batch size, sequence length, epoch size and DataLoader settings (`--workers` persistent workers,
`--prefetch`):

  dynamic  `build_dynamic_text_dataloader(...).dataloader`: a DynamicLoader that plans each interval in the main
           process (`start_interval()` in `__iter__`); the workers read the plan and `get_item` the samples.
  plain    a torch DataLoader over `StreamingTextDataset(streams=[Stream(local=DATA/train/<d>, proportion=p)...],
           epoch_size=E, shuffle=True)` with a collate doing the same work as the dynamic one (stack,
           attention mask, labels); `--plain-loader foundry` uses `llmfoundry.data.text_data.build_text_dataloader`
           instead (its collator pads through the tokenizer, so it also measures that).

The arms run in `--rounds` rounds, the order alternating per round; per round each arm runs one untimed warm-up
epoch, then `--epochs` timed epochs, each timed from `iter(dataloader)` to the last batch (so the per-epoch start
cost, planning included, counts). Then the dynamic loader alone alternates intervals with and without a
`set_proportions()` before them, timing `iter()` -> first batch, and checks that every interval's domain counts
(batches carry `domain`) are exactly the planned quota of the proportions in force. It also prints the planning
cost against (synthetic) domain size, and with `--profile` each dataset's per-sample cost in-process (cProfile
sees the calling thread only: streaming's prepare/ready threads show up as the caller's `time.sleep`).

Diagnostics (not the default comparison): `--plain-predownload N` (StreamingDataset's read-ahead; default 8 x batch),
`--dynamic-collate packed` (the dynamic batch as views of one buffer), `--sharing-strategy file_system`.

Run: ``.venv/bin/python bench/loader_throughput.py [--data DIR]`` (see bench/README.md). The last line printed is
``loader_throughput_ratio: X.XXX``: dynamic / plain samples per second over all timed epochs.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from composer_shear.data.dynamic import DynamicStreamingDataset, build_dynamic_text_dataloader
from composer_shear.data.plan import Cursor, interval_samples, make_plan, quota, worker_slice

ROOT = Path(__file__).resolve().parents[1]
# Sheared-LLaMA's initial (RedPajama) mix, and a clearly different one to switch to
RP_MIX = {'cc': 0.67, 'c4-rp': 0.15, 'github': 0.045, 'book': 0.045, 'wiki': 0.045, 'arxiv': 0.025,
          'stackexchange': 0.02}
NEW_MIX = {'cc': 0.25, 'c4-rp': 0.25, 'github': 0.10, 'book': 0.10, 'wiki': 0.10, 'arxiv': 0.10,
           'stackexchange': 0.10}


def mixes(domains: list[str]) -> tuple[list[float], list[float]]:
    """The RedPajama mix and the update target for these domains (other names: 2^-i weights and uniform)."""
    if set(domains) == set(RP_MIX):
        a, b = [RP_MIX[d] for d in domains], [NEW_MIX[d] for d in domains]
    else:
        a, b = [2.0 ** -i for i in range(len(domains))], [1.0] * len(domains)
    return [x / sum(a) for x in a], [x / sum(b) for x in b]


def collate_plain(samples: list[torch.Tensor]) -> dict:
    """composer_shear.data.dynamic.collate without the domain tensor (plain samples are bare token tensors)."""
    ids = torch.stack(samples)
    return {'input_ids': ids, 'attention_mask': torch.ones_like(ids), 'labels': ids.clone()}


def collate_packed(samples: list[dict]) -> dict:
    """The dynamic collate's four tensors as views of ONE int64 buffer (`--dynamic-collate packed`, a diagnostic):
    a DataLoader worker hands every tensor storage of a batch to the main process separately (a shared-memory
    segment, and with torch's default `file_descriptor` strategy a file descriptor passed over a socket), so a
    batch costs per storage, not per byte."""
    b, s = len(samples), samples[0]['input_ids'].shape[0]
    buf = torch.empty(3 * b * s + b, dtype=torch.int64)
    ids = buf[:b * s].view(b, s)
    torch.stack([x['input_ids'] for x in samples], out=ids)
    mask = buf[b * s:2 * b * s].view(b, s)
    mask.fill_(1)
    labels = buf[2 * b * s:3 * b * s].view(b, s)
    labels.copy_(ids)
    domain = buf[3 * b * s:]
    domain.copy_(torch.tensor([x['domain'] for x in samples]))
    return {'input_ids': ids, 'attention_mask': mask, 'labels': labels, 'domain': domain}


def build_plain(args, data: Path, domains, props, seq: int, tokenizer=None) -> DataLoader:
    if args.plain_loader == 'foundry':
        from llmfoundry.data.text_data import build_text_dataloader
        cfg = {'streams': {d: {'local': str(data / 'train' / d), 'proportion': p} for d, p in zip(domains, props,
                                                                                                   strict=True)},
               'max_seq_len': seq, 'shuffle': True, 'epoch_size': args.epoch_size, 'shuffle_seed': args.seed,
               'predownload': args.plain_predownload}
        return build_text_dataloader(tokenizer, args.batch, cfg, drop_last=True, num_workers=args.workers,
                                     pin_memory=False, prefetch_factor=args.prefetch,
                                     persistent_workers=True).dataloader
    from llmfoundry.data.text_data import StreamingTextDataset
    from streaming import Stream
    ds = StreamingTextDataset(tokenizer=None, max_seq_len=seq, epoch_size=args.epoch_size, shuffle=True,
                              batch_size=args.batch, shuffle_seed=args.seed, predownload=args.plain_predownload,
                              streams=[Stream(local=str(data / 'train' / d), proportion=p)
                                       for d, p in zip(domains, props, strict=True)])
    return DataLoader(ds, batch_size=args.batch, collate_fn=collate_plain, drop_last=True, num_workers=args.workers,
                      prefetch_factor=args.prefetch, persistent_workers=True)


def build_dynamic(args, data: Path, domains, props, seq: int) -> DataLoader:
    spec = build_dynamic_text_dataloader(None, args.batch, dict(local=str(data), domains=domains, proportions=props,
                                                                epoch_size=args.epoch_size, max_seq_len=seq,
                                                                seed=args.seed),
                                         num_workers=args.workers, persistent_workers=True,
                                         prefetch_factor=args.prefetch)
    if args.dynamic_collate == 'packed':
        spec.dataloader.collate_fn = collate_packed  # before the first iter(): the workers get this one
    return spec.dataloader


def run_epoch(dl: DataLoader, domains: list | None = None) -> tuple[int, float, float]:
    """Samples, seconds from iter() to the last batch, seconds from iter() to the first batch."""
    t0 = time.perf_counter()
    first, n = None, 0
    for b in dl:
        if first is None:
            first = time.perf_counter() - t0
        n += b['input_ids'].shape[0]
        if domains is not None:
            domains.append(b['domain'])
    return n, time.perf_counter() - t0, first


def counts_of(batches: list, k: int) -> list[int]:
    return np.bincount(torch.cat(batches).numpy(), minlength=k).tolist()


def ms(x: float) -> str:
    return f'{x * 1e3:7.1f} ms'


def profile(args, data: Path, domains, props, seq: int):
    """One epoch of each dataset in this process (no DataLoader): per-sample cost and the top functions."""
    from llmfoundry.data.text_data import StreamingTextDataset
    from streaming import Stream
    plain = StreamingTextDataset(tokenizer=None, max_seq_len=seq, epoch_size=args.epoch_size, shuffle=True,
                                 batch_size=args.batch, shuffle_seed=args.seed,
                                 streams=[Stream(local=str(data / 'train' / d), proportion=p)
                                          for d, p in zip(domains, props, strict=True)])
    dyn = DynamicStreamingDataset(local=str(data), domains=domains, proportions=props, epoch_size=args.epoch_size,
                                  device_batch_size=args.batch, max_seq_len=seq, seed=args.seed, rank=0,
                                  world_size=1)
    print('\nprofile: one epoch per dataset in this process (no DataLoader, no workers), median of 3')
    for name, ds in (('plain', plain), ('dynamic', dyn)):
        per = []
        for _ in range(3):
            if ds is dyn:
                dyn.start_interval()
            t0 = time.perf_counter()
            n = sum(1 for _ in ds)
            per.append((time.perf_counter() - t0) / n)
        print(f'  {name:8s} {statistics.median(per) * 1e6:7.1f} us/sample ({n} samples)')
    plan = dyn.start_interval()
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        pairs = interval_samples(plan, dyn.sizes, dyn.seed)
    t_pairs = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        mine = worker_slice(pairs, 0, 0, 1, 0, args.workers, args.batch)
    t_slice = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for d, i in mine:
        dyn.sample(int(d), int(i))
    t_sample = (time.perf_counter() - t0) / len(mine)
    t0 = time.perf_counter()
    for _ in range(reps):
        dyn.start_interval()
    t_plan = (time.perf_counter() - t0) / reps
    print(f'  dynamic parts: start_interval (main) {ms(t_plan)}, interval_samples (per worker per interval) '
          f'{ms(t_pairs)}, worker_slice {ms(t_slice)}, sample() {t_sample * 1e6:.1f} us each')
    for name, ds in (('plain', plain), ('dynamic', dyn)):
        if ds is dyn:
            dyn.start_interval()
        pr = cProfile.Profile()
        pr.enable()
        for _ in ds:
            pass
        pr.disable()
        out = io.StringIO()
        pstats.Stats(pr, stream=out).sort_stats('tottime').print_stats(8)
        lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
        start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith('ncalls'))
        print(f'  {name}: top functions by own time')
        for ln in lines[start:]:
            print('   ', ln.replace(str(Path(sys.prefix)), '<venv>').replace(str(ROOT), '<repo>')[:150])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data', help='prepare-data output folder (default: prepare --input into a temp folder)')
    p.add_argument('--input', default=str(ROOT / 'data' / 'redpajama_sample'),
                   help='per-domain jsonl folder to prepare when --data is not given')
    p.add_argument('--tokenizer', help='tokenizer folder for preparing (default: the SmolLM2 asset folder)')
    p.add_argument('--max-seq-len', type=int, default=512, help='when preparing (else the manifest value)')
    p.add_argument('--batch', type=int, default=8, help='device batch size')
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--prefetch', type=int, default=2)
    p.add_argument('--epoch-size', type=int, default=2048, help='samples per epoch / interval')
    p.add_argument('--rounds', type=int, default=6)
    p.add_argument('--epochs', type=int, default=4, help='timed epochs per arm per round (after 1 warm-up)')
    p.add_argument('--update-reps', type=int, default=6, help='intervals with an update (and as many without)')
    p.add_argument('--seed', type=int, default=17)
    p.add_argument('--plain-loader', choices=('torch', 'foundry'), default='torch')
    p.add_argument('--plain-predownload', type=int, default=None,
                   help="StreamingDataset's predownload (samples a worker's threads run ahead; default 8 x batch)")
    p.add_argument('--dynamic-collate', choices=('default', 'packed'), default='default',
                   help='packed: a diagnostic collate returning views of one buffer (see collate_packed)')
    p.add_argument('--sharing-strategy', choices=('file_descriptor', 'file_system'), default=None,
                   help="torch.multiprocessing sharing strategy for both arms (default: torch's own)")
    p.add_argument('--profile', action='store_true', help='also profile both datasets in-process')
    p.add_argument('--plan-sizes', default='1e4,1e5,1e6',
                   help='synthetic sequences per domain for the planning-cost table (comma-separated; empty: skip)')
    args = p.parse_args(argv)

    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')  # prepare tokenizes before the workers fork
    warnings.filterwarnings('ignore', category=UserWarning)  # streaming's advice on shuffle/partition settings
    warnings.filterwarnings('ignore', message='.*use_auth_token.*', category=FutureWarning)
    # the dynamic loader warns once per interval and domain when a small domain wraps (cc: 99 samples, 1372 draws)
    logging.getLogger('composer_shear.data.dynamic').setLevel(logging.ERROR)
    torch.set_num_threads(1)
    if args.sharing_strategy:
        torch.multiprocessing.set_sharing_strategy(args.sharing_strategy)

    tmp = None
    tokenizer_dir = args.tokenizer
    if args.data:
        data = Path(args.data)
    else:
        from transformers.utils import logging as hf_logging

        from composer_shear.data.prepare import prepare
        hf_logging.set_verbosity_error()  # 'sequence length is longer than the maximum': documents are packed
        if tokenizer_dir is None:
            from composer_shear.assets import smollm2_dir
            tokenizer_dir = str(smollm2_dir())
        tmp = tempfile.mkdtemp(prefix='loader_bench_')
        data = Path(tmp)
        t0 = time.perf_counter()
        prepare(args.input, tokenizer_dir, data, args.max_seq_len, progress=False)
        print(f'prepared {args.input} -> {data} in {time.perf_counter() - t0:.1f} s')
    manifest = json.loads((data / 'manifest.json').read_text())
    domains = list(manifest['domains'])
    seq = int(manifest.get('max_seq_len', args.max_seq_len))
    sizes = {d: manifest['domains'][d]['train']['sequences'] for d in domains}
    mix_a, mix_b = mixes(domains)
    tokenizer = None
    if args.plain_loader == 'foundry':
        from transformers import AutoTokenizer
        if tokenizer_dir is None:
            from composer_shear.assets import smollm2_dir
            tokenizer_dir = str(smollm2_dir())
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    try:
        loaders = {'plain': build_plain(args, data, domains, mix_a, seq, tokenizer),
                   'dynamic': build_dynamic(args, data, domains, mix_a, seq)}
        print(f'data {data}: {len(domains)} domains, {sum(sizes.values())} train sequences of {seq} tokens; '
              f'batch {args.batch}, {args.workers} persistent workers, prefetch {args.prefetch}, '
              f'epoch {args.epoch_size} samples, plain loader: {args.plain_loader} '
              f'(predownload {args.plain_predownload or 8 * args.batch}), dynamic collate: {args.dynamic_collate}, '
              f'sharing strategy: {torch.multiprocessing.get_sharing_strategy()}')
        print(f'torch threads {torch.get_num_threads()}, {args.rounds} rounds x (1 warm-up + {args.epochs} timed '
              f'epochs) per arm, order alternating\n')
        ratio = measure(args, loaders, domains, sizes, mix_a, mix_b)
        for dl in loaders.values():
            it = getattr(dl, '_iterator', None)
            if it is not None:
                it._shutdown_workers()
        plan_scale(args, args.plan_sizes, len(domains), mix_a)
        if args.profile:
            profile(args, data, domains, mix_a, seq)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    sys.stderr.flush()
    print(f'loader_throughput_ratio: {ratio:.3f}', flush=True)


def measure(args, loaders: dict, domains, sizes: dict, mix_a, mix_b) -> float:
    k = len(domains)
    dyn = loaders['dynamic']
    stats = {name: {'n': [], 't': [], 'first': []} for name in loaders}
    dyn_domains = []
    round_ratio = []
    for r in range(args.rounds):
        order = ['plain', 'dynamic'] if r % 2 == 0 else ['dynamic', 'plain']
        rate = {}
        for name in order:
            run_epoch(loaders[name])  # warm-up
            n_sum, t_sum = 0, 0.0
            for _ in range(args.epochs):
                batches = [] if name == 'dynamic' else None
                n, t, first = run_epoch(loaders[name], batches)
                if batches is not None:
                    dyn_domains.append(counts_of(batches, k))
                stats[name]['n'].append(n)
                stats[name]['t'].append(t)
                stats[name]['first'].append(first)
                n_sum, t_sum = n_sum + n, t_sum + t
            rate[name] = n_sum / t_sum
        round_ratio.append(rate['dynamic'] / rate['plain'])
        print(f'  round {r + 1} ({order[0]} first): plain {rate["plain"]:7.0f} samples/s  dynamic '
              f'{rate["dynamic"]:7.0f} samples/s  ratio {round_ratio[-1]:.3f}', flush=True)

    print(f'\n{"throughput":12s} {"samples/s":>10s} {"median/epoch":>13s} {"min":>7s} {"max":>7s} '
          f'{"epochs":>6s} {"samples":>8s} {"1st batch med":>14s} {"max":>9s}')
    total = {}
    for name in ('plain', 'dynamic'):
        s = stats[name]
        per = [n / t for n, t in zip(s['n'], s['t'], strict=True)]
        total[name] = sum(s['n']) / sum(s['t'])
        print(f'{name:12s} {total[name]:10.0f} {statistics.median(per):13.0f} {min(per):7.0f} {max(per):7.0f} '
              f'{len(per):6d} {sum(s["n"]):8d} {ms(statistics.median(s["first"])):>14s} {ms(max(s["first"])):>9s}')
    ratio = total['dynamic'] / total['plain']
    print(f'ratio dynamic/plain: all timed epochs {ratio:.3f}, median of rounds {statistics.median(round_ratio):.3f}, '
          f'rounds {min(round_ratio):.3f}..{max(round_ratio):.3f}')

    # the mix both arms drew
    want = quota(mix_a, args.epoch_size).tolist()
    plain_ds = loaders['plain'].dataset
    plain_counts = [int(s.choose) for s in plain_ds.streams] if hasattr(plain_ds, 'streams') else None
    exact = all(c == want for c in dyn_domains)
    print(f'\nmix per epoch ({args.epoch_size} samples): dynamic counted from the batches\' `domain` '
          f'({len(dyn_domains)} intervals, all == quota: {exact}); plain: StreamingDataset choose per stream')
    print(f'  {"domain":14s} {"seqs":>6s} {"proportion":>10s} {"quota":>6s} {"dynamic":>8s} {"plain":>6s}')
    for i, d in enumerate(domains):
        print(f'  {d:14s} {sizes[d]:6d} {mix_a[i]:10.3f} {want[i]:6d} {dyn_domains[-1][i]:8d} '
              f'{plain_counts[i] if plain_counts else "-":>6}')
    if not exact:
        print('  WARNING: some dynamic interval did not follow the planned quota')

    # update latency: alternate intervals without and with a set_proportions() before them
    ds = dyn.dataset
    plan_t = []
    start_interval = ds.start_interval

    def timed_start():
        t0 = time.perf_counter()
        out = start_interval()
        plan_t.append(time.perf_counter() - t0)
        return out

    ds.start_interval = timed_start
    lat = {'same': [], 'update': []}
    plans = {'same': [], 'update': []}
    checks = []
    current, other = mix_a, mix_b
    for rep in range(args.update_reps):
        for kind in (('same', 'update') if rep % 2 == 0 else ('update', 'same')):
            previous = current
            if kind == 'update':
                current, other = other, current
                ds.set_proportions(current)
            batches = []
            n, t, first = run_epoch(dyn, batches)
            got = counts_of(batches, k)
            want_now = quota(current, args.epoch_size).tolist()
            checks.append((kind, got == want_now, kind == 'same' or got != quota(previous, args.epoch_size).tolist()))
            lat[kind].append(first)
            plans[kind].append(plan_t[-1])
    del ds.start_interval
    print(f'\nupdate latency (dynamic; {args.update_reps} intervals each, alternating): iter(loader) -> first batch')
    print(f'  {"interval":22s} {"median":>10s} {"min":>10s} {"max":>10s} {"start_interval median":>22s}')
    for kind, label in (('same', 'no update'), ('update', 'after set_proportions')):
        x = lat[kind]
        print(f'  {label:22s} {ms(statistics.median(x)):>10s} {ms(min(x)):>10s} {ms(max(x)):>10s} '
              f'{ms(statistics.median(plans[kind])):>22s}')
    plain_first = statistics.median(stats['plain']['first'])
    print(f'  plain first batch (throughput epochs; StreamingDataset epoch start): median {ms(plain_first)}')
    ok = all(a and b for _, a, b in checks)
    print(f'  domain counts == quota of the proportions in force, in all {len(checks)} intervals: '
          f'{all(a for _, a, _ in checks)}; every update changed the counts: {all(b for _, _, b in checks)}')
    if not ok:
        print('  WARNING: an update did not show up in the next interval')
    print(f'  switching between {args.epoch_size}-sample quotas {quota(mix_a, args.epoch_size).tolist()} and '
          f'{quota(mix_b, args.epoch_size).tolist()} ({", ".join(domains)})')
    return ratio


def plan_scale(args, sizes_arg: str, k: int, mix):
    """Planning cost against domain size (synthetic sizes, pure functions, no data): `make_plan` runs in the main
    process in `start_interval()`, `interval_samples` in every worker at the start of every interval."""
    sizes = [int(float(x)) for x in sizes_arg.split(',') if x]
    if not sizes:
        return
    print(f'\nplanning cost vs domain size ({k} domains of N sequences each, epoch {args.epoch_size}; both are '
          'paid between iter() and the first batch)')
    print(f'  {"N per domain":>12s} {"make_plan (main)":>17s} {"interval_samples (per worker)":>30s}')
    for n in sizes:
        t0 = time.perf_counter()
        plan, _ = make_plan(0, mix, Cursor.start(k), args.epoch_size, [n] * k, args.seed)
        t1 = time.perf_counter()
        interval_samples(plan, [n] * k, args.seed)
        t2 = time.perf_counter()
        print(f'  {n:12d} {ms(t1 - t0):>17s} {ms(t2 - t1):>30s}')


if __name__ == '__main__':
    main()
