"""Train the shapes world's tiny text-to-image model and save it as a Stable Diffusion pipeline folder.

    python -m trl_noise_ppo.shapes.train_base --output_dir outputs/shapes-teacher

The bundled model is this one distilled into a few-step model (`distil_base`, docs/shapes_world.md).

Stages: (1) a CLIP byte-level BPE tokenizer whose words are the world's caption words, (2) a small
AutoencoderKL (32 x 32 RGB <-> 4 x 8 x 8 latents), (3) a UNet2DConditionModel and a tiny CLIPTextModel trained
jointly with v-prediction on the VAE's latents, dropping 10% of captions for classifier-free guidance. The base
model sees every scene of the world, held-out ones included: held-out prompts are held out of Noise PPO only.
"""

import json
import math
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, HfArgumentParser

from .render import all_scenes, render_example


@dataclass
class TrainBaseArguments:
    output_dir: str = field(default="shapes-pipeline", metadata={"help": "Where to save the pipeline folder."})
    seed: int = field(default=0, metadata={"help": "Seed of the rendered data set and of the training."})
    num_images: int = field(default=30_000, metadata={"help": "Rendered training images (random scenes and jitter)."})
    vae_steps: int = field(default=1_000, metadata={"help": "Optimiser steps of the autoencoder."})
    vae_batch_size: int = 32
    vae_learning_rate: float = 1e-3
    unet_steps: int = field(default=3_000, metadata={"help": "Optimiser steps of the UNet and text encoder."})
    beta_end: float = field(default=0.012, metadata={"help": "Last beta of the scaled_linear noise schedule."})
    unet_batch_size: int = 64
    unet_learning_rate: float = 1e-3
    warmup_steps: int = 200
    caption_dropout: float = field(default=0.1, metadata={"help": "Share of empty captions, for classifier-free guidance."})
    num_threads: int = field(default=1, metadata={"help": "torch CPU threads."})
    log_every: int = 100


TOKENIZER_MAX_LENGTH = 16  # the longest caption is 11 tokens with <|startoftext|> and <|endoftext|>


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP byte-level alphabet: printable bytes map to themselves, the rest to unused code points.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def _apply_merges(word: str, merge_ranks: dict[tuple[str, str], int]) -> list[str]:
    # Byte-pair encoding of one word as CLIP does it: repeatedly merge the best-ranked adjacent pair.
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(merge_ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def build_tokenizer(max_length: int = TOKENIZER_MAX_LENGTH) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is the byte alphabet plus one token per word of the world's captions."""
    words = sorted({word for scene in all_scenes() for word in scene.caption.split()})
    # Add merges until every caption word is a single token; a merge appended last never undoes an earlier one.
    merges: list[tuple[str, str]] = []
    while True:
        ranks = {pair: rank for rank, pair in enumerate(merges)}
        unfinished = [pieces for pieces in (_apply_merges(word, ranks) for word in words) if len(pieces) > 1]
        if not unfinished:
            break
        merges.append((unfinished[0][0], unfinished[0][1]))
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    with tempfile.TemporaryDirectory() as directory:
        with open(f"{directory}/vocab.json", "w") as f:
            json.dump(vocab, f)
        with open(f"{directory}/merges.txt", "w") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        # On transformers 5 the files are read only through from_pretrained (see NOTES section 4).
        return CLIPTokenizer.from_pretrained(directory, model_max_length=max_length)


def build_models(tokenizer: CLIPTokenizer, beta_end: float = 0.012) -> tuple[AutoencoderKL, CLIPTextModel, UNet2DConditionModel, DDIMScheduler]:
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TOKENIZER_MAX_LENGTH,
            projection_dim=64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=64,
        attention_head_dim=8,
    )
    # Stable Diffusion's noise schedule with v-prediction (as SD 2.x) and "trailing" spacing, so that one step
    # starts at t = 999, pure noise, and few-step sampling is meaningful (yet imperfect).
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=beta_end,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return vae, text_encoder, unet, scheduler


def _cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def adamw_with_cosine_schedule(parameters, learning_rate: float, steps: int, warmup_steps: int):
    """AdamW without weight decay, and a linear warm-up then cosine decay to 0 over `steps`."""
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine_with_warmup(s, steps, warmup_steps))


def train_vae(vae: AutoencoderKL, images: torch.Tensor, args: TrainBaseArguments, generator: torch.Generator) -> None:
    optimizer, schedule = adamw_with_cosine_schedule(vae.parameters(), args.vae_learning_rate, args.vae_steps, args.warmup_steps)
    start = time.time()
    for step in range(args.vae_steps):
        batch = images[torch.randint(len(images), (args.vae_batch_size,), generator=generator)] * 2 - 1
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        # L1 keeps shape edges sharper than MSE; a tiny KL as in Stable Diffusion's VAE.
        loss = (reconstruction - batch).abs().mean() + 1e-6 * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % args.log_every == 0 or step == args.vae_steps - 1:
            print(f"vae step {step:5d}/{args.vae_steps}  l1 {loss.item():.4f}  {time.time() - start:6.0f}s", flush=True)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    return torch.cat([vae.encode(batch * 2 - 1).latent_dist.mean for batch in batches])


def v_prediction_loss(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    scheduler: DDIMScheduler,
    latents: torch.Tensor,
    caption_ids: torch.Tensor,
    empty_ids: torch.Tensor,
    batch_size: int,
    caption_dropout: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """The diffusion loss on a random batch of latents at uniform timesteps, with v-prediction; a share of the captions
    is replaced by the empty one, so that classifier-free guidance works."""
    index = torch.randint(len(latents), (batch_size,), generator=generator)
    x0, ids = latents[index], caption_ids[index].clone()
    ids[torch.rand(len(ids), generator=generator) < caption_dropout] = empty_ids
    noise = torch.randn(x0.shape, generator=generator)
    timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
    prediction = unet(scheduler.add_noise(x0, noise, timesteps), timesteps, text_encoder(ids)[0]).sample
    return F.mse_loss(prediction, scheduler.get_velocity(x0, noise, timesteps))


def train_unet(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    scheduler: DDIMScheduler,
    latents: torch.Tensor,
    caption_ids: torch.Tensor,
    empty_ids: torch.Tensor,
    args: TrainBaseArguments,
    generator: torch.Generator,
) -> None:
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer, schedule = adamw_with_cosine_schedule(parameters, args.unet_learning_rate, args.unet_steps, args.warmup_steps)
    start, running_loss = time.time(), 0.0
    for step in range(args.unet_steps):
        loss = v_prediction_loss(unet, text_encoder, scheduler, latents, caption_ids, empty_ids, args.unet_batch_size,
                                 args.caption_dropout, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        running_loss += loss.item()
        if (step + 1) % args.log_every == 0 or step == args.unet_steps - 1:
            elapsed = time.time() - start
            eta = elapsed / (step + 1) * (args.unet_steps - step - 1)
            loss_text = f"v-loss {running_loss / args.log_every:.4f}"
            print(f"unet step {step + 1:5d}/{args.unet_steps}  {loss_text}  {elapsed:6.0f}s  eta {eta:5.0f}s", flush=True)
            running_loss = 0.0


def main(args: TrainBaseArguments) -> None:
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()

    tokenizer = build_tokenizer()
    vae, text_encoder, unet, scheduler = build_models(tokenizer, args.beta_end)
    for name, model in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet)):
        print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)

    rng = np.random.default_rng(args.seed)
    examples = [render_example(int(seed)) for seed in rng.integers(2**31, size=args.num_images)]
    images = torch.stack([image for image, _, _ in examples])
    captions = [caption for _, caption, _ in examples]
    print(f"rendered {len(images)} images in {time.time() - start:.0f}s", flush=True)

    train_vae(vae, images, args, generator)
    vae.eval().requires_grad_(False)
    latents = encode_latents(vae, images)
    # Scale latents to unit variance, as Stable Diffusion's scaling_factor does, so that noise and data match.
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    latents = latents * vae.config.scaling_factor
    with torch.no_grad():
        reconstruction = vae.decode(latents[:500] / vae.config.scaling_factor).sample
    error = ((reconstruction + 1) / 2 - images[:500]).abs().mean()
    print(f"vae reconstruction L1 on 500 training images (pixels in [0, 1]): {error:.4f}", flush=True)

    def token_ids(texts: list[str]) -> torch.Tensor:
        # Padded to model_max_length exactly as StableDiffusionPipeline.encode_prompt does.
        max_length = tokenizer.model_max_length
        return tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids

    train_unet(unet, text_encoder, scheduler, latents, token_ids(captions), token_ids([""])[0], args, generator)

    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(args.output_dir, safe_serialization=True)
    print(f"saved {args.output_dir} after {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    (arguments,) = HfArgumentParser(TrainBaseArguments).parse_args_into_dataclasses()
    main(arguments)
