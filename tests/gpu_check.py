"""GPU readiness check, run by hand on one GPU: parity, the training step's speed, memory and MFU, and
the diffusion score's throughput, at full size, with nothing downloaded.

The models are ours at full size with random weights: CLIP ViT-B/32 (clip.CLIP(CLIPConfig())), SD 1.x's
UNet (unet.UNet(UNetConfig())), VAE (vae.VAE(VAEConfig())) and text encoder (the ViT-L/14 text tower),
written once in the official layouts and loaded from there by our loaders, as train.py and
eval_winoground.py load them, and by transformers / diffusers where they are installed. Images are
synthetic; captions go through a byte-level tokenizer (`byte_tokenizer`: no vocabulary file to read).

Sections, in order; each prints its lines as it goes and --out is rewritten after each, so a run cut
short still leaves what it measured:
  device           the GPU, torch, and the bf16 peak FLOP/s that MFU is taken against
  parity           ours on the GPU in fp32 and bf16, and the references where installed, vs ours on the CPU in fp32
  train_step       train.py's step at batch 32 in bf16: --sds_mode full / stopgrad, with and without
                   gradient checkpointing: images/s, peak GPU memory, FLOPs per step, MFU
  coco             the projected time of 5 epochs of COCO 2017 train (118,287 images)
  diffusion_score  UNet inputs/s by batch size; the projected time of Winoground's 400 examples at 20 and
                   100 timesteps (4 × T UNet calls per example, plus the VAE and the text encoder)
  diffusers        the same training step and UNet throughput with diffusers' UNet2DConditionModel

    python tests/gpu_check.py --out out/gpu_check.json        # one H100/H200: a few minutes (budget: 8 min)
    python tests/gpu_check.py --tiny --out /tmp/gpu_check.json  # small configs, batch 2: the CPU, under a minute

--tiny runs every section on small configurations (tests/test_gpu_check.py runs it on the CPU, so that
this script cannot rot); on the CPU, peak memory and MFU are reported as null.
"""

import argparse
import contextlib
import copy
import gc
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clip import CLIP, EOT, SOT, CLIPConfig, TextConfig, Tokenizer, VisionConfig, bytes_to_unicode  # noqa: E402
from eval_winoground import timestep_grid  # noqa: E402
from sds import Mapper, denoising_error, encode_prompt  # noqa: E402
from train import ADAM_BETAS, SDSCLIPLoss, set_trainable  # noqa: E402
from unet import UNet, UNetConfig  # noqa: E402
from vae import VAE, VAEConfig  # noqa: E402
from weights.networks import load_clip, load_unet, load_vae, save_clip, save_unet, save_vae  # noqa: E402
from weights.runs import nonfinite, trained_state  # noqa: E402

COCO_TRAIN_IMAGES = 118_287  # MS-COCO 2017 train
EPOCHS = 5  # the paper's
WINOGROUND_EXAMPLES = 400
CALLS_PER_TIMESTEP = 4  # 2 captions × 2 images: UNet calls per example and timestep
LR = 5e-5  # the paper's; only so that AdamW's step does the work it does in training
# bf16 dense tensor-core peak FLOP/s from the vendors' spec sheets, by a part of torch.cuda.get_device_name()
# (the first that matches). MFU = the step's FLOPs / its time / this figure.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                   ("A100", 312e12))
CAPTIONS = ["a dog chasing a cat across a green lawn", "two people riding bicycles down a city street",
            "a plate of pasta next to a glass of red wine", "a red double-decker bus parked by the road",
            "a small boat on a calm lake at sunset", "a child flying a kite on a sandy beach",
            "a cat asleep on a laptop keyboard", "a man holding an umbrella in the rain"]
# torch's flop counter knows the GPU attention kernels but not the CPU's; the same formulas for it (--tiny).
aten = torch.ops.aten
CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *_, out_shape=None, **__: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *_, out_shape=None, **__: sdpa_backward_flop_count(grad, q, k, v),
} if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward") else {}


@dataclass
class Sizes:
    """What is built and how hard it is driven: full size (the paper's) or --tiny."""
    clip: CLIPConfig
    text_encoder: CLIPConfig  # SD's: a text tower only
    unet: UNetConfig
    vae: VAEConfig
    batch: int  # training pairs per step (paper: 32)
    score_batches: tuple[int, ...]  # UNet batch sizes tried for the diffusion score
    timesteps: tuple[int, ...]  # Winoground projections, T timesteps each
    warmup: int  # untimed calls before each measurement
    repeat: int  # timed calls

    @property
    def resolution(self) -> int:
        """The diffusion score's image side: latent side × the VAE's factor (512 for SD 1.x)."""
        return self.unet.sample_size * 2 ** (len(self.vae.block_out_channels) - 1)


FULL = Sizes(
    clip=CLIPConfig(text=TextConfig(), vision=VisionConfig()),  # ViT-B/32
    text_encoder=CLIPConfig(text=TextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
                            projection_dim=None),  # ViT-L/14's text tower, as in SD 1.x
    unet=UNetConfig(), vae=VAEConfig(), batch=32, score_batches=(8, 16, 32, 40, 64, 80, 100, 128),
    timesteps=(20, 100), warmup=2, repeat=3)
TINY_TEXT = TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
TINY = Sizes(
    clip=CLIPConfig(text=TINY_TEXT, vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                        num_attention_heads=4, image_size=32, patch_size=8),
                    projection_dim=16),
    text_encoder=CLIPConfig(text=TINY_TEXT, projection_dim=None),
    unet=UNetConfig(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=32,
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8),
    vae=VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8),
    batch=2, score_batches=(2, 4), timesteps=(2, 3), warmup=1, repeat=2)


# ----------------------------------------------------------------------------- the recipe


def main(argv=None) -> None:
    args = parse_args(argv)
    sizes, device = (TINY if args.tiny else FULL), torch.device(args.device)
    report = Report(Path(args.out))
    report.add("device", describe_device(device, sizes, args.tiny))
    with tempfile.TemporaryDirectory() as workdir:
        folders = write_models(sizes, Path(workdir), args.seed)
        report.add("parity", check_parity(folders, sizes, device, args.seed))
        models = load_models(folders, device)
        steps = report.add("train_step", measure_train_steps(models, sizes, device, report.peak_flops))
        report.add("coco", project_coco(steps))
        score = report.add("diffusion_score", measure_diffusion_score(models, sizes, device))
        report.add("diffusers", compare_with_diffusers(models, folders, sizes, device, report.peak_flops, steps, score))
    print(f"wrote {args.out}")


def write_models(sizes: Sizes, workdir: Path, seed: int) -> dict[str, Path]:
    """Random weights at `sizes`, written once in the official layouts (what the loaders and the references read)."""
    torch.manual_seed(seed)
    folders = {name: workdir / name for name in ("clip", "text_encoder", "unet", "vae")}
    save_clip(CLIP(sizes.clip), folders["clip"])
    save_clip(CLIP(sizes.text_encoder), folders["text_encoder"])
    save_unet(UNet(sizes.unet), folders["unet"])
    save_vae(VAE(sizes.vae), folders["vae"])
    return folders


def describe_device(device: torch.device, sizes: Sizes, tiny: bool) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next(((key, flops) for key, flops in PEAK_BF16_FLOPS if key in name and device.type == "cuda"), None)
    info = {"name": name, "torch": torch.__version__, "tiny": tiny, "batch": sizes.batch,
            "peak_bf16_tflops": peak[1] / 1e12 if peak else None,
            "peak_source": f"{peak[0]} bf16 dense, vendor spec" if peak else
            f"{'an unknown GPU' if device.type == 'cuda' else 'the CPU'}: MFU not reported"}
    if device.type == "cuda":
        info["memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    say(f"device: {name}, torch {torch.__version__}; MFU against {info['peak_source']}"
        + (f" ({info['peak_bf16_tflops']:.0f} TFLOP/s)" if peak else ""))
    return info


# ----------------------------------------------------------------------------- parity

REFERENCE = {"clip": "transformers", "unet": "diffusers", "vae": "diffusers"}  # the library each module follows


def check_parity(folders: dict[str, Path], sizes: Sizes, device: torch.device, seed: int) -> list[dict]:
    """max |Δ| of each module's output against ours on the CPU in fp32: ours on `device` in fp32 and bf16
    (as train.py and eval_winoground.py run them), then transformers' / diffusers' where installed.
    fp32 here is strict fp32: TF32 is off for this section."""
    inputs = parity_inputs(sizes, seed)
    cpu = {name: run(load_ours(folders, name, torch.device("cpu"), torch.float32), name, inputs, "fp32", "ours")
           for name in ("clip", "unet", "vae")}
    rows = []
    runs = [("ours", name) for name in cpu] + [(REFERENCE[name], name) for name in cpu if installed(REFERENCE[name])]
    for library in sorted({REFERENCE[name] for name in cpu} - {i for i, _ in runs}):
        say(f"parity      {library} is not installed: its rows are left out")
    with strict_fp32():
        for implementation, name in runs:
            for precision in ("fp32", "bf16"):
                # bf16 as the scripts hold them: CLIP in fp32 under autocast (trained), SD's parts in bf16 too
                dtype = torch.bfloat16 if precision == "bf16" and name != "clip" else torch.float32
                model = (load_ours if implementation == "ours" else load_reference)(folders, name, device, dtype)
                got = run(model, name, inputs, precision, implementation)
                for output, ref in cpu[name].items():
                    row = {"output": output, "implementation": implementation, "device": device.type,
                           "precision": precision, "max_abs_diff": (got[output] - ref).abs().max().item(),
                           "output_max_abs": ref.abs().max().item()}
                    rows.append(row)
                    say(f"parity      {output:<10} {implementation:<12} {device.type} {precision}  max |Δ| "
                        f"{row['max_abs_diff']:.2e}  (output max |x| {row['output_max_abs']:.2f})")
                del model
    return rows


def installed(library: str) -> bool:
    return importlib.util.find_spec(library) is not None


def parity_inputs(sizes: Sizes, seed: int) -> dict[str, torch.Tensor]:
    """Two synthetic images (CLIP-normalised noise), two captions, latents, timesteps, a context, VAE images."""
    g = torch.Generator().manual_seed(seed)
    side, latent = sizes.clip.vision.image_size, sizes.unet.sample_size
    return {"pixels": torch.randn(2, 3, side, side, generator=g), "ids": byte_tokenizer()(CAPTIONS[:2]),
            "z": torch.randn(2, sizes.unet.in_channels, latent, latent, generator=g), "t": torch.tensor([100, 700]),
            "context": torch.randn(2, 77, sizes.unet.cross_attention_dim, generator=g),
            "images": torch.rand(1, 3, sizes.resolution, sizes.resolution, generator=g) * 2 - 1}


@torch.no_grad()
def run(model: nn.Module, name: str, x: dict, precision: str, implementation: str) -> dict[str, torch.Tensor]:
    """The module's outputs on `x`, as float32 on the CPU; bf16 under autocast, as the scripts run it."""
    device = next(model.parameters()).device
    x = {key: value.to(device) for key, value in x.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        if name == "clip" and implementation == "ours":
            out = {"clip image": model.encode_image(x["pixels"]), "clip text": model.encode_text(x["ids"])}
        elif name == "clip":
            out = {"clip image": model.get_image_features(pixel_values=x["pixels"]),
                   "clip text": model.get_text_features(input_ids=x["ids"])}
        elif name == "unet":
            out = {"unet": model(x["z"], x["t"], x["context"]) if implementation == "ours" else
                   model(x["z"], x["t"], encoder_hidden_states=x["context"]).sample}
        else:
            posterior = model.encode(x["images"])
            out = {"vae": posterior.mean if implementation == "ours" else posterior.latent_dist.mean}
    return {key: value.float().cpu() for key, value in out.items()}


def load_ours(folders, name: str, device, dtype) -> nn.Module:
    loader = {"clip": load_clip, "unet": load_unet, "vae": load_vae}[name]
    return loader(folders[name], device, dtype)


def load_reference(folders, name: str, device, dtype) -> nn.Module:
    if name == "clip":
        import transformers
        model = transformers.CLIPModel.from_pretrained(folders["clip"])
    else:
        import diffusers
        kind = diffusers.UNet2DConditionModel if name == "unet" else diffusers.AutoencoderKL
        model = kind.from_pretrained(folders[name], low_cpu_mem_usage=False)  # no warning without `accelerate`
    return model.to(device, dtype).eval()


@contextlib.contextmanager
def strict_fp32():
    """TF32 off for matmuls and convolutions (cuDNN allows it by default: fp32 would read as ≈ 1e-3 off)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------- the training step


@dataclass
class Models:
    """On the device as train.py holds them: CLIP in fp32 (trained), SD's parts frozen in bf16."""
    clip: nn.Module
    text_encoder: nn.Module
    unet: nn.Module
    vae: nn.Module


def load_models(folders: dict[str, Path], device: torch.device) -> Models:
    return Models(clip=load_clip(folders["clip"], device),
                  text_encoder=load_clip(folders["text_encoder"], device, torch.bfloat16).requires_grad_(False),
                  unet=load_unet(folders["unet"], device, torch.bfloat16).requires_grad_(False),
                  vae=load_vae(folders["vae"], device, torch.bfloat16).requires_grad_(False))


class TrainStep:
    """One optimizer step of train.py (its loop body without the data loader) on a fixed synthetic batch:
    c = SD's text encoder(y); L = L_CLIP + λ·L_SDS by train.SDSCLIPLoss under bf16 autocast; backward;
    the gradient norm; AdamW on CLIP's LayerNorms and h_w; the finiteness checks."""

    def __init__(self, models: Models, sizes: Sizes, device: torch.device, unet: nn.Module):
        clip = copy.deepcopy(models.clip)
        set_trainable(clip)
        torch.manual_seed(0)
        mapper = Mapper.for_unet(clip.config.projection_dim, models.unet).to(device)  # h_w
        self.objective = SDSCLIPLoss(clip, mapper, sds_weight=0.001, sds_mode="full")
        self.trainable = [p for p in self.objective.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=LR, betas=ADAM_BETAS, weight_decay=0.0)
        self.models, self.unet, self.device, self.batch = models, unet, device, sizes.batch
        self.tokenizer = byte_tokenizer()
        self.captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(sizes.batch)]
        side = sizes.clip.vision.image_size
        self.pixels = torch.randn(sizes.batch, 3, side, side, generator=torch.Generator().manual_seed(1)).to(device)
        self.generator = torch.Generator().manual_seed(2)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def configure(self, sds_mode: str, checkpointing: bool) -> None:
        self.objective.sds_mode = sds_mode
        self.unet.gradient_checkpointing = checkpointing

    def __call__(self) -> float:
        ids = self.tokenizer(self.captions).to(self.device)
        with torch.no_grad(), self.autocast:
            context = encode_prompt(self.models.text_encoder, self.tokenizer, self.captions)  # c, (B, 77, D_c)
        t = self.objective.schedule.sample_timesteps(self.batch, self.generator)
        noise = torch.randn(self.batch, *self.objective.mapper.latent_shape, generator=self.generator)
        with self.autocast:
            loss, _, _ = self.objective(self.pixels, ids, context, t.to(self.device), noise.to(self.device), self.unet)
        if not torch.isfinite(loss).item():
            raise RuntimeError(f"the training step's loss is {loss.item()}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if bad := nonfinite(trained_state(self.objective, self.optimizer)):
            raise RuntimeError(f"AdamW's update left non-finite tensors: {bad[:3]}")
        return loss.item()


def measure_train_steps(models: Models, sizes: Sizes, device: torch.device, peak_flops: float | None) -> list[dict]:
    """Each of --sds_mode full / stopgrad, without and with gradient checkpointing: one step's FLOPs (counted
    without checkpointing: MFU counts the model's FLOPs, not the recomputation), images/s, peak memory."""
    return run_train_steps(TrainStep(models, sizes, device, models.unet), "ours", sizes, device, peak_flops)


def run_train_steps(step: TrainStep, implementation: str, sizes: Sizes, device, peak_flops) -> list[dict]:
    rows = []
    for sds_mode in ("full", "stopgrad"):
        flops = None
        for checkpointing in (False, True):
            step.configure(sds_mode, checkpointing)
            row = {"unet": implementation, "sds_mode": sds_mode, "gradient_checkpointing": checkpointing,
                   "batch": sizes.batch}
            try:
                if not checkpointing:
                    flops = count_flops(step)  # this step is also the first warm-up
                row["flops_per_step"] = flops
                reset_peak_memory(device)
                seconds = timed(step, device, sizes.warmup, sizes.repeat)
            except torch.cuda.OutOfMemoryError:
                step.optimizer.zero_grad(set_to_none=True)
                free_memory(device)
                row["error"] = f"out of GPU memory at batch {sizes.batch}"
                say(f"train step  {implementation:<9} {sds_mode:<8} checkpointing {'on ' if checkpointing else 'off'}: "
                    f"{row['error']}")
                rows.append(row)
                continue
            row |= {"seconds_per_step": seconds, "images_per_s": sizes.batch / seconds,
                    "peak_memory_gib": peak_memory_gib(device),
                    "tflops_per_s": flops / seconds / 1e12 if flops else None,
                    "mfu": flops / seconds / peak_flops if peak_flops and flops else None}
            rows.append(row)
            say(f"train step  {implementation:<9} {sds_mode:<8} checkpointing {'on ' if checkpointing else 'off'}  "
                f"batch {sizes.batch}: {row['images_per_s']:8.1f} images/s  {seconds:7.3f} s/step  "
                f"peak {fmt(row['peak_memory_gib'], '.1f', ' GiB')}  {fmt(flops and flops / 1e12, '.3g', ' TFLOP')}"
                f"/step  MFU {fmt(row['mfu'] and 100 * row['mfu'], '.1f', '%')}")
    step.configure("full", checkpointing=False)  # as train.py's defaults, for what comes next
    return rows


def project_coco(steps: list[dict]) -> list[dict]:
    """Hours for 5 epochs of COCO at each measured step rate (the GPU's work alone: data loading must keep up)."""
    rows = []
    for step in steps:
        if "images_per_s" not in step:
            continue
        hours = EPOCHS * COCO_TRAIN_IMAGES / step["images_per_s"] / 3600
        rows.append({"sds_mode": step["sds_mode"], "gradient_checkpointing": step["gradient_checkpointing"],
                     "images": EPOCHS * COCO_TRAIN_IMAGES, "hours": hours})
        say(f"coco        {step['sds_mode']:<8} checkpointing {'on ' if step['gradient_checkpointing'] else 'off'}: "
            f"{EPOCHS} epochs × {COCO_TRAIN_IMAGES:,} images ≈ {hours:.1f} h")
    return rows


# ----------------------------------------------------------------------------- the diffusion score


def measure_diffusion_score(models: Models, sizes: Sizes, device: torch.device) -> dict:
    """eval_winoground.py's work per example: the VAE on its 2 images, SD's text encoder on its 2 captions,
    and 4 × T denoising errors, batch_size at a time (in bf16, SD held in bf16, as --precision bf16)."""
    unet_rates = unet_throughput(models.unet, sizes, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    images = torch.rand(2, 3, sizes.resolution, sizes.resolution, device=device) * 2 - 1
    tokenizer = byte_tokenizer()
    with torch.no_grad(), autocast:
        vae_s = timed(lambda: models.vae.images_to_latents(images), device, sizes.warmup, sizes.repeat)
        text_s = timed(lambda: encode_prompt(models.text_encoder, tokenizer, CAPTIONS[:2]), device, sizes.warmup,
                       sizes.repeat)
    say(f"diffusion   VAE: {2 / vae_s:.1f} images/s at {sizes.resolution}²; text encoder: {text_s * 1e3:.1f} ms "
        f"per example")
    projections = [project_winoground(unet_rates, timesteps, vae_s + text_s) for timesteps in sizes.timesteps]
    best = max((r for r in unet_rates if "inputs_per_s" in r), key=lambda r: r["inputs_per_s"])
    return {"unet": unet_rates, "best_batch": best["batch"], "unet_inputs_per_s": best["inputs_per_s"],
            "vae_images_per_s": 2 / vae_s, "text_encoder_s_per_example": text_s, "winoground": projections}


def unet_throughput(unet: nn.Module, sizes: Sizes, device: torch.device, label: str = "ours") -> list[dict]:
    """UNet inputs/s for each batch size in sizes.score_batches: denoising_error, as eval_winoground calls it."""
    rows = []
    for batch in sizes.score_batches:
        seconds = time_denoising(unet, sizes, device, batch)
        row = {"batch": batch} | ({"error": "out of GPU memory"} if seconds is None else
                                  {"seconds_per_batch": seconds, "inputs_per_s": batch / seconds})
        rows.append(row)
        say(f"diffusion   UNet {label:<9} batch {batch:4d}: "
            + (row.get("error") or f"{batch / seconds:8.1f} inputs/s"))
    return rows


@torch.no_grad()
def time_denoising(unet: nn.Module, sizes: Sizes, device: torch.device, batch: int) -> float | None:
    g = torch.Generator().manual_seed(batch)
    side = sizes.unet.sample_size
    z0 = torch.randn(batch, sizes.unet.in_channels, side, side, generator=g).to(device)
    noise = torch.randn(z0.shape, generator=g).to(device)
    t = timestep_grid(batch).to(device)
    context = torch.randn(batch, 77, sizes.unet.cross_attention_dim, generator=g).to(device, torch.bfloat16)
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return timed(lambda: denoising_error(unet, z0, t, noise, context), device, sizes.warmup, sizes.repeat)
    except torch.cuda.OutOfMemoryError:
        free_memory(device)
        return None


def project_winoground(unet_rates: list[dict], timesteps: int, other_s: float) -> dict:
    """Hours for Winoground at T timesteps with the best measured batch size: an example's 4T UNet calls run
    in ⌈4T / b⌉ batches (eval_winoground.py batches within an example), plus `other_s` per example."""
    calls = CALLS_PER_TIMESTEP * timesteps
    per_example = {r["batch"]: math.ceil(calls / r["batch"]) * r["seconds_per_batch"] + other_s
                   for r in unet_rates if "seconds_per_batch" in r}
    batch = min(per_example, key=per_example.get)
    hours = WINOGROUND_EXAMPLES * per_example[batch] / 3600
    say(f"diffusion   Winoground, {timesteps} timesteps ({calls} UNet calls per example): {hours * 60:.1f} min "
        f"with --batch_size {batch}")
    return {"timesteps": timesteps, "unet_calls_per_example": calls, "batch_size": batch,
            "seconds_per_example": per_example[batch], "hours": hours}


# ----------------------------------------------------------------------------- diffusers


class DiffusersUNet(nn.Module):
    """diffusers' UNet2DConditionModel behind our UNet's call, unet(z_t, t, c) → ε̂, for sds_loss and
    denoising_error; `gradient_checkpointing` switches diffusers' own."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(z_t, t, encoder_hidden_states=context).sample

    @property
    def gradient_checkpointing(self) -> bool:
        return self.unet.is_gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.unet.enable_gradient_checkpointing() if on else self.unet.disable_gradient_checkpointing()


def compare_with_diffusers(models: Models, folders, sizes: Sizes, device, peak_flops, steps: list[dict],
                           score: dict) -> dict:
    """The training step and the UNet throughput with diffusers' UNet in place of ours (same weights, bf16);
    ratio = ours / diffusers for time and memory (< 1: ours is faster or smaller)."""
    if not installed("diffusers"):
        say("diffusers   not installed: section left out")
        return {"skipped": "diffusers is not installed"}
    reference = DiffusersUNet(load_reference(folders, "unet", device, torch.bfloat16).requires_grad_(False))
    theirs = run_train_steps(TrainStep(models, sizes, device, reference), "diffusers", sizes, device, peak_flops)
    rows = []
    for ours, ref in zip(steps, theirs):
        row = {key: ours[key] for key in ("sds_mode", "gradient_checkpointing")}
        if "seconds_per_step" in ours and "seconds_per_step" in ref:
            row["time_ratio"] = ours["seconds_per_step"] / ref["seconds_per_step"]
            if ours["peak_memory_gib"] is not None:
                row["memory_ratio"] = ours["peak_memory_gib"] / ref["peak_memory_gib"]
            say(f"diffusers   train step {row['sds_mode']:<8} checkpointing "
                f"{'on ' if row['gradient_checkpointing'] else 'off'}: time ours/diffusers {row['time_ratio']:.2f}"
                + (f", peak memory {row['memory_ratio']:.2f}" if "memory_ratio" in row else ""))
        rows.append(row)
    batch = score["best_batch"]
    seconds = time_denoising(reference, sizes, device, batch)
    unet = {"batch": batch, "ours_inputs_per_s": score["unet_inputs_per_s"]}
    if seconds is not None:
        unet |= {"diffusers_inputs_per_s": batch / seconds, "time_ratio": batch / score["unet_inputs_per_s"] / seconds}
        say(f"diffusers   UNet batch {batch}: {batch / seconds:.1f} inputs/s; "
            f"time ours/diffusers {unet['time_ratio']:.2f}")
    return {"train_step": theirs, "train_step_ratio": rows, "unet": unet}


# ----------------------------------------------------------------------------- plumbing


def byte_tokenizer() -> Tokenizer:
    """clip.Tokenizer with no merges: one token per byte (no vocabulary file to read), and CLIP's start and
    end ids, so that the towers see the real ids' layout; captions come out about 3× as long as with BPE
    (the text towers are a few per cent of a step's FLOPs)."""
    symbols = list(bytes_to_unicode().values())
    encoder = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])} | {SOT: 49406, EOT: 49407}
    return Tokenizer(encoder, merges=[])


def count_flops(fn) -> int:
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def timed(fn, device: torch.device, warmup: int, repeat: int) -> float:
    """Seconds per call of fn(): the mean of `repeat` calls after `warmup`, the GPU's queue drained around them."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeat


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """The peak of memory held by tensors (not the allocator's cache) since the last reset; None on the CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fmt(value, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def say(line: str) -> None:
    print(line, flush=True)


class Report:
    """The sections measured so far, rewritten to `path` (atomically) after each one."""

    def __init__(self, path: Path):
        self.path, self.sections = path, {}
        path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def peak_flops(self) -> float | None:
        tflops = self.sections.get("device", {}).get("peak_bf16_tflops")
        return tflops * 1e12 if tflops else None

    def add(self, name: str, value):
        self.sections[name] = value
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.sections, indent=1, allow_nan=False) + "\n")
        os.replace(tmp, self.path)
        return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/gpu_check.json", help="the JSON file of every section's figures")
    p.add_argument("--tiny", action="store_true", help="small configs, batch 2: every section in seconds (the CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--seed", type=int, default=0, help="seeds the random weights and inputs")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA GPU here; run with --tiny --device cpu for the "
                f"small check")
    if device.type == "cpu" and not args.tiny:
        p.error("no CUDA GPU: the full-size check would take hours on the CPU; pass --tiny for the small configs")
    return args


if __name__ == "__main__":
    main()
