"""What the SDS term does, measured on the toy world (run by hand; the README's toy table).

Each row is a model scored on a Winoground-style split of weights/toy/ (text / image / group,
and the group score of each kind of swap): the pre-trained small CLIP; that CLIP fine-tuned by
train.py with λ = 0 (the control: the same steps, data, seeds and LayerNorms, contrastive loss
only); SDS-CLIP with --sds_mode full and stopgrad; and the small Stable Diffusion's own
diffusion score, plain and with the image score normalised by the empty prompt (one run gives
both). Fine-tuned rows run once per seed (the seed sets h_w's initial weights, the data order,
the captions drawn, t and ε), the diffusion rows once per noise seed: mean ± standard
deviation over seeds, and the wall time of one run.

    python tests/toy_evidence.py --split val --rows control full --sds_weight 1    # choose on val
    python tests/toy_evidence.py --split test                                     # the README table

Settings are chosen on --split val only; the test split is for the table.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from eval_winoground import image_correct, text_correct  # noqa: E402
from weights.toyworld import TAGS, TOY_DIR, TRAIN_DEFAULTS, build  # noqa: E402

ROWS = ("clip", "control", "full", "stopgrad", "diffusion")


def run(command: list[str], threads: int | None) -> float:
    start = time.perf_counter()
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    subprocess.run([sys.executable, *command], cwd=REPO, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def scores(records: list[dict], image_key: str = "scores") -> dict:
    """Percentages overall and the group score per tag, from per-example 2×2 scores."""
    credit = [(text_correct(r["scores"]), image_correct(r[image_key]), r["collapsed_tag"]) for r in records]
    row = {"text": 100 * statistics.mean(t for t, _, _ in credit),
           "image": 100 * statistics.mean(i for _, i, _ in credit),
           "group": 100 * statistics.mean(t and i for t, i, _ in credit)}
    for tag in TAGS:
        row[f"{tag} group"] = 100 * statistics.mean(t and i for t, i, g in credit if g == tag)
    return row


def job(row: str, seed: int, args, paths: dict, out: Path, threads: int | None) -> dict:
    """One run: its scores (two rows for the diffusion score) and its wall time."""
    split = str(paths[args.split])
    result = out / f"{args.split}-{row}-seed{seed}.json"
    if row == "clip":
        seconds = run(["eval_winoground.py", "--clip", str(paths["clip"]), "--data", split, "--out", str(result)],
                      threads)
    elif row == "diffusion":
        seconds = run(["eval_winoground.py", "--sd", str(paths["sd"]), "--data", split, "--seed", str(seed),
                       "--timesteps", str(args.timesteps), "--batch_size", "240", "--normalize_image_score",
                       "--out", str(result)], threads)
    else:
        folder = out / f"{args.split}-{row}-seed{seed}"
        shutil.rmtree(folder, ignore_errors=True)
        settings = {**TRAIN_DEFAULTS, "sds_weight": 0.0 if row == "control" else args.sds_weight,
                    "sds_mode": "full" if row == "control" else row, "seed": seed}
        seconds = run(["train.py", "--clip", str(paths["clip"]), "--sd", str(paths["sd"]), "--coco_root",
                       str(paths["train"]), "--out", str(folder), "--device", "cpu",
                       *(f"--{k}={v}" for k, v in settings.items()), *args.train_flags.split()], threads)
        run(["eval_winoground.py", "--clip", str(folder), "--data", split, "--out", str(result)], threads)
    records = json.loads(result.read_text())["examples"]
    rows = {row: scores(records)}
    if row == "diffusion":
        rows["diffusion, image score normalised"] = scores(records, "image_scores")
    print(f"{row} seed {seed} ({seconds:.0f} s): " + ", ".join(f"{k} {v:.1f}" for k, v in rows[row].items()),
          flush=True)
    return {"rows": rows, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", choices=("val", "test"), default="test", help="the split to score (choose on val)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning / noise seeds")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="which rows to run")
    p.add_argument("--sds_weight", type=float, default=TRAIN_DEFAULTS["sds_weight"], help="λ of the SDS rows")
    p.add_argument("--timesteps", type=int, default=20, help="diffusion score: timesteps per pair")
    p.add_argument("--train_flags", default="", help="extra train.py flags for every fine-tuned row")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each on one thread when more than 1)")
    p.add_argument("--out", default="out/toy-evidence", help="runs and <split>-results.json")
    p.add_argument("--world", default=str(TOY_DIR), help="the toy world's folder (built there if missing)")
    p.add_argument("--quick", action="store_true", help="the --quick world (a check of this script, not evidence)")
    args = p.parse_args()
    paths = build(Path(args.world), quick=args.quick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = [(row, seed) for row in args.rows for seed in ([0] if row == "clip" else args.seeds)]
    threads = 1 if args.jobs > 1 else None
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda rs: job(*rs, args, paths, out, threads), plan))

    table, seconds = {}, {}
    for (row, _), result in zip(plan, done):
        for name, values in result["rows"].items():
            table.setdefault(name, []).append(values)
            seconds.setdefault(name, []).append(result["seconds"])
    columns = list(next(iter(table.values()))[0])
    print(f"\n{args.split} split, seeds {args.seeds}, λ = {args.sds_weight}, "
          f"train.py {' '.join(f'--{k} {v}' for k, v in TRAIN_DEFAULTS.items() if k != 'sds_weight')} "
          f"{args.train_flags}".rstrip())
    print("| row | " + " | ".join(columns) + " | seconds per run |")
    print("| --- |" + " --- |" * (len(columns) + 1))
    for name, runs in table.items():
        cells = []
        for column in columns:
            values = [r[column] for r in runs]
            spread = f" ± {statistics.stdev(values):.1f}" if len(runs) > 1 else ""
            cells.append(f"{statistics.mean(values):.1f}{spread}")
        print(f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(seconds[name]):.0f} |")
    results = {"settings": vars(args), "train_defaults": TRAIN_DEFAULTS, "rows": table, "seconds": seconds}
    (out / f"{args.split}-results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
