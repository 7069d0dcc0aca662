"""Quickstart: Noise PPO on the bundled shapes-world model, on a CPU, in a few minutes.

The bundled model is a tiny Stable Diffusion pipeline trained on 32 x 32 scenes of coloured shapes, distilled to work
in one step. At one step it draws a two-object scene ("a green square above a white circle") right only about one time
in three: an object missing, the colours swapped, the wrong relation. The quickstart trains a noise generator on the
world's 490 two-object training captions with the world's learned alignment reward (300 generation batches of 8
captions x 8 noises: 19,200 reward queries), then compares it with the base model on the 122 two-object captions it
never saw, 16 images each, both from the same noise: the gain is given by the reward that was optimised and by the
analytic judge that shares nothing with it, each with its 95% interval. It also prints the learning-signal diagnostic.
The generator is `prompt_clusters` with 2 clusters: one learned noise for each k-means cluster of the training captions'
embeddings (here they split the captions by relation, "left of" and "above"), so that every caption's images teach the
noise of all the captions that read like it. What it gave over training seeds is in docs/benchmarks.md. `--kinds`
trains on other kinds of scene; on single objects and counts the clusters group the captions by colour and shape, not
by place or number, and lose: there `--generator_architecture pooled_mlp --beta 0.02` (the trainer's defaults before
the clusters) does better. The noise reaches the pipeline as the generator samples it, not rescaled to N(0, I)'s norm
as the trainer's defaults do: the quickstart was measured so. Writes to `--output_dir`:

- `generator/`: the trained noise generator (load it with `NoisePPOPipeline.from_pretrained`);
- `before_after.png`: the same held-out prompts and seeds, base model (upper rows) against Noise PPO (lower rows);
- `reward_curve.png`: the mean training reward, and the learning-signal diagnostic `gain_over_base`.

    python examples/quickstart.py --output_dir outputs/quickstart
"""

import copy
import os
from dataclasses import dataclass, field

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from trl import TrlParser  # noqa: E402

from trl_noise_ppo import NoisePPOConfig, NoisePPOPipeline, NoisePPOTrainer  # noqa: E402
from trl_noise_ppo.shapes import (  # noqa: E402
    RECOMMENDED_GUIDANCE_SCALES,
    ShapesAlignmentReward,
    held_out_prompts,
    load_shapes_pipeline,
    training_prompts,
)


@dataclass
class QuickstartArguments:
    output_dir: str = "outputs/quickstart"
    kinds: list[str] = field(default_factory=lambda: ["pair"], metadata={"help": "Of single, pair, count, row."})
    num_inference_steps: int = 1
    generation_batches: int = 300
    generator_architecture: str = field(default="prompt_clusters", metadata={"help": "pooled_mlp: the trainer's default before."})
    num_clusters: int = field(default=2, metadata={"help": "prompt_clusters: one learned noise per k-means cluster of the captions."})
    # a noise shared by a cluster of captions does not wander caption by caption: no pull to N(0, I) to hold it back
    beta: float = field(default=0.0, metadata={"help": "Pull to N(0, I); the trainer's default before was 0.02."})
    images_per_held_out_prompt: int = 16
    seed: int = 0


def image_grid(images: torch.Tensor, columns: int, scale: int = 4) -> Image.Image:
    """(N, 3, H, W) in [0, 1] -> one picture, `columns` images a row, each enlarged `scale` times."""
    images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    rows = images.view(-1, columns, *images.shape[1:])  # (rows, columns, 3, H, W)
    grid = rows.permute(0, 3, 1, 4, 2).reshape(rows.shape[0] * images.shape[2], columns * images.shape[3], 3)
    return Image.fromarray((grid * 255).round().byte().numpy())


def captioned(grid: Image.Image, prompts: list[str], row_height: int) -> Image.Image:
    """Writes each prompt above its pair of rows (base, then Noise PPO)."""
    caption_height = 14
    out = Image.new("RGB", (grid.width, grid.height + caption_height * len(prompts)), "white")
    draw = ImageDraw.Draw(out)
    for i, prompt in enumerate(prompts):
        top = i * (2 * row_height + caption_height)
        draw.text((4, top + 1), f"{prompt}  (upper: base, lower: Noise PPO)", fill="black")
        out.paste(grid.crop((0, 2 * i * row_height, grid.width, 2 * (i + 1) * row_height)), (0, top + caption_height))
    return out


def sample(pipeline: NoisePPOPipeline, prompts: list[str], steps: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    guidance_scale = RECOMMENDED_GUIDANCE_SCALES[steps]
    return pipeline(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt", generator=generator).images


def main(args: QuickstartArguments):
    os.makedirs(args.output_dir, exist_ok=True)
    pipe = load_shapes_pipeline()
    kinds = tuple(args.kinds)
    held_out = held_out_prompts(kinds)
    config = NoisePPOConfig(
        output_dir=os.path.join(args.output_dir, "generator"),
        num_inference_steps=args.num_inference_steps,
        guidance_scale=RECOMMENDED_GUIDANCE_SCALES[args.num_inference_steps],  # the base model at its best
        max_steps=8 * args.generation_batches,  # 8 epochs of 8 prompts x 8 noises per generation batch
        logging_steps=8,
        num_generations_eval=args.images_per_held_out_prompt,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        generator_architecture=args.generator_architecture,
        generator_num_clusters=args.num_clusters,
        generator_cluster_image_weight=0.0,  # two clusters by the embeddings alone: they split the relations
        beta=args.beta,
        project_to_shell=False,
    )
    trainer = NoisePPOTrainer(
        pipe,
        ShapesAlignmentReward(),
        args=config,
        train_dataset=Dataset.from_dict({"prompt": training_prompts(kinds)}),
        # paired with the base model, on the same noise; the judge is not trained on
        eval_dataset=Dataset.from_dict({"prompt": held_out}),
        judge_funcs=["shapes_judge"],
    )

    # the same prompts and seeds before and after; the generator before training is exactly the base model
    shown = held_out[::3][:6]
    before = NoisePPOPipeline(pipe, copy.deepcopy(trainer.model))
    grid_prompts = [p for p in shown for _ in range(4)]
    images_before = sample(before, grid_prompts, args.num_inference_steps, args.seed)

    trainer.train()
    trainer.save_model()
    metrics = trainer.evaluate()

    after = NoisePPOPipeline(pipe, trainer.model)
    images_after = sample(after, grid_prompts, args.num_inference_steps, args.seed)
    pairs = torch.stack([images_before.view(len(shown), 4, 3, 32, 32), images_after.view(len(shown), 4, 3, 32, 32)], dim=1)
    grid = image_grid(pairs.reshape(-1, 3, 32, 32), columns=4)
    captioned(grid, shown, row_height=grid.height // (2 * len(shown))).save(os.path.join(args.output_dir, "before_after.png"))

    history = [log for log in trainer.state.log_history if "reward" in log]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
    batches = [log["step"] // 8 for log in history]
    left.plot(batches, [log["reward"] for log in history])
    left.set_ylabel("mean alignment reward")
    compared = [log for log in history if "gain_over_base" in log]
    right.plot([log["step"] // 8 for log in compared], [log["gain_over_base"] for log in compared])
    right.axhline(0, color="grey", linewidth=0.8)
    right.set_ylabel("gain_over_base (same eps)")
    for axis in (left, right):
        axis.set_xlabel("generation batch")
    figure.suptitle(f"Noise PPO, shapes world, {args.num_inference_steps} step(s)")
    figure.tight_layout()
    figure.savefig(os.path.join(args.output_dir, "reward_curve.png"), dpi=120)

    half = len(compared) // 2
    early, late = (sum(log["gain_over_base"] for log in part) / max(1, len(part)) for part in (compared[:half], compared[half:]))
    print(f"learning signal: gain_over_base (reward, generator against base on the same noise, training prompts) "
          f"{early:+.3f} in the first half of training, {late:+.3f} in the second")
    images = len(held_out) * args.images_per_held_out_prompt
    print(f"held-out {'/'.join(kinds)} prompts ({len(held_out)} captions, {images} images, base and Noise PPO from the same noise):")
    for label, name in (("judge (share of images right)", "judges/shapes_judge"), ("reward (optimised)", "rewards/shapes_alignment")):
        base, tuned, gain, half_width = (metrics[f"eval_{name}/{key}"] for key in ("base", "mean", "gain", "gain_ci95"))
        print(f"  {label}: {base:.3f} (base) -> {tuned:.3f} (Noise PPO), gain {gain:+.3f} ± {half_width:.3f} (95%)")
    print(f"wrote {args.output_dir}/generator, before_after.png (per prompt: base row, then Noise PPO row), reward_curve.png")


if __name__ == "__main__":
    (quickstart_args,) = TrlParser(QuickstartArguments).parse_args_and_config()
    main(quickstart_args)
