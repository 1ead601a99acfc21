"""
bench.py: every number in this repository comes from here.

    python bench.py --topic kv                  # markdown tables on stdout
    python bench.py --topic attention --plot    # ... and PNGs under results/
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
kvcache.py, ...) hold the code being measured and no timing code; this file holds the timing
and no model code.

Every table starts with a line naming the device, dtype and versions, so a pasted table can
never lose where it was measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

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
    outdir: Path = HERE / "results"
    tables: list = field(default_factory=list)   # everything printed, for --json / --md
    header: str = ""

    def __post_init__(self):
        self.header = device_description(self.device, self.dtype)

    def table(self, title: str, headers: list[str], rows: list[list], note: str = "") -> None:
        """Print (and record) a markdown table; floats get 3 significant digits."""
        def cell(x):
            if isinstance(x, float):
                if math.isnan(x):
                    return "-"
                return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
            return str(x)
        lines = [f"### {title}", "", self.header, "",
                 "| " + " | ".join(headers) + " |",
                 "| " + " | ".join("---" for _ in headers) + " |"]
        lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
        if note:
            lines += ["", note]
        text = "\n".join(lines) + "\n"
        print(text, flush=True)
        self.tables.append({"title": title, "headers": headers, "note": note,
                            "rows": [[x if isinstance(x, (int, float, str)) else str(x) for x in r]
                                     for r in rows],
                            "markdown": text})

    def note(self, text: str) -> None:
        print(text + "\n", flush=True)
        self.tables.append({"title": "", "markdown": text + "\n"})

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


def measure_ceilings(ctx: BenchContext) -> dict:
    """The two physical limits every roofline here is drawn against, measured once per run.

    copy_gbps: a large device-to-device copy, counting bytes read + bytes written. On an H100 this
      lands near 3 TB/s, on an H200 near 4.3 TB/s (datasheet HBM: 3.35 and 4.8 TB/s).
    matmul_tflops: cuBLAS on an 8192^3 product in ctx.dtype (2*M*N*K FLOPs). Dense bf16 on Hopper
      measures ~780-800 TFLOP/s against a datasheet ~990.
    On CPU the same two numbers are measured on small sizes, for the shape of the plots only.
    """
    key = (str(ctx.device), ctx.dtype)
    if key in _CEILINGS:
        return _CEILINGS[key]
    n_bytes = (1 << 30) if not ctx.quick else (64 << 20)          # 1 GiB: far past the 50 MB L2
    src = torch.randn(n_bytes // 4, device=ctx.device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), ctx)
    copy_gbps = 2 * n_bytes / (copy_ms * 1e-3) / 1e9
    n = 8192 if not ctx.quick else 512
    mm_dtype = ctx.dtype if ctx.device.type == "cuda" else torch.float32
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


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def write_outputs(ctx: BenchContext, topic: str, want_json: bool, want_md: bool) -> None:
    ctx.outdir.mkdir(parents=True, exist_ok=True)
    if want_md:
        path = ctx.outdir / f"{topic}.md"
        body = "\n".join(t["markdown"] for t in ctx.tables)
        path.write_text(f"# bench.py --topic {topic}\n\n" + body)
        print(f"wrote {path}")
    if want_json:
        path = ctx.outdir / f"{topic}.json"
        path.write_text(json.dumps({"header": ctx.header, "tables": ctx.tables}, indent=1))
        print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Benchmarks for every WaveBoost topic. Prints markdown tables; the first line "
                    "of each names the device, dtype and versions.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--topic", required=True, choices=sorted(TOPICS) + ["all"],
                   help="which topic to measure ('all' runs each in turn)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"], help="where to run")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="compute dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=None,
                   help="tiny sizes and few repetitions (default: on for cpu, off for cuda)")
    p.add_argument("--plot", action="store_true", help="also write PNG plots to --outdir")
    p.add_argument("--json", action="store_true", help="also write <topic>.json to --outdir")
    p.add_argument("--md", action="store_true", help="also write <topic>.md to --outdir")
    p.add_argument("--outdir", type=Path, default=HERE / "results", help="where files go")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for, but torch sees no CUDA device here")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    quick = args.quick if args.quick is not None else device.type == "cpu"
    torch.manual_seed(0)

    topics = sorted(TOPICS) if args.topic == "all" else [args.topic]
    for topic in topics:
        ctx = BenchContext(device=device, dtype=dtype, quick=quick, plot=args.plot,
                           outdir=args.outdir)
        print(f"## topic: {topic}\n", flush=True)
        t0 = time.perf_counter()
        TOPICS[topic](ctx)
        print(f"(topic {topic} took {time.perf_counter() - t0:.1f} s)\n", flush=True)
        write_outputs(ctx, topic, args.json, args.md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
