"""ShearPruning inside Composer's Trainer on a tiny GQA model (in-process, CPU)."""

import json
import subprocess
import sys

import pytest
import torch
from composer.loggers import InMemoryLogger
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from composer_shear.algorithm import ShearPruning
from composer_shear.errors import ConfigError, ShapeError
from tests.common.train_tiny import TARGET, run


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp('train')
    logger = InMemoryLogger()
    algo, snap = run(out, steps=120, loggers=[logger])
    return out, algo, snap, logger


def test_expected_shape_reaches_target(trained):
    _, algo, _, _ = trained
    for field, value in TARGET.items():
        got = float(algo.stats[f'expected/{field}'])
        assert abs(got - value) <= 0.05 * value, (field, got, value)


def test_losses_and_pruning_metrics_are_logged(trained):
    _, _, _, logger = trained
    for key in ('loss/train/ce', 'loss/train/lag', 'loss/train/total', 'pruning/expected/num_params',
                'pruning/lambda_1/hidden', 'pruning/lambda_2/kv', 'pruning/target_sparsity/intermediate',
                'pruning/expected/num_key_value_heads'):
        assert key in logger.data, key
    ce = [float(v) for _, v in logger.data['loss/train/ce']]
    total = [float(v) for _, v in logger.data['loss/train/total']]
    lag = [float(v) for _, v in logger.data['loss/train/lag']]
    assert all(abs(t - c - g) < 1e-4 * max(1, abs(t)) for t, c, g in zip(total, ce, lag, strict=True))
    # the warm-up: targets rise linearly over 30 batches
    tgt = [float(v) for _, v in logger.data['pruning/target_sparsity/hidden']]
    assert tgt[0] == pytest.approx(0.25 * 0 / 30) and tgt[-1] == pytest.approx(0.25)
    assert tgt[15] == pytest.approx(0.25 * 15 / 30)


def test_param_groups(trained):
    out, _, _, _ = trained
    ckpt = torch.load(out / 'ckpt' / 'latest-rank0.pt', map_location='cpu', weights_only=False)
    groups = ckpt['state']['optimizers']['DecoupledAdamW']['param_groups']
    assert [g['initial_lr'] for g in groups] == [1e-3, 1.0, -1.0]
    assert [g['weight_decay'] for g in groups[1:]] == [0.0, 0.0]
    algo_state = dict(ckpt['state']['algorithms'])['ShearPruning']
    assert json.loads(algo_state['shape'])['target']['hidden_size'] == 48  # one JSON string: see state_dict


def test_monitor_writes_mask_artifacts(trained):
    out, _, _, _ = trained
    for batch in (40, 80, 120):  # eval and checkpoint every 40 batches
        folder = out / 'ckpt' / 'pruning' / f'ba{batch}'
        report = json.loads((folder / 'shape_report.json').read_text())
        assert report['batch'] == batch
        assert report['deterministic']['hidden_size'] == TARGET['hidden_size']
        z = load_file(folder / 'masks.safetensors')
        assert int((z['z.hidden'] != 0).sum()) == TARGET['hidden_size']
        assert ((z['z.intermediate'] != 0).sum(-1) == TARGET['intermediate_size']).all()


def test_checkpoint_exports_to_exact_target(trained, tmp_path):
    out, _, snap, _ = trained
    dest = tmp_path / 'pruned'
    cmd = [sys.executable, '-m', 'composer_shear.cli', 'export', '--checkpoint',
           str(out / 'ckpt' / 'latest-rank0.pt'), '--out', str(dest)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    model = AutoModelForCausalLM.from_pretrained(dest)
    for field, value in TARGET.items():
        assert getattr(model.config, field) == value
    assert sum(p.numel() for p in model.parameters()) == snap.target.num_params()
    assert (dest / 'tokenizer.json').exists()
    # the exported masks are the run's final deterministic masks
    z = load_file(dest / 'masks.safetensors')
    for name, value in snap.z.items():
        torch.testing.assert_close(z[f'z.{name}'], value)
    res = subprocess.run([sys.executable, '-m', 'composer_shear.cli', 'inspect', str(dest / 'masks.safetensors')],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and '| target | 3 | 48 | 4 | 1 | 40 |' in res.stdout, res.stdout + res.stderr


def test_export_refuses_to_overwrite_and_leaves_nothing_partial(trained, tmp_path):
    from composer_shear.export import ExportError, export_checkpoint
    out, _, _, _ = trained
    ckpt = out / 'ckpt' / 'latest-rank0.pt'
    dest = tmp_path / 'existing'
    dest.mkdir()
    (dest / 'keep.txt').write_text('precious')
    with pytest.raises(ExportError, match='already exists'):
        export_checkpoint(ckpt, dest)
    assert (dest / 'keep.txt').read_text() == 'precious'
    with pytest.raises(ExportError, match='does not exist'):
        export_checkpoint(tmp_path / 'missing.pt', tmp_path / 'x')
    bad = tmp_path / 'bad.pt'
    torch.save({'weights': 1}, bad)
    with pytest.raises(ExportError, match='not a Composer checkpoint'):
        export_checkpoint(bad, tmp_path / 'y')
    assert not (tmp_path / 'y').exists() and not (tmp_path / 'x').exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []


@pytest.mark.parametrize('kwargs, error, message', [
    ({'target': dict(TARGET, hidden_size=128)}, ShapeError, 'target.hidden_size=128 exceeds'),
    ({'target': dict(TARGET, num_attention_heads=3, num_key_value_heads=2)}, ShapeError, 'not a multiple'),
    ({'target': dict(TARGET, num_key_value_heads=4, num_attention_heads=4)}, ShapeError,
     'num_key_value_heads=4 exceeds'),
    ({'modules': ['head', 'layers']}, ConfigError, "shear_pruning.pruning_modules: 'layers' is unknown"),
])
def test_bad_input_fails_before_training(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        run(tmp_path, steps=2, **kwargs)
    assert not list(tmp_path.glob('ckpt/**/*.pt'))


def test_bad_algorithm_keys():
    with pytest.raises(ConfigError, match='target is required'):
        ShearPruning()
    with pytest.raises(ConfigError, match='lagrangian_warmup'):
        ShearPruning(target={'preset': '1.3b'}, lagrangian_warmup='soon')
    with pytest.raises(ConfigError, match='init.temperature is unknown'):
        ShearPruning(target={'preset': '1.3b'}, init={'temperature': 1})
    with pytest.raises(ConfigError, match='init.from must be one of constant, activations'):
        ShearPruning(target={'preset': '1.3b'}, init={'from': 'weights'})
    for bad in (0, 2.5, True):
        with pytest.raises(ConfigError, match=f'init.batches must be a positive integer, got {bad!r}'):
            ShearPruning(target={'preset': '1.3b'}, init={'from': 'activations', 'batches': bad})
    with pytest.raises(ConfigError, match='multiplier_update must be one of adam, ascent'):
        ShearPruning(target={'preset': '1.3b'}, multiplier_update='sgd')
    with pytest.raises(ConfigError, match='mask_values must be one of binary, soft'):
        ShearPruning(target={'preset': '1.3b'}, mask_values='hard')
    with pytest.raises(ConfigError, match='mask_lr_schedule must be one of model, constant'):
        ShearPruning(target={'preset': '1.3b'}, mask_lr_schedule='cosine')
    with pytest.raises(TypeError, match='target_sparsity'):
        ShearPruning(target={'preset': '1.3b'}, target_sparsity=0.5)


def test_not_llama_family(tmp_path):
    from composer import Trainer
    from composer.models import HuggingFaceModel
    from transformers import GPT2Config, GPT2LMHeadModel
    model = HuggingFaceModel(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)))
    with pytest.raises(ShapeError, match="model_type 'gpt2' is not LLaMA-family"):
        Trainer(model=model, algorithms=[ShearPruning(target={'hidden_size': 8})], device='cpu')


def test_init_from_activations_starts_at_the_oneshot_selection_of_the_first_batch(tmp_path):
    """init.from activations: after the first step (mask learning rate ~0), the exact-target masks are the one-shot
    selection of that step's batch, every pruned structure's expected sparsity is its target (1e-4), and the target
    applies from step 0 (no warm-up)."""
    from composer_shear.masks import structures_for
    from composer_shear.oneshot import importance, oneshot_masks
    from composer_shear.shapes import ModelShape
    from composer_shear.testing import Tokens
    algo, snap = run(tmp_path, steps=1, lag_lr=1e-12, init={'from': 'activations'}, warmup='30ba', batch=4)
    source = AutoModelForCausalLM.from_pretrained(tmp_path / 'source', attn_implementation='sdpa').eval()
    shape = ModelShape.from_config(source.config)
    first = Tokens(256, 32, source.config.vocab_size).ids[:4]  # the first batch (no shuffling, one rank)
    want = oneshot_masks(importance(source, [first]), shape, algo.target_shape, algo.pruning_modules)
    for s in structures_for(snap.source, snap.target, algo.pruning_modules):
        assert torch.equal((snap.z[s.name] != 0).float(), want[s.name]), s.name
        # a structure kept whole (target = size) stops at the upper clamp: expected sparsity 0.002, not 0
        tol = 1e-4 if s.target < s.size else 2.1e-3
        assert abs(float(algo.stats[f'expected_sparsity/{s.name}']) - s.target_sparsity) < tol, s.name
        assert float(algo.stats[f'target_sparsity/{s.name}']) == pytest.approx(s.target_sparsity)
    assert not torch.equal(want['intermediate'], want['intermediate'][[1, 0]])  # the layers' selections differ


def test_init_from_the_first_batches_of_the_dynamic_loader(tmp_path):
    """init.batches 3 with dynamic_text: the masks are the one-shot selection of the run's first 3 batches (read
    ahead by the loader's peek); with a loader that cannot read ahead, the key is named before any step."""
    from composer_shear.data.dynamic import build_dynamic_text_dataloader
    from composer_shear.masks import structures_for
    from composer_shear.oneshot import importance, oneshot_masks
    from composer_shear.shapes import ModelShape
    from composer_shear.testing import write_domains
    data = write_domains(tmp_path / 'mds', {'a': 60, 'b': 40}, seq=32)  # token ids < 60: inside the vocabulary

    def dynamic():
        return build_dynamic_text_dataloader(None, 4, dict(local=str(data), domains=['a', 'b'], proportions=[0.5, 0.5],
                                                           epoch_size=8, max_seq_len=32), num_workers=0).dataloader
    first = torch.cat([b['input_ids'] for b in dynamic().dataset.peek(3)])
    assert first.shape == (12, 32) and len(set(first[:, 1].tolist())) > 4  # 3 batches over 2 intervals
    algo, snap = run(tmp_path, steps=1, lag_lr=1e-12, init={'from': 'activations', 'batches': 3}, batch=4,
                     train_loader=dynamic())
    source = AutoModelForCausalLM.from_pretrained(tmp_path / 'source', attn_implementation='sdpa').eval()
    shape = ModelShape.from_config(source.config)
    want = oneshot_masks(importance(source, [first]), shape, algo.target_shape, algo.pruning_modules)
    one = oneshot_masks(importance(source, [first[:4]]), shape, algo.target_shape, algo.pruning_modules)
    assert any(not torch.equal(want[k], one[k]) for k in want)  # 3 batches select otherwise than the first alone
    for s in structures_for(snap.source, snap.target, algo.pruning_modules):
        assert torch.equal((snap.z[s.name] != 0).float(), want[s.name]), s.name
    with pytest.raises(ConfigError, match='init.batches: 3 needs the dynamic_text train loader'):
        run(tmp_path / 'plain', steps=1, init={'from': 'activations', 'batches': 3}, batch=4)


@pytest.mark.parametrize('schedule', ['model', 'constant'])
def test_mask_lr_schedule(tmp_path, schedule):
    """mask_lr_schedule: the mask and multiplier groups step at +-lag_lr times the run's schedule factor (model, the
    paper's) or at +-lag_lr at every step (constant), while the model's group follows the cosine schedule."""
    from composer.core import Callback

    class Rates(Callback):
        def __init__(self):
            self.seen = []

        def before_forward(self, state, logger):
            self.seen.append([g['lr'] for g in state.optimizers[0].param_groups])
    rates = Rates()
    run(tmp_path, steps=4, lag_lr=0.5, save_interval='4ba', eval_interval='4ba', mask_lr_schedule=schedule,
        callbacks=[rates])
    assert len(rates.seen) == 8  # 4 steps x 2 microbatches
    factors = [lrs[0] / 1e-3 for lrs in rates.seen[::2]]
    assert factors[0] == pytest.approx(1.0) and factors[-1] <= 0.5  # the cosine decays the model's rate
    for f, lrs in zip(factors, rates.seen[::2], strict=True):
        scale = f if schedule == 'model' else 1.0
        assert lrs[1:] == pytest.approx([0.5 * scale, -0.5 * scale], rel=1e-12)


@pytest.mark.parametrize('update', ['adam', 'ascent'])
def test_multiplier_update(tmp_path, update):
    """After one step from lambda = 0 at the full target (no warm-up, constant learning rates): plain ascent moves
    lambda_1 by lag_lr times the constraint gap (mean over rows of expected minus target sparsity, as logged) and
    lambda_2 of a one-row structure by lag_lr times the gap squared (rel 1e-5); Adam moves every multiplier by about
    lag_lr whatever the gap. Ascent keeps the multipliers out of the optimizer."""
    algo, snap = run(tmp_path, steps=1, lag_lr=0.5, warmup='0ba', schedule=None, save_interval='1ba',
                     eval_interval='1ba', multiplier_update=update)
    names = list(snap.log_alpha)  # the structures, in the multipliers' row order
    ckpt = torch.load(tmp_path / 'ckpt' / 'latest-rank0.pt', map_location='cpu', weights_only=False)
    groups = ckpt['state']['optimizers']['DecoupledAdamW']['param_groups']
    assert [g['initial_lr'] for g in groups] == ([1e-3, 0.5, -0.5] if update == 'adam' else [1e-3, 0.5])
    for i, name in enumerate(names):
        gap = float(algo.stats[f'expected_sparsity/{name}']) - float(algo.stats[f'target_sparsity/{name}'])
        assert gap < -0.05, name  # everything is kept at step 1: far below the target
        lam1, lam2 = snap.lambdas[i].tolist()
        if update == 'ascent':
            assert lam1 == pytest.approx(0.5 * gap, rel=1e-5), name
            if name in ('layer', 'hidden'):  # one row: the mean of gap^2 is gap^2
                assert lam2 == pytest.approx(0.5 * gap * gap, rel=1e-5), name
        else:
            assert lam1 == pytest.approx(-0.5, rel=1e-3) and lam2 == pytest.approx(0.5, rel=1e-3), name
