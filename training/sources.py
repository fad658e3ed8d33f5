"""Training inputs: a manifest, or files and folders of videos and images.

A manifest is a table with one row per file: TSV or CSV with a header, or JSONL with one
object per line. `path` (or `file`, the shared MANIFEST.tsv's name) is the file, relative
to the manifest's folder unless absolute; `split` (train / val) and `caption` are
optional. Without a split column every row is a training row. Folders are walked
recursively for the suffixes below. Images are 1-frame videos (the paper's image+video
mix); which file is which goes by its suffix.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .config import DataSection

VIDEO_SUFFIXES = {".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
PATH_COLUMNS = ("path", "file")


@dataclass(frozen=True)
class Inputs:
    """The files of one split, videos and images apart (they are sampled apart)."""

    videos: tuple[str, ...]
    images: tuple[str, ...]
    captions: int  # rows that carry a caption (recorded, not used by the tokenizer)
    source: str

    def summary(self) -> dict:
        return {"source": self.source, "videos": len(self.videos), "images": len(self.images),
                "captions": self.captions}


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def read_manifest(manifest: str | Path) -> list[dict]:
    """The manifest's rows as dicts with `path` resolved, plus `split`/`caption` if given."""
    manifest = Path(manifest)
    text = manifest.read_text()
    if manifest.suffix.lower() == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        delimiter = "," if manifest.suffix.lower() == ".csv" else "\t"
        rows = list(csv.DictReader(text.splitlines(), delimiter=delimiter))
    out = []
    for number, row in enumerate(rows, start=1):
        name = next((row[c] for c in PATH_COLUMNS if row.get(c)), None)
        if name is None:
            raise ValueError(f"{manifest}: row {number} has no {' or '.join(PATH_COLUMNS)}")
        out.append({**row, "path": str(manifest.parent / name)})
    return out


def scan(items: list[str | Path]) -> list[str]:
    """Files as given, and the video and image files under folders (sorted, recursive)."""
    out = []
    for item in map(Path, items):
        if item.is_dir():
            for root, dirs, files in os.walk(item):
                dirs.sort()
                out += [os.path.join(root, f) for f in sorted(files)
                        if Path(f).suffix.lower() in VIDEO_SUFFIXES | IMAGE_SUFFIXES]
        elif item.is_file():
            out.append(str(item))
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return out


def split_inputs(data: DataSection, split: str) -> Inputs:
    """`data.videos` (train) / `data.val_videos` (val) if set, else the manifest's rows
    of `split`; a manifest without a split column is all training rows."""
    explicit = data.videos if split == "train" else data.val_videos
    if explicit:
        paths, captions, source = scan(explicit), 0, ", ".join(map(str, explicit))
    else:
        rows = read_manifest(data.manifest)
        rows = [r for r in rows if (r.get("split") or "train") == split]
        paths, captions, source = [r["path"] for r in rows], sum(bool(r.get("caption")) for r in rows), data.manifest
    return Inputs(videos=tuple(p for p in paths if not is_image(p)), images=tuple(p for p in paths if is_image(p)),
                  captions=captions, source=str(source))
