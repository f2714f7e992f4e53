"""Ring-attention block kernels behind one ``kernel=`` switch.

Every kernel module exposes ``fwd_hop`` and ``bwd_hop`` with the layout contract of :mod:`lct_jax.kernels.blocks`:

- ``'xla'``: blockwise jnp (runs everywhere; the reference for the others),
- ``'pallas_tpu'``: Mosaic kernels (one q-block x kv-block grid step with the online-softmax carry in VMEM),
- ``'pallas_gpu'``: Pallas Triton kernels.

On CPU the Pallas kernels run with ``interpret=True``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

KERNELS = ("xla", "pallas_tpu", "pallas_gpu")
# (block_q, block_k) defaults. pallas_tpu: q blocks of 256 keep G=7 query heads' fp32 carry (double-buffered)
# inside the 16 MiB default scoped VMEM of v5e; 512 overflows it (compile error E1001) for LongVA-7B heads.
DEFAULT_BLOCKS = {"xla": (512, 512), "pallas_tpu": (256, 512), "pallas_gpu": (64, 64)}


def get_kernel(kernel: str) -> ModuleType:
    if kernel not in KERNELS:
        raise ValueError(f"unknown ring attention {kernel=}; expected one of {KERNELS}")
    return importlib.import_module(f"lct_jax.kernels.{kernel}")
