"""Finding and loading reward weights: local folders or the Hugging Face Hub, safely, with clear errors."""

import contextlib
import pickle
import re
from collections.abc import Iterator

import safetensors.torch
import torch
from huggingface_hub import constants as hub_constants
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.utils import cached_file


class MissingWeightsError(FileNotFoundError):
    """A reward's weights are neither in the given local folder nor in the Hugging Face cache, and could not be
    downloaded."""


@contextlib.contextmanager
def explain_missing_weights(repo_id: str, argument: str) -> Iterator[None]:
    """Turns an `OSError` raised while loading `repo_id` into a `MissingWeightsError` that says how to get it.

    `argument` is the name of the reward's parameter that takes `repo_id`, e.g. "model_id".
    """
    try:
        yield
    except OSError as error:
        offline = " (HF_HUB_OFFLINE is set)" if hub_constants.HF_HUB_OFFLINE else ""
        raise MissingWeightsError(
            f"Could not load '{repo_id}': it is not a local folder holding the needed files, it is not in the "
            f"Hugging Face cache, and it could not be downloaded{offline}. On a machine with network access run "
            f"`hf download {repo_id}` (then copy the cache, $HF_HOME or ~/.cache/huggingface, to this machine), or "
            f"download the repository to a folder and pass that folder as `{argument}=`. Cause: {error}"
        ) from error


def hub_file(repo_id: str, filename: str, argument: str) -> str:
    """Local path of `filename` in the folder `repo_id`, or in the Hub repository `repo_id` (cached or downloaded)."""
    with explain_missing_weights(repo_id, argument):
        return cached_file(repo_id, filename)


def load_tensor_file(path: str) -> dict:
    """Loads a checkpoint without running pickled code.

    `.safetensors` files are read directly; PyTorch pickles are read with `torch.load(weights_only=True)`, which
    admits only tensors, containers, strings and numbers. A checkpoint that needs any other class is refused
    rather than unpickled.
    """
    if path.endswith(".safetensors"):
        return safetensors.torch.load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds Python objects other than tensors, which are not unpickled for safety. On a machine "
            f"where you trust the file, load it with torch.load, save its tensors with safetensors.torch.save_file, "
            f"and pass the .safetensors file instead. Cause: {error}"
        ) from error


def rename(name: str, rules: list[tuple[str, str]]) -> str:
    """Applies every `(pattern, replacement)` regular-expression rule to a weight name, in order."""
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


def build_model_from_weights(
    model_class: type[PreTrainedModel],
    config: PreTrainedConfig,
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype,
    **model_kwargs,
) -> PreTrainedModel:
    """Builds `model_class(config, **model_kwargs)` holding exactly the weights of `state_dict`.

    A missing, unexpected or mis-shaped weight is an error here: transformers would only log it and leave a
    randomly initialised weight, which would make a reward silently meaningless.
    """
    model, loading_info = model_class.from_pretrained(
        None, config=config, state_dict=state_dict, dtype=dtype, output_loading_info=True, **model_kwargs
    )
    mismatches = {
        kind: sorted(map(str, names))
        for kind, names in loading_info.items()
        if kind in ("missing_keys", "unexpected_keys", "mismatched_keys") and names
    }
    if mismatches:
        raise ValueError(f"The checkpoint does not match {model_class.__name__}({config.model_type}): {mismatches}")
    return model.eval()
