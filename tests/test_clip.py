"""clip.py against transformers (model, preprocessing, tokenizer) and open_clip (OpenAI's tokenizer
and preprocessing). Random weights are written with transformers' own save_pretrained, i.e. in
the layout of the official files, and read back with load_clip."""

import html
import json
import random
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

import weights.images
from clip import OPENAI_STD, CLIP, image_transform
from weights.images import open_image
from weights.networks import clip_config_from_hf, hub_path, load_clip, load_openai_tokenizer, load_tokenizer
from weights.networks import save_clip

OPENAI_BPE = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
CAPTIONS = ["a photo of a cat", "a dog chasing a ball on the beach", "", "Two PEOPLE & a horse!!! " * 12]

# Official configurations (the sizes in the hub's config.json files).
TEXT_B = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12)
TEXT_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
VISION_B = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
VISION_L = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24)
OFFICIAL = {
    "clip-vit-base-patch32": dict(text_config=TEXT_B, vision_config=dict(VISION_B, patch_size=32), projection_dim=512),
    "clip-vit-base-patch16": dict(text_config=TEXT_B, vision_config=dict(VISION_B, patch_size=16), projection_dim=512),
    "clip-vit-large-patch14": dict(text_config=TEXT_L, vision_config=dict(VISION_L, patch_size=14), projection_dim=768),
    "clip-vit-large-patch14-336": dict(
        text_config=TEXT_L, vision_config=dict(VISION_L, patch_size=14, image_size=336), projection_dim=768
    ),
}
SD_TEXT_ENCODER = dict(TEXT_L, eos_token_id=2, bos_token_id=0, pad_token_id=1)  # stable-diffusion-v1-4/text_encoder


def small_config(hidden_act="quick_gelu", eos_token_id=2, width=64, heads=4):
    text = dict(hidden_size=width, intermediate_size=2 * width, num_attention_heads=heads, num_hidden_layers=2,
                hidden_act=hidden_act, eos_token_id=eos_token_id)
    vision = dict(hidden_size=width, intermediate_size=2 * width, num_attention_heads=heads, num_hidden_layers=2,
                  image_size=32, patch_size=8, hidden_act=hidden_act)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """transformers initialises LayerNorms to (1, 0): perturb every parameter so that a mix-up
    between two of them (layer_norm1 vs layer_norm2, say) cannot go unnoticed."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    return load_openai_tokenizer(OPENAI_BPE)


@pytest.fixture(scope="session")
def hf_tokenizer_folder(tmp_path_factory, tokenizer):
    """vocab.json + merges.txt, written from OpenAI's merges the way the hub's files were made."""
    folder = tmp_path_factory.mktemp("tokenizer")
    (folder / "vocab.json").write_text(json.dumps(tokenizer.encoder, ensure_ascii=False), encoding="utf-8")
    merges = sorted(tokenizer.ranks, key=tokenizer.ranks.get)
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    return folder


def saved(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("hidden_act, eos_token_id", [("quick_gelu", 2), ("gelu", 49407)])
def test_clip_matches_transformers(parity, tmp_path, tokenizer, hidden_act, eos_token_id):
    ref = randomize(transformers.CLIPModel(small_config(hidden_act, eos_token_id)))
    ours = load_clip(saved(ref, tmp_path))
    pixels = torch.randn(3, 3, 32, 32)
    tag = f"{hidden_act}, eos {eos_token_id}"
    for pad_name, pad in [("pad 0", 0), ("pad EOT", tokenizer.eot_id)]:
        ids = tokenizer(CAPTIONS, pad_token_id=pad)
        with torch.no_grad():
            out = ref(input_ids=ids, pixel_values=pixels)
            parity(f"clip small ({tag}, {pad_name}) text embeds", ours.encode_text(ids),
                   ref.get_text_features(input_ids=ids))
            parity(f"clip small ({tag}, {pad_name}) text last hidden", ours.text_model(ids),
                   out.text_model_output.last_hidden_state)
            parity(f"clip small ({tag}, {pad_name}) logits_per_image", ours(pixels, ids), out.logits_per_image)
    with torch.no_grad():
        parity(f"clip small ({tag}) image embeds", ours.encode_image(pixels),
               ref.get_image_features(pixel_values=pixels))


@pytest.mark.parametrize("eos_token_id", [2, 300])
def test_pooling_follows_eos_token_id(parity, tmp_path, eos_token_id):
    """Ids on which the two conventions disagree: the largest id (position 1) is not the first
    eos_token_id (position 2). Legacy configs (eos 2) pool at argmax, others at the first eos."""
    ref = randomize(transformers.CLIPModel(small_config(eos_token_id=eos_token_id)))
    ours = load_clip(saved(ref, tmp_path))
    ids = torch.tensor([[49406, 40000, 300, 7, 300, 0], [49406, 300, 12, 40000, 9, 300]])
    with torch.no_grad():
        parity(f"clip pooling, eos_token_id {eos_token_id}", ours.encode_text(ids),
               ref.get_text_features(input_ids=ids))


def test_text_encoder_matches_transformers(parity, tmp_path, tokenizer):
    """Stable Diffusion's text_encoder/: a CLIPTextModel, whose last hidden state conditions the UNet."""
    cfg = transformers.CLIPTextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                                      eos_token_id=2)
    ref = randomize(transformers.CLIPTextModel(cfg))
    ours = load_clip(saved(ref, tmp_path))
    assert ours.vision_model is None and ours.config.projection_dim is None
    ids = tokenizer(CAPTIONS, pad_token_id=tokenizer.eot_id)
    with torch.no_grad():
        parity("text encoder small last hidden", ours.text_model(ids), ref(input_ids=ids).last_hidden_state)
    with pytest.raises(ValueError, match="text tower only"):
        ours.encode_text(ids)


def test_text_encoder_without_prefix_loads(parity, tmp_path, tokenizer):
    """transformers 5 writes a bare CLIPTextModel without the `text_model.` prefix."""
    ref = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2)))
    folder = saved(ref, tmp_path)
    state = load_file(folder / "model.safetensors")
    save_file({k.removeprefix("text_model."): v for k, v in state.items()}, folder / "model.safetensors")
    ids = tokenizer(CAPTIONS)
    with torch.no_grad():
        parity("text encoder, unprefixed keys", load_clip(folder).text_model(ids), ref(input_ids=ids).last_hidden_state)


def test_bare_safetensors_file_derives_config(parity, tmp_path, tokenizer):
    """No config.json: sizes come from the tensors (heads: 64 dimensions each, as in every release)."""
    ref = randomize(transformers.CLIPModel(small_config(width=128, heads=2)))
    file = saved(ref, tmp_path) / "model.safetensors"
    ours = load_clip(file)
    assert ours.config.vision.num_attention_heads == 2 and ours.config.vision.image_size == 32
    ids, pixels = tokenizer(CAPTIONS), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        parity("clip bare file logits_per_image", ours(pixels, ids),
               ref(input_ids=ids, pixel_values=pixels).logits_per_image)


@pytest.mark.full
def test_full_size_vit_b32_matches_transformers(parity, tmp_path, tokenizer):
    ref = randomize(transformers.CLIPModel(transformers.CLIPConfig(**OFFICIAL["clip-vit-base-patch32"])))
    ours = load_clip(saved(ref, tmp_path))
    pixels, ids = torch.randn(2, 3, 224, 224), tokenizer(CAPTIONS)
    with torch.no_grad():
        parity("clip ViT-B/32 full size image embeds", ours.encode_image(pixels),
               ref.get_image_features(pixel_values=pixels))
        parity("clip ViT-B/32 full size text embeds", ours.encode_text(ids), ref.get_text_features(input_ids=ids))
        logits = ref(input_ids=ids, pixel_values=pixels).logits_per_image
        parity("clip ViT-B/32 full size logits_per_image", ours(pixels, ids), logits)


def test_save_clip_round_trip(parity, tmp_path, tokenizer):
    ours = load_clip(saved(randomize(transformers.CLIPModel(small_config("gelu", 49407))), tmp_path / "src"))
    save_clip(ours, tmp_path / "out")
    ref = transformers.CLIPModel.from_pretrained(tmp_path / "out").eval()
    again = load_clip(tmp_path / "out")
    ids, pixels = tokenizer(CAPTIONS), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        parity("save_clip → transformers logits", ours(pixels, ids),
               ref(input_ids=ids, pixel_values=pixels).logits_per_image)
        assert torch.equal(again(pixels, ids), ours(pixels, ids))


def test_fp16_variant_file(parity, tmp_path, tokenizer):
    """A folder holding only model.fp16.safetensors (the hub's half-precision variant) loads too."""
    ref = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2)))
    folder = saved(ref.half(), tmp_path)
    (folder / "model.safetensors").rename(folder / "model.fp16.safetensors")
    ids = tokenizer(CAPTIONS)
    with torch.no_grad():
        expected = ref.float()(input_ids=ids).last_hidden_state
        parity("text encoder from model.fp16.safetensors", load_clip(folder).text_model(ids), expected)


def test_load_in_bfloat16(tmp_path, tokenizer):
    model = load_clip(saved(randomize(transformers.CLIPModel(small_config())), tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16), tokenizer(["a cat"])).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("name", [*OFFICIAL, "sd-text-encoder"])
def test_structure_matches_transformers(name):
    """Every official configuration: the same key names and shapes as transformers (on the meta
    device: no memory is allocated)."""
    if name == "sd-text-encoder":
        hf_config = transformers.CLIPTextConfig(**SD_TEXT_ENCODER)
        build = transformers.CLIPTextModel
    else:
        hf_config = transformers.CLIPConfig(**OFFICIAL[name])
        build = transformers.CLIPModel
    with torch.device("meta"):
        ref = build(hf_config)
        ours = CLIP(clip_config_from_hf(hf_config.to_dict()))
    ref_shapes = {k: v.shape for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    our_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


def test_config_dict_overrides_like_transformers():
    """Older config.json files carry `text_config_dict`, which (with the defaults) wins over `text_config`."""
    raw = {"model_type": "clip", "projection_dim": 768,
           "text_config": {"hidden_size": 512, "eos_token_id": 2},
           "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12},
           "vision_config": {}, "vision_config_dict": {"hidden_size": 1024, "patch_size": 14}}
    ours = clip_config_from_hf(raw)
    ref = transformers.CLIPConfig(**raw)
    for field in ("hidden_size", "intermediate_size", "num_attention_heads", "eos_token_id"):
        assert getattr(ours.text, field) == getattr(ref.text_config, field), field
    vision = ref.vision_config
    assert (ours.vision.hidden_size, ours.vision.patch_size) == (vision.hidden_size, vision.patch_size)


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_corpus() -> list[str]:
    fixed = [
        "", " ", "a photo of a cat", "A Photo Of A CAT", "a photo of a cat.", "THE QUICK BROWN FOX",
        "naïve café résumé", "Ångström, Zürich, São Paulo, Kraków", "ÉCOLE ÉLÉMENTAIRE", "straße", "ﬁne ﬂour",
        "東京タワーと富士山", "北京欢迎你", "안녕하세요 세계", "Привет, мир!", "مرحبا بالعالم", "שלום עולם", "γειά σου κόσμε",
        "🐱 and 🐶", "👩‍👩‍👧‍👦 family", "🏳️‍🌈 flag", "smile 😀😀😀", "❤️ love", "1️⃣ keycap",
        "Tom &amp; Jerry", "5 &lt; 6 &gt; 4", "&quot;quoted&quot;", "&amp;amp; twice", "&#39;apostrophe&#39;",
        "caf&eacute;",
        "&nbsp;non-breaking", "fish &amp chips",
        "it's", "they're", "we've", "I'm", "you'll", "he'd", "IT'S LOUD", "don't", "rock'n'roll",
        "12345", "3.14159", "1,000,000", "2023-07-18", "10:45pm", "$99.99", "50%", "1st 2nd 3rd 4th", "0x1F",
        "!!!", "???", "...", "?!?!", "---", "***", "@#$%^&*()", "((()))", "[]{}<>", "a--b__c", "~~~~", ";;;;", "'''",
        "\"double\"", "«guillemets»", "“curly quotes”", "‘single’", "em—dash", "en–dash", "ellipsis…", "tab\there",
        "new\nline", "many    spaces", "  leading and trailing  ", "\u00a0nbsp\u00a0", "zero\u200bwidth",
        "mojibake: cafÃ©", "Ã¢â‚¬â„¢", "https://example.com/a?b=c&d=e", "user@example.com", "#hashtag @mention",
        "C++ and C#", "x^2 + y^2 = z^2", "α β γ δ ε", "∑∫∂√∞", "½ ¼ ¾", "™ © ®", "°C °F", "№ 5",
        "a" * 300, "word " * 100, "🐱" * 80, "supercalifragilisticexpialidocious",
        "pneumonoultramicroscopicsilicovolcanoconiosis",
        "MiXeD CaSe WoRdS", "camelCaseWord", "snake_case_word", "kebab-case-word", "UPPER_CASE", "ÀÉÎÕÜ",
        "a man riding a horse on the left of a tree", "the tree is on the left of the man riding a horse",
        "there is a mug in some grass", "there is some grass in a mug",
    ]
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'-&;:()éüñçøßæ漢字かなü😀🚀€£¥"
    generated = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(120)]
    words = "a the photo of cat dog man woman red blue left right on under holding riding big small".split()
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 120))) for _ in range(40)]
    return fixed + generated + sentences


def test_tokenizer_matches_open_clip(tokenizer, hf_tokenizer_folder):
    texts = tokenizer_corpus()
    assert len(texts) >= 200
    ref = open_clip.tokenizer.SimpleTokenizer()
    expected = ref(texts, context_length=77)
    assert torch.equal(tokenizer(texts), expected)
    assert torch.equal(load_tokenizer(hf_tokenizer_folder)(texts), expected)
    assert torch.equal(load_tokenizer(OPENAI_BPE.parent)(texts), expected)


def test_tokenizer_against_transformers_lists_known_differences(tokenizer, hf_tokenizer_folder):
    """transformers' CLIPTokenizer cleans with ftfy alone; OpenAI's cleaning also unescapes html
    twice. The ids differ exactly on the texts where that extra step changes something."""
    import ftfy

    hf = transformers.CLIPTokenizer(str(hf_tokenizer_folder / "vocab.json"), str(hf_tokenizer_folder / "merges.txt"))
    texts = tokenizer_corpus()
    ours = tokenizer(texts, pad_token_id=tokenizer.eot_id)
    theirs = hf(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    differ = {t for t, a, b in zip(texts, ours, theirs) if not torch.equal(a, b)}
    html_only = {t for t in texts if html.unescape(html.unescape(ftfy.fix_text(t))) != ftfy.fix_text(t)}
    assert differ == html_only, f"unexpected differences: {sorted(differ ^ html_only)}"
    assert differ == {"fish &amp chips"}  # ftfy unescapes only entities closed by ';'


def test_truncation_keeps_end_token_and_padding(tokenizer):
    ids = tokenizer(["word " * 100, "a cat"])
    assert ids.shape == (2, 77) and ids[0, -1] == tokenizer.eot_id and ids[0, 0] == tokenizer.sot_id
    assert ids[1, :4].tolist() == [tokenizer.sot_id, *tokenizer.encode("a cat"), tokenizer.eot_id]
    assert (ids[1, 4:] == 0).all()
    assert (tokenizer(["a cat"], pad_token_id=tokenizer.eot_id)[0, 4:] == tokenizer.eot_id).all()


def test_decode_round_trip(tokenizer):
    """decode() gives back the cleaned text with a space at each word end ("a cat ." for "a cat."),
    as OpenAI's does; encoding it again gives the same ids."""
    texts = [t for t in tokenizer_corpus() if len(tokenizer.encode(t)) <= 75]  # truncation may cut a word
    assert len(texts) >= 150
    for text in texts:
        ids = tokenizer(text)[0]
        assert tokenizer.encode(tokenizer.decode(ids)) == tokenizer.encode(text), text
    assert tokenizer.decode(tokenizer("A Photo of  a CAT.")[0]) == "a photo of a cat ."


# ----------------------------------------------------------------------------- preprocessing


def make_image(mode: str, size: tuple[int, int]) -> Image.Image:
    g = torch.Generator().manual_seed(size[0] * 1000 + size[1])
    rgb = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    image = Image.fromarray(rgb, "RGB")
    if mode == "P":
        return image.quantize(64)
    return image.convert(mode)


SIZES = [(300, 200), (224, 224), (640, 480), (257, 333), (50, 80), (224, 449)]  # 449: odd margin, same crop


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "CMYK", "P"])
def test_preprocessing_matches_transformers(parity, mode):
    ref = transformers.CLIPImageProcessor()  # shortest_edge 224, centre crop 224, bicubic, OpenAI mean/std
    ours = image_transform(224)
    for size in SIZES:
        image = make_image(mode, size)
        expected = ref(images=image, return_tensors="pt").pixel_values[0]
        parity(f"preprocessing {mode} {size[0]}x{size[1]}", ours(image), expected, atol=1e-5)


def test_preprocessing_crop_follows_openai():
    """Known difference: with an odd margin whose half rounds up (227 − 224 = 3 → 1.5), torchvision
    and OpenAI crop from offset 2, transformers from offset 1. We follow OpenAI: equal to
    open_clip's OpenAI preprocessing, one pixel off transformers'."""
    image = make_image("RGB", (227, 224))
    openai = open_clip.transform.image_transform(224, is_train=False)
    assert torch.equal(image_transform(224)(image), openai(image))
    hf = transformers.CLIPImageProcessor()(images=image, return_tensors="pt").pixel_values[0]
    assert not torch.allclose(image_transform(224)(image), hf, atol=1e-3)


def test_transform_pickles_for_spawned_workers():
    """DataLoader workers that are spawned (macOS, Windows) receive the transform pickled."""
    import pickle

    image = make_image("P", (50, 80))
    assert torch.equal(pickle.loads(pickle.dumps(image_transform(32)))(image), image_transform(32)(image))


def smooth_image(width: int, height: int) -> Image.Image:
    """A photo-like image: smooth structure plus some noise (a random image is all high frequencies)."""
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    noise = np.random.default_rng(width).integers(0, 56, (height, width, 3))
    return Image.fromarray((np.stack([np.sin(20 * x) * 0.5 + 0.5, y, x * y], -1) * 200 + noise).astype(np.uint8))


@pytest.mark.parametrize("fmt, size, decoded", [("JPEG", 224, (925, 900)), ("PNG", 224, (925, 900)),
                                                ("JPEG", 400, (1850, 1800)), ("PNG", 100, (463, 450)),
                                                ("JPEG", 512, (3700, 3600))])
def test_large_images_are_decoded_reduced(tmp_path, fmt, size, decoded):
    """3700 × 3600: 1/4 for CLIP's 224 (the shorter side 900 ≥ 4 × 224), 1/8 at most, none for SD's 512.
    After the resize the preprocessed image is within 3 levels of 255 of the full decode's."""
    file = tmp_path / f"large.{fmt.lower()}"
    smooth_image(3700, 3600).save(file, quality=95) if fmt == "JPEG" else smooth_image(3700, 3600).save(file)
    reduced = open_image(file, size=size)
    assert reduced.size == decoded
    diff = (image_transform(size)(reduced) - image_transform(size)(Image.open(file))).abs()
    level = 1 / 255 / min(OPENAI_STD)  # one 8-bit level, normalised
    assert diff.max() <= 3 * level + 1e-6 and diff.mean() <= 0.5 * level
    assert open_image(file).size == (3700, 3600)  # no size given: no reduction


def test_images_too_large_to_decode_are_refused(tmp_path, monkeypatch):
    """Over MAX_IMAGE_PIXELS decoded: refused before decoding, unless a JPEG can be decoded small enough."""
    smooth_image(1800, 1800).save(tmp_path / "big.jpg", quality=90)
    smooth_image(1800, 1800).save(tmp_path / "big.png")
    monkeypatch.setattr(weights.images, "MAX_IMAGE_PIXELS", 1_000_000)
    with pytest.raises(ValueError, match=r"big.png is too large to decode safely \(1800 × 1800 pixels to decode; "
                                         r"the limit is 1,000,000\), so it is treated as unreadable"):
        open_image(tmp_path / "big.png", size=224)
    with pytest.raises(ValueError, match=r"big.jpg is too large to decode safely \(1800 × 1800"):
        open_image(tmp_path / "big.jpg")
    assert open_image(tmp_path / "big.jpg", size=224).size == (900, 900)  # 810,000 pixels decoded


def test_decompression_bomb_is_one_sentence(tmp_path, monkeypatch):
    """Above twice PIL's own limit, Image.open raises DecompressionBombError (not an OSError)."""
    make_image("RGB", (40, 40)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1600 pixels > 2 × 500
    with pytest.raises(ValueError, match=r"bomb.png is too large to decode safely \(Image size \(1600 pixels\)"):
        open_image(tmp_path / "bomb.png")


@pytest.mark.parametrize("content, message", [(b"not an image", r"unknown format or corrupt file"),
                                              ("truncated", r"image file is truncated")])
def test_unreadable_images(tmp_path, content, message):
    if content == "truncated":
        make_image("RGB", (64, 64)).save(tmp_path / "x.png")
        content = (tmp_path / "x.png").read_bytes()[:300]
    (tmp_path / "x.png").write_bytes(content)
    with pytest.raises(ValueError, match=rf"x.png is not a readable image \(.*{message}.*\)"):
        open_image(tmp_path / "x.png")
    with pytest.raises(FileNotFoundError):
        open_image(tmp_path / "missing.png")


@pytest.mark.parametrize("mode, suffix", [("I;16", "png"), ("I", "tif"), ("F", "tif")])
def test_16_bit_32_bit_and_float_images_keep_their_range(tmp_path, mode, suffix):
    """A 16-bit PNG, a 32-bit integer TIFF holding 16-bit values, a float TIFF from 0 to 1: the 8-bit picture."""
    gray = np.asarray(make_image("L", (50, 40)))
    data = {"I;16": gray.astype(np.uint16) * 257, "I": gray.astype(np.int32) * 257, "F": gray.astype(np.float32) / 255}
    Image.fromarray(data[mode]).save(tmp_path / f"x.{suffix}")
    assert Image.open(tmp_path / f"x.{suffix}").mode == mode
    image = open_image(tmp_path / f"x.{suffix}", size=32)
    assert image.mode == "L" and np.array_equal(np.asarray(image), gray)


@pytest.mark.parametrize("data, message", [(np.full((8, 8), 2.0, np.float32), r"mode F with values from 2.0 to 2.0"),
                                           (np.full((8, 8), np.nan, np.float32), r"mode F with values from nan"),
                                           (np.full((8, 8), -5, np.int32), r"mode I with values from -5 to -5")])
def test_images_whose_values_cannot_be_mapped_to_8_bits_are_refused(tmp_path, data, message):
    Image.fromarray(data).save(tmp_path / "x.tif")
    with pytest.raises(ValueError, match=rf"x.tif is not a readable image \({message}.*: save it as an 8-bit image\)"):
        open_image(tmp_path / "x.tif")


@pytest.mark.parametrize("size", [(20000, 1), (1, 100000), (2100, 100)])
def test_thin_images_are_refused(tmp_path, size):
    """A 143-byte 20000 × 1 PNG would become 4.5 million × 224 pixels after the resize."""
    Image.new("L", size).save(tmp_path / "thin.png")
    with pytest.raises(ValueError, match=rf"thin.png is not a readable image \({size[0]} × {size[1]} pixels, one side "
                                         r"more than 20 times the other: crop it\)"):
        open_image(tmp_path / "thin.png", size=224)
    Image.new("L", (2000, 100)).save(tmp_path / "panorama.png")
    assert open_image(tmp_path / "panorama.png").size == (2000, 100)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def good_folder(tmp_path):
    return saved(transformers.CLIPModel(small_config()), tmp_path / "clip")


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere not found .*weights/download.py"):
        load_clip(tmp_path / "nowhere")


def test_missing_weights_file(good_folder):
    (good_folder / "model.safetensors").rename(good_folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"model.safetensors not found .*safetensors only"):
        load_clip(good_folder)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_file(good_folder, damage):
    file = good_folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00not a safetensors file" * 10)
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file.*download it again"):
        load_clip(good_folder)


def test_other_family(tmp_path):
    file = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3), "time_embedding.linear_1.weight": torch.zeros(8, 4)}, file)
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.safetensors is not a CLIP checkpoint.*"
                                         r"conv_in.weight"):
        load_clip(file)


def test_missing_and_unexpected_keys(good_folder):
    file = good_folder / "model.safetensors"
    state = load_file(file)
    del state["vision_model.post_layernorm.weight"]
    state["text_model.extra.weight"] = torch.zeros(1)
    save_file(state, file)
    with pytest.raises(ValueError, match=r"model.safetensors.*missing keys \[vision_model.post_layernorm.weight\], "
                                         r"unexpected keys \[text_model.extra.weight\]"):
        load_clip(good_folder)


def test_wrong_shape(good_folder):
    config = json.loads((good_folder / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    (good_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model.safetensors has tensors of the wrong shape.*"
                                         r"text_model.encoder.layers.0.mlp.fc1.weight \(128, 64\) "
                                         r"\(expected \(96, 64\)\)"):
        load_clip(good_folder)


@pytest.mark.parametrize("edit, message", [
    (lambda c: [c], r"it holds a JSON list, not an object"),
    (lambda c: {**c, "text_config": [1]}, r"text_config is a JSON list, not an object"),
    (lambda c: {**c, "text_config": {**c["text_config"], "hidden_size": "64"}},
     r"text_config.hidden_size is '64', which is not of type int"),
    (lambda c: {**c, "vision_config": {**c["vision_config"], "layer_norm_eps": None}},
     r"vision_config.layer_norm_eps is None, which is not of type float"),
    (lambda c: {**c, "projection_dim": "32"}, r"projection_dim is '32', which is not of type int \| None"),
])
def test_config_of_the_wrong_shape_or_type(good_folder, edit, message):
    """Not an object, or "64" where an int belongs: one sentence naming the file and the key, not a
    TypeError from deep inside nn.Linear."""
    config = json.loads((good_folder / "config.json").read_text())
    (good_folder / "config.json").write_text(json.dumps(edit(config)))
    with pytest.raises(ValueError, match=rf"config.json is not a valid CLIP config.json \({message}\); fix it"):
        load_clip(good_folder)


def test_flat_text_encoder_config_of_the_wrong_type(tmp_path):
    folder = saved(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2)), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2.0}))
    with pytest.raises(ValueError, match=r"\(num_hidden_layers is 2.0, which is not of type int\)"):
        load_clip(folder)


@pytest.mark.parametrize("tower", ["text_config", "vision_config"])
def test_heads_that_do_not_divide_the_width_are_refused_at_load(good_folder, tower):
    config = json.loads((good_folder / "config.json").read_text())
    config[tower]["num_attention_heads"] = 3  # width 64
    (good_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"config.json: {tower} has num_attention_heads 3, which does not divide "
                                         r"hidden_size 64"):
        load_clip(good_folder)


@pytest.mark.parametrize("width, heads", [(32, 2), (96, 3)])
def test_bare_file_whose_width_is_not_a_multiple_of_64_is_refused(tmp_path, width, heads):
    """Without config.json the head count is width // 64: 0 heads for 32 (a ZeroDivisionError at the
    first forward), 1 head instead of 3 for 96 (wrong numbers, silently)."""
    file = saved(transformers.CLIPModel(small_config(width=width, heads=heads)), tmp_path) / "model.safetensors"
    with pytest.raises(ValueError, match=rf"model.safetensors comes without a config.json and its text width "
                                         rf"{width} is not a multiple of 64.*pass the checkpoint's folder with its "
                                         r"config.json"):
        load_clip(file)
    assert load_clip(tmp_path).config.text.num_attention_heads == heads  # the folder, with its config.json, loads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_weights_are_named(good_folder, dtype):
    file = good_folder / "model.safetensors"
    state = {k: v.to(dtype) for k, v in load_file(file).items()}
    state["vision_model.encoder.layers.1.mlp.fc2.weight"][3, 5] = float("inf")
    state["text_model.final_layer_norm.bias"][7] = float("nan")
    save_file(state, file)
    with pytest.raises(ValueError, match=r"model.safetensors holds NaN or infinite values in 2 tensor\(s\) \["
                                         r"text_model.final_layer_norm.bias, "
                                         r"vision_model.encoder.layers.1.mlp.fc2.weight\]; the file is damaged"):
        load_clip(good_folder)


def test_missing_tokenizer_files(tmp_path, hf_tokenizer_folder):
    import shutil

    shutil.copy(hf_tokenizer_folder / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(FileNotFoundError, match=r"merges.txt not found.*vocab.json and merges.txt"):
        load_tokenizer(tmp_path)


def test_position_ids_buffers_are_ignored(parity, good_folder, tokenizer):
    file = good_folder / "model.safetensors"
    state = load_file(file)
    reference = load_clip(good_folder)
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(state, file)
    ids, pixels = tokenizer(CAPTIONS), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        parity("clip with position_ids buffers", load_clip(good_folder)(pixels, ids), reference(pixels, ids), atol=0)


# ----------------------------------------------------------------------------- the demo


def test_demo_prints_probabilities(tmp_path, hf_tokenizer_folder):
    import shutil
    import subprocess
    import sys

    ref = randomize(transformers.CLIPModel(small_config()))
    folder = saved(ref, tmp_path / "clip")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(hf_tokenizer_folder / name, folder / name)
    make_image("RGB", (40, 32)).save(tmp_path / "cat.png")
    captions = ["a photo of a cat", "a photo of a dog"]
    run = subprocess.run([sys.executable, "clip.py", str(folder), *captions, "--image", str(tmp_path / "cat.png")],
                         capture_output=True, text=True, cwd=Path(__file__).parent.parent, check=True)
    printed = [float(line.split("%")[0]) / 100 for line in run.stdout.splitlines()]
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    ids = load_tokenizer(folder)(captions)
    with torch.no_grad():
        pixels = processor(images=Image.open(tmp_path / "cat.png"), return_tensors="pt").pixel_values
        expected = ref(input_ids=ids, pixel_values=pixels).logits_per_image.softmax(-1)[0]
    assert printed == pytest.approx(expected.tolist(), abs=1e-3)

    missing = subprocess.run([sys.executable, "clip.py", str(tmp_path / "none"), "--image", str(tmp_path / "cat.png")],
                             capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert missing.returncode != 0 and "weights/download.py" in missing.stderr


# ----------------------------------------------------------------------------- open_clip's layout


def open_clip_model(quick_gelu: bool, vision: dict | None = None, text: dict | None = None) -> torch.nn.Module:
    """A small open_clip CLIP (its own class, nn.MultiheadAttention and all) with random weights. By default
    widths of 128 with 64-dimensional heads, which the loader derives as width // 64 without a config;
    `vision` and `text` change open_clip's CLIPVisionCfg and CLIPTextCfg."""
    from open_clip.model import CLIP as OpenCLIP, CLIPTextCfg, CLIPVisionCfg

    vision = dict(layers=2, width=128, patch_size=8, image_size=32) | (vision or {})
    text = dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2) | (text or {})
    return randomize(OpenCLIP(32, CLIPVisionCfg(**vision), CLIPTextCfg(**text), quick_gelu=quick_gelu))


def save_open_clip(model: torch.nn.Module, file: Path) -> Path:
    """The state dict under open_clip's own keys in a safetensors file (as the LAION repos'
    open_clip_model.safetensors)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, file)
    return file


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_open_clip_layout_matches_open_clip(parity, tmp_path, tokenizer, activation):
    ref = open_clip_model(quick_gelu=activation == "quick_gelu")
    ours = load_clip(save_open_clip(ref, tmp_path / "open_clip_model.safetensors"), activation=activation)
    assert (ours.config.text.num_attention_heads, ours.config.vision.num_hidden_layers) == (2, 2)
    ids, pixels = tokenizer(CAPTIONS), torch.randn(3, 3, 32, 32)  # padded with 0, as open_clip's tokenizer pads
    with torch.no_grad():
        image, text, scale = ref(pixels, ids)  # normalised features and exp(logit_scale)
        parity(f"open_clip layout ({activation}) image embeds", ours.encode_image(pixels), ref.encode_image(pixels))
        parity(f"open_clip layout ({activation}) text embeds", ours.encode_text(ids), ref.encode_text(ids))
        parity(f"open_clip layout ({activation}) logits_per_image", ours(pixels, ids), scale * image @ text.T)
        other = load_clip(tmp_path / "open_clip_model.safetensors",
                          activation="gelu" if activation == "quick_gelu" else "quick_gelu")
        assert (other.encode_text(ids) - ref.encode_text(ids)).abs().max() > 1e-3  # the activation is used


@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_open_clip_layout_saved_by_save_clip_loads_in_transformers(parity, tmp_path, tokenizer, activation):
    ref = open_clip_model(quick_gelu=activation == "quick_gelu")
    ours = load_clip(save_open_clip(ref, tmp_path / "oc.safetensors"), activation=activation)
    save_clip(ours, tmp_path / "hf")
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    ids, pixels = tokenizer(CAPTIONS), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        parity(f"open_clip → save_clip → transformers ({activation}) image embeds",
               hf.get_image_features(pixel_values=pixels), ref.encode_image(pixels))
        parity(f"open_clip → save_clip → transformers ({activation}) text embeds",
               hf.get_text_features(input_ids=ids), ref.encode_text(ids))


def test_open_clip_custom_text_prefix_and_openai_extras(tmp_path, tokenizer):
    """open_clip's "custom text" models keep the text tower under text.; OpenAI's files carry three ints."""
    ref = open_clip_model(quick_gelu=True)
    state = {(k if k.startswith(("visual.", "logit_scale")) else f"text.{k}"): v.contiguous()
             for k, v in ref.state_dict().items()}
    state |= {"input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
              "vocab_size": torch.tensor(49408)}
    save_file(state, tmp_path / "custom.safetensors")
    ours = load_clip(tmp_path / "custom.safetensors", activation="quick_gelu")
    ids = tokenizer(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_text(ids), ref.encode_text(ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize("config, activation", [({"quick_gelu": True}, "quick_gelu"), ({}, "gelu")])
def test_open_clip_folder_takes_the_activation_from_open_clip_config(tmp_path, config, activation):
    """A LAION hub folder: open_clip_model.safetensors beside open_clip_config.json, whose model_cfg.quick_gelu
    (default false, as open_clip's) decides; an explicit activation= still wins."""
    save_open_clip(open_clip_model(quick_gelu=False), tmp_path / "open_clip_model.safetensors")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 32, "text_cfg": {"heads": 2},
                                                                              **config}}))
    assert load_clip(tmp_path).config.text.hidden_act == activation
    assert load_clip(tmp_path).config.vision.hidden_act == activation
    assert load_clip(tmp_path, activation="quick_gelu").config.text.hidden_act == "quick_gelu"


@pytest.mark.parametrize("name, vision, text, written", [
    ("head width 80", {"width": 320, "head_width": 80}, {"width": 160, "heads": 2}, True),  # as ViT-H-14's image tower
    ("defaults", {}, {"heads": 8}, False),  # keys absent: open_clip's defaults, image heads of 64 dims, 8 text heads
])
def test_open_clip_heads_come_from_open_clip_config(parity, tmp_path, tokenizer, name, vision, text, written):
    ref = open_clip_model(quick_gelu=False, vision=vision, text=text)
    save_open_clip(ref, tmp_path / "open_clip_model.safetensors")
    model_cfg = {"embed_dim": 32} | ({"vision_cfg": vision, "text_cfg": text} if written else {})
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    ours = load_clip(tmp_path)
    ids, pixels = tokenizer(CAPTIONS), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        parity(f"open_clip layout, {name} image embeds", ours.encode_image(pixels), ref.encode_image(pixels))
        parity(f"open_clip layout, {name} text embeds", ours.encode_text(ids), ref.encode_text(ids))


@pytest.mark.parametrize("model_cfg, message", [
    (None, r"oc.safetensors comes without an open_clip_config.json and its image width 320 splits into heads of 64 "
           r"or of 80, so its attention head count cannot be derived; put the open_clip_config.json it came with"),
    ({"vision_cfg": {"head_width": "80"}}, r"model_cfg.vision_cfg.head_width is '80', which is not a positive integer"),
    ({"text_cfg": {"heads": 0}}, r"model_cfg.text_cfg.heads is 0, which is not a positive integer"),
    ({"text_cfg": [2]}, r"is not a valid open_clip config \(model_cfg, text_cfg and vision_cfg must be objects"),
    ({"vision_cfg": {"head_width": 96}}, r"vision_config has num_attention_heads 3, which does not divide hidden_size"),
])
def test_open_clip_heads_that_are_unknown_or_badly_written_are_refused(tmp_path, model_cfg, message):
    """Width 320 is 5 heads of 64 or 4 of 80: without the config either could be right."""
    save_open_clip(open_clip_model(False, vision={"width": 320, "head_width": 80}), tmp_path / "oc.safetensors")
    if model_cfg is not None:
        (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    with pytest.raises(ValueError, match=message):
        load_clip(tmp_path / "oc.safetensors", activation="gelu")


@pytest.mark.parametrize("layout, key", [
    *(("open_clip", key) for key in ("visual.proj", "positional_embedding", "visual.positional_embedding",
                                     "transformer.resblocks.0.mlp.c_fc.weight",
                                     "visual.transformer.resblocks.0.mlp.c_fc.weight")),
    ("hf", "visual_projection.weight"), ("hf", "text_model.embeddings.position_embedding.weight")])
def test_file_without_a_tensor_that_gives_the_sizes(tmp_path, layout, key):
    if layout == "hf":
        state = transformers.CLIPModel(small_config()).state_dict()
    else:
        state = open_clip_model(quick_gelu=False).state_dict()
    save_file({k: v.contiguous() for k, v in state.items() if k != key}, tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match=rf"bare.safetensors has no tensor {key}, from which the model's sizes are "
                                         r"read; the file is incomplete — download it again"):
        load_clip(tmp_path / "bare.safetensors", activation="gelu" if layout == "open_clip" else None)


def test_open_clip_file_without_activation_is_refused(tmp_path):
    file = save_open_clip(open_clip_model(quick_gelu=False), tmp_path / "oc.safetensors")
    with pytest.raises(ValueError, match=r"oc.safetensors is in open_clip's layout, which does not record its "
                                         r"activation, and no activation was given: pass activation='quick_gelu'"):
        load_clip(file)
    with pytest.raises(ValueError, match=r"activation='relu' is not supported"):
        load_clip(file, activation="relu")
    (tmp_path / "open_clip_config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"open_clip_config.json is not a valid open_clip config"):
        load_clip(file)


def test_activation_is_refused_for_the_hugging_face_layout(good_folder):
    with pytest.raises(ValueError, match=r"model.safetensors is in Hugging Face's layout, whose config names its "
                                         r"own activation"):
        load_clip(good_folder, activation="gelu")


@pytest.mark.parametrize("name", ["ViT-B-32.pt", "open_clip_pytorch_model.bin"])
def test_pickled_files_are_refused_with_how_to_convert(tmp_path, name):
    (tmp_path / name).write_bytes(b"PK\x03\x04 a pickled zip archive")
    with pytest.raises(ValueError, match=rf"{name} is a pickled PyTorch file, which this loader never opens.*"
                                         r"open_clip.create_model.*safetensors.torch.save_file"):
        load_clip(tmp_path / name)
    with pytest.raises(FileNotFoundError, match=rf"never pickled files such as {name}" if name.endswith(".bin")
                       else r"model.safetensors not found —"):
        load_clip(tmp_path)


# ----------------------------------------------------------------------------- the pad token


@pytest.mark.parametrize("pad_token, pad_id", [(None, 49407), ("<|endoftext|>", 49407), ("!", 0)])
def test_pad_id_from_the_files_transformers_writes(tmp_path, hf_tokenizer_folder, pad_token, pad_id):
    """SD 1.x's tokenizer files name <|endoftext|> as pad_token, SD 2.x's "!"; none: end-of-text."""
    kwargs = {} if pad_token is None else {"pad_token": pad_token}
    transformers.CLIPTokenizer(hf_tokenizer_folder / "vocab.json", hf_tokenizer_folder / "merges.txt",
                               **kwargs).save_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    assert ours.pad_id == pad_id
    ref = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert ref.pad_token_id == pad_id
    expected = ref(CAPTIONS[:2], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ours(CAPTIONS[:2], pad_token_id=ours.pad_id), expected)


def test_pad_token_as_added_token_dict_and_bad_values(tmp_path, hf_tokenizer_folder):
    import shutil

    for name in ("vocab.json", "merges.txt"):
        shutil.copy(hf_tokenizer_folder / name, tmp_path / name)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!", "lstrip": False}}))
    assert load_tokenizer(tmp_path).pad_id == 0  # special_tokens_map.json wins, as in transformers
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(ValueError, match=r"special_tokens_map.json names pad_token '<pad>', which is not in .*vocab"):
        load_tokenizer(tmp_path)
    (tmp_path / "special_tokens_map.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"special_tokens_map.json is not a JSON object"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("name, edit, message", [
    ("tokenizer_config.json", lambda v: {"pad_token": ["!"]}, r"gives pad_token as \['!'\], not a string"),
    ("special_tokens_map.json", lambda v: {"pad_token": {"content": 0}}, r"gives pad_token as 0, not a string"),
    ("vocab.json", lambda v: list(v), r"holds a JSON list, not an object of token → id"),
    ("vocab.json", lambda v: {t: i for t, i in v.items() if t != "<|endoftext|>"}, r"has no <\|endoftext\|> token"),
    ("vocab.json", lambda v: {t: str(i) for t, i in v.items()}, r"gives '!' the id '0', not an integer from 0 to \d+"),
    ("vocab.json", lambda v: v | {"<|endoftext|>": 10**6}, r"gives '<\|endoftext\|>' the id 1000000, not an in.*"),
    ("vocab.json", lambda v: v | {"!": -1}, r"gives '!' the id -1, not an integer from 0 to 49407"),
    ("vocab.json", lambda v: v | {"!": 0.0}, r"gives '!' the id 0.0, not an integer from 0 to 49407"),
])
def test_tokenizer_files_of_the_wrong_shape_are_one_line(tmp_path, hf_tokenizer_folder, name, edit, message):
    import shutil

    for file in ("vocab.json", "merges.txt"):
        shutil.copy(hf_tokenizer_folder / file, tmp_path / file)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    (tmp_path / name).write_text(json.dumps(edit(vocab)), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{name} {message}; fix it or download the tokenizer again"):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------- hub ids in the local cache


def fake_cache(root: Path, repo: str, commit: str = "0123abcd") -> Path:
    """The Hugging Face cache's layout: models--org--name/refs/main holds the commit of snapshots/<commit>/."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "snapshots" / "older").mkdir()
    return folder / "snapshots" / commit


def test_hub_id_resolves_to_its_snapshot(tmp_path, monkeypatch):
    for name in ("HF_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    default = fake_cache(tmp_path / "home" / ".cache" / "huggingface" / "hub", "openai/clip-vit-base-patch32")
    assert hub_path("openai/clip-vit-base-patch32") == default
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    home = fake_cache(tmp_path / "hf_home" / "hub", "openai/clip-vit-base-patch32", "feed")
    assert hub_path("openai/clip-vit-base-patch32") == home
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    cache = fake_cache(tmp_path / "hub_cache", "openai/clip-vit-base-patch32", "beef")
    assert hub_path("openai/clip-vit-base-patch32") == cache
    monkeypatch.chdir(tmp_path)
    (tmp_path / "openai" / "clip-vit-base-patch32").mkdir(parents=True)  # a folder of that name here wins
    assert hub_path("openai/clip-vit-base-patch32") == Path("openai/clip-vit-base-patch32")


def test_hub_id_loads_from_the_cache(parity, tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    ref = randomize(transformers.CLIPModel(small_config()))
    saved(ref, fake_cache(tmp_path / "hub", "someone/small-clip"))
    ids = tokenizer(CAPTIONS)
    with torch.no_grad():
        parity("clip from a hub id in the local cache", load_clip(hub_path("someone/small-clip")).encode_text(ids),
               ref.get_text_features(input_ids=ids), atol=1e-4)


def test_hub_id_not_in_the_cache_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=r"^laion/CLIP-ViT-B-32-laion2B-s34B-b79K not found, neither as a path "
                                                r"nor as a hub id in the local Hugging Face cache \(.*hub/models--laion"
                                                r"--CLIP-ViT-B-32-laion2B-s34B-b79K/refs/main names no snapshot\) — "
                                                r"download it with `huggingface-cli download laion/CLIP-ViT-B-32"):
        hub_path("laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    folder = fake_cache(tmp_path / "hub", "org/name")
    folder.rmdir()  # refs/main names a snapshot that is not there (an interrupted download)
    with pytest.raises(FileNotFoundError, match=r"org/name not found"):
        hub_path("org/name")
    for path in ("/abs/missing", "./rel/missing", "a/b/c", "nothing"):  # not hub ids: returned as paths
        assert hub_path(path) == Path(path)


def test_hub_refs_main_that_is_not_a_hash_is_not_quoted(tmp_path, monkeypatch):
    """refs/main may hold anything (a token pasted there by mistake, say): the error says that it is no
    commit hash without repeating what it holds."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_cache(tmp_path / "hub", "org/name")
    ref = tmp_path / "hub" / "models--org--name" / "refs" / "main"
    ref.write_text("hf_SECRETtoken")
    with pytest.raises(FileNotFoundError) as err:
        hub_path("org/name")
    assert "SECRET" not in str(err.value)
    assert f"{ref} holds something that is not a commit hash" in str(err.value)


@pytest.mark.parametrize("case", ["../ in refs/main", "absolute refs/main", "snapshot link", "file link", "binary"])
def test_hub_id_whose_snapshot_leads_out_of_the_cache_is_refused(tmp_path, monkeypatch, case):
    """Only what lies in the repo's own cache folder loads; its files may link into its blobs/ as the hub's do."""
    import os
    import subprocess
    import sys

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    elsewhere = tmp_path / "elsewhere"  # a model folder outside the cache
    elsewhere.mkdir()
    (elsewhere / "model.safetensors").write_bytes(b"weights")
    snapshot = fake_cache(tmp_path / "hub", "org/name")
    ref = tmp_path / "hub" / "models--org--name" / "refs" / "main"
    blobs = tmp_path / "hub" / "models--org--name" / "blobs"
    blobs.mkdir()
    (blobs / "b0b").write_text("{}")
    (snapshot / "config.json").symlink_to(Path("../../blobs/b0b"))  # as the hub's files are: accepted
    assert hub_path("org/name") == snapshot
    if case == "../ in refs/main":
        ref.write_text("../" * 7 + str(elsewhere).lstrip("/"))
    elif case == "absolute refs/main":
        ref.write_text(str(elsewhere))
    elif case == "snapshot link":
        (snapshot.parent / "c0ffee").symlink_to(elsewhere)
        ref.write_text("c0ffee")
    elif case == "file link":
        (snapshot / "model.safetensors").symlink_to(elsewhere / "model.safetensors")
    else:
        ref.write_bytes(b"\xff\xfe\x00\x89PNG")
    message = r"not a commit hash, so it names no snapshot" if "refs" in case or case == "binary" else \
        r"leads out of the Hugging Face cache \(to .*elsewhere.*\), so org/name is not loaded from it"
    with pytest.raises(FileNotFoundError, match=rf"{message}; delete .*models--org--name and download it again with "
                                                r"`huggingface-cli download org/name`"):
        hub_path("org/name")
    if case == "binary":  # the demo says the same in one line
        env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub")}
        run = subprocess.run([sys.executable, "clip.py", "org/name", "--image", "x.png"], capture_output=True, text=True,
                             cwd=Path(__file__).parent.parent, env=env)
        assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1 and "not a commit hash" in run.stderr
