"""Real chest X-ray image–report pairs from local MIMIC-CXR-JPG or IU X-ray folders.

Nothing here downloads: users with PhysioNet credentialed access (MIMIC-CXR-JPG) or the
Open-i PNG release (IU X-ray) point these loaders at their own folders. The loaders read
only CSVs and report text; images are opened lazily by `ImageReportDataset`, which skips
missing or corrupt files instead of crashing halfway through an epoch.
"""

from __future__ import annotations

import csv
import gzip
import logging
import operator
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

MIMIC_METADATA_CSV = "mimic-cxr-2.0.0-metadata"  # stem; .csv.gz or .csv
MIMIC_SPLIT_CSV = "mimic-cxr-2.0.0-split"
IU_PROJECTIONS_CSV = "indiana_projections.csv"

# MIMIC's split file says "validate"; the rest of radrl says "val".
_SPLIT_NAMES = {"train": "train", "validate": "val", "test": "test"}

_ACCESS_HINT = (
    "MIMIC-CXR-JPG requires PhysioNet credentialed access "
    "(https://physionet.org/content/mimic-cxr-jpg/) and cannot be downloaded by radrl. "
    "Download it yourself and pass as `root` the folder that holds "
    f"{MIMIC_METADATA_CSV}.csv.gz, {MIMIC_SPLIT_CSV}.csv.gz and files/p10/...; the free-text "
    "reports come from MIMIC-CXR (mimic-cxr-reports.zip): pass as `reports_root` the folder "
    "that holds its files/p10/p10000032/s50414267.txt (defaults to `root`)."
)


@dataclass(frozen=True)
class ImageReportRecord:
    """One image paired with the report text that conditions it."""

    image_path: Path
    report: str  # the impression text used for conditioning
    study_id: str
    view: str  # "PA" / "AP" / "LATERAL" / ... ("UNKNOWN" for IU images without projections)
    split: str  # "train" / "val" / "test"


# ---------------------------------------------------------------------------------------
# Report text
# ---------------------------------------------------------------------------------------

# The IMPRESSION header may be any case and may sit mid-line ("FINDINGS: ... IMPRESSION: ...",
# as flattened IU reports are), so it is matched at a word boundary, not a line start.
_IMPRESSION_HEADER = re.compile(r"\bimpression\s*:", re.IGNORECASE)
# The section ends at the next ALL-CAPS header ("NOTIFICATION:", "RECOMMENDATION(S):"):
# case-sensitive on purpose, so sentence text such as "Heart size: normal" does not end it.
_NEXT_HEADER = re.compile(r"\b[A-Z]{2,}(?:[ \t/&()-]+[A-Z]+)*\)?[ \t]*:")


def extract_impression(report_text: str) -> str:
    """The IMPRESSION section of a radiology report, whitespace-normalised; "" if none."""
    header = _IMPRESSION_HEADER.search(report_text)
    if header is None:
        return ""
    section = report_text[header.end():]
    next_header = _NEXT_HEADER.search(section)
    if next_header is not None:
        section = section[: next_header.start()]
    return " ".join(section.split())


def count_words(text: str) -> int:
    """Whitespace word count: the token count used when no tokenizer is given."""
    return len(text.split())


# ---------------------------------------------------------------------------------------
# MIMIC-CXR-JPG
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MimicImage:
    dicom_id: str
    subject_id: str
    study_id: str
    view: str
    split: str  # already mapped to train / val / test


def _require_exists(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path} does not exist. {_ACCESS_HINT}")


def _find_csv(root: Path, stem: str) -> Path:
    """`<root>/<stem>.csv.gz`, else `<root>/<stem>.csv`; FileNotFoundError naming both."""
    for name in (f"{stem}.csv.gz", f"{stem}.csv"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"MIMIC-CXR-JPG file not found: {root / (stem + '.csv.gz')} (nor {stem}.csv). {_ACCESS_HINT}"
    )


def _read_csv_columns(path: Path, columns: Sequence[str]) -> Iterator[tuple[str, ...]]:
    """Yield a tuple of the named columns (two or more) of each row: 377k rows in ~1.5 s."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path} lacks column(s) {missing}; its header is {header}")
        pick = operator.itemgetter(*(header.index(c) for c in columns))
        for row in reader:
            yield pick(row)


def _read_official_split(split_csv: Path) -> dict[str, str]:
    """dicom_id → train / val / test."""
    splits = {}
    for dicom_id, split in _read_csv_columns(split_csv, ("dicom_id", "split")):
        if split not in _SPLIT_NAMES:
            raise ValueError(f"{split_csv}: unknown split {split!r} for dicom {dicom_id}")
        splits[dicom_id] = _SPLIT_NAMES[split]
    return splits


def _read_mimic_images(metadata_csv: Path, splits: dict[str, str]) -> list[_MimicImage]:
    """Every image in the metadata that the official split assigns, with its view."""
    columns = ("dicom_id", "subject_id", "study_id", "ViewPosition")
    return [
        _MimicImage(dicom_id, subject_id, study_id, view, splits[dicom_id])
        for dicom_id, subject_id, study_id, view in _read_csv_columns(metadata_csv, columns)
        if dicom_id in splits
    ]


def _one_image_per_study(images: Sequence[_MimicImage], split: str, views: Sequence[str]) -> list[_MimicImage]:
    """One image per study of `split`: the first view in `views` order, then lowest dicom_id.

    One image per study keeps every sampled report distinct (a study often has two PA films).
    """
    rank = {view: i for i, view in enumerate(views)}
    best: dict[str, _MimicImage] = {}
    for image in images:
        if image.split != split or image.view not in rank:
            continue
        current = best.get(image.study_id)
        if current is None or (rank[image.view], image.dicom_id) < (rank[current.view], current.dicom_id):
            best[image.study_id] = image
    return sorted(best.values(), key=lambda image: image.study_id)  # sorted: seed alone fixes the draw


def mimic_image_paths(root: Path, split: str = "train", views: Sequence[str] = ("PA", "AP")) -> list[Path]:
    """The films of a MIMIC-CXR-JPG split, one per study (first of `views`, then lowest dicom_id); no reports needed."""
    root = Path(root)
    images = _read_mimic_images(_find_csv(root, "mimic-cxr-2.0.0-metadata"),
                                _read_official_split(_find_csv(root, "mimic-cxr-2.0.0-split")))
    return [_mimic_image_path(root, image) for image in _one_image_per_study(images, split, views)]


def _mimic_image_path(root: Path, image: _MimicImage) -> Path:
    subject = image.subject_id
    return root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{image.study_id}" / f"{image.dicom_id}.jpg"


def _mimic_report_path(reports_root: Path, image: _MimicImage) -> Path:
    subject = image.subject_id
    return reports_root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{image.study_id}.txt"


def _draw_studies(
    candidates: Sequence[_MimicImage],
    n: int,
    rng: random.Random,
    usable_impression: Callable[[_MimicImage], tuple[str, str]],
) -> tuple[list[tuple[_MimicImage, str]], Counter]:
    """Walk a seeded permutation of `candidates`, keeping the first `n` with a usable impression.

    Equivalent to "filter all, then sample n", but reads only as many report files as it
    needs (reading all ~220k train reports takes minutes on network storage).
    """
    order = list(candidates)
    rng.shuffle(order)
    kept, rejected = [], Counter()
    for image in order:
        if len(kept) == n:
            break
        impression, reason = usable_impression(image)
        if reason:
            rejected[reason] += 1
        else:
            kept.append((image, impression))
    return kept, rejected


def load_mimic_cxr(
    root: str | Path,
    *,
    reports_root: str | Path | None = None,
    views: Sequence[str] = ("PA", "AP"),
    max_tokens: int = 74,
    count_tokens: Callable[[str], int] | None = None,
    n_train: int = 5000,
    n_val: int = 0,
    n_test: int = 1000,
    test_views: Sequence[str] = ("PA",),
    seed: int = 0,
) -> dict[str, list[ImageReportRecord]]:
    """Seeded MIMIC-CXR-JPG image–impression pairs per split (CXRL: 5,000 PA/AP train, 1,000 PA test).

    Images are not opened here (ImageReportDataset does that lazily); report files are read
    only for the studies drawn. Train and val draw from `views`, test from `test_views`.
    """
    wanted = {"train": (n_train, views), "val": (n_val, views), "test": (n_test, test_views)}
    for split, (n, _) in wanted.items():
        if n < 0:
            raise ValueError(f"n_{split} must be >= 0, got {n}")
    root = Path(root)
    reports_root = Path(reports_root) if reports_root is not None else root
    _require_exists(root, "MIMIC-CXR-JPG root")
    metadata_csv = _find_csv(root, MIMIC_METADATA_CSV)
    split_csv = _find_csv(root, MIMIC_SPLIT_CSV)
    _require_exists(reports_root / "files", "MIMIC-CXR reports folder")
    count_tokens = count_tokens or count_words

    def usable_impression(image: _MimicImage) -> tuple[str, str]:
        """(impression, "") if the study's impression can condition the model, else ("", why)."""
        report_path = _mimic_report_path(reports_root, image)
        if not report_path.is_file():
            return "", "no report file"
        impression = extract_impression(report_path.read_text(encoding="utf-8", errors="replace"))
        if not impression:
            return "", "no impression"
        if count_tokens(impression) > max_tokens:
            return "", f"impression > {max_tokens} tokens"
        return impression, ""

    images = _read_mimic_images(metadata_csv, _read_official_split(split_csv))
    records = {}
    for split, (n, split_views) in wanted.items():
        candidates = _one_image_per_study(images, split, split_views)
        # A string seed hashes with SHA-512 (not PYTHONHASHSEED): the same draw in every process.
        kept, rejected = _draw_studies(candidates, n, random.Random(f"mimic-cxr/{seed}/{split}"), usable_impression)
        if len(kept) < n:
            logger.warning(
                "MIMIC-CXR %s: asked for %d pairs but only %d of %d %s studies qualify (rejected: %s); using all %d.",
                split, n, len(kept), len(candidates), "/".join(split_views), dict(rejected), len(kept),
            )
        records[split] = [
            ImageReportRecord(_mimic_image_path(root, image), impression, image.study_id, image.view, split)
            for image, impression in kept
        ]
    return records


# ---------------------------------------------------------------------------------------
# IU X-ray (Open-i PNG release)
# ---------------------------------------------------------------------------------------


class HasImpression(Protocol):
    """What load_iu_images needs of a report (radrl.data.iu_reports.IUReport has more)."""

    report_id: str  # "CXR3029"
    impression: str  # "" if the report has none


# Open-i names "CXR1_1_IM-0001-3001.png" / "CXR10_IM-0002-1001.png"; the Kaggle re-release and
# its indiana_projections.csv name the same image "1_IM-0001-3001.dcm.png". Both reduce to the
# key ("CXR1", "IM-0001-3001"), so either naming of the folder matches either CSV.
_IU_FILENAME = re.compile(r"^(?:CXR)?(\d+)_(?:\d+_)?(IM-\d+-\d+)")


def _iu_image_key(filename: str) -> tuple[str, str] | None:
    match = _IU_FILENAME.match(filename)
    return (f"CXR{match.group(1)}", match.group(2)) if match else None


def _find_projections_csv(image_dir: Path) -> Path | None:
    # The Kaggle release keeps the CSV beside (or one level above) the image folder.
    for folder in (image_dir, image_dir.parent):
        if (folder / IU_PROJECTIONS_CSV).is_file():
            return folder / IU_PROJECTIONS_CSV
    return None


def _read_projections(projections_csv: Path) -> dict[tuple[str, str], str]:
    """Image key → "Frontal" / "Lateral"."""
    projections = {}
    for filename, projection in _read_csv_columns(projections_csv, ("filename", "projection")):
        key = _iu_image_key(filename)
        if key is not None:
            projections[key] = projection
    return projections


def _iu_view(projection: str | None) -> str:
    if projection is None:
        return "UNKNOWN"
    return "PA" if projection == "Frontal" else projection.upper()  # "Lateral" → "LATERAL" (MIMIC's name)


def load_iu_images(
    image_dir: str | Path,
    reports: Sequence[HasImpression],
    *,
    projections_csv: str | Path | None = None,
    frontal_only: bool = True,
    split_fn: Callable[[str], str] | None = None,
) -> list[ImageReportRecord]:
    """Pair IU X-ray PNGs with their reports' impressions; frontal only when projections are known.

    `projections_csv` defaults to indiana_projections.csv in `image_dir` or its parent; without
    it every image is kept with view "UNKNOWN". `split_fn(report_id)` defaults to
    radrl.data.iu_reports.split_of, so images and reports share one train/val/test split.
    """
    if split_fn is None:
        # Imported here, not at the top, so MIMIC users never need the IU module.
        from radrl.data.iu_reports import split_of as split_fn
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"IU X-ray image folder not found: {image_dir} (expected CXR*_IM-*.png files)")
    projections_path = Path(projections_csv) if projections_csv is not None else _find_projections_csv(image_dir)
    projections = _read_projections(projections_path) if projections_path is not None else None
    if projections is None and frontal_only:
        logger.warning("No %s for %s: keeping every image, lateral views included.", IU_PROJECTIONS_CSV, image_dir)

    # The impression alone conditions the model, as for MIMIC-CXR (IUReport.text adds findings).
    impressions = {report.report_id: " ".join(report.impression.split()) for report in reports}
    records, skipped = [], Counter()
    for path in sorted(image_dir.glob("*.png")):
        key = _iu_image_key(path.name)
        if key is None:
            skipped["unrecognised file name"] += 1
            continue
        report_id = key[0]
        projection = projections.get(key) if projections is not None else None
        if projections is not None and frontal_only and projection != "Frontal":
            skipped["not frontal"] += 1
        elif report_id not in impressions:
            skipped["no report"] += 1
        elif not impressions[report_id]:
            skipped["no impression"] += 1
        else:
            split = split_fn(report_id)
            split = _SPLIT_NAMES.get(split, split)  # a split_fn may say "validate"
            records.append(ImageReportRecord(path, impressions[report_id], report_id, _iu_view(projection), split))
    if skipped:
        logger.info("IU X-ray: %d images paired, skipped %s", len(records), dict(skipped))
    if not records:
        raise FileNotFoundError(
            f"No IU X-ray image in {image_dir} matched a report with an impression (skipped: {dict(skipped)})"
        )
    return records


# ---------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------

SKIP_MISSING = "missing"
SKIP_CORRUPT = "corrupt"


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what radrl reads from a folder of images


def read_image(path: Path, size: int) -> torch.Tensor:
    """load_grayscale, with an error that names the file (for images a user points at; datasets skip bad ones)."""
    try:
        return load_grayscale(path, size)
    except Exception as error:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... on bad bytes
        raise ValueError(f"cannot read image {path}: {type(error).__name__}: {error}; remove or replace it and run "
                         "again") from error


def load_grayscale(path: Path, size: int) -> torch.Tensor:
    """Image file → float32 [1, size, size] in [0, 1]: centre crop to square, then resize.

    Square crop then resize (torchxrayvision's XRayCenterCrop + XRayResizer) keeps anatomy
    proportions, which the posture reward measures, instead of stretching a 3056×2544 film.
    """
    with Image.open(path) as image:
        # JPEG only: decode at 1/2..1/8 scale when still >= size; several times faster on MIMIC's ~3000 px films.
        image.draft("L", (size, size))
        image.load()  # decode now, so a truncated file fails inside the caller's try
        if image.mode.startswith("I"):  # 16-bit PNG: convert("L") would clip everything above 255
            pixels = np.asarray(image, dtype=np.float32) / 65535.0
        else:
            pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    height, width = pixels.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(np.ascontiguousarray(pixels[top : top + side, left : left + side]))  # mode "F"
    pixels = np.asarray(square.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    return torch.from_numpy(np.clip(pixels, 0.0, 1.0))[None]


class ImageReportDataset(torch.utils.data.IterableDataset):
    """Yields {"image": [1, size, size] float32, "report", "study_id", "view"}, skipping bad images.

    Iterable rather than map-style because only the iterator sees the end of an epoch, which
    is where "every image failed" must become an error; a map-style dataset would need a
    None-dropping collate and could still not tell an empty epoch from a finished one.

    Skip counters (`loaded`, `skipped`) describe the latest epoch of *this* object. With a
    DataLoader and num_workers=0 that is the object you hold. With num_workers>0 each worker
    iterates a copy on its own shard (records[worker_id::num_workers]): the copies' counters
    are lost, the parent's stay at zero, each worker logs its own skips, and the all-failed
    check applies per shard (a worker whose whole shard fails raises).
    """

    def __init__(self, records: Sequence[ImageReportRecord], size: int, *, shuffle_seed: int | None = None):
        """`shuffle_seed`: None keeps record order; else a fresh seeded order per `set_epoch`."""
        if not records:
            raise ValueError("ImageReportDataset needs at least one record")
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.records = list(records)
        self.size = size
        self.shuffle_seed = shuffle_seed
        self.epoch = 0
        self.loaded = 0
        self.skipped: list[tuple[Path, str]] = []  # (path, "missing: ..." / "corrupt: ...")
        self._warned: set[Path] = set()  # log each bad file once, not once per epoch

    def __len__(self) -> int:
        # An upper bound: skipped images make the epoch shorter.
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Pick the shuffle order for `epoch` (DataLoader cannot shuffle an IterableDataset)."""
        self.epoch = epoch

    def _epoch_records(self) -> list[ImageReportRecord]:
        records = list(self.records)
        if self.shuffle_seed is not None:
            random.Random(f"{self.shuffle_seed}/{self.epoch}").shuffle(records)
        worker = torch.utils.data.get_worker_info()
        if worker is not None:
            records = records[worker.id :: worker.num_workers]
        return records

    def _load(self, record: ImageReportRecord) -> torch.Tensor | None:
        """The image tensor, or None after recording why it was skipped."""
        try:
            return load_grayscale(record.image_path, self.size)
        except FileNotFoundError:
            reason = f"{SKIP_MISSING}: no such file"
        except Exception as error:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad bytes
            reason = f"{SKIP_CORRUPT}: {type(error).__name__}: {error}"
        self.skipped.append((record.image_path, reason))
        if record.image_path not in self._warned:
            self._warned.add(record.image_path)
            logger.warning("Skipping image %s (%s)", record.image_path, reason)
        return None

    def __iter__(self) -> Iterator[dict]:
        self.loaded, self.skipped = 0, []
        for record in self._epoch_records():
            image = self._load(record)
            if image is None:
                continue
            self.loaded += 1
            yield {"image": image, "report": record.report, "study_id": record.study_id, "view": record.view}
        if self.loaded == 0 and self.skipped:
            first = "; ".join(f"{path} ({reason})" for path, reason in self.skipped[:3])
            raise RuntimeError(
                f"All {len(self.skipped)} images failed to load, so this epoch is empty. First failures: {first}. "
                "Check that the image root points at the right folder and the files are intact."
            )

    def summary(self) -> str:
        """"N loaded, M skipped (k corrupt, j missing)" for the latest epoch."""
        kinds = Counter(reason.split(":", 1)[0] for _, reason in self.skipped)
        return (
            f"{self.loaded} loaded, {len(self.skipped)} skipped "
            f"({kinds[SKIP_CORRUPT]} corrupt, {kinds[SKIP_MISSING]} missing)"
        )
