"""optax_ext: composable, fused Optax transformations for JAX and Flax."""
