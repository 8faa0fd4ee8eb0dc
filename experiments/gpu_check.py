"""experiments/gpu_check.py: prepared checks of the CUDA path, for a GPU machine without network.

    python experiments/gpu_check.py --data_dir DIR    # DIR/glue/SST-2/{train,dev}.tsv, copied there
    python experiments/gpu_check.py --tiny --data_dir DIR --device cpu    # small, short: the tests
    python experiments/gpu_check.py --recipe --data_dir DIR [--compile] [--epoch_scale 0.1]

Downloads nothing: the teacher is random, BERT-base-shaped, with a vocabulary made from SST-2's
training text. Without --recipe it runs, in this order, and prints one markdown table (check,
result, what it means):

    parity      our Bert against HF transformers' BertModel (if importable) at BERT-base shape,
                random weights, fp32: the largest difference of the last hidden states
    speed       forward + backward tokens/s of both in bf16 autocast at batch 32 x 128, their ratio,
                and our MFU: 6 x (non-embedding parameters) + 12 x layers x width x length FLOPs per
                token, over --peak_tflops
    steps       experiments/bench_steps.py at the paper's shapes (BERT-base -> 4 x 312): teacher,
                student, Stage-1 step, Stage-2 step live and cached
    heads       eval.py --speed's latency of a 4 x 312 student at 12, 6 and 3 heads
    pipeline    train.py on the real SST-2 files: a random BERT-base-shaped teacher, teacher ->
                Stage 1 -> Stage 2 -> eval with --max_steps, then eval.py on the student and its
                relation page (tools/relations.py)

With --recipe it prints two tables instead, each as soon as it is measured:

    MFU curve   our BERT-base forward + backward at batch 16 to 256 x 128 tokens in bf16 autocast:
                tokens/s, TFLOPS and MFU (the FLOPs above, over --peak_tflops)
    recipe      train.py's SST-2 schedule (teacher 4 epochs, Stage 1 15, Stage 2 10; batch 32,
                BERT-base -> 4 x 312, bf16 autocast on CUDA, --group_by_length, --compile when
                given), every stage's epochs times --epoch_scale, one train.py call per stage
                (--stages): its wall minutes, and from its log.jsonl and metrics.json its training
                and dev-evaluation minutes, samples/s and peak memory. Under a scale below 1, each
                stage again, extrapolated to the full schedule: the training time up to its first
                logged step (warm-up, compilation) once, then its mean time per step after that for
                the full schedule's steps, its mean time per dev evaluation for the full schedule's
                evaluations (one at each epoch's end), and the rest of its wall time as measured

Each check that fails says why in its row; the script exits 0 so that the tables always print.
"""
import argparse
import collections
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tools"))
import bench_steps  # noqa: E402
from bench_model import tokens_per_s  # noqa: E402
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import relations  # noqa: E402
import train  # noqa: E402
from model import Bert, BertConfig, to_hf_name  # noqa: E402

PRESET_TINY = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96,
                   max_position_embeddings=64)
TINY_STUDENT = ["--layers", "2", "--hidden", "24", "--heads", "2", "--ffn", "48", "--splits", "4"]
PAPER_STUDENT = ["--layers", "4", "--hidden", "312", "--heads", "12", "--ffn", "1200"]  # TinyBERT's


def parity_and_speed(shape, batch, length, device, peak_tflops, rounds):
    """Rows for our Bert against HF's BertModel: fp32 parity, bf16 fwd+bwd tokens/s, ratio, MFU."""
    torch.manual_seed(0)
    config = BertConfig(**shape, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ours = Bert(config).to(device)
    ids = torch.randint(5, ours.config.vocab_size, (batch, length), device=device)
    mask = torch.ones_like(ids)
    mask[1:, length // 2:] = 0  # padding exercised
    rows = []
    try:
        import transformers
    except ImportError:
        rows.append(("parity with HF BertModel", "skipped", "transformers is not installed"))
        theirs = None
    else:
        c = ours.config
        hf_config = transformers.BertConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                            num_hidden_layers=c.num_hidden_layers,
                                            num_attention_heads=c.num_attention_heads,
                                            intermediate_size=c.intermediate_size,
                                            max_position_embeddings=c.max_position_embeddings,
                                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        theirs = transformers.BertModel(hf_config).to(device)
        state = {to_hf_name(k).removeprefix("bert."): v for k, v in ours.state_dict().items()}
        theirs.load_state_dict(state, strict=True)  # every tensor, by HF's names
        ours.eval(), theirs.eval()
        with torch.no_grad():
            a = ours(ids, None, mask).hidden_states[-1]
            b = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
        worst = float((a - b).abs()[mask.bool()].max())
        rows.append(("parity with HF BertModel, fp32", f"{worst:.2e}",
                     "largest difference, last hidden states"))
    models = {"ours": (ours, lambda: ours(ids, None, mask).hidden_states[-1])}
    if theirs is not None:
        models["HF"] = (theirs, lambda: theirs(input_ids=ids, attention_mask=mask).last_hidden_state)
    speeds = {name: [] for name in models}
    for _ in range(rounds):  # interleaved, as bench_model.py: a busy moment of the machine hurts both alike
        for name, (m, forward) in models.items():
            m.train()
            speeds[name].append(tokens_per_s(forward, batch * length, device, 1))
    mine, hf = (statistics.median(speeds[name]) if speeds.get(name) else None for name in ("ours", "HF"))
    mfu = mine * flops_per_token(ours, length) / (peak_tflops * 1e12)
    precision = "bf16" if device.startswith("cuda") else "fp32"
    rows.append((f"fwd+bwd tokens/s, ours, {precision}", f"{mine:,.0f}",
                 f"batch {batch} x {length}; MFU {100 * mfu:.1f}% of {peak_tflops:g} TFLOPS"))
    if theirs is not None:
        rows.append((f"fwd+bwd tokens/s, HF BertModel, {precision}", f"{hf:,.0f}",
                     f"ours / HF = {mine / hf:.2f}x"))
    return rows


def flops_per_token(bert, length):
    """Forward + backward FLOPs per token: 6 x (non-embedding parameters) + 12 x layers x width x
    length (the attention scores and their weighted sum)."""
    c = bert.config
    embeddings = ("word", "position", "token")
    non_embedding = sum(p.numel() for n, p in bert.named_parameters() if not n.startswith(embeddings))
    return 6 * non_embedding + 12 * c.num_hidden_layers * c.hidden_size * length


def steps_rows(device, tiny):
    """experiments/bench_steps.py at the paper's shapes (BERT-base -> 4 x 312; tiny: MiniLM ->
    3 x 384, short)."""
    args = argparse.Namespace(batch=4 if tiny else 32, length=16 if tiny else 128,
                              rounds=1 if tiny else 5, iters=1 if tiny else 3, device=device)
    med = bench_steps.bench("minilm" if tiny else "bert-base", args)
    return [(f"step: {name}", f"{1000 * t:,.1f} ms", f"{args.batch / t:,.0f} samples/s")
            for name, t in med.items()]


def heads_rows(device, tiny):
    """eval.py --speed's latency of a 4 x 312 student at 12, 6 and 3 heads."""
    torch.manual_seed(0)
    config = BertConfig.preset("tinybert-4l-312d", head="classification", num_labels=2)
    student = Bert(config).to(device)
    batch, length = (4, 16) if tiny else (32, 128)
    rows = evaluation.speed(student, batch, length, heads=(12, 6, 3), iters=3 if tiny else 20,
                            device=device)
    return [(f"4 x 312 student, {r['heads']} heads", f"{r['latency_ms']:,.2f} ms",
             f"batch {batch} x {length}; x{rows[0]['latency_ms'] / r['latency_ms']:.2f} vs 12 heads")
            for r in rows]


def vocabulary(path, texts, size=8000):
    """A WordPiece vocabulary from the training text itself (no download): specials, characters and
    their ## forms, then the most frequent words; enough for a check, not for accuracy."""
    words = collections.Counter(w for t in texts for w in t.lower().split())
    chars = sorted({ch for w in words for ch in w})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{ch}" for ch in chars)]
    tokens += [w for w, _ in words.most_common(size)]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(dict.fromkeys(tokens)) + "\n")


def random_teacher(data_dir, out, tiny):
    """A random BERT-base-shaped teacher (tiny: PRESET_TINY) with a vocabulary from SST-2's training
    text, saved in out/teacher_init for --teacher_init; returns that directory."""
    examples = data.read_glue("sst2", "train", data_dir)
    init = os.path.join(out, "teacher_init")
    os.makedirs(init, exist_ok=True)
    vocabulary(os.path.join(init, "vocab.txt"), [e.text_a for e in examples])
    vocab_size = sum(1 for _ in open(os.path.join(init, "vocab.txt"), encoding="utf-8"))
    torch.manual_seed(0)
    shape = dict(PRESET_TINY) if tiny else {}
    vocab = data.read_text(os.path.join(init, "vocab.txt"))
    Bert(BertConfig(vocab_size=vocab_size, **shape)).save(init, {"vocab.txt": vocab})
    return init


def pipeline_rows(data_dir, device, tiny, out):
    """train.py teacher -> Stage 1 -> Stage 2 -> eval on the real SST-2 files, then eval.py on the
    student."""
    init, run = random_teacher(data_dir, out, tiny), os.path.join(out, "run")
    steps = "6" if tiny else "60"
    argv = ["--task", "sst2", "--data_dir", data_dir, "--teacher_init", init, "--student_init", "random",
            *(TINY_STUDENT if tiny else PAPER_STUDENT), "--max_steps", steps, "--eval_steps", steps,
            "--train_subset", "2000", "--device", device, "--out", run,
            "--log_steps", "2" if tiny else "20", "--allow_partial"]
    t = time.time()
    results = train.main(argv)
    minutes = (time.time() - t) / 60
    scored = evaluation.main(["--task", "sst2", "--model", os.path.join(run, "stage2"),
                              "--device", device, "--allow_partial"])
    same = abs(scored["acc"] - results["student"]["acc"]) < 1e-9
    relations.main(["--task", "sst2", "--model", os.path.join(run, "stage1"), "--device", device,
                    "--allow_partial", "--teacher", os.path.join(run, "teacher"),
                    "a gripping , funny film ."])
    shown = len(json.load(open(os.path.join(run, "stage1", "relations.json")))["rows"])
    memory = max(json.load(open(os.path.join(run, s, "metrics.json")))["train"]["peak_memory_gib"]
                 for s in ("teacher", "stage1", "stage2"))
    return [("pipeline on SST-2: teacher, Stage 1, Stage 2, eval", f"{minutes:.1f} min",
             f"{steps} steps a stage; student dev acc {results['student']['acc']:.2f} "
             f"(random teacher: a smoke test); peak {memory:.2f} GiB"),
            ("eval.py on the saved student", "same" if same else "DIFFERS", f"acc {scored['acc']:.2f}"),
            ("tools/relations.py on Stage 1", f"{shown} rows",
             "the relation page and the sharpness of every relation")]


# ----------------------------------------------------------------------------------------------
# --recipe: the MFU curve, and the paper's SST-2 schedule end to end, timed

MFU_COLUMNS = ("batch x tokens", "tokens/s", "TFLOPS", "MFU")
RECIPE_COLUMNS = ("stage", "epochs", "steps", "wall min", "train min", "dev eval min", "samples/s",
                  "peak GiB")
RECIPE_FORMATS = ("{}", "{:g}", "{:d}", "{:.2f}", "{:.2f}", "{:.2f}", "{:,.0f}", "{:.2f}")


def recipe_tables(args, stamp):
    """--recipe: the MFU curve, then the timed SST-2 schedule, each table printed as soon as it is
    measured, under a title that begins with `stamp` (device, torch, date); returns both tables'
    rows, {"mfu": rows, "recipe": rows}."""
    tiny, cuda = args.tiny, args.device.startswith("cuda")
    shape = dict(vocab_size=1000, **PRESET_TINY) if tiny else {}
    sizes, length = ((2, 4), 16) if tiny else ((16, 32, 64, 128, 256), 128)
    precision = "bf16 autocast" if cuda else "fp32"
    mfu = attempt(lambda: mfu_rows(shape, args.device, args.peak_tflops, sizes, length,
                                   2 if tiny else 10), "mfu", len(MFU_COLUMNS))
    print_table(f"{stamp}: MFU curve, {'tiny' if tiny else 'BERT-base'} forward + backward, "
                f"{precision}, of {args.peak_tflops:g} TFLOPS", MFU_COLUMNS, mfu)
    with tempfile.TemporaryDirectory(prefix="recipe-") as out:  # the run's folders: removed after
        recipe = attempt(lambda: recipe_rows(args, out), "recipe", len(RECIPE_COLUMNS))
    models = "tiny 4 x 48 -> 2 x 24 on at most 256 rows" if tiny else "BERT-base -> 4 x 312"
    peak = "CUDA memory allocated in the stage" if cuda else "the process's resident set so far"
    scaled = (f"; every stage's epochs x {args.epoch_scale:g}; rows 'extrapolated': the full "
              "schedule, estimated from this run (--help says how)") if args.epoch_scale < 1 else ""
    print_table(f"{stamp}: SST-2 recipe, {models}, batch 32, {precision}, --group_by_length"
                f"{', --compile' if args.compile else ''}; the paper's epochs: teacher 4, "
                f"Stage 1 15, Stage 2 10{scaled}; peak GiB: {peak}", RECIPE_COLUMNS, recipe)
    return {"mfu": mfu, "recipe": recipe}


def mfu_rows(shape, device, peak_tflops, batch_sizes, length, rounds):
    """Our Bert's forward + backward (dropout on, as in training) at each batch size x `length`
    tokens: rows (batch x tokens, tokens/s, TFLOPS, MFU over peak_tflops)."""
    torch.manual_seed(0)
    bert = Bert(BertConfig(**shape)).to(device).train()
    flops, rows = flops_per_token(bert, length), []
    for batch in batch_sizes:
        ids = torch.randint(5, bert.config.vocab_size, (batch, length), device=device)
        rate = tokens_per_s(lambda: bert(ids, None, torch.ones_like(ids)).hidden_states[-1],
                            batch * length, device, rounds)
        rows.append((f"{batch} x {length}", f"{rate:,.0f}", f"{rate * flops / 1e12:.1f}",
                     f"{100 * rate * flops / (peak_tflops * 1e12):.1f}%"))
    return rows


def recipe_rows(args, out):
    """train.py's SST-2 schedule (train.RECIPES["sst2"]) at BERT-base -> 4 x 312 (tiny: PRESET_TINY ->
    2 x 24 on at most 256 rows), every stage's epochs times --epoch_scale, one train.py call per
    stage (--stages); returns the table's rows: the stages measured and their total, then, under a
    scale below 1, the same extrapolated to the full schedule."""
    recipe, scale, batch = train.RECIPES["sst2"], args.epoch_scale, 32
    epochs = {"teacher": recipe["teacher_epochs"], "stage1": recipe["epochs1"],
              "stage2": recipe["epochs2"]}
    n = len(data.read_glue("sst2", "train", args.data_dir))
    n = min(n, 256) if args.tiny else n
    run, init = os.path.join(out, "run"), random_teacher(args.data_dir, out, args.tiny)
    argv = ["--task", "sst2", "--data_dir", args.data_dir, "--out", run, "--device", args.device,
            "--teacher_init", init, "--student_init", "random",
            *(TINY_STUDENT if args.tiny else PAPER_STUDENT), "--batch_size", str(batch),
            "--teacher_epochs", f"{scale * epochs['teacher']:g}", "--epochs1",
            f"{scale * epochs['stage1']:g}", "--epochs2", f"{scale * epochs['stage2']:g}",
            "--group_by_length", "--allow_partial", *(["--compile"] if args.compile else []),
            *(["--train_subset", str(n), "--log_steps", "1"] if args.tiny else [])]
    measured, full = [], []
    for stage in train.STAGES:  # teacher, stage1, stage2, eval
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()  # the peak of this stage alone
        t = time.time()
        train.main(argv + ["--stages", stage])
        wall = time.time() - t
        print(f"[recipe] {stage} finished: {wall / 60:.2f} min", flush=True)
        if stage == "eval":  # the teacher's and the student's dev metrics, results.json
            measured.append(("eval", None, None, wall / 60, None, None, None, None))
            full.append(("eval, extrapolated", None, None, wall / 60, None, None, None, None))
        else:
            row, extrapolated = stage_rows(stage, os.path.join(run, stage), wall, epochs[stage],
                                           scale, n, batch)
            measured.append(row)
            full.append(extrapolated)
    tables = {"": measured, ", extrapolated": full} if scale < 1 else {"": measured}
    rows = []
    for suffix, table in tables.items():
        minutes = (sum(r[i] or 0 for r in table) for i in (3, 4, 5))  # wall, train, dev eval
        rows += [*table, (f"total{suffix}", None, None, *minutes, None, None)]
    return [tuple("" if v is None else f.format(v) for v, f in zip(row, RECIPE_FORMATS))
            for row in rows]


def stage_rows(stage, directory, wall, full_epochs, scale, n, batch):
    """A finished stage's row (stage, epochs, steps; minutes of wall, training and dev evaluation;
    samples/s, peak GiB) from its log.jsonl and metrics.json, and the row of the full schedule, as
    the module docstring says."""
    log = [json.loads(line) for line in open(os.path.join(directory, "log.jsonl"))]
    progress = [r for r in log if "train_s" in r]
    evals = [r["eval_s"] for r in log if "eval_s" in r]
    record = json.load(open(os.path.join(directory, "metrics.json")))["train"]
    first, last = progress[0], progress[-1]
    measured = (stage, scale * full_epochs, last["step"], wall / 60, last["train_s"] / 60,
                sum(evals) / 60, record["samples_per_s"], record["peak_memory_gib"])
    if last["step"] > first["step"]:  # seconds per step after the first logged step
        per_step = (last["train_s"] - first["train_s"]) / (last["step"] - first["step"])
    else:
        per_step = first["train_s"] / first["step"]
    per_epoch = math.ceil(n / batch)
    steps = math.ceil(full_epochs * per_epoch)
    train_s = first["train_s"] + per_step * (steps - first["step"])
    eval_s = sum(evals) / len(evals) * math.ceil(steps / per_epoch) if evals else 0.0
    wall_s = wall - last["train_s"] - sum(evals) + train_s + eval_s  # data, models, cache, saving
    return measured, (f"{stage}, extrapolated", full_epochs, steps, wall_s / 60, train_s / 60,
                      eval_s / 60, full_epochs * n / train_s, record["peak_memory_gib"])


# ----------------------------------------------------------------------------------------------
# The tables


def attempt(run, name, width):
    """run() -> rows; when it fails, the traceback and one row of `width` cells naming the failure
    (a failed check is a row of the table, not the end of the script)."""
    try:
        return run()
    except Exception as e:
        traceback.print_exc()
        why = f"{type(e).__name__}: {e}".replace("|", "/").replace("\n", " ")[:200]
        return [(name, "FAILED", why, *[""] * (width - 3))]


def print_table(title, columns, rows):
    """A markdown table under its title."""
    print(f"\n{title}\n")
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="holds glue/SST-2/train.tsv and dev.tsv")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true",
                   help="small shapes and a few steps (runs on a CPU in seconds)")
    p.add_argument("--peak_tflops", type=float, default=989.0,
                   help="the device's dense bf16 peak (H100/H200 SXM: 989)")
    p.add_argument("--recipe", action="store_true",
                   help="the MFU curve and the paper's SST-2 schedule, timed")
    p.add_argument("--epoch_scale", type=float, default=1.0,
                   help="--recipe: every stage's epochs times this (0 < F <= 1)")
    p.add_argument("--compile", action="store_true", help="--recipe: train.py --compile")
    args = p.parse_args(argv)
    sst2 = os.path.join(args.data_dir, "glue", "SST-2")
    missing = [f for f in ("train.tsv", "dev.tsv") if not os.path.isfile(os.path.join(sst2, f))]
    if missing:
        p.error(f"--data_dir {args.data_dir}: glue/SST-2/{' and '.join(missing)} missing; copy the "
                "GLUE SST-2 folder there (nothing is downloaded)")
    if not 0 < args.epoch_scale <= 1:
        p.error(f"--epoch_scale {args.epoch_scale:g}: must be in (0, 1]")
    device, tiny = args.device, args.tiny
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    stamp = f"{name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    if args.recipe:
        return recipe_tables(args, stamp)
    shape = dict(vocab_size=1000, **PRESET_TINY) if tiny else {}
    scratch = tempfile.TemporaryDirectory(prefix="gpu-")  # the pipeline's run: removed after
    checks = {"parity and speed": lambda: parity_and_speed(shape, 4 if tiny else 32, 16 if tiny else 128,
                                                           device, args.peak_tflops, 2 if tiny else 10),
              "steps": lambda: steps_rows(device, tiny), "heads": lambda: heads_rows(device, tiny),
              "pipeline": lambda: pipeline_rows(args.data_dir, device, tiny, scratch.name)}
    rows, t0 = [], time.time()
    with scratch:
        for check, run in checks.items():
            rows += attempt(run, check, 3)
    print_table(f"{stamp}, {(time.time() - t0) / 60:.1f} min in all", ("check", "result", "detail"),
                rows)
    return rows


if __name__ == "__main__":
    main()
