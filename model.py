"""model.py: BERT, written from scratch in plain PyTorch, that loads Google's BERT weights.

Chapter 1 of mlkd. It follows the original BERT (Devlin et al., 2019) as Google and HF transformers
compute it, to fp32 parity (test_mlkd.py proves it against golden outputs of HF `BertModel`):

    embeddings  E = LayerNorm(word[ids] + position[0..L-1] + token_type[segments]),  eps 1e-12
    layer l     A = LayerNorm(x + Dense(MultiHeadAttention(x)))                       (post-LN)
                H = LayerNorm(A + Dense(gelu_erf(Dense(A))))
    pooler      tanh(Dense(H_last[:, 0]))

One forward returns a `BertOutput` that carries everything the MLKD losses need:
every hidden state, every layer's attention context before its output projection, and the
LayerNorm'd word-piece embeddings; collecting them costs no second pass. Asked with scores=True
it also returns every layer's pre-softmax attention scores (TinyBERT's loss), written out, not SDPA.

Weights: `Bert.from_pretrained` reads a local directory or fetches a hub repository
(https://huggingface.co/{name}/resolve/main/{file}) through data.download. It reads
safetensors with the ~30-line reader below (no `safetensors` package) and `.bin` files with
torch.load(weights_only=True), maps the checkpoint's names onto ours, and refuses to guess:
a missing, unexpected or wrongly shaped tensor is an error listing every offending key.

Sections: the configuration, the network (a reader of the method may stop after `Bert.forward`), then
loading: checkpoint names, safetensors, Google's TensorFlow checkpoints.
"""
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field, fields

import numpy as np
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

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"BertConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BertConfig: hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"BertConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        heads = {"none": 0, "regression": 1, "span": 2}
        if self.head not in (*heads, "classification"):
            raise ValueError(f"BertConfig.head must be one of none/classification/regression/span, got {self.head!r}")
        if self.head in heads:
            self.num_labels = heads[self.head]
        elif self.num_labels < 2:
            raise ValueError(f"BertConfig: a classification head needs num_labels >= 2, got {self.num_labels}")

    @classmethod
    def from_json(cls, path, **overrides):
        """Read an HF or Google `config.json`; keys we do not use are ignored, bad values rejected."""
        try:
            raw = json.loads(data.read_text(path))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read BERT config {path}: {e}") from None
        act = raw.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"{path}: hidden_act {act!r} is not supported (this BERT uses the exact erf gelu)")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only absolute position embeddings are supported")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown BERT preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_json(self):
        """Our fields, and what HF transformers reads to open the model as its own BertModel,
        BertForSequenceClassification (labels, regression) or BertForQuestionAnswering."""
        arch = {"none": "BertModel", "span": "BertForQuestionAnswering"}.get(self.head, "BertForSequenceClassification")
        hf = dict(model_type="bert", architectures=[arch], hidden_act="gelu", position_embedding_type="absolute")
        if self.head in ("classification", "regression"):
            names = self.label_names or [f"LABEL_{i}" for i in range(self.num_labels)]
            hf.update(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
                      problem_type="regression" if self.head == "regression" else "single_label_classification")
        return json.dumps({**hf, **asdict(self)}, indent=2)


PRESETS = {
    "bert-base-uncased": {},
    "tinybert-4l-312d": dict(num_hidden_layers=4, hidden_size=312, intermediate_size=1200),
    "tinybert-6l-768d": dict(num_hidden_layers=6),
    "minilm-l6-h384": dict(num_hidden_layers=6, hidden_size=384, intermediate_size=1536),
    # tiny shapes for tests: a 4-layer 48-wide "teacher" and a 2-layer 24-wide "student"
    "tiny-teacher": dict(vocab_size=128, hidden_size=48, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=96, max_position_embeddings=64),
    "tiny-student": dict(vocab_size=128, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=64),
}

# ----------------------------------------------------------------------------------------------
# The network


@dataclass
class BertOutput:
    hidden_states: list     # num_layers + 1 tensors (B, L, d): embedding output, then each layer's output
    attn_outputs: list      # num_layers tensors (B, L, d): concatenated head contexts, before the output Dense
    token_embeddings: torch.Tensor  # (B, L, d): LayerNorm_emb(word_embeddings[ids]), L_EMB's E
    pooled: torch.Tensor    # (B, d): tanh(Dense(h_last[:, 0]))
    logits: torch.Tensor = None  # (B, C) classification, (B, 1) regression, (B, 2, L) span; None without head
    attn_scores: list = None  # with scores=True: num_layers tensors (B, h, L, L), Q K^T / sqrt(d/h), unmasked


class Layer(nn.Module):
    """One post-LN Transformer encoder layer. Our names, with HF's in comments (see HF_LAYER_NAMES)."""

    def __init__(self, c: BertConfig):
        super().__init__()
        d = c.hidden_size
        self.heads = c.num_attention_heads
        self.attn_dropout = c.attention_probs_dropout_prob
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)  # attention.self.*
        self.attn_out = nn.Linear(d, d)                                  # attention.output.dense
        self.attn_ln = nn.LayerNorm(d, eps=c.layer_norm_eps)             # attention.output.LayerNorm
        self.ffn_in = nn.Linear(d, c.intermediate_size)                  # intermediate.dense
        self.ffn_out = nn.Linear(c.intermediate_size, d)                 # output.dense
        self.ffn_ln = nn.LayerNorm(d, eps=c.layer_norm_eps)              # output.LayerNorm
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, x, key_mask, scores=False):
        """x (B, L, d); key_mask (B, 1, 1, L) additive (0 keep, very negative drop) or None.
        Returns (output, head contexts, the raw attention scores when `scores` else None)."""
        B, L, d = x.shape
        h = self.heads

        def split(t):  # (B, L, d) -> (B, h, L, d/h)
            return t.view(B, L, h, d // h).transpose(1, 2)

        p = self.attn_dropout if self.training else 0.0
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))          # (B, h, L, d/h)
        s = None
        if scores:  # written out, as SDPA computes it, to keep the pre-softmax scores (TinyBERT's loss)
            s = q @ k.transpose(-1, -2) / math.sqrt(d // h)                      # (B, h, L, L)
            ctx = F.dropout(torch.softmax(s if key_mask is None else s + key_mask, -1), p) @ v
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p)  # (B, h, L, d/h)
        ctx = ctx.transpose(1, 2).reshape(B, L, d)                              # (B, L, d)
        a = self.attn_ln(x + self.dropout(self.attn_out(ctx)))                  # (B, L, d)
        out = self.ffn_ln(a + self.dropout(self.ffn_out(F.gelu(self.ffn_in(a)))))  # exact erf gelu
        return out, ctx, s


class Bert(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        c = self.config = config
        self.word = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.emb_ln = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.pooler = nn.Linear(c.hidden_size, c.hidden_size)
        if c.head in ("classification", "regression"):
            self.classifier = nn.Linear(c.hidden_size, c.num_labels)  # on dropout(pooled)
        elif c.head == "span":
            self.qa_outputs = nn.Linear(c.hidden_size, 2)              # on every token: start, end
        self.apply(self._init)

    def _init(self, m):
        """BERT's init (Google's modeling.py, initializer_range 0.02): N(0, 0.02) weights, zero bias,
        LayerNorm (1, 0)."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.initializer_range)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight), nn.init.zeros_(m.bias)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, scores=False) -> BertOutput:
        """input_ids, token_type_ids, attention_mask: (B, L) integer tensors; mask 1 = real token.
        scores=True also returns each layer's attention scores (for TinyBERT's loss; slower)."""
        B, L = input_ids.shape
        if L > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {L} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        words = self.word(input_ids)                                             # (B, L, d)
        x = words + self.position.weight[:L] + self.token_type(token_type_ids)  # (B, L, d)
        x = self.dropout(self.emb_ln(x))
        token_embeddings = self.emb_ln(words)  # L_EMB's E: word pieces only (no positions), no dropout
        key_mask = None
        if attention_mask is not None:  # additive, on keys only, in the dtype attention runs in
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            key_mask = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min  # (B,1,1,L)
        hidden_states, attn_outputs, attn_scores = [x], [], []
        for layer in self.layers:
            x, ctx, s = layer(x, key_mask, scores)
            hidden_states.append(x)
            attn_outputs.append(ctx)
            attn_scores.append(s)
        pooled = torch.tanh(self.pooler(x[:, 0]))  # (B, d)
        logits = None
        if self.config.head in ("classification", "regression"):
            logits = self.classifier(self.dropout(pooled))  # (B, C)
        elif self.config.head == "span":
            logits = self.qa_outputs(x).transpose(1, 2)  # (B, 2, L): start and end logits
            if attention_mask is not None:  # a pad position is never an answer; finite, so 0 * it = 0 in KD
                logits = logits.masked_fill(attention_mask[:, None, :] == 0, -1e4)
        return BertOutput(
            hidden_states, attn_outputs, token_embeddings, pooled, logits, attn_scores if scores else None
        )

    def num_parameters(self, with_head=True):
        return sum(p.numel() for n, p in self.named_parameters()
                   if with_head or not n.startswith(("classifier", "qa_outputs")))

    # ------------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def from_pretrained(cls, name_or_dir, cache_dir=None, verbose=True, **config_overrides):
        """Build a Bert from a directory or hub name and load its weights strictly.

        config_overrides (e.g. head="classification", num_labels=2, hidden_dropout_prob=0.0) change
        the checkpoint's config; a head the checkpoint lacks is created fresh and reported as such.
        """
        directory = fetch(name_or_dir, cache_dir)
        config_file = next((os.path.join(directory, f) for f in ("config.json", "bert_config.json")
                            if os.path.exists(os.path.join(directory, f))), os.path.join(directory, "config.json"))
        config = BertConfig.from_json(config_file, **config_overrides)
        model = cls(config)
        state = read_checkpoint(directory)
        new = model.load_checkpoint_state(state, source=directory)
        if verbose and new:
            print(f"[model] newly initialised (not in {directory}): {', '.join(new)}", file=sys.stderr)
        return model

    def load_checkpoint_state(self, state, source="checkpoint"):
        """Load a checkpoint's tensors (HF, Google-HF or our names) strictly; returns new head keys."""
        ours = self.state_dict()
        renamed, ignored = {}, []
        for key, tensor in state.items():
            if any(re.search(p, key) for p in IGNORED_KEYS):
                ignored.append(key)
                continue
            name = to_our_name(key)
            if name in renamed:
                raise ValueError(f"{source}: two checkpoint keys map to {name!r} (old and new LayerNorm names?)")
            renamed[name] = tensor
        head = [k for k in ours if k.startswith(("classifier.", "qa_outputs."))]
        missing = [k for k in ours if k not in renamed and k not in head]
        unexpected = [k for k in renamed if k not in ours]
        wrong = [f"{k}: checkpoint {tuple(renamed[k].shape)} vs model {tuple(ours[k].shape)}"
                 for k in renamed if k in ours and renamed[k].shape != ours[k].shape]
        if missing or unexpected or wrong:
            lines = [f"{source}: the checkpoint does not fit the model"]
            lines += [f"  missing:     {k}" for k in missing]
            lines += [f"  unexpected:  {k}" for k in unexpected]
            lines += [f"  wrong shape: {k}" for k in wrong]
            raise ValueError("\n".join(lines))
        new_head = [k for k in head if k not in renamed]
        self.load_state_dict({**ours, **renamed}, strict=True)
        return new_head

    def save(self, directory, extra_files=None):
        """Write config.json and model.safetensors (atomically) in HF transformers' layout, so that the model
        opens there as it is (see BertConfig.to_json); plus any {name: text} files."""
        os.makedirs(directory, exist_ok=True)
        state = {to_hf_name(k): v for k, v in self.state_dict().items()}
        write_safetensors(state, os.path.join(directory, "model.safetensors"))
        files = {"config.json": self.config.to_json(), **(extra_files or {})}
        for name, text in files.items():
            data.atomic_write_text(os.path.join(directory, name), text)


# ----------------------------------------------------------------------------------------------
# Checkpoint names: HF/Google-HF -> ours. Anything not matched here is kept as is (our own files).

HF_LAYER_NAMES = {
    "attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
    "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_ln",
    "intermediate.dense": "ffn_in", "output.dense": "ffn_out", "output.LayerNorm": "ffn_ln",
}
HF_OTHER_NAMES = {
    "embeddings.word_embeddings": "word", "embeddings.position_embeddings": "position",
    "embeddings.token_type_embeddings": "token_type", "embeddings.LayerNorm": "emb_ln",
    "pooler.dense": "pooler",
}
# What a fine-tuning model does not use: pre-training heads, TinyBERT's fit_dense, HF buffers,
# TF optimizer slots and step counter.
IGNORED_KEYS = [r"^cls\.", r"(^|\.)fit_dense", r"position_ids$", r"adam_[mv]$", r"^global_step$"]


def to_our_name(key):
    key = key.removeprefix("bert.")
    key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)  # Google's TF checkpoints: gamma, beta
    key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
    module, _, param = key.rpartition(".")
    m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", module)
    if m and m.group(2) in HF_LAYER_NAMES:
        return f"layers.{m.group(1)}.{HF_LAYER_NAMES[m.group(2)]}.{param}"
    if module in HF_OTHER_NAMES:
        return f"{HF_OTHER_NAMES[module]}.{param}"
    return key


HF_FROM_OURS = {ours: hf for hf, ours in (*HF_LAYER_NAMES.items(), *HF_OTHER_NAMES.items())}


def to_hf_name(key):
    """Our name -> HF's (the inverse of to_our_name): the encoder under bert., the task heads as they are."""
    module, _, param = key.rpartition(".")
    m = re.fullmatch(r"layers\.(\d+)\.(\w+)", module)
    if m:
        return f"bert.encoder.layer.{m.group(1)}.{HF_FROM_OURS[m.group(2)]}.{param}"
    if module in HF_FROM_OURS:
        return f"bert.{HF_FROM_OURS[module]}.{param}"
    return key  # classifier.*, qa_outputs.*: HF's heads have our names



def fetch(name_or_dir, cache_dir=None):
    """A local model directory; a hub repo's config, vocab and weights downloaded into the cache; or
    Google's release zip (URL or file), unpacked into the cache."""
    cache = cache_dir or os.environ.get("MLKD_CACHE", os.path.expanduser("~/.cache/mlkd"))
    if os.path.isdir(name_or_dir):
        return name_or_dir
    if name_or_dir.endswith(".zip"):
        name = os.path.basename(name_or_dir)[:-4]
        target = os.path.join(cache, "models", name)
        if not os.path.isdir(target):
            zip_path = name_or_dir
            if name_or_dir.startswith(("http://", "https://")):
                zip_path = data.download(name_or_dir, os.path.join(cache, "models", name + ".zip"))
            data.unzip(zip_path, target + ".tmp")
            os.replace(target + ".tmp", target)
        inner = [os.path.join(target, d) for d in os.listdir(target) if os.path.isdir(os.path.join(target, d))]
        return inner[0] if len(inner) == 1 and not os.path.exists(os.path.join(target, "bert_config.json")) else target
    if name_or_dir.count("/") != 1 or name_or_dir.startswith((".", "/")):
        raise FileNotFoundError(f"model {name_or_dir!r}: no such directory, and not a hub name like "
                                "google-bert/bert-base-uncased")
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
            data.download(f"{base}/pytorch_model.bin", weights[1])  # the TinyBERT repos ship only .bin
    return directory


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_checkpoint(directory):
    for file in WEIGHT_FILES:
        path = os.path.join(directory, file)
        if os.path.exists(path):
            return read_safetensors(path) if file.endswith(".safetensors") else read_bin(path)
    index = sorted(f for f in os.listdir(directory) if f.endswith(".index"))
    if index:  # a TensorFlow checkpoint, e.g. bert_model.ckpt.index + bert_model.ckpt.data-00000-of-00001
        return from_google_names(read_tf_checkpoint(os.path.join(directory, index[0])[:-len(".index")]))
    raise FileNotFoundError(f"{directory}: no {' or '.join(WEIGHT_FILES)} and no TensorFlow checkpoint (*.index)")


# ----------------------------------------------------------------------------------------------
# safetensors: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape,
# data_offsets: [begin, end]}} (offsets relative to the end of the header), then raw bytes.

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    with open(path, "rb") as f:
        buf = bytearray(f.read())
    if len(buf) < 8:
        raise ValueError(f"{path}: not a safetensors file (only {len(buf)} bytes)")
    n = int.from_bytes(buf[:8], "little")
    if n > len(buf) - 8:
        raise ValueError(f"{path}: corrupt safetensors header (length {n} > file size {len(buf)})")
    try:
        header = json.loads(buf[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    start, state = 8 + n, {}
    for name, info in header.items():
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        begin, end = info.get("data_offsets", (0, -1))
        count = math.prod(info.get("shape", []))
        if dtype is None or end - begin != count * dtype.itemsize or start + end > len(buf):
            raise ValueError(f"{path}: corrupt safetensors entry {name!r}: {info}")
        flat = (
            torch.frombuffer(buf, dtype=dtype, count=count, offset=start + begin)
            if count
            else torch.empty(0, dtype=dtype)
        )
        state[name] = flat.view(info["shape"])
    return state


def write_safetensors(tensors, path):
    header, offset, blobs = {}, 0, []
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    for name, t in tensors.items():
        b = t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)  # pad so tensors stay 8-byte aligned
    data.atomic_write_bytes(path, [len(h).to_bytes(8, "little"), h, *blobs])


# ----------------------------------------------------------------------------------------------
# TensorFlow checkpoints (Google's original BERT release), read with no TensorFlow.
# <prefix>.index is a LevelDB-style table (sorted key -> value blocks, an index block, a 48-byte
# footer); key "" holds a BundleHeaderProto, every other key a variable name whose value is a
# BundleEntryProto (dtype, shape, shard, offset, size, masked crc32c). The tensors themselves are
# raw little-endian bytes in <prefix>.data-0000i-of-0000n.

TF_MAGIC = 0xDB4775248B80FB57.to_bytes(8, "little")
TF_DTYPES = {1: torch.float32, 2: torch.float64, 3: torch.int32, 9: torch.int64, 14: torch.bfloat16, 19: torch.float16}
TF_STRING = 7  # e.g. TF2's _CHECKPOINTABLE_OBJECT_GRAPH: not a weight


def varint(buf, pos):
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def proto_fields(buf):
    """(field number, value) of a protobuf message: varints, fixed32/64 as ints, bytes for the rest."""
    pos = 0
    while pos < len(buf):
        key, pos = varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = varint(buf, pos)
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, pos = int.from_bytes(buf[pos:pos + n], "little"), pos + n
        elif wire == 2:
            n, pos = varint(buf, pos)
            value, pos = bytes(buf[pos:pos + n]), pos + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, value


def table_block(buf, offset, size, path):
    """The (key, value) entries of one table block: prefix-compressed keys, then restart points."""
    if offset + size + 5 > len(buf) or buf[offset + size] != 0:
        raise ValueError(f"{path}: corrupt or compressed table block at {offset}")
    if masked_crc32c(buf[offset : offset + size + 1]) != int.from_bytes(
        buf[offset + size + 1 : offset + size + 5], "little"
    ):
        raise ValueError(f"{path}: checksum mismatch in the table block at {offset}")
    block = buf[offset:offset + size]
    end = size - 4 - 4 * int.from_bytes(block[-4:], "little")
    pos, key = 0, b""
    while pos < end:
        shared, pos = varint(block, pos)
        fresh, pos = varint(block, pos)
        length, pos = varint(block, pos)
        key = key[:shared] + block[pos:pos + fresh]
        pos += fresh
        yield key, block[pos:pos + length]
        pos += length


def read_tf_checkpoint(prefix):
    """{variable name: tensor} of a TF1/TF2 checkpoint, every tensor's size and crc32c verified."""
    path = prefix + ".index"
    with open(path, "rb") as f:
        buf = f.read()
    if len(buf) < 48 or buf[-8:] != TF_MAGIC:
        raise ValueError(f"{path}: not a TensorFlow checkpoint index (bad footer)")
    _, p = varint(buf, len(buf) - 48)            # footer: metaindex handle (unused), index handle
    _, p = varint(buf, p)
    index_offset, p = varint(buf, p)
    index_size, _ = varint(buf, p)
    entries = {}
    for _, handle in table_block(buf, index_offset, index_size, path):
        offset, p = varint(handle, 0)
        size, _ = varint(handle, p)
        entries.update(table_block(buf, offset, size, path))
    header = dict(proto_fields(entries.pop(b"", b"")))
    shards = header.get(1, 1)
    if header.get(2, 0) != 0:
        raise ValueError(f"{path}: big-endian checkpoints are not supported")
    data_files = {}
    state = {}
    for key, value in entries.items():
        name, entry = key.decode(), {}
        for field, v in proto_fields(value):
            entry.setdefault(field, []).append(v)
        dtype = entry.get(1, [1])[0]
        if dtype == TF_STRING:
            continue
        if 7 in entry:
            raise ValueError(f"{path}: {name} is stored in slices, which this reader does not support")
        if dtype not in TF_DTYPES:
            raise ValueError(f"{path}: {name} has TensorFlow dtype {dtype}, not supported")
        shape = [dict(proto_fields(d)).get(1, 0) for f, d in proto_fields(entry.get(2, [b""])[0]) if f == 2]
        shard, offset, size = (entry.get(k, [0])[0] for k in (3, 4, 5))
        if shard not in data_files:
            with open(f"{prefix}.data-{shard:05d}-of-{shards:05d}", "rb") as f:
                data_files[shard] = bytearray(f.read())
        blob = data_files[shard]
        want = math.prod(shape) * TF_DTYPES[dtype].itemsize
        if size != want or offset + size > len(blob):
            raise ValueError(f"{prefix}: {name} should hold {want} bytes at offset {offset}; the data file is corrupt")
        if 6 in entry and masked_crc32c(blob[offset:offset + size]) != entry[6][0]:
            raise ValueError(f"{prefix}: checksum mismatch in {name}: the data file is corrupt")
        state[name] = (
            torch.frombuffer(blob, dtype=TF_DTYPES[dtype], count=math.prod(shape), offset=offset).view(shape)
            if size
            else torch.empty(shape, dtype=TF_DTYPES[dtype])
        )
    return state


def from_google_names(tf_state):
    """bert/encoder/layer_3/attention/self/query/kernel -> bert.encoder.layer.3.attention.self.query.weight
    (transposed: TF dense kernels are (in, out)); to_our_name then maps it like any HF name."""
    state = {}
    for name, tensor in tf_state.items():
        key = re.sub(r"layer_(\d+)", r"layer.\1", name.replace("/", "."))
        if key.endswith(".kernel"):
            key, tensor = key[:-len("kernel")] + "weight", tensor.T.contiguous()
        elif re.search(r"_embeddings$", key):
            key += ".weight"
        state[key] = tensor
    return state


CRC32C_TABLE = np.array([0] * 256, dtype=np.uint32)
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    CRC32C_TABLE[_i] = _c


def crc32c(buf, lanes=4096):
    """CRC-32C (Castagnoli) of buf. Vectorised: the bytes are cut into `lanes` equal chunks whose CRCs
    advance together in numpy (one table step per byte position), then combined left to right using
    linearity: crc(A + B) = shift(crc(A), len(B)) xor crc(B), shift = multiply by x^(8 len(B))."""
    data_ = np.frombuffer(bytes(buf), dtype=np.uint8)
    n = len(data_)
    width = max(1, n // lanes)
    k = n // width if n >= lanes else 0
    reg = np.uint32(0xFFFFFFFF)
    if k:
        grid = data_[:k * width].reshape(k, width)
        regs = np.zeros(k, dtype=np.uint32)            # raw CRC registers, initial value 0
        for j in range(width):
            regs = CRC32C_TABLE[(regs ^ grid[:, j]) & 0xFF] ^ (regs >> np.uint32(8))
        shift = _zeros_operator(width)
        reg = _apply(shift, reg) ^ regs[0]
        for r in regs[1:]:
            reg = _apply(shift, reg) ^ r
    for b in data_[k * width:]:
        reg = CRC32C_TABLE[(reg ^ b) & 0xFF] ^ (reg >> np.uint32(8))
    return int(reg) ^ 0xFFFFFFFF


def _zeros_operator(n_bytes):
    """The GF(2) 32x32 matrix, as its 32 columns, that advances a raw CRC register over n zero bytes."""
    power = [_step_zero(np.uint32(1 << b)) for b in range(32)]  # one zero byte
    result = [np.uint32(1 << b) for b in range(32)]             # identity
    while n_bytes:  # square and multiply
        if n_bytes & 1:
            result = [_apply(power, c) for c in result]
        power = [_apply(power, c) for c in power]
        n_bytes >>= 1
    return result


def _step_zero(reg):
    return CRC32C_TABLE[reg & 0xFF] ^ (reg >> np.uint32(8))


def _apply(matrix, reg):
    out = np.uint32(0)
    reg = int(reg)
    for bit in range(32):
        if reg >> bit & 1:
            out ^= matrix[bit]
    return np.uint32(out)


def masked_crc32c(buf):
    """TensorFlow stores crc32c rotated right by 15 bits plus a constant (LevelDB's mask)."""
    c = crc32c(buf)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_bin(path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as e:
        raise ValueError(f"cannot read {path} as a PyTorch weights file: {e}") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state
