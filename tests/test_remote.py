"""Data in a real S3-compatible store (moto's server on 127.0.0.1): `prepare-data --out s3://...` gives the local
output's bytes, publishes a build only when it is complete (a failed or killed upload leaves the previous output
readable and sound), `verify-data` checks a remote output and names a damaged object, `dynamic_text` and
`domain_eval` read it through a local cache and give the local run's samples on each of 2 ranks, and an
unreachable store is one line naming the object."""

import json
import re
import time

import pytest

from composer_shear import _remote
from composer_shear._remote import RemoteError
from composer_shear.data.prepare import prepare, verify_data
from tests.common.s3 import BUCKET, s3_store
from tests.test_prepare import SEQ, docs, snapshot, write_jsonl

URI = f's3://{BUCKET}/rp'


@pytest.fixture
def corpus(tmp_path):
    """Three domains of tagged documents (plain and compressed files); returns (input root, None)."""
    root = tmp_path / 'raw'
    write_jsonl(root / 'alpha' / 'a.jsonl', docs('alpha', range(12)))
    write_jsonl(root / 'beta' / 'b.jsonl.gz', docs('beta', range(20)))
    write_jsonl(root / 'gamma' / 'c.jsonl.zst', docs('gamma', range(25)))
    return root, None


@pytest.fixture
def s3():
    with s3_store() as server:
        yield server


def remote_snapshot(server, prefix='rp/'):
    client = server.client()
    return {k: client.get_object(Bucket=BUCKET, Key=k)['Body'].read() for k in server.keys(prefix)}


def test_prepare_to_s3_is_the_local_output_published_last(s3, tmp_path, tok_dir, corpus, monkeypatch):
    root, _ = corpus
    local = prepare(root, tok_dir, tmp_path / 'local', SEQ, eval_fraction=0.2, progress=False)
    manifest = prepare(root, tok_dir, URI, SEQ, eval_fraction=0.2, progress=False, workers=2)  # == 1 worker's
    build = manifest.pop('data')
    assert re.fullmatch(r'build-\d{8}-\d{6}-[0-9a-f]{8}', build) and manifest == local
    objects = remote_snapshot(s3)
    files = {k: v for k, v in snapshot(tmp_path / 'local').items() if k != 'manifest.json'}
    assert {k.removeprefix(f'rp/{build}/'): v for k, v in objects.items() if k != 'rp/manifest.json'} == files
    assert json.loads(objects['rp/manifest.json']) == manifest | {'data': build}
    assert verify_data(URI) == []

    # the same inputs again: nothing is built or uploaded
    def no_upload(*args, **kwargs):
        raise AssertionError('a complete remote output must not be redone')
    with monkeypatch.context() as m:
        m.setattr(_remote, 'upload_file', no_upload)
        m.setattr('composer_shear.data.prepare.upload_file', no_upload)
        assert prepare(root, tok_dir, URI, SEQ, eval_fraction=0.2, progress=False) == manifest | {'data': build}

    # other inputs: refused without --overwrite, naming what differs
    with pytest.raises(ValueError, match=re.escape(f'{URI} was prepared from other inputs or settings '
                                                   '(max_seq_len 32 -> 16)')):
        prepare(root, tok_dir, URI, SEQ // 2, eval_fraction=0.2, progress=False)

    # the upload fails, or the process is killed, part-way: the published output is the previous one, still sound
    uploaded = []
    real = _remote.upload_file

    def fails_after_three(path, uri, error):
        if len(uploaded) == 3:
            raise error
        uploaded.append(uri)
        real(path, uri)
    for error in (RemoteError(f'{URI}/x: cannot upload (connection reset)'), KeyboardInterrupt()):
        uploaded.clear()
        with monkeypatch.context() as m:
            m.setattr(_remote, 'upload_file', lambda p, u, e=error: fails_after_three(p, u, e))
            m.setattr('composer_shear.data.prepare.upload_file', lambda p, u, e=error: fails_after_three(p, u, e))
            with pytest.raises(type(error)):
                prepare(root, tok_dir, URI, SEQ // 2, eval_fraction=0.2, progress=False, overwrite=True)
        assert len(uploaded) == 3 and not any(u.endswith('manifest.json') for u in uploaded)
        after = remote_snapshot(s3)
        assert {k: v for k, v in after.items() if k in objects} == objects and verify_data(URI) == []

    # --overwrite publishes a new build; the previous one stays for runs still reading it
    half = prepare(root, tok_dir, URI, SEQ // 2, eval_fraction=0.2, progress=False, overwrite=True)
    assert half['data'] != build and half['max_seq_len'] == SEQ // 2 and verify_data(URI) == []
    assert {k for k in s3.keys('rp/') if k.startswith(f'rp/{build}/')} == {f'rp/{build}/{k}' for k in files}

    # a first publish that failed leaves only its build prefix: the next run goes ahead without --overwrite
    with monkeypatch.context() as m:
        m.setattr('composer_shear.data.prepare.upload_file', no_upload)
        with pytest.raises(AssertionError, match='must not be redone'):
            prepare(root, tok_dir, f's3://{BUCKET}/fresh', SEQ, eval_fraction=0.2, progress=False)
    assert s3.keys('fresh/') and not [k for k in s3.keys('fresh/') if k.endswith('manifest.json')]
    assert 'data' in prepare(root, tok_dir, f's3://{BUCKET}/fresh', SEQ, eval_fraction=0.2, progress=False)
    # a manifest that is not JSON: refused, then replaced with --overwrite
    s3.client().put_object(Bucket=BUCKET, Key='fresh/manifest.json', Body=b'{cut')
    with pytest.raises(ValueError, match='older prepare-data version'):
        prepare(root, tok_dir, f's3://{BUCKET}/fresh', SEQ, eval_fraction=0.2, progress=False)
    prepare(root, tok_dir, f's3://{BUCKET}/fresh', SEQ, eval_fraction=0.2, progress=False, overwrite=True)
    assert verify_data(f's3://{BUCKET}/fresh') == []

    # a folder of other objects is never written into
    s3.client().put_object(Bucket=BUCKET, Key='mine/notes.txt', Body=b'keep')
    with pytest.raises(ValueError, match=re.escape(f's3://{BUCKET}/mine is not empty and is not a prepare-data')):
        prepare(root, tok_dir, f's3://{BUCKET}/mine', SEQ, eval_fraction=0.2, progress=False)
    assert s3.keys('mine/') == ['mine/notes.txt']


def test_verify_names_a_damaged_remote_object_and_the_rerun_repairs_it(s3, tok_dir, corpus, capsys):
    from composer_shear.cli import main
    root, _ = corpus
    first = prepare(root, tok_dir, URI, SEQ, eval_fraction=0.2, progress=False)
    base = f'{URI}/{first["data"]}'
    client = s3.client()
    key = f'rp/{first["data"]}/train/beta/shard.00000.mds'
    data = bytearray(client.get_object(Bucket=BUCKET, Key=key)['Body'].read())
    data[-64:] = b'\xff' * 64  # same size, other bytes
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    client.delete_object(Bucket=BUCKET, Key=f'rp/{first["data"]}/eval/gamma/shard.00000.mds')
    client.put_object(Bucket=BUCKET, Key=f'rp/{first["data"]}/train/delta/index.json', Body=b'{}')
    expected = [f'{base}/train/delta is not in the manifest',
                f'{base}/train/beta/shard.00000.mds is corrupt (sha1 differs from its index)',
                f'{base}/eval/gamma/shard.00000.mds is missing']
    assert verify_data(URI) == expected
    assert main(['verify-data', URI]) == 1
    assert capsys.readouterr().out.splitlines() == [*expected, f'{URI}: 3 problem(s)']
    with pytest.raises(ValueError, match=re.escape(f'{URI} is damaged ({expected[0]}; 2 more)')):
        prepare(root, tok_dir, URI, SEQ, eval_fraction=0.2, progress=False)
    again = prepare(root, tok_dir, URI, SEQ, eval_fraction=0.2, progress=False, overwrite=True)
    assert again['data'] != first['data'] and verify_data(URI) == []
    assert main(['verify-data', URI]) == 0 and f'{URI}: every shard is sound' in capsys.readouterr().out
    assert main(['verify-data', f's3://{BUCKET}/nothing']) == 1
    assert capsys.readouterr().out.startswith(f's3://{BUCKET}/nothing/manifest.json is missing')


def test_loaders_read_s3_through_a_cache_as_the_local_output(s3, tmp_path, tok_dir, corpus):
    from composer_shear.data.dynamic import DomainEvalSet, build_dynamic_text_dataloader
    root, _ = corpus
    prepare(root, tok_dir, tmp_path / 'local', SEQ, eval_fraction=0.2, progress=False)
    manifest = prepare(root, tok_dir, URI, SEQ, eval_fraction=0.2, progress=False)

    def batches(local, remote, rank):
        spec = build_dynamic_text_dataloader(None, 2, dict(
            local=str(local), remote=remote, domains=['alpha', 'beta', 'gamma'], proportions=[0.5, 0.3, 0.2],
            epoch_size=8, max_seq_len=SEQ, rank=rank, world_size=2), num_workers=0)
        return [b['input_ids'].tolist() for b in spec.dataloader]
    for rank in (0, 1):  # each rank with its own cache, as on two hosts
        cache = tmp_path / f'cache{rank}'
        assert batches(cache, URI, rank) == batches(tmp_path / 'local', None, rank)
        assert list((cache / manifest['data'] / 'train' / 'beta').glob('*.mds'))
    for domain in ('alpha', 'gamma'):
        remote = [s['input_ids'].tolist() for s in DomainEvalSet(str(tmp_path / 'cache0'), domain, 2, SEQ,
                                                                  remote=URI)]
        assert remote == [s['input_ids'].tolist() for s in DomainEvalSet(str(tmp_path / 'local'), domain, 2, SEQ)]

    # a run resumed after a new build was published refuses to apply its cursors to other data; the old build's
    # prefix, pinned as `remote`, resumes on the data it read (its own cache folder)
    from composer_shear.data.dynamic import DynamicStreamingDataset
    from composer_shear.errors import ConfigError

    def dataset(cache, remote):
        return DynamicStreamingDataset(local=str(cache), remote=remote, domains=['alpha', 'beta'],
                                       proportions=[0.5, 0.5], epoch_size=4, device_batch_size=2, max_seq_len=SEQ)
    before = dataset(tmp_path / 'cache0', URI)
    state = before.state_dict()
    assert state['build'] == manifest['data']
    before.start_interval()
    expected = [x['input_ids'].tolist() for x in before]
    write_jsonl(root / 'beta' / 'more.jsonl', docs('beta', range(20, 30)))
    new = prepare(root, tok_dir, URI, SEQ, eval_fraction=0.2, progress=False, overwrite=True)['data']
    with pytest.raises(ConfigError, match=f'read build {manifest["data"]} of the data, which now publishes {new}'):
        dataset(tmp_path / 'cache2', URI).load_state_dict(state)
    pinned = dataset(tmp_path / 'cache3', f'{URI}/{manifest["data"]}')
    pinned.load_state_dict(state)
    pinned.start_interval()
    assert [x['input_ids'].tolist() for x in pinned] == expected != []

    s3.client().put_object(Bucket=BUCKET, Key='run/empty.symlink', Body=b'')
    with pytest.raises(RemoteError, match=re.escape(f's3://{BUCKET}/run/empty.symlink: not a link')):
        with _remote.local_copy(f's3://{BUCKET}/run/empty.symlink'):
            pass


def test_a_shard_missing_or_corrupt_in_the_store_is_one_line_and_the_repaired_store_is_read(s3, tmp_path):
    """A training loader (2 DataLoader workers) reading a store where one shard was deleted and another corrupted
    (same size, other bytes): the missing one fails the interval with one line naming the object, not torch's
    worker traceback nor streaming's retries; with it put back, the corrupt one fails naming its object, and its
    downloaded copy (only that file) leaves the cache; with it repaired, the next loader on the same cache reads
    the local run's batches. A shard whose download failed is marked as not downloaded, so that no other worker
    waits for it."""
    from composer_shear._remote import upload_tree
    from composer_shear.data.dynamic import build_dynamic_text_dataloader
    from tests.common.train_dynamic import DOMAINS, write_data
    from tests.common.train_dynamic import SEQ as DYN_SEQ
    data, cache, uri = tmp_path / 'data', tmp_path / 'cache', f's3://{BUCKET}/dyn'
    write_data(data, shard_bytes=800)  # ten samples a shard
    upload_tree(data, uri, progress=False)

    def intervals(local, remote):
        spec = build_dynamic_text_dataloader(None, 4, dict(
            local=str(local), remote=remote, domains=DOMAINS, proportions=[0.6, 0.3, 0.1], epoch_size=40,
            max_seq_len=DYN_SEQ, rank=0, world_size=1), num_workers=2, persistent_workers=False)
        # workers per interval: they end with it, or with its error (persistent ones would wait for the garbage
        # collector, which here takes 5 s a worker to end them)
        return [b['input_ids'].tolist() for _ in range(3) for b in spec.dataloader]
    client, missing, corrupt = s3.client(), 'dyn/train/alpha/shard.00005.mds', 'dyn/train/beta/shard.00003.mds'
    good = s3.read(corrupt)
    client.put_object(Bucket=BUCKET, Key=corrupt, Body=good[:-8] + b'\xff' * 8)
    client.delete_object(Bucket=BUCKET, Key=missing)
    with pytest.raises(RemoteError) as e:
        intervals(cache, uri)
    assert re.fullmatch(re.escape(f's3://{BUCKET}/{missing}: cannot download (Object s3://{BUCKET}/{missing} '
                                  'not found!') + '[^\n]*', str(e.value)), str(e.value)
    assert e.value.__suppress_context__ and '\n' not in str(e.value)
    # the failed shard is marked as not downloaded: streaming would leave it "being downloaded", and a worker
    # waiting for it would wait forever (the loader, handing batches out in order, would wait for that worker)
    from streaming.base.dataset import _ShardState

    from composer_shear.data.dynamic import DynamicStreamingDataset
    ds = DynamicStreamingDataset(local=str(tmp_path / 'cache-direct'), remote=uri, domains=DOMAINS,
                                 proportions=[0.6, 0.3, 0.1], epoch_size=40, device_batch_size=4, max_seq_len=DYN_SEQ)
    shard = next(i for i, r in enumerate(ds.store.shards)
                 if r.dirname.endswith('alpha') and r.raw_data.basename == 'shard.00005.mds')
    with pytest.raises(RemoteError, match=re.escape(missing)):
        ds.sample(0, next(i for i in range(ds.sizes[0]) if ds.store.spanner[i][0] == shard))
    assert ds.store._shard_states[shard] == _ShardState.REMOTE
    cached = sorted(p for p in cache.rglob('*') if p.is_file())
    client.put_object(Bucket=BUCKET, Key=missing, Body=(data / 'train' / 'alpha' / 'shard.00005.mds').read_bytes())
    with pytest.raises(ValueError) as e:
        intervals(cache, uri)
    assert str(e.value) == (f'dynamic_text: shard s3://{BUCKET}/{corrupt} is corrupt (sha1 of the downloaded copy '
                            'differs from its index.json; the copy was removed from the cache; run composer-shear '
                            'verify-data on the store)')
    now = sorted(p for p in cache.rglob('*') if p.is_file())
    assert set(cached) - set(now) <= {cache / 'train' / 'beta' / 'shard.00003.mds'}  # nothing else left the cache
    assert not (cache / 'train' / 'beta' / 'shard.00003.mds').exists()
    client.put_object(Bucket=BUCKET, Key=corrupt, Body=good)
    assert intervals(cache, uri) == intervals(data, None)


def test_an_unreachable_store_is_one_line_naming_the_object(s3, tmp_path, tok_dir, corpus, capsys):
    from composer_shear.cli import main
    root, _ = corpus
    prepare(root, tok_dir, URI, SEQ, eval_fraction=0.2, progress=False)
    s3.stop()
    start = time.monotonic()
    with pytest.raises(RemoteError, match=re.escape(f'{URI}/manifest.json: cannot download (')):
        verify_data(URI)
    assert main(['verify-data', URI]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f'composer-shear verify-data: error: {URI}/manifest.json: cannot download (')
    assert len(err.splitlines()) == 1 and time.monotonic() - start < 120  # botocore's retries, not a hang
    with pytest.raises(RemoteError, match=re.escape(f's3://{BUCKET}/run/x.symlink: cannot download')):
        with _remote.local_copy(f's3://{BUCKET}/run/x.symlink'):
            pass
    write_jsonl(root / 'alpha' / 'z.jsonl', docs('alpha', [99]))
    assert main(['prepare-data', '--input', str(root), '--tokenizer', tok_dir, '--out', URI, '--max-seq-len',
                 str(SEQ)]) == 1
    assert capsys.readouterr().err.count('\n') == 1
