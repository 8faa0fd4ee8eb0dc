"""experiments/figures.py: the README's picture, L_SS's relation G of a teacher and a student side by side.

    python experiments/figures.py --task sst2 --teacher out/sst2-offline/teacher \
        --student out/sst2-offline/stage2 --data_dir $DATA --out experiments/sst2-ss-relation.svg

G = softmax(C C^T / sqrt(d)) of the final [CLS] states of the first 32 dev rows, sorted by label, drawn by
tools/relations.py's ss_maps from mlkd.relation_logprobs (the same maps as its page); one SVG file.
"""
import argparse
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import relations  # noqa: E402
from model import Bert  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag in ("--task", "--teacher", "--student", "--data_dir", "--out"):
        p.add_argument(flag, required=True)
    a = p.parse_args()
    teacher, student = (Bert.from_pretrained(d, verbose=False) for d in (a.teacher, a.student))
    max_len = evaluation.trained_settings(a.student).get("max_len", data.TASKS[a.task].max_len)
    tok = data.Tokenizer(os.path.join(a.student, "vocab.txt"))
    dev = data.encode_glue(a.task, data.read_glue(a.task, data.TASKS[a.task].dev_splits[0], a.data_dir), tok, max_len)
    maps = relations.ss_maps(student, teacher, dev)
    sizes = [[float(x) for x in re.search(r'width="([\d.]+)" height="([\d.]+)"', m).groups()] for m in maps]
    width, height = sizes[0][0] + sizes[1][0] + 20, max(h for _, h in sizes)
    nested = [m.replace("<svg ", f'<svg x="{0 if i == 0 else sizes[0][0] + 20}" ', 1) for i, m in enumerate(maps)]
    data.atomic_write_text(a.out, f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">\n'
                           + "\n".join(nested) + "\n</svg>\n")
    print(f"wrote {a.out}")
