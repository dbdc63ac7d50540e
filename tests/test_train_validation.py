"""Bad input to a training run is refused up front with a ConfigError (a usage error from the CLI,
never a traceback) and loses nothing: settings out of range, token data that does not fit the
tokenizer, text that is not UTF-8, a resume whose settings do not fit its checkpoint. A resumed
fine-tune needs only its checkpoint, not the `.pth` it started from."""

from __future__ import annotations

import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rwkv_jax as rj
from rwkv_jax.cli import main
from rwkv_jax.train import data as data_lib
from rwkv_jax.train import train
from rwkv_jax.train.checkpoint import Checkpointer
from rwkv_jax.train.config import ConfigError, TrainConfig
from rwkv_jax.train.loop import build_run, load_checkpoint, params_shape

SMALL = ["preset=tiny", "n_layer=1", "ctx_len=32", "batch_size=4", "steps=4", "save_every=2", "log_every=2"]


def save_official_init(path, cfg: rj.RWKVConfig) -> None:
    """An official-format .pth of `cfg` with the official init (jitted: eager init takes seconds)."""
    params = jax.jit(rj.RWKV(cfg).init)(jax.random.PRNGKey(3), jnp.zeros((1, 1), jnp.int32))["params"]
    rj.save_pth(path, cfg, params)


def usage_error(capsys, *args: str) -> str:
    """stderr of `rwkv-jax ARGS`, which must exit with status 2 (argparse's usage error)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# ----------------------------------------------------------------------------- settings

def test_integer_fields_take_whole_numbers_only():
    assert TrainConfig.from_args(["steps=1e3"]).steps == 1000
    assert TrainConfig.from_args(["steps=1_000"]).steps == 1000
    for text in ("1.5e0", "2.7", "1e400", "nan", "2**18"):
        with pytest.raises(ConfigError, match="steps expects an integer"):
            TrainConfig.from_args([f"steps={text}"])


@pytest.mark.parametrize("setting", ["lr=0", "lr=-1e-3", "lr=nan", "lr=inf", "lr_final=-1e-5", "lr_final=inf",
                                     "warmup_steps=-1", "grad_clip=-1", "weight_decay=-0.1", "l2wrap=-1",
                                     "beta1=1", "beta2=1.5", "eps=0", "warmup_floor=2", "seed=-1",
                                     "mesh_fsdp=0", "mesh_data=-2", "doc_sep=-1", "sp_vocab_size=0"])
def test_out_of_range_settings_are_refused_naming_the_field(setting):
    name = setting.split("=")[0]
    with pytest.raises(ConfigError, match=f"TrainConfig: {name} must be"):
        TrainConfig.from_args(["preset=tiny", setting])


@pytest.mark.parametrize("setting,message", [
    ("version=9", "version must be one of"), ("head_size=48", "not a multiple of head_size=48"),
    ("dtype=float64x", "dtype must be one of"), ("wkv=fast", "wkv must be one of"),
    ("data=/no/such/corpus.txt", "does not exist"), ("tokenizer=/no/such.model", "no such sentencepiece model"),
    ("doc_sep=300", "doc_sep=300 is not a token id of the 256-token tokenizer"),
])
def test_bad_model_and_data_fields_are_usage_errors(tmp_path, capsys, setting, message):
    err = usage_error(capsys, "train", *SMALL, setting, f"out={tmp_path}")
    assert message in err and "Traceback" not in err


def test_a_validation_split_shorter_than_a_window_names_the_split(tmp_path):
    cfg = TrainConfig.from_args([*SMALL, "ctx_len=64000", "val_fraction=0.05", f"out={tmp_path}"])
    with pytest.raises(ConfigError, match=r"validation split \(the last val_fraction=0.05 of the data"):
        build_run(cfg)


def test_an_rwkv1_model_cannot_be_fine_tuned_past_its_ctx_len(tmp_path):
    v1 = rj.RWKVConfig(version=1, n_layer=1, n_embd=64, head_size=32, vocab_size=256, ctx_len=16)
    # Only the shapes matter here (time_w's length is the model's ctx_len).
    rj.save_pth(tmp_path / "v1.pth", v1, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), params_shape(rj.RWKV(v1))))
    cfg = TrainConfig.from_args([*SMALL, f"init_from={tmp_path / 'v1.pth'}", f"out={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="defined for ctx_len <= 16"):
        build_run(cfg)                                                     # ctx_len=32
    assert build_run(cfg.replace(ctx_len=16)).model_cfg.ctx_len == 16


# ----------------------------------------------------------------------------- data

def bad_token_arrays() -> dict[str, tuple]:
    """name -> (tokens, what the error must say) for a byte-tokenizer run (V = 256)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, 20_000)
    negative = ids.astype(np.int64)
    negative[123] = -3
    return {"ids_past_vocab.npy": (np.where(np.arange(20_000) == 19_999, 300, ids).astype(np.uint16),
                                   "ids must be in [0, 256)", "range from 0 to 300"),
            "negative_ids.npy": (negative, "ids must be in [0, 256)", "range from -3 to 255"),
            "float_ids.npy": (ids.astype(np.float32), "must be integers", "float32"),
            "two_d.npy": (ids.reshape(100, 200).astype(np.uint16), "must be a 1-D array", "(100, 200)")}


@pytest.mark.parametrize("name", ["ids_past_vocab.npy", "negative_ids.npy", "float_ids.npy", "two_d.npy"])
def test_token_data_that_does_not_fit_the_tokenizer_is_a_usage_error(tmp_path, capsys, name):
    tokens, *messages = bad_token_arrays()[name]
    np.save(tmp_path / name, tokens)
    err = usage_error(capsys, "train", *SMALL, "steps=1", f"data={tmp_path / name}", f"out={tmp_path / 'run'}")
    assert str(tmp_path / name) in err and all(message in err for message in messages)
    assert not (tmp_path / "run" / "ckpt").exists()


def test_token_ids_are_checked_chunk_by_chunk_over_the_whole_memmap(tmp_path, monkeypatch):
    monkeypatch.setattr(data_lib, "CHUNK", 64)                  # 32 uint16 ids per chunk
    tokens = np.full(1000, 7, np.uint16)
    np.save(tmp_path / "ok.npy", tokens)
    assert len(data_lib.TokenData.load(tmp_path / "ok.npy", 0.1, 256).train) == 900
    tokens[-1] = 256                                            # only in the last chunk
    np.save(tmp_path / "bad.npy", tokens)
    with pytest.raises(ConfigError, match="range from 7 to 256"):
        data_lib.TokenData.load(tmp_path / "bad.npy", 0.1, 256)


def test_text_that_is_not_utf8_names_the_file_and_byte_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(data_lib, "CHUNK", 16)                  # the bad byte several chunks in
    good = "line one\nzwei: ünï\n" * 5
    offset = len(good.encode("utf-8")) + 4
    (tmp_path / "t.txt").write_bytes(good.encode("utf-8") + b"abcd\xff efg\n")
    with pytest.raises(ConfigError, match=f"t.txt is not UTF-8 text: invalid byte 0xff at byte offset {offset}"):
        data_lib.tokenize_file(tmp_path / "t.txt", tmp_path / "t.npy", data_lib.ByteTokenizer())
    assert list(tmp_path.iterdir()) == [tmp_path / "t.txt"]     # no token file, finished or not
    (tmp_path / "t.txt").write_bytes(good.encode("utf-8") + "ü".encode()[:1])   # cut mid-character
    with pytest.raises(ConfigError, match=f"byte offset {offset - 4}"):
        data_lib.read_text(tmp_path / "t.txt")


# ----------------------------------------------------------------------------- resume

@pytest.fixture(scope="module")
def fine_tune(tmp_path_factory):
    """A fine-tune of an official-format .pth, stopped after 2 of 4 steps: (pth, run dir, args)."""
    base = tmp_path_factory.mktemp("fine-tune")
    cfg = rj.RWKVConfig(version=7, n_layer=1, n_embd=64, head_size=32, vocab_size=256)
    save_official_init(base / "model.pth", cfg)
    args = [*SMALL, f"init_from={base / 'model.pth'}", f"out={base / 'run'}"]
    train(TrainConfig.from_args([*args, "stop_after=2"]), log=lambda line: None)
    return base / "model.pth", base / "run", args


@pytest.mark.parametrize("change,message", [
    ("grad_clip=0", "grad_clip is 1.0 (on) in the checkpoint but 0.0 (off) now"),
    ("weight_decay=0", "weight_decay is 0.001 (on) in the checkpoint but 0.0 (off) now"),
    ("layerwise_lr=false", "layerwise_lr is True in the checkpoint but False now"),
    ("seed=1", "seed is 0 in the checkpoint but 1 now"),
    ("batch_size=8", "batch_size is 4 in the checkpoint but 8 now"),
    ("dtype=bfloat16", "model dtype is 'float32' in the checkpoint but 'bfloat16' now"),
])
def test_resuming_with_a_setting_that_does_not_fit_the_checkpoint_is_a_usage_error(fine_tune, capsys, change,
                                                                                    message):
    _, run_dir, args = fine_tune
    metrics = (run_dir / "metrics.jsonl").read_text()
    err = usage_error(capsys, "train", "--resume", *args, change)
    assert f"cannot resume {run_dir} (step 2): {message}" in err
    assert Checkpointer(run_dir, read_only=True).latest_step() == 2 and (run_dir / "metrics.jsonl").read_text() == metrics


def test_resuming_may_change_the_length_schedule_and_intervals(fine_tune):
    *_, args = fine_tune
    harmless = ["steps=8", "lr=1e-3", "lr_final=0", "schedule=exp", "warmup_steps=0", "grad_clip=0.5",
                "weight_decay=0.1", "beta2=0.999", "log_every=1", "eval_every=3", "save_every=1", "keep=5"]
    run = build_run(TrainConfig.from_args([*args, *harmless, "resume=true"]))
    assert run.cfg.steps == 8 and run.init_params is None                 # weights come from the checkpoint


def test_a_fine_tune_resumes_without_its_pth(fine_tune, tmp_path):
    pth, run_dir, _ = fine_tune
    shutil.copytree(run_dir, tmp_path / "run")                            # the run, moved without the .pth
    args = [*SMALL, f"init_from={tmp_path / pth.name}", f"out={tmp_path / 'run'}", "resume=true", "stop_after=3"]
    summary = train(TrainConfig.from_args(args), log=lambda line: None)
    assert summary["start_step"] == 2 and len(summary["losses"]) == 1 and math.isfinite(summary["losses"][0])
    state, meta = load_checkpoint(tmp_path / "run")
    assert meta["step"] == 3 and meta["model_config"]["n_layer"] == 1
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(state["params"]))


def test_eval_of_text_that_is_not_utf8_is_a_usage_error(fine_tune, capsys, tmp_path):
    _, run_dir, _ = fine_tune
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1") * 100)
    err = usage_error(capsys, "eval", "--checkpoint", str(run_dir), "--text", str(tmp_path / "latin1.txt"))
    assert "latin1.txt is not UTF-8 text: invalid byte 0xe9 at byte offset 3" in err
