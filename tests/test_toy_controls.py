"""weights/toyworld/controls.py, probes.py: the hard negatives are the world's swapped captions, the
NegCLIP loss is its formula, the positive control is train.py's λ = 0 control but for the loss, the
probe finds what is there and nothing else, and the probes, retention and the h_w picture run on the
quick world."""

import itertools
import json
import math

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import train
from sds import Mapper, contrastive_loss
from weights import toyworld
from weights.networks import load_clip, load_stable_diffusion, load_tokenizer, load_vae, save_clip
from weights.toyworld import controls as tc
from weights.toyworld import probes as tp


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return toyworld.build(tmp_path_factory.mktemp("toy"), seed=0, quick=True)


def test_hard_negatives_of_known_captions():
    assert tc.hard_negative("a red circle left of a blue square") == [
        "a blue circle left of a red square", "a blue square left of a red circle"]
    assert tc.hard_negative("there is the yellow triangle on the left and the purple cross on the right") == [
        "there is the purple triangle on the left and the yellow cross on the right",
        "there is the purple cross on the left and the yellow triangle on the right"]
    with pytest.raises(ValueError, match="two objects"):
        tc.hard_negative("a picture of a red circle")


def test_hard_negatives_describe_the_swapped_scenes_for_every_template():
    """Any caption of a scene → the same template filled from the colour-swapped scene and from the
    scene with its objects' places exchanged."""
    scene = toyworld.Scene(("red", "circle"), ("blue", "square"), "h")
    colours_swapped = toyworld.Scene(("blue", "circle"), ("red", "square"), "h")
    places_swapped = toyworld.Scene(scene.second, scene.first, "h")
    for axis in ("h", "v"):
        scenes = [toyworld.Scene(s.first, s.second, axis)
                  for s in (scene, colours_swapped, places_swapped)]
        templates = toyworld.RELATIONAL[axis] + toyworld.CLAUSES[axis]
        for template, article, prefix in itertools.product(templates, toyworld.ARTICLES,
                                                           toyworld.PREFIXES):
            caption, attribute, objects = (toyworld.describe(s, template, article, prefix)
                                           for s in scenes)
            assert tc.hard_negative(caption) == [attribute, objects], caption


def test_negclip_loss_against_the_formula():
    f = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)  # f_φ(x_i)
    g = torch.tensor([[2.0, 0.5], [0.0, 1.0]], dtype=torch.float64)  # g_φ(y_j)
    negatives = torch.tensor([[1.0, 0.1], [-1.0, 1.0], [0.5, 0.5]], dtype=torch.float64)  # g_φ(ỹ_m)
    tau = torch.tensor(math.log(3.0), dtype=torch.float64)
    texts = torch.cat([g, negatives])

    def s(i, j):  # e^τ cos(f_i, text_j)
        return 3.0 * float(f[i] @ texts[j]) / (float(f[i].norm()) * float(texts[j].norm()))

    image_to_text = [-s(i, i) + math.log(sum(math.exp(s(i, j)) for j in range(5)))
                     for i in range(2)]
    text_to_image = [-s(j, j) + math.log(sum(math.exp(s(i, j)) for i in range(2)))
                     for j in range(2)]
    expected = (sum(image_to_text) / 2 + sum(text_to_image) / 2) / 2
    assert tc.negclip_loss(f, g, negatives, tau).item() == pytest.approx(expected, abs=1e-6)
    # no negatives: CLIP's loss
    logits = 3.0 * F.normalize(f, dim=-1) @ F.normalize(g, dim=-1).T
    assert tc.negclip_loss(f, g, negatives[:0],
                           tau).item() == pytest.approx(contrastive_loss(logits).item(), abs=1e-6)


def changed(before: dict, folder) -> set[str]:
    after = load_clip(folder).state_dict()
    return {key for key in before if not torch.equal(before[key], after[key])}


def test_finetune_moves_the_layernorms_or_every_weight(world, tmp_path):
    before = load_clip(world["clip"]).state_dict()
    layernorms = {key for key in before if "layer_norm" in key or "layrnorm" in key
                  or "layernorm" in key}
    runs = {}
    for name, all_weights in (("ln", False), ("ln-again", False), ("all", True)):
        runs[name] = tc.finetune_hard_negatives(world["clip"], world["train"], tmp_path / name,
                                                seed=1, all_weights=all_weights, max_steps=2,
                                                flags=["--device=cpu"])
    moved = changed(before, runs["ln"])
    assert moved and moved <= layernorms
    assert changed(before, runs["all"]) >= moved | {"visual_projection.weight",
                                                    "text_projection.weight"}
    # seeded: the same weights
    assert changed(load_clip(runs["ln"]).state_dict(), runs["ln-again"]) == set()
    load_tokenizer(runs["ln"])  # eval_winoground.py reads the folder
    record = json.loads((runs["ln"] / tc.RUN_FILE).read_text())
    assert len(record["losses"]) == 2 and record["settings"]["lr"] == toyworld.TRAIN_DEFAULTS["lr"]
    assert record["trainable"] == sum(before[key].numel() for key in layernorms)


@pytest.mark.parametrize("schedule", [[], ["--cosine", "--warmup_steps=1"]])
def test_without_negatives_it_is_train_pys_control(world, tmp_path, schedule):
    """The same weights as `train.py` with λ = 0 after 3 steps: the same data, captions, schedule
    (the constant one, and the cosine decay with warm-up) and freezing; with the hard negatives,
    other weights."""
    settings = {**toyworld.TRAIN_DEFAULTS, "sds_weight": 0.0}
    train.main(["--clip", str(world["clip"]), "--sd", str(world["sd"]), "--coco_root",
                str(world["train"]), "--out", str(tmp_path / "control"), "--device", "cpu",
                "--max_steps", "3", *tc.as_flags(settings), *schedule])
    control = load_clip(tmp_path / "control").state_dict()
    for hard_negatives in (False, True):
        folder = tc.finetune_hard_negatives(world["clip"], world["train"],
                                            tmp_path / str(hard_negatives), seed=0, max_steps=3,
                                            flags=["--device=cpu", *schedule],
                                            hard_negatives=hard_negatives)
        assert (changed(control, folder) == set()) == (not hard_negatives)


def test_probe_finds_separable_classes_and_not_shuffled_ones():
    generator = torch.Generator().manual_seed(0)
    means = 6 * torch.randn(3, 8, generator=generator)

    def draw(n):
        labels = torch.randint(0, 3, (n,), generator=generator)
        return means[labels] + torch.randn(n, 8, generator=generator), labels

    (x, y), (x_test, y_test) = draw(300), draw(600)
    assert tp.probe(x, y, x_test, y_test) >= 99
    shuffled = y[torch.randperm(len(y), generator=generator)]
    assert abs(tp.probe(x, shuffled, x_test, y_test) - 100 / 3) < 10


def test_probe_standardises_the_test_set_with_the_train_statistics():
    """Classes split at x = 0 in train; a test set of class 1 alone, far to the right: standardised
    with train's mean it stays right of the boundary (100 %); with its own it would be split in
    half."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2
    x = (2 * labels - 1 + 0.3 * torch.randn(200, generator=generator))[:, None]  # ±1
    x_test = 3 + 0.3 * torch.randn(100, 1, generator=generator)
    assert tp.probe(x, labels, x_test, torch.ones(100, dtype=torch.long)) == 100.0


def test_zero_shot_counts_the_top_two_prompts():
    scenes = [{"first": list(tp.OBJECTS[i]), "second": list(tp.OBJECTS[j]), "axis": "h"} for i, j in
              ((0, 5), (1, 6), (2, 7))]
    similarity = torch.zeros(3, len(tp.OBJECTS))
    similarity[0, [5, 0]] = torch.tensor([2.0, 1.0])  # both objects on top
    similarity[1, [1, 9]] = torch.tensor([2.0, 1.0])  # one object, then another
    similarity[2, [9, 10]] = torch.tensor([2.0, 1.0])  # two others
    assert tp.zero_shot(similarity, scenes) == pytest.approx((100 / 3, 200 / 3))


def test_probes_and_retention_run_on_the_quick_world(world):
    probes = tp.binding_probe(world["clip"], world, split="test")
    kept = tp.retention(world["clip"], world, split="test")
    assert set(probes) == {f"{q}, {t}" for q in tp.QUESTIONS
                           for t in ("image", "text", "chance")} | {
        "first colour, from the colours alone"}
    assert all(0 <= v <= 100 for v in [*probes.values(), *kept.values()])
    assert probes["first colour, from the colours alone"] >= probes["first colour, chance"]
    assert kept["zero-shot objects, top 2 exact"] <= kept["zero-shot objects, top 1 present"]


def test_hw_picture_decodes_scaled_latents(world, tmp_path):
    """An h_w that always answers z_0 = (the VAE's latent of one image) × scaling_factor draws that
    image's reconstruction: the picture undoes SD's latent scale."""
    vae = load_vae(world["sd"] / "vae")
    _, _, images = toyworld.read_split(world["test"])
    with torch.no_grad():
        # (1, 4, h, w)
        latent = vae.encode(toyworld.vae_pixels(toyworld.as_pixels(images[:1]))).mean
        reconstruction = vae.decode(latent)
    clip = load_clip(world["clip"])
    mapper = Mapper(clip.config.projection_dim, tuple(latent.shape[1:]))
    torch.nn.init.zeros_(mapper.proj.weight)
    mapper.proj.bias.data = (latent * vae.config.scaling_factor).flatten()
    run = tmp_path / "run"
    save_clip(clip, run)
    save_file(mapper.state_dict(), run / "mapper.safetensors",
              metadata={"latent_shape": json.dumps(latent.shape[1:])})
    decoded = tp.hw_picture({"fixed h_w": run}, world, tmp_path / "hw.png", count=3)
    assert decoded["fixed h_w"].shape == (3, 3, toyworld.IMAGE_SIZE, toyworld.IMAGE_SIZE)
    assert torch.allclose(decoded["fixed h_w"], reconstruction.expand(3, -1, -1, -1), atol=1e-5)
    assert np.array(Image.open(tmp_path / "hw.png")).std() > 0


# ----------------------------------------------------------------------------- the teacher's ranking


def test_ranking_loss_against_the_formula():
    f = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)  # f_φ(x_r)
    g = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
                      [[0.0, 3.0], [1.0, 0.0], [-1.0, 1.0]]], dtype=torch.float64)  # g_φ(c_rk)
    teacher = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]], dtype=torch.float64)
    tau = torch.tensor(math.log(2.0), dtype=torch.float64)
    expected = 0.0
    for r in range(2):
        s = [2.0 * (f[r] @ g[r, k]).item() / (f[r].norm() * g[r, k].norm()).item()
             for k in range(3)]
        q = [math.exp(v) / sum(math.exp(w) for w in s) for v in s]  # p_CLIP(c | x_r)
        expected += sum(p * math.log(p / qk) for p, qk in zip(teacher[r].tolist(), q)) / 2
    assert tc.ranking_loss(f, g, teacher, tau).item() == pytest.approx(expected, rel=1e-6)
    # it reaches the captions' embeddings, the text tower's output
    g.requires_grad_(True)
    tc.ranking_loss(f, g, teacher, tau).backward()
    assert g.grad.abs().sum() > 0


def test_fit_temperature_recovers_the_temperature_the_labels_were_drawn_at():
    """Errors e (N, 3) and true captions drawn from softmax(−e / T₀), put in column 0: the fit finds
    T₀."""
    generator = torch.Generator().manual_seed(0)
    errors = 0.01 * torch.rand(20000, 3, generator=generator, dtype=torch.float64)
    true = torch.multinomial(torch.softmax(-errors / 0.003, dim=-1), 1,
                             generator=generator).squeeze(1)
    rows = torch.arange(len(errors))
    swapped = errors.clone()
    # the true caption first
    swapped[rows, 0], swapped[rows, true] = errors[rows, true], errors[rows, 0]
    assert tc.fit_temperature(swapped) == pytest.approx(0.003, rel=0.1)


def test_teacher_errors_share_the_noise_between_an_images_captions(world):
    """The same caption twice gives the same error (shared ε and t); another caption, another
    error."""
    pixels, captions, _ = tp.read_train(Path(world["train"]), 3)
    sd = load_stable_diffusion(world["sd"])
    triples = [[c[0], c[0], tc.hard_negative(c[0])[0]] for c in captions]
    errors = tc.teacher_errors(sd, pixels, triples, timesteps=4, batch_size=5)
    assert errors.shape == (3, 3)
    # equal but for the batch's rounding
    torch.testing.assert_close(errors[:, 0], errors[:, 1], rtol=1e-5, atol=1e-6)
    rounding = (errors[:, 0] - errors[:, 1]).abs().max()
    assert (errors[:, 0] - errors[:, 2]).abs().min() > 10 * rounding + 1e-6  # the caption matters
    torch.testing.assert_close(errors,
                               tc.teacher_errors(sd, pixels, triples, timesteps=4, batch_size=64),
                               rtol=1e-5, atol=1e-6)  # the batching changes no number


def test_finetune_with_the_teacher_ranking(world, tmp_path):
    """Cached once per world; distilled into CLIP: other weights than without it, the text tower's
    included."""
    ranking = tc.teacher_rankings(world, count=40, timesteps=2)
    assert len(ranking["captions"]) == 40 and ranking["captions"][0][1:] == tc.hard_negative(ranking["captions"][0][0])
    cache = Path(world["train"]).parent / "teacher-ranking-40-2-0.json"
    # a cache is read, not recomputed
    cache.write_text(json.dumps(ranking | {"errors": [[0.0, 1.0, 1.0]] * 40}))
    assert tc.teacher_rankings(world, count=40, timesteps=2)["errors"][0] == [0.0, 1.0, 1.0]
    runs = {name: tc.finetune_hard_negatives(world["clip"], world["train"], tmp_path / name, seed=0,
                                             max_steps=2, flags=["--device=cpu"],
                                             hard_negatives=False, ranking=rank)
            for name, rank in (("control", None), ("ranking", ranking))}
    moved = changed(load_clip(runs["control"]).state_dict(), runs["ranking"])
    assert any(key.startswith("text_model.")
               for key in moved) and any(key.startswith("vision_model.") for key in moved)
    record = json.loads((runs["ranking"] / tc.RUN_FILE).read_text())["ranking"]
    assert record["images"] == 40 and record["timesteps"] == 2 and record["temperature"] > 0
    wrong = dict(ranking, captions=[["a red circle left of a blue square"] * 3] * 40)
    with pytest.raises(SystemExit, match="other images than the first 40"):
        tc.finetune_hard_negatives(world["clip"], world["train"], tmp_path / "wrong", max_steps=1,
                                   flags=["--device=cpu"], hard_negatives=False, ranking=wrong)


def test_finetune_takes_train_pys_trainable_set(world, tmp_path):
    """--trainable image, passed as train.py flags (as evidence.py's --train_flags does): the image
    tower, its projection and every LayerNorm move; the rest of the text tower does not."""
    before = load_clip(world["clip"]).state_dict()
    folder = tc.finetune_hard_negatives(world["clip"], world["train"], tmp_path / "image",
                                        max_steps=2, flags=["--device=cpu", "--trainable", "image"])
    moved = changed(before, folder)
    layernorms = {key for key in before if "layer_norm" in key or "layrnorm" in key
                  or "layernorm" in key}
    assert {key for key in moved if key.startswith("text_model.")} <= layernorms
    assert "visual_projection.weight" in moved and "text_projection.weight" not in moved
    assert any(key.startswith("vision_model.encoder") and key not in layernorms for key in moved)


@pytest.mark.parametrize("command", [["picture", "--runs", "r", "--out", "p.png", "--count", "0"],
                                     ["picture", "--runs", "r", "--out", "p.png", "--count", "-2"],
                                     ["probe", "--clip", "no/such/clip"],
                                     ["retention", "--clip", "no/such/clip"],
                                     ["finetune", "--out", "o", "--clip", "no/such/clip"],
                                     ["finetune", "--out", "o", "--max_steps", "-1"]])
def test_bad_options_are_one_argparse_line(tmp_path, capsys, command):
    """Refused before the world is built: exit 2, one error line that names the flag."""
    world = tmp_path / "w"
    with pytest.raises(SystemExit) as exit_:
        tc.main([*command, "--quick", "--world", str(world)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and ": error: " in error and command[-2] in error
    assert not world.exists()


def test_finetune_never_writes_into_the_shipped_models(tmp_path, monkeypatch, capsys):
    def never_built(*args, **kwargs):
        raise AssertionError("built: --out should have been refused first")

    monkeypatch.setattr(tc, "build", never_built)
    for command in (["finetune", "--out", str(toyworld.MODELS_DIR / "clip")],
                    ["picture", "--runs", "r", "--out", str(toyworld.MODELS_DIR / "hw.png")]):
        with pytest.raises(SystemExit) as exit_:
            tc.main([*command, "--quick", "--world", str(tmp_path / "w")])
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_.value.code == 2 and "the shipped models" in error
