"""Tiny random models, tokenizers and data for tests and benchmarks.

Everything here is small enough to run on a CPU in seconds and deterministic (fixed seeds), so tests can compare
exact values. The helpers are public so that the test suite, the benchmarks under ``bench/`` and users' own tests
share one definition:

- :func:`llama_config`, :func:`tiny_model`, :func:`save_tiny`: a tiny random LLaMA / Qwen2 model (4 layers,
  hidden size 64, 96-token vocabulary), in memory or written as a Hugging Face folder;
- :func:`tiny_tokenizer`: a character-level tokenizer that needs no download;
- :func:`random_masks`: :class:`~composer_shear.masks.ShearMasks` with random ``log_alpha``;
- :class:`Tokens` and :func:`loader`: synthetic token sequences and a distributed-aware ``DataLoader`` for them;
- :func:`write_domains`: tiny multi-domain MDS data whose samples say where they came from;
- :data:`TARGET`: a target shape for the tiny GQA model that prunes every structure.

Example::

    from composer_shear.testing import TARGET, llama_config, random_masks, tiny_model

    config = llama_config('gqa')
    model = tiny_model(config)
    masks = random_masks(config, TARGET, ['layer', 'hidden', 'head', 'intermediate'])
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config

from composer_shear._hf import dtype_kwargs
from composer_shear.masks import DEFAULT_MASK_VALUES, ShearMasks
from composer_shear.shapes import ModelShape

__all__ = [
    'TARGET',
    'Tokens',
    'write_sums_task',
    'llama_config',
    'loader',
    'random_masks',
    'save_tiny',
    'tiny_model',
    'tiny_tokenizer',
    'write_domains',
]

PathT = TypeVar('PathT', str, os.PathLike)

#: A target for the tiny GQA model of :func:`llama_config` that prunes every structure (4 -> 3 layers,
#: 64 -> 48 hidden, 8 -> 4 query heads, 2 -> 1 KV heads, 80 -> 40 intermediate).
TARGET: dict[str, int] = dict(num_hidden_layers=3, hidden_size=48, num_attention_heads=4, num_key_value_heads=1,
                              intermediate_size=40)


def llama_config(kind: str = 'gqa', tied: bool = False, **kw: Any) -> LlamaConfig | Qwen2Config:
    """The config of a tiny LLaMA-family model: 4 layers, hidden size 64, intermediate 80, vocabulary 96.

    Args:
        kind: ``'gqa'`` (LLaMA, 8 query heads, 2 KV heads, head_dim 8), ``'mha'`` (LLaMA, 8 heads, 8 KV heads)
            or ``'qwen2'`` (Qwen2 with q/k/v biases, 8 query heads, 4 KV heads).
        tied: Tie the input embedding and the LM head.
        **kw: Config fields that override the defaults above.

    Returns:
        A ``LlamaConfig`` (``'gqa'``, ``'mha'``) or a ``Qwen2Config`` (``'qwen2'``).
    """
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=4, rms_norm_eps=1e-5,
                max_position_embeddings=128, tie_word_embeddings=tied, head_dim=8)
    if kind == 'mha':
        base.update(num_attention_heads=8, num_key_value_heads=8)
    elif kind == 'gqa':
        base.update(num_attention_heads=8, num_key_value_heads=2)
    elif kind == 'qwen2':
        base.update(num_attention_heads=8, num_key_value_heads=4)
        base.pop('head_dim')
        return Qwen2Config(**{**base, **kw})
    return LlamaConfig(**{**base, **kw})


def tiny_model(config: LlamaConfig | Qwen2Config, attn: str = 'eager', seed: int = 0) -> PreTrainedModel:
    """A random fp32 causal LM for `config`, in eval mode.

    Norm weights are drawn from U(0.5, 1.5) and biases from N(0, 0.1) (instead of ones and zeros), so that
    mistakes in folding them into neighbouring weights show.

    Args:
        config: The model's config, e.g. from :func:`llama_config`.
        attn: The attention implementation (``'eager'``, ``'sdpa'``, ``'flash_attention_2'``).
        seed: The ``torch.manual_seed`` set before the weights are drawn.

    Returns:
        The model (``AutoModelForCausalLM.from_config``) in eval mode.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, **dtype_kwargs(torch.float32))
    # non-trivial norm weights so that folding mistakes show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'norm' in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith('bias'):
                p.normal_(0, 0.1)
    return model.eval()


def random_masks(config: LlamaConfig | Qwen2Config, target: Mapping[str, int] | str, modules: Sequence[str],
                 seed: int = 0, low: float = -3.0, high: float = 3.0,
                 values: str = DEFAULT_MASK_VALUES) -> ShearMasks:
    """Pruning masks for `config` with every ``log_alpha`` drawn from U(low, high).

    Args:
        config: The source model's config.
        target: The target shape (fields of the HF config) or a preset name, as ``ModelShape.resolve_target``
            takes it.
        modules: The pruning modules (``'layer'``, ``'hidden'``, ``'head'``, ``'intermediate'``).
        seed: The seed of the generator that draws ``log_alpha``.
        low: The lower bound of the uniform draw.
        high: The upper bound of the uniform draw.
        values: ``binary`` or ``soft`` kept values in deterministic masks.

    Returns:
        The masks (a ``ShearMasks`` module).
    """
    source = ModelShape.from_config(config)
    masks = ShearMasks(source, source.resolve_target(target, modules), modules, values=values)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in masks.log_alpha.values():
            p.copy_(torch.empty(p.shape).uniform_(low, high, generator=gen))
    return masks


def tiny_tokenizer(vocab_size: int = 96) -> PreTrainedTokenizerFast:
    """A character-level tokenizer with `vocab_size` ids (0: ``<unk>``, 1: ``<s>``, 2: ``</s>``).

    Ids from 3 on are the printable ASCII characters from ``' '`` on; padding is ``</s>``.

    Args:
        vocab_size: The number of ids (at most 98).

    Returns:
        A fast tokenizer, built in memory (no download).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 127)][: vocab_size - 3]
    vocab = {'<unk>': 0, '<s>': 1, '</s>': 2} | {c: i + 3 for i, c in enumerate(chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.Split('', behavior='isolated')
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token='<unk>', bos_token='<s>', eos_token='</s>',
                                   pad_token='</s>', model_input_names=['input_ids', 'attention_mask'])


def save_tiny(folder: PathT, kind: str = 'gqa', tied: bool = False, attn: str = 'sdpa', **kw: Any) -> PathT:
    """Write a tiny random model (:func:`llama_config`, :func:`tiny_model`) and its tokenizer as an HF folder.

    Args:
        folder: Where to write (created if missing).
        kind: The model kind, as for :func:`llama_config`.
        tied: Tie the input embedding and the LM head.
        attn: The attention implementation saved in the config.
        **kw: Config fields that override the defaults of :func:`llama_config`.

    Returns:
        `folder`, unchanged.
    """
    config = llama_config(kind, tied=tied, **kw)
    model = tiny_model(config, attn=attn)
    model.save_pretrained(folder)
    tiny_tokenizer(config.vocab_size).save_pretrained(folder)
    return folder


class Tokens(Dataset):
    """Deterministic token sequences with structure (each row an arithmetic progression mod vocab).

    Row i is ``3 + (start_i + step_i * arange(seq)) % (vocab - 3)`` with ``start_i`` in [3, vocab) and
    ``step_i`` in [1, 5), drawn from a generator seeded with `seed`; ids 0-2 (special tokens) never occur.
    Items are dicts with ``input_ids``, ``attention_mask`` (all ones) and ``labels`` (a copy of the ids).

    Args:
        n: The number of rows.
        seq: The sequence length.
        vocab: The vocabulary size.
        seed: The generator's seed.
    """

    def __init__(self, n: int, seq: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(3, vocab, (n, 1), generator=g)
        step = torch.randint(1, 5, (n, 1), generator=g)
        self.ids = 3 + (start + step * torch.arange(seq)) % (vocab - 3)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {'input_ids': ids, 'attention_mask': torch.ones_like(ids), 'labels': ids.clone()}


def loader(ds: Dataset, batch: int) -> DataLoader:
    """A ``DataLoader`` over `ds` with Composer's distributed sampler (no shuffling, incomplete batch dropped).

    Args:
        ds: The dataset, e.g. :class:`Tokens`.
        batch: The per-rank batch size.

    Returns:
        The loader; each rank reads its own share of `ds`.
    """
    from composer.utils import dist  # only here: the rest of this module needs torch and transformers alone
    return DataLoader(ds, batch_size=batch, sampler=dist.get_sampler(ds, shuffle=False), drop_last=True)


def write_domains(root: Path, sizes: Mapping[str, int], seq: int = 8, split: str = 'train') -> Path:
    """Write tiny multi-domain MDS data: sample i of domain d holds ``[d, i, i, ...]``, so it can be traced.

    Domain d (in the order of `sizes`) goes to ``root / split / name``, one ``tokens`` column of uint16
    arrays, in shards of at most 4 KiB.

    Args:
        root: The data folder.
        sizes: The number of samples per domain name.
        seq: The length of each sample.
        split: The split's subfolder.

    Returns:
        `root`.
    """
    from streaming import MDSWriter

    for d, (name, n) in enumerate(sizes.items()):
        with MDSWriter(out=str(root / split / name), columns={'tokens': 'ndarray:uint16'}, size_limit=1 << 12) as w:
            for i in range(n):
                w.write({'tokens': np.array([d] + [i] * (seq - 1), dtype=np.uint16)})
    return root


def write_sums_task(folder: str | os.PathLike, n: int = 6) -> Path:
    """A tiny ICL tasks YAML for tests: `n` short multiple-choice sums ("3 plus 4 is" -> 7 / 8 / -1, gold 0) in
    llm-foundry's jsonl format, 0-shot, with a gauntlet entry (chance 1/3). Fits a 32-token context with a
    character-level tokenizer. Returns the YAML's path (its dataset_uri is absolute)."""
    import json
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = [(1 + i % 7, 1 + (3 * i) % 5) for i in range(n)]
    rows = [{'query': f'{a} plus {b} is', 'choices': [str(a + b), str(a + b + 1), str(a - b)], 'gold': 0}
            for a, b in pairs]
    (folder / 'sums.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    path = folder / 'tasks.yaml'
    path.write_text(
        f'icl_tasks:\n- {{label: sums, dataset_uri: {folder / "sums.jsonl"}, icl_task_type: multiple_choice, '
        'num_fewshot: [0]}\n'
        'eval_gauntlet:\n  weighting: EQUAL\n  subtract_random_baseline: true\n  rescale_accuracy: true\n'
        '  categories:\n  - {name: all, benchmarks: [{name: sums, num_fewshot: 0, random_baseline: 0.3333}]}\n')
    return path
