r"""Stage 2: full fine-tune on instruction data (LongVA spec §8): LM + projector at 1e-5, vision tower at 2e-6.

Run::

    python -m lct_jax.train --config=configs/align_finetune.py:size=7b --workdir=runs/stage2 \
        --config.init_from=runs/stage1 \
        --config.data.annotations=llava_next_779k.json --config.data.image_root=llava_next_images
    python -m lct_jax.convert export-hf --format longva --ckpt runs/stage2/checkpoints/<step> --out LongVA-7B-ours

What to expect at size=7b: ``qwen_1_5`` chat template (assistant answers and the <|im_start|>/<|im_end|> markers
trained), UniRes up to 49 tiles per image, rows up to 32768 tokens; everything trains: LM and projector LR 1e-5,
vision tower LR 2e-6, cosine with 3% warmup, wd 0, clip 1.0, 1 epoch (779K rows / 128 per step ≈ 6090 steps; the
global batch size is our choice). No video data: long-video skill comes from the text stage. Checked with
``python -m lct_jax.fit --config=configs/align_finetune.py:size=7b --topology=v5e:16x16 --estimate`` (mesh
(1, 256, 1)): 6.09 GiB per chip in 4 micro-batches of 32 rows; one row of 49 tiles fits up to 15,728,640 tokens
(15.73 GiB, estimate); a 2000-frame video row (``--config.data.max_tiles=2000 --config.data.max_len=294912``,
288K visual tokens) 5.34 GiB, the vision tower's phase being its peak.

``size=tiny``: tiny CLIP + LM on the demo's synthetic question–answer images (UniRes up to 4 tiles); loss falls
within 60 steps. ``--config.x=y`` overrides; typos are errors.
"""

from lct_jax.train.config_base import base_config, group, multimodal_fields, parse_arg


def get_config(arg: str | None = None):
    size = parse_arg(arg)["size"]
    c = base_config("align_finetune", size)
    multimodal_fields(c, template="qwen_1_5", image_mode="unires", max_len=32768, max_tiles=49)
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0
    c.optim.groups = dict(
        vision=group(2e-6, "cosine", warmup=0.03),
        projector=group(1e-5, "cosine", warmup=0.03),
        lm=group(1e-5, "cosine", warmup=0.03),
    )
    c.num_steps = 6090
    c.checkpoint.every = 500
    if size == "7b":
        # 32 rows per micro-batch (1568 UniRes tiles through the tower at once): the fit check on v5e:16x16, mesh
        # (1, 256, 1), plans 6.09 GiB per chip (estimate) vs 15.47 GiB with all 128 rows in one micro-batch;
        # one row of 49 tiles + 32K tokens: 1.14 GiB; a 2000-frame video row (288K visual tokens): 5.34 GiB
        c.step.micro_batches = 4
    if size == "tiny":
        c.data.max_len = 128
        c.data.max_tiles = 4
        c.model.dtype = "float32"
        c.optim.groups.vision.lr = 4e-4
        c.optim.groups.projector.lr = 2e-3
        c.optim.groups.lm.lr = 2e-3
        c.num_steps = 60
        c.checkpoint.every = 20
        c.step.loss_chunk = 64
    c.lock()
    return c
