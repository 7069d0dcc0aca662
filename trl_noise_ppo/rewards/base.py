"""What every model-based reward shares: lazy loading onto its device, batching, and the call convention."""

from abc import ABC, abstractmethod

import torch
from torch import nn


class ModelReward(ABC):
    """Base class of the rewards that run a model.

    A reward is called like a TRL GRPO reward function, `reward(images=..., prompts=..., **columns)`, and returns
    one float per image. `images` is an (N, 3, H, W) float tensor in [0, 1]; other keyword arguments (dataset
    columns, `trainer_state`) are accepted and ignored.

    The model loads at the first call, once, onto `device`. When `device` is None, the trainer sets it to its own
    device before the first call; called outside a trainer, the reward follows the images' device. Images are
    scored `batch_size` at a time under `torch.no_grad()`, with the model in `dtype`.

    Subclasses implement `_load(device)` and `_score(images, prompts)`, and list the files `_load` reads in
    `required_files()` and the optional packages they import in `required_packages()`, which the trainer and the
    evaluate command check before generating anything.
    """

    def __init__(self, name: str, device: str | torch.device | None, dtype: torch.dtype, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        self.__name__ = name  # TRL's and our trainer's logging name: rewards/<name>/mean
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self._loaded = False

    def __call__(self, images: torch.Tensor, prompts: list[str], **kwargs) -> list[float]:
        if len(images) != len(prompts):
            raise ValueError(f"{self.__name__}: got {len(images)} images but {len(prompts)} prompts; pass one each.")
        if self.device is None:
            self.device = images.device
        if not self._loaded:
            self._load(torch.device(self.device))
            self._loaded = True
        rewards = []
        with torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                batch = images[start : start + self.batch_size].to(self.device, torch.float32)
                batch_prompts = list(prompts[start : start + self.batch_size])
                rewards.append(self._score(batch, batch_prompts).float().cpu())
        return torch.cat(rewards).tolist()

    def required_files(self) -> list:
        """The `RequiredFile`s (repository or folder, file name, argument) that `_load` reads; none by default."""
        return []

    def required_packages(self) -> dict[str, str]:
        """The Python packages the reward imports beyond the package's own requirements, each with how to install it;
        none by default."""
        return {}

    @abstractmethod
    def _load(self, device: torch.device) -> None:
        """Loads the model's weights onto `device`."""

    @abstractmethod
    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Rewards of one batch: float32 images in [0, 1] on the reward's device -> a 1-D tensor."""


def linear_mlp_head(input_size: int = 768) -> nn.Sequential:
    """The 768-1024-128-64-16-1 head of the LAION aesthetic predictor, which ImageReward reuses.

    It has no activation functions (the originals comment them out), so it is one affine map in effect. The
    dropout layers do nothing at inference; they keep the checkpoints' layer indices 0, 2, 4, 6 and 7.
    """
    return nn.Sequential(
        nn.Linear(input_size, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )
