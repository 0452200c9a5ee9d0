"""IU reports: the real archive from the installed torchxrayvision, and a hand-made one."""

import importlib.util
import io
import tarfile
from collections import Counter

import pytest

from radrl.data.iu_reports import (
    IUReport,
    iu_reports_archive,
    iu_split,
    load_iu_reports,
    split_of,
)

needs_iu = pytest.mark.skipif(
    importlib.util.find_spec("torchxrayvision") is None, reason="needs torchxrayvision (IU reports)"
)


def _xml(uid: str, findings: str | None, impression: str | None, mesh: list[str]) -> str:
    """A report in the IU layout, with made-up text."""
    def section(label, text):
        return f'<AbstractText Label="{label}">{text}</AbstractText>' if text else f'<AbstractText Label="{label}"/>'

    terms = "".join(f"<{tag}>{term}</{tag}>" for tag, term in mesh)
    return (
        f'<?xml version="1.0" encoding="utf-8"?><eCitation><uId id="{uid}"/>'
        f"<MedlineCitation><Article><Abstract>{section('COMPARISON', 'None.')}"
        f"{section('FINDINGS', findings)}{section('IMPRESSION', impression)}</Abstract>"
        f"</Article></MedlineCitation><MeSH>{terms}<automatic>ignored</automatic></MeSH></eCitation>"
    )


def _write_tgz(path, members: dict[str, str]):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(f"ecgen-radiology/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


GOOD = {
    "10.xml": _xml("CXR10", "Heart   size XXXX normal.", "No acute disease.", [("major", "normal")]),
    "2.xml": _xml("CXR2", None, "Small left effusion.",
                  [("major", "Pleural Effusion/left/small"), ("minor", "Cardiomegaly/mild")]),
    "3.xml": _xml("CXR3", None, None, [("major", "No Indexing")]),  # neither section: dropped
}


def test_handmade_archive_parses(tmp_path):
    reports = load_iu_reports(_write_tgz(tmp_path / "r.tgz", GOOD))
    assert [r.report_id for r in reports] == ["CXR2", "CXR10"]  # numeric order, CXR3 dropped
    first, second = reports
    assert first == IUReport("CXR2", "", "Small left effusion.",
                             ("Pleural Effusion/left/small", "Cardiomegaly/mild"))
    assert first.text == "Small left effusion."
    assert second.findings == "Heart size XXXX normal."  # whitespace collapsed
    assert second.text == "Heart size XXXX normal. No acute disease."
    assert second.mesh == ("normal",)


def test_malformed_member_is_an_error_naming_it(tmp_path):
    archive = _write_tgz(tmp_path / "bad.tgz", {**GOOD, "7.xml": "<eCitation><uId id='CXR7'/>"})
    with pytest.raises(ValueError, match="ecgen-radiology/7.xml"):
        load_iu_reports(archive)


def test_split_is_deterministic_and_validated():
    assert split_of("CXR123") == split_of("CXR123")
    assert {split_of(f"CXR{i}") for i in range(200)} == {"train", "val", "test"}
    assert split_of("CXR123", val_fraction=0.0, test_fraction=0.0) == "train"
    with pytest.raises(ValueError):
        split_of("CXR1", val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match="split must be one of"):
        iu_split("dev", reports=[])


@needs_iu
def test_real_archive_counts_and_ids():
    assert iu_reports_archive().name == "NLMCXR_reports.tgz"
    reports = load_iu_reports()
    with tarfile.open(iu_reports_archive()) as tar:
        n_xml = sum(m.isfile() and m.name.endswith(".xml") for m in tar)
    print(f"\nIU reports: {n_xml} in archive, kept {len(reports)}, dropped {n_xml - len(reports)}")
    assert n_xml == 3955
    assert 3900 <= len(reports) < n_xml
    ids = [r.report_id for r in reports]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids, key=lambda i: int(i[3:]))
    assert all(r.text and r.text == r.text.strip() for r in reports)
    assert sum(bool(r.mesh) for r in reports) == len(reports)  # every report is indexed
    assert load_iu_reports() is not reports  # a fresh list each call; the cache stays intact


@needs_iu
def test_real_archive_splits():
    reports = load_iu_reports()
    splits = {name: iu_split(name, reports) for name in ("train", "val", "test")}
    ids = {name: {r.report_id for r in rs} for name, rs in splits.items()}
    assert sum(len(s) for s in ids.values()) == len(reports)
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    fractions = Counter({name: len(s) / len(reports) for name, s in ids.items()})
    assert 0.77 <= fractions["train"] <= 0.83
    assert 0.08 <= fractions["val"] <= 0.12 and 0.08 <= fractions["test"] <= 0.12
    assert [r.report_id for r in iu_split("test")] == [r.report_id for r in splits["test"]]


@needs_iu
def test_held_out_report_texts_never_occur_in_training():
    """Held-out means unseen: no LM-RRG test pair's report text (case and whitespace folded) is a train text."""
    from radrl.config import DataConfig
    from radrl.data.iu_reports import normalized_text, unseen_reports
    from radrl.data.pairs import image_report_pairs

    train = {normalized_text(r.text) for r in iu_split("train")}
    test = iu_split("test")
    assert any(normalized_text(r.text) in train for r in test)  # the id split alone does leak: the filter matters
    kept = unseen_reports(test)
    assert kept and not any(normalized_text(r.text) in train for r in kept)
    pairs = image_report_pairs(DataConfig(), "test", limit=40)
    assert len(pairs) == 40 and not any(normalized_text(r) in train for r in pairs.reports)
    assert normalized_text("  Lungs  CLEAR.\n") == "lungs clear."


@needs_iu
def test_validation_pairs_share_no_text_with_training():
    """learner.supervised_validation carves whole texts out of training: none of them (normalised) is trained on."""
    from radrl.config import DataConfig
    from radrl.data.iu_reports import normalized_text
    from radrl.data.pairs import image_report_pairs, validation_split

    pairs = image_report_pairs(DataConfig(), "train", limit=300)
    training, validation = validation_split(pairs, 40)
    assert len(training) + len(validation) == len(pairs) and len(validation) >= 40
    seen = {normalized_text(r) for r in training.reports}
    assert not any(normalized_text(r) in seen for r in validation.reports)
    repeated = Counter(normalized_text(r) for r in pairs.reports).most_common(1)[0][1]
    assert repeated > 1  # some text recurs in the draw, so splitting by pair would have leaked
    again = validation_split(pairs, 40)[1]
    assert again.reports == validation.reports and (again.images == validation.images).all()  # seeded
    assert validation_split(pairs, 0) == (pairs, None)
    with pytest.raises(ValueError, match="supervised_validation"):
        validation_split(pairs, len(pairs) + 1)
