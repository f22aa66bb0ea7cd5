"""Prediction: everything but the forward pass, shared by the three
`bit_*.predict` command lines."""
import collections
import concurrent.futures
import csv
import functools
import os

import numpy as np

import bit_hyperrule
from big_transfer import datasets, flags, preprocess, progress, runfiles, zoo
from big_transfer.errors import BadInput


def predict_argparser(framework):
  parent, g = flags.group('prediction')
  g.add_argument('inputs', nargs='+',
                 help='Image files and/or folders (searched recursively).')
  g.add_argument('--labels', default=None,
                 help='Class names, one a line (default: the model\'s own, '
                 'a run folder\'s classes, or the ImageNet label file in '
                 '--bit_pretrained_dir for 1000/21843-class heads, '
                 'downloaded there where missing).')
  g.add_argument('--top_k', type=int, default=5,
                 help='How many classes to print per image.')
  g.add_argument('--save_logits', default=None, metavar='FILE.npy',
                 help='Also save the logits, (images, classes), here.')
  g.add_argument('--out', default=None, metavar='FILE.csv|FILE.json',
                 help='Also write what is printed, each image\'s path and '
                 'its top classes with their probabilities, as CSV (a row '
                 'an image) or JSON (a list of {"path", "classes", '
                 '"probabilities"}).')
  return flags.parser(
      f'Classify images with a BiT model ({framework}).', parent,
      flags.model(default='BiT-M-R50x1-ILSVRC2012'), flags.loading(),
      flags.images(32, 'Resize images to this square size (default: the '
                   'crop size a run folder\'s model was trained at, else the '
                   'HyperRule crop size for the images given).'))


def list_images(inputs):
  """Image files named in `inputs` (files or folders), folders sorted."""
  paths = []
  for item in inputs:
    if os.path.isdir(item):
      paths += datasets.folder_files(item)[0]
    elif os.path.isfile(item):
      paths.append(item)
    else:
      raise BadInput(f'{item} is neither an image file nor a folder.')
  if not paths:
    raise BadInput(f'no images found in {", ".join(inputs)}.')
  return paths


def load_image(path, size):
  """uint8 (size, size, 3) RGB array: the image resized bilinearly, as
  evaluation's (preprocess.eval_view); datasets.BadImage where the file
  cannot be read."""
  return preprocess.eval_view(datasets.decode_file(path), size)


def decoded_batches(paths, size, batch, workers, ahead=2):
  """uint8 batches of the images of `paths` (load_image at `size`), in
  order, decoded by `workers` threads (at least one) up to `ahead` batches
  before the one in use: the model runs while they decode."""
  load = functools.partial(load_image, size=size)
  pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
  started = collections.deque()
  try:
    for i in range(0, len(paths), batch):
      started.append([pool.submit(load, p) for p in paths[i:i + batch]])
      if len(started) > ahead:
        yield np.stack([f.result() for f in started.popleft()])
    while started:
      yield np.stack([f.result() for f in started.popleft()])
  finally:  # a bad image, Ctrl-C: what has not begun never will
    pool.shutdown(cancel_futures=True)


def to_model_input(images):
  """uint8 RGB images -> float32 in [-1, 1], the range BiT models take."""
  return (np.asarray(images, np.float32) - 127.5) / 127.5


def read_labels(path, head_size=None):
  """The names of a label file, one a line; BadInput unless it is readable
  text with `head_size` of them (where given)."""
  if not os.path.isfile(path):
    raise BadInput(f'label file {path} does not exist.')
  try:
    with open(path, encoding='utf-8') as f:
      names = [line.strip() for line in f if line.strip()]
  except (OSError, UnicodeDecodeError) as e:
    raise BadInput(f'cannot read label file {path} ({e}).') from e
  if head_size is not None and len(names) != head_size:
    raise BadInput(f'{path} has {len(names)} names but the model has '
                   f'{head_size} classes.')
  return names


def run_classes(model):
  """The class names a run folder's config.json records (None elsewhere,
  or where the run had classes without names)."""
  classes = runfiles.run_config(model).get('classes')
  return [str(c) for c in classes] if isinstance(classes, list) else None


def label_names(args, head_size, logger):
  """Class names for a head of `head_size`, or None where none are known.
  The ImageNet label files are downloaded into --bit_pretrained_dir where
  missing, as the weights are."""
  path = args.labels
  info = zoo.MODELS.get(args.model)
  if path is None and info is not None and info.labels:
    path = info.labels
  if path is None:
    names = run_classes(args.model)
    if names is not None and len(names) == head_size:
      return names
  if path is None and head_size in zoo.LABEL_FILES:
    name = zoo.LABEL_FILES[head_size]
    path = os.path.join(args.bit_pretrained_dir, name)
    if not os.path.exists(path):
      try:  # beside the weights, as they are
        zoo.download(zoo.BASE_URL + name, path,
                     verify=lambda part: read_labels(part, head_size))
      except BadInput as e:
        logger.warning(f'classes are shown by number: {e}')
        return None
  return None if path is None else read_labels(path, head_size)


def predict(args, load_model):
  """The predict CLI's work, given the backend's `load_model(weights)` that
  returns (head_size, logits_fn: float32 NHWC batch -> numpy logits); the
  weights are zoo.load_weights's (every --model form)."""
  flags.check_at_least(args, ('top_k', 'batch', 'resolution'))
  if args.save_logits:
    runfiles.check_out(args.save_logits, '--save_logits')
  if args.out:
    if not args.out.lower().endswith(OUT_FORMATS):
      raise BadInput(f'--out {args.out}: give a .csv or .json file name.')
    runfiles.check_out(args.out)
  logger = runfiles.console_logger('predict')
  paths = list_images(args.inputs)
  paths = [paths[i] for i in datasets.readable_images(
      paths, args.skip_bad_images, logger)]
  weights = zoo.load_weights(args.model, args.bit_pretrained_dir)
  head_size, logits_fn = load_model(weights)
  names = label_names(args, head_size, logger)
  size = (args.resolution or runfiles.trained_crop(args.model)
          or bit_hyperrule.get_resolution_from_image_sizes(
              datasets.image_sizes(paths))[1])
  logits = []
  for batch in progress.images(decoded_batches(paths, size, args.batch,
                                               args.workers),
                               len(paths), len, 'predicting'):
    logits.append(np.asarray(logits_fn(to_model_input(batch)), np.float32))
  logits = np.concatenate(logits)
  if args.save_logits:
    with runfiles.replaced(args.save_logits, 'wb') as f:
      np.save(f, logits)
  rows = top_classes(paths, logits, args.top_k, names)
  for row in rows:
    shown = ', '.join(f'{c} ({p:.1%})' for c, p in zip(row['classes'],
                                                      row['probabilities']))
    print(f'{row["path"]}: {shown}')
  if args.out:
    write_rows(args.out, rows)
  return logits


OUT_FORMATS = ('.csv', '.json')


def top_classes(paths, logits, k, names=None):
  """[{"path", "classes", "probabilities"}]: each image's k most probable
  classes (their names, or their numbers without `names`), most probable
  first (softmax of the logits)."""
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  rows = []
  for path, p in zip(paths, probs):
    top = np.argsort(-p, kind='stable')[:k]
    rows.append({'path': path,
                 'classes': [names[c] if names else int(c) for c in top],
                 'probabilities': [float(p[c]) for c in top]})
  return rows


def write_rows(out, rows):
  """top_classes's rows into `out`, whole or not at all: JSON, or CSV with
  the columns path, class_1, probability_1, ..., class_k, probability_k."""
  if out.lower().endswith('.json'):
    runfiles.write_json(out, rows)
    return
  k = len(rows[0]['classes'])
  with runfiles.replaced(out) as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(['path'] + [f'{name}_{i}' for i in range(1, k + 1)
                                for name in ('class', 'probability')])
    for row in rows:
      writer.writerow([row['path']] + [v for pair in zip(
          row['classes'], row['probabilities']) for v in pair])


