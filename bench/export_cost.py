"""Export cost against model size: `composer-shear export` of a whole Composer checkpoint (fp32 weights, the
masks, and Adam's two moments per weight, as a pruning run saves it) for a tiny model, SmolLM2-135M's shape and a
~1.1B model (TinyLlama's shape), random weights. Each export runs in a fresh process that reports its wall-clock
and peak RSS (VmHWM minus its RSS after imports); the checkpoint is read memory-mapped (the default) and,
side by side, fully loaded (`mmap=False`). Prints a table; the last line is
`export_peak_over_weights: R`: mapped peak RSS / fp32 weight bytes at the largest size.

    python bench/export_cost.py [--sizes tiny,smollm2,1b]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from composer_shear.masks import ShearMasks
from composer_shear.shapes import ModelShape
from composer_shear.testing import tiny_tokenizer

SIZES = {
    'tiny': (dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=8),
             dict(num_hidden_layers=3, hidden_size=48, num_attention_heads=4, num_key_value_heads=1,
                  intermediate_size=40)),
    'smollm2': (dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True),
                dict(num_hidden_layers=20, hidden_size=384, num_attention_heads=6, num_key_value_heads=2,
                     intermediate_size=768)),
    '1b': (dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, head_dim=64),
           dict(num_hidden_layers=14, hidden_size=1024, num_attention_heads=16, num_key_value_heads=2,
                intermediate_size=2816)),
}
MODULES = ('layer', 'hidden', 'head', 'intermediate')
CHILD = '''
import json, sys, time
from composer_shear.export import export_checkpoint

def status(field):  # this process's own address space (ru_maxrss would inherit the parent's peak)
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ':'))

base = status('VmRSS')
start = time.perf_counter()
export_checkpoint(sys.argv[1], sys.argv[2], source=sys.argv[3], mmap=sys.argv[4] == '1')
print(json.dumps({'seconds': time.perf_counter() - start, 'peak_kib': status('VmHWM') - base}))
'''


def write_checkpoint(folder: Path, config: dict, target: dict) -> tuple[Path, int]:
    """A source HF folder (config + tokenizer) and a Composer-format checkpoint; returns it and the weight bytes."""
    cfg = LlamaConfig(**config)
    cfg.save_pretrained(folder / 'source')
    tiny_tokenizer().save_pretrained(folder / 'source')
    with torch.device('meta'):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop('lm_head.weight')
    gen = torch.Generator().manual_seed(0)
    model = {f'model.{k}': torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
    source = ModelShape.from_config(cfg)
    masks = ShearMasks(source, source.resolve_target(target, MODULES), MODULES)
    with torch.no_grad():
        for p in masks.log_alpha.values():
            p.uniform_(-3, 3, generator=gen)
    model |= {f'shear_masks.{k}': v for k, v in masks.state_dict().items()}
    # empty_like: never-touched pages cost no RSS here, yet fill the file like real moments
    moments = {i: {'exp_avg': torch.empty_like(v), 'exp_avg_sq': torch.empty_like(v)}
               for i, v in enumerate(model.values())}
    path = folder / 'ep0-ba100-rank0.pt'
    torch.save({'state': {'model': model, 'optimizers': {'DecoupledAdamW': {'state': moments}}}}, path)
    return path, sum(v.numel() * 4 for k, v in model.items() if k.startswith('model.'))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--sizes', default='tiny,smollm2,1b')
    args = p.parse_args(argv)
    rows = []
    print(f'{"size":>8} | {"params":>13} | {"checkpoint":>10} | {"mapped: s":>9} | {"peak":>9} | '
          f'{"loaded: s":>9} | {"peak":>9}', flush=True)
    for name in args.sizes.split(','):
        config, target = SIZES[name]
        with tempfile.TemporaryDirectory(dir='.') as tmp:
            tmp = Path(tmp)
            ckpt, weight_bytes = write_checkpoint(tmp, config, target)
            result = {}
            for mmap in ('1', '0'):
                res = subprocess.run([sys.executable, '-c', CHILD, str(ckpt), str(tmp / f'out{mmap}'),
                                      str(tmp / 'source'), mmap], capture_output=True, text=True, check=False)
                if res.returncode:
                    raise SystemExit(res.stderr[-3000:])
                result[mmap] = json.loads(res.stdout.strip().splitlines()[-1])
            row = dict(size=name, params=weight_bytes // 4, weight_bytes=weight_bytes,
                       checkpoint_bytes=ckpt.stat().st_size, mapped=result['1'], loaded=result['0'])
            rows.append(row)
            gib = 1024 ** 3
            print(f'{name:>8} | {row["params"]:>13,} | {row["checkpoint_bytes"] / gib:>7.2f} GiB | '
                  f'{result["1"]["seconds"]:>9.2f} | {result["1"]["peak_kib"] / 2**20:>5.2f} GiB | '
                  f'{result["0"]["seconds"]:>9.2f} | {result["0"]["peak_kib"] / 2**20:>5.2f} GiB', flush=True)
    big = rows[-1]
    if len(rows) > 1:
        small = rows[-2]
        print(f'{small["size"]} -> {big["size"]}: parameters x{big["params"] / small["params"]:.1f}, mapped export '
              f'time x{big["mapped"]["seconds"] / small["mapped"]["seconds"]:.1f}, peak memory '
              f'x{big["mapped"]["peak_kib"] / max(small["mapped"]["peak_kib"], 1):.1f}')
    print(f'loaded / mapped peak at {big["size"]}: {big["loaded"]["peak_kib"] / big["mapped"]["peak_kib"]:.2f}')
    print(f'export_peak_over_weights: {big["mapped"]["peak_kib"] * 1024 / big["weight_bytes"]:.2f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
