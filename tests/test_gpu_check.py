"""tests/gpu_check.py --tiny on the CPU, run as a user runs it (a subprocess): every section is written, with
finite numbers that agree with each other, within the --tiny budget of a minute; so that the GPU check,
which runs only where a GPU is, cannot rot in between."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ["device", "parity", "train_step", "coco", "diffusion_score", "diffusers"]
TINY_BUDGET_S = 60
# --tiny's parity on the CPU, max |Δ| against ours in fp32 (outputs of max |x| ≈ 1–2): the references in
# fp32 measured ≤ 1.8e-6 (the tests' parity tolerance is 1e-4); bf16 autocast measured ≤ 1.5e-2 (the UNet).
REFERENCE_ATOL = 1e-4
BF16_ATOL = 5e-2


def numbers(value, path=""):
    """Every number in a JSON value, with where it is: (path, number)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from numbers(item, f"{path}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


def test_tiny_gpu_check_writes_every_section_with_finite_numbers(tmp_path):
    out = tmp_path / "gpu_check.json"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "tests/gpu_check.py", "--tiny", "--device", "cpu", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert seconds < TINY_BUDGET_S, f"--tiny took {seconds:.0f} s on the CPU; its budget is {TINY_BUDGET_S} s"
    report = json.loads(out.read_text())
    assert list(report) == SECTIONS
    bad = [(path, x) for path, x in numbers(report) if not math.isfinite(x)]
    assert not bad, bad
    for prefix in ("device:", "parity ", "train step ", "coco ", "diffusion ", "diffusers "):  # printed as it went
        assert any(line.startswith(prefix) for line in done.stdout.splitlines()), prefix

    device = report["device"]
    assert device["name"] == "cpu" and device["tiny"] and device["peak_bf16_tflops"] is None

    parity = {(r["output"], r["implementation"], r["precision"]): r for r in report["parity"]}
    for output, reference in (("clip image", "transformers"), ("clip text", "transformers"), ("unet", "diffusers"),
                              ("vae", "diffusers")):
        assert parity[output, "ours", "fp32"]["max_abs_diff"] == 0  # the same device: the same numbers
        assert parity[output, reference, "fp32"]["max_abs_diff"] <= REFERENCE_ATOL
        for implementation in ("ours", reference):
            assert 0 < parity[output, implementation, "bf16"]["max_abs_diff"] <= BF16_ATOL  # bf16 did run
        assert parity[output, "ours", "fp32"]["output_max_abs"] > 0.1  # nothing vanishing was compared
    assert len(parity) == len(report["parity"]) == 16

    steps = {(r["sds_mode"], r["gradient_checkpointing"]): r for r in report["train_step"]}
    assert set(steps) == {(mode, gc) for mode in ("full", "stopgrad") for gc in (False, True)}
    for step in steps.values():
        assert step["batch"] == 2 and step["images_per_s"] > 0 and step["flops_per_step"] > 0
        assert step["peak_memory_gib"] is None and step["mfu"] is None  # the CPU: neither is measured
    # full backpropagates through the UNet, stopgrad does not; checkpointing recomputes, MFU does not count that
    assert steps["full", False]["flops_per_step"] > 1.5 * steps["stopgrad", False]["flops_per_step"]
    assert steps["full", True]["flops_per_step"] == steps["full", False]["flops_per_step"]

    for row in report["coco"]:
        rate = steps[row["sds_mode"], row["gradient_checkpointing"]]["images_per_s"]
        assert row["images"] == 5 * 118_287 and math.isclose(row["hours"], row["images"] / rate / 3600)

    score = report["diffusion_score"]
    assert [r["batch"] for r in score["unet"]] == [2, 4] and score["best_batch"] in (2, 4)
    assert score["unet_inputs_per_s"] == max(r["inputs_per_s"] for r in score["unet"])
    assert [(r["timesteps"], r["unet_calls_per_example"]) for r in score["winoground"]] == [(2, 8), (3, 12)]
    for row in score["winoground"]:
        assert math.isclose(row["hours"], 400 * row["seconds_per_example"] / 3600)

    diffusers = report["diffusers"]
    assert [r["unet"] for r in diffusers["train_step"]] == ["diffusers"] * 4
    assert len(diffusers["train_step_ratio"]) == 4 and all(r["time_ratio"] > 0 for r in diffusers["train_step_ratio"])
    assert diffusers["unet"]["batch"] == score["best_batch"] and diffusers["unet"]["time_ratio"] > 0


def test_full_size_on_the_cpu_is_refused_in_one_line():
    done = subprocess.run([sys.executable, "tests/gpu_check.py", "--device", "cpu"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "the full-size check would take hours on the CPU; pass --tiny" in done.stderr.strip().splitlines()[-1]
