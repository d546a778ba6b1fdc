"""`cbir-index` from a checkout: see cbir_jax/commands/index.py (flags: --help)."""
from cbir_jax.commands.index import run

if __name__ == "__main__":
  run()
