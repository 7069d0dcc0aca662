"""Kills `trl-noise-ppo train` and `NoisePPOPipeline.save_pretrained` with SIGKILL at random moments and checks what
they leave behind.

Three scenarios, `--runs` runs each: `train` (the command below), `hub` (the same, pushing every checkpoint to the Hub
in the background: `--push_to_hub --hub_strategy checkpoint --hub_always_push`, to a fake Hub in a local folder,
benchmarks/fake_hub.py, whose uploads are slow enough to still read the output folder while training goes on) and
`save` (`NoisePPOPipeline.save_pretrained` of a tiny pipeline, killed in a fork of this process, every second time
over an earlier save of another generator).

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
  `tmp-save/` nor any temporary file;
- with the Hub push: no upload failed (a file it listed moved or deleted before it read it), no file of `tmp-save/`
  was uploaded, and the resumed run's final upload is the reference generator.

A killed `save_pretrained` must leave the folder as the whole new save, as the earlier save, or as no pipeline
(`NoisePPOPipeline.from_pretrained` refuses it, and diffusers alone finds no `model_index.json`), never a mix, and no
temporary file outside `tmp-save/`; saving again must give the whole save, with nothing left over. (The uninterrupted
save is checked once to load with `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`.)

Run from the repository root, on one core:

    OMP_NUM_THREADS=1 python -m benchmarks.kill_loop --runs 20     # one line per run, then each scenario's totals
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
from diffusers import DiffusionPipeline
from diffusers.utils import dynamic_modules_utils
from safetensors.torch import load_file
from transformers.utils import logging as transformers_logging

from benchmarks import fake_hub
from tests.tiny_pipelines import build_pipeline
from trl_noise_ppo import NoiseGenerator, NoisePPOPipeline, cli
from trl_noise_ppo.noise_injection import discover_noise_spec, encode_prompts, generator_config_for, pipeline_arguments
from trl_noise_ppo.noise_ppo_trainer import ROLLOUT_FILE, STAGING_DIR
from trl_noise_ppo.scripts import train


CHECKPOINT_FILES = ("trainer_state.json", "model.safetensors", ROLLOUT_FILE.format(0))
SCENARIOS = ("train", "hub", "save")


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
        time.sleep(0.001)
    return time.monotonic() - start


HUB_ARGUMENTS = ("--push_to_hub", "True", "--hub_model_id", "kill-loop", "--hub_strategy", "checkpoint",
                 "--hub_always_push", "True")


def reference_run(pipeline: Path, prompts: Path, work: Path, log: Path, extra: tuple[str, ...], reference: dict) -> tuple[float, float]:
    """Seconds of a forked uninterrupted run's start-up and writing; checks that it ends at `reference`."""
    # start-up is the training process's imports, loading and first step; the staging folder appears with the first
    # checkpoint, and the model card is the last file the run writes
    output_dir = work / f"forked{'_hub' if extra else ''}"
    pid = launched(train_arguments(pipeline, prompts, output_dir, *extra), log)
    start_up = wait_for(output_dir / STAGING_DIR, pid)
    writing = wait_for(output_dir / "README.md", pid)
    if exit_code(pid) != 0:
        raise SystemExit(f"The forked uninterrupted run failed; see {log}.")
    forked_reference = load_file(output_dir / "model.safetensors")
    if any(not torch.equal(forked_reference[name], value) for name, value in reference.items()):
        raise SystemExit("The forked run does not end where the command does: this loop would measure the wrong thing.")
    print(f"forked run{' pushing to the (fake) Hub' if extra else ''}, identical result: {start_up:.1f} s start-up, then "
          f"{writing:.1f} s from the first checkpoint to the last file of the saved model", flush=True)
    return start_up, writing


def kill_training(runs: int, rng: random.Random, pipeline: Path, prompts: Path, work: Path, log: Path, reference: dict,
                  hub: bool) -> dict:
    """`runs` runs of `trl-noise-ppo train` killed at random moments (pushing every checkpoint to the fake Hub if `hub`),
    each checked and resumed; returns the totals."""
    extra = HUB_ARGUMENTS if hub else ()
    if hub:
        os.environ["FAKE_HUB_DIR"] = str(work / "hub_forked")
    start_up, writing = reference_run(pipeline, prompts, work, log, extra, reference)
    totals = dict(runs=0, killed_in_start_up=0, killed_in_writing=0, finished_before_kill=0, checkpoints_left=0,
                  staging_folder_left=0, resumed=0, wrong_resume=0, incomplete=0, non_finite=0, stray_temporary_files=0,
                  temporary_files_after_resume=0, slow_to_exit=0, surviving_processes=0, written_after_kill=0)
    if hub:
        totals.update(failed_uploads=0, staging_files_uploaded=0, wrong_final_upload=0)
    pending = []  # (run, its processes alive a little after the kill, its output folder, what was in it at the kill)
    loop_start = time.monotonic()
    for run in range(runs):
        output_dir, hub_dir = work / f"run{run}{'_hub' if hub else ''}", work / f"hub{run}"
        if hub:
            os.environ["FAKE_HUB_DIR"] = str(hub_dir)  # read by the fake Hub of this run's processes
        arguments = train_arguments(pipeline, prompts, output_dir, *extra)
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
        staging_left = (output_dir / STAGING_DIR).exists()
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
        totals["staging_folder_left"] += staging_left
        totals["wrong_resume"] += wrong
        totals["incomplete"] += bool(incomplete)
        totals["non_finite"] += bool(non_finite)
        totals["stray_temporary_files"] += bool(stray)
        totals["temporary_files_after_resume"] += bool(left_after_resume)
        totals["slow_to_exit"] += bool(slow)
        totals["written_after_kill"] += written_after_kill and not slow  # for a slow run: counted at the end
        hub_line = ""
        if hub:
            failed = (hub_dir / "errors.txt").read_text().splitlines() if (hub_dir / "errors.txt").exists() else []
            staging_uploads = [path for path in fake_hub.uploaded(hub_dir) if STAGING_DIR in Path(path).parts]
            final = hub_dir / "local" / "kill-loop" / "model.safetensors"
            wrong_final = bool(checkpoints) and not (
                final.is_file() and all(torch.equal(load_file(final)[name], value) for name, value in reference.items())
            )
            totals["failed_uploads"] += bool(failed)
            totals["staging_files_uploaded"] += bool(staging_uploads)
            totals["wrong_final_upload"] += wrong_final
            hub_line = (f"; uploads {len(fake_hub.uploaded(hub_dir))} files, failed {failed}, staging files uploaded "
                        f"{staging_uploads}{', final upload DIFFERS' if wrong_final else ''}")
        print(f"run {run:2d}: killed {delay:4.2f} s into {phase.replace('_', '-')}{' (already finished)' if finished else ''}, "
              f"{len(checkpoints)} checkpoints left, staging folder {'left' if staging_left else '-'}, "
              f"stray temporary files {stray}, incomplete {incomplete}, non-finite {non_finite}, processes alive 5 s "
              f"after the kill {len(slow)}, written after kill {written_after_kill}; resumed from "
              f"{checkpoints[-1].name + ': ' + ('DIFFERS' if wrong else 'identical') if checkpoints else 'nothing'}"
              f"{', temporary files left ' + str(left_after_resume) if left_after_resume else ''}{hub_line}", flush=True)
        if not slow:
            shutil.rmtree(output_dir, ignore_errors=True)  # a run killed early made none
            shutil.rmtree(hub_dir, ignore_errors=True)

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
    print(f"{runs} runs in {time.monotonic() - loop_start:.0f} s")
    os.environ.pop("FAKE_HUB_DIR", None)
    return totals


def files_in(folder: Path) -> dict[str, bytes]:
    """The contents of every file under `folder` but in its staging folder, by path."""
    if not folder.exists():
        return {}
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*")
            if path.is_file() and path.relative_to(folder).parts[0] != STAGING_DIR}


def kill_saves(runs: int, rng: random.Random, work: Path, log: Path) -> dict:
    """`runs` calls of `NoisePPOPipeline.save_pretrained`, each in a fork of this process killed at a random moment,
    every second one over an earlier save of another generator; each is checked and saved again; returns the totals."""
    pipe = build_pipeline("sd")
    pipe.set_progress_bar_config(disable=True)
    embeds = encode_prompts(pipe, ["a red circle"])
    spec = discover_noise_spec(pipe, {**pipeline_arguments(pipe, embeds), "num_inference_steps": 1})
    generators = [NoiseGenerator(generator_config_for(pipe, spec, embeds)) for _ in range(2)]
    torch.manual_seed(0)
    with torch.no_grad():
        for generator in generators:  # two different trained generators
            generator.head.weight.normal_(std=0.5)
    earlier, tuned = (NoisePPOPipeline(pipe, generator) for generator in generators)
    earlier.save_pretrained(work / "earlier_save")
    # the writing: from the staging folder's appearance to the end of the process
    pid = forked(lambda: tuned.save_pretrained(work / "whole_save"), log)
    wait_for(work / "whole_save" / STAGING_DIR, pid)
    start = time.monotonic()
    if exit_code(pid) != 0:
        raise SystemExit(f"An uninterrupted save failed; see {log}.")
    writing = time.monotonic() - start
    earlier_files, whole_files = files_in(work / "earlier_save"), files_in(work / "whole_save")
    # diffusers alone loads the whole save as the pipeline with its generator (it copies the folder's loader module into
    # its modules cache first: one in the work folder)
    dynamic_modules_utils.HF_MODULES_CACHE = str(work / "modules")
    sys.path.insert(0, str(work / "modules"))
    if not isinstance(DiffusionPipeline.from_pretrained(work / "whole_save", trust_remote_code=True), NoisePPOPipeline):
        raise SystemExit("DiffusionPipeline.from_pretrained(trust_remote_code=True) does not load a whole save as a NoisePPOPipeline.")
    print(f"NoisePPOPipeline.save_pretrained in a fork: {writing:.3f} s of writing, {len(whole_files)} files", flush=True)

    totals = dict(runs=0, over_an_earlier_save=0, finished_before_kill=0, staging_folder_left=0, complete_after_kill=0,
                  earlier_save_left=0, no_pipeline_left=0, wrong=0, stray_temporary_files=0, wrong_after_saving_again=0,
                  left_after_saving_again=0)
    loop_start = time.monotonic()
    for run in range(runs):
        folder = work / f"save{run}"
        over_earlier = run % 2 == 1
        if over_earlier:
            shutil.copytree(work / "earlier_save", folder)
        pid = forked(lambda: tuned.save_pretrained(folder), log)
        wait_for(folder / STAGING_DIR, pid)
        delay = rng.uniform(0, 1.2 * writing)  # and a little after: the process ending
        time.sleep(delay)
        finished = not alive(pid)
        os.kill(pid, signal.SIGKILL)
        exit_code(pid)
        left, staging_left = files_in(folder), (folder / STAGING_DIR).exists()
        if left == whole_files:
            state = "complete"
        elif left == earlier_files and over_earlier:
            state = "earlier save"
        elif "model_index.json" not in left:
            # no pipeline: loading must refuse it rather than load part of one
            try:
                NoisePPOPipeline.from_pretrained(folder)
                state = "LOADS INCOMPLETE"
            except (OSError, ValueError):
                state = "no pipeline"
        else:
            state = "MIXED"
        stray = temporary_files(folder, outside=STAGING_DIR) if folder.exists() else []
        saved_again = exit_code(forked(lambda: tuned.save_pretrained(folder), log)) == 0 and files_in(folder) == whole_files
        left_after = temporary_files(folder)
        totals["runs"] += 1
        totals["over_an_earlier_save"] += over_earlier
        totals["finished_before_kill"] += finished
        totals["staging_folder_left"] += staging_left
        totals[{"complete": "complete_after_kill", "earlier save": "earlier_save_left", "no pipeline": "no_pipeline_left"}.get(state, "wrong")] += 1
        totals["stray_temporary_files"] += bool(stray)
        totals["wrong_after_saving_again"] += not saved_again
        totals["left_after_saving_again"] += bool(left_after)
        print(f"save {run:2d}: {'over an earlier save, ' if over_earlier else ''}killed {delay:5.3f} s into writing"
              f"{' (already finished)' if finished else ''}: {state}, staging folder "
              f"{'left' if staging_left else '-'}, stray temporary files {stray}; saved again: "
              f"{'identical' if saved_again else 'DIFFERS'}{', temporary files left ' + str(left_after) if left_after else ''}",
              flush=True)
        shutil.rmtree(folder)
    print(f"{runs} saves in {time.monotonic() - loop_start:.0f} s")
    return totals


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="Runs of each scenario.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="kill_loop_"))
    # for the training processes: the repository, and a sitecustomize that installs the fake Hub where asked
    site = work / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os\nif os.environ.get('FAKE_HUB_DIR'):\n    from benchmarks import fake_hub\n    fake_hub.install()\n"
    )
    os.environ.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=f"{site}{os.pathsep}{os.getcwd()}")
    torch.set_num_threads(1)
    # tqdm's write lock is a multiprocessing semaphore that every fork of this process shares: a fork killed while a
    # progress bar of `save_pretrained` holds it would hang every later fork
    transformers_logging.disable_progress_bar()
    pipeline, prompts, log = work / "pipeline", work / "prompts.txt", work / "log.txt"
    build_pipeline("sd").save_pretrained(pipeline)
    prompts.write_text("a red circle\na blue square\na green triangle\na yellow star\n")

    results = {}
    if {"train", "hub"} & set(args.scenarios):
        # the reference: the command itself, from its first import
        start = time.monotonic()
        command = [sys.executable, "-m", "trl_noise_ppo.cli", "train", *train_arguments(pipeline, prompts, work / "reference")]
        if subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
            raise SystemExit(f"The uninterrupted run failed; run it by hand to see why: {' '.join(command)}")
        reference = load_file(work / "reference" / "model.safetensors")
        print(f"uninterrupted run (trl-noise-ppo train, from its first import): {time.monotonic() - start:.1f} s", flush=True)
        if "train" in args.scenarios:
            results["train"] = kill_training(args.runs, rng, pipeline, prompts, work, log, reference, hub=False)
        if "hub" in args.scenarios:
            fake_hub.install()  # for the resumed runs, forks of this process
            results["hub"] = kill_training(args.runs, rng, pipeline, prompts, work, log, reference, hub=True)
    if "save" in args.scenarios:
        results["save"] = kill_saves(args.runs, rng, work, log)
    for scenario, totals in results.items():
        print(f"{scenario}: " + " ".join(f"{name}={value}" for name, value in totals.items()))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
