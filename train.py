"""train.py: the whole MLKD pipeline for one task, in one command.

    python train.py --task sst2
    python train.py --task general --corpus FILE --teacher_init DIR --layers 4 --hidden 192 --ffn 768

Chapter 4 of mlkd. Stages (the paper's section 3, the details from the authors' scripts), each in its own
directory under --out:
    teacher   fine-tune the teacher (bert-base-uncased unless --teacher gives a fine-tuned one)
    stage1    distil embeddings and Transformer layers: L_EMB + L_MHA + L_FFN, constant lr
              (--recipe tinybert: TinyBERT's task distillation, the paper's baseline, in both stages)
    stage2    distil the prediction layer: L_KD + L_SS + L_SC, warm-up then linear decay,
              keeping the checkpoint with the best dev metric (selection on dev); run without
              stage1 it starts from --student_init (the baselines: logits-only KD, gold labels)
    eval      official dev metric of teacher and student, results.json
    general   --task general alone: general distillation, the Stage-1 losses between a pre-trained
              (not fine-tuned) teacher and a student on unlabeled text, as General TinyBERT was made;
              its output is a student for --student_init
A stage directory holds model.safetensors, config.json, vocab.txt, args.json, metrics.json and
log.jsonl. Rerunning skips finished stages; an interrupted stage resumes from checkpoint.pt.
Under `torchrun --nproc_per_node N train.py ...` every stage is data-parallel (PyTorch's DDP).
"""
import argparse
import dataclasses
import datetime
import functools
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import data
import eval as evaluation
import mlkd
from model import Bert, BertConfig, fetch, read_safetensors, write_safetensors

# Per task, from the authors' scripts (HandH1998/tmp_bert_mlkd): max length, Stage-1 epochs, Stage-2 epochs,
# teacher epochs, teacher lr.
# WNLI is not in the authors' table; it gets RTE's settings.
TASK_DEFAULTS = {
    "cola": (64, 50, 30, 10, 1e-5), "sst2": (64, 15, 10, 4, 2e-5), "mrpc": (128, 20, 15, 10, 2e-5),
    "stsb": (128, 20, 15, 10, 3e-5), "rte": (128, 20, 15, 10, 2e-5), "qnli": (128, 10, 10, 10, 2e-5),
    "mnli": (128, 6, 6, 4, 3e-5), "qqp": (128, 6, 6, 5, 2e-5), "wnli": (128, 20, 15, 10, 2e-5),
    "squad1": (384, 4, 3, 4, 3e-5), "squad2": (384, 4, 3, 4, 3e-5),  # batch 16, stride 128, query 64
    "general": (128, 3, 0, 0, 5e-5),  # the authors' general_distill.py: 3 epochs, lr 5e-5, 10% warm-up, 128 tokens
}
TINYBERT = {(4, 312): "huawei-noah/TinyBERT_General_4L_312D", (6, 768): "huawei-noah/TinyBERT_General_6L_768D"}
STAGES = ("teacher", "stage1", "stage2", "eval")
HELDOUT = 1000  # general distillation scores at most this many corpus windows (1%) that it never trains on
GROUP = 100  # --group_by_length sorts runs of this many batches (HF's LengthGroupedSampler: up to 50)


# ----------------------------------------------------------------------------------------------
# The method: the stages in the paper's order, what each one minimises, and the one training loop


def main(argv=None):
    args = parse_args(argv)
    start_distributed(args)
    torch.manual_seed(args.seed)
    print("settings: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))
    try:
        result = general(args) if args.task == "general" else pipeline(args)
    except Exception:
        drop_unstarted(args.out)
        raise
    if dist.is_initialized():  # the ranks leave together: one that exits early can abort the others
        sync()
        dist.destroy_process_group()
    return result


def pipeline(args):
    """teacher, stage1, stage2, eval for one task (see the module docstring)."""
    dirs = {s: os.path.join(args.out, s) for s in STAGES[:3]}
    teacher_dir = args.teacher or dirs["teacher"]
    source = fetch(args.teacher or args.teacher_init)
    check_shapes(args, BertConfig.from_json(os.path.join(source, "config.json")))
    vocab = os.path.join(source, "vocab.txt")
    teacher = load_teacher(args.teacher, args) if args.teacher else None  # checked before any work
    train, evaluate = load_task(args, data.Tokenizer(vocab))
    dev_set = dev_set_key(args)

    # Stage 0: the teacher, fine-tuned on the task's gold labels
    if "teacher" in args.stages and not args.teacher and not finished("teacher", teacher_dir, args):
        teacher = Bert.from_pretrained(args.teacher_init, **evaluation.head_config(args.task)).to(args.device)
        record, best = fit("teacher", teacher_dir, [teacher], teacher_loss, train, args, args.teacher_epochs,
                           args.teacher_lr, args.warmup, evaluate=lambda: evaluate(teacher),
                           on_best=lambda _: save_model(teacher, teacher_dir, vocab, args))
        finish(teacher_dir, {"dev": best, "dev_set": dev_set, "train": record})
    elif "teacher" in args.stages:
        print(f"[teacher] skipped: using the fine-tuned teacher of --teacher {args.teacher}" if args.teacher
              else f"[teacher] {teacher_dir} is finished: skipped")
    if not args.teacher and any(s in args.stages for s in ("stage1", "stage2", "eval")):
        if not is_done(teacher_dir):
            sys.exit(f"error: the teacher in {teacher_dir} is not finished; run the teacher stage or pass --teacher")
        same_settings("teacher", teacher_dir, args)
        teacher = load_teacher(teacher_dir, args)

    # Stage 1: embeddings and Transformer layers (L_EMB + L_MHA + L_FFN), at a constant lr
    if "stage1" in args.stages and not finished("stage1", dirs["stage1"], args):
        record, _ = distil_layers("stage1", dirs["stage1"], teacher, train, args, vocab)
        finish(dirs["stage1"], {"train": record})
    elif "stage1" in args.stages:
        print(f"[stage1] {dirs['stage1']} is finished: skipped")

    # Stage 2: the prediction layer (L_KD + L_SS + L_SC), from Stage 1's student and projections; best on dev kept
    if "stage2" in args.stages and not finished("stage2", dirs["stage2"], args):
        student, proj = stage2_start(dirs["stage1"], teacher, args)
        cache = None  # the teacher runs only when a distillation loss is on, and then once per example
        if any((args.w_kd, args.w_ss, args.w_sc)) and not args.no_teacher_cache:
            cache = teacher_cache(teacher, train, args, dirs["stage2"])
        print("[stage2] the checkpoint with the best dev metric is kept: this is model selection on dev")
        record, best = fit("stage2", dirs["stage2"], [student, proj], stage2_objective(teacher, proj, cache, args),
                           train, args, args.epochs2, args.lr2, args.warmup, evaluate=lambda: evaluate(student),
                           on_best=lambda _: save_model(student, dirs["stage2"], vocab, args))
        finish(dirs["stage2"], {"dev": best, "dev_set": dev_set, "train": record})
    elif "stage2" in args.stages:
        print(f"[stage2] {dirs['stage2']} is finished: skipped")

    if "eval" in args.stages and lead():
        if not is_done(dirs["stage2"]):
            sys.exit(f"error: no finished student in {dirs['stage2']}")
        return report(args, teacher, teacher_dir, dirs["stage2"], evaluate, dev_set)


def stage2_start(stage1_dir, teacher, args):
    """Stage 2's student and projections: Stage 1's, or, for a baseline run without Stage 1 (logits-only KD,
    gold labels), a student per --student_init with fresh projections."""
    if is_done(stage1_dir):
        same_settings("stage1", stage1_dir, args)
        student = Bert.from_pretrained(stage1_dir, verbose=False).to(args.device)
    elif "stage1" not in args.stages:
        print(f"[stage2] no finished Stage 1 in {stage1_dir}: starting from --student_init {args.student_init}")
        student = build_student(args, teacher).to(args.device)
    else:
        sys.exit(f"error: Stage 1 in {stage1_dir} is not finished")
    c = student.config
    proj = mlkd.Projections(c.num_hidden_layers, c.hidden_size, teacher.config.hidden_size, args.proj_init)
    if is_done(stage1_dir):
        proj.load_state_dict(read_safetensors(os.path.join(stage1_dir, "projections.safetensors")))
    return student, proj.to(args.device)


def task_loss(logits, labels):
    """Loss on gold labels: CE, MSE for regression, (CE(start) + CE(end)) / 2 for spans (B, 2, L)."""
    if logits.dim() == 3:
        return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels)
    if logits.shape[-1] == 1:
        return torch.nn.functional.mse_loss(logits[:, 0].float(), labels)
    return torch.nn.functional.cross_entropy(logits.float(), labels)


def teacher_loss(model, batch):
    ce = task_loss(model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).logits, batch["labels"])
    return ce, {"ce": ce}


def stage1_objective(teacher, proj, lmap, args):
    """loss_fn(model, batch) of Stage 1 and of general distillation: mlkd.stage1_loss (or, with --recipe
    tinybert, mlkd.tinybert_stage1_loss) against the frozen teacher."""
    weights, tiny = {"emb": args.w_emb, "mha": args.w_mha, "ffn": args.w_ffn}, args.recipe == "tinybert"

    def loss_fn(model, batch):
        inputs = (batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        with torch.no_grad():
            t = teacher(*inputs, scores=tiny)
        mask = None if args.paper_exact else batch["attention_mask"]
        if tiny:  # the baseline: attention scores and hidden states, MSE
            return mlkd.tinybert_stage1_loss(model(*inputs, scores=True), t, proj, mask, lmap)
        return mlkd.stage1_loss(model(*inputs), t, proj, mask, lmap, weights, args.splits, args.mha_temperature)
    return loss_fn


def stage2_objective(teacher, proj, cache, args):
    """loss_fn(model, batch) of Stage 2: mlkd.stage2_loss against the teacher's targets (its cached rows, or a
    live forward without a cache), plus --w_ce times the gold-label loss (not MLKD: the fine-tuning baseline)."""
    weights = {"kd": args.w_kd, "ss": args.w_ss, "sc": args.w_sc}

    def loss_fn(model, batch):
        out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        total, parts = 0.0, {}
        if any(weights.values()):
            total, parts = mlkd.stage2_loss(out, mlkd.stage2_targets(batch, teacher, cache), proj, batch["labels"],
                                            weights, args.temperature, args.tau)
        if args.w_ce:
            parts["ce"] = task_loss(out.logits, batch["labels"])
            total = total + args.w_ce * parts["ce"]
        return total, parts
    return loss_fn


def distil_layers(stage, directory, teacher, train, args, vocab, heldout=None):
    """Stage 1 (constant lr), or general distillation (warm-up then decay; the held-out windows scored at
    the start and every epoch): the student per --student_init learns the teacher's embeddings and
    layers. Saves the student and its projections W_0..W_M. Returns (last log record, held-out at start)."""
    student = build_student(args, teacher).to(args.device)
    M, N = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    lmap = mlkd.layer_map(N, M, args.layer_map)
    print(f"[{stage}] layer map student -> teacher: {lmap} (0 = embeddings); student {M} x "
          f"{student.config.hidden_size}, {student.config.num_attention_heads} heads, "
          f"{student.num_parameters() / 1e6:.1f}M parameters")
    proj = mlkd.Projections(M, student.config.hidden_size, teacher.config.hidden_size, args.proj_init).to(args.device)
    saved = os.path.join(args.student_init, "projections.safetensors")
    if stage == "general" and os.path.isfile(saved):  # continuing a general student: its projections too
        state = read_safetensors(saved)
        if {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in proj.state_dict().items()}:
            proj.load_state_dict(state)
            print(f"[{stage}] projections from {saved}")
    loss_fn = stage1_objective(teacher, proj, lmap, args)
    evaluate, start = None, None
    if heldout is not None:
        evaluate = functools.partial(heldout_losses, student, loss_fn, heldout, args.eval_batch_size,
                                     args.device)
        start = evaluate()
        print(f"[{stage}] held-out at step 0: " + evaluation.format_metrics(start, 4))
    warmup = args.warmup if stage == "general" else None  # Stage 1 at a constant lr, as the authors ran it
    record, _ = fit(stage, directory, [student, proj], loss_fn, train, args, args.epochs1, args.lr1, warmup, evaluate)
    save_model(student, directory, vocab, args)
    if lead():
        write_safetensors(proj.state_dict(), os.path.join(directory, "projections.safetensors"))
    return record, start


def general(args):
    """--task general: general distillation on unlabeled text; writes <out>/general, a student for --student_init."""
    directory = os.path.join(args.out, "general")
    source = fetch(args.teacher_init)
    check_shapes(args, BertConfig.from_json(os.path.join(source, "config.json")))
    if finished("general", directory, args):
        print(f"[general] {directory} is finished: skipped")
        return json.load(open(os.path.join(directory, "metrics.json")))
    vocab = os.path.join(source, "vocab.txt")
    teacher = Bert.from_pretrained(source, verbose=False).to(args.device).eval().requires_grad_(False)
    windows = data.corpus_windows(data.read_corpus(args.corpus.split(",")), data.Tokenizer(vocab), args.max_len)
    n = len(windows["lengths"])
    if n < 2:
        raise ValueError(f"--corpus {args.corpus}: {n} window of text; general distillation needs at least 2")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    k = min(HELDOUT, max(1, n // 100))  # windows the training never sees
    heldout = {key: v[order[:k]] for key, v in windows.items()}
    train = {key: v[order[k:]] for key, v in windows.items()}
    corpus = dict(files=args.corpus, windows=n, heldout_windows=k, word_pieces=int(windows["lengths"].sum() - 2 * n))
    print(f"[general] corpus: {n:,} windows of at most {args.max_len} tokens, {corpus['word_pieces']:,} word pieces; "
          f"{k} window{'s' * (k != 1)} held out; teacher {source} (pre-trained)")
    record, start = distil_layers("general", directory, teacher, train, args, vocab, heldout)
    if not lead():
        return finish(directory, {})
    logged = map(json.loads, open(os.path.join(directory, "log.jsonl")))
    curve = [{"step": 0, **start}] + [{"step": r["step"], **r["dev"]} for r in logged if "dev" in r]
    finish(directory, {"corpus": corpus, "heldout": curve, "train": record})
    print("[general] held-out losses, start -> end: " + ", ".join(f"{key} {curve[0][key]:.4f} -> {curve[-1][key]:.4f}"
          for key in start if key != "windows") + f"; the student: --student_init {directory}")
    return {"corpus": corpus, "heldout": curve}


def fit(stage, directory, modules, loss_fn, train, args, epochs, lr, warmup, evaluate=None, on_best=None):
    """Train `modules` (the first is the model) on loss_fn(model, batch) -> (loss, parts) with AdamW.

    Schedule: linear warm-up over a fraction `warmup` of the steps, then linear decay to 0; a constant lr when
    warmup is None. With `evaluate` (-> metrics, higher is better for args.metric) the dev metric is checked
    every --eval_steps and at every epoch end, and on_best(metrics) saves the best. A checkpoint every
    --save_steps; a rerun resumes from it. Returns the last log record and the best dev metrics (or None).
    """
    per_epoch = math.ceil(len(train["input_ids"]) / args.batch_size)
    planned = max(1, math.ceil(epochs * per_epoch))
    total = min(planned, args.max_steps or planned)
    optimizer = torch.optim.AdamW(param_groups(modules, args.weight_decay), lr=lr, fused=True)  # fused: one kernel
    warm = int(warmup * total) if warmup is not None else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, warm, total, warmup is None))
    step, best, best_metrics = resume(stage, directory, modules, optimizer, scheduler, total, args)
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    step_loss = one_step_loss(stage, modules, loss_fn, args)  # batch -> (loss, parts)
    log = Log(stage, directory, step, total, planned, per_epoch, len(train["input_ids"]), args)
    log.announce(lr, "constant lr" if warmup is None else f"warm-up {warm} steps then linear decay")
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=args.device.startswith("cuda"))
    try:
        for epoch, batch in training_batches(train, args, step, per_epoch, total):
            batch, weight, rows = this_process_rows(batch, stage, args)  # one process: the batch, 1.0, its size
            modules[0].train()
            with autocast:
                loss, parts = step_loss(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"[{stage}] non-finite loss at step {step + 1}: {floats(parts)}, "
                                         f"batch rows {batch['index'].tolist()}")
            optimizer.zero_grad(set_to_none=True)
            (loss * weight).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            log.trained(step, epoch, parts, optimizer.param_groups[0]["lr"], rows)  # the lr this step used
            scheduler.step()
            if evaluate and lead() and (step % per_epoch == 0 or step == total or
                                        (args.eval_steps and step % args.eval_steps == 0)):
                metrics, improved = log.evaluated(step, evaluate, on_best is not None, best)
                if improved:
                    best, best_metrics = metrics[args.metric], metrics
                    on_best(metrics)
            if step % args.save_steps == 0 and step < total and lead():
                log.saved_step = save_checkpoint(directory, modules, optimizer, scheduler, step, best, best_metrics)
    except KeyboardInterrupt:
        log.interrupted(step)
        raise
    return log.done(), best_metrics


def param_groups(modules, weight_decay):
    """AdamW groups: weight decay except on biases and LayerNorm weights (1-d tensors)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def lr_factor(step, warm, total, constant):
    """The lr of step `step` (0-based) over the base lr: 1 when constant, else linear warm-up then decay to 0."""
    if constant:
        return 1.0
    return (step + 1) / max(1, warm) if step < warm else max(0.0, (total - step) / max(1, total - warm))


def training_batches(train, args, step, per_epoch, total):
    """(epoch, batch) from step `step` until `total`: each epoch shuffled by a seed of its own, so that a resumed
    run sees the same batches in the same order (length-grouped ones too, with --group_by_length)."""
    group = GROUP if args.group_by_length else 0
    while step < total:
        epoch = step // per_epoch
        gen = torch.Generator().manual_seed(args.seed + epoch)
        for batch in data.batches(train, args.batch_size, shuffle=True, generator=gen,
                                  fixed_padding=args.paper_exact, start=step % per_epoch, group_by_length=group):
            yield epoch, batch
            step += 1
            if step >= total:
                return


# ----------------------------------------------------------------------------------------------
# Machinery. A reader of the method may stop here: flags and their checks, models and data, the
# teacher cache, resume and logging, torchrun.


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("task and files")
    g.add_argument("--task", required=True, help=f"one of {', '.join(TASK_DEFAULTS)}")
    g.add_argument("--data_dir", default=os.environ.get("MLKD_DATA", "data"),
                   help="holds glue/<TASK>/*.tsv; missing files are downloaded there (default: data or $MLKD_DATA)")
    g.add_argument("--out", help="output directory (default: out/<task>)")
    g.add_argument("--train_file", help="SQuAD training JSON, or several joined by commas "
                                        "(default: <data_dir>/squad/train-v1.1.json or -v2.0)")
    g.add_argument("--dev_file", help="SQuAD dev JSON (default: <data_dir>/squad/dev-v1.1.json or -v2.0)")
    g.add_argument("--corpus", help="--task general: unlabeled text files joined by commas, one sentence or paragraph "
                                    "per line, blank lines between documents (python data.py corpus writes one)")
    g.add_argument("--stages", help="comma-separated subset of " + ",".join(STAGES) + " (default: all)")
    g.add_argument("--allow_partial", action="store_true",
                   help="score on a dev file with fewer or more rows than the official one (refused otherwise)")
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", help="directory of an already fine-tuned teacher: skips the teacher stage")
    g.add_argument("--teacher_init", default="google-bert/bert-base-uncased",
                   help="pre-trained weights the teacher is fine-tuned from (hub name or directory)")
    g.add_argument("--teacher_epochs", type=float)
    g.add_argument("--teacher_lr", type=float)
    g = p.add_argument_group("student")
    g.add_argument("--student_init",
                   help="tinybert: General TinyBERT of the student's shape, downloaded (the paper; default for "
                        "tasks). DIR: a model directory (e.g. a general student): its embeddings and its layers "
                        "g(1..M) of --layer_map, all of them when it has M; its widths. teacher-layers: the same "
                        "from the task's teacher (DistilBERT's init; it has seen the task). random: BERT's init "
                        "(default for --task general)")
    g.add_argument("--layers", type=int, help="student layers M (default: 4 for tinybert, a directory's own count, "
                                              "else half the teacher's)")
    g.add_argument("--hidden", type=int, help="student width (default: 312 for tinybert, else the teacher's)")
    g.add_argument("--heads", type=int, help="student attention heads (any divisor of the width)")
    g.add_argument("--ffn", type=int, help="student FFN width")
    g = p.add_argument_group("distillation")
    g.add_argument("--splits", type=int, default=12, help="MHA-splits A for L_MHA (must divide both widths)")
    g.add_argument("--layer_map", default="uniform",
                   help="uniform, last, or teacher layers per student layer: 3,6,9,12")
    for w in ("emb", "mha", "ffn", "kd", "ss", "sc"):
        g.add_argument(f"--w_{w}", type=float, default=1.0, help=f"weight of L_{w.upper()} (0 switches it off)")
    g.add_argument("--proj_init", default="normal", choices=["normal", "identity"],
                   help="init of the projections W_m: normal N(0, 0.02) (authors) or identity (equal widths only)")
    g.add_argument("--w_ce", type=float, default=0.0,
                   help="weight of the gold-label loss in Stage 2 (0 in MLKD; for the fine-tuning baseline)")
    g.add_argument("--temperature", type=float, default=1.0, help="L_KD temperature")
    g.add_argument("--mha_temperature", type=float, default=1.0,
                   help="divide L_MHA's relation logits (teacher and student) by this; 1 is the paper's loss, any "
                        "other value is NOT the paper's method (an experiment: < 1 sharpens nearly uniform relations)")
    g.add_argument("--tau", type=float, default=0.07, help="L_SC temperature")
    g.add_argument("--recipe", default="mlkd", choices=["mlkd", "tinybert"],
                   help="tinybert: TinyBERT's task distillation, the paper's baseline: Stage 1 MSE of attention scores "
                        "(equal head counts) and projected hidden states, Stage 2 L_KD alone")
    g.add_argument("--paper_exact", action="store_true",
                   help="the authors' behaviour: pad every batch to max length, relation losses unmasked")
    g.add_argument("--group_by_length", action="store_true",
                   help=f"batches of similar lengths: each run of {GROUP} shuffled batches is sorted by length, then "
                        "its batches shuffled; far less padding (SST-2: 3.0x -> 1.02x positions per real token), the "
                        "same masked losses per example, but L_SS and L_SC then relate samples of similar length "
                        "(ignored with --paper_exact)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs1", type=float, help="Stage-1 epochs")
    g.add_argument("--epochs2", type=float, help="Stage-2 epochs")
    g.add_argument("--lr1", type=float, default=5e-5)
    g.add_argument("--lr2", type=float, default=5e-5)
    g.add_argument("--batch_size", type=int, help="default 32 (16 for SQuAD); under torchrun the global batch, "
                                                  "split across the processes")
    g.add_argument("--max_len", type=int)
    g.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction (teacher and Stage 2)")
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--max_steps", type=int, help="cap the steps of every stage (quick runs)")
    g.add_argument("--train_subset", type=int,
                   help="train on a random subset of this many examples, the same for every --seed")
    g.add_argument("--eval_steps", type=int, help="evaluate on dev every N steps (default: every epoch)")
    g.add_argument("--save_steps", type=int, default=200, help="write a resumable checkpoint every N steps")
    g.add_argument("--log_steps", type=int, default=50, help="progress line every N steps")
    g.add_argument("--eval_batch_size", type=int, default=128)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--compile", action="store_true", help="torch.compile the trained model")
    g.add_argument("--no_teacher_cache", action="store_true",
                   help="run the teacher on every Stage-2 step instead of once per example (slower; for checking)")
    if int(os.environ.get("RANK", 0)):  # under torchrun every process parses the same flags: one of them says why
        p.error = lambda message: sys.exit(2)
    args = p.parse_args(argv)

    if args.task not in TASK_DEFAULTS:
        p.error(f"--task {args.task!r}: unknown; choose one of {', '.join(TASK_DEFAULTS)}")
    squad = args.task.startswith("squad")
    if squad or args.recipe == "tinybert":  # Stage 2 = L_KD alone: TinyBERT's recipe, and the authors' SQuAD runs
        args.w_ss = args.w_sc = 0.0
    args.metric = "f1" if squad else "loss" if args.task == "general" else "acc_m" if args.task == "mnli" \
        else data.TASKS[args.task].metric
    general = args.task == "general"
    args.student_init = args.student_init or ("random" if general else "tinybert")
    args.stages = args.stages or ("general" if general else ",".join(STAGES))
    corpus = [f for f in (args.corpus or "").split(",") if f]
    for bad, msg in ((general and args.stages != "general", "--task general runs one stage: --stages does not apply"),
                     (general and args.teacher, "--task general distils a pre-trained model: use --teacher_init"),
                     (general and not corpus, "--task general needs --corpus FILE[,FILE...] (python data.py corpus)"),
                     *((not os.path.isfile(f), f"--corpus {f}: no such file") for f in corpus)):
        if bad:
            p.error(msg)
    defaults = zip(("max_len", "epochs1", "epochs2", "teacher_epochs", "teacher_lr"), TASK_DEFAULTS[args.task])
    for name, value in defaults:
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.batch_size is None:
        args.batch_size = 16 if args.task.startswith("squad") else 32
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if not general and (not args.stages or any(s not in STAGES for s in args.stages)):
        p.error(f"--stages {','.join(args.stages)}: choose from {','.join(STAGES)}")
    for name in ("batch_size", "max_len", "splits", "save_steps", "log_steps", "eval_batch_size",
                 "layers", "hidden", "heads", "ffn", "max_steps", "train_subset", "eval_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("lr1", "lr2", "teacher_lr", "temperature", "mha_temperature", "tau"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("epochs1", "epochs2", "teacher_epochs", "weight_decay"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    pairs = args.task.startswith("squad") or args.task in data.TASKS and data.TASKS[args.task].b is not None
    shortest = 5 if pairs else 3  # [CLS] a [SEP] (b [SEP]): one word piece of each text at least
    named = args.student_init in ("tinybert", "teacher-layers", "random")
    for bad, msg in ((not 0 <= args.warmup < 1, f"--warmup must be a fraction in [0, 1), got {args.warmup}"),
                     (not any((args.w_kd, args.w_ss, args.w_sc, args.w_ce)),
                      "Stage 2 needs one of --w_kd --w_ss --w_sc --w_ce > 0"),
                     (args.max_len > 512, f"--max_len {args.max_len}: BERT has 512 positions"),
                     (args.max_len < shortest, f"--max_len {args.max_len}: {args.task} needs at least {shortest} "
                      f"positions (one word piece of {'each text' if pairs else 'text'} and the special tokens)"),
                     (args.teacher and not os.path.isdir(args.teacher), f"--teacher {args.teacher}: no such directory"),
                     (not named and not os.path.isdir(args.student_init),
                      f"--student_init {args.student_init}: not tinybert/teacher-layers/random nor a directory")):
        if bad:
            p.error(msg)
    if args.layer_map not in ("uniform", "last"):
        try:
            args.layer_map = [int(x) for x in args.layer_map.split(",")]
        except ValueError:
            p.error(f"--layer_map {args.layer_map}: use uniform, last or comma-separated teacher layers")
        if args.layer_map[0] < 0 or any(x < 1 for x in args.layer_map[1:]):
            shown = ",".join(map(str, args.layer_map))
            p.error(f"--layer_map {shown}: teacher layers count from 1 (0 is the embeddings)")
    if args.group_by_length and args.paper_exact:
        print("--group_by_length is ignored with --paper_exact: every batch is padded to --max_len anyway")
        args.group_by_length = False
    args.out = args.out or os.path.join("out", args.task)
    existing = args.out
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(os.path.abspath(existing))
    if not os.access(existing, os.W_OK):
        p.error(f"--out {args.out}: {existing} is not writable; choose an --out you can write to")
    relations = args.w_ss or args.w_sc
    per_process = math.ceil(args.batch_size / int(os.environ.get("WORLD_SIZE", 1)))
    if relations and "stage2" in args.stages and per_process < 2:
        p.error(f"--batch_size {args.batch_size}: L_SS and L_SC relate the samples of a batch and are 0 with one "
                f"sample per process; use --batch_size {2 * int(os.environ.get('WORLD_SIZE', 1))} or more, or --w_ss 0 "
                "--w_sc 0")
    return args


# The flags that change what a stage computes. A stage directory keeps the settings it was started with
# (args.json); a rerun into it with other values would skip or resume a different run, so it is refused.
FIT_FLAGS = ("task", "batch_size", "max_len", "seed", "max_steps", "train_subset", "weight_decay", "paper_exact",
             "train_file", "group_by_length")
STUDENT_FLAGS = ("teacher", "student_init", "layers", "hidden", "heads", "ffn", "splits", "layer_map", "w_emb", "w_mha",
                 "w_ffn", "mha_temperature", "proj_init", "recipe", "epochs1", "lr1")
STAGE_FLAGS = {
    "teacher": (*FIT_FLAGS, "teacher_init", "teacher_epochs", "teacher_lr", "warmup", "eval_steps", "dev_file"),
    "stage1": (*FIT_FLAGS, *STUDENT_FLAGS),
    "stage2": (*FIT_FLAGS, *STUDENT_FLAGS, "w_kd", "w_ss", "w_sc", "w_ce", "temperature", "tau", "epochs2", "lr2",
               "warmup", "eval_steps", "dev_file"),
    "general": (*FIT_FLAGS, *STUDENT_FLAGS, "corpus", "teacher_init", "warmup"),
}
WORK = ("metrics.json", "checkpoint.pt", "model.safetensors", "log.jsonl")  # a directory holding any of these has work


def same_settings(stage, directory, args):
    """Refuse to reuse a stage directory whose work was done with other values of STAGE_FLAGS[stage]."""
    path = os.path.join(directory, "args.json")
    if not os.path.exists(path) or not any(os.path.exists(os.path.join(directory, f)) for f in WORK):
        return
    was, now = json.loads(data.read_text(path)), json.loads(json.dumps(vars(args), default=str))
    differ = [f for f in STAGE_FLAGS[stage] if f in was and was[f] != now[f]]
    if differ:
        flags = ", ".join(f"--{f} {was[f]} (now {now[f]})" for f in differ)
        raise ValueError(f"{directory} was run with other settings: {flags}. Rerun with those to resume or reuse it, "
                         f"or pass a new --out")


def finished(stage, directory, args):
    """True when the stage's directory holds its finished result for these settings (the stage is skipped);
    otherwise make the directory, remembering the settings in args.json. Other settings are refused."""
    same_settings(stage, directory, args)
    if is_done(directory):
        return True
    if lead():
        os.makedirs(directory, exist_ok=True)
        data.atomic_write_text(os.path.join(directory, "args.json"), json.dumps(vars(args), indent=2, default=str))
    sync()
    return False


def drop_unstarted(out):
    """After an error: remove the stage directories that hold nothing but their args.json (no work to keep)."""
    if not lead() or not os.path.isdir(out):
        return
    for stage in (*STAGES[:3], "general"):
        directory = os.path.join(out, stage)
        if os.path.isdir(directory) and set(os.listdir(directory)) <= {"args.json"}:
            shutil.rmtree(directory)
    if not os.listdir(out):
        os.rmdir(out)


def student_shape(args, teacher):
    """(layers, width, heads) of the student --student_init and the shape flags will build, without building it."""
    N, d, h = teacher.num_hidden_layers, teacher.hidden_size, teacher.num_attention_heads
    if args.student_init == "tinybert":
        return args.layers or 4, args.hidden or 312, args.heads or 12  # General TinyBERT has 12 heads
    if args.student_init in ("random", "teacher-layers"):
        return args.layers or max(1, N // 2), args.hidden or d, args.heads or h
    c = BertConfig.from_json(os.path.join(args.student_init, "config.json"))
    return args.layers or c.num_hidden_layers, c.hidden_size, args.heads or c.num_attention_heads


def check_shapes(args, teacher):
    """Refuse, before any training, the shapes a later stage would refuse: the student's heads and the MHA-splits
    must divide the widths, the layer map must fit, TinyBERT's recipe needs equal head counts. teacher: BertConfig."""
    M, d_s, h_s = student_shape(args, teacher)
    N, d_t = teacher.num_hidden_layers, teacher.hidden_size
    distils = any(s in args.stages for s in ("stage1", "general"))
    whose = "--heads" if args.heads else f"--student_init {args.student_init}'s head count"
    heads_t = teacher.num_attention_heads
    for bad, msg in ((d_s % h_s, f"{whose} {h_s} does not divide the student's width {d_s}; choose a divisor of {d_s}"),
                     (distils and args.w_mha and args.recipe == "mlkd" and (d_s % args.splits or d_t % args.splits),
                      f"--splits {args.splits} must divide the student's width {d_s} and the teacher's {d_t}"),
                     (distils and args.recipe == "tinybert" and h_s != heads_t,
                      f"--recipe tinybert matches heads one to one: give the student --heads {heads_t}"),
                     (args.max_len > teacher.max_position_embeddings,
                      f"--max_len {args.max_len}: the teacher has {teacher.max_position_embeddings} positions"),
                     (args.student_init == "tinybert" and (M, d_s) not in TINYBERT,
                      f"--layers {M} --hidden {d_s}: no General TinyBERT of that shape (have 4 x 312, 6 x 768); use "
                      "--student_init teacher-layers, random or a model directory")):
        if bad:
            raise ValueError(msg)
    if distils:
        try:
            mlkd.layer_map(N, M, args.layer_map)
        except ValueError as e:
            raise ValueError(f"--layer_map: {e}") from None


# ----------------------------------------------------------------------------------------------
# Building the models, reading the task, the Stage-2 teacher cache, and the eval stage's report


def build_student(args, teacher):
    """The student per --student_init (see --help); its attention dropout is 0 so that attn_outputs are the
    paper's O = softmax(Q K^T / sqrt(d/h)) V, not a dropped-out copy."""
    tc = teacher.config
    overrides = dict(evaluation.head_config(args.task), attention_probs_dropout_prob=0.0,
                     **({"num_attention_heads": args.heads} if args.heads else {}))
    if args.student_init == "tinybert":  # check_shapes has refused a shape General TinyBERT does not come in
        return Bert.from_pretrained(TINYBERT[args.layers or 4, args.hidden or 312], **overrides)
    if args.student_init == "random":
        shape = {k: v for k, v in dict(num_hidden_layers=args.layers or max(1, tc.num_hidden_layers // 2),
                                       hidden_size=args.hidden, intermediate_size=args.ffn).items() if v is not None}
        return Bert(dataclasses.replace(tc, **shape, **overrides))
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
    student = Bert(dataclasses.replace(source.config, num_hidden_layers=M, **overrides))
    s_state = source.state_dict()
    head = ("classifier.", "qa_outputs.")
    state = {k: v for k, v in s_state.items() if not k.startswith(("layers.", *(() if keep_head else head)))}
    for m in range(1, M + 1):  # student layer m <- source layer g(m)
        prefix = f"layers.{g[m] - 1}."
        state.update({f"layers.{m - 1}.{k[len(prefix):]}": v for k, v in s_state.items() if k.startswith(prefix)})
    missing = student.load_state_dict(state, strict=False).missing_keys
    assert all(k.startswith(head) for k in missing), missing  # only a fresh head is left as initialised
    return student, g


def save_model(model, directory, vocab_file, args):
    """The model with its vocabulary and the arguments it was trained with (eval.py reads max_len from them)."""
    if lead():
        model.save(directory, {"vocab.txt": data.read_text(vocab_file),
                               "args.json": json.dumps(vars(args), indent=2, default=str)})


def load_teacher(directory, args):
    """A fine-tuned teacher, frozen; its head must be the task's (a pre-trained model has none)."""
    teacher = Bert.from_pretrained(directory, verbose=False)
    why = evaluation.head_mismatch(teacher, args.task)
    if why:
        raise ValueError(f"--teacher {directory}: {why}; it is not a teacher fine-tuned on {args.task}. To fine-tune "
                         f"one from it, pass --teacher_init {directory}")
    if teacher.config.head == "classification":
        evaluation.check_labels(teacher, args.task)
    return teacher.to(args.device).eval().requires_grad_(False)


def load_task(args, tok):
    """Tokenised training rows (tokenised once) and evaluate(model) -> {metric: value} on dev."""
    subset = functools.partial(train_subset, args.train_subset)
    if args.task.startswith("squad"):
        version = evaluation.squad_version(args.task)
        default = os.path.join(args.data_dir, "squad", "{}-v" + version + ".json")
        examples = [e for f in (args.train_file or default.format("train")).split(",") for e in data.read_squad(f)]
        rows = data.squad_features(subset(examples), tok, max_len=args.max_len)
        train = {k: rows[k] for k in ("input_ids", "token_type_ids", "lengths", "labels")}
        dev_examples = data.read_squad(args.dev_file or default.format("dev"), args.allow_partial)
        dev = data.squad_features(dev_examples, tok, max_len=args.max_len, train=False)
        return train, lambda m: evaluation.evaluate_squad(m, dev_examples, dev, version, args.eval_batch_size,
                                                          args.device)[0]
    train = data.encode_glue(args.task, subset(data.read_glue(args.task, "train", args.data_dir)), tok, args.max_len)
    dev = {s: data.encode_glue(args.task, data.read_glue(args.task, s, args.data_dir, args.allow_partial), tok,
                               args.max_len) for s in data.TASKS[args.task].dev_splits}
    return train, lambda m: evaluation.evaluate_glue(m, args.task, dev, args.eval_batch_size, args.device,
                                                     args.paper_exact)


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
    where = args.dev_file or args.data_dir
    return f"{args.task} {os.path.abspath(where)} max_len={args.max_len} paper_exact={args.paper_exact}"


CACHE = "teacher_cache.safetensors"


def teacher_cache(teacher, train, args, directory):
    """Stage 2's teacher targets (logits, [CLS] state) for every training example, computed once.

    The teacher is frozen, in eval mode and deterministic, so these are the same at every epoch; the
    student then trains alone. Computed as the live path computes them (fp32, or bf16 autocast on CUDA)
    and kept in `directory` so that a resumed Stage 2 reuses them (under torchrun rank 0 computes them,
    the others read its file); finish() deletes the file.
    """
    path = os.path.join(directory, CACHE)
    if lead():
        cached_outputs(teacher, train, path, args.eval_batch_size, args.device)
    sync()
    logits, cls = cached_outputs(teacher, train, path, compute=False)  # (N, ...), (N, d_T)
    return mlkd.TeacherTargets(logits.to(args.device), cls.to(args.device))


def cached_outputs(model, dataset, path, batch_size=128, device="cpu", compute=True):
    """eval.py's model_outputs(model, dataset) kept in `path` with a sha256 fingerprint of the model's weights
    and the encoded rows: read back when they match; otherwise computed and written (compute=False: an error)."""
    h = hashlib.sha256()
    for t in [*model.state_dict().values(), *(dataset[k] for k in ("input_ids", "token_type_ids", "lengths"))]:
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    saved = read_safetensors(path) if os.path.exists(path) else None
    if saved is not None and bytes(saved["fingerprint"].tolist()) == h.digest():
        if compute:
            print(f"[stage2] teacher outputs read from {path}")
        return saved["logits"], saved["cls"]
    if not compute:
        raise ValueError(f"{path}: missing or made by another model or data")
    if saved is not None:
        print(f"[stage2] {path} was made by another teacher or data: computed again")
    t0 = time.time()
    logits, cls = evaluation.model_outputs(model, dataset, batch_size, device)
    fingerprint = torch.tensor(list(h.digest()), dtype=torch.uint8)
    write_safetensors({"logits": logits, "cls": cls, "fingerprint": fingerprint}, path)
    print(f"[stage2] teacher outputs of {len(cls)} examples computed once in {time.time() - t0:.0f} s "
          f"({(logits.numel() + cls.numel()) * 4 / 2**20:.0f} MiB); the teacher does not run again")
    return logits, cls


@torch.no_grad()
def heldout_losses(student, loss_fn, heldout, batch_size=128, device="cpu"):
    """General distillation's held-out score: each unweighted Stage-1 loss of loss_fn(student, batch) and
    their weighted sum, averaged over the held-out windows (student in eval mode), and the window count."""
    student.eval()
    sums, n = {}, 0
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=str(device).startswith("cuda"))
    for b in data.batches(heldout, batch_size):
        b = {k: v.to(device) for k, v in b.items()}
        with autocast:
            total, parts = loss_fn(student, b)
        for k, v in {**parts, "loss": total}.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(b["index"])
        n += len(b["index"])
    return {**{k: v / n for k, v in sums.items()}, "windows": n}


def finish(directory, metrics):
    """Mark a stage finished: metrics.json (with done), curves.svg; drop the checkpoint and the teacher cache.
    Every rank calls it; rank 0 writes, the others wait until it has."""
    if not lead():
        return sync()
    data.atomic_write_text(os.path.join(directory, "metrics.json"), json.dumps({**metrics, "done": True}, indent=2))
    evaluation.write_curves(directory)  # curves.svg: every loss and dev metric against step
    for name in ("checkpoint.pt", CACHE):
        if os.path.exists(os.path.join(directory, name)):
            os.remove(os.path.join(directory, name))
    sync()


def is_done(directory):
    path = os.path.join(directory, "metrics.json")
    return os.path.exists(path) and json.load(open(path)).get("done", False)


def report(args, teacher, teacher_dir, student_dir, evaluate, dev_set):
    """train.py's eval stage: the teacher's and the finished student's dev metrics side by side, results.json."""
    student = Bert.from_pretrained(student_dir, verbose=False).to(args.device)
    t_metrics = dev_metrics(teacher_dir, teacher, evaluate, dev_set)
    s_metrics = dev_metrics(student_dir, student, evaluate, dev_set)
    tp, sp = teacher.num_parameters(), student.num_parameters()
    ratio = s_metrics[args.metric] / t_metrics[args.metric] if t_metrics[args.metric] else None
    results = dict(task=args.task, metric=args.metric, split="dev", teacher=t_metrics, student=s_metrics, ratio=ratio,
                   teacher_parameters=tp, student_parameters=sp, teacher_dir=teacher_dir, student_dir=student_dir)
    data.atomic_write_text(os.path.join(args.out, "results.json"), json.dumps(results, indent=2))
    evaluation.write_index(args.out, [teacher_dir, os.path.join(args.out, "stage1"), student_dir])
    print(f"\n{args.task} dev ({', '.join(t_metrics)}; selection metric {args.metric}, Stage-2 best on dev)")
    cell = lambda v: f"{v:9d}" if isinstance(v, int) else f"{v:9.2f}"  # noqa: E731  (counts stay counts)
    print(f"  {'':8s} " + " ".join(f"{k:>9s}" for k in t_metrics) + f" {'params':>9s}")
    print(f"  {'teacher':8s} " + " ".join(map(cell, t_metrics.values())) + f" {tp / 1e6:8.1f}M")
    print(f"  {'student':8s} " + " ".join(map(cell, s_metrics.values())) + f" {sp / 1e6:8.1f}M")
    if results["ratio"] is not None:
        print(f"  student/teacher on {args.metric}: {100 * results['ratio']:.1f}%, {tp / sp:.1f}x fewer parameters")
    print(f"  files: {teacher_dir}, {student_dir}, {os.path.join(args.out, 'results.json')}")
    return results


def dev_metrics(directory, model, evaluate, dev_set):
    """The dev metrics a stage recorded for its saved model when they were measured on the same dev set
    (SQuAD's dev set takes minutes on a CPU); otherwise evaluate the model now."""
    path = os.path.join(directory, "metrics.json")
    saved = json.load(open(path)) if os.path.exists(path) else {}  # a --teacher from elsewhere has none
    if saved.get("dev_set") == dev_set and saved.get("dev"):
        print(f"[eval] {directory}: dev metrics recorded when it was saved (same dev set)")
        return saved["dev"]
    return evaluate(model)


# ----------------------------------------------------------------------------------------------
# The training loop's bookkeeping: resume, checkpoints, the log and the progress line


def floats(parts):
    return {k: float(v.detach()) for k, v in parts.items()}


def resume(stage, directory, modules, optimizer, scheduler, total, args):
    """Load checkpoint.pt when there is one (weights, optimizer, schedule, RNG) and cut the log back to it;
    returns (step, best, best_metrics), (0, None, None) for a fresh start."""
    if lead():
        data.remove_stale_temporaries(directory)  # a write killed by SIGKILL leaves its temporary behind
    step, best, best_metrics = 0, None, None
    ckpt, log_path = os.path.join(directory, "checkpoint.pt"), os.path.join(directory, "log.jsonl")
    if os.path.exists(ckpt):
        state = torch.load(ckpt, map_location=args.device, weights_only=True)
        for m, s in zip(modules, state["modules"]):
            m.load_state_dict(s)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, best, best_metrics = state["step"], state["best"], state.get("best_metrics")
        torch.set_rng_state(state["rng"].cpu())
        print(f"[{stage}] resumed from {ckpt} at step {step}/{total}")
    kept = [r for r in open(log_path) if json.loads(r).get("step", 0) <= step] if step and os.path.exists(log_path) \
        else []
    if lead():  # the log goes on from the checkpoint: no step twice
        data.atomic_write_text(log_path, "".join(kept))
    return step, best, best_metrics


def save_checkpoint(directory, modules, optimizer, scheduler, step, best, best_metrics):
    """checkpoint.pt, written atomically; returns its step."""
    buf = io.BytesIO()
    torch.save({"modules": [m.state_dict() for m in modules], "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "best": best, "best_metrics": best_metrics,
                "rng": torch.get_rng_state()}, buf)
    data.atomic_write_bytes(os.path.join(directory, "checkpoint.pt"), [buf.getvalue()])
    return step


def peak_memory_gib(device):
    """Peak CUDA memory allocated, or on CPU the peak resident set size of this process."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource  # POSIX only
    except ImportError:
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class Log:
    """One stage's log.jsonl and progress lines: each loss, the lr, samples/s and the ETA (of training time
    only), the dev evaluations, where the checkpoint is when interrupted, the peak memory at the end."""

    def __init__(self, stage, directory, step, total, planned, per_epoch, examples, args):
        self.stage, self.directory, self.step0, self.total, self.planned = stage, directory, step, total, planned
        self.per_epoch, self.examples, self.args = per_epoch, examples, args
        self.saved_step, self.t0, self.seen, self.record = step, time.time(), 0, {}
        self.file = open(os.path.join(directory, "log.jsonl"), "a") if lead() else open(os.devnull, "w")

    def announce(self, lr, schedule):
        per_rank = f" ({math.ceil(self.args.batch_size / dist.get_world_size())} per process)" \
            if dist.is_initialized() else ""
        capped = ", capped by --max_steps" if self.total < self.planned else ""
        print(f"[{self.stage}] {self.examples} examples, batch {self.args.batch_size}{per_rank}, {self.total} steps "
              f"({self.total / self.per_epoch:.3g} epochs{capped}), lr {lr:g}, {schedule}")

    def trained(self, step, epoch, parts, lr, rows):
        self.seen += rows  # the global batch: samples/s counts every process's rows
        if step % self.args.log_steps and step != self.total:
            return
        elapsed = time.time() - self.t0
        eta = (self.total - step) * elapsed / (step - self.step0)
        self.record = {"stage": self.stage, "epoch": epoch + 1, "step": step, "total": self.total, **floats(parts),
                       "lr": lr, "samples_per_s": self.seen / elapsed, "train_s": elapsed}
        self.file.write(json.dumps(self.record) + "\n")
        self.file.flush()
        print(f"[{self.stage}] epoch {epoch + 1} step {step}/{self.total} | "
              + " ".join(f"{k} {v:.4f}" for k, v in floats(parts).items())
              + f" | lr {lr:.2e} | {self.seen / elapsed:.1f} samples/s | ETA {eta / 60:.1f} min", flush=True)

    def evaluated(self, step, evaluate, selecting, best):
        """Run a dev (or held-out) evaluation and log it; its time is not training time.
        Returns (metrics, whether they beat `best` on args.metric)."""
        t = time.time()
        metrics = evaluate()
        took = time.time() - t
        self.t0 += took  # samples/s and ETA count training only
        improved = selecting and (best is None or metrics[self.args.metric] > best)
        print(f"[{self.stage}] {'dev' if selecting else 'held-out'} at step {step} ({took:.0f} s): "
              + evaluation.format_metrics(metrics, 2 if selecting else 4)
              + ("  (best so far: saved)" if improved else ""))
        self.file.write(json.dumps({"stage": self.stage, "step": step, "dev": metrics, "eval_s": took}) + "\n")
        return metrics, improved

    def interrupted(self, step):
        ckpt = os.path.join(self.directory, "checkpoint.pt")
        where = f"its checkpoint of step {self.saved_step} is {ckpt}" if self.saved_step else \
            f"no checkpoint yet (the first comes at step {self.args.save_steps}), so it starts over"
        print(f"\n[{self.stage}] interrupted at step {step}/{self.total}: {where}; rerun the same command to resume",
              flush=True)

    def done(self):
        """The closing line (peak memory); returns the last step's record with it."""
        peak = self.record["peak_memory_gib"] = peak_memory_gib(self.args.device)
        what = "CUDA allocated" if self.args.device.startswith("cuda") else "process RSS"
        print(f"[{self.stage}] done: {self.record.get('samples_per_s', 0):.1f} samples/s, peak memory {peak:.2f} GiB "
              f"({what})")
        self.file.write(json.dumps({"stage": self.stage, "done": True, "peak_memory_gib": peak}) + "\n")
        self.file.close()
        return self.record


# ----------------------------------------------------------------------------------------------
# Several processes: torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; a plain `python train.py` is one process.


def start_distributed(args):
    """Under torchrun: join the process group (NCCL on CUDA, gloo on CPU), take this rank's GPU, and let
    rank 0 alone print. Every rank loads the teacher and the data; rank 0 alone evaluates and writes."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return
    cuda = args.device.startswith("cuda")
    # a long timeout: the other ranks wait at a barrier while rank 0 evaluates
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=3))
    if cuda:
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
    if dist.get_rank():
        sys.stdout = open(os.devnull, "w")


def lead():
    return not dist.is_initialized() or dist.get_rank() == 0


def sync():
    if dist.is_initialized():
        dist.barrier()


def shard(batch, by_tokens):
    """This rank's rows of a global batch and the weight of its loss: world x its share of the examples
    (of the real tokens for the Stage-1 losses, which average over tokens), so that DDP's mean of the
    ranks' gradients is the gradient of the global batch's loss, as one process computes it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = torch.arange(len(batch["index"])).tensor_split(world)[rank]
    local = {k: v[rows if len(rows) else [0]] for k, v in batch.items()}  # an empty shard runs a row at weight 0
    count = (lambda b: float(b["attention_mask"].sum())) if by_tokens else (lambda b: len(b["index"]))  # noqa: E731
    return local, world * count(local) / count(batch) if len(rows) else 0.0


class Objective(torch.nn.Module):
    """The trained modules with their loss: what DDP wraps, so one forward is one step's loss."""

    def __init__(self, modules, fn):
        super().__init__()
        self.trained, self.fn = torch.nn.ModuleList(modules), fn

    def forward(self, batch):
        return self.fn(batch)


def this_process_rows(batch, stage, args):
    """(this process's rows of the batch on the device, the weight of their loss, the global batch's size);
    one process: the whole batch at weight 1."""
    rows, weight = len(batch["index"]), 1.0
    if dist.is_initialized():
        batch, weight = shard(batch, by_tokens=stage in ("stage1", "general") and not args.paper_exact)
    return {k: v.to(args.device) for k, v in batch.items()}, weight, rows


def one_step_loss(stage, modules, loss_fn, args):
    """batch -> (loss, parts): loss_fn on the model (compiled with --compile); under torchrun inside DDP, which
    averages the processes' gradients in backward (the teacher is replicated on every rank, outside DDP)."""
    model = torch.compile(modules[0]) if args.compile else modules[0]
    if not dist.is_initialized():
        return functools.partial(loss_fn, model)
    return DistributedDataParallel(Objective(modules, functools.partial(loss_fn, model)),
                                   find_unused_parameters=True)  # Stage 1 leaves the head unused


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, data.DownloadError, FloatingPointError, OSError) as e:
        if int(os.environ.get("RANK", 0)) == 0:  # once, not once per torchrun process
            print(f"error: {data.error_line(e, 'an --out')}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # fit() has said where the checkpoint is
        sys.exit(130)
