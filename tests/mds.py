"""Tiny multi-domain MDS data for loader tests: sample i of domain d holds [d, i, i, ...] so it can be traced."""

import numpy as np
from streaming import MDSWriter


def write_domains(root, sizes: dict, seq=8, split='train'):
    for d, (name, n) in enumerate(sizes.items()):
        with MDSWriter(out=str(root / split / name), columns={'tokens': 'ndarray:uint16'}, size_limit=1 << 12) as w:
            for i in range(n):
                w.write({'tokens': np.array([d] + [i] * (seq - 1), dtype=np.uint16)})
    return root
