"""minilm_jax: MiniLM / MiniLMv2 self-attention distillation in JAX and Flax."""
