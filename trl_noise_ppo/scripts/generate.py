"""
Makes images from prompts with a trained noise generator, into a folder of PNGs.

Image j of prompt i is `{i:05d}_{j:02d}.png`, made from seed `seed + i * num_images_per_prompt + j` (the seeds
`evaluate` uses, so the same arguments reproduce its tuned images). `metadata.jsonl` gives each file's prompt and
seed; the folder loads with `datasets.load_dataset("imagefolder", data_dir=...)`.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .utils import (
    ConfigCheckingParser,
    ModelArguments,
    PromptArguments,
    default_device,
    image_seeds,
    load_prompts,
    load_tuned_pipeline,
    parse_pipeline_kwargs,
    seeded_generators,
)


@dataclass
class GenerateArguments:
    """
    Args:
        noise_generator (`str`):
            The trained noise generator: the output folder of `trl-noise-ppo train`, or its Hub id.
        prompts (`list[str]` or `None`, *optional*, defaults to `None`):
            Prompts given on the command line, instead of `--dataset_name`.
        num_images_per_prompt (`int`, *optional*, defaults to `1`):
            Images per prompt.
        num_inference_steps (`int` or `None`, *optional*, defaults to `None`):
            Denoising steps; `None` keeps the pipeline's default. Use the training value.
        guidance_scale (`float` or `None`, *optional*, defaults to `None`):
            Classifier-free guidance scale; `None` keeps the pipeline's default. Use the training value.
        height (`int` or `None`, *optional*, defaults to `None`):
            Image height; the generator only fits the resolution it was trained at.
        width (`int` or `None`, *optional*, defaults to `None`):
            Image width.
        pipeline_kwargs (`dict` or `None`, *optional*, defaults to `None`):
            Further keyword arguments of every pipeline call (a JSON object on the command line), as in training:
            use the training value.
        seed (`int`, *optional*, defaults to `0`):
            First seed; see the module docstring.
        output_dir (`str`, *optional*, defaults to `"noise_ppo_images"`):
            Where the images are written.
        device (`str` or `None`, *optional*, defaults to `None`):
            Device to run on; default CUDA when available.
    """

    noise_generator: str = field(metadata={"help": "Trained noise generator: the output folder of `train`, or a Hub id."})
    prompts: list[str] | None = field(default=None, metadata={"help": "Prompts, instead of --dataset_name."})
    num_images_per_prompt: int = field(default=1, metadata={"help": "Images per prompt."})
    num_inference_steps: int | None = field(default=None, metadata={"help": "Denoising steps; None: the pipeline's default."})
    guidance_scale: float | None = field(default=None, metadata={"help": "Guidance scale; None: the pipeline's default."})
    height: int | None = field(default=None, metadata={"help": "Image height (the one the generator was trained at)."})
    width: int | None = field(default=None, metadata={"help": "Image width."})
    pipeline_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Further keyword arguments of every pipeline call (JSON), as in training."}
    )
    seed: int = field(default=0, metadata={"help": "First seed."})
    output_dir: str = field(default="noise_ppo_images", metadata={"help": "Where the images are written."})
    device: str | None = field(default=None, metadata={"help": "Device; default CUDA when available."})

    def __post_init__(self):
        if self.num_images_per_prompt < 1 or (self.num_inference_steps is not None and self.num_inference_steps < 1):
            raise ValueError(
                f"--num_images_per_prompt (got {self.num_images_per_prompt}) and --num_inference_steps (got "
                f"{self.num_inference_steps}) must be at least 1."
            )


def make_parser(prog: str | None = None) -> ConfigCheckingParser:
    return ConfigCheckingParser((GenerateArguments, ModelArguments, PromptArguments), prog=prog)


def main(args: GenerateArguments, model_args: ModelArguments, prompt_args: PromptArguments) -> list[Path]:
    prompts = load_prompts(args.prompts, prompt_args)
    device = torch.device(args.device) if args.device else default_device()
    tuned = load_tuned_pipeline(args.noise_generator, model_args, device)
    settings = {
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "height": args.height,
        "width": args.width,
    }
    call_kwargs = {name: value for name, value in settings.items() if value is not None}  # None: the pipeline's default
    call_kwargs.update(parse_pipeline_kwargs(args.pipeline_kwargs))

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with open(output_dir / "metadata.jsonl", "w") as metadata:
        for index, prompt in enumerate(tqdm(prompts, desc="Generating", unit="prompt")):
            seeds = image_seeds(args.seed, index, args.num_images_per_prompt)
            images = tuned(
                prompt=prompt,
                num_images_per_prompt=args.num_images_per_prompt,
                generator=seeded_generators(seeds),
                output_type="pil",
                **call_kwargs,
            )[0]  # the images, whatever the output calls them (Kandinsky 5: `image`)
            for number, (image, seed) in enumerate(zip(images, seeds, strict=True)):
                path = output_dir / f"{index:05d}_{number:02d}.png"
                image.save(path)
                metadata.write(json.dumps({"file_name": path.name, "prompt": prompt, "seed": seed}) + "\n")
                paths.append(path)
    print(f"Wrote {len(paths)} images to {output_dir}.")
    return paths


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
