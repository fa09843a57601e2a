"""Prune a tiny model with Composer's Trainer. Run in-process (`run(...)`) or with the launcher, from the
repository root: `composer -n 2 -m tests.common.train_tiny OUT_DIR [key=value ...]` (FSDP2 with FSDP_VERSION=2 and
fsdp=1)."""

import json
import os
import sys
import time
from pathlib import Path

import torch
from composer import Callback, Evaluator, Trainer
from composer.callbacks import CheckpointSaver
from composer.devices import DeviceCPU
from composer.optim import CosineAnnealingScheduler, DecoupledAdamW
from composer.utils import dist
from llmfoundry.models.hf import ComposerHFCausalLM
from transformers import AutoTokenizer

from composer_shear.algorithm import ShearPruning
from composer_shear.callbacks import PruningMonitor
from composer_shear.distill import ShearDistill
from composer_shear.functional import set_eval_masks
from composer_shear.masks import refresh_fp32
from composer_shear.testing import TARGET, Tokens, loader, save_tiny

__all__ = ['TARGET', 'LossLog', 'Tokens', 'loader', 'run']

if os.environ.get('TRAIN_TINY_LOG'):  # also in Composer's spawned upload workers, which import this module
    import logging
    logging.basicConfig(level=os.environ['TRAIN_TINY_LOG'], format=f'%(asctime)s {os.getpid()} %(name)s: %(message)s')
    logging.getLogger('botocore').setLevel(logging.WARNING)


class HoldForUploads(Callback):
    """At the end of step `step`, stay until Composer's uploader has put every checkpoint and `latest` link saved
    so far into the store, then wait to be killed (a test kills the run after a known checkpoint upload; not
    killed within `timeout` seconds is an error). Composer's upload workers are spawned processes that import
    this module: on a busy machine they start after a short run would have ended."""

    def __init__(self, step, timeout=600.0):
        self.step, self.timeout = step, timeout

    def batch_end(self, state, logger):
        if int(state.timestamp.batch) != self.step:
            return
        saver = next(cb for cb in state.callbacks if isinstance(cb, CheckpointSaver))
        deadline = time.time() + self.timeout
        while saver.symlink_upload_tasks:
            saver.batch_end(state, logger)  # collects finished uploads and uploads the links they unblock
            time.sleep(0.2)
            if time.time() > deadline:
                raise RuntimeError(f'the checkpoint uploads did not finish in {self.timeout:.0f} s')
        time.sleep(max(0.0, deadline - time.time()))
        raise RuntimeError(f'held at step {self.step} for {self.timeout:.0f} s and not killed')


class SaveShards(Callback):
    """At FIT_START (the model distributed, before step 1) each rank saves its local part of every parameter of the
    HF model (a DTensor's local shard, or the whole tensor)."""

    def __init__(self, path):
        self.path = path

    def fit_start(self, state, logger):
        from torch.distributed.tensor import DTensor
        hf = state.model.model
        torch.save({n: (p.to_local() if isinstance(p, DTensor) else p).detach().clone()
                    for n, p in hf.named_parameters()}, self.path)


class LossLog(Callback):
    """Records every step's losses (the last microbatch's on this rank, and the step's as Composer logs them:
    summed over microbatches, averaged over ranks); optionally sleeps after each step (to leave time to kill
    the run)."""

    def __init__(self, sleep=0.0):
        self.losses, self.logged, self.sleep = {}, {}, sleep

    def after_train_batch(self, state, logger):
        loss = state.loss if isinstance(state.loss, dict) else {'total': state.loss}
        self.losses[int(state.timestamp.batch)] = {k: float(v) for k, v in loss.items()}

    def batch_end(self, state, logger):
        self.logged[int(state.timestamp.batch)] = dict(state.total_loss_dict)
        time.sleep(self.sleep)


def run(out, steps=120, fsdp=False, lag_lr=1.0, init=None, warmup='30ba', save_interval='40ba', autoresume=False,
        model_dir=None, load_path=None, batch=4, target=None, modules=None, eval_interval='40ba', schedule='cosine',
        loggers=(), sleep=0.0, prune=True, distill=None, distill_first=False, mask_lr_schedule='model', callbacks=(),
        multiplier_update='adam', train_loader=None, also_full=False, mixed_precision=None, probe=False,
        save_folder=None, hold_at=None, init_device='cpu', pretrained=True,
        shards=False, compile_config=None, tied=False):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dist.initialize_dist(DeviceCPU())
    if model_dir is None:
        model_dir = out / 'source'
        if dist.get_local_rank() == 0 and not (model_dir / 'config.json').exists():
            save_tiny(model_dir, tied=tied)
        dist.barrier()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = ComposerHFCausalLM(tok, pretrained_model_name_or_path=str(model_dir), pretrained=pretrained,
                               attn_implementation='sdpa', use_train_metrics=False, init_device=init_device)
    opt = DecoupledAdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    algo = ShearPruning(target=target or TARGET, lag_lr=lag_lr, lagrangian_warmup=warmup, init=init,
                        mask_lr_schedule=mask_lr_schedule, multiplier_update=multiplier_update,
                        **({'pruning_modules': modules} if modules else {})) if prune else None
    algorithms = [algo] if prune else []
    teacher = ShearDistill(**distill) if distill is not None else None
    if teacher is not None:
        algorithms.insert(0 if distill_first else len(algorithms), teacher)
    parallelism = {'fsdp': {'state_dict_type': os.environ.get('STATE_DICT_TYPE', 'full'),
                            **({'mixed_precision': mixed_precision} if mixed_precision else {})}} if fsdp else None
    vocab = model.model.config.vocab_size
    losses = LossLog(sleep)
    trainer = Trainer(
        model=model, optimizers=opt, train_dataloader=train_loader or loader(Tokens(256, 32, vocab), batch),
        eval_dataloader=Evaluator(label='eval', dataloader=loader(Tokens(16, 32, vocab, seed=1), batch),
                                  metric_names=['LanguageCrossEntropy']), eval_interval=eval_interval,
        max_duration=f'{steps}ba', algorithms=algorithms,
        callbacks=([PruningMonitor(), losses] if prune else [losses]) + list(callbacks)
        + ([HoldForUploads(hold_at)] if hold_at else [])
        + ([SaveShards(out / f'shards-rank{dist.get_global_rank()}.pt')] if shards else []),
        device='cpu',
        precision='fp32', save_folder=save_folder or str(out / 'ckpt'), save_interval=save_interval,
        save_overwrite=not autoresume,
        save_latest_filename='latest-rank{rank}.pt', run_name='tiny', autoresume=autoresume, load_path=load_path,
        parallelism_config=parallelism, compile_config=compile_config, seed=17, progress_bar=False,
        log_to_console=False, loggers=list(loggers), device_train_microbatch_size=batch // 2,
        schedulers=CosineAnnealingScheduler(alpha_f=0.0) if schedule == 'cosine' else None)
    # Composer polls the store every 30 s before it moves `latest` there (a private attribute of composer 0.32)
    for cb in trainer.state.callbacks:
        if isinstance(cb, CheckpointSaver):
            cb._symlink_upload_wait_before_next_try_in_seconds = 0.2
    trainer.fit()
    rank = dist.get_global_rank()
    if also_full and trainer.state.fsdp_state_dict_type == 'sharded':  # the same state, also as one whole file
        trainer.state.fsdp_config.state_dict_type = 'full'
        trainer.save_checkpoint(str(out / 'ckpt' / 'whole-rank{rank}.pt'))
    if probe and prune:  # what the wrapped model computes in evaluation: exact-target masks and logits
        masks = ShearPruning.masks(trainer.state)
        refresh_fp32(masks)
        seen = []  # the multipliers' dtype inside the forward (after FSDP's cast)
        hook = masks.register_forward_pre_hook(lambda module, args: seen.append(str(module.lambdas.dtype)))
        z, _, _ = masks('target')
        hook.remove()
        set_eval_masks(masks)
        trainer.state.model.eval()
        with torch.no_grad():
            ids = Tokens(2, 32, vocab, seed=5)[0]['input_ids'][None]
            logits = trainer.state.model({'input_ids': ids, 'attention_mask': torch.ones_like(ids)}).logits
        torch.save({'z': {k: v.detach().float().cpu() for k, v in z.items()}, 'ids': ids,
                    'logits': logits.float().cpu(), 'dtype': seen[0]},
                   out / f'probe-rank{dist.get_global_rank()}.pt')
    snap = None
    if prune:
        with torch.no_grad():
            snap = ShearPruning.masks(trainer.state).snapshot()
        torch.save({'log_alpha': snap.log_alpha, 'lambdas': snap.lambdas, 'stats': algo.stats},
                   out / f'masks-rank{rank}.pt')
    (out / f'losses-rank{rank}.json').write_text(json.dumps(losses.losses))
    (out / f'logged-rank{rank}.json').write_text(json.dumps(losses.logged))
    if teacher is not None:
        (out / f'teacher-rank{rank}.json').write_text(json.dumps({'bytes': teacher.teacher_bytes,
                                                                  'read': teacher.teacher_read}))
    trainer.close()
    return algo, snap


if __name__ == '__main__':
    kwargs = {}
    for arg in sys.argv[2:]:
        k, v = arg.split('=', 1)
        try:
            kwargs[k] = json.loads(v)
        except json.JSONDecodeError:
            kwargs[k] = v
    run(sys.argv[1], **kwargs)
