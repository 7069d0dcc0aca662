"""The paper's claims, measured in the shapes world: does Noise PPO raise alignment, most at few steps, on prompts it
never trained on?

For each number of inference steps, a generator is trained on the shapes world's training prompts with its alignment
reward, then the base model, Noise PPO and the base model's best-of-4 (four seeds, the best by the same reward: the
inference-time alternative) are scored on the training prompts and on the held-out prompts (colour-shape-position
combinations never trained on). Base and Noise PPO images share their `eps`, so their difference is paired; intervals
are 95% normal intervals over images, as `trl-noise-ppo evaluate` computes them: mean +/- 1.96 * std / sqrt(n).
Writes `findings.json`, `findings.md` and `findings.png` to `--output_dir`.

    python -m benchmarks.findings --output_dir outputs/findings                       # the docs' table
    python -m benchmarks.findings --architectures pooled_mlp token_attention --steps 1  # the architecture comparison
"""

import json
import os
import time
from dataclasses import asdict, dataclass, field

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import TrlParser  # noqa: E402

from trl_noise_ppo.scripts.evaluate import interval as evaluate_interval  # noqa: E402
from trl_noise_ppo import NoiseGenerator, NoisePPOConfig, NoisePPOPipeline, NoisePPOTrainer  # noqa: E402
from trl_noise_ppo.shapes import (  # noqa: E402
    ShapesAlignmentReward,
    ShapesClassifier,
    held_out_prompts,
    load_shapes_pipeline,
    training_prompts,
)
from trl_noise_ppo.shapes.reward import is_aligned  # noqa: E402


@dataclass
class FindingsArguments:
    output_dir: str = "outputs/findings"
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    architectures: list[str] = field(default_factory=lambda: ["pooled_mlp"])
    generation_batches: int = 100
    learning_rate: float = 1e-3
    beta: float = 0.01
    images_per_set: int = 512
    seed: int = 0


def interval(values: torch.Tensor) -> dict:
    """The mean and the half-width of its 95% interval, as `trl-noise-ppo evaluate` computes them."""
    stats = evaluate_interval(values.tolist())
    low, high = stats["ci95"]
    return {"mean": stats["mean"], "ci95": (high - low) / 2}


def fmt(stat: dict) -> str:
    return f"{stat['mean']:.3f} ± {stat['ci95']:.3f}"


def evaluate(pipeline, prompts, steps, eps, reward, classifier):
    images = pipeline(prompts, latents=eps, num_inference_steps=steps, output_type="pt").images
    return torch.tensor(reward(images=images, prompts=prompts)), is_aligned(classifier, images, prompts).float()


def main(args: FindingsArguments):
    os.makedirs(args.output_dir, exist_ok=True)
    pipe = load_shapes_pipeline()
    pipe.set_progress_bar_config(disable=True)
    reward, classifier = ShapesAlignmentReward(), ShapesClassifier.from_pretrained()
    sets = {"training": training_prompts(), "held-out": held_out_prompts()}
    results = []
    for architecture in args.architectures:
        for steps in args.steps:
            start = time.time()
            config = NoisePPOConfig(
                output_dir=os.path.join(args.output_dir, f"{architecture}-{steps}-steps"),
                num_inference_steps=steps, num_generations=8, per_device_train_batch_size=64, num_iterations=4,
                max_steps=4 * args.generation_batches, learning_rate=args.learning_rate, beta=args.beta,
                generator_architecture=architecture, save_strategy="no",
                report_to="none", disable_tqdm=True, logging_steps=4, seed=args.seed,
            )
            trainer = NoisePPOTrainer(pipe, reward, args=config, train_dataset=Dataset.from_dict({"prompt": sets["training"]}))
            trainer.train()
            trainer.save_model()
            base = NoisePPOPipeline(pipe, NoiseGenerator(trainer.model.config))  # untrained: exactly the base model
            tuned = NoisePPOPipeline(pipe, trainer.model)
            row = {"architecture": architecture, "steps": steps, "train_seconds": round(time.time() - start, 1)}
            for name, prompt_set in sets.items():
                prompts = [prompt_set[i % len(prompt_set)] for i in range(args.images_per_set)]
                noise = torch.Generator().manual_seed(args.seed + 1)
                eps = torch.randn(5, len(prompts), *trainer.model.config.noise_shape, generator=noise)
                base_reward, base_aligned = evaluate(base, prompts, steps, eps[0], reward, classifier)
                tuned_reward, tuned_aligned = evaluate(tuned, prompts, steps, eps[0], reward, classifier)
                best_of_4 = torch.stack(
                    [base_reward] + [evaluate(base, prompts, steps, eps[i], reward, classifier)[0] for i in (1, 2, 3)]
                ).max(dim=0).values
                row[name] = {
                    "base": interval(base_reward),
                    "noise_ppo": interval(tuned_reward),
                    "gain": interval(tuned_reward - base_reward),
                    "best_of_4": interval(best_of_4),
                    "base_alignment_rate": interval(base_aligned),
                    "noise_ppo_alignment_rate": interval(tuned_aligned),
                }
            results.append(row)
            print(json.dumps(row))

    with open(os.path.join(args.output_dir, "findings.json"), "w") as f:
        json.dump({"arguments": asdict(args), "results": results}, f, indent=2)
    lines = [
        "| architecture | steps | prompts | base | Noise PPO | gain (paired) | base best-of-4 | alignment rate base → Noise PPO |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        for name in sets:
            r = row[name]
            lines.append(
                f"| {row['architecture']} | {row['steps']} | {name} | {fmt(r['base'])} | {fmt(r['noise_ppo'])} | "
                f"{fmt(r['gain'])} | {fmt(r['best_of_4'])} | "
                f"{r['base_alignment_rate']['mean']:.2f} → {r['noise_ppo_alignment_rate']['mean']:.2f} |"
            )
    table = "\n".join(lines)
    with open(os.path.join(args.output_dir, "findings.md"), "w") as f:
        f.write(table + "\n")
    print(table)

    plt.figure(figsize=(6, 3.5))
    for architecture in args.architectures:
        rows = [row for row in results if row["architecture"] == architecture]
        for name, marker in (("training", "o"), ("held-out", "s")):
            plt.errorbar([row["steps"] for row in rows], [row[name]["gain"]["mean"] for row in rows],
                         yerr=[row[name]["gain"]["ci95"] for row in rows], marker=marker, capsize=3,
                         label=f"{architecture}, {name} prompts")
    plt.axhline(0, color="grey", linewidth=0.8)
    plt.xscale("log", base=2)
    plt.xlabel("inference steps")
    plt.ylabel("alignment reward gain over base")
    plt.legend(fontsize=7)
    plt.tight_layout()
    plt.savefig(os.path.join(args.output_dir, "findings.png"), dpi=120)


if __name__ == "__main__":
    (findings_args,) = TrlParser(FindingsArguments).parse_args_and_config()
    main(findings_args)
