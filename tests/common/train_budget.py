"""Pruning to a parameter budget (the shape searched at the first step) with dynamic batch loading on a tiny model.
In-process (`run(...)`) or with the launcher, from the repository root:
`composer -n 2 -m tests.common.train_budget OUT_DIR [fsdp] [resume=CHECKPOINT]` (FSDP2 also needs FSDP_VERSION=2)."""

import json
import sys
from pathlib import Path

from composer import Trainer
from composer.devices import DeviceCPU
from composer.optim import DecoupledAdamW
from composer.utils import dist
from llmfoundry.models.hf import ComposerHFCausalLM
from transformers import AutoTokenizer

from composer_shear.algorithm import ShearPruning
from composer_shear.data.dynamic import build_dynamic_text_dataloader
from composer_shear.testing import save_tiny
from tests.common.train_dynamic import DOMAINS, SEQ, write_data

BUDGET = {'params': 40000}  # the tiny source has 57,920
SEARCH = {'multiple_of': 8, 'max_candidates': 12, 'held_out_batches': 2}


def run(out, fsdp=False, resume_from=None, steps=6, lag_lr=1.0, batch=4):
    out = Path(out)
    dist.initialize_dist(DeviceCPU())
    if dist.get_local_rank() == 0 and not (out / 'model' / 'config.json').exists():
        save_tiny(out / 'model')
        write_data(out / 'data')
    dist.barrier()
    tok = AutoTokenizer.from_pretrained(out / 'model')
    model = ComposerHFCausalLM(tok, pretrained_model_name_or_path=str(out / 'model'), pretrained=True,
                               attn_implementation='sdpa', use_train_metrics=False)
    train = build_dynamic_text_dataloader(
        tok, batch, dict(local=str(out / 'data'), domains=DOMAINS, proportions=[0.6, 0.3, 0.1],
                         epoch_size=4 * batch * dist.get_world_size(), max_seq_len=SEQ), num_workers=0)
    algo = ShearPruning(target=BUDGET, search=SEARCH, init={'batches': 2}, lag_lr=lag_lr)
    calls = []
    search = algo._search
    algo._search = lambda *a, **k: (calls.append(1), search(*a, **k))  # counts the searches this process ran
    trainer = Trainer(
        model=model, optimizers=DecoupledAdamW(model.parameters(), lr=1e-3, weight_decay=0.0),
        train_dataloader=train, max_duration=f'{steps}ba', algorithms=[algo], device='cpu', precision='fp32',
        seed=17, progress_bar=False, log_to_console=False, device_train_microbatch_size=batch,
        parallelism_config={'fsdp': {'state_dict_type': 'full'}} if fsdp else None, run_name='budget',
        save_folder=str(out / 'ckpt') if resume_from is None else None, save_interval='3ba',
        save_latest_filename='latest-rank{rank}.pt', load_path=resume_from)
    trainer.fit()
    masks = ShearPruning.masks(trainer.state)
    record = {'searches': len(calls), 'searched': algo.searched, 'target': algo.target_shape.target_dict(),
              'masks_target': getattr(masks, 'module', masks).target.target_dict()}
    name = 'first' if resume_from is None else 'resumed'
    (out / f'{name}-rank{dist.get_global_rank()}.json').write_text(json.dumps(record))
    trainer.close()
    return algo, trainer


if __name__ == '__main__':
    args = sys.argv[2:]
    resume = next((a.split('=', 1)[1] for a in args if a.startswith('resume=')), None)
    run(sys.argv[1], fsdp='fsdp' in args, resume_from=resume)
