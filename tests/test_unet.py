"""unet.py against diffusers' UNet2DConditionModel: same random weights, saved by diffusers' own
save_pretrained, loaded with load_unet; outputs and input gradients compared number for number."""

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from unet import UNet, UNetConfig
from weights.networks import load_unet, load_unet_config

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = "diffusion_pytorch_model.safetensors"
# CompVis/stable-diffusion-v1-4 unet/config.json (diffusers layout), the fields that shape the model.
SD14_CONFIG = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                               "DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
SD14_PARAMETERS, SD14_TENSORS = 859_520_964, 686
CONTEXT_DIM = 48  # small configs' text width
SMALL = dict(  # SD 1.x design at toy size: a cross-attention level, a plain level; 4 heads of 8 and of 16
    block_out_channels=(32, 64), layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CONTEXT_DIM, norm_num_groups=8,
    attention_head_dim=4, sample_size=16,
)
SMALL_CONFIGS = {
    "sd1 layers=2": SMALL,
    "sd1 layers=1 3 levels": dict(SMALL, layers_per_block=1, block_out_channels=(32, 64, 64),
                                  down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2),
    "sd2 linear proj, heads [2, 4]": dict(SMALL, down_block_types=("CrossAttnDownBlock2D",) * 2,
                                          up_block_types=("CrossAttnUpBlock2D",) * 2, attention_head_dim=[2, 4],
                                          use_linear_projection=True),
}


def make_reference(folder: Path, variant: str | None = None, **config) -> UNet2DConditionModel:
    """A diffusers UNet with every parameter randomised (norm weights and zero biases too, so that
    no part of the comparison is trivial), saved to `folder` with diffusers' save_pretrained."""
    ref = UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(folder, safe_serialization=True, variant=variant)
    return ref


def inputs(batch=2, height=16, width=24, context_dim=CONTEXT_DIM):
    return torch.randn(batch, 4, height, width), torch.randn(batch, 77, context_dim)


@pytest.mark.parametrize("name", SMALL_CONFIGS)
def test_small_matches_diffusers(parity, tmp_path, name):
    ref = make_reference(tmp_path, **SMALL_CONFIGS[name])
    ours = load_unet(tmp_path)
    latents, context = inputs()  # batch 2, non-square 16×24
    timesteps = {"t=0": 0, "t=500": 500, "t=999": 999, "t=tensor(250)": torch.tensor(250),
                 "t=[3, 977]": torch.tensor([3, 977])}
    with torch.no_grad():
        for label, t in timesteps.items():
            parity(f"unet {name} {label} b2 16x24 fp32", ours(latents, t, context),
                   ref(latents, t, context).sample)


def test_fp16_variant_file(parity, tmp_path):
    """diffusion_pytorch_model.fp16.safetensors alone in the folder; loaded as fp32 it equals the fp16-rounded model."""
    ref = UNet2DConditionModel(**SMALL).eval()
    ref.half().save_pretrained(tmp_path, variant="fp16")
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["diffusion_pytorch_model.fp16.safetensors"]
    ours = load_unet(tmp_path)
    ref.float()
    latents, context = inputs()
    with torch.no_grad():
        parity("unet sd1 small, fp16 file loaded as fp32", ours(latents, 300, context),
               ref(latents, 300, context).sample)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_gradient_to_latents_matches_diffusers(parity, tmp_path, checkpointing):
    ref = make_reference(tmp_path, **SMALL)
    ours = load_unet(tmp_path)
    ours.gradient_checkpointing = checkpointing
    ours.requires_grad_(False)
    ref.requires_grad_(False)
    latents, context = inputs()
    weights = torch.randn(2, 4, 16, 24)  # a random linear functional of the output: its gradient is generic
    grads = []
    for model in (ours, lambda *a: ref(*a).sample):
        x = latents.clone().requires_grad_(True)
        (model(x, torch.tensor([10, 700]), context) * weights).sum().backward()
        grads.append(x.grad)
    parity(f"unet sd1 small d/dlatents, checkpointing={checkpointing}", *grads)


def test_gradient_checkpointing_saves_fewer_activations(tmp_path):
    """With checkpointing, autograd keeps only each layer's inputs, not everything inside the layers."""
    make_reference(tmp_path, **SMALL)
    ours = load_unet(tmp_path).requires_grad_(False)
    latents, context = inputs()

    def saved_bytes():
        total = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel()) or t, lambda t: t):
            ours(latents.clone().requires_grad_(True), 500, context).sum()
        return sum(total)

    plain = saved_bytes()
    ours.gradient_checkpointing = True
    assert saved_bytes() < plain / 3


def test_full_config_has_diffusers_keys_and_shapes():
    """The real SD 1.x config: 686 tensors with diffusers' names and shapes, 859,520,964 parameters (meta device)."""
    with torch.device("meta"):
        ref = UNet2DConditionModel(**SD14_CONFIG)
        ours = UNet(UNetConfig(**{k: v for k, v in SD14_CONFIG.items() if k in UNetConfig.__dataclass_fields__}))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    assert len(our_shapes) == SD14_TENSORS
    assert sum(p.numel() for p in ours.parameters()) == SD14_PARAMETERS


def test_config_json_of_sd14_reads_as_defaults(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **SD14_CONFIG}))
    assert load_unet_config(tmp_path / "config.json") == UNetConfig()


@pytest.mark.full
def test_full_sd1_forward_matches_diffusers(parity, tmp_path):
    """The full-size SD 1.x UNet at 64×64 latents, batch 1, loaded from the bare .safetensors file.
    One model in memory at a time: build and save diffusers', run ours, then diffusers' from the file."""
    UNet2DConditionModel(**SD14_CONFIG).save_pretrained(tmp_path)  # diffusers' default init: nothing zero
    gc.collect()
    latents, context = torch.randn(1, 4, 64, 64), torch.randn(1, 77, 768)
    ours = load_unet(tmp_path / WEIGHTS)
    with torch.no_grad():
        out = ours(latents, 321, context)
    del ours
    gc.collect()
    ref = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = ref(latents, 321, context).sample
    parity("unet SD1.x full size 64x64 t=321 fp32", out, expected, atol=1e-4)


# --- bad inputs: one clear error naming the file and the keys ---


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="download.py"):
        load_unet(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_unet(tmp_path)
    make_reference(tmp_path, **SMALL)
    (tmp_path / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*{WEIGHTS}.*download.py"):
        load_unet(tmp_path)


def test_truncated_file(tmp_path):
    make_reference(tmp_path, **SMALL)
    data = (tmp_path / WEIGHTS).read_bytes()
    (tmp_path / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{WEIGHTS}.*truncated or corrupt.*download.py"):
        load_unet(tmp_path)


def test_file_of_another_family(tmp_path):
    AutoencoderKL(block_out_channels=(32,), norm_num_groups=8).save_pretrained(tmp_path / "vae")
    file = tmp_path / "vae" / WEIGHTS
    with pytest.raises(ValueError, match=rf"{file}.*holds no UNet weights.*missing keys \[.*conv_in.weight.*"
                                         r"unexpected keys \[.*decoder\."):
        load_unet(file)


def test_missing_and_unexpected_keys(tmp_path):
    make_reference(tmp_path, **SMALL)
    state = load_file(tmp_path / WEIGHTS)
    state["extra.weight"] = state.pop("mid_block.attentions.0.proj_in.weight")
    save_file(state, tmp_path / WEIGHTS)
    with pytest.raises(ValueError, match=r"1 missing keys \[mid_block.attentions.0.proj_in.weight\] "
                                         r"and 1 unexpected keys \[extra.weight\]"):
        load_unet(tmp_path)


def test_wrong_shapes(tmp_path):
    make_reference(tmp_path, **SMALL)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 32}))
    key = r"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight \(32, 48\) ≠ \(32, 32\)"
    with pytest.raises(ValueError, match=rf"{WEIGHTS} has 12 tensors of the wrong shape.*config.json.*{key}"):
        load_unet(tmp_path)


def test_bare_file_of_a_small_model_is_checked_against_sd1(tmp_path):
    make_reference(tmp_path, **SMALL)
    with pytest.raises(ValueError, match=rf"{WEIGHTS} does not match the SD 1.x UNet.*"
                                         r"382 missing keys \[down_blocks.1.attentions.0.norm.bias"):
        load_unet(tmp_path / WEIGHTS)


@pytest.mark.parametrize("field, value", [("addition_embed_type", "text_time"), ("transformer_layers_per_block", 2),
                                          ("transformer_layers_per_block", [1, 2]), ("num_class_embeds", 10),
                                          ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"])])
def test_unsupported_config(tmp_path, field, value):
    make_reference(tmp_path, **SMALL)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=rf"config.json sets {field} = .*does not implement"):
        load_unet(tmp_path)


@pytest.mark.parametrize("config, message", [
    ("[]", r"holds a JSON list, not an object"),
    ('"unet"', r"holds a JSON str, not an object"),
    ({"layers_per_block": "2"}, r"sets layers_per_block = '2', which is not of type int"),
    ({"attention_head_dim": "4"}, r"sets attention_head_dim = '4', which is not of type int \| tuple"),
    ({"block_out_channels": [32.5, 64]}, r"sets block_out_channels = \[32.5, 64\], which is not of type tuple"),
    ({"use_linear_projection": 1}, r"sets use_linear_projection = 1, which is not of type bool"),
    ({"block_out_channels": []}, r"sets block_out_channels = \[\], which must list at least one width"),
])
def test_config_of_the_wrong_shape_or_type(tmp_path, config, message):
    make_reference(tmp_path, **SMALL)
    raw = config if isinstance(config, str) else json.dumps({**json.loads((tmp_path / "config.json").read_text()),
                                                             **config})
    (tmp_path / "config.json").write_text(raw)
    with pytest.raises(ValueError, match=rf"config.json {message}"):
        load_unet(tmp_path)


@pytest.mark.parametrize("config, block, width, heads", [
    (dict(SMALL, attention_head_dim=3), 0, 32, 3),  # the cross-attention level
    (SMALL_CONFIGS["sd2 linear proj, heads [2, 4]"] | {"attention_head_dim": [2, 5]}, 1, 64, 5),  # per block
    (dict(SMALL, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
          attention_head_dim=[4, 6]), 1, 64, 6),  # only the mid block attends
])
def test_heads_that_do_not_divide_the_width_are_refused_at_load(tmp_path, config, block, width, heads):
    """Accepted before, these failed at the first forward (a reshape error from inside the attention)."""
    good = {**config, "attention_head_dim": 2}
    make_reference(tmp_path, **good)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "attention_head_dim": config["attention_head_dim"]}))
    with pytest.raises(ValueError, match=rf"config.json gives block {block} \(width {width}\) {heads} attention "
                                         r"heads \(attention_head_dim\), which do not divide its width"):
        load_unet(tmp_path)


def test_other_parts_of_stable_diffusion_say_what_they_are(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    sd = tmp_path / "sd"
    make_reference(sd / "unet", **SMALL)
    AutoencoderKL(block_out_channels=(32,), norm_num_groups=8).save_pretrained(sd / "vae")
    CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
                                 vocab_size=100)).save_pretrained(sd / "text_encoder")
    with pytest.raises(ValueError, match=r"text_encoder/config.json describes a CLIP text encoder \(transformers' "
                                         rf"CLIPTextModel\), not a UNet; pass the unet/ folder of a Stable "
                                         rf"Diffusion checkpoint \({sd / 'unet'}\)"):
        load_unet(sd / "text_encoder")
    with pytest.raises(ValueError, match=rf"vae/config.json describes a VAE \(AutoencoderKL\), not a UNet; pass "
                                         rf"the unet/ folder of a Stable Diffusion checkpoint \({sd / 'unet'}\)"):
        load_unet(sd / "vae")
    with pytest.raises(FileNotFoundError, match=rf"config.json not found: for a Stable Diffusion folder, pass "
                                                rf"{sd / 'unet'}"):
        load_unet(sd)


def test_non_finite_weights_are_named(tmp_path):
    make_reference(tmp_path, **SMALL)
    state = {k: v.half() for k, v in load_file(tmp_path / WEIGHTS).items()}
    state["up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2.weight"][5, 5] = float("inf")
    save_file(state, tmp_path / WEIGHTS)
    with pytest.raises(ValueError, match=rf"{WEIGHTS} holds NaN or infinite values in 1 tensor\(s\) "
                                         r"\[up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2.weight\]; the file "
                                         r"is damaged"):
        load_unet(tmp_path)


def test_values_that_overflow_the_requested_dtype_are_not_blamed_on_the_file(tmp_path):
    make_reference(tmp_path, **SMALL)
    state = load_file(tmp_path / WEIGHTS)
    state["conv_in.bias"][0] = 1e6  # finite in float32, beyond float16's 65504
    save_file(state, tmp_path / WEIGHTS)
    assert load_unet(tmp_path).conv_in.bias[0] == 1e6
    with pytest.raises(ValueError, match=rf"{WEIGHTS} has values beyond the range of torch.float16 in 1 tensor\(s\) "
                                         r"\[conv_in.bias\]; load it in torch.float32 or torch.bfloat16"):
        load_unet(tmp_path, dtype=torch.float16)


def test_finite_weights_whose_sum_overflows_load(tmp_path):
    """The check sums each tensor first: a float16 sum past 65504 is infinite although every value is finite."""
    make_reference(tmp_path, **SMALL)
    state = load_file(tmp_path / WEIGHTS)
    state["conv_in.weight"].fill_(60000.0)  # 1,152 values of 60000: finite in float16, their sum is not
    save_file({k: v.half() for k, v in state.items()}, tmp_path / WEIGHTS)
    assert (load_unet(tmp_path, dtype=torch.float16).conv_in.weight == 60000.0).all()


def test_bad_latent_and_context_shapes(tmp_path):
    make_reference(tmp_path, **SMALL)
    ours = load_unet(tmp_path)
    with pytest.raises(ValueError, match=r"multiples of 2.*\(1, 4, 16, 15\)"):
        ours(torch.randn(1, 4, 16, 15), 0, torch.randn(1, 77, CONTEXT_DIM))
    with pytest.raises(ValueError, match=r"context of shape \(1, S, 48\).*\(1, 77, 768\)"):
        ours(torch.randn(1, 4, 16, 16), 0, torch.randn(1, 77, 768))
    with pytest.raises(ValueError, match=r"one timestep or one per sample \(2\), got 3"):
        ours(torch.randn(2, 4, 16, 16), torch.tensor([1, 2, 3]), torch.randn(2, 77, CONTEXT_DIM))
    with torch.device("meta"):
        sd1 = UNet(UNetConfig())
    with pytest.raises(ValueError, match=r"multiples of 8.*\(1, 4, 64, 60\)"):
        sd1(torch.randn(1, 4, 64, 60, device="meta"), 0, torch.randn(1, 77, 768, device="meta"))


# --- the demo ---


def test_demo_without_weights(tmp_path):
    result = subprocess.run([sys.executable, "unet.py", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "python weights/download.py" in result.stderr


def test_demo_matches_diffusers(tmp_path):
    """The demo's printed error equals the same computation with diffusers' UNet and scheduler."""
    from diffusers import DDPMScheduler

    ref = make_reference(tmp_path / "unet", **dict(SMALL, cross_attention_dim=768))
    result = subprocess.run([sys.executable, "unet.py", str(tmp_path), "--t", "700"], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    z0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))
    z_t = scheduler.add_noise(z0, noise, torch.tensor([700]))
    with torch.no_grad():
        mse = (ref(z_t, 700, torch.zeros(1, 77, 768)).sample - noise).pow(2).mean().item()
    assert "latents (1, 4, 16, 16), context (1, 77, 768)" in result.stdout
    assert f"mean (ε̂ − ε)² = {mse:.4f}" in result.stdout
