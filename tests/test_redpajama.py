"""The 7-domain RedPajama sample beside the repository: prepared, then mixed by the dynamic loader."""

import json
from pathlib import Path

import numpy as np

from composer_shear.data.dynamic import build_dynamic_text_dataloader
from composer_shear.data.prepare import prepare
from composer_shear.testing import tiny_tokenizer

SAMPLE = Path(__file__).resolve().parents[1] / 'data' / 'redpajama_sample'
DOMAINS = ['cc', 'github', 'book', 'stackexchange', 'wiki', 'arxiv', 'c4-rp']
RP_MIX = [0.67, 0.045, 0.045, 0.02, 0.045, 0.025, 0.15]


def test_prepare_and_mix_the_redpajama_sample(tmp_path):
    assert SAMPLE.is_dir(), f'the RedPajama sample is expected at {SAMPLE}'
    tiny_tokenizer().save_pretrained(tmp_path / 'tok')
    manifest = prepare(SAMPLE, tmp_path / 'tok', tmp_path / 'rp', max_seq_len=128, progress=False)
    assert sorted(manifest['domains']) == sorted(DOMAINS)
    assert manifest['dtype'] == 'uint16'
    for d, splits in manifest['domains'].items():
        docs = sum(1 for f in (SAMPLE / d).glob('*.jsonl') for line in f.open() if line.strip())
        assert splits['train']['documents'] + splits['eval']['documents'] == docs
        assert splits['eval']['documents'] >= 1 and splits['train']['sequences'] >= 1
        assert splits['train']['tokens'] == 128 * splits['train']['sequences']
    assert json.loads((tmp_path / 'rp' / 'manifest.json').read_text()) == manifest
    dl = build_dynamic_text_dataloader(None, 8, dict(local=str(tmp_path / 'rp'), domains=DOMAINS, proportions=RP_MIX,
                                                     epoch_size=2000, max_seq_len=128), num_workers=2).dataloader
    counts = np.zeros(7)
    for batch in dl:
        counts += np.bincount(batch['domain'].numpy(), minlength=7)
        assert batch['input_ids'].shape == (8, 128) and batch['input_ids'].max() < 96
    np.testing.assert_allclose(counts / counts.sum(), RP_MIX, atol=1 / 2000)
