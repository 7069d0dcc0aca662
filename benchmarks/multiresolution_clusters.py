"""Prototype, measured and taken out (docs/benchmarks.md, "Prompts that pick their template by reward"): templates at
several cluster resolutions, summed: a prompt's grid is the sum of its clusters' templates over k-means partitions of
the training prompts with `--levels` clusters each, `beta=0`, on the shell.

python -m benchmarks.multiresolution_clusters --levels 1 12 48 --seed 0 --output_dir DIR
"""
import argparse
import copy
import os

import torch
from torch import nn

import benchmarks.curves as curves
from trl_noise_ppo import NoisePPOTrainer
from trl_noise_ppo.noise_generator import PromptClustersGridEncoder

LEVELS = [1, 12, 48]


class MultiResolutionClusters(nn.Module):
    def __init__(self, config, features):
        super().__init__()
        self.encoders = nn.ModuleList()
        for k in LEVELS:
            level_config = copy.deepcopy(config)
            level_config.num_clusters = k
            encoder = PromptClustersGridEncoder(level_config)
            encoder.fit(features)
            self.encoders.append(encoder)

    def forward(self, *args):
        return sum(encoder(*args) for encoder in self.encoders)


class MultiResolutionTrainer(NoisePPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        features = self._prompt_features(self.pipeline, self.train_dataset, self.model.config, self.args)
        self.model.grid_encoder = MultiResolutionClusters(self.model.config, features)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--reward", default="shapes_alignment")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval_at", type=int, nargs="+", default=[25600, 64000])
    parser.add_argument("--levels", type=int, nargs="+", default=LEVELS)
    parser.add_argument("--output_dir", required=True)
    a = parser.parse_args()
    LEVELS[:] = a.levels
    variant = "multires=" + "-".join(map(str, LEVELS))
    curves.VARIANTS[variant] = {"generator_architecture": "prompt_clusters", "beta": 0.0, "project_to_shell": True}
    curves.NoisePPOTrainer = MultiResolutionTrainer
    args = curves.CurvesArguments(output_dir=a.output_dir, parts=["budget"], steps=[1], rewards=[a.reward], seeds=[a.seed],
                                  eval_at=a.eval_at, variant=variant)
    os.makedirs(a.output_dir, exist_ok=True)
    from trl_noise_ppo.shapes import load_shapes_pipeline
    torch.set_num_threads(1)
    pipe = load_shapes_pipeline()
    pipe.set_progress_bar_config(disable=True)
    curves.budget(args, pipe)
