"""CLIP checkpoints in other layouts than Hugging Face's: open_clip's and OpenAI's original keys, and
bare .safetensors files without a config.json.

open_clip (https://github.com/mlfoundations/open_clip) and OpenAI's CLIP
(https://github.com/openai/CLIP) name the same tensors differently: `OPEN_CLIP_RULES` renames
them to clip.py's (Hugging Face's) keys, and three tensors change form (`from_open_clip`). A
file without a config.json records its sizes in its tensor shapes only: `config_from_shapes`
reads them off as OpenAI's build_model does. weights/networks.py's load_clip uses both.
"""

import math
from pathlib import Path

import regex
import torch

from clip import CLIPConfig, TextConfig, VisionConfig

# ---- the sizes of a bare file


# The attention head width of OpenAI's CLIPs and most others: a bare file's heads are
# width // 64 ...
HEAD_DIM = 64
# ... but open_clip's larger ViTs have wider heads, which only open_clip_config.json records
# (vision_cfg.head_width: 80 for ViT-H-14, 88 for ViT-g-14, 104 for ViT-bigG-14). Without it, a
# width that splits into heads of 64 and of one of these (1280 = 20 × 64 = 16 × 80) has no certain
# head count, and is refused.
WIDE_HEAD_DIMS = (80, 88, 104)

# The tensors whose shapes give a bare file's sizes, by their names in open_clip's layout (for the
# message when one is missing; OPEN_CLIP_RULES renames them to ours).
OPEN_CLIP_NAMES = {
    "text_model.encoder.layers.0.mlp.fc1.weight": "transformer.resblocks.0.mlp.c_fc.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.encoder.layers.0.mlp.fc1.weight": "visual.transformer.resblocks.0.mlp.c_fc.weight",
    "visual_projection.weight": "visual.proj",
}


def config_from_shapes(state: dict[str, torch.Tensor], file: Path, open_clip: bool = False,
                       heads: tuple[int, int] | None = None) -> CLIPConfig:
    """For a bare .safetensors file: read sizes off the tensors, as OpenAI's build_model does. Head
    counts are stored nowhere: `heads` (text heads, vision head width) come from
    open_clip_config.json; without them, the heads are width // 64 where no wider head
    (WIDE_HEAD_DIMS) also fits."""

    def shape(key: str) -> torch.Size:
        return _shape(state, key, file, open_clip)

    def head_count(tower: str, width: int) -> int:
        return _head_count(tower, width, file, open_clip, heads)

    tok = state["text_model.embeddings.token_embedding.weight"]
    text = TextConfig(
        vocab_size=tok.shape[0], hidden_size=tok.shape[1],
        intermediate_size=shape("text_model.encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=_layers(state, "text_model"),
        num_attention_heads=head_count("text", tok.shape[1]),
        max_position_embeddings=shape("text_model.embeddings.position_embedding.weight")[0],
    )
    if "vision_model.embeddings.patch_embedding.weight" not in state:
        return CLIPConfig(text=text, projection_dim=None)
    patch = state["vision_model.embeddings.patch_embedding.weight"]  # (width, 3, p, p)
    grid = math.isqrt(shape("vision_model.embeddings.position_embedding.weight")[0] - 1)
    vision = VisionConfig(
        hidden_size=patch.shape[0],
        intermediate_size=shape("vision_model.encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=_layers(state, "vision_model"),
        num_attention_heads=head_count("image", patch.shape[0]),
        image_size=grid * patch.shape[-1], patch_size=patch.shape[-1], num_channels=patch.shape[1],
    )
    return CLIPConfig(text=text, vision=vision, projection_dim=shape("visual_projection.weight")[0])


def _shape(state: dict[str, torch.Tensor], key: str, file: Path, open_clip: bool) -> torch.Size:
    if key not in state:
        raise ValueError(f"{file} has no tensor {OPEN_CLIP_NAMES[key] if open_clip else key}, "
                         f"from which the model's sizes are read; the file is incomplete — "
                         f"download it again")
    return state[key].shape


def _layers(state: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k.split(".")[3] for k in state if k.startswith(f"{prefix}.encoder.layers.")})


def _head_count(tower: str, width: int, file: Path, open_clip: bool,
                heads: tuple[int, int] | None) -> int:
    if heads is not None:  # as open_clip builds them
        return heads[0] if tower == "text" else width // heads[1]
    wide = [d for d in WIDE_HEAD_DIMS if width % d == 0]
    if width % HEAD_DIM == 0 and not wide:
        return width // HEAD_DIM
    config = "an open_clip_config.json" if open_clip else "a config.json"
    why = (f"splits into heads of {HEAD_DIM} or of {wide[0]}" if wide
           else f"is not a multiple of {HEAD_DIM}")
    fix = "put the open_clip_config.json it came with beside it" if open_clip else \
        "pass the checkpoint's folder with its config.json"
    raise ValueError(f"{file} comes without {config} and its {tower} width {width} {why}, so "
                     f"its attention head count cannot be derived; {fix}")


# ---- open_clip's and OpenAI's layout


# open_clip's layout does not record the activation: OpenAI's models use QuickGELU, LAION's mostly
# GELU (open_clip marks QuickGELU models by a "-quickgelu" model name, or quick_gelu in
# open_clip_config.json).
OPEN_CLIP_ACTIVATIONS = {"quick_gelu", "gelu"}
# open_clip's file names on the hub
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")

# open_clip / OpenAI original keys → ours, applied in order to each key. Besides these renames,
# three tensors change form (in from_open_clip): attn.in_proj_{weight,bias} holds q, k and v
# stacked (split by chunk(3)), and visual.proj and text_projection are (width, dim) matrices that
# multiply from the right (x @ proj), whereas nn.Linear stores weightᵀ.
OPEN_CLIP_RULES = [
    (r"^text\.", ""),  # open_clip's "custom text" models keep the text tower under text.
    (r"^visual\.transformer\.resblocks\.", "vision_model.encoder.layers."),
    (r"^transformer\.resblocks\.", "text_model.encoder.layers."),
    (r"\.ln_(\d)\.", r".layer_norm\1."),  # ln_1, ln_2
    (r"\.attn\.", ".self_attn."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."),
    (r"\.mlp\.c_proj\.", ".mlp.fc2."),
    (r"^visual\.conv1\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual\.class_embedding$", "vision_model.embeddings.class_embedding"),
    (r"^visual\.positional_embedding$", "vision_model.embeddings.position_embedding.weight"),
    (r"^visual\.ln_pre\.", "vision_model.pre_layrnorm."),  # sic
    (r"^visual\.ln_post\.", "vision_model.post_layernorm."),
    (r"^token_embedding\.", "text_model.embeddings.token_embedding."),
    (r"^positional_embedding$", "text_model.embeddings.position_embedding.weight"),
    (r"^ln_final\.", "text_model.final_layer_norm."),
    (r"^visual\.proj$", "visual_projection.weight"),  # transposed below
    (r"^text_projection$", "text_projection.weight"),  # transposed below
]
# OpenAI's pickles carry these ints.
OPENAI_EXTRAS = {"input_resolution", "context_length", "vocab_size"}


def is_open_clip(state: dict[str, torch.Tensor]) -> bool:
    return "token_embedding.weight" in state or "text.token_embedding.weight" in state


def from_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip / OpenAI state dict to our (Hugging Face) keys with OPEN_CLIP_RULES."""
    out = {}
    for key, value in state.items():
        if key in OPENAI_EXTRAS:
            continue
        for pattern, replacement in OPEN_CLIP_RULES:
            key = regex.sub(pattern, replacement, key)
        if key in ("visual_projection.weight", "text_projection.weight"):
            out[key] = value.t().contiguous()  # (width, dim) → (dim, width)
        elif ".self_attn.in_proj_" in key:
            # (3·width, width): q, k, v stacked, as nn.MultiheadAttention keeps them
            stem, kind = key.split(".self_attn.in_proj_")
            for name, part in zip("qkv", value.chunk(3)):
                out[f"{stem}.self_attn.{name}_proj.{kind}"] = part
        else:
            out[key] = value
    return out
