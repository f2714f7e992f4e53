r"""``python -m lct_jax.fit``: will this stage fit on that TPU slice, and on which mesh?

    python -m lct_jax.fit --config=configs/text_extension.py:size=7b --topology=v5e:16x16 \
        [--config.data.seq_len=16777216] [--mesh=1x256x1] [--search] [--estimate] [--program=vniah]

Compiles the stage's real train step (the one ``python -m lct_jax.train`` runs) for the topology on this host (the
TPU compiler from libtpu, ahead of time; nothing is allocated, no TPU needed) and prints the per-chip peak memory,
the chip's HBM, whether the Pallas kernel lowered, and how much of the peak the embedding + loss phase accounts for.
``--search`` finds the longest row that fits on each candidate mesh (one row per ``data`` shard per micro-batch)
from estimates (:func:`lct_jax.fit.compile_probe` with ``estimate``: seconds per compile instead of minutes),
recommends the mesh with the longest, confirms its ceiling with a full compile and fits ``peak = a + b * tokens
per chip`` on it. ``--program=vniah`` checks the V-NIAH scoring forward instead. A layout that cannot work (a mesh
that does not divide the chips, rows that do not divide the data axis) is one ``error: ...`` line, exit code 2.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

import lct_jax.fit as fit
from lct_jax.cli import report_errors
from lct_jax.errors import ConfigError
from lct_jax.train.run import parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "stage config file: configs/<stage>.py:size=...")
_TOPOLOGY = flags.DEFINE_string("topology", None, "Cloud TPU topology, e.g. v5e:16x16, v5p:4x8x8, v6e:2x2")
_MESH = flags.DEFINE_string("mesh", "", "DATAxSEQxMODEL, e.g. 1x256x1 (default: the config's mesh)")
_SEARCH = flags.DEFINE_bool("search", False, "find the longest row per candidate mesh and recommend one")
_MESHES = flags.DEFINE_string(
    "meshes", "", "candidates for --search, e.g. 1x256x1,1x128x2 (default: model 1,2,4,8)"
)
_PROGRAM = flags.DEFINE_string("program", "train", "what to compile: train | embed_loss | vniah")
_ESTIMATE = flags.DEFINE_bool(
    "estimate",
    False,
    "estimate the peak from a ballast compile (seconds; 1-6% off) instead of a full compile",
)
_PHASE = flags.DEFINE_bool("phase", True, "also compile the embedding + loss phase alone and compare")
_LINE = flags.DEFINE_bool(
    "line", True, "with --search: fit peak = a + b * tokens per chip on the recommended mesh"
)
flags.DEFINE_bool("debug", False, "show the traceback of every failure (also: LCT_DEBUG=1)")
flags.mark_flags_as_required(["config", "topology"])

GIB = 2**30


def _parse_mesh(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"mesh {text!r} must be DATAxSEQxMODEL with positive sizes, e.g. 1x256x1")
    return tuple(int(p) for p in parts)


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB" if abs(x) >= GIB / 10 else f"{x / 2**20:.1f} MiB"


def _tokens(n: int) -> str:
    m = n / 2**20
    return f"{n:,} ({m:.3g}M)" if n >= 2**20 else f"{n:,}"


def _describe(p, topo) -> str:
    if p.fits:
        kernel = "not compiled (estimate)" if p.estimated else ("yes" if p.kernel else "no")
        what = "estimated peak" if p.estimated else "peak"
        # with buffers in host memory the compiler's peak is device arguments + host buffers, not HBM
        if p.host:
            return (
                f"fits {_gib(topo.hbm_bytes)} HBM per chip (the compiler's HBM check passed; it reports no device "
                f"peak with host offload); host {_gib(p.host)} per chip; Pallas kernel lowered: {kernel}; compile "
                f"{p.seconds:.0f} s"
            )
        return (
            f"{what} {_gib(p.peak)} per chip of {_gib(topo.hbm_bytes)} HBM: fits "
            f"({p.peak / topo.hbm_bytes:.0%}); Pallas kernel lowered: {kernel}; compile {p.seconds:.0f} s"
        )
    need = f"needs ~{_gib(p.peak)}" if p.peak else "out of memory"
    return f"does not fit: {need} per chip of {_gib(topo.hbm_bytes)} HBM ({p.error[:160]}); {p.seconds:.0f} s"


def _phase_line(config, topo, p) -> str:
    """Embedding + loss phase alone (plus the saved layer inputs it sits on top of) against the whole step."""
    q = fit.compile_probe(
        fit.with_overrides(config, length=p.length, fields={"model.remat": "full"}),
        topo,
        p.mesh,
        "embed_loss",
        rows=p.rows,
        estimate=p.peak >= GIB,  # an estimate reads 0.01 GiB steps: small programs compile in full (fast)
    )  # the phase has no decoder stack (nothing to offload): an estimate holds
    if not q.fits:
        return f"    loss/embedding phase: the phase alone does not fit ({_gib(q.peak)})"
    saved = fit.saved_layer_input_bytes(config, p)
    phase = q.peak + saved
    verdict = "not the peak" if phase < p.peak else "THE PEAK"
    return (
        f"    loss/embedding phase: {_gib(q.peak)} alone{' (estimate)' * q.estimated} + {_gib(saved)} saved layer "
        f"inputs = "
        f"{_gib(phase)} vs step peak {_gib(p.peak)}: {verdict} (compile {q.seconds:.0f} s)"
    )


def _start_length(config, topo, mesh_sizes) -> int:
    """A first guess above the ceiling (a failed compile is fast and says how much memory it needed)."""
    _, model_cfg, _ = fit.build_model(config)
    lm = getattr(model_cfg, "text", model_cfg)
    per_token = lm.num_layers * lm.hidden_size * 2  # saved layer inputs, bf16
    if config.model.remat == "offload":
        per_token = 8 * lm.hidden_size * 2  # only a layer's working set stays on the chip
    _, seq, model = mesh_sizes
    return int(topo.hbm_bytes / per_token * seq * model)


def _search(config, topo):
    meshes = [_parse_mesh(m) for m in _MESHES.value.split(",")] if _MESHES.value else None
    meshes = meshes or fit.candidate_meshes(config, topo)
    how = "estimates (ballast compiles)" if fit.estimate_valid(config) else "full compiles (remat='offload')"
    print(
        f"search: longest row per mesh (data, seq, model), one row per data shard per micro-batch, "
        f"row lengths in multiples of seq x {fit.length_granularity(config, 2) // 2}; {how}, then a full "
        f"compile of the recommended mesh's ceiling"
    )
    results = []
    bar = tqdm(total=len(meshes) * 6, unit="compile", dynamic_ncols=True)
    for mesh_sizes in meshes:
        ms = "x".join(map(str, mesh_sizes))
        rows = mesh_sizes[0] * config.step.micro_batches
        try:
            g = fit.length_granularity(config, mesh_sizes[1])
            fit.check_layout(fit.with_overrides(config, length=g, rows=rows), mesh_sizes, rows)
        except ValueError as e:
            tqdm.write(f"  mesh {ms}: skipped: {e}")
            bar.update(6)
            continue

        def on_probe(p):
            bar.set_postfix_str(f"mesh {p.mesh_str()} {p.length / 2**20:.2f}M {'fits' if p.fits else 'OOM'}")
            bar.update(1)
            if bar.n >= bar.total:
                bar.total += 2

        try:
            res = fit.search_mesh(
                config, topo, mesh_sizes, start=_start_length(config, topo, mesh_sizes), on_probe=on_probe
            )
        except Exception as e:  # noqa: BLE001 - one mesh that cannot be built does not end the search
            tqdm.write(f"  mesh {ms}: cannot build: {' '.join(str(e).split())[:300]}")
            continue
        results.append(res)
        secs = sum(p.seconds for p in res.probes)
        if res.best:
            nofit = f", not {_tokens(res.first_fail.length)}" if res.first_fail else ""
            tqdm.write(
                f"  mesh {ms}: fits {_tokens(res.best.length)}{nofit}; {'estimated ' * res.best.estimated}peak "
                f"{_gib(res.best.peak)}; "
                f"{len(res.probes)} compiles, {secs:.0f} s ({res.stopped})"
            )
        else:
            tqdm.write(f"  mesh {ms}: nothing fits ({res.stopped}); {len(res.probes)} compiles, {secs:.0f} s")
    bar.close()
    fitting = [r for r in results if r.best]
    if not fitting:
        print("no candidate mesh fits; try a larger topology, remat='offload' or a shorter row")
        return 1
    if _PHASE.value:
        for r in fitting:
            print(f"  mesh {'x'.join(map(str, r.mesh))} at {_tokens(r.ceiling)}:")
            print(_phase_line(config, topo, r.best))
    best = max(fitting, key=lambda r: (r.ceiling, -r.best.peak))
    estimated = best.best
    if estimated.estimated:
        print(
            f"full compile of mesh {'x'.join(map(str, best.mesh))} at {_tokens(best.ceiling)} ...", flush=True
        )
        full = fit.confirm(config, topo, best)
    else:
        full = estimated
    print(f"  {_tokens(full.length)}: {_describe(full, topo)}")
    if not full.fits:
        print(
            "the full compile does not fit where the estimate did; rerun with a shorter --config row length"
        )
        return 1
    d, s, m = best.mesh
    print(
        f"recommended mesh: --config.mesh.data={d} --config.mesh.seq={s} --config.mesh.model={m} "
        f"(rows up to {_tokens(best.ceiling)} tokens; estimate {_gib(estimated.peak)}, full compile "
        f"{_gib(full.peak)}; with batch_size rows per step set --config.step.micro_batches=batch_size/{d} for "
        f"one row per micro-batch)"
    )
    if _LINE.value:
        g = best.granularity
        extra = sorted({max(g, best.ceiling // k // g * g) for k in (2, 4)} - {p.length for p in best.probes})
        probes = [p for p in best.probes if p.fits and p.estimated == fit.estimate_valid(config)]
        for length in tqdm(extra, desc="line", unit="compile"):
            probes.append(fit.compile_probe(fit.with_overrides(config, length=length), topo, best.mesh,
                                            rows=best.best.rows, estimate=fit.estimate_valid(config)))  # fmt: skip
        a, b = fit.fit_line(probes)
        pts = ", ".join(
            f"{p.tokens_per_chip:,.0f}: {_gib(p.peak)}" for p in sorted(probes, key=lambda p: p.length)
        )
        print(
            f"peak ~ {_gib(a)} + {b / 1e3:.1f} KB x tokens per chip on mesh {'x'.join(map(str, best.mesh))} "
            f"(least squares over {'estimates' if fit.estimate_valid(config) else 'full compiles'} at tokens per "
            f"chip {pts})"
        )
    return 0


def main(argv):
    del argv
    t0 = time.perf_counter()
    config = _CONFIG.value
    try:
        rc = _check(config)
    except ValueError as e:  # a layout, mesh or topology that cannot work
        raise ConfigError(str(e)) from e
    print(f"wall time {(time.perf_counter() - t0) / 60:.1f} min")
    return rc


def _check(config) -> int:
    topo = fit.get_topology(_TOPOLOGY.value)
    if _PROGRAM.value not in fit.PROGRAMS:
        raise ValueError(f"--program={_PROGRAM.value!r}; expected one of {sorted(fit.PROGRAMS)}")
    mesh_sizes = _parse_mesh(_MESH.value) if _MESH.value else fit.resolve_mesh(config, topo)
    if _MESH.value:
        fit.resolve_mesh(fit.with_overrides(config, mesh=mesh_sizes), topo)
    rows = config.data.batch_size
    if not _SEARCH.value:  # a search tries its own meshes and rows
        length = fit.check_layout(config, mesh_sizes, rows)
    lm = config.model
    print(
        f"lct_jax.fit: {config.stage} size={config.size} on {topo.name} ({topo.num_devices} chips, "
        f"{_gib(topo.hbm_bytes)} HBM each); program {_PROGRAM.value}; remat={lm.remat}, ring kernel "
        f"{lm.ring_kernel}, loss_chunk={config.step.loss_chunk}",
        flush=True,
    )
    if _SEARCH.value:
        if _PROGRAM.value != "train":
            raise ValueError("--search looks for the longest train step; drop --program or --search")
        return _search(config, topo)
    given = fit.get_length(config)
    pad = f" (the loader pads {given:,} to a multiple of 2 x seq)" if length != given else ""
    print(
        f"mesh (data, seq, model) = {mesh_sizes}; {rows} row(s) of {_tokens(length)} tokens{pad}, "
        f"{config.step.micro_batches} micro-batch(es), {rows * length / topo.num_devices:,.0f} tokens per chip",
        flush=True,
    )
    p = fit.compile_probe(config, topo, mesh_sizes, _PROGRAM.value, estimate=_ESTIMATE.value)
    print(_describe(p, topo))
    if p.fits and _PHASE.value and _PROGRAM.value == "train":
        print(_phase_line(config, topo, p))
    return 0 if p.fits else 1


if __name__ == "__main__":
    app.run(lambda argv: report_errors(lambda: main(argv), sys.argv), flags_parser=parse_flags)
