"""bit_jax's throughput: the compiled training step of bit_jax.train (SGD,
data-parallel over all local devices) and the evaluation step, on random
data (the data pipeline is not timed)."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from timing import images_per_sec


def measure(arch, resolution, batch, precision, steps, warmup):
  from bit_jax import models, train
  if precision not in train.DTYPES:
    raise ValueError(f'bit_jax does not support {precision}')
  model, params = models.create(arch, head_size=1000,
                                dtype=train.DTYPES[precision])
  tx = train.optimizer()
  mesh = Mesh(np.array(jax.devices()), ('data',))
  state = jax.device_put((params, tx.init(params)), NamedSharding(mesh, P()))
  train_step, eval_step = train.make_steps(model, tx, mesh, batch_split=1)
  rng = np.random.default_rng(0)
  sharded = NamedSharding(mesh, P('data'))
  x = jax.device_put(rng.uniform(-1, 1, (batch, resolution, resolution, 3))
                     .astype(np.float32), sharded)
  labels = rng.integers(0, 1000, batch)
  y = jax.device_put(np.eye(1000, dtype=np.float32)[labels], sharded)
  y_int = jax.device_put(labels, sharded)
  mask = jax.device_put(np.ones(batch, bool), sharded)
  lr = jnp.float32(0.003)

  def step():
    nonlocal state
    params, opt_state, loss = train_step(*state, x, y, lr)
    state = (params, opt_state)
    loss.block_until_ready()

  train_img_s = images_per_sec(step, batch, steps, warmup)
  eval_img_s = images_per_sec(lambda: eval_step(state[0], x, y_int, mask)
                              .block_until_ready(), batch, steps, warmup)
  return dict(train_img_s=train_img_s, eval_img_s=eval_img_s,
              device=str(jax.devices()[0].platform),
              devices=jax.device_count(), jax=jax.__version__)
