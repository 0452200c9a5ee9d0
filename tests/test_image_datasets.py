"""Loaders for local MIMIC-CXR-JPG / IU X-ray folders, on tiny fake trees with the real layout."""

import csv
import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from radrl.data import image_datasets
from radrl.data.image_datasets import (
    ImageReportDataset,
    ImageReportRecord,
    extract_impression,
    load_iu_images,
    load_mimic_cxr,
)

# --- fake MIMIC-CXR-JPG tree ------------------------------------------------------------

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough

 FINDINGS:

 Heart size: normal.  No focal consolidation.

 IMPRESSION:

 {impression}

 NOTIFICATION:  Discussed with Dr. ___ at 10:00.
"""


@dataclass(frozen=True)
class FakeStudy:
    subject_id: str
    study_id: str
    split: str  # as in the official CSV: train / validate / test
    images: tuple[tuple[str, str], ...]  # (dicom_id, ViewPosition)
    impression: str | None = "No acute cardiopulmonary process."  # None: report without IMPRESSION
    has_report: bool = True


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _write_image(path: Path, seed: int = 0, shape: tuple[int, int] = (32, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_mimic_tree(root: Path, studies: list[FakeStudy], *, gz: bool = True) -> None:
    """Metadata + split CSVs, report .txt files and tiny JPGs in MIMIC-CXR-JPG's layout."""
    suffix = ".csv.gz" if gz else ".csv"
    metadata, splits = [], []
    for study in studies:
        prefix = f"p{study.subject_id[:2]}/p{study.subject_id}"
        for dicom_id, view in study.images:
            metadata.append([dicom_id, study.subject_id, study.study_id, "CHEST (PA AND LAT)", view, "32", "32"])
            splits.append([dicom_id, study.study_id, study.subject_id, study.split])
            _write_image(root / "files" / prefix / f"s{study.study_id}" / f"{dicom_id}.jpg")
        if study.has_report:
            report = root / "files" / prefix / f"s{study.study_id}.txt"
            text = MIMIC_REPORT.format(impression=study.impression)
            if study.impression is None:
                text = text.split(" IMPRESSION:")[0]
            report.write_text(text)
    header = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns"]
    _write_csv(root / f"mimic-cxr-2.0.0-metadata{suffix}", header, metadata)
    _write_csv(root / f"mimic-cxr-2.0.0-split{suffix}", ["dicom_id", "study_id", "subject_id", "split"], splits)


TOO_LONG = " ".join(["effusion"] * 80)


def default_studies() -> list[FakeStudy]:
    studies = [  # 20 clean PA train studies across two subject-prefix folders
        FakeStudy(f"1{i % 2}00000{i:02d}", f"500000{i:02d}", "train", ((f"pa{i:02d}", "PA"),), f"Finding number {i}.")
        for i in range(20)
    ]
    return studies + [
        FakeStudy("10000100", "51000001", "train", (("ap01", "AP"),), "Portable AP: lines in place."),
        FakeStudy("10000101", "51000002", "train", (("lat01", "LATERAL"),)),  # no PA/AP image
        FakeStudy("10000102", "51000003", "train", (("pa-noimp", "PA"),), impression=None),
        FakeStudy("10000103", "51000004", "train", (("pa-long", "PA"),), TOO_LONG),
        FakeStudy("10000104", "51000005", "train", (("pa-norep", "PA"),), has_report=False),
        # Two PA films and a lateral: one pair per study, the lowest PA dicom_id.
        FakeStudy("10000105", "51000006", "train", (("zz-lat", "LATERAL"), ("pa-b", "PA"), ("pa-a", "PA")), "Multi."),
        FakeStudy("10000200", "52000001", "validate", (("val01", "PA"),), "Val one."),
        FakeStudy("10000201", "52000002", "validate", (("val02", "AP"),), "Val two."),
        FakeStudy("10000300", "53000001", "test", (("test01", "PA"),), "Test one."),
        FakeStudy("10000301", "53000002", "test", (("test02", "PA"),), "Test two."),
        FakeStudy("10000302", "53000003", "test", (("test03", "AP"),), "Test AP, not in the paper's test set."),
    ]


@pytest.fixture
def mimic_root(tmp_path: Path) -> Path:
    root = tmp_path / "mimic-cxr-jpg"
    write_mimic_tree(root, default_studies())
    return root


def _ids(records: list[ImageReportRecord]) -> list[str]:
    return [record.study_id for record in records]


# --- MIMIC loader ---------------------------------------------------------------------


def test_mimic_filters_views_impressions_and_token_limit(mimic_root: Path):
    records = load_mimic_cxr(mimic_root, n_train=100, n_val=100, n_test=100)
    train = {record.study_id: record for record in records["train"]}
    assert len(train) == 22  # 20 clean PA + the AP study + the multi-film study
    assert train["51000001"].view == "AP"
    for excluded in ("51000002", "51000003", "51000004", "51000005"):  # lateral, no impression, too long, no report
        assert excluded not in train
    multi = train["51000006"]
    assert multi.image_path == mimic_root / "files/p10/p10000105/s51000006/pa-a.jpg"
    assert multi.report == "Multi."
    assert train["50000003"].report == "Finding number 3."
    assert all(record.split == "train" for record in records["train"])


def test_mimic_splits_and_test_views(mimic_root: Path):
    records = load_mimic_cxr(mimic_root, n_train=3, n_val=10, n_test=10)
    assert set(records) == {"train", "val", "test"}
    assert sorted(_ids(records["val"])) == ["52000001", "52000002"]  # "validate" → "val", PA and AP
    assert {record.split for record in records["val"]} == {"val"}
    assert sorted(_ids(records["test"])) == ["53000001", "53000002"]  # test is PA only by default
    assert {record.view for record in records["test"]} == {"PA"}
    with_ap = load_mimic_cxr(mimic_root, n_train=0, n_test=10, test_views=("PA", "AP"))
    assert len(with_ap["test"]) == 3
    assert load_mimic_cxr(mimic_root)["val"] == []  # n_val defaults to 0


def test_mimic_custom_token_counter(mimic_root: Path):
    def count_characters(text: str) -> int:
        return len(text)

    records = load_mimic_cxr(mimic_root, n_train=100, count_tokens=count_characters, max_tokens=17)
    reports = {record.report for record in records["train"]}
    assert reports and all(len(report) <= 17 for report in reports)
    assert "Finding number 3." in reports and "Portable AP: lines in place." not in reports


def test_mimic_sampling_is_seeded(mimic_root: Path):
    first = _ids(load_mimic_cxr(mimic_root, n_train=5, seed=0)["train"])
    again = _ids(load_mimic_cxr(mimic_root, n_train=5, seed=0)["train"])
    other = _ids(load_mimic_cxr(mimic_root, n_train=5, seed=1)["train"])
    assert len(first) == 5 and len(set(first)) == 5
    assert first == again
    assert first != other


def test_mimic_reads_reports_only_for_drawn_studies(mimic_root: Path, monkeypatch):
    reads = []
    original = image_datasets.extract_impression
    monkeypatch.setattr(image_datasets, "extract_impression", lambda text: reads.append(1) or original(text))
    load_mimic_cxr(mimic_root, n_train=2, n_test=1)
    assert 3 <= len(reads) < 10  # 25 train candidates, but only a few reports opened


def test_mimic_shortfall_takes_all_and_warns_once(mimic_root: Path, caplog):
    with caplog.at_level(logging.WARNING):
        records = load_mimic_cxr(mimic_root, n_train=1000, n_test=1)
    assert len(records["train"]) == 22
    warnings = [r.getMessage() for r in caplog.records if "MIMIC-CXR train" in r.getMessage()]
    assert len(warnings) == 1
    assert "1000" in warnings[0] and "22" in warnings[0] and "no impression" in warnings[0]


def test_mimic_accepts_plain_csv(tmp_path: Path):
    write_mimic_tree(tmp_path, default_studies()[:3], gz=False)
    assert len(load_mimic_cxr(tmp_path, n_train=10)["train"]) == 3


def test_mimic_missing_files_name_the_path(mimic_root: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="PhysioNet credentialed access") as error:
        load_mimic_cxr(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value)

    (mimic_root / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    with pytest.raises(FileNotFoundError, match="PhysioNet") as error:
        load_mimic_cxr(mimic_root)
    assert str(mimic_root / "mimic-cxr-2.0.0-split.csv.gz") in str(error.value)

    write_mimic_tree(tmp_path / "other", default_studies()[:1])
    with pytest.raises(FileNotFoundError, match="reports") as error:
        load_mimic_cxr(tmp_path / "other", reports_root=tmp_path / "reports")
    assert str(tmp_path / "reports" / "files") in str(error.value)


# --- extract_impression -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MIMIC_REPORT.format(impression="No acute\n process."), "No acute process."),
        ("FINDINGS: Clear lungs. IMPRESSION: No active disease.", "No active disease."),  # flattened IU text
        ("Findings: clear.\nImpression: Normal chest x-XXXX.\n", "Normal chest x-XXXX."),  # any-case header
        ("IMPRESSION:\n\n 1. Small effusion.\n 2.  Heart size: mildly enlarged.\n", "1. Small effusion. 2. Heart size: mildly enlarged."),
        ("IMPRESSION: Stable. RECOMMENDATION(S): CT in 3 months.", "Stable."),
        ("FINDINGS AND IMPRESSION:  Low lung volumes.", "Low lung volumes."),
        ("FINDINGS: No effusion.", ""),
        ("IMPRESSION:\n\nNOTIFICATION: called.", ""),
    ],
)
def test_extract_impression(text: str, expected: str):
    assert extract_impression(text) == expected


# --- IU X-ray loader --------------------------------------------------------------------


@dataclass(frozen=True)
class FakeIUReport:
    report_id: str
    impression: str


IU_REPORTS = [
    FakeIUReport("CXR1", "No acute disease."),
    FakeIUReport("CXR2", "Small left\n pleural effusion."),
    FakeIUReport("CXR4", ""),  # findings only
]
IU_FILES = {  # Open-i PNG names → projection (Kaggle's indiana_projections.csv names them "1_IM-0001-4001.dcm.png")
    "CXR1_1_IM-0001-4001.png": "Frontal",
    "CXR1_1_IM-0001-3001.png": "Lateral",
    "CXR2_IM-0652-1001.png": "Frontal",
    "CXR3_IM-1384-1001.png": "Frontal",  # no report
    "CXR4_IM-2050-1001.png": "Frontal",
}


@pytest.fixture
def iu_dir(tmp_path: Path) -> Path:
    image_dir = tmp_path / "NLMCXR_png"
    for i, name in enumerate(IU_FILES):
        _write_image(image_dir / name, seed=i)  # PIL writes PNG from the suffix
    return image_dir


def _write_projections(path: Path) -> None:
    rows = []
    for name, projection in IU_FILES.items():
        uid, rest = name.removeprefix("CXR").split("_", 1)
        rows.append([uid, f"{uid}_{rest.split('_')[-1].removesuffix('.png')}.dcm.png", projection])
    _write_csv(path, ["uid", "filename", "projection"], rows)


def test_iu_with_projections_keeps_frontal(iu_dir: Path):
    _write_projections(iu_dir.parent / "indiana_projections.csv")  # found automatically one level up
    records = load_iu_images(iu_dir, IU_REPORTS, split_fn=lambda report_id: "validate")
    assert [record.image_path.name for record in records] == ["CXR1_1_IM-0001-4001.png", "CXR2_IM-0652-1001.png"]
    assert [record.report for record in records] == ["No acute disease.", "Small left pleural effusion."]
    assert {record.view for record in records} == {"PA"}
    assert {record.split for record in records} == {"val"}
    everything = load_iu_images(iu_dir, IU_REPORTS, frontal_only=False)
    assert sorted(record.view for record in everything) == ["LATERAL", "PA", "PA"]


def test_iu_without_projections_keeps_all(iu_dir: Path, caplog):
    with caplog.at_level(logging.WARNING):
        records = load_iu_images(iu_dir, IU_REPORTS)
    assert sorted(record.study_id for record in records) == ["CXR1", "CXR1", "CXR2"]
    assert {record.view for record in records} == {"UNKNOWN"}
    assert "lateral views included" in caplog.text
    from radrl.data.iu_reports import split_of  # the default split: the same as the reports'

    assert [record.split for record in records] == [split_of(record.study_id) for record in records]


# --- ImageReportDataset -----------------------------------------------------------------


def _record(path: Path) -> ImageReportRecord:
    return ImageReportRecord(path, "No acute disease.", path.stem, "PA", "train")


@pytest.fixture
def mixed_records(tmp_path: Path) -> list[ImageReportRecord]:
    """Three good images, one random-bytes JPG, one truncated JPG, one missing file."""
    good = [tmp_path / f"good{i}.jpg" for i in range(3)]
    for i, path in enumerate(good):
        _write_image(path, seed=i, shape=(64, 48))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2000))
    truncated = tmp_path / "truncated.jpg"
    _write_image(truncated, shape=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    paths = [good[0], corrupt, good[1], tmp_path / "missing.jpg", truncated, good[2]]
    return [_record(path) for path in paths]


def test_dataset_skips_bad_images_through_a_dataloader(mixed_records, caplog):
    dataset = ImageReportDataset(mixed_records, size=16)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=0)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # two epochs: each bad file is logged once, counted each epoch
            batches = list(loader)
    images = torch.cat([batch["image"] for batch in batches])
    assert images.shape == (3, 1, 16, 16) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert [s for batch in batches for s in batch["study_id"]] == ["good0", "good1", "good2"]
    assert dataset.summary() == "3 loaded, 3 skipped (2 corrupt, 1 missing)"
    assert [path.name for path, _ in dataset.skipped] == ["corrupt.jpg", "missing.jpg", "truncated.jpg"]
    assert len([r for r in caplog.records if r.getMessage().startswith("Skipping image")]) == 3


def test_dataset_raises_when_every_image_fails(mixed_records):
    bad = [mixed_records[1], mixed_records[3], mixed_records[4]]
    dataset = ImageReportDataset(bad, size=16)
    with pytest.raises(RuntimeError, match="All 3 images failed") as error:
        list(torch.utils.data.DataLoader(dataset, batch_size=2))
    assert "corrupt.jpg" in str(error.value) and "missing.jpg" in str(error.value)


def test_dataset_centre_crops_before_resizing(tmp_path: Path):
    tall = np.zeros((40, 20), dtype=np.uint8)
    tall[:10], tall[-10:] = 255, 255  # white bands outside the central 20×20 square
    Image.fromarray(tall).save(tmp_path / "tall.png")
    (sample,) = list(ImageReportDataset([_record(tmp_path / "tall.png")], size=8))
    assert sample["image"].shape == (1, 8, 8)
    assert sample["image"].max() == 0.0


def test_dataset_shuffle_is_seeded_per_epoch(tmp_path: Path):
    records = []
    for i in range(8):
        _write_image(tmp_path / f"img{i}.png", seed=i, shape=(8, 8))
        records.append(_record(tmp_path / f"img{i}.png"))

    def order(epoch: int) -> list[str]:
        dataset = ImageReportDataset(records, size=8, shuffle_seed=0)
        dataset.set_epoch(epoch)
        return [sample["study_id"] for sample in dataset]

    assert order(0) == order(0)
    assert order(0) != order(1) and sorted(order(0)) == sorted(order(1))
    assert [sample["study_id"] for sample in ImageReportDataset(records, size=8)] == [f"img{i}" for i in range(8)]
