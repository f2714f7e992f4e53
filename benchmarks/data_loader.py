"""Data loader throughput: stage-0 packing (tokens/s, 0/1/2 workers) and stage-2 UniRes JPEG samples (samples/s).

    .venv/bin/python benchmarks/data_loader.py [--seconds 8] [--quick]

Each number is printed next to what one step of LongVA-7B at 1M tokens on a TPU v5e-256 would consume per host;
the assumptions behind that demand are computed and printed first. Synthetic data is written to a temp dir.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault(
    "JAX_PLATFORMS", "cpu"
)  # the loader needs no accelerator; with the CPU chosen libtpu stays quiet

import json
import tempfile
import time

import numpy as np
from PIL import Image

from lct_jax.data.loader import PipelineOptions, multimodal_dataset, text_dataset
from lct_jax.data.multimodal import MultimodalDataConfig
from lct_jax.data.text import TextDataConfig

# ----------------------------------------------------------------------------------- demand of one TPU step


def demand() -> dict[str, float]:
    """Per-host consumption of a 7B step at 1M tokens on v5e-256, from FLOPs, peak and an assumed MFU."""
    chips, chips_per_host, peak, mfu = (
        256,
        4,
        197e12,
        0.40,
    )  # v5e: 197 TFLOP/s bf16 per chip, 4 chips per host
    hosts = chips // chips_per_host
    params, layers, width, tokens = 7.6e9, 28, 3584, 1_000_000  # Qwen2-7B LM (spec §1)
    remat = 4 / 3  # layer-input checkpointing recomputes the forward once
    # stage 0: one 1M-token row, causal attention: fwd QK^T + PV = 2 * 2 * L^2 * width / 2 per layer, x3 for bwd
    dense = 6 * params * tokens
    attn = 3 * 2 * tokens**2 * width * layers
    t0 = (dense + attn) * remat / (chips * peak * mfu)
    # stage 0 with seq spanning all hosts: every host builds the same 1M-token row (data=1 mesh)
    host_tok_s = tokens / t0
    # stage 2: 1M tokens of 1024x768 samples, 1728 visual + ~200 text tokens each, rows of <= 32K (attention small)
    per_sample = 1728 + 200
    samples = tokens / per_sample
    clip = 6 * 0.30e9 * 577 * 12 * samples  # CLIP-L/14 (0.3B) on 12 tiles of 577 tokens, trained in stage 2
    attn2 = 3 * 2 * 32768 * tokens * width * layers / 2  # ~32K-row packs: per token ~L/2 keys
    t2 = (dense + clip + attn2) * remat / (chips * peak * mfu)
    host_samples_s = samples / t2 / hosts  # data parallel over hosts (32K rows fit in one host's 4 chips)
    print(
        "demand model: LongVA-7B, 1M tokens/step, TPU v5e-256 =", hosts, "hosts x", chips_per_host, "chips,"
    )
    print(
        f"  197 TFLOP/s bf16/chip, MFU {mfu:.0%}, remat x{remat:.2f}, LM {params:.1e} params, {layers} layers"
    )
    print(f"  stage 0: 6*N*T {dense:.2e} + causal attention {attn:.2e} FLOPs -> {t0:.1f} s/step;")
    print(
        f"           mesh data=1 (seq spans hosts): each host builds the whole row -> {host_tok_s:,.0f} tokens/s/host"
    )
    print(
        f"  stage 2: {samples:.0f} samples x {per_sample} tokens, +CLIP {clip:.2e} FLOPs -> {t2:.2f} s/step;"
    )
    print(f"           data parallel over {hosts} hosts -> {host_samples_s:.2f} samples/s/host")
    return {"tok_s": host_tok_s, "samples_s": host_samples_s}


# ------------------------------------------------------------------------------------------------- stage 0


def make_corpus(path: str, n_docs: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    words = ["the", "of", "attention", "ring", "token", "context", "model", "long", "video", "data", "pack"]
    total = 0
    with open(path, "w") as f:
        for n in np.clip(rng.lognormal(7.0, 1.0, n_docs), 20, 30000).astype(int):  # ~1.1K words median
            text = " ".join(words[i] for i in rng.integers(0, len(words), n)) + "."
            total += len(text)
            f.write(json.dumps({"text": text}) + "\n")
    return total


def time_pipeline(ds, seconds: float, count) -> tuple[float, int]:
    it = iter(ds)
    next(it)  # start-up (workers, first batch) not timed
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        try:
            n += count(next(it))
        except StopIteration:
            break
    rate = n / (time.perf_counter() - t)
    it.close()
    return rate, n


def make_token_records(path: str, n_docs: int, seed: int = 0) -> int:
    """Pre-tokenized documents (LongVA packed an already tokenized SlimPajama): int32 ids in ArrayRecord."""
    from array_record.python.array_record_module import ArrayRecordWriter

    rng = np.random.default_rng(seed)
    w = ArrayRecordWriter(path, "group_size:1")
    total = 0
    for n in np.clip(rng.lognormal(7.3, 1.0, n_docs), 20, 60000).astype(int):  # ~1.5K tokens median
        w.write(rng.integers(0, 151643, n, dtype=np.int32).astype("<i4").tobytes())
        total += n
    w.close()
    return total


def bench_stage0(tmp: str, seconds: float, need: float, workers_list) -> None:
    path = os.path.join(tmp, "docs.jsonl")
    chars = make_corpus(path, 3000)
    ar = os.path.join(tmp, "tokens.array_record")
    ntok = make_token_records(ar, 4000)
    print(
        f"\nstage 0: rows of 32768 tokens, batch 4; pre-tokenized ArrayRecord ({ntok / 1e6:.0f}M tokens) and"
    )
    print(f"         JSON-lines text ({chars / 1e6:.0f}M chars) tokenized on the fly")
    cases = [("tokens", "qwen", "array_record", (ar,)), ("json", "byte", "jsonl", (path,)),
             ("json", "qwen", "jsonl", (path,))]  # fmt: skip
    for fmt, tok, source, paths in cases:
        for w in workers_list:
            opts = PipelineOptions(batch_size=4, num_workers=w, seed=0, worker_buffer_size=4)
            cfg = TextDataConfig(seq_len=32768, source=source, paths=paths, record_format=fmt, tokenizer=tok,
                                 options=opts)  # fmt: skip
            rate, n = time_pipeline(text_dataset(cfg), seconds, lambda b: int(b["loss_mask"].sum()))
            label = "pretokenized" if fmt == "tokens" else tok
            print(f"  {label:12s} workers={w}: {rate / 1e6:6.2f}M tokens/s  ({n / 1e6:.1f}M tokens timed)"
                  f"   vs 7B@1M on v5e-256 needs {need / 1e3:.0f}K tokens/s/host  ({rate / need:,.0f}x)")  # fmt: skip


# ------------------------------------------------------------------------------------------------- stage 2


def bench_stage2(tmp: str, seconds: float, need: float, workers_list) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:768, 0:1024]
    recs = []
    for i in range(16):  # photo-like content: smooth color fields plus noise, JPEG quality 90
        base = np.stack([(xx * (i + 1) % 256), (yy * 2 + i * 9) % 256, ((xx + yy) // 4) % 256], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(tmp, f"img{i}.jpg"), quality=90)
        conv = [
            {"from": "human", "value": "<image>\nDescribe the picture in detail."},
            {"from": "gpt", "value": "A synthetic picture with smooth color gradients and noise. " * 3},
        ]
        recs.append({"image": f"img{i}.jpg", "conversations": conv})
    ann = os.path.join(tmp, "llava.json")
    with open(ann, "w") as f:
        json.dump(recs, f)
    print(
        "\nstage 2: 1024x768 JPEGs -> UniRes 1344x1008 canvas, 12 tiles of 336 (1728 visual tokens), L=2048"
    )
    for w in workers_list:
        opts = PipelineOptions(batch_size=1, num_workers=w, seed=0, worker_buffer_size=2)
        cfg = MultimodalDataConfig(annotations=ann, image_root=tmp, max_len=2048, max_tiles=12, tokenizer="qwen",
                                   options=opts)  # fmt: skip
        rate, n = time_pipeline(multimodal_dataset(cfg), seconds, lambda b: int(b["inputs"].shape[0]))
        per = rate / max(w, 1)
        print(f"  workers={w}: {rate:6.1f} samples/s total, {per:5.1f}/s per worker ({n} timed)"
              f"   vs 7B@1M on v5e-256 needs {need:.2f} samples/s/host  ({rate / need:,.0f}x)")  # fmt: skip


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--quick", action="store_true", help="0 workers only, 2 s per case")
    a = p.parse_args()
    seconds = 2.0 if a.quick else a.seconds
    workers = [0] if a.quick else [0, 1, 2]
    need = demand()
    print(f"machine: {os.cpu_count()} CPU cores")
    with tempfile.TemporaryDirectory() as tmp:
        bench_stage0(tmp, seconds, need["tok_s"], workers)
        bench_stage2(tmp, seconds, need["samples_s"], workers)


if __name__ == "__main__":
    main()
