"""`composer-shear prune`: a Hugging Face model pruned one-shot to a shape or to a parameter budget, in one process.

Calibration sequences (the importance scores) and held-out sequences (the search's scores) come from the train
split of a ``prepare-data`` output, spread over its domains, disjoint from each other. The output is a plain
Hugging Face folder (weights, config, tokenizer) with ``shape_report.json``, the importance scores
(``importance.safetensors``: pass it as ``scores`` to another run with the same source, data and calibration so it
is not computed again) and, for a budget, the search table (``search.json``, ``search.md``, ``search.png``).

Example:
    >>> prune_folder('SmolLM2-135M', 'data', 'params=75M', 'smollm2-75m')
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from composer_shear._io import REPORT_FILE, atomic_dir, check_replaceable, write_text
from composer_shear.budget import Budget, SearchSpace, candidate_shapes, count, describe_shape, parse_target
from composer_shear.errors import ConfigError
from composer_shear.shapes import ModelShape, validate_pruning_modules

__all__ = ['IMPORTANCE_FILE', 'PrunePlan', 'check_prune_args', 'prune_folder', 'source_fingerprint']

IMPORTANCE_FILE = 'importance.safetensors'
IMPORTANCE_FORMAT = 'composer_shear.importance/1'
SEARCH_FILES = ('search.json', 'search.md', 'search.png')


@dataclass
class PrunePlan:
    """Everything `prune_folder` checked before loading a model."""
    source: ModelShape
    target: dict[str, Any] | Budget
    shape: ModelShape | None  # the exact target (None for a budget: the search picks it)
    enumerated: int  # shapes under the budget (0 for a shape)
    manifest: dict[str, Any]
    calibration: dict[str, int]  # sequences per domain
    held_out: dict[str, int]


def _split(n: int, domains: Sequence[str]) -> dict[str, int]:
    """`n` sequences over `domains`, as evenly as possible (the first domains take the remainder)."""
    return {d: n // len(domains) + (1 if i < n % len(domains) else 0) for i, d in enumerate(domains)}


def source_fingerprint(folder: str | os.PathLike) -> str:
    """A hash of an HF folder's config and its weight files' names and sizes: scores are reused only for it."""
    folder = Path(folder)
    h = hashlib.sha256((folder / 'config.json').read_bytes())
    for f in sorted(folder.glob('*.safetensors')) + sorted(folder.glob('*.bin')):
        if f.name != IMPORTANCE_FILE:
            h.update(f'{f.name}:{f.stat().st_size}'.encode())
    return h.hexdigest()


def check_prune_args(source: str | os.PathLike, data: str | os.PathLike, target: str | Mapping[str, Any],
                     out: str | os.PathLike, calibration: int = 64, held_out: int = 16,
                     space: SearchSpace | None = None, max_candidates: int = 48, scores: str | None = None,
                     overwrite: bool = False) -> PrunePlan:
    """Every check `prune_folder` can make without torch: the source, the target (and for a budget the shapes
    under it), the data and its sequence counts, the output folder. Raises ConfigError / ShapeError / ExportError
    with one line naming the problem."""
    from composer_shear.checks import check_hf_folder, check_positive
    space = space or SearchSpace()
    for value, flag in ((calibration, '--calibration'), (held_out, '--held-out'),
                        (max_candidates, '--max-candidates')):
        check_positive(value, flag, 'prune')
    check_hf_folder(source, 'SOURCE', 'prune', ConfigError)
    try:
        config = json.loads(Path(source, 'config.json').read_text())
    except ValueError as e:
        raise ConfigError(f'prune: {source}/config.json is not valid JSON ({e})') from None
    shape_of_source = ModelShape.from_config(config)
    modules = validate_pruning_modules(space.pruning_modules)
    goal = parse_target(target)
    enumerated = 0
    if isinstance(goal, Budget):
        enumerated = len(candidate_shapes(shape_of_source, goal, space))
        shape = None
    else:
        shape = shape_of_source.resolve_target(goal, modules)
    manifest_path = Path(data, 'manifest.json')
    try:
        manifest = json.loads(manifest_path.read_text())
        domains = list(manifest['domains'])
        sizes = {d: int(manifest['domains'][d]['train']['sequences']) for d in domains}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f'prune: --data {data} is not a prepare-data output (no readable manifest.json with train '
                          f'splits: {e.__class__.__name__})') from None
    if not domains:
        raise ConfigError(f'prune: --data {data} has no domains')
    cal, score = _split(calibration, domains), _split(held_out, domains)
    short = [d for d in domains if cal[d] + score[d] > sizes[d]]
    if short:
        d = short[0]
        raise ConfigError(f'prune: --data {data}: domain {d!r} has {sizes[d]} train sequences, fewer than the '
                          f'{cal[d]} calibration + {score[d]} held-out it must give (lower --calibration or '
                          f'--held-out)')
    limit = config.get('max_position_embeddings')
    if limit is not None and int(manifest.get('max_seq_len', 0)) > int(limit):
        raise ConfigError(f'prune: --data {data} holds sequences of {manifest["max_seq_len"]} tokens, longer than '
                          f'{source} supports ({limit})')
    plan = PrunePlan(shape_of_source, goal, shape, enumerated, manifest, cal, score)
    if scores is not None:
        check_scores(scores, importance_meta(source, plan))
    check_replaceable(out, overwrite, marker=REPORT_FILE)
    return plan


def _scores_path(scores: str | os.PathLike) -> Path:
    path = Path(scores)
    if path.is_dir():
        path = path / IMPORTANCE_FILE
    if not path.is_file():
        raise ConfigError(f'prune: --scores {scores} is neither {IMPORTANCE_FILE} nor a folder holding it')
    return path


def read_sequences(data: str | os.PathLike, counts: Mapping[str, int], offsets: Mapping[str, int] | None = None,
                   max_seq_len: int | None = None) -> list[Any]:
    """Per domain, `counts[d]` train sequences from position `offsets[d]`, as int64 tensors [1, seq] in domain
    order."""
    import numpy as np
    import torch
    from streaming import LocalDataset
    rows = []
    for d, n in counts.items():
        ds = LocalDataset(os.path.join(data, 'train', d))
        start = (offsets or {}).get(d, 0)
        for i in range(start, start + n):
            rows.append(torch.from_numpy(np.asarray(ds[i]['tokens'][:max_seq_len]).astype(np.int64))[None])
    return rows


def batched(rows: Sequence[Any], batch_size: int) -> list[Any]:
    """Rows [1, seq] stacked in batches of `batch_size` (rows of one length per batch)."""
    import torch
    return [torch.cat(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def importance_meta(source: str | os.PathLike, plan: PrunePlan) -> dict[str, str]:
    return {'format': IMPORTANCE_FORMAT, 'source': source_fingerprint(source),
            'data': str(plan.manifest.get('fingerprint')), 'calibration': json.dumps(plan.calibration),
            'max_seq_len': str(plan.manifest.get('max_seq_len'))}


def _header(path: Path) -> dict[str, Any]:
    """A safetensors file's JSON header, read without torch."""
    with open(path, 'rb') as f:
        size = int.from_bytes(f.read(8), 'little')
        if not 0 < size < 1 << 26:
            raise ValueError('no safetensors header')
        return json.loads(f.read(size))


def check_scores(scores: str | os.PathLike, want: Mapping[str, str]) -> Path:
    """The path of an earlier run's importance scores; ConfigError unless they were computed for the same source,
    data and calibration sequences (read from the file's metadata, without torch)."""
    path = _scores_path(scores)
    try:
        meta = _header(path).get('__metadata__') or {}
    except (OSError, ValueError) as e:
        raise ConfigError(f'prune: --scores {path} is not a readable safetensors file ({e})') from None
    if meta.get('format') != IMPORTANCE_FORMAT:
        raise ConfigError(f'prune: --scores {path} was not written by composer-shear prune')
    for key, what in (('source', 'another source model'), ('data', 'other data'),
                      ('calibration', 'other calibration sequences'), ('max_seq_len', 'another sequence length')):
        if meta.get(key) != want[key]:
            raise ConfigError(f'prune: --scores {path} were computed for {what} ({key} differs); drop --scores to '
                              'compute them again')
    return path


def load_scores(path: Path) -> dict[str, Any]:
    """The importance scores of a file `check_scores` accepted."""
    from safetensors.torch import load_file
    return load_file(str(path))


def _device_and_dtype(device: str | None, dtype: str | None) -> tuple[Any, Any]:
    import torch
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ConfigError(f'prune: --device {device} is not usable here ({str(e).splitlines()[0]})') from None
    name = dtype or ('bf16' if torch.device(device).type == 'cuda' else 'fp32')
    return torch.device(device), {'fp32': torch.float32, 'bf16': torch.bfloat16}[name]


def prune_folder(source: str | os.PathLike, data: str | os.PathLike, target: str | Mapping[str, Any],
                 out: str | os.PathLike, calibration: int = 64, held_out: int = 16,
                 space: SearchSpace | None = None, max_candidates: int = 48, score: str = 'loss',
                 probe_steps: int = 0, top_k: int = 3, probe_lr: float = 1e-4, scores: str | None = None,
                 device: str | None = None, dtype: str | None = None, batch_size: int = 8,
                 overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Prune `source` one-shot to `target` (a shape or a budget; see :func:`~composer_shear.budget.parse_target`)
    and write the result to `out`. Returns the report written as ``shape_report.json``.

    Args:
        calibration: sequences for the importance scores, spread over the data's domains (train split).
        held_out: sequences the search scores candidates on (the next ones of the train split).
        space: the shapes a budget search may build.
        max_candidates: shapes scored at most (evenly spread over those under the budget).
        score: ``loss`` (next-token CE) or ``kl`` (to the source; a source forward per candidate and batch).
        probe_steps: with a budget, train the best `top_k` this many distillation steps and score them again.
        scores: an earlier output (or its ``importance.safetensors``) whose scores to reuse.
        device, dtype: default CUDA and bf16 when there is a GPU, else CPU and fp32.
    """
    space = space or SearchSpace()
    plan = check_prune_args(source, data, target, out, calibration, held_out, space, max_candidates, scores,
                            overwrite)
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from composer_shear.oneshot import importance
    from composer_shear.search import evaluate, prune_shape, search_shapes

    def say(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)

    start = time.perf_counter()
    dev, dt = _device_and_dtype(device, dtype)
    seq = int(plan.manifest['max_seq_len'])
    calib_rows = read_sequences(data, plan.calibration, max_seq_len=seq)
    held_rows = read_sequences(data, plan.held_out, offsets=plan.calibration, max_seq_len=seq)
    calib = [b.to(dev) for b in batched(calib_rows, batch_size)]
    held = [b.to(dev) for b in batched(held_rows, batch_size)]
    model = AutoModelForCausalLM.from_pretrained(source, torch_dtype=dt).to(dev).eval()
    vocab = model.get_input_embeddings().num_embeddings
    if max(int(b.max()) for b in calib + held) >= vocab:
        raise ConfigError(f'prune: --data {data} holds token ids outside {source}\'s vocabulary of {vocab} (was it '
                          'prepared with another tokenizer?)')
    meta = importance_meta(source, plan)
    t = time.perf_counter()
    if scores is not None:
        imp = load_scores(check_scores(scores, meta))
        say(f'importance: reused {scores}')
    else:
        say(f'importance: {len(calib_rows)} calibration sequences of {seq} tokens')
        imp = importance(model, calib)
    imp_seconds = time.perf_counter() - t
    modules = validate_pruning_modules(space.pruning_modules)
    result = None
    if isinstance(plan.target, Budget):
        result = search_shapes(model, plan.target, imp, held, space, max_candidates, score, probe_steps, top_k,
                               calib, probe_lr, progress=progress, log=say)
        shape = result.best.shape
    else:
        shape = plan.shape
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    small = prune_shape(state, model.config, imp, plan.source, shape, modules)
    final_score = evaluate(small.to(dev), held, score, model)
    report = {
        'method': 'oneshot',
        'source': plan.source.target_dict() | {'num_params': plan.source.num_params(), 'path': str(source)},
        'target': shape.target_dict() | {'num_params': shape.num_params(),
                                         'non_embedding_params': count(shape, 'non_embedding_params')},
        'requested': (plan.target.describe() if isinstance(plan.target, Budget) else plan.target),
        'pruning_modules': list(modules),
        'calibration': {'data': str(data), 'sequences': plan.calibration, 'max_seq_len': seq},
        'held_out': {'sequences': plan.held_out, score: round(final_score, 6)},
        'device': str(dev), 'dtype': str(dt).removeprefix('torch.'),
        'seconds': {'importance': round(imp_seconds, 2), 'total': round(time.perf_counter() - start, 2)},
    }
    if result is not None:
        report['search'] = {k: v for k, v in result.to_dict().items() if k != 'candidates'}
    with atomic_dir(out, overwrite=overwrite, marker=REPORT_FILE, mode=0o755) as tmp:
        small.to('cpu').save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
        save_file({k: v.contiguous().cpu().float() for k, v in imp.items()}, str(tmp / IMPORTANCE_FILE),
                  metadata=meta)
        if result is not None:
            write_search(tmp, result)
        write_text(tmp / REPORT_FILE, json.dumps(report, indent=2) + '\n')
    say(f'pruned {source} to {describe_shape(shape)}: {shape.num_params():,} parameters, held-out {score} '
        f'{final_score:.4f} -> {out}')
    return report


def search_table(result: Any) -> str:
    """The search as a markdown table, best first."""
    rows = sorted(result.candidates, key=lambda c: (c.probe_score is None, c.final))
    probed = result.probe_steps > 0
    head = ['rank', 'layers', 'hidden', 'heads', 'KV heads', 'intermediate', 'parameters', 'non-embedding',
            result.score] + ([f'{result.score} after {result.probe_steps} probe steps'] if probed else [])
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for i, c in enumerate(rows, 1):
        s = c.shape
        cells = [str(i), str(s.num_hidden_layers), str(s.hidden_size), str(s.num_attention_heads),
                 str(s.num_key_value_heads), str(s.intermediate_size), f'{c.params:,}', f'{c.non_embedding_params:,}',
                 f'{c.score:.4f}'] + ([f'{c.probe_score:.4f}' if c.probe_score is not None else '-'] if probed else [])
        lines.append('| ' + ' | '.join(cells) + ' |')
    b = result.budget
    return (f'# Shape search: {b.describe()}\n\n{result.enumerated} shapes fit, {len(result.candidates)} scored '
            f'({result.score} on held-out sequences) in {result.seconds:.1f} s.\n\n' + '\n'.join(lines) + '\n')


def write_search(folder: Path, result: Any) -> None:
    """search.json, search.md and search.png (score against parameters, the winner marked) in `folder`."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    write_text(folder / 'search.json', json.dumps(result.to_dict(), indent=2) + '\n')
    write_text(folder / 'search.md', search_table(result))
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [c.params / 1e6 for c in result.candidates]
    sc = ax.scatter(xs, [c.score for c in result.candidates], c=[c.shape.num_hidden_layers for c in result.candidates],
                    cmap='viridis', s=18)
    fig.colorbar(sc, ax=ax, label='layers')
    probed = [c for c in result.candidates if c.probe_score is not None]
    if probed:
        ax.scatter([c.params / 1e6 for c in probed], [c.probe_score for c in probed], marker='x', color='k',
                   label=f'after {result.probe_steps} probe steps')
    best = result.best
    ax.scatter([best.params / 1e6], [best.final], s=120, facecolors='none', edgecolors='r', label='chosen')
    ax.set_xlabel('parameters (M)')
    ax.set_ylabel(f'held-out {result.score}')
    ax.set_title(result.budget.describe())
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / 'search.png', dpi=110)
    plt.close(fig)
