"""Rewards built on a transformers CLIPModel: CLIPScore, PickScore and the LAION aesthetic predictor."""

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

from .base import ModelReward, linear_mlp_head
from .loading import explain_missing_weights, hub_file, load_tensor_file
from .preprocessing import normalize, resize_shortest_side_and_center_crop


class CLIPReward(ModelReward):
    """Base of the CLIP-family rewards: loads a CLIPModel with its processor and embeds images and prompts.

    Images get the processor's recipe (bicubic resize of the shorter side, centre crop, normalisation); prompts are
    truncated to the text model's 77 tokens. Both embeddings are L2-normalised.
    """

    def __init__(self, name, model_id, processor_id, device, dtype, batch_size):
        super().__init__(name=name, device=device, dtype=dtype, batch_size=batch_size)
        self.model_id = model_id
        self.processor_id = processor_id or model_id

    def _load(self, device):
        with explain_missing_weights(self.model_id, "model_id"):
            self.model = CLIPModel.from_pretrained(self.model_id, dtype=self.dtype).to(device).eval()
        with explain_missing_weights(self.processor_id, "processor_id"):
            self.tokenizer = AutoTokenizer.from_pretrained(self.processor_id)
            # Only the recipe's numbers are used; the pixels are computed on tensors, see `_pixel_values`.
            image_processor = CLIPImageProcessorPil.from_pretrained(self.processor_id)
        self.shortest_side = image_processor.size.shortest_edge
        self.crop_size = (image_processor.crop_size.height, image_processor.crop_size.width)
        self.image_mean, self.image_std = tuple(image_processor.image_mean), tuple(image_processor.image_std)

    def _pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        images = resize_shortest_side_and_center_crop(images, self.shortest_side, *self.crop_size)
        return normalize(images, self.image_mean, self.image_std).to(self.dtype)

    def _image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        vision_output = self.model.vision_model(pixel_values=self._pixel_values(images))
        return F.normalize(self.model.visual_projection(vision_output.pooler_output).float(), dim=-1)

    def _text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            prompts,
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        ).to(self.model.device)
        text_output = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        return F.normalize(self.model.text_projection(text_output.pooler_output).float(), dim=-1)

    def _cosine_similarity(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (self._image_embeddings(images) * self._text_embeddings(prompts)).sum(dim=-1)


class CLIPScoreReward(CLIPReward):
    """CLIPScore (Hessel et al. 2021, as in torchmetrics): `max(100 * cos(image, prompt), 0)`.

    Scale: 0 to 100; about 20-30 for images that match their prompt, with the default ViT-L/14.

    Args:
        model_id: Hub id or local folder of a transformers CLIPModel.
        processor_id: Hub id or local folder of its tokenizer and image processor (defaults to `model_id`).
        device: where the model runs; None lets the trainer (or the images) decide.
        dtype: the model's dtype.
        batch_size: images scored per forward pass.
        name: the logging name, `rewards/<name>/mean`.
    """

    def __init__(
        self,
        model_id: str = "openai/clip-vit-large-patch14",
        processor_id: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        name: str = "clipscore",
    ):
        super().__init__(name, model_id, processor_id, device, dtype, batch_size)

    def _score(self, images, prompts):
        return (100 * self._cosine_similarity(images, prompts)).clamp(min=0)


class PickScoreReward(CLIPReward):
    """PickScore (Kirstain et al. 2023): `logit_scale.exp() * cos(image, prompt)`, as in its reference code.

    Scale: about 100 * cosine; typically 18-24 for generated images.

    Args:
        model_id: Hub id or local folder of the PickScore CLIPModel.
        processor_id: tokenizer and image processor; PickScore uses the one of the CLIP ViT-H-14 it was fine-tuned
            from.
        device, dtype, batch_size, name: as for `CLIPScoreReward`.
    """

    def __init__(
        self,
        model_id: str = "yuvalkirstain/PickScore_v1",
        processor_id: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        name: str = "pickscore",
    ):
        super().__init__(name, model_id, processor_id, device, dtype, batch_size)

    def _score(self, images, prompts):
        return self.model.logit_scale.exp().float() * self._cosine_similarity(images, prompts)


class AestheticReward(CLIPReward):
    """LAION aesthetic predictor v2, as DDPO uses it: a linear MLP on the L2-normalised CLIP ViT-L/14 image
    embedding. The prompt is not used.

    Scale: about 1 to 10 (a mean human rating), unbounded; roughly 5-6 for Stable Diffusion 1.x images.

    Args:
        model_id: Hub id or local folder of the CLIPModel that embeds the images.
        predictor_id: Hub id or local folder holding the MLP's weights.
        predictor_filename: the MLP's file there: plain tensors (`.pth`, loaded with `weights_only=True`) or
            `.safetensors`.
        processor_id, device, dtype, batch_size, name: as for `CLIPScoreReward`.
    """

    def __init__(
        self,
        model_id: str = "openai/clip-vit-large-patch14",
        predictor_id: str = "trl-lib/ddpo-aesthetic-predictor",
        predictor_filename: str = "aesthetic-model.pth",
        processor_id: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        name: str = "aesthetic",
    ):
        super().__init__(name, model_id, processor_id, device, dtype, batch_size)
        self.predictor_id = predictor_id
        self.predictor_filename = predictor_filename

    def _load(self, device):
        super()._load(device)
        weights = load_tensor_file(hub_file(self.predictor_id, self.predictor_filename, "predictor_id"))
        self.mlp = linear_mlp_head(self.model.config.projection_dim)
        self.mlp.load_state_dict({name.removeprefix("layers."): tensor for name, tensor in weights.items()})
        self.mlp.to(device).eval()

    def _score(self, images, prompts):
        return self.mlp(self._image_embeddings(images)).squeeze(-1)
