"""bench/gpu_check.py: without CUDA it says so and exits 0; its argument checks, table and ratio; and with --cpu
the whole check (equivalence, FSDP2 training of three arms, sharded export = masked model, the commands) runs on
a tiny model, so no code path of the GPU check is untested on a CPU-only machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.common import load_bench

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / 'bench' / 'gpu_check.py'
STAGE1 = ROOT / 'bench' / 'gpu_stage1.py'
# The lent GPU machine has torch and transformers but not the MosaicML stack: in the simulation these imports fail
# as they do there (a None in sys.modules makes `import` raise ImportError).
ABSENT = ('composer', 'llmfoundry', 'streaming', 'omegaconf', 'mcli')
RUN_WITHOUT = ('import runpy, sys\nfor m in {absent!r}: sys.modules[m] = None\nsys.argv = {argv!r}\n'
               'runpy.run_path({script!r}, run_name="__main__")')


def run_without_stack(argv, timeout):
    """Run the bench script argv[0] with `argv` in a fresh interpreter where the ABSENT modules do not import."""
    code = RUN_WITHOUT.format(absent=ABSENT, argv=argv, script=argv[0])
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), str(ROOT / 'bench')])}
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=timeout, env=env)


def load():
    return load_bench('gpu_check')


def test_arguments_table_and_ratio(capsys):
    gc = load()
    args = gc.parse_args(['--cpu'])
    assert (args.batch, args.seq, args.fsdp) == (4, 32, ['2'])
    args = gc.parse_args([])
    assert (args.batch, args.seq, args.fsdp, args.big_batch) == (8, 2048, ['1', '2'], 4)
    for bad, message in ((['--cpu', '--fsdp', '1'], '1 needs CUDA'), (['--steps', '0'], '--steps must be at least 1'),
                         (['--fsdp', '3'], 'choose from 1 and 2')):
        with pytest.raises(SystemExit) as e:
            gc.parse_args(bad)
        assert e.value.code == 2 and message in capsys.readouterr().err
    table = load_bench('_table').format_table([{'check': 'a', 'setting': 'b', 'result': 'c', 'ok': True},
                             {'check': 'd', 'setting': 'e', 'result': 'f', 'ok': False},
                             {'check': 'g', 'setting': 'h', 'result': 'i', 'ok': None}])
    assert table.splitlines() == ['| check | setting | result | ok |', '|---|---|---|---|', '| a | b | c | yes |',
                                  '| d | e | f | **NO** |', '| g | h | i | - |']
    results = {'2': {'tokens_per_s': {'plain': 200.0, 'pruned': 150.0}},
               '1': {'tokens_per_s': {'plain': 100.0, 'pruned': 90.0}}}
    assert gc.throughput_ratio(results) == ('1', 0.9)  # FSDP1 first, the paper's setting
    assert gc.throughput_ratio({'2': results['2']}) == ('2', 0.75) and gc.throughput_ratio({}) is None
    assert gc.peak_flops('NVIDIA H200') == 989e12 and gc.peak_flops('Some GPU') is None


def test_flops_per_token_counts_smollm2_parameters():
    from transformers import LlamaConfig
    gc = load()
    config = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)
    # SmolLM2-135M has 134,515,008 parameters, 61 x 576 of them in RMSNorm weights (not counted: no matmul)
    assert gc.flops_per_token(config, 0) == 6 * (134_515_008 - 61 * 576)
    assert gc.flops_per_token(config, 2048) - gc.flops_per_token(config, 0) == 12 * 30 * 9 * 64 * 2048


@pytest.mark.skipif(__import__('torch').cuda.is_available(), reason='a CUDA machine runs the real check')
def test_without_cuda_it_says_so_and_exits_0():
    res = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and 'no CUDA device here, nothing to check' in res.stdout, res.stderr[-2000:]


@pytest.mark.slow
def test_the_whole_check_on_cpu(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), '--cpu', '--out', str(tmp_path), '--warmup', '1',
                          '--rounds', '2', '--steps', '1'], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[-2] == 'checks failed: 0 of 4' and lines[-1].startswith('pruning_throughput_ratio: ')
    assert 0 < float(lines[-1].split()[-1]) < 10
    rows = [line for line in lines if line.startswith('| ')]
    for check in ('FSDP2 training throughput | plain', 'FSDP2 training throughput | pruned+kd',
                  'FSDP2 training throughput | pruned+kd+compiled',
                  'sharded FSDP2 checkpoint exports = masked model',
                  'composer-shear reference-loss', 'composer-shear eval'):
        assert any(check in r for r in rows), check
    assert (tmp_path / 'fsdp2' / 'export' / 'config.json').exists()  # the sharded checkpoint's export
    assert (tmp_path / 'fsdp2' / 'launch.log').stat().st_size > 0  # the ranks' output is kept
    written = (tmp_path / 'gpu_check.md').read_text().splitlines()
    assert len(written) == 2 + 5 + 1 + 3 and all(line in lines for line in written)  # header, rows as printed


def test_stage2_without_the_stack_says_why_in_one_row_and_exits_0(tmp_path):
    res = run_without_stack([str(SCRIPT), '--cpu', '--out', str(tmp_path)], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = (tmp_path / 'gpu_check.md').read_text().splitlines()[2:]
    assert len(rows) == 1 and 'not run: the MosaicML stack does not import (composer: ' in rows[0]
    assert res.stdout.splitlines()[-1] == 'pruning_throughput_ratio: n/a'


def test_big_model_and_target_are_a_valid_pruning():
    """--big (GPU only): the 1.1B shape and its target resolve, to about half the parameters."""
    from transformers import LlamaConfig

    from composer_shear.shapes import ModelShape
    gc = load()
    source = ModelShape.from_config(LlamaConfig(**gc.BIG, tie_word_embeddings=False))
    target = source.resolve_target(gc.BIG_TARGET)
    assert 1.0e9 < source.num_params() < 1.2e9 and 0.4 < target.num_params() / source.num_params() < 0.6


def test_table_rows_reach_the_files_as_they_are_added(tmp_path, capsys):
    table = load_bench('_table').Table(tmp_path)
    table.add('a', 'b', 'c', True)
    assert (tmp_path / 'gpu_check.md').read_text().splitlines()[-1] == '| a | b | c | yes |'
    table.add('d', 'e', 'f', None)
    assert [json.loads(line)['check'] for line in (tmp_path / 'gpu_check.jsonl').read_text().splitlines()] == ['a', 'd']
    assert capsys.readouterr().out.splitlines()[-2:] == ['| a | b | c | yes |', '| d | e | f | - |']
    assert table.checked == 1 and table.failed == []


@pytest.mark.slow
def test_stage1_runs_where_only_torch_and_transformers_are_installed(tmp_path):
    """The GPU machine's first stage, simulated on the CPU: every check passes with Composer, llm-foundry, streaming
    and omegaconf unimportable (under transformers 5 as well: scripts/test_compat.sh runs this test there)."""
    argv = [str(STAGE1), '--cpu', '--out', str(tmp_path), '--warmup', '1', '--rounds', '2', '--steps', '1']
    res = run_without_stack(argv, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[-2] == 'checks failed: 0 of 7' and lines[-1].startswith('masked_step_throughput_ratio: ')
    assert 0 < float(lines[-1].split()[-1]) < 10
    assert 'not installed: composer, llmfoundry, streaming, omegaconf |' in res.stdout
    printed = [line for line in lines if line.startswith('|')]
    assert (tmp_path / 'gpu_check.md').read_text().splitlines() == printed  # the header and every row, as printed
    for check in ('masked = exported | float32', 'masked = exported | bfloat16',
                  'training step, bf16 autocast | masked', 'one-shot export', 'one-shot masked = exported',
                  'distillation loss', 'torch.compile, masked model'):
        assert any(check in r for r in printed), check


def test_the_carried_wheels_pin_the_stack_this_repository_pins():
    """bench/gpu_wheels.txt (stage 2's wheels for the GPU machine) holds the MosaicML stack and transformers at the
    versions pyproject.toml pins, each package once."""
    lines = [line.split('#')[0].strip() for line in (ROOT / 'bench' / 'gpu_wheels.txt').read_text().splitlines()]
    pins = dict(line.split('==') for line in lines if line)
    assert len(pins) == len([line for line in lines if line])  # no package twice
    pyproject = (ROOT / 'pyproject.toml').read_text()
    for name in ('mosaicml', 'llm-foundry'):
        assert f'"{name}=={pins[name]}"' in pyproject, name
    assert '"transformers>=4.51,<4.52"' in pyproject and pins['transformers'].startswith('4.51.')
    assert pins['mosaicml-streaming'].startswith('0.12.')
