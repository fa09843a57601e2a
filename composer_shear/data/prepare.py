"""`composer-shear prepare-data`: per-domain documents (RedPajama layout) -> tokenized MDS, disjoint train/eval.

Input: a folder holding one sub-folder per domain (or a list of domain folders), each with any mix of `*.jsonl`,
`*.jsonl.gz` or `*.jsonl.zst` files of objects with a `text` field, Parquet files with a `text` column, and
folders written by Hugging Face `datasets`' `save_to_disk` (their `.arrow` files); `text_field` names another field
or column (`composer_shear.data.sources`). Every document is wrapped with BOS/EOS
(those the tokenizer has), documents are concatenated and cut into `max_seq_len` tokens (the tail is dropped).
Eval sequences come from documents that train never sees. Output:
`OUT/{train,eval}/<domain>/` (MDS, column `tokens`, uint16 when the vocabulary fits, else uint32) and
`OUT/manifest.json` (documents, tokens and sequences per domain and split, and the inputs' fingerprint).
The whole output is built in a temporary folder beside `OUT` and renamed into place when complete, so an
interrupted or failed run leaves the previous output as it was. The manifest records every setting and a content
hash of every input file and tokenizer file; a re-run with the same ones checks the output (every shard's size
and SHA-1, recorded in the MDS index) and skips; with other ones, or over a folder that is not a prepare-data
output, it refuses unless `overwrite` (a foreign folder is never replaced). One run at a time per `OUT` (a lock).
Documents are streamed (a first pass counts them, the second reads, checks and tokenizes them 256 KiB at a time): memory
does not grow with the corpus. `workers` processes read and tokenize the files' parts (byte ranges of a plain
`.jsonl`, row groups of a Parquet file, whole compressed and Arrow files) while this process packs their tokens in
the documents' order, so the output is the same, byte for byte, whatever the number of workers.
`verify_data(OUT)` (`composer-shear verify-data`) checks every shard.
`OUT` may be an object-store URI (`s3://bucket/prefix`): the build is uploaded under a new prefix and published by
the manifest, written last (`prepare_remote`); readers find the splits with `data_location`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from composer_shear._io import atomic_dir, write_text
from composer_shear._remote import download_tree, is_remote, join, list_keys, read_json, upload_file, upload_tree
from composer_shear.data import sources
from composer_shear.data.sources import SUFFIXES

__all__ = ['MANIFEST', 'data_location', 'find_domains', 'prepare', 'prepare_remote', 'published_build', 'verify_data']

# data-looking files this command does not read: named as an error instead of being skipped
UNSUPPORTED = ('.json', '.json.gz', '.json.zst', '.jsonl.bz2', '.jsonl.xz', '.jsonl.lz4', '.feather', '.orc')
DATASETS_META = ('state.json', 'dataset_info.json', 'dataset_dict.json')  # beside a save_to_disk folder's .arrow files
MANIFEST = 'manifest.json'
WORKER_BYTES = 1 << 24  # by default, one worker per 16 MiB of input (a small input is read in this process)
FORMAT = 'composer_shear.prepare-data/2'  # the manifest's `format`: what this module writes and can skip
BUILDING = '.prepare-data-building'  # marks a temporary output folder as this command's
BUILD = re.compile(r'build-\d{8}-\d{6}-[0-9a-f]{8}')  # the prefix of one remote build (`prepare_remote`)
SHARD_HASH = 'sha1'


def visible(path: Path, root: Path) -> bool:
    """No component below `root` is hidden (`.git`, editor and OS files)."""
    return not any(part.startswith('.') for part in path.relative_to(root).parts)


def domain_files(folder: Path) -> list[Path]:
    """The data files of one domain folder (recursively, hidden ones skipped); a file in a data-like format this
    command does not read is an error, not a silent skip."""
    files = sorted(p for p in folder.rglob('*') if p.is_file() and visible(p, folder) and p.name not in DATASETS_META)
    for p in files:
        if p.name.endswith(UNSUPPORTED) and not p.name.endswith(SUFFIXES):
            raise ValueError(f'prepare-data: {p}: unsupported format; expected {", ".join(SUFFIXES)} files '
                             '(JSON lines, Parquet, or a `datasets` save_to_disk folder)')
    return [p for p in files if p.name.endswith(SUFFIXES)]


def find_domains(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> dict[str, Path]:
    """Domain name -> folder. One folder of domain folders, or a list of domain folders."""
    inputs = [Path(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    for p in inputs:
        if not p.is_dir():
            raise FileNotFoundError(f'prepare-data: input {p} is not a folder')
    if len(inputs) == 1 and not domain_files_shallow(inputs[0]):
        domains = {d.name: d for d in sorted(inputs[0].iterdir()) if d.is_dir() and not d.name.startswith('.')}
    elif len(inputs) == 1 and any(d.is_dir() and not d.name.startswith('.') and domain_files(d)
                                  for d in inputs[0].iterdir()):
        stray = sorted(p.name for p in inputs[0].iterdir() if p.is_file() and p.name.endswith(SUFFIXES))
        raise ValueError(f'prepare-data: input {inputs[0]} holds data files ({", ".join(stray)}) beside domain '
                         'folders: move them into a domain folder (or pass the domain folders themselves)')
    else:
        domains = {p.name: p for p in inputs}
        if len(domains) < len(inputs):  # the domain name is the folder's name: two would be merged silently
            twice = sorted({p.name for p in inputs if [q.name for q in inputs].count(p.name) > 1})
            raise ValueError(f'prepare-data: input folders share the domain name(s) {twice}')
    if not domains:
        raise ValueError(f'prepare-data: no domain folders in {inputs[0]}')
    for name, folder in domains.items():
        if not domain_files(folder):
            raise ValueError(f'prepare-data: domain {name!r} ({folder}) has no {"/".join(SUFFIXES)} files')
    return domains


def domain_files_shallow(folder: Path) -> bool:
    return any(p.is_file() and p.name.endswith(SUFFIXES) and not p.name.startswith('.') for p in folder.iterdir())


def file_hash(path: Path, algo: str = 'sha256') -> str:
    """Hex digest of a file's content, read 1 MiB at a time."""
    h = hashlib.new(algo)
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_files(tokenizer_dir: str | os.PathLike) -> list[Path]:
    tok = Path(tokenizer_dir)
    return sorted(tok.glob('tokenizer*')) + sorted(tok.glob('special_tokens_map.json'))


def describe_inputs(domains: dict[str, Path], tokenizer_dir: str | os.PathLike, max_seq_len: int,
                    eval_fraction: float, seed: int, text_field: str = 'text', pool: Any = None) -> dict:
    """What the output is a function of: the settings and the content hash of every input and tokenizer file
    (hashed by `pool`'s workers when given)."""
    files = [(f'{name}/{f.relative_to(folder).as_posix()}', f)
             for name, folder in sorted(domains.items()) for f in domain_files(folder)]
    hashes = list(ordered(pool, file_hash, [(f,) for _, f in files]))
    described = {'max_seq_len': max_seq_len, 'eval_fraction': eval_fraction, 'seed': seed,
                 'files': {key: h for (key, _), h in zip(files, hashes, strict=True)},
                 'tokenizer_files': {f.name: file_hash(f) for f in tokenizer_files(tokenizer_dir)}}
    if text_field != 'text':  # outputs prepared before the option existed keep their fingerprint
        described['text_field'] = text_field
    return described


def fingerprint(inputs: dict) -> str:
    """One hash of `describe_inputs`."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def differences(old: dict, new: dict) -> list[str]:
    """What changed between two `describe_inputs` (for the refusal message)."""
    out = [f'{k} {old.get(k)} -> {new.get(k)}' for k in ('max_seq_len', 'eval_fraction', 'seed', 'text_field')
           if old.get(k) != new.get(k)]
    for key, label in (('files', 'input'), ('tokenizer_files', 'tokenizer file')):
        a, b = old.get(key) or {}, new[key]
        out += [f'{label} {f} added' for f in sorted(set(b) - set(a))]
        out += [f'{label} {f} gone' for f in sorted(set(a) - set(b))]
        out += [f'{label} {f} changed' for f in sorted(set(a) & set(b)) if a[f] != b[f]]
    return out


def eval_documents(n_docs: int, eval_fraction: float, seed: int, domain: str) -> set[int]:
    """Which documents go to eval: a seeded random subset (at least one, and never all)."""
    if n_docs < 2:
        raise ValueError(f'prepare-data: domain {domain!r} has {n_docs} document(s); need 2+ for disjoint splits')
    k = min(max(1, round(n_docs * eval_fraction)), n_docs - 1)
    rng = np.random.default_rng([seed, int(hashlib.sha256(domain.encode()).hexdigest()[:8], 16)])
    return set(rng.choice(n_docs, size=k, replace=False).tolist())


class Packer:
    """One split of one domain: documents' tokens concatenated and cut into `seq_len` rows, written to MDS as
    they fill (the tail that does not fill a row is dropped at the end). Carries less than one row between calls."""

    def __init__(self, folder: Path, seq_len: int, dtype: str, size_limit: int) -> None:
        from streaming import MDSWriter
        self.writer = MDSWriter(out=str(folder), columns={'tokens': f'ndarray:{dtype}'}, size_limit=size_limit,
                                hashes=[SHARD_HASH])
        self.seq_len, self.dtype = seq_len, dtype
        self.carry = np.zeros(0, dtype=dtype)
        self.documents = self.sequences = 0

    def add(self, token_lists: Sequence[Sequence[int]]) -> None:
        """Append documents' tokens and write every full row."""
        self.documents += len(token_lists)
        flat = np.concatenate([self.carry, *(np.asarray(ids, dtype=self.dtype) for ids in token_lists)])
        n = len(flat) // self.seq_len
        for row in flat[:n * self.seq_len].reshape(n, self.seq_len):
            self.writer.write({'tokens': row})
        self.sequences += n
        self.carry = flat[n * self.seq_len:]

    def close(self) -> dict:
        self.writer.finish()
        return {'documents': self.documents, 'tokens': self.sequences * self.seq_len, 'sequences': self.sequences}


def batches(texts: Iterable[str], max_chars: int = 1 << 18, max_docs: int = 256) -> Iterator[list[str]]:
    """Group documents for batched tokenization, 256 KiB of text at a time."""
    batch, chars = [], 0
    for t in texts:
        batch.append(t)
        chars += len(t)
        if chars >= max_chars or len(batch) >= max_docs:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def shard_problems(folder: Path) -> list[str]:
    """What is wrong with one MDS folder: its index unreadable, a shard missing, of the wrong size or not
    matching the SHA-1 its index records. Empty when sound."""
    index = folder / 'index.json'
    try:
        shards = json.loads(index.read_text())['shards']
    except FileNotFoundError:
        return [f'{index} is missing']
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f'{index} is unreadable ({e.__class__.__name__})']
    problems = []
    for shard in shards:
        info = shard.get('raw_data') or {}
        path = folder / str(info.get('basename'))
        if not path.is_file():
            problems.append(f'{path} is missing')
        elif path.stat().st_size != info.get('bytes'):
            problems.append(f'{path} has {path.stat().st_size} bytes, its index says {info.get("bytes")}')
        elif SHARD_HASH in (info.get('hashes') or {}) and file_hash(path, SHARD_HASH) != info['hashes'][SHARD_HASH]:
            problems.append(f'{path} is corrupt ({SHARD_HASH} differs from its index)')
    return problems


def read_manifest(out: Path) -> dict | None:
    """The output's manifest if it is one this module wrote, else None."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get('format') == FORMAT else None


def verify_data(out: str | os.PathLike) -> list[str]:
    """Check a prepare-data output: its manifest, every domain's splits against it, every shard's size and SHA-1
    (`composer-shear verify-data`). Returns the problems found (empty when sound). `out` may be an object-store
    URI: each domain is downloaded to a temporary folder in turn and checked there.

    Example:
        >>> problems = verify_data('data/rp')
        >>> assert not problems, problems
    """
    if is_remote(out):
        return verify_remote(str(out))
    out = Path(out)
    if not (out / MANIFEST).is_file():
        return [f'{out / MANIFEST} is missing: not a prepare-data output']
    manifest = read_manifest(out)
    if manifest is None:
        return [f'{out / MANIFEST} is not a manifest of this version of prepare-data (re-run it with --overwrite)']
    root = out / manifest['data'] if manifest.get('data') else out  # an object store's output, copied to disk
    problems = []
    for split in ('train', 'eval'):
        present = {p.name for p in (root / split).iterdir() if p.is_dir()} if (root / split).is_dir() else set()
        problems += [f'{root / split / d} is not in the manifest' for d in sorted(present - set(manifest['domains']))]
        for domain in manifest['domains']:
            problems += shard_problems(root / split / domain)
    return problems


def verify_remote(out: str) -> list[str]:
    """`verify_data` of an object-store output (see `prepare_remote`)."""
    raw = read_json(join(out, MANIFEST))
    if raw is None:
        return [f'{join(out, MANIFEST)} is missing: not a prepare-data output']
    if not isinstance(raw, dict) or raw.get('format') != FORMAT or not isinstance(raw.get('domains'), dict):
        return [f'{join(out, MANIFEST)} is not a manifest of this version of prepare-data '
                '(re-run it with --overwrite)']
    root = join(out, raw['data']) if raw.get('data') else out
    keys = list_keys(root)
    problems = []
    with tempfile.TemporaryDirectory(prefix='composer_shear_verify_') as tmp:
        for split in ('train', 'eval'):
            present = {k.split('/')[1] for k in keys if k.startswith(f'{split}/') and k.count('/') >= 2}
            problems += [f'{join(root, split, d)} is not in the manifest'
                         for d in sorted(present - set(raw['domains']))]
            for domain in raw['domains']:
                prefix = f'{split}/{domain}/'
                folder = Path(tmp, split, domain)
                download_tree(join(root, split, domain), folder,
                              [k[len(prefix):] for k in keys if k.startswith(prefix)])
                problems += [p.replace(str(folder), join(root, split, domain)) for p in shard_problems(folder)]
                shutil.rmtree(folder, ignore_errors=True)
    return problems


def published_build(local: str, remote: str | None = None) -> str | None:
    """The build a prepare-data output publishes: the `data` field of its manifest (what `prepare_remote` writes),
    or the build a `remote` ending in `build-...` names itself (a pinned build); None for a plain output."""
    remote = remote or None
    if remote is not None and BUILD.fullmatch(remote.rstrip('/').rsplit('/', 1)[-1]):
        return None  # the build's own prefix: already the data root
    if remote is None or not is_remote(remote):
        manifest = read_manifest(Path(remote or local))
    else:
        manifest = read_json(join(remote, MANIFEST))
    return (manifest.get('data') or None) if isinstance(manifest, dict) and manifest.get('format') == FORMAT else None


def data_location(local: str, remote: str | None = None, build: str | None = None) -> tuple[str, str | None]:
    """Where a prepare-data output's `{train,eval}/<domain>` folders are, as (local, remote) roots: the output's
    own root, or under `build` (see `published_build`) on the remote and in its local cache alike, so a cache
    never mixes two builds.

    Example:
        >>> data_location('cache', 's3://bucket/rp', 'build-20261207-101500-1a2b3c4d')
        ('cache/build-20261207-101500-1a2b3c4d', 's3://bucket/rp/build-20261207-101500-1a2b3c4d')
    """
    remote = remote or None
    if not build:
        return local, remote
    return os.path.join(local, build), (None if remote is None else join(remote, build))


def check_settings(out: Path | None, max_seq_len: int, eval_fraction: float, workers: int | None = None,
                   text_field: str = 'text') -> None:
    """Argument errors, before anything is read or written."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f'prepare-data: --workers must be a positive integer, got {workers!r}')
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f'prepare-data: --text-field must be a field name, got {text_field!r}')
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ValueError(f'prepare-data: --max-seq-len must be an integer of at least 2, got {max_seq_len!r}')
    if not 0 < eval_fraction < 1:
        raise ValueError(f'prepare-data: --eval-fraction must be between 0 and 1 (exclusive), got {eval_fraction!r}')
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(f'prepare-data: --out {out} exists and is not a folder')


def check_length(tokenizer_dir: str | os.PathLike, max_seq_len: int) -> None:
    """--max-seq-len within what the model beside the tokenizer (config.json) supports."""
    try:
        config = json.loads(Path(tokenizer_dir, 'config.json').read_text())
    except (OSError, ValueError):
        return  # a tokenizer alone: nothing to check against
    limit = config.get('max_position_embeddings') if isinstance(config, dict) else None
    if isinstance(limit, int) and max_seq_len > limit:
        raise ValueError(f'prepare-data: --max-seq-len {max_seq_len} is longer than the model supports '
                         f'(max_position_embeddings {limit} in {Path(tokenizer_dir, "config.json")})')


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """One prepare-data per output folder at a time (an advisory lock file beside it)."""
    import fcntl
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f'.{out.name}.prepare-data.lock'
    with open(lock, 'w') as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f'prepare-data: another prepare-data is writing {out} (lock {lock})') from None
        yield


def remove_stale_builds(out: Path) -> None:
    """What an interrupted run left beside `out`: its temporary folder (holding this command's marker file) and,
    when it died between moving the old output aside and the new one in, the old output, which goes back."""
    for tmp in out.parent.glob(f'.{out.name}.tmp-*'):
        if tmp.is_dir() and ((tmp / BUILDING).exists() or read_manifest(tmp) is not None):  # partial or finished
            shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(out.parent.glob(f'.{out.name}.old-*')):
        if old.is_dir() and read_manifest(old) is not None:
            if out.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.rename(out)


def prepare(inputs: str | os.PathLike | Iterable[str | os.PathLike], tokenizer_dir: str | os.PathLike,
            out: str | os.PathLike, max_seq_len: int, eval_fraction: float = 0.1, seed: int = 17,
            progress: bool = True, shard_bytes: int = 1 << 26, overwrite: bool = False, workers: int | None = None,
            text_field: str = 'text') -> dict:
    """Tokenize and pack every domain (see the module's docstring); returns the manifest. `shard_bytes`: MDS
    shard size (streaming's default); a shard being written is held in memory. `overwrite`: replace an output
    prepared from other inputs or settings, or a damaged one. `out` may be an object-store URI
    (`s3://bucket/prefix`): see `prepare_remote`. `workers`: processes that read and tokenize (default: the
    machine's cores, one per 16 MiB of input, at most one per part of a file); the output is the same for any
    number. `text_field`: the documents' field (JSON lines) or column (Parquet, Arrow).

    Example:
        >>> manifest = prepare('redpajama_sample', 'models/SmolLM2-135M', 'data/rp', max_seq_len=2048, workers=8)
    """
    if is_remote(out):
        return prepare_remote(inputs, tokenizer_dir, str(out), max_seq_len, eval_fraction, seed, progress,
                              shard_bytes, overwrite, workers, text_field)
    out = Path(out)
    check_settings(out, max_seq_len, eval_fraction, workers, text_field)
    domains = find_domains(inputs)
    check_length(tokenizer_dir, max_seq_len)
    with locked(out), worker_pool(workers_for(plan(domains), workers), tokenizer_dir) as pool:
        remove_stale_builds(out)
        described = describe_inputs(domains, tokenizer_dir, max_seq_len, eval_fraction, seed, text_field, pool)
        key = fingerprint(described)
        old = read_manifest(out) if out.is_dir() else None
        has_manifest = (out / MANIFEST).is_file()
        nonempty = out.is_dir() and any(out.iterdir())
        previous = reusable(str(out), old, has_manifest, nonempty, described, lambda: verify_data(out), overwrite)
        if previous is not None:
            return previous
        with atomic_dir(out, overwrite=True, marker=MANIFEST, mode=0o755) as tmp:
            (tmp / BUILDING).touch()
            manifest = build(domains, tokenizer_dir, tmp, max_seq_len, eval_fraction, seed, progress, shard_bytes,
                             text_field, pool)
            manifest.update(fingerprint=key, inputs=described)
            (tmp / BUILDING).unlink()
            write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + '\n')
    return manifest


def reusable(out: str, old: dict | None, has_manifest: bool, nonempty: bool, described: dict,
             problems: Callable[[], list[str]], overwrite: bool) -> dict | None:
    """The previous output's manifest when it was prepared from these inputs and is sound (nothing to do); None
    when a build may go ahead; raises when the build would replace something without `overwrite`."""
    if old is not None and old.get('fingerprint') == fingerprint(described):
        found = problems()
        if not found:
            return old
        if not overwrite:
            raise ValueError(f'prepare-data: {out} is damaged ({found[0]}'
                             f'{f"; {len(found) - 1} more" if len(found) > 1 else ""}): '
                             'pass --overwrite to rebuild it')
    elif has_manifest and not overwrite:
        changed = differences(old.get('inputs') or {}, described) if old else ['an older prepare-data version']
        raise ValueError(f'prepare-data: {out} was prepared from other inputs or settings '
                         f'({"; ".join(changed[:3])}{"; ..." if len(changed) > 3 else ""}): '
                         'pass --overwrite to rebuild it, or choose another --out')
    elif not has_manifest and nonempty:
        raise ValueError(f'prepare-data: {out} is not empty and is not a prepare-data output: refusing to '
                         'write into it (choose another --out, or empty it)')
    return None


def prepare_remote(inputs: str | os.PathLike | Iterable[str | os.PathLike], tokenizer_dir: str | os.PathLike,
                   out: str, max_seq_len: int, eval_fraction: float = 0.1, seed: int = 17, progress: bool = True,
                   shard_bytes: int = 1 << 26, overwrite: bool = False, workers: int | None = None,
                   text_field: str = 'text') -> dict:
    """`prepare` to an object store. An object store has no rename, so the output is built in a local temporary
    folder, uploaded under a new build prefix (`OUT/build-<time>-<id>/{train,eval}/<domain>/`) and published by
    writing `OUT/manifest.json` last, naming that prefix in its `data` field (one object written whole: readers
    see the old build or the new one, never a mixture). A failed run leaves the previous manifest, and so the
    previous output, as they were; runs still reading the previous build keep reading it (it is not deleted).
    No lock: run one prepare-data per remote output at a time.

    Example:
        >>> manifest = prepare('redpajama_sample', 'models/SmolLM2-135M', 's3://bucket/rp', max_seq_len=2048)
    """
    check_settings(None, max_seq_len, eval_fraction, workers, text_field)
    domains = find_domains(inputs)
    check_length(tokenizer_dir, max_seq_len)
    with worker_pool(workers_for(plan(domains), workers), tokenizer_dir) as pool:
        return _prepare_remote(domains, tokenizer_dir, out, max_seq_len, eval_fraction, seed, progress, shard_bytes,
                               overwrite, text_field, pool)


def _prepare_remote(domains: dict[str, Path], tokenizer_dir: str | os.PathLike, out: str, max_seq_len: int,
                    eval_fraction: float, seed: int, progress: bool, shard_bytes: int, overwrite: bool,
                    text_field: str, pool: Any) -> dict:
    described = describe_inputs(domains, tokenizer_dir, max_seq_len, eval_fraction, seed, text_field, pool)
    raw = read_json(join(out, MANIFEST))
    old = raw if isinstance(raw, dict) and raw.get('format') == FORMAT else None
    keys = list_keys(out) if raw is None else []
    has_manifest = raw is not None or MANIFEST in keys  # one that is not JSON counts: --overwrite replaces it
    orphan = [k for k in keys if BUILD.fullmatch(k.split('/', 1)[0])]  # left by a run that failed before publishing
    previous = reusable(out, old, has_manifest, bool(set(keys) - set(orphan)), described, lambda: verify_data(out),
                        overwrite)
    if previous is not None:
        return previous
    data = f'build-{time.strftime("%Y%m%d-%H%M%S", time.gmtime())}-{uuid.uuid4().hex[:8]}'
    with tempfile.TemporaryDirectory(prefix='composer_shear_prepare_') as tmp:
        folder = Path(tmp, 'data')
        manifest = build(domains, tokenizer_dir, folder, max_seq_len, eval_fraction, seed, progress, shard_bytes,
                         text_field, pool)
        manifest.update(fingerprint=fingerprint(described), inputs=described, data=data)
        upload_tree(folder, join(out, data), progress)
        Path(tmp, MANIFEST).write_text(json.dumps(manifest, indent=2) + '\n')
        upload_file(Path(tmp, MANIFEST), join(out, MANIFEST))
    return manifest


def plan(domains: dict[str, Path]) -> list[tuple[sources.Part, str]]:
    """What the workers read, in order: (part, its domain) for every part of every domain's files
    (`composer_shear.data.sources.parts`)."""
    return [(part, name) for name, folder in domains.items() for f in domain_files(folder)
            for part in sources.parts(f)]


def workers_for(work: Sequence[tuple[sources.Part, str]], workers: int | None) -> int:
    """`workers`, or by default the machine's cores, one per 16 MiB of input; never more than the parts."""
    if workers is None:
        workers = min(os.cpu_count() or 1, -(-sum(p.size for p, _ in work) // WORKER_BYTES))
    return max(1, min(workers, len(work)))


@contextlib.contextmanager
def worker_pool(workers: int, tokenizer_dir: str | os.PathLike) -> Iterator[Any]:
    """A pool of `workers` processes with the tokenizer loaded, or None (work in this process) for one."""
    if workers <= 1:
        yield None
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    # the platform's default start (fork on Linux: the workers start without importing again). Set, the variable
    # keeps tokenizers from warning at the fork that it turns its parallelism off (each worker turns it off itself)
    unset = 'TOKENIZERS_PARALLELISM' not in os.environ
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'true')
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(), initializer=_start_worker,
                               initargs=(str(tokenizer_dir),))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if unset:
            os.environ.pop('TOKENIZERS_PARALLELISM', None)


def ordered(pool: Any, fn: Callable, calls: Sequence[tuple], window: int = 0) -> Iterator[Any]:
    """fn(*args) for each args of `calls`, in order: in `pool`'s workers, at most `window` (default: 2 per worker)
    submitted ahead of the result being used, so results wait in memory only that far; in this process without
    a pool. A worker's error is raised here."""
    if pool is None:
        yield from (fn(*args) for args in calls)
        return
    window = window or 2 * pool._max_workers
    pending, rest = deque(), iter(calls)
    for args in rest:
        pending.append(pool.submit(fn, *args))
        if len(pending) >= window:
            break
    while pending:
        result = pending.popleft().result()
        args = next(rest, None)
        if args is not None:
            pending.append(pool.submit(fn, *args))
        yield result


_TOKENIZER: dict[str, Any] = {}


def _start_worker(tokenizer_dir: str) -> None:
    os.environ['TOKENIZERS_PARALLELISM'] = 'false'  # one core per worker
    _tokenizer(tokenizer_dir)


def _tokenizer(tokenizer_dir: str) -> Any:
    if tokenizer_dir not in _TOKENIZER:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        tok.model_max_length = 1 << 60  # documents are packed here: their length is not the model's input length
        _TOKENIZER[tokenizer_dir] = tok
    return _TOKENIZER[tokenizer_dir]


def _tokenize(part: sources.Part, field: str, tokenizer_dir: str, folder: str) -> tuple[str, np.ndarray]:
    """Every document of `part` tokenized and wrapped in BOS/EOS, written to a file in `folder` as uint32 (memory:
    one batch of documents); returns the file and each document's length."""
    tok = _tokenizer(tokenizer_dir)
    prefix = [tok.bos_token_id] if tok.bos_token_id is not None else []
    suffix = [tok.eos_token_id] if tok.eos_token_id is not None else []
    lengths: list[int] = []
    path = Path(folder, f'{uuid.uuid4().hex}.u32')
    with open(path, 'wb') as f:
        for batch in batches(text for _, text in sources.read(part, field)):
            for ids in tok(batch, add_special_tokens=False)['input_ids']:
                doc = np.asarray(prefix + ids + suffix, dtype=np.uint32)
                f.write(doc.tobytes())
                lengths.append(len(doc))
    return str(path), np.asarray(lengths, dtype=np.int64)


def documents(path: str, lengths: np.ndarray, budget: int = 1 << 20) -> Iterator[list[np.ndarray]]:
    """The documents `_tokenize` wrote, about `budget` tokens at a time (read from the file as they are used), then
    the file removed."""
    ends = np.cumsum(lengths)
    try:
        with open(path, 'rb') as f:
            start = 0
            while start < len(lengths):
                base = int(ends[start - 1]) if start else 0
                stop = max(start + 1, int(np.searchsorted(ends, base + budget, side='right')))
                chunk = lengths[start:stop]
                tokens = np.fromfile(f, dtype=np.uint32, count=int(chunk.sum()))
                yield np.split(tokens, np.cumsum(chunk)[:-1])
                start = stop
    finally:
        os.remove(path)


def build(domains: dict[str, Path], tokenizer_dir: str | os.PathLike, out: Path, max_seq_len: int,
          eval_fraction: float, seed: int, progress: bool, shard_bytes: int, text_field: str = 'text',
          pool: Any = None) -> dict:
    """Write every domain's train and eval MDS folders under `out` (a fresh folder); returns the manifest. The parts
    of the input files are counted and tokenized in `pool`'s workers (or here), and packed here in order."""
    from tqdm import tqdm

    tok = _tokenizer(str(tokenizer_dir))
    dtype = 'uint16' if len(tok) <= 1 << 16 else 'uint32'
    manifest = {'format': FORMAT, 'tokenizer': str(tokenizer_dir), 'max_seq_len': max_seq_len,
                'dtype': dtype, 'eval_fraction': eval_fraction, 'seed': seed, 'domains': {}}
    calls = plan(domains)
    total = sum(part.size for part, _ in calls)
    with tqdm(total=2 * total, desc='prepare-data (check, then tokenize)', unit='B', unit_scale=True,
              disable=not progress) as bar:
        held_out, n_docs = {}, dict.fromkeys(domains, 0)
        counts = ordered(pool, sources.count, [(p, text_field) for p, _ in calls])
        for (part, name), n in zip(calls, counts, strict=True):
            n_docs[name] += n
            bar.update(part.size)
        for name in domains:
            held_out[name] = eval_documents(n_docs[name], eval_fraction, seed, name)
        packers: dict[str, Packer] = {}
        current, index = None, 0
        scratch = out / '.tokens'  # the workers' tokens, until packed (inside the output being built)
        scratch.mkdir(parents=True)
        tokenized = ordered(pool, _tokenize, [(p, text_field, str(tokenizer_dir), str(scratch)) for p, _ in calls])
        for (part, name), (path, lengths) in zip(calls, tokenized, strict=True):
            if name != current:  # the first part of the next domain: close the one before
                if current is not None:
                    finish(manifest, current, packers, max_seq_len)
                packers = {split: Packer(out / split / name, max_seq_len, dtype, shard_bytes)
                           for split in ('train', 'eval')}
                current, index = name, 0
            for docs in documents(path, lengths):
                packers['eval'].add([d for k, d in enumerate(docs, index) if k in held_out[name]])
                packers['train'].add([d for k, d in enumerate(docs, index) if k not in held_out[name]])
                index += len(docs)
            bar.update(part.size)
        finish(manifest, current, packers, max_seq_len)
        scratch.rmdir()
    return manifest


def finish(manifest: dict, name: str, packers: dict[str, Packer], max_seq_len: int) -> None:
    """Close domain `name`'s packers and record them in `manifest`."""
    manifest['domains'][name] = {split: packer.close() for split, packer in packers.items()}
    for split in ('train', 'eval'):
        if manifest['domains'][name][split]['sequences'] == 0:
            raise ValueError(f'prepare-data: domain {name!r} has too little text for one {split} sequence '
                             f'of {max_seq_len} tokens')
