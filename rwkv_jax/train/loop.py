"""The training loop: `train(cfg)` runs (or resumes) a run; `evaluate(run_dir, text)` scores text.

One step: crops `[B, T+1]` -> logits of the first T tokens -> mean cross-entropy on the next
tokens (+ L2Wrap in the backward pass) -> global-norm clip -> AdamW (`optim.make_optimizer`).
The train state is the pytree `{"params", "opt_state", "step"}`; with the batch a pure function
of (seed, step), a checkpoint of it is everything needed to continue exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

import rwkv_jax as rj
from rwkv_jax.train import data as data_lib
from rwkv_jax.train import sharding as shard_lib
from rwkv_jax.train.checkpoint import Checkpointer, latest_meta
from rwkv_jax.train.config import ConfigError, TrainConfig, resume_conflicts
from rwkv_jax.train.optim import cross_entropy, l2wrap, lr_schedule, make_optimizer

Array = jax.Array
PyTree = Any
TrainState = dict[str, Any]   # {"params": ..., "opt_state": ..., "step": int32 scalar}

# Dense bf16 peak FLOP/s per chip, matched by prefix of `device.device_kind` (first match wins).
PEAK_FLOPS = (
    ("NVIDIA H200", 989e12), ("NVIDIA H100", 989e12), ("NVIDIA A100", 312e12), ("NVIDIA L4", 121e12),
    ("TPU v6 lite", 918e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss, gradient or parameter; the bad state was not saved."""


# ----------------------------------------------------------------------------- pure pieces

def model_config(cfg: TrainConfig, vocab_size: int) -> rj.RWKVConfig:
    """The RWKVConfig of a from-scratch run (fine-tuning takes the `.pth` file's instead)."""
    return rj.RWKVConfig(version=cfg.version, n_layer=cfg.n_layer, n_embd=cfg.n_embd, vocab_size=vocab_size,
                         head_size=cfg.head_size, wkv=cfg.wkv, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         # v1-v3 tie parameters / the copy-head cache to the training context
                         **({"ctx_len": cfg.ctx_len} if cfg.version <= 3 else {}))


def document_starts(inputs: Array, doc_sep: int) -> Array:
    """`reset [B, T]` bool of packed documents: True at every token that follows an end-of-document
    token `doc_sep` in `inputs [B, T]` (the crop's first token starts from `init_state` anyway)."""
    ends = inputs == doc_sep
    return jnp.concatenate([jnp.zeros_like(ends[:, :1]), ends[:, :-1]], axis=1)


def forward(model: rj.RWKV, params: PyTree, inputs: Array, doc_sep: int | None) -> Array:
    """Logits `[B, T, V]` of `inputs [B, T]` from `init_state`, resetting the state after every
    `doc_sep` token when it is set."""
    reset = None if doc_sep is None else document_starts(inputs, doc_sep)
    logits, _ = model.apply({"params": params}, inputs, None, reset)
    return logits


def loss_fn(model: rj.RWKV, params: PyTree, batch: Array, l2wrap_factor: float, doc_sep: int | None = None
            ) -> Array:
    """Mean next-token cross-entropy of `batch [B, T+1]` (L2Wrap adds only a gradient); with
    `doc_sep`, packed documents (see `document_starts`)."""
    logits = forward(model, params, batch[:, :-1], doc_sep)
    loss = cross_entropy(logits, batch[:, 1:])
    return l2wrap(loss, logits, l2wrap_factor) if l2wrap_factor > 0 else loss


def _all_finite(tree: PyTree) -> Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def make_train_step(model: rj.RWKV, tx: optax.GradientTransformation, l2wrap_factor: float,
                    doc_sep: int | None = None) -> Callable[[TrainState, Array], tuple[TrainState, dict[str, Array]]]:
    """`(state, batch [B, T+1]) -> (state, {"loss", "grad_norm", "finite"})` (not jitted)."""

    def step(state: TrainState, batch: Array) -> tuple[TrainState, dict[str, Array]]:
        loss, grads = jax.value_and_grad(lambda p: loss_fn(model, p, batch, l2wrap_factor, doc_sep))(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
        # A state is only worth keeping if its loss, gradient and new parameters are all finite.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(params)
        return ({"params": params, "opt_state": opt_state, "step": state["step"] + 1},
                {"loss": loss, "grad_norm": grad_norm, "finite": finite})

    return step


def make_eval_step(model: rj.RWKV, token_bytes: np.ndarray, doc_sep: int | None = None
                   ) -> Callable[[PyTree, Array, Array], dict[str, Array]]:
    """`(params, batch [B, T+1], row_weight [B]) -> {"nll", "tokens", "bytes"}` sums over the
    weighted rows (padding rows have weight 0), for loss = nll/tokens and bpb = nll/ln2/bytes."""
    table = jnp.asarray(token_bytes, jnp.float32)

    def step(params: PyTree, batch: Array, weight: Array) -> dict[str, Array]:
        logits = forward(model, params, batch[:, :-1], doc_sep)
        targets = batch[:, 1:]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
        w = weight[:, None].astype(jnp.float32)
        return {"nll": jnp.sum(nll * w), "tokens": jnp.sum(jnp.broadcast_to(w, nll.shape)),
                "bytes": jnp.sum(table[targets] * w)}

    return step


def count_params(params: PyTree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def flops_per_token(params: PyTree) -> float:
    """6·N training FLOPs per token, N = parameters used in matmuls (all but the embedding table,
    which is a gather); the WKV recurrence itself is O(C·N) per token and left out."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return 6.0 * sum(int(np.prod(v.shape)) for k, v in flat.items() if not k.startswith("emb/"))


def peak_flops(devices: list) -> float | None:
    """Summed dense bf16 peak of `devices`, or None if any kind is unknown (then MFU is omitted)."""
    total = 0.0
    for device in devices:
        peak = next((p for prefix, p in PEAK_FLOPS if device.device_kind.startswith(prefix)), None)
        if peak is None:
            return None
        total += peak
    return total


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------- reporting

class MetricsLog:
    """Appends one JSON object per record to `out/metrics.jsonl` and its numbers, as scalars by
    step, to TensorBoard event files in `out/tb` (tensorboardX); only process 0 writes.

    `rewind_to=step` (a run resuming from that checkpoint) first forgets what the interrupted run
    logged after it, so the log reads as an uninterrupted run's: the records of later steps (a
    crash logs steps it never saved) and a partial loss window ending at `step` (the resumed run
    logs the whole window). TensorBoard hides the later steps itself (`purge_step`).
    """

    def __init__(self, out: Path, rewind_to: int | None = None):
        from tensorboardX import SummaryWriter

        self.enabled = jax.process_index() == 0
        self.path = out / "metrics.jsonl"
        if self.enabled and rewind_to is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _kept_on_rewind(json.loads(line), rewind_to)]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)      # a crash here leaves the old log, never half of one
        purge_step = None if rewind_to is None else rewind_to + 1
        self.tb = SummaryWriter(str(out / "tb"), purge_step=purge_step) if self.enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # Strict JSON: NaN/inf (a first window without timings, a diverged loss) become null.
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _kept_on_rewind(record: dict[str, Any], step: int) -> bool:
    at = record.get("step", 0)
    return at < step or (at == step and not record.get("partial", False))


# ----------------------------------------------------------------------------- the run

@dataclasses.dataclass
class Run:
    """Everything a run builds from its config before the first step."""

    cfg: TrainConfig
    model_cfg: rj.RWKVConfig
    model: rj.RWKV
    tokenizer: data_lib.Tokenizer
    tokenizer_spec: str                       # "byte", "world", or the .model path (relative to out if inside it)
    data: data_lib.TokenData
    tx: optax.GradientTransformation
    mesh: jax.sharding.Mesh
    abstract_state: PyTree                    # ShapeDtypeStructs with shardings: the restore target
    batch_sharding: jax.sharding.NamedSharding
    init_params: PyTree | None                # fine-tuning: the ported weights (host arrays)

    @property
    def state_shardings(self) -> PyTree:
        return jax.tree.map(lambda s: s.sharding, self.abstract_state)


def params_shape(model: rj.RWKV) -> PyTree:
    """ShapeDtypeStructs of the model's parameters (nothing is computed)."""
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])


def abstract_train_state(params: PyTree, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                         fsdp_min_size: int) -> PyTree:
    """Shapes, dtypes and shardings of `{"params", "opt_state", "step"}` for `params` (shapes)."""
    shapes = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
    shardings = shard_lib.tree_shardings(shapes, mesh, fsdp_min_size)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def build_run(cfg: TrainConfig, devices: list | None = None) -> Run:
    """Tokenizer, token data, model, optimiser and mesh (over `devices`, default all) of a run;
    no device arrays yet. Everything a run can be told wrong (fields, data, a resume that does not
    fit its checkpoint) raises ConfigError here, before any model is built."""
    out = Path(cfg.out)
    stored = latest_meta(out) if cfg.resume else None
    text_or_npy = data_lib.resolve_data_path(cfg.data)
    tokenizer = data_lib.make_tokenizer(cfg.tokenizer, text_or_npy, out / "data", cfg.sp_vocab_size)
    if cfg.doc_sep is not None and cfg.doc_sep >= tokenizer.vocab_size:
        raise ConfigError(f"doc_sep={cfg.doc_sep} is not a token id of the {tokenizer.vocab_size}-token tokenizer "
                          f"{cfg.tokenizer!r}")
    model_cfg, init_params = _model_and_weights(cfg, tokenizer.vocab_size, stored)
    if cfg.init_from:
        # The per-version optimiser defaults must follow the ported model's version.
        cfg = cfg.replace(version=model_cfg.version, n_layer=model_cfg.n_layer, n_embd=model_cfg.n_embd,
                          head_size=model_cfg.head_size)
    cfg = cfg.resolved()
    if stored is not None:
        _check_resumable(cfg, model_cfg, stored)

    mesh = shard_lib.make_mesh(cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_seq, devices)
    rows = shard_lib.batch_rows(mesh)
    if cfg.batch_size % rows:
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the {rows} data x fsdp devices of the mesh")
    npy = data_lib.prepare_tokens(cfg.data, tokenizer, out / "data")
    token_data = data_lib.TokenData.load(npy, cfg.val_fraction, tokenizer.vocab_size)
    token_data.check_windows(cfg.ctx_len, cfg.sampler)
    model = rj.RWKV(model_cfg)
    shapes = params_shape(model)
    tx = make_optimizer(cfg, shapes)
    return Run(cfg=cfg, model_cfg=model_cfg, model=model, tokenizer=tokenizer,
               tokenizer_spec=_tokenizer_spec(tokenizer, out), data=token_data, tx=tx, mesh=mesh,
               abstract_state=abstract_train_state(shapes, tx, mesh, cfg.fsdp_min_size),
               batch_sharding=shard_lib.batch_sharding(mesh), init_params=init_params)


def _model_and_weights(cfg: TrainConfig, vocab_size: int, stored: dict[str, Any] | None
                       ) -> tuple[rj.RWKVConfig, PyTree | None]:
    """The run's model config and the weights it starts from (None: the official init).

    From scratch: `cfg`'s sizes. Fine-tuning: the `.pth` file's sizes and weights. Resuming a
    fine-tune: the checkpoint's model config, without reading the `.pth` (the checkpoint holds the
    weights; the file may have moved since). RWKVConfig's ValueErrors become ConfigErrors."""
    try:
        if not cfg.init_from:
            return model_config(cfg, vocab_size), None
        if stored is not None:
            source, init_params = rj.RWKVConfig(**stored["model_config"]), None
        elif not Path(cfg.init_from).is_file():
            raise ConfigError(f"init_from={cfg.init_from!r}: no such file")
        else:
            source, init_params = rj.load_pth(cfg.init_from)
        model_cfg = source.replace(wkv=cfg.wkv, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {vocab_size} tokens, the model in {cfg.init_from} "
                          f"only {model_cfg.vocab_size}")
    if model_cfg.version == 1 and cfg.ctx_len > model_cfg.ctx_len:
        # RWKV-1's time_w and time_out have one entry per position: it has no later positions.
        raise ConfigError(f"the RWKV-1 model in {cfg.init_from} is defined for ctx_len <= {model_cfg.ctx_len} "
                          f"(its time_w), so it cannot train on ctx_len={cfg.ctx_len}")
    if init_params is not None:
        init_params = jax.tree.map(lambda p: np.asarray(p, model_cfg.params_dtype), init_params)
    return model_cfg, init_params


def _check_resumable(cfg: TrainConfig, model_cfg: rj.RWKVConfig, stored: dict[str, Any]) -> None:
    """ConfigError naming every setting that keeps `cfg` from continuing the checkpoint whose
    metadata is `stored`: a model field, or a field of `config.resume_conflicts`."""
    model_now, model_then = json.loads(model_cfg.to_json()), stored["model_config"]
    conflicts = [f"model {name} is {model_then.get(name)!r} in the checkpoint but {model_now.get(name)!r} now"
                 for name in sorted(set(model_now) | set(model_then)) if model_now.get(name) != model_then.get(name)]
    conflicts += resume_conflicts(stored["train_config"], cfg)
    if conflicts:
        raise ConfigError(f"cannot resume {cfg.out} (step {stored['step']}): " + "; ".join(conflicts)
                          + ". These fix the model, the optimiser state's layout or the data each step sees; "
                          "resume with the checkpoint's values, or start a new run in another out")


def _tokenizer_spec(tokenizer: data_lib.Tokenizer, out: Path) -> str:
    """What `load_tokenizer` needs; a model trained into the run directory moves with it."""
    if isinstance(tokenizer, data_lib.WorldTokens):
        return "world"
    if not isinstance(tokenizer, data_lib.SentencePieceTokenizer):
        return "byte"
    path = Path(tokenizer.model_file).resolve()
    return str(path.relative_to(out.resolve())) if path.is_relative_to(out.resolve()) else str(path)


def load_tokenizer(spec: str, run_dir: Path) -> data_lib.Tokenizer:
    """The tokenizer a checkpoint was trained with (`Run.tokenizer_spec`)."""
    if spec == "byte":
        return data_lib.ByteTokenizer()
    if spec == "world":
        return data_lib.WorldTokens()
    return data_lib.SentencePieceTokenizer(run_dir / spec)


def init_train_state(run: Run) -> TrainState:
    """The step-0 state, created directly with its shardings (official init, or the ported weights)."""
    def from_params(params: PyTree) -> TrainState:
        return {"params": params, "opt_state": run.tx.init(params), "step": jnp.zeros((), jnp.int32)}

    if run.init_params is not None:
        return jax.jit(from_params, out_shardings=run.state_shardings)(run.init_params)
    dummy = jnp.zeros((1, 1), jnp.int32)
    return jax.jit(lambda key: from_params(run.model.init(key, dummy)["params"]),
                   out_shardings=run.state_shardings)(jax.random.PRNGKey(run.cfg.seed))


def device_batch(mesh_sharding: jax.sharding.NamedSharding, rows: np.ndarray) -> Array:
    """A host array `[B, ...]` as a global array split over the mesh."""
    return shard_lib.make_global_batch(rows.shape, mesh_sharding, lambda index: rows[index])


def train_batch(run: Run, step: int) -> Array:
    """Step `step`'s crops `[B, T+1]`; each process reads only the rows its devices hold."""
    cfg = run.cfg
    offsets = run.data.train_offsets(cfg.seed, step, cfg.batch_size, cfg.ctx_len, cfg.sampler)
    return shard_lib.make_global_batch(
        (cfg.batch_size, cfg.ctx_len + 1), run.batch_sharding,
        lambda rows: data_lib.TokenData.crops(run.data.train, offsets[rows], cfg.ctx_len))


def _meta(run: Run, step: int, metrics: dict[str, float], window_losses: list[float]) -> dict[str, Any]:
    return {"step": step, "train_config": json.loads(run.cfg.to_json()),
            "model_config": json.loads(run.model_cfg.to_json()), "tokenizer": run.tokenizer_spec,
            # Batches depend only on (seed, step): this is the whole data position.
            "data": {"seed": run.cfg.seed, "next_step": step}, "metrics": metrics,
            # The losses of the steps since the last logged one, so a resumed run logs the same
            # windows an uninterrupted one does.
            "window_losses": window_losses}


def evaluate_params(params: PyTree, eval_step: Callable, batches: list,
                    sharding: jax.sharding.NamedSharding) -> dict[str, float]:
    """Summed eval over `batches` -> {"loss" (nats/token), "bpb" (bits per UTF-8 byte), "tokens"}."""
    totals = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
    for rows, weight in batches:
        out = jax.device_get(eval_step(params, device_batch(sharding, rows), device_batch(sharding, weight)))
        for key in totals:
            totals[key] += float(out[key])
    return {"loss": totals["nll"] / totals["tokens"], "bpb": totals["nll"] / math.log(2) / max(totals["bytes"], 1.0),
            "tokens": totals["tokens"]}


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or with `cfg.resume`, continue) training; `log` receives the progress lines.

    Returns {"losses": per-step training losses of this invocation, "state": the final train
    state, "start_step": where it started (0, or the step resumed from), "last": the last
    progress record}.

    Raises NonFiniteLossError (after waiting for pending saves) if a step produces a non-finite
    loss, gradient or parameter; that state is never saved.
    """
    run = build_run(cfg)
    cfg = run.cfg
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if jax.process_index() != 0:
        log = lambda message: None  # noqa: E731 - one writer for the progress lines
    checkpointer = Checkpointer(out, keep=cfg.keep, async_save=cfg.async_save)
    metrics_log = None
    try:
        # Under the context mesh the model runs Pallas kernels per batch shard and, with a "seq"
        # axis, splits each sequence over its devices.
        with jax.set_mesh(run.mesh):
            state, meta = _restore_or_init(run, checkpointer, log)
            start = 0 if meta is None else int(meta["data"]["next_step"])
            resumes = meta is not None and start < _end_step(cfg)
            metrics_log = MetricsLog(out, rewind_to=start if resumes else None)
            return _train(run, state, meta, checkpointer, metrics_log, log)
    finally:
        checkpointer.close()
        if metrics_log is not None:
            metrics_log.close()


class Window:
    """Loss and throughput since the last progress line. Only the train steps are timed (not
    validation or saves), and the first step of a process is skipped: it includes compilation.

    Windows end at the multiples of `log_every` whether or not the run was interrupted in
    between: a resumed run starts with the window's earlier losses from its checkpoint."""

    def __init__(self, tokens_per_step: int, losses: list[float] | None = None):
        self.tokens_per_step = tokens_per_step
        self.reset()
        self.losses = list(losses or [])

    def reset(self) -> None:
        self.losses: list[float] = []
        self.seconds, self.timed_steps = 0.0, 0

    def add(self, loss: float, seconds: float, timed: bool) -> None:
        self.losses.append(loss)
        if timed:
            self.seconds += seconds
            self.timed_steps += 1

    def tokens_per_s(self) -> float:
        return self.tokens_per_step * self.timed_steps / self.seconds if self.timed_steps else float("nan")


def _end_step(cfg: TrainConfig) -> int:
    """The step this invocation stops after."""
    return min(cfg.steps, cfg.stop_after or cfg.steps)


def _restore_or_init(run: Run, checkpointer: Checkpointer, log: Callable[[str], None]
                     ) -> tuple[TrainState, dict[str, Any] | None]:
    """The state to start from, and the metadata of the checkpoint it was restored from (None for
    a new run). `build_run` has checked that the checkpoint fits this run's config."""
    cfg = run.cfg
    latest = checkpointer.latest_step()
    if latest is None:
        return init_train_state(run), None
    if not cfg.resume:
        raise ConfigError(f"{cfg.out} already holds checkpoints (latest step {latest}); "
                          "pass --resume (resume=true) to continue it, or choose another out")
    state, meta = checkpointer.restore(latest, run.abstract_state)
    log(f"resumed from step {meta['data']['next_step']} in {cfg.out}/ckpt")
    return state, meta


def _resumed_window(meta: dict[str, Any] | None, start: int, log_every: int) -> list[float]:
    """The losses of the steps after the last multiple of `log_every` up to `start`, as far as the
    checkpoint kept them (it keeps those since its own run's last log; log_every may have changed)."""
    pending = start % log_every
    stored = [] if meta is None else meta.get("window_losses", [])
    return list(stored[-pending:]) if pending else []


def _train(run: Run, state: TrainState, meta: dict[str, Any] | None, checkpointer: Checkpointer,
           metrics_log: MetricsLog, log: Callable[[str], None]) -> dict[str, Any]:
    cfg = run.cfg
    start = 0 if meta is None else int(meta["data"]["next_step"])
    if start:
        metrics_log.write({"event": "resume", "step": start})
    if jax.process_index() == 0:
        (Path(cfg.out) / "config.json").write_text(cfg.to_json())
    flops = flops_per_token(state["params"])
    peak = peak_flops(list(run.mesh.devices.flat))
    log(f"RWKV-{run.model_cfg.version} L{run.model_cfg.n_layer} D{run.model_cfg.n_embd} V{run.model_cfg.vocab_size}: "
        f"{count_params(state['params']) / 1e6:.2f}M params; {len(run.data.train)} train / {len(run.data.val)} "
        f"val tokens; mesh {dict(run.mesh.shape)}")

    step_fn = jax.jit(make_train_step(run.model, run.tx, cfg.l2wrap, cfg.doc_sep),
                      in_shardings=(run.state_shardings, run.batch_sharding),
                      out_shardings=(run.state_shardings, None), donate_argnums=0)
    eval_fn = jax.jit(make_eval_step(run.model, run.tokenizer.token_bytes(), cfg.doc_sep))
    val_batches = data_lib.eval_batches(run.data.val, cfg.ctx_len, cfg.batch_size, cfg.eval_batches)
    schedule = lr_schedule(cfg)
    window = Window(cfg.batch_size * cfg.ctx_len, _resumed_window(meta, start, cfg.log_every))
    losses: list[float] = []
    last_record: dict[str, Any] = {}
    end = _end_step(cfg)
    for step in range(start, end):
        tick = time.perf_counter()
        state, metrics = step_fn(state, train_batch(run, step))
        metrics = jax.device_get(metrics)
        done = step + 1
        if not metrics["finite"]:
            checkpointer.wait()
            good = checkpointer.latest_step()
            message = (f"non-finite training state at step {done} (loss {float(metrics['loss'])}, grad norm "
                       f"{float(metrics['grad_norm'])}): stopped without saving it; the last good checkpoint "
                       f"is {'step ' + str(good) if good is not None else 'none'} in {cfg.out}/ckpt")
            metrics_log.write({"event": "non_finite", "step": done, "loss": float(metrics["loss"])})
            raise NonFiniteLossError(message)
        loss = float(metrics["loss"])
        losses.append(loss)
        window.add(loss, time.perf_counter() - tick, timed=step > start)

        full_window = done % cfg.log_every == 0
        if full_window or done == end:
            tok_s = window.tokens_per_s()
            last_record = {"step": done, "loss": float(np.mean(window.losses)), "lr": float(schedule(step)),
                           "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": tok_s}
            if not full_window:
                # The steps since the last multiple of log_every, at the end of this invocation;
                # a resumed run replaces this record with the whole window's.
                last_record["partial"] = True
            line = (f"step {done}/{cfg.steps} | loss {last_record['loss']:.4f} | lr {last_record['lr']:.2e} | "
                    + (f"{tok_s / 1e3:.1f}k tok/s" if math.isfinite(tok_s) else "- tok/s"))
            if math.isfinite(tok_s):
                if peak is not None:
                    last_record["mfu"] = flops * tok_s / peak
                    line += f" | MFU {100 * last_record['mfu']:.1f}%"
                line += f" | ETA {_format_eta((cfg.steps - done) * window.tokens_per_step / tok_s)}"
            metrics_log.write(last_record)
            log(line)
            if full_window:
                window.reset()

        val_record = None
        if done % cfg.eval_every == 0 or done == cfg.steps:
            result = evaluate_params(state["params"], eval_fn, val_batches, run.batch_sharding)
            val_record = {"step": done, "val_loss": result["loss"], "val_bpb": result["bpb"]}
            metrics_log.write(val_record)
            log(f"step {done}: val loss {result['loss']:.4f}, {result['bpb']:.4f} bits/byte")
        save = done % cfg.save_every == 0 or done == end
        if save or val_record is not None:
            step_meta = _meta(run, done, {"loss": loss, **(val_record or {})}, list(window.losses))
            if save:
                checkpointer.save(done, state, step_meta)
            if val_record is not None:
                checkpointer.save_if_best(done, state, step_meta, val_record["val_loss"])

    checkpointer.wait()
    if cfg.export_pth and jax.process_index() == 0:
        rj.save_pth(Path(cfg.out) / "final.pth", run.model_cfg, jax.device_get(state["params"]))
    return {"losses": losses, "state": state, "start_step": start, "last": last_record}


def load_checkpoint(run_dir: str | Path, step: int | None = None, best: bool = False
                    ) -> tuple[TrainState, dict[str, Any]]:
    """The train state and metadata of a run's checkpoint (the latest, a given `step`, or the best
    by validation), replicated over all local devices."""
    if not (Path(run_dir) / "ckpt").is_dir():
        raise FileNotFoundError(f"no checkpoint in {run_dir} (expected a run directory with ckpt/)")
    checkpointer = Checkpointer(run_dir, async_save=False, read_only=True)
    try:
        if step is None:
            step = checkpointer.best_step() if best else checkpointer.latest_step()
        if step is None:
            raise FileNotFoundError(f"no {'best ' if best else ''}checkpoint in {run_dir}")
        meta = checkpointer.read_meta(step, best=best)
        cfg = TrainConfig(**meta["train_config"])
        shapes = params_shape(rj.RWKV(rj.RWKVConfig(**meta["model_config"])))
        abstract = abstract_train_state(shapes, make_optimizer(cfg, shapes), shard_lib.make_mesh(), cfg.fsdp_min_size)
        return checkpointer.restore(step, abstract, best=best)
    finally:
        checkpointer.close()


def evaluate(run_dir: str | Path, text: str | Path, best: bool = False, step: int | None = None,
             max_batches: int | None = None) -> dict[str, float]:
    """Loss (nats/token), perplexity and bits per byte of a text file under a run's checkpoint
    (see `load_checkpoint`), on all local devices."""
    state, meta = load_checkpoint(run_dir, step, best)
    cfg = TrainConfig(**meta["train_config"])
    model = rj.RWKV(rj.RWKVConfig(**meta["model_config"]))
    tokenizer = load_tokenizer(meta["tokenizer"], Path(run_dir))
    tokens = tokenizer.encode(data_lib.read_text(text))
    n_devices = jax.device_count()
    batch_size = n_devices * max(1, cfg.batch_size // n_devices)
    batches = data_lib.eval_batches(tokens, cfg.ctx_len, batch_size, max_batches)
    eval_step = jax.jit(make_eval_step(model, tokenizer.token_bytes(), cfg.doc_sep))
    mesh = shard_lib.make_mesh()
    with jax.set_mesh(mesh):
        result = evaluate_params(state["params"], eval_step, batches, shard_lib.batch_sharding(mesh))
    return {"step": meta["step"], "loss": result["loss"], "perplexity": math.exp(result["loss"]),
            "bpb": result["bpb"], "tokens": result["tokens"]}
