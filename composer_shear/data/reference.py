"""`composer-shear reference-loss`: per-domain eval loss of an HF model on prepared MDS eval splits."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from composer_shear._io import write_text

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

__all__ = ['eval_loss', 'reference_loss']


def eval_loss(model: PreTrainedModel, local: str | os.PathLike, domain: str, max_seq_len: int, batch_size: int = 8,
              max_batches: int | None = None, split: str = 'eval') -> tuple[float, int]:
    """Token-weighted mean next-token CE of one domain's eval split, and the tokens scored."""
    from streaming import LocalDataset  # no shared memory: StreamingDatasets made in a loop leak descriptors
    ds = LocalDataset(os.path.join(local, split, domain))
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for b, start in enumerate(range(0, len(ds), batch_size)):
            if max_batches is not None and b >= max_batches:
                break
            rows = [ds[i]['tokens'][:max_seq_len] for i in range(start, min(start + batch_size, len(ds)))]
            ids = torch.from_numpy(np.stack(rows).astype(np.int64)).to(model.device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction='sum')
            total += loss.item()
            count += ids[:, 1:].numel()
    return total / count, count


def reference_loss(model_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike,
                   max_batches: int | None = None, batch_size: int = 8,
                   device: str | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """Write `out` (JSON: per-domain losses and tokens scored) for `dynamic_loading`'s `reference_loss`.
    `device`: default cuda when there is one; the loss itself is always accumulated in fp32."""
    from transformers import AutoModelForCausalLM
    manifest = json.loads(Path(data, 'manifest.json').read_text())
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).to(device)
    losses, tokens = {}, {}
    for d in manifest['domains']:
        losses[d], tokens[d] = eval_loss(model, data, d, manifest['max_seq_len'], batch_size, max_batches)
        log.info('reference loss of %s: %.4f over %d tokens', d, losses[d], tokens[d])
    result = {'model': str(model_dir), 'data': str(data), 'device': str(device),
              'dtype': str(dtype).removeprefix('torch.'), 'losses': losses, 'tokens': tokens}
    write_text(out, json.dumps(result, indent=2) + '\n')
    return result
