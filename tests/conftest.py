"""Every test sees 8 fake CPU devices; this must run before jax is first imported."""

import os
import subprocess
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# libtpu (the [tpu] extra, for compile-only TPU checks) would otherwise try to grab a TPU at start-up.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
# compile-only TPU checks never touch a chip; let two processes (e.g. a test and a benchmark) load libtpu at once
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, f"expected 8 fake CPU devices, got {jax.devices()}"


def make_hf_qwen2(directory, *, seed=0, dtype="float32", **config):
    """Save a tiny random transformers Qwen2ForCausalLM to ``directory``; returns the torch model (eval, fp32).

    Weights are drawn with std 0.1 (norm scales around 1) so that logits are far from trivial.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    defaults = dict(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        rope_theta=1e6,
        tie_word_embeddings=False,
    )
    defaults.update(config)
    cfg = Qwen2Config(**defaults)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    model.to(getattr(torch, dtype)).save_pretrained(str(directory))
    return model.float()


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """``(workdir, stdout)`` of one ``python -m lct_jax.demo`` run (1 CPU device), shared by the slow tests that
    check its outputs (the demo takes ~2 minutes; it runs once per session)."""
    workdir = tmp_path_factory.mktemp("demo")
    out = subprocess.run(
        [sys.executable, "-m", "lct_jax.demo", "--workdir", str(workdir)],
        cwd=Path(__file__).resolve().parents[1],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "XLA_FLAGS": ""},
    )
    return workdir, out.stdout


@pytest.fixture
def hf_qwen2(tmp_path):
    """Factory: ``hf_qwen2(**config) -> (directory, torch_model)``."""
    counter = iter(range(1000))

    def make(**config):
        d = tmp_path / f"hf_qwen2_{next(counter)}"
        return d, make_hf_qwen2(d, **config)

    return make
