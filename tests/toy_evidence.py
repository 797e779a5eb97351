"""What the SDS term does, measured on the toy world (run by hand; the README's toy table).

Each row is a model scored on a Winoground-style split of weights/toy/ (text / image / group,
and the group score of each kind of swap): the pre-trained small CLIP; that CLIP fine-tuned by
train.py with λ = 0 (the control: the same steps, data, seeds and LayerNorms, contrastive loss
only); SDS-CLIP with --sds_mode full and stopgrad; and the small Stable Diffusion's own
diffusion score, plain and normalised. Fine-tuned rows run once per seed (the seed sets h_w's
initial weights, the data order, the captions drawn, t and ε); the diffusion rows once per
noise seed. Mean ± standard deviation over seeds; wall time per run.

    python tests/toy_evidence.py --split val --rows full --sds_weight 0.1    # choose settings on val
    python tests/toy_evidence.py --split test                                # the README table

Settings are chosen on --split val only; the test split is for the table.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from weights.toyworld import IMAGE_SIZE, TAGS, TOY_DIR, TRAIN_DEFAULTS, build  # noqa: E402

ROWS = ("clip", "control", "full", "stopgrad", "diffusion", "diffusion_normalized")


def run(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *command], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def scores(result: Path) -> dict:
    subsets = json.loads(result.read_text())["subsets"]
    row = {key: subsets["all"][key] for key in ("text", "image", "group")}
    return row | {f"{tag} group": subsets[f"collapsed_tag={tag}"]["group"] for tag in TAGS}


def finetune(paths: dict, split: Path, out: Path, seed: int, sds_weight: float, sds_mode: str, extra: list[str]):
    settings = {**TRAIN_DEFAULTS, "sds_weight": sds_weight, "sds_mode": sds_mode, "seed": seed}
    flags = [f"--{k}={v}" for k, v in settings.items()]
    shutil.rmtree(out, ignore_errors=True)
    seconds = run(["train.py", "--clip", str(paths["clip"]), "--sd", str(paths["sd"]), "--coco_root",
                   str(paths["train"]), "--out", str(out), "--device", "cpu", *flags, *extra])
    run(["eval_winoground.py", "--clip", str(out), "--data", str(split), "--out", str(out / "winoground.json")])
    return scores(out / "winoground.json"), seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", choices=("val", "test"), default="test", help="the split to score (choose on val)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning / noise seeds")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="which rows to run")
    p.add_argument("--sds_weight", type=float, default=TRAIN_DEFAULTS["sds_weight"], help="λ of the SDS rows")
    p.add_argument("--timesteps", type=int, default=20, help="diffusion score: timesteps per pair")
    p.add_argument("--train_flags", default="", help="extra train.py flags for every fine-tuned row")
    p.add_argument("--out", default="out/toy-evidence", help="runs and results.json")
    args = p.parse_args()
    paths = build(TOY_DIR)
    split, out = paths[args.split], Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = {}
    for row in args.rows:
        runs = []
        for seed in ([0] if row == "clip" else args.seeds):
            result = out / f"{args.split}-{row}-seed{seed}.json"
            if row == "clip":
                seconds = run(["eval_winoground.py", "--clip", str(paths["clip"]), "--data", str(split),
                               "--out", str(result)])
                runs.append((scores(result), seconds))
            elif row.startswith("diffusion"):
                normalize = ["--normalize_image_score"] if row == "diffusion_normalized" else []
                seconds = run(["eval_winoground.py", "--sd", str(paths["sd"]), "--data", str(split), "--seed",
                               str(seed), "--timesteps", str(args.timesteps), "--resolution", str(IMAGE_SIZE),
                               "--batch_size", "240", *normalize, "--out", str(result)])
                runs.append((scores(result), seconds))
            else:
                weight, mode = (0.0, "full") if row == "control" else (args.sds_weight, row)
                runs.append(finetune(paths, split, out / f"{args.split}-{row}-seed{seed}", seed, weight, mode,
                                     args.train_flags.split()))
            print(f"{row} seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in runs[-1][0].items())
                  + f" ({runs[-1][1]:.0f} s)", flush=True)
        table[row] = {"runs": [r for r, _ in runs], "seconds": [s for _, s in runs]}

    columns = list(table[args.rows[0]]["runs"][0])
    print(f"\n{args.split} split, seeds {args.seeds}, λ = {args.sds_weight}, {args.train_flags or 'default flags'}")
    print("| row | " + " | ".join(columns) + " | seconds per run |")
    print("| --- |" + " --- |" * (len(columns) + 1))
    for row, result in table.items():
        cells = []
        for column in columns:
            values = [r[column] for r in result["runs"]]
            spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.1f}{spread}")
        print(f"| {row} | " + " | ".join(cells) + f" | {statistics.mean(result['seconds']):.0f} |")
    (out / f"{args.split}-results.json").write_text(json.dumps({"settings": vars(args), "rows": table}, indent=1))


if __name__ == "__main__":
    main()
