"""What a trained generator costs in variety: for each held-out prompt, several images from the base pipeline and from
the generator (the same torch.Generator seed, so the same eps), judged, and how far apart a prompt's images are from
each other (mean pairwise RMS distance of their pixels in [0, 1], and the share of pairs that differ by more than 0.05).
Beside them, the base pipeline with its noise scaled down (`--noise_scales`): the lower temperature a user could pick
instead, which also trades variety for the images the model draws most surely.

    python -m benchmarks.diversity --generators outputs/curves/budget-default-shapes_judge-1-steps-seed-0 --noise_scales 0.6 0.3
"""

import itertools
from dataclasses import dataclass, field

import torch
from trl import TrlParser

from trl_noise_ppo import NoiseGenerator, NoisePPOPipeline
from trl_noise_ppo.evaluation import interval
from trl_noise_ppo.shapes import RECOMMENDED_GUIDANCE_SCALES, ShapesJudge, balanced_prompts, load_shapes_pipeline, parse_caption


@dataclass
class DiversityArguments:
    generators: list[str] = field(default_factory=list, metadata={"help": "Folders of saved noise generators."})
    steps: int = 1
    num_prompts: int = 64
    images_per_prompt: int = 8
    seed: int = 0
    distinct_above: float = 0.05
    noise_scales: list[float] = field(default_factory=list, metadata={"help": "Base pipeline with eps scaled by these."})


def describe(name: str, images: torch.Tensor, prompts: list[str], judge, args: DiversityArguments) -> None:
    per_prompt = args.images_per_prompt
    verdicts = judge(images=images, prompts=[prompt for prompt in prompts for _ in range(per_prompt)])
    distances, distinct = [], []  # per prompt: mean pairwise distance of its images, share of pairs apart
    for start in range(0, len(images), per_prompt):
        pairs = [(a - b).pow(2).mean().sqrt().item() for a, b in itertools.combinations(images[start : start + per_prompt], 2)]
        distances.append(sum(pairs) / len(pairs))
        distinct.append(sum(d > args.distinct_above for d in pairs) / len(pairs))
    cells = [interval(values) for values in (verdicts, distances, distinct)]
    kinds = [parse_caption(prompt).kind for prompt in prompts for _ in range(per_prompt)]
    by_kind = {kind: sum(v for v, k in zip(verdicts, kinds) if k == kind) / kinds.count(kind) for kind in dict.fromkeys(kinds)}
    print(f"| {name} | " + " | ".join(f"{c['mean']:.3f} ± {c['ci95'][1] - c['mean']:.3f}" for c in cells) + " | "
          + ", ".join(f"{kind} {value:.2f}" for kind, value in by_kind.items()) + " |", flush=True)


def main(args: DiversityArguments) -> None:
    pipe = load_shapes_pipeline()
    pipe.set_progress_bar_config(disable=True)
    judge = ShapesJudge()
    prompts = balanced_prompts("held-out", args.num_prompts)
    call = {"num_inference_steps": args.steps, "guidance_scale": RECOMMENDED_GUIDANCE_SCALES[args.steps],
            "num_images_per_prompt": args.images_per_prompt, "output_type": "pt"}
    print(f"{args.num_prompts} held-out prompts x {args.images_per_prompt} images, {args.steps} step(s); ± 95% "
          "intervals over images (judge) and prompts\n\n| noise | judge | pairwise RMS distance | share of pairs apart | judge by kind |\n|---|---|---|---|---|")
    # the base pipeline's rows get the eps it would draw from the same seed itself, scaled
    shape = (len(prompts) * args.images_per_prompt, pipe.unet.config.in_channels, *[pipe.unet.config.sample_size] * 2)
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    for scale in [1.0, *args.noise_scales]:
        describe(f"N(0, {scale:g}^2 I), base", pipe(prompts, latents=scale * eps, **call).images, prompts, judge, args)
    for path in args.generators:
        pipeline = NoisePPOPipeline(pipe, NoiseGenerator.from_pretrained(path))
        describe(path, pipeline(prompts, generator=torch.Generator().manual_seed(args.seed), **call).images, prompts, judge, args)


if __name__ == "__main__":
    (diversity_args,) = TrlParser(DiversityArguments).parse_args_and_config()
    main(diversity_args)
