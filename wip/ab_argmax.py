"""Scratch (branch wip/graph-argmax), GPU: serve.py's decode graph ending in the Triton greedy
argmax (one kernel, also writing last_greedy) vs PyTorch's argmax + copy (main), same process,
alternating 3 rounds: graph step on the capture inputs, end-to-end tok/s (32-token prompt, 256
new tokens, as bench.py) and equal greedy tokens; GPT-2 124M and 1.5B fp16, batch 1 and 32."""
import os, sys, time
import torch
sys.path.insert(0, os.getcwd())
import model as M, serve as S

TRITON_ARGMAX = S.greedy_argmax_triton


def engine(model, use_triton_argmax, max_seqs=1):
    S.greedy_argmax_triton = TRITON_ARGMAX if use_triton_argmax else S.greedy_argmax_reference
    try:
        cfg = S.EngineConfig(device="cuda", dtype="float16", num_blocks=2048 if max_seqs > 1 else 128,
                             max_num_seqs=max_seqs, prefix_caching=False)
        e = S.LLMEngine(cfg, model=model)
        e.generate([list(range(1000, 1032))], S.SamplingParams(max_tokens=4, ignore_eos=True))
    finally:
        S.greedy_argmax_triton = TRITON_ARGMAX
    assert (e.runner.greedy_argmax is TRITON_ARGMAX) == use_triton_argmax
    return e


def graph_ms(e, bs):
    g = e.runner.graphs[bs].graph
    for _ in range(20):
        g.replay()
    st, en = torch.cuda.Event(True), torch.cuda.Event(True); ts = []
    for _ in range(7):
        st.record()
        for _ in range(50):
            g.replay()
        en.record(); en.synchronize(); ts.append(st.elapsed_time(en) / 50)
    return sorted(ts)[3]


def tok_s(e, prompts, n=256):
    P = lambda k: S.SamplingParams(max_tokens=k, ignore_eos=True)   # noqa: E731
    t0 = time.perf_counter(); e.generate(prompts, P(1)); torch.cuda.synchronize()
    t1 = time.perf_counter(); e.generate(prompts, P(n)); torch.cuda.synchronize()
    return len(prompts) * (n - 1) / ((time.perf_counter() - t1) - (t1 - t0))


print(torch.cuda.get_device_name(), flush=True)
rows = []
for size in ("124M", "1.5B"):
    model = M.load_gpt2(f"random:{size}", torch.float16, "cuda")
    for batch in ((1, 32) if size == "124M" else (1,)):
        prompts = [list(range(1000 + i, 1032 + i)) for i in range(batch)]
        engines = {"torch argmax + copy": engine(model, False, batch), "triton argmax": engine(model, True, batch)}
        toks = {k: [o.tokens for o in e.generate(prompts, S.SamplingParams(max_tokens=32, ignore_eos=True))]
                for k, e in engines.items()}
        print(f"{size} batch {batch}: same tokens: {toks['torch argmax + copy'] == toks['triton argmax']}", flush=True)
        res = {k: ([], []) for k in engines}
        for _ in range(3):
            for k, e in engines.items():
                res[k][0].append(graph_ms(e, batch)); res[k][1].append(tok_s(e, prompts))
        for k in engines:
            rows.append((size, batch, k, sorted(res[k][0])[1], sorted(res[k][1])[1]))
            print(f"{size} batch {batch} {k}: graph {rows[-1][3]:.4f} ms, {rows[-1][4]:.0f} tok/s  {res[k]}", flush=True)
        del engines; torch.cuda.empty_cache()
    del model; torch.cuda.empty_cache()
print("\n| model | batch | greedy token | graph step ms | decode tok/s |\n|---|---|---|---|---|")
for r in rows:
    print(f"| GPT-2 {r[0]} | {r[1]} | {r[2]} | {r[3]:.4f} | {r[4]:,.0f} |")
