"""sds.py against independent computations: diffusers' scheduler, the loss formulas written out
by hand in the test (autograd of the written "full" loss, the analytic "stopgrad" gradient)
and CLIP's contrastive loss in numpy. The UNet is a tiny diffusers UNet2DConditionModel, so
these tests do not depend on unet.py.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
import transformers
from diffusers import DDPMScheduler, UNet2DConditionModel

from sds import Mapper, NoiseSchedule, contrastive_loss, denoising_error, encode_prompt, fit_mapper
from sds import r_squared, sds_loss
from weights.networks import check_scheduler, load_clip, load_openai_tokenizer, load_tokenizer

OPENAI_BPE = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"

EMBED_DIM = 16
CONTEXT_DIM = 32
LATENT = (4, 8, 8)  # C, H, W of the tiny UNet's input
BATCH = 3


@pytest.fixture(scope="module")
def unet():
    """A tiny SD-shaped UNet, frozen, wrapped as our UNet contract: unet(z_t, t, c) → ε̂."""
    torch.manual_seed(0)
    ref = UNet2DConditionModel(
        sample_size=LATENT[1], in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT_DIM, attention_head_dim=2, norm_num_groups=8,
    ).eval().requires_grad_(False)
    return lambda z_t, t, c: ref(z_t, t, encoder_hidden_states=c).sample


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(BATCH, EMBED_DIM, generator=g)
    context = torch.randn(BATCH, 77, CONTEXT_DIM, generator=g)
    t = torch.tensor([0, 421, 999])  # both ends of the schedule and one in between
    noise = torch.randn(BATCH, *LATENT, generator=g)
    return embeds, context, t, noise


def test_schedule_equals_diffusers(parity):
    ours = NoiseSchedule()
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    parity("sds schedule betas", ours.betas, ref.betas, atol=1e-10)
    parity("sds schedule alphas_cumprod", ours.alphas_cumprod, ref.alphas_cumprod, atol=1e-7)
    z0, noise = torch.randn(5, *LATENT), torch.randn(5, *LATENT)
    t = torch.tensor([0, 1, 500, 998, 999])
    parity("sds add_noise", ours.add_noise(z0, noise, t), ref.add_noise(z0, noise, t), atol=1e-6)


def test_timesteps_uniform_over_all_steps():
    t = NoiseSchedule().sample_timesteps(200_000, torch.Generator().manual_seed(0))
    assert t.min() == 0 and t.max() == 999
    counts = torch.bincount(t, minlength=1000).double()
    assert abs(t.double().mean().item() - 499.5) < 2.0
    assert counts.std() / counts.mean() < 0.1  # 200 per bin, Poisson spread ≈ 0.07


def test_mapper_shape_from_unet_config():
    config = SimpleNamespace(in_channels=4, sample_size=64)  # SD 1.x
    mapper = Mapper.for_unet(512, SimpleNamespace(config=config))
    assert mapper(torch.randn(2, 512)).shape == (2, 4, 64, 64)
    assert mapper.proj.weight.shape == (4 * 64 * 64, 512)


def _written_loss(unet, weight, bias, embeds, context, t, noise):
    """The paper's L_SDS written out independently: diffusers' ᾱ, explicit linear map and mean."""
    alphas_cumprod = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    z0 = (embeds @ weight.T + bias).reshape(BATCH, *LATENT)
    a = alphas_cumprod[t][:, None, None, None]
    z_t = torch.sqrt(a) * z0 + torch.sqrt(1 - a) * noise
    eps_hat = unet(z_t, t, context)
    per_sample = ((eps_hat - noise) ** 2).sum(dim=(1, 2, 3)) / np.prod(LATENT)
    return per_sample, per_sample.mean(), eps_hat


def test_denoising_error_per_sample(unet, inputs, parity):
    embeds, context, t, noise = inputs
    mapper = Mapper(EMBED_DIM, LATENT)
    ours = denoising_error(unet, mapper(embeds), t, noise, context)
    ref, _, _ = _written_loss(unet, mapper.proj.weight, mapper.proj.bias, embeds, context, t, noise)
    assert ours.shape == (BATCH,)
    parity("sds denoising_error per sample", ours, ref, atol=1e-6)


def test_full_gradient_equals_autograd_of_written_loss(unet, inputs, parity):
    embeds, context, t, noise = inputs
    mapper = Mapper(EMBED_DIM, LATENT)
    embeds_ours = embeds.clone().requires_grad_(True)
    loss = sds_loss(unet, NoiseSchedule(), mapper, embeds_ours, context, t=t, noise=noise, mode="full")
    loss.backward()

    weight = mapper.proj.weight.detach().clone().requires_grad_(True)
    bias = mapper.proj.bias.detach().clone().requires_grad_(True)
    embeds_ref = embeds.clone().requires_grad_(True)
    _, ref, _ = _written_loss(unet, weight, bias, embeds_ref, context, t, noise)
    ref.backward()

    parity("sds full loss value", loss, ref, atol=1e-6)
    parity("sds full ∂L/∂w", mapper.proj.weight.grad, weight.grad, atol=1e-7)
    parity("sds full ∂L/∂b", mapper.proj.bias.grad, bias.grad, atol=1e-7)
    parity("sds full ∂L/∂f(x)", embeds_ours.grad, embeds_ref.grad, atol=1e-6)


def test_stopgrad_gradient_equals_analytic_form(unet, inputs, parity):
    embeds, context, t, noise = inputs
    mapper = Mapper(EMBED_DIM, LATENT)
    embeds_ours = embeds.clone().requires_grad_(True)
    loss = sds_loss(unet, NoiseSchedule(), mapper, embeds_ours, context, t=t, noise=noise, mode="stopgrad")
    loss.backward()

    # ∂L/∂z_0 = 2/(B·C·H·W) · (ε̂ − ε) · √ᾱ_t (w(t) = 1), then the chain rule through h_w by hand.
    with torch.no_grad():
        per_sample, full_value, eps_hat = _written_loss(unet, mapper.proj.weight, mapper.proj.bias, embeds, context,
                                                        t, noise)
        alphas_cumprod = NoiseSchedule().alphas_cumprod.double()
        sqrt_a = alphas_cumprod[t].sqrt()[:, None, None, None]
        grad_z0 = 2.0 / (BATCH * np.prod(LATENT)) * (eps_hat.double() - noise.double()) * sqrt_a
        grad_z0 = grad_z0.reshape(BATCH, -1)  # (B, C·H·W)
        grad_weight = grad_z0.T @ embeds.double()
        grad_bias = grad_z0.sum(0)
        grad_embeds = grad_z0 @ mapper.proj.weight.double()

    parity("sds stopgrad value = full value", loss, full_value, atol=1e-6)
    parity("sds stopgrad ∂L/∂w analytic", mapper.proj.weight.grad, grad_weight, atol=1e-7)
    parity("sds stopgrad ∂L/∂b analytic", mapper.proj.bias.grad, grad_bias, atol=1e-7)
    parity("sds stopgrad ∂L/∂f(x) analytic", embeds_ours.grad, grad_embeds, atol=1e-6)


def test_stopgrad_differs_from_full_and_builds_no_unet_graph(inputs):
    embeds, context, t, noise = inputs
    weights = torch.nn.Parameter(torch.tensor(0.9))
    toy_unet = lambda z_t, t, c: weights * z_t  # noqa: E731  — Jacobian 0.9·I, a parameter to watch
    grads = {}
    for mode in ("full", "stopgrad"):
        mapper = Mapper(EMBED_DIM, LATENT)
        torch.nn.init.constant_(mapper.proj.weight, 0.01)
        torch.nn.init.constant_(mapper.proj.bias, 0.1)
        sds_loss(toy_unet, NoiseSchedule(), mapper, embeds, context, t=t, noise=noise, mode=mode).backward()
        grads[mode] = mapper.proj.weight.grad
        if mode == "full":
            assert weights.grad is not None
            weights.grad = None
    assert weights.grad is None  # stopgrad never differentiates the UNet
    # With ε̂ = 0.9 z_t the UNet Jacobian is 0.9·I: full = 0.9 × stopgrad exactly.
    torch.testing.assert_close(grads["full"], 0.9 * grads["stopgrad"], rtol=1e-5, atol=1e-9)


def test_sds_draws_t_and_noise_from_generator(unet, inputs):
    embeds, context, _, _ = inputs
    mapper = Mapper(EMBED_DIM, LATENT)
    a, b, c = (sds_loss(unet, NoiseSchedule(), mapper, embeds, context, generator=torch.Generator().manual_seed(s))
               for s in (7, 7, 8))
    assert a.item() == b.item() and a.item() != c.item()
    with pytest.raises(ValueError, match="mode"):
        sds_loss(unet, NoiseSchedule(), mapper, embeds, context, mode="sds")


def test_contrastive_loss_equals_hand_computation(parity):
    logits = torch.randn(5, 5, dtype=torch.float64) * 3
    s = logits.numpy()

    def log_softmax_rows(m):
        m = m - m.max(axis=1, keepdims=True)
        return m - np.log(np.exp(m).sum(axis=1, keepdims=True))

    image_to_text = -np.mean(np.diag(log_softmax_rows(s)))
    text_to_image = -np.mean(np.diag(log_softmax_rows(s.T)))
    ref = torch.tensor((image_to_text + text_to_image) / 2)
    parity("sds contrastive_loss vs numpy", contrastive_loss(logits), ref, atol=1e-12)
    # A perfectly matched batch costs ~0, a shuffled one a lot: the labels are the diagonal.
    assert contrastive_loss(torch.eye(4) * 100) < 1e-6 < 10 < contrastive_loss(torch.eye(4).flip(0) * 100)


def test_encode_prompt_pads_with_eot_and_equals_transformers(tmp_path, parity):
    config = transformers.CLIPTextConfig(hidden_size=CONTEXT_DIM, intermediate_size=64, num_attention_heads=4,
                                         num_hidden_layers=2)
    ref = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():
        for p in ref.parameters():  # off the init, which leaves LayerNorms at exactly 1 and 0
            p.add_(0.05 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    tokenizer = load_openai_tokenizer(OPENAI_BPE)
    captions = ["a mug in some grass", "some grass in a mug, seen from above"]
    ids = tokenizer(captions)  # padded with 0, OpenAI's way; SD 1.x pads with EOT after the caption
    lengths = (ids == tokenizer.eot_id).int().argmax(dim=1) + 1
    eot_padded = torch.where(torch.arange(77) < lengths[:, None], ids, tokenizer.eot_id)
    assert not torch.equal(eot_padded, ids)
    with torch.no_grad():
        ours = encode_prompt(load_clip(tmp_path), tokenizer, captions)
        expected = ref(input_ids=eot_padded).last_hidden_state
    assert ours.shape == (2, 77, CONTEXT_DIM)
    parity("sds encode_prompt vs transformers CLIPTextModel, EOT padding", ours, expected, atol=1e-5)


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_encode_prompt_pads_as_the_tokenizer_files_say(tmp_path, parity, pad_token):
    """SD 1.x's tokenizer pads with end-of-text, SD 2.x's with "!" (id 0), and its text encoder is a GELU
    CLIPTextModel: c against transformers' CLIPTokenizer (from the same files) and CLIPTextModel."""
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=CONTEXT_DIM, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, hidden_act="gelu",
        eos_token_id=49407)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "text_encoder")
    openai = load_openai_tokenizer(OPENAI_BPE)
    (tmp_path / "bpe").mkdir()
    (tmp_path / "bpe" / "vocab.json").write_text(json.dumps(openai.encoder), encoding="utf-8")
    merges = sorted(openai.ranks, key=openai.ranks.get)
    (tmp_path / "bpe" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                                encoding="utf-8")
    transformers.CLIPTokenizer(tmp_path / "bpe" / "vocab.json", tmp_path / "bpe" / "merges.txt",
                               pad_token=pad_token).save_pretrained(tmp_path / "tokenizer")
    captions = ["a mug in some grass", "some grass in a mug, seen from above"]
    hf_tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    ids = hf_tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert (ids[:, -1] == (0 if pad_token == "!" else 49407)).all()
    with torch.no_grad():
        ours = encode_prompt(load_clip(tmp_path / "text_encoder"), load_tokenizer(tmp_path / "tokenizer"),
                             captions)
        expected = ref(input_ids=ids).last_hidden_state
        parity(f"sds encode_prompt, gelu text encoder, pad {pad_token!r}", ours, expected, atol=1e-5)
        other_pad = ref(input_ids=torch.where(ids == ids[0, -1], 49407 if pad_token == "!" else 0, ids))
    assert (other_pad.last_hidden_state - expected).abs().max() > 1e-3  # the padding changes c: it matters


def write_scheduler(folder: Path, **config) -> Path:
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **config).save_pretrained(
        folder / "scheduler")
    return folder


def test_check_scheduler_accepts_epsilon_and_refuses_v_prediction(tmp_path):
    check_scheduler(tmp_path)  # no scheduler/ folder: SD's own schedule is assumed
    check_scheduler(write_scheduler(tmp_path / "sd2-base", prediction_type="epsilon"))
    with pytest.raises(ValueError, match=r"scheduler_config.json says prediction_type 'v_prediction': the SDS loss "
                                         r"and the diffusion score need a UNet that predicts the noise"):
        check_scheduler(write_scheduler(tmp_path / "sd2-768", prediction_type="v_prediction"))
    with pytest.raises(ValueError, match=r"scheduler_config.json has beta_end 0.02 \(expected 0.012\), but "
                                         r"NoiseSchedule is Stable Diffusion's"):
        DDPMScheduler(beta_end=0.02, beta_start=0.00085, beta_schedule="scaled_linear").save_pretrained(
            tmp_path / "other" / "scheduler")
        check_scheduler(tmp_path / "other")
    (tmp_path / "bad" / "scheduler").mkdir(parents=True)
    (tmp_path / "bad" / "scheduler" / "scheduler_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"scheduler_config.json is not a JSON object"):
        check_scheduler(tmp_path / "bad")


@pytest.mark.parametrize("config, message", [
    ({"rescale_betas_zero_snr": True}, r"rescale_betas_zero_snr True \(expected False\)"),
    ({"trained_betas": [1e-4] * 1000}, r"trained_betas \[0.0001, .*\] \(expected None\)"),
])
def test_check_scheduler_refuses_other_betas(tmp_path, config, message):
    """Zero-terminal-SNR rescaling and hand-given betas change ᾱ_t: not the schedule NoiseSchedule computes."""
    with pytest.raises(ValueError, match=rf"scheduler_config.json has {message}, but NoiseSchedule is Stable "
                                         r"Diffusion's training schedule"):
        check_scheduler(write_scheduler(tmp_path, **config))


def test_fit_mapper_recovers_a_linear_map_and_r_squared_measures_it():
    """Latents made by a known affine map of the embeddings: the ridge fit finds it (R² ≈ 1); with noise
    of known variance R² is the explained share; unrelated latents give R² ≤ 0 on fresh data."""
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(400, 8, generator=generator) * torch.linspace(0.5, 3, 8)  # unequal scales
    truth = Mapper(8, (2, 3, 3))
    with torch.no_grad():
        truth.proj.weight.copy_(torch.randn(18, 8, generator=generator))
        truth.proj.bias.copy_(torch.randn(18, generator=generator))
        latents = truth(embeds)
    fitted = Mapper(8, (2, 3, 3))
    fit_mapper(fitted, embeds, latents, ridge=1e-9)
    torch.testing.assert_close(fitted.proj.weight, truth.proj.weight, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fitted.proj.bias, truth.proj.bias, rtol=1e-4, atol=1e-4)
    assert r_squared(fitted, embeds, latents) == pytest.approx(1.0, abs=1e-6)
    # half the variance is noise the embeddings cannot explain: R² ≈ ½ on held-out data
    signal = truth(embeds).detach()
    noisy = signal + signal.std() * torch.randn(signal.shape, generator=generator)
    fit_mapper(fitted, embeds[:300], noisy[:300])
    assert r_squared(fitted, embeds[300:], noisy[300:]) == pytest.approx(0.5, abs=0.1)
    fit_mapper(fitted, embeds[:300], torch.randn(300, 2, 3, 3, generator=generator))
    assert r_squared(fitted, embeds[300:], torch.randn(100, 2, 3, 3, generator=generator)) < 0.02
