"""composer_shear/yamls/demo/{prune,continue}.yaml on 2 processes (`composer -n 2 train.py`) on a tiny model: under
DDP both stages train with dynamic loading and per-domain eval, the pruned checkpoint exports, and the continued
model comes out as an HF folder; under FSDP2 the continued stage does the same (FSDP2 pruning with these callbacks
and its sharded-checkpoint export are tested in tests/test_dynamic_distributed.py and tests/test_distributed.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from composer_shear.data.prepare import prepare
from composer_shear.data.weights import update_domain_weights
from composer_shear.testing import TARGET, save_tiny

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent
DOMAINS = ['code', 'reference', 'licenses']
REFERENCE = {'code': 2.5, 'reference': 3.5, 'licenses': 3.0}
STEPS, INTERVAL, BATCH, SEQ = 8, 2, 4, 16
TEXT = {
    'code': lambda i: f'def f{i}(x):\n    return x * {i} + {i % 7}\n',
    'reference': lambda i: f'Section {i}. The statement number {i} binds a name to a value. ',
    'licenses': lambda i: f'Permission {i} is hereby granted, free of charge, to any person. ',
}


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('demo_yamls')
    save_tiny(tmp / 'model')
    for name, make in TEXT.items():
        (tmp / 'corpus' / name).mkdir(parents=True)
        with open(tmp / 'corpus' / name / 'docs.jsonl', 'w') as f:
            for doc in range(60):
                f.write(json.dumps({'text': ''.join(make(doc * 10 + i) for i in range(8))}) + '\n')
    prepare(tmp / 'corpus', tmp / 'model', tmp / 'data', SEQ, eval_fraction=0.2, progress=False)
    (tmp / 'reference.json').write_text(json.dumps(REFERENCE))
    return tmp


def launch(workdir, stage, model, out, fsdp, *extra):
    cmd = [str(Path(sys.executable).with_name('composer')), '-n', '2', str(ROOT / 'train.py'),
           str(ROOT / 'composer_shear' / 'yamls' / 'demo' / f'{stage}.yaml'), f'variables.source_model={model}',
           f'variables.data={workdir / "data"}', f'variables.reference_loss={workdir / "reference.json"}',
           f'save_folder={out}', f'max_duration={STEPS}ba', f'max_seq_len={SEQ}',
           f'global_train_batch_size={BATCH}', 'device_train_microbatch_size=2', 'device_eval_batch_size=2',
           'eval_subset_num_batches=2', f'train_loader.dataset.epoch_size={INTERVAL * BATCH}', *extra]
    env = dict(os.environ)
    if fsdp:
        cmd.append('fsdp_config.state_dict_type=sharded')
        env['FSDP_VERSION'] = '2'
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=out.parent)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return json.loads((out / 'dynamic_loading.json').read_text())


def check_history(log, initial):
    """One update per interval, each the rule applied to that eval's per-domain losses (1e-12)."""
    assert [h['batch'] for h in log['history']] == list(range(INTERVAL, STEPS + 1, INTERVAL))
    weights = np.array(initial)
    for h in log['history']:
        assert len(h['losses']) == 3 and all(0 < x < 10 for x in h['losses'])
        weights = update_domain_weights(weights, h['losses'], [REFERENCE[d] for d in DOMAINS])
        np.testing.assert_allclose(h['weights'], weights, rtol=1e-12)
    assert np.abs(weights - initial).max() > 0.01  # the mix moved
    return weights


def test_both_demo_stages_on_two_ranks_ddp(workdir):
    target = [f'algorithms.shear_pruning.target.{k}={v}' for k, v in TARGET.items()]
    prune_out = workdir / 'prune-ddp'
    # 3 settled steps under DDP: every mask parameter must still get a (zero) gradient, or DDP's reducer stalls
    log = launch(workdir, 'prune', workdir / 'model', prune_out, False, *target, 'algorithms.shear_pruning.settle=3ba')
    weights = check_history(log, [0.6, 0.1, 0.3])
    report = json.loads((prune_out / 'pruning' / f'ba{STEPS}' / 'shape_report.json').read_text())
    assert report['deterministic']['hidden_size'] == TARGET['hidden_size']

    pruned = workdir / 'pruned-ddp'
    res = subprocess.run([sys.executable, '-m', 'composer_shear.cli', 'export', '--checkpoint',
                          str(prune_out / 'latest-rank0.pt'), '--out', str(pruned), '--source', str(workdir / 'model')],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    continued(workdir, pruned, 'ddp', weights, f'variables.pruning_run={prune_out}', 'variables.prune_batches=8',
              'variables.total_batches=16', 'variables.warmup_batches=2')


def test_continue_stage_on_two_ranks_fsdp2(workdir):
    continued(workdir, workdir / 'model', 'fsdp2', np.array([0.6, 0.1, 0.3]), 'variables.pruning_run=none',
              'callbacks.dynamic_loading.continue_from=null')


def continued(workdir, start, mode, weights, *extra):
    """The continued stage from `start` (the initial mix, after pruning's mix moved to `weights`): dynamic loading
    follows the rule and the final HF folder holds a model of `start`'s shape."""
    out = workdir / f'continue-{mode}'
    log = launch(workdir, 'continue', start, out, mode == 'fsdp2', *extra)
    check_history(log, [0.6, 0.1, 0.3])
    assert np.abs(np.array(log['initial']) - weights).max() > 0.01 or mode == 'fsdp2'  # not the pruning end
    final = AutoModelForCausalLM.from_pretrained(out / 'huggingface' / f'ba{STEPS}')
    begin = AutoModelForCausalLM.from_pretrained(start)
    for field in ('num_hidden_layers', 'hidden_size', 'num_attention_heads', 'num_key_value_heads',
                  'intermediate_size'):
        assert getattr(final.config, field) == getattr(begin.config, field), field
    assert final.num_parameters() == begin.num_parameters()
    assert not all(torch.equal(p, q) for p, q in zip(final.parameters(), begin.parameters(), strict=True))  # trained
