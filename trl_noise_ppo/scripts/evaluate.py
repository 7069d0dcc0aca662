"""
Compares a base pipeline with the same pipeline and a trained noise generator, on the same prompts and seeds.

Judges (`--judge_funcs`) score the same images as the rewards (`--reward_funcs`) and are reported beside them. Train
on one reward and judge with others that share nothing learned with it (for real models e.g. PickScore against
HPSv2, ImageReward and CLIPScore; in the shapes world the learned `shapes_alignment` against the analytic
`shapes_judge`): a gain the reward sees and the judges do not is reward hacking.

For every step count and prompt, both make `num_images_per_prompt` images from the same seeds (image j of prompt i
has seed `seed + i * num_images_per_prompt + j`), hence from the same initial noise eps, and every reward scores them.
Means, paired gains and their 95% intervals are computed as `trl_noise_ppo.evaluation` describes (a normal
approximation over images, paired by seed).

Writes into `output_dir`: `results.md` (a table), `results.json` (the table and every image's reward) and
`grid.png` (for each step count, a base row and a tuned row: the first image of the first `grid_prompts` prompts).
With `--update_model_card` the table also goes into the model card (README.md) of the generator's folder, and with
`--push_to_hub` that card (with the folder, or alone for a generator on the Hub) is uploaded.
"""

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from huggingface_hub import HfApi, ModelCard
from PIL import Image, ImageDraw, ImageOps
from tqdm.auto import tqdm
from trl.trainer.utils import get_callable_name

from ..evaluation import paired_result, results_table, with_card_section
from ..rewards import call_reward_funcs, check_reward_files, resolve_reward_funcs
from .utils import (
    ConfigCheckingParser,
    ModelArguments,
    PromptArguments,
    default_device,
    image_seeds,
    load_prompts,
    load_tuned_pipeline,
    parse_pipeline_kwargs,
    reward_funcs_from_names,
    seeded_generators,
)


@dataclass
class EvaluateArguments:
    """
    Args:
        noise_generator (`str`):
            The trained noise generator: the output folder of `trl-noise-ppo train`, or its Hub id.
        reward_funcs (`list[str]`):
            Rewards to score the images with: built-in names or `module.function` paths. Usually the training reward.
        judge_funcs (`list[str]` or `None`, *optional*, defaults to `None`):
            Judges: rewards that played no part in training, scored and reported the same way, marked as judges.
        prompts (`list[str]` or `None`, *optional*, defaults to `None`):
            Prompts given on the command line, instead of `--dataset_name`.
        num_inference_steps (`list[int]`, *optional*, defaults to `[1, 2, 4]`):
            Step counts to compare at.
        num_images_per_prompt (`int`, *optional*, defaults to `4`):
            Images per prompt, pipeline and step count.
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
        grid_prompts (`int`, *optional*, defaults to `8`):
            Prompts (columns) shown in `grid.png`.
        output_dir (`str`, *optional*, defaults to `"noise_ppo_evaluation"`):
            Where the results are written.
        device (`str` or `None`, *optional*, defaults to `None`):
            Device to run on; default CUDA when available.
        update_model_card (`bool`, *optional*, defaults to `False`):
            Write the results table into the model card (README.md) of the generator's folder, replacing the
            evaluation section it has.
        push_to_hub (`bool`, *optional*, defaults to `False`):
            Update the model card and upload it: a local generator's folder, card included, to `hub_model_id`; a Hub
            generator's card to its repository (or `hub_model_id`).
        hub_model_id (`str` or `None`, *optional*, defaults to `None`):
            Repository to push to; default the local folder's name (in your namespace), or the Hub generator's own.
    """

    noise_generator: str = field(metadata={"help": "Trained noise generator: the output folder of `train`, or a Hub id."})
    reward_funcs: list[str] = field(metadata={"help": "Rewards: built-in names or module.function paths."})
    judge_funcs: list[str] | None = field(
        default=None, metadata={"help": "Judges, independent of the training reward: built-in names or module.function paths."}
    )
    prompts: list[str] | None = field(default=None, metadata={"help": "Prompts, instead of --dataset_name."})
    num_inference_steps: list[int] = field(default_factory=lambda: [1, 2, 4], metadata={"help": "Step counts to compare at."})
    num_images_per_prompt: int = field(default=4, metadata={"help": "Images per prompt, pipeline and step count."})
    guidance_scale: float | None = field(default=None, metadata={"help": "Guidance scale; None: the pipeline's default."})
    height: int | None = field(default=None, metadata={"help": "Image height (the one the generator was trained at)."})
    width: int | None = field(default=None, metadata={"help": "Image width."})
    pipeline_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Further keyword arguments of every pipeline call (JSON), as in training."}
    )
    seed: int = field(default=0, metadata={"help": "First seed."})
    grid_prompts: int = field(default=8, metadata={"help": "Prompts shown in grid.png."})
    output_dir: str = field(default="noise_ppo_evaluation", metadata={"help": "Where the results are written."})
    device: str | None = field(default=None, metadata={"help": "Device; default CUDA when available."})
    update_model_card: bool = field(
        default=False, metadata={"help": "Write the results table into the model card (README.md) of the generator's folder."}
    )
    push_to_hub: bool = field(
        default=False, metadata={"help": "Update the generator's model card with the results and upload it to the Hub."}
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Repository to push to; default the folder's name, or the Hub generator's own."}
    )

    def __post_init__(self):
        if min(self.num_inference_steps, default=0) < 1 or self.num_images_per_prompt < 1:
            raise ValueError(
                f"--num_inference_steps (got {self.num_inference_steps}) takes step counts of at least 1 and "
                f"--num_images_per_prompt (got {self.num_images_per_prompt}) must be at least 1."
            )


def make_parser(prog: str | None = None) -> ConfigCheckingParser:
    return ConfigCheckingParser((EvaluateArguments, ModelArguments, PromptArguments), prog=prog)


def main(args: EvaluateArguments, model_args: ModelArguments, prompt_args: PromptArguments) -> dict:
    reward_funcs = resolve_reward_funcs(reward_funcs_from_names(args.reward_funcs))
    judge_funcs = resolve_reward_funcs(reward_funcs_from_names(args.judge_funcs)) if args.judge_funcs else []
    roles = ["reward"] * len(reward_funcs) + ["judge"] * len(judge_funcs)
    reward_funcs = reward_funcs + judge_funcs
    check_reward_files(reward_funcs)
    if args.update_model_card and not args.push_to_hub and not os.path.isdir(args.noise_generator):
        raise ValueError(
            f"--update_model_card writes into the generator's folder, and {args.noise_generator!r} is none (a Hub id?): "
            "pass --push_to_hub to update the card on the Hub, or a local folder."
        )
    prompts = load_prompts(args.prompts, prompt_args)
    if len(prompts) * args.num_images_per_prompt < 2:
        raise ValueError("A confidence interval needs at least two images: raise --num_images_per_prompt or add prompts.")
    device = torch.device(args.device) if args.device else default_device()
    tuned = load_tuned_pipeline(args.noise_generator, model_args, device)
    base = tuned.pipeline
    settings = {"guidance_scale": args.guidance_scale, "height": args.height, "width": args.width}
    call_kwargs = {name: value for name, value in settings.items() if value is not None}
    call_kwargs.update(parse_pipeline_kwargs(args.pipeline_kwargs))

    # keyed by (pipeline, steps): a (images, reward functions) tensor per prompt; the first image of the first prompts
    rewards, grid_rows = {}, {}
    progress = tqdm(total=len(args.num_inference_steps) * len(prompts), desc="Evaluating", unit="prompt")
    for steps in args.num_inference_steps:
        for name in ("base", "tuned"):
            rewards[name, steps], grid_rows[name, steps] = [], []
        for index, prompt in enumerate(prompts):
            seeds = image_seeds(args.seed, index, args.num_images_per_prompt)
            for name, pipeline in (("base", base), ("tuned", tuned)):
                images = pipeline(
                    prompt=prompt,
                    num_inference_steps=steps,
                    num_images_per_prompt=args.num_images_per_prompt,
                    generator=seeded_generators(seeds),
                    output_type="pt",
                    **call_kwargs,
                )[0]  # the images, whatever the output calls them (Kandinsky 5: `image`)
                scores = call_reward_funcs(reward_funcs, images=images.float(), prompts=[prompt] * len(images))
                rewards[name, steps].append(scores.cpu())
                if index < args.grid_prompts:
                    grid_rows[name, steps].append(images[0].float().cpu())
            progress.update()
    progress.close()

    results = []
    for steps in args.num_inference_steps:
        base_scores, tuned_scores = torch.cat(rewards["base", steps]), torch.cat(rewards["tuned", steps])
        for column, func in enumerate(reward_funcs):
            base_values, tuned_values = base_scores[:, column].tolist(), tuned_scores[:, column].tolist()
            results.append(
                {
                    "num_inference_steps": steps,
                    "reward": get_callable_name(func),
                    "role": roles[column],
                    **paired_result(base_values, tuned_values),
                    "base_rewards": [None if math.isnan(value) else value for value in base_values],
                    "tuned_rewards": [None if math.isnan(value) else value for value in tuned_values],
                }
            )

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    arguments = {**asdict(args), **asdict(model_args), **asdict(prompt_args), "prompts": prompts}
    arguments["pipeline_name_or_path"] = base.name_or_path
    report = {"arguments": arguments, "results": results}
    (output_dir / "results.json").write_text(json.dumps(report, indent=2))
    (output_dir / "results.md").write_text(markdown_table(results, len(prompts), args.num_images_per_prompt))
    image_grid(grid_rows, args.num_inference_steps).save(output_dir / "grid.png")
    print(f"Wrote results.md, results.json and grid.png to {output_dir}.")
    if args.update_model_card or args.push_to_hub:
        source = prompt_args.dataset_name or "given on the command line"
        section = (
            f"## Evaluation\n\nBy `trl-noise-ppo evaluate` on {len(prompts)} prompts ({source}) x "
            f"{args.num_images_per_prompt} images: mean reward and 95% confidence interval, the base pipeline and the tuned "
            "one from the same seeds, hence the same initial noise; difference = tuned - base, paired by seed. Judges "
            f"are rewards the generator was not trained on.\n\n{results_table(results)}"
        )
        update_model_card(args, section)
    return report


def update_model_card(args: EvaluateArguments, section: str) -> None:
    """Writes `section` into the generator's model card, and with `args.push_to_hub` uploads it."""
    if not os.path.isdir(args.noise_generator):  # a Hub generator: its card is updated on the Hub
        card = ModelCard.load(args.noise_generator)
        card.text = with_card_section(card.text, section)
        card.push_to_hub(args.hub_model_id or args.noise_generator)
        print(f"Pushed the model card to https://huggingface.co/{args.hub_model_id or args.noise_generator}.")
        return
    card_path = Path(args.noise_generator) / "README.md"
    card_path.write_text(with_card_section(card_path.read_text() if card_path.is_file() else "", section))
    print(f"Wrote the results into {card_path}.")
    if args.push_to_hub:
        api = HfApi()
        repo_id = api.create_repo(args.hub_model_id or Path(args.noise_generator).resolve().name, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo_id, folder_path=args.noise_generator, commit_message="Evaluation by trl-noise-ppo evaluate")
        print(f"Pushed {args.noise_generator} to https://huggingface.co/{repo_id}.")


def markdown_table(results: list[dict], num_prompts: int, num_images_per_prompt: int) -> str:
    caption = (
        f"Mean reward and 95% confidence interval over {num_prompts} prompts x {num_images_per_prompt} images, the same "
        "seeds for both pipelines; difference = tuned - base, paired by seed. grid.png: a base and a tuned row per step "
        "count, one column per prompt (its first seed)."
    )
    return f"{caption}\n\n{results_table(results)}"


def image_grid(rows: dict[tuple[str, int], list[torch.Tensor]], step_counts: list[int], cell_size: int = 256) -> Image.Image:
    """One labelled row per (pipeline, step count): base then tuned for each step count, the same seeds in a column."""
    label_width = 110
    keys = [(name, steps) for steps in step_counts for name in ("base", "tuned")]
    columns = max(len(rows[key]) for key in keys)
    grid = Image.new("RGB", (label_width + columns * cell_size, len(keys) * cell_size), "white")
    draw = ImageDraw.Draw(grid)
    for row, (name, steps) in enumerate(keys):
        draw.text((8, row * cell_size + cell_size // 2), f"{name}\n{steps} step(s)", fill="black")
        for column, image in enumerate(rows[name, steps]):
            pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            tile = ImageOps.contain(Image.fromarray(pixels), (cell_size, cell_size))
            grid.paste(tile, (label_width + column * cell_size, row * cell_size))
    return grid


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
