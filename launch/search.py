"""`cbir-search` from a checkout: see cbir_jax/commands/search.py (flags: --help)."""
from cbir_jax.commands.search import run

if __name__ == "__main__":
  run()
