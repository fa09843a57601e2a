"""The two stages of a learned recipe as one run (issue 26): one learning-rate schedule across pruning and continued
pre-training, the continued stage's loader going on where pruning stopped, a settled phase that trains exactly what
export keeps, and mask logits whose wider range keeps the importance start near certainty."""

import json
import math

import pytest
import torch
from composer import Callback, Trainer
from composer.optim import CosineAnnealingWithWarmupScheduler, DecoupledAdamW
from llmfoundry.models.hf import ComposerHFCausalLM
from transformers import AutoTokenizer

from composer_shear.algorithm import ShearPruning
from composer_shear.data.callback import DynamicLoading
from composer_shear.data.dynamic import build_dynamic_text_dataloader, domain_evaluators
from composer_shear.data.reference import eval_loss
from composer_shear.errors import ConfigError
from composer_shear.export import export_checkpoint
from composer_shear.masks import below_half, sample, selection_log_alpha
from composer_shear.schedule import StagedCosineWithWarmup, staged_cosine
from composer_shear.testing import TARGET, save_tiny, write_domains

DOMAINS, SEQ, BATCH, PEAK = ['a', 'b'], 16, 4, 1e-3
STEPS = 8  # per stage; one loader interval (and evaluation) every 4 steps


class Record(Callback):
    """Per step: the weights' learning rate, the samples read (domain, index: write_domains' rows are [d, i, ...]),
    the mask logits and multipliers after the step, and the pruning statistics of the step."""

    def __init__(self):
        self.lr, self.rows, self.masks, self.stats = [], [], [], []
        self.installed, self.grads = {}, {}  # per step: the masks the training forward used; mask params with grads

    def after_dataloader(self, state, logger):
        self.lr.append(state.optimizers[0].param_groups[0]['lr'])
        self.rows += [tuple(r) for r in state.batch['input_ids'][:, :2].tolist()]

    def fit_start(self, state, logger):
        if any(isinstance(a, ShearPruning) for a in state.algorithms):  # see what the algorithm installs
            hooks = ShearPruning.masks(state).hooks
            install = hooks.set

            def spy(z):
                self.last = z
                install(z)
            hooks.set = spy

    def before_forward(self, state, logger):  # after the algorithm's BEFORE_FORWARD
        if any(isinstance(a, ShearPruning) for a in state.algorithms):
            self.installed[int(state.timestamp.batch)] = {k: v.detach().clone() for k, v in self.last.items()}

    def after_backward(self, state, logger):
        if any(isinstance(a, ShearPruning) for a in state.algorithms):
            m = ShearPruning.masks(state)
            self.grads[int(state.timestamp.batch)] = all(p.grad is not None for p in m.parameters())

    def batch_end(self, state, logger):
        algo = next((a for a in state.algorithms if isinstance(a, ShearPruning)), None)
        if algo is not None:
            m = ShearPruning.masks(state)
            self.masks.append({k: v.detach().clone() for k, v in m.state_dict().items()})
            self.stats.append({k: float(v) for k, v in algo.stats.items()})


def stage(folder, model_dir, data, start, algorithms=(), callbacks=(), steps=STEPS, **dynamic):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = ComposerHFCausalLM(tok, pretrained_model_name_or_path=str(model_dir), pretrained=True,
                               attn_implementation='sdpa', use_train_metrics=False)
    train = build_dynamic_text_dataloader(tok, BATCH, dict(local=str(data), domains=DOMAINS, proportions=[0.5, 0.5],
                                                           epoch_size=4 * BATCH, max_seq_len=SEQ), num_workers=0)
    callback = DynamicLoading(DOMAINS, [0.5, 0.5], [2.0, 2.0], history_file=str(folder / 'dynamic_loading.json'),
                              **dynamic)
    record = Record()
    trainer = Trainer(model=model, optimizers=DecoupledAdamW(model.parameters(), lr=PEAK, weight_decay=0.0),
                      schedulers=StagedCosineWithWarmup('2ba', f'{2 * STEPS}ba', 0.1, f'{start}ba'),
                      train_dataloader=train, eval_dataloader=domain_evaluators(str(data), DOMAINS, BATCH, SEQ),
                      eval_interval='1ep', max_duration=f'{steps}ba', algorithms=list(algorithms),
                      callbacks=[callback, record, *callbacks], device='cpu', precision='fp32', seed=17,
                      progress_bar=False, log_to_console=False, save_folder=str(folder / 'ckpt'),
                      save_interval=f'{steps}ba',
                      save_latest_filename='latest-rank{rank}.pt', run_name=folder.name)
    trainer.fit()
    losses = {d: float(trainer.state.eval_metrics[d]['LanguageCrossEntropy'].compute()) for d in DOMAINS}
    trainer.close()
    return record, losses, callback


@pytest.fixture(scope='module')
def two_stages(tmp_path_factory):
    root = tmp_path_factory.mktemp('fair')
    source = save_tiny(root / 'source')
    data = write_domains(root / 'data', {'a': 80, 'b': 80}, seq=SEQ)
    write_domains(root / 'data', {'a': 12, 'b': 12}, seq=SEQ, split='eval')
    pruning = ShearPruning(target=TARGET, init={'from': 'activations', 'batches': 2}, eval_target_shape=True,
                           settle='4ba', log_alpha_max=math.log(1e4))
    first, in_loop, _ = stage(root / 'prune', source, data, 0, [pruning])
    export_checkpoint(root / 'prune' / 'ckpt' / 'latest-rank0.pt', root / 'pruned', source=str(source))
    second, _, cont = stage(root / 'continue', root / 'pruned', data, STEPS,
                            continue_from=str(root / 'prune' / 'dynamic_loading.json'))
    return dict(root=root, data=data, first=first, second=second, in_loop=in_loop, cont=cont, pruning=pruning)


@pytest.mark.slow
def test_one_schedule_across_the_stages(two_stages):
    """The weights' learning rate over both stages is the one warm-up + cosine over 16 steps that a single
    uninterrupted Composer run steps with (Composer sets step k + 1's rate after step k: f(0), f(0), f(1), ...)."""
    lrs = two_stages['first'].lr + two_stages['second'].lr
    assert lrs == pytest.approx([PEAK * staged_cosine(max(i - 1, 0), 2, 16, 0.1) for i in range(16)], rel=1e-9)


def test_schedule_matches_composer_and_refuses_bad_times():
    """With t_start 0 the schedule is Composer's cosine_with_warmup; times must be batches, the stage must fit."""
    class At:
        def __init__(self, batch, end=30):
            from composer.core import Time, Timestamp
            self.timestamp, self.max_duration = Timestamp(batch=batch), Time.from_timestring(f'{end}ba')
            self.optimizers = []

    ours = StagedCosineWithWarmup('3ba', '30ba', 0.1)
    theirs = CosineAnnealingWithWarmupScheduler(t_warmup='3ba', t_max='30ba', alpha_f=0.1)
    for b in range(30):
        assert ours(At(b)) == pytest.approx(theirs(At(b)), abs=1e-12), b
    with pytest.raises(ConfigError, match='scheduler.t_max must be in batches'):
        StagedCosineWithWarmup('3ba', '1dur')
    with pytest.raises(ConfigError, match='past t_max 30ba'):
        StagedCosineWithWarmup('3ba', '30ba', t_start='20ba')(At(0, end=20))


@pytest.mark.slow
def test_continued_stage_reads_on_where_pruning_stopped(two_stages):
    """No replay: per domain, the continued stage reads the samples that follow, in the pruning stage's permutation,
    the last one pruning read (its first sample of each domain is the next one), and none of pruning's."""
    from composer_shear.data.plan import permutation
    first, second = two_stages['first'].rows, two_stages['second'].rows
    assert not set(first) & set(second)
    for d in range(len(DOMAINS)):
        perm = permutation(17, d, 0, 80).tolist()
        a = [i for dd, i in first if dd == d]
        b = [i for dd, i in second if dd == d]
        assert sorted(a) == sorted(perm[:len(a)]) and sorted(b) == sorted(perm[len(a):len(a) + len(b)]), d
    saved = json.loads((two_stages['root'] / 'prune' / 'dynamic_loading.json').read_text())['loader']
    assert saved['seed'] == 17 and saved['sizes'] == [80, 80] and sum(saved['cursor']['offsets']) == len(first)


@pytest.mark.slow
def test_settled_phase_changes_no_mask_and_export_scores_the_last_eval(two_stages):
    """settle 4ba: over the last 4 pruning steps no mask logit or multiplier moves (Adam's momentum included), and
    the exported model's loss on each domain's whole eval split equals the final in-loop evaluation (exact-target
    masks) to 1e-5."""
    first = two_stages['first']
    masks = first.masks
    assert any(not torch.equal(masks[0][k], masks[3][k]) for k in masks[0])  # they moved before settling
    for k in masks[3]:
        assert torch.equal(masks[3][k], masks[-1][k]), k
    # the settled steps trained with the exact-target masks export keeps, every mask parameter with a gradient
    # (zero: Adam's momentum alone would still move them without the learning rate at 0; DDP needs one per parameter)
    from composer_shear.export import load_any_masks
    exact = load_any_masks(two_stages['root'] / 'pruned').snapshot().z
    for step in range(STEPS - 4, STEPS):
        assert set(first.installed[step]) == set(exact), step
        for name, z in first.installed[step].items():
            assert torch.equal(z, exact[name]), (step, name)
    assert all(first.grads[step] for step in range(STEPS))
    from transformers import AutoModelForCausalLM
    pruned = AutoModelForCausalLM.from_pretrained(two_stages['root'] / 'pruned', torch_dtype=torch.float32)
    for d in DOMAINS:
        loss, _ = eval_loss(pruned, str(two_stages['data']), d, SEQ)
        assert loss == pytest.approx(two_stages['in_loop'][d], abs=1e-5), d


@pytest.mark.slow
def test_wider_logit_range_starts_kept_structures_near_certainty(two_stages):
    """With log_alpha_max ln 1e4 the importance start keeps every selected structure below 0.5 on under 0.3 % of
    draws (logged per structure), against about 11 % for a KV group at the paper's ln 100."""
    stats = two_stages['first'].stats[0]
    below = {k: v for k, v in stats.items() if k.startswith('kept_below_half/')}
    assert below and all(v < 3e-3 for v in below.values()), below
    keep = torch.tensor([1.0, 1.0, 0.0])  # 3 -> 2 KV groups at the paper's range
    assert float(below_half(selection_log_alpha(keep, 2)[0])) == pytest.approx(0.106, abs=0.005)


def test_below_half_is_the_sampled_fraction():
    """below_half(log alpha) is the fraction of hard-concrete draws below 0.5 (200k draws, 4 standard errors)."""
    log_alpha = torch.tensor([-1.0, 0.5, 2.1, 3.1])
    draws = sample(log_alpha.expand(200_000, 4), torch.Generator().manual_seed(0))
    measured = (draws < 0.5).float().mean(0)
    se = (below_half(log_alpha) * (1 - below_half(log_alpha)) / 200_000).sqrt()
    assert ((measured - below_half(log_alpha)).abs() < 4 * se + 1e-6).all(), (measured, below_half(log_alpha))


@pytest.mark.slow
def test_continue_from_choices_and_bad_input(two_stages, tmp_path):
    """initial: initial_mix starts at initial_proportions, pruning_end at the previous stage's final weights; a
    missing file, a stage that did not finish, pruning_end alone and an unknown choice are named."""
    history = two_stages['root'] / 'prune' / 'dynamic_loading.json'
    saved = json.loads(history.read_text())
    assert two_stages['cont'].initial == [0.5, 0.5]
    end = DynamicLoading(DOMAINS, [0.5, 0.5], [2.0, 2.0], continue_from=str(history), initial='pruning_end')
    assert end.weights.tolist() == pytest.approx(saved['history'][-1]['weights'])
    with pytest.raises(ConfigError, match='continue_from .*no such file'):
        DynamicLoading(DOMAINS, [0.5, 0.5], [2.0, 2.0], continue_from=str(tmp_path / 'none.json'))
    unfinished = tmp_path / 'unfinished.json'
    unfinished.write_text(json.dumps({k: v for k, v in saved.items() if k != 'loader'}))
    with pytest.raises(ConfigError, match='did not finish'):
        DynamicLoading(DOMAINS, [0.5, 0.5], [2.0, 2.0], continue_from=str(unfinished))
    with pytest.raises(ConfigError, match='pruning_end needs continue_from'):
        DynamicLoading(DOMAINS, [0.5, 0.5], [2.0, 2.0], initial='pruning_end')
    with pytest.raises(ConfigError, match='dynamic_loading.initial must be one of'):
        DynamicLoading(DOMAINS, [0.5, 0.5], [2.0, 2.0], continue_from=str(history), initial='end')
    with pytest.raises(ConfigError, match='differ from dynamic_loading.domains'):
        DynamicLoading(['b', 'a'], [0.5, 0.5], [2.0, 2.0], continue_from=str(history))


@pytest.mark.slow
def test_continue_from_refuses_other_data_or_seed(two_stages):
    """The cursors only mean the same sequences with the same data seed and the same prepared data."""
    history = two_stages['root'] / 'prune' / 'dynamic_loading.json'
    cb = DynamicLoading(DOMAINS, [0.5, 0.5], [2.0, 2.0], continue_from=str(history))

    class Data:
        seed, sizes = 18, [80, 80]
    with pytest.raises(ConfigError, match='train_loader.dataset.seed 17, this one with 18'):
        cb._carry_on(Data())
    Data.seed, Data.sizes = 17, [80, 81]
    with pytest.raises(ConfigError, match='continue on the same prepared data'):
        cb._carry_on(Data())


@pytest.mark.parametrize('bad, message', [({'settle': '1.0dur'}, 'settle must be'), ({'settle': 'x'}, 'settle'),
                                          ({'log_alpha_max': 0}, 'log_alpha_max must be a positive number'),
                                          ({'log_alpha_max': float('inf')}, 'log_alpha_max must be a positive')])
def test_bad_pruning_options_are_named(bad, message):
    with pytest.raises(ConfigError, match=message):
        ShearPruning(target=TARGET, **bad)


@pytest.mark.slow
def test_adam_state_carries_over_export(two_stages, tmp_path):
    """export --optimizer-state writes the kept weights' Adam moments (exactly the source's at the kept hidden dims,
    layers and MLP channels, layers renumbered) and the step count; carry_optimizer_state puts them into the
    continued stage's optimizer before its first step, which then counts on from the pruning stage's steps."""
    from composer_shear.export import load_any_masks
    from composer_shear.optim_state import CarryOptimizerState, load_moments, read_adam_moments
    root = two_stages['root']
    ckpt = root / 'prune' / 'ckpt' / 'latest-rank0.pt'
    export_checkpoint(ckpt, tmp_path / 'pruned', source=str(root / 'source'), optimizer_state=True)
    first, second, step = load_moments(tmp_path / 'pruned')
    src_first, src_second, src_step = read_adam_moments(ckpt)
    assert step == src_step == STEPS
    z = load_any_masks(tmp_path / 'pruned').snapshot().z
    hidden = z['hidden'] != 0
    assert int(hidden.sum()) == TARGET['hidden_size']
    layers = (z['layer'] != 0).nonzero().flatten().tolist()
    assert len(layers) == TARGET['num_hidden_layers'] < len(z['layer'])  # layers renumbered
    pairs = [('model.norm.weight', 'model.norm.weight', (hidden,)),
             ('model.embed_tokens.weight', 'model.embed_tokens.weight', (slice(None), hidden))]
    for i, old in enumerate(layers):  # down_proj: kept hidden rows, the layer's kept MLP channels
        pairs.append((f'model.layers.{i}.mlp.down_proj.weight', f'model.layers.{old}.mlp.down_proj.weight',
                      (hidden.nonzero().flatten()[:, None], (z['intermediate'][old] != 0).nonzero().flatten())))
    for name, source_name, index in pairs:
        assert torch.equal(first[name], src_first[source_name][index]), name
        assert torch.equal(second[name], src_second[source_name][index]), name

    class Seen(Callback):
        def before_forward(self, state, logger):
            if int(state.timestamp.batch) == 0:
                params = dict(state.model.model.named_parameters())
                opt = state.optimizers[0]
                self.state = {k: {n: v.clone() for n, v in opt.state[p].items()} for k, p in params.items()
                              if p in opt.state}

        def batch_end(self, state, logger):
            self.after = float(state.optimizers[0].state[state.model.model.model.norm.weight]['step'])
    seen = Seen()
    stage(tmp_path / 'continue', tmp_path / 'pruned', two_stages['data'], STEPS, steps=1,
          callbacks=[CarryOptimizerState(str(tmp_path / 'pruned')), seen])
    assert set(seen.state) == set(first)
    for name, s in seen.state.items():
        assert float(s['step']) == STEPS and torch.equal(s['exp_avg'], first[name]), name
    assert seen.after == STEPS + 1
    with pytest.raises(ConfigError, match='does not exist'):
        CarryOptimizerState(str(tmp_path))


def test_settle_length_is_checked_before_the_first_step():
    """settle is turned into the first settled batch at FIT_START: a fraction of a run in batches or epochs, batches
    that must leave some of the run to train the masks."""
    from composer.core import Time

    class At:
        def __init__(self, end, dataloader_len=None):
            self.max_duration, self.dataloader_len = Time.from_timestring(end), dataloader_len
    for settle, end, length, first in (('0.2dur', '100ba', None, 80), ('0.2dur', '3ep', 10, 24),
                                       ('5ba', '8ba', None, 3), ('0.25dur', '1000tok', None, None)):
        algo = ShearPruning(target=TARGET, settle=settle)
        algo._plan_settle(At(end, length))
        assert algo._settle_from == first, (settle, end)
    with pytest.raises(ConfigError, match='settle 8ba covers the whole run of 8 batches'):
        ShearPruning(target=TARGET, settle='8ba')._plan_settle(At('8ba'))
    with pytest.raises(ConfigError, match='settle 5ba in batches needs the run'):
        ShearPruning(target=TARGET, settle='5ba')._plan_settle(At('1000tok'))


def test_resume_refuses_another_logit_range():
    """A checkpoint trained with one log_alpha_max is not resumed with another (the clamp would move the masks)."""
    saved = ShearPruning(target=TARGET, log_alpha_max=9.21).state_dict()
    ShearPruning(target=TARGET, log_alpha_max=9.21).load_state_dict(saved)
    with pytest.raises(ConfigError, match='log_alpha_max is 4.6.* trained with 9.21'):
        ShearPruning(target=TARGET).load_state_dict(saved)
