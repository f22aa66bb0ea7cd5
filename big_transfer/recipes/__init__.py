"""Recipes as data: the YAML files that ship here (pre-training and
distillation settings) and the one way of reading any of them into a
dataclass, with command-line overrides.

A recipe is named either by a path or by the name of a shipped file without
`.yaml` (`python -m bit_pytorch.distill --recipe distill_digits_small`).
"""
import dataclasses
import importlib.resources
import math
import os

import yaml

from big_transfer import flags, runfiles
from big_transfer.errors import BadInput


def shipped():
  """The names of the recipes that ship with the package, sorted."""
  return sorted(f.name[:-len('.yaml')] for f in
                importlib.resources.files(__package__).iterdir()
                if f.name.endswith('.yaml'))


def find(recipe):
  """The file of `recipe`: a path as given, else the shipped recipe of that
  name (with or without `.yaml`)."""
  if os.path.exists(recipe):
    return recipe
  name = os.path.basename(recipe)
  name = name[:-len('.yaml')] if name.endswith('.yaml') else name
  if os.sep not in recipe and name in shipped():
    return str(importlib.resources.files(__package__).joinpath(
        name + '.yaml'))
  raise BadInput(f'no recipe {recipe}: give a YAML file or one of '
                 f'{", ".join(shipped())}.')



KINDS = {int: 'an integer', float: 'a number', str: 'a string',
         list: 'a list'}


def check_fields(obj, where='recipe'):
  """Refuses a dataclass field whose value is not of its declared type
  (int accepted for float; None always)."""
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    kind = (int, float) if f.type is float else f.type
    if value is not None and (not isinstance(value, kind) or
                              isinstance(value, bool)):
      kind_name = KINDS.get(f.type, f.type.__name__)
      raise BadInput(f'{where}: {f.name} must be {kind_name}, got '
                     f'{value!r}.')


def check_positive(obj, names):
  """Refuses a field of `names` (None allowed) that is not a finite
  number above 0."""
  for name in names:
    value = getattr(obj, name)
    if value is not None and not 0 < value < math.inf:
      raise BadInput(f'recipe: {name} must be positive, got {value}.')


def check_at_least_0(obj, names):
  """Refuses a field of `names` that is not a finite number from 0 on."""
  for name in names:
    value = getattr(obj, name)
    if not 0 <= value < math.inf:
      raise BadInput(f'recipe: {name} must be 0 or positive, got {value}.')


def check_range(name, pair, low, high=math.inf, integers=False):
  """Refuses a [min, max] field unless low < min <= max <= high, integers
  where `integers`."""
  kind = int if integers else (int, float)
  if not (isinstance(pair, list) and len(pair) == 2 and
          all(isinstance(v, kind) and not isinstance(v, bool) for v in pair)
          and low < pair[0] <= pair[1] <= high):
    bound = '' if high == math.inf else f' <= {high}'
    raise BadInput(f'recipe: {name} must be [min, max] with {low} < min <= '
                   f'max{bound}{" (integers)" if integers else ""}, got '
                   f'{pair}.')


def check_args(args, batch, devices=1):
  """Refuses the flags of a recipe's run (pre-training, distillation) that
  cannot work with its `batch` on `devices`, before any long work: the
  batch split, --save_every, --workers, a run folder or an --export that
  cannot be written."""
  flags.check_batch_split(batch, args.batch_split, devices)
  flags.check_at_least(args, ('save_every',))
  flags.check_at_least(args, ('workers',), 0)
  runfiles.check_run_dir(args)
  if args.export:
    runfiles.check_out(args.export, '--export')


def load(cls, recipe, overrides=(), datadir=None):
  """`cls(**values)` from the YAML mapping of `recipe` (a file, or the name
  of a shipped recipe: see `find`), with KEY=VALUE overrides (values read
  as YAML) and `datadir` (when given) applied first.
  An unreadable file, an unknown or missing key and an override without
  '=' are refused (BadInput). Pre-training's and distillation's recipes
  are read this way."""
  path = find(recipe)
  try:
    with open(path) as f:
      values = yaml.safe_load(f) or {}
  except (OSError, yaml.YAMLError) as e:
    raise BadInput(f'cannot read recipe {path} ({e}).') from e
  if not isinstance(values, dict):
    raise BadInput(f'recipe {path} is not a mapping of keys.')
  for item in overrides:
    key, sep, value = item.partition('=')
    if not sep:
      raise BadInput(f'--set {item!r}: write KEY=VALUE.')
    values[key] = yaml.safe_load(value)
  if datadir:
    values['datadir'] = datadir
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise BadInput(f'recipe {path}: unknown key(s) {unknown}; '
                   f'known: {sorted(known)}.')
  try:
    return cls(**values)
  except TypeError as e:  # a required key is missing
    raise BadInput(f'recipe {path}: {e}.') from e
