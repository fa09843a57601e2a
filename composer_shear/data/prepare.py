"""`composer-shear prepare-data`: per-domain jsonl (RedPajama layout) -> tokenized MDS, disjoint train/eval.

Input: a folder holding one sub-folder per domain (or a list of domain folders), each with `*.jsonl`,
`*.jsonl.gz` or `*.jsonl.zst` files of objects with a `text` field. Every document is wrapped with BOS/EOS
(those the tokenizer has), documents are concatenated and cut into `max_seq_len` tokens (the tail is dropped).
Eval sequences come from documents that train never sees. Output:
`OUT/{train,eval}/<domain>/` (MDS, column `tokens`, uint16 when the vocabulary fits, else uint32) and
`OUT/manifest.json` (documents, tokens and sequences per domain and split, and the inputs' fingerprint).
Each split is written under a temporary name and renamed; the manifest is written last, so an interrupted run
is redone, and a complete one with the same inputs is skipped.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np

SUFFIXES = ('.jsonl', '.jsonl.gz', '.jsonl.zst')
MANIFEST = 'manifest.json'


def domain_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob('*') if p.is_file() and p.name.endswith(SUFFIXES))


def find_domains(inputs) -> dict[str, Path]:
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


def read_texts(path: Path):
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


def fingerprint(domains: dict[str, Path], tokenizer_dir, max_seq_len, eval_fraction, seed) -> str:
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


def pack(token_lists, seq_len):
    """Concatenate and cut into full sequences; returns (sequences array, tokens used)."""
    flat = np.fromiter((t for ids in token_lists for t in ids), dtype=np.int64)
    n = len(flat) // seq_len
    return flat[:n * seq_len].reshape(n, seq_len), n * seq_len


def prepare(inputs, tokenizer_dir, out, max_seq_len: int, eval_fraction: float = 0.1, seed: int = 17,
            progress: bool = True) -> dict:
    from streaming import MDSWriter
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
        docs = [t for f in domain_files(folder) for t in read_texts(f)]
        held_out = eval_documents(len(docs), eval_fraction, seed, name)
        ids = [prefix + tok(t, add_special_tokens=False)['input_ids'] + suffix
               for t in tqdm(docs, desc=f'tokenize {name}', leave=False, disable=not progress)]
        manifest['domains'][name] = {}
        for split in ('train', 'eval'):
            chosen = [x for i, x in enumerate(ids) if (i in held_out) == (split == 'eval')]
            seqs, used = pack(chosen, max_seq_len)
            if len(seqs) == 0:
                raise ValueError(f'prepare-data: domain {name!r} has too little text for one {split} sequence '
                                 f'of {max_seq_len} tokens')
            final = out / split / name
            tmp = out / split / f'.{name}.tmp-{os.getpid()}'
            shutil.rmtree(tmp, ignore_errors=True)
            with MDSWriter(out=str(tmp), columns={'tokens': f'ndarray:{dtype}'}) as w:
                for s in seqs:
                    w.write({'tokens': s.astype(dtype)})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            manifest['domains'][name][split] = {'documents': len(chosen), 'tokens': int(used),
                                                'sequences': int(len(seqs))}
    tmp = out / f'.{MANIFEST}.tmp-{os.getpid()}'
    tmp.write_text(json.dumps(manifest, indent=2) + '\n')
    os.replace(tmp, manifest_path)
    return manifest
