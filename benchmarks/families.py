"""For every family of the test suite: the noise shape Noise PPO discovers at 64 x 64, the embeddings its generator
reads, and whether an untrained generator reproduces the base pipeline's image exactly for the same seed (the same
`torch.Generator`) and for the same `latents`; then the pipelines refused at construction, with their message. Tiny
offline pipelines of each architecture (tests/tiny_pipelines.py). Run from the repository root; docs/pipelines.md holds
its output:

    python -m benchmarks.families
"""

import diffusers
import torch

from tests.tiny_pipelines import DEFAULT_SIZE, FAMILIES, PROMPT_CALL_KWARGS, build_pipeline
from trl_noise_ppo import NoiseGenerator, NoisePPOPipeline
from trl_noise_ppo.noise_injection import (
    check_pipeline_takes_noise,
    discover_noise_spec,
    generator_config_for,
    pipeline_arguments,
    prompt_conditioning,
)


REFUSED = [
    "DDPMPipeline", "DDIMPipeline", "IFPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
    "KandinskyV22CombinedPipeline", "WanPipeline", "LattePipeline", "WuerstchenPriorPipeline",
    "StableCascadePriorPipeline", "StableCascadeDecoderPipeline", "StableCascadeCombinedPipeline", "AmusedPipeline",
    "LDMTextToImagePipeline", "OmniGenPipeline",
]


def main():
    print("| family | pipeline class | call arguments | `latents` shape, batch 1 | layout | generator reads | exact for seed | exact for latents |")
    print("|---|---|---|---|---|---|---|---|")
    for family in FAMILIES:
        pipe = build_pipeline(family)
        height, width = DEFAULT_SIZE[family]
        extra = PROMPT_CALL_KWARGS.get(family, {})
        embeddings = {name: value for name, value in extra.items() if name.endswith("image_embeds")}
        example = {"prompt": "a red circle", **{name: value[0].tolist() for name, value in embeddings.items()}}
        embeds = prompt_conditioning(pipe, [example])
        call = {"num_inference_steps": 2, "output_type": "pt", "height": height, "width": width, **extra}
        spec = discover_noise_spec(pipe, {**call, **pipeline_arguments(pipe, embeds)})
        config = generator_config_for(pipe, spec, embeds)
        reads = [f"tokens ({config.prompt_embeds_dim})"] if config.prompt_embeds_dim else []
        reads += [f"pooled ({config.pooled_prompt_embeds_dim})"] if config.pooled_prompt_embeds_dim else []
        layout = f"packed, {spec.token_grid[0]}x{spec.token_grid[1]} patches" if spec.token_grid else "image"
        shown = {name: value for name, value in extra.items() if name not in embeddings}
        shown = ", ".join(f"{name}={'<image>' if name == 'image' else value}" for name, value in shown.items())

        prompt = {} if embeddings else {"prompt": "a red circle"}
        tuned = NoisePPOPipeline(pipe, NoiseGenerator(config))
        exact = []
        for noise in ({}, {"latents": torch.randn(1, *spec.shape, generator=torch.Generator().manual_seed(0))}):
            base = pipe(**prompt, **call, **noise, generator=torch.Generator().manual_seed(1)).images
            same = tuned(**prompt, **call, **noise, generator=torch.Generator().manual_seed(1)).images
            exact.append("yes" if torch.equal(base, same) else f"NO (max diff {(base - same).abs().max():.2g})")
        print(f"| {family} | {type(pipe).__name__} | {shown} | {list((1, *spec.shape))} | {layout} | {', '.join(reads)} "
              f"| {exact[0]} | {exact[1]} |")

    print()
    print("| pipeline class | refused at construction with |")
    print("|---|---|")
    for name in REFUSED:
        try:
            check_pipeline_takes_noise(object.__new__(getattr(diffusers, name)))
            message = "NOT REFUSED"
        except ValueError as error:
            message = str(error).replace("|", "\\|")
        print(f"| {name} | {message} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
