"""`composer -n 2` runs on CPU (gloo): DDP and FSDP2. Masks and multipliers must be identical on both ranks
after training, and the checkpoint must export."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import train_tiny

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).parent / 'train_tiny.py'


def launch(out, env_extra, *args):
    env = {**os.environ, **env_extra}
    composer = Path(sys.executable).with_name('composer')
    cmd = [str(composer), '-n', '2', str(SCRIPT), str(out), 'steps=12', 'save_interval=6ba', 'eval_interval=6ba',
           'warmup=4ba', *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]


def same_on_both_ranks(out):
    a, b = (torch.load(out / f'masks-rank{r}.pt') for r in (0, 1))
    for k in a['log_alpha']:
        assert torch.equal(a['log_alpha'][k], b['log_alpha'][k]), k
    assert torch.equal(a['lambdas'], b['lambdas'])
    # training did move them
    assert a['lambdas'].abs().sum() > 0
    assert any((v != a['log_alpha'][k].flatten()[0]).any() for k, v in a['log_alpha'].items())


def export(ckpt, dest, *extra):
    cmd = [sys.executable, '-m', 'composer_shear.cli', 'export', '--checkpoint', str(ckpt), '--out', str(dest),
           *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(dest)
    for field, value in train_tiny.TARGET.items():
        assert getattr(model.config, field) == value
    return model


def test_ddp(tmp_path):
    launch(tmp_path, {})
    same_on_both_ranks(tmp_path)
    export(tmp_path / 'ckpt' / 'latest-rank0.pt', tmp_path / 'export')


def test_fsdp2_sharded_and_whole_checkpoints_export_the_same_model(tmp_path):
    models = {}
    for kind in ('sharded', 'full'):
        out = tmp_path / kind
        launch(out, {'FSDP_VERSION': '2', 'STATE_DICT_TYPE': kind}, 'fsdp=true')
        same_on_both_ranks(out)
        ckpt = out / 'ckpt' / ('ep0-ba12' if kind == 'sharded' else 'ep0-ba12-rank0.pt')
        if kind == 'sharded':
            assert (ckpt / '.metadata').exists()
        models[kind] = export(ckpt, out / 'export', '--source', str(out / 'source'))
        assert (out / 'export' / 'tokenizer.json').exists()
    sharded, whole = (models[k].state_dict() for k in ('sharded', 'full'))
    assert sharded.keys() == whole.keys()
    for k in sharded:
        assert torch.equal(sharded[k], whole[k]), k
