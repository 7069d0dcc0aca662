"""Measure how often the shapes pipeline follows its prompt, by number of sampling steps.

    python -m trl_noise_ppo.shapes.evaluate_base --num_images 256

For each prompt group (training / held-out prompts, one / two objects) it samples `num_images` prompts with
replacement and one noise tensor per image, shared by every step count, and prints a Markdown table of the
alignment rate (the classifier's argmax agrees with every attribute of the prompt) and the mean reward.
"""

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from transformers import HfArgumentParser

from . import REWARD_PATH, SHAPES_PIPELINE_PATH
from .render import all_scenes
from .reward import ShapesClassifier, alignment_scores, is_aligned


@dataclass
class EvaluateBaseArguments:
    pipeline_path: str = field(default=SHAPES_PIPELINE_PATH)
    reward_path: str = field(default=str(REWARD_PATH))
    steps: str = field(default="1,2,4,8,16", metadata={"help": "Comma-separated numbers of inference steps."})
    num_images: int = field(default=256, metadata={"help": "Images per prompt group and step count."})
    guidance_scale: float = 7.5
    batch_size: int = 256
    seed: int = 0
    num_threads: int = 1


def prompt_groups() -> dict[str, list[str]]:
    groups = {}
    for split, held_out in (("training", False), ("held-out", True)):
        for kind, num_objects in (("one object", 1), ("two objects", 2)):
            groups[f"{split}, {kind}"] = [
                scene.caption for scene in all_scenes() if scene.is_held_out == held_out and len(scene.objects) == num_objects
            ]
    return groups


def main(args: EvaluateBaseArguments) -> None:
    torch.set_num_threads(args.num_threads)
    start = time.time()
    pipeline = StableDiffusionPipeline.from_pretrained(args.pipeline_path)
    pipeline.set_progress_bar_config(disable=True)
    classifier = ShapesClassifier.from_pretrained(args.reward_path)
    steps = [int(s) for s in args.steps.split(",")]
    latent_shape = (pipeline.unet.config.in_channels, pipeline.unet.config.sample_size, pipeline.unet.config.sample_size)

    results = {}  # (group, steps) -> (alignment rate, mean reward)
    for group_index, (group, captions) in enumerate(prompt_groups().items()):
        rng = np.random.default_rng(args.seed + group_index)
        prompts = [captions[i] for i in rng.integers(len(captions), size=args.num_images)]
        noise = torch.randn((args.num_images, *latent_shape), generator=torch.Generator().manual_seed(args.seed + group_index))
        for num_steps in steps:
            aligned, scores = [], []
            for i in range(0, args.num_images, args.batch_size):
                batch_prompts = prompts[i : i + args.batch_size]
                images = pipeline(
                    batch_prompts,
                    num_inference_steps=num_steps,
                    guidance_scale=args.guidance_scale,
                    latents=noise[i : i + args.batch_size],
                    output_type="pt",
                ).images
                aligned.append(is_aligned(classifier, images, batch_prompts))
                scores.append(alignment_scores(classifier, images, batch_prompts))
            results[group, num_steps] = (torch.cat(aligned).float().mean().item(), torch.cat(scores).mean().item())
            rate, reward = results[group, num_steps]
            print(f"{group:26s} {num_steps:3d} steps: alignment {rate:.3f}  reward {reward:.3f}  ({time.time() - start:.0f}s)")

    groups = list(prompt_groups())
    print(f"\nAlignment rate (mean reward), {args.num_images} images per cell, guidance scale {args.guidance_scale}:\n")
    print("| steps | " + " | ".join(groups) + " |")
    print("|---" * (len(groups) + 1) + "|")
    for num_steps in steps:
        cells = [f"{results[g, num_steps][0]:.2f} ({results[g, num_steps][1]:.2f})" for g in groups]
        print(f"| {num_steps} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    (arguments,) = HfArgumentParser(EvaluateBaseArguments).parse_args_into_dataclasses()
    main(arguments)
