"""The scoring forward compiles for a real TPU topology (libtpu, compile only) with the Mosaic ring kernel, and its
per-chip memory does not grow like [T, V] (the 7B numbers: benchmarks/vniah_memory.py)."""

import pytest

from lct_jax.eval.scoring import build_score_forward, padded_length
from lct_jax.model.qwen2 import PRESETS
from lct_jax.sharding import make_mesh


@pytest.mark.tpu
def test_scoring_forward_compiles_for_v5e():
    from jax.experimental.topologies import get_topology_desc

    topo = get_topology_desc(platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
                             chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=(False, False, False))  # fmt: skip
    mesh = make_mesh(1, 4, 1, devices=topo.devices)
    cfg = PRESETS["tiny"].replace(
        vocab_size=65536, hidden_size=128, ring_kernel="pallas_tpu", param_dtype="bfloat16"
    )
    peaks = {}
    for tokens in (4096, 16384):
        t = padded_length(tokens, 4, block=512)
        compiled = build_score_forward(cfg, mesh, t, 8).lower().compile()
        assert "tpu_custom_call" in compiled.as_text()  # the Pallas ring kernel lowered to Mosaic
        peaks[t] = compiled.memory_analysis().peak_memory_in_bytes
    per_token = (peaks[16384] - peaks[4096]) / ((16384 - 4096) / 4)
    assert per_token < 65536 * 4 / 16, peaks  # far below one fp32 logits row (256 KB) per local token
