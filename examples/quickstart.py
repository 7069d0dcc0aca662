"""Quickstart: Noise PPO on the bundled shapes-world model, on a CPU, in a few minutes.

The bundled model is a tiny Stable Diffusion pipeline trained on 32 x 32 scenes of coloured shapes ("three blue
squares", "a red circle left of a blue square left of a white triangle"); even at its best guidance scale it often
misses counts, relations and which colour goes with which shape. The reward is the shapes world's learned alignment
classifier. Noise PPO learns, for each prompt, which initial noise makes the frozen model get it right. The before /
after figures are given twice: by the reward that was optimised, and by the analytic judge that shares nothing with
it. Writes to `--output_dir`:

- `generator/`: the trained noise generator (load it with `NoisePPOPipeline.from_pretrained`);
- `before_after.png`: the same prompts and seeds, base model (upper rows) against Noise PPO (lower rows);
- `reward_curve.png`: the mean training reward per generation batch.

    python examples/quickstart.py --output_dir outputs/quickstart
"""

import os
from dataclasses import dataclass

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from trl import TrlParser  # noqa: E402

from trl_noise_ppo import NoiseGenerator, NoisePPOConfig, NoisePPOPipeline, NoisePPOTrainer  # noqa: E402
from trl_noise_ppo.shapes import (  # noqa: E402
    RECOMMENDED_GUIDANCE_SCALES,
    ShapesAlignmentReward,
    ShapesJudge,
    balanced_prompts,
    load_shapes_pipeline,
)


@dataclass
class QuickstartArguments:
    output_dir: str = "outputs/quickstart"
    num_inference_steps: int = 1
    generation_batches: int = 100
    num_evaluation_images: int = 256
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
    reward, judge = ShapesAlignmentReward(), ShapesJudge()
    prompts = balanced_prompts("training", 1024)  # the four kinds of scene weigh the same
    config = NoisePPOConfig(
        output_dir=os.path.join(args.output_dir, "generator"),
        num_inference_steps=args.num_inference_steps,
        guidance_scale=RECOMMENDED_GUIDANCE_SCALES[args.num_inference_steps],  # the base model at its best
        num_generations=8,
        per_device_train_batch_size=64,  # 8 prompts x 8 noises per generation batch
        num_iterations=4,
        max_steps=4 * args.generation_batches,
        logging_steps=4,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
    )
    trainer = NoisePPOTrainer(pipe, reward, args=config, train_dataset=Dataset.from_dict({"prompt": prompts}))

    # the same prompts and seeds before and after; an untrained generator is exactly the base model
    shown = prompts[:4] + balanced_prompts("held-out", 4)
    before = NoisePPOPipeline(pipe, NoiseGenerator(trainer.model.config))
    grid_prompts = [p for p in shown for _ in range(4)]
    images_before = sample(before, grid_prompts, args.num_inference_steps, args.seed)

    trainer.train()
    trainer.save_model()

    after = NoisePPOPipeline(pipe, trainer.model)
    images_after = sample(after, grid_prompts, args.num_inference_steps, args.seed)
    pairs = torch.stack([images_before.view(8, 4, 3, 32, 32), images_after.view(8, 4, 3, 32, 32)], dim=1)
    grid = image_grid(pairs.reshape(-1, 3, 32, 32), columns=4)
    captioned(grid, shown, row_height=grid.height // 16).save(os.path.join(args.output_dir, "before_after.png"))

    history = [log for log in trainer.state.log_history if "reward" in log]
    plt.figure(figsize=(5, 3))
    plt.plot([log["step"] // 4 for log in history], [log["reward"] for log in history])
    plt.xlabel("generation batch")
    plt.ylabel("mean alignment reward")
    plt.title(f"Noise PPO, shapes world, {args.num_inference_steps} step(s)")
    plt.tight_layout()
    plt.savefig(os.path.join(args.output_dir, "reward_curve.png"), dpi=120)

    for name in ("training", "held-out"):
        prompt_set = balanced_prompts(name, args.num_evaluation_images)
        rewards, judged = {}, {}
        for label, pipeline in (("base", before), ("Noise PPO", after)):
            images = sample(pipeline, prompt_set, args.num_inference_steps, args.seed + 1)
            rewards[label] = sum(reward(images=images, prompts=prompt_set)) / len(prompt_set)
            judged[label] = sum(judge(images=images, prompts=prompt_set)) / len(prompt_set)
        print(
            f"{name} prompts: judge (share of images right) {judged['base']:.3f} (base) -> {judged['Noise PPO']:.3f} "
            f"(Noise PPO); mean reward {rewards['base']:.3f} -> {rewards['Noise PPO']:.3f}"
        )
    print(f"wrote {args.output_dir}/generator, before_after.png (per prompt: base row, then Noise PPO row), reward_curve.png")


if __name__ == "__main__":
    (quickstart_args,) = TrlParser(QuickstartArguments).parse_args_and_config()
    main(quickstart_args)
