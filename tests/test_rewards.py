"""Built-in rewards: each model reward loads a tiny random-weight model saved in its real layout and is compared
with an independent computation of the reference recipe; plus JPEG, the HTTP client, and the calling helper."""

import argparse
import asyncio
import base64
import io
import json
import math
import os
import string
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, CLIPConfig, CLIPImageProcessorPil, CLIPModel
from transformers import CLIPTokenizer

from trl_noise_ppo.rewards import (
    AestheticReward,
    CLIPScoreReward,
    HPSv2Reward,
    HTTPReward,
    ImageReward,
    JPEGCompressibilityReward,
    JPEGIncompressibilityReward,
    MissingWeightsError,
    PickScoreReward,
    call_reward_funcs,
    check_reward_files,
    resolve_reward_funcs,
    runs_concurrently,
)
from trl_noise_ppo.rewards.preprocessing import normalize, resize_longest_side_and_pad
from trl_noise_ppo.rewards.preprocessing import resize_shortest_side_and_center_crop


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ONE_LEVEL = 1 / 255 / min(CLIP_STD)  # one uint8 step, after normalisation
PROMPTS = ["a photo of a cat", "two dogs, 3 birds!", "cat " * 60]  # the last one is longer than 77 tokens


def smooth_images(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Random low-frequency images on the uint8 grid, as a decoded generation would be."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, max(height // 8, 2), max(width // 8, 2), generator=generator)
    images = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (images * 255).round() / 255


def textured_images(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Images with detail at every scale (half smooth, half pixel noise) on the uint8 grid: what downscaling by 4
    or more has to antialias."""
    noise = torch.rand(count, 3, height, width, generator=torch.Generator().manual_seed(seed + 1))
    return ((smooth_images(count, height, width, seed) + noise) / 2 * 255).round() / 255


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def pil_to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    """torchvision's ToTensor + Normalize(CLIP mean, std)."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    return normalize(pixels, CLIP_MEAN, CLIP_STD)


def torchvision_resize_center_crop(image: Image.Image, size: int) -> torch.Tensor:
    """ImageReward's transform, torchvision's Resize(size, BICUBIC) + CenterCrop(size) on a PIL image, by hand."""
    width, height = image.size
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    image = image.resize((new_width, new_height), Image.BICUBIC)
    left, top = int(round((new_width - size) / 2)), int(round((new_height - size) / 2))
    return pil_to_normalized_tensor(image.crop((left, top, left + size, top + size)))


def cubic(x: float, a: float) -> float:
    """The bicubic convolution kernel with parameter `a` (Keys 1981)."""
    x = abs(x)
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    return a * (((x - 5) * x + 8) * x - 4) if x < 2 else 0.0


def torchvision_bicubic_matrix(in_size: int, out_size: int, antialias: bool) -> torch.Tensor:
    """(out, in) weights of torchvision's `F.resize(float_tensor, size, BICUBIC, antialias=...)` along one axis.

    With antialias (PyTorch's `_upsample_bicubic2d_aa`, PIL's filter): a = -0.5, the kernel widened by the
    downscaling factor, taps clipped to the image and normalised to sum 1. Without (`upsample_bicubic2d`): a = -0.75,
    four taps around `scale * (i + 0.5) - 0.5`, indices clamped to the border.
    """
    scale = in_size / out_size
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        if antialias:
            support, center = 2 * max(scale, 1), scale * (i + 0.5)
            taps = range(max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size))
            weights = torch.tensor([cubic((j - center + 0.5) / max(scale, 1), -0.5) for j in taps])
            matrix[i, taps.start : taps.stop] = weights / weights.sum()
        else:
            source = scale * (i + 0.5) - 0.5
            for j in range(math.floor(source) - 1, math.floor(source) + 3):
                matrix[i, min(max(j, 0), in_size - 1)] += cubic(source - j, -0.75)
    return matrix


def hpsv2_transform(image: Image.Image, size: int, antialias: bool) -> torch.Tensor:
    """`hpsv2`'s validation transform, by hand: ToTensor, then open_clip's ResizeMaxSize(size, fill=0) on the float
    tensor (torchvision's bicubic `F.resize`, no rounding, then `F.pad` with zeros), then Normalize."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float64) / 255).permute(2, 0, 1)
    height, width = pixels.shape[1:]
    scale = size / max(height, width)
    if scale != 1.0:
        new_height, new_width = round(height * scale), round(width * scale)
        rows = torchvision_bicubic_matrix(height, new_height, antialias)
        columns = torchvision_bicubic_matrix(width, new_width, antialias)
        pixels = rows @ pixels @ columns.T
        pad_h, pad_w = size - new_height, size - new_width
        pixels = F.pad(pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    return normalize(pixels.float(), CLIP_MEAN, CLIP_STD)


def perturb_(model: nn.Module, scale: float = 0.1) -> nn.Module:
    """Moves every weight off its initial value, so that a LayerNorm or bias loaded into the wrong place shows."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn_like(parameter))
    return model.eval()


def save_clip_tokenizer(folder) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single characters; the special tokens come last, as in CLIP's vocabulary."""
    characters = list(string.ascii_lowercase + string.digits + ".,!&';")
    tokens = characters + [c + "</w>" for c in characters] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_clip_config(projection_dim: int) -> CLIPConfig:
    return CLIPConfig(
        text_config=dict(
            vocab_size=86, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, hidden_act="gelu", bos_token_id=84, eos_token_id=85, pad_token_id=85,
        ),
        vision_config=dict(
            hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=224,
            patch_size=56, hidden_act="gelu",
        ),
        projection_dim=projection_dim,
    )


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny CLIPModel in the layout of openai/clip-vit-large-patch14, with its (old-format) preprocessor config."""
    folder = tmp_path_factory.mktemp("tiny-clip")
    save_clip_tokenizer(folder)
    torch.manual_seed(0)
    # 768-dimensional embeddings, as ViT-L/14's, because the aesthetic MLP reads them.
    perturb_(CLIPModel(tiny_clip_config(projection_dim=768))).save_pretrained(folder)
    preprocessor_config = {
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "resample": 3, "size": 224,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor_config))
    return folder


def reference_clip_embeddings(folder, images, prompts, processor_folder=None):
    """Normalised embeddings by transformers' own processor (on PIL images) and public feature methods."""
    model = CLIPModel.from_pretrained(folder).eval()
    pixel_values = CLIPImageProcessorPil.from_pretrained(processor_folder or folder)(
        images=[to_pil(image) for image in images], return_tensors="pt"
    ).pixel_values
    tokenizer = CLIPTokenizer.from_pretrained(processor_folder or folder)
    text = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_embeds = model.get_image_features(pixel_values=pixel_values).pooler_output
        text_embeds = model.get_text_features(**text).pooler_output
    return F.normalize(image_embeds, dim=-1), F.normalize(text_embeds, dim=-1), model


# ---------------------------------------------------------------- preprocessing against the reference recipes


@pytest.mark.parametrize("height, width, make_images", [(64, 64, smooth_images), (96, 160, smooth_images),
                                                         (300, 200, smooth_images), (1024, 1024, textured_images)])
def test_clip_preprocessing_matches_transformers_processor(height, width, make_images):
    images = make_images(2, height, width)
    reference = CLIPImageProcessorPil()(images=[to_pil(image) for image in images], return_tensors="pt").pixel_values
    ours = normalize(resize_shortest_side_and_center_crop(images, 224, 224, 224), CLIP_MEAN, CLIP_STD)
    assert ours.shape == reference.shape == (2, 3, 224, 224)
    difference = (ours - reference).abs()
    # PIL computes in fixed point: a few percent of its pixels round one or two levels differently.
    assert difference.max() <= 2.01 * ONE_LEVEL
    assert (difference > 1e-4).float().mean() < 0.05


@pytest.mark.parametrize("height, width, make_images", [(512, 512, smooth_images), (96, 160, smooth_images),
                                                         (300, 200, smooth_images), (1216, 832, smooth_images),
                                                         (1024, 1024, textured_images)])
def test_imagereward_preprocessing_matches_torchvision_recipe(height, width, make_images):
    # At 832 x 1216 the resized image is 224 x 327: torchvision's CenterCrop starts at round(51.5) = 52, not 51.
    images = make_images(2, height, width, seed=1)
    reference = torch.stack([torchvision_resize_center_crop(to_pil(image), 224) for image in images])
    ours = resize_shortest_side_and_center_crop(images, 224, 224, 224, round_crop_offset=True)
    ours = normalize(ours, CLIP_MEAN, CLIP_STD)
    difference = (ours - reference).abs()
    assert difference.max() <= 2.01 * ONE_LEVEL
    assert (difference > 1e-4).float().mean() < 0.05


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("height, width, make_images", [(100, 160, smooth_images), (160, 100, smooth_images),
                                                         (101, 160, smooth_images), (224, 224, smooth_images),
                                                         (512, 512, textured_images), (1024, 768, textured_images)])
def test_hps_preprocessing_is_hpsv2s_float_tensor_resize(height, width, make_images, antialias):
    # The trainer's images are floats; HPS is given them as PIL images, i.e. quantised to uint8 first.
    images = make_images(2, height, width, seed=2) + 0.3 / 255
    reference = torch.stack([hpsv2_transform(to_pil(image), 224, antialias) for image in images])
    ours = normalize(resize_longest_side_and_pad(images, 224, antialias=antialias), CLIP_MEAN, CLIP_STD)
    assert ours.shape == (2, 3, 224, 224)
    assert (ours - reference).abs().max() < ONE_LEVEL / 20  # float32 rounding only: no uint8 rounding anywhere
    # The padding is black before normalisation: HPS pads with fill=0.
    pad_top = (224 - round(height * 224 / max(height, width))) // 2
    black = normalize(torch.zeros(3, 1, 1), CLIP_MEAN, CLIP_STD)
    assert torch.allclose(ours[:, :, :pad_top], black.expand(2, 3, pad_top, 224))


# ---------------------------------------------------------------- CLIP-family rewards


def test_clipscore_and_pickscore_match_reference(clip_folder):
    images = smooth_images(3, 96, 128, seed=3)
    image_embeds, text_embeds, model = reference_clip_embeddings(clip_folder, images, PROMPTS)
    cosine = (image_embeds * text_embeds).sum(-1)

    clipscore = CLIPScoreReward(model_id=str(clip_folder), batch_size=2)
    assert clipscore.device is None
    rewards = clipscore(images=images, prompts=PROMPTS, trainer_state=None, extra_column=[1, 2, 3])
    assert clipscore.device == images.device
    # Tolerance: PIL's fixed-point resize rounds a few pixels a level apart from the tensor recipe.
    assert rewards == pytest.approx((100 * cosine).clamp(min=0).tolist(), abs=3e-3)

    pickscore = PickScoreReward(model_id=str(clip_folder), processor_id=str(clip_folder), batch_size=1)
    expected = model.logit_scale.exp().item() * cosine
    assert pickscore(images=images, prompts=PROMPTS) == pytest.approx(expected.tolist(), abs=3e-3)


def test_clipscore_offers_hessels_original_settings(clip_folder):
    # Hessel et al.'s clipscore.py: w * max(cos, 0) with w = 2.5 and the caption after "A photo depicts ".
    images = smooth_images(3, 64, 96, seed=12)
    prompts = ["a cat", "two dogs, 3 birds!", "a red car"]
    image_embeds, text_embeds, _ = reference_clip_embeddings(
        clip_folder, images, ["A photo depicts " + prompt for prompt in prompts]
    )
    expected = 2.5 * (image_embeds * text_embeds).sum(-1).clamp(min=0)
    reward = CLIPScoreReward(model_id=str(clip_folder), weight=2.5, prefix="A photo depicts ")
    assert reward(images=images, prompts=prompts) == pytest.approx(expected.tolist(), abs=1e-3)
    assert resolve_reward_funcs("clipscore_hessel")[0].model_id == "openai/clip-vit-base-patch32"


def test_pickscore_reads_tokenizer_and_image_processor_from_processor_id(clip_folder, tmp_path):
    # As PickScore_v1's README: the model from one repository, the processor from another. Here the processor's
    # recipe differs from the model folder's (256 px shorter side, mean and std 0.5), so using the wrong one shows.
    model_folder, processor_folder = tmp_path / "model", tmp_path / "processor"
    CLIPModel.from_pretrained(clip_folder).save_pretrained(model_folder)  # weights and config only
    processor_folder.mkdir()
    save_clip_tokenizer(processor_folder)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 256}, crop_size=224, image_mean=[0.5] * 3,
                                      image_std=[0.5] * 3)
    processor.save_pretrained(processor_folder)
    images = smooth_images(2, 96, 128, seed=13)
    prompts = PROMPTS[:2]
    image_embeds, text_embeds, model = reference_clip_embeddings(model_folder, images, prompts, processor_folder)
    expected = model.logit_scale.exp() * (image_embeds * text_embeds).sum(-1)
    reward = PickScoreReward(model_id=str(model_folder), processor_id=str(processor_folder))
    assert reward(images=images, prompts=prompts) == pytest.approx(expected.tolist(), abs=1e-3)


def test_pickscore_keeps_its_scale_in_float32_in_bfloat16(clip_folder, tmp_path):
    # PickScore's logit_scale is log(100); in bf16 it would be 4.594, whose exponential is 99.0.
    model = CLIPModel.from_pretrained(clip_folder)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100))
    model.save_pretrained(tmp_path)
    save_clip_tokenizer(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text((clip_folder / "preprocessor_config.json").read_text())
    images = smooth_images(3, 64, 64, seed=14)
    bf16 = dict(model_id=str(tmp_path), dtype=torch.bfloat16)
    # The same bf16 model, scored as 100 * cosine (CLIPScore clamps at 0: compare where the cosine is positive).
    hundred_cosines = CLIPScoreReward(**bf16)(images=images, prompts=PROMPTS)
    pickscores = PickScoreReward(**bf16, processor_id=None)(images=images, prompts=PROMPTS)
    positive = [(pick, clip) for pick, clip in zip(pickscores, hundred_cosines, strict=True) if clip > 0]
    assert positive, "the test needs an image with a positive cosine"
    for pickscore, hundred_cosine in positive:
        assert pickscore == pytest.approx(hundred_cosine, rel=1e-5)


def test_aesthetic_matches_ddpo_recipe(clip_folder, tmp_path):
    torch.manual_seed(4)
    # DDPO's MLP, defined by hand: no activations; dropout layers keep the saved layer indices.
    layers = nn.Sequential(
        nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
    ).eval()
    weights = {f"layers.{name}": tensor for name, tensor in layers.state_dict().items()}
    torch.save(weights, tmp_path / "aesthetic-model.pth")
    images = smooth_images(3, 64, 64, seed=5)
    image_embeds, _, _ = reference_clip_embeddings(clip_folder, images, PROMPTS)
    with torch.no_grad():
        expected = layers(image_embeds).squeeze(-1)

    reward = AestheticReward(model_id=str(clip_folder), predictor_id=str(tmp_path))
    assert reward.__name__ == "aesthetic"
    assert reward(images=images, prompts=PROMPTS) == pytest.approx(expected.tolist(), abs=1e-3)


# ---------------------------------------------------------------- HPSv2: an open_clip checkpoint


class OpenCLIPBlock(nn.Module):
    """open_clip's ResidualAttentionBlock, with its attribute (and so state dict) names."""

    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(), c_proj=nn.Linear(4 * width, width))
        )

    def forward(self, x, attn_mask=None):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    def __init__(self, width, heads, layers):
        super().__init__()
        self.resblocks = nn.ModuleList(OpenCLIPBlock(width, heads) for _ in range(layers))

    def forward(self, x, attn_mask=None):
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class OpenCLIPVisionTransformer(nn.Module):
    def __init__(self, width, heads, layers, patch_size, image_size, embed_dim):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn((image_size // patch_size) ** 2 + 1, width) * width**-0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = OpenCLIPTransformer(width, heads, layers)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed_dim) * width**-0.5)

    def forward(self, pixels):
        x = self.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(len(x), 1, -1), x], dim=1) + self.positional_embedding
        x = self.ln_post(self.transformer(self.ln_pre(x)))
        return x[:, 0] @ self.proj


class OpenCLIP(nn.Module):
    """open_clip's CLIP (ViT image tower, causal text tower), small."""

    def __init__(self, embed_dim=16, vocab_size=86, context_length=77):
        super().__init__()
        self.visual = OpenCLIPVisionTransformer(64, 4, 2, patch_size=56, image_size=224, embed_dim=embed_dim)
        self.token_embedding = nn.Embedding(vocab_size, 32)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, 32) * 0.01)
        self.transformer = OpenCLIPTransformer(32, 2, 2)
        self.ln_final = nn.LayerNorm(32)
        self.text_projection = nn.Parameter(torch.randn(32, embed_dim) * 32**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        mask = torch.full((context_length, context_length), float("-inf")).triu(1)
        self.register_buffer("attn_mask", mask, persistent=False)

    def encode_text(self, tokens):
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))
        return x[torch.arange(len(x)), tokens.argmax(dim=-1)] @ self.text_projection  # the end-of-text token


@pytest.fixture(scope="module")
def hps_folders(tmp_path_factory):
    """(checkpoint folder in xswu/HPSv2's layout, config folder like the LAION ViT-H-14's, the reference model)."""
    checkpoint_folder, config_folder = tmp_path_factory.mktemp("tiny-hps"), tmp_path_factory.mktemp("tiny-vit-h")
    torch.manual_seed(6)
    model = perturb_(OpenCLIP())
    torch.save({"state_dict": model.state_dict()}, checkpoint_folder / "HPS_v2_compressed.pt")
    tiny_clip_config(projection_dim=16).save_pretrained(config_folder)
    save_clip_tokenizer(config_folder)
    return checkpoint_folder, config_folder, model


def open_clip_clean(text: str) -> str:
    """open_clip's tokenizer.py, `whitespace_clean(basic_clean(text))`."""
    import html
    import re

    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


@pytest.mark.parametrize("antialias", [True, False])
def test_hpsv2_scores_open_clip_checkpoint_like_open_clip(hps_folders, antialias):
    checkpoint_folder, config_folder, model = hps_folders
    images = textured_images(3, 300, 200, seed=7)
    prompts = PROMPTS[:2] + ["it’s a ﬁsh &amp;amp; a cat"]
    tokenizer = CLIPTokenizer.from_pretrained(config_folder)
    # open_clip's tokenizer: cleaned text, 77 tokens, zero padding, the end-of-text token kept when truncating.
    tokens = torch.zeros(len(prompts), 77, dtype=torch.long)
    cleaned = [open_clip_clean(prompt) for prompt in prompts]
    for row, ids in enumerate(tokenizer(cleaned, truncation=True, max_length=77).input_ids):
        tokens[row, : len(ids)] = torch.tensor(ids)
    pixels = torch.stack([hpsv2_transform(to_pil(image), 224, antialias) for image in images])
    with torch.no_grad():
        expected = (F.normalize(model.visual(pixels), dim=-1) * F.normalize(model.encode_text(tokens), dim=-1)).sum(-1)

    reward = HPSv2Reward(
        model_id=str(checkpoint_folder), config_id=str(config_folder), batch_size=2, antialias=antialias
    )
    assert reward(images=images, prompts=prompts) == pytest.approx(expected.tolist(), abs=1e-4)


def test_hpsv2_cleans_prompts_as_open_clip(hps_folders):
    # Each pair differs only by what open_clip's ftfy.fix_text, double html.unescape and whitespace folding undo.
    checkpoint_folder, config_folder, _ = hps_folders
    pairs = [
        ("a cat &amp; a dog", "a cat & a dog"),
        ("a cat &amp;amp; a dog", "a cat & a dog"),
        ("it’s a cat", "it's a cat"),  # curly apostrophe
        ("a ﬁsh", "a fish"),  # ligature
        ("ｃａｔ on a mat", "cat on a mat"),  # full-width letters
        ("  a cat\n\t on   a mat ", "a cat on a mat"),
    ]
    prompts = [prompt for pair in pairs for prompt in pair]
    images = smooth_images(1, 64, 64, seed=15).expand(len(prompts), -1, -1, -1)
    reward = HPSv2Reward(model_id=str(checkpoint_folder), config_id=str(config_folder))
    scores = reward(images=images, prompts=prompts)
    for (raw, clean), raw_score, clean_score in zip(pairs, scores[::2], scores[1::2], strict=True):
        assert raw_score == pytest.approx(clean_score, abs=1e-6), (raw, clean)
    assert len(set(round(score, 4) for score in scores[1::2])) > 1  # the prompts do move the score


def test_hpsv2_without_ftfy_says_how_to_install_it(monkeypatch, hps_folders):
    monkeypatch.setitem(sys.modules, "ftfy", None)  # makes `import ftfy` fail
    checkpoint_folder, config_folder, _ = hps_folders
    reward = HPSv2Reward(model_id=str(checkpoint_folder), config_id=str(config_folder))
    with pytest.raises(ImportError, match="Python packages are missing: ftfy \\(for hpsv2; pip install ftfy"):
        check_reward_files([reward])
    with pytest.raises(ImportError, match="pip install ftfy"):
        reward(images=torch.rand(1, 3, 32, 32), prompts=["a cat"])


def test_check_reward_files_names_missing_packages_and_missing_weights_in_one_error(empty_offline_hub_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "ftfy", None)
    with pytest.raises(MissingWeightsError) as error:
        check_reward_files(resolve_reward_funcs(["hpsv2", "aesthetic"]))
    assert "Python packages are missing: ftfy (for hpsv2; pip install ftfy" in str(error.value)
    assert "hf download xswu/HPSv2 HPS_v2_compressed.pt" in str(error.value)
    assert "hf download trl-lib/ddpo-aesthetic-predictor aesthetic-model.pth" in str(error.value)


def test_hpsv2_refuses_a_checkpoint_with_unknown_weights(hps_folders, tmp_path):
    _, config_folder, model = hps_folders
    state_dict = dict(model.state_dict(), **{"visual.extra_head.weight": torch.zeros(2)})
    torch.save({"state_dict": state_dict}, tmp_path / "HPS_v2.1_compressed.pt")
    reward = HPSv2Reward(model_id=str(tmp_path), filename="HPS_v2.1_compressed.pt", config_id=str(config_folder))
    with pytest.raises(ValueError, match="visual.extra_head.weight"):
        reward(images=smooth_images(1, 64, 64), prompts=["a cat"])


def test_checkpoints_are_never_unpickled(hps_folders, tmp_path):
    _, config_folder, _ = hps_folders
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1.0)}, tmp_path / "HPS_v2_compressed.pt")
    reward = HPSv2Reward(model_id=str(tmp_path), config_id=str(config_folder))
    with pytest.raises(ValueError, match="not unpickled for safety"):
        reward(images=smooth_images(1, 64, 64), prompts=["a cat"])


# ---------------------------------------------------------------- ImageReward: BLIP ViT + BERT with cross-attention


class BLIPBlock(nn.Module):
    """A block of BLIP's `models/vit.py` VisionTransformer, with its names."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        batch, length, width = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(batch, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * (width // self.heads) ** -0.5).softmax(dim=-1)
        x = x + self.attn.proj((attention @ v).transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class BLIPViT(nn.Module):
    def __init__(self, width=128, depth=2, heads=2, patch_size=56, image_size=224):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, width, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, width))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (image_size // patch_size) ** 2 + 1, width))
        self.blocks = nn.ModuleList(BLIPBlock(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, pixels):
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def med_bert_text_encoder(weights, input_ids, attention_mask, image_tokens, heads, eps):
    """BLIP's `med.py` BertModel in "multimodal" mode, by hand on its state dict: embeddings (word + absolute
    position, LayerNorm; no token types), then per layer self-attention, cross-attention to the image tokens and the
    feed-forward block, each followed by a residual LayerNorm. Returns the last hidden states."""

    def linear(x, name):
        return x @ weights[f"{name}.weight"].T + weights[f"{name}.bias"]

    def layer_norm(x, name):
        return F.layer_norm(x, x.shape[-1:], weights[f"{name}.weight"], weights[f"{name}.bias"], eps)

    def attention(x, context, mask, name):  # BertAttention: BertSelfAttention then BertSelfOutput
        def split(t):
            return t.view(len(t), -1, heads, t.shape[-1] // heads).transpose(1, 2)

        q, k, v = (split(linear(y, f"{name}.self.{part}")) for y, part in ((x, "query"), (context, "key"),
                                                                           (context, "value")))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + (1.0 - mask[:, None, None, :]) * -10000.0
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(x.shape)
        return layer_norm(linear(out, f"{name}.output.dense") + x, f"{name}.output.LayerNorm")

    positions = torch.arange(input_ids.shape[1])
    embeddings = weights["embeddings.word_embeddings.weight"][input_ids]
    x = layer_norm(embeddings + weights["embeddings.position_embeddings.weight"][positions], "embeddings.LayerNorm")
    text_mask, image_mask = attention_mask.float(), torch.ones(image_tokens.shape[:2])
    layer = 0
    while f"encoder.layer.{layer}.attention.self.query.weight" in weights:
        name = f"encoder.layer.{layer}"
        x = attention(x, x, text_mask, f"{name}.attention")
        x = attention(x, image_tokens, image_mask, f"{name}.crossattention")
        hidden = F.gelu(linear(x, f"{name}.intermediate.dense"))
        x = layer_norm(linear(hidden, f"{name}.output.dense") + x, f"{name}.output.LayerNorm")
        layer += 1
    assert layer == 2
    return x


@pytest.fixture(scope="module")
def imagereward_folders(tmp_path_factory):
    """(checkpoint folder in THUDM/ImageReward's layout, bert tokenizer folder, reference parts)."""
    folder, tokenizer_folder = tmp_path_factory.mktemp("tiny-imagereward"), tmp_path_factory.mktemp("tiny-bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "two", "dog", "##s", ",", "!"]
    (tokenizer_folder / "vocab.txt").write_text("\n".join(words + list(string.ascii_lowercase + string.digits)) + "\n")
    tokenizer = BertTokenizer.from_pretrained(tokenizer_folder)
    tokenizer.save_pretrained(tokenizer_folder)
    med_config = {  # the fields of ImageReward's med_config.json, small
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 2,
        "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(tokenizer) + 2,
        "encoder_width": 768, "add_cross_attention": True,
    }
    (folder / "med_config.json").write_text(json.dumps(med_config))
    torch.manual_seed(8)
    vit = perturb_(BLIPViT())
    text_config = BlipTextConfig(
        vocab_size=len(tokenizer) + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=64, encoder_hidden_size=128,
    )
    text_encoder = perturb_(BlipTextModel(text_config, add_pooling_layer=False))
    mlp = perturb_(nn.Sequential(
        nn.Linear(32, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
    ), scale=0.05)
    checkpoint = {f"blip.visual_encoder.{name}": tensor for name, tensor in vit.state_dict().items()}
    checkpoint |= {f"blip.text_encoder.{name}": tensor for name, tensor in text_encoder.state_dict().items()}
    checkpoint["blip.text_encoder.embeddings.position_ids"] = torch.arange(64).expand(1, -1)  # med.py saves it
    checkpoint |= {"blip.vision_proj.weight": torch.randn(256, 128), "blip.vision_proj.bias": torch.zeros(256)}
    checkpoint |= {"blip.text_proj.weight": torch.randn(256, 32), "blip.text_proj.bias": torch.zeros(256)}
    checkpoint |= {f"mlp.layers.{name}": tensor for name, tensor in mlp.state_dict().items()}
    torch.save(checkpoint, folder / "ImageReward.pt")
    return folder, tokenizer_folder, (vit, text_encoder, mlp, tokenizer)


def test_imagereward_matches_reference_scorer(imagereward_folders):
    folder, tokenizer_folder, (vit, text_encoder, mlp, tokenizer) = imagereward_folders
    # 152 x 104 resizes to 327 x 224, where torchvision's CenterCrop offset, round(51.5) = 52, is not floor's 51.
    images = textured_images(3, 152, 104, seed=9)
    prompts = ["a photo of a cat", "two dogs!", "cat " * 40]  # the last is cut at 35 tokens
    # ImageReward.score: PIL transform, bert tokens padded to 35, cross-attention, MLP on [CLS], z-score.
    pixels = torch.stack([torchvision_resize_center_crop(to_pil(image), 224) for image in images])
    text = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        image_tokens = vit(pixels)
        hidden_states = med_bert_text_encoder(
            text_encoder.state_dict(), text.input_ids, text.attention_mask, image_tokens, heads=2, eps=1e-12
        )
        expected = (mlp(hidden_states[:, 0]).squeeze(-1) - 0.16717362830052426) / 1.0333394966054072

    reward = ImageReward(model_id=str(folder), tokenizer_id=str(tokenizer_folder), batch_size=2)
    assert reward.__name__ == "imagereward"
    assert reward(images=images, prompts=prompts) == pytest.approx(expected.tolist(), abs=1e-3)


# ---------------------------------------------------------------- missing weights


def test_missing_weights_offline_name_the_repository_and_the_fix(imagereward_folders, tmp_path):
    images = smooth_images(1, 32, 32)
    reward = PickScoreReward(model_id="trl-noise-ppo-tests/absent-model")
    with pytest.raises(MissingWeightsError, match="hf download trl-noise-ppo-tests/absent-model") as error:
        reward(images=images, prompts=["a cat"])
    assert "model_id=" in str(error.value)

    _, tokenizer_folder, _ = imagereward_folders
    reward = ImageReward(model_id=str(tmp_path), tokenizer_id=str(tokenizer_folder))  # a folder without the weights
    with pytest.raises(MissingWeightsError, match=str(tmp_path)):
        reward(images=images, prompts=["a cat"])


@pytest.fixture
def empty_offline_hub_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and an empty Hugging Face cache, as on a fresh offline machine."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))


def test_check_reward_files_names_every_missing_repository_and_file_at_once(empty_offline_hub_cache):
    rewards = resolve_reward_funcs(["hpsv2", "imagereward", "aesthetic", "clipscore", "jpeg_compressibility"])
    with pytest.raises(MissingWeightsError) as error:
        check_reward_files(rewards)
    message = str(error.value)
    for command in [
        "hf download xswu/HPSv2 HPS_v2_compressed.pt\n",
        "hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K config.json tokenizer.json tokenizer_config.json\n",
        "hf download THUDM/ImageReward ImageReward.pt med_config.json\n",
        "hf download bert-base-uncased tokenizer.json tokenizer_config.json\n",
        "hf download openai/clip-vit-large-patch14 config.json model.safetensors tokenizer.json tokenizer_config.json "
        "preprocessor_config.json\n",
        "hf download trl-lib/ddpo-aesthetic-predictor aesthetic-model.pth\n",
    ]:
        assert command in message
    assert message.count("hf download") == 6  # CLIP ViT-L/14 once, though aesthetic and clipscore both need it
    assert "openai/clip-vit-large-patch14: config.json, model.safetensors" in message
    assert "(as aesthetic's model_id=, aesthetic's processor_id=, clipscore's model_id=" in message
    assert "HF_HUB_OFFLINE is set" in message


def test_check_reward_files_passes_complete_folders_and_names_a_folders_missing_file(clip_folder, tmp_path):
    check_reward_files([CLIPScoreReward(model_id=str(clip_folder)), JPEGCompressibilityReward(), lambda **kw: [0.0]])
    reward = AestheticReward(model_id=str(clip_folder), predictor_id=str(tmp_path))
    with pytest.raises(MissingWeightsError, match=rf"{tmp_path}: aesthetic-model.pth \(as aesthetic's predictor_id=\)"):
        check_reward_files([reward])


# ---------------------------------------------------------------- JPEG


def test_jpeg_rewards_prefer_flat_or_busy_images():
    flat = torch.full((3, 64, 64), 0.5)
    noisy = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(10))
    images = torch.stack([flat, noisy])
    compressibility = JPEGCompressibilityReward()(images=images, prompts=["a", "b"])
    incompressibility = JPEGIncompressibilityReward()(images=images, prompts=["a", "b"])
    assert incompressibility[1] > incompressibility[0] > 0
    assert compressibility == [-size for size in incompressibility]
    buffer = io.BytesIO()
    to_pil(noisy).save(buffer, format="JPEG", quality=95)
    assert incompressibility[1] == buffer.tell() / 1000


# ---------------------------------------------------------------- HTTP client against a local server


class ScriptedRewardServer:
    """A reward server on 127.0.0.1 that answers each POST by a script: "fail" (HTTP 500), "hang" (answers after
    0.5 s), "short" (an answer shorter than its Content-Length), "trickle" (40 bytes, one per 0.1 s), or "ok" (each image's mean brightness plus its prompt's length). After the script, it answers "ok"."""

    def __init__(self, script):
        self.script, self.requests = list(script), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(payload)
                action = server.script.pop(0) if server.script else "ok"
                if action == "fail":
                    self.send_error(500)
                    return
                if action == "hang":
                    time.sleep(0.5)
                if action == "short":  # promises more bytes than it sends, then closes
                    self.send_response(200)
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    self.wfile.write(b'{"rewards": [')
                    self.close_connection = True
                    return
                if action == "trickle":  # a byte every 0.1 s: each read is quick, the whole answer is not
                    self.send_response(200)
                    self.send_header("Content-Length", "40")
                    self.end_headers()
                    for _ in range(40):
                        try:
                            self.wfile.write(b" ")
                            self.wfile.flush()
                        except (BrokenPipeError, ConnectionResetError):
                            return
                        time.sleep(0.1)
                    return
                rewards = [
                    np.asarray(Image.open(io.BytesIO(base64.b64decode(png))), dtype=np.float64).mean() / 255 + len(p)
                    for png, p in zip(payload["images"], payload["prompts"], strict=True)
                ]
                body = json.dumps({"rewards": rewards}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting
                    pass

            def log_message(self, *args):
                pass

        self.http_server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http_server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http_server.server_address[1]}/score"

    def __enter__(self):
        threading.Thread(target=self.http_server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.http_server.shutdown()
        self.http_server.server_close()


@pytest.fixture
def loopback_without_proxy(monkeypatch):
    """urllib honours proxy variables; requests to the local test server must not go through one."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


def test_http_reward_retries_after_a_server_error(loopback_without_proxy):
    images = smooth_images(3, 32, 32, seed=11)
    prompts = ["a", "bb", "ccc"]
    with ScriptedRewardServer(["fail"]) as server:
        reward = HTTPReward(server.url, name="remote", batch_size=2, timeout=5, retries=2, backoff=0.01)
        rewards = reward(images=images, prompts=prompts)
    assert len(server.requests) == 3  # batch 1 failed once, then batch 1 and batch 2
    assert server.requests[1]["prompts"] == ["a", "bb"] and server.requests[2]["prompts"] == ["ccc"]
    expected = [image.mean().item() + len(prompt) for image, prompt in zip(images, prompts, strict=True)]
    assert rewards == pytest.approx(expected, abs=1e-6)


def test_http_reward_gives_up_after_timeouts(loopback_without_proxy):
    with ScriptedRewardServer(["hang", "hang"]) as server:
        reward = HTTPReward(server.url, timeout=0.2, retries=1, backoff=0.01)
        start = time.perf_counter()
        with pytest.raises(RuntimeError, match=r"2 requests to http://127\.0\.0\.1:\d+/score failed"):
            reward(images=smooth_images(1, 16, 16), prompts=["a"])
        assert time.perf_counter() - start < 1.5
    assert len(server.requests) == 2


def test_http_reward_timeout_bounds_the_whole_request(loopback_without_proxy):
    with ScriptedRewardServer(["trickle", "trickle"]) as server:
        reward = HTTPReward(server.url, timeout=0.5, retries=1, backoff=0.01)
        start = time.perf_counter()
        with pytest.raises(RuntimeError, match="2 requests .* failed; the last with TimeoutError"):
            reward(images=smooth_images(1, 16, 16), prompts=["a"])
        assert time.perf_counter() - start < 1.5  # two requests of 0.5 s; the trickle alone takes 4 s each


def test_http_reward_retries_an_answer_cut_short(loopback_without_proxy):
    with ScriptedRewardServer(["short"]) as server:
        rewards = HTTPReward(server.url, timeout=5, retries=1, backoff=0.01)(images=smooth_images(1, 16, 16), prompts=["a"])
    assert len(server.requests) == 2 and len(rewards) == 1


@pytest.mark.parametrize(
    "kwargs",
    [dict(retries=-1), dict(batch_size=0), dict(timeout=0), dict(timeout=float("inf")), dict(timeout=float("nan")),
     dict(timeout=1e300), dict(retries=1.5), dict(batch_size=2.5), dict(backoff=float("inf")), dict(retries=True)],
)
def test_http_reward_refuses_impossible_settings(kwargs):
    with pytest.raises(ValueError, match="HTTPReward needs batch_size >= 1, retries >= 0, timeout > 0"):
        HTTPReward("http://127.0.0.1:1/score", **kwargs)


# ---------------------------------------------------------------- calling reward functions


class SlowAsyncReward:
    """An async callable object, as a remote reward client would be."""

    __name__ = "slow_object"

    async def __call__(self, prompts, **kwargs):
        await asyncio.sleep(0.3)
        return [2.0] * len(prompts)


def test_async_rewards_run_concurrently_and_columns_keep_order():
    async def slow_function(prompts, **kwargs):
        await asyncio.sleep(0.3)
        return [1.0] * len(prompts)

    def sync_reward(images, prompts, trainer_state, label, **kwargs):
        assert trainer_state == "state" and label == [7, 8]  # dataset columns and trainer_state reach the functions
        return [None, 3.0]

    images = torch.zeros(2, 3, 8, 8)
    start = time.perf_counter()
    rewards = call_reward_funcs(
        [slow_function, sync_reward, SlowAsyncReward()], images, ["a", "b"], trainer_state="state", label=[7, 8]
    )
    assert time.perf_counter() - start < 0.5  # one sleep, not two
    assert rewards.dtype == torch.float32 and rewards.shape == (2, 3)
    assert rewards[:, 0].tolist() == [1.0, 1.0] and rewards[:, 2].tolist() == [2.0, 2.0]
    assert math.isnan(rewards[0, 1]) and rewards[1, 1] == 3.0


@pytest.mark.parametrize(
    "output, message",
    [
        ([1.0], "returned 1 rewards for 2 images"),
        ([1.0, float("nan")], "returned nan for image 1"),
        ([float("inf"), 1.0], "returned inf for image 0"),
        (1.0, "returned float, not a list"),
        ([1e300, 1.0], r"returned 1e\+300 for image 0 \(prompt 'a'\), beyond float32's range"),
        ({0: 1.0, 1: 2.0}, "returned dict, not a list"),
        (["0.5", "0.7"], "returned '0.5' for image 0, not a number"),
        (torch.zeros(2, 3), r"returned a tensor of shape \(2, 3\), not one reward per image"),
    ],
)
def test_call_reward_funcs_rejects_bad_outputs_naming_the_function(output, message):
    def faulty_reward(**kwargs):
        return output

    with pytest.raises(ValueError, match=f"'faulty_reward' {message}"):
        call_reward_funcs([faulty_reward], torch.zeros(2, 3, 8, 8), ["a", "b"])


def test_async_reward_outputs_are_validated_too():
    async def faulty_async(prompts, **kwargs):
        return [1.0]

    with pytest.raises(ValueError, match="'faulty_async' returned 1 rewards for 2 images"):
        call_reward_funcs([faulty_async], torch.zeros(2, 3, 8, 8), ["a", "b"])


def test_which_rewards_run_concurrently_with_sampling():
    def plain(images, **kwargs):
        return [0.0] * len(images)

    async def served(images, **kwargs):
        return [0.0] * len(images)

    class OnDevice:
        def __init__(self, device):
            self.device = device

        def __call__(self, images, **kwargs):
            return [0.0] * len(images)

    assert not runs_concurrently(plain, "cpu")
    assert runs_concurrently(served, "cpu") and runs_concurrently(SlowAsyncReward(), "cpu")
    assert runs_concurrently(HTTPReward("http://127.0.0.1:1/score"), "cpu")
    assert not runs_concurrently(OnDevice("cpu"), torch.device("cpu"))
    assert runs_concurrently(OnDevice("cuda:1"), "cuda:0") and runs_concurrently(OnDevice("cuda:0"), "cpu")
    assert not runs_concurrently(OnDevice("cuda:1"), torch.device("cuda", 1))
    # a declared `concurrent` wins over what the function looks like
    served.concurrent = False
    assert not runs_concurrently(served, "cpu")
    served_elsewhere = OnDevice("cpu")
    served_elsewhere.concurrent = True
    assert runs_concurrently(served_elsewhere, "cpu")


# ---------------------------------------------------------------- names and import


def test_resolve_reward_funcs_by_name_and_callable():
    def brightness(images, **kwargs):
        return images.mean(dim=(1, 2, 3)).tolist()

    names = ["aesthetic", "clipscore", "pickscore", "hpsv2", "hpsv2.1", "imagereward", "jpeg_compressibility",
             "jpeg_incompressibility", "shapes_alignment"]
    resolved = resolve_reward_funcs(names + [brightness])
    assert [reward.__name__ for reward in resolved] == names + ["brightness"]
    assert resolved[4].filename == "HPS_v2.1_compressed.pt"
    assert resolve_reward_funcs("jpeg_compressibility")[0].__name__ == "jpeg_compressibility"

    with pytest.raises(ValueError, match="Unknown reward 'pickscor'.*pickscore.*imagereward"):
        resolve_reward_funcs(["pickscor"])
    with pytest.raises(TypeError, match="a name or a callable"):
        resolve_reward_funcs([3])


def test_importing_the_package_prints_nothing():
    command = "import trl_noise_ppo, trl_noise_ppo.shapes, trl_noise_ppo.rewards, trl_noise_ppo.shapes.reward"
    result = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""
