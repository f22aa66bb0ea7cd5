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
import os
import shutil
import tempfile
import warnings

import numpy as np
import tensorflow as tf

from big_transfer import export
from big_transfer import zoo
from big_transfer.errors import BadInput
from bit_tf2 import models

def argparser():
  return export.argparser(
      'TF2: SavedModel or TFLite', ('saved_model', 'tflite'),
      'a .npz or .h5 file, a run folder',
      'Where to write: a folder for saved_model, a .tflite file for tflite '
      '(default: exports/NAME-saved_model or exports/NAME.tflite).')


def check_inputs(resolution, batch, seed=0):
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, (batch, resolution, resolution, 3)).astype(
      np.float32)


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
      diff = max(diff, export.compare(f'SavedModel (batch {n})',
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
    diff = max(diff, export.compare(f'TFLite (batch {n})',
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
  weights = zoo.load_weights(args.model, args.bit_pretrained_dir)
  model = models.create('weights', weights=weights)
  name = export.default_name(args.model)
  if args.format == 'saved_model':
    out = export.out_path(args.out, name, '-saved_model', 'a SavedModel')
    diff = export_saved_model(model, out, args.resolution, args.tolerance)
    print(f'wrote {out} (checked with tf.saved_model.load at batch 1 and 3: '
          f'max logit difference {diff:.3g}); serve(images): float32 NHWC '
          'images in [-1, 1] -> logits')
  else:
    out = export.out_path(args.out, name, '.tflite')
    diff = export_tflite(model, out, args.resolution, args.tolerance)
    print(f'wrote {out} (checked with the TFLite interpreter at batch 1 and '
          f'3: max logit difference {diff:.3g}); input: float32 NHWC images '
          'in [-1, 1], resize it to the batch shape before allocate_tensors')
  return out


def cli(argv=None):
  return export.cli(main, argparser, argv)


if __name__ == '__main__':
  cli()
