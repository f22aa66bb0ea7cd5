"""The training input pipeline alone (no model), per CPU core, for each
host-decoding path: how many data-loading cores keep a GPU fed.

  python -m benchmarks.pipeline --backends pytorch,jax --workers 1,2 \\
      --batch 64 --batches 20 --resolution 224 --out pipeline.json

On a generated image folder of photo-like JPEG files (benchmarks.end_to_end's
make_folder, 375x500 px by default) this builds each trainer's own training
batches from the same code and flags the trainer uses, and times them:

  pytorch  bit_pytorch.train's DataLoader: TrainSet (decode, HyperRule
           resize, random crop and flip in --workers worker processes) over
           the data stream's TrainBatches sampler;
  jax      big_transfer.loader.train_batches, which bit_jax.train and
           bit_tf2.train read through: the same views in --workers grain
           processes, with each row's mixup partner and the mixed one-hot
           labels;
  predict  the bit_*.predict commands' images (big_transfer.predict's
           decoded_batches): each training image resized to the crop, as
           evaluation's view, decoded in --workers threads, no mixup.

With --held, each trainer's images are held first (big_transfer.held, in
--workers threads, timed apart: holding's own rate, per core of CPU time,
is recorded as `holding`), so the views are crops and flips of the resized
images, as in a run that reads each image at least twice.

Both hand uint8 images to the device, which scales them to [-1, 1] and
mixes them (PyTorch's engine.mixed, JAX's and TF2's engine.train_images
in the step); that work is the accelerator's, so it is not timed.

The crop is --resolution and the resize the HyperRule's for it, mixup is on
(alpha 0.1). After --warmup untimed batches (the workers' start, and the
batches they hold ready: PyTorch's DataLoader 2 per worker, grain's up to
3; timed, those would count images made before the clock started) it times
--batches batches in one stretch: images/s, images/s per worker (a worker
is a process), and images/s per core:
per second of CPU time that the process, its threads and its worker
processes used meanwhile (from /proc; a framework may use more threads than
its workers). Each timed batch's image shape is recorded, so a result shows
the pipeline really ran. The last lines give, for each backend, the cores
that 5,000 img/s would take at its best rate per core, assuming it scales
linearly. On a shared machine, read the
figures as a floor.
"""
import argparse
import dataclasses
import json
import logging
import math
import os
import tempfile

import bit_common
from benchmarks.end_to_end import MIXUP_ALPHA, make_folder
from benchmarks.measure import chosen
from benchmarks.timing import cpu_seconds, seconds
from big_transfer import datasets, hardware, harness, held

# Fork-based PyTorch workers start first. TF2 reads through JAX's loader
# (big_transfer.loader), so the `jax` row is TF2's too.
BACKENDS = ('pytorch', 'jax', 'predict')
TARGET_IMG_S = 5000
# Untimed batches by default: this many per worker, and this many more.
WARMUP_PER_WORKER = 4


def training_args(folder, batch, resolution, workers, steps, hold=False):
  """The trainers' flags for fine-tuning on the image `folder`, with
  --hold_images when `hold`."""
  return bit_common.argparser().parse_args([
      *(['--hold_images'] if hold else []),
      '--name', 'pipeline', '--logdir', folder, '--model', 'BiT-M-R50x1',
      '--dataset', 'imagefolder', '--datadir', folder, '--batch', str(batch),
      '--crop_size', str(resolution), '--mixup_alpha', str(MIXUP_ALPHA),
      '--workers', str(workers), '--total_steps', str(steps)])


def _held(n, hyper, args, load):
  """With --hold_images, (the path of the n images load(i) held as the
  trainers hold them (big_transfer.held), beside the image folder, and
  holding's own rate); else (None, None)."""
  if not args.hold_images:
    return None, None
  path = []
  cpu = cpu_seconds()
  took = seconds(lambda: path.append(held.hold(
      n, hyper.resize, load, args.datadir, args.workers,
      logging.getLogger('benchmarks.pipeline'))))
  cores = (cpu_seconds() - cpu) / took
  return path[0], {'images': n, 'threads': args.workers, 'seconds': took,
                   'img_s': n / took, 'cpu_cores': cores,
                   'img_s_per_core': n / took / cores}


def pytorch_batches(args):
  """(HyperRule, an iterator of bit_pytorch.train's training images,
  holding's rate or None)."""
  # Imported here only: each backend's pipeline runs without the other.
  # pylint: disable=import-outside-toplevel
  import torch
  from bit_pytorch import data as torch_data
  from bit_pytorch.engine import data_errors_named, loader
  data = torch_data.load(args, None)
  hyper = harness.HyperRule.of(args, len(data.train), data.original_hw)
  path, holding = _held(len(data.train), hyper, args, data.train.load)
  if path:
    data.train = held.Held(path, data.train.labels)
  sampler = torch_data.TrainBatches(hyper.stream(args), 0, hyper.total)
  batches = data_errors_named(iter(loader(
      torch_data.TrainSet(data.train, hyper.resize, hyper.crop), args,
      torch.device('cpu'), batch_sampler=sampler)))
  return hyper, (x for x, _ in batches), holding


def jax_batches(args):
  """(HyperRule, an iterator of bit_jax.train's training images, holding's
  rate or None)."""
  from big_transfer import loader  # pylint: disable=import-outside-toplevel
  data = datasets.load(args)
  hyper = harness.HyperRule.of(args, len(data.train), data.original_hw)
  path, holding = _held(len(data.train), hyper, args, data.train.load)
  if path:
    data.train = held.Held(path, data.train.labels)
  batches = loader.train_batches(data.train, data.num_classes,
                                 hyper.stream(args), hyper.resize, hyper.crop,
                                 workers=args.workers)
  return hyper, _images_then_close(batches), holding


def _images_then_close(batches):
  """The images of `batches`; closing this closes them (their workers)."""
  try:
    for b in batches:
      yield b['image']
  finally:
    batches.close()


def predict_batches(args):
  """(HyperRule with the predict view, an iterator of bit_*.predict's
  images of the training files, repeated for --total_steps batches,
  None)."""
  from big_transfer import predict  # pylint: disable=import-outside-toplevel
  data = datasets.load(args)
  hyper = harness.HyperRule.of(args, len(data.train), data.original_hw)
  hyper = dataclasses.replace(hyper, resize=hyper.crop, mixup=0)
  n = args.total_steps * args.batch
  paths = (data.train.paths * math.ceil(n / len(data.train.paths)))[:n]
  return hyper, predict.decoded_batches(paths, hyper.crop, args.batch,
                                        args.workers), None


PIPELINES = {'pytorch': pytorch_batches, 'jax': jax_batches,
             'predict': predict_batches}


def measure(backend, args, batches, warmup):
  """Times `batches` batches of `backend`'s pipeline after `warmup`."""
  hyper, images, holding = PIPELINES[backend](args)
  for _ in range(warmup):
    next(images)
  shapes = []

  def run():
    for _ in range(batches):
      shapes.append(list(next(images).shape))
  cpu = cpu_seconds()
  took = seconds(run)
  cores = (cpu_seconds() - cpu) / took
  images.close()
  img_s = batches * args.batch / took
  return {'backend': backend, 'workers': args.workers, 'img_s': img_s,
          'img_s_per_worker': img_s / max(1, args.workers),
          'cpu_cores': cores, 'img_s_per_core': img_s / cores,
          'timed_s': took, 'batches': batches, 'warmup': warmup,
          'batch': args.batch, 'resolution': [hyper.resize, hyper.crop],
          'mixup': hyper.mixup, 'batch_shapes': shapes, 'holding': holding}


def cores_needed(results):
  """{backend: {cores, img_s_per_core, workers}}: the cores for
  TARGET_IMG_S at each backend's best rate per core of CPU time."""
  out = {}
  for backend in dict.fromkeys(r['backend'] for r in results):
    best = max((r for r in results if r['backend'] == backend),
               key=lambda r: r['img_s_per_core'])
    out[backend] = {'cores': math.ceil(TARGET_IMG_S /
                                       best['img_s_per_core']),
                    'img_s_per_core': best['img_s_per_core'],
                    'workers': best['workers']}
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--backends', default=','.join(BACKENDS),
                      help='comma-separated, from: ' + ', '.join(BACKENDS))
  parser.add_argument('--workers', default='1,2',
                      help='comma-separated worker counts')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--batches', type=int, default=20,
                      help='timed batches per measurement')
  parser.add_argument('--warmup', type=int, default=None,
                      help='untimed batches first (default: '
                      f'{WARMUP_PER_WORKER} per worker and {WARMUP_PER_WORKER} '
                      'more, more than the workers hold ready, so that the '
                      'timed batches are made while timed)')
  parser.add_argument('--resolution', type=int, default=224,
                      help='the training crop (--crop_size)')
  parser.add_argument('--image_size', default='375x500',
                      help='HEIGHTxWIDTH of the generated JPEG files')
  parser.add_argument('--classes', type=int, default=10)
  parser.add_argument('--per_class', type=int, default=32,
                      help='training images per class')
  parser.add_argument('--held', action='store_true',
                      help='views of held images (big_transfer.held, held '
                      'before each measurement, untimed), as runs that read '
                      'each image at least twice take them')
  parser.add_argument('--out', default=None, help='also write results here')
  args = parser.parse_args(argv)
  names = chosen(parser, args.backends, BACKENDS)
  backends = [b for b in BACKENDS if b in names]
  workers = [int(w) for w in args.workers.split(',') if w]
  size = tuple(int(v) for v in args.image_size.lower().split('x'))
  cpu = hardware.cpu_description()
  print(f'CPU: {cpu["model"]} ({cpu["machine"]}, {os.cpu_count()} cores '
        'visible)')
  warmup = (f'{WARMUP_PER_WORKER} per worker and {WARMUP_PER_WORKER}'
            if args.warmup is None else args.warmup)
  print(f'{args.classes} x {args.per_class} JPEG files of {size[0]}x'
        f'{size[1]}, {args.resolution} px crop, batch {args.batch}, mixup '
        f'{MIXUP_ALPHA:g}; {args.batches} batches timed after {warmup}'
        f'{"; images held" if args.held else ""}.', flush=True)
  results = []
  with tempfile.TemporaryDirectory(prefix='bit_pipeline_') as tmp:
    folder = make_folder(tmp, args.classes, args.per_class, size)
    for backend in backends:
      for w in workers:
        warmup = (WARMUP_PER_WORKER * (w + 1) if args.warmup is None else
                  args.warmup)
        flags = training_args(folder, args.batch, args.resolution, w,
                              warmup + args.batches, args.held)
        res = measure(backend, flags, args.batches, warmup)
        results.append(res)
        print(f'{backend:>7} {w} worker(s): {res["img_s"]:7.1f} img/s, '
              f'{res["img_s_per_worker"]:6.1f} per worker, on '
              f'{res["cpu_cores"]:.2f} cores of CPU time: '
              f'{res["img_s_per_core"]:6.1f} per core  (resize '
              f'{res["resolution"][0]} -> crop {res["resolution"][1]})',
              flush=True)
        if res['holding']:
          h = res['holding']
          print(f'{"":>7} holding {h["images"]} images in {w} thread(s): '
                f'{h["img_s"]:7.1f} img/s, on {h["cpu_cores"]:.2f} cores: '
                f'{h["img_s_per_core"]:6.1f} per core', flush=True)
  cores = cores_needed(results)
  for backend, c in cores.items():
    print(f'{backend}: {TARGET_IMG_S} img/s needs {c["cores"]} cores at '
          f'{c["img_s_per_core"]:.1f} img/s per core (best, at '
          f'{c["workers"]} worker(s); linear scaling assumed)')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'args': vars(args), 'cpu': cpu, 'image_size': size,
                 'target_img_s': TARGET_IMG_S, 'results': results,
                 'cores_needed': cores}, f, indent=2)
  return results


if __name__ == '__main__':
  main()
