"""Recipes as data: the YAML files that ship here (pre-training and
distillation settings) and the one way of reading any of them into a
dataclass, with command-line overrides.

A recipe is named either by a path or by the name of a shipped file without
`.yaml` (`python -m bit_pytorch.distill --recipe distill_digits_small`).
"""
import dataclasses
import importlib.resources
import os

import yaml

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



def check_fields(obj, where='recipe'):
  """Refuses a dataclass field whose value is not of its declared type
  (int accepted for float; None always)."""
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    kind = (int, float) if f.type is float else f.type
    if value is not None and (not isinstance(value, kind) or
                              isinstance(value, bool)):
      raise BadInput(f'{where}: {f.name} must be a {f.type.__name__}, got '
                     f'{value!r}.')


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
