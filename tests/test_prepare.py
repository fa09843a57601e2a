"""`composer-shear prepare-data` and `reference-loss`: layout, manifest, disjoint splits, packing, re-runs,
interrupted runs, error messages, the CLI, and the reference loss against an independent computation."""

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zstandard

from composer_shear.data.prepare import prepare, verify_data
from composer_shear.testing import save_tiny

SEQ = 32
BOS, EOS = 1, 2
# alpha: two plain .jsonl files (one nested deeper), beta: one .jsonl.gz, gamma: two .jsonl.zst files
SIZES = {'alpha': 12, 'beta': 20, 'gamma': 25}
TAG = re.compile(r'<s>(\w+-\d{3}):')


def doc_text(domain, i):
    """A unique, tagged document of 51..80 characters: longer than SEQ + tag, so the dropped tail of a split
    can never hold a whole document (or its tag), and every document can be traced in the output."""
    return f'{domain}-{i:03d}: ' + ('lorem ipsum dolor sit amet ' * 3)[:40 + (7 * i) % 30]


def encode(text):
    """The tiny character tokenizer, independently: printable ASCII c -> ord(c) - 29, wrapped in BOS/EOS."""
    return [BOS] + [ord(c) - 29 for c in text] + [EOS]


def decode(ids):
    return ''.join({BOS: '<s>', EOS: '</s>'}.get(int(t), chr(int(t) + 29)) for t in ids)


def write_jsonl(path, lines):
    """Write `lines` (dicts, or raw strings written as they are); compressed by the file's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = ''.join((x if isinstance(x, str) else json.dumps(x)) + '\n' for x in lines).encode()
    if path.name.endswith('.gz'):
        data = gzip.compress(data)
    elif path.name.endswith('.zst'):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def docs(domain, ids):
    return [{'text': doc_text(domain, i), 'meta': {'n': i}} for i in ids]


@pytest.fixture
def corpus(tmp_path):
    """Three domains; returns (input root, {domain: texts in input order})."""
    root = tmp_path / 'raw'
    write_jsonl(root / 'alpha' / 'a0.jsonl', docs('alpha', range(3)) + [''] + docs('alpha', range(3, 5)))
    write_jsonl(root / 'alpha' / 'more' / 'a1.jsonl', docs('alpha', range(5, 12)))
    (root / 'alpha' / 'README.md').write_text('not data\n')
    write_jsonl(root / 'beta' / 'part-0.jsonl.gz', docs('beta', range(20)))
    write_jsonl(root / 'gamma' / 'a.jsonl.zst', docs('gamma', range(15)))
    write_jsonl(root / 'gamma' / 'b' / 'c.jsonl.zst', docs('gamma', range(15, 25)))
    return root, {d: [doc_text(d, i) for i in range(n)] for d, n in SIZES.items()}


def read_rows(folder):
    """All samples' `tokens` of one MDS folder, in order, read shard by shard (a StreamingDataset would hold
    shared-memory file descriptors for the rest of the test session)."""
    from streaming.base.format import reader_from_json
    index = json.loads((folder / 'index.json').read_text())
    rows = []
    for info in index['shards']:
        shard = reader_from_json(str(folder), None, info)
        rows += [shard.get_item(i)['tokens'] for i in range(shard.samples)]
    return rows


def leftovers(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob('*') if '.tmp-' in p.name)


def check_output(out, texts, manifest, seq=SEQ, eval_fraction=0.2):
    """Every domain's splits against the manifest and against the input documents, traced by their tags."""
    assert json.loads((out / 'manifest.json').read_text()) == manifest
    assert manifest['max_seq_len'] == seq and manifest['dtype'] == 'uint16'
    assert list(manifest['domains']) == list(texts)
    for split in ('train', 'eval'):
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(texts)
    for domain, domain_texts in texts.items():
        by_tag = {TAG.match('<s>' + t).group(1): t for t in domain_texts}
        seen = {}
        for split in ('train', 'eval'):
            rows = read_rows(out / split / domain)
            assert rows and all(r.dtype == np.uint16 and r.shape == (seq,) for r in rows)
            flat = np.concatenate(rows)
            tags = TAG.findall(decode(flat))
            assert len(tags) == len(set(tags)) and set(tags) <= set(by_tag)
            seen[split] = set(tags)
            # the split is exactly its documents, in input order, each wrapped in BOS/EOS, packed, tail dropped
            chosen = [t for tag, t in by_tag.items() if tag in seen[split]]
            expected = [i for t in chosen for i in encode(t)]
            assert len(rows) == len(expected) // seq
            assert flat.tolist() == expected[:len(flat)]
            assert flat[0] == BOS and (flat == BOS).sum() == len(chosen) and (flat == EOS).sum() >= len(chosen) - 1
            assert manifest['domains'][domain][split] == {'documents': len(chosen), 'tokens': len(flat),
                                                          'sequences': len(rows)}
        assert not seen['train'] & seen['eval']
        assert seen['train'] | seen['eval'] == set(by_tag)
        assert len(seen['eval']) == round(eval_fraction * len(domain_texts))


def test_layout_manifest_and_disjoint_splits(tmp_path, tok_dir, corpus):
    root, texts = corpus
    out = tmp_path / 'out'
    manifest = prepare(root, tok_dir, out, SEQ, eval_fraction=0.2, progress=False)
    check_output(out, texts, manifest)
    docs_per_split = {d: [v['train']['documents'], v['eval']['documents']] for d, v in manifest['domains'].items()}
    assert docs_per_split == {'alpha': [10, 2], 'beta': [16, 4], 'gamma': [20, 5]}
    assert leftovers(out) == []
    # a list of domain folders is the same as their parent folder
    listed = prepare([root / d for d in texts], tok_dir, tmp_path / 'listed', SEQ, eval_fraction=0.2, progress=False)
    assert listed['domains'] == manifest['domains']


def write_parquet(path, texts, column='text', row_group_size=4):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: texts, 'id': list(range(len(texts)))}), path, row_group_size=row_group_size)
    return path


def write_datasets_folder(path, texts):
    """A Hugging Face `datasets` folder, as `Dataset.save_to_disk` writes it (.arrow files and JSON metadata)."""
    from datasets import Dataset
    Dataset.from_dict({'text': texts}).save_to_disk(str(path), num_shards=2)
    return path


def test_workers_give_the_one_process_output_from_jsonl_parquet_and_datasets_folders(tmp_path, tok_dir, corpus,
                                                                                      monkeypatch):
    """Five domains in every input form (plain .jsonl split into parts of 200 bytes, so that lines straddle the
    parts' edges; .gz; .zst; Parquet in row groups of 4; a save_to_disk folder, next to a .jsonl file): 2 workers
    write the same files, byte for byte, as 1, and every split is its documents in input order."""
    from composer_shear.data import sources
    root, texts = corpus
    texts['delta'] = [doc_text('delta', i) for i in range(30)]
    write_parquet(root / 'delta' / 'a.parquet', texts['delta'][:18])
    write_parquet(root / 'delta' / 'b.parquet', texts['delta'][18:])
    texts['epsilon'] = [doc_text('epsilon', i) for i in range(24)]
    write_datasets_folder(root / 'epsilon' / 'saved', texts['epsilon'][:20])
    write_jsonl(root / 'epsilon' / 'z.jsonl', docs('epsilon', range(20, 24)))  # after saved/ in path order
    texts = dict(sorted(texts.items()))  # domains in name order
    monkeypatch.setattr(sources, 'PART_BYTES', 200)
    assert len(sources.parts(root / 'alpha' / 'more' / 'a1.jsonl')) >= 3
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f'out{workers}'
        manifest = prepare(root, tok_dir, out, SEQ, eval_fraction=0.2, progress=False, workers=workers)
        check_output(out, texts, manifest)
        outputs[workers] = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob('*')) if p.is_file()}
    assert outputs[1].keys() == outputs[2].keys() and len(outputs[1]) == 1 + 2 * 5 * 2  # manifest, index + shard
    for name, data in outputs[1].items():
        assert outputs[2][name] == data, name


def test_a_bad_line_in_a_later_part_is_named_by_its_line_in_the_file(tmp_path, tok_dir, monkeypatch):
    from composer_shear.data import sources
    root = tmp_path / 'raw'
    valid_domain(root, 'alpha')
    lines = docs('beta', range(30))
    lines[22] = '{"text": "unfinished'
    write_jsonl(root / 'beta' / 'b.jsonl', lines)
    monkeypatch.setattr(sources, 'PART_BYTES', 300)
    assert len(sources.parts(root / 'beta' / 'b.jsonl')) > 5
    with pytest.raises(ValueError, match=re.escape(f'{root / "beta" / "b.jsonl"}:23 is not valid JSON')):
        prepare(root, tok_dir, tmp_path / 'out', SEQ, progress=False, workers=2)


def test_text_field_names_the_column(tmp_path, tok_dir):
    root = tmp_path / 'raw'
    texts = {d: [doc_text(d, i) for i in range(10)] for d in ('alpha', 'beta')}
    write_parquet(root / 'alpha' / 'a.parquet', texts['alpha'], column='content')
    write_jsonl(root / 'beta' / 'b.jsonl', [{'content': t} for t in texts['beta']])
    with pytest.raises(ValueError, match=re.escape(f'{root / "alpha" / "a.parquet"} has no column `text` '
                                                   '(columns: content, id)')):
        prepare(root, tok_dir, tmp_path / 'out', SEQ, progress=False)
    manifest = prepare(root, tok_dir, tmp_path / 'out', SEQ, eval_fraction=0.2, progress=False,
                       text_field='content')
    check_output(tmp_path / 'out', texts, manifest)
    assert manifest['inputs']['text_field'] == 'content'


def test_uint32_for_a_large_vocabulary(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {'<unk>': 0, '<s>': 1, '</s>': 2} | {f'w{i}': i for i in range(3, 70000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token='<unk>', bos_token='<s>',
                            eos_token='</s>').save_pretrained(tmp_path / 'tok')
    words = [[69999 - 20 * d - j for j in range(20)] for d in range(4)]  # ids above 65535
    write_jsonl(tmp_path / 'raw' / 'words' / 'w.jsonl', [{'text': ' '.join(f'w{i}' for i in ids)} for ids in words])
    manifest = prepare(tmp_path / 'raw', tmp_path / 'tok', tmp_path / 'out', 11, eval_fraction=0.25, progress=False)
    assert manifest['dtype'] == 'uint32'
    assert manifest['domains']['words'] == {'train': {'documents': 3, 'tokens': 66, 'sequences': 6},
                                            'eval': {'documents': 1, 'tokens': 22, 'sequences': 2}}
    rows = read_rows(tmp_path / 'out' / 'eval' / 'words')
    assert all(r.dtype == np.uint32 for r in rows)
    flat = np.concatenate(rows).tolist()
    assert flat[0] == BOS and flat[-1] == EOS and flat[1:-1] in words and max(flat) > 65535


def test_rerun_is_skipped_and_other_inputs_need_overwrite(tmp_path, tok_dir, corpus, monkeypatch):
    from transformers import AutoTokenizer
    root, texts = corpus
    out = tmp_path / 'out'
    first = prepare(root, tok_dir, out, SEQ, eval_fraction=0.2, progress=False)
    before = snapshot(out)

    def no_tokenizer(*args, **kwargs):
        raise AssertionError('a complete output must not be redone')
    with monkeypatch.context() as m:
        m.setattr(AutoTokenizer, 'from_pretrained', no_tokenizer)
        start = time.perf_counter()
        again = prepare(root, tok_dir, out, SEQ, eval_fraction=0.2, progress=False)
        assert time.perf_counter() - start < 2
    assert again == first and snapshot(out) == before

    # other settings: refused, naming what differs, nothing touched; --overwrite rebuilds the whole output
    with pytest.raises(ValueError, match=re.escape('prepared from other inputs or settings (max_seq_len 32 -> 16)')):
        prepare(root, tok_dir, out, SEQ // 2, eval_fraction=0.2, progress=False)
    assert snapshot(out) == before
    half = prepare(root, tok_dir, out, SEQ // 2, eval_fraction=0.2, progress=False, overwrite=True)
    assert half['fingerprint'] != first['fingerprint']
    check_output(out, texts, half, seq=SEQ // 2)
    for domain, splits in half['domains'].items():
        for split, v in splits.items():
            old = first['domains'][domain][split]
            assert v['documents'] == old['documents'] and v['sequences'] >= 2 * old['sequences']

    # fewer domains: no stale domain is left beside the new ones
    fewer = prepare([root / 'alpha', root / 'beta'], tok_dir, out, SEQ // 2, eval_fraction=0.2, progress=False,
                    overwrite=True)
    assert list(fewer['domains']) == ['alpha', 'beta'] and sorted(p.name for p in (out / 'train').iterdir()) == \
        ['alpha', 'beta']

    # a changed input file is noticed by its content, even at the same size and modification time
    path = root / 'alpha' / 'a0.jsonl'
    stat, text = path.stat(), path.read_text()
    path.write_text(text.replace('alpha-000', 'alpha-00X'))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    with pytest.raises(ValueError, match=re.escape('(input alpha/a0.jsonl changed)')):
        prepare([root / 'alpha', root / 'beta'], tok_dir, out, SEQ // 2, eval_fraction=0.2, progress=False)


def snapshot(folder):
    """Every file under `folder` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def test_a_failed_or_killed_run_leaves_the_previous_output_intact(tmp_path, tok_dir, corpus, monkeypatch):
    root, texts = corpus
    out = tmp_path / 'out'
    prepare(root, tok_dir, out, SEQ, eval_fraction=0.2, progress=False)
    before = snapshot(out)

    # a bad file in the third domain (found after two domains were tokenized): the old output is untouched
    bad = write_jsonl(root / 'gamma' / 'z.jsonl', docs('gamma', [99]) + ['{"text": "cut off'])
    with pytest.raises(ValueError, match=re.escape(f'{bad}:2')):
        prepare(root, tok_dir, out, SEQ, eval_fraction=0.2, progress=False, overwrite=True)
    assert snapshot(out) == before and siblings(tmp_path) == ['out', 'raw', 'tok']

    # killed while writing the third domain: its temporary folder stays beside the output, the output is intact
    bad.unlink()
    from streaming import MDSWriter
    write = MDSWriter.write

    def dies_in_gamma(self, sample):
        if self.local.endswith('gamma'):
            raise KeyboardInterrupt
        return write(self, sample)
    write_jsonl(root / 'gamma' / 'z.jsonl', docs('gamma', [99]))  # other inputs: a rebuild
    with monkeypatch.context() as m:
        m.setattr(MDSWriter, 'write', dies_in_gamma)
        m.setattr(shutil, 'rmtree', lambda *a, **k: None)  # as if the process had died before cleaning up
        with pytest.raises(KeyboardInterrupt):
            prepare(root, tok_dir, out, SEQ, eval_fraction=0.2, progress=False, overwrite=True)
    assert snapshot(out) == before
    stale = [p for p in tmp_path.iterdir() if p.name.startswith('.out.tmp-')]
    assert len(stale) == 1 and (stale[0] / '.prepare-data-building').exists()
    (tmp_path / '.out.tmp-user').mkdir()  # a look-alike folder without the marker is not ours: kept

    manifest = prepare(root, tok_dir, out, SEQ, eval_fraction=0.2, progress=False, overwrite=True)
    check_output(out, texts | {'gamma': texts['gamma'] + [doc_text('gamma', 99)]}, manifest)
    assert siblings(tmp_path) == ['.out.tmp-user', 'out', 'raw', 'tok'] and verify_data(out) == []


def siblings(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith('.lock'))


def test_a_foreign_or_busy_output_is_refused(tmp_path, tok_dir, corpus):
    root, _ = corpus
    mine = tmp_path / 'mine'
    (mine / 'train' / 'cc').mkdir(parents=True)
    (mine / 'train' / 'cc' / 'my_model.bin').write_bytes(b'weights')
    (mine / 'manifest.txt').write_text('mine')
    before = snapshot(mine)
    for overwrite in (False, True):  # never written into, even with overwrite
        with pytest.raises(ValueError, match='is not empty and is not a prepare-data output: refusing'):
            prepare(root, tok_dir, mine, SEQ, progress=False, overwrite=overwrite)
    assert snapshot(mine) == before
    (mine / 'manifest.json').write_text('{"mine": true}')  # a foreign manifest: overwrite is required
    with pytest.raises(ValueError, match='an older prepare-data version'):
        prepare(root, tok_dir, mine, SEQ, progress=False)
    assert (mine / 'train' / 'cc' / 'my_model.bin').exists()

    import fcntl
    busy = tmp_path / 'busy'
    with open(tmp_path / '.busy.prepare-data.lock', 'w') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match='another prepare-data is writing'):
            prepare(root, tok_dir, busy, SEQ, progress=False)
    assert not busy.exists()


def test_damage_is_found_by_verify_the_rerun_and_the_loader(tmp_path, tok_dir, corpus):
    from composer_shear.data.dynamic import build_dynamic_text_dataloader
    root, _ = corpus
    out = tmp_path / 'out'
    first = prepare(root, tok_dir, out, SEQ, eval_fraction=0.2, progress=False)
    index = json.loads((out / 'train' / 'beta' / 'index.json').read_text())
    assert all(len(s['raw_data']['hashes']['sha1']) == 40 for s in index['shards'])
    shard = out / 'train' / 'beta' / index['shards'][0]['raw_data']['basename']
    data = bytearray(shard.read_bytes())
    data[-64:] = b'\xff' * 64  # overwritten bytes: the size is unchanged, token 65535 would be read
    shard.write_bytes(bytes(data))
    problems = verify_data(out)
    assert problems == [f'{shard} is corrupt (sha1 differs from its index)']
    with pytest.raises(ValueError, match=re.escape(f'{out} is damaged ({shard} is corrupt')):
        prepare(root, tok_dir, out, SEQ, eval_fraction=0.2, progress=False)

    def read_all():
        spec = build_dynamic_text_dataloader(None, 2, dict(local=str(out), domains=['beta'], proportions=[1.0],
                                                          epoch_size=2, max_seq_len=SEQ), num_workers=0)
        return [b['input_ids'] for b in spec.dataloader]
    with pytest.raises(ValueError, match=f'shard {re.escape(str(shard))} is corrupt'):
        read_all()
    shard.write_bytes(bytes(data[:-100]))  # truncated: refused when the loader is built
    with pytest.raises(ValueError, match=f'shard {re.escape(str(shard))} has {len(data) - 100} bytes'):
        read_all()
    assert prepare(root, tok_dir, out, SEQ, eval_fraction=0.2, progress=False, overwrite=True) == first
    assert verify_data(out) == [] and len(read_all()) == 1


def valid_domain(root, name, n=4):
    return write_jsonl(root / name / 'ok.jsonl', docs(name, range(n)))


def no_text(root):
    return write_jsonl(root / 'gamma' / 'x.jsonl', docs('gamma', range(2)) + [{'title': 'no text'}]), ':3 has no'


def text_not_string(root):
    return write_jsonl(root / 'gamma' / 'x.jsonl', [{'text': 5}] + docs('gamma', range(2))), ':1 has no'


def invalid_json(root):
    return write_jsonl(root / 'gamma' / 'x.jsonl.gz', docs('gamma', range(1)) + ['{"text": "a"']), ':2 is not valid'


def invalid_json_zst(root):
    return write_jsonl(root / 'gamma' / 'x.jsonl.zst', ['[not json'] + docs('gamma', range(2))), ':1 is not valid'


def truncated_gzip(root):
    path = root / 'gamma' / 'x.jsonl.gz'
    write_jsonl(path, docs('gamma', range(50)))
    path.write_bytes(path.read_bytes()[:-20])
    return path, 'cannot read'


def not_zstd(root):
    path = root / 'gamma' / 'x.jsonl.zst'
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"text": "a plain file named .zst"}\n')
    return path, 'cannot read'


def not_utf8(root):
    path = root / 'gamma' / 'x.jsonl'
    path.parent.mkdir(parents=True)
    path.write_bytes(json.dumps({'text': doc_text('gamma', 0)}).encode() + b'\n{"text": "caf\xe9"}\n')
    return f'{path}:2', 'is not valid JSON'


def corrupt_parquet(root):
    path = root / 'gamma' / 'x.parquet'
    path.parent.mkdir(parents=True)
    path.write_bytes(b'PAR1 not really parquet')
    return path, 'as Parquet'


def parquet_null_text(root):
    return write_parquet(root / 'gamma' / 'x.parquet', [doc_text('gamma', 0), None, 'c']), 'row 2 has no string'


def no_files(root):
    (root / 'gamma').mkdir()
    (root / 'gamma' / 'notes.txt').write_text('{"text": "not a jsonl file"}\n')
    return "'gamma'", 'has no .jsonl/.jsonl.gz/.jsonl.zst/.parquet/.arrow files'


def single_document(root):
    valid_domain(root, 'gamma', n=1)
    return "'gamma' has 1 document", 'need 2+'


def too_little_text(root):
    write_jsonl(root / 'gamma' / 'x.jsonl', [{'text': 'tiny'}, {'text': 'also tiny'}])
    return "'gamma' has too little text", 'of 32 tokens'


@pytest.mark.parametrize('fault', [no_text, text_not_string, invalid_json, invalid_json_zst, truncated_gzip, not_zstd,
                                   not_utf8, corrupt_parquet, parquet_null_text, no_files, single_document,
                                   too_little_text])
def test_errors_name_the_culprit(tmp_path, tok_dir, fault):
    root = tmp_path / 'raw'
    valid_domain(root, 'alpha')
    valid_domain(root, 'beta')
    parts = fault(root)
    with pytest.raises(ValueError) as e:
        prepare(root, tok_dir, tmp_path / 'out', SEQ, progress=False)
    for part in parts:
        assert str(part) in str(e.value)
    assert not (tmp_path / 'out' / 'manifest.json').exists()


def test_bad_input_folders(tmp_path, tok_dir):
    with pytest.raises(FileNotFoundError, match=re.escape(f'input {tmp_path / "nowhere"} is not a folder')):
        prepare(tmp_path / 'nowhere', tok_dir, tmp_path / 'out', SEQ, progress=False)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no domain folders in'):
        prepare(tmp_path / 'empty', tok_dir, tmp_path / 'out', SEQ, progress=False)
    # domain folders are named by their folder: two of the same name must not be merged silently
    for parent in ('x', 'y'):
        valid_domain(tmp_path / parent, 'web')
    with pytest.raises(ValueError, match=re.escape("share the domain name(s) ['web']")):
        prepare([tmp_path / 'x' / 'web', tmp_path / 'y' / 'web'], tok_dir, tmp_path / 'out', SEQ, progress=False)


def test_bad_settings_and_layouts_are_named_before_anything_is_written(tmp_path, tok_dir, corpus):
    root, _ = corpus
    out = tmp_path / 'out'
    for seq, eval_fraction, message in ((0, 0.1, '--max-seq-len must be an integer of at least 2, got 0'),
                                        (-5, 0.1, 'got -5'), (SEQ, 0.0, '--eval-fraction must be between 0 and 1'),
                                        (SEQ, -0.1, 'got -0.1'), (SEQ, 1.5, 'got 1.5')):
        with pytest.raises(ValueError, match=re.escape(message)):
            prepare(root, tok_dir, out, seq, eval_fraction=eval_fraction, progress=False)
    (tmp_path / 'file').write_text('x')
    with pytest.raises(ValueError, match='exists and is not a folder'):
        prepare(root, tok_dir, tmp_path / 'file', SEQ, progress=False)
    model = save_tiny(tmp_path / 'model')  # max_position_embeddings 128
    with pytest.raises(ValueError, match=r'--max-seq-len 129 is longer than the model supports \(max_position_'):
        prepare(root, model, out, 129, progress=False)
    assert not out.exists()

    (root / 'notes.jsonl').write_text('{"text": "a stray file"}\n')  # would turn the corpus into one domain
    with pytest.raises(ValueError, match=r'holds data files \(notes.jsonl\) beside domain folders'):
        prepare(root, tok_dir, out, SEQ, progress=False)
    (root / 'notes.jsonl').unlink()
    (root / 'beta' / 'extra.json').write_text('{"text": "json, not jsonl"}')
    with pytest.raises(ValueError, match=re.escape(f'{root / "beta" / "extra.json"}: unsupported format')):
        prepare(root, tok_dir, out, SEQ, progress=False)
    (root / 'beta' / 'extra.json').unlink()
    valid_domain(root / '.git', 'objects')  # hidden folders are never domains, nor read inside one
    write_jsonl(root / 'beta' / '.cache' / 'old.jsonl', docs('beta', range(50, 60)))
    manifest = prepare(root, tok_dir, out, SEQ, progress=False)
    assert list(manifest['domains']) == ['alpha', 'beta', 'gamma']
    assert sum(v['documents'] for v in manifest['domains']['beta'].values()) == SIZES['beta']


def cli(*args):
    return subprocess.run([sys.executable, '-m', 'composer_shear.cli', *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow  # two processes
def test_cli_prepare_data(tmp_path, tok_dir, corpus):
    root, _ = corpus
    out = tmp_path / 'out'
    run = cli('prepare-data', '--input', root, '--tokenizer', tok_dir, '--out', out, '--max-seq-len', SEQ)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((out / 'manifest.json').read_text())
    assert manifest['eval_fraction'] == 0.1 and manifest['seed'] == 17
    lines = run.stdout.splitlines()
    for domain, splits in manifest['domains'].items():
        assert f"{domain}: " + ', '.join(f"{s} {v['sequences']} seqs / {v['tokens']:,} tokens / {v['documents']} docs"
                                         for s, v in splits.items()) in lines
        assert sum(v['documents'] for v in splits.values()) == SIZES[domain]
        assert splits['eval']['documents'] == round(0.1 * SIZES[domain])
    assert lines[-1] == f'wrote {out} (uint16 tokens)'

    assert cli('verify-data', out).stdout.splitlines()[-1] == f'{out}: every shard is sound'
    bad = write_jsonl(root / 'beta' / 'extra.jsonl', docs('beta', [50]) + [{'txt': 'typo'}])
    run = cli('prepare-data', '--input', root, '--tokenizer', tok_dir, '--out', out, '--max-seq-len', SEQ,
              '--overwrite')
    assert run.returncode == 2
    assert 'error:' in run.stderr and f'{bad}:2 has no string `text` field' in run.stderr
    assert 'Traceback' not in run.stderr
    run = cli('prepare-data', '--input', root, '--tokenizer', tok_dir, '--out', tmp_path / 'new', '--max-seq-len', 0)
    assert run.returncode == 2 and run.stderr.count('\n') == 1 and '--max-seq-len must be' in run.stderr
    run = cli('prepare-data', '--input', root, '--tokenizer', tok_dir, '--out', tmp_path / 'new', '--max-seq-len', SEQ,
              '--workers', 0)
    assert run.returncode == 2 and run.stderr.count('\n') == 1 and '--workers must be a positive' in run.stderr
    assert not (tmp_path / 'new').exists()
    shard = next((out / 'eval' / 'gamma').glob('*.mds'))
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # one flipped byte
    run = cli('verify-data', out)
    assert run.returncode == 1 and run.stdout.splitlines() == [f'{shard} is corrupt (sha1 differs from its index)',
                                                              f'{out}: 1 problem(s)']
    assert cli('verify-data', tmp_path / 'nowhere').returncode == 2


@pytest.mark.slow  # a process
def test_reference_loss_matches_an_independent_computation(tmp_path):
    from transformers import AutoModelForCausalLM
    model_dir = save_tiny(tmp_path / 'model')
    root = tmp_path / 'raw'
    for name, n in SIZES.items():
        valid_domain(root, name, n)
    data = tmp_path / 'data'
    manifest = prepare(root, model_dir, data, 16, eval_fraction=0.2, progress=False)

    run = cli('reference-loss', '--model', model_dir, '--data', data, '--out', tmp_path / 'ref' / 'ref.json')
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / 'ref' / 'ref.json').read_text())
    assert set(result['losses']) == set(SIZES) == set(result['tokens'])
    assert not list((tmp_path / 'ref').glob('.*'))

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation='eager')
    for domain in SIZES:
        ids = torch.tensor(np.stack(read_rows(data / 'eval' / domain)).astype(np.int64))
        assert ids.shape == (manifest['domains'][domain]['eval']['sequences'], 16)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits.double(), dim=-1)
        nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        assert result['tokens'][domain] == nll.numel() == len(ids) * 15
        assert abs(result['losses'][domain] - nll.mean().item()) < 1e-5
    assert result['device'] == 'cpu' and result['dtype'] == 'float32'

    # bf16 weights (what a 7B source wants on a GPU): the same losses to bf16's precision
    run = cli('reference-loss', '--model', model_dir, '--data', data, '--out', tmp_path / 'bf16.json',
              '--dtype', 'bf16', '--device', 'cpu')
    assert run.returncode == 0, run.stderr
    bf16 = json.loads((tmp_path / 'bf16.json').read_text())
    assert bf16['dtype'] == 'bfloat16' and bf16['tokens'] == result['tokens']
    for domain in SIZES:
        assert 1e-6 < abs(bf16['losses'][domain] - result['losses'][domain]) < 0.05


PEAK = """
import json, sys
from pathlib import Path
from composer_shear.data.prepare import prepare, verify_data
root, mib = Path(sys.argv[1]), float(sys.argv[2])
doc = 'the quick brown fox jumps over the lazy dog ' * 50
(root / 'raw' / 'big').mkdir(parents=True)
with open(root / 'raw' / 'big' / 'a.jsonl', 'w') as f:
    for i in range(int(mib * 2**20 / len(doc))):
        f.write(json.dumps({'text': f'{i} ' + doc}) + '\\n')
def kb(key):
    return int(next(line for line in open('/proc/self/status') if line.startswith(key)).split()[1])
base = kb('VmRSS')
m = prepare(root / 'raw', sys.argv[3], root / 'out', 64, progress=False, shard_bytes=1 << 20)
print(json.dumps({'peak_mib': (kb('VmHWM') - base) / 1024, 'tokens': m['domains']['big']['train']['tokens']}))
"""


@pytest.mark.slow  # two processes tokenizing 10 MiB of text (~40 s)
@pytest.mark.skipif(not os.path.exists('/proc/self/status'), reason='reads VmHWM from /proc')
def test_memory_does_not_grow_with_the_corpus(tmp_path, tok_dir):
    """Documents are streamed: 4x the text (2 -> 8 MiB, ~2M -> ~8M tokens with the character tokenizer) adds
    less than 12 MiB to the peak. Holding a domain's documents and token lists, as before, grew the peak ~23 MiB
    per MiB of text (measured 91 -> 368 MiB for 4 -> 16 MiB)."""
    peaks = {}
    for mib in (2, 8):
        res = subprocess.run([sys.executable, '-c', PEAK, str(tmp_path / str(mib)), str(mib), tok_dir],
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        peaks[mib] = json.loads(res.stdout.strip().splitlines()[-1])
    assert peaks[8]['tokens'] > 3.5 * peaks[2]['tokens'] > 6_000_000
    assert peaks[8]['peak_mib'] - peaks[2]['peak_mib'] < 12, peaks
