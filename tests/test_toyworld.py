"""weights/toyworld.py: its files are the official layouts, read by the references and by our
scripts; its data is deterministic; and the whole method runs on it end to end.

One `--quick` build per session (under a minute) serves every test here.
"""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel

from clip import Tokenizer, load_clip
from eval_winoground import Winoground
from train import CocoCaptions
from unet import load_unet
from vae import load_vae
from weights import toyworld

REPO = Path(__file__).resolve().parent.parent
OBJECT = re.compile(rf"\b({'|'.join(toyworld.COLOURS)}) ({'|'.join(toyworld.SHAPES)})\b")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return toyworld.build(tmp_path_factory.mktemp("toy"), seed=0, quick=True)


def digest(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def objects(caption: str) -> set[tuple[str, str]]:
    return set(OBJECT.findall(caption))


def test_data_is_deterministic_given_the_seed(tmp_path):
    small = toyworld.Recipe(train_images=20, val_examples=6, test_examples=6)
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        toyworld.draw_data(tmp_path / name, small, seed)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_the_build_is_cached(world, capsys):
    marker = world["clip"].parent / "build.json"
    before = marker.stat().st_mtime_ns
    assert toyworld.build(world["clip"].parent, seed=0, quick=True) == world
    assert marker.stat().st_mtime_ns == before and "building" not in capsys.readouterr().out


def test_full_recipe_sizes():
    recipe = toyworld.Recipe()
    assert recipe.test_examples >= 400 and recipe.val_examples > 0
    assert len(toyworld.COLOURS) >= 5 and len(toyworld.SHAPES) >= 4


def test_train_split_reads_as_coco(world):
    data = CocoCaptions(world["train"], lambda image: image.size)
    assert len(data) == toyworld.QUICK.train_images
    assert all(len(c) == toyworld.CAPTIONS_PER_IMAGE for c in data.captions)
    assert data[0][0] == (toyworld.IMAGE_SIZE, toyworld.IMAGE_SIZE)
    seen = set().union(*(objects(c) for cs in data.captions for c in cs))
    assert seen and not seen & toyworld.HELD_OUT  # no held-out colour–shape pair is ever shown in training


@pytest.mark.parametrize("split", ["val", "test"])
def test_winoground_splits(world, split):
    data = Winoground(world[split])
    assert len(data) == getattr(toyworld.QUICK, f"{split}_examples")
    assert {e.collapsed_tag for e in data.examples} == set(toyworld.TAGS)
    for e in data.examples:
        assert e.caption_0 != e.caption_1 and sorted(e.caption_0.split()) == sorted(e.caption_1.split())
        assert objects(e.caption_0) | objects(e.caption_1) <= toyworld.HELD_OUT
        assert data.image(e.image_0).size == (toyworld.IMAGE_SIZE, toyworld.IMAGE_SIZE)


def test_swaps_change_what_the_picture_shows():
    rng = __import__("numpy").random.default_rng(0)
    for tag in toyworld.TAGS:
        for _ in range(20):
            scene, swapped, caption_0, caption_1 = toyworld.swap_example(tag, rng)
            assert scene != swapped and caption_0 != caption_1
            if tag == "attribute":  # the shapes stay in place, the colours trade
                assert (scene.first[1], scene.second[1]) == (swapped.first[1], swapped.second[1])
                assert (scene.first[0], scene.second[0]) == (swapped.second[0], swapped.first[0])
            else:  # the objects trade places
                assert (scene.first, scene.second) == (swapped.second, swapped.first)


def test_tokenizer_files_read_the_same_in_transformers(world):
    ours = Tokenizer.from_pretrained(world["clip"])
    ref = transformers.CLIPTokenizer.from_pretrained(world["sd"] / "tokenizer")
    captions = [c for cs in CocoCaptions(world["train"], None).captions[:50] for c in cs]
    captions += [e.caption_0 for e in Winoground(world["test"]).examples]
    expected = ref(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ours(captions, pad_token_id=ours.eot_id), expected)
    assert all(len(ours.encode(word)) == 1 for word in ["red", "circle", "left", "bottom"])  # whole-word tokens


def test_models_load_in_the_reference_libraries(world, parity):
    g = torch.Generator().manual_seed(0)
    clip, tokenizer = load_clip(world["clip"]), Tokenizer.from_pretrained(world["clip"])
    ref = transformers.CLIPModel.from_pretrained(world["clip"]).eval()
    pixels = torch.randn(2, 3, toyworld.IMAGE_SIZE, toyworld.IMAGE_SIZE, generator=g)
    ids = tokenizer(["a red circle above a blue square", "a green cross left of a yellow triangle"])
    with torch.no_grad():
        parity("toy CLIP logits", clip(pixels, ids), ref(input_ids=ids, pixel_values=pixels).logits_per_image)
        text_encoder = load_clip(world["sd"] / "text_encoder")
        ref_text = transformers.CLIPTextModel.from_pretrained(world["sd"] / "text_encoder").eval()
        parity("toy SD text encoder", text_encoder.text_model(ids), ref_text(ids).last_hidden_state)

        vae, ref_vae = load_vae(world["sd"] / "vae"), AutoencoderKL.from_pretrained(world["sd"] / "vae").eval()
        assert vae.config.scaling_factor == pytest.approx(ref_vae.config.scaling_factor)
        images = torch.rand(2, 3, toyworld.IMAGE_SIZE, toyworld.IMAGE_SIZE, generator=g) * 2 - 1
        parity("toy VAE encode mean", vae.encode(images).mean, ref_vae.encode(images).latent_dist.mean)
        latents = torch.randn(2, 4, 8, 8, generator=g)
        parity("toy VAE decode", vae.decode(latents), ref_vae.decode(latents).sample)

        unet, ref_unet = load_unet(world["sd"] / "unet"), UNet2DConditionModel.from_pretrained(world["sd"] / "unet")
        context = text_encoder.text_model(tokenizer(["a red circle", ""], pad_token_id=tokenizer.eot_id))
        t = torch.tensor([10, 700])
        parity("toy UNet", unet(latents, t, context), ref_unet.eval()(latents, t, context).sample)


def test_method_runs_end_to_end(world, tmp_path):
    """train.py (the real loop: SDS-CLIP on the toy CLIP and SD) for a few steps, then both
    Winoground scorers of eval_winoground.py on its test split: every score finite."""
    out = tmp_path / "run"
    subprocess.run([sys.executable, "train.py", "--clip", str(world["clip"]), "--sd", str(world["sd"]),
                    "--coco_root", str(world["train"]), "--out", str(out), "--device", "cpu", "--batch_size", "8",
                    "--max_steps", "3", "--num_workers", "0", "--sds_weight", "1"], cwd=REPO, check=True)
    losses = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in losses)
    for model in (["--clip", str(out)], ["--sd", str(world["sd"]), "--timesteps", "4"]):
        result = tmp_path / "result.json"
        subprocess.run([sys.executable, "eval_winoground.py", *model, "--data", str(world["test"]),
                        "--resolution", str(toyworld.IMAGE_SIZE), "--out", str(result)], cwd=REPO, check=True)
        scores = torch.tensor([e["scores"] for e in json.loads(result.read_text())["examples"]])
        assert scores.shape == (toyworld.QUICK.test_examples, 2, 2) and torch.isfinite(scores).all()
