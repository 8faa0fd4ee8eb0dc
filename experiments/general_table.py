"""experiments/general_table.py: the README's general-distillation table, from the runs' metrics.json.

    python experiments/general_table.py "LABEL=out/general-4x192/general" ["LABEL=DIR:init" ...]

Each DIR is a finished `tools/general_distill.py` stage directory (OUT/general). For each it prints the held-out Stage-1
losses (mean over the held-out corpus windows, student in eval mode) at step 0, i.e. the student as
initialised, and after every epoch, with the training time and throughput from its log; DIR:init prints
the step-0 row alone (a reference initialisation scored by a --max_steps 1 run).
"""
import json
import os
import sys


def rows(label, directory, init_only=False):
    if not os.path.exists(os.path.join(directory, "metrics.json")):
        sys.exit(f"{directory}: no metrics.json: not a finished tools/general_distill.py stage directory (OUT/general)")
    m, ran = (json.load(open(os.path.join(directory, f))) for f in ("metrics.json", "args.json"))
    if ran.get("recipe") == "tinybert":  # its held-out losses are att and hid
        sys.exit(f"{directory} ran --recipe tinybert: this table shows MLKD's L_EMB, L_MHA and L_FFN")
    init = ran["student_init"]
    init = init if init in ("random", "tinybert") else "copied layers"  # teacher-layers, or a model DIR's
    c = json.load(open(os.path.join(directory, "config.json")))
    shape = (
        f"{c['num_hidden_layers']} x {c['hidden_size']}, {c['num_attention_heads']} heads, FFN {c['intermediate_size']}"
    )
    train = m["train"]
    for point in m["heldout"][:1] if init_only else m["heldout"]:
        epoch = f"init ({init})" if point["step"] == 0 else f"step {point['step']}"
        yield (f"| {label} ({shape}) | {epoch} | {point['emb']:.4f} | {point['mha']:.4f} | {point['ffn']:.4f} "
               f"| {point['loss']:.4f} |")
    if init_only:
        return
    yield (f"| {label}: {m['corpus']['windows']:,} windows ({m['corpus']['heldout_windows']} held out), "
           f"{m['corpus']['word_pieces']:,} word pieces | {train['step']} steps in {train['train_s'] / 60:.1f} min, "
           f"{train['samples_per_s']:.1f} samples/s | | | | |")


if __name__ == "__main__":
    if len(sys.argv) < 2 or any("=" not in a for a in sys.argv[1:]):
        sys.exit(__doc__)
    print("| student | when | L_EMB | L_MHA | L_FFN | sum |")
    print("|---|---|---|---|---|---|")
    for arg in sys.argv[1:]:
        label, directory = arg.split("=", 1)
        init_only = directory.endswith(":init")
        for line in rows(label, directory.removesuffix(":init"), init_only):
            print(line)
