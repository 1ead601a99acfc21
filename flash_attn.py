"""
flash_attn.py: FlashAttention-style attention in Triton, for prefill and for paged decode.

What you will learn:
  - why naive attention is slow and memory hungry: it writes the N x N score matrix to memory
  - the online softmax: how a running max and a running sum let us see the keys a tile at a
    time, so the N x N matrix never exists (memory O(N), one pass over K and V)
  - FlashAttention-2 tiling in Triton: one program per (query tile, head), K/V streamed
    through shared memory, causal tiles above the diagonal skipped, GQA without copying K/V,
    packed variable-length batches (the layout a serving engine's batched prefill uses)
  - FlashAttention-3 on Hopper, in Gluon (Triton's lower-level dialect): warp specialisation,
    a producer warp feeding a shared-memory ring by TMA against mbarriers, and two consumer
    warpgroups whose softmax and tensor-core work overlap each other (Part 3b)
  - flash-decoding: one new token per sequence against a *paged* KV cache, with the sequence
    split across programs (split-K) and the pieces merged by whichever program finishes last
  - what paging costs: on a contiguous cache a decode kernel can ask for its first K/V tiles
    before loading anything else; the paged kernel first waits for a length and a block id
    (~1% of a 240 us call at batch 32: Part 4c); and what the ragged end of a kernel that fits
    in one wave costs, seen by having each program record its start, end and SM (~5 us of
    240 at batch 32 x 8k, HBM idling while the last programs finish), and why work stealing
    did not win it back
  - what a memory-bound loop waits for: with two buffers Triton issues tile j+2's copies after
    tile j's math, so that math (barriers, address arithmetic) most likely sits on the memory
    path; FlashDecoding++'s unified max (a fixed softmax reference, checked after the loop,
    recomputed when it does not hold) takes the reductions out of the loop and brings decode to
    parity with cuDNN, a little ahead (Part 4c)
  - when a kernel is latency, not bandwidth: batch-1 multi-head decode written in Gluon (Triton's
    lower-level dialect) with a layout where each warp runs its own online softmax on the FMA
    units and one block barrier combines the warps, instead of a padded tensor-core tile
  - the roofline: prefill is compute bound (intensity ~ T/4 FLOP/byte causal, T/2 not), decode is memory
    bound (intensity ~ n_heads/n_kv_heads FLOP/byte), and what that means for each kernel

Run:
  python flash_attn.py            # checks both kernels against the references, small table
  python flash_attn.py --help
  python bench.py --topic flash   # timings vs PyTorch SDPA (cuDNN and FlashAttention-2), roofline
Without a GPU everything runs in the Triton interpreter (TRITON_INTERPRET=1, set below), slowly.

Version ladder (measured by bench.py on one NVIDIA H200, torch 2.11, triton 3.6, 2026-11-28;
prefill: causal bf16, 16k tokens per batch, H = 2048/D; decode: bf16, D=128, 32 query heads):
  prefill v0  attention_naive: scores (B, H, T, T) materialised, softmax, second matmul
              -> 25 TFLOP/s at T=8192 D=128; at T=10k with 32 heads, 12 GiB for the
              scores and probabilities
  prefill v1  PyTorch SDPA, two peers: default (cuDNN on Hopper) and FLASH_ATTENTION backend
              -> cuDNN 344-605 TFLOP/s, FlashAttention-2 218-319 TFLOP/s
  prefill v2  flash_attn / flash_attn_varlen, pointer loads + cp.async pipelining, causal tile
              skipping, unmasked off-diagonal loop, autotuned tiles
              -> 315-500 TFLOP/s; with the better of v2/v3 per shape (what bench reports):
                 1.27-1.57x the FA2 backend everywhere, vs cuDNN 0.87-0.96x at D=64 and
                 0.72-0.88x at D=128 (0.79x at T=4096, 0.77x at T=8192; the gap is discussed at
                 the end of Part 3). Fourteenth session's run: 1.27-1.54x FA2, 0.785x / 0.80x
                 cuDNN at D=128, T=4096 / 8192
  prefill v3  same kernel with use_tma=True (tiles moved by Hopper's TMA engine through
              device-side tensor descriptors) -> within -26%..+3% of v2; it wins only at D=128,
              T=2k-4k, so v2 (pointer loads) stays the default
  prefill v4  (eighteenth session, Hopper) flash_attn_hopper, Part 3b: a TMA producer warp and
              two consumer warpgroups (64 query rows each, their own online softmax, turns on
              mbarriers), in Gluon; flash_attn takes it for fp16/bf16, D=128 (D=64 from 2k
              tokens), T % 128 == 0
              -> causal D=128: 391-580 TFLOP/s, 0.933-0.957x / 0.945-0.95x / 0.968-1.04x cuDNN
                 at T = 4k / 8k / 16k in two runs (v2/v3 in the same runs: 0.76-0.78x / 0.77-0.79x /
                 0.80-0.88x); D=64 0.88-0.92x / 0.92-0.95x / 1.00-1.01x; 1.32-1.88x the FA2
                 backend; non-causal D=128 T=4k 0.99-1.03x cuDNN
  long        one sequence, 32 heads / 8 KV heads, D=128: 10k tokens 1.77 ms, 100k tokens 162 ms
              (507 TFLOP/s); extra memory = the output only (781 MiB at 100k), where the naive
              path would need 1,192 GiB. cuDNN: 1.49 ms and 140 ms (results/flash.md, H200).
  decode  v0  paged_decode_reference (Python loop over sequences; correctness only, not timed)
  decode  v1  paged_decode with num_splits=1: one program per (sequence, KV head)
              -> batch 4, context 32k: 0.61 ms (only 32 programs for 132 SMs; 2026-11-27)
  decode  v2  paged_decode, split-K (flash-decoding) + merge kernel (2026-11-27)
              -> batch 4, context 32k: 0.133 ms (4.6x v1); batch 32, context 8k: 0.252 ms =
                 4.3 TB/s, 0.97x SDPA
  decode  v3  (2026-11-28) whole-page tiles: one block id per tile, loads pipelined by
              num_stages; the merge done by the last split inside the kernel; splits rounded
              down to one wave -> on SDPA's own tensors 0.990-0.998x SDPA at batch 32 x 8k-16k
              (0.245 ms = 4.4 TB/s at 8k), 0.994x at batch 4 x 32k; the engine's random 16-token
              pages: 92.5-103% of the measured copy bandwidth (4.25 TB/s, read+write). (Timed
              eagerly, back to back, in an earlier run; the thirteenth session's eager sweep on
              another host had 32/32 heads at 0.97x, and the short 4 x 32k call host-bound.)
  decode  v4  (thirteenth session) the autotuner keyed by programs launched per SM, a 2-warp
              config for MHA -> in GPU time (CUDA-graph replay) ~0.99x SDPA at 32/8 heads, 0.994x
              at 32/32, 0.979x at batch 4 x 32k; batch 64 x 8k 0.85x -> 1.00x. At batch 1 the
              kernel also lets the next kernels launch before its first load (GPT-2 1.5B +2%).
              (fourteenth session: 0.987x / 0.992x / 1.00x / 0.971x in a rerun with SDPA timed
              twice. Two-tile splits also ask for their second tile before the wait: GPT-2 1.5B
              batch-1 decode +1%; bench flash's calls carry no new token, so not these rows.)
  decode  v5  (fifteenth session) small grids compiled with one pipelining stage where no tile
              loop runs (GPT-2 1.5B batch-1 decode +0.5-1.4%, 124M steps 3-4% shorter), and the
              new token's K/V loaded with q and first in the online softmax (1.5B +1-2%, slower
              at 280 tokens; 124M steps 2-3% shorter), each in its own one-process A/B; bench's
              batch-32 rows use the autotuned configs: unchanged.
  decode  v6  (seventeenth session) multi-head models at small grids (the engine's batch 1):
              _paged_decode_mha_kernel in Gluon, a softmax per warp and 1 block barrier after the
              PDL wait instead of 43, splits of up to 512 tokens -> GPT-2 1.5B batch-1 decode
              +8.6%, 124M +7% (one-process A/B); bench's rows (GQA, no new token): unchanged.
  decode  v7  (nineteenth session) contiguous_decode, Part 4c: SDPA's contract, no block table and
              no context length, so nothing to wait for before the first K/V loads; KV head
              fastest in the launch order -> batch 32 in bench (3 interleaved rounds, median): 0.994x /
              0.995x / 1.01x SDPA at 32 x 8k / 32 x 16k (32/8 heads) / 32 x 8k (32/32), where the
              paged kernel on the same tensors ran 0.987x / 0.991x / 0.996x (another H200: 0.995x /
              0.993x / 1.00x against 0.988x / 0.99x / 0.989x). No split: 0.38x at batch 4 x 32k,
              where paged_decode (0.975x) is the one to use. Twentieth session: trace= (each
              program's start, end and SM): at 32 x 8k the median program ends at 228 us, the
              last at 235-237; bench 0.993x / 0.992x / 1.00x in that run. Twenty-first session:
              progress marks in trace=: the ragged end as a bandwidth timeline (~5 us of idle
              HBM at 32 x 8k); work stealing drew the ends together and lost (Part 4c); bench
              0.994x / 0.996x / 1.01x.
  decode  v8  (twenty-third session) the tile loop's critical path: pointers stepped one tile a
              loop, and one pass against the fixed reference 0 (FlashDecoding++'s unified max;
              bf16 and fp32; a program whose scores leave the window recomputes with the running
              max) -> no reduction across warps inside the loop, 9 -> 3 barriers and 373 -> 220
              instructions a tile -> bench (three runs) 1.001-1.003x / 0.999-1.000x / 1.004-
              1.011x SDPA at 32 x 8k / 32 x 16k (32/8 heads) / 32 x 8k (32/32); paired
              1.003-1.004x / 1.001-1.003x / 1.014x.

What this file leaves out: the backward pass (inference only), dropout, attention bias/ALiBi,
sliding windows, and causal attention where queries are a suffix of a longer key sequence
(chunked prefill / prefix caching: q_len < k_len); the decode kernel covers one query token.
"""

import argparse
import functools
import math
import os

import torch

# Without CUDA, Triton kernels can still run in the Triton interpreter (numpy on the CPU). The
# variable must be set before triton is imported, because triton reads it at import time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.experimental import gluon  # noqa: E402  (the batch-1 multi-head decode kernel)
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: E402  (Part 3b)
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)

from attention import grouped_query_attention  # noqa: E402
from model import HelpFormatter, is_hopper, is_hopper_or_later, pdl_launch_args  # noqa: E402
import triton_matmul as tm  # noqa: E402  (pdl_signal, pdl_wait: the decode kernels' PDL hand-off; tma_descriptor: Part 3b)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_bf16_workaround(*tensors):
    """subtle: the Triton 3.6 interpreter multiplies the raw uint16 bit patterns of bfloat16
    operands in tl.dot (triton-lang/triton#11584, "not supported yet"). On CPU we therefore run
    bf16 inputs through the kernels as float32 and round the output back to bf16. On the GPU
    the kernels see real bf16."""
    if INTERPRET and tensors[0].dtype == torch.bfloat16:
        return [t.float() if t.dtype == torch.bfloat16 else t for t in tensors]
    return None


SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)  # tl.dot needs >= 16; 256 would not fit in registers

# -----------------------------------------------------------------------------
# Part 1. References: the plain PyTorch attention every kernel is checked against.
#
# Shapes: q (T, H, D), k/v (T, Hkv, D) for one sequence. GQA: query head h reads KV head
# h // (H // Hkv), so H/Hkv query heads share one K/V head (MHA: H == Hkv, MQA: Hkv == 1).


def _check_head_dim(head_dim):
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} not supported; use one of {SUPPORTED_HEAD_DIMS}")


def _checked_out(q, out, **tensors):
    """The output (a new tensor like q when out is None), after checking that it has q's shape
    and that it and every input are on q's device and dtype, with a contiguous last dim (the
    kernels read rows of head_dim with unit stride): clear errors instead of a Triton type
    error or a wrong read."""
    out = torch.empty_like(q) if out is None else out
    if out.shape != q.shape:
        raise ValueError(f"out must be {tuple(q.shape)}, got {tuple(out.shape)}")
    for name, t in dict(q=q, out=out, **tensors).items():
        if t.device != q.device or t.dtype != q.dtype:
            raise ValueError(f"{name} is {t.dtype} on {t.device}; expected q's {q.dtype} on {q.device}")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dim (stride {t.stride(-1)})")
    return out


def _memory_span(t):
    """[first byte, one past the last byte] that a view can touch (non-negative strides)."""
    start = t.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def _check_out_apart(written, /, written_name="out", **inputs):
    """The autotuned kernels refuse an output that overlaps an input: Triton's autotuner runs
    every config on the real arguments before the final launch, so an output written over q (say)
    would be read back as q by the next config (a wrong result, silently, on a tuning call only).
    Only views of one allocation can overlap, so the byte spans are compared only for those (this
    runs on every eager decode call); conservative: spans that interleave count as overlapping.
    written: the tensor the kernel writes (named written_name in the error)."""
    if written.numel() == 0 or written.is_meta:        # (meta tensors have no memory)
        return
    storage = written.untyped_storage().data_ptr()
    sharing = {name: t for name, t in inputs.items() if t.numel() and t.untyped_storage().data_ptr() == storage}
    if not sharing:                 # the common case: nothing more to compute
        return
    w_lo, w_hi = _memory_span(written)
    for name, t in sharing.items():
        lo, hi = _memory_span(t)
        if lo < w_hi and w_lo < hi:
            raise ValueError(f"{written_name} overlaps {name} in memory; pass a separate tensor (the autotuner "
                             f"replays the kernel on the real arguments)")


def _check_int32_span(name, rows, stride_row, heads, stride_head, head_dim):
    """The kernels keep a sequence's (or a cache block's) base address in int64 but add the row
    and head offsets inside it in int32: refuse a layout where those reach 2^31 elements."""
    if (rows - 1) * stride_row + (heads - 1) * stride_head + head_dim - 1 >= 2**31:
        raise ValueError(f"{name}: {rows} rows x {heads} heads with strides {stride_row}, {stride_head} "
                         f"exceed the int32 offsets of this teaching kernel")


def attention_reference(q, k, v, cu_seqlens, causal=True, scale=None):
    """Packed variable-length attention in float32, one sequence at a time, through
    attention.py's GQA (K/V shared by each group, never copied).
    q (total, H, D), k/v (total, Hkv, D), cu_seqlens int (n_seqs+1,) -> out (total, H, D)."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].float().transpose(0, 1)[None] for t in (q, k, v))   # (1, H, T, D)
        o = grouped_query_attention(qs, ks, vs, causal=causal, scale=scale)
        out[start:end] = o[0].transpose(0, 1).to(q.dtype)
    return out


def attention_naive(q, k, v, is_causal=True, scale=None):
    """Prefill v0, the "naive path" bench.py times: batched (B, H, T, D) like SDPA, in the input
    dtype, materialising the (B, H, T, T) scores. Memory: B*H*T*T*2 bytes for the scores alone,
    2 GiB at B=1, H=16, T=8192 and 300 GiB at T=100k: this is what FlashAttention removes."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale                                     # (B, H, T, T)
    if is_causal:
        t = q.shape[2]
        above = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    return scores.softmax(dim=-1) @ v


def naive_scores_bytes(batch, n_heads, seq_len, dtype_bytes=2):
    """Bytes the naive path needs for one copy of the score matrix (the softmax output is a
    second one of the same size)."""
    return batch * n_heads * seq_len * seq_len * dtype_bytes


# -----------------------------------------------------------------------------
# Part 2. The online softmax (the one idea behind FlashAttention).
#
# For one query row with scores s_1..s_N, attention is  o = sum_j exp(s_j - m) v_j / l  with
# m = max_j s_j and l = sum_j exp(s_j - m) (subtracting m keeps exp() from overflowing; it
# cancels between numerator and denominator). We want o while seeing the keys BLOCK_N at a
# time. Keep three running values after tiles 1..t:
#     m_t = max of all scores seen,  l_t = sum_j exp(s_j - m_t),  acc_t = sum_j exp(s_j - m_t) v_j
# When tile t+1 arrives with scores s' and values v':
#     m_{t+1}   = max(m_t, max s')
#     alpha     = exp(m_t - m_{t+1})          (<= 1: how much the old max was too small)
#     p         = exp(s' - m_{t+1})
#     l_{t+1}   = alpha * l_t + sum p
#     acc_{t+1} = alpha * acc_t + p @ v'
# Proof that this is exact: every old term was exp(s_j - m_t); multiplying by alpha turns it
# into exp(s_j - m_t + m_t - m_{t+1}) = exp(s_j - m_{t+1}), i.e. the term we would have had
# with the new max from the start. After the last tile, o = acc / l, with no approximation.
# FlashAttention-2 detail: divide by l once at the end, not per tile (saves BLOCK_M*D divides
# per tile), and keep acc in fp32.
#
# exp2 instead of exp: the GPU's special-function unit computes 2^x natively; exp(x) costs an
# extra multiply by log2(e). We fold log2(e) into the softmax scale once (qk_scale below), so
# all m, l, p are in base 2; exp2(x*log2(e) - m2) == exp(x - m) exactly in real arithmetic.
#
# The same three numbers also let two *partial* results be merged later (flash-decoding,
# Part 4): a partial (o_i = acc_i / l_i, lse_i = m_i + log2 l_i) carries all it needs.

LOG2E = 1.4426950408889634


# -----------------------------------------------------------------------------
# Part 3. Prefill: FlashAttention-2 forward.
#
# Grid: (query tiles, heads, sequences). A program owns BLOCK_M query rows of one head of one
# sequence. It loads its Q tile once (stays in registers), then walks K/V in BLOCK_N-row tiles:
#     S = Q K^T (BLOCK_M x BLOCK_N, wgmma)  ->  online softmax  ->  acc += P V (wgmma)
# The K/V tiles pass through shared memory; `num_stages` buffers let the loads of tile j+1
# (cp.async, or TMA with use_tma) fly while tile j is being multiplied.
# HBM traffic: Q, O once; K, V once per query tile, i.e. T/BLOCK_M times, mostly from L2
# since neighbouring programs (grid axis 0 varies fastest) read the same K/V.
#
# Causal: query row i sees keys 0..i. For query tile [m0, m0+BLOCK_M):
#   - key tiles entirely left of m0 are fully visible: no mask needed (the fast loop)
#   - key tiles in [m0, m0+BLOCK_M) straddle the diagonal: apply the mask (the diagonal loop)
#   - key tiles at or beyond m0+BLOCK_M are fully masked: never loaded (half the work skipped)
# Non-causal: the fast loop covers whole BLOCK_N tiles; a final masked tile covers the ragged
# end of the sequence (key index >= seq_len gets -inf).
#
# Layouts: token t of sequence s, head h lives at  base + s*stride_s + (start_s + t)*stride_t
# + h*stride_h. Packed varlen (total, H, D): stride_s = 0 and start_s = cu_seqlens[s].
# Batched (B, H, T, D) as SDPA takes it: stride_s = H*T*D, start_s = 0, stride_t = D. One
# kernel, no transposed copies.


@triton.jit
def _load_kv_tile(src, row0, offs_n, offs_d, stride_t, seq_len,
                  MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """Load rows row0..row0+BLOCK_N of one head's K or V: (BLOCK_N, HEAD_DIM)."""
    # (if/else rather than an early return: Triton still compiles the code after a return
    # inside a constexpr branch, and `src + ...` is meaningless for a descriptor)
    if USE_TMA:
        # The descriptor knows the sequence length: rows past it arrive as zeros.
        tile = src.load([row0, 0])
    else:
        ptrs = src + (row0 + offs_n)[:, None] * stride_t + offs_d[None, :]
        if MASKED:
            tile = tl.load(ptrs, mask=(row0 + offs_n)[:, None] < seq_len, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _prefill_kv_loop(acc, m_i, l_i, q, k_src, v_src, offs_m, offs_n, offs_d,
                     stride_kt, stride_vt, seq_len, lo, hi, qk_scale,
                     MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                     USE_TMA: tl.constexpr):
    """Online softmax over key tiles [lo, hi). MASKED=False is the hot loop: no compares, no
    selects, every load unconditional (the caller guarantees all keys are visible)."""
    for start_n in range(lo, hi, BLOCK_N):
        k = _load_kv_tile(k_src, start_n, offs_n, offs_d, stride_kt, seq_len, MASKED, USE_TMA)
        s = tl.dot(q, tl.trans(k))                               # (BLOCK_M, BLOCK_N) raw scores
        if MASKED:
            visible = (start_n + offs_n)[None, :] < seq_len
            if CAUSAL:
                visible = visible & ((start_n + offs_n)[None, :] <= offs_m[:, None])
            s = tl.where(visible, s, float("-inf"))
        # The scale is applied to the row max (BLOCK_M multiplies) and inside the exponent,
        # where s*qk_scale - m compiles to one FMA per score instead of a multiply and a
        # subtract (valid because qk_scale > 0, so max(s)*qk_scale = max(s*qk_scale)).
        # m_new is finite for every row, so there is never an inf - inf: the first masked tile a
        # row meets holds a key it sees (key m0, the tile's first, for the causal diagonal; key
        # start_n for the ragged tail), and later tiles that hide all its keys (the second
        # diagonal tile for the top rows when BLOCK_M > BLOCK_N) only keep the finite m_i.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.math.exp2(m_i - m_new)                        # rescales the old terms
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv_tile(v_src, start_n, offs_n, offs_d, stride_vt, seq_len, MASKED, USE_TMA)
        # tl.dot(a, b, acc) accumulates inside the MMA (wgmma adds into its accumulator
        # registers); writing acc*alpha + tl.dot(p, v) would add a zeroed product plus one
        # extra BLOCK_M x D add per tile. P goes to bf16/fp16 for the tensor cores.
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


# max_seqlen and len_bucket are not specialised: Triton would otherwise compile a new variant
# when they happen to equal 1 or be divisible by 16. len_bucket (next power of two of
# max_seqlen) is unused by the code; it exists so that the autotuner can key on it.
@triton.jit(do_not_specialize=["max_seqlen", "len_bucket"])
def _flash_prefill_kernel(
    Q, K, V, O, cu_seqlens, qk_scale, max_seqlen, len_bucket,
    stride_qs, stride_qt, stride_qh,
    stride_ks, stride_kt, stride_kh,
    stride_vs, stride_vt, stride_vh,
    stride_os, stride_ot, stride_oh,
    GROUP: tl.constexpr,        # query heads per KV head (GQA)
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, USE_TMA: tl.constexpr,
):
    # the causal split below needs whole key tiles left of each query tile's diagonal
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "BLOCK_N must divide BLOCK_M")
    tile, head, seq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if CAUSAL:
        # Tiles near the end of the sequence do the most work (they see the most keys).
        # Launching them first shortens the tail where a few long programs run alone.
        tile = tl.num_programs(0) - 1 - tile
    if VARLEN:
        start = tl.load(cu_seqlens + seq).to(tl.int64)
        seq_len = (tl.load(cu_seqlens + seq + 1) - start).to(tl.int32)
    else:
        start = tl.zeros([], dtype=tl.int64)
        seq_len = max_seqlen
    m0 = tile * BLOCK_M
    if m0 >= seq_len:            # varlen: this sequence is shorter than the longest one
        return
    kv_head = head // GROUP      # GQA: share the KV head, never copy it
    seq64 = seq.to(tl.int64)
    q_base = Q + seq64 * stride_qs + start * stride_qt + head * stride_qh
    k_base = K + seq64 * stride_ks + start * stride_kt + kv_head * stride_kh
    v_base = V + seq64 * stride_vs + start * stride_vt + kv_head * stride_vh
    o_base = O + seq64 * stride_os + start * stride_ot + head * stride_oh

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if USE_TMA:
        # Device-side descriptors, one per program, bounded by *this* sequence's length, so
        # the hardware zero-fills rows of the next packed sequence and clips the O store.
        q_src = tl.make_tensor_descriptor(q_base, [seq_len, HEAD_DIM], [stride_qt, 1], [BLOCK_M, HEAD_DIM])
        k_src = tl.make_tensor_descriptor(k_base, [seq_len, HEAD_DIM], [stride_kt, 1], [BLOCK_N, HEAD_DIM])
        v_src = tl.make_tensor_descriptor(v_base, [seq_len, HEAD_DIM], [stride_vt, 1], [BLOCK_N, HEAD_DIM])
        o_dst = tl.make_tensor_descriptor(o_base, [seq_len, HEAD_DIM], [stride_ot, 1], [BLOCK_M, HEAD_DIM])
        q = q_src.load([m0, 0])
    else:
        k_src, v_src = k_base, v_base
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :],
                    mask=offs_m[:, None] < seq_len, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        # keys [0, m0) are visible to every row of this tile (BLOCK_N divides BLOCK_M)
        acc, m_i, l_i = _prefill_kv_loop(acc, m_i, l_i, q, k_src, v_src, offs_m, offs_n, offs_d,
                                         stride_kt, stride_vt, seq_len, 0, m0, qk_scale,
                                         False, CAUSAL, BLOCK_N, USE_TMA)
        diag_end = tl.minimum(m0 + BLOCK_M, seq_len)
        acc, m_i, l_i = _prefill_kv_loop(acc, m_i, l_i, q, k_src, v_src, offs_m, offs_n, offs_d,
                                         stride_kt, stride_vt, seq_len, m0, diag_end, qk_scale,
                                         True, CAUSAL, BLOCK_N, USE_TMA)
    else:
        full_end = (seq_len // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _prefill_kv_loop(acc, m_i, l_i, q, k_src, v_src, offs_m, offs_n, offs_d,
                                         stride_kt, stride_vt, seq_len, 0, full_end, qk_scale,
                                         False, CAUSAL, BLOCK_N, USE_TMA)
        acc, m_i, l_i = _prefill_kv_loop(acc, m_i, l_i, q, k_src, v_src, offs_m, offs_n, offs_d,
                                         stride_kt, stride_vt, seq_len, full_end, seq_len, qk_scale,
                                         True, CAUSAL, BLOCK_N, USE_TMA)
    out = (acc / l_i[:, None]).to(O.dtype.element_ty)
    if USE_TMA:
        o_dst.store([m0, 0], out)
    else:
        tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], out,
                 mask=offs_m[:, None] < seq_len)


# Tile sizes. On the GPU, triton.autotune times each config on the first call for every new
# (head_dim, causal, TMA, length bucket) and keeps the fastest. Why these: a wgmma is issued
# by a warpgroup (4 warps) on 64 rows, so BLOCK_M=128 is two 64-row slices (one per
# warpgroup with num_warps=8). The Q tile (BLOCK_M x D) and the fp32 accumulator live in
# registers, so D=128 wants 8 warps to stay under 255 registers per thread; D=64 can use 4.
# BLOCK_N=64/128: bigger tiles amortise the softmax bookkeeping, smaller ones leave room for
# 3-4 pipeline stages in the 227 KB of shared memory (one stage = K+V tile =
# 2*BLOCK_N*D*2 bytes = 64 KB at BLOCK_N=128, D=128).
# What the tuner picked on the H200: (64, 64, 4 warps, 3 stages) for T <= 2k (more programs
# for a small problem), (128, 128, 8, 3) at D=128 and (128, 64, 8, 3-4) at D=64 for T >= 4k.
# In the interpreter (CPU) we skip autotune: every config would be "timed" in numpy for
# seconds each, and small tiles (16/32) keep the interpreted tests fast while still giving
# several tiles per sequence, a diagonal split over two key tiles, and ragged ends.
# Each row is (BLOCK_M, BLOCK_N, num_warps, num_stages). Configs that spill registers when
# compiled for sm_90 (e.g. BLOCK_M=128 with 4 warps at D=128: 255 registers + a local-memory
# stack) were dropped from the lists.
# In an H200 sweep of fixed configs (2026-11-27), TMA loads were 5-10% slower than cp.async
# here. The autotuner times all of these per length
# bucket and does not always pick the fastest (flash.md of 2026-11-27: D=64 T=4096 fell to
# 0.83x cuDNN; 0.87x in the 2026-11-28 run).
# (Until 2026-11-28 the lists also held "warp-specialised" twins of three configs,
# tl.range(..., warp_specialize=True). Compiled for sm_90 by Triton 3.6 they are the same
# binary as their plain twins, byte for byte (the pass leaves a loop like this one alone on
# Hopper at 8 warps, and fails at 4), so the +5-8% once measured for them (H200) was run-to-run noise.
# They were removed: the tuner was timing the same kernel twice.)
_PREFILL_GPU_CONFIGS = {
    64: [(128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3), (128, 64, 4, 4),
         (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)],
    128: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2),
          (64, 64, 4, 3), (64, 64, 4, 4)],
}
_INTERPRET_PREFILL_CONFIG = dict(BLOCK_M=32, BLOCK_N=16)


def _prefill_configs(head_dim):
    rows = _PREFILL_GPU_CONFIGS.get(head_dim, [(64, 32, 4, 2), (64, 64, 4, 3)])
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in rows]


@functools.cache     # one autotuned kernel per head_dim (the configs differ per head_dim)
def _prefill_launcher(head_dim):
    return triton.autotune(
        configs=_prefill_configs(head_dim),
        key=["HEAD_DIM", "CAUSAL", "VARLEN", "USE_TMA", "GROUP", "len_bucket"],
    )(_flash_prefill_kernel)


def _tma_allocator(size, alignment, stream):
    # Device-side TMA descriptors are written to a small global scratch buffer at launch.
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _qk_scale(scale, head_dim):
    """The kernels' scale argument: the softmax scale (default 1/sqrt(D)) times log2(e), for exp2
    (Part 2)."""
    return (1.0 / math.sqrt(head_dim) if scale is None else scale) * LOG2E


def _prefill_qk_scale(scale, head_dim):
    """_qk_scale for the two prefill kernels, which fold it into the row max: it must be positive."""
    qk_scale = _qk_scale(scale, head_dim)
    if qk_scale <= 0:
        raise ValueError("scale must be positive (the kernel folds it into the row max)")
    return qk_scale


def _launch_prefill(q, k, v, out, cu_seqlens, n_seqs, max_seqlen, strides, causal, scale,
                    varlen, use_tma):
    head_dim, n_heads, n_kv_heads = q.shape[-1], strides["n_heads"], strides["n_kv_heads"]
    _check_head_dim(head_dim)
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads {n_heads} must be a multiple of n_kv_heads {n_kv_heads}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype {q.dtype} not supported")
    qk_scale = _prefill_qk_scale(scale, head_dim)
    for name, heads in (("q", n_heads), ("k", n_kv_heads), ("v", n_kv_heads), ("o", n_heads)):
        _, stride_t, stride_h = strides[name]
        _check_int32_span(name, max_seqlen, stride_t, heads, stride_h, head_dim)
    _check_out_apart(out, q=q, k=k, v=v)
    if use_tma and not INTERPRET:
        triton.set_allocator(_tma_allocator)
    args = (q, k, v, out, cu_seqlens, qk_scale, max_seqlen, triton.next_power_of_2(max_seqlen),
            *strides["q"], *strides["k"], *strides["v"], *strides["o"])
    meta = dict(GROUP=n_heads // n_kv_heads, HEAD_DIM=head_dim, CAUSAL=causal, VARLEN=varlen,
                USE_TMA=use_tma)
    if INTERPRET:
        cfg = _INTERPRET_PREFILL_CONFIG
        grid = (triton.cdiv(max_seqlen, cfg["BLOCK_M"]), n_heads, n_seqs)
        _flash_prefill_kernel[grid](*args, **meta, **cfg)
    else:
        grid = lambda c: (triton.cdiv(max_seqlen, c["BLOCK_M"]), n_heads, n_seqs)  # noqa: E731
        # keyed on len_bucket: the tuner re-times per length class, not per length
        _prefill_launcher(head_dim)[grid](*args, **meta)
    return out


def flash_attn_varlen(q, k, v, cu_seqlens, max_seqlen, causal=True, scale=None, use_tma=False, out=None):
    """Packed variable-length prefill: the serving engine's layout.
    q (total_tokens, n_heads, D), k/v (total_tokens, n_kv_heads, D), cu_seqlens int32 (n_seqs+1,)
    with cu_seqlens[0] = 0 and cu_seqlens[-1] = total_tokens, max_seqlen = longest sequence
    (not checked: reading cu_seqlens would cost a GPU->CPU sync per call; too small a max_seqlen
    leaves rows unwritten).
    Returns out (total_tokens, n_heads, D). Sequence s is rows cu_seqlens[s]:cu_seqlens[s+1];
    tokens of different sequences never attend to each other. `out` (like q) may be preallocated,
    apart from q, k and v (an overlapping one is refused: the autotuner replays the kernel)."""
    if upcast := _interpreter_bf16_workaround(q, k, v):
        res = flash_attn_varlen(*upcast, cu_seqlens, max_seqlen, causal, scale, use_tma).bfloat16()
        return res if out is None else out.copy_(res)
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected "
                         f"(total, H, D) and (total, Hkv, D) with the same total and D")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be 1-D with n_seqs + 1 >= 2 entries on {q.device}, "
                         f"got {tuple(cu_seqlens.shape)} on {cu_seqlens.device}")
    out = _checked_out(q, out, k=k, v=v)
    cu_seqlens = cu_seqlens.to(torch.int32).contiguous()    # the kernel reads it with unit stride
    strides = dict(n_heads=q.shape[1], n_kv_heads=k.shape[1],
                   q=(0, q.stride(0), q.stride(1)), k=(0, k.stride(0), k.stride(1)),
                   v=(0, v.stride(0), v.stride(1)), o=(0, out.stride(0), out.stride(1)))
    return _launch_prefill(q, k, v, out, cu_seqlens, cu_seqlens.numel() - 1,
                           int(max_seqlen), strides, causal, scale, True, use_tma)


def flash_attn(q, k, v, is_causal=True, scale=None, use_tma=False, out=None):
    """Batched convenience wrapper with SDPA's layout: q (B, H, T, D), k/v (B, Hkv, T, D) ->
    (B, H, T, D). On a Hopper GPU, Part 3b's kernel where hopper_prefill_unsupported allows it
    and hopper_prefill_preferred (HOPPER_PREFILL, and use_tma=False); otherwise the same kernel
    as flash_attn_varlen (stride_s = batch stride, no copies)."""
    if hopper_prefill_taken(q, k, v, out, use_tma):
        return flash_attn_hopper(q, k, v, is_causal, scale, out)
    if upcast := _interpreter_bf16_workaround(q, k, v):
        res = flash_attn(*upcast, is_causal, scale, use_tma).bfloat16()
        return res if out is None else out.copy_(res)
    if q.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected "
                         f"(B, H, T, D) and (B, Hkv, T, D) with the same B, T and D (q_len == k_len)")
    batch, n_heads, seq_len, _ = q.shape
    out = _checked_out(q, out, k=k, v=v)
    strides = dict(n_heads=n_heads, n_kv_heads=k.shape[1],
                   q=(q.stride(0), q.stride(2), q.stride(1)), k=(k.stride(0), k.stride(2), k.stride(1)),
                   v=(v.stride(0), v.stride(2), v.stride(1)), o=(out.stride(0), out.stride(2), out.stride(1)))
    return _launch_prefill(q, k, v, out, q, batch, seq_len, strides, is_causal, scale, False, use_tma)


# Why this is near the compute roof, and what cuDNN does beyond it. Causal prefill does
# 2*T^2*H*D FLOPs over 4*T*H*D*2 bytes of Q/K/V/O: at T=4096 that is ~1000 FLOP/byte, several
# times the ridge point (H200 measured: 746 TFLOP/s cuBLAS / 4.25 TB/s copy = 175 FLOP/byte).
# So the kernel is limited by how busy it keeps the tensor cores: measured 381-500 TFLOP/s at
# T >= 4096, 51-67% of cuBLAS (an attention tile also does softmax work a GEMM does not).
# cuDNN reaches 565-605 at D=128. Rough budget per 128x128 tile at D=128: two GEMMs of 2*128^3
# FLOPs at ~4096 dense bf16 FLOP/clock/SM = 2048 clocks, versus 128*128 exp2 at 16/clock/SM
# (the special-function unit) = 1024 clocks: unless the two overlap, the exponentials alone add
# 50% to the GEMM time. In this kernel they do not overlap: the same warps issue loads, run
# wgmma and do the softmax, and in the compiled loop (TTGIR) each QK^T wgmma is waited for at
# once (pendings = 0) together with the previous tile's P@V, so the tensor cores idle through
# every softmax. What was tried in plain Triton, measured on the H200 (results/perf_notes.md):
#   - tl.range(..., warp_specialize=True): on sm_90 Triton 3.6 leaves this loop alone (the same
#     binary, byte for byte, at 8 warps; at 4 warps the pass fails);
#   - issuing tile j+1's QK^T before tile j's softmax (FA3's intra-warpgroup overlap at the
#     source level): 0.74 vs 0.63 ms at D=128 T=4k, it needs a second fp32 score tile in registers;
#   - half of the exponentials as a cubic on the FMA pipe (FA4's trick): 0.66 vs 0.63 ms;
#   - TMA loads (use_tma=True, device-side descriptors): within -26%..+3%, the loads were not
#     the bottleneck; BLOCK_M=256 with 16 warps: slower.
# What closes the gap is FlashAttention-3's structure, warps with different jobs, which needs
# Gluon: Part 3b.


# -----------------------------------------------------------------------------
# Part 3b. Prefill on Hopper: FlashAttention-3's warp specialisation, written in Gluon.
#
# The kernel above leaves the tensor cores idle while a warpgroup computes its softmax (the
# budget above: 2048 clocks of wgmma and ~1024 of exp2 per 128 x 128 tile, one after the
# other). FlashAttention-3's answer is to give different warps different jobs, which plain
# Triton cannot express on sm_90 but Gluon (Triton's lower-level dialect: explicit layouts,
# shared memory, mbarriers, async wgmma) can. One program (CTA) owns 128 query rows of one head
# and has three partitions (gl.warp_specialize):
#
#   producer   1 warp, 24 registers: TMA-copies Q once, then K_j and V_j into a ring of
#              STAGES shared-memory slots; it waits on each slot's "empty" mbarrier before
#              refilling it, and the copy itself arrives on the slot's "ready" mbarrier.
#   consumer 0 4 warps (one warpgroup), 240 registers: query rows 0..63 of the tile.
#   consumer 1 4 warps, 240 registers: rows 64..127.
#
# Each consumer runs FlashAttention-2's online softmax (Part 2) on its 64 rows, but the two are
# independent instruction streams: while one does exp2/max/sum on the FMA and special-function
# units, the other's wgmma keeps the tensor cores busy, so per 128 x 128 tile the SM spends
# roughly max(both warpgroups' GEMMs ~2048 clocks, both softmaxes ~1024: the special-function
# units are the SM's, shared by the two) instead of their sum. With PINGPONG the
# consumers also take turns to *issue* their wgmmas (two mbarriers, FA3's "warp scheduler
# barrier"): warpgroup 0 issues S_j = Q K_j^T and P_{j-1} V_{j-1}, hands the turn over, and
# computes its softmax while warpgroup 1's pair runs. Inside a warpgroup the order is FA3's
# intra-warpgroup pipeline: S_j is issued before P_{j-1} V_{j-1}, waited for first
# (warpgroup_mma_wait(1)), and the softmax of S_j is meant to run while P_{j-1} V_{j-1} is still
# on the tensor cores.
#
# What the compiler made of it (sm_90 SASS, checked offline by a test): no spills, the
# registers handed over as asked (USETMAXREG), P fed to the second wgmma from registers (no
# round trip through shared memory). One thing did not survive: ptxas schedules the wait for
# P_{j-1} V_{j-1} early in the softmax (before the first exp2), whatever the PTX order, so the
# intra-warpgroup overlap is lost and what overlaps is the two warpgroups. Measured (H200, one
# process, causal bf16, 16k tokens per batch, eighteenth session): with and without the
# turn-taking within 0-3% of each other, and 2 or 3 stages the same; all far above Part 3:
#   D=128, T = 1k / 2k / 4k / 8k / 16k: 384 / 473 / 532 / 575 / 621 TFLOP/s, 0.91x / 0.96x /
#   1.01x / 1.02x / 1.07x cuDNN in the same process (Part 3's kernel: 0.74x-0.85x);
#   D=64: 274 / 351 / 403 / 430 / 456 TFLOP/s, 0.81x / 0.92x / 0.97x / 0.99x / 1.02x (Part 3's:
#   0.89x-0.94x, and faster at T=1k, so hopper_prefill_preferred leaves D=64 below 2k tokens
#   to it). bench.py --topic flash in two other calls: 0.957x / 0.945x / 1.04x and 0.933x /
#   0.95x / 0.968x cuDNN at D=128, T = 4k / 8k / 16k (results/flash.md): cuDNN's side moves by
#   up to 8% between runs (557 and 599 TFLOP/s at 16k), ours by ~2%.
# Why the earlier Gluon attempt (eighth session, 0.58-0.68x cuDNN) lost and this one wins: it
# had one 8-warp consumer doing all 128 rows, so its two warpgroups ran in lockstep (CTA-wide
# barriers around each refill) and nothing overlapped the softmax; here each warpgroup is its
# own partition with its own 64 rows, and the only thing they share is the K/V ring.
#
# Shapes it takes (hopper_prefill_unsupported says why not, and flash_attn falls back to Part
# 3; hopper_prefill_preferred leaves D=64 below 2k tokens to Part 3, which is faster there):
# a Hopper GPU, fp16/bf16, D = 64 or 128, the batched (B, H, T, D) layout contiguous, and
# T a multiple of 128, so that every tile is whole and TMA boxes never straddle two heads (the
# tensors are viewed as 2-D (rows, D) with one descriptor each). Causal tiles: BLOCK_N =
# BLOCK_M = 128, so only the last key tile of a query tile needs the mask.

HOPPER_PREFILL = True          # flash_attn takes flash_attn_hopper where it applies
HOPPER_PREFILL_STAGES = 2      # K/V ring slots: 2 x (K + V) x 128 x D x 2 bytes (128 KB at D=128)
HOPPER_PREFILL_PINGPONG = True
_HOPPER_HALF = 64              # query rows per consumer warpgroup (the wgmma M)
_HOPPER_BLOCK_M = 2 * _HOPPER_HALF
_HOPPER_BLOCK_N = 128
_HOPPER_MAXNREG = 168          # 12 warps x 32 x 168 = 64,512 of the SM's 65,536 registers


@gluon.jit
def _hopper_prefill_producer(descs, smem, bars, q_row, kv_row, n_tiles):
    q_desc, k_desc, v_desc = descs
    q_smem, k_ring, v_ring = smem
    q_ready, k_ready, v_ready, k_empty, v_empty = bars
    HALF: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    STAGES: gl.constexpr = k_ring.shape[0]
    mbarrier.expect(q_ready, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_ready, q_smem.index(0))
    tma.async_copy_global_to_shared(q_desc, [q_row + HALF, 0], q_ready, q_smem.index(1))
    for j in range(n_tiles):
        slot = j % STAGES
        # a fresh mbarrier counts as having completed the phase before phase 0, so the first
        # pass over the ring (parity 1) does not wait
        empty_phase = ((j // STAGES) & 1) ^ 1
        mbarrier.wait(k_empty.index(slot), empty_phase)
        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row + j * BLOCK_N, 0], k_ready.index(slot), k_ring.index(slot))
        mbarrier.wait(v_empty.index(slot), empty_phase)
        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [kv_row + j * BLOCK_N, 0], v_ready.index(slot), v_ring.index(slot))


@gluon.jit
def _hopper_prefill_consumer(descs, smem, bars, where, WG: gl.constexpr, CAUSAL: gl.constexpr,
                             PINGPONG: gl.constexpr):
    q_desc, k_desc, v_desc, o_desc = descs
    q_smem, k_ring, v_ring = smem
    q_ready, k_ready, v_ready, k_empty, v_empty, turns = bars
    q_row, kv_row, m0, n_tiles, qk_scale = where
    HALF: gl.constexpr = q_desc.block_type.shape[0]
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    STAGES: gl.constexpr = k_ring.shape[0]
    dtype: gl.constexpr = q_desc.dtype
    # wgmma's register layouts for 4 warps: S = Q K^T is (64, BLOCK_N) fp32, O is (64, D) fp32
    # (each thread: 64 of S, 64 of O at D=128); P enters the second wgmma from registers in the
    # operand layout of O's MMA, which the conversion below reaches without moving data.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    q = q_smem.index(WG)
    my_turn = turns.index(WG)
    their_turn = turns.index(1 - WG)
    turn_phase = 1 - WG          # warpgroup 0's first wait passes at once; 1 waits for 0's turn
    rows = m0 + WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, s_layout))   # in the sequence
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    zeros_s = gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_layout)
    mbarrier.wait(q_ready, 0)

    # turn 0: S_0 alone (there is no P V yet)
    if PINGPONG:
        mbarrier.wait(my_turn, turn_phase)
        turn_phase ^= 1
    mbarrier.wait(k_ready.index(0), 0)
    s_token = warpgroup_mma(q, k_ring.index(0).permute((1, 0)), zeros_s, use_acc=False, is_async=True)
    if PINGPONG:
        mbarrier.arrive(their_turn, count=1)
    s = warpgroup_mma_wait(0, deps=[s_token])
    mbarrier.arrive(k_empty.index(0), count=1)
    if CAUSAL:
        if n_tiles == 1:
            s = gl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
    m_i = gl.max(s, 1) * qk_scale        # every row sees key 0, so m_i is finite
    p = gl.exp2(s * qk_scale - m_i[:, None])
    l_i = gl.sum(p, 1)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    o = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=o_layout)

    # turns 1..n-1: S_j and P_{j-1} V_{j-1} issued together, the softmax of S_j in between
    for j in range(1, n_tiles):
        slot = j % STAGES
        prev = (j - 1) % STAGES
        if PINGPONG:
            mbarrier.wait(my_turn, turn_phase)
            turn_phase ^= 1
        mbarrier.wait(k_ready.index(slot), (j // STAGES) & 1)
        s_token = warpgroup_mma(q, k_ring.index(slot).permute((1, 0)), zeros_s, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
        o_token = warpgroup_mma(p_op, v_ring.index(prev), o, is_async=True)
        if PINGPONG:
            mbarrier.arrive(their_turn, count=1)
        s = warpgroup_mma_wait(1, deps=[s_token])      # S_j done; P_{j-1} V_{j-1} may still run
        mbarrier.arrive(k_empty.index(slot), count=1)
        if CAUSAL:
            if j == n_tiles - 1:                       # the diagonal tile: key > row is hidden
                s = gl.where((j * BLOCK_N + cols)[None, :] <= rows[:, None], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        p_next = gl.convert_layout(p.to(dtype), p_layout)
        # P_{j-1} is still read by the wgmma in flight, so it is named in the wait (its
        # registers must not receive P_j before then)
        o, p_op, p_next = warpgroup_mma_wait(0, deps=[o_token, p_op, p_next])
        mbarrier.arrive(v_empty.index(prev), count=1)
        o = o * gl.convert_layout(alpha, o_rows)[:, None]
        p_op = p_next

    # the last turn: P_{n-1} V_{n-1}
    last = (n_tiles - 1) % STAGES
    if PINGPONG:
        mbarrier.wait(my_turn, turn_phase)
    mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // STAGES) & 1)
    o_token = warpgroup_mma(p_op, v_ring.index(last), o, is_async=True)
    if PINGPONG:
        mbarrier.arrive(their_turn, count=1)
    o = warpgroup_mma_wait(0, deps=[o_token])
    o = o / gl.convert_layout(l_i, o_rows)[:, None]
    # Q's slot is no longer read: it stages the output for one TMA store
    q.store(o.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [q_row + WG * HALF, 0], q)
    tma.store_wait(0)


@gluon.jit
def _hopper_prefill_kernel(q_desc, k_desc, v_desc, o_desc, qk_scale, seq_len, n_heads, n_kv_heads,
                           CAUSAL: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
                           num_warps: gl.constexpr):
    HALF: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    BLOCK_M: gl.constexpr = 2 * HALF
    gl.static_assert(BLOCK_M == BLOCK_N)     # one diagonal key tile per query tile
    dtype: gl.constexpr = q_desc.dtype
    tile, head, batch = gl.program_id(0), gl.program_id(1), gl.program_id(2)
    if CAUSAL:
        tile = gl.num_programs(0) - 1 - tile          # the longest rows first (Part 3: why)
    kv_head = head // (n_heads // n_kv_heads)
    m0 = tile * BLOCK_M
    q_row = (batch * n_heads + head) * seq_len + m0               # rows of the 2-D (rows, D) views
    kv_row = (batch * n_kv_heads + kv_head) * seq_len
    if CAUSAL:
        n_tiles = tile + 1
    else:
        n_tiles = seq_len // BLOCK_N
    q_smem = gl.allocate_shared_memory(dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_ring = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_ring = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_ready, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)      # both consumers release a slot
        mbarrier.init(v_empty.index(i), count=2)
    mbarrier.init(turns.index(0), count=1)
    mbarrier.init(turns.index(1), count=1)
    descs = (q_desc, k_desc, v_desc, o_desc)
    smem = (q_smem, k_ring, v_ring)
    bars = (q_ready, k_ready, v_ready, k_empty, v_empty, turns)
    where = (q_row, kv_row, m0, n_tiles, qk_scale)
    gl.warp_specialize([
        (_hopper_prefill_consumer, (descs, smem, bars, where, 0, CAUSAL, PINGPONG)),   # rows 0..63
        (_hopper_prefill_consumer, (descs, smem, bars, where, 1, CAUSAL, PINGPONG)),   # rows 64..127
        (_hopper_prefill_producer, ((q_desc, k_desc, v_desc), smem, (q_ready, k_ready, v_ready, k_empty, v_empty),
                                    q_row, kv_row, n_tiles)),
    ], [4, 1], [240, 24])


def hopper_prefill_unsupported(q, k, v, out=None, capability=None):
    """None if flash_attn_hopper takes these (B, H, T, D) / (B, Hkv, T, D) tensors, else why
    not. capability: the GPU's (major, minor); None asks q's device (CPU tensors: unsupported)."""
    if capability is None:
        if INTERPRET or q.device.type != "cuda" or not is_hopper(q.device):
            return "needs a Hopper GPU (sm_90: wgmma) outside the interpreter"
    elif capability[0] != 9:
        return f"needs a Hopper GPU (sm_90: wgmma), not sm_{capability[0]}{capability[1]}"
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"needs fp16/bf16 q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] \
            or k.shape[2:] != q.shape[2:] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return f"needs (B, H, T, D) and (B, Hkv, T, D) with Hkv | H, got {tuple(q.shape)}, {tuple(k.shape)}"
    seq_len, head_dim = q.shape[2], q.shape[3]
    if head_dim not in (64, 128):
        return f"head_dim {head_dim}: only 64 and 128"
    if seq_len % _HOPPER_BLOCK_M:
        return f"T = {seq_len} is not a multiple of {_HOPPER_BLOCK_M}"
    if q.numel() == 0 or k.numel() == 0:
        return "empty input (a TMA descriptor needs every dimension > 0)"
    tensors = (q, k, v) if out is None else (q, k, v, out)
    if not all(t.device == q.device for t in tensors):
        return "q, k, v (and out) must be on one device"
    if not all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in tensors):
        return "needs contiguous, 16-byte aligned tensors (one TMA descriptor per tensor)"
    if q.numel() // head_dim >= 2**31:
        return "more than 2^31 rows: TMA coordinates are 32-bit"
    return None


def hopper_prefill_preferred(q):
    """Where flash_attn takes Part 3b among the shapes it supports: everywhere at D=128, from 2k
    tokens at D=64 (at 1k Part 3's kernel ran 0.89x cuDNN against Part 3b's 0.81x, H200)."""
    return q.shape[-1] == 128 or q.shape[2] >= 2048


def hopper_prefill_taken(q, k, v, out=None, use_tma=False):
    """Whether flash_attn runs Part 3b for these inputs (else Part 3's kernel)."""
    return (HOPPER_PREFILL and not use_tma and not INTERPRET
            and hopper_prefill_unsupported(q, k, v, out) is None and hopper_prefill_preferred(q))


def hopper_prefill_compile_job(head_dim, causal, dtype="bf16"):
    """The kernel as flash_attn_hopper launches it, as a job for tm.compile_offline (sm_90
    without a GPU: registers, spills, shared memory, SASS)."""
    half, tile = f"tma:{dtype}:{_HOPPER_HALF}x{head_dim}", f"tma:{dtype}:{_HOPPER_BLOCK_N}x{head_dim}"
    return ("flash_attn._hopper_prefill_kernel", dict(q_desc=half, k_desc=tile, v_desc=tile, o_desc=half),
            dict(qk_scale=0.5, seq_len=4096, n_heads=16, n_kv_heads=16),
            dict(CAUSAL=causal, STAGES=HOPPER_PREFILL_STAGES, PINGPONG=HOPPER_PREFILL_PINGPONG), 4, 1,
            dict(maxnreg=_HOPPER_MAXNREG))


def flash_attn_hopper(q, k, v, is_causal=True, scale=None, out=None):
    """FA3-style prefill (Part 3b): q (B, H, T, D), k/v (B, Hkv, T, D) -> (B, H, T, D), for the
    shapes hopper_prefill_unsupported accepts (it raises ValueError with its reason otherwise)."""
    if reason := hopper_prefill_unsupported(q, k, v, out):
        raise ValueError(f"flash_attn_hopper: {reason}")
    batch, n_heads, seq_len, head_dim = q.shape
    out = _checked_out(q, out, k=k, v=v)
    qk_scale = _prefill_qk_scale(scale, head_dim)
    half, tile = [_HOPPER_HALF, head_dim], [_HOPPER_BLOCK_N, head_dim]    # TMA boxes
    rows = lambda t: t.view(-1, head_dim)    # noqa: E731  (B, H, T, D) as (B*H*T, D)
    q_desc, o_desc = tm.tma_descriptor(rows(q), half), tm.tma_descriptor(rows(out), half)
    k_desc, v_desc = tm.tma_descriptor(rows(k), tile), tm.tma_descriptor(rows(v), tile)
    grid = (seq_len // _HOPPER_BLOCK_M, n_heads, batch)
    _hopper_prefill_kernel[grid](q_desc, k_desc, v_desc, o_desc, qk_scale, seq_len, n_heads, k.shape[1],
                                 is_causal, HOPPER_PREFILL_STAGES, HOPPER_PREFILL_PINGPONG,
                                 num_warps=4, maxnreg=_HOPPER_MAXNREG)
    return out


# -----------------------------------------------------------------------------
# Part 4. Decode over a paged KV cache (flash-decoding).
#
# LAYOUT CONTRACT (serve.py owns these tensors; this is what the kernel reads):
#   k_cache, v_cache : (num_blocks, block_size, n_kv_heads, head_dim), fp16/bf16/fp32.
#                      block_size is a power of two >= 16. Physical block b holds block_size
#                      consecutive tokens of one sequence.
#   block_table      : int32 (B, max_blocks_per_seq). block_table[s, j] is the physical block
#                      holding tokens j*block_size .. (j+1)*block_size-1 of sequence s. Entries
#                      past the sequence's last block are never read (may hold anything).
#   context_lens     : int32 (B,), >= 1: tokens of sequence s in the cache, including the token
#                      being decoded (its K/V are written before attention is called).
#   q                : (B, n_heads, head_dim), the new token's query  ->  out (B, n_heads, head_dim)
# A contiguous cache is a special case: (B, T, Hkv, D) with block_table[s, j] = s*(T/bs) + j,
# and SDPA's (B, Hkv, T, D) too, through strides (contiguous_as_paged), which is how bench.py
# compares with SDPA on SDPA's own tensors.
#
# Why split-K. Decode reads every cached K/V byte once and does only ~H/Hkv FLOPs per
# byte: pure bandwidth. One program per (sequence, KV head) gives B*Hkv programs, e.g.
# 4*8 = 32 at batch 4: a quarter of the 132 SMs, so most of the HBM bandwidth is never asked
# for (measured at batch 4, context 32k: 0.61 ms with one split, 0.13 ms with 8-16). Flash-
# decoding also splits the *sequence*: program (s, kv_head, split) handles tokens
# [split*L, (split+1)*L) and writes an unnormalised-but-rescalable partial (o_i, lse_i), and
# the partials are combined with the online-softmax algebra of Part 2:
#     M = max_i lse_i,  w_i = 2^(lse_i - M),  o = sum_i w_i o_i / sum_i w_i
# That merge used to be a second kernel. Here the last program of each (sequence, KV head) to
# finish does it (an atomic counter per pair says who is last), which saves a launch per
# attention call: 48 per GPT-2 1.5B decode step. Measured on the H200 (same process, CUDA
# graph, batch 1): 2.006 vs 2.024 ms per step, ~1%: a launch under PDL costs little.
# GQA: a program loads each K/V tile of its KV head once and uses it for all GROUP query heads
# of that head, as a (GROUP x D) @ (D x BLOCK_N) tl.dot (GROUP padded to 16 rows, the minimum
# MMA height; the padding costs tensor-core time, which decode has to spare).


def paged_decode_reference(q, k_cache, v_cache, block_table, context_lens, scale=None):
    """Gather each sequence's pages and run float32 attention for its one query token."""
    n_heads, head_dim = q.shape[1], q.shape[2]
    block_size, n_kv_heads = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.empty_like(q)
    for s, ctx in enumerate(context_lens.tolist()):
        blocks = block_table[s, : triton.cdiv(ctx, block_size)].long()
        k = k_cache[blocks].reshape(-1, n_kv_heads, head_dim)[:ctx].float()     # (ctx, Hkv, D)
        v = v_cache[blocks].reshape(-1, n_kv_heads, head_dim)[:ctx].float()
        k = k.repeat_interleave(n_heads // n_kv_heads, dim=1).transpose(0, 1)   # (H, ctx, D)
        v = v.repeat_interleave(n_heads // n_kv_heads, dim=1).transpose(0, 1)
        scores = (k @ q[s].float()[:, :, None]).squeeze(-1) * scale             # (H, ctx)
        out[s] = (scores.softmax(-1)[:, None, :] @ v).squeeze(1).to(q.dtype)
    return out


def _store_new_kv_reference(k_cache, v_cache, k_new, v_new, slot_mapping):
    """What paged_decode(new_kv=...) stores: row slot of the flattened cache gets each new
    token's K/V; slot -1 (a padded row) stores nothing."""
    keep = slot_mapping >= 0
    for cache, new in ((k_cache, k_new), (v_cache, v_new)):
        cache.view(-1, *cache.shape[2:])[slot_mapping[keep].long()] = new[keep].to(cache.dtype)


@triton.jit
def _decode_kv_tile(K_cache, V_cache, bt_row, start, end, kv_head, offs_n, offs_d,
                    stride_kblk, stride_kpos, stride_kh, stride_vblk, stride_vpos, stride_vh,
                    PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Cached tokens start..start+BLOCK_N (those < end) of one KV head: k, v (BLOCK_N, D) and
    which rows are valid. A tile with no valid row loads nothing (every load masked)."""
    valid = start + offs_n < end
    if PAGE >= BLOCK_N:
        # Whole tiles inside one page: one block id per tile, a scalar. The K/V addresses
        # are then "block id + affine offsets", which Triton's pipeliner handles: with
        # num_stages the loads of the next tiles are in flight (cp.async into shared memory)
        # while this one is reduced. H200, batch 32 x 8k, 32/8 heads, page 256: 0.2452 ms
        # vs 0.2499 with the per-token gather below (0.99x vs 0.97x SDPA), same run.
        block = tl.load(bt_row + start // PAGE, mask=start < end, other=0).to(tl.int64)
        pos = start % PAGE + offs_n
    else:
        # A tile spans several pages (e.g. BLOCK_N = 64 over the engine's 16-token pages):
        # look the page up per token. The K/V addresses then depend on a vector of loaded
        # block ids, which Triton does not pipeline: each tile's loads wait for its ids.
        # PAGE is a constexpr power of two, so // and % are a shift and a mask.
        tok = start + offs_n
        block = tl.load(bt_row + tok // PAGE, mask=valid, other=0).to(tl.int64)
        pos = tok % PAGE
    k = tl.load(K_cache + (block * stride_kblk + pos * stride_kpos + kv_head * stride_kh)[:, None]
                + offs_d[None, :], mask=valid[:, None], other=0.0)
    v = tl.load(V_cache + (block * stride_vblk + pos * stride_vpos + kv_head * stride_vh)[:, None]
                + offs_d[None, :], mask=valid[:, None], other=0.0)
    return k, v, valid


@triton.jit
def _decode_tile_update(q, k, v, valid, m_i, l_i, acc, qk_scale):
    """The online softmax of Part 2 for one tile, all GROUP query heads at once. The tile's first
    token is valid, so m_new is finite."""
    # input_precision="ieee": fp32 K/V get exact products (tl.dot's default would round them to
    # TF32's 10-bit mantissa on the GPU, an error of ~2e-3 of the output's scale, measured on an
    # H200); 16-bit inputs are exact in the MMA anyway (the same sm_90 binary either way). The
    # price, accepted for a dtype kept for checking rather than speed: FMA-unit dots that spill
    # registers in the larger fp32 tiles (sm_90: the small-grid 128 x 8-warp config at head_dim 128).
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale    # (BLOCK_G, BLOCK_N)
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["tokens_per_split", "split_bucket", "grid_per_sm"])
def _paged_decode_split_kernel(
    Q, K_cache, V_cache, block_table, context_lens, O_part, LSE_part, qk_scale, tokens_per_split,
    split_bucket, grid_per_sm,             # unused; the autotuner's keys (see _decode_launcher)
    stride_qb, stride_qh,
    stride_kblk, stride_kpos, stride_kh,
    stride_vblk, stride_vpos, stride_vh,
    stride_bt,
    stride_pb, stride_ph, stride_ps,       # O_part (B, H, n_splits, D); LSE_part (B, H, n_splits)
    Out, stride_ob, stride_oh,             # the final output
    Counters,                              # int32 (>= B*Hkv,) zeros: splits finished per (seq, KV head)
    K_new, V_new, slot_mapping,            # NEW_KV: the new token's K/V (B, Hkv, D) and its cache slot (B,)
    stride_nkb, stride_nkh, stride_nvb, stride_nvh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    DIRECT: tl.constexpr = False,          # one split: normalise and write Out, no partials
    USE_PDL: tl.constexpr = False,         # programmatic dependent launch (see below)
    NEW_KV: tl.constexpr = False,          # the new token from K_new/V_new, stored here (see below)
    EXIT_IF_EMPTY: tl.constexpr = False,   # NEW_KV: a split past the context exits before the wait
    PRELOAD_SECOND_TILE: tl.constexpr = False,   # NEW_KV: the second tile is also asked for before the wait
):
    # splits start at multiples of 128 tokens (paged_decode), so a tile never straddles a split
    tl.static_assert(128 % BLOCK_N == 0)
    tl.static_assert(NEW_KV or not (EXIT_IF_EMPTY or PRELOAD_SECOND_TILE))   # both act before the wait
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_g = tl.arange(0, BLOCK_G)             # query heads of this KV head (padded to 16)
    heads = kv_head * GROUP + offs_g
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    bt_row = block_table + seq.to(tl.int64) * stride_bt
    if USE_PDL:
        # Let the next kernels launch before anything else, even before the loads of the context
        # length and of the first tile's block ids below: those are two dependent round trips
        # (~1 us each), and the signal placed after them (as before: pdl_signal_then_wait, just
        # ahead of the wait) kept attn proj and mlp fc from becoming resident, and from starting
        # their weight streams, for that long. Measured (H200, thirteenth session, one process,
        # ABAB, same greedy tokens): GPT-2 1.5B graph step 1.349/1.350 -> 1.312/1.300 ms at 200
        # tokens, 1.379/1.382 -> 1.338/1.330 at 280, within noise at 100; 759/760 -> 772/775
        # tok/s. GPT-2 124M: step times within 2% either way (decode rate 5,057/5,043 -> 4,797
        # then 5,052). Signalling after the wait instead, measured against the old placement
        # in the same process, was within noise (758 -> 754 tok/s).
        tm.pdl_signal()
    if NEW_KV:
        # With the new token coming from K_new/V_new, nothing this program reads from the cache
        # was written by any kernel of this step (the rule in triton_matmul.py's PDL section):
        # lengths and block tables come from the host, the cached K/V from earlier steps. So, as
        # the GEMV does with its weights, the first tile is asked for before the PDL wait; at
        # batch 1 (one or two tiles per program) that is most of this kernel's memory traffic,
        # overlapping the qkv GEMV's tail. The new token's cache slot is host-written too (the
        # engine passes the copied inputs, not a kernel's copy of them), so it is read here as well.
        ctx = tl.load(context_lens + seq)
        slot = tl.load(slot_mapping + seq)
        lo = split * tokens_per_split
        hi = tl.minimum(lo + tokens_per_split, ctx)
        cached_hi = tl.minimum(hi, ctx - 1)   # the cache holds tokens 0..ctx-2; ctx-1 is new
        if EXIT_IF_EMPTY:
            # A split with no token of this context (a graph captured at the full context and
            # replayed at a shorter one) writes nothing (see n_used below), so it may leave
            # without waiting: its SM slot is free for the next kernel while qkv still runs.
            # Whether that is faster depends on what the next kernels do with the room:
            # measured (H200, twelfth session, one process, same tokens) GPT-2 124M's 8 one-tile
            # splits 0.1845 -> 0.1815 ms a graph step at 100 tokens, 0.2042 -> 0.1989 at 280,
            # 4,880 -> 5,011 tok/s; but GPT-2 1.5B's 4 two-tile splits 1.236 -> 1.277 ms at 100
            # tokens, 756 -> 731 tok/s. Our explanation there (not measured): attn proj and mlp fc
            # then become resident early enough to fetch their weights while qkv still streams
            # its own, and take bandwidth from it. So paged_decode asks for it with one-tile
            # splits only, the case measured to win.
            if lo >= ctx:
                return
        k0, v0, valid0 = _decode_kv_tile(K_cache, V_cache, bt_row, lo, cached_hi, kv_head, offs_n, offs_d,
                                         stride_kblk, stride_kpos, stride_kh, stride_vblk, stride_vpos, stride_vh,
                                         PAGE, BLOCK_N)
        if PRELOAD_SECOND_TILE:
            # GPT-2 1.5B's batch-1 graph has 256-token splits: two tiles, the second of which
            # used to be asked for only after the wait, one more dependent round trip (block
            # ids, then K/V) on the step's critical path. Asked for here, it overlaps qkv too.
            # Measured (H200, fourteenth session, one process, 3 interleaved rounds, same greedy
            # tokens): graph step 1.307-1.315 -> 1.286-1.288 ms at 200 tokens, 1.337-1.338 ->
            # 1.319-1.320 at 280, within noise at 100 (one tile used); decode 765-773 -> 775-779
            # tok/s. The same change lost in the twelfth session (756 -> 733 tok/s), when the
            # PDL signal still came after these loads and they delayed attn proj's launch.
            # (A tile past cached_hi is fully masked: no memory traffic, nothing to add.)
            k1, v1, valid1 = _decode_kv_tile(K_cache, V_cache, bt_row, lo + BLOCK_N, cached_hi, kv_head, offs_n,
                                             offs_d, stride_kblk, stride_kpos, stride_kh, stride_vblk, stride_vpos,
                                             stride_vh, PAGE, BLOCK_N)
    if USE_PDL:
        tm.pdl_wait()               # signalled at the top
    if not NEW_KV:
        ctx = tl.load(context_lens + seq)
        lo = split * tokens_per_split
        hi = tl.minimum(lo + tokens_per_split, ctx)
        cached_hi = hi
    q = tl.load(Q + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=offs_g[:, None] < GROUP, other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    loop_lo = lo
    if NEW_KV:
        # The split that holds position ctx-1 takes the new token from K_new/V_new and writes its
        # K/V row to the cache for the next steps. This replaces the separate store kernel that
        # ran before attention (one launch, and one kernel boundary, fewer per layer: GPT-2 1.5B's
        # graph step 1.704 -> 1.638 ms, H200, one A/B run). No other program reads that slot: the
        # other splits cover other positions. The new K/V are asked for together with q, right
        # after the wait (one round trip through L2 for all three), stored at once, and the new
        # token is the first term of the online softmax: m = its score, l = 2^0 = 1, acc = its V
        # (the order of the terms does not matter; Part 2's algebra). Done after the cached tiles,
        # as before, its loads were one more round trip after the tiles' math and the slot's load
        # another before the store, all on the step's critical path. Measured (H200, fifteenth
        # session, one process, two engines of each, 3 rounds, same greedy tokens; both with one
        # stage, against the new token loaded, added and stored after the tiles): GPT-2 1.5B graph
        # step 1.234-1.242 -> 1.209-1.226 ms at 100 tokens, 1.280-1.290 -> 1.254-1.259 at 200, but
        # 1.290-1.302 -> 1.314-1.319 at 280 (a merge of two splits; not understood: loading the
        # new K/V only in the split that holds the token changed nothing there), 783/786 ->
        # 794/800 tok/s (medians); GPT-2 124M 0.173-0.174 -> 0.169-0.171 ms at 100 tokens,
        # 0.190-0.191 -> 0.184-0.185 at 200, 0.195 -> 0.190-0.192 at 280. Of that, putting the
        # new token first rather than last (its loads early either way) is the smaller part:
        # 1.5B 1.266-1.267 -> 1.254-1.259 ms at 200 tokens, within 1% at 100 and 280; it also
        # keeps k_new and v_new from living across the tiles' registers.
        k_new = tl.load(K_new + seq * stride_nkb + kv_head * stride_nkh + offs_d)
        v_new = tl.load(V_new + seq * stride_nvb + kv_head * stride_nvh + offs_d)
        holds_new = (lo <= ctx - 1) & (ctx - 1 < hi)
        if holds_new & (slot >= 0):          # -1: a padded row of a CUDA-graph batch stores nothing
            blk = (slot // PAGE).to(tl.int64)
            pos = slot % PAGE
            tl.store(K_cache + blk * stride_kblk + pos * stride_kpos + kv_head * stride_kh + offs_d, k_new)
            tl.store(V_cache + blk * stride_vblk + pos * stride_vpos + kv_head * stride_vh + offs_d, v_new)
        # its score per query head: a dot product of length D, no tensor cores needed
        s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * qk_scale   # (BLOCK_G,)
        m_i = tl.where(holds_new, s_new, m_i)
        l_i = tl.where(holds_new, 1.0, l_i)
        acc = tl.where(holds_new, acc + v_new.to(tl.float32)[None, :], acc)
        # then the tiles asked for before the wait; the loop below takes the rest
        if lo < cached_hi:
            m_i, l_i, acc = _decode_tile_update(q, k0, v0, valid0, m_i, l_i, acc, qk_scale)
        loop_lo = lo + BLOCK_N
        if PRELOAD_SECOND_TILE:
            if lo + BLOCK_N < cached_hi:
                m_i, l_i, acc = _decode_tile_update(q, k1, v1, valid1, m_i, l_i, acc, qk_scale)
            loop_lo = lo + 2 * BLOCK_N
    for start in tl.range(loop_lo, cached_hi, BLOCK_N):
        k, v, valid = _decode_kv_tile(K_cache, V_cache, bt_row, start, cached_hi, kv_head, offs_n, offs_d,
                                      stride_kblk, stride_kpos, stride_kh, stride_vblk, stride_vpos, stride_vh,
                                      PAGE, BLOCK_N)
        m_i, l_i, acc = _decode_tile_update(q, k, v, valid, m_i, l_i, acc, qk_scale)
    # An empty split (lo >= ctx) leaves l_i = 0, m_i = -inf: we store o = 0, lse = -inf, which
    # the merge weighs with 2^-inf = 0.
    empty = l_i == 0.0
    o = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    g_ok = offs_g < GROUP
    out_ptrs = Out + (seq * stride_ob + heads * stride_oh)[:, None] + offs_d[None, :]
    # The grid has a split for every tokens_per_split of max_context, but a shorter sequence
    # uses only the first n_used of them (a CUDA graph is captured at the full context and
    # replayed at the real one: GPT-2 1.5B's batch-1 graph has 4 splits of 256 tokens, and a
    # 100-token context fills one). Empty splits take no part, and a sequence whose tokens all
    # fall in split 0 gets its output written by that program directly: no partials, no
    # counter, no merge, i.e. two fewer dependent round trips through L2 at the end.
    # (capped at the grid's splits: past a too small max_context the last tokens are left out,
    # and a count no program reaches would leave the output unwritten and the counter set)
    n_used = tl.minimum(tl.cdiv(ctx, tokens_per_split), tl.num_programs(2))
    if DIRECT:
        tl.store(out_ptrs, o.to(Out.dtype.element_ty), mask=g_ok[:, None])
    elif n_used == 1:
        if split == 0:
            tl.store(out_ptrs, o.to(Out.dtype.element_ty), mask=g_ok[:, None])
    elif split < n_used:
        first = seq * stride_pb + heads * stride_ph                                  # (BLOCK_G,)
        tl.store(O_part + (first + split * stride_ps)[:, None] * HEAD_DIM + offs_d[None, :], o,
                 mask=g_ok[:, None])
        tl.store(LSE_part + first + split * stride_ps, lse, mask=g_ok)
        # The merge, in the same launch: the last of this (sequence, KV head)'s used programs to
        # finish merges their splits. Triton issues a scalar atomic from one thread, so first
        # a barrier: every warp's partial stores happen before that thread's release (acq_rel),
        # and the count goes up only once the whole program's partials are visible. The last
        # program's acquire (then Triton's barrier sharing the result) lets all its threads
        # read everyone's partials; the loads go to L2 with .cg, past a possibly stale L1.
        # (CUTLASS's semaphore is the same pattern: __syncthreads, then one thread releases.)
        counter = Counters + seq * tl.num_programs(1) + kv_head
        tl.debug_barrier()
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == n_used - 1:
            m_all = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
            w_sum = tl.zeros([BLOCK_G], dtype=tl.float32)
            merged = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
            # Online merge (Part 2 once more). Every used split holds tokens, so every lse is finite.
            for s in range(0, n_used):
                lse_s = tl.load(LSE_part + first + s * stride_ps, mask=g_ok, other=0.0, cache_modifier=".cg")
                o_s = tl.load(O_part + (first + s * stride_ps)[:, None] * HEAD_DIM + offs_d[None, :],
                              mask=g_ok[:, None], other=0.0, cache_modifier=".cg")
                m_new = tl.maximum(m_all, lse_s)
                rescale, w = tl.math.exp2(m_all - m_new), tl.math.exp2(lse_s - m_new)
                merged = merged * rescale[:, None] + w[:, None] * o_s
                w_sum = w_sum * rescale + w
                m_all = m_new
            tl.store(out_ptrs, (merged / w_sum[:, None]).to(Out.dtype.element_ty), mask=g_ok[:, None])
            tl.store(counter, 0)          # zero again for the next call (and graph replay)


# -----------------------------------------------------------------------------
# Batch-1 multi-head decode without tensor cores or block-wide reductions (Gluon).
#
# The kernel above is built for GQA: a KV head's GROUP query heads are the M side of a tl.dot,
# padded to 16 rows. With plain multi-head attention (GPT-2: GROUP = 1) one of those 16 rows is
# real, and at batch 1 nothing is bandwidth: GPT-2 1.5B's split reads 2 x 256 x 64 x 2 B = 64 KB
# of K/V, asked for before the PDL wait. What costs is the chain after the wait, and in the
# sm_90 SASS of that kernel the chain is mostly block barriers: per 128-token tile, the QK^T
# dot, a cross-warp max (its partials through shared memory, a barrier on each side), a
# cross-warp sum (the same), P converted to the dot's operand layout (through shared memory
# again) and the PV dot. bench.py --topic graphs puts the whole kernel at ~6 us a layer inside
# GPT-2 1.5B's step (0.24 us of it bytes), a quarter of the step.
#
# The algebra of Part 2 does not care which tokens are summed first. So let every WARP run its
# own online softmax over its own tokens, and combine the warps once at the end, exactly as the
# split-K merge combines programs:
#   warp w:   m_w = max_j s_j,  l_w = sum_j 2^(s_j - m_w),  o_w = sum_j 2^(s_j - m_w) v_j
#   combine:  M = max_w m_w,    l = sum_w 2^(m_w - M) l_w,  o = sum_w 2^(m_w - M) o_w / l
# With a register layout where a warp's lanes split D (8 lanes x 8 values of 64) and its tokens
# (4 lanes, then registers), every reduction up to the combine stays inside one warp: the score
# is 8 FMAs and 3 shuffles, the warp's max and sum are in-thread plus 2 shuffles, o_w in-thread
# plus 2 shuffles. The combine is the one block barrier: each warp writes (m_w, l_w, o_w) to
# shared memory, and after the barrier every thread reads all of them and finishes alone.
# The FMA units do the math (GPT-2 1.5B: 256 tokens x 64 x 2 = 32K FMAs per head, 128 a
# thread), which at one query row is no slower than a 16-row MMA that is 15/16 padding.
# Tried before in plain Triton (eleventh session, GROUP == 1 on the FMA units with tl.sum): the
# compiler chose layouts whose reductions crossed warps, 40 barriers after the wait instead of
# 32, slower. Gluon makes the layout the kernel's choice, hence this kernel.
#
# Scope, as the engine uses it: GROUP == 1, 16-bit K/V, the new token from K_new / V_new (as
# NEW_KV above: stored here, then added once, by warp 0), every token of a split asked for before
# the PDL wait (splits of up to TILE = 512 tokens, 32 per warp), the same partials and in-kernel
# merge as the kernel above when a context spans several splits. paged_decode picks it
# (mha_decode_applies) with its own split size (mha_decode_split_tokens): with every token in
# registers before the wait a longer split costs little, while a merge is a round trip through
# L2 after it.
# What the compiler made of it (sm_90 SASS, GPT-2 1.5B's launch: a test checks the first two):
# between the wait and the output's store 1 BAR.SYNC and 695 instructions (the kernel above, with
# its two 128-token tiles: 43 BAR.SYNC and 1,479 instructions after its wait); the split's 512
# K and 512 V rows are all requested before the wait.
# Measured (H200, seventeenth session, one process each, every variant its own engine and CUDA
# graph, 3 interleaved rounds, the same 300 greedy tokens as the tensor-core kernel), graph step
# at 100 / 200 / 280 tokens of context and decode tok/s:
#   GPT-2 1.5B, 512-token splits: 1.169-1.173 / 1.240-1.247 / 1.299-1.302 -> 1.120-1.121 /
#     1.120-1.121 / 1.122-1.123 ms, 816-820 -> 887-891 tok/s (+8.6%); with 256-token splits
#     (another call) 837-841 tok/s, and at 280 tokens (two splits merged) 1.281 ms.
#   GPT-2 124M, 256-token splits: 0.166-0.169 / 0.183-0.184 / 0.188 -> 0.159-0.160 / 0.160 / 0.174
#     ms, 5,423-5,600 -> 5,828-6,014 tok/s (+7%).
# In bench.py --topic graphs (160 tokens) attention adds 4.05 us a layer to 1.5B's step, 6.27 in
# the run before. Empty splits leaving before the wait (EXIT_IF_EMPTY) lost here with 256- and
# 512-token splits (1.5B 887-891 -> 864-867 tok/s), so only 128-token splits take it, as above.

@gluon.jit
def _paged_decode_mha_kernel(
    Q, K_cache, V_cache, block_table, context_lens, O_part, LSE_part, qk_scale, tokens_per_split,
    stride_qb, stride_qh,
    stride_kblk, stride_kpos, stride_kh,
    stride_vblk, stride_vpos, stride_vh,
    stride_bt,
    stride_pb, stride_ph, stride_ps,       # O_part (B, H, n_splits, D); LSE_part (B, H, n_splits)
    Out, stride_ob, stride_oh,
    Counters,                              # int32 zeros: splits finished per (seq, head)
    K_new, V_new, slot_mapping,            # the new token's K/V (B, H, D) and its cache slot (B,)
    stride_nkb, stride_nkh, stride_nvb, stride_nvh,
    HEAD_DIM: gl.constexpr, PAGE: gl.constexpr, TILE: gl.constexpr,
    DIRECT: gl.constexpr, EXIT_IF_EMPTY: gl.constexpr, num_warps: gl.constexpr, USE_PDL: gl.constexpr = False,
):
    # (warp, token, d): lanes split d (8 values each) and tokens; warps split the tokens
    LANES_D: gl.constexpr = HEAD_DIM // 8
    LANES_T: gl.constexpr = 32 // LANES_D
    PER_WARP: gl.constexpr = TILE // num_warps
    gl.static_assert(PER_WARP >= LANES_T)
    kv_l: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, LANES_T, LANES_D], [num_warps, 1, 1], [2, 1, 0])
    tok_l: gl.constexpr = gl.SliceLayout(2, kv_l)                   # (warp, token): scores
    d_l: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, kv_l))  # (d,): q, the new K/V
    warp_d_l: gl.constexpr = gl.SliceLayout(1, kv_l)                # (warp, d): o_w
    seq, head, split = gl.program_id(0), gl.program_id(1), gl.program_id(2)
    if USE_PDL:
        tm.gl_pdl_signal()             # first thing, as the kernel above (its comment says why)
    # before the wait: what no kernel of this step writes (lengths, table, cached K/V, the slot)
    ctx = gl.load(context_lens + seq)
    slot = gl.load(slot_mapping + seq)
    lo = split * tokens_per_split
    hi = gl.minimum(lo + tokens_per_split, ctx)
    cached_hi = gl.minimum(hi, ctx - 1)           # the cache holds tokens 0..ctx-2; ctx-1 is new
    if EXIT_IF_EMPTY:                             # (the kernel above says when this pays)
        if lo >= ctx:
            return
    warp_ids = gl.arange(0, num_warps, layout=gl.SliceLayout(1, tok_l))
    tok = lo + warp_ids[:, None] * PER_WARP + gl.arange(0, PER_WARP, layout=gl.SliceLayout(0, tok_l))[None, :]
    valid = tok < cached_hi
    bt_row = block_table + seq.to(gl.int64) * stride_bt
    block = gl.load(bt_row + tok // PAGE, mask=valid, other=0).to(gl.int64)
    pos = tok % PAGE
    d = gl.arange(0, HEAD_DIM, layout=d_l)
    k_rows = block * stride_kblk + pos * stride_kpos + head * stride_kh
    v_rows = block * stride_vblk + pos * stride_vpos + head * stride_vh
    k = gl.load(K_cache + k_rows[:, :, None] + d[None, None, :], mask=valid[:, :, None], other=0.0)
    v = gl.load(V_cache + v_rows[:, :, None] + d[None, None, :], mask=valid[:, :, None], other=0.0)
    if USE_PDL:
        tm.gl_pdl_wait()
    # after it: q and the new token (one round trip for the three), the new K/V stored at once
    q = gl.load(Q + seq * stride_qb + head * stride_qh + d).to(gl.float32)
    k_new = gl.load(K_new + seq * stride_nkb + head * stride_nkh + d)
    v_new = gl.load(V_new + seq * stride_nvb + head * stride_nvh + d)
    holds_new = (lo <= ctx - 1) & (ctx - 1 < hi)
    if holds_new & (slot >= 0):                   # -1: a padded row of a CUDA-graph batch
        new_blk = (slot // PAGE).to(gl.int64)
        new_pos = slot % PAGE
        gl.store(K_cache + new_blk * stride_kblk + new_pos * stride_kpos + head * stride_kh + d, k_new)
        gl.store(V_cache + new_blk * stride_vblk + new_pos * stride_vpos + head * stride_vh + d, v_new)
    # each warp's online softmax over its tokens (every reduction inside the warp)
    s = gl.sum(k.to(gl.float32) * q[None, None, :], axis=2) * qk_scale          # (warp, token)
    s = gl.where(valid, s, float("-inf"))
    s_new = gl.sum(q * k_new.to(gl.float32), axis=0) * qk_scale                # the new token's score
    m_w = gl.max(s, axis=1)
    m_w = gl.where(holds_new, gl.maximum(m_w, s_new), m_w)   # every warp's max covers the new token
    m_ref = gl.where(m_w == float("-inf"), 0.0, m_w)          # a warp with no token: p = 0, l = o = 0
    p = gl.exp2(s - m_ref[:, None])
    l_w = gl.sum(p, axis=1)
    o_w = gl.sum(p[:, :, None] * v.to(gl.float32), axis=1)                      # (warp, d)
    # the new token, once: warp 0 adds it
    p_new = gl.where(holds_new & (warp_ids == 0), gl.exp2(s_new - m_ref), 0.0)
    l_w += p_new
    p_new_d = gl.convert_layout(p_new, gl.SliceLayout(1, warp_d_l))
    o_w += p_new_d[:, None] * v_new.to(gl.float32)[None, :]
    # the combine: the one block barrier after the wait
    flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    one_d: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    o_smem = gl.allocate_shared_memory(gl.float32, [num_warps, HEAD_DIM], flat)
    m_smem = gl.allocate_shared_memory(gl.float32, [num_warps], one_d)
    l_smem = gl.allocate_shared_memory(gl.float32, [num_warps], one_d)
    o_smem.store(o_w)
    m_smem.store(m_w)
    l_smem.store(l_w)
    gl.thread_barrier()
    fin_l: gl.constexpr = gl.BlockedLayout([num_warps, 1], [1, 32], [1, num_warps], [0, 1])   # a column's warps in one thread
    w_l: gl.constexpr = gl.SliceLayout(1, fin_l)
    m_all = m_smem.load(w_l)
    l_all = l_smem.load(w_l)
    o_all = o_smem.load(fin_l)
    m_max = gl.max(m_all, axis=0)
    m_top = gl.where(m_max == float("-inf"), 0.0, m_max)
    alpha = gl.exp2(m_all - m_top)                            # 0 for a warp with no token
    l_sum = gl.sum(alpha * l_all, axis=0)
    o_sum = gl.sum(alpha[:, None] * o_all, axis=0)            # (d,)
    # An empty split (no token: l = 0) stores o = 0, lse = -inf, which the merge weighs with 0.
    empty = l_sum == 0.0
    o = gl.where(empty, 0.0, o_sum / gl.where(empty, 1.0, l_sum))
    lse = gl.where(empty, float("-inf"), m_top + gl.log2(gl.where(empty, 1.0, l_sum)))
    d_out = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, fin_l))
    out_ptrs = Out + seq * stride_ob + head * stride_oh + d_out
    n_used = gl.minimum(gl.cdiv(ctx, tokens_per_split), gl.num_programs(2))   # (the kernel above: why)
    if DIRECT:
        gl.store(out_ptrs, o.to(Out.dtype.element_ty))
    elif n_used == 1:
        if split == 0:
            gl.store(out_ptrs, o.to(Out.dtype.element_ty))
    elif split < n_used:
        # partials, then the last of the used splits merges: the kernel above's protocol
        first = seq * stride_pb + head * stride_ph
        gl.store(O_part + (first + split * stride_ps) * HEAD_DIM + d_out, o)
        gl.store(LSE_part + first + split * stride_ps, lse)
        counter = Counters + seq * gl.num_programs(1) + head
        gl.thread_barrier()
        if gl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == n_used - 1:
            # every used split holds tokens, so every lse is finite; split 0 starts the sums
            m_run = gl.load(LSE_part + first, cache_modifier=".cg")
            merged = gl.load(O_part + first * HEAD_DIM + d_out, cache_modifier=".cg")
            w_sum = gl.exp2(m_run - m_run)
            for i in range(1, n_used):
                lse_i = gl.load(LSE_part + first + i * stride_ps, cache_modifier=".cg")
                o_i = gl.load(O_part + (first + i * stride_ps) * HEAD_DIM + d_out, cache_modifier=".cg")
                m_new = gl.maximum(m_run, lse_i)
                rescale, w = gl.exp2(m_run - m_new), gl.exp2(lse_i - m_new)
                merged = merged * rescale + w * o_i
                w_sum = w_sum * rescale + w
                m_run = m_new
            gl.store(out_ptrs, (merged / w_sum).to(Out.dtype.element_ty))
            gl.store(counter, 0)


# Decode tiles: BLOCK_N tokens per step (64 K rows + 64 V rows at D=128 = 32 KB per stage).
# Memory-bound, so what matters is bytes in flight: enough programs, and (when a tile sits in
# one page) num_stages tiles of loads queued ahead. With the per-token gather num_stages does
# nothing (the compiled kernel's shared memory does not grow with it). The H200 tuner picked
# BLOCK_N=128 with 4 warps and 3 stages for batch 32 x 8k on 256-token pages. Measured there
# (2026-11-28), same run, against SDPA on its own (B, Hkv, T, D) tensors: 0.99x with whole-page
# tiles, 0.97x with the gather; loading K and V together, prefetching the next tile into
# registers and evict-first loads made no difference. On an H100 (2026-11-28, 26 configs of
# BLOCK_N 32/64/128 x 2/4/8 warps x 2-5 stages, timed like bench.py) the best reached 0.994x
# SDPA at 32 x 8k with 32/8 heads and 1.012x with 32/32 (BLOCK_N=32, 4 warps); TMA loads of the
# page tiles (a 4-D descriptor, box [1, BLOCK_N, 1, D]) and twice the splits gave nothing. The
# configs fall off cliffs rather than slopes (BLOCK_N=32 with 2 warps: 0.99x with 5 stages,
# 0.86x with 4), which is why the autotuner times them all per shape. One trap: replayed back
# to back in a CUDA graph with PDL on, some configs (this list's (128, 4, 2/3) among them) ran
# 11% slower than when launched eagerly or without PDL (394 vs 354 us); the cause was not found.
# The tuner times eagerly, so it cannot see this; the engine's decode (16-token pages, a GEMV
# between two attention calls) showed no such loss, PDL saved time there.
# Each row is (BLOCK_N, num_warps, num_stages); BLOCK_N <= 128 (splits start on 128 edges).
# (64, 2, 3) came in on the H200 (thirteenth session): at 32 x 8k with 32/32 heads (1,024
# one-split programs) it ran 0.9544 ms against SDPA's 0.9496-0.9507 (0.995x) in a sweep, where
# the best of the others, 128/4/2, ran 0.9786 (0.970x); bench flash then measured 0.994x. Our
# explanation (not measured): two warps make a program small enough to fit more of them per SM.
_DECODE_GPU_CONFIGS = [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3), (128, 8, 3), (128, 8, 4), (32, 4, 3),
                       (64, 2, 3)]
_INTERPRET_DECODE_CONFIG = dict(BLOCK_N=16)
# Fewer programs than SMs (a batch-1 engine step: 1 x 25 KV heads x 4 splits = 100 programs for
# GPT-2 1.5B) is a latency-bound launch of ~5 us, and timed alone the configs differ by less
# than the timer can resolve: the autotuner's pick changed from process to process (128/4/3,
# 128/8/3, 128/8/4 in four fresh processes). Timed inside the whole captured decode step
# (H200, 2026-11-28), 128 tokens x 8 warps x 3-4 stages was the fastest in all three engines
# measured (GPT-2 1.5B fp16 and bf16, 124M fp16): 1.680 vs 1.719 ms for 128/4/3 and 1.843 for
# 32/4/3 at 1.5B fp16. So such launches take it by rule on Hopper and later (where it was
# measured, and where its shared memory fits); bigger grids and older GPUs are autotuned.
# Four alternatives lost inside the same step (H200, GPT-2 1.5B, one process each; eleventh and
# twelfth sessions in results/perf_notes.md): MHA scores on the FMA units instead of a 16-row
# padded tl.dot (1.375 -> 1.549 ms: more barriers after the wait), one 256-token tile per split
# (faster at 129-256 tokens, slower at <= 128 and past 256: 746 -> 738 tok/s), 8 one-tile splits
# of 128 (within 1% everywhere), and a split's second 128-token tile also loaded before the wait
# (1.236 -> 1.300 ms at 100 tokens, 1.351 -> 1.386 at 200; that one won in the fourteenth
# session, once the PDL signal had moved first: PRELOAD_SECOND_TILE in the kernel). At batch 1
# this kernel is latency after the PDL wait: leaving it out of the step saves 3.5 us a layer at
# 100 tokens and 5.9 at 200 (bench.py --topic graphs, twelfth session; 2.9 and 5.1 in the
# eleventh session's run). Since the seventeenth session multi-head models (GPT-2) take the Gluon
# kernel above for those launches, which has the FMA units' math without the block barriers.
# One stage, not three, when every tile of a split is asked for before the wait (new_kv with one
# or two tiles per split: the default splits of every small grid, since they hold 128 or 256
# tokens). With num_stages=3 Triton software-pipelines the tile loop, and the loop's prologue
# runs even when the loop has no iteration left (its bounds are runtime values): in the sm_90
# SASS, cp.async of the next tiles' block ids and a wait on them, after the PDL wait, on the
# step's critical path (28 LDGSTS in the binary; none with one stage). Measured (H200, fifteenth
# session, two processes with both configs, 3 rounds each, same greedy tokens), graph
# step ms at 100 / 200 / 280 tokens and decode tok/s (median of rounds), 3 stages -> 1 stage:
#   GPT-2 124M: 0.180-0.181 / 0.196-0.197 / 0.202-0.204 -> 0.173-0.174 / 0.190-0.191 / 0.195-0.197,
#               4,986-5,098 -> 5,248-5,281 tok/s;
#   GPT-2 1.5B: 1.246-1.250 / 1.290-1.295 / 1.314-1.318 -> 1.232-1.243 / 1.278-1.290 / 1.286-1.300,
#               777-780 -> 784-788 tok/s.
# Two stages: between the two for 124M, slower than three for 1.5B at 100 and 200 tokens. Four
# warps with one stage: 124M a little faster again, 1.5B slower at 200 and 280 tokens (not
# taken). A split with more tiles runs the loop, which keeps the three stages that pipeline it
# (_SMALL_GRID_LOOP_STAGES).
_SMALL_GRID_DECODE_CONFIG = dict(BLOCK_N=128, num_warps=8, num_stages=1)
_SMALL_GRID_LOOP_STAGES = 3


def small_grid_decode_config(tokens_per_split, new_kv):
    """The rule's config for a launch of fewer programs than SMs (on Hopper or later): one stage
    when every tile of a split is loaded before the PDL wait (new_kv, at most two tiles), so no
    tile loop runs; otherwise the loop's pipelining stages. (A config with more stages, which
    bench.py's tune may set, is used as it is.)"""
    config = _SMALL_GRID_DECODE_CONFIG
    if config["num_stages"] == 1 and (not new_kv or tokens_per_split > 2 * config["BLOCK_N"]):
        config = dict(config, num_stages=_SMALL_GRID_LOOP_STAGES)
    return config
# Programmatic dependent launch (Hopper+; explained in triton_matmul.py, next to its GEMV): the
# decode kernels may be launched while the previous kernel still runs, and wait for it first
# thing (griddepcontrol.wait). In a CUDA-graph decode step this hides part of the ~1-2 us gap
# at each of the step's kernel boundaries. Launched with model.pdl_launch_args().
@functools.cache     # built on first use, then shared
def _decode_launcher():
    configs = [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in _DECODE_GPU_CONFIGS]
    # The grid is part of the key (grid_per_sm: programs launched / SMs, rounded up): the best
    # config depends on how the programs fill the SMs. Without it, batch 64 x 8k (32/8 heads,
    # 512 programs) reused the pick made for batch 32 (256 programs): 0.566 ms, 0.85x SDPA, where
    # 64 tokens x 4 warps x 3 stages ran 0.481 ms, 1.006x, in the same process (H200, thirteenth
    # session); keyed, the tuner's own pick ran 1.002x SDPA in a later process. The engine, whose
    # graphs share one key across batch sizes otherwise, tunes once per value.
    return triton.autotune(configs=configs, key=["GROUP", "HEAD_DIM", "PAGE", "split_bucket", "grid_per_sm",
                                                 "DIRECT", "NEW_KV"])(_paged_decode_split_kernel)


@functools.cache      # the one costly part of default_num_splits (a driver query)
def _num_sms(device):
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def default_num_splits(batch, n_kv_heads, max_context, device):
    """One split when (sequence, KV head) pairs alone give the SMs ~1.5+ programs each: no
    partials, no merge (H200, batch 32 x 8 KV heads = 256 programs, 1.9 per SM).
    Otherwise as many splits as keep all programs in one wave of ~2 per SM (the pipelined
    whole-page loop holds 2-3 programs per SM in shared memory), but none shorter than 256
    tokens. Rounding *down* matters: H200, batch 4 x 32k x 8 KV heads, 17 splits (544
    programs, 2+ waves) ran at 0.82-0.98x SDPA depending on the tile config, 8 splits (256
    programs) at 0.99x, same run.
    Exception, small launches of short contexts (up to 8 tiles, 1024 tokens, as measured: more
    would make the last program merge many partials): when one 128-token tile per program
    still fits the SMs with one program each, use exactly that (every program does one tile,
    all at once: the least serial latency). GPT-2 124M batch 1 (12 KV heads, context 1024): 8 splits instead of 4, its whole
    decode step 0.262 -> 0.253 ms inside the CUDA graph (H200); GPT-2 1.5B (25 heads x 8 = 200
    programs) does not qualify, and forcing 8 splits there was slower (1.639 -> 1.651 ms)."""
    sms = _num_sms(device)
    if 2 * batch * n_kv_heads >= 3 * sms:
        return 1
    one_tile_each = triton.cdiv(max_context, 128)
    if one_tile_each <= 8 and batch * n_kv_heads * one_tile_each <= sms:   # (measured up to 1024)
        return one_tile_each
    wanted = max(1, (2 * sms) // (batch * n_kv_heads))
    return max(1, min(wanted, triton.cdiv(max_context, 256)))


_split_counters = {}      # device -> int32 zeros, left zeroed by every kernel that uses them
_retired_counters = []    # outgrown buffers: CUDA graphs captured earlier still point at them


def _counters(device, n):
    """The arrival counters of the in-kernel merges: per (sequence, KV head) here, per row in
    serve.py's greedy argmax; shared by every call on the device (so: one stream at a time; each
    kernel touches them only after its PDL wait and leaves them zeroed). Allocated once (a fresh torch.zeros per call would
    be one more kernel per step), at least 64K pairs. Growing it during CUDA-graph capture is
    refused (run one eager step at the largest batch first); an outgrown buffer is kept alive,
    since graphs captured with it still write to it on every replay."""
    buf = _split_counters.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("paged_decode / greedy argmax: run one eager step at the largest batch before "
                               "capturing a CUDA graph (the merge counters must be allocated outside the capture)")
        if buf is not None:
            _retired_counters.append(buf)
        buf = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
        _split_counters[device] = buf
    return buf


MHA_DECODE = True           # paged_decode may take _paged_decode_mha_kernel (mha_decode_applies)
MHA_DECODE_TOKENS_PER_WARP = 32
MHA_DECODE_MAX_TOKENS = 512   # a split's tokens, all in registers before the wait
MHA_DECODE_MAX_VALUES = 64 * 512   # head_dim x tokens: a thread then holds 8 tokens x 8 values of K and of V
                                   # (64 registers); at head_dim 128 x 512 tokens ptxas spills (sm_90)
MHA_DECODE_SPLIT_TOKENS = None   # None: mha_decode_split_tokens decides; else the multi-head kernel's splits hold this many
MHA_DECODE_EXIT_IF_EMPTY = None  # None: empty splits leave before the wait in 128-token splits only


def mha_decode_split_tokens(batch, n_heads, max_context, device, head_dim=64):
    """Tokens per split for the multi-head kernel: the larger of 512 and 256 whose launch still
    has at least a third of the SMs' worth of programs (and at most one per SM), else None
    (default_num_splits). Fitted to two models (H200, seventeenth session, one process, graph
    step at 100 / 200 / 280 tokens): GPT-2 1.5B (25 heads) with 512 1.162 / 1.177 / 1.184 ms
    against 256's 1.161 / 1.183 / 1.281 (257-512 tokens without a merge: 50 programs); GPT-2 124M
    (12 heads) with 256 0.159 / 0.160 / 0.175 against 128's 0.150 / 0.172 / 0.181 and 512's
    0.174 / 0.174 / 0.174 (24 programs: slower at every context)."""
    sms = _num_sms(device)
    for tokens in (512, 256):
        programs = batch * n_heads * triton.cdiv(max_context, tokens)
        if sms <= 3 * programs <= 3 * sms and head_dim * tokens <= MHA_DECODE_MAX_VALUES:
            return tokens
    return None


def mha_decode_applies(q, group, new_kv, tokens_per_split, n_programs) -> bool:
    """Whether paged_decode takes the multi-head Gluon kernel: one query head per KV head, the new
    token passed in (the engine's decode), 16-bit, splits of a power of two of at most
    MHA_DECODE_MAX_TOKENS (and MHA_DECODE_MAX_VALUES / head_dim), and a launch of at most one
    program per SM (a small grid: batch-1 decode is the case it was built and measured for) on a
    Hopper GPU (Gluon has no CPU interpreter: on the CPU the kernel above runs)."""
    return (MHA_DECODE and not INTERPRET and group == 1 and new_kv is not None and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16) and tokens_per_split <= MHA_DECODE_MAX_TOKENS
            and tokens_per_split & (tokens_per_split - 1) == 0 and q.shape[-1] * tokens_per_split <= MHA_DECODE_MAX_VALUES
            and n_programs <= _num_sms(q.device) and is_hopper_or_later(q.device))


def paged_decode(q, k_cache, v_cache, block_table, context_lens, scale=None, num_splits=None,
                 max_context=None, out=None, config=None, new_kv=None):
    """One decode step of attention over a paged KV cache (layout contract above).
    max_context: an upper bound of context_lens (pass it to avoid a GPU->CPU sync; not checked,
    for the same reason: tokens past a too small max_context are left out of the attention).
    config: a fixed kernel config (dict of BLOCK_N, num_warps, num_stages, ...) instead of the
    autotuner's choice, for sweeps. out: a preallocated (B, H, D) apart from q and the caches.
    new_kv: (k_new, v_new, slot_mapping), each sequence's new token's K and V (B, Hkv, D) and the
    cache slot (B,) it goes to (block * block_size + offset; -1 = store nothing, a padded row).
    The cache then holds only positions 0..context_lens-2; the kernel takes the new token from
    k_new/v_new and also writes it to its slot, in place of a separate store before the call.
    With PDL on (model.set_pdl), context_lens, block_table, the cached K/V and new_kv's
    slot_mapping are read before the kernel waits for its predecessor: no kernel of the same
    PDL chain may write them (serve.py passes its host-copied inputs)."""
    if upcast := _interpreter_bf16_workaround(q, k_cache, v_cache):
        up_new = None if new_kv is None else (new_kv[0].float(), new_kv[1].float(), new_kv[2])
        res = paged_decode(*upcast, block_table, context_lens, scale, num_splits, max_context, config=config,
                           new_kv=up_new).bfloat16()
        if new_kv is not None:        # the upcast caches were copies: store into the real ones
            _store_new_kv_reference(k_cache, v_cache, *new_kv)
        return res if out is None else out.copy_(res)
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}: "
                         f"expected (B, H, D) and two (num_blocks, block_size, Hkv, D) with the same D")
    batch, n_heads, head_dim = q.shape
    _, block_size, n_kv_heads, _ = k_cache.shape
    _check_head_dim(head_dim)
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size {block_size} must be a power of two >= 16")
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads {n_heads} must be a multiple of n_kv_heads {n_kv_heads}")
    out = _checked_out(q, out, k_cache=k_cache, v_cache=v_cache)
    _check_out_apart(out, q=q, k_cache=k_cache, v_cache=v_cache)
    # the kernel reads one row of the table and one length per sequence, with unit stride
    for name, t, dims in (("block_table", block_table, 2), ("context_lens", context_lens, 1)):
        if (t.dim() != dims or t.shape[0] != batch or t.dtype not in (torch.int32, torch.int64)
                or t.device != q.device or (t.shape[-1] > 1 and t.stride(-1) != 1)):
            raise ValueError(f"{name} must be a {dims}-D int32/int64 tensor with {batch} rows on {q.device} and a "
                             f"contiguous last dim, got {tuple(t.shape)} {t.dtype} strides {t.stride()}")
    for name, t, heads in (("q", q, n_heads), ("out", out, n_heads)):
        _check_int32_span(name, batch, t.stride(0), heads, t.stride(1), head_dim)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_int32_span(name, block_size, t.stride(1), n_kv_heads, t.stride(2), head_dim)
    if new_kv is not None:
        k_new, v_new, slot_mapping = new_kv
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if (tuple(t.shape) != (batch, n_kv_heads, head_dim) or t.dtype != q.dtype or t.device != q.device
                    or t.stride(-1) != 1):
                raise ValueError(f"{name} must be ({batch}, {n_kv_heads}, {head_dim}) {q.dtype} on {q.device} with a "
                                 f"contiguous last dim, got {tuple(t.shape)} {t.dtype} strides {t.stride()}")
        if (slot_mapping.shape != (batch,) or slot_mapping.dtype not in (torch.int32, torch.int64)
                or slot_mapping.device != q.device or (batch > 1 and slot_mapping.stride(0) != 1)):
            raise ValueError(f"slot_mapping must be ({batch},) int32/int64 on {q.device} with unit stride, "
                             f"got {tuple(slot_mapping.shape)} {slot_mapping.dtype}")
        new_args = (k_new, v_new, slot_mapping, k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1))
    else:
        new_args = (q, q, context_lens, 0, 0, 0, 0)        # unused by the kernel
    if max_context is None:
        max_context = int(context_lens.max())
    if max_context < 1:
        raise ValueError(f"max_context must be >= 1 (every context holds at least the new token), got {max_context}")
    group = n_heads // n_kv_heads
    split_tokens = None         # the multi-head kernel's own split size, where it takes the launch
    if num_splits is None and config is None:
        split_tokens = (MHA_DECODE_SPLIT_TOKENS
                        or mha_decode_split_tokens(batch, n_heads, max_context, q.device, head_dim))
        if not (split_tokens and mha_decode_applies(q, group, new_kv, split_tokens,
                                                    batch * n_kv_heads * triton.cdiv(max_context, split_tokens))):
            split_tokens = None
    if num_splits is None and split_tokens is None:
        num_splits = default_num_splits(batch, n_kv_heads, max_context, q.device)
    if split_tokens is None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    # tokens per split rounded up to 128 (the largest BLOCK_N) so splits start on tile edges
    # (the multi-head rule's size is taken as it is: 700 tokens in two splits of 512, not of 384)
    tokens_per_split = split_tokens or triton.cdiv(triton.cdiv(max_context, num_splits), 128) * 128
    num_splits = triton.cdiv(max_context, tokens_per_split)
    direct = num_splits == 1    # the only split's result is final: no partials, no merge
    if direct:
        o_part = lse_part = out                 # unused by the kernel
    else:
        o_part = torch.empty(batch, n_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(batch, n_heads, num_splits, dtype=torch.float32, device=q.device)
    part_strides = (0, 0, 0) if direct else tuple(st // head_dim for st in o_part.stride()[:3])
    n_programs, sms = batch * n_kv_heads * num_splits, _num_sms(q.device)
    # both kernels' arguments; the tensor-core kernel also takes its autotuner's two keys between them
    args_head = (q, k_cache, v_cache, block_table, context_lens, o_part, lse_part, _qk_scale(scale, head_dim),
                 tokens_per_split)
    args_tail = (q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0),
                 *part_strides, out, out.stride(0), out.stride(1), _counters(q.device, batch * n_kv_heads), *new_args)
    args = (*args_head, triton.next_power_of_2(tokens_per_split), triton.cdiv(n_programs, sms), *args_tail)
    grid = (batch, n_kv_heads, num_splits)
    if config is None and mha_decode_applies(q, group, new_kv, tokens_per_split, n_programs):
        _paged_decode_mha_kernel[grid](
            *args_head, *args_tail, HEAD_DIM=head_dim, PAGE=block_size, TILE=tokens_per_split, DIRECT=direct,
            EXIT_IF_EMPTY=(tokens_per_split == 128 if MHA_DECODE_EXIT_IF_EMPTY is None else MHA_DECODE_EXIT_IF_EMPTY)
            and not direct,
            num_warps=tokens_per_split // MHA_DECODE_TOKENS_PER_WARP, **pdl_launch_args())
        return out
    meta = dict(GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
                PAGE=block_size, DIRECT=direct, NEW_KV=new_kv is not None, **pdl_launch_args())
    # fewer programs than SMs, on Hopper or later: a config by rule (small_grid_decode_config)
    if config is None and not INTERPRET and n_programs <= sms and is_hopper_or_later(q.device):
        config = small_grid_decode_config(tokens_per_split, new_kv is not None)
    if INTERPRET or config is not None:
        config = config or _INTERPRET_DECODE_CONFIG
        # one-tile splits leave early when empty; two-tile splits also ask for their second tile
        # before the wait (each measured faster in that case only: see the kernel)
        tiles_per_split = tokens_per_split // config["BLOCK_N"] if new_kv is not None else 0
        meta["EXIT_IF_EMPTY"] = tiles_per_split == 1 and not direct
        meta["PRELOAD_SECOND_TILE"] = tiles_per_split == 2
        _paged_decode_split_kernel[grid](*args, **meta, **config)
    else:
        _decode_launcher()[grid](*args, **meta)
    return out


def contiguous_as_paged(k, block_size):
    """View one (B, T, Hkv, D)-indexed cache tensor as a paged one without copying: returns
    (k_cache (n_blocks, bs, Hkv, D), block_table (B, T/bs)). Works for any strides with a
    contiguous last dim whose sequence stride is a whole number of blocks: the engine's
    token-major layout (B, T, Hkv, D) (the table is then the identity), or SDPA's own
    (B, Hkv, T, D) passed as k.transpose(1, 2) (heads T*D elements apart; block id
    b*Hkv*(T/bs) + j reaches element ((b*Hkv + h)*T + t)*D)."""
    batch, seq_len, n_kv_heads, head_dim = k.shape
    stride_b, stride_t, stride_h, stride_d = k.stride()
    block_stride = block_size * stride_t
    assert stride_d == 1 and seq_len % block_size == 0 and stride_b % block_stride == 0, \
        "last dim contiguous, T a multiple of block_size, sequences a whole number of blocks apart"
    blocks_per_seq, ids_per_seq = seq_len // block_size, stride_b // block_stride
    # just enough block ids that the view stays inside k's storage (as_strided checks)
    n_blocks = (batch - 1) * ids_per_seq + blocks_per_seq
    k_cache = k.as_strided((n_blocks, block_size, n_kv_heads, head_dim),
                           (block_stride, stride_t, stride_h, 1), k.storage_offset())
    first = torch.arange(batch, dtype=torch.int32, device=k.device)[:, None] * ids_per_seq
    return k_cache, first + torch.arange(blocks_per_seq, dtype=torch.int32, device=k.device)[None, :]


def random_paged_cache(context_lens, n_kv_heads, head_dim, block_size, dtype, device, spare_blocks=3):
    """A paged cache whose blocks are handed out in random order (as after many allocations
    and frees), filled with random K/V. Returns k_cache, v_cache, block_table."""
    blocks_needed = [triton.cdiv(c, block_size) for c in context_lens]
    num_blocks = sum(blocks_needed) + spare_blocks
    perm = torch.randperm(num_blocks, device=device).to(torch.int32)
    table = torch.full((len(context_lens), max(blocks_needed)), -1, dtype=torch.int32, device=device)
    used = 0
    for s, n in enumerate(blocks_needed):
        table[s, :n] = perm[used: used + n]
        used += n
    shape = (num_blocks, block_size, n_kv_heads, head_dim)
    return torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device), table


# -----------------------------------------------------------------------------
# Part 4c. Decode over a contiguous cache, with no indirection: what paging costs.
#
# The paged kernel above reads SDPA's own (B, Hkv, T, D) tensors through a block table
# (contiguous_as_paged: block ids b*Hkv*T/page + j, no copy), and there it ran 0.985-0.994x
# SDPA (cuDNN) at batch 32 on the H200. Its streaming rate is cuDNN's: from 8k to 16k tokens
# both took 234-235 us more (32 x 8 KV heads; nineteenth session, one process). What differs is
# a fixed cost, ~10 us a call against cuDNN's ~8. Each program of the paged kernel starts with
# two dependent round trips before its first K/V byte is asked for: the context length (the
# loop bound and the masks), then the first tile's block id (roughly 1 us each under load: our
# estimate, not measured alone). All programs pay it at once, at the start: ~1% of a 240 us call.
# SDPA's contract has neither: every sequence attends to all T keys and (b, kv_head) sits at a
# fixed offset. A kernel for exactly that contract asks for its first tiles at once: the
# addresses depend only on program ids and scalars, the loop bound and masks on T, a kernel
# argument (a test checks the sm_90 SASS: no global load before the first K/V cp.async).
# Measured on two H200s (nineteenth session, one process each, 5 rounds, every call timed with
# SDPA just before and after it, median ratio), batch 32, D=128, bf16, first card / second:
#                               32 x 8k, 32/8     32 x 16k, 32/8    32 x 8k, 32/32
#   paged kernel (autotuned)      0.986x / 0.985x   0.993x / 0.991x   0.994x / 0.990x
#   this kernel, best config      0.997x / 0.993x   0.999x / 0.993x   1.005x / 1.003x
#   this kernel, autotuned        -      / 0.993x   -      / 0.989x   -      / 1.003x
# (the autotuner, timing each config once, picked a 0.4% slower one at 16k on the second card).
# Closer, not past: at 32/8 heads cuDNN was still 0.1-0.7% ahead of the best config (what
# finally closed it, four sessions later, is the last section of this comment).
# The programs are ordered KV head fastest (program p: sequence p // Hkv, KV head p % Hkv, the
# order of cuDNN's launch), so programs resident together read neighbouring 2 MB slabs: with one
# program per SM (the 128-token, 3-stage config: two 64 KB K+V buffers) that ran 244.5 vs
# 245.1 us at 32 x 8k (first card).
# Tried the same day and not kept (scratch kernels): a persistent kernel walking its (sequence,
# KV head) pairs in one flattened loop, 0.968-0.972x at 32 x 8k where the paged kernel ran 0.988x
# (the per-tile index arithmetic and q reloads cost more than the second wave it removes); and
# exactly two pairs per program, the second pair's first tiles in flight while the first pair
# finishes, 0.995x / 0.994x at 8k / 16k where this kernel ran 0.992x / 0.992x: +0.2%, within the
# rounds' spread, for more code.
# Where the last ~0.5% at 32/8 heads goes (twentieth and twenty-first sessions, H200). Not the
# fixed cost any more: at T = 64 this kernel takes 5.1-5.3 us a call in a CUDA graph against
# cuDNN's 6.1 (an empty kernel: 2.55 us, the same for Triton's and PyTorch's). It is the end of a
# one-wave kernel. Each program can write its start and end (%globaltimer) and SM (%smid) (trace=,
# bench.py's one-wave table): at 32 x 8k all 256 programs start within 0.2 us and end over 20-30
# us (213-219 to 235-241 us in six eager runs, median 228-234; in a CUDA-graph trace at 64/8/3 the
# 8 programs alone on an SM ended ~19 us before the rest). With a mark after every tile (trace=
# with progress marks; twenty-first session) the trace becomes a bandwidth timeline (bench.py's
# second one-wave table, results/flash_decode_bandwidth.png). In a scratch run with a mark per tile
# all programs together read ~4.65 TB/s in 2 us bins until ~230 us, then 4.3, 3.0, 1.4, 0.7, 0.2
# TB/s in the next 2 us bins, and the last program ended at 242 us. bench.py, spreading each program's bytes evenly
# between its marks: in the 23 us from the first program's end to the last the GPU read what 18
# us at its 4.61 TB/s plateau would have, so the ragged end costs 5 us of 240 (4.9 us in the
# twenty-second session's run; ~6-7 us estimated from a binned scratch run; ~15 us of 485 at
# 16k). The programs still reading speed up, but only to 21-29 GB/s each (23-31 in that later
# run), against 18 GB/s each (4.61 TB/s / 256) on the plateau: far from what
# the finished ones leave. A fourth pipeline stage for a program's last 512-2048 tokens
# (tl.range(..., num_stages=4), more bytes in flight) did not speed them either (0.986-0.989x SDPA
# against 0.996x), so what caps a late program is not its pipeline depth; we did not find what.
# Work stealing, to hand the late programs' last tiles to idle ones (a scratch kernel, not kept):
# the last 2-16 tiles of each (sequence, KV head) were handed out by an atomic counter; a program
# with nothing left took tiles of others and wrote a partial, the last contributor merged, the
# last program out zeroed the counters. The ends drew together (first 231, last 238.1 us, 69 tiles
# stolen) but the kernel ended no sooner: every program paid the claim and exit atomics and a
# refilled pipeline right at the end (with nothing to steal, the last end moved 236.6 -> 238.0-
# 238.8 us), more than the stealing won back. Paired against SDPA it lost: 0.981-0.989x for the
# best variants where this kernel ran 0.993x (the two atomics alone 0.990x), down to 0.95x with
# larger pools. cuDNN's kernel, of the same structure, presumably has the same end; at batch 31 /
# 32 / 33 (8k, one unpaired trace, 64/8/3) this kernel took 0.932-0.934 us per (sequence, KV head)
# and cuDNN 0.942 / 0.922 / 0.939 (its best batch is 32-33 in the paired sweep of perf_notes), and
# we did not find why. Also tried, none kept (paired rounds against SDPA):
# more programs, the paged kernel on these tensors with 2 / 4 / 8 / 32 splits (0.978x / 0.965x /
# 0.947x / 0.868x where one split ran 0.988x), and this kernel with 2 / 4 / 8 splits merged
# in-kernel (0.967x / 0.943x / 0.917x against 0.996x: partials, merges and refilled pipelines
# cost, and with 3 programs per SM HBM reads slower still); starting each program at another
# tile, to spread them over DRAM channels (0.6% slower to 0.3% faster); CUTLASS's cp.async L2
# prefetch hint, patched into the PTX by a Triton stage hook (knobs.runtime.add_stages_inspection_hook),
# .L2::128B no change and .L2::256B 7-10% slower; unmasked loads when T is a multiple of the
# tile, no change.
# Stream-K (twenty-second session; the thirteenth tried it on the split kernel): the B x Hkv x T
# tokens cut into 264 equal ranges (two 64-token-config programs on every SM, none alone, 3% fewer
# tokens each), a range covering the tail of one (sequence, KV head) and the head of the next, the
# head published as a partial and merged in-kernel by the tail's owner. 0.983x at best where this
# kernel ran 0.995x: the median program ended ~4 us later although it read 3% less, most likely
# as the switch between pairs drains and refills its pipeline. One flattened loop keeps the
# pipeline full but ran slower still (0.957x at best), most likely from its per-tile selects of
# q, offsets and bounds.
# One program per (sequence, KV head) and no split: small batches (4 x 32k: 32 programs on 132
# SMs) leave most of the GPU idle (0.38x SDPA in bench.py). That is the case split-K solves; use
# paged_decode there (contiguous_as_paged gives it these same tensors).
#
# What closed the gap (twenty-third session, H200): the tile loop's own instructions, not HBM.
# Triton 3.6's pipeliner, at num_stages=3, keeps two K/V buffers and writes tile j+2 into the
# buffer tile j has just been read from, so tile j+2's copies go out only after tile j's two dots
# and its softmax: in the sm_90 SASS the 16 cp.async (LDGSTS) come last in the loop body. While
# tile j is computed, only tile j+1 is in flight, so that computation most likely delays the next
# request (our reading of the SASS; not timed on its own). A third buffer, which keeps two tiles
# in flight during the math, measured slower (below): more bytes in flight is not the cure. What
# was measured is that fewer instructions and barriers a tile made the loop faster; whether
# through the delayed copies or through issue slots and barrier stalls shared by an SM's warps
# was not separated. The loop (64-token tiles, 4 warps) held, per tile:
#   - 9 block barriers: the 4 warps split the tile's keys, so the row max and the row sum are
#     each a reduction across warps through shared memory (3 barriers each), and P's change of
#     layout for the second dot, the wait for the copies and the guard before the next copies
#     into the read buffer add the rest;
#   - ~100 instructions of 64-bit address arithmetic, tok.to(int64) * stride for every row.
# Diagnostics, paired against SDPA within each of four processes (32 x 8k, 32/8 heads): the same
# kernel with the softmax removed (wrong math: a bound) ran 1.003-1.006x where the kernel ran
# 0.992-0.995x; with the row max removed (a fixed reference) and the row sum kept per column,
# 0.999-1.001x.
# Two changes that keep the result for any scores (within rounding; see the caveat on tiny V):
# 1. Pointers that step one tile a loop (k_ptrs += BLOCK_N * stride_kt): 373 -> 290 instructions
#    a tile (sm_90 SASS, running max), +0.1-0.5% alone.
# 2. FlashDecoding++'s unified max (Hong et al., 2023). Softmax does not care where its exponent
#    is measured from: for any fixed reference c, o = sum 2^(s - c) v / sum 2^(s - c). The running
#    max of Part 2 is one choice of c, made safe for any scores at the price of a reduction per
#    tile. With c = 0 and p = 2^s there is no max to find, nothing to rescale, and the row sum can
#    be kept per column and summed once after the loop: no reduction across warps inside the loop
#    (3 barriers a tile remain: P's change of layout, the copy wait and the buffer guard; 220
#    instructions). FlashDecoding++ picks its reference per model from offline statistics; c = 0
#    is this kernel's choice, checked at run time instead. It is right as long as 2^s neither
#    overflows nor underflows where it matters. bf16 has fp32's 8-bit exponent: 2^s is finite
#    below s = 128 and a normal float above -126 (s in log2 units, q.k * scale * log2 e; +-88 in
#    natural units).
#    So after the loop each program checks every query row: its top score at least
#    UNIFIED_MIN_TOP = -60 (66 above -126, fp32's smallest normal exponent, as headroom: the
#    largest p is a normal float, and the terms that underflow weigh < 2^-66 of it), and acc and
#    l finite (nothing overflowed). A
#    program that fails recomputes its (sequence, KV head) with the running max, unpipelined:
#    always right, at more than twice that program's time, and in a one-wave call one such
#    program can lengthen the whole call (not measured). test_all.py sends a case through each
#    check. The caveat: the check sees p, not p * v; with |v| below ~2^-66 and the top score near
#    -60, p * v underflows to 0 unseen (no real cache holds such values). fp16 keeps the running
#    max only: p is cast to V's dtype for the second dot, and fp16's 5-bit exponent overflows at
#    s = 16.
# Measured with the autotuner's pick, H200, paired against SDPA in 5 rounds (three processes)
# and in bench.py's 3 interleaved rounds (three runs; results/flash.md is the last):
#                               32 x 8k, 32/8     32 x 16k, 32/8    32 x 8k, 32/32
#   paired, median of 5         1.003-1.004x      1.001-1.003x      1.014x (one process)
#   bench.py                    1.001-1.003x      0.999-1.000x      1.004-1.011x
# Parity with cuDNN, a little ahead: at 16k the margin is the size of the run-to-run noise.
# Tried the same day and not kept (32 x 8k, 32/8): every warp its own slice of each tile with its
# own max and sum (3-D dots, no reduction across warps until one merge after the loop, 2 barriers
# a tile), 0.92-0.989x, and no faster without its rescaling: we did not find why; one warp a
# program (no barrier at all, every multiply on one warp), 0.94-0.99x.


@triton.jit
def _global_timer_ns():
    """The GPU's nanosecond clock (PTX %globaltimer): one clock for all SMs, so programs' times
    compare. Inline PTX: the Triton interpreter cannot run it."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _sm_id():
    """The SM this program runs on (PTX %smid)."""
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _decode_mark(row, start, seq_len, n_marks, BLOCK_N: tl.constexpr):
    """Progress mark (trace= with marks): mark j holds when this program got through the tile that
    ends in the j-th of n_marks equal shares of the T tokens (a later tile of the same share
    overwrites it). The clock is read after the wait for this tile's K/V and its two dots (where
    ptxas puts it in the sm_90 SASS; nothing in the source orders it). int32: the host checks
    n_marks * T < 2^31."""
    end_tok = tl.minimum(start + BLOCK_N, seq_len)
    tl.store(row + 3 + (end_tok * n_marks - 1) // seq_len, _global_timer_ns())


@triton.jit
def _decode_tile_unified(q, k, v, valid, l_cols, top_cols, acc, qk_scale):
    """The unified-max counterpart of _decode_tile_update (Part 4c): p = 2^s against the fixed
    reference 0, no max to find, nothing to rescale. The row sum and the top score stay per column
    (reduced once after the loop, not across warps every tile). A padded token (past T) reads
    K = V = 0, so s = 0 and p = 1 meets v = 0 in the second dot; only the sum and the top score
    need the mask, and neither is on the path to the dot."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale      # (BLOCK_G, BLOCK_N)
    p = tl.math.exp2(s)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
    l_cols += tl.where(valid[None, :], p, 0.0)
    top_cols = tl.maximum(top_cols, tl.where(valid[None, :], s, float("-inf")))
    return l_cols, top_cols, acc


@triton.jit
def _contiguous_decode_pass(q, k_first, v_first, k_step, v_step, seq_len, qk_scale, row, n_marks,
                            BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                            MARKS: tl.constexpr, ONE_PASS: tl.constexpr, STAGES: tl.constexpr):
    """All T tokens of one (sequence, KV head), one tile a loop -> (l, acc, top): the row sums,
    the unnormalised outputs and each row's top score s. ONE_PASS: the fixed reference 0
    (_decode_tile_unified); else the running max of Part 2 (paged_decode's tile update), right for
    any scores and any dtype, whose final max is the top score. STAGES: the loop's num_stages
    (None: the config's)."""
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    if ONE_PASS:
        l_cols = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
        top_cols = tl.full([BLOCK_G, BLOCK_N], float("-inf"), dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    k_ptrs, v_ptrs = k_first, v_first
    for start in tl.range(0, seq_len, BLOCK_N, num_stages=STAGES):
        valid = start + offs_n < seq_len      # a scalar bound: nothing to wait for before the loads
        k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
        if ONE_PASS:
            l_cols, top_cols, acc = _decode_tile_unified(q, k, v, valid, l_cols, top_cols, acc, qk_scale)
        else:
            m_i, l_i, acc = _decode_tile_update(q, k, v, valid, m_i, l_i, acc, qk_scale)
        k_ptrs += k_step
        v_ptrs += v_step
        if MARKS:
            _decode_mark(row, start, seq_len, n_marks, BLOCK_N)
    if ONE_PASS:
        return tl.sum(l_cols, 1), acc, tl.max(top_cols, 1)
    else:
        return l_i, acc, m_i


# The fixed reference's window (log2 units, the kernel's s = q.k * scale * log2 e): the unified
# pass is kept when every query row's top score is at least UNIFIED_MIN_TOP (-41.6 in natural-log
# units of q.k * scale) and acc and l are finite (at the top, 2^s overflows from s = 128, 88 in
# natural units); otherwise the program recomputes.
UNIFIED_MIN_TOP = tl.constexpr(-60.0)


@triton.jit(do_not_specialize=["seq_bucket", "grid_per_sm", "n_marks"])
def _contiguous_decode_kernel(
    Q, K, V, Out, seq_len, qk_scale,
    seq_bucket, grid_per_sm,               # unused; the autotuner's keys
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, stride_ob, stride_oh,
    Trace, n_marks,                        # TRACE: int64 (programs, 3 + n_marks): start, end, SM id, marks
    N_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, UNIFIED: tl.constexpr, TRACE: tl.constexpr = False, MARKS: tl.constexpr = False,
):
    pair = tl.program_id(0)                   # one 1-D grid (y would cap the batch at 65,535)
    if TRACE:
        t_start = _global_timer_ns()
    row = Trace + pair.to(tl.int64) * (3 + n_marks)       # this program's trace row (read with TRACE only)
    seq, kv_head = pair // N_KV_HEADS, pair % N_KV_HEADS   # KV head fastest
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_g
    # The first tile's addresses, then one 64-bit step a tile: indexing every row by
    # tok.to(int64) * stride instead cost ~100 instructions of address arithmetic a tile on the
    # path to the next tile's loads (sm_90 SASS).
    k_first = (K + seq.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
               + offs_n.to(tl.int64)[:, None] * stride_kt + offs_d[None, :])
    v_first = (V + seq.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
               + offs_n.to(tl.int64)[:, None] * stride_vt + offs_d[None, :])
    k_step = tl.full([], BLOCK_N, tl.int64) * stride_kt
    v_step = tl.full([], BLOCK_N, tl.int64) * stride_vt
    q = tl.load(Q + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=offs_g[:, None] < GROUP, other=0.0)
    if UNIFIED:
        # One pass with the fixed reference 0, then a check of every query row of the group
        l_i, acc, top = _contiguous_decode_pass(q, k_first, v_first, k_step, v_step, seq_len, qk_scale, row,
                                                n_marks, BLOCK_G, HEAD_DIM, BLOCK_N, MARKS, True, None)
        acc_sum = tl.sum(acc, 1)               # inf or NaN if any element is (or the sum overflows)
        out_of_window = ((offs_g < GROUP) & ((top < UNIFIED_MIN_TOP) | (l_i != l_i)
                         | (l_i == float("inf")) | (acc_sum != acc_sum) | (tl.abs(acc_sum) == float("inf"))))
        if tl.max(out_of_window.to(tl.int32), 0) > 0:
            # a rare path, unpipelined: three stages of it next to the one pass would spill
            l_i, acc, top = _contiguous_decode_pass(q, k_first, v_first, k_step, v_step, seq_len, qk_scale, row,
                                                    n_marks, BLOCK_G, HEAD_DIM, BLOCK_N, MARKS, False, 1)
    else:
        l_i, acc, top = _contiguous_decode_pass(q, k_first, v_first, k_step, v_step, seq_len, qk_scale, row,
                                                n_marks, BLOCK_G, HEAD_DIM, BLOCK_N, MARKS, False, None)
    tl.store(Out + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
             (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=offs_g[:, None] < GROUP)
    if TRACE:       # after the store was issued: the time this program's work took
        tl.store(row + 1, _global_timer_ns())
        tl.store(row, t_start)
        tl.store(row + 2, _sm_id().to(tl.int64))


# (BLOCK_N, num_warps, num_stages). Since the one pass (twenty-third session, H200, paired):
# 64/2/3 and 64/4/3 best at 32/8 heads (1.002-1.005x SDPA at 8k, 1.000-1.003x at 16k), 128/4/3
# 0.99x there; at 32/32 128/8/3 (the autotuner's pick, 1.014x, one process) and 128/4/3
# (1.004-1.009x) best, the 64-token ones 0.91-0.999x. Before it:
# the best per shape on the first card: 64/8/3 at 32 x 8k
# (32/8 heads), 128/8/3 at 32 x 16k, 128/4/3 at 32/32; on the second 128/4/3 everywhere, the
# others within 0.5% at 32/8 heads (the 64-token ones 3-8% behind at 32/32). 32/4/3 is there for
# fp32 at head_dim 128: two buffers of the others' K/V tiles take 143-278 KB of shared memory there
# (the autotuner skips a config that does not fit), 64 KB with 32-token tiles.
# Other depths (H200, twenty-first session, paired against SDPA): at 32 x 8k / 16k, 32/8 heads,
# three 64-token buffers (96 KB in flight a program, still 2 programs an SM) ran 0.4-2.7% slower
# than two and one buffer 9-16% slower; 32-token tiles with 4-6 buffers 2.4-7.5% slower than the
# best 64-token config. At 32/32 three 64-token buffers beat two (by 1-6%) but not 128/4/3. One
# 128-token buffer with 2 warps ties the best at 32/8 (0.9935x / 0.9977x; 0.965x at 32/32): not added.
_CONTIGUOUS_DECODE_CONFIGS = [(128, 4, 3), (128, 8, 3), (64, 8, 3), (64, 4, 3), (64, 2, 3), (32, 4, 3)]


@functools.cache
def _contiguous_decode_launcher():
    configs = [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in _CONTIGUOUS_DECODE_CONFIGS]
    return triton.autotune(configs=configs, key=["N_KV_HEADS", "GROUP", "HEAD_DIM", "seq_bucket", "grid_per_sm"])(
        _contiguous_decode_kernel)


def contiguous_decode(q, k, v, scale=None, out=None, config=None, trace=None):
    """One decode step over a contiguous cache, SDPA's contract: q (B, H, D), k/v (B, Hkv, T, D)
    (any strides with a contiguous last dim, e.g. SDPA's own tensors or model.py's KVCache slab),
    every sequence attending to all T keys -> (B, H, D). The same math as
    F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0].
    bf16 and fp32 take one pass against a fixed softmax reference (the unified max, Part 4c) and
    a program whose scores leave its window reads its K/V again with the running max; fp16 takes
    the running max only. The result is the same either way, within the dtype's rounding
    (unless |v| is below ~2^-66, where the one pass can round p * v to 0: Part 4c).
    One program per (sequence, KV head), no split: made for batches that fill the GPU (B * Hkv
    of at least ~1.5 programs per SM); for small batches use paged_decode, which splits the
    sequence. out: a preallocated (B, H, D) that overlaps none of q, k, v. config: a fixed
    dict(BLOCK_N, num_warps, num_stages) instead of the autotuner's (it must fit the GPU's shared
    memory: two K and V tiles of BLOCK_N x D). trace: a contiguous int64 (B * Hkv, 3 + n_marks)
    CUDA tensor, n_marks >= 0; program p (sequence p // Hkv, KV head p % Hkv) writes its start and
    end time (ns, the GPU's %globaltimer) and its SM id into row p, and into column 3 + j when it
    got through the tile that ends in the j-th of n_marks equal shares of its T tokens. Every
    share gets a mark when n_marks <= T // BLOCK_N (the config's tile); otherwise a share no tile
    ends in is left as it is (a program that recomputes marks its second pass). bench.py's
    one-wave table and bandwidth timeline. NVIDIA GPUs only;
    rows are left as they are when there is nothing to compute, e.g. no query head. The marks'
    stores cost the kernel ~1%."""
    if q.dim() != 3 or k.dim() != 4 or v.shape != k.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected (B, H, D) and two "
                         f"(B, Hkv, T, D) with the same B and D")
    batch, n_heads, head_dim = q.shape
    n_kv_heads, seq_len = k.shape[1], k.shape[2]
    _check_head_dim(head_dim)
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"n_heads {n_heads} must be a multiple of n_kv_heads {n_kv_heads} >= 1")
    if seq_len < 1:
        raise ValueError("the cache must hold at least one token (T >= 1)")
    out = _checked_out(q, out, k=k, v=v)
    _check_out_apart(out, q=q, k=k, v=v)
    for name, t in (("q", q), ("out", out)):
        _check_int32_span(name, batch, t.stride(0), n_heads, t.stride(1), head_dim)
    group = n_heads // n_kv_heads
    n_programs = batch * n_kv_heads
    if trace is not None:
        if (trace.dtype != torch.int64 or trace.dim() != 2 or trace.shape[0] != n_programs or trace.shape[1] < 3
                or not trace.is_contiguous()):
            raise ValueError(f"trace must be a contiguous int64 ({n_programs}, 3 + n_marks) tensor (a row per "
                             f"program), got {tuple(trace.shape)} {trace.dtype} with strides {trace.stride()}")
        if INTERPRET or not q.is_cuda or trace.device != q.device or torch.version.hip is not None:
            raise ValueError(f"trace needs q and trace on one NVIDIA GPU (its timers are inline PTX: no CPU, no "
                             f"interpreter, no ROCm); q on {q.device}, trace on {trace.device}"
                             + (", TRITON_INTERPRET=1" if INTERPRET else ""))
        if (trace.shape[1] - 3) * seq_len >= 2**31:
            raise ValueError(f"trace: {trace.shape[1] - 3} marks x {seq_len} tokens must stay below 2^31 (int32 "
                             f"arithmetic in the kernel)")
        _check_out_apart(trace, "trace", q=q, k=k, v=v, out=out)
    if out.numel() == 0:                  # no sequence or no query head: nothing to compute
        return out
    if upcast := _interpreter_bf16_workaround(q, k, v):
        return out.copy_(contiguous_decode(*upcast, scale=scale, config=config))
    args = (q, k, v, out, seq_len, _qk_scale(scale, head_dim), triton.next_power_of_2(seq_len),
            triton.cdiv(n_programs, _num_sms(q.device)), q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
            out if trace is None else trace, 0 if trace is None else trace.shape[1] - 3)
    meta = dict(N_KV_HEADS=n_kv_heads, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
                UNIFIED=contiguous_decode_one_pass(q.dtype),
                TRACE=trace is not None, MARKS=trace is not None and trace.shape[1] > 3)
    if INTERPRET or config is not None:
        _contiguous_decode_kernel[(n_programs,)](*args, **meta, **(config or _INTERPRET_DECODE_CONFIG))
    else:
        _contiguous_decode_launcher()[(n_programs,)](*args, **meta)
    return out


def contiguous_decode_one_pass(dtype) -> bool:
    """Whether contiguous_decode runs the unified one pass for K/V of this dtype (bf16, fp32: p =
    2^s is cast to V's dtype for the second dot, and their 8-bit exponent holds it over ~+-88
    nats) or the running max only (fp16: its 5-bit exponent overflows at s = 16). A function so
    that a test can force the running max and compare the two paths."""
    return dtype in (torch.bfloat16, torch.float32)


def contiguous_decode_config():
    """The config the last autotuned contiguous_decode call ran, as a dict for config=; None before
    the first one (and on a CPU, where the interpreter runs one fixed config). bench.py traces the
    timed call's config this way: a traced call is another autotuner key (the trace's dtype is part
    of it), and could pick another config."""
    best = getattr(_contiguous_decode_launcher(), "best_config", None)      # set by every autotuned call
    return None if best is None else dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)


# -----------------------------------------------------------------------------
# Part 5. Roofline bookkeeping (bench.py divides these by measured time).
#
# A kernel can go no faster than min(peak FLOP/s, intensity * peak bytes/s), with
# intensity = FLOPs / bytes moved to and from HBM. The ridge point peak_flops / peak_bw is
# ~175 FLOP/byte with the ceilings bench.py measured on an H200 (746 TFLOP/s bf16 cuBLAS,
# 4.25 TB/s copy), ~300 with an H100's datasheet numbers.
#   prefill: FLOPs = 4*T^2*H*D (two matmuls of 2*T*T*D each per head), halved when causal;
#            bytes = (Q + O) 2*T*H*D*e + (K + V) 2*T*Hkv*D*e (e = bytes per element)
#            -> intensity ~ T/4 (causal, MHA, bf16; T/2 non-causal): 1024 at T=4096, right of the ridge:
#            the kernel should sit under the flat compute roof.
#   decode:  FLOPs = 4*B*H*T*D, bytes ~ K + V = 2*B*T*Hkv*D*e
#            -> intensity = H/Hkv FLOP/byte at bf16 (1 for MHA, 4 for GQA 32/8): far left of
#            the ridge, under the sloped bandwidth roof. No tiling trick changes this; only
#            batching more queries per K/V byte (GQA, speculative decoding) or smaller K/V
#            (quantised caches) moves decode to the right.


def prefill_flops(seq_lens, n_heads, head_dim, causal):
    total = sum(4 * t * t * n_heads * head_dim for t in seq_lens)
    return total // 2 if causal else total


def prefill_bytes(seq_lens, n_heads, n_kv_heads, head_dim, elt_bytes=2):
    tokens = sum(seq_lens)
    return (2 * tokens * n_heads + 2 * tokens * n_kv_heads) * head_dim * elt_bytes


def decode_flops(context_lens, n_heads, head_dim):
    return sum(4 * c * n_heads * head_dim for c in context_lens)


def decode_bytes(context_lens, n_heads, n_kv_heads, head_dim, elt_bytes=2):
    kv = 2 * sum(context_lens) * n_kv_heads * head_dim * elt_bytes
    return kv + 2 * len(context_lens) * n_heads * head_dim * elt_bytes   # + q in, out


# -----------------------------------------------------------------------------
# Demo: check both kernels against the references on a few shapes and print a small table.


def _max_rel_err(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def main():
    parser = argparse.ArgumentParser(description="FlashAttention prefill + paged decode demo: each kernel "
                                     "against the PyTorch reference (on a GPU when there is one, else the "
                                     "Triton interpreter on small shapes; timings: bench.py --topic flash)",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float16",
                        choices=["float16", "bfloat16"], help="inputs' dtype")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    print(f"device={device} dtype={dtype} interpreter={INTERPRET}")
    rows = []
    # prefill, packed varlen, GQA 4 query heads / 2 KV heads
    for causal in (True, False):
        lens = [1, 7, 33] if INTERPRET else [1, 17, 300, 4097]
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
        q = torch.randn(sum(lens), 4, 64, dtype=dtype, device=device)
        k = torch.randn(sum(lens), 2, 64, dtype=dtype, device=device)
        v = torch.randn(sum(lens), 2, 64, dtype=dtype, device=device)
        out = flash_attn_varlen(q, k, v, cu, max(lens), causal=causal)
        err = _max_rel_err(out, attention_reference(q, k, v, cu, causal=causal))
        rows.append((f"prefill varlen causal={causal}", f"lens={lens} H=4 Hkv=2 D=64", err))
    # batched prefill in SDPA's layout (on a Hopper GPU: Part 3b's warp-specialised kernel)
    t, d = (40, 32) if INTERPRET else (1024, 128)
    q = torch.randn(2, 8, t, d, dtype=dtype, device=device)
    k, v = (torch.randn(2, 4, t, d, dtype=dtype, device=device) for _ in range(2))
    part = "3b" if hopper_prefill_taken(q, k, v) else "3"
    want = attention_naive(q.float(), k.float(), v.float(), is_causal=True)
    rows.append((f"prefill batched causal (Part {part})", f"B=2 T={t} H=8 Hkv=4 D={d}",
                 _max_rel_err(flash_attn(q, k, v, is_causal=True), want)))
    # paged decode, random block table, contexts ending mid-block
    for block_size in (16, 32):
        ctx = [1, 45, 100] if INTERPRET else [1, 45, 1000, 5000]
        kc, vc, table = random_paged_cache(ctx, 2, 64, block_size, dtype, device)
        cl = torch.tensor(ctx, dtype=torch.int32, device=device)
        q = torch.randn(len(ctx), 6, 64, dtype=dtype, device=device)
        out = paged_decode(q, kc, vc, table, cl, num_splits=2)
        err = _max_rel_err(out, paged_decode_reference(q, kc, vc, table, cl))
        rows.append((f"paged decode bs={block_size}", f"ctx={ctx} H=6 Hkv=2 D=64", err))
    # decode over a contiguous cache in SDPA's layout (Part 4c): GQA ratio 3, T not a multiple of the tile
    b, t = (3, 50) if INTERPRET else (32, 4097)
    k, v = (torch.randn(b, 2, t, 64, dtype=dtype, device=device) for _ in range(2))
    q = torch.randn(b, 6, 64, dtype=dtype, device=device)
    want = attention_naive(q[:, :, None].float(), k.float(), v.float(), is_causal=False)[:, :, 0]
    rows.append(("contiguous decode", f"B={b} T={t} H=6 Hkv=2 D=64", _max_rel_err(contiguous_decode(q, k, v), want)))
    # the engine's decode step: one sequence, multi-head, its new token's K/V passed in and stored by
    # the kernel (on a Hopper GPU: the Gluon kernel of "Batch-1 multi-head decode")
    ctx = [100] if INTERPRET else [700]
    kc, vc, table = random_paged_cache(ctx, 12, 64, 16, dtype, device)
    cl = torch.tensor(ctx, dtype=torch.int32, device=device)
    q, k_new, v_new = (torch.randn(1, 12, 64, dtype=dtype, device=device) for _ in range(3))
    slot = table[:, (ctx[0] - 1) // 16] * 16 + (ctx[0] - 1) % 16
    k_ref, v_ref = kc.clone(), vc.clone()
    k_ref.view(-1, 12, 64)[slot.long()], v_ref.view(-1, 12, 64)[slot.long()] = k_new, v_new
    out = paged_decode(q, kc, vc, table, cl, new_kv=(k_new, v_new, slot.to(torch.int32)))
    err = max(_max_rel_err(out, paged_decode_reference(q, k_ref, v_ref, table, cl)),
              _max_rel_err(kc.view(-1, 12, 64)[slot.long()], k_new))
    gluon = not INTERPRET and is_hopper_or_later(device)       # (mha_decode_applies holds for this shape)
    rows.append((f"paged decode + new K/V{' (Gluon)' if gluon else ''}", f"ctx={ctx} H=Hkv=12 D=64", err))
    print("| kernel | shape | max rel err vs reference |\n| --- | --- | --- |")
    for name, shape, err in rows:
        print(f"| {name} | {shape} | {err:.2e} |")
    assert all(err < 2e-2 for _, _, err in rows), "kernel disagrees with the reference"
    print("all kernels agree with the references. Timings: python bench.py --topic flash")


if __name__ == "__main__":
    main()
