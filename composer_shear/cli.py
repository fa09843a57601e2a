"""The `composer-shear` command."""

from __future__ import annotations

import argparse
import sys

DTYPES = {'fp32': 'float32', 'bf16': 'bfloat16', 'fp16': 'float16'}


def _export(args) -> int:
    import torch

    from composer_shear.export import export_checkpoint
    from composer_shear.report import report_table
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    report = export_checkpoint(args.checkpoint, args.out, source=args.source, dtype=dtype, overwrite=args.overwrite)
    print(report_table(report), end='')
    e = report['exported']
    print(f"exported {e['num_params']:,} parameters ({e['dtype']}) to {args.out}")
    return 0


def _inspect(args) -> int:
    import torch

    from composer_shear.export import load_any_masks
    from composer_shear.report import dumps, report_table, shape_report
    masks = load_any_masks(args.path, source=args.source)
    with torch.no_grad():
        report = shape_report(masks.snapshot())
    print(dumps(report) if args.json else report_table(report), end='')
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='composer-shear', description=__doc__)
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('export', help='masked Composer checkpoint -> pruned Hugging Face model folder')
    p.add_argument('--checkpoint', required=True, help='a Composer checkpoint: a .pt file or a sharded folder')
    p.add_argument('--out', required=True, help='the folder to write (must not exist unless --overwrite)')
    p.add_argument('--source', help='the source HF model folder (config, tokenizer); default: the checkpoint\'s '
                                    'stored HF metadata')
    p.add_argument('--dtype', choices=sorted(DTYPES), help='weight dtype (default: the checkpoint\'s)')
    p.add_argument('--overwrite', action='store_true', help='replace --out if it exists')
    p.set_defaults(func=_export)

    p = sub.add_parser('inspect', help='expected and deterministic shape per layer')
    p.add_argument('path', help='a Composer checkpoint, a masks.safetensors file or an exported folder')
    p.add_argument('--source', help='the source HF model folder, if the checkpoint lacks HF metadata')
    p.add_argument('--json', action='store_true', help='print the JSON report')
    p.set_defaults(func=_inspect)

    args = parser.parse_args(argv)
    from composer_shear.export import ExportError
    from composer_shear.shapes import ShapeError
    try:
        return args.func(args)
    except (ExportError, ShapeError) as e:
        print(f'composer-shear {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
