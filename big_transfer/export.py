"""What the two export commands (bit_pytorch.export, bit_tf2.export)
share: their command line, the default name of an export, the check of an
export's logits against the source's, and the command's logging."""
import logging
import os

import numpy as np

from big_transfer import errors, flags, runfiles, zoo

logger = logging.getLogger('bit.export')


def argparser(framework, formats, forms, out_help):
  """The export command line of `framework`, with its `formats`; `forms`:
  what --model takes besides registered names and hf-hub:."""
  parent, g = flags.group('export')
  g.add_argument('--format', required=True, choices=formats)
  g.add_argument('--out', default=None, help=out_help)
  g.add_argument('--resolution', type=int, default=224,
                 help='Image size of the check.')
  g.add_argument('--tolerance', type=float, default=1e-4,
                 help='Largest logit difference allowed by the check, '
                 'relative to the largest logit (at least 1).')
  return flags.parser(
      f'Export a BiT model ({framework}), checked against the source when '
      'written.', flags.model(required=True, forms=forms), parent)


def default_name(model):
  """The name an export of `model` gets: the registered name, the file's
  name without its extension, or a run folder's name."""
  if model.startswith(zoo.HF_HUB_PREFIX):
    return model.split('/')[-1].split('@')[0]
  path = os.path.normpath(model)
  base = os.path.basename(path)
  if base in (runfiles.MODEL, runfiles.TORCH_CHECKPOINT):
    base = os.path.basename(os.path.dirname(os.path.abspath(path)))
  for ext in ('.npz', '.h5', '.pth.tar', '.tar', '.pth', '.safetensors',
              '.bin'):
    if base.endswith(ext):
      return base[:-len(ext)]
  return base  # a registered name (dots allowed: BiT-R14x0.5-...)


def out_path(out, name, suffix, folder=None):
  """Where an export goes: --out `out`, else exports/NAME+SUFFIX, checked
  (runfiles.check_out). `folder`: what the export is called where it is
  a folder (a file there is refused); a file export's name must end in
  `suffix`."""
  out = runfiles.check_out(out or os.path.join('exports', name + suffix))
  if folder and os.path.isfile(out):
    raise errors.BadInput(f'--out {out} is a file; {folder} is a folder.')
  if not folder and not out.endswith(suffix):
    raise errors.BadInput(f'--out {out}: give a {suffix} file name.')
  return out


def compare(name, got, want, tolerance):
  """Max |got - want|; raises errors.RunFailed (exit 3, one line) unless
  within tolerance of the logits' scale."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  if got.shape != want.shape:
    raise errors.RunFailed(f'{name}: logits of shape {got.shape}, the source '
                       f'gives {want.shape}.')
  diff = float(np.abs(got - want).max())
  scale = max(1.0, float(np.abs(want).max()))
  if not diff <= tolerance * scale:
    raise errors.RunFailed(f'{name}: logits differ from the source by {diff:.3g} '
                       f'(allowed {tolerance * scale:.3g}); the export is '
                       'wrong and was not kept.')
  logger.info(f'{name}: max |logit difference| to the source {diff:.3g} '
              f'(logits up to {scale:.3g})')
  return diff


def cli(main, argparser_fn, argv=None):
  """Runs an export command: its check's lines on stderr, bad input as one
  line and exit status 2."""
  runfiles.console_logger('export')
  return errors.run_cli(lambda: main(argparser_fn().parse_args(argv)))
