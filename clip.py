"""CLIP from scratch: ViT image tower, causal text transformer, BPE tokenizer, preprocessing.

CLIP (Radford et al. 2021, https://arxiv.org/abs/2103.00020) embeds images and captions in one
space; a caption matches an image when their cosine similarity is high. This file follows
OpenAI's model (https://github.com/openai/CLIP) and loads the official Hugging Face
checkpoints as they are: openai/clip-vit-{base-patch32, base-patch16, large-patch14,
large-patch14-336} (config.json + model.safetensors) and Stable Diffusion 1.x's text encoder
(text_encoder/, a text tower only, whose last hidden state conditions the UNet). Module
names are the checkpoint's keys, so the state dict loads with strict=True. It also reads CLIPs in
open_clip's (and OpenAI's original) key layout from a .safetensors file, such as the LAION
models' open_clip_model.safetensors, renamed on load by a short rule table (OPEN_CLIP_RULES).
A model path may also be a hub id (openai/clip-vit-base-patch32) already in the local Hugging
Face cache (`hub_path`).

    model = load_clip("weights/clip-vit-base-patch32")
    tokenizer = Tokenizer.from_pretrained("weights/clip-vit-base-patch32")
    logits = model(image_transform(224)(pil_image)[None], tokenizer(["a photo of a cat"]))
"""

import gzip
import html
import json
import math
import os
import types
import typing
import warnings
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

import ftfy
import regex
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torchvision import transforms

CONTEXT_LENGTH = 77  # text positions of every released CLIP
# The per-channel pixel statistics of CLIP's training set.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# Older Hugging Face configs carry eos_token_id=2: pool at argmax(ids) instead.
LEGACY_EOS_TOKEN_ID = 2
DOWNLOAD_HINT = "run `python weights/download.py` (see weights/README.md)"


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

    @classmethod
    def from_hf(cls, config: dict) -> "CLIPConfig":
        """Read a Hugging Face config.json: a CLIPModel's, or a CLIPTextModel's (flat). A value of
        the wrong type raises a ValueError that names its key."""
        if not isinstance(config, dict):
            raise ValueError(f"it holds a JSON {type(config).__name__}, not an object")
        if config.get("model_type") == "clip_text_model":
            return cls(text=_from_dict(TextConfig, config), projection_dim=None)
        top = {"projection_dim": config.get("projection_dim", 512),
               "logit_scale_init_value": config.get("logit_scale_init_value", 2.6592)}
        _check_types(cls, top)
        return cls(
            text=_from_dict(TextConfig, config.get("text_config"), config.get("text_config_dict"),
                            "text_config"),
            vision=_from_dict(VisionConfig, config.get("vision_config"),
                              config.get("vision_config_dict"), "vision_config"),
            **top,
        )

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

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        """A folder with vocab.json + merges.txt (Hugging Face), or OpenAI's
        bpe_simple_vocab_16e6.txt.gz."""
        path = Path(path)
        if (path.is_dir() and not (path / "vocab.json").exists()
                and (path / "bpe_simple_vocab_16e6.txt.gz").exists()):
            path = path / "bpe_simple_vocab_16e6.txt.gz"
        if path.suffix == ".gz":
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found")
            return cls.from_openai_bpe(path)
        for name in ("vocab.json", "merges.txt"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} not found: a CLIP tokenizer needs "
                                        f"vocab.json and merges.txt — {DOWNLOAD_HINT}")
        encoder = cls._vocab(path / "vocab.json")
        lines = (path / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        return cls(encoder, merges, cls._pad_id(path, encoder))

    @staticmethod
    def _vocab(file: Path) -> dict[str, int]:
        """vocab.json: {token: id} with ids from 0 to its size − 1 and both special tokens, or one
        ValueError."""
        try:
            vocab = json.loads(file.read_text(encoding="utf-8"))
        except ValueError as err:  # JSON and UTF-8 errors
            raise ValueError(f"{file} is not valid JSON ({err}); download the tokenizer "
                             f"again") from None
        if not isinstance(vocab, dict):
            problem = f"holds a JSON {type(vocab).__name__}, not an object of token → id"
        elif bad := [t for t, i in vocab.items() if not _matches(i, int) or not 0 <= i < len(vocab)]:
            problem = (f"gives {bad[0]!r} the id {vocab[bad[0]]!r}, not an integer from 0 to "
                       f"{len(vocab) - 1}")
        elif missing := [t for t in (SOT, EOT) if t not in vocab]:
            problem = f"has no {missing[0]} token"
        else:
            return vocab
        raise ValueError(f"{file} {problem}; fix it or download the tokenizer again")

    @staticmethod
    def _pad_id(folder: Path, encoder: dict[str, int]) -> int | None:
        """The id of `pad_token` in tokenizer_config.json, overridden by special_tokens_map.json as
        transformers does; a string or an AddedToken-style {"content": "!"}. None when neither file
        names one."""
        pad = None
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            file = folder / name
            if file.is_file():
                try:
                    value = json.loads(file.read_text(encoding="utf-8")).get("pad_token", pad)
                except (ValueError, AttributeError):  # not JSON, or not a JSON object
                    raise ValueError(f"{file} is not a JSON object; fix it or download it "
                                     f"again") from None
                pad = value.get("content") if isinstance(value, dict) else value
                if pad is not None and not isinstance(pad, str):
                    raise ValueError(f"{file} gives pad_token as {pad!r}, not a string; fix it or "
                                     f"download the tokenizer again")
                if pad is not None and pad not in encoder:
                    raise ValueError(f"{file} names pad_token {pad!r}, which is not in "
                                     f"{folder / 'vocab.json'}; fix it or download the tokenizer "
                                     f"again")
        return None if pad is None else encoder[pad]

    @classmethod
    def from_openai_bpe(cls, path: str | Path) -> "Tokenizer":
        """OpenAI's file lists merges only; the vocabulary is 256 bytes, the same with </w>, one
        token per merge (48,894 of them) and the two special tokens, in that order."""
        lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 48894 + 1]]
        vocab = list(bytes_to_unicode().values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + [SOT, EOT]
        return cls({t: i for i, t in enumerate(vocab)}, merges)

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


# Images that would decode to more pixels than this are refused as unreadable: 40 megapixels take
# 120 MB as RGB, while a "decompression bomb" (a small file claiming 12000 × 12000 pixels or more)
# would take gigabytes in every DataLoader worker. COCO's images are at most 640 × 640, Winoground's
# 1920 × 1280.
MAX_IMAGE_PIXELS = 40_000_000
# A large image is decoded at 1/2, 1/4 or 1/8 of its size (JPEG's DCT scaling; a box filter for
# other formats) as long as its shorter side stays at least this many times the side it is then
# resized to. The bicubic resize still averages ≥ 4 decoded pixels per output pixel, and the
# preprocessed image moves by at most 3 of 255 levels (0.4 on average; tests/test_clip.py checks
# it). COCO's and Winoground's images are too small for it ever to apply at CLIP's 224 or SD's 512.
REDUCED_DECODE_MARGIN = 4
# Thinner images are refused: the resize brings the shorter side to S, and the longer one to
# ratio × S (a 20000 × 1 PNG of 143 bytes would become 4.5 million × 224 pixels, 3 GB). Even
# panoramas are rarely beyond 10:1.
MAX_ASPECT_RATIO = 20


def open_image(source, name: str | Path | None = None, size: int | None = None) -> Image.Image:
    """Open and decode an image (a path or a file object), or raise one ValueError naming it: not an
    image, corrupt or truncated, more than MAX_IMAGE_PIXELS to decode or thinner than
    1:MAX_ASPECT_RATIO (both checked before decoding), or of more than 8 bits with values it cannot
    map (see to_8_bits). With `size`, the side the preprocessing resizes the shorter side to, a
    large image is decoded reduced (see REDUCED_DECODE_MARGIN): a large JPEG is then never decoded
    at full size at all. A missing file raises FileNotFoundError."""
    name = name if name is not None else source
    try:
        with warnings.catch_warnings():
            # PIL warns from 89 megapixels on: the check below is stricter, and counts what is
            # decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
        full_width = image.width
        factor = 1  # the largest of 1, 2, 4, 8 that leaves the shorter side ≥ the margin × size
        while (size and factor < 8
               and min(image.size) // (2 * factor) >= REDUCED_DECODE_MARGIN * size):
            factor *= 2
        if factor > 1 and image.format == "JPEG":
            image.draft(None, (image.width // factor, image.height // factor))  # scaled in the DCT
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(f"{image.width} × {image.height} pixels to decode")
        if max(image.size) > MAX_ASPECT_RATIO * min(image.size):
            raise ValueError(f"{image.width} × {image.height} pixels, one side more than "
                             f"{MAX_ASPECT_RATIO} times the other: crop it")
        image.load()
        image = to_8_bits(image)
        factor //= round(full_width / image.width)  # what draft did not do
        # RGB first, as image_transform does before it resamples (a palette cannot be averaged)
        if factor > 1:
            image = to_rgb(image).reduce(factor)
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError as err:  # ours, or PIL's own above 179 megapixels
        raise ValueError(f"{name} is too large to decode safely ({err}; the limit is "
                         f"{MAX_IMAGE_PIXELS:,}), so it is treated as unreadable") from None
    except UnidentifiedImageError:
        raise ValueError(f"{name} is not a readable image (unknown format or corrupt "
                         f"file)") from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for truncated or damaged files
        raise ValueError(f"{name} is not a readable image ({err})") from None
    return image


def to_8_bits(image: Image.Image) -> Image.Image:
    """16- and 32-bit integer images (modes I;16*, I) → L as 16-bit values (÷ 257: 16-bit PNGs and
    TIFFs), float ones (F) as values from 0 to 1 (× 255); other values raise a ValueError. PIL's
    own conversion would clip them to 0–255: all white, or all black."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    top = 1.0 if image.mode == "F" else 65535
    low, high = image.getextrema()
    if not 0 <= low <= high <= top:  # also refuses NaN
        raise ValueError(f"mode {image.mode} with values from {low} to {high}, beyond the 0 to "
                         f"{top} that can be mapped to 8 bits: save it as an 8-bit image")
    # + 0.5: convert truncates.
    return image.convert("F").point(lambda v: v * 255 / top + 0.5).convert("L")


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


# ----------------------------------------------------------------------------- loading and saving
#
# load_clip reads a Hugging Face checkpoint (config.json + model.safetensors) as it is, and a
# CLIP in open_clip's or OpenAI's original key layout once its keys are renamed (OPEN_CLIP_RULES).
# Either way the file is checked loudly before it loads: key sets, shapes, then NaN or infinite
# values. Below, in order: load_clip and save_clip, the steps of load_clip, the checks of a
# config.json, the sizes of a bare file, the open_clip layout, and hub_path (a hub id in the
# local Hugging Face cache).


def load_clip(path: str | Path, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, activation: str | None = None) -> CLIP:
    """Load a CLIP (or a CLIP text encoder) from a Hugging Face checkpoint folder or a .safetensors
    file, in Hugging Face's layout or in open_clip's / OpenAI's original one (a folder holding only
    open_clip_model.safetensors, as the LAION repositories do, or the file itself).

    activation: for the open_clip layout only, which does not record it: "quick_gelu" for OpenAI's
    models (open_clip's "-quickgelu" names), "gelu" for most LAION ones (see the model card).
    Without it, the folder's open_clip_config.json decides (model_cfg.quick_gelu), and without that
    the load is refused. Sizes come from the tensor shapes, heads from open_clip_config.json
    (without it: width // 64, as openai/CLIP's build_model, where no wider head also fits).
    Pickled .bin/.pt files are refused: convert them to safetensors first (the error says how)."""
    file, config_file = _find_weights(Path(path))
    state, open_clip_layout = _read_state(file, activation)
    if open_clip_layout:
        config = _open_clip_layout_config(state, file, activation)
        config_file = None  # a config.json beside it describes model.safetensors, not this file
    elif config_file is not None and config_file.is_file():
        config = _read_config_json(config_file)
    else:
        config = _config_from_shapes(state, file)
    model = _build_and_load(config, state, file, config_file)
    model = model.to(device=device, dtype=dtype).eval()
    _check_finite(model, state, file, dtype)
    return model


def save_clip(model: CLIP, folder: str | Path) -> None:
    """Write model.safetensors + config.json in Hugging Face layout (loads in transformers and
    here)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2) + "\n")


# ---- the steps of load_clip


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
CONVERT_HINT = ("convert it once where open_clip is installed: "
                "`model = open_clip.create_model(ARCH, pretrained=FILE)`, then "
                "`safetensors.torch.save_file(model.state_dict(), 'open_clip_model.safetensors')`, "
                "and load that file (see weights/README.md)")


def _find_weights(path: Path) -> tuple[Path, Path | None]:
    """The safetensors file to read and the config.json that may describe it (None for a file)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found — {DOWNLOAD_HINT}")
    if path.is_dir():
        file, config_file = path / "model.safetensors", path / "config.json"
    else:
        file, config_file = path, None
    if path.is_dir() and not file.is_file() and (path / "model.fp16.safetensors").is_file():
        file = path / "model.fp16.safetensors"  # the half-precision variant (`download.py --fp16`)
    if path.is_dir() and not file.is_file():  # open_clip's file, as the LAION repositories hold it
        file = next((path / name for name in OPEN_CLIP_WEIGHTS if (path / name).is_file()), file)
    if file.suffix in PICKLE_SUFFIXES:
        raise ValueError(f"{file} is a pickled PyTorch file, which this loader never opens "
                         f"(unpickling runs whatever code the file carries); {CONVERT_HINT}")
    if not file.is_file():
        pickles = (path / "pytorch_model.bin", path / "open_clip_pytorch_model.bin")
        pickled = [p.name for p in pickles if p.exists()]
        extra = (f" (this loader reads safetensors only, never pickled files such as {pickled[0]})"
                 if pickled else "")
        raise FileNotFoundError(f"{file} not found{extra} — {DOWNLOAD_HINT}")
    return file, config_file


def _read_state(file: Path, activation: str | None) -> tuple[dict[str, torch.Tensor], bool]:
    """The file's tensors under our (Hugging Face's) names, and whether they came in open_clip's
    layout."""
    try:
        state = load_file(file)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file} is not a readable safetensors file ({err}); it may be truncated "
                         f"or corrupt — download it again") from None
    # Dropped on purpose: older files store the position_ids buffers; they are always arange(n).
    state = {k: v for k, v in state.items() if not k.endswith("embeddings.position_ids")}
    # transformers 5 saves a bare text encoder without the `text_model.` prefix of the hub's files.
    if "embeddings.token_embedding.weight" in state:
        state = {f"text_model.{k}": v for k, v in state.items()}
    open_clip_layout = _is_open_clip(state)
    if open_clip_layout:
        state = _from_open_clip(state)
    elif activation is not None:
        raise ValueError(f"{file} is in Hugging Face's layout, whose config names its own "
                         f"activation; activation= is for files in open_clip's layout only — leave "
                         f"it out")
    if "text_model.embeddings.token_embedding.weight" not in state:
        raise ValueError(f"{file} is not a CLIP checkpoint: it has no "
                         f"text_model.embeddings.token_embedding.weight (its first keys: "
                         f"{_first(sorted(state), 5)})")
    return state, open_clip_layout


def _open_clip_layout_config(state: dict[str, torch.Tensor], file: Path,
                             activation: str | None) -> CLIPConfig:
    """The config of a file in open_clip's layout: sizes from its shapes, heads and activation from
    the open_clip_config.json beside it, or `activation` (which wins)."""
    config_activation, heads = _open_clip_config(file.parent)
    activation = activation or config_activation
    if activation not in OPEN_CLIP_ACTIVATIONS:
        given = (f"activation={activation!r} is not supported" if activation
                 else "no activation was given")
        raise ValueError(f"{file} is in open_clip's layout, which does not record its activation, "
                         f"and {given}: pass activation='quick_gelu' (OpenAI's models) or 'gelu' "
                         f"(most LAION ones; the model card says which) to load_clip, or keep the "
                         f"file beside the open_clip_config.json it came with")
    config = _config_from_shapes(state, file, open_clip=True, heads=heads)
    if heads is not None:
        _check_heads(config, file.parent / "open_clip_config.json")
    config.text.hidden_act = activation
    if config.vision is not None:
        config.vision.hidden_act = activation
    # open_clip pools the caption at argmax(ids) (its EOT, 49407, is the largest id); our pooling
    # (and transformers', for a config saved by save_clip) does exactly that for this legacy id.
    config.text.eos_token_id = LEGACY_EOS_TOKEN_ID
    return config


def _read_config_json(config_file: Path) -> CLIPConfig:
    """The CLIPConfig a Hugging Face config.json describes, its head counts checked."""
    try:
        config = CLIPConfig.from_hf(json.loads(config_file.read_text(encoding="utf-8")))
    except ValueError as err:  # JSON and UTF-8 errors are ValueErrors too
        raise ValueError(f"{config_file} is not a valid CLIP config.json ({err}); fix it or "
                         f"download it again") from None
    _check_heads(config, config_file)
    return config


def _build_and_load(config: CLIPConfig, state: dict[str, torch.Tensor], file: Path,
                    config_file: Path | None) -> CLIP:
    """CLIP(config) with the file's tensors, once key sets and shapes are checked to match."""
    with torch.device("meta"):  # no memory, no random init: every tensor comes from the file
        model = CLIP(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{file} does not match its config "
                         f"({config_file or 'derived from the tensor shapes'}): missing keys "
                         f"[{_first(missing)}], unexpected keys [{_first(unexpected)}]")
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(s)})" for k, s in expected.items()
             if state[k].shape != s]
    if wrong:
        raise ValueError(f"{file} has tensors of the wrong shape for its config: {_first(wrong)}")
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _check_finite(model: CLIP, state: dict[str, torch.Tensor], file: Path,
                  dtype: torch.dtype) -> None:
    """Refuse NaN or infinite values: checked where the tensors now are (on a GPU it takes
    milliseconds), and only then against the file, to tell a damaged file from values that
    overflow `dtype`."""
    bad = _non_finite(model.state_dict())
    if bad and _non_finite({k: state[k] for k in bad}):
        raise ValueError(f"{file} holds NaN or infinite values in {_first(bad)}; the file is "
                         f"damaged or was saved from a run that diverged — download it again or "
                         f"use an earlier checkpoint")
    if bad:
        raise ValueError(f"{file} has values beyond the range of {dtype} in {_first(bad)}; load it "
                         f"in torch.float32 or torch.bfloat16")


def _non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """Names (sorted) of the tensors that hold a NaN or an infinity. A sum is NaN or infinite when
    any element is, so one fast reduction per tensor (and one device sync for all) finds the
    candidates; an exact test then clears those whose sum merely overflowed (a float16 sum past
    65504, say)."""
    names = sorted(k for k, v in state.items() if v.is_floating_point() and v.numel())
    if not names:
        return []
    sums = torch.stack([state[k].sum().float() for k in names])
    candidates = [names[i] for i in (~sums.isfinite()).nonzero().flatten().tolist()]
    return [k for k in candidates if not state[k].isfinite().all()]


def _first(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" … ({len(names)} in all)" if len(names) > limit else "")


# ---- the checks of a config.json


def _from_dict(cls, values: dict | None, override: dict | None = None, prefix: str = ""):
    known = {f.name for f in fields(cls)}
    for key, part in [(prefix, values), (prefix + "_dict", override)]:
        if part is not None and not isinstance(part, dict):
            raise ValueError(f"{key} is a JSON {type(part).__name__}, not an object")
    merged = {k: v for k, v in (values or {}).items() if k in known}
    # older files' `*_config_dict`: with the defaults, it replaces `*_config`
    if override is not None:
        merged.update(asdict(cls()) | {k: v for k, v in override.items() if k in known})
    _check_types(cls, merged, prefix + "." if prefix else "")
    return cls(**merged)


def _matches(value, kind) -> bool:
    """isinstance for the annotations of the config dataclasses (int, float, str, unions with
    None)."""
    if isinstance(kind, types.UnionType):
        return any(_matches(value, k) for k in typing.get_args(kind))
    if kind is float:  # JSON writes 1.0 as 1
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:  # bool is an int to Python, not to a config
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_types(cls, values: dict, prefix: str = "") -> None:
    """A ValueError naming the first value whose type is not its dataclass field's ("2" for an
    int)."""
    for f in fields(cls):
        if f.name in values and not _matches(values[f.name], f.type):
            kind = getattr(f.type, "__name__", str(f.type))  # "int", or "int | None"
            raise ValueError(f"{prefix}{f.name} is {values[f.name]!r}, which is not of type {kind}")


def _check_heads(config: CLIPConfig, config_file: Path) -> None:
    """Attention splits the width into equal heads: refuse a config where it cannot, before any
    forward."""
    for name, tower in [("text_config", config.text), ("vision_config", config.vision)]:
        if tower is not None and (tower.num_attention_heads < 1
                                  or tower.hidden_size % tower.num_attention_heads):
            raise ValueError(f"{config_file}: {name} has num_attention_heads "
                             f"{tower.num_attention_heads}, which does not divide hidden_size "
                             f"{tower.hidden_size}; fix it or download it again")


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


def _config_from_shapes(state: dict[str, torch.Tensor], file: Path, open_clip: bool = False,
                        heads: tuple[int, int] | None = None) -> CLIPConfig:
    """For a bare .safetensors file: read sizes off the tensors, as OpenAI's build_model does. Head
    counts are stored nowhere: `heads` (text heads, vision head width) come from
    open_clip_config.json; without them, the heads are width // 64 where no wider head
    (WIDE_HEAD_DIMS) also fits."""

    def shape(key: str) -> torch.Size:
        if key not in state:
            raise ValueError(f"{file} has no tensor {OPEN_CLIP_NAMES[key] if open_clip else key}, "
                             f"from which the model's sizes are read; the file is incomplete — "
                             f"download it again")
        return state[key].shape

    def layers(prefix: str) -> int:
        return len({k.split(".")[3] for k in state if k.startswith(f"{prefix}.encoder.layers.")})

    def head_count(tower: str, width: int) -> int:
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

    tok = state["text_model.embeddings.token_embedding.weight"]
    text = TextConfig(
        vocab_size=tok.shape[0], hidden_size=tok.shape[1],
        intermediate_size=shape("text_model.encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=layers("text_model"), num_attention_heads=head_count("text", tok.shape[1]),
        max_position_embeddings=shape("text_model.embeddings.position_embedding.weight")[0],
    )
    if "vision_model.embeddings.patch_embedding.weight" not in state:
        return CLIPConfig(text=text, projection_dim=None)
    patch = state["vision_model.embeddings.patch_embedding.weight"]  # (width, 3, p, p)
    grid = math.isqrt(shape("vision_model.embeddings.position_embedding.weight")[0] - 1)
    vision = VisionConfig(
        hidden_size=patch.shape[0],
        intermediate_size=shape("vision_model.encoder.layers.0.mlp.fc1.weight")[0],
        num_hidden_layers=layers("vision_model"),
        num_attention_heads=head_count("image", patch.shape[0]),
        image_size=grid * patch.shape[-1], patch_size=patch.shape[-1], num_channels=patch.shape[1],
    )
    return CLIPConfig(text=text, vision=vision, projection_dim=shape("visual_projection.weight")[0])


# ---- open_clip's and OpenAI's layout


# open_clip's layout does not record the activation: OpenAI's models use QuickGELU, LAION's mostly
# GELU (open_clip marks QuickGELU models by a "-quickgelu" model name, or quick_gelu in
# open_clip_config.json).
OPEN_CLIP_ACTIVATIONS = {"quick_gelu", "gelu"}
# open_clip's file names on the hub
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")

# open_clip / OpenAI original keys → ours, applied in order to each key. Besides these renames,
# three tensors change form (in _from_open_clip): attn.in_proj_{weight,bias} holds q, k and v
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


def _is_open_clip(state: dict[str, torch.Tensor]) -> bool:
    return "token_embedding.weight" in state or "text.token_embedding.weight" in state


def _from_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def _open_clip_config(folder: Path) -> tuple[str | None, tuple[int, int] | None]:
    """What open_clip_config.json beside an open_clip file (the hub's LAION folders have one) says
    and its tensors do not, read as open_clip builds the model: the activation (QuickGELU exactly
    when model_cfg.quick_gelu is true), and (text_cfg.heads, vision_cfg.head_width), 8 and 64 where
    absent. (None, None) without the file."""
    config_file = folder / "open_clip_config.json"
    if not config_file.is_file():
        return None, None
    try:
        model_cfg = json.loads(config_file.read_text(encoding="utf-8"))["model_cfg"]
        values = {
            "quick_gelu": model_cfg.get("quick_gelu", False),
            "text_cfg.heads": model_cfg.get("text_cfg", {}).get("heads", 8),
            "vision_cfg.head_width": model_cfg.get("vision_cfg", {}).get("head_width", HEAD_DIM),
        }
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{config_file} is not a valid open_clip config (model_cfg, text_cfg and "
                         f"vision_cfg must be objects: {err!r}); fix it, remove it and pass "
                         f"activation=..., or download it again") from None
    for key, value in values.items():
        quick = key == "quick_gelu"
        if not (isinstance(value, bool) if quick else _matches(value, int) and value > 0):
            raise ValueError(f"{config_file}: model_cfg.{key} is {value!r}, which is not "
                             f"{'true or false' if quick else 'a positive integer'}; fix it")
    heads = (values["text_cfg.heads"], values["vision_cfg.head_width"])
    return "quick_gelu" if values["quick_gelu"] else "gelu", heads


# ---- hub ids


# A hub id, organisation/name: one slash, no leading "." or "/".
HUB_ID = regex.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What refs/main holds: a commit hash, the name of a folder in snapshots/.
HUB_COMMIT = regex.compile(r"[0-9a-f]+")


def hub_path(path: str | Path) -> Path:
    """A model path as given, or, for a hub id such as openai/clip-vit-base-patch32 that is no path
    here, its snapshot in the local Hugging Face cache: $HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub; there models--{org}--{name}/snapshots/<the commit in refs/main>,
    refused if it or a file in it leads out of models--{org}--{name}/ (its files are links into
    blobs/ there). The network is never used. Here rather than in each script: clip.py is the one
    module of ours that every script taking a model path imports, and it imports nothing of
    ours."""
    if Path(path).exists() or not HUB_ID.fullmatch(str(path)):
        return Path(path)
    default_home = Path("~/.cache/huggingface")
    cache = Path(os.environ.get("HF_HUB_CACHE")
                 or Path(os.environ.get("HF_HOME") or default_home) / "hub")
    repo = cache.expanduser() / f"models--{str(path).replace('/', '--')}"
    ref = repo / "refs" / "main"
    commit = ref.read_bytes()[:100].decode("utf-8", "replace").strip() if ref.is_file() else None
    if commit is not None and not HUB_COMMIT.fullmatch(commit):
        raise FileNotFoundError(f"{ref} holds {commit!r}, not a commit hash, so it names no "
                                f"snapshot; delete {repo} and download it again with "
                                f"`huggingface-cli download {path}`")
    snapshot = repo / "snapshots" / commit if commit is not None else None
    if snapshot is not None and snapshot.is_dir():
        inside = repo.resolve()
        out = next((p for p in [snapshot, *snapshot.rglob("*")]
                    if not p.resolve().is_relative_to(inside)), None)
        if out is not None:
            raise FileNotFoundError(f"{out} leads out of the Hugging Face cache (to "
                                    f"{out.resolve()}), so {path} is not loaded from it; delete "
                                    f"{repo} and download it again with `huggingface-cli download "
                                    f"{path}`")
        return snapshot
    raise FileNotFoundError(f"{path} not found, neither as a path nor as a hub id in the local "
                            f"Hugging Face cache ({repo / 'refs' / 'main'} names no snapshot) — "
                            f"download it with `huggingface-cli download {path}`, or run "
                            f"`python weights/download.py` (see weights/README.md)")


# ----------------------------------------------------------------------------- demo

if __name__ == "__main__":
    import argparse

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
    model, tokenizer = load_clip(path), Tokenizer.from_pretrained(path)
    size = model.config.vision.image_size
    pixels = image_transform(size)(open_image(args.image, size=size))[None]
    with torch.no_grad():
        probs = model(pixels, tokenizer(args.captions)).softmax(dim=-1)[0]
    for caption, p in zip(args.captions, probs.tolist()):
        print(f"{p:6.1%}  {caption}")

