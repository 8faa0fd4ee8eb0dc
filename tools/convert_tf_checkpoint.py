"""Convert Google's TensorFlow BERT release into a model directory that train.py and eval.py read.

    python tools/convert_tf_checkpoint.py SOURCE OUT_DIR

SOURCE is a TensorFlow checkpoint prefix (e.g. uncased_L-12_H-768_A-12/bert_model.ckpt) or the
directory holding it next to bert_config.json and vocab.txt, or Google's release zip, as a file or
an https URL (https://storage.googleapis.com/bert_models/2018_10_18/uncased_L-12_H-768_A-12.zip,
downloaded once into $MLKD_CACHE, else ~/.cache/mlkd). OUT_DIR receives config.json (HF's form),
vocab.txt, tokenizer_config.json (its casing) and model.safetensors with HF's names, as HF
transformers' own converter (convert_bert_original_tf_checkpoint_to_pytorch.py) would give, and no
TensorFlow is needed.

The format is TensorFlow's tensor bundle (tensorflow/core/util/tensor_bundle/tensor_bundle.proto
and tensor_bundle.cc). <prefix>.index is a LevelDB table (github.com/google/leveldb,
doc/table_format.md: sorted key -> value blocks, an index block, a 48-byte footer); key "" holds a
BundleHeaderProto, every other key a variable name whose value is a BundleEntryProto (dtype, shape,
shard, offset, size, masked crc32c). The tensors are raw little-endian bytes in
<prefix>.data-0000i-of-0000n. Every table block and every tensor is checked against its CRC-32C.
"""
import argparse
import json
import math
import os
import re
import shutil
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
import data  # noqa: E402
from model import Bert, to_hf_name, write_safetensors  # noqa: E402

# ----------------------------------------------------------------------------------------------
# The tensor bundle: protobuf varints and messages, LevelDB table blocks, the entries

TF_MAGIC = 0xDB4775248B80FB57.to_bytes(8, "little")  # LevelDB's table magic: the footer's end
TF_DTYPES = {1: torch.float32, 2: torch.float64, 3: torch.int32, 9: torch.int64, 14: torch.bfloat16,
             19: torch.float16}  # tensorflow/core/framework/types.proto
TF_STRING = 7  # e.g. TF2's _CHECKPOINTABLE_OBJECT_GRAPH: not a weight


def varint(buf, pos):
    """(value, position after it) of the protobuf base-128 varint at buf[pos]."""
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def proto_fields(buf):
    """(field number, value) of a protobuf message: varints, fixed32/64 as ints, the rest bytes."""
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
    """The (key, value) entries of one table block: prefix-compressed keys, then restart points;
    the block is followed by its compression type (0: none) and masked crc32c."""
    if offset + size + 5 > len(buf) or buf[offset + size] != 0:
        raise ValueError(f"{path}: corrupt or compressed table block at {offset}")
    stored = int.from_bytes(buf[offset + size + 1:offset + size + 5], "little")
    if masked_crc32c(buf[offset:offset + size + 1]) != stored:
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
    header = dict(proto_fields(entries.pop(b"", b"")))  # BundleHeaderProto: num_shards, endianness
    shards = header.get(1, 1)
    if header.get(2, 0) != 0:
        raise ValueError(f"{path}: big-endian checkpoints are not supported")
    data_files, state = {}, {}
    for key, value in entries.items():
        # BundleEntryProto fields: dtype 1, shape 2, shard 3, offset 4, size 5, crc32c 6, slices 7
        name, entry = key.decode(), {}
        for field, v in proto_fields(value):
            entry.setdefault(field, []).append(v)
        dtype = entry.get(1, [1])[0]
        if dtype == TF_STRING:
            continue
        if 7 in entry:
            raise ValueError(f"{path}: {name} is stored in slices, which this reader cannot read")
        if dtype not in TF_DTYPES:
            raise ValueError(f"{path}: {name} has TensorFlow dtype {dtype}, not supported")
        dims = [d for f, d in proto_fields(entry.get(2, [b""])[0]) if f == 2]  # TensorShapeProto
        shape = [dict(proto_fields(d)).get(1, 0) for d in dims]
        shard, offset, size = (entry.get(k, [0])[0] for k in (3, 4, 5))
        if shard not in data_files:
            with open(f"{prefix}.data-{shard:05d}-of-{shards:05d}", "rb") as f:
                data_files[shard] = bytearray(f.read())
        blob, count = data_files[shard], math.prod(shape)
        want = count * TF_DTYPES[dtype].itemsize
        if size != want or offset + size > len(blob):
            raise ValueError(f"{prefix}: {name} should hold {want} bytes at offset {offset}; "
                             "the data file is corrupt")
        if 6 in entry and masked_crc32c(blob[offset:offset + size]) != entry[6][0]:
            raise ValueError(f"{prefix}: checksum mismatch in {name}: the data file is corrupt")
        flat = (torch.frombuffer(blob, dtype=TF_DTYPES[dtype], count=count, offset=offset) if size
                else torch.empty(0, dtype=TF_DTYPES[dtype]))
        state[name] = flat.view(shape)
    return state


# ----------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), as TensorFlow and LevelDB store it

CRC32C_TABLE = np.array([0] * 256, dtype=np.uint32)
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    CRC32C_TABLE[_i] = _c


def crc32c(buf, lanes=4096):
    """CRC-32C of buf. Vectorised: the bytes are cut into `lanes` equal chunks whose CRCs advance
    together in numpy (one table step per byte position), then combined left to right using
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
        shift = zeros_operator(width)
        reg = apply(shift, reg) ^ regs[0]
        for r in regs[1:]:
            reg = apply(shift, reg) ^ r
    for b in data_[k * width:]:
        reg = CRC32C_TABLE[(reg ^ b) & 0xFF] ^ (reg >> np.uint32(8))
    return int(reg) ^ 0xFFFFFFFF


def zeros_operator(n_bytes):
    """The GF(2) 32x32 matrix, as its 32 columns, that advances a raw CRC register over n_bytes
    zero bytes."""
    power = [step_zero(np.uint32(1 << b)) for b in range(32)]  # one zero byte
    result = [np.uint32(1 << b) for b in range(32)]            # identity
    while n_bytes:  # square and multiply
        if n_bytes & 1:
            result = [apply(power, c) for c in result]
        power = [apply(power, c) for c in power]
        n_bytes >>= 1
    return result


def step_zero(reg):
    """A raw CRC register advanced over one zero byte."""
    return CRC32C_TABLE[reg & 0xFF] ^ (reg >> np.uint32(8))


def apply(matrix, reg):
    """matrix (32 columns) times the register's 32 bits, over GF(2)."""
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


# ----------------------------------------------------------------------------------------------
# Google's names -> HF's, the source's files, the conversion

# Pre-training heads, the optimizer's slots, the step counter (HF's load_tf_weights_in_bert skips
# these too: adam_m, adam_v, AdamWeightDecayOptimizer(_1), global_step)
SKIPPED = r"^cls/|/(adam_[mv]|AdamWeightDecayOptimizer(_1)?)$|^global_step$"
FINE_TUNED = r"^cls/squad/|^output_(weights|bias)$"  # Google's run_squad.py's, run_classifier.py's


def hf_state(tf_state):
    """The BERT weights of a Google checkpoint under HF's names:
    bert/encoder/layer_3/attention/self/query/kernel -> bert.encoder.layer.3.attention.self.query
    .weight, transposed (TF's dense kernels are (in, out)); LayerNorm gamma, beta -> weight, bias.
    What SKIPPED matches is left out; a fine-tuned head is refused (its labels are not ours to guess).
    """
    state = {}
    for name, tensor in tf_state.items():
        if re.search(FINE_TUNED, name):
            raise ValueError(f"{name}: a checkpoint fine-tuned by Google's run_squad.py or "
                             "run_classifier.py; convert the pre-trained release and fine-tune it here")
        if re.search(SKIPPED, name):
            continue
        key = re.sub(r"layer_(\d+)", r"layer.\1", name.replace("/", "."))
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
        key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
        if key.endswith(".kernel"):
            key, tensor = key[:-len("kernel")] + "weight", tensor.T.contiguous()
        elif key.endswith("_embeddings"):
            key += ".weight"
        state[key] = tensor
    return state


def source_files(source, scratch):
    """(checkpoint prefix, bert_config.json, vocab.txt) of SOURCE. A release zip (a file, or a URL
    downloaded into the cache) is unpacked into scratch first."""
    if source.endswith(".zip"):
        if source.startswith(("http://", "https://")):
            cache = os.environ.get("MLKD_CACHE", os.path.expanduser("~/.cache/mlkd"))
            source = data.download(source, os.path.join(cache, "models", os.path.basename(source)))
        if not os.path.isfile(source):
            raise FileNotFoundError(f"{source}: no such file")
        data.unzip(source, scratch)
        found = {d for d, _, files in os.walk(scratch) if any(f.endswith(".index") for f in files)}
        if len(found) != 1:
            raise ValueError(f"{source}: holds {len(found)} folders of TensorFlow checkpoints "
                             "(*.index), not one")
        source = found.pop()
    source = source.removesuffix(".index")  # the prefix's index file, named: its prefix
    if os.path.isdir(source):
        index = sorted(f for f in os.listdir(source) if f.endswith(".index"))
        if len(index) != 1:
            raise ValueError(f"{source}: holds {len(index)} TensorFlow checkpoints (*.index), not "
                             "one; pass a checkpoint prefix, e.g. DIR/bert_model.ckpt")
        source = os.path.join(source, index[0][:-len(".index")])
    if not os.path.exists(source + ".index"):
        raise FileNotFoundError(f"{source}: no such directory, .zip or checkpoint prefix "
                                "(<prefix>.index)")
    folder = os.path.dirname(source)
    for name in ("bert_config.json", "vocab.txt"):
        if not os.path.exists(os.path.join(folder, name)):
            raise FileNotFoundError(f"{folder}: no {name} next to the checkpoint")
    return source, os.path.join(folder, "bert_config.json"), os.path.join(folder, "vocab.txt")


def convert(source, out_dir):
    """Write out_dir (config.json, vocab.txt, tokenizer_config.json: its casing, model.safetensors)
    from SOURCE's checkpoint, after loading it into a Bert strictly (a missing, unexpected or
    wrongly shaped tensor is an error). Returns the Bert."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    scratch = os.path.join(parent, f".tmp-convert-{os.path.basename(os.path.abspath(out_dir))}")
    shutil.rmtree(scratch, ignore_errors=True)  # what a conversion to out_dir killed earlier left
    try:
        prefix, config, vocab = source_files(source, os.path.join(scratch, "unzipped"))
        raw = os.path.join(scratch, "raw")  # Google's config, HF's names: for Bert.from_pretrained
        os.makedirs(raw)
        shutil.copy(config, os.path.join(raw, "config.json"))
        state = hf_state(read_tf_checkpoint(prefix))
        write_safetensors(state, os.path.join(raw, "model.safetensors"))
        try:
            bert = Bert.from_pretrained(raw, verbose=False)
        except ValueError as e:  # said of SOURCE's files, not of their copies in scratch
            why = str(e).replace(os.path.join(raw, "config.json"), config).replace(raw, prefix)
            raise ValueError(why) from None
        missing = sorted({to_hf_name(k) for k in bert.state_dict()} - set(state))  # a new pooler
        if missing:
            raise ValueError(f"{source}: the checkpoint has no {', '.join(missing)}: not a whole BERT")
        text = data.read_text(vocab)
        pieces = text.splitlines()
        if len(pieces) > bert.config.vocab_size:  # a word piece past it would index no embedding
            raise ValueError(f"{vocab}: {len(pieces)} word pieces, more than the vocab_size "
                             f"{bert.config.vocab_size} of {config}: not this checkpoint's vocabulary")
        # HF's BertTokenizer lower-cases unless told: a cased release says so
        cased = {"tokenizer_class": "BertTokenizer", "do_lower_case": data.uncased(pieces)}
        files = {"vocab.txt": text, "tokenizer_config.json": json.dumps(cased, indent=2)}
        bert.save(os.path.join(scratch, "out"), files)
        os.makedirs(out_dir, exist_ok=True)
        for name in (*files, "config.json", "model.safetensors"):  # the weights last: a model is
            os.replace(os.path.join(scratch, "out", name), os.path.join(out_dir, name))  # whole
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return bert


def main(argv=None):
    """Parse SOURCE and OUT_DIR, convert; any failure is one line `error: ...` and exit status 1."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1].split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE",
                   help="a checkpoint prefix or its directory, or Google's release zip (path or "
                        "URL)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the model directory to write")
    args = p.parse_args(argv)
    if not args.out_dir or os.path.isfile(args.out_dir):
        sys.exit(f"error: OUT_DIR {args.out_dir!r}: name a folder to write (it is made if missing)")
    if os.path.exists(os.path.join(args.out_dir, "model.safetensors")):
        sys.exit(f"error: {args.out_dir} already holds a model.safetensors; choose another OUT_DIR")
    try:
        bert = convert(args.source, args.out_dir)
    except (ValueError, OSError, data.DownloadError) as e:
        sys.exit("error: " + " ".join(line.strip() for line in str(e).splitlines()))
    c = bert.config
    print(f"wrote {args.out_dir}: BERT of {c.num_hidden_layers} layers x {c.hidden_size}, "
          f"{bert.num_parameters() / 1e6:.1f}M parameters; use it as --teacher_init {args.out_dir}")


if __name__ == "__main__":
    main()
