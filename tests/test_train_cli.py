"""The `rwkv-jax` CLI and reporting: config overrides, usage errors, fine-tuning an official-format
`.pth` (and exporting it back), a non-finite step stopping training with a clear message while
the last good checkpoint stays intact and loadable (and `eval` scores it), and the metrics log."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rwkv_jax as rj
from helpers import random_params
from rwkv_jax.cli import main
from rwkv_jax.train import optim
from rwkv_jax.train.checkpoint import Checkpointer
from rwkv_jax.train.config import ConfigError, TrainConfig
from rwkv_jax.train.data import builtin_corpus_path
from rwkv_jax.train.loop import MetricsLog, load_checkpoint


def test_overrides_parse_by_field_type_on_top_of_a_preset():
    cfg = TrainConfig.from_args(["preset=tiny", "version=5", "lr=1e-3", "steps=2e3", "async_save=false",
                                 "stop_after=none", "out=runs/x"])
    assert (cfg.version, cfg.lr, cfg.steps, cfg.async_save, cfg.stop_after, cfg.out) == (5, 1e-3, 2000, False,
                                                                                         None, "runs/x")
    assert cfg.n_embd == 64                                       # from the preset
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    for bad in (["steps=ten"], ["nope=1"], ["preset=huge"], ["version"], ["async_save=maybe"]):
        with pytest.raises(ConfigError):
            TrainConfig.from_args(bad)


def test_usage_errors_exit_with_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "preset=tiny", "steps=-1"])
    assert exit_info.value.code == 2 and "steps must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", str(tmp_path), "--text", "x.txt"])
    assert "no checkpoint" in capsys.readouterr().err


def test_fine_tuning_then_a_non_finite_step_stops_with_a_message_and_keeps_the_last_good_checkpoint(
        tmp_path, capsys, monkeypatch):
    # Fine-tune a "ported" model: an official-format .pth with non-default weights.
    ported_cfg = rj.RWKVConfig(version=4, n_layer=2, n_embd=64, vocab_size=256)
    ported = random_params(ported_cfg, seed=3)
    rj.save_pth(tmp_path / "ported.pth", ported_cfg, ported)
    common = ["preset=tiny", "steps=20", "save_every=2", "log_every=2", f"init_from={tmp_path / 'ported.pth'}",
              f"out={tmp_path / 'run'}"]
    assert main(["train", *common, "stop_after=4", "export_pth=true"]) == 0
    good, meta = load_checkpoint(tmp_path / "run")
    assert meta["model_config"]["version"] == 4 and meta["train_config"]["eps"] == 1e-8   # v4 recipe
    # Four Adam steps move no weight by more than 4 · lr · 3 (time_first's multiplier) ...
    drift = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(good["params"]), jax.tree.leaves(ported)))
    assert drift <= 4 * 3e-3 * 3 * 1.01
    # ... and the fine-tuned weights export back to an official .pth.
    _, exported = rj.load_pth(tmp_path / "run" / "final.pth")
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(good["params"])):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b))
    capsys.readouterr()

    # An infinite learning rate (which the config refuses, so it is patched into the optimiser)
    # makes the first resumed update non-finite, as a loss spike would.
    monkeypatch.setattr(optim, "lr_schedule", lambda cfg: lambda step: jnp.inf)
    assert main(["train", "--resume", *common, "save_every=1"]) == 1
    err = capsys.readouterr().err
    assert "non-finite training state at step 5" in err and "last good checkpoint is step 4" in err

    assert Checkpointer(tmp_path / "run", read_only=True).latest_step() == 4    # step 5 was never saved
    kept, meta = load_checkpoint(tmp_path / "run")
    assert meta["step"] == 4
    for x, y in zip(jax.tree.leaves(kept), jax.tree.leaves(good)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # The kept checkpoint still scores text through `rwkv-jax eval`.
    text = tmp_path / "sample.txt"
    text.write_text(builtin_corpus_path().read_text(encoding="utf-8")[:5000], encoding="utf-8")
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--text", str(text), "--max-batches", "2"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("step 4: loss ") and "bits/byte" in line
    assert np.isfinite(float(line.split("loss ")[1].split()[0]))


def read_event_scalars(directory) -> list[tuple[str, float, int]]:
    """(tag, value, step) of every scalar in the TensorBoard event files under `directory`, parsed
    from the TFRecord framing (u64 length, u32 crc, payload, u32 crc) with tensorboardX's protos."""
    from tensorboardX.proto import event_pb2

    scalars = []
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            length = int.from_bytes(data[offset:offset + 8], "little")
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            scalars += [(v.tag, v.simple_value, event.step) for v in event.summary.value]
    return scalars


def test_metrics_go_to_jsonl_and_to_tensorboard_event_files(tmp_path):
    log = MetricsLog(tmp_path)
    log.write({"step": 10, "loss": 2.5, "lr": 1e-3})
    log.write({"event": "resume", "step": 10})
    log.close()
    assert read_event_scalars(tmp_path / "tb") == [("loss", 2.5, 10), ("lr", pytest.approx(1e-3), 10)]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 10, "loss": 2.5, "lr": 1e-3},
                                                     {"event": "resume", "step": 10}]


def test_a_resumed_run_forgets_what_was_logged_after_its_checkpoint(tmp_path):
    # Stopped at 6 (a partial window 5-6), resumed, killed after logging 8 and 9 unsaved.
    before = [{"step": 4, "loss": 2.0}, {"step": 6, "val_loss": 1.9}, {"step": 6, "loss": 1.8, "partial": True},
              {"event": "resume", "step": 6}, {"step": 8, "loss": 1.7}, {"step": 9, "val_loss": 1.6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in before))
    log = MetricsLog(tmp_path, rewind_to=6)            # resuming from the step-6 checkpoint again
    log.close()
    after = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert after == [before[0], before[1], before[3]]
