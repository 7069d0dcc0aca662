"""Noise PPO beside what a user would pick instead, in the shapes world: DDPO, best-of-N and test-time noise optimisation.

On the bundled shapes pipeline at its recommended guidance (`RECOMMENDED_GUIDANCE_SCALES`), with its learned reward
(`ShapesAlignmentReward`) for training and selection and the analytic judge (`ShapesJudge`, which shares nothing
learned with the reward) for evaluation, on held-out prompts, for each number of inference steps:

- **Noise PPO** at the library's defaults (as `benchmarks/findings.py` trains it), for `reward_queries` images.
- **DDPO**, TRL 0.23.1's `DDPOTrainer` (the last release that ships it), with LoRA (its default, learning rate 3e-4,
  TRL's default) and with the full UNet (learning rate 1e-5, as diffusers' full fine-tuning examples take it; TRL
  gives none for it), for the same number of reward queries, in a virtual environment this benchmark creates
  (`--ddpo_venv`; `benchmarks/ddpo_worker.py` runs there). DDPO needs a stochastic sampler with at least 2 steps; it
  is judged with the deterministic sampler (eta 0) or the one it trained with (eta 1), whichever scores better on
  training prompts.
- **Best-of-N** of the base model, N = 2, 4, 8: N images per prompt, the reward keeps one.
- **Test-time noise optimisation**, our implementation of ReNO's idea (Eyring et al., 2024): gradient ascent on each
  image's initial noise through the frozen pipeline and the differentiable reward, with ReNO's defaults (50
  iterations, SGD with Nesterov momentum 0.9, learning rate 5, gradient norm clipped to 0.1 per image, weight 0.01 on
  the noise norm's negative log-likelihood), keeping each image's best iterate by the reward.

Reported: held-out judge and reward scores with 95% intervals, paired differences against the base model, training
seconds per reward query, inference seconds per image, peak memory of the process (RSS) and a plot of the held-out
judge score against reward queries for Noise PPO and DDPO. Then **the cost at real size**: Noise PPO and DDPO with
LoRA on Stable Diffusion 1.5's configuration with random weights at 256 px (2 samples per step): seconds per training
sample and peak memory. Every run is a process of its own, so peak memory is its own. Writes `peers.json`, `peers.md`
and `peers.png` to `--output_dir`; one command regenerates them all:

    python -m benchmarks.peers --output_dir outputs/peers
"""

import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from multiprocessing import get_context
from pathlib import Path

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from trl import TrlParser  # noqa: E402

from benchmarks.defaults import OLD_DEFAULTS  # noqa: E402
from benchmarks.process_memory import peak_memory_mb  # noqa: E402


REPOSITORY = Path(__file__).resolve().parents[1]
# TRL's last DDPOTrainer, beside this environment's releases of the libraries it uses, so that both sides load and
# sample the pipeline with the same code
DDPO_TRL = "trl==0.23.1"
DDPO_SHARED_LIBRARIES = ["torch", "diffusers", "transformers", "peft", "accelerate", "datasets", "huggingface_hub"]
DDPO_LEARNING_RATES = {"ddpo_lora": 3e-4, "ddpo_full": 1e-5}
METHODS = ["noise_ppo", "ddpo_lora", "ddpo_full", "best_of_n", "reno"]
PLOT_COLOURS = {"Noise PPO": "C0", "DDPO (LoRA)": "C1", "DDPO (full UNet)": "C2"}


@dataclass
class PeersArguments:
    output_dir: str = "outputs/peers"
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": f"Of {', '.join(METHODS)}."})
    reward_queries: int = field(default=6400, metadata={"help": "Images each trainer samples and scores."})
    noise_ppo_defaults: str = field(
        default="current",
        metadata={"help": "current, or old: the defaults before the natural step (benchmarks/defaults.py).", "choices": ["current", "old"]},
    )
    held_out_images: int = 512
    training_images: int = field(default=256, metadata={"help": "Training-prompt images that choose DDPO's sampler."})
    curve_images: int = field(default=128, metadata={"help": "Held-out images judged at each point of the curve."})
    curve_points: int = 4
    best_of: list[int] = field(default_factory=lambda: [2, 4, 8])
    reno_images: int = 64
    reno_iterations: int = 50
    reno_learning_rate: float = 5.0
    shapes: bool = field(default=True, metadata={"help": "Whether to run the comparison in the shapes world."})
    cost: bool = field(default=True, metadata={"help": "Whether to measure the cost at SD 1.5 size."})
    sd15_path: str = field(default="outputs/sd15-random-256px", metadata={"help": "Where the random SD 1.5 is saved."})
    cost_steps: list[int] = field(default_factory=lambda: [2, 4])
    cost_epochs: int = field(default=3, metadata={"help": "Training cycles at SD 1.5 size; the first warms up."})
    ddpo_venv: str = "outputs/ddpo-venv"
    threads: int = 2
    seed: int = 0
    report_only: bool = field(default=False, metadata={"help": "Only rewrite peers.md and peers.png from peers.json."})


def in_own_process(function, *args):
    """Runs `function(*args)` in a fresh process, so that its peak memory is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def shapes_setup(threads: int):
    torch.set_num_threads(threads)
    from trl_noise_ppo.shapes import load_shapes_pipeline

    pipeline = load_shapes_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def sample(pipeline, prompts, noise, steps, guidance_scale, batch_size=256) -> torch.Tensor:
    return torch.cat([
        pipeline(prompts[i : i + batch_size], latents=noise[i : i + batch_size], num_inference_steps=steps,
                 guidance_scale=guidance_scale, output_type="pt").images
        for i in range(0, len(prompts), batch_size)
    ])


def noise_ppo(spec: dict) -> dict:
    """Trains Noise PPO as benchmarks/findings.py does; samples the curve set at each checkpoint, the sets at the end."""
    from datasets import Dataset
    from transformers import TrainerCallback

    from trl_noise_ppo import NoisePPOConfig, NoisePPOPipeline, NoisePPOTrainer
    from trl_noise_ppo.shapes import ShapesAlignmentReward, balanced_prompts

    pipeline, evaluation = shapes_setup(spec["threads"]), spec["evaluation"]
    images = {}

    class Curve(TrainerCallback):
        seconds = 0.0

        def on_step_end(self, args, state, control, **kwargs):
            queries = state.global_step // args.num_iterations * 64
            if state.global_step % args.num_iterations == 0 and queries in spec["checkpoints"]:
                start = time.perf_counter()
                tuned = NoisePPOPipeline(pipeline, trainer.model)
                curve = evaluation["curve"]
                images[f"curve/{queries}"] = sample(tuned, curve["prompts"], curve["noise"], spec["steps"], spec["guidance_scale"])
                trainer.model.train()
                self.seconds += time.perf_counter() - start

    config = NoisePPOConfig(
        output_dir=os.path.join(spec["output_dir"], "trainer"), num_inference_steps=spec["steps"],
        guidance_scale=spec["guidance_scale"], num_generations=8, per_device_train_batch_size=64, max_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=spec["seed"],
        **(OLD_DEFAULTS if spec["noise_ppo_defaults"] == "old" else {}),
    )
    config.max_steps = config.num_iterations * (spec["reward_queries"] // 64)
    config.logging_steps = config.num_iterations
    curve = Curve()
    trainer = NoisePPOTrainer(pipeline, ShapesAlignmentReward(), args=config, callbacks=[curve],
                              train_dataset=Dataset.from_dict({"prompt": balanced_prompts("training", 1024)}))
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start - curve.seconds
    tuned = NoisePPOPipeline(pipeline, trainer.model)
    held_out = evaluation["held-out"]
    start = time.perf_counter()
    images["held-out"] = sample(tuned, held_out["prompts"], held_out["noise"], spec["steps"], spec["guidance_scale"])
    seconds_per_image = (time.perf_counter() - start) / len(held_out["prompts"])
    queries = trainer.state.global_step // 4 * 64
    return {
        "images": images, "reward_queries": queries, "seconds_per_query": train_seconds / queries,
        "inference_seconds_per_image": seconds_per_image, "peak_memory_mb": peak_memory_mb(),
        "trainable_parameters": trainer.model.num_parameters(),
    }


def base_draws(spec: dict) -> dict:
    """The base model on the held-out prompts with each of `max(best_of)` initial noises (the first is the base's).
    Times the sampling and the reward per image, for best-of-N's cost."""
    from trl_noise_ppo.shapes import ShapesAlignmentReward

    pipeline, held_out, reward = shapes_setup(spec["threads"]), spec["held_out"], ShapesAlignmentReward()
    start = time.perf_counter()
    draws = torch.stack([
        sample(pipeline, held_out["prompts"], noise, spec["steps"], spec["guidance_scale"]) for noise in spec["draws"]
    ])
    sampling = (time.perf_counter() - start) / draws.shape[0] / draws.shape[1]
    start = time.perf_counter()
    for images in draws:
        reward(images=images, prompts=held_out["prompts"])
    scoring = (time.perf_counter() - start) / draws.shape[0] / draws.shape[1]
    return {"draws": draws, "sampling_seconds_per_image": sampling, "reward_seconds_per_image": scoring,
            "peak_memory_mb": peak_memory_mb()}


def reno(spec: dict) -> dict:
    """Gradient ascent on each image's initial noise through the frozen pipeline and the differentiable reward."""
    from trl_noise_ppo.shapes import ShapesClassifier
    from trl_noise_ppo.shapes.reward import differentiable_alignment_scores

    pipeline = shapes_setup(spec["threads"])
    prompts, noise = spec["prompts"], spec["noise"]
    classifier = ShapesClassifier.from_pretrained()
    call_with_gradients = type(pipeline).__call__.__wrapped__  # __call__ itself runs under torch.no_grad
    latents = noise.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([latents], lr=spec["learning_rate"], momentum=0.9, nesterov=True)
    dimension = latents[0].numel()
    best_rewards, best_images = torch.full((len(prompts),), -math.inf), None
    start = time.perf_counter()
    for iteration in range(spec["iterations"]):
        images = call_with_gradients(pipeline, prompts, latents=latents, num_inference_steps=spec["steps"],
                                     guidance_scale=spec["guidance_scale"], output_type="pt").images
        rewards = differentiable_alignment_scores(classifier, images, prompts)  # ShapesAlignmentReward's score
        best_images = torch.zeros_like(images) if best_images is None else best_images
        improved = rewards.detach() > best_rewards
        best_rewards[improved], best_images[improved] = rewards.detach()[improved], images.detach()[improved]
        if iteration == spec["iterations"] - 1:
            break
        norm = latents.flatten(1).norm(dim=1)
        # ReNO's regulariser: the negative log-likelihood of the noise's norm under N(0, I) (a chi distribution)
        loss = -rewards.sum() + spec["regularization_weight"] * (0.5 * norm**2 - (dimension - 1) * norm.log()).sum()
        optimizer.zero_grad()
        loss.backward()
        grad_norm = latents.grad.flatten(1).norm(dim=1).clamp(min=1e-12)
        latents.grad *= (spec["grad_clip"] / grad_norm).clamp(max=1.0)[:, None, None, None]
        optimizer.step()
    return {
        "images": best_images, "inference_seconds_per_image": (time.perf_counter() - start) / len(prompts),
        "peak_memory_mb": peak_memory_mb(),
    }


def ddpo(spec: dict, venv: Path) -> dict:
    """Runs benchmarks/ddpo_worker.py in the DDPO virtual environment (see `ddpo_python`)."""
    output_dir = Path(spec["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    spec_path = output_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    subprocess.run([str(venv / "bin" / "python"), str(REPOSITORY / "benchmarks" / "ddpo_worker.py"), str(spec_path)],
                   check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    result = json.loads((output_dir / "result.json").read_text())
    if (output_dir / "images.pt").exists():
        result["images"] = torch.load(output_dir / "images.pt")
    return result


def ddpo_python(venv: str) -> Path:
    """The virtual environment with TRL 0.23.1 and this environment's torch, diffusers, transformers, peft, accelerate,
    datasets and huggingface_hub, created on first use (about a minute; torch first, pinned, so that no CUDA build is
    pulled in)."""
    venv = Path(venv).resolve()
    if not (venv / "ready").exists():
        pins = [f"{name}=={version(name).split('+')[0]}" for name in DDPO_SHARED_LIBRARIES]
        print(f"creating the DDPO environment in {venv}: {DDPO_TRL}, {', '.join(pins)}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, pins[0]], check=True)
        subprocess.run([*pip, DDPO_TRL, *pins], check=True)
        (venv / "ready").touch()
    return venv


def sd15_pipeline(path: Path, image_size: int = 256) -> str:
    """Stable Diffusion 1.5's UNet, VAE and text encoder configurations with random weights, saved once to `path`."""
    if (path / "model_index.json").exists():
        return str(path)
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from benchmarks.generator_cost import UNETS
    from trl_noise_ppo.shapes import SHAPES_PIPELINE_PATH

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(SHAPES_PIPELINE_PATH, subfolder="tokenizer")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=image_size,
    )
    unet = UNet2DConditionModel(**{**UNETS["sd15"], "sample_size": image_size // 8})
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")
    StableDiffusionPipeline(vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    return str(path)


def brightness(images, prompts, **kwargs) -> list[float]:
    """A reward that costs nothing, for timing the trainers alone."""
    return images.mean(dim=(1, 2, 3)).tolist()


def noise_ppo_cost(spec: dict) -> dict:
    from diffusers import StableDiffusionPipeline
    from datasets import Dataset
    from transformers import TrainerCallback

    from trl_noise_ppo import NoisePPOConfig, NoisePPOTrainer

    torch.set_num_threads(spec["threads"])
    pipeline = StableDiffusionPipeline.from_pretrained(spec["pipeline_path"])
    cycle_ends = []

    class CycleClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % args.num_iterations == 0:
                cycle_ends.append(time.perf_counter())

    config = NoisePPOConfig(
        output_dir=os.path.join(spec["output_dir"], "trainer"), num_inference_steps=spec["steps"],
        guidance_scale=spec["guidance_scale"], num_generations=spec["samples"], per_device_train_batch_size=spec["samples"],
        max_steps=4 * spec["epochs"], save_strategy="no", report_to="none", disable_tqdm=True,
    )
    trainer = NoisePPOTrainer(pipeline, brightness, args=config, callbacks=[CycleClock()],
                              train_dataset=Dataset.from_dict({"prompt": ["a photo of a cat"] * 4}))
    trainer.train()
    cycles = [end - begin for begin, end in zip(cycle_ends, cycle_ends[1:])]  # the first cycle warms up
    return {
        "seconds_per_sample": statistics.median(cycles) / spec["samples"], "cycle_seconds": cycles,
        "peak_memory_mb": peak_memory_mb(), "trainable_parameters": trainer.model.num_parameters(),
    }


def interval(values: torch.Tensor) -> dict:
    from benchmarks.findings import interval as findings_interval

    return findings_interval(values.float())


def main(args: PeersArguments):
    from trl_noise_ppo.shapes import RECOMMENDED_GUIDANCE_SCALES, SHAPES_PIPELINE_PATH, ShapesAlignmentReward, ShapesJudge
    from trl_noise_ppo.shapes import balanced_prompts

    output_dir = Path(args.output_dir)
    if args.report_only:
        results = json.loads((output_dir / "peers.json").read_text())
        return report(results["rows"], results["cost"], results["curves"], output_dir)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
    if args.held_out_images < max(args.curve_images, args.reno_images):
        raise ValueError("held_out_images must be at least curve_images and reno_images; raise it.")
    output_dir.mkdir(parents=True, exist_ok=True)
    venv = ddpo_python(args.ddpo_venv) if {"ddpo_lora", "ddpo_full"} & set(args.methods) or args.cost else None
    reward, judge = ShapesAlignmentReward(), ShapesJudge()

    def scores(images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"judge": torch.tensor(judge(images=images, prompts=prompts)),
                "reward": torch.tensor(reward(images=images, prompts=prompts))}

    def curve_score(images: torch.Tensor) -> float:
        """The judge's mean over the curve's prompts (the first `curve_images` held-out ones)."""
        curve_prompts = held_out_prompts[: args.curve_images]
        return statistics.mean(judge(images=images[: len(curve_prompts)], prompts=curve_prompts))

    noise = torch.Generator().manual_seed(args.seed + 1)
    draws = torch.randn(max(args.best_of + [1]), args.held_out_images, 4, 8, 8, generator=noise)
    held_out_prompts = balanced_prompts("held-out", args.held_out_images)
    evaluation = {
        "held-out": {"prompts": held_out_prompts, "noise": draws[0]},
        "curve": {"prompts": held_out_prompts[: args.curve_images], "noise": draws[0][: args.curve_images]},
        "training": {"prompts": balanced_prompts("training", args.training_images),
                     "noise": torch.randn(args.training_images, 4, 8, 8, generator=noise)},
    }
    torch.save(evaluation, output_dir / "evaluation.pt")
    queries_per_batch = 64
    checkpoints = [args.reward_queries * k // args.curve_points // queries_per_batch * queries_per_batch
                   for k in range(1, args.curve_points + 1)]
    rows, curves, cost_rows = [], {}, []

    def save() -> None:  # after every result, so that an interrupted run keeps what it measured
        (output_dir / "peers.json").write_text(json.dumps({"arguments": asdict(args), "checkpoints": checkpoints,
                                                           "rows": rows, "curves": curves, "cost": cost_rows}, indent=2))

    for steps in args.steps if args.shapes else []:
        guidance_scale = RECOMMENDED_GUIDANCE_SCALES[steps]
        common = {"steps": steps, "guidance_scale": guidance_scale, "threads": args.threads, "seed": args.seed}
        print(f"{steps} steps, guidance {guidance_scale:g}", flush=True)
        base = in_own_process(base_draws, {**common, "held_out": evaluation["held-out"], "draws": draws})
        draw_scores = [scores(images, held_out_prompts) for images in base["draws"]]
        base_scores = draw_scores[0]
        curves[steps] = {"base": curve_score(base["draws"][0])}

        def row(method: str, method_scores: dict, versus_base: bool = True, **extra) -> dict:
            entry = {"steps": steps, "method": method, **extra}
            for metric, values in method_scores.items():
                entry[metric] = interval(values)
                if versus_base:
                    entry[f"{metric}_gain"] = interval(values - base_scores[metric][: len(values)])
            rows.append(entry)
            print(json.dumps(entry), flush=True)
            save()
            return entry

        row("base", base_scores, versus_base=False, inference_seconds_per_image=base["sampling_seconds_per_image"],
            peak_memory_mb=base["peak_memory_mb"])
        best_of_judge = {}
        if "best_of_n" in args.methods:
            rewards = torch.stack([s["reward"] for s in draw_scores])
            for n in args.best_of:
                pick = rewards[:n].argmax(dim=0)
                picked = {m: torch.stack([s[m] for s in draw_scores[:n]]).gather(0, pick[None])[0] for m in base_scores}
                best_of_judge[n] = picked["judge"]
                row(f"best-of-{n}", picked, peak_memory_mb=base["peak_memory_mb"],
                    inference_seconds_per_image=n * (base["sampling_seconds_per_image"] + base["reward_seconds_per_image"]))
        if "noise_ppo" in args.methods:
            start = time.time()
            result = in_own_process(noise_ppo, {**common, "evaluation": evaluation, "checkpoints": checkpoints,
                                                "reward_queries": args.reward_queries,
                                                "noise_ppo_defaults": args.noise_ppo_defaults,
                                                "output_dir": str(output_dir / f"noise_ppo-{steps}")})
            images = result.pop("images")
            noise_ppo_images = images["held-out"]
            noise_ppo_scores = scores(noise_ppo_images, held_out_prompts)
            noise_ppo_judge = noise_ppo_scores["judge"]
            curve_images = {queries: images[f"curve/{queries}"] for queries in checkpoints[:-1]}
            versus_best_of = {f"noise_ppo_minus_best_of_{n}_judge": interval(noise_ppo_judge - judge)
                              for n, judge in best_of_judge.items()}
            row("Noise PPO", noise_ppo_scores, wall_seconds=round(time.time() - start), **versus_best_of, **result)
        if "reno" in args.methods:
            n = args.reno_images
            result = in_own_process(reno, {
                **common, "prompts": held_out_prompts[:n], "noise": draws[0][:n], "iterations": args.reno_iterations,
                "learning_rate": args.reno_learning_rate, "grad_clip": 0.1, "regularization_weight": 0.01,
            })
            row(f"ReNO-style ({args.reno_iterations} iterations, {n} images)",
                scores(result.pop("images"), held_out_prompts[:n]), **result)
        for method in ("ddpo_lora", "ddpo_full"):
            if method not in args.methods or steps < 2:
                continue
            start = time.time()
            result = ddpo({
                **common, "task": "shapes", "pipeline_path": SHAPES_PIPELINE_PATH, "use_lora": method == "ddpo_lora",
                "learning_rate": DDPO_LEARNING_RATES[method], "reward_queries": args.reward_queries,
                "samples_per_epoch": queries_per_batch, "train_batch_size": 8, "checkpoints": checkpoints,
                "eval_path": str(output_dir / "evaluation.pt"), "training_prompts": balanced_prompts("training", 1024),
                "output_dir": str(output_dir / f"{method}-{steps}"),
            }, venv)
            images = result.pop("images")
            final = args.reward_queries // queries_per_batch * queries_per_batch
            if method == "ddpo_lora":  # checkpoint 0 at eta 1: the base model with DDPO's stochastic sampler
                row("base, eta 1 (DDPO's sampler)", scores(images["held-out/eta=1/0"], held_out_prompts),
                    inference_seconds_per_image=base["sampling_seconds_per_image"], peak_memory_mb=base["peak_memory_mb"])
            # the sampler is chosen on training prompts, so that the held-out figures are not selected on themselves
            training = evaluation["training"]["prompts"]
            eta = max((0, 1), key=lambda e: sum(judge(images=images[f"training/eta={e}/{final}"], prompts=training)))
            ddpo_scores = scores(images[f"held-out/eta={eta}/{final}"], held_out_prompts)
            own_base = scores(images[f"held-out/eta={eta}/0"], held_out_prompts)
            extra = {}
            if "noise_ppo" in args.methods:
                extra["noise_ppo_minus_ddpo_judge"] = interval(noise_ppo_judge - ddpo_scores["judge"])
            # checkpoint 0 at eta 0 is the base model, sampled by the other environment's diffusers
            extra["max_difference_from_base_images"] = (images["held-out/eta=0/0"] - base["draws"][0]).abs().max().item()
            label = {"ddpo_lora": "DDPO (LoRA)", "ddpo_full": "DDPO (full UNet)"}[method]
            row(f"{label}, eta {eta}", ddpo_scores, wall_seconds=round(time.time() - start), sampler_eta=eta,
                judge_gain_over_own_sampler=interval(ddpo_scores["judge"] - own_base["judge"]), **extra, **result)
            curves[steps][label] = {0: curve_score(images[f"curve/eta={eta}/0"])}
            for queries in checkpoints:
                key = f"curve/eta={eta}/{queries}" if queries != final else f"held-out/eta={eta}/{final}"
                curves[steps][label][queries] = curve_score(images[key])
        if "noise_ppo" in args.methods:
            curves[steps]["Noise PPO"] = {0: curves[steps]["base"], checkpoints[-1]: curve_score(noise_ppo_images)}
            for queries, images in curve_images.items():
                curves[steps]["Noise PPO"][queries] = curve_score(images)
        save()  # the step's curves, which come after its rows

    if args.cost:
        path = sd15_pipeline(Path(args.sd15_path))
        for steps in args.cost_steps:
            common = {"steps": steps, "guidance_scale": 5.0, "threads": args.threads, "seed": args.seed,
                      "pipeline_path": path, "samples": 2, "epochs": args.cost_epochs}
            noise_ppo_result = in_own_process(noise_ppo_cost, {**common, "output_dir": str(output_dir / f"cost-noise_ppo-{steps}")})
            ddpo_result = ddpo({**common, "task": "cost", "use_lora": True, "learning_rate": DDPO_LEARNING_RATES["ddpo_lora"],
                                "samples_per_epoch": 2, "sample_batch_size": 2, "train_batch_size": 1,
                                "output_dir": str(output_dir / f"cost-ddpo_lora-{steps}")}, venv)
            weights_mb = sum(f.stat().st_size for f in Path(path).rglob("*.safetensors")) / 2**20
            for method, result in (("Noise PPO", noise_ppo_result), ("DDPO (LoRA)", ddpo_result)):
                cost_rows.append({"steps": steps, "method": method, "weights_mb": weights_mb, **result})
                print(json.dumps(cost_rows[-1]), flush=True)
                save()

    save()
    report(rows, cost_rows, curves, output_dir)


def report(rows: list[dict], cost_rows: list[dict], curves: dict, output_dir: Path) -> None:
    table = markdown(rows, cost_rows)
    (output_dir / "peers.md").write_text(table + "\n")
    print(table)
    if curves:
        plot(curves, output_dir / "peers.png")


def markdown(rows: list[dict], cost_rows: list[dict]) -> str:
    def stat(entry: dict | None, signed: bool = False) -> str:
        return "-" if entry is None else f"{entry['mean']:{'+' if signed else ''}.3f} ± {entry['ci95']:.3f}"

    noise_ppo_cost = {row["steps"]: row["seconds_per_query"] for row in rows if row["method"] == "Noise PPO"}
    lines = [
        "| steps | method | held-out judge | judge − base | reward | reward − base | train s / query | x Noise PPO "
        "| inference s / image | peak memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        per_query = row.get("seconds_per_query")
        ratio = f"{per_query / noise_ppo_cost[row['steps']]:.1f}" if per_query and row["steps"] in noise_ppo_cost else "-"
        lines.append(
            f"| {row['steps']} | {row['method']} | {stat(row['judge'])} | {stat(row.get('judge_gain'), True)} | "
            f"{stat(row['reward'])} | {stat(row.get('reward_gain'), True)} | "
            f"{f'{per_query:.4f}' if per_query else '-'} | {ratio} | {row['inference_seconds_per_image']:.4f} | "
            f"{row['peak_memory_mb'] / 1024:.2f} GB |"
        )
    comparisons = []
    for row in rows:
        for name, stats in row.items():
            if name.startswith("noise_ppo_minus_best_of_"):
                comparisons.append(f"| {row['steps']} | best-of-{name.split('_')[-2]} | {stat(stats, True)} | - | - |")
        if "noise_ppo_minus_ddpo_judge" in row:
            rewards = [entry["reward_mean"] for entry in row.get("training_log", []) if "reward_mean" in entry]
            clipped = [entry["clipfrac"] for entry in row.get("training_log", []) if "clipfrac" in entry]
            trained = (f"{statistics.mean(rewards[:10]):.3f} → {statistics.mean(rewards[-10:]):.3f} | "
                       f"{statistics.mean(clipped):.2f}") if rewards else "- | -"
            comparisons.append(f"| {row['steps']} | {row['method']} | {stat(row['noise_ppo_minus_ddpo_judge'], True)} "
                               f"| {trained} |")
    if comparisons:
        lines += ["", "| steps | versus | held-out judge: Noise PPO − it (paired) | its training reward, first → last 10 "
                      "epochs | its clip fraction |", "|---|---|---|---|---|", *comparisons]
    if cost_rows:
        lines += ["", "| steps | method (SD 1.5, 256 px, 2 samples) | s / training sample | x Noise PPO | peak memory "
                      "| peak memory beyond the weights | trainable parameters |", "|---|---|---|---|---|---|---|"]
        noise_ppo_cost = {row["steps"]: row["seconds_per_sample"] for row in cost_rows if row["method"] == "Noise PPO"}
        for row in cost_rows:
            lines.append(f"| {row['steps']} | {row['method']} | {row['seconds_per_sample']:.1f} | "
                         f"{row['seconds_per_sample'] / noise_ppo_cost[row['steps']]:.1f} | "
                         f"{row['peak_memory_mb'] / 1024:.2f} GB | {(row['peak_memory_mb'] - row['weights_mb']) / 1024:.2f} GB | "
                         f"{row['trainable_parameters'] / 1e6:.2f}M |")
    return "\n".join(lines)


def plot(curves: dict, path: Path) -> None:
    figure, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3.2), sharey=True, squeeze=False)
    for axis, (steps, methods) in zip(axes[0], curves.items()):
        axis.axhline(methods["base"], color="grey", linewidth=0.8, label="base")
        for method, points in methods.items():
            if method != "base":
                points = {int(queries): score for queries, score in points.items()}  # JSON made them strings
                axis.plot(sorted(points), [points[q] for q in sorted(points)], marker="o", label=method,
                          color=PLOT_COLOURS.get(method))
        axis.set_title(f"{steps} step{'s' if int(steps) > 1 else ''}")
        axis.set_xlabel("reward queries")
    axes[0][0].set_ylabel("held-out judge score")
    axes[0][-1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    (peers_args,) = TrlParser(PeersArguments).parse_args_and_config()
    main(peers_args)
