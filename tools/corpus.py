"""tools/corpus.py: the unlabeled text of general distillation (tools/general_distill.py), written
from the data this repo can have offline, in the format of Google's pre-training data (BERT's
create_pretraining_data.py): one sentence or paragraph a line, documents apart by blank lines.

    python tools/corpus.py --data_dir DATA --out corpus.txt [--vocab DIR/vocab.txt]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import data  # noqa: E402


def build_corpus(data_dir, out, vocab=None):
    """Write the corpus this repo can have offline, downloading nothing: the paragraphs of the SQuAD
    train-*.json present (an article a document) and the sentences of the GLUE train.tsv present (a
    file a document), deduplicated, without any line of a dev or test file present. Returns
    {documents, lines, words, dropped_as_dev, word_pieces (with a vocab)}."""
    texts = []  # (held out?, the lines of a document): SQuAD articles, then GLUE files
    squad_dir = os.path.join(data_dir, "squad")
    for name in sorted(os.listdir(squad_dir)) if os.path.isdir(squad_dir) else []:
        if name.startswith(("train", "dev")) and name.endswith(".json"):
            path = os.path.join(squad_dir, name)
            try:  # every paragraph, with questions or without
                articles = [[p["context"] for p in a["paragraphs"]] for a in json.loads(data.read_text(path))["data"]]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path} is not a SQuAD JSON file ({e!r}); {data.REFETCH}") from None
            texts += [(name.startswith("dev"), paragraphs) for paragraphs in articles]
    for task, t in data.TASKS.items():
        for split in ("test",) if task == "ax" else ("train", *t.dev_splits, *t.test_splits):
            file = "diagnostic" if task == "ax" else split
            if os.path.exists(os.path.join(data_dir, "glue", t.folder, f"{file}.tsv")):
                examples = data.read_glue(task, split, data_dir, allow_partial=True)
                texts.append((split != "train", [s for e in examples for s in (e.text_a, e.text_b) if s]))
    held = {" ".join(line.split()) for dev, lines in texts if dev for line in lines}
    documents, seen, dropped = [], set(), 0
    for lines in (lines for dev, lines in texts if not dev):
        lines = [" ".join(x.split()) for x in lines]  # one line each, whitespace collapsed
        fresh = [line for line in dict.fromkeys(lines) if line and line not in seen]
        seen.update(fresh)
        dropped += sum(line in held for line in fresh)
        documents += [[line for line in fresh if line not in held]]
    documents = [doc for doc in documents if doc]
    if not documents:
        raise ValueError(f"{data_dir}: no squad/train-*.json and no glue/*/train.tsv")
    data.atomic_write_text(out, "\n\n".join("\n".join(doc) for doc in documents) + "\n")
    lines = [line for doc in documents for line in doc]
    stats = {"documents": len(documents), "lines": len(lines),
             "words": sum(len(x.split()) for x in lines), "dropped_as_dev": dropped}
    if vocab:
        stats["word_pieces"] = sum(len(e.ids) for e in data.Tokenizer(vocab).tokenize(lines))
    said = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in stats.items())
    print(f"[corpus] wrote {out}: {said}", file=sys.stderr)
    return stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True, help="holds glue/*/train.tsv, squad/train-*.json")
    p.add_argument("--out", required=True, help="the corpus file to write")
    p.add_argument("--vocab", help="vocab.txt of the teacher, to count word pieces")
    a = p.parse_args(argv)
    if a.vocab and not os.path.isfile(a.vocab):  # checked before the corpus is built
        p.error(f"--vocab {a.vocab}: no such file (the teacher's vocab.txt)")
    parent = os.path.dirname(os.path.abspath(a.out))  # the existing folder it will be made in
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not a.out or os.path.isdir(a.out) or not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
        p.error(f"--out {a.out!r}: not a file path in a folder you can write to")
    try:
        return build_corpus(a.data_dir, a.out, a.vocab)
    except (ValueError, FileNotFoundError, OSError) as e:
        sys.exit(f"error: {data.error_line(e, 'an --out')}")


if __name__ == "__main__":
    main()
