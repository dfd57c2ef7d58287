"""``factory train``: fine-tune a Stable Diffusion 1.5 model into a DiffuMatting model.

Modules: ``config`` (:class:`TrainConfig`, every setting and its default), ``data`` (matting sets
from folders or WebDataset shards, green compositing, aligned augmentation), ``losses`` (L_noise,
L_g, L_detail, L_latent), ``loop`` (stages, steps, checkpoints, resume, validation), ``report``
(TensorBoard, W&B), ``run_folder``
(the run folder's layout, EMA, RNG), ``distributed`` (Ray Train, torchrun), ``run`` (the command).
See ``docs/train.md``.
"""

from factory.train.config import TrainConfig
from factory.train.run import TrainOptions, TrainSummary, run_train

__all__ = ["TrainConfig", "TrainOptions", "TrainSummary", "run_train"]
