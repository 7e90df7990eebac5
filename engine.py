"""
The engine: a trained model put to use, for every script that needs it (sample.py, evaluate.py and
benchmarks.py, RL in train.py, on-policy pairs in chat_data.py, side_by_side.py). Two ideas, one home each:

Generation
    generate        the decoding loop: KV cache, a sliding window, left-padded rows, stop tokens
    sample_next     greedy, temperature, top-k and nucleus sampling; one generator per row if wished
    complete        token prompts -> replies, batched shortest first, stop tokens and a stop test
    chat_replies    conversations -> the assistant's next message(s), in the chat template
Scoring
    token_logps     logits and targets -> each target's log-probability (the training losses use it)
    loglikelihoods  (context, continuation) token pairs -> the continuation's summed log-probability, batched
    encode_pair     text -> tokens, split into context and continuation as lm-evaluation-harness splits them

Rows of unequal length become one tensor through pad_rows: left-padded for generation (left_pad),
right-padded for scoring (completion_rows, whole_rows).
"""
import torch

from model import KVCache
from tokenizer import render_chat

# ----------------------------------------------------------------------------- rows of unequal length


def pad_rows(rows, value, left=False, device=None):
    """Token lists as one (B, width) tensor, filled with value on the right (or the left)."""
    width = max(map(len, rows))
    fill = [[value] * (width - len(r)) for r in rows]
    return torch.tensor([f + list(r) if left else list(r) + f for f, r in zip(fill, rows)], dtype=torch.long,
                        device=device)


def left_pad(prompts, pad_id, device=None):
    """Prompts of unequal lengths as one batch for generate: (idx (B, T), pad (B,) how many padding
    tokens each row starts with)."""
    width = max(map(len, prompts))
    return pad_rows(prompts, pad_id, left=True, device=device), torch.tensor([width - len(p) for p in prompts],
                                                                             device=device)


def completion_rows(seqs, pad):
    """(prompt, completion) token sequences as right-padded rows of next-token inputs and targets, only
    the completion's tokens being targets (-100 elsewhere)."""
    inputs = [(list(p) + list(c))[:-1] for p, c in seqs]
    targets = [[-100] * (len(p) - 1) + list(c) for p, c in seqs]
    return {"idx": pad_rows(inputs, pad), "targets": pad_rows(targets, -100)}


def whole_rows(seqs, pad):
    """(prompt, completion) token sequences as right-padded whole rows, and 'last', the position of each
    row's last token (where a reward model reads its score)."""
    whole = [list(p) + list(c) for p, c in seqs]
    return {"idx": pad_rows(whole, pad), "last": torch.tensor([len(t) - 1 for t in whole])}

# ----------------------------------------------------------------------------- generation


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row from logits (B, V): greedy at temperature 0, else top-k / nucleus sampling.
    generator: a torch.Generator, or a list of one per row (rows may share one), so that a row's draws
    depend on its own generator only, whatever else is in the batch."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # drop the tail outside the smallest set of tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if isinstance(generator, (list, tuple)):  # inverse transform sampling, one uniform in (0, 1] per row
        cdf = logits.softmax(-1).cumsum(-1)
        u = torch.cat([1 - torch.rand(1, generator=g, device=logits.device) for g in generator])
        return torch.searchsorted(cdf, u[:, None] * cdf[:, -1:])
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_tokens=(),
             use_cache=True, generator=None, pad=None, finished=None):
    """Append up to max_new_tokens sampled tokens to idx (B, T); temperature 0 is greedy.
    pad (B,): how many of each row's first tokens are left padding (prompts of unequal length in one
    batch: left_pad); each row is then generated as it would be alone (until the batch fills the window).
    Stops early once every row has produced one of stop_tokens, or finished(row, new_ids) said True of it
    (a stop string, say).
    The context window: a prompt longer than block_size is cropped to its last block_size tokens; when
    the window fills up, the oldest half is dropped and the rest re-encoded (a cache refill). The
    no-cache path uses the same window, so both paths see the same context and agree exactly."""
    bs = model.config.block_size
    if idx.size(1) > bs:
        pad = None if pad is None else (pad - (idx.size(1) - bs)).clamp(min=0)
        idx = idx[:, -bs:]
    prompt_len, window_start, window_pad = idx.size(1), 0, pad  # the model sees idx[:, window_start:]
    cache = None
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=idx.device)
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        if idx.size(1) - window_start >= bs:  # full: keep the newest half
            window_start = idx.size(1) - bs // 2
            window_pad = None if pad is None else (pad - window_start).clamp(min=0)
            cache = None
        if not use_cache:
            logits, _ = model(idx[:, window_start:], pad=window_pad)
        elif cache is None:
            cache = KVCache(model.config)
            logits, _ = model(idx[:, window_start:], cache=cache, pad=window_pad)
        else:
            logits, _ = model(idx[:, -1:], cache=cache, pad=window_pad)
        next_id = sample_next(logits[:, -1, :].float(), temperature, top_k, top_p, generator)
        idx = torch.cat((idx, next_id), dim=1)
        if len(stop):
            done |= torch.isin(next_id[:, 0], stop)
        if finished is not None:
            new = idx[:, prompt_len:].tolist()
            done |= torch.tensor([not d and finished(i, new[i]) for i, d in enumerate(done.tolist())],
                                 device=idx.device)
        if (len(stop) or finished is not None) and done.all():
            break
    return idx


def complete(model, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None, stop_tokens=(),
             num_samples=1, generator=None, batch_rows=64, finished=None, progress=None):
    """Replies to token prompts, num_samples per prompt: [[reply tokens, ...] per prompt], each reply cut
    before its first stop token. Prompts generate together, shortest first, up to batch_rows rows at a
    time, left-padded to the longest of their batch, so a greedy reply in a batch is the reply the prompt
    gets alone (in float32; in bfloat16, up to rounding). Sampled replies depend on the batches.
    finished(new_ids) -> True ends a reply early (its text reached a stop string, say); progress(n) is
    told as each batch of n prompts is done."""
    bs, device = model.config.block_size, next(model.parameters()).device
    per_batch, batches = max(1, batch_rows // num_samples), []
    for i in sorted(range(len(prompts)), key=lambda i: len(prompts[i])):
        # a batch whose window fills up refills it at its widest row's length: there, equal lengths only
        refills = len(prompts[i]) + max_new_tokens > bs
        if not batches or len(batches[-1]) == per_batch or (refills and len(prompts[i]) != len(prompts[batches[-1][0]])):
            batches.append([])
        batches[-1].append(i)
    replies = [None] * len(prompts)
    for batch in batches:
        x, pad = left_pad([prompts[i] for i in batch for _ in range(num_samples)],
                          stop_tokens[0] if stop_tokens else 0, device)
        out = generate(model, x, max_new_tokens, temperature, top_k, top_p, stop_tokens=stop_tokens,
                       generator=generator, pad=pad if pad.any() else None,
                       finished=None if finished is None else lambda _, new: finished(new))
        out = out[:, min(x.size(1), bs):].tolist()
        for j, i in enumerate(batch):
            replies[i] = [until_stop(row, stop_tokens) for row in out[j * num_samples:(j + 1) * num_samples]]
        if progress is not None:
            progress(len(batch))
    return replies


def until_stop(row, stop_tokens):
    """A generated row up to (not including) its first stop token."""
    ends = [k for k, t in enumerate(row) if t in stop_tokens]
    return row[:ends[0]] if ends else row


def chat_replies(model, enc, conversations, num_samples=1, max_new_tokens=128, temperature=0.0, top_k=None,
                 top_p=None, generator=None, batch_rows=64):
    """The model's next assistant message(s) after each conversation, num_samples per conversation, as
    text: complete() after the chat template's generation prompt, stopped at <|im_end|>."""
    prompts = [render_chat(enc, messages, generation_prompt=True)[0][-model.config.block_size:]
               for messages in conversations]
    end = enc.encode_single_token("<|im_end|>")
    replies = complete(model, prompts, max_new_tokens, temperature, top_k, top_p, (end,), num_samples, generator,
                       batch_rows)
    return [[text_of(enc, r) for r in rs] for rs in replies]


def text_of(enc, ids, skip_special=False):
    """Generated ids as text, without the vocabulary's padding ids (past the tokenizer) and, with
    skip_special, without special tokens (as a Hugging Face tokenizer's decode(skip_special_tokens=True))."""
    specials = {enc.encode_single_token(s) for s in enc.special_tokens_set} if skip_special else ()
    return enc.decode([t for t in ids if t < enc.n_vocab and t not in specials])

# ----------------------------------------------------------------------------- scoring


def token_logps(logits, targets):
    """The log-probability of each target token (B, T); 0 where there is none (-100)."""
    logp = torch.gather(logits.float().log_softmax(-1), 2, targets.clamp(min=0)[..., None])[..., 0]
    return logp * (targets != -100)


def sequence_logps(logits, targets):
    """Per row: the summed log-probability of its targets, and how many there are (-100 = none)."""
    return token_logps(logits, targets).sum(-1), (targets != -100).sum(-1)


def encode_pair(enc, context, continuation):
    """(context tokens, continuation tokens): the continuation's are the tokens of context + continuation
    after the context's own; spaces ending the context move to the continuation first (the harness's
    _encode_pair)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = enc.encode_ordinary(context + continuation), enc.encode_ordinary(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model, pairs, batch_tokens=16384, progress=None):
    """The summed log-probability of each (context ids, continuation ids) pair's continuation after its
    context. A sequence longer than block_size + 1 loses its oldest tokens. Pairs run longest first, as
    many per forward as fit in batch_tokens, right-padded: a causal model's logits at the real positions
    do not see the padding. progress(n) is told as each batch of n pairs is scored."""
    T = model.config.block_size
    device = next(model.parameters()).device
    seqs = []
    for ctx, cont in pairs:
        seq = (list(ctx) + list(cont))[-(T + 1):]
        n = min(len(cont), len(seq) - 1)
        seqs.append((seq[:-n], seq[-n:]))
    order = sorted(range(len(seqs)), key=lambda i: -sum(map(len, seqs[i])))
    out = [0.0] * len(seqs)
    i = 0
    while i < len(order):
        width = sum(map(len, seqs[order[i]])) - 1
        batch = order[i:i + max(1, batch_tokens // width)]
        rows = completion_rows([seqs[j] for j in batch], 0)
        targets = rows["targets"].to(device)
        logp = token_logps(model(rows["idx"].to(device))[0], targets)
        for row, j in enumerate(batch):
            out[j] = logp[row, targets[row] != -100].sum().item()
        i += len(batch)
        if progress is not None:
            progress(len(batch))
    return out
