"""The VTAB-1k table (big_transfer.vtab) against the published definitions
(google-research/task_adaptation's splits and label rules) and the
released models; needs no TFDS."""
import numpy as np

from big_transfer import vtab, zoo


def test_vtab_split_tables_of_published_datasets():
  """The VTAB splits computed from the real datasets' TFDS split sizes."""
  table = vtab.split_table
  cases = {
      # task: (TFDS split sizes, expected VTAB splits)
      'caltech101': ({'train': 3060, 'test': 6084},
                     dict(train800val200='train[:800]+train[2754:2954]',
                          val='train[2754:]', test='test')),
      'cifar100': ({'train': 50000, 'test': 10000},
                   dict(val200='train[45000:45200]', test='test')),
      'oxford_iiit_pet': ({'train': 3680, 'test': 3669},
                          dict(val200='train[2944:3144]')),
      'svhn': ({'train': 73257, 'test': 26032},
               dict(val200='train[65931:66131]')),
      'clevr-count': ({'train': 70000, 'validation': 15000, 'test': 15000},
                      dict(val200='train[63000:63200]', test='validation')),
      'eurosat': ({'train': 27000},
                  dict(val200='train[16200:16400]', test='train[21600:]',
                       trainval='train[:21600]')),
      'resisc45': ({'train': 31500}, dict(test='train[25200:]')),
      'dsprites-xpos': ({'train': 737280},
                        dict(val='train[589824:663552]',
                             test='train[663552:]')),
      'smallnorb-azimuth': ({'train': 24300, 'test': 24300},
                            dict(val200='test[:200]', test='test[50%:]',
                                 train800val200='train[:800]+test[:200]')),
      'dtd': ({'train': 1880, 'validation': 1880, 'test': 1880},
              dict(train800val200='train[:800]+validation[:200]',
                   test='test')),
      'kitti-distance': ({'train': 6347, 'validation': 423, 'test': 711},
                         dict(val200='validation[:200]', test='test')),
  }
  for task, (counts, expected) in cases.items():
    kind, arg = vtab.TASKS[task].splits
    got = table(kind, counts, arg)
    assert set(got) == set(vtab.SPLITS)
    assert got['train800'] == 'train[:800]', task
    for split, spec in expected.items():
      assert got[split] == spec, (task, split)


def test_vtab_structured_labels_follow_the_published_rules():
  tasks = vtab.TASKS

  def clevr(depths):
    coords = np.array([[0.0, 0.0, d] for d in depths], np.float32)
    return {'objects': {'pixel_coords': coords}}

  count = tasks['clevr-count'].label
  assert [count(clevr([9.0] * n)) for n in range(3, 11)] == list(range(8))
  distance = tasks['clevr-distance'].label
  # Classes: (0, 8], (8, 8.5], (8.5, 9], (9, 9.5], (9.5, 10], (10, 100].
  for depths, label in (([12.0, 7.5], 0), ([8.0], 0), ([8.01, 30.0], 1),
                        ([8.5], 1), ([8.7], 2), ([9.2], 3), ([9.7], 4),
                        ([10.0], 4), ([10.2, 11.0], 5)):
    assert distance(clevr(depths)) == label, depths
  types = ['Car', 'Van', 'Truck', 'Pedestrian', 'Person_sitting', 'Cyclist',
           'Tram', 'Misc']
  kitti = vtab.KittiDistance(types)

  def scene(objects):
    return {'objects': {
        'type': np.array([types.index(t) for t, _ in objects], np.int64),
        'location': np.array([[1.0, 1.5, z] for _, z in objects],
                             np.float32).reshape(-1, 3)}}
  # Classes: closest car/van/truck at (-100, 8], (8, 20], (20, 999], or
  # none (1000 m); other objects do not count.
  for objects, label in (([('Car', 5.0)], 0), ([('Van', 8.0)], 0),
                         ([('Truck', 8.5), ('Car', 30.0)], 1),
                         ([('Pedestrian', 3.0), ('Car', 25.0)], 2),
                         ([('Cyclist', 4.0)], 3), ([], 3)):
    assert kitti(scene(objects)) == label, objects
  assert tasks['smallnorb-azimuth'].label({'label_azimuth': 17}) == 17
  assert tasks['smallnorb-elevation'].label({'label_elevation': 8}) == 8
  xpos = tasks['dsprites-xpos'].label
  assert [xpos({'label_x_position': v}) for v in (0, 1, 2, 31)] == [0, 0, 1,
                                                                   15]


# The tasks of the published VTAB-1k models (their download addresses:
# bit_models/vtab/BiT-M-{arch}-run{0,1,2}-{task}.npz).
PUBLISHED_VTAB_TASKS = (
    'caltech101', 'diabetic_retinopathy', 'dtd', 'oxford_flowers102',
    'oxford_iiit_pet', 'resisc45', 'sun397', 'cifar100', 'eurosat',
    'patch_camelyon', 'smallnorb-elevation', 'svhn', 'dsprites-orientation',
    'smallnorb-azimuth', 'clevr-distance', 'clevr-count', 'dmlab',
    'kitti-distance', 'dsprites-xpos')


def test_vtab_tasks_are_the_released_models_tasks():
  assert sorted(vtab.TASKS) == sorted(PUBLISHED_VTAB_TASKS)
  for arch in ('R50x1', 'R101x1', 'R50x3', 'R101x3', 'R152x4'):
    for run in range(3):
      for name, task in vtab.TASKS.items():
        info = zoo.MODELS[f'BiT-M-{arch}-run{run}-{name}']
        assert info.head_size == task.num_classes
        assert info.url.endswith(f'/vtab/BiT-M-{arch}-run{run}-{name}.npz')
