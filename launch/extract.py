"""`cbir-extract` from a checkout: see cbir_jax/commands/extract.py (flags: --help)."""
from cbir_jax.commands.extract import run

if __name__ == "__main__":
  run()
