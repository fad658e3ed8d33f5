"""Training options, typed: a `TrainingConfig` of sections (model, data, loss, optim, stages,
val, train), each a frozen pydantic model, validated when it is built.

A run's config is a JSON file of the sections and keys it sets (the others keep their
defaults), then `section.key=value` overrides from the command line (`stages.1.crop=96`
for a stage). A key no section has, a value of the wrong type (strictly: "5" is no
integer, 1 no boolean) or out of its range is a `ConfigError` naming each bad key with
what it takes.

A run is a list of stages (the paper's two-stage recipe): each stage runs for `steps`
optimizer steps with its own clip shape, batch and LPIPS weight; the optimizer, EMA and
LR schedule run across all of them.

pydantic, a dependency already (the service's request bodies), gives the typed sections,
their defaults and errors that locate the bad key, which plain dataclasses would need a
validator written for.
"""

from __future__ import annotations

import copy
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model import NUM_TIMESTEPS, PRESETS, TIME_FACTOR, CDTConfig, Level

# The shared clips sit beside the repository (../shared), wherever it is cloned.
SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"
CROP_MULTIPLE = 16  # crops pass the U-Net's four 2x downsamplings without odd sizes


class ConfigError(ValueError):
    """A training config that does not validate: what is wrong with each bad key."""


def _clip_frames(frames: int) -> int:
    """The base model's rule; a grown model's stricter one is checked across sections
    (`TrainingConfig._frames_fit`)."""
    if frames < 1 or (frames - 1) % TIME_FACTOR:
        raise ValueError(f"must be 1+{TIME_FACTOR}k frames (1, 5, 9, ...)")
    return frames


def _crop_size(size: int) -> int:
    if size < CROP_MULTIPLE or size % CROP_MULTIPLE:
        raise ValueError(f"must be a positive multiple of {CROP_MULTIPLE}")
    return size


ClipFrames = Annotated[int, AfterValidator(_clip_frames)]
CropSize = Annotated[int, AfterValidator(_crop_size)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class Section(BaseModel):
    """A part of the config: immutable, its values taken as given (no "5" read as 5), and
    any key it does not define an error."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class LevelSpec(Section):
    """A temporal level grown on the preset (model.config.Level): 2x more time compression."""

    width: int = Field(ge=1)
    blocks: int = Field(1, ge=0)


class ModelSection(Section):
    preset: str = "tiny"
    kind: Literal["cdt", "vae"] = "cdt"
    # Temporal levels on top of the preset's 4x encoder: one for 8x, two for 16x.
    levels: tuple[LevelSpec, ...] = Field((), strict=False)  # a JSON list
    # A checkpoint directory whose weights start a new run (model and EMA): one of this
    # same model (e.g. the shipped checkpoint when the run directory that made it is
    # gone), or of the model this one was grown from (its levels but the top one), which
    # starts the top level as model/growth.py describes.
    init_from: str | None = None
    # "all" trains every weight; "top_level" only the grown top level's (model/growth.py
    # `top_level`), the rest frozen: the first stage of growing a level.
    train: Literal["all", "top_level"] = "all"

    def cdt_config(self) -> CDTConfig:
        """The network's config: the preset with this section's levels."""
        return CDTConfig.from_preset(self.preset, levels=tuple(Level(lv.width, lv.blocks) for lv in self.levels))

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, preset: str) -> str:
        if preset not in PRESETS:
            raise ValueError(f"must be one of {', '.join(map(json.dumps, sorted(PRESETS)))}")
        return preset


class DataSection(Section):
    # Inputs come from `manifest` (TSV/CSV/JSONL rows of the split, training/sources.py)
    # or, if set, from `videos` / `val_videos`: lists of video and image files or folders.
    manifest: str = str(SHARED_VIDEOS / "MANIFEST.tsv")
    videos: list[str] | None = None
    val_videos: list[str] | None = None
    # "stream": DataLoader workers decode each clip's frames (any data set size);
    # "cache": each file decoded once into a .npy in cache_dir (small sets). Same clips.
    decode: Literal["stream", "cache"] = "stream"
    cache_dir: str = "runs/_cache"
    short_side: int = Field(192, ge=CROP_MULTIPLE)  # files are seen at this short side; crops are cut from it
    max_frames: int = Field(300, ge=1)  # first frames of a video that clips come from: bounds decode time
    max_stride: int = Field(3, ge=1)  # temporal stride drawn from 1..max_stride (variable fps)
    min_region: float = Field(1.0, gt=0.0)  # smallest crop region, as a multiple of the crop size
    # Share of clips whose RGB channels are randomly reordered: widens a small set's
    # colour range (a clip of saturated blue is rare in ours) at no decode cost.
    channel_permute: Probability = 0.0
    workers: int = Field(1, ge=0)  # DataLoader workers cutting (and, streamed, decoding) clips, per rank
    decode_workers: int = Field(2, ge=1)  # processes decoding videos into the cache


class LossSection(Section):
    kl_weight: float = Field(1e-6, ge=0.0)  # on the per-item KL sum divided by pixel elements (LDM's balance)
    snr_min: float = Field(1.0, ge=0.0)
    snr_max: float = 5.0
    terminal_fraction: Probability = 0.25  # batch items trained at t=T-1 on x_T = noise_scale*eps
    # LPIPS backbone (+ optional heads) weights, by path; each stage sets its own
    # lpips_weight (eta), which needs these.
    lpips_weights: str | list[str] | None = None

    @model_validator(mode="after")
    def _snr_range(self) -> "LossSection":
        if self.snr_min > self.snr_max:
            raise ValueError(f"loss.snr_min ({self.snr_min}) must be at most loss.snr_max ({self.snr_max})")
        return self


class OptimSection(Section):
    lr: float = Field(4e-4, gt=0.0)
    min_lr: float = Field(4e-5, ge=0.0)
    warmup: int = Field(200, ge=0)
    weight_decay: float = Field(0.01, ge=0.0)
    betas: tuple[Probability, Probability] = Field((0.9, 0.99), strict=False)  # a JSON list
    grad_clip: float = Field(1.0, gt=0.0)
    ema_decay: Probability = 0.999
    accum: int = Field(1, ge=1)


class Stage(Section):
    name: str
    steps: int = Field(ge=1)
    frames: ClipFrames
    crop: CropSize
    batch: int = Field(ge=1)
    image_ratio: Probability
    lpips_weight: float = Field(ge=0.0)


class ValSection(Section):
    every: int = Field(500, ge=1)
    frames: ClipFrames = 9
    size: CropSize = 128
    max_clips: int = Field(11, ge=0)
    steps: int = Field(1, ge=1, le=NUM_TIMESTEPS)


class TrainSection(Section):
    threads: int = Field(2, ge=1)
    # autocast: true, false or "auto" (on for GPUs with bf16 tensor cores, compute capability
    # 8.0 and up; off on older GPUs and on CPUs, where it is far slower than fp32 without
    # AVX512-BF16 and can give NaN gradients: docs/results.md, 'Speed')
    bf16: bool | Literal["auto"] = "auto"
    log_every: int = Field(10, ge=1)
    ckpt_every_steps: int = Field(1000, ge=1)
    ckpt_every_minutes: float = Field(10.0, gt=0.0)


DEFAULT_STAGE = Stage(name="stage1", steps=100, frames=9, crop=64, batch=4, image_ratio=0.1, lpips_weight=0.0)


class TrainingConfig(Section):
    name: str = "run"
    seed: int = 0
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    loss: LossSection = LossSection()
    optim: OptimSection = OptimSection()
    stages: tuple[Stage, ...] = Field((DEFAULT_STAGE,), min_length=1, strict=False)  # a JSON list
    val: ValSection = ValSection()
    train: TrainSection = TrainSection()

    @model_validator(mode="after")
    def _frames_fit(self) -> "TrainingConfig":
        if self.model.train == "top_level" and not self.model.levels:
            raise ValueError("model.train \"top_level\" needs model.levels (a grown model)")
        factor = self.model.cdt_config().time_factor
        clips = [(f"stages.{i}.frames", stage.frames) for i, stage in enumerate(self.stages)]
        for key, frames in [*clips, ("val.frames", self.val.frames)]:
            if (frames - 1) % factor:
                raise ValueError(f"{key} ({frames}) must be 1+{factor}k frames for a model of {factor}x time "
                                 "compression")
        return self

    @model_validator(mode="after")
    def _stages_fit(self) -> "TrainingConfig":
        for i, stage in enumerate(self.stages):
            if stage.crop > self.data.short_side:
                raise ValueError(f"stages.{i}.crop ({stage.crop}) exceeds data.short_side ({self.data.short_side})")
            if stage.lpips_weight > 0 and not self.loss.lpips_weights:
                raise ValueError(f"stages.{i}.lpips_weight > 0 needs loss.lpips_weights (a path; nothing is "
                                 "downloaded)")
        return self

    @classmethod
    def from_data(cls, data: dict[str, Any], source: str = "training config") -> "TrainingConfig":
        """Validate a config's JSON data; ConfigError lists every bad key of `source`."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{source}: " + "; ".join(_problems(exc, cls))) from None

    def to_data(self) -> dict[str, Any]:
        """The config as JSON data, every key written out (`from_data` reads it back)."""
        return self.model_dump(mode="json")

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def stage_at(self, step: int) -> Stage:
        """The stage that optimizer step `step` (0-based) belongs to; the last one past the end."""
        end = 0
        for stage in self.stages:
            end += stage.steps
            if step < end:
                return stage
        return self.stages[-1]


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainingConfig:
    """The config of a JSON file (None: the defaults) with `section.key=value` overrides."""
    data = TrainingConfig().to_data()
    if path is not None:
        data = _merge(data, json.loads(Path(path).read_text()))
    for text in overrides:
        apply_override(data, text)
    return TrainingConfig.from_data(data, f"training config {path or '(defaults)'}"
                                    + (f" with {' '.join(overrides)}" if overrides else ""))


def _merge(base: dict, update: dict) -> dict:
    """`update` deep-merged into a copy of `base`: sections merge key by key, any other value
    (a list of stages too) replaces the base's. Validation judges the keys."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=3e-4` -> (["optim", "lr"], 0.0003); values are JSON, else strings."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override must look like section.key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.split("."), value


def apply_override(data: dict, text: str) -> None:
    """Set one value of `data` by its dotted path; list items by index (`stages.1.crop=96`)."""
    keys, value = parse_override(text)
    node: Any = data
    for depth, key in enumerate(keys):
        where = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"override {text!r}: {where}: no such item (there are {len(node)})")
            key = int(key)
        elif not isinstance(node, dict):
            raise ConfigError(f"override {text!r}: {'.'.join(keys[:depth])} holds a value, not keys")
        if depth == len(keys) - 1:
            node[key] = value
        else:
            node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]


# --- error messages ---------------------------------------------------------------------------

def _problems(error: ValidationError, root: type[BaseModel]) -> list[str]:
    """One line per bad key of `error`: the dotted key, then what is wrong with it."""
    items = error.errors()
    lines: dict[str, str] = {}
    for item in items:
        loc, kind = item["loc"], item["type"]
        if kind == "too_short" and any(other["loc"][: len(loc)] == loc != other["loc"] for other in items):
            continue  # pydantic's echo of a bad item: the item's own error says what is wrong
        if kind == "missing":  # reported on the object or list that lacks it
            loc, kind = loc[:-1], ("missing" if isinstance(loc[-1], str) else "short_list")
        key, annotation, owner = _locate(root, loc)
        if kind == "value_error" and _model_in(annotation) is not None:  # a check across a section's keys
            lines.setdefault(key, str(item["ctx"]["error"]))
            continue
        if kind == "missing":
            missing = [name for name in _model_in(annotation).model_fields
                       if any(i["type"] == "missing" and i["loc"] == (*loc, name) for i in items)]
            line = f"missing {', '.join(missing)} (its keys: {', '.join(_model_in(annotation).model_fields)})"
        elif kind == "extra_forbidden":
            where = key.rpartition(".")[0] or "the config"
            line = f"unknown config key ({where} takes {', '.join(owner.model_fields)})"
        elif kind == "value_error":
            line = f"{item['ctx']['error']}, got {_show(item['input'])}"
        elif kind.endswith("_type") or kind.startswith(("literal_", "union_")) or kind == "short_list":
            line = f"must be {_describe(annotation)}, got {_show(item['input'])}"
        elif kind == "too_short":
            line = f"needs at least {item['ctx']['min_length']} item, got {_show(item['input'])}"
        else:
            line = item["msg"].replace("Input should be", "must be", 1) + f", got {_show(item['input'])}"
        lines.setdefault(key, f"{key}: {line}" if key else line)
    return list(lines.values())


def _locate(root: type[BaseModel], loc: tuple) -> tuple[str, Any, type[BaseModel]]:
    """The dotted key of an error location, the annotation of the value there and the
    section holding it. pydantic names the union member tried after the key: not a key."""
    annotation: Any = root
    owner, keys = root, []
    for part in loc:
        model = _model_in(annotation)
        if isinstance(part, int) and typing.get_origin(annotation) in (tuple, list):
            annotation, keys = typing.get_args(annotation)[0], keys + [str(part)]
        elif model is not None:
            owner = model
            field = model.model_fields.get(part)
            keys.append(str(part))
            if field is None:
                break
            annotation = field.annotation
        else:
            break
    return ".".join(keys), annotation, owner


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", type(None): "null"}
PLURALS = {int: "integers", float: "numbers", str: "strings"}


def _describe(annotation: Any) -> str:
    """What a value of `annotation` looks like in JSON, in words."""
    choices = _choices(annotation)
    return choices[0] if len(choices) == 1 else ", ".join(choices[:-1]) + " or " + choices[-1]


def _choices(annotation: Any) -> list[str]:
    annotation = _bare(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool:
        return ["true", "false"]
    if origin is Literal:
        return [json.dumps(value) for value in args]
    if origin in (typing.Union, types.UnionType):
        return list(dict.fromkeys(choice for arg in args for choice in _choices(arg)))
    if origin in (list, tuple):
        count = f"{len(args)} " if origin is tuple and args[-1] is not Ellipsis else ""
        return [f"a list of {count}{PLURALS.get(_bare(args[0]), 'objects')}"]
    if _model_in(annotation) is not None:
        return ["an object with keys " + ", ".join(annotation.model_fields)]
    return [TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))]


def _bare(annotation: Any) -> Any:
    """The type under `Annotated`'s constraints."""
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated else annotation


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
