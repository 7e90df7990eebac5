"""
Generate text from a trained checkpoint.

    python sample.py --out_dir=out/tiny --start="To be" --num_samples=3 --max_new_tokens=200
    python sample.py --out_dir=out/tiny --start=FILE:prompt.txt --temperature=0
    python sample.py --out_dir=out/sft_tiny --chat=True --system="You are terse."   # multi-turn chat
    python sample.py --out_dir=out/sft_tiny --prompt="What is 2 + 3?" --temperature=0
"""
import sys
import time

import torch

from configurator import AT_LEAST_1, NON_NEGATIVE, configure, one_of, require
import checkpoint
from parallel import DTYPES, autocast_context
from engine import chat_replies, generate
from tokenizer import eot_token

defaults = dict(
    out_dir="out",          # directory holding ckpt.pt (or the path of a .pt file)
    start="\n",             # prompt text, or FILE:path to read it from a file
    num_samples=3,
    max_new_tokens=200,
    temperature=0.8,        # 0 = greedy
    top_k=200,              # 0 = off
    top_p=1.0,              # 1.0 = off
    seed=1337,
    device="cuda" if torch.cuda.is_available() else "cpu",
    dtype="auto",           # 'bfloat16' autocast, 'float32', or 'auto': bfloat16 where the hardware has it
    chat=False,             # interactive multi-turn chat in the chat template (an SFT/DPO model)
    prompt="",              # one chat turn: print the reply to this user message and exit
    system="",              # optional system prompt for chat and prompt
)


def chat(model, enc, cfg, ctx):
    """A terminal conversation (or the one turn of --prompt); the whole history is the context."""
    messages = [{"role": "system", "content": cfg["system"]}] if cfg["system"] else []
    while True:
        if cfg["prompt"]:
            user = cfg["prompt"]
        else:
            try:
                user = input("you> ")
            except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C ends the conversation
                print()
                break
            if not user.strip():
                continue
        messages.append({"role": "user", "content": user})
        t0 = time.perf_counter()
        with ctx:
            reply = chat_replies(model, enc, [messages], max_new_tokens=cfg["max_new_tokens"],
                                 temperature=cfg["temperature"], top_k=cfg["top_k"] or None, top_p=cfg["top_p"])[0][0]
        n = len(enc.encode(reply, allowed_special="all")) + 1
        print(reply if cfg["prompt"] else f"model> {reply}")
        print(f"({n} tokens, {n / (time.perf_counter() - t0):.1f} tokens/s)", file=sys.stderr)
        messages.append({"role": "assistant", "content": reply})
        if cfg["prompt"]:
            break


def main():
    cfg = configure(defaults)
    require(cfg, {"num_samples": AT_LEAST_1, "max_new_tokens": AT_LEAST_1, "temperature": NON_NEGATIVE,
                  "top_k": NON_NEGATIVE, "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
                  "dtype": one_of(*DTYPES)})
    start = cfg["start"]
    if start.startswith("FILE:"):
        try:
            with open(start[5:], encoding="utf-8", errors="replace") as f:
                start = f.read()
        except OSError as e:
            sys.exit(f"start='{cfg['start']}': {e.strerror}")
    torch.manual_seed(cfg["seed"])
    device = cfg["device"]
    try:
        model, enc, _ = checkpoint.load_model(cfg["out_dir"], device)
    except ValueError as e:
        sys.exit(str(e))
    ctx = autocast_context(cfg["dtype"], device.split(":")[0])
    if cfg["chat"] or cfg["prompt"]:
        return chat(model, enc, cfg, ctx)
    ids = enc.encode(start, allowed_special="all")
    if len(ids) > model.config.block_size:
        print(f"(prompt of {len(ids)} tokens cropped to its last {model.config.block_size})", file=sys.stderr)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    eot = eot_token(enc)
    for _ in range(cfg["num_samples"]):
        t0 = time.perf_counter()
        with ctx:
            y = generate(model, x, cfg["max_new_tokens"], cfg["temperature"], cfg["top_k"] or None,
                         cfg["top_p"], stop_tokens=() if eot is None else (eot,))
        new = y[0, min(len(ids), model.config.block_size):].tolist()
        dt = time.perf_counter() - t0
        print(start + enc.decode([t for t in new if t < enc.n_vocab]))  # ids past the tokenizer: padding
        print(f"---------------- {len(new)} tokens in {dt:.2f}s, {len(new) / dt:.1f} tokens/s", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted")
