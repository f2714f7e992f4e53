"""Memory of the V-NIAH scoring forward (lct_jax.eval.scoring): flat in the sequence length, LongVA-7B at scale.

    python benchmarks/vniah_memory.py                      # both parts (TPU compiles take ~1 min each here)
    python benchmarks/vniah_memory.py --skip-tpu           # (a) only
    python benchmarks/vniah_memory.py --frames 3000 --topologies v5e:2x4 --meshes 8x1

(a) CPU, 8 fake devices, tiny LM with a 32K vocabulary: compiled temp memory per device of the scoring forward
    (only the answer positions meet the head) at several lengths, side by side with the baseline that V-NIAH
    scripts usually run: full [T, V] logits, then argmax everywhere.
(b) LongVA-7B (bf16 params, Pallas TPU ring kernel) compiled for real TPU topologies from this CPU host with libtpu
    (compile only, nothing runs): per-chip peak memory (the compiler's plan, ``peak_memory_in_bytes``) against the
    chip's HBM at 3000 frames (432K tokens) and 6000 frames (864K), on each mesh ``seq x model``, and the
    full-logits baseline on the first mesh.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from lct_jax.eval.scoring import ScoreForward, build_score_forward, padded_length  # noqa: E402
from lct_jax.model.longva import PRESETS as LONGVA  # noqa: E402
from lct_jax.model.qwen2 import PRESETS as QWEN2  # noqa: E402
from lct_jax.sharding import constrain, make_mesh  # noqa: E402

GIB, MIB = 2**30, 2**20
HBM = {"v4": 30.75, "v5e": 15.75, "v5p": 95.74, "v6e": 31.25}
PROMPT_TOKENS = 60  # system + user header + question + assistant header (+ answer) around the frames
ANSWER_TOKENS = 16


def full_logits_forward(fwd: ScoreForward):
    """The baseline: the same LM, then [T, V] fp32 logits and an argmax at every position."""

    def f(params, ids, positions, score_at, visual):
        lm = nnx.merge(fwd.graphdef, params)
        x = lm.embed_tokens(jnp.maximum(ids, 0))
        x = jnp.where((ids < 0)[:, :, None], visual.astype(x.dtype), x)
        logits = lm.logits(lm.encode(inputs_embeds=x, positions=positions))  # [1, T, V]
        return constrain(jnp.argmax(logits, -1), ("act_batch", "act_seq"))

    with jax.set_mesh(fwd.mesh):
        return jax.jit(f).trace(*fwd.abstract_inputs()).lower()


def cpu_part(lengths=(2048, 8192, 32768)):
    cfg = QWEN2["tiny"].replace(vocab_size=32768, dtype="float32")
    mesh = make_mesh(1, 8, 1)
    print(f"(a) scoring forward, tiny LM (D={cfg.hidden_size}, V={cfg.vocab_size}), 8 CPU devices on 'seq': "
          "compiled temp memory per device")  # fmt: skip
    for t in lengths:
        fwd = build_score_forward(cfg, mesh, t, ANSWER_TOKENS)
        ours = fwd.lower().compile().memory_analysis().temp_size_in_bytes
        base = full_logits_forward(fwd).compile().memory_analysis().temp_size_in_bytes
        print(f"    T={t:>6d} ({t // 8:>5d} per device): answer-only head {ours / MIB:7.1f} MiB | full [T, V] logits "
              f"{base / MIB:7.1f} MiB | ratio {base / ours:5.1f}x")  # fmt: skip


def tpu_mesh(topology: str, seq: int, model: int):
    from jax.experimental.topologies import get_topology_desc  # noqa: PLC0415 - needs libtpu, part (b) only

    topo = get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="default",
                             chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=(False, False, False))  # fmt: skip
    return make_mesh(1, seq, model, devices=topo.devices)


def compile_peak(lowered_fn) -> tuple[float | None, str]:
    t0 = time.perf_counter()
    try:
        compiled = lowered_fn().compile()
    except Exception as e:  # noqa: BLE001 - an over-budget program fails at compile time
        msg = " ".join(str(e).split())
        i = max(msg.find("RESOURCE_EXHAUSTED"), 0)
        return None, msg[i : i + 160]
    kernel = "tpu_custom_call" in compiled.as_text()
    peak = compiled.memory_analysis().peak_memory_in_bytes
    return peak / GIB, f"compile {time.perf_counter() - t0:.0f} s, Pallas kernel lowered: {kernel}"


def tpu_part(frames_list, topologies, meshes, baseline: bool):
    cfg = LONGVA["longva_7b"].text.replace(param_dtype="bfloat16", ring_kernel="pallas_tpu")
    print("(b) LongVA-7B V-NIAH scoring forward (bf16 params, Pallas ring kernel), per-chip peak memory")
    for frames in frames_list:
        for topology in topologies:
            chips = len(tpu_mesh(topology, -1, 1).devices.flat)
            hbm = HBM[topology.split(":")[0]]
            for i, (seq, model) in enumerate(meshes):
                if seq * model != chips:
                    continue
                mesh = tpu_mesh(topology, seq, model)
                t = padded_length((frames + 1) * 144 + PROMPT_TOKENS, seq, block=512)
                fwd = build_score_forward(cfg, mesh, t, ANSWER_TOKENS)
                peak, note = compile_peak(fwd.lower)
                head = f"    {frames} frames, T={t} ({t // seq} per chip), {topology} mesh seq={seq} model={model}:"
                if peak is None:
                    print(f"{head} does not fit: {note}")
                else:
                    print(
                        f"{head} peak {peak:6.2f} GiB of {hbm} GiB ({'fits' if peak <= hbm else 'OVER'}; {note})"
                    )
                if baseline and i == 0:
                    peak, note = compile_peak(lambda fwd=fwd: full_logits_forward(fwd))
                    shown = f"peak {peak:6.2f} GiB" if peak is not None else f"does not fit: {note}"
                    print(f"        baseline, full [T, V] logits on the same mesh: {shown}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--skip-tpu", action="store_true")
    ap.add_argument("--frames", default="3000,6000")
    ap.add_argument("--topologies", default="v5e:2x4,v5e:4x4")
    ap.add_argument("--meshes", default="8x1,4x2,16x1,8x2", help="seq x model sizes to try on each topology")
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()
    if not args.skip_cpu:
        cpu_part()
    if not args.skip_tpu:
        meshes = [tuple(int(x) for x in m.split("x")) for m in args.meshes.split(",")]
        tpu_part(
            [int(f) for f in args.frames.split(",")], args.topologies.split(","), meshes, not args.no_baseline
        )


if __name__ == "__main__":
    main()
