"""train.py run as a user runs it (a subprocess on the CPU, or `main` in this process where a
test needs to break something inside) on tiny models written by transformers / diffusers and a
tiny COCO-format dataset, all built once per session in tmp.

What is proven: only CLIP's LayerNorms and h_w change; t, ε and the captions are functions of
their seeds alone; a resumed run (after --max_steps or a SIGKILL) is bit-identical to an
uninterrupted one, and refuses other weights, other captions or other settings but lets the
learning-rate schedule and clipping change (and logs it); torchrun with 2 processes matches one
process at the same global batch; the export loads in transformers with the same embeddings as
our load_clip; --winoground scores as eval_winoground does and changes no weight; --toy makes the
toy world the defaults; --trainable image / all train what they name and export; --mapper fitted is the
ridge fit, frozen, and resumes bit-identically; the logged gradient norms, the whole one and each loss term's
own, are the same with two processes (the terms' zero at λ = 0); --grad_clip bounds the gradient AdamW steps
with; a bf16 checkpoint resumes in bf16 only; bad inputs, bad settings (an --out inside a source among them)
and damaged checkpoints stop with one sentence naming the file or value and train.py's option; a non-finite
loss, gradient or update stops the run, and the checkpoint it names holds weights that gave a finite loss.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import DistributedSampler

import train as train_py
from test_clip import fake_cache, open_clip_model, save_open_clip
from clip import image_transform
from eval_winoground import clip_scores, percentages, score_examples
from sds import Mapper, NoiseSchedule
from train import get_args, main, step_generator
from weights import runs
from weights.coco import CocoCaptions, batches
from weights.networks import load_clip, load_openai_tokenizer, load_tokenizer
from weights.runs import nonfinite, write_checkpoint
from weights.winoground import Winoground

REPO = Path(__file__).resolve().parent.parent
OPENAI_BPE = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
WIDTH = 32  # every tiny tower's width; also SD's cross-attention dim here
PROJECTION_DIM = 16
IMAGE_SIZE = 32
LATENT_SIZE = 8  # the tiny UNet's sample_size: h_w maps to 4 × 8 × 8
N_STEPS = 6  # the reference run; 2 steps per epoch, so N/2 = 3 resumes in the middle of an epoch
COMMON = ["--device", "cpu", "--num_workers", "0", "--batch_size", "4", "--warmup_steps", "2", "--cosine",
          "--save_every", "2", "--log_every", "1", "--seed", "0"]
LAYERNORM_MARKERS = ("layer_norm", "layrnorm", "layernorm")  # layer_norm1/2, pre_layrnorm (sic), post_layernorm, …
# --precision bf16 vs fp32, the same data, t and ε: relative difference of the logged losses, measured
# ≤ 4.7e-3 over the 2 steps tested, ≤ 1.0e-2 over 4 steps with seeds 0–2 (the contrastive loss; L_SDS ≤ 5e-4).
BF16_LOSS_RTOL = 0.02


# ----------------------------------------------------------------------------- fixtures


def write_tokenizer(folder: Path) -> None:
    """vocab.json + merges.txt from OpenAI's merges, then transformers' own tokenizer files."""
    tok = load_openai_tokenizer(OPENAI_BPE)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tok.encoder, ensure_ascii=False), encoding="utf-8")
    merges = sorted(tok.ranks, key=tok.ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                      encoding="utf-8")
    transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)


def perturbed(model):
    """Move every parameter off its init (LayerNorms start at exactly 1 and 0)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tiny_text_config(width: int = WIDTH):
    return dict(hidden_size=width, intermediate_size=2 * width, num_attention_heads=4, num_hidden_layers=2)


def write_clip(folder: Path, width: int = WIDTH) -> None:
    config = transformers.CLIPConfig(
        text_config=tiny_text_config(width), projection_dim=PROJECTION_DIM,
        vision_config=dict(hidden_size=width, intermediate_size=2 * width, num_attention_heads=4, num_hidden_layers=2,
                           image_size=IMAGE_SIZE, patch_size=8))
    perturbed(transformers.CLIPModel(config)).save_pretrained(folder)
    write_tokenizer(folder)


def write_sd(folder: Path, poison: bool = False) -> None:
    """unet/, text_encoder/, tokenizer/ in diffusers layout; `poison` puts a weight of 3e38 (finite, so the
    loader takes it) in the UNet's output conv: ε̂ overflows, and the SDS loss is not finite."""
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH, attention_head_dim=2, norm_num_groups=8)
    if poison:
        with torch.no_grad():
            unet.conv_out.weight[0, 0, 0, 0] = 3e38
    unet.save_pretrained(folder / "unet")
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**tiny_text_config()))
    perturbed(text).save_pretrained(folder / "text_encoder")
    write_tokenizer(folder / "tokenizer")
    # 32 px → 8 × 8 latents (two downsamplings): what --mapper fitted maps CLIP's embeddings to
    vae = AutoencoderKL(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8, sample_size=IMAGE_SIZE)
    perturbed(vae).save_pretrained(folder / "vae")


def write_coco(root: Path) -> None:
    """11 captioned images of several sizes and modes (RGB, grayscale L, CMYK, palette) + one uncaptioned."""
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    modes = ["RGB", "L", "CMYK", "RGB", "P", "RGB", "RGB", "L", "RGB", "CMYK", "RGB", "RGB"]
    images, annotations = [], []
    words = ["a red cup", "two dogs", "a bike on grass", "a tall tower", "people at a table", "a cat asleep"]
    for i, mode in enumerate(modes):
        size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert(mode)
        name = f"{i:012d}.{'png' if mode == 'P' else 'jpg'}"
        image.save(root / "train2017" / name)
        images.append({"id": 1000 + i, "file_name": name, "width": size[0], "height": size[1]})
        if i == len(modes) - 1:
            continue  # an image without captions is not part of the dataset
        for k in range(int(rng.integers(2, 5))):
            annotations.append({"id": len(annotations), "image_id": 1000 + i, "caption": f"{words[(i + k) % 6]} {i}"})
    rng.shuffle(images)  # the file's order is not the dataset's order (that is by image id)
    captions = json.dumps({"images": images, "annotations": annotations})
    (root / "annotations" / "captions_train2017.json").write_text(captions)


def write_winoground(root: Path, n: int = 4) -> None:
    """Winoground layout: examples.jsonl and images/ex_<id>_img_<0|1>.png, two tags."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    with open(root / "examples.jsonl", "w") as f:
        for i in range(n):
            for j in range(2):
                pixels = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "images" / f"ex_{i}_img_{j}.png")
            tag = ("Object", "Relation")[i % 2]
            f.write(json.dumps({"id": i, "image_0": f"ex_{i}_img_0", "image_1": f"ex_{i}_img_1",
                                "caption_0": f"a red cup on two dogs {i}", "caption_1": f"two dogs on a red cup {i}",
                                "tag": tag, "secondary_tag": "", "num_main_preds": 1 + i % 2,
                                "collapsed_tag": tag}) + "\n")


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    write_clip(root / "clip")
    write_sd(root / "sd")
    write_coco(root / "coco")
    return root


def arguments(assets, out: Path, *extra: str, clip=None, coco=None, sd=None) -> list[str]:
    return ["--clip", str(clip or assets / "clip"), "--sd", str(sd or assets / "sd"),
            "--coco_root", str(coco or assets / "coco"), "--out", str(out), *COMMON, *extra]


def train(assets, out: Path, *extra: str, clip=None, coco=None, sd=None, nproc: int = 0, check: bool = True,
          **popen):
    """Run train.py as a user does; returns the CompletedProcess (stdout+stderr in .stdout)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*(launcher if nproc else [sys.executable]), "train.py", *arguments(assets, out, *extra, clip=clip, coco=coco,
                                                                              sd=sd)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count for every run: bit-identical sums
    if popen:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    result.stdout += result.stderr
    if check:
        assert result.returncode == 0, result.stdout[-3000:]
    return result


@pytest.fixture(scope="session")
def reference_run(assets):
    """N_STEPS uninterrupted steps: the run every other one is compared with."""
    out = assets / "runs" / "straight"
    train(assets, out, "--max_steps", str(N_STEPS))
    return out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    mapper = load_file(folder / "mapper.safetensors")
    return {**load_file(folder / "model.safetensors"), **{f"mapper.{k}": v for k, v in mapper.items()}}


def assert_bit_identical(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


def checkpoint_step(path: Path) -> int:
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["sds_clip"])["step"]


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- data


def test_dataset_reads_every_image_mode_and_draws_captions(assets):
    dataset = CocoCaptions(assets / "coco", image_transform(IMAGE_SIZE))
    assert len(dataset) == 11  # the uncaptioned image is left out
    modes = {Image.open(f).mode for f in dataset.files}
    assert modes == {"RGB", "L", "CMYK", "P"}
    for i in range(len(dataset)):
        pixels, index, error = dataset[i]
        assert error is None and index == i and pixels.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert torch.isfinite(pixels).all()
    drawn = [[dataset.caption(i, epoch) for epoch in range(32)] for i in range(len(dataset))]
    assert all(set(row) <= set(dataset.captions[i]) for i, row in enumerate(drawn))
    assert all(len(set(row)) > 1 for row in drawn)  # drawn afresh each epoch (2-4 captions, 32 epochs)
    assert drawn == [[dataset.caption(i, epoch) for epoch in range(32)] for i in range(len(dataset))]  # seeded
    first = CocoCaptions(assets / "coco", image_transform(IMAGE_SIZE), limit_images=5)  # --limit_images
    assert first.files == dataset.files[:5]
    assert [f.name for f in first.files] == [f"{i:012d}.jpg" for i in range(4)] + ["000000000004.png"]


def test_caption_draw_is_a_function_of_seed_epoch_and_index(assets):
    def positions(seed: int) -> list[list[int]]:  # which of its captions each image gets, epochs 0-15
        data = CocoCaptions(assets / "coco", image_transform(IMAGE_SIZE), seed=seed)
        return [[data.captions[i].index(data.caption(i, epoch)) for epoch in range(16)] for i in range(len(data))]

    drawn, counts = positions(0), [len(c) for c in CocoCaptions(assets / "coco", image_transform(IMAGE_SIZE)).captions]
    assert drawn == positions(0)  # the same (seed, epoch, index), the same caption
    assert drawn != positions(1)  # another seed, other draws
    for n in set(counts):  # images with as many captions draw differently: the index is part of the seed
        rows = [tuple(row) for row, count in zip(drawn, counts) if count == n]
        assert len(set(rows)) == len(rows), f"images with {n} captions draw the same sequence"


def test_step_generator_is_a_function_of_seed_step_and_micro_batch():
    def draw(seed: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = step_generator(seed, step, micro)  # as train.py draws: t, then ε
        return NoiseSchedule().sample_timesteps(32, generator), torch.randn(32, 4, 8, 8, generator=generator)

    pairs = [(0, 0), (1, 0), (0, 1), (5, 0), (1, 1)]  # (step, micro)
    drawn = {pair: draw(0, *pair) for pair in pairs}
    for pair in pairs:
        t, noise = draw(0, *pair)
        assert torch.equal(t, drawn[pair][0]) and torch.equal(noise, drawn[pair][1])  # equal arguments: equal draws
        for other in pairs:
            if other != pair:
                assert not torch.equal(t, drawn[other][0]) and not torch.equal(noise, drawn[other][1]), (pair, other)
        t, noise = draw(1, *pair)  # another seed
        assert not torch.equal(t, drawn[pair][0]) and not torch.equal(noise, drawn[pair][1])


def test_data_order_one_pair_per_image_and_split_across_processes(assets):
    dataset = CocoCaptions(assets / "coco", image_transform(IMAGE_SIZE))
    batch, per_epoch = 4, 2

    def global_batches(world: int, start: int = 0, count: int = 6) -> list[list[int]]:
        streams = [batches(dataset, DistributedSampler(dataset, world, r, seed=0, drop_last=True), batch // world,
                           per_epoch, start, 0) for r in range(world)]
        out = []
        for _ in range(count):
            parts = [next(s) for s in streams]
            assert len({epoch for epoch, _ in parts}) == 1
            out.append(sorted(i for _, (_, indices, _) in parts for i in indices))
        return out

    one = global_batches(1)
    for epoch in range(3):  # each image at most once per epoch, the order reshuffled every epoch
        seen = one[2 * epoch] + one[2 * epoch + 1]
        assert len(set(seen)) == len(seen) == batch * per_epoch
    assert one[0:2] != one[2:4]
    assert global_batches(2) == one  # two processes: the same images in each global batch
    assert global_batches(1, start=3, count=3) == one[3:]  # resuming at batch 3 needs nothing but the number


# ----------------------------------------------------------------------------- what changes


def test_only_layernorms_and_mapper_change(assets, reference_run):
    source = load_file(assets / "clip" / "model.safetensors")
    trained = load_file(reference_run / "model.safetensors")
    assert trained.keys() == {k for k in source if not k.endswith("position_ids")}
    layernorms = [k for k in trained if any(m in k for m in LAYERNORM_MARKERS)]
    assert len(layernorms) == 2 * (2 * 2 + 1 + 2 + 2 * 2)  # text: 2 per layer + final; vision: pre + post + 2 per layer
    unchanged_layernorms = [k for k in layernorms if torch.equal(trained[k], source[k])]
    changed_others = [k for k in trained if k not in layernorms and not torch.equal(trained[k], source[k])]
    assert not unchanged_layernorms, unchanged_layernorms
    assert not changed_others, changed_others

    torch.manual_seed(0)  # train.py seeds h_w's init with --seed
    initial = Mapper(PROJECTION_DIM, (4, LATENT_SIZE, LATENT_SIZE)).state_dict()
    mapper = load_file(reference_run / "mapper.safetensors")
    assert mapper.keys() == initial.keys()
    assert all(mapper[k].shape == initial[k].shape and not torch.equal(mapper[k], initial[k]) for k in mapper)


def test_log_has_finite_losses_per_step(reference_run):
    records = [json.loads(line) for line in (reference_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, N_STEPS + 1))
    for r in records:
        assert set(r) == {"step", "loss", "clip_loss", "sds_loss", "lr", "grad_norm", "clip_grad_norm",
                          "sds_grad_norm", "images_per_s"}
        assert all(np.isfinite(v) for v in r.values())
        assert r["loss"] == pytest.approx(r["clip_loss"] + 0.001 * r["sds_loss"], rel=1e-5)
        assert r["sds_loss"] > 0 and r["grad_norm"] > 0 and r["clip_grad_norm"] > 0 and r["sds_grad_norm"] > 0
    lrs = [r["lr"] for r in records]  # warm-up over 2 steps, then cosine over 5 epochs × 2 steps
    assert lrs[:2] == pytest.approx([2.5e-5, 5e-5]) and lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0


def test_image_layernorms_only(assets, tmp_path):
    train(assets, tmp_path, "--max_steps", "1", "--image_layernorms_only")
    source, trained = load_file(assets / "clip" / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    changed = {k for k in trained if not torch.equal(trained[k], source[k])}
    expected = {k for k in trained if k.startswith("vision_model.") and any(m in k for m in LAYERNORM_MARKERS)}
    assert changed == expected


@pytest.mark.parametrize("trainable", ["image", "all"])
def test_trainable_image_and_all_train_what_they_name_and_export(assets, tmp_path, trainable):
    result = train(assets, tmp_path, "--max_steps", "1", "--trainable", trainable)
    source, trained = load_file(assets / "clip" / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    changed = {k for k in trained if not torch.equal(trained[k], source[k])}
    if trainable == "all":
        expected = set(trained)
    else:  # the image tower, its projection, and every LayerNorm (the text tower's too)
        expected = {k for k in trained if k.startswith(("vision_model.", "visual_projection."))
                    or any(m in k for m in LAYERNORM_MARKERS)}
    assert changed == expected
    counted = sum(source[k].numel() for k in expected)
    assert f"trainable (--trainable {trainable}): {counted:,} " in result.stdout
    ref = transformers.CLIPModel.from_pretrained(tmp_path).eval()  # the export loads in transformers
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert torch.allclose(load_clip(tmp_path).encode_image(pixels), ref.get_image_features(pixel_values=pixels),
                              atol=1e-5)


def test_image_layernorms_only_needs_trainable_layernorm(capsys):
    with pytest.raises(SystemExit):
        get_args(["--trainable", "all", "--image_layernorms_only"])
    assert "--image_layernorms_only picks among the LayerNorms: it needs --trainable layernorm, not all" in (
        capsys.readouterr().err)


def test_embedding_gradient_norms_are_each_terms_gradient():
    """The hooks' ‖∂L_CLIP/∂f‖ and ‖∂(λ·L_SDS)/∂f‖ against autograd.grad of each term alone."""
    torch.manual_seed(0)
    clip = load_clip(REPO / "weights" / "toy-models" / "clip")
    train_py.set_trainable(clip, "layernorm")
    objective = train_py.SDSCLIPLoss(clip, Mapper(clip.config.projection_dim, (4, 8, 8)), 3.0, "full")
    unet = lambda z_t, t, c: 0.5 * z_t + c.mean() * z_t.pow(2)  # noqa: E731 (a stand-in ε_θ with a Jacobian)
    pixels, ids = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4, 77))
    context, t, noise = torch.randn(4, 77, 64), torch.tensor([10, 200, 500, 900]), torch.randn(4, 4, 8, 8)
    image_embeds = clip.encode_image(pixels)
    torch.manual_seed(1)
    loss, l_clip, l_sds = objective(pixels, ids, context, t, noise, unet)
    loss.backward()
    hooks = objective.embed_grad_sq.sqrt()
    # the same numbers by hand: each term's gradient with respect to f_φ(x), taken alone
    text = F.normalize(clip.encode_text(ids), dim=-1)
    logits = clip.logit_scale.exp() * F.normalize(image_embeds, dim=-1) @ text.t()
    by_hand_clip = torch.autograd.grad(train_py.contrastive_loss(logits), image_embeds, retain_graph=True)[0]
    by_hand_sds = torch.autograd.grad(3.0 * train_py.sds_loss(unet, objective.schedule, objective.mapper,
                                                              image_embeds, context, t, noise), image_embeds)[0]
    assert hooks[0].item() == pytest.approx(by_hand_clip.norm().item(), rel=1e-5)
    assert hooks[1].item() == pytest.approx(by_hand_sds.norm().item(), rel=1e-5)
    assert hooks[0] != pytest.approx(hooks[1].item(), rel=0.01)  # two different gradients


def test_sds_gradient_norm_is_zero_when_lambda_is_zero(assets, tmp_path):
    result = train(assets, tmp_path, "--max_steps", "2", "--sds_weight", "0")
    records = [r for r in log_records(tmp_path) if "loss" in r]
    assert all(r["sds_grad_norm"] == 0 and r["clip_grad_norm"] > 0 for r in records)
    assert "ratio λ·L_SDS / L_CLIP 0" in result.stdout


def test_mapper_fitted_is_the_ridge_fit_frozen_and_resumes_bit_identical(assets, reference_run, tmp_path):
    straight = tmp_path / "straight"
    result = train(assets, straight, "--max_steps", str(N_STEPS), "--mapper", "fitted")
    assert re.search(r"h_w fitted by ridge least squares .* of 9 training images: R² [-0-9.]+ on them, "
                     r"[-0-9.]+ on 2 held out; then frozen", result.stdout)
    assert "(h_w's 4,352 parameters fitted, then frozen)" in result.stdout
    # the exported h_w is the fit, untouched by training: refit it here from the source CLIP and the VAE
    from sds import fit_mapper, sd_image_transform
    from weights.images import open_image
    from weights.networks import load_vae
    dataset = CocoCaptions(assets / "coco", image_transform(IMAGE_SIZE), image_size=IMAGE_SIZE)
    clip, vae = load_clip(assets / "clip"), load_vae(assets / "sd" / "vae")
    images = [open_image(f, size=IMAGE_SIZE) for f in dataset.files]
    with torch.no_grad():
        embeds = clip.encode_image(torch.stack([image_transform(IMAGE_SIZE)(im) for im in images]))
        latents = vae.images_to_latents(torch.stack([sd_image_transform(IMAGE_SIZE)(im) for im in images]))
    fit = [i for i in range(len(images)) if i % 10]  # one in ten held out
    expected = Mapper(PROJECTION_DIM, (4, LATENT_SIZE, LATENT_SIZE))
    fit_mapper(expected, embeds[fit], latents[fit])
    exported = load_file(straight / "mapper.safetensors")
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(exported[key], value, rtol=1e-4, atol=1e-5)
    # resumed in the middle: bit-identical, h_w read back from the checkpoint (not fitted again)
    resumed = tmp_path / "resumed"
    train(assets, resumed, "--max_steps", str(N_STEPS // 2), "--mapper", "fitted")
    result = train(assets, resumed, "--max_steps", str(N_STEPS), "--mapper", "fitted", "--resume")
    assert "h_w fitted" not in result.stdout
    assert_bit_identical(resumed, straight)
    with safe_open(resumed / "checkpoint.safetensors", "pt") as f:
        assert {"fitted.mapper.proj.weight", "fitted.mapper.proj.bias"} <= set(f.keys())
        assert "vae" in json.loads(f.metadata()["sds_clip"])["identity"]
    refused = train(assets, resumed, "--max_steps", str(N_STEPS + 1), "--resume", check=False)
    assert refused.returncode != 0 and "--mapper 'fitted' → 'joint'" in refused.stdout


def test_resume_reads_a_checkpoint_from_before_trainable_and_mapper(tmp_path):
    args = get_args(COMMON)
    sources = {"clip": {"file": "clip.safetensors", "sha256": "0" * 64}}
    older = {k: v for k, v in vars(args).items() if k not in ("trainable", "mapper", "mapper_images")}
    assert runs.check_resume(tmp_path / "c", {"settings": older, "identity": sources}, args, sources) == {}


# ----------------------------------------------------------------------------- precision


def test_precision_bf16_trains_float32_weights(assets, reference_run, tmp_path):
    """--precision bf16 on the CPU: bfloat16 autocast and SD held in bfloat16, yet the trained parameters,
    AdamW's moments, the checkpoint and the export are float32."""
    result = train(assets, tmp_path, "--max_steps", "2", "--precision", "bf16")
    assert "precision bf16: bfloat16 autocast" in result.stdout
    records, fp32 = log_records(tmp_path), log_records(reference_run)[:2]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r[key]) for r in records for key in ("loss", "clip_loss", "sds_loss", "grad_norm"))
    # bfloat16 took effect (the same data, t and ε give other losses than float32), and only as rounding does
    for r, ref in zip(records, fp32):
        assert r["sds_loss"] != ref["sds_loss"] and r["sds_loss"] == pytest.approx(ref["sds_loss"], rel=BF16_LOSS_RTOL)
        assert r["clip_loss"] == pytest.approx(ref["clip_loss"], rel=BF16_LOSS_RTOL)
    state = load_file(tmp_path / "checkpoint.safetensors")
    assert any(k.startswith("param.") for k in state) and any(k.endswith(".exp_avg_sq") for k in state)
    assert {k: v.dtype for k, v in state.items() if v.dtype != torch.float32} == {}
    for file in ("model.safetensors", "mapper.safetensors"):
        assert {k: v.dtype for k, v in load_file(tmp_path / file).items() if v.dtype != torch.float32} == {}, file
    # a bf16 run resumes in bf16 only: --precision fp32, or the CPU's default (fp32), is refused
    for precision in (["--precision", "fp32"], []):
        with pytest.raises(SystemExit, match="other settings \\(--precision 'bf16' → 'fp32'\\)"):
            main(arguments(assets, tmp_path, "--max_steps", "3", "--resume", *precision))
    assert checkpoint_step(tmp_path / "checkpoint.safetensors") == 2


def test_resume_refuses_another_precision(assets, reference_run, tmp_path):
    shutil.copytree(reference_run, tmp_path, dirs_exist_ok=True)
    with pytest.raises(SystemExit, match="--precision 'fp32' → 'bf16'"):
        main(arguments(assets, tmp_path, "--max_steps", str(N_STEPS + 1), "--resume", "--precision", "bf16"))
    # A checkpoint written before --precision existed ran in its device's default: fp32 on the CPU.
    path = tmp_path / "checkpoint.safetensors"
    with safe_open(path, "pt") as f:
        meta, state = json.loads(f.metadata()["sds_clip"]), {k: f.get_tensor(k) for k in f.keys()}
    del meta["settings"]["precision"]
    save_file(state, path, metadata={"sds_clip": json.dumps(meta)})
    with pytest.raises(SystemExit, match="--precision 'fp32' → 'bf16'"):
        main(arguments(assets, tmp_path, "--max_steps", str(N_STEPS + 1), "--resume", "--precision", "bf16"))
    main(arguments(assets, tmp_path, "--max_steps", str(N_STEPS + 1), "--resume"))
    assert checkpoint_step(path) == N_STEPS + 1


# ----------------------------------------------------------------------------- resume


def test_resume_after_max_steps_is_bit_identical(assets, reference_run, tmp_path):
    train(assets, tmp_path, "--max_steps", str(N_STEPS // 2))
    assert checkpoint_step(tmp_path / "checkpoint.safetensors") == N_STEPS // 2
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 2.3')  # a line a killed run left half-written: dropped on resume
    train(assets, tmp_path, "--max_steps", str(N_STEPS), "--resume")
    assert_bit_identical(tmp_path, reference_run)
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, N_STEPS + 1))


def test_resume_after_sigkill_is_bit_identical(assets, reference_run, tmp_path):
    # A longer run (--max_steps only stops a run, the schedule is the same), SIGKILLed once its
    # checkpoint has reached N/2: whatever it was doing then (a step, a checkpoint write) is lost.
    proc = train(assets, tmp_path, "--max_steps", str(3 * N_STEPS), "--save_every", "1", popen=True)
    checkpoint = tmp_path / "checkpoint.safetensors"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.exists() and checkpoint_step(checkpoint) >= N_STEPS // 2:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = checkpoint_step(checkpoint)
    assert N_STEPS // 2 <= killed_at < N_STEPS
    train(assets, tmp_path, "--max_steps", str(N_STEPS), "--save_every", "1", "--resume")
    assert_bit_identical(tmp_path, reference_run)


def test_resume_refuses_other_settings(assets, reference_run, tmp_path):
    shutil.copytree(reference_run, tmp_path, dirs_exist_ok=True)
    result = train(assets, tmp_path, "--max_steps", str(N_STEPS + 1), "--resume", "--sds_weight", "0.01", check=False)
    assert result.returncode != 0 and "--sds_weight 0.001 → 0.01" in result.stdout
    result = train(assets, tmp_path, "--max_steps", str(N_STEPS + 1), check=False)  # no --resume
    assert result.returncode != 0 and "pass --resume" in result.stdout


def test_resume_refuses_other_weights_or_captions(assets, reference_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference_run, out)
    torch.manual_seed(1)
    write_clip(tmp_path / "clip_other")  # the same architecture, other weights
    write_clip(tmp_path / "clip_wide", width=2 * WIDTH)
    write_sd(tmp_path / "sd_other")
    coco = tmp_path / "coco"
    shutil.copytree(assets / "coco", coco)
    captions = coco / "annotations" / "captions_train2017.json"
    captions.write_text(captions.read_text().replace('"two dogs 1"', '"two cats 1"'))  # as many images, one word
    cases = [({"clip": tmp_path / "clip_other"}, tmp_path / "clip_other" / "model.safetensors"),
             ({"clip": tmp_path / "clip_wide"}, tmp_path / "clip_wide" / "model.safetensors"),
             ({"sd": tmp_path / "sd_other"}, tmp_path / "sd_other" / "unet" / "diffusion_pytorch_model.safetensors"),
             ({"coco": coco}, captions)]
    for where, file in cases:
        result = train(assets, out, "--max_steps", str(N_STEPS + 1), "--resume", check=False, **where)
        assert result.returncode == 1 and "Traceback" not in result.stdout, result.stdout[-2000:]
        assert f"was trained from {assets}" in result.stdout and f"not from {file} (sha256" in result.stdout
        assert checkpoint_step(out / "checkpoint.safetensors") == N_STEPS
    shutil.copytree(assets / "clip", tmp_path / "clip_copy")  # the same files elsewhere: the same run
    train(assets, out, "--max_steps", str(N_STEPS + 1), "--resume", clip=tmp_path / "clip_copy")
    assert checkpoint_step(out / "checkpoint.safetensors") == N_STEPS + 1


def another(value):
    """A different value of a setting's type (check_resume compares settings by equality only)."""
    if isinstance(value, bool):
        return not value
    return value + 1 if isinstance(value, (int, float)) else f"{value}-other"


def test_resume_refuses_a_change_to_any_setting_outside_the_resumable_ones(tmp_path):
    # The settings a resume may change, pinned: moving one into these sets is a decision, not an edit.
    assert runs.RESUMABLE_CHANGES == {"clip", "sd", "coco_root", "out", "resume", "max_steps", "save_every",
                                          "log_every", "device", "num_workers", "skip_bad_images",
                                          "gradient_checkpointing", "winoground", "toy"}
    assert runs.LOGGED_CHANGES == {"lr", "warmup_steps", "cosine", "epochs", "grad_clip", "weight_decay"}
    args = get_args(COMMON)
    sources = {key: {"file": f"{key}.safetensors", "sha256": key * 10} for key in ("clip", "unet", "text_encoder",
                                                                                   "captions")}
    meta, path = {"settings": vars(args).copy(), "identity": sources}, tmp_path / "checkpoint.safetensors"
    assert runs.check_resume(path, meta, args, sources) == {}
    defining = set(vars(args)) - runs.RESUMABLE_CHANGES - runs.LOGGED_CHANGES
    assert {"seed", "sds_weight", "sds_mode", "batch_size", "grad_accum", "precision", "limit_images"} <= defining
    for name, value in vars(args).items():  # every setting of the parser, one changed at a time
        changed = argparse.Namespace(**vars(args) | {name: another(value)})
        if name in defining:
            with pytest.raises(SystemExit, match=re.escape(f"--{name} {value!r} → {another(value)!r}")):
                runs.check_resume(path, meta, changed, sources)
        else:
            expected = {name: [value, another(value)]} if name in runs.LOGGED_CHANGES else {}
            assert runs.check_resume(path, meta, changed, sources) == expected, name
    for key in sources:  # and every file the run trains from
        other = sources | {key: {"file": "other.safetensors", "sha256": "f" * 64}}
        with pytest.raises(SystemExit, match=f"not from other.safetensors .*resume with the same {key} file"):
            runs.check_resume(path, meta, args, other)


def test_resume_refuses_another_sd_text_encoder_or_seed(assets, reference_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference_run, out)
    with safe_open(out / "checkpoint.safetensors", "pt") as f:
        identity = json.loads(f.metadata()["sds_clip"])["identity"]
    assert set(identity) == {"clip", "unet", "text_encoder", "captions"}
    sd = tmp_path / "sd"  # the same UNet and tokenizer, another text encoder
    shutil.copytree(assets / "sd", sd)
    torch.manual_seed(1)
    perturbed(transformers.CLIPTextModel(transformers.CLIPTextConfig(**tiny_text_config()))).save_pretrained(
        sd / "text_encoder")
    with pytest.raises(SystemExit, match=re.escape(f"not from {sd / 'text_encoder' / 'model.safetensors'} (sha256")):
        main(arguments(assets, out, "--max_steps", str(N_STEPS + 1), "--resume", sd=sd))
    with pytest.raises(SystemExit, match="--seed 0 → 1"):
        main(arguments(assets, out, "--max_steps", str(N_STEPS + 1), "--resume", "--seed", "1"))
    assert checkpoint_step(out / "checkpoint.safetensors") == N_STEPS


@pytest.mark.parametrize("damage", ["empty", "truncated", "random bytes", "no metadata", "older train.py"])
def test_damaged_checkpoint_is_refused_in_one_line(assets, reference_run, tmp_path, damage):
    out = tmp_path / "out"
    shutil.copytree(reference_run, out)
    path = out / "checkpoint.safetensors"
    good = path.read_bytes()
    if damage == "no metadata":
        save_file({"x": torch.zeros(2)}, path)
    elif damage == "older train.py":  # its metadata had no identity
        with safe_open(path, "pt") as f:
            meta, state = json.loads(f.metadata()["sds_clip"]), {k: f.get_tensor(k) for k in f.keys()}
        save_file(state, path, metadata={"sds_clip": json.dumps({k: v for k, v in meta.items() if k != "identity"})})
    else:
        path.write_bytes({"empty": b"", "truncated": good[: len(good) // 2],
                          "random bytes": np.random.default_rng(0).bytes(4096)}[damage])
    with pytest.raises(SystemExit) as stopped:
        main(arguments(assets, out, "--max_steps", str(N_STEPS + 1), "--resume"))
    message = str(stopped.value)
    assert "\n" not in message and f"{path} is not a checkpoint this train.py can resume" in message
    assert "move it away to start afresh there, or pass another --out" in message


def test_log_rewrite_on_resume_is_atomic(assets, reference_run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(reference_run, out)
    log = out / "log.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 7, "loss": 2.3')  # a line a killed run left half-written: the resume drops it
    before = log.read_bytes()

    def crash(src, dst):
        raise OSError("a crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="a crash before the rename"):
        main(arguments(assets, out, "--max_steps", str(N_STEPS + 1), "--resume"))
    assert log.read_bytes() == before  # the old log, whole
    monkeypatch.undo()
    main(arguments(assets, out, "--max_steps", str(N_STEPS + 1), "--resume"))
    assert [r["step"] for r in log_records(out)] == list(range(1, N_STEPS + 2))


# ----------------------------------------------------------------------------- several processes

# Two processes compute the same sums in another order (the gathered contrastive batch, DDP's
# gradient average), so each step's gradients differ by float32 rounding. Measured after 6 steps:
# max |Δ| ≈ 1.5e-8 (≈ 1.2e-7, one float32 ulp at 1.0, in a 3-step stopgrad + grad_accum run), against
# ~1.5e-4 that 3 steps move the weights. The tolerance, 1e-5, is a fifth of one AdamW step
# (lr = 5e-5): rounding passes with room for other CPUs, while a wrong batch split or a missing
# gradient average moves weights by whole steps and fails (the logged losses catch a wrong
# contrastive batch directly).
DDP_ATOL = 1e-5


def test_torchrun_two_processes_matches_one(assets, reference_run, tmp_path, parity):
    result = train(assets, tmp_path, "--max_steps", str(N_STEPS), nproc=2)
    assert "2 process(es) × 2" in result.stdout
    ours, ref = tensors(tmp_path), tensors(reference_run)
    source = load_file(assets / "clip" / "model.safetensors")
    moved = max((ref[k] - source[k]).abs().max().item() for k in source if k in ref)
    assert moved > 1e-5  # the comparison is between runs that did train
    names = sorted(ref)
    parity("train torchrun ×2 vs 1 process, all weights after 6 steps",
           torch.cat([ours[k].flatten() for k in names]), torch.cat([ref[k].flatten() for k in names]), atol=DDP_ATOL)
    log2 = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    log1 = [json.loads(line) for line in (reference_run / "log.jsonl").read_text().splitlines()]
    parity("train torchrun ×2 vs 1 process, logged losses", torch.tensor([r["loss"] for r in log2]),
           torch.tensor([r["loss"] for r in log1]), atol=1e-5)
    # the gradient norm AdamW sees (which AdamW hides in the weights if it is uniformly scaled, by a
    # wrong 1/W, say), and what each term sends to f_φ(x), over the global batch
    for key in ("grad_norm", "clip_grad_norm", "sds_grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in log2]), torch.tensor([r[key] for r in log1]),
                                   rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- export


def test_export_loads_in_transformers_and_ours(assets, reference_run, parity):
    ref = transformers.CLIPModel.from_pretrained(reference_run).eval()
    ours = load_clip(reference_run)
    tokenizer = load_tokenizer(reference_run)
    hf_tokenizer = transformers.CLIPTokenizer.from_pretrained(reference_run)
    captions = ["a red cup 0", "two dogs on a bike"]
    ids = tokenizer(captions)
    hf_ids = hf_tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids[:, :5], hf_ids[:, :5])
    image = Image.open(next((assets / "coco" / "train2017").glob("*.jpg")))
    pixels = image_transform(IMAGE_SIZE)(image)[None].repeat(2, 1, 1, 1)
    with torch.no_grad():
        parity("train export: image embeds, transformers vs load_clip", ours.encode_image(pixels),
               ref.get_image_features(pixel_values=pixels))
        parity("train export: text embeds, transformers vs load_clip", ours.encode_text(ids),
               ref.get_text_features(input_ids=ids))
    mapper = Mapper(PROJECTION_DIM, (4, LATENT_SIZE, LATENT_SIZE))
    mapper.load_state_dict(load_file(reference_run / "mapper.safetensors"), strict=True)


# ----------------------------------------------------------------------------- bad inputs


def test_missing_annotation_file(assets, tmp_path):
    result = train(assets, tmp_path / "out", coco=tmp_path / "nococo", check=False)
    missing = tmp_path / "nococo" / "annotations" / "captions_train2017.json"
    assert result.returncode == 1 and f"{missing} not found" in result.stdout and "download.py" in result.stdout
    assert "Traceback" not in result.stdout


def test_missing_weights(assets, tmp_path):
    result = train(assets, tmp_path / "out", sd=tmp_path / "nosd", check=False)
    assert result.returncode == 1 and f"{tmp_path / 'nosd' / 'unet'} not found" in result.stdout
    assert "python weights/download.py" in result.stdout and "Traceback" not in result.stdout


def test_v_prediction_model_is_refused_in_one_line(assets, tmp_path):
    """SD 2.x's 768-pixel models predict v, not ε: refused before any weight loads."""
    sd = tmp_path / "sd-v"
    shutil.copytree(assets / "sd", sd, ignore=shutil.ignore_patterns("*.safetensors"))
    (sd / "scheduler").mkdir(exist_ok=True)
    (sd / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    result = train(assets, tmp_path / "out", sd=sd, check=False)
    assert result.returncode == 1 and "says prediction_type 'v_prediction'" in result.stdout
    assert "Traceback" not in result.stdout


def test_missing_and_corrupt_images(assets, tmp_path):
    coco = tmp_path / "coco"
    shutil.copytree(assets / "coco", coco)
    files = sorted((coco / "train2017").glob("*"))
    files[0].unlink()  # image id 1000: the first of the dataset
    files[1].write_bytes(files[1].read_bytes()[:100])  # truncated
    result = train(assets, tmp_path / "a", "--max_steps", "1", "--epochs", "1", coco=coco, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stdout
    assert f"{files[0]} not found" in result.stdout or f"{files[1]} cannot be read" in result.stdout
    result = train(assets, tmp_path / "b", "--epochs", "1", "--skip_bad_images", coco=coco)
    assert "skipped 2 missing or unreadable image(s)" in result.stdout
    assert str(files[0]) in result.stdout and str(files[1]) in result.stdout


@pytest.mark.parametrize("setting, value", [("--lr", "nan"), ("--lr", "inf"), ("--lr", "1e38"), ("--lr", "-1"),
                                            ("--lr", "0"), ("--sds_weight", "nan"), ("--grad_clip", "-1"),
                                            ("--weight_decay", "inf"), ("--batch_size", "0"), ("--seed", "-1"),
                                            ("--mapper_images", "5")])
def test_bad_settings_are_one_argparse_line(setting, value, capsys):
    with pytest.raises(SystemExit) as stopped:
        get_args([setting, value])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after argparse's usage lines
    assert f": error: {setting} must be" in error and "; got " in error


def test_nan_loss_stops_before_any_checkpoint(assets, tmp_path):
    poisoned = tmp_path / "sd"
    write_sd(poisoned, poison=True)
    result = train(assets, tmp_path / "out", "--save_every", "1", sd=poisoned, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stdout
    assert "the loss is inf at step 0" in result.stdout or "the loss is nan at step 0" in result.stdout
    assert "stopped. No checkpoint was written yet." in result.stdout
    assert not (tmp_path / "out" / "checkpoint.safetensors").exists()


def test_divergence_keeps_a_good_checkpoint_and_a_resume_may_lower_lr(assets, reference_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference_run, out)
    checkpoint = out / "checkpoint.safetensors"
    good = checkpoint.read_bytes()
    # lr 1e30: step 6 is finite but moves the weights by ~1e30, and step 7's loss is NaN. Those weights are never
    # saved: the checkpoint it names is the one it started from.
    result = train(assets, out, "--max_steps", str(N_STEPS + 4), "--save_every", "1", "--resume", "--lr", "1e30",
                   check=False)
    assert result.returncode == 1 and "Traceback" not in result.stdout
    assert f"at step {N_STEPS + 1}" in result.stdout and "stopped." in result.stdout
    assert f"The last good checkpoint, step {N_STEPS}, is kept in {checkpoint}" in result.stdout
    assert checkpoint.read_bytes() == good
    # The stop message's advice: resume with a lower --lr and a --grad_clip; log.jsonl says where they changed.
    train(assets, out, "--max_steps", str(N_STEPS + 2), "--save_every", "1", "--resume", "--lr", "1e-5",
          "--grad_clip", "1")
    records = log_records(out)
    assert [r["step"] for r in records] == [*range(1, N_STEPS + 1), N_STEPS, N_STEPS + 1, N_STEPS + 2]
    assert records[N_STEPS] == {"step": N_STEPS, "changed": {"lr": [5e-05, 1e-05], "grad_clip": [0.0, 1.0]}}
    trained = [r for r in records if "loss" in r]
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] < 1e3 for r in trained)
    assert trained[-1]["lr"] < 1e-5  # the cosine schedule of the new --lr
    with safe_open(checkpoint, "pt") as f:
        assert json.loads(f.metadata()["sds_clip"])["settings"]["lr"] == 1e-5


@pytest.mark.parametrize("broken", ["param", "exp_avg_sq"])
def test_update_that_leaves_state_nonfinite_stops_and_is_not_saved(assets, tmp_path, monkeypatch, broken):
    """An update whose loss and gradient were finite can still leave a weight or an Adam moment
    non-finite (here planted after the 3rd update): the run stops there and saves none of it."""
    adamw_step, updates = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):
        result = adamw_step(self, *args, **kwargs)
        updates.append(1)
        if len(updates) == 3:
            p = self.param_groups[0]["params"][0]
            (p if broken == "param" else self.state[p]["exp_avg_sq"]).data.fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        main(arguments(assets, out, "--max_steps", str(N_STEPS), "--save_every", "1"))
    assert "AdamW's update at step 2 left 1 non-finite tensor(s)" in str(stopped.value)
    assert f"The last good checkpoint, step 2, is kept in {out / 'checkpoint.safetensors'}" in str(stopped.value)
    assert checkpoint_step(out / "checkpoint.safetensors") == 2
    assert not nonfinite(load_file(out / "checkpoint.safetensors"))


def test_grad_clip_bounds_the_gradient_adamw_steps_with(assets, reference_run, tmp_path):
    """--grad_clip at half the smallest gradient norm of the reference run: at every step AdamW
    sees the gradient scaled to norm --grad_clip, while log.jsonl keeps the norm before clipping."""
    max_norm = min(r["grad_norm"] for r in log_records(reference_run)) / 2
    seen = []

    def spy(optimizer, args, kwargs):  # the norm of the gradient the step is about to use
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    handle = register_optimizer_step_pre_hook(spy)
    try:
        main(arguments(assets, tmp_path, "--max_steps", "3", "--grad_clip", str(max_norm)))
    finally:
        handle.remove()
    logged = [r["grad_norm"] for r in log_records(tmp_path)]
    assert len(seen) == len(logged) == 3 and min(logged) > max_norm  # the clip had work to do
    assert seen == pytest.approx([max_norm] * 3, rel=1e-3)  # scaled by max_norm / (norm + 1e-6)


def test_write_checkpoint_refuses_nonfinite_state(tmp_path):
    state = {"param.w": torch.ones(3), "adamw.w.step": torch.tensor(1.0), "adamw.w.exp_avg_sq": torch.ones(3)}
    write_checkpoint(tmp_path / "a.safetensors", state, {"step": 1})
    state["adamw.w.exp_avg_sq"][1] = float("nan")
    assert nonfinite(state) == ["adamw.w.exp_avg_sq"]
    with pytest.raises(ValueError, match="adamw.w.exp_avg_sq"):
        write_checkpoint(tmp_path / "b.safetensors", state, {"step": 2})
    assert not (tmp_path / "b.safetensors").exists()


def test_out_that_cannot_be_written_is_one_argparse_line(tmp_path, capsys):
    """Checked before any model loads, rather than when the log is first written."""
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as stopped:
        get_args(["--out", str(tmp_path / "file" / "out")])
    assert stopped.value.code == 2
    assert f"--out {tmp_path / 'file' / 'out'} cannot be written" in capsys.readouterr().err.splitlines()[-1]


def test_out_that_is_or_lies_inside_a_source_is_one_argparse_line(tmp_path, capsys, monkeypatch):
    """--out must not write over what the run reads: --clip, --sd (a local folder, a hub id's
    snapshot) or the shipped toy models, reached through a link or a relative path too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "clip").mkdir()
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "clip")
    snapshot = fake_cache(tmp_path / "hub", "org/name")
    local = ["--clip", "clip", "--sd", str(tmp_path / "sd")]
    cases = [(local + ["--out", "clip"], "is --clip"), (local + ["--out", "clip/run"], "lies inside --clip"),
             (local + ["--out", "link/run"], "lies inside --clip"),
             (local + ["--out", "sd/../sd/unet"], "lies inside --sd"),
             (["--clip", "org/name", "--out", str(snapshot / "run")], "lies inside --clip"),
             (["--toy", "--out", str(REPO / "weights" / "toy-models" / "clip")], "lies inside the shipped toy models"),
             (local + ["--out", str(REPO / "weights" / "toy-models")], "is the shipped toy models")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as stopped:
            get_args(argv)
        assert stopped.value.code == 2, argv
        err = capsys.readouterr().err.splitlines()[-1]
        assert f"{message} (" in err and err.endswith("whose files the run would write over; pass another --out"), err
    assert get_args(local + ["--out", "out"]).out == "out"  # beside the sources, or above them: allowed
    assert get_args(local + ["--out", "."]).out == "."


def test_missing_sources_name_train_options(assets, tmp_path):
    """A user of train.py is told which of its options names what is missing."""
    with pytest.raises(SystemExit, match=rf"^train.py: --clip {tmp_path / 'noclip'}: no such folder — pass a CLIP"):
        main(arguments(assets, tmp_path / "out", clip=tmp_path / "noclip"))
    with pytest.raises(SystemExit, match=rf"^train.py: --sd {tmp_path / 'nosd'}: .*unet not found — pass a Stable"):
        main(arguments(assets, tmp_path / "out", sd=tmp_path / "nosd"))
    with pytest.raises(SystemExit, match=r"captions_train2017.json not found — pass --coco_root the folder"):
        main(arguments(assets, tmp_path / "out", coco=tmp_path / "nococo"))
    with pytest.raises(SystemExit, match=r"Winoground not found at .*, or pass --winoground$"):
        main(arguments(assets, tmp_path / "out", "--winoground", str(tmp_path / "nowino")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"no parquet files: point --winoground to a copy of "):
        main(arguments(assets, tmp_path / "out", "--winoground", str(tmp_path / "empty")))


def test_missing_default_weights_name_the_download_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no weights/ here
    with pytest.raises(SystemExit) as stopped:
        main(["--device", "cpu"])
    assert str(stopped.value) == ("train.py: weights/clip-vit-base-patch32 and weights/stable-diffusion-v1-4 not "
                                  "found — run `python weights/download.py clip-vit-base-patch32 "
                                  "stable-diffusion-v1-4`")


def test_winoground_parquet_without_pyarrow_is_one_line(assets, tmp_path, monkeypatch):
    (tmp_path / "test.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` fails
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(SystemExit) as stopped:
        main(arguments(assets, tmp_path / "out", "--winoground", str(tmp_path / "test.parquet")))
    assert str(stopped.value).startswith(f"train.py: {tmp_path / 'test.parquet'} is a parquet file and reading it "
                                         f"needs pyarrow (`pip install pyarrow`)")


def test_resume_with_an_unreadable_winoground_image_stops_before_training(assets, reference_run, tmp_path):
    """A resume scores Winoground first at the epoch's end: its images are read at the start instead."""
    wino, out = tmp_path / "winoground", tmp_path / "out"
    write_winoground(wino)
    (wino / "images" / "ex_3_img_1.png").write_bytes(b"not a png")
    shutil.copytree(reference_run, out)
    with pytest.raises(SystemExit) as stopped:
        main(arguments(assets, out, "--max_steps", str(N_STEPS + 2), "--resume", "--winoground", str(wino)))
    assert str(stopped.value).startswith(f"train.py: {wino / 'images' / 'ex_3_img_1.png'} is not a readable image")
    assert [r["step"] for r in log_records(out)] == list(range(1, N_STEPS + 1))  # no step was taken


def edit_checkpoint(path: Path, edit) -> None:
    """Rewrite a checkpoint after edit(metadata, tensors), as a user with a text editor and safetensors might."""
    with safe_open(path, "pt") as f:
        meta, state = json.loads(f.metadata()["sds_clip"]), {k: f.get_tensor(k) for k in f.keys()}
    edit(meta, state)
    save_file(state, path, metadata={"sds_clip": json.dumps(meta)})


def first(state: dict, suffix: str) -> str:
    return sorted(key for key in state if key.endswith(suffix))[0]


@pytest.mark.parametrize("edit, message", [
    (lambda m, s: m.update(settings=["lr", 5e-5]), "is not a checkpoint this train.py can resume (TypeError: "),
    (lambda m, s: m.update(identity=["clip"]), "is not a checkpoint this train.py can resume (TypeError: "),
    (lambda m, s: m["identity"].update(clip="abc"), "is not a checkpoint this train.py can resume (TypeError: "),
    (lambda m, s: m.update(step="6"), "is not a checkpoint this train.py can resume (TypeError: "),
    (lambda m, s: s.pop(first(s, ".exp_avg")), "holds AdamW moments that are missing or of the wrong shape: adamw."),
    (lambda m, s: s.update({first(s, ".exp_avg_sq"): torch.ones(3)}), "holds AdamW moments that are missing or of "
                                                                       "the wrong shape: adamw."),
    (lambda m, s: s[first(s, "weight")].view(-1)[0].fill_(float("nan")),
     "is not a checkpoint this train.py can resume (ValueError: NaN or infinite values in param."),
])
def test_hand_edited_checkpoint_is_refused_in_one_line(assets, reference_run, tmp_path, edit, message):
    """Metadata of the wrong type, an AdamW moment missing or of another shape, NaN weights (train.py never saves
    them: such a file is not "the last good checkpoint")."""
    out = tmp_path / "out"
    shutil.copytree(reference_run, out)
    edit_checkpoint(out / "checkpoint.safetensors", edit)
    with pytest.raises(SystemExit) as stopped:
        main(arguments(assets, out, "--max_steps", str(N_STEPS + 1), "--resume"))
    assert "\n" not in str(stopped.value) and message in str(stopped.value)
    assert "last good" not in str(stopped.value)


def test_log_that_is_not_utf8_on_resume_is_one_line(assets, reference_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference_run, out)
    with open(out / "log.jsonl", "ab") as f:
        f.write(b'{"step": 7, "note": "\xff"}\n')
    with pytest.raises(SystemExit) as stopped:
        main(arguments(assets, out, "--max_steps", str(N_STEPS + 1), "--resume"))
    assert str(stopped.value).startswith(f"train.py: {out / 'log.jsonl'} is not UTF-8 text (byte ")


@pytest.mark.parametrize("weights", ["--clip hub id", "--sd hub id", "--clip open_clip folder"])
def test_bring_your_own_weights_train_and_resume(assets, tmp_path, monkeypatch, weights):
    """The README's commands: hub ids resolved in the local Hugging Face cache, and a LAION-style folder
    (open_clip_model.safetensors + open_clip_config.json + the tokenizer files)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    if weights == "--clip hub id":
        shutil.copytree(assets / "clip", fake_cache(tmp_path / "hub", "someone/tiny-clip"), dirs_exist_ok=True)
        models = {"clip": "someone/tiny-clip"}
    elif weights == "--sd hub id":
        shutil.copytree(assets / "sd", fake_cache(tmp_path / "hub", "someone/tiny-sd"), dirs_exist_ok=True)
        models = {"sd": "someone/tiny-sd"}
    else:
        save_open_clip(open_clip_model(quick_gelu=False), tmp_path / "laion" / "open_clip_model.safetensors")
        (tmp_path / "laion" / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 32}}))
        write_tokenizer(tmp_path / "laion")
        models = {"clip": tmp_path / "laion"}
    out = tmp_path / "out"
    main(arguments(assets, out, "--max_steps", "1", **models))
    main(arguments(assets, out, "--max_steps", "2", "--resume", **models))
    assert checkpoint_step(out / "checkpoint.safetensors") == 2
    assert (out / "vocab.json").is_file() and load_clip(out)  # the export, with the source's tokenizer files


# ----------------------------------------------------------------------------- Winoground, the toy world


def winoground_percentages(clip_folder: Path, data: Winoground) -> dict:
    """eval_winoground's own CLIP scores of a checkpoint: what train.py's log must hold."""
    model, tokenizer = load_clip(clip_folder), load_tokenizer(clip_folder)
    return percentages(score_examples(data.examples, clip_scores(model, tokenizer, data, data.examples)))


def test_winoground_during_training_scores_and_changes_no_weight(assets, reference_run, tmp_path):
    wino = tmp_path / "winoground"
    write_winoground(wino)
    out = tmp_path / "out"
    first = train(assets, out, "--max_steps", str(N_STEPS - 1), "--winoground", str(wino))
    last = train(assets, out, "--max_steps", str(N_STEPS), "--resume", "--winoground", str(wino))
    assert_bit_identical(out, reference_run)  # the evaluations draw nothing that training uses
    records = log_records(out)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, N_STEPS + 1))
    scores = [r for r in records if "winoground" in r]  # before, each epoch's end (2 steps), the last steps
    assert [(r["step"], r["epoch"]) for r in scores] == [(0, 0), (2, 1), (4, 2), (5, 2.5), (6, 3)]
    data = Winoground(wino)
    for record, folder in ((scores[0], assets / "clip"), (scores[-1], reference_run)):
        expected = winoground_percentages(folder, data)
        assert {k: record["winoground"][k] for k in expected} == expected
    assert set(scores[0]["winoground"]["by_tag"]) == {"collapsed_tag=Object", "collapsed_tag=Relation",
                                                      "num_main_preds=1", "num_main_preds=2"}
    assert "winoground, step 0 (epoch 0): text" in first.stdout
    assert "before (step 0)" in last.stdout and "after (step 6)" in last.stdout


def test_toy_trains_on_the_toy_world_by_default(monkeypatch, tmp_path):
    from weights import toyworld

    paths = toyworld.build(tmp_path / "toy", quick=True)
    monkeypatch.setattr(toyworld, "build", lambda: paths)  # --toy builds weights/toy/; here a quick build
    args = get_args(["--toy"])  # the settings; main fills in the paths once the world is built
    assert (args.clip, args.sd, args.coco_root, args.winoground, args.out) == (None, None, None, None,
                                                                              train_py.TOY_OUT)
    assert all(getattr(args, key) == value for key, value in toyworld.TRAIN_DEFAULTS.items())
    explicit = get_args(["--toy", "--epochs", "7", "--out", str(tmp_path / "o"), "--winoground", "w"])
    assert (explicit.epochs, explicit.out, explicit.winoground) == (7, str(tmp_path / "o"), "w")  # they win
    assert get_args([]).clip == "weights/clip-vit-base-patch32"  # without --toy, the paper's defaults

    out = tmp_path / "out"
    main(["--toy", "--max_steps", "2", "--out", str(out), "--device", "cpu"])
    with safe_open(out / "checkpoint.safetensors", "pt") as f:
        settings = json.loads(f.metadata()["sds_clip"])["settings"]
    assert (settings["clip"], settings["sd"], settings["coco_root"], settings["winoground"]) == (
        str(paths["clip"]), str(paths["sd"]), str(paths["train"]), str(paths["test"]))
    records = log_records(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert [r["step"] for r in records if "winoground" in r] == [0, 2]
    assert load_clip(out).config == load_clip(paths["clip"]).config  # the export of the toy CLIP
