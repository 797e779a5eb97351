"""SDS-CLIP's losses: a frozen Stable Diffusion UNet as a regulariser for CLIP's image embeddings.

SDS-CLIP (Basu et al. 2023, https://arxiv.org/abs/2307.09233) fine-tunes CLIP with

    L = L_CLIP + λ · L_SDS,
    L_SDS = E_{t,ε} ‖ ε_θ( √ᾱ_t · h_w(f_φ(x)) + √(1−ᾱ_t) · ε , t, c ) − ε ‖²,

where f_φ(x) is CLIP's image embedding, h_w a learnable linear map into the UNet's latent
space (`Mapper`), ε_θ the frozen SD 1.x UNet, c the caption through SD's own text encoder and
t uniform over the 1000 training steps of SD's noise schedule (`NoiseSchedule`).

‖·‖² is taken as the mean over the C·H·W latent elements (the usual diffusion training loss,
also what Winoground's diffusion score averages), so λ = 0.001 weighs a per-element error.

Two readings of "score distillation" are offered by `sds_loss`:
- mode="full": the loss as written, differentiated through the frozen UNet;
- mode="stopgrad": DreamFusion's SDS gradient (Poole et al. 2022, https://arxiv.org/abs/2209.14988),
  which skips the UNet Jacobian: ∇ = E[w(t) (ε̂ − ε) ∂z_t/∂θ].

This file reads no files: weights/networks.py loads the frozen parts (`load_stable_diffusion`
returns a `StableDiffusion`) and checks the scheduler; `train.py` puts the pieces together.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms

from clip import Tokenizer, to_rgb

# Stable Diffusion 1.x's training noise schedule ("scaled_linear", scheduler/scheduler_config.json).
NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012


class NoiseSchedule:
    """The DDPM forward process of SD 1.x: q(z_t | z_0) = N(√ᾱ_t z_0, (1−ᾱ_t) I).

    β_t = (linspace(√β_start, √β_end, T)_t)²,  ᾱ_t = ∏_{s≤t} (1 − β_s),  t = 0 … T−1.
    """

    def __init__(self, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                 beta_start: float = BETA_START, beta_end: float = BETA_END):
        self.num_train_timesteps = num_train_timesteps
        # "scaled_linear": linear in √β, not in β (kept in float32, as SD's scheduler does).
        self.betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps,
                                    dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # ᾱ_t = ∏ (1 − β_s)

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_t = √ᾱ_t · z_0 + √(1−ᾱ_t) · ε, for z_0, ε of shape (B, ...) and t of shape (B,)."""
        t = torch.as_tensor(t, device=z0.device)
        a = self.alphas_cumprod.to(z0.device)[t]  # ᾱ_t, (B,)
        a = a.reshape(a.shape + (1,) * (z0.dim() - a.dim()))  # (B, 1, 1, 1): broadcast over C, H, W
        return a.sqrt() * z0 + (1 - a).sqrt() * noise  # z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε

    def sample_timesteps(self, batch_size: int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """t ~ U{0, …, T−1}, shape (batch_size,), on the CPU (the generator's device)."""
        return torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator)



def sd_image_transform(resolution: int) -> transforms.Compose:
    """PIL image → (3, R, R) in [-1, 1], the VAE's input: RGB, bicubic resize of the shorter side,
    centre crop."""
    return transforms.Compose([
        to_rgb,
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(resolution),
        transforms.ToTensor(),
        transforms.Normalize([0.5] * 3, [0.5] * 3),  # [0, 1] → [-1, 1]
    ])


@dataclass
class StableDiffusion:
    """The parts of SD 1.x or 2.x-base that score a caption–image pair (the frozen ones; no sampler
    needed). weights/networks.py's load_stable_diffusion reads them from a diffusers folder."""
    vae: torch.nn.Module
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Tokenizer

    @property
    def resolution(self) -> int:
        """The image side the model was trained at: latent side × the VAE's factor (64 × 8 = 512
        for SD 1.x)."""
        return self.unet.config.sample_size * self.vae.downsampling_factor


def denoising_error(unet, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                    context: torch.Tensor, schedule: NoiseSchedule | None = None) -> torch.Tensor:
    """Per-sample denoising error, shape (B,): mean over (C, H, W) of (ε_θ(z_t, t, c) − ε)².

    The one quantity behind both the SDS loss and the diffusion score on Winoground. Gradients
    flow through the UNet to z0 unless the caller runs this under torch.no_grad().
    """
    schedule = schedule or NoiseSchedule()
    z_t = schedule.add_noise(z0, noise, t)  # z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε
    eps_hat = unet(z_t, t, context)  # ε̂ = ε_θ(z_t, t, c)
    return (eps_hat.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))  # ‖ε̂ − ε‖² / (C·H·W)


class Mapper(nn.Module):
    """h_w: a linear map from CLIP's image embedding (B, D) to the UNet's latent space (B, C, H, W)."""

    def __init__(self, embed_dim: int, latent_shape: tuple[int, int, int] = (4, 64, 64)):
        super().__init__()
        self.latent_shape = tuple(latent_shape)
        channels, height, width = self.latent_shape
        self.proj = nn.Linear(embed_dim, channels * height * width)

    @classmethod
    def for_unet(cls, embed_dim: int, unet) -> "Mapper":
        """The mapper into `unet`'s input: in_channels × sample_size × sample_size (4 × 64 × 64 for SD 1.x)."""
        size = unet.config.sample_size
        return cls(embed_dim, (unet.config.in_channels, size, size))

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.proj(image_embeds).view(-1, *self.latent_shape)  # (B, D) → (B, C, H, W)


@torch.no_grad()
def fit_mapper(mapper: Mapper, image_embeds: torch.Tensor, latents: torch.Tensor,
               ridge: float = 1e-3) -> None:
    """h_w fitted by ridge least squares (in float64) from CLIP image embeddings F (N, D) to the
    images' own latents Z (N, C, H, W), SD's z_0 (the VAE's posterior mean × scaling_factor):

        W, b = argmin Σ_n ‖W f_n + b − z_n‖² + α ‖W‖²,   α = ridge · tr(F̃ᵀF̃) / D   (F̃ = F − f̄)
        W = (F̃ᵀF̃ + α I)⁻¹ F̃ᵀ Z̃,   b = z̄ − W f̄

    A map fixed before training (GenHancer, DCR) cannot collapse to one generic latent, as a map
    trained jointly with L_SDS can (W → 0: the UNet denoises one latent well under any caption)."""
    f, z = image_embeds.double(), latents.flatten(1).double()
    f_mean, z_mean = f.mean(0), z.mean(0)
    f, z = f - f_mean, z - z_mean  # F̃, Z̃
    gram = f.t() @ f  # F̃ᵀF̃, (D, D)
    alpha = ridge * gram.diagonal().mean()  # α = ridge · tr(F̃ᵀF̃) / D
    eye = torch.eye(len(gram), dtype=gram.dtype)
    weight = torch.linalg.solve(gram + alpha * eye, f.t() @ z)  # (D, C·H·W)
    mapper.proj.weight.copy_(weight.t())
    mapper.proj.bias.copy_(z_mean - f_mean @ weight)  # b = z̄ − W f̄


@torch.no_grad()
def r_squared(mapper: Mapper, image_embeds: torch.Tensor, latents: torch.Tensor) -> float:
    """How much of the latents' variance h_w explains: 1 − Σ ‖z − h_w(f)‖² / Σ ‖z − z̄‖²."""
    z = latents.flatten(1).double()
    error = (z - mapper(image_embeds.to(mapper.proj.weight.dtype)).flatten(1).double()).pow(2).sum()
    return 1 - (error / (z - z.mean(0)).pow(2).sum()).item()


def sds_loss(unet, schedule: NoiseSchedule, mapper: Mapper, image_embeds: torch.Tensor,
             context: torch.Tensor, t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             mode: str = "full", generator: torch.Generator | None = None) -> torch.Tensor:
    """The SDS regulariser on CLIP image embeddings f_φ(x) (B, D); returns a scalar.

    z_0 = h_w(f_φ(x)),  z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε,  ε ~ N(0, I),  t ~ U{0, …, 999}
    (t and ε are drawn with `generator` on the CPU when not given).

    mode="full" (the paper's loss as written), differentiated through the frozen UNet:
        L = 1/B Σ_b ‖ε_θ(z_t, t, c) − ε‖² / (C·H·W)
        ∂L/∂z_t = 2/(B·C·H·W) · (∂ε_θ/∂z_t)ᵀ (ε̂ − ε)

    mode="stopgrad" (DreamFusion's SDS), the UNet run under no_grad:
        L = 1/B Σ_b ‖z_t − sg(z_t − (ε̂ − ε))‖² / (C·H·W)
        value:   the same number as mode="full", ‖ε̂ − ε‖² / (C·H·W),
        ∂L/∂z_t = 2/(B·C·H·W) · (ε̂ − ε),
    i.e. the gradient of the full loss with the UNet Jacobian ∂ε_θ/∂z_t replaced by the
    identity, at the same scale, so that one λ serves both modes. DreamFusion's per-timestep
    weight w(t) is 1 here, not its 1 − ᾱ_t: the chain rule already scales by ∂z_t/∂z_0 = √ᾱ_t,
    and with w(t) = 1 the value equals the paper's loss. In both modes the gradient reaches
    θ = (w, φ) through ∂z_t/∂z_0 = √ᾱ_t and z_0 = h_w(f_φ(x)).
    """
    z0 = mapper(image_embeds)  # z_0 = h_w(f_φ(x)), (B, C, H, W)
    batch = z0.shape[0]
    if t is None:
        t = schedule.sample_timesteps(batch, generator)  # t ~ U{0, …, T−1}
    if noise is None:
        noise = torch.randn(z0.shape, generator=generator)  # ε ~ N(0, I)
    t = t.to(z0.device)
    noise = noise.to(z0.device, torch.float32)

    if mode == "full":
        # E ‖ε_θ(z_t, t, c) − ε‖²
        return denoising_error(unet, z0, t, noise, context, schedule).mean()
    if mode == "stopgrad":
        # In float32: z_t − target must not round.
        z_t = schedule.add_noise(z0.float(), noise, t)  # z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε
        with torch.no_grad():
            eps_hat = unet(z_t, t, context).float()  # ε̂ = ε_θ(z_t, t, c), no Jacobian
        target = (z_t - (eps_hat - noise)).detach()  # sg(z_t − (ε̂ − ε))
        return F.mse_loss(z_t, target)  # 1/(B·C·H·W) Σ ‖z_t − target‖²
    raise ValueError(f"sds_loss: mode must be 'full' or 'stopgrad', got {mode!r}")


def encode_prompt(text_encoder, tokenizer, captions: list[str]) -> torch.Tensor:
    """c: the captions through SD's own text encoder, (B, 77, D): the last hidden state after the
    final LayerNorm, with the ids padded as in the model's training: with what its tokenizer's files
    name as pad_token, end-of-text for SD 1.x, "!" (id 0) for SD 2.x. Every position conditions the
    UNet, padding included. `text_encoder` has a `.text_model(ids)`, `tokenizer(texts, pad_token_id=…)`
    returns (B, 77) ids and has `.pad_id` (clip.py's CLIP and Tokenizer)."""
    ids = tokenizer(captions, pad_token_id=tokenizer.pad_id)  # (B, 77): SOT, caption, EOT, padding
    return text_encoder.text_model(ids.to(next(text_encoder.parameters()).device))  # (B, 77, D)


def contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: ½ [CE(logits, diag) + CE(logitsᵀ, diag)], pair i matching pair i."""
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    image_to_text = F.cross_entropy(logits_per_image, labels)  # −1/B Σ_i log softmax_j(s_ij)_i
    text_to_image = F.cross_entropy(logits_per_image.t(), labels)  # −1/B Σ_j log softmax_i(s_ij)_j
    return (image_to_text + text_to_image) / 2


if __name__ == "__main__":
    # Demo with a stand-in UNet (ε̂ = 0.9 z_t): the losses need no weights; train.py loads real ones.
    torch.manual_seed(0)
    schedule = NoiseSchedule()
    print(f"SD 1.x schedule: ᾱ_0 = {schedule.alphas_cumprod[0]:.5f}, "
          f"ᾱ_999 = {schedule.alphas_cumprod[-1]:.5f}")
    mapper = Mapper(512, (4, 8, 8))
    embeds = torch.randn(2, 512)
    toy_unet = lambda z_t, t, c: 0.9 * z_t  # noqa: E731
    # the same t and ε for both modes: the values agree, the gradients differ
    for mode in ("full", "stopgrad"):
        loss = sds_loss(toy_unet, schedule, mapper, embeds, None, mode=mode,
                        generator=torch.Generator().manual_seed(0))
        loss.backward()
        print(f"sds_loss(mode={mode!r}) with a toy UNet: {loss.item():.4f}, "
              f"‖∂L/∂w‖ = {mapper.proj.weight.grad.norm():.4f}")
        mapper.zero_grad()
    print("For real weights run `python weights/download.py`, then `python train.py`.")
