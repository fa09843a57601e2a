"""Downstream accuracy with llm-foundry's ICL evaluator: `composer-shear eval` on a tiny model and one task of each
type, a hand-computed multiple-choice answer, the masked model scoring exactly what its export scores, and bad
task files refused before any model is loaded."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from composer_shear.cli import main as cli
from composer_shear.errors import ConfigError
from composer_shear.icl import ExampleResults, build_icl_evaluators, evaluate_models, load_tasks
from composer_shear.testing import save_tiny

ROOT = Path(__file__).resolve().parent.parent
TASKS = {  # label: (file, type, shots, extra keys)
    'arc_easy': ('arc_easy.jsonl', 'multiple_choice', 0, {'continuation_delimiter': '\nAnswer: '}),
    'winogrande': ('winogrande.jsonl', 'schema', 0, {}),
    'lambada_openai': ('lambada_openai.jsonl', 'language_modeling', 0, {}),
}
CHANCE = {'arc_easy': 0.25, 'winogrande': 0.5, 'lambada_openai': 0.0}
N = 10


def write_tasks(folder: Path, n=N, lines=None) -> Path:
    """A tasks YAML over the first `n` lines of three shipped task files (relative dataset_uri)."""
    (folder / 'icl').mkdir(parents=True, exist_ok=True)
    tasks, bench = [], []
    for label, (name, kind, shots, extra) in TASKS.items():
        text = (lines or {}).get(label)
        if text is None:
            text = ''.join((ROOT / 'data' / 'icl' / name).read_text().splitlines(keepends=True)[:n])
        (folder / 'icl' / name).write_text(text)
        tasks.append({'label': label, 'dataset_uri': f'icl/{name}', 'icl_task_type': kind,
                      'num_fewshot': [shots], **extra})
        bench.append({'name': label, 'num_fewshot': shots, 'random_baseline': CHANCE[label]})
    cfg = {'icl_tasks': tasks, 'eval_gauntlet': {'weighting': 'EQUAL', 'subtract_random_baseline': True,
                                                  'rescale_accuracy': True,
                                                  'categories': [{'name': 'tasks', 'benchmarks': bench}]}}
    path = folder / 'tasks.yaml'
    OmegaConf.save(OmegaConf.create(cfg), path)
    return path


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp('icl')
    save_tiny(folder / 'model', max_position_embeddings=1024)
    return folder


def mc_correct_by_hand(model_dir: Path, example: dict, delimiter: str) -> int:
    """1 if the choice with the lowest per-token perplexity is the gold one. The prompt as llm-foundry builds it
    for a character-level tokenizer: the query and the delimiter with its trailing space stripped, each choice
    right after it (no space is prefixed: llm-foundry prefixes one only for tokenizers that need it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    context = tok(example['query'] + delimiter.rstrip(), add_special_tokens=False)['input_ids']
    ppl = []
    for choice in example['choices']:
        answer = tok(choice, add_special_tokens=False)['input_ids']
        ids = torch.tensor([context + answer])
        with torch.no_grad():
            logits = model(ids).logits[0, len(context) - 1:-1]
        ppl.append(torch.nn.functional.cross_entropy(logits, torch.tensor(answer)).exp().item())
    return int(ppl.index(min(ppl)) == example['gold'])


@pytest.mark.slow
def test_eval_command_table_and_a_hand_computed_answer(tiny, capfd):
    tasks = write_tasks(tiny / 't1')
    out = tiny / 'res'
    assert cli(['eval', str(tiny / 'model'), str(tiny / 'model'), '--tasks', str(tasks), '--out', str(out),
                '--batch-size', '4', '--max-seq-len', '512']) == 0
    printed = capfd.readouterr().out
    assert '| arc_easy/0-shot | 10 | 0.25 |' in printed and '**average above chance**' in printed
    res = json.loads(out.with_suffix('.json').read_text())
    assert out.with_suffix('.md').read_text() in printed
    assert res['tasks'] == ['arc_easy/0-shot', 'winogrande/0-shot', 'lambada_openai/0-shot']
    model = res['models'][str(tiny / 'model')]
    for key, acc in model['accuracy'].items():
        assert len(model['per_example'][key]) == N
        assert acc == pytest.approx(sum(model['per_example'][key]) / N, abs=1e-6)
    assert model['average'] == pytest.approx(sum(model['accuracy'].values()) / 3, abs=1e-9)
    above = sum((model['accuracy'][k] - c) / (1 - c) for k, c in res['chance'].items()) / 3
    assert model['above_chance'] == pytest.approx(above, abs=1e-6)  # llm-foundry's gauntlet rescaling
    # the multiple-choice answers, scored by hand from the model's logits
    rows = [json.loads(line) for line in (tiny / 't1' / 'icl' / 'arc_easy.jsonl').read_text().splitlines()]
    assert model['per_example']['arc_easy/0-shot'] == [mc_correct_by_hand(tiny / 'model', r, '\nAnswer: ')
                                                       for r in rows]


@pytest.mark.slow
def test_masked_model_scores_what_its_export_scores(tiny):
    """In-loop: with eval_target_shape the masked model (deterministic exact-target masks) gets exactly the
    per-example correctness of the exported model."""
    from composer import Trainer
    from llmfoundry.models.hf import ComposerHFCausalLM
    from transformers import AutoTokenizer

    from composer_shear.algorithm import ShearPruning
    from composer_shear.export import export_pruned
    from composer_shear.testing import TARGET
    tasks = load_tasks(write_tasks(tiny / 't2'))
    tok = AutoTokenizer.from_pretrained(tiny / 'model')
    model = ComposerHFCausalLM(tokenizer=tok, pretrained_model_name_or_path=str(tiny / 'model'), pretrained=True,
                               use_train_metrics=False)
    pruning = ShearPruning(target=TARGET, eval_target_shape=True)
    per_example = ExampleResults.build()
    trainer = Trainer(model=model, algorithms=[pruning], callbacks=[per_example], device='cpu',
                      progress_bar=False)
    masks = ShearPruning.masks(trainer.state)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in masks.log_alpha.values():
            p.copy_(torch.empty(p.shape).uniform_(-3, 3, generator=gen))
    evaluators, _ = build_icl_evaluators(tasks, tok, 4, 512, tiny)
    trainer.eval(eval_dataloader=evaluators)
    masked = {k: per_example.results[k] for k in tasks.keys}
    accuracy = {k: float(next(iter(trainer.state.eval_metrics[k].values())).compute()) for k in tasks.keys}
    export_pruned(model.model.state_dict(), masks.state_dict(), model.model.config, tiny / 'pruned', tokenizer=tok)
    exported = evaluate_models([tiny / 'pruned'], tasks, batch_size=4, max_seq_len=512, progress=False)
    result = exported['models'][str(tiny / 'pruned')]
    assert result['per_example'] == masked
    assert result['accuracy'] == pytest.approx(accuracy, abs=1e-9)
    assert all(len(v) == N for v in masked.values())
    # Composer logged every task's accuracy beside the other eval metrics
    assert set(trainer.state.eval_metrics) == set(tasks.keys)


@pytest.mark.parametrize('lines, message', [
    ({'arc_easy': ''}, r'arc_easy.jsonl: empty task file'),
    ({'arc_easy': '{"query": "q", "choices": ["a", "b"], "gold": 0}\nnot json\n'}, r'arc_easy.jsonl:2: not valid JSON'),
    ({'winogrande': '{"context_options": ["a", "b"], "gold": 0}\n'}, r"winogrande.jsonl:1: a schema example needs "
                                                                     r"'continuation'"),
    ({'arc_easy': '{"query": "q", "choices": ["a", "b"], "gold": 2}\n'}, r'arc_easy.jsonl:1: gold 2 is not an index'),
    ({'lambada_openai': '["context", "continuation"]\n'}, r'lambada_openai.jsonl:1: expected a JSON object'),
])
def test_bad_task_files_fail_before_any_model_loads(tiny, tmp_path, monkeypatch, capfd, lines, message):
    tasks = write_tasks(tmp_path, lines=lines)

    def no_model(*args, **kwargs):
        raise AssertionError('a model was loaded')
    monkeypatch.setattr('composer_shear.icl.evaluate_models', no_model)
    out = tmp_path / 'res'
    assert cli(['eval', str(tiny / 'model'), '--tasks', str(tasks), '--out', str(out)]) == 2
    err = capfd.readouterr().err
    assert len(err.strip().splitlines()) == 1
    import re
    assert re.search(message, err), err
    assert not out.with_suffix('.md').exists() and not out.with_suffix('.json').exists()


def test_missing_task_file_and_bad_arguments(tiny, tmp_path, capfd):
    tasks = write_tasks(tmp_path)
    (tmp_path / 'icl' / 'piqa.jsonl').unlink(missing_ok=True)
    cfg = OmegaConf.load(tasks)
    cfg.icl_tasks[0].dataset_uri = 'icl/missing.jsonl'
    OmegaConf.save(cfg, tasks)
    assert cli(['eval', str(tiny / 'model'), '--tasks', str(tasks)]) == 2
    assert "dataset_uri 'icl/missing.jsonl' not found" in capfd.readouterr().err
    assert cli(['eval', str(tmp_path / 'nope'), '--tasks', str(tasks)]) == 2
    assert 'is not a Hugging Face model folder' in capfd.readouterr().err
    with pytest.raises(ConfigError, match='--limit must be a positive integer'):
        load_tasks(ROOT / 'yamls' / 'eval' / 'paper_tasks.yaml', limit=0)


def test_paper_tasks_yaml_loads_with_a_limit(tmp_path):
    tasks = load_tasks(ROOT / 'yamls' / 'eval' / 'paper_tasks.yaml', limit=30, workdir=tmp_path)
    assert tasks.keys == ['arc_easy/0-shot', 'arc_challenge/25-shot', 'piqa/0-shot', 'winogrande/5-shot',
                          'lambada_openai/0-shot']
    assert set(tasks.examples.values()) == {30}
    assert [tasks.chance(k) for k in tasks.keys] == [0.25, 0.25, 0.5, 0.5, 0.0]
    first = (ROOT / 'data' / 'icl' / 'piqa.jsonl').read_text().splitlines()[:30]
    assert (tmp_path / 'piqa.jsonl').read_text().splitlines() == first


@pytest.mark.parametrize('name', ['paper_tasks', 'demo_tasks', 'zero_shot_tasks'])
def test_every_eval_yaml_loads_and_names_its_chance_levels(name, tmp_path):
    tasks = load_tasks(ROOT / 'yamls' / 'eval' / f'{name}.yaml', limit=30, workdir=tmp_path)  # 25-shot needs 26
    assert set(tasks.examples.values()) == {30}
    assert all(0 <= tasks.chance(k) < 1 for k in tasks.keys)
    if name == 'zero_shot_tasks':  # every shipped task file, 0-shot (what bench/reproduce.py scores)
        shipped = sorted(p.stem for p in (ROOT / 'data' / 'icl').glob('*.jsonl'))
        assert sorted(k.split('/')[0] for k in tasks.keys) == shipped
        assert all(k.endswith('/0-shot') for k in tasks.keys)
