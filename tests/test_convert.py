"""Checkpoint conversion: official .pth <-> HF (transformers RWKV-4, RWKV-5/6 remote-code layout) <->
fla (RWKV-6/7) <-> our orbax directory, detection, the `rwkv-jax convert` command, error messages.

Round trips must be bit-exact (every parameter, every dtype). The HF RWKV-4 layout is checked
against transformers' own `RwkvForCausalLM` both ways (logits within 1e-4 relative, fp32), and
the official files written at the end of a conversion chain against the `rwkv` package."""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
import pytest

import rwkv_jax as rj
from helpers import forward_fn, rel_err
from official_reference import make_official_checkpoint, official_available, run_official_many
from rwkv_jax.io import convert, fla, hf
from rwkv_jax.io.official import CheckpointError

needs_official = pytest.mark.skipif(not official_available(), reason="torch and the rwkv package are not installed")
TOL = 1e-4
SIZES = dict(n_layer=2, n_embd=64, vocab_size=70, head_size=16)
# The layouts each version has besides official and orbax.
EXTERNAL = {4: ("hf",), 5: ("hf",), 6: ("hf", "fla"), 7: ("fla",)}


def assert_same_params(a, b):
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


def logits_of(cfg, params, tokens):
    logits, _ = forward_fn(cfg)(params, np.asarray([tokens], np.int32), rj.init_state(cfg, 1))
    return np.asarray(logits[0])


@needs_official
@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_official_through_every_layout_and_back_is_bit_exact_and_runs_in_the_package(tmp_path, version):
    import torch

    original = tmp_path / "original.pth"
    make_official_checkpoint(original, version, dtype="bf16", seed=version, with_layer0_v=False, **SIZES)
    cfg, params = convert.load_checkpoint(original)
    tokens = np.random.RandomState(version).randint(0, SIZES["vocab_size"], 13).tolist()
    reference_logits = logits_of(cfg, params, tokens)

    current = original
    for fmt in (*EXTERNAL[version], "orbax", "official"):
        target = tmp_path / (f"{fmt}.pth" if fmt == "official" else fmt)
        convert.save_checkpoint(target, cfg, params, format=fmt)
        assert convert.detect_format(target) == fmt
        cfg2, params2 = convert.load_checkpoint(target)
        assert cfg2 == cfg, (current, target)
        assert_same_params(params2, params)
        np.testing.assert_array_equal(logits_of(cfg2, params2, tokens), reference_logits)
        current = target

    saved = torch.load(current, weights_only=True)
    original_tensors = torch.load(original, weights_only=True)
    for key, value in original_tensors.items():
        assert torch.equal(saved[key], value), key
    added = set(saved) - set(original_tensors)  # v7: the unused layer-0 value LoRA, written as zeros
    assert added == ({"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"} if version == 7 else set())
    assert not any(saved[key].any() for key in added)
    (official_logits, _), = run_official_many(current, version, [(tokens, None)])
    (original_logits, _), = run_official_many(original, version, [(tokens, None)])
    np.testing.assert_array_equal(official_logits, original_logits)


@pytest.mark.parametrize("safetensors", [True, False])
def test_hf_files_and_single_weight_file_load(tmp_path, safetensors):
    cfg = rj.RWKVConfig(version=6, **SIZES)
    from helpers import random_params

    params = random_params(cfg, seed=1)
    convert.save_checkpoint(tmp_path / "hf", cfg, params, format="hf", safetensors=safetensors)
    weight_file = tmp_path / "hf" / ("model.safetensors" if safetensors else "pytorch_model.bin")
    assert weight_file.is_file()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["head_size"]) == ("rwkv6", 2, 16)
    cfg2, params2 = convert.load_checkpoint(weight_file)  # a lone weight file reads its config.json too
    assert cfg2 == cfg
    assert_same_params(params2, params)


def _transformers():
    pytest.importorskip("torch")
    return pytest.importorskip("transformers")


def test_hf_rwkv4_export_matches_transformers(tmp_path):
    transformers = _transformers()
    import torch

    path = tmp_path / "v4.pth"
    make_official_checkpoint(path, 4, seed=3, **{k: v for k, v in SIZES.items() if k != "head_size"})
    cfg, params = rj.load_pth(path)
    rj.io.hf.save_hf(tmp_path / "hf", cfg, params)
    model = transformers.RwkvForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, 17).tolist()
    with torch.no_grad():
        hf_logits = model(torch.tensor([tokens])).logits[0].numpy()
    assert rel_err(logits_of(cfg, params, tokens), hf_logits) <= TOL


def test_transformers_rwkv4_checkpoint_loads_with_the_same_logits(tmp_path):
    transformers = _transformers()
    import torch

    torch.manual_seed(0)
    config = transformers.RwkvConfig(vocab_size=60, hidden_size=64, num_hidden_layers=2, intermediate_size=192,
                                     attention_hidden_size=64, context_length=64)
    model = transformers.RwkvForCausalLM(config).eval()
    with torch.no_grad():  # transformers' init leaves some matrices zero: randomise everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(tmp_path / "hf_native")
    cfg, params = convert.load_checkpoint(tmp_path / "hf_native")
    assert (cfg.version, cfg.n_layer, cfg.dim_ffn) == (4, 2, 192)
    tokens = np.random.RandomState(1).randint(0, 60, 11).tolist()
    with torch.no_grad():
        hf_logits = model(torch.tensor([tokens])).logits[0].numpy()
    assert rel_err(logits_of(cfg, params, tokens), hf_logits) <= TOL


@pytest.mark.parametrize("version", [6, 7])
def test_fla_layout_fuses_and_splits_the_official_tensors(version):
    cfg = rj.RWKVConfig(version=version, **SIZES)
    from helpers import random_params

    params = random_params(cfg, seed=2)
    official = rj.io.official.params_to_official(cfg, params)
    tensors = fla.fla_tensors(cfg, params)
    if version == 6:
        D, C = cfg.d_mix, cfg.n_embd
        w1 = official["blocks.1.att.time_maa_w1"].reshape(C, 5, D)  # official blocks w,k,v,r,g
        fused = tensors["model.layers.1.attn.x_proj.0.linear.weight"]  # fla rows r,w,k,v,g
        np.testing.assert_array_equal(fused[:D], w1[:, 3].T)  # r first
        np.testing.assert_array_equal(fused[D:2 * D], w1[:, 0].T)  # then w
        np.testing.assert_array_equal(tensors["model.layers.0.attn.x_bias"][0],
                                      official["blocks.0.att.time_maa_r"].reshape(-1))
        np.testing.assert_array_equal(tensors["model.layers.0.attn.w_proj.linear.lora.2.bias"],
                                      official["blocks.0.att.time_decay"].reshape(-1))
    else:
        assert "model.layers.0.attn.v_lora.lora.0.weight" not in tensors
        np.testing.assert_array_equal(tensors["model.layers.1.attn.v_lora.lora.0.weight"],
                                      official["blocks.1.att.v1"].T)
        np.testing.assert_array_equal(tensors["model.layers.1.attn.w_lora.lora.2.bias"],
                                      official["blocks.1.att.w0"].reshape(-1))
        assert tensors["model.layers.0.ffn.x_k"].shape == (cfg.n_embd,)
    cfg2, params2 = fla.params_from_fla(tensors, fla.fla_config(cfg))
    assert cfg2 == cfg
    if version == 7:  # layer 0's v0/v1/v2 are not stored: they come back as zeros
        for name in ("v0", "v1", "v2"):
            params["blocks"]["att"][name] = params["blocks"]["att"][name].at[0].set(0)
    assert_same_params(params2, params)


def test_errors_name_the_offending_keys(tmp_path):
    from helpers import random_params

    cfg = rj.RWKVConfig(version=7, **SIZES)
    params = random_params(cfg)
    tensors = fla.fla_tensors(cfg, params)
    del tensors["model.layers.1.attn.a_lora.lora.0.weight"]
    tensors["model.layers.1.attn.extra"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError, match=r"missing keys \['model.layers.1.attn.a_lora.lora.0.weight'\].*"
                                              r"unexpected keys \['model.layers.1.attn.extra'\]"):
        fla.params_from_fla(tensors)

    cfg4 = rj.RWKVConfig(version=4, **{k: v for k, v in SIZES.items() if k != "head_size"})
    hf_tensors = hf.hf_tensors(cfg4, random_params(cfg4))
    hf_tensors["rwkv.blocks.1.attention.time_mix_key"] = np.zeros((1, 1, 7), np.float32)
    with pytest.raises(CheckpointError, match=r"rwkv.blocks.1.attention.time_mix_key: \(1, 1, 7\)"):
        hf.params_from_hf(hf_tensors)
    del hf_tensors["rwkv.blocks.1.attention.time_mix_key"]
    hf_tensors["rwkv.blocks.0.attention.lora_A"] = np.zeros(2, np.float32)
    with pytest.raises(CheckpointError, match=r"missing keys \['rwkv.blocks.1.attention.time_mix_key'\]; "
                                              r"unexpected keys \['rwkv.blocks.0.attention.lora_A'\]"):
        hf.params_from_hf(hf_tensors)
    with pytest.raises(CheckpointError, match="'lora.weight' is not part of the Hugging Face"):
        hf.official_name("lora.weight")

    good = hf.hf_tensors(cfg4, random_params(cfg4))
    with pytest.raises(CheckpointError, match=r"num_hidden_layers=3 \(weights say 2\)"):
        hf.params_from_hf(good, {"num_hidden_layers": 3, "model_type": "rwkv"})

    from safetensors.numpy import save_file

    save_file({"encoder.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match=r"no known RWKV layout.*encoder.weight"):
        convert.load_checkpoint(tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="no Hugging Face layout for RWKV-7"):
        convert.save_checkpoint(tmp_path / "x", cfg, params, format="hf")
    with pytest.raises(CheckpointError, match="no RWKV-4 layout"):
        convert.save_checkpoint(tmp_path / "y", cfg4, random_params(cfg4), format="fla")


def test_orbax_directory_keeps_dtypes_and_refuses_other_directories(tmp_path):
    from helpers import random_params

    cfg = rj.RWKVConfig(version=5, param_dtype="bfloat16", **SIZES)
    params = convert.cast_params(random_params(cfg.replace(param_dtype="float32"), seed=5), "bfloat16")
    rj.io.orbax_params.save_params(tmp_path / "ours", cfg, params)
    cfg2, params2 = rj.io.orbax_params.load_params(tmp_path / "ours", wkv="oracle")
    assert cfg2 == cfg.replace(wkv="oracle")
    assert_same_params(params2, params)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not an rwkv_jax parameter checkpoint"):
        rj.io.orbax_params.load_params(tmp_path / "empty")


def _cli(argv):
    parser = argparse.ArgumentParser()
    convert.add_convert_arguments(parser)
    return convert.run_convert(parser.parse_args(argv))


def test_convert_command(tmp_path, capsys):
    from helpers import random_params

    cfg = rj.RWKVConfig(version=6, **SIZES)
    params = random_params(cfg, seed=6)
    rj.save_pth(tmp_path / "in.pth", cfg, params)
    assert _cli([str(tmp_path / "in.pth"), str(tmp_path / "fla"), "--to", "fla", "--bin"]) == 0
    assert "(official) ->" in capsys.readouterr().out
    assert (tmp_path / "fla" / "pytorch_model.bin").is_file()
    assert _cli([str(tmp_path / "fla"), str(tmp_path / "back.pth"), "--dtype", "bfloat16"]) == 0
    cfg2, params2 = rj.load_pth(tmp_path / "back.pth")
    assert cfg2 == cfg.replace(param_dtype="bfloat16")
    assert_same_params(params2, convert.cast_params(params, "bfloat16"))

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    assert _cli([str(tmp_path / "bad"), str(tmp_path / "out.pth")]) == 1
    assert "model.safetensors" in capsys.readouterr().err


def test_sharded_hf_directory_loads(tmp_path):
    from safetensors.numpy import save_file

    from helpers import random_params

    cfg = rj.RWKVConfig(version=5, **SIZES)
    params = random_params(cfg, seed=8)
    tensors = hf.hf_tensors(cfg, params)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    (tmp_path / "sharded").mkdir()
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / "sharded" / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "sharded" / "config.json").write_text(json.dumps(hf.hf_config(cfg)))
    cfg2, params2 = convert.load_checkpoint(tmp_path / "sharded")
    assert cfg2 == cfg
    assert_same_params(params2, params)


def test_writing_over_a_directory_replaces_the_old_weights(tmp_path):
    from safetensors.numpy import save_file

    from helpers import random_params

    cfg = rj.RWKVConfig(version=6, **SIZES)
    old, new = random_params(cfg, seed=1), random_params(cfg, seed=2)
    out = tmp_path / "out"
    convert.save_checkpoint(out, cfg, old, format="fla")
    convert.save_checkpoint(out, cfg, new, format="fla", safetensors=False)  # the old model.safetensors would win
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "pytorch_model.bin"]
    assert_same_params(convert.load_checkpoint(out)[1], new)

    # A sharded model there before (an index wins over any single file): its index and shards go,
    # other files stay, even ones an index names.
    tensors = fla.fla_tensors(cfg, old)
    save_file(tensors, str(out / "model-00001-of-00001.safetensors"))
    weight_map = {name: "model-00001-of-00001.safetensors" for name in tensors}
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"x": "notes.txt"}}))
    (out / "notes.txt").write_text("mine")
    convert.save_checkpoint(out, cfg, new, format="fla")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    assert_same_params(convert.load_checkpoint(out)[1], new)


def test_broken_files_give_checkpoint_errors(tmp_path, capsys):
    from helpers import random_params

    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="bad.safetensors: corrupt or truncated safetensors file"):
        convert.load_checkpoint(tmp_path / "bad.safetensors")
    assert _cli([str(tmp_path / "bad.safetensors"), str(tmp_path / "out.pth")]) == 1  # a message, no traceback
    assert "corrupt or truncated safetensors file" in capsys.readouterr().err
    header = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [3], "data_offsets": [0, 3]}}).encode()
    (tmp_path / "fp8.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(3))
    with pytest.raises(CheckpointError, match="fp8.safetensors: unsupported tensor dtype"):
        convert.load_checkpoint(tmp_path / "fp8.safetensors")

    cfg = rj.RWKVConfig(version=4, **{k: v for k, v in SIZES.items() if k != "head_size"})
    convert.save_checkpoint(tmp_path / "hf", cfg, random_params(cfg), format="hf")
    index = tmp_path / "hf" / "model.safetensors.index.json"
    for content, message in [({"metadata": {}}, "has no 'weight_map' object"),
                             ({"weight_map": {"head.weight": "../model.safetensors"}}, "not files of its directory"),
                             ([1], "holds a JSON list, not an object")]:
        index.write_text(json.dumps(content))
        with pytest.raises(CheckpointError, match=message):
            convert.load_checkpoint(tmp_path / "hf")
    index.unlink()

    (tmp_path / "hf" / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config.json holds a JSON list, not an object"):
        convert.load_checkpoint(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        convert.load_checkpoint(tmp_path / "hf")


@pytest.mark.parametrize("version, key, message", [
    (6, "emb.weight", r"'emb.weight' has shape \(4480,\), expected 2 axes \(vocab_size, n_embd\)"),
    (6, "blocks.0.att.time_faaaa", r"'blocks.0.att.time_faaaa' has shape \(64,\), expected 2 axes \(n_head, head_size\)"),
    (7, "blocks.0.att.r_k", r"'blocks.0.att.r_k' has shape \(64,\), expected 2 axes \(n_head, head_size\)"),
    (7, "blocks.0.att.a1", r"'blocks.0.att.a1' has shape \(\d+,\), expected 2 axes \(n_embd, d_a\)"),
])
def test_config_inference_names_tensors_of_the_wrong_rank(version, key, message):
    from helpers import random_params

    cfg = rj.RWKVConfig(version=version, **SIZES)
    official = rj.io.official.params_to_official(cfg, random_params(cfg))
    official[key] = official[key].reshape(-1)
    with pytest.raises(CheckpointError, match=message):
        rj.io.official.infer_config(official)


def test_dtypes_are_reported_honestly(tmp_path):
    from helpers import random_params

    cfg = rj.RWKVConfig(version=6, **SIZES)
    official = rj.io.official.params_to_official(cfg, random_params(cfg))
    rj.io.pth.write_pth(tmp_path / "fp16.pth", {k: v.astype(np.float16) for k, v in official.items()})
    cfg16, params16 = convert.load_checkpoint(tmp_path / "fp16.pth")
    assert cfg16.param_dtype == "float16"
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params16)} == {np.dtype(np.float16)}

    # float64 is cast to float32 explicitly (not by whatever jax_enable_x64 says), as the config says.
    rj.io.pth.write_pth(tmp_path / "fp64.pth", {k: v.astype(np.float64) for k, v in official.items()})
    with jax.enable_x64(True):
        cfg64, params64 = convert.load_checkpoint(tmp_path / "fp64.pth")
    assert cfg64.param_dtype == "float32"
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params64)} == {np.dtype(np.float32)}

    for fmt in ("hf", "fla"):
        assert _cli([str(tmp_path / "fp64.pth"), str(tmp_path / fmt), "--to", fmt, "--dtype", "float16"]) == 0
        assert json.loads((tmp_path / fmt / "config.json").read_text())["torch_dtype"] == "float16"
        assert convert.load_checkpoint(tmp_path / fmt)[0].param_dtype == "float16"
