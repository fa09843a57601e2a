"""Downstream accuracy with llm-foundry's own in-context-learning evaluator (``composer-shear eval``).

The tasks come from an llm-foundry tasks YAML (``icl_tasks`` and, for chance levels, ``eval_gauntlet``), such as
``yamls/eval/paper_tasks.yaml``. Everything is checked before a model is loaded: the YAML's keys, and every line
of every task file (valid JSON with the fields its task type needs). Dataloaders, metrics and the above-chance
average are llm-foundry's (``build_evaluators`` and its ``EvalGauntlet``); the models run in Composer's
``Trainer.eval``. ``limit`` takes the first N examples of each task file (the same ones for every model; few-shot
examples are then drawn from those N, with llm-foundry's fixed seed).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from composer_shear._io import write_text
from composer_shear.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ['DEFAULT_BATCH_SIZE', 'DEFAULT_MAX_SEQ_LEN', 'DEFAULT_TASKS', 'DEMO_TASKS', 'TaskSet', 'evaluate_models',
           'load_tasks', 'results_table', 'write_results']

# the fields each task type reads from a line of its jsonl file, and their JSON types
TASK_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    'multiple_choice': {'query': str, 'choices': list, 'gold': int},
    'schema': {'context_options': list, 'continuation': str, 'gold': int},
    'language_modeling': {'context': str, 'continuation': str},
}
TASK_KEYS = ('label', 'dataset_uri', 'icl_task_type', 'num_fewshot')
EVAL_YAMLS = Path(__file__).resolve().parent.parent / 'yamls' / 'eval'  # in a checkout
DEFAULT_TASKS = EVAL_YAMLS / 'paper_tasks.yaml'
DEMO_TASKS = EVAL_YAMLS / 'demo_tasks.yaml'  # 0-shot only: fits the demo's time on a CPU
# llm-foundry pads every ICL sequence to max_seq_len, and a multiple-choice batch holds batch x choices sequences
# whose vocabulary-wide logits dominate memory (8 questions x 4 choices x 2048 x 49k fp32 = 13 GB for SmolLM2):
# small defaults that fit a CPU; longer prompts (25-shot ARC-Challenge) are trimmed from the left.
DEFAULT_BATCH_SIZE = 2
DEFAULT_MAX_SEQ_LEN = 1024


class TaskSet:
    """Validated ICL tasks: llm-foundry ``icl_tasks`` entries (with resolved, possibly subsampled files), the
    gauntlet configuration, and the examples kept per task."""

    def __init__(self, icl_tasks: list[dict[str, Any]], gauntlet: dict[str, Any], examples: dict[str, int],
                 source: str, limit: int | None) -> None:
        self.icl_tasks, self.gauntlet, self.examples = icl_tasks, gauntlet, examples
        self.source, self.limit = source, limit

    @property
    def keys(self) -> list[str]:
        """Evaluator labels, ``<task>/<n>-shot``, in file order."""
        return [f"{t['label']}/{n}-shot" for t in self.icl_tasks for n in t['num_fewshot']]

    def chance(self, key: str) -> float:
        """The task's chance accuracy from the gauntlet section (0 when it has none)."""
        label, shots = key.split('/')
        for category in self.gauntlet.get('categories', []):
            for b in category['benchmarks']:
                if b['name'] == label and f"{b['num_fewshot']}-shot" == shots:
                    return float(b['random_baseline'])
        return 0.0


def _check_line(path: Path, number: int, line: str, task_type: str) -> None:
    where = f'{path}:{number}'
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f'{where}: not valid JSON ({e.msg})') from None
    if not isinstance(row, dict):
        raise ConfigError(f'{where}: expected a JSON object, got {type(row).__name__}')
    for field, kind in TASK_FIELDS[task_type].items():
        if field not in row:
            raise ConfigError(f'{where}: a {task_type} example needs {field!r} (has {sorted(row)})')
        if not isinstance(row[field], kind) or isinstance(row[field], bool):
            raise ConfigError(f'{where}: {field!r} must be {getattr(kind, "__name__", kind)}, '
                              f'got {type(row[field]).__name__}')
    options = row.get('choices', row.get('context_options'))
    if options is not None and not 0 <= row['gold'] < len(options):
        raise ConfigError(f'{where}: gold {row["gold"]} is not an index of its {len(options)} options')


def _resolve(uri: str, tasks_file: Path) -> Path:
    path = Path(uri)
    if path.is_absolute() or path.exists():
        return path.resolve()
    for folder in tasks_file.resolve().parents:  # beside the tasks file, then each parent
        if (folder / path).exists():
            return (folder / path).resolve()
    raise ConfigError(f'{tasks_file}: dataset_uri {uri!r} not found (looked in the current folder and beside '
                      'the tasks file and its parents)')


def load_tasks(tasks_file: str | Path, limit: int | None = None, workdir: str | Path | None = None) -> TaskSet:
    """Read and check an llm-foundry tasks YAML and every line of its task files, before any model is loaded.

    Args:
        tasks_file: a YAML with ``icl_tasks`` (llm-foundry's format) and optionally ``eval_gauntlet``.
        limit: keep the first `limit` examples of each task (written to `workdir`).
        workdir: where subsampled files go (required with `limit`).

    Returns:
        The validated :class:`TaskSet`.

    Example:
        >>> tasks = load_tasks('yamls/eval/paper_tasks.yaml', limit=50, workdir='icl_subsample')
    """
    from omegaconf import OmegaConf
    tasks_file = Path(tasks_file)
    if not tasks_file.is_file():
        raise ConfigError(f'--tasks {tasks_file}: no such file')
    if limit is not None and (isinstance(limit, bool) or limit < 1):
        raise ConfigError(f'--limit must be a positive integer, got {limit}')
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(tasks_file), resolve=True)
    except Exception as e:  # omegaconf/yaml raise many types; the message names the line
        raise ConfigError(f'{tasks_file}: not a valid YAML file ({e})') from None
    tasks = cfg.get('icl_tasks') if isinstance(cfg, dict) else None
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError(f'{tasks_file}: needs a non-empty icl_tasks list')
    out, examples, labels = [], {}, set()
    for i, task in enumerate(tasks):
        name = f'{tasks_file}: icl_tasks[{i}]'
        if not isinstance(task, dict):
            raise ConfigError(f'{name} must be a mapping')
        missing = [k for k in TASK_KEYS if k not in task]
        if missing:
            raise ConfigError(f'{name} lacks {", ".join(missing)}')
        if task['icl_task_type'] not in TASK_FIELDS:
            raise ConfigError(f'{name}.icl_task_type {task["icl_task_type"]!r} is not supported; '
                              f'choose from {list(TASK_FIELDS)}')
        if task['label'] in labels:
            raise ConfigError(f'{name}: label {task["label"]!r} appears twice')
        labels.add(task['label'])
        task = copy.deepcopy(task)
        shots = task['num_fewshot'] if isinstance(task['num_fewshot'], list) else [task['num_fewshot']]
        if not shots or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in shots):
            raise ConfigError(f'{name}.num_fewshot must be a list of non-negative integers, got {shots}')
        task['num_fewshot'] = shots
        path = _resolve(str(task['dataset_uri']), tasks_file)
        kept = []
        with open(path, encoding='utf-8') as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    raise ConfigError(f'{path}:{number}: empty line')
                _check_line(path, number, line, task['icl_task_type'])
                if limit is None or len(kept) < limit:
                    kept.append(line if line.endswith('\n') else line + '\n')
        if not kept:
            raise ConfigError(f'{path}: empty task file')
        if max(shots) >= len(kept):
            raise ConfigError(f'{name}: {max(shots)}-shot needs more than {len(kept)} examples'
                              + (f' (raise --limit {limit})' if limit else ''))
        if limit is not None:
            if workdir is None:
                raise ConfigError('load_tasks: workdir is required with limit')
            path = Path(workdir, f'{task["label"]}.jsonl')
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(''.join(kept))
        task['dataset_uri'] = str(path)
        out.append(task)
        examples[task['label']] = len(kept)
    gauntlet = cfg.get('eval_gauntlet') or {}
    if not isinstance(gauntlet, dict):
        raise ConfigError(f'{tasks_file}: eval_gauntlet must be a mapping')
    return TaskSet(out, gauntlet, examples, str(tasks_file), limit)


class ExampleResults:
    """A Composer callback (built lazily) that keeps each ICL example's correctness (0/1) per evaluator label,
    read from what llm-foundry's metrics return per batch (``state.metric_outputs['result']``), and each
    evaluator's wall-clock seconds."""

    @staticmethod
    def build() -> Any:
        from composer.core import Callback, State
        from composer.loggers import Logger

        class _ExampleResults(Callback):
            def __init__(self) -> None:
                self.results: dict[str, list[int]] = {}
                self.seconds: dict[str, float] = {}

            def eval_start(self, state: State, logger: Logger) -> None:
                self.results[state.dataloader_label] = []
                self.seconds[state.dataloader_label] = -time.perf_counter()

            def eval_batch_end(self, state: State, logger: Logger) -> None:
                self.results[state.dataloader_label].extend(int(r) for r in state.metric_outputs.get('result', []))

            def eval_end(self, state: State, logger: Logger) -> None:
                self.seconds[state.dataloader_label] += time.perf_counter()

        return _ExampleResults()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence what is known to be harmless while llm-foundry builds models and datasets: its deprecated-argument
    warnings, and the `datasets` progress bars of every small task file it prepares."""
    import datasets
    bars = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='The `use_auth_token` argument is deprecated', category=FutureWarning)
        warnings.filterwarnings('ignore', message='.*pin_memory.*', category=UserWarning)
        warnings.filterwarnings('ignore', message='No optimizer was specified', category=UserWarning)  # eval only
        # Composer's notice when the last eval batch is smaller than the batch size
        warnings.filterwarnings('ignore', message='Cannot split (tensor|list) of length', category=UserWarning)
        try:
            yield
        finally:
            if bars:
                datasets.utils.enable_progress_bars()


def build_icl_evaluators(tasks: TaskSet, tokenizer: Any, batch_size: int, max_seq_len: int,
                         workdir: str | Path) -> tuple[list[Any], Any]:
    """llm-foundry's evaluators and gauntlet for `tasks` (its dataset copies go to `workdir`, not the cwd)."""
    from llmfoundry.utils.builders import build_evaluators
    gauntlet = copy.deepcopy(tasks.gauntlet) or None
    with contextlib.chdir(workdir), _quiet():
        try:
            evaluators, _, gauntlet_cb = build_evaluators(
                None, copy.deepcopy(tasks.icl_tasks), gauntlet, tokenizer=tokenizer,
                device_eval_batch_size=batch_size, icl_seq_len=max_seq_len, icl_subset_num_batches=None)
        except Exception as e:  # llm-foundry raises a bare Exception for this one
            if 'longer than the max seq len' in str(e):
                raise ConfigError(f'{tasks.source}: an example\'s continuation is longer than max_seq_len '
                                  f'{max_seq_len} tokens (raise --max-seq-len)') from None
            raise
    return evaluators, gauntlet_cb


def evaluate_models(model_dirs: Sequence[str | Path], tasks: TaskSet, batch_size: int = DEFAULT_BATCH_SIZE,
                    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
                    device: str | None = None, names: Sequence[str] | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Score each Hugging Face model folder on `tasks` with llm-foundry's ICL evaluator.

    Args:
        model_dirs: HF model folders (config, weights, tokenizer).
        tasks: from :func:`load_tasks`.
        batch_size: examples per eval batch (llm-foundry's ``device_eval_batch_size``).
        max_seq_len: ICL context length (longer prompts are truncated by llm-foundry from the left).
        device: ``cpu`` or ``gpu`` (default: gpu when CUDA is available); bf16 autocast on GPU.
        names: the models' names in the table (default: the folder paths).
        progress: show Composer's progress bar.

    Returns:
        ``{'tasks', 'examples', 'limit', 'chance', 'metric', 'models': {name: {'accuracy': {task: acc},
        'average', 'above_chance', 'per_example': {task: [0/1, ...]}, 'task_seconds': {task: s}, 'seconds'}}}``.

    Example:
        >>> res = evaluate_models(['SmolLM2-135M', 'pruned'], load_tasks('yamls/eval/paper_tasks.yaml'))
        >>> print(results_table(res))
    """
    import torch
    from composer import Trainer
    from llmfoundry.models.hf import ComposerHFCausalLM
    from transformers import AutoTokenizer

    device = device or ('gpu' if torch.cuda.is_available() else 'cpu')
    names = list(names) if names is not None else [str(d) for d in model_dirs]
    results: dict[str, Any] = {
        'tasks': tasks.keys, 'examples': tasks.examples, 'limit': tasks.limit, 'source': tasks.source,
        'chance': {k: tasks.chance(k) for k in tasks.keys},
        'metric': "llm-foundry ICL accuracy (multiple_choice/schema: lowest per-token perplexity choice; "
                  "language_modeling: all continuation tokens greedy-correct)",
        'models': {},
    }
    for name, folder in zip(names, model_dirs, strict=True):
        start = time.perf_counter()
        log.info('evaluating %s', folder)
        with tempfile.TemporaryDirectory(prefix='composer_shear_icl_') as work, _quiet():
            tokenizer = AutoTokenizer.from_pretrained(folder)
            evaluators, gauntlet = build_icl_evaluators(tasks, tokenizer, batch_size, max_seq_len, work)
            model = ComposerHFCausalLM(tokenizer=tokenizer, pretrained_model_name_or_path=str(folder),
                                       pretrained=True, use_train_metrics=False)
            per_example = ExampleResults.build()
            trainer = Trainer(model=model, device=device, callbacks=[per_example], progress_bar=progress,
                              log_to_console=False, precision='amp_bf16' if device == 'gpu' else 'fp32')
            trainer.eval(eval_dataloader=evaluators)
            accuracy = {k: float(next(iter(trainer.state.eval_metrics[k].values())).compute()) for k in tasks.keys}
            composite = gauntlet.eval_after_all(trainer.state, None) if gauntlet is not None else {}
            trainer.close()
        above = [v for k, v in composite.items() if k.startswith('icl/metrics/eval_gauntlet/')]
        results['models'][name] = {
            'path': str(folder), 'accuracy': accuracy,
            'average': sum(accuracy.values()) / len(accuracy),
            'above_chance': float(above[-1]) if above else math.nan,
            'per_example': {k: per_example.results.get(k, []) for k in tasks.keys},
            'task_seconds': {k: per_example.seconds.get(k, math.nan) for k in tasks.keys},
            'seconds': time.perf_counter() - start,
        }
    return results


def results_table(results: dict[str, Any], by_model: bool = False) -> str:
    """Markdown: a row per task (a column per model), then the average and the average above chance; with
    `by_model`, a row per model instead."""
    models, keys = list(results['models']), results['tasks']
    acc = {m: results['models'][m]['accuracy'] for m in models}
    avg = {m: f"{results['models'][m]['average']:.3f}" for m in models}
    above = {m: '-' if math.isnan(v := results['models'][m]['above_chance']) else f'{v:.3f}' for m in models}
    if by_model:
        lines = ['| model | ' + ' | '.join(keys) + ' | average | average above chance |',
                 '|---' * (len(keys) + 3) + '|',
                 '| examples (chance) | ' + ' | '.join(f"{results['examples'][k.split('/')[0]]} "
                                                        f"({results['chance'][k]:.2f})" for k in keys) + ' | | |']
        lines += [f'| {m} | ' + ' | '.join(f'{acc[m][k]:.3f}' for k in keys) + f' | {avg[m]} | {above[m]} |'
                  for m in models]
    else:
        lines = ['| task | examples | chance | ' + ' | '.join(models) + ' |', '|---' * (3 + len(models)) + '|']
        for k in keys:
            lines.append(f"| {k} | {results['examples'][k.split('/')[0]]} | {results['chance'][k]:.2f} | "
                         + ' | '.join(f'{acc[m][k]:.3f}' for m in models) + ' |')
        lines.append('| **average** | | | ' + ' | '.join(avg[m] for m in models) + ' |')
        lines.append('| **average above chance** | | | ' + ' | '.join(above[m] for m in models) + ' |')
    sub = f"first {results['limit']} examples of each task" if results['limit'] else 'all examples'
    return '\n'.join(lines) + f"\n\nMetric: {results['metric']}; {sub} ({results['source']}).\n"


def write_results(results: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """`out` (markdown) and the same name with ``.json``, each written atomically."""
    out = Path(out)
    md, js = out.with_suffix('.md'), out.with_suffix('.json')
    write_text(md, results_table(results))
    write_text(js, json.dumps(results, indent=1) + '\n')
    return md, js
