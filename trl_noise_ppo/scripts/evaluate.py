"""
Compares a base pipeline with the same pipeline and a trained noise generator, on the same prompts and seeds.

Judges (`--judge_funcs`) score the same images as the rewards (`--reward_funcs`) and are reported beside them. Train
on one reward and judge with others that share nothing learned with it (for real models e.g. PickScore against
HPSv2, ImageReward and CLIPScore; in the shapes world the learned `shapes_alignment` against the analytic
`shapes_judge`): a gain the reward sees and the judges do not is reward hacking.

For every step count and prompt, both make `num_images_per_prompt` images from the same seeds (image j of prompt i
has seed `seed + i * num_images_per_prompt + j`), and every reward scores them. Over the n = prompts x images
rewards r_1..r_n of one pipeline, step count and reward:

    mean = sum(r_k) / n,    s = sqrt(sum((r_k - mean)^2) / (n - 1)),    95% CI = mean +/- 1.96 * s / sqrt(n)

(normal approximation over images). The same formula over the paired differences d_k = r_k(tuned) - r_k(base) gives
the gain and its interval; pairing by seed removes most of the image-to-image spread from it. Images of one prompt are
not independent draws of the prompt distribution, so with few prompts the intervals are too narrow for claims about
other prompts.

Writes into `output_dir`: `results.md` (a table), `results.json` (the table and every image's reward) and
`grid.png` (for each step count, a base row and a tuned row: the first image of the first `grid_prompts` prompts).
"""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageOps
from tqdm.auto import tqdm
from trl import TrlParser
from trl.trainer.utils import get_callable_name

from ..rewards import call_reward_funcs, check_reward_files, resolve_reward_funcs
from .utils import (
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


Z_95 = 1.959964  # two-sided 95% quantile of the standard normal


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

    def __post_init__(self):
        if min(self.num_inference_steps, default=0) < 1 or self.num_images_per_prompt < 1:
            raise ValueError(
                f"--num_inference_steps (got {self.num_inference_steps}) takes step counts of at least 1 and "
                f"--num_images_per_prompt (got {self.num_images_per_prompt}) must be at least 1."
            )


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((EvaluateArguments, ModelArguments, PromptArguments), prog=prog)


def interval(values: list[float]) -> dict:
    """Mean, sample standard deviation and normal-approximation 95% confidence interval of `values`, leaving out NaN
    (an image a reward did not score); `None` where fewer than two values remain."""
    values = [value for value in values if not math.isnan(value)]
    n = len(values)
    if n < 2:
        return {"mean": values[0] if values else None, "std": None, "n": n, "ci95": None}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half_width = Z_95 * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "ci95": [mean - half_width, mean + half_width]}


def main(args: EvaluateArguments, model_args: ModelArguments, prompt_args: PromptArguments) -> dict:
    reward_funcs = resolve_reward_funcs(reward_funcs_from_names(args.reward_funcs))
    judge_funcs = resolve_reward_funcs(reward_funcs_from_names(args.judge_funcs)) if args.judge_funcs else []
    roles = ["reward"] * len(reward_funcs) + ["judge"] * len(judge_funcs)
    reward_funcs = reward_funcs + judge_funcs
    check_reward_files(reward_funcs)
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
                    "base": interval(base_values),
                    "tuned": interval(tuned_values),
                    "difference": interval([t - b for t, b in zip(tuned_values, base_values, strict=True)]),
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
    return report


def markdown_table(results: list[dict], num_prompts: int, num_images_per_prompt: int) -> str:
    def cell(stats: dict) -> str:
        if stats["ci95"] is None:
            return "n/a (fewer than 2 scored images)"
        low, high = stats["ci95"]
        return f"{stats['mean']:.4g} [{low:.4g}, {high:.4g}]"

    lines = [
        f"Mean reward and 95% confidence interval over {num_prompts} prompts x {num_images_per_prompt} images, the same "
        "seeds for both pipelines; difference = tuned - base, paired by seed. grid.png: a base and a tuned row per step "
        "count, one column per prompt (its first seed).",
        "",
        "| steps | reward or judge | base | tuned | difference |",
        "|---|---|---|---|---|",
    ]
    for result in results:
        name = result["reward"] + (" (judge)" if result["role"] == "judge" else "")
        lines.append(
            f"| {result['num_inference_steps']} | {name} | {cell(result['base'])} | {cell(result['tuned'])} "
            f"| {cell(result['difference'])} |"
        )
    return "\n".join(lines) + "\n"


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
