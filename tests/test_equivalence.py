"""The central test: with deterministic masks, the masked model's logits equal those of the exported smaller
model loaded from disk by AutoModelForCausalLM (fp32, max abs diff <= 1e-4)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from composer_shear._hf import dtype_kwargs
from composer_shear.export import export_pruned
from composer_shear.hooks import MaskedForward
from composer_shear.masks import LOG_ALPHA_MAX
from composer_shear.testing import llama_config, random_masks, tiny_model

ALL = ['layer', 'hidden', 'head', 'intermediate']
TARGETS = {  # per source kind: a target that prunes every structure (hidden a multiple of the heads: transformers 5)
    'mha': dict(num_hidden_layers=3, hidden_size=40, num_attention_heads=4, num_key_value_heads=4,
                intermediate_size=50),
    'gqa': dict(num_hidden_layers=3, hidden_size=40, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=50),
    'qwen2': dict(num_hidden_layers=3, hidden_size=40, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=50),
}
MODULE_FIELDS = {'layer': ['num_hidden_layers'], 'hidden': ['hidden_size'],
                 'head': ['num_attention_heads', 'num_key_value_heads'], 'intermediate': ['intermediate_size']}


def check(tmp_path, kind, tied, modules, attn='eager', low=-3.0, high=3.0, seed=0, values='binary'):
    config = llama_config(kind, tied=tied)
    model = tiny_model(config, attn=attn, seed=seed)
    target = {f: v for m in modules for f, v in TARGETS[kind].items() if f in MODULE_FIELDS[m]}
    masks = random_masks(config, target, modules, seed=seed, low=low, high=high, values=values)
    snap = masks.snapshot()
    hooks = MaskedForward(model, masks.source)
    hooks.set(snap.z)
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        masked = model(ids).logits
    out = tmp_path / 'export'
    report = export_pruned(model.state_dict(), masks.state_dict(), config, out)
    small = AutoModelForCausalLM.from_pretrained(out, attn_implementation=attn, **dtype_kwargs(torch.float32)).eval()
    with torch.no_grad():
        exported = small(ids).logits
    diff = (masked - exported).abs().max().item()
    assert diff <= 1e-4, diff
    # exactly the target shape, and the parameter count it promises
    for field, value in masks.target.target_dict().items():
        assert getattr(small.config, field) == value
    assert small.config.head_dim == masks.source.head_dim
    assert sum(p.numel() for p in small.parameters()) == masks.target.num_params() == report['exported']['num_params']
    # masking really changed the model (the test could fail)
    hooks.set(None)
    with torch.no_grad():
        assert (model(ids).logits - masked).abs().max().item() > 1e-2
    return out


@pytest.mark.parametrize('kind', ['mha', 'gqa', 'qwen2'])
@pytest.mark.parametrize('tied', [False, True])
@pytest.mark.parametrize('modules', [['layer'], ['hidden'], ['head'], ['intermediate'], ALL], ids='+'.join)
def test_masked_equals_exported(tmp_path, kind, tied, modules):
    check(tmp_path, kind, tied, modules)


@pytest.mark.parametrize('kind', ['mha', 'gqa'])
@pytest.mark.parametrize('attn', ['eager', 'sdpa'])
def test_attention_implementations(tmp_path, kind, attn):
    check(tmp_path, kind, False, ALL, attn=attn, seed=3)


@pytest.mark.parametrize('kind', ['mha', 'gqa'])
def test_soft_values_are_folded(tmp_path, kind):
    """mask_values soft (the paper's), log alpha near 0: kept entries hold soft values around 0.5, which the export
    folds into the weights; masked == exported holds as with binary values."""
    out = check(tmp_path, kind, True, ALL, low=-0.5, high=0.5, seed=5, values='soft')
    report = json.loads((out / 'shape_report.json').read_text())
    assert report['exported']['num_hidden_layers'] == 3


def test_mask_values_travel_with_the_masks(tmp_path):
    """The values choice is stored with the masks: in the state dict, in the exported masks.safetensors (and read
    back), and a checkpoint written before the choice existed reads as soft (what it was made with)."""
    from composer_shear.export import load_masks_file, masks_from_state
    config = llama_config('gqa')
    model = tiny_model(config)
    for values in ('binary', 'soft'):
        masks = random_masks(config, TARGETS['gqa'], ALL, values=values)
        assert masks.binary == (values == 'binary')
        export_pruned(model.state_dict(), masks.state_dict(), config, tmp_path / values)
        back = load_masks_file(tmp_path / values / 'masks.safetensors')
        assert back.binary == masks.binary
        kept = [v[v != 0] for v in back.snapshot().z.values()]
        assert all((k == 1).all() for k in kept) == (values == 'binary')
    old = {k: v for k, v in masks.state_dict().items() if k != 'binary_values'}
    assert not masks_from_state(masks.source, old).binary
    with pytest.raises(ValueError, match='mask values must be one of binary, soft'):
        random_masks(config, TARGETS['gqa'], ALL, values='hard')


def test_removed_layer_and_renumbering(tmp_path):
    out = check(tmp_path, 'gqa', False, ['layer'], seed=7)
    report = json.loads((out / 'shape_report.json').read_text())
    removed = [r['layer'] for r in report['layers'] if not r['kept']]
    assert len(removed) == 1
    keys = json.loads((out / 'config.json').read_text())
    assert keys['num_hidden_layers'] == 3


def test_init_masks_export_to_target(tmp_path):
    """At init (all log alpha equal) ties are broken by index: the export keeps the first entries."""
    config = llama_config('gqa')
    model = tiny_model(config)
    for values, scale in (('binary', 1.0), ('soft', torch.sigmoid(torch.tensor(1.2 * LOG_ALPHA_MAX)).item())):
        masks = random_masks(config, TARGETS['gqa'], ALL, low=LOG_ALPHA_MAX, high=LOG_ALPHA_MAX, values=values)
        export_pruned(model.state_dict(), masks.state_dict(), config, tmp_path / values)
        small = AutoModelForCausalLM.from_pretrained(tmp_path / values)
        assert small.config.num_hidden_layers == 3
        torch.testing.assert_close(small.model.embed_tokens.weight,
                                   model.model.embed_tokens.weight[:, :40] * scale)


def test_export_warns_when_it_keeps_structures_the_masks_gave_up_on(tmp_path, caplog):
    """Layers whose log alpha sits at its minimum (keep probability 0.047, like the removed ones) but that the
    exact target still needs are counted in the shape report and named in a warning; healthy masks give none."""
    config = llama_config('gqa')
    model = tiny_model(config)
    masks = random_masks(config, TARGETS['gqa'], ALL, seed=0)
    with caplog.at_level('WARNING', logger='composer_shear.export'):
        report = export_pruned(model.state_dict(), masks.state_dict(), config, tmp_path / 'healthy')
    assert all(n == 0 for n, _ in report['kept_given_up'].values()) and 'given up' not in caplog.text
    with torch.no_grad():
        masks.log_alpha['layer'][1:] = -LOG_ALPHA_MAX  # only layer 0 still wanted; the target keeps 3
    caplog.clear()
    with caplog.at_level('WARNING', logger='composer_shear.export'):
        report = export_pruned(model.state_dict(), masks.state_dict(), config, tmp_path / 'filled')
    assert report['kept_given_up']['layer'] == [2, 3]
    assert report['kept_given_up']['hidden'] == [0, TARGETS['gqa']['hidden_size']]
    assert 'given up on' in caplog.text and 'layer: 2 of 3 kept' in caplog.text
    assert 'layer 2 of 3' in (tmp_path / 'filled' / 'shape_report.md').read_text()
