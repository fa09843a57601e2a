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
