"""The library's earlier defaults, as NoisePPOConfig overrides of today's, so that the figures measured with them can
be reproduced.

`POOLED_MLP_DEFAULTS`: the natural step's defaults before the prompt clusters became the default: one MLP on the
pooled prompt embedding for every prompt, a pull of 0.02 to N(0, I), the noise as the policy samples it.
`OLD_DEFAULTS`: the defaults before the natural step: those, with PPO's clipped surrogate, a learned sigma, beta
0.01, 4 epochs per generation batch and a linearly decaying learning rate (8 prompts x 8 noises per generation batch,
as the benchmarks trained them, is also today's default)."""

POOLED_MLP_DEFAULTS = {
    "generator_architecture": "pooled_mlp",
    "generator_cluster_image_weight": 0.0,
    "generator_cluster_means": False,
    "beta": 0.02,
    "project_to_shell": False,
}

OLD_DEFAULTS = {
    **POOLED_MLP_DEFAULTS,
    "loss_type": "ppo_clip",
    "learn_sigma": True,
    "beta": 0.01,
    "num_iterations": 4,
    "lr_scheduler_type": "linear",
    "base_comparison_every": 0,
}
