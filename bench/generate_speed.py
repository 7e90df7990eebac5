"""
Generation speed: engine.generate against Hugging Face transformers' generate on the same weights (a
random model of 6 layers x 384, GQA 6/2, vocab 4096, exported with export.py and loaded as
LlamaForCausalLM), greedy, float32, a 32-token prompt and 192 new tokens, at batch 1 and 16, in one
process, alternating run by run. Prints the median tokens/s of each, the ratio, and whether the tokens
agree; then 16 prompts of unequal lengths generated in one left-padded batch against batches of equal
length. Needs transformers (tests/requirements.txt).

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
from engine import generate, left_pad  # noqa: E402
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
            "ours": lambda: generate(ours, x, NEW, temperature=0)[:, PROMPT:],
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
    unequal_lengths(ours, hf, args.runs)


def unequal_lengths(model, hf, runs, n=16, new=64):
    """n prompts of 8 to 56 tokens (as RL's and the evaluation's are), greedy: one left-padded batch
    against batches of equal length (what generation did before padding) and against Hugging Face's
    left-padded batch, and whether the padded rows equal the prompts' one-at-a-time replies."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4096, (int(n_),), generator=g) for n_ in torch.randint(8, 57, (n,), generator=g)]
    x, pad = left_pad([p.tolist() for p in prompts], 0)
    width = x.size(1)

    def grouped():
        by_length = {}
        for p in prompts:
            by_length.setdefault(len(p), []).append(p)
        return [generate(model, torch.stack(group), new, temperature=0) for group in by_length.values()]

    mask = (torch.arange(width) >= pad[:, None]).long()
    hf_run = lambda: hf.generate(x, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,  # noqa: E731
                                 do_sample=False, pad_token_id=0)
    times = {"padded": [], "grouped": [], "hf": []}
    with torch.no_grad():
        padded = generate(model, x, new, temperature=0, pad=pad)[:, width:]
        alone = torch.cat([generate(model, p[None], new, temperature=0)[:, len(p):] for p in prompts])
        hf_tokens = hf_run()[:, width:]
        for _ in range(runs):
            for name, run in (("padded", lambda: generate(model, x, new, temperature=0, pad=pad)), ("grouped", grouped),
                              ("hf", hf_run)):
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
    rate = {k: n * new / statistics.median(v) for k, v in times.items()}
    print(f"{n} prompts of {min(map(len, prompts))}-{width} tokens ({len({len(p) for p in prompts})} lengths), {new} new "
          f"tokens: one left-padded batch {rate['padded']:,.0f} tokens/s, batches of equal length {rate['grouped']:,.0f}: "
          f"{rate['padded'] / rate['grouped']:.2f}x; Hugging Face left-padded {rate['hf']:,.0f}: "
          f"{rate['padded'] / rate['hf']:.2f}x; padded rows {'equal' if torch.equal(padded, alone) else 'DIFFER from'} "
          f"one-at-a-time, Hugging Face's {'equal' if torch.equal(hf_tokens, alone) else 'DIFFER'}")


if __name__ == "__main__":
    main()
