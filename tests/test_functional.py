"""The functional API without a Trainer: attach, train in a plain loop, prune in memory; the result equals the
masked model and the export, bit for bit."""

import inspect

import pytest
import torch
from safetensors.torch import load_file

import composer_shear
from composer_shear import (
    ConfigError,
    ShapeError,
    apply_shear_pruning,
    clamp_masks,
    prune_model,
    sample_masks,
    set_eval_masks,
)
from composer_shear.export import export_pruned
from composer_shear.masks import LOG_ALPHA_MAX, MASKS_ATTR
from composer_shear.testing import Tokens, llama_config, tiny_model

TARGET = dict(num_hidden_layers=3, hidden_size=48, num_attention_heads=4, num_key_value_heads=1,
              intermediate_size=40)


def train_loop(model, masks, opt, steps=12, warmup=4):
    data = Tokens(16, 16, model.config.vocab_size).ids
    lags = []
    for step in range(steps):
        ids = data[(2 * step) % 16:(2 * step) % 16 + 2]
        lag, stats = sample_masks(masks, progress=min(step / warmup, 1.0),
                                  generator=torch.Generator().manual_seed(step))
        loss = model(input_ids=ids, labels=ids).loss + lag
        loss.backward()
        opt.step()
        opt.zero_grad()
        clamp_masks(masks)
        lags.append(float(lag))
    return lags, stats


def test_functional_pruning_loop_and_prune_model(tmp_path):
    model = tiny_model(llama_config('gqa')).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    masks = apply_shear_pruning(model, TARGET, optimizers=opt, lag_lr=0.5)
    # two groups added: mask logits at +lag_lr, multipliers at -lag_lr, no weight decay
    assert [g['lr'] for g in opt.param_groups[1:]] == [0.5, -0.5]
    assert [g['weight_decay'] for g in opt.param_groups[1:]] == [0.0, 0.0]
    assert not hasattr(model, MASKS_ATTR)  # a bare HF model is not given a child (save_pretrained unchanged)

    lags, stats = train_loop(model, masks, opt)
    assert lags[0] == 0.0 and any(abs(v) > 0 for v in lags[1:])  # multipliers start at 0, then move
    assert 'expected_sparsity/layer' in stats and 'expected/num_params' in stats
    for p in masks.log_alpha.values():
        assert p.abs().max() <= LOG_ALPHA_MAX + 1e-6
        assert (p != LOG_ALPHA_MAX).any()  # the masks learned
    assert not torch.equal(masks.lambdas, torch.zeros_like(masks.lambdas))

    # prune_model == the masked model with exact-target masks (fp32, 1e-4), and == the export's weights
    model.eval()
    set_eval_masks(masks)
    ids = Tokens(2, 20, model.config.vocab_size, seed=5).ids
    with torch.no_grad():
        masked = model(ids).logits
    small = prune_model(model, masks)
    assert type(small) is type(model) and not small.training
    assert {f: getattr(small.config, f) for f in TARGET} == TARGET
    assert small.num_parameters() == masks.target.num_params()
    with torch.no_grad():
        assert (small(ids).logits - masked).abs().max().item() <= 1e-4
    hf_sd = {k: v for k, v in model.state_dict().items()}
    export_pruned(hf_sd, masks.state_dict(), model.config, tmp_path / 'export')
    exported = load_file(tmp_path / 'export' / 'model.safetensors')
    mine = small.state_dict()
    assert set(exported) <= set(mine)
    for k, v in exported.items():
        assert torch.equal(mine[k], v), k
    # the source is untouched by prune_model (only trained), and hooks can be removed
    masks.hooks.remove()
    with torch.no_grad():
        unmasked = model(ids).logits
    assert (unmasked - masked).abs().max() > 1e-2
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_set_eval_masks_expected_count():
    model = tiny_model(llama_config('gqa'))
    masks = apply_shear_pruning(model, TARGET)
    with torch.no_grad():
        masks.log_alpha['layer'].copy_(torch.tensor([5.0, -5.0, -5.0, 5.0]))  # expects 2 layers, target 3
    set_eval_masks(masks, exact_target=False)
    assert (masks.hooks.z['layer'] != 0).sum() == 2
    set_eval_masks(masks)
    assert (masks.hooks.z['layer'] != 0).sum() == 3


def test_composer_model_gets_the_masks_as_a_child():
    HuggingFaceModel = pytest.importorskip('composer.models').HuggingFaceModel
    model = HuggingFaceModel(tiny_model(llama_config('gqa')))
    masks = apply_shear_pruning(model, TARGET)
    assert getattr(model, MASKS_ATTR) is masks
    assert any(k.startswith(f'{MASKS_ATTR}.log_alpha.') for k in model.state_dict())
    with pytest.raises(ShapeError, match='apply shear pruning once'):
        apply_shear_pruning(model, TARGET)


@pytest.mark.parametrize('kwargs, error, message', [
    ({'target': dict(TARGET, hidden_size=128)}, ShapeError, 'target.hidden_size=128 exceeds'),
    ({'target': TARGET, 'pruning_modules': ['layers']}, ShapeError, "'layers' is unknown"),
    ({'target': TARGET, 'lag_lr': 0}, ConfigError, 'lag_lr must be a positive number'),
])
def test_bad_input_changes_nothing(kwargs, error, message):
    model = tiny_model(llama_config('gqa'))
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(error, match=message):
        apply_shear_pruning(model, **kwargs)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before


def test_public_api():
    pytest.importorskip('composer')  # part of the API is Composer plumbing (absent in the compat environment)
    assert composer_shear.__all__ == sorted(composer_shear._EXPORTS)
    for name in composer_shear.__all__:
        obj = getattr(composer_shear, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert obj.__doc__, name
    # every public function has an Example and full type hints
    for name in ('apply_shear_pruning', 'sample_masks', 'set_eval_masks', 'clamp_masks', 'ascend_multipliers',
                 'prune_model', 'prune_oneshot', 'update_domain_weights', 'init_masks_from_importance'):
        fn = getattr(composer_shear, name)
        assert 'Example:' in fn.__doc__, name
        sig = inspect.signature(fn)
        assert sig.return_annotation is not inspect.Signature.empty, name
        assert all(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values()), name
    from importlib.resources import files
    assert files('composer_shear').joinpath('py.typed').is_file()


def test_import_is_light():
    import subprocess
    import sys
    code = ('import sys, composer_shear; '
            'print(sorted(m for m in ("torch", "composer", "transformers") if m in sys.modules))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == '[]'
