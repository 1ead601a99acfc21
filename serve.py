"""
serve.py: a small vLLM-class inference engine. Paged KV cache, continuous batching, prefix
caching, CUDA graphs, all in one file you can read top to bottom.

    python serve.py --prompt "The GPU" --max-tokens 64       # stream one answer + a summary line
    python serve.py --model random:1.5B --dtype float16 ...  # any model model.py can load
    python serve.py --http 8000                              # an OpenAI-compatible API on :8000
    python serve.py --help                                   # every knob of EngineConfig

What you will learn, in the order the engine is built
1. Request state (`Sequence`) and per-request sampling (`SamplingParams`), validated up front so
   a bad request fails before it touches the engine.
2. The paged KV cache (`BlockManager`): the cache is one pool of fixed-size blocks per layer;
   a sequence owns a *block table* (list of block ids) instead of a contiguous slab, so memory is
   taken one block (16 tokens) at a time and nothing is reserved for tokens that never come.
   Blocks are reference-counted, which makes *prefix caching* nearly free: full blocks are keyed
   by a hash chained over their token ids, and a new prompt that starts with the same tokens
   points at the same blocks instead of recomputing them.
3. The scheduler (`Scheduler`): waiting and running queues, a token budget per step, prefill
   steps and decode steps, and preemption by recompute when blocks run out.
4. The model runner (`ModelRunner`): packed variable-length prefill (all new prompt tokens of
   the step in one (1, N) batch, no padding), batched decode (one token per running sequence),
   and CUDA graphs for decode, captured once per batch-size bucket.
5. The engine (`LLMEngine`): add requests, step, stream; memory accounting.
6. An OpenAI-compatible HTTP server (`HTTPServer`): asyncio for the connections, one thread
   that owns the engine, streaming by server-sent events.

The attention of the model plugs in through model.py's `attend(layer, q, k, v, positions)`
interface: `PagedStep` is that backend for one engine step, and it carries the step's batch
metadata (slots, block tables, lengths) explicitly - no global context.
On a GPU the attention runs flash_attn.py's Triton kernels (varlen prefill, paged decode; a
prefill step in which some prompt reuses cached prefix blocks falls back to the PyTorch gather
path, since the varlen kernel takes queries and keys of equal lengths); on a CPU the same engine
runs a plain PyTorch gather + SDPA, which is the reference in tests.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import math
import numbers
import os
import queue
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

# Without CUDA, Triton kernels run in the Triton interpreter (numpy on the CPU); the variable must
# be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import model as M  # noqa: E402
import flash_attn  # noqa: E402
import triton_matmul as tm  # noqa: E402  (decode GEMV/norm kernels)


# ----------------------------------------------------------------------------------------------
# 1. Requests
# ----------------------------------------------------------------------------------------------

@dataclass
class SamplingParams:
    """Per-request generation settings. Validated on construction: a bad value raises here."""
    max_tokens: int = 64
    temperature: float = 0.0        # 0 = greedy
    top_k: int = 0                  # 0 = off
    top_p: float = 1.0
    seed: int | None = None         # per-request generator: reproducible whatever the batch
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()      # stop strings (need a tokenizer); not included in the output

    def __post_init__(self):
        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not _is_int(self.top_k):
            raise ValueError(f"top_k must be an integer (0 = off), got {self.top_k!r}")
        if self.seed is not None and not (_is_int(self.seed) and -2**63 <= self.seed < 2**64):
            raise ValueError(f"seed must be None or an integer in [-2^63, 2^64), got {self.seed!r}")
        M.check_sampling_args(self.temperature, self.top_k, self.top_p)
        if not (self.stop is None or isinstance(self.stop, (str, list, tuple))):
            raise ValueError(f"stop strings must be a string or a list of non-empty strings, got {self.stop!r}")
        self.stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")


def _is_int(x) -> bool:
    """A real integer (Python or NumPy), not a bool and not a float that happens to be whole."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


class Sequence:
    """One request's state as it moves waiting -> running -> finished (and back on preemption)."""

    def __init__(self, seq_id: int, prompt: list[int], params: SamplingParams, device):
        self.id = seq_id
        self.prompt = list(prompt)
        self.output: list[int] = []
        self.params = params
        self.block_table: list[int] = []     # physical block ids, one per block_size tokens
        self.num_cached = 0                  # leading tokens whose K/V are already in the cache
        self.status = "waiting"
        self.finish_reason: str | None = None
        self.generator = (torch.Generator(device=device).manual_seed(params.seed)
                          if params.seed is not None else None)
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.text = ""                       # the text cut at a stop string (finish reason "stop")
        self.detok: M.IncrementalText | None = None   # live text, for stop strings and streaming
        self.full_blocks: list[tuple[int, tuple]] = []   # (chain hash, tokens) of each full block
        # tokens already computed on the device but not read back yet (0, 1 or 2; see
        # LLMEngine.step): they count in len(seq), the positions and blocks they take, but are
        # not in self.output until the host has them
        self.num_pending = 0

    @property
    def tokens(self) -> list[int]:
        """A copy: for prefill and hashing, not per decode step (only ever used while no token of
        this sequence is pending)."""
        return self.prompt + self.output

    @property
    def last_token(self) -> int:
        return self.output[-1] if self.output else self.prompt[-1]

    def __len__(self):
        return len(self.prompt) + len(self.output) + self.num_pending


# ----------------------------------------------------------------------------------------------
# 2. The paged KV cache
# ----------------------------------------------------------------------------------------------
#
# Storage: k_pool, v_pool of shape (n_layer, num_blocks + 1, block_size, n_kv_head, head_dim),
# the layout flash_attn.py's paged decode kernel reads (the extra block is a trash block that no
# sequence ever gets: padded rows of a CUDA-graph batch have slot -1, which the PyTorch store
# redirects into it and the Triton store skips). Token at position p lives in
# block block_table[p // block_size], row p % block_size; its flat "slot" is
# block * block_size + row. Waste is at most block_size - 1 tokens per sequence (the last block)
# instead of max_len - len for a contiguous cache (kvcache.py's picture).
#
# Prefix caching. A *full* block's identity is hash(previous block's hash, its token ids): equal
# hashes mean equal prefixes, up to hash collisions (Python's 64-bit tuple hash; we also compare
# the block's own tokens, which catches a collision in the last block but not in its parents). When
# a sequence finishes, its full blocks keep their contents and hash and go to an LRU list of
# evictable blocks; a later prompt with the same prefix takes them back (ref count 0 -> 1) and
# skips their prefill. Only blocks nobody references are ever evicted or overwritten.

class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.free: deque[int] = deque(range(num_blocks))   # blocks with no useful content
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()   # cached, unreferenced, LRU first
        self.hits = 0                                            # prefix-cache hits (blocks)

    # -- accounting ----------------------------------------------------------------------------
    def num_available(self) -> int:
        return len(self.free) + len(self.evictable)

    def blocks_in_use(self) -> int:
        return self.num_blocks - self.num_available()

    def _take(self) -> int:
        """A block to write into: a never-used one first, else evict the least recently used
        cached one (its hash is forgotten)."""
        if self.free:
            block = self.free.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            del self.hash_to_block[self.block_hash[block]]
            self.block_hash[block] = self.block_tokens[block] = None
        self.ref_count[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.ref_count[block] -= 1
        assert self.ref_count[block] >= 0, f"block {block} released twice"
        if self.ref_count[block] == 0:
            if self.block_hash[block] is not None:
                self.evictable[block] = None          # keep the contents for future hits
            else:
                self.free.append(block)

    # -- prefix hashing --------------------------------------------------------------------------
    @staticmethod
    def chain_hash(prev: int | None, tokens: tuple) -> int:
        return hash((prev, tokens))

    def _full_blocks(self, seq: Sequence) -> list[tuple[int, tuple]]:
        """(chain hash, token tuple) of every full block of seq's tokens, computed once per block
        and kept on the sequence: its tokens only ever grow, so earlier hashes stay valid (a
        waiting sequence is looked up at every step; it must not be rehashed each time)."""
        bs, done = self.block_size, seq.full_blocks
        tokens = seq.tokens                   # known tokens only: pending ones are not hashable yet
        n_full = len(tokens) // bs
        if len(done) < n_full:
            prev = done[-1][0] if done else None
            for i in range(len(done), n_full):
                chunk = tuple(tokens[i * bs:(i + 1) * bs])
                prev = self.chain_hash(prev, chunk)
                done.append((prev, chunk))
        return done                           # tokens only grow: exactly the n_full blocks

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks already holding a prefix of seq's tokens (full blocks only). At least one token
        is always left to compute, so a fully cached prompt recomputes its last block: the model
        needs the last token's hidden state to produce logits, and writing that block into a
        fresh one keeps shared blocks read-only."""
        if not self.prefix_caching:
            return []
        hits = []
        for h, chunk in self._full_blocks(seq)[:(len(seq) - 1) // self.block_size]:
            block = self.hash_to_block.get(h)
            if block is None or self.block_tokens[block] != chunk:
                break
            hits.append(block)
        return hits

    # -- sequences -------------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._cached_prefix(seq)
        needed = math.ceil(len(seq) / self.block_size) - len(hits)
        revived = sum(1 for b in hits if self.ref_count[b] == 0)   # hits that leave the LRU list
        return needed + revived <= self.num_available()

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence the blocks for all its tokens, reusing cached prefix blocks."""
        assert not seq.block_table
        bs = self.block_size
        hits = self._cached_prefix(seq)
        self.hits += len(hits)
        for block in hits:
            if self.ref_count[block] == 0:
                del self.evictable[block]
            self.ref_count[block] += 1
        seq.block_table = hits + [self._take() for _ in range(math.ceil(len(seq) / bs) - len(hits))]
        seq.num_cached = len(hits) * bs
        # register the new full blocks: they are written by this very prefill step
        if self.prefix_caching:
            for i, (h, chunk) in enumerate(self._full_blocks(seq)[len(hits):], start=len(hits)):
                block = seq.block_table[i]
                if h not in self.hash_to_block:
                    self.hash_to_block[h] = block
                    self.block_hash[block], self.block_tokens[block] = h, chunk

    def needs_block(self, seq: Sequence) -> bool:
        """Decode writes the newest token at position len(seq) - 1: is that past seq's blocks?"""
        return len(seq.block_table) * self.block_size < len(seq)

    def can_append(self, seq: Sequence) -> bool:
        return not self.needs_block(seq) or self.num_available() > 0

    def append(self, seq: Sequence) -> None:
        if self.needs_block(seq):
            seq.block_table.append(self._take())

    def free_sequence(self, seq: Sequence, written: bool = True) -> None:
        """Release a sequence's blocks. written=False (its step failed before the model wrote
        the K/V): the blocks this step was to fill (past the cached prefix, which was written
        before) also forget their prefix hash when nobody else holds them, so no later prompt can
        hit a block that was registered but never filled."""
        first_unwritten = len(seq.block_table) if written else seq.num_cached // self.block_size
        # reversed: the LRU evicts a prefix's tail first
        for i, block in reversed(list(enumerate(seq.block_table))):
            if i >= first_unwritten and self.ref_count[block] == 1 and self.block_hash[block] is not None:
                del self.hash_to_block[self.block_hash[block]]
                self.block_hash[block] = self.block_tokens[block] = None
            self._release(block)
        seq.block_table = []
        seq.num_cached = 0


# ----------------------------------------------------------------------------------------------
# 3. The scheduler
# ----------------------------------------------------------------------------------------------
#
# Every step is either a prefill step (admit waiting sequences, run all their uncached prompt
# tokens packed together) or a decode step (one token for every running sequence). Prefill goes
# first whenever something can be admitted: a new request's time-to-first-token is usually what
# an SLO is about, and a bigger running batch makes every later decode step more efficient
# (a decode step reads all the weights whether it serves 1 sequence or 256).
# The token budget caps a prefill step's size (activation memory, and the latency every running
# sequence feels while the step runs). When a decode step needs a block and none is left, the
# most recently admitted sequence is *preempted*: its blocks are freed and it goes back to the
# front of the queue, to be recomputed (prompt + what it generated so far) when memory frees up.
# Recompute is cheaper than swapping to host memory for short sequences, and needs no host pool.

@dataclass
class ScheduledStep:
    kind: str                    # "prefill" | "decode"
    seqs: list[Sequence]


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep:
        batch, budget = [], self.max_num_batched_tokens
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._admissible(seq, budget):
                break
            self.blocks.allocate(seq)
            budget -= len(seq) - seq.num_cached
            seq.status = "running"
            batch.append(self.waiting.popleft())
        if batch:
            self.running.extend(batch)
            return ScheduledStep("prefill", batch)
        if not self.running:
            seq = self.waiting[0]
            raise RuntimeError(f"request {seq.id} ({len(seq)} tokens) cannot be scheduled: the KV pool "
                               f"has {self.blocks.num_blocks} blocks of {self.blocks.block_size} tokens "
                               f"and the token budget is {self.max_num_batched_tokens}")
        # decode: every running sequence needs room for one more token
        scheduled = []
        while self.running:
            seq = self.running.pop(0)
            while not self.blocks.can_append(seq):
                victim = self.running.pop() if self.running else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append(seq)
                scheduled.append(seq)
        self.running = scheduled
        return ScheduledStep("decode", list(scheduled))   # a copy: finish() edits self.running

    def _admissible(self, seq: Sequence, budget: int) -> bool:
        return len(seq) <= budget and self.blocks.can_allocate(seq)

    def schedule_ahead(self) -> ScheduledStep | None:
        """The next decode step, picked while the current one still runs on the device, before
        its tokens are known (LLMEngine.step), or None when that is not safe: a sequence waits
        to be admitted and could be (a prefill step comes first), or a running sequence would need a block
        that only preemption could free (preemption re-queues tokens, and these are not known).
        A sequence whose pending token is its last (max_tokens) is left out; one that turns out
        to have stopped on EOS or a stop string computes one row too many, dropped on arrival."""
        if (self.waiting and len(self.running) < self.max_num_seqs
                and self._admissible(self.waiting[0], self.max_num_batched_tokens)):
            return None
        seqs = [s for s in self.running if len(s.output) + s.num_pending < s.params.max_tokens]
        if not seqs or sum(map(self.blocks.needs_block, seqs)) > self.blocks.num_available():
            return None
        for seq in seqs:
            self.blocks.append(seq)
        return ScheduledStep("decode", seqs)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free_sequence(seq)
        seq.status = "waiting"
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str, written: bool = True) -> None:
        """Retire a sequence (done, aborted or failed) and free its blocks, wherever it is queued."""
        seq.status, seq.finish_reason = "finished", reason
        seq.finish_time = time.perf_counter()
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_sequence(seq, written)


# ----------------------------------------------------------------------------------------------
# 4. Attention over the paged cache: the model's backend for one step
# ----------------------------------------------------------------------------------------------

def store_kv_reference(k_pool, v_pool, k, v, slot_mapping):
    """k_pool/v_pool: (num_blocks + 1, block_size, Hkv, D); k, v: (N, Hkv, D).

    Slot -1 marks a padded row of a CUDA-graph batch, which must not touch any sequence's K/V.
    The pool's last block belongs to no sequence (the BlockManager never hands it out): padded
    rows write there. (Skipping them instead would need a data-dependent shape, which a graph
    cannot hold; rewriting some real slot with its old value races with a real write to it.)"""
    trash = (k_pool.shape[0] - 1) * k_pool.shape[1]
    slots = torch.where(slot_mapping >= 0, slot_mapping, trash)
    k_pool.view(-1, *k_pool.shape[2:]).index_copy_(0, slots, k)
    v_pool.view(-1, *v_pool.shape[2:]).index_copy_(0, slots, v)


# The engine's one kernel of its own: write each new token's K/V rows to its slot. One program
# per token copies Hkv * D elements (768 for GPT-2: 1.5 KB in fp16) for K and for V.
# Defined at module level (not in a closure) so torch.compile can import it by name.
#
# k and v are read through their strides (token, head; the last dimension must be contiguous), so
# the views the model hands over need no .contiguous() copy first: in decode, GPT-2's k and v are
# slices of the fused qkv output (token stride (H + 2 Hkv) * D, not Hkv * D), and a RoPE model's v
# is one too; in prefill, kn = k[0].transpose(0, 1) has head stride N * D. The copies it saves were
# 2 kernels per layer: for an eager GPT-2 decode step at batch > 1 (at batch 1 the slice already
# counts as contiguous) 24 launches of ~50 us host time each on the H200 machine's host; inside a
# graph, 24 small copy kernels of GPU time.
@triton.jit
def store_kv_kernel(k_ptr, v_ptr, k_pool_ptr, v_pool_ptr, slot_ptr,
                    stride_kt, stride_kh, stride_vt, stride_vh, stride_slot,
                    HEAD_DIM: tl.constexpr, ROW: tl.constexpr, BLOCK: tl.constexpr,
                    USE_PDL: tl.constexpr = False):
    if USE_PDL:                         # programmatic dependent launch: see triton_matmul.py
        tm.pdl_signal_then_wait()
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot >= 0:                       # -1: a padded row of a CUDA-graph batch writes nothing
        offs = tl.arange(0, BLOCK)      # element (head, d) of the token's Hkv * D row
        mask = offs < ROW
        head, d = offs // HEAD_DIM, offs % HEAD_DIM
        k = tl.load(k_ptr + token * stride_kt + head * stride_kh + d, mask=mask)
        v = tl.load(v_ptr + token * stride_vt + head * stride_vh + d, mask=mask)
        tl.store(k_pool_ptr + slot * stride_slot + offs, k, mask=mask)    # pool rows: contiguous
        tl.store(v_pool_ptr + slot * stride_slot + offs, v, mask=mask)


def store_kv_triton(k_pool, v_pool, k, v, slot_mapping):
    """Same contract as store_kv_reference, one launch instead of ~6 PyTorch ops. k, v: (N, Hkv, D)
    with any token and head strides (no copy); only a non-contiguous last dimension is copied."""
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    head_dim = k.shape[2]
    row = k.shape[1] * head_dim
    store_kv_kernel[(k.shape[0],)](k, v, k_pool, v_pool, slot_mapping,
                                   k.stride(0), k.stride(1), v.stride(0), v.stride(1), row,
                                   HEAD_DIM=head_dim, ROW=row, BLOCK=triton.next_power_of_2(row),
                                   **M.pdl_launch_args())


# ---- The greedy token, inside the graph ---------------------------------------------------------
#
# Every decode step ends with logits.argmax(-1) over GPT-2's 50,257 logits, captured in the graph,
# then a copy of the result into last_greedy (where step n+1 takes its input ids). PyTorch runs the
# argmax as its generic reduction: for one row that is one block working alone, measured 15.7 us
# per GPT-2 1.5B step on an H200 (torch.profiler inside the graph), ~1% of the 1.5B step and ~6%
# of 124M's, for 100 KB of logits that sit in L2. Our kernel writes both the result and
# last_greedy (the copy kernel goes too), and under programmatic dependent launch it is resident
# while the LM head drains.
# First version: one Triton program per row, reading the row in 16,384-wide chunks (16 warps: 4
# rounds of L2 latency for GPT-2's row), a running maximum and its index per lane, the lanes
# reduced once. Measured (H200, one A/B process, graph replay, same greedy tokens): GPT-2 124M
# batch 1 0.2312 -> 0.2224 ms per step against PyTorch's, GPT-2 1.5B 1.524 -> 1.513 ms. It still
# added 7.0-7.1 us to every step (bench.py --topic graphs, sixteenth session), most of it those
# rounds of latency in series on one SM.
# Now: the row is cut into 2,048-logit chunks, one program each (25 for GPT-2, 4 warps, one round
# of loads); each writes its chunk's maximum and first index, and the last program of the row to
# arrive (an arrival counter, as in flash_attn.py's split merge, whose counter buffer it shares:
# each user leaves it zeroed, and both touch it only after their PDL wait) reduces the partials.
# Measured (H200, sixteenth session, one process, 3 rounds, same greedy tokens): GPT-2 124M graph
# step 0.1706-0.1722 -> 0.1665-0.1693 ms at 100 tokens, 0.1915-0.1931 -> 0.1886-0.1891 at 280,
# 5,301-5,366 -> 5,401-5,489 tok/s; GPT-2 1.5B 1.3036-1.3055 -> 1.3009-1.3027 ms at 280 tokens,
# -0.2% at 100 and 200 (its tok/s rounds too noisy to resolve that: 789-810 -> 803-817).
GREEDY_ARGMAX_CHUNK = 2048


@triton.jit
def greedy_argmax_kernel(logits_ptr, out_ptr, last_ptr, part_top_ptr, part_at_ptr, counters_ptr, V, stride_row,
                         BLOCK: tl.constexpr, CHUNKS_POW2: tl.constexpr, USE_PDL: tl.constexpr = False):
    if USE_PDL:
        tm.pdl_signal_then_wait()
    row, chunk = tl.program_id(0), tl.program_id(1)
    n_chunks = tl.num_programs(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(logits_ptr + row * stride_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    v = tl.where(v != v, float("inf"), v)              # NaN wins, as in torch.argmax (see below)
    top = tl.max(v, axis=0)
    # the first index that holds the maximum: torch.argmax's tie rule. A chunk of -inf only
    # (an all -inf row, or lanes past V) gives its first index, so such a row gives 0, as
    # argmax does.
    first = tl.min(tl.where(v == top, offs, V), axis=0)
    part = row * CHUNKS_POW2 + chunk
    tl.store(part_top_ptr + part, top)
    tl.store(part_at_ptr + part, first)
    # the last of the row's chunks to finish reduces the partials (flash_attn.py's merge explains
    # the barrier, the acq_rel atomic and the .cg loads); chunks cover increasing indices, so
    # the smallest index among the chunks holding the maximum is the row's first one
    counter = counters_ptr + row
    tl.debug_barrier()
    if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == n_chunks - 1:
        lanes = tl.arange(0, CHUNKS_POW2)
        ok = lanes < n_chunks
        tops = tl.load(part_top_ptr + row * CHUNKS_POW2 + lanes, mask=ok, other=float("-inf"), cache_modifier=".cg")
        ats = tl.load(part_at_ptr + row * CHUNKS_POW2 + lanes, mask=ok, other=V, cache_modifier=".cg")
        top = tl.max(tops, axis=0)
        first = tl.min(tl.where(tops == top, ats, V), axis=0)
        tl.store(out_ptr + row, first.to(tl.int64))
        tl.store(last_ptr + row, first.to(tl.int64))
        tl.store(counter, 0)                           # zeroed again for the next user


def greedy_argmax_reference(logits: torch.Tensor, last_greedy: torch.Tensor) -> torch.Tensor:
    """logits (B, V) -> their argmax (B,) int64, also copied into last_greedy[:B]."""
    greedy = logits.argmax(dim=-1)
    last_greedy[:len(greedy)].copy_(greedy)
    return greedy


def greedy_argmax_triton(logits: torch.Tensor, last_greedy: torch.Tensor) -> torch.Tensor:
    """greedy_argmax_reference in one kernel, a program per 2,048 logits of a row. The same index
    for every row, except that a NaN logit counts as +inf here (torch.argmax returns the first
    NaN; this returns the first of the NaN and +inf logits): a row with NaN logits is lost either
    way. Like paged_decode, it needs its counters allocated before a CUDA graph captures it."""
    if logits.shape[0] > last_greedy.numel():
        raise ValueError(f"{logits.shape[0]} rows of logits, last_greedy holds {last_greedy.numel()}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows, V = logits.shape
    chunks = triton.cdiv(V, GREEDY_ARGMAX_CHUNK)
    pow2 = triton.next_power_of_2(chunks)
    greedy = torch.empty(rows, dtype=torch.long, device=logits.device)
    part_top = torch.empty(rows * pow2, dtype=torch.float32, device=logits.device)   # (no kernel: free in a graph)
    part_at = torch.empty(rows * pow2, dtype=torch.int32, device=logits.device)
    greedy_argmax_kernel[(rows, chunks)](logits, greedy, last_greedy, part_top, part_at,
                                         flash_attn._counters(logits.device, rows), V, logits.stride(0),
                                         BLOCK=GREEDY_ARGMAX_CHUNK, CHUNKS_POW2=pow2, num_warps=4,
                                         **M.pdl_launch_args())
    return greedy


# ---- The step's inputs and embedding, in one kernel ----------------------------------------------
#
# A decode step starts from the int32 inputs buffer (tokens, positions, slots, prev rows) and
# turns it into the first hidden state: cast the ids to int64, pick each row's token (the one
# given, or the previous step's argmax when the row feeds itself: prev row >= 0), look up the
# token's and the position's embedding rows and add them. In PyTorch that is 8 small kernels,
# which `bench.py --topic graphs` measured adding 16.5 us to a GPT-2 1.5B step and 16 us to
# 124M's (H200; 7% of the 124M step), for a few KB of data. One program per row does it all
# here: it writes the int64 ids the rest of the step reads (positions and slots: the KV store
# kernel takes int64 slots, whose offsets can pass 2^31 in an 80 GB pool; the fused decode
# attention takes the copied int32 row instead, since it reads it before its PDL wait, and
# widens the block index before the address arithmetic) and the embedded row,
# summed in fp32 and rounded once, as PyTorch's half-precision add does.
# Measured (H200, one process per tree, alternating twice, same greedy tokens): the 124M graph
# step 0.211 -> 0.199 ms (4,550-4,783 -> 5,055-5,140 tok/s), the 1.5B step 1.458 -> 1.452 ms.
@triton.jit
def decode_embed_kernel(ids_ptr, n_rows, last_ptr, tok_emb_ptr, pos_emb_ptr, x_ptr, ids_out_ptr, C,
                        HAS_POS: tl.constexpr, BLOCK_C: tl.constexpr, USE_PDL: tl.constexpr = False):
    if USE_PDL:
        tm.pdl_signal_then_wait()    # (the first kernel of a graph step: nothing before it in the chain)
    row = tl.program_id(0)
    given = tl.load(ids_ptr + row).to(tl.int64)
    pos = tl.load(ids_ptr + n_rows + row).to(tl.int64)
    slot = tl.load(ids_ptr + 2 * n_rows + row).to(tl.int64)
    prev = tl.load(ids_ptr + 3 * n_rows + row).to(tl.int64)
    fed = tl.load(last_ptr + tl.maximum(prev, 0))
    token = tl.where(prev >= 0, fed, given)
    offs = tl.arange(0, BLOCK_C)
    keep = offs < C
    x = tl.load(tok_emb_ptr + token * C + offs, mask=keep, other=0.0).to(tl.float32)
    if HAS_POS:
        x += tl.load(pos_emb_ptr + pos * C + offs, mask=keep, other=0.0).to(tl.float32)
    tl.store(x_ptr + row * C + offs, x.to(x_ptr.dtype.element_ty), mask=keep)
    tl.store(ids_out_ptr + row, token)
    tl.store(ids_out_ptr + n_rows + row, pos)
    tl.store(ids_out_ptr + 2 * n_rows + row, slot)
    tl.store(ids_out_ptr + 3 * n_rows + row, prev)


def decode_embed_reference(ids: torch.Tensor, last_greedy: torch.Tensor, tok_emb: torch.Tensor,
                           pos_emb: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (4, B) int32 (tokens, positions, slots, prev rows) -> (the same as int64 with each fed
    row's token taken from last_greedy, the embedded rows (B, C)). pos_emb None: token rows only
    (RoPE models)."""
    ids = ids.long()
    prev_rows = ids[3]
    ids[0] = torch.where(prev_rows >= 0, last_greedy[prev_rows.clamp(min=0)], ids[0])
    x = F.embedding(ids[0], tok_emb)
    if pos_emb is not None:
        x = x + F.embedding(ids[1], pos_emb)
    return ids, x


def decode_embed_triton(ids, last_greedy, tok_emb, pos_emb):
    """decode_embed_reference in one kernel, one program per row."""
    n_rows, C = ids.shape[1], tok_emb.shape[1]
    if not tok_emb.is_contiguous() or (pos_emb is not None and not pos_emb.is_contiguous()):
        raise ValueError("decode_embed_triton: the embedding tables must be contiguous (row stride C)")
    if last_greedy.dtype != torch.long or ids.dtype != torch.int32:
        raise ValueError(f"decode_embed_triton: ids int32 and last_greedy int64 expected, got {ids.dtype}, "
                         f"{last_greedy.dtype}")
    ids = ids.contiguous()
    out_ids = torch.empty(ids.shape, dtype=torch.long, device=ids.device)
    x = torch.empty(n_rows, C, dtype=tok_emb.dtype, device=ids.device)
    block = triton.next_power_of_2(C)
    decode_embed_kernel[(n_rows,)](ids, n_rows, last_greedy, tok_emb, tok_emb if pos_emb is None else pos_emb,
                                   x, out_ids, C, HAS_POS=pos_emb is not None, BLOCK_C=block,
                                   num_warps=4 if block <= 2048 else 8, **M.pdl_launch_args())
    return out_ids, x


# torch.compile and our Triton kernels. Inductor re-compiles a user Triton kernel it traces
# into its own graph, and with the paged-decode kernel's fp32 accumulator that fails (Triton 3.6 + torch
# 2.11: "acc.type.element_ty == out_dtype" in tl.dot). Registering the two calls as custom ops
# makes them opaque: Inductor fuses everything around them and calls them as they are.
@torch.library.custom_op("waveboost::store_kv", mutates_args=("k_pool", "v_pool"))
def store_kv_op(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                slot_mapping: torch.Tensor) -> None:
    store_kv_triton(k_pool, v_pool, k, v, slot_mapping)


@torch.library.custom_op("waveboost::paged_decode", mutates_args=())
def paged_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    context_lens: torch.Tensor, max_context: int) -> torch.Tensor:
    return flash_attn.paged_decode(q, k_cache, v_cache, block_table, context_lens, max_context=max_context)


@paged_decode_op.register_fake
def _paged_decode_shape(q, k_cache, v_cache, block_table, context_lens, max_context):
    return torch.empty_like(q)


class CompiledKernels:
    """flash_attn's interface (what PagedStep calls) through the custom ops above."""
    @staticmethod
    def paged_decode(q, k_cache, v_cache, block_table, context_lens, max_context):
        return paged_decode_op(q, k_cache, v_cache, block_table, context_lens, max_context)

    flash_attn_varlen = staticmethod(flash_attn.flash_attn_varlen)   # prefill is never compiled


class FusedDecodeOps(M.TorchOps):
    """model.TorchOps for steps of a few rows (decode), as triton_matmul.py's kernels: one GEMV
    kernel per linear layer with the norm in front of it, its bias, GELU and residual add fused
    in (the final norm, with no linear of its own here, is one row_norm kernel).
    Why: at batch 1 a GPT-2 1.5B decode step is ~650 kernels, and on the H200 the cuBLAS M=1
    GEMMs ran at ~2 TB/s of the ~4.2 the card can stream, torch's LayerNorm took 5 us for one row
    of 1600 (one thread block per row), plus separate bias-free GELU and residual-add kernels.
    Measured on the H200 (GPT-2 1.5B, batch 1, one decode step as a CUDA graph): 2.68 -> 1.84 ms,
    633 -> 441 kernels; in a second run, 1.84 -> 1.68 ms once these kernels (and the attention
    ones) also use programmatic dependent launch (model.pdl_launch_args).
    On an H100 (one run), folding the norms into single-shot GEMVs took the 1.5B step from 2.06
    to 1.86 ms (triton_matmul.py, "Prefetch across the kernel boundary").
    On a Hopper GPU the single-row linears with a norm folded in (qkv, mlp fc) take v6's
    gemv_tma instead (its weight tile in shared memory through TMA: GPT-2 1.5B's step 1.42 ->
    1.32 ms on the H200; triton_matmul.gemv_tma_config says which; mlp fc applies its norm
    after the dot products, gemv_tma_defers_norm).
    Only single-row linears take the GEMV: its several-row path (an M x N x K product tile per step) made a batch-8 step 7x slower than cuBLAS (20.6 vs 3.0 ms), so more
    rows go to PyTorch, where cuBLAS's tiled GEMMs win. Norms likewise take the kernel for one
    row (the case measured: 4.3 -> 2.2 us for LayerNorm, gemv.md)."""

    @staticmethod
    def linear(x, weight, bias=None, activation=None, residual=None, norm=None):
        rows = x.numel() // x.shape[-1]
        if rows != 1:
            return M.TorchOps.linear(x, weight, bias, activation, residual, norm)
        folded = {} if norm is None else M.norm_kernel_args(norm)   # the norm in front, in the GEMV
        tma = tm.gemv_tma_supported(x, weight) and tm.gemv_tma_config(*weight.shape, norm is not None,
                                                                       residual is not None, weight.element_size())
        if tma:     # Hopper: the weight tile through TMA into shared memory (triton_matmul.py, v6)
            return tm.gemv_tma(x, weight, bias, activation, residual, **folded, block_n=tma[0], num_warps=tma[1])
        return tm.gemv(x, weight, bias, activation=activation, residual=residual, **folded)

    @staticmethod
    def norm(x, module):
        rows = x.numel() // x.shape[-1]
        if rows != 1:
            return module(x)
        a = M.norm_kernel_args(module)
        return tm.row_norm(x, a["norm_weight"], a["norm_bias"], eps=a["norm_eps"], rms=a["norm"] == "rms")


@contextlib.contextmanager
def _no_garbage_collection():
    """Python's cycle collector kept out of a CUDA-graph capture. It runs whenever enough objects
    were allocated, and a capture allocates many; if it then frees a dead engine still caught in
    a reference cycle, that engine's CUDA graphs are destroyed in the middle of this capture,
    which CUDA refuses ("operation not permitted when stream is capturing", in CUDAGraph.reset)
    and which invalidates the capture. torch.cuda.graph no longer collects before capturing
    (torch 2.11), so we do: once before, then none during. Seen on an H200 (2026-11-28) when a
    bench built an engine right after dropping four others."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass
class PagedStep:
    """Everything attention needs for one engine step (the explicit batch metadata).

    prefill: q/k/v arrive packed as (1, H, N, D) for all N new tokens of the step;
      cu_seqlens_q (n+1,) delimits each sequence's new tokens, seq_lens (n,) its full length
      (cached prefix included), block_tables (n, max_blocks).
    decode: q/k/v are (B, H, 1, D); seq_lens (B,) includes the new token.
    slot_mapping (N,): where each new token's K/V go (-1 = a padded row: nowhere any sequence reads).
    """
    kind: str
    k_pool: torch.Tensor                 # (n_layer, num_blocks + 1, block_size, Hkv, D): + a trash block
    v_pool: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor           # int32 (n, max_blocks)
    seq_lens: torch.Tensor               # int32 (n,)
    cu_seqlens_q: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    has_prefix: bool = False             # some sequence reuses cached blocks
    kernels: object = None               # flash_attn module on GPU, None = PyTorch reference
    store_kv: object = store_kv_reference
    new_kv_in_decode: bool = False       # decode: kernels.paged_decode stores the new K/V itself

    def attend(self, layer, q, k, v, positions):
        k_pool, v_pool = self.k_pool[layer], self.v_pool[layer]
        if self.kind == "decode":
            q1, k1, v1 = q[:, :, 0], k[:, :, 0], v[:, :, 0]               # (B, H, D), (B, Hkv, D)
            if self.new_kv_in_decode:     # the kernel takes the new token from k1/v1 and stores it
                out = self.kernels.paged_decode(q1, k_pool, v_pool, self.block_tables, self.seq_lens,
                                                max_context=self.max_seqlen_k,
                                                new_kv=(k1, v1, self.slot_mapping))
                return out[:, :, None]
            self.store_kv(k_pool, v_pool, k1, v1, self.slot_mapping)
            if self.kernels is not None:
                out = self.kernels.paged_decode(q1, k_pool, v_pool, self.block_tables, self.seq_lens,
                                                max_context=self.max_seqlen_k)
            else:
                out = paged_decode_torch(q1, k_pool, v_pool, self.block_tables, self.seq_lens)
            return out[:, :, None]
        # prefill: (1, H, N, D) -> (N, H, D)
        qn, kn, vn = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1)
        self.store_kv(k_pool, v_pool, kn, vn, self.slot_mapping)
        if self.kernels is not None and not self.has_prefix:
            out = self.kernels.flash_attn_varlen(qn.contiguous(), kn, vn,
                                                 self.cu_seqlens_q, self.max_seqlen_q, causal=True)
        else:
            out = paged_prefill_torch(qn, k_pool, v_pool, self.block_tables, self.seq_lens,
                                      self.cu_seqlens_q)
        return out.transpose(0, 1)[None]


def gather_kv(pool, block_table, n_tokens):
    """One sequence's first n_tokens K (or V) rows from the pool: (Hkv, n_tokens, D)."""
    blocks = pool[block_table[:math.ceil(n_tokens / pool.shape[1])]]      # (nb, bs, Hkv, D)
    return blocks.reshape(-1, *pool.shape[2:])[:n_tokens].transpose(0, 1)


def paged_prefill_torch(q, k_pool, v_pool, block_tables, seq_lens, cu_seqlens_q):
    """Reference prefill: per sequence, its new queries against all its keys (cached prefix
    included), bottom-right causal. q: (N, H, D) -> (N, H, D)."""
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for i, total in enumerate(seq_lens.tolist()):
        s, e = bounds[i], bounds[i + 1]
        keys, values = gather_kv(k_pool, block_tables[i], total), gather_kv(v_pool, block_tables[i], total)
        qi = q[s:e].transpose(0, 1)                                       # (H, n_new, D)
        visible = (torch.arange(total, device=q.device)[None, :]
                   <= torch.arange(total - (e - s), total, device=q.device)[:, None])
        o = F.scaled_dot_product_attention(qi[None], keys[None], values[None], attn_mask=visible,
                                           enable_gqa=keys.shape[0] != qi.shape[0])
        out[s:e] = o[0].transpose(0, 1)
    return out


def paged_decode_torch(q, k_pool, v_pool, block_tables, seq_lens):
    """Reference decode, vectorised (so it can be captured in a CUDA graph too): gather every
    sequence's blocks, mask slots past its length. q: (B, H, D) -> (B, H, D)."""
    B, max_blocks = block_tables.shape
    bs = k_pool.shape[1]
    blocks = block_tables.long()
    keys = k_pool[blocks].reshape(B, max_blocks * bs, *k_pool.shape[2:]).transpose(1, 2)
    values = v_pool[blocks].reshape(B, max_blocks * bs, *v_pool.shape[2:]).transpose(1, 2)
    visible = torch.arange(max_blocks * bs, device=q.device)[None, :] < seq_lens[:, None]
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=visible[:, None, None, :],
                                         enable_gqa=keys.shape[1] != q.shape[1])
    return out[:, :, 0]


# ----------------------------------------------------------------------------------------------
# 5. The model runner: inputs, forward, CUDA graphs, sampling
# ----------------------------------------------------------------------------------------------

def _knob(default, help: str):
    """A config field with its --help text (read by add_config_args)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class EngineConfig:
    """Every engine knob, with its default. The CLI is generated from this dataclass."""
    model: str = _knob("smollm2", "anything model.load_model accepts: smollm2, a .gguf path, gpt2, "
                       "a Hugging Face GPT-2 folder, random:<preset> (given a model object, the "
                       "engine loads nothing and this is only the name /v1/models reports)")
    device: str = _knob("cuda" if torch.cuda.is_available() else "cpu", "where the model runs")
    dtype: str = _knob("auto", "auto = float16 on cuda, float32 on cpu; or float32/float16/bfloat16")
    block_size: int = _knob(16, "tokens per KV block (the Triton kernels need a power of two >= 16)")
    num_blocks: int = _knob(0, "KV blocks in the pool; 0 = size it from memory")
    gpu_memory_fraction: float = _knob(0.85, "share of the GPU the engine may fill with weights, "
                                       "peak activations and the KV pool (when num_blocks is 0)")
    cpu_kv_gib: float = _knob(0.25, "KV pool size on CPU when num_blocks is 0")
    max_num_seqs: int = _knob(256, "most sequences running at once (= the largest decode batch)")
    max_num_batched_tokens: int = _knob(8192, "token budget of one prefill step (at least the model's "
                                        "context: a sequence is prefilled in one step, no chunking)")
    prefix_caching: bool = _knob(True, "reuse KV blocks of identical prompt prefixes")
    cuda_graphs: bool = _knob(True, "replay decode steps from CUDA graphs (GPU only)")
    compile: bool = _knob(False, "torch.compile the decode forward (Inductor fuses the norms, adds and "
                          "activations itself; the fused Triton decode ops are then not used)")
    kernels: str = _knob("auto", "auto = Triton (flash_attn.py) on cuda, PyTorch on cpu; or triton/torch")
    fused_ops: bool = _knob(True, "single-sequence decode steps run linear layers and norms as "
                            "triton_matmul.py's GEMV kernels (norm, bias, GELU and residual "
                            "fused) when the Triton kernels are on")
    async_decode: bool = _knob(True, "queue decode step n+1 before reading step n's tokens back (greedy "
                               "batches only: on the CLI pass --temperature 0; the next token is fed "
                               "on the device), so the host's work overlaps the GPU's")
    store_kv_in_attention: bool = _knob(True, "decode steps write each new token's K/V to the cache inside "
                                        "the paged-decode kernel instead of a store kernel before it "
                                        "(Triton kernels without --compile: one launch fewer per layer)")

    def __post_init__(self):
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda (or cuda:N), got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}, but torch sees no CUDA GPU here: use cpu")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {self.device!r}, but torch sees {torch.cuda.device_count()} GPU(s)")
        self.device = str(device)        # a torch.device is accepted too; the engine reads a string
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if self.num_blocks < 0:
            raise ValueError("num_blocks must be >= 0 (0 = size the pool from memory)")
        if self.cpu_kv_gib <= 0:
            raise ValueError("cpu_kv_gib must be > 0")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError("gpu_memory_fraction must be in (0, 1]")
        if self.kernels not in ("auto", "triton", "torch"):
            raise ValueError("kernels must be auto, triton or torch")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.uses_triton and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise ValueError(f"block_size {self.block_size}: the Triton kernels need a power of two "
                             f">= 16 (or use --kernels torch)")

    @property
    def uses_triton(self) -> bool:
        return self.kernels == "triton" or (self.kernels == "auto" and self.device.startswith("cuda"))

    @property
    def uses_fused_ops(self) -> bool:
        return self.fused_ops and self.uses_triton and not self.compile

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return M.default_dtype(self.device)
        return getattr(torch, self.dtype)


GRAPH_BATCH_SIZES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512]


# The inputs of one graph-replayed decode step live in ONE flat int32 buffer, cut into segments for
# a batch of bs rows (each segment 16-byte aligned, as a separate allocation would be: Triton and
# Inductor specialise kernels on pointer alignment):
#     ids (4, bs): token, position, slot, prev_rows of each row | seq_lens (bs,) | block_tables (bs, width)
# The same cut gives views of the pinned host staging buffer (numpy, filled in place) and of the
# device buffer the graph reads (torch): one copy moves a whole step's inputs across.

def _align4(n: int) -> int:
    return -(-n // 4) * 4


def decode_buffer_size(bs: int, width: int) -> int:
    """int32 elements of a bs-row batch's inputs (decode_buffer_views), block tables width wide."""
    return _align4(_align4(4 * bs) + bs) + bs * width


def decode_buffer_views(buf, bs: int, width: int) -> dict:
    """Views of a bs-row batch's decode inputs in the flat int32 buffer buf (numpy or torch)."""
    lens_at = _align4(4 * bs)
    tables_at = _align4(lens_at + bs)
    return {"ids": buf[:4 * bs].reshape(4, bs), "seq_lens": buf[lens_at:lens_at + bs],
            "block_tables": buf[tables_at:tables_at + bs * width].reshape(bs, width)}


_PADDING_ROW = np.array([[0], [0], [-1], [-1]])   # token 0, position 0, slot -1, prev_rows -1


def fill_decode_inputs(views: dict, seqs: list[Sequence], block_size: int,
                       prev_rows: list[int] | None = None) -> None:
    """Write a decode step's inputs into numpy views (decode_buffer_views) in place, with plain
    numpy: no PyTorch op, no device call. Row i is seqs[i]'s newest token: its id, its position
    len - 1, the slot its K/V go to, where the id really comes from (prev_rows[i] >= 0: that row
    of the previous step's argmax, still on the device; -1: the id given here), the length len
    and the block table. Rows past len(seqs) are the bucket's padding: token 0, position 0,
    slot -1 (writes no sequence's K/V), length 1 and an all-zero block table (reads one slot of block 0,
    harmlessly; the row's logits are dropped)."""
    B = len(seqs)
    ids, seq_lens, tables = views["ids"], views["seq_lens"], views["block_tables"]
    tables.fill(0)
    for i, s in enumerate(seqs):
        tables[i, :len(s.block_table)] = s.block_table
    lens = np.fromiter(map(len, seqs), dtype=np.int64, count=B)
    pos = lens - 1
    ids[0, :B] = [s.last_token for s in seqs]
    ids[1, :B] = pos
    ids[2, :B] = tables[np.arange(B), pos // block_size] * block_size + pos % block_size
    ids[3, :B] = -1 if prev_rows is None else prev_rows
    ids[:, B:] = _PADDING_ROW
    seq_lens[:B] = lens
    seq_lens[B:] = 1


@dataclass
class DecodeGraph:
    """One captured decode step (a batch-size bucket) and the buffers its inputs travel through."""
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor         # (bs, vocab), rewritten by every replay
    greedy: torch.Tensor         # (bs,) int64: logits.argmax(-1), captured in the same graph
    staging: dict                # numpy views of the pinned host buffer, in this bucket's layout
    host: torch.Tensor           # the pinned host region those views cover ...
    device: torch.Tensor         # ... and the device region the graph reads, same layout


class ModelRunner:
    """Owns the model, the KV pool and the decode graphs; turns a ScheduledStep into logits."""

    def __init__(self, model: M.Transformer, cfg: EngineConfig, num_blocks: int):
        self.model, self.cfg = model, cfg
        mc = model.cfg
        self.device, self.dtype = model.device, model.dtype
        self.block_size = cfg.block_size
        self.max_blocks_per_seq = math.ceil(mc.max_seq_len / cfg.block_size)
        # + 1: the trash block padded rows write into (store_kv_reference), owned by no sequence
        shape = (mc.n_layer, num_blocks + 1, cfg.block_size, mc.kv_heads, mc.head_dim)
        # zeros, not empty: a masked-out slot still enters the attention as 0 * value, and an
        # uninitialised NaN there would turn the whole row into NaN
        self.k_pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.kernels, self.store_kv, self.greedy_argmax = None, store_kv_reference, greedy_argmax_reference
        self.decode_embed = decode_embed_reference
        if cfg.uses_triton:
            self.kernels, self.store_kv, self.greedy_argmax = flash_attn, store_kv_triton, greedy_argmax_triton
            self.decode_embed = decode_embed_triton
            if cfg.compile:
                self.kernels, self.store_kv = CompiledKernels, store_kv_op
        # (the compiled path keeps the separate store: its custom op does not mutate the pools)
        self.new_kv_in_decode = cfg.uses_triton and not cfg.compile and cfg.store_kv_in_attention
        self.decode_ops = FusedDecodeOps if cfg.uses_fused_ops else M.TorchOps
        self.decode_forward = self._decode_forward
        if cfg.compile:
            # compile in this process: Inductor's worker subprocesses hide the real error of a
            # failing compile behind "SubprocException" (seen with the Triton kernels inside)
            import torch._inductor.config as inductor_config
            inductor_config.compile_threads = 1
            # dynamic=None (the default): the first recompile (a new batch size) marks the batch
            # dimension dynamic, so the graph buckets do not each recompile (dynamo gives up after 8)
            self.decode_forward = torch.compile(self._decode_forward)
        # every decode step leaves its argmax here, where the next step can take its input ids
        # from without a trip through the host (fill_decode_inputs' prev_rows; LLMEngine.step)
        self.last_greedy = torch.zeros(cfg.max_num_seqs, dtype=torch.long, device=self.device)
        # two pinned host buffers for the tokens of the step being read back and the one after it
        self.token_buffers = [torch.zeros(cfg.max_num_seqs, dtype=torch.long,
                                          pin_memory=self.device.type == "cuda") for _ in range(2)]
        self.token_events = [torch.cuda.Event() if self.device.type == "cuda" else None for _ in range(2)]
        self.next_token_buffer = 0
        self.graphs: dict[int, DecodeGraph] = {}
        self.graph_sizes: list[int] = []               # sorted(self.graphs)
        if cfg.cuda_graphs and self.device.type == "cuda":
            self.capture_graphs()

    # -- inputs ----------------------------------------------------------------------------------
    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs = self.block_size
        return [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def _block_tables(self, seqs):
        width = max(len(s.block_table) for s in seqs)
        return torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs],
                            dtype=torch.int32, device=self.device)

    def _step(self, kind, slot_mapping, block_tables, seq_lens, **kw) -> PagedStep:
        return PagedStep(kind, self.k_pool, self.v_pool, slot_mapping, block_tables, seq_lens,
                         kernels=self.kernels, store_kv=self.store_kv, new_kv_in_decode=self.new_kv_in_decode,
                         **kw)

    # -- prefill ---------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """All new tokens of all sequences as ONE packed row (1, N): no padding at all.
        Returns the logits of each sequence's last token (n, vocab)."""
        ids, positions, slots, cu = [], [], [], [0]
        for s in seqs:
            ids += s.tokens[s.num_cached:]
            positions += range(s.num_cached, len(s))
            slots += self._slots(s, s.num_cached, len(s))
            cu.append(cu[-1] + len(s) - s.num_cached)
        dev = self.device
        step = self._step("prefill", torch.tensor(slots, device=dev), self._block_tables(seqs),
                          torch.tensor([len(s) for s in seqs], dtype=torch.int32, device=dev),
                          cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
                          max_seqlen_q=max(len(s) - s.num_cached for s in seqs),
                          max_seqlen_k=max(len(s) for s in seqs),
                          has_prefix=any(s.num_cached for s in seqs))
        h = self.model.hidden(torch.tensor([ids], device=dev), torch.tensor([positions], device=dev), step)
        last = step.cu_seqlens_q[1:].long() - 1        # already on the device
        return self.model.logits(h[0, last])

    # -- decode ----------------------------------------------------------------------------------
    def _decode_forward(self, tokens, positions, step: PagedStep, embedded=None):
        ops = self.decode_ops
        return self.model.logits(self.model.hidden(tokens, positions, step, ops, embedded)[:, -1], ops)

    @torch.no_grad()
    def decode(self, seqs: list[Sequence], prev_rows: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per sequence: (B,) -> logits (B, vocab) and their argmax (B,), both on the
        device (see sample()). prev_rows: see fill_decode_inputs."""
        B = len(seqs)
        graph_bs = next((b for b in self.graph_sizes if b >= B), None)
        if graph_bs is not None:
            return self._replay(graph_bs, seqs, prev_rows)
        # eager (no graph for this size): the same inputs as a graph step, in one fresh buffer
        width = max(len(s.block_table) for s in seqs)
        buf = np.empty(decode_buffer_size(B, width), dtype=np.int32)
        fill_decode_inputs(decode_buffer_views(buf, B, width), seqs, self.block_size, prev_rows)
        # an upper bound of the lengths, rounded up to a power of two: the kernel sizes its splits
        # from it, and a bound that changed every step would re-specialise (and re-compile) it
        bound = min(self.model.cfg.max_seq_len, triton.next_power_of_2(max(map(len, seqs))))
        return self._graph_step(decode_buffer_views(torch.from_numpy(buf).to(self.device), B, width), bound)

    # -- CUDA graphs -----------------------------------------------------------------------------
    # A decode step of GPT-2 124M is ~160 kernel launches of a few microseconds each: at batch 1
    # the GPU finishes each kernel before the CPU has issued the next, so the step takes as long
    # as Python + launch overhead (on the H200 machine of results/graphs.md: 5.3 ms per eager
    # step for ~0.5 ms of GPU work; 0.53 ms as a graph). A CUDA graph records the whole step once
    # and replays it with ONE launch. The price: shapes and addresses are frozen, so we capture
    # one graph per batch-size bucket, keep all inputs in static buffers, and pad a batch up to
    # the next bucket. Padded rows get slot -1 (they write only the trash block), length 1 and an
    # all-zero block table (they read one slot of block 0, harmlessly); their logits are dropped.
    #
    # With the launches gone, what is left on the host is the step's bookkeeping, and at batch 1
    # it is the critical path. Feeding the graph's inputs one tensor at a time took ~13 PyTorch
    # calls per step (5 torch.tensor(...) H2D copies from pageable memory, 5 slice copies, 2 fill_,
    # a zero_), plus an argmax launch in sample(): at ~50 us each on the H200 machine's host, about
    # 0.7 ms, more than the GPU's ~0.5 ms of work. Now all the inputs are views of ONE int32 device
    # buffer (decode_buffer_views), filled on the host with numpy in a pinned staging buffer of the
    # same layout and moved by ONE asynchronous copy; the greedy argmax is captured in the graph,
    # so an all-greedy step reads back B token ids with one small copy and launches nothing else.
    # Expected: ~15 PyTorch calls on the host per step -> 3 (copy, replay, read-back; plus an
    # event record and wait of a few us), i.e. ~0.5 ms less host time per step on that machine.
    # The numpy fill is ~10 us at batch 1, ~50 at batch 32 (the old lists + torch.tensor: 18, 134).
    # Measured on a later H200 machine with a faster host (GPT-2 124M fp16, context 512, same
    # tokens before and after): per step, CUDA runtime calls went from 11 memcpy + 6 stream syncs
    # + 4 launches to 2 memcpy + 1 sync; engine.step() 0.72-0.84 -> 0.66-0.67 ms at batch 1 and
    # 1.38-1.40 -> 1.10 ms at batch 32 (two runs); the host time to issue decode() 0.15-0.23 ->
    # 0.06-0.12 ms at batch 1 and 0.37 -> 0.15 ms at batch 32.
    # The int32 -> int64 casts the model and the KV store want (embedding and RoPE indices; slots,
    # for index_copy_ and for 64-bit slot offsets) are one kernel inside the graph: GPU microseconds.
    @torch.no_grad()
    def capture_graphs(self):
        dev, width = self.device, self.max_blocks_per_seq
        sizes = [b for b in GRAPH_BATCH_SIZES if b <= self.cfg.max_num_seqs]
        if not sizes or sizes[-1] < self.cfg.max_num_seqs:
            sizes.append(self.cfg.max_num_seqs)
        n = decode_buffer_size(sizes[-1], width)            # the largest bucket's layout is longest
        device_buf = torch.zeros(n, dtype=torch.int32, device=dev)
        host_buf = torch.zeros(n, dtype=torch.int32, pin_memory=True)
        host_np = host_buf.numpy()                          # shares host_buf's memory
        # "the pinned buffer's last copy has left": set after each copy is queued, waited on before
        # the host rewrites the buffer (a copy from pinned memory runs asynchronously, later)
        self.inputs_copied = torch.cuda.Event()
        pool = None
        for bs in reversed(sizes):                      # largest first: the pool fits all later ones
            size = decode_buffer_size(bs, width)
            g = DecodeGraph(None, None, None, decode_buffer_views(host_np, bs, width),
                            host_buf[:size], device_buf[:size])
            fill_decode_inputs(g.staging, [], self.block_size)      # all rows padding ...
            # ... but at the full context (an all-zero block table reads block 0 over and over,
            # harmlessly; slot -1 writes no sequence's K/V): the attention kernel's autotuner times its
            # configs on these inputs, and on 1-token contexts every config looks the same, so it
            # would keep an arbitrary one, possibly a slow one for real contexts
            g.staging["seq_lens"][:] = self.model.cfg.max_seq_len
            g.device.copy_(g.host)
            inputs = decode_buffer_views(g.device, bs, width)
            for _ in range(2):                          # warm up: autotune, compile, allocate
                self._graph_step(inputs, self.model.cfg.max_seq_len)
            torch.cuda.synchronize()
            g.graph = torch.cuda.CUDAGraph()
            with _no_garbage_collection(), torch.cuda.graph(g.graph, pool=pool):
                g.logits, g.greedy = self._graph_step(inputs, self.model.cfg.max_seq_len)
            pool = g.graph.pool()
            self.graphs[bs] = g
        self.graph_sizes = sorted(self.graphs)
        torch.cuda.synchronize()

    def _graph_step(self, inputs: dict, max_seqlen_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step (the one a graph captures): int32 inputs (device views of
        decode_buffer_views) -> logits and their argmax. max_seqlen_k: an upper bound of the
        lengths (graphs: the model's context, since a graph outlives any one step)."""
        model = self.model
        pos_emb = model.pos_emb.weight if model.pos_emb is not None else None
        # (4, bs) int64: tokens (fed-back rows resolved), positions, slots, prev rows; x (bs, C)
        ids, x = self.decode_embed(inputs["ids"], self.last_greedy, model.tok_emb.weight, pos_emb)
        # the fused decode attention reads each row's slot before its PDL wait, so it gets them from
        # the host-copied inputs (written by no kernel of the step), not from decode_embed's copy
        slots = inputs["ids"][2] if self.new_kv_in_decode else ids[2]
        step = self._step("decode", slots, inputs["block_tables"], inputs["seq_lens"],
                          max_seqlen_k=max_seqlen_k)
        logits = self.decode_forward(ids[0][:, None], ids[1][:, None], step, x[:, None])
        greedy = self.greedy_argmax(logits, self.last_greedy)   # also what the next step may feed itself
        return logits, greedy

    def _replay(self, bs: int, seqs: list[Sequence], prev_rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        g, B = self.graphs[bs], len(seqs)
        # Never rewrite the pinned buffer while the last step's copy out of it may still be
        # queued. In the engine the wait is short: the pending copy holds the inputs of the step
        # in flight, queued right behind the step whose tokens the engine has already read back
        # (async decode runs at most one step ahead). A caller replaying back to back (bench.py)
        # waits here for at most the previous step's copy: at most one step ahead of the GPU.
        self.inputs_copied.synchronize()
        fill_decode_inputs(g.staging, seqs, self.block_size, prev_rows)
        g.device.copy_(g.host, non_blocking=True)       # ONE H2D copy: (4 + width) * bs * 4 bytes
        self.inputs_copied.record()
        g.graph.replay()
        return g.logits[:B], g.greedy[:B]

    def start_token_copy(self, greedy: torch.Tensor):
        """Queue the copy of a step's tokens to the host; returns what finish_token_copy takes.
        Two pinned buffers in turn: the step being read back and the one queued after it."""
        i, self.next_token_buffer = self.next_token_buffer, 1 - self.next_token_buffer
        host = self.token_buffers[i][:len(greedy)]
        host.copy_(greedy, non_blocking=True)
        if self.token_events[i] is not None:
            self.token_events[i].record()
        return host, self.token_events[i]

    @staticmethod
    def finish_token_copy(copy) -> list[int]:
        """Wait for a start_token_copy (only for that step, not for later queued work)."""
        host, event = copy
        if event is not None:
            event.synchronize()
        return host.tolist()

    # -- sampling --------------------------------------------------------------------------------
    @staticmethod
    def sample(logits: torch.Tensor, seqs: list[Sequence], greedy: torch.Tensor | None = None) -> list[int]:
        """Greedy rows in one argmax; sampled rows one by one with their own seeded generator
        (so a request's draws do not depend on what else is in the batch). greedy: logits'
        argmax if already computed (decode's), which saves a launch: an all-greedy
        batch then costs one small device-to-host copy."""
        out = (logits.argmax(dim=-1) if greedy is None else greedy).tolist()
        for i, s in enumerate(seqs):
            p = s.params
            if p.temperature > 0:
                out[i] = int(M.sample(logits[i:i + 1], p.temperature, p.top_k, p.top_p, s.generator))
        return out


# ----------------------------------------------------------------------------------------------
# 6. The engine
# ----------------------------------------------------------------------------------------------

@dataclass
class RequestOutput:
    id: int
    prompt: list[int]
    tokens: list[int]
    text: str | None
    finish_reason: str
    ttft_s: float
    latency_s: float


class LLMEngine:
    """add_request() / step() / generate() / stream(): the user-facing engine."""

    def __init__(self, cfg: EngineConfig, model: M.Transformer | None = None, tokenizer=None,
                 eos_id: int | None = None):
        self.cfg = cfg
        dev = torch.device(cfg.device)
        if model is None:
            model, tokenizer = M.load_model(cfg.model, cfg.torch_dtype, dev), M.tokenizer_for(cfg.model)
        if model.device.type != dev.type:
            # the config picks the kernels (Triton or PyTorch); the model's tensors must match it
            raise ValueError(f"the model is on {model.device} but EngineConfig.device is {cfg.device!r}")
        if cfg.max_num_batched_tokens < model.cfg.max_seq_len:
            # a preempted sequence is re-prefilled whole (prompt + output, up to the context) in one
            # step; without chunked prefill a smaller budget could leave it unschedulable forever
            raise ValueError(f"max_num_batched_tokens ({cfg.max_num_batched_tokens}) must be >= the "
                             f"model's context ({model.cfg.max_seq_len}): this engine prefills a whole "
                             f"sequence in one step (no chunked prefill)")
        model.requires_grad_(False)              # inference only: no autograd state, ever
        self.model, self.tokenizer = model.eval(), tokenizer
        self.eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eot_token", None)
        self.weight_bytes = sum(p.nbytes for p in model.parameters())
        self.block_bytes = cfg.block_size * M.kv_bytes_per_token(model.cfg, model.dtype)
        self.peak_activation_bytes = 0
        num_blocks = cfg.num_blocks or self._size_kv_pool()
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.prefix_caching)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, cfg, num_blocks)
        self.seqs: dict[int, Sequence] = {}
        self.next_id = 0
        self.steps = {"prefill": 0, "decode": 0}
        self.in_flight: tuple | None = None      # (seqs, token copy) of a queued decode step
        self.steps_ahead = 0                     # decode steps queued before the previous one's tokens
        self.num_generated = 0                   # tokens handed out

    # -- memory ----------------------------------------------------------------------------------
    def _size_kv_pool(self) -> int:
        """KV blocks that fit: (GPU memory * fraction - weights - peak activations) / block bytes.
        The peak comes from a worst-case warm-up: a prefill of max_num_batched_tokens tokens."""
        dev = torch.device(self.cfg.device)
        if dev.type != "cuda":
            return max(1, int(self.cfg.cpu_kv_gib * 2**30) // self.block_bytes)
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        n = min(self.cfg.max_num_batched_tokens, self.model.cfg.max_seq_len)
        rows = max(1, self.cfg.max_num_batched_tokens // n)
        with torch.no_grad():
            tokens = torch.zeros(rows, n, dtype=torch.long, device=dev)
            self.model.logits(self.model.hidden(tokens)[:, -1])
        torch.cuda.synchronize(dev)
        self.peak_activation_bytes = torch.cuda.max_memory_allocated(dev) - before
        total = torch.cuda.get_device_properties(dev).total_memory
        free_for_kv = total * self.cfg.gpu_memory_fraction - torch.cuda.memory_allocated(dev) \
            - self.peak_activation_bytes
        if free_for_kv < self.block_bytes:
            raise RuntimeError(f"no memory left for the KV cache: weights {self.weight_bytes / 2**30:.2f} GiB, "
                               f"peak activations {self.peak_activation_bytes / 2**30:.2f} GiB; raise "
                               f"--gpu-memory-fraction or lower --max-num-batched-tokens")
        return int(free_for_kv // self.block_bytes)

    def memory_report(self) -> dict:
        r = {"weights_GiB": self.weight_bytes / 2**30,
             "kv_pool_GiB": self.blocks.num_blocks * self.block_bytes / 2**30,
             "kv_blocks": self.blocks.num_blocks, "kv_blocks_in_use": self.blocks.blocks_in_use(),
             "kv_tokens_capacity": self.blocks.num_blocks * self.cfg.block_size,
             "peak_activations_GiB": self.peak_activation_bytes / 2**30}
        if self.cfg.device.startswith("cuda"):
            r["cuda_allocated_GiB"] = torch.cuda.memory_allocated() / 2**30
            r["cuda_peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        return r

    # -- requests --------------------------------------------------------------------------------
    def check_request(self, prompt: list[int] | str, params: SamplingParams) -> list[int]:
        """The prompt as token ids, or a ValueError saying why this request can never run: an
        empty prompt, one past the context or the KV pool, out-of-vocabulary ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids instead")
            prompt = self.tokenizer.encode_ordinary(prompt)   # "<|endoftext|>" in a prompt is text
        prompt = list(prompt)
        M.check_request(self.model.cfg, prompt, params.max_tokens)   # empty, past the context
        if not all(_is_int(t) for t in prompt):
            raise ValueError("prompt token ids must be integers")
        if min(prompt) < 0 or max(prompt) >= self.model.cfg.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.model.cfg.vocab_size})")
        if len(prompt) + params.max_tokens > self.blocks.num_blocks * self.cfg.block_size:
            raise ValueError(f"this request alone does not fit the KV pool: prompt {len(prompt)} + max_tokens "
                             f"{params.max_tokens} tokens > {self.blocks.num_blocks} blocks x {self.cfg.block_size}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        return [int(t) for t in prompt]

    def add_request(self, prompt: list[int] | str, params: SamplingParams | None = None) -> int:
        """Validate and queue a request; returns its id. A bad request raises ValueError before
        anything is queued (the sampling parameters were already checked by SamplingParams)."""
        params = params or SamplingParams()
        return self._enqueue(self.check_request(prompt, params), params)

    def _enqueue(self, prompt_ids: list[int], params: SamplingParams, live_text: bool = False) -> int:
        """Queue an already checked request. Its text is kept up to date token by token where
        something reads it before the end (stop strings, or live_text: a stream)."""
        seq = Sequence(self.next_id, prompt_ids, params, self.model.device)
        if params.stop or live_text:
            seq.detok = M.IncrementalText(self.tokenizer)
        self.next_id += 1
        self.seqs[seq.id] = seq
        self.scheduler.add(seq)
        return seq.id

    def abort(self, request_id: int) -> None:
        """Drop a request wherever it is (waiting, running or finished): its blocks are freed."""
        if request_id not in self.seqs:
            raise KeyError(f"no request {request_id} (already returned by generate, or never added)")
        seq = self.seqs.pop(request_id)
        if seq.status != "finished":
            self.scheduler.finish(seq, "abort")
        self._drop_finished_in_flight()

    def _drop_finished_in_flight(self) -> None:
        """A queued decode step (async_decode, below) whose rows have all finished (aborted, or
        stopped by EOS or a stop string after it was queued) has nothing left to deliver: forget
        it, without waiting for it. Safe because the GPU runs everything in stream order: its
        token copy lands in a pinned buffer that a later copy overwrites before the host reads
        that buffer again, and the K/V it writes into freed blocks is rewritten by later steps.
        So an engine whose requests have all ended reports nothing unfinished and holds no step
        in flight at once (the HTTP server's close() relies on that)."""
        if self.in_flight is not None and all(s.status == "finished" for s in self.in_flight[0]):
            for seq in self.in_flight[0]:
                seq.num_pending -= 1
            self.in_flight = None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self.in_flight is not None

    # Overlapping the host with the GPU. A synchronous decode step is: schedule, fill the inputs,
    # replay the graph, wait for the tokens, check stops. The GPU idles while the host does the
    # first two and the last, the host while the GPU runs: measured on an H200 at batch 1 (GPT-2
    # 1.5B, results/perf_notes.md) ~0.35 ms of host per token on top of ~1.7 ms of GPU. But step
    # n+1's inputs hardly depend on step n's result: positions, slots and block tables are known
    # in advance, and the one unknown, each row's input token, is step n's argmax, which is
    # already on the device (ModelRunner.last_greedy). So step() queues step n+1 (its rows read
    # their token from the device: fill_decode_inputs' prev_rows) *before* waiting for step n's
    # tokens; while the host then reads them back and checks stops, the GPU already runs n+1.
    # The price: a sequence that stops on EOS or a stop string at step n has computed one row
    # too many at n+1, and that token is dropped (its K/V went to a block the sequence held when
    # n+1 was queued; a block freed afterwards is only rewritten by steps queued later, in
    # stream order). Stops by max_tokens are known in advance and cost nothing. Only greedy
    # batches run ahead: a sampled token is drawn by the host-side sampler here. Measured on an
    # H100 at batch 1 (perf_notes.md), off -> on: GPT-2 1.5B 2.21 -> 2.12 ms per token, 124M
    # 0.49 -> 0.37 ms (the step now costs about max(GPU, host) instead of their sum).
    def step(self) -> list[tuple[Sequence, int]]:
        """Run one scheduled step; return (sequence, new token) for every sequence that got one.
        With async_decode, a greedy decode step returns the tokens of the step queued before it
        (see above): tokens come out in order, one step later than the device computed them.

        If the model or the sampler raises, the step's sequences are retired (reason "error",
        blocks freed, prefix hashes of unwritten blocks forgotten) before the error propagates,
        so the engine stays usable for the other requests."""
        if self.in_flight is None:
            work = self.scheduler.schedule()
            if not (work.kind == "decode" and self.cfg.async_decode
                    and all(s.params.temperature == 0 for s in work.seqs)):
                return self._step_synchronously(work)
            self.in_flight = self._queue_decode(work.seqs)
        seqs, copy = self.in_flight
        ahead = self.scheduler.schedule_ahead()
        self.in_flight = self._queue_decode(ahead.seqs, seqs) if ahead else None
        self.steps_ahead += ahead is not None
        tokens = ModelRunner.finish_token_copy(copy)
        for seq in seqs:
            seq.num_pending -= 1
        new_tokens = self._emit([(s, t) for s, t in zip(seqs, tokens) if s.status != "finished"])
        self._drop_finished_in_flight()          # every row of the step ahead just stopped
        return new_tokens

    def _queue_decode(self, seqs: list[Sequence], previous: list[Sequence] | None = None) -> tuple:
        """Queue a greedy decode step (and the copy of its tokens to the host) without waiting.
        previous: the step still in flight, whose argmax holds these rows' input tokens."""
        self.steps["decode"] += 1
        prev_rows = None
        if previous is not None:
            # every ahead sequence ran in the previous step: schedule_ahead only drops sequences,
            # and a new one can join only through schedule(), i.e. with nothing in flight
            row = {id(s): i for i, s in enumerate(previous)}
            prev_rows = [row[id(s)] for s in seqs]
        try:
            _, greedy = self.runner.decode(seqs, prev_rows)
            copy = self.runner.start_token_copy(greedy)
        except Exception:
            for seq in seqs + (previous or []):
                if seq.status != "finished":
                    self.scheduler.finish(seq, "error")
            self.in_flight = None
            raise
        for seq in seqs:
            seq.num_pending += 1
        return seqs, copy

    def _step_synchronously(self, work: ScheduledStep) -> list[tuple[Sequence, int]]:
        self.steps[work.kind] += 1
        try:
            if work.kind == "prefill":
                logits, greedy = self.runner.prefill(work.seqs), None
            else:
                logits, greedy = self.runner.decode(work.seqs)     # greedy: the rows' argmax
            new_tokens = ModelRunner.sample(logits, work.seqs, greedy)
        except Exception:
            # Reversed: a sequence can hit blocks that an earlier one of this very step registered
            # (same prompt prefix) and was to fill. Freed first, the later one leaves the
            # registering one holding them alone, and free_sequence forgets the hashes of blocks
            # only their (failed) writer holds. In admission order they would stay cached, empty.
            for seq in reversed(work.seqs):
                self.scheduler.finish(seq, "error", written=work.kind == "decode")
            raise
        return self._emit(list(zip(work.seqs, new_tokens)))

    def _emit(self, new_tokens: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        """Append each sequence's new token and retire the sequences that are done."""
        now = time.perf_counter()
        self.num_generated += len(new_tokens)
        for seq, token in new_tokens:
            if seq.first_token_time is None:
                seq.first_token_time = now
            seq.output.append(token)
            reason = self._finish_reason(seq, token)
            if reason:
                self.scheduler.finish(seq, reason)
        return new_tokens

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if not p.ignore_eos and token == self.eos_id:
            return "eos"                               # (not added to seq.detok: EOS is not text)
        if seq.detok is not None:
            seen = len(seq.detok.text)
            seq.detok.add(token)
            if p.stop:
                # only a stop string that ends in the new text can be new: search from just
                # before it (earlier matches would have stopped an earlier step)
                text, start = seq.detok.text, max(0, seen - max(map(len, p.stop)) + 1)
                found = [i for i in (text.find(s, start) for s in p.stop) if i >= 0]
                if found:
                    seq.text = text[:min(found)]       # cut at the earliest stop string
                    return "stop"
        if len(seq.output) >= p.max_tokens:
            return "length"
        return None

    def _output(self, seq: Sequence) -> RequestOutput:
        text = None
        if self.tokenizer is not None:
            if seq.finish_reason == "stop":
                text = seq.text
            elif seq.detok is not None:                # holds every token but an EOS
                text = seq.detok.final()
            else:
                text = self.tokenizer.decode(seq.output[:-1] if seq.finish_reason == "eos" else seq.output)
        return RequestOutput(seq.id, seq.prompt, list(seq.output), text, seq.finish_reason,
                             seq.first_token_time - seq.arrival, seq.finish_time - seq.arrival)

    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[RequestOutput]:
        """Run a list of requests to completion (all admitted at once); outputs in input order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        params_list = [p or SamplingParams() for p in params_list]
        # validate everything before queueing anything: one bad request rejects the call
        prompts = [self.check_request(prompt, p) for prompt, p in zip(prompts, params_list)]
        ids = [self._enqueue(prompt, p) for prompt, p in zip(prompts, params_list)]
        done = 0
        try:
            while self.has_unfinished():
                for seq, _ in self.step():
                    if seq.status == "finished":
                        done += 1
                if progress:
                    print(f"\r{done}/{len(ids)} requests done", end="", file=sys.stderr, flush=True)
        except BaseException:
            # a failed step retired its own sequences; drop the rest of this call's requests too,
            # or they would run in a later call that never returns them
            for i in ids:
                if i in self.seqs:
                    self.abort(i)
            raise
        if progress:
            print(file=sys.stderr)
        return [self._output(self.seqs.pop(i)) for i in ids]

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text pieces of one request as they are generated (other queued requests run too).

        Text is held back while it could still turn out to be part of a stop string or of an
        unfinished UTF-8 character, so the client never sees text that the final output cuts.
        Closing the iterator early aborts the request. A failure in a step this stream runs
        propagates as raised; if another caller's step failed it, or it was aborted elsewhere,
        the iterator raises RuntimeError."""
        if self.tokenizer is None:
            raise ValueError("streaming text needs a tokenizer")
        params = params or SamplingParams()
        seq_id = self._enqueue(self.check_request(prompt, params), params, live_text=True)
        seq = self.seqs[seq_id]
        printed, seen = 0, -1
        try:
            while True:
                # The request may have finished during a step another caller ran (a second
                # stream consumed in between, or generate()): check before stepping, so its
                # last text is still sent and an error still reported.
                if seq.status != "finished":
                    self.step()
                if seq.status != "finished" and len(seq.output) == seen:
                    continue                  # no new token this step (another request's prefill)
                seen = len(seq.output)
                piece, final = self.new_text(seq, printed)
                if piece:
                    yield piece
                    printed += len(piece)
                if final is not None:
                    return
        finally:
            if seq_id in self.seqs:
                self.abort(seq_id)

    def new_text(self, seq: Sequence, printed: int) -> tuple[str, RequestOutput | None]:
        """(the text of a streamed request past its first `printed` characters that no later
        token can change, its RequestOutput once it is finished, else None). Text is held back
        while it could still turn out to be part of a stop string or of an unfinished UTF-8
        character; once finished, the rest of the final text. A request that ended in an error
        or an abort raises RuntimeError. Used by stream() and by the HTTP server's engine thread."""
        if seq.status == "finished":
            if seq.finish_reason in ("error", "abort"):
                raise RuntimeError(f"request {seq.id} ended with {seq.finish_reason!r} "
                                   f"after {len(seq.output)} tokens")
            final = self._output(seq)          # built once: its text is also the last piece
            return final.text[printed:], final
        return _stable_prefix(seq.detok.text, seq.params.stop)[printed:], None


def _stable_prefix(text: str, stops: tuple[str, ...]) -> str:
    """The part of `text` that no later token can change: without a tail that begins some stop
    string (IncrementalText already holds back an unfinished UTF-8 character)."""
    # the longest tail that begins any stop string, measured on the text as it is (stripping
    # one stop's tail and then testing the next on the shortened text would hold back more)
    held = max((n for stop in stops for n in range(min(len(stop) - 1, len(text)), 0, -1)
                if text.endswith(stop[:n])), default=0)
    return text[:len(text) - held]


# ----------------------------------------------------------------------------------------------
# 7. An OpenAI-compatible HTTP server
# ----------------------------------------------------------------------------------------------
#
# Many clients, one engine. The engine is not thread-safe and its loop is Python: it gets ONE
# thread of its own (EngineThread), the only code that changes it. The handlers only read: the
# config, the block count and the tokenizer (check_request and the chat template), so a bad
# request gets its 400 before anything is queued. Connections are handled by asyncio on another
# thread: one event loop serves any number of slow or streaming clients without a thread each
# (foundations.py, Part 4). The two meet through two queues: handlers put
# requests into the engine thread's inbox (thread-safe), and the engine thread hands each
# request's text pieces back to that request's asyncio.Queue with loop.call_soon_threadsafe (an
# asyncio.Queue may only be touched from its own loop's thread), one call per step for all the
# requests that got text (each call wakes the loop through a pipe). The engine thread steps
# whenever any request is unfinished and sleeps on its inbox otherwise, so a burst of requests
# joins the running batch at the next step: continuous batching across HTTP clients.
# The GIL is shared by the two threads: the handlers' work per token (a JSON dump, a socket
# write) is kept small, because every microsecond of it is taken from the engine loop.
# `python bench.py --topic load` runs the same traffic through this server and directly, side
# by side: the difference is what this layer costs.
#
# Endpoints (the subset of the OpenAI API that a completion client needs):
#   GET  /v1/models             the one model served
#   POST /v1/completions        {"prompt": str | [token ids], "max_tokens": 16, "temperature": 1,
#                                "top_p": 1, "stop": str | [str], "seed", "stream": false, and
#                                the extensions "top_k", "ignore_eos"}
#   POST /v1/chat/completions   {"messages": [{"role", "content"}], ...}: models with a chat
#                                template (SmolLM2), the template applied by model.chat_tokens
# With "stream": true the answer is server-sent events, one `data: {json}` per text piece and
# `data: [DONE]` at the end. A bad request gets HTTP 400 and the engine's own error message,
# before anything is queued; a client that disconnects mid-stream aborts its request.
# Deliberately left out: n > 1, logprobs, echo, best_of, suffix, tools, keep-alive (every
# response closes its connection) and TLS.

MAX_BODY_BYTES = 1 << 20          # a request body larger than this gets 413
_FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}    # ours -> OpenAI's


def _finish_reason(out: "RequestOutput") -> str:
    return _FINISH_REASONS.get(out.finish_reason, out.finish_reason)


def _error(message: str, kind: str = "server_error") -> dict:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": kind}}


class EngineThread:
    """The thread that owns the engine. submit() and cancel() may be called from any thread;
    each request's events go to its asyncio queue: ("text", piece), then ("done",
    RequestOutput) or ("error", message)."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.streams: dict[int, list] = {}       # request id -> [event loop, asyncio.Queue, chars sent, stream?]
        self.peak_streams = 0                    # most requests in flight at once (a diagnostic)
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams, loop, events: asyncio.Queue,
               stream: bool = True) -> None:
        """stream=False: the client gets only ("done", output) or ("error", message), no text events
        (and the engine keeps no live text for it unless a stop string needs one)."""
        self.inbox.put(("add", prompt_ids, params, loop, events, stream))

    def cancel(self, events: asyncio.Queue) -> None:
        self.inbox.put(("cancel", events))

    def stop(self) -> None:
        """Abort every request in flight (their clients get an error event) and end the thread."""
        self.inbox.put(("stop",))
        self.thread.join()

    @staticmethod
    def _send(stream, event) -> None:
        EngineThread._deliver({stream[0]: [(stream[1], event)]})

    @staticmethod
    def _deliver(events_by_loop: dict) -> None:
        """Hand events to their asyncio queues: ONE call_soon_threadsafe per event loop for all
        of them. Each such call takes the loop's lock and writes a byte to its self-pipe to wake
        it (a syscall), and the loop thread then runs one callback for it, all under the GIL that
        this thread needs for the next step. Per event, 128 streaming requests cost 128 of those
        per decode step; batched, one. Measured on a 2-core CPU (GPT-2 tiny, 128 streams, clients
        in another process, medians of 4 alternating runs): 98 -> 100 requests/s, within that
        machine's noise, where the model's own host work dominates; on a GPU, where a step takes
        a few ms for everything, we expect it to matter more (not measured yet)."""
        for loop, events in events_by_loop.items():
            try:
                loop.call_soon_threadsafe(EngineThread._put_all, events)
            except RuntimeError:  # that loop is already closed: nobody left to tell
                pass

    @staticmethod
    def _put_all(events: list) -> None:
        for queue_, event in events:
            queue_.put_nowait(event)

    def _run(self) -> None:
        while True:
            # sleep on the inbox when idle; otherwise take what has arrived and step
            msgs = [self.inbox.get()] if not self.engine.has_unfinished() else []
            while True:
                try:
                    msgs.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            try:
                for msg in msgs:
                    if msg[0] == "stop":
                        try:
                            self._abort_all("the server is shutting down")
                        except Exception:     # noqa: BLE001 (every client was told; end the thread anyway)
                            pass
                        return
                    if msg[0] == "add":
                        self._add(*msg[1:])
                    else:                                     # cancel: the client went away
                        for seq_id, stream in list(self.streams.items()):
                            if stream[1] is msg[1]:
                                del self.streams[seq_id]
                                self.engine.abort(seq_id)
                if self.engine.has_unfinished():
                    self._step()
            except Exception as err:      # noqa: BLE001 (a bug here must not leave clients waiting forever)
                self._abort_all(f"engine thread: {type(err).__name__}: {err}")

    def _add(self, prompt_ids, params, loop, events, live) -> None:
        stream = [loop, events, 0, live]
        try:
            seq_id = self.engine._enqueue(prompt_ids, params, live_text=live)
        except Exception as err:          # noqa: BLE001 (this request fails, the others go on)
            self._send(stream, ("error", f"{type(err).__name__}: {err}"))
            return
        self.streams[seq_id] = stream
        self.peak_streams = max(self.peak_streams, len(self.streams))

    def _step(self) -> None:
        try:
            self.engine.step()
            failure = None
        except Exception as err:          # noqa: BLE001 (the step retired its requests as "error")
            failure = err
        errors = self._publish()          # those requests get their error here, one by one
        if failure is not None and errors == 0:
            # a step that raised without retiring any request would fail again forever
            self._abort_all(f"engine step failed: {type(failure).__name__}: {failure}")

    def _abort_all(self, message: str) -> None:
        failure = None
        for seq_id, stream in list(self.streams.items()):
            del self.streams[seq_id]
            self._send(stream, ("error", message))       # first: whatever abort does, they hear
            try:
                if seq_id in self.engine.seqs:
                    self.engine.abort(seq_id)
            except Exception as err:     # noqa: BLE001 (abort the others first, then raise)
                failure = failure or err
        if failure is not None:
            raise failure

    def _publish(self) -> int:
        """Send every stream its new text; finished requests get ("done", output). Returns how
        many requests ended in an error."""
        errors = 0
        outbox: dict = {}                 # event loop -> [(queue, event)], delivered at the end

        def send(stream, event):
            outbox.setdefault(stream[0], []).append((stream[1], event))
        try:
            for seq_id, stream in list(self.streams.items()):
                seq = self.engine.seqs[seq_id]
                if not stream[3] and seq.status != "finished":
                    continue              # not streaming: nothing to send before the end
                try:
                    piece, final = self.engine.new_text(seq, stream[2])
                except RuntimeError as err:
                    del self.streams[seq_id]
                    send(stream, ("error", str(err)))
                    errors += 1
                    self.engine.abort(seq_id)
                    continue
                if piece and stream[3]:
                    stream[2] += len(piece)
                    send(stream, ("text", piece))
                if final is not None:
                    del self.streams[seq_id]
                    del self.engine.seqs[seq_id]
                    send(stream, ("done", final))
        finally:         # what was decided is sent even if a later stream raised (_run aborts the rest)
            self._deliver(outbox)
        return errors


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _params_from_body(body: dict) -> SamplingParams:
    """OpenAI's field names and defaults (temperature 1, 16 tokens) -> SamplingParams."""
    if body.get("n", 1) != 1:
        raise HTTPError(400, "n must be 1 (one choice per request)")
    try:
        return SamplingParams(max_tokens=body.get("max_tokens", 16), temperature=body.get("temperature", 1.0),
                              top_p=body.get("top_p", 1.0), top_k=body.get("top_k", 0), seed=body.get("seed"),
                              ignore_eos=bool(body.get("ignore_eos", False)), stop=body.get("stop"))
    except (TypeError, ValueError) as err:
        raise HTTPError(400, str(err)) from None


def _prompt_from_body(engine: LLMEngine, body: dict, chat: bool, has_template: bool) -> list[int]:
    """has_template: the tokenizer speaks ChatML (M.is_chat_tokenizer, asked once per server)."""
    if chat:
        if not has_template:
            raise HTTPError(400, "this engine's tokenizer has no (ChatML) chat template: use /v1/completions")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise HTTPError(400, "messages must be a non-empty list of {\"role\": str, \"content\": str}")
        return M.chat_tokens(engine.tokenizer, messages)
    prompt = body.get("prompt")
    if not isinstance(prompt, (str, list)):
        raise HTTPError(400, "prompt must be a string or a list of token ids (one prompt per request)")
    return prompt


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
    """(method, path, body) of one HTTP/1.1 request."""
    request_line = (await reader.readline()).decode("latin-1").split()
    if len(request_line) != 3:
        raise HTTPError(400, "malformed request line")
    method, path, _ = request_line
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise HTTPError(400, "bad Content-Length") from None
    if length > MAX_BODY_BYTES:
        raise HTTPError(413, f"request body over {MAX_BODY_BYTES} bytes")
    return method, path.split("?")[0], await reader.readexactly(length) if length > 0 else b""


def _head(status: int, content_type: str, length: int | None = None) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
              413: "Payload Too Large", 500: "Internal Server Error"}[status]
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}", "Connection: close",
             "Cache-Control: no-cache"] + ([f"Content-Length: {length}"] if length is not None else [])
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _json_response(status: int, payload: dict) -> bytes:
    body = json.dumps(payload).encode()
    return _head(status, "application/json", len(body)) + body


class HTTPServer:
    """The OpenAI-compatible server: an asyncio loop on a background thread plus the engine
    thread. start() returns once it listens (port=0 picks a free port: see .port); close()
    stops both. `python serve.py --http 8000` runs one until Ctrl-C."""

    def __init__(self, engine: LLMEngine, host: str = "127.0.0.1", port: int = 8000):
        if engine.tokenizer is None:
            raise ValueError("the HTTP server streams text: build the engine with a tokenizer")
        self.engine, self.host, self.port = engine, host, port
        self.has_chat_template = M.is_chat_tokenizer(engine.tokenizer)
        self.engine_thread: EngineThread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "HTTPServer":
        self.engine_thread = EngineThread(self.engine)
        self.loop = asyncio.new_event_loop()
        started, failure = threading.Event(), []

        async def listen():
            try:
                # backlog: connections the kernel queues before accept(). With asyncio's default,
                # 100, a burst of 600 clients at once (2-core CPU) had 63 of them wait ~1 s for a
                # SYN retry in one of two runs; with 2048, none in two
                self._server = await asyncio.start_server(self._handle, self.host, self.port, backlog=2048)
                self.port = self._server.sockets[0].getsockname()[1]
            except OSError as err:
                failure.append(err)
            started.set()

        self._thread = threading.Thread(target=self.loop.run_forever, name="http", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(listen(), self.loop)
        started.wait()
        if failure:
            self.close()
            raise failure[0]
        return self

    def close(self) -> None:
        # the engine thread first: it aborts what is in flight and tells the handlers, whose loop
        # must still be running to hear it (and to be told at all: a closed loop takes no calls)
        if self.engine_thread is not None:
            self.engine_thread.stop()
            self.engine_thread = None
        if self.loop is not None:
            async def shutdown():      # stop listening, end open connections, let handlers finish
                if getattr(self, "_server", None) is not None:
                    self._server.close()
                handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for task in handlers:
                    task.cancel()
                await asyncio.gather(*handlers, return_exceptions=True)
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()
            self.loop = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, path, raw = await _read_request(reader)
            routes = {"/v1/models": "GET", "/v1/completions": "POST", "/v1/chat/completions": "POST"}
            if path not in routes:
                raise HTTPError(404, f"no endpoint {path}; this server has {', '.join(routes)}")
            if method != routes[path]:
                raise HTTPError(405, f"{path} takes {routes[path]}")
            if path == "/v1/models":
                writer.write(_json_response(200, {"object": "list", "data": [
                    {"id": self.engine.cfg.model, "object": "model", "owned_by": "waveboost"}]}))
            else:
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError as err:
                    raise HTTPError(400, f"the body is not JSON: {err}") from None
                if not isinstance(body, dict):
                    raise HTTPError(400, "the body must be a JSON object")
                await self._complete(body, path == "/v1/chat/completions", reader, writer)
        except HTTPError as err:
            writer.write(_json_response(err.status, _error(str(err), "invalid_request_error")))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass                                     # the client went away
        except Exception as err:                     # noqa: BLE001 (a bug here must not kill the server)
            writer.write(_json_response(500, _error(f"{type(err).__name__}: {err}")))
        finally:
            try:
                await writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()     # also when cancelled by close(): no transport outlives the loop

    async def _complete(self, body: dict, chat: bool, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        params = _params_from_body(body)
        try:        # validated here, before anything reaches the engine thread (a clear 400)
            prompt_ids = self.engine.check_request(_prompt_from_body(self.engine, body, chat, self.has_chat_template), params)
        except ValueError as err:
            raise HTTPError(400, str(err)) from None
        events: asyncio.Queue = asyncio.Queue()
        stream = bool(body.get("stream"))
        self.engine_thread.submit(prompt_ids, params, asyncio.get_running_loop(), events, stream=stream)
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def choice(text, finish, role=True):
            if chat:       # a stream names the role in its first chunk only, as OpenAI's does
                return {"index": 0, "delta" if stream else "message":
                        {"role": "assistant", "content": text} if role else {"content": text},
                        "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        def envelope(choices, **extra):
            return {"id": rid, "object": kind + (".chunk" if chat and stream else ""),
                    "created": created, "model": self.engine.cfg.model, "choices": choices, **extra}

        try:
            if stream:
                writer.write(_head(200, "text/event-stream"))
                first = True
                while True:
                    kind_, value = await events.get()
                    if kind_ == "text":
                        data = envelope([choice(value, None, role=first)])
                    elif kind_ == "done":
                        data = envelope([choice("", _finish_reason(value), role=first)])
                    else:
                        data = _error(value)
                    first = False
                    writer.write(f"data: {json.dumps(data)}\n\n".encode())
                    await writer.drain()              # raises if the client has gone
                    if kind_ != "text":
                        writer.write(b"data: [DONE]\n\n")
                        return
            # Not streaming: one event comes, ("done", output) or ("error", message), and nothing
            # is written until then, so a client that leaves would go unnoticed; watch its side
            # of the connection meanwhile (read() returns b"" once it closes).
            event = asyncio.ensure_future(events.get())
            gone = asyncio.ensure_future(reader.read(1))
            try:
                while not event.done():
                    await asyncio.wait({event, gone}, return_when=asyncio.FIRST_COMPLETED)
                    if not event.done():
                        if gone.result() == b"":
                            raise ConnectionResetError("the client closed the connection")
                        gone = asyncio.ensure_future(reader.read(1))     # (stray bytes: keep watching)
            finally:
                gone.cancel()
                event.cancel()
            kind_, value = event.result()
            if kind_ == "done":
                usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(value.tokens),
                         "total_tokens": len(prompt_ids) + len(value.tokens)}
                writer.write(_json_response(200, envelope([choice(value.text, _finish_reason(value))], usage=usage)))
            else:
                writer.write(_json_response(500, _error(value)))
        except (ConnectionError, asyncio.CancelledError):
            self.engine_thread.cancel(events)
            raise


# ----------------------------------------------------------------------------------------------
# 8. CLI
# ----------------------------------------------------------------------------------------------

def add_config_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field, with the dataclass's default (one source of defaults)."""
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        default, help = f.default, f.metadata.get("help")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=help)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Serve a prompt through the paged, continuously "
                                "batched engine and stream the answer.",
                                formatter_class=M.HelpFormatter)
    add_config_args(p)
    p.add_argument("--prompt", default=None, help="default: a question for chat models, a sentence "
                   "start otherwise; chat models get the prompt wrapped in their chat template")
    M.add_sampling_args(p)
    p.add_argument("--http", type=int, default=None, metavar="PORT",
                   help="instead of answering --prompt, serve an OpenAI-compatible HTTP API on this port "
                        "(/v1/completions, /v1/chat/completions, /v1/models; 0 = any free port) until Ctrl-C")
    p.add_argument("--host", default="127.0.0.1", help="with --http: the address to listen on")
    args = p.parse_args(argv)
    if args.http is not None and not 0 <= args.http < 65536:
        p.error(f"--http must be a port number in 0..65535, got {args.http}")
    try:
        cfg = EngineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)})
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        t0 = time.perf_counter()
        engine = LLMEngine(cfg)
        t_load = time.perf_counter() - t0
        print(f"[{cfg.model} on {cfg.device}: loaded in {t_load:.1f} s, "
              f"KV pool {engine.blocks.num_blocks} blocks x {cfg.block_size} tokens]", file=sys.stderr)
        if args.http is not None:
            server = HTTPServer(engine, args.host, args.http).start()
            print(f"[serving http://{args.host}:{server.port}/v1 (completions, chat/completions, models); "
                  f"Ctrl-C stops]", file=sys.stderr)
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                pass
            finally:
                server.close()
            return 0
        chat = M.is_chat_tokenizer(engine.tokenizer)
        text = args.prompt or (M.DEFAULT_CHAT_PROMPT if chat else M.DEFAULT_COMPLETION_PROMPT)
        prompt = M.chat_tokens(engine.tokenizer, [{"role": "user", "content": text}]) if chat else text
        print(f"User: {text}\nAssistant: " if chat else text, end="", flush=True)
        t0 = time.perf_counter()
        first = None
        for piece in engine.stream(prompt, params):
            first = first or time.perf_counter()
            print(piece, end="", flush=True)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    first = first or time.perf_counter()       # nothing streamed (e.g. EOS came first)
    n = engine.num_generated
    mem = engine.memory_report()
    print(f"\n[TTFT {1e3 * (first - t0):.0f} ms | {n} tokens in {dt:.2f} s = {n / dt:.1f} tok/s | "
          f"weights {mem['weights_GiB']:.2f} GiB, KV pool {mem['kv_pool_GiB']:.2f} GiB"
          + (f", CUDA peak {mem['cuda_peak_GiB']:.2f} GiB" if "cuda_peak_GiB" in mem else "") + "]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
