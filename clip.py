"""CLIP from scratch: ViT image tower, causal text transformer, BPE tokenizer, preprocessing.

CLIP (Radford et al. 2021, https://arxiv.org/abs/2103.00020) embeds images and captions in one
space; a caption matches an image when their cosine similarity is high. This file follows
OpenAI's model (https://github.com/openai/CLIP). Module names are the keys of the official
Hugging Face checkpoints: openai/clip-vit-{base-patch32, base-patch16, large-patch14,
large-patch14-336} and Stable Diffusion 1.x's text encoder (text_encoder/, a text tower only,
whose last hidden state conditions the UNet), so their state dicts load with strict=True.
Reading and writing those files (config.json + model.safetensors, open_clip's and OpenAI's
layouts, the tokenizer's vocab.json + merges.txt, hub ids in the local Hugging Face cache) is
weights/networks.py's; reading image files is weights/images.py's.

    model = load_clip("weights/clip-vit-base-patch32")  # from weights.networks
    tokenizer = load_tokenizer("weights/clip-vit-base-patch32")
    logits = model(image_transform(224)(pil_image)[None], tokenizer(["a photo of a cat"]))
"""

import html
import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import ftfy
import regex
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms

CONTEXT_LENGTH = 77  # text positions of every released CLIP
# The per-channel pixel statistics of CLIP's training set.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# Older Hugging Face configs carry eos_token_id=2: pool at argmax(ids) instead.
LEGACY_EOS_TOKEN_ID = 2


# ----------------------------------------------------------------------------- configuration


@dataclass
class TextConfig:  # defaults: the text tower of ViT-B/32
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = CONTEXT_LENGTH
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407


@dataclass
class VisionConfig:  # defaults: ViT-B/32
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass
class CLIPConfig:
    text: TextConfig
    vision: VisionConfig | None = None  # None: a text tower only (Stable Diffusion's text encoder)
    projection_dim: int | None = 512
    logit_scale_init_value: float = 2.6592  # log(1 / 0.07)

    def to_hf(self) -> dict:
        """The config.json that transformers' CLIPModel / CLIPTextModel reads."""
        text = {**asdict(self.text), "model_type": "clip_text_model", "bos_token_id": 49406,
                "pad_token_id": 1}
        if self.vision is None:
            return {**text, "architectures": ["CLIPTextModel"]}
        return {
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "text_config": {**text, "projection_dim": self.projection_dim},
            "vision_config": {**asdict(self.vision), "model_type": "clip_vision_model",
                              "projection_dim": self.projection_dim},
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
        }


# ----------------------------------------------------------------------------- model


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)  # OpenAI's sigmoid approximation of GELU


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, heads, T, head_dim)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {act!r} is not supported; expected one of "
                             f"{sorted(ACTIVATIONS)}")
        self.act = ACTIVATIONS[act]
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: TextConfig | VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: TextConfig | VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, causal)
        return x


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids → (B, T, width) last hidden state: Stable Diffusion's conditioning."""
        # Causal: CLIP was trained as a left-to-right model, so each token sees only those before
        # it. The end-of-text token, which pools the caption, has seen the whole caption, and
        # whatever padding follows it cannot change it.
        return self.final_layer_norm(self.encoder(self.embeddings(ids), causal=True))


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size,
                                         cfg.patch_size, bias=False)
        num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1  # patches + the class token
        self.position_embedding = nn.Embedding(num_positions, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, num_patches, width)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        # sic: the checkpoint's spelling
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels → (B, width): the class token after post_layernorm."""
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)), causal=False)
        return self.post_layernorm(x[:, 0])


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.text_model = TextTransformer(config.text)
        self.vision_model = None
        if config.vision is not None:
            self.vision_model = VisionTransformer(config.vision)
            self.visual_projection = nn.Linear(config.vision.hidden_size, config.projection_dim,
                                               bias=False)
            self.text_projection = nn.Linear(config.text.hidden_size, config.projection_dim,
                                             bias=False)
            # log of the temperature
            self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))

    def _require_vision(self) -> None:
        if self.vision_model is None:
            raise ValueError("this checkpoint holds a text tower only (e.g. Stable Diffusion's "
                             "text_encoder/): it has no image tower or projections; use "
                             "model.text_model(ids) for its hidden states")

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, projection_dim), projected, not normalised."""
        self._require_vision()
        return self.visual_projection(self.vision_model(pixels))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids → (B, projection_dim), projected, not normalised."""
        self._require_vision()
        # The caption is summarised by the end-of-text token. OpenAI finds it as the largest id
        # (EOT is the last in the vocabulary); transformers keeps that for configs with the old
        # eos_token_id=2 and otherwise takes the first position holding eos_token_id.
        if self.config.text.eos_token_id == LEGACY_EOS_TOKEN_ID:
            eot = ids.argmax(dim=-1)
        else:
            eot = (ids == self.config.text.eos_token_id).int().argmax(dim=-1)
        # The mask is causal, so positions after the last end-of-text token cannot change any
        # output that is pooled: run the tower on the columns up to it only (a short caption
        # padded to 77 tokens costs a fraction of the full length).
        hidden = self.text_model(ids[:, : int(eot.max()) + 1])  # (B, T', width)
        return self.text_projection(hidden[torch.arange(ids.shape[0], device=ids.device), eot])

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """logits_per_image (B_img, B_txt) = cosine similarity × exp(logit_scale)."""
        image = F.normalize(self.encode_image(pixels), dim=-1)
        text = F.normalize(self.encode_text(ids), dim=-1)
        return self.logit_scale.exp() * image @ text.t()


# ----------------------------------------------------------------------------- tokenizer


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE works on bytes; each byte gets a printable unicode stand-in so that merges
    can be written as text. Printable bytes stand for themselves and come first (the order
    defines the first 256 token ids); the others are shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


def clean_text(text: str) -> str:
    """OpenAI's cleaning: fix mojibake, unescape html (twice: some captions are double-escaped),
    collapse whitespace, lowercase."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def merge_pair(parts, pair: tuple[str, str]) -> list[str]:
    """The symbols of a word with every occurrence of `pair`, left to right, joined into one."""
    merged, i = [], 0
    while i < len(parts):
        if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
            merged.append(parts[i] + parts[i + 1])
            i += 2
        else:
            merged.append(parts[i])
            i += 1
    return merged


class Tokenizer:
    """CLIP's byte-level BPE tokenizer (OpenAI's simple_tokenizer): 49,408 tokens, words end in </w>."""

    # Cleaned text is cut into words before BPE, and merges never cross a word boundary.
    # Alternatives are tried left to right, so the earlier clauses win:
    PATTERN = regex.compile(
        r"<\|startoftext\|>|<\|endoftext\|>"  # the special tokens, whole, should a caption spell them out
        r"|'s|'t|'re|'ve|'m|'ll|'d"  # English contractions as words of their own: "it's" → "it", "'s"
        r"|[\p{L}]+"  # a run of letters of any script: "café", "東京タワーと富士山"
        r"|[\p{N}]"  # ONE digit: "2023" is four words, so numbers do not take up rare merged tokens
        r"|[^\s\p{L}\p{N}]+",  # a run of anything else but whitespace: "!!!", "&", "😀😀"
        regex.IGNORECASE,  # as OpenAI's; it only matters for the contractions, and the text is lowercase already
    )
    # Whitespace matches no clause: it only separates words and leaves no token (the </w> that ends
    # each word's last symbol stands for it).

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]],
                 pad_id: int | None = None):
        self.encoder = encoder
        self.decoder = {i: t for t, i in encoder.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.sot_id, self.eot_id = encoder[SOT], encoder[EOT]
        # The padding the tokenizer's files name, which a text encoder conditioning a UNet was
        # trained with: EOT for SD 1.x, "!" (id 0) for SD 2.x. EOT when the files name none.
        self.pad_id = self.eot_id if pad_id is None else pad_id
        self.cache = {SOT: SOT, EOT: EOT}

    def bpe(self, word: str) -> list[str]:
        """Merge the characters of one word, lowest-ranked pair first, until no known pair is
        left."""
        if word in self.cache:
            return self.cache[word].split(" ")
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = zip(parts, parts[1:])
            best = min(pairs, key=lambda p: self.ranks.get(p, math.inf))
            if best not in self.ranks:
                break
            parts = merge_pair(parts, best)
        self.cache[word] = " ".join(parts)
        return parts

    def encode(self, text: str) -> list[int]:
        """Text → BPE ids, without start/end tokens."""
        ids = []
        for word in self.PATTERN.findall(clean_text(text)):
            word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self.bpe(word))
        return ids

    def __call__(self, texts: str | list[str], pad_token_id: int = 0,
                 context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
        """Texts → (B, context_length) ids: [SOT, tokens…, EOT, pad…]. Too long a text is cut and
        its last position set to EOT, so that pooling still finds the end of the text. Padding: 0
        as OpenAI and open_clip do; Stable Diffusion's tokenizers pad with what their files name
        (EOT for SD 1.x, "!" for SD 2.x: pass pad_token_id=tokenizer.pad_id), and each UNet has only
        seen conditioning padded its way."""
        texts = [texts] if isinstance(texts, str) else texts
        out = torch.full((len(texts), context_length), pad_token_id, dtype=torch.long)
        for row, text in zip(out, texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id][:context_length]
            ids[-1] = self.eot_id
            row[: len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Ids → text; stops at the first EOT and drops SOT, so a row of __call__ decodes to its
        text."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        text = "".join(self.decoder[i] for i in ids if i != self.sot_id)
        text = bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")
        return text.replace("</w>", " ").strip()


# ----------------------------------------------------------------------------- preprocessing


# A named function at the top level, not a lambda: DataLoader workers that are spawned rather than
# forked (the default on macOS and Windows, and forkserver from Python 3.14 on Linux) receive the
# dataset and its transform pickled, and pickle refers to a function by its importable name.
def to_rgb(image):
    return image.convert("RGB")


def image_transform(image_size: int) -> transforms.Compose:
    """PIL image (any mode) → normalised (3, S, S) tensor: RGB, bicubic resize of the shorter side
    to S, centre crop S × S. Converting to RGB first lets palette and CMYK images be resampled
    in RGB (PIL would resize a palette image with nearest-neighbour)."""
    return transforms.Compose([
        to_rgb,
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(OPENAI_MEAN, OPENAI_STD),
    ])


# ----------------------------------------------------------------------------- demo

if __name__ == "__main__":
    import argparse

    from weights.images import open_image
    from weights.networks import DOWNLOAD_HINT, hub_path, load_clip, load_tokenizer

    parser = argparse.ArgumentParser(
        description="Zero-shot: how well does each caption match the image?")
    parser.add_argument("path", nargs="?", default="weights/clip-vit-base-patch32",
                        help="CLIP checkpoint folder, or a hub id in the local Hugging Face cache")
    parser.add_argument("captions", nargs="*", default=["a photo of a cat", "a photo of a dog"],
                        help="candidate captions")
    parser.add_argument("--image", required=True, help="image file")
    args = parser.parse_args()
    try:
        path = hub_path(args.path)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    if not path.exists():
        raise SystemExit(f"{path} not found — {DOWNLOAD_HINT}")
    model, tokenizer = load_clip(path), load_tokenizer(path)
    size = model.config.vision.image_size
    pixels = image_transform(size)(open_image(args.image, size=size))[None]
    with torch.no_grad():
        probs = model(pixels, tokenizer(args.captions)).softmax(dim=-1)[0]
    for caption, p in zip(args.captions, probs.tolist()):
        print(f"{p:6.1%}  {caption}")

