"""General distillation: a student of any shape learns a pre-trained teacher's embeddings and
Transformer layers on unlabeled text, by the Stage-1 losses (train.py's stage1_objective), at a
linear warm-up then decay: how General TinyBERT was made (TinyBERT, section 3.2); the authors of
MLKD ship it as general_distill.py (3 epochs at lr 5e-5, 10% warm-up, 128 tokens: the defaults).
The student it writes starts a task: `python train.py --task sst2 --student_init OUT/general`.

    python tools/corpus.py --data_dir DATA --out corpus.txt --vocab DIR/vocab.txt
    python tools/general_distill.py --corpus corpus.txt --teacher_init DIR \\
        --layers 4 --hidden 192 --ffn 768 --out out/general-4x192

1% of the corpus windows (at most 1000) are held out, never trained on: their Stage-1 losses at the
start and after every epoch are the curve in OUT/general/metrics.json ("heldout"). OUT/general is a
stage directory as train.py's are: the same command resumes it from its checkpoint.pt, and a rerun
with other settings is refused. Under torchrun it is data-parallel.
"""
import collections
import functools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import train  # noqa: E402
from model import Bert, read_safetensors  # noqa: E402

SAME = {f[0]: f for f in train.FLAGS if len(f) == 4}  # train.py's flags, where they mean the same


def same(name, text):
    """train.py's flag `name` (its type and default) with a help text of its own."""
    return (*SAME[name][:3], text)


FLAGS = [  # train.py's table form: a group header names the stage its flags change
    ("general distillation", "general"),
    ("corpus", train.paths, None, "unlabeled text files, comma-separated (tools/corpus.py; "
     "required)"),
    ("teacher_init", train.hub_or_dir, "google-bert/bert-base-uncased",
     "the pre-trained teacher: hub name or DIR"),
    ("student_init", train.hub_or_dir, "random", "random, or as train.py's: tinybert, "
     "teacher-layers, DIR (a general student to go on from: its projections too)"),
    SAME["layers"],
    same("hidden", "student width (default: 312 for tinybert, else the copied model's; random: "
         "the teacher's)"),
    SAME["heads"],
    SAME["ffn"],
    same("recipe", "tinybert: TinyBERT's general distillation losses (MSE of attention scores "
         "and hidden states, not weighted by --w_emb/--w_mha/--w_ffn)"),
    *(SAME[name] for name in "layer_map splits proj_init".split()),
    *(SAME[name] for name in "w_emb w_mha w_ffn mha_temperature weight_decay".split()),
    same("seed", "seeds the student's init, dropout, batch order and the held-out windows"),
    ("max_len", train.count, 128, "tokens per window of text, [CLS] and [SEP] included"),
    ("batch_size", train.count, 32, "windows per batch; under torchrun the global batch"),
    ("epochs", train.positive, 3.0, "epochs over the corpus"),
    ("lr", train.positive, 5e-5, "learning rate"),
    ("warmup", train.number, 0.1, "warm-up fraction of the steps"),
    same("max_steps", "cap the steps (quick runs)"),
    SAME["paper_exact"],
    SAME["compile"],
    same("group_by_length", "batches of similar lengths (runs of 100 sorted): less padding, "
         "the same masked losses"),
    ("running (changes no result but its float rounding)", ""),
    ("out", train.path, os.path.join("out", "general"), "writes OUT/general"),
    ("eval_steps", train.count, None, "held-out losses every N steps too (default: every epoch)"),
    *(SAME[name] for name in "save_steps log_steps device".split()),
    same("eval_batch_size", "batch size of the held-out losses"),
]


def parse_args(argv=None):
    """The flags, checked before any work (one line naming the flag, as train.py refuses)."""
    args = train.make_parser(FLAGS, __doc__).parse_args(argv)
    args.task, args.stages, args.metric = "general", ["general"], "loss"  # as train.py's functions read
    if not args.corpus:
        train.refuse("--corpus is required: the text files to distil on (tools/corpus.py writes one)")
    train.check_out(args.out)
    for f in args.corpus.split(","):
        if not os.path.isfile(f):
            train.refuse(f"--corpus {f!r}: no such file (tools/corpus.py writes one)")
    if args.student_init not in ("random", "tinybert", "teacher-layers") \
            and not os.path.isdir(args.student_init):
        train.refuse(f"--student_init {args.student_init}: not random/tinybert/teacher-layers nor "
                     "a directory")
    if args.recipe == "mlkd" and not any((args.w_emb, args.w_mha, args.w_ffn)):
        train.refuse("general distillation needs one of --w_emb --w_mha --w_ffn > 0")
    if args.recipe == "tinybert" and (args.splits, args.mha_temperature) != (12, 1.0):
        train.refuse("--splits and --mha_temperature shape MLKD's L_MHA, which --recipe tinybert has not")
    if not 0 <= args.seed < 2**32:
        train.refuse(f"--seed {args.seed}: use a whole number from 0 to 2**32 - 1")
    if args.group_by_length and args.paper_exact:
        if train.LEAD:  # under torchrun, process 0 alone says it
            print("--group_by_length is ignored with --paper_exact: every batch is padded to --max_len")
        args.group_by_length = False
    if args.warmup >= 1:
        train.refuse(f"--warmup must be a fraction in [0, 1), got {args.warmup}")
    if args.max_len < 3:
        train.refuse(f"--max_len {args.max_len}: a window needs [CLS], a word piece and [SEP]")
    return args


def main(argv=None):
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # under torchrun: data-parallel processes
        train.start_distributed(args)
    directory = os.path.join(args.out, "general")
    with train.main_process_first():  # under torchrun: process 0 downloads, then the others read
        source = train.fetch_models(args, args.teacher_init)
    documents = read_corpus(args.corpus.split(","))
    windows = corpus_windows(documents, data.Tokenizer(args.vocab), args.max_len)
    args.data_crc32 = train.crc32(windows)  # train.same_settings refuses a rewritten corpus
    n = len(windows["lengths"])
    if n < 2:
        raise ValueError(f"--corpus {args.corpus}: {n} window of text; general distillation needs 2")
    teacher = Bert.from_pretrained(source, verbose=False).to(args.device).eval().requires_grad_(False)
    args.teacher_crc32 = train.crc32(teacher.state_dict())  # and another teacher in the same place
    if os.path.isdir(args.student_init):  # and another general student to go on from
        start = Bert.from_pretrained(args.student_init, verbose=False)
        args.student_crc32 = train.crc32(start.state_dict())
    if not train.begin("general", directory, args, FLAGS):
        return data.read_json(os.path.join(directory, "metrics.json"))
    heldout, rows = split_heldout(windows, args.seed)
    k = len(heldout["lengths"])
    corpus = {"files": args.corpus, "windows": n, "heldout_windows": k,
              "word_pieces": int(windows["lengths"].sum()) - 2 * n}  # without [CLS] and [SEP]
    print(f"[general] corpus: {n:,} windows of at most {args.max_len} tokens, "
          f"{corpus['word_pieces']:,} word pieces; {k} held out")

    student, proj, lmap = train.stage1_start(teacher, args)
    loss_fn = functools.partial(train.stage1_objective, teacher=teacher, proj=proj, lmap=lmap,
                                args=args)
    saved = os.path.join(args.student_init, "projections.safetensors")
    if os.path.isfile(saved):  # going on from a general student: its W_0..W_M too
        state = read_safetensors(saved)
        if {k: v.shape for k, v in state.items()} != {k: v.shape for k, v in proj.state_dict().items()}:
            have, want = (f"{len(p) // 2} of {tuple(p['w.0.weight'].shape)}"
                          for p in (state, proj.state_dict()))
            raise ValueError(f"{saved}: its projections W_m (d_T, d_S) are {have}, this student and "
                             f"--teacher_init need {want}; go on with its --layers and teacher, or "
                             "copy it without projections.safetensors to start new ones")
        proj.load_state_dict(state)
    evaluate = functools.partial(heldout_losses, loss_fn=loss_fn, heldout=heldout, args=args)
    start = evaluate(student)
    print("[general] held-out at step 0: " + evaluation.format_metrics(start, 4))
    record, _ = train.fit("general", directory, [student, proj], loss_fn, rows, args, args.epochs,
                          args.lr, args.warmup, evaluate)
    train.save_model(student, directory, args, proj)
    log = os.path.join(directory, "log.jsonl")  # step 0 first: tools/pages.py draws the whole curve
    lines = [json.dumps({"stage": "general", "step": 0, "dev": start})] + [
        line for line in data.read_text(log).splitlines() if json.loads(line).get("step") != 0]
    curve = [{"step": r["step"], **r["dev"]} for r in map(json.loads, lines) if "dev" in r]
    if train.LEAD:
        data.atomic_write_text(log, "\n".join(lines) + "\n")
    train.finish(directory, {"train": record, "corpus": corpus, "heldout": curve}, args)
    print("[general] held-out losses, start -> end: " + ", ".join(
        f"{key} {curve[0][key]:.4f} -> {curve[-1][key]:.4f}" for key in start if key != "windows"))
    if train.dist.is_initialized():  # the processes leave together
        train.dist.barrier()
        train.dist.destroy_process_group()
    return {"corpus": corpus, "heldout": curve}


def read_corpus(paths):
    """Plain UTF-8 text files, one sentence or paragraph per line, documents separated by blank
    lines: a list of documents, each a list of lines. An empty file is refused."""
    documents = []
    for path in paths:
        current, before = [], len(documents)
        for line in data.read_text(path).splitlines() + [""]:  # a blank line closes the last document
            if line.strip():
                current.append(line.strip())
            elif current:
                documents.append(current)
                current = []
        if len(documents) == before:
            raise ValueError(f"corpus {path} is empty; give UTF-8 text, a sentence or paragraph "
                             "a line, documents apart by blank lines (tools/corpus.py writes one)")
    return documents


def corpus_windows(documents, tokenizer, max_len=128):
    """Pack consecutive lines of a document into windows [CLS] text [SEP] of at most max_len tokens
    (a longer line cut into pieces): {input_ids, token_type_ids, lengths} as data.encode_glue gives."""
    room, windows = max_len - 2, []
    pieces = iter(tokenizer.tokenize([line for doc in documents for line in doc]))
    for doc in documents:
        current = []
        for ids in (next(pieces).ids for _ in doc):
            for chunk in (ids[k:k + room] for k in range(0, len(ids), room)):
                if current and len(current) + len(chunk) > room:  # no room: close the window
                    windows.append(current)
                    current = []
                current += chunk
        if current:
            windows.append(current)
    ids = torch.full((len(windows), max_len), tokenizer.pad_id, dtype=torch.long)
    for i, w in enumerate(windows):  # once per corpus, before training
        ids[i, :len(w) + 2] = torch.tensor([tokenizer.cls_id, *w, tokenizer.sep_id])
    lengths = torch.tensor([len(w) + 2 for w in windows], dtype=torch.long)
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "lengths": lengths}


def split_heldout(windows, seed):
    """(held out, trained on): 1% of the windows (at least 1, at most 1000), drawn by --seed."""
    n = len(windows["lengths"])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = min(1000, max(1, n // 100))
    return tuple({key: v[i] for key, v in windows.items()} for i in (order[:k], order[k:]))


@torch.no_grad()
def heldout_losses(student, loss_fn, heldout, args):
    """Each Stage-1 loss and their weighted sum over the held-out windows (eval mode): each batch's
    weighted by the positions its losses average over (the real tokens; every position with
    --paper_exact, whose batches are padded to --max_len), so --eval_batch_size changes nothing
    (but for --recipe tinybert's attention MSE, a mean over token pairs: close, not exact)."""
    student.eval()
    sums, n, positions = collections.Counter(), 0, 0
    for b in data.batches(heldout, args.eval_batch_size, fixed_padding=args.paper_exact):
        b = {k: v.to(args.device) for k, v in b.items()}
        with torch.autocast("cuda", torch.bfloat16, enabled=args.device.startswith("cuda")):
            total, parts = loss_fn(student, b)
        weight = b["attention_mask"].numel() if args.paper_exact else int(b["attention_mask"].sum())
        sums.update({k: float(v) * weight for k, v in {**parts, "loss": total}.items()})
        n, positions = n + len(b["index"]), positions + weight
    return {**{k: v / positions for k, v in sums.items()}, "windows": n}


if __name__ == "__main__":
    try:
        main()
    except (ValueError, data.DownloadError, FloatingPointError, OSError) as e:
        train.say_error(data.error_line(e, "an --out"))
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume from the checkpoint", file=sys.stderr)
        sys.exit(130)
