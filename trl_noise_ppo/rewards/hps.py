"""HPSv2 and HPSv2.1: an open_clip ViT-H-14 checkpoint, converted to a transformers CLIPModel on load.

open_clip itself needs torchvision, whose PyPI wheels do not import beside the CPU build of torch, so the
checkpoint is renamed to transformers' CLIP names instead (the two implement the same network), and open_clip's
image and text preprocessing are reproduced here.
"""

import html
import re

import torch
from transformers import AutoTokenizer, CLIPConfig, CLIPModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .clip import CLIPReward
from .loading import (
    TOKENIZER_FILES,
    RequiredFile,
    build_model_from_weights,
    explain_missing_weights,
    hub_file,
    load_tensor_file,
    rename,
)
from .preprocessing import normalize, resize_longest_side_and_pad

# open_clip name -> transformers CLIPModel name, applied in order. `visual.` is the image tower; the text tower's
# names have no prefix.
_OPEN_CLIP_TO_TRANSFORMERS = [
    (r"^visual\.transformer\.resblocks\.", "vision_model.encoder.layers."),
    (r"^transformer\.resblocks\.", "text_model.encoder.layers."),
    (r"\.ln_1\.", ".layer_norm1."),
    (r"\.ln_2\.", ".layer_norm2."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."),
    (r"\.mlp\.c_proj\.", ".mlp.fc2."),
    (r"\.attn\.out_proj\.", ".self_attn.out_proj."),
    (r"^visual\.class_embedding$", "vision_model.embeddings.class_embedding"),
    (r"^visual\.positional_embedding$", "vision_model.embeddings.position_embedding.weight"),
    (r"^visual\.conv1\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual\.ln_pre\.", "vision_model.pre_layrnorm."),
    (r"^visual\.ln_post\.", "vision_model.post_layernorm."),
    (r"^token_embedding\.", "text_model.embeddings.token_embedding."),
    (r"^positional_embedding$", "text_model.embeddings.position_embedding.weight"),
    (r"^ln_final\.", "text_model.final_layer_norm."),
]
# open_clip applies its projections as `x @ proj` with (in, out) matrices; nn.Linear holds (out, in).
_PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}


def open_clip_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames an open_clip CLIP state dict to transformers' CLIPModel names.

    Besides renaming, it transposes the two projections and splits each attention layer's packed `in_proj`
    (nn.MultiheadAttention's q, k, v stacked in that order) into q_proj, k_proj and v_proj. Unknown names are kept
    as they are, so that loading reports them.
    """
    converted = {}
    for name, tensor in state_dict.items():
        if name in _PROJECTIONS:
            converted[_PROJECTIONS[name]] = tensor.T
            continue
        new_name = rename(name, _OPEN_CLIP_TO_TRANSFORMERS)
        layer, packed, kind = new_name.partition(".attn.in_proj_")
        if packed:  # kind is "weight" or "bias"
            for part, chunk in zip("qkv", tensor.chunk(3), strict=True):
                converted[f"{layer}.self_attn.{part}_proj.{kind}"] = chunk
        else:
            converted[new_name] = tensor
    return converted


def _import_ftfy():
    try:
        import ftfy
    except ImportError as error:
        raise ImportError(
            "HPSv2Reward cleans prompts as open_clip does, with ftfy, which is not installed: run `pip install ftfy` "
            "(or `pip install 'trl-noise-ppo[hps]'`)."
        ) from error
    return ftfy


def open_clip_clean(text: str) -> str:
    """open_clip's cleaning of a prompt before tokenising (its `basic_clean`, then `whitespace_clean`): ftfy's
    `fix_text` (mojibake, curly quotes, ligatures, full-width characters), HTML entities unescaped twice, every run
    of whitespace folded into one space, ends stripped. transformers' CLIP tokenizer only folds whitespace."""
    text = html.unescape(html.unescape(_import_ftfy().fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class HPSv2Reward(CLIPReward):
    """Human Preference Score v2 / v2.1 (Wu et al. 2023): cosine similarity of the image and prompt embeddings of
    a ViT-H-14 CLIP fine-tuned on human preferences, as the `hpsv2` package scores it.

    Preprocessing is HPS's own: the image quantised to uint8 and converted to a float tensor, its longer side
    resized (torchvision's bicubic on tensors, no rounding) to 224, zero padding to a square, then OpenAI CLIP
    normalisation. Prompts are cleaned as open_clip cleans them (needs `ftfy`) and truncated to 77 tokens.

    Scale: cosine, in [-1, 1]; typically 0.20-0.35 for generated images.

    The checkpoint (a dict with a "state_dict" of tensors) is loaded with `torch.load(weights_only=True)`.

    Args:
        model_id: Hub id or local folder holding the checkpoint.
        filename: "HPS_v2_compressed.pt" (HPSv2) or "HPS_v2.1_compressed.pt" (HPSv2.1); a `.safetensors` file of
            the same tensors also works.
        config_id: Hub id or local folder of a transformers CLIP config and tokenizer describing the same
            architecture: the LAION ViT-H-14 that HPS was fine-tuned from.
        antialias: whether the resize is antialiased. True, the default, is what `hpsv2` computes with a current
            torchvision (0.17 or later); False reproduces torchvision 0.16 and earlier, the setup of the published
            HPSv2 results. The preprocessed pixels differ by several uint8 levels on detailed 512-1024 px images.
        device, dtype, batch_size, name: as for `CLIPScoreReward`.
    """

    def __init__(
        self,
        model_id: str = "xswu/HPSv2",
        filename: str = "HPS_v2_compressed.pt",
        config_id: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        name: str = "hpsv2",
        antialias: bool = True,
    ):
        super().__init__(name, model_id, None, device, dtype, batch_size)
        self.filename = filename
        self.config_id = config_id
        self.antialias = antialias

    def required_packages(self):
        return {"ftfy": "pip install ftfy, or pip install 'trl-noise-ppo[hps]'"}

    def required_files(self):
        return [
            RequiredFile(self.model_id, self.filename, "model_id"),
            RequiredFile(self.config_id, "config.json", "config_id"),
            *(RequiredFile(self.config_id, filename, "config_id") for filename in TOKENIZER_FILES),
        ]

    def _load(self, device):
        with explain_missing_weights(self.config_id, "config_id"):
            config = CLIPConfig.from_pretrained(self.config_id)
            self.tokenizer = AutoTokenizer.from_pretrained(self.config_id)
        checkpoint = load_tensor_file(hub_file(self.model_id, self.filename, "model_id"))
        # HPS saves {"state_dict": ...}; a converted .safetensors file holds the state dict itself.
        state_dict = open_clip_to_transformers(checkpoint.get("state_dict", checkpoint))
        self.model = build_model_from_weights(CLIPModel, config, state_dict, self.dtype).to(device)

    def _pixel_values(self, images):
        images = resize_longest_side_and_pad(images, self.model.config.vision_config.image_size, self.antialias)
        return normalize(images, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD).to(self.dtype)

    def _score(self, images, prompts):
        return self._cosine_similarity(images, [open_clip_clean(prompt) for prompt in prompts])
