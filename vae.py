"""The Stable Diffusion 1.x variational autoencoder (AutoencoderKL), written from scratch.

The VAE of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models", https://arxiv.org/abs/2112.10752) maps an RGB image in [-1, 1] to a diagonal
Gaussian over latents 8× smaller per side (4 channels), and latents back to images.
Stable Diffusion works on `mean × 0.18215`, a scale that gives the latents roughly unit variance.

Module names equal the keys of the official diffusers-format weights
(CompVis/stable-diffusion-v1-4 `vae/diffusion_pytorch_model.safetensors` + `config.json`),
so they load with `load_state_dict(strict=True)`; the only rename is the one for older files
(weights/networks.py's `LEGACY_ATTENTION_NAMES`, with load_vae and save_vae). Checked number for
number against diffusers' AutoencoderKL.
"""

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

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


if __name__ == "__main__":
    import torchvision.transforms as T
    from PIL import Image

    from weights.networks import load_vae

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
