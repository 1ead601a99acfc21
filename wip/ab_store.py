"""Scratch (branch wip/fused-store-decode): engine decode with the K/V store inside the paged-decode
kernel (which then also loads its first cached tile before the PDL wait) vs the separate store kernel, same process, alternating, GPT-2 124M and 1.5B fp16, batch 1
(graph step on the capture inputs and end-to-end tok/s as bench.py measures it), plus batch 32."""
import os, sys, time
import torch
sys.path.insert(0, os.getcwd())
import model as M, serve as S

def engine(model, fused, max_seqs=1):
    cfg = S.EngineConfig(device="cuda", dtype="float16", num_blocks=2048 if max_seqs > 1 else 128,
                         max_num_seqs=max_seqs, prefix_caching=False, store_kv_in_attention=fused)
    e = S.LLMEngine(cfg, model=model)
    e.generate([list(range(1000, 1032))], S.SamplingParams(max_tokens=4, ignore_eos=True))
    return e

def tok_s(e, prompts, n=256):
    P = lambda k: S.SamplingParams(max_tokens=k, ignore_eos=True)
    t0 = time.perf_counter(); e.generate(prompts, P(1)); torch.cuda.synchronize()
    t1 = time.perf_counter(); e.generate(prompts, P(n)); torch.cuda.synchronize()
    return len(prompts) * (n - 1) / ((time.perf_counter() - t1) - (t1 - t0))

def graph_ms(e, bs=1):
    g = e.runner.graphs[bs].graph
    for _ in range(20): g.replay()
    st, en = torch.cuda.Event(True), torch.cuda.Event(True); ts = []
    for _ in range(7):
        st.record()
        for _ in range(50): g.replay()
        en.record(); en.synchronize(); ts.append(st.elapsed_time(en) / 50)
    return sorted(ts)[3]

def breakdown(e, label, n=20, bs=1):
    """GPU time per kernel name inside the captured step (torch.profiler over n graph replays):
    where the step's time goes, to explain the A/B. Under PDL kernels overlap, so the column
    sums to more than the step."""
    from torch.profiler import ProfilerActivity, profile
    g = e.runner.graphs[bs].graph
    g.replay(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            g.replay()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
        if t > 0:
            rows.append((t / n, ev.count / n, ev.key[:60]))
    rows.sort(reverse=True)
    print(f"-- {label}: us per step by kernel (calls per step)", flush=True)
    for t, c, k in rows[:14]:
        print(f"   {t:8.1f} us  {c:5.0f}  {k}", flush=True)
    print(f"   sum {sum(r[0] for r in rows):.1f} us over {sum(r[1] for r in rows):.0f} kernels", flush=True)

print(torch.cuda.get_device_name(), flush=True)
rows = []
for size in ("124M", "1.5B"):
    model = M.load_gpt2(f"random:{size}", torch.float16, "cuda")
    engines = {f: engine(model, f) for f in (False, True)}
    prompt = [list(range(1000, 1032))]
    ref = engines[False].generate(prompt, S.SamplingParams(max_tokens=32, ignore_eos=True))[0].tokens
    got = engines[True].generate(prompt, S.SamplingParams(max_tokens=32, ignore_eos=True))[0].tokens
    print(f"{size}: same greedy tokens fused vs separate: {ref == got}", flush=True)
    if size == "1.5B":
        for f, e in engines.items():
            try:
                breakdown(e, f"{size} {'fused store' if f else 'store kernel'}")
            except Exception as err:      # noqa: BLE001 (the A/B below matters more)
                print(f"breakdown failed: {type(err).__name__}: {err}", flush=True)
    res = {f: ([], []) for f in engines}
    for rep in range(3):
        for f, e in engines.items():
            res[f][0].append(graph_ms(e)); res[f][1].append(tok_s(e, prompt))
    for f in engines:
        g, t = sorted(res[f][0])[1], sorted(res[f][1])[1]
        rows.append((size, "batch 1", "fused store" if f else "store kernel", g, t))
        print(f"{size} batch 1 {'fused' if f else 'separate'}: graph {g:.4f} ms, {t:.0f} tok/s ({res[f]})", flush=True)
    del engines
    if size == "124M":
        for f in (False, True):
            e = engine(model, f, max_seqs=32)
            prompts = [list(range(1000 + i, 1032 + i)) for i in range(32)]
            tok_s(e, prompts, 64)
            t = sorted(tok_s(e, prompts, 256) for _ in range(3))[1]
            rows.append((size, "batch 32", "fused store" if f else "store kernel", float("nan"), t))
            print(f"{size} batch 32 {'fused' if f else 'separate'}: {t:.0f} tok/s", flush=True)
            del e
    del model; torch.cuda.empty_cache()
print(f"\n| model | batch | K/V store | graph step ms | decode tok/s |\n|---|---|---|---|---|")
for r in rows:
    print(f"| GPT-2 {r[0]} | {r[1]} | {r[2]} | {r[3]:.4f} | {r[4]:,.0f} |")
