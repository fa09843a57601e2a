"""The plugin through llm-foundry's own training loop, built by name from a YAML (entry points only)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from streaming import MDSWriter
from transformers import AutoModelForCausalLM

from composer_shear.testing import save_tiny, write_sums_task

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent


def write_mds(folder, n=64, seq=32, vocab=96):
    rng = np.random.default_rng(0)
    with MDSWriter(out=str(folder / 'train'), columns={'tokens': 'ndarray:int32'}) as w:
        for _ in range(n):
            start, step = rng.integers(3, vocab), rng.integers(1, 5)
            w.write({'tokens': (3 + (start + step * np.arange(seq)) % (vocab - 3)).astype(np.int32)})


def train(tmp_path, *overrides, launcher='train.py'):
    entry = [sys.executable, str(ROOT / 'train.py')] if launcher == 'train.py' else \
        [str(Path(sys.executable).with_name('llmfoundry')), 'train']
    cmd = [*entry, str(ROOT / 'yamls' / 'tiny_prune.yaml'),
           f'variables.model_dir={tmp_path / "model"}', f'variables.data_local={tmp_path / "data"}',
           f'save_folder={tmp_path / "ckpt"}', *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('yaml')
    save_tiny(tmp / 'model')
    write_mds(tmp / 'data')
    return tmp


def test_llmfoundry_yaml_prunes_and_exports(workdir):
    """`python train.py`: our parts come in through entry points; 40 steps prune to the target and export."""
    res = train(workdir, launcher='train.py')
    assert res.returncode == 0, res.stderr[-4000:]
    assert 'loss/train/lag' in res.stdout + res.stderr
    report = json.loads((workdir / 'ckpt' / 'pruning' / 'ba40' / 'shape_report.json').read_text())
    assert report['deterministic']['hidden_size'] == 48
    out = workdir / 'export'
    res = subprocess.run([sys.executable, '-m', 'composer_shear.cli', 'export', '--checkpoint',
                          str(workdir / 'ckpt' / 'latest-rank0.pt'), '--out', str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.num_key_value_heads) == (3, 48, 1)


def test_llmfoundry_cli_finds_the_plugin(workdir):
    """llm-foundry's own `llmfoundry train` CLI runs a pruning step with the same YAML (entry points only)."""
    res = train(workdir, 'max_duration=2ba', 'save_folder=null', 'console_log_interval=1ba', launcher='llmfoundry')
    assert res.returncode == 0, res.stderr[-4000:]
    assert 'loss/train/lag' in res.stdout + res.stderr


def test_yaml_mistakes_fail_before_training(workdir):
    res = train(workdir, 'algorithms.shear_pruning.target.hidden_size=4096', 'save_folder=null')
    assert res.returncode != 0
    assert 'target.hidden_size=4096 exceeds' in res.stderr
    res = train(workdir, 'algorithms.shear_pruning.lag_learning_rate=1.0', 'save_folder=null')
    assert res.returncode != 0 and 'lag_learning_rate' in res.stderr
    assert 'train/batch' not in res.stdout  # no step ran


def test_icl_tasks_in_a_pruning_yaml(workdir):
    """llm-foundry's icl_tasks key in a pruning YAML: the masked model (exact-target masks) is scored at each eval
    and Composer logs the task's accuracy."""
    tasks = write_sums_task(workdir / 'icl')
    res = train(workdir, f'icl_tasks_str={tasks}', 'max_duration=20ba',
                'algorithms.shear_pruning.eval_target_shape=true', 'save_folder=null')
    assert res.returncode == 0, res.stderr[-4000:]
    log = res.stdout + res.stderr
    assert 'metrics/sums/0-shot/InContextLearningMultipleChoiceAccuracy' in log

