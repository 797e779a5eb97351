"""Benchmarks, run by hand: ours vs the reference implementation, side by side in one run.

    python tests/bench.py            # every section
    python tests/bench.py clip unet  # some sections

Time is the median of several runs (this is a noisy machine); memory is the peak resident
set size above the level just before the measured call (Linux: VmHWM, reset through
/proc/self/clear_refs), which covers CPU tensors that torch's allocator does not report.
Each line prints ours, the reference and the ratio ours / reference (< 1 is better).
"""

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def median_time(fn, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of fn() over `repeat` runs, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory_mib(fn) -> float:
    """Peak resident memory (MiB) that fn() adds above the level just before it runs."""
    gc.collect()
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
    """Time both (each after a warm-up run), then measure both, and print one line."""
    ours_s = median_time(ours_fn, repeat)
    ref_s = median_time(ref_fn, repeat)
    ours_mib = peak_memory_mib(ours_fn)
    ref_mib = peak_memory_mib(ref_fn)
    report(name, ours_s, ref_s, ours_mib, ref_mib)


# --- sections: each builds both models from the same random weights and calls compare() ---


def bench_clip() -> None:
    """CLIP forward (image + text), ViT-B/32, batch 8: ours vs transformers' CLIPModel."""
    import tempfile

    import transformers

    import open_clip

    from clip import Tokenizer, load_clip

    ref = transformers.CLIPModel(transformers.CLIPConfig()).eval()  # the defaults are ViT-B/32
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder)
        ours = load_clip(folder)
    tokenizer = Tokenizer.from_openai_bpe(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz")
    pixels = torch.randn(8, 3, 224, 224)
    ids = tokenizer([f"a photo of {n} cats sitting on a red sofa" for n in range(8)])
    with torch.no_grad():
        compare("clip ViT-B/32 forward, batch 8", lambda: ours(pixels, ids),
                lambda: ref(input_ids=ids, pixel_values=pixels).logits_per_image, repeat=10)


def bench_vae() -> None:
    """Full-size SD 1.x VAE encode, one 256×256 image, fp32, no_grad: vae.py vs diffusers."""
    import tempfile

    from diffusers import AutoencoderKL

    from vae import load_vae

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


# --- end of sections ---

SECTIONS = {"clip": bench_clip, "vae": bench_vae}


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
