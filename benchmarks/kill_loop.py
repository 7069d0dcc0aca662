"""Kills `trl-noise-ppo train` with SIGKILL at random moments and checks what it leaves behind.

One uninterrupted run gives the reference generator. Then, `--runs` times: a run into a fresh folder, saving a checkpoint
every step, is killed after a random delay; the script checks that no training process outlives its imports
(a process killed while still importing exits when it reaches its first line) nor writes after the kill, that every
`checkpoint-N` in the folder is complete (trainer state, weights, rollout) and finite, that any saved generator is
finite, and then, where a checkpoint was left, resumes with `--resume_from_checkpoint True` and checks that the result is
bit-identical to the reference. Run from the repository root:

    python -m benchmarks.kill_loop --runs 20        # prints one line per run and the totals
"""

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.tiny_pipelines import build_pipeline


def train_command(pipeline: Path, prompts: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "trl_noise_ppo.cli", "train", "--pipeline", str(pipeline), "--dataset_name", str(prompts),
        "--reward_funcs", "jpeg_compressibility", "--num_inference_steps", "1", "--num_generations", "2",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--num_iterations", "2",
        "--max_steps", "8", "--save_strategy", "steps", "--save_steps", "1", "--report_to", "none", "--dtype", "float32",
        "--disable_tqdm", "True", "--output_dir", str(output_dir), *extra,
    ]


def snapshot(folder: Path) -> dict:
    return {str(path): path.stat().st_mtime_ns for path in folder.rglob("*")} if folder.exists() else {}


def finite(path: Path) -> bool:
    return all(tensor.isfinite().all() for tensor in load_file(path).values())


def children_of(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    work = Path(tempfile.mkdtemp(prefix="kill_loop_"))
    pipeline, prompts = work / "pipeline", work / "prompts.txt"
    build_pipeline("sd").save_pretrained(pipeline)
    prompts.write_text("a red circle\na blue square\na green triangle\na yellow star\n")

    start = time.monotonic()
    subprocess.run(train_command(pipeline, prompts, work / "reference"), env=env, check=True, capture_output=True)
    full_run = time.monotonic() - start
    reference = load_file(work / "reference" / "model.safetensors")
    print(f"uninterrupted run: {full_run:.1f} s")

    totals = dict(runs=0, survivors=0, written_after_kill=0, resumed=0, incomplete=0, non_finite=0, wrong_resume=0, checkpoints_left=0)
    for run in range(args.runs):
        output_dir = work / f"run{run}"
        delay = rng.uniform(0.4 * full_run, 1.1 * full_run)  # start-up takes a good part of a run
        command = subprocess.Popen(train_command(pipeline, prompts, output_dir), env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        children = children_of(command.pid) if command.poll() is None else []
        command.kill()
        command.wait()
        files_at_kill = snapshot(output_dir)
        waited = time.monotonic()
        while any(alive(pid) for pid in children) and time.monotonic() - waited < 60:
            time.sleep(0.2)
        survivors = [pid for pid in children if alive(pid)]
        for pid in survivors:  # ours to end, so that the next run starts clean
            os.kill(pid, 9)
        written_after_kill = snapshot(output_dir) != files_at_kill

        checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
        incomplete = [c.name for c in checkpoints if not all(
            (c / name).is_file() for name in ("trainer_state.json", "model.safetensors", "noise_ppo_rollout_0.pt"))]
        saved = [c / "model.safetensors" for c in checkpoints if (c / "model.safetensors").is_file()]
        saved += [output_dir / "model.safetensors"] if (output_dir / "model.safetensors").is_file() else []
        non_finite = [str(path.relative_to(output_dir)) for path in saved if not finite(path)]

        wrong = False
        if checkpoints:
            resume = ["--resume_from_checkpoint", "True"]
            subprocess.run(train_command(pipeline, prompts, output_dir, *resume), env=env, check=True, capture_output=True)
            resumed = load_file(output_dir / "model.safetensors")
            wrong = any(not torch.equal(resumed[name], value) for name, value in reference.items())
            totals["resumed"] += 1

        totals["runs"] += 1
        totals["survivors"] += bool(survivors)
        totals["written_after_kill"] += written_after_kill
        totals["incomplete"] += bool(incomplete)
        totals["non_finite"] += bool(non_finite)
        totals["wrong_resume"] += wrong
        totals["checkpoints_left"] += len(checkpoints)
        print(f"run {run:2d}: killed after {delay:4.1f} s, {len(checkpoints)} checkpoints left, resumed from "
              f"{checkpoints[-1].name if checkpoints else 'nothing'}; surviving processes {len(survivors)}, written after kill "
              f"{written_after_kill}, incomplete {incomplete}, non-finite {non_finite}, resumed result "
              f"{('DIFFERS' if wrong else 'identical') if checkpoints else '-'}", flush=True)
        shutil.rmtree(output_dir, ignore_errors=True)  # a run killed early made none
    print(" ".join(f"{name}={value}" for name, value in totals.items()))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
