"""Prototype, measured and taken out (docs/benchmarks.md, "Prompts that pick their template by reward"): a mixture of
`--clusters` templates on the shell, whose gate (a linear readout of the prompt's standardised features) learns by
reward which template each prompt takes. Each sample's template is drawn from the gate by a hash of its `eps`, so
that the same `eps` gives the same noise; the natural step moves each template by the advantages of the samples that
drew it and each gate logit by their mean advantage.

python -m benchmarks.mixture_policy --gate uniform|clusters [--gate_scale 0.1] [--logit_step 1] [--greedy_eval] --seed 0 --output_dir DIR
python -m benchmarks.mixture_policy --routing --output_dir DIR/budget-mixture_policy+gate=...-seed-0   # the saved gate's routing
"""
import argparse
import collections
import math
import os
from typing import NamedTuple

import torch
from safetensors.torch import load_file
from torch import nn

import benchmarks.curves as curves
from trl_noise_ppo import NoisePPOTrainer
from trl_noise_ppo.noise_generator import NoiseGenerator, NoiseGeneratorConfig, pooled_features
from trl_noise_ppo.noise_injection import generator_inputs, prompt_conditioning
from trl_noise_ppo.shapes import balanced_prompts, load_shapes_pipeline
from trl_noise_ppo.shapes.render import parse_caption

SETTINGS = {"logit_step": 1.0, "gate_scale": 0.1, "greedy_eval": False}


def component_of(eps: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    u = torch.frac(10.0 * eps.flatten(1).double().pow(2).sum(dim=1)).float()
    cdf = torch.softmax(logits.float(), dim=-1).cumsum(dim=-1)
    return (u[:, None] > cdf).sum(dim=1).clamp(max=logits.shape[-1] - 1)


class MixtureNoise(NamedTuple):
    mean: torch.Tensor  # E[x] (B, *S)
    log_std: torch.Tensor  # (B, *S)
    component_means: torch.Tensor  # (B, K, *S)
    logits: torch.Tensor  # (B, K)

    def sample(self, eps):
        if SETTINGS["greedy_eval"] and getattr(MixtureNoise, "greedy", False):
            k = self.logits.argmax(dim=-1)
        else:
            k = component_of(eps, self.logits)
        chosen = self.component_means[torch.arange(len(k)), k]
        return chosen + torch.exp(self.log_std) * eps

    def recovered_components(self, x):
        K = self.logits.shape[-1]
        candidates = []
        for k in range(K):
            eps = x - self.component_means[:, k]
            candidates.append(component_of(eps, self.logits) == k)
        ok = torch.stack(candidates, dim=1)  # (B, K)
        distance = (x[:, None] - self.component_means).flatten(2).pow(2).sum(-1)
        distance = torch.where(ok, distance, torch.full_like(distance, float("inf")))
        return distance.argmin(dim=1)

    def log_prob(self, x):
        D = x[0].numel()
        log_n = (-0.5 * (x[:, None] - self.component_means).flatten(2).pow(2) - 0.5 * math.log(2 * math.pi)).sum(-1)
        return torch.logsumexp(torch.log_softmax(self.logits, -1) + log_n, dim=-1) / D

    def kl_to_prior(self):
        p = torch.softmax(self.logits, -1)
        return (p * (0.5 * self.component_means.flatten(2).pow(2).mean(-1))).sum(-1)

    def natural_step(self, x, advantages, group_size, step_size, std_step_size, beta):
        K = self.logits.shape[-1]
        k = self.recovered_components(x)
        onehot = nn.functional.one_hot(k, K).float()  # (N, K)
        A = advantages.float()
        z = x[:, None] - self.component_means  # (N, K, *S)
        w = (onehot * A[:, None]).view(*onehot.shape, *[1] * (x.ndim - 1))

        def group_sum(v):
            s = v.view(-1, group_size, *v.shape[1:]).sum(dim=1)
            return s.repeat_interleave(group_size, dim=0)

        counts = group_sum(onehot)  # (N, K)
        mean_Az = group_sum(w * z) / counts.clamp(min=1).view(*counts.shape, *[1] * (x.ndim - 1))
        component_means = self.component_means + step_size * (mean_Az - beta * self.component_means)
        mean_A = group_sum(onehot * A[:, None]) / counts.clamp(min=1)
        logits = self.logits + SETTINGS["logit_step"] * mean_A
        p = torch.softmax(logits, -1)
        mean = (p.view(*p.shape, *[1] * (x.ndim - 1)) * component_means).sum(1)
        return MixtureNoise(mean, self.log_std, component_means, logits)

    def squared_distance(self, target):
        means = (self.component_means - target.component_means).flatten(2).pow(2).mean(-1).sum(-1)
        return means + (self.logits - target.logits).pow(2).mean(-1)

    def repeat_interleave(self, repeats):
        return MixtureNoise(*(v.repeat_interleave(repeats, dim=0) for v in self))


class MixtureNoiseGenerator(NoiseGenerator):
    def forward(self, prompt_embeds=None, pooled_prompt_embeds=None, prompt_attention_mask=None):
        enc = self.grid_encoder
        K = self.config.num_clusters
        channels, height, width = self._image_shape()
        grid = enc.templates(torch.eye(K, device=enc.templates.weight.device))
        grid = grid.view(K, self.config.grid_channels, self.config.grid_size, self.config.grid_size)
        grid = self.upsampler(grid)
        if grid.shape[-2:] != (height, width):
            grid = nn.functional.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
        means = self.head(grid)  # (K, C, H, W)
        features = pooled_features(self.config, prompt_embeds, pooled_prompt_embeds, prompt_attention_mask)
        features = (features.float() - enc.feature_shift) / enc.feature_scale
        logits = self.gate(features)
        B = len(logits)
        component_means = means.unsqueeze(0).expand(B, *means.shape)
        p = torch.softmax(logits, -1)
        mean = (p[:, :, None, None, None] * component_means).sum(1)
        return MixtureNoise(mean, torch.zeros_like(mean), component_means, logits)


class MixtureTrainer(NoisePPOTrainer):
    init_from_clusters = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self.model
        enc = model.grid_encoder
        dim = enc.centroids.shape[1]
        model.gate = nn.Linear(dim, model.config.num_clusters)
        nn.init.zeros_(model.gate.weight)
        nn.init.zeros_(model.gate.bias)
        if self.init_from_clusters:
            # logits = 2 * onehot(nearest centroid) approximated linearly: 2 * (c_k . f - |c_k|^2 / 2) / scale
            with torch.no_grad():
                model.gate.weight.copy_(SETTINGS["gate_scale"] * enc.centroids)
                model.gate.bias.copy_(-0.5 * SETTINGS["gate_scale"] * enc.centroids.pow(2).sum(-1))
        model.__class__ = MixtureNoiseGenerator

    def evaluate(self, *args, **kwargs):
        MixtureNoise.greedy = True
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            MixtureNoise.greedy = False


@torch.no_grad()
def routing(folder: str) -> None:
    """Which template a saved mixture's gate gives each of 512 training and 512 held-out prompts, by kind of scene."""
    config = NoiseGeneratorConfig.from_pretrained(folder)
    state = load_file(f"{folder}/model.safetensors")
    gen = MixtureNoiseGenerator(config)
    gen.gate = nn.Linear(state["gate.weight"].shape[1], config.num_clusters)
    print(gen.load_state_dict(state))
    pipe = load_shapes_pipeline()
    pipe.set_progress_bar_config(disable=True)
    for name in ("training", "held-out"):
        prompts = balanced_prompts(name, 512)
        policy = gen(**generator_inputs(prompt_conditioning(pipe, [{"prompt": p} for p in prompts])))
        p = torch.softmax(policy.logits, -1)
        top = p.argmax(-1)
        print(name, "mean max p %.2f" % p.max(-1).values.mean(), "templates used", torch.bincount(top, minlength=config.num_clusters).tolist())
        table = collections.defaultdict(collections.Counter)
        for prompt, k in zip(prompts, top.tolist()):
            s = parse_caption(prompt)
            key = s.kind + (f" {len(s.objects)}" if s.kind == "count" else "")
            table[key][k] += 1
        for key in sorted(table):
            c = table[key]
            n = sum(c.values())
            print(f"  {key:10s} n={n:3d} purity {c.most_common(1)[0][1]/n:.2f}", dict(c.most_common(4)))
        print("  template rms", policy.component_means[0].flatten(1).pow(2).mean(1).sqrt().numpy().round(2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--gate", choices=["uniform", "clusters"], default="uniform",
                        help="the gate's start: every template alike, or each prompt's k-means cluster's (x gate_scale)")
    parser.add_argument("--gate_scale", type=float, default=0.1)
    parser.add_argument("--logit_step", type=float, default=1.0)
    parser.add_argument("--greedy_eval", action="store_true", help="evaluate with each prompt's likeliest template")
    parser.add_argument("--reward", default="shapes_alignment")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval_at", type=int, nargs="+", default=[25600, 64000])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--clusters", type=int, default=12)
    parser.add_argument("--routing", action="store_true", help="only print the routing of the mixture saved in output_dir")
    a = parser.parse_args()
    if a.routing:
        routing(a.output_dir)
        raise SystemExit
    SETTINGS.update(logit_step=a.logit_step, gate_scale=a.gate_scale, greedy_eval=a.greedy_eval)
    MixtureTrainer.init_from_clusters = a.gate == "clusters"
    variant = f"mixture_policy+gate={a.gate}"
    curves.VARIANTS[variant] = {"generator_architecture": "prompt_clusters", "beta": 0.0, "project_to_shell": True,
                                "generator_num_clusters": a.clusters}
    curves.NoisePPOTrainer = MixtureTrainer
    args = curves.CurvesArguments(output_dir=a.output_dir, parts=["budget"], steps=[1], rewards=[a.reward], seeds=[a.seed],
                                  eval_at=a.eval_at, variant=variant)
    os.makedirs(a.output_dir, exist_ok=True)
    torch.set_num_threads(1)
    pipe = load_shapes_pipeline()
    pipe.set_progress_bar_config(disable=True)
    curves.budget(args, pipe)
