"""Tiny random LLaMA-family models for tests."""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from composer_shear.masks import ShearMasks
from composer_shear.shapes import ModelShape


def llama_config(kind='gqa', tied=False, **kw):
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


def tiny_model(config, attn='eager', seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, torch_dtype=torch.float32)
    # non-trivial norm weights so that folding mistakes show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'norm' in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith('bias'):
                p.normal_(0, 0.1)
    return model.eval()


def random_masks(config, target, modules, seed=0, low=-3.0, high=3.0):
    source = ModelShape.from_config(config)
    masks = ShearMasks(source, source.resolve_target(target, modules), modules)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in masks.log_alpha.values():
            p.copy_(torch.empty(p.shape).uniform_(low, high, generator=gen))
    return masks


def tiny_tokenizer(vocab_size=96):
    """A character-level tokenizer with `vocab_size` ids (0: <unk>, 1: <s>, 2: </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = [chr(c) for c in range(32, 127)][: vocab_size - 3]
    vocab = {'<unk>': 0, '<s>': 1, '</s>': 2} | {c: i + 3 for i, c in enumerate(chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.Split('', behavior='isolated')
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token='<unk>', bos_token='<s>', eos_token='</s>',
                                   pad_token='</s>', model_input_names=['input_ids', 'attention_mask'])


def save_tiny(folder, kind='gqa', tied=False, attn='sdpa', **kw):
    """Write a tiny random model and its tokenizer as an HF folder."""
    config = llama_config(kind, tied=tied, **kw)
    model = tiny_model(config, attn=attn)
    model.save_pretrained(folder)
    tiny_tokenizer(config.vocab_size).save_pretrained(folder)
    return folder
