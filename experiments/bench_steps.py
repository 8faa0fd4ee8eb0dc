"""experiments/bench_steps.py: where the time of a distillation step goes, measured on the same batch.

    python experiments/bench_steps.py                       # both shapes, batch 32 x length 64, CPU or CUDA
    python experiments/bench_steps.py --shapes minilm --rounds 7
    python experiments/bench_steps.py --tokens_of sst2 --data_dir $DATA --vocab DIR

For each teacher -> student shape (random weights: timing does not depend on them) it times, in
interleaved rounds on one batch whose rows have random lengths (so padding and masks are exercised):

    teacher      teacher forward (eval, no grad)
    student      student forward + backward (CE on its logits), no optimizer step
    stage1       a full Stage-1 step: teacher forward, student forward, L_EMB + L_MHA + L_FFN, backward, AdamW
    stage2 live  a full Stage-2 step with the teacher run on the batch (--no_teacher_cache)
    stage2 cached  the same step with the teacher's targets read from train.teacher_cache

and prints the median of each and the ratios "stage1 / (teacher + student)" and "stage2 live / cached",
then all shapes as one markdown table (the one in experiments/README.md).
The steps are train.py's own: train.stage1_objective, mlkd.stage2_loss with mlkd.stage2_targets, the same optimizer
and clipping. With --tokens_of TASK it also prints what a Stage-1 cache of the mapped teacher states
would hold for that task's training set (the reason train.py caches only Stage 2's targets).
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

SHAPES = {  # name: (teacher preset, student overrides)
    "minilm": ("minilm-l6-h384", dict(num_hidden_layers=3)),  # the offline proxy: MiniLM-L6 -> 3 x 384
    "bert-base": ("bert-base-uncased", dict(num_hidden_layers=4, hidden_size=312, intermediate_size=1200)),  # paper
}


def build(shape, batch, length, device):
    """Teacher, student, projections, optimizer, a batch and a teacher cache for it."""
    preset, student_shape = SHAPES[shape]
    head = dict(head="classification", num_labels=2)
    torch.manual_seed(0)
    teacher = Bert(BertConfig.preset(preset, **head)).to(device).eval().requires_grad_(False)
    student = Bert(BertConfig.preset(preset, **head, **student_shape, attention_probs_dropout_prob=0.0)).to(device)
    M, d_s, d_t = student.config.num_hidden_layers, student.config.hidden_size, teacher.config.hidden_size
    proj = mlkd.Projections(M, d_s, d_t).to(device)
    lengths = torch.randint(length // 4, length + 1, (batch,))
    lengths[0] = length  # the batch is as wide as --length
    ids = torch.randint(1000, teacher.config.vocab_size, (batch, length)) * (
        torch.arange(length)[None] < lengths[:, None]
    )
    rows = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "lengths": lengths,
            "labels": torch.randint(0, 2, (batch,))}
    b = {k: v.to(device) for k, v in next(data.batches(rows, batch)).items()}
    cache = mlkd.LogitsAndCls(*(t.to(device) for t in evaluation.model_outputs(teacher, rows, batch, device)))
    params = [*student.parameters(), *proj.parameters()]
    groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": 0.01},  # as train.fit groups them
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=1e-5, fused=True)
    return teacher, student, proj, params, optimizer, b, cache


def steps(teacher, student, proj, params, optimizer, b, cache, device):
    """The five timed callables. Each full step is what train.fit does with train.py's loss functions."""
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda"))
    inputs = (b["input_ids"], b["token_type_ids"], b["attention_mask"])
    M, N = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    lmap = mlkd.layer_map(N, M)

    def teacher_forward():
        with torch.no_grad(), autocast:
            teacher(*inputs)

    def student_forward_backward():
        student.train()
        with autocast:
            loss = train.task_loss(student(*inputs).logits, b["labels"])
        loss.backward()
        optimizer.zero_grad(set_to_none=True)

    def full_step(loss_fn):
        def step():
            student.train()
            with autocast:
                loss, _ = loss_fn()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        return step

    stage1 = functools.partial(train.stage1_objective, teacher=teacher, proj=proj, lmap=lmap,
                               args=train.parse_args(["--task", "sst2"]))  # train.py's own

    def stage2(use_cache):
        return lambda: mlkd.stage2_loss(student(*inputs), mlkd.stage2_targets(b, teacher, cache if use_cache else None),
                                        proj, b["labels"])
    return {
        "teacher": teacher_forward,
        "student": student_forward_backward,
        "stage1": full_step(lambda: stage1(student, b)),
        "stage2 live": full_step(stage2(False)),
        "stage2 cached": full_step(stage2(True)),
    }


def timed(fn, iters, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def bench(shape, args):
    parts = build(shape, args.batch, args.length, args.device)
    fns = steps(*parts, args.device)
    for fn in fns.values():  # warm-up
        fn()
    times = {name: [] for name in fns}
    for _ in range(args.rounds):  # interleaved: a busy moment of the machine hurts every measure alike
        for name, fn in fns.items():
            times[name].append(timed(fn, args.iters, args.device))
    med = {name: statistics.median(t) for name, t in times.items()}
    teacher, student = parts[0], parts[1]
    print(f"\n{shape}: teacher {teacher.config.num_hidden_layers} x {teacher.config.hidden_size} "
          f"({teacher.num_parameters() / 1e6:.1f}M) -> student {student.config.num_hidden_layers} x "
          f"{student.config.hidden_size} ({student.num_parameters() / 1e6:.1f}M), batch {args.batch} x length "
          f"{args.length}, {args.device}{' bf16 autocast' if args.device.startswith('cuda') else ' fp32'}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds of {args.iters}")
    for name, t in med.items():
        print(f"  {name:14s} {1000 * t:9.1f} ms   {args.batch / t:8.1f} samples/s")
    r1 = med["stage1"] / (med["teacher"] + med["student"])
    r2 = med["stage2 live"] / med["stage2 cached"]
    print(f"  stage1 step / (teacher forward + student forward/backward): {r1:.2f}x (target <= 1.25x)")
    print(f"  stage2 step live / cached: {r2:.2f}x faster cached")
    return med


def stage1_cache_size(args):
    """What a Stage-1 cache would hold: per real token of every training row, the teacher's mapped states."""
    tok = data.Tokenizer(os.path.join(args.vocab, "vocab.txt"))
    rows = data.encode_glue(args.tokens_of, data.read_glue(args.tokens_of, "train", args.data_dir), tok)
    tokens = int(rows["lengths"].sum())
    print(f"\nStage-1 cache for {args.tokens_of} train ({len(rows['lengths']):,} rows, {tokens:,} real tokens "
          f"at max_len {data.TASKS[args.tokens_of].max_len}), fp32, ragged (no padding stored):")
    for shape, (preset, student_shape) in SHAPES.items():
        d_t = BertConfig.preset(preset).hidden_size
        M = student_shape["num_hidden_layers"]
        per_token = (1 + M + (M + 1)) * d_t  # token embeddings, M attention outputs, M + 1 hidden states
        stage2 = len(rows["lengths"]) * (2 + d_t) * 4
        print(f"  {shape:9s} (d_T {d_t}, M {M}): {per_token * 4 * tokens / 2**30:6.1f} GiB  "
              f"(Stage 2's cache: {stage2 / 2**20:.0f} MiB)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {','.join(SHAPES)}")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens_of", help="a GLUE task: print the size of a Stage-1 cache for its training set")
    p.add_argument("--data_dir", default=os.environ.get("MLKD_DATA", "data"))
    p.add_argument("--vocab", help="a model directory with vocab.txt (for --tokens_of)")
    a = p.parse_args()
    results = {}
    for s in a.shapes.split(","):
        if s not in SHAPES:
            p.error(f"--shapes {s}: choose from {','.join(SHAPES)}")
        results[s] = bench(s, a)
    print("\n| step | " + " | ".join(results) + " |\n|---|" + "---|" * len(results))  # the README's table
    for name in ("teacher", "student", "stage1", "stage2 live", "stage2 cached"):
        print(f"| {name} | " + " | ".join(f"{1000 * r[name]:,.0f} ms" for r in results.values()) + " |")
    print("| stage1 / (teacher + student) | " + " | ".join(
        f"{r['stage1'] / (r['teacher'] + r['student']):.2f}x" for r in results.values()) + " |")
    print("| stage2 live / cached | " + " | ".join(
        f"{r['stage2 live'] / r['stage2 cached']:.2f}x" for r in results.values()) + " |")
    if a.tokens_of:
        stage1_cache_size(a)
