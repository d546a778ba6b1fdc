"""`cbir-dedup` from a checkout: see cbir_jax/commands/dedup.py (flags: --help)."""
from cbir_jax.commands.dedup import run

if __name__ == "__main__":
  run()
