"""Finding and loading reward weights: local folders or the Hugging Face Hub, safely, with clear errors."""

import contextlib
import importlib
import os
import pickle
import re
from collections.abc import Callable, Iterator
from typing import NamedTuple

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


class RequiredFile(NamedTuple):
    """A file a reward loads: `filename` in `repo_id` (a Hub id or a local folder), which the reward takes as its
    argument `argument`. Any of `alternatives` serves as well (a model's weights saved in another format)."""

    repo_id: str
    filename: str
    argument: str
    alternatives: tuple[str, ...] = ()


# What a tokenizer saved by transformers loads from (CLIP's and BERT's alike).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# The weights of a transformers model, in the formats `from_pretrained` reads (in its order of preference).
_WEIGHTS_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def transformers_model_files(repo_id: str, argument: str) -> list[RequiredFile]:
    """The files `<Model>.from_pretrained(repo_id)` needs: its config and its weights, in any format transformers
    reads."""
    return [
        RequiredFile(repo_id, "config.json", argument),
        RequiredFile(repo_id, _WEIGHTS_FILES[0], argument, alternatives=_WEIGHTS_FILES[1:]),
    ]


def _resolves(required: RequiredFile) -> bool:
    """Whether `required` is in its folder or the Hugging Face cache, or downloads now (when online)."""
    for filename in (required.filename, *required.alternatives):
        try:
            cached_file(required.repo_id, filename)
            return True
        except OSError:
            continue
    return False


def _missing_packages(reward_funcs: list[Callable]) -> list[str]:
    """`package (for <rewards>; <how to install it>)` for each optional package the rewards import
    (`required_packages()`) that does not import here."""
    needed = {}  # package -> (the rewards that need it, how to install it)
    for reward in reward_funcs:
        for package, install in (reward.required_packages() if hasattr(reward, "required_packages") else {}).items():
            needed.setdefault(package, ([], install))[0].append(reward.__name__)
    missing = []
    for package, (names, install) in needed.items():
        try:
            importlib.import_module(package)
        except ImportError:
            missing.append(f"{package} (for {', '.join(names)}; {install})")
    return missing


def check_reward_files(reward_funcs: list[Callable]) -> None:
    """Resolves every file the built-in model rewards among `reward_funcs` will load (their `required_files()`): from
    local folders, the Hugging Face cache, or the Hub when online, and imports the optional packages they need
    (`required_packages()`), so that a missing file or package stops a run before any image is generated rather than
    at the first reward call. Other callables are not checked.

    Raises one `MissingWeightsError` that lists every missing repository and file, with the `hf download` commands
    that fetch them, and every missing package; an `ImportError` that lists the missing packages if no file is missing.
    """
    packages = _missing_packages(reward_funcs)
    packages_missing = f"Python packages are missing: {', '.join(packages)}."
    resolved: dict[tuple, bool] = {}  # each file is looked up once, however many rewards need it
    files: dict[str, list[str]] = {}  # missing repository or folder -> its missing files
    needed_as: dict[str, list[str]] = {}  # -> the reward arguments that name it, e.g. "hpsv2's config_id="
    weights_missing = False
    for reward in reward_funcs:
        required_files = reward.required_files() if hasattr(reward, "required_files") else []
        for required in required_files:
            key = (required.repo_id, required.filename, required.alternatives)
            if key not in resolved:
                resolved[key] = _resolves(required)
            if resolved[key]:
                continue
            weights_missing |= bool(required.alternatives)
            repo_files, arguments = files.setdefault(required.repo_id, []), needed_as.setdefault(required.repo_id, [])
            argument = f"{reward.__name__}'s {required.argument}="
            repo_files += [required.filename] if required.filename not in repo_files else []
            arguments += [argument] if argument not in arguments else []
    if not files:
        if packages:
            raise ImportError(packages_missing)
        return
    offline = " (HF_HUB_OFFLINE is set)" if hub_constants.HF_HUB_OFFLINE else ""
    listing = "\n".join(
        f"  {repo}: {', '.join(repo_files)} (as {', '.join(needed_as[repo])})" for repo, repo_files in files.items()
    )
    commands = "\n".join(
        f"  hf download {repo} {' '.join(repo_files)}" for repo, repo_files in files.items() if not os.path.isdir(repo)
    )
    fetch = (
        f"On a machine with network access, fetch them with\n{commands}\nthen copy the Hugging Face cache ($HF_HOME, "
        f"by default ~/.cache/huggingface) to this machine. "
        if commands
        else ""
    )
    formats = (
        " Where a repository has pytorch_model.bin (or sharded weights) instead of model.safetensors, fetch those."
        if weights_missing
        else ""
    )
    raise MissingWeightsError(
        f"Reward weights are missing: these files are neither in the given folders nor in the Hugging Face cache "
        f"({hub_constants.HF_HUB_CACHE}), and could not be downloaded{offline}:\n{listing}\n{fetch}Or put the "
        f"files in a folder and pass the folder as the argument named.{formats}" + (f"\n{packages_missing}" if packages else "")
    )


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
