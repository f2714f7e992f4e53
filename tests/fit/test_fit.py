"""The fit check: its search logic on a synthetic memory model (CPU), and compiles of the real stage steps for a
small TPU topology (``tpu``: libtpu, compile only, tiny models)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

import lct_jax.fit as fit
from lct_jax.train.run import load_config

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30


def _config(stage="text_extension", size="tiny", **overrides):
    c = load_config(f"{ROOT / 'configs' / stage}.py:size={size}")
    return fit.with_overrides(c, **overrides)


def test_search_brackets_the_ceiling_of_a_linear_memory_model():
    """peak = 1 GiB + 300 KB per token per chip on 256 chips: the search must end one resolution step from the
    exact ceiling, with fits below and failures above, and few compiles."""
    config = _config(size="7b", fields={"model.ring_kernel": "pallas_tpu"})
    topo = fit.Topology("v5e:16x16", tuple(range(256)), int(15.75 * GIB))
    mesh = (1, 256, 1)
    a, b = 1 * GIB, 300e3
    exact = (topo.hbm_bytes - a) / b * 256
    calls = []

    def probe(n):
        calls.append(n)
        peak = int(a + b * n / 256)
        return fit.Probe(mesh, n, 1, peak <= topo.hbm_bytes, peak, 0, 0, True, 1.0)

    res = fit.search_mesh(config, topo, mesh, start=4 * int(exact), probe=probe)
    g = fit.length_granularity(config, 256)
    assert g == 256 * 512
    assert res.best.length <= exact < res.first_fail.length
    assert res.first_fail.length - res.best.length <= max(g, res.best.length // fit.RESOLUTION)
    assert all(n % g == 0 for n in calls) and len(calls) <= 6, calls
    a_fit, b_fit = fit.fit_line([p for p in res.probes if p.fits] + [probe(res.best.length // 2)])
    assert abs(a_fit - a) < 0.01 * GIB and abs(b_fit - b) < 0.01 * b


def test_layout_errors_name_what_divides():
    config = _config("align_finetune")
    with pytest.raises(
        ValueError,
        match=r"batch_size=3 rows do not divide into micro_batches=1 x the mesh's data=2; nearest: 2 or 4",
    ):
        fit.check_layout(fit.with_overrides(config, rows=3), (2, 2, 1), 3)
    assert fit.check_layout(_config(length=1000), (1, 256, 1), 1) == 1024  # the loader pads to 2 x seq
    topo = fit.Topology("v5e:16x16", tuple(range(256)), 0)
    with pytest.raises(ValueError, match=r"= 512 chips, but v5e:16x16 has 256"):
        fit.resolve_mesh(fit.with_overrides(config, mesh=(1, 128, 4)), topo)
    with pytest.raises(ValueError, match="unknown topology 'v5e-256'"):
        fit.get_topology("v5e-256")
    offload = _config(length=4096, rows=1, fields={"model.remat": "offload"})
    with pytest.raises(ValueError, match="estimates .* are not validated for remat='offload'"):
        fit.compile_probe(offload, topo, (1, 256, 1), estimate=True)


@pytest.fixture(scope="module")
def v5e_2x2():
    try:
        return fit.get_topology("v5e:2x2")
    except ValueError as e:
        pytest.skip(str(e))


@pytest.mark.tpu
def test_stage_steps_compile_for_tpu(v5e_2x2):
    """Stage 0 (Pallas ring over 4 chips) compiles, the embedding + loss phase alone is cheaper than the step;
    estimates of stage 0, the V-NIAH forward and stage 2 (vision tower trained, UniRes tiles)."""
    c0 = _config(length=4096, rows=1, fields={"model.ring_kernel": "pallas_tpu"})
    p = fit.compile_probe(c0, v5e_2x2, (1, 4, 1))
    assert p.fits and p.kernel and 0 < p.peak < v5e_2x2.hbm_bytes and p.tokens_per_chip == 1024
    q = fit.compile_probe(c0, v5e_2x2, (1, 4, 1), "embed_loss")
    assert q.fits and q.peak < p.peak
    # the ballast estimate: no back end; for GiB-scale programs (the 7B step) it agrees within 1%, here (21 MiB)
    # within what the compiler's message resolves (0.01 GiB steps) plus the back end's own small buffers
    e = fit.compile_probe(c0, v5e_2x2, (1, 4, 1), estimate=True)
    assert e.fits and e.estimated and not e.kernel and abs(e.peak - p.peak) <= 32 * 2**20, (e.peak, p.peak)
    v = fit.compile_probe(c0, v5e_2x2, (1, 4, 1), "vniah", estimate=True)  # the V-NIAH scoring forward
    assert v.fits and v.estimated and v.peak <= e.peak
    c2 = _config("align_finetune", rows=2)
    p2 = fit.compile_probe(c2, v5e_2x2, (2, 2, 1), estimate=True)
    assert p2.fits and p2.length == c2.data.max_len and math.prod(p2.mesh) == 4


@pytest.mark.tpu
def test_command_line(v5e_2x2):
    cmd = [sys.executable, "-m", "lct_jax.fit", f"--config={ROOT / 'configs' / 'text_extension.py'}:size=tiny",
           "--topology=v5e:2x2", "--config.model.ring_kernel=pallas_tpu", "--config.data.batch_size=1"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "fits" in text and "Pallas kernel lowered: yes" in text and "not the peak" in text, text
    assert "wall time" in text
    est = subprocess.run(
        cmd + ["--estimate", "--nophase"], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert est.returncode == 0 and "estimated peak" in est.stdout and "fits" in est.stdout, est.stdout
    bad = subprocess.run(cmd[:4] + ["--topology=v5e:2x2", "--mesh=1x3x1"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "error: mesh data=1 x seq=3"
    )


def test_confirm_steps_down_until_the_full_compile_fits():
    """Full compiles that need more than the estimate said: each step cuts twice the overshoot (at least 2%), in
    multiples of the granularity, until one fits; none fits within ``max_steps``: ``best`` is None."""
    config = _config(size="7b", fields={"model.ring_kernel": "pallas_tpu"})
    hbm = int(15.75 * GIB)
    topo = fit.Topology("v5e:16x16", tuple(range(256)), hbm)
    mesh, g = (1, 128, 2), 65536
    fits_below = 14_942_208  # what the 7B search met: 14.6-14.8M need 15.85 GiB, 14.2M fits

    def probe(n):
        need = int(14.99 * GIB) if n <= fits_below else int(15.85 * GIB)
        return fit.Probe(mesh, n, 1, n <= fits_below, need, 0, 0, True, 1.0)

    res = fit.MeshResult(mesh, g, best=probe(15_466_496))
    got = fit.confirm(config, topo, res, probe=probe)
    lengths = [p.length for p in res.probes]
    assert got.fits and got.length == res.best.length == lengths[-1] <= fits_below
    assert len(lengths) <= 3 and all(n % g == 0 for n in lengths)
    assert all(b <= a * 0.98 for a, b in zip(lengths, lengths[1:], strict=False)), lengths
    assert fit.step_down(10 * g, 0, hbm, g) == 9 * g  # 2% of a short row is under one granularity step
    res = fit.MeshResult(mesh, g, best=probe(15_466_496))
    assert not fit.confirm(config, topo, res, max_steps=1, probe=probe).fits and res.best is None
