"""Dynamic batch loading: the update rule, the loader's mix, no repeats, exact resume, bad input."""

import json
import re

import numpy as np
import pytest
import torch

from composer_shear.data.callback import DynamicLoading, read_reference
from composer_shear.data.dynamic import build_dynamic_text_dataloader
from composer_shear.data.weights import check_proportions, update_domain_weights
from composer_shear.testing import save_tiny, write_domains

RP = [0.67, 0.045, 0.045, 0.02, 0.045, 0.025, 0.15]


def test_update_rule_worked_example():
    # reference-method.md 6.2: RedPajama mix, excess [.5 .1 .3 .2 .4 .2 .6]
    w = update_domain_weights(RP, np.array([.5, .1, .3, .2, .4, .2, .6]) + 2.0, [2.0] * 7)
    np.testing.assert_allclose(w, [0.685833, 0.030891, 0.037727, 0.015180, 0.041693, 0.018972, 0.169704], atol=1e-6)
    # computed independently: softmax(log w + max(l - ref, 0)), mixed with 1e-4 of uniform
    losses, ref = np.array([1.0, 3.0, 2.0]), np.array([2.0, 2.0, 2.5])
    w0 = np.array([0.5, 0.3, 0.2])
    clipped = w0 * np.exp([0.0, 1.0, 0.0])
    clipped = 0.9999 * clipped / clipped.sum() + 1e-4 / 3
    np.testing.assert_allclose(update_domain_weights(w0, losses, ref), clipped / clipped.sum(), rtol=1e-12)
    unclipped = w0 * np.exp([-1.0, 1.0, -0.5])
    unclipped = 0.9999 * unclipped / unclipped.sum() + 1e-4 / 3
    np.testing.assert_allclose(update_domain_weights(w0, losses, ref, clip_negative_excess=False),
                               unclipped / unclipped.sum(), rtol=1e-12)
    assert np.array_equal(update_domain_weights(w0, losses, ref, 'constant'), w0)
    extreme = update_domain_weights([1 - 2e-12, 1e-12, 1e-12], [50.0, 0, 0], [0.0, 0, 0])
    assert abs(extreme.sum() - 1) < 1e-12 and (extreme >= 1e-4 / 3 * 0.999).all()



def test_step_size_relative_excess_and_cap():
    """The options that keep the mix from collapsing, each against a hand computation (rtol 1e-12)."""
    w0, losses, ref = np.array([0.5, 0.3, 0.2]), np.array([4.0, 3.0, 2.5]), np.array([2.0, 2.0, 2.0])

    def rule(excess):  # softmax(log w + excess) mixed with 1e-4 of uniform
        a = w0 * np.exp(excess)
        a = 0.9999 * a / a.sum() + 1e-4 / 3
        return a / a.sum()
    d = losses - ref  # [2, 1, 0.5]
    np.testing.assert_allclose(update_domain_weights(w0, losses, ref, step_size=0.1), rule(0.1 * d), rtol=1e-12)
    # relative: excess minus its mean (7/6) -> [5/6, -1/6, -2/3], clipped at 0 -> only the first domain gains
    np.testing.assert_allclose(update_domain_weights(w0, losses, ref, excess='relative'),
                               rule(np.array([5 / 6, 0, 0])), rtol=1e-12)
    # a uniform degradation (every domain 1.5 nat above its reference) leaves the relative mix unchanged
    np.testing.assert_allclose(update_domain_weights(w0, ref + 1.5, ref, excess='relative'), rule(np.zeros(3)),
                               rtol=1e-12)
    free = rule(d)  # about [0.82, 0.14, 0.04]: the cap at 0.5 gives the other two 0.5 in proportion
    capped = update_domain_weights(w0, losses, ref, max_weight=0.5)
    np.testing.assert_allclose(capped, [0.5, *(free[1:] / free[1:].sum() * 0.5)], rtol=1e-12)
    # a second domain pushed over the cap by the redistribution is capped too
    from composer_shear.data.weights import cap_weights
    np.testing.assert_allclose(cap_weights([0.6, 0.3, 0.1], 0.35), [0.35, 0.35, 0.3], rtol=1e-12)
    np.testing.assert_allclose(cap_weights([0.2, 0.3, 0.5], 1.0), [0.2, 0.3, 0.5], rtol=0)
    # the paper's rule is the default
    assert np.array_equal(update_domain_weights(w0, losses, ref),
                          update_domain_weights(w0, losses, ref, step_size=1.0, excess='absolute', max_weight=None))
    with pytest.raises(ValueError, match="excess 'ratio' is unknown"):
        update_domain_weights(w0, losses, ref, excess='ratio')
    with pytest.raises(ValueError, match='below 1/3'):
        cap_weights(w0, 0.3)


@pytest.mark.parametrize('key, value, message', [
    ('step_size', 0, 'step_size must be a positive number'),
    ('step_size', True, 'step_size must be a positive number'),
    ('excess', 'ratio', "excess 'ratio' is unknown"),
    ('max_weight', 0.2, r'max_weight must be in \[1/3, 1\]'),
    ('max_weight', 1.5, r'max_weight must be in \[1/3, 1\]'),
])
def test_bad_update_options_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=f'dynamic_loading.{message}'):
        DynamicLoading(['a', 'b', 'c'], [0.5, 0.3, 0.2], [1.0, 1.0, 1.0], **{key: value})

def loader(root, props, epoch_size=2000, workers=2, rank=None, world=None, batch=4, domains=('a', 'b', 'c')):
    spec = build_dynamic_text_dataloader(None, batch, dict(local=str(root), domains=list(domains), proportions=props,
                                                           epoch_size=epoch_size, max_seq_len=8, rank=rank,
                                                           world_size=world), num_workers=workers)
    return spec.dataloader


def samples(dl, batches=None):
    out = []
    for i, b in enumerate(dl):
        if batches is not None and i >= batches:
            break
        ids = b['input_ids']
        assert torch.equal(ids[:, 0], b['domain'])
        out += [(int(x[0]), int(x[1])) for x in ids]
    return out


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_domains(tmp_path_factory.mktemp('mds'), {'a': 6000, 'b': 3000, 'c': 1500})


def chi2(counts, p):
    expected = np.asarray(p) * sum(counts)
    return float(((np.asarray(counts) - expected) ** 2 / expected).sum())


def test_mix_follows_proportions_across_workers_and_updates(data):
    dl = loader(data, [0.5, 0.3, 0.2])
    assert dl.persistent_workers and dl.num_workers == 2
    before = [d for _ in range(5) for d, _ in samples(dl)]  # 10k samples
    assert len(before) == 10_000
    assert chi2(np.bincount(before, minlength=3), [0.5, 0.3, 0.2]) < 13.8  # chi2(2) at p = 0.001
    dl.dataset.set_proportions([0.1, 0.2, 0.7])
    after = [d for _ in range(5) for d, _ in samples(dl)]
    assert chi2(np.bincount(after, minlength=3), [0.1, 0.2, 0.7]) < 13.8
    assert chi2(np.bincount(after, minlength=3), [0.5, 0.3, 0.2]) > 1000  # the update reached the workers


def test_no_repeats_before_exhaustion_and_disjoint_ranks(data, caplog):
    ranks = [loader(data, [0.2, 0.3, 0.5], epoch_size=1000, rank=r, world=2) for r in (0, 1)]
    seen = {0: [], 1: [], 2: []}
    for _ in range(4):
        parts = [samples(dl) for dl in ranks]
        assert not set(parts[0]) & set(parts[1])  # ranks never share a sample in an interval
        for d, i in parts[0] + parts[1]:
            seen[d].append(i)
    # domain c (1500 samples) got 2000 draws: every sample once before any repeats, then a fresh shuffle
    c = seen[2]
    assert len(set(c[:1500])) == 1500 or len(set(c)) == 1500
    for d in (0, 1):
        assert len(seen[d]) == len(set(seen[d]))
    assert any('ran out of samples' in r.message for r in caplog.records)


@pytest.mark.parametrize('stop', [7, 125])  # batches: mid-interval, and exactly at an interval boundary
def test_resume_is_exact(data, stop):
    epoch_size, batch = 500, 4  # 125 batches per interval
    ref = loader(data, [0.5, 0.3, 0.2], epoch_size=epoch_size)
    full = samples(ref) + samples(ref)
    ref.dataset.set_proportions([0.2, 0.2, 0.6])
    full += samples(ref)

    first = loader(data, [0.5, 0.3, 0.2], epoch_size=epoch_size)
    got = samples(first, batches=stop)
    state = first.dataset.state_dict(num_samples=stop * batch % epoch_size, from_beginning=True)
    assert len(json.dumps(state)) < 300  # O(domains)
    resumed = loader(data, [0.9, 0.05, 0.05], epoch_size=epoch_size)
    resumed.dataset.load_state_dict(state)
    got += samples(resumed)
    if stop < 125:
        got += samples(resumed)
    resumed.dataset.set_proportions([0.2, 0.2, 0.6])
    got += samples(resumed)
    assert got == full


def test_peek_is_the_first_batches_and_changes_nothing(data):
    """peek(n): a rank's first n device batches from the current interval's start, across an interval boundary
    (planned at the current proportions), the same before and after the loader has started the interval; what the
    loader then yields is unchanged."""
    for rank in (0, 1):
        ref = loader(data, [0.5, 0.3, 0.2], epoch_size=40, rank=rank, world=2, workers=0)  # 5 batches per interval
        want = samples(ref) + samples(ref)[:8]
        dl = loader(data, [0.5, 0.3, 0.2], epoch_size=40, rank=rank, world=2, workers=0)
        peeked = dl.dataset.peek(7)
        assert [b['input_ids'].shape for b in peeked] == [(4, 8)] * 7
        assert [(int(x[0]), int(x[1])) for b in peeked for x in b['input_ids']] == want
        assert all(torch.equal(b['input_ids'][:, 0], b['domain']) for b in peeked)
        assert samples(dl) + samples(dl)[:8] == want  # peeking took nothing from the loader
        started = loader(data, [0.5, 0.3, 0.2], epoch_size=40, rank=rank, world=2, workers=0)
        assert samples(started, batches=2) == want[:8]
        again = started.dataset.peek(7)  # the interval is planned now: peeking still starts at its beginning
        assert all(torch.equal(a['input_ids'], b['input_ids']) for a, b in zip(peeked, again, strict=True))


def test_bad_input(data, tmp_path):
    with pytest.raises(ValueError, match='non-negative'):
        check_proportions([0.5, -0.1, 0.6], ['a', 'b', 'c'])
    with pytest.raises(ValueError, match=r'must sum to 1'):
        loader(data, [0.5, 0.3, 0.3])
    with pytest.raises(ValueError, match=r"missing \['c'\], unknown \['d'\]"):
        read_reference({'a': 1.0, 'b': 1.0, 'd': 1.0}, ['a', 'b', 'c'])
    with pytest.raises(ValueError, match='domains differ'):
        DynamicLoading(['a', 'b', 'c'], [0.5, 0.3, 0.2], {'a': 1, 'b': 2, 'x': 3})
    with pytest.raises(FileNotFoundError, match="domain 'zz' has no MDS data"):
        loader(data, [0.5, 0.5], domains=('a', 'zz'))
    empty = tmp_path / 'empty'
    write_domains(empty, {'a': 10, 'b': 0})
    with pytest.raises(ValueError, match="domain 'b' is empty"):
        loader(empty, [0.5, 0.5], domains=('a', 'b'))
    broken = write_domains(tmp_path / 'broken', {'a': 2000, 'b': 10})
    shard = sorted((broken / 'train' / 'a').glob('*.mds'))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"domain 'a': shard .*{shard.name} is missing"):
        loader(broken, [0.5, 0.5], domains=('a', 'b'))
    (broken / 'train' / 'b' / 'index.json').write_text('{not json')
    with pytest.raises(ValueError, match='index.json is corrupt'):
        loader(broken, [0.5, 0.5], domains=('b', 'a'))


def test_remote_is_cached_locally(data, tmp_path):
    """A local path given as `remote` goes through streaming's download/cache path."""
    from composer_shear.data.dynamic import DynamicStreamingDataset
    cache = tmp_path / 'cache'
    ds = DynamicStreamingDataset(local=str(cache), remote=str(data), domains=['a', 'b', 'c'],
                                 proportions=[0.5, 0.3, 0.2], epoch_size=400, device_batch_size=4, max_seq_len=8)
    plain = loader(data, [0.5, 0.3, 0.2], epoch_size=400)
    ds.start_interval()
    got = [(int(s['input_ids'][0]), int(s['input_ids'][1])) for s in ds]
    assert got == samples(plain)
    assert list((cache / 'train' / 'b').glob('*.mds'))


def test_warns_when_data_is_too_small(data, caplog):
    from types import SimpleNamespace

    from composer.core import Time

    from composer_shear.data.callback import warn_if_too_small
    dl = loader(data, [0.2, 0.3, 0.5], epoch_size=1000, workers=0)
    state = SimpleNamespace(max_duration=Time.from_timestring('1000ba'))  # 4000 samples
    messages = warn_if_too_small(dl.dataset, state)
    assert len(messages) == 1
    assert messages[0].startswith('c: ~2,000 samples wanted') and '1,500 available' in messages[0]
    assert 'too small' in caplog.text


def test_resume_from_the_last_batch_before_the_interval_ends(data):
    """Composer checkpoints the last batch of an interval (BATCH_CHECKPOINT) before EPOCH_END and its eval:
    the resumed loader must finish that (empty) interval first, so the re-weighting still happens in between."""
    epoch_size = 400
    ref = loader(data, [0.5, 0.3, 0.2], epoch_size=epoch_size)
    samples(ref)
    ref.dataset.set_proportions([0.2, 0.2, 0.6])
    expected = samples(ref)
    first = loader(data, [0.5, 0.3, 0.2], epoch_size=epoch_size)
    samples(first)
    state = first.dataset.state_dict(num_samples=epoch_size, from_beginning=True)
    resumed = loader(data, [0.9, 0.05, 0.05], epoch_size=epoch_size)
    resumed.dataset.load_state_dict(state)
    assert resumed.dataset.state_dict(0) == state  # saving again before iterating keeps the position
    assert samples(resumed) == []  # the rest of the interval: nothing
    resumed.dataset.set_proportions([0.2, 0.2, 0.6])  # the eval at the interval's end
    assert samples(resumed) == expected
    with pytest.raises(ValueError, match='epoch_size 402 must be a positive multiple'):
        loader(data, [0.5, 0.3, 0.2], epoch_size=402)


def test_callback_domains_must_match_the_loader(data, tmp_path):
    """A YAML whose dynamic_loading domains differ from the data's fails at FIT_START, before any step."""
    from composer import Trainer
    from llmfoundry.models.hf import ComposerHFCausalLM
    from transformers import AutoTokenizer

    save_tiny(tmp_path / 'model')
    tok = AutoTokenizer.from_pretrained(tmp_path / 'model')
    model = ComposerHFCausalLM(tok, pretrained_model_name_or_path=str(tmp_path / 'model'), pretrained=True,
                               use_train_metrics=False)
    trainer = Trainer(model=model, train_dataloader=loader(data, [0.5, 0.3, 0.2], epoch_size=400, workers=0),
                      max_duration='2ba', device='cpu', progress_bar=False,
                      callbacks=[DynamicLoading(['a', 'b', 'x'], [0.5, 0.3, 0.2], [1.0, 1.0, 1.0])])
    with pytest.raises(ValueError, match=r"dynamic_loading.domains \['a', 'b', 'x'\] differ from the train loader"):
        trainer.fit()
    assert int(trainer.state.timestamp.batch) == 0


def test_inconsistent_yaml_and_data_are_refused_before_step_1(tmp_path):
    """Each mismatch between the YAML and the prepared data is named before any training step."""
    from composer import Trainer
    from llmfoundry.models.hf import ComposerHFCausalLM
    from transformers import AutoTokenizer

    from composer_shear.data.dynamic import DynamicStreamingDataset, domain_evaluators
    root = write_domains(tmp_path / 'mds', {'a': 40, 'b': 40})
    write_domains(root, {'a': 8, 'b': 8}, split='eval')
    with pytest.raises(ValueError, match=r"max_seq_len 16 differs from the 8 tokens per sample domain 'a'"):
        DynamicStreamingDataset(local=str(root), domains=['a', 'b'], proportions=[0.5, 0.5], epoch_size=16,
                                device_batch_size=4, max_seq_len=16)
    save_tiny(tmp_path / 'model')
    tok = AutoTokenizer.from_pretrained(tmp_path / 'model')

    def trainer(eval_interval):
        model = ComposerHFCausalLM(tok, pretrained_model_name_or_path=str(tmp_path / 'model'), pretrained=True,
                                   use_train_metrics=False)
        return Trainer(model=model, train_dataloader=loader(root, [0.5, 0.5], epoch_size=16, workers=0,
                                                            domains=('a', 'b')),
                       eval_dataloader=domain_evaluators(str(root), ['a', 'b'], 4, 8), eval_interval=eval_interval,
                       max_duration='8ba', device='cpu', progress_bar=False,
                       callbacks=[DynamicLoading(['a', 'b'], [0.5, 0.5], [1.0, 1.0],
                                                 history_file=str(tmp_path / 'history.json'))])
    for bad in ('3ba', '2ep', '0.5dur'):  # the loader's interval is 16 samples / 4 = 4 batches
        t = trainer(bad)
        with pytest.raises(ValueError, match=f'eval_interval {bad} of evaluator .a. differs from the dynamic_text '
                                             'interval of 4 batches'):
            t.fit()
        assert int(t.state.timestamp.batch) == 0
    for good in ('4ba', '16sp'):  # accepted (the check alone: training is the same as with 1ep)
        t = trainer(good)
        dyn = next(c for c in t.state.callbacks if isinstance(c, DynamicLoading))
        dyn._check_eval_interval(t.state, t.state.train_dataloader.dataset)
    t = trainer('1ep')
    t.fit()
    dyn = next(c for c in t.state.callbacks if isinstance(c, DynamicLoading))
    assert [h['batch'] for h in dyn.history] == [4, 8]


def test_reference_and_proportions_must_be_numbers(tmp_path):
    domains = ['a', 'b']
    (tmp_path / 'list.json').write_text('[2.5, 3.5]')
    assert read_reference(str(tmp_path / 'list.json'), domains).tolist() == [2.5, 3.5]
    (tmp_path / 'bad.json').write_text('{"losses": {"a": 1.0,')
    with pytest.raises(ValueError, match=re.escape(f'{tmp_path / "bad.json"} is not a readable JSON file')):
        read_reference(str(tmp_path / 'bad.json'), domains)
    (tmp_path / 'nan.json').write_text('{"losses": {"a": NaN, "b": 2.0}}')
    with pytest.raises(ValueError, match=re.escape(f"({tmp_path / 'nan.json'}) must be finite: ['a'] are [nan]")):
        read_reference(str(tmp_path / 'nan.json'), domains)
    with pytest.raises(ValueError, match="reference_loss must be finite: \\['b'\\]"):
        read_reference([1.0, float('inf')], domains)
    (tmp_path / 'text.json').write_text('{"losses": {"a": "2.5", "b": 2.0}}')
    with pytest.raises(ValueError, match=r"must hold numbers, got '2.5' \(str\)"):
        read_reference(str(tmp_path / 'text.json'), domains)
    with pytest.raises(ValueError, match=r"initial_proportions must hold numbers, got '0.5'"):
        DynamicLoading(domains, ['0.5', '0.5'], [1.0, 1.0])


def test_out_of_samples_only_when_a_sample_is_read_again():
    from composer_shear.data.plan import Cursor, advance
    cursor, wrapped = advance(Cursor.start(2), [10, 3], [10, 5])
    assert wrapped == [] and cursor.passes == [1, 0]  # read exactly to its end: nothing read twice yet
    cursor, wrapped = advance(cursor, [1, 3], [10, 5])
    assert wrapped == [0, 1]  # domain 0 starts its second pass; domain 1 runs past its end
    assert advance(cursor, [0, 1], [10, 5])[1] == []
