"""Generation: exact prefill, the jitted decoding loop, and the official samplers and penalties."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rwkv_jax as rj
from rwkv_jax import generation as gen
from rwkv_jax.generation import filter_logits, generate, iter_generate, prefill
from rwkv_jax.tokenizers import ByteTokenizer

N_NEW = 6  # one max_new_tokens everywhere, so the decoding loop compiles once per (version, batch, sampler)
PROMPTS = [[5, 6, 7, 8], [1, 2, 3, 4, 5, 6], [9, 8, 7, 6]]  # fed as pieces of 4 and 2 tokens
TOL = dict(rtol=1e-4, atol=1e-5)


@functools.cache
def tiny(version: int) -> tuple[rj.RWKVConfig, dict]:
    """A tiny model: the official init plus noise, so outputs are not degenerate. (The init is
    jitted and the noise drawn by NumPy: eager init and per-leaf jax.random calls compile slowly.)"""
    cfg = rj.RWKVConfig(version=version, n_layer=2, n_embd=64, head_size=32, vocab_size=97)
    params = jax.jit(rj.RWKV(cfg).init)(jax.random.key(version), jnp.zeros((1, 1), jnp.int32))["params"]
    rng = np.random.RandomState(version)
    return cfg, jax.tree.map(lambda p: jnp.asarray(p + (0.3 * np.std(p) + 0.05) * rng.randn(*p.shape), p.dtype),
                             params)


@functools.cache
def reference_step(version: int):
    """The plain model's `RWKV.step`, jitted: `(token, state or None) -> (logits [V], state)`."""
    cfg, params = tiny(version)
    apply = jax.jit(lambda token, state: rj.RWKV(cfg).apply({"params": params}, token, state, method=rj.RWKV.step))

    def step(token, state):
        logits, state = apply(jnp.asarray([token], jnp.int32), rj.init_state(cfg, 1) if state is None else state)
        return logits[0], state

    return step


def run_tokens(version: int, tokens: list[int]):
    """Token by token from the zero state: (logits [V] after the last, state)."""
    logits, state = None, None
    for token in tokens:
        logits, state = reference_step(version)(token, state)
    return logits, state


def assert_states_close(actual, expected, row=0):
    for name in expected:  # v5/v7 state entries are all [L, B, ...]
        np.testing.assert_allclose(actual[name][:, row], expected[name][:, 0], **TOL, err_msg=name)


@pytest.mark.parametrize("version", [5, 7])
@pytest.mark.parametrize("prepared", [False, True])
def test_greedy_generation_equals_step_by_step_argmax(version, prepared, monkeypatch):
    cfg, params = tiny(version)
    if prepared:  # laid out once, with the batch-1 `[out, in]` kernels of wide models (see `step_params`)
        monkeypatch.setattr(gen, "OUT_IN_MIN_EMBD", cfg.n_embd)
        prepared_params = rj.prepare_decoding(cfg, params)
        assert "kernel_out_in" in prepared_params.step[0]["head"]
    out = generate(cfg, prepared_params if prepared else params, [PROMPTS[1]], max_new_tokens=N_NEW, temperature=0)

    logits, state = run_tokens(version, PROMPTS[1])  # the prompt token by token: checks the parallel prefill too
    expected = []
    for _ in range(N_NEW):
        expected.append(int(jnp.argmax(logits)))
        logits, state = reference_step(version)(expected[-1], state)
    assert out.tokens == [expected] and out.stopped == [False]
    np.testing.assert_allclose(out.logits[0], logits, **TOL)
    assert_states_close(out.state, state)


@pytest.mark.parametrize("version", [5, 7])
def test_batched_prompts_of_different_lengths_equal_one_by_one(version):
    cfg, params = tiny(version)
    batched = generate(cfg, params, PROMPTS, max_new_tokens=N_NEW, temperature=0)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(cfg, params, [prompt], max_new_tokens=N_NEW, temperature=0)
        assert batched.tokens[row] == alone.tokens[0]
        np.testing.assert_allclose(batched.logits[row], alone.logits[0], **TOL)
        assert_states_close(batched.state, alone.state, row)


def test_chunked_prefill_equals_the_whole_prompt_at_once():
    cfg, params = tiny(7)
    whole_logits, whole_state = prefill(cfg, params, [PROMPTS[1]])
    chunked_logits, chunked_state = prefill(cfg, params, [PROMPTS[1]], chunk=3)
    np.testing.assert_allclose(chunked_logits, whole_logits, **TOL)
    assert_states_close(chunked_state, {k: v[:, :1] for k, v in whole_state.items()})


def test_same_key_gives_same_tokens_and_other_keys_differ():
    cfg, params = tiny(7)
    sample = functools.partial(generate, cfg, params, PROMPTS, max_new_tokens=N_NEW, temperature=1.5, top_p=0.95)
    first, again, other = sample(key=jax.random.key(0)), sample(key=jax.random.key(0)), sample(key=jax.random.key(1))
    assert first.tokens == again.tokens
    assert first.tokens != other.tokens


def test_top_k_1_equals_greedy():
    cfg, params = tiny(7)
    greedy = generate(cfg, params, PROMPTS, max_new_tokens=N_NEW, temperature=0)
    top1 = generate(cfg, params, PROMPTS, max_new_tokens=N_NEW, key=jax.random.key(3), temperature=2.0, top_k=1)
    assert top1.tokens == greedy.tokens


def test_stop_tokens_end_only_their_row_and_are_not_fed():
    cfg, params = tiny(7)
    free = generate(cfg, params, PROMPTS, max_new_tokens=N_NEW, temperature=0)
    stop = next(token for token in free.tokens[0][1:] if token not in free.tokens[1])  # row 1 must go on
    out = generate(cfg, params, PROMPTS, max_new_tokens=N_NEW, temperature=0, stop_tokens=[stop])
    for row in range(len(PROMPTS)):
        full = free.tokens[row]
        cut = full.index(stop) if stop in full else len(full)
        assert out.tokens[row] == full[:cut] and out.stopped[row] == (stop in full)
    assert out.stopped[:2] == [True, False] and 0 < len(out.tokens[0]) < N_NEW
    # The stopped row's state is the model's after the prompt and the kept tokens: the stop token is not fed.
    logits, state = run_tokens(7, PROMPTS[0] + out.tokens[0])
    np.testing.assert_allclose(out.logits[0], logits, **TOL)
    assert_states_close(out.state, state, 0)


def test_iter_generate_streams_what_generate_returns():
    cfg, params = tiny(7)
    kwargs = dict(max_new_tokens=N_NEW, key=jax.random.key(5), top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5)
    expected = generate(cfg, params, [PROMPTS[1]], **kwargs)
    stream, streamed = iter_generate(cfg, params, PROMPTS[1], **kwargs), []
    while True:
        try:
            streamed.append(next(stream))
        except StopIteration as finished:
            result = finished.value
            break
    assert streamed == expected.tokens[0] and result.tokens == expected.tokens
    assert_states_close(result.state, {k: v[:, :1] for k, v in expected.state.items()})


@pytest.mark.parametrize("version", [4, 5, 6, 7])
@pytest.mark.parametrize("rows", [1, 2])
def test_layerwise_decoding_step_equals_the_model_step(version, rows, monkeypatch):
    """The decode loop's step (one tree per layer; at batch 1 with `[out, in]` kernels, see
    `step_params`) is `RWKV.step`."""
    cfg, params = tiny(version)
    _, state = prefill(cfg, params, [PROMPTS[0], PROMPTS[2]][:rows])
    token = jnp.asarray([3, 90][:rows], jnp.int32)
    monkeypatch.setattr(gen, "OUT_IN_MIN_EMBD", cfg.n_embd)  # the tiny model takes the wide models' path
    layered = gen.step_params(cfg, params, batch_size=rows)
    assert isinstance(layered, tuple)  # the fast path is the one under test
    head = layered[0]["head"]
    if rows == 1:
        np.testing.assert_array_equal(head["kernel_out_in"], params["head"]["kernel"].T)
    else:
        assert set(head) == {"kernel"}
    logits, new_state = jax.jit(lambda p, t, s: gen.step_function(cfg, p)(t, s))(layered, token, state)
    expected_logits, expected_state = jax.jit(lambda t, s: rj.RWKV(cfg).apply({"params": params}, t, s,
                                                                                method=rj.RWKV.step))(token, state)
    # Not bit-identical: XLA fuses the unrolled layers differently from the scanned ones, and
    # sums the transposed products in another order.
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-5)
    for name in expected_state:
        np.testing.assert_allclose(new_state[name], expected_state[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_banned_tokens_are_never_sampled():
    cfg, params = tiny(7)
    free = generate(cfg, params, [PROMPTS[1]], max_new_tokens=N_NEW, temperature=0)
    banned = sorted(set(free.tokens[0]))
    out = generate(cfg, params, [PROMPTS[1]], max_new_tokens=N_NEW, temperature=0, banned_tokens=banned)
    assert out.tokens[0][0] != free.tokens[0][0] and not set(out.tokens[0]) & set(banned)


def test_a_stream_stopped_early_continues_from_its_result_state():
    cfg, params = tiny(7)
    whole = generate(cfg, params, [PROMPTS[1]], max_new_tokens=N_NEW, temperature=0)
    stream = iter_generate(cfg, params, PROMPTS[1], max_new_tokens=N_NEW, temperature=0)
    first = [next(stream), next(stream)]
    early = stream.result
    assert first == early.tokens[0] == whole.tokens[0][:2] and early.stopped == [False]
    logits, state = run_tokens(7, PROMPTS[1] + first)
    np.testing.assert_allclose(early.logits[0], logits, **TOL)
    assert_states_close(early.state, state)


def test_zero_new_tokens_return_the_prompts_logits_and_state():
    cfg, params = tiny(7)
    logits, state = prefill(cfg, params, PROMPTS[:2])
    out = generate(cfg, params, PROMPTS[:2], max_new_tokens=0, temperature=0)
    assert out.tokens == [[], []] and out.stopped == [False, False]
    np.testing.assert_array_equal(out.logits, logits)
    for name in state:
        np.testing.assert_array_equal(out.state[name], state[name], err_msg=name)
    assert gen.decode(cfg, params, logits, state, max_new_tokens=0, key=jax.random.key(0)).tokens == [[], []]
    assert list(iter_generate(cfg, params, PROMPTS[0], max_new_tokens=0, temperature=0)) == []


def test_generate_rejects_bad_prompts_and_sampling_without_a_key():
    cfg, params = tiny(7)
    with pytest.raises(ValueError, match="at least one token"):
        generate(cfg, params, [[1], []], max_new_tokens=1, temperature=0)
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        generate(cfg, params, [[1, 97]], max_new_tokens=1, temperature=0)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        generate(cfg, params, [[1]], max_new_tokens=1)


# ---------------------------------------------------------------- samplers and penalties vs the official code


def official_sample_probs(logits, temperature, top_p, top_k):
    """NumPy transcription of rwkv.utils.PIPELINE.sample_logits (CPU branch), up to the draw."""
    if temperature == 0:
        temperature, top_p = 1.0, 0
    probs = np.exp(logits - logits.max()).astype(np.float32)
    probs = probs / probs.sum()
    sorted_ids = np.argsort(probs)
    sorted_probs = probs[sorted_ids][::-1]
    cumulative_probs = np.cumsum(sorted_probs)
    cutoff = float(sorted_probs[np.argmax(cumulative_probs >= top_p)])
    probs[probs < cutoff] = 0
    if top_k < len(probs) and top_k > 0:
        probs[sorted_ids[:-top_k]] = 0
    if temperature != 1.0:
        probs = probs ** (1.0 / temperature)
    return probs / np.sum(probs)


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 0.85, 0), (0.7, 0.5, 0), (1.3, 0.99, 5), (1.0, 0.9, 3),
                                                        (1.0, 0.0, 0), (2.0, 0.3, 40)])
def test_filters_and_temperature_give_the_official_distribution(temperature, top_p, top_k):
    logits = (2.0 * np.random.RandomState(7).randn(1, 500)).astype(np.float32)
    ours = jax.nn.softmax(filter_logits(jnp.asarray(logits), top_k, top_p) / temperature, axis=-1)[0]
    np.testing.assert_allclose(ours, official_sample_probs(logits[0], temperature, top_p, top_k), atol=1e-6)


def test_top_p_1_keeps_every_token():
    logits = jnp.asarray(np.random.RandomState(0).randn(2, 500), jnp.float32)
    assert np.array_equal(filter_logits(logits, 0, 1.0), logits)


def test_penalty_bookkeeping_matches_the_official_formula():
    V, presence, frequency, decay = 50, 0.3, 0.25, 0.9
    exempt = {3, 7}  # counted 0 times, as the official does for spaces and digits
    weights = jnp.asarray([0.0 if t in exempt else 1.0 for t in range(V)])
    rng = np.random.RandomState(0)
    official = [{}, {}]  # the official `occurrence` dict, one per row
    seen, occurrence = jnp.zeros((2, V), bool), jnp.zeros((2, V))
    for _ in range(30):
        logits = rng.randn(2, V).astype(np.float32)
        ours = gen.apply_penalty(jnp.asarray(logits), seen, occurrence, presence, frequency)
        for row in range(2):
            expected = logits[row].copy()
            for n in official[row]:
                expected[n] -= (presence + official[row][n] * frequency)
            np.testing.assert_allclose(ours[row], expected, rtol=1e-6, atol=1e-6)
        token, emitted = rng.randint(0, 10, 2), rng.rand(2) < 0.8  # few ids, so repeats happen
        for row in np.flatnonzero(emitted):
            for n in official[row]:
                official[row][n] *= decay
            www = 0 if token[row] in exempt else 1
            official[row][token[row]] = official[row].get(token[row], 0) + www
        seen, occurrence = gen.update_occurrence(seen, occurrence, jnp.asarray(token), jnp.asarray(emitted),
                                                 decay, weights)


def test_penalised_greedy_decoding_matches_the_official_pipeline():
    """The official PIPELINE.generate and our loop, driven by the same fake bigram model over bytes."""
    torch = pytest.importorskip("torch")
    official_utils = pytest.importorskip("rwkv.utils")
    tokenizer = ByteTokenizer()
    V, n_new = tokenizer.vocab_size, 24
    table = (0.5 * np.random.RandomState(0).randn(8, V)).astype(np.float32)
    favourites = tokenizer.encode(" 01ab")  # space and digits are exempt from the frequency count
    table[:, favourites] += 6.0  # so the penalties decide which of these comes next

    fed = []

    class FakeModel:
        def forward(self, tokens, state):
            fed.extend(tokens)
            return torch.tensor(table[tokens[-1] % 8]), state

    class Bytes:  # PIPELINE calls `.encode(x).ids` on anything whose type name contains "Tokenizer"
        encode, decode = tokenizer.encode, tokenizer.decode

    pipeline = object.__new__(official_utils.PIPELINE)
    pipeline.model, pipeline.tokenizer = FakeModel(), Bytes()
    prompt_text = "Numbers: "
    args = official_utils.PIPELINE_ARGS(temperature=0, top_p=0, alpha_presence=0.4, alpha_frequency=0.3,
                                        alpha_decay=0.9)
    # It feeds every generated token but the last, so n_new + 1 tokens show the first n_new.
    pipeline.generate(prompt_text, n_new + 1, args)
    prompt = tokenizer.encode(prompt_text)
    assert fed[:len(prompt)] == prompt

    def ours(exempt):
        sampler = gen._Sampler.create(V, None, 0.0, 0, 1.0, 0.4, 0.3, 0.9, exempt, ())
        table_j = jnp.asarray(table)
        carry = gen._start(table_j[prompt[-1] % 8][None], {"last": jnp.asarray([[prompt[-1]]])}, n_new)

        def step(token, state):  # state {"last": [L=1, B]}
            return table_j[token % 8], {"last": token[None]}

        loop = jax.jit(lambda carry: gen._decode_loop(step, {"last": 1}, carry, sampler.arrays, sampler.modes))
        return np.asarray(loop(carry).tokens[0]).tolist()

    assert ours(gen.official_penalty_exempt(tokenizer)) == fed[len(prompt):]
    assert ours(()) != fed[len(prompt):]  # the exemption matters in this set-up


def test_official_penalty_exempt_lists_spaces_tabs_and_digits():
    assert gen.official_penalty_exempt(ByteTokenizer()) == [ord(c) for c in "\t 0123456789"]
