"""A toy compositional world in which the whole SDS-CLIP method runs on a CPU in minutes: pictures
of two coloured shapes and their captions, a small CLIP and a small Stable Diffusion trained on them
and written in the official layouts. A world for watching the method work, not a benchmark of real
CLIPs.

    world.py     the objects, scenes, captions and splits; the data's files, read back as pixels
    recipe.py    build(): the data drawn, the models checked or trained (CLIPs, VAE, UNet, …)
    teacher.py   the reader, the sampler and the checks of the small SD and CLIP
    __main__.py  python -m weights.toyworld [--check | --rebuild | --quick --out DIR]
    controls.py  python -m weights.toyworld.controls: hard-negative controls, probes, retention
    evidence.py  python -m weights.toyworld.evidence: the README's table of what the SDS term does

The names below are the ones train.py, eval_winoground.py and the tests use.
"""

from .recipe import MODELS_DIR, QUICK, TOY_DIR, TRAIN_DEFAULTS, VERSION, Recipe, build  # noqa: F401
from .recipe import check_shipped, draw_data, latent_scale, sha256, train_unet  # noqa: F401
from .teacher import caption_recall, check_teacher, placed_right, read_colours, sample  # noqa: F401
from .world import ARTICLES, CAPTIONS_PER_IMAGE, CLAUSES, COLOURS, HELD_OUT_PAIRINGS  # noqa: F401
from .world import IMAGE_SIZE, NEW_OBJECT_BLOCK, OBJECTS, PREFIXES, RELATIONAL, SHAPES  # noqa: F401
from .world import TAGS, TEST_BLOCKS, VAL_BLOCKS, Scene, TrainSet, as_pixels  # noqa: F401
from .world import clip_pixels, describe, pairings, random_scene, read_split, sheet  # noqa: F401
from .world import swap_example, to_pil, vae_pixels, write_winoground  # noqa: F401
