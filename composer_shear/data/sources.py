"""The input files of `prepare-data` and the parts they are read in: JSON lines (plain, ``.gz``, ``.zst``), Parquet
and the Arrow files of a Hugging Face ``datasets`` folder written by ``save_to_disk``.

A *part* is what one worker reads: a byte range of a plain ``.jsonl`` file (the lines that start in it), a range of
row groups of a Parquet file, or a whole compressed or Arrow file. Parts in order give every document of a domain
in the order a one-process read gives them, so the packed output does not depend on how many workers read them.
A bad document is named by its file and line (JSON lines) or row (Parquet, Arrow).
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ['ARROW', 'JSONL', 'PARQUET', 'SUFFIXES', 'Part', 'count', 'parts', 'read']

JSONL = ('.jsonl', '.jsonl.gz', '.jsonl.zst')
PARQUET = ('.parquet',)
ARROW = ('.arrow',)  # a `datasets.save_to_disk` folder's data files (Arrow IPC streams)
SUFFIXES = JSONL + PARQUET + ARROW
PART_BYTES = 1 << 24  # a plain .jsonl file is read in parts of about 16 MiB


@dataclass(frozen=True)
class Part:
    """Documents `start` to `stop` of `path`: bytes for a plain .jsonl file, row groups for Parquet; a compressed or
    Arrow file is one part (start 0, stop -1). `size`: its bytes on disk (for progress)."""

    path: Path
    start: int = 0
    stop: int = -1
    size: int = 0


def parts(path: Path, part_bytes: int | None = None) -> list[Part]:
    """The parts `path` is read in (plain .jsonl and Parquet files: about `part_bytes`, default `PART_BYTES`)."""
    part_bytes = part_bytes or PART_BYTES
    size = path.stat().st_size
    if path.name.endswith('.jsonl'):
        return [Part(path, a, min(a + part_bytes, size), min(part_bytes, size - a))
                for a in range(0, max(size, 1), part_bytes)]
    if path.name.endswith(PARQUET):
        groups = _parquet(path).metadata.num_row_groups
        per = max(1, groups * part_bytes // max(size, 1))  # about part_bytes of row groups
        return [Part(path, g, min(g + per, groups), size * (min(g + per, groups) - g) // max(groups, 1))
                for g in range(0, max(groups, 1), per)]
    return [Part(path, size=size)]


def read(part: Part, field: str = 'text') -> Iterator[tuple[int, str]]:
    """(line or row number in the file, 1-based, the document's text) of every document of `part`; a `ValueError`
    names the file and line or row of a bad one, or the file when it cannot be read."""
    name = part.path.name
    if name.endswith(PARQUET):
        yield from _parquet_rows(part, field)
    elif name.endswith(ARROW):
        yield from _arrow_rows(part, field)
    else:
        yield from _jsonl_lines(part, field)


def count(part: Part, field: str = 'text') -> int:
    """The documents of `part`, as cheaply as they can be counted (the first pass of `prepare-data`): the lines
    that are not blank, or the rows; a bad document is found when it is read."""
    name = part.path.name
    if name.endswith(PARQUET):
        f = _parquet(part.path)
        stop = f.metadata.num_row_groups if part.stop < 0 else part.stop
        return sum(f.metadata.row_group(g).num_rows for g in range(part.start, stop))
    if name.endswith(ARROW):
        return sum(len(column) for column in _arrow_columns(part, field))
    return sum(1 for _ in _jsonl_lines(part, field, parse=False))


def _jsonl_lines(part: Part, field: str, parse: bool = True) -> Iterator[tuple[int, str]]:
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, UnicodeDecodeError)
    path = part.path
    if path.name.endswith('.gz'):
        raw = gzip.open(path, 'rb')
    elif path.name.endswith('.zst'):
        import zstandard
        errors += (zstandard.ZstdError,)
        raw = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, 'rb')))
    else:
        raw = open(path, 'rb')
    n = 0
    try:
        with raw as stream:
            if part.start > 0:  # the line holding byte start - 1 belongs to the part before
                stream.seek(part.start - 1)
                stream.readline()
            while part.stop < 0 or stream.tell() < part.stop:
                line = stream.readline()
                if not line:
                    break
                n += 1
                if not line.strip():
                    continue
                if not parse:
                    yield n, ''
                    continue
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ValueError(f'prepare-data: {path}:{_line(part, n)} is not valid JSON ({e})') from e
                if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                    raise ValueError(f'prepare-data: {path}:{_line(part, n)} has no string `{field}` field')
                yield n, obj[field]
    except errors as e:
        raise ValueError(f'prepare-data: cannot read {path} after line {_line(part, n)} ({e})') from e


def _line(part: Part, n: int) -> int:
    """The line number in the file of line `n` of `part` (counting the lines before it: only on an error)."""
    if part.start <= 0:
        return n
    before, last = 0, b'\n'
    with open(part.path, 'rb') as f:
        left = part.start
        while left > 0:
            chunk = f.read(min(left, 1 << 24))
            if not chunk:
                break
            before, last, left = before + chunk.count(b'\n'), chunk[-1:], left - len(chunk)
    # the part starts after the newline ending the line that holds byte start - 1 (a line it skips)
    return before + (last != b'\n') + n


def _parquet(path: Path):
    import pyarrow.parquet as pq
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...: name the file in one line
        raise ValueError(f'prepare-data: cannot read {path} as Parquet ({e})') from e


def _parquet_rows(part: Part, field: str) -> Iterator[tuple[int, str]]:
    f = _parquet(part.path)
    if field not in f.schema_arrow.names:
        raise ValueError(f'prepare-data: {part.path} has no column `{field}` (columns: '
                         f'{", ".join(f.schema_arrow.names)})')
    row = sum(f.metadata.row_group(g).num_rows for g in range(part.start))
    stop = f.metadata.num_row_groups if part.stop < 0 else part.stop
    for g in range(part.start, stop):
        try:
            column = f.read_row_group(g, columns=[field]).column(field).to_pylist()
        except Exception as e:
            raise ValueError(f'prepare-data: cannot read {part.path} row group {g} ({e})') from e
        yield from _texts(part.path, column, row, field)
        row += len(column)


def _arrow_rows(part: Part, field: str) -> Iterator[tuple[int, str]]:
    row = 0
    for column in _arrow_columns(part, field):
        texts = column.to_pylist()
        yield from _texts(part.path, texts, row, field)
        row += len(texts)


def _arrow_columns(part: Part, field: str) -> Iterator[Any]:
    """The `field` column of every record batch of an Arrow file (IPC stream, as `datasets`
    writes it, or IPC file)."""
    import pyarrow as pa
    try:
        source = pa.memory_map(str(part.path))
        try:
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        if field not in reader.schema.names:
            raise ValueError(f'prepare-data: {part.path} has no column `{field}` (columns: '
                             f'{", ".join(reader.schema.names)})')
        for batch in batches:
            yield batch.column(field)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f'prepare-data: cannot read {part.path} as Arrow ({e})') from e


def _texts(path: Path, column: list, row: int, field: str) -> Iterator[tuple[int, str]]:
    for i, text in enumerate(column, row + 1):
        if not isinstance(text, str):
            raise ValueError(f'prepare-data: {path} row {i} has no string `{field}`')
        yield i, text
