r"""Stage 0: text context extension of Qwen2 (LongVA spec §8).

Run (a TPU pod: see launch/README.md; any host: drop the pod part)::

    python -m lct_jax.convert import-hf --hf-dir Qwen2-7B-Instruct --out ckpt/qwen2_7b_instruct
    python -m lct_jax.train --config=configs/text_extension.py:size=7b --workdir=runs/stage0 \
        --config.init_from=ckpt/qwen2_7b_instruct --config.data.paths=slimpajama/train-*.jsonl

What to expect at size=7b: RoPE θ = 1e9, rows of 224,000 tokens (documents separated by <|endoftext|>, positions
0..L-1 across the row, no cross-document mask, loss on every token), 4 rows = 896K tokens per optimizer step, 1000
steps (~0.9B tokens), constant LR 1e-5, AdamW (0.9, 0.95) wd 0.1, clip 1.0. The loss starts near the base model's
long-document perplexity and drifts down slowly; text NIAH should then pass to 224K+.

``size=tiny`` (random-init 2-layer model, byte tokenizer, 256-token rows) is what the demo and tests use: its loss
falls from ~6.2 (ln 512) within a few dozen steps on synthetic data. Every field below can be overridden with
``--config.<field>=<value>``; an unknown field is an error.
"""

from lct_jax.train.config_base import SKIP_FIELDS, base_config, group, parse_arg


def get_config(arg: str | None = None):
    size = parse_arg(arg)["size"]
    c = base_config("text_extension", size)
    c.model.rope_theta = 1e9  # LongVA's extended base (Qwen2 ships 1e6)
    c.data = dict(
        seq_len=224_000,
        batch_size=4,  # global rows per optimizer step (split over processes)
        source="jsonl",  # 'jsonl' | 'array_record' | 'tfds'
        paths="",  # comma-separated files (globs allowed) for jsonl / array_record
        tfds_name="",
        tfds_split="train",
        data_dir="",
        field="text",
        record_format="json",
        tokenizer="qwen",  # 'qwen' (bundled Qwen2 BPE) | 'byte' | a tokenizer.json path
        per_document=False,  # LongVA: no cross-document mask, continuous positions
        shuffle=True,
        num_workers=0,
        strict=False,
        **SKIP_FIELDS,
    )
    c.optim.b2 = 0.95
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0
    c.optim.groups = dict(lm=group(1e-5, "constant"))
    c.num_steps = 1000
    c.checkpoint.every = 50
    c.step.loss_chunk = 1_048_576 if size == "7b" else 4096  # tokens per row per chunk of the head
    if size == "7b":
        # the mesh `python -m lct_jax.fit --config=configs/text_extension.py:size=7b --topology=v5e:16x16
        # --config.data.batch_size=1 --search` recommends: rows up to 14,680,064 tokens (14.0M; 14.70 GiB per chip,
        # full compile; a full compile at 14,942,208 = 14.2M also fits, 14.99 GiB), vs 13.4M on (1, 256, 1), 13.4M
        # on (1, 64, 4), 8.3M on (1, 32, 8) (estimates; the search takes 5.6 min);
        # with --config.model.remat=offload (and --meshes=1x128x2) the search finds 35,192,832 tokens (33.6M, not
        # 33.8M; 14.63 GiB of HBM per chip from the compiler's buffer dump, 25.70 GiB of host memory per chip)
        c.mesh.model = 2
        # model = 2 leaves 2 kv heads per shard: one ring pass for both (two passes cost per-pass copies of q and
        # dO that outweigh the halved fp32 accumulators) and MLP chunks of 4096 tokens: the fit check's line goes
        # from 0.59 GiB + 276.7 KB to 1.04 GiB + 259.3 KB per token per chip (estimates); at 14.2M 14.99 GiB
        # instead of 15.43 (full compiles)
        c.model.ring_head_passes = 1
        c.model.mlp_chunk = 4096
    if size == "tiny":
        c.data.seq_len = 256
        c.data.batch_size = 8
        c.data.tokenizer = "byte"
        c.model.dtype = "float32"
        c.optim.groups.lm.lr = 3e-3
        c.num_steps = 60
        c.checkpoint.every = 20
        c.step.loss_chunk = 64
        c.log_every = 10
    elif size in ("0.5b", "1.5b"):
        c.data.seq_len = 32_768
    c.lock()
    return c
