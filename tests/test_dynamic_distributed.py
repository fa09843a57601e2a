"""`composer -n 2`: pruning with dynamic loading (2 persistent workers per rank) and per-domain eval. Both ranks
hold identical weights after every update, and they follow the rule applied to the logged per-domain losses. The
same run on two nodes reading its data from an S3-compatible store is the same run, and a run continues on another
world size and after it lost the store."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from composer_shear.data.weights import update_domain_weights
from tests.common.train_dynamic import REFERENCE

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent  # the launcher runs `python -m tests.common.train_dynamic` from here


COMPOSER = str(Path(sys.executable).with_name('composer'))
MODULE = ['-m', 'tests.common.train_dynamic']
# FSDP2 with sharded checkpoints and shear_distill; the same mask noise on every rank (the method draws it per rank:
# on another world size a continued run would draw other masks, see test_a_run_continues_on_another_world_size)
FSDP = ('fsdp', 'sharded', 'distill', 'shared_noise')
FSDP_ENV = {'FSDP_VERSION': '2'}


def launch(out, *args, env=None, nproc=2, check=True):
    cmd = [COMPOSER, '-n', str(nproc), *MODULE, str(out), *args]
    res = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert res.returncode == 0 or not check, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def read(out, name, rank):
    return json.loads((out / f'{name}-rank{rank}.json').read_text())


@pytest.fixture(scope='module')
def fsdp_run(tmp_path_factory):
    """FSDP2, sharded checkpoints, distillation: the one-node run the two-node and world-size tests compare with."""
    out = tmp_path_factory.mktemp('fsdp')
    launch(out, *FSDP, env=FSDP_ENV)
    return out


def test_weights_identical_on_ranks_and_follow_the_rule(fsdp_run):
    h0, h1 = (read(fsdp_run, 'history', r) for r in (0, 1))
    assert h0 == h1 and len(h0) == 4
    weights = np.array([0.6, 0.3, 0.1])
    for step in h0:
        weights = update_domain_weights(weights, step['losses'], REFERENCE)
        np.testing.assert_allclose(step['weights'], weights, rtol=1e-12)
    assert abs(weights[0] - 0.6) > 0.05  # the mix moved


def test_a_resume_mid_interval_gives_the_uninterrupted_run(fsdp_run):
    """Resumed on the same 2 ranks from the sharded checkpoint taken mid-interval, the run reads the same batches
    and ends with the same per-domain eval losses and domain weights, bit for bit (an interval boundary:
    test_a_run_continues_on_another_world_size_and_after_losing_the_store)."""
    launch(fsdp_run, *FSDP, f'resume={fsdp_run / "ckpt" / "ep1-ba7"}', 'tag=again', env=FSDP_ENV)
    for r in (0, 1):
        assert read(fsdp_run, 'again', r) == read(fsdp_run, 'history', r)
        batches, again = read(fsdp_run, 'history-batches', r), read(fsdp_run, 'again-batches', r)
        assert sorted(int(k) for k in again if k.isdigit()) == list(range(7, 20))
        assert all(batches[k] == v for k, v in again.items())


def close(a, b, rtol):
    """Nested JSON values equal, floats within `rtol` (the sums of another world size round differently)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], rtol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(close(x, y, rtol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-3)
    return a == b


NODES_EVAL_RTOL = 1e-5  # measured: 1.0e-6 (a float32 ulp of the losses, carried into the weights)


def test_two_nodes_reading_s3_give_the_one_node_run(fsdp_run, tmp_path):
    """Two `composer` launchers of one process each (`--world_size 2 --nproc 1 --node_rank 0|1`, as two hosts, each
    with its own folders and cache), FSDP2 with distillation, reading `remote: s3://...` (a prepare-data build prefix
    named by its manifest): the batches, per-step losses, masks and multipliers of the one-node run from local data,
    bit for bit. The per-domain eval losses and domain weights match to NODES_EVAL_RTOL: streaming deals the eval
    samples out by node, so each rank sums other samples. The one-node run's sharded
    checkpoint, put in the store, exports from there as from disk."""
    import torch

    from composer_shear._remote import upload_file, upload_tree
    from composer_shear.data.prepare import FORMAT, MANIFEST
    from composer_shear.export import export_checkpoint
    from tests.common.s3 import BUCKET, free_port, s3_store
    port = str(free_port())
    with s3_store():
        upload_tree(fsdp_run / 'data', f's3://{BUCKET}/dyn/build-1', progress=False)
        (tmp_path / MANIFEST).write_text(json.dumps({'format': FORMAT, 'data': 'build-1'}))
        upload_file(tmp_path / MANIFEST, f's3://{BUCKET}/dyn/{MANIFEST}')
        procs = [subprocess.Popen([COMPOSER, '--world_size', '2', '--nproc', '1', '--node_rank', str(n),
                                   '--master_addr', '127.0.0.1', '--master_port', port, *MODULE,
                                   str(tmp_path / f'node{n}'), *FSDP, f'remote=s3://{BUCKET}/dyn'],
                                  env={**os.environ, **FSDP_ENV}, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for n in (0, 1)]
        outs = [p.communicate(timeout=600) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[0][-2000:] + o[1][-3000:] for o in outs]
        # a sharded checkpoint exports from the store as from disk
        upload_tree(fsdp_run / 'ckpt' / 'ep2-ba10', f's3://{BUCKET}/ckpt/ep2-ba10', progress=False)
        export_checkpoint(f's3://{BUCKET}/ckpt/ep2-ba10', tmp_path / 'remote-export', source=str(fsdp_run / 'model'))
    export_checkpoint(fsdp_run / 'ckpt' / 'ep2-ba10', tmp_path / 'local-export', source=str(fsdp_run / 'model'))
    for name in ('model.safetensors', 'config.json', 'shape_report.json'):
        assert (tmp_path / 'remote-export' / name).read_bytes() == (tmp_path / 'local-export' / name).read_bytes()
    for r in (0, 1):
        node = tmp_path / f'node{r}'  # global rank r ran on node r
        assert list((node / 'cache' / 'build-1' / 'train' / 'beta').glob('*.mds'))
        assert not (tmp_path / f'node{1 - r}' / f'history-rank{r}.json').exists()
        assert read(node, 'history-batches', r) == read(fsdp_run, 'history-batches', r)
        assert close(read(node, 'history', r), read(fsdp_run, 'history', r), NODES_EVAL_RTOL)
        here, there = (torch.load(out / f'history-masks-rank{r}.pt') for out in (node, fsdp_run))
        assert all(torch.equal(here['log_alpha'][k], there['log_alpha'][k]) for k in there['log_alpha'])
        assert torch.equal(here['lambdas'], there['lambdas'])


LOSS_RTOL = 1e-4  # measured: 6.6e-6 on the step losses, 1.1e-6 on eval losses and weights (fp32, CPU)
MASK_ATOL = 1e-4  # measured: 1.7e-6


def test_a_run_continues_on_another_world_size_and_after_losing_the_store(fsdp_run, tmp_path):
    """The FSDP2 run with distillation, checkpointed sharded mid-interval on 2 ranks, resumes on 1 rank (same global
    batch); that run's checkpoint at an interval boundary resumes on 1 rank and on 2 ranks. All continue the 2-rank
    run: every step reads the same samples (on 1 rank, the two ranks' batches interleaved), the losses are the mean
    of the two ranks' losses, and the per-domain eval losses, domain weights, masks and multipliers match (the sums
    of another world size round differently: tolerances above). The mask noise is the same on every rank here
    (`SharedNoisePruning`): the method draws it per rank, so a run continued on another world size draws other
    masks than the uninterrupted run and is a different (equally valid) run; with one noise for all ranks, the
    state carried over (weights, Adam moments, masks, multipliers, the Lagrangian schedule, domain weights,
    cursors) shows in every number.

    The 1-rank runs read the data from the store (a shard every 10 samples, so every interval downloads new ones),
    and the store's server stops when the first one starts its third interval. That run fails on the first shard
    it cannot download with one error line naming the object (torch's DataLoader worker traceback is not repeated
    in it), and no file of its cache or checkpoints is deleted. With the store back, the rerun from its last
    checkpoint (on local disk) reads the same cache and continues as a run that never lost the store does."""
    import re

    import torch

    from composer_shear._remote import upload_tree
    from tests.common.s3 import BUCKET, s3_store
    from tests.common.train_dynamic import write_data
    write_data(tmp_path / 'data', shard_bytes=800)
    uri, on1 = f's3://{BUCKET}/small', fsdp_run / 'ckpt-on1'
    with s3_store() as server:
        upload_tree(tmp_path / 'data', uri, progress=False)
        res = launch(fsdp_run, *FSDP, f'resume={fsdp_run / "ckpt" / "ep1-ba7"}', 'tag=lost', f'save={on1}',
                     f'remote={uri}', f'stop_store={server.proc.pid}', env=FSDP_ENV, nproc=1, check=False)
        assert res.returncode != 0 and server.proc.poll() is not None, res.stderr[-5000:]
        errors = re.findall(r'^(?:\[rank0\]: )?composer_shear\._remote\.RemoteError: (.*)$', res.stderr, re.M)
        assert len(errors) == 1 and res.stderr.count('Traceback (most recent call last)') == 1, res.stderr[-8000:]
        assert re.fullmatch(re.escape(uri) + r'/train/(alpha|beta|gamma)/shard\.\d{5}\.mds: cannot download '
                            r'\(Could not connect to the endpoint URL: .*\)', errors[0]), errors[0]
        assert_continues_on_one_rank(fsdp_run, 'lost', range(7, 10), final=False)  # then it stopped
        kept = json.loads((fsdp_run / 'lost-files.json').read_text())
        assert any('/cache/' in f for f in kept) and any('ep2-ba10' in f for f in kept)
        assert all(os.path.getsize(f) == size for f, size in kept.items())
        server.stop()
        server.start()  # the store is back (moto keeps nothing: publish the data again)
        server.client().create_bucket(Bucket=BUCKET)
        upload_tree(tmp_path / 'data', uri, progress=False)
        launch(fsdp_run, *FSDP, f'resume={on1 / "ep2-ba10"}', 'tag=on1', f'remote={uri}', env=FSDP_ENV, nproc=1)
    launch(fsdp_run, *FSDP, f'resume={on1 / "ep2-ba10"}', 'tag=on2', env=FSDP_ENV)
    assert_continues_on_one_rank(fsdp_run, 'on1', range(10, 20))
    full = [read(fsdp_run, 'history-batches', r) for r in (0, 1)]
    history = read(fsdp_run, 'history', 0)
    for r in (0, 1):
        two = read(fsdp_run, 'on2-batches', r)
        assert sorted(int(k) for k in two if k.isdigit()) == list(range(10, 20))
        assert all(two[str(k)] == full[r][str(k)] for k in range(10, 20))
        assert all(close(two[f"loss{k}"], full[r][f"loss{k}"], LOSS_RTOL) for k in range(10, 20))
        assert close(read(fsdp_run, 'on2', r), history, LOSS_RTOL)
    final = torch.load(fsdp_run / 'history-masks-rank0.pt')
    for name in ('on1', 'on2'):
        masks = torch.load(fsdp_run / f'{name}-masks-rank0.pt')
        for k, v in final['log_alpha'].items():
            torch.testing.assert_close(masks['log_alpha'][k], v, rtol=0, atol=MASK_ATOL)
        torch.testing.assert_close(masks['lambdas'], final['lambdas'], rtol=0, atol=MASK_ATOL)


def assert_continues_on_one_rank(fsdp_run, name, steps, final=True):
    """The 1-rank run `name` read, at each of `steps` (the batches done before the step), the samples of both ranks
    of the 2-rank run, interleaved, and its losses are their mean; `final`: it also ended with the 2-rank run's
    eval losses and domain weights."""
    full = [read(fsdp_run, 'history-batches', r) for r in (0, 1)]
    one = read(fsdp_run, f'{name}-batches', 0)
    assert sorted(int(k) for k in one if k.isdigit()) == list(steps)
    for k in steps:
        assert one[str(k)] == [row for pair in zip(full[0][str(k)], full[1][str(k)], strict=True) for row in pair], k
        mean = {n: (full[0][f'loss{k}'][n] + full[1][f'loss{k}'][n]) / 2 for n in full[0][f'loss{k}']}
        assert close(one[f'loss{k}'], mean, LOSS_RTOL), (k, one[f'loss{k}'], mean)
    if final:
        assert close(read(fsdp_run, name, 0), read(fsdp_run, 'history', 0), LOSS_RTOL)
