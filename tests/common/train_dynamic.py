"""Pruning with dynamic batch loading and per-domain eval on a tiny model. Run with the launcher, from the
repository root: `composer -n 2 -m tests.common.train_dynamic OUT_DIR [fsdp] [sharded] [distill] [resume=CHECKPOINT]
[tag=NAME] [save=FOLDER] [remote=URI] [stop_store=PID]`.

- `fsdp`: FSDP2 (also needs FSDP_VERSION=2); `sharded`: sharded checkpoints; `distill`: `shear_distill` from the
  source model; `shared_noise`: the same mask noise on every rank (`SharedNoisePruning`).
- The global batch is 8 on any number of ranks (4 per rank on 2), so a run can resume on another world size.
- `resume`: a checkpoint to load; the outputs are then named `resumed-<its name>` or `tag`, and nothing is saved
  unless `save` names a folder.
- `remote`: read the data from an object store holding `write_data`'s output, cached under OUT_DIR/cache.
- `stop_store`: stop the store's server (its process id) when the third interval starts (`StopStore`; the cache
  and `save` folders' files are listed in `<name>-files.json` then).
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from composer import Callback, Trainer
from composer.core import Event
from composer.devices import DeviceCPU
from composer.optim import DecoupledAdamW
from composer.utils import dist
from llmfoundry.models.hf import ComposerHFCausalLM
from streaming import MDSWriter
from transformers import AutoTokenizer

from composer_shear.algorithm import ShearPruning
from composer_shear.data.callback import DynamicLoading
from composer_shear.data.dynamic import build_dynamic_text_dataloader, domain_evaluators
from composer_shear.distill import ShearDistill
from composer_shear.testing import TARGET, save_tiny

DOMAINS = ['alpha', 'beta', 'gamma']
REFERENCE = [1.0, 1.5, 0.5]
SEQ, VOCAB = 16, 96


def write_data(root, shard_bytes=1 << 26):
    """Domain d: token progressions with step d + 1 (learnable, and different per domain); the same samples for
    any shard size. Each shard's SHA-1 is in its index, as prepare-data writes it."""
    rng = np.random.default_rng(0)
    for d, name in enumerate(DOMAINS):
        for split, n in (('train', 400), ('eval', 24)):
            with MDSWriter(out=str(root / split / name), columns={'tokens': 'ndarray:uint16'},
                           size_limit=shard_bytes, hashes=['sha1']) as w:
                for _ in range(n):
                    start = rng.integers(3, VOCAB)
                    w.write({'tokens': (3 + (start + (d + 1) * np.arange(SEQ)) % (VOCAB - 3)).astype(np.uint16)})


class RecordBatches(Callback):
    """Per step: the first tokens of this rank's batch, a digest of the RNG state and the step's losses; written
    to `path` after every step (a run that fails keeps what it did)."""

    def __init__(self, path):
        self.batches, self.path = {}, path

    def after_dataloader(self, state, logger):
        self.batches[int(state.timestamp.batch)] = state.batch['input_ids'][:, :3].tolist()
        self.batches[f'rng{int(state.timestamp.batch)}'] = int(torch.random.get_rng_state().double().sum())

    def after_train_batch(self, state, logger):
        loss = state.loss if isinstance(state.loss, dict) else {'total': state.loss}
        self.batches[f'loss{int(state.timestamp.batch)}'] = {k: float(v) for k, v in loss.items()}
        self.path.write_text(json.dumps(self.batches))


class StopStore(Callback):
    """At the start of interval `epoch` (0-based), list the files under `folders` (path -> bytes, into `listing`)
    and stop the object store's server (process `pid`): the interval's new shards cannot be downloaded."""

    def __init__(self, pid, folders, listing, epoch=2):
        self.pid, self.folders, self.listing, self.epoch = int(pid), [Path(f) for f in folders], Path(listing), epoch

    def epoch_start(self, state, logger):
        import os
        import signal
        if int(state.timestamp.epoch) == self.epoch:
            files = {str(p): p.stat().st_size for f in self.folders for p in f.rglob('*') if p.is_file()}
            self.listing.write_text(json.dumps(files))
            os.kill(self.pid, signal.SIGTERM)


def save_when(state, event):
    """Checkpoints mid-interval (batch 7) and at an interval boundary (end of epoch 2, after its eval)."""
    return ((event == Event.BATCH_CHECKPOINT and int(state.timestamp.batch) == 7)
            or (event == Event.EPOCH_CHECKPOINT and int(state.timestamp.epoch) == 2))


class SharedNoisePruning(ShearPruning):
    """ShearPruning whose mask noise is the same on every rank (the method draws it per rank, as data-parallel
    dropout does): a run continued on another world size then computes what the uninterrupted run computes, up to
    the rounding of other sums, which is what a test of the state carried across a world-size change needs."""

    def _noise_key(self, state):
        seed, _rank, batch, microbatch = super()._noise_key(state)
        return [seed, 0, batch, microbatch]


def average_gradients_on_gloo() -> None:
    """torch 2.7's FSDP2 reduce-scatters fp32 gradients with ReduceOp.AVG, which gloo sums (pytorch/pytorch#162338,
    fixed in later releases): on CPU every FSDP2 gradient is world-size times the mean. Adam hides a constant scale,
    so the runs agree with DDP step by step, but Adam moments saved on 2 ranks and continued on 1 do not. Here FSDP2
    sums and then divides, as it does for low-precision gradients (and as NCCL's AVG does on GPUs)."""
    from torch.distributed import get_backend
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as collectives
    factors = collectives._get_gradient_divide_factors

    def divide_after_summing(group, all_reduce_group, reduce_dtype, device_type=''):
        pre, post = factors(group, all_reduce_group, reduce_dtype, device_type)
        if pre is None and get_backend(group) == 'gloo':
            return 1.0, float(group.size() * (all_reduce_group.size() if all_reduce_group is not None else 1))
        return pre, post

    collectives._get_gradient_divide_factors = divide_after_summing


def separate_shared_memory(node: int, nodes: int) -> None:
    """Two "nodes" on one machine share /dev/shm, which separate hosts do not: the local leaders of both would
    register the same streaming shared-memory prefix at once (streaming finds the first free prefix on every rank,
    waits at a barrier, then creates it). Node n searches only the prefixes equal to n modulo the number of nodes,
    as if it had a /dev/shm of its own."""
    import itertools

    from streaming.base.shared import prefix
    prefix._each_prefix_int = lambda: (i for i in itertools.count() if i % nodes == node)


def run(out, fsdp=False, resume_from=None, remote=None, sharded=False, distill=False, tag=None, save=None,
        shared_noise=False, stop_store=None):
    out = Path(out)
    dist.initialize_dist(DeviceCPU())
    average_gradients_on_gloo()
    nodes = dist.get_world_size() // dist.get_local_world_size()
    if nodes > 1:
        separate_shared_memory(dist.get_node_rank(), nodes)
    if dist.get_local_rank() == 0 and resume_from is None:
        save_tiny(out / 'model')
        if remote is None:
            write_data(out / 'data')
    dist.barrier()
    tok = AutoTokenizer.from_pretrained(out / 'model')
    model = ComposerHFCausalLM(tok, pretrained_model_name_or_path=str(out / 'model'), pretrained=True,
                               attn_implementation='sdpa', use_train_metrics=False)
    global_batch = 8
    batch = global_batch // dist.get_world_size()
    local = str(out / ('data' if remote is None else 'cache'))
    train = build_dynamic_text_dataloader(
        tok, batch, dict(local=local, remote=remote, domains=DOMAINS, proportions=[0.6, 0.3, 0.1],
                         epoch_size=5 * global_batch, max_seq_len=SEQ), num_workers=2)
    evals = domain_evaluators(local, DOMAINS, batch, SEQ, remote=remote)
    name = tag or ('history' if resume_from is None else 'resumed-' + Path(resume_from).name.split('-rank')[0])
    record = RecordBatches(out / f'{name}-batches-rank{dist.get_global_rank()}.json')
    stop = [StopStore(stop_store, [f for f in (local, save) if f], out / f'{name}-files.json')] if stop_store else []
    callback = DynamicLoading(DOMAINS, [0.6, 0.3, 0.1], dict(zip(DOMAINS, REFERENCE, strict=True)),
                              history_file=str(out / f'{name}-dynamic_loading.json'))
    trainer = Trainer(
        model=model, optimizers=DecoupledAdamW(model.parameters(), lr=1e-3, weight_decay=0.0),
        train_dataloader=train, eval_dataloader=evals, eval_interval='1ep', max_duration='4ep',
        algorithms=[(SharedNoisePruning if shared_noise else ShearPruning)(target=TARGET, lagrangian_warmup='10ba')]
        + ([ShearDistill(teacher=str(out / 'model'), alpha=0.5, temperature=2.0)] if distill else []),
        callbacks=[callback, record, *stop],
        device='cpu',
        precision='fp32', seed=17, progress_bar=False, log_to_console=False, device_train_microbatch_size=batch,
        parallelism_config={'fsdp': {'state_dict_type': 'sharded' if sharded else 'full'}} if fsdp else None,
        run_name='dyn', save_folder=save or (str(out / 'ckpt') if resume_from is None else None),
        save_interval=save_when, load_path=resume_from)
    trainer.fit()
    rank = dist.get_global_rank()
    (out / f'{name}-rank{rank}.json').write_text(json.dumps(callback.history))
    with torch.no_grad():
        snap = ShearPruning.masks(trainer.state).snapshot()
    torch.save({'log_alpha': snap.log_alpha, 'lambdas': snap.lambdas}, out / f'{name}-masks-rank{rank}.pt')
    trainer.close()


if __name__ == '__main__':
    args = sys.argv[2:]
    options = dict(a.split('=', 1) for a in args if '=' in a)
    run(sys.argv[1], fsdp='fsdp' in args, resume_from=options.get('resume'), remote=options.get('remote'),
        sharded='sharded' in args, distill='distill' in args, tag=options.get('tag'), save=options.get('save'),
        shared_noise='shared_noise' in args, stop_store=options.get('stop_store'))
