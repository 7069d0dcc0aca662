"""Built-in rewards by name, for configs and the command line (`reward_funcs: [pickscore, aesthetic]`)."""

import importlib
import os
import sys
from collections.abc import Callable

# name -> (module, class, keyword arguments). Imported only when the name is used, so that a reward living in
# another part of the package (the shapes world) is found once that part exists, and nothing imports in a cycle.
REWARDS: dict[str, tuple[str, str, dict]] = {
    "aesthetic": ("trl_noise_ppo.rewards.clip", "AestheticReward", {}),
    "clipscore": ("trl_noise_ppo.rewards.clip", "CLIPScoreReward", {}),
    "clipscore_hessel": (
        "trl_noise_ppo.rewards.clip",
        "CLIPScoreReward",
        {
            "model_id": "openai/clip-vit-base-patch32",
            "weight": 2.5,
            "prefix": "A photo depicts ",
            "name": "clipscore_hessel",
        },
    ),
    "pickscore": ("trl_noise_ppo.rewards.clip", "PickScoreReward", {}),
    "hpsv2": ("trl_noise_ppo.rewards.hps", "HPSv2Reward", {}),
    "hpsv2.1": ("trl_noise_ppo.rewards.hps", "HPSv2Reward", {"filename": "HPS_v2.1_compressed.pt", "name": "hpsv2.1"}),
    "imagereward": ("trl_noise_ppo.rewards.imagereward", "ImageReward", {}),
    "jpeg_compressibility": ("trl_noise_ppo.rewards.jpeg", "JPEGCompressibilityReward", {}),
    "jpeg_incompressibility": ("trl_noise_ppo.rewards.jpeg", "JPEGIncompressibilityReward", {}),
    "shapes_alignment": ("trl_noise_ppo.shapes.reward", "ShapesAlignmentReward", {}),
    "shapes_judge": ("trl_noise_ppo.shapes.judge", "ShapesJudge", {}),
}


def create_reward(name: str) -> Callable:
    """A new instance of the built-in reward `name`, with its default arguments. Nothing loads until its first
    call."""
    if name not in REWARDS:
        raise ValueError(
            f"Unknown reward '{name}'. Known rewards: {', '.join(REWARDS)}. Or pass a callable "
            f"`fn(images=..., prompts=..., **kwargs) -> list[float | None]`."
        )
    module, class_name, kwargs = REWARDS[name]
    return getattr(importlib.import_module(module), class_name)(**kwargs)


def import_reward(path: str) -> Callable:
    """The reward function a dotted import path names (`my_rewards.brightness`), found from the current folder too, as
    `trl grpo` finds `my_rewards.py` beside its config."""
    module_name, _, attribute = path.rpartition(".")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"Could not import the reward {path!r}: {error}.") from error


def resolve_reward_funcs(reward_funcs: str | Callable | list[str | Callable]) -> list[Callable]:
    """Turns names of built-in rewards, and import paths of functions (`my_rewards.brightness`), into reward
    functions; callables pass through unchanged.

    Examples:
        >>> def brightness(images, **kwargs):
        ...     return images.mean(dim=(1, 2, 3)).tolist()
        >>> [reward.__name__ for reward in resolve_reward_funcs(["jpeg_compressibility", brightness])]
        ['jpeg_compressibility', 'brightness']
    """
    if isinstance(reward_funcs, str) or callable(reward_funcs):
        reward_funcs = [reward_funcs]
    resolved = []
    for reward_func in reward_funcs:
        if isinstance(reward_func, str) and reward_func not in REWARDS and "." in reward_func:
            resolved.append(import_reward(reward_func))
        elif isinstance(reward_func, str):
            resolved.append(create_reward(reward_func))
        elif callable(reward_func):
            resolved.append(reward_func)
        else:
            raise TypeError(f"A reward is a name or a callable, not {type(reward_func).__name__}: {reward_func!r}")
    return resolved
