"""Train every RWKV version (1-7) on the same tasks at a matched parameter count and compare them.

    python experiments/compare_versions.py --preset cpu            # the main job: minutes on a CPU
    python experiments/compare_versions.py --preset smoke --out runs/smoke
    python experiments/compare_versions.py --preset gpu --versions 4 5 6 7 --tasks mqar

Tasks (experiments/tasks): `charlm` (byte LM on the built-in corpus: validation bits per byte at
the training length, and the loss at every position of windows longer than the training context),
`mqar` (multi-query associative recall, accuracy on the answer positions of held-out examples) and
`state` (group word problems, accuracy at every position, for several layer counts).

Matching: every version gets the same n_layer and n_embd (so the embedding, the residual width and
the head are identical); its FFN width `dim_ffn` is then chosen so that the non-embedding
parameter count (everything but `emb`/`tok_emb` and `head`) is that of the largest default-sized
version, within ~1%. RWKV-1..3 run without their head-QK copy head (`head_qk=0`): it is an
attention over the whole context that would solve recall by itself and is not part of the
recurrence being compared. RWKV-1 is built with `ctx_len` = the longest sequence it sees, since
its parameters are tied to positions.

Writes to `--out`: `results.jsonl` (one record per trained model, with its loss curve and
per-position metrics), `results.csv` (the scalar columns), PNG plots and `summary.txt` (the
table printed at the end).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

if __package__ in (None, ""):  # run as a script: make `experiments.tasks` importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

import rwkv_jax as rj  # noqa: E402
from experiments.tasks import IGNORE_INDEX, charlm, mqar, state_tracking  # noqa: E402
from rwkv_jax.state import state_shapes  # noqa: E402
from rwkv_jax.train.config import TrainConfig  # noqa: E402
from rwkv_jax.train.optim import l2wrap, make_optimizer  # noqa: E402

Array = jax.Array
VERSIONS = (1, 2, 3, 4, 5, 6, 7)
TASKS = ("charlm", "mqar", "state")
EMBEDDING_PARAMS = ("emb", "tok_emb", "head")


# ----------------------------------------------------------------------------- presets

@dataclasses.dataclass(frozen=True)
class Preset:
    """Everything one comparison run needs. Lengths are tokens; steps are optimiser steps."""

    n_embd: int
    head_size: int
    n_layer: int                      # charlm and mqar
    lr: float
    weight_decay: float
    batch_size: int
    eval_examples: int
    # charlm
    charlm_steps: int
    charlm_train_len: int
    charlm_eval_len: int              # > train_len: the loss beyond the training context
    # mqar
    mqar_steps: int
    mqar_len: int
    mqar_pairs: int
    mqar_vocab: int
    # state tracking
    state_steps: int
    state_len: int
    state_groups: tuple[str, ...]
    state_layers: tuple[int, ...]
    state_versions: tuple[int, ...] = VERSIONS
    tasks: tuple[str, ...] = TASKS
    log_every: int = 10
    wkv: str = "auto"                 # "oracle" compiles faster; the parallel form trains faster


PRESETS: dict[str, Preset] = {
    # CI: a few steps of everything at toy size; checks the machinery, not the numbers.
    "smoke": Preset(n_embd=32, head_size=16, n_layer=1, lr=3e-3, weight_decay=0.0, batch_size=4, eval_examples=8,
                    charlm_steps=6, charlm_train_len=32, charlm_eval_len=64,
                    mqar_steps=6, mqar_len=64, mqar_pairs=4, mqar_vocab=8192,
                    state_steps=6, state_len=16, state_groups=("A5",), state_layers=(1,), state_versions=(4, 7),
                    log_every=2, wkv="oracle"),
    # The README's main job: all seven versions on the char LM and a small MQAR (minutes on a CPU).
    # MQAR here uses a 256-token vocabulary (Zoology's is 8192) and 8 pairs in 64 tokens. At 2000
    # steps v6/v7 learn it after ~400 steps, v5 after ~1100, v4 not at all (experiments/RESULTS.md);
    # 1200 steps show that ordering. 400 steps, the first setting, left everything but v7 at chance.
    "cpu": Preset(n_embd=64, head_size=16, n_layer=2, lr=3e-3, weight_decay=0.1, batch_size=32, eval_examples=256,
                  charlm_steps=300, charlm_train_len=64, charlm_eval_len=256,
                  mqar_steps=1200, mqar_len=64, mqar_pairs=8, mqar_vocab=256,
                  state_steps=300, state_len=16, state_groups=("A5",), state_layers=(1, 2),
                  state_versions=(4, 6, 7), tasks=("charlm", "mqar"), log_every=20),
    # Paper scale (Eagle/Finch MQAR: T=512, 64 pairs, width 64; RWKV-7 state tracking by layers).
    "gpu": Preset(n_embd=64, head_size=16, n_layer=2, lr=1e-3, weight_decay=0.1, batch_size=64, eval_examples=1000,
                  charlm_steps=3000, charlm_train_len=512, charlm_eval_len=2048,
                  mqar_steps=8000, mqar_len=512, mqar_pairs=64, mqar_vocab=8192,
                  state_steps=4000, state_len=128, state_groups=("Z60", "A4xZ5", "A5", "S5"),
                  state_layers=(1, 2, 3, 4), state_versions=(4, 5, 6, 7), log_every=100),
}


# ----------------------------------------------------------------------------- models at matched size

def model_config(version: int, n_layer: int, n_embd: int, head_size: int, vocab_size: int, max_len: int,
                 dim_ffn: int | None = None, wkv: str = "auto") -> rj.RWKVConfig:
    """The comparison's RWKVConfig: no copy head for v1-v3, v1's ctx_len = the longest input."""
    extra: dict[str, Any] = {"head_qk": 0} if version <= 3 else {}
    if version == 1:
        extra["ctx_len"] = max_len
    return rj.RWKVConfig(version=version, n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size,
                         head_size=head_size, dim_ffn=dim_ffn, dtype="float32", wkv=wkv, **extra)


@functools.lru_cache(maxsize=None)
def param_counts(cfg: rj.RWKVConfig) -> tuple[int, int]:
    """`(total, non-embedding)` parameter counts of `cfg` (shapes only, nothing is allocated)."""
    shapes = jax.eval_shape(lambda: rj.RWKV(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    total = embedding = 0
    for name, subtree in shapes["params"].items():
        count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(subtree))
        total += count
        embedding += count if name in EMBEDDING_PARAMS else 0
    return total, total - embedding


def state_size(cfg: rj.RWKVConfig) -> int:
    """Floats of recurrent state per sequence (all layers; v1's is its buffer of past terms)."""
    return sum(int(np.prod(shape)) for name, shape in state_shapes(cfg, 1).items() if name != "pos")


def matched_configs(versions: tuple[int, ...], n_layer: int, n_embd: int, head_size: int, vocab_size: int,
                    max_len: int, wkv: str = "auto") -> dict[int, rj.RWKVConfig]:
    """Per version, the config whose non-embedding parameter count is closest to the largest
    default-sized version's, by choosing `dim_ffn` (the count is affine in it)."""
    base = {v: model_config(v, n_layer, n_embd, head_size, vocab_size, max_len, wkv=wkv) for v in versions}
    target = max(param_counts(cfg)[1] for cfg in base.values())
    matched = {}
    for v, cfg in base.items():
        at_f = param_counts(cfg)[1]
        per_unit = param_counts(cfg.replace(dim_ffn=cfg.dim_ffn + 1))[1] - at_f
        dim_ffn = max(8, cfg.dim_ffn + round((target - at_f) / per_unit))
        matched[v] = cfg.replace(dim_ffn=dim_ffn)
    return matched


# ----------------------------------------------------------------------------- training

def masked_token_stats(logits: Array, labels: Array) -> tuple[Array, Array, Array]:
    """Per-token `(nll, correct, scored)` `[B, T]` fp32; positions with `IGNORE_INDEX` score 0."""
    scored = labels != IGNORE_INDEX
    safe = jnp.where(scored, labels, 0)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    correct = (jnp.argmax(logits, -1) == safe) & scored
    mask = scored.astype(jnp.float32)
    return nll * mask, correct.astype(jnp.float32), mask


def masked_cross_entropy(logits: Array, labels: Array) -> Array:
    """Mean cross-entropy (nats) over the scored positions of `labels [B, T]`."""
    nll, _, mask = masked_token_stats(logits, labels)
    return nll.sum() / jnp.maximum(mask.sum(), 1.0)


def make_train_step(model: rj.RWKV, tx: optax.GradientTransformation) -> Callable:
    """Jitted `(params, opt_state, inputs [B, T], labels [B, T]) -> (params, opt_state, loss)`:
    masked cross-entropy with L2Wrap (the official trainers' logit regulariser) and the official
    AdamW recipe."""

    def loss_fn(params, inputs, labels):
        logits, _ = model.apply({"params": params}, inputs)
        return l2wrap(masked_cross_entropy(logits, labels), logits)

    @jax.jit
    def step(params, opt_state, inputs, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def make_eval_step(model: rj.RWKV) -> Callable:
    """Jitted `(params, inputs, labels) -> (nll, correct, scored)` summed over the batch: `[T]` each."""

    @jax.jit
    def evaluate(params, inputs, labels):
        logits, _ = model.apply({"params": params}, inputs)
        return tuple(x.sum(0) for x in masked_token_stats(logits, labels))

    return evaluate


def evaluate_by_position(eval_step: Callable, params: Any, inputs: np.ndarray, labels: np.ndarray,
                         batch_size: int) -> dict[str, np.ndarray]:
    """Sums of nll / correct / scored per position over all rows of `inputs [B, T]`, in batches of
    `batch_size` rows (the last one padded with unscored rows, so one compiled shape serves)."""
    pad = -len(inputs) % batch_size
    inputs = np.concatenate([inputs, np.zeros((pad, inputs.shape[1]), inputs.dtype)])
    labels = np.concatenate([labels, np.full((pad, labels.shape[1]), IGNORE_INDEX, labels.dtype)])
    totals = [np.zeros(inputs.shape[1]) for _ in range(3)]
    for start in range(0, len(inputs), batch_size):
        parts = eval_step(params, jnp.asarray(inputs[start:start + batch_size]),
                          jnp.asarray(labels[start:start + batch_size]))
        for total, part in zip(totals, parts):
            total += np.asarray(part, np.float64)
    return dict(zip(("nll", "correct", "scored"), totals))


def train_model(cfg: rj.RWKVConfig, batch_fn: Callable[[int], tuple[np.ndarray, np.ndarray]], steps: int,
                preset: Preset, seed: int, log: Callable[[str], None]) -> tuple[Any, list[list[float]], dict]:
    """Train `cfg` from the official init on `batch_fn(step)`; returns (params, curve, timing).
    The curve is `[step, mean train loss since the last entry]`; timing is
    `{"compile_seconds", "train_seconds"}` (the first step, which compiles, and the rest)."""
    model = rj.RWKV(cfg)
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    train_cfg = TrainConfig(version=cfg.version, lr=preset.lr, lr_final=preset.lr / 10, steps=steps,
                            warmup_steps=max(1, steps // 20), weight_decay=preset.weight_decay, grad_clip=1.0)
    tx = make_optimizer(train_cfg, params)
    opt_state = tx.init(params)
    step_fn = make_train_step(model, tx)
    curve, pending = [], []
    start = time.perf_counter()
    compile_seconds = 0.0
    for step in range(steps):
        inputs, labels = batch_fn(step)
        params, opt_state, loss = step_fn(params, opt_state, jnp.asarray(inputs), jnp.asarray(labels))
        pending.append(loss)
        if step == 0:
            jax.block_until_ready(loss)
            compile_seconds = time.perf_counter() - start
            start = time.perf_counter()
        if (step + 1) % preset.log_every == 0 or step + 1 == steps:
            mean = float(np.mean([float(x) for x in pending]))
            if not math.isfinite(mean):
                log(f"    RWKV-{cfg.version}: non-finite loss at step {step + 1}; stopping this model")
                curve.append([step + 1, mean])
                break
            curve.append([step + 1, mean])
            pending = []
    jax.block_until_ready(params)
    timing = {"compile_seconds": round(compile_seconds, 2), "train_seconds": round(time.perf_counter() - start, 2)}
    return params, curve, timing


def run_record(task: str, cfg: rj.RWKVConfig, curve: list, timing: dict, **fields: Any) -> dict[str, Any]:
    total, non_embedding = param_counts(cfg)
    return {"task": task, "version": cfg.version, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
            "head_size": cfg.head_size, "dim_ffn": cfg.dim_ffn, "params": total, "params_non_embedding": non_embedding,
            "state_floats": state_size(cfg), "steps": curve[-1][0] if curve else 0,
            "final_train_loss": curve[-1][1] if curve else float("nan"), **timing, "curve": curve, **fields}


# ----------------------------------------------------------------------------- tasks

def seed_of(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def run_charlm(preset: Preset, versions: tuple[int, ...], seed: int, log: Callable[[str], None]) -> list[dict]:
    configs = matched_configs(versions, preset.n_layer, preset.n_embd, preset.head_size, charlm.VOCAB_SIZE,
                              preset.charlm_eval_len, preset.wkv)
    val = charlm.val_windows(preset.eval_examples, preset.charlm_eval_len)
    records = []
    for v, cfg in configs.items():
        batch_fn = lambda step: charlm.train_batch(preset.batch_size, preset.charlm_train_len, seed_of(seed, 1, step))  # noqa: E731
        params, curve, timing = train_model(cfg, batch_fn, preset.charlm_steps, preset, seed, log)
        stats = evaluate_by_position(make_eval_step(rj.RWKV(cfg)), params, *val, preset.batch_size)
        T = preset.charlm_train_len
        bpb = lambda part: float(stats["nll"][part].sum() / stats["scored"][part].sum() / math.log(2))  # noqa: E731
        record = run_record("charlm", cfg, curve, timing, train_len=T, eval_len=preset.charlm_eval_len,
                            val_bpb=bpb(slice(0, T)), val_bpb_beyond_ctx=bpb(slice(T, None)),
                            loss_by_position=(stats["nll"] / stats["scored"]).tolist())
        records.append(record)
        log(_line(record, f"val bpb {record['val_bpb']:.3f}, beyond ctx {record['val_bpb_beyond_ctx']:.3f}"))
    return records


def run_mqar(preset: Preset, versions: tuple[int, ...], seed: int, log: Callable[[str], None]) -> list[dict]:
    T, P, V = preset.mqar_len, preset.mqar_pairs, preset.mqar_vocab
    configs = matched_configs(versions, preset.n_layer, preset.n_embd, preset.head_size, V, T, preset.wkv)
    test = mqar.multiquery_ar(preset.eval_examples, T, P, seed=seed_of(seed, 2, 10**9), vocab_size=V)
    records = []
    for v, cfg in configs.items():
        batch_fn = lambda step: mqar.multiquery_ar(preset.batch_size, T, P, seed_of(seed, 2, step), vocab_size=V)  # noqa: E731
        params, curve, timing = train_model(cfg, batch_fn, preset.mqar_steps, preset, seed, log)
        stats = evaluate_by_position(make_eval_step(rj.RWKV(cfg)), params, *test, preset.batch_size)
        record = run_record("mqar", cfg, curve, timing, seq_len=T, num_kv_pairs=P, vocab_size=V,
                            accuracy=float(stats["correct"].sum() / stats["scored"].sum()))
        records.append(record)
        log(_line(record, f"accuracy {record['accuracy']:.3f}"))
    return records


def run_state_tracking(preset: Preset, versions: tuple[int, ...], seed: int, log: Callable[[str], None]
                       ) -> list[dict]:
    T = preset.state_len
    records = []
    for g, group in enumerate(preset.state_groups):
        order = state_tracking.make_group(group).order
        test = state_tracking.word_problems(group, preset.eval_examples, T, seed=seed_of(seed, 3, g, 10**9))
        for n_layer in preset.state_layers:
            configs = matched_configs(tuple(v for v in versions if v in preset.state_versions), n_layer,
                                      preset.n_embd, preset.head_size, order, T, preset.wkv)
            for v, cfg in configs.items():
                batch_fn = lambda step: state_tracking.word_problems(group, preset.batch_size, T,  # noqa: E731
                                                                     seed_of(seed, 3, g, step))
                params, curve, timing = train_model(cfg, batch_fn, preset.state_steps, preset, seed, log)
                stats = evaluate_by_position(make_eval_step(rj.RWKV(cfg)), params, *test, preset.batch_size)
                record = run_record("state", cfg, curve, timing, group=group, seq_len=T,
                                    accuracy=float(stats["correct"].sum() / stats["scored"].sum()),
                                    accuracy_by_position=(stats["correct"] / stats["scored"]).tolist())
                records.append(record)
                log(_line(record, f"{group} accuracy {record['accuracy']:.3f}"))
    return records


def _line(record: dict, metric: str) -> str:
    return (f"  {record['task']:6s} RWKV-{record['version']} L{record['n_layer']} ffn {record['dim_ffn']:4d} "
            f"params {record['params_non_embedding']:,} state {record['state_floats']:,}: {metric} "
            f"(compile {record['compile_seconds']:.0f}s, train {record['train_seconds']:.0f}s)")


# ----------------------------------------------------------------------------- output

SCALAR_COLUMNS = ("task", "group", "version", "n_layer", "n_embd", "head_size", "dim_ffn", "params",
                  "params_non_embedding", "state_floats", "steps", "final_train_loss", "val_bpb", "val_bpb_beyond_ctx",
                  "accuracy", "seq_len", "num_kv_pairs", "compile_seconds", "train_seconds")


def write_results(records: list[dict], out: Path) -> None:
    with open(out / "results.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, SCALAR_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def load_results(out: str | Path) -> list[dict]:
    """The records of a finished run folder (`results.jsonl`)."""
    return [json.loads(line) for line in Path(out, "results.jsonl").read_text().splitlines() if line]


def summary_table(records: list[dict]) -> str:
    """A markdown table: one row per trained model."""
    head = "| task | version | layers | dim_ffn | non-emb params | state floats | metric | compile s | train s |"
    rows = [head, "|" + "---|" * 9]
    for r in records:
        if r["task"] == "charlm":
            metric = f"val bpb {r['val_bpb']:.3f} (beyond ctx {r['val_bpb_beyond_ctx']:.3f})"
        elif r["task"] == "mqar":
            metric = f"acc {r['accuracy']:.3f} (T={r['seq_len']}, {r['num_kv_pairs']} pairs)"
        else:
            metric = f"{r['group']} acc {r['accuracy']:.3f} (T={r['seq_len']})"
        rows.append(f"| {r['task']} | {r['version']} | {r['n_layer']} | {r['dim_ffn']} | {r['params_non_embedding']:,} "
                    f"| {r['state_floats']:,} | {metric} | {r['compile_seconds']:.0f} | {r['train_seconds']:.0f} |")
    return "\n".join(rows)


def plot_results(records: list[dict], out: Path) -> list[Path]:
    """Loss curves, metric bars, accuracy vs state size, loss vs position, state tracking vs layers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    tasks = [t for t in TASKS if any(r["task"] == t for r in records)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in records:
            if r["task"] == task:
                steps, losses = zip(*r["curve"])
                label = f"v{r['version']}" + (f" {r['group']} L{r['n_layer']}" if task == "state" else "")
                ax.plot(steps, losses, label=label)
        ax.set(title=f"{task}: training loss", xlabel="step", ylabel="loss (nats)")
        ax.legend(fontsize=7)
    save(fig, "loss_curves.png")

    lm = [r for r in records if r["task"] == "charlm"]
    if lm:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for r in lm:
            loss = np.asarray(r["loss_by_position"])
            window = max(1, len(loss) // 32)
            smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
            ax.plot(np.arange(len(smooth)) + window // 2, smooth / math.log(2), label=f"v{r['version']}")
        ax.axvline(lm[0]["train_len"], color="k", ls="--", lw=0.8)
        ax.set(title="char LM: validation loss by position (dashed: training context)", xlabel="position",
               ylabel="bits per byte")
        ax.legend(fontsize=7)
        save(fig, "loss_by_position.png")

    mq = [r for r in records if r["task"] == "mqar"]
    if mq:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for r in mq:
            ax.scatter(r["state_floats"], r["accuracy"])
            ax.annotate(f"v{r['version']}", (r["state_floats"], r["accuracy"]), fontsize=8)
        ax.set(xscale="log", title=f"MQAR accuracy vs state size (T={mq[0]['seq_len']}, {mq[0]['num_kv_pairs']} pairs)",
               xlabel="recurrent state (floats per sequence)", ylabel="accuracy")
        save(fig, "mqar_accuracy_vs_state.png")

    st = [r for r in records if r["task"] == "state"]
    if st:
        groups = sorted({r["group"] for r in st})
        fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.6), squeeze=False)
        for ax, group in zip(axes[0], groups):
            for v in sorted({r["version"] for r in st}):
                rows = sorted((r["n_layer"], r["accuracy"]) for r in st if r["group"] == group and r["version"] == v)
                ax.plot(*zip(*rows), marker="o", label=f"v{v}")
            ax.set(title=f"{group}: accuracy vs layers", xlabel="layers", ylabel="accuracy (all positions)", ylim=(0, 1.02))
            ax.legend(fontsize=7)
        save(fig, "state_tracking_vs_layers.png")
    return written


# ----------------------------------------------------------------------------- main

RUNNERS = {"charlm": run_charlm, "mqar": run_mqar, "state": run_state_tracking}


def run(preset: Preset, versions: tuple[int, ...] = VERSIONS, out: str | Path = "runs/compare_versions",
        seed: int = 0, log: Callable[[str], None] = print) -> list[dict]:
    """Run every task of `preset` for `versions`; write results and plots to `out`; return the records."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "preset.json").write_text(json.dumps({**dataclasses.asdict(preset), "versions": list(versions),
                                                 "seed": seed, "jax_backend": jax.default_backend()}, indent=1))
    records = []
    for task in preset.tasks:
        log(f"{task}:")
        records += RUNNERS[task](preset, versions, seed, log)
        write_results(records, out)   # partial results survive an interrupted run
    plot_results(records, out)
    table = summary_table(records)
    (out / "summary.txt").write_text(table + "\n")
    log(table)
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--versions", type=int, nargs="+", default=list(VERSIONS), choices=VERSIONS)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, help="override the preset's tasks")
    parser.add_argument("--out", default=None, help="run folder (default runs/compare_<preset>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="override preset fields, e.g. --set mqar_steps=2000 state_layers=1,2,3")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    overrides = dict(_parse_override(preset, item) for item in args.set)
    if args.tasks:
        overrides["tasks"] = tuple(args.tasks)
    preset = dataclasses.replace(preset, **overrides)
    run(preset, tuple(args.versions), args.out or f"runs/compare_{args.preset}", args.seed)


def _parse_override(preset: Preset, item: str) -> tuple[str, Any]:
    name, sep, text = item.partition("=")
    if not sep or name not in {f.name for f in dataclasses.fields(Preset)}:
        raise SystemExit(f"--set expects FIELD=VALUE with a Preset field, got {item!r}")
    current = getattr(preset, name)
    if isinstance(current, tuple):
        kind = type(current[0]) if current else str
        return name, tuple(kind(x) for x in text.split(",") if x)
    return name, type(current)(text)


if __name__ == "__main__":
    main()
