"""The models a replica serves, by name: where each comes from (`CDT_MODELS`, else
`CDT_CHECKPOINT` alone), and the `Catalog` the routes and sessions resolve a request's
`model` in (an unknown name: 404 `model_not_found`; none: the default, the first).

A served model is known by its name (what `model=` takes, the metrics' `model` label) and
by its content hash (what latents files and session records are checked against: a name
may be reused for other weights, a hash may not). Every device worker holds its own copy
of every model (`service.workers`); `ServedModel.reference` is the first device's copy,
for what every copy shares (config, kind, dtype, the model's own checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from model import CDTConfig, ModelIdentity, Tokenizer

from .domain_errors import NotFound
from .settings import Settings

CONFIG_FILE = "config.json"  # what marks a checkpoint directory (model.checkpoint's layout)


class CheckpointMissing(FileNotFoundError):
    """No checkpoint where the settings point."""


@dataclass(frozen=True)
class ModelSource:
    """A model to serve: its name and checkpoint directory."""

    name: str
    path: Path


def model_sources(settings: Settings) -> list[ModelSource]:
    """The models the settings name, the default first; CheckpointMissing for a path that is not
    a checkpoint directory (or a directory of them)."""
    if not settings.models:
        sources = [ModelSource(settings.checkpoint.name, settings.checkpoint)]
    elif "=" in settings.models[0]:
        sources = [ModelSource(name.strip(), Path(path.strip()))
                   for name, _, path in (entry.partition("=") for entry in settings.models)]
    else:
        directory = Path(settings.models[0])
        if not directory.is_dir():
            raise CheckpointMissing(f"CDT_MODELS: {directory} is not a directory")
        sources = [ModelSource(child.name, child) for child in sorted(directory.iterdir())
                   if (child / CONFIG_FILE).is_file()]
        if not sources:
            raise CheckpointMissing(f"CDT_MODELS: {directory} holds no checkpoint directory (one with a "
                                    f"{CONFIG_FILE})")
    for source in sources:
        if not (source.path / CONFIG_FILE).is_file():
            variable = "CDT_MODELS" if settings.models else "CDT_CHECKPOINT"
            raise CheckpointMissing(f"{variable}: checkpoint {source.path} of model {source.name!r} does not exist: "
                                    "give a checkpoint directory (create one with `cdt init --preset tiny -o DIR`)")
    return sources


@dataclass(frozen=True)
class ServedModel:
    name: str
    path: Path
    identity: ModelIdentity
    reference: Tokenizer  # the first device's copy (see the module docstring)

    @property
    def content_hash(self) -> str:
        return self.identity.content_hash

    @property
    def config(self) -> CDTConfig:
        return self.reference.config

    @property
    def time_factor(self) -> int:
        return self.reference.config.time_factor

    def clip_frames(self, latent_frames: int) -> int:
        """Pixel frames a clip of `latent_frames` latent frames decodes to: 1 + time_factor*(n-1)."""
        return 1 + self.time_factor * (latent_frames - 1) if latent_frames else 0

    @property
    def label(self) -> str:
        """The model as messages name it."""
        return f"{self.name} ({self.content_hash[:12]})"


class Catalog:
    """The served models in their configured order; the first is the default."""

    def __init__(self, models: list[ServedModel]) -> None:
        if not models:
            raise ValueError("a replica serves at least one model")
        self._models = {model.name: model for model in models}

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    @property
    def default(self) -> ServedModel:
        return next(iter(self._models.values()))

    @property
    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str | None) -> ServedModel:
        """The model named `name` (None: the default); 404 `model_not_found` for another name."""
        if name is None:
            return self.default
        found = self._models.get(name)
        if found is None:
            raise NotFound(f"no model named {name!r} is served here; the models are {', '.join(self._models)} "
                           "(GET /v1/models)", code="model_not_found")
        return found

    def by_hash(self, content_hash: str) -> ServedModel | None:
        return next((model for model in self if model.content_hash == content_hash), None)
