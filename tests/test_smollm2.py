"""Masked SmolLM2-135M (a real pre-trained GQA model) equals its export, with random masks."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from composer_shear.assets import smollm2_dir
from composer_shear.export import export_pruned
from composer_shear.hooks import MaskedForward
from composer_shear.testing import random_masks

pytestmark = pytest.mark.slow
TARGET = dict(num_hidden_layers=24, hidden_size=384, num_attention_heads=6, num_key_value_heads=2,
              intermediate_size=768)


@pytest.fixture(scope='module')
def smollm2(tmp_path_factory):
    return smollm2_dir(os.environ.get('COMPOSER_SHEAR_CACHE') or tmp_path_factory.mktemp('cache'))


def test_smollm2_masked_equals_exported(smollm2, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(smollm2, torch_dtype=torch.float32,
                                                 attn_implementation='sdpa').eval()
    masks = random_masks(model.config, TARGET, ['layer', 'hidden', 'head', 'intermediate'], low=-2, high=4)
    hooks = MaskedForward(model, masks.source)
    hooks.set(masks.snapshot().z)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        masked = model(ids).logits
    export_pruned(model.state_dict(), masks.state_dict(), model.config, tmp_path / 'pruned')
    small = AutoModelForCausalLM.from_pretrained(tmp_path / 'pruned', torch_dtype=torch.float32,
                                                 attn_implementation='sdpa').eval()
    with torch.no_grad():
        exported = small(ids).logits
    assert (masked - exported).abs().max().item() <= 1e-4
    assert sum(p.numel() for p in small.parameters()) == masks.target.num_params()
    assert small.config.tie_word_embeddings and small.config.num_key_value_heads == 2


def test_smollm2_pruned_to_a_budget_from_the_command_line(smollm2, tmp_path):
    """`composer-shear prune` in a fresh process: SmolLM2-135M to the demo target's parameter count by a shape
    search on the RedPajama sample, loaded back by plain transformers."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from composer_shear.data.prepare import prepare
    sample = Path(__file__).resolve().parents[1] / 'data' / 'redpajama_sample'
    for domain in sorted(p.name for p in sample.iterdir() if p.is_dir()):  # a few documents of every domain
        first = sorted((sample / domain).glob('*.jsonl'))[0]
        (tmp_path / 'raw' / domain).mkdir(parents=True)
        (tmp_path / 'raw' / domain / 'a.jsonl').write_text(''.join(first.open().readlines()[:3]))
    prepare(tmp_path / 'raw', smollm2, tmp_path / 'data', 32, eval_fraction=0.34, progress=False)
    budget = 75_226_080  # the demo's hand-picked target: 24 layers, hidden 480, 6 heads / 2 KV, intermediate 1152
    cmd = [sys.executable, '-m', 'composer_shear.cli', 'prune', str(smollm2), '--data', str(tmp_path / 'data'),
           '--target', f'params={budget}', '--out', str(tmp_path / 'out'), '--calibration', '7', '--held-out', '7',
           '--max-candidates', '3']
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    search = json.loads((tmp_path / 'out' / 'search.json').read_text())
    assert search['enumerated'] == 121 and search['scored'] == 3
    small = AutoModelForCausalLM.from_pretrained(tmp_path / 'out', torch_dtype=torch.float32)
    assert 0.95 * budget <= small.num_parameters() == search['best']['params'] <= budget
    assert search['best']['score'] == min(c['score'] for c in search['candidates'])
    assert small.config.num_attention_heads % small.config.num_key_value_heads == 0
