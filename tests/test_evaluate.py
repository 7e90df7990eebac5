import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate
import tasks
from model import GPT, GPTConfig
from tokenizer import load_tokenizer

ENC = load_tokenizer("bytes")


def tiny(block_size=16):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=320, block_size=block_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=32)).eval()


def test_bits_per_byte_by_hand():
    model = tiny()
    text = "héllo wörld, naïve café! " * 3  # multi-byte characters: bytes differ from characters
    ids = np.array(ENC.encode(text + "<|endoftext|>", allowed_special="all"), dtype=np.uint16)
    got = evaluate.bits_per_byte(model, ENC, ids, "cpu", batch_size=2)
    nats, n_bytes, n_tokens = 0.0, 0, 0
    for w in range((len(ids) - 1) // 16):  # the same non-overlapping windows, one at a time
        x = torch.tensor(ids[w * 16:w * 16 + 16].astype(np.int64))
        y = torch.tensor(ids[w * 16 + 1:w * 16 + 17].astype(np.int64))
        logp = F.log_softmax(model(x[None])[0][0], -1)
        for t, target in enumerate(y.tolist()):
            nats -= logp[t, target].item()
            n_bytes += 0 if target == 256 else 1  # <|endoftext|> is not text
            n_tokens += 1
    assert got["val_bpb"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)
    assert got["val_ppl"] == pytest.approx(math.exp(nats / n_tokens), rel=1e-5)
    assert got["val_tokens"] == n_tokens


def test_multiple_choice_picks_the_planted_answer():
    """A model trained on one sentence prefers its true ending, by total and per-character likelihood."""
    model = tiny(block_size=64).train()
    ids = torch.tensor(ENC.encode_ordinary("the cat sat on the mat. " * 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    for _ in range(60):
        _, loss = model(ids[None, :-1], ids[None, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    items = [{"context": "the cat sat on the", "choices": [" dog.", " mat.", " moon tonight."], "label": 1},
             {"context": "the cat sat", "choices": [" on the mat.", " by it.", " xq."], "label": 0}]
    assert evaluate.multiple_choice(model, ENC, items) == {"mc_acc": 1.0, "mc_acc_norm": 1.0, "mc_n": 2}


def test_choice_examples_are_well_formed():
    items = tasks.choice_examples(20, "val", seed=0)
    assert all(len(it["choices"]) == 4 and len(set(it["choices"])) == 4 for it in items)
    assert {it["choices"][it["label"]].strip() for it in items[::2]} <= {b for b, _ in tasks.verses()}


def test_evaluate_writes_json_and_rejects_bad_files(tmp_path):
    model = tiny(block_size=128)
    torch.save({"model": model.state_dict(), "model_config": model.config.__dict__, "tokenizer": {"kind": "bytes"},
                "config": {"mode": "sft"}}, tmp_path / "ckpt.pt")
    cfg = {**evaluate.defaults, "out_dir": str(tmp_path), "data": "", "mc_n": 4, "tasks_n": 7, "samples_n": 2,
           "device": "cpu", "dtype": "float32"}
    results = evaluate.evaluate(cfg)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == results and saved["exact_all"] == 0.0 and 0 <= saved["distinct_1"] <= 1
    assert {"mc_acc", "exact_all_sampled", "entropy"} <= set(saved) and saved["exact_hits"] == "0" * 7
    (tmp_path / "mc.jsonl").write_text('{"context": "a", "choices": ["b"], "label": 3}\n')
    with pytest.raises(SystemExit, match="mc.jsonl:1"):
        evaluate.evaluate({**cfg, "mc_file": str(tmp_path / "mc.jsonl")})


def write_metrics(run):
    run.mkdir()
    lines = [{"iter": 0, "train_loss": 0.69, "val_loss": 0.69, "rewards/margins": 0.0, "rewards/accuracies": 0.0}]
    lines += [{"iter": i, "loss": 0.7 - i / 100} for i in range(1, 11)]
    lines += [{"iter": 10, "train_loss": 0.6, "val_loss": 0.65, "rewards/margins": 0.2, "rewards/accuracies": 0.7}]
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    write_metrics(tmp_path / "run")
    out = evaluate.plot_run(str(tmp_path / "run"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch):
    write_metrics(tmp_path / "run")
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import fails as if not installed
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        evaluate.plot_run(str(tmp_path / "run"))


def test_batched_greedy_replies_equal_one_at_a_time():
    """engine.chat_replies batches prompts of unequal lengths, left-padded: each greedy reply is the one
    the prompt gets alone, and the replies come back in the prompts' order."""
    from engine import chat_replies
    model = tiny(block_size=128)
    with torch.no_grad():  # an untrained model at the usual scale answers newlines to everything
        for p in model.parameters():
            p.mul_(20 if p.dim() == 2 else 1)
    examples = tasks.make_examples(24, "val", 0, ("add", "first_word", "count_words"))
    conversations = [ex["messages"][:1] for ex in examples]
    lengths = [len(ENC.encode(ex["prompt"], allowed_special="all")) for ex in examples]
    assert len(set(lengths)) > 6  # rows of unequal lengths share batches
    for new_tokens in (40, 12):  # 40: prompts over 88 tokens fill the window of 128 and refill it
        alone = [chat_replies(model, ENC, [c], max_new_tokens=new_tokens)[0][0] for c in conversations]
        batched = [r[0] for r in chat_replies(model, ENC, conversations, max_new_tokens=new_tokens, batch_rows=4)]
        assert batched == alone and len(set(alone)) > 12
    # and tasks.accuracy, which uses it, scores them as one at a time would
    hits = [int(tasks.check(ex["answer"], r)) for ex, r in zip(examples, alone)]
    result = tasks.accuracy(model, ENC, examples)
    assert result["hits"] == hits and result["all"] == sum(hits) / len(hits)


def test_compare_chart_draws_the_table_values(tmp_path):
    pytest.importorskip("matplotlib")
    columns = [{"val_bpb": 2.6, "exact_add": 0.0, "exact_count_words": 0.1, "exact_all": 0.05},
               {"val_bpb": 2.7, "exact_add": 0.5, "exact_count_words": 0.3, "exact_all": 0.4}]
    drawn = evaluate.plot_compare(["out/tiny", "out/sft_tiny"], columns, str(tmp_path / "c.png"))
    assert drawn == {"add": [0.0, 0.5], "count_words": [0.1, 0.3], "all": [0.05, 0.4], "val_bpb": [2.6, 2.7]}
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_difference_against_closed_forms():
    """McNemar's exact p-value: 5 prompts gained and none lost is 2 * 0.5**5; a balanced split is 1.
    The paired-bootstrap interval brackets the difference with the normal width 2 * 1.96 * sd / sqrt(n)."""
    r = evaluate.paired_difference([0] * 5 + [1] * 5 + [0] * 10, [1] * 5 + [1] * 5 + [0] * 10)
    assert (r["gained"], r["lost"], r["diff"], r["p_mcnemar"]) == (5, 0, 0.25, 2 * 0.5 ** 5)
    assert evaluate.paired_difference([1, 0, 1, 0], [0, 1, 0, 1])["p_mcnemar"] == 1.0
    assert evaluate.paired_difference([1, 0, 1], [1, 0, 1])["ci95"] == (0.0, 0.0)
    rng = np.random.default_rng(0)
    before = rng.random(800) < 0.3
    after = np.where(rng.random(800) < 0.2, ~before, before)
    r = evaluate.paired_difference(before.astype(int), after.astype(int))
    d = after.astype(float) - before
    lo, hi = r["ci95"]
    assert lo < r["diff"] < hi and r["diff"] == pytest.approx(d.mean())
    assert hi - lo == pytest.approx(2 * 1.96 * d.std() / math.sqrt(len(d)), rel=0.1)
