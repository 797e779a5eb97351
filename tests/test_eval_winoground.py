"""eval_winoground.py: data loading, the three metrics, the CLIP score against transformers'
CLIPModel and the diffusion score against diffusers + transformers, on a synthetic
Winoground-format folder and tiny random checkpoints written here; the bootstrap intervals and
--compare against hand computations and binomial closed forms."""

import gzip
import inspect
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

import eval_winoground as ew
from weights import runs
from weights import winoground as wino
from weights.networks import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
OPENAI_BPE = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
FIELDS = ["id", "image_0", "image_1", "caption_0", "caption_1", "tag", "secondary_tag", "num_main_preds",
          "collapsed_tag"]

# (caption_0, caption_1, tag, secondary_tag, num_main_preds, collapsed_tag), in the style of the real set.
CAPTIONS = [
    ("a dog chasing a cat", "a cat chasing a dog", "Noun", "", 1, "Object"),
    ("there is a mug in some grass", "there is some grass in a mug", "Noun", "Symbolic", 1, "Object"),
    ("the person with the ponytail packs stuff and other buys it",
     "the person with the ponytail buys stuff and other packs it", "Verb", "", 2, "Relation"),
    ("a bird eats a snake", "a snake eats a bird", "Noun", "", 1, "Object"),
    ("the red book is on top of the blue book", "the blue book is on top of the red book", "Adjective-Color", "", 1,
     "Both"),
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
    vocab_json = json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False)
    (folder / "vocab.json").write_text(vocab_json, encoding="utf-8")
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


# One case per comparison of the two metrics: only that comparison ties, the other comparison of
# the same metric holds strictly, so the credit fails because of the tie alone (a `>` written `>=`
# would give it). Each comparison appears twice: once with the other metric's credit holding and
# once with it failing, which also checks that the tie does not leak into the other metric.
#   text ⇔ s00 > s10 and s11 > s01;  image ⇔ s00 > s01 and s11 > s10
TIE_CASES = [
    # text, first comparison s00 > s10 tied; s11 > s01 holds
    ([[0.5, 0.2], [0.5, 0.6]], False, True),  # image: .5 > .2 and .6 > .5
    ([[0.5, 0.2], [0.5, 0.4]], False, False),  # image: .5 > .2 but .4 > .5 fails
    # text, second comparison s11 > s01 tied; s00 > s10 holds
    ([[0.5, 0.4], [0.3, 0.4]], False, True),  # image: .5 > .4 and .4 > .3
    ([[0.5, 0.6], [0.3, 0.6]], False, False),  # image: .5 > .6 fails
    # image, first comparison s00 > s01 tied; s11 > s10 holds
    ([[0.5, 0.5], [0.2, 0.6]], True, False),  # text: .5 > .2 and .6 > .5
    ([[0.5, 0.5], [0.2, 0.4]], False, False),  # text: .5 > .2 but .4 > .5 fails
    # image, second comparison s11 > s10 tied; s00 > s01 holds
    ([[0.5, 0.3], [0.4, 0.4]], True, False),  # text: .5 > .4 and .4 > .3
    ([[0.5, 0.3], [0.6, 0.6]], False, False),  # text: .5 > .6 fails
]


@pytest.mark.parametrize("s, text, image", TIE_CASES)
def test_a_single_tie_fails_the_credit(s, text, image):
    assert (ew.text_correct(s), ew.image_correct(s), ew.group_correct(s)) == (text, image, False)
    assert (ew.text_correct(torch.tensor(s)), ew.image_correct(torch.tensor(s))) == (text, image)


def test_summary_counts_and_breakdown():
    examples = [wino.Example(**r) for r in records()]
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
    examples = [wino.Example(**r) for r in records(1)]
    raw = torch.tensor([[[0.5, 0.6], [0.2, 0.9]]])  # text ✓, image ✗
    normalized = torch.tensor([[[0.5, 0.1], [0.6, 0.9]]])  # text ✗, image ✓
    (row,) = ew.score_examples(examples, raw, normalized)
    assert (row["text"], row["image"], row["group"]) == (True, True, True)
    assert row["scores"] == raw[0].tolist() and row["image_scores"] == normalized[0].tolist()


def test_normalize_image_score_subtracts_the_empty_prompt_error(monkeypatch, winoground):
    """evaluate --sd --normalize_image_score on known errors e[n, c, i, k] (c = 2: the empty prompt):
    images are judged on −mean_k (e[c, i, k] − e[∅, i, k]), captions on −mean_k e[c, i, k]."""
    errors = 1 + torch.rand(len(records()), 3, 2, 2, generator=torch.Generator().manual_seed(0))  # (N, C, 2, T)
    # Example 0 by hand, two timesteps around each mean: e(c0,i0) 1, e(c0,i1) 3, e(c1,i0) 2, e(c1,i1) 2.5,
    # e(∅,i0) 1.5, e(∅,i1) 3 (image 1 is hard to denoise whatever the caption). Raw: caption 1 prefers image 0
    # (−2 > −2.5), image ✗. Normalised: [[0.5, 0], [−0.5, 0.5]], image ✓ (either other empty error: ✗).
    errors[0] = torch.tensor([[[0.75, 1.25], [2.0, 4.0]], [[2.5, 1.5], [2.5, 2.5]], [[1.0, 2.0], [3.5, 2.5]]])

    signature = inspect.signature(ew.diffusion_errors)

    def known_errors(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        assert call.arguments["unconditional"], "the empty prompt's errors were not asked for"
        return errors[: len(call.arguments["examples"])]

    monkeypatch.setattr(ew, "diffusion_errors", known_errors)
    monkeypatch.setattr(ew, "load_stable_diffusion", lambda *args: SimpleNamespace(resolution=16))
    results = ew.evaluate(ew.parse_args(["--sd", "no-model-needed", "--data", str(winoground), "--timesteps", "2",
                                         "--normalize_image_score", "--device", "cpu"]))
    rows = results["examples"]
    assert rows[0]["image_scores"] == [[0.5, 0.0], [-0.5, 0.5]] and rows[0]["scores"] == [[-1.0, -3.0], [-2.0, -2.5]]
    assert (rows[0]["text"], rows[0]["image"], rows[0]["group"]) == (True, True, True)
    for n, row in enumerate(rows):
        e = errors[n].tolist()
        raw = [[-(e[c][i][0] + e[c][i][1]) / 2 for i in (0, 1)] for c in (0, 1)]
        normalised = [[-((e[c][i][0] - e[2][i][0]) + (e[c][i][1] - e[2][i][1])) / 2 for i in (0, 1)] for c in (0, 1)]
        np.testing.assert_allclose(row["scores"], raw, rtol=0, atol=1e-6)
        np.testing.assert_allclose(row["image_scores"], normalised, rtol=0, atol=1e-6)
        assert (row["text"], row["image"]) == (ew.text_correct(raw), ew.image_correct(normalised))


# ----------------------------------------------------------------------------- uncertainty


def test_bootstrap_interval_is_the_percentiles_of_the_resampled_means():
    values = np.array([[1, 0], [0, 0], [1, 1], [1, 0], [0, 1]])  # (N = 5 examples, K = 2 scores)
    low, high = ew.bootstrap_interval(values, resamples=7, level=0.5, seed=3)
    draws = np.random.default_rng(3).integers(0, 5, (7, 5))  # the same generator: resample r takes rows draws[r]
    for k in range(2):
        means = sorted(sum(values[row, k] for row in rows) / 5 for rows in draws)
        # level ½: the 25th and 75th percentiles of 7 means, at positions ¼·6 = 1.5 and ¾·6 = 4.5 (linear)
        assert (low[k], high[k]) == pytest.approx(((means[1] + means[2]) / 2, (means[4] + means[5]) / 2))


def binomial_quantile(n: int, p: float, q: float) -> int:
    """The smallest j with P(X ≤ j) ≥ q, X ~ Binomial(n, p)."""
    cdf = np.cumsum([math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(n + 1)])
    return int(np.argmax(cdf >= q))


def test_bootstrap_interval_against_closed_forms():
    # The mean of a resample of N credits, k of them right, is Binomial(N, k/N) / N: the interval's ends are its
    # 2.5 % and 97.5 % quantiles, up to the resampling noise (sd ≈ 0.15 points at N = 400 and 2,000 resamples).
    credits = np.arange(400) < 123  # 30.75 %, CLIP ViT-B/32's text score
    low, high = 100 * ew.bootstrap_interval(credits)[:, 0]
    assert abs(low - binomial_quantile(400, 0.3075, 0.025) / 4) < 0.6
    assert abs(high - binomial_quantile(400, 0.3075, 0.975) / 4) < 0.6
    assert (low, high) == pytest.approx((26.3, 35.3), abs=0.1)  # 30.75 ± 1.96·√(p(1 − p)/N) = [26.2, 35.3]
    # By hand: of two examples one right, a resample has mean 0 or 1 with probability ¼ each: both beyond 2.5 %.
    assert ew.bootstrap_interval([[True], [False]]).ravel().tolist() == [0.0, 1.0]
    assert ew.bootstrap_interval(np.full((7, 1), 0.25)).ravel().tolist() == [0.25, 0.25]


def test_intervals_on_every_subset_in_the_table_and_json():
    examples = [wino.Example(**r) for r in records()]
    rows = ew.score_examples(examples, torch.tensor([case[0] for case in METRIC_CASES[:5]]))
    summary = ew.summarize(rows, resamples=500)
    for name in ("all", "collapsed_tag=Object"):
        subset = [r for r in rows if name == "all" or r["collapsed_tag"] == "Object"]
        low, high = 100 * ew.bootstrap_interval([[r["text"], r["image"], r["group"]] for r in subset], 500)
        assert summary[name]["ci95"] == {key: [low[k], high[k]] for k, key in enumerate(("text", "image", "group"))}
        assert summary[name]["n"] == len(subset)
    assert summary["collapsed_tag=Both"]["ci95"]["text"] == [0.0, 0.0]  # one example, wrong
    table = ew.format_table(summary, "title").splitlines()
    assert table[1] == "subset                        n    text                  image                  group"
    (low, high), (low_image, high_image) = (summary["all"]["ci95"][key] for key in ("text", "image"))
    assert table[2].startswith(f"all                           5   40.00 [{low:5.1f}, {high:5.1f}]   40.00 "
                               f"[{low_image:5.1f}, {high_image:5.1f}]")
    assert table[5] == "collapsed_tag=Relation        1  100.00 [100.0, 100.0]" + "    0.00 [  0.0,   0.0]" * 2
    assert "ci95" not in ew.summarize(rows)["all"]  # train.py's log: the scores alone


def test_bootstrap_too_large_for_memory_is_refused_before_any_work(tmp_path, winoground, monkeypatch, capsys):
    with pytest.raises(SystemExit) as stopped:  # too many for a single example: argparse's line
        ew.parse_args(["--bootstrap", str(2**40)])
    assert stopped.value.code == 2
    assert (f"--bootstrap {2**40} needs 32768.0 GiB on 1 example(s) (resamples × examples × 4 × 8 bytes), more than "
            f"2 GiB; pass --bootstrap {2**26} or fewer") in capsys.readouterr().err
    # too many for the 5 examples, known once the data is read: refused before the model loads (there is none)
    args = ew.parse_args(["--clip", str(tmp_path / "missing"), "--data", str(winoground), "--bootstrap", str(2**24)])
    with pytest.raises(ValueError, match=re.escape(f"--bootstrap {2**24} needs 2.5 GiB on 5 example(s)")):
        ew.evaluate(args)
    monkeypatch.setattr(ew, "MAX_BOOTSTRAP_BYTES", 100 * 10 * 32)  # --compare: 100 resamples of 10 examples fit
    a = write_run(tmp_path / "a.json", {i: (i < 8, True, i < 8) for i in range(10)})
    assert ew.compare_runs(a, a, resamples=100)["bootstrap_resamples"] == 100
    with pytest.raises(ValueError, match="--bootstrap 101 needs .* on 10 example.*; pass --bootstrap 100 or fewer"):
        ew.compare_runs(a, a, resamples=101)


def test_scores_are_saved_when_the_intervals_fail(tmp_path, winoground, clip_folder, monkeypatch):
    """The intervals come after the scoring (hours with --sd): should they fail, --out still gets the scores."""
    argv = ["--clip", str(clip_folder), "--data", str(winoground), "--device", "cpu"]
    expected = ew.evaluate(ew.parse_args(argv))

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(ew, "bootstrap_interval", out_of_memory)
    out = tmp_path / "out" / "clip.json"
    with pytest.raises(MemoryError):
        ew.evaluate(ew.parse_args([*argv, "--out", str(out)]))
    saved = json.loads(out.read_text())
    assert saved["examples"] == expected["examples"] and saved["settings"] == expected["settings"]
    assert len(wino.read_run(out).credits) == 5  # --compare reads it


def write_run(path: Path, credits: dict[int, tuple[bool, bool, bool]], settings: dict | None = None,
              tags: dict[int, dict] | None = None) -> Path:
    """A results file as --out writes it, reduced to what --compare reads (and the tags of some examples)."""
    examples = [{"id": i, "text": t, "image": im, "group": g} | (tags or {}).get(i, {})
                for i, (t, im, g) in credits.items()]
    path.write_text(json.dumps({"settings": settings or {}, "examples": examples}))
    return path


def test_mcnemar_p_by_hand():
    assert ew.mcnemar_p(5, 0) == ew.mcnemar_p(0, 5) == 2 / 32  # 2 · P(X = 0), X ~ Binomial(5, ½)
    assert ew.mcnemar_p(1, 9) == 2 * (1 + 10) / 1024
    assert ew.mcnemar_p(0, 0) == ew.mcnemar_p(3, 3) == ew.mcnemar_p(2, 1) == 1.0
    assert ew.mcnemar_p(0, 100) == 2 / 2**100


def test_compare_two_runs_with_a_known_answer(tmp_path):
    # 10 examples. text: A right on 0–7, B on 5–7, so B − A = −50 with b = 5, c = 0: McNemar p = 2/32, and the
    # paired difference of a resample is −Binomial(10, ½)/10, whose 2.5 % and 97.5 % quantiles are −80 and −20
    # (P(X ≤ 1) = 11/1024, P(X ≤ 2) = 56/1024; P(X ≤ 7) = 968/1024, P(X ≤ 8) = 1013/1024). Unpaired resamples
    # (A ~ Bin(10, .8), B ~ Bin(10, .3)) would give a wider interval. image: A right on 5 and 9, B also on 7: +10,
    # c = 1, p = 1, interval [0, 30] (P(X ≤ 2) = .930, P(X ≤ 3) = .987 for X ~ Bin(10, .1)). group = text and
    # image: A on 5, B on 5 and 7, the same +10, c = 1, p = 1, [0, 30].
    a = write_run(tmp_path / "a.json", {i: (i < 8, i in (5, 9), i == 5) for i in range(10)})
    b = write_run(tmp_path / "b.json", {i: (5 <= i < 8, i in (5, 7, 9), i in (5, 7)) for i in reversed(range(10))})
    result = ew.compare_runs(a, b)
    assert result["n"] == 10
    text, image, group = (result["metrics"][key] for key in ("text", "image", "group"))
    assert (text["a"], text["b"], text["difference"], text["ci95"]) == (80, 30, -50, [-80, -20])
    assert (text["only_a"], text["only_b"], text["mcnemar_p"]) == (5, 0, 0.0625)
    assert (image["difference"], image["ci95"], image["only_a"], image["only_b"], image["mcnemar_p"]) == (10, [0, 30],
                                                                                                       0, 1, 1)
    assert (group["difference"], group["ci95"], group["only_b"], group["mcnemar_p"]) == (10, [0, 30], 1, 1)
    same = ew.compare_runs(a, a)["metrics"]
    assert [(m["difference"], m["ci95"], m["mcnemar_p"]) for m in same.values()] == [(0, [0, 0], 1)] * 3


def test_compare_script_prints_and_saves_and_refuses_other_examples(tmp_path):
    a = write_run(tmp_path / "a.json", {i: (i < 8, True, i < 8) for i in range(10)})
    b = write_run(tmp_path / "b.json", {i: (5 <= i < 8, True, 5 <= i < 8) for i in range(10)})
    done = run_script("--compare", str(a), str(b), "--out", str(tmp_path / "diff.json"))
    assert done.returncode == 0, done.stderr
    assert "text       80.00   30.00  -50.00    [-80.0, -20.0]       5       0     0.0625" in done.stdout
    assert json.loads((tmp_path / "diff.json").read_text())["metrics"]["text"]["mcnemar_p"] == 0.0625
    other = write_run(tmp_path / "other.json", {i: (True, True, True) for i in range(2, 12)})
    with pytest.raises(ValueError, match=re.escape(f"{a} and {other} score different examples (2 only in the first, "
                                                   f"e.g. ids [0, 1]; 2 only in the second, e.g. ids [10, 11])")):
        ew.compare_runs(a, other)
    (tmp_path / "broken.json").write_text('{"examples": [{"id": 0}]}')
    with pytest.raises(ValueError, match="broken.json is not a results file of eval_winoground.py --out"):
        ew.compare_runs(a, tmp_path / "broken.json")


def test_compare_refuses_runs_of_different_data_under_the_same_ids(tmp_path, monkeypatch):
    """The toy world's test and val splits both number their examples 0 … N−1: the same ids, other examples."""
    credits = {i: (i < 3, True, i < 3) for i in range(5)}
    test = write_run(tmp_path / "test.json", credits, {"data": "weights/toy/data/test"})
    val = write_run(tmp_path / "val.json", credits, {"data": "weights/toy/data/val"})
    with pytest.raises(ValueError, match=re.escape(f"{test} and {val} scored different data (--data "
                                                   f"weights/toy/data/test and weights/toy/data/val), whose example "
                                                   f"ids only coincide")):
        ew.compare_runs(test, val)
    done = run_script("--compare", str(test), str(val))
    assert done.returncode == 1 and done.stderr.strip().startswith(f"error: {test} and {val} scored different data")
    # the same copy, however --data spelled it and wherever the comparison runs from
    monkeypatch.chdir(tmp_path)
    spellings = ["w", str(tmp_path / "w" / "data"), "./w/data/examples.jsonl"]
    runs_of_w = [write_run(tmp_path / f"w{k}.json", credits, {"data": data}) for k, data in enumerate(spellings)]
    assert ew.compare_runs(*runs_of_w[:2])["n"] == ew.compare_runs(*runs_of_w[1:])["n"] == 5
    # the same path, drawn again: the tags of an id differ
    tags = {i: {"tag": "Noun", "collapsed_tag": "Object"} for i in range(5)}
    before = write_run(tmp_path / "before.json", credits, {"data": "w"}, tags)
    redrawn = tags | {3: {"tag": "Noun", "collapsed_tag": "Both"}}
    after = write_run(tmp_path / "after.json", credits, {"data": "w"}, redrawn)
    with pytest.raises(ValueError, match=re.escape(f"{before} and {after} scored different examples under the same ids "
                                                   f"(example 3's collapsed_tag is 'Object' in the first and 'Both' in "
                                                   f"the second)")):
        ew.compare_runs(before, after)
    assert ew.compare_runs(before, write_run(tmp_path / "same.json", credits, {"data": "w"}, tags))["n"] == 5


def test_compare_refuses_contradictory_credits(tmp_path):
    a = write_run(tmp_path / "a.json", {i: (True, True, True) for i in range(4)})
    for text, image in ((True, False), (False, True), (True, True)):
        group = not (text and image)
        b = write_run(tmp_path / "b.json", {i: (True, True, True) for i in range(4)} | {2: (text, image, group)})
        with pytest.raises(ValueError, match=re.escape(f"{b}: example 2 has group credit {group} with text {text} "
                                                       f"and image {image} (1 such examples), but group is text and "
                                                       f"image")):
            ew.compare_runs(a, b)


@pytest.mark.parametrize("ids, odd", [([0, "1"], "'1'"), ([True, 2], "True"), ([0, 1.0], "1.0")])
def test_compare_refuses_ids_that_are_not_integers(tmp_path, ids, odd):
    """1 and "1" pair as two examples, True and 1 as one: a run written by this script only holds integers."""
    credits = {i: (True, True, True) for i in ids}
    a, b = write_run(tmp_path / "a.json", credits), write_run(tmp_path / "b.json", credits)
    with pytest.raises(ValueError, match=re.escape(f"{a}: example id {odd} is not an integer")):
        ew.compare_runs(a, b)


def test_out_never_replaces_an_input(tmp_path, winoground, capsys):
    a = write_run(tmp_path / "a.json", {i: (True, True, True) for i in range(3)})
    b = write_run(tmp_path / "b.json", {i: (False, True, False) for i in range(3)})
    original = a.read_text()
    for argv in (["--compare", str(a), str(b), "--out", str(a)],
                 ["--compare", str(a), str(b), "--out", str(tmp_path / "x" / ".." / "b.json")],
                 ["--data", str(winoground), "--out", str(winoground / "examples.jsonl")],
                 ["--data", str(winoground.parent), "--out", str(winoground / "examples.jsonl")]):
        with pytest.raises(SystemExit) as stopped:
            ew.parse_args(argv)
        assert stopped.value.code == 2
        assert f"--out {argv[-1]} is a file this run reads; pass another --out" in capsys.readouterr().err
    done = run_script("--compare", str(a), str(b), "--out", str(a))
    assert done.returncode == 2 and a.read_text() == original
    assert ew.parse_args(["--compare", str(a), str(b), "--out", str(tmp_path / "c.json")]).out


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
@pytest.mark.parametrize("level", ["data", "root", "file"])
def test_loads_both_layouts(tmp_path, layout, level):
    write_winoground(tmp_path / "data", layout)
    path = {"data": tmp_path / "data", "root": tmp_path, "file": tmp_path / "data" / "examples.jsonl"}[level]
    data = wino.Winoground(path)  # the folder, its data/, or examples.jsonl itself
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
    data = wino.Winoground(tmp_path)
    assert [(e.id, e.caption_0, e.collapsed_tag, e.num_main_preds) for e in data.examples] == [
        (r["id"], r["caption_0"], r["collapsed_tag"], r["num_main_preds"]) for r in records()]
    for k, example in enumerate(data.examples):
        for j, image in enumerate(data.images(example)):
            assert np.array_equal(pixels(image), pixels(make_image(2 * k + j)))


def test_parquet_without_pyarrow_says_so(tmp_path):
    """Simulated in a fresh interpreter where `import pyarrow` fails."""
    (tmp_path / "test-00000-of-00001.parquet").write_bytes(b"PAR1")
    code = ("import sys; sys.modules['pyarrow'] = None; sys.modules['pyarrow.parquet'] = None\n"
            "from weights import winoground as wino\n"
            "try:\n    wino.Winoground(sys.argv[1])\nexcept ImportError as err:\n    print('ImportError:', err)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         check=True)
    assert "ImportError:" in out.stdout and "needs pyarrow (`pip install pyarrow`)" in out.stdout
    assert "test-00000-of-00001.parquet" in out.stdout


def test_missing_folder_and_examples_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="Winoground not found at .*weights/download.py --winoground"):
        wino.Winoground(tmp_path / "nowhere")
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no examples.jsonl"):
        wino.Winoground(tmp_path)


def test_missing_images(tmp_path):
    folder = write_winoground(tmp_path / "a", "images")
    (folder / "images" / "ex_3_img_1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) of .*examples.jsonl not found in .*images: "
                                                r"ex_3_img_1.png$"):
        wino.Winoground(folder)
    folder = write_winoground(tmp_path / "b", "zip")
    with zipfile.ZipFile(folder / "images.zip") as archive, zipfile.ZipFile(folder / "smaller.zip", "w") as smaller:
        for member in archive.namelist():
            if "ex_0_img_0" not in member:
                smaller.writestr(member, archive.read(member))
    (folder / "smaller.zip").replace(folder / "images.zip")
    with pytest.raises(FileNotFoundError, match=r"not found in .*images.zip: ex_0_img_0.png$"):
        wino.Winoground(folder)
    folder = write_winoground(tmp_path / "c", "zip")
    (folder / "images.zip").unlink()
    with pytest.raises(FileNotFoundError, match="neither images/ nor images.zip"):
        wino.Winoground(folder)


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
            wino.Winoground(folder)


def test_unreadable_image(tmp_path):
    folder = write_winoground(tmp_path, "images")
    (folder / "images" / "ex_2_img_0.png").write_bytes(b"not a png")
    data = wino.Winoground(folder)
    with pytest.raises(ValueError, match="ex_2_img_0.png is not a readable image"):
        data.images(data[2])


def test_examples_file_that_is_not_utf8_names_the_file(tmp_path):
    folder = write_winoground(tmp_path, "images")
    (folder / "examples.jsonl").write_bytes((folder / "examples.jsonl").read_bytes().replace(b"mug", b"m\xfcg"))
    with pytest.raises(ValueError, match=r"examples.jsonl is not UTF-8 text \(byte \d+ cannot be decoded: "
                                         r"invalid start byte\); download the dataset again"):
        wino.Winoground(folder)


@pytest.mark.parametrize("name", ["/etc/passwd", "../secret", "ex_0/../../secret", "..\\secret", "C:\\secret.png",
                                  "\\\\server\\share\\x.png", "\\secret", "\\secret.png"])
def test_image_names_outside_the_images_folder_are_refused(tmp_path, name):
    (tmp_path / "secret.png").write_bytes(b"")
    lines = [json.dumps(r | ({"image_1": name} if r["id"] == 2 else {})) for r in records()]
    folder = write_winoground(tmp_path / "data", "images", lines)
    with pytest.raises(ValueError, match=rf"examples.jsonl line 3: image_1 {re.escape(repr(name))} is an absolute "
                                         r"path or goes up with '..'"):
        wino.Winoground(folder)


def test_images_too_large_to_decode_are_one_sentence(tmp_path, monkeypatch):
    """A decompression bomb: PIL refuses images above twice its MAX_IMAGE_PIXELS with an error that
    is not an OSError; made small here so that a small image is one."""
    data = wino.Winoground(write_winoground(tmp_path, "zip"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # the images have 900 to 4900 pixels
    with pytest.raises(ValueError, match=r"images.zip:images/ex_1_img_0.png is too large to decode safely \(.*\), "
                                         r"so it is treated as unreadable; download the dataset again"):
        data.images(data[1])


def test_zip_members_that_inflate_hugely_are_refused(tmp_path, monkeypatch):
    """A few hundred KB of zip that inflate to more than any image file: refused from the listed size up front,
    and read with a bound (a listed size can lie)."""
    folder = write_winoground(tmp_path / "bomb", "zip")
    with zipfile.ZipFile(folder / "images.zip") as archive:
        members = {i.filename: archive.read(i) for i in archive.infolist() if i.filename != "images/ex_1_img_0.png"}
    with zipfile.ZipFile(folder / "images.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr("images/ex_1_img_0.png", bytes(wino.MAX_IMAGE_FILE_BYTES + 1))
    assert (folder / "images.zip").stat().st_size < 500_000
    with pytest.raises(ValueError, match=r"images.zip: images/ex_1_img_0.png inflates to 67,108,865 bytes, more than "
                                         r"any image file \(the limit is 67,108,864\); download the dataset again"):
        wino.Winoground(folder)
    data = wino.Winoground(write_winoground(tmp_path / "good", "zip"))
    monkeypatch.setattr(wino, "MAX_IMAGE_FILE_BYTES", 1000)  # the images are larger: as if their sizes were lies
    with pytest.raises(ValueError, match=r"images.zip:images/ex_1_img_0.png inflates to more than 1,000 bytes"):
        data.images(data[1])


def test_out_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file" / "results.json", tmp_path):  # a file stands in the way; a folder
        with pytest.raises(SystemExit) as stopped:
            ew.parse_args(["--out", str(out)])
        assert stopped.value.code == 2
        assert f"--out {out} cannot be written" in capsys.readouterr().err.splitlines()[-1]
    assert ew.parse_args(["--out", str(tmp_path / "new" / "results.json")]).out  # a folder to make is fine
    assert not (tmp_path / "new").exists()  # and the check makes nothing


def test_results_that_cannot_be_written_at_the_end_are_kept_elsewhere(tmp_path, monkeypatch):
    """--out was writable at the start and is not once the scores are ready (hours later): the results go to a
    temporary file and the one-line error says where."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "results.json"
    results = {"settings": {"data": "x"}, "examples": [{"id": 0, "group": True}]}
    with pytest.raises(SystemExit) as stopped:
        runs.write_results(results, str(out))
    [kept] = (tmp_path / "tmp").glob("winoground-*.json")
    assert json.loads(kept.read_text()) == results
    assert str(stopped.value).startswith(f"error: --out {out} cannot be written (")
    assert str(stopped.value).endswith(f"); the results are in {kept}")


@pytest.mark.parametrize("resolution", ["0", "100000"])
def test_resolution_out_of_range_is_one_argparse_line(resolution, capsys):
    with pytest.raises(SystemExit):
        ew.parse_args(["--sd", "--resolution", resolution])
    assert f"--resolution must be between 1 and {ew.MAX_RESOLUTION} pixels" in capsys.readouterr().err


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


def reference_clip_scores(folder: Path, data: "wino.Winoground") -> torch.Tensor:
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


@pytest.mark.parametrize("batch_size, workers, layout", [(1, 0, "images"), (3, 2, "zip")])
def test_clip_scores_match_transformers(parity, tmp_path, clip_folder, batch_size, workers, layout):
    from weights.networks import load_clip

    data = wino.Winoground(write_winoground(tmp_path, layout))
    tokenizer = load_tokenizer(clip_folder)
    ours = ew.clip_scores(load_clip(clip_folder), tokenizer, data, data.examples, batch_size, workers=workers)
    ref = reference_clip_scores(clip_folder, data)
    parity(f"winoground CLIP 2x2 cosine scores, small config, batch {batch_size}, {workers} workers", ours, ref,
           atol=1e-4)
    assert ours[:, 0, 0].std() > 1e-3  # the scores differ between examples: nothing constant was compared
    rows, ref_rows = ew.score_examples(data.examples, ours), ew.score_examples(data.examples, ref)
    assert [(r["text"], r["image"]) for r in rows] == [(r["text"], r["image"]) for r in ref_rows]


# ----------------------------------------------------------------------------- diffusion score

SD_RESOLUTION = 16  # tiny VAE: 2 blocks, 16 × 16 pixels → 8 × 8 latents


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion in diffusers layout, every part saved by its reference library."""
    import diffusers

    folder = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
    )
    with torch.no_grad():  # diffusers zero-initialises some output projections: make every weight count
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet.save_pretrained(folder / "unet")
    diffusers.AutoencoderKL(
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=8, layers_per_block=1, sample_size=SD_RESOLUTION,
    ).save_pretrained(folder / "vae")
    transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77,
    )).save_pretrained(folder / "text_encoder")
    write_tokenizer(folder / "tokenizer")
    return folder


def reference_diffusion_errors(folder: Path, data, example, timesteps: list[int], noise: torch.Tensor) -> torch.Tensor:
    """(3, 2, T) errors of captions 0, 1 and "" on images 0, 1, with diffusers' UNet, VAE and noise
    schedule and transformers' tokenizer, image processor and text encoder."""
    import diffusers

    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval()
    text_encoder = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")  # pads with <|endoftext|>, as SD's
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear")
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": SD_RESOLUTION}, image_mean=[0.5] * 3,
                                                image_std=[0.5] * 3,
                                                crop_size={"height": SD_RESOLUTION, "width": SD_RESOLUTION})
    with torch.no_grad():
        pixels = processor(images=list(data.images(example)), return_tensors="pt").pixel_values  # (2, 3, R, R)
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        ids = tokenizer([example.caption_0, example.caption_1, ""], padding="max_length", max_length=77,
                        return_tensors="pt").input_ids
        context = text_encoder(ids).last_hidden_state
        triples = [(c, i, k) for c in range(3) for i in range(2) for k in range(len(timesteps))]
        t = torch.tensor([timesteps[k] for _, _, k in triples])
        eps = torch.stack([noise[k] for _, _, k in triples])
        noisy = scheduler.add_noise(torch.stack([latents[i] for _, i, _ in triples]), eps, t)
        eps_hat = unet(noisy, t, encoder_hidden_states=torch.stack([context[c] for c, _, _ in triples])).sample
    return (eps_hat - eps).pow(2).mean(dim=(1, 2, 3)).view(3, 2, len(timesteps))


def test_diffusion_score_matches_diffusers(parity, winoground, sd_folder):
    data = wino.Winoground(winoground)
    sd = ew.load_stable_diffusion(sd_folder)
    timesteps = [125, 375, 625, 875]  # --timesteps 4: the centres of four equal bins of 0 … 999
    ours = ew.diffusion_errors(sd, data, data.examples[:2], ew.timestep_grid(4), seed=7, batch_size=10,
                               resolution=SD_RESOLUTION, unconditional=True)  # (2, 3, 2, T)
    # The documented noise: one (T, 4, h, w) draw per example, in order, from a generator seeded 7.
    generator = torch.Generator().manual_seed(7)
    noise = [torch.randn((4, 4, 8, 8), generator=generator) for _ in range(2)]
    for n in range(2):
        ref = reference_diffusion_errors(sd_folder, data, data[n], timesteps, noise[n])
        parity(f"winoground diffusion errors, tiny SD, example {n}", ours[n], ref, atol=1e-4)
        parity(f"winoground diffusion 2x2 score, tiny SD, example {n}", -ours[n, :2].mean(-1), -ref[:2].mean(-1),
               atol=1e-4)
    # the two captions give different errors: text conditioning counts
    assert (ours[:, 0] - ours[:, 1]).abs().min() > 1e-6


def test_diffusion_score_is_seeded(winoground, sd_folder):
    data = wino.Winoground(winoground)
    sd = ew.load_stable_diffusion(sd_folder)
    run = lambda seed, batch_size: ew.diffusion_errors(sd, data, data.examples[:3], ew.timestep_grid(3), seed=seed,
                                                       batch_size=batch_size, resolution=SD_RESOLUTION)
    first = run(0, 4)
    assert torch.equal(first, run(0, 4))
    torch.testing.assert_close(first, run(0, 12), rtol=1e-5, atol=1e-6)  # batching changes only the rounding
    assert (first - run(1, 4)).abs().min() > 0  # another seed, other noise, every error differs


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory, sd_folder) -> Path:
    """A tiny Stable Diffusion 2.x-base: a GELU text encoder whose tokenizer pads with "!" (id 0), a UNet
    with linear projections, per-block head counts and cross-attention as wide as the text encoder, an
    ε-prediction scheduler; every part saved by its reference library (the VAE is SD 1.x's, as in SD 2)."""
    import diffusers

    folder = tmp_path_factory.mktemp("sd2")
    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        cross_attention_dim=64, attention_head_dim=[2, 4], use_linear_projection=True, norm_num_groups=8,
    )
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="gelu",
    ))
    with torch.no_grad():  # every weight away from its init (zero output projections, unit LayerNorms)
        for p in [*unet.parameters(), *text_encoder.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    unet.save_pretrained(folder / "unet")
    text_encoder.save_pretrained(folder / "text_encoder")
    shutil.copytree(sd_folder / "vae", folder / "vae")
    write_tokenizer(folder / "tokenizer")
    transformers.CLIPTokenizer(folder / "tokenizer" / "vocab.json", folder / "tokenizer" / "merges.txt",
                               pad_token="!").save_pretrained(folder / "tokenizer")
    diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                            prediction_type="epsilon", skip_prk_steps=True).save_pretrained(folder / "scheduler")
    return folder


def test_diffusion_score_of_sd2_base_matches_diffusers(parity, winoground, sd2_folder):
    data = wino.Winoground(winoground)
    sd = ew.load_stable_diffusion(sd2_folder)
    assert sd.tokenizer.pad_id == 0  # "!", as SD 2.x's tokenizer files say
    ours = ew.diffusion_errors(sd, data, data.examples[:2], ew.timestep_grid(4), seed=3, batch_size=10,
                               resolution=SD_RESOLUTION, unconditional=True)  # (2, 3, 2, T)
    generator = torch.Generator().manual_seed(3)
    noise = [torch.randn((4, 4, 8, 8), generator=generator) for _ in range(2)]
    for n in range(2):  # the reference's CLIPTokenizer reads the same files, so it pads with "!" too
        ref = reference_diffusion_errors(sd2_folder, data, data[n], [125, 375, 625, 875], noise[n])
        parity(f"winoground diffusion errors, tiny SD 2.x-base, example {n}", ours[n], ref, atol=1e-4)
    assert (ours[:, 0] - ours[:, 1]).abs().min() > 1e-6


def test_v_prediction_models_are_refused(tmp_path, sd2_folder):
    import diffusers

    folder = tmp_path / "sd2-768"
    folder.mkdir()
    for part in ("vae", "unet", "text_encoder", "tokenizer"):
        (folder / part).symlink_to(sd2_folder / part)
    diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                            prediction_type="v_prediction").save_pretrained(folder / "scheduler")
    with pytest.raises(ValueError, match=r"scheduler_config.json says prediction_type 'v_prediction'"):
        ew.load_stable_diffusion(folder)


def test_hub_ids_resolve_in_the_local_cache(tmp_path, monkeypatch, winoground, clip_folder, sd_folder):
    """--sd and --clip take a hub id whose snapshot is in the Hugging Face cache."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for repo, target in [("someone/tiny-sd", sd_folder), ("someone/tiny-clip", clip_folder)]:
        cached = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
        (cached / "refs").mkdir(parents=True)
        (cached / "refs" / "main").write_text("c0ffee")
        shutil.copytree(target, cached / "snapshots" / "c0ffee")  # a link out of the cache would be refused
    sd = ew.load_stable_diffusion("someone/tiny-sd")
    assert sd.unet.config.cross_attention_dim == 32
    results = ew.evaluate(ew.parse_args(["--clip", "someone/tiny-clip", "--data", str(winoground), "--limit", "2",
                                         "--device", "cpu"]))
    assert results["settings"]["model"].endswith("snapshots/c0ffee")
    with pytest.raises(FileNotFoundError, match=r"someone/absent not found, neither as a path nor as a hub id .*"
                                                r"huggingface-cli download someone/absent"):
        ew.load_stable_diffusion("someone/absent")


def test_sd_folder_errors(tmp_path, sd_folder):
    with pytest.raises(FileNotFoundError, match="not found.*weights/download.py"):
        ew.load_stable_diffusion(tmp_path / "nowhere")
    (tmp_path / "partial" / "vae").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"lacks the subfolder\(s\) \['unet', 'text_encoder', 'tokenizer'\]"):
        ew.load_stable_diffusion(tmp_path / "partial")


# ----------------------------------------------------------------------------- the script, as a user runs it


def run_script(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "eval_winoground.py"), *args], cwd=cwd, capture_output=True,
                          text=True)


def test_script_clip_writes_results(tmp_path, winoground, clip_folder):
    out = tmp_path / "results" / "clip.json"
    done = run_script("--clip", str(clip_folder), "--data", str(winoground.parent), "--limit", "4", "--batch_size", "3",
                      "--device", "cpu", "--out", str(out))
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert results["settings"]["scorer"] == "clip" and results["settings"]["examples"] == 4
    assert [e["id"] for e in results["examples"]] == [0, 1, 2, 3]
    data = wino.Winoground(winoground)
    ref = reference_clip_scores(clip_folder, data)[:4]
    torch.testing.assert_close(torch.tensor([e["scores"] for e in results["examples"]]), ref, rtol=0, atol=1e-4)
    for e in results["examples"]:
        assert (e["text"], e["image"], e["group"]) == (ew.text_correct(e["scores"]), ew.image_correct(e["scores"]),
                                                       ew.group_correct(e["scores"]))
    n = sum(e["text"] for e in results["examples"])
    ci95 = results["totals"].pop("ci95")  # the 95 % intervals, from the saved credits and the default resamples
    assert results["totals"] == {"n": 4, "text": 25.0 * n, "image": 25.0 * sum(e["image"] for e in results["examples"]),
                                 "group": 25.0 * sum(e["group"] for e in results["examples"])}
    intervals = 100 * ew.bootstrap_interval([[e[key] for key in wino.METRICS] for e in results["examples"]])
    assert ci95 == dict(zip(wino.METRICS, intervals.T.tolist())) and results["settings"]["bootstrap_resamples"] == 2000
    low, high = ci95["text"]
    assert f"all                           4{25.0 * n:>8.2f} [{low:5.1f}, {high:5.1f}]" in done.stdout
    assert "ci95" in results["subsets"]["collapsed_tag=Object"] and "collapsed_tag=Object" in done.stdout


def test_script_sd_is_deterministic(tmp_path, winoground, sd_folder):
    """Two runs, one results.json each, the same scores (another seed: test_diffusion_score_is_seeded)."""

    def scores(name: str) -> dict:
        out = tmp_path / name
        done = run_script("--sd", str(sd_folder), "--data", str(winoground), "--limit", "2", "--timesteps", "3",
                          "--resolution", str(SD_RESOLUTION), "--seed", "3", "--normalize_image_score",
                          "--workers", "0", "--out", str(out))
        assert done.returncode == 0, done.stderr
        assert "Stable Diffusion" in done.stdout and "image score normalised" in done.stdout
        return json.loads(out.read_text())

    first, again = scores("a.json"), scores("b.json")
    settings = first["settings"]
    assert settings["timesteps"] == [166, 500, 833] and settings["seed"] == 3 and settings["normalize_image_score"]
    assert [e["scores"] for e in first["examples"]] == [e["scores"] for e in again["examples"]]
    assert [e["image_scores"] for e in first["examples"]] == [e["image_scores"] for e in again["examples"]]
    for e in first["examples"]:  # text judged on the raw scores, image on the normalised ones
        assert (e["text"], e["image"]) == (ew.text_correct(e["scores"]), ew.image_correct(e["image_scores"]))


def test_script_without_weights_says_how_to_get_them(tmp_path):
    done = run_script(cwd=tmp_path)  # no --clip/--sd and no weights/clip-vit-base-patch32 here
    assert done.returncode == 1
    assert done.stderr.strip() == ("error: no model given and weights/clip-vit-base-patch32 not found — run "
                                   "`python weights/download.py` (see weights/README.md), or pass --clip PATH or "
                                   "--sd PATH")


def test_script_bare_clip_without_its_default_says_what_it_expects(tmp_path, winoground):
    done = run_script("--clip", "--data", str(winoground), cwd=tmp_path)  # no weights/clip-vit-base-patch32 here
    assert done.returncode == 1
    assert done.stderr.strip() == ("error: --clip takes a CLIP checkpoint folder or .safetensors file; without a path "
                                   "it means weights/clip-vit-base-patch32, which is not there — run `python "
                                   "weights/download.py` (see weights/README.md) or pass --clip PATH")


def test_bad_models_and_tokenizer(tmp_path, winoground, clip_folder, sd_folder):
    def evaluate(*args: str):
        return ew.evaluate(ew.parse_args([*args, "--data", str(winoground)]))

    with pytest.raises(FileNotFoundError, match="missing not found.*weights/download.py"):
        evaluate("--clip", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="text_encoder holds a text tower only"):
        evaluate("--clip", str(sd_folder / "text_encoder"))
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "model.safetensors").write_bytes((clip_folder / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"vocab.json not found.*or pass --tokenizer"):
        evaluate("--clip", str(tmp_path / "bare" / "model.safetensors"))  # the tokenizer is looked for beside it
    results = evaluate("--clip", str(tmp_path / "bare" / "model.safetensors"), "--tokenizer", str(clip_folder),
                       "--limit", "1")
    assert results["settings"]["tokenizer"] == str(clip_folder) and results["totals"]["n"] == 1


def test_tokenizer_beyond_the_clips_vocabulary_is_one_line(tmp_path, winoground, clip_folder):
    """A CLIP with its own small vocabulary (the toy world's) scored with OpenAI's 49,408-token tokenizer."""
    small = transformers.CLIPConfig(
        text_config=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=77),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=32)
    transformers.CLIPModel(small).save_pretrained(tmp_path / "small")
    argv = ["--clip", str(tmp_path / "small"), "--tokenizer", str(clip_folder), "--data", str(winoground)]
    with pytest.raises(ValueError, match=re.escape(f"the tokenizer of {clip_folder} gives ids up to 49407, but "
                                                   f"{tmp_path / 'small'} embeds 1000 tokens; pass --tokenizer with "
                                                   f"the folder of the CLIP it was trained or fine-tuned from")):
        ew.evaluate(ew.parse_args(argv))


def copy_with(folder: Path, to: Path, edit) -> Path:
    """A copy of a checkpoint folder whose model.safetensors went through edit(state dict)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, to)
    state = load_file(to / "model.safetensors")
    edit(state)
    save_file(state, to / "model.safetensors")
    return to


def test_non_finite_weights_or_scores_are_errors(tmp_path, winoground, clip_folder):
    """A NaN in the checkpoint (caught by load_clip), or finite weights whose scores overflow: never
    the 0.00 / 0.00 / 0.00 that comparisons with NaN give."""
    nan = copy_with(clip_folder, tmp_path / "nan", lambda s: s["visual_projection.weight"].view(-1)[7].fill_(torch.nan))
    done = run_script("--clip", str(nan), "--data", str(winoground), "--limit", "2")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (f"error: {nan / 'model.safetensors'} holds NaN or infinite values in "
                                   f"1 tensor(s) [visual_projection.weight]; the file is damaged or was saved from a run that "
                                   f"diverged — download it again or use an earlier checkpoint")
    huge = copy_with(clip_folder, tmp_path / "huge", lambda s: s["visual_projection.weight"].fill_(3e38))
    with pytest.raises(ValueError, match=rf"CLIP {huge} gives NaN or infinite scores for 2 of 2 examples \(ids 0, 1\)"
                                         r"; its weights are damaged, or overflow in this precision"):
        ew.evaluate(ew.parse_args(["--clip", str(huge), "--data", str(winoground), "--limit", "2"]))


def test_resolution_defaults_to_the_models_own(winoground, sd_folder):
    """The tiny SD: UNet sample_size 8 × VAE factor 2 = 16 pixels (SD 1.x: 64 × 8 = 512)."""
    args = ew.parse_args(["--sd", str(sd_folder), "--data", str(winoground), "--limit", "1", "--timesteps", "1"])
    assert args.resolution is None
    results = ew.evaluate(args)
    assert results["settings"]["resolution"] == 16 == ew.load_stable_diffusion(sd_folder).resolution
    assert ew.evaluate(ew.parse_args(["--sd", str(sd_folder), "--data", str(winoground), "--limit", "1",
                                      "--timesteps", "1", "--resolution", "32"]))["settings"]["resolution"] == 32


def test_resolution_far_above_the_models_own_is_refused_before_scoring(winoground, sd_folder, monkeypatch):
    """The tiny SD is 16 pixels: 4 × 16 = 64 is the most; 128 would be 64 × the pixels of every UNet call."""
    scored = []
    monkeypatch.setattr(ew, "diffusion_errors", lambda *args: scored.append(args[6]) or torch.zeros(1, 2, 2, 1))

    def evaluate(resolution: int) -> dict:
        return ew.evaluate(ew.parse_args(["--sd", str(sd_folder), "--data", str(winoground), "--limit", "1",
                                          "--timesteps", "1", "--resolution", str(resolution)]))

    assert evaluate(64)["settings"]["resolution"] == 64 and scored == [64]
    for resolution in (65, 128):
        with pytest.raises(ValueError, match=re.escape(f"--resolution {resolution} is more than 4 × the 16 pixels of "
                                                       f"{sd_folder}; pass --resolution 64 or less, or leave it out")):
            evaluate(resolution)
    assert scored == [64]


@pytest.fixture(scope="module")
def toy_world(tmp_path_factory, clip_folder, sd_folder) -> dict[str, Path]:
    """The paths weights.toyworld.build() returns: the models, the data splits."""
    root = tmp_path_factory.mktemp("toy")
    shutil.copytree(clip_folder, root / "clip")
    shutil.copytree(sd_folder, root / "sd")
    for split in ("test", "val"):
        write_winoground(root / "data" / split)
    return {"clip": root / "clip", "sd": root / "sd", "test": root / "data/test", "val": root / "data/val"}


@pytest.mark.parametrize("flags, model, data", [
    (["--toy"], "clip", "test"),
    (["--toy", "--clip"], "clip", "test"),
    (["--toy", "--sd", "--timesteps", "1"], "sd", "test"),
    (["--toy", "--data", "VAL"], "clip", "val"),
    (["--toy", "--clip", "CLIP"], "CLIP", "test"),  # an explicit model wins
])
def test_toy_flag(toy_world, clip_folder, monkeypatch, tmp_path, flags, model, data):
    from weights import toyworld

    monkeypatch.setattr(toyworld, "build", lambda: toy_world)  # --toy draws weights/toy/ on first use; here a copy
    monkeypatch.chdir(tmp_path)  # from any folder
    flags = [{"CLIP": str(clip_folder), "VAL": str(toy_world["val"])}.get(flag, flag) for flag in flags]
    results = ew.evaluate(ew.parse_args([*flags, "--limit", "2"]))
    settings = results["settings"]
    model = str(clip_folder) if model == "CLIP" else str(toy_world[model])
    assert (settings["model"], settings["data"], settings["examples"]) == (model, str(toy_world[data]), 2)
    if "--sd" in flags:
        assert settings["resolution"] == 16  # the model's own
    assert ew.parse_args(["--sd"]).sd == "weights/stable-diffusion-v1-4"  # without --toy, the real defaults
    assert ew.parse_args([]).data == "weights/winoground" and ew.parse_args(["--clip"]).clip == ew.DEFAULT_CLIP


def test_script_unreadable_image_in_a_worker_is_one_line(tmp_path, clip_folder):
    folder = write_winoground(tmp_path / "data", "zip")
    with zipfile.ZipFile(folder / "images.zip", "a") as archive:
        archive.writestr("extra/ex_2_img_0.png", b"not a png")  # listed last, it wins the lookup by file name
    done = run_script("--clip", str(clip_folder), "--data", str(folder), "--workers", "2", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (f"error: {folder / 'images.zip'}:extra/ex_2_img_0.png is not a "
                                                    f"readable image (unknown format or corrupt file); download the "
                                                    f"dataset again")
    assert "Traceback" not in done.stderr


def test_train_export_is_accepted(tmp_path, winoground, clip_folder):
    """train.py's final folder (save_clip + the source's tokenizer files + mapper.safetensors)
    scores as the model it holds: here a CLIP whose LayerNorms moved, as fine-tuning moves them."""
    import argparse

    import train
    from sds import Mapper
    from weights.networks import load_clip

    clip = load_clip(clip_folder)
    with torch.no_grad():
        for module in clip.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.mul_(1.1)
    runs.export(train.SDSCLIPLoss(clip, Mapper(32, (4, 8, 8)), 0.001, "full"),
                argparse.Namespace(out=str(tmp_path / "export"), clip=str(clip_folder)))
    data = wino.Winoground(winoground)
    tokenizer = load_tokenizer(clip_folder)
    expected = ew.clip_scores(clip, tokenizer, data, data.examples)
    exported = ew.clip_scores(load_clip(tmp_path / "export"), load_tokenizer(tmp_path / "export"), data,
                              data.examples)
    assert torch.equal(exported, expected)
    assert not torch.allclose(expected, ew.clip_scores(load_clip(clip_folder), tokenizer, data, data.examples))


# ----------------------------------------------------------------------------- --precision

# bf16 vs fp32 on the small random models above (bfloat16 keeps 8 significant bits, 2^-8 ≈ 4e-3 relative),
# max |Δ| measured: CLIP cosines 5.6e-3, diffusion errors (≈ 1) 2.9e-3, their 2×2 scores 1.1e-3; ≈ 3.5× margin.
BF16_CLIP_ATOL = 2e-2
BF16_DIFFUSION_ATOL = 1e-2


def test_clip_scores_bf16_match_fp32(parity, winoground, clip_folder):
    from weights.networks import load_clip

    data, model, tokenizer = wino.Winoground(winoground), load_clip(clip_folder), load_tokenizer(clip_folder)
    fp32 = ew.clip_scores(model, tokenizer, data, data.examples, batch_size=2)
    bf16 = ew.clip_scores(model, tokenizer, data, data.examples, batch_size=2, precision="bf16")
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)  # autocast took effect
    parity("winoground CLIP scores, bf16 autocast vs fp32, small config", bf16, fp32, atol=BF16_CLIP_ATOL)


def test_diffusion_errors_bf16_match_fp32(parity, winoground, sd_folder):
    data = wino.Winoground(winoground)

    def errors(precision: str, dtype: torch.dtype) -> torch.Tensor:
        sd = ew.load_stable_diffusion(sd_folder, dtype=dtype)
        assert {p.dtype for part in (sd.unet, sd.vae, sd.text_encoder) for p in part.parameters()} == {dtype}
        return ew.diffusion_errors(sd, data, data.examples[:2], ew.timestep_grid(4), seed=7, batch_size=10,
                                   resolution=SD_RESOLUTION, unconditional=True, precision=precision)

    fp32, bf16 = errors("fp32", torch.float32), errors("bf16", torch.bfloat16)  # (2, 3, 2, T)
    assert not torch.equal(bf16, fp32)
    parity("winoground diffusion errors, bf16 (autocast, SD in bf16) vs fp32, tiny SD", bf16, fp32,
           atol=BF16_DIFFUSION_ATOL)
    parity("winoground diffusion 2x2 score, bf16 vs fp32, tiny SD", -bf16[:, :2].mean(-1), -fp32[:, :2].mean(-1),
           atol=BF16_DIFFUSION_ATOL)


@pytest.mark.parametrize("flags, device, precision", [
    (["--clip", "c"], "cpu", "fp32"), (["--sd", "s"], "cpu", "fp32"), (["--sd", "s"], "cuda", "bf16"),
    (["--clip", "c"], "cuda", "fp32"), (["--clip", "c", "--precision", "bf16"], "cpu", "bf16"),
    (["--sd", "s", "--precision", "fp32"], "cuda", "fp32")])
def test_precision_default_and_choice(flags, device, precision):
    """Without --precision: bf16 for the diffusion score on CUDA, as before the flag existed; fp32 otherwise."""
    assert ew.parse_args([*flags, "--device", device]).precision == precision


def test_precision_is_recorded_and_checked(tmp_path, winoground, clip_folder):
    out = tmp_path / "clip.json"
    done = run_script("--clip", str(clip_folder), "--data", str(winoground), "--limit", "2", "--precision", "bf16",
                      "--device", "cpu", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["settings"]["precision"] == "bf16"
    with pytest.raises(ValueError, match="precision must be one of bf16, fp32, got 'fp16'"):
        ew.autocast("cpu", "fp16")
