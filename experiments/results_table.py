"""experiments/results_table.py: a README table of dev results, from train.py's results.json files.

    python experiments/results_table.py "LABEL=out/gen-preview/general" ["LABEL=OUT" ...]

Each OUT is a train.py --out directory with a results.json (its eval stage ran). One row per run: the
student's dev value of the task's selection metric for the Stage-2 checkpoint best on dev (selection on
dev) and for the last one (from stage2/log.jsonl), the number of dev rows, the teacher's value, the
student's parameters and its Stage-1 and Stage-2 training time from their metrics.json.
"""
import json
import os
import sys


def row(label, out):
    r = json.load(open(os.path.join(out, "results.json")))
    metric = r["metric"]
    minutes = []
    for stage in ("stage1", "stage2"):
        path = os.path.join(out, stage, "metrics.json")
        minutes.append(f"{json.load(open(path))['train']['train_s'] / 60:.1f}" if os.path.exists(path) else "-")
    total = r["student"].get("total", "")
    dev = [json.loads(x)["dev"] for x in open(os.path.join(out, "stage2", "log.jsonl")) if '"dev"' in x]
    return (f"| {label} | {r['student'][metric]:.2f} | {dev[-1][metric]:.2f} | {total} | {r['teacher'][metric]:.2f} "
            f"| {r['student_parameters'] / 1e6:.1f}M | {' / '.join(minutes)} |"), r["task"], metric


if __name__ == "__main__":
    if len(sys.argv) < 2 or any("=" not in a for a in sys.argv[1:]):
        sys.exit(__doc__)
    rows = [row(*a.split("=", 1)) for a in sys.argv[1:]]
    task, metric = rows[0][1:]
    print(f"| run | {task} dev {metric}, best | last | rows | teacher | student parameters | Stage 1 / Stage 2 min |")
    print("|---|---|---|---|---|---|---|")
    for line, *_ in rows:
        print(line)
