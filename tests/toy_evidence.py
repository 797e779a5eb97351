"""What the SDS term does, measured on the toy world (run by hand; the README's toy table).

Each row is a model scored on Winoground-style splits of the toy world (text / image / group,
and the group score of each kind of swap): the pre-trained small CLIP; that CLIP fine-tuned by
train.py with λ = 0 (the control: the same steps, data, seeds and LayerNorms, contrastive loss
only); SDS-CLIP with --sds_mode full and stopgrad; and the small Stable Diffusion's own
diffusion score, plain and with the image score normalised by the empty prompt (one run gives
both). A fine-tuned row trains once per seed (the seed sets h_w's initial weights, the data
order, the captions drawn, t and ε) and is scored on every split; the diffusion rows run once
per noise seed. Each cell: mean ± standard deviation over seeds; the wall time of one run.

    python tests/toy_evidence.py --splits val --rows control full --sds_weight 1   # choose on val
    python tests/toy_evidence.py --jobs 2                                          # the README table

Settings are chosen on the val split only; test and test-new-objects are for the table.
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
from weights.toyworld import MODELS_DIR, TAGS, TOY_DIR, TRAIN_DEFAULTS, build  # noqa: E402
import toy_controls  # noqa: E402  (tests/: the hard-negative controls, the probes, retention)

ROWS = ("clip", "control", "full", "stopgrad", "negclip", "ceiling", "ranking", "diffusion")
SPLITS = ("val", "test", "new_objects")


def run(command: list[str], threads: int | None) -> float:
    start = time.perf_counter()
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    subprocess.run([sys.executable, *command], cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env=env)
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
    """One run: its scores on every split (two rows for the diffusion score) and its wall time."""
    seconds, model = 0.0, ["--clip", str(paths["clip"])]
    if row in ("control", "full", "stopgrad"):
        folder = out / f"{row}-seed{seed}"
        shutil.rmtree(folder, ignore_errors=True)
        settings = {**TRAIN_DEFAULTS, "sds_weight": 0.0 if row == "control" else args.sds_weight,
                    "sds_mode": "full" if row == "control" else row, "seed": seed}
        seconds += run(["train.py", "--clip", str(paths["clip"]), "--sd", str(paths["sd"]), "--coco_root",
                        str(paths["train"]), "--out", str(folder), "--device", "cpu",
                        *(f"--{k}={v}" for k, v in settings.items()), *args.train_flags.split()], threads)
        model = ["--clip", str(folder)]
    elif row in ("negclip", "ceiling", "ranking"):  # hard negatives, or the teacher's ranking; λ = 0
        folder = out / f"{row}-seed{seed}"
        seconds += run(["tests/toy_controls.py", "finetune", "--seed", str(seed), "--out", str(folder),
                        "--clip", str(paths["clip"]), "--world", str(args.world), "--models", str(args.models),
                        *(["--all_weights"] if row == "ceiling" else []), *(["--quick"] if args.quick else []),
                        *(["--ranking"] if row == "ranking" else []),
                        "--train_flags", f"--device=cpu {args.train_flags}"], threads)
        model = ["--clip", str(folder)]
    elif row == "diffusion":
        model = ["--sd", str(paths["sd"]), "--seed", str(seed), "--timesteps", str(args.timesteps),
                 "--batch_size", "600", "--normalize_image_score"]
    rows, mechanism = {}, {}
    for split in args.splits:
        result = out / f"{split}-{row}-seed{seed}.json"
        seconds += run(["eval_winoground.py", *model, "--data", str(paths[split]), "--out", str(result)], threads)
        records = json.loads(result.read_text())["examples"]
        rows[split] = {row: scores(records)}
        if row == "diffusion":
            rows[split]["diffusion, image score normalised"] = scores(records, "image_scores")
        print(f"{row} seed {seed}, {split}: " + ", ".join(f"{k} {v:.1f}" for k, v in rows[split][row].items()),
              flush=True)
        if args.mechanism and row != "diffusion" and split == args.splits[0]:  # probes, retention of the CLIP
            mechanism[split] = {row: {**toy_controls.binding_probe(model[1], paths, split),
                                      **toy_controls.retention(model[1], paths, split)}}
    return {"rows": rows, "mechanism": mechanism, "seconds": seconds}


def table(split: str, plan: list, done: list, part: str = "rows") -> str:
    runs, seconds = {}, {}
    for (row, _), result in zip(plan, done):
        for name, values in result[part].get(split, {}).items():
            runs.setdefault(name, []).append(values)
            seconds.setdefault(name, []).append(result["seconds"])
    if not runs:
        return ""
    columns = list(next(iter(runs.values()))[0])
    lines = ["| row | " + " | ".join(columns) + " | seconds per run |", "| --- |" + " --- |" * (len(columns) + 1)]
    for name, values in runs.items():
        cells = []
        for column in columns:
            column_values = [v[column] for v in values]
            spread = f" ± {statistics.stdev(column_values):.1f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(column_values):.1f}{spread}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(seconds[name]):.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--splits", nargs="+", choices=SPLITS, default=["test", "new_objects"],
                   help="the splits to score (choose settings on val)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning / noise seeds")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=["clip", "control", "full", "diffusion"],
                   help="which rows to run")
    p.add_argument("--sds_weight", type=float, default=TRAIN_DEFAULTS["sds_weight"], help="λ of the SDS rows")
    p.add_argument("--timesteps", type=int, default=100, help="diffusion score: timesteps per pair")
    p.add_argument("--train_flags", default="", help="extra train.py flags for every fine-tuned row")
    p.add_argument("--mechanism", action="store_true",
                   help="also the probes and retention of every CLIP row, on the first of --splits")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each on one thread when more than 1)")
    p.add_argument("--out", default="out/toy-evidence", help="runs and results.json")
    p.add_argument("--world", help="the toy world's data folder, drawn there if missing (default: weights/toy, or "
                                   "out/toy-quick with --quick)")
    p.add_argument("--models", default=str(MODELS_DIR), help="the toy world's models (default: the shipped ones)")
    p.add_argument("--quick", action="store_true", help="the --quick world (a check of this script, not evidence)")
    args = p.parse_args()
    args.world = Path(args.world or ("out/toy-quick" if args.quick else TOY_DIR))
    paths = build(args.world, quick=args.quick, models=Path(args.models))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = [(row, seed) for row in args.rows for seed in ([0] if row == "clip" else args.seeds)]
    plan.sort(key=lambda rs: rs[0] != "diffusion")  # the longest runs first
    threads = 1 if args.jobs > 1 else None
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda rs: job(*rs, args, paths, out, threads), plan))

    print(f"\nseeds {args.seeds}, λ = {args.sds_weight}, diffusion score at {args.timesteps} timesteps, "
          f"train.py {' '.join(f'--{k} {v}' for k, v in TRAIN_DEFAULTS.items() if k != 'sds_weight')} "
          f"{args.train_flags}".rstrip())
    for split in args.splits:
        print(f"\n{split} split\n" + table(split, plan, done))
        if args.mechanism:
            print(f"\n{split} split: probes and retention\n" + table(split, plan, done, "mechanism"))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results = {"settings": settings, "train_defaults": TRAIN_DEFAULTS, "plan": plan, "runs": done}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
