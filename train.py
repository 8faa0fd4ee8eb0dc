"""train.py: the whole MLKD pipeline for one task, in one command.

    python train.py --task sst2       # teacher -> Stage 1 -> Stage 2 -> eval, into out/sst2

Read mlkd.py first (the losses), then model.py's BertOutput (the tensors they read), then this
file from the top: the stages in the paper's order (section 3; the settings of the authors'
scripts, HandH1998/tmp_bert_mlkd, branch bert_mlkd), what each one minimises, the one training
loop; below them the machinery (the flags and their checks, the teacher and the data, a stage's
directory, torchrun), which a reader of the method may skip but for two lines: load_teacher freezes
the teacher, and parse_args sets --w_ss = --w_sc = 0 for SQuAD and for --recipe tinybert.
--recipe tinybert runs TinyBERT's task distillation (the paper's baseline) in both stages.
A student of another shape starts from general distillation: tools/general_distill.py.

Each stage writes <out>/<stage>/: model.safetensors, config.json, vocab.txt, args.json,
metrics.json, log.jsonl (tools/pages.py draws its curves). A rerun skips finished stages and
resumes an interrupted one from its checkpoint.pt. Under `torchrun --nproc_per_node N train.py ...`
every stage is data-parallel (each process draws its own dropout: a stage resumed with another N
goes on from its checkpoint, but its weights then match no uninterrupted run's).
"""
import argparse
import contextlib
import datetime
import functools
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
import eval as evaluation  # eval.py (the name eval is Python's builtin)
import mlkd
from model import Bert, BertConfig, fetch, read_safetensors, write_safetensors

# Per task, from the authors' scripts' default_params (HandH1998/tmp_bert_mlkd): Stage 1 and 2's
# epochs from task_distill.py (branch bert_mlkd; SQuAD's from branch bert_mlkd_for_qa_task, which
# also sets their lr 3e-5 and batch 16: parse_args), the teacher's from
# superbert_run_en_classifier.py. They also select on dev every eval_step steps (Stage 2: RTE 10;
# CoLA, MRPC, STS-B, WNLI 20; SST-2 100; the rest 500; the teacher's differ): --eval_steps N does so.
RECIPES = {
    "cola": dict(epochs1=50, epochs2=30, teacher_epochs=10, teacher_lr=1e-5),
    "sst2": dict(epochs1=15, epochs2=10, teacher_epochs=4, teacher_lr=2e-5),
    "mrpc": dict(epochs1=20, epochs2=15, teacher_epochs=10, teacher_lr=2e-5),
    "stsb": dict(epochs1=20, epochs2=15, teacher_epochs=10, teacher_lr=3e-5),
    "rte": dict(epochs1=20, epochs2=15, teacher_epochs=10, teacher_lr=2e-5),
    "qnli": dict(epochs1=10, epochs2=10, teacher_epochs=10, teacher_lr=2e-5),
    "mnli": dict(epochs1=6, epochs2=6, teacher_epochs=4, teacher_lr=3e-5),
    "qqp": dict(epochs1=6, epochs2=6, teacher_epochs=5, teacher_lr=2e-5),
    "wnli": dict(epochs1=20, epochs2=15, teacher_epochs=10, teacher_lr=2e-5),
    "squad1": dict(epochs1=4, epochs2=3, teacher_epochs=4, teacher_lr=3e-5),
    "squad2": dict(epochs1=4, epochs2=3, teacher_epochs=4, teacher_lr=3e-5),
}
STAGES = ("teacher", "stage1", "stage2", "eval")
RANK = int(os.environ.get("RANK", 0))  # under torchrun, this process's number
LEAD = RANK == 0  # under torchrun, process 0 alone writes and evaluates


# ----------------------------------------------------------------------------------------------
# The method: the stages in the paper's order and what each one minimises


def main(argv=None):
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # under torchrun: data-parallel processes
        start_distributed(args)
    print("settings: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))
    try:
        result = pipeline(args)
    except KeyboardInterrupt:  # Ctrl-C anywhere: say what is kept
        dirs = [(s, os.path.join(args.out, s)) for s in STAGES[:3]]
        kept = [f"{s} (finished)" if is_done(d) else f"{s} (checkpoint.pt)" for s, d in dirs
                if is_done(d) or os.path.exists(os.path.join(d, "checkpoint.pt"))]
        print(f"\ninterrupted: kept in {args.out}: {', '.join(kept) or 'nothing'}; "
              "rerun the same command to resume", flush=True)
        raise
    if dist.is_initialized():  # the processes leave together: one leaving early aborts the others
        dist.barrier()
        dist.destroy_process_group()
    return result


def pipeline(args):
    """teacher -> stage1 -> stage2 -> eval for one task (see the module docstring)."""
    out = {s: os.path.join(args.out, s) for s in STAGES}
    with main_process_first():  # under torchrun: process 0 downloads what is missing, then the rest
        fetch_models(args, args.teacher or (out["teacher"] if is_done(out["teacher"]) else
                                            args.teacher_init))  # a finished one: no download
        train, evaluate = load_task(args, data.Tokenizer(args.vocab))
    check_directories(out, args)  # a stage's directory run otherwise: refused before any training

    # The teacher: fine-tuned on the gold labels; the checkpoint with the best dev metric is kept
    if args.teacher:
        print(f"[teacher] skipped: using the fine-tuned teacher of --teacher {args.teacher}")
    elif begin("teacher", out["teacher"], args):  # it runs now: begin wrote args.json, seeded init
        model = Bert.from_pretrained(args.teacher_init, verbose=LEAD,  # under torchrun: once
                                     **evaluation.head_config(args.task))
        record, best = fit("teacher", out["teacher"], [model.to(args.device)], teacher_loss, train,
                           args, args.teacher_epochs, args.teacher_lr, args.warmup, evaluate,
                           keep_best=True)
        finish(out["teacher"], {"dev": best, "train": record}, args)
    teacher = load_teacher(args.teacher or out["teacher"], args)  # the kept teacher, frozen
    args.teacher_crc32 = crc32(teacher.state_dict())  # Stage 1 and 2 record what they distil
    if os.path.isdir(args.student_init):  # and the student they start from, a directory's
        args.student_crc32 = crc32(Bert.from_pretrained(args.student_init, verbose=False).state_dict())

    # Stage 1: distil the embeddings and Transformer layers (L_EMB + L_MHA + L_FFN)
    if begin("stage1", out["stage1"], args):
        student, proj, lmap = stage1_start(teacher, args)
        loss_fn = functools.partial(stage1_objective, teacher=teacher, proj=proj, lmap=lmap,
                                    args=args)
        record, _ = fit("stage1", out["stage1"], [student, proj], loss_fn, train, args,
                        args.epochs1, args.lr1, warmup=None)  # a constant lr: no warm-up, no decay
        save_model(student, out["stage1"], args, proj)
        finish(out["stage1"], {"train": record}, args)

    # Stage 2: distil the prediction layer (logits, [CLS]) by L_KD + L_SS + L_SC into every weight
    args.from_stage1 = is_done(out["stage1"])  # else a baseline: Stage 2 from --student_init
    if begin("stage2", out["stage2"], args):
        student, proj = stage2_start(out["stage1"], teacher, args)
        loss_fn = functools.partial(stage2_objective, teacher=teacher, proj=proj, args=args,
                                    cache=teacher_cache(teacher, train, args))
        print("[stage2] the checkpoint with the best dev metric is kept: model selection on dev")
        record, best = fit("stage2", out["stage2"], [student, proj], loss_fn, train, args,
                           args.epochs2, args.lr2, args.warmup, evaluate, keep_best=True)
        finish(out["stage2"], {"dev": best, "train": record, "stage1": args.from_stage1}, args)

    # The eval stage: the teacher's and the student's dev metrics -> results.json
    if "eval" in args.stages and LEAD:
        same_settings("stage2", out["stage2"], args)  # a student of another teacher: refused
        return evaluation.report(args, teacher, args.teacher or out["teacher"], out["stage2"],
                                 evaluate)


def task_loss(logits, labels):
    """Loss on gold labels: CE; MSE for regression; (CE(start) + CE(end)) / 2 for spans (B, 2, L)."""
    if logits.dim() == 3:  # spans (B, 2, L) -> (B, L, 2): cross_entropy's classes (the positions)
        # at dim 1; its mean over B x 2 halves the sum
        return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels)
    if logits.shape[-1] == 1:
        return torch.nn.functional.mse_loss(logits[:, 0].float(), labels)
    return torch.nn.functional.cross_entropy(logits.float(), labels)


def teacher_loss(model, batch):
    """The teacher's fine-tuning loss on the gold labels -> (loss, {"ce" or "mse" (regression)})."""
    out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    loss = task_loss(out.logits, batch["labels"])
    return loss, {"mse" if out.logits.shape[-1] == 1 else "ce": loss}


def stage1_objective(model, batch, teacher, proj, lmap, args):
    """Stage 1 (and general distillation) -> (loss, parts): mlkd.stage1_loss against the frozen
    teacher (--recipe tinybert: TinyBERT's attention-score and hidden-state MSE)."""
    inputs = (batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    with torch.no_grad():
        t = teacher(*inputs, scores=args.recipe == "tinybert")
    if args.recipe == "tinybert":
        return mlkd.tinybert_stage1_loss(model(*inputs, scores=True), t, proj, inputs[2], lmap,
                                         args.paper_exact)
    mask = None if args.paper_exact else batch["attention_mask"]  # the authors' are unmasked
    weights = {"emb": args.w_emb, "mha": args.w_mha, "ffn": args.w_ffn}
    return mlkd.stage1_loss(model(*inputs), t, proj, mask, lmap, weights, args.splits,
                            args.mha_temperature)


def stage2_objective(model, batch, teacher, proj, cache, args):
    """Stage 2 -> (loss, parts): mlkd.stage2_loss against the teacher's targets (the cache's rows
    of the batch, or a live forward), plus --w_ce x the gold-label loss (0 in MLKD)."""
    out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    weights = {"kd": args.w_kd, "ss": args.w_ss, "sc": args.w_sc}
    student, labels = mlkd.LogitsAndCls.of(out), batch["labels"]
    # the teacher's logits and [CLS]; none for the gold-label baseline (--w_ce alone): no teacher
    targets = mlkd.stage2_targets(batch, teacher, cache) if any(weights.values()) else None
    if dist.is_initialized():  # every process's rows: L_SS and L_SC relate the whole batch
        counts = batch["rows_per_process"].tolist()
        student = mlkd.LogitsAndCls(*(gather_rows(x, counts) for x in student))
        labels = gather_rows(labels, counts)
        if targets is not None:
            targets = mlkd.LogitsAndCls(*(gather_rows(x, counts) for x in targets))
    total, parts = 0.0, {}
    if targets is not None:
        total, parts = mlkd.stage2_loss(student, targets, proj, labels, weights, args.temperature,
                                        args.tau)
    if args.w_ce:  # logged as "ce", or "mse" for regression
        gold = "mse" if student.logits.shape[-1] == 1 else "ce"
        parts[gold] = task_loss(student.logits, labels)
        total = total + args.w_ce * parts[gold]
    return total, parts


def stage1_start(teacher, args):
    """Stage 1's student (--student_init), its projections W_0..W_M into the teacher's width (new
    ones, for a General student too: its projections.safetensors are general_distill.py's), and
    the layer map g: student layer m learns teacher layer g(m)."""
    student = build_student(args, teacher).to(args.device)
    M, d_s = student.config.num_hidden_layers, student.config.hidden_size
    lmap = mlkd.layer_map(teacher.config.num_hidden_layers, M, args.layer_map)
    print(f"[student] layer map student -> teacher: {lmap} (0 = embeddings); {M} x {d_s}, "
          f"{student.num_parameters() / 1e6:.1f}M parameters")
    proj = mlkd.Projections(M, d_s, teacher.config.hidden_size, args.proj_init).to(args.device)
    return student, proj, lmap


# General TinyBERT (Jiao et al. 2020; the paper's student init) on the hub, by (layers, width)
TINYBERT = {(4, 312): "huawei-noah/TinyBERT_General_4L_312D",
            (6, 768): "huawei-noah/TinyBERT_General_6L_768D"}


def build_student(args, teacher):
    """The student per --student_init (see --help); its attention dropout is 0 (in Stage 2 and the
    saved student too), so one SDPA call gives both its forward and the paper's O = softmax(Q K^T /
    sqrt(d/h)) V that L_MHA reads. (The authors' student keeps attention dropout 0.1 and computes O
    by a second, undropped product: it is more regularised than ours.) A copied student takes its
    source's embeddings and layers g(1..M) of mlkd.layer_map (DistilBERT's init): from the teacher,
    its L_EMB starts at 0."""
    M, d_s, heads, ffn, _ = student_shape(args, teacher.config)
    overrides = dict(evaluation.head_config(args.task), attention_probs_dropout_prob=0.0,
                     num_attention_heads=heads)
    if args.student_init == "tinybert":  # check_shapes has refused a shape General TinyBERT lacks
        return Bert.from_pretrained(TINYBERT[M, d_s], verbose=LEAD, **overrides)
    if args.student_init == "random":
        shape = {"num_hidden_layers": M, "hidden_size": d_s,
                 "intermediate_size": ffn or teacher.config.intermediate_size}
        return Bert(BertConfig(**{**vars(teacher.config), **overrides, **shape}))
    from_teacher = args.student_init == "teacher-layers"
    source = teacher if from_teacher else Bert.from_pretrained(args.student_init, verbose=False)
    g = mlkd.layer_map(source.config.num_hidden_layers, M, args.layer_map)  # check_shapes: M <= N
    student = Bert(BertConfig(**{**vars(source.config), **overrides, "num_hidden_layers": M}))
    head = ("classifier.", "qa_outputs.")  # the source's head, of whatever task: not copied
    state = {k: v for k, v in source.state_dict().items() if not k.startswith(("layers.", *head))}
    missing = student.load_state_dict(state, strict=False).missing_keys  # embeddings, pooler
    assert all(k.startswith(("layers.", "classifier.", "qa_outputs.")) for k in missing), missing
    for m in range(1, M + 1):  # student layer m <- source layer g(m)
        student.layers[m - 1].load_state_dict(source.layers[g[m] - 1].state_dict())
    print(f"[student] layers {g[1:]} of {'the teacher' if from_teacher else args.student_init} "
          f"(and its embeddings) -> a {M}-layer student")
    return student


def stage2_start(stage1_dir, teacher, args):
    """Stage 2's student and projections: Stage 1's; for a baseline run without Stage 1 (KD on
    logits only, or gold labels), the student of --student_init and fresh projections."""
    if not is_done(stage1_dir):
        print(f"[stage2] no finished Stage 1 in {stage1_dir}: from --student_init")
        student, proj, _ = stage1_start(teacher, args)
        return student, proj
    same_settings("stage1", stage1_dir, args)
    student = Bert.from_pretrained(stage1_dir, verbose=False)
    c = student.config
    proj = mlkd.Projections(c.num_hidden_layers, c.hidden_size, teacher.config.hidden_size)
    proj.load_state_dict(read_safetensors(os.path.join(stage1_dir, "projections.safetensors")))
    return student.to(args.device), proj.to(args.device)


def teacher_cache(teacher, train, args):
    """Stage 2's teacher targets (logits, [CLS] state) of every training example, computed once:
    the teacher is frozen and in eval mode, so they are the same at every epoch. None (the teacher
    then runs on each batch) without a distillation loss, with --no_teacher_cache, or when
    --max_steps sees fewer rows than one pass."""
    n = len(train["input_ids"])
    if not any((args.w_kd, args.w_ss, args.w_sc)) or args.no_teacher_cache:
        return None
    if args.max_steps and args.max_steps * args.batch_size < n:
        print(f"[stage2] --max_steps {args.max_steps} sees fewer rows than the {n} sequences: no "
              "teacher cache, the teacher runs on each batch")
        return None
    t0 = time.time()
    logits, cls = evaluation.model_outputs(teacher, train, args.eval_batch_size, args.device)
    print(f"[stage2] teacher outputs of {n} sequences computed once in {time.time() - t0:.0f} s")
    return mlkd.LogitsAndCls(logits.to(args.device), cls.to(args.device))


# ----------------------------------------------------------------------------------------------
# The one training loop


def fit(stage, directory, modules, loss_fn, train, args, epochs, lr, warmup, evaluate=None,
        keep_best=False):
    """Train `modules` (the first is the model) on loss_fn(model, batch) by AdamW at lr x lr_factor;
    evaluate(model) every --eval_steps and epoch (keep_best: save the best); resumable checkpoints.
    Returns (the last log record, the best evaluation: None without keep_best)."""
    model, per_epoch = modules[0], math.ceil(len(train["input_ids"]) / args.batch_size)
    planned = max(1, math.ceil(epochs * per_epoch))
    total = min(planned, args.max_steps or planned)
    optimizer = adamw(modules, lr, args)
    step, best, (trained, seen) = resume(stage, directory, modules, optimizer, total, args)
    print(f"[{stage}] {len(train['input_ids'])} sequences, batch {args.batch_size}"
          f", {total} steps ({total / per_epoch:.3g} epochs{', capped by --max_steps' * (total < planned)})"
          f", lr {lr:g}, " + ("constant" if warmup is None else f"warm-up {warmup:g} then linear decay"))
    log = open(os.path.join(directory, "log.jsonl") if LEAD else os.devnull, "a" if step else "w")
    t0, record = time.time() - trained, {"stage": stage}  # t0: training time alone, across resumes
    wall0, step0 = time.time(), step  # the ETA: this run's wall clock, evaluations included
    forward = torch.compile(model) if args.compile else model
    for epoch, batch in training_batches(train, args, step, per_epoch, total):
        lr_now = lr * lr_factor(step, warmup, total)
        losses = train_step(forward, batch, loss_fn, optimizer, lr_now, stage, step, args)
        step, seen = step + 1, seen + len(batch["index"])  # samples/s: every process's rows
        if step % args.log_steps == 0 or step == total:
            took = time.time() - t0
            record = {"stage": stage, "epoch": epoch + 1, "step": step, "total": total, **losses,
                      "lr": lr_now, "samples_per_s": seen / took, "train_s": took}
            print(json.dumps(record), file=log, flush=True)
            print(f"[{stage}] epoch {epoch + 1} step {step}/{total} | " + evaluation.format_metrics(
                losses, 4) + f" | lr {lr_now:.2e} | {seen / took:.1f} samples/s | ETA "
                f"{(total - step) * (time.time() - wall0) / (step - step0) / 60:.1f} min", flush=True)
        improved = False
        if evaluate and LEAD and (step % per_epoch == 0 or step == total
                                  or (args.eval_steps and step % args.eval_steps == 0)):
            started = time.time()
            metrics = evaluate(model)
            took = time.time() - started
            t0 += took  # samples/s counts training time alone
            improved = keep_best and (best is None or metrics[args.metric] > best[args.metric])
            print(json.dumps({"stage": stage, "step": step, "dev": metrics, "eval_s": took}),
                  file=log, flush=True)
            print(f"[{stage}] {'dev' if keep_best else 'held-out'} at step {step} ({took:.0f} s): "
                  + evaluation.format_metrics(metrics, 2 if keep_best else 4)
                  + "  (best so far: saved)" * improved)
            if improved:
                best = metrics
                save_model(model, directory, args)
        # a checkpoint at a new best too: a resume never goes on from an older best than the model's
        if (improved or step % args.save_steps == 0) and step < total and LEAD:
            save_checkpoint(directory, modules, optimizer, step, best, [time.time() - t0, seen])
    log.close()
    return record, best


def adamw(modules, lr, args):
    """AdamW over the trainable parameters of `modules`, with --weight_decay on the weight matrices
    and none on the biases and LayerNorm weights (BERT's recipe). torch's AdamW, bias-corrected, eps
    1e-8; the authors' BertAdam (TinyBERT's) has no bias correction, eps 1e-6, and clips each tensor
    to norm 1 where train_step clips all of them together."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=True)


def train_step(model, batch, loss_fn, optimizer, lr, stage, step, args):
    """One AdamW step at `lr` on one batch, its gradient clipped to norm 1 (BERT's); returns its
    losses. Under torchrun: this process's share of the batch, then the mean of the processes'
    gradients."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    weight, rows = 1.0, batch["index"]  # rows: the global batch's, for an error message
    if dist.is_initialized():  # data-parallel: this process's rows and its share of the loss
        # Stage 1 and general_distill.py's "general" average over tokens (--paper_exact: over rows)
        stage1_share = "rows" if args.paper_exact else "tokens"
        share = {"teacher": "rows", "stage2": "all"}.get(stage, stage1_share)
        batch, weight = shard(batch, share)
    batch = {k: v.to(args.device) for k, v in batch.items()}
    model.train()  # dropout: this step's own seed, so a resumed run (any process) draws the same
    torch.manual_seed(zlib.crc32(f"{args.seed} {stage} {step} {RANK}".encode()))
    with torch.autocast("cuda", torch.bfloat16, enabled=args.device.startswith("cuda")):
        loss, parts = loss_fn(model, batch)
    losses = {k: float(v.detach()) for k, v in parts.items()}
    if dist.is_initialized():  # the global batch's losses: the sum of the processes' shares
        shares = torch.tensor([v * weight / dist.get_world_size() for v in losses.values()],
                              device=args.device)
        dist.all_reduce(shares)
        losses = dict(zip(losses, shares.tolist()))
    if not all(map(math.isfinite, losses.values())):  # under torchrun the sums: every process stops
        raise FloatingPointError(f"[{stage}] non-finite loss at step {step + 1}: {losses}, "
                                 f"batch rows {rows.tolist()}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    (loss * weight).backward()
    if dist.is_initialized():  # the mean of the processes' gradients
        for p in (p for p in params if p.grad is not None):  # Stage 1 leaves the head unused
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return losses


def lr_factor(step, warmup, total):
    """The lr of step `step` (from 0) over the base lr: 1 at a constant lr (warmup None), else a
    linear warm-up over the first warmup x total steps, then a linear decay to 0 at `total`."""
    if warmup is None:
        return 1.0
    warm = int(warmup * total)
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


def training_batches(train, args, step, per_epoch, total):
    """(epoch, batch) from step `step` until `total`: each epoch shuffled by a seed of its own,
    so a resumed run sees the same batches in the same order (length-grouped ones too). A batch:
    input_ids, token_type_ids, attention_mask (B, L), L its longest row (--paper_exact: max_len;
    --compile: one of a few widths); labels (B,) (SQuAD: (B, 2), start and end); index (B,), its
    rows of `train` (the teacher cache's). --group_by_length sorts runs of 100 batches by length.
    An epoch's last batch may be short: kept (--paper_exact too), where the authors' task_distill.py
    skips it."""
    while step < total:
        epoch = step // per_epoch
        for batch in data.batches(train, args.batch_size, shuffle=True, start=step % per_epoch,
                                  generator=torch.Generator().manual_seed(args.seed + epoch),
                                  fixed_padding=args.paper_exact, buckets=args.compile,
                                  group_by_length=100 * args.group_by_length):
            yield epoch, batch
            step += 1
            if step >= total:
                return


# ----------------------------------------------------------------------------------------------
# Machinery: the flags and their checks; the teacher and the task's data; a stage's directory
# (settings, resume, the log); torchrun. (The eval stage's report: eval.py.)


def number(text):
    """The type of the float flags that may be 0 (weights, warm-up): a finite number >= 0."""
    if not 0 <= float(text) < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return float(text)


def positive(text):
    """The type of the learning rates, epoch counts and temperatures: a finite number > 0."""
    if not 0 < float(text) < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return float(text)


def count(text):
    """The type of the integer flags but --seed: a whole number >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return int(text)


def layer_spec(text):
    """The type of --layer_map: uniform, last, or the teacher layer of each student layer."""
    if text in ("uniform", "last"):
        return text
    g = [int(x) if x.isdigit() else -1 for x in text.split(",")]
    if g[0] < 0 or any(x < 1 for x in g[1:]):
        raise argparse.ArgumentTypeError(f"{text}: use uniform, last or teacher layers 3,6,9,12 "
                                         "(they count from 1; a leading 0: the embeddings)")
    return g


def path(text):
    """The type of the file flags: absolute (args.json then holds from any folder)."""
    if not text:  # "" would be the working directory
        raise argparse.ArgumentTypeError("must name a file or folder, got ''")
    return os.path.abspath(text)


STUDENT_INITS = ("tinybert", "teacher-layers", "random")  # --student_init's names; else a DIR


def hub_or_dir(text):
    """The type of --teacher_init and --student_init: a directory, made absolute (as path); else
    the name as given: a hub name, or one of STUDENT_INITS (a folder of that name in the working
    directory is ./random)."""
    return path(text) if os.path.exists(text) and text not in STUDENT_INITS else text


def paths(text):
    """The type of the list flags (--train_file; general_distill.py's --corpus): FILE,FILE..."""
    return ",".join(path(f.strip()) for f in text.split(","))  # "A, B" too


# The flags as --help groups them: (name, type, default, help); a bool flag is a switch, a list
# gives the choices, None defaults come from RECIPES or parse_args. A group's header names the stages
# whose results its flags change: a rerun into a stage's directory with other values is refused.
FLAGS = [
    ("task and data", "teacher stage1 stage2"),
    ("task", list(RECIPES), None, "a GLUE task or a SQuAD version (required)"),
    ("batch_size", count, None, "default 32 (16 for SQuAD); under torchrun the global batch"),
    ("max_len", count, None, "word pieces per example (default: the task's)"),
    ("train_file", paths, None, "SQuAD training JSON(s), comma-separated (default: in data_dir)"),
    ("train_subset", count, None, "train on this many examples, the same for every --seed"),
    ("max_steps", count, None, "cap the steps of every stage (quick runs)"),
    ("seed", int, 42, "seeds each stage's init and dropout (with its name) and batch order"),
    ("weight_decay", number, 0.01, "AdamW weight decay (not on biases and LayerNorm weights)"),
    ("paper_exact", bool, False, "as the authors ran: batches padded to max_len, losses unmasked"),
    ("group_by_length", bool, False, "batches of similar lengths (runs of 100 sorted): less "
     "padding, the same masked losses; L_SS and L_SC then relate samples of similar length"),
    ("compile", bool, False, "torch.compile the trained model; batches padded to a few widths "
     "(its dropout masks are drawn otherwise: a result of its own)"),
    ("the teacher", "teacher stage1 stage2"),
    ("teacher", path, None, "directory of a fine-tuned teacher: skips the teacher stage"),
    ("teacher_init", hub_or_dir, "google-bert/bert-base-uncased", "pre-trained: hub name or DIR"),
    ("teacher_epochs", positive, None, "teacher epochs"),
    ("teacher_lr", positive, None, "teacher learning rate"),
    ("schedule and model selection", "teacher stage2"),
    ("warmup", number, 0.1, "warm-up fraction of the steps (teacher, Stage 2)"),
    ("eval_steps", count, None, "evaluate on dev every N steps too (always: each epoch's end)"),
    ("dev_file", path, None, "SQuAD dev JSON (default: <data_dir>/squad/dev-v1.1.json or v2.0)"),
    ("the student and Stage 1", "stage1 stage2"),
    ("student_init", hub_or_dir, "tinybert", "tinybert: General TinyBERT (the paper's); "
     "teacher-layers: the teacher's embeddings and layers g(1..M) (DistilBERT's init); DIR: the "
     "same from a model directory (tools/general_distill.py makes one of any shape); random"),
    ("layers", count, None, "student layers M (default: 4 for tinybert, else DIR's or N/2)"),
    ("hidden", count, None, "student width (default: 312 for tinybert, else the copied model's or, "
     "random, the teacher's)"),
    ("heads", count, None, "student attention heads (any divisor of the width)"),
    ("ffn", count, None, "student FFN width"),
    ("recipe", ["mlkd", "tinybert"], "mlkd", "tinybert: TinyBERT's task distillation, the "
     "paper's baseline (Stage 1: MSE of attention scores and hidden states, not weighted by "
     "--w_emb/--w_mha/--w_ffn; Stage 2: L_KD)"),
    ("layer_map", layer_spec, "uniform", "uniform, last, or the teacher layer of each student layer: 3,6,9,12"),
    ("splits", count, 12, "MHA-splits A for L_MHA (must divide both widths)"),
    ("proj_init", ["normal", "identity"], "normal", "W_m init: N(0, 0.02) (the authors') or identity"),
    *((f"w_{w}", number, 1.0, f"weight of L_{w.upper()} (0 switches it off)") for w in ("emb", "mha", "ffn")),
    ("mha_temperature", positive, 1.0, "L_MHA relation temperature; not 1 is NOT the paper's "
     "method"),
    ("epochs1", positive, None, "Stage-1 epochs"),
    ("lr1", positive, None, "Stage-1 learning rate (default 5e-5; 3e-5 for SQuAD)"),
    ("Stage 2", "stage2"),
    ("w_kd", number, 1.0, "weight of L_KD (0 switches it off)"),
    *((f"w_{w}", number, None, f"weight of L_{w.upper()} (default 1, 0 switches it off; SQuAD's and "
       "--recipe tinybert's Stage 2 is L_KD alone: 0)") for w in ("ss", "sc")),
    ("w_ce", number, 0.0, "weight of the gold-label loss in Stage 2 (0 in MLKD; a baseline's)"),
    ("temperature", positive, 1.0, "L_KD temperature"),
    ("tau", positive, 0.07, "L_SC temperature"),
    ("epochs2", positive, None, "Stage-2 epochs"),
    ("lr2", positive, None, "Stage-2 learning rate (default 5e-5; 3e-5 for SQuAD)"),
    ("running (changes no result but its float rounding)", ""),
    ("data_dir", path, os.environ.get("MLKD_DATA", "data"),
     "holds glue/<TASK>/*.tsv and squad/*.json; missing files are downloaded there"),
    ("out", path, None, "output directory (default: out/<task>)"),
    ("stages", str, None, "comma-separated subset of " + ",".join(STAGES) + " (default: all)"),
    ("allow_partial", bool, False, "score a dev file with fewer or more rows than the official"),
    ("save_steps", count, 200, "write a resumable checkpoint every N steps"),
    ("log_steps", count, 50, "progress line every N steps"),
    ("eval_batch_size", count, 128, "batch size of evaluation and of the teacher cache"),
    ("device", evaluation.device, "cuda" if torch.cuda.is_available() else "cpu", "cpu, cuda, cuda:N"),
    ("no_teacher_cache", bool, False, "run the teacher on every Stage-2 step, not once per example"),
]


def say_error(message):
    """`error: message` on stderr, once. Under torchrun every process meets the same error as a
    rule, and process 0 says it; the others wait first: torchrun stops every process once one has
    left (it would stop process 0 before it printed), and so a process still here after the wait
    met an error of its own, and says it."""
    if not LEAD:
        time.sleep(5)
    print(f"error: {message}", file=sys.stderr, flush=True)


def refuse(message):
    """A flag error: one line on stderr (argparse's usage block is in --help), exit status 2."""
    say_error(message)
    sys.exit(2)


def make_parser(flags, description):
    """The argparse parser of a flag table such as FLAGS (tools/general_distill.py has its own)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = refuse
    for flag in flags:
        if len(flag) == 2:  # a group: (title, the stages its flags change)
            group = p.add_argument_group(flag[0], f"changes: {flag[1] or 'nothing'}")
        elif flag[1] is bool:
            group.add_argument(f"--{flag[0]}", action="store_true", help=flag[3])
        else:
            name, kind, default, text = flag
            choices = kind if isinstance(kind, list) else None
            text += f" (default: {default})" * (default is not None)  # None: said in the text
            group.add_argument(f"--{name}", type=str if choices else kind, default=default,
                               choices=choices, help=text, required=name == "task")
    return p


def parse_args(argv=None):
    p = make_parser(FLAGS, __doc__)
    p.epilog = "per-task defaults (the authors' scripts):\n" + "\n".join(
        f"  {task}: " + ", ".join(f"{k} {v:g}" for k, v in r.items())
        for task, r in RECIPES.items())
    args = p.parse_args(argv)
    for name, value in RECIPES[args.task].items():  # the task's defaults, where not given
        if getattr(args, name) is None:  # as floats, as --epochs1 15 parses (args.json compares)
            setattr(args, name, float(value))
    squad = args.task.startswith("squad")
    args.max_len = args.max_len or (384 if squad else data.TASKS[args.task].max_len)
    kd_alone = squad or args.recipe == "tinybert"  # Stage 2: TinyBERT's, the authors' SQuAD's
    if kd_alone and (args.w_ss or args.w_sc):
        refuse(f"--w_ss/--w_sc: {'--recipe tinybert' if args.recipe == 'tinybert' else args.task}"
               "'s Stage 2 is L_KD alone; leave them out")
    for name in ("w_ss", "w_sc"):  # not given: 1, or 0 where Stage 2 is L_KD alone
        if getattr(args, name) is None:
            setattr(args, name, 0.0 if kd_alone else 1.0)
    args.metric = "f1" if squad else "acc_m" if args.task == "mnli" else data.TASKS[args.task].metric
    args.batch_size = args.batch_size or (16 if squad else 32)
    lr = 3e-5 if squad else 5e-5  # Stage 1 and 2's (and batch 16 or 32): see above RECIPES
    args.lr1, args.lr2 = args.lr1 or lr, args.lr2 or lr
    args.out = args.out or path(os.path.join("out", args.task))
    args.stages = (",".join(STAGES) if args.stages is None else args.stages).split(",")
    if args.group_by_length and args.paper_exact:
        if LEAD:  # under torchrun, process 0 alone says it
            print("--group_by_length is ignored with --paper_exact: every batch is padded to "
                  "--max_len")
        args.group_by_length = False
    check_flags(args)
    return args


def check_flags(args):
    """Refuse, before any work, the flags that cannot work: one line naming the flag."""
    if args.warmup >= 1:
        refuse(f"--warmup must be a fraction in [0, 1), got {args.warmup}")
    if set(args.stages) - set(STAGES):  # "" too (--stages teacher,)
        refuse(f"--stages {','.join(args.stages)}: choose from {','.join(STAGES)}")
    if not any((args.w_kd, args.w_ss, args.w_sc, args.w_ce)):
        refuse("Stage 2 needs one of --w_kd --w_ss --w_sc --w_ce > 0")
    if args.recipe == "mlkd" and not any((args.w_emb, args.w_mha, args.w_ffn)):
        refuse("Stage 1 needs one of --w_emb --w_mha --w_ffn > 0")
    if args.recipe == "tinybert" and (args.splits, args.mha_temperature) != (12, 1.0):
        refuse("--splits and --mha_temperature shape MLKD's L_MHA, which --recipe tinybert has not")
    if not 0 <= args.seed < 2**32:
        refuse(f"--seed {args.seed}: use a whole number from 0 to 2**32 - 1")
    if (args.train_file or args.dev_file) and not args.task.startswith("squad"):
        refuse(f"--train_file and --dev_file are SQuAD's; {args.task} reads "
               f"{args.data_dir}/glue/{data.TASKS[args.task].folder}/")
    pairs = data.is_pair(args.task)
    if not (5 if pairs else 3) <= args.max_len <= 512:  # [CLS] a [SEP] (b [SEP]) at least
        refuse(f"--max_len {args.max_len}: {args.task} needs {5 if pairs else 3} to 512 positions "
               f"(one word piece of {'each text' if pairs else 'text'} and the special tokens)")
    if args.teacher and not os.path.isdir(args.teacher):
        refuse(f"--teacher {args.teacher}: no such directory")
    if args.student_init not in STUDENT_INITS and not os.path.isdir(args.student_init):
        refuse(f"--student_init {args.student_init}: not tinybert/teacher-layers/random nor a "
               "directory")
    for flag, model in (("--teacher", args.teacher), ("--student_init", args.student_init)):
        if model and os.path.exists(os.path.join(model, "log.jsonl")) and not is_done(model):
            refuse(f"{flag} {model}: a stage that has not finished (its log.jsonl, no "
                   "metrics.json): rerun its command to finish it first")
    if (args.w_ss or args.w_sc) and "stage2" in args.stages and args.batch_size < 2:
        refuse("--batch_size 1: L_SS and L_SC relate the samples of a batch and are 0 with one "
               "sample; use --batch_size 2 or more, or --w_ss 0 --w_sc 0")
    check_out(args.out)


def check_out(out):
    """Refuse an --out that is a file, or that would be made in a folder we may not write."""
    if os.path.isfile(out):
        refuse(f"--out {out}: a file, not a folder")
    parent = out  # the existing folder --out will be made in
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        refuse(f"--out {out}: {parent} is not writable; choose an --out you can write to")


def student_shape(args, teacher):
    """The student's (layers M, width, heads, FFN width) per --student_init and the flags, and the
    layer count N of the model it copies layers from (None: it copies none)."""
    if args.student_init == "tinybert":  # General TinyBERT has 12 heads
        return args.layers or 4, args.hidden or 312, args.heads or 12, None, None
    if args.student_init == "random":
        return (args.layers or max(1, teacher.num_hidden_layers // 2), args.hidden or
                teacher.hidden_size, args.heads or teacher.num_attention_heads, args.ffn, None)
    source = teacher if args.student_init == "teacher-layers" else BertConfig.from_json(
        os.path.join(args.student_init, "config.json"))
    N = source.num_hidden_layers
    return (args.layers or (max(1, N // 2) if source is teacher else N), source.hidden_size,
            args.heads or source.num_attention_heads, source.intermediate_size, N)


def check_shapes(args, teacher):
    """Refuse, before any training, the shapes a later stage would refuse. teacher: its config."""
    N, d_t, h_t = teacher.num_hidden_layers, teacher.hidden_size, teacher.num_attention_heads
    M, d_s, h_s, ffn, copied = student_shape(args, teacher)  # copied: None, or its source's N
    if copied and M > copied:
        raise ValueError(f"--layers {M}: cannot take {M} layers from a model that has {copied}")
    distils = any(s in args.stages for s in ("stage1", "general"))  # general: general_distill.py
    for flag, want, have in (("--hidden", args.hidden, d_s), ("--ffn", args.ffn, ffn)):
        if copied and want is not None and want != have:
            raise ValueError(f"{flag} {want}: --student_init {args.student_init} copies weights "
                             f"{have} wide; use --student_init random for another width")
    if d_s % h_s:
        whose = "--heads" if args.heads else f"--student_init {args.student_init}'s head count"
        raise ValueError(f"{whose} {h_s} does not divide the student's width {d_s}; choose a "
                         f"divisor of {d_s}")
    if distils and args.w_mha and args.recipe == "mlkd" and (d_s % args.splits or d_t % args.splits):
        raise ValueError(f"--splits {args.splits} must divide the student's width {d_s} and the "
                         f"teacher's {d_t}")
    if distils and args.recipe == "tinybert" and h_s != h_t:
        raise ValueError(f"--recipe tinybert matches heads one to one: give the student --heads {h_t}")
    if args.max_len > teacher.max_position_embeddings:
        raise ValueError(f"--max_len {args.max_len}: the teacher has "
                         f"{teacher.max_position_embeddings} positions")
    if args.student_init == "tinybert" and args.ffn:
        raise ValueError(f"--ffn {args.ffn}: General TinyBERT's FFN width is its own (1200 at 312 "
                         "wide, 3072 at 768); use --student_init random for another")
    if args.student_init == "tinybert" and (M, d_s) not in TINYBERT:
        raise ValueError(f"--layers {M} --hidden {d_s}: no General TinyBERT of that shape (have 4 x "
                         "312, 6 x 768); use --student_init teacher-layers, random or a directory")
    if args.proj_init == "identity" and d_s != d_t:  # Stage 1's W_m, or a baseline's
        raise ValueError(f"--proj_init identity needs the student as wide as the teacher ({d_s} vs "
                         f"{d_t}); use --proj_init normal")
    try:  # Stage 1's map, and a baseline's student is built by it too
        mlkd.layer_map(N, M, args.layer_map)
    except ValueError as e:
        raise ValueError(f"--layer_map: {e}") from None
    if copied and copied != N and isinstance(args.layer_map, list):  # build_student copies g(1..M)
        raise ValueError(f"--layer_map: a list of teacher layers (of {N}) also picks the layers "
                         f"copied from --student_init {args.student_init}, which has {copied}; "
                         "use uniform or last")


def save_model(model, directory, args, proj=None):
    """The model in HF's layout, its vocabulary, the settings it was trained with (eval.py reads
    max_len and data_dir from them) and a student's projections W_0..W_M (Stage 2 starts from them)."""
    if LEAD and proj is not None:
        write_safetensors(proj.state_dict(), os.path.join(directory, "projections.safetensors"))
    if LEAD:
        vocab = data.read_text(args.vocab)
        tokenizer = {"tokenizer_class": "BertTokenizer",  # as data.Tokenizer reads this vocabulary
                     "do_lower_case": data.uncased(vocab.splitlines()),
                     "model_max_length": args.max_len}  # an HF pipeline then cuts where we trained
        model.save(directory, {"vocab.txt": vocab,
                               "tokenizer_config.json": json.dumps(tokenizer, indent=2),
                               "args.json": json.dumps(vars(args), indent=2, default=str)})


def fetch_models(args, teacher):
    """Before any stage: the directory of the teacher (a hub name or DIR; args.vocab is its
    vocabulary), the shapes checked against its config, and General TinyBERT's files for a student
    still to build, each downloaded where missing. Under torchrun: in main_process_first()."""
    source = fetch(teacher)
    args.vocab = os.path.join(source, "vocab.txt")
    config, student = BertConfig.from_json(os.path.join(source, "config.json")), None
    if len(data.read_text(args.vocab).splitlines()) > config.vocab_size:  # ids past its embeddings
        raise ValueError(f"{args.vocab}: more word pieces than the vocab_size {config.vocab_size} "
                         f"of {source}/config.json: not the model's vocabulary")
    if os.path.isdir(args.student_init):  # its files: there, the teacher's word pieces, positions
        student = BertConfig.from_json(os.path.join(fetch(args.student_init), "config.json"))
        vocab = os.path.join(args.student_init, "vocab.txt")
        if student.vocab_size != config.vocab_size or os.path.exists(vocab) and \
                data.read_text(vocab) != data.read_text(args.vocab):
            raise ValueError(f"--student_init {args.student_init}: its vocabulary is not the "
                             f"teacher's ({args.vocab}), whose word pieces it would read")
        if args.max_len > student.max_position_embeddings:
            raise ValueError(f"--max_len {args.max_len}: --student_init {args.student_init} has "
                             f"{student.max_position_embeddings} positions")
    for name, c in (("the teacher", config), ("--student_init", student)):
        if data.is_pair(args.task) and c and c.type_vocab_size < 2:  # segment ids 0 and 1
            raise ValueError(f"{name}: {c.type_vocab_size} segment embedding, and {args.task}'s "
                             "pairs need 2; choose a BERT with type_vocab_size 2")
    check_shapes(args, config)
    builds = {"stage1", "stage2", "general"} & set(args.stages)  # general: general_distill.py's
    if args.student_init == "tinybert" and builds and not is_done(os.path.join(args.out, "stage1")):
        fetch(TINYBERT[student_shape(args, config)[:2]])  # (a finished Stage 1: Stage 2's student)
    return source


def load_teacher(directory, args):
    """A fine-tuned teacher, frozen and in eval mode: its targets carry no dropout (the authors'
    task_distill.py never calls teacher.eval(), so theirs did). Its head must be the task's (a
    pre-trained model has none) and a student's (Stage 1's is untrained). Without --teacher it is
    the teacher stage's, which must have finished."""
    if not args.teacher and not is_done(directory):
        raise ValueError(f"no finished teacher in {directory}: run its stage first")
    if os.path.exists(os.path.join(directory, "projections.safetensors")):  # save_model's
        raise ValueError(f"--teacher {directory}: a distilled student (it has projections W_m), "
                         "not a teacher; pass a fine-tuned one, such as <out>/teacher")
    teacher = Bert.from_pretrained(directory, verbose=False)
    why = evaluation.head_mismatch(teacher, args.task)
    if why:
        raise ValueError(f"--teacher {directory}: {why}; it is not a teacher fine-tuned on "
                         f"{args.task}. To fine-tune one from it, pass --teacher_init {directory}")
    return teacher.to(args.device).eval().requires_grad_(False)


def load_task(args, tok):
    """Tokenised training rows (tokenised once) and evaluate(model) -> {metric: value} on dev; sets
    args.data_crc32 and args.dev_crc32 (the teacher and Stage 2 select on dev), of what was read."""
    if args.task.startswith("squad"):
        version = evaluation.squad_version(args.task)
        default = os.path.join(args.data_dir, "squad", "{}-v" + version + ".json")
        files = (args.train_file or default.format("train")).split(",")
        examples = [e for f in files for e in data.read_squad(f, version=version)]
        examples = train_subset(args.train_subset, examples)
        rows = data.squad_features(examples, tok, max_len=args.max_len)
        train = {k: rows[k] for k in ("input_ids", "token_type_ids", "lengths", "labels")}
        print(f"[data] {len(examples)} training questions: {len(rows['lengths'])} windows, the "
              "sequences the stages train on")
        dev_examples = data.read_squad(args.dev_file or default.format("dev"), args.allow_partial,
                                       version)
        dev = data.squad_features(dev_examples, tok, max_len=args.max_len, train=False)
        evaluate = functools.partial(squad_dev, examples=dev_examples, features=dev,
                                     version=version, args=args)
    else:
        examples = data.read_glue(args.task, "train", args.data_dir)
        examples = train_subset(args.train_subset, examples)
        train = data.encode_glue(args.task, examples, tok, args.max_len)
        dev_examples = {s: data.read_glue(args.task, s, args.data_dir, args.allow_partial)
                        for s in data.TASKS[args.task].dev_splits}
        dev = {s: data.encode_glue(args.task, e, tok, args.max_len)
               for s, e in dev_examples.items()}
        evaluate = functools.partial(evaluation.evaluate_glue, task=args.task, dev_sets=dev,
                                     batch_size=args.eval_batch_size, device=args.device,
                                     fixed_padding=args.paper_exact)
    args.data_crc32 = crc32(train)  # in each stage's args.json: same_settings compares them
    args.dev_crc32 = f"{zlib.crc32(repr(dev_examples).encode()):08x}"  # texts and gold labels
    return train, evaluate


def crc32(tensors):
    """The CRC-32 of a dict of tensors (training rows, a state dict), as 8 hex digits: a training
    file rewritten under the same flags (a fixed or augmented train.tsv) changes it, and so does
    a teacher fine-tuned anew."""
    crc = 0
    for k in sorted(tensors):
        crc = zlib.crc32(tensors[k].cpu().contiguous().numpy(), crc)  # its bytes, read in place
    return f"{crc:08x}"


def squad_dev(model, examples, features, version, args):
    """SQuAD dev metrics (EM, F1) of a model."""
    return evaluation.evaluate_squad(model, examples, features, version, args.eval_batch_size,
                                     args.device)[0]


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


def begin(stage, directory, args, flags=FLAGS):
    """True when `stage` runs now: it is in --stages and not finished. Its directory then holds the
    settings it runs with (args.json), and the stage draws its initialisation from the generator
    seeded by --seed and its name (its dropout: train_step): the same command gives the same
    weights whether the stages before it ran in this process or an earlier one (bit for bit where
    the kernels round alike from run to run: on a CPU, under OMP_NUM_THREADS=1)."""
    if stage not in args.stages:
        return False
    same_settings(stage, directory, args, flags)
    if is_done(directory):
        print(f"[{stage}] {directory} is finished: skipped")
        if LEAD:  # what a kill inside finish (or an atomic write) left there
            data.remove_stale_temporaries(directory)
            if os.path.exists(os.path.join(directory, "checkpoint.pt")):
                os.remove(os.path.join(directory, "checkpoint.pt"))
        return False
    if LEAD:  # the atomic write makes the directory
        data.atomic_write_text(os.path.join(directory, "args.json"),
                               json.dumps(vars(args), indent=2, default=str))
    if dist.is_initialized():  # the other processes wait for process 0's directory
        dist.barrier()
    torch.manual_seed(zlib.crc32(f"{args.seed} {stage}".encode()))
    if args.device.startswith("cuda"):  # finish says the stage's own peak
        torch.cuda.reset_peak_memory_stats()
    return True


def check_directories(out, args):
    """Refuse now what would be refused later, once other stages have trained: a stage directory
    that a stage of --stages runs or reads, run with other settings (the teacher's CRC-32 is
    compared when a stage begins), and the eval stage without a finished student."""
    from_stage1 = "stage1" in args.stages or is_done(out["stage1"])  # where Stage 2 will start
    now = argparse.Namespace(**vars(args), from_stage1=from_stage1)
    for stage, used_by in (("teacher", "" if args.teacher else "teacher"),
                           ("stage1", "stage1 stage2"), ("stage2", "stage2 eval")):
        if set(used_by.split()) & set(args.stages):
            same_settings(stage, out[stage], now)
    if "eval" in args.stages and "stage2" not in args.stages and not is_done(out["stage2"]):
        raise ValueError(f"no finished student in {out['stage2']}: run stage2 first")


def same_settings(stage, directory, args, flags=FLAGS):
    """Refuse a stage directory whose work (metrics.json or checkpoint.pt) was done with other
    values of the flags that change the stage (those under the groups of `flags` that name it; with
    --teacher, not the --teacher_* flags of the fine-tuning it skips), on other training data or
    (the teacher and Stage 2, which select on it) other dev data, from another teacher (Stage 1 and
    2) or another start (Stage 2: Stage 1's student, or a baseline's --student_init)."""
    saved = os.path.join(directory, "args.json")
    now = json.loads(json.dumps(vars(args), default=str))
    if not os.path.exists(saved) or not any(os.path.exists(os.path.join(directory, f))
                                           for f in ("metrics.json", "checkpoint.pt")):
        return  # a stage stopped before its first checkpoint kept nothing
    was, stages, differ = data.read_json(saved), "", []
    for flag in flags:
        stages = flag[1].split() if len(flag) == 2 else stages  # a group header names its stages
        unused = now.get("teacher") and flag[0].startswith("teacher_")  # no fine-tuning to change
        if len(flag) == 4 and stage in stages and not unused \
                and was.get(flag[0], now[flag[0]]) != now[flag[0]]:
            differ.append(f"--{flag[0]} {was[flag[0]]} (now {now[flag[0]]})")
    for key, what in (("data_crc32", "training data CRC-32"), ("teacher_crc32", "teacher CRC-32"),
                      ("student_crc32", "--student_init CRC-32"), ("from_stage1", "from Stage 1"),
                      ("dev_crc32", "dev data CRC-32")):  # set by pipeline, load_task (not always)
        if key == "dev_crc32" and stage == "stage1":  # the one stage that selects nothing on dev
            continue
        if key in now and was.get(key, now[key]) != now[key]:
            differ.append(f"{what} {was[key]} (now {now[key]})")
    if differ:
        raise ValueError(f"{directory} was run with other settings: {', '.join(differ)}. Rerun with "
                         "those to resume or reuse it, or pass a new --out")


def finish(directory, metrics, args):
    """Mark a stage finished: say and log its peak memory (CUDA allocated in the stage, from begin;
    on a CPU the process's peak resident set so far, which no call resets: ru_maxrss, in KiB on
    Linux and in bytes (B) on macOS), write
    metrics.json (with done), drop the checkpoint."""
    cuda, record = args.device.startswith("cuda"), metrics["train"]
    record["peak_memory_gib"] = (torch.cuda.max_memory_allocated() if cuda else
                                 resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                 * (1 if sys.platform == "darwin" else 1024)) / 2**30  # macOS: B
    print(f"[{record['stage']}] done: {record.get('samples_per_s', 0):.1f} samples/s, peak memory "
          f"{record['peak_memory_gib']:.2f} GiB ("
          + ("CUDA allocated in the stage)" if cuda else "the process's peak RSS so far)"))
    if LEAD:
        with open(os.path.join(directory, "log.jsonl"), "a") as log:
            print(json.dumps({"stage": record["stage"], "done": True,
                              "peak_memory_gib": record["peak_memory_gib"]}), file=log)
        data.atomic_write_text(os.path.join(directory, "metrics.json"),
                               json.dumps({**metrics, "done": True}, indent=2))
        if os.path.exists(os.path.join(directory, "checkpoint.pt")):
            os.remove(os.path.join(directory, "checkpoint.pt"))
    if dist.is_initialized():  # no process starts the next stage before this one is marked done
        dist.barrier()


def is_done(directory):
    metrics = os.path.join(directory, "metrics.json")
    return os.path.exists(metrics) and data.read_json(metrics).get("done", False)


def resume(stage, directory, modules, optimizer, total, args):
    """Load checkpoint.pt when there is one (weights, optimizer, step) and cut the log back to
    it; returns (step, best dev metrics, [seconds trained, rows seen]), (0, None, [0, 0]) for a
    fresh start: train_s and samples/s count the time and rows before a resume too. A checkpoint
    at or past `total`, the run's last step, is refused."""
    ckpt, log = os.path.join(directory, "checkpoint.pt"), os.path.join(directory, "log.jsonl")
    if LEAD:
        data.remove_stale_temporaries(directory)  # a write killed by SIGKILL leaves one behind
    if not os.path.exists(ckpt):  # a fresh start: fit writes log.jsonl anew
        return 0, None, [0.0, 0]
    try:
        state = torch.load(ckpt, map_location=args.device, weights_only=True)
    except Exception as e:  # empty, truncated or not a checkpoint at all
        why = (str(e) or type(e).__name__).splitlines()[0][:80]
        raise ValueError(f"{ckpt}: not a readable checkpoint ({why}); delete it to start {stage} "
                         "over") from None
    if state["step"] >= total:  # past the end of this run's plan: not the same training data
        raise ValueError(f"{ckpt} is at step {state['step']}, but this run has {total} steps: its "
                         "training data changed? Delete the checkpoint or pass a new --out")
    for m, s in zip(modules, state["modules"]):
        m.load_state_dict(s)
    optimizer.load_state_dict(state["optimizer"])
    print(f"[{stage}] resumed from {ckpt} at step {state['step']}")
    try:  # the log goes on from the checkpoint: no step twice; a line cut short (a kill mid-write)
        kept = [r for r in data.read_text(log).splitlines(keepends=True)  # is dropped
                if r.endswith("\n") and json.loads(r).get("step", math.inf) <= state["step"]]
    except (json.JSONDecodeError, AttributeError):  # edited by hand: not JSON, or no object
        raise ValueError(f"{log}: a line is no JSON object; repair or delete it") from None
    if LEAD:  # (every process reads it: under torchrun they all stop on a bad line)
        data.atomic_write_text(log, "".join(kept))
    return state["step"], state["best_metrics"], state.get("clock", [0.0, 0])


def save_checkpoint(directory, modules, optimizer, step, best, clock):
    """checkpoint.pt, written atomically (a kill mid-write leaves the last one whole)."""
    buf = io.BytesIO()
    torch.save({"modules": [m.state_dict() for m in modules], "optimizer": optimizer.state_dict(),
                "step": step, "best_metrics": best, "clock": clock}, buf)
    data.atomic_write_bytes(os.path.join(directory, "checkpoint.pt"), [buf.getvalue()])


# ----------------------------------------------------------------------------------------------
# Several processes: torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; a plain `python train.py` is one


def start_distributed(args):
    """Under torchrun: join the process group (NCCL on CUDA, gloo on CPU), take this process's
    GPU, and let process 0 alone print. Every process loads the teacher and the data and computes
    the teacher cache; process 0 alone evaluates (the others wait: hence the long timeout)."""
    cuda = args.device.startswith("cuda")
    # Imported before the group exists, not after (AdamW imports it, through torch._dynamo): its
    # functions' default group=group.WORLD would keep the group past destroy_process_group, its
    # gloo threads alive into Python's exit, which aborted 1 run in 25 (SIGABRT; torch 2.13).
    import torch.distributed.nn
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=3))
    if cuda:
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
    if not LEAD:
        sys.stdout = open(os.devnull, "w")
    world = dist.get_world_size()
    print(f"[torchrun] {world} processes: each trains its share of every batch, --batch_size "
          f"{args.batch_size} in all ({math.ceil(args.batch_size / world)} per process)")


@contextlib.contextmanager
def main_process_first():
    """Under torchrun the body runs in process 0 first, then in the others: a file the body
    downloads has one writer, and the others find it there (pipeline's body tokenises the data too:
    the others start it once process 0 has, a wait once a run). One process: just the body."""
    if not LEAD:
        try:
            dist.barrier()  # wait for process 0
        except RuntimeError:  # process 0 left, having said its error (a bad file), or timed out
            say_error("process 0 stopped before the data was ready (or took 3 hours): its output "
                      "says why")
            sys.exit(1)
    yield
    if LEAD and dist.is_initialized():
        dist.barrier()  # process 0 is done: the others go on


def shard(batch, share):
    """This process's rows of a global batch (with every process's row count: rows_per_process)
    and the weight of its loss, world x its share, so that the mean of the processes' gradients is
    the gradient of the global batch's loss. The share: of the examples ("rows": a mean over
    examples), of the real tokens ("tokens": the Stage-1 losses average over tokens; TinyBERT's
    attention MSE over token pairs, for which it is close, not exact), or weight 1 ("all": Stage 2's
    losses are the whole batch's in every process, gather_rows)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    split = torch.arange(len(batch["index"])).tensor_split(world)
    mine = split[rank]
    local = {k: v[mine if len(mine) else [0]] for k, v in batch.items()}  # empty: a stand-in row
    local["rows_per_process"] = torch.tensor([len(rows) for rows in split])
    if share == "all":
        return local, 1.0
    if not len(mine):  # the stand-in row counts for nothing
        return local, 0.0
    if share == "tokens":
        return local, world * float(local["attention_mask"].sum() / batch["attention_mask"].sum())
    return local, world * len(mine) / len(batch["index"])


def gather_rows(x, counts):
    """x: this process's rows (beyond counts[rank]: a stand-in row, dropped) -> the whole batch's
    rows, every process's in rank order (counts: each process's row count). Every process then
    computes the whole batch's loss, but backpropagates into its own rows alone (the others' are
    copies): the processes' gradients of the rows add up to the loss's, so the hook multiplies by
    world what train_step's mean divides by world. The weights that read the gathered rows (L_SC's
    projection W_M) get the whole gradient in every process, and the mean keeps it."""
    rank, world = dist.get_rank(), len(counts)
    mine = x[:counts[rank]]
    sent = x.new_zeros((max(counts), *x.shape[1:]))  # the same shape in every process
    sent[:len(mine)] = mine.detach()
    parts = [torch.empty_like(sent) for _ in range(world)]
    dist.all_gather(parts, sent)
    if mine.requires_grad:
        mine.register_hook(lambda grad: grad * world)
    parts[rank] = mine
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


if __name__ == "__main__":
    try:
        main()
    except (ValueError, data.DownloadError, FloatingPointError, OSError) as e:
        say_error(data.error_line(e, "an --out"))
        sys.exit(1)
    except KeyboardInterrupt:  # main has said what is kept
        sys.exit(130)
