"""How often the analytic judge (`ShapesJudge`) is right about rendered scenes, clean and degraded, by kind of prompt.

A rendered scene always shows its caption, so the judge should accept it; the same image with another scene's caption
never does, so the judge should reject it. Degradations imitate what a small VAE and sampler do to an image: Gaussian
blur, pixel noise, a colour shift, and all three with the reward classifier's training augmentation.

    python -m benchmarks.judge_accuracy --num_images 800
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from trl import TrlParser

from trl_noise_ppo.shapes.judge import ShapesJudge
from trl_noise_ppo.shapes.render import KINDS, balanced_prompts, parse_caption, render_batch
from trl_noise_ppo.shapes.train_reward import augment


@dataclass
class JudgeAccuracyArguments:
    num_images: int = 800
    seed: int = 0


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    offsets = torch.arange(-3, 4, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).repeat(3, 1)
    padded = F.pad(images, (3, 3, 3, 3), mode="replicate")
    blurred = F.conv2d(padded, kernel[:, None, None, :], groups=3)
    return F.conv2d(blurred, kernel[:, None, :, None], groups=3)


def main(args: JudgeAccuracyArguments) -> None:
    generator = torch.Generator().manual_seed(args.seed)
    prompts = balanced_prompts("training", args.num_images // 2) + balanced_prompts("held-out", args.num_images // 2)
    seeds = torch.randint(2**30, (len(prompts),), generator=generator).tolist()
    images, captions, _ = render_batch(seeds, [parse_caption(p) for p in prompts])
    kinds = [parse_caption(caption).kind for caption in captions]
    shift = (torch.rand(len(images), 3, 1, 1, generator=generator) - 0.5) * 0.2
    conditions = {
        "clean": images,
        "blur sigma 0.5 px": gaussian_blur(images, 0.5),
        "blur sigma 1.0 px": gaussian_blur(images, 1.0),
        "noise std 0.05": (images + 0.05 * torch.randn(images.shape, generator=generator)).clamp(0, 1),
        "colour shift +-0.1": (images + shift).clamp(0, 1),
        "reward's augmentation": augment(images, generator),
    }
    judge = ShapesJudge()
    print(f"{len(images)} rendered images, kinds balanced, half of them held-out captions.\n")
    print("| condition | accepts its caption: " + " | ".join(KINDS) + " | all | rejects another scene's caption |")
    print("|---" * (len(KINDS) + 3) + "|")
    for name, degraded in conditions.items():
        accepted = judge(images=degraded, prompts=captions)
        rejected = [1 - v for v in judge(images=degraded, prompts=captions[1:] + captions[:1])]
        by_kind = [sum(a for a, k in zip(accepted, kinds) if k == kind) / kinds.count(kind) for kind in KINDS]
        cells = " | ".join(f"{value:.3f}" for value in by_kind)
        print(f"| {name} | {cells} | {sum(accepted) / len(accepted):.3f} | {sum(rejected) / len(rejected):.3f} |", flush=True)


if __name__ == "__main__":
    (judge_args,) = TrlParser(JudgeAccuracyArguments).parse_args_and_config()
    main(judge_args)
