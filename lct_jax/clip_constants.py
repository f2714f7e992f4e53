"""CLIP's pixel normalization (RGB mean and std of the OpenAI CLIP training images), one leaf module.

The loaders (:mod:`lct_jax.data.unires`), the model (:func:`lct_jax.model.longva.normalize_pixels`) and the
evaluation's letterbox colour (:mod:`lct_jax.eval.encode`) all need these numbers; keeping them here, with no
lct_jax imports, lets data and model share them without either importing the other.
"""

import numpy as np

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)
CLIP_MEAN.setflags(write=False)  # shared by every importer: nobody may change them in place
CLIP_STD.setflags(write=False)
