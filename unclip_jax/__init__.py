"""unclip-jax: unCLIP (DALL-E 2) in JAX/Flax.

Importing the package changes nothing in JAX's or XLA's settings; the command-line entries choose
the CPU backend's speed options explicitly (`unclip_jax.cpu`, `--xla_cpu_convolutions`).
"""
