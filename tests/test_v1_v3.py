"""RWKV-1, -2 and -3: the three tiers agree (oracle, parallel, step) with the state carried across
split calls; gradients of the parallel form match the oracle's; a float64 NumPy reference written
from the official equations (spec §3-§5, not from our code) agrees; state_dicts with the official
key names load and save bit-exact; the official initialisation; v1's ctx_len limit.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rwkv_jax as rj
from helpers import forward_fn, random_params, random_tokens, rel_err, step_fn
from rwkv_jax.generation import decode, prefill
from rwkv_jax.io.official import CheckpointError, expected_official_shapes, params_from_official

TOL = 1e-5
REFERENCE_TOL = 1e-5
V = 41


def make_cfg(version: int, wkv: str = "parallel", **extra) -> rj.RWKVConfig:
    """Tiny models; v1 (4 heads of 8) runs up to its ctx_len, v2/v3 past theirs (the copy window)."""
    sizes = dict(head_size=8, ctx_len=16) if version == 1 else dict(ctx_len=8)
    return rj.RWKVConfig(version=version, n_layer=2, n_embd=32, vocab_size=V, wkv=wkv, **{**sizes, **extra})


@functools.lru_cache(maxsize=None)
def params_for(cfg: rj.RWKVConfig):
    # Jitted: running the init forward pass op by op costs several seconds of compiles.
    return jax.jit(random_params, static_argnums=(0, 1))(cfg, cfg.version)


def assert_states_close(actual: dict, expected: dict, tol: float = TOL) -> None:
    assert set(actual) == set(expected)
    errors = {name: rel_err(actual[name], expected[name]) for name in expected}
    assert max(errors.values()) <= tol, errors


# ------------------------------------------------------------------------------------- tiers


@pytest.mark.parametrize("version,extra", [(1, ()), (2, ()), (3, ()), (3, (("head_qk", 0),))])
def test_tiers_agree_and_split_calls_carry_state(version, extra):
    batch, length, split = 3, 13, 6
    cfg = make_cfg(version, **dict(extra))
    params = params_for(cfg)
    tokens = random_tokens(cfg, batch, length, seed=1)
    logits_o, state_o = forward_fn(cfg.replace(wkv="oracle"))(params, tokens, rj.init_state(cfg, batch))
    assert bool(jnp.all(jnp.isfinite(logits_o)))

    logits_p, state_p = forward_fn(cfg)(params, tokens, rj.init_state(cfg, batch))
    assert rel_err(logits_p, logits_o) <= TOL
    assert_states_close(state_p, state_o)

    state, stepped = rj.init_state(cfg, batch), []
    for t in range(length):
        logits_t, state = step_fn(cfg)(params, tokens[:, t], state)
        stepped.append(logits_t)
    assert rel_err(jnp.stack(stepped, 1), logits_o) <= TOL
    assert_states_close(state, state_o)

    first, mid = forward_fn(cfg)(params, tokens[:, :split], rj.init_state(cfg, batch))
    second, end = forward_fn(cfg)(params, tokens[:, split:], mid)
    assert rel_err(jnp.concatenate([first, second], 1), logits_o) <= TOL
    assert_states_close(end, state_o)
    if "pos" in end:
        np.testing.assert_array_equal(end["pos"], length)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_parallel_gradients_match_oracle(version):
    cfg = make_cfg(version)
    params = params_for(cfg)
    tokens = random_tokens(cfg, 2, 13, seed=3)
    # Continue from the state after a prefix, so the gradient flows into a nonzero state (and,
    # for v2/v3 with ctx_len 8, through a copy window that slides during the call).
    _, state = forward_fn(cfg)(params, tokens[:, :5], rj.init_state(cfg, 2))
    floats = {k: s for k, s in state.items() if jnp.issubdtype(s.dtype, jnp.floating)}
    ints = {k: s for k, s in state.items() if k not in floats}
    inputs, targets = tokens[:, 5:], jnp.roll(tokens[:, 5:], -1, axis=1)

    def grad_fn(wkv):
        def loss(params, floats):
            logits, _ = rj.RWKV(cfg.replace(wkv=wkv)).apply({"params": params}, inputs, {**floats, **ints})
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))
        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    grads = {wkv: grad_fn(wkv)(params, floats) for wkv in ("oracle", "parallel")}
    flat_o, _ = jax.tree_util.tree_flatten_with_path(grads["oracle"])
    flat_p = jax.tree_util.tree_leaves(grads["parallel"])
    errors = [(rel_err(p, o), jax.tree_util.keystr(path)) for (path, o), p in zip(flat_o, flat_p)
              if np.max(np.abs(o)) > 0]
    assert len(errors) > 20 and max(errors)[0] <= 1e-5, max(errors)


# ------------------------------------------------------------ official keys and a NumPy reference


def official_shapes(version: int, L: int, C: int, V: int, TT: int, H: int = 0, D: int = 256) -> dict:
    """State_dict keys and stored shapes, transcribed from spec §3.7 (v1), §4.5 (v2) and §5 (v3)."""
    A, F = C, (5 * C // 2 if version == 1 else 4 * C)
    shapes: dict[str, tuple] = {}
    if version == 1:
        shapes["tok_emb.weight"] = (V, C)
    else:
        shapes["emb.weight"] = (V, C)
    for l in range(L):
        b = f"blocks.{l}."
        for norm in ("ln1", "ln2") + (("ln0",) if version == 3 and l == 0 else ()):
            shapes[b + norm + ".weight"] = shapes[b + norm + ".bias"] = (C,)
        if version == 1:
            shapes.update({b + "attn.time_w": (H, TT), b + "attn.time_alpha": (H, 1, TT),
                           b + "attn.time_beta": (H, TT, 1), b + "attn.time_gamma": (TT, 1)})
            linears = {"attn.key": (A, C), "attn.value": (A, C), "attn.receptance": (A, C), "attn.output": (C, A),
                       "mlp.key": (F, C), "mlp.value": (F, C), "mlp.receptance": (C, C), "mlp.weight": (C, F)}
            for name, shape in linears.items():
                shapes[b + name + ".weight"], shapes[b + name + ".bias"] = shape, shape[:1]
            continue
        shapes[b + "att.time_decay"] = shapes[b + "att.time_first"] = (A, 1)
        mixes = ["att.time_mix", "ffn.time_mix"] if version == 2 else \
            ["att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "ffn.time_mix_k", "ffn.time_mix_r"]
        shapes.update({b + name: (1, 1, C) for name in mixes})
        shapes.update({b + "att.key.weight": (A, C), b + "att.value.weight": (A, C),
                       b + "att.receptance.weight": (A, C), b + "att.output.weight": (C, A),
                       b + "ffn.key.weight": (F, C), b + "ffn.receptance.weight": (C, C),
                       b + "ffn.value.weight": (C, F)})
    out = "ln_f" if version == 1 else "ln_out"
    shapes[out + ".weight"] = shapes[out + ".bias"] = (C,)
    if version == 1:
        shapes["time_out"] = (1, TT, 1)
    shapes["head.weight"] = (V, C)
    shapes["head_q.weight"] = shapes["head_k.weight"] = (D, C)
    if version == 1:
        shapes["head_q.bias"] = shapes["head_k.bias"] = (D,)
    shapes["copy_mask"] = (TT, TT)
    return shapes


def official_tensors(cfg: rj.RWKVConfig, seed: int, key_scale: float = 30.0) -> dict[str, np.ndarray]:
    """Random float32 tensors under the official keys. Layer 1's attention keys are scaled by
    `key_scale` so that k crosses the official clamps (v1: [-60, 30], v2/v3: <= 60)."""
    rng = np.random.RandomState(seed)
    shapes = official_shapes(cfg.version, cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.ctx_len, cfg.n_head)
    tensors = {}
    for key, shape in shapes.items():
        name = key.rsplit(".", 1)[-1]
        if key == "copy_mask":
            value = np.tril(np.ones(shape))
        elif name.startswith("time_mix"):
            value = rng.uniform(0, 1, shape)
        elif name == "time_decay":
            value = rng.uniform(-2, 1, shape)
        elif name == "time_first":
            value = math.log(0.3) + 0.5 * rng.randn(*shape)
        elif name == "time_w":
            value = rng.uniform(0, 1.2, shape)
        elif name.startswith("time_"):  # alpha, beta, gamma, time_out
            value = 1 + 0.3 * rng.randn(*shape)
        elif ".ln" in key or key.startswith("ln"):
            value = (1.0 if name == "weight" else 0.0) + 0.2 * rng.randn(*shape)
        elif name == "bias":
            value = 0.2 * rng.randn(*shape)
        else:  # Linear and embedding weights (out, in); the copy head made large enough to matter
            value = rng.randn(*shape) / math.sqrt(shape[1]) * (4 if key.startswith("head_") else 1)
        tensors[key] = value.astype(np.float32)
    tensors["blocks.1.attn.key.weight" if cfg.version == 1 else "blocks.1.att.key.weight"] *= key_scale
    return tensors


def layer_norm(x, p, name):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * p[name + ".weight"] + p[name + ".bias"]


def shift(x):
    """The official `nn.ZeroPad2d((0, 0, 1, -1))` along time."""
    return np.concatenate([np.zeros_like(x[:, :1]), x[:, :-1]], axis=1)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def dense(x, p, name):
    return x @ p[name + ".weight"].T + (p[name + ".bias"] if name + ".bias" in p else 0)


def copy_head(h, tokens, p, ctx_len):
    """logits[t, token_u] += q_t·k_u / D for t - TT < u <= t (the official tril copy_mask while t < TT)."""
    q, k = dense(h, p, "head_q"), dense(h, p, "head_k")
    T = h.shape[1]
    t, u = np.arange(T)[:, None], np.arange(T)[None, :]
    c = (q @ k.transpose(0, 2, 1)) / q.shape[-1] * ((t - u >= 0) & (t - u < ctx_len))
    return c @ np.eye(p["head.weight"].shape[0])[tokens]


def reference_v1(p, tokens, cfg):
    """RWKV-1 GPT forward (spec §3.3-§3.5); W built with the official pad/tile construction."""
    L, H, TT = cfg.n_layer, cfg.n_head, cfg.ctx_len
    B, T = tokens.shape
    x = p["tok_emb.weight"][tokens]
    for l in range(L):
        a = {k[len(f"blocks.{l}."):]: v for k, v in p.items() if k.startswith(f"blocks.{l}.")}
        w = np.tile(np.pad(a["attn.time_w"], ((0, 0), (0, TT))), [TT])[:, :-TT].reshape(-1, TT, 2 * TT - 1)
        w = w[:, :, TT - 1:][:, :T, :T] * a["attn.time_alpha"][:, :, :T] * a["attn.time_beta"][:, :T, :]
        h = layer_norm(x, a, "ln1")
        C = h.shape[-1]
        h = np.concatenate([shift(h[..., : C // 2]), h[..., C // 2:]], -1)
        k = np.exp(np.clip(dense(h, a, "attn.key"), -60, 30))
        kv = (k * dense(h, a, "attn.value")).reshape(B, T, H, -1)
        wkv = np.einsum("htu,buhc->bthc", w, kv).reshape(B, T, -1)
        y = sigmoid(dense(h, a, "attn.receptance")) * wkv / np.cumsum(k, axis=1)
        x = x + dense(y, a, "attn.output") * a["attn.time_gamma"][:T]
        h = layer_norm(x, a, "ln2")
        h = np.concatenate([shift(h[..., : C // 2]), h[..., C // 2:]], -1)
        kk = dense(h, a, "mlp.key")
        mish = kk * np.tanh(np.logaddexp(0, kk))
        x = x + sigmoid(dense(h, a, "mlp.receptance")) * dense(mish * dense(h, a, "mlp.value"), a, "mlp.weight")
    h = layer_norm(x, p, "ln_f")
    return dense(h * p["time_out"][:, :T], p, "head") + copy_head(h, tokens, p, TT)


def timex(w, k):
    """The official TimeX op: out[b, c, t] = Σ_{u<=t} w[c, T-1-(t-u)] k[b, c, u] (k as [B, T, C])."""
    T = k.shape[1]
    d = np.arange(T)[:, None] - np.arange(T)[None, :]
    kernel = np.where(d >= 0, w[:, np.clip(T - 1 - d, 0, T - 1)], 0)  # [C, t, u]
    return np.einsum("ctu,buc->btc", kernel, k)


def reference_v2_v3(p, tokens, cfg):
    """RWKV-2/3 GPT forward (spec §4.2-§4.5, §5): the kernel [e^{-(T-2)ω} ... e^{-ω}, 1, e^{time_first}]
    applied by causal correlation to K·v and to K (+ ε), K = e^{min(k, 60)}."""
    eps = 1e-16 if cfg.version == 2 else 1e-8
    T = tokens.shape[1]
    x = p["emb.weight"][tokens]
    for l in range(cfg.n_layer):
        a = {k[len(f"blocks.{l}."):]: v for k, v in p.items() if k.startswith(f"blocks.{l}.")}
        if cfg.version == 2:
            x = layer_norm(x, a, "ln1")
            h = x
            mix = {"k": a["att.time_mix"], "v": a["att.time_mix"], "r": a["att.time_mix"]}
        else:
            if l == 0:
                x = layer_norm(x, a, "ln0")
            h = layer_norm(x, a, "ln1")
            mix = {n: a[f"att.time_mix_{n}"] for n in "kvr"}
        xx = {n: h * m + shift(h) * (1 - m) for n, m in mix.items()}
        k = np.exp(np.minimum(dense(xx["k"], a, "att.key"), 60))
        v = dense(xx["v"], a, "att.value")
        curve = -np.arange(T - 2, -1, -1)
        w = np.exp(np.concatenate([np.exp(a["att.time_decay"]) * curve, a["att.time_first"]], axis=1))
        y = sigmoid(dense(xx["r"], a, "att.receptance")) * timex(w, k * v) / (timex(w, k) + eps)
        x = x + dense(y, a, "att.output")
        if cfg.version == 2:
            x = layer_norm(x, a, "ln2")
            h = x
            mix = {"k": a["ffn.time_mix"], "r": a["ffn.time_mix"]}
        else:
            h = layer_norm(x, a, "ln2")
            mix = {n: a[f"ffn.time_mix_{n}"] for n in "kr"}
        xx = {n: h * m + shift(h) * (1 - m) for n, m in mix.items()}
        hidden = np.maximum(dense(xx["k"], a, "ffn.key"), 0) ** 2
        x = x + sigmoid(dense(xx["r"], a, "ffn.receptance")) * dense(hidden, a, "ffn.value")
    h = layer_norm(x, p, "ln_out")
    return dense(h, p, "head") + copy_head(h, tokens, p, cfg.ctx_len)


@pytest.mark.parametrize("version,length", [(1, 16), (2, 13), (3, 13)])
def test_matches_float64_reference(version, length):
    """v1 runs its whole ctx_len (the official T×T matrix); v2/v3 run past ctx_len = 8, so their
    copy window slides. The parallel form runs in one call, the oracle in two (carrying the state)."""
    cfg = make_cfg(version)
    tensors = official_tensors(cfg, seed=10 + version)
    params = params_from_official(cfg, tensors)
    tokens = random_tokens(cfg, 2, length, seed=5)
    p64 = {k: v.astype(np.float64) for k, v in tensors.items()}
    expected = (reference_v1 if version == 1 else reference_v2_v3)(p64, np.asarray(tokens), cfg)
    no_copy = expected - (reference_v1 if version == 1 else reference_v2_v3)(
        {**p64, "head_q.weight": 0 * p64["head_q.weight"]}, np.asarray(tokens), cfg)
    assert np.abs(no_copy).max() > 0.05 * np.abs(expected).max()  # the copy head is exercised

    logits, _ = forward_fn(cfg)(params, tokens, rj.init_state(cfg, 2))
    assert rel_err(logits, expected) <= REFERENCE_TOL
    oracle = forward_fn(cfg.replace(wkv="oracle"))
    first, state = oracle(params, tokens[:, :7], rj.init_state(cfg, 2))
    second, _ = oracle(params, tokens[:, 7:], state)
    assert rel_err(jnp.concatenate([first, second], 1), expected) <= REFERENCE_TOL


@pytest.mark.parametrize("version", [1, 2, 3])
def test_official_state_dict_loads_and_saves_bit_exact(tmp_path, version):
    torch = pytest.importorskip("torch")
    cfg = make_cfg(version).replace(wkv="auto")
    tensors = official_tensors(cfg, seed=20 + version)
    assert expected_official_shapes(cfg) == {k: v.shape for k, v in tensors.items()}
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, tmp_path / "official.pth")

    loaded_cfg, params = rj.load_pth(tmp_path / "official.pth")
    assert loaded_cfg == cfg
    rj.save_pth(tmp_path / "ours.pth", loaded_cfg, params)
    back = torch.load(tmp_path / "ours.pth", weights_only=True)
    assert set(back) == set(tensors)
    for key, value in tensors.items():
        assert back[key].dtype == torch.float32 and back[key].numpy().tobytes() == value.tobytes(), key

    # copy_mask is a buffer: optional on load (v2/v3 then need ctx_len, which it would have
    # given), but when present it must be the lower-triangular mask.
    without_mask = {k: torch.from_numpy(v) for k, v in tensors.items() if k != "copy_mask"}
    torch.save(without_mask, tmp_path / "no_mask.pth")
    assert rj.load_pth(tmp_path / "no_mask.pth", ctx_len=cfg.ctx_len)[0] == cfg
    torch.save({**without_mask, "copy_mask": torch.ones(cfg.ctx_len, cfg.ctx_len)}, tmp_path / "bad_mask.pth")
    with pytest.raises(CheckpointError, match="copy_mask"):
        rj.load_pth(tmp_path / "bad_mask.pth")
    with pytest.raises(ValueError, match=f"no RWKV-{version}"):
        rj.state_to_official(cfg, rj.init_state(cfg, 1))


# -------------------------------------------------------------------------- v1 past ctx_len


def test_v1_past_ctx_len_raises_or_is_nan_under_jit():
    cfg = make_cfg(1)  # ctx_len 16
    params = {"params": params_for(cfg)}
    model = rj.RWKV(cfg)
    tokens = random_tokens(cfg, 2, 16, seed=6)
    logits, full = forward_fn(cfg)(params["params"], tokens, rj.init_state(cfg, 2))  # positions 0..15
    assert bool(jnp.all(jnp.isfinite(logits)))
    _, state = forward_fn(cfg)(params["params"], tokens[:, :15], rj.init_state(cfg, 2))
    # Called eagerly, the model knows the positions and refuses before computing anything.
    with pytest.raises(ValueError, match=r"ctx_len=16: this call would reach position 16"):
        model.apply(params, tokens[:, 0], full, method=rj.RWKV.step)
    with pytest.raises(ValueError, match=r"ctx_len=16: this call would reach position 19"):
        model.apply(params, tokens[:, :5], state)
    with pytest.raises(ValueError, match=r"ctx_len=16; got 17 tokens"):
        forward_fn(cfg)(params["params"], random_tokens(cfg, 2, 17), rj.init_state(cfg, 2))

    # Under jit the positions are not known at trace time: rows that would pass ctx_len are NaN.
    state = {**state, "pos": jnp.array([15, 16], jnp.int32)}
    logits, _ = step_fn(cfg)(params["params"], tokens[:, 15], state)
    assert bool(jnp.all(jnp.isfinite(logits[0]))) and bool(jnp.all(jnp.isnan(logits[1])))
    logits, _ = forward_fn(cfg)(params["params"], tokens[:, :2], {**state, "pos": jnp.array([14, 15], jnp.int32)})
    assert bool(jnp.all(jnp.isfinite(logits[0]))) and bool(jnp.all(jnp.isnan(logits[1])))


def test_v1_generation_refuses_up_front_to_pass_ctx_len():
    """The jitted prefill and decoding loop cannot raise at position ctx_len (they would return NaN
    and emit token 0): the prompt and every new token, all of them fed, must fit in ctx_len."""
    cfg = make_cfg(1)  # ctx_len 16
    params = params_for(cfg)
    prompt = list(range(1, 11))
    fits = rj.generate(cfg, params, [prompt], max_new_tokens=6, temperature=0)  # positions 0..15
    assert len(fits.tokens[0]) == 6 and bool(jnp.all(jnp.isfinite(fits.logits)))
    with pytest.raises(ValueError, match=r"ctx_len=16: the prompt and max_new_tokens=7 would reach position 16"):
        rj.generate(cfg, params, [prompt[:3], prompt], max_new_tokens=7, temperature=0)
    with pytest.raises(ValueError, match="would reach position 16"):
        rj.iter_generate(cfg, params, prompt, max_new_tokens=7, temperature=0)
    logits, state = prefill(cfg, params, [prompt])
    with pytest.raises(ValueError, match=r"max_new_tokens=7 would reach position 16 \(row 0 starts at position 10\)"):
        decode(cfg, params, logits, state, max_new_tokens=7, temperature=0)
    with pytest.raises(ValueError, match=r"the prompt would reach position 19"):
        prefill(cfg, params, [prompt], state=state)


class LetterTokenizer:
    """" " is 0, "a".."z" are 1..26, and each id stands for one byte."""

    vocab_size = 27

    def encode(self, text: str) -> list[int]:
        return [0 if c == " " else ord(c) - ord("a") + 1 for c in text]

    def token_bytes(self) -> np.ndarray:
        return np.ones(self.vocab_size, np.int64)


def test_v1_scoring_fits_in_ctx_len_or_refuses_it(tmp_path):
    from rwkv_jax.evaluation import lambada_accuracy, perplexity

    cfg = make_cfg(1)  # ctx_len 16
    params = params_for(cfg)
    # 17 tokens feed 16 (the last is only a target); chunks of 5 must not pad past position 15.
    text = "the cat sat on it"
    scored = perplexity(cfg, params, text=text, tokenizer=LetterTokenizer(), chunk=5)
    assert scored.tokens == 16 and math.isfinite(scored.loss) and scored.bytes == 16
    with pytest.raises(ValueError, match=r"ctx_len=16, but scoring 18 tokens feeds 17 per stream.*batch_size >= 2"):
        perplexity(cfg, params, text=text + "s", tokenizer=LetterTokenizer())
    assert math.isfinite(perplexity(cfg, params, text=text + "s", tokenizer=LetterTokenizer(), batch_size=2).loss)

    # LAMBADA pads every document to 32 tokens, past v1's ctx_len: not for RWKV-1.
    path = tmp_path / "lambada.jsonl"
    path.write_text('{"text": "the cat sat on it"}\n{"text": "a dog ran"}\n')
    assert math.isfinite(lambada_accuracy(cfg, params, LetterTokenizer(), path).perplexity)
    path.write_text('{"text": "a dog ran"}\n{"text": "the cat sat on its"}\n')
    with pytest.raises(ValueError, match=r"lambada.jsonl:2: RWKV-1 .* ctx_len=16, but this document feeds 17 tokens"):
        lambada_accuracy(cfg, params, LetterTokenizer(), path)


# ----------------------------------------------------------------------------- official init


INIT_L, INIT_C, INIT_V = 4, 64, 300
channel = np.arange(INIT_C)


@functools.lru_cache(maxsize=None)
def init_params(version: int):
    extra = dict(head_size=16, ctx_len=32) if version == 1 else {}
    cfg = rj.RWKVConfig(version=version, n_layer=INIT_L, n_embd=INIT_C, vocab_size=INIT_V, **extra)
    params = jax.jit(rj.RWKV(cfg).init)(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
    return jax.tree_util.tree_map(np.asarray, params)


def assert_orthogonal(weight: np.ndarray, gain: float) -> None:
    """An official-orientation matrix (rows, cols) made by orthogonal_(gain)."""
    gram = weight @ weight.T if weight.shape[0] <= weight.shape[1] else weight.T @ weight
    np.testing.assert_allclose(gram, gain**2 * np.eye(gram.shape[0]), atol=1e-5 * max(gain**2, 1))


def test_v1_init():
    p = init_params(1)
    H, TT, F = 4, 32, 5 * INIT_C // 2
    att, mlp = (jax.tree_util.tree_map(lambda a: a[1], p["blocks"][n]) for n in ("attn", "mlp"))
    speed = [TT ** (-(h + 1) / (H - 1)) if h < H - 1 else 0.0 for h in range(H)]
    expected_w = np.exp(-np.outer(speed, TT - 1 - np.arange(TT)))
    np.testing.assert_allclose(att["time_w"], expected_w, rtol=1e-6)
    for name in ("time_alpha", "time_beta", "time_gamma"):
        np.testing.assert_array_equal(att[name], 1.0)
    np.testing.assert_array_equal(p["time_out"], np.ones((1, TT, 1)))
    for layer in (att["key"], att["receptance"], att["output"], mlp["receptance"], mlp["weight"]):
        assert not layer["kernel"].any()
    assert not any(layer["bias"].any() for layer in [*att.values(), *mlp.values()] if isinstance(layer, dict))
    assert_orthogonal(att["value"]["kernel"].T, 1.0)
    assert_orthogonal(mlp["key"]["kernel"].T, math.sqrt(F / INIT_C))
    assert_orthogonal(p["tok_emb"]["embedding"], 0.4 * math.sqrt(INIT_V))
    assert_orthogonal(p["head"]["kernel"].T, 0.4 * math.sqrt(INIT_V / INIT_C))
    for name in ("head_q", "head_k"):
        assert_orthogonal(p[name]["kernel"].T, 0.01 * math.sqrt(256 / INIT_C))


@pytest.mark.parametrize("layer", range(INIT_L))
def test_v2_v3_time_mix_init(layer):
    att2 = jax.tree_util.tree_map(lambda a: a[layer], init_params(2)["blocks"]["att"])
    progress = (layer - 1) / (INIT_L - 2)
    f1 = 3.0 + progress * (1.2 - 3.0) + (0.5 if layer == 1 else 0.0)
    f2 = {INIT_L - 2: 0.4, INIT_L - 1: 0.37}.get(layer, 0.65 + progress * (0.4 - 0.65))
    np.testing.assert_allclose(att2["time_decay"][:, 0], np.log(f1 * f2 ** (7 * channel / (INIT_C - 1))),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(att2["time_first"], math.log(0.3), rtol=1e-6)
    half = (channel >= INIT_C // 2).astype(np.float32)
    np.testing.assert_array_equal(att2["time_mix"].ravel(), half)
    np.testing.assert_array_equal(init_params(2)["blocks"]["ffn"]["time_mix"][layer].ravel(), half)

    att3 = jax.tree_util.tree_map(lambda a: a[layer], init_params(3)["blocks"]["att"])
    r0, r1 = layer / (INIT_L - 1), 1 - layer / INIT_L
    ddd = channel / INIT_C
    np.testing.assert_allclose(att3["time_decay"][:, 0], -5 + 8 * (channel / (INIT_C - 1)) ** (0.7 + 1.3 * r0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(att3["time_first"][:, 0], math.log(0.3) + ((channel + 1) % 3 - 1) * 0.5, rtol=1e-6)
    np.testing.assert_allclose(att3["time_mix_v"].ravel(), ddd**r1 + 0.3 * r0, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(att3["time_mix_r"].ravel(), ddd ** (0.5 * r1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("version", [2, 3])
def test_v2_v3_linear_init(version):
    p = init_params(version)
    att, ffn = p["blocks"]["att"], p["blocks"]["ffn"]
    for layer in range(INIT_L):
        for zero in (att["key"], att["receptance"], att["output"], ffn["value"], ffn["receptance"]):
            assert not zero["kernel"][layer].any()
        assert_orthogonal(att["value"]["kernel"][layer].T, 1.0)
        assert_orthogonal(ffn["key"]["kernel"][layer].T, 2.0)
    assert_orthogonal(p["emb"]["embedding"], 1e-4 * math.sqrt(INIT_V))
    assert_orthogonal(p["head"]["kernel"].T, 0.5 * math.sqrt(INIT_V / INIT_C))
    assert not p["head_q"]["kernel"].any() and "bias" not in p["head_q"]
    assert_orthogonal(p["head_k"]["kernel"].T, 0.1 * math.sqrt(256 / INIT_C))
    assert ("ln0" in p) == (version == 3)


def test_config_defaults_and_validation():
    cfg = rj.RWKVConfig(version=1, n_layer=6, n_embd=512, vocab_size=100)
    assert (cfg.ctx_len, cfg.head_qk, cfg.n_head, cfg.dim_ffn) == (256, 256, 8, 1280)
    cfg = rj.RWKVConfig(version=3, n_layer=6, n_embd=512, vocab_size=100)
    assert (cfg.ctx_len, cfg.head_qk, cfg.dim_ffn, cfg.wkv_impl) == (1024, 256, 2048, "parallel")
    assert rj.RWKVConfig.from_json(cfg.to_json()) == cfg
    v4 = rj.RWKVConfig(version=4, n_layer=1, n_embd=64, vocab_size=10)
    assert (v4.ctx_len, v4.head_qk) == (None, 0)
    with pytest.raises(ValueError, match="only exist for RWKV-1..3"):
        rj.RWKVConfig(version=4, n_layer=1, n_embd=64, vocab_size=10, head_qk=256)
    with pytest.raises(ValueError, match="ctx_len must be a positive int"):
        rj.RWKVConfig(version=2, n_layer=1, n_embd=64, vocab_size=10, ctx_len=0)
