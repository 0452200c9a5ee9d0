"""The Indiana University chest X-ray reports (findings, impression, MeSH terms).

The reports ship inside the torchxrayvision wheel as ``data/NLMCXR_reports.tgz``
(3,955 XML files). They are CC BY-NC-ND, so we read them from the installed package
at run time and never copy their text into this repository.
"""

import functools
import hashlib
import importlib.util
import logging
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

ARCHIVE_NAME = "NLMCXR_reports.tgz"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class IUReport:
    """One IU report: the two sections models see plus its MeSH annotation."""

    report_id: str  # "CXR3029"
    findings: str  # "" if absent
    impression: str  # "" if absent
    mesh: tuple[str, ...]  # <major> then <minor> terms, e.g. "Cardiomegaly/mild"

    @property
    def text(self) -> str:
        """Findings then impression: the text models condition on."""
        return f"{self.findings} {self.impression}".strip()


def iu_reports_archive() -> Path:
    """Path of NLMCXR_reports.tgz inside the installed torchxrayvision package."""
    # find_spec locates the package without importing it (importing pulls in torch).
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The IU chest X-ray reports come with torchxrayvision, which is not installed; "
            "run `pip install torchxrayvision`."
        )
    path = Path(spec.origin).parent / "data" / ARCHIVE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed torchxrayvision; "
            "reinstall it with `pip install --force-reinstall torchxrayvision`."
        )
    return path


def load_iu_reports(archive: Path | None = None) -> list[IUReport]:
    """All reports with findings or impression, sorted by numeric id (cached per archive)."""
    path = Path(archive) if archive is not None else iu_reports_archive()
    # The cache holds a tuple so no caller can mutate what later callers get.
    return list(_load_cached(path.resolve()))


@functools.lru_cache(maxsize=4)
def _load_cached(path: Path) -> tuple[IUReport, ...]:
    reports, n_xml = [], 0
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            if not (member.isfile() and member.name.endswith(".xml")):
                continue
            n_xml += 1
            report = _parse_member(tar, member, path)
            # Reports with neither section carry no text to condition on or label.
            if report.findings or report.impression:
                reports.append(report)
    reports.sort(key=lambda r: _numeric_id(r.report_id))
    log.info("%s: kept %d of %d reports, dropped %d with neither findings nor impression",
             path.name, len(reports), n_xml, n_xml - len(reports))
    return tuple(reports)


def _parse_member(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> IUReport:
    # A malformed file is an error naming the member, not a silent skip: the archive is
    # a fixed, known file, so damage to it should stop the run rather than shrink the data.
    try:
        root = ET.fromstring(tar.extractfile(member).read())
    except ET.ParseError as err:
        raise ValueError(f"{path}: member {member.name} is not well-formed XML ({err})") from err
    uid = root.find("uId")
    if uid is None or not uid.get("id"):
        raise ValueError(f"{path}: member {member.name} has no <uId id=...> report id")
    sections = {
        node.get("Label"): " ".join((node.text or "").split())
        for node in root.iter("AbstractText")
    }
    mesh = root.find("MeSH")
    terms = () if mesh is None else tuple(
        node.text.strip()
        for tag in ("major", "minor")
        for node in mesh.findall(tag)
        if node.text and node.text.strip()
    )
    return IUReport(
        report_id=uid.get("id"),
        findings=sections.get("FINDINGS", ""),
        impression=sections.get("IMPRESSION", ""),
        mesh=terms,
    )


def _numeric_id(report_id: str) -> int:
    return int(report_id.removeprefix("CXR"))


def split_of(
    report_id: str, val_fraction: float = 0.1, test_fraction: float = 0.1
) -> Literal["train", "val", "test"]:
    """Deterministic split of a report id, from a stable hash (same on every machine)."""
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be >= 0 "
            "and sum to less than 1"
        )
    # Python's hash() is salted per process; sha256 gives the same split everywhere.
    digest = hashlib.sha256(report_id.encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def iu_split(split: str, reports: Sequence[IUReport] | None = None) -> list[IUReport]:
    """The reports of one split ("train", "val" or "test"), in input order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    reports = load_iu_reports() if reports is None else reports
    return [r for r in reports if split_of(r.report_id) == split]


def normalized_text(text: str) -> str:
    """Case and whitespace folded: the form in which two report texts count as the same text."""
    return " ".join(text.lower().split())


def unseen_reports(reports: Sequence[IUReport], seen: Sequence[IUReport] | None = None) -> list[IUReport]:
    """The reports whose normalised text occurs in no `seen` report (default: the train split).

    Splits are by report id, yet identical normal texts recur across ids; held-out means unseen,
    so evaluation keeps only the texts training never read.
    """
    seen = iu_split("train") if seen is None else seen
    return unseen(reports, [r.text for r in seen], text=lambda r: r.text)


def unseen(items: Sequence[T], seen_texts: Iterable[str], text: Callable[[T], str] = str) -> list[T]:
    """The items (texts, or records whose `text` gives theirs) whose normalised text is none of `seen_texts`."""
    known = {normalized_text(t) for t in seen_texts}
    return [item for item in items if normalized_text(text(item)) not in known]
