"""
test_all.py: the one test suite.

    python -m pytest -q test_all.py            # CPU: everything, Triton kernels under the interpreter
    python -m pytest -q test_all.py -k cuda    # on a GPU machine: the GPU variants too

Every fast path is compared with a plain reference on fresh random inputs (never zeros), on
several shapes including awkward ones (length 1, primes, non-multiples of a tile). Tests whose
name ends in `cuda` need a GPU and are skipped where there is none; everything else runs on a
laptop CPU. Tolerances by dtype: fp32 ~1e-5 relative, fp16/bf16 ~1e-2. No timings here:
timing lives in bench.py.
"""
import os

import torch

# Triton kernels run on CPU tensors through the interpreter; it must be on before triton loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json
import math

import pytest
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import attention as A
import kvcache as KV
import model as M

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def rel_err(a, b):
    """max |a - b| / max |b|, in float64; NaN anywhere fails."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "result has NaN/inf"
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def perturb(model, std=0.3, seed=0):
    """Random weights with enough spread that greedy decoding does not collapse into repeating
    one token (GPT-2's own init of N(0, 0.02) with a tied head mostly echoes the input)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.device, p.dtype) * std)
    return model


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

def test_tokenizer_known_ids_offline():
    tok = M.gpt2_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert tok.eot_token == 50256 and tok.n_vocab == 50257
    assert tok.decode([15496, 995]) == "Hello world"


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.",
    "naïve café, 東京, emoji 🚀🔥, Ünïcödé",
    "def f(x):\n\treturn x ** 2  # squares\n",
    "   leading and    internal     whitespace runs\n\n\n  ",
    "it's we'll they've I'm she'd 12345 3.14159",
])
def test_tokenizer_round_trip(text):
    tok = M.gpt2_tokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 50257 for i in ids)
    assert tok.decode(ids) == text


def test_tokenizer_rejects_corrupted_vocab(tmp_path, monkeypatch):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(M.GPT2_VOCAB_FILE.read_bytes()[:-10])
    monkeypatch.setattr(M, "GPT2_VOCAB_FILE", bad)
    monkeypatch.setattr(M, "_TOKENIZER", None)
    with pytest.raises(RuntimeError, match="SHA-256"):
        M.gpt2_tokenizer()


# ----------------------------------------------------------------------------------------------
# Loader: our GPT-2 vs transformers.GPT2LMHeadModel on the same safetensors
# ----------------------------------------------------------------------------------------------

HF_CONFIGS = {
    "3-heads": dict(n_layer=2, n_head=3, n_embd=48, n_positions=96),     # n_head not a power of 2
    "4-heads": dict(n_layer=3, n_head=4, n_embd=64, n_positions=128),
}


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def hf_checkpoint(request, tmp_path_factory):
    """A random transformers GPT-2 saved by save_pretrained, plus the same tensors re-saved with
    the original hub layout (no `transformer.` prefix) in a second folder."""
    import transformers
    torch.manual_seed(sorted(HF_CONFIGS).index(request.param))
    cfg = transformers.GPT2Config(vocab_size=50257, **HF_CONFIGS[request.param])
    hf = perturb(transformers.GPT2LMHeadModel(cfg), std=0.1).eval()
    prefixed = tmp_path_factory.mktemp(f"hf-{request.param}")
    hf.save_pretrained(prefixed)
    tensors = load_file(str(prefixed / "model.safetensors"))
    assert any(k.startswith("transformer.") for k in tensors)
    bare = tmp_path_factory.mktemp(f"hub-layout-{request.param}")
    save_file({k.removeprefix("transformer."): v.contiguous() for k, v in tensors.items()
               if k != "lm_head.weight"}, str(bare / "model.safetensors"))
    (bare / "config.json").write_text((prefixed / "config.json").read_text())
    return hf, prefixed, bare


@pytest.mark.parametrize("layout", ["prefixed", "bare"])
def test_loader_matches_transformers(hf_checkpoint, layout):
    hf, prefixed, bare = hf_checkpoint
    ours = M.load_gpt2(str(prefixed if layout == "prefixed" else bare))
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50257, (3, 29), generator=gen)
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours(tokens)
    assert rel_err(got, ref) < 1e-4
    prompt = tokens[0, :11]
    want = hf.generate(prompt[None], max_new_tokens=20, do_sample=False, pad_token_id=0,
                       attention_mask=torch.ones_like(prompt[None]))[0, 11:].tolist()
    got_tokens = M.generate(ours, prompt.tolist(), 20)
    assert got_tokens == want
    assert len(set(want)) > 3, "degenerate test: greedy output barely varies"


def test_loader_single_file_without_config(hf_checkpoint, tmp_path):
    """A bare .safetensors file: the config is inferred from the tensor shapes (head_dim 64)."""
    import transformers
    cfg = transformers.GPT2Config(vocab_size=50257, n_layer=2, n_head=2, n_embd=128, n_positions=64)
    hf = perturb(transformers.GPT2LMHeadModel(cfg), std=0.05).eval()
    hf.save_pretrained(tmp_path)
    lone = tmp_path / "lone" / "weights.safetensors"
    lone.parent.mkdir()
    lone.write_bytes((tmp_path / "model.safetensors").read_bytes())
    ours = M.load_gpt2(str(lone))
    assert ours.cfg.n_head == 2 and ours.cfg.n_layer == 2 and ours.cfg.max_seq_len == 64
    tokens = torch.randint(0, 50257, (2, 13))
    with torch.no_grad():
        assert rel_err(ours(tokens), hf(tokens).logits) < 1e-4


def test_loader_errors_are_clear(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(RuntimeError, match="Offline options.*random:124M"):
        M.load_gpt2("gpt2")
    with pytest.raises(FileNotFoundError, match="neither a local path nor a hub name"):
        M.load_gpt2("/no/such/checkpoint")
    with pytest.raises(ValueError, match="unknown preset"):
        M.load_gpt2("random:7B")


def test_random_presets_are_seeded_and_sized():
    a, b = M.load_gpt2("random:tiny"), M.load_gpt2("random:tiny")
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert a.cfg == M.PRESETS["tiny"]
    # GPT-2 124M has 124.4M parameters with the tied head; count without building it
    with torch.device("meta"):
        assert round(M.Transformer(M.PRESETS["124M"]).num_params() / 1e6, 1) == 124.4
        assert round(M.Transformer(M.PRESETS["1.5B"]).num_params() / 1e9, 2) == 1.56


@needs_cuda
def test_loader_matches_transformers_fp16_cuda(hf_checkpoint):
    hf, prefixed, _ = hf_checkpoint
    ours = M.load_gpt2(str(prefixed), torch.float16, "cuda")
    tokens = torch.randint(0, 50257, (2, 64), device="cuda")
    with torch.no_grad():
        ref = hf.to("cuda")(tokens).logits
        got = ours(tokens).float()
    hf.to("cpu")
    assert rel_err(got, ref) < 1e-2


# ----------------------------------------------------------------------------------------------
# The Llama-family path of model.py (GQA, RoPE, RMSNorm, SwiGLU) vs transformers' LlamaForCausalLM
# ----------------------------------------------------------------------------------------------

def test_llama_path_matches_transformers():
    import transformers
    cfg = M.PRESETS["tiny-llama"]
    hf_cfg = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd,
                                      intermediate_size=cfg.ff_dim, num_hidden_layers=cfg.n_layer,
                                      num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
                                      max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                                      rope_theta=cfg.rope_base, tie_word_embeddings=False)
    torch.manual_seed(3)
    hf = perturb(transformers.LlamaForCausalLM(hf_cfg), std=0.1).eval()
    sd = hf.state_dict()
    ours = M.Transformer(cfg)
    mine = {"tok_emb.weight": sd["model.embed_tokens.weight"], "norm_f.weight": sd["model.norm.weight"],
            "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        mine[f"blocks.{i}.norm1.weight"] = sd[p + "input_layernorm.weight"]
        mine[f"blocks.{i}.norm2.weight"] = sd[p + "post_attention_layernorm.weight"]
        mine[f"blocks.{i}.attn.qkv.weight"] = torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        mine[f"blocks.{i}.attn.proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        mine[f"blocks.{i}.mlp.fc.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        mine[f"blocks.{i}.mlp.proj.weight"] = sd[p + "mlp.down_proj.weight"]
    ours.load_state_dict(mine, strict=True)
    tokens = torch.randint(0, cfg.vocab_size, (2, 41))
    with torch.no_grad():
        assert rel_err(ours(tokens), hf(tokens).logits) < 1e-4
    want = hf.generate(tokens[:1, :9], max_new_tokens=15, do_sample=False, pad_token_id=0,
                       attention_mask=torch.ones(1, 9, dtype=torch.long))[0, 9:].tolist()
    assert M.generate(ours.eval(), tokens[0, :9].tolist(), 15) == want


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        M.ModelConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        M.ModelConfig(n_head=12, n_kv_head=5)
    with pytest.raises(ValueError, match="norm"):
        M.ModelConfig(norm="batchnorm")


# ----------------------------------------------------------------------------------------------
# attention.py against SDPA
# ----------------------------------------------------------------------------------------------

ATTN_SHAPES = [  # B, H, Hkv, T, D
    (1, 4, 4, 1, 64),      # a single token
    (2, 4, 4, 17, 32),     # odd length
    (3, 6, 2, 33, 64),     # GQA 3:1
    (1, 8, 1, 31, 16),     # MQA, prime length
    (2, 12, 12, 64, 64),   # GPT-2 head shape
]


def _tol(dtype, device):
    if dtype != torch.float32:
        return 1e-2
    # on a GPU, SDPA and matmuls may use TF32 tensor cores for fp32 inputs
    return 2e-5 if device == "cpu" else 3e-3


# fp32 everywhere; fp16/bf16 on the GPU (half-precision matmuls on a CPU are emulated and slow)
DTYPE_DEVICE = [(torch.float32, "cpu"), pytest.param(torch.float32, "cuda", marks=needs_cuda),
                pytest.param(torch.float16, "cuda", marks=needs_cuda),
                pytest.param(torch.bfloat16, "cuda", marks=needs_cuda)]


@pytest.mark.parametrize("dtype,device", DTYPE_DEVICE)
@pytest.mark.parametrize("shape", ATTN_SHAPES)
def test_attention_variants_match_sdpa(shape, dtype, device):
    B, H, Hkv, T, D = shape
    q, k, v = A.random_qkv(B, H, Hkv, T, T, D, dtype, device)
    ref = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(H // Hkv, 1),
                                         v.float().repeat_interleave(H // Hkv, 1), is_causal=True)
    tol = _tol(dtype, device)
    assert rel_err(A.sdpa(q, k, v), ref) < tol
    assert rel_err(A.gqa_by_repeat(q, k, v), ref) < tol
    assert rel_err(A.grouped_query_attention(q, k, v), ref) < tol
    if H == Hkv:
        assert rel_err(A.causal_attention(q, k, v), ref) < tol
        no_mask = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        assert rel_err(A.naive_attention(q, k, v), no_mask) < tol
    # decode = the last row of prefill, with no mask
    assert rel_err(A.decode_attention(q[:, :, -1:], k, v), ref[:, :, -1:]) < tol


@pytest.mark.parametrize("T,S", [(1, 9), (5, 23), (16, 16)])
def test_causal_mask_bottom_right(T, S):
    """T new queries against S keys = the last T rows of a full S x S causal attention."""
    q, k, v = A.random_qkv(2, 4, 4, S, S, 32)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert rel_err(A.causal_attention(q[:, :, -T:], k, v), full[:, :, -T:]) < 2e-5
    assert rel_err(A.sdpa(q[:, :, -T:], k, v), full[:, :, -T:]) < 2e-5


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_mha_function_matches_model_attention(preset):
    """attention.multi_head_attention (plain function) == model.Attention (the module the model runs)."""
    cfg = M.PRESETS[preset]
    if cfg.pos == "rope":
        cfg = M.ModelConfig(**{**M.asdict(cfg), "pos": "learned"})   # rope lives outside the function
    layer = perturb(M.Attention(cfg), std=0.1)
    x = torch.randn(2, 19, cfg.n_embd)
    pos = torch.arange(19).expand(2, 19)
    with torch.no_grad():
        want = layer(x, 0, pos, None, None)
        got = A.multi_head_attention(x, layer.qkv.weight, layer.qkv.bias, layer.proj.weight,
                                     layer.proj.bias, cfg.n_head, cfg.kv_heads)
    assert rel_err(got, want) < 2e-5


# ----------------------------------------------------------------------------------------------
# KV cache: decode with the cache == recompute, at every step
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", ["tiny", "tiny-3head", "tiny-llama"])
def test_decode_with_cache_equals_recompute(preset, device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = perturb(M.load_gpt2(f"random:{preset}"), std=0.1).to(device, dtype)
    gen = torch.Generator().manual_seed(7)
    B, P, steps = 3, 13, 12
    seq = torch.randint(0, model.cfg.vocab_size, (B, P), generator=gen).to(device)
    cache = M.KVCache(model.cfg, B, P + steps, dtype, device)
    logits = M.prefill(model, seq, cache)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for _ in range(steps):
        with torch.no_grad():
            full = model(seq)[:, -1]            # recompute everything, no cache
        assert rel_err(logits.float(), full.float()) < tol
        nxt = torch.randint(0, model.cfg.vocab_size, (B,), generator=gen).to(device)  # teacher-forced
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        logits = M.decode(model, nxt, cache)
    assert cache.lengths == [P + steps] * B


@pytest.mark.parametrize("preset", ["tiny", "tiny-3head", "tiny-llama"])
def test_generate_with_and_without_cache_same_tokens(preset):
    model = perturb(M.load_gpt2(f"random:{preset}"), std=0.2)
    prompt = torch.randint(0, model.cfg.vocab_size, (10,)).tolist()
    with_cache = M.generate(model, prompt, 24)
    assert with_cache == KV.generate_without_cache(model, prompt, 24)
    assert len(set(with_cache)) > 3


@pytest.mark.parametrize("H,Hkv", [(4, 4), (6, 2), (5, 1)])
def test_decode_only_attention_ragged_lengths(H, Hkv):
    """Rows with different lengths in one batched decode: each row equals attention over its own prefix."""
    B, S, D = 4, 40, 16
    q = torch.randn(B, H, D)
    k, v = torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    lengths = torch.tensor([1, 17, 40, 29])
    out = KV.decode_only_attention(q, k, v, lengths)
    for b, n in enumerate(lengths.tolist()):
        ref = A.sdpa(q[b:b + 1, :, None], k[b:b + 1, :, :n], v[b:b + 1, :, :n], causal=False)[0, :, 0]
        assert rel_err(out[b], ref) < 2e-5


def test_kv_cache_rows_of_different_lengths():
    """Continuous-batching use of model.KVCache: rows filled one by one (out of order, one row
    reused after a reset) then decoded together give each row its own logits."""
    model = perturb(M.load_gpt2("random:tiny-llama"), std=0.1)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=gen).tolist() for n in (5, 11, 2)]
    cache = M.KVCache(model.cfg, 4, 32)
    M.prefill(model, torch.tensor([[1, 2, 3, 4, 5, 6, 7]]), cache, rows=[0])   # a finished sequence ...
    cache.reset(0)                                                            # ... whose row is reused
    for row, p in zip((2, 0, 3), prompts):
        M.prefill(model, torch.tensor([p]), cache, rows=[row])
    nxt = torch.tensor([7, 8, 9])
    logits = M.decode(model, nxt, cache, rows=[2, 0, 3])
    for b, p in enumerate(prompts):
        with torch.no_grad():
            ref = model(torch.tensor([p + [int(nxt[b])]]))[0, -1]
        assert rel_err(logits[b], ref) < 1e-4
    assert cache.lengths == [12, 0, 6, 3]


def test_kv_memory_formula_matches_allocation():
    for name in ("tiny", "tiny-llama", "124M"):
        cfg = M.PRESETS[name]
        assert KV.measure_cache_memory(cfg, 64, 2, torch.float16, torch.device("cpu")) == \
            KV.kv_cache_bytes(cfg, 64, 2, torch.float16)
    assert M.kv_bytes_per_token(M.PRESETS["124M"], torch.float16) == 36864
    assert M.kv_bytes_per_token(M.PRESETS["1.5B"], torch.float16) == 307200
    # GQA divides the cache by n_head / n_kv_head
    llama = M.PRESETS["tiny-llama"]
    mha = M.ModelConfig(**{**M.asdict(llama), "n_kv_head": None})
    assert M.kv_bytes_per_token(mha, torch.float16) == 3 * M.kv_bytes_per_token(llama, torch.float16)


@needs_cuda
def test_kv_memory_measured_by_allocator_cuda():
    cfg = M.PRESETS["124M"]
    got = KV.measure_cache_memory(cfg, 512, 4, torch.float16, torch.device("cuda"))
    want = KV.kv_cache_bytes(cfg, 512, 4, torch.float16)
    assert want <= got <= want + 2 * 2**20 + 4096


def test_cache_and_context_limits():
    model = M.load_gpt2("random:tiny")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        M.KVCache(model.cfg, 1, model.cfg.max_seq_len + 1)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        M.generate(model, [1] * 200, 100)
    with pytest.raises(ValueError, match="empty"):
        M.generate(model, [], 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        M.generate(model, [1, 2], 0)
    cache = M.KVCache(model.cfg, 1, 4)
    M.prefill(model, torch.tensor([[1, 2, 3, 4]]), cache)
    with pytest.raises(ValueError, match="full"):
        M.decode(model, torch.tensor([5]), cache)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------

def test_sampling_seeded_and_filtered():
    model = perturb(M.load_gpt2("random:tiny"), std=0.2)
    prompt = [1, 2, 3, 4, 5]
    a = M.generate(model, prompt, 20, temperature=1.0, seed=11)
    b = M.generate(model, prompt, 20, temperature=1.0, seed=11)
    c = M.generate(model, prompt, 20, temperature=1.0, seed=12)
    assert a == b and a != c
    greedy = M.generate(model, prompt, 20)
    assert M.generate(model, prompt, 20, temperature=0.7, top_k=1, seed=3) == greedy
    assert M.generate(model, prompt, 20, temperature=0.7, top_p=1e-6, seed=3) == greedy
    logits = torch.randn(4, 1000)
    gen = torch.Generator().manual_seed(0)
    top5 = logits.topk(5, dim=-1).indices
    for _ in range(50):
        s = M.sample(logits, 1.5, top_k=5, generator=gen)
        assert all(s[i] in top5[i] for i in range(4))
    # nucleus: a distribution with 3 dominant tokens (p ~ 0.33 each) and top_p=0.5 keeps 2 of them
    peaked = torch.full((1, 100), -20.0)
    peaked[0, [3, 50, 70]] = torch.tensor([5.0, 4.9, 4.8])
    draws = {int(M.sample(peaked, 1.0, top_p=0.5, generator=gen)) for _ in range(100)}
    assert draws == {3, 50}


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")])
def test_sampling_rejects_bad_parameters(kwargs, match):
    model = M.load_gpt2("random:tiny")
    with pytest.raises(ValueError, match=match):
        M.generate(model, [1, 2], 3, **kwargs)


# ----------------------------------------------------------------------------------------------
# Each file's demo / CLI runs (smoke tests: they assert on output, not on time)
# ----------------------------------------------------------------------------------------------

def test_demos_run(capsys, tmp_path):
    import bench
    assert M.main(["--model", "random:tiny", "--max-tokens", "5", "--prompt", "Hi"]) == 0
    assert "tok/s" in capsys.readouterr().out
    assert M.main(["--model", "/no/such/dir"]) == 2
    assert A.main(["--seq", "5"]) == 0
    assert KV.main(["--tokens", "4"]) == 0
    assert "same tokens: True" in capsys.readouterr().out
    for topic in ("attention", "kv"):
        assert bench.main(["--topic", topic, "--plot", "--md", "--json", "--outdir", str(tmp_path)]) == 0
        tables = json.loads((tmp_path / f"{topic}.json").read_text())["tables"]
        assert any(t.get("rows") for t in tables)
        assert (tmp_path / f"{topic}.md").read_text().count("device: **") >= 3
    assert {p.name for p in tmp_path.glob("*.png")} >= {"attention.png", "kv_with_without.png",
                                                         "kv_memory.png", "kv_layout.png"}
