"""Rewards built on a transformers CLIPModel: CLIPScore, PickScore and the LAION aesthetic predictor."""

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

from .base import ModelReward, linear_mlp_head
from .loading import (
    TOKENIZER_FILES,
    RequiredFile,
    explain_missing_weights,
    hub_file,
    load_tensor_file,
    transformers_model_files,
)
from .preprocessing import normalize, resize_shortest_side_and_center_crop


class CLIPReward(ModelReward):
    """Base of the CLIP-family rewards: loads a CLIPModel with its processor and embeds images and prompts.

    Images get the processor's recipe (bicubic resize of the shorter side, centre crop, normalisation); prompts are
    truncated to the text model's 77 tokens, keeping the end-of-text token whose features CLIP pools. Both
    embeddings are L2-normalised.
    """

    model_class = CLIPModel

    def __init__(self, name, model_id, processor_id, device, dtype, batch_size):
        super().__init__(name=name, device=device, dtype=dtype, batch_size=batch_size)
        self.model_id = model_id
        self.processor_id = processor_id or model_id

    def required_files(self) -> list[RequiredFile]:
        processor_files = [*TOKENIZER_FILES, "preprocessor_config.json"]
        return transformers_model_files(self.model_id, "model_id") + [
            RequiredFile(self.processor_id, filename, "processor_id") for filename in processor_files
        ]

    def _load(self, device):
        with explain_missing_weights(self.model_id, "model_id"):
            self.model = self.model_class.from_pretrained(self.model_id, dtype=self.dtype).to(device).eval()
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
    """CLIPScore (Hessel et al. 2021) of each image: `weight * max(cos(image, prefix + prompt), 0)`.

    The defaults give torchmetrics' scale and model: weight 100, no prefix, CLIP ViT-L/14. Two differences from
    torchmetrics remain, both where a per-image reward has to: torchmetrics clamps the mean of a batch at 0 (here
    each image is clamped: the same mean whenever every cosine is positive), and cuts a prompt over 77 tokens after
    its 77th token, dropping the end-of-text token CLIP pools (here the end-of-text token is kept, as in OpenAI's
    `clip.tokenize(truncate=True)`). Hessel's original settings are
    `CLIPScoreReward(model_id="openai/clip-vit-base-patch32", weight=2.5, prefix="A photo depicts ")`.

    Scale: 0 to `weight`; with the defaults about 20-30 for images that match their prompt.

    Args:
        model_id: Hub id or local folder of a transformers CLIPModel.
        processor_id: Hub id or local folder of its tokenizer and image processor (defaults to `model_id`).
        weight: the factor `w` on the clamped cosine: 100 as torchmetrics, 2.5 as Hessel et al.
        prefix: text put before every prompt: "" as torchmetrics, "A photo depicts " as Hessel et al.
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
        weight: float = 100.0,
        prefix: str = "",
    ):
        super().__init__(name, model_id, processor_id, device, dtype, batch_size)
        self.weight = weight
        self.prefix = prefix

    def _score(self, images, prompts):
        cosine = self._cosine_similarity(images, [self.prefix + prompt for prompt in prompts])
        return self.weight * cosine.clamp(min=0)


class _CLIPModelWithFloat32Scale(CLIPModel):
    """A CLIPModel whose `logit_scale` loads in float32 whatever the model's dtype: bf16 holds log(100) = 4.605 as
    4.594, whose exponential is 99.0, a 1% error on every score that uses it."""

    _keep_in_fp32_modules_strict = ["logit_scale"]


class PickScoreReward(CLIPReward):
    """PickScore (Kirstain et al. 2023): `logit_scale.exp() * cos(image, prompt)`, as in its reference code.

    `logit_scale` stays in float32 whatever `dtype` is, as the reference (a float32 model) computes it.

    Scale: about 100 * cosine; typically 18-24 for generated images.

    Args:
        model_id: Hub id or local folder of the PickScore CLIPModel.
        processor_id: tokenizer and image processor; PickScore uses the one of the CLIP ViT-H-14 it was fine-tuned
            from.
        device, dtype, batch_size, name: as for `CLIPScoreReward`.
    """

    model_class = _CLIPModelWithFloat32Scale

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
        return self.model.logit_scale.exp() * self._cosine_similarity(images, prompts)


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

    def required_files(self) -> list[RequiredFile]:
        return super().required_files() + [RequiredFile(self.predictor_id, self.predictor_filename, "predictor_id")]

    def _load(self, device):
        super()._load(device)
        weights = load_tensor_file(hub_file(self.predictor_id, self.predictor_filename, "predictor_id"))
        self.mlp = linear_mlp_head(self.model.config.projection_dim)
        self.mlp.load_state_dict({name.removeprefix("layers."): tensor for name, tensor in weights.items()})
        self.mlp.to(device).eval()

    def _score(self, images, prompts):
        return self.mlp(self._image_embeddings(images)).squeeze(-1)
