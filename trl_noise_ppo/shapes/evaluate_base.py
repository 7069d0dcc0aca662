"""Measure how often the shapes pipeline follows its prompt, by steps and guidance scale, as the judge sees it.

    python -m trl_noise_ppo.shapes.evaluate_base --output_dir outputs/evaluate_base

For each step count and guidance scale it samples `num_images` category-balanced training prompts and as many
held-out ones (`balanced_prompts`), one noise tensor per image shared by every setting, and scores every image with the
analytic judge (`ShapesJudge`) and the learned reward's classifier (alignment rate: its argmax agrees with every
stated attribute). The best guidance scale for a step count is the one whose *training-prompt* judge score is highest,
so that the held-out figures at that setting are not selected on themselves. Prints Markdown tables and writes
`evaluate_base.json`.
"""

import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from diffusers import StableDiffusionPipeline
from transformers import HfArgumentParser

from . import REWARD_PATH, SHAPES_PIPELINE_PATH
from .judge import ShapesJudge
from .render import KINDS, balanced_prompts, parse_caption
from .reward import ShapesClassifier, is_aligned


@dataclass
class EvaluateBaseArguments:
    pipeline_path: str = field(default=SHAPES_PIPELINE_PATH)
    reward_path: str = field(default=str(REWARD_PATH))
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16], metadata={"help": "Numbers of inference steps."})
    guidance_scales: list[float] = field(default_factory=lambda: [1.0, 1.5, 2.0, 3.0, 5.0, 7.5])
    num_images: int = field(default=256, metadata={"help": "Images per prompt split and setting."})
    batch_size: int = 256
    seed: int = 0
    num_threads: int = 1
    output_dir: str = "outputs/evaluate_base"


def main(args: EvaluateBaseArguments) -> dict:
    torch.set_num_threads(args.num_threads)
    start = time.time()
    pipeline = StableDiffusionPipeline.from_pretrained(args.pipeline_path)
    pipeline.set_progress_bar_config(disable=True)
    classifier, judge = ShapesClassifier.from_pretrained(args.reward_path), ShapesJudge()
    latent_shape = (pipeline.unet.config.in_channels, pipeline.unet.config.sample_size, pipeline.unet.config.sample_size)
    splits = {split: balanced_prompts(split, args.num_images) for split in ("training", "held-out")}
    noise = torch.randn((args.num_images, *latent_shape), generator=torch.Generator().manual_seed(args.seed))

    cells = []
    for steps in args.steps:
        for guidance_scale in args.guidance_scales:
            cell = {"steps": steps, "guidance_scale": guidance_scale}
            for split, prompts in splits.items():
                judged, aligned = [], []
                for i in range(0, args.num_images, args.batch_size):
                    batch = prompts[i : i + args.batch_size]
                    images = pipeline(
                        batch, num_inference_steps=steps, guidance_scale=guidance_scale,
                        latents=noise[i : i + args.batch_size], output_type="pt",
                    ).images
                    judged += judge(images=images, prompts=batch)
                    aligned += is_aligned(classifier, images, batch).float().tolist()
                kinds = [parse_caption(prompt).kind for prompt in prompts]
                cell[split] = {
                    "judge": sum(judged) / len(judged),
                    "classifier": sum(aligned) / len(aligned),
                    "judge_by_kind": {k: sum(j for j, kind in zip(judged, kinds) if kind == k) / kinds.count(k) for k in KINDS},
                }
            cells.append(cell)
            print(
                f"{steps:3d} steps, guidance {guidance_scale:4.1f}: judge training {cell['training']['judge']:.3f} "
                f"held-out {cell['held-out']['judge']:.3f}, classifier held-out {cell['held-out']['classifier']:.3f} "
                f"({time.time() - start:.0f}s)",
                flush=True,
            )

    best = {steps: max((c for c in cells if c["steps"] == steps), key=lambda c: c["training"]["judge"]) for steps in args.steps}
    lines = [
        f"Judge-correct share of {args.num_images} held-out images (category-balanced), by steps and guidance scale "
        "(classifier's alignment rate in brackets); **bold**: the best guidance by the training-prompt judge score.",
        "",
        "| steps | " + " | ".join(f"guidance {g:g}" for g in args.guidance_scales) + " |",
        "|---" * (len(args.guidance_scales) + 1) + "|",
    ]
    for steps in args.steps:
        row = []
        for cell in (c for c in cells if c["steps"] == steps):
            text = f"{cell['held-out']['judge']:.2f} ({cell['held-out']['classifier']:.2f})"
            row.append(f"**{text}**" if cell is best[steps] else text)
        lines.append(f"| {steps} | " + " | ".join(row) + " |")
    lines += [
        "",
        "At the best guidance scale: held-out judge-correct share by kind of prompt, and the share the judge finds wrong.",
        "",
        "| steps | best guidance | " + " | ".join(KINDS) + " | all | wrong |",
        "|---" * (len(KINDS) + 4) + "|",
    ]
    for steps, cell in best.items():
        by_kind = " | ".join(f"{cell['held-out']['judge_by_kind'][k]:.2f}" for k in KINDS)
        judge_rate = cell["held-out"]["judge"]
        lines.append(f"| {steps} | {cell['guidance_scale']:g} | {by_kind} | {judge_rate:.2f} | {1 - judge_rate:.2f} |")
    table = "\n".join(lines)
    print("\n" + table)
    os.makedirs(args.output_dir, exist_ok=True)
    report = {"arguments": asdict(args), "cells": cells, "best_guidance_scale": {s: c["guidance_scale"] for s, c in best.items()}}
    with open(os.path.join(args.output_dir, "evaluate_base.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    (arguments,) = HfArgumentParser(EvaluateBaseArguments).parse_args_into_dataclasses()
    main(arguments)
