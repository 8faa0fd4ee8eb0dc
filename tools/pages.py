"""tools/pages.py: the loss curves of a run, drawn from the logs train.py writes.

    python tools/pages.py out/sst2          # <stage>/curves.svg of each stage, and out/sst2/index.html
    python tools/pages.py out/general/general   # one stage directory (general_distill.py's): curves.svg

Each stage directory's log.jsonl holds a record per logged step (its losses) and per evaluation
(its dev metrics, or held-out losses for general distillation). curves.svg draws each of those
series against the step in a panel of its own; index.html shows every stage's curves, one below
the other. Plain SVG and HTML: any browser opens them, nothing to install.
"""
import html
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import data  # noqa: E402

CURVES = """<svg xmlns="http://www.w3.org/2000/svg" width="560" height="{height}"
 font-family="sans-serif" font-size="12"><title>{title}</title>
<text x="8" y="18" font-size="14" font-weight="bold">{title}</text>
{panels}</svg>
"""
PANEL = """<g class="panel" data-name="{name}" transform="translate(0 {top})">
<text x="64" y="-6" font-weight="bold">{name}</text>
<rect x="64" y="0" width="480" height="100" fill="none" stroke="#999"/>
<text x="60" y="10" text-anchor="end">{hi:.4g}</text>
<text x="60" y="100" text-anchor="end">{lo:.4g}</text>
<text x="64" y="118">step 0</text><text x="544" y="118" text-anchor="end">step {last}</text>
<polyline fill="none" stroke="#1f5fa8" stroke-width="1.5" points="{points}"/>{dots}</g>
"""
ORDER = {"teacher": 0, "stage1": 1, "stage2": 2}  # a run's stages in the pipeline's order


def main(argv=None):
    """Draw the curves of each directory given: a stage's, or a run's (its stages and index.html)."""
    directories, written = sys.argv[1:] if argv is None else argv, []
    if directories[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return written
    if not directories or directories[0].startswith("-"):
        sys.exit(__doc__)
    for directory in directories:
        if os.path.exists(os.path.join(directory, "log.jsonl")):
            written.append(write_curves(directory))
            continue
        names = os.listdir(directory) if os.path.isdir(directory) else []
        stages = [os.path.join(directory, n) for n in sorted(names, key=lambda n: (ORDER.get(n, 3), n))
                  if os.path.exists(os.path.join(directory, n, "log.jsonl"))]
        if not stages:
            sys.exit(f"error: {directory}: no log.jsonl in it nor in a folder of it; give a run's "
                     "--out or a stage directory")
        written += [write_curves(d) for d in stages] + [write_index(directory, stages)]
    print("wrote " + ", ".join(written))
    return written


def write_curves(directory):
    """<directory>/curves.svg from its log.jsonl: a PANEL against step for each loss (the batch's at
    each logged step) and each dev metric (held-out loss for general distillation)."""
    series, skip = {}, {"lr", "samples_per_s", "train_s", "eval_s", "peak_memory_gib"}
    log = os.path.join(directory, "log.jsonl")
    for n, line in enumerate(data.read_text(log).splitlines(), 1):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line cut short: a run killed, or still writing it
            print(f"{log}, line {n}: not a whole JSON record, skipped", file=sys.stderr)
            continue
        if not (isinstance(r, dict) and type(r.get("step")) is int and isinstance(r.get("dev", {}), dict)):
            if not (isinstance(r, dict) and r.get("done")):  # the stage's last record has no step
                print(f"{log}, line {n}: not a step's record, skipped", file=sys.stderr)
            continue
        where = "held-out" if r.get("stage") == "general" else "dev"
        values = {f"{where} {k}": v for k, v in r["dev"].items()} if "dev" in r else r
        for name, v in values.items():
            if isinstance(v, float) and name not in skip:  # counts (step, total) are ints
                series.setdefault(name, []).append((r["step"], v))
    for name, pts in list(series.items()):
        finite = [(s, v) for s, v in pts if math.isfinite(v)]
        if len(finite) < len(pts):  # a NaN dev metric, e.g. the correlation of constant predictions
            print(f"{log}: {name}: {len(pts) - len(finite)} non-finite values not drawn", file=sys.stderr)
        series[name] = finite
    series = {name: pts for name, pts in series.items() if pts}
    last = max([s for pts in series.values() for s, _ in pts] + [1])
    panels = ""
    for i, (name, pts) in enumerate(series.items()):
        lo, hi = min(v for _, v in pts), max(v for _, v in pts)
        if lo == hi:  # one value: +-10% around it, never across 0
            lo, hi = sorted((0.9 * lo, 1.1 * lo)) if lo else (0.0, 1.0)
        xy = [(64 + 480 * s / last, 100 * (hi - v) / (hi - lo)) for s, v in pts]  # in the panel
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
        dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="#1f5fa8"/>' for x, y in xy)
        panels += PANEL.format(name=name, top=56 + 150 * i, hi=hi, lo=lo, last=last, points=points,
                               dots=dots if len(xy) <= 40 else "")  # dots only where few
    title = html.escape(f"{os.path.basename(directory)}: {directory}")
    svg = CURVES.format(height=150 * len(series) + 30, title=title, panels=panels)
    path = os.path.join(directory, "curves.svg")
    data.atomic_write_text(path, svg)
    return path


def write_index(out, directories):
    """<out>/index.html: the loss curves of each stage of a run, one below the other."""
    name = html.escape(out)
    page = f'<!doctype html>\n<meta charset="utf-8">\n<title>{name}</title>\n<h1>{name}</h1>\n'
    for d in directories:
        page += (f'<h2>{os.path.basename(d)}</h2>\n'
                 f'<img src="{os.path.relpath(d, out)}/curves.svg" alt="loss curves of {d}">\n')
    path = os.path.join(out, "index.html")
    data.atomic_write_text(path, page)
    return path


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # a log that is no text, a folder that cannot be written
        sys.exit(f"error: {data.error_line(e, 'a folder')}")
