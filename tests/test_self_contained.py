"""The repository stands alone: no file reaches for a folder beside the checkout or into the developer's machine,
a copy of the repository's files passes tests by itself, and the shipped data (`data/`) is what `data/README.md`
says it is, readable by llm-foundry's own ICL dataloader.

"The repository's files" are those git tracks plus the new ones it would pick up (untracked, not ignored), so
that the checks see the tree as it will be committed."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from composer_shear.testing import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / 'data'
MC = dict(continuation_delimiter='\nAnswer: ')
ICL_TASKS = {  # file stem: (llm-foundry icl_task_type, extra constructor kwargs), as in data/README.md
    'arc_easy': ('multiple_choice', MC),
    'arc_challenge': ('multiple_choice', MC),
    'piqa': ('multiple_choice', MC),
    'winogrande': ('schema', {}),
    'lambada_openai': ('language_modeling', {}),
}
BINARY_SUFFIXES = {'.png', '.jpg', '.jpeg', '.gif', '.pdf', '.ico', '.gz', '.zst', '.zip', '.whl', '.pt', '.bin',
                   '.safetensors', '.mds', '.npy'}


def repo_files():
    """Relative paths of the repository's files (see the module docstring) that exist in the work tree."""
    try:
        top = subprocess.run(['git', 'rev-parse', '--show-toplevel'], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        pytest.skip('git is not installed')
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != ROOT:
        pytest.skip('not a git checkout')
    out = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    return sorted({p for p in out.split('\0') if p and (ROOT / p).is_file()})


def forbidden_patterns():
    """Regexes for paths that only exist on the development machine. Built from pieces so that this file does not
    match itself."""
    sep, up = '/', '..'
    literal = {up + sep + 'shared', sep + 'work' + sep}
    temp = {Path(tempfile.gettempdir()).resolve(), Path(sep + 'tmp'), Path(sep + 'var', 'tmp')}
    for p in (ROOT.parent, Path.home()):
        if len(p.parts) > 1 and p.resolve() not in temp:  # never '/'; a clone in a temp folder names no machine
            literal.add(str(p) + sep)
    pats = [re.escape(s) for s in sorted(literal)]
    pats.append('(?<![\\w.~])' + sep + '(?:home|Users|root|mnt)' + sep + '[\\w.-]')  # home folders, mounts
    pats.append('[A-Za-z]:\\\\' + 'Users' + '\\\\')  # a Windows user folder
    return re.compile('|'.join(pats))


def test_no_tracked_file_reaches_outside_the_repository():
    files = repo_files()
    assert {'.ci/run', 'README.md', 'pyproject.toml'} <= set(files), 'the repository listing looks incomplete'
    pattern = forbidden_patterns()
    hits, checked = [], 0
    for rel in files:
        if rel.startswith('data/') or Path(rel).suffix.lower() in BINARY_SUFFIXES:
            continue  # third-party data, binaries
        raw = (ROOT / rel).read_bytes()
        if b'\0' in raw:
            continue
        try:
            text = raw.decode('utf-8')
        except UnicodeDecodeError:
            continue
        checked += 1
        for n, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                hits.append(f'{rel}:{n}: {line.strip()[:160]}')
    assert checked >= 20, f'only {checked} text files were checked'
    assert not hits, 'paths outside the repository:\n' + '\n'.join(hits)


@pytest.mark.slow
def test_a_copy_of_the_tracked_files_works_alone(tmp_path):
    copy = tmp_path / 'nested' / 'repo'
    for rel in repo_files():
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, copy / rel)
    assert not (copy.parent / 'shared').exists() and not (copy.parent.parent / 'shared').exists()
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTEST_ADDOPTS')}
    env.update(PYTHONPATH=str(copy), HF_DATASETS_CACHE=str(tmp_path / 'hf_datasets'), HF_HUB_OFFLINE='1',
               HF_DATASETS_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    where = subprocess.run([sys.executable, '-c', 'import composer_shear; print(composer_shear.__file__)'],
                           cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    assert where.returncode == 0, where.stderr[-3000:]
    assert Path(where.stdout.strip()).resolve().is_relative_to(copy.resolve()), where.stdout
    tests = ['tests/test_redpajama.py', 'tests/test_equivalence.py::test_init_masks_export_to_target',  # data, model
             'tests/test_equivalence.py::test_mask_values_travel_with_the_masks',
             'tests/test_self_contained.py::test_shipped_icl_tasks_parse']
    res = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *tests], cwd=copy,
                         env=env, capture_output=True, text=True, timeout=1200)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    summary = [line for line in res.stdout.splitlines() if re.search(r'\d+ passed', line)]
    assert summary and not re.search(r'\d+ (failed|errors?)\b', summary[-1]), out[-6000:]
    for own in ('composer_shear', 'tests'):  # no traceback or path shows code of the original checkout
        assert str(ROOT / own) not in out, f'the copy ran {own} from the original checkout'


def readme_counts():
    """{file name: examples} from the ICL table of data/README.md."""
    lines = (DATA / 'README.md').read_text().splitlines()
    counts, column = {}, None
    for line in lines:
        cells = [c.strip().strip('`') for c in line.strip().strip('|').split('|')]
        if line.startswith('|') and 'examples' in cells:
            column = cells.index('examples')
        elif column is not None and line.startswith('|') and cells[0].endswith('.jsonl'):
            counts[cells[0]] = int(cells[column].replace(',', ''))
        elif not line.startswith('|'):
            column = None
    return counts


def test_shipped_icl_tasks_parse(tmp_path, monkeypatch):
    import datasets.config
    from llmfoundry.eval.datasets.in_context_learning_evaluation import get_icl_task_dataloader
    monkeypatch.setattr(datasets.config, 'HF_DATASETS_CACHE', tmp_path / 'hf_datasets')  # keep ~/.cache clean
    monkeypatch.setattr(datasets.config, 'HF_HUB_OFFLINE', True)
    counts = readme_counts()
    assert set(counts) == {f'{t}.jsonl' for t in ICL_TASKS}, counts
    tok = tiny_tokenizer(vocab_size=98)  # every printable ASCII character
    seq, n_sub = 256, 20

    def spelled(ids):  # the text of a token span, or None where it holds characters outside the vocabulary
        return None if tok.unk_token_id in ids else tok.decode(ids)

    for task, (kind, extra) in ICL_TASKS.items():
        lines = (DATA / 'icl' / f'{task}.jsonl').read_text().splitlines()
        assert len(lines) == counts[f'{task}.jsonl'], task
        sub = tmp_path / f'{task}.jsonl'  # llm-foundry reads and maps the whole file: build from the first lines
        sub.write_text('\n'.join(lines[:n_sub]) + '\n')
        examples = [json.loads(line) for line in lines[:n_sub]]
        spec = get_icl_task_dataloader(kind, str(sub), tok, batch_size=8, destination_path=str(tmp_path / f'{task}.d'),
                                       kwargs=dict(max_seq_len=seq, pad_tok_id=tok.pad_token_id, num_fewshot=0,
                                                   prompt_string='', example_delimiter='\n', **extra))
        assert len(spec.dataloader.dataset) == n_sub, task
        batch = next(iter(spec.dataloader))
        ids, conts = batch['input_ids'], batch['continuation_indices']
        assert ids.shape[1] == seq and batch['attention_mask'].shape == ids.shape, task
        assert len(conts) == ids.shape[0] and all(0 < len(c) and int(c.max()) < seq for c in conts), task
        if kind == 'language_modeling':
            for row, c, ex in zip(ids, conts, examples[:len(conts)], strict=True):
                assert spelled(row[c].tolist()) in (None, ex['continuation'].strip()), task
            continue
        key = 'choices' if kind == 'multiple_choice' else 'context_options'
        groups = batch['choice_groupings']
        n_choices = len(examples[0][key])
        assert groups[0] == (0, n_choices), task  # choices per question match the first example's
        assert [e - s for s, e in groups] == [len(ex[key]) for ex in examples[:len(groups)]], task
        assert groups[-1][1] == ids.shape[0] and batch['gold_indices'] == [ex['gold'] for ex in examples[:len(groups)]]
        for (s, e), ex in zip(groups, examples[:len(groups)], strict=True):
            for i in range(s, e):  # the scored span is the answer: the choice, or the shared continuation
                want = ex['choices'][i - s] if kind == 'multiple_choice' else ex['continuation']
                assert spelled(ids[i][conts[i]].tolist()) in (None, want.strip()), (task, i)
