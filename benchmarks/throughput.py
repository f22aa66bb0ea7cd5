"""Training-step and evaluation throughput of each backend, against timm.

  python -m benchmarks.throughput --arch R50x1 --resolution 128 --batch 32 \\
      --frameworks pytorch --precisions fp32,bf16 --repeat 3

Every measurement runs in its own subprocess (one framework per process, so
none slows another), in rounds: each round measures timm's
resnetv2_50x1_bit-style peer (`timm`, always fp32) and then every chosen
framework and precision. Each result is printed with its ratio to the timm
fp32 figure of the same round; the summary gives medians over the rounds,
the range of the per-round ratios, and the kernels each framework used
(oneDNN on or off, cuDNN, XLA, torch.compile).
The machine is not assumed to be quiet: repeat, and read the spread. The
CPU's model and SIMD flags are printed and recorded with the figures; on a
CPU that emulates bf16 a warning says so once, at the start.

With --batch_splits 1,4,16 each framework and precision also runs its
training step with the batch in that many micro-batches and reports the
step's memory (train_mem_bytes: on a GPU the allocator's peak; on the CPU
the growth of peak resident memory over the steps for PyTorch and TF2, a
lower bound, since memory that set-up freed and the C allocator kept is
reused without growing it; for JAX everywhere the compiled step's memory
as XLA plans it, parameters and optimizer state included).

With --end_to_end STEPS each framework and precision also runs its real
trainer for STEPS steps on a generated folder of JPEG files (HyperRule
resizing and cropping, mixup, periodic checkpoints) and reports the whole
run's training images/s next to its pure step's (benchmarks/end_to_end.py).

A framework is a module `benchmarks/bench_<name>.py` with
`measure(arch, resolution, batch, precision, steps, warmup) -> dict` holding
at least `train_img_s` and `eval_img_s`; register it in
benchmarks.measure.FRAMEWORKS.
"""
import argparse
import json
import statistics

from benchmarks import end_to_end
from benchmarks.measure import (FRAMEWORKS, KEYS, PEER, chosen,
                                measure_in_subprocess)
from big_transfer import hardware

def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--arch', default='R50x1')
  parser.add_argument('--resolution', type=int, default=128)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--frameworks', default='pytorch',
                      help='comma-separated, from: ' + ', '.join(FRAMEWORKS))
  parser.add_argument('--precisions', default='fp32,bf16')
  parser.add_argument('--steps', type=int, default=10,
                      help='timed steps per measurement')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--repeat', type=int, default=3,
                      help='rounds (each measures the timm peer again)')
  parser.add_argument('--batch_splits', default='',
                      help='comma-separated --batch_split values whose '
                      'training-step memory is measured (e.g. 1,4,16)')
  parser.add_argument('--end_to_end', type=int, default=0, metavar='STEPS',
                      help='also run each trainer for STEPS steps on a '
                      'generated JPEG folder, next to its step (e.g. 30)')
  parser.add_argument('--json', default=None, help='also write results here')
  args = parser.parse_args(argv)
  frameworks = chosen(parser, args.frameworks, FRAMEWORKS)
  runs = [(PEER, 'fp32')] + [(f, p) for f in frameworks if f != PEER
                             for p in args.precisions.split(',')]
  cpu = hardware.cpu_description()
  print(f'CPU: {cpu["model"]} ({cpu["machine"]}; '
        f'{" ".join(cpu["simd_flags"]) or "no SIMD flags read"})')
  if 'bf16' in args.precisions.split(',') and cpu['bf16_emulated']:
    print('warning: ' + hardware.BF16_EMULATED_WARNING, flush=True)
  print(f'{args.arch} at {args.resolution} px, batch {args.batch}, '
        f'{args.steps} timed steps after {args.warmup}; ratios are to '
        f'{PEER} fp32 in the same round.', flush=True)
  table = {run: [] for run in runs}
  for r in range(args.repeat):
    peer = None
    for fw, prec in runs:
      res = measure_in_subprocess(fw, args.arch, args.resolution, args.batch,
                                  prec, args.steps, args.warmup)
      peer = res if (fw, prec) == (PEER, 'fp32') else peer
      table[(fw, prec)].append(res)
      print(f'round {r + 1}: {fw:>8} {prec:<5} ' + _describe(res, peer),
            flush=True)
  print('median over rounds:')
  summary = []
  for (fw, prec), results in table.items():
    good = [x for x in results if 'error' not in x]
    row = {'framework': fw, 'precision': prec, 'rounds': len(good)}
    for k in KEYS:
      if good:
        row[k] = statistics.median(x[k] for x in good)
        ratios = [x[k] / p[k] for x, p in zip(results, table[(PEER, 'fp32')])
                  if 'error' not in x and 'error' not in p]
        row[k + '_ratio'] = statistics.median(ratios) if ratios else None
        row[k + '_ratio_range'] = [min(ratios), max(ratios)] if ratios else None
    row['kernels'] = sorted({x.get('kernels', '?') for x in good})
    summary.append(row)
    print(f'  {fw:>8} {prec:<5} ' + (' '.join(
        f'{k}={row[k]:.1f}' + _ratio(row, k) for k in KEYS) +
                                        f'  [{"; ".join(row["kernels"])}]'
                                        if good else 'failed'), flush=True)
  memory = _memory_by_split(args, runs)
  end_to_end = _end_to_end(args, frameworks)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'args': vars(args), 'cpu': cpu, 'summary': summary,
                 'rounds': {f'{fw}/{p}': v for (fw, p), v in table.items()},
                 'train_mem_bytes_by_batch_split': memory,
                 'end_to_end': end_to_end}, f, indent=2)
  return summary


def _memory_by_split(args, runs):
  """{'framework/precision': {split: train_mem_bytes or error}}: one
  short training measurement per --batch_splits value."""
  splits = [int(s) for s in args.batch_splits.split(',') if s]
  if not splits:
    return {}
  print(f'training-step memory (MiB) at --batch_split {splits}:')
  memory = {}
  for fw, prec in runs:
    row = memory[f'{fw}/{prec}'] = {}
    for split in splits:
      res = measure_in_subprocess(fw, args.arch, args.resolution, args.batch,
                                  prec, 1, 1, batch_split=split,
                                  evaluate=False)
      row[split] = res.get('train_mem_bytes', res)
    print(f'  {fw:>8} {prec:<5} ' + ' '.join(
        f'{s}: {v / 2**20:.0f}' if isinstance(v, int) else f'{s}: {v}'
        for s, v in row.items()), flush=True)
  return memory


def _end_to_end(args, frameworks):
  """benchmarks/end_to_end.py's summary for the chosen frameworks and
  precisions ([] without --end_to_end)."""
  ours = [f for f in frameworks if f != PEER]
  if not args.end_to_end or not ours:
    return []
  print(f'end to end, {args.end_to_end} steps of each trainer:', flush=True)
  return end_to_end.main([
      '--arch', args.arch, '--resolution', str(args.resolution),
      '--batch', str(args.batch), '--frameworks', ','.join(ours),
      '--precisions', args.precisions, '--steps', str(args.end_to_end)])


def _ratio(row, key):
  """' (xMEDIAN, rounds xMIN..MAX)' of a summary row's ratio to the peer."""
  if not row[key + '_ratio']:
    return ''
  low, high = row[key + '_ratio_range']
  return f' (x{row[key + "_ratio"]:.2f}, rounds x{low:.2f}..{high:.2f})'


def _describe(res, peer):
  if 'error' in res:
    return f'failed: {res["error"]}'
  out = []
  for k in KEYS:
    ratio = (f' (x{res[k] / peer[k]:.2f})'
             if peer and 'error' not in peer else '')
    out.append(f'{k}={res[k]:.1f}{ratio}')
  return ' '.join(out)


if __name__ == '__main__':
  main()
