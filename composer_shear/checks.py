"""Checks of a user's arguments that need nothing heavier than the standard library.

The library's functions call them before they do any work, and ``composer-shear`` calls them before it imports
torch, so that a mistake is answered in a fraction of a second with one line naming the argument.

Example:
    >>> check_positive(8, '--batch-size', 'reference-loss')
    >>> check_positive(0, '--batch-size', 'reference-loss')
    Traceback (most recent call last):
    ...
    ValueError: reference-loss: --batch-size must be a positive integer, got 0
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from composer_shear._io import REPORT_FILE, check_replaceable
from composer_shear._remote import is_remote
from composer_shear.errors import ExportError

__all__ = ['check_export_args', 'check_hf_folder', 'check_inspect_args', 'check_positive', 'check_reference_args']


def check_positive(value: object, flag: str, command: str) -> None:
    """`value` is a positive int (None means "no limit" and passes)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f'{command}: {flag} must be a positive integer, got {value!r}')


def check_hf_folder(folder: str | os.PathLike, flag: str, command: str, error: type[Exception] = ValueError) -> None:
    """`folder` is a Hugging Face model folder (it has a config.json)."""
    if not Path(folder, 'config.json').is_file():
        raise error(f'{command}: {flag} {folder} is not a Hugging Face model folder (no config.json)')


def check_reference_args(model_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike,
                         max_batches: int | None, batch_size: int) -> dict:
    """`composer-shear reference-loss`'s arguments, but for the device; returns the data's manifest."""
    check_positive(max_batches, '--max-batches', 'reference-loss')
    check_positive(batch_size, '--batch-size', 'reference-loss')
    check_hf_folder(model_dir, '--model', 'reference-loss', FileNotFoundError)
    try:
        manifest = json.loads(Path(data, 'manifest.json').read_text())
        manifest['domains'], manifest['max_seq_len']
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FileNotFoundError(f'reference-loss: {data} is not a prepare-data output (no readable manifest.json: '
                                f'{e.__class__.__name__})') from e
    if Path(out).is_dir():
        raise ValueError(f'reference-loss: --out {out} is a folder; give the JSON file to write')
    return manifest


def check_export_args(checkpoint: str | os.PathLike, out: str | os.PathLike, source: str | os.PathLike | None,
                      overwrite: bool) -> None:
    """`composer-shear export`'s arguments: the output may be written, the source is an HF folder, the checkpoint
    exists."""
    if source is not None:
        check_hf_folder(source, '--source', 'export', ExportError)
    check_replaceable(out, overwrite, marker=REPORT_FILE)
    if not is_remote(checkpoint) and not Path(checkpoint).exists():  # a URI is checked when it is downloaded
        raise ExportError(f'checkpoint {checkpoint} does not exist')


def check_inspect_args(path: str | os.PathLike, source: str | os.PathLike | None) -> None:
    """`composer-shear inspect`'s arguments: the path exists, the source is an HF folder."""
    if not Path(path).exists():
        raise ExportError(f'{path} does not exist')
    if source is not None:
        check_hf_folder(source, '--source', 'inspect', ExportError)
