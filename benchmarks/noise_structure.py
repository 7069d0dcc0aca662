"""What the good noise of the shapes world looks like: is it shared across prompts, or found prompt by prompt?

Whatever the learner, a generator can improve prompts it has seen few times, or never, only through what the good
noises of different prompts have in common. Four measurements on the bundled model at 1 step (guidance 1), each
judged by `shapes_judge`, which is also the score optimised here (the question is what a perfect reward can teach):

1. **Per-prompt means.** For each of `--prompts`, a mean `mu` of N(mu, I) found on that prompt alone by natural steps
   (`NoiseDistribution.natural_step`: `--batches` batches of 64 noises, step size 0.5), twice, from two seeds. The
   cosine between the two seeds' means of one prompt says how much of a mean is signal; between prompts, how much
   they share. Then each prompt judged with every prompt's mean (256 noises): does a mean transfer?
2. **Translation.** The cosine between the means of the same object on the left and on the right, after shifting one
   onto the other: the same pattern in another place?
3. **Linear probes.** For one prompt of each kind, a logistic regression of the judge's verdict on the noise
   (4,096 noises, fitted on 3,072): the AUC on the other 1,024 says how well one direction of the noise predicts
   success, i.e. what a mean shift can buy.
4. **One mean per kind.** A single mean shared by every training prompt of a kind (natural steps on 16,000 queries),
   judged on that kind's training and held-out prompts: a template the whole kind could share.
5. **One mean per layout.** A single mean for each of the 12 layouts (`benchmarks.curves.layout_of`), found by natural
   steps on that layout's prompts among the learning curves' 1,024 training prompts (`--layout_queries` each), then
   judged as the curves judge a generator: on 512 held-out and 512 training prompts (category-balanced), each prompt
   with its layout's mean against N(0, I) on the same eps: what sharing by layout can give, searched without a
   network or a pull to N(0, I).

    python -m benchmarks.noise_structure --output_dir outputs/noise_structure
    python -m benchmarks.noise_structure --parts layouts --output_dir outputs/noise_structure-layouts
"""

import json
import os
from dataclasses import dataclass, field

import torch
from trl import TrlParser

from benchmarks.curves import interval_row, layout_of
from trl_noise_ppo import NoiseDistribution
from trl_noise_ppo.shapes import ShapesJudge, balanced_prompts, held_out_prompts, load_shapes_pipeline, training_prompts


NOISE_SHAPE = (4, 8, 8)


@dataclass
class NoiseStructureArguments:
    output_dir: str = "outputs/noise_structure"
    parts: list[str] = field(default_factory=lambda: ["means", "probes", "kinds", "layouts"],
                             metadata={"help": "means (with translation), probes, kinds, layouts"})
    prompts: list[str] = field(default_factory=lambda: [
        "a yellow square on the right", "a yellow square on the left", "a yellow square at the top",
        "a blue triangle on the right", "a red circle on the left", "four yellow triangles",
    ])
    batches: int = 30
    probe_prompts: list[str] = field(default_factory=lambda: [
        "a yellow square on the right", "a green triangle above a yellow circle", "four yellow triangles",
        "a red circle left of a blue square left of a white triangle",
    ])
    kinds: list[str] = field(default_factory=lambda: ["pair", "count", "row"])
    kind_queries: int = 16000
    layout_queries: int = 16000


class Judged:
    """The bundled pipeline at 1 step, judged: the share of images right for prompts and noises."""

    def __init__(self):
        self.pipe = load_shapes_pipeline()
        self.pipe.set_progress_bar_config(disable=True)
        self.judge = ShapesJudge()

    @torch.no_grad()
    def __call__(self, prompts: list[str], noise: torch.Tensor) -> torch.Tensor:
        verdicts = []
        for start in range(0, len(prompts), 256):
            chunk = prompts[start : start + 256]
            images = self.pipe(chunk, latents=noise[start : start + 256], num_inference_steps=1, guidance_scale=1.0,
                               output_type="pt").images
            verdicts += self.judge(images=images, prompts=chunk)
        return torch.tensor(verdicts)


def natural_steps(judged: Judged, prompts: list[str], batches: int, seed: int, group_size: int = 64) -> torch.Tensor:
    """One mean of N(mu, I) for all of `prompts`, moved by natural steps up the judge's group-normalised verdicts."""
    generator = torch.Generator().manual_seed(seed)
    policy = NoiseDistribution(torch.zeros(1, *NOISE_SHAPE), torch.zeros(1, *NOISE_SHAPE))
    for _ in range(batches):
        batch = [prompts[i] for i in torch.randint(len(prompts), (group_size,), generator=generator)]
        repeated = policy.repeat_interleave(group_size)
        noise = repeated.sample(torch.randn(group_size, *NOISE_SHAPE, generator=generator))
        verdicts = judged(batch, noise)
        advantages = (verdicts - verdicts.mean()) / (verdicts.std() + 1e-4)
        target = repeated.natural_step(noise, advantages, group_size, step_size=0.5, std_step_size=0.0, beta=0.0)
        policy = NoiseDistribution(target.mean[:1], target.log_std[:1])
    return policy.mean[0]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def main(args: NoiseStructureArguments) -> None:
    os.makedirs(args.output_dir, exist_ok=True)
    torch.set_num_threads(1)
    judged = Judged()
    lines, results = [], {}

    if "means" in args.parts:
        # 1. per-prompt means, two seeds
        means = {seed: [natural_steps(judged, [prompt], args.batches, seed) for prompt in args.prompts] for seed in (1, 2)}
        same = [cosine(means[1][i], means[2][i]) for i in range(len(args.prompts))]
        across = [cosine(means[1][i], means[2][j]) for i in range(len(args.prompts)) for j in range(len(args.prompts)) if i != j]
        results["same_prompt_cosine"], results["cross_prompt_cosine"] = same, across
        lines += [f"## 1. Per-prompt means ({args.batches * 64:,} queries each, two seeds)", "",
                  f"Cosine between the two seeds' means of one prompt: {', '.join(f'{c:.2f}' for c in same)} "
                  f"(mean {sum(same) / len(same):.2f}); between different prompts' means: mean {sum(across) / len(across):+.3f}, "
                  f"largest {max(across, key=abs):+.2f}.", "",
                  "Judged share of 256 images right, each prompt (row) with each prompt's mean (column; seed 1) and with none:", "",
                  "| prompt | " + " | ".join(f"mean {j + 1}" for j in range(len(args.prompts))) + " | N(0, I) |",
                  "|---|" + "---|" * (len(args.prompts) + 1)]
        eps = torch.randn(256, *NOISE_SHAPE, generator=torch.Generator().manual_seed(99))
        matrix = []
        for i, prompt in enumerate(args.prompts):
            row = [judged([prompt] * 256, mean + eps).mean().item() for mean in means[1]] + [judged([prompt] * 256, eps).mean().item()]
            matrix.append(row)
            lines.append(f"| {i + 1}. {prompt} | " + " | ".join(f"**{v:.2f}**" if j == i else f"{v:.2f}" for j, v in enumerate(row)) + " |")
        results["transfer_matrix"] = matrix

        # 2. translation: the same object's means on the left and on the right
        if {"a yellow square on the right", "a yellow square on the left"} <= set(args.prompts):
            right = (means[1][args.prompts.index("a yellow square on the right")] + means[2][args.prompts.index("a yellow square on the right")]) / 2
            left = (means[1][args.prompts.index("a yellow square on the left")] + means[2][args.prompts.index("a yellow square on the left")]) / 2
            shift = NOISE_SHAPE[2] // 2
            shifted, unshifted = cosine(right[..., shift:], left[..., :shift]), cosine(right, left)
            results["translation_cosine"] = {"shifted": shifted, "in_place": unshifted}
            lines += ["", "## 2. Translation", "",
                      f"Cosine between the means (two seeds averaged) of 'a yellow square on the right' and '... on the left': "
                      f"{unshifted:+.2f} in place, {shifted:+.2f} once the left one is shifted right by {shift} latent pixels "
                      f"(half the latent, the distance between the two anchors)."]

    if "probes" in args.parts:
        # 3. linear probes
        lines += ["", "## 3. How well one direction of the noise predicts success (logistic regression, 4,096 noises)", "",
                  "| prompt | share right | held-out AUC, fitted on 256 / 1,024 / 3,072 noises |", "|---|---|---|"]
        results["probes"] = {}
        for prompt in args.probe_prompts:
            noise = torch.randn(4096, *NOISE_SHAPE, generator=torch.Generator().manual_seed(5))
            verdicts, features = judged([prompt] * 4096, noise), noise.flatten(1)
            aucs = []
            for fitted in (256, 1024, 3072):
                weights, bias = torch.zeros(features.shape[1], requires_grad=True), torch.zeros(1, requires_grad=True)
                optimizer = torch.optim.LBFGS([weights, bias], max_iter=200)

                def closure():
                    optimizer.zero_grad()
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(features[:fitted] @ weights + bias, verdicts[:fitted])
                    loss = loss + 0.01 * weights.pow(2).sum()
                    loss.backward()
                    return loss

                optimizer.step(closure)
                scores, truth = (features[3072:] @ weights).detach(), verdicts[3072:]
                aucs.append((scores[truth > 0.5][:, None] > scores[truth < 0.5][None]).float().mean().item())
            results["probes"][prompt] = aucs
            lines.append(f"| {prompt} | {verdicts.mean():.2f} | {' / '.join(f'{auc:.2f}' for auc in aucs)} |")

    if "kinds" in args.parts:
        # 4. one mean per kind
        lines += ["", f"## 4. One mean shared by every training prompt of a kind ({args.kind_queries:,} queries)", "",
                  "| kind | judged gain, training prompts | judged gain, held-out prompts |", "|---|---|---|"]
        results["kind_means"] = {}
        for kind in args.kinds:
            mean = natural_steps(judged, training_prompts((kind,)), args.kind_queries // 64, seed=3)
            gains = {}
            for split, prompts in (("training", training_prompts((kind,))), ("held-out", held_out_prompts((kind,)))):
                prompts = (prompts * (256 // len(prompts) + 1))[:256]
                eps = torch.randn(256, *NOISE_SHAPE, generator=torch.Generator().manual_seed(7))
                gain = interval_row(judged(prompts, mean + eps) - judged(prompts, eps))
                gains[split] = (gain["mean"], gain["ci95"])
            results["kind_means"][kind] = gains
            lines.append(f"| {kind} | {gains['training'][0]:+.3f} ± {gains['training'][1]:.3f} | "
                         f"{gains['held-out'][0]:+.3f} ± {gains['held-out'][1]:.3f} |")

    if "layouts" in args.parts:
        # 5. one mean per layout
        training = balanced_prompts("training", 1024)
        by_layout = {}
        for prompt in training:
            by_layout.setdefault(layout_of(prompt), []).append(prompt)
        layout_means = {layout: natural_steps(judged, prompts, args.layout_queries // 64, seed=4) for layout, prompts in sorted(by_layout.items())}
        lines += ["", f"## 5. One mean per layout ({args.layout_queries:,} queries each, on the learning curves' training prompts)", "",
                  "| prompts | judge, N(0, I) -> the layout's mean | judged gain |", "|---|---|---|"]
        results["layout_means"] = {}
        for split in ("held-out", "training"):
            prompts = balanced_prompts(split, 512)
            eps = torch.randn(len(prompts), *NOISE_SHAPE, generator=torch.Generator().manual_seed(7))
            means = torch.stack([layout_means[layout_of(prompt)] for prompt in prompts])
            base, tuned = judged(prompts, eps), judged(prompts, means + eps)
            gain = interval_row(tuned - base)
            results["layout_means"][split] = {"base": base.mean().item(), "tuned": tuned.mean().item(), "gain": gain["mean"], "ci95": gain["ci95"]}
            lines.append(f"| {split} (512) | {base.mean():.3f} -> {tuned.mean():.3f} | {gain['mean']:+.3f} ± {gain['ci95']:.3f} |")
        results["layout_mean_rms"] = {layout: mean.pow(2).mean().sqrt().item() for layout, mean in layout_means.items()}

    with open(os.path.join(args.output_dir, "noise_structure.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.output_dir, "noise_structure.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    (structure_args,) = TrlParser(NoiseStructureArguments).parse_args_and_config()
    main(structure_args)
