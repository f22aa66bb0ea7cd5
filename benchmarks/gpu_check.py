"""The GPU check (run through benchmarks/gpu_check.sh): on a machine with one
NVIDIA GPU and the frameworks installed, with no network, within the time
limit of SIZES (total_s), one JSON file holding

- each backend's training and evaluation throughput (R50x1, 224 px, bf16,
  batch 128, random data) against timm's resnetv2_50x1_bit with AMP and
  channels-last measured in the same run, and their ratios to it (PyTorch
  also through torch.compile, as `bit_pytorch.train --compile` runs);
- model FLOP utilisation: images/s x the model's FLOPs per image (forward
  convolutions and matmuls counted by torch's FlopCounterMode on
  bit_pytorch's model; a training step counted as 3x the forward) over the
  GPU's dense bf16 peak;
- a short fine-tuning in each backend at the settings above, through its
  command line (benchmarks/end_to_end.py), from a generated BiT checkpoint
  on a generated folder of photo-sized JPEG files (375x500; the HyperRule
  resizes them), with mixup and periodic checkpoints, to its results; its
  images/s end to end (data, augmentation, mixup, checkpoints included)
  next to the pure training step's above;
- each backend's input pipeline alone (benchmarks/pipeline.py, no model)
  with the trainers' default workers on the same kind of files: the rate
  the host can feed;
- peak GPU memory of each backend's training step, also with the batch in
  4 and 16 micro-batches (--batch_split).

A backend (or timm) that is not installed is skipped with the reason
recorded, as is one that fails or runs out of its time. The JSON file is
rewritten after every stage, so a run cut short still leaves what it
measured. With --cpu everything runs on the CPU at tiny sizes, to check
that the script works (figures from it mean nothing).
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import end_to_end
from benchmarks.measure import (REPO, measure_in_subprocess,
                                run_in_subprocess)
from big_transfer import hardware, harness

BACKENDS = ('pytorch', 'jax', 'tf2')
# What each contender needs importable: for its throughput, and for its
# trainer (JAX and TF2 read data through big_transfer.loader, with grain).
NEEDS = {
    'timm': ('torch', 'timm'),
    'pytorch': ('torch', 'torchvision'),
    'jax': ('jax', 'flax', 'optax', 'orbax.checkpoint'),
    'tf2': ('tensorflow', 'keras'),
}
TRAINER_NEEDS = {'pytorch': (), 'jax': ('grain',), 'tf2': ('grain',)}
# Fine-tunings end to end, most telling first (a run cut short by the time
# limit keeps those done): name -> (backend, trainer flags). Each is
# compared with the pure step it ran: PyTorch's 'pytorch_compile' where
# its trainer compiled (on a GPU its default for runs of 500 steps or
# more, as the GPU's are), else 'pytorch'. By default they hold their
# images (big_transfer.held: each is read many times); '_decoded' decodes
# at every read, as a dataset too large to hold would. The runs with flags
# are the GPU's only (on the CPU they would repeat the default).
FINETUNES = {
    'pytorch': ('pytorch', ()),
    'jax': ('jax', ()),
    'jax_decoded': ('jax', ('--no-hold_images',)),
    'pytorch_decoded': ('pytorch', ('--no-hold_images',)),
    'pytorch_no_compile': ('pytorch', ('--no-compile',)),
    'tf2': ('tf2', ()),
}
DISTRIBUTIONS = ('torch', 'torchvision', 'timm', 'jax', 'jaxlib', 'flax',
                 'optax', 'orbax-checkpoint', 'tensorflow', 'keras')
# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, by the longest part of
# the GPU's name that matches (vendors' data sheets).
BF16_PEAK_TFLOPS = {
    'H200 NVL': 835.0, 'H200': 989.4, 'H100 NVL': 835.0, 'H100 PCIe': 756.0,
    'H100': 989.4, 'GH200': 989.4, 'B200': 2250.0, 'A100': 312.0,
    'L40S': 362.1, 'L4': 121.0, 'A10G': 70.0, 'A10': 125.0,
}
SIZES = {
    # mode: arch, resolution, batch, steps, warmup, --batch_split values
    # whose memory is measured, fine-tuning (classes, training images per
    # class, steps, untimed first steps, checkpoint interval, the JPEG
    # files' height and width: on the GPU a photo's 375x500), the input
    # pipeline's timed batches, time limits (s): each measurement, each
    # fine-tuning, all.
    # On the GPU the fine-tunings are long enough that the batches the
    # loader's workers made ready during the first steps (about 2 per
    # worker) are a small part of those timed.
    'gpu': dict(arch='R50x1', resolution=224, batch=128, steps=20, warmup=5,
                splits=(4, 16), ft_classes=4, ft_per_class=64, ft_steps=600,
                ft_skip=100, ft_save_every=300, ft_image=(375, 500),
                pipeline_batches=100, measure_s=180, finetune_s=150,
                total_s=540),
    # On the CPU the limits only stop a hung run: a shared CPU can be slow.
    'cpu': dict(arch='R14x0.5', resolution=32, batch=4, steps=1, warmup=1,
                splits=(2,), ft_classes=2, ft_per_class=4, ft_steps=12,
                ft_skip=4, ft_save_every=4, ft_image=(40, 50),
                pipeline_batches=2, measure_s=600, finetune_s=600,
                total_s=1500),
}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--cpu', action='store_true',
                      help='run on the CPU at tiny sizes (a check of the '
                      'script itself)')
  parser.add_argument('--out', default='gpu_check.json')
  parser.add_argument('--backends', default=','.join(BACKENDS))
  parser.add_argument('--peak_tflops', type=float, default=None,
                      help="the GPU's dense bf16 peak, where the built-in "
                      'table does not know it')
  args = parser.parse_args(argv)
  started = time.time()
  mode = 'cpu' if args.cpu else 'gpu'
  size = SIZES[mode]
  backends = [b for b in args.backends.split(',') if b]
  unknown = set(backends) - set(BACKENDS)
  if unknown:
    parser.error(f'unknown backend(s) {sorted(unknown)}; known: '
                 f'{", ".join(BACKENDS)}')

  report = {
      'mode': mode,
      'started': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      'settings': {k: size[k] for k in ('arch', 'resolution', 'batch',
                                        'steps', 'warmup')},
      'precision': 'bf16',
      'machine': {'python': platform.python_version(),
                  'cpu': hardware.cpu_description(),
                  'gpu': _nvidia_smi()},
      'versions': harness.versions(*DISTRIBUTIONS),
  }
  report['settings']['peer'] = (
      'timm resnetv2_50x1_bit-style model, bf16 autocast, channels-last')
  report['notes'] = {
      'train_mem_bytes': 'PyTorch, timm, TF2: on a GPU the allocator peak '
      'over the training steps, on the CPU the growth of peak resident '
      "memory over them; JAX: the compiled step's memory as XLA plans it "
      '(arguments, unaliased outputs, temporaries)',
      'mfu': "images/s x FLOPs per image / the GPU's dense bf16 peak; a "
      'training step counts 3x the forward FLOPs'}
  if args.cpu and hardware.bf16_emulated('cpu'):
    print('warning: ' + hardware.BF16_EMULATED_WARNING, flush=True)
  missing = {name: _missing(mods) for name, mods in NEEDS.items()}

  def save():
    report['wall_s'] = round(time.time() - started, 1)
    tmp = args.out + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(report, f, indent=2)
    os.replace(tmp, args.out)

  def left(limit):
    return max(1.0, min(limit, size['total_s'] - (time.time() - started)))

  report['flops'] = _flops(size['arch'], size['resolution'])
  peak = args.peak_tflops or _peak_tflops(report['machine']['gpu'])
  report['bf16_peak_tflops'] = None if args.cpu else peak
  save()

  # Throughput, one contender at a time, each in its own process.
  env = {'CUDA_VISIBLE_DEVICES': '', 'JAX_PLATFORMS': 'cpu'} if args.cpu else {}
  contenders = [('timm', 'timm', {'channels_last': True})]
  for b in backends:
    contenders.append((b, b, {}))
    if b == 'pytorch' and not args.cpu:
      # bit_pytorch.train --compile (on the CPU, compiling takes minutes).
      contenders.append(('pytorch_compile', b, {'compile': True}))
  results = report['throughput'] = {}
  for name, framework, options in contenders:
    if missing[framework]:
      results[name] = {
          'skipped': 'not installed: ' + ', '.join(missing[framework])}
    else:
      print(f'measuring {name} ...', flush=True)
      results[name] = measure_in_subprocess(
          framework, size['arch'], size['resolution'], size['batch'], 'bf16',
          size['steps'], size['warmup'], timeout=left(size['measure_s']),
          env=env, **options)
    _add_ratios(results[name], results.get('timm'), report['flops'],
                report['bf16_peak_tflops'])
    print(f'  {name}: {json.dumps(results[name])}', flush=True)
    save()

  # Fine-tuning end to end, one backend at a time, at the settings of the
  # throughput above: `ratio` is its images/s over the pure step's (and
  # `ratio_between_checkpoints` that of its windows without a checkpoint).
  tuning = report['finetune'] = {}
  work = tempfile.mkdtemp(prefix='bit_gpu_check_')
  try:
    folder = end_to_end.make_folder(
        os.path.join(work, 'images'), size['ft_classes'],
        size['ft_per_class'], size['ft_image'])
    weights = end_to_end.make_weights(os.path.join(work, 'model.npz'),
                                      size['arch'], size['ft_classes'])
    for name, (b, flags) in FINETUNES.items():
      if b not in results or (flags and args.cpu):  # not chosen, or --cpu
        continue
      needs = missing[b] or _missing(TRAINER_NEEDS[b])
      if needs:
        tuning[name] = {'skipped': 'not installed: ' + ', '.join(needs)}
        continue
      print(f'fine-tuning {name} end to end ...', flush=True)
      run = end_to_end.measure_end_to_end(
          b, size['arch'], size['resolution'], size['batch'], 'bf16',
          size['ft_steps'], folder, work, save_every=size['ft_save_every'],
          skip=size['ft_skip'], weights=weights, env=env,
          timeout=left(size['finetune_s']), flags=flags)
      run.pop('run_dir', None)  # removed below
      step = results.get(f'{b}_compile' if run.get('compiled') else b, {})
      end_to_end.add_ratios(run, step.get('train_img_s'))
      tuning[name] = run
      print(f'  {name}: ' + json.dumps({k: run.get(k) for k in (
          'e2e_img_s', 'ratio', 'ratio_between_checkpoints', 'checkpoint_s',
          'first_step_s', 'held_s', 'top1', 'error')}), flush=True)
      save()
  finally:
    shutil.rmtree(work, ignore_errors=True)

  # The input pipeline alone, no model, with the trainers' default workers:
  # what the host can feed, next to each fine-tuning's rate above.
  print('the input pipeline alone ...', flush=True)
  report['pipeline'] = _pipeline(
      [b for b in backends if not (missing[b] or _missing(TRAINER_NEEDS[b]))],
      size, env, timeout=left(size['measure_s']))
  print(f'  {json.dumps(report["pipeline"])}', flush=True)
  save()

  # A training step's memory with the batch in micro-batches
  # (--batch_split): what one micro-batch needs, not the whole batch.
  memory = report['train_mem_bytes_by_batch_split'] = {}
  for b in backends:
    if missing[b] or 'train_mem_bytes' not in results[b]:
      continue
    memory[b] = {'1': results[b]['train_mem_bytes']}
    for split in size['splits']:
      print(f'memory of {b} at --batch_split {split} ...', flush=True)
      res = measure_in_subprocess(
          b, size['arch'], size['resolution'], size['batch'], 'bf16', 1, 1,
          timeout=left(size['measure_s']), env=env, batch_split=split,
          evaluate=False)
      memory[b][str(split)] = res.get('train_mem_bytes', res)
    print(f'  {b}: {json.dumps(memory[b])}', flush=True)
    save()

  save()
  print(f'wrote {args.out} in {report["wall_s"]:.0f} s', flush=True)
  return report


def _pipeline(backends, size, env, timeout):
  """{backend: images/s, cores of CPU time, images/s per core} of
  `backends`' training input pipelines alone (benchmarks.pipeline: decode,
  HyperRule resize, crop, flip, mixup; no model), at the fine-tunings'
  image size, crop and batch, with the trainers' default --workers, in a
  fresh process; or {'error': why}."""
  if not backends:
    return {'skipped': 'no backend installed with its input pipeline'}
  # TF2 reads through JAX's loader (big_transfer.loader): the `jax` row.
  pipelines = {'tf2': 'jax'}
  names = [n for n in ('pytorch', 'jax')
           if n in {pipelines.get(b, b) for b in backends}]
  argv = ['--backends', ','.join(names),
          '--workers', str(hardware.default_workers()),
          '--batch', str(size['batch']),
          '--batches', str(size['pipeline_batches']),
          '--resolution', str(size['resolution']),
          '--image_size', '{}x{}'.format(*size['ft_image'])]
  results = run_in_subprocess('pipeline', 'main', (argv,), timeout=timeout,
                              env=env)
  if isinstance(results, dict):  # {'error': why}
    return results
  return {r['backend']: {k: r[k] for k in ('workers', 'img_s', 'cpu_cores',
                                           'img_s_per_core', 'batches',
                                           'warmup')} for r in results}


def _missing(modules):
  out = []
  for m in modules:
    try:
      found = importlib.util.find_spec(m) is not None
    except ImportError:
      found = False
    if not found:
      out.append(m)
  return out


def _nvidia_smi():
  """{name, memory_mib, driver, max_sm_clock_mhz} of GPU 0, or None."""
  smi = shutil.which('nvidia-smi')
  if not smi:
    return None
  fields = ('name', 'memory.total', 'driver_version', 'clocks.max.sm')
  try:
    line = subprocess.run(
        [smi, '--query-gpu=' + ','.join(fields),
         '--format=csv,noheader,nounits'], capture_output=True, text=True,
        timeout=30, check=True).stdout.splitlines()[0]
  except (subprocess.SubprocessError, OSError, IndexError):
    return None
  name, memory, driver, clock = [v.strip() for v in line.split(',')]
  return {'name': name, 'memory_mib': _number(memory), 'driver': driver,
          'max_sm_clock_mhz': _number(clock)}


def _number(text):
  try:
    return float(text)
  except ValueError:
    return None


def _peak_tflops(gpu):
  if not gpu:
    return None
  matches = [k for k in BF16_PEAK_TFLOPS if k in gpu['name']]
  return BF16_PEAK_TFLOPS[max(matches, key=len)] if matches else None


def _flops(arch, resolution):
  """{forward_per_image, train_per_image}: FLOPs (a multiply-add is 2) of
  one image through bit_pytorch's model, counted on the CPU."""
  if _missing(('torch',)):
    return {'skipped': 'torch not installed'}
  code = (
      'import torch; '
      'from torch.utils.flop_counter import FlopCounterMode; '
      'from bit_pytorch import models; '
      'net = models.create({arch!r}, head_size=1000).eval(); '
      'counter = FlopCounterMode(display=False); '
      'x = torch.zeros(1, 3, {res}, {res})\n'
      'with torch.no_grad(), counter: net(x)\n'
      'print(counter.get_total_flops())').format(arch=arch, res=resolution)
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, check=False, timeout=120, cwd=REPO,
                        env=dict(os.environ, CUDA_VISIBLE_DEVICES=''))
  if proc.returncode:
    return {'error': (proc.stderr.strip().splitlines() or ['?'])[-1]}
  forward = int(proc.stdout.split()[-1])
  return {'forward_per_image': forward, 'train_per_image': 3 * forward}


def _add_ratios(res, peer, flops, peak_tflops):
  """Adds ratios to the peer and model FLOP utilisation to `res`."""
  if 'train_img_s' not in res:
    return
  for k in ('train', 'eval'):
    if peer and f'{k}_img_s' in peer:
      res[f'{k}_x_timm'] = round(res[f'{k}_img_s'] / peer[f'{k}_img_s'], 3)
    per_image = flops.get('train_per_image' if k == 'train'
                          else 'forward_per_image')
    if per_image and peak_tflops:
      res[f'{k}_mfu'] = round(res[f'{k}_img_s'] * per_image
                              / (peak_tflops * 1e12), 4)


if __name__ == '__main__':
  main()
