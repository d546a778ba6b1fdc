"""`python -m cbir_jax COMMAND [--flags]`: the `cbir-*` commands without their scripts."""
from cbir_jax.commands import main

if __name__ == "__main__":
  main()
