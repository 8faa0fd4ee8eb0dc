"""mlkd.py: the losses of MLKD-BERT and the objectives of its two distillation stages.

Read this file first (then model.py's BertOutput, train.py, eval.py, data.py). Source: Zhang, Yang
and Ji, "MLKD-BERT: Multi-level Knowledge Distillation for Pre-trained Language Models" (arXiv
2407.02775), with the details the paper leaves open read from the authors' code
(HandH1998/tmp_bert_mlkd, a fork of TinyBERT's: branch bert_mlkd, commit 0f5fb51, task_distill.py;
SQuAD: branch bert_mlkd_for_qa_task). Imports nothing of ours: the stage objectives read
the fields of model.py's BertOutput (hidden_states, attn_outputs, token_embeddings, logits; for
TinyBERT's baseline attn_scores) by name.

    level      loss    compares (teacher T is always the target P of KL(P || Q))
    relation   L_EMB   token-token similarity of the word-piece embeddings (KL)             Stage 1
    relation   L_MHA   token-token similarity of the attention outputs, per MHA-split (KL)  Stage 1
                       (O = softmax(Q K^T / sqrt(d/h)) V of the heads, before the output projection)
    feature    L_FFN   projected student hidden states with the teacher's (MSE)             Stage 1
    feature    L_KD    soft labels, or the teacher's score for regression                   Stage 2
    relation   L_SS    sample-sample similarity of the final [CLS] states (KL)              Stage 2
    relation   L_SC    supervised contrast of student and teacher [CLS] features            Stage 2
And, at the end, the baseline the paper compares with: TinyBERT's task distillation (attention
scores and hidden states by MSE in Stage 1, L_KD alone in Stage 2; train.py --recipe tinybert).

Notation: B batch, L length (the batch's longest row), d width, A MHA-splits, M student layers,
N teacher layers.
Masks (B, L), 1 = real token: pad keys leave every softmax, pad query rows leave every mean, so a
masked loss does not depend on how much padding a batch has. mask=None is the authors' unmasked
loss. Every loss computes on fp32 copies (their matmuls with autocast off); the projections W_m
run under autocast like the model (bf16 on CUDA). The teacher's tensors are detached. Under
torchrun, train.py's shard and gather_rows say how the batch's rows are shared by the processes.
"""
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# "Minus infinity" for masked keys that stays finite, so 0 * (logp_T - logp_S) is 0, never NaN
NEG = -1e30


# ----------------------------------------------------------------------------------------------
# Relations: softmax(X X^T / sqrt(k)) and the KL between the teacher's and the student's


def relation_logprobs(x, mask=None, temperature=1.0):
    """x (B, A, L, k) -> log softmax(x x^T / (sqrt(k) t)) over the last dim, (B, A, L, L); pad keys
    masked. The paper's relations have t = 1; t < 1 sharpens them (train.py --mha_temperature, not
    the paper's method)."""
    x = x.float()
    scale = math.sqrt(x.shape[-1]) * temperature
    with torch.autocast(x.device.type, enabled=False):  # an fp32 matmul under bf16 autocast
        scores = (x / scale) @ x.transpose(-1, -2)                      # (B, A, L, L); scaled first
    if mask is not None:
        scores.masked_fill_(mask[:, None, None, :] == 0, NEG)           # pad keys leave the softmax (in place)
    return F.log_softmax(scores, dim=-1)


def relation_kl_rows(x_s, x_t, mask=None, temperature=1.0):
    """KL(R_T[i] || R_S[i]) of every query row i, (B, A, L), with R = relation of x.

    x_s (B, A, L, k_S), x_t (B, A, L, k_T): each side uses its own width k in its scaling.
    """
    logp_s = relation_logprobs(x_s, mask, temperature)             # (B, A, L, L)
    logp_t = relation_logprobs(x_t.detach(), mask, temperature)    # (B, A, L, L)
    return (logp_t.exp() * (logp_t - logp_s)).sum(-1)      # (B, A, L)


def relation_kl(x_s, x_t, mask=None, temperature=1.0):
    """Mean over valid (example, split, query row) of KL(R_T || R_S) (pad rows left out)."""
    kl_rows = relation_kl_rows(x_s, x_t, mask, temperature)  # (B, A, L)
    if mask is None:
        return kl_rows.mean()
    rows = mask[:, None, :].to(kl_rows.dtype)              # (B, 1, L): pad query rows leave the mean
    return (kl_rows * rows).sum() / (rows.sum() * kl_rows.shape[1])


def mha_splits(o, splits):
    """(B, L, d) -> (B, A, L, d/A): A contiguous chunks of the features, whatever the heads."""
    B, L, d = o.shape
    if d % splits:
        raise ValueError(f"MHA-splits: {splits} splits do not divide the width {d}; choose splits dividing "
                         "both the student's and the teacher's hidden size (e.g. 12 for 312 and 768)")
    return o.view(B, L, splits, d // splits).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Stage-1 losses


def emb_loss(e_s, e_t, mask=None):
    """L_EMB = mean over query rows i of KL(R_T[i] || R_S[i]),  R = softmax(E E^T / sqrt(d)).

    e_s (B, L, d_S), e_t (B, L, d_T): LayerNorm_emb(word_embeddings(input_ids)) of each model, the
    word pieces alone (no positions, segments or dropout), as the authors' transformer/modeling.py
    returns them beside the embedding output H_0 (which L_FFN compares at m = 0).
    """
    return relation_kl(e_s[:, None], e_t[:, None], mask)


def mha_loss(o_s, o_t, mask=None, splits=12, temperature=1.0):
    """L_MHA for one layer pair = mean over (split a, query row i) of KL(R^T_a[i] || R^S_a[i]),
    R_a = softmax(O_a O_a^T / sqrt(d/A)), O_a the a-th of A contiguous feature chunks of O.

    o_s (B, L, d_S), o_t (B, L, d_T): concatenated head contexts before the output projection. The
    splits, not the heads, are matched: the student may have any number of heads. temperature t
    divides both relations' logits, O_a O_a^T / (sqrt(d/A) t): 1 is the paper's loss; t < 1
    sharpens relations that are nearly uniform (an experiment beyond the paper).
    """
    return relation_kl(mha_splits(o_s, splits), mha_splits(o_t, splits), mask, temperature)


def ffn_loss(h_s, h_t, mask=None):
    """L_FFN for one layer pair = MSE(W h_S, h_T) over the valid positions' elements.

    h_s (B, L, d_T) already projected to the teacher width, h_t (B, L, d_T).
    """
    sq = (h_s.float() - h_t.detach().float()) ** 2          # (B, L, d_T)
    if mask is None:
        return sq.mean()
    m = mask[:, :, None].to(sq.dtype)                        # (B, L, 1)
    return (sq * m).sum() / (m.sum() * sq.shape[-1])


# ----------------------------------------------------------------------------------------------
# Stage-2 losses


def kd_loss(z_s, z_t, temperature=1.0):
    """L_KD, the soft labels of the teacher.

    classification z (B, C):  mean_b  -sum_c softmax(z_T/t)_c log_softmax(z_S/t)_c  * t^2
    span z (B, 2, L):         the same over positions, start plus end (summed, as the authors'
                              QA branch does; the gold loss, train.task_loss, takes their mean)
    regression z (B, 1):      MSE(z_S, z_T), the teacher's prediction as the target
    Summed over classes, as Hinton et al. (2015) and DistilBERT; the authors' soft_cross_entropy
    (TinyBERT's) takes the mean over batch and classes, without t^2: beside L_SS and L_SC,
    theirs weighs ours / (C t^2).
    """
    z_s, z_t = z_s.float(), z_t.detach().float()
    if z_s.dim() == 2 and z_s.shape[1] == 1:  # regression
        return F.mse_loss(z_s, z_t)
    t = temperature
    ce = -(F.softmax(z_t / t, dim=-1) * F.log_softmax(z_s / t, dim=-1)).sum(-1)  # (B,) or (B, 2)
    return ce.reshape(len(ce), -1).sum(1).mean() * t * t


def ss_loss(c_s, c_t):
    """L_SS = mean over samples i of KL(G_T[i] || G_S[i]),  G = softmax(C C^T / sqrt(d)), (B, B).

    c_s (B, d_S), c_t (B, d_T): the raw final-layer [CLS] states (not pooled, not projected).
    """
    return relation_kl(c_s[None, None], c_t[None, None])


def sc_loss(u, v, labels, tau=0.07, base_tau=1.0):
    """L_SC, supervised contrast over the 2B features F = [u_1..u_B, v_1..v_B] (unit vectors).

    Every feature i is an anchor; its candidates are the other 2B-1; its positives P(i) the
    candidates with the same label (so u_i and v_i are always positives of each other):
        l_i = -(tau / base_tau) * mean_{p in P(i)} [ f_i.f_p / tau - log sum_{a != i} exp(f_i.f_a / tau) ]
        L_SC = mean_i l_i
    u (B, d_T): projected student [CLS]; v (B, d_T): teacher [CLS]; labels (B,), int or float
    (regression: exactly equal scores only). Gradients flow through every term containing a u.
    base_tau = 1 as in the authors' code (SupCon's own code has 0.07), so L_SC carries a factor tau.
    Theirs (SupConLoss) takes log(sum exp + 1e-7) of max-shifted logits: close to this, not equal.
    """
    f = F.normalize(torch.cat([u.float(), v.detach().float()]), dim=-1)    # (2B, d)
    y = torch.cat([labels, labels])                                        # (2B,)
    with torch.autocast(f.device.type, enabled=False):  # an fp32 matmul under bf16 autocast
        sim = f @ f.T / tau                                                # (2B, 2B)
    self_ = torch.eye(len(f), dtype=torch.bool, device=f.device)
    log_denominator = torch.logsumexp(sim.masked_fill(self_, -math.inf), dim=1, keepdim=True)  # (2B, 1)
    log_prob = sim - log_denominator                                      # (2B, 2B)
    positive = (y[:, None] == y[None, :]) & ~self_                        # (2B, 2B)
    mean_log_prob = (log_prob * positive).sum(1) / positive.sum(1)        # (2B,)
    return -(tau / base_tau) * mean_log_prob.mean()


# ----------------------------------------------------------------------------------------------
# Layer mapping and projections


def layer_map(n_teacher, n_student, kind="uniform"):
    """g(0..M): the teacher layer each student layer learns from; g(0) = 0 is the embedding layer.

    "uniform": g(m) = round(m N / M) (half up: 6 -> 4 layers gives 0, 2, 3, 5, 6);
    "last": the top M teacher layers, g(m) = N - M + m; or an explicit list of M teacher layers
    (1-based, e.g. [3, 6, 9, 12]), optionally with the leading 0.
    """
    N, M = n_teacher, n_student
    if kind in ("uniform", "last") and M > N:  # g(m) would be 0, the embeddings, for a layer m
        raise ValueError(f"layer map {kind!r}: the student has {M} layers, the teacher only {N}")
    if kind == "uniform":
        g = [math.floor(m * N / M + 0.5) for m in range(M + 1)]
    elif kind == "last":
        g = [0] + [N - M + m for m in range(1, M + 1)]
    elif isinstance(kind, (list, tuple)):
        g = list(kind) if len(kind) == M + 1 else [0, *kind]
        if len(g) != M + 1 or g[0] != 0 or any(not 1 <= x <= N for x in g[1:]):
            raise ValueError(f"layer map {list(kind)}: need {M} teacher layers in 1..{N} (one per student layer)")
    else:
        raise ValueError(f"unknown layer map {kind!r}: use 'uniform', 'last' or a list of teacher layers")
    return g


class Projections(nn.Module):
    """W_0..W_M: Linear(d_S -> d_T) with bias, one per student hidden state: W_m is proj.w[m].
    Trained with the student (put them in the optimizer), used by L_FFN and L_SC, discarded at
    inference.

    init "normal": N(0, 0.02) as BERT initialises a new Linear (the authors' fit_dense);
    "identity": W = I, b = 0 (only when d_S = d_T), so a student that already matches starts at
    zero loss.
    """

    def __init__(self, n_student, d_student, d_teacher, init="normal"):
        super().__init__()
        if init == "identity" and d_student != d_teacher:
            raise ValueError(f"identity projections need equal widths, got {d_student} -> {d_teacher}")
        if init not in ("normal", "identity"):
            raise ValueError(f"unknown projection init {init!r}: use normal or identity")
        self.w = nn.ModuleList(nn.Linear(d_student, d_teacher) for _ in range(n_student + 1))
        for lin in self.w:
            nn.init.zeros_(lin.bias)
            if init == "identity":
                nn.init.eye_(lin.weight)
            else:
                nn.init.normal_(lin.weight, std=0.02)


# ----------------------------------------------------------------------------------------------
# The two stage objectives

def stage1_loss(s, t, proj, mask=None, lmap=None, weights=None, splits=12, mha_temperature=1.0):
    """L1 = w_emb L_EMB + w_mha sum_m L_MHA(m, g(m)) + w_ffn sum_{m=0..M} L_FFN(m, g(m)).

    s, t: student and teacher BertOutput; proj: Projections; lmap: layer_map(N, M).
    Returns (weighted total, {name: unweighted value}); a weight of 0 skips that loss.
    """
    w = {"emb": 1.0, "mha": 1.0, "ffn": 1.0, **(weights or {})}  # not given: 1
    M = len(s.attn_outputs)
    g = lmap or layer_map(len(t.attn_outputs), M)
    parts = {}
    if w["emb"]:
        parts["emb"] = emb_loss(s.token_embeddings, t.token_embeddings, mask)
    if w["mha"]:  # attn_outputs[m - 1]: layer m's head contexts O, the input of its attn_out
        parts["mha"] = sum(mha_loss(s.attn_outputs[m - 1], t.attn_outputs[g[m] - 1], mask, splits, mha_temperature)
                           for m in range(1, M + 1))
    # hidden_states[0] is the embedding output H_0, hidden_states[m] the output of layer m; m = 0 is
    # in the sum as in the authors' align_loss over their reps 0..M (TinyBERT's L_embd)
    if w["ffn"]:
        parts["ffn"] = sum(ffn_loss(proj.w[m](s.hidden_states[m]), t.hidden_states[g[m]], mask)
                           for m in range(M + 1))
    return sum(w[k] * v for k, v in parts.items()), parts  # the weighted total, the parts


class LogitsAndCls(NamedTuple):
    """All that Stage 2 reads of a model: its logits and its final [CLS] state. The teacher is
    frozen and deterministic, so the teacher's can be computed once per training example and reused
    every epoch (train.py's teacher cache)."""
    logits: torch.Tensor  # (B, C) classification, (B, 1) regression, (B, 2, L) span
    cls: torch.Tensor     # (B, d): hidden_states[-1][:, 0], raw

    @staticmethod
    def of(out):
        return LogitsAndCls(out.logits, out.hidden_states[-1][:, 0])


def stage2_targets(batch, teacher, cache=None):
    """The teacher's LogitsAndCls for a batch: its rows of the cache (span logits cut to the
    batch's width), or, without a cache, a live forward of the frozen teacher."""
    if cache is None:
        with torch.no_grad():
            out = teacher(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        return LogitsAndCls.of(out)
    rows = batch["index"]                                               # (B,) dataset rows
    logits = cache.logits[rows]                                         # (B, C) or (B, 2, max_len)
    if logits.dim() == 3:
        logits = logits[..., :batch["input_ids"].shape[1]]              # (B, 2, width)
    return LogitsAndCls(logits, cache.cls[rows])


def stage2_loss(s, t, proj, labels, weights=None, temperature=1.0, tau=0.07, base_tau=1.0):
    """L2 = w_kd L_KD + w_ss L_SS + w_sc L_SC on the student's and the teacher's logits and final
    [CLS] states: s, t each a LogitsAndCls, or a BertOutput to read them from.

    The [CLS] state is hidden_states[-1][:, 0] (raw); L_SC projects the student's with the last
    projection W_M. A weight of 0 skips a loss (train.py gives SQuAD w_ss = w_sc = 0: the authors
    distil its span logits alone).
    Returns (weighted total, unweighted parts).
    """
    w = {"kd": 1.0, "ss": 1.0, "sc": 1.0, **(weights or {})}  # not given: 1
    s, t = (x if isinstance(x, LogitsAndCls) else LogitsAndCls.of(x) for x in (s, t))
    parts = {}
    if w["kd"]:
        parts["kd"] = kd_loss(s.logits, t.logits, temperature)
    if w["ss"]:
        parts["ss"] = ss_loss(s.cls, t.cls)  # (B, d_S), (B, d_T)
    if w["sc"]:  # u = W_M c_S, the last projection (Stage 1's W_M of L_FFN at m = M)
        parts["sc"] = sc_loss(proj.w[-1](s.cls), t.cls, labels, tau, base_tau)
    return sum(w[k] * v for k, v in parts.items()), parts  # the weighted total, the parts


# ----------------------------------------------------------------------------------------------
# The baseline MLKD is compared with: TinyBERT's task distillation (Jiao et al. 2020, "TinyBERT:
# Distilling BERT for Natural Language Understanding", eq. 7-10). Its Stage 1 matches features, not
# relations; its Stage 2 is L_KD alone (soft cross-entropy at t = 1): kd_loss serves it unchanged.


def attention_mse(a_s, a_t, mask=None, paper_exact=False):
    """TinyBERT's L_attn for one layer pair = MSE(A_S, A_T) over heads and valid (query, key) pairs,
    A = Q K^T / sqrt(d/h) the pre-softmax scores, (B, h, L, L). Head i of the student learns head i
    of the teacher, so both need the same head count (MLKD's L_MHA does not). Here masked pairs
    leave the mean, as in this file's other token-level losses; paper_exact as TinyBERT's code:
    the scores of padded keys set to 0 (its "<= -100 -> 0"), the mean over every pair.
    """
    if a_s.shape[1] != a_t.shape[1]:
        raise ValueError(f"TinyBERT's attention loss matches heads one to one: the student has {a_s.shape[1]} "
                         f"heads, the teacher {a_t.shape[1]}; give the student --heads {a_t.shape[1]}")
    sq = (a_s.float() - a_t.detach().float()) ** 2                     # (B, h, L, L)
    if mask is None:
        return sq.mean()
    if paper_exact:  # both scores 0 at a padded key: its squared difference 0, counted in the mean
        return (sq * mask[:, None, None, :].to(sq.dtype)).mean()
    pairs = (mask[:, :, None] * mask[:, None, :])[:, None].to(sq.dtype)  # (B, 1, L, L): real query x real key
    return (sq * pairs).sum() / (pairs.sum() * sq.shape[1])


def tinybert_stage1_loss(s, t, proj, mask=None, lmap=None, paper_exact=False):
    """TinyBERT's intermediate-layer distillation, with MLKD's layer map and projections:
        L = sum_{m=1..M} MSE(A_S^m, A_T^g(m))  +  sum_{m=0..M} MSE(W_m h_S^m, h_T^g(m))
    att (attention scores) and hid (m = 0: the embedding layer's output, TinyBERT's L_embd; m >= 1:
    the layers' outputs, L_hidn). s, t: BertOutputs computed with scores=True. TinyBERT's code
    shares one W between the layers; a W_m per layer (TextBrewer's choice) lets the same Projections
    serve both.
    paper_exact: as TinyBERT's code (attention_mse's; the hidden states' MSE unmasked).
    Returns (total, {name: value}).
    """
    M = len(s.attn_scores)
    g = lmap or layer_map(len(t.attn_scores), M)
    parts = {"att": sum(attention_mse(s.attn_scores[m - 1], t.attn_scores[g[m] - 1], mask, paper_exact)
                        for m in range(1, M + 1)),
             "hid": sum(ffn_loss(proj.w[m](s.hidden_states[m]), t.hidden_states[g[m]],
                                 None if paper_exact else mask) for m in range(M + 1))}
    return parts["att"] + parts["hid"], parts
