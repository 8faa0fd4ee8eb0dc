"""train.py: the whole MLKD pipeline for one task, in one command.

    python train.py --task sst2            # teacher -> Stage 1 -> Stage 2 -> eval, into out/sst2
    python train.py --task general --corpus FILE --teacher_init DIR --layers 4 --hidden 192 --ffn 768

Read mlkd.py first (the losses), then model.py's BertOutput (the tensors they read), then this file:
the stages in the paper's order (section 3; details from the authors' scripts, HandH1998/tmp_bert_mlkd),
what each minimises, the one training loop; then the machinery (flags, a stage's directory, the cache).
--recipe tinybert runs TinyBERT's task distillation (the paper's baseline) in both stages instead.
--task general distils a pre-trained teacher on unlabeled text with the Stage-1 losses, as General
TinyBERT was made: its output is a student for --student_init.

Each stage writes <out>/<stage>/: model.safetensors, config.json, vocab.txt, args.json, metrics.json,
log.jsonl. A rerun skips finished stages and resumes an interrupted one from its checkpoint.pt.
Under `torchrun --nproc_per_node N train.py ...` every stage is data-parallel.
"""
import argparse
import collections
import datetime
import functools
import hashlib
import io
import json
import math
import os
import resource
import sys
import time
import zlib

import torch
import torch.distributed as dist

import data
import eval as evaluation
import mlkd
from model import Bert, BertConfig, fetch, read_safetensors, write_safetensors

# Per task, from the authors' scripts. WNLI is not in their table: it gets RTE's. SQuAD: batch 16.
Recipe = collections.namedtuple("Recipe", "max_len epochs1 epochs2 teacher_epochs teacher_lr")
TASKS = {
    "cola": Recipe(max_len=64, epochs1=50, epochs2=30, teacher_epochs=10, teacher_lr=1e-5),
    "sst2": Recipe(max_len=64, epochs1=15, epochs2=10, teacher_epochs=4, teacher_lr=2e-5),
    "mrpc": Recipe(max_len=128, epochs1=20, epochs2=15, teacher_epochs=10, teacher_lr=2e-5),
    "stsb": Recipe(max_len=128, epochs1=20, epochs2=15, teacher_epochs=10, teacher_lr=3e-5),
    "rte": Recipe(max_len=128, epochs1=20, epochs2=15, teacher_epochs=10, teacher_lr=2e-5),
    "qnli": Recipe(max_len=128, epochs1=10, epochs2=10, teacher_epochs=10, teacher_lr=2e-5),
    "mnli": Recipe(max_len=128, epochs1=6, epochs2=6, teacher_epochs=4, teacher_lr=3e-5),
    "qqp": Recipe(max_len=128, epochs1=6, epochs2=6, teacher_epochs=5, teacher_lr=2e-5),
    "wnli": Recipe(max_len=128, epochs1=20, epochs2=15, teacher_epochs=10, teacher_lr=2e-5),
    "squad1": Recipe(max_len=384, epochs1=4, epochs2=3, teacher_epochs=4, teacher_lr=3e-5),
    "squad2": Recipe(max_len=384, epochs1=4, epochs2=3, teacher_epochs=4, teacher_lr=3e-5),
    # the authors' general_distill.py: 3 epochs at lr 5e-5 (--lr1), 10% warm-up, 128 tokens
    "general": Recipe(max_len=128, epochs1=3, epochs2=0, teacher_epochs=0, teacher_lr=5e-5),
}
TINYBERT = {(4, 312): "huawei-noah/TinyBERT_General_4L_312D",
            (6, 768): "huawei-noah/TinyBERT_General_6L_768D"}
STAGES = ("teacher", "stage1", "stage2", "eval")
LEAD = int(os.environ.get("RANK", 0)) == 0  # under torchrun, process 0 alone writes and evaluates


# ----------------------------------------------------------------------------------------------
# The method: the stages in the paper's order and what each one minimises


def main(argv=None):
    args = parse_args(argv)
    start_distributed(args)
    print("settings: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))
    try:
        result = general(args) if args.task == "general" else pipeline(args)
    except KeyboardInterrupt:  # Ctrl-C anywhere: say what is kept
        dirs = {s: os.path.join(args.out, s) for s in (*STAGES[:3], "general")}
        kept = [f"{s} ({'finished' if is_done(d) else 'checkpoint.pt'})" for s, d in dirs.items()
                if is_done(d) or os.path.exists(os.path.join(d, "checkpoint.pt"))]
        print(f"\ninterrupted: kept in {args.out}: {', '.join(kept) or 'nothing'}; "
              "rerun the same command to resume", flush=True)
        raise
    if dist.is_initialized():  # the processes leave together: one leaving early aborts the others
        sync()
        dist.destroy_process_group()
    return result


def pipeline(args):
    """teacher -> stage1 -> stage2 -> eval for one task (see the module docstring)."""
    out = {s: os.path.join(args.out, s) for s in STAGES}
    source = fetch(args.teacher or args.teacher_init)
    args.vocab = os.path.join(source, "vocab.txt")
    check_shapes(args, BertConfig.from_json(os.path.join(source, "config.json")))
    if args.teacher:
        load_teacher(args.teacher, args)  # checked before any work
    train, evaluate = load_task(args, data.Tokenizer(args.vocab))

    # The teacher: fine-tuned on the gold labels; the checkpoint with the best dev metric is kept
    if args.teacher and "teacher" in args.stages:
        print(f"[teacher] skipped: using the fine-tuned teacher of --teacher {args.teacher}")
    elif begin("teacher", out["teacher"], args):
        model = Bert.from_pretrained(args.teacher_init, **evaluation.head_config(args.task))
        fit("teacher", out["teacher"], [model.to(args.device)], teacher_loss, train, args,
            args.teacher_epochs, args.teacher_lr, args.warmup, evaluate, keep_best=True)
    if args.stages == ["teacher"]:
        return None
    teacher = load_teacher(args.teacher or out["teacher"], args)  # the kept teacher, frozen

    # Stage 1: embeddings and Transformer layers (L_EMB + L_MHA + L_FFN), at a constant lr
    if begin("stage1", out["stage1"], args):
        distil_layers("stage1", out["stage1"], teacher, train, args)

    # Stage 2: the prediction layer (L_KD + L_SS + L_SC), from Stage 1's student and projections;
    # warm-up then linear decay; the checkpoint with the best dev metric is kept
    if begin("stage2", out["stage2"], args):
        student, proj = stage2_start(out["stage1"], teacher, args)
        cache = teacher_cache(teacher, train, args, out["stage2"])  # the teacher's targets, once
        loss_fn = functools.partial(stage2_objective, teacher=teacher, proj=proj, cache=cache, args=args)
        print("[stage2] the checkpoint with the best dev metric is kept: model selection on dev")
        fit("stage2", out["stage2"], [student, proj], loss_fn, train, args, args.epochs2, args.lr2,
            args.warmup, evaluate, keep_best=True)

    if "eval" in args.stages and LEAD:
        return report(args, teacher, out, evaluate)


def task_loss(logits, labels):
    """Loss on gold labels: CE, MSE for regression, (CE(start) + CE(end)) / 2 for spans (B, 2, L)."""
    if logits.dim() == 3:
        return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels)
    if logits.shape[-1] == 1:
        return torch.nn.functional.mse_loss(logits[:, 0].float(), labels)
    return torch.nn.functional.cross_entropy(logits.float(), labels)


def teacher_loss(model, batch):
    """The teacher's fine-tuning loss on the gold labels -> (loss, parts)."""
    out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    ce = task_loss(out.logits, batch["labels"])
    return ce, {"ce": ce}


def stage1_objective(model, batch, teacher, proj, lmap, args):
    """Stage 1 and general distillation -> (loss, parts): mlkd.stage1_loss against the frozen teacher
    (--recipe tinybert: TinyBERT's attention-score and hidden-state MSE, mlkd.tinybert_stage1_loss)."""
    inputs = (batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    tiny = args.recipe == "tinybert"
    with torch.no_grad():
        t = teacher(*inputs, scores=tiny)
    mask = None if args.paper_exact else batch["attention_mask"]  # the authors' losses are unmasked
    if tiny:
        return mlkd.tinybert_stage1_loss(model(*inputs, scores=True), t, proj, mask, lmap)
    weights = {"emb": args.w_emb, "mha": args.w_mha, "ffn": args.w_ffn}
    return mlkd.stage1_loss(model(*inputs), t, proj, mask, lmap, weights, args.splits,
                            args.mha_temperature)


def stage2_objective(model, batch, teacher, proj, cache, args):
    """Stage 2 -> (loss, parts): mlkd.stage2_loss against the teacher's targets (the cache's rows of
    the batch, or a live forward), plus --w_ce times the gold-label loss (0 in MLKD; a baseline's)."""
    out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    weights = {"kd": args.w_kd, "ss": args.w_ss, "sc": args.w_sc}
    total, parts = 0.0, {}
    if any(weights.values()):
        targets = mlkd.stage2_targets(batch, teacher, cache)
        total, parts = mlkd.stage2_loss(out, targets, proj, batch["labels"], weights, args.temperature,
                                        args.tau)
    if args.w_ce:
        parts["ce"] = task_loss(out.logits, batch["labels"])
        total = total + args.w_ce * parts["ce"]
    return total, parts


def distil_layers(stage, directory, teacher, train, args, heldout=None):
    """Stage 1 (constant lr), or general distillation (warm-up then decay; scored on `heldout`): the
    student per --student_init learns the teacher's embeddings and layers through the projections
    W_0..W_M. Saves both and marks the stage finished; returns the held-out losses at the start."""
    student = build_student(args, teacher).to(args.device)
    c = student.config
    lmap = mlkd.layer_map(teacher.config.num_hidden_layers, c.num_hidden_layers, args.layer_map)
    print(f"[{stage}] layer map student -> teacher: {lmap} (0 = embeddings); student "
          f"{c.num_hidden_layers} x {c.hidden_size}, {c.num_attention_heads} heads, "
          f"{student.num_parameters() / 1e6:.1f}M parameters")
    proj = mlkd.Projections(c.num_hidden_layers, c.hidden_size, teacher.config.hidden_size,
                            args.proj_init).to(args.device)
    saved = os.path.join(args.student_init, "projections.safetensors")
    if stage == "general" and os.path.isfile(saved):  # continuing a general student: its W_m too
        proj.load_state_dict(read_safetensors(saved))
    loss_fn = functools.partial(stage1_objective, teacher=teacher, proj=proj, lmap=lmap, args=args)
    evaluate = heldout and functools.partial(heldout_losses, loss_fn=loss_fn, heldout=heldout, args=args)
    start = evaluate and evaluate(student)
    if start:
        print(f"[{stage}] held-out at step 0: " + evaluation.format_metrics(start, 4))
    warmup = args.warmup if stage == "general" else None  # Stage 1: a constant lr, as the authors ran it
    record, _ = fit(stage, directory, [student, proj], loss_fn, train, args, args.epochs1, args.lr1,
                    warmup, evaluate)
    save_model(student, directory, args)
    if LEAD:
        write_safetensors(proj.state_dict(), os.path.join(directory, "projections.safetensors"))
    finish(directory, {"train": record})
    return start


def stage2_start(stage1_dir, teacher, args):
    """Stage 2's student and projections: Stage 1's; for a baseline run without Stage 1 (logits-only
    KD, gold labels), the student of --student_init with fresh projections."""
    if is_done(stage1_dir):
        same_settings("stage1", stage1_dir, args)
        student = Bert.from_pretrained(stage1_dir, verbose=False)
    elif "stage1" not in args.stages:
        print(f"[stage2] no finished Stage 1 in {stage1_dir}: from --student_init {args.student_init}")
        student = build_student(args, teacher)
    else:
        raise ValueError(f"Stage 1 in {stage1_dir} is not finished")
    c = student.config
    proj = mlkd.Projections(c.num_hidden_layers, c.hidden_size, teacher.config.hidden_size,
                            args.proj_init)
    if is_done(stage1_dir):
        proj.load_state_dict(read_safetensors(os.path.join(stage1_dir, "projections.safetensors")))
    return student.to(args.device), proj.to(args.device)


def general(args):
    """--task general: general distillation on unlabeled text, into <out>/general."""
    directory, source = os.path.join(args.out, "general"), fetch(args.teacher_init)
    args.vocab = os.path.join(source, "vocab.txt")
    check_shapes(args, BertConfig.from_json(os.path.join(source, "config.json")))
    if not begin("general", directory, args):
        return json.loads(data.read_text(os.path.join(directory, "metrics.json")))
    teacher = Bert.from_pretrained(source, verbose=False).to(args.device).eval().requires_grad_(False)
    documents = data.read_corpus(args.corpus.split(","))
    windows = data.corpus_windows(documents, data.Tokenizer(args.vocab), args.max_len)
    n = len(windows["lengths"])
    if n < 2:
        raise ValueError(f"--corpus {args.corpus}: {n} window of text; general distillation needs 2")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    k = min(1000, max(1, n // 100))  # held out, never trained on: 1% of the windows, at most 1000
    heldout, train = ({key: v[rows] for key, v in windows.items()} for rows in (order[:k], order[k:]))
    print(f"[general] corpus: {n:,} windows of at most {args.max_len} tokens, {k} held out")
    start = distil_layers("general", directory, teacher, train, args, heldout)
    metrics = json.loads(data.read_text(os.path.join(directory, "metrics.json")))
    logged = map(json.loads, open(os.path.join(directory, "log.jsonl")))
    curve = [{"step": 0, **start}] + [{"step": r["step"], **r["dev"]} for r in logged if "dev" in r]
    corpus = {"files": args.corpus, "windows": n, "heldout_windows": k}
    finish(directory, {**metrics, "corpus": corpus, "heldout": curve})
    print("[general] held-out losses, start -> end: " + ", ".join(
        f"{key} {curve[0][key]:.4f} -> {curve[-1][key]:.4f}" for key in start if key != "windows"))
    return {"corpus": corpus, "heldout": curve}


@torch.no_grad()
def heldout_losses(student, loss_fn, heldout, args):
    """Each Stage-1 loss and their weighted sum, averaged over the held-out windows (eval mode)."""
    student.eval()
    sums, n = collections.Counter(), 0
    for b in data.batches(heldout, args.eval_batch_size):
        b = {k: v.to(args.device) for k, v in b.items()}
        with torch.autocast("cuda", torch.bfloat16, enabled=args.device.startswith("cuda")):
            total, parts = loss_fn(student, b)
        sums.update({k: float(v) * len(b["index"]) for k, v in {**parts, "loss": total}.items()})
        n += len(b["index"])
    return {**{k: v / n for k, v in sums.items()}, "windows": n}


# ----------------------------------------------------------------------------------------------
# The one training loop


def fit(stage, directory, modules, loss_fn, train, args, epochs, lr, warmup, evaluate=None,
        keep_best=False):
    """Train `modules` (the first is the model) on loss_fn(model, batch) -> (loss, parts) with AdamW at
    lr_factor's schedule; `evaluate` (-> metrics, higher is better on args.metric) runs every --eval_steps
    and at each epoch's end, keep_best keeps the best model. A checkpoint every --save_steps; a rerun
    resumes from it. Returns (the last log record, the best dev metrics or None)."""
    model, per_epoch = modules[0], math.ceil(len(train["input_ids"]) / args.batch_size)
    planned = max(1, math.ceil(epochs * per_epoch))
    total = min(planned, args.max_steps or planned)
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # biases, LNs
    optimizer = torch.optim.AdamW(groups, lr=lr, fused=True)
    warm = int(warmup * total) if warmup is not None else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        lr_factor, warm=warm, total=total, constant=warmup is None))
    step, best = resume(stage, directory, modules, optimizer, scheduler, args)
    schedule = "constant lr" if warmup is None else f"warm-up {warm} steps then linear decay"
    log = Log(stage, directory, step, total, args, len(train["input_ids"]), f"{total / per_epoch:.3g} "
              f"epochs{', capped by --max_steps' * (total < planned)}), lr {lr:g}, {schedule}")
    forward = torch.compile(model) if args.compile else model
    for epoch, batch in training_batches(train, args, step, per_epoch, total):
        rows, weight = len(batch["index"]), 1.0
        if dist.is_initialized():  # data-parallel: this process's rows and their share of the loss
            batch, weight = shard(batch, by_tokens=stage in ("stage1", "general") and not args.paper_exact)
        batch = {k: v.to(args.device) for k, v in batch.items()}
        model.train()
        with torch.autocast("cuda", torch.bfloat16, enabled=args.device.startswith("cuda")):
            loss, parts = loss_fn(forward, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"[{stage}] non-finite loss at step {step + 1}: {floats(parts)}, "
                                     f"batch rows {batch['index'].tolist()}")
        optimizer.zero_grad(set_to_none=True)
        (loss * weight).backward()
        if dist.is_initialized():  # the mean of the processes' gradients (Stage 1 leaves the head unused)
            for grad in (p.grad for p in params if p.grad is not None):
                dist.all_reduce(grad)
                grad /= dist.get_world_size()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        log.trained(step, epoch, parts, optimizer.param_groups[0]["lr"], rows)  # the lr it used
        scheduler.step()
        due = step % per_epoch == 0 or step == total or args.eval_steps and step % args.eval_steps == 0
        if evaluate and LEAD and due:
            metrics, improved = log.evaluated(step, functools.partial(evaluate, model), best, keep_best)
            if improved:
                best = metrics
                save_model(model, directory, args)
        if step % args.save_steps == 0 and step < total and LEAD:
            save_checkpoint(directory, modules, optimizer, scheduler, step, best)
    record = log.done()
    if keep_best:
        finish(directory, {"dev": best, "dev_set": dev_set_key(args), "train": record})
    return record, best


def lr_factor(step, warm, total, constant):
    """The lr of step `step` (from 0) over the base lr: 1 when constant, else warm-up then decay to 0."""
    if constant:
        return 1.0
    return (step + 1) / max(1, warm) if step < warm else max(0.0, (total - step) / max(1, total - warm))


def training_batches(train, args, step, per_epoch, total):
    """(epoch, batch) from step `step` until `total`: each epoch shuffled by a seed of its own, so that
    a resumed run sees the same batches in the same order (length-grouped ones too)."""
    while step < total:
        epoch = step // per_epoch
        for batch in data.batches(train, args.batch_size, shuffle=True, start=step % per_epoch,
                                  generator=torch.Generator().manual_seed(args.seed + epoch),
                                  fixed_padding=args.paper_exact, group_by_length=100 * args.group_by_length,
                                  buckets=args.compile):  # compiled shapes repeat
            yield epoch, batch
            step += 1
            if step >= total:
                return


# ----------------------------------------------------------------------------------------------
# Machinery: the flags and their checks; the models and the task's data; a stage's directory
# (settings, resume, the log); the Stage-2 teacher cache; the eval stage's report; torchrun.


def finite(text):
    """The type of the float flags: a finite number (nan and inf are refused, naming the flag)."""
    if not math.isfinite(float(text)):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return float(text)


# The flags as --help groups them: (name, type, default, help); a bool flag is a switch. The per-task
# settings (None here) come from TASKS.
FLAGS = [
    "task and files",
    ("task", str, None, "one of " + ", ".join(TASKS)),
    ("data_dir", str, os.environ.get("MLKD_DATA", "data"), "holds glue/<TASK>/*.tsv and squad/*.json; "
     "missing files are downloaded there (default: data or $MLKD_DATA)"),
    ("out", str, None, "output directory (default: out/<task>)"),
    ("train_file", str, None, "SQuAD training JSON(s), comma-separated (default: in <data_dir>/squad)"),
    ("dev_file", str, None, "SQuAD dev JSON (default: <data_dir>/squad/dev-v1.1.json or -v2.0)"),
    ("corpus", str, None, "--task general: unlabeled text files, comma-separated (python data.py corpus)"),
    ("stages", str, None, "comma-separated subset of " + ",".join(STAGES) + " (default: all)"),
    ("allow_partial", bool, False, "score on a dev file with fewer or more rows than the official one"),
    "teacher",
    ("teacher", str, None, "directory of an already fine-tuned teacher: skips the teacher stage"),
    ("teacher_init", str, "google-bert/bert-base-uncased", "pre-trained weights: hub name or directory"),
    ("teacher_epochs", finite, None, "teacher epochs"),
    ("teacher_lr", finite, None, "teacher learning rate"),
    "student",
    ("student_init", str, None, "tinybert: General TinyBERT (the paper; default for tasks); DIR: a model "
     "directory's embeddings and layers g(1..M); teacher-layers: the same from the teacher "
     "(DistilBERT's init); random (default for --task general)"),
    ("layers", int, None, "student layers M (default: 4 for tinybert, else DIR's or half the teacher's)"),
    ("hidden", int, None, "student width (default: 312 for tinybert, else the teacher's)"),
    ("heads", int, None, "student attention heads (any divisor of the width)"),
    ("ffn", int, None, "student FFN width"),
    "distillation",
    ("splits", int, 12, "MHA-splits A for L_MHA (must divide both widths)"),
    ("layer_map", str, "uniform", "uniform, last, or the teacher layer of each student layer: 3,6,9,12"),
    *((f"w_{w}", finite, 1.0, f"weight of L_{w.upper()} (0 switches it off)")
      for w in ("emb", "mha", "ffn", "kd", "ss", "sc")),
    ("proj_init", ["normal", "identity"], "normal", "W_m init: N(0, 0.02) (the authors') or identity"),
    ("w_ce", finite, 0.0, "weight of the gold-label loss in Stage 2 (0 in MLKD; a baseline's)"),
    ("temperature", finite, 1.0, "L_KD temperature"),
    ("mha_temperature", finite, 1.0, "L_MHA relation temperature; not 1 is NOT the paper's method"),
    ("tau", finite, 0.07, "L_SC temperature"),
    ("recipe", ["mlkd", "tinybert"], "mlkd", "tinybert: TinyBERT's task distillation, the paper's "
     "baseline (Stage 1 MSE of attention scores and hidden states, Stage 2 L_KD alone)"),
    ("paper_exact", bool, False, "the authors' behaviour: batches padded to max length, losses unmasked"),
    ("group_by_length", bool, False, "batches of similar lengths (runs of 100 batches sorted): less "
     "padding, the same masked losses; L_SS and L_SC then relate samples of similar length"),
    "optimisation",
    ("epochs1", finite, None, "Stage-1 epochs"),
    ("epochs2", finite, None, "Stage-2 epochs"),
    ("lr1", finite, 5e-5, "Stage-1 learning rate"),
    ("lr2", finite, 5e-5, "Stage-2 learning rate"),
    ("batch_size", int, None, "default 32 (16 for SQuAD); under torchrun the global batch"),
    ("max_len", int, None, "word pieces per example (default: the task's)"),
    ("warmup", finite, 0.1, "warm-up fraction of the steps (teacher, Stage 2, general)"),
    ("weight_decay", finite, 0.01, "AdamW weight decay (not on biases and LayerNorm weights)"),
    ("seed", int, 42, "each stage draws from its own generator, seeded by --seed and its name"),
    ("max_steps", int, None, "cap the steps of every stage (quick runs)"),
    ("train_subset", int, None, "train on this many examples, the same for every --seed"),
    ("eval_steps", int, None, "evaluate on dev every N steps (default: every epoch)"),
    ("save_steps", int, 200, "write a resumable checkpoint every N steps"),
    ("log_steps", int, 50, "progress line every N steps"),
    ("eval_batch_size", int, 128, "batch size of evaluation and of the teacher cache"),
    ("device", str, "cuda" if torch.cuda.is_available() else "cpu", "cpu, cuda or cuda:N"),
    ("compile", bool, False, "torch.compile the trained model; batches padded to a few widths"),
    ("no_teacher_cache", bool, False, "run the teacher on every Stage-2 step, not once per example"),
]


def refuse(message):
    """A flag error: one line on stderr (argparse's usage block is in --help), exit status 2."""
    if LEAD:  # under torchrun every process parses the same flags: one of them says why
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = refuse
    for flag in FLAGS:
        if isinstance(flag, str):
            group = p.add_argument_group(flag)
        elif flag[1] is bool:
            group.add_argument(f"--{flag[0]}", action="store_true", help=flag[3])
        else:
            choices = flag[1] if isinstance(flag[1], list) else None
            group.add_argument(f"--{flag[0]}", type=str if choices else flag[1], default=flag[2],
                               choices=choices, help=flag[3], required=flag[0] == "task")
    args = p.parse_args(argv)
    if args.task not in TASKS:
        refuse(f"--task {args.task!r}: unknown; choose one of {', '.join(TASKS)}")
    for name, value in TASKS[args.task]._asdict().items():
        value = value if getattr(args, name) is None else getattr(args, name)
        setattr(args, name, value if name == "max_len" else float(value))  # 15.0, as --epochs1 15 gives
    general, squad = args.task == "general", args.task.startswith("squad")
    if squad or args.recipe == "tinybert":  # Stage 2 = L_KD alone: TinyBERT's, the authors' SQuAD runs
        args.w_ss = args.w_sc = 0.0
    args.metric = ("f1" if squad else "loss" if general else "acc_m" if args.task == "mnli"
                   else data.TASKS[args.task].metric)
    args.student_init = args.student_init or ("random" if general else "tinybert")
    args.batch_size = args.batch_size or (16 if squad else 32)
    args.out = args.out or os.path.join("out", args.task)
    for name in ("data_dir", "out", "train_file", "dev_file", "corpus", "teacher", "teacher_init",
                 "student_init"):  # paths are kept absolute: args.json then holds from any folder
        value = getattr(args, name)
        local = value not in (None, "tinybert", "teacher-layers", "random") and all(
            os.path.exists(f) for f in value.split(","))
        if local or name in ("data_dir", "out"):
            setattr(args, name, ",".join(os.path.abspath(f) for f in value.split(",")))
    stages = args.stages or ("general" if general else ",".join(STAGES))
    args.stages = [s.strip() for s in stages.split(",") if s.strip()]
    try:
        check_flags(args)
    except ValueError as e:
        refuse(str(e))
    if args.group_by_length and args.paper_exact:
        print("--group_by_length is ignored with --paper_exact: every batch is padded to --max_len")
        args.group_by_length = False
    return args


def check_flags(args):
    """Refuse, before any work, the flags that cannot work: a ValueError naming the flag."""
    corpus, world = [f for f in (args.corpus or "").split(",") if f], int(os.environ.get("WORLD_SIZE", 1))
    general = args.task == "general"
    pairs = args.task.startswith("squad") or args.task in data.TASKS and data.TASKS[args.task].b is not None
    shortest = 5 if pairs else 3  # [CLS] a [SEP] (b [SEP]): a word piece of each text at least
    parent = args.out  # the existing folder --out will be made in
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    for bad, message in (
            *((getattr(args, f) is not None and getattr(args, f) < 1, f"--{f} must be at least 1, got "
               f"{getattr(args, f)}") for f in ("batch_size", "max_len", "splits", "save_steps",
               "log_steps", "eval_batch_size", "layers", "hidden", "heads", "ffn", "max_steps",
               "train_subset", "eval_steps")),
            *((getattr(args, f) <= 0, f"--{f} must be positive, got {getattr(args, f)}")
              for f in ("lr1", "lr2", "teacher_lr", "temperature", "mha_temperature", "tau")),
            *((getattr(args, f) < 0, f"--{f} must be >= 0, got {getattr(args, f)}")
              for f in ("epochs1", "epochs2", "teacher_epochs", "weight_decay")),
            (not 0 <= args.warmup < 1, f"--warmup must be a fraction in [0, 1), got {args.warmup}"),
            (general and args.stages != ["general"], "--task general runs one stage: no --stages"),
            (general and args.teacher, "--task general distils a pre-trained model: use --teacher_init"),
            (general and not corpus, "--task general needs --corpus FILE[,FILE...] (python data.py corpus)"),
            *((not os.path.isfile(f), f"--corpus {f}: no such file") for f in corpus),
            (not general and (not args.stages or set(args.stages) - set(STAGES)),
             f"--stages {','.join(args.stages)}: choose from {','.join(STAGES)}"),
            (not any((args.w_kd, args.w_ss, args.w_sc, args.w_ce)),
             "Stage 2 needs one of --w_kd --w_ss --w_sc --w_ce > 0"),
            (args.max_len > 512, f"--max_len {args.max_len}: BERT has 512 positions"),
            (args.max_len < shortest, f"--max_len {args.max_len}: {args.task} needs at least {shortest} "
             f"positions (one word piece of {'each text' if pairs else 'text'} and the special tokens)"),
            (args.teacher and not os.path.isdir(args.teacher), f"--teacher {args.teacher}: no such directory"),
            (args.student_init not in ("tinybert", "teacher-layers", "random")
             and not os.path.isdir(args.student_init),
             f"--student_init {args.student_init}: not tinybert/teacher-layers/random nor a directory"),
            ((args.w_ss or args.w_sc) and "stage2" in args.stages and math.ceil(args.batch_size / world) < 2,
             f"--batch_size {args.batch_size}: L_SS and L_SC relate the samples of a batch and are 0 with one "
             f"sample per process; use --batch_size {2 * world} or more, or --w_ss 0 --w_sc 0"),
            (not os.access(parent, os.W_OK),
             f"--out {args.out}: {parent} is not writable; choose an --out you can write to")):
        if bad:
            raise ValueError(message)
    if args.layer_map not in ("uniform", "last"):
        try:
            args.layer_map = [int(x) for x in args.layer_map.split(",")]
        except ValueError:
            raise ValueError(f"--layer_map {args.layer_map}: use uniform, last or teacher layers 3,6,9,12")
        if args.layer_map[0] < 0 or any(x < 1 for x in args.layer_map[1:]):
            raise ValueError(f"--layer_map {','.join(map(str, args.layer_map))}: teacher layers count "
                             "from 1 (0 is the embeddings)")


def check_shapes(args, teacher):
    """Refuse, before any training, the shapes a later stage would refuse: the student's heads and the
    MHA-splits must divide the widths, the layer map must fit, TinyBERT's recipe needs equal head counts.
    teacher: the teacher's BertConfig."""
    N, d_t, h_t = teacher.num_hidden_layers, teacher.hidden_size, teacher.num_attention_heads
    if args.student_init == "tinybert":  # General TinyBERT has 12 heads
        M, d_s, h_s = args.layers or 4, args.hidden or 312, args.heads or 12
    elif args.student_init in ("random", "teacher-layers"):
        M, d_s, h_s = args.layers or max(1, N // 2), args.hidden or d_t, args.heads or h_t
    else:
        c = BertConfig.from_json(os.path.join(args.student_init, "config.json"))
        M, d_s, h_s = args.layers or c.num_hidden_layers, c.hidden_size, args.heads or c.num_attention_heads
    distils = any(s in args.stages for s in ("stage1", "general"))
    whose = "--heads" if args.heads else f"--student_init {args.student_init}'s head count"
    for bad, message in (
            (d_s % h_s, f"{whose} {h_s} does not divide the student's width {d_s}; choose a divisor of {d_s}"),
            (distils and args.w_mha and args.recipe == "mlkd" and (d_s % args.splits or d_t % args.splits),
             f"--splits {args.splits} must divide the student's width {d_s} and the teacher's {d_t}"),
            (distils and args.recipe == "tinybert" and h_s != h_t,
             f"--recipe tinybert matches heads one to one: give the student --heads {h_t}"),
            (args.max_len > teacher.max_position_embeddings,
             f"--max_len {args.max_len}: the teacher has {teacher.max_position_embeddings} positions"),
            (args.student_init == "tinybert" and (M, d_s) not in TINYBERT,
             f"--layers {M} --hidden {d_s}: no General TinyBERT of that shape (have 4 x 312, 6 x 768); use "
             "--student_init teacher-layers, random or a model directory")):
        if bad:
            raise ValueError(message)
    if distils:
        try:
            mlkd.layer_map(N, M, args.layer_map)
        except ValueError as e:
            raise ValueError(f"--layer_map: {e}") from None


def build_student(args, teacher):
    """The student per --student_init (see --help); its attention dropout is 0 so that attn_outputs are
    the paper's O = softmax(Q K^T / sqrt(d/h)) V, not a dropped-out copy."""
    tc = teacher.config
    overrides = dict(evaluation.head_config(args.task), attention_probs_dropout_prob=0.0,
                     **({"num_attention_heads": args.heads} if args.heads else {}))
    if args.student_init == "tinybert":  # check_shapes has refused a shape General TinyBERT lacks
        return Bert.from_pretrained(TINYBERT[args.layers or 4, args.hidden or 312], **overrides)
    if args.student_init == "random":
        shape = dict(num_hidden_layers=args.layers or max(1, tc.num_hidden_layers // 2),
                     hidden_size=args.hidden, intermediate_size=args.ffn)
        return Bert(BertConfig(**{**vars(tc), **{k: v for k, v in shape.items() if v}, **overrides}))
    from_teacher = args.student_init == "teacher-layers"
    source = teacher if from_teacher else Bert.from_pretrained(args.student_init, verbose=False, **overrides)
    sc = source.config
    for flag, want, have in (("--hidden", args.hidden, sc.hidden_size), ("--ffn", args.ffn, sc.intermediate_size)):
        if want is not None and want != have:
            raise ValueError(f"{flag} {want}: --student_init {args.student_init} copies weights {have} wide; "
                             f"use --student_init random for another width")
    M = args.layers or (tc.num_hidden_layers // 2 if from_teacher else sc.num_hidden_layers)
    student, g = cut_layers(source, M, args.layer_map, overrides, keep_head=not from_teacher)
    print(f"[student] layers {g[1:]} of {'the teacher' if from_teacher else args.student_init} "
          f"(and its embeddings) -> a {M}-layer student")
    return student


def cut_layers(source, M, kind, overrides, keep_head=True):
    """A model of M layers with source's embeddings and pooler and its layers g(1..M) of
    mlkd.layer_map (DistilBERT's initialisation); the head is source's when keep_head, else fresh."""
    N = source.config.num_hidden_layers
    if M > N:
        raise ValueError(f"cannot take {M} layers from a model that has {N}")
    g = mlkd.layer_map(N, M, kind)
    student = Bert(BertConfig(**{**vars(source.config), "num_hidden_layers": M, **overrides}))
    s_state, head = source.state_dict(), ("classifier.", "qa_outputs.")
    state = {k: v for k, v in s_state.items() if not k.startswith(("layers.", *(() if keep_head else head)))}
    for m in range(1, M + 1):  # student layer m <- source layer g(m)
        prefix = f"layers.{g[m] - 1}."
        state.update({f"layers.{m - 1}.{k[len(prefix):]}": v for k, v in s_state.items() if k.startswith(prefix)})
    missing = student.load_state_dict(state, strict=False).missing_keys
    assert all(k.startswith(head) for k in missing), missing  # only a fresh head is left as initialised
    return student, g


def save_model(model, directory, args):
    """The model in HF's layout with its vocabulary and the settings it was trained with (eval.py reads
    max_len and data_dir from them)."""
    if LEAD:
        tokenizer = {"tokenizer_class": "BertTokenizer", "do_lower_case": True,  # as data.Tokenizer
                     "model_max_length": args.max_len}  # an HF pipeline then cuts where we trained
        model.save(directory, {"vocab.txt": data.read_text(args.vocab),
                               "tokenizer_config.json": json.dumps(tokenizer, indent=2),
                               "args.json": json.dumps(vars(args), indent=2, default=str)})


def load_teacher(directory, args):
    """A fine-tuned teacher, frozen; its head must be the task's (a pre-trained model has none)."""
    teacher = Bert.from_pretrained(directory, verbose=False)
    why = evaluation.head_mismatch(teacher, args.task)
    if why:
        raise ValueError(f"--teacher {directory}: {why}; it is not a teacher fine-tuned on {args.task}. To "
                         f"fine-tune one from it, pass --teacher_init {directory}")
    if teacher.config.head == "classification":
        evaluation.check_labels(teacher, args.task)
    return teacher.to(args.device).eval().requires_grad_(False)


def load_task(args, tok):
    """Tokenised training rows (tokenised once) and evaluate(model) -> {metric: value} on dev."""
    if args.task.startswith("squad"):
        version = evaluation.squad_version(args.task)
        default = os.path.join(args.data_dir, "squad", "{}-v" + version + ".json")
        files = (args.train_file or default.format("train")).split(",")
        examples = train_subset(args.train_subset, [e for f in files for e in data.read_squad(f)])
        rows = data.squad_features(examples, tok, max_len=args.max_len)
        train = {k: rows[k] for k in ("input_ids", "token_type_ids", "lengths", "labels")}
        dev_examples = data.read_squad(args.dev_file or default.format("dev"), args.allow_partial)
        dev = data.squad_features(dev_examples, tok, max_len=args.max_len, train=False)
        return train, functools.partial(squad_dev, examples=dev_examples, features=dev, version=version, args=args)
    examples = train_subset(args.train_subset, data.read_glue(args.task, "train", args.data_dir))
    train = data.encode_glue(args.task, examples, tok, args.max_len)
    dev = {s: data.encode_glue(args.task, data.read_glue(args.task, s, args.data_dir, args.allow_partial), tok,
                               args.max_len) for s in data.TASKS[args.task].dev_splits}
    return train, functools.partial(evaluation.evaluate_glue, task=args.task, dev_sets=dev,
                                    batch_size=args.eval_batch_size, device=args.device,
                                    fixed_padding=args.paper_exact)


def squad_dev(model, examples, features, version, args):
    """SQuAD dev metrics (EM, F1) of a model."""
    return evaluation.evaluate_squad(model, examples, features, version, args.eval_batch_size, args.device)[0]


def train_subset(n, examples):
    """A random subset of n training examples, the same for every --seed (all of them without n)."""
    if not n:
        return examples
    if n >= len(examples):
        print(f"[data] --train_subset {n} is not less than the {len(examples)} training examples: "
              "training on all of them")
        return examples
    keep = torch.randperm(len(examples), generator=torch.Generator().manual_seed(42))[:n]
    return [examples[i] for i in sorted(keep.tolist())]


def dev_set_key(args):
    """What a dev metric was measured on: the same key means the same examples, encoded the same way."""
    return f"{args.task} {args.dev_file or args.data_dir} max_len={args.max_len} paper_exact={args.paper_exact}"


# The flags that change what a stage computes. A stage directory keeps the settings it was started with
# (args.json); a rerun into it with other values would skip or resume a different run, so it is refused.
FIT_FLAGS = ("task", "batch_size", "max_len", "seed", "max_steps", "train_subset", "weight_decay",
             "paper_exact", "train_file", "group_by_length")
STUDENT_FLAGS = ("teacher", "student_init", "layers", "hidden", "heads", "ffn", "splits", "layer_map", "w_emb",
                 "w_mha", "w_ffn", "mha_temperature", "proj_init", "recipe", "epochs1", "lr1")
STAGE_FLAGS = {
    "teacher": (*FIT_FLAGS, "teacher_init", "teacher_epochs", "teacher_lr", "warmup", "eval_steps", "dev_file"),
    "stage1": (*FIT_FLAGS, *STUDENT_FLAGS),
    "stage2": (*FIT_FLAGS, *STUDENT_FLAGS, "w_kd", "w_ss", "w_sc", "w_ce", "temperature", "tau", "epochs2",
               "lr2", "warmup", "eval_steps", "dev_file"),
    "general": (*FIT_FLAGS, *STUDENT_FLAGS, "corpus", "teacher_init", "warmup"),
}


def begin(stage, directory, args):
    """True when `stage` runs now: it is in --stages and not finished. Its directory then holds the
    settings it runs with (args.json), and the stage draws its randomness (initialisation, dropout)
    from the generator seeded by --seed and its name: the same command gives the same weights whether
    the stages before it ran in this process or an earlier one."""
    if stage not in args.stages:
        return False
    same_settings(stage, directory, args)
    if is_done(directory):
        print(f"[{stage}] {directory} is finished: skipped")
        return False
    if LEAD:
        os.makedirs(directory, exist_ok=True)
        data.atomic_write_text(os.path.join(directory, "args.json"), json.dumps(vars(args), indent=2, default=str))
    sync()
    torch.manual_seed(zlib.crc32(f"{args.seed} {stage}".encode()))
    return True


def same_settings(stage, directory, args):
    """Refuse to reuse a stage directory whose work (a finished result or a checkpoint) was done with
    other values of STAGE_FLAGS[stage]; a stage stopped before its first checkpoint kept nothing."""
    path = os.path.join(directory, "args.json")
    if not os.path.exists(path) or not any(os.path.exists(os.path.join(directory, f))
                                           for f in ("metrics.json", "checkpoint.pt")):
        return
    was, now = json.loads(data.read_text(path)), json.loads(json.dumps(vars(args), default=str))
    differ = [f for f in STAGE_FLAGS[stage] if f in was and was[f] != now[f]]
    if differ:
        flags = ", ".join(f"--{f} {was[f]} (now {now[f]})" for f in differ)
        raise ValueError(f"{directory} was run with other settings: {flags}. Rerun with those to resume or "
                         "reuse it, or pass a new --out")


def finish(directory, metrics):
    """Mark a stage finished: metrics.json (with done), curves.svg; drop the checkpoint and the cache."""
    if LEAD:
        data.atomic_write_text(os.path.join(directory, "metrics.json"), json.dumps({**metrics, "done": True},
                                                                                 indent=2))
        evaluation.write_curves(directory)  # curves.svg: every loss and dev metric against step
        for name in ("checkpoint.pt", CACHE):
            if os.path.exists(os.path.join(directory, name)):
                os.remove(os.path.join(directory, name))
    sync()


def is_done(directory):
    path = os.path.join(directory, "metrics.json")
    return os.path.exists(path) and json.loads(data.read_text(path)).get("done", False)


def resume(stage, directory, modules, optimizer, scheduler, args):
    """Load checkpoint.pt when there is one (weights, optimizer, schedule, RNG) and cut the log back to
    it; returns (step, best dev metrics), (0, None) for a fresh start."""
    ckpt, log_path = os.path.join(directory, "checkpoint.pt"), os.path.join(directory, "log.jsonl")
    if LEAD:
        data.remove_stale_temporaries(directory)  # a write killed by SIGKILL leaves its temporary behind
    step, best = 0, None
    if os.path.exists(ckpt):
        try:
            state = torch.load(ckpt, map_location=args.device, weights_only=True)
        except Exception as e:  # empty, truncated or not a checkpoint at all
            why = (str(e) or type(e).__name__).splitlines()[0][:80]
            raise ValueError(f"{ckpt}: not a readable checkpoint ({why}); delete it to start {stage} "
                             "over") from None
        for m, s in zip(modules, state["modules"]):
            m.load_state_dict(s)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, best = state["step"], state["best_metrics"]
        torch.set_rng_state(state["rng"].cpu())
        print(f"[{stage}] resumed from {ckpt} at step {step}")
    kept = [r for r in open(log_path) if json.loads(r).get("step", 0) <= step] if step else []
    if LEAD:  # the log goes on from the checkpoint: no step twice
        data.atomic_write_text(log_path, "".join(kept))
    return step, best


def save_checkpoint(directory, modules, optimizer, scheduler, step, best):
    """checkpoint.pt, written atomically."""
    buf = io.BytesIO()
    torch.save({"modules": [m.state_dict() for m in modules], "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "best_metrics": best,
                "rng": torch.get_rng_state()}, buf)
    data.atomic_write_bytes(os.path.join(directory, "checkpoint.pt"), [buf.getvalue()])


def floats(parts):
    return {k: float(v.detach()) for k, v in parts.items()}


class Log:
    """A stage's log.jsonl and progress lines: each loss, the lr, samples/s and the ETA (of training time
    only), the dev evaluations, the peak memory at the end."""

    def __init__(self, stage, directory, step, total, args, examples, schedule):
        self.stage, self.step0, self.total, self.args = stage, step, total, args
        self.t0, self.seen, self.record = time.time(), 0, {}
        self.file = open(os.path.join(directory, "log.jsonl"), "a") if LEAD else open(os.devnull, "w")
        per_process = f" ({math.ceil(args.batch_size / dist.get_world_size())} per process)" \
            if dist.is_initialized() else ""
        print(f"[{stage}] {examples} examples, batch {args.batch_size}{per_process}, {total} steps ({schedule}")

    def trained(self, step, epoch, parts, lr, rows):
        self.seen += rows  # the global batch: samples/s counts every process's rows
        if step % self.args.log_steps and step != self.total:
            return
        elapsed = time.time() - self.t0
        eta = (self.total - step) * elapsed / (step - self.step0)
        self.record = {"stage": self.stage, "epoch": epoch + 1, "step": step, "total": self.total,
                       **floats(parts), "lr": lr, "samples_per_s": self.seen / elapsed, "train_s": elapsed}
        self.file.write(json.dumps(self.record) + "\n")
        self.file.flush()
        print(f"[{self.stage}] epoch {epoch + 1} step {step}/{self.total} | "
              + " ".join(f"{k} {v:.4f}" for k, v in floats(parts).items())
              + f" | lr {lr:.2e} | {self.seen / elapsed:.1f} samples/s | ETA {eta / 60:.1f} min", flush=True)

    def evaluated(self, step, evaluate, best, selecting):
        """Run a dev (or held-out) evaluation and log it (its time is not training time); returns
        (metrics, whether they beat `best` on args.metric when selecting)."""
        t = time.time()
        metrics = evaluate()
        took = time.time() - t
        self.t0 += took  # samples/s and the ETA count training only
        improved = selecting and (best is None or metrics[self.args.metric] > best[self.args.metric])
        print(f"[{self.stage}] {'dev' if selecting else 'held-out'} at step {step} ({took:.0f} s): "
              + evaluation.format_metrics(metrics, 2 if selecting else 4)
              + ("  (best so far: saved)" if improved else ""))
        self.file.write(json.dumps({"stage": self.stage, "step": step, "dev": metrics, "eval_s": took}) + "\n")
        return metrics, improved

    def done(self):
        """The closing line (peak memory: CUDA allocated, or the process's resident set on a CPU)."""
        cuda = self.args.device.startswith("cuda")
        peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                * 1024) / 2**30
        self.record["peak_memory_gib"] = peak
        print(f"[{self.stage}] done: {self.record.get('samples_per_s', 0):.1f} samples/s, peak memory {peak:.2f} "
              f"GiB ({'CUDA allocated' if cuda else 'process RSS'})")
        self.file.write(json.dumps({"stage": self.stage, "done": True, "peak_memory_gib": peak}) + "\n")
        self.file.close()
        return self.record


CACHE = "teacher_cache.safetensors"


def teacher_cache(teacher, train, args, directory):
    """Stage 2's teacher targets (logits, [CLS] state) of every training example, computed once.

    The teacher is frozen, in eval mode and deterministic, so they are the same at every epoch; the
    student then trains alone. Kept in `directory` with a sha256 fingerprint of the teacher's weights and
    the rows, so that a resumed Stage 2 reads them back (under torchrun process 0 computes them, the
    others read its file); finish() deletes the file. None (the teacher runs on each batch) without a
    distillation loss, with --no_teacher_cache, or when --max_steps sees fewer rows than one pass.
    """
    n = len(train["input_ids"])
    if not any((args.w_kd, args.w_ss, args.w_sc)) or args.no_teacher_cache:
        return None
    if args.max_steps and args.max_steps * args.batch_size < n:
        print(f"[stage2] --max_steps {args.max_steps} sees fewer rows than the {n} examples: no teacher cache, "
              "the teacher runs on each batch")
        return None
    h, path = hashlib.sha256(), os.path.join(directory, CACHE)
    for t in [*teacher.state_dict().values(), *(train[k] for k in ("input_ids", "token_type_ids", "lengths"))]:
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    fingerprint = torch.tensor(list(h.digest()), dtype=torch.uint8)
    saved = read_safetensors(path) if os.path.exists(path) else {}
    if "fingerprint" in saved and torch.equal(saved["fingerprint"], fingerprint):
        print(f"[stage2] teacher outputs read from {path}")
    elif LEAD:
        if saved:
            print(f"[stage2] {path} was made by another teacher or data: computed again")
        t0 = time.time()
        logits, cls = evaluation.model_outputs(teacher, train, args.eval_batch_size, args.device)
        write_safetensors({"logits": logits, "cls": cls, "fingerprint": fingerprint}, path)
        print(f"[stage2] teacher outputs of {n} examples computed once in {time.time() - t0:.0f} s "
              f"({(logits.numel() + cls.numel()) * 4 / 2**20:.0f} MiB); the teacher does not run again")
    sync()
    saved = read_safetensors(path)
    return mlkd.TeacherTargets(saved["logits"].to(args.device), saved["cls"].to(args.device))


def report(args, teacher, out, evaluate):
    """The eval stage: the teacher's and the finished student's dev metrics side by side, results.json.
    A stage's dev metrics recorded when its model was saved are reused when measured on the same dev set."""
    if not is_done(out["stage2"]):
        raise ValueError(f"no finished student in {out['stage2']}: run stage2 first")
    student = Bert.from_pretrained(out["stage2"], verbose=False).to(args.device)
    teacher_dir = args.teacher or out["teacher"]
    metrics = {}
    for name, directory, model in (("teacher", teacher_dir, teacher), ("student", out["stage2"], student)):
        path = os.path.join(directory, "metrics.json")
        saved = json.loads(data.read_text(path)) if os.path.exists(path) else {}  # --teacher: none
        same = saved.get("dev_set") == dev_set_key(args) and saved.get("dev")
        metrics[name] = saved["dev"] if same else evaluate(model)
    tp, sp = teacher.num_parameters(), student.num_parameters()
    t, s = metrics["teacher"][args.metric], metrics["student"][args.metric]
    results = dict(task=args.task, metric=args.metric, split="dev", **metrics, ratio=s / t if t else None,
                   teacher_parameters=tp, student_parameters=sp, teacher_dir=teacher_dir, student_dir=out["stage2"])
    data.atomic_write_text(os.path.join(args.out, "results.json"), json.dumps(results, indent=2))
    evaluation.write_index(args.out, [teacher_dir, out["stage1"], out["stage2"]])
    print(f"\n{args.task} dev ({', '.join(metrics['teacher'])}; selection metric {args.metric}, Stage-2 best on dev)")
    print(f"  {'':8s} " + " ".join(f"{k:>9s}" for k in metrics["teacher"]) + f" {'params':>9s}")
    for name, params in (("teacher", tp), ("student", sp)):
        cells = (f"{v:9d}" if isinstance(v, int) else f"{v:9.2f}" for v in metrics[name].values())
        print(f"  {name:8s} " + " ".join(cells) + f" {params / 1e6:8.1f}M")
    if t:
        print(f"  student/teacher on {args.metric}: {100 * s / t:.1f}%, {tp / sp:.1f}x fewer parameters")
    print(f"  files: {teacher_dir}, {out['stage2']}, {os.path.join(args.out, 'results.json')}")
    return results


# ----------------------------------------------------------------------------------------------
# Several processes: torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; a plain `python train.py` is one.


def start_distributed(args):
    """Under torchrun: join the process group (NCCL on CUDA, gloo on CPU), take this process's GPU, and
    let process 0 alone print. Every process loads the teacher and the data; process 0 alone evaluates."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return
    cuda = args.device.startswith("cuda")
    # a long timeout: the other processes wait at a barrier while process 0 evaluates
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=3))
    if cuda:
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
    if not LEAD:
        sys.stdout = open(os.devnull, "w")


def sync():
    if dist.is_initialized():
        dist.barrier()


def shard(batch, by_tokens):
    """This process's rows of a global batch and the weight of its loss: world x its share of the
    examples (of the real tokens for the Stage-1 losses, which average over tokens), so that the mean of
    the processes' gradients is the gradient of the global batch's loss, as one process computes it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = torch.arange(len(batch["index"])).tensor_split(world)[rank]
    local = {k: v[rows if len(rows) else [0]] for k, v in batch.items()}  # an empty shard: a row at weight 0
    count = (lambda b: float(b["attention_mask"].sum())) if by_tokens else (lambda b: len(b["index"]))  # noqa: E731
    return local, world * count(local) / count(batch) if len(rows) else 0.0


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, data.DownloadError, FloatingPointError, OSError) as e:
        if LEAD:  # once, not once per torchrun process
            print(f"error: {data.error_line(e, 'an --out')}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # main has said what is kept
        sys.exit(130)
