"""weights/toyworld/: its files are the official layouts, read by the references and by our
scripts; its data is deterministic and its splits hold what they claim; its reader, sampler
and shipped models are what the README's checks rest on; and the whole method runs on it.

One `--quick` build per session (about a minute) serves most tests here.
"""

import hashlib
import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image

from sds import NoiseSchedule, encode_prompt
from unet import UNet
from weights import toyworld
from weights.coco import CocoCaptions
from weights.networks import load_clip, load_stable_diffusion, load_tokenizer, load_unet, load_vae
from weights.winoground import Winoground

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return toyworld.build(tmp_path_factory.mktemp("toy"), seed=0, quick=True)


def digest(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def scenes(folder: Path) -> list[toyworld.Scene]:
    return [toyworld.Scene(tuple(s["first"]), tuple(s["second"]), s["axis"])
            for s in json.loads((folder / "scenes.json").read_text()).values()]


def pairing(scene: toyworld.Scene) -> frozenset:
    return frozenset({scene.first, scene.second})


def test_data_is_deterministic_given_the_seed(tmp_path):
    small = toyworld.Recipe(train_images=20, val_examples=6, test_examples=6,
                            new_objects_examples=6)
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        toyworld.draw_data(tmp_path / name, small, seed)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_the_build_is_cached_under_its_settings(world, tmp_path, capsys):
    marker = world["train"].parent.parent / "build.json"
    before = marker.stat().st_mtime_ns
    assert toyworld.build(marker.parent, seed=0, quick=True) == world
    assert marker.stat().st_mtime_ns == before and capsys.readouterr().out == ""
    # Another seed is another world: the cache is not reused.
    copy = tmp_path / "copy"
    shutil.copytree(marker.parent, copy)
    toyworld.build(copy, seed=1, quick=True)
    assert json.loads((copy / "build.json").read_text())["seed"] == 1
    assert digest(copy / "data") != digest(marker.parent / "data")


def test_out_never_removes_a_folder_it_did_not_build(tmp_path):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "precious.txt").write_text("x")
    # absent, not JSON, not an object, not ours
    for build_json in (None, "not json", "[1, 2]", '{"seed": 0}'):
        if build_json is not None:
            (mine / "build.json").write_text(build_json)
        with pytest.raises(SystemExit, match="is not a toy-world build .* nothing was removed"):
            toyworld.build(mine, quick=True)
        assert (mine / "precious.txt").read_text() == "x" and (mine / "sub").is_dir()
    (mine / "build.json").unlink()
    with pytest.raises(SystemExit,
                       match="holds files but no models.json: it is not a toy-models folder"):
        # --rebuild --models into a folder not ours
        toyworld.build(tmp_path / "data", rebuild=True, models=mine)
    assert (mine / "precious.txt").read_text() == "x" and not (tmp_path / "data").exists()


def test_shipped_models_are_whole_and_load():
    """weights/toy-models: every file models.json lists, with its sha256; they load as a CLIP and an
    SD."""
    record = json.loads((toyworld.MODELS_DIR / "models.json").read_text())
    assert record["settings"] == {"version": toyworld.VERSION, "seed": 0,
                                  "recipe": vars(toyworld.Recipe())}
    assert {"clip/model.safetensors",
            "sd/unet/diffusion_pytorch_model.safetensors"} <= set(record["sha256"])
    toyworld.check_shipped(toyworld.MODELS_DIR)
    assert load_clip(toyworld.MODELS_DIR / "clip").config.vision.image_size == toyworld.IMAGE_SIZE
    assert load_stable_diffusion(toyworld.MODELS_DIR / "sd").resolution == toyworld.IMAGE_SIZE


def test_a_damaged_shipped_file_is_named(tmp_path):
    copy = tmp_path / "toy-models"
    shutil.copytree(toyworld.MODELS_DIR, copy)
    weights = copy / "sd" / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(SystemExit, match=f"{weights} is missing or differs from the sha256"):
        toyworld.check_shipped(copy)


def test_build_checks_the_shipped_models_before_drawing(tmp_path):
    """build() itself checks the sha256 of the shipped models, before it draws anything."""
    copy = tmp_path / "toy-models"
    shutil.copytree(toyworld.MODELS_DIR, copy)
    weights = copy / "clip" / "model.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[len(damaged) // 2] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(damaged))
    with pytest.raises(SystemExit, match=f"{weights} is missing or differs from the sha256"):
        toyworld.build(tmp_path / "toy", models=copy)
    assert not (tmp_path / "toy").exists()


def test_models_json_lists_only_files_inside_its_folder(tmp_path):
    copy = tmp_path / "toy-models"
    shutil.copytree(toyworld.MODELS_DIR, copy)
    (tmp_path / "x").write_text("x")
    record = json.loads((copy / "models.json").read_text())
    for name in ("../x", str(tmp_path / "x")):
        listed = {name: hashlib.sha256(b"x").hexdigest()}
        (copy / "models.json").write_text(json.dumps(record | {"sha256": listed}))
        with pytest.raises(SystemExit, match="a file outside .*toy-models"):
            toyworld.check_shipped(copy)
    for wrong in (["clip/model.safetensors"], {"clip/model.safetensors": 1}, "x"):
        (copy / "models.json").write_text(json.dumps(record | {"sha256": wrong}))
        with pytest.raises(SystemExit, match='"sha256" must map file names to hex digests') as err:
            toyworld.check_shipped(copy)
        assert "\n" not in str(err.value)


def test_sha256_reads_a_file_a_chunk_at_a_time(tmp_path, monkeypatch):
    file = tmp_path / "weights.bin"
    file.write_bytes(bytes(range(256)) * 5000)
    expected = hashlib.sha256(file.read_bytes()).hexdigest()

    def whole(self):
        raise AssertionError(f"{self} read whole")

    monkeypatch.setattr(Path, "read_bytes", whole)
    assert toyworld.sha256(file) == expected


def test_an_interrupted_draw_is_drawn_again(world, tmp_path, monkeypatch):
    """A draw killed halfway (the test split's writer fails after its first images) is not taken for
    a finished one: the rerun draws it again, and the data is the same bytes as an unbroken draw."""
    write = toyworld.recipe.write_winoground

    def killed(root, n, blocks, rng):
        if root.name == "test":
            write(root, 2, blocks, rng)
            raise KeyboardInterrupt
        write(root, n, blocks, rng)

    monkeypatch.setattr(toyworld.recipe, "write_winoground", killed)
    out = tmp_path / "toy"
    with pytest.raises(KeyboardInterrupt):
        toyworld.build(out, seed=0, quick=True)
    monkeypatch.undo()
    # the quick models of these settings, so that the rerun trains none
    shutil.copytree(world["clip"].parent, out / "models")
    assert toyworld.build(out, seed=0, quick=True)["test"] == out / "data" / "test"
    assert digest(out / "data") == digest(world["train"].parent)


def test_a_deleted_data_file_is_drawn_again(world, tmp_path, capsys):
    """build.json is not the only proof of a draw: a split with a file missing is drawn again."""
    copy = tmp_path / "copy"
    shutil.copytree(world["train"].parent.parent, copy)
    (copy / "data" / "test" / "images" / "ex_3_img_1.png").unlink()
    (copy / "data" / "train" / "scenes.json").unlink()
    assert toyworld.build(copy, seed=0, quick=True)["test"] == copy / "data" / "test"
    assert "drawing the toy world's data" in capsys.readouterr().out
    assert digest(copy / "data") == digest(world["train"].parent)


def never_built(*args, **kwargs):
    raise AssertionError("built: the option should have been refused first")


def test_the_script_never_writes_into_the_shipped_models_or_through_a_link(tmp_path, monkeypatch,
                                                                           capsys):
    """python -m weights.toyworld --out: the shipped models' folder, a folder inside it, or a
    symbolic link is argparse's one line, before anything is built."""
    script = importlib.import_module("weights.toyworld.__main__")
    monkeypatch.setattr(script, "build", never_built)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for out, reason in ((toyworld.MODELS_DIR, "the shipped models"),
                        (toyworld.MODELS_DIR / "clip" / "x", "the shipped models"),
                        (tmp_path / "link", "symbolic link")):
        with pytest.raises(SystemExit) as exit_:
            script.main(["--quick", "--out", str(out)])
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_.value.code == 2 and f"--out {out} " in error and reason in error


def test_files_are_replaced_whole_and_links_not_written_through(tmp_path):
    target = tmp_path / "target.json"
    target.write_text("theirs")
    (tmp_path / "build.json").symlink_to(target)
    toyworld.recipe.write_json(tmp_path / "build.json", {"toy_world": True})
    assert target.read_text() == "theirs" and not (tmp_path / "build.json").is_symlink()
    assert json.loads((tmp_path / "build.json").read_text()) == {"toy_world": True}
    assert sorted(f.name for f in tmp_path.iterdir()) == ["build.json", "target.json"]


def test_damaged_drawn_data_says_delete_and_rerun(world, tmp_path):
    copy = tmp_path / "toy"
    shutil.copytree(world["train"].parent.parent / "data", copy / "data")
    (copy / "data" / "val" / "images" / "ex_0_img_1.png").unlink()
    with pytest.raises(SystemExit, match=f"delete {copy} and rerun") as exit_:
        toyworld.read_split(copy / "data" / "val")
    assert "download" not in str(exit_.value) and "\n" not in str(exit_.value)


def test_damaged_drawn_data_read_by_the_project_readers_says_delete_and_rerun(world, tmp_path):
    """weights/winoground.py and weights/coco.py read the toy world's data too (eval_winoground.py
    --toy, train.py --toy): their remedy for a damaged file is the toy world's, not a download."""
    copy = tmp_path / "toy"
    shutil.copytree(world["train"].parent.parent, copy)
    (copy / "data" / "test" / "examples.jsonl").write_bytes(b"\xff\xfe not text")
    with pytest.raises(ValueError, match=rf"not UTF-8 text .*; delete {copy} and rerun") as error:
        Winoground(copy / "data" / "test")
    (copy / "data" / "train" / "annotations" / "captions_train2017.json").write_text("{")
    with pytest.raises(ValueError, match=rf"not a COCO captions file .* — delete {copy} and rerun"):
        CocoCaptions(copy / "data" / "train", lambda image: image)
    assert "download" not in str(error.value)


def test_full_recipe_sizes():
    recipe = toyworld.Recipe()
    assert recipe.test_examples >= 400 and recipe.val_examples > 0 and recipe.new_objects_examples > 0
    assert len(toyworld.COLOURS) >= 5 and len(toyworld.SHAPES) >= 4


def test_train_split_shows_every_object_but_no_held_out_pairing(world):
    data = CocoCaptions(world["train"], lambda image: image.size)
    assert len(data) == toyworld.QUICK.train_images
    assert all(len(c) == toyworld.CAPTIONS_PER_IMAGE for c in data.captions)
    assert data[0][0] == (toyworld.IMAGE_SIZE, toyworld.IMAGE_SIZE)
    train = scenes(world["train"])
    # every seen object
    assert {obj for s in train for obj in (s.first, s.second)} == set(toyworld.OBJECTS)
    assert not {pairing(s) for s in train} & toyworld.HELD_OUT_PAIRINGS
    # At the full size, too: the scenes training draws never hold a pairing of val or test.
    rng = np.random.default_rng(0)
    assert not {pairing(toyworld.random_scene(rng))
                for _ in range(5000)} & toyworld.HELD_OUT_PAIRINGS


@pytest.mark.parametrize("split, blocks",
                         [("val", toyworld.VAL_BLOCKS), ("test", toyworld.TEST_BLOCKS),
                                           ("new_objects", (toyworld.NEW_OBJECT_BLOCK,))])
def test_winoground_splits(world, split, blocks):
    data = Winoground(world[split])
    assert len(data) == {"new_objects": toyworld.QUICK.new_objects_examples}.get(split, getattr(
        toyworld.QUICK, f"{split}_examples"))
    assert {e.collapsed_tag for e in data.examples} == set(toyworld.TAGS)
    for e in data.examples:
        assert e.caption_0 != e.caption_1 and sorted(e.caption_0.split()) == sorted(e.caption_1.split())
        assert data.image(e.image_0).size == (toyworld.IMAGE_SIZE, toyworld.IMAGE_SIZE)
    allowed = set().union(*(toyworld.pairings(block) for block in blocks))
    # each image's pairing is one of the split's
    assert {pairing(s) for s in scenes(world[split])} <= allowed
    seen = set(toyworld.OBJECTS)
    objects = {obj for s in scenes(world[split]) for obj in (s.first, s.second)}
    assert objects <= seen if split != "new_objects" else not objects & seen


def test_held_out_blocks_are_disjoint_and_of_seen_objects():
    val, test = (set().union(*(toyworld.pairings(b) for b in blocks))
                 for blocks in (toyworld.VAL_BLOCKS, toyworld.TEST_BLOCKS))
    assert len(val) == 2 * len(toyworld.VAL_BLOCKS) and len(test) == 2 * len(toyworld.TEST_BLOCKS)
    assert not val & test
    assert all(obj in toyworld.OBJECTS for p in val | test for obj in p)


def test_swaps_change_what_the_picture_shows():
    rng = np.random.default_rng(0)
    for tag in toyworld.TAGS:
        for _ in range(20):
            scene, swapped, caption_0, caption_1 = toyworld.swap_example(tag, toyworld.TEST_BLOCKS,
                                                                         rng)
            assert scene != swapped and caption_0 != caption_1
            if tag == "attribute":  # the shapes stay in place, the colours trade
                assert (scene.first[1], scene.second[1]) == (swapped.first[1], swapped.second[1])
                assert (scene.first[0], scene.second[0]) == (swapped.second[0], swapped.first[0])
            else:  # the objects trade places
                assert (scene.first, scene.second) == (swapped.second, swapped.first)


# What a caption says, read by rules of this test's own rather than the world's grammar tables: its
# two noun phrases, and whether the first place word between them puts the first phrase first.
NOUN_PHRASE = re.compile(
    rf"\b(?:a|the) ({'|'.join(toyworld.COLOURS)}) ({'|'.join(toyworld.SHAPES)})\b")
PUTS_FIRST = {"left": "h", "above": "v", "top": "v"}  # "X left of Y", "X on top of Y", …
PUTS_SECOND = {"right": "h", "below": "v", "under": "v", "bottom": "v"}  # "X right of Y", …


def read_caption(caption: str) -> dict:
    """The scene a caption describes, in scenes.json's form."""
    x, y = NOUN_PHRASE.finditer(caption)  # exactly two noun phrases
    word = next(w for w in caption[x.end(): y.start()].split() if w in PUTS_FIRST | PUTS_SECOND)
    first, second = (x, y) if word in PUTS_FIRST else (y, x)
    return {"first": list(first.groups()), "second": list(second.groups()),
            "axis": (PUTS_FIRST | PUTS_SECOND)[word]}


def test_read_caption_reads_each_relation():
    scene = {"first": ["red", "circle"], "second": ["blue", "square"]}
    for caption, axis in (("a red circle to the left of a blue square", "h"),
                          ("there is the blue square right of the red circle", "h"),
                          ("a blue square on the right and a red circle on the left", "h"),
                          ("a picture of a red circle on top of a blue square", "v"),
                          ("a blue square under a red circle", "v"),
                          ("a red circle at the top and a blue square at the bottom", "v")):
        assert read_caption(caption) == scene | {"axis": axis}, caption


@pytest.mark.parametrize("split", ["val", "test", "new_objects"])
def test_each_caption_describes_its_own_image_and_not_the_other(world, split):
    """Caption k of an example says what scenes.json (the ground truth) holds of image k, for every
    kind of swap, and not what it holds of image 1 − k; the pictures show their scenes."""
    examples, truth, images = toyworld.read_split(world[split])
    assert {e["tag"] for e in examples} == set(toyworld.TAGS)
    for e in examples:
        for k in range(2):
            said = read_caption(e[f"caption_{k}"])
            assert said == truth[e[f"image_{k}"]] and said != truth[e[f"image_{1 - k}"]], e
    names = [e[f"image_{k}"] for e in examples for k in range(2)]
    assert np.mean([toyworld.placed_right(im, truth[n]) for im, n in zip(images, names)]) >= 0.9


def test_train_captions_describe_their_image(world):
    data = json.loads((world["train"] / "annotations" / "captions_train2017.json").read_text())
    truth = json.loads((world["train"] / "scenes.json").read_text())
    name = {im["id"]: im["file_name"] for im in data["images"]}
    assert all(read_caption(a["caption"]) == truth[name[a["image_id"]]]
               for a in data["annotations"])


def blocks_pairings(blocks) -> set[frozenset]:
    """The two pairings of objects a block of (2 colours, 2 shapes) holds, written out here."""
    held = set()
    for (c0, c1), (s0, s1) in blocks:
        held |= {frozenset({(c0, s0), (c1, s1)}), frozenset({(c1, s0), (c0, s1)})}
    return held


def test_no_val_or_test_pairing_occurs_in_train(world):
    """Recomputed from VAL_BLOCKS and TEST_BLOCKS, not read from HELD_OUT_PAIRINGS: no train scene
    holds a pairing of val or test, and val and test hold only theirs."""
    held_out = blocks_pairings(toyworld.VAL_BLOCKS + toyworld.TEST_BLOCKS)
    assert len(held_out) == 2 * len(toyworld.VAL_BLOCKS + toyworld.TEST_BLOCKS)
    assert not {pairing(s) for s in scenes(world["train"])} & held_out
    for split, blocks in (("val", toyworld.VAL_BLOCKS), ("test", toyworld.TEST_BLOCKS)):
        assert {pairing(s) for s in scenes(world[split])} <= blocks_pairings(blocks)
    rng = np.random.default_rng(1)  # and the full train split's scenes
    assert not {pairing(toyworld.random_scene(rng)) for _ in range(5000)} & held_out


def test_every_train_scene_holds_two_colours_and_two_shapes(world):
    """As the world defines a training scene (random_scene): two objects that differ in colour and
    in shape, side by side or one above the other; and the pictures show those two colours."""
    train = scenes(world["train"])
    assert all(s.first[0] != s.second[0] and s.first[1] != s.second[1] and s.axis in ("h", "v")
               for s in train)
    pictures = toyworld.TrainSet.read(world["train"]).pixels
    read = [toyworld.read_colours(toyworld.to_pil(toyworld.vae_pixels(p[None]))[0], s.axis)
            for p, s in zip(pictures, train)]
    assert np.mean([r == (s.first[0], s.second[0]) for r, s in zip(read, train)]) >= 0.95


def test_reader_reads_the_real_images(tmp_path):
    """The reader that judges the samples: right on ≥ 99 % of the world's own images, and it does
    tell a scene from its swap (the colours of the two halves read the other way round fail)."""
    toyworld.write_winoground(tmp_path / "val", 240, toyworld.VAL_BLOCKS,
                              np.random.default_rng([0, 1]))
    examples, truth, images = toyworld.read_split(tmp_path / "val")
    names = [e[f"image_{k}"] for e in examples for k in range(2)]
    right = [toyworld.placed_right(image, truth[name]) for image, name in zip(images, names)]
    assert np.mean(right) >= 0.99
    flipped = [{**truth[name], "first": truth[name]["second"], "second": truth[name]["first"]}
               for name in names]
    assert not any(toyworld.placed_right(image, scene) for image, scene in zip(images, flipped))
    blank = Image.new("RGB", (toyworld.IMAGE_SIZE,) * 2, (240, 240, 240))
    assert toyworld.read_colours(blank, "h") == (None, None)


class Oracle(torch.nn.Module):
    """A 'UNet' that knows the answer: its ε̂ is the noise that takes z_t back to `x0`."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0, self.a = x0, NoiseSchedule().alphas_cumprod
        self.config = type("Config", (), {"sample_size": x0.shape[-1], "in_channels": x0.shape[1]})

    def forward(self, z, t, context):
        a = self.a[t].view(-1, 1, 1, 1)
        return (z - a.sqrt() * self.x0.repeat(len(z) // len(self.x0), 1, 1, 1)) / (1 - a).sqrt()


def test_sampler_lands_on_what_the_model_predicts(world):
    """DDIM's update: with an ε̂ that always points to x0, every step keeps x̂_0 = x0 and the
    sample ends there exactly (the VAE then decodes it)."""
    vae = load_vae(world["sd"] / "vae")
    text_encoder = load_clip(world["sd"] / "text_encoder")
    tokenizer = load_tokenizer(world["sd"] / "tokenizer")
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    images = toyworld.sample(Oracle(x0), vae, text_encoder, tokenizer,
                             ["a red circle", "a blue square"], steps=10)
    with torch.no_grad():
        assert torch.allclose(images, vae.latents_to_images(x0), atol=1e-4)
    # The real small UNet: the right shape, finite, and the same for the same seed.
    unet = load_unet(world["sd"] / "unet")
    first = toyworld.sample(unet, vae, text_encoder, tokenizer,
                            ["a red circle above a blue square"], steps=3)
    again = toyworld.sample(unet, vae, text_encoder, tokenizer,
                            ["a red circle above a blue square"], steps=3)
    assert first.shape == (1, 3, toyworld.IMAGE_SIZE,
                           toyworld.IMAGE_SIZE) and torch.isfinite(first).all()
    assert torch.equal(first, again)


class GuidedOracle(torch.nn.Module):
    """A 'UNet' whose ε̂ takes z_t to `a` given a caption and to `b` given the empty prompt
    (`empty`, its encoding); it records the timesteps it is asked about."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, empty: torch.Tensor):
        super().__init__()
        self.x0_a, self.x0_b, self.empty, self.visited = a, b, empty, []
        self.alphas = NoiseSchedule().alphas_cumprod
        self.config = type("Config", (), {"sample_size": a.shape[-1], "in_channels": a.shape[1]})

    def forward(self, z, t, context):
        self.visited.append(t.tolist())
        unconditional = torch.tensor([torch.allclose(c, self.empty, atol=1e-5) for c in context])
        x0 = torch.where(unconditional.view(-1, 1, 1, 1), self.x0_b, self.x0_a)
        a = self.alphas[t].view(-1, 1, 1, 1)
        return (z - a.sqrt() * x0) / (1 - a).sqrt()  # ε such that x̂_0 = x0


class Latents:
    """A 'VAE' that returns the sampler's latents as they are."""

    @staticmethod
    def latents_to_images(z):
        return z


def test_sampler_walks_down_in_t_and_guides_toward_the_caption(world):
    """DDIM from t = 999 down to 0, a step at a time; classifier-free guidance s lands on
    x̂_0 = b + s (a − b): the unconditional answer at s = 0, the conditional one at s = 1, and past
    it, further toward the caption, at s > 1."""
    text_encoder = load_clip(world["sd"] / "text_encoder")
    tokenizer = load_tokenizer(world["sd"] / "tokenizer")
    empty = encode_prompt(text_encoder, tokenizer, [""])[0]
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 1, 4, 8, 8, generator=g)
    drawn = {}
    for guidance in (0.0, 1.0, 3.0):
        unet = GuidedOracle(a, b, empty)
        drawn[guidance] = toyworld.sample(unet, Latents(), text_encoder, tokenizer,
                                          ["a red circle above a blue square"], guidance, steps=10)
        t = [row[0] for row in unet.visited]
        assert all(len(set(row)) == 1 for row in unet.visited) and len(t) == 10
        assert t[0] == 999 and t[-1] == 0 and all(x > y for x, y in zip(t, t[1:]))
    torch.testing.assert_close(drawn[0.0], b, atol=1e-4, rtol=0)
    torch.testing.assert_close(drawn[1.0], a, atol=1e-4, rtol=0)
    torch.testing.assert_close(drawn[3.0], b + 3 * (a - b), atol=1e-3, rtol=0)
    assert ((drawn[3.0] - a) * (a - b)).sum() > 0  # beyond a, away from b


def test_teacher_checks_run_on_the_quick_build(world, capsys):
    checks = toyworld.check_teacher(world, splits=("val",), timesteps=2)["val"]
    assert checks["reader on real images"] == 100.0
    assert set(checks["diffusion group per tag"]) == set(toyworld.TAGS)
    percentages = [v for key, value in checks.items() if key != "VAE PSNR (dB)"
                   for v in (value.values() if isinstance(value, dict) else [value])]
    assert all(0 <= v <= 100 for v in percentages)
    assert capsys.readouterr().out.startswith("val: reader on real images 100.0;")


def test_unet_training_sees_the_empty_prompt(world, monkeypatch):
    """Caption dropout: about CAPTION_DROP of the UNet's training rows hold the empty prompt."""
    train = toyworld.TrainSet.read(world["train"])
    vae = load_vae(world["sd"] / "vae")
    text_encoder = load_clip(world["sd"] / "text_encoder")
    tokenizer = load_tokenizer(world["sd"] / "tokenizer")
    contexts, forward = [], UNet.forward

    def spy(self, z, t, context):
        contexts.append(context.detach())
        return forward(self, z, t, context)

    monkeypatch.setattr(UNet, "forward", spy)
    toyworld.train_unet(train, vae, text_encoder, tokenizer,
                        toyworld.Recipe(unet_steps=20, unet_batch=16), seed=0)
    empty = encode_prompt(text_encoder, tokenizer, [""])[0]
    rows = torch.cat(contexts)
    share = np.mean([torch.allclose(row, empty) for row in rows])
    assert len(rows) == 320 and 0.04 <= share <= 0.2  # 10 % expected: 32 of 320


def test_latent_scale_is_one_over_the_latents_std(world):
    """scaling_factor: scaled latents have unit variance (SD measured 0.18215 so), not std²."""
    vae = load_vae(world["sd"] / "vae")
    pixels = toyworld.TrainSet.read(world["train"]).pixels[:64]
    with torch.no_grad():
        vae.quant_conv.weight.mul_(3.0)  # latents of std far from 1, so that std and 1/std differ
        vae.quant_conv.bias.mul_(3.0)
    scale = toyworld.latent_scale(vae, pixels, torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = vae.encode(toyworld.vae_pixels(pixels)).sample(torch.Generator().manual_seed(0))
    assert abs(float(latents.std()) - 1) > 0.5
    assert float((latents * scale).std()) == pytest.approx(1.0, rel=1e-5)


def test_unet_trains_on_scaled_latents(world, monkeypatch):
    """ε-prediction on z_0 = the VAE's latent × scaling_factor, of unit variance, noised, and that
    z_t is what the UNet is fed (its latents here have a std far from 1, so that a missing or
    inverted scale shows)."""
    train = toyworld.TrainSet.read(world["train"])
    vae = load_vae(world["sd"] / "vae")
    with torch.no_grad():
        vae.quant_conv.weight.mul_(5.0)
        vae.quant_conv.bias.mul_(5.0)
    vae.config.scaling_factor = toyworld.latent_scale(vae, train.pixels,
                                                      torch.Generator().manual_seed(0))
    assert abs(vae.config.scaling_factor - 1) > 0.5
    noised, fed, add_noise, forward = [], [], NoiseSchedule.add_noise, UNet.forward

    def spy_noise(self, z0, noise, t):
        noised.append((z0.detach(), add_noise(self, z0, noise, t)))
        return noised[-1][1]

    def spy_unet(self, z, t, context):
        fed.append(z.detach())
        return forward(self, z, t, context)

    monkeypatch.setattr(NoiseSchedule, "add_noise", spy_noise)
    monkeypatch.setattr(UNet, "forward", spy_unet)
    toyworld.train_unet(train, vae, load_clip(world["sd"] / "text_encoder"),
                        load_tokenizer(world["sd"] / "tokenizer"),
                        toyworld.Recipe(unet_steps=4, unet_batch=64), seed=0)
    z0 = torch.cat([z for z, _ in noised])
    assert float(z0.std()) == pytest.approx(1.0, abs=0.15)
    assert len(fed) == 4 and all(torch.equal(z, z_t) for z, (_, z_t) in zip(fed, noised))


def test_as_pixels_keeps_the_orientation():
    """Top-left stays top-left: a 3 × 2 picture (W × H) with a coloured pixel in three corners."""
    image = Image.new("RGB", (3, 2), (0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0))  # top left: red
    image.putpixel((2, 0), (0, 255, 0))  # top right: green
    image.putpixel((0, 1), (0, 0, 255))  # bottom left: blue
    pixels = toyworld.as_pixels([image])
    assert pixels.shape == (1, 3, 2, 3) and pixels.dtype == torch.uint8
    assert pixels[0, :, 0, 0].tolist() == [255, 0, 0] and pixels[0, :, 0, 2].tolist() == [0, 255, 0]
    assert pixels[0, :, 1, 0].tolist() == [0, 0, 255] and pixels[0, :, 1, 2].tolist() == [0, 0, 0]
    back = toyworld.to_pil(toyworld.vae_pixels(pixels))[0]  # and back: the same picture
    assert np.array_equal(np.asarray(back), np.asarray(image))


def test_teacher_check_keeps_plain_and_normalised_scores_apart(world, monkeypatch):
    """Errors where the plain diffusion score gets every example right and the score normalised by
    the empty prompt's error gets every image wrong: each lands under its own key."""
    data = Winoground(world["val"])
    errors = torch.tensor([[[1.0, 2.0], [2.0, 1.0], [0.0, 5.0]]])  # captions 0, 1, empty × images
    errors = errors[..., None].expand(len(data.examples), -1, -1, 1)  # (N, 3, 2, T = 1)
    monkeypatch.setattr(toyworld.teacher, "diffusion_errors", lambda *args, **kwargs: errors)
    checks = toyworld.teacher.diffusion_checks(None, data, 1, seed=0)
    assert checks["diffusion group per tag"] == {tag: 100.0 for tag in toyworld.TAGS}
    assert checks["diffusion group per tag, image score normalised"] == {
        tag: 0.0 for tag in toyworld.TAGS}


def test_merges_rank_as_vocab_ids(world):
    """OpenAI's layout: merge i of merges.txt makes the token with id 512 + i in vocab.json."""
    for folder in (world["clip"], world["sd"] / "tokenizer"):
        vocab = json.loads((folder / "vocab.json").read_text())
        merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
        assert merges and all(vocab["".join(line.split())] == 512 + i
                              for i, line in enumerate(merges))
        assert len(vocab) == 512 + len(merges) + 2  # the start and end tokens last


def test_tokenizer_files_read_the_same_in_transformers(world):
    ours = load_tokenizer(world["clip"])
    ref = transformers.CLIPTokenizer.from_pretrained(world["sd"] / "tokenizer")
    captions = [c for cs in CocoCaptions(world["train"], None).captions[:50] for c in cs]
    captions += [e.caption_0 for e in Winoground(world["test"]).examples]
    expected = ref(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ours(captions, pad_token_id=ours.eot_id), expected)
    # whole-word tokens
    assert all(len(ours.encode(word)) == 1 for word in ["red", "circle", "left", "bottom"])


def test_models_load_in_the_reference_libraries(world, parity):
    g = torch.Generator().manual_seed(0)
    clip, tokenizer = load_clip(world["clip"]), load_tokenizer(world["clip"])
    ref = transformers.CLIPModel.from_pretrained(world["clip"]).eval()
    pixels = torch.randn(2, 3, toyworld.IMAGE_SIZE, toyworld.IMAGE_SIZE, generator=g)
    ids = tokenizer(["a red circle above a blue square", "a green cross left of a yellow triangle"])
    with torch.no_grad():
        parity("toy CLIP logits", clip(pixels, ids),
               ref(input_ids=ids, pixel_values=pixels).logits_per_image)
        text_encoder = load_clip(world["sd"] / "text_encoder")
        ref_text = transformers.CLIPTextModel.from_pretrained(world["sd"] / "text_encoder").eval()
        parity("toy SD text encoder", text_encoder.text_model(ids), ref_text(ids).last_hidden_state)

        vae, ref_vae = load_vae(world["sd"] / "vae"), AutoencoderKL.from_pretrained(world["sd"] / "vae").eval()
        assert vae.config.scaling_factor == pytest.approx(ref_vae.config.scaling_factor)
        images = torch.rand(2, 3, toyworld.IMAGE_SIZE, toyworld.IMAGE_SIZE, generator=g) * 2 - 1
        parity("toy VAE encode mean", vae.encode(images).mean,
               ref_vae.encode(images).latent_dist.mean)
        latents = torch.randn(2, 4, 8, 8, generator=g)
        parity("toy VAE decode", vae.decode(latents), ref_vae.decode(latents).sample)

        unet, ref_unet = load_unet(world["sd"] / "unet"), UNet2DConditionModel.from_pretrained(world["sd"] / "unet")
        context = text_encoder.text_model(tokenizer(["a red circle", ""],
                                                    pad_token_id=tokenizer.eot_id))
        t = torch.tensor([10, 700])
        parity("toy UNet", unet(latents, t, context), ref_unet.eval()(latents, t, context).sample)


def test_method_runs_end_to_end(world, tmp_path):
    """train.py (the real loop: SDS-CLIP on the toy CLIP and SD) for a few steps, then both
    Winoground scorers of eval_winoground.py on its test split: every score finite."""
    out = tmp_path / "run"
    subprocess.run([sys.executable, "train.py", "--clip", str(world["clip"]), "--sd",
                    str(world["sd"]), "--coco_root", str(world["train"]), "--out", str(out),
                    "--device", "cpu", "--batch_size", "8",
                    "--max_steps", "3", "--num_workers", "0", "--sds_weight", "1"], cwd=REPO,
                    check=True)
    losses = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in losses)
    for model in (["--clip", str(out)], ["--sd", str(world["sd"]), "--timesteps", "4"]):
        result = tmp_path / "result.json"
        subprocess.run([sys.executable, "eval_winoground.py", *model, "--data", str(world["test"]),
                        "--out", str(result)], cwd=REPO, check=True)
        scores = torch.tensor([e["scores"] for e in json.loads(result.read_text())["examples"]])
        assert scores.shape == (toyworld.QUICK.test_examples, 2, 2) and torch.isfinite(scores).all()
