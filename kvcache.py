"""
kvcache.py: the KV cache, the one data structure every LLM inference engine is built around.

    python kvcache.py            # with vs without cache on a small GPT-2, memory table, layout picture
    python bench.py --topic kv --plot

What you will learn
1. Why a cache: token t's keys and values depend only on tokens <= t, so they never change once
   computed. Without a cache, step n recomputes all n tokens through every layer: O(n) work per
   step, O(n^2) per sequence. With a cache, step n computes ONE token and reads n cached K/V
   rows: O(1) matmul work plus an O(n) read.
2. Decode-only attention: one query row per sequence against that row's cached keys, masked by
   each sequence's own length (rows of a batch have different lengths).
3. How much memory it costs: 2 (K and V) * n_layer * n_kv_head * head_dim * bytes per token, per
   sequence. GPT-2 124M in fp16: 36 KiB/token; 1.5B: 300 KiB/token, so 32 sequences of 1024
   tokens need 9.4 GiB, more than the 2.9 GiB of weights. The cache, not the weights, limits the
   batch size, which limits throughput. That is the story of serve.py's paged cache.
4. What the cache looks like in memory (the layout picture), so that "paged", "contiguous" and
   "head-major" mean something concrete.

The cache class itself (`KVCache`) lives in model.py, because the reference `generate()` there
uses it; this file explains it, measures it, and builds the no-cache baseline.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from model import (add_device_arg, cli_device, KVCache, ModelConfig, PRESETS, Transformer, check_request,
                   generate, kv_bytes_per_token, load_gpt2)


# ----------------------------------------------------------------------------------------------
# 1. Generation without and with a cache
# ----------------------------------------------------------------------------------------------
#
# "With" is model.generate(): prefill the prompt into a preallocated KVCache once, then decode one
# token per step. "Without" is below: the same greedy tokens, recomputed from scratch each step.

@torch.no_grad()
def generate_without_cache(model: Transformer, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy generation that recomputes the whole sequence at every step.

    Step n pushes len(prompt) + n tokens through all layers again: for GPT-2 124M at 1000 tokens
    that is ~250 GFLOP per new token instead of ~0.25 GFLOP.
    """
    seq = torch.tensor([prompt], device=model.device)
    out = []
    for _ in range(max_new_tokens):
        logits = model(seq)[:, -1]                 # (1, vocab): only the last row is used
        token = logits.argmax(-1)
        out.append(int(token))
        seq = torch.cat([seq, token[:, None]], dim=1)
    return out


# ----------------------------------------------------------------------------------------------
# 2. Decode-only attention over the cache
# ----------------------------------------------------------------------------------------------

def decode_only_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          lengths: torch.Tensor) -> torch.Tensor:
    """One query per row against that row's first lengths[b] cached keys.

    q: (B, H, D); k_cache/v_cache: (B, Hkv, S, D) with S >= max(lengths); lengths: (B,).
    Returns (B, H, D). Slots at or past a row's length are masked out, which is what lets rows of
    different lengths share one batched step (continuous batching, batching.py).

    Per row and head this is a matrix-vector product: scores (S,) = K (S, D) @ q (D,). Each cached
    byte is used for one multiply-add, so the time is the KV bytes over memory bandwidth.
    """
    B, H, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    G = H // Hkv                                                  # query heads per KV head
    qg = q.view(B, Hkv, G, D).float()
    scores = torch.einsum("bkgd,bksd->bkgs", qg, k_cache.float()) / math.sqrt(D)   # (B, Hkv, G, S)
    valid = torch.arange(S, device=q.device)[None, :] < lengths[:, None]            # (B, S)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("bkgs,bksd->bkgd", probs, v_cache.float())                   # (B, Hkv, G, D)
    return out.reshape(B, H, D).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# 3. Memory growth vs sequence length
# ----------------------------------------------------------------------------------------------

def kv_cache_bytes(cfg: ModelConfig, seq_len: int, batch: int, dtype: torch.dtype) -> int:
    """The formula: batch * seq_len * 2 * n_layer * n_kv_head * head_dim * bytes."""
    return batch * seq_len * kv_bytes_per_token(cfg, dtype)


def measure_cache_memory(cfg: ModelConfig, seq_len: int, batch: int, dtype: torch.dtype,
                         device: torch.device) -> int:
    """Bytes the allocator hands out for a cache of seq_len slots.

    On a GPU: torch.cuda.memory_allocated() before and after, i.e. what the caching allocator
    really reserved for the tensors (it rounds each block up to 512 B). On a CPU there are no
    allocator statistics, so we report the tensors' own sizes (say so when printing).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        cache = KVCache(cfg, batch, seq_len, dtype, device)
        torch.cuda.synchronize(device)
        used = torch.cuda.memory_allocated(device) - before
        del cache
        return used
    return KVCache(cfg, batch, seq_len, dtype, device).nbytes()


# ----------------------------------------------------------------------------------------------
# 4. Layout pictures
# ----------------------------------------------------------------------------------------------
#
# model.KVCache stores k as one tensor (n_layer, batch, n_kv_head, max_len, head_dim), row-major.
# Strides in elements: head_dim is contiguous; one token of one head is head_dim * bytes (128 B
# for GPT-2 fp16); one head of one row is a (max_len, head_dim) slab, so a decode step of row b,
# head h reads one contiguous block of lengths[b] * 128 B. Unused slots past each row's length are
# the "reserved but empty" memory a paged cache (serve.py) hands to other sequences instead.

def layout_text(lengths: list[int], max_len: int, cfg: ModelConfig, dtype=torch.float16, width=48) -> str:
    """A compact terminal picture of one layer's K cache: a line per (row, head)."""
    per_slot = cfg.head_dim * torch.finfo(dtype).bits // 8
    scale = max(1, math.ceil(max_len / width))
    lines = [f"K cache, layer 0 of {cfg.n_layer}: shape (batch={len(lengths)}, kv_heads={cfg.kv_heads}, "
             f"max_len={max_len}, head_dim={cfg.head_dim}), {per_slot} B per slot; "
             f"one char = {scale} slot(s); # filled, . reserved but empty", ""]
    heads = list(range(cfg.kv_heads)) if cfg.kv_heads <= 3 else [0, 1, cfg.kv_heads - 1]
    for b, n in enumerate(lengths):
        for h in heads:
            filled = n // scale
            bar = "#" * filled + "." * (math.ceil(max_len / scale) - filled)
            lines.append(f"row {b} head {h:>2} |{bar}| {n:>4}/{max_len}")
        if cfg.kv_heads > 3:
            lines.append(f"      ... {cfg.kv_heads - 3} more heads of row {b}")
    used = sum(lengths)
    lines += ["", f"filled {used} of {len(lengths) * max_len} slots "
                  f"({100 * used / (len(lengths) * max_len):.0f}%): the rest is reserved, unused memory"]
    return "\n".join(lines)


def plot_layout(lengths: list[int], max_len: int, cfg: ModelConfig, path, dtype=torch.float16):
    """PNG: the cache tensor as a grid, (row, head) down, slot across, filled vs reserved."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    n_rows = len(lengths) * cfg.kv_heads
    grid = np.zeros((n_rows, max_len))
    for b, n in enumerate(lengths):
        grid[b * cfg.kv_heads:(b + 1) * cfg.kv_heads, :n] = 1 + (b % 2)
    fig, ax = plt.subplots(figsize=(10, 0.25 * n_rows + 1.8))
    ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="Blues", vmin=0, vmax=2.2)
    ax.set_yticks([b * cfg.kv_heads + cfg.kv_heads / 2 - 0.5 for b in range(len(lengths))])
    ax.set_yticklabels([f"seq {b}\n({n} tok)" for b, n in enumerate(lengths)])
    for b in range(1, len(lengths)):
        ax.axhline(b * cfg.kv_heads - 0.5, color="black", lw=1)
    ax.set_xlabel(f"slot (position) 0..{max_len - 1}; each slot = head_dim {cfg.head_dim} x "
                  f"{torch.finfo(dtype).bits // 8} B, contiguous")
    ax.set_title(f"Contiguous KV cache, one layer's K: (batch {len(lengths)}, kv_heads {cfg.kv_heads}, "
                 f"max_len {max_len}, head_dim {cfg.head_dim}); white = reserved but empty "
                 f"({100 * (1 - sum(lengths) / (len(lengths) * max_len)):.0f}% of it)", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Demo
# ----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    import time
    p = argparse.ArgumentParser(description="KV cache: with vs without, memory, layout.")
    p.add_argument("--model", default="random:tiny", help="random:<preset> or a GPT-2 checkpoint")
    p.add_argument("--tokens", type=int, default=64, help="new tokens to generate")
    add_device_arg(p)
    args = p.parse_args(argv)
    cli_device(p, args.device)
    try:
        model = load_gpt2(args.model, torch.float32, args.device)
        prompt = list(range(100, 132))
        check_request(model.cfg, prompt, args.tokens)    # 32 + tokens must fit the context
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    slow = generate_without_cache(model, prompt, args.tokens)
    t1 = time.perf_counter()
    fast = generate(model, prompt, args.tokens)   # model.py's loop: prefill once, then decode
    t2 = time.perf_counter()
    print(f"{args.model}: {args.tokens} greedy tokens from a 32-token prompt")
    print(f"  without cache: {t1 - t0:.3f} s   with cache: {t2 - t1:.3f} s   "
          f"same tokens: {slow == fast}\n")
    print("| model | KV bytes/token (fp16) | 1024 tokens | 32 x 1024 tokens |")
    print("| --- | --- | --- | --- |")
    for name in ("124M", "355M", "774M", "1.5B"):
        cfg = PRESETS[name]
        per = kv_bytes_per_token(cfg, torch.float16)
        print(f"| GPT-2 {name} | {per / 1024:.0f} KiB | {kv_cache_bytes(cfg, 1024, 1, torch.float16) / 2**20:.0f} MiB "
              f"| {kv_cache_bytes(cfg, 1024, 32, torch.float16) / 2**30:.1f} GiB |")
    print()
    print("The cache's layout for GPT-2 124M's shape (3 sequences of 37, 120 and 5 tokens, max_len 128):")
    print(layout_text([37, 120, 5], 128, PRESETS["124M"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
