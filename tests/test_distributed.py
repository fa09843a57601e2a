"""`composer -n 2` runs on CPU (gloo): DDP and FSDP2. Masks and multipliers must be identical on both ranks
after training, and the checkpoint must export."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from composer_shear.testing import TARGET

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent  # the launcher runs `python -m tests.common.train_tiny` from here
MODULE = ['-m', 'tests.common.train_tiny']


def launch(out, env_extra, *args):
    env = {**os.environ, **env_extra}
    composer = Path(sys.executable).with_name('composer')
    cmd = [str(composer), '-n', '2', *MODULE, str(out), 'steps=12', 'save_interval=6ba', 'eval_interval=6ba',
           'warmup=4ba', *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]


def same_on_both_ranks(out):
    a, b = (torch.load(out / f'masks-rank{r}.pt') for r in (0, 1))
    for k in a['log_alpha']:
        assert torch.equal(a['log_alpha'][k], b['log_alpha'][k]), k
    assert torch.equal(a['lambdas'], b['lambdas'])
    # training did move them
    assert a['lambdas'].abs().sum() > 0
    assert any((v != a['log_alpha'][k].flatten()[0]).any() for k, v in a['log_alpha'].items())


def export(ckpt, dest, *extra):
    cmd = [sys.executable, '-m', 'composer_shear.cli', 'export', '--checkpoint', str(ckpt), '--out', str(dest),
           *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(dest)
    for field, value in TARGET.items():
        assert getattr(model.config, field) == value
    return model


BF16 = '{"param_dtype": "bf16", "reduce_dtype": "fp32"}'
# mask logits 0.004 apart around 3: bf16 (spacing 0.016 there) ties them, so a selection read from cast values differs
NEAR_TIES = ['init={"log_alpha": 3.0, "noise": 0.004, "seed": 3}', 'lag_lr=1e-4']
LOGIT_TOLERANCE = 0.02  # bf16 compute against the fp32 export (max |logit| ~0.6; a wrong selection moves them ~0.5)


def test_fsdp2_bf16_masks_select_in_fp32_and_both_checkpoints_export_the_masked_model(tmp_path):
    """One FSDP2 run with a bf16 param_dtype (FSDP mixed precision casts the mask logits for every forward) saves its
    final state sharded and whole: the in-loop exact-target masks are the fp32 selection of the saved logits (not the
    bf16-rounded one, which differs here by construction), the two checkpoints export the same model, and that model
    computes the wrapped masked model's logits within bf16 tolerance. The student starts with ``init_device: mixed``
    (rank 0 reads the weights, rank 1 starts on the meta device and receives its shards): before step 1 each rank
    holds exactly its rows of the source weights."""
    from composer_shear.masks import deterministic

    out = tmp_path / 'run'
    launch(out, {'FSDP_VERSION': '2', 'STATE_DICT_TYPE': 'sharded'}, 'fsdp=true', 'also_full=true', 'probe=true',
           f'mixed_precision={BF16}', 'init_device=mixed', 'shards=true', *NEAR_TIES)
    source = AutoModelForCausalLM.from_pretrained(out / 'source').state_dict()
    for rank in (0, 1):
        shards = torch.load(out / f'shards-rank{rank}.pt')
        assert set(shards) >= set(source) - {'lm_head.weight'}  # tied to the embeddings
        for name, local in shards.items():
            if name not in source:
                continue
            rows = -(-source[name].shape[0] // 2)  # FSDP2: dim 0 in chunks of ceil(n / 2)
            assert torch.equal(local, source[name][rank * rows:(rank + 1) * rows]), (rank, name)
    same_on_both_ranks(out)
    probe, saved = torch.load(out / 'probe-rank0.pt'), torch.load(out / 'masks-rank0.pt')
    assert probe['dtype'] == 'torch.bfloat16'  # the forward did see cast parameters
    assert torch.equal(probe['logits'], torch.load(out / 'probe-rank1.pt')['logits'])
    rounded_differs = False
    for name, log_alpha in saved['log_alpha'].items():
        keep = (probe['z'][name] != 0).sum(-1)
        fp32 = deterministic(log_alpha, keep, binary=True)
        assert torch.equal(probe['z'][name], fp32), name
        rounded_differs |= not torch.equal(deterministic(log_alpha.bfloat16().float(), keep, binary=True), fp32)
    assert rounded_differs  # the check can fail: rounding would have picked other entries
    sharded_ckpt, whole_ckpt = out / 'ckpt' / 'ep0-ba12', out / 'ckpt' / 'whole-rank0.pt'
    assert (sharded_ckpt / '.metadata').exists() and whole_ckpt.is_file()
    models = {kind: export(ckpt, out / f'export-{kind}', '--source', str(out / 'source'))
              for kind, ckpt in (('sharded', sharded_ckpt), ('whole', whole_ckpt))}
    assert (out / 'export-sharded' / 'tokenizer.json').exists()
    sharded, whole = (models[k].state_dict() for k in ('sharded', 'whole'))
    assert sharded.keys() == whole.keys()
    for k in sharded:
        assert torch.equal(sharded[k], whole[k]), k
    with torch.no_grad():
        logits = models['sharded'].eval()(probe['ids']).logits
    assert (logits - probe['logits']).abs().max() <= LOGIT_TOLERANCE


DEAD_RANK_EXIT_S = 60  # the launcher sees the dead rank within 0.1 s, then gives the others up to 30 s


def test_a_dead_rank_ends_the_job_and_autoresume_from_the_store_is_bit_exact(tmp_path):
    """A 2-rank pruning run with distillation (the teacher reloaded from its folder on restart, not from the
    checkpoint) and masks initialised from the first batch's activations (not recomputed on restart) saves to
    `save_folder: s3://...` (a real S3-compatible store) with autoresume. Once the store holds its step-6 checkpoint
    and `latest` link, one rank is killed with SIGKILL: the job ends with a non-zero exit within DEAD_RANK_EXIT_S
    (no hang). The same command started in another working directory (a new machine: no local checkpoint) resumes
    from the store and ends with exactly the losses, masks and multipliers of an uninterrupted run (fp32, CPU);
    both ranks hold the same masks and multipliers (the activation statistics are all-reduced), and
    its export through the store's `latest-rank0.pt.symlink` is the uninterrupted run's export, byte for byte."""
    import contextlib
    import json
    import signal
    import time

    import psutil

    from composer_shear.export import export_checkpoint
    from tests.common.s3 import BUCKET, s3_store
    # few checkpoints: each upload may start another of Composer's spawned workers, each importing composer (~17 s)
    args = ['steps=14', 'save_interval=6ba', 'eval_interval=7ba', 'warmup=6ba', 'autoresume=true',
            'distill={"alpha": 0.5, "temperature": 2.0}', 'init={"from": "activations"}']
    launch(tmp_path / 'full', {}, *args)
    composer = Path(sys.executable).with_name('composer')
    cmd = [str(composer), '-n', '2', *MODULE, str(tmp_path / 'killed'), *args, f'save_folder=s3://{BUCKET}/run',
           f'model_dir={tmp_path / "full" / "source"}']
    # Composer stages a save_folder URI's checkpoints in ./s3:/... : each "machine" has its own working directory
    for node in ('node-a', 'node-b'):
        (tmp_path / node).mkdir()
    with s3_store() as server:
        env = {**os.environ, 'PYTHONPATH': str(ROOT), 'TRAIN_TINY_LOG': 'INFO'}  # with the store's settings
        with open(tmp_path / 'killed.log', 'w') as log:
            # hold at step 7 until the uploads are done (Composer's upload workers are spawned processes that
            # may start after a short run would have ended), then wait to be killed
            proc = subprocess.Popen([*cmd, 'hold_at=7'], start_new_session=True, stdout=log, stderr=log,
                                    cwd=tmp_path / 'node-a', env=env)
            link, deadline = 'run/latest-rank0.pt.symlink', time.time() + 600

            def latest():
                return server.read(link).decode() if link in server.keys('run/') else ''
            while latest() != 'run/ep0-ba6-rank0.pt':
                if proc.poll() is not None or time.time() > deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    pytest.fail(f'no step-6 link in the store ({server.keys("run/")}):\n'
                                + (tmp_path / 'killed.log').read_text()[-6000:])
                time.sleep(0.2)
            rank1 = next(p for p in psutil.Process(proc.pid).children() if p.environ().get('RANK') == '1')
            rank1.send_signal(signal.SIGKILL)
            killed = time.time()
            try:
                code = proc.wait(timeout=DEAD_RANK_EXIT_S)
            finally:
                # also what the job left behind: a spawned upload process of Composer's outlives its dead rank
                # (it ignores SIGTERM), holding ~1 GB
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        assert code != 0, 'the job with a dead rank exited 0'
        print(f'the job ended {time.time() - killed:.1f} s after its rank 1 was killed')
        assert not (tmp_path / 'killed' / 'masks-rank0.pt').exists()  # it really died mid-run
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path / 'node-b', env=env)
        assert res.returncode == 0, res.stderr[-5000:]
        assert not list((tmp_path / 'node-b').rglob('ep0-ba6-rank0.pt'))  # nothing old there: read from the store
        export_checkpoint(f's3://{BUCKET}/{link}', tmp_path / 'remote-export')
    from composer_shear.kd import load_teacher, local_parameter_bytes
    whole = local_parameter_bytes(load_teacher(tmp_path / 'full' / 'source'))
    for r in (0, 1):
        full = torch.load(tmp_path / 'full' / f'masks-rank{r}.pt')
        resumed = torch.load(tmp_path / 'killed' / f'masks-rank{r}.pt')
        for k in full['log_alpha']:
            assert torch.equal(full['log_alpha'][k], resumed['log_alpha'][k]), k
        assert torch.equal(full['lambdas'], resumed['lambdas'])
        before = json.loads((tmp_path / 'full' / f'losses-rank{r}.json').read_text())
        after = json.loads((tmp_path / 'killed' / f'losses-rank{r}.json').read_text())
        assert after and min(map(int, after)) == 6  # the restart began at the checkpoint, not from scratch
        teacher = json.loads((tmp_path / 'killed' / f'teacher-rank{r}.json').read_text())
        assert teacher['read'] == teacher['bytes'] == whole  # DDP: a whole replica per rank, read by each
        assert all(before[k] == v for k, v in after.items())
        assert all(v['kd'] > 0 for v in after.values())
    same_on_both_ranks(tmp_path / 'full')
    export_checkpoint(tmp_path / 'full' / 'ckpt' / 'latest-rank0.pt', tmp_path / 'local-export')
    for name in ('model.safetensors', 'config.json', 'shape_report.json'):
        assert (tmp_path / 'remote-export' / name).read_bytes() == (tmp_path / 'local-export' / name).read_bytes()


@pytest.mark.parametrize('kind', ['fsdp2'])  # DDP's replica per rank: the dead-rank test
def test_distillation_matches_one_process(tmp_path, kind):
    """shear_distill on 2 ranks (FSDP2: the teacher sharded over the student's mesh, half its parameter bytes per
    rank, each rank reading from disk only the rows of its own shards) logs the losses of a 1-process run (the
    teacher read whole) on the same global batch. The model ties its output layer to its embeddings, as SmolLM2
    does (one tensor in the files for two modules)."""
    import json

    from tests.common import train_tiny
    distill = '{"alpha": 0.5, "temperature": 2.0}'
    env = {'FSDP_VERSION': '2'} if kind == 'fsdp2' else {}
    launch(tmp_path / kind, env, 'prune=false', f'distill={distill}', 'steps=4', 'batch=4', 'tied=true',
           *(['fsdp=true'] if kind == 'fsdp2' else []))
    train_tiny.run(tmp_path / 'one', steps=4, batch=8, prune=False, distill=json.loads(distill),
                   model_dir=tmp_path / kind / 'source', save_interval='4ba', eval_interval='4ba')
    one = json.loads((tmp_path / 'one' / 'logged-rank0.json').read_text())
    two = json.loads((tmp_path / kind / 'logged-rank0.json').read_text())
    assert one.keys() == two.keys() and len(one) == 4
    for step in one:
        assert set(one[step]) == {'loss/train/ce', 'loss/train/kd', 'loss/train/total'}
        for k, v in one[step].items():
            assert two[step][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (step, k)
    assert one['4']['loss/train/kd'] > 0
    full = json.loads((tmp_path / 'one' / 'teacher-rank0.json').read_text())
    assert full['read'] == full['bytes']
    ranks = [json.loads((tmp_path / kind / f'teacher-rank{r}.json').read_text()) for r in (0, 1)]
    held, read = [r['bytes'] for r in ranks], [r['read'] for r in ranks]
    if kind == 'ddp':
        assert held == read == [full['bytes'], full['bytes']]
    else:
        assert sum(read) == full['bytes']  # each row read once, by the rank that holds it
        assert sum(held) == pytest.approx(full['bytes'], rel=0.05)  # shards (FSDP2 pads dim 0 to a multiple of 2)
        assert all(r == pytest.approx(full['bytes'] / 2, rel=0.1) for r in read + held)
