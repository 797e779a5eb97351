"""The toy world's recipe: the data drawn, the tokenizer learnt, two CLIPs, the VAE and the UNet
trained from scratch with this project's own modules and written in the official layouts, so that
train.py and eval_winoground.py read them exactly as they read downloaded weights; build() draws the
data or reuses it, and checks the shipped models or trains them again.

The trained models ship in weights/toy-models/ (clip/, sd/ and models.json: the recipe, the
sha256 of every file, torch's version, each phase's time and the checks), made by
`python -m weights.toyworld --rebuild --seed 0`. The data is drawn again, deterministically, into
weights/toy/data/:
    train/              MS-COCO 2017 layout: train2017/*.png + annotations/captions_train2017.json
    val/, test/         Winoground layout (examples.jsonl + images/): the main splits
    test-new-objects/   Winoground layout: the harder second split
and scenes.json in each, the ground truth of every image (the objects and their places).
"""

import hashlib
import json
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clip import CLIP, EOT, SOT, CLIPConfig, TextConfig, Tokenizer, VisionConfig
from clip import bytes_to_unicode, clean_text, merge_pair
from sds import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS, NoiseSchedule, contrastive_loss
from sds import encode_prompt
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig
from weights.networks import save_clip, save_unet, save_vae, write_atomically

from .world import IMAGE_SIZE, NEW_OBJECT_BLOCK, TEST_BLOCKS, VAL_BLOCKS, TrainSet, clip_pixels
from .world import contact_sheet, vae_pixels, write_train
from .world import write_winoground

WEIGHTS = Path(__file__).resolve().parent.parent  # weights/
TOY_DIR = WEIGHTS / "toy"  # the drawn data (and --quick builds), not in git
MODELS_DIR = WEIGHTS / "toy-models"  # the shipped models, in git
VERSION = 3  # bump when the recipe changes, so that cached data is drawn again

# ----------------------------------------------------------------------------- sizes and budgets


@dataclass
class Recipe:
    train_images: int = 12_000
    val_examples: int = 240  # per tag: a third
    test_examples: int = 480
    new_objects_examples: int = 240  # test-new-objects
    # SD's text encoder: the text tower of a CLIP pre-trained at batch 128
    text_clip_steps: int = 800
    text_clip_batch: int = 128
    # the CLIP that SDS-CLIP fine-tunes, pre-trained at batch 32 (order-blind; README)
    clip_steps: int = 1600
    clip_batch: int = 32
    vae_steps: int = 400
    vae_batch: int = 32
    # then the decoder alone, as SD's VAE decoder was fine-tuned (sd-vae-ft-mse)
    decoder_steps: int = 1500
    unet_steps: int = 8000
    unet_batch: int = 64


QUICK = Recipe(train_images=256, val_examples=12, test_examples=12, new_objects_examples=12,
               text_clip_steps=10, text_clip_batch=32, clip_steps=10, clip_batch=32, vae_steps=5,
               vae_batch=8, decoder_steps=5,
               unet_steps=10, unet_batch=16)
# the fields that shape the data
DATA_SIZES = ("train_images", "val_examples", "test_examples", "new_objects_examples")

CLIP_CONFIG = CLIPConfig(
    text=TextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                    num_attention_heads=2),
    vision=VisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                        num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=4),
    projection_dim=64,
)
# 32 px → 8 × 8
VAE_CONFIG = VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8)
UNET_CONFIG = UNetConfig(
    sample_size=8, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
    norm_num_groups=8,
)
CAPTION_DROP = 0.1  # the UNet sees the empty prompt this often, so that it means "any image"

# train.py --toy: the settings of the SDS-CLIP run on this world (README: why they differ from the
# paper's).
TRAIN_DEFAULTS = {"epochs": 1, "batch_size": 32, "lr": 1e-3, "sds_weight": 1.0, "sds_mode": "full",
                  "num_workers": 0, "save_every": 0}


# ----------------------------------------------------------------------------- phase 1: draw the data


# name → (its folder in data/, its generator's stream, its blocks (None: the train split), its size)
SPLITS = {"train": ("train", 0, None, "train_images"),
          "val": ("val", 1, VAL_BLOCKS, "val_examples"),
          "test": ("test", 2, TEST_BLOCKS, "test_examples"),
          "new_objects": ("test-new-objects", 3, (NEW_OBJECT_BLOCK,), "new_objects_examples")}


def draw_data(root: Path, recipe: Recipe, seed: int, splits=tuple(SPLITS)) -> None:
    """Each split into root/<folder>, with its own generator: the splits do not depend on each
    other's sizes. A split is drawn into root/.partial/ and moved into place once whole, so that a
    split's folder is never a draw that was stopped halfway."""
    for name in splits:
        folder, stream, blocks, size = SPLITS[name]
        partial = root / ".partial" / folder
        shutil.rmtree(partial, ignore_errors=True)
        rng = np.random.default_rng([seed, stream])
        if blocks is None:
            write_train(partial, getattr(recipe, size), rng)
        else:
            write_winoground(partial, getattr(recipe, size), blocks, rng)
        shutil.rmtree(root / folder, ignore_errors=True)
        partial.rename(root / folder)
    shutil.rmtree(root / ".partial", ignore_errors=True)


def is_drawn(root: Path, name: str, recipe: Recipe) -> bool:
    """root/<folder> holds every file of the split `name`: its captions, scenes.json, its images."""
    folder, _, blocks, size = SPLITS[name]
    split = root / folder
    captions = "annotations/captions_train2017.json" if blocks is None else "examples.jsonl"
    images = "train2017" if blocks is None else "images"
    count = getattr(recipe, size) * (1 if blocks is None else 2)  # an example holds two images
    return ((split / captions).is_file() and (split / "scenes.json").is_file()
            and (split / images).is_dir()
            and sum(1 for f in (split / images).iterdir() if f.is_file()) == count)


# ----------------------------------------------------------------------------- phase 2: learn the tokenizer


def learn_bpe(texts: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges (Sennrich et al. 2016) until every word of `texts` is one token: count the
    adjacent symbol pairs over all words, merge the most frequent, repeat."""
    byte_encoder = bytes_to_unicode()
    words = Counter()
    for text in texts:
        for word in Tokenizer.PATTERN.findall(clean_text(text)):
            chars = [byte_encoder[b] for b in word.encode("utf-8")]
            words[tuple(chars[:-1] + [chars[-1] + "</w>"])] += 1
    merges = []
    while True:
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            return merges
        # most frequent; ties: the first in sorted order
        best = max(sorted(pairs), key=pairs.__getitem__)
        merges.append(best)
        words = {tuple(merge_pair(word, best)): count for word, count in words.items()}


def write_tokenizer(folders: list[Path], texts: list[str]) -> Tokenizer:
    """vocab.json + merges.txt as OpenAI's vocabulary is laid out: the 256 byte symbols, the same
    with </w>, one token per merge, then the start and end tokens. SD's tokenizer pads with EOT."""
    merges = learn_bpe(texts)
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    encoder = {token: i for i, token in enumerate(vocab)}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": SOT,
              "eos_token": EOT, "unk_token": EOT, "pad_token": EOT, "do_lower_case": True}
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n"
                                                                       for a, b in merges),
                                           encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (folder / "special_tokens_map.json").write_text(json.dumps(
            {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")},
            indent=2) + "\n")
    return Tokenizer(encoder, merges)


# ----------------------------------------------------------------------------- phases 3–5: the training loop


def cosine_lr(step: int, steps: int, peak: float, warmup: int = 50) -> float:
    return peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def optimise(model_params, steps: int, peak_lr: float, loss_fn, desc: str,
             weight_decay: float = 0.0):
    """AdamW with warm-up and cosine decay; loss_fn(step) returns the loss of one batch."""
    optimizer = torch.optim.AdamW(model_params, lr=peak_lr, weight_decay=weight_decay)
    progress = tqdm(range(steps), desc=desc, unit="step")
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, peak_lr)
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model_params, 1.0)
        optimizer.step()
        if step % 10 == 0 or step == steps - 1:
            progress.set_postfix(loss=f"{loss.item():.4f}")
    return loss.item()


# ----------------------------------------------------------------------------- phase 3: pre-train two CLIPs


def pretrain_clip(train: TrainSet, tokenizer: Tokenizer, steps: int, batch: int, seed: int) -> CLIP:
    """CLIP's contrastive pre-training (Radford et al. 2021) on the train split: one random caption
    per image, symmetric InfoNCE over the batch. Two are made, as SD 1.x's text encoder is the text
    tower of OpenAI's CLIP ViT-L/14 while SDS-CLIP fine-tunes another CLIP (ViT-B/32): SD's, at
    batch 128, and the CLIP to fine-tune, at batch 32, where a batch seldom holds an image's
    swapped partner, so that it stays order-blind as real CLIP is."""
    torch.manual_seed(seed)
    config = CLIPConfig(text=TextConfig(**{**vars(CLIP_CONFIG.text),
                                           "vocab_size": len(tokenizer.encoder),
                                           "eos_token_id": tokenizer.eot_id}),
                        vision=CLIP_CONFIG.vision, projection_dim=CLIP_CONFIG.projection_dim)
    model = CLIP(config).train()
    rng = np.random.default_rng([seed, 10])

    def loss_fn(step):
        pixels, captions = train.batch(rng, batch)
        # logits_per_image (B, B)
        return contrastive_loss(model(clip_pixels(pixels), tokenizer(captions)))

    params = list(model.parameters())
    optimise(params, steps, 1e-3, loss_fn, f"pre-train CLIP (batch {batch})", weight_decay=0.05)
    return model.eval()


# ----------------------------------------------------------------------------- phase 4: train the VAE


def train_vae(train: TrainSet, recipe: Recipe, seed: int) -> VAE:
    """An autoencoder with a KL-regularised latent (Rombach et al. 2022): reconstruction error plus
    a small KL term; then `scaling_factor` = 1 / std of the latents of a batch of training images,
    which is how SD's 0.18215 was measured."""
    torch.manual_seed(seed)
    vae = VAE(VAE_CONFIG).train()
    rng = np.random.default_rng([seed, 20])
    generator = torch.Generator().manual_seed(seed)

    def loss_fn(step):
        x = vae_pixels(train.batch(rng, recipe.vae_batch)[0])
        posterior = vae.encode(x)
        recon = vae.decode(posterior.sample(generator))
        kl = 0.5 * (posterior.mean.pow(2) + posterior.std.pow(2) - 1 - posterior.logvar).mean()
        return F.mse_loss(recon, x) + 1e-4 * kl

    optimise(list(vae.parameters()), recipe.vae_steps, 2e-3, loss_fn, "train VAE")
    vae.eval()
    vae.config.scaling_factor = latent_scale(vae, train.pixels[:512], generator)
    return vae


def finetune_decoder(vae: VAE, train: TrainSet, recipe: Recipe, seed: int) -> VAE:
    """The decoder alone, trained longer to reconstruct colours faithfully (Stability AI's fix for
    SD's decoder, sd-vae-ft-mse): the encoder, and so the latents the UNet learns, stay as they
    are."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 21])
    generator = torch.Generator().manual_seed(seed + 2)
    params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())

    def loss_fn(step):
        x = vae_pixels(train.batch(rng, recipe.vae_batch)[0])
        with torch.no_grad():
            z = vae.encode(x).sample(generator)
        return F.mse_loss(vae.decode(z), x)

    optimise(params, recipe.decoder_steps, 1e-3, loss_fn, "fine-tune the VAE's decoder")
    return vae.eval()


@torch.no_grad()
def latent_scale(vae: VAE, pixels: torch.Tensor, generator: torch.Generator) -> float:
    """1 / std of the latents of `pixels` (uint8): scaled latents have unit variance."""
    return float(1 / vae.encode(vae_pixels(pixels)).sample(generator).std())


# ----------------------------------------------------------------------------- phase 5: train the UNet


def train_unet(train: TrainSet, vae: VAE, text_encoder: CLIP, tokenizer: Tokenizer, recipe: Recipe,
               seed: int) -> UNet:
    """ε-prediction (Ho et al. 2020) on the VAE's scaled latents with SD 1.x's noise schedule,
    conditioned on the text encoder's last hidden state; the caption is dropped CAPTION_DROP of
    the time, so that the empty prompt conditions the unconditional model."""
    torch.manual_seed(seed)
    unet = UNet(UNET_CONFIG).train()
    schedule = NoiseSchedule()
    rng = np.random.default_rng([seed, 30])
    generator = torch.Generator().manual_seed(seed + 1)
    # once: the posterior of every training image, and c of every distinct caption
    with torch.no_grad():
        moments = [vae.encode(vae_pixels(p)) for p in train.pixels.split(256)]
        mean = torch.cat([m.mean for m in moments])
        std = torch.cat([m.std for m in moments])
        texts = sorted({c for cs in train.captions for c in cs} | {""})
        row = {text: i for i, text in enumerate(texts)}
        # (U, 77, 64)
        contexts = torch.cat([encode_prompt(text_encoder, tokenizer, texts[i:i + 512])
                              for i in range(0, len(texts), 512)])

    def loss_fn(step):
        index = torch.from_numpy(rng.choice(len(train.captions), recipe.unet_batch, replace=False))
        captions = [train.captions[i][rng.integers(len(train.captions[i]))]
                    if rng.random() >= CAPTION_DROP else ""
                    for i in index.tolist()]
        z0 = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator))
        z0 = z0 * vae.config.scaling_factor  # z_0: a latent sample × scaling_factor
        context = contexts[[row[c] for c in captions]]  # c: SD's conditioning, (B, 77, 64)
        t = schedule.sample_timesteps(len(index), generator)  # t ~ U{0, …, 999}
        noise = torch.randn(z0.shape, generator=generator)  # ε ~ N(0, I)
        z_t = schedule.add_noise(z0, noise, t)  # z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε
        return F.mse_loss(unet(z_t, t, context), noise)  # ‖ε_θ(z_t, t, c) − ε‖²

    optimise(list(unet.parameters()), recipe.unet_steps, 1e-3, loss_fn, "train UNet")
    return unet.eval()


def text_tower(clip: CLIP) -> CLIP:
    """The CLIP's text tower alone, as a CLIPTextModel (SD's text_encoder/)."""
    encoder = CLIP(CLIPConfig(text=clip.config.text, projection_dim=None))
    encoder.text_model.load_state_dict(clip.text_model.state_dict())
    return encoder.eval()


def write_sd(folder: Path, text_encoder: CLIP, vae: VAE, unet: UNet) -> None:
    """A diffusers StableDiffusionPipeline folder (write_tokenizer has written its tokenizer/)."""
    save_clip(text_encoder, folder / "text_encoder")
    save_vae(vae, folder / "vae")
    save_unet(unet, folder / "unet")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "PNDMScheduler", "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
        "beta_start": BETA_START, "beta_end": BETA_END, "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False},
        indent=2) + "\n")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False}, indent=2) + "\n")


# ----------------------------------------------------------------------------- the recipe


def sha256(file: Path) -> str:
    """The file's sha256, read a chunk at a time (a listed file may be large)."""
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_json(file: Path, record: dict) -> None:
    write_atomically(file, (json.dumps(record, indent=2) + "\n").encode())


def unsafe_out(path) -> str | None:
    """Why a script must not write at `path`, or None: it is the shipped models' folder or inside
    it (their files are checked by sha256), or a symbolic link (the write would land elsewhere)."""
    path, shipped = Path(path), MODELS_DIR.resolve()
    if path.is_symlink():
        return "is a symbolic link, and a write would land where it points: give the real path"
    if path.resolve() == shipped or shipped in path.resolve().parents:
        return (f"is inside {MODELS_DIR}, the shipped models, whose files are checked by sha256: "
                f"choose another folder")
    return None


def is_toy_build(folder: Path) -> bool:
    """The folder holds a build.json that build() wrote."""
    try:
        return json.loads((folder / "build.json").read_text()).get("toy_world") is True
    except (OSError, ValueError, AttributeError):
        return False


def fresh_folder(folder: Path) -> None:
    """Empty `folder` for a build: only ever remove a folder build() built."""
    if folder.exists() and any(folder.iterdir()) and not is_toy_build(folder):
        raise SystemExit(f"{folder} exists and is not a toy-world build (no build.json written by "
                         f"weights/toyworld/recipe.py): nothing was removed; choose a new or empty "
                         f"folder with --out")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def train_models(data: Path, models: Path, recipe: Recipe, seed: int) -> dict:
    """Phases 2–5 on the drawn data: the tokenizer, the two CLIPs, the VAE and the UNet, written
    into `models` (clip/ and sd/); returns the seconds of each phase."""
    times = {}

    def phase(name, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        times[name] = round(time.perf_counter() - start, 1)
        return result

    train = TrainSet.read(data / "train")
    tokenizer = phase("2. learn the tokenizer", write_tokenizer,
                      [models / "clip", models / "sd" / "tokenizer"],
                      [c for cs in train.captions for c in cs])
    text_encoder = text_tower(phase("3a. pre-train SD's CLIP", pretrain_clip, train, tokenizer,
                                    recipe.text_clip_steps, recipe.text_clip_batch, seed))
    clip = phase("3b. pre-train the CLIP to fine-tune", pretrain_clip, train, tokenizer,
                 recipe.clip_steps, recipe.clip_batch, seed)
    save_clip(clip, models / "clip")
    vae = phase("4a. train the VAE", train_vae, train, recipe, seed)
    vae = phase("4b. fine-tune the VAE's decoder", finetune_decoder, vae, train, recipe, seed)
    unet = phase("5. train the UNet", train_unet, train, vae, text_encoder, tokenizer, recipe, seed)
    write_sd(models / "sd", text_encoder, vae, unet)
    return times


def model_files(models: Path) -> dict[str, str]:
    return {str(f.relative_to(models)): sha256(f) for sub in ("clip", "sd")
            for f in sorted((models / sub).rglob("*")) if f.is_file()}


def check_shipped(models: Path) -> None:
    """The shipped models are whole: every file that models.json lists, with its sha256."""
    record = models / "models.json"
    restore = ("restore it with `git checkout weights/toy-models`, or train the models again with "
               "`python -m weights.toyworld --rebuild`")
    try:
        listed = json.loads(record.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"{record} cannot be read ({err!r}): {restore}")
    if not (isinstance(listed, dict) and all(isinstance(name, str) and isinstance(digest, str)
                                             for name, digest in listed.items())):
        raise SystemExit(f"{record}: \"sha256\" must map file names to hex digests, got "
                         f"{json.dumps(listed)[:80]}: {restore}")
    for name, digest in listed.items():
        file = models / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise SystemExit(f"{record} lists {name!r}, a file outside {models}: a models.json "
                             f"lists only files inside its own folder; {restore}")
        if not file.is_file() or sha256(file) != digest:
            raise SystemExit(f"{file} is missing or differs from the sha256 in {record}: {restore}")


def draw_world(out: Path, recipe: Recipe, seed: int, quick: bool) -> None:
    """The world's data in `out`/data, drawn with these settings or reused: build.json, written
    first, marks the folder as a build; each split is redrawn when any of its files is missing."""
    data = out / "data"
    settings = {"toy_world": True, "version": VERSION, "seed": seed, "quick": quick,
                "data": {k: getattr(recipe, k) for k in DATA_SIZES}}
    if not (is_toy_build(out)
            and {k: v for k, v in json.loads((out / "build.json").read_text()).items()
                 if k in settings} == settings):
        fresh_folder(out)
        write_json(out / "build.json", settings)
    missing = [name for name in SPLITS if not is_drawn(data, name, recipe)]
    if not missing and (out / "contact_sheet.png").is_file():
        return
    print(f"drawing the toy world's data in {data} ({', '.join(missing) or 'contact sheet'}; "
          f"seed {seed}{', quick' if quick else ''}; cached afterwards)")
    start = time.perf_counter()
    draw_data(data, recipe, seed, missing)
    contact_sheet(data / SPLITS["test"][0], out / "contact_sheet.png")
    write_json(out / "build.json", {**settings, "seconds": round(time.perf_counter() - start, 1)})


def train_into(models: Path, data: Path, recipe: Recipe, seed: int, trained: dict) -> None:
    """The models trained into a folder beside `models` and swapped in once whole, models.json last:
    a kill leaves `models` as it was (between the two renames, whole in .<name>.old beside it)."""
    partial, old = (models.parent / f".{models.name}.{end}" for end in ("partial", "old"))
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    print(f"training the toy models into {models} (seed {seed}; in {partial} until done)")
    times = train_models(data, partial, recipe, seed)
    (partial / "models.json").write_text(json.dumps(
        {"settings": trained, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
         "seconds": times, "sha256": model_files(partial)}, indent=2) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if models.exists():
        models.rename(old)
    partial.rename(models)
    shutil.rmtree(old, ignore_errors=True)
    print("trained: " + ", ".join(f"{name} {s:.0f} s" for name, s in times.items()))


def build(out: Path = TOY_DIR, seed: int = 0, quick: bool = False, rebuild: bool = False,
          models: Path = MODELS_DIR) -> dict[str, Path]:
    """The world's data, drawn into `out`/data (or reused when drawn with the same settings), and
    its models: the shipped ones in `models`, checked by sha256 before anything is drawn; with
    `rebuild`, trained from scratch and swapped into `models`; with `quick`, small ones trained
    into `out`/models. Returns the paths."""
    out = Path(out)
    recipe = QUICK if quick else Recipe()
    models = out / "models" if quick else Path(models)
    if not (quick or rebuild) and seed != 0:
        raise SystemExit("the shipped toy models were trained on the data of --seed 0; for another "
                         "seed, train them too with --rebuild (and --models DIR to keep the "
                         "shipped ones)")
    if (rebuild and models.is_dir() and any(models.iterdir())
            and not (models / "models.json").is_file()):
        raise SystemExit(f"{models} holds files but no models.json: it is not a toy-models folder, "
                         f"and nothing was removed; choose a new or empty folder with --models")
    if not (quick or rebuild):
        check_shipped(models)
    draw_world(out, recipe, seed, quick)
    data = out / "data"
    record = models / "models.json"
    trained = {"version": VERSION, "seed": seed, "recipe": vars(recipe)}
    if rebuild or (quick
                   and not (record.is_file()
                            and json.loads(record.read_text()).get("settings") == trained)):
        train_into(models, data, recipe, seed, trained)
    return {**{name: data / SPLITS[name][0] for name in SPLITS}, "clip": models / "clip",
            "sd": models / "sd"}
