"""Winoground on disk: the examples and their images from a local copy of facebook/winoground
(examples.jsonl + images/ or images.zip, or parquet), and the per-example credits of a run that
eval_winoground.py saved with --out, paired with another run's on the same examples."""

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from PIL import Image

from weights.images import open_image


FIELDS = {"id": int, "image_0": str, "image_1": str, "caption_0": str, "caption_1": str,
          "tag": str, "secondary_tag": str, "num_main_preds": int, "collapsed_tag": str}
# examples.jsonl names images without extension: "ex_0_img_0" → images/ex_0_img_0.png
IMAGE_EXTENSION = ".png"
# an images.zip member may inflate to this: 9 × the pixels of a 1920 × 1280 RGB image
MAX_IMAGE_FILE_BYTES = 1 << 26
METRICS = ("text", "image", "group")  # the credits of an example
# the one credit of a two-caption item (SugarCrepe, ARO): its caption scores above its negative
CHOICE = ("correct",)
BENCHMARKS = ("winoground", "sugarcrepe", "aro")  # a results file's settings.benchmark
# what a results record says of its example besides its id and scores (Winoground's tags; where a
# SugarCrepe or ARO item comes from)
TAGS = ("tag", "secondary_tag", "num_main_preds", "collapsed_tag", "file", "key", "subset")


@dataclass
class Example:
    id: int
    image_0: str  # the image's name ("ex_0_img_0"); Winoground.images() opens it
    image_1: str
    caption_0: str
    caption_1: str
    tag: str
    secondary_tag: str
    num_main_preds: int
    collapsed_tag: str


def leaves_folder(name: str) -> bool:
    """Whether a file name read from a dataset points outside the folder it is looked up in
    ("/etc/…", "../…", "C:\\…"); PureWindowsPath splits at both / and \\."""
    parts = PureWindowsPath(name)
    return bool(PurePosixPath(name).is_absolute() or parts.anchor or ".." in parts.parts)


def fetch_again(path: str | Path, hint: str) -> str:
    """What to do about a damaged or missing file under `path`: `hint` (download it again), or, for
    the toy world's drawn data (a folder above holds the build.json its build wrote), delete that
    folder and rerun, which draws it again; a download cannot fetch it."""
    for folder in Path(path).absolute().parents:
        try:
            if json.loads((folder / "build.json").read_text()).get("toy_world") is True:
                return f"delete {folder} and rerun (the toy world draws its data again)"
        except (OSError, ValueError, AttributeError):  # no build.json, or not the toy world's
            continue
    return hint


def _check_fields(record: dict, where: str) -> None:
    """The nine Winoground fields with the right types, or a ValueError naming `where`."""
    missing = [name for name in FIELDS if name not in record]
    if missing:
        raise ValueError(f"{where} lacks the field(s) {missing}; every Winoground example has "
                         f"{list(FIELDS)}")
    for name, kind in FIELDS.items():
        value = record[name]
        # parquet: {"bytes": …, "path": …}
        if name.startswith("image_") and isinstance(value, dict):
            continue
        if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
            raise ValueError(f"{where}: field {name!r} should be an integer, got {value!r}")
        if kind is str and not isinstance(value, str):
            raise ValueError(f"{where}: field {name!r} should be a string, got {value!r}")
        # an image name is looked up inside images/
        if name.startswith("image_") and leaves_folder(value):
            raise ValueError(f"{where}: {name} {value!r} is an absolute path or goes up with '..'; "
                             f"Winoground names its images like 'ex_0_img_0', files inside images/")


class Winoground:
    """The examples and their images from a local copy of facebook/winoground.

    `path` is the dataset folder or its data/ subfolder, holding examples.jsonl with images/
    (ex_0_img_0.png, …) or images.zip, or parquet files; or examples.jsonl or a .parquet file.
    Every image is checked to exist up front, so a broken copy fails before any model loads."""

    def __init__(self, path: str | Path, option: str = "--data"):
        """`option`: the command-line option that named `path`, for the messages."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"Winoground not found at {path}: it is gated on the Hugging "
                                    f"Face hub, so accept its terms at "
                                    f"https://huggingface.co/datasets/facebook/winoground, "
                                    f"then run `python weights/download.py --winoground {path} "
                                    f"--token hf_...`, or pass {option}")
        self.root, self.zip, self.image_bytes = None, None, {}
        self.redo = fetch_again(path, "download the dataset again")  # what a damaged file needs
        if path.name == "examples.jsonl":
            path = path.parent
        folder = next((f for f in (path, path / "data") if (f / "examples.jsonl").is_file()), None)
        if folder is not None:
            self.examples = self._read_jsonl(folder / "examples.jsonl")
            self._open_images(folder)
        else:
            files = ([path] if path.is_file() and path.suffix == ".parquet"
                     else sorted(path.rglob("*.parquet")))
            if not files:
                raise FileNotFoundError(f"{path} holds no examples.jsonl (nor data/examples.jsonl) "
                                        f"and no parquet files: point {option} to a copy of "
                                        f"facebook/winoground")
            self.examples = self._read_parquet(files)
        ids = [e.id for e in self.examples]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{path}: example ids repeat ({len(ids) - len(set(ids))} duplicates); "
                             f"the copy looks corrupt")

    def _read_jsonl(self, file: Path) -> list[Example]:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{file} is not UTF-8 text (byte {err.start} cannot be decoded: "
                             f"{err.reason}); {self.redo}") from None
        examples = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{file} line {number} is not valid JSON ({err})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{file} line {number} is not a JSON object")
            _check_fields(record, f"{file} line {number}")
            examples.append(Example(**{k: record[k] for k in FIELDS}))
        if not examples:
            raise ValueError(f"{file} holds no examples")
        return examples

    def _open_images(self, folder: Path) -> None:
        names = [name for e in self.examples for name in (e.image_0, e.image_1)]
        if (folder / "images").is_dir():
            self.root = folder / "images"
            missing = [n for n in names if not (self.root / self._file_name(n)).is_file()]
            where = self.root
        elif (folder / "images.zip").is_file():
            self.zip = folder / "images.zip"
            try:
                with zipfile.ZipFile(self.zip) as archive:
                    # The official zip holds images/ex_0_img_0.png …; look images up by file name
                    # only.
                    infos = {Path(i.filename).name: i for i in archive.infolist() if not i.is_dir()}
            except zipfile.BadZipFile:
                raise ValueError(f"{self.zip} is not a readable zip file; "
                                 f"{self.redo}") from None
            self.members = {name: info.filename for name, info in infos.items()}
            missing = [n for n in names if self._file_name(n) not in self.members]
            huge = [infos[f] for f in map(self._file_name, names)
                    if f in infos and infos[f].file_size > MAX_IMAGE_FILE_BYTES]
            if huge:
                raise ValueError(f"{self.zip}: {huge[0].filename} inflates to "
                                 f"{huge[0].file_size:,} bytes, more than any image file (the "
                                 f"limit is {MAX_IMAGE_FILE_BYTES:,}); {self.redo}")
            where = folder / "images.zip"
        else:
            raise FileNotFoundError(f"{folder} has examples.jsonl but neither images/ nor "
                                    f"images.zip; download the images of facebook/winoground too")
        if missing:
            raise FileNotFoundError(f"{len(missing)} image(s) of {folder / 'examples.jsonl'} not "
                                    f"found in {where}: "
                                    f"{', '.join(self._file_name(n) for n in missing[:10])}")

    def _read_parquet(self, files: list[Path]) -> list[Example]:
        try:
            import pyarrow.parquet as pq  # optional: only this layout needs it
        except ImportError:
            raise ImportError(f"{files[0]} is a parquet file and reading it needs pyarrow "
                              f"(`pip install pyarrow`); or use the examples.jsonl + images.zip "
                              f"layout of facebook/winoground") from None
        examples = []
        for file in files:
            try:
                rows = pq.read_table(file).to_pylist()
            except Exception as err:  # pyarrow raises its own error types for a bad file
                raise ValueError(f"{file} is not a readable parquet file ({err})") from None
            for number, record in enumerate(rows):
                where = f"{file} row {number}"
                _check_fields(record, where)
                fields = {k: record[k] for k in FIELDS}
                for key in ("image_0", "image_1"):
                    image = record[key]
                    if not isinstance(image, dict) or not image.get("bytes"):
                        raise ValueError(f"{where}: {key} holds no image bytes")
                    fields[key] = f"{record['id']}/{key}"
                    self.image_bytes[fields[key]] = image["bytes"]
                examples.append(Example(**fields))
        return examples

    @staticmethod
    def _file_name(name: str) -> str:
        return name if Path(name).suffix else name + IMAGE_EXTENSION

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    def image(self, name: str, size: int | None = None) -> Image.Image:
        """The decoded image; with `size` (the side the preprocessing resizes to) a large one is
        decoded reduced."""
        if name in self.image_bytes:
            source, where = io.BytesIO(self.image_bytes[name]), f"parquet image {name}"
        elif self.zip is not None:
            member = self.members[self._file_name(name)]
            where = f"{self.zip}:{member}"
            # Opened per image (it costs about a millisecond): an open ZipFile shares its file
            # position with the DataLoader's forked workers and they would read each other's bytes.
            try:
                with zipfile.ZipFile(self.zip) as archive, archive.open(member) as file:
                    # bounded: the size a zip lists can lie
                    data = file.read(MAX_IMAGE_FILE_BYTES + 1)
            except zipfile.BadZipFile as err:  # a bad CRC, say
                raise ValueError(f"{where} cannot be read ({err}); "
                                 f"{self.redo}") from None
            if len(data) > MAX_IMAGE_FILE_BYTES:
                raise ValueError(f"{where} inflates to more than {MAX_IMAGE_FILE_BYTES:,} bytes, "
                                 f"more than any image file; {self.redo}")
            source = io.BytesIO(data)
        else:
            source = where = self.root / self._file_name(name)
        try:
            return open_image(source, where, size)
        except ValueError as err:  # unreadable, or too large to decode safely
            raise ValueError(f"{err}; {self.redo}") from None

    def images(self, example: Example, size: int | None = None) -> tuple[Image.Image, Image.Image]:
        return self.image(example.image_0, size), self.image(example.image_1, size)


class ImagePairs(torch.utils.data.Dataset):
    """Example n → its two images, preprocessed, (2, 3, S, S). Served by a DataLoader so that
    decoding and resizing (Winoground's PNGs are up to 1920 × 1280, about 0.2 s each on one
    core) run in worker processes while the model works."""

    def __init__(self, data: "Winoground", examples: list[Example], transform, size: int):
        self.data, self.examples, self.transform, self.size = data, examples, transform, size

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, n: int) -> torch.Tensor:
        return torch.stack([self.transform(image)
                            for image in self.data.images(self.examples[n], self.size)])


@dataclass
class Run:
    """A run saved with --out, as --compare reads it: the data it scored (settings.data, None in a
    file without settings such as the toy world's pooled runs), its benchmark (settings.benchmark;
    "winoground" in files older than the setting) and, by example id, its credits (`metrics`:
    text, image and group, or SugarCrepe's and ARO's one) and the tags the record holds."""
    path: Path
    data: str | None
    credits: dict[int, list[bool]]
    tags: dict[int, dict]
    benchmark: str = "winoground"
    metrics: tuple = METRICS


def read_run(path: str | Path) -> Run:
    """A run saved with --out, refused unless its ids are integers and its credits true/false with
    group = text and image."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --compare takes two results files written "
                                f"with --out")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        examples, data = results["examples"], results.get("settings", {}).get("data")
        benchmark = results.get("settings", {}).get("benchmark", "winoground")
        if not isinstance(data, str | None):
            raise TypeError(f"settings.data is {data!r}, not a path")
        if benchmark not in BENCHMARKS:
            raise TypeError(f"settings.benchmark is {benchmark!r}, not one of {BENCHMARKS}")
        metrics = METRICS if benchmark == "winoground" else CHOICE
        ids = [e["id"] for e in examples]
        credits = {e["id"]: [e[key] for key in metrics] for e in examples}
        tags = {e["id"]: {key: e[key] for key in TAGS if key in e} for e in examples}
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # not this script's file
        raise ValueError(f"{path} is not a results file of eval_winoground.py --out "
                         f"({type(err).__name__}: {err})") from None
    # 1 and "1" would pair as two examples, True and 1 as one
    odd = [i for i in ids if not isinstance(i, int) or isinstance(i, bool)]
    if odd:
        raise ValueError(f"{path}: example id {odd[0]!r} is not an integer, as Winoground's ids "
                         f"are; write the file again with eval_winoground.py --out")
    flags = [credit for example in credits.values() for credit in example]
    if (not credits or len(credits) != len(examples)
            or not all(isinstance(credit, bool) for credit in flags)):
        raise ValueError(f"{path} holds no examples, repeats an example id or has credits that "
                         f"are not true/false: write it again with eval_winoground.py --out")
    # the group credit is defined as both: a file that says otherwise was edited, and its McNemar
    # counts would disagree with its own text and image columns
    wrong = [i for i, c in credits.items() if metrics == METRICS and c[2] != (c[0] and c[1])]
    if wrong:
        text, image, group = credits[wrong[0]]
        raise ValueError(f"{path}: example {wrong[0]} has group credit {group} with text {text} "
                         f"and image {image} ({len(wrong)} such examples), but group is text and "
                         f"image; score the run again with eval_winoground.py --out")
    return Run(path, data, credits, tags, benchmark, metrics)


def dataset_folder(data: str) -> Path:
    """The dataset a --data value names, however it was spelled: the folder, its data/ subfolder or
    its examples.jsonl, resolved from the current folder (where both runs usually started)."""
    path = Path(data).resolve()
    path = path.parent if path.name == "examples.jsonl" else path
    return path.parent if path.name == "data" else path


def read_pair(path_a: str | Path, path_b: str | Path) -> tuple[Run, Run]:
    """Two runs saved with --out, refused unless they scored the same examples: the same ids, the
    same tags per id and, where both files record it, the same --data. The captions are not saved;
    the path tells the toy world's test split from its val split (both number their examples
    0 … N−1), the tags tell a copy drawn or edited again behind the same path."""
    a, b = read_run(path_a), read_run(path_b)
    if a.benchmark != b.benchmark:  # their ids would coincide: both count from 0
        raise ValueError(f"{path_a} is a {a.benchmark} run and {path_b} a {b.benchmark} run: "
                         f"compare two runs of the same benchmark")
    if a.credits.keys() != b.credits.keys():
        only_a = sorted(a.credits.keys() - b.credits.keys())
        only_b = sorted(b.credits.keys() - a.credits.keys())
        raise ValueError(f"{path_a} and {path_b} score different examples ({len(only_a)} only in "
                         f"the first, e.g. ids {only_a[:5]}; {len(only_b)} only in the second, "
                         f"e.g. ids {only_b[:5]}): compare two runs on the same examples (the same "
                         f"--data and --limit)")
    if None not in (a.data, b.data) and dataset_folder(a.data) != dataset_folder(b.data):
        raise ValueError(f"{path_a} and {path_b} scored different data (--data {a.data} and "
                         f"{b.data}), whose example ids only coincide: compare two runs on the "
                         f"same --data")
    for i in sorted(a.tags):
        key = next((k for k in TAGS if k in a.tags[i] and k in b.tags[i]
                    and a.tags[i][k] != b.tags[i][k]), None)
        if key is not None:
            raise ValueError(f"{path_a} and {path_b} scored different examples under the same ids "
                             f"(example {i}'s {key} is {a.tags[i][key]!r} in the first and "
                             f"{b.tags[i][key]!r} in the second): compare two runs on the same "
                             f"--data")
    return a, b
