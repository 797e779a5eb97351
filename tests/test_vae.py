"""vae.py against diffusers' AutoencoderKL: same random weights, saved by diffusers' save_pretrained."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.unets.unet_2d_blocks import AttnDownEncoderBlock2D
from safetensors.torch import load_file, save_file

from vae import VAE, DiagonalGaussian, VAEConfig
from weights.networks import FP16_WEIGHTS_NAME, WEIGHTS_NAME, load_vae, load_vae_config

REPO = Path(__file__).resolve().parent.parent

# vae/config.json of CompVis/stable-diffusion-v1-4 as published on the Hugging Face hub.
SD14_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.2.2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD14_PARAMETERS = 83_653_863
SD14_TENSORS = 248

SMALL = dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=16)
SMALL_3_LEVELS = dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, scaling_factor=0.5)


def diffusers_vae(block_out_channels, **config) -> AutoencoderKL:
    """A diffusers AutoencoderKL whose every parameter is random (GroupNorms too: they start at 1 and 0)."""
    levels = len(block_out_channels)
    ref = AutoencoderKL(block_out_channels=block_out_channels, down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, **config).eval()
    with torch.no_grad():
        for module in ref.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    return ref


def saved(ref: AutoencoderKL, folder: Path, **kwargs) -> Path:
    ref.save_pretrained(folder, **kwargs)
    return folder


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(ours, diffusers) from one small random checkpoint in the official layout."""
    torch.manual_seed(0)
    ref = diffusers_vae(**SMALL)
    folder = saved(ref, tmp_path_factory.mktemp("vae"))
    return load_vae(folder), ref, folder


def images(*shape) -> torch.Tensor:
    return torch.rand(*shape) * 2 - 1


# --- numeric parity -----------------------------------------------------------------------------


@pytest.mark.parametrize("config", [SMALL, SMALL_3_LEVELS], ids=["2 levels", "3 levels"])
def test_encode_decode_parity(parity, tmp_path, config):
    ref = diffusers_vae(**config)
    ours = load_vae(saved(ref, tmp_path))
    f = ours.downsampling_factor
    x = images(2, 3, 6 * f, 4 * f)  # batch 2, not square
    z = torch.randn(2, 4, 5, 7)
    with torch.no_grad():
        posterior, expected = ours.encode(x), ref.encode(x).latent_dist
        name = f"vae {len(config['block_out_channels'])} levels b2 {6 * f}x{4 * f} fp32"
        parity(f"{name} encode mean", posterior.mean, expected.mean)
        parity(f"{name} encode std", posterior.std, expected.std)
        parity(f"{name} encode logvar", posterior.logvar, expected.logvar)
        parity(f"{name} decode", ours.decode(z), ref.decode(z).sample)


def test_gradients_match_diffusers(parity, small):
    """The in-place SiLU and residual adds must leave autograd's saved tensors intact."""
    ours, ref, _ = small
    x, z = images(2, 3, 8, 8), torch.randn(2, 4, 4, 4)
    grads = []
    for encode, decode in [(lambda v: ours.encode(v).mean, ours.decode),
                           (lambda v: ref.encode(v).latent_dist.mean, lambda v: ref.decode(v).sample)]:
        xi, zi = x.clone().requires_grad_(), z.clone().requires_grad_()
        (encode(xi).square().sum() + decode(zi).square().sum()).backward()
        grads.append((xi.grad, zi.grad))
    parity("vae d(encode)/d(images)", grads[0][0], grads[1][0])
    parity("vae d(decode)/d(latents)", grads[0][1], grads[1][1])


def test_bfloat16_load(parity, small):
    ours_fp32, _, folder = small
    ours_bf16 = load_vae(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours_bf16.parameters())
    x = images(1, 3, 16, 16)
    with torch.no_grad():
        got = ours_bf16.encode(x.bfloat16()).mean.float()
        # bfloat16 keeps 8 significant bits (rounding 2^-8 ≈ 4e-3 per step), latents |max| ≈ 0.8
        parity("vae loaded as bfloat16 vs fp32", got, ours_fp32.encode(x).mean, atol=5e-2)


def test_scaled_latent_helpers_follow_config(parity, tmp_path):
    ref = diffusers_vae(**SMALL_3_LEVELS)  # scaling_factor 0.5, read from config.json
    ours = load_vae(saved(ref, tmp_path))
    assert ours.config.scaling_factor == 0.5
    x, z = images(1, 3, 16, 24), torch.randn(1, 4, 4, 6)
    with torch.no_grad():
        parity("vae images_to_latents (mean × scaling)", ours.images_to_latents(x),
               ref.encode(x).latent_dist.mean * 0.5)
        parity("vae latents_to_images (÷ scaling, decode)", ours.latents_to_images(z), ref.decode(z / 0.5).sample)


def test_sample_matches_diffusers_with_same_generator(parity, small):
    ours, ref, _ = small
    x = images(2, 3, 16, 16)
    with torch.no_grad():
        expected = ref.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(7))
        got = ours.encode(x).sample(generator=torch.Generator().manual_seed(7))
        other_seed = ours.encode(x).sample(generator=torch.Generator().manual_seed(8))
        sampled_latents = ours.images_to_latents(x, sample=True, generator=torch.Generator().manual_seed(7))
    parity("vae sample(generator seed 7)", got, expected)
    parity("vae images_to_latents(sample=True)", sampled_latents, expected * ours.config.scaling_factor)
    assert (other_seed - expected).abs().max() > 1e-3  # the noise really comes from the generator


def test_logvar_clamped_like_diffusers(parity):
    moments = torch.randn(2, 8, 3, 3) * 40  # log-variances far outside (-30, 20)
    ours, ref = DiagonalGaussian(moments), DiagonalGaussianDistribution(moments)
    assert ours.logvar.min() == -30 and ours.logvar.max() == 20
    parity("vae clamped logvar", ours.logvar, ref.logvar, atol=0)
    parity("vae std from clamped logvar", ours.std, ref.std, atol=0)


# --- structure and full size ------------------------------------------------------------------


def test_sd14_config_has_diffusers_keys_shapes_and_parameter_count(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SD14_VAE_CONFIG))
    config = load_vae_config(tmp_path / "config.json")
    assert config == VAEConfig()  # the defaults are SD 1.x, scaling factor 0.18215 included
    with torch.device("meta"):
        ours, ref = VAE(config), AutoencoderKL.from_config(SD14_VAE_CONFIG)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes
    assert len(ours_shapes) == SD14_TENSORS
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == SD14_PARAMETERS


@pytest.mark.full
def test_full_size_sd14_vae_parity_from_bare_file(parity, tmp_path):
    ref = AutoencoderKL.from_config(SD14_VAE_CONFIG).eval()
    ours = load_vae(saved(ref, tmp_path) / WEIGHTS_NAME)  # a bare file: SD 1.x config assumed and checked
    x, z = images(1, 3, 64, 64), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        posterior, expected = ours.encode(x), ref.encode(x).latent_dist
        parity("vae SD1.x full size 64x64 encode mean", posterior.mean, expected.mean)
        parity("vae SD1.x full size 64x64 encode std", posterior.std, expected.std)
        parity("vae SD1.x full size 64x64 decode", ours.decode(z), ref.decode(z).sample)


# --- other file layouts ---------------------------------------------------------------------


def test_legacy_attention_names_load(parity, small, tmp_path):
    ours, ref, folder = small
    state_dict = load_file(folder / WEIGHTS_NAME)
    legacy = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    for new, old in legacy.items():
        state_dict = {k.replace(f"attentions.0.{new}", f"attentions.0.{old}"): v for k, v in state_dict.items()}
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in state_dict
    assert not any("to_q" in k or "to_out" in k for k in state_dict)
    save_file(state_dict, tmp_path / WEIGHTS_NAME)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())

    legacy_ours, legacy_ref = load_vae(tmp_path), AutoencoderKL.from_pretrained(tmp_path).eval()
    x = images(1, 3, 16, 16)
    with torch.no_grad():
        parity("vae legacy query/key/value/proj_attn file vs our new-name load",
               legacy_ours.encode(x).mean, ours.encode(x).mean, atol=0)
        z = torch.randn(1, 4, 4, 4)
        parity("vae legacy file, ours vs diffusers decode", legacy_ours.decode(z), legacy_ref.decode(z).sample)


def test_fp16_variant_loads_as_fp32(parity, tmp_path):
    ref = diffusers_vae(**SMALL)
    x = images(1, 3, 16, 16)
    with torch.no_grad():
        fp32_original = ref.encode(x).latent_dist.mean
    saved(ref.half(), tmp_path, variant="fp16")
    assert not (tmp_path / WEIGHTS_NAME).exists() and (tmp_path / FP16_WEIGHTS_NAME).exists()
    ours = load_vae(tmp_path)
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    ref_fp16_weights = AutoencoderKL.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        parity("vae fp16 variant loaded as fp32 vs diffusers", ours.encode(x).mean,
               ref_fp16_weights.encode(x).latent_dist.mean)
        # fp16 keeps 11 significant bits (each weight rounds by up to 2^-11 ≈ 5e-4 of itself): the
        # latents (|max| ≈ 0.8 here) move by well under 5e-3
        parity("vae fp16 variant vs the fp32 weights it came from", ours.encode(x).mean, fp32_original, atol=5e-3)


# --- errors a user can act on -----------------------------------------------------------------


def test_missing_paths(tmp_path, small):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*python weights/download.py"):
        load_vae(tmp_path / "nowhere")
    (tmp_path / "sd" / "vae").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"sd/config.json not found: for a Stable Diffusion folder, "
                                                r"pass .*sd/vae"):
        load_vae(tmp_path / "sd")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config.json not found"):
        load_vae(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text((small[2] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=rf"empty holds neither {WEIGHTS_NAME} nor {FP16_WEIGHTS_NAME}"):
        load_vae(tmp_path / "empty")


def test_truncated_and_corrupt_files(tmp_path, small):
    data = (small[2] / WEIGHTS_NAME).read_bytes()
    for name, content in [("truncated.safetensors", data[: len(data) // 2]), ("garbage.safetensors", b"\x00" * 64)]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"{name} is not a readable safetensors file.*truncated or corrupt"):
            load_vae(tmp_path / name)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json is not readable JSON"):
        load_vae(tmp_path)


def test_unet_and_clip_files_are_refused(tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8)
    unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match=r"unet/config.json describes a UNet2DConditionModel"):
        load_vae(tmp_path / "unet")
    with pytest.raises(ValueError, match=r"unet/diffusion_pytorch_model.safetensors does not match.*a UNet or "
                                         r"CLIP file.*missing keys \[decoder.conv_in.bias.*unexpected keys "
                                         r"\[conv_in.bias"):
        load_vae(tmp_path / "unet" / WEIGHTS_NAME)

    CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
                                 vocab_size=100)).save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match=r"clip/model.safetensors does not match.*a UNet or CLIP file.*"
                                         r"unexpected keys \[text_model.embeddings"):
        load_vae(tmp_path / "clip" / "model.safetensors")


@pytest.mark.parametrize("config, message", [
    ([1, 2], r"holds a JSON list, not an object"),
    ({"layers_per_block": "2"}, r"sets layers_per_block = '2', which is not of type int"),
    ({"block_out_channels": [32, "64"]}, r"sets block_out_channels = \[32, '64'\], which is not of type tuple"),
    ({"scaling_factor": "0.5"}, r"sets scaling_factor = '0.5', which is not of type float"),
    ({"block_out_channels": []}, r"sets block_out_channels = \[\], which must list at least one width"),
    ({"scaling_factor": 0}, r"sets scaling_factor = 0, which must be a positive finite number"),
    ({"scaling_factor": -0.18215}, r"sets scaling_factor = -0.18215, which must be a positive finite number"),
    ({"scaling_factor": float("nan")}, r"sets scaling_factor = nan, which must be a positive finite number"),
])
def test_config_of_the_wrong_shape_or_type(tmp_path, small, config, message):
    """Not an object, or "2" for an int: one sentence naming the file and the field, not an AttributeError
    or a TypeError from inside torch."""
    raw = config if isinstance(config, list) else {**json.loads((small[2] / "config.json").read_text()), **config}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / WEIGHTS_NAME).write_bytes((small[2] / WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match=rf"config.json {message}.*python weights/download.py"):
        load_vae(tmp_path)


def test_text_encoder_folder_says_what_it_is(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    (tmp_path / "sd" / "vae").mkdir(parents=True)
    CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
                                 vocab_size=100)).save_pretrained(tmp_path / "sd" / "text_encoder")
    with pytest.raises(ValueError, match=r"text_encoder/config.json describes a CLIP text encoder \(transformers' "
                                         rf"CLIPTextModel\), not a VAE; pass the vae/ folder of a Stable Diffusion "
                                         rf"checkpoint \({tmp_path / 'sd' / 'vae'}\)"):
        load_vae(tmp_path / "sd" / "text_encoder")


def test_non_finite_weights_are_named(tmp_path, small):
    state_dict = load_file(small[2] / WEIGHTS_NAME)
    state_dict["decoder.mid_block.attentions.0.to_v.bias"][0] = float("nan")
    state_dict["encoder.conv_in.weight"][1, 2, 0, 0] = -float("inf")
    save_file(state_dict, tmp_path / WEIGHTS_NAME)
    (tmp_path / "config.json").write_text((small[2] / "config.json").read_text())
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.safetensors holds NaN or infinite values in 2 "
                                         r"tensor\(s\) \[decoder.mid_block.attentions.0.to_v.bias, "
                                         r"encoder.conv_in.weight\]; the file is damaged"):
        load_vae(tmp_path)


def test_missing_and_unexpected_keys_are_named(tmp_path, small):
    state_dict = load_file(small[2] / WEIGHTS_NAME)
    del state_dict["decoder.up_blocks.1.resnets.2.norm2.weight"]
    state_dict["encoder.extra.weight"] = torch.zeros(1)
    save_file(state_dict, tmp_path / WEIGHTS_NAME)
    (tmp_path / "config.json").write_text((small[2] / "config.json").read_text())
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.safetensors does not match.*1 missing keys "
                                         r"\[decoder.up_blocks.1.resnets.2.norm2.weight\] and 1 unexpected keys "
                                         r"\[encoder.extra.weight\]"):
        load_vae(tmp_path)


def test_wrong_shapes_are_named(tmp_path, small):
    config = json.loads((small[2] / "config.json").read_text())
    config["latent_channels"] = 8  # the file was saved with 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / WEIGHTS_NAME).write_bytes((small[2] / WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.safetensors has 7 tensors of the wrong shape for "
                                         r"the VAE that .*config.json describes: \[decoder.conv_in.weight "
                                         r"\(64, 4, 3, 3\) ≠ \(64, 8, 3, 3\)"):
        load_vae(tmp_path)


def test_bare_file_of_another_config_is_refused(small):
    with pytest.raises(ValueError, match=r"does not match the SD 1.x VAE \(assumed for a bare file.*: 94 missing keys "
                                         r"\[decoder.up_blocks.1.upsamplers.0.conv.bias"):
        load_vae(small[2] / WEIGHTS_NAME)


def test_other_designs_are_refused(tmp_path, small):
    config = json.loads((small[2] / "config.json").read_text())
    (tmp_path / WEIGHTS_NAME).write_bytes((small[2] / WEIGHTS_NAME).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({**config, "act_fn": "gelu"}))
    with pytest.raises(ValueError, match=r"config.json describes a AutoencoderKL with act_fn gelu"):
        load_vae(tmp_path)
    # an attention block per level: the file's extra attention keys are named
    ref = diffusers_vae(**SMALL)
    ref.encoder.down_blocks[0] = AttnDownEncoderBlock2D(32, 32, num_layers=2, resnet_groups=16, attention_head_dim=32)
    ref.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"does not match the VAE that .*config.json describes: 20 unexpected keys "
                                         r"\[encoder.down_blocks.0.attentions.0.group_norm"):
        load_vae(tmp_path)


def test_bad_image_and_latent_shapes(small):
    ours = small[0]
    for bad in [torch.zeros(3, 16, 16), torch.zeros(1, 1, 16, 16), torch.zeros(1, 3, 16, 15)]:
        message = f"expects images of shape (B, 3, H, W) with H and W multiples of 2, got {tuple(bad.shape)}"
        with pytest.raises(ValueError, match=re.escape(message)):
            ours.encode(bad)
    with pytest.raises(ValueError, match=r"expects latents of shape \(B, 4, h, w\), got \(1, 3, 8, 8\)"):
        ours.decode(torch.zeros(1, 3, 8, 8))


# --- the demo -------------------------------------------------------------------------------


def test_demo_round_trip_and_missing_weights(tmp_path, small):
    from PIL import Image

    Image.fromarray((torch.rand(40, 60, 3) * 255).byte().numpy()).save(tmp_path / "image.png")
    demo = [sys.executable, str(REPO / "vae.py"), str(tmp_path / "image.png")]
    run = subprocess.run(demo + ["--vae", str(small[2]), "--size", "32"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "latents (1, 4, 16, 16)" in run.stdout and "PSNR" in run.stdout
    run = subprocess.run(demo + ["--vae", str(tmp_path / "no-weights")], capture_output=True, text=True, cwd=REPO)
    assert run.returncode != 0 and "no-weights not found; run `python weights/download.py`" in run.stderr
    run = subprocess.run(demo[:2] + [str(tmp_path / "no-image.png")], capture_output=True, text=True, cwd=REPO)
    assert run.returncode != 0 and "no-image.png not found: pass the path to an image file" in run.stderr
