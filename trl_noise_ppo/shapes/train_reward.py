"""Train the shapes world's reward classifier on rendered images and save it with its test accuracy.

    python -m trl_noise_ppo.shapes.train_reward --output_dir trl_noise_ppo/shapes/weights/reward

Images are blurred, noised and tinted at random during training, because the images it will judge come out of
a small VAE: softer and less clean than the renderer's.
"""

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import HfArgumentParser

from .render import render_batch
from .reward import HEAD_SIZES, ShapesClassifier, is_aligned


@dataclass
class TrainRewardArguments:
    output_dir: str = field(default="shapes-reward", metadata={"help": "Where to save model.safetensors and config.json."})
    seed: int = 0
    num_images: int = field(default=40_000, metadata={"help": "Rendered training images."})
    num_test_images: int = field(default=4_000, metadata={"help": "Fresh rendered images (unseen seeds) for the test accuracy."})
    steps: int = 3_000
    batch_size: int = 128
    learning_rate: float = 1e-3
    num_threads: int = 1
    log_every: int = 250


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random Gaussian blur (sigma up to 1.2 px), pixel noise (std up to 0.05) and brightness change per image."""
    n = len(images)
    sigma = torch.rand(n, generator=generator) * 1.2 + 1e-3
    offsets = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # (n, 5), one separable kernel per image
    # Blur each image with its own kernel: the batch goes into the channel axis of a grouped convolution.
    flat = images.reshape(1, n * 3, *images.shape[-2:])
    weights = kernel.repeat_interleave(3, dim=0)
    flat = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="replicate"), weights[:, None, None, :], groups=n * 3)
    flat = F.conv2d(F.pad(flat, (0, 0, 2, 2), mode="replicate"), weights[:, None, :, None], groups=n * 3)
    images = flat.reshape(images.shape)
    images = images * (1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5))
    images = images + torch.randn(images.shape, generator=generator) * 0.05 * torch.rand(n, 1, 1, 1, generator=generator)
    return images.clamp(0, 1)


def head_accuracies(classifier: ShapesClassifier, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    with torch.no_grad():
        logits = classifier(images)
    accuracies = {}
    for name in HEAD_SIZES:
        stated = labels[name] >= 0
        accuracies[name] = (logits[name].argmax(-1)[stated] == labels[name][stated]).float().mean().item()
    return accuracies


def main(args: TrainRewardArguments) -> None:
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    # Training and test images come from disjoint seed ranges.
    images, _, labels = render_batch(np.random.default_rng(args.seed).integers(2**30, size=args.num_images).tolist())
    test_seeds = (2**30 + np.random.default_rng(args.seed + 1).integers(2**30, size=args.num_test_images)).tolist()
    test_images, test_captions, test_labels = render_batch(test_seeds)
    print(f"rendered {len(images)} training and {len(test_images)} test images in {time.time() - start:.0f}s", flush=True)

    classifier = ShapesClassifier()
    print(f"classifier: {sum(p.numel() for p in classifier.parameters()):,} parameters", flush=True)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=args.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    for step in range(args.steps):
        index = torch.randint(len(images), (args.batch_size,), generator=generator)
        logits = classifier(augment(images[index], generator))
        loss = sum(F.cross_entropy(logits[name], labels[name][index], ignore_index=-1) for name in HEAD_SIZES)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if (step + 1) % args.log_every == 0:
            print(f"step {step + 1:5d}/{args.steps}  loss {loss.item():.4f}  {time.time() - start:5.0f}s", flush=True)

    classifier.eval()
    metrics = {}
    for name, batch in (("clean", test_images), ("augmented", augment(test_images, generator))):
        metrics[f"test_{name}_accuracy"] = head_accuracies(classifier, batch, test_labels)
        metrics[f"test_{name}_alignment_rate"] = is_aligned(classifier, batch, test_captions).float().mean().item()
    metrics["num_test_images"] = len(test_images)
    print(metrics, flush=True)
    classifier.save_pretrained(args.output_dir, metrics)
    print(f"saved {args.output_dir} after {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    (arguments,) = HfArgumentParser(TrainRewardArguments).parse_args_into_dataclasses()
    main(arguments)
