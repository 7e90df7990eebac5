"""Bad input of every kind ends in one of two outcomes: a message naming the key, file or file:line and
a non-zero exit, or (on_error='skip') a counted skip. Never a traceback, never silent acceptance, and
no typo deletes what the tool did not write."""
import json
import math
import os
import sys
from collections import Counter

import numpy as np
import pytest
import torch

import batches
import chat_data
import evaluate
import prepare
import sample
import train
from configurator import configure
from conftest import TINY, read_metrics, run_script, write_pretrain_data
from tokenizer import load_tokenizer

BYTES = load_tokenizer("bytes")


def refusal(fn, capsys):
    """The message of the SystemExit that fn raises (sys.exit('...') or fail(), which prints first)."""
    with pytest.raises(SystemExit) as e:
        fn()
    assert e.value.code not in (0, None)
    return e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err


# --------------------------------------------------------------------------- config values, by key

TRAIN_BAD = [
    ("grad_clip", -1.0), ("block_size", 0), ("n_embd", 0), ("n_layer", 0), ("n_head", 0), ("n_kv_head", 0),
    ("gradient_accumulation_steps", 0), ("log_interval", 0), ("batch_size", 0), ("eval_iters", 0),
    ("learning_rate", 0.0), ("learning_rate", math.inf), ("learning_rate", math.nan), ("beta1", 1.0),
    ("beta2", -0.1), ("dropout", 1.0), ("weight_decay", -1.0), ("warmup_iters", -2), ("min_lr", -0.5),
    ("max_iters", -1), ("spike_factor", -1.0), ("max_bad_steps", 0), ("beta", 0.0), ("label_smoothing", 0.5),
    ("out_dir", ""), ("out_dir", "/"), ("dataset", ""), ("dtype", "fp16"), ("mode", "ppo"), ("rope_theta", 0.0),
    ("norm_eps", -1.0), ("hidden_dim", -1), ("n_embd", 30), ("n_kv_head", 3), ("dist_timeout", 0.0),
    ("peak_flops", -1.0), ("init_from", ""), ("rl_samples", 1), ("rl_temperature", 0.0), ("rl_max_new_tokens", 0),
    ("rl_advantage", "ppo"), ("rl_tasks", ["nope"]),
]


@pytest.mark.parametrize("key, value", TRAIN_BAD)
def test_train_refuses_out_of_range_values(key, value, capsys):
    cfg = {**train.defaults, key: value}
    message = refusal(lambda: train.check_config(cfg, 1), capsys)
    assert key in message, message


PREPARE_BAD = [
    ("bands", 0), ("bands", 3), ("out_dir", ""), ("markup", {"web": "rtf"}), ("val_fraction", 0.0),
    ("val_fraction", 1.0), ("vocab_size", 100), ("vocab_size", 70000), ("jaccard_threshold", 0.0),
    ("num_perm", 0), ("shingle_size", 0), ("chunk_mb", 0.0), ("num_workers", -1), ("tasks", ["nope"]),
    ("min_chars", -1), ("mix_temperature", 0.0), ("kind", "rlhf"), ("tokenizer", "sentencepiece"),
    ("on_error", "ignore"), ("language", "xx"), ("mix_weights", {"a": -1.0}), ("shards", 0),
    ("text_field", ""), ("min_alpha_ratio", 1.5), ("retries", -1), ("block_size", 0), ("too_long", "cut"),
    ("min_score_margin", -1.0), ("hub_url", ""),
]


@pytest.mark.parametrize("key, value", PREPARE_BAD)
def test_prepare_refuses_out_of_range_values(key, value, capsys):
    cfg = {**prepare.defaults, key: value}
    message = refusal(lambda: prepare.check_config(cfg), capsys)
    assert key in message, message
    if key == "too_long":  # preference pairs cannot be cut at a turn
        message = refusal(lambda: prepare.check_config({**prepare.defaults, "kind": "dpo", key: "truncate"}), capsys)
        assert "too_long='truncate' must be 'error' or 'drop', or for kind='sft' 'truncate'" in message


@pytest.mark.parametrize("module, args, key", [
    (sample, ["--num_samples=0"], "num_samples"), (sample, ["--top_p=0"], "top_p"),
    (sample, ["--top_p=1.5"], "top_p"), (sample, ["--temperature=-1"], "temperature"),
    (sample, ["--dtype=fp16"], "dtype"), (sample, ["--start=FILE:/no/such/prompt.txt"], "No such file"),
    (evaluate, ["--tasks=['nope']"], "tasks"), (evaluate, ["--tasks_n=-1"], "tasks_n"),
])
def test_sample_and_evaluate_refuse_bad_values(module, args, key, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["x.py", "--out_dir=/no/such/run", *args])
    assert key in refusal(module.main, capsys)


@pytest.mark.parametrize("content", [b"garbage" * 10, b"", None])
def test_sample_names_a_checkpoint_it_cannot_use(tmp_path, content, monkeypatch, capsys):
    if content is None:
        torch.save({"model": {}}, tmp_path / "ckpt.pt")  # a torch file, not train.py's checkpoint
    else:
        (tmp_path / "ckpt.pt").write_bytes(content)
    monkeypatch.setattr(sys, "argv", ["sample.py", f"--out_dir={tmp_path}"])
    assert "ckpt.pt' cannot be loaded" in refusal(sample.main, capsys)


def test_help_lists_keys_with_their_comments_and_a_typo_gets_a_suggestion(capsys):
    r = run_script("train.py", "--help")
    assert r.returncode == 0 and "usage: python train.py" in r.stdout
    assert "grad_clip=1.0" in r.stdout and "0 = off" in r.stdout  # a comment beside a train.py default
    assert "n_kv_head=4" in r.stdout and "multi-query" in r.stdout  # and beside a GPTConfig field
    assert run_script("prepare.py", "-h").returncode == 0
    message = refusal(lambda: configure(train.defaults, ["--learnin_rate=1e-3"]), capsys)
    assert "did you mean 'learning_rate'?" in message


def test_config_file_errors_name_the_line(tmp_path, capsys):
    (tmp_path / "c.py").write_text("batch_size = 4\nlearning_rate = 1 / 0\n")
    message = refusal(lambda: configure(train.defaults, [str(tmp_path / "c.py")]), capsys)
    assert "c.py', line 2: ZeroDivisionError" in message


# --------------------------------------------------------------------------- chat records

SFT_BAD = [
    ('[{"role": "user", "content": "hi"}]', "does not end with an assistant turn"),
    ("[]", "does not end with an assistant turn"),
    ('[{"role": "system", "content": "s"}]', "does not end with an assistant turn"),
    ('{"instruction": "a", "input": [1, 2], "output": "b"}', "'input' must be a string"),
    ('{"instruction": "a"}', "without its 'output' field"),
    ('{"messages": ["hi"]}', "a turn must be an object"),
    ('{"messages": "hi"}', "'messages' must be a list"),
    ('{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "x"}]}', "must be a string"),
    ('{"conversations": [{"from": "bot", "value": "x"}]}', "unknown role 'bot'"),
    ('"just a string"', "a record must be an object"),
    ("{not json", "Expecting property name"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (json.dumps({"instruction": "long " * 100, "output": "x"}), "longer than block_size"),
]
DPO_BAD = [
    ('{"prompt": "p", "chosen": "same", "rejected": "same"}', "are the same"),
    ('[{"prompt": "p"}]', "must be an object"),
    ('{"prompt": "p", "chosen": "a"}', "missing field 'rejected'"),
    ('{"prompt": ["x"], "chosen": "a", "rejected": "b"}', "a turn must be an object"),
    ('{"prompt": "p", "chosen": "", "rejected": "b"}', "empty 'chosen' reply"),
]


@pytest.mark.parametrize("kind, line, message", [("sft", *c) for c in SFT_BAD] + [("dpo", *c) for c in DPO_BAD])
def test_bad_chat_records_are_named_or_counted(kind, line, message):
    render = chat_data.render_sft if kind == "sft" else chat_data.render_pair
    cfg = {"block_size": 128, "too_long": "error", "on_error": "raise", "min_score_margin": 0.0}
    items = [("chat.jsonl:7", line)]
    with pytest.raises(chat_data.DataError) as e:  # prepare.py prints it and exits non-zero
        list(chat_data.rendered(items, lambda rec: render(BYTES, rec, cfg, Counter()), cfg, Counter()))
    assert str(e.value).startswith("chat.jsonl:7: ") and message in str(e.value), e.value
    skipped = Counter()
    out = chat_data.rendered(items, lambda rec: render(BYTES, rec, cfg, Counter()), {**cfg, "on_error": "skip"},
                             skipped)
    assert list(out) == [] and sum(skipped.values()) == 1


def test_too_long_conversations_truncate_drop_or_stop():
    msgs = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2 " * 60}]
    notes, cfg = Counter(), {"block_size": 100, "too_long": "truncate"}
    ids, mask = chat_data.render_sft(BYTES, msgs, cfg, notes)
    assert BYTES.decode(ids) == "<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
    assert notes["truncated"] == 1
    with pytest.raises(ValueError, match="too_long='truncate' keeps the turns that fit"):
        chat_data.render_sft(BYTES, msgs, {**cfg, "too_long": "error"}, notes)
    with pytest.raises(ValueError, match="longer than block_size"):  # not even the first exchange fits
        chat_data.render_sft(BYTES, msgs, {**cfg, "block_size": 10}, notes)
    assert chat_data.render_sft(BYTES, msgs, {**cfg, "too_long": "drop"}, notes) is None and notes["dropped"] == 1


def test_chat_sources_read_line_separators_a_bom_and_count_bad_bytes(tmp_path):
    rec = {"messages": [{"role": "user", "content": "a\u2028b\u2029c\u0085d"}, {"role": "assistant", "content": "ok"}]}
    raw = "\ufeff".encode() + (json.dumps(rec, ensure_ascii=False) + "\n").encode() + b'{"x": "\xe9t\xe9"}\n'
    (tmp_path / "c.jsonl").write_bytes(raw)
    replaced = Counter()
    records = list(chat_data.read_records(str(tmp_path / "c.jsonl"), replaced))
    assert len(records) == 2 and chat_data.to_messages(json.loads(records[0][1]))[0]["content"] == "a\u2028b\u2029c\u0085d"
    assert replaced == {str(tmp_path / "c.jsonl"): 2}


# --------------------------------------------------------------------------- datasets train.py reads

def corrupt(data, how):
    """Damage a byte-level pretraining dataset one way."""
    meta = json.loads((data / "meta.json").read_text())
    if how == "truncated_meta":
        (data / "meta.json").write_text(json.dumps(meta)[:20])
    elif how in ("vocab_string", "vocab_null"):
        (data / "meta.json").write_text(json.dumps({**meta, "vocab_size": "260" if how == "vocab_string" else None}))
    elif how == "odd_length":
        with open(data / "train.bin", "ab") as f:
            f.write(b"\0")
    elif how == "empty_val":
        (data / "val.bin").write_bytes(b"")
    elif how == "mid_file_id":
        ids = np.fromfile(data / "train.bin", dtype=np.uint16)
        ids[len(ids) // 2] = 300  # far from both ends
        ids.tofile(data / "train.bin")
    elif how == "count_mismatch":
        (data / "meta.json").write_text(json.dumps({**meta, "train_tokens": 5}))
    elif how == "tokenizer_escape":
        (data.parent / "secret.json").write_text('{"api_key": "k", "ranks": []}')
        (data / "meta.json").write_text(json.dumps({**meta, "tokenizer": {"kind": "bpe", "path": "../secret.json"}}))
    elif how == "specials_out_of_range":
        (data / "meta.json").write_text(json.dumps({**meta, "special_tokens": {"<|pad|>": 999}}))


@pytest.mark.parametrize("how, message", [
    ("truncated_meta", "meta.json' is not valid JSON"), ("vocab_string", "vocab_size must be an integer"),
    ("vocab_null", "vocab_size must be an integer"), ("odd_length", "not a whole number of uint16"),
    ("empty_val", "val.bin' holds 0 tokens"), ("mid_file_id", "holds token id 300"),
    ("count_mismatch", "says train_tokens=5"), ("tokenizer_escape", "must name a file inside"),
    ("specials_out_of_range", "special_tokens must map names to ids below vocab_size"),
])
def test_damaged_pretraining_data_is_named(tiny_data, how, message):
    corrupt(tiny_data / "data" / "tiny", how)
    r = run_script("train.py", *TINY, f"--data_root={tiny_data}/data", f"--out_dir={tiny_data}/o", "--max_iters=1")
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "api_key" not in r.stderr and not (tiny_data / "o" / "ckpt.pt").exists()


def test_a_vocabulary_far_above_the_ids_is_pointed_out(tiny_data, capsys):
    write_pretrain_data(tiny_data / "data" / "tiny", vocab_size=60000)
    train.train(in_process(tiny_data, max_iters=1))
    assert "no token id exceeds 122" in capsys.readouterr().err


def sft_dir(tmp_path):
    """A valid SFT dataset (prepare.py's output) to damage."""
    tok = tmp_path / "pre"
    write_pretrain_data(tok)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"instruction": f"q{i}", "output": "a"}) for i in range(30)))
    r = run_script("prepare.py", "--kind=sft", f"--tokenizer_from={tok}", f"--sources={{'c': '{tmp_path}/c.jsonl'}}",
                   f"--out_dir={tmp_path}/data/sft", "--block_size=64", "--val_fraction=0.3")
    assert r.returncode == 0, r.stderr
    return tmp_path / "data" / "sft"


def test_damaged_sft_data_is_named(tmp_path):
    data = sft_dir(tmp_path)
    run = ["train.py", "--mode=sft", "--dataset=sft", f"--data_root={tmp_path}/data", f"--out_dir={tmp_path}/o",
           "--n_layer=1", "--n_head=2", "--n_kv_head=1", "--n_embd=32", "--block_size=64", "--max_iters=1"]
    meta = json.loads((data / "meta.json").read_text())
    for damage, message in [
        (lambda: os.rename(data / "val.idx", data / "v"), "val.idx' not found"),
        (lambda: os.rename(data / "v", data / "val.idx"), None),
        (lambda: os.rename(data / "train.mask.bin", data / "m"), "train.mask.bin' not found"),
        (lambda: os.rename(data / "m", data / "train.mask.bin"), None),
        (lambda: (np.fromfile(data / "train.idx", dtype=np.int64) + 1).tofile(data / "t"), None),
        (lambda: (os.rename(data / "train.idx", data / "good"), os.rename(data / "t", data / "train.idx")),
         "train.idx' does not index its token file"),
        (lambda: os.replace(data / "good", data / "train.idx"), None),
        (lambda: (data / "meta.json").write_text(json.dumps({**meta, "special_tokens": {}})), "no special token '<|pad|>'"),
        (lambda: (data / "meta.json").write_text(json.dumps({**meta, "train_examples": 1})), "says train_examples=1"),
    ]:
        damage()
        if message:
            r = run_script(*run)
            assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


# --------------------------------------------------------------------------- what exists is kept

def test_prepare_and_export_replace_only_what_they_wrote(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    for script, key in (("prepare.py", "--out_dir"), ("export.py", "--out")):
        extra = ["--kind=sft", f"--tokenizer_from={tmp_path}"] if script == "prepare.py" else [f"--ckpt={tmp_path}/x"]
        r = run_script(script, f"{key}={tmp_path}/data", "--overwrite=True", *extra)
        assert r.returncode != 0 and "not replacing it" in r.stderr, r.stderr
        assert (tmp_path / "data" / "notes.txt").read_text() == "mine"
    r = run_script("prepare.py", "--out_dir=.", "--overwrite=True", cwd=tmp_path / "data")
    assert r.returncode != 0 and (tmp_path / "data" / "notes.txt").exists()


def in_process(root, **kw):
    cfg = configure(train.defaults, TINY + [f"--data_root={root}/data", f"--out_dir={root}/out"])
    return {**cfg, "eval_interval": 2, "max_iters": 4, **kw}


def test_a_new_run_never_silently_replaces_a_checkpoint(tiny_data, capsys):
    train.train(in_process(tiny_data))
    before = (tiny_data / "out" / "ckpt.pt").read_bytes()
    message = refusal(lambda: train.train(in_process(tiny_data, max_iters=2)), capsys)
    assert "init_from=resume" in message and "--overwrite=True" in message
    assert (tiny_data / "out" / "ckpt.pt").read_bytes() == before
    train.train(in_process(tiny_data, max_iters=2, overwrite=True))
    assert torch.load(tiny_data / "out" / "ckpt.pt", weights_only=True)["iter_num"] == 2
    assert [r["iter"] for r in read_metrics(tiny_data / "out") if "val_loss" in r] == [0, 2]  # a new curve


def test_resume_leaves_one_curve_in_metrics(tiny_data):
    train.train(in_process(tiny_data, stop_at_iter=2))
    with open(tiny_data / "out" / "metrics.jsonl", "a") as f:  # what a run killed after its checkpoint wrote
        f.write(json.dumps({"iter": 3, "loss": 9.9}) + "\n")
    train.train(in_process(tiny_data, init_from="resume"))
    resumed = read_metrics(tiny_data / "out")
    train.train(in_process(tiny_data, overwrite=True))
    straight = read_metrics(tiny_data / "out")
    assert [(r["iter"], sorted(r)) for r in resumed] == [(r["iter"], sorted(r)) for r in straight]


def test_a_diverged_run_saves_no_non_finite_checkpoint(tiny_data, monkeypatch, capsys):
    train.train(in_process(tiny_data, max_iters=2))
    good = torch.load(tiny_data / "out" / "ckpt.pt", weights_only=True)
    calls, next_token_loss = [], train.next_token_loss

    def diverging(model, batch):  # the weights blow up during the third training step
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 1:
                with torch.no_grad():
                    next(model.parameters()).fill_(math.inf)
        return next_token_loss(model, batch)
    monkeypatch.setattr(train, "next_token_loss", diverging)
    with pytest.raises(SystemExit):
        train.train(in_process(tiny_data, init_from="resume", max_iters=9, eval_interval=1, always_save_checkpoint=True))
    out, err = capsys.readouterr()
    assert "iter 3: not saving a checkpoint: non-finite val loss (the checkpoint of iter 2 is kept)" in out, out
    assert "bad steps in a row" in err and "the checkpoint of iter 2 is kept" in err
    kept = torch.load(tiny_data / "out" / "ckpt.pt", weights_only=True)
    assert kept["iter_num"] == 2 and all(torch.equal(kept["model"][k], good["model"][k]) for k in good["model"])


def test_resume_does_not_rescan_the_token_files(tiny_data, monkeypatch):
    scans = []
    scan_max = batches.scan_max
    monkeypatch.setattr(batches, "scan_max", lambda path: scans.append(path) or scan_max(path))
    train.train(in_process(tiny_data, stop_at_iter=2))
    assert len(scans) == 2 and len(torch.load(tiny_data / "out" / "ckpt.pt", weights_only=True)["scanned_files"]) == 2
    train.train(in_process(tiny_data, init_from="resume"))
    assert len(scans) == 2  # the resumed run trusted the checkpoint's record
    os.utime(tiny_data / "data" / "tiny" / "val.bin", ns=(1, 1))  # the file changed: read it again
    train.train(in_process(tiny_data, init_from="resume", max_iters=6))
    assert len(scans) == 3
