"""experiments/bench_model.py: our BERT against HF transformers' BertForSequenceClassification, side by side.

    python experiments/bench_model.py                           # MiniLM-L6 shape, batch 32 x 128
    python experiments/bench_model.py --config bert-base-uncased --batch 16

Tokens/s of forward and of forward+backward (train mode, dropout on; the backward of the logits' mean
square), bf16 autocast on CUDA, fp32 on a CPU, in interleaved rounds (a busy moment of the machine hurts every
model alike), for our Bert and HF's with its sdpa and eager attention when transformers is installed; then
ours over the faster HF, round by round.
"""
import argparse
import os
import statistics
import sys
import time
from dataclasses import asdict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import PRESETS, Bert, BertConfig  # noqa: E402


def tokens_per_s(forward, tokens, device, rounds, backward=True, warmup=2):
    """Tokens/s of forward() -> a tensor, in bf16 autocast on CUDA (fp32 on a CPU), with the backward
    pass of the mean square of its output when `backward` (else under no_grad): `tokens` over the
    median time of `rounds` timed calls after `warmup` untimed ones. experiments/gpu_check.py's too."""
    cuda, times = str(device).startswith("cuda"), []
    for i in range(warmup + rounds):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16, enabled=cuda), torch.set_grad_enabled(backward):
            out = forward()
        if backward:
            out.float().pow(2).mean().backward()
        if cuda:
            torch.cuda.synchronize()  # the GPU has finished this call
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return tokens / statistics.median(times)


def bench(args):
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    torch.manual_seed(0)
    config = BertConfig.preset(args.config, head="classification", num_labels=2)
    B, L = args.batch, args.length
    ids = torch.randint(1000, config.vocab_size, (B, L), device=device)
    mask = torch.ones(B, L, dtype=torch.long, device=device)
    mask[B // 2:, L * 3 // 4:] = 0  # half the batch padded: the mask path is exercised
    ours = Bert(config).to(device).train()
    models = [("mlkd Bert", lambda: ours(ids, None, mask).logits)]
    try:
        import transformers
        for impl in ("sdpa", "eager"):
            hf_cfg = transformers.BertConfig(
                **{k: v for k, v in asdict(config).items() if k not in ("head", "label_names")},
                attn_implementation=impl,
            )
            hf = transformers.BertForSequenceClassification(hf_cfg).to(device).train()
            models.append((f"HF BertForSeqCls ({impl})", lambda hf=hf: hf(input_ids=ids, attention_mask=mask).logits))
    except ImportError:
        print("(transformers not installed: only our model is measured)")
    runs = {name: [] for name, _ in models}
    for _ in range(args.rounds):  # interleaved rounds: a busy moment of the machine hurts every model alike
        for name, forward in models:
            runs[name].append([tokens_per_s(forward, B * L, device, args.iters, backward, args.warmup)
                               for backward in (False, True)])
    rows = [(name, float(np.median([r[0] for r in runs[name]])), float(np.median([r[1] for r in runs[name]])))
            for name, _ in models]
    print(f"{args.config}, batch {B} x length {L}, {device}{' bf16 autocast' if device == 'cuda' else ' fp32'}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds of the median of "
          f"{args.iters} iterations after {args.warmup} warm-up, train mode")
    for name, f, fb in rows:
        print(f"  {name:28s} forward {f:10,.0f} tok/s   forward+backward {fb:10,.0f} tok/s")
    if len(rows) > 1:  # per round: ours against the faster HF attention of that round
        ratios = [runs[rows[0][0]][i][1] / max(runs[name][i][1] for name, _, _ in rows[1:]) for i in range(args.rounds)]
        print(f"  ours / fastest HF (forward+backward), per round: {' '.join(f'{r:.2f}' for r in ratios)}; "
              f"median {np.median(ratios):.2f}x")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="minilm-l6-h384", choices=list(PRESETS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cpu", action="store_true", help="benchmark on CPU even when CUDA is available")
    args = p.parse_args()
    if min(args.batch, args.length, args.iters, args.rounds) < 1 or args.warmup < 0:
        p.error("--batch, --length, --iters and --rounds must be >= 1, --warmup >= 0")
    if args.length > BertConfig.preset(args.config).max_position_embeddings:
        p.error(f"--length {args.length}: {args.config} has "
                f"{BertConfig.preset(args.config).max_position_embeddings} positions")
    bench(args)
