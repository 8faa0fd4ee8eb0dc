"""eval.py: score a saved model with the official metric, write test predictions, measure speed, and draw
a run's loss curves and the relation maps of teacher and student.

Chapter 3 of mlkd. Metrics are restated from their definitions (GLUE paper and the scikit-learn /
scipy conventions its leaderboard uses; the official SQuAD v1.1 and v2.0 evaluation scripts), in
numpy only. Every number is in percent, as the leaderboards and the official scripts print them.

    python eval.py --task sst2 --model out/sst2/stage2             # dev metrics
    python eval.py --task sst2 --model out/sst2/stage2 --predict   # GLUE test predictions (submission TSV)
    python eval.py --task sst2 --model out/sst2/stage2 --speed     # latency at 12/6/4/3/2/1 heads
    python eval.py --task squad1 --model DIR                       # EM/F1 + predictions.json
    python eval.py --task sst2 --model DIR --teacher T --show "a sentence"   # relations.html: teacher vs student
    python eval.py --task sst2 --model DIR --noise 0.1              # dev with a typo in 10% of the words

Reading order: the metrics, how a model is scored, the command (main and its modes); then machinery.
Imports data, model, and mlkd (whose relation functions the --show page draws); train.py sits above it.
"""
import argparse
import collections
import dataclasses
import html
import json
import os
import re
import string
import sys
import time

import numpy as np
import torch

import data
import mlkd
from model import Bert, fetch


# ----------------------------------------------------------------------------------------------
# GLUE metrics


def matthews(preds, labels):
    """(TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)); 0 when the denominator is 0."""
    p, y = np.asarray(preds) == 1, np.asarray(labels) == 1
    tp, tn, fp, fn = (float(np.sum(a & b)) for a, b in ((p, y), (~p, ~y), (p, ~y), (~p, y)))
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denominator == 0 else (tp * tn - fp * fn) / denominator


def f1_positive(preds, labels):
    """Binary F1 of the positive class 1: 2TP / (2TP + FP + FN) (not macro-F1); 0 when undefined."""
    p, y = np.asarray(preds) == 1, np.asarray(labels) == 1
    tp, fp, fn = np.sum(p & y), np.sum(p & ~y), np.sum(~p & y)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def average_ranks(x):
    """Ranks 1..n, ties given the mean of the ranks they span (scipy's rankdata 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.r_[0, np.nonzero(np.diff(sorted_x))[0] + 1]   # first index of each run of ties
    ends = np.r_[starts[1:], len(x)]
    run_rank = (starts + ends + 1) / 2.0                      # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def pearson(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return 0.0 if denominator == 0 else float((a * b).sum() / denominator)


def glue_metrics(task, preds, labels):
    """Official metric(s) of a GLUE task, in percent. preds: class indices, or scores for STS-B."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    if task == "stsb":
        return {"pearson": 100 * pearson(preds, labels),
                "spearman": 100 * pearson(average_ranks(preds), average_ranks(labels))}
    out = {"acc": 100 * float(np.mean(preds == labels))}
    if task in ("mrpc", "qqp"):
        out["f1"] = 100 * float(f1_positive(preds, labels))
    if task == "cola":
        out = {"mcc": 100 * float(matthews(preds, labels))}
    return out


# ----------------------------------------------------------------------------------------------
# SQuAD metrics (official evaluate-v1.1.py and evaluate-v2.0.py, restated)


def normalize_answer(s):
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_f1(prediction, gold):
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:  # v2.0: both empty is a match, one empty is not
        return float(p == g)
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_scores(dataset, predictions, version="1.1", na_scores=None):
    """EM and F1 in percent, max over the gold answers. dataset: read_squad's list of examples.

    A question without a prediction scores 0 and counts in the total (v1.1's rule; we apply it to
    v2.0 as well, where the official script would skip it). v2.0: gold answers that normalise to ""
    are dropped and an unanswerable question's only gold is ""; HasAns/NoAns splits are reported and,
    with na_scores {id: null score - best span score}, the best threshold and its EM/F1.
    """
    exact, f1, has_answer = {}, {}, {}
    for ex in dataset:
        golds = [a["text"] for a in ex["answers"]]
        if version == "2.0":
            golds = [g for g in golds if normalize_answer(g)] or [""]
        has_answer[ex["id"]] = golds != [""]
        pred = predictions.get(ex["id"])
        if pred is None:
            exact[ex["id"]] = f1[ex["id"]] = 0.0
            continue
        exact[ex["id"]] = max(float(normalize_answer(pred) == normalize_answer(g)) for g in golds)
        f1[ex["id"]] = max(squad_f1(pred, g) for g in golds)
    ids = list(exact)
    out = {"exact": 100 * np.mean([exact[i] for i in ids]), "f1": 100 * np.mean([f1[i] for i in ids]),
           "total": len(ids)}
    if version == "2.0":
        for name, keep in (("HasAns", True), ("NoAns", False)):
            sub = [i for i in ids if has_answer[i] == keep]
            if sub:
                out[f"{name}_exact"] = 100 * np.mean([exact[i] for i in sub])
                out[f"{name}_f1"] = 100 * np.mean([f1[i] for i in sub])
                out[f"{name}_total"] = len(sub)
        if na_scores is not None:
            for name, scores in (("exact", exact), ("f1", f1)):
                out[f"best_{name}"], out[f"best_{name}_thresh"] = best_threshold(ids, scores, has_answer, na_scores)
    return {k: float(v) if isinstance(v, (np.floating, float)) else v for k, v in out.items()}


def best_threshold(ids, scores, has_answer, na_scores):
    """Sweep the null-score threshold (official find_best_thresh): start from predicting "" everywhere,
    then admit answers in order of increasing na score, keeping the best total."""
    current = best = sum(not has_answer[i] for i in ids)
    threshold = 0.0
    for i in sorted(ids, key=lambda i: na_scores[i]):
        current += scores[i] - (not has_answer[i])  # the answer's score replaces the empty answer's
        if current > best:
            best, threshold = current, na_scores[i]
    return 100.0 * best / len(ids), threshold


# ----------------------------------------------------------------------------------------------
# Noisy input: is a distilled student as robust to typos as its teacher? (eval.py --noise P)


def typo(word, rng):
    """One character-level typo in a word: swap two neighbouring letters, drop, insert or substitute a
    letter (chosen uniformly; a word too short for the drawn typo gets a substitution). Case is kept."""
    letters = [i for i, c in enumerate(word) if c.isalpha()]
    pairs = [i for i in letters if i + 1 in letters and word[i] != word[i + 1]]
    op, i = int(rng.integers(4)), int(rng.choice(letters))
    new = string.ascii_lowercase[rng.integers(26)]
    new = new.upper() if word[i].isupper() else new
    if op == 0 and pairs:
        j = int(rng.choice(pairs))
        return word[:j] + word[j + 1] + word[j] + word[j + 2:]
    if op == 1 and len(word) > 1:
        return word[:i] + word[i + 1:]
    if op == 2:
        return word[:i] + new + word[i:]
    while new.lower() == word[i].lower():
        new = string.ascii_lowercase[rng.integers(26)]
    return word[:i] + new + word[i + 1:]


def with_typos(examples, p, seed=0):
    """The examples with a typo in a seeded random fraction p of their words (space-separated tokens with
    a letter), across the whole set; labels unchanged. Returns (examples, words, words changed)."""
    rng = np.random.default_rng(seed)
    texts = [[e.text_a.split(" "), e.text_b.split(" ") if e.text_b is not None else None] for e in examples]
    words = [(i, f, w) for i, t in enumerate(texts) for f in (0, 1) if t[f] for w, tok in enumerate(t[f])
             if any(c.isalpha() for c in tok)]
    chosen = sorted(rng.choice(len(words), size=round(p * len(words)), replace=False).tolist())
    for k in chosen:
        i, f, w = words[k]
        texts[i][f][w] = typo(texts[i][f][w], rng)
    noisy = [dataclasses.replace(e, text_a=" ".join(t[0]), text_b=" ".join(t[1]) if t[1] is not None else None)
             for e, t in zip(examples, texts)]
    return noisy, len(words), len(chosen)


# ----------------------------------------------------------------------------------------------
# Scoring a model: its outputs on an encoded set, predictions, the official metric


@torch.no_grad()
def model_outputs(model, dataset, batch_size=128, device="cpu", fixed_padding=False):
    """(logits, [CLS] states) of every row of an encoded dataset, in order, float32 on the CPU: (N, ...)
    and (N, d). Rows are batched by length (shortest first) so that dynamic padding wastes little, then
    put back in order. Span logits are padded to the dataset width with the model's pad value."""
    model.eval()
    logits, cls = [], []
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=str(device).startswith("cuda"))
    order = torch.argsort(dataset["lengths"], stable=True)  # (N,)
    by_length = {k: v[order] for k, v in dataset.items() if k in ("input_ids", "token_type_ids", "lengths")}
    for b in data.batches(by_length, batch_size, fixed_padding=fixed_padding):
        with autocast:
            out = model(b["input_ids"].to(device), b["token_type_ids"].to(device), b["attention_mask"].to(device))
        z, width = out.logits, out.logits.shape[-1]  # span logits: (B, 2, width)
        if z.dim() == 3 and width < dataset["input_ids"].shape[1]:
            z = torch.nn.functional.pad(z, (0, dataset["input_ids"].shape[1] - width), value=-1e4)
        logits.append(z.float().cpu())
        cls.append(out.hidden_states[-1][:, 0].float().cpu())
    unsort = torch.argsort(order)  # back to the dataset's order
    return torch.cat(logits)[unsort], torch.cat(cls)[unsort]


def predict_logits(model, dataset, batch_size=128, device="cpu", fixed_padding=False):
    """Logits of every row of an encoded dataset, in order, as a float32 numpy array."""
    return model_outputs(model, dataset, batch_size, device, fixed_padding)[0].numpy()


def predictions_from_logits(task, logits):
    return logits[:, 0] if data.TASKS[task].is_regression else logits.argmax(-1)


def predict_glue(model, task, dev_sets, batch_size=128, device="cpu", fixed_padding=False):
    """{split: predictions} over the task's dev split(s): class indices, or scores for STS-B."""
    return {split: predictions_from_logits(task, predict_logits(model, ds, batch_size, device, fixed_padding))
            for split, ds in dev_sets.items()}


def score_glue(task, dev_sets, predictions):
    """{metric: value, "total": rows scored} over the task's dev split(s); MNLI's get suffixes _m and _mm."""
    metrics = {}
    for split, ds in dev_sets.items():
        m = {**glue_metrics(task, predictions[split], ds["labels"].numpy()), "total": len(ds["labels"])}
        suffix = {"dev_matched": "_m", "dev_mismatched": "_mm"}.get(split, "")
        metrics.update({k + suffix: v for k, v in m.items()})
    return metrics


def evaluate_glue(model, task, dev_sets, batch_size=128, device="cpu", fixed_padding=False):
    return score_glue(task, dev_sets, predict_glue(model, task, dev_sets, batch_size, device, fixed_padding))


def evaluate_squad(model, examples, features, version, batch_size=128, device="cpu"):
    """(scores, predictions): EM/F1 of the model's best spans; v2.0 with the null-score threshold 0
    and, from the null-minus-best scores, the best threshold."""
    logits = predict_logits(model, features, batch_size, device)  # (F, 2, L)
    preds, na = data.squad_predictions(examples, features, logits[:, 0], logits[:, 1], version=version)
    return squad_scores(examples, preds, version, na if version == "2.0" else None), preds


def squad_version(task):
    return "2.0" if task == "squad2" else "1.1"


def format_metrics(metrics, digits=2):
    """'acc 91.25, total 872': metrics with two decimals (losses: more), counts as they are."""
    return ", ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.{digits}f}" for k, v in metrics.items())


# ----------------------------------------------------------------------------------------------
# The command: dev metrics by default; SQuAD, test predictions, speed and the relation page on request


def main(argv=None):
    """Score --model on the task's dev set with the official metric, or run one of the other modes."""
    args = parse_args(argv)
    directory = args.model = fetch(args.model)
    trained, saved = trained_settings(directory), os.path.join(directory, "args.json")
    if args.data_dir is None:
        args.data_dir = trained.get("data_dir") or os.environ.get("MLKD_DATA", "data")
        print(f"data_dir {args.data_dir} ({'from ' + saved if 'data_dir' in trained else 'default'})")
    args.paper_exact = trained.get("paper_exact", False)
    if args.max_len is None:
        task_default = 384 if args.task.startswith("squad") else data.TASKS[args.task].max_len
        args.max_len = trained.get("max_len") or task_default
        print(f"max_len {args.max_len} ({'from ' + saved if 'max_len' in trained else 'task default'})")
    model = Bert.from_pretrained(directory).to(args.device)
    tok = data.Tokenizer(os.path.join(directory, "vocab.txt"))
    if args.show:
        return show(args, model, teacher=Bert.from_pretrained(fetch(args.teacher), verbose=False).to(args.device),
                    tok=tok, trained=trained)
    if args.speed:
        return print_speed(model, args, length=args.speed_length or trained.get("max_len", 128))
    why = head_mismatch(model, args.task)
    if why:
        raise ValueError(f"--model {directory}: {why}" + ("; a pre-trained model or General student is not fine-tuned "
                         "on any task" if model.config.head == "none" else "; score it on the task it was trained on"))
    if os.path.exists(os.path.join(directory, "projections.safetensors")):  # stage1/ (and general/) keep W_0..W_M
        print(f"note: {directory} is a Stage-1 student: Stage 1 never trains the task head, so this scores an "
              "untrained classifier; the distilled student is the stage2 directory")
    if args.task.startswith("squad"):
        return eval_squad(model, tok, args)
    check_labels(model, args.task)
    if args.predict:
        return write_test_predictions(model, tok, args)
    return score_dev(model, tok, args)


def score_dev(model, tok, args):
    """The dev metrics of a GLUE model (--noise: on dev with typos, kept in noise-P.json), and how many
    times it predicts each class."""
    task, directory = data.TASKS[args.task], args.model
    examples = {s: data.read_glue(args.task, s, args.data_dir, args.allow_partial) for s in task.dev_splits}
    noise = {}
    for split in examples if args.noise else ():
        examples[split], words, changed = with_typos(examples[split], args.noise, args.noise_seed)
        lines = [f"{e.guid}\t{e.label}\t{e.text_a}\t{e.text_b or ''}" for e in examples[split]]
        path = os.path.join(directory, f"noise-{args.noise:g}-{split}.tsv")
        data.atomic_write_text(path, "guid\tlabel\ttext_a\ttext_b\n" + "\n".join(lines) + "\n")
        noise[split] = {"words": words, "changed": changed}
        print(f"{split}: a typo in {changed:,} of {words:,} words (seed {args.noise_seed}); the noisy set is {path}")
    dev = {s: data.encode_glue(args.task, ex, tok, args.max_len) for s, ex in examples.items()}
    predictions = predict_glue(model, args.task, dev, args.batch_size, args.device, args.paper_exact)
    metrics = score_glue(args.task, dev, predictions)
    print(f"{args.task} dev{f' with noise {args.noise:g}' if args.noise else ''}: " + format_metrics(metrics))
    if args.noise:
        record = {**metrics, "noise": args.noise, "seed": args.noise_seed, "splits": noise}
        data.atomic_write_text(os.path.join(directory, f"noise-{args.noise:g}.json"), json.dumps(record, indent=2))
    if not task.is_regression:  # a model that learnt only the class prior shows here
        for split, p in predictions.items():
            counts = np.bincount(p, minlength=len(task.labels))
            print(f"{split} predictions: " + ", ".join(f"{name} {n}" for name, n in zip(task.labels, counts)))
    return metrics


def eval_squad(model, tok, args):
    version = squad_version(args.task)
    path = args.squad_file or os.path.join(args.data_dir, "squad", f"dev-v{version}.json")
    examples = data.read_squad(path, args.allow_partial)
    features = data.squad_features(examples, tok, max_len=args.max_len, train=False)
    scores, preds = evaluate_squad(model, examples, features, version, args.batch_size, args.device)
    out = os.path.join(args.model, "predictions.json")
    data.atomic_write_text(out, json.dumps(preds, ensure_ascii=False))
    print(f"SQuAD v{version} ({path}): " + format_metrics(scores))
    print(f"wrote {out}")
    return scores


def write_test_predictions(model, tok, args):
    """GLUE server format: <TASK>.tsv with 'index<TAB>prediction', label strings or STS-B scores."""
    names = {"test_matched": "MNLI-m", "test_mismatched": "MNLI-mm"}
    splits = data.TASKS[args.task].test_splits
    jobs = [(args.task, s) for s in splits] + ([("ax", "test")] if args.task == "mnli" else [])
    for task, split in jobs:
        examples = data.read_glue(task, split, args.data_dir, args.allow_partial)
        encoded = data.encode_glue(task, examples, tok, args.max_len)
        logits = predict_logits(model, encoded, args.batch_size, args.device, args.paper_exact)
        preds = predictions_from_logits(task, logits)
        labels = data.TASKS[task].labels
        name = "AX" if task == "ax" else names.get(split, data.TASKS[task].folder)
        lines = ["index\tprediction"] + [f"{e.guid}\t{p:.3f}" if not labels else f"{e.guid}\t{labels[p]}"
                                         for e, p in zip(examples, preds)]
        path = os.path.join(args.model, f"{name}.tsv")
        data.atomic_write_text(path, "\n".join(lines) + "\n")
        print(f"wrote {path} ({len(examples)} predictions)")


def show(args, model, teacher, tok, trained):
    """--show: the relation page of one sentence and, on the first 32 dev rows, the sharpness of every relation
    (printed, and kept in <model>/relations.json), with the layer map, splits and temperature the model was
    trained with."""
    kind, splits = trained.get("layer_map", "uniform"), trained.get("splits", 12)
    temperature = args.mha_temperature or trained.get("mha_temperature", 1.0)
    dev = None
    if args.task in data.TASKS:
        split = data.TASKS[args.task].dev_splits[0]
        examples = data.read_glue(args.task, split, args.data_dir, args.allow_partial)
        dev = data.encode_glue(args.task, examples, tok, args.max_len)
    labelled = dev is not None and not data.TASKS[args.task].is_regression  # G sorted by class label
    out = args.show_out or os.path.join(args.model, "relations.html")
    page = relation_page(model, teacher, tok, args.show, dev if labelled else None, splits, args.device, kind)
    data.atomic_write_text(out, page)
    print(f"wrote {out}")
    if dev is None:
        return out
    batch = {k: v.to(args.device) for k, v in next(data.batches({k: v[:32] for k, v in dev.items()}, 32)).items()}
    lmap = mlkd.layer_map(teacher.config.num_hidden_layers, model.config.num_hidden_layers, kind)
    rows = relation_sharpness(model, teacher, batch, lmap, splits, temperature)
    print(f"relation sharpness on the first {len(batch['index'])} dev rows (L_MHA temperature {temperature:g}; "
          "H/log n: 1 = uniform, 0 = one-hot)")
    print("\n".join(sharpness_table(rows)))
    path = os.path.join(os.path.dirname(out), "relations.json")
    data.atomic_write_text(path, json.dumps({"temperature": temperature, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return out


def print_speed(model, args, length):
    """--speed: the model's latency re-headed to 12/6/4/3/2/1 heads (speed), as a table."""
    print(f"speed: batch {args.speed_batch} x length {length}, {args.device}"
          f"{' bf16' if args.device.startswith('cuda') else ' fp32'}, {torch.get_num_threads()} threads")
    rows = speed(model, args.speed_batch, length, device=args.device)
    for r in rows:
        heads = f"{r['heads']:2d} head{'s' if r['heads'] > 1 else ' '}"
        print(f"  {heads}: {r['latency_ms']:9.1f} ms/batch  {r['samples_per_s']:9.1f} samples/s  "
              f"x{rows[0]['latency_ms'] / r['latency_ms']:.2f} vs {rows[0]['heads']} heads")
    return rows


# ----------------------------------------------------------------------------------------------
# Machinery. A reader of the metrics may stop here: the flags, what a saved model was trained with, its head,
# the speed measurement, and the pages (loss curves, relation maps)


def parse_args(argv=None):
    """eval.py's flags, each checked before a model is read."""
    p = argparse.ArgumentParser(description="Evaluate a saved model on a GLUE task or SQuAD with the official metric.")
    p.add_argument("--task", required=True, choices=[*data.TASKS, "squad1", "squad2"])
    p.add_argument("--model", required=True,
                   help="a model directory written by train.py (or any Bert.from_pretrained input)")
    p.add_argument("--data_dir", help="holds glue/<TASK>/ and squad/ (default: the model's args.json, else $MLKD_DATA, "
                                      "else data)")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--predict", action="store_true",
                   help="write GLUE test predictions (submission format) into --model")
    p.add_argument("--speed", action="store_true", help="latency and throughput at 12/6/4/3/2/1 heads")
    p.add_argument("--speed_batch", type=int, default=32)
    p.add_argument("--speed_length", type=int, help="default: the max_len the model was trained with, else 128")
    p.add_argument("--squad_file", help="SQuAD dev JSON (default: <data_dir>/squad/dev-v1.1.json or dev-v2.0.json)")
    p.add_argument("--max_len", type=int,
                   help="encoding length, SQuAD window length (default: the one in the model's args.json, i.e. what "
                        "it was trained and selected with; else the task's)")
    p.add_argument("--show", metavar="SENTENCE", help="write a page of the relation maps of --model against "
                                                       "--teacher on this sentence (and a dev batch)")
    p.add_argument("--teacher", help="the teacher for --show")
    p.add_argument("--mha_temperature", type=float, help="--show: L_MHA's relation temperature for the sharpness "
                                                        "table (default: the model's args.json, else 1, the paper's)")
    p.add_argument("--show_out", help="the page --show writes (default: <model>/relations.html)")
    p.add_argument("--allow_partial", action="store_true",
                   help="score on a dev file with fewer or more rows than the official one (refused otherwise)")
    p.add_argument("--noise", type=float, metavar="P",
                   help="score on dev with a typo in a fraction P of the words (seeded; labels unchanged); writes the "
                        "noisy set to <model>/noise-P-<split>.tsv, the metrics to noise-P.json")
    p.add_argument("--noise_seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.noise is not None and not (0 < args.noise <= 1 and args.task in data.TASKS):
        p.error(f"--noise {args.noise}: a fraction of words in (0, 1], for GLUE tasks")
    if not os.path.exists(args.model) and args.model.count("/") != 1:
        p.error(f"--model {args.model}: no such directory")
    pairs = args.task.startswith("squad") or data.TASKS[args.task].b is not None
    if args.max_len is not None and not (5 if pairs else 3) <= args.max_len <= 512:
        p.error(f"--max_len {args.max_len}: must be in {5 if pairs else 3}..512 (room for the special tokens and one "
                "word piece of each text)")
    for name in ("batch_size", "speed_batch", "speed_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.show is not None and not args.show.strip():
        p.error("--show: give a sentence to draw (it is empty)")
    if args.show and not args.teacher:
        p.error("--show needs --teacher DIR")
    writes = args.noise or args.show or args.predict or args.task.startswith("squad")
    if writes and os.path.isdir(args.model) and not os.access(args.model, os.W_OK) and not args.show_out:
        p.error(f"--model {args.model}: not writable, and eval.py writes its results there; copy the model to a "
                "directory you can write to" + (" or give --show_out FILE" if args.show else ""))
    return args


def trained_settings(directory):
    """The settings eval.py reuses from the args.json train.py saved with a model ({} for other models)."""
    path = os.path.join(directory, "args.json")
    if not os.path.exists(path):
        return {}
    saved = json.loads(data.read_text(path))
    keep = ("max_len", "paper_exact", "layer_map", "splits", "mha_temperature", "data_dir")
    return {k: saved[k] for k in keep if k in saved}


def head_config(task):
    """The head a model of this task has: none (general distillation), span (SQuAD), regression, classification."""
    if task == "general":  # no task: the student is a general-purpose encoder
        return dict(head="none", label_names=[])
    if task.startswith("squad"):
        return dict(head="span", label_names=[])
    t = data.TASKS[task]
    if t.is_regression:
        return dict(head="regression", label_names=[])
    return dict(head="classification", num_labels=len(t.labels), label_names=list(t.labels))


def head_mismatch(model, task):
    """None when the model's head is the task's, else what differs ("has no task head, but --task ... needs ...")."""
    have, want = model.config, head_config(task)
    if have.head == want["head"] and have.num_labels == want.get("num_labels", have.num_labels):
        return None
    shown = "no task head" if have.head == "none" else f"a {have.head} head" + (
        f" with {have.num_labels} labels" if have.head == "classification" else "")
    needed = f"a {want['head']} head" + (f" with {want['num_labels']} labels" if "num_labels" in want else "")
    return f"has {shown}, but --task {task} needs {needed}"


def check_labels(model, task):
    """A model fine-tuned under one label order and used under another is silently wrong (MNLI)."""
    want = list(data.TASKS[task].labels)
    have = list(model.config.label_names)
    if have and have != want:
        raise ValueError(f"the model's labels {have} differ from task {task}'s {want}")


def speed(model, batch, length, heads=(12, 6, 4, 3, 2, 1), iters=20, warmup=5, device="cpu"):
    """Median latency (ms) and throughput (samples/s) of the model re-headed to each head count:
    same weights, same width and FLOPs, only the split of the width into heads changes (what the paper's
    claim that a student may have fewer heads is about)."""
    rows = []
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=device)
    mask = torch.ones_like(ids)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=str(device).startswith("cuda"))
    for h in heads:
        if model.config.hidden_size % h:
            continue
        m = Bert(dataclasses.replace(model.config, num_attention_heads=h)).to(device).eval()
        m.load_state_dict(model.state_dict())
        times = []
        with torch.no_grad(), autocast:
            for i in range(warmup + iters):
                if str(device).startswith("cuda"):
                    torch.cuda.synchronize()
                t = time.perf_counter()
                m(ids, None, mask)
                if str(device).startswith("cuda"):
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append(time.perf_counter() - t)
        latency = float(np.median(times))
        rows.append({"heads": h, "latency_ms": 1000 * latency, "samples_per_s": batch / latency})
    return rows


# ----------------------------------------------------------------------------------------------
# Loss curves: an SVG beside every finished stage's log.jsonl, and an index page for a run

LOG_META = {"stage", "epoch", "step", "total", "lr", "samples_per_s", "train_s", "eval_s"}


def curves_svg(records, title, width=560, height=150):
    """Small multiples, one panel per curve against step: each unweighted loss of the training records and
    each dev metric (held-out loss for general distillation) of the evaluation records. A loss is the
    batch's value at each logged step (--log_steps), not a running mean. Each panel has its own y range,
    printed at its top and bottom; counts (total, windows) are not drawn."""
    series = {}
    for r in records:
        if r.get("done"):  # the closing line: peak memory
            continue
        values = {f"{'held-out' if r['stage'] == 'general' else 'dev'} {k}": v for k, v in r["dev"].items()} \
            if "dev" in r else {k: v for k, v in r.items() if k not in LOG_META}
        for name, v in values.items():
            if isinstance(v, float):
                series.setdefault(name, []).append((r["step"], v))
    last = max([s for pts in series.values() for s, _ in pts] + [1])
    left, right, top, bottom = 64, 16, 26, 24
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height * len(series) + 30}" '
           f'font-family="sans-serif" font-size="12"><title>{title}</title>',
           f'<text x="8" y="18" font-size="14" font-weight="bold">{title}</text>']
    for i, (name, pts) in enumerate(series.items()):
        y0 = 30 + i * height
        lo, hi = min(v for _, v in pts), max(v for _, v in pts)
        lo, hi = (lo - 0.5, hi + 0.5) if hi == lo else (lo, hi)  # a flat curve sits mid-panel
        span = hi - lo
        x = lambda s: left + (width - left - right) * s / last  # noqa: E731
        y = lambda v: y0 + top + (height - top - bottom) * (hi - v) / span  # noqa: E731
        out += [
            f'<g class="panel" data-name="{name}">',
            f'<rect x="{left}" y="{y0 + top}" width="{width - left - right}" height="{height - top - bottom}" '
            'fill="none" stroke="#999"/>',
            f'<text x="{left}" y="{y0 + top - 6}" font-weight="bold">{name}</text>',
            f'<text x="{left - 4}" y="{y0 + top + 10}" text-anchor="end">{hi:.4g}</text>',
            f'<text x="{left - 4}" y="{y0 + height - bottom}" text-anchor="end">{lo:.4g}</text>',
            f'<text x="{left}" y="{y0 + height - 8}">step 0</text>',
            f'<text x="{width - right}" y="{y0 + height - 8}" text-anchor="end">step {last}</text>',
            '<polyline fill="none" stroke="#1f5fa8" stroke-width="1.5" points="'
            + " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in pts) + '"/>',
            *(f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="2.5" fill="#1f5fa8"/>' for s, v in pts if len(pts) <= 40),
            '</g>',
        ]
    return "\n".join(out + ["</svg>"]) + "\n"


def write_curves(directory):
    """<directory>/curves.svg from <directory>/log.jsonl."""
    records = [json.loads(line) for line in open(os.path.join(directory, "log.jsonl")) if line.strip()]
    title = f"{os.path.basename(directory)}: {directory}"
    data.atomic_write_text(os.path.join(directory, "curves.svg"), curves_svg(records, title))


def write_index(out, directories):
    """<out>/index.html: the loss curves of each stage of a run, one below the other."""
    parts = [f'<h2>{os.path.basename(d)}</h2>\n<img src="{os.path.relpath(os.path.join(d, "curves.svg"), out)}" '
             f'alt="loss curves of {d}">' for d in directories if os.path.exists(os.path.join(d, "curves.svg"))]
    data.atomic_write_text(os.path.join(out, "index.html"), "<!doctype html>\n<meta charset=\"utf-8\">\n"
                           f"<title>{out}</title>\n<h1>{out}</h1>\n" + "\n".join(parts) + "\n")


# ----------------------------------------------------------------------------------------------
# Relation maps: what MLKD's relation losses compare, teacher beside student, and how sharp they are


def colour(v, vmax):
    """White (0) to dark blue (vmax), linear in each channel: lighter is always smaller."""
    t = min(max(v / vmax, 0.0), 1.0) if vmax > 0 else 0.0
    r, g, b = (round(255 + t * (c - 255)) for c in (8, 48, 107))
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap_svg(m, title, vmax, rows=None, cols=None, cell=14, legend=True):
    """One matrix (numpy 2-d) as an SVG grid: one <rect class="cell"> per entry with its value in data-v,
    tick labels when given, and the colour scale as a legend bar."""
    n_r, n_c = m.shape
    left = 8 + 7 * max((len(s) for s in rows), default=0) if rows else 8
    top = 22 + (7 * max((len(s) for s in cols), default=0) if cols else 0)
    w = max(left + n_c * cell + (70 if legend else 12), 8 + 6.5 * len(title))
    h = top + n_r * cell + (92 - n_r * cell if legend and n_r * cell < 84 else 8)  # room for the legend bar
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<text x="4" y="14" font-weight="bold">{html.escape(title)}</text>']
    for i in range(n_r):
        for j in range(n_c):
            out.append(f'<rect class="cell" x="{left + j * cell}" y="{top + i * cell}" width="{cell}" height="{cell}" '
                       f'fill="{colour(m[i, j], vmax)}" data-v="{m[i, j]:.9g}"/>')
    for i, s in enumerate(rows or []):
        out.append(f'<text x="{left - 3}" y="{top + i * cell + cell - 3}" text-anchor="end">{html.escape(s)}</text>')
    for j, s in enumerate(cols or []):
        x = left + j * cell + cell - 3
        out.append(f'<text x="{x}" y="{top - 3}" transform="rotate(-90 {x} {top - 3})">{html.escape(s)}</text>')
    lx = left + n_c * cell + 12
    if legend:
        out += [f'<defs><linearGradient id="g" x1="0" y1="1" x2="0" y2="0">'
                f'<stop offset="0" stop-color="{colour(0, 1)}"/><stop offset="1" stop-color="{colour(1, 1)}"/>'
                '</linearGradient></defs>',
                f'<rect x="{lx}" y="{top}" width="10" height="80" fill="url(#g)" stroke="#999"/>',
                f'<text x="{lx + 14}" y="{top + 8}">{vmax:.3g}</text>', f'<text x="{lx + 14}" y="{top + 80}">0</text>']
    return "\n".join(out + ["</svg>"])


@torch.no_grad()
def ss_maps(student, teacher, dev, device="cpu", n=32):
    """The L_SS relation G = softmax(C C^T / sqrt(d)) of the final [CLS] states of the first n dev rows sorted
    by label, teacher and student: two heatmap SVGs on one colour scale."""
    order = torch.argsort(dev["labels"][:n], stable=True)
    rows = {k: v[:n][order] for k, v in dev.items() if k in ("input_ids", "token_type_ids", "lengths", "labels")}
    b = next(data.batches(rows, n))
    inputs = [b[k].to(device) for k in ("input_ids", "token_type_ids", "attention_mask")]
    pair = [mlkd.relation_logprobs(m.eval()(*inputs).hidden_states[-1][:, 0][None, None]).exp()[0, 0].cpu().numpy()
            for m in (teacher, student)]
    vmax, labels = max(float(p.max()) for p in pair), [str(v) for v in rows["labels"].tolist()]
    return [heatmap_svg(p, f"{who}: softmax(C C^T / sqrt(d))", vmax, labels, labels)
            for who, p in zip(("teacher", "student"), pair)]


@torch.no_grad()
def relation_sharpness(student, teacher, batch, lmap, splits=12, temperature=1.0):
    """How sharp the relations MLKD's losses compare are, on one batch: for L_EMB, L_MHA (each mapped layer pair
    m -> g(m), each split) and L_SS, the mean over real query rows of the normalised entropy H(R[i]) / log n of
    the teacher's and the student's relation (1: uniform over the row's n real tokens or samples; 0: all on one)
    and the mean KL(R_T[i] || R_S[i]) the loss averages. A nearly uniform target has little to teach.
    temperature divides L_MHA's logits as train.py --mha_temperature does. Returns a list of row dicts."""
    inputs = [batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")]
    mask = batch["attention_mask"]                                              # (B, L)
    s, t = student.eval()(*inputs), teacher.eval()(*inputs)

    def summary(x_s, x_t, m, temp=1.0):  # x (B, A, L, k) -> per split: mean H_T / log n, H_S / log n, KL
        real = (m if m is not None else x_s.new_ones(x_s.shape[:1] + x_s.shape[2:3]))[:, None, :].float()  # (B, 1, L)
        log_n = real.sum(-1, keepdim=True).log()                               # (B, 1, 1): log of the real keys
        mean = lambda v: (v * real).sum((0, 2)) / real.sum((0, 2))  # noqa: E731  (B, A, L) -> (A,)
        entropy = [-(lp.exp() * lp).sum(-1) / log_n for lp in (mlkd.relation_logprobs(x, m, temp) for x in (x_t, x_s))]
        return zip(*(mean(v).tolist() for v in (*entropy, mlkd.relation_kl_rows(x_s, x_t, m, temp))))

    def rows(loss, m, g_m, values, per_split=False):
        return [dict(loss=loss, student=m, teacher=g_m, split=a + 1 if per_split else None,
                     h_teacher=h_t, h_student=h_s, kl=kl) for a, (h_t, h_s, kl) in enumerate(values)]
    out = rows("L_EMB", 0, 0, summary(s.token_embeddings[:, None], t.token_embeddings[:, None], mask))
    for m in range(1, len(lmap)):
        o_s, o_t = (mlkd.mha_splits(o.attn_outputs[k - 1], splits) for o, k in ((s, m), (t, lmap[m])))  # (B, A, L, k)
        out += rows("L_MHA", m, lmap[m], summary(o_s, o_t, mask, temperature), per_split=True)
    c_s, c_t = s.hidden_states[-1][:, 0], t.hidden_states[-1][:, 0]                # (B, d)
    return out + rows("L_SS", len(lmap) - 1, len(t.attn_outputs), summary(c_s[None, None], c_t[None, None], None))


def sharpness_table(rows):
    """relation_sharpness's rows as text: one line per loss and layer pair (L_MHA: the mean over its splits,
    then the teacher's H / log n split by split)."""
    lines = [f"{'loss':6s} {'layers S->T':>11s} {'H_T/log n':>9s} {'H_S/log n':>9s} {'KL(T||S)':>9s}"]
    pairs = dict.fromkeys((r["loss"], r["student"], r["teacher"]) for r in rows)
    for loss, m, g_m in pairs:
        group = [r for r in rows if (r["loss"], r["student"], r["teacher"]) == (loss, m, g_m)]
        avg = {k: sum(r[k] for r in group) / len(group) for k in ("h_teacher", "h_student", "kl")}
        lines.append(f"{loss:6s} {f'{m}->{g_m}':>11s} {avg['h_teacher']:9.3f} {avg['h_student']:9.3f} {avg['kl']:9.4f}")
        if len(group) > 1:
            lines.append(f"{'':18s} teacher by split: " + " ".join(f"{r['h_teacher']:.3f}" for r in group))
    return lines


@torch.no_grad()
def relation_page(student, teacher, tok, sentence, dev=None, splits=12, device="cpu", kind="uniform"):
    """HTML: for one sentence, the L_EMB relation, every L_MHA relation of every mapped layer pair (student
    layer m, teacher layer g(m)) and the KL of every query row, teacher beside student; with dev (an encoded
    dev set with labels), the L_SS matrix G of its first 32 rows sorted by label. Every number drawn is
    computed by mlkd.relation_logprobs / relation_kl_rows; colours share one scale per pair (legend)."""
    room = min(64, student.config.max_position_embeddings)
    ids, types, lengths = tok.encode([sentence], max_length=room)
    n = int(lengths[0])
    if len(tok.tokenize([sentence])[0].ids) + 2 > room:
        print(f"--show: the sentence is longer than {room} positions; the page draws its first {room - 2} word pieces")
    batch = [t[:, :n].to(device) for t in (ids, types)]
    pieces = [tok.wp.id_to_token(i) for i in ids[0, :n].tolist()]
    s, t = (m.eval()(*batch) for m in (student, teacher))
    rel = lambda x: mlkd.relation_logprobs(x).exp()[0].cpu().numpy()  # noqa: E731  (1, A, L, k) -> (A, L, L)
    parts = ["<h2>L_EMB: token-token relation of the word-piece embeddings</h2>"]
    pair = [rel(o.token_embeddings[:, None])[0] for o in (t, s)]
    vmax = max(float(p.max()) for p in pair)
    parts += [heatmap_svg(p, f"{who}: softmax(E E^T / sqrt(d))", vmax, pieces, pieces)
              for who, p in zip(("teacher", "student"), pair)]
    g = mlkd.layer_map(teacher.config.num_hidden_layers, student.config.num_hidden_layers, kind)
    for m in range(1, len(g)):
        o_s, o_t = (mlkd.mha_splits(o.attn_outputs[k - 1], splits) for o, k in ((s, m), (t, g[m])))  # (1, A, L, k)
        r_t, r_s = rel(o_t), rel(o_s)
        vmax = max(float(r_t.max()), float(r_s.max()))
        parts.append(f"<h2>L_MHA: student layer {m} against teacher layer {g[m]}, {splits} MHA-splits</h2>")
        for who, r in (("teacher", r_t), ("student", r_s)):
            tiles = [heatmap_svg(r[a], f"split {a + 1}", vmax, cell=6, legend=a == splits - 1) for a in range(splits)]
            parts.append(f"<div><b>{who}</b><br>" + "".join(tiles) + "</div>")
        kl = mlkd.relation_kl_rows(o_s, o_t)[0].cpu().numpy()  # (A, L)
        parts.append(heatmap_svg(kl, "KL(teacher || student) of each query row (rows: splits)", float(kl.max()),
                                 [f"split {a + 1}" for a in range(splits)], pieces))
    if dev is not None:
        parts.append("<h2>L_SS: sample-sample relation G of the final [CLS] states, 32 dev rows sorted by label</h2>")
        parts += ss_maps(student, teacher, dev, device)
    head = (f"<!doctype html>\n<meta charset=\"utf-8\">\n<title>MLKD relations</title>\n"
            "<style>svg {vertical-align: top}</style>\n"  # a tile with its legend is taller: align tops, keep one row
            f"<h1>{html.escape(sentence)}</h1>\n")
    legend = "<p>Colour: white = 0 to dark blue = the pair's largest value (legend bar).</p>\n"
    return head + legend + "\n".join(parts) + "\n"


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, data.DownloadError, OSError) as e:
        sys.exit(f"error: {data.error_line(e, 'a model directory')}")
