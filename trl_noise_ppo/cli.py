"""
The `trl-noise-ppo` command:

    trl-noise-ppo train --config examples/sd_turbo_pickscore.yaml [--num_processes 4] [--any NoisePPOConfig field]
    trl-noise-ppo evaluate --noise_generator out/ --reward_funcs pickscore --dataset_name prompts.txt
    trl-noise-ppo generate --noise_generator out/ --prompts "a cat" "a dog" --output_dir images/

`train` launches its script through `accelerate launch`, as `trl grpo` does: the arguments its dataclasses do not know
(`--num_processes`, `--multi_gpu`, `--config_file`, ... on the command line or as keys of the `--config` YAML) go to
accelerate. `evaluate` and `generate` run in this process, on one device.

A mistake in the arguments (unknown flag, YAML error, missing file, bad value) prints one line and exits with code 2, as
`trl` and `accelerate` do; an error after that is a bug or a failure and keeps its traceback.
"""

import argparse
import importlib
import os
import shlex
import subprocess
import sys

import yaml
from accelerate.commands.launch import launch_command, launch_command_parser

from .scripts import train


COMMANDS = {
    "train": "Train a noise generator with Noise PPO (launched through accelerate).",
    "evaluate": "Compare a base pipeline with the same pipeline and a trained noise generator.",
    "generate": "Make images from prompts with a trained noise generator.",
}


# What a mistake in the arguments raises while they are parsed and checked
USER_ERRORS = (ValueError, OSError, yaml.YAMLError)
# The training processes read it to die with this command (see scripts/train.py)
LAUNCHER_PID_VARIABLE = "TRL_NOISE_PPO_LAUNCHER_PID"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        command, command_args = parse_command(argv)
    except USER_ERRORS as error:
        print(f"trl-noise-ppo: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    if command is None:
        return 0
    if command == "train":
        os.environ[train.COMMAND_VARIABLE] = shlex.join(["trl-noise-ppo", *argv])  # for the model card
        return launch(command_args)
    command.main(*command_args)
    return 0


def parse_command(argv: list[str]) -> tuple:
    """The command (`"train"` or a script module, None for help) and its checked arguments."""
    parser = argparse.ArgumentParser(prog="trl-noise-ppo", description="Noise PPO for text-to-image pipelines.")
    subparsers = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, help_text in COMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)  # each command parses its own arguments
    command = parser.parse_known_args(argv)[0].command
    if command is None:
        parser.print_help()
        return None, None
    command_args = argv[argv.index(command) + 1 :]
    if command == "train":
        return "train", train_launch_arguments(command_args)
    script = importlib.import_module(f"trl_noise_ppo.scripts.{command}")
    return script, script.make_parser(prog=f"trl-noise-ppo {command}").parse_args_and_config(command_args)


def train_launch_arguments(args: list[str]) -> argparse.Namespace:
    """Checks the training arguments here, so that mistakes show before any process starts; returns the arguments of
    `accelerate launch`, with the training script and the arguments accelerate does not know."""
    *parsed, config_remaining, cli_remaining = train.make_parser(prog="trl-noise-ppo train").parse_args_and_config(
        args, return_remaining_strings=True, separate_remaining_strings=True
    )
    launch_parser = launch_command_parser()
    launch_options = {option for action in launch_parser._actions for option in action.option_strings}
    unknown = [arg for arg in config_remaining + cli_remaining if arg.startswith("-") and arg.split("=")[0] not in launch_options]
    if unknown:
        raise ValueError(
            f"Unknown argument(s) {unknown}: neither a training argument (see `trl-noise-ppo train --help`) nor an "
            "`accelerate launch` one."
        )
    train.check_arguments(*parsed)
    script_args = _without_subsequence(args, cli_remaining)
    return launch_parser.parse_args(config_remaining + cli_remaining + ["--module", "trl_noise_ppo.scripts.train"] + script_args)


def launch(accelerate_args: argparse.Namespace) -> int:
    os.environ[LAUNCHER_PID_VARIABLE] = str(os.getpid())  # inherited by the training processes
    try:
        launch_command(accelerate_args)
    except subprocess.CalledProcessError as error:
        return error.returncode  # the training process has already printed its error
    return 0


def _without_subsequence(items: list[str], subsequence: list[str]) -> list[str]:
    """`items` without the elements of `subsequence`, which occur in `items` in this order."""
    remaining = iter(subsequence)
    current = next(remaining, None)
    kept = []
    for item in items:
        if current is not None and item == current:
            current = next(remaining, None)
        else:
            kept.append(item)
    return kept


if __name__ == "__main__":
    raise SystemExit(main())
