"""Classify images with a BiT model: python -m bit_pytorch.predict IMAGES..."""
import torch

from big_transfer import errors, predict
from bit_pytorch import engine
from bit_pytorch import models


def load_model(weights):
  """(head size, logits function) of the model in `weights`, on all GPUs."""
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  model, _ = engine.to_device(models.create('weights', weights=weights).eval(),
                              device)
  if torch.cuda.device_count() > 1:
    model = torch.nn.DataParallel(model)

  @torch.inference_mode()
  def logits_fn(images):  # float32 NHWC in [-1, 1]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)
    return model(engine.for_inference(x)).float().cpu().numpy()

  return int(weights['resnet/head/conv2d/bias'].shape[0]), logits_fn


def main(args):
  return predict.predict(args, load_model)


if __name__ == '__main__':
  errors.run_cli(
      lambda: main(predict.predict_argparser('PyTorch').parse_args()))
