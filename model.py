"""model.py: BERT written from scratch in plain PyTorch, its config, and its weights on disk.

It follows the original BERT (Devlin et al., 2019) as HF transformers computes it, to fp32 parity
(test_mlkd.py proves it against golden outputs of HF `BertModel`); Google's modeling.py differs in
its gelu alone (the tanh approximation, up to 5e-4 from the exact one):

    embeddings  H_0 = LayerNorm(word[ids] + position[0..L-1] + token_type[segments]),  eps 1e-12
    layer l     O = MultiHeadAttention(H_l-1): the heads' contexts, concatenated     (L_MHA's O)
                H' = LayerNorm(H_l-1 + Dense(O))                                      (post-LN)
                H_l = LayerNorm(H' + Dense(gelu_erf(Dense(H'))))
    pooler      tanh(Dense(H_N[:, 0]))

One forward returns a `BertOutput` with all the MLKD losses read (no second pass): every hidden
state, every layer's attention context before its output projection, the LayerNorm'd word-piece
embeddings; scores=True adds the pre-softmax attention scores (TinyBERT's loss), not by SDPA.

Weights: `Bert.from_pretrained` reads a local directory (config.json, model.safetensors or
pytorch_model.bin) or fetches a hub repository (https://huggingface.co/{name}/resolve/main/{file}),
safetensors by the short reader at the end of this file, HF's parameter names or ours; a missing,
unexpected or wrongly shaped tensor is an error. `Bert.save` writes HF's names: a saved model opens
in HF transformers. tools/convert_tf_checkpoint.py converts Google's TensorFlow release into one.
"""
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import data

# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class BertConfig:
    """Shape and regularisation of a BERT. Defaults are bert-base-uncased."""
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    head: str = "none"  # "none", "classification", "regression" (num_labels 1) or "span" (SQuAD)
    num_labels: int = 0
    label_names: list = field(default_factory=list)  # stored so a teacher and student agree (MNLI!)
    label_text: list = field(default_factory=list)  # what HF's id2label shows: "negative", not "0"

    def __post_init__(self):
        """Refuse a shape, dropout rate or head that cannot build a BERT; set num_labels of the
        heads that fix it (none 0, regression 1, span 2)."""
        sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "max_position_embeddings", "type_vocab_size")
        for name, value in vars(self).items():  # the *_prob fields: the two dropout rates
            number = type(value) in (int, float)  # not a bool, not a string
            if name in sizes and not (type(value) is int and value >= 1):
                raise ValueError(f"BertConfig.{name} must be a positive integer, got {value!r}")
            if name.endswith("_prob") and not (number and 0 <= value < 1):
                raise ValueError(f"BertConfig.{name} must be in [0, 1), got {value!r}")
            if name in ("layer_norm_eps", "initializer_range") and not (number and 0 < value < 1):
                raise ValueError(f"BertConfig.{name} must be in (0, 1), got {value!r}")
        if not (type(self.pad_token_id) is int and 0 <= self.pad_token_id < self.vocab_size):
            raise ValueError(f"BertConfig.pad_token_id must be a token id below vocab_size "
                             f"{self.vocab_size}, got {self.pad_token_id!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BertConfig: hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.head not in ("none", "classification", "regression", "span"):
            raise ValueError("BertConfig.head must be none, classification, regression or span, "
                             f"got {self.head!r}")
        self.num_labels = {"none": 0, "regression": 1, "span": 2}.get(self.head, self.num_labels)
        labels_ok = isinstance(self.num_labels, int) and self.num_labels >= 2
        if self.head == "classification" and not labels_ok:
            raise ValueError("BertConfig: a classification head needs num_labels >= 2, "
                             f"got {self.num_labels!r}")

    @classmethod
    def from_json(cls, path, **overrides):
        """The config an HF or Google config.json holds, with overrides; keys we do not use are
        ignored (an HF model's head and labels: from its class and id2label). A file that is no JSON
        object, or a value that cannot build a BERT, is an error naming the file."""
        try:  # json's errors, and BertConfig's, are ValueErrors: each is said with the file's name
            raw = json.loads(data.read_text(path))
            if not isinstance(raw, dict):
                raise ValueError(f"not a BERT config (a JSON {type(raw).__name__}, not an object)")
            names = raw.get("id2label") or {}  # HF's; left out when {0: LABEL_0, 1: LABEL_1}
            n = raw.setdefault("num_labels", len(names) or 2)
            if "label_text" not in raw and n > 1 and any(v != f"LABEL_{k}" for k, v in names.items()):
                raw["label_text"] = [str(names[k]).lower() for k in sorted(names, key=int)]
            if "head" not in raw and raw.get("architectures"):  # HF's: the head of its class
                raw["head"] = {"BertForQuestionAnswering": "span", "BertForSequenceClassification":
                               "regression" if raw.get("problem_type") == "regression" or n == 1
                               else "classification"}.get(raw["architectures"][0], "none")
            for key, ours in (("hidden_act", "gelu"), ("position_embedding_type", "absolute"),
                              ("is_decoder", False)):  # HF's decoder masks attention causally
                if raw.get(key, ours) != ours:  # gelu: the exact (erf) one, as F.gelu computes it
                    raise ValueError(f"{key} {raw[key]!r} is not supported, only {ours!r}")
            return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw} | overrides)
        except (OSError, ValueError, AttributeError, TypeError) as e:  # e.g. id2label a list
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def preset(cls, name, **overrides):
        """The config of a named shape (PRESETS), with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown BERT preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# Named shapes for BertConfig.preset (test_mlkd.py adds its tiny ones).
PRESETS = {"bert-base-uncased": {}, "tinybert-6l-768d": dict(num_hidden_layers=6),
           "tinybert-4l-312d": dict(num_hidden_layers=4, hidden_size=312, intermediate_size=1200),
           "minilm-l6-h384": dict(num_hidden_layers=6, hidden_size=384, intermediate_size=1536)}

# ----------------------------------------------------------------------------------------------
# The network


@dataclass
class BertOutput:
    hidden_states: list  # num_layers + 1 (B, L, d): H_0 (after dropout), H_1..H_N
    attn_outputs: list   # num_layers (B, L, d): layer l's O (the input of attn_out) at index l - 1
    token_embeddings: torch.Tensor  # (B, L, d): LayerNorm_emb(word_embeddings[ids]), L_EMB's E
    pooled: torch.Tensor  # (B, d): tanh(Dense(H_N[:, 0]))
    logits: torch.Tensor = None  # (B, C) classification, (B, 1) regression, (B, 2, L) span, or None
    attn_scores: list = None  # scores=True: num_layers tensors (B, h, L, L), QK^T/sqrt(d/h), unmasked


class Bert(nn.Module):
    def __init__(self, config: BertConfig):
        """Embeddings, num_hidden_layers post-LN encoder layers, the pooler and the task head, drawn
        as HF transformers draws them: N(0, initializer_range) weights (Google's modeling.py cuts
        the normal at 2 std), zero biases, LayerNorm (1, 0)."""
        super().__init__()
        c = self.config = config
        d, f, eps = c.hidden_size, c.intermediate_size, c.layer_norm_eps
        self.word = nn.Embedding(c.vocab_size, d, padding_idx=c.pad_token_id)
        self.position = nn.Embedding(c.max_position_embeddings, d)
        self.token_type = nn.Embedding(c.type_vocab_size, d)
        self.emb_ln = nn.LayerNorm(d, eps=eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(  # HF's names of these: HF_NAMES below
            q=nn.Linear(d, d), k=nn.Linear(d, d), v=nn.Linear(d, d), attn_out=nn.Linear(d, d),
            attn_ln=nn.LayerNorm(d, eps=eps), ffn_in=nn.Linear(d, f), ffn_out=nn.Linear(f, d),
            ffn_ln=nn.LayerNorm(d, eps=eps))) for _ in range(c.num_hidden_layers))
        self.pooler = nn.Linear(d, d)
        if c.head in ("classification", "regression"):
            self.classifier = nn.Linear(d, c.num_labels)  # on dropout(pooled)
        elif c.head == "span":
            self.qa_outputs = nn.Linear(d, 2)              # on every token: start, end
        for m in self.modules():  # a new LayerNorm is (1, 0) already
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=c.initializer_range)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.word.weight[c.pad_token_id])  # HF's too; padding_idx: it never trains

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, scores=False):
        """input_ids, token_type_ids, attention_mask: (B, L) integer tensors; mask 1 = real token.
        Returns a BertOutput; scores=True fills its attn_scores (TinyBERT's loss; slower)."""
        c = self.config
        B, L = input_ids.shape
        h = c.num_attention_heads
        if L > c.max_position_embeddings:
            raise ValueError(f"sequence length {L} exceeds max_position_embeddings "
                             f"{c.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        words = self.word(input_ids)                                                 # (B, L, d)
        x = self.emb_ln(words + self.position.weight[:L] + self.token_type(token_type_ids))
        x = self.dropout(x)
        # token_embeddings, L_EMB's E: the word pieces alone (no positions, no segments), no dropout
        out = BertOutput(hidden_states=[x], attn_outputs=[], token_embeddings=self.emb_ln(words),
                         pooled=None, attn_scores=[] if scores else None)
        p = c.attention_probs_dropout_prob if self.training else 0.0
        for layer in self.layers:
            q, k, v = (layer[n](x).view(B, L, h, -1).transpose(1, 2) for n in "qkv")  # (B,h,L,d/h)
            # additive, on keys only, in the dtype attention runs in (autocast's, where it is on)
            key_mask = None if attention_mask is None else (
                (1.0 - attention_mask[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min)
            if scores:  # written out as SDPA computes it, to keep the pre-softmax scores
                s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])                 # (B, h, L, L)
                ctx = F.dropout(torch.softmax(s if key_mask is None else s + key_mask, -1), p) @ v
                out.attn_scores.append(s)
            else:
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p)
            ctx = ctx.transpose(1, 2).reshape(B, L, -1)                              # (B, L, d)
            a = layer.attn_ln(x + self.dropout(layer.attn_out(ctx)))
            x = layer.ffn_ln(a + self.dropout(layer.ffn_out(F.gelu(layer.ffn_in(a)))))  # erf gelu
            out.hidden_states.append(x)
            out.attn_outputs.append(ctx)
        out.pooled = torch.tanh(self.pooler(x[:, 0]))  # (B, d)
        if c.head in ("classification", "regression"):
            out.logits = self.classifier(self.dropout(out.pooled))  # (B, C); BERT's: the MLKD and
            # TinyBERT code apply ReLU to `pooled` in place of this dropout (not copied)
        elif c.head == "span":  # pads: -1e4, never an answer; finite, so KD's 0 * log p is 0
            out.logits = self.qa_outputs(x).transpose(1, 2)  # (B, 2, L): start and end logits
            if attention_mask is not None:  # (the authors' KD leaves the pads' logits as they are)
                out.logits = out.logits.masked_fill(attention_mask[:, None, :] == 0, -1e4)
        return out

    def num_parameters(self):
        """How many numbers the model holds, its head included."""
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(cls, name_or_dir, cache_dir=None, verbose=True, **config_overrides):
        """A Bert of the config.json of a directory or hub name (see fetch) and config_overrides
        (e.g. head="classification", num_labels=2), its weights loaded strictly: each must fit; only
        a pooler the checkpoint lacks, or a head the overrides ask for, is new (and said)."""
        directory = fetch(name_or_dir, cache_dir)
        model = cls(BertConfig.from_json(os.path.join(directory, "config.json"), **config_overrides))
        path = os.path.join(directory, "model.safetensors")
        state = read_safetensors(path) if os.path.exists(path) else read_bin(
            os.path.join(directory, "pytorch_model.bin"))
        ours = model.state_dict()
        our_name = {to_hf_name(k).removeprefix("bert."): k for k in ours}  # HF's name, no bert. -> ours
        # HF's names (LayerNorm's gamma, beta in old files) or ours; not what fine-tuning does not
        # use: pre-training heads (cls.*), TinyBERT's fit_dense, HF's position_ids buffer
        plain = {k.removeprefix("bert.").replace(".gamma", ".weight").replace(".beta", ".bias"): t
                 for k, t in state.items() if not re.search(r"^cls\.|fit_dense|position_ids$", k)}
        renamed = {our_name.get(k, k): t for k, t in plain.items()}
        new = [k for k in ours if k not in renamed]  # a head, or a pooler (HF's QA models lack one)
        head = ("classifier.", "qa_outputs.")
        shapes = [f"{k} {tuple(t.shape)} vs {tuple(ours[k].shape)}" for k, t in renamed.items()
                  if k in ours and t.shape != ours[k].shape]
        new_ok = (*head, "pooler.") if "head" in config_overrides else "pooler."  # a task's head
        bad = {"missing": [k for k in new if not k.startswith(new_ok)],
               "unexpected": [k for k in renamed if k not in ours],
               "of another shape (file vs model)": shapes}
        if any(bad.values()):  # one line: the first three of each kind
            said = "; ".join(f"{len(keys)} {kind}: {', '.join(keys[:3])}{', ...' * (len(keys) > 3)}"
                             for kind, keys in bad.items() if keys)
            if not bad["missing"] and all(k.startswith(head) for k in sum(bad.values(), [])):
                said += " (a task head: start from the pre-trained model, which has none)"
            raise ValueError(f"{directory}: the checkpoint does not fit the model: {said}")
        model.load_state_dict({**ours, **renamed}, strict=True)
        if verbose and new:
            print(f"[model] newly initialised (not in {directory}): {', '.join(new)}", file=sys.stderr)
        return model

    def save(self, directory, extra_files=None):
        """Write model.safetensors and config.json (atomically) in HF transformers' layout: the
        model opens there as it is, as BertModel, BertForSequenceClassification (labels,
        regression) or BertForQuestionAnswering. Plus any {name: text} files."""
        c = self.config
        state = {to_hf_name(k): v for k, v in self.state_dict().items()}
        write_safetensors(state, os.path.join(directory, "model.safetensors"))
        labels = c.label_text or c.label_names or [f"LABEL_{i}" for i in range(c.num_labels)]
        problem = {"classification": "single_label_classification", "regression": "regression"}
        hf = dict(model_type="bert", architectures=[HF_ARCHITECTURES[c.head]], hidden_act="gelu",
                  position_embedding_type="absolute", id2label=dict(enumerate(labels)),
                  label2id={n: i for i, n in enumerate(labels)}, problem_type=problem.get(c.head))
        files = {"config.json": json.dumps({**hf, **asdict(c)}, indent=2), **(extra_files or {})}
        for name, text in files.items():
            data.atomic_write_text(os.path.join(directory, name), text)


# ----------------------------------------------------------------------------------------------
# Weights on disk: HF's names, the hub, safetensors and .bin files

# Our module names -> HF transformers' (modeling_bert.py), under bert.; the heads' names are HF's.
HF_NAMES = {"layers": "encoder.layer", "word": "embeddings.word_embeddings",
            "position": "embeddings.position_embeddings", "emb_ln": "embeddings.LayerNorm",
            "token_type": "embeddings.token_type_embeddings", "pooler": "pooler.dense",
            "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
            "attn_out": "attention.output.dense", "attn_ln": "attention.output.LayerNorm",
            "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ffn_ln": "output.LayerNorm"}
HF_ARCHITECTURES = {"none": "BertModel", "classification": "BertForSequenceClassification",
                    "regression": "BertForSequenceClassification", "span": "BertForQuestionAnswering"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def to_hf_name(key):
    """Our parameter name -> HF's: layers.3.q.weight -> bert.encoder.layer.3.attention.self.query
    .weight, word.weight -> bert.embeddings.word_embeddings.weight; the heads' names as they are."""
    parts = key.split(".")
    return "bert." + ".".join(HF_NAMES.get(p, p) for p in parts) if parts[0] in HF_NAMES else key


def fetch(name_or_dir, cache_dir=None):
    """The directory of a model: a local directory (config.json and weights) as it is, or a hub
    repository's config.json, vocab.txt and weights downloaded into the cache ($MLKD_CACHE, else
    ~/.cache/mlkd). A name that looks local (./, ../, /, ~, not one slash, or a first part that
    exists here) but is no model directory is an error; so is Google's TensorFlow release (a .zip,
    or a directory of *.index checkpoints), with the command that converts it."""
    path = os.path.expanduser(name_or_dir)
    files = os.listdir(path) if os.path.isdir(path) else []
    if "config.json" in files and {*WEIGHT_FILES} & {*files}:
        return path
    if path.endswith(".zip") or any(f.endswith(".index") for f in files):  # Google's release
        out = os.path.basename(path.rstrip("/")).removesuffix(".zip") + "-hf"
        raise ValueError(f"{name_or_dir}: a TensorFlow checkpoint (Google's release); convert it "
                         f"once: python tools/convert_tf_checkpoint.py {name_or_dir} {out}")
    if os.path.isdir(path):
        raise ValueError(f"{name_or_dir}: not a model directory: it needs config.json and "
                         "model.safetensors or pytorch_model.bin")
    if path.count("/") != 1 or path.startswith((".", "/")) or os.path.exists(path.split("/")[0]):
        raise FileNotFoundError(f"model {name_or_dir}: no such directory (nor a hub name like "
                                "google-bert/bert-base-uncased)")
    cache = cache_dir or os.environ.get("MLKD_CACHE", os.path.expanduser("~/.cache/mlkd"))
    directory = os.path.join(cache, "models", name_or_dir.replace("/", "--"))
    base = f"{data.HUB_URL}/{name_or_dir}/resolve/main"
    for file in ("config.json", "vocab.txt"):
        data.download(f"{base}/{file}", os.path.join(directory, file))
    weights = [os.path.join(directory, f) for f in WEIGHT_FILES]
    if not any(os.path.exists(w) for w in weights):
        try:
            data.download(f"{base}/model.safetensors", weights[0])
        except data.DownloadError as e:
            if e.status != 404:
                raise
            data.download(f"{base}/pytorch_model.bin", weights[1])  # TinyBERT's repos: only .bin
    return directory


# safetensors (https://github.com/huggingface/safetensors, "Format"): u64 little-endian header
# length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}} (offsets from the
# end of the header), then the tensors' raw little-endian bytes.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} of a safetensors file, the tensors sharing one buffer. A file that is not
    one, or is cut short, is an error naming the file and what is wrong."""
    with open(path, "rb") as f:
        buf = bytearray(f.read())
    start = 8 + int.from_bytes(buf[:8], "little")  # where the tensors' bytes begin
    try:  # an empty, cut or foreign file fails here: its header is no JSON
        header = json.loads(buf[8:start])
    except ValueError as e:  # json's errors, a UnicodeDecodeError too
        raise ValueError(f"{path}: not a safetensors file, or its header is cut short or corrupt "
                         f"({len(buf)} bytes; {e})") from None
    if isinstance(header, dict):
        header.pop("__metadata__", None)  # {"format": "pt"}, or null: nothing we read
    if not isinstance(header, dict) or not all(isinstance(i, dict) for i in header.values()):
        raise ValueError(f"{path}: corrupt safetensors header: not a JSON object of tensor entries")
    state = {}
    for name, info in header.items():
        dtype = SAFETENSORS_DTYPES.get(str(info.get("dtype")))  # str: a list is no dtype either
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}, not one of "
                             f"{', '.join(SAFETENSORS_DTYPES)}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
                and all(type(x) is int and x >= 0 for x in shape + offsets)):
            raise ValueError(f"{path}: corrupt safetensors entry {name!r}: shape {shape!r}, "
                             f"data_offsets {offsets!r} (want lists of whole numbers >= 0)")
        (begin, end), count = offsets, math.prod(shape)
        if not begin <= end == begin + count * dtype.itemsize <= len(buf) - start:
            raise ValueError(f"{path}: corrupt safetensors entry {name!r}: bytes {begin}..{end} of "
                             f"{len(buf) - start} (a file cut short, or a wrong header)")
        flat = torch.frombuffer(buf, dtype=dtype, count=count, offset=start + begin) if count else (
            torch.empty(0, dtype=dtype))
        state[name] = flat.view(shape)
    return state


def write_safetensors(tensors, path):
    """Write {name: tensor} as a safetensors file (atomically), its header padded to 8 bytes. Its
    metadata says format "pt" (HF transformers before 4.48 fails on a file without metadata)."""
    header, body = {"__metadata__": {"format": "pt"}}, bytearray()
    code = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    for name, t in tensors.items():
        begin = len(body)
        body += t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = dict(dtype=code[t.dtype], shape=list(t.shape), data_offsets=[begin, len(body)])
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)  # pad so the tensors' bytes begin 8-byte aligned
    data.atomic_write_bytes(path, [len(h).to_bytes(8, "little"), h, body])


def read_bin(path):
    """{name: tensor} of a PyTorch weights file, read with weights_only=True (never unpickles
    code); a file torch cannot read is an error naming the file, in one line."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file, nor a model.safetensors next to it")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's messages run to paragraphs: the first sentence
        reason = str(e).strip().split("\n")[0].split(". ")[0]
        raise ValueError(f"{path}: torch.load cannot read it ({type(e).__name__}: {reason}); is it "
                         "cut short, or not a PyTorch checkpoint?") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a dict of named tensors")
    return state
