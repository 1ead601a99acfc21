"""
batching.py: static, dynamic and continuous batching of a request stream on the real model.

    python batching.py                 # a short comparison on a tiny GPT-2 (CPU: ~5 s)
    python batching.py --help
    python bench.py --topic batching --plot   # the full sweep (GPT-2 124M on a GPU), table + plot

What you will learn
1. Why a server batches at all: a decode step reads every weight (GPT-2 124M in fp16: 250 MB)
   to produce ONE token per sequence. Reading them once for 32 sequences costs about the same
   time as for one, so a batch of 32 makes ~32x the tokens per second. Batching is the single
   biggest throughput lever in LLM serving.
2. How a batch is formed, three ways, and what each wastes:
   - static: wait for B requests, pad every prompt to the longest, run until the longest output
     is done. Wastes the pad slots and the steps finished rows keep computing, and makes a new
     request wait for the whole running batch (head-of-line blocking).
   - dynamic: the same padded batch, but closed after a time window even if not full: bounds the
     wait for a batch at low load, wastes as much once it runs.
   - continuous (iteration-level, Orca 2022 / vLLM): a fixed number of slots; requests join and
     leave at every decode step. Nothing is padded and a finished row frees its slot at once.
3. How to measure a server: padding waste (token-slots computed for nothing / all computed),
   throughput (generated tokens / wall time), and latency percentiles: TTFT (time to first token,
   what a chat user feels) and end-to-end (E2E) latency, at P50/P90/P99.
4. The throughput-latency trade-off: a bigger batch raises throughput and queues each request
   longer; continuous batching moves the whole curve (more tokens/s at a lower latency).

Version ladder (GPT-2 124M bf16, 256 Poisson requests at ~23/s, prompts and outputs 16-256
tokens, batch 32; bench.py --topic batching on an NVIDIA H200, 2026-11-27, eager PyTorch):
  v1 static      batch of B, pad to the longest prompt, run to the longest output
                 -> 2,078 tok/s, 46.9% of token-slots wasted, TTFT P50 2.2 s, E2E P50 3.1 s
  v2 dynamic     the same, but the batch closes at B requests OR after a 50 ms window
                 -> 2,200 tok/s, 46.7% waste, TTFT P50 2.5 s, E2E P50 3.4 s
  v3 continuous  B slots, requests join and leave at every decode step
                 -> 2,711 tok/s (1.3x static), no waste, TTFT P50 18 ms, E2E P50 1.3 s

Expected before measuring: outputs uniform in 16..256 average 136 tokens, and the longest of 32
is ~249 on average, so a static batch of 32 decodes ~249 steps where its rows need 136 on
average: ~45% of the decode token-slots are waste (measured: 47%); prompts drawn the same way
waste ~45% of the prefill. Continuous batching computes no pad slot at all. (Its first GPU run
came out at 0.6x static: see model.KVCache.read_len and model.append_to_cache for why.)

The model really runs (the KV cache and prefill/decode of model.py) and time is the real wall
clock, while requests arrive on a seeded trace: a request is admissible once the clock passes its
arrival time. Decoding is greedy and EOS is ignored (each request gets exactly max_new_tokens), so
every policy must give every request exactly the tokens of `generate()` run alone: test_all.py
checks that. What this file leaves out: paged KV memory, batched (packed) prefill, preemption and
sampling (serve.py adds those), and chunked prefill (neither file has it yet).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from model import (add_device_arg, cli_device, HelpFormatter, KVCache, Transformer, append_to_cache, check_request,
                   decode, default_dtype, generate, load_gpt2, prefill, sample)


# ----------------------------------------------------------------------------------------------
# 1. Requests, a seeded trace, and the clock
# ----------------------------------------------------------------------------------------------

@dataclass
class Request:
    id: int
    arrival_s: float          # seconds after the start of the run
    prompt: list[int]
    max_new_tokens: int       # exactly this many tokens are generated (EOS is ignored)


@dataclass
class RequestResult:
    id: int
    arrival_s: float
    tokens: list[int] = field(default_factory=list)
    first_token_s: float = math.nan   # clock time at which the first token was known
    finish_s: float = math.nan        # ... and the last one

    @property
    def ttft(self) -> float:
        """Time to first token: queueing + prefill. What a chat user feels as 'it started'."""
        return self.first_token_s - self.arrival_s

    @property
    def e2e(self) -> float:
        return self.finish_s - self.arrival_s


def poisson_arrivals(n: int, rate_per_s: float, gen: torch.Generator) -> list[float]:
    """n arrival times in seconds of a Poisson process: independent exponential gaps of mean
    1/rate (inverse-CDF sampling: -log(1 - u) / rate); rate=inf: all at t=0."""
    if math.isinf(rate_per_s):
        return [0.0] * n
    gaps = -torch.log1p(-torch.rand(n, generator=gen, dtype=torch.float64)) / rate_per_s
    return gaps.cumsum(0).tolist()


def make_trace(n: int, rate_per_s: float, prompt_lens=(16, 256), output_lens=(16, 256),
               vocab_size: int = 50257, seed: int = 0) -> list[Request]:
    """n requests with Poisson arrivals (poisson_arrivals), prompt and output lengths uniform in
    the given inclusive ranges, random prompt tokens."""
    gen = torch.Generator().manual_seed(seed)
    arrivals = poisson_arrivals(n, rate_per_s, gen)
    p_len = torch.randint(prompt_lens[0], prompt_lens[1] + 1, (n,), generator=gen).tolist()
    o_len = torch.randint(output_lens[0], output_lens[1] + 1, (n,), generator=gen).tolist()
    return [Request(i, arrivals[i], torch.randint(0, vocab_size, (p_len[i],), generator=gen).tolist(),
                    o_len[i]) for i in range(n)]


class WallClock:
    """Real seconds since construction. The scheduler reads it after each model call.

    subtle: on a GPU, kernels run asynchronously, so the clock synchronizes before reading the
    time; otherwise a 'first token' would be stamped when the prefill was *launched*. The greedy
    tokens are copied to the host right after each call anyway (the scheduler needs them), so
    this sync costs nothing extra.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.start = time.perf_counter()

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - self.start

    def model_call(self, token_slots: int) -> None:
        pass                                   # a real model call takes real time

    def wait_until(self, t: float) -> None:
        time.sleep(max(0.0, t - self.now()))   # idle: nothing has arrived yet


@dataclass
class FakeClock:
    """Deterministic time for tests: a model call costs call_s + slot_s per token-slot computed
    (a crude roofline: a fixed cost to read the weights, plus a cost per token), and idling jumps
    straight to the next arrival. Same scheduler code, same decisions on every machine."""
    call_s: float = 0.010
    slot_s: float = 0.0001
    t: float = 0.0

    def now(self) -> float:
        return self.t

    def model_call(self, token_slots: int) -> None:
        self.t += self.call_s + self.slot_s * token_slots

    def wait_until(self, t: float) -> None:
        self.t = max(self.t, t)


# ----------------------------------------------------------------------------------------------
# 2. What a run records, and the metrics
# ----------------------------------------------------------------------------------------------
#
# A token-slot is one token position pushed through the model: a (B, T) prefill computes B*T of
# them, a decode step over B rows computes B. A request *needs* len(prompt) + max_new_tokens - 1
# (its last token is never fed back). Everything else the batcher computes is waste: pad slots
# at the end of short prompts, and decode slots of rows whose request already finished.
#   padding waste = 1 - needed slots / computed slots
# Waste is not free: in decode the batch rides on the weight read almost for free, but pad slots
# still take KV memory and attention time, and in prefill (compute-bound) they cost FLOPs 1:1.

@dataclass
class Run:
    policy: str
    results: dict[int, RequestResult]     # by request id, in trace order
    computed_slots: int = 0
    needed_slots: int = 0
    model_calls: int = 0
    batches: list[list[int]] = field(default_factory=list)   # request ids per padded batch

    @property
    def padding_waste(self) -> float:
        return 1.0 - self.needed_slots / self.computed_slots


def summarize(run: Run) -> dict[str, float]:
    """Throughput (generated tokens / wall time until the last token) and latency percentiles."""
    results = list(run.results.values())
    ttft = np.array([r.ttft for r in results])
    e2e = np.array([r.e2e for r in results])
    makespan = max(r.finish_s for r in results)
    out = {"throughput_tok_s": sum(len(r.tokens) for r in results) / makespan,
           "padding_waste": run.padding_waste, "makespan_s": makespan, "model_calls": run.model_calls}
    for q in (50, 90, 99):
        out[f"ttft_p{q}_s"] = float(np.percentile(ttft, q))
        out[f"e2e_p{q}_s"] = float(np.percentile(e2e, q))
    return out


def check_requests(model: Transformer, requests: list[Request]) -> int:
    """Clear errors for bad requests before anything runs; returns the cache length they need."""
    if not requests:
        raise ValueError("no requests")
    if len({r.id for r in requests}) != len(requests):
        raise ValueError("request ids must be unique")
    for r in requests:
        try:
            check_request(model.cfg, r.prompt, r.max_new_tokens)
        except ValueError as err:
            raise ValueError(f"request {r.id}: {err}") from None
    return max(len(r.prompt) + r.max_new_tokens - 1 for r in requests)


def _stamp(result: RequestResult, token: int, req: Request, t: float) -> bool:
    """Record one new token at clock time t; True when the request is complete."""
    result.tokens.append(token)
    if len(result.tokens) == 1:
        result.first_token_s = t
    if len(result.tokens) == req.max_new_tokens:
        result.finish_s = t
        return True
    return False


# ----------------------------------------------------------------------------------------------
# 3. Static batching (v1): one padded batch at a time
# ----------------------------------------------------------------------------------------------
#
# The oldest serving loop, and what `model.generate(batch)` in most libraries does: a (B, T_max)
# tensor of right-padded prompts, one prefill, then decode steps over all B rows until the
# longest output is done. Three costs, all visible in the bench table:
#   1. pad slots in prefill: sum over rows of (T_max - len);
#   2. finished rows keep decoding until the longest is done (their tokens are thrown away);
#   3. head-of-line blocking: a request that arrives just after a batch started waits for the
#      whole batch, ~249 decode steps for outputs of 16..256 tokens, before its own prefill.
# And in a *static* batcher the batch is only launched when B requests are waiting, so at low
# load a request also waits for B-1 others to arrive. (We stamp each request's end when its own
# last token appears, as if streamed; an API that returns the batch at once is worse still.)

@torch.no_grad()
def prefill_padded(model: Transformer, prompts: list[list[int]], cache: KVCache,
                   pad_id: int = 0) -> torch.Tensor:
    """Prefill prompts of different lengths as ONE right-padded (B, T_max) batch into cache rows
    0..B-1; return each row's logits at its OWN last real token (B, V).

    subtle: prefill writes T_max slots in every row, so a short row gets pad keys at positions
    >= its length. We then set its length to the real one: the next decode writes position len,
    overwriting the first pad slot, and a query at position p only sees slots <= p, so no real
    token ever attends to a pad. (Left padding would shift the positions instead.)
    """
    B, lengths = len(prompts), [len(p) for p in prompts]
    T = max(lengths)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p)
    dev = model.device
    for b in range(B):
        cache.reset(b)                                                       # positions from 0
    h = append_to_cache(model, tokens.to(dev), cache)                        # (B, T, C)
    last = h[torch.arange(B, device=dev), torch.tensor(lengths, device=dev) - 1]   # (B, C)
    for b, n in enumerate(lengths):
        cache.lengths[b] = n
    return model.logits(last)                                                # (B, V)


@torch.no_grad()
def run_padded_batch(model: Transformer, batch: list[Request], cache: KVCache, clock, run: Run) -> None:
    """Run one padded batch to completion: prefill, then max(max_new_tokens) - 1 decode steps
    over ALL rows, finished or not (that is what a static batch computes)."""
    B = len(batch)
    results = [run.results[r.id] for r in batch]
    T = max(len(r.prompt) for r in batch)
    logits = prefill_padded(model, [r.prompt for r in batch], cache)     # resets rows 0..B-1
    next_ids = sample(logits)                       # greedy, stays on the device for the next step
    tokens = next_ids.tolist()                      # .tolist() waits for the GPU
    clock.model_call(B * T)
    run.model_calls += 1
    run.computed_slots += B * T
    run.needed_slots += sum(len(r.prompt) for r in batch)
    t = clock.now()
    for b, r in enumerate(batch):
        _stamp(results[b], tokens[b], r, t)
    for _ in range(max(r.max_new_tokens for r in batch) - 1):
        still_running = [len(res.tokens) < r.max_new_tokens for r, res in zip(batch, results)]
        logits = decode(model, next_ids, cache)                                      # all B rows
        next_ids = sample(logits)
        tokens = next_ids.tolist()
        clock.model_call(B)
        run.model_calls += 1
        run.computed_slots += B
        run.needed_slots += sum(still_running)
        t = clock.now()
        for b, r in enumerate(batch):
            if still_running[b]:
                _stamp(results[b], tokens[b], r, t)
    run.batches.append([r.id for r in batch])


# ----------------------------------------------------------------------------------------------
# 4. Dynamic batching (v2): close the batch by size OR by a time window
# ----------------------------------------------------------------------------------------------
#
# The batcher of classic model servers (Triton Inference Server's max_queue_delay, TF Serving's
# batch_timeout): when the engine is free, launch a batch as soon as B requests wait, or once the
# oldest waiting request has waited `window_s`, whichever comes first. At low load this caps the
# wait for a batch at the window instead of "until B-1 others show up"; under load it behaves like
# static batching (batches fill before the window ends). Once launched, it is the same padded
# batch with the same waste. Static batching is the special case window_s = inf; when no more
# requests will ever arrive, the last partial batch is launched either way.

def run_dynamic(model: Transformer, requests: list[Request], max_batch: int, window_s: float,
                clock=None, policy: str | None = None) -> Run:
    """Serve `requests` with padded batches closed at max_batch requests or after window_s."""
    check_requests(model, requests)
    # a finished row keeps decoding until its batch ends, so the row with the longest prompt
    # may run for the longest output's steps: size the cache (and check the context) for that
    max_len = max(len(r.prompt) for r in requests) + max(r.max_new_tokens for r in requests) - 1
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if max_len > model.cfg.max_seq_len:
        raise ValueError(f"padded batching needs room for the longest prompt plus the longest "
                         f"output ({max_len} cache slots) in every row; the context is "
                         f"{model.cfg.max_seq_len}")
    run = Run(policy or f"dynamic B={max_batch} W={window_s * 1e3:g}ms",
              {r.id: RequestResult(r.id, r.arrival_s) for r in requests})
    # one cache for every batch: rows 0..B-1 hold the current batch (reads are plain slices)
    cache = KVCache(model.cfg, max_batch, max_len, model.dtype, model.device)
    clock = clock or WallClock(model.device)     # t = 0 now: the trace starts
    future = deque(sorted(requests, key=lambda r: r.arrival_s))
    waiting: deque[Request] = deque()
    while future or waiting:
        now = clock.now()
        while future and future[0].arrival_s <= now:
            waiting.append(future.popleft())
        if not waiting:
            clock.wait_until(future[0].arrival_s)
            continue
        deadline = waiting[0].arrival_s + window_s
        if len(waiting) >= max_batch or now >= deadline or not future:
            batch = [waiting.popleft() for _ in range(min(max_batch, len(waiting)))]
            run_padded_batch(model, batch, cache, clock, run)
        else:   # idle until the batch could close: the next arrival or the window's end
            clock.wait_until(min(deadline, future[0].arrival_s))
    return run


def run_static(model: Transformer, requests: list[Request], batch_size: int, clock=None) -> Run:
    """Static batching: wait for batch_size requests (no window), pad, run to the longest."""
    return run_dynamic(model, requests, batch_size, math.inf, clock, policy=f"static B={batch_size}")


# ----------------------------------------------------------------------------------------------
# 5. Continuous batching (v3): requests join and leave at every decode step
# ----------------------------------------------------------------------------------------------
#
# The scheduling decision moves from "per batch" to "per iteration" (Orca, OSDI 2022). The
# engine owns n_slots rows of one KV cache; each row holds one request's keys/values, at its own
# length. Every iteration:
#   1. admit: each arrived request takes a free slot and is prefilled into that row alone
#      (rows=[slot]; no padding, since its prompt is the only one in the call);
#   2. decode: ONE batched step over the active slots (rows=active), one new token each;
#   3. retire: a request with all its tokens leaves and its slot is free for the next iteration.
# Why it wins: no pad slots, no finished rows riding along, and no head-of-line blocking: a new
# request waits at most one iteration for a slot once one is free, instead of a whole batch.
# The batch stays full under load, so every weight read serves ~n_slots useful tokens.
#
# Idle slots: we decode only the active rows (rows=...), so an empty slot computes nothing and
# counts as no waste. The price is a gather of the active rows' K/V (keys[rows]) instead of a
# free slice; decoding all n_slots rows and ignoring the idle ones would avoid the gather but
# compute a token-slot for nothing per idle row. Under load almost every slot is busy anyway.
# What remains wasteful: each slot reserves max_len tokens of KV memory whether its request uses
# them or not (a contiguous cache), which caps n_slots; serve.py's paged cache fixes that. A
# prefill also stalls the decode of every active request for its duration (chunked prefill, which
# splits long prompts across decode steps, is the usual fix; this repository does not have it yet).

@torch.no_grad()
def run_continuous(model: Transformer, requests: list[Request], n_slots: int, clock=None) -> Run:
    """Serve `requests` with iteration-level scheduling over n_slots cache rows."""
    if n_slots < 1:
        raise ValueError(f"n_slots must be >= 1, got {n_slots}")
    max_len = check_requests(model, requests)
    run = Run(f"continuous B={n_slots}", {r.id: RequestResult(r.id, r.arrival_s) for r in requests})
    cache = KVCache(model.cfg, n_slots, max_len, model.dtype, model.device)
    clock = clock or WallClock(model.device)     # t = 0 now: the trace starts
    future = deque(sorted(requests, key=lambda r: r.arrival_s))
    free = list(range(n_slots))
    active: dict[int, Request] = {}    # slot -> request in it
    last_token: dict[int, int] = {}    # slot -> the token to feed at the next decode step
    while future or active:
        now = clock.now()
        # 1. admit arrived requests into free slots, first come first served
        while free and future and future[0].arrival_s <= now:
            req, slot = future.popleft(), free.pop(0)
            cache.reset(slot)
            logits = prefill(model, torch.tensor([req.prompt], device=model.device), cache, rows=[slot])
            token = int(sample(logits)[0])
            clock.model_call(len(req.prompt))
            run.model_calls += 1
            run.computed_slots += len(req.prompt)
            run.needed_slots += len(req.prompt)
            if _stamp(run.results[req.id], token, req, clock.now()):
                free.append(slot)           # max_new_tokens == 1: done after the prefill
            else:
                active[slot], last_token[slot] = req, token
        if not active:
            if future:
                clock.wait_until(future[0].arrival_s)
            continue
        # 2. one decode step over the active slots only
        rows = sorted(active)
        logits = decode(model, torch.tensor([last_token[s] for s in rows], device=model.device),
                        cache, rows=rows)
        tokens = sample(logits).tolist()
        clock.model_call(len(rows))
        run.model_calls += 1
        run.computed_slots += len(rows)
        run.needed_slots += len(rows)
        t = clock.now()
        # 3. retire finished requests; their slots are free at the next iteration
        for slot, token in zip(rows, tokens):
            if _stamp(run.results[active[slot].id], token, active[slot], t):
                del active[slot], last_token[slot]
                free.append(slot)
            else:
                last_token[slot] = token
    return run


# ----------------------------------------------------------------------------------------------
# 6. Demo
# ----------------------------------------------------------------------------------------------

def format_row(run: Run) -> str:
    s = summarize(run)
    return (f"| {run.policy} | {s['throughput_tok_s']:.0f} | {100 * s['padding_waste']:.0f}% | "
            f"{1e3 * s['ttft_p50_s']:.0f} / {1e3 * s['ttft_p90_s']:.0f} / {1e3 * s['ttft_p99_s']:.0f} | "
            f"{s['e2e_p50_s']:.2f} / {s['e2e_p90_s']:.2f} / {s['e2e_p99_s']:.2f} | {run.model_calls} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Static vs dynamic vs continuous batching on GPT-2, "
                                "on a seeded Poisson request trace, with real wall-clock time.",
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default="random:tiny", help="random:<preset> or a GPT-2 checkpoint")
    p.add_argument("--requests", type=int, default=24, help="requests in the trace")
    p.add_argument("--rate", type=float, default=100.0, help="arrivals per second (Poisson)")
    p.add_argument("--batch", type=int, default=8, help="batch size / number of slots")
    p.add_argument("--window-ms", type=float, default=100.0, help="dynamic batching window")
    p.add_argument("--max-prompt", type=int, default=48, help="prompt lengths are drawn from 4..this")
    p.add_argument("--max-output", type=int, default=32, help="output lengths are drawn from 4..this")
    p.add_argument("--seed", type=int, default=0, help="seed of the trace")
    add_device_arg(p)
    args = p.parse_args(argv)
    cli_device(p, args.device)
    for name, value, low in (("--requests", args.requests, 1), ("--batch", args.batch, 1),
                             ("--max-prompt", args.max_prompt, 4), ("--max-output", args.max_output, 4)):
        if value < low:
            p.error(f"{name} must be >= {low}, got {value}")
    if not args.rate > 0 or args.window_ms < 0:
        p.error("--rate must be > 0 and --window-ms >= 0")
    with cpu_single_thread(args.device):
        return compare(args)


@contextlib.contextmanager
def cpu_single_thread(device):
    """On CPU, run the block with one PyTorch thread, then restore the setting.
    subtle: a tiny model's matmuls are too small to split across threads, and on a busy machine a
    thread pool that waits for a free core stalls every op (10-50x slower measured on 2 shared
    cores), which would make wall-clock latencies meaningless."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def compare(args) -> int:
    dtype = default_dtype(args.device)
    model = load_gpt2(args.model, dtype, args.device)
    trace = make_trace(args.requests, args.rate, (4, args.max_prompt), (4, args.max_output),
                       model.cfg.vocab_size, args.seed)
    n_tokens = sum(r.max_new_tokens for r in trace)
    print(f"{args.model} on {args.device}: {len(trace)} requests over {trace[-1].arrival_s:.2f} s, "
          f"prompts 4-{args.max_prompt}, outputs 4-{args.max_output} ({n_tokens} tokens to generate)\n")
    run_continuous(model, trace[:2], 2)            # warm-up (first calls allocate and initialise)
    runs = [run_static(model, trace, args.batch),
            run_dynamic(model, trace, args.batch, args.window_ms / 1e3),
            run_continuous(model, trace, args.batch)]
    print("| policy | tok/s | padding waste | TTFT P50/P90/P99 ms | E2E P50/P90/P99 s | model calls |")
    print("| --- | --- | --- | --- | --- | --- |")
    for run in runs:
        print(format_row(run))
    same = all(run.results[r.id].tokens == runs[0].results[r.id].tokens for run in runs for r in trace)
    oracle = all(generate(model, r.prompt, r.max_new_tokens) == runs[-1].results[r.id].tokens
                 for r in trace[:3])
    print(f"\nsame tokens under every policy: {same}; equal to generate() alone (3 checked): {oracle}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
