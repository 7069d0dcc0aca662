"""Calling a list of reward functions on one batch, sync and async, as TRL's GRPOTrainer does."""

import asyncio
import math
import threading
from collections.abc import Callable

import torch
from trl.trainer.utils import get_callable_name, is_async_callable

_event_loop: asyncio.AbstractEventLoop | None = None
_event_loop_lock = threading.Lock()


def _reward_event_loop() -> asyncio.AbstractEventLoop:
    """The event loop that runs async rewards: one per process, on a daemon thread, as in GRPOTrainer.

    A loop of our own works whether or not the caller already runs one (a notebook does), and one loop for all
    calls keeps async clients that bind connections to their loop working from batch to batch.
    """
    global _event_loop
    with _event_loop_lock:
        if _event_loop is None:
            _event_loop = asyncio.new_event_loop()
            threading.Thread(target=_event_loop.run_forever, name="reward-funcs", daemon=True).start()
    return _event_loop


# The largest magnitude a float32 reward tensor holds; a larger Python float would become inf there
FLOAT32_MAX = torch.finfo(torch.float32).max


def _checked_rewards(output, func: Callable, prompts: list[str]) -> list[float]:
    """`output` as one float per prompt, None as NaN; anything but one number (or None) per image, or a NaN, infinite
    or beyond-float32 reward, is an error."""
    name = get_callable_name(func)
    fix = "Return a list with one float (or None) per image."
    if isinstance(output, dict | str | bytes) or not hasattr(output, "__len__"):
        raise ValueError(f"Reward function '{name}' returned {type(output).__name__}, not a list. {fix}")
    if getattr(output, "ndim", 1) != 1:
        raise ValueError(f"Reward function '{name}' returned a tensor of shape {tuple(output.shape)}, not one reward per image. {fix}")
    if len(output) != len(prompts):
        raise ValueError(
            f"Reward function '{name}' returned {len(output)} rewards for {len(prompts)} images. Return exactly one "
            f"reward per image, in order (None for an image it cannot score)."
        )
    rewards = []
    for index, raw in enumerate(output):
        if raw is None:
            rewards.append(math.nan)
            continue
        try:
            if isinstance(raw, str | bytes):
                raise TypeError
            reward = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"Reward function '{name}' returned {raw!r} for image {index}, not a number. {fix}") from None
        if not math.isfinite(reward):
            raise ValueError(
                f"Reward function '{name}' returned {reward} for image {index} (prompt {prompts[index]!r}). Rewards "
                f"must be finite: return None for an image it cannot score, and that image is left out of the "
                f"advantage statistics."
            )
        if abs(reward) > FLOAT32_MAX:
            raise ValueError(
                f"Reward function '{name}' returned {reward} for image {index} (prompt {prompts[index]!r}), beyond "
                f"float32's range (+/-{FLOAT32_MAX:.3g}). Rescale the reward."
            )
        rewards.append(reward)
    return rewards


def call_reward_funcs(
    reward_funcs: list[Callable], images: torch.Tensor, prompts: list[str], **columns
) -> torch.Tensor:
    """Scores one batch with every reward function; returns an (N, F) float32 tensor on `images.device`.

    Each function is called as `func(images=images, prompts=prompts, **columns)`, where `images` is the
    (N, 3, H, W) float tensor in [0, 1], `prompts` the N prompts, and `columns` everything else the trainer
    passes: every dataset column (a list of N values each) and `trainer_state`. Column `j` of the result holds
    `reward_funcs[j]`'s rewards, in order.

    Synchronous functions run one after another, in list order. Asynchronous ones (`async def` functions, or
    objects whose `__call__` is `async def`) then run concurrently with each other, on one private event loop
    that a daemon thread runs for all calls, and the call returns when the slowest finishes.

    A function must return one reward per image: a number, or None for an image it cannot score, which becomes
    NaN in the result (NaN-aware statistics then leave it out).

    Raises:
        ValueError: when a function returns something but one number (or None) per image, the wrong number of
            rewards, or a NaN, infinite or beyond-float32 reward. The message names the function, the problem and the fix.
        Exception: whatever a reward function raises, unchanged.

    Example:
        >>> import torch
        >>> def brightness(images, **kwargs):
        ...     return images.mean(dim=(1, 2, 3)).tolist()
        >>> async def unscorable(prompts, **kwargs):
        ...     return [None] * len(prompts)
        >>> call_reward_funcs([brightness, unscorable], torch.ones(2, 3, 8, 8), ["a", "b"])
        tensor([[1., nan],
                [1., nan]])
    """
    rewards = torch.empty(len(prompts), len(reward_funcs), dtype=torch.float32)
    async_funcs = []
    for index, func in enumerate(reward_funcs):
        if is_async_callable(func):
            async_funcs.append((index, func))
        else:
            output = func(images=images, prompts=prompts, **columns)
            rewards[:, index] = torch.tensor(_checked_rewards(output, func, prompts))

    async def run_concurrently():
        return await asyncio.gather(*(func(images=images, prompts=prompts, **columns) for _, func in async_funcs))

    if async_funcs:
        outputs = asyncio.run_coroutine_threadsafe(run_concurrently(), _reward_event_loop()).result()
        for (index, func), output in zip(async_funcs, outputs, strict=True):
            rewards[:, index] = torch.tensor(_checked_rewards(output, func, prompts))
    return rewards.to(images.device)


def runs_concurrently(func: Callable, device: str | torch.device) -> bool:
    """Whether `func` may score images while the pipeline samples more of them on `device`.

    A `concurrent` attribute decides when the function has one: `HTTPReward` sets it to True, and setting it to False
    keeps any reward out of sampling's way. Without one, `async def` functions (or objects whose `__call__` is `async
    def`) run concurrently, and so do rewards whose `device` attribute names another device than `device`. The rest
    would compete with sampling for the same device, and score after it.

    Example:
        >>> def brightness(images, **kwargs):
        ...     return images.mean(dim=(1, 2, 3)).tolist()
        >>> async def served(images, **kwargs):
        ...     return [0.0] * len(images)
        >>> runs_concurrently(brightness, "cpu"), runs_concurrently(served, "cpu")
        (False, True)
    """
    declared = getattr(func, "concurrent", None)
    if declared is not None:
        return bool(declared)
    if is_async_callable(func):
        return True
    reward_device = getattr(func, "device", None)
    if reward_device is None:
        return False
    reward_device, device = torch.device(reward_device), torch.device(device)
    return reward_device.type != device.type or _device_index(reward_device) != _device_index(device)


def _device_index(device: torch.device) -> int | None:
    # "cuda" without an index means the current device, which an empty tensor names
    return device.index if device.index is not None else torch.empty(0, device=device).device.index
