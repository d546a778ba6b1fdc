"""`cbir-port` from a checkout: see cbir_jax/commands/port.py (flags: --help)."""
from cbir_jax.commands.port import run

if __name__ == "__main__":
  run()
