"""lct_jax: LongVA long-context transfer in JAX/Flax NNX."""

__version__ = "0.1.0"
