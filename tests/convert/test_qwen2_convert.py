"""HF Qwen2 <-> lct_jax checkpoints: round trip, transformers reload, and bad input."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import Qwen2ForCausalLM

from lct_jax.convert.__main__ import main as convert_main
from lct_jax.convert.checkpoint import load_model, restore_params_numpy
from lct_jax.convert.mapping import ConversionError
from lct_jax.convert.qwen2 import hf_to_params
from lct_jax.convert.safetensors_io import SafetensorsDir


def hf_tensors(d):
    st = SafetensorsDir(d)
    return {k: st[k] for k in st.keys()}


@pytest.mark.parametrize("dtype,tied", [("float32", False), ("bfloat16", True)])
def test_import_export_round_trip_bit_exact(hf_qwen2, tmp_path, dtype, tied):
    src, _ = hf_qwen2(dtype=dtype, tie_word_embeddings=tied)
    (src / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    ckpt, out = tmp_path / "ckpt", tmp_path / "exported"
    assert convert_main(["import-hf", "--hf-dir", str(src), "--out", str(ckpt)]) == 0
    assert (
        convert_main(
            [
                "export-hf",
                "--ckpt",
                str(ckpt),
                "--out",
                str(out),
                "--dtype",
                dtype,
                "--max-shard-size-gb",
                str(20e3 / 2**30),
            ]
        )
        == 0
    )
    a, b = hf_tensors(src), hf_tensors(out)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs after round trip"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert (out / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
    # and the Orbax params hold fp32 values equal to the source
    params = restore_params_numpy(ckpt / "params")
    np.testing.assert_array_equal(params["embed"], a["model.embed_tokens.weight"].astype(np.float32))


def test_export_loads_in_transformers_with_same_logits(hf_qwen2, tmp_path):
    src, ref = hf_qwen2(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, rope_theta=1e9)
    ckpt, out = tmp_path / "ckpt", tmp_path / "exported"
    # through the real CLI, as a user runs it
    for args in (
        ["import-hf", "--hf-dir", str(src), "--out", str(ckpt)],
        ["export-hf", "--ckpt", str(ckpt), "--out", str(out), "--dtype", "float32"],
    ):
        subprocess.run([sys.executable, "-m", "lct_jax.convert", *args], check=True, capture_output=True)
    reloaded = Qwen2ForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
    assert reloaded.config.rope_parameters["rope_theta"] == 1e9
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(ids).logits.numpy(), ref(ids).logits.numpy())
    # the Python entry point on the checkpoint gives the same logits too (within fp32 tolerance)
    model = load_model(ckpt, dtype="float32")
    with torch.no_grad():
        want = ref(ids).logits.numpy()
    assert np.abs(np.asarray(model(ids.numpy())) - want).max() <= 1e-5


def _assert_fails_cleanly(argv, out, match, capsys):
    assert convert_main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_missing_file(hf_qwen2, tmp_path, capsys):
    src, _ = hf_qwen2()
    (src / "model.safetensors").unlink()
    out = tmp_path / "ckpt"
    _assert_fails_cleanly(
        ["import-hf", "--hf-dir", str(src), "--out", str(out)], out, "no model.safetensors", capsys
    )
    _assert_fails_cleanly(
        ["import-hf", "--hf-dir", str(tmp_path / "nope"), "--out", str(out)], out, "no config.json", capsys
    )
    _assert_fails_cleanly(
        ["export-hf", "--ckpt", str(tmp_path / "nope"), "--out", str(out)], out, "no lct_config.json", capsys
    )


def test_wrong_shape(hf_qwen2, tmp_path, capsys):
    src, _ = hf_qwen2()
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.1.self_attn.k_proj.weight"] = tensors["model.layers.1.self_attn.k_proj.weight"][:-1]
    save_file(tensors, str(src / "model.safetensors"))
    out = tmp_path / "ckpt"
    _assert_fails_cleanly(
        ["import-hf", "--hf-dir", str(src), "--out", str(out)],
        out,
        "'model.layers.1.self_attn.k_proj.weight' has shape (15, 32), expected (16, 32)",
        capsys,
    )


def test_missing_and_unexpected_tensors(hf_qwen2):
    src, _ = hf_qwen2()
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
    del tensors["model.norm.weight"]
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(
        ConversionError, match=r"missing \['model.norm.weight'\], unexpected \['model.layers.0.extra"
    ):
        hf_to_params(src)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("fancy_new_feature", True, "fields lct_jax does not understand: ['fancy_new_feature']"),
        ("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
        ("use_sliding_window", True, "use_sliding_window=True is not supported"),
        ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}, "rope_parameters="),
    ],
)
def test_config_fields_are_understood_or_rejected(hf_qwen2, tmp_path, capsys, field, value, match):
    src, _ = hf_qwen2()
    cfg = json.loads((src / "config.json").read_text())
    cfg[field] = value
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "ckpt"
    _assert_fails_cleanly(["import-hf", "--hf-dir", str(src), "--out", str(out)], out, match, capsys)


def test_existing_output_is_not_clobbered(hf_qwen2, tmp_path, capsys):
    src, _ = hf_qwen2()
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert_main(["import-hf", "--hf-dir", str(src), "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    shutil.rmtree(out)
