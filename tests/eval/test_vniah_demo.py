"""Independent oracle on the demo's own models (slow; reuses the session's demo run): the V-NIAH and text-NIAH
predictions in the demo's results equal transformers' argmax on the same input embeddings with the exported
PyTorch weights, and the 8-device ring evaluation equals the demo's 1-device dense one bit for bit."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from lct_jax.eval import text_niah as tn
from lct_jax.eval import vniah
from lct_jax.eval.loading import load_eval_model, resolve_tokenizer
from lct_jax.eval.store import EmbeddingStore
from lct_jax.sharding import make_mesh

QWEN2_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rope_theta", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings")  # fmt: skip


def hf_lm_of_longva_export(export: Path) -> Qwen2ForCausalLM:
    """transformers' Qwen2ForCausalLM holding the LM weights of a LongVA (llava_qwen) export, every key used."""
    cfg = json.loads((export / "config.json").read_text())
    hf_cfg = Qwen2Config(**{k: cfg[k] for k in QWEN2_FIELDS if k in cfg})
    hf_cfg._attn_implementation = "eager"
    model = Qwen2ForCausalLM(hf_cfg).eval()
    tensors = {}
    for f in sorted(export.glob("*.safetensors")):
        tensors.update(load_file(f))
    lm = {
        k: v for k, v in tensors.items() if not k.startswith(("model.vision_tower.", "model.mm_projector."))
    }
    model.load_state_dict(lm, strict=True)  # every LM key present and used
    return model.float()


def _torch_predictions(model, lay, embed_dim):
    ids = torch.from_numpy(np.maximum(lay.ids, 0).astype(np.int64))[None]
    with torch.no_grad():
        x = model.model.embed_tokens(ids)
        v0, v1 = lay.visual_slots
        if v1 > v0:
            x[0, v0:v1] = torch.from_numpy(lay.visual(v0, v1, embed_dim, np.float32))
        logits = model(inputs_embeds=x).logits[0]
    return logits[lay.scored_positions].argmax(-1).numpy()


@pytest.mark.slow
def test_vniah_equals_transformers_and_ring_equals_dense(demo_run, tmp_path):
    work, _ = demo_run
    results = json.loads((work / "eval" / "vniah" / "results.json").read_text())
    cfg = results["config"]
    one = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = load_eval_model(cfg["checkpoint"], one)
    tok = resolve_tokenizer(None, model.checkpoint)
    store = EmbeddingStore.open(cfg["haystack"])
    needles = [vniah.Needle(n["image"], n["question"], n["answer"]) for n in cfg["needles"]]
    tokens = vniah.encode_needles(model.model, needles, one)
    hf = hf_lm_of_longva_export(work / "export" / "longva_hf")
    frames = cfg["frames"]
    checked = 0
    for cell in results["cells"]:
        if cell["frames"] not in (frames[0], frames[-1]) or cell["depth"] not in (0.0, 0.6, 1.0):
            continue
        for n, t, s in zip(needles, tokens, cell["samples"], strict=True):
            lay = vniah.cell_layout(tok, n, t, store, cell["frames"], cell["depth"], cfg["system"])
            want = _torch_predictions(hf, lay, model.cfg.text.hidden_size)
            assert s["predicted"] == want.tolist(), (cell["frames"], cell["depth"], s)
            assert s["correct"] == bool(np.array_equal(want, lay.answer))
            checked += 1
    assert checked == 2 * 3 * len(needles)
    ring = vniah.run_vniah(cfg["checkpoint"], cfg["haystack"], needles, tmp_path / "ring", frames=frames,
                           depths=cfg["depths"], system=cfg["system"], mesh=make_mesh(1, 8, 1), progress=False)  # fmt: skip
    pred = lambda r: [(s["predicted"], s["correct"]) for c in r["cells"] for s in c["samples"]]  # noqa: E731
    assert pred(ring) == pred(results)
    assert all(s["padded_length"] % 16 == 0 for c in ring["cells"] for s in c["samples"])


@pytest.mark.slow
def test_text_niah_equals_transformers_on_the_stage0_export(demo_run):
    work, _ = demo_run
    results = json.loads((work / "eval" / "text_niah" / "results.json").read_text())
    cfg = results["config"]
    hf = Qwen2ForCausalLM.from_pretrained(work / "export" / "stage0_qwen2_hf").float().eval()
    tok = resolve_tokenizer(None, cfg["checkpoint"])
    hay = tn.filler_tokens(tok, max(cfg["lengths"]), None, cfg["seed"])
    numbers = tn.sample_numbers(cfg["samples"], cfg["seed"])
    others = tn.distractor_needles(cfg["distractors"], cfg["seed"])
    for cell in results["cells"]:
        if cell["length"] not in (cfg["lengths"][0], cfg["lengths"][-1]):
            continue
        layouts = tn.cell_layouts(tok, hay[: cell["length"]], cell["depth"], numbers, others, cfg["seed"])
        for s, lay in zip(cell["samples"], layouts, strict=True):
            want = _torch_predictions(hf, lay, hf.config.hidden_size)
            assert s["predicted"] == want.tolist() and s["correct"] == bool(np.array_equal(want, lay.answer))
