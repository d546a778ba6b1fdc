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


# --- accelerator visibility ----------------------------------------------------------------

def _fake_smi(tmp_path, body):
  """An executable standing in for nvidia-smi: a shell script printing `body`."""
  path = tmp_path / "nvidia-smi"
  path.write_text(f"#!/bin/sh\n{body}\n")
  path.chmod(0o755)
  return str(path)


def test_gpu_seen_through_the_device_node(tmp_path):
  node = tmp_path / "nvidia0"
  node.write_bytes(b"")
  assert runtime.nvidia_gpu_evidence(device=str(node), smi="no-such-tool-cbir") == str(node)


def test_gpu_seen_through_nvidia_smi_only_when_it_lists_one(tmp_path):
  absent = str(tmp_path / "no-node")
  listing = "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1234)'"
  assert runtime.nvidia_gpu_evidence(device=absent, smi=_fake_smi(tmp_path, listing)) == (
      "nvidia-smi: GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1234)")
  # nvidia-smi without a driver or without GPUs prints other lines and may fail.
  for body in ("echo 'No devices were found'; exit 6", "exit 9", "echo"):
    assert runtime.nvidia_gpu_evidence(device=absent, smi=_fake_smi(tmp_path, body)) is None, body
  assert runtime.nvidia_gpu_evidence(device=absent, smi="no-such-tool-cbir") is None


def test_a_hanging_nvidia_smi_does_not_hang_the_probe(tmp_path):
  smi = _fake_smi(tmp_path, "sleep 30; echo 'GPU 0: late'")
  assert runtime.nvidia_gpu_evidence(device=str(tmp_path / "none"), smi=smi,
                                     timeout_s=0.5) is None


def test_warns_once_when_a_gpu_is_visible_but_jax_runs_on_the_cpu(tmp_path, monkeypatch):
  node = tmp_path / "nvidia0"
  node.write_bytes(b"")
  probe = dict(device=str(node), smi="no-such-tool-cbir")
  monkeypatch.setattr(runtime, "_version", lambda package: "")  # no CUDA plugin installed
  lines = []
  assert runtime.warn_if_gpu_unused(lines.append, backend="cpu", **probe)
  (line,) = lines
  assert str(node) in line and '".[cuda12]"' in line and '".[cuda13]"' in line
  # JAX already on the GPU, or no GPU at all: silence.
  assert not runtime.warn_if_gpu_unused(lines.append, backend="gpu", **probe)
  assert not runtime.warn_if_gpu_unused(lines.append, backend="cpu",
                                        device=str(tmp_path / "none"), smi="no-such-tool-cbir")
  assert len(lines) == 1


def test_warning_points_at_jax_when_its_cuda_plugin_is_installed(tmp_path, monkeypatch):
  node = tmp_path / "nvidia0"
  node.write_bytes(b"")
  monkeypatch.setattr(runtime, "_version",
                      lambda package: "0.11.2" if package == "jax-cuda13-plugin" else "")
  lines = []
  assert runtime.warn_if_gpu_unused(lines.append, backend="cpu", device=str(node),
                                    smi="no-such-tool-cbir")
  assert "jax-cuda13-plugin 0.11.2" in lines[0] and "pip install" not in lines[0]


def test_platform_info_describes_the_jax_runtime():
  import jax

  info = runtime.platform_info()
  assert info["backend"] == jax.default_backend() == "cpu"
  assert info["device_kind"] == jax.local_devices()[0].device_kind
  assert info["device_count"] == len(jax.devices()) == info["local_device_count"]
  assert (info["process_count"], info["process_index"]) == (1, 0)
  assert info["jax"] == jax.__version__
  assert info["jaxlib"] == importlib.metadata.version("jaxlib")
  back = runtime.PlatformInfo.from_dict(info)
  assert back.to_dict() == info and "cpu" in back.line()
