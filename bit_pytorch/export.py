"""Exports a BiT model for deployment, and checks the export when written:

  python -m bit_pytorch.export --model BiT-M-R50x1 --format timm
  python -m bit_pytorch.export --model runs/pets --format onnx --out pets.onnx

--model takes whatever the package holds: a registered name, a `.npz` file
(a fine-tuned run's model.npz, a distilled student), a run folder, a
bit_pytorch checkpoint (bit.pth.tar) or hf-hub:ORG/NAME.

--format timm writes a folder with `model.safetensors` (timm's ResNetV2 key
layout) and timm's `config.json`; for the six published architectures
`timm.create_model('local-dir:FOLDER', pretrained=True)` loads it, and the
folder can be uploaded to the Hugging Face Hub as is. Checked by loading it
in timm (strictly) and comparing logits with this package's model.

--format onnx writes an ONNX model taking float32 NCHW images in [-1, 1]
(input `images`; batch, height and width dynamic) and returning `logits`.
The weight standardisation is folded into the kernels (it is constant at
inference). Checked with onnxruntime at two batch sizes and image shapes.

timm standardises kernels with eps 1e-8 and BiT with 1e-10: timm's logits
differ from this package's by float32 rounding plus that
(docs/exports.md); the check allows --tolerance of the logits' scale.
"""
import contextlib
import copy
import io
import json
import os
import tempfile

import numpy as np
import torch
import torch.nn as nn

from big_transfer import export
from big_transfer import zoo
from big_transfer.errors import BadInput
from bit_pytorch import models

# BiT architectures timm has a name for (timm.create_model('resnetv2_50x1_bit')).
TIMM_ARCHS = ('R50x1', 'R50x3', 'R101x1', 'R101x3', 'R152x2', 'R152x4')

def argparser():
  return export.argparser(
      'PyTorch: timm safetensors or ONNX', ('timm', 'onnx'),
      'a .npz file, a run folder, a bit.pth.tar checkpoint',
      'Where to write: a folder for timm, a .onnx file for onnx (default: '
      'exports/NAME-timm or exports/NAME.onnx).')


def load_net(model, pretrained_dir='.'):
  """(eval-mode ResNetV2, {published key: array}) for anything --model
  takes."""
  if model.endswith(('.pth', '.tar')) and os.path.isfile(model):
    try:
      state = torch.load(model, map_location='cpu', weights_only=True)
      run = state['run']
      net = models.create(run['arch'], head_size=len(run['classes']))
      net.load_state_dict(state['model'])
    except (OSError, RuntimeError, KeyError, TypeError) as e:
      raise BadInput(f'{model} is not a readable bit_pytorch checkpoint '
                     f'({e}).') from e
    weights = zoo.check_finite(net.export(), model)
  else:
    weights = zoo.load_weights(model, pretrained_dir)
    net = models.create('weights', weights=weights)
  return net.eval(), weights


def check_inputs(resolution, batch, seed=0, width=None):
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, (batch, 3, resolution, width or resolution)
                     ).astype(np.float32)


def source_logits(net, x):
  with torch.no_grad():
    return net(torch.from_numpy(x)).numpy()


# --------------------------------------------------------------------------
# timm


def timm_name(arch):
  return f'resnetv2_{arch.name[1:]}_bit' if arch.name in TIMM_ARCHS else None


def timm_config(arch, head_size, resolution, label_names=None):
  """timm's config.json for a BiT ResNetV2 (inputs (x/255 - 0.5) / 0.5,
  i.e. BiT's [-1, 1])."""
  features = int(2048 * arch.width)
  cfg = {
      'architecture': timm_name(arch),
      'num_classes': head_size,
      'num_features': features,
      'pretrained_cfg': {
          'input_size': [3, resolution, resolution],
          'fixed_input_size': False,
          'interpolation': 'bilinear',
          'crop_pct': 1.0,
          'crop_mode': 'center',
          'mean': [0.5, 0.5, 0.5],
          'std': [0.5, 0.5, 0.5],
          'num_classes': head_size,
          'pool_size': [resolution // 32, resolution // 32],
          'first_conv': 'stem.conv',
          'classifier': 'head.fc',
      },
  }
  if label_names:
    cfg['label_names'] = list(label_names)
  return cfg


def timm_model(arch, head_size, folder):
  """timm's ResNetV2 for `arch`, loaded strictly from `folder`: through
  timm.create_model('local-dir:...') where timm has a name for `arch`, else
  through its constructor and timm.models.load_checkpoint."""
  import timm
  if timm_name(arch):
    return timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
  import functools
  from timm.layers import StdConv2d
  from timm.models.resnetv2 import ResNetV2
  net = ResNetV2(layers=list(arch.units), num_classes=head_size,
                 width_factor=arch.width, stem_type='fixed',
                 conv_layer=functools.partial(StdConv2d, eps=1e-8))
  timm.models.load_checkpoint(net, os.path.join(folder, 'model.safetensors'),
                              strict=True)
  return net.eval()


def export_timm(net, weights, out, resolution, tolerance, label_names=None):
  from safetensors.numpy import save_file
  arch, head = zoo.infer_arch(weights)
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(out)}.')
  try:
    save_file(zoo.to_timm_layout(weights),
              os.path.join(tmp, 'model.safetensors'),
              metadata={'format': 'pt'})
    if timm_name(arch):
      with open(os.path.join(tmp, 'config.json'), 'w') as f:
        json.dump(timm_config(arch, head, resolution, label_names), f,
                  indent=2)
    x = check_inputs(resolution, 3)
    reference = timm_model(arch, head, tmp)
    with torch.no_grad():
      got = reference(torch.from_numpy(x)).numpy()
    diff = export.compare('timm', got, source_logits(net, x), tolerance)
    if os.path.isdir(out):
      for name in ('model.safetensors', 'config.json'):
        if os.path.exists(os.path.join(out, name)):
          os.remove(os.path.join(out, name))
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(tmp):  # the checked files
      os.chmod(os.path.join(tmp, name), 0o644)
      os.replace(os.path.join(tmp, name), os.path.join(out, name))
  finally:
    for name in os.listdir(tmp):
      os.remove(os.path.join(tmp, name))
    os.rmdir(tmp)
  if timm_name(arch):
    how = f"timm.create_model('local-dir:{out}', pretrained=True)"
  else:
    how = (f'timm.models.resnetv2.ResNetV2(layers={list(arch.units)}, '
           f'width_factor={arch.width:g}, num_classes={head}, '
           "stem_type='fixed', conv_layer=partial(StdConv2d, eps=1e-8)) "
           'and timm.models.load_checkpoint (timm has no name for '
           f'{arch.name})')
  return diff, how


# --------------------------------------------------------------------------
# ONNX


def inference_copy(net):
  """A copy of `net` whose weight-standardised convolutions are plain
  convolutions holding the standardised kernels (same outputs, simpler
  graph)."""
  net = copy.deepcopy(net).eval()
  for parent in list(net.modules()):
    for name, child in list(parent.named_children()):
      if isinstance(child, models.StdConv2d):
        w = child.weight.detach()
        flat = w.reshape(w.shape[0], -1)
        mean = flat.mean(1, keepdim=True)
        var = flat.var(1, unbiased=False, keepdim=True)
        conv = nn.Conv2d(child.in_channels, child.out_channels,
                         child.kernel_size, child.stride, child.padding,
                         child.dilation, child.groups, bias=False)
        with torch.no_grad():
          conv.weight.copy_(((flat - mean) / torch.sqrt(var + models.WS_EPS))
                            .reshape_as(w))
        setattr(parent, name, conv)
  return net


def export_onnx(net, out, resolution, tolerance):
  import onnxruntime
  folder = os.path.dirname(os.path.abspath(out))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, suffix='.onnx.part')
  os.close(fd)
  try:
    plain = inference_copy(net)
    big = sum(p.numel() for p in plain.parameters()) * 4 > 1.8e9
    dims = {0: torch.export.Dim('batch', min=1, max=1 << 16),
            2: torch.export.Dim('height', min=32, max=1 << 14),
            3: torch.export.Dim('width', min=32, max=1 << 14)}
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
      torch.onnx.export(plain,
                        (torch.from_numpy(check_inputs(resolution, 2)),),
                        tmp, input_names=['images'], output_names=['logits'],
                        dynamic_shapes=(dims,), external_data=big,
                        dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(
        tmp, providers=['CPUExecutionProvider'])
    diff = 0.
    # Two batch sizes and image shapes: all three dimensions are dynamic.
    for n, width in ((1, resolution), (3, resolution * 3 // 4)):
      x = check_inputs(resolution, n, seed=n, width=width)
      got = session.run(['logits'], {'images': x})[0]
      diff = max(diff, export.compare(f'onnxruntime ({n}x3x{resolution}x{width})',
                               got, source_logits(net, x), tolerance))
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    if big:
      os.replace(tmp + '.data', out + '.data')
  finally:
    for path in (tmp, tmp + '.data'):
      if os.path.exists(path):
        os.remove(path)
  return diff


def main(args):
  if args.resolution < 32:
    raise BadInput('--resolution must be at least 32.')
  net, weights = load_net(args.model, args.bit_pretrained_dir)
  name = export.default_name(args.model)
  info = zoo.MODELS.get(args.model)
  labels = None
  if info is not None and info.labels:
    with open(info.labels) as f:
      labels = [l.strip() for l in f if l.strip()]
  if args.format == 'timm':
    out = export.out_path(args.out, name, '-timm', 'a timm export')
    diff, how = export_timm(net, weights, out, args.resolution,
                            args.tolerance, labels)
    print(f'wrote {out}/model.safetensors (checked with timm: max logit '
          f'difference {diff:.3g}); load it with {how}')
  else:
    out = export.out_path(args.out, name, '.onnx')
    diff = export_onnx(net, out, args.resolution, args.tolerance)
    print(f'wrote {out} (checked with onnxruntime at two batch sizes and '
          f'image shapes: max logit difference {diff:.3g}); input "images": '
          'float32 (batch, 3, height, width) in [-1, 1], any batch and size')
  return out


def cli(argv=None):
  return export.cli(main, argparser, argv)


if __name__ == '__main__':
  cli()
