"""Noise PPO for TRL: fine-tune a text-to-image pipeline by learning, with PPO, the initial noise it starts from."""

__version__ = "0.1.0"

from .noise_generator import NoiseDistribution, NoiseGenerator, NoiseGeneratorConfig, load_noise_generator
from .noise_pipeline import NoisePPOPipeline
from .noise_ppo_config import NoisePPOConfig
from .noise_ppo_trainer import NoisePPOTrainer


__all__ = [
    "NoiseDistribution",
    "NoiseGenerator",
    "NoiseGeneratorConfig",
    "NoisePPOConfig",
    "NoisePPOPipeline",
    "NoisePPOTrainer",
    "load_noise_generator",
]
