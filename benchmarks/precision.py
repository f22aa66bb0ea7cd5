"""Accuracy of bf16 autocast against fp32: the same fine-tunings (the demo's:
the bundled BiT-R14x0.5-FashionMNIST on scikit-learn's digits, HyperRule
with 100 steps at 36->32 px, 1, 5 and all examples per class, several
seeds) in PyTorch at each precision, and the top-1 of each pair.

  python -m benchmarks.precision --precisions fp32,bf16 --seeds 3

bf16 runs natively only on CPUs with AVX512_BF16 or AMX (and on GPUs); on
other CPUs it is emulated, slowly, with the same rounding. The question it
answers is whether bf16's rounding costs accuracy in a fine-tuning, which
decides the default precision on GPUs.
"""
import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import tempfile
import time

from big_transfer import hardware
from demo import run as demo


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--precisions', default='fp32,bf16')
  parser.add_argument('--shots', default='1,5,all')
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--processes', type=int, default=os.cpu_count())
  parser.add_argument('--out', default=None, help='also write results here')
  args = parser.parse_args(argv)
  precisions = args.precisions.split(',')
  shots_list = demo.parse_shots(args.shots)
  settings = [(p, shots, seed) for shots in shots_list
              for seed in range(args.seeds) for p in precisions]
  cpu = hardware.cpu_description()
  print(f'CPU: {cpu["model"]}, bf16 emulated: {cpu["bf16_emulated"]}; '
        f'{len(settings)} runs, {args.processes} at a time', flush=True)
  t0, top1 = time.time(), {}
  # The runs' folders are needed only while they run.
  with tempfile.TemporaryDirectory(prefix='bit_precision_') as root, \
      concurrent.futures.ProcessPoolExecutor(
          args.processes,
          mp_context=multiprocessing.get_context('spawn')) as pool:
    runs = {p: demo.argparser().parse_args(['--logdir',
                                            os.path.join(root, p)])
            for p in precisions}
    futures = {pool.submit(demo.fine_tune, runs[p], 'upstream', shots, seed,
                           ['--precision', p]): (p, shots, seed)
               for p, shots, seed in settings}
    for future in concurrent.futures.as_completed(futures):
      p, shots, seed = futures[future]
      top1[(p, shots, seed)] = future.result()[0]
      print(f'{p:5s} {demo.shot_name(shots):>3s} per class, seed {seed}: '
            f'top-1 {top1[(p, shots, seed)]:.2%} ({time.time() - t0:.0f}s)',
            flush=True)
  rows = []
  for shots in shots_list:
    row = {'shots': demo.shot_name(shots)}
    for p in precisions:
      row[p] = [top1[(p, shots, s)] for s in range(args.seeds)]
    base = precisions[0]
    for p in precisions[1:]:
      row[f'{p}-{base}'] = [a - b for a, b in zip(row[p], row[base])]
    rows.append(row)
    print(f'{row["shots"]:>3s} per class: ' + ', '.join(
        f'{p} median {statistics.median(row[p]):.2%}' for p in precisions) +
          ''.join(f'; {k} per seed ' + ' '.join(f'{d:+.2%}' for d in v)
                  for k, v in row.items() if '-' in k), flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'cpu': cpu, 'args': vars(args), 'rows': rows}, f, indent=2)
  return rows


if __name__ == '__main__':
  main()
