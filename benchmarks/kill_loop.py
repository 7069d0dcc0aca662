"""Kills `trl-noise-ppo train` with SIGKILL at random moments and checks what it leaves behind.

The run: a tiny random-weight Stable Diffusion pipeline (tests/tiny_pipelines.py, no download, no bundled weights), 4
prompts, 8 steps with gradient accumulation 2 and 2 PPO epochs per generation batch, a checkpoint after every step, then
the final model. One uninterrupted `trl-noise-ppo train` gives the reference generator.

Most of a run is start-up (imports, in the launcher and again in the training process that `accelerate launch` starts);
training and saving take a second or two. So that each run is short, this script imports the package once and forks:
a run's launcher is a fork of this process running the command's `main` (what `trl-noise-ppo train` is once it has
imported), which launches the training process as the command does; a resume is a fork running the training script's
`main`. A first forked run, checked bit-identical to the reference, gives the times to draw from.

Then, `--runs` times, a run into a fresh folder is killed with SIGKILL: every fifth at a random moment of its start-up
(the training process importing, loading, or in its first step), the others at a random moment after its first
checkpoint starts (training, writing checkpoints, writing the final model, and a little after). The
script then checks that:

- no training process outlives the command or writes after it (one killed while importing exits at its first line,
  which can take minutes on a busy machine: those are followed to the end of the loop, up to 10 minutes);
- every `checkpoint-N` is complete (trainer state, weights, rollout) and finite, and any saved generator is finite;
- no temporary file is left in the output folder outside `tmp-save/` (which the next save removes);
- where a checkpoint was left, `--resume_from_checkpoint True` ends bit-identical to the reference and leaves neither
  `tmp-save/` nor any temporary file.

Run from the repository root, on one core:

    OMP_NUM_THREADS=1 python -m benchmarks.kill_loop --runs 20     # one line per run, then the totals
"""

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.tiny_pipelines import build_pipeline
from trl_noise_ppo import cli
from trl_noise_ppo.noise_ppo_trainer import ROLLOUT_FILE, STAGING_DIR
from trl_noise_ppo.scripts import train


CHECKPOINT_FILES = ("trainer_state.json", "model.safetensors", ROLLOUT_FILE.format(0))


def train_arguments(pipeline: Path, prompts: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--pipeline", str(pipeline), "--dataset_name", str(prompts), "--reward_funcs", "jpeg_compressibility",
        "--num_inference_steps", "1", "--num_generations", "2", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--num_iterations", "2", "--max_steps", "8", "--save_strategy", "steps",
        "--save_steps", "1", "--report_to", "none", "--dtype", "float32", "--disable_tqdm", "True",
        "--output_dir", str(output_dir), *extra,
    ]


def forked(function: Callable[[], int | None], log: Path) -> int:
    """Runs `function` in a child of this process, its output (and its own children's) into `log`; returns its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with open(log, "ab") as output:
                os.dup2(output.fileno(), 1)
                os.dup2(output.fileno(), 2)
            code = function() or 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def exit_code(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def launched(arguments: list[str], log: Path) -> int:
    """`trl-noise-ppo train` with these arguments, as a fork of this process."""
    return forked(lambda: cli.main(["train", *arguments]), log)


def resumed(arguments: list[str], log: Path) -> None:
    """What the resumed command's training process does, in a fork of this process."""
    arguments = [*arguments, "--resume_from_checkpoint", "True"]
    if exit_code(forked(lambda: train.main(*train.make_parser().parse_args_and_config(arguments)), log)) != 0:
        raise SystemExit(f"A resume failed; see {log}.")


def snapshot(folder: Path) -> dict:
    return {str(path): path.stat().st_mtime_ns for path in folder.rglob("*")} if folder.exists() else {}


def finite(path: Path) -> bool:
    return all(tensor.isfinite().all() for tensor in load_file(path).values())


def temporary_files(folder: Path, outside: str | None = None) -> list[str]:
    """Paths under `folder` named as temporary files are (`.tmpXXXXXX` of safetensors, `tmpXXXXXXXX` of Python's
    tempfile), and the staging folder itself unless it is `outside`, which is not searched."""
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if outside is not None and relative.parts[0] == outside:
            continue
        if path.name.startswith((".tmp", "tmp")):
            found.append(str(relative))
    return found


def children_of(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def wait_for(path: Path, pid: int) -> float:
    """Seconds until `path` exists or process `pid` has ended."""
    start = time.monotonic()
    while not path.exists() and alive(pid):
        time.sleep(0.01)
    return time.monotonic() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    os.environ.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())  # for the training processes
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="kill_loop_"))
    pipeline, prompts, log = work / "pipeline", work / "prompts.txt", work / "log.txt"
    build_pipeline("sd").save_pretrained(pipeline)
    prompts.write_text("a red circle\na blue square\na green triangle\na yellow star\n")

    # the reference: the command itself, from its first import
    start = time.monotonic()
    command = [sys.executable, "-m", "trl_noise_ppo.cli", "train", *train_arguments(pipeline, prompts, work / "reference")]
    if subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
        raise SystemExit(f"The uninterrupted run failed; run it by hand to see why: {' '.join(command)}")
    reference = load_file(work / "reference" / "model.safetensors")
    print(f"uninterrupted run (trl-noise-ppo train, from its first import): {time.monotonic() - start:.1f} s", flush=True)
    # the same in a fork: start-up is the training process's imports, loading and first step; the staging folder
    # appears with the first checkpoint, and the model card is the last file the run writes
    pid = launched(train_arguments(pipeline, prompts, work / "forked"), log)
    start_up = wait_for(work / "forked" / STAGING_DIR, pid)
    writing = wait_for(work / "forked" / "README.md", pid)
    if exit_code(pid) != 0:
        raise SystemExit(f"The forked uninterrupted run failed; see {log}.")
    forked_reference = load_file(work / "forked" / "model.safetensors")
    if any(not torch.equal(forked_reference[name], value) for name, value in reference.items()):
        raise SystemExit("The forked run does not end where the command does: this loop would measure the wrong thing.")
    print(f"forked run, identical result: {start_up:.1f} s start-up, then {writing:.1f} s from the first checkpoint to "
          "the last file of the saved model", flush=True)

    totals = dict(runs=0, killed_in_start_up=0, killed_in_writing=0, finished_before_kill=0, checkpoints_left=0,
                  resumed=0, wrong_resume=0, incomplete=0, non_finite=0, stray_temporary_files=0,
                  temporary_files_after_resume=0, slow_to_exit=0, surviving_processes=0, written_after_kill=0)
    pending = []  # (run, its processes alive a little after the kill, its output folder, what was in it at the kill)
    loop_start = time.monotonic()
    for run in range(args.runs):
        output_dir = work / f"run{run}"
        arguments = train_arguments(pipeline, prompts, output_dir)
        pid = launched(arguments, log)
        if run % 5 == 4:
            phase, delay = "start_up", rng.uniform(0, start_up)
        else:
            phase, delay = "writing", rng.uniform(0, 1.2 * writing)  # and a little after: the processes ending
            wait_for(output_dir / STAGING_DIR, pid)
        time.sleep(delay)
        finished = not alive(pid)
        children = [] if finished else children_of(pid)
        os.kill(pid, signal.SIGKILL)
        exit_code(pid)
        files_at_kill = snapshot(output_dir)
        waited = time.monotonic()
        while any(alive(child) for child in children) and time.monotonic() - waited < 5:
            time.sleep(0.1)
        slow = [child for child in children if alive(child)]
        if slow:  # still importing, on a busy machine: followed to the end of the loop
            pending.append((run, slow, output_dir, files_at_kill))
        written_after_kill = snapshot(output_dir) != files_at_kill

        checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
        incomplete = [c.name for c in checkpoints if not all((c / name).is_file() for name in CHECKPOINT_FILES)]
        saved = [c / "model.safetensors" for c in checkpoints if (c / "model.safetensors").is_file()]
        saved += [output_dir / "model.safetensors"] if (output_dir / "model.safetensors").is_file() else []
        non_finite = [str(path.relative_to(output_dir)) for path in saved if not finite(path)]
        stray = temporary_files(output_dir, outside=STAGING_DIR) if output_dir.exists() else []

        wrong, left_after_resume = False, []
        if checkpoints:
            resumed(arguments, log)
            result = load_file(output_dir / "model.safetensors")
            wrong = any(not torch.equal(result[name], value) for name, value in reference.items())
            left_after_resume = temporary_files(output_dir)
            totals["resumed"] += 1

        totals["runs"] += 1
        totals["finished_before_kill" if finished else f"killed_in_{phase}"] += 1
        totals["checkpoints_left"] += len(checkpoints)
        totals["wrong_resume"] += wrong
        totals["incomplete"] += bool(incomplete)
        totals["non_finite"] += bool(non_finite)
        totals["stray_temporary_files"] += bool(stray)
        totals["temporary_files_after_resume"] += bool(left_after_resume)
        totals["slow_to_exit"] += bool(slow)
        totals["written_after_kill"] += written_after_kill and not slow  # for a slow run: counted at the end
        print(f"run {run:2d}: killed {delay:4.2f} s into {phase.replace('_', '-')}{' (already finished)' if finished else ''}, "
              f"{len(checkpoints)} checkpoints left, staging folder {'left' if (output_dir / STAGING_DIR).exists() else '-'}, "
              f"stray temporary files {stray}, incomplete {incomplete}, non-finite {non_finite}, processes alive 5 s "
              f"after the kill {len(slow)}, written after kill {written_after_kill}; resumed from "
              f"{checkpoints[-1].name + ': ' + ('DIFFERS' if wrong else 'identical') if checkpoints else 'nothing'}"
              f"{', temporary files left ' + str(left_after_resume) if left_after_resume else ''}", flush=True)
        if not slow:
            shutil.rmtree(output_dir, ignore_errors=True)  # a run killed early made none

    # A training process killed while importing exits when it reaches its first line; each must end by itself,
    # without writing anything
    waited = time.monotonic()
    while any(alive(child) for _, slow, _, _ in pending for child in slow) and time.monotonic() - waited < 600:
        time.sleep(1)
    for run, slow, output_dir, files_at_kill in pending:
        survivors = [child for child in slow if alive(child)]
        for child in survivors:  # ours to end
            os.kill(child, signal.SIGKILL)
        written_after_kill = snapshot(output_dir) != files_at_kill
        totals["surviving_processes"] += bool(survivors)
        totals["written_after_kill"] += written_after_kill
        print(f"run {run:2d}: of {len(slow)} process(es) alive 5 s after the kill, {len(survivors)} still alive "
              f"{time.monotonic() - waited:.0f} s later; written after kill {written_after_kill}")
    print(f"{args.runs} runs in {time.monotonic() - loop_start:.0f} s")
    print(" ".join(f"{name}={value}" for name, value in totals.items()))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
