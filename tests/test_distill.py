"""shear_distill: the KD term against a hand computation, its composition with the CE and shear_pruning's Lagrangian,
a frozen teacher outside the model and the checkpoint, bad input before step 1."""

import math

import pytest
import torch

from composer_shear.distill import ShearDistill
from composer_shear.errors import ConfigError
from composer_shear.kd import compose_loss, distillation_loss, load_teacher
from composer_shear.testing import save_tiny
from tests.common import train_tiny


def hand_kl(p, q):
    """sum_i p_i (ln p_i - ln q_i) with plain Python floats."""
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q, strict=True))


def softmax(xs, t):
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


# batch 1, 4 positions, vocab 3; labels[0, 2] ignored, so position 1 (which predicts it) takes no loss
STUDENT = [[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0], [0.3, 0.1, -0.4]]]
TEACHER = [[[0.5, 2.5, 0.0], [1.0, 0.0, 0.0], [3.0, -1.0, 0.2], [9.0, 9.0, 9.0]]]
LABELS = [[5, 1, -100, 2]]


@pytest.mark.parametrize('temperature', [1.0, 2.0])
def test_kd_equals_a_hand_computed_kl(temperature):
    s, t, labels = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS)
    kd = distillation_loss(s, t, labels, temperature=temperature)
    # positions 0 and 2 predict labels 1 and 2 (kept); position 1 predicts the ignored one; position 3 predicts nothing
    kept = [0, 2]
    forward = [hand_kl(softmax(TEACHER[0][i], temperature), softmax(STUDENT[0][i], temperature)) for i in kept]
    assert kd.item() == pytest.approx(sum(forward) / 2 * temperature ** 2, rel=1e-6)
    reverse = [hand_kl(softmax(STUDENT[0][i], temperature), softmax(TEACHER[0][i], temperature)) for i in kept]
    rkd = distillation_loss(s, t, labels, temperature=temperature, kd_type='reverse_kl')
    assert rkd.item() == pytest.approx(sum(reverse) / 2 * temperature ** 2, rel=1e-6)


def autograd_kl(s, t, labels, temperature, kd_type):
    """The plain formula through autograd (what the fused forward/backward must equal)."""
    keep = labels[:, 1:] != -100
    ls = torch.log_softmax(s[:, :-1][keep] / temperature, -1)
    lt = torch.log_softmax(t[:, :-1][keep] / temperature, -1)
    per_token = (lt.exp() * (lt - ls)).sum(-1) if kd_type == 'forward_kl' else (ls.exp() * (ls - lt)).sum(-1)
    return per_token.mean() * temperature ** 2


@pytest.mark.parametrize('kd_type', ['forward_kl', 'reverse_kl'])
@pytest.mark.parametrize('temperature', [1.0, 2.0])
@pytest.mark.parametrize('head', [False, True])
def test_fused_gradient_equals_autograd_of_the_formula(kd_type, temperature, head, monkeypatch):
    """The fused loss and gradient, in blocks of 4 positions, with the teacher's logits given whole or made block by
    block from its hidden states by its output layer, against autograd of the formula on whole logits."""
    import composer_shear.kd as kd
    monkeypatch.setattr(kd, 'BLOCK_ELEMENTS', 4 * 40)  # blocks of 4 positions: several per sequence
    assert kd.block_rows(40) == 4
    gen = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(3, 11, 40, generator=gen)).requires_grad_(True)
    hidden = torch.randn(3, 11, 8, generator=gen)
    lm_head = torch.nn.Linear(8, 40, bias=False)
    torch.nn.init.normal_(lm_head.weight, std=1.0, generator=gen)
    with torch.no_grad():
        t = lm_head(hidden)
    labels = torch.randint(0, 40, (3, 11), generator=gen)
    labels[1, 4:] = -100   # a padded tail
    labels[2, 3] = -100    # one ignored token inside a sequence
    if head:
        got = distillation_loss(s, hidden, labels, temperature, kd_type, teacher_head=lm_head)
    else:
        got = distillation_loss(s, t, labels, temperature, kd_type)
    (g_got,) = torch.autograd.grad(got * 1.5, s)  # an upstream gradient other than 1
    want = autograd_kl(s, t, labels, temperature, kd_type)
    (g_want,) = torch.autograd.grad(want * 1.5, s)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-7)  # fp32
    assert g_got[1, 3:].abs().sum() == 0 and g_got[2, 2].abs().sum() == 0 and g_got[:, -1].abs().sum() == 0


def test_top_k_renormalises_the_teacher_over_its_top_tokens():
    s, t, labels = torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS)
    kd = distillation_loss(s, t, labels, top_k=2)
    total = 0.0
    for i in (0, 2):
        top = sorted(range(3), key=lambda j: -TEACHER[0][i][j])[:2]
        p = softmax([TEACHER[0][i][j] for j in top], 1.0)
        q_full = softmax(STUDENT[0][i], 1.0)
        total += sum(pj * (math.log(pj) - math.log(q_full[j])) for pj, j in zip(p, top, strict=True))
    assert kd.item() == pytest.approx(total / 2, rel=1e-6)
    # top_k = vocabulary is the full forward KL
    assert distillation_loss(s, t, labels, top_k=3).item() == pytest.approx(distillation_loss(s, t, labels).item(),
                                                                            rel=1e-6)


def test_kd_is_zero_for_identical_logits_and_has_no_teacher_gradient():
    s = torch.tensor(STUDENT, requires_grad=True)
    t = torch.tensor(STUDENT, requires_grad=True)
    kd = distillation_loss(s, t, torch.tensor(LABELS))
    assert abs(kd.item()) < 1e-7
    distillation_loss(s, torch.tensor(TEACHER), torch.tensor(LABELS)).backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    assert s.grad[0, 1].abs().sum() == 0 and s.grad[0, 3].abs().sum() == 0  # ignored and last positions


def test_all_positions_ignored_gives_zero_with_a_gradient_path():
    s = torch.tensor(STUDENT, requires_grad=True)
    kd = distillation_loss(s, torch.tensor(TEACHER), torch.full((1, 4), -100))
    assert kd.item() == 0.0
    kd.backward()
    assert s.grad.abs().sum() == 0


def test_compose_loss_weights_and_keeps_other_terms():
    ce = torch.tensor(2.0, requires_grad=True)
    kd = torch.tensor(0.5, requires_grad=True)
    assert compose_loss(ce, kd, 0.0)['total'] is ce  # alpha 0: exactly the CE, nothing added
    one = compose_loss(ce, kd, 1.0)
    one['total'].backward()
    assert ce.grad is None and kd.grad.item() == 1.0  # alpha 1: zero CE weight
    mixed = compose_loss(ce, kd, 0.25)
    assert mixed['total'].item() == pytest.approx(0.75 * 2.0 + 0.25 * 0.5)
    lag = torch.tensor(0.125)
    with_lag = compose_loss({'ce': ce, 'lag': lag, 'total': ce + lag}, kd, 0.25)
    assert set(with_lag) == {'ce', 'lag', 'kd', 'total'}
    assert with_lag['total'].item() == pytest.approx(0.75 * 2.0 + 0.25 * 0.5 + 0.125)
    with pytest.raises(ValueError, match='"ce"'):
        compose_loss({'total': ce}, kd, 0.5)


@pytest.mark.parametrize('kwargs, match', [
    ({'alpha': 1.5}, 'alpha must be a number in'),
    ({'alpha': -0.1}, 'alpha must be a number in'),
    ({'temperature': 0}, 'temperature'),
    ({'kd_type': 'js'}, 'kd_type'),
    ({'teacher_precision': 'fp16'}, 'teacher_precision'),
    ({'top_k': 0}, 'top_k'),
    ({'top_k': 5, 'kd_type': 'reverse_kl'}, 'top_k'),
    ({'teacher': 'no/such/folder'}, r'no/such/folder is not a Hugging Face model folder'),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ShearDistill(**kwargs)


def test_teacher_with_another_vocabulary_is_refused_before_step_1(tmp_path):
    save_tiny(tmp_path / 'other', vocab_size=128)
    with pytest.raises(ConfigError, match='vocabulary of 128 tokens, the student 96'):
        load_teacher(tmp_path / 'other', vocab_size=96)
    with pytest.raises(ConfigError, match='vocabulary of 128 tokens'):  # through the Trainer: at INIT
        train_tiny.run(tmp_path / 'run', steps=2, distill={'teacher': str(tmp_path / 'other')})
    assert not (tmp_path / 'run' / 'losses-rank0.json').exists()


def test_alpha_0_trains_bit_for_bit_as_without_distillation(tmp_path):
    plain = train_tiny.run(tmp_path / 'plain', steps=6, save_interval='6ba', eval_interval='6ba', warmup='2ba')[1]
    kd0 = train_tiny.run(tmp_path / 'kd0', steps=6, save_interval='6ba', eval_interval='6ba', warmup='2ba',
                         model_dir=tmp_path / 'plain' / 'source', distill={'alpha': 0.0})[1]
    for k in plain.log_alpha:
        assert torch.equal(plain.log_alpha[k], kd0.log_alpha[k]), k
    assert torch.equal(plain.lambdas, kd0.lambdas)
    a = torch.load(tmp_path / 'plain' / 'ckpt' / 'ep0-ba6-rank0.pt', weights_only=False)['state']['model']
    b = torch.load(tmp_path / 'kd0' / 'ckpt' / 'ep0-ba6-rank0.pt', weights_only=False)['state']['model']
    assert a.keys() == b.keys()  # no teacher weights in the checkpoint
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_teacher_frozen_outside_the_model_and_the_checkpoint_in_either_order(tmp_path):
    """With alpha 0.5 and shear_pruning: the teacher's weights do not change and get no gradient; it is not in the
    optimizer; the checkpoint is the size of one without distillation; the loss is (CE + KD) / 2 + lag whichever
    algorithm comes first in the list."""
    import json
    source = save_tiny(tmp_path / 'source')
    common = dict(steps=4, save_interval='4ba', eval_interval='4ba', warmup='2ba', model_dir=source)
    train_tiny.run(tmp_path / 'plain', **common)
    before = load_teacher(source).state_dict()
    runs = {}
    for first in (False, True):
        out = tmp_path / f'first{first}'
        train_tiny.run(out, distill={'alpha': 0.5}, distill_first=first, **common)
        runs[first] = json.loads((out / 'logged-rank0.json').read_text())  # as Composer logs them
        size = (out / 'ckpt' / 'ep0-ba4-rank0.pt').stat().st_size
        plain = (tmp_path / 'plain' / 'ckpt' / 'ep0-ba4-rank0.pt').stat().st_size
        assert abs(size - plain) < 4096, (size, plain)  # the teacher (~100 kB here) is not in it
    assert runs[False] == runs[True]
    for step, logged in runs[False].items():
        loss = {k.removeprefix('loss/train/'): v for k, v in logged.items()}
        assert set(loss) == {'ce', 'kd', 'lag', 'total'}
        assert loss['total'] == pytest.approx(0.5 * loss['ce'] + 0.5 * loss['kd'] + loss['lag'], rel=1e-5), step
        assert loss['kd'] > 0
    after = load_teacher(source).state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_teacher_is_not_trained_in_process(tmp_path):
    """The live teacher object after a run: unchanged weights, requires_grad False, no .grad, not in the
    optimizer."""
    from composer import Trainer
    from composer.optim import DecoupledAdamW
    from llmfoundry.models.hf import ComposerHFCausalLM
    from transformers import AutoTokenizer

    from composer_shear.testing import Tokens, loader
    source = save_tiny(tmp_path / 'source')
    model = ComposerHFCausalLM(AutoTokenizer.from_pretrained(source), pretrained_model_name_or_path=str(source),
                               pretrained=True, use_train_metrics=False)
    opt = DecoupledAdamW(model.parameters(), lr=1e-2)
    algo = ShearDistill(alpha=0.5)
    trainer = Trainer(model=model, optimizers=opt, train_dataloader=loader(Tokens(16, 16, 96), 4),
                      max_duration='3ba', algorithms=[algo], device='cpu', progress_bar=False, log_to_console=False)
    initial = load_teacher(source).state_dict()
    trainer.fit()
    assert all(torch.equal(initial[k], v) for k, v in algo.teacher.state_dict().items())
    assert all(not p.requires_grad and p.grad is None for p in algo.teacher.parameters())
    in_opt = {id(p) for g in opt.param_groups for p in g['params']}
    assert not any(id(p) in in_opt for p in algo.teacher.parameters())
    assert not algo.teacher.training
    # the student did move away from the teacher
    student = model.model.state_dict()
    assert any(not torch.equal(student[k], initial[k]) for k in initial)
    trainer.close()
