"""Learning curves in the shapes world, judged by `shapes_judge`: does the learner climb, on training and on held-out
prompts, as reward queries grow, and how does it compare with what a user would do instead?

Three parts, each writing `<part>.jsonl` (one row per finished run, so a stopped command keeps what it finished) and
then `curves.md` / `curves.png` from every row found in `--output_dir`:

- `budget`: for each number of inference steps (at the bundled model's recommended guidance), training reward and
  seed, one run trained on the 1,024 category-balanced training prompts and evaluated with the trainer's own
  `evaluate` at each of `--eval_at` reward queries: the paired judged gain over the base model on 512 held-out and
  512 training prompts (the same eps for both). Trained on `shapes_judge` itself (the method's ceiling: a perfect,
  black-box, 0/1 reward) and on the learned `shapes_alignment`.
- `prompt_counts`: trained on the judge with `--prompt_count_queries` queries on 1, 8, 32, 128 or 1,024 distinct
  training prompts, judged on those prompts; and each of the 8 prompts trained alone with the queries per prompt the
  8-prompt run gave it, judged prompt by prompt.
- `references`: the base model's best-of-N (N noises per prompt, the training reward keeps one: N samplings and N
  reward calls per image; its gain by that reward too) and per-prompt search (the cross-entropy method on the mean of
  N(mu, I), on each of `--search_prompts` held-out prompts on its own), judged on the same prompts.

`--variant` trains with other settings (`VARIANTS`); `default` is the library's defaults, and every other variant is
measured as overrides of the defaults before them (`pooled_mlp`: one MLP on the pooled prompt embedding, a pull of
0.02 to N(0, I), no rescaling to the shell; `benchmarks/defaults.py`). `layout_oracle` is a ceiling, not a feature:
the same learner with the generator reading each prompt's layout (its kind, where a single object is, how many a
count has: 12 classes) from its caption instead of its embeddings, so that what it gains is what a generator gains from knowing
which prompts share a noise template; `layout_oracle+embeddings` gives it the layout beside the prompt's embeddings,
`layout_oracle+step_size=0.125` takes a quarter of the default natural step, `layout_oracle+beta=0` drops the pull to
N(0, I). `count_oracle` is told only how many objects a count asks for (5 classes: 2 to 5, and not a count).
`prompt_clusters` is the library's label-free way to impose sharing (`generator_architecture=
"prompt_clusters"`: one grid per k-means cluster of the training prompts' embeddings).

    python -m benchmarks.curves --parts budget references --steps 1 2 --seeds 0 1 2 --output_dir outputs/curves
    python -m benchmarks.curves --parts prompt_counts --seeds 0 1 2 --output_dir outputs/curves
    python -m benchmarks.curves --parts budget --variant old_defaults --rewards shapes_judge --eval_at 6400 25600
    python -m benchmarks.curves --report_only --output_dir outputs/curves
"""

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from torch import nn  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import TrlParser  # noqa: E402

from benchmarks.defaults import OLD_DEFAULTS, POOLED_MLP_DEFAULTS  # noqa: E402
from trl_noise_ppo import NoisePPOConfig, NoisePPOTrainer  # noqa: E402
from trl_noise_ppo.evaluation import interval  # noqa: E402
from trl_noise_ppo.noise_injection import prompt_conditioning  # noqa: E402
from trl_noise_ppo.rewards import resolve_reward_funcs  # noqa: E402
from trl_noise_ppo.shapes import RECOMMENDED_GUIDANCE_SCALES, balanced_prompts, load_shapes_pipeline  # noqa: E402
from trl_noise_ppo.shapes.render import parse_caption  # noqa: E402


# NoisePPOConfig overrides. Each variant but "default" was measured as overrides of the pooled_mlp defaults, which it
# keeps (below); "old_defaults" logs gain_over_base every batch, as the diagnostic's comparison needs
VARIANTS = {
    "pooled_mlp": {},
    "old_defaults": {**OLD_DEFAULTS, "base_comparison_every": 1},
    "learn_sigma": {"learn_sigma": True},
    "step_size=0.25": {"step_size": 0.25},
    "step_size=0.125": {"step_size": 0.125},
    "step_size=1": {"step_size": 1.0},
    "beta=0.005": {"beta": 0.005},
    "learning_rate=1e-4": {"learning_rate": 1e-4},
    "learning_rate=3e-4": {"learning_rate": 3e-4},
    "learning_rate=3e-3": {"learning_rate": 3e-3},
    "generator_hidden_dim=16": {"generator_hidden_dim": 16},
    "generator_hidden_dim=4": {"generator_hidden_dim": 4},
    "generator_architecture=token_attention": {"generator_architecture": "token_attention"},
    "beta=0+project_to_shell": {"beta": 0.0, "project_to_shell": True},
    "generator_architecture=token_attention+beta=0+project_to_shell": {
        "generator_architecture": "token_attention", "beta": 0.0, "project_to_shell": True},
}


def layout_of(caption: str) -> str:
    scene = parse_caption(caption)
    return f"{scene.kind}, {scene.layout}" + (f", {len(scene.objects)}" if scene.kind == "count" else "")


def count_of(caption: str) -> str:
    """What the count oracle reads of a caption: how many objects a count asks for, and nothing of other scenes."""
    scene = parse_caption(caption)
    return f"count, {len(scene.objects)}" if scene.kind == "count" else "not a count"


class Oracle(NamedTuple):
    """A variant whose generator reads a class of each prompt's caption (`LayoutOracleEncoder`)."""

    label_of: Callable[[str], str]  # caption -> class
    with_embeddings: bool  # whether it reads the prompt's embeddings besides
    overrides: dict  # NoisePPOConfig overrides


LAYOUT_ORACLES = {
    "layout_oracle": Oracle(layout_of, False, {}),
    "layout_oracle+embeddings": Oracle(layout_of, True, {}),
    "layout_oracle+step_size=0.125": Oracle(layout_of, False, {"step_size": 0.125}),
    "layout_oracle+beta=0": Oracle(layout_of, False, {"beta": 0.0}),
    "layout_oracle+beta=0+project_to_shell": Oracle(layout_of, False, {"beta": 0.0, "project_to_shell": True}),
    "count_oracle+beta=0+project_to_shell": Oracle(count_of, False, {"beta": 0.0, "project_to_shell": True}),
}
VARIANTS.update({name: oracle.overrides for name, oracle in LAYOUT_ORACLES.items()})
PROMPT_CLUSTERS = {"generator_architecture": "prompt_clusters"}
VARIANTS.update({
    "prompt_clusters": PROMPT_CLUSTERS,
    "prompt_clusters+beta=0": {**PROMPT_CLUSTERS, "beta": 0.0},
    "prompt_clusters+beta=0.005": {**PROMPT_CLUSTERS, "beta": 0.005},
    "prompt_clusters=6+beta=0": {**PROMPT_CLUSTERS, "generator_num_clusters": 6, "beta": 0.0},
    "prompt_clusters=24+beta=0": {**PROMPT_CLUSTERS, "generator_num_clusters": 24, "beta": 0.0},
    "prompt_clusters=4+beta=0": {**PROMPT_CLUSTERS, "generator_num_clusters": 4, "beta": 0.0},
    "prompt_clusters+beta=0+learning_rate=3e-3": {**PROMPT_CLUSTERS, "beta": 0.0, "learning_rate": 3e-3},
    "prompt_clusters+beta=0+learning_rate=3e-4": {**PROMPT_CLUSTERS, "beta": 0.0, "learning_rate": 3e-4},
    "prompt_clusters+beta=0+learn_sigma": {**PROMPT_CLUSTERS, "beta": 0.0, "learn_sigma": True},
    "prompt_clusters+beta=0+generator_grid_size=4": {**PROMPT_CLUSTERS, "beta": 0.0, "generator_grid_size": 4},
    "prompt_clusters+beta=0+project_to_shell": {**PROMPT_CLUSTERS, "beta": 0.0, "project_to_shell": True},
    "prompt_clusters+project_to_shell": {**PROMPT_CLUSTERS, "project_to_shell": True},
    "prompt_clusters+beta=0.005+project_to_shell": {**PROMPT_CLUSTERS, "beta": 0.005, "project_to_shell": True},
    "prompt_clusters=24+beta=0+project_to_shell": {**PROMPT_CLUSTERS, "generator_num_clusters": 24, "beta": 0.0,
                                                   "project_to_shell": True},
    "prompt_clusters=1+beta=0+project_to_shell": {**PROMPT_CLUSTERS, "generator_num_clusters": 1, "beta": 0.0,
                                                  "project_to_shell": True},
    "prompt_clusters=1+beta=0.005+project_to_shell": {**PROMPT_CLUSTERS, "generator_num_clusters": 1, "beta": 0.005,
                                                      "project_to_shell": True},
    "prompt_clusters+images=2+beta=0+project_to_shell": {**PROMPT_CLUSTERS, "generator_cluster_image_weight": 2.0,
                                                         "beta": 0.0, "project_to_shell": True},
    "prompt_clusters+images=2+beta=0.005+project_to_shell": {**PROMPT_CLUSTERS, "generator_cluster_image_weight": 2.0,
                                                             "beta": 0.005, "project_to_shell": True},
    "prompt_clusters+images=2+beta=0.002+project_to_shell": {**PROMPT_CLUSTERS, "generator_cluster_image_weight": 2.0,
                                                             "beta": 0.002, "project_to_shell": True},
    "prompt_clusters+images=2+beta=0+project_to_shell+cluster_means": {
        **PROMPT_CLUSTERS, "generator_cluster_image_weight": 2.0, "beta": 0.0, "project_to_shell": True,
        "generator_cluster_means": True},
})
VARIANTS = {"default": {}, **{name: {**POOLED_MLP_DEFAULTS, **overrides} for name, overrides in VARIANTS.items()}}


class LayoutOracleEncoder(nn.Module):
    """Prompt -> grid through the generator's MLP on a one-hot of the prompt's layout (or another class of
    `label_of`), looked up from its caption: the caption whose mean token embedding is nearest (the prompts are the
    shapes world's, known in advance)."""

    def __init__(self, encoder: nn.Module, pipe, captions: list[str], with_embeddings: bool = False, label_of=layout_of):
        super().__init__()
        self.config = config = encoder.config
        # with_embeddings: the one-hot beside the pooled MLP's own (normalised) reading of the prompt
        self.embeddings_norm = encoder.mlp[0] if with_embeddings else None
        self.classes = sorted({label_of(caption) for caption in captions})
        self.register_buffer("features", torch.cat([
            prompt_conditioning(pipe, [{"prompt": caption} for caption in captions[start : start + 256]])["prompt_embeds"].float().mean(dim=1)
            for start in range(0, len(captions), 256)
        ]), persistent=False)
        self.register_buffer("labels", torch.tensor([self.classes.index(label_of(caption)) for caption in captions]), persistent=False)
        # the pooled MLP's, its LayerNorm and first layer replaced by one that reads the one-hot
        width = len(self.classes) + (config.prompt_embeds_dim if with_embeddings else 0)
        self.mlp = nn.Sequential(nn.Linear(width, config.hidden_dim), *encoder.mlp[2:])

    def forward(self, prompt_embeds, pooled_prompt_embeds, prompt_attention_mask):
        mean_embeds = prompt_embeds.float().mean(dim=1)
        features = nn.functional.one_hot(self.labels[torch.cdist(mean_embeds, self.features).argmin(dim=1)], len(self.classes)).float()
        if self.embeddings_norm is not None:
            features = torch.cat([features, self.embeddings_norm(mean_embeds)], dim=-1)
        grid = self.mlp(features)
        return grid.view(-1, self.config.grid_channels, self.config.grid_size, self.config.grid_size)


@dataclass
class CurvesArguments:
    output_dir: str = "outputs/curves"
    parts: list[str] = field(default_factory=lambda: ["budget", "references"], metadata={"help": "budget, prompt_counts, references"})
    steps: list[int] = field(default_factory=lambda: [1, 2])
    rewards: list[str] = field(default_factory=lambda: ["shapes_judge", "shapes_alignment"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    eval_at: list[int] = field(default_factory=lambda: [6400, 12800, 25600, 51200, 102400])
    variant: str = field(default="default", metadata={"help": f"One of {', '.join(VARIANTS)}."})
    num_training_prompts: int = 1024
    images_per_set: int = 512
    prompt_counts: list[int] = field(default_factory=lambda: [1, 8, 32, 128, 1024])
    prompt_count_queries: int = 6400
    prompt_count_images: int = 2048
    best_of: list[int] = field(default_factory=lambda: [2, 4, 8])
    search_prompts: int = field(default=8, metadata={"help": "Held-out prompts per-prompt search runs on; 0 runs none."})
    search_iterations: int = 20
    search_population: int = 64
    threads: int = 1
    report_only: bool = False


class EvaluateAtQueries(TrainerCallback):
    """Evaluates when the run has used one of the given numbers of reward queries."""

    def __init__(self, eval_at: list[int], generation_batch: int, steps_per_batch: int):
        self.eval_steps = {queries // generation_batch * steps_per_batch for queries in eval_at}

    def on_step_end(self, args, state, control, **kwargs):
        control.should_evaluate = state.global_step in self.eval_steps
        return control


def train_and_evaluate(pipe, reward: str, steps: int, seed: int, variant: str, train_prompts: list[str],
                       eval_sets: dict[str, list[str]], eval_at: list[int], output_dir: str, images_per_prompt: int = 1):
    # A generation batch holds 8 prompts' groups, or one group of each prompt where there are fewer (a prompt twice
    # in one batch would take one natural step from the mean of its groups instead of one step per group)
    generation_batch = 8 * min(8, len(set(train_prompts)))
    config = NoisePPOConfig(
        output_dir=output_dir, num_inference_steps=steps, guidance_scale=RECOMMENDED_GUIDANCE_SCALES[steps],
        max_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=8, seed=seed,
        per_device_train_batch_size=generation_batch, num_generations_eval=images_per_prompt,
        per_device_eval_batch_size=256, **VARIANTS[variant],
    )
    config.max_steps = max(eval_at) // generation_batch * config.num_iterations
    trainer = NoisePPOTrainer(
        pipe, reward, args=config, train_dataset=Dataset.from_dict({"prompt": train_prompts}),
        eval_dataset={name: Dataset.from_dict({"prompt": prompts}) for name, prompts in eval_sets.items()},
        judge_funcs=["shapes_judge"], callbacks=[EvaluateAtQueries(eval_at, generation_batch, config.num_iterations)],
    )
    if variant in LAYOUT_ORACLES:  # before train(), which builds the optimiser over the generator's parameters
        captions = sorted(set(train_prompts).union(*eval_sets.values()))
        oracle = LAYOUT_ORACLES[variant]
        trainer.model.grid_encoder = LayoutOracleEncoder(trainer.model.grid_encoder, pipe, captions,
                                                         with_embeddings=oracle.with_embeddings, label_of=oracle.label_of)
    start = time.time()
    trainer.train()
    evaluations = {}  # each evaluation dataset logs an entry of its own
    for entry in trainer.state.log_history:
        if any(key.endswith("judges/shapes_judge/gain") for key in entry):
            queries = entry["step"] // config.num_iterations * generation_batch
            evaluations.setdefault(queries, {"queries": queries}).update(
                {key: value for key, value in entry.items() if key.startswith("eval_") and "judges/shapes_judge" in key})
    evaluations = list(evaluations.values())
    training_log = [
        {key: entry[key] for key in ("step", "reward", "gain_over_base", "kl", "policy/mu_rms", "step_rms") if key in entry}
        for entry in trainer.state.log_history if "reward" in entry
    ]
    return trainer, {"seconds": round(time.time() - start, 1), "evaluations": evaluations, "training_log": training_log}


def append_row(output_dir: str, part: str, row: dict) -> None:
    with open(os.path.join(output_dir, f"{part}.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({key: value for key, value in row.items() if key != "training_log"}), flush=True)


def budget(args: CurvesArguments, pipe) -> None:
    sets = {name: balanced_prompts(name, args.images_per_set) for name in ("held-out", "training")}
    train_prompts = balanced_prompts("training", args.num_training_prompts)
    for steps in args.steps:
        for reward in args.rewards:
            for seed in args.seeds:
                run_dir = os.path.join(args.output_dir, f"budget-{args.variant}-{reward}-{steps}-steps-seed-{seed}")
                trainer, result = train_and_evaluate(pipe, reward, steps, seed, args.variant, train_prompts, sets, args.eval_at, run_dir)
                trainer.save_model(run_dir)  # for benchmarks.diversity
                append_row(args.output_dir, "budget", {"variant": args.variant, "reward": reward, "steps": steps, "seed": seed, **result})


def prompt_counts(args: CurvesArguments, pipe) -> None:
    training = balanced_prompts("training", max(args.prompt_counts))
    for seed in args.seeds:
        hardest = None
        # 8 first: the 1-prompt run trains on the 8 prompts' hardest for the base model (an easy one has nothing to gain)
        for count in sorted(args.prompt_counts, key=lambda count: count != 8):
            prompts = list(dict.fromkeys(training))[:count] if count < len(training) else training
            if count == 1 and hardest is not None:
                prompts = [hardest]
            images = max(1, args.prompt_count_images // len(prompts))
            run_dir = os.path.join(args.output_dir, f"prompts-{count}-seed-{seed}")
            # the 8-prompt run is judged prompt by prompt, to set each beside the same prompt trained alone
            eval_sets = {f"prompt-{i}": [prompt] for i, prompt in enumerate(prompts)} if count == 8 else {"training": prompts}
            _, result = train_and_evaluate(pipe, "shapes_judge", 1, seed, args.variant, prompts, eval_sets,
                                           [args.prompt_count_queries], run_dir, images_per_prompt=images)
            append_row(args.output_dir, "prompt_counts", {"variant": args.variant, "prompts": count, "seed": seed,
                                                          "queries_per_prompt": args.prompt_count_queries // count,
                                                          "prompt_list": prompts[:8], **result})
            if count == 8:  # each of the 8 alone, with the queries per prompt the 8-prompt run gave it
                base = [result["evaluations"][-1][f"eval_prompt-{i}_judges/shapes_judge/base"] for i in range(8)]
                hardest = prompts[base.index(min(base))]
                for i, prompt in enumerate(prompts):
                    alone_dir = os.path.join(args.output_dir, f"alone-seed-{seed}")
                    _, alone = train_and_evaluate(pipe, "shapes_judge", 1, seed, args.variant, [prompt], {f"prompt-{i}": [prompt]},
                                                  [args.prompt_count_queries // 8], alone_dir, images_per_prompt=images)
                    append_row(args.output_dir, "prompt_counts", {"variant": args.variant, "prompts": 1, "alone": prompt,
                                                                  "seed": seed, "queries_per_prompt": args.prompt_count_queries // 8, **alone})


@torch.no_grad()
def references(args: CurvesArguments, pipe) -> None:
    judge = resolve_reward_funcs("shapes_judge")[0]
    held_out = balanced_prompts("held-out", args.images_per_set)
    for steps in args.steps:
        guidance = RECOMMENDED_GUIDANCE_SCALES[steps]

        def images(prompts, noise):
            return pipe(prompts, latents=noise, num_inference_steps=steps, guidance_scale=guidance, output_type="pt").images

        for reward_name in args.rewards:
            reward = resolve_reward_funcs(reward_name)[0]
            # best-of-N: N noises per prompt, the training reward keeps one
            eps = torch.randn(max(args.best_of), len(held_out), 4, 8, 8, generator=torch.Generator().manual_seed(1))
            drawn = [images(held_out, eps[i]) for i in range(len(eps))]
            rewards = torch.stack([torch.tensor(reward(images=im, prompts=held_out)) for im in drawn])
            judged = torch.stack([torch.tensor(judge(images=im, prompts=held_out)) for im in drawn])
            for n in args.best_of:
                pick = rewards[:n].argmax(dim=0)

                def gain_of_pick(scores: torch.Tensor) -> torch.Tensor:  # the kept image's score minus the first's
                    return scores[:n].gather(0, pick[None])[0] - scores[0]

                append_row(args.output_dir, "references", {"method": f"best-of-{n}", "reward": reward_name, "steps": steps,
                                                           "inference_cost": n, "held-out gain": interval_row(gain_of_pick(judged)),
                                                           "held-out reward gain": interval_row(gain_of_pick(rewards))})
            if not args.search_prompts:
                continue
            # per-prompt search: CEM on the mean of N(mu, I), each held-out prompt on its own
            prompts = list(dict.fromkeys(held_out))[: args.search_prompts]
            generator = torch.Generator().manual_seed(2)
            gains = []
            for prompt in prompts:
                mu = torch.zeros(4, 8, 8)
                for _ in range(args.search_iterations):
                    noise = mu + torch.randn(args.search_population, 4, 8, 8, generator=generator)
                    scores = torch.tensor(reward(images=images([prompt] * len(noise), noise), prompts=[prompt] * len(noise)))
                    # the best 30%; a 0/1 score ties at the threshold, so then the successes
                    threshold = scores.quantile(0.7)
                    elite = noise[scores > threshold] if (scores > threshold).any() else noise[scores >= threshold]
                    mu = mu + 0.3 * (elite.mean(dim=0) - mu)
                fresh = torch.randn(256, 4, 8, 8, generator=generator)
                base = torch.tensor(judge(images=images([prompt] * 256, fresh), prompts=[prompt] * 256))
                tuned = torch.tensor(judge(images=images([prompt] * 256, mu + fresh), prompts=[prompt] * 256))
                gains.append(tuned - base)
            append_row(args.output_dir, "references", {
                "method": "per-prompt search", "reward": reward_name, "steps": steps,
                "queries_per_prompt": args.search_iterations * args.search_population, "prompts": len(prompts),
                "held-out gain": interval_row(torch.cat(gains)),
            })


def interval_row(values: torch.Tensor) -> dict:
    stats = interval(values.tolist())
    return {"mean": stats["mean"], "ci95": (stats["ci95"][1] - stats["ci95"][0]) / 2}


def read_rows(output_dir: str, part: str) -> list[dict]:
    path = os.path.join(output_dir, f"{part}.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and 95% t-interval half-width over training seeds."""
    t95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365}
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return mean, t95.get(len(values), 1.96) * std / math.sqrt(len(values))


def gain_of(evaluation: dict, name: str) -> float:
    return next(value for key, value in evaluation.items() if key.startswith(f"eval_{name}_") and key.endswith("judges/shapes_judge/gain"))


def report(output_dir: str) -> None:
    lines = []
    runs = read_rows(output_dir, "budget")
    groups = {}
    for run in runs:
        for evaluation in run["evaluations"]:
            key = (run["variant"], run["reward"], run["steps"], evaluation["queries"])
            groups.setdefault(key, []).append((run["seed"], gain_of(evaluation, "held-out"), gain_of(evaluation, "training")))
    if groups:
        lines += ["## Judged gain against reward queries", "",
                  "| variant | reward | steps | queries | seeds | held-out gain | training gain | per seed (held-out / training) |",
                  "|---|---|---|---|---|---|---|---|"]
        for (variant, reward, steps, queries), values in sorted(groups.items()):
            held, held_ci = t_interval([v[1] for v in values])
            train, train_ci = t_interval([v[2] for v in values])
            per_seed = ", ".join(f"{v[1]:+.3f} / {v[2]:+.3f}" for v in sorted(values))
            lines.append(f"| {variant} | {reward} | {steps} | {queries:,} | {len(values)} | {held:+.3f} ± {held_ci:.3f} | "
                         f"{train:+.3f} ± {train_ci:.3f} | {per_seed} |")
    counts = read_rows(output_dir, "prompt_counts")
    if counts:
        lines += ["", "## Judged gain against the number of distinct training prompts (shapes_judge as reward, 1 step)", "",
                  "| variant | prompts | queries per prompt | seeds | gain on them |", "|---|---|---|---|---|"]
        together, per_prompt_gains = {}, {}  # per_prompt_gains[(variant, prompt)]: {"together": [...], "alone": [...]}
        for row in counts:
            evaluation = row["evaluations"][-1]
            if "alone" in row:
                gains = per_prompt_gains.setdefault((row["variant"], row["alone"]), {"together": [], "alone": []})
                gains["alone"].append(gain_of(evaluation, next(key[5:].split("_")[0] for key in evaluation if key.startswith("eval_"))))
                continue
            if row["prompts"] == 8:  # judged prompt by prompt, the same number of images each
                names = sorted({key[5:].split("_")[0] for key in evaluation if key.startswith("eval_prompt-")})
                gains = [gain_of(evaluation, name) for name in names]
                for prompt, gain in zip(row["prompt_list"], gains):
                    per_prompt_gains.setdefault((row["variant"], prompt), {"together": [], "alone": []})["together"].append(gain)
                gain = sum(gains) / len(gains)
            else:
                gain = gain_of(evaluation, "training")
            together.setdefault((row["variant"], row["prompts"], row["queries_per_prompt"]), []).append(gain)
        for (variant, count, per_prompt), values in sorted(together.items(), key=lambda item: item[0][1]):
            mean, ci = t_interval(values)
            lines.append(f"| {variant} | {count:,} | {per_prompt:,} | {len(values)} | {mean:+.3f} ± {ci:.3f} |")
        if any(gains["alone"] and gains["together"] for gains in per_prompt_gains.values()):
            lines += ["", "### The 8 prompts together against each alone (the same queries per prompt)", "",
                      "| variant | prompt | seeds | together | alone | together / alone |", "|---|---|---|---|---|---|"]
            for (variant, prompt), gains in per_prompt_gains.items():
                if gains["alone"] and gains["together"]:
                    together_mean, together_ci = t_interval(gains["together"])
                    alone_mean, alone_ci = t_interval(gains["alone"])
                    ratio = f"{together_mean / alone_mean:.2f}" if alone_mean >= 0.05 else "-"
                    lines.append(f"| {variant} | {prompt} | {len(gains['alone'])} | {together_mean:+.3f} ± {together_ci:.3f} | "
                                 f"{alone_mean:+.3f} ± {alone_ci:.3f} | {ratio} |")
    diagnostic = {}  # (variant, reward, steps, queries) -> per seed: gain_over_base over the run, the judge at its end
    for run in runs:
        logged = [entry["gain_over_base"] for entry in run["training_log"] if "gain_over_base" in entry]
        if len(logged) >= 2:
            mean = sum(logged) / len(logged)
            half_width = 1.96 * math.sqrt(sum((v - mean) ** 2 for v in logged) / (len(logged) - 1) / len(logged))
            last = run["evaluations"][-1]
            diagnostic.setdefault((run["variant"], run["reward"], run["steps"], last["queries"]), []).append(
                (run["seed"], mean, half_width, gain_of(last, "training"), run["training_log"][-1].get("policy/mu_rms", math.nan)))
    if diagnostic:
        lines += ["", "## The learning-signal diagnostic: `gain_over_base` averaged over the run (95% interval over its "
                  "logged values), beside the judged gain on training prompts at the run's end", "",
                  "| variant | reward | steps | queries | per seed: gain_over_base / judged training gain / final mu_rms |",
                  "|---|---|---|---|---|"]
        for (variant, reward, steps, queries), values in sorted(diagnostic.items()):
            cells = "; ".join(f"{mean:+.3f} ± {half:.3f} / {judged:+.3f} / {mu:.2f}" for _, mean, half, judged, mu in sorted(values))
            lines.append(f"| {variant} | {reward} | {steps} | {queries:,} | {cells} |")
    references_rows = read_rows(output_dir, "references")
    if references_rows:
        lines += ["", "## References (held-out prompts, judged; 95% intervals over images)", "",
                  "| method | selected / searched by | steps | cost | held-out judged gain | held-out gain of that reward |",
                  "|---|---|---|---|---|---|"]
        for row in references_rows:
            cost = (f"{row['inference_cost']}x inference" if "inference_cost" in row
                    else f"{row['queries_per_prompt']:,} queries per prompt, {row['prompts']} prompts")
            gain, reward_gain = row["held-out gain"], row.get("held-out reward gain")
            reward_cell = f"{reward_gain['mean']:+.3f} ± {reward_gain['ci95']:.3f}" if reward_gain else ""
            lines.append(f"| {row['method']} | {row['reward']} | {row['steps']} | {cost} | {gain['mean']:+.3f} ± {gain['ci95']:.3f} | {reward_cell} |")
    with open(os.path.join(output_dir, "curves.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if groups:
        plot(groups, references_rows, os.path.join(output_dir, "curves.png"))


def plot(groups: dict, references_rows: list[dict], path: str) -> None:
    panels = sorted({(reward, steps) for _, reward, steps, _ in groups})
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True, squeeze=False)
    for axis, (reward, steps) in zip(axes[0], panels):
        for variant in sorted({key[0] for key in groups}):
            for split, marker in (("held-out", "o"), ("training", "s")):
                points = sorted((queries, t_interval([v[1 if split == "held-out" else 2] for v in values]))
                                for (v_, r, s, queries), values in groups.items() if (v_, r, s) == (variant, reward, steps))
                if points:
                    axis.errorbar([p[0] for p in points], [p[1][0] for p in points], yerr=[p[1][1] for p in points],
                                  marker=marker, capsize=3, label=f"{variant}: {split}")
        for row in references_rows:
            if row["reward"] == reward and row["steps"] == steps and row["method"] in ("best-of-4", "best-of-8"):
                axis.axhline(row["held-out gain"]["mean"], linestyle="--", linewidth=0.8, color="grey")
                axis.text(0.01, row["held-out gain"]["mean"], f"{row['method']} (held-out, {row['inference_cost']}x inference)",
                          transform=axis.get_yaxis_transform(), fontsize=6, color="grey", va="bottom")
        axis.axhline(0, color="black", linewidth=0.6)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("reward queries")
        axis.set_title(f"trained on {reward}, {steps} step{'s' if steps > 1 else ''}", fontsize=9)
        axis.legend(fontsize=6, loc="lower right")
    axes[0][0].set_ylabel("judged gain over the base model")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(args: CurvesArguments) -> None:
    if args.variant not in VARIANTS:
        raise ValueError(f"Unknown --variant {args.variant!r}; choose one of {', '.join(VARIANTS)}.")
    unknown = sorted(set(args.parts) - {"budget", "prompt_counts", "references"})
    if unknown:
        raise ValueError(f"Unknown --parts {unknown}; choose from budget, prompt_counts, references.")
    os.makedirs(args.output_dir, exist_ok=True)
    if not args.report_only:
        torch.set_num_threads(args.threads)
        pipe = load_shapes_pipeline()
        pipe.set_progress_bar_config(disable=True)
        for part in args.parts:
            {"budget": budget, "prompt_counts": prompt_counts, "references": references}[part](args, pipe)
    report(args.output_dir)


if __name__ == "__main__":
    (curves_args,) = TrlParser(CurvesArguments).parse_args_and_config()
    main(curves_args)
