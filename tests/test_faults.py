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


# (arguments with {root}, what the one line must say, answered before torch is imported)
CASES = [
    ('reference-loss --model {root}/model --data {root}/data --out {root}/r.json --max-batches 0',
     '--max-batches must be a positive integer, got 0', True),
    ('reference-loss --model {root}/model --data {root}/data --out {root}/r.json --batch-size 0',
     '--batch-size must be a positive integer, got 0', True),
    ('reference-loss --model {root}/model --data {root}/data --out {root}/a_folder',
     '--out {root}/a_folder is a folder', True),
    ('reference-loss --model {root}/model --data {root}/raw --out {root}/r.json',
     '{root}/raw is not a prepare-data output', True),
    ('reference-loss --model {root}/tok --data {root}/data --out {root}/r.json',
     '--model {root}/tok is not a Hugging Face model folder', True),
    ('reference-loss --model {root}/small_vocab --data {root}/data --out {root}/r.json',
     "outside the model's vocabulary of 50", False),
    ('reference-loss --model {root}/short --data {root}/data --out {root}/r.json',
     'holds sequences of 32 tokens, longer than {root}/short supports (max_position_embeddings 16)', False),
    ('prepare-data --input {root}/raw --tokenizer {root}/tok --out {root}/p --max-seq-len -3',
     '--max-seq-len must be an integer of at least 2, got -3', True),
    ('prepare-data --input {root}/raw --tokenizer {root}/tok --out {root}/p --max-seq-len 8 --eval-fraction 1',
     '--eval-fraction must be between 0 and 1', True),
    ('prepare-data --input {root}/raw --tokenizer {root}/tok --out {root}/ckpt.pt --max-seq-len 8',
     '--out {root}/ckpt.pt exists and is not a folder', True),
    ('prepare-data --input {root}/raw --tokenizer {root}/tok --out {root}/data --max-seq-len 16',
     'prepared from other inputs or settings (max_seq_len 32 -> 16; eval_fraction 0.3 -> 0.1)', True),
    ('export --checkpoint {root}/flipped.pt --out {root}/exported',
     'checkpoint {root}/flipped.pt is corrupt: record', False),
    ('export --checkpoint {root}/ckpt.pt --out {root}/a_folder',
     '{root}/a_folder already exists (pass --overwrite to replace it)', True),
    ('export --checkpoint {root}/missing.pt --out {root}/exported',
     'checkpoint {root}/missing.pt does not exist', True),
    ('export --checkpoint {root}/ckpt.pt --out {root}/exported --source {root}/tok',
     '--source {root}/tok is not a Hugging Face model folder', True),
    ('export --checkpoint {root}/sharded --out {root}/exported --optimizer-state',
     '{root}/sharded is a sharded checkpoint; carrying the optimizer state needs a whole .pt checkpoint', True),
    ('inspect {root}/truncated.safetensors', '{root}/truncated.safetensors is not a readable safetensors file', False),
    ('inspect {root}/missing.pt', '{root}/missing.pt does not exist', True),
    ('eval {root}/model --limit 0', '--limit must be a positive integer, got 0', True),
    ('eval {root}/model --tasks {root}/missing.yaml', '--tasks {root}/missing.yaml is not a file', True),
    ('eval {root}/tok', '{root}/tok is not a Hugging Face model folder', True),
    ('assets --cache-dir {root}/ckpt.pt', '--cache-dir {root}/ckpt.pt is a file, not a folder', True),
    ('verify-data {root}/missing', '{root}/missing is not a folder', True),
]
if no_gpu():
    CASES.append(('reference-loss --model {root}/model --data {root}/data --out {root}/r.json --device cuda',
                  '--device cuda is not usable here', False))


@pytest.mark.parametrize('args, message, light', CASES, ids=[c[0].split()[0] + ':' + c[1][:30] for c in CASES])
def test_one_line_and_exit_2(setup, capsys, args, message, light):
    root = setup
    from safetensors.torch import save_file
    if 'truncated' in args and not (root / 'truncated.safetensors').exists():
        save_file({'log_alpha.layer': torch.zeros(1000)}, root / 'truncated.safetensors', metadata={'source': '{}'})
        path = root / 'truncated.safetensors'
        path.write_bytes(path.read_bytes()[:-500])
    if 'sharded' in args:  # a torch.distributed.checkpoint folder, as far as the command's checks look
        (root / 'sharded').mkdir(exist_ok=True)
        (root / 'sharded' / '.metadata').touch()
    before = {p: p.read_bytes() for p in root.rglob('*') if p.is_file()}
    assert main(args.format(root=root).split()) == 2
    err = capsys.readouterr().err
    command = args.split()[0]
    assert err.count('\n') == 1 and err.startswith(f'composer-shear {command}: error: ') and \
        f'{command}: {command}:' not in err and message.format(root=root) in err, err
    after = {p: p.read_bytes() for p in root.rglob('*') if p.is_file() and not p.name.endswith('.lock')}
    assert after == {p: b for p, b in before.items() if not p.name.endswith('.lock')}  # nothing written or changed


PROBE = """
import json, sys, time
from composer_shear.cli import main
for args in json.loads(sys.argv[1]):
    start = time.perf_counter()
    rc = main(args)
    print(json.dumps([args[0], rc, 'torch' in sys.modules, time.perf_counter() - start]), flush=True)
"""


def test_mistakes_are_answered_before_torch_is_imported(setup):
    """The argument checks run before the heavy imports: in a fresh interpreter every light row exits 2 without
    importing torch (which alone takes seconds here; the answers take ~0.03 s each on a quiet machine)."""
    import subprocess
    import sys
    rows = [args.format(root=setup).split() for args, _, light in CASES if light]
    res = subprocess.run([sys.executable, '-c', PROBE, json.dumps(rows)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    answers = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(answers) == len(rows) and res.stderr.count('\n') == len(rows), res.stderr
    for (_, rc, torch_imported, seconds), args in zip(answers, rows, strict=True):
        assert rc == 2 and not torch_imported, (args, rc, torch_imported, seconds)


def test_demo_arguments_are_checked_first(capsys):
    with pytest.raises(SystemExit) as e:
        main(['demo', '--prune-steps', '0', '--out', '/nonexistent/never-created'])
    assert e.value.code == 2 and '--prune-steps must be at least 1, got 0' in capsys.readouterr().err


KILL = """
import os, signal, sys
from composer_shear.data import prepare as p
point, count = sys.argv[1], int(sys.argv[2])
seen = [0]
def kill_at(name, fn):
    def wrapped(*a, **k):
        seen[0] += 1
        if seen[0] == count:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return wrapped
if point == 'write':  # while shards are written
    from streaming import MDSWriter
    MDSWriter.write = kill_at('write', MDSWriter.write)
else:  # while the finished output is renamed into place
    import pathlib
    pathlib.Path.rename = kill_at('rename', pathlib.Path.rename)
p.prepare(sys.argv[3], sys.argv[4], sys.argv[5], 16, eval_fraction=0.3, progress=False, overwrite=True)
"""


def test_prepare_data_killed_anywhere_leaves_the_old_output_and_reruns_identically(tmp_path):
    """SIGKILL at several points of a rebuild: the previous output stays byte for byte, and the next run gives
    exactly the output of an uninterrupted run."""
    import subprocess
    import sys

    from tests.test_prepare import snapshot
    tiny_tokenizer().save_pretrained(tmp_path / 'tok')
    raw = tmp_path / 'raw'
    for d in ('a', 'b', 'c'):
        (raw / d).mkdir(parents=True)
        (raw / d / 'x.jsonl').write_text(''.join(json.dumps({'text': f'{d} text number {i} ' * 6}) + '\n'
                                                 for i in range(300)))
    out = tmp_path / 'out'
    prepare(raw, tmp_path / 'tok', out, 16, eval_fraction=0.3, progress=False)
    old = snapshot(out)
    with open(raw / 'c' / 'x.jsonl', 'a') as f:  # new inputs: the runs below rebuild
        f.write(json.dumps({'text': 'one more document ' * 5}) + '\n')
    prepare(raw, tmp_path / 'tok', tmp_path / 'clean', 16, eval_fraction=0.3, progress=False)
    for point, count in (('write', 700), ('rename', 1), ('rename', 2)):  # mid-write, then each rename
        run = subprocess.run([sys.executable, '-c', KILL, point, str(count), raw, tmp_path / 'tok', out],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == -9, (point, count, run.stderr[-2000:])
        if point == 'rename' and count == 2:  # died between moving the old output aside and the new one in:
            assert not out.exists()  # the next run puts the old output back first (and then refuses, as it
            with pytest.raises(ValueError, match='prepared from other inputs'):  # was made from other inputs)
                prepare(raw, tmp_path / 'tok', out, 16, eval_fraction=0.3, progress=False)
        assert snapshot(out) == old, (point, count)
    prepare(raw, tmp_path / 'tok', out, 16, eval_fraction=0.3, progress=False, overwrite=True)
    assert snapshot(out) == snapshot(tmp_path / 'clean')
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(('.out.tmp-', '.out.old-'))) == []


EXPORT_KILL = """
import os, signal, sys
from composer_shear import export
point = sys.argv[1]
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
if point == 'masks':  # while the export folder is being written
    export.save_file = die
else:  # the finished folder about to be renamed into place
    import pathlib
    pathlib.Path.rename = die
export.export_checkpoint(sys.argv[2], sys.argv[3], overwrite=True)
"""


def test_export_killed_leaves_no_partial_output_and_the_checkpoint_untouched(tmp_path):
    import subprocess
    import sys

    from composer_shear.export import export_checkpoint
    from tests.common.train_tiny import run
    from tests.test_prepare import snapshot
    run(tmp_path / 'train', steps=2, save_interval='2ba', eval_interval='2ba', warmup='1ba')
    ckpt = tmp_path / 'train' / 'ckpt' / 'latest-rank0.pt'
    before = ckpt.read_bytes()
    out = tmp_path / 'pruned'
    for point in ('masks', 'rename'):
        res = subprocess.run([sys.executable, '-c', EXPORT_KILL, point, ckpt, out], capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == -9, (point, res.stderr[-2000:])
        assert not out.exists() and ckpt.read_bytes() == before, point
    export_checkpoint(ckpt, out)
    export_checkpoint(ckpt, tmp_path / 'again')
    assert ckpt.read_bytes() == before
    a, b = snapshot(out), snapshot(tmp_path / 'again')
    assert a.keys() == b.keys()
    for name in a:  # the same export; safetensors orders its metadata at random: compare what it holds
        assert contents(out / name) == contents(tmp_path / 'again' / name) if name.endswith('.safetensors') \
            else a[name] == b[name], name


def contents(path):
    from safetensors import safe_open
    with safe_open(str(path), 'pt') as f:
        return f.metadata(), {k: f.get_tensor(k).tolist() for k in f.keys()}
