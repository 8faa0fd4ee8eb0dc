"""tools/mutate.py: mutation testing of the method's wiring, kept as a habit.

Each mutant below is one plausible miswiring of MLKD-BERT: a loss reading a neighbouring layer, the
wrong projection, the pooled [CLS], a stage started from fresh weights, a flag ignored. The script
copies the repository (its tracked files and testdata/) into a temporary folder, makes the one
change, runs the test suite there, and says whether the suite caught it (a test failed) or let it
survive (every test passed). A survivor is a missing test: write the test that fails on it.

Run it before resolving a change to the wiring (mlkd.py's stage objectives, model.py's outputs,
train.py's stages):

    python tools/mutate.py                  # every mutant; stops at the first survivor
    python tools/mutate.py --keep-going     # every mutant, a full table: before a merge
    python tools/mutate.py --only 3,17      # some of them, by number
    python tools/mutate.py --list           # the numbered list, and whether each still applies

It takes one run of the suite for the unmutated code (it must pass, else every mutant would look
caught), then one per mutant, stopped at the mutant's first failing test (pytest -x). A run of the
whole suite is 1 minute on 2 idle CPU cores and up to 5 when they are shared; a caught mutant stops
sooner. A full run of 67 of them took 67 minutes on 2 cores shared with other work (59: 49 minutes
on idle ones). Run it in the background.

Read the first failing test of each caught mutant: one caught only by a test that has nothing to do
with its mistake may have met a flaky test; run it again with --only N.

A mutant's `old` text must occur exactly once in its file; when it does not, the code has moved and
the script stops before running anything. Rewrite that mutant against the new code, so that it makes
the same mistake there; do not delete it. A mutant that the suite cannot tell from the right code
(an equivalent mutant) is no miswiring: replace it with one that is.

Standard library only; nothing of the chapter files imports it.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINE = 120  # test_every_file_keeps_its_shape's limit: a mutant must not be caught by it


class Mutant(NamedTuple):
    file: str  # relative to the repository root
    old: str   # occurs exactly once in the file
    new: str
    why: str   # the mistake, as a contributor could make it


MUTANTS = [
    # mlkd.py: the losses and the stage objectives
    Mutant("mlkd.py",
           "t.attn_outputs[g[m] - 1], mask, splits, mha_temperature)",
           "t.attn_outputs[g[m] - 2], mask, splits, mha_temperature)",
           "L_MHA reads teacher layer g(m) - 1, a neighbour of g(m)"),
    Mutant("mlkd.py",
           't.hidden_states[g[m]], mask)\n',  # Stage 1's line; TinyBERT's goes on after "mask)"
           't.hidden_states[g[m] - 1], mask)\n',
           "L_FFN reads teacher hidden state g(m) - 1, a neighbour of g(m)"),
    Mutant("mlkd.py",
           'parts["ffn"] = sum(ffn_loss(proj.w[m](s.hidden_states[m])',
           'parts["ffn"] = sum(ffn_loss(proj.w[m - 1](s.hidden_states[m])',
           "L_FFN projects student layer m with W_{m-1} instead of W_m"),
    Mutant("mlkd.py",
           "return LogitsAndCls(out.logits, out.hidden_states[-1][:, 0])",
           "return LogitsAndCls(out.logits, out.pooled)",
           "L_SS and L_SC read each model's pooled output, not its raw final [CLS] state"),
    Mutant("train.py",
           'student, labels = mlkd.LogitsAndCls.of(out), batch["labels"]',
           'student, labels = mlkd.LogitsAndCls(out.logits, out.pooled), batch["labels"]',
           "L_SS and L_SC read the student's pooled [CLS], the teacher's raw final [CLS] state"),
    Mutant("mlkd.py",
           "sc_loss(proj.w[-1](s.cls)",
           "sc_loss(proj.w[0](s.cls)",
           "L_SC projects the student's [CLS] with W_0 instead of W_M"),
    Mutant("mlkd.py",
           "emb_loss(s.token_embeddings, t.token_embeddings, mask)",
           "emb_loss(s.hidden_states[0], t.hidden_states[0], mask)",
           "L_EMB on the embedding layer's output (positions, segments) not the word pieces"),
    Mutant("mlkd.py",
           "return (logp_t.exp() * (logp_t - logp_s)).sum(-1)",
           "return (logp_s.exp() * (logp_s - logp_t)).sum(-1)",
           "the relation KL is taken the other way round, KL(R_S || R_T)"),
    Mutant("mlkd.py",
           "logp_t = relation_logprobs(x_t.detach(), mask, temperature)",
           "logp_t = relation_logprobs(x_t.detach(), None, temperature)",
           "the teacher's relation leaves its pad keys in the softmax (its mask dropped)"),
    Mutant("mlkd.py",
           "scale = math.sqrt(x.shape[-1]) * temperature",
           "scale = math.sqrt(x.shape[1] * x.shape[-1]) * temperature",
           "relations scaled by sqrt of the whole width d, not of a split's width d/A"),
    Mutant("mlkd.py",
           "g = [math.floor(m * N / M + 0.5) for m in range(M + 1)]",
           "g = [math.floor(m * N / M) for m in range(M + 1)]",
           "the uniform layer map rounds m N / M down instead of half up"),
    Mutant("mlkd.py",
           'rows = batch["index"]',
           'rows = torch.arange(len(batch["index"]))',
           "the teacher cache is read by position in the batch, not by batch['index']"),
    Mutant("mlkd.py",
           "return ce.reshape(len(ce), -1).sum(1).mean() * t * t",
           "return ce.reshape(len(ce), -1).sum(1).mean()",
           "L_KD drops the t^2 factor, so --temperature also rescales the loss"),
    Mutant("mlkd.py",
           "    with torch.autocast(x.device.type, enabled=False):",
           "    with torch.autocast(x.device.type, enabled=True):",
           "the relations' similarity matmul runs in bf16 under autocast, not in fp32"),
    # model.py: the tensors the losses read
    Mutant("model.py",
           "out.attn_outputs.append(ctx)",
           "out.attn_outputs.append(layer.attn_out(ctx))",
           "attn_outputs taken after the attention's output projection, not before"),
    Mutant("model.py",
           "(1.0 - attention_mask[:, None, None, :].to(q.dtype))",
           "(1.0 - attention_mask[:, None, :, None].to(q.dtype))",
           "the attention mask applied to the queries instead of the keys"),
    Mutant("model.py",
           "token_embeddings=self.emb_ln(words),",
           "token_embeddings=words,",
           "token_embeddings are the raw word embeddings, without the embedding LayerNorm"),
    # eval.py: the head a task needs
    Mutant("eval.py",
           "if list(getattr(have, key)) not in ([], want[key]):",
           "if sorted(getattr(have, key)) not in ([], sorted(want[key])):",
           "a model fine-tuned under another label order is accepted (MNLI's would be silently wrong)"),
    Mutant("eval.py",
           'for key in ("label_names", "label_text"):',
           'for key in ("label_names",):',
           "an SST-2 model is scored as a CoLA model: both write their labels 0 and 1"),
    # train.py: the stages
    Mutant("train.py",
           "args.lr1, warmup=None)",
           "args.lr1, warmup=args.warmup)",
           "Stage 1 runs with warm-up and linear decay instead of a constant lr"),
    Mutant("train.py",
           'record, _ = fit("stage1", out["stage1"], [student, proj], loss_fn',
           'record, _ = fit("stage1", out["stage1"], [student], loss_fn',
           "the projections W_0..W_M are left out of Stage 1's optimizer"),
    Mutant("train.py",
           '    proj.load_state_dict(read_safetensors(os.path.join(stage1_dir, "projections.safetensors")))\n',
           "",
           "Stage 2 starts from fresh projections, not Stage 1's trained ones"),
    Mutant("train.py",
           'mask = None if args.paper_exact else batch["attention_mask"]',
           "mask = None",
           "Stage 1 runs its losses unmasked, as if --paper_exact were always given"),
    Mutant("train.py",
           "return (step + 1) / warm",
           "return step / warm",
           "warm-up starts at lr 0 (off by one): the first step does not move"),
    Mutant("train.py",
           "student = Bert.from_pretrained(stage1_dir, verbose=False)",
           "student = build_student(args, teacher)",
           "Stage 2 starts from a fresh student, not from Stage 1's"),
    Mutant("train.py",
           "                best = metrics\n                save_model(model, directory, args)",
           "                best = metrics\n            save_model(model, directory, args)",
           "every dev evaluation saves the model, so the last is kept, not the best"),
    Mutant("train.py",
           "labels, weights, args.temperature,",
           "labels, weights, 1.0,",
           "--temperature is ignored in Stage 2 (L_KD always at t = 1)"),
    Mutant("train.py",
           '"mha": args.w_mha, "ffn": args.w_ffn}',
           '"mha": args.w_ffn, "ffn": args.w_mha}',
           "--w_mha and --w_ffn swapped"),
    Mutant("train.py",
           '    torch.manual_seed(zlib.crc32(f"{args.seed} {stage}".encode()))\n',
           "",
           "no per-stage seeding: a stage's weights depend on what ran before it"),
    Mutant("train.py",
           "return teacher.to(args.device).eval().requires_grad_(False)",
           "return teacher.to(args.device).train().requires_grad_(False)",
           "the frozen teacher is left in train mode: dropout in its targets"),
    Mutant("train.py",
           "args.lr2, args.warmup, evaluate, keep_best=True)",
           "args.lr1, args.warmup, evaluate, keep_best=True)",
           "Stage 2 trains at --lr1 instead of --lr2"),
    Mutant("train.py",
           "lmap = mlkd.layer_map(teacher.config.num_hidden_layers, M, args.layer_map)",
           "lmap = mlkd.layer_map(teacher.config.num_hidden_layers, M)",
           "Stage 1 ignores --layer_map and always maps uniformly"),
    Mutant("train.py",
           "student.layers[m - 1].load_state_dict(source.layers[g[m] - 1].state_dict())",
           "student.layers[m - 1].load_state_dict(source.layers[m - 1].state_dict())",
           "a copied student takes the source's first M layers, not layers g(1..M)"),
    # data.py: downloads
    Mutant("data.py",
           "z.extractall(tmp)",
           "z.extractall(dest_dir)",
           "a damaged GLUE zip leaves its files, whole or cut short, where read_glue trusts them"),
    Mutant("data.py",
           'if r.headers.get("Content-Range", "").endswith(f"/{have}"):',
           "if True:",
           "a leftover .part longer than the file is renamed into place as the download"),
    Mutant("data.py",
           "lowercase=self.lowercase)",
           "lowercase=True)",
           "a cased vocabulary's text is lower-cased: its capitalised word pieces are never used"),
    # train.py: a stage's directory and torchrun
    Mutant("train.py",
           "t0, record = time.time() - trained,",
           "t0, record = time.time(),",
           "train_s counts only the seconds since the last resume"),
    Mutant("train.py",
           '    torch.manual_seed(zlib.crc32(f"{args.seed} {stage} {step} {RANK}".encode()))\n',
           "",
           "a resumed run draws its dropout from wherever the generator stands, not as the whole run"),
    Mutant("train.py",
           "    if not LEAD:\n        try:\n            dist.barrier()  # wait for process 0\n"
           "        except RuntimeError:  # process 0 left, having said its error (a bad file), or timed out\n"
           '            say_error("process 0 stopped before the data was ready (or took 3 hours): its output "\n'
           '                      "says why")\n'
           "            sys.exit(1)\n    yield\n",
           "    yield\n    if not LEAD:\n        dist.barrier()  # wait for process 0\n",
           "under torchrun every process downloads the same missing files at once"),
    Mutant("train.py",
           "        labels = gather_rows(labels, counts)\n        if targets is not None:\n"
           "            targets = mlkd.LogitsAndCls(*(gather_rows(x, counts) for x in targets))\n",
           "        student = mlkd.LogitsAndCls.of(out)\n",
           "under torchrun L_SS and L_SC relate each process's own rows, not the whole batch"),
    Mutant("train.py",
           "        mine.register_hook(lambda grad: grad * world)",
           "        pass",
           "under torchrun Stage 2's gathered gradients are averaged as if each process had its share"),
    Mutant("train.py",
           'if state["step"] >= total:  # past the end',
           'if state["step"] > 10 * total:  # past the end',
           "a checkpoint past the end of a shorter run ends it as finished, having trained nothing"),
    # tools/general_distill.py
    Mutant("tools/general_distill.py",
           "for i in (order[:k], order[k:]))",
           "for i in (order[:k], order))",
           "general distillation trains on its held-out windows too"),
    Mutant("tools/general_distill.py",
           "    args.data_crc32 = train.crc32(windows)",
           "    args.data_crc32 = None",
           "a corpus rewritten at the same path resumes a run made on other text"),
    # train.py, added later (numbers stay stable)
    Mutant("train.py",
           'stage1_share = "rows" if args.paper_exact else "tokens"',
           'stage1_share = "tokens"',
           "under torchrun with --paper_exact Stage 1's unmasked losses are shared by real tokens"),
    Mutant("train.py",
           "    args.data_crc32 = crc32(train)",
           "    args.data_crc32 = None",
           "a training file rewritten under the same flags reuses the stages trained on the old one"),
    Mutant("train.py",
           "group_by_length=100 * args.group_by_length",
           "group_by_length=50 * args.group_by_length",
           "--group_by_length sorts runs of 50 batches (HF's), not the documented 100"),
    Mutant("eval.py",
           "current += scores[i] if has_answer[i] else -float(bool(predictions[i]))",
           "current += scores[i] - (not has_answer[i])",
           "SQuAD v2.0's threshold sweep counts an unanswerable question's answer 'the' as empty"),
    Mutant("train.py",
           ' ("from_stage1", "from Stage 1"),',
           "",
           "a baseline's Stage 2 (finished or checkpointed) is reused or resumed after Stage 1 ran"),
    Mutant("train.py",
           "    args.teacher_crc32 = crc32(teacher.state_dict())",
           "    args.teacher_crc32 = None",
           "a Stage 1 distilled from a teacher since fine-tuned anew is reused"),
    Mutant("train.py",
           "        dist.all_reduce(shares)\n",
           "",
           "under torchrun the logged losses are process 0's share of the batch, not the batch's"),
    Mutant("train.py",
           "    check_directories(out, args)  #",
           "    pass  #",
           "a stage directory run with other settings is refused only after the stages before it trained"),
    Mutant("train.py",
           "    import torch.distributed.nn\n",
           "",
           "under torchrun the process group outlives destroy_process_group; a gloo thread can abort the exit"),
    Mutant("train.py",
           '    if os.path.exists(os.path.join(directory, "projections.safetensors")):  # save_model\'s',
           "    if False:",
           "a Stage-1 student, whose head never trained, is accepted as --teacher"),
    Mutant("train.py",
           '("student_crc32", "--student_init CRC-32"), ',
           "",
           "another model copied to the same --student_init DIR reuses the Stage 1 of the old one"),
    Mutant("mlkd.py",
           "                                 None if paper_exact else mask) for m in range(M + 1))}",
           "                                 mask) for m in range(M + 1))}",
           "--recipe tinybert --paper_exact masks the hidden-state MSE that TinyBERT's code does not"),
    Mutant("train.py",
           "        return mlkd.tinybert_stage1_loss(model(*inputs, scores=True), t, proj, inputs[2], lmap,\n"
           "                                         args.paper_exact)",
           "        return mlkd.tinybert_stage1_loss(model(*inputs, scores=True), t, proj, inputs[2], lmap)",
           "--recipe tinybert ignores --paper_exact (padded keys' scores leave the mean, not zeroed)"),
    Mutant("tools/general_distill.py",
           "        args.student_crc32 = train.crc32(start.state_dict())\n",
           "",
           "general_distill.py reuses a run after another general student took its --student_init DIR"),
    Mutant("train.py",
           '        if model and os.path.exists(os.path.join(model, "log.jsonl")) and not is_done(model):',
           "        if False:",
           "a --teacher still training (its log.jsonl, no metrics.json) is distilled from, half-trained"),
    Mutant("train.py",
           "    lr = 3e-5 if squad else 5e-5",
           "    lr = 5e-5",
           "SQuAD's Stage 1 and 2 train at argparse's 5e-5, not the authors' 3e-5"),
    Mutant("model.py",
           '            n = raw.setdefault("num_labels", len(names) or 2)',
           '            n = raw.setdefault("num_labels", len(names))',
           "a binary classifier saved by HF (no id2label: its default) is refused as 0 labels"),
    Mutant("model.py",
           '            if "label_text" not in raw and n > 1 and any(v != f"LABEL_{k}" for k, v in names.items()):',
           "            if False:",
           "an HF classifier's label names are dropped: MNLI's in another order score mixed up"),
    Mutant("model.py",
           '("is_decoder", False)):  # HF\'s decoder',
           '("hidden_act", "gelu")):  # HF\'s decoder',
           "an HF decoder config (causal attention) loads as our bidirectional BERT"),
    Mutant("model.py",
           'new_ok = (*head, "pooler.") if "head" in config_overrides else "pooler."',
           'new_ok = (*head, "pooler.")',
           "a head the config names but the weights lack is drawn anew, unsaid"),
    Mutant("model.py",
           "        nn.init.zeros_(self.word.weight[c.pad_token_id])",
           "        pass",
           "a fresh BERT's [PAD] row is drawn, not 0 as HF's init"),
    Mutant("experiments/compare.py",
           '    return ", ".join(machine.split(", ")[1:3]) or machine',
           '    return (machine.split(", ") + [""])[1] or machine',
           "CPUs of one model with and without AVX-512 count as one processor"),
    Mutant("tools/convert_tf_checkpoint.py",
           'SKIPPED = r"^cls/|/(adam_[mv]|AdamWeightDecayOptimizer(_1)?)$|^global_step$"',
           'SKIPPED = r"^cls/|/adam_[mv]$|^global_step$"',
           "the converter refuses a checkpoint holding AdamWeightDecayOptimizer slots"),
    Mutant("data.py",
           '(np.argsort(-x, kind="stable")[:n_best] for x in (s_log, e_log))',
           "(np.argsort(-x)[:n_best] for x in (s_log, e_log))",
           "SQuAD spans of equal logits go to whichever position an unstable sort puts first"),
    # a helper's search for tests that could not fail: each of these passed the suite before its test
    Mutant("train.py",
           "    model.train()  # dropout:",
           "    pass  # dropout:",
           "after a dev evaluation (eval mode) the model trains on without dropout"),
    Mutant("train.py",
           "    overrides = dict(evaluation.head_config(args.task), attention_probs_dropout_prob=0.0,",
           "    overrides = dict(evaluation.head_config(args.task),",
           "the student keeps attention dropout: the O that L_MHA reads is dropped out"),
    Mutant("train.py",
           '    ("Stage 2", "stage2"),',
           '    ("Stage 2", ""),',
           "Stage 2's flags change nothing to the settings guard: a stale Stage 2 is reused"),
    Mutant("train.py",
           "    for k in sorted(tensors):",
           '    for k in sorted(set(tensors) - {"labels"}):',
           "the training data's CRC-32 skips the labels: a file of fixed labels reuses old stages"),
    Mutant("train.py",
           "    torch.nn.utils.clip_grad_norm_(params, 1.0)",
           "    torch.nn.utils.clip_grad_norm_(params, 1e9)",
           "the gradient is not clipped to norm 1"),
    Mutant("train.py",
           "metrics[args.metric] > best[args.metric])",
           "metrics[args.metric] >= best[args.metric])",
           "of equal best dev scores the last checkpoint is kept, not the first"),
    Mutant("eval.py",
           '{"dev_matched": "_m", "dev_mismatched": "_mm"}',
           '{"dev_matched": "_mm", "dev_mismatched": "_m"}',
           "MNLI's matched and mismatched accuracies swap names: selection on mismatched"),
    Mutant("eval.py",
           '        elif task in ("mrpc", "qqp"):',
           '        elif task == "mrpc":',
           "QQP gets no F1, its metric"),
    Mutant("train.py",
           "    keep = torch.randperm(len(examples), generator=torch.Generator().manual_seed(42))[:n]",
           "    keep = torch.arange(n)",
           "--train_subset takes the first n rows, not a seeded random draw"),
    Mutant("eval.py",
           "data.atomic_write_text(na_file, json.dumps(na))",
           "data.atomic_write_text(na_file, json.dumps({k: -v for k, v in na.items()}))",
           "SQuAD v2.0's na-prob file holds best - null: the official script's best_* differ"),
    Mutant("data.py",
           "for hop in (*answer.history, answer)]",
           "for hop in (answer,)]",
           "a hub download reads no sha256 from the redirect: a spoiled weights file is kept"),
    Mutant("train.py",
           '            if os.path.exists(os.path.join(directory, "checkpoint.pt")):\n'
           '                os.remove(os.path.join(directory, "checkpoint.pt"))',
           "            pass",
           "a kill inside finish leaves a finished stage's checkpoint.pt for good"),
    Mutant("train.py",
           '"log.jsonl")) and not is_done(model):',
           '"log.jsonl")):',
           "a finished stage (its log.jsonl) is refused as a --teacher/--student_init"),
    Mutant("eval.py",
           "    data.remove_stale_temporaries(args.out)  # what a kill",
           "    pass  # what a kill",
           "a kill inside the write of results.json leaves its temporary in --out for good"),
    Mutant("train.py",
           "        except RuntimeError:  # process 0 left",
           "        except ZeroDivisionError:  # process 0 left",
           "under torchrun an error of process 0 alone is followed by process 1's traceback"),
    Mutant("eval.py",
           "cls.append(out.hidden_states[-1][:, 0].float().cpu().clone())",
           "cls.append(out.hidden_states[-1][:, 0].float().cpu())",
           "on a CPU every batch's (B, L, H) states stay alive until model_outputs returns"),
    Mutant("train.py",
           "    if kd_alone and (args.w_ss or args.w_sc):",
           "    if False:",
           "SQuAD and --recipe tinybert drop an asked-for L_SS or L_SC in silence"),
    Mutant("data.py", "answer[1] < start + n", "answer[1] <= start + n",
           "a SQuAD answer ending one token past a window is labelled in it, its end on [SEP]"),
    Mutant("data.py", "label = (first + answer[0] - start, first", "label = (first + answer[0] - start + 1, first",
           "a SQuAD answer's start label is one token late"),
    Mutant("data.py", "range(0, max(len(c.ids) - room + step, 1), step)", "range(0, max(len(c.ids) - room, 1), step)",
           "SQuAD's last window is dropped: a context's tail is in no window"),
    Mutant("data.py", "tokens = np.nonzero((offsets[:, 1] > begin)", "tokens = np.nonzero((offsets[:, 1] >= begin)",
           "the token that ends where a SQuAD answer begins is taken into its span"),
    Mutant("data.py", "(e - s + 1 <= max_answer)", "(e - s <= max_answer)",
           "a SQuAD answer may hold max_answer + 1 tokens"),
    Mutant("data.py", "ok = valid[s] & valid[e] & ", "ok = valid[s] & ",
           "a SQuAD answer may end outside the context (on [SEP], in the question)"),
    # found by newcomers reading the data, eval, model and flag paths: each survived every test at
    # 44b0461 but 94, 98, 102 and 103, which tests of other things already caught
    Mutant("eval.py", "{labels[p] if labels else f'{p:.3f}'}",
           "{p if labels else f'{p:.3f}'}",
           "GLUE test predictions write label indices: MNLI's and AX's say 0/1/2, QNLI's and RTE's 0/1"),
    Mutant("eval.py", 'names = {"test_matched": "MNLI-m", "test_mismatched": "MNLI-mm"}',
           'names = {"test_matched": "MNLI-mm", "test_mismatched": "MNLI-m"}',
           "MNLI-m.tsv holds the mismatched test predictions and MNLI-mm.tsv the matched"),
    Mutant("eval.py", 'out = model(*(b[k].to(device) for k in ("input_ids", "token_type_ids", "attention_mask")))',
           'out = model(b["input_ids"].to(device), None, b["attention_mask"].to(device))',
           "model_outputs drops token_type_ids: pair tasks are scored (and cached) with segments all 0"),
    Mutant("data.py", '"acc", (67349, 872, 1821), 64, test_cols=(1, None)),',
           '"acc", (67349, 872, 1821), 64),',
           "SST-2's test.tsv is read by train's columns: its index column is the sentence"),
    Mutant("data.py", '"qnli": Task("QNLI", 1, 2,',
           '"qnli": Task("QNLI", 2, 1,',
           "QNLI pairs are encoded (sentence, question), not (question, sentence)"),
    Mutant("data.py", '"mnli": Task("MNLI", 8, 9, -1,',
           '"mnli": Task("MNLI", 8, 9, 10,',
           "MNLI's label is read from label1, the hypothesis writer's, not gold_label, the majority's"),
    Mutant("data.py", "shuffled = torch.randperm(len(by_length), generator=generator).tolist()",
           "shuffled = range(len(by_length))",
           "--group_by_length leaves a run's batches sorted: each run goes from short to long"),
    Mutant("data.py", "have = have if r.status_code == 206 else 0",
           "have = have if r.status_code in (200, 206) else 0",
           "a resumed download that the server answers 200 (Range ignored) is appended to the .part"),
    Mutant("data.py", "types = [0] * first + [1] * (n + 1) + [0] * pad",
           "types = [0] * (first - 1) + [1] * (n + 2) + [0] * pad",
           "SQuAD windows put the [SEP] after the question in segment 1 (run_squad.py: 0)"),
    Mutant("model.py", "out.logits = self.classifier(self.dropout(out.pooled))",
           "out.logits = self.classifier(out.pooled)",
           "no dropout on the pooled [CLS] before the classifier in training"),
    Mutant("mlkd.py", "nn.init.normal_(lin.weight, std=0.02)",
           "nn.init.normal_(lin.weight)",
           "the projections W_m are drawn N(0, 1), not N(0, 0.02)"),
    Mutant("model.py", '"regression" if raw.get("problem_type") == "regression" or n == 1',
           '"regression" if raw.get("problem_type") == "regression"',
           "an HF config with one label and no problem_type is taken for a classifier, not regression"),
    Mutant("eval.py", '"mrpc": ["not_equivalent", "equivalent"]',
           '"mrpc": ["equivalent", "not_equivalent"]',
           "an exported MRPC model's id2label calls label 0 'equivalent'"),
    Mutant("train.py", "generator=torch.Generator().manual_seed(args.seed + epoch),",
           "generator=torch.Generator().manual_seed(args.seed),",
           "every epoch draws the batch order of the first (seeded by --seed, not --seed + epoch)"),
    Mutant("train.py", '    return state["step"], state["best_metrics"], state.get("clock", [0.0, 0])',
           '    return state["step"], None, state.get("clock", [0.0, 0])',
           "a resumed stage forgets its best dev metrics: a worse evaluation is saved over the best model"),
    Mutant("train.py", '        args.group_by_length = False\n',
           '        pass\n',
           "--paper_exact says it ignores --group_by_length, yet the batches are grouped by length"),
    Mutant("eval.py", "with_typos(examples[split], args.noise, args.noise_seed)",
           "with_typos(examples[split], args.noise)",
           "--noise_seed changes only the file names: every seed gets seed 0's typos"),
    Mutant("eval.py", "preds = logits.argmax(-1).tolist() if labels else logits[:, 0].tolist()",
           "preds = logits.argmax(-1).tolist()",
           "STS-B's test predictions are the argmax of one column: every score 0.000"),
    Mutant("eval.py", "length = args.speed_length or args.max_len  # the max_len said above",
           'length = trained.get("max_len") or args.speed_length or args.max_len  # the max_len said above',
           "--speed ignores --speed_length for a model train.py saved: it times the trained max_len"),
    Mutant("tools/general_distill.py", '        proj.load_state_dict(state)\n',
           '        pass\n',
           "general distillation going on from a General student starts fresh projections W_m"),
    Mutant("tools/pages.py", "xy = [(64 + 480 * s / last, 100 * (hi - v) / (hi - lo)) for s, v in pts]  # in the panel",
           "xy = [(64 + 480 * k / max(1, len(pts) - 1), 100 * (hi - v) / (hi - lo)) for k, (s, v) in enumerate(pts)]",
           "a curve's points are spaced by record, not by step: dev points land at other steps"),
    Mutant("tools/relations.py", 'kind, splits = trained.get("layer_map", "uniform"), trained.get("splits", 12)',
           'kind, splits = "uniform", trained.get("splits", 12)',
           "a student trained with --layer_map last is drawn with the uniform map's layer pairs"),
    Mutant("tools/relations.py", 'temperature = trained.get("mha_temperature", 1.0) if args.mha_temperature is None \\',
           'temperature = 1.0 if args.mha_temperature is None \\',
           "a student trained with --mha_temperature 0.5 is drawn at temperature 1"),
    Mutant("train.py", 't0 += took  # samples/s counts training time alone',
           'pass  # samples/s counts training time alone',
           "train_s and samples/s count the dev evaluations' seconds as training time"),
    Mutant("train.py", 'if (improved or step % args.save_steps == 0) and step < total and LEAD:',
           'if (improved or step % args.log_steps == 0) and step < total and LEAD:',
           "checkpoint.pt is written every --log_steps steps, not every --save_steps"),
    # general_distill.py's held-out windows and losses (survivors of every test at dad71a7)
    Mutant("tools/general_distill.py", "order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))",
           "order = torch.arange(n)", "the held-out windows are the corpus's first 1%, its first documents"),
    Mutant("tools/general_distill.py", "k = min(1000, max(1, n // 100))", "k = max(1, n // 100)",
           "no cap of 1000 held-out windows: a large corpus spends its evaluations on 1% of it"),
    Mutant("tools/general_distill.py", "torch.Generator().manual_seed(seed))", "torch.Generator().manual_seed(0))",
           "the held-out draw ignores --seed"),
    Mutant("tools/general_distill.py", "@torch.no_grad()\ndef heldout_losses(", "def heldout_losses(",
           "the held-out losses build an autograd graph for every batch: memory and time for nothing"),
    Mutant("tools/convert_tf_checkpoint.py", "14: torch.bfloat16,", "14: torch.float16,",
           "a bfloat16 tensor of a TF checkpoint is read as float16: its bits mean other numbers"),
    # a newcomer's review of train.py at d5457eb (no test failed on any of these)
    Mutant("train.py", "(max(1, N // 2) if source is teacher else N)", "(N // 2 if source is teacher else N)",
           "half of a one-layer teacher is a zero-layer student: a ZeroDivisionError traceback"),
    Mutant("train.py", "return path(text) if os.path.exists(text) and text not in STUDENT_INITS else text",
           "return path(text) if os.path.exists(text) else text",
           "a folder named tinybert in the working directory silently replaces --student_init's default"),
    Mutant("train.py", '* (1 if sys.platform == "darwin" else 1024)) / 2**30', "* 1024) / 2**30",
           "macOS's ru_maxrss (bytes) read as KiB: a peak memory 1024 times too large"),
    Mutant("train.py", "        same_settings(\"stage2\", out[\"stage2\"], args)  # a student of another teacher",
           "        pass  # a student of another teacher",
           "--stages eval reports a retrained teacher beside the student distilled from the teacher before"),
    # newcomers' reviews of model.py, mlkd.py, eval.py, data.py and tools/ at 1ca5873
    Mutant("mlkd.py", 'if kind in ("uniform", "last") and M > N:', 'if kind == "last" and M > N:',
           "a uniform map onto a shallower teacher gives g(m) = 0: L_MHA then reads the teacher's last layer"),
    Mutant("tools/relations.py", "and not numbers_of_a_page(numbers):", "and not numbers.endswith('.json'):",
           "--out MODEL/config.html rewrites (or removes) the model's config.json"),
    Mutant("tools/relations.py", '*(task for task in data.TASKS if task != "ax"), "squad1", "squad2"])',
           '*data.TASKS, "squad1", "squad2"])', "--task ax is offered, and fails after both models are read"),
    Mutant("data.py", 'bad = e.start + 3 * (encoding == "utf-8-sig" and raw.startswith(b"\\xef\\xbb\\xbf"))',
           "bad = e.start", "a bad byte after MRPC's byte-order mark is named 3 bytes early, often on another line"),
    Mutant("eval.py", "length = args.speed_length or args.max_len  # the max_len said above",
           'length = args.speed_length or trained.get("max_len", min(128, positions))',
           "--speed times another length than the --max_len it printed (and than --max_len given)"),
    Mutant("tools/convert_tf_checkpoint.py", "{to_hf_name(k) for k in bert.state_dict()} - set(state))",
           "set(state) - {to_hf_name(k) for k in bert.state_dict()})",
           "a checkpoint without its pooler converts, a random pooler saved as if it were Google's"),
    Mutant("model.py", "except (OSError, ValueError, AttributeError, TypeError) as e:",
           "except (OSError, ValueError) as e:", "a config.json whose id2label is a list: a traceback, not one line"),
    # experiments/record.py's general distillation (the final review at 59f4d7b: no test failed on these)
    Mutant("experiments/record.py", 'script = flags.pop(0) if flags[0] == GENERAL else "train.py"',
           'script = "train.py"', "a general-distillation record runs train.py with general_distill.py's flags"),
    Mutant("experiments/record.py",
           'if subprocess.run([*tool, "--vocab", os.path.join(mini, "vocab.txt")]).returncode:',
           "if subprocess.run(tool).returncode:", "the record's corpus is written without counting its word pieces"),
    Mutant("experiments/record.py", "return results if results is not None else general if general and general.get(",
           "return results if results is not None else None if general and general.get(",
           "a finished general-distillation run is run again, and cannot be recorded"),
    # a newcomer's review of eval.py's metrics and data.py's readers at 9cd50ef
    Mutant("data.py", "width = (len(rows[0]) if rows else 0) if header else 4",
           "width = len(rows[0]) if rows else 0",
           "CoLA's width is its first row's: one bad first row drops every other row"),
    Mutant("data.py", "if not (test or t.labels or 0 <= label <= 5):", "if False:",
           "an STS-B score of nan, inf or 4_0 (40) is read as a score"),
    Mutant("data.py", "if len(ids) < len(examples):", "if False:",
           "two SQuAD questions of one id are scored as one (the official script scores both)"),
    Mutant("eval.py", "if not (logits.isfinite().all() and cls.isfinite().all()):", "if False:",
           "a diverged model is scored: argmax picks the first NaN, a NaN ranks low in Spearman"),
    # a newcomer's runs of train.py (kills, reruns, flags) at 9cd50ef
    Mutant("train.py", '    args.dev_crc32 = f"{zlib.crc32(repr(dev_examples).encode()):08x}"',
           "    args.dev_crc32 = None", "a teacher selected on another dev file is reused: --data_dir "
           "and --allow_partial change nothing, their group says"),
    Mutant("train.py", 'if key == "dev_crc32" and stage == "stage1":', "if False:",
           "Stage 1, which selects nothing on dev, is refused for another dev file"),
    Mutant("train.py", 'os.path.exists(os.path.join(model, "log.jsonl")) and not is_done(model)',
           'os.path.exists(os.path.join(model, "checkpoint.pt")) and not is_done(model)',
           "a teacher killed before its first checkpoint (its best-so-far model) is taken as finished"),
    Mutant("eval.py", 'if os.path.exists(os.path.join(directory, "log.jsonl")) and not os.path.exists(',
           'if os.path.exists(os.path.join(directory, "checkpoint.pt")) and not os.path.exists(',
           "eval.py scores a stage killed before its first checkpoint without a note"),
    Mutant("train.py", "(total - step) * (time.time() - wall0) / (step - step0) / 60",
           "(total - step) * took / step / 60", "the ETA leaves out the evaluations' time"),
    # a newcomer's runs of tools/ and experiments/ at efa204c
    Mutant("experiments/compare.py", 'return f"its command does not parse here ({said.getvalue().strip()})"',
           "return None", "a row whose command does not parse here is recorded, its settings not compared"),
    Mutant("experiments/compare.py", '[out if flag in ("--teacher", "--student_init") and not os.path.isdir(value)',
           '[out if flag in ("--teacher",) and not os.path.isdir(value)',
           "a row whose --student_init is not on this machine cannot be compared, so cannot be recorded"),
    Mutant("experiments/record.py", '    script = flags.pop(0) if flags[0] == GENERAL else "train.py"\n',
           '    script = flags.pop(0) if flags[0] == GENERAL else "train.py"\n'
           "    if finished(out) is not None:\n        return out\n",
           "a finished record run is kept unchecked: another --data_dir's rerun records the old numbers"),
    Mutant("experiments/record.py", 'for s in stages.split(",") if s != "eval")]', 'for s in stages.split(","))]',
           "a finished record run's rerun scores dev anew (minutes for SQuAD)"),
    Mutant("tools/pages.py", 'type(r.get("step")) is int and isinstance(r.get("dev", {}), dict)', '"step" in r',
           'a log record {"step": null} or {"dev": 5} is a traceback, not a line skipped'),
    # a newcomer's runs under torchrun at c470d8e
    Mutant("train.py", "if not all(map(math.isfinite, losses.values())):", "if not torch.isfinite(loss):",
           "a NaN in one process's rows stops it alone: the other's all_reduce fails, a [rank] traceback"),
    Mutant("train.py", "        kept = [r for r in data.read_text(log).splitlines(keepends=True)",
           "        kept = [] if not LEAD else [r for r in data.read_text(log).splitlines(keepends=True)",
           "process 0 alone reads the log at a resume: a bad line stops it alone, a [rank1] traceback"),
    Mutant("train.py", "if (improved or step % args.save_steps == 0) and step < total and LEAD:",
           "if step % args.save_steps == 0 and step < total and LEAD:",
           "a resume goes on from an older best than the saved model's: metrics.json's best is not its"),
    # a newcomer's runs of SQuAD at c470d8e
    Mutant("data.py", "if kept and max_len < max(kept) + 4:", "if kept and max_len < kept[0] + 4:",
           "--max_len's refusal names the first question's bound: a retry at it fails on a longer one"),
    Mutant("train.py", 'return ",".join(path(f.strip()) for f in text.split(","))',
           'return ",".join(path(f) for f in text.split(","))',
           '--train_file "A, B" reads " B" in the working folder'),
]


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def mutated_text(mutant, root=ROOT):
    """The text of the mutant's file with its change made; a ValueError when `old` is not there
    exactly once, or when the change makes a line longer than MAX_LINE."""
    text = read(os.path.join(root, mutant.file))
    count = text.count(mutant.old)
    if count != 1:
        raise ValueError(f"{mutant.file}: the old text occurs {count} times, not once; the code "
                         "has moved: rewrite this mutant against the new code")
    new_text = text.replace(mutant.old, mutant.new)
    longest = max(len(line) for line in new_text.splitlines())
    if longest > MAX_LINE:
        raise ValueError(f"{mutant.file}: the change makes a line {longest} characters long, which "
                         "the line-length test would catch; shorten the mutant")
    return new_text


def copy_repo(destination):
    """Copy the tracked files (as they are in the working tree) and testdata/ into destination."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split("\0")
    for directory, _, files in os.walk(os.path.join(ROOT, "testdata")):
        listed += [os.path.relpath(os.path.join(directory, f), ROOT) for f in files]
    for name in set(listed):
        source = os.path.join(ROOT, name)
        if name and os.path.isfile(source) and "__pycache__" not in name:
            target = os.path.join(destination, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(source, target)


def test_environment():
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    # The copy is not next to the repository's ../shared/data, where the tests look for the real
    # GLUE/SQuAD files by default: point them at it, unless MLKD_SHARED_DATA says otherwise.
    shared = os.path.join(os.path.dirname(ROOT), "shared", "data")
    if "MLKD_SHARED_DATA" not in env and os.path.isdir(shared):
        env["MLKD_SHARED_DATA"] = shared
    return env


def first_failure(output):
    """The first failing test in pytest's short summary: its name, a newline, the start of its
    message ("test_layer_map\nassert [0, 1, 3] == [0, 2, 3]"); '' when none is named."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            name, _, message = line.split(" ", 1)[1].partition(" - ")
            message = message if len(message) <= 60 else message[:57] + "..."
            return name.split("::", 1)[-1] + ("\n" + message if message else "")
    return ""


def run_suite(mutant=None, timeout=1800):
    """Run the test suite on a copy of the repository, with the mutant's change made when one is
    given. Returns (result, first failing test, seconds): result is "passed" or "failed", or
    "broken" when pytest could not run the tests at all (an import error, say)."""
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="mlkd-mutant-") as copy:
        copy_repo(copy)
        if mutant is not None:
            with open(os.path.join(copy, mutant.file), "w", encoding="utf-8") as f:
                f.write(mutated_text(mutant))
        # test_every_miswiring_... fails in every mutated copy (the mutant's old text is gone there):
        # no catch of a miswiring, so it is left out
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--deselect",
                   "test_mlkd.py::test_every_miswiring_of_tools_mutate_still_applies"]
        try:
            done = subprocess.run(command, cwd=copy, env=test_environment(), timeout=timeout,
                                  capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return "failed", f"(timed out after {timeout} s)", time.time() - start
    seconds = time.time() - start
    if done.returncode == 0:
        return "passed", "", seconds
    if done.returncode == 1:
        return "failed", first_failure(done.stdout), seconds
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
    return "broken", f"pytest exit status {done.returncode}:\n{tail}", seconds


def parse_only(text):
    try:
        numbers = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of mutant numbers, got {text}")
    bad = [n for n in numbers if not 1 <= n <= len(MUTANTS)]
    if bad or not numbers:
        raise argparse.ArgumentTypeError(f"mutant numbers run from 1 to {len(MUTANTS)}, got {text}")
    return numbers


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="list the mutants and whether each applies")
    p.add_argument("--only", type=parse_only, help="run these mutants only, e.g. 3,17")
    p.add_argument("--keep-going", action="store_true",
                   help="run every mutant even after a survivor (default: stop at the first)")
    args = p.parse_args(argv)
    numbers = args.only or list(range(1, len(MUTANTS) + 1))

    stale = {}
    for n in numbers:
        try:
            mutated_text(MUTANTS[n - 1])
        except ValueError as e:
            stale[n] = str(e)
    if args.list:
        for n in numbers:
            m = MUTANTS[n - 1]
            print(f"{n:3d}  {m.file:9s} {'STALE ' if n in stale else ''}{m.why}")
        for n, why in stale.items():
            print(f"mutant {n}: {why}")
        return 1 if stale else 0
    if stale:
        for n, why in stale.items():
            print(f"mutant {n}: {why}", file=sys.stderr)
        print("error: fix the mutants above first (none was run)", file=sys.stderr)
        return 2

    print(f"the unmutated suite first (it must pass), then {len(numbers)} mutants, one at a time",
          flush=True)
    started = time.time()
    result, failing, seconds = run_suite()
    if result != "passed":
        print(f"error: the unmutated suite does not pass ({failing or result}, {seconds:.0f} s); "
              "a mutant run would mean nothing", file=sys.stderr)
        return 2
    print(f"unmutated: passed in {seconds:.0f} s", flush=True)

    rows = []
    for n in numbers:
        m = MUTANTS[n - 1]
        result, failing, seconds = run_suite(m)
        verdict = {"failed": "caught", "passed": "SURVIVED", "broken": "BROKEN"}[result]
        rows.append((n, m, verdict, failing, seconds))
        print(f"{n:3d}  {verdict:8s} {seconds:5.0f} s  {m.file:9s} {m.why}", flush=True)
        if verdict == "BROKEN":
            print(f"     the mutant does not even run: fix it\n{failing}", flush=True)
        if verdict != "caught" and not args.keep_going:
            print("stopped at the first mutant the suite did not catch "
                  "(--keep-going runs them all)")
            break

    print(f"\n  #  result   {'seconds':>7s}  file       mistake / first failing test")
    for n, m, verdict, failing, seconds in rows:
        print(f"{n:3d}  {verdict:8s} {seconds:7.0f}  {m.file:9s}  {m.why}")
        if verdict == "caught":
            name, _, message = failing.partition("\n")
            print(f"{'':34s}by {name or '(no test named)'}")
            if message:
                print(f"{'':37s}{message}")
    caught = sum(1 for row in rows if row[2] == "caught")
    print(f"\n{len(rows)} mutants in {(time.time() - started) / 60:.0f} minutes, "
          "the unmutated suite's run included")
    print(f"caught {caught} of {len(rows)}")
    all_run_and_caught = len(rows) == len(numbers) and caught == len(rows)
    return 0 if all_run_and_caught else 1


if __name__ == "__main__":
    sys.exit(main())
