"""eval_winoground.py: data loading, the three metrics, the CLIP score against transformers'
CLIPModel and the diffusion score against diffusers + transformers, on a synthetic
Winoground-format folder and tiny random checkpoints written here."""

import gzip
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

import eval_winoground as ew

REPO = Path(__file__).resolve().parent.parent
OPENAI_BPE = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
FIELDS = ["id", "image_0", "image_1", "caption_0", "caption_1", "tag", "secondary_tag", "num_main_preds", "collapsed_tag"]

# (caption_0, caption_1, tag, secondary_tag, num_main_preds, collapsed_tag), in the style of the real set.
CAPTIONS = [
    ("a dog chasing a cat", "a cat chasing a dog", "Noun", "", 1, "Object"),
    ("there is a mug in some grass", "there is some grass in a mug", "Noun", "Symbolic", 1, "Object"),
    ("the person with the ponytail packs stuff and other buys it",
     "the person with the ponytail buys stuff and other packs it", "Verb", "", 2, "Relation"),
    ("a bird eats a snake", "a snake eats a bird", "Noun", "", 1, "Object"),
    ("the red book is on top of the blue book", "the blue book is on top of the red book", "Adjective-Color", "", 1, "Both"),
]
# (width, height), mode per image. The sizes give even centre-crop margins at 32 and 16 pixels,
# where transformers' crop offset (⌊m/2⌋) equals torchvision's (round(m/2)); see test_clip.py.
IMAGES = [((48, 36), "RGB"), ((30, 50), "L"), ((64, 64), "P"), ((40, 40), "RGBA"), ((50, 40), "RGB"),
          ((45, 30), "RGB"), ((32, 60), "L"), ((70, 35), "RGB"), ((40, 40), "RGB"), ((48, 36), "P")]


def make_image(index: int) -> Image.Image:
    (width, height), mode = IMAGES[index]
    rng = np.random.default_rng(index)
    # Smooth gradients plus noise: resampling has something to interpolate.
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    rgb = np.stack([x, y, x * y], axis=-1) * 200 + rng.integers(0, 56, (height, width, 3))
    image = Image.fromarray(rgb.astype(np.uint8), "RGB")
    if mode == "RGBA":
        image.putalpha(255)  # opaque: how alpha is dropped does not matter (PIL convert in both pipelines)
        return image
    return image.quantize(32) if mode == "P" else image.convert(mode)


def records(n: int = len(CAPTIONS)) -> list[dict]:
    return [{"id": k, "image_0": f"ex_{k}_img_0", "image_1": f"ex_{k}_img_1", "caption_0": c0, "caption_1": c1,
             "tag": tag, "secondary_tag": secondary, "num_main_preds": preds, "collapsed_tag": collapsed}
            for k, (c0, c1, tag, secondary, preds, collapsed) in enumerate(CAPTIONS[:n])]


def write_winoground(folder: Path, layout: str = "images", lines: list[str] | None = None) -> Path:
    """A copy of facebook/winoground's data/ folder: examples.jsonl + images/ or images.zip."""
    folder.mkdir(parents=True, exist_ok=True)
    examples = records()
    lines = lines if lines is not None else [json.dumps(r) for r in examples]
    (folder / "examples.jsonl").write_text("\n".join(lines) + "\n")
    images = {f"ex_{k}_img_{j}.png": make_image(2 * k + j) for k in range(len(examples)) for j in (0, 1)}
    if layout == "images":
        (folder / "images").mkdir(exist_ok=True)
        for name, image in images.items():
            image.save(folder / "images" / name)
    else:
        with zipfile.ZipFile(folder / "images.zip", "w") as archive:
            for name, image in images.items():
                path = folder / name
                image.save(path)
                archive.write(path, f"images/{name}")  # the official zip's layout
                path.unlink()
    return folder


@pytest.fixture(scope="module")
def winoground(tmp_path_factory) -> Path:
    return write_winoground(tmp_path_factory.mktemp("winoground") / "data")


def write_tokenizer(folder: Path) -> None:
    """vocab.json + merges.txt of OpenAI's BPE, built from open_clip's copy of it the way the hub's
    files were (256 byte tokens, the same with </w>, one token per merge, the two special tokens)."""
    folder.mkdir(parents=True, exist_ok=True)
    merges = gzip.open(OPENAI_BPE, "rt", encoding="utf-8").read().split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_tokens = list(transformers.models.clip.tokenization_clip.bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- metrics

# s[c][i]: rows are captions, columns images. Worked by hand:
#   text  ⇔ s00 > s10 and s11 > s01 (down each column), image ⇔ s00 > s01 and s11 > s10 (along each row).
METRIC_CASES = [
    # s, text, image, group
    ([[1.0, 0.0], [0.0, 1.0]], True, True, True),  # the diagonal wins everywhere
    ([[0.0, 1.0], [1.0, 0.0]], False, False, False),  # swapped
    ([[0.5, 0.6], [0.2, 0.9]], True, False, False),  # text: .5>.2, .9>.6; image: caption 0 prefers image 1 (.6>.5)
    ([[0.5, 0.1], [0.6, 0.9]], False, True, False),  # text: image 0 prefers caption 1 (.6>.5); image: .5>.1, .9>.6
    ([[0.9, 0.95], [0.1, 0.9]], False, False, False),  # the first half of each holds, the second fails
    ([[0.5, 0.5], [0.4, 0.6]], True, False, False),  # tie in caption 0's row: image fails, text holds
    ([[0.5, 0.4], [0.5, 0.6]], False, True, False),  # tie in image 0's column: text fails, image holds
    ([[0.3, 0.3], [0.3, 0.3]], False, False, False),  # all tied
    ([[-1.0, -3.0], [-2.0, -0.5]], True, True, True),  # negative scores (the diffusion score is −error)
]


@pytest.mark.parametrize("s, text, image, group", METRIC_CASES)
def test_metrics_hand_worked(s, text, image, group):
    assert (ew.text_correct(s), ew.image_correct(s), ew.group_correct(s)) == (text, image, group)
    assert (ew.text_correct(torch.tensor(s)), ew.image_correct(torch.tensor(s))) == (text, image)


def test_summary_counts_and_breakdown():
    examples = [ew.Example(**r) for r in records()]
    scores = torch.tensor([case[0] for case in METRIC_CASES[:5]])  # (5, 2, 2)
    rows = ew.score_examples(examples, scores)
    assert [(r["text"], r["image"], r["group"]) for r in rows] == [tuple(case[1:]) for case in METRIC_CASES[:5]]
    summary = ew.summarize(rows)
    assert summary["all"] == {"n": 5, "text": 40.0, "image": 40.0, "group": 20.0}
    # Object: examples 0, 1, 3 → text T F F, image T F T, group T F F.
    assert summary["collapsed_tag=Object"] == {"n": 3, "text": 100 / 3, "image": 200 / 3, "group": 100 / 3}
    assert summary["collapsed_tag=Relation"] == {"n": 1, "text": 100.0, "image": 0.0, "group": 0.0}
    assert summary["collapsed_tag=Both"] == {"n": 1, "text": 0.0, "image": 0.0, "group": 0.0}
    assert summary["num_main_preds=2"] == {"n": 1, "text": 100.0, "image": 0.0, "group": 0.0}
    assert summary["num_main_preds=1"]["n"] == 4
    table = ew.format_table(summary, "title")
    assert "collapsed_tag=Object          3   33.33   66.67   33.33" in table


def test_normalized_image_scores_judge_images_only():
    examples = [ew.Example(**r) for r in records(1)]
    raw = torch.tensor([[[0.5, 0.6], [0.2, 0.9]]])  # text ✓, image ✗
    normalized = torch.tensor([[[0.5, 0.1], [0.6, 0.9]]])  # text ✗, image ✓
    (row,) = ew.score_examples(examples, raw, normalized)
    assert (row["text"], row["image"], row["group"]) == (True, True, True)
    assert row["scores"] == raw[0].tolist() and row["image_scores"] == normalized[0].tolist()


def test_timestep_grid():
    assert ew.timestep_grid(20).tolist() == list(range(25, 1000, 50))
    assert ew.timestep_grid(4).tolist() == [125, 375, 625, 875]
    assert ew.timestep_grid(1000).tolist() == list(range(1000))
    with pytest.raises(ValueError, match="between 1 and 1000"):
        ew.timestep_grid(0)


# ----------------------------------------------------------------------------- data


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("layout", ["images", "zip"])
@pytest.mark.parametrize("level", ["data", "root"])
def test_loads_both_layouts(tmp_path, layout, level):
    write_winoground(tmp_path / "data", layout)
    data = ew.Winoground(tmp_path / "data" if level == "data" else tmp_path)  # the folder or its data/
    assert len(data) == len(CAPTIONS)
    assert [vars(e) for e in data.examples] == records()
    for k, example in enumerate(data.examples):
        for j, image in enumerate(data.images(example)):
            assert image.size == IMAGES[2 * k + j][0] and image.mode == IMAGES[2 * k + j][1]
            assert np.array_equal(pixels(image), pixels(make_image(2 * k + j)))


def test_parquet_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = []
    for r in records():
        row = dict(r)
        for j in (0, 1):
            path = tmp_path / f"{r['image_{}'.format(j)]}.png"
            make_image(2 * r["id"] + j).save(path)
            row[f"image_{j}"] = {"bytes": path.read_bytes(), "path": path.name}  # datasets' Image feature
        rows.append(row)
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "test-00000-of-00001.parquet")
    data = ew.Winoground(tmp_path)
    assert [(e.id, e.caption_0, e.collapsed_tag, e.num_main_preds) for e in data.examples] == [
        (r["id"], r["caption_0"], r["collapsed_tag"], r["num_main_preds"]) for r in records()]
    for k, example in enumerate(data.examples):
        for j, image in enumerate(data.images(example)):
            assert np.array_equal(pixels(image), pixels(make_image(2 * k + j)))


def test_parquet_without_pyarrow_says_so(tmp_path):
    """Simulated in a fresh interpreter where `import pyarrow` fails."""
    (tmp_path / "test-00000-of-00001.parquet").write_bytes(b"PAR1")
    code = ("import sys; sys.modules['pyarrow'] = None; sys.modules['pyarrow.parquet'] = None\n"
            "import eval_winoground as ew\n"
            "try:\n    ew.Winoground(sys.argv[1])\nexcept ImportError as err:\n    print('ImportError:', err)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True, check=True)
    assert "ImportError:" in out.stdout and "needs pyarrow (`pip install pyarrow`)" in out.stdout
    assert "test-00000-of-00001.parquet" in out.stdout


def test_missing_folder_and_examples_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="Winoground not found at .*weights/download.py"):
        ew.Winoground(tmp_path / "nowhere")
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no examples.jsonl"):
        ew.Winoground(tmp_path)


def test_missing_images(tmp_path):
    folder = write_winoground(tmp_path / "a", "images")
    (folder / "images" / "ex_3_img_1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) of .*examples.jsonl not found in .*images: ex_3_img_1.png$"):
        ew.Winoground(folder)
    folder = write_winoground(tmp_path / "b", "zip")
    with zipfile.ZipFile(folder / "images.zip") as archive, zipfile.ZipFile(folder / "smaller.zip", "w") as smaller:
        for member in archive.namelist():
            if "ex_0_img_0" not in member:
                smaller.writestr(member, archive.read(member))
    (folder / "smaller.zip").replace(folder / "images.zip")
    with pytest.raises(FileNotFoundError, match=r"not found in .*images.zip: ex_0_img_0.png$"):
        ew.Winoground(folder)
    folder = write_winoground(tmp_path / "c", "zip")
    (folder / "images.zip").unlink()
    with pytest.raises(FileNotFoundError, match="neither images/ nor images.zip"):
        ew.Winoground(folder)


def test_malformed_lines(tmp_path):
    good = [json.dumps(r) for r in records()]
    no_caption = dict(records()[1])
    del no_caption["caption_1"]
    cases = [
        (good[:1] + [json.dumps(no_caption)] + good[2:], r"line 2 lacks the field\(s\) \['caption_1'\]"),
        (good[:2] + ['{"id": 2, "image_0": '] + good[3:], "line 3 is not valid JSON"),
        (good[:3] + [json.dumps(records()[3] | {"num_main_preds": "one"})] + good[4:],
         "line 4: field 'num_main_preds' should be an integer, got 'one'"),
        (good[:1] + [json.dumps(records()[0])] + good[2:], "example ids repeat"),
        (["[1, 2]"], "line 1 is not a JSON object"),
    ]
    for n, (lines, message) in enumerate(cases):
        folder = write_winoground(tmp_path / str(n), "images", lines)
        with pytest.raises(ValueError, match=message):
            ew.Winoground(folder)


def test_unreadable_image(tmp_path):
    folder = write_winoground(tmp_path, "images")
    (folder / "images" / "ex_2_img_0.png").write_bytes(b"not a png")
    data = ew.Winoground(folder)
    with pytest.raises(ValueError, match="ex_2_img_0.png is not a readable image"):
        data.images(data[2])


# ----------------------------------------------------------------------------- CLIP score


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """A small random CLIP saved by transformers (real 49,408-token vocabulary), with its tokenizer."""
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=32,
    )
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # LayerNorms away from (1, 0) so that they are tested too
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def reference_clip_scores(folder: Path, data: "ew.Winoground") -> torch.Tensor:
    """(N, 2, 2) cosine similarities from transformers' tokenizer, image processor and CLIPModel."""
    model = transformers.CLIPModel.from_pretrained(folder).eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    scores = []
    with torch.no_grad():
        for example in data.examples:
            pixels = processor(images=list(data.images(example)), return_tensors="pt").pixel_values
            ids = tokenizer([example.caption_0, example.caption_1], padding="max_length", max_length=77,
                            return_tensors="pt").input_ids
            images = F.normalize(model.get_image_features(pixel_values=pixels), dim=-1)  # (2, D)
            texts = F.normalize(model.get_text_features(input_ids=ids), dim=-1)  # (2, D)
            scores.append(texts @ images.T)  # (caption, image)
    return torch.stack(scores)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_clip_scores_match_transformers(parity, winoground, clip_folder, batch_size):
    from clip import Tokenizer, load_clip

    data = ew.Winoground(winoground)
    ours = ew.clip_scores(load_clip(clip_folder), Tokenizer.from_pretrained(clip_folder), data, data.examples, batch_size)
    ref = reference_clip_scores(clip_folder, data)
    parity(f"winoground CLIP 2x2 cosine scores, small config, batch {batch_size}", ours, ref, atol=1e-4)
    assert ours[:, 0, 0].std() > 1e-3  # the scores differ between examples: nothing constant was compared
    rows, ref_rows = ew.score_examples(data.examples, ours), ew.score_examples(data.examples, ref)
    assert [(r["text"], r["image"]) for r in rows] == [(r["text"], r["image"]) for r in ref_rows]
