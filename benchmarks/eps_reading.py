"""
What a generator that reads eps (`generator_reads_eps=True`) learns, and why it learns little, in the shapes world:

- `--part groups`: the share of prompt groups whose 8 judge outcomes are all equal (no advantage, nothing learned),
  for 8 fresh eps per prompt (the prompt-only policy's groups) and for 8 draws around one eps at each
  `--exploration_stds` (the eps-reading policy's groups, rescaled to the shell), on `--num_prompts` training prompts.
- `--part offsets`: for each saved eps-reading generator, its offset f(eps, c) on 32 held-out prompts x 64 eps: RMS,
  the part shared over eps and the part that varies with it; the cosine of its mean template with `--reference`'s
  mean (a prompt-only generator), and of each prompt's template with their mean.

    python -m benchmarks.eps_reading --part groups
    python -m benchmarks.eps_reading --part offsets --reference <a prompt-only generator> --generators <eps-reading ones>
"""

from dataclasses import dataclass, field

import torch
from trl import TrlParser

from trl_noise_ppo import NoiseGenerator
from trl_noise_ppo.noise_injection import generator_inputs, prompt_conditioning
from trl_noise_ppo.rewards import resolve_reward_funcs
from trl_noise_ppo.shapes import RECOMMENDED_GUIDANCE_SCALES, balanced_prompts, load_shapes_pipeline


@dataclass
class EpsReadingArguments:
    part: str = field(default="groups", metadata={"help": "groups or offsets"})
    num_prompts: int = 256
    exploration_stds: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    reference: str | None = None
    generators: list[str] = field(default_factory=list)


def on_shell(noise: torch.Tensor) -> torch.Tensor:
    return noise * (noise[0].numel() ** 0.5 / noise.flatten(1).norm(dim=1)).view(-1, *[1] * (noise.ndim - 1))


@torch.no_grad()
def groups(args: EpsReadingArguments, pipe) -> None:
    judge = resolve_reward_funcs("shapes_judge")[0]
    prompts = list(dict.fromkeys(balanced_prompts("training", 1024)))[: args.num_prompts]
    repeated = [prompt for prompt in prompts for _ in range(8)]
    generator = torch.Generator().manual_seed(0)

    def report(name: str, noise: torch.Tensor) -> None:
        images = pipe(repeated, latents=noise, num_inference_steps=1, guidance_scale=RECOMMENDED_GUIDANCE_SCALES[1],
                      output_type="pt").images
        outcomes = torch.tensor(judge(images=images, prompts=repeated)).view(-1, 8)
        all_equal = ((outcomes.sum(1) == 0) | (outcomes.sum(1) == 8)).float().mean()
        print(f"| {name} | {all_equal:.3f} | {outcomes.float().mean():.3f} |", flush=True)

    print("| a prompt's 8 noises | share of groups with all 8 outcomes equal | judge |\n|---|---|---|")
    report("8 fresh eps", torch.randn(len(repeated), 4, 8, 8, generator=generator))
    for std in args.exploration_stds:
        eps = torch.randn(len(prompts), 4, 8, 8, generator=generator).repeat_interleave(8, dim=0)
        report(f"8 draws around one eps, std {std}, on the shell", on_shell(eps + std * torch.randn(eps.shape, generator=generator)))


@torch.no_grad()
def offsets(args: EpsReadingArguments, pipe) -> None:
    prompts = list(dict.fromkeys(balanced_prompts("held-out", 512)))[:32]
    embeds = generator_inputs(prompt_conditioning(pipe, [{"prompt": prompt} for prompt in prompts]))
    eps = torch.randn(len(prompts) * 64, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    template = NoiseGenerator.from_pretrained(args.reference).eval()(**embeds).mean.mean(0).flatten()
    print("| generator | offset RMS | shared over eps | varying with eps | cosine with the reference's mean | prompts' templates to their mean |")
    print("|---|---|---|---|---|---|")
    for folder in args.generators:
        offset = NoiseGenerator.from_pretrained(folder).eval()(**embeds, eps=eps).offset().view(len(prompts), 64, -1)
        shared = offset.mean(dim=1)
        rms = lambda values: values.pow(2).mean().sqrt().item()  # noqa: E731
        cosine = torch.nn.functional.cosine_similarity
        print(f"| {folder} | {rms(offset):.2f} | {rms(shared):.2f} | {rms(offset - shared[:, None]):.2f} | "
              f"{cosine(shared.mean(0), template, dim=0):.2f} | {cosine(shared, shared.mean(0, keepdim=True)).mean():.2f} |")


def main() -> None:
    (args,) = TrlParser(EpsReadingArguments).parse_args_and_config()
    pipe = load_shapes_pipeline()
    {"groups": groups, "offsets": offsets}[args.part](args, pipe)


if __name__ == "__main__":
    main()
