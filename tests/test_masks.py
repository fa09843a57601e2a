import math

import pytest
import torch

from composer_shear import masks as M
from composer_shear.masks import ShearMasks
from composer_shear.shapes import ModelShape
from composer_shear.testing import llama_config


def test_constants_and_expected_score_closed_form():
    la = torch.tensor([-math.log(100), 0.0, math.log(100)])
    # score = sigmoid(log_alpha + (2/3) ln 11)
    torch.testing.assert_close(M.expected_score(la), torch.tensor([0.047130, 0.831822, 0.997982]), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(M.soft_value(la), torch.sigmoid(1.2 * la))


def test_sampling_statistics_at_ln100():
    torch.manual_seed(0)
    z = M.sample(torch.full((400_000,), math.log(100)))
    assert z.min() >= 0 and z.max() <= 1
    assert abs((z == 1).float().mean().item() - 0.953) < 0.002
    assert abs((z == 0).float().mean().item() - 0.002) < 0.0005
    # the mean of the rectified gate exceeds the keep probability's complement (Monte-Carlo value 0.987)
    assert abs(z.mean().item() - 0.987) < 0.002


def test_sampling_matches_keep_probability():
    torch.manual_seed(1)
    for la in (-2.0, 0.0, 1.5):
        z = M.sample(torch.full((200_000,), la))
        assert abs((z > 0).float().mean().item() - M.expected_score(torch.tensor(la)).item()) < 0.005


def test_deterministic_counts_values_and_ties():
    la = torch.tensor([[1.0, 3.0, 3.0, -2.0, 0.5], [2.0, 2.0, 2.0, 2.0, 2.0]])
    z = M.deterministic(la, 2)
    assert ((z != 0).sum(-1) == 2).all()
    # ties broken by lower index
    assert torch.equal(z[0] != 0, torch.tensor([False, True, True, False, False]))
    assert torch.equal(z[1] != 0, torch.tensor([True, True, False, False, False]))
    torch.testing.assert_close(z[0, 1], torch.sigmoid(torch.tensor(1.2 * 3.0)))
    # per-row counts and the expected-count mode: keep n - round(n - sum(score))
    z = M.deterministic(la, torch.tensor([1, 4]))
    assert (z != 0).sum(-1).tolist() == [1, 4]
    keep = M.expected_keep(la)
    assert keep.tolist() == [5 - round(5 - M.expected_score(r).sum().item()) for r in la]


def make(target, modules=('layer', 'hidden', 'head', 'intermediate')):
    source = ModelShape.from_config(llama_config('gqa'))
    return ShearMasks(source, source.resolve_target(target, modules), modules)


TARGET = dict(num_hidden_layers=3, hidden_size=48, num_attention_heads=4, num_key_value_heads=1,
              intermediate_size=40)


def test_structures_and_exact_target_masks():
    m = make(TARGET)
    assert {s.name: s.shape for s in m.structures} == {  # query slots 4 -> 4: nothing to choose, no mask
        'layer': (4,), 'hidden': (64,), 'kv': (4, 2), 'intermediate': (4, 80)}
    with torch.no_grad():
        for p in m.log_alpha.values():
            p.normal_()
    z, _, _ = m('target')
    assert (z['layer'] != 0).sum() == 3 and (z['hidden'] != 0).sum() == 48
    assert ((z['kv'] != 0).sum(-1) == 1).all() and 'query' not in z
    assert ((z['intermediate'] != 0).sum(-1) == 40).all()


def test_expected_params_equal_source_when_all_kept_and_target_when_exact():
    m = make(TARGET)
    ones = {s.name: torch.ones(s.shape) for s in m.structures}
    assert M.expected_shape(m.source, ones)['expected/num_params'].item() == m.source.num_params()
    z, _, _ = m('target')
    kept = {k: (v != 0).float() for k, v in z.items()}
    assert M.expected_shape(m.source, kept)['expected/num_params'].item() == m.target.num_params()


def test_lagrangian_closed_form_and_warmup():
    m = make(TARGET)
    with torch.no_grad():
        m.lambdas.fill_(0.5)
    z, lag, stats = m('sample', progress=0.5)
    expected = 0.0
    for s in m.structures:
        sparsity = 1 - M.expected_score(m.log_alpha[s.name].detach()).sum(-1) / s.size
        gap = sparsity - 0.5 * s.target_sparsity
        expected += (0.5 * gap + 0.5 * gap ** 2).mean().item()
        assert stats[f'target_sparsity/{s.name}'] == pytest.approx(0.5 * s.target_sparsity)
    assert lag.item() == pytest.approx(expected, rel=1e-5)


def test_one_step_moves_multipliers_so_the_penalty_grows():
    """Expected sparsity below target: gradient ascent on lambda makes lambda_1 negative and lambda_2 positive,
    so the Lagrangian penalty grows; the masks move toward more sparsity."""
    m = make(TARGET)
    DecoupledAdamW = pytest.importorskip('composer.optim').DecoupledAdamW  # the paper's optimizer (absent: compat)
    opt = DecoupledAdamW([{'params': list(m.log_alpha.values()), 'lr': 0.1},
                          {'params': [m.lambdas], 'lr': -0.1}], lr=0.1, weight_decay=0.0)
    _, lag0, stats0 = m('sample', progress=1.0)
    assert lag0.item() == 0.0
    lag0.backward()
    opt.step()
    pruned = [i for i, s in enumerate(m.structures) if s.target_sparsity > 0]
    assert (m.lambdas[pruned, 0] < 0).all() and (m.lambdas[pruned, 1] > 0).all()
    opt.zero_grad()
    _, lag1, stats1 = m('sample', progress=1.0)
    assert lag1.item() > 0
    lag1.backward()
    opt.step()
    _, _, stats2 = m('sample', progress=1.0)
    for i in pruned:
        name = m.structures[i].name
        assert stats2[f'expected_sparsity/{name}'] > stats0[f'expected_sparsity/{name}']


def test_a_structure_kept_whole_has_no_mask_and_no_constraint():
    """Targets equal to the source size (4 -> 4 layers, 4 query slots) get no mask: at the upper clamp the expected
    sparsity is 0.002, so a constraint toward 0 could never be met and its multiplier would grow without bound."""
    m = make({**TARGET, 'num_hidden_layers': 4})
    assert [s.name for s in m.structures] == ['hidden', 'kv', 'intermediate']
    assert m.lambdas.shape == (3, 2)
    _, lag, stats = m('sample', progress=1.0)
    assert not any(k.endswith('/layer') or k.endswith('/query') for k in stats)
    assert stats['expected/num_hidden_layers'] == 4  # counted as fully kept


def test_export_reads_a_checkpoint_that_still_has_a_mask_for_a_structure_kept_whole():
    """Checkpoints written before full-target structures lost their mask (a `query` mask for 4 -> 4 slots and its
    multiplier row) load into the new module: that mask is dropped, the others and their multipliers are kept."""
    from composer_shear.export import masks_from_state
    m = make(TARGET)
    with torch.no_grad():
        for p in m.log_alpha.values():
            p.normal_()
        m.lambdas.normal_()
    sd = m.state_dict()
    old = dict(sd)
    old['log_alpha.query'] = torch.full((4, 4), M.LOG_ALPHA_MAX)
    old['lambdas'] = torch.cat([sd['lambdas'][:3], torch.tensor([[52.6, 0.0]]), sd['lambdas'][3:]])  # query's row
    back = masks_from_state(m.source, old)
    assert back.state_dict().keys() == sd.keys()
    for k, v in back.state_dict().items():
        assert torch.equal(v, sd[k]), k


def _cast_like_fsdp(masks, dtype=torch.bfloat16):
    """What FSDP mixed precision does to the module for a forward: the parameters' values cast to `dtype`."""
    for p in masks.parameters():
        p.data = p.data.to(dtype)


def test_cast_parameters_select_and_penalise_with_their_exact_fp32_values():
    """Under FSDP mixed precision the forward sees bf16 parameters; the masks, the Lagrangian and the statistics come
    from the fp32 values (refresh_fp32), and gradients still reach the cast parameters."""
    source = ModelShape.from_config(llama_config())
    target = source.replace(intermediate_size=source.intermediate_size // 2)
    exact = ShearMasks(source, target, ['intermediate'])
    size = source.intermediate_size
    with torch.no_grad():  # ascending logits 5e-5 apart: bf16 rounds them all to 3.0, so a tie keeps the first half
        logits = exact.log_alpha['intermediate']
        logits.copy_(3.0 + 5e-5 * torch.arange(size).expand_as(logits))
        exact.lambdas.copy_(torch.tensor([[0.3001, 0.7003]]))
    cast = ShearMasks(source, target, ['intermediate'])
    cast.load_state_dict(exact.state_dict())
    M.refresh_fp32(cast)
    _cast_like_fsdp(cast)
    want, got = exact('target')[0]['intermediate'], cast('target')[0]['intermediate']
    assert torch.equal(got, want)
    assert torch.equal(want[:, size // 2:], torch.ones_like(want[:, size // 2:]))  # the larger half
    rounded = M.deterministic(cast.log_alpha['intermediate'].float(), target.intermediate_size, binary=True)
    assert not torch.equal(rounded, want)  # what reading the cast values would have kept
    (_, lag_exact, stats_exact), (_, lag_cast, stats_cast) = (m('sample', progress=0.5) for m in (exact, cast))
    assert lag_cast.dtype == torch.float32 and torch.equal(lag_cast, lag_exact)
    assert torch.equal(stats_cast['expected/num_params'], stats_exact['expected/num_params'])
    lag_cast.backward()
    lag_exact.backward()
    for a, b in ((cast.lambdas, exact.lambdas), (cast.log_alpha['intermediate'], exact.log_alpha['intermediate'])):
        assert a.grad is not None and a.grad.dtype == torch.bfloat16
        torch.testing.assert_close(a.grad.float(), b.grad, rtol=1e-2, atol=1e-6)


def test_cast_parameters_without_a_fresh_fp32_copy_are_refused():
    source = ModelShape.from_config(llama_config())
    masks = ShearMasks(source, source.replace(intermediate_size=source.intermediate_size // 2), ['intermediate'])
    _cast_like_fsdp(masks)
    with pytest.raises(RuntimeError, match='clamp_masks'):
        masks('target')
    M.refresh_fp32(masks)  # a copy of the cast values: consistent, so accepted
    masks('target')
    with torch.no_grad():
        masks.log_alpha['intermediate'].add_(0.5)  # an optimizer step without clamp_masks afterwards
    with pytest.raises(RuntimeError, match='stale'):
        masks('sample', progress=1.0)
