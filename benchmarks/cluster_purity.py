"""
How well `prompt_clusters`' k-means groups the shapes world's training prompts by layout (the 12 classes the layout
oracle reads, `benchmarks.curves.layout_of`): for each number of clusters, each prompt's cluster purity (the share of
its cluster's prompts that have the cluster's most common layout), averaged over the prompts of each kind. A layout
oracle is 1.0 everywhere.

    python -m benchmarks.cluster_purity --num_clusters 1 12 24 48
"""

import collections
from dataclasses import dataclass, field

import torch
from trl import TrlParser

from benchmarks.curves import layout_of
from trl_noise_ppo import NoiseGeneratorConfig
from trl_noise_ppo.noise_generator import PromptClustersGridEncoder, pooled_features
from trl_noise_ppo.noise_injection import generator_inputs, prompt_conditioning
from trl_noise_ppo.shapes import balanced_prompts, load_shapes_pipeline


@dataclass
class ClusterPurityArguments:
    num_clusters: list[int] = field(default_factory=lambda: [12, 24, 48])
    num_training_prompts: int = 1024


@torch.no_grad()
def main() -> None:
    (args,) = TrlParser(ClusterPurityArguments).parse_args_and_config()
    pipe = load_shapes_pipeline()
    prompts = balanced_prompts("training", args.num_training_prompts)
    layouts = [layout_of(prompt) for prompt in prompts]
    kind_of_prompt = [layout.split(",")[0] for layout in layouts]
    inputs = generator_inputs(prompt_conditioning(pipe, [{"prompt": prompt} for prompt in prompts]))
    base_config = NoiseGeneratorConfig(noise_shape=[4, 8, 8], prompt_embeds_dim=inputs["prompt_embeds"].shape[-1],
                                       architecture="prompt_clusters")
    features = pooled_features(base_config, **inputs)
    kinds = sorted(set(kind_of_prompt))
    print(f"| clusters | {' | '.join(kinds)} |\n|---|{'---|' * len(kinds)}")
    for k in args.num_clusters:
        encoder = PromptClustersGridEncoder(NoiseGeneratorConfig(**{**base_config.to_dict(), "num_clusters": k}))
        encoder.fit(features)  # as the trainer fits it, on the training prompts
        clusters = encoder.assign(features).tolist()
        members = collections.defaultdict(list)
        for cluster, layout in zip(clusters, layouts):
            members[cluster].append(layout)
        purity = {cluster: collections.Counter(ls).most_common(1)[0][1] / len(ls) for cluster, ls in members.items()}
        by_kind = collections.defaultdict(list)
        for cluster, kind in zip(clusters, kind_of_prompt):
            by_kind[kind].append(purity[cluster])
        print(f"| {k} | {' | '.join(f'{sum(by_kind[kind]) / len(by_kind[kind]):.2f}' for kind in kinds)} |", flush=True)


if __name__ == "__main__":
    main()
