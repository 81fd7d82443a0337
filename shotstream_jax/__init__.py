"""shotstream_jax: ShotStream (causal, shot-by-shot text-to-video on Wan2.1) in JAX/Flax."""

__version__ = '0.1.0'
