"""ImageReward, ported onto stock transformers parts.

The original (THUDM/ImageReward, `ImageReward.py`) is BLIP's ViT-L image encoder, BLIP's BERT text encoder with
cross-attention to the image (`med.py`), and a linear MLP on the text encoder's first token. transformers'
BlipVisionModel and BlipTextModel implement the same two networks, so the checkpoint's weights are renamed onto
them; nothing of the original package is needed.
"""

import json
import math
from pathlib import Path

import torch
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .base import ModelReward, linear_mlp_head
from .loading import (
    TOKENIZER_FILES,
    RequiredFile,
    build_model_from_weights,
    explain_missing_weights,
    hub_file,
    load_tensor_file,
    rename,
)
from .preprocessing import normalize, resize_shortest_side_and_center_crop

# ImageReward's z-scoring of the MLP output, from its `ImageReward.py`.
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
# ImageReward tokenises with padding="max_length", truncation=True, max_length=35.
IMAGEREWARD_MAX_TOKENS = 35

# BLIP VisionTransformer name (under `blip.visual_encoder.`) -> transformers BlipVisionModel name, in order.
_BLIP_VIT_TO_TRANSFORMERS = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.", "encoder.layers."),
    (r"\.norm1\.", ".layer_norm1."),
    (r"\.norm2\.", ".layer_norm2."),
    (r"\.attn\.qkv\.", ".self_attn.qkv."),
    (r"\.attn\.proj\.", ".self_attn.projection."),
    (r"^norm\.", "post_layernorm."),
]


def split_imagereward_checkpoint(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """Splits an ImageReward state dict into (vision, text, mlp) state dicts with transformers' names.

    BLIP's text encoder (`med.py`) already uses transformers' BLIP text names. Dropped: BLIP's contrastive
    projections `vision_proj`/`text_proj`, which scoring does not use, and the text encoder's `position_ids`, a
    fixed `arange` that transformers rebuilds. Any other name is an error.
    """
    vision, text, mlp = {}, {}, {}
    for name, tensor in state_dict.items():
        if name.startswith(("blip.vision_proj.", "blip.text_proj.")) or name.endswith(".position_ids"):
            continue
        if name.startswith("blip.visual_encoder."):
            vision[rename(name.removeprefix("blip.visual_encoder."), _BLIP_VIT_TO_TRANSFORMERS)] = tensor
        elif name.startswith("blip.text_encoder."):
            text[name.removeprefix("blip.text_encoder.")] = tensor
        elif name.startswith("mlp.layers."):
            mlp[name.removeprefix("mlp.layers.")] = tensor
        else:
            raise ValueError(f"Unexpected weight '{name}' in the ImageReward checkpoint.")
    return vision, text, mlp


def blip_vision_config(vision_weights: dict[str, torch.Tensor]) -> BlipVisionConfig:
    """The BLIP ViT's configuration, read off its weights' shapes (ImageReward uses ViT-L/16 at 224 px).

    BLIP's ViT-B and ViT-L both use 64-dimensional attention heads and LayerNorm eps 1e-6.
    """
    position_embedding = vision_weights["embeddings.position_embedding"]  # (1, 1 + patches, width)
    width = position_embedding.shape[-1]
    patch_size = vision_weights["embeddings.patch_embedding.weight"].shape[-1]
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=vision_weights["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=sum(name.endswith(".layer_norm1.weight") for name in vision_weights),
        num_attention_heads=width // 64,
        image_size=patch_size * math.isqrt(position_embedding.shape[1] - 1),
        patch_size=patch_size,
        layer_norm_eps=1e-6,
    )


def blip_text_config(med_config: dict, encoder_hidden_size: int) -> BlipTextConfig:
    """The BERT text encoder's configuration from ImageReward's `med_config.json`.

    Cross-attention reads the image encoder's width, as BLIP sets `encoder_width` to it.
    """
    fields = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "hidden_act",
        "layer_norm_eps",
        "pad_token_id",
    ]
    return BlipTextConfig(**{field: med_config[field] for field in fields}, encoder_hidden_size=encoder_hidden_size)


class ImageReward(ModelReward):
    """ImageReward (Xu et al. 2023): a BLIP-based model of human preference for text-to-image generations.

    Reproduces the reference `ImageReward.score`: images resized (bicubic, shorter side) to 224, centre-cropped
    as torchvision's `CenterCrop` does (rounding the offset), normalised with CLIP's mean and std; prompts
    tokenised by bert-base-uncased, padded and truncated to 35 tokens; the BERT encoder cross-attends to the image
    tokens; the MLP reads its first token; the output is z-scored with ImageReward's mean 0.16717 and std 1.03334.

    Scale: z-scored, mostly in [-2, 2], higher is better.

    The checkpoint is loaded with `torch.load(weights_only=True)`.

    Args:
        model_id: Hub id or local folder holding the checkpoint and `med_config.json`.
        filename: the checkpoint's file ("ImageReward.pt", or a `.safetensors` file of the same tensors).
        tokenizer_id: Hub id or local folder of the bert-base-uncased tokenizer.
        device, dtype, batch_size, name: as for `CLIPScoreReward`.
    """

    def __init__(
        self,
        model_id: str = "THUDM/ImageReward",
        filename: str = "ImageReward.pt",
        tokenizer_id: str = "bert-base-uncased",
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        name: str = "imagereward",
    ):
        super().__init__(name=name, device=device, dtype=dtype, batch_size=batch_size)
        self.model_id = model_id
        self.filename = filename
        self.tokenizer_id = tokenizer_id

    def required_files(self):
        return [
            RequiredFile(self.model_id, self.filename, "model_id"),
            RequiredFile(self.model_id, "med_config.json", "model_id"),
            *(RequiredFile(self.tokenizer_id, filename, "tokenizer_id") for filename in TOKENIZER_FILES),
        ]

    def _load(self, device):
        with explain_missing_weights(self.tokenizer_id, "tokenizer_id"):
            # BLIP loads it as a BertTokenizer; that class needs no model config.json to find.
            self.tokenizer = BertTokenizer.from_pretrained(self.tokenizer_id)
        med_config = json.loads(Path(hub_file(self.model_id, "med_config.json", "model_id")).read_text())
        checkpoint = load_tensor_file(hub_file(self.model_id, self.filename, "model_id"))
        vision_weights, text_weights, mlp_weights = split_imagereward_checkpoint(checkpoint)
        vision_config = blip_vision_config(vision_weights)
        text_config = blip_text_config(med_config, encoder_hidden_size=vision_config.hidden_size)
        self.vision_model = build_model_from_weights(BlipVisionModel, vision_config, vision_weights, self.dtype)
        # BLIP's text encoder has no pooler (add_pooling_layer=False).
        self.text_model = build_model_from_weights(
            BlipTextModel, text_config, text_weights, self.dtype, add_pooling_layer=False
        )
        self.mlp = linear_mlp_head(text_config.hidden_size)
        self.mlp.load_state_dict(mlp_weights)
        self.vision_model.to(device)
        self.text_model.to(device)
        self.mlp.to(device).eval()

    def _score(self, images, prompts):
        image_size = self.vision_model.config.image_size
        images = resize_shortest_side_and_center_crop(
            images, image_size, image_size, image_size, round_crop_offset=True
        )
        pixel_values = normalize(images, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD).to(self.dtype)
        image_tokens = self.vision_model(pixel_values=pixel_values).last_hidden_state
        text = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_TOKENS, return_tensors="pt"
        ).to(images.device)
        text_output = self.text_model(
            input_ids=text.input_ids,
            attention_mask=text.attention_mask,
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long, device=images.device),
        )
        rewards = self.mlp(text_output.last_hidden_state[:, 0].float()).squeeze(-1)
        return (rewards - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
