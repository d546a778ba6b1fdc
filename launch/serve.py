"""`cbir-serve` from a checkout: see cbir_jax/commands/serve.py (flags: --help)."""
from cbir_jax.commands.serve import run

if __name__ == "__main__":
  run()
