"""`cbir-evaluate` from a checkout: see cbir_jax/commands/evaluate.py (flags: --help)."""
from cbir_jax.commands.evaluate import run

if __name__ == "__main__":
  run()
