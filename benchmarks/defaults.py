"""The library's defaults before the natural step, as NoisePPOConfig overrides of today's, so that the
figures measured with them can be reproduced: PPO's clipped surrogate, a learned sigma, beta 0.01, 4 epochs per
generation batch and a linearly decaying learning rate (8 prompts x 8 noises per generation batch, as the benchmarks
trained them, is also today's default)."""

OLD_DEFAULTS = {
    "loss_type": "ppo_clip",
    "learn_sigma": True,
    "beta": 0.01,
    "num_iterations": 4,
    "lr_scheduler_type": "linear",
    "base_comparison_every": 0,
}
