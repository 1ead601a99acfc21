"""Scratch (branch wip/gemv-preload), GPU: serve.py's decode with this branch's GEMV (parameters
loaded before the PDL wait, x loaded once) against main's (wip/triton_matmul_main.py), same
process, alternating: graph step on the capture inputs, end-to-end tok/s, and equal tokens."""
import importlib.util, os, sys, time
import torch
sys.path.insert(0, os.getcwd())
import model as M, serve as S
import triton_matmul as tm_new
spec = importlib.util.spec_from_file_location("tm_main", os.path.join(os.path.dirname(__file__), "triton_matmul_main.py"))
tm_main = importlib.util.module_from_spec(spec); spec.loader.exec_module(tm_main)

def engine(model, mod):
    S.tm = mod
    cfg = S.EngineConfig(device="cuda", dtype="float16", num_blocks=128, max_num_seqs=1, prefix_caching=False)
    e = S.LLMEngine(cfg, model=model)
    e.generate([list(range(1000, 1032))], S.SamplingParams(max_tokens=4, ignore_eos=True))
    return e

def graph_ms(e):
    g = e.runner.graphs[1].graph
    for _ in range(20): g.replay()
    st, en = torch.cuda.Event(True), torch.cuda.Event(True); ts = []
    for _ in range(7):
        st.record()
        for _ in range(50): g.replay()
        en.record(); en.synchronize(); ts.append(st.elapsed_time(en) / 50)
    return sorted(ts)[3]

def tok_s(e, mod, n=256):
    S.tm = mod
    P = lambda k: S.SamplingParams(max_tokens=k, ignore_eos=True)
    t0 = time.perf_counter(); e.generate([list(range(1000, 1032))], P(1)); torch.cuda.synchronize()
    t1 = time.perf_counter(); e.generate([list(range(1000, 1032))], P(n)); torch.cuda.synchronize()
    return (n - 1) / ((time.perf_counter() - t1) - (t1 - t0))

print(torch.cuda.get_device_name(), flush=True)
for size in ("124M", "1.5B"):
    model = M.load_gpt2(f"random:{size}", torch.float16, "cuda")
    mods = {"main": tm_main, "preload": tm_new}
    engines = {k: engine(model, m) for k, m in mods.items()}
    toks = {}
    for k, e in engines.items():
        S.tm = mods[k]
        toks[k] = e.generate([list(range(1000, 1032))], S.SamplingParams(max_tokens=32, ignore_eos=True))[0].tokens
    print(f"{size}: same tokens: {toks['main'] == toks['preload']}", flush=True)
    res = {k: ([], []) for k in engines}
    for _ in range(3):
        for k, e in engines.items():
            res[k][0].append(graph_ms(e)); res[k][1].append(tok_s(e, mods[k]))
    for k in engines:
        print(f"{size} {k:8s}: graph {sorted(res[k][0])[1]:.4f} ms, {sorted(res[k][1])[1]:.0f} tok/s  {res[k]}", flush=True)
    del engines, model; torch.cuda.empty_cache()
