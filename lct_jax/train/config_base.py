"""What the three stage configs share: the ``size=...`` argument, the config skeleton, and its validation.

A stage config (``configs/<stage>.py``) is ``get_config("size=7b")`` → a *locked* ``ml_collections.ConfigDict``:
``--config.x=y`` overrides work for existing fields and a typo (a field that does not exist) is an error.
"""

from __future__ import annotations

import ml_collections

SIZES = {"7b": "qwen2_7b", "1.5b": "qwen2_1_5b", "0.5b": "qwen2_0_5b", "tiny": "tiny"}
STAGES = ("text_extension", "align_pretrain", "align_finetune")


def parse_arg(arg: str | None) -> dict[str, str]:
    """``"size=7b,foo=bar"`` → ``{"size": "7b", "foo": "bar"}``; ``size`` defaults to 7b."""
    out = {"size": "7b"}
    for part in filter(None, (arg or "").split(",")):
        if "=" not in part:
            raise ValueError(f"config argument {part!r} must look like key=value, e.g. 'size=tiny'")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    unknown = set(out) - {"size"}
    if unknown:
        raise ValueError(
            f"unknown config argument(s) {sorted(unknown)}; the only one is size={'|'.join(SIZES)}"
        )
    if out["size"] not in SIZES:
        raise ValueError(f"size={out['size']!r}; expected one of {list(SIZES)}")
    return out


# data fields of every stage (lct_jax.data.options.PipelineOptions): stop when more than max_skip_fraction of the
# last skip_window records were skipped; skip records larger than max_record_bytes (bounds host memory)
SKIP_FIELDS = dict(max_skip_fraction=0.5, skip_window=1000, max_record_bytes=64 << 20)


def group(lr: float, schedule: str = "constant", warmup: float = 0.0, trainable: bool = True):
    return ml_collections.ConfigDict(dict(lr=lr, schedule=schedule, warmup=warmup, trainable=trainable))


def base_config(stage: str, size: str) -> ml_collections.ConfigDict:
    """Fields every stage has; the stage file fills in its values and locks the result."""
    if stage not in STAGES:
        raise ValueError(f"{stage=}; expected one of {STAGES}")
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.size = size
    c.seed = 0
    # where the weights come from: '' = random init; else a model checkpoint dir (python -m lct_jax.convert
    # import-hf ...), a training step dir, or a previous stage's workdir (its latest checkpoint)
    c.init_from = ""
    # one size may be -1 (= the rest). 7B: every chip on the ring ('seq'); the text stage splits the model axis
    # in two, the mesh `python -m lct_jax.fit --search` recommends for it on v5e-256 (see the stage files for the
    # ceilings they were checked at)
    c.mesh = ml_collections.ConfigDict(dict(data=1, seq=-1, model=1))
    c.model = ml_collections.ConfigDict(
        dict(
            preset=SIZES[size],  # lct_jax.model.qwen2.PRESETS key of the language model
            rope_theta=1e6,
            dtype="bfloat16",  # compute; params and optimizer state are always fp32
            remat="full",  # 'full' | 'offload' (saved layer inputs in host memory) | 'dots' | 'none'
            attention="auto",  # 'auto' = ring attention when the mesh's seq axis > 1
            ring_kernel="xla",
            ring_head_passes=1,  # kv-head groups the ring runs one after another (less fp32 memory, more hops)
            mlp_chunk=0,  # blockwise MLP: tokens per seq shard per chunk (0 = off)
            embed_chunk=0,  # embedding lookup: tokens per row per chunk (0 = the whole row at once)
        )
    )
    c.optim = ml_collections.ConfigDict(
        dict(
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            grad_clip=1.0,
            total_steps=0,  # set below: follows num_steps unless overridden
            groups=ml_collections.ConfigDict(dict(lm=group(1e-5))),
        )
    )
    # loss_chunk: tokens per row per chunk of the head; vocab_chunk: vocabulary columns per chunk (0 = all)
    c.step = ml_collections.ConfigDict(dict(micro_batches=1, loss_chunk=2048, vocab_chunk=0))
    if size == "7b":  # million-token rows on a TPU pod (memory per chip: python -m lct_jax.fit)
        c.model.ring_kernel = "pallas_tpu"
        c.model.ring_head_passes = 4  # one ring per kv head: fp32 accumulators for 7 of 28 heads at a time
        c.model.mlp_chunk = 2048
        c.model.embed_chunk = 262144
        c.step.vocab_chunk = 16384  # 11 chunks of the 152064-column head
    c.num_steps = 1000
    c.optim.total_steps = c.get_ref("num_steps")  # schedules span the run unless overridden
    c.checkpoint = ml_collections.ConfigDict(dict(every=100, keep=3, async_save=True))
    c.resume_step = 0  # 0 = resume from the newest checkpoint step that verifies; N = from step N
    c.log_every = 10
    c.max_nonfinite_in_row = 5
    c.progress = True
    return c


def multimodal_fields(
    c: ml_collections.ConfigDict, *, template: str, image_mode: str, max_len: int, max_tiles: int
):
    """Vision tower, its init and the LLaVA-style data fields shared by stages 1 and 2."""
    c.init_vision_from = ""  # a Hugging Face CLIP directory (openai/clip-vit-large-patch14-336) for the tower
    c.vision = ml_collections.ConfigDict(dict(preset="tiny" if c.size == "tiny" else "clip_vit_l14_336"))
    c.model.rope_theta = 1e9  # the text stage's extended base
    c.data = dict(
        annotations="",  # LLaVA .json list or .jsonl: {"image": ..., "conversations": [...]}
        image_root="",
        max_len=max_len,  # tokens per row, visual slots included
        max_tiles=max_tiles,  # tiles (or frames) per row
        template=template,  # 'plain' (stage 1) | 'qwen_1_5' (stage 2)
        image_mode=image_mode,  # 'crop' (one square tile) | 'unires'
        tokenizer="byte" if c.size == "tiny" else "qwen",
        num_frames=32,
        pack=False,
        batch_size=8 if c.size == "tiny" else 128,
        shuffle=True,
        num_workers=0,
        strict=False,
        **SKIP_FIELDS,
    )
