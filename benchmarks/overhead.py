"""What Noise PPO costs on top of the work it cannot avoid.

1. Training: the time of one generation cycle of `NoisePPOTrainer` (sample the noise, run the frozen pipeline, score,
   then `num_iterations` PPO updates of the generator) divided by the time to sample the same images with the bare
   pipeline and score them. Bare cycles run interleaved with the trainer's (from a callback), so that load on the
   machine weighs on both alike.
2. Inference: the time of a `NoisePPOPipeline` call divided by that of the bare pipeline's, same prompts and steps.

The pipeline is a Stable Diffusion pipeline built locally with random weights, large enough that one call takes
seconds on a CPU (sizes below); no download. Run from the repository root, on an otherwise idle machine:

    python -m benchmarks.overhead            # prints both figures
"""

import statistics
import time
from dataclasses import dataclass

import torch
from datasets import Dataset
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, TrainerCallback

from tests.tiny_pipelines import _clip_tokenizer
from trl_noise_ppo import NoisePPOConfig, NoisePPOPipeline, NoisePPOTrainer
from trl import TrlParser


@dataclass
class BenchmarkArguments:
    image_size: int = 128
    num_inference_steps: int = 2
    num_prompts: int = 2
    num_generations: int = 4
    num_iterations: int = 4
    cycles: int = 4
    inference_repeats: int = 5
    threads: int = 2


def build_pipeline(image_size: int) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128, 256),
        layers_per_block=2,
        sample_size=image_size // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=256,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(64, 128, 128),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=4, vocab_size=1000)
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(),
        scheduler=DDIMScheduler(timestep_spacing="trailing"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def brightness(images, **kwargs):
    return images.mean(dim=(1, 2, 3)).tolist()


class InterleavedBareCycles(TrainerCallback):
    """After each generation cycle of the trainer, samples and scores the same number of images with the bare
    pipeline, and keeps both durations."""

    def __init__(self, pipe, prompts, args: BenchmarkArguments):
        self.pipe, self.prompts, self.args = pipe, prompts, args
        self.cycle_times, self.bare_times = [], []
        self._cycle_start = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % self.args.num_iterations == 0:
            self._cycle_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.args.num_iterations != 0:
            return
        self.cycle_times.append(time.perf_counter() - self._cycle_start)
        start = time.perf_counter()
        images = self.pipe(self.prompts, num_images_per_prompt=self.args.num_generations,
                           num_inference_steps=self.args.num_inference_steps, output_type="pt").images
        brightness(images)
        self.bare_times.append(time.perf_counter() - start)


def main(args: BenchmarkArguments):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pipe = build_pipeline(args.image_size)
    prompts = [f"prompt number {i}" for i in range(args.num_prompts)]
    images_per_cycle = args.num_prompts * args.num_generations
    print(f"pipeline: UNet {pipe.unet.num_parameters() / 1e6:.1f}M, VAE {pipe.vae.num_parameters() / 1e6:.1f}M, "
          f"text encoder {pipe.text_encoder.num_parameters() / 1e6:.1f}M parameters; {args.image_size} px, "
          f"{args.num_inference_steps} steps, {images_per_cycle} images per cycle, {torch.get_num_threads()} threads")

    config = NoisePPOConfig(
        output_dir="/tmp/noise-ppo-overhead", num_inference_steps=args.num_inference_steps,
        num_generations=args.num_generations, per_device_train_batch_size=images_per_cycle,
        num_iterations=args.num_iterations, max_steps=args.num_iterations * (args.cycles + 1),
        save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=args.num_iterations,
    )
    bare = InterleavedBareCycles(pipe, prompts, args)
    trainer = NoisePPOTrainer(pipe, brightness, args=config, train_dataset=Dataset.from_dict({"prompt": prompts}),
                              callbacks=[bare])
    trainer.train()
    # the first cycle warms both up
    cycle, bare_cycle = statistics.median(bare.cycle_times[1:]), statistics.median(bare.bare_times[1:])
    print(f"training: {cycle:.3f} s per generation cycle (1 sampling + {args.num_iterations} PPO updates) vs "
          f"{bare_cycle:.3f} s to sample and score the same {images_per_cycle} images: ratio {cycle / bare_cycle:.3f}")

    tuned = NoisePPOPipeline(pipe, trainer.model)
    call = dict(num_images_per_prompt=args.num_generations, num_inference_steps=args.num_inference_steps, output_type="pt")
    tuned(prompts, **call)  # warm-up, and the one-off noise-shape discovery
    bare_times, tuned_times = [], []
    for _ in range(args.inference_repeats):
        for pipeline, times in ((pipe, bare_times), (tuned, tuned_times)):
            start = time.perf_counter()
            pipeline(prompts, **call)
            times.append(time.perf_counter() - start)
    bare_call, tuned_call = statistics.median(bare_times), statistics.median(tuned_times)
    print(f"inference: NoisePPOPipeline {tuned_call:.3f} s vs bare pipeline {bare_call:.3f} s per call "
          f"(median of {args.inference_repeats}): overhead {100 * (tuned_call / bare_call - 1):+.2f}%")
    generator = trainer.model
    print(f"noise generator: {generator.num_parameters() / 1e6:.2f}M parameters for noise {generator.config.noise_shape}")


if __name__ == "__main__":
    (benchmark_args,) = TrlParser(BenchmarkArguments).parse_args_and_config()
    main(benchmark_args)
