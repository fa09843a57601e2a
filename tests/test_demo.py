"""The README's main command, on a reduced budget."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end(tmp_path):
    env = {**os.environ, 'COMPOSER_SHEAR_CACHE': os.environ.get('COMPOSER_SHEAR_CACHE') or str(tmp_path / 'cache')}
    out = tmp_path / 'demo'
    cmd = [sys.executable, '-m', 'composer_shear.demo', '--out', str(out), '--prune-steps', '4',
           '--continue-steps', '2', '--interval', '2', '--eval-seqs', '8']
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    table = (out / 'results.md').read_text()
    assert '| source | 134,515,008 | 30 | 576 | 9 / 3 | 1536 |' in table
    assert '| pruned | 44,449,152 | 20 | 384 | 6 / 2 | 768 |' in table
    assert '| pruned + continued | 44,449,152 | 20 | 384 | 6 / 2 | 768 |' in table
    for name in ('pruned/model.safetensors', 'final/model.safetensors', 'domain_weights.png', 'masks.png',
                 'reference_loss.json', 'data/manifest.json', 'prune/pruning'):
        assert (out / name).exists(), name
