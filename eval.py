"""eval.py: how a saved model is scored. In reading order: its GLUE dev metrics (its outputs in
length-sorted batches -> predictions -> the official metric: the GLUE paper's, in numpy, equal to
scikit-learn's and scipy's, which its leaderboard uses), SQuAD's EM and F1 (the official v1.1 and
v2.0 scripts), the head a task needs, train.py's report, and the command (dev metrics, SQuAD, GLUE
test predictions); then machinery: flags, typos for --noise, latency for --speed. A run's loss
curves: tools/pages.py; a teacher's and a student's relation maps: tools/relations.py.

    python eval.py --task sst2 --model out/sst2/stage2    # dev metrics
    python eval.py --task sst2 --model DIR --predict      # GLUE test predictions (submission TSVs)
    python eval.py --task sst2 --model DIR --speed        # latency at 12/6/4/3/2/1 heads
    python eval.py --task squad1 --model DIR              # EM/F1, predictions-dev-v1.1.json
    python eval.py --task sst2 --model DIR --noise 0.1    # dev with a typo in 10% of the words
"""
import argparse
import dataclasses
import json
import os
import re
import string
import time

import numpy as np
import torch

import data
from model import Bert, fetch

# ----------------------------------------------------------------------------------------------
# A model's GLUE dev metrics: its outputs in length-sorted batches -> predictions -> the metric


def evaluate_glue(model, task, dev_sets, batch_size=128, device="cpu", fixed_padding=False, with_predictions=False):
    """{metric: value, "total": rows} on a GLUE task's encoded dev split(s) {split: dataset}, by the
    official metric(s) (the GLUE paper, Table 1), equal to scikit-learn's and scipy's (not called)
    but for a constant series: correlation 0 here, nan in scipy. MNLI's get the suffixes _m and
    _mm. CoLA, MRPC and QQP are binary: Matthews and F1 count class 1 as positive.
    with_predictions: (metrics, {split: class indices, or scores for STS-B})."""
    metrics, predictions = {}, {}
    for split, ds in dev_sets.items():
        logits = model_outputs(model, ds, batch_size, device, fixed_padding)[0].numpy()  # (N, C)
        preds = logits.argmax(-1) if data.TASKS[task].labels else logits[:, 0]  # STS-B: a score
        labels = ds["labels"].numpy()
        scores = {"acc": 100 * float(np.mean(preds == labels))}
        if task == "stsb":  # Spearman: Pearson of the ranks, ties given the mean rank they span
            ranks = [np.sum(v[:, None] > v, 1) + (np.sum(v[:, None] == v, 1) + 1) / 2
                     for v in (preds, labels)]  # rank = #smaller + (#equal + 1) / 2
            scores = {"pearson": 100 * pearson(preds, labels), "spearman": 100 * pearson(*ranks)}
        elif task == "cola":  # Matthews = Pearson of the two 0/1 series (the phi coefficient)
            scores = {"mcc": 100 * pearson(preds == 1, labels == 1)}
        elif task in ("mrpc", "qqp"):  # F1 of class 1, not macro-F1: 2 TP / (2 TP + FP + FN)
            tp = float(np.sum((preds == 1) & (labels == 1)))
            two_tp_fp_fn = float(np.sum(preds == 1) + np.sum(labels == 1))
            scores["f1"] = 0.0 if tp == 0 else 100 * 2 * tp / two_tp_fp_fn
        suffix = {"dev_matched": "_m", "dev_mismatched": "_mm"}.get(split, "")
        metrics.update({k + suffix: v for k, v in {**scores, "total": len(preds)}.items()})
        predictions[split] = preds
    return (metrics, predictions) if with_predictions else metrics


def model_outputs(model, dataset, batch_size=128, device="cpu", fixed_padding=False):
    """(logits, final [CLS] states) of an encoded dataset's rows, in order, float32 on the CPU. Rows
    go through shortest first, so that padding a batch to its longest row wastes little."""
    model.eval()
    order = torch.argsort(dataset["lengths"], stable=True)  # (N,)
    by_length = {k: dataset[k][order] for k in ("input_ids", "token_type_ids", "lengths")}
    width, logits, cls = dataset["input_ids"].shape[1], [], []
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=str(device).startswith("cuda")):
        for b in data.batches(by_length, batch_size, fixed_padding=fixed_padding):
            out = model(*(b[k].to(device) for k in ("input_ids", "token_type_ids", "attention_mask")))
            logits.append(out.logits.float().cpu())
            cls.append(out.hidden_states[-1][:, 0].float().cpu().clone())  # a CPU view would keep
            # the batch's (B, L, H) states alive: 0.4 MB a 256-token row at width 384
    if logits[0].dim() == 3:  # span logits (B, 2, width): to the dataset's width, never an answer
        logits = [torch.nn.functional.pad(z, (0, width - z.shape[-1]), value=-1e4) for z in logits]
    unsort = torch.argsort(order)  # back to the dataset's order
    logits, cls = torch.cat(logits)[unsort], torch.cat(cls)[unsort]
    if not (logits.isfinite().all() and cls.isfinite().all()):  # argmax would pick the first NaN
        raise FloatingPointError("the model's outputs are not finite: a diverged model")
    return logits, cls


def pearson(a, b):
    """Pearson's correlation of two series; 0 when either is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return 0.0 if denominator == 0 else float((a * b).sum() / denominator)


def format_metrics(metrics, digits=2):
    """'acc 91.25, total 872': metrics with two decimals (losses: more), counts as they are."""
    return ", ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.{digits}f}" for k, v in metrics.items())


# ----------------------------------------------------------------------------------------------
# SQuAD: the best spans -> EM and F1 (the official evaluate-v1.1.py and evaluate-v2.0.py)


def squad_version(task):
    """The SQuAD version of a task: 2.0 for squad2, else 1.1."""
    return "2.0" if task == "squad2" else "1.1"


def evaluate_squad(model, examples, features, version, batch_size=128, device="cpu"):
    """(scores, predictions, {id: null - best span score} (v2.0; {} for v1.1)): EM/F1 of the
    model's best spans; v2.0 also at the best threshold."""
    logits = model_outputs(model, features, batch_size, device)[0].numpy()  # (F, 2, L)
    preds, na = data.squad_predictions(examples, features, logits[:, 0], logits[:, 1], version=version)
    return squad_scores(examples, preds, version, na if version == "2.0" else None), preds, na


def squad_scores(dataset, predictions, version="1.1", na_scores=None):
    """EM and F1 in percent, each the max over the gold answers of read_squad's examples; a question
    without a prediction scores 0 (v1.1's rule; squad_predictions answers every one). v2.0: golds
    that normalise to "" are dropped ("" if none is left); the HasAns/NoAns splits (by the answer
    list as read) and, with na_scores {id: null - best span score}, the best threshold: the headline
    EM/F1 are the official script's without --na-prob-file, best_exact and best_f1 its figures with
    one (best_*_thresh too, but where answering nothing is best: then below every na score)."""
    exact, f1, has_answer = {}, {}, {}
    for ex in dataset:
        golds = [a["text"] for a in ex["answers"]]
        has_answer[ex["id"]] = bool(golds)  # the official: answerable by its list, not by its text
        if version == "2.0":
            golds = [g for g in golds if normalize_answer(g)] or [""]
        pred = predictions.get(ex["id"])
        if pred is None:
            exact[ex["id"]] = f1[ex["id"]] = 0.0
            continue
        exact[ex["id"]] = max(float(normalize_answer(pred) == normalize_answer(g)) for g in golds)
        f1[ex["id"]] = max(squad_f1(pred, g, version) for g in golds)
    splits = {"": list(exact)}
    if version == "2.0":
        splits["HasAns_"] = [i for i in exact if has_answer[i]]
        splits["NoAns_"] = [i for i in exact if not has_answer[i]]
    out = {}
    for prefix, ids in ((k, v) for k, v in splits.items() if v):
        out[prefix + "exact"] = 100 * float(np.mean([exact[i] for i in ids]))
        out[prefix + "f1"] = 100 * float(np.mean([f1[i] for i in ids]))
        out[prefix + "total"] = len(ids)
    for name, scores in (("exact", exact), ("f1", f1)) if na_scores is not None else ():
        # the official find_best_thresh: from "" for every question, admit the answers in order of
        # increasing na score (each replacing the empty answer's score: 1 if unanswerable, else 0),
        # keeping the best total. An unanswerable question loses its 1 to any non-empty answer
        current = best = sum(not has for has in has_answer.values())
        # below every na score: no question answered (the official's 0.0 is that for its
        # probabilities; a null - best score may be negative)
        threshold = min(na_scores.values(), default=1.0) - 1.0
        for i in sorted(scores, key=lambda i: na_scores[i]):
            current += scores[i] if has_answer[i] else -float(bool(predictions[i]))
            if current > best:
                best, threshold = current, float(na_scores[i])
        out[f"best_{name}"], out[f"best_{name}_thresh"] = 100.0 * best / len(scores), threshold
    return out


def normalize_answer(s):
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in string.punctuation)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_f1(prediction, gold, version="1.1"):
    """F1 of the normalised tokens of a prediction against one gold answer, as the official
    scripts: no common token scores 0 (v1.1, even when both are empty, as "the" against "a");
    v2.0 first: both empty is a match, one empty is not."""
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if version == "2.0" and not (p and g):
        return float(p == g)
    common = sum(min(p.count(w), g.count(w)) for w in set(p))  # official: Counter(p) & Counter(g)
    return 2 * common / (len(p) + len(g)) if common else 0.0  # 2PR / (P + R), P = common / |p|


# ----------------------------------------------------------------------------------------------
# The head a task needs (train.py builds and checks its models with these too)


# What a label means where GLUE's files write 0/1 (the GLUE paper's task descriptions).
LABEL_TEXT = {"cola": ["unacceptable", "acceptable"], "sst2": ["negative", "positive"],
              "mrpc": ["not_equivalent", "equivalent"], "qqp": ["not_duplicate", "duplicate"],
              "wnli": ["not_entailment", "entailment"]}


def head_config(task):
    """The head of a model of the task: classification with the task's labels, regression (STS-B),
    span (SQuAD) or none (tools/general_distill.py's task "general" trains no head)."""
    if task in data.TASKS and data.TASKS[task].labels:
        labels = list(data.TASKS[task].labels)
        return dict(head="classification", num_labels=len(labels), label_names=labels,
                    label_text=LABEL_TEXT.get(task, labels))
    head = {"general": "none", "squad1": "span", "squad2": "span"}.get(task, "regression")
    return dict(head=head, label_names=[], label_text=[])


def head_mismatch(model, task):
    """None when the model's head is the task's, else what differs ("has ..., but needs ..."). A
    head fine-tuned under another label order would be silently wrong (MNLI's three): refused too."""
    have, want = model.config, head_config(task)
    if have.head == want["head"] and have.num_labels == want.get("num_labels", have.num_labels):
        for key in ("label_names", "label_text"):  # the labels as the files write them; their meaning
            if list(getattr(have, key)) not in ([], want[key]):  # []: a model saved without them
                return f"has the labels {getattr(have, key)}, but --task {task}'s are {want[key]}"
        return None
    labels = f" with {have.num_labels} labels" if have.head == "classification" else ""
    shown = "no task head" if have.head == "none" else f"a {have.head} head{labels}"
    labels = f" with {want['num_labels']} labels" if "num_labels" in want else ""
    return f"has {shown}, but --task {task} needs a {want['head']} head{labels}"


# ----------------------------------------------------------------------------------------------
# train.py's eval stage: the teacher's and the student's dev metrics -> results.json


def report(args, teacher, teacher_dir, student_dir, evaluate):
    """train.py's eval stage: the teacher's and the saved student's metrics by evaluate(model) ->
    <out>/results.json and a few lines printed."""
    models = {"teacher": teacher, "student": Bert.from_pretrained(student_dir, verbose=False)}
    metrics = {name: evaluate(m.to(args.device)) for name, m in models.items()}
    t, s = (metrics[name][args.metric] for name in models)
    tp, sp = (m.num_parameters() for m in models.values())
    results = dict(task=args.task, metric=args.metric, split="dev", **metrics,
                   ratio=s / t if t > 0 else None, teacher_parameters=tp, student_parameters=sp,
                   teacher_dir=teacher_dir, student_dir=student_dir)
    data.remove_stale_temporaries(args.out)  # what a kill inside this write left on a last run
    data.atomic_write_text(os.path.join(args.out, "results.json"), json.dumps(results, indent=2))
    print(f"\n{args.task} dev (the student: Stage 2's best on dev by {args.metric})")
    for name, params in (("teacher", tp), ("student", sp)):
        print(f"  {name} ({params / 1e6:.1f}M parameters): " + format_metrics(metrics[name]))
    ratio = f"{100 * s / t:.1f}%" if t > 0 else f"none (the teacher's is {t:.2f})"  # MCC may be <= 0
    print(f"  student/teacher on {args.metric}: {ratio}, {tp / sp:.1f}x fewer parameters; "
          f"{os.path.join(args.out, 'results.json')}")
    print(f"  loss curves of every stage: python tools/pages.py {args.out}")
    return results


# ----------------------------------------------------------------------------------------------
# The command: dev metrics by default; SQuAD, test predictions, speed on request


def main(argv=None):
    """Score --model on the task's dev set with the official metric, or run the mode asked for."""
    args = parse_args(argv)
    directory = args.model = fetch(args.model)
    model = Bert.from_pretrained(directory).to(args.device)
    positions = model.config.max_position_embeddings
    for flag, length in (("--max_len", args.max_len), ("--speed_length", args.speed_length)):
        if length and length > positions:
            raise ValueError(f"{flag} {length}: the model has {positions} positions; give fewer")
    trained, saved = trained_settings(directory), os.path.join(directory, "args.json")
    task_len = 384 if args.task.startswith("squad") else data.TASKS[args.task].max_len
    for name, default in (("data_dir", os.environ.get("MLKD_DATA", "data")),
                          ("max_len", min(task_len, positions))):
        if getattr(args, name) is None:  # not given: the model's (its args.json), else the default
            setattr(args, name, trained.get(name) or default)
            print(f"{name} {getattr(args, name)} ({'from ' + saved if trained.get(name) else 'default'})")
    args.paper_exact = trained.get("paper_exact", False)
    if args.speed:
        length = args.speed_length or args.max_len  # the max_len said above
        return speed(model, args.speed_batch, length, device=args.device, verbose=True)
    why = head_mismatch(model, args.task)
    if why:
        hint = "a pre-trained model or General student is not fine-tuned on any task" \
            if model.config.head == "none" else "score it on the task it was trained on"
        raise ValueError(f"--model {directory}: {why}; {hint}")
    if trained.get("task", args.task) not in (args.task, "mnli" if args.task == "ax" else None):
        raise ValueError(f"--model {directory} was trained on {trained['task']} (its args.json), "
                         f"not {args.task}: pass --task {trained['task']}")
    vocab = os.path.join(directory, "vocab.txt")
    if not os.path.exists(vocab):
        raise ValueError(f"--model {directory}: no vocab.txt, the word pieces it reads (train.py "
                         "saves one with each model)")
    if len(data.read_text(vocab).splitlines()) > model.config.vocab_size:
        raise ValueError(f"{vocab}: more word pieces than the model's vocab_size "
                         f"{model.config.vocab_size}: not the model's vocabulary")
    tok = data.Tokenizer(vocab)
    if os.path.exists(os.path.join(directory, "projections.safetensors")):  # Stage 1 kept W_m
        print(f"note: {directory} is a Stage-1 student: Stage 1 never trains the task head, so "
              "this scores an untrained classifier; the distilled student is in stage2")
    if os.path.exists(os.path.join(directory, "log.jsonl")) and not os.path.exists(
            os.path.join(directory, "metrics.json")):  # train.py's, till the stage finishes
        print(f"note: {directory} is a stage that has not finished (no metrics.json): this scores "
              "its model so far")
    if args.task.startswith("squad"):
        return score_squad(model, tok, args)
    return write_test_predictions(model, tok, args) if args.predict else score_dev(model, tok, args)


def score_dev(model, tok, args):
    """The dev metrics of a GLUE model (--noise: on dev with typos, kept in noise-P.json, or
    noise-P-seedS.json for --noise_seed S > 0), and how often it predicts each class (a model that
    learnt only the class prior shows here)."""
    task, directory, noise = data.TASKS[args.task], args.model, {}
    seed = f"-seed{args.noise_seed}" if args.noise_seed else ""  # in the files' names but seed 0's
    examples = {s: data.read_glue(args.task, s, args.data_dir, args.allow_partial)
                for s in task.dev_splits}
    for split in examples if args.noise else ():
        examples[split], words, changed = with_typos(examples[split], args.noise, args.noise_seed)
        rows = [f"{e.guid}\t{e.label}\t{e.text_a}\t{e.text_b or ''}\n" for e in examples[split]]
        path = os.path.join(directory, f"noise-{args.noise:g}{seed}-{split}.tsv")
        data.atomic_write_text(path, "guid\tlabel\ttext_a\ttext_b\n" + "".join(rows))
        noise[split] = {"words": words, "changed": changed}
        print(f"{split}: a typo in {changed:,} of {words:,} words (seed {args.noise_seed}); "
              f"the noisy set is {path}")
    dev = {s: data.encode_glue(args.task, ex, tok, args.max_len) for s, ex in examples.items()}
    metrics, predictions = evaluate_glue(model, args.task, dev, args.batch_size, args.device,
                                         args.paper_exact, with_predictions=True)
    print(f"{args.task} dev{f' with noise {args.noise:g}' if args.noise else ''}: "
          + format_metrics(metrics))
    if args.noise:
        record = {**metrics, "noise": args.noise, "seed": args.noise_seed, "splits": noise}
        path = os.path.join(directory, f"noise-{args.noise:g}{seed}.json")
        data.atomic_write_text(path, json.dumps(record, indent=2))
    for split, p in predictions.items() if task.labels else ():
        counts = ", ".join(f"{c} {n}" for c, n in zip(task.labels, np.bincount(p, minlength=len(task.labels))))
        print(f"{split} predictions: {counts}")
    return metrics


def score_squad(model, tok, args):
    """EM/F1 on the SQuAD dev file, and the predictions in <model>/predictions-<its name>; v2.0
    also the null scores in <model>/na-prob-<its name>, the official evaluate-v2.0.py's
    --na-prob-file (Google's run_squad.py writes them as null_odds.json): with it that script
    gives the best_* figures too."""
    version = squad_version(args.task)
    path = args.squad_file or os.path.join(args.data_dir, "squad", f"dev-v{version}.json")
    examples = data.read_squad(path, args.allow_partial, version)
    features = data.squad_features(examples, tok, max_len=args.max_len, train=False)
    scores, preds, na = evaluate_squad(model, examples, features, version, args.batch_size,
                                       args.device)
    out = os.path.join(args.model, f"predictions-{os.path.basename(path)}")  # one per file scored
    data.atomic_write_text(out, json.dumps(preds, ensure_ascii=False))
    print(f"SQuAD v{version} ({path}): {format_metrics(scores)}\nwrote {out}")
    if version == "2.0":
        na_file = os.path.join(args.model, f"na-prob-{os.path.basename(path)}")
        data.atomic_write_text(na_file, json.dumps(na))
        print(f"wrote {na_file}; the official check: python evaluate-v2.0.py {path} {out} "
              f"--na-prob-file {na_file}")
    return scores


def write_test_predictions(model, tok, args):
    """The GLUE server's format: <TASK>.tsv of 'index<TAB>prediction', labels or STS-B scores."""
    names = {"test_matched": "MNLI-m", "test_mismatched": "MNLI-mm"}
    jobs = [(args.task, s) for s in data.TASKS[args.task].test_splits]
    jobs += [("ax", "test")] if args.task == "mnli" else []  # MNLI's submission has AX too
    for task, split in jobs:
        examples = data.read_glue(task, split, args.data_dir, args.allow_partial)
        encoded = data.encode_glue(task, examples, tok, args.max_len)
        logits = model_outputs(model, encoded, args.batch_size, args.device, args.paper_exact)[0]
        labels = data.TASKS[task].labels
        preds = logits.argmax(-1).tolist() if labels else logits[:, 0].tolist()
        rows = [f"{e.guid}\t{labels[p] if labels else f'{p:.3f}'}\n" for e, p in zip(examples, preds)]
        name = "AX" if task == "ax" else names.get(split, data.TASKS[task].folder)
        path = os.path.join(args.model, f"{name}.tsv")
        data.atomic_write_text(path, "index\tprediction\n" + "".join(rows))
        print(f"wrote {path} ({len(rows)} predictions)")


# ----------------------------------------------------------------------------------------------
# Machinery: the flags, a model's saved settings, typos (--noise), latency (--speed)


def check_model_flags(p, args):
    """Refuse, through parser p, a --model that is neither a directory nor a hub name and a
    --max_len with no room for the special tokens (eval.py and tools/relations.py)."""
    if not os.path.exists(args.model) and args.model.count("/") != 1:  # else a hub name
        p.error(f"--model {args.model}: no such directory")
    least = 5 if data.is_pair(args.task) else 3
    if args.max_len is not None and not least <= args.max_len <= 512:
        p.error(f"--max_len {args.max_len}: must be in {least}..512 (room for the special tokens "
                "and one word piece of each text)")


def parse_args(argv=None):
    """eval.py's flags, each checked before a model is read; an error prints one usage line."""
    p = argparse.ArgumentParser(prog="eval.py", usage="%(prog)s --task T --model DIR [flags, see --help]",
                                description="Score a saved model on GLUE or SQuAD, official metric.")
    p.add_argument("--task", required=True, choices=[*data.TASKS, "squad1", "squad2"])
    p.add_argument("--model", required=True, help="a directory train.py wrote, or a hub name")
    p.add_argument("--data_dir", help="holds glue/, squad/ (default: the model's, $MLKD_DATA, data)")
    p.add_argument("--batch_size", type=int, default=128, help="default 128")
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:N (default: cuda where there is one)")
    p.add_argument("--predict", action="store_true", help="write GLUE test predictions to --model")
    p.add_argument("--speed", action="store_true", help="latency and throughput at 12..1 heads")
    p.add_argument("--speed_batch", type=int, default=32, help="--speed's batch (default 32)")
    p.add_argument("--speed_length", type=int, help="default: --max_len (the model's, else the "
                   "task's)")
    p.add_argument("--squad_file", help="SQuAD dev JSON (default: <data_dir>/squad/dev-v*.json)")
    p.add_argument("--max_len", type=int, help="encoding (SQuAD: window) length (default: the one "
                   "the model was trained and selected with, in its args.json; else the task's)")
    p.add_argument("--allow_partial", action="store_true", help="score on a dev file with fewer or "
                   "more rows than the official one (refused otherwise)")
    p.add_argument("--noise", type=float, metavar="P", help="score on dev with a typo in a fraction "
                   "P of the words (seeded); the noisy set and metrics go to <model>/noise-P*")
    p.add_argument("--noise_seed", type=int, default=0, help="seeds the typos (default 0)")
    args = p.parse_args(argv)
    if args.noise is not None and not (0 < args.noise <= 1 and args.task in data.TASKS):
        p.error(f"--noise {args.noise}: a fraction of words in (0, 1], for GLUE tasks")
    if args.noise_seed < 0:  # numpy's generator takes none
        p.error(f"--noise_seed {args.noise_seed}: a whole number >= 0")
    if args.noise and (args.predict or args.speed):  # the typos go into dev alone
        p.error("--noise scores the dev set; run --predict or --speed without it")
    if args.predict and (args.speed or args.task.startswith("squad")):
        p.error("--predict writes GLUE test predictions (SQuAD's test set is not public); run "
                "--speed or SQuAD without it")
    if args.task == "ax" and not (args.predict or args.speed):  # GLUE's diagnostic set
        p.error("--task ax has test labels only: --task ax --predict (or --task mnli --predict, "
                "which writes AX.tsv too) with an MNLI model")
    check_model_flags(p, args)
    for name in ("batch_size", "speed_batch", "speed_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    writes = args.noise or args.predict or args.task.startswith("squad")
    if writes and os.path.isdir(args.model) and not os.access(args.model, os.W_OK):
        p.error(f"--model {args.model}: not writable, and eval.py writes its results there; copy it "
                "to a directory you can write to")
    return args


def device(text):
    """The type of --device (eval.py, train.py, tools/relations.py): cpu, cuda or cuda:N, a GPU
    this torch sees."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text}: use cpu, cuda or cuda:N")
    if text != "cpu" and int(text[5:] or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this torch ({torch.__version__}) sees "
                                         f"{torch.cuda.device_count()} CUDA GPUs; use --device cpu")
    return text


def trained_settings(directory):
    """The settings eval.py and tools/relations.py reuse from the args.json train.py saved with a
    model (else {})."""
    path = os.path.join(directory, "args.json")
    saved = data.read_json(path) if os.path.exists(path) else {}
    keep = ("max_len", "paper_exact", "layer_map", "splits", "mha_temperature", "data_dir", "task",
            "teacher_crc32")  # the last two: relations.py checks its --task and --teacher
    return {k: saved[k] for k in keep if k in saved}


def with_typos(examples, p, seed=0):
    """The examples with one typo (a letter swapped with its neighbour, dropped, inserted or
    substituted, drawn uniformly; the case kept) in a seeded random fraction p of their words
    (space-separated tokens with a letter) across the set. Returns (examples, words, changed)."""
    rng = np.random.default_rng(seed)
    texts = [[e.text_a.split(" "), None if e.text_b is None else e.text_b.split(" ")]
             for e in examples]
    words = [(i, f, w) for i, t in enumerate(texts) for f in (0, 1) if t[f]
             for w, token in enumerate(t[f]) if any(c.isalpha() for c in token)]
    chosen = sorted(rng.choice(len(words), size=round(p * len(words)), replace=False).tolist())
    for i, f, w in (words[k] for k in chosen):
        word = texts[i][f][w]
        letters = [at for at, c in enumerate(word) if c.isalpha()]
        pairs = [at for at in letters if at + 1 in letters and word[at] != word[at + 1]]
        op, at = int(rng.integers(4)), int(rng.choice(letters))
        new = string.ascii_lowercase[rng.integers(26)]
        new = new.upper() if word[at].isupper() else new
        if op == 0 and pairs:  # swap two neighbouring letters
            at = int(rng.choice(pairs))
            word = word[:at] + word[at + 1] + word[at] + word[at + 2:]
        elif op == 1 and len(word) > 1:  # drop a letter
            word = word[:at] + word[at + 1:]
        elif op == 2:  # insert one
            word = word[:at] + new + word[at:]
        else:  # substitute one (also for a word too short for the drawn typo)
            while new.lower() == word[at].lower():
                new = string.ascii_lowercase[rng.integers(26)]
                new = new.upper() if word[at].isupper() else new
            word = word[:at] + new + word[at + 1:]
        texts[i][f][w] = word
    noisy = [dataclasses.replace(e, text_a=" ".join(a), text_b=None if b is None else " ".join(b))
             for e, (a, b) in zip(examples, texts)]
    return noisy, len(words), len(chosen)


def speed(model, batch, length, heads=(12, 6, 4, 3, 2, 1), iters=20, warmup=5, device="cpu", verbose=False):
    """Median latency (ms) and throughput (samples/s) of the model re-headed to each head count, the
    same weights and FLOPs: what the paper's claim that fewer heads are faster is about."""
    cuda, rows = str(device).startswith("cuda"), []
    if verbose:
        print(f"speed: batch {batch} x length {length}, {device}{' bf16' if cuda else ' fp32'}, "
              f"{torch.get_num_threads()} threads")
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=device)
    mask = torch.ones_like(ids)
    for h in [h for h in heads if model.config.hidden_size % h == 0]:
        m = Bert(dataclasses.replace(model.config, num_attention_heads=h)).to(device).eval()
        m.load_state_dict(model.state_dict())
        times = []
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=cuda):
            for _ in range(warmup + iters):
                start = time.perf_counter()
                m(ids, None, mask)
                if cuda:
                    torch.cuda.synchronize()  # the GPU has finished this pass
                times.append(time.perf_counter() - start)
        ms = 1000 * float(np.median(times[warmup:]))
        rows.append({"heads": h, "latency_ms": ms, "samples_per_s": 1000 * batch / ms})
        if verbose:
            print(f"  {h:2d} heads: {ms:9.1f} ms/batch  {1000 * batch / ms:9.1f} samples/s  "
                  f"x{rows[0]['latency_ms'] / ms:.2f} vs {rows[0]['heads']} heads")
    return rows


if __name__ == "__main__":
    import shlex
    import sys
    if "--show" in sys.argv:  # the relation page moved to tools/relations.py: its command, exit 2
        at = sys.argv.index("--show")
        flags = [{"--show_out": "--out"}.get(f, f) for f in sys.argv[1:at] + sys.argv[at + 2:]]
        new = ["python", "tools/relations.py", *flags, *sys.argv[at + 1:at + 2]]
        print(f"eval.py: error: --show moved, run: {shlex.join(new)}", file=sys.stderr)
        sys.exit(2)
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError, data.DownloadError, OSError) as e:
        raise SystemExit(f"error: {data.error_line(e, 'a model directory')}")
