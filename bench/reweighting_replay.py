"""Replay re-weighting rules on the per-domain eval losses a reproduction arm recorded.

`bench/reproduce.py` stores, for each arm, every re-weighting of its continued stage: the eval losses per domain
and the weights that followed. This script feeds the same loss sequence to `update_domain_weights` under other
settings (the paper's rule, a smaller step, a cap, relative excess), starting from the arm's initial mix, and prints
the weights each would have produced. It isolates the rule from training: the losses themselves would have been
different under another mix, so a replay shows how each rule reacts to one loss trajectory, not what it would
train to (for that, bench/reproduce.py's `oneshot-*` arms).

Run: ``.venv/bin/python bench/reweighting_replay.py OUT/oneshot.json OUT/reference_loss.json``; the last line is
``replay_largest_weight: <paper rule> vs <step 0.3, cap 0.5>``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from reproduce import DOMAINS  # the reproduction's domain order (bench/ is on the path)

from composer_shear.data.weights import update_domain_weights

RULES = {
    'paper (step 1)': {},
    'step 0.3': {'step_size': 0.3},
    'step 0.3, cap 0.5': {'step_size': 0.3, 'max_weight': 0.5},
    'step 0.3, cap 0.5, relative': {'step_size': 0.3, 'max_weight': 0.5, 'excess': 'relative'},
}


def replay(history: list[dict], initial: list[float], reference: list[float], rule: dict) -> list[np.ndarray]:
    """The weights after each recorded re-weighting, had `rule` been used on the same losses."""
    w, out = np.asarray(initial, dtype=np.float64), []
    for h in history:
        w = update_domain_weights(w, h['losses'], reference, **rule)
        out.append(w)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('arm', help="a bench/reproduce.py arm file (OUT/<arm>.json)")
    p.add_argument('reference', help='the reference losses it used (OUT/reference_loss.json)')
    p.add_argument('--stage', default='continue', choices=['prune', 'continue'])
    args = p.parse_args(argv)
    stage = json.loads(Path(args.arm).read_text())['value']['stages'][args.stage]
    losses = json.loads(Path(args.reference).read_text())['losses']
    reference = [losses[d] for d in DOMAINS]
    print(f'{len(stage["history"])} re-weightings; domains: {", ".join(DOMAINS)}')
    finals = {}
    for name, rule in RULES.items():
        weights = replay(stage['history'], stage['initial'], reference, rule)
        finals[name] = weights[-1]
        mid = weights[len(weights) // 3]
        print(f'{name:<30} after {len(weights) // 3 + 1:>2}: {np.array2string(mid, precision=3, suppress_small=True)}'
              f'   end: {np.array2string(weights[-1], precision=3, suppress_small=True)}')
    recorded = np.asarray(stage['weights'])
    print(f'{"recorded (the arm as it ran)":<30} end: {np.array2string(recorded, precision=3, suppress_small=True)}')
    print(f'replay_largest_weight: {finals["paper (step 1)"].max():.3f} vs {finals["step 0.3, cap 0.5"].max():.3f}')


if __name__ == '__main__':
    main()
