"""
Generation speed: model.generate against Hugging Face transformers' generate on the same weights (a
random model of 6 layers x 384, GQA 6/2, vocab 4096, exported with export.py and loaded as
LlamaForCausalLM), greedy, float32, a 32-token prompt and 192 new tokens, at batch 1 and 16, in one
process, alternating run by run. Prints the median tokens/s of each, the ratio, and whether the tokens
agree. Needs transformers (tests/requirements.txt).

    python bench/generate_speed.py [--runs=5] [--threads=2]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

import checkpoint  # noqa: E402
import export  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

PROMPT, NEW = 32, 192


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="1,16")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=4096, block_size=256, n_layer=6, n_head=6, n_kv_head=2, n_embd=384)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.save({"model": ours.state_dict(), "model_config": ours.config.__dict__,
                         "tokenizer": {"kind": "bytes"}}, tmp)
        export.export({**export.defaults, "ckpt": tmp, "out": os.path.join(tmp, "hf")})
        hf = LlamaForCausalLM.from_pretrained(os.path.join(tmp, "hf"), torch_dtype=torch.float32).eval()
    print(f"{ours.num_params() / 1e6:.1f}M parameters, float32, {torch.get_num_threads()} threads, "
          f"{PROMPT}-token prompt, {NEW} new tokens, greedy")
    for batch in map(int, args.batches.split(",")):
        x = torch.randint(4096, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
        runs = {
            "ours": lambda: ours.generate(x, NEW, temperature=0)[:, PROMPT:],
            "hf": lambda: hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, min_new_tokens=NEW,
                                      do_sample=False, pad_token_id=0)[:, PROMPT:],
        }
        times, outs = {k: [] for k in runs}, {}
        with torch.no_grad():
            for name, run in runs.items():  # a warm-up each
                outs[name] = run()
            for _ in range(args.runs):
                for name, run in runs.items():
                    t0 = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - t0)
        rate = {k: batch * NEW / statistics.median(v) for k, v in times.items()}
        print(f"batch {batch:>2}: ours {rate['ours']:,.0f} tokens/s, Hugging Face {rate['hf']:,.0f}: "
              f"{rate['ours'] / rate['hf']:.2f}x; tokens {'identical' if torch.equal(outs['ours'], outs['hf']) else 'DIFFER'}")


if __name__ == "__main__":
    main()
