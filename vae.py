"""The Stable Diffusion 1.x variational autoencoder (AutoencoderKL), written from scratch.

The VAE of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models", https://arxiv.org/abs/2112.10752) maps an RGB image in [-1, 1] to a diagonal
Gaussian over latents 8× smaller per side (4 channels), and latents back to images.
Stable Diffusion works on `mean × 0.18215`, a scale that gives the latents roughly unit variance.

Module names equal the keys of the official diffusers-format weights
(CompVis/stable-diffusion-v1-4 `vae/diffusion_pytorch_model.safetensors` + `config.json`),
so they load with `load_state_dict(strict=True)`; the only rename is the one for older files
(see `LEGACY_ATTENTION_NAMES`). Checked number for number against diffusers' AutoencoderKL.
"""

import argparse
import json
import math
import sys
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

SCALING_FACTOR = 0.18215  # SD 1.x: latents × this have roughly unit variance
GROUP_NORM_EPS = 1e-6  # every GroupNorm of the VAE, the attention's included
LOGVAR_RANGE = (-30.0, 20.0)  # the encoder's log-variance is clamped to this range
# Activations and conv weights are kept (B, H, W, C) in memory ("channels last"): oneDNN's CPU
# convolutions run about 1.6× faster in that layout than in (B, C, H, W) at full resolution.
CHANNELS_LAST = torch.channels_last


@dataclass
class VAEConfig:
    """Hyperparameters read from the vae/config.json of a diffusers checkpoint (defaults: SD 1.x)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = SCALING_FACTOR

    @classmethod
    def from_json(cls, file: Path) -> "VAEConfig":
        """Read and check a diffusers config.json (see _config_from_json, with the loader)."""
        return _config_from_json(cls, file)


# ----------------------------------------------------------------------------- model


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)


class ResnetBlock(nn.Module):
    """x + conv(SiLU(norm(conv(SiLU(norm(x)))))), with a 1×1 conv on the skip path when the
    width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (nn.Conv2d(in_channels, out_channels, 1)
                              if in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place where nothing needs the old value (autograd keeps the norms' inputs, not their
        # outputs), and one step per line so each big activation is freed as soon as possible.
        h = F.silu(self.norm1(x), inplace=True)
        h = self.conv1(h)
        h = F.silu(self.norm2(h), inplace=True)
        h = self.conv2(h)
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


class Attention(nn.Module):
    """Single-head self-attention over the H×W positions, with a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        # to_out.0 (diffusers' to_out.1 is a dropout)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C): one token per position
        # one head of width C
        h = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)
        return h.add_(x)


class MidBlock(nn.Module):
    """ResNet block, attention, ResNet block: the only place where the VAE looks globally."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The original CompVis model pads only right and bottom, then a stride-2 3×3 conv:
        # H → H/2.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def resnet_stack(in_channels: int, out_channels: int, layers: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups)
                         for i in range(layers))


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = resnet_stack(in_channels, out_channels, layers, groups)
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = resnet_stack(in_channels, out_channels, layers, groups)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class Encoder(nn.Module):
    """(B, 3, H, W) → (B, 2·latent, H/f, W/f): the mean and log-variance, f = 2^(blocks − 1)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(widths[max(i - 1, 0)], widths[i], config.layers_per_block, groups,
                      i < len(widths) - 1)
            for i in range(len(widths)))
        self.mid_block = MidBlock(widths[-1], groups)
        self.conv_norm_out = group_norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))


class Decoder(nn.Module):
    """(B, latent, h, w) → (B, 3, h·f, w·f); the encoder mirrored, one more ResNet block per
    level."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        widths, groups = config.block_out_channels[::-1], config.norm_num_groups  # widest first
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups)
        self.up_blocks = nn.ModuleList(
            UpBlock(widths[max(i - 1, 0)], widths[i], config.layers_per_block + 1, groups,
                    i < len(widths) - 1)
            for i in range(len(widths)))
        self.conv_norm_out = group_norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))


class DiagonalGaussian:
    """N(mean, diag(std²)) over latents, from the encoder's (B, 2·latent, h, w) moments."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)  # keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # Draw the noise on the generator's device (as diffusers does) so a CPU generator seeds
        # GPU runs too.
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device,
                          dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)  # z = μ + σ·ε


class VAE(nn.Module):
    """encode: images → DiagonalGaussian over latents; decode: latents → images."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """images (B, 3, H, W) in [-1, 1], H and W multiples of the downsampling factor (8 for SD)."""
        f, channels = self.downsampling_factor, self.config.in_channels
        if images.ndim != 4 or images.shape[1] != channels or images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"VAE.encode expects images of shape (B, {channels}, H, W) with H and "
                             f"W multiples of {f}, got {tuple(images.shape)}; resize or crop the "
                             f"images first.")
        moments = self.quant_conv(self.encoder(images.contiguous(memory_format=CHANNELS_LAST)))
        return DiagonalGaussian(moments.contiguous())

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, 4, h, w), unscaled → images (B, 3, h·8, w·8), roughly in [-1, 1]."""
        if latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(f"VAE.decode expects latents of shape "
                             f"(B, {self.config.latent_channels}, h, w), "
                             f"got {tuple(latents.shape)}.")
        return self.decoder(self.post_quant_conv(latents.contiguous(memory_format=CHANNELS_LAST))).contiguous()

    def images_to_latents(self, images: torch.Tensor, sample: bool = False,
                          generator=None) -> torch.Tensor:
        """The diffusion model's input: (posterior mean, or a sample) × scaling_factor."""
        posterior = self.encode(images)
        latents = posterior.sample(generator) if sample else posterior.mean
        return latents * self.config.scaling_factor

    def latents_to_images(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode(latents / self.config.scaling_factor)


# ----------------------------------------------------------------------------- loading and saving


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
FP16_WEIGHTS_NAME = "diffusion_pytorch_model.fp16.safetensors"  # diffusers' "fp16" variant
DOWNLOAD_HINT = "run `python weights/download.py`"
# Files saved by diffusers before 0.14 name the mid-block attention's linear layers
# query/key/value/proj_attn; diffusers renames them on load, and so do we.
LEGACY_ATTENTION_NAMES = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.",
                          "proj_attn.": "to_out.0."}


def _config_from_json(cls, file: Path) -> VAEConfig:
    """VAEConfig.from_json: the config.json of a Stable Diffusion 1.x AutoencoderKL, or one
    ValueError that names the file, the field and what to do."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{file} is not readable JSON ({err}); {DOWNLOAD_HINT} to fetch it "
                         f"again.") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file} holds a JSON {type(raw).__name__}, not an object; "
                         f"{DOWNLOAD_HINT} to fetch it again.")
    other = _other_model(raw)
    if other:
        sibling = file.parent.parent / "vae"
        raise ValueError(f"{file} describes {other}, not a VAE; pass the vae/ folder of a Stable "
                         f"Diffusion checkpoint{f' ({sibling})' if sibling.is_dir() else ''}.")
    # Other block types or a missing quant conv show up as unexpected or missing keys when
    # loading; the activation does not, so it is checked here.
    if raw.get("act_fn", "silu") != "silu":
        raise ValueError(f"{file} describes a {raw.get('_class_name', 'AutoencoderKL')} with "
                         f"act_fn {raw['act_fn']}; vae.py implements the Stable Diffusion 1.x "
                         f"AutoencoderKL (SiLU).")
    values = {f.name: raw[f.name] for f in fields(cls) if raw.get(f.name) is not None}
    for f in fields(cls):
        if f.name in values and not _matches(values[f.name], f.type):
            # "int", "tuple[int, ...]"
            kind = f.type.__name__ if isinstance(f.type, type) else str(f.type)
            raise ValueError(f"{file} sets {f.name} = {values[f.name]!r}, which is not of type "
                             f"{kind}; fix it or {DOWNLOAD_HINT} to fetch it again.")
    config = cls(**values)
    config.block_out_channels = tuple(config.block_out_channels)
    if not config.block_out_channels:
        raise ValueError(f"{file} sets block_out_channels = [], which must list at least one "
                         f"width; fix it or {DOWNLOAD_HINT} to fetch it again.")
    # 0 would make every latent 0
    if not (math.isfinite(config.scaling_factor) and config.scaling_factor > 0):
        raise ValueError(f"{file} sets scaling_factor = {config.scaling_factor!r}, which must be a "
                         f"positive finite number (SD 1.x: {SCALING_FACTOR}); fix it or "
                         f"{DOWNLOAD_HINT} to fetch it again.")
    return config


def _matches(value, kind) -> bool:
    """isinstance for VAEConfig's annotations: int, float, tuple[int, ...] (a JSON list)."""
    if typing.get_origin(kind) is tuple:
        return isinstance(value, (list, tuple)) and all(_matches(v, typing.get_args(kind)[0])
                                                        for v in value)
    if kind is float:  # JSON writes 1.0 as 1
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    # bool is an int to Python, not to a config
    return isinstance(value, kind) and not isinstance(value, bool)


def _other_model(raw: dict) -> str | None:
    """What a config.json that is not an AutoencoderKL's describes, in words (None for a VAE)."""
    if "model_type" in raw:  # a transformers config: SD's text_encoder/, or a CLIP
        kinds = {"clip_text_model": "a CLIP text encoder (transformers' CLIPTextModel)",
                 "clip": "a CLIP model"}
        return kinds.get(str(raw["model_type"]),
                         f"a transformers model of type {raw['model_type']!r}")
    name = raw.get("_class_name", "AutoencoderKL")
    if name == "AutoencoderKL":
        return None
    return f"a {name}" + (" (the denoising UNet)" if "UNet" in name else "")


def _first_keys(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:10]) + (f", … ({len(keys)} in all)" if len(keys) > 10 else "")


def _non_finite(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Names (sorted) of the tensors that hold a NaN or an infinity. A sum is NaN or infinite when
    any element is, so one fast reduction per tensor (and one device sync for all) finds the
    candidates; an exact test then clears those whose sum merely overflowed (a float16 sum past
    65504, say)."""
    names = sorted(k for k, v in state_dict.items() if v.is_floating_point() and v.numel())
    if not names:
        return []
    sums = torch.stack([state_dict[k].sum().float() for k in names])
    candidates = [names[i] for i in (~sums.isfinite()).nonzero().flatten().tolist()]
    return [k for k in candidates if not state_dict[k].isfinite().all()]


def _config_and_weights(path: Path) -> tuple[VAEConfig, Path, str]:
    """The config, the weights file and, for messages, what the weights must match: a vae/ folder's
    config.json, or for a bare file the SD 1.x design."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; {DOWNLOAD_HINT} to fetch the Stable Diffusion "
                                f"weights.")
    if not path.is_dir():  # a bare file: the SD 1.x design, checked against the tensors
        described = ("the SD 1.x VAE (assumed for a bare file; pass its folder to use its "
                     "config.json)")
        return VAEConfig(), path, described
    if (path / "vae").is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'} not found: for a Stable Diffusion folder, "
                                f"pass {path / 'vae'}.")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'} not found; {DOWNLOAD_HINT} to fetch it.")
    config = VAEConfig.from_json(path / "config.json")
    names = (WEIGHTS_NAME, FP16_WEIGHTS_NAME)
    file = next((path / name for name in names if (path / name).is_file()), None)
    if file is None:
        raise FileNotFoundError(f"{path} holds neither {WEIGHTS_NAME} nor {FP16_WEIGHTS_NAME}; "
                                f"{DOWNLOAD_HINT}.")
    return config, file, f"the VAE that {path / 'config.json'} describes"


def load_vae(path, device="cpu", dtype=torch.float32) -> VAE:
    """Load a diffusers-format VAE: the vae/ folder (config.json + safetensors) or a bare
    .safetensors file."""
    config, file, described = _config_and_weights(Path(path))
    try:
        state_dict = load_file(file)
    except Exception as err:  # safetensors has its own error types for a bad header or a short file
        raise ValueError(f"{file} is not a readable safetensors file ({err}); it may be truncated "
                         f"or corrupt, {DOWNLOAD_HINT} to fetch it again.") from None
    for old, new in LEGACY_ATTENTION_NAMES.items():
        state_dict = {k.replace(".attentions.0." + old, ".attentions.0." + new): v
                      for k, v in state_dict.items()}

    with torch.device("meta"):  # shapes only; the real tensors come from the file
        model = VAE(config)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    missing, unexpected = expected.keys() - state_dict.keys(), state_dict.keys() - expected.keys()
    if missing or unexpected:
        hint = ("" if missing != expected.keys()
                else " (no diffusers-format VAE weights: a UNet or CLIP file?)")
        problems = " and ".join(f"{len(keys)} {kind} keys [{_first_keys(keys)}]"
                                for kind, keys in [("missing", missing), ("unexpected", unexpected)]
                                if keys)
        raise ValueError(f"{file} does not match {described}{hint}: {problems}; "
                         f"point to a Stable Diffusion 1.x vae/ folder or {DOWNLOAD_HINT}.")
    wrong = [f"{k} {tuple(state_dict[k].shape)} ≠ {shape}" for k, shape in expected.items()
             if tuple(state_dict[k].shape) != shape]
    if wrong:
        raise ValueError(f"{file} has {len(wrong)} tensors of the wrong shape for {described}: "
                         f"[{_first_keys(wrong)}]; check config.json or {DOWNLOAD_HINT}.")
    model.load_state_dict(state_dict, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype, memory_format=CHANNELS_LAST).eval()
    # Checked where the tensors now are (on a GPU it takes milliseconds), and only then against the
    # file, to tell a damaged file from values that overflow `dtype`.
    bad = _non_finite(model.state_dict())
    if bad and _non_finite({k: state_dict[k] for k in bad}):
        raise ValueError(f"{file} holds NaN or infinite values in {len(bad)} tensors "
                         f"[{_first_keys(bad)}]; the file is damaged or was saved from a run that "
                         f"diverged: {DOWNLOAD_HINT} to fetch it again.")
    if bad:
        raise ValueError(f"{file} has values beyond the range of {dtype} in {len(bad)} tensors "
                         f"[{_first_keys(bad)}]; load it in torch.float32 or torch.bfloat16.")
    return model


def save_vae(model: VAE, folder) -> None:
    """Write config.json + diffusion_pytorch_model.safetensors in diffusers' layout (AutoencoderKL
    and load_vae read it): one DownEncoderBlock2D / UpDecoderBlock2D per entry of
    block_out_channels."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(model.config.block_out_channels)
    config = {"_class_name": "AutoencoderKL", **asdict(model.config), "act_fn": "silu",
              "down_block_types": ["DownEncoderBlock2D"] * n,
              "up_block_types": ["UpDecoderBlock2D"] * n}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / WEIGHTS_NAME, metadata={"format": "pt"})


if __name__ == "__main__":
    import torchvision.transforms as T
    from PIL import Image

    parser = argparse.ArgumentParser(
        description="Encode and decode an image with the SD 1.x VAE; print the PSNR.")
    parser.add_argument("image", help="path to an image file")
    parser.add_argument("--vae", default="weights/stable-diffusion-v1-4/vae",
                        help="vae/ folder or .safetensors")
    parser.add_argument("--size", type=int, default=512,
                        help="resize + centre-crop side, in pixels")
    args = parser.parse_args()
    if not Path(args.image).is_file():
        sys.exit(f"{args.image} not found: pass the path to an image file.")
    try:
        vae = load_vae(args.vae)
    except FileNotFoundError as err:
        sys.exit(str(err))
    to_tensor = T.Compose([T.Resize(args.size), T.CenterCrop(args.size), T.ToTensor()])  # [0, 1]
    x = to_tensor(Image.open(args.image).convert("RGB"))[None] * 2 - 1  # (1, 3, S, S) in [-1, 1]
    with torch.no_grad():
        latents = vae.images_to_latents(x)
        y = vae.latents_to_images(latents).clamp(-1, 1)
    mse = ((y - x) / 2).pow(2).mean().item()  # on the [0, 1] scale
    print(f"latents {tuple(latents.shape)}, std {latents.std():.3f}; "
          f"round trip PSNR {10 * math.log10(1 / mse):.2f} dB")
