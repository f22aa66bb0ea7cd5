"""Knowledge distillation as in "Knowledge distillation: A good teacher is
patient and consistent" (Beyer et al., 2022): the part every backend shares.

  python -m bit_pytorch.distill --recipe distill_digits_small \\
      --name student --logdir runs --teacher runs/teacher
  (the same flags for bit_jax.distill and bit_tf2.distill)

A teacher (any --model form: a registered name, a .npz, a run folder,
hf-hub:...) is run on the fly, in evaluation mode and without gradients, on
the same devices as the student; the student (an architecture such as
R50x1, trained from random initialisation, or any --model form, whose
weights then initialise it under a new zero head) is trained to match the
teacher's outputs ("function matching"):

- consistent: teacher and student see the same augmented image: one crop,
  one flip and one mixup (the shared data stream's, datastream.Stream) per
  example, fed to both;
- the loss (`kl_loss`) is the Kullback-Leibler divergence from the
  teacher's softmax to the student's, at temperature T (1 by default):

      loss = T^2 * mean over the batch of
             sum_c p_c (log p_c - log q_c),
      p = softmax(teacher logits / T),  q = softmax(student logits / T)

  (the T^2 keeps the gradient's scale independent of T, as big_vision's
  `distance='kl'` does; labels are not used for training at all);
- patient: long schedules (the recipe's epochs or steps), Adam with
  gradient clipping, decoupled weight decay and a warm-up then cosine decay,
  the optimiser of the paper's configurations (big_vision,
  configs/proj/distill).

This module holds what is framework-neutral: the recipe (YAML, like
pre-training's, with the same loading rules: `load_dataclass`), the command
line the three entry points share, the schedule, the reference
definitions of the loss and of the evaluation sums, and the run harness's
evaluation with the extra sums (agreement with the teacher). The backends
(`bit_{pytorch,jax,tf2}/distill.py`) hold the step, the evaluation and
the checkpoint format.

Evaluation reports, on the evaluation split: the student's loss (cross
entropy with the labels), top-1 and top-5, and as extras `agreement` (the
share of examples where the student's top-1 class is the teacher's),
`teacher_top1` and `kl` (the distillation loss, at the run's T).
"""
import argparse
import dataclasses
import math
import os

import numpy as np

from big_transfer import (datasets, datastream, errors, flags, harness,
                          metrics, recipes, runfiles, zoo)
from big_transfer.errors import BadInput

# What an evaluation sums after the harness's four [loss, top-1, top-5, n]; each
# is reported as its share of the examples (metrics.jsonl, results.json).
EVAL_EXTRAS = ('agreement', 'teacher_top1', 'kl')


AUGMENTATIONS = ('inception_crop', 'crop_flip')
TARGETS = ('teacher', 'labels')


@dataclasses.dataclass
class Recipe:
  """What a distillation run does; every field can be set in the YAML file
  (and with --set KEY=VALUE; --teacher, --student, --temperature and
  --datadir are shortcuts)."""
  teacher: str                   # any --model form; its head = the classes
  student: str                   # R50x1 (from scratch) or any --model form
  dataset: str                   # any --dataset form
  batch: int                     # global batch size
  datadir: str = None
  examples_per_class: int = None  # few-shot: train on this many per class
  examples_per_class_seed: int = 0  # (datasets.fewshot_indices)
  epochs: float = None           # length, in epochs ...
  steps: int = None              # ... or in steps (exactly one of the two)
  augment: str = 'inception_crop'  # inception_crop | crop_flip
  resize_size: int = 256         # crop_flip: resize, then random crop
  crop_size: int = 224           # the student's input; eval: resize to it
  crop_scale: list = dataclasses.field(default_factory=lambda: [0.05, 1.0])
  teacher_crop_size: int = None  # the teacher's view of the same crop
  mixup_alpha: float = 1.0       # mixup Beta(a, a); 0: off
  temperature: float = 1.0       # T of the KL loss
  targets: str = 'teacher'       # teacher (KL) | labels (the baseline:
                                 # cross entropy with the mixed labels)
  base_lr: float = 0.03          # Adam's learning rate at the peak
  weight_decay: float = 3e-4     # decoupled, on kernels, times the schedule
  grad_clip_norm: float = 1.0    # global norm; 0: off
  warmup_steps: int = 5000       # linear warm-up from 0, then cosine to 0
  eval_every: int = None         # steps; default: 10 evaluations in a run
  batch_eval: int = None         # default: batch

  def __post_init__(self):
    recipes.check_fields(self)
    if (self.epochs is None) == (self.steps is None):
      raise BadInput('recipe: give exactly one of epochs and steps.')
    recipes.check_positive(self, (
        'batch', 'epochs', 'steps', 'resize_size', 'crop_size',
        'teacher_crop_size', 'eval_every', 'batch_eval', 'base_lr',
        'examples_per_class', 'temperature'))
    recipes.check_at_least_0(self, ('mixup_alpha', 'weight_decay',
                                    'grad_clip_norm', 'warmup_steps'))
    for name, allowed in (('augment', AUGMENTATIONS), ('targets', TARGETS)):
      if getattr(self, name) not in allowed:
        raise BadInput(f'recipe: {name} must be one of {allowed}, got '
                       f'{getattr(self, name)!r}.')
    if self.augment == 'crop_flip' and self.teacher_size > self.resize_size:
      raise BadInput(f'recipe: crop_size {self.teacher_size} is larger than '
                     f'resize_size {self.resize_size}.')
    recipes.check_range('crop_scale', self.crop_scale, 0, 1)
    try:
      datasets.dataset_name(self.dataset)
    except argparse.ArgumentTypeError as e:
      raise BadInput(f'recipe: {e}.') from None
    if self.dataset in ('imagenet2012', 'imagefolder') and not self.datadir:
      raise BadInput(f'{self.dataset} needs --datadir (a folder with '
                     'train/<class>/* and val/<class>/*).')
    zoo.check_model(self.teacher)
    if student_arch(self.student) is None:
      zoo.check_model(self.student)

  @property
  def teacher_size(self):
    return self.teacher_crop_size or self.crop_size


def student_arch(student):
  """The Architecture of a student given as an architecture name (trained
  from scratch), else None (a --model form that initialises it)."""
  try:
    return zoo.parse_arch(student)
  except BadInput:
    return None


def load_recipe(args):
  """The Recipe of the command line: --recipe, --set, and the shortcut
  flags (which win over both)."""
  overrides = list(args.overrides)
  for key in ('teacher', 'student', 'temperature'):
    if getattr(args, key, None) is not None:
      overrides.append(f'{key}={getattr(args, key)}')
  return recipes.load(Recipe, args.recipe, overrides, args.datadir)


def inception_scale(recipe):
  """The Inception crop's range of area shares (the loaders'
  `crop_scale`), or None when the recipe's augmentation is crop_flip."""
  if recipe.augment == 'inception_crop':
    return tuple(recipe.crop_scale)
  return None


def stream(recipe, args, train_size):
  """The data stream of a distillation: --seed, the recipe's batch and
  mixup, over `train_size` examples."""
  return datastream.Stream(train_size, recipe.batch, args.seed,
                           recipe.mixup_alpha)


def loader_batches(recipe, args, train, num_classes, start_step,
                   process=(0, 1)):
  """The training batches of a distillation through big_transfer.loader
  (JAX's and TF2's) from `start_step`, this process's share of them: views
  at the teacher's resolution, the Inception crop where the recipe asks
  for it. Close them to stop their worker processes."""
  from big_transfer import loader  # pylint: disable=import-outside-toplevel
  return loader.train_batches(
      train, num_classes, stream(recipe, args, len(train)),
      recipe.resize_size, recipe.teacher_size, start_step, *process,
      crop_scale=inception_scale(recipe), workers=args.workers)


def teacher_weights(recipe, args, classes, load=zoo.load_weights):
  """The teacher's weights, read by `load(model, folder)` (zoo.load_weights,
  or a wrapper that lets one process download first); BadInput where its
  head does not have one output per class."""
  weights = load(recipe.teacher, args.bit_pretrained_dir)
  _, head = zoo.model_arch(recipe.teacher, weights=weights)
  if head != classes:
    raise BadInput(f'the teacher {recipe.teacher} has {head} outputs but the '
                   f'dataset has {classes} classes; give a teacher fine-tuned '
                   'on this dataset.')
  return weights


def fetch_weights(recipe, args):
  """Downloads the teacher's and the student's weights where they are not
  local yet (zoo.fetch), before the data is read."""
  zoo.fetch(args.bit_pretrained_dir, recipe.teacher,
            *([] if student_arch(recipe.student) else [recipe.student]))


def student_weights(recipe, args, load=zoo.load_weights):
  """The weights that initialise the student (under a new zero head), or
  None where the recipe names an architecture, trained from scratch (its
  initialisation drawn from --seed)."""
  if student_arch(recipe.student) is not None:
    return None
  return load(recipe.student, args.bit_pretrained_dir)


# --------------------------------------------------------------------------
# The schedule: linear warm-up from 0, then cosine decay to 0 (big_vision's
# warmup_steps + decay_type='cosine').

@dataclasses.dataclass
class Schedule:
  total_steps: int
  warmup_steps: int
  base_lr: float
  steps_per_epoch: float

  def factor(self, step):
    """The schedule's multiplier of step `step` (0 at step 0, 1 at the end
    of the warm-up, 0 after the last step)."""
    warm = min(1.0, step / self.warmup_steps) if self.warmup_steps else 1.0
    progress = (step - self.warmup_steps) / max(
        1, self.total_steps - self.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return warm * 0.5 * (1.0 + math.cos(math.pi * progress))

  def lr(self, step):
    return self.base_lr * self.factor(step)


def schedule(recipe, dataset_size):
  per_epoch = dataset_size / recipe.batch
  total = (recipe.steps if recipe.steps is not None else
           max(1, round(recipe.epochs * per_epoch)))
  return Schedule(total, min(recipe.warmup_steps, total), recipe.base_lr,
                  per_epoch)


# The optimiser (the same in every backend, as big_vision's chain
# clip_by_global_norm -> scale_by_adam -> scale(lr) -> add_decayed_weights
# -> scale_by_schedule): with g the gradient clipped to global norm
# `grad_clip_norm`, m and v Adam's moments (b1 0.9, b2 0.999, eps 1e-8,
# bias-corrected), f = schedule.factor(step):
#     w <- w - f * (base_lr * m_hat / (sqrt(v_hat) + eps) + wd * w)
# with wd = weight_decay on kernels (every parameter of 2+ dimensions) and
# 0 on GroupNorm scales/offsets and the head's bias.
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8


# --------------------------------------------------------------------------
# Reference definitions (numpy); each backend computes the same with its
# own ops, and the tests hold them to these.

def log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_loss(student_logits, teacher_logits, temperature=1.0):
  """T^2 * mean over rows of KL(softmax(teacher/T) || softmax(student/T))."""
  t = float(temperature)
  log_p = log_softmax(np.asarray(teacher_logits) / t)
  log_q = log_softmax(np.asarray(student_logits) / t)
  return t * t * float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), -1)))


def eval_sums(student_logits, teacher_logits, labels, temperature=1.0):
  """[loss, top-1, top-5, n, agreement, teacher top-1, kl] summed over the
  rows: what every backend's evaluation returns (summed over batches and
  processes)."""
  s = np.asarray(student_logits, np.float64)
  labels = np.asarray(labels)
  agree = s.argmax(1) == np.asarray(teacher_logits).argmax(1)
  kl = kl_loss(s, teacher_logits, temperature) * len(s)
  return np.concatenate([metrics.batch_sums(s, labels), [
      agree.sum(), (np.asarray(teacher_logits).argmax(1) == labels).sum(),
      kl]]).astype(np.float64)


# --------------------------------------------------------------------------
# The run harness, with the extra evaluation sums.

class Run(harness.Run):
  """harness.Run whose `evaluate()` returns [loss, top-1, top-5, n,
  *EVAL_EXTRAS] sums; the extras are logged and written beside the others
  (as shares of n) in metrics.jsonl and results.json."""

  def summarize(self, step, sums):
    sums = np.asarray(sums, np.float64)
    result = metrics.summarize(sums[:4])
    result.update({k: float(v) / result['n']
                   for k, v in zip(EVAL_EXTRAS, sums[4:])})
    self.logger.info(
        f'step {step}: student top-1 {result["top1"]:.2%}, top-5 '
        f'{result["top5"]:.2%}, loss {result["loss"]:.4f}; agreement with '
        f'the teacher {result["agreement"]:.2%} (teacher top-1 '
        f'{result["teacher_top1"]:.2%}), KL {result["kl"]:.4f} '
        f'({result["n"]} examples)')
    return result


def describe(recipe, sched, dataset_size, classes):
  return (f'{dataset_size} training images, {classes} classes; teacher '
          f'{recipe.teacher} at {recipe.teacher_size} px, student '
          f'{recipe.student} at {recipe.crop_size} px ({recipe.augment}, '
          f'mixup {recipe.mixup_alpha:g}, T={recipe.temperature:g}); '
          f'{sched.total_steps} steps of {recipe.batch} '
          f'({sched.total_steps / sched.steps_per_epoch:.3g} epochs), Adam '
          f'lr {recipe.base_lr:g}, warm-up {sched.warmup_steps}, cosine')


def settings(recipe, args, sched):
  """What a resumed run must share with its checkpoint."""
  return dict(recipe=dataclasses.asdict(recipe), seed=args.seed,
              schedule=[sched.warmup_steps, sched.total_steps])


def config(recipe, sched, dataset_size, eval_size, classes, export, **more):
  return dict(recipe=dataclasses.asdict(recipe),
              schedule=dataclasses.asdict(sched), dataset_size=dataset_size,
              eval_size=eval_size, classes=classes, export=export, **more)


def eval_every(recipe, sched):
  return recipe.eval_every or max(1, sched.total_steps // 10)


def export_path(args, run):
  return args.export or os.path.join(run.dir, runfiles.MODEL)


# --------------------------------------------------------------------------
# The command line of python -m bit_{pytorch,jax,tf2}.distill.

def argparser(backend='pytorch', backend_flags=None):
  """The command line of python -m bit_BACKEND.distill, with
  `backend_flags` (a backend's own group, from flags.group) last."""
  parent, g = flags.group('teacher and student')
  g.add_argument('--teacher', default=None,
                 help='Overrides the recipe\'s teacher: a registered model, a '
                 'weights file (.npz, ...), a run folder, or hf-hub:ORG/NAME; '
                 'its head must have one output per class of the dataset.')
  g.add_argument('--student', default=None,
                 help='Overrides the recipe\'s student: an architecture '
                 '(R50x1: random initialisation) or any --teacher form (its '
                 'weights initialise the student; new zero head).')
  g.add_argument('--temperature', type=float, default=None,
                 help='Overrides the recipe\'s temperature T of the KL loss '
                 '(1 in the paper\'s ImageNet setting).')
  return flags.parser(
      'Distil a BiT teacher into a student by function matching (Beyer et '
      'al., 2022): the same augmented image to both, KL loss.',
      flags.recipe('teacher, student, data, length, batch, augmentation, '
                   'mixup, temperature, optimiser'),
      flags.run(), parent, flags.pretrained_dir(), flags.batch_split(),
      flags.loading(), flags.precision(('fp32', 'bf16'), training=True),
      *([backend_flags] if backend_flags else []),
      prog=f'python -m bit_{backend}.distill')


def data_args(args, recipe):
  """The namespace the backends' dataset loaders read."""
  return argparse.Namespace(
      dataset=recipe.dataset, datadir=recipe.datadir,
      skip_bad_images=args.skip_bad_images, tfds_manual_dir=None,
      train_split=None, eval_split=None,
      examples_per_class=recipe.examples_per_class,
      examples_per_class_seed=recipe.examples_per_class_seed,
      workers=args.workers)


def main_cli(main, parser):
  """python -m bit_BACKEND.distill: `main(parser.parse_args())`, bad input
  as one line and exit status 2."""
  errors.run_cli(lambda: main(parser.parse_args()))
