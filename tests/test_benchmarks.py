"""benchmarks.py against lm-evaluation-harness's definitions: prompts, few-shot draws and answer
extraction against hand-written expectations, then the harness itself (lm-eval 0.4.13, offline, on local
files in each dataset's published schema) on the same exported model: every item's prediction agrees."""
import dataclasses
import glob
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import benchmarks
import checkpoint
import engine
from benchmark_files import harness_tasks
from benchmark_files import write as write_benchmark_files
from conftest import run_script
from model import GPT, GPTConfig
from tokenizer import load_tokenizer

ENC = load_tokenizer("bytes")


def test_hellaswag_prompt_keeps_the_harness_quirks():
    item = benchmarks.hellaswag_item({
        "activity_label": "Personal Care", "ctx_a": "[header] How to dye hair [title] Wash it.  [step] Rinse",
        "ctx_b": "THEN dry it", "endings": ["comb it [substeps] gently", " rest  now "], "label": "1"})
    # ' [title]' ends a sentence, other brackets go, one pass of double spaces becomes single; ctx_b is
    # capitalized (the rest lowercased), and each ending is cleaned the same way
    assert item["prompt"] == "Personal Care: How to dye hair. Wash it.  Rinse Then dry it"
    assert item["choices"] == ["comb it gently", "rest now"] and item["gold"] == 1


def test_mmlu_and_gsm8k_prompts(tmp_path):
    write_benchmark_files(tmp_path, n=6)
    zero, five = benchmarks.read("mmlu", tmp_path), benchmarks.read("mmlu_5shot", tmp_path)
    head = "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    assert zero[0]["prompt"].startswith(head) and zero[0]["choices"] == ["A", "B", "C", "D"]
    q = zero[0]["prompt"][len(head):]
    assert q.count("\n") == 5 and q.endswith("\nAnswer:") and "\nA. " in q and not q.startswith(" ")
    shots = five[0]["prompt"][len(head):].split("\n\n")
    assert len(shots) == 6 and all(s.endswith(tuple(f"Answer: {x}" for x in "ABCD")) for s in shots[:5])
    assert shots[5] == q and len(five) == len(zero) == 12 and len(benchmarks.read("mmlu", tmp_path, limit=2)) == 4
    # GSM8K: five train items drawn by one random.Random(1234) in test order, as the harness's sampler does
    import pyarrow.parquet as pq
    train = pq.read_table(tmp_path / "gsm8k" / "main" / "train-00000-of-00001.parquet").to_pylist()
    rng = random.Random(1234)
    for item in benchmarks.read("gsm8k", tmp_path):
        examples = [train[i] for i in rng.sample(range(len(train)), 5)]
        expected = "".join(f"Question: {e['question']}\nAnswer: {e['answer']}\n\n" for e in examples)
        assert item["prompt"] == expected + f"Question: {item['question']}\nAnswer:"


def test_chat_checkpoints_are_scored_on_gsm8k_in_the_chat_template_and_stages_compare(tmp_path):
    write_benchmark_files(tmp_path / "raw", n=3)
    item = benchmarks.read("gsm8k", tmp_path / "raw")[0]
    messages = benchmarks.chat_messages(item)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 5 + ["user"]
    assert messages[1]["content"] == item["examples"][0][1] and messages[-1]["content"] == item["question"]
    tiny_model(tmp_path / "base")
    ckpt = torch.load(tmp_path / "base" / "ckpt.pt", weights_only=True)
    checkpoint.save({**ckpt, "config": {"mode": "sft"}}, tmp_path / "chat")
    args = ["--data=", "--mc_n=0", "--tasks_n=0", "--samples_n=0", f"--benchmarks_dir={tmp_path}/raw", "--dtype=float32",
            "--compare_png="]
    r = run_script("evaluate.py", f"--out_dir={tmp_path}/chat", "--benchmarks=['gsm8k', 'arc_easy']", *args)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "chat" / "eval.json").read_text())["benchmarks"]
    assert set(result) == {"gsm8k", "gsm8k_chat", "arc_easy"} and len(result["gsm8k_chat"]["generations"]) == 3
    assert "gsm8k_chat exact match, strict" in r.stdout and len(result["arc_easy"]["picked"]) == 3
    r = run_script("evaluate.py", f"--compare=['{tmp_path}/base', '{tmp_path}/chat']", "--benchmarks=['arc_easy']", *args)
    assert r.returncode == 0, r.stderr
    assert "arc_easy acc_norm" in r.stdout
    assert f"{tmp_path}/chat vs {tmp_path}/base, arc_easy acc on the same 3 items: +0.0 points" in r.stdout


def test_gsm8k_answers_as_the_harness_extracts_and_matches_them():
    assert benchmarks.strict_answer("so 3 * 4 = 12\n#### 1,234\n#### 5") == "1,234"
    assert benchmarks.strict_answer("the answer is 12") == "[invalid]"
    assert benchmarks.flexible_answer("3 * 4 = 12, so the answer is $1,234.") == "$1,234."
    assert benchmarks.flexible_answer("no number") == "[invalid]" and benchmarks.flexible_answer("it is 7") == "7"
    reference = "There are 2 boxes.\n2 * 617 = <<2*617=1234>>1234\n#### 1,234"
    assert benchmarks.gsm8k_match("$1,234.", reference) and benchmarks.gsm8k_match("1234", reference)
    assert not benchmarks.gsm8k_match("[invalid]", reference) and not benchmarks.gsm8k_match("1235", reference)


def test_encode_pair_moves_the_contexts_spaces_to_the_continuation():
    ctx, cont = engine.encode_pair(ENC, "Question: 2 + 2?\nAnswer: ", "4")
    assert ctx == ENC.encode_ordinary("Question: 2 + 2?\nAnswer:")
    assert cont == ENC.encode_ordinary(" 4")


def test_missing_and_wrong_files_are_named(tmp_path):
    with pytest.raises(benchmarks.BenchmarkError, match="prepare.py --download=hellaswag"):
        benchmarks.read("hellaswag", tmp_path)
    write_benchmark_files(tmp_path, n=2)
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "arc_easy" / "ARC-Easy" / "test-00000-of-00001.parquet"
    pq.write_table(pa.table({"question": ["q"], "answer": ["A"]}), path)
    with pytest.raises(benchmarks.BenchmarkError) as e:
        benchmarks.read("arc_easy", tmp_path)
    assert str(path) in str(e.value) and "expected the columns question, choices, answerKey; found question, answer" \
        in str(e.value)
    r = run_script("evaluate.py", f"--out_dir={tmp_path}", "--benchmarks=['nope']")
    assert r.returncode != 0 and "benchmarks=['nope'] must be a list of benchmark names" in r.stderr


def tiny_model(path):
    """A random 2-layer model on bytes with a context long enough for 5-shot prompts; its weights scaled
    up, so that its choices and greedy tokens are decided by clear margins."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=ENC.n_vocab, block_size=2048, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    checkpoint.save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                     "tokenizer": {"kind": "bytes"}, "config": {"mode": "pretrain"}}, path)
    return model.eval()


def test_every_prediction_agrees_with_lm_evaluation_harness(tmp_path):
    pytest.importorskip("lm_eval")
    raw = tmp_path / "raw"
    write_benchmark_files(raw, n=8)
    model = tiny_model(tmp_path / "run")
    r = run_script("export.py", f"--ckpt={tmp_path}/run", f"--out={tmp_path}/hf")
    assert r.returncode == 0, r.stderr
    tasks = harness_tasks(str(raw), str(tmp_path / "tasks"))
    r = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                        f"pretrained={tmp_path}/hf,dtype=float32", "--tasks", ",".join(t for ts in tasks.values() for t in ts),
                        "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "8",
                        "--log_samples", "--output_path", str(tmp_path / "harness")], capture_output=True, text=True,
                       env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                            "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    def samples(task):
        path = glob.glob(str(tmp_path / "harness" / "*" / f"samples_{task}_*.jsonl"))[0]
        return sorted(map(json.loads, open(path)), key=lambda s: (s["doc_id"], s.get("filter", "")))

    ours = benchmarks.evaluate(model, ENC, list(tasks), str(raw))
    for name, harness_names in tasks.items():
        theirs = [s for t in harness_names for s in samples(t)]
        items = benchmarks.read(name, str(raw))
        if name == "gsm8k":
            strict = [s for s in theirs if s["filter"] == "strict-match"]
            flexible = [s for s in theirs if s["filter"] == "flexible-extract"]
            assert [it["prompt"] for it in items] == [s["arguments"]["gen_args_0"]["arg_0"] for s in strict]
            for i, it in enumerate(items):
                if ours[name]["generations"][i] != strict[i]["resps"][0][0]:
                    near_tie(model, tmp_path / "hf", it["prompt"])  # the only excuse for another text
                    continue
                assert ours[name]["strict"][i] == strict[i]["filtered_resps"][0]
                assert ours[name]["flexible"][i] == flexible[i]["filtered_resps"][0]
                assert ours[name]["hits_strict"][i] == int(strict[i]["exact_match"])
            continue
        lls = [np.array([float(choice[0][0]) for choice in s["resps"]]) for s in theirs]
        lengths = [np.array([float(len(c)) for c in it["choices"]]) for it in items]
        assert len(items) == len(theirs) == ours[name]["n"]
        assert ours[name]["picked"] == [int(np.argmax(ll)) for ll in lls], name
        assert ours[name]["picked_norm"] == [int(np.argmax(ll / n)) for ll, n in zip(lls, lengths)], name
        assert ours[name]["acc"] == pytest.approx(np.mean([s["acc"] for s in theirs]))
        mine = engine.loglikelihoods(model, [engine.encode_pair(ENC, it["prompt"], " " + c) for it in items for c in it["choices"]])
        assert np.allclose(mine, np.concatenate(lls), rtol=1e-4, atol=1e-3), name


def near_tie(model, hf_dir, prompt, tie=1e-3):
    """Where two greedy generations from the same weights part, both models must be near a tie: their top
    two logits within `tie` (float32 sums in another order move logits by ~1e-5)."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    x = torch.tensor([ENC.encode_ordinary(prompt)[-(model.config.block_size - benchmarks.MAX_GEN_TOKENS):]])
    with torch.no_grad():
        for _ in range(benchmarks.MAX_GEN_TOKENS):
            ours, theirs = model(x)[0][0, -1], hf(x).logits[0, -1]
            if ours.argmax() != theirs.argmax():
                gaps = [float(torch.topk(v, 2).values.diff().abs()) for v in (ours, theirs)]
                assert max(gaps) < tie, gaps
                return
            x = torch.cat([x, ours.argmax().view(1, 1)], dim=1)
    raise AssertionError("the generations differ but every greedy step agrees")
