"""Few-shot linear evaluation of a BiT model (TF2):

  python -m bit_tf2.fewshot --model BiT-M-R50x1 --dataset cifar10 \\
      [--shots 1,5,10,25] [--seeds 3] [--l2 1024] [--out fewshot.json]

The features come from bit_tf2.features; the draws, the least-squares fits,
the table and the command line are big_transfer.fewshot's, the same in
every backend.
"""
from big_transfer import fewshot
from bit_tf2 import features

argparser, main, cli = fewshot.command(features)

if __name__ == '__main__':
  cli()
