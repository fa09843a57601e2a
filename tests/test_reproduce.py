"""bench/reproduce.py end to end on a tiny model, a cut-down 7-domain sample and the `tiny` budget: every arm
trains, the table, the claims and the plots come out."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from composer_shear.testing import TARGET, save_tiny, write_sums_task

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent
SAMPLE = ROOT / 'data' / 'redpajama_sample'


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
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert '(reusing' not in res.stdout
    results = json.loads((out / 'results.json').read_text())
    assert set(results['arms']) == {'sheared', 'constant', 'oneshot', 'scratch'}
    for arm, a in results['arms'].items():
        assert len(a['eval']) == 7 and all(0 < v < 20 for v in a['eval'].values()), arm
        steps = 8 if arm in ('oneshot', 'scratch') else 4  # equal tokens: 4 pruning + 4 continued steps
        assert a['stages']['continue']['curve'][-1][0] == steps, arm
    assert results['arms']['constant']['stages']['prune']['weights'] == results['arms']['constant']['stages'][
        'prune']['initial']
    assert results['arms']['sheared']['stages']['prune']['weights'] != results['arms']['sheared']['stages'][
        'prune']['initial']
    down = results['downstream']
    assert list(down['models']) == ['source', 'sheared', 'constant', 'oneshot', 'scratch']
    assert down['examples'] == {'sums': 5} and all(len(m['per_example']['sums/0-shot']) == 5
                                                   for m in down['models'].values())
    table = (out / 'results.md').read_text()
    assert '| source | ' in table and 'first 5 examples of each task' in table
    assert '| sheared (loss) |' in table and 'Pruned beats from scratch' in table
    for png in ('loss_curves.png', 'domain_weights.png', 'domain_loss.png'):
        assert (out / png).stat().st_size > 1000

    # a rerun reuses every arm and every model's downstream result (4 arms + 5 models) and reports the same
    first = results
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert res.stdout.count('(reusing') == 9, res.stdout[-3000:]
    again = json.loads((out / 'results.json').read_text())
    assert again['arms'] == first['arms'] and again['downstream']['models'] == first['downstream']['models']
