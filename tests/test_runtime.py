"""cbir_jax.runtime: the XLA:CPU flag the launchers add, and when they leave XLA_FLAGS alone."""
import importlib.metadata

from cbir_jax import runtime


def test_adds_flag_once_and_keeps_user_flags(monkeypatch):
  monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.2")
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert runtime.tune_xla_cpu(env)
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", runtime.YNN_OFF]
  assert not runtime.tune_xla_cpu(env)  # already there: unchanged
  assert env["XLA_FLAGS"].count("ynn_fusion_type") == 1


def test_respects_user_choice_opt_out_and_unmeasured_versions(monkeypatch):
  monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.2")
  user = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
  assert not runtime.tune_xla_cpu(user) and user["XLA_FLAGS"].endswith("=dot")
  opted_out = {runtime.OPT_OUT_ENV: "1"}
  assert not runtime.tune_xla_cpu(opted_out) and "XLA_FLAGS" not in opted_out
  monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.11.0")
  newer = {}
  assert not runtime.tune_xla_cpu(newer) and "XLA_FLAGS" not in newer


def test_this_test_process_runs_with_the_flag():
  # conftest applies it so in-process results match launcher subprocesses.
  import os
  measured = importlib.metadata.version("jaxlib").startswith(runtime._MEASURED_JAXLIB)
  assert (runtime.YNN_OFF in os.environ["XLA_FLAGS"]) == measured
