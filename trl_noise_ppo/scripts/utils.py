"""What the `trl-noise-ppo` commands share: the pipeline and prompt arguments, and loading them with clear errors."""

import dataclasses
import enum
import importlib
import json
import os
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import diffusers
from datasets import Dataset, load_dataset
from diffusers import DiffusionPipeline
from trl import TrlParser

from ..noise_generator import load_noise_generator
from ..noise_pipeline import NoisePPOPipeline
from ..rewards import REWARDS
from ..rewards.registry import import_reward


PROMPT_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _fits(value, annotation) -> bool:
    """Whether a `--config` value fits a dataclass field's annotation. A string fits any single value: argparse converts
    it, and says so when it cannot. Annotations this check does not know fit anything."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(_fits(item, args[0]) for item in value)
    if annotation is type(None):
        return value is None
    if isinstance(value, str):
        return origin is not dict and annotation is not dict
    if origin is typing.Literal:
        return value in args
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return False  # the value is no string
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, annotation)
    return True


def _described(annotation, plural: bool = False) -> str:
    """`int | None` -> "an int", `list[float]` -> "a list of floats", as a message names a field's type."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_described(arg, plural) for arg in args if arg is not type(None))
    if origin is list:
        return f"a list of {_described(args[0], plural=True)}"
    if origin is typing.Literal:
        return f"one of {list(args)}"
    name = {int: "int", float: "float", bool: "bool", str: "string", dict: "mapping"}.get(origin or annotation)
    name = name or getattr(annotation, "__name__", str(annotation))
    return f"{name}s" if plural else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


class ConfigCheckingParser(TrlParser):
    """`TrlParser`, refusing a `--config` value of the wrong type (`num_generations: [4]`, `reward_weights: 1.0`) with
    the field and its type: argparse converts only string defaults, so such a value would reach the dataclasses as it
    is and fail there with a `TypeError` naming neither."""

    def set_defaults_with_config(self, **config) -> list[str]:
        for dataclass_type in self.dataclass_types:
            hints = typing.get_type_hints(dataclass_type)
            for field in dataclasses.fields(dataclass_type):
                if field.name in config and not _fits(config[field.name], hints[field.name]):
                    raise ValueError(
                        f"The config file gives {field.name}: {config[field.name]!r}, which is not "
                        f"{_described(hints[field.name])}."
                    )
        return super().set_defaults_with_config(**config)


@dataclass
class ModelArguments:
    """
    The frozen pipeline.

    Args:
        pipeline_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            Hub id or local folder of the diffusers text-to-image pipeline (alias `--pipeline`). `evaluate` and
            `generate` default to the base pipeline recorded in the noise generator's config.
        pipeline_revision (`str` or `None`, *optional*, defaults to `None`):
            Branch, tag or commit of the pipeline on the Hub.
        variant (`str` or `None`, *optional*, defaults to `None`):
            Variant of the weight files to load, for example `"fp16"`.
        dtype (`str`, *optional*, defaults to `"auto"`):
            dtype of the frozen pipeline: `"float32"`, `"float16"`, `"bfloat16"`, or `"auto"`: bfloat16 on a GPU that
            supports it, float16 on other GPUs, float32 on the CPU. The noise generator always trains in float32.
    """

    pipeline_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or local folder of the diffusers pipeline.", "aliases": ["--pipeline"]},
    )
    pipeline_revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of the pipeline."})
    variant: str | None = field(default=None, metadata={"help": "Variant of the weight files, e.g. fp16."})
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = field(
        default="auto",
        metadata={"help": "dtype of the frozen pipeline; auto: bfloat16 (or float16) on a GPU, float32 on the CPU."},
    )


@dataclass
class PromptArguments:
    """
    The prompts.

    Args:
        dataset_name (`str` or `None`, *optional*, defaults to `None`):
            Where the prompts are: a Hub dataset id, a local file (`.txt`: one prompt per line; `.json`, `.jsonl`,
            `.csv`, `.parquet`: a table) or a local folder of such files.
        dataset_config (`str` or `None`, *optional*, defaults to `None`):
            Configuration name of a Hub dataset.
        dataset_revision (`str` or `None`, *optional*, defaults to `None`):
            Branch, tag or commit of a Hub dataset, for example `refs/convert/parquet` for a dataset that only has a
            loading script, which `datasets` 4 no longer runs.
        dataset_split (`str`, *optional*, defaults to `"train"`):
            Split of a Hub dataset or folder. A single local file is a single split and ignores this.
        prompt_column (`str`, *optional*, defaults to `"prompt"`):
            Column holding the prompts; it is renamed to `prompt`. A `.txt` file needs none.
        max_prompts (`int` or `None`, *optional*, defaults to `None`):
            Keep only the first this many prompts.
    """

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id, local .txt (one prompt per line) / .json / .jsonl / .csv / .parquet file, or folder."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of a Hub dataset."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of a Hub dataset."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a Hub dataset or folder."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompts (renamed to `prompt`)."})
    max_prompts: int | None = field(default=None, metadata={"help": "Keep only the first this many prompts."})


def _is_local_path(name: str) -> bool:
    # A Hub id is `name` or `owner/name`; anything absolute, relative to `.` or `~`, or with a file suffix is a path.
    return os.path.isabs(name) or name.startswith((".", "~")) or Path(name).suffix in (*PROMPT_FILE_BUILDERS, ".txt")


def check_local_path(name: str, what: str) -> None:
    """Raises `FileNotFoundError` if `name` is meant as a local path (see `_is_local_path`) and does not exist."""
    if _is_local_path(name) and not os.path.exists(os.path.expanduser(name)):
        raise FileNotFoundError(f"{what} {name!r} does not exist (looked for it relative to {os.getcwd()}).")


def load_prompt_dataset(args: PromptArguments) -> Dataset:
    """The prompts of `args` as a `Dataset` with a `prompt` column (and the source's other columns)."""
    if args.dataset_name is None:
        raise ValueError("No prompts given: pass --dataset_name (a Hub dataset id, a local file or a folder).")
    name = os.path.expanduser(args.dataset_name)
    check_local_path(name, "The prompt dataset")
    suffix = Path(name).suffix
    if os.path.isfile(name) and suffix == ".txt":
        lines = [line.strip() for line in Path(name).read_text().splitlines()]
        dataset = Dataset.from_dict({"prompt": [line for line in lines if line]})
    elif os.path.isfile(name):
        if suffix not in PROMPT_FILE_BUILDERS:
            raise ValueError(f"Unsupported prompt file {name!r}: use .txt (one prompt per line), {', '.join(PROMPT_FILE_BUILDERS)}.")
        dataset = load_dataset(PROMPT_FILE_BUILDERS[suffix], data_files=name, split="train")
        dataset = _prompt_column_renamed(dataset, args.prompt_column, source=args.dataset_name)
    else:
        dataset = load_dataset(name, args.dataset_config, revision=args.dataset_revision, split=args.dataset_split)
        dataset = _prompt_column_renamed(dataset, args.prompt_column, source=args.dataset_name)
    if args.max_prompts is not None:
        dataset = dataset.select(range(min(args.max_prompts, len(dataset))))
    if len(dataset) == 0:
        raise ValueError(f"The prompt dataset {args.dataset_name!r} holds no prompts.")
    return dataset


def _prompt_column_renamed(dataset: Dataset, column: str, source: str) -> Dataset:
    if column not in dataset.column_names:
        raise ValueError(
            f"The prompt dataset {source!r} has no column {column!r}; its columns are {dataset.column_names}. Pass "
            "the one holding the prompts as --prompt_column."
        )
    if column == "prompt":
        return dataset
    if "prompt" in dataset.column_names:
        dataset = dataset.remove_columns("prompt")
    return dataset.rename_column(column, "prompt")


def reward_funcs_from_names(names: list[str] | None) -> list[str | Callable]:
    """
    Checks reward names without loading any model: a built-in name (`trl_noise_ppo.rewards.REWARDS`) stays a string,
    which the trainer turns into the reward; a dotted import path (`my_rewards.brightness`, found from the current
    folder too) becomes the callable it names.
    """
    if not names:
        raise ValueError(f"No reward given: pass --reward_funcs with one or more of {', '.join(REWARDS)}, or module.function.")
    reward_funcs = []
    for name in names:
        if name in REWARDS:
            reward_funcs.append(name)
        elif "." in name:
            reward_funcs.append(import_reward(name))
        else:
            raise ValueError(
                f"Unknown reward {name!r}. Known rewards: {', '.join(REWARDS)}; or give the import path of a function, "
                "e.g. my_rewards.brightness."
            )
    return reward_funcs


def pipeline_class_of(args: ModelArguments) -> type[DiffusionPipeline] | None:
    """The diffusers class the pipeline's `model_index.json` names, read without loading the pipeline; None when that
    file cannot be read (loading the pipeline will say why) or names a class diffusers does not have (a community
    pipeline)."""
    try:
        config = DiffusionPipeline.load_config(args.pipeline_name_or_path, revision=args.pipeline_revision)
    except OSError:
        return None
    return getattr(diffusers, config.get("_class_name", ""), None)


def pipeline_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype `dtype` names; "auto" is bfloat16 on a GPU that has it, float16 on other GPUs, else float32."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_pipeline(args: ModelArguments, device: torch.device) -> DiffusionPipeline:
    """`DiffusionPipeline.from_pretrained` with the arguments' revision, variant and dtype (for `device`)."""
    check_local_path(args.pipeline_name_or_path, "The pipeline")
    return DiffusionPipeline.from_pretrained(
        args.pipeline_name_or_path,
        revision=args.pipeline_revision,
        variant=args.variant,
        dtype=pipeline_dtype(args.dtype, device),
    )


def load_prompts(prompts: list[str] | None, prompt_args: PromptArguments) -> list[str]:
    """The prompts given on the command line, or else those of the prompt dataset."""
    if (prompts is None) == (prompt_args.dataset_name is None):
        raise ValueError("Give the prompts either as --prompts \"a cat\" \"a dog\" or as --dataset_name, not both.")
    if prompts is not None:
        return prompts[: prompt_args.max_prompts]
    return load_prompt_dataset(prompt_args)["prompt"]


def load_tuned_pipeline(noise_generator: str, model_args: ModelArguments, device: torch.device) -> NoisePPOPipeline:
    """The base pipeline (`--pipeline`, or the one the generator records) wrapped with the trained generator."""
    check_local_path(noise_generator, "The noise generator")
    generator = load_noise_generator(noise_generator)
    if model_args.pipeline_name_or_path is None:
        if not generator.config.base_pipeline:
            raise ValueError(f"The noise generator {noise_generator!r} records no base pipeline; pass --pipeline.")
        model_args = replace(model_args, pipeline_name_or_path=generator.config.base_pipeline)
    pipeline = load_pipeline(model_args, device)
    pipeline.set_progress_bar_config(disable=True)
    return NoisePPOPipeline(pipeline, generator).to(device)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def image_seeds(seed: int, prompt_index: int, num_images_per_prompt: int) -> list[int]:
    """The seed of each image of one prompt: every image of a run has its own, and the same in every command."""
    first = seed + prompt_index * num_images_per_prompt
    return list(range(first, first + num_images_per_prompt))


def seeded_generators(seeds: list[int]) -> list[torch.Generator]:
    # CPU generators draw the same noise whatever the device the pipeline runs on
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def parse_pipeline_kwargs(pipeline_kwargs: dict | str | None) -> dict:
    """`--pipeline_kwargs` as a dict: given as a JSON object on the command line, or as a mapping in a YAML config."""
    if isinstance(pipeline_kwargs, str):
        try:
            pipeline_kwargs = json.loads(pipeline_kwargs)
        except json.JSONDecodeError as error:
            raise ValueError(f"--pipeline_kwargs must be a JSON object, got {pipeline_kwargs!r} ({error}).") from None
    if not isinstance(pipeline_kwargs, dict | None):
        raise ValueError(f"--pipeline_kwargs must be a JSON object, got {pipeline_kwargs!r}.")
    return dict(pipeline_kwargs or {})
