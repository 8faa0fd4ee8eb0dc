"""experiments/gpu_check.py: one prepared check of the CUDA path, for a GPU machine without network.

    python experiments/gpu_check.py --data_dir DIR      # DIR holds glue/SST-2/{train,dev}.tsv (copied beside the repo)
    python experiments/gpu_check.py --tiny --data_dir DIR --device cpu   # small shapes, a few steps (the test suite)

Downloads nothing. It runs, in this order, and prints one markdown table (check, result, what it means):

    parity      our Bert against HF transformers' BertModel (if importable) at BERT-base shape, random weights,
                fp32: the largest difference of the last hidden states
    speed       forward + backward tokens/s of both in bf16 autocast at batch 32 x 128, their ratio, and our
                MFU: 6 x (non-embedding parameters) + 12 x layers x width x length FLOPs per token, over --peak_tflops
    steps       experiments/bench_steps.py at the paper's shapes (BERT-base -> 4 x 312): teacher, student,
                Stage-1 step, Stage-2 step live and cached
    heads       eval.py --speed's latency of a 4 x 312 student at 12, 6 and 3 heads
    pipeline    train.py on the real SST-2 files: a random BERT-base-shaped teacher, teacher -> Stage 1 ->
                Stage 2 -> eval with --max_steps, then eval.py on the student and its relation page (--show)

Each check that fails says why in its row; the script exits 0 so that the table always prints.
"""
import argparse
import collections
import json
import os
import sys
import tempfile
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import bench_steps  # noqa: E402
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import train  # noqa: E402
from model import Bert, BertConfig, to_hf_name  # noqa: E402


def parity_and_speed(shape, batch, length, device, peak_tflops, rounds):
    """Rows for our Bert against HF's BertModel: fp32 parity, bf16 fwd+bwd tokens/s, ratio, MFU."""
    torch.manual_seed(0)
    ours = Bert(BertConfig(**shape, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).to(device)
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
        rows.append(("parity with HF BertModel, fp32", f"{worst:.2e}", "largest difference, last hidden states"))
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda"))

    def tokens_per_s(forward):
        times = []
        for i in range(rounds + 2):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            with autocast:
                out = forward()
            out.float().pow(2).mean().backward()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= 2:  # warm-up
                times.append(time.perf_counter() - t)
        return batch * length / sorted(times)[len(times) // 2]
    ours.train()
    mine = tokens_per_s(lambda: ours(ids, None, mask).hidden_states[-1])
    c = ours.config
    embeddings = ("word", "position", "token")
    non_embedding = sum(p.numel() for n, p in ours.named_parameters() if not n.startswith(embeddings))
    flops = 6 * non_embedding + 12 * c.num_hidden_layers * c.hidden_size * length  # per token, forward + backward
    mfu = mine * flops / (peak_tflops * 1e12)
    precision = "bf16" if device.startswith("cuda") else "fp32"
    rows.append((f"fwd+bwd tokens/s, ours, {precision}", f"{mine:,.0f}",
                 f"batch {batch} x {length}; MFU {100 * mfu:.1f}% of {peak_tflops:g} TFLOPS"))
    if theirs is not None:
        theirs.train()
        hf = tokens_per_s(lambda: theirs(input_ids=ids, attention_mask=mask).last_hidden_state)
        rows.append((f"fwd+bwd tokens/s, HF BertModel, {precision}", f"{hf:,.0f}", f"ours / HF = {mine / hf:.2f}x"))
    return rows


def steps_rows(device, tiny):
    """experiments/bench_steps.py at the paper's shapes (BERT-base -> 4 x 312; tiny: MiniLM -> 3 x 384, short)."""
    args = argparse.Namespace(batch=4 if tiny else 32, length=16 if tiny else 128, rounds=1 if tiny else 5,
                              iters=1 if tiny else 3, device=device)
    med = bench_steps.bench("minilm" if tiny else "bert-base", args)
    return [(f"step: {name}", f"{1000 * t:,.1f} ms", f"{args.batch / t:,.0f} samples/s") for name, t in med.items()]


def heads_rows(device, tiny):
    """eval.py --speed's latency of a 4 x 312 student at 12, 6 and 3 heads."""
    torch.manual_seed(0)
    student = Bert(BertConfig.preset("tinybert-4l-312d", head="classification", num_labels=2)).to(device)
    batch, length = (4, 16) if tiny else (32, 128)
    rows = evaluation.speed(student, batch, length, heads=(12, 6, 3), iters=3 if tiny else 20, device=device)
    return [(f"4 x 312 student, {r['heads']} heads", f"{r['latency_ms']:,.2f} ms",
             f"batch {batch} x {length}; x{rows[0]['latency_ms'] / r['latency_ms']:.2f} vs 12 heads") for r in rows]


def vocabulary(path, texts, size=8000):
    """A WordPiece vocabulary from the training text itself (no download): specials, characters and their
    ## forms, then the most frequent words; enough for a check, not for accuracy."""
    words = collections.Counter(w for t in texts for w in t.lower().split())
    chars = sorted({ch for w in words for ch in w})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{ch}" for ch in chars)]
    tokens += [w for w, _ in words.most_common(size)]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(dict.fromkeys(tokens)) + "\n")


def pipeline_rows(data_dir, device, tiny, out):
    """train.py teacher -> Stage 1 -> Stage 2 -> eval on the real SST-2 files, then eval.py on the student."""
    examples = data.read_glue("sst2", "train", data_dir)
    init = os.path.join(out, "teacher_init")
    os.makedirs(init, exist_ok=True)
    vocabulary(os.path.join(init, "vocab.txt"), [e.text_a for e in examples])
    vocab_size = sum(1 for _ in open(os.path.join(init, "vocab.txt"), encoding="utf-8"))
    torch.manual_seed(0)
    shape = dict(PRESET_TINY) if tiny else {}
    vocab = data.read_text(os.path.join(init, "vocab.txt"))
    Bert(BertConfig(vocab_size=vocab_size, **shape)).save(init, {"vocab.txt": vocab})
    student = ["--layers", "2", "--hidden", "24", "--heads", "2", "--ffn", "48", "--splits", "4"] if tiny else \
        ["--layers", "4", "--hidden", "312", "--heads", "12", "--ffn", "1200"]
    steps = "6" if tiny else "60"
    argv = ["--task", "sst2", "--data_dir", data_dir, "--teacher_init", init, "--student_init", "random", *student,
            "--max_steps", steps, "--eval_steps", steps, "--train_subset", "2000", "--device", device,
            "--out", os.path.join(out, "run"), "--log_steps", "2" if tiny else "20", "--allow_partial"]
    t = time.time()
    results = train.main(argv)
    minutes = (time.time() - t) / 60
    scored = evaluation.main(["--task", "sst2", "--model", os.path.join(out, "run", "stage2"), "--device", device,
                              "--allow_partial"])
    same = abs(scored["acc"] - results["student"]["acc"]) < 1e-9
    run = os.path.join(out, "run")
    evaluation.main(["--task", "sst2", "--model", os.path.join(run, "stage1"), "--device", device, "--allow_partial",
                     "--teacher", os.path.join(run, "teacher"), "--show", "a gripping , funny film ."])
    shown = len(json.load(open(os.path.join(run, "stage1", "relations.json")))["rows"])
    memory = max(json.load(open(os.path.join(out, "run", s, "metrics.json")))["train"]["peak_memory_gib"]
                 for s in ("teacher", "stage1", "stage2"))
    return [("pipeline on SST-2: teacher, Stage 1, Stage 2, eval", f"{minutes:.1f} min",
             f"{steps} steps a stage; student dev acc {results['student']['acc']:.2f} (random teacher: a smoke test); "
             f"peak {memory:.2f} GiB"),
            ("eval.py on the saved student", "same" if same else "DIFFERS", f"acc {scored['acc']:.2f}"),
            ("eval.py --show on Stage 1", f"{shown} rows", "the relation page and the sharpness of every relation")]


PRESET_TINY = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96,
                   max_position_embeddings=64)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="holds glue/SST-2/train.tsv and dev.tsv")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="small shapes and a few steps (runs on a CPU in seconds)")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="the device's dense bf16 peak (H100/H200 SXM: 989)")
    args = p.parse_args(argv)
    sst2 = os.path.join(args.data_dir, "glue", "SST-2")
    missing = [f for f in ("train.tsv", "dev.tsv") if not os.path.isfile(os.path.join(sst2, f))]
    if missing:
        p.error(f"--data_dir {args.data_dir}: glue/SST-2/{' and '.join(missing)} missing; copy the GLUE SST-2 "
                "folder there (nothing is downloaded)")
    device = args.device
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    shape = dict(vocab_size=1000, **PRESET_TINY) if args.tiny else {}
    checks = {"parity and speed": lambda: parity_and_speed(shape, 4 if args.tiny else 32, 16 if args.tiny else 128,
                                                           device, args.peak_tflops, 2 if args.tiny else 10),
              "steps": lambda: steps_rows(device, args.tiny), "heads": lambda: heads_rows(device, args.tiny),
              "pipeline": lambda: pipeline_rows(args.data_dir, device, args.tiny, tempfile.mkdtemp(prefix="gpu-"))}
    rows, t0 = [], time.time()
    for check, run in checks.items():
        try:
            rows += run()
        except Exception as e:  # a failed check is a row of the table, not the end of the check
            traceback.print_exc()
            rows.append((check, "FAILED", f"{type(e).__name__}: {e}".replace("|", "/").replace("\n", " ")[:200]))
    took = (time.time() - t0) / 60
    print(f"\n{name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, {took:.1f} min in all\n")
    print("| check | result | detail |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return rows


if __name__ == "__main__":
    main()
