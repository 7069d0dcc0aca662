"""The base model with its initial noise scaled down, judged: the 'lower temperature' a user could pick instead of
training a generator. A learned sigma below 1 gains partly by shrinking the noise; this measures how much of a gain
that alone buys, on the same prompts and noise as `benchmarks/findings.py`, paired with scale 1.

    python -m benchmarks.noise_scale --pipeline_path outputs/shapes-turbo --steps 1 --guidance_scale 1 --scales 0.9 0.78 0.6
"""

from dataclasses import dataclass, field

import torch
from diffusers import StableDiffusionPipeline
from trl import TrlParser

from trl_noise_ppo.evaluation import interval
from trl_noise_ppo.shapes import SHAPES_PIPELINE_PATH, ShapesJudge, balanced_prompts


@dataclass
class NoiseScaleArguments:
    pipeline_path: str = SHAPES_PIPELINE_PATH
    steps: int = 1
    guidance_scale: float = 1.5
    scales: list[float] = field(default_factory=lambda: [0.9, 0.8, 0.6], metadata={"help": "Factors on the noise."})
    images_per_set: int = 2048
    batch_size: int = 512
    seed: int = 0


def main(args: NoiseScaleArguments) -> None:
    pipeline = StableDiffusionPipeline.from_pretrained(args.pipeline_path)
    pipeline.set_progress_bar_config(disable=True)
    judge = ShapesJudge()
    latent_shape = (pipeline.unet.config.in_channels, pipeline.unet.config.sample_size, pipeline.unet.config.sample_size)
    print("| prompts | noise scale | judge | judge gain over scale 1 (95% interval) |\n|---|---|---|---|")
    for split in ("held-out", "training"):
        prompts = balanced_prompts(split, args.images_per_set)
        # benchmarks/findings.py's evaluation noise: its first draw from a generator seeded with seed + 1.
        eps = torch.randn(len(prompts), *latent_shape, generator=torch.Generator().manual_seed(args.seed + 1))
        verdicts = {}
        for scale in [1.0, *args.scales]:
            judged = []
            for i in range(0, len(prompts), args.batch_size):
                batch = prompts[i : i + args.batch_size]
                images = pipeline(batch, latents=scale * eps[i : i + args.batch_size], num_inference_steps=args.steps,
                                  guidance_scale=args.guidance_scale, output_type="pt").images
                judged += judge(images=images, prompts=batch)
            verdicts[scale] = torch.tensor(judged)
            gain = interval((verdicts[scale] - verdicts[1.0]).tolist())
            print(f"| {split} | {scale:g} | {verdicts[scale].mean():.3f} | {gain['mean']:+.3f} "
                  f"({gain['ci95'][0]:+.3f}, {gain['ci95'][1]:+.3f}) |", flush=True)


if __name__ == "__main__":
    (noise_scale_args,) = TrlParser(NoiseScaleArguments).parse_args_and_config()
    main(noise_scale_args)
