"""
triton_matmul.py: a Triton GEMM (C = A @ B) built up step by step until it is within reach
of cuBLAS, then given GPT-2's fused MLP epilogue (bias + GELU).

You will learn about:
  - how one Triton *program* computes one BLOCK_M x BLOCK_N tile of C with a loop over K,
    an fp32 accumulator, and masks so that any M, N, K works;
  - why the *order* in which programs are launched matters (L2 cache reuse, "grouped" order);
  - how Triton stages A and B tiles through shared memory, what software pipelining
    (`num_stages`) buys, and how `@triton.autotune` picks tile sizes / num_warps / num_stages;
  - occupancy: computed from the compiled kernel's own registers and shared memory, and why
    the fastest config is often *not* the highest-occupancy one; also without a GPU, by
    compiling for an H100/H200 on any machine (compile_offline);
  - fusing bias + GELU into the GEMM epilogue, and profiling kernels (torch.profiler, ncu);
  - decode-shaped kernels (v5): why a 1-token GEMM is bandwidth-bound, how many bytes must be
    in flight to reach HBM speed (Little's law), a GEMV with bias + GELU + residual fused, and
    a one-row LayerNorm/RMSNorm;
  - v6 (Hopper): the same one-row GEMV with its weight tile copied by TMA into shared memory,
    written in Gluon (Triton's lower-level dialect: layouts, shared memory, mbarriers explicit).

The version ladder (8192^3 fp16 on an H200, GPU time per GEMM from CUDA graphs, one run of
`python bench.py --topic matmul`, torch 2.11 / triton 3.6):
  v1  one program per tile, row-major launch order, 64x64x32 tiles   209 TFLOP/s (0.33x cuBLAS)
  v2  + grouped (L2-friendly) launch order, 128x128x64 tiles         578 TFLOP/s (0.90x)
  v3  + autotuned BLOCK_M/N/K, num_warps, num_stages                  607 TFLOP/s (0.94x); geometric
      mean over 2048/4096/8192: 0.95x cuBLAS in fp16, 0.96x in bf16
  v4  + fused bias + GELU(tanh) epilogue (GPT-2 MLP c_fc, 16 tokens x 768 -> 3072): 4.0 us vs
      5.2 us for torch addmm + gelu (1.3x); 4096 tokens: 46.0 vs 47.2 us (1.03x)
  cuBLAS (torch.matmul), same run                                     643 TFLOP/s
  v5  decode (1 token): GEMV on CUDA cores with bias/GELU/residual fused, one-row norms.
      GPT-2 1.5B shapes, in CUDA graphs, single-shot configs: 1.0-3.2x torch (cuBLAS +
      epilogue kernels), 1.9-2.7 TB/s for the 5-20 MB layers, 97% of copy bandwidth for the
      161 MB LM head; LayerNorm 1.7 vs 4.2 us; the norm can be folded into the GEMV. At 4
      tokens it is 0.27-0.67x cuBLAS (gemv.md), so serve.py uses it for single rows only.
  v6  Hopper: the one-row GEMV's weight tile through TMA into shared memory before the PDL wait
      (Gluon). Alone 1.2x v5 on the normed c_attn / c_fc; in the whole GPT-2 1.5B decode step
      (qkv and mlp fc through it) 1.42 -> 1.32 ms in one A/B run (H200); `bench.py --topic serve`
      then measured 743 tok/s, 54.8% of the bandwidth roofline measured in the same run.

Run:
  python triton_matmul.py                     # checks every version against torch, prints a table
  python triton_matmul.py --size 4096 --profile   # + a torch.profiler table (GPU)
  python bench.py --topic matmul              # TFLOP/s vs cuBLAS, autotune/occupancy table, plot
  python bench.py --topic gemv                # v5: GPT-2 1.5B's decode kernels, torch vs v5
Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1) on small shapes,
and the occupancy of the GPU configs comes from compiling them for sm_90 (Hopper) offline.
"""
import argparse
import functools
import math
import os
import weakref

import torch
import torch.utils.weak

# No GPU and no explicit choice: run Triton kernels in its CPU interpreter. This must happen
# before `import triton`, which reads the variable when it is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.language.extra import cuda as tl_cuda  # noqa: E402  (griddepcontrol: PDL below)
from triton.experimental import gluon  # noqa: E402  (v6: Hopper's TMA into shared memory)
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma  # noqa: E402
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: E402

from model import pdl_launch_args, rms_norm  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# subtle: Triton's CPU interpreter keeps bf16 as raw uint16 bits and its tl.dot multiplies those
# bits as integers (documented as unsupported; triton-lang/triton#11584). Under the interpreter
# the kernels convert dot operands to fp32 first: exact for fp16/bf16, and it is what the
# tensor cores compute anyway (exact products, fp32 sums). A global constexpr, so the GPU build
# compiles the conversion away.
CPU_INTERPRETER = tl.constexpr(INTERPRET)

# -----------------------------------------------------------------------------
# The reference. Every kernel below is checked against this (tests use float64 on CPU).

def matmul_reference(a, b, bias=None, activation=None, acc_dtype=torch.float32, residual=None):
    """C = act(A @ B + bias) + residual, computed in acc_dtype, rounded once to A's dtype."""
    c = a.to(acc_dtype) @ b.to(acc_dtype)
    if bias is not None:
        c = c + bias.to(acc_dtype)
    if activation == "gelu_tanh":
        c = torch.nn.functional.gelu(c, approximate="tanh")
    if residual is not None:
        c = c + residual.to(acc_dtype)
    return c.to(a.dtype)


def _check_inputs(a, b, bias=None, activation=None, out=None):
    """Clear errors for bad input. Any strides are fine for a, b and out: the kernels take their
    strides as arguments, so a transposed weight (`w.t()`) or a sliced view works without a copy.
    The bias is read with unit stride, so it must be contiguous."""
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"expected 2-D a and b, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"inner dimensions differ: a is {tuple(a.shape)}, b is {tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"a and b must share one of fp16/bf16/fp32, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device}, b is on {b.device}")
    _check_like("bias", bias, (b.shape[1],), a)
    if activation not in (None, "gelu_tanh"):
        raise ValueError(f"activation must be None or 'gelu_tanh', got {activation!r}")
    if out is not None and (out.shape != (a.shape[0], b.shape[1]) or out.dtype != a.dtype
                            or out.device != a.device):
        raise ValueError(f"out must be {(a.shape[0], b.shape[1])} {a.dtype} on {a.device}")
    # Offsets are computed in int32 inside the kernels: refuse what would overflow, the output
    # included (65,536 tokens x 50,257 logits is 3.3e9 elements).
    _check_int32(a, b, out)
    if out is None and a.shape[0] * b.shape[1] > 2**31:          # last offset M*N - 1 must fit
        raise ValueError(f"the {a.shape[0]} x {b.shape[1]} output is too large for int32 offsets in this teaching kernel")


# Precision of tl.dot. fp16/bf16 inputs always run on tensor cores with fp32 accumulation.
# fp32 inputs: tl.dot's default, input_precision="tf32", keeps 10 mantissa bits and uses
# tensor cores, while tl.dot(..., input_precision="ieee") would be exact fp32 on the FMA units.
# torch.matmul uses exact fp32 unless torch.backends.cuda.matmul.allow_tf32 is True, so compare
# like with like. Measured at 4096^3 on an H200 (relative Frobenius error, TFLOP/s): this
# kernel 7.8e-4 at 82; cuBLAS tf32 2.9e-4 at 399; cuBLAS exact fp32 1.1e-6 at 51. Two likely
# reasons we are worse: the operands are probably truncated rather than rounded to tf32, and
# Hopper's wgmma reads 32-bit operands from SMEM only in K-major layout, which a row-major B
# is not, so Triton cannot use its fast path. For fp32 weights, cast to bf16 or use cuBLAS.

# -----------------------------------------------------------------------------
# v1: one program per output tile.
#
# C is cut into tiles of BLOCK_M x BLOCK_N; the grid is (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))
# and program (pid_m, pid_n) computes one tile:
#
#   acc = zeros(BLOCK_M, BLOCK_N) in fp32
#   for k in range(0, K, BLOCK_K):
#       acc += A[pid_m rows, k:k+BLOCK_K] @ B[k:k+BLOCK_K, pid_n cols]    # one tl.dot
#   C[pid_m rows, pid_n cols] = acc
#
# Pointer arithmetic: element A[i, k] lives at a_ptr + i*stride_am + k*stride_ak, so a whole
# tile of pointers is an outer sum of a column of row offsets and a row of column offsets.
# Masks: rows >= M, columns >= N and the ragged last K step load 0 (which adds nothing to
# the dot product) and are never stored, so M=1 or K=65 with BLOCK_K=32 are handled.
# Why fp32 accumulation: summing K=4096 fp16 products in fp16 (10-bit mantissa) would lose
# about 3 decimal digits; tensor cores accumulate in fp32 at no extra cost.

@triton.jit
def matmul_v1_kernel(
    a_ptr, b_ptr, c_ptr,                                  # pointers to the matrices
    M, N, K,                                              # A is M x K, B is K x N
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)      # (BLOCK_M,) rows of this tile
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)      # (BLOCK_N,) columns of this tile
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn  # (BLOCK_K, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K - k0)
        b_mask = (offs_k[:, None] < K - k0) & (offs_n[None, :] < N)
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        if CPU_INTERPRETER:                               # bf16 workaround, see top of file
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc)                           # fp32 accumulate
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def matmul_v1(a, b, out=None, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32):
    """v1: a first, correct Triton GEMM. tl.dot needs every block dimension >= 16.
    `out` (optional, M x N) receives the result, like torch's out= argument."""
    _check_inputs(a, b, out=out)
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), device=a.device, dtype=a.dtype) if out is None else out
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    matmul_v1_kernel[grid](a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                           c.stride(0), c.stride(1), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return c

# -----------------------------------------------------------------------------
# v2: L2-friendly ("grouped") launch order.
#
# The GPU runs programs roughly in launch order, ~one or two per SM at a time (132 SMs on an
# H100 SXM). With v1's row-major order, the first 132 programs of an 8192^3 GEMM with 128x128
# tiles are 2 rows of tiles: they read 2 row-panels of A (2 x 128 x 8192 fp16 = 4 MB) but
# 64 column-panels of B, i.e. all of B (128 MB), far more than the 50 MB L2. Every B panel
# comes from DRAM again for the next row. Grouped order walks GROUP_M rows of tiles
# column by column instead, so those 132 programs cover an 8 x 16 block of tiles: 8 A panels
# + 16 B panels of 2 MB = 48 MB, about the L2's size (50 MB on an H100, 60 MB on an H200), and
# each panel is reused 8-16 times while it is there:
#
#   row-major (v1)            grouped, GROUP_M = 2
#    0  1  2  3                0  2  4  6
#    4  5  6  7                1  3  5  7
#    8  9 10 11                8 10 12 14
#
# Two more changes from v1: a 1-D grid (the program id is remapped to (pid_m, pid_n) as
# above) and cheaper masks: row/column offsets past the edge are wrapped with `% M` / `% N`
# (they load valid memory whose results are never stored), so only the K tail needs a mask.
# v2 also uses bigger tiles than v1 (128x128x64, 8 warps; v3 explains why bigger is faster),
# so the v1 -> v2 step in the ladder is both effects. GROUP_M=1 is row-major order again:
# bench.py times `matmul_v2(a, b, GROUP_M=1)` next to v2 to isolate the L2 effect.
# The epilogue (bias, activation) is switched off until v4; constexpr branches are removed
# at compile time, so v2/v3 pay nothing for it.

@triton.jit
def _gelu_tanh(x):
    # GPT-2's GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
    # Uses 0.5 (1 + tanh(u)) == sigmoid(2u), which avoids a separate tanh and is stable for large |x|.
    # The clamp moves a result by at most |x| * 4e-18 (sigmoid(-40)), for x < -7, and keeps the
    # CPU interpreter's exp() from overflowing (a warning) for very negative inputs.
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x * tl.sigmoid(tl.maximum(2.0 * u, -40.0))


@triton.jit
def matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
):
    # --- grouped program order (see the picture above) ---
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n                # programs in one band of GROUP_M tile rows
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)  # the last band may be shorter
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)  # walk down the band...
    pid_n = (pid % num_pid_in_group) // group_size_m                 # ...then to the next column

    # --- main loop: same as v1, with wrapped rows/columns instead of M/N masks ---
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (offs_m % M)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + (offs_n % N)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k0, other=0.0)
        if CPU_INTERPRETER:                               # bf16 workaround, see top of file
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # --- epilogue (v4): applied to the fp32 tile while it is still in registers ---
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if ACTIVATION == "gelu_tanh":
        acc = _gelu_tanh(acc)

    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def _launch(kernel, a, b, bias, activation, out=None, **meta):
    """Shared launcher for v2..v4. `kernel` is matmul_kernel (explicit meta) or the autotuned
    wrapper (meta chosen by the autotuner). Returns (C, compiled kernel or None)."""
    _check_inputs(a, b, bias, activation, out)
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), device=a.device, dtype=a.dtype) if out is None else out
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)
    compiled = kernel[grid](
        a, b, c, bias if bias is not None else c,         # dummy pointer when there is no bias
        M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        HAS_BIAS=bias is not None, ACTIVATION=activation or "", **meta)
    return c, compiled   # the interpreter returns None instead of a compiled kernel


def matmul_v2(a, b, out=None, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3):
    """v2: grouped launch order with one fixed, reasonable config."""
    meta = dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M,
                num_warps=num_warps, num_stages=num_stages)
    return _launch(matmul_kernel, a, b, None, None, out, **meta)[0]

# -----------------------------------------------------------------------------
# v3: autotuned tile sizes, num_warps, num_stages.
#
# Shared memory. Per K step a program needs an A tile (BLOCK_M x BLOCK_K) and a B tile
# (BLOCK_K x BLOCK_N). We never write "shared memory" in the kernel: Triton's compiler sees
# that the operands of tl.dot are loaded tiles and places them in shared memory (SMEM), where
# the tensor cores read them (Hopper's wgmma reads both operands straight from SMEM). Each
# element loaded from DRAM/L2 is then reused BLOCK_N (for A) or BLOCK_M (for B) times from
# SMEM: a 128x256 tile does 2*128*256 = 65536 FLOPs per (128+256) elements loaded, i.e.
# 85 FLOP/byte in fp16, versus 0.5 FLOP/byte for a loop that reads both operands of every
# multiply-add from memory.
#
# Software pipelining (num_stages = S). A load from global memory takes ~500-800 cycles. With
# S > 1 the compiler allocates S SMEM slots per operand (a ring buffer) and issues asynchronous
# copies (cp.async; TMA when a kernel uses tensor descriptors) for K steps i+1 .. i+S-1 while
# the tensor cores work on step i; the loop waits only for data that was requested S-1 steps
# ago. Latency is hidden by overlap *within* one program, instead of by switching to other
# warps. The price is SMEM: S * (BLOCK_M + BLOCK_N) * BLOCK_K * 2 bytes, e.g. 128x256x64
# fp16 with S=3 is 3 * 48 KB = 144 KB of the 228 KB a Hopper SM has: one such program per SM.
#
# num_warps: threads per program / 32. On Hopper, tl.dot becomes wgmma when num_warps is a
# multiple of 4 (a "warpgroup") and BLOCK_M >= 64; the 128x256 fp32 accumulator is 128 KB of
# registers, i.e. 128 registers per thread with 8 warps before any address or loop registers
# (ptxas reports 206 in all), and 256 with 4 warps: more than the 255 a thread may have.
#
# The best values depend on shape and GPU, so @triton.autotune times every config the first
# time it sees a new (M, N, K, dtype, epilogue) and caches the winner. Decode-shaped GEMMs
# (M <= 32 tokens) get their own small-BLOCK_M configs: with BLOCK_M=128 a 1-token GEMM would
# waste 127/128 of every tensor-core op and, worse, launch too few programs to pull full
# memory bandwidth. On CPU (interpreter) the autotuner would run every config on every new
# shape, which is very slow, so there we use a single small config.

def _config(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m),
                         num_warps=warps, num_stages=stages)

GPU_AUTOTUNE_CONFIGS = [
    # large-M configs (prefill, training-sized GEMMs). 128x128x64 with 3 stages (96 KB SMEM,
    # 122 registers) fits 2 programs per SM: close when tiles are few (2048^2: 639 vs 663).
    _config(128, 256, 64, 8, 3), _config(128, 256, 64, 8, 4), _config(256, 128, 64, 8, 3),
    _config(128, 128, 64, 8, 3), _config(128, 128, 64, 8, 4),
    # medium tiles: enough programs when M or N is small (256 tokens x 768 outputs is only
    # 6 tiles of 128x256 for 132 SMs, but 48 of 64x64)
    _config(64, 128, 64, 4, 4), _config(64, 64, 64, 4, 4),
    # small-M configs (decode: a few tokens against a big weight). Long BLOCK_K and deep
    # pipelines keep many bytes of the weight in flight per program.
    _config(16, 32, 128, 4, 4), _config(16, 32, 256, 4, 3), _config(16, 64, 256, 4, 3),
    _config(32, 64, 64, 4, 4),
]
AUTOTUNE_CONFIGS = (GPU_AUTOTUNE_CONFIGS if torch.cuda.is_available() and not INTERPRET
                    else [_config(32, 32, 32, 4, 1, group_m=4)])   # interpreter: one small config


def smem_bytes_estimate(cfg, elem_bytes):
    """SMEM one program of `cfg` needs at most: num_stages ring slots of an A and a B tile. This
    matches kernel.metadata.shared for the large fp16 configs above (128x256x64, 3 stages:
    147456 bytes); the small-BLOCK_M ones compile to less (16x32x128, 4 stages: 36 of 48 KB)."""
    k = cfg.kwargs
    return cfg.num_stages * (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * elem_bytes


def _prune_configs(configs, named_args, smem_limit=None, **kwargs):
    """Before compiling and timing anything (~1 s per config): only small-BLOCK_M configs for
    M <= 32 (large ones otherwise); no tile twice the size of the matrix or more (it computes
    mostly padding); none whose tiles cannot fit in shared memory (fp32 tiles are twice
    fp16's), which would only fail at launch. If nothing is left, keep everything."""
    a = named_args.get("a_ptr")
    if smem_limit is None:
        on_cuda = isinstance(a, torch.Tensor) and a.is_cuda
        smem_limit = (getattr(torch.cuda.get_device_properties(a.device), "shared_memory_per_block_optin",
                              227 * 1024) if on_cuda else float("inf"))
    elem = a.element_size() if isinstance(a, torch.Tensor) else 2
    M, N = named_args["M"], named_args.get("N", 1 << 30)
    kept = [c for c in configs
            if (c.kwargs["BLOCK_M"] <= 32) == (M <= 32)
            and c.kwargs["BLOCK_M"] < 2 * max(M, 16) and c.kwargs["BLOCK_N"] < 2 * max(N, 16)
            and smem_bytes_estimate(c, elem) <= smem_limit]
    return kept or configs


# Autotuning times each config with 25 ms warm-up and 50 ms of repeats (Triton's default
# repeats for 100 ms): ~0.5 s per new shape for 7 configs. With 5 + 25 ms, one of our runs
# picked a config 11% slower than the best at 4096^3: close configs differ by a few percent,
# about as much as run-to-run noise, so the timing must not be too short.
matmul_kernel_autotuned = triton.autotune(
    configs=AUTOTUNE_CONFIGS, key=["M", "N", "K", "HAS_BIAS", "ACTIVATION"],
    prune_configs_by={"early_config_prune": _prune_configs},
    do_bench=functools.partial(triton.testing.do_bench, warmup=25, rep=50),
)(matmul_kernel)

# Where v3 falls short of cuBLAS (H200 numbers from bench.py, GPU time per GEMM):
#  - Square sizes: 0.94-0.97x at 2048-8192, 0.89x at 1024. cuBLAS's Hopper kernels (nvjet) are
#    persistent (one program per SM loops over tiles, so one tile's epilogue overlaps the next
#    tile's loads), warp-specialised (producer warps issue TMA copies, consumer warpgroups run
#    wgmma) and use 2-SM clusters that multicast shared tiles. Ours launches one program per
#    tile and pays each pipeline's fill and drain.
#  - Wave quantisation: 4096 x 768 x 2304 (GPT-2 c_attn prefill) is 0.78x. 128x256 tiles give
#    288 tiles = 2.2 waves on 132 SMs, so the third wave runs 24 tiles on an idle GPU.
#  - Few tiles, long K: 256 tokens x 3072 -> 768 (c_proj) is 0.69x: 12 tiles of 128x128 for 132
#    SMs. cuBLAS splits K across programs (split-K / stream-K) and adds partial sums; we don't.
#  - Decode (1-16 tokens): 0.82-1.0x cuBLAS. Both reach only 13-54% of the copy bandwidth: a
#    3.5 MB weight takes ~0.8 us to stream but each kernel costs ~3-4 us of fixed start-up/tail.
#  - Launch overhead, outside the kernel: from Python a Triton launch costs ~50 us
#    (~80 us through the autotuner) on the test machine's host vs ~23 us for torch.matmul, more
#    than the GPU time of any GEMM below ~2048^3. Called eagerly, v3 reaches only 0.68x cuBLAS
#    on the same squares. CUDA graphs (serve.py) replay launches without that cost.


def matmul(a, b, bias=None, activation=None, out=None):
    """v3/v4: the autotuned GEMM. act(a @ b + bias) with activation in (None, "gelu_tanh").

    `a` may have leading batch dimensions (B, T, K): they are flattened into M = B*T, which is
    how a Linear layer sees its input. For a torch Linear weight W (N, K) pass b = W.t()."""
    lead = a.shape[:-1]
    a2 = a.reshape(-1, a.shape[-1])
    out2 = None if out is None else out.view(-1, b.shape[1])
    c, _ = _launch(matmul_kernel_autotuned, a2, b, bias, activation, out2)
    return c.reshape(*lead, b.shape[1])


def matmul_with_config(a, b, config, bias=None, activation=None):
    """Run matmul_kernel with one explicit triton.Config (for the autotune/occupancy table).
    Returns (C, compiled kernel); the compiled kernel is None under the interpreter."""
    meta = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    return _launch(matmul_kernel, a, b, bias, activation, **meta)

# -----------------------------------------------------------------------------
# v4: fused epilogue, bias + GELU (GPT-2's MLP: h = gelu_tanh(x @ W_fc + b_fc)).
#
# Unfused, the naive torch path runs three kernels: the GEMM writes h (M x 3072) to DRAM, the bias
# add reads and writes it, the GELU reads and writes it again: 5 passes over M*3072*2 bytes, for
# 4096 tokens 126 MB of extra traffic. torch's addmm already folds the bias into the GEMM, leaving
# one extra read+write for the GELU, and at these sizes h (25 MB) mostly stays in L2. So the
# measured gain is small: on the H200 v4 takes 46 us against 47.2 us for addmm + gelu at 4096
# tokens x 768->3072 (1.03x), 4.0 vs 5.2 us at 16 tokens (1.3x, one launch instead of two), and
# is slower at 1 token x 1600->6400 (9.7 vs 8.4 us). Fused, bias and GELU are applied to the fp32
# accumulator in registers and h is written once (see the epilogue in matmul_kernel). It is also slightly more accurate: GELU
# sees the fp32 value before the single rounding to fp16/bf16.
# model.py can use it behind a flag: `h = matmul(x, w_fc, bias=b_fc, activation="gelu_tanh")`.

def matmul_bias_gelu(a, b, bias, out=None):
    """v4: gelu_tanh(a @ b + bias) in one kernel."""
    return matmul(a, b, bias=bias, activation="gelu_tanh", out=out)

# -----------------------------------------------------------------------------
# Occupancy: how many warps an SM keeps resident, as a fraction of its maximum (64 on
# Hopper). A program (CTA) is resident until it finishes, and it can only start if its SM
# has enough of each resource left:
#   registers:     65536 per SM, allocated per warp in units of 256 (n_regs*32 rounded up)
#   shared memory: 228 KB per SM, plus 1 KB the driver reserves per program
#   threads:       2048 per SM (64 warps), and at most 32 programs per SM
# The compiled kernel reports its own registers per thread (kernel.n_regs, set by ptxas) and
# SMEM per program (kernel.metadata.shared).
#
# Why the fastest config is often not the highest-occupancy one: occupancy exists to hide
# latency by switching between warps. A pipelined GEMM hides latency inside one program
# (num_stages in-flight copies), and big tiles give more reuse per byte loaded. Measured at
# 4096^3 fp16 on an H200: 128x256x64 with 3 stages (206 registers/thread, 144 KB SMEM: one
# program = 8 warps per SM, 12.5% occupancy) ran 667 TFLOP/s; 128x128x64 (2 programs per SM,
# 25%) 592; 64x64x64 (3 programs, 18.8%) 340. The big tile does 2*128*256/(128+256) = 171
# FLOPs per element it loads, the 64x64 tile 64: fewer bytes cross from L2 to SMEM per FLOP.
# Low occupancy hurts when nothing else hides latency: unpipelined (num_stages=1) kernels,
# or memory-bound decode GEMMs, where bytes in flight per SM are what count.
# Also watch "waves": 512 tiles over 132 SMs at one program each is 3.9 waves, so the last
# wave leaves 12% of the SMs idle; a config with more, smaller tiles can lose less to that tail.

def occupancy_from_resources(n_regs, shared_bytes, num_warps, regs_per_sm=65536,
                             smem_per_sm=228 * 1024, max_warps_per_sm=64, max_programs_per_sm=32,
                             reg_unit=256, smem_reserved_per_program=1024, warp_size=32):
    """Programs per SM, occupancy (resident warps / max warps) and the limiting resource."""
    regs_per_warp = math.ceil(n_regs * warp_size / reg_unit) * reg_unit
    limits = {
        "registers": (regs_per_sm // regs_per_warp) // num_warps if regs_per_warp else max_programs_per_sm,
        "shared memory": smem_per_sm // (shared_bytes + smem_reserved_per_program),
        "warps": max_warps_per_sm // num_warps,
        "programs": max_programs_per_sm,
    }
    limiter = min(limits, key=limits.get)
    programs = limits[limiter]
    return dict(programs_per_sm=programs, occupancy=programs * num_warps / max_warps_per_sm,
                limiter=limiter, n_regs=n_regs, shared_bytes=shared_bytes, num_warps=num_warps)


def device_limits(device):
    """SM limits of a CUDA device, with Hopper values where torch does not report them."""
    p = torch.cuda.get_device_properties(device)
    return dict(regs_per_sm=getattr(p, "regs_per_multiprocessor", 65536),
                smem_per_sm=getattr(p, "shared_memory_per_multiprocessor", 228 * 1024),
                max_warps_per_sm=getattr(p, "max_threads_per_multi_processor", 2048) // 32,
                num_sms=p.multi_processor_count)


def occupancy_of(kernel, device):
    """Occupancy of a compiled Triton kernel (the object `fn[grid](...)` returns) on `device`."""
    limits = device_limits(device)
    num_sms = limits.pop("num_sms")
    occ = occupancy_from_resources(kernel.n_regs, kernel.metadata.shared, kernel.metadata.num_warps, **limits)
    occ["num_sms"] = num_sms
    occ["n_spills"] = kernel.n_spills
    return occ


def occupancy_table(M, N, K, dtype=torch.float16, device="cuda", configs=None):
    """For each config: compile it on an (M, N, K) problem and read its resources.
    Returns a list of dicts (config fields + occupancy fields + waves). Needs CUDA."""
    if INTERPRET or not torch.cuda.is_available():
        raise RuntimeError("occupancy needs a compiled kernel, i.e. a CUDA GPU (not the interpreter)")
    a = torch.randn(M, K, device=device, dtype=dtype)
    b = torch.randn(K, N, device=device, dtype=dtype)
    rows = []
    for cfg in configs or AUTOTUNE_CONFIGS:
        try:
            _, kernel = matmul_with_config(a, b, cfg)
        except triton.runtime.errors.OutOfResources as err:   # e.g. too much SMEM for fp32
            rows.append(dict(config=cfg, error=str(err)))
            continue
        occ = occupancy_of(kernel, a.device)
        occ["waves"] = _waves(M, N, cfg, max(occ["programs_per_sm"], 1), occ["num_sms"])
        rows.append(dict(config=cfg, **occ))
    return rows


# Without a GPU. Triton compiles for a GPU it does not have: triton.compile with a target
# (here Hopper, sm_90, the H100/H200 this repo measures on) runs the whole pipeline, Triton IR
# -> PTX -> ptxas -> cubin, on any machine, with the ptxas bundled in the Triton wheel. So the
# register count, the spills and the shared memory of a config, and from them its occupancy,
# can be read on a laptop; only the timing needs the card. What the compiler made can be read
# too: compiled.asm holds "ttir", "ttgir" (layouts, shared-memory buffers, async copies and
# wgmma with their waits), "ptx" and the cubin (SASS through the bundled nvdisasm).
# Two details make the offline build match the real one: the integer arguments a launch would
# specialise (a stride of 1 becomes a constant, multiples of 16 are marked divisible, which
# lets loads be vectorised), and a process of its own, because with TRITON_INTERPRET=1 (this
# file on a CPU) the kernels are interpreter objects that cannot be compiled.

def _launch_signature(fn, tensors: dict, ints: dict, constexprs: dict):
    """(signature, constexprs, attrs) for ASTSource, as a launch with these values would make
    them for this file's GEMM and GEMV kernels: tensors name -> dtype string ("fp16"), scalars
    name -> value (a float is fp32; an int32 of 1 becomes a constant, a multiple of 16 is marked
    divisible); "tma:fp16:32" is v6's weight descriptor with 32-row boxes, "tma:bf16:64x128" a
    descriptor with (64, 128) boxes in the default shared layout. Not covered, since
    those kernels need neither: do_not_specialize, int64 values."""
    signature, consts, divisible = {}, dict(constexprs), []
    for i, name in enumerate(fn.arg_names):
        if name in tensors and tensors[name].startswith("tma:"):
            signature[name] = _tma_descriptor_type(tensors[name])
        elif name in tensors:
            signature[name] = "*" + tensors[name]
            divisible.append((i,))                      # torch allocations are 16-byte aligned
        elif name in ints and isinstance(ints[name], float):
            signature[name] = "fp32"
        elif name in ints:
            value = ints[name]
            if not -2**31 <= value < 2**31:
                raise ValueError(f"{name}={value} needs int64, which this helper does not model")
            if value == 1:
                signature[name], consts[name] = "constexpr", 1
            else:
                signature[name] = "i32"
                if value % 16 == 0:
                    divisible.append((i,))
        elif name in consts:
            signature[name] = "constexpr"
        elif fn.params[i].has_default:              # a constexpr left at its default
            signature[name], consts[name] = "constexpr", fn.params[i].default
        else:
            raise ValueError(f"no value for argument {name} of {fn.__name__}")
    return signature, consts, {d: [["tt.divisibility", 16]] for d in divisible}


def _tma_descriptor_type(spec):
    """"tma:fp16:32" -> the signature type of v6's weight descriptor; "tma:bf16:64x128" -> that
    of a descriptor with (64, 128) boxes (the box and its shared layout are part of the type; the
    tensor's own shape is not, so any tensor will do)."""
    from triton.runtime.jit import mangle_type
    _, dtype, box = spec.split(":")
    shape = [int(n) for n in box.split("x")] if "x" in box else [int(box), TMA_BOX_K]
    return mangle_type(tma_descriptor(torch.empty(shape, dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]),
                                      shape))


HOPPER = 90            # the compute capability compiled for offline (H100 / H200)
_OFFLINE_TIMEOUT_S = 300


def _compile_offline_here(jobs, sass=False):
    import importlib
    import re
    import subprocess
    import tempfile
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction
    results = []
    for fn_name, tensors, ints, constexprs, num_warps, num_stages, *more_options in jobs:
        module, _, fn_name = fn_name.rpartition(".")    # "flash_attn._paged_decode_split_kernel", or this file's
        fn = getattr(importlib.import_module(module), fn_name) if module else globals()[fn_name]
        gluon_kernel = isinstance(fn, GluonJITFunction)  # v6: num_warps is one of its constexpr arguments
        if gluon_kernel:
            constexprs = dict(constexprs, num_warps=num_warps)
        try:
            signature, consts, attrs = _launch_signature(fn, tensors, ints, constexprs)
            src = (GluonASTSource if gluon_kernel else ASTSource)(
                fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
            compiled = triton.compile(src, target=GPUTarget("cuda", HOPPER, 32),
                                      options=dict(num_warps=num_warps, num_stages=num_stages, **dict(*more_options)))
        except Exception as err:                # noqa: BLE001 (a job that does not compile: report it)
            results.append(dict(error=f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"))
            continue
        # Registers and stack from the cubin (Triton keeps ptxas's own report to itself), with
        # the cuobjdump bundled next to ptxas: "REG:206 STACK:0 ...". STACK is the local memory
        # per thread that ptxas -v reports as "bytes stack frame" (checked equal on spilling and
        # clean kernels) and a GPU as CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES; kernel.n_spills is / 4.
        tools = os.path.dirname(get_ptxas(HOPPER).path)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "kernel.cubin")
            with open(cubin, "wb") as f:
                f.write(compiled.asm["cubin"])
            usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", cubin], capture_output=True,
                                   text=True, check=True, timeout=_OFFLINE_TIMEOUT_S).stdout
            if sass:        # the machine code, through the nvdisasm bundled with Triton
                text = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", cubin], capture_output=True,
                                      text=True, check=True, timeout=_OFFLINE_TIMEOUT_S).stdout
        regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
        if regs is None or stack is None:
            raise RuntimeError(f"no register count in cuobjdump's output:\n{usage[-1000:]}")
        results.append(dict(n_regs=int(regs.group(1)), n_spills=int(stack.group(1)) // 4,
                            shared_bytes=compiled.metadata.shared, num_warps=num_warps))
        if sass:
            results[-1]["sass"] = [m.group(1) for m in re.finditer(r"\*/\s+(.*?)\s*;", text)]
    return results


def compile_offline(jobs, sass=False):
    """Compile kernels for an H100/H200 (sm_90) without one. jobs: (kernel name: one of this
    file's, or "module.name" for another file's, {tensor arg: dtype string}, {scalar arg: value},
    {constexpr: value; the ones left out keep their defaults}, num_warps, num_stages[, {more
    compile options, e.g. maxnreg}]).
    Returns one dict per job: n_regs (per thread), n_spills (local memory per thread in 4-byte
    words, as kernel.n_spills counts it), shared_bytes (per program), with sass=True the SASS
    instructions (a list of strings), or error."""
    if not INTERPRET:
        return _compile_offline_here(jobs, sass)
    import json
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import json, sys; sys.path.insert(0, {here!r}); import triton_matmul as tm; "
            f"print(json.dumps(tm._compile_offline_here(json.loads(sys.argv[1]), {bool(sass)})))")
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-c", code, json.dumps(jobs)], capture_output=True, text=True,
                         env=env, timeout=_OFFLINE_TIMEOUT_S)
    if run.returncode != 0:
        raise RuntimeError(f"offline compile failed:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


# GPT-2 1.5B's one-row decode GEMVs: (name, N, K, norm folded in, activation, bias, residual)
GPT2_XL_DECODE_GEMVS = [("c_attn +LayerNorm +bias", 4800, 1600, "layer", None, True, False),
                        ("attn c_proj +bias +residual", 1600, 1600, None, None, True, True),
                        ("c_fc +LayerNorm +bias +GELU", 6400, 1600, "layer", "gelu_tanh", True, False),
                        ("mlp c_proj +bias +residual", 1600, 6400, None, None, True, True),
                        ("lm_head (no bias)", 50257, 1600, None, None, False, False)]


def gemv_sass_summary(shapes=GPT2_XL_DECODE_GEMVS, tma=False):
    """What the compiler made of the rule's one-row GEMV (fp16, sm_90, PDL on) for each entry of
    `shapes` (as in GPT2_XL_DECODE_GEMVS): the SASS around griddepcontrol.wait (ACQBULK in SASS,
    the PDL wait). The weight tile's loads (LDG) should all come before it, x's after. tma=True:
    v6's kernel instead (gemv_tma, where gemv_tma_config takes the shape; the others are left
    out: each row names its kernel), whose weight tile is one TMA box copy (UTMALDG) per 64
    columns. Returns one dict per shape compiled (counts before / after the wait), all in one go."""
    ptrs = ("x_ptr", "bias_ptr", "res_ptr", "y_ptr", "norm_w_ptr", "norm_b_ptr")
    jobs, configs, names = [], [], []
    for name, N, K, norm, activation, has_bias, has_residual in shapes:
        epilogue = dict(HAS_BIAS=has_bias, ACTIVATION=activation or "", HAS_RESIDUAL=has_residual, NORM=norm or "",
                        HAS_NORM_BIAS=norm == "layer", USE_PDL=True)
        if tma:
            cfg = gemv_tma_config(N, K, norm is not None, has_residual)
            if cfg is None:
                continue
            n_boxes = triton.cdiv(K, TMA_BOX_K)
            defer = norm is not None and gemv_tma_defers_norm(N, K)   # then the bias is fp32 (W b + bias)
            configs.append(f"{cfg[0]} rows x {cfg[1]} warps" + (", norm deferred" if defer else ""))
            names.append(name)
            jobs.append(("gemv_tma_kernel", dict(w_desc=f"tma:fp16:{cfg[0]}", **dict.fromkeys(ptrs, "fp16"))
                         | dict(row_gain_ptr="fp32", **(dict(bias_ptr="fp32") if defer else {})),
                         dict(N=N, K=K, norm_eps=1e-5, gain_scale=1.0),
                         dict(BLOCK_N=cfg[0], N_BOXES=n_boxes, BOXES_POW2=triton.next_power_of_2(n_boxes),
                              **dict(epilogue, HAS_NORM_BIAS=epilogue["HAS_NORM_BIAS"] and not defer), DEFER_NORM=defer),
                         cfg[1], 1))
            continue
        cfg = one_row_gemv_config(N, K, 2)
        configs.append(f"{cfg.kwargs['BLOCK_N']} rows x {cfg.num_warps} warps")
        names.append(name)
        jobs.append(("gemv_kernel", dict(w_ptr="fp16", **dict.fromkeys(ptrs, "fp16")),
                     dict(M=1, N=N, K=K, stride_xm=K, stride_wn=K, stride_rm=N, stride_ym=N, norm_eps=1e-5),
                     dict(**cfg.kwargs, BLOCK_M=1, **epilogue), cfg.num_warps, cfg.num_stages))
    rows = []
    for name, config, res in zip(names, configs, compile_offline(jobs, sass=True)):
        ins = res.pop("sass")
        wait = next(i for i, x in enumerate(ins) if x.startswith("ACQBULK"))
        count = lambda part, op: sum(op in x for x in part)                    # noqa: E731
        # v6: up to its wait on the weight tile's mbarrier (SYNCS.PHASECHK...TRYWAIT), i.e. x's preparation
        tile_wait = next((i for i in range(wait, len(ins)) if ins[i].startswith("SYNCS.PHASECHK")), wait)
        rows.append(dict(kernel=name, config=config, **res, barriers_before_tile_wait=count(ins[wait:tile_wait], "BAR.SYNC"),
                         instructions_before_wait=wait, instructions_after_wait=len(ins) - wait,
                         loads_before_wait=count(ins[:wait], "LDG"), loads_after_wait=count(ins[wait:], "LDG"),
                         tma_copies_before_wait=count(ins[:wait], "UTMALDG"),
                         tma_copies_after_wait=count(ins[wait:], "UTMALDG"),
                         barriers_before_wait=count(ins[:wait], "BAR.SYNC"),
                         barriers_after_wait=count(ins[wait:], "BAR.SYNC")))
    return rows


def _waves(M, N, cfg, programs_per_sm, num_sms):
    """Rounds of programs the grid needs when each SM holds programs_per_sm of them."""
    tiles = triton.cdiv(M, cfg.kwargs["BLOCK_M"]) * triton.cdiv(N, cfg.kwargs["BLOCK_N"])
    return tiles / (num_sms * programs_per_sm)


def occupancy_table_offline(M, N, K, dtype=torch.float16, configs=None, num_sms=132):
    """occupancy_table without a GPU: each config compiled for sm_90 (an H100 SXM or H200: 132
    SMs, 64K registers and 228 KB of shared memory per SM) and its occupancy computed from that.
    A config whose tiles do not fit in shared memory is an error row, as a GPU run reports it."""
    elem = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    configs = configs or GPU_AUTOTUNE_CONFIGS
    jobs = [("matmul_kernel", dict(a_ptr=elem, b_ptr=elem, c_ptr=elem, bias_ptr=elem),
             dict(M=M, N=N, K=K, stride_am=K, stride_ak=1, stride_bk=N, stride_bn=1, stride_cm=N, stride_cn=1),
             dict(**cfg.kwargs, HAS_BIAS=False, ACTIVATION=""), cfg.num_warps, cfg.num_stages) for cfg in configs]
    rows = []
    for cfg, res in zip(configs, compile_offline(jobs)):
        occ = None if "error" in res else occupancy_from_resources(res["n_regs"], res["shared_bytes"], cfg.num_warps)
        if occ is not None and occ["programs_per_sm"] > 0:
            occ.update(num_sms=num_sms, n_spills=res["n_spills"],
                       waves=_waves(M, N, cfg, occ["programs_per_sm"], num_sms))
            rows.append(dict(config=cfg, **occ))
        elif occ is not None:                     # 0 programs per SM: what a launch would refuse
            rows.append(dict(config=cfg, error=f"out of resources ({occ['limiter']}: {res['n_regs']} registers x "
                                               f"{cfg.num_warps} warps, {res['shared_bytes'] / 1024:.0f} KB of "
                                               "shared memory)"))
        else:
            rows.append(dict(config=cfg, **res))
    return rows


def config_name(cfg):
    k = cfg.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} w{cfg.num_warps} s{cfg.num_stages}"

# -----------------------------------------------------------------------------
# Profiling.
#
# torch.profiler records every kernel launch with its GPU time, so it shows what the GEMM
# really costs, how many kernels a call launches (1 for the fused v4, 3 for torch's
# matmul + bias + gelu), and the autotuner's extra launches on a new shape.
# For hardware counters use Nsight Compute on one launch of the kernel (skip the warm-up and
# autotuning launches):
#
#   ncu --kernel-name matmul_kernel --launch-skip 0 --launch-count 1 \
#       --section SpeedOfLight --section Occupancy --section LaunchStats \
#       --section MemoryWorkloadAnalysis -o matmul_4096 python triton_matmul.py --size 4096
#
# (the first launch of matmul_kernel in the demo is v2's 128x128x64 config on the 4096^3 check;
# raise --launch-skip past the autotuner's trial launches to see v3's pick) and read:
# "Compute (SM) Throughput" (tensor pipe busy %), "DRAM Throughput", "Achieved
# Occupancy" vs "Theoretical Occupancy" (the latter should equal occupancy_of above), "Block
# Limit Registers / Shared Mem", and L2 hit rate (grouped order raises it). Single metrics:
# `--metrics sm__warps_active.avg.pct_of_peak_sustained_active,dram__bytes_read.sum,lts__t_sector_hit_rate.pct`.

def profile_matmul(M=4096, N=4096, K=4096, dtype=torch.float16, device=None, reps=10, row_limit=12):
    """Profile `reps` calls of v3, v4 and torch's equivalents; return key_averages().table()."""
    from torch.profiler import ProfilerActivity, profile, record_function
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    a = torch.randn(M, K, device=device, dtype=dtype)
    b = torch.randn(K, N, device=device, dtype=dtype)
    bias = torch.randn(N, device=device, dtype=dtype)
    gelu = functools.partial(torch.nn.functional.gelu, approximate="tanh")
    matmul(a, b), matmul(a, b, bias, "gelu_tanh")           # autotune outside the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(reps):   # labelled ranges: CPU-side cost of each call, incl. Python/launch
            with record_function("triton v3 matmul"):
                matmul(a, b)
            with record_function("torch.matmul"):
                torch.matmul(a, b)
            with record_function("triton v4 matmul+bias+gelu"):
                matmul(a, b, bias, "gelu_tanh")
            with record_function("torch matmul+bias+gelu"):
                gelu(torch.matmul(a, b) + bias)
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)

# -----------------------------------------------------------------------------
# v5: decode-shaped kernels. A GEMV with a fused epilogue, and a one-row LayerNorm / RMSNorm.
#
# Batch-1 decode pushes ONE token through the model: each Linear is y = x @ W^T + b with x of
# shape (1, K). Every weight element is read from HBM to do one multiply-add (2 FLOPs per
# 2 bytes in fp16), so the arithmetic intensity is 1 FLOP/byte, ~150x below the H200's
# ridge point (cuBLAS's ~640 fp16 TFLOP/s over ~4.2 TB/s of measured copy bandwidth). With M
# tokens it is M FLOP/byte: still bandwidth-bound up to M in the hundreds. The only number
# that matters is how close the kernel comes to streaming its weight at full bandwidth.
#
# GPT-2 1.5B (48 layers, n_embd 1600, fp16), per layer and token:
#
#   GEMM (K -> N)                   weight    at 4.2 TB/s   cuBLAS, measured on the H200
#   attn c_attn  1600 -> 4800 +b    15.4 MB      3.7 us      7.5 us
#   attn c_proj  1600 -> 1600 +b     5.1 MB      1.2 us      6.7 us, + 1.4 us residual add
#   mlp  c_fc    1600 -> 6400 +b    20.5 MB      4.9 us      8.4 us addmm + GELU (v4's table)
#   mlp  c_proj  6400 -> 1600 +b    20.5 MB      4.9 us      8.7 us split-K + 1.9 us reduce
#                                                                 + 1.4 us residual add
#   2 LayerNorms on one row of 1600    6 KB       ~0         2 x 4.3-4.9 us
#
# The weights of one layer are 61 MB, 14.6 us at 4.2 TB/s (48 layers + the 161 MB LM head:
# ~0.74 ms per token, ~1350 tokens/s at batch 1). The kernels above add up to ~46 us per
# layer: we run at a third of the card's speed, and the five small kernels (norms, GELU,
# adds: ~14 us) cost as much as the weights. Each kernel also has a floor: the measured
# GELU on 6400 elements (13 KB) takes 1.3 us, so ~1.3 us is what launching, ramping up and
# draining ANY kernel costs here, and kernels in one stream (or one CUDA graph) do not overlap.
# Fewer, fused kernels that stream at full bandwidth: expect ~1.3 us + bytes / 4.2 TB/s each,
# i.e. ~5, ~2.5, ~6 and ~6 us for the four GEMMs above with their epilogues fused in, and
# ~1.5-2 us per norm (predictions; `python bench.py --topic gemv` measures them).
#
# Why cuBLAS's M=1 path is slow. We cannot see inside cuBLAS, but its GEMM kernels are built
# for tiles: a program owns a 64..256-column strip of C and runs tensor-core MMAs whose rows
# are 63/64 padding when M=1. Padding costs no bandwidth, but the tiling does: N=1600 cut into
# 128-wide tiles is 13 programs for 132 SMs, so unless K is also split, most SMs issue no loads
# at all. Splitting K fills the GPU but writes fp32 partial sums that a second kernel adds up
# (the 1.9 us "reduce" seen for 6400 -> 1600), and bias/GELU/residual become further kernels.
#
# Little's law: how many bytes must be in flight. Bandwidth = bytes in flight / latency. A
# loaded HBM access takes roughly 0.6-0.8 us, so 4.2 TB/s needs ~4.2e12 * 0.7e-6 = ~3 MB of
# loads outstanding at every moment: ~22 KB per SM. Our GEMV grid has one program per
# BLOCK_N output columns (rows of W); a program walks along K in BLOCK_K chunks, and with
# num_stages = S the compiler keeps S-1 chunks' loads in flight ahead of the one being summed
# (a ring buffer in shared memory, as in v3). A program of 4 warps uses few registers, so up
# to 16 fit on an SM (64 warps): for GPT-2's N, all N/BLOCK_N programs are resident at once
# (1600 / 4 = 400 programs = 3 per SM), and the bytes in flight are about
#     (N / BLOCK_N) * BLOCK_N * BLOCK_K * 2 B * (S-1)  =  N * BLOCK_K * 2 B * (S-1),
# independent of BLOCK_N. For N=1600, BLOCK_K=512, S=3: 3.3 MB: enough. With S=1 a program
# waits for each chunk before asking for the next: one chunk per program, 1.6 MB, about half
# the bandwidth. So: long K chunks and a few stages for small N; BLOCK_N only sets how many
# programs share the work (a small BLOCK_N spreads N=1600 over more SMs, so more SMs issue
# loads). fp32 weights: the same with 4-byte elements, twice the bytes and the time.
#
# The loads themselves: nn.Linear stores W as (N, K), row-major, so a program's BLOCK_N rows
# are each contiguous along K: every thread loads 16 bytes (8 fp16) at a time and a warp
# reads 256-512 contiguous bytes of a row, perfectly coalesced. (The transposed (K, N) layout that matmul()
# takes would give each program strips only BLOCK_N * 2 bytes wide per row.)
#
# Arithmetic: CUDA cores, not tensor cores. tl.dot needs 16 rows; with M=1 it would multiply
# 15 rows of padding. Instead each program broadcasts x against its W tile and sums:
#     acc[m, n] += sum_k x[m, k] * W[n, k]          in fp32 registers
# Per weight element that is one fp16->fp32 conversion and M FMAs. The H200's CUDA cores do
# 132 SMs * 128 lanes * ~1.98 GHz = ~33e12 fp32 FMA/s, and weights arrive at 4.2e12 / 2 =
# 2.1e12 elements/s, so up to ~16 FMAs per element keep up with HBM on paper (less in
# practice: conversions, reductions and address math share the same issue slots). Hence
# MAX_GEMV_ROWS = 16: beyond that the CUDA cores, not HBM, are the limit, and tensor cores
# (matmul() and its BLOCK_M=16 configs, or cuBLAS) are the right tool. That was the paper
# bound; measured, the several-row path below loses to cuBLAS already at 4 rows (0.27-0.67x,
# see "Measured" below), so in practice this kernel is for one row.
#  - M = 1 (BLOCK_M = 1): the program keeps a BLOCK_N x BLOCK_K tile of fp32 partial products
#    and adds each chunk into it elementwise; the reduction over K (across threads) happens
#    once, after the loop. 8 x 512 partials over 128 threads are 32 registers per thread.
#  - M > 1: all M rows are handled in the same program, so W is still read once. The product
#    x[:, None, :] * W[None, :, :] is a BLOCK_M x BLOCK_N x BLOCK_K tile, reduced over K in
#    every iteration (keeping it across iterations would cost BLOCK_M times the registers).
#    The autotuner only tries configs where that tile is <= 64 values per thread.
#    Each program also reads all of x (M*K*2 bytes, from L2: x is tiny and hot), i.e. x
#    traffic is M / BLOCK_N of the weight traffic: configs with BLOCK_N >= M are preferred.
#
# The epilogue is v4's plus a residual, all on the fp32 accumulator before one rounding:
#     y = act(x @ W^T + b) + residual          (act: None or GPT-2's tanh GELU)
# which is GPT-2's c_fc (bias + GELU) and both c_proj's (bias + residual add) in one kernel
# each: the 1.3 us GELU and both 1.4 us adds disappear. `out` may be `residual` itself
# (h += proj(...) in place): each output element is read and then written by the same program.
#
# Autotuning and CUDA graphs. On a GPU the kernel is autotuned over a handful of configs,
# keyed on (N, K, BLOCK_M, HAS_BIAS, ACTIVATION, HAS_RESIDUAL, NORM) plus the dtypes (the autotuner
# adds those itself). M enters only through BLOCK_M = next power of two of M, so M = 3 and 4
# share a tuning result. The first call with a new key compiles and times every config
# (do_bench synchronises the device): it must not happen inside a CUDA-graph capture, so warm
# up every (shape, BLOCK_M, epilogue, dtype) that will be captured first (serve.py's engine
# runs each graph bucket before capturing it). When out is residual, re-running the kernel
# to time it would add the residual again and again, so while tuning, the autotuner saves and
# restores the output around each timed run (restore_value). Once tuned,
# gemv does no host synchronisation and allocates nothing but the output (nothing when `out`
# is given): safe to capture.
#
# Under the interpreter (CPU) there is no tuning: one small fixed config keeps the tests fast.

# Measured (H200, `python bench.py --topic gemv`, GPU time in CUDA graphs, each kernel alone,
# torch = cuBLAS F.linear + its separate GELU / add kernels). 2026-11-27, K-loop configs:
#     1 token   c_attn 1600->4800  7.4 -> 6.9 us    c_proj +res 1600->1600  8.4 -> 3.9 us
#               c_fc +GELU ->6400 10.4 -> 8.2 us    c_proj +res 6400->1600 12.5 -> 8.2 us
#               LM head ->50257   59 -> 46 us (3.5 TB/s, 83% of copy bandwidth)
#     LayerNorm of one row: 4.3 -> 2.2 us;  RMSNorm (3 PyTorch kernels): 12.5 -> 1.8 us
# 2026-11-28, single-shot configs for one row (see "Prefetch across the kernel boundary"):
#     c_attn 7.5 -> 5.8 us, c_proj 8.5 -> 2.7, c_fc 10.6 -> 10.5, c_proj 12.6 -> 8.2,
#     LM head 59 -> 39 us (4.1 TB/s, 97% of copy bandwidth); norms 4.2 -> 1.7, 12.3 -> 1.8 us.
# Against the prediction above: the fused epilogues paid off as expected, but the 5-20 MB
# GEMVs stream at only 1.9-2.7 TB/s on their own: a ~3 us floor per kernel (launch, ramp-up,
# the last programs draining) remains. Single shot issues every load at once and still ties
# (c_fc loses 2 us alone); its gain shows only between kernels, under PDL. At 4 tokens the
# M x N x K product tile makes the kernel 0.27-0.67x cuBLAS: serve.py calls gemv for single rows
# only. In a whole GPT-2 1.5B decode step: 2.68 -> 1.84 ms (H200), later 2.06 -> 1.86 (H100).

# Programmatic dependent launch (PDL, Hopper and later). Kernels in one stream (or one CUDA
# graph) normally run strictly one after another: kernel i+1 is launched, its programs are
# scheduled and run their prologue only once kernel i has fully drained, ~1-2 us of idle SMs
# per boundary, and a GPT-2 1.5B decode step has ~440 boundaries. (Measured on an H200, one
# process: a CUDA graph of tiny kernels, each reading what the previous one wrote, takes
# 1.00-1.35 us a kernel for 25-800 programs; with PDL as below, 0.65-1.22 us. That is the
# floor; what a real kernel does after its wait comes on top.) Launched with launch_pdl=True,
# kernel i+1 may start while kernel i still runs; it must then execute `griddepcontrol.wait`
# (tl_cuda.gdc_wait) before touching memory kernel i writes, which blocks until kernel i has
# completed and its writes are visible. `gdc_launch_dependents` is the other half: once every
# program of kernel i+1 has called it (or exited), kernel i+2 may be launched in turn. We wait
# before touching anything an earlier kernel wrote, so correctness never depends on what
# overlaps: the launch, the scheduling of programs, the prologue and the weight loads. (Every
# kernel launched this way waits on its predecessor, which waited on its own: the chain stays
# ordered, and kernel i+2's wait on i+1 also covers i, since i+1 cannot complete before i.)
#
# Where to call gdc_launch_dependents: before the wait, not after it. Called after the wait (as
# this file first did), kernel i+2 could launch only once kernel i had finished, since every
# program of i+1 sits in its wait until then: one kernel ahead at most. Called before, kernel
# i+2 is launched as soon as all of i+1's programs have started, i+3 as soon as all of i+2's
# have, and so on: the lookahead has no fixed depth. It stops where the SMs have no room left,
# or at a grid too big to be resident at once (mlp fc's 800 programs), whose last programs
# start only when earlier ones leave. That matters after a kernel that leaves HBM idle: GPT-2
# 1.5B's mlp fc GEMV (20 MB) follows the short attn proj GEMV, which follows the latency-bound
# attention kernel; with the trigger after the wait it became resident only 0.5-0.6 us before
# its predecessor ended and added 9.5 us to every layer (its bytes need 4.8 us), with it
# before the wait it is resident 5.9 us early and adds 8.1 us (`bench.py --topic graphs`
# prints this breakdown). Measured (H200, 2026-11-28, two processes each, alternating, same greedy tokens):
# GPT-2 1.5B graph step 1.496 -> 1.455 ms, 701-703 -> 711-718 tok/s end to end; 124M 0.222 ->
# 0.211 ms, 4,458-4,493 -> 4,784-4,794 tok/s. Resources are the limit: a waiting program holds
# its registers, so later kernels' programs take only the room the running ones leave (attn
# proj, now sharing its SMs with mlp fc programs that wait there, went 1.7 -> 2.4 us).
# The rule this sets for every kernel of the step: what a kernel reads BEFORE its wait must be
# written by no kernel of the step at all, not only by the one before it (with the old order,
# data written two or more kernels back was safe to read early; now that kernel may still be
# running). Weights, norm parameters, biases, host-written lengths, block tables and slots, and
# K/V cached by earlier steps qualify; x, residuals, logits and this step's K/V do not.
# serve.py's decode kernels (gemv, row_norm, store_kv, the greedy argmax) and quant.py's int8
# GEMV all do it through pdl_signal_then_wait below; paged decode signals at its very top and
# waits later (pdl_signal, pdl_wait: its loads before the wait depend on one another, see
# flash_attn.py). All are launched with model.pdl_launch_args() (one switch, model.set_pdl).


@triton.jit
def pdl_signal():
    """Let the next kernels launch (griddepcontrol.launch_dependents). Alone, for a kernel whose
    loads before the wait depend on each other (paged decode: the context length, then block
    ids): signal first, issue them, then pdl_wait."""
    tl_cuda.gdc_launch_dependents()


@triton.jit
def pdl_wait():
    """Wait until the previous kernel has finished and its writes are visible (griddepcontrol.wait)."""
    tl_cuda.gdc_wait()


@triton.jit
def pdl_signal_then_wait():
    """Every other decode kernel's PDL hand-off, in the order the section above explains: let the
    next kernels launch, then wait until the previous kernel has finished and its writes are
    visible. Call it once, after issuing only loads of what no kernel of the step writes."""
    pdl_signal()
    pdl_wait()

#
# Prefetch across the kernel boundary (single shot). A GEMV's weights are never written during
# a decode step; only x is (the rule above). So a one-row program can issue the loads of its WHOLE weight
# tile (BLOCK_N rows x all of K, e.g. 2 x 2048 fp16 = 8 KB) first, and only then wait for the
# previous kernel (gdc_wait) and read x. Under PDL this program is already resident while the
# previous kernel drains, so its weight stream overlaps that tail instead of starting after
# it. SINGLE_SHOT configs do exactly this (BLOCK_K = next power of two >= K, no K loop; the
# tile must fit in registers: the timed configs keep to 64 values per thread, the one-row rule
# below goes to 128 fp16 values). Timed alone, they tie with the K-loop configs (there is no
# previous kernel to overlap), so the autotuner, which times one kernel at a time, would not
# pick them for that reason: for one row the pruner returns only single-shot configs (now one,
# by rule: "Choosing by rule" below). Measured in a whole GPT-2 1.5B decode step (H100, one run, graph
# replay): 2.06 ms with K-loop configs and separate norm kernels, 1.99 single shot, 1.86 single
# shot with the norm folded in (below); with PDL off the same single-shot step took 2.44 ms.
# Whether the compiler kept that order can be read in the machine code, no GPU needed:
# gemv_sass_summary() (or `python triton_matmul.py --sass`) compiles the GEMV for sm_90 and
# counts around griddepcontrol.wait (ACQBULK in SASS). For 1.5B's c_fc, all 16 LDG.E.128 of
# each thread's weight tile (8 rows x 2048 fp16 / 128 threads) come before it; after it, 843
# instructions with 11 loads (x three times, the norm's weight and bias, the bias) and 10
# BAR.SYNC (the cross-warp reductions): the latency every boundary still pays.
#
# Folding the norm in (NORM = "layer" / "rms"). Every GEMV that follows a norm (GPT-2's c_attn
# and c_fc, Llama's qkv and gate/up) can normalise x itself: each program reads the row (3.2 KB
# for 1600 fp16, from L2) to get its mean and 1/std, twice for LayerNorm (mean, then the
# variance of x - mean, as exact as row_norm), then normalises each chunk as it multiplies,
# rounding to x's dtype exactly where row_norm would round its output. Hundreds of programs
# re-read 3.2 KB each, ~1-5 MB of L2 traffic against 15-20 MB of weights from HBM, and a
# kernel launch (~2 us of boundary per norm, 96 per 1.5B step) disappears. With the K loop the
# extra statistics pass cost more than it saved (2.06 -> 2.20 ms, same run); with single shot
# it saved 0.12 ms (1.99 -> 1.86 ms).
#
# Fusing the MLP's two GEMVs into one kernel (measured, not kept). c_fc's output h (6400 values)
# feeds c_proj, so the boundary between them can go: program p computes its slice of h (BLOCK_H
# units: norm, GEMV, GELU), multiplies it by the matching BLOCK_H rows of W_proj^T (stored
# transposed so they are contiguous) and adds the 1600 partial sums into a float accumulator
# with atomics; the last program to finish (an atomic counter, as in flash_attn.py's decode
# merge) adds bias and residual and writes y. Exact up to fp32 summation order. Measured on an
# H100 (48 layers of GPT-2 1.5B's MLP in one CUDA graph with PDL, per layer): 21.4 us for the
# two GEMVs, 24.5 us fused with BLOCK_H=8 (800 programs), 30.7 with 4, 48.4 with 2. Every
# program adds 1600 floats to the SAME 1600 addresses, and those atomics serialise in L2:
# ~1.5e11 per second here if the 4 -> 2 step is all atomics, so 800 programs x 1600 cost ~9 us,
# more than the kernel boundary (~2-3 us) they remove; bigger slices were slower again
# (BLOCK_H=16: 26.7 us; two 16 x 2048 tiles per program, register pressure suspected, not
# checked). The two GEMVs themselves (41 MB at 1.9 TB/s, 64% of the H100's copy bandwidth) are
# the larger loss.

# Choosing by rule, not by timing (one row). The autotuner times each config alone (do_bench:
# a few microseconds of kernel between L2 flushes), and for a one-row GEMV it could not tell the
# single-shot configs apart reliably: which one "won" changed from process to process (four fresh processes on one H200, four different
# sets of picks for GPT-2 1.5B's five GEMV shapes). In a whole decode step the picks are not
# equal: the same step took 1.84, 2.01, 2.06 and 2.11 ms with those four sets. Timing the
# candidates inside the captured step instead (coordinate descent over the five shapes, graph
# replay on the capture's inputs, i.e. a 1024-token context, H200, 2026-11-28) gave 1.67-1.68 ms (fp16), 1.78 (bf16, from 2.10) and, for GPT-2
# 124M, 0.266 ms (from 0.288). What won, as a rule:
#   - a row of W fits a 2048-wide tile: 4 warps (on c_fc, 8 and 16 warps cost 5-20% of the
#     step) and BLOCK_N = N / 800 rounded up to a power of two, between 2 and 8: 1.5B's c_attn,
#     c_fc and N x N projection get 8, 8 and 2 rows (600-800 programs; 124M's get 384-768).
#     8 rows of fp16 are 128 values (256 bytes) per thread; fp32 x is capped at 4 rows, the
#     same bytes (not measured). The LM head (N > 16384: thousands of programs anyway) keeps 4,
#     flat within ~0.2%.
#   - long K (the down projection, K = 4 x n_embd): 8 warps, 64 values per thread (BLOCK_N =
#     16384 / BLOCK_K; a close call: 3% of the step better than 4 warps x 1 row in fp16, 0.7%
#     worse in bf16).
# A first version used 4 rows everywhere: 1.686 ms in three fresh processes (1.6863-1.6867).
# The N / 800 version, same process: 1.5B 1.692 -> 1.631 ms per step, 589 -> 612 tok/s end to
# end (124M: 0.259 -> 0.250 ms, but that gain is flash_attn's one-tile-per-program splits; the
# GEMV change alone was flat there). So for one row the pruner returns that single config:
# only it is compiled (Triton's autotuner still times it once, ~50 ms, instead of ~9
# candidates). Found on H200s; `python bench.py --topic tune` repeats the search on whatever GPU
# it runs on and prints the rule next to what the search finds: within 0.3% of the search on an
# H200, within 1% on an H100 (results/tune.md, tune_h100.md; 2026-11-28).
#
# Prefetching the next GEMV's weights into L2 (measured, not kept). Between two GEMVs of a decode
# step HBM idles: the kernel boundary, the attention kernels, the norms. A GEMV's weights never
# depend on the step, so GEMV i could ask for GEMV i+1's weights while it runs
# (`cp.async.bulk.prefetch.L2`: one instruction per program, fire and forget, the program may
# exit before the lines arrive; they were compiled and checked in PTX), and GEMV i+1 would read
# them from the 50 MB L2. Measured on an H200 (48 layers of GPT-2 1.5B's four GEMVs in one CUDA
# graph with PDL, one run): 1.278 ms without, 1.357 ms prefetching the next weight in bulk, 1.374
# with one prefetch.global.L2 per 128-byte line, 1.525 prefetching two weights ahead, 1.323 with
# the prefetch capped at 8 MB. Slower in every form. Our reading, not checked with a profiler:
# inside the chain HBM is not idle enough for early reads to fill gaps, so they compete with the
# running GEMV's own reads (and two ahead, with a layer's 61 MB larger than L2, lines may be
# evicted before use).
#
# One persistent kernel for the whole chain (measured, not kept; the draft is on the branch
# wip/persistent-decode). If the ~2-3 us per boundary were the loss, one launch could remove it:
# one or two programs per SM walk every layer's four GEMVs, and between phases every program
# waits at a grid barrier (an arrival counter in global memory, release/acquire atomics; the
# launch is cooperative, so a grid that cannot all be resident is refused instead of hanging).
# Same H200 chain as above, one process: 1.235 ms for these GEMVs as launches; the persistent
# kernel was correct but 1.40 ms at best (264 programs x 4 warps, the weight tiles through
# Triton's software pipeline), 1.80-2.05 ms with one program per SM. The same kernel launched
# once per phase, with no barrier at all, was as slow as with barriers: the boundaries were not
# what it lost, the streaming was. A launch puts ~800 programs in flight, up to ~16 per SM, each
# issuing its whole tile at once; a persistent program streams its share (155 KB per SM for
# c_fc) a tile or three at a time, and every change that put more bytes in flight per SM helped.
# Winning that way would take TMA bulk copies of a program's whole share into shared memory,
# issued before it waits at the barrier: more than Triton 3.6 lets a kernel say.

MAX_GEMV_ROWS = 16


@triton.jit
def _normalize(x, mean, rstd, nw, nb, NORM: tl.constexpr, HAS_NORM_BIAS: tl.constexpr):
    """A loaded (BLOCK_M, BLOCK_K) chunk of x as fp32, normalised when NORM is "layer" or "rms" with
    the row statistics mean, rstd (BLOCK_M,) and the norm's loaded weight nw and bias nb, and
    rounded to x's dtype exactly where the unfused row_norm rounds its output (so the normalised
    x matches row_norm's to the last bit when the row statistics are summed in one chunk, as in
    single shot; the K loop sums in another order)."""
    xf = x.to(tl.float32)
    if NORM == "layer":
        xf = (xf - mean[:, None]) * rstd[:, None] * nw.to(tl.float32)
        if HAS_NORM_BIAS:
            xf += nb.to(tl.float32)
        xf = xf.to(x.dtype).to(tl.float32)
    elif NORM == "rms":
        xf = (xf * rstd[:, None]).to(x.dtype).to(tl.float32) * nw.to(tl.float32)
        xf = xf.to(x.dtype).to(tl.float32)
    return xf


@triton.jit
def _normed_x(x_ptrs, k_ok, mean, rstd, nw_ptrs, nb_ptrs, NORM: tl.constexpr, HAS_NORM_BIAS: tl.constexpr):
    """_normalize of one chunk loaded here: x, and the norm's weight and bias where used."""
    x = tl.load(x_ptrs, mask=k_ok, other=0.0)
    nw = tl.load(nw_ptrs, mask=k_ok, other=0.0) if NORM != "" else x
    nb = tl.load(nb_ptrs, mask=k_ok, other=0.0) if HAS_NORM_BIAS else x
    return _normalize(x, mean, rstd, nw, nb, NORM, HAS_NORM_BIAS)


@triton.jit
def _tile_stats(xf, k_ok, K, eps, NORM: tl.constexpr):
    """_row_stats of rows already in registers (single shot: all of K in one tile), with the
    same arithmetic: the sum of x, then the sum of (x - mean)^2 over the valid columns."""
    mean = tl.zeros((xf.shape[0],), dtype=tl.float32)
    if NORM == "layer":
        mean = tl.sum(xf, axis=1) / K
    xc = tl.where(k_ok, xf - mean[:, None], 0.0)
    return mean, tl.rsqrt(tl.sum(xc * xc, axis=1) / K + eps)


@triton.jit
def _row_stats(x_ptrs, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr):
    """mean and 1/std (LayerNorm) or 0 and 1/rms (RMSNorm) of each of BLOCK_M rows of length K,
    in fp32, walking x in BLOCK_K chunks: once for the mean, once more for the variance of
    x - mean (two passes, as exact as row_norm's; the rows come from L1/L2, x is a few KB)."""
    offs_k = tl.arange(0, BLOCK_K)
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if NORM == "layer":
        total = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            total += tl.load(x_ptrs + k0, mask=(offs_k < K - k0)[None, :], other=0.0).to(tl.float32)
        mean = tl.sum(total, axis=1) / K
    squares = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (offs_k < K - k0)[None, :]
        xc = tl.load(x_ptrs + k0, mask=k_ok, other=0.0).to(tl.float32) - mean[:, None]
        xc = tl.where(k_ok, xc, 0.0)                                  # keep the padding out
        squares += xc * xc
    return mean, tl.rsqrt(tl.sum(squares, axis=1) / K + eps)


@triton.jit
def gemv_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, y_ptr, norm_w_ptr, norm_b_ptr,
    M, N, K,                                   # x is M x K, W is N x K (nn.Linear layout), y is M x N
    stride_xm, stride_wn, stride_rm, stride_ym,  # row strides; every last dim is contiguous
    norm_eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    NORM: tl.constexpr = "", HAS_NORM_BIAS: tl.constexpr = False,
    SINGLE_SHOT: tl.constexpr = False,         # BLOCK_K >= K: one chunk, loaded before the PDL wait
    USE_PDL: tl.constexpr = False,
):
    tl.static_assert(not SINGLE_SHOT or BLOCK_M == 1, "single shot is for one row")
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)   # this program's output columns = rows of W
    offs_k = tl.arange(0, BLOCK_K)
    # Like v2, rows past the edge are wrapped (% M, % N): they read valid memory whose results
    # are never stored, so inside the loop only the K tail needs a mask.
    w_ptrs = w_ptr + (offs_n % N)[:, None] * stride_wn + offs_k[None, :]       # (BLOCK_N, BLOCK_K)
    x_ptrs = x_ptr + (offs_m % M)[:, None] * stride_xm + offs_k[None, :]       # (BLOCK_M, BLOCK_K)
    k_all = (offs_k < K)[None, :]
    if SINGLE_SHOT:
        # Nothing but x depends on an earlier kernel: ask for the whole weight tile now, before
        # waiting (see "Prefetch across the kernel boundary" above), and the parameters with it
        # (the norm's weight and bias, the bias), so that after the wait only x is loaded.
        w_all = tl.load(w_ptrs, mask=k_all, other=0.0)
        nw_all = tl.load(norm_w_ptr + offs_k[None, :], mask=k_all, other=0.0) if NORM != "" else w_all
        nb_all = tl.load(norm_b_ptr + offs_k[None, :], mask=k_all, other=0.0) if HAS_NORM_BIAS else w_all
        bias_all = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0) if HAS_BIAS else offs_n
    if USE_PDL:                                # see the PDL section above
        pdl_signal_then_wait()
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    nw_ptrs = norm_w_ptr + offs_k[None, :]
    nb_ptrs = norm_b_ptr + offs_k[None, :]
    if SINGLE_SHOT:
        # x once, for the statistics and the product (one load after the wait, not three: the
        # rule's c_fc GEMV ran 843 instructions after the wait with 11 loads, now ~650 with 2,
        # counted in the sm_90 SASS). With the parameters loaded before the wait, GPT-2 1.5B's
        # graph step went 1.694 -> 1.576 ms (H200, one A/B run): ~1.2 us per normed GEMV, far
        # more than the instructions saved, since each load after the wait is a round trip
        # that nothing overlaps.
        x = tl.load(x_ptrs, mask=k_all, other=0.0)
        if NORM != "":
            mean, rstd = _tile_stats(x.to(tl.float32), k_all, K, norm_eps, NORM)
        xf = _normalize(x, mean, rstd, nw_all, nb_all, NORM, HAS_NORM_BIAS)
        acc = tl.sum(w_all.to(tl.float32) * xf, axis=1)[None, :]    # (1, BLOCK_N); BLOCK_M == 1
    else:
        if NORM != "":
            mean, rstd = _row_stats(x_ptrs, K, norm_eps, BLOCK_M, BLOCK_K, NORM)
        if BLOCK_M == 1:
            part = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k_ok = (offs_k < K - k0)[None, :]
                w = tl.load(w_ptrs, mask=k_ok, other=0.0)
                x = _normed_x(x_ptrs, k_ok, mean, rstd, nw_ptrs, nb_ptrs, NORM, HAS_NORM_BIAS)
                part += w.to(tl.float32) * x                              # elementwise FMAs, no reduction
                w_ptrs += BLOCK_K
                x_ptrs += BLOCK_K
                nw_ptrs += BLOCK_K
                nb_ptrs += BLOCK_K
            acc = tl.sum(part, axis=1)[None, :]                          # (1, BLOCK_N): reduce once
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k_ok = (offs_k < K - k0)[None, :]
                w = tl.load(w_ptrs, mask=k_ok, other=0.0).to(tl.float32)
                x = _normed_x(x_ptrs, k_ok, mean, rstd, nw_ptrs, nb_ptrs, NORM, HAS_NORM_BIAS)
                acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)     # (M, 1, K) * (1, N, K) -> (M, N)
                w_ptrs += BLOCK_K
                x_ptrs += BLOCK_K
                nw_ptrs += BLOCK_K
                nb_ptrs += BLOCK_K

    # --- epilogue on the fp32 accumulator: bias, activation, residual, one rounding ---
    if HAS_BIAS:
        bias = bias_all if SINGLE_SHOT else tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if ACTIVATION == "gelu_tanh":
        acc = _gelu_tanh(acc)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0)
        acc += res.to(tl.float32)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def _gemv_config(bn, bk, warps, stages=1):
    """bk=None: single shot, BLOCK_K = next power of two >= K, filled in per shape by the pruner."""
    return triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk or 0, SINGLE_SHOT=bk is None),
                         num_warps=warps, num_stages=stages)


# (BLOCK_N, BLOCK_K, num_warps, num_stages). The first group is for 2 rows (one row keeps only
# the single-shot group whenever one fits, see _prune_gemv_configs): long K chunks
# (512-1024 fp16 = 1-2 KB per row of W per step) and 2-4 stages put N * BLOCK_K * 2 B * (S-1)
# = 3-10 MB in flight for GPT-2's N (see Little's law above); BLOCK_N from 4 (more programs,
# for N=1600) to 16 (fewer, longer-lived programs, for N=4800..50257). The second group is for
# 4-16 rows: the M x BLOCK_N x BLOCK_K product tile must stay small in registers, and
# BLOCK_N >= M keeps the re-reads of x below the weight traffic. The third group is single
# shot, one row only: all of K in one tile (K=1600 -> 2048 wide), BLOCK_N <= num_warps for
# K <= 2048 so the tile is <= 64 values per thread.
GEMV_GPU_CONFIGS = [
    _gemv_config(4, 512, 4, 3), _gemv_config(4, 1024, 4, 2), _gemv_config(8, 256, 4, 4),
    _gemv_config(8, 512, 4, 3), _gemv_config(16, 256, 4, 3), _gemv_config(16, 512, 8, 3),
    _gemv_config(16, 128, 4, 4), _gemv_config(8, 128, 4, 4), _gemv_config(16, 64, 4, 4),
    _gemv_config(16, 128, 8, 4), _gemv_config(16, 32, 4, 4), _gemv_config(16, 64, 8, 4),
    _gemv_config(1, None, 4), _gemv_config(2, None, 4), _gemv_config(2, None, 8),
    _gemv_config(4, None, 4), _gemv_config(4, None, 8), _gemv_config(8, None, 8),
    _gemv_config(4, None, 16), _gemv_config(8, None, 16), _gemv_config(16, None, 16),
]
# interpreter: one config, big enough that numpy does few steps, small enough that the test
# shapes still cover several column blocks and K steps with ragged ends
GEMV_CONFIGS = GEMV_GPU_CONFIGS if (torch.cuda.is_available() and not INTERPRET) else [_gemv_config(32, 128, 4, 1)]


def one_row_gemv_config(N, K, elem_bytes=2, rows=None, warps=None):
    """The single-shot config for a one-row GEMV: the rule's ("Choosing by rule") unless rows /
    warps are given (bench.py's whole-step search tries others). None when all of K does not
    fit the rule's tiles (BLOCK_K outside 512..16384): the timed configs then decide."""
    k_all = max(triton.next_power_of_2(K), 16)
    if not 512 <= k_all <= 16384:
        return None
    if rows is None:
        max_rows = 8 if elem_bytes <= 2 else 4          # <= 256 B of W per thread
        if k_all <= 2048:   # N / 800 rows of W (2 to max_rows; 4 for an LM head), 4 warps
            rows = 4 if N > 16384 else min(max_rows, max(2, triton.next_power_of_2(triton.cdiv(N, 800))))
            warps = 4
        else:               # long K: 8 warps, 64 values per thread
            rows, warps = 16384 // k_all, 8
    return triton.Config({"BLOCK_N": rows, "BLOCK_K": k_all, "SINGLE_SHOT": True}, num_warps=warps, num_stages=1)


def gemv_tile_fits(c, rows: int = 1) -> bool:
    """The GEMVs' register rule (this file's and quant.py's): the rows x BLOCK_N x BLOCK_K
    product tile is at most 64 fp32 values per thread, beyond which ptxas spills."""
    return rows * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 64 * 32 * c.num_warps


def smallest_gemv_tile(configs):
    """The last resort when no config fits: the fewest values per thread."""
    return min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] / c.num_warps)


def _prune_gemv_configs(configs, named_args, **kwargs):
    """Before compiling anything: for one row with 512 <= BLOCK_K <= 16384, return the one
    single-shot config the rule picks ("Choosing by rule"; its 8-row tiles for 16-bit x are
    128 values per thread, above the 64 the timed configs below keep to: measured faster). Otherwise give single-shot configs
    their BLOCK_K (next power of two >= K; one row only) and, for one row, keep only those where
    one fits; otherwise drop configs whose BLOCK_M x BLOCK_N x BLOCK_K product tile is
    more than 64 fp32 values per thread (register spills); for 1-2 rows keep the big tiles
    (BLOCK_N * BLOCK_K >= 2048: enough bytes in flight), for more rows those with
    BLOCK_N >= min(M, 16) (x re-reads); drop BLOCK_K > max(next_pow2(K), 32) (mostly masked).
    Relaxed step by step if that leaves nothing; the register rule goes last."""
    bm = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 1))
    K = named_args.get("K", 1 << 30)
    if bm == 1:         # one row: one config by rule (see "Choosing by rule"), where it applies
        x = named_args.get("x_ptr")
        rule = one_row_gemv_config(named_args.get("N", 800 * 4), K, 2 if x is None else x.element_size())
        if rule is not None:
            return [rule]
    k_all = max(triton.next_power_of_2(K), 16)
    sized = []
    for c in configs:
        if c.kwargs.get("SINGLE_SHOT"):
            if bm != 1:
                continue
            c = triton.Config({**c.kwargs, "BLOCK_K": k_all}, num_warps=c.num_warps, num_stages=c.num_stages)
        sized.append(c)

    def fits(c):
        return gemv_tile_fits(c, bm)

    def suits(c):
        bn, bk = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        shape_ok = bn * bk >= 2048 if bm <= 2 else bn >= min(bm, 16)
        return shape_ok and bk <= max(triton.next_power_of_2(K), 32)

    single = [c for c in sized if c.kwargs["SINGLE_SHOT"] and fits(c) and suits(c)]
    if single:      # one row: single shot only (why: "Prefetch across the kernel boundary")
        return single
    return ([c for c in sized if fits(c) and suits(c)] or [c for c in sized if fits(c)]
            or [smallest_gemv_tile(sized)])


def _autotune_gemv(configs, do_bench):
    """gemv_kernel under triton.autotune. restore_value: the autotuner saves y before each timed
    run and puts it back after, so an in-place residual (out is residual) is added once, not
    once per timed repeat."""
    return triton.autotune(
        configs=configs, key=["N", "K", "BLOCK_M", "HAS_BIAS", "ACTIVATION", "HAS_RESIDUAL", "NORM"],
        prune_configs_by={"early_config_prune": _prune_gemv_configs}, restore_value=["y_ptr"],
        do_bench=do_bench)(gemv_kernel)


# Timing: 10 ms warm-up + 40 ms of repeats per config. A decode GEMV takes a few us and
# do_bench empties the L2 before each repeat (so W comes from HBM, as in real decode).
gemv_kernel_autotuned = _autotune_gemv(GEMV_CONFIGS, functools.partial(triton.testing.do_bench, warmup=10, rep=40))


def _as_rows(t, n_cols, name):
    """(..., n_cols) -> (rows, n_cols) as a view (never a copy: gemv allocates only its output)."""
    if t.dim() == 2:
        return t
    try:
        return t.view(-1, n_cols)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(t.shape)} and strides {t.stride()} cannot be "
                         f"viewed as rows of {n_cols} without a copy") from None


def _last_dim_contiguous(t):
    return t.shape[-1] <= 1 or t.stride(-1) == 1


def _check_like(name, t, shape, x):
    """Refuse an optional tensor argument unless it is `shape`, x's dtype and device, and has a
    contiguous last dim (the kernels read it with unit stride). None passes."""
    if t is not None and (tuple(t.shape) != tuple(shape) or t.dtype != x.dtype or t.device != x.device
                          or not _last_dim_contiguous(t)):
        raise ValueError(f"{name} must be {tuple(shape)} {x.dtype} on {x.device} with a contiguous last dim, "
                         f"got {tuple(t.shape)} {t.dtype} on {t.device}")


def check_norm_args(x, K, norm, norm_weight, norm_bias) -> None:
    """The folded norm's arguments (gemv here, quant.py's int8 GEMV): norm None, "layer" or
    "rms"; its weight and bias (K,) like x."""
    if norm not in (None, "layer", "rms"):
        raise ValueError(f"norm must be None, 'layer' or 'rms', got {norm!r}")
    if norm is None and (norm_weight is not None or norm_bias is not None):
        raise ValueError("norm_weight / norm_bias given without norm='layer' or 'rms'")
    if norm is not None and norm_weight is None:
        raise ValueError(f"norm={norm!r} needs norm_weight")
    if norm == "rms" and norm_bias is not None:
        raise ValueError("RMSNorm has no bias")
    _check_like("norm_weight", norm_weight, (K,), x)
    _check_like("norm_bias", norm_bias, (K,), x)


def _check_int32(*tensors):
    """Refuse tensors whose last element lies 2^31 or more elements from the first: the kernels
    add up row and column offsets in int32."""
    for t in tensors:
        if t is not None and t.numel() and sum(s * (d - 1) for s, d in zip(t.stride(), t.shape)) >= 2**31:
            raise ValueError(f"a tensor of shape {tuple(t.shape)} and strides {t.stride()} is too large "
                             f"for the int32 offsets of this teaching kernel")


def _check_gemv_inputs(x, weight, bias, activation, residual, out, norm=None, norm_weight=None, norm_bias=None):
    """Clear errors, from tensor metadata only (no device sync). Returns 2-D views of
    x, residual, out and the output's full shape."""
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"expected x (..., K) and a 2-D weight (N, K), got {tuple(x.shape)} and {tuple(weight.shape)}")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"inner dimensions differ: x is {tuple(x.shape)}, weight (N, K) is {tuple(weight.shape)}")
    if x.dtype != weight.dtype or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x and weight must share one of fp16/bf16/fp32, got {x.dtype} and {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device}, weight is on {weight.device}")
    M = math.prod(x.shape[:-1])
    if M > MAX_GEMV_ROWS:
        raise ValueError(f"gemv takes at most MAX_GEMV_ROWS={MAX_GEMV_ROWS} rows (got {M}): "
                         f"beyond that the CUDA cores are the bottleneck; use matmul() for more rows")
    if activation not in (None, "gelu_tanh"):
        raise ValueError(f"activation must be None or 'gelu_tanh', got {activation!r}")
    check_norm_args(x, K, norm, norm_weight, norm_bias)
    out_shape = (*x.shape[:-1], N)
    for name, t, shape in (("bias", bias, (N,)), ("residual", residual, out_shape), ("out", out, out_shape)):
        _check_like(name, t, shape, x)
    if not (_last_dim_contiguous(x) and _last_dim_contiguous(weight)):
        raise ValueError("x and weight need a contiguous last dim (rows may be strided): "
                         "store weights as nn.Linear does, (N, K) row-major")
    x2 = _as_rows(x, K, "x")
    res2 = None if residual is None else _as_rows(residual, N, "residual")
    out2 = None if out is None else _as_rows(out, N, "out")
    _check_int32(x2, weight, res2, out2)
    return x2, res2, out2, out_shape


def _gemv_launch(kernel, x, weight, bias, activation, residual, out, norm=None, norm_weight=None,
                 norm_bias=None, norm_eps=1e-5, **meta):
    """Launch `kernel` (gemv_kernel, autotuned or with a fixed config in **meta). Returns y."""
    x2, res2, out2, out_shape = _check_gemv_inputs(x, weight, bias, activation, residual, out,
                                                   norm, norm_weight, norm_bias)
    M, K = x2.shape
    N = weight.shape[0]
    y2 = torch.empty((M, N), device=x.device, dtype=x.dtype) if out2 is None else out2
    if M and N:
        grid = lambda META: (triton.cdiv(N, META["BLOCK_N"]),)
        kernel[grid](
            x2, weight, bias if bias is not None else y2, res2 if res2 is not None else y2, y2,
            norm_weight if norm_weight is not None else y2, norm_bias if norm_bias is not None else y2,
            M, N, K, x2.stride(0), weight.stride(0),
            res2.stride(0) if res2 is not None else 0, y2.stride(0), norm_eps,
            BLOCK_M=triton.next_power_of_2(M), HAS_BIAS=bias is not None, ACTIVATION=activation or "",
            HAS_RESIDUAL=residual is not None, NORM=norm or "", HAS_NORM_BIAS=norm_bias is not None,
            **meta, **pdl_launch_args())
    return out if out is not None else y2.view(out_shape)


def gemv(x, weight, bias=None, activation=None, residual=None, out=None, *,
         norm=None, norm_weight=None, norm_bias=None, norm_eps=1e-5):
    """y = act(norm(x) @ weight.T + bias) + residual for a few rows of x, in one kernel (v5).

    x: (M, K) or (..., K) with M = prod(leading dims) <= MAX_GEMV_ROWS (16); rows may be
    strided (a slice), the last dim must be contiguous. weight: (N, K) as nn.Linear stores it.
    bias: (N,) or None. activation: None or "gelu_tanh" (after the bias). residual: like the
    output, (..., N), or None, added last. out: optional output (may be `residual` itself for
    an in-place residual add; must not overlap x, weight or bias otherwise). All tensors share
    x's dtype (fp16/bf16/fp32); accumulation is fp32. Returns (..., N) in x's dtype.
    norm: None, "layer" (LayerNorm: norm_weight, optional norm_bias) or "rms" (RMSNorm:
    norm_weight) over x's last dim with norm_eps, applied to x inside the kernel exactly as
    row_norm would (rounded to x's dtype) before the product: one launch instead of two.
    On a GPU the first call per (N, K, BLOCK_M, epilogue, dtype) autotunes: do it before any
    CUDA-graph capture."""
    return _gemv_launch(gemv_kernel_autotuned, x, weight, bias, activation, residual, out,
                        norm, norm_weight, norm_bias, norm_eps)


def gemv_reference(x, weight, bias=None, activation=None, residual=None, out=None, *, acc_dtype=torch.float32,
                   norm=None, norm_weight=None, norm_bias=None, norm_eps=1e-5):
    """Plain PyTorch gemv: act(norm(x) @ W^T + b) + residual in acc_dtype, rounded once to x's
    dtype (the norm, if any, is row_norm_reference's, in x's dtype)."""
    if norm is not None:
        x = row_norm_reference(x, norm_weight, norm_bias, norm_eps, rms=norm == "rms")
    y = matmul_reference(x, weight.t(), bias, activation, acc_dtype, residual)
    return y if out is None else out.copy_(y)

# -----------------------------------------------------------------------------
# The norm in front of every GEMV: LayerNorm (GPT-2) or RMSNorm (Llama) of ONE row.
#
# One row of 1600 fp16 is 3.2 KB in, 3.2 KB out, 6.4 KB of weight and bias: moving it takes
# ~4 ns at 4.2 TB/s. All of the measured 4.3-4.9 us of torch's layer_norm is latency: launch, the
# loads, block-wide reductions, the store, each waiting on the one before. Torch's kernel is
# general (any number of rows, any width, it also writes the mean and 1/std that backward
# needs) and we have not profiled where its time goes. Ours is the shortest chain we can
# write: one program per row, the whole row in registers (BLOCK_C = next power of two >= C,
# up to MAX_NORM_COLS = 8192: with 16 warps that is 16 fp32 values per thread), row, weight
# and bias loaded at once (16-byte loads, independent, so their latencies overlap), two
# reductions in fp32 (mean, then the variance of x - mean from registers: as exact as the
# two-pass formula, with no second trip to memory) and one store. Expect ~1.5-2 us, near the
# ~1.3 us floor of any kernel; measured on the H200 2.2 us (1.8 for RMSNorm) on 2026-11-27 and
# 1.72 us (1.77) in bench.py's gemv run of 2026-11-28. The real fix is to not launch it at all:
# gemv(..., norm=...) folds it into the GEMV that follows (see "Folding the norm in" above);
# serve.py does that for the norms in front of a linear layer, and keeps row_norm for the
# final norm and for tests.
# Why its arithmetic is written out here a second time instead of calling the GEMV's helpers
# (_row_stats, _normed_x): built from them it was bitwise identical and slower, 1.23 -> 1.65 us
# for LayerNorm of 1600 fp16 and 0.87 -> 1.19 us for RMSNorm (H200, 2026-11-28, one CUDA graph of
# 200 back-to-back calls with PDL: another harness than bench.py's, so not comparable with its
# 1.72 us). The helpers read the row once per pass (mean, variance, normalise): inside a GEMV
# that hides under the weight stream, here it is the whole dependency chain.
#
# Semantics, matched to the references (tests check both):
#   LayerNorm: (x - mean) / sqrt(var + eps) * w + b, biased variance (divide by C), eps
#              inside the sqrt, all in fp32 and rounded once (torch.nn.functional.layer_norm).
#   RMSNorm:   model.RMSNorm: (x32 * rsqrt(mean(x32^2) + eps)).type_as(x) * w, i.e. rounded to
#              x's dtype BEFORE the weight multiply, then rounded again. No bias.

MAX_NORM_COLS = 8192


@triton.jit
def row_norm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, C, stride_xm, stride_ym, eps,
                    BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr,
                    USE_PDL: tl.constexpr = False):
    if USE_PDL:                                # see the PDL section above
        pdl_signal_then_wait()
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_C)
    mask = offs < C
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / C + eps)             # padding adds 0 to the sum
        y = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32) * w  # .type_as(x) * weight
    else:
        mean = tl.sum(x, axis=0) / C
        xc = tl.where(mask, x - mean, 0.0)                            # keep the padding out of var
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / C + eps)
        y = xc * rstd * w
        if HAS_BIAS:
            y += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def row_norm(x, weight, bias=None, eps=1e-5, rms=False, out=None):
    """LayerNorm (rms=False; weight, optional bias) or RMSNorm (rms=True; weight, no bias)
    over the last dim of x (..., C), C <= MAX_NORM_COLS, one program per row. Rows may be
    strided; the last dim must be contiguous. weight/bias: (C,) of x's dtype. Returns x's
    shape and dtype (or fills `out`). No autotuning, no host sync: safe in a CUDA graph."""
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    C = x.shape[-1]
    if C > MAX_NORM_COLS:
        raise ValueError(f"row_norm keeps a row in registers: at most MAX_NORM_COLS={MAX_NORM_COLS} columns, got {C}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be fp16/bf16/fp32, got {x.dtype}")
    if rms and bias is not None:
        raise ValueError("RMSNorm has no bias")
    if weight is None:
        raise ValueError("row_norm needs a weight (C,)")
    for name, t, shape in (("weight", weight, (C,)), ("bias", bias, (C,)), ("out", out, x.shape)):
        _check_like(name, t, shape, x)
    if not _last_dim_contiguous(x):
        raise ValueError("x needs a contiguous last dim (rows may be strided)")
    x2 = _as_rows(x, C, "x")
    y2 = torch.empty(x2.shape, device=x.device, dtype=x.dtype) if out is None else _as_rows(out, C, "out")
    _check_int32(x2, y2)
    if x2.shape[0] and C:
        BLOCK_C = triton.next_power_of_2(C)
        row_norm_kernel[(x2.shape[0],)](
            x2, weight, bias if bias is not None else weight, y2, C, x2.stride(0), y2.stride(0), eps,
            BLOCK_C=BLOCK_C, HAS_BIAS=bias is not None, RMS=rms, **pdl_launch_args(),
            num_warps=max(1, min(16, BLOCK_C // 256)))    # 8 values (16 B of fp16) per thread
    return out if out is not None else y2.view(x.shape)


def row_norm_reference(x, weight, bias=None, eps=1e-5, rms=False):
    """torch.nn.functional.layer_norm (in fp32), or model.rms_norm."""
    if rms:
        return rms_norm(x, weight, eps)
    return torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), weight.float(),
                                          None if bias is None else bias.float(), eps).to(x.dtype)


# -----------------------------------------------------------------------------
# v6 (Hopper): the one-row GEMV with its weight tile in SHARED memory, fetched by TMA, in Gluon.
#
# Where v5 stops. Single shot keeps a program's prefetched weight tile in REGISTERS, and in a
# whole GPT-2 1.5B decode step registers are what runs out. `bench.py --topic graphs` takes the
# step apart kernel by kernel (H200, 2026-11-28): while the attention kernel runs (6.9 us a
# layer with HBM nearly idle) the mlp fc GEMV's programs should already be streaming their
# 20.5 MB, but each holds 8 rows x 2048 fp16 = 256 bytes per thread, so only ~264 of its 800
# programs fit next to the running kernels, and most of the bytes are fetched after the wait:
# it adds 8.1 us to every layer for 4.8 us of bytes. Meanwhile the 228 KB of shared memory per
# SM sit unused by every GEMV.
#
# TMA (the Tensor Memory Accelerator, sm_90). One instruction asks the copy engine for a whole
# box of a 2-D tensor (here BLOCK_N rows x 64 columns, 128 bytes a row) to be written into
# shared memory; the bytes arrive asynchronously and an mbarrier (a counter in shared memory)
# is told how many landed. The thread that asked holds nothing while they are in flight: no
# registers, no load queue entries. Out-of-bounds parts of a box (rows past N, columns past K)
# arrive as zeros, so the edges need no masks. The tensor is described once on the host
# (base, shape, strides, box shape, swizzle: a TensorDescriptor, 128 bytes passed to the
# kernel as a parameter); its rows must be 16-byte aligned (K a multiple of 8 in fp16).
#
# The program, in order:
#   1. before the PDL wait: one TMA box per 64 columns of K for all BLOCK_N rows (GPT-2 1.5B,
#      32 rows x 1600: 25 boxes, 100 KB), and the parameters (norm weight and bias, bias):
#      nothing the step writes (the rule of the PDL section above);
#   2. wait (PDL), then x: one row, its norm statistics in fp32, normalised and rounded at the
#      same points as v5 (the statistics are summed in another order, so a last bit may
#      differ), stored to shared memory (x is needed by every warp); for an MLP's up projection
#      the norm is deferred instead (below: only x * g and two sums here, the norm at step 4);
#   3. wait on the mbarrier (the tile has usually long arrived), then BLOCK_N dot products read
#      box by box out of shared memory: warps split the rows and a warp's lanes split a row's
#      64 columns, so each row's reduction stays inside one warp (shuffles, no block barrier);
#   4. (deferred norm only) the statistics, applied to the BLOCK_N sums;
#   5. bias, GELU, residual on the fp32 sums, one rounding, store.
# With 32 rows x 8 warps a program uses 64-66 registers a thread and 104 KB (106,504 bytes) of
# shared memory at K = 1600 (with the norm deferred, as mlp fc now runs: 38 and 106,760), so 2
# programs fit an SM: all 200 of 1.5B's mlp fc programs (and,
# until the eleventh session moved qkv to 8 x 4 rows, its 150 qkv programs) are resident at once
# and each has asked for its whole tile before the kernel in front of it ends.
#
# Why Gluon. Triton's tl language cannot say "into shared memory, and hold no registers": tl.load
# lands in registers, and its tensor descriptors (tl.make_tensor_descriptor) use TMA but load
# into registers too, with the compiler choosing the shared-memory staging. Gluon
# (triton.experimental.gluon, shipped with Triton 3.6) is Triton's lower-level dialect: the
# same Python syntax and compiler, but layouts, shared-memory allocations, mbarriers and TMA
# copies are written out by the kernel, as CUDA C++ would. It is experimental: this section
# follows Triton 3.6's API, and it has no CPU interpreter (the CPU test compiles it for sm_90
# offline and reads the machine code instead; the GPU tests run it).
#
# Measured (H200, 2026-11-28, one process, the engine's graph step on the capture's inputs,
# same greedy tokens): the normed GEMVs (qkv, mlp fc) through this kernel took GPT-2 1.5B's step
# 1.422 -> 1.324 ms (702 -> 755 tok/s; a second run on another H200 machine: 1.413 -> 1.331 ms,
# 703 -> 742 tok/s); 16 rows x 4 warps (4 programs per SM): 1.347; 32 x 8 with x kept in fp32:
# 1.500 (more shared memory per program, slower). GPT-2 124M: 0.205 -> 0.203 and 0.191 ->
# 0.193 ms, flat. In the second run's per-kernel breakdown at a 160-token context, mlp fc 8.05
# -> 6.5 us a layer for 4.85 us of bytes. Each kernel alone (`bench.py --topic gemv`, CUDA graphs): c_attn
# 6.71 -> 5.62 us, c_fc 8.05 -> 6.72 us, 2.7-3.0 TB/s. Through `bench.py --topic serve` GPT-2
# 1.5B then decoded at 743 tok/s, 54.8% of the bandwidth roofline measured in that run (an
# earlier session's run, on another H200 machine and without v6, had measured 51.3%). `bench.py --topic tune` searches its rows x warps inside the step:
# within 0.7% of the rule (results/tune.md).
# What v6 did not fix, in the same breakdown: qkv now becomes resident only ~1.2 us before the
# mlp proj GEMV in front of it ends (that v5 kernel's register tiles fill the SMs), so it adds
# 6.8 us for 3.6 us of bytes; and the attention kernel, 7.4 us a layer for 0.24 us of bytes,
# is a quarter of the step.
# A smaller qkv program fits those gaps sooner: since the eleventh session, wide models' qkv
# takes 8 rows x 4 warps (128 threads, 53 registers, 30 KB; gemv_tma_config), 742-743 -> 753-754
# tok/s at 1.5B in a one-process A/B. Leaving mlp proj's register room for a 32 x 8 qkv instead
# (mlp proj capped at 56 registers with ptxas's maxnreg) lost: mlp proj slowed more than qkv
# gained (1.265 -> 1.288 ms at 100 tokens; with 8 x 4 qkv on top, 1.272).
#
# Deferring the norm (mlp fc). With the weight tile already in shared memory, what v6 does after
# its wait is a chain of dependent steps, and the norm is most of it: the mean of x, then the
# variance around it, then x normalised, then x to shared memory for every warp; the mean and the
# variance are each a reduction across the program's warps (shared memory and block barriers).
# The SASS of GPT-2 1.5B's qkv has 7 BAR.SYNC between the PDL wait and the first dot product.
# But the norm is linear in x once its two statistics are known, so it can be applied AFTER the
# dot products. For LayerNorm (gain g, bias b) in front of y = W x + bias, mean mu, 1/std r:
#     y = W (g * (x - mu) * r + b) + bias = r * (W (g * x) - mu * (W g)) + (W b + bias)
# W g and W b + bias (N values each) depend on parameters only and are computed once on the host
# (deferred_norm_constants). After the wait the program then needs x * g for the dots and two
# sums, of x and of x^2, per 64-column box (summed inside a warp, since x_l's warps split the
# boxes), written to shared memory next to x * g: one barrier. The statistics come last, when
# every thread adds the boxes' sums itself: mu = sum x / K, r = 1 / sqrt(sum x^2 / K - mu^2 + eps).
# (RMSNorm: no mu, no W g.) One BAR.SYNC before the dots instead of 7.
# Rounding: x * g is rounded to the weight's dtype for shared memory, where the normalised x used
# to be (an fp32 copy was slower: 2.74 us for GPT-2 124M's qkv alone, against 1.61 rounded and
# 2.42 normalising first). In fp16, x * g can overflow (a residual entry of 3,000 times a gain of
# 40), so g is divided by the power of two at or above max |g| (on the host; exact but for gains
# under 2^-14 of it) and the sums multiplied by it. The price of the new order: x is rounded
# BEFORE its mean is taken out, so the error relative to the output grows like 2^-11 |mu| / std
# (fp16) instead of 2^-11. Activations entering a norm have |mu| of the order of std or less (the tests use
# x * 3 + 1: mu / std = 1/3); at mu / std = 10 a torch imitation of the kernel was 6e-3 off in
# fp16 (normalising first: 3e-3). The one-pass variance E[x^2] - mu^2 costs far less (2^-24
# (mu / std)^2).
# Measured (H200, sixteenth session). Each kernel alone in a CUDA graph (its weight reused, so in
# L2: the chain after the wait, not the stream): mlp fc of 1.5B 4.91 -> 4.44 us, 124M's qkv 2.42
# -> 1.61 us. In the engine (one process, 3-4 interleaved rounds, same greedy tokens; three
# calls), deferring mlp fc's norm only: GPT-2 1.5B 799-803 -> 809-812, 801-804 -> 804-809 and
# 799-804 -> 804-808 tok/s, graph step at 200 tokens 1.253-1.256 -> 1.238-1.246 ms, within 0.5%
# at 100 and 280; GPT-2 124M 5,234-5,362 -> 5,419-5,447 and 5,384-5,429 -> 5,426-5,473 tok/s.
# Deferring qkv's norm as well gained nothing more at 1.5B (it lost at 280 tokens in all three
# calls, at 200 in one) and cost GPT-2 124M 9% (5,400 -> 4,900 tok/s; both deferred GEMVs ~0.8 us
# slower inside the step, though each alone is faster; not understood: giving the new version
# the old one's registers across the wait did not change it). Hence gemv_tma_defers_norm.
#
# Importing Gluon can be done anywhere Triton 3.6 is; only a Hopper GPU runs it.

@gluon.jit
def gl_pdl_signal():
    """pdl_signal for Gluon kernels (the same PTX instruction)."""
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def gl_pdl_wait():
    """pdl_wait for Gluon kernels."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _gl_pdl_signal_then_wait():
    """pdl_signal_then_wait for Gluon kernels (the same two PTX instructions)."""
    gl_pdl_signal()
    gl_pdl_wait()


@gluon.jit
def gemv_tma_kernel(w_desc, x_ptr, bias_ptr, res_ptr, y_ptr, norm_w_ptr, norm_b_ptr, row_gain_ptr, N, K, norm_eps,
                    gain_scale, BLOCK_N: gl.constexpr, N_BOXES: gl.constexpr, BOXES_POW2: gl.constexpr,
                    HAS_BIAS: gl.constexpr, ACTIVATION: gl.constexpr, HAS_RESIDUAL: gl.constexpr,
                    NORM: gl.constexpr, HAS_NORM_BIAS: gl.constexpr, DEFER_NORM: gl.constexpr,
                    num_warps: gl.constexpr, USE_PDL: gl.constexpr = False):
    gl.static_assert(NORM != "" or not DEFER_NORM)
    gl.static_assert(not (DEFER_NORM and HAS_NORM_BIAS))    # deferred, the norm's bias is in the bias
    BOX: gl.constexpr = w_desc.block_type.shape[1]       # 64 columns: 128 bytes, the TMA swizzle width
    dtype: gl.constexpr = w_desc.dtype
    row0 = gl.program_id(0) * BLOCK_N
    # Register layouts, which Gluon makes the kernel choose. A (BLOCK_N, BOX) tile: warps split
    # the rows, a warp's 32 lanes split its LANES_N rows x 64 columns (LANES_N = 4 for 32 rows
    # and 8 warps: 8 lanes, 8 columns each, per row). x as (BOXES_POW2, BOX): box b is row b.
    LANES_N: gl.constexpr = BLOCK_N // num_warps
    tile_l: gl.constexpr = gl.BlockedLayout([1, BOX * LANES_N // 32], [LANES_N, 32 // LANES_N], [num_warps, 1], [1, 0])
    row_l: gl.constexpr = gl.SliceLayout(1, tile_l)
    x_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])

    # 1. the whole weight tile into shared memory, and the parameters: before the wait
    w_smem = gl.allocate_shared_memory(dtype, [N_BOXES, BLOCK_N, BOX], w_desc.layout)
    bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar, count=1)
    mbarrier.expect(bar, N_BOXES * w_desc.block_type.nbytes)
    for b in gl.static_range(N_BOXES):
        tma.async_copy_global_to_shared(w_desc, [row0, b * BOX], bar, w_smem.index(b))
    x_offs = gl.arange(0, BOXES_POW2, layout=gl.SliceLayout(1, x_l))[:, None] * BOX \
        + gl.arange(0, BOX, layout=gl.SliceLayout(0, x_l))[None, :]
    x_ok = x_offs < K
    if NORM != "":
        nw = gl.load(norm_w_ptr + x_offs, mask=x_ok, other=0.0).to(gl.float32)   # (deferred: g / scale)
    if HAS_NORM_BIAS:                                    # (deferred: inside the bias)
        nb = gl.load(norm_b_ptr + x_offs, mask=x_ok, other=0.0).to(gl.float32)
    rows = row0 + gl.arange(0, BLOCK_N, layout=row_l)
    if HAS_BIAS:
        bias = gl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(gl.float32)
    if DEFER_NORM and NORM == "layer":
        row_gain = gl.load(row_gain_ptr + rows, mask=rows < N, other=0.0)
    if USE_PDL:
        _gl_pdl_signal_then_wait()

    # 2. x, and what the norm needs of it
    xf = gl.load(x_ptr + x_offs, mask=x_ok, other=0.0).to(gl.float32)
    if DEFER_NORM:
        # (see "Deferring the norm" above) each box's sum of x and of x^2, summed inside a warp
        # (x_l's warps split the boxes), to shared memory for later; x * g / scale for the dots
        one_d: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
        squares_smem = gl.allocate_shared_memory(gl.float32, [BOXES_POW2], one_d)
        squares_smem.store(gl.sum(xf * xf, 1))
        if NORM == "layer":
            sums_smem = gl.allocate_shared_memory(gl.float32, [BOXES_POW2], one_d)
            sums_smem.store(gl.sum(xf, 1))
        xf = xf * nw
    elif NORM == "layer":
        # normalised with _tile_stats / _normalize's formulas and rounding points (fp32
        # statistics, rounded to x's dtype; summed over a 2-D tile, so in another order)
        mean = gl.sum(gl.sum(xf, 1), 0) / K
        centred = gl.where(x_ok, xf - mean, 0.0)
        rstd = gl.rsqrt(gl.sum(gl.sum(centred * centred, 1), 0) / K + norm_eps)
        xf = (xf - mean) * rstd * nw
        if HAS_NORM_BIAS:
            xf += nb
    elif NORM == "rms":
        rstd = gl.rsqrt(gl.sum(gl.sum(xf * xf, 1), 0) / K + norm_eps)
        xf = (xf * rstd).to(dtype).to(gl.float32) * nw
    flat: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    x_smem = gl.allocate_shared_memory(dtype, [BOXES_POW2, BOX], flat)
    x_smem.store(xf.to(dtype))
    # box b as a (1, BOX) row that broadcasts over the tile (_reinterpret: a view of the same
    # bytes with another shape; a private Gluon API in Triton 3.6, there is no public one)
    x_boxes = x_smem._reinterpret(dtype, [BOXES_POW2, 1, BOX], flat)
    gl.thread_barrier()                                  # every warp reads all of x

    # 3. the dot products out of shared memory
    mbarrier.wait(bar, 0)
    acc = gl.zeros([BLOCK_N, BOX], gl.float32, layout=tile_l)
    for b in gl.static_range(N_BOXES):
        acc += w_smem.index(b).load(tile_l).to(gl.float32) * x_boxes.index(b).load(tile_l).to(gl.float32)
    mbarrier.invalidate(bar)
    y = gl.sum(acc, 1)                                   # (BLOCK_N,) in row_l

    # 4. deferred: the norm's statistics, each thread summing the boxes' sums itself (all_l gives
    #    every thread all of them: no barrier), then the algebra of "Deferring the norm"
    if DEFER_NORM:
        all_l: gl.constexpr = gl.BlockedLayout([BOXES_POW2], [32], [num_warps], [0])
        mean_square = gl.sum(squares_smem.load(all_l), 0) / K
        if NORM == "layer":
            mean = gl.sum(sums_smem.load(all_l), 0) / K
            rstd = gl.rsqrt(gl.maximum(mean_square - mean * mean, 0.0) + norm_eps)
            y = (y * gain_scale - mean * row_gain) * rstd
        else:
            y = y * gain_scale * gl.rsqrt(mean_square + norm_eps)

    # 5. the epilogue: v5's, on the fp32 sums
    if HAS_BIAS:
        y += bias
    if ACTIVATION == "gelu_tanh":                        # _gelu_tanh's formula (a Gluon kernel cannot call tl helpers)
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = y / (1.0 + gl.exp(-gl.maximum(2.0 * u, -40.0)))
    if HAS_RESIDUAL:                                     # written earlier in the step: after the wait
        y += gl.load(res_ptr + rows, mask=rows < N, other=0.0).to(gl.float32)
    gl.store(y_ptr + rows, y.to(dtype), mask=rows < N)


TMA_BOX_K = 64                  # columns per TMA box: 128 bytes of fp16/bf16, the widest swizzle
SM_SHARED_BYTES = 228 * 1024    # shared memory per SM on sm_90 ...
PROGRAM_RESERVED_BYTES = 1024   # ... of which the system keeps 1 KB per resident program
MAX_SHARED_BYTES = SM_SHARED_BYTES - PROGRAM_RESERVED_BYTES     # one program's most
GEMV_TMA_OVERRIDES = {}         # (N, K) -> (BLOCK_N, num_warps) for normed GEMVs: bench.py's tune tries others here


def gemv_tma_defers_norm(N, K) -> bool:
    """Whether gemv_tma applies the norm in front of an (N, K) weight after its dot products
    (DEFER_NORM, "Deferring the norm" above) rather than normalising x first: for an MLP's up
    projection (N > 3K; GPT-2's fc is 4K), the case measured to win (on GPT-2; a Llama-style
    fused gate and up projection, also N > 3K, takes it untimed). The qkv projection keeps
    normalising first (measured: no gain at GPT-2 1.5B, a loss at 124M)."""
    return N > 3 * K


def gemv_tma_shared_bytes(K, block_n, elem_bytes=2, deferred_norm=""):
    """Shared memory of one gemv_tma program: the weight tile (whole boxes) and x (a power of two
    of boxes, as its register tile), plus the 8-byte mbarrier; with the norm deferred
    (deferred_norm "layer" or "rms"), the per-box sums of x (LayerNorm) and of x^2, in fp32."""
    n_boxes = triton.cdiv(K, TMA_BOX_K)
    sums = {"": 0, "rms": 1, "layer": 2}[deferred_norm] * triton.next_power_of_2(n_boxes) * 4
    return (block_n * n_boxes + triton.next_power_of_2(n_boxes)) * TMA_BOX_K * elem_bytes + sums + 8


def normed_gemv_tma_shared_bytes(N, K, block_n, elem_bytes=2):
    """gemv_tma_shared_bytes of an (N, K) GEMV with a LayerNorm in front, as gemv_tma runs it by
    default (the norm deferred or not, as gemv_tma_defers_norm says)."""
    return gemv_tma_shared_bytes(K, block_n, elem_bytes, "layer" if gemv_tma_defers_norm(N, K) else "")


def gemv_tma_config(N, K, has_norm, has_residual, elem_bytes=2):
    """(BLOCK_N, num_warps) for gemv_tma, or None where the engine keeps v5's GEMV. The rule
    (measured in a whole decode step, see above): the GEMVs with a norm folded in (qkv, mlp fc)
    take 32 rows x 8 warps, or 16 / 8 rows x 4 warps where K is too wide for two 32-row programs
    to share an SM (both ran correctly in the A/B; only GPT-2's K = 768 and 1600 were timed).
    Wider still (K > 6,144 at 8 rows) stays on v5: one program per SM would leave most of the
    GPU's programs waiting for a slot, and the norm's weight (and bias, unless the norm is
    deferred), held in registers across the wait, grow with K. The LM head (N > 16384) stays on v5, which already streams it at the
    copy bandwidth. The residual GEMVs (attn proj, mlp proj) stay on v5 too: through v6 (8-16
    rows for attn proj, 4-8 for mlp proj's 6400-wide rows) the 1.5B step went 1.33 -> 1.34-1.48
    ms (H200, same run as above): mlp proj's 20 MB no longer fit shared memory beside the next
    kernels' tiles.
    Exception: a wide model's qkv projection (N <= 3K: an MLP's fc is 4K in GPT-2, ~5.3K as
    Llama's gate and up; K > 1024) takes 8 rows x 4 warps. It runs right after mlp proj, whose
    v5 programs at GPT-2 1.5B's width (800 of them, 2 rows x 6400) hold the register file in two
    waves; a small qkv program (128 threads x 53 registers, 30 KB) becomes resident in the gaps
    sooner. H200, eleventh session, two A/Bs in one process each (graph step at 100 / 200 tokens
    of context, then tok/s): 1.5B 1.270-1.273 -> 1.243-1.245 ms and 1.375-1.379 -> 1.358 ms,
    742-743 -> 753-754 tok/s, same tokens (bench tune had picked 8 x 4 for qkv too). At GPT-2
    124M's K = 768 mlp proj's 192 programs fit one wave, and 8 x 4 lost a little there (0.199 ->
    0.200-0.203 ms at 200 tokens), so narrower models keep 32 x 8. "K > 1024" stands in for the
    real condition (the v5 mlp proj in front needs two waves: at 4K = 6400 it takes 2-row tiles,
    800 programs for 528 slots on 132 SMs), which holds for GPT-2's 4x MLP on an H100/H200; the
    rule also moves shapes nobody has timed (GPT-2 774M's qkv, 3840 x 1280; a wide GQA model's,
    e.g. SmolLM2-1.7B's 6144 x 2048, from 16 x 4): bench.py --topic tune checks a model's pick."""
    if N > 16384 or not has_norm or has_residual:
        return None
    if (N, K) in GEMV_TMA_OVERRIDES:
        return GEMV_TMA_OVERRIDES[N, K]
    shapes = ((8, 4),) if N <= 3 * K and K > 1024 else ((32, 8), (16, 4), (8, 4))
    for rows, warps in shapes:      # (a deferred LayerNorm's sums: the larger of the two norms')
        if 2 * (normed_gemv_tma_shared_bytes(N, K, rows, elem_bytes) + PROGRAM_RESERVED_BYTES) <= SM_SHARED_BYTES:
            return rows, warps
    return None


@functools.lru_cache(maxsize=None)
def _compute_capability(device):
    return torch.cuda.get_device_capability(device)


def gemv_tma_unsupported(x, weight) -> str | None:
    """Why gemv_tma cannot run these tensors (None: it can). It needs a Hopper GPU (compute
    capability 9.x: TMA as Gluon's hopper module drives it, and where it was measured),
    fp16/bf16, and a contiguous (N, K) weight whose rows TMA can address: 16-byte aligned
    (K % 8 == 0) from a 16-byte aligned start."""
    if not x.is_cuda or INTERPRET or _compute_capability(x.device)[0] != 9:
        return f"a Hopper GPU (sm_90), got {x.device}" + (" under the Triton interpreter" if INTERPRET else "")
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return f"fp16/bf16, got {weight.dtype}"
    if not weight.is_contiguous():
        return f"a contiguous weight, got strides {weight.stride()}"
    if weight.shape[1] % 8:
        return f"K % 8 == 0 (16-byte rows for TMA), got K={weight.shape[1]}"
    if weight.data_ptr() % 16:
        return "a weight starting on a 16-byte boundary"
    return None


def gemv_tma_supported(x, weight) -> bool:
    """gemv_tma_unsupported(x, weight) is None: the engine's test before it calls gemv_tma."""
    return gemv_tma_unsupported(x, weight) is None


def _weight_descriptor(weight, block_n):
    """The TMA descriptor of `weight` in (block_n, 64) boxes. Built at every call: it is a small
    Python object (it holds the tensor, so it is not cached: a cache would keep every weight it
    ever saw alive), and Triton 3.6 encodes the 128-byte CUtensorMap from it at each launch
    anyway. A CUDA graph replays the encoded one."""
    return tma_descriptor(weight, [block_n, TMA_BOX_K])


@functools.cache
def _default_shared_layout(box, elem):
    """The default shared-memory layout of a (rows, cols) box of `elem`, built once per box and
    dtype. Gluon's get_default_for costs twice what the descriptor itself does, at every eager
    launch (four descriptors per flash_attn_hopper call, one per TMA GEMV): on the H200 machine's
    host a descriptor took 8.6 us with it and 2.7 us with this cache (twenty-second session). A
    layout is a frozen dataclass, safe to share."""
    return gl.NVMMASharedLayout.get_default_for(list(box), elem)


def tma_descriptor(tensor, box):
    """A TMA descriptor of a 2-D fp16/bf16 tensor copied in `box`-shaped tiles, in the default
    shared-memory layout for that box (swizzled as wgmma and conflict-free loads want it)."""
    elem = gl.float16 if tensor.dtype == torch.float16 else gl.bfloat16
    return TensorDescriptor.from_tensor(tensor, list(box), _default_shared_layout(tuple(box), elem))


def _is_power_of_two(n):
    return n > 0 and n & (n - 1) == 0


_DEFERRED_NORM_CACHE = torch.utils.weak.WeakIdKeyDictionary()    # weight -> (the other parameters, constants)
_RETIRED_DEFERRED_NORM_CONSTANTS = []   # replaced ones: CUDA graphs captured earlier still read them


def _version(t):
    """A tensor's in-place write counter (inference tensors have none; a write through .data
    bypasses it too)."""
    return 0 if t.is_inference() else t._version


def _identity(t):
    """What says a parameter is still the one a cached constant was computed from: the tensor
    itself (weakly), its data pointer and its version counter."""
    return None if t is None else (weakref.ref(t), t.data_ptr(), _version(t))


def _same(identity, t):
    """_identity(t) would equal identity (without making a weak reference on every call)."""
    if t is None or identity is None:
        return t is None and identity is None
    return identity[0]() is t and identity[1] == t.data_ptr() and identity[2] == _version(t)


def deferred_norm_constants(weight, bias, norm, norm_weight, norm_bias):
    """What gemv_tma needs to apply a norm ("layer" or "rms") after its dot products, from the
    parameters alone: (scale, g / scale, W g, W b + bias). scale: for an fp16 weight the power of
    two at or above max |g| (the kernel multiplies x by g / scale, so that x * g fits fp16 when it
    is rounded, and the sums by scale), else 1; g / scale in the weight's dtype, exact except for
    gains below scale x 2^-14, which fp16 keeps in subnormal steps of scale x 2^-24 (an error far
    below the rounding of x * g / scale itself; fp32 here took 15 more registers a thread in the
    kernel). W g (LayerNorm only, else None) and W b + bias (None where both are absent) in fp32.
    Computed once per weight with torch ops, then kept (weakly: a dropped weight drops its entry)
    until a parameter is replaced or changed in place. A recomputation keeps the scale and writes
    into the same buffers where it can, so that CUDA graphs captured before it (which hold the
    scale as a launch argument and the buffers' addresses) compute with the new parameters; where
    it cannot (a gain grown past the scale, a bias added or dropped) the old buffers are kept
    alive and such graphs must be captured again. A capture cannot compute the constants (the
    ops would be captured too, and rerun at every replay): gemv_tma must have run once eagerly
    first, as any Triton kernel must (to compile), and a capture that would need them raises.
    Keyed by the weight alone: one weight used with two different norms recomputes at every
    switch."""
    others = (bias, norm_weight, norm_bias)
    hit = _DEFERRED_NORM_CACHE.get(weight)
    if hit is not None and all(_same(i, t) for i, t in zip(hit[0], (weight, *others))):
        return hit[1]
    if weight.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("gemv_tma with a norm runs once eagerly before a CUDA graph captures it: "
                           "the deferred norm's constants are computed then (deferred_norm_constants)")
    w, g = weight.float(), norm_weight.float()
    max_gain = g.abs().max().item()
    scale = 1.0
    if weight.dtype == torch.float16 and 0 < max_gain < math.inf:
        scale = 2.0 ** math.ceil(math.log2(max_gain))
    row_gain = w @ g if norm == "layer" else None
    fused_bias = None if bias is None else bias.float()
    if norm_bias is not None:
        fused_bias = w @ norm_bias.float() + (0.0 if fused_bias is None else fused_bias)
    old = None if hit is None else hit[1]
    if old is not None and ((old[2] is None) != (row_gain is None) or (old[3] is None) != (fused_bias is None)
                            or (weight.dtype == torch.float16 and not max_gain <= old[0])):
        _RETIRED_DEFERRED_NORM_CONSTANTS.append(old)
        old = None
    if old is None:
        constants = (scale, (g / scale).to(weight.dtype), row_gain, fused_bias)
    else:                                        # the old scale is still safe: it and the old buffers
        constants = (old[0], old[1].copy_(g / old[0]), None if row_gain is None else old[2].copy_(row_gain),
                     None if fused_bias is None else old[3].copy_(fused_bias))
    _DEFERRED_NORM_CACHE[weight] = (tuple(_identity(t) for t in (weight, *others)), constants)
    return constants


def gemv_tma(x, weight, bias=None, activation=None, residual=None, out=None, *, norm=None, norm_weight=None,
             norm_bias=None, norm_eps=1e-5, block_n=32, num_warps=8, defer_norm=None):
    """gemv() for ONE row on a Hopper GPU, through gemv_tma_kernel: the same arguments and
    result (up to fp32 summation order, the norm's statistics included, and with the norm
    deferred, up to where x is rounded); block_n / num_warps as gemv_tma_config gives them;
    defer_norm None: as gemv_tma_defers_norm says (True / False: deferred or not)."""
    x2, res2, out2, out_shape = _check_gemv_inputs(x, weight, bias, activation, residual, out,
                                                   norm, norm_weight, norm_bias)
    N, K = weight.shape
    if x2.shape[0] != 1:
        raise ValueError(f"gemv_tma takes one row, got {x2.shape[0]}: use gemv()")
    why = gemv_tma_unsupported(x, weight)
    if why:
        raise ValueError(f"gemv_tma needs {why}: use gemv()")
    if not (_is_power_of_two(block_n) and _is_power_of_two(num_warps) and num_warps <= block_n <= min(256, 32 * num_warps)):
        raise ValueError(f"block_n ({block_n}) and num_warps ({num_warps}) must be powers of two with "
                         f"num_warps <= block_n <= min(256, 32 x num_warps): warps split the rows, a TMA box has <= 256")
    if defer_norm and not norm:
        raise ValueError("defer_norm=True needs a norm to defer")
    defer = bool(norm) and (gemv_tma_defers_norm(N, K) if defer_norm is None else defer_norm)
    if gemv_tma_shared_bytes(K, block_n, x.element_size(), norm if defer else "") > MAX_SHARED_BYTES:
        raise ValueError(f"a {block_n} x {K} tile does not fit shared memory ({MAX_SHARED_BYTES} bytes): fewer rows")
    y2 = torch.empty((1, N), device=x.device, dtype=x.dtype) if out2 is None else out2
    gain_scale, row_gain = 1.0, None
    if defer:       # g / scale for g, the norm's bias inside the bias
        gain_scale, norm_weight, row_gain, bias = deferred_norm_constants(weight, bias, norm, norm_weight, norm_bias)
        norm_bias = None
    n_boxes = triton.cdiv(K, TMA_BOX_K)
    gemv_tma_kernel[(triton.cdiv(N, block_n),)](
        _weight_descriptor(weight, block_n), x2, bias if bias is not None else y2,
        res2 if res2 is not None else y2, y2, norm_weight if norm_weight is not None else y2,
        norm_bias if norm_bias is not None else y2, row_gain if row_gain is not None else y2, N, K, norm_eps,
        gain_scale, BLOCK_N=block_n, N_BOXES=n_boxes, BOXES_POW2=triton.next_power_of_2(n_boxes),
        HAS_BIAS=bias is not None, ACTIVATION=activation or "", HAS_RESIDUAL=residual is not None,
        NORM=norm or "", HAS_NORM_BIAS=norm_bias is not None, DEFER_NORM=defer, num_warps=num_warps,
        **pdl_launch_args())
    return out if out is not None else y2.view(out_shape)


# -----------------------------------------------------------------------------
# Demo: check every version against torch and print a small table.

def _print_check(shape, name, y, ref, tol):
    """One row of main()'s table: the max error relative to (1 + |ref|), ref computed in fp32."""
    err = ((y.float() - ref).abs() / (1 + ref.abs())).max().item()
    print(f"| {shape:>16} | {name} | {err:.2e} | {'yes' if err < tol else 'NO'} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = torch.cuda.is_available() and not INTERPRET
    parser.add_argument("--size", type=int, default=1024 if on_gpu else 64, help="square size for the checks")
    parser.add_argument("--dtype", default="fp16" if on_gpu else "fp32", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table")
    parser.add_argument("--sass", action="store_true", help="compile the decode GEMV for an H100/H200 (no GPU "
                        "needed) and count its machine instructions around the PDL wait")
    args = parser.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    device = "cuda" if on_gpu else "cpu"
    if dtype != torch.float32 and not on_gpu:
        print("note: fp16/bf16 under the interpreter is emulated (slow); try --dtype fp32")
    torch.manual_seed(0)
    s = args.size
    shapes = [(s, s, s), (1, 768, 2304 if on_gpu else 96), (17, 33, 65)]
    print(f"device: {torch.cuda.get_device_name() if on_gpu else 'CPU (Triton interpreter)'}, dtype {args.dtype}")
    print(f"| {'M x K x N':>16} | version | max error vs fp32 torch | ok |")
    print("|---|---|---|---|")
    for M, K, N in shapes:
        a = torch.randn(M, K, device=device, dtype=dtype)
        b = torch.randn(K, N, device=device, dtype=dtype) / math.sqrt(K)
        bias = torch.randn(N, device=device, dtype=dtype)
        versions = [("v1", matmul_v1(a, b), None), ("v2", matmul_v2(a, b), None),
                    ("v3", matmul(a, b), None), ("v4", matmul_bias_gelu(a, b, bias), "gelu_tanh")]
        for name, c, act in versions:   # error relative to (1 + |ref|), ref computed in fp32
            ref = matmul_reference(a.float(), b.float(), bias.float() if act else None, act)
            tol = {torch.float32: 4e-3 if on_gpu else 1e-5, torch.float16: 2e-3}.get(dtype, 1e-2)  # tf32 on GPU
            _print_check(f"{M} x {K} x {N}", name, c, ref, tol)
    # v5: decode-shaped GEMV with each epilogue, and the one-row norms
    Kd, Nd = (1600, 4800) if on_gpu else (100, 37)
    for M in (1, 5):
        x = torch.randn(M, Kd, device=device, dtype=dtype)
        w = torch.randn(Nd, Kd, device=device, dtype=dtype) / math.sqrt(Kd)
        bias, res = torch.randn(Nd, device=device, dtype=dtype), torch.randn(M, Nd, device=device, dtype=dtype)
        for name, act, r in [("v5 gemv +b", None, None), ("v5 gemv +b +gelu", "gelu_tanh", None),
                             ("v5 gemv +b +res", None, res)]:
            y = gemv(x, w, bias, act, r)
            ref = gemv_reference(x.float(), w.float(), bias.float(), act, None if r is None else r.float())
            tol = {torch.float32: 1e-5, torch.float16: 2e-3}.get(dtype, 1e-2)  # CUDA cores: no tf32
            _print_check(f"{M} x {Kd} x {Nd}", name, y, ref, tol)
    x = torch.randn(3, Kd, device=device, dtype=dtype) * 2 + 1
    w, bias = torch.randn(Kd, device=device, dtype=dtype), torch.randn(Kd, device=device, dtype=dtype)
    for name, rms in [("v5 LayerNorm", False), ("v5 RMSNorm", True)]:
        y = row_norm(x, w, None if rms else bias, rms=rms)
        ref = row_norm_reference(x.float(), w.float(), None if rms else bias.float(), rms=rms)
        _print_check(f"3 x {Kd}", name, y, ref, {torch.float32: 1e-5, torch.float16: 2e-3}.get(dtype, 1e-2))
    # v6 (Hopper GPUs, fp16/bf16): one row, LayerNorm folded in, through TMA and shared memory
    x1, w1 = x[:1].contiguous(), torch.randn(Nd, Kd, device=device, dtype=dtype) / math.sqrt(Kd)
    if gemv_tma_supported(x1, w1):
        b1, ln = torch.randn(Nd, device=device, dtype=dtype), dict(norm="layer", norm_weight=w, norm_bias=bias)
        rows_warps = gemv_tma_config(Nd, Kd, True, False)
        y = gemv_tma(x1, w1, b1, "gelu_tanh", **ln, block_n=rows_warps[0], num_warps=rows_warps[1])
        ref = gemv_reference(x1.float(), w1.float(), b1.float(), "gelu_tanh", norm="layer", norm_weight=w.float(),
                             norm_bias=bias.float())
        _print_check(f"1 x {Kd} x {Nd}", "v6 gemv_tma +LN +b +gelu", y, ref, {torch.float16: 2e-3}.get(dtype, 1e-2))
    if on_gpu:
        a = torch.randn(s, s, device=device, dtype=dtype)
        cfg = _prune_configs(AUTOTUNE_CONFIGS, dict(M=s, N=s, a_ptr=a))[0]   # first that fits
        _, kernel = matmul_with_config(a, a, cfg)
        occ, where = occupancy_of(kernel, a.device), ""
    else:               # the same question for an H100/H200, answered by compiling for one
        cfg = GPU_AUTOTUNE_CONFIGS[0]
        occ, where = occupancy_table_offline(4096, 4096, 4096, torch.float16, [cfg])[0], " (fp16, sm_90, offline)"
    print(f"\n{config_name(cfg)}{where}: {occ['n_regs']} regs/thread, {occ['shared_bytes']} B smem, "
          f"{occ['programs_per_sm']} program(s)/SM, occupancy {occ['occupancy']:.1%} (limited by {occ['limiter']})")
    if args.profile:
        print(profile_matmul(s, s, s, dtype=dtype, device=device))
    if args.sass:
        shapes = GPT2_XL_DECODE_GEMVS[2:4]              # the MLP's two
        for (_, N, K, norm, *_), r in zip(shapes, gemv_sass_summary(shapes)):
            print(f"\nv5 GEMV {K}->{N}{' +LayerNorm' if norm else ''} ({r['config']}, fp16, sm_90): {r['n_regs']} regs; "
                  f"before the PDL wait {r['instructions_before_wait']} instructions, {r['loads_before_wait']} loads "
                  f"(the weight tile); after it {r['instructions_after_wait']} instructions, {r['loads_after_wait']} "
                  f"loads, {r['barriers_after_wait']} BAR.SYNC")
        shapes = GPT2_XL_DECODE_GEMVS[2:3]             # v6 takes c_fc (a norm folded in), not c_proj
        for (_, N, K, *_), r in zip(shapes, gemv_sass_summary(shapes, tma=True)):
            print(f"v6 GEMV {K}->{N} +LayerNorm ({r['config']}, fp16, sm_90): {r['n_regs']} regs, "
                  f"{r['shared_bytes'] / 1024:.0f} KB of shared memory; before the PDL wait "
                  f"{r['tma_copies_before_wait']} TMA copies (the weight tile), {r['loads_before_wait']} loads (the "
                  f"parameters); after it {r['instructions_after_wait']} instructions, {r['loads_after_wait']} loads, "
                  f"{r['barriers_after_wait']} BAR.SYNC")


if __name__ == "__main__":
    main()
