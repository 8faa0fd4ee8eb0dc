"""data.py: the WordPiece tokenizer, GLUE and SQuAD read exactly as the official tools do, and their downloads.

Chapter 0 of mlkd; imports nothing of ours. Sources and facts: the official URLs (GLUE's and SentEval's
files on dl.fbaipublicfiles.com, SQuAD-explorer, the Hugging Face hub), the GLUE download script (file
layout, MRPC built from SentEval), the GLUE paper's task table, Google's BERT run_classifier.py /
run_squad.py (pair truncation, SQuAD windows) and the official SQuAD evaluation scripts (post-processing
lives here, scoring in eval.py).

Sections:  1. tokenizer   2. GLUE   3. batches   4. SQuAD   5. unlabeled text   6. downloads and
atomic writes (plumbing: a reader of the formats may stop before it)

    python data.py corpus --data_dir DIR --out FILE [--vocab VOCAB]   # the offline corpus (section 5)
"""
import csv
import errno
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass

import numpy as np
import requests
import torch

HUB_URL = "https://huggingface.co"
GLUE_URL = "https://dl.fbaipublicfiles.com/glue/data"
SENTEVAL_URL = "https://dl.fbaipublicfiles.com/senteval/senteval_data"
SQUAD_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset"


def log(msg, end="\n"):
    print(msg, file=sys.stderr, end=end, flush=True)


# ----------------------------------------------------------------------------------------------
# 1. Tokenizer: BERT WordPiece from vocab.txt (the `tokenizers` package does the work).


class Tokenizer:
    """Uncased BERT tokenisation: clean text, split CJK characters, lower-case and strip accents
    (BertNormalizer: strip_accents follows lowercase), whitespace+punctuation split, WordPiece."""

    def __init__(self, vocab_file, lowercase=True):
        from tokenizers import BertWordPieceTokenizer
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"vocabulary file {vocab_file} does not exist")
        self.wp = BertWordPieceTokenizer(str(vocab_file), lowercase=lowercase)
        self.pad_id, self.cls_id, self.sep_id = (self.wp.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]"))
        if None in (self.pad_id, self.cls_id, self.sep_id):
            raise ValueError(f"{vocab_file} lacks [PAD], [CLS] or [SEP]: not a BERT vocabulary")

    def tokenize(self, texts):
        """Word pieces without special tokens: list of tokenizers.Encoding (.ids, .offsets in chars)."""
        return self.wp.encode_batch(list(texts), add_special_tokens=False)

    def encode(self, texts_a, texts_b=None, max_length=128):
        """[CLS] a [SEP] (b [SEP]) for every example, truncated to max_length as Google's BERT does.

        Returns (ids (N, max_length) int64 padded with [PAD], token_type_ids (N, max_length), lengths (N,)).
        """
        a = [e.ids for e in self.tokenize(texts_a)]
        b = [e.ids for e in self.tokenize(texts_b)] if texts_b is not None else None
        n = len(a)
        ids = np.full((n, max_length), self.pad_id, dtype=np.int64)
        types = np.zeros((n, max_length), dtype=np.int64)
        lengths = np.zeros(n, dtype=np.int64)
        for i in range(n):  # once per data set, before training
            if b is None:
                seq = [self.cls_id, *a[i][:max_length - 2], self.sep_id]
                na = len(seq)
            else:
                ka, kb = truncate_pair(len(a[i]), len(b[i]), max_length - 3)
                seq = [self.cls_id, *a[i][:ka], self.sep_id, *b[i][:kb], self.sep_id]
                na = ka + 2
            ids[i, :len(seq)] = seq
            types[i, na:len(seq)] = 1
            lengths[i] = len(seq)
        return torch.from_numpy(ids), torch.from_numpy(types), torch.from_numpy(lengths)


def truncate_pair(la, lb, budget):
    """Lengths kept by Google's _truncate_seq_pair: pop one token at a time from the longer side
    (from b when equal) until la + lb <= budget. Closed form of that loop. (`tokenizers`'
    longest_first breaks the tie the other way, hence this function.)"""
    if la + lb <= budget:
        return la, lb
    ka = min(la, max(math.ceil(budget / 2), budget - lb))
    return ka, budget - ka


# ----------------------------------------------------------------------------------------------
# 2. GLUE: the official download script's layout, <data_dir>/glue/<TASK>/{train,dev,test}.tsv


@dataclass(frozen=True)
class Task:
    name: str         # CLI name
    folder: str       # directory of the official download script
    a: int            # column of the first sentence (train/dev)
    b: int | None     # column of the second sentence, None for single-sentence tasks
    label: int | None  # column of the label (-1 = last), None in test files
    labels: tuple     # label strings in index order; () = regression
    metric: str       # GLUE's official metric, the one the paper reports and train.py selects on
    max_len: int
    header: bool = True
    test_cols: tuple = None  # (a, b) in test.tsv when they differ from train/dev
    zip: str = None

    @property
    def dev_splits(self):
        return ("dev_matched", "dev_mismatched") if self.name == "mnli" else ("dev",)

    @property
    def test_splits(self):
        return ("test_matched", "test_mismatched") if self.name == "mnli" else ("test",)

    @property
    def is_regression(self):
        return not self.labels


TASKS = {t.name: t for t in [
    Task("cola", "CoLA", 3, None, 1, ("0", "1"), "mcc", 64, header=False, test_cols=(1, None)),
    Task("sst2", "SST-2", 0, None, 1, ("0", "1"), "acc", 64, test_cols=(1, None)),
    Task("mrpc", "MRPC", 3, 4, 0, ("0", "1"), "f1", 128),
    Task("stsb", "STS-B", 7, 8, -1, (), "spearman", 128),
    Task("qqp", "QQP", 3, 4, 5, ("0", "1"), "f1", 128, test_cols=(1, 2), zip="QQP-clean"),
    Task("mnli", "MNLI", 8, 9, -1, ("contradiction", "entailment", "neutral"), "acc", 128),
    Task("qnli", "QNLI", 1, 2, -1, ("entailment", "not_entailment"), "acc", 128, zip="QNLIv2"),
    Task("rte", "RTE", 1, 2, -1, ("entailment", "not_entailment"), "acc", 128),
    Task("wnli", "WNLI", 1, 2, -1, ("0", "1"), "acc", 128),
    # AX: the diagnostic set, predicted with an MNLI model; test only.
    Task("ax", "diagnostic", 1, 2, None, ("contradiction", "entailment", "neutral"), "acc", 128),
]}

# Official number of examples per file (GLUE paper, the download script's output).
GLUE_ROWS = {
    ("cola", "train"): 8551, ("cola", "dev"): 1043, ("cola", "test"): 1063,
    ("sst2", "train"): 67349, ("sst2", "dev"): 872, ("sst2", "test"): 1821,
    ("mrpc", "train"): 3668, ("mrpc", "dev"): 408, ("mrpc", "test"): 1725,
    ("stsb", "train"): 5749, ("stsb", "dev"): 1500, ("stsb", "test"): 1379,
    ("qqp", "train"): 363846, ("qqp", "dev"): 40430, ("qqp", "test"): 390965,
    ("mnli", "train"): 392702, ("mnli", "dev_matched"): 9815, ("mnli", "dev_mismatched"): 9832,
    ("mnli", "test_matched"): 9796, ("mnli", "test_mismatched"): 9847,
    ("qnli", "train"): 104743, ("qnli", "dev"): 5463, ("qnli", "test"): 5463,
    ("rte", "train"): 2490, ("rte", "dev"): 277, ("rte", "test"): 3000,
    ("wnli", "train"): 635, ("wnli", "dev"): 71, ("wnli", "test"): 146,
    ("ax", "test"): 1104,
}


@dataclass
class Example:
    guid: str         # "<split>-<row>" or the test file's index (needed for the submission)
    text_a: str
    text_b: str | None
    label: object     # int label index, float score (STS-B), None in test files


def glue_path(task, split, data_dir):
    t = TASKS[task]
    file = "diagnostic.tsv" if task == "ax" else f"{split}.tsv"
    return os.path.join(data_dir, "glue", t.folder, file)


def read_glue(task, split, data_dir, allow_partial=False):
    """The examples of one GLUE split, downloading the task on first use.

    A dev or test file whose number of examples is not the official one (a truncated copy) is refused:
    a metric on fewer rows is not the task's metric. allow_partial=True reads it anyway, with a warning.
    """
    if task not in TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; known: {', '.join(TASKS)}")
    t = TASKS[task]
    splits = ("test",) if task == "ax" else ("train", *t.dev_splits, *t.test_splits)
    if split not in splits:
        raise ValueError(f"{task} has no split {split!r}; its splits: {', '.join(splits)}")
    path = glue_path(task, split, data_dir)
    if not os.path.exists(path):
        try:
            download_glue(task, data_dir)
        except DownloadError as e:
            raise DownloadError(e.url, f"{e.reason}, and the local file {path} does not exist "
                                       f"(--data_dir {data_dir})", e.status, place=path) from None
    test = split.startswith("test")
    a, b = t.test_cols if test and t.test_cols else (t.a, t.b)
    examples, skipped = [], 0
    text = read_text(path, "utf-8-sig")  # utf-8-sig: MRPC starts with a BOM
    rows = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)  # quotes are text in GLUE
    header = t.header or test  # CoLA's train/dev have no header, its test file has one
    width = len(next(rows)) if header else None
    for i, row in enumerate(rows):
        width = width or len(row)
        if len(row) != width:  # QQP has a few malformed rows; the official processors drop them
            skipped += 1
            continue
        label = None
        if not test:
            raw = row[t.label]
            if t.is_regression:
                try:
                    label = float(raw)
                except ValueError:
                    raise ValueError(f"{path}, line {i + 1 + header}: score {raw!r} is not a number") from None
            elif raw in t.labels:
                label = t.labels.index(raw)
            else:
                raise ValueError(f"{path}, line {i + 1 + header}: label {raw!r} is not one of {t.labels}")
        guid = row[0] if test else f"{split}-{i}"
        examples.append(Example(guid, row[a], row[b] if b is not None else None, label))
    if skipped:
        log(f"[data] {path}: skipped {skipped} malformed rows (wrong number of columns)")
    check_rows(path, len(examples), GLUE_ROWS.get((task, split)), split != "train" and not allow_partial)
    return examples


def check_rows(path, have, want, strict):
    """A file with fewer or more examples than the official one: an error when strict, else a warning."""
    if want is None or have == want:
        return
    msg = f"{path} has {have} examples; the official file has {want}"
    if strict:
        raise ValueError(f"{msg}: a truncated or altered file? Fetch it again, or pass --allow_partial to "
                         "score on these rows anyway (the metric is then not the official one)")
    log(f"[data] warning: {msg}")


def download_glue(task, data_dir):
    """Fetch a task as the official download script lays it out."""
    t = TASKS[task]
    root = os.path.join(data_dir, "glue")
    if task == "mrpc":
        return build_mrpc(root)
    if task == "ax":
        return download(f"{GLUE_URL}/AX.tsv", os.path.join(root, "diagnostic", "diagnostic.tsv"))
    zip_path = download(f"{GLUE_URL}/{t.zip or t.folder}.zip", os.path.join(root, f"{t.zip or t.folder}.zip"),
                        md5="9f81648d4199384278b86e315dac217c" if task == "sst2" else None)
    unzip(zip_path, root)
    os.remove(zip_path)
    if not os.path.isdir(os.path.join(root, t.folder)):
        raise ValueError(f"{zip_path} did not contain the folder {t.folder}/")


def build_mrpc(root):
    """MRPC as the GLUE script builds it: SentEval's train file split into train/dev by
    mrpc_dev_ids.tsv (header copied, BOM and all), the test file re-indexed without labels."""
    src = os.path.join(root, "MRPC", "original")
    files = {}
    for name, url in (("train", f"{SENTEVAL_URL}/msr_paraphrase_train.txt"),
                      ("test", f"{SENTEVAL_URL}/msr_paraphrase_test.txt"),
                      ("dev_ids", f"{GLUE_URL}/mrpc_dev_ids.tsv")):
        files[name] = download(url, os.path.join(src, url.rsplit("/", 1)[-1]))
    with open(files["dev_ids"], encoding="utf-8") as f:
        dev_ids = {tuple(line.strip().split("\t")) for line in f if line.strip()}
    with open(files["train"], encoding="utf-8", newline="") as f:
        header, *lines = f.read().splitlines(keepends=True)
    train = [header] + [ln for ln in lines if tuple(ln.split("\t")[1:3]) not in dev_ids]
    dev = [header] + [ln for ln in lines if tuple(ln.split("\t")[1:3]) in dev_ids]
    with open(files["test"], encoding="utf-8-sig", newline="") as f:
        _, *tests = f.read().splitlines()
    test = ["index\t#1 ID\t#2 ID\t#1 String\t#2 String\n"]
    test += [f"{i}\t" + "\t".join(ln.split("\t")[1:]) + "\n" for i, ln in enumerate(tests)]
    for name, rows in (("train", train), ("dev", dev), ("test", test)):
        atomic_write_text(os.path.join(root, "MRPC", f"{name}.tsv"), "".join(rows))


# ----------------------------------------------------------------------------------------------
# 3. Batches: tokenize once into padded tensors; a batch is a gather and a trim, no Python per example.


def encode_glue(task, examples, tokenizer, max_len=None):
    """Tokenise every example once: a dict of tensors, one row per example."""
    t = TASKS[task]
    ids, types, lengths = tokenizer.encode([e.text_a for e in examples],
                                           [e.text_b for e in examples] if t.b is not None else None,
                                           max_len or t.max_len)
    out = {"input_ids": ids, "token_type_ids": types, "lengths": lengths}
    if examples and examples[0].label is not None:
        dtype = torch.float32 if t.is_regression else torch.long
        out["labels"] = torch.tensor([e.label for e in examples], dtype=dtype)
    return out


def batches(dataset, batch_size, shuffle=False, generator=None, fixed_padding=False, start=0, group_by_length=0):
    """Yield batches {input_ids, token_type_ids, attention_mask, labels..., index} from an encoded
    dataset. Dynamic padding trims to the longest row of the batch; fixed_padding keeps the full
    max length (the authors' behaviour). start skips the first `start` batches (resuming).
    group_by_length=G (with shuffle): batches of similar lengths, see batch_rows."""
    n = len(dataset["input_ids"])
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    rows = batch_rows(order, batch_size, dataset["lengths"], group_by_length, generator)
    for idx in rows[start:]:
        lengths = dataset["lengths"][idx]
        width = dataset["input_ids"].shape[1] if fixed_padding else int(lengths.max())
        batch = {k: v[idx] for k, v in dataset.items() if k not in ("input_ids", "token_type_ids", "lengths")}
        batch["input_ids"] = dataset["input_ids"][idx, :width]
        batch["token_type_ids"] = dataset["token_type_ids"][idx, :width]
        batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()  # (B, width)
        batch["index"] = idx
        yield batch


def batch_rows(order, batch_size, lengths, group=0, generator=None):
    """The rows of each batch, in order: `order` cut into batches; with group = G > 0, each run of G batches'
    worth of the shuffled rows is sorted by length before it is cut, and the run's batches are shuffled, so a
    batch holds sentences of similar length and pads little (what HF's Trainer calls group_by_length), while
    which rows meet in a run, and the order of the batches, stay random. Seeded by `generator`."""
    if not group:
        return list(order.split(batch_size))
    rows = []
    for run in order.split(group * batch_size):
        by_length = run[torch.argsort(lengths[run], stable=True)].split(batch_size)  # (G tensors of batch_size rows)
        rows += [by_length[i] for i in torch.randperm(len(by_length), generator=generator).tolist()]
    return rows


# ----------------------------------------------------------------------------------------------
# 4. SQuAD v1.1 / v2.0


# Questions in the official files (the SQuAD papers' tables); files by other names are not checked.
SQUAD_ROWS = {"train-v1.1.json": 87599, "dev-v1.1.json": 10570, "train-v2.0.json": 130319, "dev-v2.0.json": 11873}


def read_squad(path, allow_partial=False):
    """Flatten the official JSON into [{id, title, question, context, answers:[{text, answer_start}]}];
    an unanswerable v2.0 question has answers == []. An official dev file with the wrong number of
    questions is refused unless allow_partial (see read_glue)."""
    name = os.path.basename(path)
    if not os.path.exists(path):
        if name not in SQUAD_ROWS:
            raise FileNotFoundError(f"SQuAD file {path} does not exist")
        download(f"{SQUAD_URL}/{name}", path, place=path)
    try:
        top = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a JSON file: {e}") from None
    examples = []
    for i, article in enumerate(squad_field(top, "data", list, "the file", path)):
        for j, para in enumerate(squad_field(article, "paragraphs", list, f"data[{i}]", path)):
            where = f"data[{i}].paragraphs[{j}]"
            context = squad_field(para, "context", str, where, path)
            for k, qa in enumerate(squad_field(para, "qas", list, where, path)):
                at = f"{where}.qas[{k}]"
                impossible = isinstance(qa, dict) and qa.get("is_impossible")  # v2.0: no answer to find
                answers = [] if impossible else squad_field(qa, "answers", list, at, path)
                for n, answer in enumerate(answers):
                    squad_field(answer, "text", str, f"{at}.answers[{n}]", path)
                    squad_field(answer, "answer_start", int, f"{at}.answers[{n}]", path)
                examples.append(dict(id=squad_field(qa, "id", str, at, path), title=article.get("title", ""),
                                     question=squad_field(qa, "question", str, at, path), context=context,
                                     answers=answers))
    check_rows(path, len(examples), SQUAD_ROWS.get(name), name.startswith("dev") and not allow_partial)
    return examples


def squad_field(obj, key, kind, where, path):
    """obj[key], which the official layout (data[].paragraphs[].{context, qas[].{id, question, answers[]}})
    says is a `kind`; a clear error naming the file and the place otherwise."""
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        got = "nothing" if value is None else type(value).__name__
        want = {list: "a list", str: "a string", int: "an integer"}[kind]
        raise ValueError(f"{path}: {where}.{key} should be {want}, found {got}; not the official SQuAD "
                         "layout data[].paragraphs[].qas[] (rajpurkar.github.io/SQuAD-explorer)")
    return value


def split_squad(path, first, head_path, tail_path=None):
    """Write the first `first` articles of a SQuAD file to head_path and the rest to tail_path (if
    given), both in the official format: a split by article keeps every paragraph's questions on one side."""
    doc = json.loads(read_text(path))
    if not 0 < first < len(doc["data"]):
        raise ValueError(f"{path} has {len(doc['data'])} articles: cannot split after {first}")
    for out, part in ((head_path, doc["data"][:first]), (tail_path, doc["data"][first:])):
        if out:
            atomic_write_text(out, json.dumps({"version": doc.get("version", ""), "data": part}, ensure_ascii=False))


def squad_features(examples, tokenizer, max_len=384, stride=128, max_query=64, train=True):
    """Cut every (question, context) into windows [CLS] question [SEP] window [SEP].

    `stride` is the STEP between window starts, as in Google's run_squad.py (doc_stride 128: windows
    start at context tokens 0, 128, 256, ...), not the overlap it means in HF `tokenizers`; we follow
    the reference the paper's numbers come from. Training targets: the first answer's token span when
    it lies wholly inside the window, else (0, 0) = [CLS] (also for unanswerable questions).
    Returns tensors (one row per window) plus, for evaluation, per window the example index and the
    character span in the context of every token (-1 for question and special tokens).
    """
    questions = tokenizer.tokenize(e["question"] for e in examples)
    contexts = tokenizer.tokenize(e["context"] for e in examples)
    rows = {"input_ids": [], "token_type_ids": [], "lengths": [], "labels": [], "example": [], "offsets": []}
    for i, (ex, q, c) in enumerate(zip(examples, questions, contexts)):
        q_ids = q.ids[:max_query]
        room = max_len - len(q_ids) - 3
        if room < 1:
            raise ValueError(
                f"--max_len {max_len}: question {ex['id']} keeps {len(q_ids)} word pieces, which leaves no "
                f"room for its context; use --max_len {len(q_ids) + 4} or more"
            )
        offsets = np.array(c.offsets, dtype=np.int64).reshape(-1, 2)  # (n_ctx, 2) char [start, end)
        span = None
        if train and ex["answers"]:
            a = ex["answers"][0]
            s, e = a["answer_start"], a["answer_start"] + len(a["text"])
            inside = np.nonzero((offsets[:, 1] > s) & (offsets[:, 0] < e))[0]  # tokens overlapping the answer
            if len(inside):
                span = (inside[0], inside[-1])
        start = 0
        while True:
            n = min(room, len(c.ids) - start)
            ids = [tokenizer.cls_id, *q_ids, tokenizer.sep_id, *c.ids[start:start + n], tokenizer.sep_id]
            first = len(q_ids) + 2  # position of the window's first context token
            tok_off = np.full((max_len, 2), -1, dtype=np.int64)
            tok_off[first:first + n] = offsets[start:start + n]
            label = (0, 0)
            if span is not None and start <= span[0] and span[1] < start + n:
                label = (first + span[0] - start, first + span[1] - start)
            rows["input_ids"].append(ids + [tokenizer.pad_id] * (max_len - len(ids)))
            rows["token_type_ids"].append([0] * first + [1] * (n + 1) + [0] * (max_len - len(ids)))
            rows["lengths"].append(len(ids))
            rows["labels"].append(label)
            rows["example"].append(i)
            rows["offsets"].append(tok_off)
            if start + n >= len(c.ids):
                break
            start += min(n, stride)
    return {k: torch.tensor(np.array(v)) for k, v in rows.items()}


def squad_predictions(examples, features, start_logits, end_logits, n_best=20, max_answer=30,
                      version="1.1", null_threshold=0.0):
    """Turn per-window start/end logits (numpy (F, L)) into {question_id: answer text}.

    For each window: the top n_best starts x top n_best ends, kept when both are context tokens,
    start <= end and the span is at most max_answer tokens; score = start + end logit. The best span
    over all windows of a question wins. v2.0: the null score is the minimum over windows of
    start[0] + end[0]; predict "" when null - best > null_threshold. Returns (predictions,
    null_minus_best {id: float}) the latter for eval.py's best-threshold search.
    """
    best = {}      # example index -> (score, text)
    null = {}      # example index -> min null score
    offsets = features["offsets"].numpy()
    for f, ex_i in enumerate(features["example"].tolist()):
        s_log, e_log = start_logits[f], end_logits[f]
        valid = offsets[f, :, 0] >= 0  # context tokens of this window
        null[ex_i] = min(null.get(ex_i, math.inf), float(s_log[0] + e_log[0]))
        starts = np.argsort(-s_log)[:n_best]
        ends = np.argsort(-e_log)[:n_best]
        s, e = starts[:, None], ends[None, :]  # (n_best, n_best) pairs by broadcasting
        ok = valid[s] & valid[e] & (e >= s) & (e - s + 1 <= max_answer)
        if not ok.any():
            continue
        score = np.where(ok, s_log[s] + e_log[e], -np.inf)
        k = np.unravel_index(np.argmax(score), score.shape)
        if ex_i not in best or score[k] > best[ex_i][0]:
            ctx = examples[ex_i]["context"]
            best[ex_i] = (float(score[k]), ctx[offsets[f, starts[k[0]], 0]:offsets[f, ends[k[1]], 1]])
    predictions, null_minus_best = {}, {}
    for i, ex in enumerate(examples):
        score, text = best.get(i, (-math.inf, "empty"))  # no valid span anywhere: the reference's placeholder
        if version == "2.0":
            diff = null.get(i, math.inf) - score
            null_minus_best[ex["id"]] = diff
            if diff > null_threshold:
                text = ""
        predictions[ex["id"]] = text
    return predictions, null_minus_best


# ----------------------------------------------------------------------------------------------
# 5. Unlabeled text for general distillation: the format of Google's pre-training data


def read_corpus(paths):
    """Plain UTF-8 text files, one sentence or paragraph per line, documents separated by blank lines:
    a list of documents, each a list of lines."""
    documents = []
    for path in paths:
        current = []
        for line in read_text(path).splitlines():
            if line.strip():
                current.append(line.strip())
            elif current:
                documents.append(current)
                current = []
        if current:
            documents.append(current)
    if not documents:
        raise ValueError(f"corpus {', '.join(paths)}: no text (one sentence or paragraph per line)")
    return documents


def corpus_windows(documents, tokenizer, max_len=128):
    """Pack consecutive lines of one document into windows [CLS] text [SEP] of at most max_len tokens; a
    line longer than a window is cut into window-sized pieces. Returns {input_ids, token_type_ids,
    lengths}, one row per window, as encode_glue does."""
    room = max_len - 2
    pieces = iter(tokenizer.tokenize([line for doc in documents for line in doc]))
    windows = []
    for doc in documents:
        current = []
        for _ in doc:
            ids = next(pieces).ids
            if current and len(current) + len(ids) > room:  # the line does not fit: close the window
                windows.append(current)
                current = []
            while len(ids) > room:
                windows.append(ids[:room])
                ids = ids[room:]
            current += ids
        if current:
            windows.append(current)
    out = np.full((len(windows), max_len), tokenizer.pad_id, dtype=np.int64)
    lengths = np.array([len(w) + 2 for w in windows], dtype=np.int64)
    for i, w in enumerate(windows):  # once per corpus, before training
        out[i, :len(w) + 2] = [tokenizer.cls_id, *w, tokenizer.sep_id]
    ids = torch.from_numpy(out)
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "lengths": torch.from_numpy(lengths)}


def build_corpus(data_dir, out, vocab=None):
    """Write the corpus this repo can have offline: the paragraphs of the SQuAD *training* files present
    (<data_dir>/squad/train-*.json; an article is a document, a paragraph a line) and the sentences of the
    GLUE *train* splits present (a task's file is a document; a pair gives two lines); deduplicated.
    Never a dev or test sentence: those files are not read for text, and any line that also appears in a
    dev or test file present (GLUE dev/test, SQuAD dev contexts) is dropped. Nothing is downloaded.
    Returns {documents, lines, words, word_pieces (with a vocab file), dropped_as_dev}."""
    held = set()  # every dev/test text present
    for task, t in TASKS.items():
        for split in t.dev_splits + t.test_splits if task != "ax" else ("test",):
            if os.path.exists(glue_path(task, split, data_dir)):
                held.update(s.strip() for e in read_glue(task, split, data_dir, allow_partial=True)
                            for s in (e.text_a, e.text_b) if s)
    squad_dir = os.path.join(data_dir, "squad")
    squad = sorted(os.listdir(squad_dir)) if os.path.isdir(squad_dir) else []
    for name in (n for n in squad if n.startswith("dev") and n.endswith(".json")):
        held.update(p.strip() for article in squad_articles(os.path.join(squad_dir, name)) for p in article)
    documents, seen, dropped = [], set(), 0

    def add(lines):
        nonlocal dropped
        doc = []
        for line in (" ".join(x.split()) for x in lines):  # one line each, whitespace collapsed
            if line and line not in seen:
                seen.add(line)
                if line in held:
                    dropped += 1
                else:
                    doc.append(line)
        if doc:
            documents.append(doc)
    for name in (n for n in squad if n.startswith("train") and n.endswith(".json")):
        for paragraphs in squad_articles(os.path.join(squad_dir, name)):
            add(paragraphs)
    for task, t in TASKS.items():
        if task != "ax" and os.path.exists(glue_path(task, "train", data_dir)):
            add(s for e in read_glue(task, "train", data_dir) for s in (e.text_a, e.text_b) if s)
    if not documents:
        raise ValueError(f"{data_dir}: no SQuAD train-*.json under squad/ and no GLUE train.tsv under glue/")
    atomic_write_text(out, "\n\n".join("\n".join(doc) for doc in documents) + "\n")
    lines = [line for doc in documents for line in doc]
    stats = {"documents": len(documents), "lines": len(lines), "words": sum(len(x.split()) for x in lines),
             "dropped_as_dev": dropped}
    if vocab:
        stats["word_pieces"] = sum(len(e.ids) for e in Tokenizer(vocab).tokenize(lines))
    log(f"[corpus] wrote {out}: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in stats.items()))
    return stats


def squad_articles(path):
    """The paragraphs of a SQuAD file, article by article: [[context, ...], ...] (questions or not)."""
    try:
        return [[p["context"] for p in a["paragraphs"]] for a in json.loads(read_text(path))["data"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a SQuAD JSON file: {e!r}") from None


# ----------------------------------------------------------------------------------------------
# 6. Download: streamed, resumable (.part + HTTP Range), checksummed, renamed atomically.


class DownloadError(RuntimeError):
    def __init__(self, url, reason, status=None, place=None):
        self.url, self.reason, self.status = url, reason, status
        where = (f"place it at {place}" if place else "place it by hand: GLUE/SQuAD under --data_dir (layout in "
                 "README), weights as a model directory (config.json, vocab.txt, weights) passed by path")
        super().__init__(f"download of {url} failed: {reason}.\n  Offline? Fetch the file on a machine with "
                         f"internet and {where}.")


def download(url, dest, md5=None, sha256=None, retries=5, chunk=1 << 16, place=None):
    """Fetch url to dest unless dest exists. A cut transfer resumes from dest + '.part'; a host that
    cannot be reached at all (offline, name lookup failed) is an error at once, not retried. `place`:
    where a user without internet should put the file (said in the error).
    No directory is created before the server has answered, so a misspelt path leaves nothing behind."""
    if os.path.exists(dest):
        return dest
    part = dest + ".part"
    for attempt in range(retries):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        answered = False
        try:
            with requests.get(url, headers=headers, stream=True, timeout=30) as r:
                answered = True
                if r.status_code == 416:  # the .part already holds every byte
                    break
                if r.status_code not in (200, 206):
                    raise DownloadError(url, f"HTTP {r.status_code}", r.status_code, place)
                if r.status_code == 200:
                    have = 0  # the server ignored Range: start over
                total = have + int(r.headers.get("Content-Length", 0)) or None
                done, t0, shown = have, time.time(), 0.0
                os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
                with open(part, "ab" if have else "wb") as f:
                    for block in r.iter_content(chunk):
                        f.write(block)
                        done += len(block)
                        if time.time() - shown > 0.5:
                            shown = time.time()
                            _progress(url, done, total, (done - have) / max(shown - t0, 1e-9))
                _progress(url, done, total, (done - have) / max(time.time() - t0, 1e-9), end="\n")
                if total is None or done >= total:
                    break
        except requests.RequestException as e:
            if not answered and not isinstance(e, requests.ReadTimeout):  # nothing was cut: unreachable
                raise DownloadError(url, f"cannot reach the server ({type(e).__name__})", place=place) from None
            if attempt == retries - 1:
                raise DownloadError(url, f"{type(e).__name__}: {e}", place=place) from None
            log(f"[download] {url}: cut after {os.path.getsize(part) if os.path.exists(part) else 0} bytes "
                f"({type(e).__name__}); resuming")
    else:
        raise DownloadError(url, f"incomplete after {retries} attempts", place=place)
    for name, want in (("md5", md5), ("sha256", sha256)):
        if want:
            got = file_hash(part, name)
            if got != want:
                os.remove(part)
                raise DownloadError(url, f"{name} mismatch: expected {want}, got {got}; the partial file was removed")
    os.replace(part, dest)
    return dest


def _progress(url, done, total, rate, end="\r"):
    eta = f", ETA {(total - done) / rate:.0f}s" if total and rate > 0 else ""
    size = f"/{total / 1e6:.1f}" if total else ""
    log(f"[download] {url.rsplit('/', 1)[-1]}: {done / 1e6:.1f}{size} MB, {rate / 1e6:.1f} MB/s{eta}   ", end=end)


def file_hash(path, name):
    h = hashlib.new(name)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


TMP_PREFIX = ".tmp-"  # atomic writes stage their bytes in <directory>/.tmp-XXXX


def atomic_write_bytes(path, chunks):
    """Write to a temp file in the same directory, fsync, then rename over path: never half a file.
    The file gets the mode a plain open() would give (0666 less the umask), not mkstemp's 0600."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        os.remove(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = path  # a full disk: say which file it stopped
        raise


def atomic_write_text(path, text):
    atomic_write_bytes(path, [text.encode("utf-8")])


def remove_stale_temporaries(directory):
    """Delete what a killed atomic write left behind (SIGKILL skips the cleanup above)."""
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith(TMP_PREFIX):
                os.remove(os.path.join(directory, name))


def error_line(e, writable):
    """The one line a user reads for an error: a full disk or a file we may not write said in words (atomic writes
    leave nothing half-written, so a rerun resumes); `writable` names what to choose instead ("an --out")."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return (f"no space left on the device while writing {e.filename or 'a file'}; nothing half-written was kept. "
                "Free some space and rerun the same command: finished work is kept, an interrupted stage resumes")
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return f"cannot write {e.filename}: {e.strerror}; choose {writable} you can write to"
    return str(e)


def read_text(path, encoding="utf-8"):
    """A whole text file as str (line ends kept as they are); a byte that is not valid in the encoding
    is an error naming the file, the line and the byte, not a bare codec message."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{path}, line {line}, column {column}: byte 0x{raw[e.start]:02x} is not valid "
                         f"{encoding.upper().removesuffix('-SIG')} ({e.reason}); re-save the file as UTF-8") from None


def unzip(zip_path, dest_dir):
    try:
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(dest_dir)
    except zipfile.BadZipFile:
        raise ValueError(f"{zip_path} is not a valid zip file; delete it and run again") from None


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="data.py corpus: " + build_corpus.__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("corpus", help="write the offline corpus for general distillation (train splits only)")
    c.add_argument("--data_dir", required=True, help="holds glue/<TASK>/train.tsv and/or squad/train-*.json")
    c.add_argument("--out", required=True, help="the corpus file to write")
    c.add_argument("--vocab", help="vocab.txt of the teacher, to count word pieces")
    a = p.parse_args()
    try:
        build_corpus(a.data_dir, a.out, a.vocab)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
