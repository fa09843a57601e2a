"""Atomic writes: every file and folder composer_shear produces is written under a temporary name beside its
destination and renamed, so a reader never sees a partial output and a failed run leaves the old one intact."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from composer_shear.errors import ExportError

__all__ = ['atomic_dir', 'atomic_file', 'check_replaceable', 'checkpoint_saver', 'run_folder', 'write_text']


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.

    Example:
        >>> with atomic_file('out/report.json') as tmp:
        ...     tmp.write_text('{}')
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


REPORT_FILE = 'shape_report.json'  # an export's shape report; also marks a folder as this project's output


def check_replaceable(out: str | os.PathLike, overwrite: bool, marker: str | None = REPORT_FILE) -> None:
    """Raise unless `out` is absent, or `overwrite` and `out` is an empty folder or one holding `marker` (what
    `atomic_dir` may replace); call it before expensive work that ends in `atomic_dir`."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f'{out} already exists (pass --overwrite to replace it)')
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (marker and (out / marker).exists()))):
        raise ExportError(f'{out} is not empty and is not a composer-shear output: refusing to replace it')


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False, marker: str | None = REPORT_FILE,
               mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; it is renamed to `out` only if the block succeeds.

    An existing `out` is replaced only with `overwrite`, and only when it is empty or holds `marker` (a file
    that only this project writes), so a user's unrelated folder is never deleted. `mode`: permissions of the
    final folder (mkdtemp makes it owner-only).

    Example:
        >>> with atomic_dir('pruned', overwrite=True) as tmp:
        ...     (tmp / 'config.json').write_text('{}')
    """
    out = Path(out)
    check_replaceable(out, overwrite, marker)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out.name}.tmp-', dir=out.parent))
    try:
        yield tmp
        if mode is not None:
            tmp.chmod(mode)
        if out.exists():
            old = out.with_name(f'.{out.name}.old-{os.getpid()}')
            out.rename(old)
            try:
                tmp.rename(out)
            except OSError:
                old.rename(out)
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def run_folder(state: Any, folder: str | None, name: str) -> Path:
    """`folder` with {run_name} substituted; default `{save_folder}/{name}` when the run saves checkpoints to a
    local folder, else `{run_name}/{name}`."""
    if folder is None:
        saver = checkpoint_saver(state)
        if saver is not None and '://' not in str(saver.folder):
            folder = os.path.join(str(saver.folder), name)
        else:
            folder = f'{{run_name}}/{name}'
    from composer.utils import format_name_with_dist
    return Path(format_name_with_dist(folder, state.run_name))


def checkpoint_saver(state: Any) -> Any:
    """The run's Composer CheckpointSaver callback, or None."""
    from composer.callbacks import CheckpointSaver
    for cb in state.callbacks:
        if isinstance(cb, CheckpointSaver):
            return cb
    return None
