"""
attention.py: scaled dot-product attention from first principles, then the variants inference
engines care about.

    python attention.py          # checks every version against F.scaled_dot_product_attention
    python bench.py --topic attention --plot

What you will learn, in order
1. Naive attention: softmax(Q K^T / sqrt(d)) V, every intermediate materialised, shapes at each step.
2. Causal masking, including the case inference needs: T new queries against S >= T keys.
3. Multi-head attention (MHA) from a hidden state: one fused QKV projection, split heads, merge.
4. Grouped-query attention (GQA) and multi-query attention (MQA): fewer K/V heads than Q heads,
   shared without copying K/V. Why: the KV cache (and the bytes a decode step must read) shrinks
   by n_head / n_kv_head.
5. Prefill vs decode: decode is the same computation for ONE query row, so it is a matrix-vector
   product per head, memory-bound, and needs no mask at all.

Shapes used throughout: B batch, H query heads, Hkv key/value heads, T queries, S keys, D head_dim.
Everything here is plain PyTorch and is checked against F.scaled_dot_product_attention (SDPA), the
fused kernel PyTorch dispatches to FlashAttention / cuDNN / memory-efficient backends on a GPU.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# 1. Naive attention
# ----------------------------------------------------------------------------------------------

def naive_attention(q, k, v, mask=None, scale=None):
    """softmax(q k^T * scale + mask) v with every step spelled out.

    q: (B, H, T, D), k/v: (B, H, S, D), mask: bool (T, S) or broadcastable, True = may attend.
    Memory: the score matrix is (B, H, T, S) floats. For B=8, H=12, T=S=4096 in fp32 that is
    6.4 GB, the reason fused kernels (flash_attn.py) never materialise it.
    FLOPs: 2*T*S*D for q k^T plus 2*T*S*D for p v: 4*B*H*T*S*D in total.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale          # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # softmax subtracts the row max before exp (inside F.softmax), so exp never overflows
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)   # (B, H, T, S), rows sum to 1
    return probs @ v                                   # (B, H, T, D)


# ----------------------------------------------------------------------------------------------
# 2. Causal masking
# ----------------------------------------------------------------------------------------------

def causal_mask(T: int, S: int, device=None) -> torch.Tensor:
    """Bool (T, S): the T queries are the LAST T positions of the S-long sequence.

    T == S is training-style prefill (lower triangle). T < S is what inference does: a decode
    step (T=1) or a chunk of prompt appended to a cache, where query i sits at position S-T+i and
    sees keys 0..S-T+i. Note: torch's is_causal=True aligns the triangle to the TOP-left, which is
    wrong for T < S; that is why decode paths pass an explicit mask or none at all.
    """
    query_pos = torch.arange(S - T, S, device=device)[:, None]     # (T, 1)
    key_pos = torch.arange(S, device=device)[None, :]              # (1, S)
    return key_pos <= query_pos


def causal_attention(q, k, v):
    """Naive attention with the causal mask; q (B, H, T, D), k/v (B, H, S, D), T <= S."""
    return naive_attention(q, k, v, causal_mask(q.shape[-2], k.shape[-2], q.device))


# ----------------------------------------------------------------------------------------------
# 3. Multi-head attention from a hidden state
# ----------------------------------------------------------------------------------------------

def split_heads(x, n_heads):
    """(B, T, n_heads * D) -> (B, n_heads, T, D)"""
    B, T, C = x.shape
    return x.view(B, T, n_heads, C // n_heads).transpose(1, 2)


def merge_heads(x):
    """(B, H, T, D) -> (B, T, H * D)"""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)


def multi_head_attention(x, w_qkv, b_qkv, w_out, b_out, n_head, n_kv_head=None, attend=causal_attention):
    """Self-attention of x (B, T, C) as in model.py's Attention, written as a plain function.

    w_qkv: ((n_head + 2 * n_kv_head) * D, C), one GEMM for all three projections;
    w_out: (C, n_head * D). With n_kv_head < n_head this is GQA (section 4), computed by
    grouped_query_attention (causal); `attend` is used for MHA only.
    """
    n_kv_head = n_kv_head or n_head
    D = w_out.shape[1] // n_head
    q, k, v = F.linear(x, w_qkv, b_qkv).split([n_head * D, n_kv_head * D, n_kv_head * D], dim=-1)
    q, k, v = split_heads(q, n_head), split_heads(k, n_kv_head), split_heads(v, n_kv_head)
    y = attend(q, k, v) if n_kv_head == n_head else grouped_query_attention(q, k, v)
    return F.linear(merge_heads(y), w_out, b_out)


# ----------------------------------------------------------------------------------------------
# 4. GQA and MQA
# ----------------------------------------------------------------------------------------------
#
# Llama-3-8B has 32 query heads and 8 KV heads; SmolLM2-135M 9 and 3. Each group of
# G = H / Hkv query heads reads the same K and V. Two ways to compute it:
#   - repeat K/V G times to H heads and run MHA: simple, but it materialises G copies of the
#     cache (for a decode step that multiplies the bytes read by G, the very cost GQA avoids);
#   - fold the group into the query-row dimension: q (B, Hkv, G*T, D) against k (B, Hkv, S, D).
#     One K/V read serves G*T query rows: the matmuls get G times taller, the bytes stay the same.

def gqa_by_repeat(q, k, v, causal=True):
    """The simple way: copy each KV head G times. k/v: (B, Hkv, S, D) -> (B, H, S, D)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    return causal_attention(q, k, v) if causal else naive_attention(q, k, v)


def grouped_query_attention(q, k, v, causal=True, scale=None):
    """GQA without copying K/V: q (B, H, T, D), k/v (B, Hkv, S, D) -> (B, H, T, D).

    Query head h uses KV head h // G (the Hugging Face / Llama convention). scale: default
    1/sqrt(D).
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    qg = q.reshape(B, Hkv, G * T, D)                       # group g's T rows, stacked
    mask = causal_mask(T, S, q.device).repeat(G, 1) if causal else None   # (G*T, S)
    return naive_attention(qg, k, v, mask, scale).reshape(B, H, T, D)


# ----------------------------------------------------------------------------------------------
# 5. Prefill vs decode
# ----------------------------------------------------------------------------------------------
#
# Prefill: T = S = prompt length. Q K^T is a (T, D) x (D, S) GEMM per head: 2*T*S*D FLOPs over
#   (T+2S)*D*2 bytes of q, k, v (fp16): arithmetic intensity ~T/3 FLOP/byte, compute-bound
#   beyond a few hundred tokens.
# Decode: T = 1. The same formulas with T=1: 4*S*D FLOPs over ~4*S*D bytes (K and V read once,
#   fp16): ~1 FLOP/byte, ~300x below what an H100 needs to be compute-bound. So decode
#   attention runs at memory speed and its cost is the KV bytes it reads, which is why GQA, KV
#   quantisation and paged caches (no padding) all target those bytes.
# The last query row sees every key, so decode needs no mask.

def decode_attention(q, k, v):
    """One new query per sequence against all S cached keys. q: (B, H, 1, D), k/v: (B, Hkv, S, D)."""
    if k.shape[1] != q.shape[1]:
        return grouped_query_attention(q, k, v, causal=False)
    return naive_attention(q, k, v)


def sdpa(q, k, v, causal=True):
    """The reference: PyTorch's fused attention (GQA-aware through enable_gqa). For T < S and
    causal we pass the bottom-right-aligned mask, since is_causal aligns top-left."""
    gqa = k.shape[1] != q.shape[1]
    T, S = q.shape[-2], k.shape[-2]
    if causal and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = causal_mask(T, S, q.device) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def random_qkv(B, H, Hkv, T, S, D, dtype=torch.float32, device="cpu", generator=None):
    """Fresh random q (B, H, T, D), k/v (B, Hkv, S, D)."""
    def r(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=torch.float32).to(dtype)
    return r(B, H, T, D), r(B, Hkv, S, D), r(B, Hkv, S, D)


# ----------------------------------------------------------------------------------------------
# Demo
# ----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Check naive / causal / MHA / GQA / MQA / decode "
                                "attention against F.scaled_dot_product_attention.")
    from model import add_device_arg, cli_device      # the shared CLI pieces (only the demo needs them)
    p.add_argument("--seq", type=int, default=37, help="sequence length (odd on purpose)")
    add_device_arg(p)
    args = p.parse_args(argv)
    if args.seq < 1:
        p.error(f"--seq must be >= 1, got {args.seq}")
    cli_device(p, args.device)
    torch.manual_seed(0)
    B, H, D, T = 2, 8, 64, args.seq
    rows = []
    for name, Hkv in (("MHA", 8), ("GQA 8:2", 2), ("MQA 8:1", 1)):
        q, k, v = random_qkv(B, H, Hkv, T, T, D, device=args.device)
        ref = sdpa(q, k, v)
        mine = causal_attention(q, k, v) if Hkv == H else grouped_query_attention(q, k, v)
        rep = gqa_by_repeat(q, k, v)
        dec = decode_attention(q[:, :, -1:], k, v)
        rows.append((name, (mine - ref).abs().max().item(), (rep - ref).abs().max().item(),
                     (dec - ref[:, :, -1:]).abs().max().item()))
    print(f"B={B} H={H} D={D} T={T} fp32 on {args.device}: max |ours - SDPA|\n")
    print("| variant | prefill (no K/V copy) | prefill (repeat K/V) | decode row |")
    print("| --- | --- | --- | --- |")
    for name, a, b, c in rows:
        print(f"| {name} | {a:.1e} | {b:.1e} | {c:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
