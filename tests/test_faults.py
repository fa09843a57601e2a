"""User mistakes and damaged inputs at the command line: one line naming the culprit, exit 2, nothing written,
nothing the user had changed. Runs `composer_shear.cli.main` in-process (the same code the command runs)."""

import json

import pytest
import torch

from composer_shear.cli import main
from composer_shear.data.prepare import prepare
from composer_shear.testing import save_tiny, tiny_tokenizer

SEQ = 32


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('faults')
    tiny_tokenizer().save_pretrained(root / 'tok')
    for d in ('a', 'b'):
        (root / 'raw' / d).mkdir(parents=True)
        (root / 'raw' / d / 'x.jsonl').write_text(''.join(json.dumps({'text': f'{d} document {i} ' * 8}) + '\n'
                                                          for i in range(6)))
    prepare(root / 'raw', root / 'tok', root / 'data', SEQ, eval_fraction=0.3, progress=False)
    save_tiny(root / 'model')
    save_tiny(root / 'small_vocab', vocab_size=50)  # the data holds ids up to 95
    save_tiny(root / 'short', max_position_embeddings=16)  # the data's sequences are 32 long
    (root / 'a_folder').mkdir()
    torch.save({'state': {'model': {'w': torch.ones(64, 64)}}}, root / 'ckpt.pt')
    data = bytearray((root / 'ckpt.pt').read_bytes())
    data[len(data) // 2] ^= 0xFF
    (root / 'flipped.pt').write_bytes(bytes(data))
    return root


def no_gpu():
    return not torch.cuda.is_available()


CASES = [  # (arguments with {root}, what the one line must say)
    ('reference-loss --model {root}/model --data {root}/data --out {root}/r.json --max-batches 0',
     '--max-batches must be a positive integer, got 0'),
    ('reference-loss --model {root}/model --data {root}/data --out {root}/r.json --batch-size 0',
     '--batch-size must be a positive integer, got 0'),
    ('reference-loss --model {root}/model --data {root}/data --out {root}/a_folder',
     '--out {root}/a_folder is a folder'),
    ('reference-loss --model {root}/model --data {root}/raw --out {root}/r.json',
     '{root}/raw is not a prepare-data output'),
    ('reference-loss --model {root}/tok --data {root}/data --out {root}/r.json',
     '{root}/tok is not a Hugging Face model folder'),
    ('reference-loss --model {root}/small_vocab --data {root}/data --out {root}/r.json',
     "outside the model's vocabulary of 50"),
    ('reference-loss --model {root}/short --data {root}/data --out {root}/r.json',
     'holds sequences of 32 tokens, longer than {root}/short supports (max_position_embeddings 16)'),
    ('prepare-data --input {root}/raw --tokenizer {root}/tok --out {root}/p --max-seq-len -3',
     '--max-seq-len must be an integer of at least 2, got -3'),
    ('prepare-data --input {root}/raw --tokenizer {root}/tok --out {root}/p --max-seq-len 8 --eval-fraction 1',
     '--eval-fraction must be between 0 and 1'),
    ('prepare-data --input {root}/raw --tokenizer {root}/tok --out {root}/ckpt.pt --max-seq-len 8',
     '--out {root}/ckpt.pt exists and is not a folder'),
    ('prepare-data --input {root}/raw --tokenizer {root}/tok --out {root}/data --max-seq-len 16',
     'prepared from other inputs or settings (max_seq_len 32 -> 16; eval_fraction 0.3 -> 0.1)'),
    ('export --checkpoint {root}/flipped.pt --out {root}/exported',
     'checkpoint {root}/flipped.pt is corrupt: record'),
    ('inspect {root}/truncated.safetensors', '{root}/truncated.safetensors is not a readable safetensors file'),
]
if no_gpu():
    CASES.append(('reference-loss --model {root}/model --data {root}/data --out {root}/r.json --device cuda',
                  '--device cuda is not usable here'))


@pytest.mark.parametrize('args, message', CASES, ids=[c[0].split()[0] + ':' + c[1][:30] for c in CASES])
def test_one_line_and_exit_2(setup, capsys, args, message):
    root = setup
    from safetensors.torch import save_file
    if 'truncated' in args and not (root / 'truncated.safetensors').exists():
        save_file({'log_alpha.layer': torch.zeros(1000)}, root / 'truncated.safetensors', metadata={'source': '{}'})
        path = root / 'truncated.safetensors'
        path.write_bytes(path.read_bytes()[:-500])
    before = {p: p.read_bytes() for p in root.rglob('*') if p.is_file()}
    assert main(args.format(root=root).split()) == 2
    err = capsys.readouterr().err
    command = args.split()[0]
    assert err.count('\n') == 1 and err.startswith(f'composer-shear {command}: error: ') and \
        f'{command}: {command}:' not in err and message.format(root=root) in err, err
    after = {p: p.read_bytes() for p in root.rglob('*') if p.is_file() and not p.name.endswith('.lock')}
    assert after == {p: b for p, b in before.items() if not p.name.endswith('.lock')}  # nothing written or changed
