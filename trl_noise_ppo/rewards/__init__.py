"""Reward functions for Noise PPO, called with TRL GRPO's convention:

    reward(images=<(N, 3, H, W) float tensor in [0, 1]>, prompts=<N strings>, **columns) -> N floats (or None)

See docs/rewards.md for each reward's scale, weights and licence.
"""

from .base import ModelReward
from .calling import call_reward_funcs, runs_concurrently
from .clip import AestheticReward, CLIPReward, CLIPScoreReward, PickScoreReward
from .hps import HPSv2Reward
from .imagereward import ImageReward
from .jpeg import JPEGCompressibilityReward, JPEGIncompressibilityReward
from .loading import MissingWeightsError, RequiredFile, check_reward_files
from .registry import REWARDS, create_reward, resolve_reward_funcs
from .remote import HTTPReward

__all__ = [
    "REWARDS",
    "AestheticReward",
    "CLIPReward",
    "CLIPScoreReward",
    "HPSv2Reward",
    "HTTPReward",
    "ImageReward",
    "JPEGCompressibilityReward",
    "JPEGIncompressibilityReward",
    "MissingWeightsError",
    "ModelReward",
    "PickScoreReward",
    "RequiredFile",
    "call_reward_funcs",
    "check_reward_files",
    "create_reward",
    "resolve_reward_funcs",
    "runs_concurrently",
]
