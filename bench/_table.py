"""The GPU check's table, written as it grows: each row is printed at once and appended to ``gpu_check.md`` and
``gpu_check.jsonl`` in the output folder, so a run stopped by a time limit keeps every number it had measured.
Standard library only (the GPU machine may lack everything but torch and transformers)."""

from __future__ import annotations

import json
import os
from pathlib import Path

HEADER = '| check | setting | result | ok |\n|---|---|---|---|\n'
OK = {True: 'yes', False: '**NO**', None: '-'}  # None: measured only


def format_row(row: dict) -> str:
    """One row {'check', 'setting', 'result', 'ok'} as a Markdown table line."""
    return f'| {row["check"]} | {row["setting"]} | {row["result"]} | {OK[row["ok"]]} |'


def format_table(rows: list[dict]) -> str:
    """Rows as a Markdown table (ok: True, False or None = measured only)."""
    return HEADER + ''.join(format_row(r) + '\n' for r in rows)


class Table:
    """Rows added one at a time: printed, and appended to `folder`/gpu_check.md and gpu_check.jsonl.

    Example:
        >>> table = Table(Path(os.environ['OUT']))
        >>> table.add('masked = exported', 'fp32, cuda', 'max abs logit diff 3.1e-06', True)
    """

    def __init__(self, folder: Path | None) -> None:
        self.rows: list[dict] = []
        self.folder = Path(folder) if folder else None
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)
            md = self.folder / 'gpu_check.md'
            if not md.exists():
                md.write_text(HEADER)
        print(HEADER, end='', flush=True)

    def add(self, check: str, setting: str, result: str, ok: bool | None) -> dict:
        row = {'check': check, 'setting': setting, 'result': result, 'ok': ok}
        self.rows.append(row)
        print(format_row(row), flush=True)
        if self.folder:
            for name, line in (('gpu_check.md', format_row(row)), ('gpu_check.jsonl', json.dumps(row))):
                with open(self.folder / name, 'a') as f:
                    f.write(line + '\n')
                    f.flush()
                    os.fsync(f.fileno())
        return row

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r['ok'] is False]

    @property
    def checked(self) -> int:
        return sum(r['ok'] is not None for r in self.rows)
