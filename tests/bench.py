"""Benchmarks, run by hand: ours vs the reference implementation, side by side in one run.

    python tests/bench.py            # every section
    python tests/bench.py clip unet  # some sections

Time is the median of several rounds in which ours and the reference take turns (this is a
noisy machine); memory is the peak resident set size above the level just before the measured
call (Linux: VmHWM, reset through /proc/self/clear_refs, after malloc_trim), which covers CPU
tensors that torch's allocator does not report.
Each line prints ours, the reference and the ratio ours / reference (< 1 is better).
"""

import argparse
import ctypes
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def median_time(fn, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of fn() over `repeat` runs, after `warmup` runs."""
    return statistics.median(paired_times([fn], repeat, warmup)[0])


def paired_times(fns, repeat: int = 5, warmup: int = 1) -> list[list[float]]:
    """Seconds of each fn over `repeat` rounds, the fns taking turns within each round, so that
    a burst of load from elsewhere on the machine falls on all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return times


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory_mib(fn) -> float:
    """Peak resident memory (MiB) that fn() adds above the level just before it runs."""
    gc.collect()
    # Hand freed memory back to the OS first: otherwise fn() reuses what earlier calls left in
    # malloc's free lists, the resident size never rises, and the peak reads as zero.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM
    before = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - before) / 1024


def report(name: str, ours_s: float, ref_s: float, ours_mib: float, ref_mib: float) -> None:
    print(
        f"{name:<44} time ours {ours_s * 1e3:9.1f} ms  ref {ref_s * 1e3:9.1f} ms  "
        f"ratio {ours_s / ref_s:5.2f} | peak mem ours {ours_mib:8.1f} MiB  "
        f"ref {ref_mib:8.1f} MiB  ratio {ours_mib / max(ref_mib, 1e-9):5.2f}",
        flush=True,
    )


def compare(name: str, ours_fn, ref_fn, repeat: int = 5) -> None:
    """Time both, taking turns (median of `repeat` rounds after a warm-up), measure both, print one line."""
    ours_times, ref_times = paired_times([ours_fn, ref_fn], repeat)
    ours_mib = peak_memory_mib(ours_fn)
    ref_mib = peak_memory_mib(ref_fn)
    report(name, statistics.median(ours_times), statistics.median(ref_times), ours_mib, ref_mib)


# --- sections: each builds both models from the same random weights and calls compare() ---


def bench_clip() -> None:
    """CLIP forward (image + text), ViT-B/32, batch 8: ours vs transformers' CLIPModel."""
    import tempfile

    import transformers

    import open_clip

    from weights.networks import load_clip, load_openai_tokenizer

    ref = transformers.CLIPModel(transformers.CLIPConfig()).eval()  # the defaults are ViT-B/32
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder)
        ours = load_clip(folder)
    tokenizer = load_openai_tokenizer(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz")
    pixels = torch.randn(8, 3, 224, 224)
    ids = tokenizer([f"a photo of {n} cats sitting on a red sofa" for n in range(8)])
    with torch.no_grad():
        compare("clip ViT-B/32 forward, batch 8", lambda: ours(pixels, ids),
                lambda: ref(input_ids=ids, pixel_values=pixels).logits_per_image, repeat=10)


def bench_vae() -> None:
    """Full-size SD 1.x VAE encode, one 256×256 image, fp32, no_grad: vae.py vs diffusers."""
    import tempfile

    from diffusers import AutoencoderKL

    from weights.networks import load_vae

    ref = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    ).eval()
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder)
        ours = load_vae(folder)
    images = torch.rand(1, 3, 256, 256) * 2 - 1

    @torch.no_grad()
    def ours_fn():
        return ours.encode(images).mean

    @torch.no_grad()
    def ref_fn():
        return ref.encode(images).latent_dist.mean

    torch.testing.assert_close(ours_fn(), ref_fn(), atol=1e-4, rtol=0)  # same work, same answer
    compare("vae encode SD1.x 256x256 b1 fp32", ours_fn, ref_fn)


def bench_eval() -> None:
    """Winoground CLIP score, ViT-B/32, 16 synthetic examples (640×480 PNGs), whole pipeline from the
    files (decode, preprocess, tokenize, encode, 2×2 cosines): eval_winoground.clip_scores vs
    transformers' CLIPImageProcessor + CLIPTokenizer + CLIPModel."""
    import tempfile

    import open_clip
    import transformers

    import eval_winoground as ew
    from weights.networks import load_clip, load_openai_tokenizer

    num_examples = 16
    tokenizer = load_openai_tokenizer(Path(open_clip.__file__).parent
                                      / "bpe_simple_vocab_16e6.txt.gz")
    ref = transformers.CLIPModel(transformers.CLIPConfig()).eval()  # the defaults are ViT-B/32
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ref.save_pretrained(tmp / "clip")
        ours = load_clip(tmp / "clip")
        write_tokenizer_files(tokenizer, tmp / "clip")
        ref_tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp / "clip")
        processor = transformers.CLIPImageProcessor()
        data = synthetic_winoground(tmp / "data", num_examples)

        def ours_fn():
            return ew.clip_scores(ours, tokenizer, data, data.examples, batch_size=num_examples)

        def ref_fn():
            return ref_clip_scores(ref, processor, ref_tokenizer, data)

        diff = (ours_fn() - ref_fn()).abs().max().item()
        ours_s, ref_s = median_time(ours_fn, repeat=3), median_time(ref_fn, repeat=3)
        report(f"eval winoground CLIP B/32, {num_examples} examples", ours_s, ref_s,
               peak_memory_mib(ours_fn), peak_memory_mib(ref_fn))

        def with_workers():
            return ew.clip_scores(ours, tokenizer, data, data.examples, num_examples, workers=2)

        workers_s = median_time(with_workers, repeat=3)
        print(f"{'':<44} examples/s ours {num_examples / ours_s:6.1f}  "
              f"ref {num_examples / ref_s:6.1f}  ours with 2 image workers "
              f"{num_examples / workers_s:6.1f}  (max |Δ| of the 2×2 scores {diff:.1e})",
              flush=True)


def write_tokenizer_files(tokenizer, folder: Path) -> None:
    """OpenAI's BPE as the Hugging Face tokenizer files (vocab.json, merges.txt) in folder, so that
    both tokenizers read the same vocabulary."""
    import json

    (folder / "vocab.json").write_text(json.dumps(tokenizer.encoder), encoding="utf-8")
    merges = sorted(tokenizer.ranks, key=tokenizer.ranks.get)
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")


def synthetic_winoground(folder: Path, num_examples: int):
    """A Winoground folder of `num_examples` examples: two 640×480 PNGs each (a gradient plus
    seeded noise) and two captions."""
    import json

    import numpy as np
    from PIL import Image

    from weights.winoground import Winoground

    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.linspace(0, 1, 640), np.linspace(0, 1, 480))
    lines = []
    for k in range(num_examples):
        for j in (0, 1):
            rgb = np.stack([x, y, x * y], axis=-1) * 200 + rng.integers(0, 56, (480, 640, 3))
            Image.fromarray(rgb.astype(np.uint8)).save(folder / "images" / f"ex_{k}_img_{j}.png")
        lines.append(json.dumps({"id": k, "image_0": f"ex_{k}_img_0", "image_1": f"ex_{k}_img_1",
                                 "caption_0": f"{k} dogs chasing a cat",
                                 "caption_1": f"a cat chasing {k} dogs",
                                 "tag": "Noun", "secondary_tag": "", "num_main_preds": 1,
                                 "collapsed_tag": "Object"}))
    (folder / "examples.jsonl").write_text("\n".join(lines) + "\n")
    return Winoground(folder)


@torch.no_grad()
def ref_clip_scores(ref, processor, ref_tokenizer, data) -> torch.Tensor:
    """The 2×2 scores of every example with transformers: CLIPImageProcessor, CLIPTokenizer and
    CLIPModel's features, (examples, 2 captions, 2 images)."""
    images = [image for e in data.examples for image in data.images(e)]
    captions = [c for e in data.examples for c in (e.caption_0, e.caption_1)]
    pixels = processor(images=images, return_tensors="pt").pixel_values
    ids = ref_tokenizer(captions, padding="max_length", max_length=77,
                        return_tensors="pt").input_ids
    img = torch.nn.functional.normalize(ref.get_image_features(pixel_values=pixels), dim=-1)
    txt = torch.nn.functional.normalize(ref.get_text_features(input_ids=ids), dim=-1)
    # (examples, 2, D)
    img, txt = img.view(len(data.examples), 2, -1), txt.view(len(data.examples), 2, -1)
    return torch.einsum("bcd,bid->bci", txt, img)


def bench_unet() -> None:
    """Full-size SD 1.x UNet, 64×64 latents, batch 1, fp32: forward (no_grad) and forward + backward to
    the input latents (weights frozen), unet.py vs diffusers' UNet2DConditionModel (default attention
    processor), same weights."""
    import tempfile

    from diffusers import UNet2DConditionModel

    from weights.networks import load_unet

    with tempfile.TemporaryDirectory() as folder:
        # diffusers' defaults are the SD 1.x UNet except the text width (1280 there, 768 in SD 1.x)
        UNet2DConditionModel(cross_attention_dim=768).save_pretrained(folder)
        ours = load_unet(folder).requires_grad_(False)
        ref = UNet2DConditionModel.from_pretrained(folder).eval().requires_grad_(False)
    latents, context, t = torch.randn(1, 4, 64, 64), torch.randn(1, 77, 768), torch.tensor([500])

    with torch.no_grad():
        compare("unet SD1.x forward 64x64 b1 fp32", lambda: ours(latents, t, context),
                lambda: ref(latents, t, context).sample)

    def backward(model):
        x = latents.clone().requires_grad_(True)
        model(x, t, context).square().mean().backward()  # a scalar of the output, as the SDS loss is
        return x.grad

    compare("unet SD1.x forward+backward to latents", lambda: backward(ours),
            lambda: backward(lambda *a: ref(*a).sample), repeat=3)


def bench_train() -> None:
    """One SDS-CLIP training step at full size on the CPU, fp32, batch 2: ViT-B/32 CLIP (LayerNorms
    trained) + h_w + the SD 1.x UNet (frozen), random weights built from the configs; sds_mode
    "full" (backward through the UNet) vs "stopgrad" (UNet under no_grad). Peak memory is what the
    step adds above the resident models."""
    from clip import CLIP, CLIPConfig, TextConfig, VisionConfig
    from sds import Mapper
    from train import SDSCLIPLoss, set_trainable
    from unet import UNet, UNetConfig

    clip = CLIP(CLIPConfig(text=TextConfig(), vision=VisionConfig()))  # the defaults are ViT-B/32
    unet = UNet(UNetConfig()).to(memory_format=torch.channels_last).eval().requires_grad_(False)  # as load_unet
    set_trainable(clip)
    mapper, batch = Mapper.for_unet(clip.config.projection_dim, unet), 2
    objectives = {mode: SDSCLIPLoss(clip, mapper, 0.001, mode) for mode in ("full", "stopgrad")}  # λ = 0.001
    optimizer = torch.optim.AdamW([p for p in objectives["full"].parameters() if p.requires_grad], lr=5e-5)
    pixels, ids = torch.randn(batch, 3, 224, 224), torch.randint(0, 49406, (batch, 77))
    context, t, noise = torch.randn(batch, 77, 768), torch.tensor([250, 750]), torch.randn(batch, 4, 64, 64)

    def step(mode: str) -> None:
        loss, _, _ = objectives[mode](pixels, ids, context, t, noise, unet)  # L = L_CLIP + λ·L_SDS
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # Memory first, the smaller step first: freed memory stays resident (the allocator keeps it), so
    # a step measured after a bigger one would show ~0 MiB. The memory runs are the warm-up runs.
    memory = {mode: peak_memory_mib(lambda: step(mode)) for mode in ("stopgrad", "full")}
    results = {mode: (median_time(lambda: step(mode), repeat=2, warmup=0), memory[mode])
               for mode in ("full", "stopgrad")}
    for mode, (seconds, mib) in results.items():
        print(f"train step ViT-B/32 + SD1.x UNet, batch 2, fp32, {mode:<8} time {seconds:7.2f} s  "
              f"peak mem {mib:8.1f} MiB  (× {seconds / results['stopgrad'][0]:.2f} time, "
              f"× {mib / results['stopgrad'][1]:.2f} memory of stopgrad)", flush=True)


def bench_trainable() -> None:
    """What each --trainable costs: a CLIP training step (contrastive loss, backward, AdamW), ViT-B/32,
    batch 8, fp32, with train.py's layernorm / image / all trainable sets: ours vs transformers' CLIPModel
    with the same parameters trainable (the SDS term adds the same UNet cost to each: see "train")."""
    import tempfile

    import transformers

    from sds import contrastive_loss
    from train import TRAINABLE, set_trainable
    from weights.networks import load_clip

    ref = transformers.CLIPModel(transformers.CLIPConfig())  # the defaults are ViT-B/32
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder)
        ours = load_clip(folder)
    pixels, ids = torch.randn(8, 3, 224, 224), torch.randint(0, 49406, (8, 77))
    ids[:, -1] = 49407  # end-of-text last: both towers pool there

    def step(model, optimizer, logits_fn):
        contrastive_loss(logits_fn(model)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for trainable in TRAINABLE:
        set_trainable(ours, trainable)
        ours_names = {name for name, p in ours.named_parameters() if p.requires_grad}
        for name, p in ref.named_parameters():  # the same names: module names are the checkpoint keys
            p.requires_grad_(name in ours_names)
        optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5) for m in (ours, ref)]
        count = sum(p.numel() for p in ours.parameters() if p.requires_grad)
        compare(f"clip ViT-B/32 train step, batch 8, --trainable {trainable:<9} ({count / 1e6:6.2f} M)",
                lambda: step(ours, optimizers[0], lambda m: m(pixels, ids)),
                lambda: step(ref, optimizers[1], lambda m: m(input_ids=ids, pixel_values=pixels).logits_per_image),
                repeat=3)


# --- end of sections ---

SECTIONS = {"clip": bench_clip, "vae": bench_vae, "eval": bench_eval, "unet": bench_unet, "train": bench_train,
            "trainable": bench_trainable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", help=f"sections to run, from {list(SECTIONS)} (default: all)")
    args = parser.parse_args()
    unknown = [name for name in args.sections if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for name in args.sections or SECTIONS:
        torch.manual_seed(0)
        SECTIONS[name]()


if __name__ == "__main__":
    main()
