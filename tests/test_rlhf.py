"""The reward model (mode='rm') and on-policy RL (mode='rl'): losses against closed forms and by-hand
computations, a planted preference learned, a reward that rises, exact resume, DDP against one process."""
import json
import math
import random

import pytest
import torch

import batches
import checkpoint
import export
import tasks
import train
from letter_task import LETTERS, letter
from conftest import losses, read_metrics, run_script, write_dpo_split, write_sft_split
from model import GPT, GPTConfig
from tokenizer import load_tokenizer, render_chat

ENC = load_tokenizer("bytes")
PAD = ENC.encode_single_token("<|pad|>")
TINY = dict(n_layer=1, n_head=2, n_kv_head=1, n_embd=32, dtype="float32", device="cpu", spike_factor=0.0,
            eval_iters=2, log_interval=1)


def chat_pair(prompt, chosen, rejected):
    p = render_chat(ENC, [{"role": "user", "content": prompt}], generation_prompt=True)[0]
    return p, ENC.encode_ordinary(chosen) + [ENC.encode_single_token("<|im_end|>")], \
        ENC.encode_ordinary(rejected) + [ENC.encode_single_token("<|im_end|>")]


def write_pairs(path, train_pairs, val_pairs):
    path.mkdir(parents=True)
    write_dpo_split([chat_pair(*p) for p in train_pairs], path, "train")
    write_dpo_split([chat_pair(*p) for p in val_pairs], path, "val")
    (path / "meta.json").write_text(json.dumps({"kind": "dpo", "vocab_size": 260, "tokenizer": {"kind": "bytes"},
                                                "special_tokens": {"<|pad|>": PAD}}))


def save_model(model, out_dir):
    checkpoint.save({"model": model.state_dict(), "model_config": model.config.__dict__,
                     "tokenizer": {"kind": "bytes"}}, str(out_dir))


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=320, block_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=32, **kw))

# ----------------------------------------------------------------------------- the reward model


def test_bradley_terry_against_closed_form():
    """The batch's loss is the sum over pairs of log(1 + e^-(r_w - r_l)), each reward read by running its
    sequence alone, unpadded, at its last token: padding and the read position change nothing."""
    model = tiny_model(reward_head=True)
    with torch.no_grad():
        model.reward_head.weight.normal_()
    pairs = [chat_pair("Is fire hot?", "yes", "no"), chat_pair("A color?", "blue", "seven or so")]
    seqs = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    idx = torch.full((4, max(map(len, seqs))), PAD)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = torch.tensor(s)
    batch = {"idx": idx, "last": torch.tensor([len(s) - 1 for s in seqs]), "n_pairs": torch.tensor(2)}
    loss, stats = train.reward_model_loss(model, batch)
    with torch.no_grad():
        r = [model(torch.tensor([s]), reward_at=torch.tensor([len(s) - 1]))[0].item() for s in seqs]
    by_hand = sum(math.log1p(math.exp(-(r[i] - r[i + 2]))) for i in range(2))
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    assert stats["rewards/margins"].item() == pytest.approx(r[0] - r[2] + r[1] - r[3], abs=1e-5)
    assert stats["rewards/accuracies"].item() == (r[0] > r[2]) + (r[1] > r[3])


def planted(rng, n):
    """Pairs whose chosen reply shouts: the same words, upper case against lower case."""
    words = ["thee", "lord", "night", "sword", "crown", "king", "river", "stone", "light", "grace"]
    out = []
    for _ in range(n):
        reply = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
        out.append((f"Say something about {rng.choice(words)}.", reply.upper(), reply))
    return out


def test_reward_model_learns_a_planted_preference(tmp_path, capsys):
    """From a policy checkpoint (its head starts at zero: every reward 0, the loss log 2), the reward model
    learns to prefer upper case on held-out pairs; evaluate.py scores those pairs with the checkpoint as
    train.py did; a reward model cannot be trained on as a policy, nor exported as one."""
    rng = random.Random(0)
    write_pairs(tmp_path / "data" / "pref", planted(rng, 64), planted(rng, 32))
    save_model(tiny_model(), tmp_path / "sft")
    cfg = {**train.defaults, **TINY, "mode": "rm", "dataset": "pref", "data_root": str(tmp_path / "data"),
           "out_dir": str(tmp_path / "rm"), "init_from": str(tmp_path / "sft"), "block_size": 64,
           "batch_size": 8, "max_iters": 40, "learning_rate": 3e-3, "eval_interval": 40, "eval_iters": 4}
    train.train(cfg)
    first, last = [m for m in read_metrics(tmp_path / "rm") if "val_loss" in m]
    assert first["val_loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/margins"] == 0
    assert last["rewards/accuracies"] >= 0.95 and last["rewards/margins"] > 1.0
    r = run_script("evaluate.py", f"--out_dir={tmp_path}/rm", f"--pairs={tmp_path}/data/pref")
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "rm" / "eval.json").read_text())
    assert result["pair_n"] == 32 and result["pair_accuracy"] >= 0.95
    with pytest.raises(SystemExit):
        train.train({**cfg, "mode": "dpo", "init_from": str(tmp_path / "rm" / "ckpt.pt"), "out_dir": str(tmp_path / "dpo")})
    assert "is a reward model: only mode='rm' trains it further" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="reward model"):
        export.export({**export.defaults, "ckpt": str(tmp_path / "rm"), "out": str(tmp_path / "hf")})
    assert not (tmp_path / "hf").exists()

def test_reward_model_resumes_exactly_and_ddp_fsdp_match_one_process(tmp_path):
    rng = random.Random(1)
    write_pairs(tmp_path / "data" / "pref", planted(rng, 32), planted(rng, 8))
    save_model(tiny_model(), tmp_path / "sft")
    args = ["--mode=rm", "--dataset=pref", f"--data_root={tmp_path}/data", f"--init_from={tmp_path}/sft",
            "--block_size=64", "--batch_size=4", "--gradient_accumulation_steps=2", "--max_iters=4",
            "--eval_interval=4", "--eval_iters=2", "--log_interval=1", "--learning_rate=3e-3", "--dtype=float32",
            "--device=cpu", "--spike_factor=0", "--n_layer=1", "--n_head=2", "--n_kv_head=1", "--n_embd=32"]
    for out, extra, procs in (("one", [], 0), ("ddp", [], 2), ("fsdp", ["--parallel=fsdp"], 2)):
        r = run_script("train.py", *args, f"--out_dir={tmp_path}/{out}", *extra, torchrun=procs)
        assert r.returncode == 0, r.stderr
    one, ddp, fsdp = (losses(tmp_path, out) for out in ("one", "ddp", "fsdp"))
    assert one.keys() == {1, 2, 3, 4} and one[4] < one[1]
    assert all(ddp[i] == pytest.approx(one[i], abs=1e-5) and fsdp[i] == pytest.approx(one[i], abs=1e-5) for i in one)
    cfg = {**train.defaults, **TINY, "mode": "rm", "dataset": "pref", "data_root": str(tmp_path / "data"),
           "init_from": str(tmp_path / "sft"), "block_size": 64, "batch_size": 4, "gradient_accumulation_steps": 2,
           "max_iters": 4, "eval_interval": 2, "learning_rate": 3e-3, "out_dir": str(tmp_path / "resumed")}
    train.train({**cfg, "out_dir": str(tmp_path / "straight")})
    train.train({**cfg, "stop_at_iter": 2})
    train.train({**cfg, "init_from": "resume"})
    assert losses(tmp_path, "resumed") == losses(tmp_path, "straight")

# ----------------------------------------------------------------------------- RL: the formulas


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 0.0, 1.0, 0.0]])
    rloo = train.group_advantages(rewards, "rloo")
    for g, row in enumerate(rewards.tolist()):
        for i, r in enumerate(row):
            others = row[:i] + row[i + 1:]
            assert rloo[g, i].item() == pytest.approx(r - sum(others) / 3, abs=1e-6)
            mean = sum(row) / 4
            std = math.sqrt(sum((x - mean) ** 2 for x in row) / 3)
            assert train.group_advantages(rewards, "grpo")[g, i].item() == pytest.approx((r - mean) / (std + 1e-4),
                                                                                         rel=1e-5, abs=1e-6)
    assert rloo[1].abs().max() == 0  # replies that score alike teach nothing


def test_policy_gradient_loss_by_hand():
    """Two replies of 2 and 3 tokens: loss_i = -A_i sum_t logp_t + beta sum_t (e^d - d - 1), d = ref - pi;
    its gradient with respect to the policy's log-probs is -A_i + beta (1 - e^d) per reply token."""
    pi = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.25, -3.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, -1.0, -2.0]])
    adv = torch.tensor([0.7, -0.7])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    losses, kl = train.policy_gradient_loss(pi, ref, mask, adv, beta=0.1)
    rows = [([-1.0, -2.0], [-1.5, -1.0]), ([-0.5, -0.25, -3.0], [-0.5, -1.0, -2.0])]
    for i, (p, r) in enumerate(rows):
        k = sum(math.exp(b - a) - (b - a) - 1 for a, b in zip(p, r))
        assert kl[i].item() == pytest.approx(k, rel=1e-6)
        assert losses[i].item() == pytest.approx(-adv[i].item() * sum(p) + 0.1 * k, rel=1e-6)
    losses.sum().backward()
    for i, (p, r) in enumerate(rows):
        for t, (a, b) in enumerate(zip(p, r)):
            assert pi.grad[i, t].item() == pytest.approx(-adv[i].item() + 0.1 * (1 - math.exp(b - a)), rel=1e-5)
    assert pi.grad[0, 2] == 0  # no reply token there

# ----------------------------------------------------------------------------- RL: runs


@pytest.fixture(scope="module")
def letter_policy(tmp_path_factory):
    """A tiny SFT checkpoint that answers the letter task with a random one of the four letters: sampled,
    a reply is right one time in four, and RL has something to learn."""
    root = tmp_path_factory.mktemp("letters")
    data = root / "data" / "sft"
    data.mkdir(parents=True)
    rng = random.Random(0)
    for split, n in (("train", 400), ("val", 40)):
        write_sft_split([render_chat(ENC, [{"role": "user", "content": letter(rng, split)[0]},
                                           {"role": "assistant", "content": rng.choice(LETTERS)}])
                         for _ in range(n)], data, split)
    (data / "meta.json").write_text(json.dumps({"kind": "sft", "vocab_size": 260, "tokenizer": {"kind": "bytes"},
                                                "special_tokens": {"<|pad|>": PAD}}))
    train.train({**train.defaults, **TINY, "mode": "sft", "dataset": "sft", "data_root": str(root / "data"),
                 "out_dir": str(root / "sft"), "block_size": 64, "batch_size": 16, "max_iters": 60,
                 "learning_rate": 1e-2, "eval_interval": 0, "log_interval": 60, "seed": 0})
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(tasks.TASKS, "letter", letter)
        yield root


def rl_cfg(root, out, **kw):
    return {**train.defaults, **TINY, "mode": "rl", "init_from": str(root / "sft" / "ckpt.pt"),
            "out_dir": str(root / out), "rl_tasks": ["letter"], "rl_samples": 4, "rl_max_new_tokens": 4,
            "block_size": 64, "batch_size": 8, "learning_rate": 3e-3, "beta": 0.02, "eval_interval": 0, **kw}


def test_rl_replies_depend_on_their_prompt_alone(letter_policy):
    """Prompts of unequal length sample in one left-padded batch, yet each prompt's replies are the ones it
    gets alone (its seed draws them)."""
    model, _, ckpt = checkpoint.load_model(str(letter_policy / "sft"))
    cfg = {**train.defaults, "rl_tasks": ["letter", "next_number"], "rl_samples": 3, "rl_max_new_tokens": 6}
    source = batches.TaskPrompts(cfg, ckpt)
    batch = source.get("train", 8, torch.Generator().manual_seed(0))
    assert len({len(p) for p in batch["prompts"]}) > 2
    rl = train.RLLoss(cfg, source, None, None)
    together = rl.replies(model, batch)
    assert len(together) == 24 and len({tuple(r) for _, r in together}) > 3
    for i, prompt in enumerate(batch["prompts"]):
        alone = rl.replies(model, {k: v[i:i + 1] for k, v in batch.items()})
        assert alone == together[3 * i:3 * i + 3] and all(p == prompt for p, _ in alone)


def test_rl_raises_the_reward(letter_policy):
    """pass@1 on held-out prompts starts near 1/4 and rises; the KL to the reference grows from 0."""
    train.train(rl_cfg(letter_policy, "rl", max_iters=30, eval_interval=30, eval_iters=4))
    first, last = [m for m in read_metrics(letter_policy / "rl") if "val_loss" in m]
    assert 0.1 < first["pass@1"] < 0.45 and first["kl"] == pytest.approx(0, abs=1e-6)
    assert last["pass@1"] > 0.8 and last["kl"] > 0
    steps = [m for m in read_metrics(letter_policy / "rl") if "reward" in m and "val_loss" not in m]
    assert len(steps) == 30 and all(1 <= m["reply_tokens"] <= 4 for m in steps)  # a letter and <|im_end|>


def test_rl_resumes_exactly(letter_policy):
    train.train(rl_cfg(letter_policy, "straight", max_iters=6))
    train.train(rl_cfg(letter_policy, "resumed", max_iters=6, stop_at_iter=3))
    train.train(rl_cfg(letter_policy, "resumed", max_iters=6, init_from="resume"))
    assert losses(letter_policy, "resumed") == losses(letter_policy, "straight")


def test_rl_ddp_matches_one_process(letter_policy):
    """Two processes, each sampling and scoring its own 4 prompts, take the step one process takes on the
    same 8 prompts in two micro-batches: the loss is normalized by the replies of the whole step."""
    args = [f"--init_from={letter_policy}/sft/ckpt.pt", "--mode=rl", "--rl_tasks=['letter']", "--rl_samples=4",
            "--rl_max_new_tokens=4", "--block_size=64", "--batch_size=4", "--gradient_accumulation_steps=2",
            "--learning_rate=3e-3", "--beta=0.02", "--eval_interval=0", "--max_iters=4", "--log_interval=1",
            "--dtype=float32", "--device=cpu", "--spike_factor=0", "--n_layer=1", "--n_head=2", "--n_kv_head=1",
            "--n_embd=32"]
    one = run_script("tests/letter_task.py", *args, f"--out_dir={letter_policy}/one")
    assert one.returncode == 0, one.stderr
    two = run_script("tests/letter_task.py", *args, f"--out_dir={letter_policy}/two", torchrun=2)
    assert two.returncode == 0, two.stderr
    a, b = read_metrics(letter_policy / "one"), read_metrics(letter_policy / "two")
    for key in ("loss", "reward", "kl", "reply_tokens", "pass@1"):
        assert [m[key] for m in a] == pytest.approx([m[key] for m in b], rel=1e-4, abs=1e-6), key
