"""One prepared check of the GPU path: FSDP1 / FSDP2 + bf16 pruning throughput, equivalence and export on CUDA.

On a machine with CUDA (after the README's setup, no downloads), in a few minutes:

1. **Equivalence**: SmolLM2-135M with random deterministic masks: the masked model's logits against the exported
   model's, on the GPU, in fp32 (must meet the CPU tolerance, 1e-4; TF32 off) and in bf16 (reported).
2. **Throughput**: Composer training of SmolLM2-135M (llm-foundry's ``ComposerHFCausalLM``, sdpa attention,
   ``amp_bf16``) on every GPU, once with FSDP1 (``FULL_SHARD``, the paper YAMLs' settings) and once with FSDP2
   (``FSDP_VERSION=2``): arms ``plain``, ``pruned`` (``shear_pruning``) and ``pruned+kd`` (+ ``shear_distill`` from
   the source) in one process, timed in interleaved rounds (``bench/_harness.interleaved``); tokens/s per arm and
   an MFU estimate (6 x parameters + attention FLOPs per token over the GPU's dense bf16 peak).
3. **Sharded export**: the pruned arm's FSDP1 (and FSDP2) run saves a sharded checkpoint and the logits of its
   masked model with the exact-target masks; ``composer-shear export`` of that checkpoint must give those logits.
4. ``composer-shear reference-loss`` and ``composer-shear eval`` run on the GPU.

It prints one table and, last, ``pruning_throughput_ratio: X`` (pruned over plain tokens/s, FSDP1; FSDP2 where
FSDP1 did not run). Without CUDA it says so and exits 0. ``--cpu`` runs the same code on the CPU with a tiny random
model, FSDP2 only (Composer's FSDP1 needs CUDA), which is what the test suite does.

Run: ``.venv/bin/python bench/gpu_check.py [--out DIR]`` (see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARMS = ('plain', 'pruned', 'pruned+kd')
# dense bf16 peak FLOP/s per GPU, by a substring of torch.cuda.get_device_name() (vendor data sheets)
PEAK_BF16 = {'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L40S': 362e12, 'A10G': 125e12, 'L4': 121e12}
TOLERANCE_FP32 = 1e-4  # the CPU tests' tolerance for masked vs exported logits
# --big: a random LLaMA-shaped model of 1.1B parameters (TinyLlama's shape) and a target of about half
BIG = dict(num_hidden_layers=22, hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=64,
           intermediate_size=5632, vocab_size=32000)
BIG_TARGET = dict(num_hidden_layers=16, hidden_size=1536, num_attention_heads=24, num_key_value_heads=4,
                  intermediate_size=4096)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', help='working folder (default: a temporary one, removed at the end)')
    p.add_argument('--cpu', action='store_true', help='run the checks on the CPU with a tiny model (the test)')
    p.add_argument('--gpus', type=int, help='ranks to launch (default: every visible GPU; 2 with --cpu)')
    p.add_argument('--batch', type=int, help='sequences per rank per step (default 16; 4 with --cpu)')
    p.add_argument('--seq', type=int, help='sequence length (default 2048; 32 with --cpu)')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps per arm')
    p.add_argument('--rounds', type=int, default=4, help='timed rounds (the arm order alternates per round)')
    p.add_argument('--steps', type=int, default=5, help='timed steps per arm per round')
    p.add_argument('--fsdp', default=None, help='comma-separated FSDP versions to run (default 1,2; 2 with --cpu)')
    p.add_argument('--big', action='store_true', help='also time plain vs pruned on a random 1.1B LLaMA-shaped model')
    p.add_argument('--worker', help=argparse.SUPPRESS)  # a launched rank: the JSON of its settings
    args = p.parse_args(argv)
    for name in ('gpus', 'batch', 'seq', 'warmup', 'rounds', 'steps'):
        value = getattr(args, name)
        if value is not None and value < (0 if name == 'warmup' else 1):
            p.error(f'--{name} must be at least {0 if name == "warmup" else 1}, got {value}')
    cpu = args.cpu
    args.batch = args.batch or (4 if cpu else 16)
    args.seq = args.seq or (32 if cpu else 2048)
    versions = (args.fsdp or ('2' if cpu else '1,2')).split(',')
    if any(v not in ('1', '2') for v in versions) or (cpu and '1' in versions):
        p.error(f'--fsdp: choose from 1 and 2 (1 needs CUDA), got {args.fsdp!r}')
    args.fsdp = versions
    return args


# the table -------------------------------------------------------------------------------------------------

def format_table(rows: list[dict]) -> str:
    """Rows of {'check', 'setting', 'result', 'ok'} as a Markdown table (ok: True, False or None = measured only)."""
    lines = ['| check | setting | result | ok |', '|---|---|---|---|']
    for r in rows:
        ok = {True: 'yes', False: '**NO**', None: '-'}[r['ok']]
        lines.append(f'| {r["check"]} | {r["setting"]} | {r["result"]} | {ok} |')
    return '\n'.join(lines) + '\n'


def throughput_ratio(results: dict[str, dict]) -> tuple[str, float] | None:
    """(FSDP version, pruned over plain tokens/s) of the first FSDP version measured (1 before 2)."""
    for version in ('1', '2'):
        r = results.get(version)
        if r and 'plain' in r['tokens_per_s'] and 'pruned' in r['tokens_per_s']:
            return version, r['tokens_per_s']['pruned'] / r['tokens_per_s']['plain']
    return None


def flops_per_token(config, seq: int) -> float:
    """Training FLOPs per token: 6 x the parameters that do matmuls (all but the RMSNorm weights) + 12 x layers x
    heads x head_dim x seq (attention scores and values)."""
    from composer_shear.shapes import ModelShape
    shape = ModelShape.from_config(config)
    norms = (2 * shape.num_hidden_layers + 1) * shape.hidden_size
    return 6 * (shape.num_params() - norms) + 12 * shape.num_hidden_layers * shape.num_attention_heads * \
        shape.head_dim * seq


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in device_name), None)


# 1. equivalence ----------------------------------------------------------------------------------------------

def equivalence(model_dir: Path, work: Path, device: str, target: dict) -> list[dict]:
    """Masked vs exported logits, fp32 and bf16, random deterministic masks, on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    from composer_shear.export import export_pruned
    from composer_shear.hooks import MaskedForward
    from composer_shear.testing import random_masks
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation='sdpa')
    config = model.config
    masks = random_masks(config, target, ['layer', 'hidden', 'head', 'intermediate'], seed=0)
    snap = masks.snapshot()
    out = work / 'equivalence-export'
    export_pruned(model.state_dict(), masks.state_dict(), config, out, overwrite=True)
    ids = torch.randint(0, config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
    hooks = MaskedForward(model, masks.source)
    for dtype, tol in ((torch.float32, TOLERANCE_FP32), (torch.bfloat16, None)):
        big = model.to(device=device, dtype=dtype).eval()
        hooks.set({k: v.to(device=device, dtype=dtype) for k, v in snap.z.items()})
        small = AutoModelForCausalLM.from_pretrained(out, torch_dtype=dtype, attn_implementation='sdpa').to(device)
        with torch.no_grad():
            diff = (big(ids).logits.float() - small.eval()(ids).logits.float()).abs().max().item()
        name = str(dtype).removeprefix('torch.')
        rows.append({'check': 'masked = exported', 'setting': f'{name}, {device}, random masks',
                     'result': f'max abs logit diff {diff:.2e}' + (f' (tolerance {tol:g})' if tol else ''),
                     'ok': (diff <= tol) if tol else math.isfinite(diff)})
    return rows


# 2 + 3. training: a launched worker per FSDP version ----------------------------------------------------------

def build_arm(arm: str, model_dir: Path, settings: dict, save_folder: Path | None):
    """A Trainer for one arm (its StepTimer too), FSDP and precision from `settings`."""
    from _harness import StepTimer
    from composer import Trainer
    from composer.optim import DecoupledAdamW
    from llmfoundry.models.hf import ComposerHFCausalLM
    from transformers import AutoTokenizer

    from composer_shear.algorithm import ShearPruning
    from composer_shear.distill import ShearDistill
    from composer_shear.testing import Tokens, loader
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = ComposerHFCausalLM(tok, pretrained_model_name_or_path=str(model_dir), pretrained=True,
                               attn_implementation='sdpa', use_train_metrics=False)
    algorithms = []
    if arm != 'plain':
        algorithms.append(ShearPruning(target=settings['target'], lag_lr=1.0, lagrangian_warmup='10ba',
                                       eval_target_shape=True))
    if arm == 'pruned+kd':
        algorithms.append(ShearDistill(alpha=1.0, teacher=str(model_dir)))
    if settings['fsdp'] == '1':
        fsdp = {'sharding_strategy': 'FULL_SHARD', 'mixed_precision': 'DEFAULT', 'use_orig_params': True,
                'limit_all_gathers': True, 'state_dict_type': 'sharded'}
    else:
        fsdp = {'state_dict_type': 'sharded'}
    timer = StepTimer(sync=settings['device'] == 'gpu')
    total = settings['warmup'] + settings['rounds'] * settings['steps']
    data = Tokens((total + 1) * settings['batch'], settings['seq'], model.model.config.vocab_size)
    trainer = Trainer(
        model=model, optimizers=DecoupledAdamW(model.parameters(), lr=1e-4, weight_decay=0.0),
        train_dataloader=loader(data, settings['batch']), max_duration=None, algorithms=algorithms,
        callbacks=[timer], device=settings['device'], precision='amp_bf16' if settings['device'] == 'gpu' else 'fp32',
        parallelism_config={'fsdp': fsdp}, seed=17, progress_bar=False, log_to_console=False, loggers=[],
        device_train_microbatch_size=settings['batch'], run_name=f'gpu-check-{arm}',
        save_folder=str(save_folder) if save_folder else None, save_interval=f'{total}ba',
        save_overwrite=True)
    return trainer, timer


def worker(settings: dict) -> None:
    """One rank of a launched run: the arms interleaved, then the pruned arm's exact-target logits."""
    import torch
    from _harness import interleaved
    from composer.devices import DeviceCPU, DeviceGPU
    from composer.utils import dist

    from composer_shear.algorithm import ShearPruning
    from composer_shear.functional import set_eval_masks
    dist.initialize_dist(DeviceGPU() if settings['device'] == 'gpu' else DeviceCPU())
    out = Path(settings['out'])
    model_dir = Path(settings['model'])
    arms = {arm: build_arm(arm, model_dir, settings, out / 'ckpt' if arm == 'pruned' else None)
            for arm in settings['arms']}
    times, per_round = interleaved(arms, settings['warmup'], settings['rounds'], settings['steps'])
    result = {'times': times, 'per_round': per_round, 'world': dist.get_world_size()}
    if 'pruned' in arms:  # the masked model with exactly the target's masks, on fixed ids (all ranks take part)
        trainer = arms['pruned'][0]
        masks = ShearPruning.masks(trainer.state)
        model = trainer.state.model
        model.eval()
        ids = torch.randint(0, model.model.config.vocab_size, (2, 64),
                            generator=torch.Generator().manual_seed(1)).to(trainer.state.device._device)
        with torch.no_grad():
            set_eval_masks(masks)
            logits = model.model(input_ids=ids).logits.float().cpu()
        if dist.get_global_rank() == 0:
            torch.save({'ids': ids.cpu(), 'logits': logits}, out / 'masked_logits.pt')
    if torch.cuda.is_available() and settings['device'] == 'gpu':
        result['peak_memory_gib'] = torch.cuda.max_memory_allocated() / 2 ** 30
    if dist.get_global_rank() == 0:
        (out / 'result.json').write_text(json.dumps(result))
    for trainer, _ in arms.values():
        trainer.close()


def launch(version: str, model_dir: Path, work: Path, args, target: dict, arms=ARMS, label: str = '') -> dict:
    """Run the worker on `args.gpus` ranks with FSDP `version`; returns its result."""
    out = work / f'fsdp{version}{label}'
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    settings = {'out': str(out), 'model': str(model_dir), 'target': target, 'fsdp': version,
                'device': 'cpu' if args.cpu else 'gpu', 'batch': args.batch, 'seq': args.seq,
                'warmup': args.warmup, 'rounds': args.rounds, 'steps': args.steps, 'arms': list(arms)}
    composer = Path(sys.executable).with_name('composer')
    cmd = [str(composer), '-n', str(args.gpus), __file__, '--worker', json.dumps(settings)]
    env = {**os.environ, 'FSDP_VERSION': version, 'PYTHONPATH': os.pathsep.join(
        [str(ROOT / 'bench'), str(ROOT), os.environ.get('PYTHONPATH', '')])}
    start = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f'FSDP{version} run failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}')
    result = json.loads((out / 'result.json').read_text())
    result['wall_s'] = time.perf_counter() - start
    tokens = args.batch * args.seq * result['world']
    result['tokens_per_s'] = {arm: tokens / statistics.median(t) for arm, t in result['times'].items()}
    return result


def sharded_export(version: str, out: Path, model_dir: Path) -> dict:
    """Export the pruned arm's sharded checkpoint (in `out`, its launch's folder); its logits against the masked
    model's."""
    import torch
    from transformers import AutoModelForCausalLM
    ckpts = sorted(p for p in (out / 'ckpt').iterdir()
                   if p.is_dir() and not p.is_symlink() and (p / '.metadata').exists())
    if not ckpts:
        return {'check': f'sharded FSDP{version} checkpoint exports', 'setting': str(out / 'ckpt'),
                'result': 'no sharded checkpoint was written', 'ok': False}
    from composer_shear.cli import main as cli
    dest = out / 'export'
    rc = cli(['export', '--checkpoint', str(ckpts[-1]), '--out', str(dest), '--source', str(model_dir), '--dtype',
              'fp32', '--overwrite'])
    if rc != 0:
        return {'check': f'sharded FSDP{version} checkpoint exports', 'setting': ckpts[-1].name,
                'result': f'exit {rc} (its error is printed above)', 'ok': False}
    saved = torch.load(out / 'masked_logits.pt')
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    small = AutoModelForCausalLM.from_pretrained(dest, torch_dtype=torch.float32, attn_implementation='sdpa')
    with torch.no_grad():
        logits = small.to(device).eval()(saved['ids'].to(device)).logits.float().cpu()
    diff = (logits - saved['logits']).abs().max().item()
    return {'check': f'sharded FSDP{version} checkpoint exports = masked model', 'setting': ckpts[-1].name,
            'result': f'max abs logit diff {diff:.2e} (fp32, tolerance 1e-3)', 'ok': diff <= 1e-3}


# 4. the commands on the device ----------------------------------------------------------------------------------

def commands(model_dir: Path, work: Path, args) -> list[dict]:
    """prepare-data (CPU), then reference-loss and eval on the device: the CLI's own `main`, in this process."""
    from composer_shear.cli import main as cli
    from composer_shear.testing import write_sums_task
    data = work / 'data'
    seq = min(args.seq, 256)
    corpus = ROOT / 'data' / 'redpajama_sample'
    if args.cpu:  # two domains, 20 documents each: the same commands at a test's cost
        corpus = work / 'corpus'
        for domain in ('github', 'wiki'):
            src = sorted((ROOT / 'data' / 'redpajama_sample' / domain).glob('*.jsonl'))[0]
            (corpus / domain).mkdir(parents=True, exist_ok=True)
            (corpus / domain / 'docs.jsonl').write_text(''.join(src.read_text().splitlines(True)[:20]))
    tasks = write_sums_task(work / 'icl') if args.cpu else ROOT / 'yamls' / 'eval' / 'zero_shot_tasks.yaml'
    steps = [('prepare-data', ['prepare-data', '--input', str(corpus), '--tokenizer', str(model_dir), '--out',
                               str(data), '--max-seq-len', str(seq), '--overwrite']),
             ('reference-loss', ['reference-loss', '--model', str(model_dir), '--data', str(data), '--out',
                                 str(work / 'reference.json'), '--max-batches', '2', '--device',
                                 'cpu' if args.cpu else 'cuda']),
             ('eval', ['eval', str(model_dir), '--tasks', str(tasks), '--limit', '5' if args.cpu else '20',
                       '--max-seq-len', '128' if args.cpu else '1024', '--device', 'cpu' if args.cpu else 'gpu',
                       '--out', str(work / 'downstream')])]
    rows = []
    for name, argv in steps:
        print(f'composer-shear {name} ...', flush=True)
        start = time.perf_counter()
        rc = cli(argv)  # its output goes to the console (progress bars need a real stdout)
        seconds = time.perf_counter() - start
        ok = rc == 0
        detail = 'done'
        if not ok:
            detail = f'exit {rc} (its error is printed above)'
        elif name == 'reference-loss':
            losses = json.loads((work / 'reference.json').read_text())['losses']
            detail = f'{len(losses)} domains, mean loss {statistics.mean(losses.values()):.3f}'
            ok = all(math.isfinite(v) for v in losses.values())
        elif name == 'eval':
            down = json.loads((work / 'downstream.json').read_text())['models'][str(model_dir)]
            detail = f'average accuracy {down["average"]:.3f}'
        device = 'cpu' if args.cpu or name == 'prepare-data' else 'cuda'
        rows.append({'check': f'composer-shear {name}', 'setting': device, 'result': f'{detail} ({seconds:.0f} s)',
                     'ok': ok})
    return rows


def training(version: str, model_dir: Path, work: Path, args, target: dict, name: str, results: dict,
             arms=ARMS, label: str = '') -> list[dict]:
    """One launch: its throughput rows, memory and the sharded export's check (results[version] = its result)."""
    from transformers import AutoConfig
    what = f'FSDP{version}' + (f' {label.strip("-")}' if label else '')
    print(f'training, {what} ...', flush=True)
    try:
        results[version] = r = launch(version, model_dir, work, args, target, arms, label)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        return [{'check': f'{what} training', 'setting': 'launch', 'result': str(e)[-300:].replace('\n', ' '),
                 'ok': False}]
    per_token = flops_per_token(AutoConfig.from_pretrained(model_dir), args.seq)
    peak = None if args.cpu else peak_flops(name)
    rows = []
    for arm in arms:
        tps = r['tokens_per_s'][arm]
        mfu = f', MFU {tps * per_token / (peak * r["world"]):.1%}' if peak else ''
        ratio = f', x{tps / r["tokens_per_s"]["plain"]:.3f} of plain' if arm != 'plain' else ''
        rows.append({'check': f'{what} training throughput', 'setting': arm,
                     'result': f'{tps:,.0f} tokens/s{ratio}{mfu}', 'ok': None})
    if 'peak_memory_gib' in r:
        rows.append({'check': f'{what} training', 'setting': 'peak GPU memory, rank 0',
                     'result': f'{r["peak_memory_gib"]:.1f} GiB ({r["wall_s"]:.0f} s launch to end)', 'ok': None})
    rows.append(sharded_export(version, work / f'fsdp{version}{label}', model_dir))
    return rows


# main -----------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    import torch
    if not args.cpu and not torch.cuda.is_available():
        print('gpu_check: no CUDA device here, nothing to check (--cpu runs the same checks on the CPU with a tiny '
              'model)')
        return 0
    args.gpus = args.gpus or (2 if args.cpu else torch.cuda.device_count())
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix='gpu_check_'))
    work.mkdir(parents=True, exist_ok=True)
    if args.cpu:
        from composer_shear.testing import TARGET, save_tiny
        model_dir, target = save_tiny(work / 'model', max_position_embeddings=128), dict(TARGET)
        device, name = 'cpu', 'CPU'
    else:
        from omegaconf import OmegaConf

        from composer_shear.assets import smollm2_dir
        model_dir = smollm2_dir()
        target = OmegaConf.to_container(OmegaConf.load(
            ROOT / 'composer_shear' / 'yamls' / 'demo' / 'prune.yaml').algorithms.shear_pruning.target)
        device, name = 'cuda', torch.cuda.get_device_name(0)
    print(f'gpu_check on {args.gpus} x {name}: batch {args.batch} x seq {args.seq} per rank, {args.rounds} rounds '
          f'of {args.steps} steps after {args.warmup} warm-up steps per arm', flush=True)
    rows = equivalence(model_dir, work, device, target)
    results = {}
    for version in args.fsdp:
        rows += training(version, model_dir, work, args, target, name, results)
    if args.big:  # a ~1B random LLaMA-shaped model, plain against pruned
        from composer_shear.testing import save_tiny
        big = work / 'llama-1b'
        if not (big / 'config.json').exists():
            print('writing a random 1.1B LLaMA-shaped model ...', flush=True)
            save_tiny(big, kind='gqa', max_position_embeddings=args.seq, **BIG)
        for version in args.fsdp:
            rows += training(version, big, work, args, BIG_TARGET, name, {}, arms=('plain', 'pruned'),
                             label='-1b')
    rows += commands(model_dir, work, args)
    print(format_table(rows), end='')
    ratio = throughput_ratio(results)
    failed = [r for r in rows if r['ok'] is False]
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)
    print(f'checks failed: {len(failed)} of {sum(r["ok"] is not None for r in rows)}')
    print(f'pruning_throughput_ratio: {ratio[1]:.3f}' if ratio else 'pruning_throughput_ratio: n/a')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
