"""`cbir-classify` from a checkout: see cbir_jax/commands/classify.py (flags: --help)."""
from cbir_jax.commands.classify import run

if __name__ == "__main__":
  run()
