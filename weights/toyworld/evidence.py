"""What the SDS term does, measured on the toy world (run by hand; the README's toy table).

Each row is a model scored on Winoground-style splits of the toy world (text / image / group,
and the group score of each kind of swap): the pre-trained small CLIP; that CLIP fine-tuned by
train.py with λ = 0 (the control: the same steps, data, seeds and LayerNorms, contrastive loss
only); SDS-CLIP with --sds_mode full and stopgrad; and the small Stable Diffusion's own
diffusion score, plain and with the image score normalised by the empty prompt (one run gives
both). A fine-tuned row trains once per seed (the seed sets h_w's initial weights, the data
order, the captions drawn, t and ε) and is scored on every split; the diffusion rows run once
per noise seed. Each cell: mean ± standard deviation over seeds; the wall time of one run.

    python -m weights.toyworld.evidence --splits val --rows control full --sds_weight 1   # choose on val
    python -m weights.toyworld.evidence --jobs 2                                          # the README table
    python -m weights.toyworld.evidence --picture matrix.png --results out/m/*/results.json  # the val matrix

A fine-tuned row takes train.py's options from --train_flags (--trainable, --mapper, --epochs, …):
run each configuration into its own --out.

Settings are chosen on the val split only; test and test-new-objects are for the table.
"""

import argparse
import fcntl
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from eval_winoground import (bootstrap_interval, compare_runs, format_comparison, image_correct,
                             text_correct)
from weights.networks import write_atomically

from . import probes  # the probes and retention of the CLIP rows (--mechanism)
from .recipe import MODELS_DIR, TOY_DIR, TRAIN_DEFAULTS, build, unsafe_out
from .world import TAGS, image_bytes

# the child processes run there: train.py, eval_winoground.py
REPO = Path(__file__).resolve().parents[2]

ROWS = ("clip", "control", "full", "stopgrad", "negclip", "ceiling", "ranking", "diffusion")
SPLITS = ("val", "test", "new_objects")


LOG_TAIL = 20  # lines of a failed child's stderr printed


def run(command: list[str], threads: int | None, log: Path) -> float:
    """A child process (python `command`), its stdout and stderr kept in log.out and log.err; when
    it fails, the end of its stderr is the error. Returns its wall time."""
    start = time.perf_counter()
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    log.parent.mkdir(parents=True, exist_ok=True)
    out, err = log.with_name(log.name + ".out"), log.with_name(log.name + ".err")
    with open(out, "w") as stdout, open(err, "w") as stderr:
        code = subprocess.run([sys.executable, *command], cwd=REPO, stdout=stdout, stderr=stderr,
                              env=env).returncode
    if code:
        # a progress bar redraws its line with \r: keep what each line last showed
        lines = [line.split("\r")[-1] for line in err.read_text(errors="replace").splitlines()]
        raise SystemExit(f"weights.toyworld.evidence: `python {' '.join(command)}` failed (exit "
                         f"{code}); its output is in {out} and {err}, which ends:\n"
                         + "\n".join(lines[-LOG_TAIL:]))
    return time.perf_counter() - start


def scores(records: list[dict], image_key: str = "scores") -> dict:
    """Percentages overall and the group score per tag, from per-example 2×2 scores."""
    credit = [(text_correct(r["scores"]), image_correct(r[image_key]), r["collapsed_tag"])
              for r in records]
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
        seconds += run(["train.py", "--clip", str(paths["clip"]), "--sd", str(paths["sd"]),
                        "--coco_root", str(paths["train"]), "--out", str(folder), "--device", "cpu",
                        *(f"--{k}={v}" for k, v in settings.items()), *args.train_flags.split()],
                        threads, out / "logs" / f"{row}-seed{seed}-train")
        model = ["--clip", str(folder)]
    # hard negatives, or the teacher's ranking; λ = 0
    elif row in ("negclip", "ceiling", "ranking"):
        folder = out / f"{row}-seed{seed}"
        seconds += run(["-m", "weights.toyworld.controls", "finetune", "--seed", str(seed), "--out",
                        str(folder), "--clip", str(paths["clip"]), "--world", str(args.world),
                        "--models", str(args.models),
                        *(["--all_weights"] if row == "ceiling" else []),
                        *(["--quick"] if args.quick else []),
                        *(["--ranking"] if row == "ranking" else []),
                        "--train_flags", f"--device=cpu {args.train_flags}"], threads,
                       out / "logs" / f"{row}-seed{seed}-finetune")
        model = ["--clip", str(folder)]
    elif row == "diffusion":
        model = ["--sd", str(paths["sd"]), "--seed", str(seed), "--timesteps", str(args.timesteps),
                 "--batch_size", "600", "--normalize_image_score"]
    rows, mechanism = {}, {}
    for split in args.splits:
        result = out / f"{split}-{row}-seed{seed}.json"
        seconds += run(["eval_winoground.py", *model, "--data", str(paths[split]), "--out",
                        str(result)], threads, out / "logs" / f"{split}-{row}-seed{seed}-eval")
        records = json.loads(result.read_text())["examples"]
        rows[split] = {row: scores(records)}
        if row == "diffusion":
            rows[split]["diffusion, image score normalised"] = scores(records, "image_scores")
        print(f"{row} seed {seed}, {split}: " + ", ".join(f"{k} {v:.1f}"
                                                          for k, v in rows[split][row].items()),
              flush=True)
        # probes, retention of the CLIP
        if args.mechanism and row != "diffusion" and split == args.splits[0]:
            mechanism[split] = {row: {**probes.binding_probe(model[1], paths, split),
                                      **probes.retention(model[1], paths, split)}}
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
    lines = ["| row | " + " | ".join(columns) + " | seconds per run |",
             "| --- |" + " --- |" * (len(columns) + 1)]
    for name, values in runs.items():
        cells = []
        for column in columns:
            column_values = [v[column] for v in values]
            spread = f" ± {statistics.stdev(column_values):.1f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(column_values):.1f}{spread}")
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {statistics.mean(seconds[name]):.0f} |")
    return "\n".join(lines)


def label(settings: dict, row: str) -> str:
    """A run's configuration in a few words: trainable set, row, λ and mapper of the SDS rows."""
    flags = settings["train_flags"].split()
    option = lambda name, default: (flags[flags.index(name) + 1]  # noqa: E731
                                    if name in flags else default)
    trainable = "all" if row == "ceiling" else option("--trainable", "layernorm")
    what = {"full": f"SDS full, lambda {settings['sds_weight']:g}", "control": "control (lambda 0)",
            "stopgrad": f"SDS stopgrad, lambda {settings['sds_weight']:g}"}.get(row, row)
    mapper = f", h_w {option('--mapper', 'joint')}" if row in ("full", "stopgrad") else ""
    return f"{trainable}: {what}{mapper} ({option('--epochs', TRAIN_DEFAULTS['epochs'])} ep.)"


def picture(results_files: list[Path], file: Path, split: str = "val",
            tag: str = "attribute") -> list[tuple]:
    """A PNG: the `tag` group score on `split` of every run in the results files (a dot per seed, a
    bar at the mean), each beside its control's band (the same trainable set, λ = 0: the 95 %
    bootstrap interval over the split's examples of that tag, seed 0, and every control seed's dot).
    Returns the rows drawn."""
    from PIL import Image, ImageDraw  # noqa: PLC0415 (only the picture needs it)

    rows = picture_rows(results_files, split, tag)
    bands = {trainable: (100 * bootstrap_interval(np.array(runs[0], dtype=float)), runs)
             for name, (trainable, runs) in rows.items() if "control" in name}
    sets = ["layernorm", "image", "all"]
    order = sorted(rows,
                   key=lambda n: (sets.index(n.split(":")[0]) if n.split(":")[0] in sets else 3,
                                  rows[n][0],
                                        "control" not in n, n))
    top = max(100 * float(np.mean(c)) for _, runs in rows.values() for c in runs)
    scale_max = min(100, 10 * math.ceil((top + 5) / 10))
    left, width, height, row_h = 330, 420, 40 + 24 * len(order), 24
    image = Image.new("RGB", (left + width + 20, height + 20), "white")
    pen = ImageDraw.Draw(image)
    x = lambda v: left + width * v / scale_max  # noqa: E731
    for tick in range(0, scale_max + 1, 10):
        pen.line([(x(tick), 30), (x(tick), height)], fill=(225, 225, 225))
        pen.text((x(tick) - 6, height + 4), str(tick), fill="black")
    pen.text((8, 8),
             f"{split}: {tag} group (%), a dot per seed, the bar their mean; grey: the control's "
             f"95 % interval", fill="black")
    for i, name in enumerate(order):
        y = 40 + row_h * i
        trainable, runs = rows[name]
        if trainable in bands:
            (low, high), _ = bands[trainable]
            pen.rectangle([x(low[0]), y, x(high[0]), y + row_h - 6], fill=(210, 210, 210))
        values = [100 * float(np.mean(c)) for c in runs]
        pen.text((8, y + 4), name, fill="black")
        mean = float(np.mean(values))
        pen.line([(x(mean), y), (x(mean), y + row_h - 6)], fill=(200, 30, 30), width=3)
        for v in values:
            pen.ellipse([x(v) - 3, y + 6, x(v) + 3, y + 12], fill=(30, 60, 200))
    write_atomically(file, image_bytes(image))
    return [(name, [100 * float(np.mean(c)) for c in rows[name][1]]) for name in order]


def picture_rows(results_files: list[Path], split: str, tag: str) -> dict:
    """The fine-tuned runs of the results files, by label: label → (its control's group: the
    trainable set and the epochs, [per seed: the group credit of each of the tag's examples])."""
    rows = {}
    for results_file in results_files:
        results = json.loads(Path(results_file).read_text())
        for row, seed in results["plan"]:
            records_file = Path(results_file).parent / f"{split}-{row}-seed{seed}.json"
            if row in ("clip", "diffusion") or not records_file.is_file():
                continue
            records = json.loads(records_file.read_text())["examples"]
            credits = [text_correct(r["scores"]) and image_correct(r["scores"]) for r in records
                       if r["collapsed_tag"] == tag]
            name = label(results["settings"], row)
            # the trainable set and the epochs
            group = name.split(":")[0] + name[name.rindex(" ("):]
            rows.setdefault(name, (group, []))[1].append(credits)
    if not rows:
        raise SystemExit(f"weights.toyworld.evidence: no {split} runs in "
                         f"{[str(f) for f in results_files]}")
    return rows


def main(argv=None) -> None:
    args = get_args(argv)
    if args.picture:
        split = args.splits[0] if args.splits != ["test", "new_objects"] else "val"
        for name, values in picture([Path(f) for f in args.results], Path(args.picture), split):
            print(f"{name:<45} " + " ".join(f"{v:5.1f}" for v in values))
        return
    args.world = Path(args.world or ("out/toy-quick" if args.quick else TOY_DIR))
    paths = build(args.world, quick=args.quick, models=Path(args.models))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = [(row, seed) for row in args.rows for seed in ([0] if row == "clip" else args.seeds)]
    plan.sort(key=lambda rs: rs[0] != "diffusion")  # the longest runs first
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    if args.tables_only:
        plan, done = earlier_runs(out, settings, plan)
    else:
        plan, done = save_results(out, settings, plan, run_plan(plan, args, paths, out, settings))
    print_tables(args, out, plan, done)


def run_plan(plan: list, args: argparse.Namespace, paths: dict, out: Path,
             settings: dict) -> list[dict]:
    """The runs of `plan`, --jobs at a time, each saved in results.json as it finishes; when one
    fails, those not started are cancelled, those running finish and are saved, then it raises."""
    threads, finished, failure = (1 if args.jobs > 1 else None), {}, None
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = {pool.submit(job, *rs, args, paths, out, threads): rs for rs in plan}
        for future in as_completed(runs):
            if future.cancelled():
                continue
            try:
                finished[runs[future]] = future.result()
            except BaseException as err:  # SystemExit too: a child run's own error
                failure = failure or err
                for other in runs:
                    other.cancel()
                continue
            save_results(out, settings, [runs[future]], [finished[runs[future]]])
    if failure:
        raise failure
    return [finished[rs] for rs in plan]


def get_args(argv=None) -> argparse.Namespace:
    """The command line (argv, or sys.argv): what to run, where, and the settings of its runs; a
    value out of range is argparse's one-line error."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--splits", nargs="+", choices=SPLITS, default=["test", "new_objects"],
                   help="the splits to score (choose settings on val)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="fine-tuning / noise seeds")
    p.add_argument("--rows", nargs="+", choices=ROWS,
                   default=["clip", "control", "full", "diffusion"], help="which rows to run")
    p.add_argument("--sds_weight", type=float, default=TRAIN_DEFAULTS["sds_weight"],
                   help="λ of the SDS rows")
    p.add_argument("--timesteps", type=int, default=100, help="diffusion score: timesteps per pair")
    p.add_argument("--train_flags", default="",
                   help="extra train.py flags for every fine-tuned row")
    p.add_argument("--mechanism", action="store_true",
                   help="also the probes and retention of every CLIP row, on the first of --splits")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time (each on one thread when more than 1)")
    p.add_argument("--out", default="out/toy-evidence", help="runs and results.json")
    p.add_argument("--world",
                   help="the toy world's data folder, drawn there if missing "
                   "(default: weights/toy, or out/toy-quick with --quick)")
    p.add_argument("--models", default=str(MODELS_DIR),
                   help="the toy world's models (default: the shipped ones)")
    p.add_argument("--quick", action="store_true",
                   help="the --quick world (a check of this script, not evidence)")
    p.add_argument("--tables_only", action="store_true",
                   help="no run: the tables and comparisons of the runs "
                   "already in --out's results.json (seeds run apart, say)")
    p.add_argument("--picture", help="draw this PNG from --results (no run)")
    p.add_argument("--results", nargs="+", default=[],
                   help="results.json files of earlier runs, for --picture")
    args = p.parse_args(argv)
    for flag, path in (("--out", args.out), ("--picture", args.picture)):
        if path and (reason := unsafe_out(path)):
            p.error(f"{flag} {path} {reason}")
    if args.jobs < 1:
        p.error(f"--jobs must be 1 or more; got {args.jobs}")
    if not 1 <= args.timesteps <= 1000:
        p.error(f"--timesteps must be between 1 and 1000 (SD's schedule); got {args.timesteps}")
    if not (math.isfinite(args.sds_weight) and args.sds_weight >= 0):
        p.error(f"--sds_weight must be a finite number, 0 or more; got {args.sds_weight}")
    return args


def print_tables(args: argparse.Namespace, out: Path, plan: list, done: list) -> None:
    """The settings, then per split: the table, the probes and retention (--mechanism), what each
    term sends to f_φ(x) (the first split), and each row against the control, seeds paired."""
    print(f"\nseeds {sorted({seed for _, seed in plan})}, λ = {args.sds_weight}, diffusion score "
          f"at {args.timesteps} timesteps, train.py "
          f"{' '.join(f'--{k} {v}' for k, v in TRAIN_DEFAULTS.items() if k != 'sds_weight')} "
          f"{args.train_flags}".rstrip())
    for split in args.splits:
        print(f"\n{split} split\n" + table(split, plan, done))
        if args.mechanism:
            print(f"\n{split} split: probes and retention\n" + table(split, plan, done,
                                                                     "mechanism"))
        if split == args.splits[0] and (gradients := gradient_table(out, plan)):
            print("\nwhat each term sends to f_φ(x) (train.py's log.jsonl)\n" + gradients)
        for row in sorted({row for row, _ in plan} - {"control", "clip", "diffusion"}):
            # paired runs only
            seeds = sorted(s for r, s in plan if r == row and ("control", s) in plan)
            if seeds:
                print("\n" + pooled_comparison(out, split, row, seeds))


def gradient_table(out: Path, plan: list) -> str:
    """What each loss term sent to CLIP's image embedding in every train.py run of the table
    (log.jsonl): ‖∂L_CLIP/∂f‖ and ‖∂(λ·L_SDS)/∂f‖, the mean over the first and the last tenth of the
    steps, and L_SDS."""
    lines = ["| row, seed | ‖∂L_CLIP/∂f‖ first → last tenth | ‖∂(λ·L_SDS)/∂f‖ first → last tenth | "
             "ratio (mean) | L_SDS first → last tenth |", "| --- | --- | --- | --- | --- |"]
    for row, seed in plan:
        log = out / f"{row}-seed{seed}" / "log.jsonl"
        records = [json.loads(line)
                   for line in log.read_text().splitlines()] if log.is_file() else []
        records = [r for r in records if "sds_grad_norm" in r]
        if not records:
            continue
        tenth = max(1, len(records) // 10)

        def span(key: str) -> str:
            first, last = (statistics.mean(r[key] for r in part)
                           for part in (records[:tenth], records[-tenth:]))
            return f"{first:.3g} → {last:.3g}"

        clip_mean = statistics.mean(r["clip_grad_norm"] for r in records)
        ratio = statistics.mean(r["sds_grad_norm"]
                                for r in records) / clip_mean if clip_mean else math.nan
        lines.append(f"| {row}, {seed} | {span('clip_grad_norm')} | {span('sds_grad_norm')} | "
                     f"{ratio:.3g} | {span('sds_loss')} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def save_results(out: Path, settings: dict, plan: list, done: list) -> tuple[list, list]:
    """results.json gathers the runs of every invocation with the same --out and settings (a (row,
    seed) run again replaces the earlier one), so that seeds run apart make one table; returns all
    its runs."""
    file = out / "results.json"
    # invocations running side by side take turns here
    with open(out / "results.json.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return merge_results(file, settings, plan, done)


def merge_results(file: Path, settings: dict, plan: list, done: list) -> tuple[list, list]:
    runs = {}
    if file.is_file():
        earlier = json.loads(file.read_text())
        if {k: v for k, v in earlier["settings"].items() if k in SAME} == {k: settings[k]
                                                                           for k in SAME}:
            runs = {tuple(rs): result for rs, result in zip(earlier["plan"], earlier["runs"])}
        else:
            print(f"weights.toyworld.evidence: {file} was written with other settings; it is "
                  f"replaced", file=sys.stderr)
    runs |= {tuple(rs): result for rs, result in zip(plan, done)}
    results = {"settings": settings, "train_defaults": TRAIN_DEFAULTS, "plan": list(runs),
               "runs": list(runs.values())}
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(file)
    return list(runs), list(runs.values())


# what makes runs of one table
SAME = ("sds_weight", "timesteps", "train_flags", "world", "models", "quick")


def earlier_runs(out: Path, settings: dict, plan: list) -> tuple[list, list]:
    """--tables_only: the runs of results.json in --out (written with these settings) that --rows
    and --seeds name."""
    file = out / "results.json"
    if not file.is_file():
        raise SystemExit(f"weights.toyworld.evidence: --tables_only: {file} not found; run without "
                         f"--tables_only first")
    earlier = json.loads(file.read_text())
    if {k: v for k, v in earlier["settings"].items() if k in SAME} != {k: settings[k]
                                                                       for k in SAME}:
        raise SystemExit(f"weights.toyworld.evidence: {file} was written with other settings than "
                         f"these ({', '.join(SAME)})")
    runs = {tuple(rs): result for rs, result in zip(earlier["plan"], earlier["runs"])
            if tuple(rs) in set(plan)}
    return list(runs), list(runs.values())


def pooled_comparison(out: Path, split: str, row: str, seeds: list[int]) -> str:
    """`row` against the control, each seed's examples pooled (seed s, example i → id 100,000·s + i:
    a pair is one seed's control and row on one example), overall and on the attribute swaps alone;
    the pooled files are written beside the runs, so `eval_winoground.py --compare` prints the same
    lines."""
    lines = []
    for tag in (None, "attribute"):
        files = []
        for name in ("control", row):
            examples = []
            for seed in seeds:
                records = json.loads(
                    (out / f"{split}-{name}-seed{seed}.json").read_text())["examples"]
                examples += [r | {"id": 100_000 * seed + r["id"]} for r in records
                             if tag in (None, r["collapsed_tag"])]
            files.append(out / f"pooled-{split}-{name}{'-' + tag if tag else ''}"
                               f"-seeds{'-'.join(map(str, seeds))}.json")
            write_atomically(files[-1], (json.dumps({"examples": examples}) + "\n").encode())
        what = (f"{split}, {'every example' if tag is None else tag + ' swaps'}, "
                f"seeds {seeds} pooled")
        lines.append(f"{row} against control ({what}):\n" + format_comparison(compare_runs(*files)))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
