"""`composer -n 2`: pruning with dynamic loading (2 persistent workers per rank) and per-domain eval. Both ranks
hold identical weights after every update, and they follow the rule applied to the logged per-domain losses; the
same data read from an S3-compatible store gives the same run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from composer_shear.data.weights import update_domain_weights
from tests.common.train_dynamic import REFERENCE

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent  # the launcher runs `python -m tests.common.train_dynamic` from here


def launch(out, *args, env=None):
    cmd = [str(Path(sys.executable).with_name('composer')), '-n', '2', '-m', 'tests.common.train_dynamic', str(out),
           *args]
    res = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]


@pytest.fixture(scope='module')
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('ddp')
    launch(out)
    return out


@pytest.mark.parametrize('mode', ['ddp', 'fsdp2'])
def test_weights_identical_on_ranks_and_follow_the_rule(ddp_run, tmp_path, mode):
    if mode == 'fsdp2':
        launch(tmp_path, 'fsdp', env={'FSDP_VERSION': '2'})
    else:
        tmp_path = ddp_run
    h0, h1 = (json.loads((tmp_path / f'history-rank{r}.json').read_text()) for r in (0, 1))
    assert h0 == h1 and len(h0) == 4
    weights = np.array([0.6, 0.3, 0.1])
    for step in h0:
        weights = update_domain_weights(weights, step['losses'], REFERENCE)
        np.testing.assert_allclose(step['weights'], weights, rtol=1e-12)
    assert abs(weights[0] - 0.6) > 0.05  # the mix moved


@pytest.mark.parametrize('checkpoint', ['ep1-ba7', 'ep2-ba10'])  # mid-interval; interval boundary (after eval)
def test_resume_gives_the_uninterrupted_run(ddp_run, checkpoint):
    """Batches, per-domain eval losses and domain weights after resuming equal the uninterrupted run's."""
    launch(ddp_run, f'resume={ddp_run / "ckpt" / (checkpoint + "-rank0.pt")}')
    for r in (0, 1):
        full = json.loads((ddp_run / f'history-rank{r}.json').read_text())
        resumed = json.loads((ddp_run / f'resumed-{checkpoint}-rank{r}.json').read_text())
        assert resumed == full
        batches = json.loads((ddp_run / f'history-batches-rank{r}.json').read_text())
        again = json.loads((ddp_run / f'resumed-{checkpoint}-batches-rank{r}.json').read_text())
        assert again and all(batches[k] == v for k, v in again.items())


def test_data_in_s3_gives_the_local_run(ddp_run, tmp_path):
    """`dynamic_text` and `domain_eval` with `remote: s3://...` (a prepare-data build prefix named by its manifest),
    cached locally on 2 ranks: the batches, per-domain losses and domain weights of the run from local data."""
    from composer_shear._remote import upload_file, upload_tree
    from composer_shear.data.prepare import FORMAT, MANIFEST
    from tests.common.s3 import BUCKET, s3_store
    with s3_store():
        upload_tree(ddp_run / 'data', f's3://{BUCKET}/dyn/build-1', progress=False)
        (tmp_path / MANIFEST).write_text(json.dumps({'format': FORMAT, 'data': 'build-1'}))
        upload_file(tmp_path / MANIFEST, f's3://{BUCKET}/dyn/{MANIFEST}')
        launch(tmp_path / 'run', f'remote=s3://{BUCKET}/dyn')
    assert list((tmp_path / 'run' / 'cache' / 'build-1' / 'train' / 'beta').glob('*.mds'))
    for r in (0, 1):
        for name in ('history', 'history-batches'):
            assert json.loads((tmp_path / 'run' / f'{name}-rank{r}.json').read_text()) == \
                json.loads((ddp_run / f'{name}-rank{r}.json').read_text())
