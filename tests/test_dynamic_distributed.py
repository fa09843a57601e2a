"""`composer -n 2`: pruning with dynamic loading (2 persistent workers per rank) and per-domain eval. Both ranks
hold identical weights after every update, and they follow the rule applied to the logged per-domain losses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from composer_shear.data.weights import update_weights

from train_dynamic import REFERENCE

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).parent / 'train_dynamic.py'


@pytest.mark.parametrize('mode', ['ddp', 'fsdp2'])
def test_weights_identical_on_ranks_and_follow_the_rule(tmp_path, mode):
    env = {**os.environ, **({'FSDP_VERSION': '2'} if mode == 'fsdp2' else {})}
    cmd = [str(Path(sys.executable).with_name('composer')), '-n', '2', str(SCRIPT), str(tmp_path)]
    if mode == 'fsdp2':
        cmd.append('fsdp')
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    h0, h1 = (json.loads((tmp_path / f'history-rank{r}.json').read_text()) for r in (0, 1))
    assert h0 == h1 and len(h0) == 4
    weights = np.array([0.6, 0.3, 0.1])
    for step in h0:
        weights = update_weights(weights, step['losses'], REFERENCE)
        np.testing.assert_allclose(step['weights'], weights, rtol=1e-12)
    assert abs(weights[0] - 0.6) > 0.05  # the mix moved
