"""Distil the shapes model into a few-step one, as SD-Turbo is to Stable Diffusion: one step makes a whole image.

    python -m trl_noise_ppo.shapes.distil_base --teacher_path outputs/shapes-teacher --output_dir outputs/shapes-turbo

The bundled model (`trl_noise_ppo/shapes/weights/pipeline`) is `train_base`'s defaults distilled with these defaults.

A many-step model sampled in one step returns the average of every image its prompt allows (blurred, merged
objects); a distilled one commits to one image per noise. The student starts as a copy of the teacher and learns, at
t = 999 (where 1, 2 and 4 trailing DDIM steps all start), to predict the image the teacher makes from the same noise
and prompt in `teacher_steps` guided DDIM steps:

    x0_student(x_T, c) = sqrt(abar_T) x_T - sqrt(1 - abar_T) v_student(x_T, T, c)      -> teacher_sample(x_T, c)

while the teacher's own loss (v-prediction on rendered scenes at uniform t) keeps the later steps a denoiser, so
that 2 and 4 steps refine the first step's image. The unconditional branch is left to that loss: the student is
meant for guidance 1, without classifier-free guidance, as distilled models are used.
"""

import copy
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from transformers import HfArgumentParser

from .render import render_example
from .train_base import adamw_with_cosine_schedule, encode_latents, v_prediction_loss


@dataclass
class DistilBaseArguments:
    teacher_path: str = field(metadata={"help": "The many-step pipeline folder (train_base's output)."})
    output_dir: str = field(default="shapes-turbo", metadata={"help": "Where to save the distilled pipeline."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty --output_dir."})
    seed: int = 1
    num_targets: int = field(default=10_000, metadata={"help": "(noise, prompt, teacher image) triples."})
    teacher_steps: int = 8
    teacher_guidance_scale: float = 3.0
    num_images: int = field(default=10_000, metadata={"help": "Rendered scenes for the denoising loss."})
    steps: int = field(default=1_000, metadata={"help": "Optimiser steps of the student UNet and text encoder."})
    batch_size: int = 64
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    num_threads: int = 1
    log_every: int = 100


def teacher_samples(
    teacher: StableDiffusionPipeline, captions: list[str], noise: torch.Tensor, args: DistilBaseArguments
) -> torch.Tensor:
    """The teacher's latents (scaled, as the UNet sees them) for each (noise, caption), in batches of 500."""
    return torch.cat([
        teacher(captions[i : i + 500], latents=noise[i : i + 500], num_inference_steps=args.teacher_steps,
                guidance_scale=args.teacher_guidance_scale, output_type="latent").images
        for i in range(0, len(noise), 500)
    ])


def one_step_prediction(unet, text_encoder, scheduler, noise: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
    """x0 as one trailing DDIM step predicts it from pure noise at t = T - 1."""
    last = scheduler.config.num_train_timesteps - 1
    alpha_bar = scheduler.alphas_cumprod[last]
    v = unet(noise, torch.full((len(noise),), last), text_encoder(caption_ids)[0]).sample
    return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * v


def distil(
    teacher: StableDiffusionPipeline,
    noise: torch.Tensor,
    caption_ids: torch.Tensor,
    targets: torch.Tensor,
    latents: torch.Tensor,
    latent_caption_ids: torch.Tensor,
    args: DistilBaseArguments,
    generator: torch.Generator,
) -> StableDiffusionPipeline:
    """The student pipeline: the teacher with a UNet and text encoder trained on both losses of the module's docstring."""
    scheduler, tokenizer = teacher.scheduler, teacher.tokenizer
    max_length = tokenizer.model_max_length
    empty_ids = tokenizer("", padding="max_length", max_length=max_length, return_tensors="pt").input_ids[0]
    unet, text_encoder = copy.deepcopy(teacher.unet).train(), copy.deepcopy(teacher.text_encoder).train()
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer, schedule = adamw_with_cosine_schedule(parameters, args.learning_rate, args.steps, args.warmup_steps)
    start = time.time()
    for step in range(args.steps):
        index = torch.randint(len(noise), (args.batch_size,), generator=generator)
        x0 = one_step_prediction(unet, text_encoder, scheduler, noise[index], caption_ids[index])
        distil_loss = F.mse_loss(x0, targets[index])

        denoise_loss = v_prediction_loss(unet, text_encoder, scheduler, latents, latent_caption_ids, empty_ids,
                                         args.batch_size, args.caption_dropout, generator)

        (distil_loss + denoise_loss).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if (step + 1) % args.log_every == 0 or step == args.steps - 1:
            losses = f"distil {distil_loss.item():.4f}  denoise {denoise_loss.item():.4f}"
            print(f"step {step + 1:5d}/{args.steps}  {losses}  {time.time() - start:6.0f}s", flush=True)
    return StableDiffusionPipeline(
        vae=teacher.vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def main(args: DistilBaseArguments) -> None:
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not args.overwrite_output_dir:
        raise ValueError(
            f"--output_dir {args.output_dir} is not empty; pass another folder, or --overwrite_output_dir to replace it."
        )
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    teacher = StableDiffusionPipeline.from_pretrained(args.teacher_path)
    teacher.set_progress_bar_config(disable=True)
    tokenizer = teacher.tokenizer

    rng = np.random.default_rng(args.seed)
    examples = [render_example(int(seed)) for seed in rng.integers(2**31, size=max(args.num_targets, args.num_images))]
    captions = [caption for _, caption, _ in examples]
    latents = encode_latents(teacher.vae, torch.stack([image for image, _, _ in examples[: args.num_images]]))
    latents = latents * teacher.vae.config.scaling_factor

    unet_config = teacher.unet.config
    noise = torch.randn((args.num_targets, unet_config.in_channels, unet_config.sample_size, unet_config.sample_size),
                        generator=generator)
    targets = teacher_samples(teacher, captions[: args.num_targets], noise, args)
    print(f"{args.num_targets} teacher samples in {time.time() - start:.0f}s", flush=True)

    caption_ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
    student = distil(teacher, noise, caption_ids[: args.num_targets], targets, latents, caption_ids[: args.num_images],
                     args, generator)
    student.save_pretrained(args.output_dir, safe_serialization=True)
    print(f"saved {args.output_dir} after {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    (arguments,) = HfArgumentParser(DistilBaseArguments).parse_args_into_dataclasses()
    main(arguments)
