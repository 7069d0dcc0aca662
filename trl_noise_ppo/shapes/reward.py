"""The shapes world's reward: a small classifier of layout, colours and shapes, and how well an image matches a prompt.

Example:
    >>> from trl_noise_ppo.shapes.render import render_batch
    >>> from trl_noise_ppo.shapes.reward import ShapesAlignmentReward
    >>> images, captions, _ = render_batch(range(4))
    >>> reward = ShapesAlignmentReward()
    >>> scores = reward(images=images, prompts=captions)  # one float in [0, 1] per image
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .render import COLOUR_NAMES, IMAGE_SIZE, LAYOUTS, MAX_OBJECTS, SHAPES, parse_caption


REWARD_PATH = Path(__file__).parent / "weights" / "reward"
# The classifier's heads: the layout, the number of objects, and each object's colour and shape: "a" is the single
# object, the first (left / top) of two or three, or the object a count repeats; "b" and "c" the next ones.
HEAD_SIZES = {
    "layout": len(LAYOUTS),
    "count": MAX_OBJECTS,
    **{f"{attribute}_{slot}": len(values) for slot in "abc" for attribute, values in (("colour", COLOUR_NAMES), ("shape", SHAPES))},
}


class ShapesClassifier(nn.Module):
    """A five-layer CNN on 32 x 32 images in [0, 1], returning one logit tensor per head of `HEAD_SIZES`."""

    def __init__(
        self,
        channels: tuple[int, ...] = (32, 64, 64, 128, 128),
        strides: tuple[int, ...] = (1, 2, 1, 2, 2),
        hidden_size: int = 128,
    ):
        super().__init__()
        self.config = {"channels": list(channels), "strides": list(strides), "hidden_size": hidden_size}
        layers, in_channels = [], 3
        for out_channels, stride in zip(channels, strides):
            layers += [nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1), nn.ReLU()]
            in_channels = out_channels
        self.features = nn.Sequential(*layers, nn.Flatten())
        # Flattening (rather than pooling) keeps where things are, which the layout head needs.
        side = IMAGE_SIZE
        for stride in strides:
            side = (side + stride - 1) // stride
        self.hidden = nn.Sequential(nn.Linear(in_channels * side * side, hidden_size), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(hidden_size, size) for name, size in HEAD_SIZES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
        hidden = self.hidden(self.features(images * 2 - 1))
        return {name: head(hidden) for name, head in self.heads.items()}

    def save_pretrained(self, directory: str | Path, metrics: dict | None = None) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), directory / "model.safetensors")
        config = {**self.config, "heads": HEAD_SIZES, "layouts": LAYOUTS, "colours": COLOUR_NAMES, "shapes": SHAPES}
        config["max_objects"] = MAX_OBJECTS
        (directory / "config.json").write_text(json.dumps({**config, "metrics": metrics or {}}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path = REWARD_PATH) -> "ShapesClassifier":
        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        model = cls(tuple(config["channels"]), tuple(config["strides"]), config["hidden_size"])
        model.load_state_dict(load_file(directory / "model.safetensors"))
        return model.eval().requires_grad_(False)


def prompt_labels(prompts: list[str]) -> dict[str, torch.Tensor]:
    """Each prompt's class index per head, -1 where the prompt states no such attribute (no second object)."""
    labels = [parse_caption(prompt).labels for prompt in prompts]
    return {name: torch.tensor([label[name] for label in labels]) for name in HEAD_SIZES}


def _stated_attribute_probabilities(
    logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, stated), each (N, heads): the probability of the prompt's class, and whether the prompt states it."""
    stated = torch.stack([labels[name] >= 0 for name in HEAD_SIZES], dim=1)
    probabilities = torch.stack(
        [logits[name].softmax(-1).gather(1, labels[name].clamp(min=0)[:, None])[:, 0] for name in HEAD_SIZES], dim=1
    )
    return probabilities, stated


AGGREGATIONS = ("mean", "product")


def differentiable_alignment_scores(
    classifier: ShapesClassifier, images: torch.Tensor, prompts: list[str], aggregation: str = "mean"
) -> torch.Tensor:
    """`alignment_scores` with its gradient with respect to the images, for optimising against the reward."""
    device = next(classifier.parameters()).device
    labels = {name: label.to(device) for name, label in prompt_labels(prompts).items()}
    probabilities, stated = _stated_attribute_probabilities(classifier(images.to(device, torch.float32)), labels)
    if aggregation == "product":
        return torch.where(stated, probabilities, 1.0).prod(1)
    return (probabilities * stated).sum(1) / stated.sum(1)


@torch.no_grad()
def alignment_scores(
    classifier: ShapesClassifier, images: torch.Tensor, prompts: list[str], aggregation: str = "mean"
) -> torch.Tensor:
    """The classifier's probabilities of the prompt's stated attributes, in [0, 1]: their mean, or with
    `aggregation="product"` their product (the probability that every stated attribute holds, if they are independent)."""
    return differentiable_alignment_scores(classifier, images, prompts, aggregation)


@torch.no_grad()
def is_aligned(classifier: ShapesClassifier, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Per image: does the classifier's most likely class agree with every attribute the prompt states?"""
    device = next(classifier.parameters()).device
    logits = classifier(images.to(device, torch.float32))
    labels = prompt_labels(prompts)
    agrees = torch.stack([(logits[name].argmax(-1).cpu() == labels[name]) | (labels[name] < 0) for name in HEAD_SIZES], dim=1)
    return agrees.all(dim=1)


def alignment_rate(images: torch.Tensor, prompts: list[str], classifier: ShapesClassifier | None = None) -> float:
    """Share of images whose every stated attribute the classifier recognises (its argmax)."""
    classifier = classifier if classifier is not None else ShapesClassifier.from_pretrained()
    return is_aligned(classifier, images, prompts).float().mean().item()


class ShapesAlignmentReward:
    """Reward function (TRL convention): how well each image shows its prompt, a float in [0, 1].

    Called as `reward(images=..., prompts=..., **dataset_columns)` with `images` a float tensor (N, 3, H, W) in
    [0, 1] and `prompts` N captions of the shapes world. The classifier loads once, at the first call, onto
    `device`, or onto the images' device when `device` is None.
    """

    name = "shapes_alignment"
    __name__ = name  # TRL names a reward function's logged metrics after its __name__

    def __init__(
        self, weights_path: str | Path = REWARD_PATH, device: str | torch.device | None = None, aggregation: str = "mean"
    ):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={aggregation!r} is not one of {AGGREGATIONS}.")
        missing = [name for name in ("config.json", "model.safetensors") if not (Path(weights_path) / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{weights_path} holds no {' or '.join(missing)}: pass a folder written by "
                "`python -m trl_noise_ppo.shapes.train_reward --output_dir <folder>`."
            )
        self.weights_path = weights_path
        self.device = device
        self.aggregation = aggregation
        self.classifier: ShapesClassifier | None = None

    def __call__(self, images: torch.Tensor, prompts: list[str], **kwargs) -> list[float]:
        if self.classifier is None:
            self.device = torch.device(self.device) if self.device is not None else images.device
            self.classifier = ShapesClassifier.from_pretrained(self.weights_path).to(self.device)
        return alignment_scores(self.classifier, images, prompts, self.aggregation).tolist()
