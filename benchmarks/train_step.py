"""Train-step benchmark: prints measured numbers next to a baseline run in the same process.

    .venv/bin/python benchmarks/train_step.py            # (a) CPU tokens/s vs PyTorch, (b) v5e-256 memory
    .venv/bin/python benchmarks/train_step.py --skip-0.5b --skip-tpu   # quick

(a) tokens/s of one fwd+bwd+AdamW update on CPU, tiny and Qwen2-0.5B presets, fp32, no rematerialization, one
    device: lct_jax's jitted step (chunked loss, donated state) vs transformers' PyTorch ``Qwen2ForCausalLM``
    (random weights of the same config, ``labels=`` loss, ``torch.optim.AdamW``) on the same batch shape.
    Ratio > 1 means lct_jax is faster.
(b) per-chip peak memory (the compiler's plan, ``peak_memory_in_bytes``) of the Qwen2-7B text-extension train step
    (RoPE 1e9, fp32 params + AdamW state, bf16 compute, full remat per layer, zigzag ring attention with the
    Pallas TPU kernel, chunked loss) compiled for ``v5e:16x16`` (256 chips, 15.75 GiB HBM each) on
    ('data','seq','model') = (1, 256, 1) and (1, 64, 4) meshes, one row of 256K and of 1M tokens. With model=1 the
    152K-vocab head and its fp32 gradient are not vocab-sharded, a fixed ~4.4 GiB per chip; model=4 shards them.
    Measured here: (1,256,1) 4.71 / 4.74 GiB, (1,64,4) 2.23 / 5.06 GiB at 256K / 1M. Needs the ``tpu`` extra.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from lct_jax.data.loader import global_batch  # noqa: E402
from lct_jax.model.qwen2 import PRESETS, Qwen2  # noqa: E402
from lct_jax.sharding import make_mesh  # noqa: E402
from lct_jax.train.run import load_config  # noqa: E402
from lct_jax.train.state import init_state, make_state_spec  # noqa: E402
from lct_jax.train.step import StepConfig, jit_train_step  # noqa: E402

GIB = 2**30


def optim():
    return ml_collections.ConfigDict(
        dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0, total_steps=1000,
             groups=dict(lm=dict(lr=1e-5, schedule="constant", warmup=0.0)))
    )  # fmt: skip


def batch(vocab, b, l, seed=0):
    toks = np.random.default_rng(seed).integers(0, vocab, (b, l + 1)).astype(np.int32)
    return dict(inputs=toks[:, :-1], targets=toks[:, 1:], loss_mask=np.ones((b, l), np.float32),
                positions=np.tile(np.arange(l, dtype=np.int32), (b, 1)), segment_ids=np.ones((b, l), np.int32))  # fmt: skip


def jax_tokens_per_s(cfg, b, l, steps):
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    mk = lambda r: Qwen2(cfg, rngs=r)  # noqa: E731
    spec = make_state_spec(mk, optim(), mesh)
    state = init_state(spec, mk, optim())
    bt = batch(cfg.vocab_size, b, l)
    step = jit_train_step(spec, optim(), StepConfig(loss_chunk=l), bt)
    with jax.set_mesh(mesh):
        gb = global_batch(bt, mesh)
        for _ in range(2):  # compile + warm-up
            state, m = step(state, gb)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, gb)
        jax.block_until_ready(state)
    dt = (time.perf_counter() - t0) / steps
    return b * l / dt, float(m["loss"])


def torch_tokens_per_s(cfg, b, l, steps):
    import torch  # noqa: PLC0415
    from transformers import Qwen2Config as HFConfig  # noqa: PLC0415
    from transformers import Qwen2ForCausalLM  # noqa: PLC0415

    torch.manual_seed(0)
    hf = HFConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                  intermediate_size=cfg.intermediate_size, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
                  tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=max(l, 32768),
                  attn_implementation="sdpa")  # fmt: skip
    model = Qwen2ForCausalLM(hf).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
    bt = batch(cfg.vocab_size, b, l)
    ids = torch.from_numpy(np.concatenate([bt["inputs"], bt["targets"][:, -1:]], 1).astype(np.int64))

    def step():
        out = model(
            input_ids=ids[:, :-1], labels=ids[:, :-1]
        )  # HF shifts labels inside: l - 1 trained tokens
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    dt = (time.perf_counter() - t0) / steps
    return b * l / dt, loss


def bench_cpu(presets):
    import torch  # noqa: PLC0415

    torch.set_num_threads(os.cpu_count() or 1)
    print(f"(a) fwd+bwd+AdamW tokens/s on CPU ({os.cpu_count()} cores), fp32, no remat, 1 device")
    for name, b, l, steps in presets:
        cfg = PRESETS[name].replace(dtype="float32", remat="none", attention="dense")
        jt, jl = jax_tokens_per_s(cfg, b, l, steps)
        tt, tl = torch_tokens_per_s(cfg, b, l, steps)
        print(
            f"    {name:<11s} B={b} L={l:<5d} lct_jax {jt:9.0f} tok/s | PyTorch transformers {tt:9.0f} tok/s | "
            f"ratio {jt / tt:5.2f}x   (losses {jl:.3f} / {tl:.3f})"
        )


def bench_tpu_memory(lengths=(256 * 1024, 1024 * 1024), model=1):
    """The 7B stage-0 config as shipped (its mesh unless ``model`` is given), one row, through the fit check."""
    import lct_jax.fit as fit  # noqa: PLC0415 - libtpu only when this part runs

    config = load_config(f"{Path(__file__).resolve().parents[1] / 'configs' / 'text_extension.py'}:size=7b")
    topo = fit.get_topology("v5e:16x16")
    mesh = (1, topo.num_devices // model, model)
    print(
        f"(b) Qwen2-7B text-extension step (configs/text_extension.py:size=7b, one row), per-chip peak memory, "
        f"v5e:16x16 mesh (data, seq, model) = {mesh}, HBM {topo.hbm_bytes / GIB:.2f} GiB/chip"
    )
    for length in lengths:
        p = fit.compile_probe(fit.with_overrides(config, length=length), topo, mesh, rows=1)
        where = f"({p.tokens_per_chip:,.0f} tokens per chip)"
        if p.fits:
            print(f"    {length // 1024:>6d}K tokens {where}: peak {p.peak / GIB:6.2f} GiB per chip (Pallas kernel "
                  f"lowered: {p.kernel}; compile {p.seconds:.0f} s)")  # fmt: skip
        else:
            print(f"    {length // 1024:>6d}K tokens {where}: does not fit: {p.error[:200]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-0.5b", action="store_true", dest="skip_05b")
    ap.add_argument("--skip-tpu", action="store_true")
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument(
        "--tpu-model", default="1,4", help="sizes of the mesh's 'model' (tensor-parallel) axis to try"
    )
    args = ap.parse_args()
    if not args.skip_cpu:
        presets = [("tiny", 8, 256, 10)] + ([] if args.skip_05b else [("qwen2_0_5b", 1, 256, 3)])
        bench_cpu(presets)
    if not args.skip_tpu:
        for model in (int(x) for x in args.tpu_model.split(",")):
            bench_tpu_memory(model=model)


if __name__ == "__main__":
    main()
