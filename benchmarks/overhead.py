"""What Noise PPO costs on top of the work it cannot avoid.

1. Training: the time of one generation cycle of `NoisePPOTrainer` (sample the noise, run the frozen pipeline, score,
   then `num_iterations` PPO updates of the generator) divided by the time to sample the same images with the bare
   pipeline and score them. Bare cycles run interleaved with the trainer's (from a callback), so that load on the
   machine weighs on both alike.
2. Inference: the time of a `NoisePPOPipeline` call divided by that of the bare pipeline's, same prompts and steps.
3. A served reward: an `HTTPReward` whose server (on 127.0.0.1, in this process) takes a fixed time per image, set so
   that scoring costs `scoring_share` (about half) of sampling. Generation cycles alternate between scoring each chunk
   of `num_generations` images while the next samples (`score_while_sampling=True`) and scoring it before the next
   (`False`); after each cycle the bare pipeline samples the same images in the same chunks, then the reward scores
   them. Each path's cycle time is reported against sampling alone and against sampling plus scoring, as the median
   over cycles of the ratio to the bare cycle that follows it, so that a machine whose load drifts weighs alike on
   both sides of each ratio.

The pipeline is a Stable Diffusion pipeline built locally with random weights, large enough that one call takes
seconds on a CPU (sizes below); no download. Run from the repository root, on an otherwise idle machine:

    python -m benchmarks.overhead                  # prints all three
    python -m benchmarks.overhead --case served    # only the served reward
"""

import json
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer

import torch
from datasets import Dataset
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, TrainerCallback

from tests.tiny_pipelines import _clip_tokenizer
from trl_noise_ppo import NoisePPOConfig, NoisePPOPipeline, NoisePPOTrainer
from trl_noise_ppo.rewards import HTTPReward
from trl import TrlParser


@dataclass
class BenchmarkArguments:
    image_size: int = 128
    num_inference_steps: int = 2
    num_prompts: int = 2
    num_generations: int = 4
    num_iterations: int | None = field(default=None, metadata={"help": "Epochs per generation batch; None: the library's default."})
    loss_type: str = field(default="natural_step", metadata={"choices": ["natural_step", "ppo_clip"]})
    base_comparison_every: int = field(default=4, metadata={"help": "As NoisePPOConfig's (0: no gain_over_base)."})
    generator_architecture: str | None = field(
        default=None, metadata={"help": "As NoisePPOConfig's (pooled_mlp: the defaults before); None: the library's default."})
    cycles: int = 4
    inference_repeats: int = 5
    threads: int = 2
    case: str = field(default="all", metadata={"choices": ["all", "training", "served"]})
    served_image_size: int = 64
    served_prompts: int = 16
    served_cycles: int = 5
    scoring_share: float = 0.5


def build_pipeline(image_size: int) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128, 256),
        layers_per_block=2,
        sample_size=image_size // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=256,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(64, 128, 128),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=4, vocab_size=1000)
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(),
        scheduler=DDIMScheduler(timestep_spacing="trailing"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def brightness(images, **kwargs):
    return images.mean(dim=(1, 2, 3)).tolist()


class InterleavedBareCycles(TrainerCallback):
    """After each generation cycle of the trainer, samples and scores the same number of images with the bare
    pipeline, and keeps both durations."""

    def __init__(self, pipe, prompts, args: BenchmarkArguments):
        self.pipe, self.prompts, self.args = pipe, prompts, args
        self.cycle_times, self.bare_times = [], []
        self._cycle_start = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % args.num_iterations == 0:
            self._cycle_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.num_iterations != 0:
            return
        self.cycle_times.append(time.perf_counter() - self._cycle_start)
        start = time.perf_counter()
        images = self.pipe(self.prompts, num_images_per_prompt=self.args.num_generations,
                           num_inference_steps=self.args.num_inference_steps, output_type="pt").images
        brightness(images)
        self.bare_times.append(time.perf_counter() - start)


def main(args: BenchmarkArguments):
    torch.set_num_threads(args.threads)
    if args.case in ("all", "training"):
        training_and_inference(args)
    if args.case in ("all", "served"):
        served_reward(args)


def training_and_inference(args: BenchmarkArguments):
    torch.manual_seed(0)
    pipe = build_pipeline(args.image_size)
    prompts = [f"prompt number {i}" for i in range(args.num_prompts)]
    images_per_cycle = args.num_prompts * args.num_generations
    print(f"pipeline: UNet {pipe.unet.num_parameters() / 1e6:.1f}M, VAE {pipe.vae.num_parameters() / 1e6:.1f}M, "
          f"text encoder {pipe.text_encoder.num_parameters() / 1e6:.1f}M parameters; {args.image_size} px, "
          f"{args.num_inference_steps} steps, {images_per_cycle} images per cycle, {torch.get_num_threads()} threads")

    epochs = {"num_iterations": args.num_iterations} if args.num_iterations is not None else {}
    architecture = {"generator_architecture": args.generator_architecture} if args.generator_architecture else {}
    config = NoisePPOConfig(
        output_dir="/tmp/noise-ppo-overhead", num_inference_steps=args.num_inference_steps,
        num_generations=args.num_generations, per_device_train_batch_size=images_per_cycle, loss_type=args.loss_type,
        base_comparison_every=args.base_comparison_every, max_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, **epochs, **architecture,
    )
    # one generation cycle per base_comparison_every (or 4) cycles compares with the base pipeline: whole periods
    period = args.base_comparison_every or 1
    cycles = period * -(-args.cycles // period)
    config.max_steps, config.logging_steps = config.num_iterations * (cycles + 1), config.num_iterations
    bare = InterleavedBareCycles(pipe, prompts, args)
    trainer = NoisePPOTrainer(pipe, brightness, args=config, train_dataset=Dataset.from_dict({"prompt": prompts}),
                              callbacks=[bare])
    trainer.train()
    # the first cycle warms both up
    # the first cycle warms both up; a mean over whole periods counts the base comparisons' cost
    cycle, bare_cycle = statistics.mean(bare.cycle_times[1:]), statistics.median(bare.bare_times[1:])
    print(f"training ({args.loss_type}, {config.generator_architecture}, {config.num_iterations} epochs, base comparison "
          f"every {args.base_comparison_every} batches): {cycle:.3f} s per generation cycle vs {bare_cycle:.3f} s to sample and score the same "
          f"{images_per_cycle} images: ratio {cycle / bare_cycle:.3f} per training query")

    tuned = NoisePPOPipeline(pipe, trainer.model)
    call = dict(num_images_per_prompt=args.num_generations, num_inference_steps=args.num_inference_steps, output_type="pt")
    tuned(prompts, **call)  # warm-up, and the one-off noise-shape discovery
    bare_times, tuned_times = [], []
    for _ in range(args.inference_repeats):
        for pipeline, times in ((pipe, bare_times), (tuned, tuned_times)):
            start = time.perf_counter()
            pipeline(prompts, **call)
            times.append(time.perf_counter() - start)
    bare_call, tuned_call = statistics.median(bare_times), statistics.median(tuned_times)
    print(f"inference: NoisePPOPipeline {tuned_call:.3f} s vs bare pipeline {bare_call:.3f} s per call "
          f"(median of {args.inference_repeats}): overhead {100 * (tuned_call / bare_call - 1):+.2f}%")
    generator = trainer.model
    print(f"noise generator: {generator.num_parameters() / 1e6:.2f}M parameters for noise {generator.config.noise_shape}")


class FixedTimeRewardServer:
    """A reward server on 127.0.0.1 that answers after `seconds_per_image` per image, as a reward model served on
    another GPU would. One request at a time, bodies of at most 64 MB, and it stops with the benchmark. The reward is
    the length of each image's PNG, which costs nothing to compute."""

    def __init__(self, seconds_per_image: float):
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                if not 0 < length <= 64 * 2**20:
                    self.send_error(413)
                    return
                images = json.loads(self.rfile.read(length))["images"]
                time.sleep(seconds_per_image * len(images))
                body = json.dumps({"rewards": [len(image) / 1000 for image in images]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.http_server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http_server.server_address[1]}/score"

    def __enter__(self):
        threading.Thread(target=self.http_server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.http_server.shutdown()
        self.http_server.server_close()


class AlternatingPathsAndBareCycles(TrainerCallback):
    """Switches `score_while_sampling` from one generation cycle to the next (overlapped first), and after each cycle
    samples the same images with the bare pipeline, in the same chunks, then scores them with the same reward."""

    def __init__(self, pipe, prompts, reward, args: BenchmarkArguments):
        self.pipe, self.prompts, self.reward, self.args = pipe, prompts, reward, args
        self.cycles = []  # (overlapped, cycle seconds, bare sampling seconds, bare scoring seconds)
        self._cycle_start = self._overlapped = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % args.num_iterations == 0:
            self._overlapped = args.score_while_sampling = (state.global_step // args.num_iterations) % 2 == 0
            self._cycle_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.num_iterations != 0:
            return
        cycle = time.perf_counter() - self._cycle_start
        start = time.perf_counter()
        chunks = [self.pipe([prompt], num_images_per_prompt=self.args.num_generations, output_type="pt",
                            num_inference_steps=self.args.num_inference_steps).images for prompt in self.prompts]
        sampling = time.perf_counter() - start
        start = time.perf_counter()
        for prompt, images in zip(self.prompts, chunks, strict=True):
            self.reward(images=images, prompts=[prompt] * len(images))
        self.cycles.append((self._overlapped, cycle, sampling, time.perf_counter() - start))


def served_reward(args: BenchmarkArguments):
    torch.manual_seed(0)
    pipe = build_pipeline(args.served_image_size)
    prompts = [f"prompt number {i}" for i in range(args.served_prompts)]
    call = dict(num_images_per_prompt=args.num_generations, num_inference_steps=args.num_inference_steps, output_type="pt")
    chunk_times = []
    for _ in range(4):  # the first warms up
        start = time.perf_counter()
        pipe(prompts[:1], **call)
        chunk_times.append(time.perf_counter() - start)
    seconds_per_image = args.scoring_share * statistics.median(chunk_times[1:]) / args.num_generations
    images_per_cycle = args.served_prompts * args.num_generations
    print(f"served reward: {args.served_image_size} px, {images_per_cycle} images per cycle in chunks of "
          f"{args.num_generations}; the server takes {1000 * seconds_per_image:.1f} ms per image "
          f"({args.scoring_share} x the sampling time measured before the run); load average {os.getloadavg()[0]:.1f}")

    epochs = {"num_iterations": args.num_iterations} if args.num_iterations is not None else {}
    config = NoisePPOConfig(
        output_dir="/tmp/noise-ppo-overhead", num_inference_steps=args.num_inference_steps,
        num_generations=args.num_generations, per_device_train_batch_size=images_per_cycle,
        sample_batch_size=args.num_generations, loss_type=args.loss_type, base_comparison_every=0, max_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, **epochs,
    )
    config.max_steps, config.logging_steps = config.num_iterations * (2 * args.served_cycles + 2), config.num_iterations
    with FixedTimeRewardServer(seconds_per_image) as server:
        reward = HTTPReward(server.url, name="served", batch_size=args.num_generations, timeout=60, retries=0)
        paths = AlternatingPathsAndBareCycles(pipe, prompts, reward, args)
        trainer = NoisePPOTrainer(pipe, reward, args=config, train_dataset=Dataset.from_dict({"prompt": prompts}),
                                  callbacks=[paths])
        trainer.train()
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (1 minute), {os.getloadavg()[1]:.1f} (5 minutes)")
    cycles = paths.cycles[2:]  # the first cycle of each path warms it up
    for overlapped, cycle, sample, score in cycles:
        print(f"  cycle score_while_sampling={overlapped!s:5}: {cycle:.3f} s; bare after it: sampling {sample:.3f} s, "
              f"scoring {score:.3f} s")
    sampling = statistics.median(sample for _, _, sample, _ in cycles)
    scoring = statistics.median(score for _, _, _, score in cycles)
    print(f"bare: sampling {sampling:.3f} s, then scoring {scoring:.3f} s (scoring / sampling {scoring / sampling:.2f}); "
          f"medians of {len(cycles)} cycles")
    for overlapped in (True, False):
        runs = [(cycle, sample, score) for path, cycle, sample, score in cycles if path == overlapped]
        alone = statistics.median(cycle / sample for cycle, sample, _ in runs)
        then_scoring = statistics.median(cycle / (sample + score) for cycle, sample, score in runs)
        print(f"score_while_sampling={overlapped!s:5}: {statistics.median(cycle for cycle, _, _ in runs):.3f} s per "
              f"generation cycle (1 sampling + {config.num_iterations} updates): {alone:.3f} x sampling alone, "
              f"{then_scoring:.3f} x sampling then scoring (medians of {len(runs)} paired ratios)")
    logged = [entry for entry in trainer.state.log_history if "timing/wait" in entry]
    for name, entries in (("True ", logged[2::2]), ("False", logged[3::2])):
        print(f"logged with score_while_sampling={name}: " + ", ".join(
            f"{key} {statistics.median(entry[key] for entry in entries):.3f} s"
            for key in ("timing/sample", "timing/score", "timing/wait")))
    # The same ratios against the trainer's own sampling (and scoring) of the same cycle, the same pipeline calls as
    # the bare cycle's: two samplings of the same images vary by several percent even on an idle machine.
    own = [(path, cycle, entry["timing/sample"], entry["timing/score"]) for (path, cycle, _, _), entry in zip(cycles, logged[2:])]
    for overlapped in (True, False):
        runs = [(cycle, sample, score) for path, cycle, sample, score in own if path == overlapped]
        print(f"score_while_sampling={overlapped!s:5}, against its own cycle's timing/sample: "
              f"{statistics.median(cycle / sample for cycle, sample, _ in runs):.3f} x sampling alone, "
              f"{statistics.median(cycle / (sample + score) for cycle, sample, score in runs):.3f} x sampling then scoring "
              f"(medians of {len(runs)})")


if __name__ == "__main__":
    (benchmark_args,) = TrlParser(BenchmarkArguments).parse_args_and_config()
    main(benchmark_args)
