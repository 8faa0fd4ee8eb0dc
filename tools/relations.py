"""tools/relations.py: the relations MLKD distils, of a teacher and a student on one sentence.

    python tools/relations.py --task sst2 --model out/sst2/stage1 --teacher out/sst2/teacher \
        "a gripping , funny film ."                      # <model>/relations.html, relations.json

The page (relations.html, or --out FILE) holds, teacher beside student, L_EMB's token-token
relation of the word-piece embeddings, L_MHA's relation of each MHA-split of every mapped layer pair
m -> g(m) with the KL of each query row, and, for a labelled GLUE task, L_SS's sample-sample
relation of 32 dev rows.
On those 32 dev rows it then prints how sharp every relation is (its normalised entropy H/log n:
1 = uniform, 0 = one-hot, and the KL the loss averages) and keeps that beside the page, named after
it (relations.json), with the model, teacher and task it is of. The layer map, the splits and
L_MHA's temperature are the model's own (its args.json), and so must its task and teacher be.
Every number drawn comes from mlkd.py's relation_logprobs and relation_kl_rows.
"""
import argparse
import html
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import data  # noqa: E402
import eval as evaluation  # noqa: E402
import mlkd  # noqa: E402
import train  # noqa: E402  (crc32: the teacher a student's args.json names)
from model import Bert, fetch  # noqa: E402


def main(argv=None):
    """Draw the page of one sentence, then the sharpness of every relation on the first 32 dev rows
    (printed, and kept in relations.json) under the model's training settings."""
    args = parse_args(argv)
    args.model = fetch(args.model)
    trained, saved = evaluation.trained_settings(args.model), os.path.join(args.model, "args.json")
    task_len = 384 if args.task.startswith("squad") else data.TASKS[args.task].max_len
    for name, default in (("data_dir", os.environ.get("MLKD_DATA", "data")), ("max_len", task_len)):
        if getattr(args, name) is None:  # not given: the model's (its args.json), else the default
            setattr(args, name, trained.get(name) or default)
            print(f"{name} {getattr(args, name)} "
                  f"({'from ' + saved if trained.get(name) else 'default'})")
    if trained.get("task", args.task) not in (args.task, "general"):  # general_distill.py's: any
        raise ValueError(f"--task {args.task}: {args.model} learnt {trained['task']} ({saved})")
    model = Bert.from_pretrained(args.model).to(args.device)
    teacher = Bert.from_pretrained(fetch(args.teacher), verbose=False).to(args.device)
    crc = train.crc32(teacher.state_dict())  # what train.py recorded of the teacher it distilled
    if trained.get("teacher_crc32", crc) != crc:
        raise ValueError(f"--teacher {args.teacher}: not the teacher {args.model} learnt from "
                         f"(teacher CRC-32 {crc}, {saved}: {trained['teacher_crc32']})")
    tok = data.Tokenizer(os.path.join(args.model, "vocab.txt"))
    kind, splits = trained.get("layer_map", "uniform"), trained.get("splits", 12)
    temperature = trained.get("mha_temperature", 1.0) if args.mha_temperature is None \
        else args.mha_temperature
    dev = None
    if args.task in data.TASKS:
        split = data.TASKS[args.task].dev_splits[0]
        examples = data.read_glue(args.task, split, args.data_dir, args.allow_partial)
        dev = data.encode_glue(args.task, examples, tok, args.max_len)
    labelled = dev is not None and bool(data.TASKS[args.task].labels)  # G sorted by label
    out = args.out or os.path.join(args.model, "relations.html")
    page = relation_page(model, teacher, tok, args.sentence, dev if labelled else None, splits,
                         args.device, kind, temperature)
    data.atomic_write_text(out, page)
    print(f"wrote {out}")
    path = os.path.splitext(out)[0] + ".json"  # the page's numbers, named after it
    if dev is None:
        if os.path.exists(path):  # an earlier page's, by this name: not this page's
            os.remove(path)
        return out
    batch = next(data.batches({k: v[:32] for k, v in dev.items()}, 32))
    batch = {k: v.to(args.device) for k, v in batch.items()}
    lmap = mlkd.layer_map(teacher.config.num_hidden_layers, model.config.num_hidden_layers, kind)
    rows = relation_sharpness(model, teacher, batch, lmap, splits, temperature)
    print(f"relation sharpness on the first {len(batch['index'])} dev rows (L_MHA temperature "
          f"{temperature:g}; H/log n: 1 = uniform, 0 = one-hot)")
    print("\n".join(sharpness_table(rows)))
    shown = {"model": args.model, "teacher": args.teacher, "task": args.task}
    data.atomic_write_text(path, json.dumps({**shown, "temperature": temperature, "rows": rows},
                                            indent=1))
    print(f"wrote {path}")
    return out


def parse_args(argv=None):
    """The flags, each checked before a model is read; an error prints one usage line."""
    p = argparse.ArgumentParser(
        prog="relations.py", usage="%(prog)s --task T --model DIR --teacher DIR [flags] SENTENCE",
        description="Draw the relations MLKD distils, teacher beside student, into a page.")
    p.add_argument("sentence", help="the sentence whose relations the page draws")
    p.add_argument("--task", required=True, choices=[  # AX, a test set alone, has no dev rows
        *(task for task in data.TASKS if task != "ax"), "squad1", "squad2"])
    p.add_argument("--model", required=True, help="the student: a directory train.py wrote")
    p.add_argument("--teacher", required=True, help="the teacher it learnt from")
    p.add_argument("--out", help="the page (default: <model>/relations.html)")
    p.add_argument("--data_dir", help="holds glue/ (default: the model's, $MLKD_DATA, data)")
    p.add_argument("--max_len", type=int, help="encoding length of the dev rows (default: the "
                   "model's, in its args.json; else the task's)")
    p.add_argument("--mha_temperature", type=float, help="L_MHA's temperature, of the page and "
                   "the sharpness table (default: the model's args.json, else 1, the paper's)")
    p.add_argument("--device", type=evaluation.device,
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--allow_partial", action="store_true", help="a dev file with fewer or more "
                   "rows than the official one (refused otherwise)")
    args = p.parse_args(argv)
    if not args.sentence.strip():
        p.error("give a sentence to draw (it is empty)")
    if args.mha_temperature is not None and not 0 < args.mha_temperature < float("inf"):
        p.error(f"--mha_temperature {args.mha_temperature}: must be a positive number")
    evaluation.check_model_flags(p, args)
    parent = os.path.dirname(os.path.abspath(args.out or "."))  # the existing folder it goes in
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if args.out and (os.path.isdir(args.out) or not os.path.isdir(parent)
                     or args.out.endswith(".json")):  # <page>.json: the numbers beside it
        p.error(f"--out {args.out}: name the page's .html file, in a folder")
    numbers = os.path.splitext(args.out or "")[0] + ".json"  # rewritten or removed by main
    if args.out and os.path.isfile(numbers) and not numbers_of_a_page(numbers):
        p.error(f"--out {args.out}: {numbers} is there and holds no page's numbers; name the page "
                "otherwise")
    if not args.out and os.path.isdir(args.model) and not os.access(args.model, os.W_OK):
        p.error(f"--model {args.model}: not writable, and relations.py writes its page there; "
                "copy it to a directory you can write to or give --out FILE")
    return args


def numbers_of_a_page(path):
    """Whether the JSON file at path is an earlier page's numbers (main writes their "rows")."""
    try:
        return "rows" in data.read_json(path)
    except ValueError:
        return False


def relation_page(student, teacher, tok, sentence, dev=None, splits=12, device="cpu",
                  kind="uniform", temperature=1.0):
    """HTML: the relations of relation_pairs on one sentence, teacher beside student (L_MHA: at its
    temperature, with the KL of each query row) and, with dev (encoded, labelled), the L_SS relation
    of 32 dev rows.
    Every number drawn comes from mlkd.relation_logprobs or relation_kl_rows."""
    room = min(64, student.config.max_position_embeddings)
    ids, types, lengths = tok.encode([sentence], max_length=room)
    if len(tok.tokenize([sentence])[0].ids) + 2 > room:
        print(f"the sentence is longer than {room} positions; the page draws its first "
              f"{room - 2} word pieces")
    batch = next(data.batches({"input_ids": ids, "token_type_ids": types, "lengths": lengths}, 1))
    pieces = [tok.wp.id_to_token(i) for i in batch["input_ids"][0].tolist()]
    lmap = mlkd.layer_map(teacher.config.num_hidden_layers, student.config.num_hidden_layers, kind)
    batch = {k: v.to(device) for k, v in batch.items()}
    parts = []
    for loss, m, g_m, x_s, x_t, _, _ in relation_pairs(student, teacher, batch, lmap, splits)[:-1]:
        t = 1.0 if loss == "L_EMB" else temperature
        r_t, r_s = (mlkd.relation_logprobs(x, None, t).exp()[0].cpu().numpy() for x in (x_t, x_s))
        vmax = max(r_t.max(), r_s.max())
        if loss == "L_EMB":
            parts.append("<h2>L_EMB: token-token relation of the word-piece embeddings</h2>")
            parts += [heatmap_svg(r[0], f"{who}: softmax(E E^T / sqrt(d)), dark blue {vmax:.3g}",
                                  vmax, pieces, pieces)
                      for who, r in (("teacher", r_t), ("student", r_s))]
            continue
        parts.append(f"<h2>L_MHA: student layer {m} against teacher layer {g_m}, {splits} "
                     f"MHA-splits, temperature {t:g} (dark blue: {vmax:.3g})</h2>")
        for who, r in (("teacher", r_t), ("student", r_s)):
            maps = "".join(heatmap_svg(r[a], f"split {a + 1}", vmax, cell=6) for a in range(splits))
            parts.append(f"<div><b>{who}</b><br>{maps}</div>")
        kl = mlkd.relation_kl_rows(x_s, x_t, None, t)[0].cpu().numpy()  # (A, L)
        title = f"KL(teacher || student) of each query row, dark blue {kl.max():.3g}"
        split_names = [f"split {a + 1}" for a in range(splits)]
        parts.append(heatmap_svg(kl, title, kl.max(), split_names, pieces))
    if dev is not None:
        parts.append("<h2>L_SS: sample-sample relation G of the final [CLS] states, 32 dev rows "
                     "sorted by label</h2>")
        parts += ss_maps(student, teacher, dev, device)
    return (f'<!doctype html>\n<meta charset="utf-8">\n<title>MLKD relations</title>\n'
            f"<style>svg {{vertical-align: top}}</style>\n<h1>{html.escape(sentence)}</h1>\n"
            "<p>Colour: white = 0 to dark blue = the largest value of the pair "
            "(in the title).</p>\n"
            + "\n".join(parts) + "\n")


def relation_pairs(student, teacher, batch, lmap, splits=12, temperature=1.0):
    """What MLKD's relation losses compare on a batch: (loss, m, g(m), x_s, x_t, mask, temperature)
    for the embeddings (L_EMB), the MHA-splits of each mapped layer pair m -> g(m) (L_MHA, at the
    temperature of --mha_temperature) and the final [CLS] states as one sequence (L_SS)."""
    mask = batch["attention_mask"]  # (B, L)
    with torch.no_grad():
        s, t = (m.eval()(batch["input_ids"], batch["token_type_ids"], mask)
                for m in (student, teacher))
    pairs = [("L_EMB", 0, 0, s.token_embeddings[:, None], t.token_embeddings[:, None], mask, 1.0)]
    for m in range(1, len(lmap)):
        o_s, o_t = (mlkd.mha_splits(o.attn_outputs[k - 1], splits)
                    for o, k in ((s, m), (t, lmap[m])))
        pairs.append(("L_MHA", m, lmap[m], o_s, o_t, mask, temperature))
    c_s, c_t = s.hidden_states[-1][:, 0][None, None], t.hidden_states[-1][:, 0][None, None]
    return pairs + [("L_SS", len(lmap) - 1, len(t.attn_outputs), c_s, c_t, None, 1.0)]


def heatmap_svg(m, title, vmax, rows=None, cols=None, cell=14):
    """A matrix (numpy 2-d) as an SVG grid: a <rect class="cell"> per entry, white (0) to dark blue
    (vmax), its value in data-v; tick labels when given."""
    left = 8 + 7 * max(map(len, rows)) if rows else 8
    top = 22 + (7 * max(map(len, cols)) if cols else 0)
    w, h = max(left + m.shape[1] * cell + 12, 8 + 6.5 * len(title)), top + m.shape[0] * cell + 8
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           'font-family="sans-serif" font-size="11">'
           f'<text x="4" y="14">{html.escape(title)}</text>']
    t = np.clip(m / vmax, 0.0, 1.0) if vmax > 0 else np.zeros(m.shape)  # linear in each channel
    fill = {ij: "#" + "".join(f"{round(255 + float(x) * (c - 255)):02x}" for c in (8, 48, 107))
            for ij, x in np.ndenumerate(t)}  # white (0) to dark blue (vmax): lighter is smaller
    out += [f'<rect class="cell" x="{left + j * cell}" y="{top + i * cell}" width="{cell}" '
            f'height="{cell}" fill="{fill[i, j]}" data-v="{v:.9g}"/>'
            for (i, j), v in np.ndenumerate(m)]
    out += [f'<text x="{left - 3}" y="{top + i * cell + cell - 3}" text-anchor="end">'
            f'{html.escape(s)}</text>' for i, s in enumerate(rows or [])]
    out += [f'<text transform="translate({left + j * cell + cell - 3} {top - 3}) rotate(-90)">'
            f'{html.escape(s)}</text>' for j, s in enumerate(cols or [])]
    return "\n".join(out + ["</svg>"])


def ss_maps(student, teacher, dev, device="cpu", n=32):
    """The L_SS relation G = softmax(C C^T / sqrt(d)) of the final [CLS] states of the first n dev
    rows sorted by label, teacher and student: two heatmap SVGs on one colour scale."""
    order = torch.argsort(dev["labels"][:n], stable=True)
    rows = {k: dev[k][:n][order] for k in ("input_ids", "token_type_ids", "lengths", "labels")}
    batch = {k: v.to(device) for k, v in next(data.batches(rows, n)).items()}
    loss, _, _, x_s, x_t, _, _ = relation_pairs(student, teacher, batch, [0])[-1]  # L_SS
    r_t, r_s = (mlkd.relation_logprobs(x).exp()[0, 0].cpu().numpy() for x in (x_t, x_s))  # (n, n)
    vmax, labels = max(r_t.max(), r_s.max()), [str(v) for v in rows["labels"].tolist()]
    return [heatmap_svg(r, f"{who}: softmax(C C^T / sqrt(d)), dark blue {vmax:.3g}", vmax, labels,
                        labels) for who, r in (("teacher", r_t), ("student", r_s))]


def relation_sharpness(student, teacher, batch, lmap, splits=12, temperature=1.0):
    """How sharp the relations of relation_pairs are (a uniform target teaches little): per loss,
    layer pair and split, the mean over real query rows i of the teacher's and the student's
    H(R[i]) / log n (1: uniform over the n real keys, 0: one-hot) and of KL(R_T[i] || R_S[i])."""
    rows, pairs = [], relation_pairs(student, teacher, batch, lmap, splits, temperature)
    for loss, m, g_m, x_s, x_t, mask, temp in pairs:
        real = (x_s.new_ones(x_s.shape[0], x_s.shape[2]) if mask is None else mask)[:, None].float()
        log_n = real.sum(-1, keepdim=True).log()  # (B, 1, 1): log of the row's real keys
        logp_t, logp_s = (mlkd.relation_logprobs(x, mask, temp) for x in (x_t, x_s))
        per_row = [-(logp_t.exp() * logp_t).sum(-1) / log_n,
                   -(logp_s.exp() * logp_s).sum(-1) / log_n,
                   mlkd.relation_kl_rows(x_s, x_t, mask, temp)]  # each (B, A, L)
        h_t, h_s, kl = (((v * real).sum((0, 2)) / real.sum((0, 2))).tolist() for v in per_row)
        rows += [dict(loss=loss, student=m, teacher=g_m, split=a + 1 if loss == "L_MHA" else None,
                      h_teacher=h_t[a], h_student=h_s[a], kl=kl[a]) for a in range(len(kl))]
    return rows


def sharpness_table(rows):
    """relation_sharpness's rows as text: a line per layer pair (L_MHA: the mean of its splits)."""
    head = ("loss", "layers S->T", "H_T/log n", "H_S/log n", "KL(T||S)")
    lines = [f"{head[0]:6s} {head[1]:>11s} {head[2]:>9s} {head[3]:>9s} {head[4]:>9s}"]
    for key in dict.fromkeys((r["loss"], r["student"], r["teacher"]) for r in rows):
        group = [r for r in rows if (r["loss"], r["student"], r["teacher"]) == key]
        h_t, h_s, kl = (sum(r[k] for r in group) / len(group)
                        for k in ("h_teacher", "h_student", "kl"))
        lines.append(f"{key[0]:6s} {f'{key[1]}->{key[2]}':>11s} {h_t:9.3f} {h_s:9.3f} {kl:9.4f}")
        if len(group) > 1:
            by_split = " ".join(f"{r['h_teacher']:.3f}" for r in group)
            lines.append(f"{'':18s} teacher by split: {by_split}")
    return lines


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError, data.DownloadError, OSError) as e:
        raise SystemExit(f"error: {data.error_line(e, 'a model directory')}")
