"""data.py: what the models read, in this order: the WordPiece tokenizer; the GLUE tasks and their
files, read as the official tools read them; batches; SQuAD (reader, windows, answers); then the
machinery (downloads, text files, atomic writes, errors). (Unlabeled text for general distillation:
tools/corpus.py writes it, tools/general_distill.py reads it.)
A reader refuses an empty, cut-short, binary or wrongly encoded file in one line naming it. Sources:
the GLUE download script and paper, Google's run_classifier.py / run_squad.py, the SQuAD scripts.
"""
import csv
import io
import json
import os
import sys
from collections import Counter, namedtuple
from dataclasses import make_dataclass

import numpy as np
import torch

HUB_URL = "https://huggingface.co"
FILES_URL = "https://dl.fbaipublicfiles.com"  # GLUE's and SentEval's files
REFETCH = "delete it and run again to download it anew (the README's 'Data' section)"
TMP_PREFIX = ".tmp-"  # atomic writes stage their bytes in <directory>/.tmp-<random>


# ----------------------------------------------------------------------------------------------
# The tokenizer: BERT WordPiece from vocab.txt (the `tokenizers` package does the work)


def uncased(vocab):
    """Whether a vocabulary (its word pieces) is uncased: an uncased one has no pieces with capitals
    (a stray few aside). A cased one (bert-base-cased, Google's cased_* releases) has many, and text
    for it keeps its case and accents (tokenization.py's do_lower_case=False)."""
    capitals = sum(t != t.lower() for t in vocab if not t.startswith("["))
    return capitals <= len(vocab) // 100


class Tokenizer:
    """BERT tokenisation by vocab.txt (clean; for an uncased vocabulary lower-case and strip
    accents; split; WordPiece), as Google's tokenization.py computes it, but for private-use
    characters (U+E000...): `tokenizers` drops them; Google's keeps them, and the word is [UNK];
    a word-final Greek capital sigma, which Google's str.lower() of the word makes final ς; and
    U+2B820..U+2B91F, CJK to Google, not to `tokenizers` (its range starts at U+2B920), and about
    500 characters newer than its Unicode tables (U+061D...): none of them in GLUE or SQuAD."""

    def __init__(self, vocab_file):
        from tokenizers import BertWordPieceTokenizer
        vocab = read_text(vocab_file).splitlines()
        if not {"[PAD]", "[UNK]", "[CLS]", "[SEP]"} <= set(vocab):
            raise ValueError(f"{vocab_file} lacks [PAD], [UNK], [CLS] or [SEP]: empty, cut short "
                             "or not a BERT vocabulary; copy the model's vocab.txt again")
        self.lowercase = uncased(vocab)
        self.wp = BertWordPieceTokenizer(str(vocab_file), lowercase=self.lowercase)
        self.pad_id, self.cls_id, self.sep_id = map(self.wp.token_to_id, "[PAD] [CLS] [SEP]".split())

    def tokenize(self, texts):
        """Word pieces without special tokens: tokenizers.Encoding's (.ids, .offsets in chars)."""
        return self.wp.encode_batch(list(texts), add_special_tokens=False)

    def encode(self, texts_a, texts_b=None, max_length=128):
        """[CLS] a [SEP] (b [SEP]) per example, cut to max_length as run_classifier.py's
        _truncate_seq_pair cuts a pair (one token at a time from the longer text, b on a tie; not
        as `tokenizers`). Returns (ids (N, max_length), [PAD]-padded; token_type_ids; lengths)."""
        pair = texts_b is not None
        a = self.wp.encode_batch(list(texts_a), add_special_tokens=False)
        b = self.wp.encode_batch(list(texts_b), add_special_tokens=False) if pair else None
        ids = np.full((len(a), max_length), self.pad_id, dtype=np.int64)
        types, lengths = np.zeros_like(ids), np.zeros(len(a), dtype=np.int64)
        for i in range(len(a)):  # once per data set, before training
            x, y = a[i].ids, b[i].ids if pair else []  # an empty b: one text (Google's `if tokens_b`)
            budget = max_length - 3 if y else max_length - 2  # room left by [CLS] and the [SEP]s
            # Google's _truncate_seq_pair (cut the longer text, b on a tie) in closed form: a keeps
            # all it can beside all of b, and at least half the budget, rounded up
            ka = min(len(x), max((budget + 1) // 2, budget - len(y)))
            kb = min(len(y), budget - ka)
            seq = [self.cls_id, *x[:ka], self.sep_id] + ([*y[:kb], self.sep_id] if y else [])
            ids[i, :len(seq)] = seq
            types[i, ka + 2:len(seq)] = 1
            lengths[i] = len(seq)
        return torch.from_numpy(ids), torch.from_numpy(types), torch.from_numpy(lengths)


# ----------------------------------------------------------------------------------------------
# GLUE: the official download script's layout, <data_dir>/glue/<folder>/{train,dev,test}.tsv


# A task's fields: folder: the official download script's directory; a, b: the columns of the first
# and second sentence in train/dev (b None: single-sentence task); label: the label's column (-1 =
# last; None: test only); labels: the label strings in index order (() = regression); metric: GLUE's
# official metric (the paper reports it, train.py selects on it); sizes: the official number of
# examples per file, train, dev..., test... (GLUE paper; the download script); max_len: word pieces
# per example in the MLKD authors' default_params (CoLA, SST-2 64: their teacher's; their
# task_distill.py sets args.max_seq_len, a typo, so their Stage 1 and 2 ran at its default 128);
# header: False where train and dev have no header line (CoLA); test_cols: (a, b) in test.tsv where
# they differ.
Task = namedtuple("Task", ["folder", "a", "b", "label", "labels", "metric", "sizes", "max_len",
                           "header", "test_cols", "dev_splits", "test_splits"],
                  defaults=(128, True, None, ("dev",), ("test",)))
TASKS = {  # "ax": the diagnostic set, predicted with an MNLI model; test only
    "cola": Task("CoLA", 3, None, 1, ("0", "1"), "mcc", (8551, 1043, 1063), 64, header=False, test_cols=(1, None)),
    "sst2": Task("SST-2", 0, None, 1, ("0", "1"), "acc", (67349, 872, 1821), 64, test_cols=(1, None)),
    "mrpc": Task("MRPC", 3, 4, 0, ("0", "1"), "f1", (3668, 408, 1725)),
    "stsb": Task("STS-B", 7, 8, -1, (), "spearman", (5749, 1500, 1379)),
    "qqp": Task("QQP", 3, 4, 5, ("0", "1"), "f1", (363846, 40430, 390965), test_cols=(1, 2)),
    "mnli": Task("MNLI", 8, 9, -1, ("contradiction", "entailment", "neutral"), "acc", (392702, 9815, 9832, 9796, 9847),
                 dev_splits=("dev_matched", "dev_mismatched"), test_splits=("test_matched", "test_mismatched")),
    "qnli": Task("QNLI", 1, 2, -1, ("entailment", "not_entailment"), "acc", (104743, 5463, 5463)),
    "rte": Task("RTE", 1, 2, -1, ("entailment", "not_entailment"), "acc", (2490, 277, 3000)),
    "wnli": Task("WNLI", 1, 2, -1, ("0", "1"), "acc", (635, 71, 146)),
    "ax": Task("diagnostic", 1, 2, None, ("contradiction", "entailment", "neutral"), "acc", (1104,)),
}
# One example: guid ("<split>-<row>", or the test file's index, which the submission needs), text_a,
# text_b (None: single sentence), label (an int label index, a float score (STS-B), None in test
# files). A dataclass: eval.py copies one with dataclasses.replace.
Example = make_dataclass("Example", ["guid", "text_a", "text_b", "label"])


def is_pair(task):
    """Whether a task's examples are two texts, [CLS] a [SEP] b [SEP] (segments 0 and 1): SQuAD's
    question and context, a GLUE task with a second sentence."""
    return task.startswith("squad") or task in TASKS and TASKS[task].b is not None


def read_glue(task, split, data_dir, allow_partial=False):
    """The examples of one GLUE split (downloaded on first use), read as the official processors
    read it. An empty, narrow or cut-short file is refused, and so is a dev or test file without the
    official number of examples (the metric would not be the task's) unless allow_partial."""
    if task not in TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; known: {', '.join(TASKS)}")
    t = TASKS[task]
    splits = ("test",) if task == "ax" else ("train", *t.dev_splits, *t.test_splits)
    if split not in splits:
        raise ValueError(f"{task} has no split {split!r}; its splits: {', '.join(splits)}")
    path = os.path.join(data_dir, "glue", t.folder, "diagnostic.tsv" if task == "ax" else f"{split}.tsv")
    if not os.path.exists(path):
        download_glue(task, data_dir, path)
    text = read_text(path, "utf-8-sig")  # utf-8-sig: MRPC starts with a BOM
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    except csv.Error as e:  # a field over csv's 128 KiB: no GLUE sentence is that long
        raise ValueError(f"{path}: {e}; {REFETCH}") from None
    test = split.startswith("test")
    header = t.header or test  # CoLA's train/dev have no header, its test file has one
    a, b = t.test_cols if test and t.test_cols else (t.a, t.b)
    # the header's width; CoLA's train and dev have none: source, label, its mark, the sentence
    width = (len(rows[0]) if rows else 0) if header else 4
    if len(rows) <= header or width <= max(a, b or 0, -1 if test else t.label):  # no rows to read
        raise ValueError(f"{path} is empty or has too few columns for {t.folder}; {REFETCH}")
    examples = []
    for i, row in enumerate(rows[header:]):
        if len(row) != width:  # QQP has a few malformed rows: rows of another width are dropped
            continue
        try:  # a label's index, or a score where there are no labels (regression: STS-B, 0 to 5)
            label = None if test else t.labels.index(row[t.label]) if t.labels else float(row[t.label])
            if not (test or t.labels or 0 <= label <= 5):  # nan, inf and 4_0 (40) parse as floats
                raise ValueError
        except ValueError:
            ok = f"one of {t.labels}" if t.labels else "a number from 0 to 5"
            raise ValueError(f"{path}, line {i + 1 + header}: label {row[t.label]!r} is not {ok}") from None
        guid = row[0] if test else f"{split}-{i}"
        examples.append(Example(guid, row[a], row[b] if b is not None else None, label))
    if len(examples) < len(rows) - header:  # dropped rows: a file cut short ends in one
        if not examples or (len(rows[-1]) != width and not text.endswith("\n")):
            raise ValueError(f"{path} ends in the middle of a row or has no whole one; {REFETCH}")
        print(f"[data] {path}: skipped {len(rows) - header - len(examples)} malformed rows", file=sys.stderr)
    want = t.sizes[splits.index(split)]
    if len(examples) != want:
        count_differs(path, len(examples), want, strict=split != "train" and not allow_partial)
    return examples


def count_differs(path, have, want, strict):
    """A file without the official number of examples: an error if strict, else a warning."""
    msg = f"{path} has {have} examples; the official file has {want}"
    if strict:
        raise ValueError(f"{msg}: a truncated or altered file? Fetch it again, or pass "
                         "--allow_partial to score on these rows anyway (not the official metric)")
    print(f"[data] warning: {msg}", file=sys.stderr)


def encode_glue(task, examples, tokenizer, max_len=None):
    """Tokenise every example once: padded tensors, a row an example (a batch: a gather, a trim)."""
    t = TASKS[task]
    texts_b = [e.text_b for e in examples] if t.b is not None else None
    ids, types, lengths = tokenizer.encode([e.text_a for e in examples], texts_b, max_len or t.max_len)
    out = {"input_ids": ids, "token_type_ids": types, "lengths": lengths}
    if examples and examples[0].label is not None:  # int64 label indices, float32 scores (STS-B)
        out["labels"] = torch.tensor([e.label for e in examples])
    return out


def batches(dataset, batch_size, shuffle=False, generator=None, fixed_padding=False, start=0,
            group_by_length=0, buckets=False):
    """Batches {input_ids, token_type_ids, attention_mask, labels..., index} of an encoded dataset,
    trimmed to their longest row (fixed_padding: max length, as the authors ran), from batch
    `start`. group_by_length=G (HF's name): each run of G batches of shuffled rows is sorted by
    length, cut, and its batches shuffled. buckets: widths rounded up to a power of two (>= 16, <=
    the dataset's), so a compiled model sees few shapes; the extra columns are [PAD] with mask 0."""
    n, lengths, full = len(dataset["input_ids"]), dataset["lengths"], dataset["input_ids"].shape[1]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    rows = list(order.split(batch_size))  # the rows of each batch
    if group_by_length:
        rows = []
        for run in order.split(group_by_length * batch_size):
            by_length = run[torch.argsort(lengths[run], stable=True)].split(batch_size)
            shuffled = torch.randperm(len(by_length), generator=generator).tolist()
            rows += [by_length[i] for i in shuffled]
    for idx in rows[start:]:
        width = full if fixed_padding else int(lengths[idx].max())
        if buckets:  # the least power of two >= width, e.g. 17..32 -> 32
            width = min(full, max(16, 2 ** (width - 1).bit_length()))
        batch = {k: v[idx, :width] if k in ("input_ids", "token_type_ids") else v[idx]
                 for k, v in dataset.items() if k != "lengths"}
        batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[idx][:, None]).long()
        batch["index"] = idx
        yield batch


# ----------------------------------------------------------------------------------------------
# SQuAD v1.1 / v2.0


def read_squad(path, allow_partial=False, version=None):
    """The official JSON, flattened: [{id, title, question, context, answers: [{text,
    answer_start}]}] (no answers: unanswerable, v2.0). An official file is downloaded when missing;
    an official dev file without the official count of questions is refused unless allow_partial,
    and so is a file with unanswerable questions for version "1.1" (whose score needs answers)."""
    official = {"train-v1.1.json": 87599, "dev-v1.1.json": 10570,  # questions (the SQuAD papers)
                "train-v2.0.json": 130319, "dev-v2.0.json": 11873}
    name = os.path.basename(path)
    if not os.path.exists(path):
        if name not in official:
            raise FileNotFoundError(f"SQuAD file {path} does not exist")
        download(f"https://rajpurkar.github.io/SQuAD-explorer/dataset/{name}", path, place=path)
    try:
        top = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e}): empty or cut short? Then {REFETCH}") from None
    examples = []
    for i, article in enumerate(squad_field(top, "data", list, "the file", path)):
        for j, para in enumerate(squad_field(article, "paragraphs", list, f"data[{i}]", path)):
            where = f"data[{i}].paragraphs[{j}]"
            context = squad_field(para, "context", str, where, path)
            for k, qa in enumerate(squad_field(para, "qas", list, where, path)):
                at = f"{where}.qas[{k}]"
                impossible = isinstance(qa, dict) and qa.get("is_impossible")  # v2.0: no answer
                answers = [] if impossible else squad_field(qa, "answers", list, at, path)
                for n, answer in enumerate(answers):
                    text = squad_field(answer, "text", str, f"{at}.answers[{n}]", path)
                    start = squad_field(answer, "answer_start", int, f"{at}.answers[{n}]", path)
                    if not 0 <= start <= len(context) - len(text):  # Google's reader fails too
                        raise ValueError(f"{path}: {at}.answers[{n}] ends past its context of "
                                         f"{len(context)} characters; {REFETCH}")
                examples.append(dict(id=squad_field(qa, "id", str, at, path),
                                     title=article.get("title", ""),
                                     question=squad_field(qa, "question", str, at, path),
                                     context=context, answers=answers))
    if not examples:
        raise ValueError(f"{path} holds no questions; {REFETCH}")
    ids = Counter(e["id"] for e in examples)  # the official scripts key answers by id
    if len(ids) < len(examples):
        raise ValueError(f"{path}: question id {ids.most_common(1)[0][0]!r} is used "
                         f"{ids.most_common(1)[0][1]} times; each question needs its own")
    unanswerable = sum(not e["answers"] for e in examples)
    if version == "1.1" and unanswerable:
        raise ValueError(f"{path}: {unanswerable} unanswerable questions, a SQuAD v2.0 file: use "
                         "--task squad2")
    if name in official and len(examples) != official[name]:
        count_differs(path, len(examples), official[name], name.startswith("dev") and not allow_partial)
    return examples


def squad_field(obj, key, kind, where, path):
    """obj[key], which the official layout (data[].paragraphs[].{context, qas[].{id, question,
    answers[]}}) says is a `kind`; a clear error naming the file and the place otherwise."""
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        got = "nothing" if value is None else type(value).__name__
        want = {list: "a list", str: "a string", int: "an integer"}[kind]
        raise ValueError(f"{path}: {where}.{key} should be {want}, found {got}; not the official SQuAD layout "
                         "data[].paragraphs[].qas[] (rajpurkar.github.io/SQuAD-explorer)")
    return value


def split_squad(path, first, head_path, tail_path=None):
    """Write the first `first` articles of a SQuAD file to head_path and the rest to tail_path (if
    given), in the official format: a split by article keeps a paragraph's questions on one side."""
    doc = read_json(path)
    if not 0 < first < len(squad_field(doc, "data", list, "the file", path)):
        raise ValueError(f"{path} has {len(doc['data'])} articles: cannot split after {first}")
    for out, part in ((head_path, doc["data"][:first]), (tail_path, doc["data"][first:])):
        if out:
            atomic_write_text(out, json.dumps({"version": doc.get("version", ""), "data": part}, ensure_ascii=False))


def squad_features(examples, tokenizer, max_len=384, stride=128, max_query=64, train=True):
    """Cut every (question, context) into windows [CLS] question [SEP] window [SEP]; `stride` is
    the STEP between window starts as in Google's run_squad.py (doc_stride), not an overlap as in
    `tokenizers`. Target (train=True): the first answer's token span if wholly in the window, else
    (0, 0), as for every window of dev. Returns tensors, a row per window, with its example and each
    token's char span (-1: none)."""
    questions = tokenizer.tokenize(e["question"] for e in examples)
    contexts = tokenizer.tokenize(e["context"] for e in examples)
    kept = [min(len(q.ids), max_query) for q in questions]  # each question's pieces in a window
    if kept and max_len < max(kept) + 4:  # [CLS] question [SEP], a context piece, [SEP]
        i = kept.index(max(kept))  # the file's longest question
        raise ValueError(f"--max_len {max_len}: question {examples[i]['id']} keeps {kept[i]} word "
                         f"pieces, no room for its context; this file needs --max_len "
                         f"{kept[i] + 4} or more")
    rows = []  # one per window: input_ids, token_type_ids, lengths, labels, example, offsets
    for i, (ex, q, c) in enumerate(zip(examples, questions, contexts)):
        q_ids = q.ids[:max_query]
        first = len(q_ids) + 2  # position of a window's first context token
        room = max_len - first - 1
        offsets = np.array(c.offsets, dtype=np.int64).reshape(-1, 2)  # (n_ctx, 2) char [start, end)
        answer = None  # the answer's first and last context token
        if train and ex["answers"]:
            begin = ex["answers"][0]["answer_start"]  # its characters: [begin, end)
            end = begin + len(ex["answers"][0]["text"])
            tokens = np.nonzero((offsets[:, 1] > begin) & (offsets[:, 0] < end))[0]  # overlapping
            answer = (tokens[0], tokens[-1]) if len(tokens) else None
        # run_squad.py's while loop: a window starts every `step` tokens while the window before it
        step = min(room, stride)  # stopped short of the context's end (start - step + room < n_ctx)
        for start in range(0, max(len(c.ids) - room + step, 1), step):
            n = min(room, len(c.ids) - start)
            ids = [tokenizer.cls_id, *q_ids, tokenizer.sep_id, *c.ids[start:start + n], tokenizer.sep_id]
            pad = max_len - len(ids)
            tok_off = np.full((max_len, 2), -1, dtype=np.int64)
            tok_off[first:first + n] = offsets[start:start + n]
            held = answer is not None and start <= answer[0] and answer[1] < start + n
            label = (first + answer[0] - start, first + answer[1] - start) if held else (0, 0)
            types = [0] * first + [1] * (n + 1) + [0] * pad
            rows.append((ids + [tokenizer.pad_id] * pad, types, len(ids), label, i, tok_off))
    names = ("input_ids", "token_type_ids", "lengths", "labels", "example", "offsets")
    return {k: torch.tensor(np.array(column)) for k, column in zip(names, zip(*rows))}


def squad_predictions(examples, features, start_logits, end_logits, n_best=20, max_answer=30,
                      version="1.1", null_threshold=0.0):
    """Per-window start/end logits (numpy (F, L), L = max_len: eval.model_outputs pads each batch's
    to it with -1e4) -> {question_id: answer}: the best start + end over windows, of the top
    n_best starts x n_best ends in context, start <= end, <= max_answer tokens, in any window that
    holds them (HF's run_qa.py; Google's run_squad.py also asks that the start's window be its
    max-context one). v2.0: null = least start[0] + end[0] over windows; "" when null - best >
    null_threshold.
    Returns (predictions, null_minus_best {id: float}, for eval.py's threshold search)."""
    best, null = {}, {}  # example index -> (score, text); example index -> min null score
    offsets = features["offsets"].numpy()
    for f, ex_i in enumerate(features["example"].tolist()):
        s_log, e_log = start_logits[f], end_logits[f]
        valid = offsets[f, :, 0] >= 0  # context tokens of this window
        null[ex_i] = min(null.get(ex_i, np.inf), float(s_log[0] + e_log[0]))
        # the n_best highest, of equal ones the first (Google's _get_best_indexes sorts stably)
        starts, ends = (np.argsort(-x, kind="stable")[:n_best] for x in (s_log, e_log))
        s, e = starts[:, None], ends[None, :]  # (n_best, n_best) pairs by broadcasting
        ok = valid[s] & valid[e] & (e >= s) & (e - s + 1 <= max_answer)
        if not ok.any():
            continue
        score = np.where(ok, s_log[s] + e_log[e], -np.inf)
        k = np.unravel_index(np.argmax(score), score.shape)
        if ex_i not in best or score[k] > best[ex_i][0]:
            chars = offsets[f, starts[k[0]], 0], offsets[f, ends[k[1]], 1]
            best[ex_i] = (float(score[k]), examples[ex_i]["context"][chars[0]:chars[1]])
    predictions, null_minus_best = {}, {}
    for i, ex in enumerate(examples):
        score, text = best.get(i, (-np.inf, "empty"))  # no valid span: the reference's placeholder
        if version == "2.0":
            null_minus_best[ex["id"]] = null.get(i, np.inf) - score
            text = "" if null_minus_best[ex["id"]] > null_threshold else text
        predictions[ex["id"]] = text
    return predictions, null_minus_best


# ----------------------------------------------------------------------------------------------
# Machinery, which a reader of the formats may skip: downloads, text files, atomic writes, errors


def download_glue(task, data_dir, path):
    """Fetch a task as the official download script lays it out, MRPC as that script builds it:
    SentEval's train file split into train/dev by mrpc_dev_ids.tsv (header copied, BOM and all),
    the test file re-indexed without labels. `path`: the file wanted (said in an error)."""
    t, root = TASKS[task], os.path.join(data_dir, "glue")
    if task == "ax":  # one file: <root>/diagnostic/diagnostic.tsv
        return download(f"{FILES_URL}/glue/data/AX.tsv", path, place=path)
    if task != "mrpc":
        name = {"qqp": "QQP-clean", "qnli": "QNLIv2"}.get(task, t.folder)  # the archive's name
        md5 = "9f81648d4199384278b86e315dac217c" if task == "sst2" else None
        zip_path = download(f"{FILES_URL}/glue/data/{name}.zip", os.path.join(root, f"{name}.zip"), md5, place=path)
        unzip(zip_path, root)
        os.remove(zip_path)
        if not os.path.isdir(os.path.join(root, t.folder)):
            raise ValueError(f"{zip_path} did not contain the folder {t.folder}/")
        return
    senteval, texts = f"{FILES_URL}/senteval/senteval_data/msr_paraphrase", []
    for url in (f"{senteval}_train.txt", f"{senteval}_test.txt", f"{FILES_URL}/glue/data/mrpc_dev_ids.tsv"):
        dest = os.path.join(root, "MRPC", "original", url.rsplit("/", 1)[-1])
        texts.append(read_text(download(url, dest, place=path)))
        if "msr_paraphrase" in dest and not texts[-1].removeprefix("\ufeff").startswith("Quality\t"):
            os.remove(dest)  # an error page saved as the file: fetched again next time
            raise ValueError(f"{url} sent no MRPC file (its header is not SentEval's); run again")
    dev_ids = {tuple(ln.strip().split("\t")) for ln in texts[2].splitlines() if ln.strip()}
    header, *lines = texts[0].splitlines(keepends=True)
    train = [header] + [ln for ln in lines if tuple(ln.split("\t")[1:3]) not in dev_ids]
    dev = [header] + [ln for ln in lines if tuple(ln.split("\t")[1:3]) in dev_ids]
    tests = texts[1].removeprefix("\ufeff").splitlines()[1:]
    test = ["index\t#1 ID\t#2 ID\t#1 String\t#2 String\n"]
    test += [f"{i}\t" + "\t".join(ln.split("\t")[1:]) + "\n" for i, ln in enumerate(tests)]  # no label
    for name, rows in (("train", train), ("dev", dev), ("test", test)):
        atomic_write_text(os.path.join(root, "MRPC", f"{name}.tsv"), "".join(rows))


class DownloadError(RuntimeError):
    """A file that could not be fetched; the message says where a user without internet puts it."""

    def __init__(self, url, reason, status=None, place=None):
        self.status = status  # the HTTP status, when the server answered
        where = f"place it at {place}" if place else (
            "place it by hand: GLUE/SQuAD under --data_dir (the README's 'Data' section), weights "
            "as a model directory (config.json, vocab.txt, weights) passed by path")
        super().__init__(f"download of {url} failed: {reason}. Fetch it where you can and {where}")


def download(url, dest, md5=None, sha256=None, retries=5, chunk=1 << 16, place=None):
    """Fetch url to dest unless dest exists: streamed to dest + '.part' (a cut transfer resumes it
    by HTTP Range, over the file's own bytes: no gzip), checked (check_digests), renamed. A busy
    server (429, 5xx) is tried again; an unreachable host is an error at once. `place`: where to
    put the file by hand. No directory is made before the server answers."""
    import time
    import requests
    if os.path.exists(dest):
        return dest
    part = dest + ".part"
    for attempt in range(retries):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        r = None  # the server's answer
        try:
            headers = {"Accept-Encoding": "identity"}  # no gzip: Range counts the file's bytes
            if have:
                headers["Range"] = f"bytes={have}-"
            with requests.get(url, headers=headers, stream=True, timeout=30) as r:
                if r.status_code == 416:  # nothing from byte `have` on: the .part is whole if the
                    if r.headers.get("Content-Range", "").endswith(f"/{have}"):  # file is that long
                        break
                    os.remove(part)  # else it is another file's, or stale: start over
                    continue
                if r.status_code in (429, 500, 502, 503, 504) and attempt < retries - 1:
                    print(f"[download] {url}: HTTP {r.status_code}; trying again", file=sys.stderr)
                    time.sleep(2 ** attempt)
                    continue
                if r.status_code not in (200, 206):
                    raise DownloadError(url, f"HTTP {r.status_code}", r.status_code, place)
                if r.status_code == 206 and not r.headers.get("Content-Range", "").startswith(
                        f"bytes {have}-"):  # not the bytes asked for: start over
                    os.remove(part)
                    continue
                have = have if r.status_code == 206 else 0  # 200: Range ignored, start over
                total = have + int(r.headers.get("Content-Length", 0)) or None
                if save_body(r, part, have > 0, chunk, dest) >= (total or 0):
                    break
        except requests.RequestException as e:
            if r is None and not isinstance(e, requests.ReadTimeout):  # no answer: unreachable
                raise DownloadError(url, f"cannot reach the server ({type(e).__name__}; offline?)",
                                    place=place) from None
            if attempt == retries - 1:
                raise DownloadError(url, f"{type(e).__name__}: {e}", place=place) from None
            print(f"[download] {url}: cut ({type(e).__name__}); resuming", file=sys.stderr)
    else:
        raise DownloadError(url, f"incomplete after {retries} attempts", place=place)
    check_digests(part, url, md5, sha256, r)
    os.replace(part, dest)
    return dest


def check_digests(part, url, md5, sha256, answer):
    """Refuse, and delete, a downloaded file whose md5 or sha256 is another: those given, and the
    sha256 the hub names for a git-LFS file (the weights) as X-Linked-Etag of its redirect."""
    import hashlib
    tags = [hop.headers.get("X-Linked-Etag", "").strip('"') for hop in (*answer.history, answer)]
    sha256 = sha256 or next((t for t in tags if len(t) == 64), None)  # a git blob's tag: 40 hex
    for algorithm, want in (("md5", md5), ("sha256", sha256)):
        with open(part, "rb") as f:
            got = hashlib.new(algorithm, f.read()).hexdigest() if want else None
        if got != want:
            os.remove(part)
            raise DownloadError(url, f"{algorithm} mismatch: expected {want}, got {got}; the "
                                "partial file was removed")


def save_body(r, part, append, chunk, shown):
    """Write an HTTP answer's body to `part` (after what it holds when `append`: a resumed transfer),
    saying the MiB so far every 100 blocks; returns the size of `part` then."""
    os.makedirs(os.path.dirname(os.path.abspath(part)), exist_ok=True)
    with open(part, "ab" if append else "wb") as f:
        for i, block in enumerate(r.iter_content(chunk)):
            f.write(block)
            if i % 100 == 0:
                print(f"\r[download] {shown}: {f.tell() >> 20} MiB", end="", file=sys.stderr)
        done = f.tell()
    print(f"\r[download] {shown}: {done >> 20} MiB", file=sys.stderr)
    return done


def unzip(zip_path, dest_dir):
    """Extract a zip archive into dest_dir: whole into a temporary folder there first, then each
    file renamed into place, so a damaged archive or a kill leaves no file cut short (a reader
    would trust it). A damaged archive is a one-line error."""
    import shutil
    import zipfile
    import zlib
    remove_stale_temporaries(dest_dir)  # a killed extraction's folder
    tmp = os.path.join(dest_dir, TMP_PREFIX + os.urandom(6).hex())
    try:
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(tmp)
        for folder, _, files in os.walk(tmp):
            for name in files:
                final = os.path.join(dest_dir, os.path.relpath(folder, tmp), name)
                os.makedirs(os.path.dirname(final), exist_ok=True)
                os.replace(os.path.join(folder, name), final)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # not a zip, a bad CRC, cut short
        raise ValueError(f"{zip_path} is not a valid zip file ({e}); delete it and run again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_text(path, encoding="utf-8"):
    """A whole text file as str, line ends as they are. A byte that is not valid in the encoding,
    or a NUL byte (a binary file), is a one-line error naming the file, the line and the byte."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if b"\0" not in raw:
            return raw.decode(encoding)
        bad = raw.index(b"\0")
    except UnicodeDecodeError as e:  # utf-8-sig counts from after a byte-order mark
        bad = e.start + 3 * (encoding == "utf-8-sig" and raw.startswith(b"\xef\xbb\xbf"))
    line, column = raw.count(b"\n", 0, bad) + 1, bad - raw.rfind(b"\n", 0, bad)
    raise ValueError(f"{path}, line {line}, column {column}: byte 0x{raw[bad]:02x} is not valid UTF-8 text "
                     "(binary or damaged?); re-save it as UTF-8, or delete it and run again")


def read_json(path):
    """A JSON file's object; a file that is no JSON object is a one-line error naming it (e.g. a
    stage's args.json or metrics.json edited by hand: this repo writes them atomically, whole)."""
    try:
        value = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e}); repair or delete it") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object ({type(value).__name__}); repair or delete it")
    return value


def atomic_write_bytes(path, blocks):
    """Write blocks of bytes (or one str, in UTF-8) to a new file beside path, fsync, then rename it
    over path: never half a file. The file gets the mode any open() gives (0666 less the umask)."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), TMP_PREFIX + os.urandom(6).hex())
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    try:
        with open(tmp, "xb") as f:  # x: a new file, never another writer's
            f.writelines([blocks.encode("utf-8")] if isinstance(blocks, str) else blocks)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            e.filename = path  # a full disk, a folder we may not write: say which file it stopped
        raise


atomic_write_text = atomic_write_bytes  # the same writer, called with a str


def remove_stale_temporaries(directory):
    """Delete what a killed atomic write or unzip left behind (SIGKILL skips their cleanup)."""
    import glob
    import shutil
    for tmp in glob.glob(os.path.join(glob.escape(directory), TMP_PREFIX + "*")):
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        else:
            os.remove(tmp)


def error_line(e, writable):
    """The one line a user reads for an error, a full disk or a file we may not read or write said
    in words (atomic writes leave nothing half-written, a rerun resumes); `writable`: what to
    choose."""
    import errno
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return (f"no space left on the device while writing {e.filename or 'a file'}; nothing half-written "
                "was kept. Free some space and rerun the same command: it resumes")
    if isinstance(e, IsADirectoryError):
        return f"{e.filename}: a folder, where a file is read or written; name a file"
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        if e.filename and os.path.exists(e.filename) and not os.access(e.filename, os.R_OK):
            return f"cannot read {e.filename}: {e.strerror}; make it readable (chmod u+r)"
        return f"cannot write {e.filename}: {e.strerror}; choose {writable} you can write to"
    return str(e)
