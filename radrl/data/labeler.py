"""A CheXpert-style rule labeler: report text -> one Label per CheXpert observation.

Method (per sentence, per clause):
1. mentions: regexes per observation find where an observation is talked about;
   "normal" regexes ("heart size is normal", "lungs are clear") say directly that an
   observation is absent;
2. each mention is NEGATIVE if a negation trigger precedes it in its clause, else
   UNCERTAIN if an uncertainty trigger does ("cannot exclude" counts as uncertainty),
   else decided by the first trigger after it ("pneumothorax is not seen"), else
   POSITIVE; a clause ends at "but", "however", ";", "there is" and the like, so
   "no effusion or pneumothorax" negates both and "no X, but Y" only X;
3. mentions are aggregated: any positive -> POSITIVE, else any uncertain -> UNCERTAIN,
   else any negative -> NEGATIVE, else NOT_MENTIONED;
4. "No Finding" is POSITIVE when no observation other than Support Devices is POSITIVE
   or UNCERTAIN, and NOT_MENTIONED otherwise (CheXpert leaves it blank then).

Choices worth knowing (IU reports are the corpus this was tuned on):
- Calcified granulomas (and "calcified nodules", and "granulomatous disease") are
  healed infection, mentioned in about one IU report in eight; they are NOT Lung Lesion.
  Non-calcified nodules, masses and lesions are.
- Scarring is not Lung Opacity (chronic, and IU indexes it apart from opacities).
- "Lungs are clear" is NEGATIVE for Lung Opacity, Consolidation, Pneumonia and Edema.
- "Normal cardiomediastinal silhouette" is NEGATIVE for Cardiomegaly and for
  Enlarged Cardiomediastinum.
- Support Devices covers lines, tubes, catheters, pacemakers/defibrillators, valves,
  stents, surgical clips and sternotomy wires; orthopaedic hardware is left out.
- Blunted costophrenic angles count as a Pleural Effusion mention.
- "evaluate for X", "rule out X" and "history of X" make X UNCERTAIN, not POSITIVE.
- "XXXX" (the IU anonymisation token) is an ordinary unknown word: it matches nothing
  and breaks nothing.
"""

import re
from functools import lru_cache
from typing import Sequence

import numpy as np

from radrl.data.observations import CHEXPERT_OBSERVATIONS, Label

_GAP = r"(?:[\w\-/]+,?\s+){0,6}?"  # up to six words between an anatomy and its qualifier
_NORMAL = r"(?:normal|within normal limits|unremarkable|not enlarged|upper limits? of normal|stable in size and normal)"
_HEART = r"(?:heart|heart size|cardiac (?:silhouette|size|shadow|contour))"
_HEART_OR_CM = rf"(?:{_HEART}|cardiomediastinal (?:silhouette|contours?))"
_MEDIASTINUM = r"(?:mediastin(?:um|al) (?:silhouette|contours?|width)|mediastinum|cardiomediastinal (?:silhouette|contours?)|heart and mediastinum)"
_LUNGS = r"(?:lungs?|lung fields)"

# Mention phrases per observation (lower-case text). Written for this project.
MENTIONS: dict[str, list[str]] = {
    "Enlarged Cardiomediastinum": [
        r"(?:widen(?:ed|ing)|enlarged|prominent) (?:superior )?mediastin(?:um|al silhouette|al contours?)",
        rf"mediastin(?:um|al silhouette|al contours?) {_GAP}(?:widened|enlarged|prominent)",
        r"(?:mediastinal|paratracheal) (?:\w+ )?(?:widening|enlargement|prominence|mass|lymphadenopathy)",
        r"(?:widening|enlargement|prominence) of the (?:\w+ )?mediastinum",
        r"(?:enlarged|prominent|widened) cardiomediastinal (?:silhouette|contours?)",
        r"cardiomediastinal (?:silhouette|contours?) (?:is |are |appears |remains )?(?:mildly |slightly )?(?:enlarged|prominent|widened)",
    ],
    "Cardiomegaly": [
        r"cardiomegaly",
        r"cardiac enlargement|enlargement of the (?:heart|cardiac silhouette)",
        r"(?:enlarged|large|prominent) (?:heart|cardiac (?:silhouette|shadow|contour))",
        rf"{_HEART} (?:is |are |appears |remains |size )?(?:\w+ ){{0,3}}?(?:enlarged|large)\b",
        r"(?:heart|cardiac) enlargement|increased? (?:in )?(?:the )?heart size|borderline (?:heart|cardiac) (?:size|silhouette)",
    ],
    "Lung Lesion": [
        r"(?<!calcified )(?<!calcified pulmonary )(?<!calcified lung )nodul(?:e|es|ar opacit(?:y|ies)|ar densit(?:y|ies))\b",
        r"\bmass(?:es)?\b",
        r"(?<!bony )(?<!lytic )(?<!osseous )(?<!sclerotic )(?<!blastic )(?<!skin )\blesions?\b",
        r"tumou?rs?|neoplasms?|carcinoma|malignan(?:cy|t)|metasta(?:sis|ses|tic)",
    ],
    "Lung Opacity": [
        r"opacit(?:y|ies)|opacification",
        r"infiltrat(?:e|es|ion|ive)",
        r"(?<!bone )(?<!soft tissue )(?<!calcified )(?<!nodular )densit(?:y|ies)",
        r"\bhaz(?:y|iness)\b|ground[- ]glass",
        r"air ?space (?:disease|process|opacit(?:y|ies))",
        r"interstitial (?:markings|prominence|disease|process|thickening)",
    ],
    "Edema": [
        r"\bedema\b",
        r"(?:vascular|venous|pulmonary) congestion|\bcongestive\b|\bchf\b",
        r"kerley|cephalization|fluid overload",
    ],
    "Consolidation": [r"consolidat(?:ion|ions|ed|ive)"],
    # "Granulomatous infection" / "old infection" is the healed disease behind granulomas.
    "Pneumonia": [
        r"pneumonia|pneumonitis",
        r"(?<!granulomatous )(?<!old )(?<!prior )(?<!previous )(?<!remote )(?<!healed )infect(?:ion|ious|ive)",
    ],
    "Atelectasis": [
        r"atelecta(?:sis|ses|tic)",
        r"(?:lung|lobar|lobe|segmental) collapse|collapse of the (?:right|left|lung|\w+ lobe)",
    ],
    "Pneumothorax": [r"pneumothora(?:x|ces)|\bptx\b"],
    "Pleural Effusion": [
        r"(?<!pericardial )effusions?",
        r"pleural fluid|hydrothorax|hydropneumothorax",
        r"blunt(?:ed|ing)(?: of)?(?: the)?(?: \w+){0,2} costophrenic",
        r"costophrenic (?:\w+ ){0,3}?(?:is |are )?(?:\w+ )?blunt(?:ed|ing)",
    ],
    "Pleural Other": [
        r"pleural (?:thickening|plaques?|calcifications?|scarring|fibrosis)",
        r"thickening of the pleura|fibrothorax|(?:apical|pleural) capp?(?:ing)?\b",
        r"pleural[- ]parenchymal (?:thickening|scarring)",
    ],
    "Fracture": [r"fractur(?:e|es|ed)|\bfx\b"],
    "Support Devices": [
        r"pacemaker|\bpacer\b|defibrillator|\baicd\b|\bicd\b|\bleads?\b",
        r"catheters?|\bpicc\b|\bports?\b|port-?a-?cath|swan[- ]ganz",
        r"(?:central|venous|jugular|\bij|subclavian|arterial|dialysis|midline|femoral) (?:venous )?(?:lines?|catheters?)",
        r"(?:endotracheal|\bet|nasogastric|\bng|orogastric|\bog|feeding|enteric|gastric|tracheostomy|chest|dobhoff) tubes?",
        r"tracheostomy|\bdrains?\b|\bdevices?\b|\bgenerator\b|\bivc filter\b",
        r"sternotomy|sternal (?:wires|sutures)|surgical clips|\bclips\b|\bstents?\b",
        r"(?:valve|valvular) (?:replacement|prosthesis)|prosthetic (?:\w+ )?valve|\bav replacement",
    ],
}

# Phrases that state an observation is normal: NEGATIVE wherever they occur.
NORMALS: dict[str, list[str]] = {
    "Cardiomegaly": [
        rf"{_HEART_OR_CM} {_GAP}{_NORMAL}",
        r"normal (?:\w+ )?(?:heart|cardiac|cardiomediastinal)",
        r"heart is normal in size|heart size (?:is )?(?:normal|within normal limits)",
    ],
    "Enlarged Cardiomediastinum": [
        rf"{_MEDIASTINUM} {_GAP}{_NORMAL}",
        r"normal (?:\w+ )?(?:mediastin|cardiomediastinal)",
    ],
    "Lung Opacity": [rf"{_LUNGS} {_GAP}clear\b", r"clear lungs"],
    "Consolidation": [rf"{_LUNGS} {_GAP}clear\b", r"clear lungs"],
    "Pneumonia": [rf"{_LUNGS} {_GAP}clear\b", r"clear lungs"],
    "Edema": [
        rf"{_LUNGS} {_GAP}clear\b",
        r"clear lungs",
        rf"(?:pulmonary )?vascula(?:rity|ture) {_GAP}{_NORMAL}",
    ],
}

# Triggers, as word-bounded phrases. Pseudo-negations ("no change") are blanked first.
def _words(*phrases: str) -> str:
    return "|".join(rf"\b{p}\b" for p in phrases)


_PSEUDO = _words(
    r"no (?:significant |interval |appreciable )?(?:change|increase|decrease|worsening)",
    r"not (?:significantly )?changed", r"without (?:significant |interval )?change",
    "to suggest", "to indicate",
)
_UNCERTAIN_PRE = _words(
    r"(?:cannot|can not|can't) (?:be )?(?:exclude|excluded|rule out|ruled out)",
    r"not (?:entirely |completely )?(?:excluded|ruled out)", "not clearly",
    r"possib(?:le|ly)", r"probab(?:le|ly)", "likely", "may", "might", "could",
    "suspicious", r"suspect(?:ed)?", r"question(?:able)?", r"concern(?:ing)? for",
    r"suggest(?:s|ed|ive|ing)?", r"consider(?:ed)?", "differential", "equivocal",
    "versus", "vs", "borderline", "worrisome", "indeterminate",
    # requests and history are not findings seen on this film
    r"evaluat(?:e|ion|ed) (?:of|for)", "rule out", "history of",
)
_NEGATION_PRE = _words(
    "no", "not", "without", "negative for", "free of", "clear of", "absence of",
    "resolution of", "removal of", "neither", "nor", "no longer", "rather than",
)
_UNCERTAIN_POST = _words(
    r"(?:is |are )?(?:possible|suspected|questioned|not excluded|not ruled out)",
    r"(?:cannot|can not) be (?:excluded|ruled out)", "versus", "vs",
)
_NEGATION_POST = _words(
    r"(?:is |are |was |were |has been |have been )?(?:not|no longer) "
    r"(?:seen|identified|present|visualized|demonstrated|evident|appreciated|noted|visible|detected)",
    r"(?:has |have )?(?:resolved|cleared)", "absent", "removed",
)
# A clause ends here: a negation before it does not reach a mention after it.
_CLAUSE_BREAK = "|".join([";", ":", _words(
    "but", "however", "although", "though", "except", "other than", "aside from",
    "apart from", "which", "whereas", r"there (?:is|are)", r"and (?:the|there)",
)])
_SENTENCE_END = r"(?<=[.?!])\s+|\n+|\.$"


@lru_cache(maxsize=1)
def _compiled():
    def one(parts: list[str]) -> re.Pattern:
        return re.compile("|".join(f"(?:{p})" for p in parts))

    return {
        "mentions": {obs: one(ps) for obs, ps in MENTIONS.items()},
        "normals": {obs: one(ps) for obs, ps in NORMALS.items()},
        "pseudo": re.compile(_PSEUDO),
        "unc_pre": re.compile(_UNCERTAIN_PRE),
        "neg_pre": re.compile(_NEGATION_PRE),
        "unc_post": re.compile(_UNCERTAIN_POST),
        "neg_post": re.compile(_NEGATION_POST),
        "break": re.compile(_CLAUSE_BREAK),
        "sentence": re.compile(_SENTENCE_END),
    }


def label_report(text: str) -> dict[str, Label]:
    """Label one report: all 14 CheXpert observations -> Label."""
    if not text or not text.strip():
        raise ValueError("empty report: cannot label a report with no text")
    rx = _compiled()
    found: dict[str, list[Label]] = {obs: [] for obs in CHEXPERT_OBSERVATIONS}
    for clause in _clauses(text.lower(), rx):
        for obs, pattern in rx["normals"].items():
            if pattern.search(clause):
                found[obs].append(Label.NEGATIVE)
        triggers = _triggers(clause, rx)
        for obs, pattern in rx["mentions"].items():
            for match in pattern.finditer(clause):
                found[obs].append(_classify(match, triggers))
    labels = {obs: _aggregate(found[obs]) for obs in CHEXPERT_OBSERVATIONS}
    labels["No Finding"] = _no_finding(labels)
    return labels


def label_vector(text: str) -> np.ndarray:
    """Label one report as int8 [14] in CHEXPERT_OBSERVATIONS order (Label codes)."""
    labels = label_report(text)
    return np.array([labels[obs] for obs in CHEXPERT_OBSERVATIONS], dtype=np.int8)


def label_reports(texts: Sequence[str]) -> np.ndarray:
    """Label many reports as int8 [N, 14]."""
    out = np.empty((len(texts), len(CHEXPERT_OBSERVATIONS)), dtype=np.int8)
    for i, text in enumerate(texts):
        out[i] = label_vector(text)
    return out


def _clauses(text: str, rx) -> list[str]:
    """Split into sentences, then into clauses at breaks; pseudo-negations blanked."""
    clauses = []
    for sentence in rx["sentence"].split(text):
        sentence = rx["pseudo"].sub(lambda m: " " * len(m.group()), sentence)
        clauses.extend(c for c in rx["break"].split(sentence) if c.strip())
    return clauses


def _triggers(clause: str, rx) -> list[tuple[int, int, Label, bool]]:
    """(start, end, kind, is_post) for each trigger; uncertainty wins overlaps ("cannot exclude")."""
    found = [(m.start(), m.end(), Label.UNCERTAIN, False) for m in rx["unc_pre"].finditer(clause)]
    found += [(m.start(), m.end(), Label.UNCERTAIN, True) for m in rx["unc_post"].finditer(clause)]
    taken = [(s, e) for s, e, _, _ in found]
    for kind, name, post in ((Label.NEGATIVE, "neg_pre", False), (Label.NEGATIVE, "neg_post", True)):
        for m in rx[name].finditer(clause):
            if not any(s < m.end() and m.start() < e for s, e in taken):
                found.append((m.start(), m.end(), kind, post))
    return found


def _classify(mention: re.Match, triggers) -> Label:
    """A negation before the mention wins, then uncertainty before it, then a trigger after it."""
    # Triggers inside the mention count as before it ("heart is not enlarged").
    before = {t[2] for t in triggers if not t[3] and t[0] < mention.end()}
    # Negation first: in "no focal consolidation, suspicious opacity or pneumothorax" the
    # uncertainty word is an adjective inside the negated list, not a hedge. The cost:
    # "no pneumothorax, possible effusion" reads the effusion as negative.
    for label in (Label.NEGATIVE, Label.UNCERTAIN):
        if label in before:
            return label
    after = [t for t in triggers if t[3] and t[0] >= mention.end()]
    if after:
        return min(after, key=lambda t: t[0])[2]
    return Label.POSITIVE


def _aggregate(mentions: list[Label]) -> Label:
    """Positive beats uncertain beats negative (references.md, CheXpert)."""
    for label in (Label.POSITIVE, Label.UNCERTAIN, Label.NEGATIVE):
        if label in mentions:
            return label
    return Label.NOT_MENTIONED


def _no_finding(labels: dict[str, Label]) -> Label:
    """POSITIVE unless a finding other than Support Devices is positive or uncertain."""
    others = (obs for obs in CHEXPERT_OBSERVATIONS if obs not in ("No Finding", "Support Devices"))
    if any(labels[obs] in (Label.POSITIVE, Label.UNCERTAIN) for obs in others):
        return Label.NOT_MENTIONED
    return Label.POSITIVE
