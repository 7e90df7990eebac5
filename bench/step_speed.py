"""
One training step (forward, backward, clipping, AdamW) of this project's model against nanoGPT's at the
reference dims (vocab 256, 4 layers, 4 heads, 256 wide, block 256, batch 16), in one process, the two
models alternating step by step so both see the same machine; in bf16 autocast and in float32. Prints
the median ms per step of each and the ratio of tokens/s (ours over nanoGPT's). --before=DIR races a
checkout of this project at another commit as well (its model.py), for a change's before and after.
--profile adds torch.profiler's table of where our step spends its time, per precision.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT        # not part of this repository
    python bench/step_speed.py --nanogpt=/tmp/nanoGPT [--steps=40] [--profile]
    git worktree add /tmp/before HEAD~3 && python bench/step_speed.py --nanogpt=/tmp/nanoGPT --before=/tmp/before
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

import model as ours  # noqa: E402

B, T, V, LAYERS, HEADS, WIDTH = 16, 256, 256, 4, 4, 256


def model_module(checkout, name, key):
    """The model.py of another checkout, loaded under another name (ours is model.py too)."""
    path = os.path.join(checkout, "model.py")
    if not os.path.isfile(path):
        sys.exit(f"--{key}={checkout} has no model.py: give the folder of a checkout")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nanogpt_model(checkout):
    """nanoGPT's GPT at the reference dims."""
    module = model_module(checkout, "nanogpt_model", "nanogpt")
    config = module.GPTConfig(block_size=T, vocab_size=V, n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH,
                              dropout=0.0, bias=False)
    return module.GPT(config)


def our_model(module=ours):
    return module.GPT(module.GPTConfig(vocab_size=V, block_size=T, n_layer=LAYERS, n_head=HEADS, n_kv_head=HEADS,
                                       n_embd=WIDTH))


def stepper(model, bf16):
    """A function that runs one training step on a fixed random batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    x, y = torch.randint(V, (B, T)), torch.randint(V, (B, T))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def race(steps, nanogpt, bf16, before=None):
    """Median seconds per step of each, alternating; the first 5 of each are warm-up."""
    runners = {"ours": stepper(our_model(), bf16), "nanoGPT": stepper(nanogpt_model(nanogpt), bf16)}
    if before:
        runners["before"] = stepper(our_model(model_module(before, "before_model", "before")), bf16)
    times = {name: [] for name in runners}
    for i in range(steps + 5):
        for name, step in runners.items():
            t0 = time.perf_counter()
            step()
            if i >= 5:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def profile(bf16, steps=10):
    step = stepper(our_model(), bf16)
    for _ in range(3):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--nanogpt", required=True, help="folder of a nanoGPT checkout")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--before", help="folder of a checkout of this project at another commit, raced too")
    args = parser.parse_args()
    torch.manual_seed(0)
    has_bf16 = torch.cpu._is_avx512_bf16_supported()
    print(f"{torch.get_num_threads()} threads; CPU bf16 instructions: {'yes' if has_bf16 else 'no (emulated)'}")
    print(f"{'precision':<10}{'ours ms':>10}{'nanoGPT ms':>12}{'tokens/s ratio':>16}"
          + (f"{'before ms':>12}{'ours/before':>13}" if args.before else ""))
    for bf16 in (True, False):
        t = race(args.steps, args.nanogpt, bf16, args.before)
        print(f"{'bf16' if bf16 else 'float32':<10}{1000 * t['ours']:>10.1f}{1000 * t['nanoGPT']:>12.1f}"
              f"{t['nanoGPT'] / t['ours']:>15.2f}x"
              + (f"{1000 * t['before']:>12.1f}{t['before'] / t['ours']:>12.2f}x" if args.before else ""), flush=True)
    if args.profile:
        for bf16 in (True, False):
            print(f"\nours, {'bf16 autocast' if bf16 else 'float32'}: {B}x{T} tokens per step")
            profile(bf16)


if __name__ == "__main__":
    main()
