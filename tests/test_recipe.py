"""recipe.sh, the GPU node's recipe from download to report, rehearsed on a CPU: tiny sizes, and a local HTTP
server on 127.0.0.1 that serves generated files in each dataset's published schema at its real path
(ClimbMix's text shards, SmolTalk, UltraFeedback, the benchmarks). It proves the plumbing of every
stage, not the quality of any: the same script, with the *_ARGS size overrides and HUB_URL."""
import io
import json
import os
import subprocess
import sys

import pytest

from benchmark_files import write as write_benchmark_files
from conftest import ROOT
from test_download import Server

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402


def parquet(rows):
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def published_files(tmp_path):
    """{URL path: bytes} for every file recipe.sh downloads, at SHARDS=2."""
    import sources
    from download import PRESETS
    chapters = [text for _, text in sources.read_bible()]
    verses = [line for text in chapters[:40] for line in text.split("\n")[2:]]
    hub = {}

    def put(name, path, data):
        hub[f"/datasets/{PRESETS[name]['repo']}/resolve/main/{path}"] = data
    for i in range(2):  # ClimbMix: a text column
        put("climbmix", f"shard_{i:05d}.parquet", parquet([{"text": t} for t in chapters[100 * i:100 * i + 100]]))
    for k, path in enumerate(PRESETS["smol-smoltalk"]["files"]):  # SmolTalk: messages and source
        put("smol-smoltalk", path, parquet([{"messages": [{"content": f"Say verse {j}.", "role": "user"},
                                                          {"content": verses[j], "role": "assistant"}],
                                             "source": "rehearsal"} for j in range(25 * k, 25 * k + 25)]))
    for k, path in enumerate(PRESETS["ultrafeedback"]["files"]):  # UltraFeedback: whole conversations, scores
        rows = []
        for j in range(30 * k, 30 * k + 30):
            user = {"content": f"Quote verse {j}.", "role": "user"}
            rows.append({"prompt": user["content"], "prompt_id": str(j), "messages": [user],
                         "chosen": [user, {"content": verses[j], "role": "assistant"}],
                         "rejected": [user, {"content": verses[j + 1], "role": "assistant"}],
                         "score_chosen": 9.0, "score_rejected": 9.0 - j % 3})
        put("ultrafeedback", path, parquet(rows))
    write_benchmark_files(tmp_path, n=4)
    for name in ("hellaswag", "arc_easy", "arc_challenge", "mmlu", "gsm8k"):
        for path in PRESETS[name]["files"]:
            put(name, path, (tmp_path / name / path).read_bytes())
    return hub


TINY = {"PRETRAIN_DATA_ARGS": "--tokenizer=bpe --vocab_size=640 --tokenizer_train_chars=300000 --val_fraction=0.1",
        "PRETRAIN_ARGS": "--n_layer=2 --n_head=2 --n_kv_head=1 --n_embd=64 --block_size=512 --batch_size=4 "
                         "--gradient_accumulation_steps=1 --max_iters=10 --eval_interval=5 --eval_iters=1 --warmup_iters=2",
        "SFT_DATA_ARGS": "--block_size=512 --val_fraction=0.1",
        "SFT_ARGS": "--block_size=512 --batch_size=4 --gradient_accumulation_steps=1 --max_iters=6 --eval_interval=3 "
                    "--eval_iters=1",
        "DPO_DATA_ARGS": "--block_size=512 --val_fraction=0.1",
        "DPO_ARGS": "--block_size=512 --batch_size=2 --gradient_accumulation_steps=1 --max_iters=6 --eval_interval=3 "
                    "--eval_iters=1",
        "EVAL_ARGS": "--benchmark_n=3 --max_tokens=20000 --tasks_n=11"}


def recipe(tmp_path, url, **override):
    env = {**os.environ, "PYTHON": sys.executable, "NPROC": "1", "SHARDS": "2", "HUB_URL": url,
           "RECIPE_DIR": str(tmp_path / "run"), "OMP_NUM_THREADS": "1", **TINY, **override}
    for key in ("PRETRAIN_ARGS", "SFT_ARGS", "DPO_ARGS"):  # a CPU: no compiling, float32
        env[key] += " --compile=False --dtype=float32"
    (tmp_path / "run").mkdir(exist_ok=True)
    return subprocess.run(["bash", os.path.join(ROOT, "recipe.sh")], capture_output=True, text=True, env=env, timeout=900)


def test_the_recipe_runs_from_download_to_report_and_a_rerun_picks_up_where_it_stopped(tmp_path):
    server = Server(published_files(tmp_path / "hub"))
    run = tmp_path / "run"
    try:
        # DPO refuses its config: the script stops there, the stages before it complete
        r = recipe(tmp_path, server.url, DPO_ARGS=TINY["DPO_ARGS"] + " --max_iters=-1")
        assert r.returncode != 0 and "max_iters=-1 must be >= 0" in r.stderr
        assert (run / "out" / "sft" / "ckpt.pt").is_file() and not (run / "out" / "dpo").exists()
        done = {p: (run / p).read_bytes() for p in ("data/pretrain/train.bin", "out/pretrain/metrics.jsonl",
                                                    "data/sft/meta.json", "out/sft/metrics.jsonl")}
        fetched = len(server.requests)
        assert fetched == 2 + 5 + 2 + 1 + 1 + 1 + 2 + 2  # every file once: shards, SmolTalk, UltraFeedback, benchmarks
        r = recipe(tmp_path, server.url)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    finally:
        server.close()
    # the rerun fetched nothing, redid no data, trained no finished stage again, and went on with DPO
    assert len(server.requests) == fetched and all((run / p).read_bytes() == b for p, b in done.items())
    meta = json.loads((run / "data" / "dpo" / "meta.json").read_text())
    assert meta["low_margin"] == 10 and meta["train_pairs"] + meta["val_pairs"] == 20  # margin 0 out, of 30
    assert json.loads((run / "out" / "dpo" / "metrics.jsonl").read_text().splitlines()[-1])["iter"] == 6
    table = r.stdout[r.stdout.index("out/pretrain         out/sft"):]
    for row in ("val bits/byte", "task exact match, greedy", "hellaswag acc_norm", "arc_challenge acc", "mmlu acc", "gsm8k exact match, strict",
                "gsm8k_chat exact match, strict", "reward accuracy, held-out pairs"):
        assert row in table, row
    assert (run / "compare.png").is_file()
    for stage in ("pretrain", "sft", "dpo"):
        assert json.loads((run / "out" / stage / "eval.json").read_text())["benchmarks"]["hellaswag"]["n"] == 3
