"""The shapes world: a text-to-image world small enough for a CPU.

A procedural renderer of 32 x 32 scenes of coloured shapes with captions, a tiny Stable Diffusion pipeline trained
on them (bundled, loads offline), a classifier-based reward for how well an image shows its prompt, and a fixed
split of the prompts into those Noise PPO may train on and those held out. See docs/shapes_world.md.

Example:
    >>> from trl_noise_ppo.shapes import ShapesAlignmentReward, load_shapes_pipeline, training_prompts
    >>> pipeline = load_shapes_pipeline()
    >>> prompts = training_prompts()[:2]
    >>> images = pipeline(prompts, num_inference_steps=1, output_type="pt").images  # (2, 3, 32, 32) in [0, 1]
    >>> scores = ShapesAlignmentReward()(images=images, prompts=prompts)
"""

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .judge import ShapesJudge
from .render import balanced_prompts, held_out_prompts, parse_caption, render_example, training_prompts
from .reward import REWARD_PATH, ShapesAlignmentReward, ShapesClassifier, alignment_rate

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

SHAPES_PIPELINE_PATH = str(Path(__file__).parent / "weights" / "pipeline")
# The guidance scale at which the bundled model follows its training prompts best (judge-correct share), by steps,
# as measured by `python -m trl_noise_ppo.shapes.evaluate_base` (docs/shapes_world.md); use it for a fair base.
RECOMMENDED_GUIDANCE_SCALES = {1: 1.0, 2: 1.5, 4: 1.5, 8: 2.0, 16: 3.0}


def load_shapes_pipeline(
    device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> "StableDiffusionPipeline":
    """The bundled shapes-world `StableDiffusionPipeline` (32 x 32 images, 4 x 8 x 8 latents), loaded offline."""
    # Imported here: diffusers' Stable Diffusion module imports transformers' CLIPImageProcessor, which without
    # torchvision logs a warning; importing the shapes world should print nothing.
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(SHAPES_PIPELINE_PATH, dtype=dtype or torch.float32)
    return pipeline.to(device) if device is not None else pipeline


__all__ = [
    "RECOMMENDED_GUIDANCE_SCALES",
    "REWARD_PATH",
    "SHAPES_PIPELINE_PATH",
    "ShapesAlignmentReward",
    "ShapesClassifier",
    "ShapesJudge",
    "alignment_rate",
    "balanced_prompts",
    "held_out_prompts",
    "load_shapes_pipeline",
    "parse_caption",
    "render_example",
    "training_prompts",
]
