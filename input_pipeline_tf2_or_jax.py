"""The original repository's input-pipeline module, under its name: its
`get_data` and `get_dataset_info`, which give tf.data datasets to TF2 and
JAX code written against the original. The trainers of every backend read
through big_transfer.loader, and so does this module: its batches hold the
examples, crops, flips and mixup of the one data stream, pixel for pixel
those of the trainers.

  get_dataset_info(dataset, split, examples_per_class, data_dir=None)
      {'original_num_examples', 'num_examples', 'num_classes'} of `split`
      ('train', or any other name for the evaluation split); num_examples
      counts the few-shot subset.

  get_data(dataset, mode, repeats, batch_size, resize_size, crop_size,
           mixup_alpha, examples_per_class, examples_per_class_seed,
           num_devices, tfds_manual_dir, data_dir=None, seed=0, workers=0)
      A tf.data.Dataset of {'image': float32 [num_devices, batch_size /
      num_devices, crop, crop, 3] in [-1, 1], 'label': one-hot [num_devices,
      ..., classes]}. mode 'train': the data stream of `seed` (endless with
      repeats None, else `repeats` epochs), mixed up with the stream's
      lambda and partners when mixup_alpha is set; any other mode: the
      evaluation split once (`repeats` ignored), with a 'mask' of the real
      rows (the last batch is padded, not dropped). Training images are
      decoded in `workers` processes (0: in the thread that reads the
      dataset, which needs no `if __name__ == '__main__':` guard in the
      calling script), evaluation images in threads.

`dataset` takes the --dataset forms of the command line (TFDS names,
tfds:NAME, vtab:TASK, the offline arrays; `imagefolder` with data_dir).
"""
import argparse
import contextlib

import numpy as np
import tensorflow as tf

from big_transfer import datasets, datastream, loader


def _load(dataset, examples_per_class=None, examples_per_class_seed=0,
          tfds_manual_dir=None, data_dir=None):
  """datasets.Data of `dataset`, its training split the few-shot subset."""
  args = argparse.Namespace(
      dataset=dataset, datadir=data_dir, tfds_manual_dir=tfds_manual_dir,
      examples_per_class=examples_per_class,
      examples_per_class_seed=examples_per_class_seed, skip_bad_images=False)
  return datasets.load(args)


def get_dataset_info(dataset, split, examples_per_class, data_dir=None):
  """See the module doc."""
  data = _load(dataset, data_dir=data_dir)
  n = len(data.train) if split == 'train' else len(data.val)
  return {'original_num_examples': n,
          'num_examples': (examples_per_class * data.num_classes
                           if examples_per_class else n),
          'num_classes': data.num_classes}


def _unit_range(images):
  return (images.astype(np.float32) - 127.5) / 127.5


def _float_batch(batch):
  """A loader training batch as the original's: float images in [-1, 1],
  mixed with their partners where mixup is on."""
  x = _unit_range(batch['image'])
  if 'partner' in batch:
    w = batch['mix'][:, :, None, None, None]
    x = w[:, 0] * x + w[:, 1] * _unit_range(batch['partner'])
  return {'image': x, 'label': batch['label']}


def get_data(dataset, mode, repeats, batch_size, resize_size, crop_size,
             mixup_alpha, examples_per_class, examples_per_class_seed,
             num_devices, tfds_manual_dir, data_dir=None, seed=0, workers=0):
  """See the module doc."""
  data = _load(dataset, examples_per_class, examples_per_class_seed,
               tfds_manual_dir, data_dir)
  classes = data.num_classes
  signature = {'image': tf.TensorSpec([batch_size, crop_size, crop_size, 3],
                                      tf.float32),
               'label': tf.TensorSpec([batch_size, classes], tf.float32)}
  if mode == 'train':
    stream = datastream.Stream(len(data.train), batch_size, seed,
                               mixup_alpha or 0.0)
    steps = (None if repeats is None else
             -(-repeats * len(data.train) // batch_size))

    def batches():
      train = loader.train_batches(data.train, classes, stream, resize_size,
                                   crop_size, workers=workers)
      with contextlib.closing(train):
        for step, batch in enumerate(train):
          if step == steps:
            return
          yield _float_batch(batch)
  else:
    signature['mask'] = tf.TensorSpec([batch_size], tf.bool)
    onehot = np.eye(classes, dtype=np.float32)

    def batches():
      for b in loader.eval_batches(data.val, batch_size, crop_size):
        yield {'image': _unit_range(b['image']), 'label': onehot[b['label']],
               'mask': b['mask']}

  ds = tf.data.Dataset.from_generator(batches, output_signature=signature)
  return ds.map(lambda b: {k: tf.reshape(v, [num_devices, -1,
                                             *v.shape[1:]])
                           for k, v in b.items()})
