"""PruningMonitor (YAML name `pruning_monitor`): logs the pruning state and writes mask artifacts."""

from __future__ import annotations

from pathlib import Path

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist

from composer_shear._io import checkpoint_saver, run_folder
from composer_shear.algorithm import ShearPruning
from composer_shear.errors import ConfigError

__all__ = ['PruningMonitor']


def find_algorithm(state: State) -> ShearPruning:
    for algo in state.algorithms:
        if isinstance(algo, ShearPruning):
            return algo
    raise ConfigError('pruning_monitor needs the shear_pruning algorithm in the same run')


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

    def __init__(self, folder: str | None = None, log_interval: int = 1) -> None:
        self.folder = folder
        self.log_interval = int(log_interval)
        if self.log_interval < 1:
            raise ConfigError(f'pruning_monitor.log_interval must be >= 1, got {log_interval}')

    def _folder(self, state: State) -> Path:
        return run_folder(state, self.folder, 'pruning')

    def batch_end(self, state: State, logger: Logger) -> None:
        """Log the pruning statistics every `log_interval` batches."""
        if int(state.timestamp.batch) % self.log_interval:
            return
        stats = find_algorithm(state).stats
        if stats:
            logger.log_metrics({f'pruning/{k}': float(v) for k, v in stats.items()})

    def eval_after_all(self, state: State, logger: Logger) -> None:
        """Write the mask artifacts after each evaluation."""
        self.write_masks(state)

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        """Write the mask artifacts when the checkpoint saver saves at this batch."""
        self._after_checkpoint(state, Event.BATCH_CHECKPOINT)

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        """Write the mask artifacts when the checkpoint saver saves at this epoch."""
        self._after_checkpoint(state, Event.EPOCH_CHECKPOINT)

    def _after_checkpoint(self, state: State, event: Event) -> None:
        saver = checkpoint_saver(state)
        # The saver's interval check is idempotent within one event, so asking it does not disturb it.
        if saver is not None and saver.save_interval(state, event):
            self.write_masks(state)

    def write_masks(self, state: State) -> None:
        """Every rank computes the masks (they may be sharded); rank 0 writes."""
        from composer_shear._io import atomic_dir
        from composer_shear.export import write_mask_report
        from composer_shear.report import shape_report
        with torch.no_grad():
            # call the module itself (not .snapshot()): FSDP1 unshards only through the wrapper's __call__
            snap = ShearPruning.masks(state)('snapshot')
        if dist.get_global_rank() != 0:
            return
        report = shape_report(snap)
        report['batch'] = int(state.timestamp.batch)
        out = self._folder(state) / f'ba{int(state.timestamp.batch)}'
        with atomic_dir(out, overwrite=True) as tmp:
            write_mask_report(tmp, snap, report)
