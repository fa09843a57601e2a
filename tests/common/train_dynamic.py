"""Pruning with dynamic batch loading and per-domain eval on a tiny model. Run with the launcher, from the
repository root: `composer -n 2 -m tests.common.train_dynamic OUT_DIR [fsdp] [resume=CHECKPOINT] [remote=URI]` (FSDP2
also needs FSDP_VERSION=2; `remote`: read the data from an object store holding `write_data`'s output, cached
under OUT_DIR/cache)."""

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
from composer_shear.testing import TARGET, save_tiny

DOMAINS = ['alpha', 'beta', 'gamma']
REFERENCE = [1.0, 1.5, 0.5]
SEQ, VOCAB = 16, 96


def write_data(root):
    """Domain d: token progressions with step d + 1 (learnable, and different per domain)."""
    rng = np.random.default_rng(0)
    for d, name in enumerate(DOMAINS):
        for split, n in (('train', 400), ('eval', 24)):
            with MDSWriter(out=str(root / split / name), columns={'tokens': 'ndarray:uint16'}) as w:
                for _ in range(n):
                    start = rng.integers(3, VOCAB)
                    w.write({'tokens': (3 + (start + (d + 1) * np.arange(SEQ)) % (VOCAB - 3)).astype(np.uint16)})


class RecordBatches(Callback):
    def __init__(self):
        self.batches = {}

    def after_dataloader(self, state, logger):
        self.batches[int(state.timestamp.batch)] = state.batch['input_ids'][:, :3].tolist()
        self.batches[f'rng{int(state.timestamp.batch)}'] = int(torch.random.get_rng_state().double().sum())


def save_when(state, event):
    """Checkpoints mid-interval (batch 7) and at an interval boundary (end of epoch 2, after its eval)."""
    return ((event == Event.BATCH_CHECKPOINT and int(state.timestamp.batch) == 7)
            or (event == Event.EPOCH_CHECKPOINT and int(state.timestamp.epoch) == 2))


def run(out, fsdp=False, resume_from=None, remote=None):
    out = Path(out)
    dist.initialize_dist(DeviceCPU())
    if dist.get_local_rank() == 0 and resume_from is None:
        save_tiny(out / 'model')
        if remote is None:
            write_data(out / 'data')
    dist.barrier()
    tok = AutoTokenizer.from_pretrained(out / 'model')
    model = ComposerHFCausalLM(tok, pretrained_model_name_or_path=str(out / 'model'), pretrained=True,
                               attn_implementation='sdpa', use_train_metrics=False)
    batch = 4
    local = str(out / ('data' if remote is None else 'cache'))
    train = build_dynamic_text_dataloader(
        tok, batch, dict(local=local, remote=remote, domains=DOMAINS, proportions=[0.6, 0.3, 0.1],
                         epoch_size=5 * batch * dist.get_world_size(), max_seq_len=SEQ), num_workers=2)
    evals = domain_evaluators(local, DOMAINS, batch, SEQ, remote=remote)
    record = RecordBatches()
    callback = DynamicLoading(DOMAINS, [0.6, 0.3, 0.1], dict(zip(DOMAINS, REFERENCE, strict=True)))
    trainer = Trainer(
        model=model, optimizers=DecoupledAdamW(model.parameters(), lr=1e-3, weight_decay=0.0),
        train_dataloader=train, eval_dataloader=evals, eval_interval='1ep', max_duration='4ep',
        algorithms=[ShearPruning(target=TARGET, lagrangian_warmup='10ba')], callbacks=[callback, record],
        device='cpu',
        precision='fp32', seed=17, progress_bar=False, log_to_console=False, device_train_microbatch_size=batch,
        parallelism_config={'fsdp': {}} if fsdp else None, run_name='dyn',
        save_folder=str(out / 'ckpt') if resume_from is None else None, save_interval=save_when,
        load_path=resume_from)
    trainer.fit()
    rank = dist.get_global_rank()
    name = 'history' if resume_from is None else 'resumed-' + Path(resume_from).name.split('-rank')[0]
    (out / f'{name}-rank{rank}.json').write_text(json.dumps(callback.history))
    (out / f'{name}-batches-rank{rank}.json').write_text(json.dumps(record.batches))
    trainer.close()


if __name__ == '__main__':
    args = sys.argv[2:]
    options = dict(a.split('=', 1) for a in args if '=' in a)
    run(sys.argv[1], fsdp='fsdp' in args, resume_from=options.get('resume'), remote=options.get('remote'))
