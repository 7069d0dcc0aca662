"""For every supported family: the noise shape Noise PPO discovers at 64 x 64, the embeddings its generator reads, and
whether an untrained generator reproduces the base pipeline's image exactly for the same eps. Tiny offline pipelines
of each architecture (tests/tiny_pipelines.py). Run from the repository root:

    python -m benchmarks.families
"""

import torch

from tests.tiny_pipelines import DEFAULT_SIZE, FAMILIES, PROMPT_CALL_KWARGS, build_pipeline
from trl_noise_ppo import NoiseGenerator, NoisePPOPipeline
from trl_noise_ppo.noise_injection import discover_noise_spec, generator_config_for, prompt_conditioning


def main():
    print("| family | pipeline class | `latents` shape, batch 1 at 64 x 64 | layout | generator reads | untrained = base |")
    print("|---|---|---|---|---|---|")
    for family in FAMILIES:
        pipe = build_pipeline(family)
        height, width = DEFAULT_SIZE[family]
        extra = PROMPT_CALL_KWARGS.get(family, {})
        example = {"prompt": "a red circle", **{name: value[0].tolist() for name, value in extra.items()}}
        embeds = prompt_conditioning(pipe, [example])
        call = {"num_inference_steps": 2, "output_type": "pt", "height": height, "width": width}
        spec = discover_noise_spec(pipe, {**call, **embeds})
        config = generator_config_for(pipe, spec, embeds)
        reads = [f"tokens ({config.prompt_embeds_dim})"] if config.prompt_embeds_dim else []
        reads += [f"pooled ({config.pooled_prompt_embeds_dim})"] if config.pooled_prompt_embeds_dim else []
        layout = f"packed, {spec.token_grid[0]}x{spec.token_grid[1]} patches" if spec.token_grid else "image"

        eps = torch.randn(1, *spec.shape, generator=torch.Generator().manual_seed(0))
        prompt = {} if extra else {"prompt": "a red circle"}
        base = pipe(**prompt, **extra, **call, latents=eps, generator=torch.Generator().manual_seed(1)).images
        tuned = NoisePPOPipeline(pipe, NoiseGenerator(config))
        same = tuned(**prompt, **extra, **call, latents=eps, generator=torch.Generator().manual_seed(1)).images
        print(f"| {family} | {type(pipe).__name__} | {list((1, *spec.shape))} | {layout} | {', '.join(reads)} | "
              f"{'yes' if torch.equal(base, same) else 'NO'} |")


if __name__ == "__main__":
    main()
