"""A toy compositional world in which the whole SDS-CLIP method runs on a CPU in minutes.

Pictures of two coloured shapes side by side or one above the other ("a red circle to the
left of a blue square"), captioned by a small grammar; a small CLIP and a small Stable
Diffusion trained from scratch on them with this project's own modules and written in the
official layouts, so that train.py and eval_winoground.py read them exactly as they read
downloaded weights. It is a world for watching the method work and for measuring what the
SDS term does beside a control; it is not a benchmark of real CLIPs.

    python -m weights.toyworld                # draw the data (≈ 15 s) beside the shipped models
    python -m weights.toyworld --check        # … and print the teacher's checks (≈ 25 min)
    python -m weights.toyworld --rebuild      # train every model from scratch (≈ 50 min), then check
    python -m weights.toyworld --quick --out DIR  # a small functional build in a minute (tests)
    python train.py --toy                     # draws the data if missing, then runs SDS-CLIP on it

The trained models ship in weights/toy-models/ (clip/, sd/ and models.json: the recipe, the
sha256 of every file, torch's version, each phase's time and the checks), made by
`--rebuild --seed 0`. The data is drawn again, deterministically, into weights/toy/data/:
    train/              MS-COCO 2017 layout: train2017/*.png + annotations/captions_train2017.json
    val/, test/         Winoground layout (examples.jsonl + images/): the main splits
    test-new-objects/   Winoground layout: the harder second split
and scenes.json in each, the ground truth of every image (the objects and their places).

Like Winoground, the main splits ask about familiar things in new arrangements. Every object
(a colour–shape pair) of val and test is seen in training; what is new is the pairing: which
two objects appear together. The pairings of val and test never occur in training, so neither
image of an example has been seen. Each example holds two images and two captions with the
same words in a different order: the colours swapped between the two objects ("attribute",
binding), the objects swapped around the relation ("object"), or the relation words swapped
between the objects ("relation"). The second split, test-new-objects, asks the same about
four objects that never occur in training at all.
"""

import argparse
import json
from pathlib import Path

from .recipe import MODELS_DIR, TOY_DIR, build, unsafe_out, write_json
from .teacher import check_teacher, samples_sheet

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m weights.toyworld", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(TOY_DIR),
                        help="where the data is drawn (default: weights/toy)")
    parser.add_argument("--models", default=str(MODELS_DIR),
                        help="the models' folder (default: weights/toy-models)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the data and every model's training")
    parser.add_argument("--rebuild", action="store_true",
                        help="train every model from scratch into --models")
    parser.add_argument("--check", action="store_true",
                        help="print the teacher's checks (after --rebuild: always)")
    parser.add_argument("--quick", action="store_true",
                        help="a small functional build in a minute (tests)")
    args = parser.parse_args(argv)
    if reason := unsafe_out(args.out):
        parser.error(f"--out {args.out} {reason}")
    paths = build(Path(args.out), args.seed, args.quick, args.rebuild, Path(args.models))
    if args.check or args.rebuild:
        checks = check_teacher(paths)
        if args.rebuild:  # the checks of the models as trained, beside their recipe
            record = Path(paths["clip"]).parent / "models.json"
            write_json(record, {**json.loads(record.read_text()), "checks": checks})
            samples_sheet(paths, Path(paths["clip"]).parent / "samples.png")


if __name__ == "__main__":
    main()
