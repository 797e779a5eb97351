"""The Stable Diffusion 1.x denoising UNet (diffusers' UNet2DConditionModel), written from scratch.

Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models", https://arxiv.org/abs/2112.10752) trains a UNet ε_θ(z_t, t, c) to predict the noise ε
that was added to a VAE latent z_0 at timestep t, given a text conditioning c (77 × 768 CLIP
token features for SD 1.x). The network: a sinusoidal timestep embedding fed into every ResNet
block, and spatial transformers (self-attention over positions, cross-attention to the text)
at every resolution but the coarsest, in a U of down, mid and up blocks joined by skips.

Module names equal the keys of the official diffusers-format weights
(CompVis/stable-diffusion-v1-4 `unet/diffusion_pytorch_model.safetensors` + `config.json`, read
by weights/networks.py's load_unet), so they load with `load_state_dict(strict=True)` and no
renames. SD 2.x configs (linear proj_in/proj_out, per-block head counts) load too. Checked
number for number against diffusers' UNet2DConditionModel (tests/test_unet.py).
"""

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# The longest wavelength of the sinusoidal timestep embedding, as in the Transformer.
MAX_PERIOD = 10_000
# The spatial transformer's GroupNorm (ResNet GroupNorms use config.norm_eps).
TRANSFORMER_NORM_EPS = 1e-6
LAYER_NORM_EPS = 1e-5  # the transformer blocks' LayerNorms
# Activations and conv weights are kept (B, H, W, C) in memory: oneDNN's and cuDNN's convolutions
# are faster in that layout, and the transformers' (B, C, H, W) → (B, H·W, C) reshape becomes a
# view.
CHANNELS_LAST = torch.channels_last


@dataclass
class UNetConfig:
    """Hyperparameters read from the unet/config.json of a diffusers checkpoint (defaults: SD 1.x)."""

    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64  # latent side the model was trained at (64 = 512 pixels / 8)
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    # sic: diffusers' name; for SD 1.x/2.x it is the number of heads (per down block when a list).
    attention_head_dim: int | tuple[int, ...] = 8
    cross_attention_dim: int = 768
    use_linear_projection: bool = False  # SD 2.x: proj_in/proj_out are Linear, not 1×1 Conv2d
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads of each down block (the up blocks use them in reverse, the mid block
        the last)."""
        h = self.attention_head_dim
        return tuple(h) if isinstance(h, (list, tuple)) else (h,) * len(self.block_out_channels)


# ----------------------------------------------------------------------------- model


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool,
                       freq_shift: int) -> torch.Tensor:
    """(B,) timesteps → (B, dim): [cos(t·ω_i), sin(t·ω_i)],
    ω_i = MAX_PERIOD^(−i / (dim/2 − freq_shift))."""
    half = dim // 2
    omega = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))
    angles = t.float()[:, None] * omega[None, :]  # (B, dim/2)
    parts = [angles.cos(), angles.sin()] if flip_sin_to_cos else [angles.sin(), angles.cos()]
    return F.pad(torch.cat(parts, dim=-1), (0, dim % 2))  # an odd dim gets one zero column


class TimestepEmbedding(nn.Module):
    """The MLP on the sinusoidal embedding: linear_1, SiLU, linear_2."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """x + conv(SiLU(norm(conv(SiLU(norm(x))) + W·SiLU(emb)))), a 1×1 conv on the skip when the
    width changes."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, config: UNetConfig):
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (nn.Conv2d(in_channels, out_channels, 1)
                              if in_channels != out_channels else None)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # emb is SiLU(timestep embedding), shared by every block. In place where nothing needs the
        # old value (autograd keeps the norms' inputs, not their outputs); never on x itself, which
        # gradient checkpointing reads again.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = h.add_(self.time_emb_proj(emb)[:, :, None, None])  # the timestep shifts every channel
        h = self.conv2(F.silu(self.norm2(h), inplace=True))  # (dropout 0 in SD: omitted)
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


class Attention(nn.Module):
    """Multi-head attention of x (B, T, dim) to context (B, S, context_dim); self-attention
    without context."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        # to_out.0 (diffusers' to_out.1 is a dropout)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, T or S, head_dim)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √head_dim) v
        return self.to_out[0](out.transpose(1, 2).flatten(2))  # (B, T, dim)


class GEGLU(nn.Module):
    """The gated GELU of Shazeer 2020 (https://arxiv.org/abs/2002.05202): a · GELU(b),
    [a, b] = proj(x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)  # exact (erf) GELU


class FeedForward(nn.Module):
    FF_MULT = 4  # hidden width / model width

    def __init__(self, dim: int):
        super().__init__()
        # net.0 the GEGLU, net.1 a dropout (no weights), net.2 the output linear: diffusers'
        # indices.
        self.net = nn.ModuleList([GEGLU(dim, self.FF_MULT * dim), nn.Identity(),
                                  nn.Linear(self.FF_MULT * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer layer: self-attention, cross-attention to the text, GEGLU MLP."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn1 = Attention(dim, dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn2 = Attention(dim, context_dim, heads)
        self.norm3 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # Residuals added in place into each sublayer's fresh output (which its backward does not
        # need), which saves one activation-sized allocation per line.
        x = self.attn1(self.norm1(x)).add_(x)  # x = x + attn1(norm1(x))
        x = self.attn2(self.norm2(x), context).add_(x)  # x = x + attn2(norm2(x), context)
        return self.ff(self.norm3(x)).add_(x)  # x = x + ff(norm3(x))


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel: the H×W positions as tokens through one TransformerBlock,
    plus a residual."""

    def __init__(self, channels: int, heads: int, config: UNetConfig):
        super().__init__()
        self.linear = config.use_linear_projection
        proj = ((lambda: nn.Linear(channels, channels)) if self.linear
                else (lambda: nn.Conv2d(channels, channels, 1)))
        self.norm = nn.GroupNorm(config.norm_num_groups, channels, eps=TRANSFORMER_NORM_EPS)
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, config.cross_attention_dim, heads)])
        self.proj_out = proj()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        h = h if self.linear else self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, H·W, C): a view for channels-last x
        h = self.proj_in(h) if self.linear else h
        h = self.transformer_blocks[0](h, context)
        h = self.proj_out(h) if self.linear else h
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last in memory
        h = h if self.linear else self.proj_out(h)
        return h.add_(x)


class Downsample(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # H → H/2


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # H → 2H


class UNetBlock(nn.Module):
    """One resolution level: resnets[i] (each followed by attentions[i] in a CrossAttn block),
    then a down/upsampler. Only holds the layers; UNet.forward runs them, as it owns the skip
    connections."""

    def __init__(self, in_channels: list[int], out_channels: int, heads: int | None,
                 config: UNetConfig, downsample: bool = False, upsample: bool = False,
                 attentions: int | None = None):
        super().__init__()
        emb_dim = 4 * config.block_out_channels[0]
        self.resnets = nn.ModuleList(ResnetBlock(c, out_channels, emb_dim, config) for c in in_channels)
        attentions = (len(in_channels) if attentions is None else attentions) if heads is not None else 0
        self.attentions = nn.ModuleList(SpatialTransformer(out_channels, heads, config)
                                        for _ in range(attentions))
        if downsample:
            self.downsamplers = nn.ModuleList([Downsample(out_channels, config.downsample_padding)])
        if upsample:
            self.upsamplers = nn.ModuleList([Upsample(out_channels)])


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        # Recompute each ResNet/transformer in backward to save memory.
        self.gradient_checkpointing = False
        widths, heads, n = config.block_out_channels, config.heads, config.layers_per_block
        self.time_embedding = TimestepEmbedding(widths[0], 4 * widths[0])
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)

        skips = [widths[0]]  # the width of every tensor the down path hands to the up path
        self.down_blocks = nn.ModuleList()
        for i, (kind, width) in enumerate(zip(config.down_block_types, widths)):
            last = i == len(widths) - 1
            self.down_blocks.append(UNetBlock([widths[max(i - 1, 0)]] + [width] * (n - 1), width,
                                              heads[i] if kind.startswith("CrossAttn") else None,
                                              config, downsample=not last))
            skips += [width] * (n + (not last))
        # The mid block: resnet, attention, resnet.
        self.mid_block = UNetBlock([widths[-1]] * 2, widths[-1], heads[-1], config, attentions=1)

        self.up_blocks = nn.ModuleList()
        width = widths[-1]
        for i, kind in enumerate(config.up_block_types):
            out = widths[-1 - i]
            # Each of the n + 1 resnets takes the previous output concatenated with one skip
            # (popped last first).
            ins = [(width if j == 0 else out) + skips.pop() for j in range(n + 1)]
            self.up_blocks.append(UNetBlock(ins, out,
                                            heads[-1 - i] if kind.startswith("CrossAttn") else None,
                                            config, upsample=i < len(widths) - 1))
            width = out
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, widths[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(widths[0], config.out_channels, 3, padding=1)

    def _run(self, layer: nn.Module, *args) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def forward(self, latents: torch.Tensor, t, context: torch.Tensor) -> torch.Tensor:
        """latents (B, in_channels, H, W), t (B,) or a scalar, context (B, S, cross_attention_dim)
        → the predicted noise ε̂ (B, out_channels, H, W)."""
        t = torch.as_tensor(t, device=latents.device).reshape(-1)
        self._check_inputs(latents, t, context)
        B = latents.shape[0]
        t = t.expand(B)  # a scalar applies to every sample
        emb = timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                 self.config.freq_shift).to(latents.dtype)
        emb = F.silu(self.time_embedding(emb))  # every ResNet block applies SiLU first: do it once

        x = self.conv_in(latents.contiguous(memory_format=CHANNELS_LAST))
        skips = [x]
        for block in self.down_blocks:
            for i, resnet in enumerate(block.resnets):
                x = self._run(resnet, x, emb)
                if block.attentions:
                    x = self._run(block.attentions[i], x, context)
                skips.append(x)
            if hasattr(block, "downsamplers"):
                x = block.downsamplers[0](x)
                skips.append(x)

        x = self._run(self.mid_block.resnets[0], x, emb)
        x = self._run(self.mid_block.attentions[0], x, context)
        x = self._run(self.mid_block.resnets[1], x, emb)

        for block in self.up_blocks:
            for i, resnet in enumerate(block.resnets):
                x = self._run(resnet, torch.cat([x, skips.pop()], dim=1), emb)  # (B, C + C_skip, h, w)
                if block.attentions:
                    x = self._run(block.attentions[i], x, context)
            if hasattr(block, "upsamplers"):
                x = block.upsamplers[0](x)
        x = self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))
        return x.contiguous()

    def _check_inputs(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> None:
        c, f = self.config, 2 ** (len(self.config.block_out_channels) - 1)
        if (latents.ndim != 4 or latents.shape[1] != c.in_channels
                or latents.shape[2] % f or latents.shape[3] % f):
            raise ValueError(f"UNet expects latents of shape (B, {c.in_channels}, H, W) with H "
                             f"and W multiples of {f} (the UNet halves them "
                             f"{len(c.block_out_channels) - 1} times), got {tuple(latents.shape)}; "
                             f"for SD use images whose sides are multiples of {8 * f}.")
        if (context.ndim != 3 or context.shape[0] != latents.shape[0]
                or context.shape[2] != c.cross_attention_dim):
            raise ValueError(f"UNet expects context of shape "
                             f"({latents.shape[0]}, S, {c.cross_attention_dim}) (the text "
                             f"encoder's last hidden state), got {tuple(context.shape)}.")
        if t.numel() not in (1, latents.shape[0]):
            raise ValueError(f"UNet expects one timestep or one per sample ({latents.shape[0]}), "
                             f"got {t.numel()}.")


if __name__ == "__main__":
    from weights.networks import load_unet

    parser = argparse.ArgumentParser(description="One denoising step of the SD UNet on a random "
                                                 "latent, empty conditioning; prints the "
                                                 "noise-prediction error.")
    parser.add_argument("sd_folder", nargs="?", default="weights/stable-diffusion-v1-4",
                        help="Stable Diffusion folder (its unet/ subfolder is loaded)")
    parser.add_argument("--t", type=int, default=500, help="timestep in [0, 1000)")
    args = parser.parse_args()
    try:
        unet = load_unet(Path(args.sd_folder) / "unet")
    except FileNotFoundError as err:
        sys.exit(str(err))
    BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2  # SD's "scaled_linear" schedule
    alpha_bar = torch.cumprod(1 - BETAS, dim=0)[args.t]
    size = unet.config.sample_size
    z0 = torch.randn(1, unet.config.in_channels, size, size,
                     generator=torch.Generator().manual_seed(0))
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))
    z_t = alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * noise  # z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε
    context = torch.zeros(1, 77, unet.config.cross_attention_dim)  # a stand-in for the empty prompt
    with torch.no_grad():
        eps_hat = unet(z_t, args.t, context)
    mse = (eps_hat - noise).pow(2).mean().item()
    print(f"latents {tuple(z_t.shape)}, context {tuple(context.shape)} → "
          f"ε̂ {tuple(eps_hat.shape)}; t={args.t}: mean (ε̂ − ε)² = {mse:.4f} "
          f"(1.0 would be no better than predicting zero)")
