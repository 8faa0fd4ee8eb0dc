"""experiments/bench_grouping.py: what --group_by_length buys on a real training set, side by side.

    python experiments/bench_grouping.py --data_dir $DATA --vocab $MINILM
    python experiments/bench_grouping.py --data_dir $DATA --vocab $MINILM --batches 10 --rounds 2

On the task's real training file (SST-2 by default, encoded at train.py's max_len for it) it prints, over a
whole epoch of batches of 32, the positions the model computes per real token with random batches (each
padded to its longest row) and with length-grouped ones (train.py --group_by_length); then samples/s of
three training steps on the offline preset's shapes (teacher: MiniLM-L6, 6 x 384; student: 3 x 384; random
weights, since timing does not depend on them), each step train.py's own objective, optimizer and clipping:

    teacher     a teacher fine-tuning step (train.teacher_loss)
    stage1      a Stage-1 step: teacher forward, student, L_EMB + L_MHA + L_FFN (train.stage1_objective)
    stage2      a Stage-2 step with the teacher's targets cached (train.stage2_objective)

Each step runs on the first --batches batches of a seeded epoch in either order, in interleaved rounds (a
busy moment of the machine hurts both alike); the table gives the median samples/s and their ratio.
"""
import argparse
import functools
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import mlkd  # noqa: E402
import train  # noqa: E402
from model import Bert, BertConfig  # noqa: E402


def epoch(dataset, group, seed=42, batch_size=32):
    gen = torch.Generator().manual_seed(seed)
    return list(data.batches(dataset, batch_size, shuffle=True, generator=gen, group_by_length=group))


def samples_per_s(objective, modules, batches, device):
    """Train on `batches` with train.py's step (AdamW, clipping); (samples per second of wall time, the share
    of that time spent in clipping and the AdamW update, which do not depend on the batch's length)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": 0.01},  # as train.fit groups them
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-5, fused=True)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda"))
    start, rows, fixed = time.perf_counter(), 0, 0.0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        modules[0].train()
        with autocast:
            loss, _ = objective(modules[0], b)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        fixed += time.perf_counter() - t
        rows += len(b["index"])
    wall = time.perf_counter() - start
    return rows / wall, fixed / wall


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="sst2", choices=list(data.TASKS))
    p.add_argument("--data_dir", default=os.environ.get("MLKD_DATA", "data"))
    p.add_argument("--vocab", required=True, help="a model directory with vocab.txt (the MiniLM package's model)")
    p.add_argument("--batches", type=int, default=20, help="batches timed per step and order")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    tok = data.Tokenizer(os.path.join(args.vocab, "vocab.txt"))
    max_len = data.TASKS[args.task].max_len
    rows = data.encode_glue(args.task, data.read_glue(args.task, "train", args.data_dir), tok, max_len)
    real = int(rows["lengths"].sum())
    orders = {"random": epoch(rows, 0), "grouped": epoch(rows, 100)}  # --group_by_length: runs of 100
    print(f"{args.task} train: {len(rows['lengths']):,} rows, {real:,} real tokens at max_len {max_len} "
          f"(mean {real / len(rows['lengths']):.1f}); batches of 32, one epoch:")
    for name, batches in orders.items():
        positions = sum(b["input_ids"].numel() for b in batches)
        attention = sum(b["input_ids"].shape[0] * b["input_ids"].shape[1] ** 2 for b in batches)
        ideal = int((rows["lengths"].double() ** 2).sum())
        print(f"  {name:8s} {positions / real:.2f}x positions per real token, {attention / ideal:.2f}x attention "
              "pairs per real pair")

    torch.manual_seed(0)
    head = evaluation.head_config(args.task)  # the task's: 2 or 3 labels, or STS-B's regression
    teacher = Bert(BertConfig.preset("minilm-l6-h384", **head)).to(args.device).eval().requires_grad_(False)
    student = Bert(BertConfig.preset("minilm-l6-h384", **head, num_hidden_layers=3, attention_probs_dropout_prob=0.0))
    student = student.to(args.device)
    fine_tuned = Bert(BertConfig.preset("minilm-l6-h384", **head)).to(args.device)
    proj = mlkd.Projections(3, 384, 384).to(args.device)
    settings = train.parse_args(["--task", args.task, "--device", args.device])
    timed = {order: batches[:args.batches] for order, batches in orders.items()}
    used = torch.cat([b["index"] for batches in timed.values() for b in batches]).unique()  # the cache's rows we read
    logits, cls = evaluation.model_outputs(teacher, {k: v[used] for k, v in rows.items()}, 256, args.device)
    n = len(rows["lengths"])
    cache = mlkd.LogitsAndCls(torch.zeros(n, logits.shape[1]).index_copy(0, used, logits.cpu()).to(args.device),
                              torch.zeros(n, 384).index_copy(0, used, cls.cpu()).to(args.device))
    steps = {"teacher": (train.teacher_loss, [fine_tuned]),
             "stage1": (functools.partial(train.stage1_objective, teacher=teacher, proj=proj,
                                          lmap=mlkd.layer_map(6, 3), args=settings), [student, proj]),
             "stage2": (functools.partial(train.stage2_objective, teacher=teacher, proj=proj, cache=cache,
                                          args=settings), [student, proj])}
    got = {(name, order): [] for name in steps for order in orders}
    for objective, modules in steps.values():  # a warm-up step each, untimed: the first steps run cold
        samples_per_s(objective, modules, next(iter(timed.values()))[:1], args.device)
    for _ in range(args.rounds):
        for name, (objective, modules) in steps.items():
            for order in orders:
                got[name, order].append(samples_per_s(objective, modules, timed[order], args.device))
    print(f"\nsamples/s, {args.device}, {torch.get_num_threads()} threads, the first {args.batches} batches of each "
          f"order, median of {args.rounds} interleaved rounds:\n")
    print("| step | random batches | length-grouped | grouped / random | clip + AdamW share (random, grouped) |")
    print("|---|---|---|---|---|")
    for name in steps:
        r, g = (statistics.median(x for x, _ in got[name, o]) for o in orders)
        fr, fg = (statistics.median(f for _, f in got[name, o]) for o in orders)
        print(f"| {name} | {r:.1f} | {g:.1f} | {g / r:.2f}x | {100 * fr:.0f}%, {100 * fg:.0f}% |")


if __name__ == "__main__":
    main()
