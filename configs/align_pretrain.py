r"""Stage 1: projector pretraining on captions (LongVA spec §8), everything but the projector frozen.

Run::

    python -m lct_jax.train --config=configs/align_pretrain.py:size=7b --workdir=runs/stage1 \
        --config.init_from=runs/stage0 --config.init_vision_from=clip-vit-large-patch14-336 \
        --config.data.annotations=LCS-558K/blip_laion_cc_sbu_558k.json --config.data.image_root=LCS-558K/images

What to expect at size=7b: LM from the text stage (``init_from``: its workdir, latest step), CLIP ViT-L/14-336 from
Hugging Face, a random projector; "plain" template (``<image>`` + caption, only the caption trained), one square
crop per image, rows up to 8192 tokens; only the projector trains: LR 1e-3, cosine with 3% warmup, AdamW
(0.9, 0.999), wd 0, 1 epoch (558K captions / 128 per step ≈ 4360 steps; the global batch size is not in the
release, 128 is our choice). Caption loss falls fast (to ~2.5 on LCS-558K). Checked with ``python -m lct_jax.fit
--config=configs/align_pretrain.py:size=7b --topology=v5e:16x16 --estimate``: 2.15 GiB per chip of 15.75 on mesh
(1, 256, 1) for all 128 rows in one micro-batch.

``size=tiny``: tiny CLIP (56 px tiles, 4 tokens each) + tiny LM, byte tokenizer; the demo's synthetic captions
(whose language the text stage already taught the frozen LM) go from ~1.40 to ~1.24 in 120
steps as the projector learns to pass colour and shape. ``--config.x=y`` overrides; typos are errors.
"""

from lct_jax.train.config_base import base_config, group, multimodal_fields, parse_arg


def get_config(arg: str | None = None):
    size = parse_arg(arg)["size"]
    c = base_config("align_pretrain", size)
    multimodal_fields(c, template="plain", image_mode="crop", max_len=8192, max_tiles=1)
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0
    c.optim.groups = dict(
        vision=group(0.0, trainable=False),
        projector=group(1e-3, "cosine", warmup=0.03),
        lm=group(0.0, trainable=False),
    )
    c.num_steps = 4360
    c.checkpoint.every = 500
    if size == "tiny":
        c.data.max_len = 64
        c.model.dtype = "float32"
        c.optim.groups.projector.lr = 1e-2
        c.num_steps = 120  # ~11 ms per step on 2 CPU cores
        c.checkpoint.every = 40
        c.step.loss_chunk = 64
    c.lock()
    return c
