"""The README's main command, on a reduced budget."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end(tmp_path):
    env = {**os.environ, 'COMPOSER_SHEAR_CACHE': os.environ.get('COMPOSER_SHEAR_CACHE') or str(tmp_path / 'cache')}
    out = tmp_path / 'demo'
    icl = Path(__file__).resolve().parent.parent / 'data' / 'icl'
    (tmp_path / 'tasks.yaml').write_text(  # two 0-shot tasks of the paper's (the full set is slow for a test)
        'icl_tasks:\n'
        f'- {{label: arc_easy, dataset_uri: {icl}/arc_easy.jsonl, icl_task_type: multiple_choice, num_fewshot: [0],'
        ' max_seq_len: 256,'
        ' continuation_delimiter: "\\nAnswer: "}\n'
        f'- {{label: piqa, dataset_uri: {icl}/piqa.jsonl, icl_task_type: multiple_choice, num_fewshot: [0],'
        ' max_seq_len: 256,'
        ' continuation_delimiter: "\\nAnswer: "}\n')
    cmd = [sys.executable, '-m', 'composer_shear.cli', 'demo', '--out', str(out), '--prune-steps', '4',
           '--continue-steps', '2', '--interval', '2', '--eval-seqs', '8', '--tasks', str(tmp_path / 'tasks.yaml'),
           '--icl-limit', '6']
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    table = (out / 'results.md').read_text()
    assert '| source | 134,515,008 | 30 | 576 | 9 / 3 | 1536 |' in table
    assert '| pruned | 75,226,080 | 24 | 480 | 6 / 2 | 1152 |' in table
    assert '| pruned + continued | 75,226,080 | 24 | 480 | 6 / 2 | 1152 |' in table
    for name in ('pruned/model.safetensors', 'continue/huggingface/ba2/model.safetensors', 'domain_weights.png',
                 'masks.png', 'reference_loss.json', 'data/manifest.json', 'prune/pruning/ba4/shape_report.md'):
        assert (out / name).exists(), name
    for stage, updates in (('prune', 2), ('continue', 1)):  # composer_shear/yamls/demo/*.yaml ran, with dynamic loading
        log = json.loads((out / stage / 'dynamic_loading.json').read_text())
        assert log['domains'] == ['code', 'reference', 'licenses'] and len(log['history']) == updates
    # continued pre-training starts again from the initial mix, its loader where pruning's stopped (no replay)
    assert log['initial'] == [0.6, 0.1, 0.3]
    pruning_log = json.loads((out / 'prune' / 'dynamic_loading.json').read_text())
    assert sum(pruning_log['loader']['cursor']['offsets']) == 4 * 4  # 4 steps of 4 sequences read
    assert log['loader']['cursor']['offsets'] != pruning_log['loader']['cursor']['offsets']
    assert '## Downstream accuracy' in table and '| arc_easy/0-shot | 6 |' in table
    down = json.loads((out / 'downstream.json').read_text())
    assert list(down['models']) == ['source', 'pruned', 'pruned + continued']
    assert all(len(m['per_example']['piqa/0-shot']) == 6 for m in down['models'].values())
    summary = json.loads((out / 'results.json').read_text())  # the same numbers, machine-readable
    assert summary['models']['pruned']['params'] == 75_226_080 and summary['distill'] is None
    assert summary['init_from'] == 'activations'  # the YAML's start: the first batches' activation ranking
    assert list(summary['downstream']) == list(down['models'])
    assert summary['downstream']['source']['average'] == down['models']['source']['average']
    assert set(summary['models']['source']['eval_loss']) == {'code', 'reference', 'licenses'}


def test_corpus_follows_the_yaml_domains(tmp_path):
    from composer_shear.demo import write_corpus
    write_corpus(tmp_path / 'c', ['licenses', 'code'])
    assert sorted(p.name for p in (tmp_path / 'c').iterdir()) == ['code', 'licenses']
    docs = [json.loads(line)['text'] for line in open(tmp_path / 'c' / 'code' / 'docs.jsonl')]
    assert len(docs) > 100 and any('def ' in d for d in docs)
    with pytest.raises(ValueError, match=r"variables.domains: no corpus builder for \['poetry'\]"):
        write_corpus(tmp_path / 'd', ['code', 'poetry'])


@pytest.mark.parametrize('stage', ['prune', 'continue'])
def test_distill_option_adds_or_removes_shear_distill(stage, tmp_path):
    from llmfoundry.utils.builders import build_algorithm

    from composer_shear.demo import stage_config
    from composer_shear.distill import ShearDistill
    teacher = tmp_path / 'teacher'
    teacher.mkdir()
    (teacher / 'config.json').write_text('{}')
    on = stage_config(stage, {'max_duration': '7ba'}, 0.5, teacher)
    assert on.max_duration == '7ba' and dict(on.algorithms.shear_distill) == {'alpha': 0.5, 'teacher': str(teacher)}
    algo = build_algorithm('shear_distill', dict(on.algorithms.shear_distill))  # what llm-foundry will build
    assert isinstance(algo, ShearDistill) and algo.alpha == 0.5 and algo.teacher_path == str(teacher)
    assert 'shear_pruning' in on.algorithms or stage == 'continue'  # the YAML's other algorithms are kept
    off = stage_config(stage, {}, 0.0)
    assert 'shear_distill' not in off.get('algorithms', {})
    assert ('shear_pruning' in off.algorithms) == (stage == 'prune')
    assert stage_config(stage, {}) == stage_config(stage, {}, None)  # default: the YAML as written
