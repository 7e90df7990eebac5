"""side_by_side.py driven through its standard input: blind labels, votes saved at once as preference
records prepare.py reads, the win rate, and Ctrl-C keeping every vote given."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import side_by_side
from conftest import ROOT, run_script
from model import GPT, GPTConfig
from engine import chat_replies

PROMPTS = ["Is fire hot?", "Name a color.", "What is 2 + 2?", "Say hello."]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ab")
    for name, seed in (("one", 4), ("two", 6)):  # untied random heads: replies of a few varied bytes
        torch.manual_seed(seed)
        model = GPT(GPTConfig(vocab_size=260, block_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=32,
                              tie_embeddings=False))
        checkpoint.save({"model": model.state_dict(), "model_config": model.config.__dict__,
                         "tokenizer": {"kind": "bytes"}}, str(root / name))
    (root / "prompts.txt").write_text("\n".join(PROMPTS[:2] + [""] + PROMPTS[2:]) + "\n")
    return root


def replies(path):
    model, enc, _ = checkpoint.load_model(str(path))
    return [r[0] for r in chat_replies(model, enc, [[{"role": "user", "content": p}] for p in PROMPTS],
                                       max_new_tokens=8)]


def sitting(root, votes, *extra):
    return [sys.executable, os.path.join(ROOT, "side_by_side.py"), f"--a={root}/one", f"--b={root}/two",
            f"--prompts={root}/prompts.txt", f"--votes={votes}", "--max_new_tokens=8", "--dtype=float32", *extra]


def test_votes_become_preference_records(two_models, tmp_path):
    one, two = replies(two_models / "one"), replies(two_models / "two")
    assert all(a.strip() and b.strip() and a != b for a, b in zip(one, two))
    votes = tmp_path / "votes.jsonl"
    r = subprocess.run(sitting(two_models, votes), input="a\nx\nb\nt\na\n", capture_output=True, text=True,
                       timeout=120)  # 'x' is asked again; 4 votes
    assert r.returncode == 0, r.stderr
    shown = re.findall(r"\nA: (.*)\n\nB: (.*)\n", r.stdout)
    assert len(shown) == 4 and all({a, b} == {one[i], two[i]} for i, (a, b) in enumerate(shown))
    records = [json.loads(line) for line in votes.read_text().splitlines()]
    assert [(x["prompt"], x["chosen"], x["rejected"]) for x in records] == [
        (PROMPTS[0], shown[0][0], shown[0][1]), (PROMPTS[1], shown[1][1], shown[1][0]),
        (PROMPTS[2], one[2], two[2]), (PROMPTS[3], shown[3][0], shown[3][1])]  # a tie: equal scores
    assert [(x["score_chosen"], x["score_rejected"]) for x in records] == [(1, 0), (1, 0), (0.5, 0.5), (1, 0)]
    wins = [float(x["chosen_model"].endswith("two")) for x in records if x["score_chosen"] == 1]
    assert f"4 votes: {two_models}/two won {sum(wins):.0f}" in r.stdout and "1 ties" in r.stdout
    rate, _ = side_by_side.win_rate(wins + [0.5])
    assert f"(a tie counts half): {rate:.3f}" in r.stdout
    pre = tmp_path / "pre"
    pre.mkdir()
    (pre / "meta.json").write_text(json.dumps({"kind": "pretrain", "vocab_size": 260, "tokenizer": {"kind": "bytes"}}))
    r = run_script("prepare.py", "--kind=dpo", f"--out_dir={tmp_path}/dpo", f"--tokenizer_from={pre}",
                   f"--sources={{'votes': '{votes}'}}", "--val_fraction=0.5", "--block_size=64")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "dpo" / "meta.json").read_text())
    assert meta["train_pairs"] + meta["val_pairs"] == 3 and meta["low_margin"] == 1  # the tie is no pair


def test_ctrl_c_keeps_every_vote(two_models, tmp_path):
    votes = tmp_path / "votes.jsonl"
    p = subprocess.Popen(sitting(two_models, votes), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdin.write("b\n")
    p.stdin.flush()
    deadline = time.time() + 60
    while not (votes.exists() and votes.read_text().endswith("\n")) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1)  # into the next question
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "Traceback" not in err and "1 votes:" in out
    [record] = [json.loads(line) for line in votes.read_text().splitlines()]
    assert record["prompt"] == PROMPTS[0]


def test_bad_prompts_file(two_models, tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    r = subprocess.run(sitting(two_models, tmp_path / "v.jsonl", f"--prompts={bad}"), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and f"{bad}:2: expected a JSON object with a 'prompt' string" in r.stderr
    assert not (tmp_path / "v.jsonl").exists()
