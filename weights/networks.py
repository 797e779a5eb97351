"""Loading and saving the networks: one pipeline for CLIP, the UNet and the VAE.

Every checkpoint takes the same road: a path or a hub id in the local Hugging Face cache
(`hub_path`) → the weights file → its safetensors tensors → the config (config.json, or the
tensor shapes for a bare file) → key sets and shapes compared with the model built from it →
NaN and infinities refused. Each step fails loudly, with one sentence that names the file and
says what to do. The networks themselves are clip.py, unet.py and vae.py; their module names
are the checkpoint keys, so the tensors load with strict=True.

- CLIP (`load_clip`): Hugging Face's layout (openai/clip-vit-*, Stable Diffusion's
  text_encoder/), and open_clip's / OpenAI's original keys renamed on load (weights/open_clip_layout.py).
- Its tokenizer files (`load_tokenizer`): vocab.json + merges.txt, or OpenAI's
  bpe_simple_vocab_16e6.txt.gz (`load_openai_tokenizer`).
- The UNet and the VAE (`load_unet`, `load_vae`): diffusers' layout, config.json +
  diffusion_pytorch_model(.fp16).safetensors.
- A whole Stable Diffusion folder (`load_stable_diffusion`), its scheduler checked
  (`check_scheduler`).
Each save_* writes the layout its load_* (and transformers / diffusers) reads, every file
atomically (`write_atomically`, which weights/runs.py uses for its files too).
"""

import contextlib
import gzip
import json
import math
import os
import reprlib
import types
import typing
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable, NamedTuple

import regex
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from clip import CLIP, EOT, LEGACY_EOS_TOKEN_ID, SOT, CLIPConfig, TextConfig, Tokenizer, VisionConfig
from clip import bytes_to_unicode
from sds import BETA_END, BETA_START, NUM_TRAIN_TIMESTEPS, StableDiffusion
from unet import CHANNELS_LAST, UNet, UNetConfig
from vae import SCALING_FACTOR, VAE, VAEConfig
from weights.open_clip_layout import HEAD_DIM, OPEN_CLIP_ACTIVATIONS, OPEN_CLIP_WEIGHTS, config_from_shapes
from weights.open_clip_layout import from_open_clip, is_open_clip

DOWNLOAD_HINT = "run `python weights/download.py` (see weights/README.md)"


# ----------------------------------------------------------------------------- every network


# A hub id, organisation/name: one slash, no leading "." or "/".
HUB_ID = regex.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What refs/main holds: a commit hash, the name of a folder in snapshots/.
HUB_COMMIT = regex.compile(r"[0-9a-f]+")


def hub_path(path: str | Path) -> Path:
    """A model path as given, or, for a hub id such as openai/clip-vit-base-patch32 that is no path
    here, its snapshot in the local Hugging Face cache: $HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub; there models--{org}--{name}/snapshots/<the commit in refs/main>,
    refused if it or a file in it leads out of models--{org}--{name}/ (its files are links into
    blobs/ there). The network is never used."""
    if Path(path).exists() or not HUB_ID.fullmatch(str(path)):
        return Path(path)
    default_home = Path("~/.cache/huggingface")
    cache = Path(os.environ.get("HF_HUB_CACHE")
                 or Path(os.environ.get("HF_HOME") or default_home) / "hub")
    repo = cache.expanduser() / f"models--{str(path).replace('/', '--')}"
    ref = repo / "refs" / "main"
    commit = ref.read_bytes()[:100].decode("utf-8", "replace").strip() if ref.is_file() else None
    if commit is not None and not HUB_COMMIT.fullmatch(commit):  # not quoted: it may be anything
        raise FileNotFoundError(f"{ref} holds something that is not a commit hash, so it names no "
                                f"snapshot; delete {repo} and download it again with "
                                f"`huggingface-cli download {path}`")
    snapshot = repo / "snapshots" / commit if commit is not None else None
    if snapshot is not None and snapshot.is_dir():
        inside = repo.resolve()
        out = next((p for p in [snapshot, *snapshot.rglob("*")]
                    if not p.resolve().is_relative_to(inside)), None)
        if out is not None:
            raise FileNotFoundError(f"{out} leads out of the Hugging Face cache (to "
                                    f"{out.resolve()}), so {path} is not loaded from it; delete "
                                    f"{repo} and download it again with `huggingface-cli download "
                                    f"{path}`")
        return snapshot
    raise FileNotFoundError(f"{path} not found, neither as a path nor as a hub id in the local "
                            f"Hugging Face cache ({repo / 'refs' / 'main'} names no snapshot) — "
                            f"download it with `huggingface-cli download {path}`, or run "
                            f"`python weights/download.py` (see weights/README.md)")


def _matches(value, kind) -> bool:
    """isinstance for the annotations of the config dataclasses: int, float, bool, str,
    tuple[X, ...] (a JSON list), unions with None."""
    if isinstance(kind, types.UnionType):
        return any(_matches(value, k) for k in typing.get_args(kind))
    if typing.get_origin(kind) is tuple:
        return isinstance(value, (list, tuple)) and all(_matches(v, typing.get_args(kind)[0])
                                                        for v in value)
    if kind is float:  # JSON writes 1.0 as 1
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:  # bool is an int to Python, not to a config
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """Names (sorted) of the tensors that hold a NaN or an infinity. A sum is NaN or infinite when
    any element is, so one fast reduction per tensor (and one device sync for all) finds the
    candidates; an exact test then clears those whose sum merely overflowed (a float16 sum past
    65504, say)."""
    names = sorted(k for k, v in state.items() if v.is_floating_point() and v.numel())
    if not names:
        return []
    sums = torch.stack([state[k].sum().float() for k in names])
    candidates = [names[i] for i in (~sums.isfinite()).nonzero().flatten().tolist()]
    return [k for k in candidates if not state[k].isfinite().all()]


def _first(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" … ({len(names)} in all)" if len(names) > limit else "")


# ----------------------------------------------------------------------------- CLIP
#
# load_clip reads a Hugging Face checkpoint (config.json + model.safetensors) as it is, and a
# CLIP in open_clip's or OpenAI's original key layout once its keys are renamed
# (weights/open_clip_layout.py). Either way the file is checked loudly before it loads: key sets, shapes,
# then NaN or infinite values. Below, in order: load_clip and save_clip, the steps of load_clip,
# open_clip_config.json, the checks of a config.json, and the tokenizer's files.


def load_clip(path: str | Path, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32, activation: str | None = None) -> CLIP:
    """Load a CLIP (or a CLIP text encoder) from a Hugging Face checkpoint folder or a .safetensors
    file, in Hugging Face's layout or in open_clip's / OpenAI's original one (a folder holding only
    open_clip_model.safetensors, as the LAION repositories do, or the file itself).

    activation: for the open_clip layout only, which does not record it: "quick_gelu" for OpenAI's
    models (open_clip's "-quickgelu" names), "gelu" for most LAION ones (see the model card).
    Without it, the folder's open_clip_config.json decides (model_cfg.quick_gelu), and without that
    the load is refused. Sizes come from the tensor shapes, heads from open_clip_config.json
    (without it: width // 64, as openai/CLIP's build_model, where no wider head also fits).
    Pickled .bin/.pt files are refused: convert them to safetensors first (the error says how)."""
    file, config_file = _find_weights(Path(path))
    state, open_clip_layout = _read_state(file, activation)
    if open_clip_layout:
        config = _open_clip_layout_config(state, file, activation)
        config_file = None  # a config.json beside it describes model.safetensors, not this file
    elif config_file is not None and config_file.is_file():
        config = _read_config_json(config_file)
    else:
        config = config_from_shapes(state, file)
    model = _build_and_load(config, state, file, config_file)
    model = model.to(device=device, dtype=dtype).eval()
    _check_finite(model, state, file, dtype)
    return model


def save_clip(model: CLIP, folder: str | Path) -> None:
    """Write model.safetensors + config.json in Hugging Face layout (loads in transformers and
    here)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_atomically(folder / "model.safetensors", save(state, metadata={"format": "pt"}))
    write_atomically(folder / "config.json",
                     (json.dumps(model.config.to_hf(), indent=2) + "\n").encode())


def write_atomically(path: str | Path, data: bytes) -> None:
    """`data` as the file `path`: a reader, a crash or a full disk sees the old file or the new one,
    never part of one (it is written beside it, then renamed over it). A link at either name is
    replaced, never written through."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # one a killed run left, or a link planted there
    try:
        # O_EXCL: a name that exists again, a link included, is an error rather than followed
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# ---- the steps of load_clip


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
CONVERT_HINT = ("convert it once where open_clip is installed: "
                "`model = open_clip.create_model(ARCH, pretrained=FILE)`, then "
                "`safetensors.torch.save_file(model.state_dict(), 'open_clip_model.safetensors')`, "
                "and load that file (see weights/README.md)")


def _find_weights(path: Path) -> tuple[Path, Path | None]:
    """The safetensors file to read and the config.json that may describe it (None for a file)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found — {DOWNLOAD_HINT}")
    if path.is_dir():
        file, config_file = path / "model.safetensors", path / "config.json"
    else:
        file, config_file = path, None
    if path.is_dir() and not file.is_file() and (path / "model.fp16.safetensors").is_file():
        file = path / "model.fp16.safetensors"  # the half-precision variant (`download.py --fp16`)
    if path.is_dir() and not file.is_file():  # open_clip's file, as the LAION repositories hold it
        file = next((path / name for name in OPEN_CLIP_WEIGHTS if (path / name).is_file()), file)
    if file.suffix in PICKLE_SUFFIXES:
        raise ValueError(f"{file} is a pickled PyTorch file, which this loader never opens "
                         f"(unpickling runs whatever code the file carries); {CONVERT_HINT}")
    if not file.is_file():
        pickles = (path / "pytorch_model.bin", path / "open_clip_pytorch_model.bin")
        pickled = [p.name for p in pickles if p.exists()]
        extra = (f" (this loader reads safetensors only, never pickled files such as {pickled[0]})"
                 if pickled else "")
        raise FileNotFoundError(f"{file} not found{extra} — {DOWNLOAD_HINT}")
    return file, config_file


def _read_state(file: Path, activation: str | None) -> tuple[dict[str, torch.Tensor], bool]:
    """The file's tensors under our (Hugging Face's) names, and whether they came in open_clip's
    layout."""
    try:
        state = load_file(file)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file} is not a readable safetensors file ({err}); it may be truncated "
                         f"or corrupt — download it again") from None
    # Dropped on purpose: older files store the position_ids buffers; they are always arange(n).
    state = {k: v for k, v in state.items() if not k.endswith("embeddings.position_ids")}
    # transformers 5 saves a bare text encoder without the `text_model.` prefix of the hub's files.
    if "embeddings.token_embedding.weight" in state:
        state = {f"text_model.{k}": v for k, v in state.items()}
    open_clip_layout = is_open_clip(state)
    if open_clip_layout:
        state = from_open_clip(state)
    elif activation is not None:
        raise ValueError(f"{file} is in Hugging Face's layout, whose config names its own "
                         f"activation; activation= is for files in open_clip's layout only — leave "
                         f"it out")
    if "text_model.embeddings.token_embedding.weight" not in state:
        raise ValueError(f"{file} is not a CLIP checkpoint: it has no "
                         f"text_model.embeddings.token_embedding.weight (its first keys: "
                         f"{_first(sorted(state), 5)})")
    return state, open_clip_layout


def _open_clip_layout_config(state: dict[str, torch.Tensor], file: Path,
                             activation: str | None) -> CLIPConfig:
    """The config of a file in open_clip's layout: sizes from its shapes, heads and activation from
    the open_clip_config.json beside it, or `activation` (which wins)."""
    config_activation, heads = _open_clip_config(file.parent)
    activation = activation or config_activation
    if activation not in OPEN_CLIP_ACTIVATIONS:
        given = (f"activation={activation!r} is not supported" if activation
                 else "no activation was given")
        raise ValueError(f"{file} is in open_clip's layout, which does not record its activation, "
                         f"and {given}: pass activation='quick_gelu' (OpenAI's models) or 'gelu' "
                         f"(most LAION ones; the model card says which) to load_clip, or keep the "
                         f"file beside the open_clip_config.json it came with")
    config = config_from_shapes(state, file, open_clip=True, heads=heads)
    if heads is not None:
        _check_heads(config, file.parent / "open_clip_config.json")
    config.text.hidden_act = activation
    if config.vision is not None:
        config.vision.hidden_act = activation
    # open_clip pools the caption at argmax(ids) (its EOT, 49407, is the largest id); our pooling
    # (and transformers', for a config saved by save_clip) does exactly that for this legacy id.
    config.text.eos_token_id = LEGACY_EOS_TOKEN_ID
    return config


def _read_config_json(config_file: Path) -> CLIPConfig:
    """The CLIPConfig a Hugging Face config.json describes, its head counts checked."""
    try:
        config = clip_config_from_hf(json.loads(config_file.read_text(encoding="utf-8")))
    except ValueError as err:  # JSON and UTF-8 errors are ValueErrors too
        raise ValueError(f"{config_file} is not a valid CLIP config.json ({err}); fix it or "
                         f"download it again") from None
    _check_heads(config, config_file)
    return config


def _build_and_load(config: CLIPConfig, state: dict[str, torch.Tensor], file: Path,
                    config_file: Path | None) -> CLIP:
    """CLIP(config) with the file's tensors, once key sets and shapes are checked to match."""
    with torch.device("meta"):  # no memory, no random init: every tensor comes from the file
        model = CLIP(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{file} does not match its config "
                         f"({config_file or 'derived from the tensor shapes'}): missing keys "
                         f"[{_first(missing)}], unexpected keys [{_first(unexpected)}]")
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(s)})" for k, s in expected.items()
             if state[k].shape != s]
    if wrong:
        raise ValueError(f"{file} has tensors of the wrong shape for its config: {_first(wrong)}")
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _check_finite(model: torch.nn.Module, state: dict[str, torch.Tensor], file: Path,
                  dtype: torch.dtype) -> None:
    """Refuse NaN or infinite values: checked where the tensors now are (on a GPU it takes
    milliseconds), and only then against the file, to tell a damaged file from values that
    overflow `dtype`."""
    bad = _non_finite(model.state_dict())
    if bad and _non_finite({k: state[k] for k in bad}):
        raise ValueError(f"{file} holds NaN or infinite values in {len(bad)} tensor(s) "
                         f"[{_first(bad)}]; the file is damaged or was saved from a run that "
                         f"diverged — download it again or use an earlier checkpoint")
    if bad:
        raise ValueError(f"{file} has values beyond the range of {dtype} in {len(bad)} tensor(s) "
                         f"[{_first(bad)}]; load it in torch.float32 or torch.bfloat16")


def _open_clip_config(folder: Path) -> tuple[str | None, tuple[int, int] | None]:
    """What open_clip_config.json beside an open_clip file (the hub's LAION folders have one) says
    and its tensors do not, read as open_clip builds the model: the activation (QuickGELU exactly
    when model_cfg.quick_gelu is true), and (text_cfg.heads, vision_cfg.head_width), 8 and 64 where
    absent. (None, None) without the file."""
    config_file = folder / "open_clip_config.json"
    if not config_file.is_file():
        return None, None
    try:
        model_cfg = json.loads(config_file.read_text(encoding="utf-8"))["model_cfg"]
        values = {
            "quick_gelu": model_cfg.get("quick_gelu", False),
            "text_cfg.heads": model_cfg.get("text_cfg", {}).get("heads", 8),
            "vision_cfg.head_width": model_cfg.get("vision_cfg", {}).get("head_width", HEAD_DIM),
        }
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{config_file} is not a valid open_clip config (model_cfg, text_cfg and "
                         f"vision_cfg must be objects: {err!r}); fix it, remove it and pass "
                         f"activation=..., or download it again") from None
    for key, value in values.items():
        quick = key == "quick_gelu"
        if not (isinstance(value, bool) if quick else _matches(value, int) and value > 0):
            raise ValueError(f"{config_file}: model_cfg.{key} is {value!r}, which is not "
                             f"{'true or false' if quick else 'a positive integer'}; fix it")
    heads = (values["text_cfg.heads"], values["vision_cfg.head_width"])
    return "quick_gelu" if values["quick_gelu"] else "gelu", heads


# ---- the checks of a config.json


def _from_dict(cls, values: dict | None, override: dict | None = None, prefix: str = ""):
    known = {f.name for f in fields(cls)}
    for key, part in [(prefix, values), (prefix + "_dict", override)]:
        if part is not None and not isinstance(part, dict):
            raise ValueError(f"{key} is a JSON {type(part).__name__}, not an object")
    merged = {k: v for k, v in (values or {}).items() if k in known}
    # older files' `*_config_dict`: with the defaults, it replaces `*_config`
    if override is not None:
        merged.update(asdict(cls()) | {k: v for k, v in override.items() if k in known})
    _check_types(cls, merged, prefix + "." if prefix else "")
    return cls(**merged)


def _check_types(cls, values: dict, prefix: str = "") -> None:
    """A ValueError naming the first value whose type is not its dataclass field's ("2" for an
    int)."""
    for f in fields(cls):
        if f.name in values and not _matches(values[f.name], f.type):
            kind = getattr(f.type, "__name__", str(f.type))  # "int", or "int | None"
            raise ValueError(f"{prefix}{f.name} is {values[f.name]!r}, which is not of type {kind}")


def _check_heads(config: CLIPConfig, config_file: Path) -> None:
    """Attention splits the width into equal heads: refuse a config where it cannot, before any
    forward."""
    for name, tower in [("text_config", config.text), ("vision_config", config.vision)]:
        if tower is not None and (tower.num_attention_heads < 1
                                  or tower.hidden_size % tower.num_attention_heads):
            raise ValueError(f"{config_file}: {name} has num_attention_heads "
                             f"{tower.num_attention_heads}, which does not divide hidden_size "
                             f"{tower.hidden_size}; fix it or download it again")


def clip_config_from_hf(config: dict) -> CLIPConfig:
    """Read a Hugging Face config.json: a CLIPModel's, or a CLIPTextModel's (flat). A value of
    the wrong type raises a ValueError that names its key."""
    if not isinstance(config, dict):
        raise ValueError(f"it holds a JSON {type(config).__name__}, not an object")
    if config.get("model_type") == "clip_text_model":
        return CLIPConfig(text=_from_dict(TextConfig, config), projection_dim=None)
    top = {"projection_dim": config.get("projection_dim", 512),
           "logit_scale_init_value": config.get("logit_scale_init_value", 2.6592)}
    _check_types(CLIPConfig, top)
    return CLIPConfig(
        text=_from_dict(TextConfig, config.get("text_config"), config.get("text_config_dict"),
                        "text_config"),
        vision=_from_dict(VisionConfig, config.get("vision_config"),
                          config.get("vision_config_dict"), "vision_config"),
        **top,
    )


# ---- the tokenizer's files


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A folder with vocab.json + merges.txt (Hugging Face), or OpenAI's
    bpe_simple_vocab_16e6.txt.gz."""
    path = Path(path)
    if (path.is_dir() and not (path / "vocab.json").exists()
            and (path / "bpe_simple_vocab_16e6.txt.gz").exists()):
        path = path / "bpe_simple_vocab_16e6.txt.gz"
    if path.suffix == ".gz":
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        return load_openai_tokenizer(path)
    for name in ("vocab.json", "merges.txt"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} not found: a CLIP tokenizer needs "
                                    f"vocab.json and merges.txt — {DOWNLOAD_HINT}")
    encoder = _vocab(path / "vocab.json")
    lines = (path / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    return Tokenizer(encoder, merges, _pad_id(path, encoder))


def _vocab(file: Path) -> dict[str, int]:
    """vocab.json: {token: id} with ids from 0 to its size − 1 and both special tokens, or one
    ValueError."""
    try:
        vocab = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as err:  # JSON and UTF-8 errors
        raise ValueError(f"{file} is not valid JSON ({err}); download the tokenizer "
                         f"again") from None
    if not isinstance(vocab, dict):
        problem = f"holds a JSON {type(vocab).__name__}, not an object of token → id"
    elif bad := [t for t, i in vocab.items() if not _matches(i, int) or not 0 <= i < len(vocab)]:
        problem = (f"gives {bad[0]!r} the id {vocab[bad[0]]!r}, not an integer from 0 to "
                   f"{len(vocab) - 1}")
    elif missing := [t for t in (SOT, EOT) if t not in vocab]:
        problem = f"has no {missing[0]} token"
    else:
        return vocab
    raise ValueError(f"{file} {problem}; fix it or download the tokenizer again")


def _pad_id(folder: Path, encoder: dict[str, int]) -> int | None:
    """The id of `pad_token` in tokenizer_config.json, overridden by special_tokens_map.json as
    transformers does; a string or an AddedToken-style {"content": "!"}. None when neither file
    names one."""
    pad = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = folder / name
        if file.is_file():
            try:
                value = json.loads(file.read_text(encoding="utf-8")).get("pad_token", pad)
            except (ValueError, AttributeError):  # not JSON, or not a JSON object
                raise ValueError(f"{file} is not a JSON object; fix it or download it "
                                 f"again") from None
            pad = value.get("content") if isinstance(value, dict) else value
            if pad is not None and not isinstance(pad, str):
                raise ValueError(f"{file} gives pad_token as {pad!r}, not a string; fix it or "
                                 f"download the tokenizer again")
            if pad is not None and pad not in encoder:
                raise ValueError(f"{file} names pad_token {pad!r}, which is not in "
                                 f"{folder / 'vocab.json'}; fix it or download the tokenizer "
                                 f"again")
    return None if pad is None else encoder[pad]


def load_openai_tokenizer(path: str | Path) -> Tokenizer:
    """OpenAI's file lists merges only; the vocabulary is 256 bytes, the same with </w>, one
    token per merge (48,894 of them) and the two special tokens, in that order."""
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 48894 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + [SOT, EOT]
    return Tokenizer({t: i for i, t in enumerate(vocab)}, merges)


# ----------------------------------------------------------------------------- the UNet and the VAE
#
# Stable Diffusion's unet/ and vae/ folders in diffusers' layout: config.json +
# diffusion_pytorch_model(.fp16).safetensors, or a bare .safetensors file (the SD 1.x design).
# One pipeline for both; a _Part says what differs.


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
FP16_WEIGHTS_NAME = "diffusion_pytorch_model.fp16.safetensors"  # diffusers' "fp16" variant
# config.json fields that select designs other than SD 1.x / 2.x (SDXL, class-conditioned, ...),
# with the only value unet.py implements. Fields not listed here and not in UNetConfig do not
# change the computation at inference (dropout, upcast_attention: SDPA accumulates in fp32 anyway).
REQUIRED_VALUES = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None, "num_attention_heads": None,
    "only_cross_attention": False, "mid_block_only_cross_attention": None,
    "dual_cross_attention": False, "class_embed_type": None, "num_class_embeds": None,
    "addition_embed_type": None, "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None, "class_embeddings_concat": False,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "mid_block_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "attention_type": "default", "cross_attention_norm": None,
}
DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
# Files saved by diffusers before 0.14 name the VAE's mid-block attention's linear layers
# query/key/value/proj_attn; diffusers renames them on load, and so do we.
LEGACY_ATTENTION_NAMES = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.",
                          "proj_attn.": "to_out.0."}


def load_unet(path, device="cpu", dtype=torch.float32) -> UNet:
    """Load a diffusers-format UNet: the unet/ folder (config.json + safetensors) or a bare
    .safetensors file."""
    return _load_part(UNET_PART, Path(path), device, dtype)


def load_vae(path, device="cpu", dtype=torch.float32) -> VAE:
    """Load a diffusers-format VAE: the vae/ folder (config.json + safetensors) or a bare
    .safetensors file."""
    return _load_part(VAE_PART, Path(path), device, dtype)


def save_unet(model: UNet, folder) -> None:
    """Write config.json + diffusion_pytorch_model.safetensors in diffusers' layout
    (UNet2DConditionModel and load_unet read it)."""
    config = {"_class_name": "UNet2DConditionModel", **asdict(model.config), "act_fn": "silu",
              "mid_block_type": "UNetMidBlock2DCrossAttn"}
    _save_part(model, folder, config)


def save_vae(model: VAE, folder) -> None:
    """Write config.json + diffusion_pytorch_model.safetensors in diffusers' layout (AutoencoderKL
    and load_vae read it): one DownEncoderBlock2D / UpDecoderBlock2D per entry of
    block_out_channels."""
    n = len(model.config.block_out_channels)
    config = {"_class_name": "AutoencoderKL", **asdict(model.config), "act_fn": "silu",
              "down_block_types": ["DownEncoderBlock2D"] * n,
              "up_block_types": ["UpDecoderBlock2D"] * n}
    _save_part(model, folder, config)


def load_unet_config(file: Path) -> UNetConfig:
    """The config.json of a Stable Diffusion 1.x/2.x UNet2DConditionModel, or one ValueError that
    names the file, the field and what to do."""
    raw = _read_config(file, "UNet")
    for field, wanted in REQUIRED_VALUES.items():
        value = raw.get(field, wanted)
        # per-block lists must hold the value throughout
        values = value if isinstance(value, list) else [value]
        if any(v != wanted for v in values):
            raise ValueError(f"{file} sets {field} = {value!r}, which unet.py does not implement "
                             f"(it needs {wanted!r}: the Stable Diffusion 1.x/2.x "
                             "UNet2DConditionModel; SDXL and class-conditioned UNets are not "
                             "supported).")
    config = UNetConfig(**_typed_values(UNetConfig, raw, file))
    _check_blocks(config, raw, file)
    for name in ("block_out_channels", "down_block_types", "up_block_types"):
        setattr(config, name, tuple(getattr(config, name)))
    return config


def load_vae_config(file: Path) -> VAEConfig:
    """The config.json of a Stable Diffusion 1.x AutoencoderKL, or one ValueError that names the
    file, the field and what to do."""
    raw = _read_config(file, "VAE")
    # Other block types or a missing quant conv show up as unexpected or missing keys when
    # loading; the activation does not, so it is checked here.
    if raw.get("act_fn", "silu") != "silu":
        raise ValueError(f"{file} describes a {raw.get('_class_name', 'AutoencoderKL')} with "
                         f"act_fn {raw['act_fn']}; vae.py implements the Stable Diffusion 1.x "
                         f"AutoencoderKL (SiLU).")
    config = VAEConfig(**_typed_values(VAEConfig, raw, file))
    config.block_out_channels = tuple(config.block_out_channels)
    _check_widths(config, file)
    # 0 would make every latent 0
    if not (math.isfinite(config.scaling_factor) and config.scaling_factor > 0):
        raise ValueError(f"{file} sets scaling_factor = {config.scaling_factor!r}, which must be a "
                         f"positive finite number (SD 1.x: {SCALING_FACTOR}); fix it or "
                         f"{DOWNLOAD_HINT} to fetch it again.")
    return config


class _Part(NamedTuple):
    """What differs between loading the UNet and the VAE."""

    name: str  # "UNet" or "VAE", as the messages say it; its folder is name.lower()
    build: Callable  # the network, from its config
    design: Callable  # its config class, whose defaults are the SD 1.x design (a bare file's)
    read_config: Callable[[Path], object]  # config.json → config
    foreign: str  # said when the file holds none of its keys
    folder: str  # what to point to instead
    renames: dict[str, str]  # old key fragments of its attention → ours


UNET_PART = _Part("UNet", UNet, UNetConfig, load_unet_config,
                  " (it holds no UNet weights: is it a VAE or CLIP file?)",
                  "a Stable Diffusion unet/ folder", {})
VAE_PART = _Part("VAE", VAE, VAEConfig, load_vae_config,
                 " (no diffusers-format VAE weights: a UNet or CLIP file?)",
                 "a Stable Diffusion 1.x vae/ folder", LEGACY_ATTENTION_NAMES)


def _load_part(part: _Part, path: Path, device, dtype):
    """hub path → file → safetensors → config → keys and shapes → finite, for the UNet or the VAE."""
    config, file, described = _config_and_weights(part, path)
    try:
        state_dict = load_file(file)
    except Exception as err:  # safetensors has its own error types for a bad header or a short file
        raise ValueError(f"{file} is not a readable safetensors file ({err}); it may be truncated "
                         f"or corrupt, {DOWNLOAD_HINT} to fetch it again.") from None
    for old, new in part.renames.items():
        state_dict = {k.replace(".attentions.0." + old, ".attentions.0." + new): v
                      for k, v in state_dict.items()}
    with torch.device("meta"):  # shapes only; the real tensors come from the file
        model = part.build(config)
    _check_keys_and_shapes(part, model, state_dict, file, described)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype, memory_format=CHANNELS_LAST).eval()
    _check_finite(model, state_dict, file, dtype)
    return model


def _config_and_weights(part: _Part, path: Path) -> tuple[object, Path, str]:
    """The config, the weights file and, for messages, what the weights must match: a unet/ or
    vae/ folder's config.json, or for a bare file the SD 1.x design."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; {DOWNLOAD_HINT} to fetch the Stable Diffusion "
                                f"weights.")
    if not path.is_dir():  # a bare file: the SD 1.x design, checked against the tensors
        described = (f"the SD 1.x {part.name} (assumed for a bare file; pass its folder to use its "
                     "config.json)")
        return part.design(), path, described
    subfolder = path / part.name.lower()
    if subfolder.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'} not found: for a Stable Diffusion folder, "
                                f"pass {subfolder}.")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'} not found; {DOWNLOAD_HINT} to fetch it.")
    config = part.read_config(path / "config.json")
    names = (WEIGHTS_NAME, FP16_WEIGHTS_NAME)
    file = next((path / name for name in names if (path / name).is_file()), None)
    if file is None:
        raise FileNotFoundError(f"{path} holds neither {WEIGHTS_NAME} nor {FP16_WEIGHTS_NAME}; "
                                f"{DOWNLOAD_HINT}.")
    return config, file, f"the {part.name} that {path / 'config.json'} describes"


def _check_keys_and_shapes(part: _Part, model: torch.nn.Module, state_dict: dict[str, torch.Tensor],
                           file: Path, described: str) -> None:
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    missing, unexpected = expected.keys() - state_dict.keys(), state_dict.keys() - expected.keys()
    if missing or unexpected:
        hint = "" if missing != expected.keys() else part.foreign
        problems = " and ".join(f"{len(keys)} {kind} keys [{_first(sorted(keys))}]"
                                for kind, keys in [("missing", missing), ("unexpected", unexpected)]
                                if keys)
        raise ValueError(f"{file} does not match {described}{hint}: {problems}; "
                         f"point to {part.folder} or {DOWNLOAD_HINT}.")
    wrong = [f"{k} {tuple(state_dict[k].shape)} ≠ {shape}" for k, shape in expected.items()
             if tuple(state_dict[k].shape) != shape]
    if wrong:
        raise ValueError(f"{file} has {len(wrong)} tensors of the wrong shape for {described}: "
                         f"[{_first(sorted(wrong))}]; check config.json or {DOWNLOAD_HINT}.")


def _save_part(model: torch.nn.Module, folder, config: dict) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomically(folder / WEIGHTS_NAME, save(state, metadata={"format": "pt"}))


# ---- the checks of a diffusers config.json


def _read_config(file: Path, name: str) -> dict:
    """The JSON object in `file`, which must describe the `name` ("UNet" or "VAE")."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{file} is not readable JSON ({err}); {DOWNLOAD_HINT} to fetch it "
                         f"again.") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file} holds a JSON {type(raw).__name__}, not an object; "
                         f"{DOWNLOAD_HINT} to fetch it again.")
    other = _other_model(raw, name)
    if other:
        folder = name.lower()
        sibling = file.parent.parent / folder
        raise ValueError(f"{file} describes {other}, not a {name}; pass the {folder}/ folder of a "
                         f"Stable Diffusion checkpoint{f' ({sibling})' if sibling.is_dir() else ''}.")
    return raw


def _other_model(raw: dict, name: str) -> str | None:
    """What a config.json that is not the `name`'s ("UNet": a UNet2DConditionModel, "VAE": an
    AutoencoderKL) describes, in words (None when it is one)."""
    if "model_type" in raw:  # a transformers config: SD's text_encoder/, or a CLIP
        kinds = {"clip_text_model": "a CLIP text encoder (transformers' CLIPTextModel)",
                 "clip": "a CLIP model"}
        return kinds.get(str(raw["model_type"]),
                         f"a transformers model of type {raw['model_type']!r}")
    if name == "UNet":  # another diffusers class than a VAE: REQUIRED_VALUES names it
        return "a VAE (AutoencoderKL)" if raw.get("_class_name") == "AutoencoderKL" else None
    class_name = raw.get("_class_name", "AutoencoderKL")
    if class_name == "AutoencoderKL":
        return None
    return f"a {class_name}" + (" (the denoising UNet)" if "UNet" in class_name else "")


def _typed_values(cls, raw: dict, file: Path) -> dict:
    """The fields of the config dataclass `cls` that config.json sets (not to null), each of its
    field's type."""
    values = {f.name: raw[f.name] for f in fields(cls) if raw.get(f.name) is not None}
    for f in fields(cls):
        if f.name in values and not _matches(values[f.name], f.type):
            # "int", "tuple[int, ...]"
            kind = f.type.__name__ if isinstance(f.type, type) else str(f.type)
            raise ValueError(f"{file} sets {f.name} = {values[f.name]!r}, which is not of type "
                             f"{kind}; fix it or {DOWNLOAD_HINT} to fetch it again.")
    return values


def _check_widths(config: UNetConfig | VAEConfig, file: Path) -> None:
    if not config.block_out_channels:
        raise ValueError(f"{file} sets block_out_channels = [], which must list at least one "
                         f"width; fix it or {DOWNLOAD_HINT} to fetch it again.")


def _check_blocks(config: UNetConfig, raw: dict, file: Path) -> None:
    """Refuse block lists unet.py does not build, and heads that do not divide a block's width."""
    _check_widths(config, file)
    checks = {
        "down_block_types": all(b in DOWN_BLOCK_TYPES for b in config.down_block_types),
        "up_block_types": all(b in UP_BLOCK_TYPES for b in config.up_block_types),
        "attention_head_dim": len(config.heads) == len(config.block_out_channels),
    }
    for field, ok in checks.items():
        if not ok:
            raise ValueError(f"{file} sets {field} = {raw[field]!r}, which unet.py does not "
                             "implement (the Stable Diffusion 1.x/2.x UNet2DConditionModel).")
    # Each attention splits its block's width into equal heads: check every block that has one
    # (down i, up i, which uses the heads of down block −1−i, and the mid block, the last's).
    widths, heads = config.block_out_channels, config.heads
    used = [i for i, kind in enumerate(config.down_block_types) if kind.startswith("CrossAttn")]
    used += [len(widths) - 1 - i for i, kind in enumerate(config.up_block_types)
             if kind.startswith("CrossAttn")]
    for i in sorted({*used, len(widths) - 1}):
        if heads[i] < 1 or widths[i] % heads[i]:
            raise ValueError(f"{file} gives block {i} (width {widths[i]}) {heads[i]} attention "
                             f"heads (attention_head_dim), which do not divide its width; fix it "
                             f"or {DOWNLOAD_HINT}.")


# ----------------------------------------------------------------------------- Stable Diffusion


def load_stable_diffusion(path: str | Path, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32) -> StableDiffusion:
    """The VAE, UNet, text encoder and tokenizer of a Stable Diffusion 1.x or 2.x-base folder in
    diffusers' layout (or its hub id in the local Hugging Face cache), its scheduler checked."""
    path = hub_path(path)  # a hub id: its snapshot in the local Hugging Face cache
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found: --sd takes a Stable Diffusion 1.x or 2.x-base "
                                f"folder in diffusers layout — {DOWNLOAD_HINT}")
    missing = [name for name in ("vae", "unet", "text_encoder", "tokenizer")
               if not (path / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{path} lacks the subfolder(s) {missing} of a diffusers Stable "
                                f"Diffusion folder — {DOWNLOAD_HINT}")
    check_scheduler(path)  # an ε-prediction model with SD's noise schedule
    return StableDiffusion(vae=load_vae(path / "vae", device, dtype),
                           unet=load_unet(path / "unet", device, dtype),
                           text_encoder=load_clip(path / "text_encoder", device, dtype),
                           tokenizer=load_tokenizer(path / "tokenizer"))


def check_scheduler(sd_folder: str | Path) -> None:
    """Refuse a Stable Diffusion folder whose scheduler/scheduler_config.json describes another
    training than sds.NoiseSchedule and the ε-losses assume (no such file: SD's own is assumed).
    The 768-pixel SD 2.x models are trained with prediction_type "v_prediction": their UNet outputs
    v = √ᾱ_t ε − √(1−ᾱ_t) z_0, not ε, so ‖ε_θ − ε‖² would be measured against the wrong target."""
    file = Path(sd_folder) / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        return
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except ValueError:  # JSON and UTF-8 errors
        config = None
    if not isinstance(config, dict):
        raise ValueError(f"{file} is not a JSON object; fix it or download it again")
    # diffusers' default, and what SD 1.x's files omit
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(f"{file} says prediction_type {prediction!r}: the SDS loss and the "
                         f"diffusion score need a UNet that predicts the noise ε (SD 1.x, SD "
                         f"2.x-base such as stabilityai/stable-diffusion-2-1-base), not a "
                         f"v-prediction model")
    # Zero-terminal-SNR rescaling and hand-given betas would change ᾱ_t too.
    expected = {"num_train_timesteps": NUM_TRAIN_TIMESTEPS, "beta_start": BETA_START,
                "beta_end": BETA_END, "beta_schedule": "scaled_linear",
                "rescale_betas_zero_snr": False, "trained_betas": None}
    wrong = [f"{key} {reprlib.repr(config[key])} (expected {value!r})"
             for key, value in expected.items() if key in config and config[key] != value]
    if wrong:
        raise ValueError(f"{file} has {', '.join(wrong)}, but NoiseSchedule is Stable Diffusion's "
                         f"training schedule; this model was trained with another one")
