"""`TrainConfig`: every knob of a training run in one flat dataclass, with presets and overrides.

    cfg = TrainConfig.from_args(["preset=tiny", "version=7", "steps=200", "out=runs/x"])

Fields left at `None` get the official per-version value when the run starts (`resolved()`):
Adam eps is 4e-9 for RWKV-1..3, 1e-8 for RWKV-4 and 1e-18 for v5+ (spec §10), the warm-up floor is 0.2 for v4
(v4neo: `lr·(0.2 + 0.8·s/W)`) and 0.01 for v5+ (`lr·(0.01 + 0.99·s/W)`), the decay is exponential
for v4 and cosine for v5+.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any

BUILTIN_CORPUS = "shakespeare"


class ConfigError(ValueError):
    """A run that cannot start as configured (bad field, clashing run directory, ...)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run. Sizes follow `RWKVConfig`; `vocab_size` comes from the tokenizer.

    Model: version, n_layer, n_embd, head_size, dtype (compute), param_dtype (master weights),
      wkv, init_from (an official `.pth` to fine-tune; its sizes replace the ones here).
    Data: data (a text file, a token `.npy`, or "shakespeare" for the built-in corpus),
      tokenizer ("byte", "world" for the RWKV World vocabulary (65536 ids), "sentencepiece" to
      train one on the data, or a `.model` path), sp_vocab_size, val_fraction (the tail of the
      tokens held out), ctx_len, batch_size (global, over all devices), sampler ("random" crops,
      or "magic_prime": the official binidx order, every ctx_len-aligned crop once per pass,
      independent of the seed), doc_sep (an end-of-document token id, e.g. 0 in official binidx
      data: the token after each one starts a new document and the recurrent state is reset
      there, so packed documents do not see each other; None = one stream; not for RWKV-1,
      whose time mix weights tokens by absolute position).
    Optimiser: lr -> lr_final over `steps` after `warmup_steps`, schedule ("cosine" | "exp"),
      warmup_floor, weight_decay (only on the large matrices), beta1, beta2, eps, grad_clip
      (global norm; 0 disables), layerwise_lr (the official per-parameter multipliers),
      l2wrap (the L2Wrap factor; 0 disables).
    Run: steps (the schedule's length), stop_after (end this invocation after that step with a
      checkpoint, as if interrupted; `resume` continues it), seed, out (run directory), log_every,
      eval_every, eval_batches, save_every, keep (last N checkpoints), async_save, resume,
      mesh_data / mesh_fsdp (mesh shape; -1 = all remaining devices), mesh_seq (context
      parallelism: each sequence's tokens split over this many devices; RWKV-4..7, ctx_len a
      multiple of it), fsdp_min_size (smaller arrays stay replicated), export_pth (write `final.pth` in the official format at the end).

    Resuming: a resumed run must keep the model (its `RWKVConfig`), the data fields of
    `RESUME_FIXED` and the on/off state of `RESUME_SWITCHES` (see `resume_conflicts`); anything else
    (steps, stop_after, the lr schedule and Adam's numbers, l2wrap, intervals, keep, mesh, out,
    init_from) may change.
    """

    # model
    version: int = 7
    n_layer: int = 6
    n_embd: int = 512
    head_size: int = 64
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    wkv: str = "auto"
    init_from: str | None = None
    # data
    data: str = BUILTIN_CORPUS
    tokenizer: str = "byte"
    sp_vocab_size: int = 2048
    val_fraction: float = 0.05
    ctx_len: int = 512
    batch_size: int = 16
    sampler: str = "random"
    doc_sep: int | None = None
    # optimiser
    lr: float = 6e-4
    lr_final: float = 6e-5
    warmup_steps: int = 10
    schedule: str | None = None
    warmup_floor: float | None = None
    weight_decay: float = 0.001
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float | None = None
    grad_clip: float = 1.0
    layerwise_lr: bool = True
    l2wrap: float = 1e-4
    # run
    steps: int = 1000
    stop_after: int | None = None
    seed: int = 0
    out: str = "runs/default"
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 200
    keep: int = 3
    async_save: bool = True
    resume: bool = False
    mesh_data: int = -1
    mesh_fsdp: int = 1
    mesh_seq: int = 1
    fsdp_min_size: int = 2**18
    export_pth: bool = False

    def __post_init__(self) -> None:
        if self.sampler not in ("random", "magic_prime"):
            raise ConfigError(f"TrainConfig: sampler must be 'random' or 'magic_prime', got {self.sampler!r}")
        if self.doc_sep is not None and self.version == 1:
            raise ConfigError("TrainConfig: doc_sep (document resets) is not supported for RWKV-1: its time mix "
                              "weights tokens by absolute position")
        if self.schedule not in (None, "cosine", "exp"):
            raise ConfigError(f"TrainConfig: schedule must be 'cosine' or 'exp', got {self.schedule!r}")
        for name in ("n_layer", "n_embd", "ctx_len", "batch_size", "steps", "log_every", "eval_every",
                     "eval_batches", "save_every", "keep", "sp_vocab_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"TrainConfig: {name} must be positive, got {getattr(self, name)!r}")
        # np.random.default_rng([seed, step]) draws the batches; it takes no negative seeds.
        for name in ("seed", "warmup_steps", "fsdp_min_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TrainConfig: {name} must be 0 or more, got {getattr(self, name)!r}")
        if self.doc_sep is not None and self.doc_sep < 0:
            raise ConfigError(f"TrainConfig: doc_sep must be a token id (0 or more) or None, got {self.doc_sep!r}")
        for name in ("mesh_data", "mesh_fsdp"):
            if getattr(self, name) != -1 and getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig: {name} must be a positive device count or -1 (all remaining "
                                  f"devices), got {getattr(self, name)!r}")
        self._check_optimiser()
        if self.mesh_seq < 1 or self.ctx_len % self.mesh_seq:
            raise ConfigError(f"TrainConfig: mesh_seq must be a positive divisor of ctx_len={self.ctx_len}, "
                              f"got {self.mesh_seq}")
        if self.mesh_seq > 1 and self.version < 4:
            raise ConfigError("TrainConfig: context parallelism (mesh_seq > 1) supports RWKV-4 to 7 only")
        if self.stop_after is not None and self.stop_after <= 0:
            raise ConfigError(f"TrainConfig: stop_after must be positive or None, got {self.stop_after!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"TrainConfig: val_fraction must be in (0, 1), got {self.val_fraction}")

    def _check_optimiser(self) -> None:
        def refuse(name: str, rule: str) -> None:
            raise ConfigError(f"TrainConfig: {name} must be {rule}, got {getattr(self, name)!r}")

        # Every test below is false for NaN, so NaN is refused with the rest.
        if not 0.0 < self.lr < math.inf:
            refuse("lr", "positive and finite")
        if not 0.0 <= self.lr_final < math.inf:
            refuse("lr_final", "0 or more and finite")
        # Negative values used to mean "off" silently; 0 is the documented off switch.
        for name in ("weight_decay", "grad_clip", "l2wrap"):
            if not 0.0 <= getattr(self, name) < math.inf:
                refuse(name, "0 (off) or more and finite")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                refuse(name, "in [0, 1)")
        # Adam divides by sqrt(v) + eps, and v stays 0 for never-seen tokens' embedding rows.
        if self.eps is not None and not 0.0 < self.eps < math.inf:
            refuse("eps", "positive and finite (or None for the per-version default)")
        if self.warmup_floor is not None and not 0.0 <= self.warmup_floor <= 1.0:
            refuse("warmup_floor", "in [0, 1] (or None for the per-version default)")

    def resolved(self) -> TrainConfig:
        """This config with the per-version defaults filled in (see the module docstring)."""
        v4 = self.version == 4
        return dataclasses.replace(
            self,
            schedule=self.schedule or ("exp" if v4 else "cosine"),
            warmup_floor=self.warmup_floor if self.warmup_floor is not None else (0.2 if v4 else 0.01),
            eps=self.eps if self.eps is not None else (4e-9 if self.version <= 3 else 1e-8 if v4 else 1e-18))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        return cls(**json.loads(text))

    @classmethod
    def from_args(cls, args: list[str]) -> TrainConfig:
        """`["preset=tiny", "key=value", ...]`: the preset first (default "default"), then overrides."""
        pairs = []
        for arg in args:
            key, sep, value = arg.partition("=")
            if not sep:
                raise ConfigError(f"expected key=value, got {arg!r}")
            pairs.append((key.strip(), value.strip()))
        preset = dict(pairs).get("preset", "default")
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        overrides = {key: parse_field(key, value) for key, value in pairs if key != "preset"}
        return dataclasses.replace(PRESETS[preset], **overrides)


def parse_field(name: str, text: str) -> Any:
    """Parse `text` as the type of TrainConfig field `name` ("none" gives None where allowed)."""
    hints = typing.get_type_hints(TrainConfig)
    if name not in hints:
        raise ConfigError(f"unknown TrainConfig field {name!r}; known: {sorted(hints)}")
    kind = hints[name]
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if type(None) in options and text.lower() in ("none", "null", ""):
        return None
    base = next(option for option in options if option is not type(None))
    if base is bool:
        if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ConfigError(f"{name} expects a boolean, got {text!r}")
        return text.lower() in ("1", "true", "yes")
    if base is int:
        return _parse_int(name, text)
    try:
        return base(text)
    except ValueError:
        raise ConfigError(f"{name} expects {base.__name__}, got {text!r}") from None


def _parse_int(name: str, text: str) -> int:
    """An integer, also in float notation ("1e3") as long as the value is a whole number."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value.is_integer()):
        raise ConfigError(f"{name} expects an integer, got {text!r}")
    return int(value)


# Fields a resumed run must share with its checkpoint: they decide which tokens each step sees
# (the batches are a function of the data, its split, the crop shape, the sampler and the seed) or
# what the token ids mean (the tokenizer, the document separator); `layerwise_lr` adds a stage
# to the optax chain, so the stored optimiser state would not fit the new one.
RESUME_FIXED = ("data", "tokenizer", "val_fraction", "ctx_len", "batch_size", "sampler", "doc_sep", "seed",
                "layerwise_lr")
# Fields whose value may change on resume but not whether they are on (> 0) or off (0): switching
# them adds or removes a stage (clip_by_global_norm / add_decayed_weights) of the optax chain.
RESUME_SWITCHES = ("grad_clip", "weight_decay")


def resume_conflicts(stored: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """What keeps `cfg` from resuming a run whose checkpoint holds the train config `stored` (a
    dict, as saved): one line per field of `RESUME_FIXED` that differs and of `RESUME_SWITCHES`
    that was switched on or off. The model's fields are compared through its `RWKVConfig`."""
    conflicts = []
    for name in RESUME_FIXED:
        if stored.get(name) != getattr(cfg, name):
            conflicts.append(f"{name} is {stored.get(name)!r} in the checkpoint but {getattr(cfg, name)!r} now")
    for name in RESUME_SWITCHES:
        was, now = stored.get(name, 0), getattr(cfg, name)
        if (was > 0) != (now > 0):
            conflicts.append(f"{name} is {_switch(was)} in the checkpoint but {_switch(now)} now")
    return conflicts


def _switch(value: float) -> str:
    return f"{value!r} ({'on' if value > 0 else 'off'})"


PRESETS: dict[str, TrainConfig] = {
    # The official enwik8 demo size (L6-D512, ctx 512; spec §6.9), char-level on the built-in corpus.
    "default": TrainConfig(),
    # About a minute on a laptop CPU: char-level Shakespeare, the loss falls visibly.
    "cpu": TrainConfig(n_layer=2, n_embd=128, head_size=32, dtype="float32", ctx_len=128, batch_size=8,
                       lr=2e-3, lr_final=2e-4, steps=500, log_every=20, eval_every=100, eval_batches=4,
                       save_every=100, async_save=False),
    # The smallest meaningful model, for tests and smoke runs.
    "tiny": TrainConfig(n_layer=2, n_embd=64, head_size=32, dtype="float32", ctx_len=64, batch_size=8,
                        lr=3e-3, lr_final=3e-4, steps=100, log_every=10, eval_every=50, eval_batches=2,
                        save_every=50, async_save=False, fsdp_min_size=0),
    # The official MiniPile demo of RWKV-7 (spec §9.9); needs a real tokenizer and data set.
    "l12-d768": TrainConfig(n_layer=12, n_embd=768, ctx_len=512, batch_size=16, lr=6e-4, lr_final=6e-5),
}
