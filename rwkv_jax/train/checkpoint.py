"""Training checkpoints with orbax: the last N steps plus the best one by validation loss.

Layout of a run directory `out/`:

    out/ckpt/<step>/state   params, optimiser state and step (sharded arrays, any mesh)
    out/ckpt/<step>/meta    JSON: both configs, data position (seed, next step), metrics
    out/best/<step>/...     the same, for the step with the lowest validation loss so far

Orbax writes a step into a temporary directory and renames it once every file is written, and
`latest_step()` lists only renamed (finalized) steps, so a save interrupted by a crash is never
picked up by `--resume` (tests/test_train_crash.py kills a run mid-save to check this).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

PyTree = Any


def _manager(directory: Path, keep: int, async_save: bool, best: bool, read_only: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
        # A run killed mid-save leaves "<step>.orbax-checkpoint-tmp": never listed, removed on reopen.
        cleanup_tmp_directories=not read_only,
        best_fn=(lambda metrics: metrics["val_loss"]) if best else None, best_mode="min",
        keep_checkpoints_without_metrics=not best)
    return ocp.CheckpointManager(directory.absolute(), options=options, item_names=("state", "meta"))


class Checkpointer:
    """Saves and restores `(state, meta)` pairs under `out/ckpt` (keep last `keep`) and `out/best`;
    `read_only` opens an existing run without creating or cleaning anything."""

    def __init__(self, out: str | os.PathLike, keep: int = 3, async_save: bool = True, read_only: bool = False):
        out = Path(out)
        self.last = _manager(out / "ckpt", keep, async_save, best=False, read_only=read_only)
        self.best = _manager(out / "best", 1, async_save, best=True, read_only=read_only)
        # Tracked here because orbax only knows a step's metrics once its (async) save finalizes.
        best_step = self.best.best_step()
        self.best_val_loss = float("inf") if best_step is None else float(self.best.metrics(best_step)["val_loss"])

    def latest_step(self) -> int | None:
        """The newest finalized step, or None."""
        return self.last.latest_step()

    def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> None:
        """Save `state` (a pytree of arrays) and `meta` (JSON-able) as `step` (async if enabled)."""
        self.last.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)))

    def save_if_best(self, step: int, state: PyTree, meta: dict[str, Any], val_loss: float) -> bool:
        """Keep `state` in `out/best` if `val_loss` beats the best stored so far; returns whether it did."""
        if not val_loss < self.best_val_loss:
            return False
        # orbax declines steps at or before its newest one (a run resumed with other settings).
        saved = self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             meta=ocp.args.JsonSave(meta)),
                               metrics={"val_loss": float(val_loss)})
        if saved:
            self.best_val_loss = float(val_loss)
        return saved

    def restore(self, step: int, abstract_state: PyTree, best: bool = False) -> tuple[PyTree, dict[str, Any]]:
        """Restore step `step` into the shapes, dtypes and shardings of `abstract_state`
        (a pytree of `jax.ShapeDtypeStruct` with `.sharding`)."""
        manager = self.best if best else self.last
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"])

    def read_meta(self, step: int, best: bool = False) -> dict[str, Any]:
        """Only the JSON metadata of a step (to rebuild the model before restoring arrays)."""
        manager = self.best if best else self.last
        return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def best_step(self) -> int | None:
        return self.best.best_step()

    def wait(self) -> None:
        """Block until pending async saves are written and renamed."""
        self.last.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.last.close()
        self.best.close()


def latest_meta(out: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata of the newest finalized checkpoint in `out/ckpt`, or None; reads only (a run
    about to resume needs its stored configs before it builds anything)."""
    if not (Path(out) / "ckpt").is_dir():
        return None
    checkpointer = Checkpointer(out, async_save=False, read_only=True)
    try:
        step = checkpointer.latest_step()
        return None if step is None else checkpointer.read_meta(step)
    finally:
        checkpointer.close()
