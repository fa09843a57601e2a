"""`composer-shear prepare-data`: per-domain jsonl (RedPajama layout) -> tokenized MDS, disjoint train/eval.

Input: a folder holding one sub-folder per domain (or a list of domain folders), each with `*.jsonl`,
`*.jsonl.gz` or `*.jsonl.zst` files of objects with a `text` field. Every document is wrapped with BOS/EOS
(those the tokenizer has), documents are concatenated and cut into `max_seq_len` tokens (the tail is dropped).
Eval sequences come from documents that train never sees. Output:
`OUT/{train,eval}/<domain>/` (MDS, column `tokens`, uint16 when the vocabulary fits, else uint32) and
`OUT/manifest.json` (documents, tokens and sequences per domain and split, and the inputs' fingerprint).
Each split is written under a temporary name and renamed; the manifest is written last, so an interrupted run
is redone, and a complete one with the same inputs is skipped. Documents are streamed (a first pass counts and
validates them, the second tokenizes 256 KiB at a time): memory does not grow with the corpus.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from composer_shear._io import write_text

SUFFIXES = ('.jsonl', '.jsonl.gz', '.jsonl.zst')
MANIFEST = 'manifest.json'


def domain_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob('*') if p.is_file() and p.name.endswith(SUFFIXES))


def find_domains(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> dict[str, Path]:
    """Domain name -> folder. One folder of domain folders, or a list of domain folders."""
    inputs = [Path(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    for p in inputs:
        if not p.is_dir():
            raise FileNotFoundError(f'prepare-data: input {p} is not a folder')
    if len(inputs) == 1 and not domain_files_shallow(inputs[0]):
        domains = {d.name: d for d in sorted(inputs[0].iterdir()) if d.is_dir()}
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
    return any(p.is_file() and p.name.endswith(SUFFIXES) for p in folder.iterdir())


def read_texts(path: Path) -> Iterator[str]:
    """Yield the `text` of every line; a clear error names the file and line otherwise."""
    errors = (OSError, EOFError, UnicodeDecodeError)  # corrupt or truncated files: name them, no traceback
    if path.name.endswith('.gz'):
        stream = io.TextIOWrapper(gzip.open(path, 'rb'), encoding='utf-8')
    elif path.name.endswith('.zst'):
        import zstandard
        errors += (zstandard.ZstdError,)
        stream = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, 'rb')), encoding='utf-8')
    else:
        stream = open(path, encoding='utf-8')
    n = 0
    try:
        with stream:
            for n, line in enumerate(stream, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f'prepare-data: {path}:{n} is not valid JSON ({e.msg})') from e
                if not isinstance(obj, dict) or not isinstance(obj.get('text'), str):
                    raise ValueError(f'prepare-data: {path}:{n} has no string `text` field')
                yield obj['text']
    except errors as e:
        raise ValueError(f'prepare-data: cannot read {path} after line {n} ({e})') from e


def fingerprint(domains: dict[str, Path], tokenizer_dir: str | os.PathLike, max_seq_len: int, eval_fraction: float,
                seed: int) -> str:
    """A hash of the input files (names, sizes, mtimes), the tokenizer files and the settings."""
    h = hashlib.sha256()
    for name, folder in sorted(domains.items()):
        for f in domain_files(folder):
            st = f.stat()
            h.update(f'{name}/{f.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}'.encode())
    tok = Path(tokenizer_dir)
    for f in sorted(tok.glob('tokenizer*')) + sorted(tok.glob('special_tokens_map.json')):
        h.update(f.read_bytes())
    h.update(f'{max_seq_len}:{eval_fraction}:{seed}'.encode())
    return h.hexdigest()


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
        self.writer = MDSWriter(out=str(folder), columns={'tokens': f'ndarray:{dtype}'}, size_limit=size_limit)
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


def remove(folders: Iterable[str | os.PathLike]) -> None:
    """Delete folders, ignoring missing ones."""
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def prepare(inputs: str | os.PathLike | Iterable[str | os.PathLike], tokenizer_dir: str | os.PathLike,
            out: str | os.PathLike, max_seq_len: int, eval_fraction: float = 0.1, seed: int = 17,
            progress: bool = True, shard_bytes: int = 1 << 26) -> dict:
    """Tokenize and pack every domain (see the module's docstring); returns the manifest. `shard_bytes`: MDS
    shard size (streaming's default); a shard being written is held in memory."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    domains = find_domains(inputs)
    out = Path(out)
    key = fingerprint(domains, tokenizer_dir, max_seq_len, eval_fraction, seed)
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get('fingerprint') == key and all((out / s / d / 'index.json').exists()
                                                  for s in ('train', 'eval') for d in domains):
            return old
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tok)
    dtype = 'uint16' if vocab <= 1 << 16 else 'uint32'
    prefix = [tok.bos_token_id] if tok.bos_token_id is not None else []
    suffix = [tok.eos_token_id] if tok.eos_token_id is not None else []
    out.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)
    # temporary files of an interrupted run (of any process) are never renamed: remove them
    for stale in [*out.glob(f'.{MANIFEST}.tmp-*'), *(p for s in ('train', 'eval') for p in (out / s).glob('.*.tmp-*'))]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    manifest = {'fingerprint': key, 'tokenizer': str(tokenizer_dir), 'max_seq_len': max_seq_len,
                'dtype': dtype, 'eval_fraction': eval_fraction, 'seed': seed, 'domains': {}}
    for name, folder in tqdm(domains.items(), desc='domains', disable=not progress):
        files = domain_files(folder)
        n_docs = sum(1 for f in files for _ in read_texts(f))  # a first pass validates and counts
        held_out = eval_documents(n_docs, eval_fraction, seed, name)
        tmp = {split: out / split / f'.{name}.tmp-{os.getpid()}' for split in ('train', 'eval')}
        remove(tmp.values())
        packers = {split: Packer(tmp[split], max_seq_len, dtype, shard_bytes) for split in tmp}
        texts = (t for f in files for t in read_texts(f))
        index = 0
        with tqdm(total=n_docs, desc=f'tokenize {name}', unit='doc', leave=False, disable=not progress) as bar:
            for batch in batches(texts):
                ids = tok(batch, add_special_tokens=False)['input_ids']
                split_of = ['eval' if index + i in held_out else 'train' for i in range(len(batch))]
                for split, packer in packers.items():
                    packer.add([prefix + x + suffix for x, s in zip(ids, split_of, strict=True) if s == split])
                index += len(batch)
                bar.update(len(batch))
        manifest['domains'][name] = {split: packer.close() for split, packer in packers.items()}
        for split in ('train', 'eval'):
            if manifest['domains'][name][split]['sequences'] == 0:
                remove(tmp.values())
                raise ValueError(f'prepare-data: domain {name!r} has too little text for one {split} sequence '
                                 f'of {max_seq_len} tokens')
        for split in ('train', 'eval'):
            final = out / split / name
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp[split], final)
    write_text(manifest_path, json.dumps(manifest, indent=2) + '\n')
    return manifest
