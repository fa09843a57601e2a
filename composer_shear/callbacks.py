"""PruningMonitor (YAML name `pruning_monitor`): logs the pruning state and writes mask artifacts."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from composer.callbacks import CheckpointSaver
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist, format_name_with_dist

from composer_shear.algorithm import ShearPruning


def find_algorithm(state: State) -> ShearPruning:
    for algo in state.algorithms:
        if isinstance(algo, ShearPruning):
            return algo
    raise RuntimeError('pruning_monitor needs the shear_pruning algorithm in the same run')


class PruningMonitor(Callback):
    """Each step, logs the expected shape (layers, heads, kv heads, intermediate, hidden), the expected parameter
    count, every Lagrange multiplier and the current target sparsities under ``pruning/``. After each eval and
    each checkpoint, writes the exact-target deterministic masks (``masks.safetensors``) and a shape report
    (``shape_report.json`` / ``.md``) to ``{folder}/ba{batch}/``.

    Args:
        folder: where mask artifacts go; default ``{save_folder}/pruning`` when the run saves checkpoints to
            a local folder, else ``{run_name}/pruning``. ``{run_name}`` is substituted.
        log_interval: log every this many batches.
    """

    def __init__(self, folder: str | None = None, log_interval: int = 1):
        self.folder = folder
        self.log_interval = int(log_interval)
        if self.log_interval < 1:
            raise ValueError(f'pruning_monitor.log_interval must be >= 1, got {log_interval}')

    def _folder(self, state: State) -> Path:
        return run_folder(state, self.folder, 'pruning')

    def batch_end(self, state: State, logger: Logger):
        if int(state.timestamp.batch) % self.log_interval:
            return
        stats = find_algorithm(state).stats
        if stats:
            logger.log_metrics({f'pruning/{k}': float(v) for k, v in stats.items()})

    def eval_after_all(self, state: State, logger: Logger):
        self.write_masks(state)

    def batch_checkpoint(self, state: State, logger: Logger):
        self._after_checkpoint(state, Event.BATCH_CHECKPOINT)

    def epoch_checkpoint(self, state: State, logger: Logger):
        self._after_checkpoint(state, Event.EPOCH_CHECKPOINT)

    def _after_checkpoint(self, state: State, event: Event):
        saver = _saver(state)
        # The saver's interval check is idempotent within one event, so asking it does not disturb it.
        if saver is not None and saver.save_interval(state, event):
            self.write_masks(state)

    def write_masks(self, state: State):
        """Every rank computes the masks (they may be sharded); rank 0 writes."""
        from composer_shear.export import atomic_dir, save_masks
        from composer_shear.report import dumps, report_table, shape_report
        with torch.no_grad():
            # call the module itself (not .snapshot()): FSDP1 unshards only through the wrapper's __call__
            snap = ShearPruning.masks(state)('snapshot')
        if dist.get_global_rank() != 0:
            return
        report = shape_report(snap)
        report['batch'] = int(state.timestamp.batch)
        out = self._folder(state) / f'ba{int(state.timestamp.batch)}'
        with atomic_dir(out, overwrite=True) as tmp:
            save_masks(tmp / 'masks.safetensors', snap)
            (tmp / 'shape_report.json').write_text(dumps(report))
            (tmp / 'shape_report.md').write_text(report_table(report))


def run_folder(state: State, folder: str | None, name: str) -> Path:
    """`folder` with {run_name} substituted; default `{save_folder}/{name}` when the run saves checkpoints to a
    local folder, else `{run_name}/{name}`."""
    if folder is None:
        saver = _saver(state)
        if saver is not None and '://' not in str(saver.folder):
            folder = os.path.join(str(saver.folder), name)
        else:
            folder = f'{{run_name}}/{name}'
    return Path(format_name_with_dist(folder, state.run_name))


def _saver(state: State) -> CheckpointSaver | None:
    for cb in state.callbacks:
        if isinstance(cb, CheckpointSaver):
            return cb
    return None
