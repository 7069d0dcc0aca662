"""
How well `prompt_clusters`' k-means groups the shapes world's prompts by layout (the 12 classes the layout oracle
reads, `benchmarks.curves.layout_of`): for each image weight (`generator_cluster_image_weight`: 0 groups the prompts
by their embeddings alone) and number of clusters, each prompt's cluster purity (the share of its cluster's prompts
that have the cluster's most common layout), averaged over the prompts of each kind, for the training prompts the
clusters are fitted on and for held-out prompts assigned by the fitted generator (their purity counted among the
held-out prompts alone). A layout oracle is 1.0 everywhere.

    python -m benchmarks.cluster_purity --num_clusters 1 12 24 48 --image_weights 0 2
"""

import collections
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from trl import TrlParser

from benchmarks.curves import layout_of
from trl_noise_ppo import NoiseGeneratorConfig, NoisePPOConfig, NoisePPOTrainer
from trl_noise_ppo.noise_generator import PromptClustersGridEncoder
from trl_noise_ppo.shapes import RECOMMENDED_GUIDANCE_SCALES, balanced_prompts, load_shapes_pipeline


@dataclass
class ClusterPurityArguments:
    num_clusters: list[int] = field(default_factory=lambda: [12, 24, 48])
    image_weights: list[float] = field(default_factory=lambda: [0.0])
    num_training_prompts: int = 1024
    num_held_out_prompts: int = 512


def purity_by_kind(clusters: list[int], prompts: list[str]) -> dict[str, float]:
    layouts = [layout_of(prompt) for prompt in prompts]
    members = collections.defaultdict(list)
    for cluster, layout in zip(clusters, layouts):
        members[cluster].append(layout)
    purity = {cluster: collections.Counter(ls).most_common(1)[0][1] / len(ls) for cluster, ls in members.items()}
    by_kind = collections.defaultdict(list)
    for cluster, layout in zip(clusters, layouts):
        by_kind[layout.split(",")[0]].append(purity[cluster])
    return {kind: sum(values) / len(values) for kind, values in sorted(by_kind.items())}


@torch.no_grad()
def main() -> None:
    (args,) = TrlParser(ClusterPurityArguments).parse_args_and_config()
    pipe = load_shapes_pipeline()
    pipe.set_progress_bar_config(disable=True)
    # the shapes world's recommended 1-step call, as benchmarks.curves trains
    trainer_args = NoisePPOConfig(output_dir="unused", num_inference_steps=1, guidance_scale=RECOMMENDED_GUIDANCE_SCALES[1])
    prompts = {"training": balanced_prompts("training", args.num_training_prompts),
               "held-out": balanced_prompts("held-out", args.num_held_out_prompts)}
    datasets = {split: Dataset.from_dict({"prompt": split_prompts}) for split, split_prompts in prompts.items()}
    base_config = NoiseGeneratorConfig(noise_shape=[4, 8, 8], prompt_embeds_dim=pipe.text_encoder.config.hidden_size,
                                       architecture="prompt_clusters")
    features = {split: NoisePPOTrainer._prompt_features(pipe, dataset, list(range(len(dataset))), base_config, trainer_args)
                for split, dataset in datasets.items()}
    image_changes = None
    if any(weight > 0 for weight in args.image_weights):
        image_changes = NoisePPOTrainer._prompt_image_changes(pipe, datasets["training"], list(range(len(datasets["training"]))),
                                                              base_config, trainer_args, torch.float32)
    kinds = sorted({layout_of(prompt).split(",")[0] for prompt in prompts["training"]})
    print(f"| image weight | clusters | prompts | {' | '.join(kinds)} |\n|---|---|---|{'---|' * len(kinds)}")
    for weight in args.image_weights:
        for k in args.num_clusters:
            config = NoiseGeneratorConfig(**{**base_config.to_dict(), "num_clusters": k, "cluster_image_weight": weight})
            encoder = PromptClustersGridEncoder(config)
            # as the trainer fits it, on the training prompts
            encoder.fit(features["training"], image_changes if weight > 0 else None)
            for split in prompts:
                purity = purity_by_kind(encoder.assign(features[split]).tolist(), prompts[split])
                print(f"| {weight:g} | {k} | {split} | {' | '.join(f'{purity[kind]:.2f}' for kind in kinds)} |", flush=True)


if __name__ == "__main__":
    main()
