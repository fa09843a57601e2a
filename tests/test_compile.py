"""``compile_config`` (torch.compile through Composer's Trainer) with shear_pruning and shear_distill."""

import json

import pytest
import torch

from tests.common import train_tiny

LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6  # fp32; the compiled graph may order a reduction differently (the KD term, ~1e-2
# here, is a sum of terms that cancel: measured 1.3e-7 apart at step 1)
MASK_ATOL = 1e-5  # mask logits and multipliers after 6 steps (their values are O(1) to O(10))


def test_a_compiled_run_has_no_graph_break_and_the_eager_losses_masks_and_multipliers(tmp_path):
    """6 steps of pruning + distillation with ``compile_config: {backend: aot_eager}`` (dynamo's capture and AOT
    autograd, without inductor's code generation, which bench/compile_step.py measures): the whole masked model is
    one graph per mode (train and eval), with no graph break anywhere (a hook or a mask op that dynamo cannot trace
    would split every decoder layer), and the losses, mask logits and multipliers of every step are the eager run's
    within fp32 tolerance (LOSS_RTOL, LOSS_ATOL, MASK_ATOL)."""
    from torch._dynamo.utils import counters

    kwargs = dict(steps=6, save_interval='6ba', eval_interval='3ba', warmup='2ba',
                  distill={'alpha': 0.5, 'temperature': 2.0})
    _, eager = train_tiny.run(tmp_path / 'eager', **kwargs)
    torch._dynamo.reset()
    counters.clear()
    _, compiled = train_tiny.run(tmp_path / 'compiled', compile_config={'backend': 'aot_eager'}, **kwargs)
    assert dict(counters['graph_break']) == {}
    assert counters['stats']['unique_graphs'] == 2  # the training forward and the evaluation forward
    losses = [json.loads((tmp_path / arm / 'losses-rank0.json').read_text()) for arm in ('eager', 'compiled')]
    assert losses[0].keys() == losses[1].keys() and len(losses[0]) == 6
    for step, terms in losses[0].items():
        assert set(terms) == {'ce', 'lag', 'kd', 'total'}
        for k, v in terms.items():
            assert losses[1][step][k] == pytest.approx(v, rel=LOSS_RTOL, abs=LOSS_ATOL), (step, k)
    for name, value in eager.log_alpha.items():
        torch.testing.assert_close(compiled.log_alpha[name], value, rtol=0, atol=MASK_ATOL)
    torch.testing.assert_close(compiled.lambdas, eager.lambdas, rtol=0, atol=MASK_ATOL)
    assert eager.lambdas.abs().sum() > 0  # the multipliers did move
