"""`shear_pruning.target` as a parameter budget: the shape is searched at the first step through the masked model
(the same losses as the pruned models'), the masks start at its one-shot selection, every rank chooses alike, and a
resumed run does not search again."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from composer_shear.algorithm import ShearPruning
from composer_shear.errors import ConfigError
from composer_shear.testing import llama_config

ROOT = Path(__file__).resolve().parent.parent


def test_budget_options_are_checked_when_the_yaml_is_read():
    algo = ShearPruning(target={'params': '40K'}, search={'multiple_of': 8})
    assert algo.budget.value == 40000 and algo.init['from'] == 'activations'
    assert ShearPruning(target='params=75M').budget.value == 75_000_000
    assert ShearPruning(target={'preset': '1.3b'}).budget is None
    for kwargs, match in (
            (dict(target={'params': '40KB'}), "shear_pruning.target.params='40KB' is not a number"),
            (dict(target={'params': 40000, 'layers': 3}), 'shear_pruning.target.layers is not a target key'),
            (dict(target={'params': 40000}, search={'top': 3}), 'shear_pruning.search.top is unknown'),
            (dict(target={'params': 40000}, search={'held_out_batches': 0}), 'search.held_out_batches'),
            (dict(target={'params': 40000}, search={'tolerance': 1.5}), 'shear_pruning.search.tolerance'),
            (dict(target={'preset': '1.3b'}, search={'max_candidates': 4}), 'applies to a budget target'),
            (dict(target={'params': 40000}, init={'from': 'constant'}), 'init.from must be activations')):
        with pytest.raises(ConfigError, match=match):
            ShearPruning(**kwargs)


def test_the_search_scores_what_export_keeps_and_starts_there(tmp_path):
    """One step at a negligible mask learning rate: the losses the run scored through the masked model are the
    pruned models' losses on the same held-out batches (1e-4), the run aims at the best of them, and its
    exact-target masks are that shape's one-shot selection of the same calibration batches."""
    from composer_shear.functional import prune_model
    from composer_shear.oneshot import importance, oneshot_masks
    from composer_shear.search import evaluate, prune_shape
    from composer_shear.shapes import ModelShape
    from tests.common.train_budget import run
    algo, trainer = run(tmp_path, steps=1, lag_lr=1e-12)
    searched = algo.searched
    losses = [c['loss'] for c in searched['candidates']]
    assert len(losses) == 12 and searched['loss'] == min(losses)
    chosen = ModelShape.from_config(llama_config('gqa')).replace(**searched['shape'])
    assert algo.target_shape == chosen and chosen.num_params() <= 40000

    # the same batches, independently: the run's loader read them ahead (2 calibration + 2 held-out)
    from transformers import AutoModelForCausalLM
    source = AutoModelForCausalLM.from_pretrained(tmp_path / 'model').eval()
    from composer_shear.data.dynamic import build_dynamic_text_dataloader
    from tests.common.train_dynamic import DOMAINS, SEQ
    fresh = build_dynamic_text_dataloader(None, 4, dict(local=str(tmp_path / 'data'), domains=DOMAINS,
                                                        proportions=[0.6, 0.3, 0.1], epoch_size=16, max_seq_len=SEQ),
                                          num_workers=0)  # the run's loader: the same data, seed and first batches
    peeked = [b['input_ids'] for b in fresh.dataloader.dataset.peek(4)]
    calib, held = peeked[:2], peeked[2:]
    scores = importance(source, calib)
    state = source.state_dict()
    src = ModelShape.from_config(source.config)
    for c, loss in zip(searched['candidates'], losses, strict=True):
        shape = src.replace(**{k: c[k] for k in chosen.target_dict()})
        small = prune_shape(state, source.config, scores, src, shape, algo.pruning_modules)
        assert evaluate(small, held) == pytest.approx(loss, abs=1e-4), shape
    masks = ShearPruning.masks(trainer.state)
    z, _, _ = masks('target')
    want = oneshot_masks(scores, src, chosen, algo.pruning_modules)
    assert z.keys() == want.keys()
    for name in want:
        assert torch.equal((z[name] != 0).float(), want[name]), name
    small = prune_model(trainer.state.model, masks)
    assert ModelShape.from_config(small.config).target_dict() == chosen.target_dict()


@pytest.mark.slow
def test_two_fsdp2_ranks_choose_alike_and_a_resumed_run_does_not_search(tmp_path):
    composer = str(Path(sys.executable).with_name('composer'))
    env = {**os.environ, 'FSDP_VERSION': '2'}

    def launch(*args):
        res = subprocess.run([composer, '-n', '2', '-m', 'tests.common.train_budget', str(tmp_path), 'fsdp', *args],
                             env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]

    launch()
    first = [json.loads((tmp_path / f'first-rank{r}.json').read_text()) for r in (0, 1)]
    assert first[0] == first[1] and first[0]['searches'] == 1
    assert first[0]['target'] == first[0]['masks_target'] == first[0]['searched']['shape']
    launch(f'resume={tmp_path / "ckpt" / "ep0-ba3-rank0.pt"}')
    resumed = [json.loads((tmp_path / f'resumed-rank{r}.json').read_text()) for r in (0, 1)]
    for r in resumed:
        assert r['searches'] == 0 and r['searched'] == first[0]['searched']
        assert r['target'] == r['masks_target'] == first[0]['target']
    out = tmp_path / 'pruned'
    res = subprocess.run([sys.executable, '-m', 'composer_shear.cli', 'export', '--checkpoint',
                          str(tmp_path / 'ckpt' / 'latest-rank0.pt'), '--out', str(out)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    config = json.loads((out / 'config.json').read_text())
    assert {k: config[k] for k in first[0]['target']} == first[0]['target']
