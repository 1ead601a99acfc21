"""Scratch (branch wip/fused-embed). One-process measurement for a process-level A/B (run from a tree's root): GPT-2 124M and 1.5B fp16
batch 1: end-to-end decode tok/s as bench serve measures it (32-token prompt, 256 new tokens), the
graph step at the capture context, the graph-step breakdown at context 160, and the greedy tokens."""
import json, statistics, sys, os, hashlib
sys.path.insert(0, os.getcwd())
import torch
import model as M, serve as S, bench as B
label = sys.argv[1]
ctx = B.BenchContext(device=torch.device("cuda"), dtype=torch.float16, quick=False)
out = {}
for size in ("124M", "1.5B"):
    model = M.load_gpt2(f"random:{size}", torch.float16, "cuda")
    prompt = [list(range(1000, 1032))]
    e = B._serve_engine(model, ctx, warm=prompt[0], num_blocks=128, max_num_seqs=1, prefix_caching=False)
    P = lambda n: S.SamplingParams(max_tokens=n, ignore_eos=True)
    toks = e.generate(prompt, P(48))[0].tokens
    rates = [B._decode_rate(lambda n: (e.generate(prompt, P(n)), torch.cuda.synchronize()), 256)[0] for _ in range(3)]
    g = e.runner.graphs[1].graph
    for _ in range(20):
        g.replay()
    st, en = torch.cuda.Event(True), torch.cuda.Event(True); ts = []
    for _ in range(7):
        st.record()
        for _ in range(50):
            g.replay()
        en.record(); en.synchronize(); ts.append(st.elapsed_time(en) / 50)
    del e
    res = B.graph_step_breakdown(model, ctx, context=160)
    out[size] = dict(tok_s=statistics.median(rates), graph_ms=statistics.median(ts), span_us=res["span_us"],
                     tokens=hashlib.sha1(str(toks).encode()).hexdigest()[:10],
                     per_kernel={r[0]: round(r[3], 2) for r in res["rows"] if r[0] in ("qkv", "attention", "attn proj", "mlp fc", "mlp proj", "lm head")},
                     early={r[0]: round(r[7], 2) for r in res["rows"] if r[0] in ("qkv", "attention", "attn proj", "mlp fc", "mlp proj")})
    del model; B._free_memory(True)
print("RESULT", label, json.dumps(out), flush=True)
