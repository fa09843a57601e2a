"""`composer-shear reference-loss`: per-domain eval loss of an HF model on prepared MDS eval splits."""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING

import numpy as np
import torch

from composer_shear._io import write_text
from composer_shear.checks import check_reference_args

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

__all__ = ['eval_loss', 'reference_loss']


def eval_loss(model: PreTrainedModel, local: str | os.PathLike, domain: str, max_seq_len: int, batch_size: int = 8,
              max_batches: int | None = None, split: str = 'eval', vocab_size: int | None = None) -> tuple[float, int]:
    """Token-weighted mean next-token CE of one domain's eval split, and the tokens scored. With `vocab_size`, a
    token id outside the model's vocabulary is an error naming the domain (data prepared with another
    tokenizer)."""
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
            if vocab_size is not None and int(ids.max()) >= vocab_size:
                raise ValueError(f'reference-loss: domain {domain!r} holds token id {int(ids.max())}, outside the '
                                 f'model\'s vocabulary of {vocab_size} (was the data prepared with another tokenizer?)')
            logits = model(input_ids=ids).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction='sum')
            total += loss.item()
            count += ids[:, 1:].numel()
    return total / count, count


def check_inputs(model_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike,
                 max_batches: int | None, batch_size: int, device: str | None) -> dict:
    """Every argument of `reference_loss` that can be checked before the model is loaded; returns the manifest."""
    manifest = check_reference_args(model_dir, data, out, max_batches, batch_size)
    if device is not None:
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as e:
            raise ValueError(f'reference-loss: --device {device} is not usable here ({str(e).splitlines()[0]})') from e
    return manifest


def reference_loss(model_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike,
                   max_batches: int | None = None, batch_size: int = 8,
                   device: str | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """Write `out` (JSON: per-domain losses and tokens scored) for `dynamic_loading`'s `reference_loss`.
    `device`: default cuda when there is one; the loss itself is always accumulated in fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM
    manifest = check_inputs(model_dir, data, out, max_batches, batch_size, device)
    config = AutoConfig.from_pretrained(model_dir)
    limit = getattr(config, 'max_position_embeddings', None)
    if limit is not None and manifest['max_seq_len'] > limit:
        raise ValueError(f'reference-loss: {data} holds sequences of {manifest["max_seq_len"]} tokens, longer than '
                         f'{model_dir} supports (max_position_embeddings {limit})')
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).to(device)
    vocab = model.get_input_embeddings().num_embeddings
    losses, tokens = {}, {}
    for d in manifest['domains']:
        losses[d], tokens[d] = eval_loss(model, data, d, manifest['max_seq_len'], batch_size, max_batches,
                                         vocab_size=vocab)
        log.info('reference loss of %s: %.4f over %d tokens', d, losses[d], tokens[d])
    result = {'model': str(model_dir), 'data': str(data), 'device': str(device),
              'dtype': str(dtype).removeprefix('torch.'), 'losses': losses, 'tokens': tokens}
    write_text(out, json.dumps(result, indent=2) + '\n')
    return result
