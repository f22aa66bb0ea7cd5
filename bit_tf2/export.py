"""Exports a BiT model for serving, and checks the export when written:

  python -m bit_tf2.export --model BiT-M-R50x1 --format saved_model
  python -m bit_tf2.export --model runs/pets --format tflite --out pets.tflite

--model takes whatever the package holds: a registered name, a `.npz` or
published `.h5` file (a fine-tuned run's model.npz, a distilled student), a
run folder or hf-hub:ORG/NAME.

Both formats take float32 NHWC images in [-1, 1], of any batch size and
image size, and return float32 logits:
- saved_model: a SavedModel folder with the endpoint `serve(images)`;
  checked by loading it back with tf.saved_model.load.
- tflite: a TensorFlow Lite flatbuffer (resize its input, then
  allocate_tensors, for each batch shape); checked with the TFLite
  interpreter at two batch sizes.
"""
import argparse
import logging
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np
import tensorflow as tf

import bit_common
import bit_zoo
from bit_common import BadInput
from bit_tf2 import models

logger = logging.getLogger('bit.export')


def argparser():
  parser = argparse.ArgumentParser(
      description='Export a BiT model (SavedModel or TFLite), checked '
      'against the source when written.',
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument('--model', required=True,
                      help='A registered model, a .npz or .h5 file, a run '
                      'folder or hf-hub:ORG/NAME.')
  parser.add_argument('--format', required=True,
                      choices=('saved_model', 'tflite'))
  parser.add_argument('--out', default=None,
                      help='Where to write: a folder for saved_model, a '
                      '.tflite file for tflite (default: '
                      'exports/NAME-saved_model or exports/NAME.tflite).')
  parser.add_argument('--bit_pretrained_dir', default='.',
                      help='Where registered weights are looked for (and '
                      'downloaded to when missing).')
  parser.add_argument('--resolution', type=int, default=224,
                      help='Image size of the check.')
  parser.add_argument('--tolerance', type=float, default=1e-4,
                      help='Largest logit difference allowed by the check, '
                      'relative to the largest logit (at least 1).')
  return parser


def read_weights(model, pretrained_dir='.'):
  if model.endswith('.h5') or (model in bit_zoo.MODELS):
    return models.load_weights(models.weights_file(model, pretrained_dir))
  return bit_zoo.load_weights(model, pretrained_dir)


def default_name(model):
  if model.startswith(bit_zoo.HF_HUB_PREFIX):
    return model.split('/')[-1].split('@')[0]
  path = os.path.normpath(model)
  base = os.path.basename(path)
  if base == 'model.npz':
    base = os.path.basename(os.path.dirname(os.path.abspath(path)))
  for ext in ('.npz', '.h5', '.safetensors', '.bin'):
    if base.endswith(ext):
      return base[:-len(ext)]
  return base  # a registered name (dots allowed: BiT-R14x0.5-...)


def check_inputs(resolution, batch, seed=0):
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, (batch, resolution, resolution, 3)).astype(
      np.float32)


def compare(name, got, want, tolerance):
  """Max |got - want|; raises unless within tolerance of the logits' scale."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  if got.shape != want.shape:
    raise RuntimeError(f'{name}: logits of shape {got.shape}, the source '
                       f'gives {want.shape}.')
  diff = float(np.abs(got - want).max())
  scale = max(1.0, float(np.abs(want).max()))
  if not diff <= tolerance * scale:
    raise RuntimeError(f'{name}: logits differ from the source by {diff:.3g} '
                       f'(allowed {tolerance * scale:.3g}); the export is '
                       'wrong and was not kept.')
  logger.info(f'{name}: max |logit difference| to the source {diff:.3g} '
              f'(logits up to {scale:.3g})')
  return diff


def tflite_interpreter(content):
  """The TFLite interpreter: LiteRT's where installed, else TensorFlow's."""
  try:
    from ai_edge_litert.interpreter import Interpreter
  except ImportError:
    Interpreter = tf.lite.Interpreter
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # TF's own announces its move to LiteRT
    return Interpreter(model_content=content)


def tflite_logits(interpreter, x):
  inp = interpreter.get_input_details()[0]
  interpreter.resize_tensor_input(inp['index'], x.shape)
  interpreter.allocate_tensors()
  interpreter.set_tensor(inp['index'], x)
  interpreter.invoke()
  return interpreter.get_tensor(interpreter.get_output_details()[0]['index'])


def export_saved_model(model, out, resolution, tolerance):
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(out)}.')
  try:
    model.export_saved_model(tmp)
    loaded = tf.saved_model.load(tmp)  # kept: it owns the variables
    diff = 0.
    for n in (1, 3):
      x = check_inputs(resolution, n, seed=n)
      diff = max(diff, compare(f'SavedModel (batch {n})',
                               loaded.serve(x).numpy(), model(x).numpy(),
                               tolerance))
    if os.path.isdir(out):
      shutil.rmtree(out)
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp)
  return diff


def export_tflite(model, out, resolution, tolerance):
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=parent) as saved:
    model.export_saved_model(saved)
    converter = tf.lite.TFLiteConverter.from_saved_model(
        saved, signature_keys=['serve'])
    content = converter.convert()
  interpreter = tflite_interpreter(content)
  diff = 0.
  for n in (1, 3):  # two batch sizes: the batch dimension is dynamic
    x = check_inputs(resolution, n, seed=n)
    diff = max(diff, compare(f'TFLite (batch {n})',
                             tflite_logits(interpreter, x),
                             model(x).numpy(), tolerance))
  fd, tmp = tempfile.mkstemp(dir=parent, suffix='.tflite.part')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(content)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return diff


def main(args):
  if args.resolution < 32:
    raise BadInput('--resolution must be at least 32.')
  weights = read_weights(args.model, args.bit_pretrained_dir)
  model = models.create('weights', weights=weights)
  name = default_name(args.model)
  if args.format == 'saved_model':
    out = args.out or os.path.join('exports', f'{name}-saved_model')
    if os.path.isfile(out):
      raise BadInput(f'--out {out} is a file; a SavedModel is a folder.')
    diff = export_saved_model(model, out, args.resolution, args.tolerance)
    print(f'wrote {out} (checked with tf.saved_model.load at batch 1 and 3: '
          f'max logit difference {diff:.3g}); serve(images): float32 NHWC '
          'images in [-1, 1] -> logits')
  else:
    out = args.out or os.path.join('exports', f'{name}.tflite')
    if not out.endswith('.tflite'):
      raise BadInput(f'--out {out}: give a .tflite file name.')
    diff = export_tflite(model, out, args.resolution, args.tolerance)
    print(f'wrote {out} (checked with the TFLite interpreter at batch 1 and '
          f'3: max logit difference {diff:.3g}); input: float32 NHWC images '
          'in [-1, 1], resize it to the batch shape before allocate_tensors')
  return out


def cli(argv=None):
  logger.addHandler(logging.StreamHandler(sys.stderr))
  logger.setLevel(logging.INFO)
  logger.propagate = False  # TF/absl give the root logger a handler too
  return bit_common.run_cli(lambda: main(argparser().parse_args(argv)))


if __name__ == '__main__':
  cli()
