"""`composer-shear prune`: targets and budgets as written, the shapes a budget allows, the search, the one-shot
output against `prune_oneshot`, reused importance scores, and bad input refused before a model is loaded."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from composer_shear.budget import Budget, SearchSpace, candidate_shapes, count, parse_number, parse_target
from composer_shear.cli import main
from composer_shear.data.prepare import prepare
from composer_shear.errors import ShapeError
from composer_shear.prune import batched, read_sequences
from composer_shear.shapes import ModelShape
from composer_shear.testing import TARGET, llama_config, save_tiny, tiny_model, write_sums_task

SEQ = 16
SMOL = dict(model_type='llama', num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
            head_dim=64, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    """A tiny GQA model (4 layers, hidden 64, 8 heads / 2 KV, intermediate 80; 57,920 parameters) and three domains
    prepared with its tokenizer."""
    root = tmp_path_factory.mktemp('prune')
    save_tiny(root / 'src', 'gqa', max_position_embeddings=64)
    for d in ('alpha', 'beta', 'gamma'):
        (root / 'raw' / d).mkdir(parents=True)
        (root / 'raw' / d / 'a.jsonl').write_text(''.join(
            json.dumps({'text': f'{d} {i} ' + 'lorem ipsum dolor sit amet ' * (3 + i % 5)}) + '\n' for i in range(30)))
    prepare(root / 'raw', root / 'src', root / 'data', SEQ, eval_fraction=0.2, progress=False)
    return root


def prune(lab, out, target, *extra):
    return main(['prune', str(lab / 'src'), '--data', str(lab / 'data'), '--target', target, '--out', str(out),
                 '--multiple-of', '8', '--calibration', '6', '--held-out', '6', *extra])


def test_numbers_and_targets_as_written():
    for text in ('75M', '75m', '7.5e7', '75_000_000', '75000000', '0.075B', '75000K'):
        assert parse_number(text) == 75_000_000, text
    for bad in ('75MB', '-1', '7.5', '1e-3', '', 'M', '7.5e7M', '1_2_', '0', 'abc'):
        with pytest.raises(ShapeError, match='target.params'):
            parse_number(bad, 'target.params')
    assert parse_target('params=75M') == Budget('params', 75_000_000, {})
    assert parse_target('non_embedding_params=5e7, num_hidden_layers=20') == \
        Budget('non_embedding_params', 50_000_000, {'num_hidden_layers': 20})
    assert parse_target('num_hidden_layers=24,hidden_size=480') == {'num_hidden_layers': 24, 'hidden_size': 480}
    assert parse_target({'preset': '1.3b'}) == {'preset': '1.3b'}
    for bad, match in (('layers=3', 'target.layers is not a target key'), ('params', 'not key=value'),
                       ('params=1M,non_embedding_params=1M', 'one budget'), ('preset=7b', 'preset'),
                       ('preset=1.3b,params=1M', 'cannot be combined'), ('params=1M,params=2M', 'given twice'),
                       ('hidden_size=4.5', 'target.hidden_size'), ('', 'empty')):
        with pytest.raises(ShapeError, match=match):
            parse_target(bad)


def test_every_candidate_is_buildable_exact_and_within_the_budget():
    """On SmolLM2-135M's shape: each candidate's count (exact: the tiny test below checks the formula against
    real models) is within 5 % below the budget, sizes on the grid (or the source's), whole KV groups with the same
    query slots, the depth and width limits kept, the intermediate the largest that fits; fixed fields stay."""
    source = ModelShape.from_config(SMOL)
    budget = parse_target('params=75226080')
    shapes = candidate_shapes(source, budget)
    assert len(shapes) == 121
    assert len({tuple(s.target_dict().values()) for s in shapes}) == len(shapes)  # no shape twice
    for s in shapes:
        n = count(s, 'params')
        assert 0.95 * budget.value <= n <= budget.value
        assert 15 <= s.num_hidden_layers <= 30 and s.hidden_size >= 288 and s.intermediate_size >= 768
        assert s.hidden_size % 64 == 0 and s.intermediate_size % 64 == 0
        assert s.num_attention_heads % s.num_key_value_heads == 0 and s.num_attention_heads >= 5
        assert s.num_attention_heads // s.num_key_value_heads <= 3 and s.num_key_value_heads <= 3
        assert s == source.resolve_target(s.target_dict())  # a valid target for the masks and the export
        if s.intermediate_size < 1536:  # 64 more channels would not fit
            assert count(s.replace(intermediate_size=s.intermediate_size + 64), 'params') > budget.value
    fixed = candidate_shapes(source, parse_target('non_embedding_params=40M,num_hidden_layers=20,'
                                                  'num_key_value_heads=3'))
    assert fixed and all(s.num_hidden_layers == 20 and s.num_key_value_heads == 3 for s in fixed)
    assert all(40e6 * 0.95 <= count(s, 'non_embedding_params') <= 40e6 for s in fixed)
    narrow = candidate_shapes(source, budget, SearchSpace(max_depth_pruning=0.0, pruning_modules=('hidden', 'head',
                                                                                                    'intermediate')))
    assert narrow and all(s.num_hidden_layers == 30 for s in narrow)
    mha = ModelShape.from_config(llama_config('mha'))
    assert all(s.num_attention_heads == s.num_key_value_heads
               for s in candidate_shapes(mha, parse_target('params=40000'), SearchSpace(multiple_of=8)))
    for target, match in (('params=200M', 'exceeds the source model'), ('params=20M', 'below the smallest shape'),
                          ('params=75M,num_key_value_heads=4', 'exceeds the source')):
        with pytest.raises(ShapeError, match=match):
            candidate_shapes(source, parse_target(target))


def test_counts_equal_real_models():
    from composer_shear.surgery import pruned_config
    for kind, tied in (('gqa', False), ('qwen2', True), ('mha', False)):
        config = llama_config(kind, tied=tied)
        source = ModelShape.from_config(config)
        for s in candidate_shapes(source, parse_target('params=45000'), SearchSpace(multiple_of=8, tolerance=0.2)):
            model = AutoModelForCausalLM.from_config(pruned_config(config, s, torch.float32))
            assert model.num_parameters() == count(s, 'params'), (kind, s)
            embed = model.get_input_embeddings().weight.numel() * (1 if tied else 2) + s.hidden_size
            assert model.num_parameters() - embed == count(s, 'non_embedding_params')


def test_a_shape_target_is_exactly_prune_oneshot_on_the_same_sequences(lab, tmp_path):
    from composer_shear import prune_oneshot
    assert prune(lab, tmp_path / 'out', ','.join(f'{k}={v}' for k, v in TARGET.items())) == 0
    small = AutoModelForCausalLM.from_pretrained(tmp_path / 'out').eval()
    assert ModelShape.from_config(small.config).target_dict() == TARGET
    source = tiny_model(llama_config('gqa', max_position_embeddings=64))
    source.load_state_dict(AutoModelForCausalLM.from_pretrained(lab / 'src').state_dict())
    calib = read_sequences(lab / 'data', {'alpha': 2, 'beta': 2, 'gamma': 2}, max_seq_len=SEQ)
    want = prune_oneshot(source, TARGET, batched(calib, 8))
    ids = torch.randint(3, 96, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, want(ids).logits, rtol=0, atol=1e-6)
    report = json.loads((tmp_path / 'out' / 'shape_report.json').read_text())
    assert report['target']['num_params'] == small.num_parameters() and 'search' not in report
    assert report['calibration']['sequences'] == {'alpha': 2, 'beta': 2, 'gamma': 2}
    assert not (tmp_path / 'out' / 'search.json').exists()
    tasks = write_sums_task(tmp_path / 'tasks', n=4)  # the output also runs through llm-foundry's evaluator
    assert main(['eval', str(tmp_path / 'out'), '--tasks', str(tasks), '--max-seq-len', '32']) == 0


def test_budget_search_picks_the_best_scored_and_reuses_scores(lab, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'budget'
    assert prune(lab, out, 'params=40000', '--probe-steps', '2', '--top-k', '2') == 0
    search = json.loads((out / 'search.json').read_text())
    assert search['enumerated'] == search['scored'] == len(search['candidates']) == 12
    probed = [c for c in search['candidates'] if c['probe_score'] is not None]
    assert len(probed) == 2  # the two best one-shot scores, probed
    assert sorted(c['score'] for c in probed) == sorted(c['score'] for c in search['candidates'])[:2]
    best = min(probed, key=lambda c: c['probe_score'])
    assert search['best'] == best
    small = AutoModelForCausalLM.from_pretrained(out)
    assert small.num_parameters() == best['params'] <= 40000
    assert ModelShape.from_config(small.config).target_dict() == {k: best[k] for k in TARGET}
    assert (out / 'search.png').stat().st_size > 1000 and '| 1 |' in (out / 'search.md').read_text()
    assert '| rank |' in capsys.readouterr().out
    report = json.loads((out / 'shape_report.json').read_text())
    assert report['held_out']['loss'] == pytest.approx(best['score'], abs=1e-5)  # the one-shot weights are written

    # another budget from the same scores: not computed again, and the same as computing them
    import composer_shear.oneshot as oneshot

    def no_importance(*args, **kwargs):
        raise AssertionError('importance recomputed')
    fresh = tmp_path / 'fresh'
    assert prune(lab, fresh, 'params=30000') == 0
    monkeypatch.setattr(oneshot, 'importance', no_importance)
    assert prune(lab, tmp_path / 'reused', 'params=30000', '--scores', str(out)) == 0
    a = AutoModelForCausalLM.from_pretrained(fresh).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / 'reused').state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_is_refused_before_a_model_is_loaded(lab, tmp_path, monkeypatch, capsys):
    assert prune(lab, tmp_path / 'scores', 'params=40000', '--max-candidates', '1') == 0
    capsys.readouterr()
    import transformers

    def no_load(*args, **kwargs):
        raise AssertionError('a model was loaded')
    monkeypatch.setattr(transformers.AutoModelForCausalLM, 'from_pretrained', no_load)
    (tmp_path / 'taken').mkdir()
    (tmp_path / 'taken' / 'mine.txt').write_text('keep')
    cases = [
        (['--target', 'params=1M'], 'exceeds the source model'),
        (['--target', 'params=10K'], 'below the smallest shape'),
        (['--target', 'layers=3'], 'target.layers is not a target key'),
        (['--target', 'params=40KB'], "target.params='40KB' is not a number"),
        (['--target', 'params=40000', '--calibration', '100000'], "domain 'alpha' has"),
        (['--target', 'params=40000', '--calibration', '3', '--scores', str(tmp_path / 'scores')],
         'other calibration sequences'),
        (['--target', 'params=40000', '--scores', str(tmp_path)], 'importance.safetensors'),
        (['--target', 'params=40000', '--multiple-of', '0'], 'multiple_of'),
        (['--target', 'params=40000', '--max-width-pruning', '1.5'], 'max_width_pruning'),
    ]
    for args, match in cases:
        rc = main(['prune', str(lab / 'src'), '--data', str(lab / 'data'), '--out', str(tmp_path / 'new'),
                   '--multiple-of', '8', *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and match in err[0] and err[0].startswith('composer-shear prune: error:'), \
            (args, err)
        assert not (tmp_path / 'new').exists()
    rc = main(['prune', str(lab / 'src'), '--data', str(tmp_path), '--target', 'params=40000', '--out',
               str(tmp_path / 'new'), '--multiple-of', '8'])
    assert rc == 2 and 'not a prepare-data output' in capsys.readouterr().err
    rc = prune(lab, tmp_path / 'taken', 'params=40000', '--overwrite')
    assert rc == 2 and 'not a composer-shear output' in capsys.readouterr().err
    assert (tmp_path / 'taken' / 'mine.txt').read_text() == 'keep'
