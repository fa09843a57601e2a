"""Resume state of dynamic loading against the number of samples seen.

Iterates the real `dynamic_text` loader (7 domains of tiny MDS samples, proportions moved at every interval) and,
after N samples, measures the dataset state Composer puts in a checkpoint (`state_dict(num_samples)`, pickled)
next to what the reference implementation stores at that point: every used sample id per domain
(reference-method.md, "Resume / state"), pickled as the same lists of ints. Prints a table; the last line is
`resume_state_ratio: R` = reference bytes / ours at the largest N.

    python bench/resume_state.py [--max-samples 100000]
"""

import argparse
import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np

from composer_shear.data.dynamic import build_dynamic_text_dataloader
from composer_shear.testing import write_domains

DOMAINS = ['cc', 'github', 'book', 'stackexchange', 'wiki', 'arxiv', 'c4-rp']


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--max-samples', type=int, default=100_000)
    p.add_argument('--domain-size', type=int, default=20_000, help='samples per domain (reshuffled when read out)')
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--interval', type=int, default=50, help='batches per interval (one re-weighting each)')
    args = p.parse_args(argv)
    checkpoints = [n for n in (100, 1_000, 10_000, 100_000, 1_000_000) if n <= args.max_samples]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        write_domains(Path(tmp), {d: args.domain_size for d in DOMAINS}, seq=8)
        epoch_size = args.interval * args.batch
        props = [0.67, 0.045, 0.045, 0.02, 0.045, 0.025, 0.15]
        spec = build_dynamic_text_dataloader(None, args.batch, dict(local=tmp, domains=DOMAINS, proportions=props,
                                                                    epoch_size=epoch_size, max_seq_len=8),
                                             num_workers=0)
        ds = spec.dataloader.dataset
        used = {d: [] for d in DOMAINS}
        seen, rows = 0, []
        print(f'{"samples seen":>13} | {"ours (bytes)":>12} | {"reference (bytes)":>17} | ratio', flush=True)
        while checkpoints:
            for batch in spec.dataloader:  # one interval (epoch)
                ids = batch['input_ids']
                for d, i in zip(ids[:, 0].tolist(), ids[:, 1].tolist(), strict=True):
                    used[DOMAINS[d]].append(i)
                seen += len(ids)
                if checkpoints and seen >= checkpoints[0]:
                    ours = len(pickle.dumps(ds.state_dict(num_samples=seen % epoch_size)))
                    ref = len(pickle.dumps(used))
                    rows.append((seen, ours, ref))
                    print(f'{seen:>13,} | {ours:>12,} | {ref:>17,} | {ref / ours:,.0f}', flush=True)
                    checkpoints.pop(0)
                    if not checkpoints:
                        break
            ds.set_proportions(rng.dirichlet(np.ones(len(DOMAINS))))  # what dynamic_loading does after eval
    first, last = rows[0], rows[-1]
    print(f'ours grows {last[1] / first[1]:.2f}x from {first[0]:,} to {last[0]:,} samples; '
          f'the reference grows {last[2] / first[2]:,.0f}x')
    print(f'resume_state_ratio: {last[2] / last[1]:.1f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
