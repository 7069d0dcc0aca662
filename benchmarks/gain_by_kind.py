"""Where a trained generator's judged gain comes from: its gain over the base model for each kind of prompt (single
objects, counts, pairs, rows), on held-out and on training prompts, the base model and the generator sharing their
noise (the same `torch.Generator` seed for both). Takes the folders `benchmarks.curves` saves a generator in, the
layout and count oracles' included (rebuilt with their `LayoutOracleEncoder`, which reads the shapes world's captions).

    python -m benchmarks.gain_by_kind --generators outputs/curves/budget-layout_oracle+beta=0+project_to_shell-shapes_judge-1-steps-seed-0
"""

import collections
from dataclasses import dataclass, field

import safetensors.torch
import torch
from trl import TrlParser

from benchmarks.curves import LAYOUT_ORACLES, LayoutOracleEncoder
from trl_noise_ppo import NoiseGenerator, NoiseGeneratorConfig, NoisePPOPipeline
from trl_noise_ppo.evaluation import interval
from trl_noise_ppo.shapes import RECOMMENDED_GUIDANCE_SCALES, ShapesJudge, balanced_prompts, load_shapes_pipeline, parse_caption


@dataclass
class GainByKindArguments:
    generators: list[str] = field(default_factory=list, metadata={"help": "Folders of generators saved by benchmarks.curves."})
    steps: int = 1
    prompts_per_set: int = 512
    images_per_prompt: int = 2
    batch_size: int = 256
    num_training_prompts: int = 1024


def load_generator(folder: str, pipe, captions: list[str]) -> NoiseGenerator:
    oracle = next((oracle for name, oracle in LAYOUT_ORACLES.items() if f"budget-{name}-" in folder), None)
    if oracle is None:
        return NoiseGenerator.from_pretrained(folder)
    generator = NoiseGenerator(NoiseGeneratorConfig.from_pretrained(folder))
    generator.grid_encoder = LayoutOracleEncoder(generator.grid_encoder, pipe, captions,
                                                 with_embeddings=oracle.with_embeddings, label_of=oracle.label_of)
    generator.load_state_dict(safetensors.torch.load_file(f"{folder}/model.safetensors"))
    return generator


@torch.no_grad()
def verdicts(pipe, prompts: list[str], judge, args: GainByKindArguments) -> torch.Tensor:
    judged = []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        images = pipe(batch, num_inference_steps=args.steps, guidance_scale=RECOMMENDED_GUIDANCE_SCALES[args.steps],
                      num_images_per_prompt=args.images_per_prompt, output_type="pt",
                      generator=torch.Generator().manual_seed(start)).images
        judged += judge(images=images, prompts=[prompt for prompt in batch for _ in range(args.images_per_prompt)])
    return torch.tensor(judged, dtype=torch.float32)


def main(args: GainByKindArguments) -> None:
    pipe = load_shapes_pipeline()
    pipe.set_progress_bar_config(disable=True)
    judge = ShapesJudge()
    sets = {split: balanced_prompts(split, args.prompts_per_set) for split in ("held-out", "training")}
    captions = sorted(set(balanced_prompts("training", args.num_training_prompts)).union(*sets.values()))
    kinds = {split: [parse_caption(p).kind for p in prompts for _ in range(args.images_per_prompt)] for split, prompts in sets.items()}
    names = sorted(set(kinds["held-out"]))
    base = {split: verdicts(pipe, prompts, judge, args) for split, prompts in sets.items()}
    print(f"{args.prompts_per_set} prompts x {args.images_per_prompt} images per set, {args.steps} step(s); judged gain "
          "over the base model on the same noise, 95% interval over images\n")
    print(f"| generator | prompts | {' | '.join(names)} | all |\n|---|---|{'---|' * len(names)}---|")
    for split in sets:
        rates = [base[split][[k == name for k in kinds[split]]].mean().item() for name in names]
        print(f"| base model (judged success) | {split} | {' | '.join(f'{r:.3f}' for r in rates)} | {base[split].mean():.3f} |")
    for folder in args.generators:
        pipeline = NoisePPOPipeline(pipe, load_generator(folder, pipe, captions).eval())
        for split, prompts in sets.items():
            gains = collections.defaultdict(list)
            for kind, gain in zip(kinds[split], (verdicts(pipeline, prompts, judge, args) - base[split]).tolist()):
                gains[kind].append(gain)
                gains["all"].append(gain)
            cells = [interval(gains[name]) for name in [*names, "all"]]
            print(f"| {folder.rstrip('/').split('/')[-1]} | {split} | "
                  + " | ".join(f"{c['mean']:+.3f} ± {c['ci95'][1] - c['mean']:.3f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    (gain_by_kind_args,) = TrlParser(GainByKindArguments).parse_args_and_config()
    main(gain_by_kind_args)
