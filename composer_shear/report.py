"""Shape reports: expected and deterministic shape per layer, as JSON and as a readable table."""

from __future__ import annotations

import json

import torch

from composer_shear.masks import LOG_ALPHA_MAX, MaskSnapshot, expected_score, expected_shape, head_gates

__all__ = ['GIVEN_UP', 'dumps', 'given_up_kept', 'report_table', 'shape_report']

GIVEN_UP = -LOG_ALPHA_MAX + 0.01  # log alpha within 0.01 of the paper's lower clamp or below: the masks dropped it


def given_up_kept(snap: MaskSnapshot) -> dict[str, list[int]]:
    """Per structure: [how many entries the exact-target masks keep although their log alpha sits at the paper's
    minimum, -ln 100, or below (keep probability 0.047 or less, like removed entries), how many they keep]. Non-zero
    when the expected shape had fallen below the target and the export filled it with structures the masks had given
    up on."""
    out = {}
    for name, z in snap.z.items():
        kept = z != 0
        out[name] = [int((kept & (snap.log_alpha[name] <= GIVEN_UP)).sum()), int(kept.sum())]
    return out



def shape_report(snap: MaskSnapshot) -> dict:
    """Expected sizes (from the keep probabilities) and the exact-target deterministic shape per layer."""
    source, target, z = snap.source, snap.target, snap.z
    scores = {k: expected_score(v) for k, v in snap.log_alpha.items()}
    expected = {k.split('/', 1)[1]: float(v) for k, v in expected_shape(source, scores).items()}
    L = source.num_hidden_layers
    heads = head_gates(z, source)
    layers = []
    for i in range(L):
        row = {'layer': i, 'kept': bool(z['layer'][i] != 0) if 'layer' in z else True}
        if 'layer' in scores:
            row['expected_keep'] = round(float(scores['layer'][i]), 4)
        row['kv_heads'] = int((z['kv'][i] != 0).sum()) if 'kv' in z else source.num_key_value_heads
        row['heads'] = int((heads[i] != 0).sum()) if heads is not None else source.num_attention_heads
        row['intermediate'] = (int((z['intermediate'][i] != 0).sum()) if 'intermediate' in z
                               else source.intermediate_size)
        if 'kv' in scores:
            q = scores['query'][i].sum() if 'query' in scores else torch.tensor(float(source.queries_per_group))
            row['expected_kv_heads'] = round(float(scores['kv'][i].sum()), 3)
            row['expected_heads'] = round(float(scores['kv'][i].sum() * q), 3)
        if 'intermediate' in scores:
            row['expected_intermediate'] = round(float(scores['intermediate'][i].sum()), 2)
        layers.append(row)
    hidden = int((z['hidden'] != 0).sum()) if 'hidden' in z else source.hidden_size
    return {
        'source': source.target_dict() | {'num_params': source.num_params()},
        'target': target.target_dict() | {'num_params': target.num_params()},
        'expected': expected,
        'deterministic': {'num_hidden_layers': sum(r['kept'] for r in layers), 'hidden_size': hidden},
        'kept_given_up': given_up_kept(snap),
        'layers': layers,
    }


def report_table(report: dict) -> str:
    """A markdown rendering of `shape_report`."""
    keys = ('num_hidden_layers', 'hidden_size', 'num_attention_heads', 'num_key_value_heads',
            'intermediate_size', 'num_params')
    lines = ['| | ' + ' | '.join(keys) + ' |', '|---' * (len(keys) + 1) + '|']
    for name in ('source', 'target', 'expected'):
        vals = [report[name].get(k, '') for k in keys]
        fmt = [f'{v:,.1f}' if isinstance(v, float) else (f'{v:,}' if isinstance(v, int) else str(v)) for v in vals]
        lines.append(f'| {name} | ' + ' | '.join(fmt) + ' |')
    lines += ['', '| layer | kept | P(keep) | kv heads (exp.) | heads (exp.) | intermediate (exp.) |',
              '|---|---|---|---|---|---|']
    for r in report['layers']:
        lines.append(
            f"| {r['layer']} | {'yes' if r['kept'] else 'no'} | {r.get('expected_keep', '')} | "
            f"{r['kv_heads']} ({r.get('expected_kv_heads', '-')}) | {r['heads']} ({r.get('expected_heads', '-')}) | "
            f"{r['intermediate']} ({r.get('expected_intermediate', '-')}) |")
    lines.append('')
    lines.append(f"hidden size kept: {report['deterministic']['hidden_size']} "
                 f"(expected {report['expected']['hidden_size']:.1f})")
    filled = {k: v for k, v in report.get('kept_given_up', {}).items() if v[0]}
    if filled:
        lines.append('kept although given up by the masks (log alpha at its minimum): '
                     + ', '.join(f'{k} {n} of {m}' for k, (n, m) in filled.items()))
    return '\n'.join(lines) + '\n'


def dumps(report: dict) -> str:
    return json.dumps(report, indent=2) + '\n'
