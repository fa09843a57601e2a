"""One-shot activation-importance pruning (the reproduction's baseline): it drops what provably contributes
nothing, keeps exactly the target, and its output loads as the target architecture."""

import torch

from composer_shear.oneshot import importance, oneshot_masks, prune_oneshot
from composer_shear.shapes import ModelShape
from composer_shear.testing import llama_config, tiny_model

TARGET = dict(num_hidden_layers=3, hidden_size=48, num_attention_heads=2, num_key_value_heads=1,
              intermediate_size=40)
MODULES = ('layer', 'hidden', 'head', 'intermediate')


def model_with_dead_parts():
    model = tiny_model(llama_config('gqa'))  # 4 layers, hidden 64, 8 heads in 2 groups, intermediate 80
    layers = model.model.layers
    with torch.no_grad():
        layers[0].self_attn.v_proj.weight[8:16] = 0  # KV group 1 of layer 0: its 4 heads output zero
        layers[1].mlp.up_proj.weight[:10] = 0  # MLP channels 0-9 of layer 1 are zero
        layers[2].self_attn.o_proj.weight.zero_()  # layer 2 is the identity
        layers[2].mlp.down_proj.weight.zero_()
    return model


def batches(n=3):
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, 96, (2, 16), generator=gen) for _ in range(n)]


def test_importance_ranks_dead_structures_last():
    model = model_with_dead_parts()
    scores = importance(model, batches())
    assert scores['heads'][0, 4:].abs().max() < 1e-6 < scores['heads'][0, :4].min()
    assert scores['intermediate'][1, :10].abs().max() < 1e-6 < scores['intermediate'][1, 10:].min()
    assert scores['layer'][2] < 1e-6 < scores['layer'][[0, 1, 3]].min()
    source = ModelShape.from_config(model.config)
    z = oneshot_masks(scores, source, source.resolve_target(TARGET, MODULES), MODULES)
    assert z['layer'].tolist() == [1, 1, 0, 1]
    assert z['kv'][0].tolist() == [1, 0]
    assert z['intermediate'][1, :10].sum() == 0
    for name, per_row in (('hidden', 48), ('kv', 1), ('query', 2), ('intermediate', 40)):
        assert torch.all(z[name].sum(-1) == per_row) and set(z[name].unique().tolist()) == {0.0, 1.0}


def test_oneshot_output_is_the_target_architecture():
    model = model_with_dead_parts()
    pruned = prune_oneshot(model, TARGET, batches())
    shape = ModelShape.from_config(pruned.config)
    assert shape.target_dict() == TARGET
    assert type(pruned) is type(model) and not pruned.training
    assert pruned.num_parameters() == shape.num_params()
    # removing the identity layer and the dead KV group / channels alone changes nothing
    partial = dict(TARGET, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=80)
    small = prune_oneshot(model, partial, batches(), pruning_modules=('layer',))
    assert small.config.num_hidden_layers == 3
    ids = batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_masks_initialised_from_importance_start_at_the_oneshot_selection_and_the_target():
    """init_masks_from_importance: the exact-target masks equal oneshot_masks' selection, every row's expected
    count equals the target (1e-4), so the Lagrangian at full warm-up is 0 whatever the multipliers."""
    from composer_shear.functional import apply_shear_pruning, init_masks_from_importance
    from composer_shear.masks import expected_score
    model = model_with_dead_parts()
    scores = importance(model, batches())
    masks = apply_shear_pruning(model, TARGET, MODULES)
    source = ModelShape.from_config(model.config)
    want = oneshot_masks(scores, source, source.resolve_target(TARGET, MODULES), MODULES)
    sparsity = init_masks_from_importance(masks, scores)
    with torch.no_grad():
        masks.lambdas.fill_(5.0)
    z, lag, stats = masks('target', progress=1.0)
    for s in masks.structures:
        assert torch.equal((z[s.name] != 0).float(), want[s.name]), s.name
        expected = expected_score(masks.log_alpha[s.name].detach()).sum(-1)
        torch.testing.assert_close(expected, torch.full_like(expected, float(s.target)), atol=1e-4, rtol=0)
        assert abs(sparsity[s.name] - s.target_sparsity) < 1e-5, s.name
        assert abs(stats[f'expected_sparsity/{s.name}'] - s.target_sparsity) < 1e-5, s.name
    assert abs(lag.item()) < 1e-4  # the constraint starts satisfied
    assert z['layer'].tolist()[2] == 0 and torch.equal(want['layer'], torch.tensor([1.0, 1.0, 0.0, 1.0]))
