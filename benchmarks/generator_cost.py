"""Size and speed of each noise generator architecture at real noise sizes, against one denoising step.

For Stable Diffusion 1.5 (noise 4 x 64 x 64 at 512 px, prompt embeddings 77 x 768) and SDXL (noise 4 x 128 x 128 at
1024 px, prompt embeddings 77 x 2048 and a pooled 1280), it builds each generator architecture and the pipeline's UNet
from its published configuration (random weights, nothing downloaded), and times one generator forward pass and one
UNet call (one denoising step without classifier-free guidance), batch 1, float32, on this machine. Run:

    python -m benchmarks.generator_cost                 # both sizes, every architecture
    python -m benchmarks.generator_cost --sizes sd15    # SD 1.5 only (the SDXL UNet needs about 11 GB of memory)
"""

import statistics
import time
from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel
from trl import TrlParser

from trl_noise_ppo import NoiseGenerator, NoiseGeneratorConfig
from trl_noise_ppo.noise_generator import GRID_ENCODERS


# The UNet configurations of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0.
UNETS = {
    "sd15": dict(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    "sdxl": dict(
        sample_size=128,
        cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20),
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}
EMBEDDINGS = {"sd15": (768, None), "sdxl": (2048, 1280)}


@dataclass
class CostArguments:
    sizes: list[str] = field(default_factory=lambda: ["sd15", "sdxl"], metadata={"help": "sd15 and/or sdxl"})
    repeats: int = field(default=3, metadata={"help": "timed calls of each model (median reported)"})


def median_seconds(call, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def unet_step_seconds(size: str, prompt: dict, repeats: int) -> float:
    """One UNet call at the size's resolution; the UNet is freed on return (SDXL's takes about 11 GB)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNETS[size]).eval()
    resolution = UNETS[size]["sample_size"]
    inputs = {
        "sample": torch.randn(1, 4, resolution, resolution),
        "timestep": torch.tensor([999]),
        "encoder_hidden_states": prompt["prompt_embeds"],
    }
    if "pooled_prompt_embeds" in prompt:
        inputs["added_cond_kwargs"] = {"text_embeds": prompt["pooled_prompt_embeds"], "time_ids": torch.zeros(1, 6)}
    return median_seconds(lambda: unet(**inputs), repeats)


@torch.no_grad()
def main(args: CostArguments):
    print(f"{torch.get_num_threads()} threads, float32, batch 1")
    print("| pipeline | noise | architecture | parameters | generator forward | one UNet step | ratio |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        token_dim, pooled_dim = EMBEDDINGS[size]
        resolution = UNETS[size]["sample_size"]
        prompt = {"prompt_embeds": torch.randn(1, 77, token_dim)}
        if pooled_dim:
            prompt["pooled_prompt_embeds"] = torch.randn(1, pooled_dim)

        unet_seconds = unet_step_seconds(size, prompt, args.repeats)

        for architecture in GRID_ENCODERS:
            generator = NoiseGenerator(
                NoiseGeneratorConfig(
                    architecture=architecture,
                    noise_shape=[4, resolution, resolution],
                    prompt_embeds_dim=token_dim,
                    pooled_prompt_embeds_dim=pooled_dim,
                )
            ).eval()
            if architecture == "prompt_clusters":  # centroids on stand-in prompts, as a trainer fits them on its own
                generator.grid_encoder.fit(torch.randn(generator.config.num_clusters, token_dim + (pooled_dim or 0)))
            generator_seconds = median_seconds(lambda: generator(**prompt), args.repeats)
            print(
                f"| {size} | 4x{resolution}x{resolution} | {architecture} | {generator.num_parameters() / 1e6:.2f}M | "
                f"{1000 * generator_seconds:.1f} ms | {unet_seconds:.2f} s | {100 * generator_seconds / unet_seconds:.2f}% |"
            )


if __name__ == "__main__":
    (cost_args,) = TrlParser(CostArguments).parse_args_and_config()
    main(cost_args)
