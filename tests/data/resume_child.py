"""Child process for the resume test: `save` k batches then checkpoint, or `restore` and dump the next n batches.

python resume_child.py save|restore CONFIG_JSON CKPT_DIR K N OUT_NPZ
The iterator state goes into an Orbax CheckpointManager composite next to a (tiny) model state, as in training.
"""

import json
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from lct_jax.data.loader import PipelineOptions, checkpoint_args, text_dataset
from lct_jax.data.text import TextDataConfig


def main():
    mode, cfg_json, ckpt, k, n, out = sys.argv[1:]
    d = json.loads(cfg_json)
    cfg = TextDataConfig(**{**d, "paths": tuple(d["paths"]), "options": PipelineOptions(**d["options"])})
    it = iter(text_dataset(cfg))
    mngr = ocp.CheckpointManager(ckpt, item_names=("state", "data"))
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    if mode == "save":
        for _ in range(int(k)):
            next(it)
        mngr.save(
            int(k), args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=checkpoint_args(it))
        )
        mngr.wait_until_finished()
    else:
        step = mngr.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        got = mngr.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=checkpoint_args(it, True)),
        )
        np.testing.assert_array_equal(got["state"]["w"], state["w"])
        batches = [next(it) for _ in range(int(n))]
        counts = it.counts()
        np.savez(out, **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()},
                 counts=json.dumps(counts))  # fmt: skip
    it.close()


if __name__ == "__main__":
    main()
