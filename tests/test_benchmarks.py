"""SugarCrepe and ARO: the readers (the real SugarCrepe annotation files, stand-in images), the
crop, the grouping and the means against hand computations, the two scorers against transformers
and diffusers, --compare on single-credit records, and the command line."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

import eval_winoground as ew
from test_eval_winoground import SD_RESOLUTION, clip_folder, make_image, reference_diffusion_errors  # noqa: F401
from test_eval_winoground import run_script, sd_folder  # noqa: F401
from weights import winoground as wino
from weights.aro import ARO
from weights.networks import load_clip, load_tokenizer
from weights.sugarcrepe import FILES, SugarCrepe

REAL = Path("/work/shared/benchmarks/sugarcrepe")  # the official files, read in place
COUNTS = {"add_att": 692, "add_obj": 2062, "replace_att": 788, "replace_obj": 1652, "replace_rel": 1406,
          "swap_att": 666, "swap_obj": 245}
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} (SugarCrepe's annotation files) is not here")


def write_sugarcrepe(folder: Path, per_file: int = 2) -> tuple[Path, Path]:
    """The first `per_file` items of each real annotation file, and a stand-in image for each (even crop margins
    at CLIP's 32 pixels, as in test_eval_winoground.py)."""
    annotations, images = folder / "annotations", folder / "images"
    annotations.mkdir(parents=True), images.mkdir()
    for n, stem in enumerate(FILES):
        items = dict(list(json.loads((REAL / f"{stem}.json").read_text()).items())[:per_file])
        (annotations / f"{stem}.json").write_text(json.dumps(items))
        for k, item in enumerate(items.values()):
            make_image((n + k) % 3 * 4).convert("RGB").save(images / item["filename"])  # JPEG, by the name
    return annotations, images


@pytest.fixture(scope="module")
def sugarcrepe(tmp_path_factory) -> tuple[Path, Path]:
    return write_sugarcrepe(tmp_path_factory.mktemp("sugarcrepe"))


# ----------------------------------------------------------------------------- SugarCrepe reader


@needs_real
def test_sugarcrepe_reads_the_official_files(tmp_path):
    names = {v["filename"] for f in FILES for v in json.loads((REAL / f"{f}.json").read_text()).values()}
    for name in names:  # the reader checks that each image exists; scoring is tested on drawn ones
        (tmp_path / name).touch()
    data = SugarCrepe(REAL, tmp_path)
    counts = {f: sum(item.file == f for item in data.items) for f in FILES}
    assert counts == COUNTS and len(data.items) == 7511
    assert [item.id for item in data.items] == list(range(7511))  # unique across files: --compare pairs by id
    first = next(item for item in data.items if item.file == "swap_obj")
    raw = json.loads((REAL / "swap_obj.json").read_text())["0"]
    assert (first.key, first.image, first.caption, first.negative) == ("0", raw["filename"], raw["caption"],
                                                                       raw["negative_caption"])


def edit_file(folder: Path, stem: str, edit) -> None:
    file = folder / f"{stem}.json"
    content = json.loads(file.read_text())
    file.write_text(edit(content) if callable(edit) else edit)


@pytest.mark.parametrize("edit, message", [
    (lambda c: json.dumps({k: {"filename": v["filename"], "caption": v["caption"]} for k, v in c.items()}),
     r"swap_obj.json item '0' has \['caption', 'filename'\], not the keys \['filename', 'caption', "
     r"'negative_caption'\]"),
    (lambda c: json.dumps({k: v | {"negative_caption": ""} for k, v in c.items()}),
     r"swap_obj.json item '0' has no negative caption"),
    ("{not json", r"swap_obj.json is not valid JSON"),
    ("[1, 2]", r"swap_obj.json should map ids to items"),
])
@needs_real
def test_sugarcrepe_bad_files_are_one_sentence(tmp_path, edit, message):
    annotations, images = write_sugarcrepe(tmp_path)
    edit_file(annotations, "swap_obj", edit)
    with pytest.raises(ValueError, match=message):
        SugarCrepe(annotations, images)


@needs_real
def test_sugarcrepe_missing_images_and_files(tmp_path):
    annotations, images = write_sugarcrepe(tmp_path)
    name = json.loads((annotations / "add_obj.json").read_text())["1"]["filename"]
    (images / name).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"1 image(s) named in {annotations} not found in "
                                                          f"{images}: {name}; --images takes")):
        SugarCrepe(annotations, images)
    with pytest.raises(ValueError, match=re.escape(f"{images} holds none of SugarCrepe's annotation files")):
        SugarCrepe(images, images)
    with pytest.raises(FileNotFoundError, match="SugarCrepe not found at"):
        SugarCrepe(tmp_path / "nowhere", images)


# ----------------------------------------------------------------------------- records and summaries


def choice_records(credits: dict[tuple[str, str], list[bool]]) -> list[dict]:
    """Records from constructed scores: per (file, subset), one item per credit, scored [1, 0] when right and
    [0, 0] (a tie: wrong) otherwise."""
    items, n = [], 0
    for (file, subset), flags in credits.items():
        for flag in flags:
            items.append((SimpleNamespace(id=n, file=file, key=str(n), subset=subset), [float(flag), 0.0]))
            n += 1
    return ew.score_items([i for i, _ in items], torch.tensor([s for _, s in items]))


def test_sugarcrepe_summary_by_hand():
    # replace: att 1 of 2, obj 2 of 2, rel 0 of 2 → files 50, 100, 0 and the category 50 (not the pooled 3 of 6,
    # which is also 50: so swap tells the two apart). swap: att 1 of 4 (25), obj 1 of 1 (100) → 62.5, pooled 40.
    records = choice_records({("replace_att", "replace_att"): [True, False], ("replace_obj", "replace_obj"):
                              [True, True], ("replace_rel", "replace_rel"): [False, False],
                              ("swap_att", "swap_att"): [True, False, False, False], ("swap_obj", "swap_obj"): [True]})
    assert [r["correct"] for r in records[:2]] == [True, False]  # the tie [0, 0] fails
    summary = ew.summarize_sugarcrepe(records, resamples=2000)
    assert {k: v["correct"] for k, v in summary.items()} == {
        "file=replace_att": 50, "file=replace_obj": 100, "file=replace_rel": 0, "file=swap_att": 25,
        "file=swap_obj": 100, "replace (mean of 3)": 50, "swap (mean of 2)": 62.5}
    # Each file is resampled within itself: only replace_att varies (its mean is 0, ½ or 1 with chances ¼, ½, ¼),
    # so the category's mean is (0 + 1 + 0)/3 … (1 + 1 + 0)/3: 2.5 % and 97.5 % quantiles 33.3 and 66.7.
    assert summary["replace (mean of 3)"]["ci95"]["correct"] == pytest.approx([100 / 3, 200 / 3])
    assert summary["file=replace_obj"]["ci95"]["correct"] == [100, 100]


def write_aro(folder: Path) -> Path:
    """Both ARO files in the authors' layout. Every image is grey with a red 16 × 12 square at (20, 10), and every
    item's box is that square. Relations: "on" 3 items, "under" 2; attribute pairs: white/black 25 items (kept),
    red/blue 24 (fewer than 25: left out, as the authors' loader does)."""
    (folder / "images").mkdir(parents=True)
    image = np.full((48, 64, 3), 128, np.uint8)
    image[10:22, 20:36] = (255, 0, 0)
    box = {"bbox_x": 20, "bbox_y": 10, "bbox_w": 16, "bbox_h": 12}
    for n in range(2):
        Image.fromarray(image).save(folder / "images" / f"{n}.png")

    def item(n: int, true: str, false: str) -> dict:
        return {"image_path": f"{n % 2}.png", **box, "true_caption": true, "false_caption": false}

    relation = [item(n, "the cup is on the table", "the table is on the cup") | {"relation_name": "on"}
                for n in range(3)]
    relation += [item(n, "the dog is under the car", "the car is under the dog") | {"relation_name": "under"}
                 for n in range(2)]
    attribution = [item(n, "the white cat and the black dog", "the black cat and the white dog")
                   | {"attributes": ["white", "black"]} for n in range(25)]
    attribution += [item(n, "the red ball and the blue box", "the blue ball and the red box")
                    | {"attributes": ["red", "blue"]} for n in range(24)]
    (folder / "visual_genome_relation.json").write_text(json.dumps(relation))
    (folder / "visual_genome_attribution.json").write_text(json.dumps(attribution))
    return folder


@pytest.fixture(scope="module")
def aro(tmp_path_factory) -> Path:
    return write_aro(tmp_path_factory.mktemp("aro"))


def test_aro_reads_the_layout_and_crops_to_the_box(aro):
    data = ARO(aro)
    assert [(i.file, i.subset) for i in data.items[:5]] == [("visual_genome_relation", "on")] * 3 + [
        ("visual_genome_relation", "under")] * 2
    assert {i.subset for i in data.items[5:]} == {"white_black", "red_blue"} and len(data.items) == 54
    assert [i.id for i in data.items] == list(range(54))
    crop = np.asarray(data.image(data.items[0]), dtype=np.int16)
    assert crop.shape == (12, 16, 3)  # the box, not the 64 × 48 image
    assert (crop == np.array([255, 0, 0])).all()  # all red, no grey around it


def test_aro_grouping_and_mean_by_hand():
    # relation: on 2 of 3, under 0 of 2 → mean 33.3 (pooled over items it would be 40); attribution: white_black
    # 20 of 25 = 80 (the only pair with ≥ 25 items), red_blue's 24 items all right but left out → 80, not 89.8.
    records = choice_records({
        ("visual_genome_relation", "on"): [True, True, False], ("visual_genome_relation", "under"): [False, False],
        ("visual_genome_attribution", "white_black"): [True] * 20 + [False] * 5,
        ("visual_genome_attribution", "red_blue"): [True] * 24})
    summary = ew.summarize_aro(records, resamples=200)
    assert {k: v["n"] for k, v in summary.items()} == {
        "visual_genome_attribution (mean of 1)": 25, "attributes=white_black": 25,
        "visual_genome_relation (mean of 2)": 5, "relation=on": 3, "relation=under": 2}
    assert [v["correct"] for v in summary.values()] == pytest.approx([80, 80, 100 / 3, 200 / 3, 0])
    low, high = summary["visual_genome_relation (mean of 2)"]["ci95"]["correct"]
    assert low < 100 / 3 < high and high <= 50  # only "on" varies: (0 … 1 + 0)/2


@pytest.mark.parametrize("edit, message", [
    (lambda c: json.dumps([{k: v for k, v in c[0].items() if k != "bbox_w"}]),
     r"visual_genome_relation.json item 0 has .* not the keys"),
    (lambda c: json.dumps([c[0] | {"bbox_h": 0}]), r"visual_genome_relation.json item 0: box \(20, 10, 16, 0\)"),
    (lambda c: json.dumps([c[0] | {"relation_name": ["on"]}]), r"item 0: relation_name is \['on'\], not a relation"),
    (lambda c: json.dumps([c[0] | {"false_caption": ""}]), r"item 0: image_path, true_caption and false_caption"),
    ("{", r"visual_genome_relation.json is not valid JSON"),
])
def test_aro_bad_files_are_one_sentence(tmp_path, edit, message):
    folder = write_aro(tmp_path)
    edit_file(folder, "visual_genome_relation", edit)
    with pytest.raises(ValueError, match=message):
        ARO(folder)


def test_aro_missing_images_and_files(tmp_path):
    folder = write_aro(tmp_path / "aro")
    (folder / "images" / "1.png").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"1 image(s) named in {folder} not found in "
                                                          f"{folder / 'images'}: 1.png")):
        ARO(folder)
    with pytest.raises(ValueError, match="holds neither visual_genome_relation.json nor"):
        ARO(folder / "images")


# ----------------------------------------------------------------------------- scorers


@needs_real
def test_clip_choice_scores_match_transformers(parity, sugarcrepe, clip_folder):
    data = SugarCrepe(*sugarcrepe)
    ours = ew.choice_clip_scores(load_clip(clip_folder), load_tokenizer(clip_folder), data, data.items, 3)  # (N, 2)
    model = transformers.CLIPModel.from_pretrained(clip_folder).eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(clip_folder)
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    with torch.no_grad():
        pixels = processor(images=[data.image(i) for i in data.items], return_tensors="pt").pixel_values
        images = F.normalize(model.get_image_features(pixel_values=pixels), dim=-1)  # (N, D)
        ids = tokenizer([c for i in data.items for c in (i.caption, i.negative)], padding="max_length",
                        max_length=77, return_tensors="pt").input_ids
        texts = F.normalize(model.get_text_features(input_ids=ids), dim=-1).view(len(data.items), 2, -1)
    ref = torch.einsum("ncd,nd->nc", texts, images)
    parity("SugarCrepe CLIP caption / negative cosines, small config", ours, ref, atol=1e-4)
    assert (ours[:, 0] - ours[:, 1]).abs().min() > 1e-6  # the two captions differ: nothing constant compared


def test_diffusion_choice_errors_match_diffusers(parity, aro, sd_folder):
    """Two ARO items: each image cropped, under its true and false caption, on one noise per timestep."""
    data = ARO(aro)
    items = data.items[:2]
    sd = ew.load_stable_diffusion(sd_folder)
    ours = ew.choice_diffusion_errors(sd, data, items, ew.timestep_grid(3), seed=5, batch_size=4,
                                      resolution=SD_RESOLUTION)  # (2, 2, T)
    generator = torch.Generator().manual_seed(5)  # one (T, 4, h, w) draw per item, in order
    for n, item in enumerate(items):
        noise = torch.randn((3, 4, 8, 8), generator=generator)
        example = SimpleNamespace(caption_0=item.caption, caption_1=item.negative)
        one = SimpleNamespace(images=lambda e: (data.image(item), data.image(item)))  # the cropped image, twice
        ref = reference_diffusion_errors(sd_folder, one, example, [166, 500, 833], noise)[:2, 0]  # (2, T)
        parity(f"ARO diffusion errors, tiny SD, item {n}", ours[n], ref, atol=1e-4)
    assert (ours[:, 0] - ours[:, 1]).abs().min() > 1e-6  # the captions count


# ----------------------------------------------------------------------------- --compare


def write_choice_run(path: Path, credits: list[bool], benchmark: str = "sugarcrepe") -> Path:
    examples = [{"id": i, "file": "swap_obj", "key": str(i), "subset": "swap_obj", "correct": c}
                for i, c in enumerate(credits)]
    path.write_text(json.dumps({"settings": {"benchmark": benchmark, "data": "sc"}, "examples": examples}))
    return path


def test_compare_single_credit_runs_and_refuse_mixing(tmp_path):
    # A right on 0–7, B on 5–7 of 10: as Winoground's text credit in test_compare_two_runs_with_a_known_answer
    a = write_choice_run(tmp_path / "a.json", [i < 8 for i in range(10)])
    b = write_choice_run(tmp_path / "b.json", [5 <= i < 8 for i in range(10)])
    result = ew.compare_runs(a, b)
    row = result["metrics"]["correct"]
    assert list(result["metrics"]) == ["correct"] and result["benchmark"] == "sugarcrepe"
    assert (row["a"], row["b"], row["difference"], row["ci95"]) == (80, 30, -50, [-80, -20])
    assert (row["only_a"], row["only_b"], row["mcnemar_p"]) == (5, 0, 0.0625)
    assert ew.format_comparison(result).startswith("SugarCrepe, B − A on 10 examples")
    winoground = tmp_path / "w.json"
    winoground.write_text(json.dumps({"examples": [{"id": i, "text": True, "image": True, "group": True}
                                                   for i in range(10)]}))
    with pytest.raises(ValueError, match=re.escape(f"{a} is a sugarcrepe run and {winoground} a winoground run: "
                                                   f"compare two runs of the same benchmark")):
        ew.compare_runs(a, winoground)
    with pytest.raises(ValueError, match="a aro run"):
        ew.compare_runs(a, write_choice_run(tmp_path / "aro.json", [True] * 10, "aro"))
    with pytest.raises(ValueError, match="is not a results file"):  # a benchmark this script never writes
        ew.compare_runs(a, write_choice_run(tmp_path / "odd.json", [True] * 10, "vqa"))
    assert len(wino.read_run(winoground).credits) == 10  # a Winoground file without settings still reads


# ----------------------------------------------------------------------------- the command line


@needs_real
def test_script_sugarcrepe_with_clip_then_compare(tmp_path, sugarcrepe, clip_folder):
    annotations, images = sugarcrepe
    outs = []
    for name in ("a.json", "b.json"):
        outs.append(tmp_path / name)
        done = run_script("--sugarcrepe", str(annotations), "--images", str(images), "--clip", str(clip_folder),
                          "--device", "cpu", "--out", str(outs[-1]))
        assert done.returncode == 0, done.stderr
    assert "SugarCrepe, CLIP" in done.stdout and "file=swap_obj" in done.stdout
    assert re.search(r"replace \(mean of 3\)\s+6\s", done.stdout)
    results = json.loads(outs[0].read_text())
    assert results["settings"]["benchmark"] == "sugarcrepe" and len(results["examples"]) == 14
    assert all(e["correct"] == (e["scores"][0] > e["scores"][1]) for e in results["examples"])
    files = {f: [e["correct"] for e in results["examples"] if e["file"] == f] for f in FILES}
    replace = np.mean([100 * np.mean(files[f]) for f in FILES if f.startswith("replace")])
    assert results["totals"]["replace (mean of 3)"]["correct"] == pytest.approx(replace)
    done = run_script("--compare", str(outs[0]), str(outs[1]))
    assert done.returncode == 0, done.stderr
    assert "correct    " in done.stdout and "+0.00" in done.stdout  # the same run twice: no difference


def test_script_aro_with_sd(tmp_path, aro, sd_folder):
    out = tmp_path / "aro.json"
    done = run_script("--aro", str(aro), "--sd", str(sd_folder), "--timesteps", "2", "--resolution",
                      str(SD_RESOLUTION), "--limit", "6", "--workers", "0", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "ARO, Stable Diffusion" in done.stdout and "relation=on" in done.stdout
    results = json.loads(out.read_text())
    assert results["settings"]["timesteps"] == [250, 750] and len(results["examples"]) == 6
    assert "visual_genome_relation (mean of 2)" in results["totals"]


@pytest.mark.parametrize("args, message", [
    (["--sugarcrepe", "x"], "--sugarcrepe needs --images"),
    (["--aro", "x", "--data", "y"], "--data and --aro name different benchmarks"),
    (["--aro", "x", "--normalize_image_score", "--sd"], "--normalize_image_score judges Winoground"),
    (["--aro", "{tmp}/nowhere", "--clip", "{tmp}"], "error: ARO not found at {tmp}/nowhere"),
])
def test_script_benchmark_errors_are_one_line(tmp_path, args, message):
    done = run_script(*[a.format(tmp=tmp_path) for a in args])
    assert done.returncode != 0 and message.format(tmp=tmp_path) in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()[-1]) > 20
