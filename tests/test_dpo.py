import collections
import copy
import json
import math

import numpy as np
import pytest
import torch

import chat_data
import engine
import train
from conftest import read_metrics, run_script, write_dpo_split
from model import GPT, GPTConfig
from tokenizer import load_tokenizer

ENC = load_tokenizer("bytes")
CFG = {**train.defaults, "beta": 0.1, "label_smoothing": 0.1, "simpo_gamma": 0.5, "orpo_lambda": 0.1}
LOGPS = dict(pi_c=-10.0, pi_r=-12.0, len_c=4.0, len_r=5.0, ref_c=-11.0, ref_r=-11.5)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def by_hand(kind):
    """Each loss written out from its paper's formula with plain floats."""
    b, pc, pr, lc, lr, rc, rr = 0.1, -10.0, -12.0, 4.0, 5.0, -11.0, -11.5
    delta = (pc - rc) - (pr - rr)  # 1.5
    if kind == "sigmoid":
        return -log_sigmoid(b * delta)
    if kind == "ipo":
        return ((pc / lc - rc / lc) - (pr / lr - rr / lr) - 1 / (2 * b)) ** 2
    if kind == "hinge":
        return max(0.0, 1 - b * delta)
    if kind == "robust":
        return (-(0.9) * log_sigmoid(b * delta) + 0.1 * log_sigmoid(-b * delta)) / 0.8
    if kind == "simpo":
        return -log_sigmoid(b * (pc / lc - pr / lr) - 0.5)
    ac, ar = pc / lc, pr / lr
    odds = (ac - math.log(1 - math.exp(ac))) - (ar - math.log(1 - math.exp(ar)))
    return -ac - 0.1 * log_sigmoid(odds)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"])
def test_losses_against_hand_computation(kind):
    t = {k: torch.tensor([v], dtype=torch.float64) for k, v in LOGPS.items()}
    ref = () if kind in train.REFERENCE_FREE else (t["ref_c"], t["ref_r"])
    loss, (r_c, r_r) = train.preference_loss({**CFG, "loss_type": kind}, t["pi_c"], t["pi_r"], t["len_c"], t["len_r"], *ref)
    assert loss.item() == pytest.approx(by_hand(kind), rel=1e-12)
    if kind in train.REFERENCE_FREE:
        assert (r_c.item(), r_r.item()) == pytest.approx((0.1 * -2.5, 0.1 * -2.4))
    else:
        assert (r_c.item(), r_r.item()) == pytest.approx((0.1 * 1.0, 0.1 * -0.5))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=320, block_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=32))


def pair_batch(pairs):
    """A PreferenceBatches-style batch from (prompt, chosen, rejected) strings."""
    rows = [chat_data.render_pair(ENC, rec, {"block_size": 64}) for rec in
            [([{"role": "user", "content": p}], c, r) for p, c, r in pairs]]
    seqs = [(p, c) for p, c, _ in rows] + [(p, r) for p, _, r in rows]
    T = max(len(p) + len(x) for p, x in seqs) - 1
    idx = torch.full((len(seqs), T), 259)
    targets = torch.full((len(seqs), T), -100)
    for i, (p, x) in enumerate(seqs):
        t = torch.tensor(p + x)
        idx[i, :len(t) - 1] = t[:-1]
        targets[i, len(p) - 1:len(t) - 1] = t[len(p):]
    return {"idx": idx, "targets": targets, "n_pairs": torch.tensor(len(pairs))}


PAIRS = [("Is fire hot?", "yes", "no"), ("Say a color.", "blue", "seven"), ("2+2?", "4", "5 or so")]


def test_step_zero_is_log2_with_zero_rewards():
    model = tiny_model()
    loss_fn = train.DPOLoss({**CFG, "loss_type": "sigmoid"}, copy.deepcopy(model).eval())
    loss, stats = loss_fn(model, pair_batch(PAIRS))
    assert loss.item() / 3 == pytest.approx(math.log(2), abs=1e-6)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert stats[k].item() == pytest.approx(0.0, abs=1e-6)


def test_rpo_term_adds_the_chosen_replies_nll_per_token():
    """rpo_alpha adds alpha * (the chosen reply's NLL / its tokens) per pair, computed here from the
    model's own next-token cross-entropy over the chosen rows: at step zero, log 2 + that."""
    model = tiny_model()
    batch = pair_batch(PAIRS)
    loss_fn = train.DPOLoss({**CFG, "loss_type": "sigmoid", "rpo_alpha": 0.5}, copy.deepcopy(model).eval())
    loss, _ = loss_fn(model, batch)
    with torch.no_grad():
        logits = model(batch["idx"][:3])[0]
    nll = [torch.nn.functional.cross_entropy(logits[i], batch["targets"][i], ignore_index=-100).item() for i in range(3)]
    assert loss.item() == pytest.approx(3 * math.log(2) + 0.5 * sum(nll), rel=1e-5)


def test_reference_is_frozen():
    model, ref = tiny_model(), tiny_model().eval().requires_grad_(False)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    loss_fn = train.DPOLoss({**CFG, "loss_type": "sigmoid"}, ref)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    for _ in range(3):
        loss, _ = loss_fn(model, pair_batch(PAIRS))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in ref.parameters())
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    assert not torch.equal(model.wte.weight, ref.wte.weight)  # the policy did move


def test_prompt_logps_do_not_matter():
    batch = pair_batch(PAIRS)
    logits = torch.randn(*batch["idx"].shape, 320)
    a, n = engine.sequence_logps(logits, batch["targets"])
    prompt = batch["targets"] == -100
    b, _ = engine.sequence_logps(logits + 5 * torch.randn_like(logits) * prompt[..., None], batch["targets"])
    torch.testing.assert_close(a, b)
    assert n.tolist() == [len(c) + 1 for _, c, _ in PAIRS] + [len(r) + 1 for _, _, r in PAIRS]


def test_reference_free_types_load_no_reference():
    for kind in train.REFERENCE_FREE:
        cfg = {**CFG, "mode": "dpo", "loss_type": kind, "ref_from": "no/such/checkpoint.pt"}
        assert train.mode_loss(cfg, "cpu", None).reference is None


def write_pairs(path, pairs):
    path.mkdir(parents=True)
    rows = [chat_data.render_pair(ENC, ([{"role": "user", "content": p}], c, r), {"block_size": 64}) for p, c, r in pairs]
    for split in ("train", "val"):
        write_dpo_split(rows, path, split)
    (path / "meta.json").write_text(json.dumps({"kind": "dpo", "vocab_size": 260, "tokenizer": {"kind": "bytes"},
                                                "special_tokens": {"<|pad|>": 259}}))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_planted_preference_raises_margin_and_accuracy(tmp_path, loss_type):
    write_pairs(tmp_path / "data" / "pref", PAIRS * 4)
    torch.save({"model": tiny_model().state_dict(), "model_config": tiny_model().config.__dict__,
                "tokenizer": {"kind": "bytes"}}, tmp_path / "sft.pt")
    train.train({**train.defaults, "mode": "dpo", "loss_type": loss_type, "dataset": "pref",
                 "data_root": str(tmp_path / "data"), "out_dir": str(tmp_path / "out"),
                 "init_from": str(tmp_path / "sft.pt"), "block_size": 64, "batch_size": 6, "max_iters": 30,
                 "learning_rate": 3e-3, "eval_interval": 30, "eval_iters": 2, "log_interval": 10,
                 "dtype": "float32", "device": "cpu", "spike_factor": 0.0})
    first, last = [m for m in read_metrics(tmp_path / "out") if "val_loss" in m]
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert last["rewards/margins"] > 0.1 and last["rewards/accuracies"] == 1.0
    assert last["val_loss"] < first["val_loss"]


def test_preference_records_and_bad_input(tmp_path):
    pre = tmp_path / "pre"
    pre.mkdir()
    (pre / "meta.json").write_text(json.dumps({"kind": "pretrain", "vocab_size": 260, "tokenizer": {"kind": "bytes"}}))
    plain = {"prompt": "Is fire hot?", "chosen": "yes", "rejected": "no"}
    conv = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
            "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}
    lines = [json.dumps(plain), json.dumps(conv)] * 10
    (tmp_path / "prefs.jsonl").write_text("\n".join(lines + [json.dumps({"prompt": "x", "chosen": "y"})]) + "\n")
    args = ["--kind=dpo", f"--tokenizer_from={pre}", f"--sources={{'p': '{tmp_path}/prefs.jsonl'}}",
            "--val_fraction=0.3", "--block_size=128"]
    r = run_script("prepare.py", f"--out_dir={tmp_path}/dpo", *args)
    assert r.returncode != 0 and "prefs.jsonl:21: missing field 'rejected'" in r.stderr
    r = run_script("prepare.py", f"--out_dir={tmp_path}/dpo", *args, "--on_error=skip")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "dpo" / "meta.json").read_text())
    assert meta["train_pairs"] + meta["val_pairs"] == 20 and meta["skipped"] == {"missing field 'rejected'": 1}
    tokens = np.fromfile(tmp_path / "dpo" / "train.bin", dtype=np.uint16).tolist()
    spans = np.fromfile(tmp_path / "dpo" / "train.idx", dtype=np.int64).reshape(-1, 4)
    texts = {ENC.decode(tokens[p:c]) + "|" + ENC.decode(tokens[c:r]) + "|" + ENC.decode(tokens[r:e]) for p, c, r, e in spans}
    assert texts <= {
        "<|im_start|>user\nIs fire hot?<|im_end|>\n<|im_start|>assistant\n|yes<|im_end|>|no<|im_end|>",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n|4<|im_end|>|5<|im_end|>"}
    with pytest.raises(ValueError, match="does not end with a user turn"):
        chat_data.to_pair({"prompt": [{"role": "assistant", "content": "a"}], "chosen": "b", "rejected": "c"})


@pytest.mark.parametrize("reference_chosen", [True, False])
def test_on_policy_pairs_reject_a_wrong_greedy_answer(monkeypatch, reference_chosen):
    """The greedy answer is judged first: where it is wrong it is the rejected reply; where it is right
    (here: every third prompt's reference is made to be the model's greedy answer) it is chosen. A prompt
    with no correct answer gets the reference as chosen, or no pair with reference_chosen=False."""
    import tasks
    from engine import chat_replies
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=320, block_size=128, n_layer=1, n_head=2, n_kv_head=1, n_embd=32)).eval()
    with torch.no_grad():  # sharper logits: varied greedy answers, and samples that differ from them
        for p in model.parameters():
            p.mul_(20 if p.dim() == 2 else 1)
    examples = tasks.make_examples(12, "train", 0, ("count_words",))
    greedy = [r[0] for r in chat_replies(model, ENC, [ex["messages"][:1] for ex in examples], max_new_tokens=64)]
    for i, ex in enumerate(examples[::3]):
        ex["answer"] = greedy[3 * i]
    monkeypatch.setattr(tasks, "make_examples", lambda *a, **k: copy.deepcopy(examples))
    cfg = {"seed": 0, "tasks": ["count_words"], "samples_per_prompt": 2, "sample_temperature": 1.0,
           "reference_chosen": reference_chosen}
    stats = collections.Counter()
    pairs = dict(chat_data.on_policy_pairs(cfg, model, ENC, "train", 12, stats))
    assert stats["train_correct_greedy"] == 4 and len(set(greedy)) > 6
    for i, ex in enumerate(examples):
        pair = pairs.get(f"tasks:train:{i}")
        if i % 3 == 0:  # right when greedy: chosen, unless every sample was right too (no pair)
            assert pair is None or pair[1] == greedy[i] != pair[2]
        elif reference_chosen:
            assert pair == (ex["messages"][:1], ex["answer"], greedy[i])
        else:
            assert pair is None
    assert len(pairs) == stats["train_reference_chosen"] + 4 - stats["train_all_correct"]
    assert stats["train_no_correct_answer"] == (0 if reference_chosen else 8)
