"""bench/reproduce.py end to end on a tiny model, a cut-down 7-domain sample and the `tiny` budget: arms covering
every option (learned masks with init + distillation + dynamic loading, one-shot + distillation, scratch)
train, the table, the claims and the plots come out; a rerun reuses them and adds a seed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from composer_shear.testing import TARGET, save_tiny, write_sums_task
from tests.common import load_bench

ROOT = Path(__file__).parent.parent
SAMPLE = ROOT / 'data' / 'redpajama_sample'


def test_rule_arms_configure_dynamic_loading():
    """The re-weighting arms pass their rule to dynamic_loading, and the callback accepts it."""
    from composer_shear.data.callback import DynamicLoading
    reproduce = load_bench('reproduce')
    expected = {'oneshot': {'update_type': 'doremi'}, 'oneshot-constant': {'update_type': 'constant'},
                'oneshot-damped': {'update_type': 'doremi', 'step_size': 0.3, 'max_weight': 0.5},
                'oneshot-relative': {'update_type': 'doremi', 'step_size': 0.3, 'max_weight': 0.5,
                                     'excess': 'relative'}}
    for arm, rule in expected.items():
        common, kd = reproduce.arm_overrides(arm, 18, Path('src'))
        assert common['callbacks']['dynamic_loading'] == rule and common['seed'] == 18 and kd == {}, arm
        cb = DynamicLoading(domains=reproduce.DOMAINS, initial_proportions=reproduce.RP_MIX,
                            reference_loss=[2.0] * 7, **rule)
        assert (cb.step_size, cb.max_weight) == (rule.get('step_size', 1.0), rule.get('max_weight')), arm
    assert reproduce.arm_overrides('oneshot+kd', 17, Path('src'))[1]['algorithms']['shear_distill']['teacher'] == 'src'


@pytest.mark.slow
def test_reproduce_tiny_budget(tmp_path):
    for domain in sorted(p for p in SAMPLE.iterdir() if p.is_dir()):
        docs = []
        for f in sorted(domain.glob('*.jsonl')):
            for line in f.read_text().splitlines():
                if len(docs) < 12:
                    docs.append(json.dumps({'text': json.loads(line)['text'][:1500]}))
        (tmp_path / 'corpus' / domain.name).mkdir(parents=True)
        (tmp_path / 'corpus' / domain.name / 'docs.jsonl').write_text('\n'.join(docs) + '\n')
    save_tiny(tmp_path / 'model')
    tasks = write_sums_task(tmp_path / 'icl')  # 6 short multiple-choice questions (the tiny model: 128 positions)
    out = tmp_path / 'out'
    cmd = [sys.executable, str(ROOT / 'bench' / 'reproduce.py'), '--budget', 'tiny', '--out', str(out),
           '--source', str(tmp_path / 'model'), '--data', str(tmp_path / 'corpus'), '--target', json.dumps(TARGET),
           '--tasks', str(tasks), '--icl-limit', '5', '--icl-max-seq-len', '128']
    arms = ['fair+kd', 'oneshot+kd', 'searched+kd', 'scratch']
    res = subprocess.run([*cmd, '--arms', ','.join(arms)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert '(reusing' not in res.stdout
    results = json.loads((out / 'results.json').read_text())
    assert list(results['arms']) == arms
    for arm, a in results['arms'].items():
        assert a['arm'] == arm and a['seed'] == 17
        assert len(a['eval']) == 7 and all(0 < v < 20 for v in a['eval'].values()), arm
        steps = 4 if arm == 'fair+kd' else 8  # equal tokens: 4 pruning + 4 continued steps
        assert a['stages']['continue']['curve'][-1][0] == steps, arm
    search = results['arms']['searched+kd']['search']  # the searched shape, under the target's parameter count
    assert search['best']['params'] <= results['arms']['oneshot+kd']['shape']['num_params']
    assert search['scored'] == search['enumerated'] > 1
    assert results['arms']['searched+kd']['shape']['num_params'] == search['best']['params']
    assert '| searched+kd | ' in (out / 'results.md').read_text().split('Searched shapes')[1]
    cfg = OmegaConf.load(out / 'fair+kd' / 'prune' / 'stage.yaml')
    assert cfg.algorithms.shear_distill.teacher == str(tmp_path / 'model')
    pruning = cfg.algorithms.shear_pruning
    assert pruning.init['from'] == 'activations' and pruning.eval_target_shape and pruning.settle == '0.2dur'
    assert pruning.init.batches == 14  # 8 x 7 domains: as many sequences as the one-shot arm
    assert cfg.seed == cfg.train_loader.dataset.seed == 17
    assert all(e.name == 'domain_eval' for e in cfg.eval_loaders)
    cont = OmegaConf.load(out / 'fair+kd' / 'continue' / 'stage.yaml')
    assert cont.callbacks.dynamic_loading.continue_from == str(out / 'fair+kd' / 'prune' / 'dynamic_loading.json')
    assert cont.callbacks.dynamic_loading.initial == 'initial_mix'
    # one schedule: the weights' logged rate over both stages is the one-shot arm's over its single stage
    fair, oneshot = results['arms']['fair+kd']['stages'], results['arms']['oneshot+kd']['stages']
    assert [v for _, v in fair['prune']['lr'] + fair['continue']['lr']] == pytest.approx(
        [v for _, v in oneshot['continue']['lr']], rel=1e-9)
    assert all(0 <= v < 0.01 for v in fair['prune']['below_half'].values() for v in v.values())
    for arm in ('fair+kd', 'oneshot+kd'):  # the loss right after export / one-shot, before any continued step
        assert len(results['arms'][arm]['step0']) == 7, arm
    for arm in arms:
        cfg = OmegaConf.load(out / arm / 'continue' / 'stage.yaml').get('algorithms') or {}
        assert ('shear_distill' in cfg) == arm.endswith('+kd'), arm
        assert cfg.get('shear_distill', {}).get('teacher') in (None, str(tmp_path / 'model'))
    assert results['arms']['fair+kd']['stages']['prune']['weights'] != results['arms'][
        'fair+kd']['stages']['prune']['initial']
    down = results['downstream']
    assert list(down['models']) == ['source', *arms]
    assert down['examples'] == {'sums': 5} and all(len(m['per_example']['sums/0-shot']) == 5
                                                   for m in down['models'].values())
    table = (out / 'results.md').read_text()
    assert '| source | ' in table and 'first 5 examples of each task' in table
    assert '| fair+kd (loss) |' in table and 'Pruned (fair+kd) beats from scratch' in table
    assert '- fair+kd vs oneshot+kd: average loss' in table and 'downstream average' in table
    assert '- fair+kd vs constant' not in table  # only the arms that ran
    assert '| arm | step 0 average |' in table and '| fair+kd | ' in table.split('step 0 average')[1]
    assert '| arm | hidden | intermediate | kv | layer |' in table  # kept structures below 0.5
    assert '| run | expected layers |' in table and '| fair+kd | ' in table.split('expected layers')[1]
    assert 'Over seeds' not in table
    for png in ('loss_curves.png', 'domain_weights.png', 'domain_loss.png'):
        assert (out / png).stat().st_size > 1000

    # a rerun reuses every run and every model's downstream result, and a second seed runs only what it adds
    res = subprocess.run([*cmd, '--arms', 'scratch', '--seeds', '17,18'], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert res.stdout.count('(reusing') == 3, res.stdout[-3000:]  # scratch, the source's and scratch's ICL
    again = json.loads((out / 'results.json').read_text())
    assert list(again['arms']) == ['scratch', 'scratch@s18']
    assert again['arms']['scratch'] == results['arms']['scratch']
    assert again['arms']['scratch@s18']['eval'] != results['arms']['scratch']['eval']  # another seed
    assert again['downstream']['models']['scratch'] == results['downstream']['models']['scratch']
    assert OmegaConf.load(out / 'scratch@s18' / 'continue' / 'stage.yaml').train_loader.dataset.seed == 18
    table = (out / 'results.md').read_text()
    assert 'Over seeds' in table and '| scratch | 2 | ' in table and '(n=2)' in table
