import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

from composer_shear.shapes import PRESETS, ModelShape, ShapeError
from composer_shear.surgery import pruned_config
from composer_shear.testing import llama_config

LLAMA2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32)


def count(config):
    with torch.device('meta'):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


CONFIGS = {
    'llama-mha': llama_config('mha'),
    'llama-gqa-tied': llama_config('gqa', tied=True),
    'llama-bias': llama_config('gqa', attention_bias=True, mlp_bias=True),
    'qwen2': llama_config('qwen2'),
    'mistral': MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                             num_attention_heads=8, num_key_value_heads=2, head_dim=16),
}


@pytest.mark.parametrize('name', CONFIGS)
def test_param_count_is_exact_for_source_and_target(name):
    config = CONFIGS[name]
    shape = ModelShape.from_config(config)
    assert shape.num_params() == count(config)
    target = shape.resolve_target(dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                       num_key_value_heads=2 if shape.num_key_value_heads < 8 else 4,
                                       intermediate_size=40))
    assert target.num_params() == count(pruned_config(config, target, torch.float32))


def test_presets_match_the_paper():
    source = ModelShape.from_config(LLAMA2_7B)
    assert source.num_params() == 6_738_415_616
    expected = {'1.3b': 1_345_423_360, '2.7b': 2_701_560_320, '370m': 373_867_520}
    for name, total in expected.items():
        target = source.resolve_target({'preset': name})
        assert target.target_dict() == PRESETS[name]
        assert target.num_params() == total
        assert target.head_dim == 128


@pytest.mark.parametrize('target, modules, message', [
    ({'hidden_size': 8192}, None, 'target.hidden_size=8192 exceeds'),
    ({'num_attention_heads': 5, 'num_key_value_heads': 2}, None, 'num_attention_heads=5 is not a multiple of'),
    ({'num_attention_heads': 8, 'num_key_value_heads': 1}, None, 'query heads per KV group exceed'),
    ({'num_key_value_heads': 3}, None, "target.num_key_value_heads=3 exceeds the source model's 2"),
    ({'hidden_size': 32}, ['head'], "'hidden' is not in pruning_modules"),
    ({'num_layers': 2}, None, 'target.num_layers is not a target field'),
    ({'preset': '7b'}, None, "target.preset '7b' is unknown"),
    ({'hidden_size': 0}, None, 'target.hidden_size must be a positive integer'),
    ({'hidden_size': 32}, ['hidden', 'neurons'], "pruning_modules: 'neurons' is unknown"),
])
def test_bad_targets_name_the_field(target, modules, message):
    shape = ModelShape.from_config(llama_config('gqa'))  # 8 heads, 2 kv heads, hidden 64
    with pytest.raises(ShapeError, match=message.replace('(', r'\(').replace('[', r'\[')):
        shape.resolve_target(target, modules or ['layer', 'hidden', 'head', 'intermediate'])


def test_not_llama_family():
    with pytest.raises(ShapeError, match="model_type 'gpt2' is not LLaMA-family"):
        ModelShape.from_config({'model_type': 'gpt2'})


def test_incomplete_config_names_the_fields():
    with pytest.raises(ShapeError, match='the llama config lacks hidden_size, intermediate_size'):
        ModelShape.from_config({'model_type': 'llama', 'num_hidden_layers': 2, 'num_attention_heads': 4,
                                'vocab_size': 10})


def test_mha_target_heads_alone_keeps_mha():
    source = ModelShape.from_config(LLAMA2_7B)
    target = source.resolve_target({'num_attention_heads': 16})
    assert target.num_key_value_heads == 16 and target.queries_per_group == 1


def test_a_target_the_installed_transformers_cannot_hold_is_refused_before_pruning():
    """transformers 5 requires hidden_size to be a multiple of num_attention_heads (whatever head_dim is): such a
    target is refused by apply_shear_pruning and prune_oneshot before anything changes; transformers 4 accepts it."""
    import transformers

    from composer_shear import apply_shear_pruning, prune_oneshot
    from composer_shear.testing import tiny_model
    model = tiny_model(llama_config('gqa'))  # hidden 64, 8 query heads in 2 KV groups
    target = dict(num_attention_heads=6, num_key_value_heads=2)  # 64 is not a multiple of 6
    if int(transformers.__version__.split('.')[0]) >= 5:
        for prune in (lambda: apply_shear_pruning(model, target, ['head']),
                      lambda: prune_oneshot(model, target, [torch.zeros(1, 4, dtype=torch.long)], ['head'])):
            with pytest.raises(ShapeError, match='cannot hold the target shape'):
                prune()
        assert not hasattr(model, 'shear_masks') and all(not m._forward_hooks for m in model.modules())
    else:
        masks = apply_shear_pruning(model, target, ['head'])
        assert masks.target.num_attention_heads == 6
