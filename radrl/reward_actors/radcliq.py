"""RadCliQ (rajpurkarlab/CXR-Report-Metric): a fixed linear model over four report-similarity
features, lower is better. The formula and constants are the published ones; each feature
comes from a pluggable backend, and every number carries the names of the backends behind it.

    features f = [RadGraph combined, BERTScore F1, CheXbert similarity, BLEU-2]   (this order)
    z = (f − mean) / scale                   RadCliQ = z · coef + intercept

Backends
- "offline" (the embedded world; nothing to download):
    radgraph  rule entity/relation F1    entities and located_at relations from a rule extractor
    bertscore bertscore[embedded-lm]     bert-score's greedy matching over the shipped report LM's
                                         hidden states, rescaled by a baseline measured on random
                                         report pairs
    chexbert  label agreement            cosine of the project labeler's one-hot status vectors
                                         (the share of the 14 observations with the same status)
    bleu2     BLEU-2                     exact: as the official code's fast_bleu, i.e. sentence BLEU with
                                         weights (½, ½) and add-ε smoothing (NLTK's method1, ε = 0.1)
- "official" (for users with the weights): RadGraph via the radgraph package, BERTScore via
  bert-score with distilroberta-base layer 5 and its baseline, CheXbert [CLS] cosine via
  f1chexbert's labeler with a local chexbert.pth, BLEU-2 as above.

An offline number is never the official metric: result tables name the backends.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu

from radrl.config import RewardsConfig
from radrl.data.labeler import label_reports
from radrl.data.observations import CHEXPERT_OBSERVATIONS, Label

FEATURES = ("radgraph", "bertscore", "chexbert", "bleu2")

# (mean, scale, coefficients, intercept), features in FEATURES order.
RADCLIQ_CONSTANTS = {
    "v0": (np.array([0.5398376019, 0.6312549595, 0.7716797867, 0.4607372065]),
           np.array([0.3018344441, 0.2246695075, 0.2475033381, 0.3033667094]),
           np.array([-0.4796252645, -0.6762170542, -0.4636657516, 0.2165861905]), 1.6416666667),
    "v1": (np.array([0.5379231241, 0.6175725628, 0.7647942121, 0.4473833540]),
           np.array([0.3028258411, 0.2243093846, 0.2539439110, 0.2989271671]),
           np.array([-0.3770836826, -0.3703000997, -0.2526162179, 4.315e-12]), 2.467e-10),
}


def radcliq(features: np.ndarray, version: str) -> np.ndarray:
    """RadCliQ of each row of `features` [N, 4] (FEATURES order): z = (f − mean)/scale; z·coef + intercept."""
    mean, scale, coef, intercept = RADCLIQ_CONSTANTS[version]
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[1] != len(FEATURES):
        raise ValueError(f"RadCliQ features must be [N, {len(FEATURES)}] in the order {FEATURES}, got {features.shape}")
    return (features - mean) / scale @ coef + intercept


def report_tokens(text: str) -> list[str]:
    """CXR-Report-Metric's BLEU tokens: lower case, '.' split off, split on single spaces, empty tokens dropped.

    Only " " separates tokens there: a newline or tab stays inside its token, as in the official code.
    """
    return [token for token in text.lower().replace(".", " .").split(" ") if token]


# fast_bleu's default (smoothing_func=1): a zero n-gram precision becomes ε / (candidate n-grams), ε = 0.1
_BLEU_SMOOTHING = SmoothingFunction(epsilon=0.1).method1


def bleu2(candidate: str, reference: str) -> float:
    """Sentence BLEU-2 of one report against one reference, as RadCliQ's official code computes it
    (fast_bleu, weights (½, ½), its default add-ε smoothing); 0 for an empty candidate or reference."""
    cand, ref = report_tokens(candidate), report_tokens(reference)
    if not cand or not ref:
        return 0.0
    return float(sentence_bleu([ref], cand, weights=(0.5, 0.5), smoothing_function=_BLEU_SMOOTHING))


def normalize_spaces(text: str) -> str:
    """What the official code does to a report before BERTScore: runs of spaces collapsed to one."""
    return re.sub(r" +", " ", text)


# ---------------------------------------------------------------- CheXbert stand-in


def generated_labels(texts: Sequence[str]) -> np.ndarray:
    """Labeler codes [N, 14] of generated reports; an empty one (the model stopped at once) mentions nothing."""
    labels = np.full((len(texts), len(CHEXPERT_OBSERVATIONS)), Label.NOT_MENTIONED, dtype=np.int8)
    written = [i for i, text in enumerate(texts) if text.strip()]
    if written:
        labels[written] = label_reports([texts[i] for i in written])
    return labels


def label_agreement(candidates: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Cosine of one-hot (observation × status) vectors from the labeler = share of the 14 observations
    whose status (positive / negative / uncertain / not mentioned) is the same in both reports."""
    return (generated_labels(candidates) == label_reports(list(references))).mean(axis=1)


# ---------------------------------------------------------------- RadGraph stand-in

_ANATOMY = {
    "lung", "heart", "cardiac", "cardiomediastinal", "mediastinum", "mediastinal", "hilar", "hilum", "pleural",
    "diaphragm", "hemidiaphragm", "costophrenic", "aorta", "aortic", "trachea", "spine", "thoracic", "clavicle",
    "rib", "apex", "apical", "base", "basilar", "lobe", "chest", "bony", "osseous", "vascular", "vasculature",
    "pulmonary", "silhouette", "airspace", "thorax", "sternum", "abdomen", "upper", "lower", "mid", "middle",
    "left", "right", "bilateral", "retrocardiac", "perihilar", "lingula", "interstitial",
}
_OBSERVATIONS = {
    "effusion", "pneumothorax", "consolidation", "opacity", "edema", "atelectasis", "cardiomegaly", "enlarged",
    "enlargement", "nodule", "mass", "granuloma", "granulomatous", "calcified", "calcification", "scarring", "scar",
    "infiltrate", "pneumonia", "fracture", "degenerative", "tortuous", "tortuosity", "hyperinflated",
    "hyperinflation", "emphysema", "catheter", "pacemaker", "sternotomy", "tube", "line", "clip", "normal", "clear",
    "unremarkable", "stable", "acute", "disease", "abnormality", "deformity", "thickening", "prominent", "widened",
    "congestion", "blunting", "blunted", "spondylosis", "osteophyte", "kyphosis", "scoliosis", "lesion", "process",
}
_NEGATION = {"no", "without", "not", "negative", "free", "absent", "resolved", "removed"}
_UNCERTAIN = {"may", "possible", "possibly", "likely", "probable", "cannot", "suspicious", "suggest", "suggests",
              "questionable", "versus", "vs", "concerning", "could", "might", "borderline"}
_WORD = re.compile(r"[a-z]+")


def _lemma(word: str) -> str:
    if word.endswith("ies") and len(word) > 5:
        return word[:-3] + "y"
    if word.endswith("s") and not word.endswith("ss") and len(word) > 4:
        return word[:-1]
    return word


def rule_graph(text: str) -> tuple[set, set]:
    """(entities, relations) of a report, RadGraph-style: anatomy (ANAT-DP) and observation terms with a
    status (OBS-DP / OBS-DA negated / OBS-U uncertain, from cues earlier in the clause); each observation is
    located_at every anatomy term of its clause."""
    entities, relations = set(), set()
    for clause in re.split(r"[.;:]|\bbut\b|\bhowever\b", text.lower()):
        words = [_lemma(w) for w in _WORD.findall(clause)]
        anatomy, status = [], "OBS-DP"
        observations = []
        for word in words:
            if word in _NEGATION:
                status = "OBS-DA"
            elif word in _UNCERTAIN and status != "OBS-DA":
                status = "OBS-U"
            if word in _ANATOMY:
                anatomy.append(word)
                entities.add((word, "ANAT-DP"))
            elif word in _OBSERVATIONS:
                observations.append((word, status))
                entities.add((word, status))
        relations.update((obs, label, "located_at", anat) for obs, label in observations for anat in anatomy)
    return entities, relations


def _f1(candidate: set, reference: set) -> float:
    """F1 of two sets; 0 when either is empty, both included, as in the official RadGraph scoring."""
    if not candidate or not reference:
        return 0.0
    overlap = len(candidate & reference)
    precision, recall = overlap / len(candidate), overlap / len(reference)
    return 0.0 if overlap == 0 else 2 * precision * recall / (precision + recall)


def graph_f1(candidate: tuple[set, set], reference: tuple[set, set]) -> float:
    """RadGraph 'combined': (entity F1 + relation F1) / 2."""
    return 0.5 * (_f1(candidate[0], reference[0]) + _f1(candidate[1], reference[1]))


# ---------------------------------------------------------------- BERTScore with a local encoder


class LocalBertScore:
    """BERTScore F1 (bert-score's greedy cosine matching, no idf) over a local transformers LM's hidden states,
    rescaled as (F − b)/(1 − b) with b = the mean F1 of random report pairs (how bert-score's baselines are made)."""

    def __init__(self, model_folder: Path, layer: int, baseline_reports: Sequence[str], device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_folder))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_folder)).to(device).eval()
        self.layer, self.device = layer, device
        rng = np.random.default_rng(0)
        pairs = rng.choice(len(baseline_reports), size=(256, 2))
        raw = self.raw_f1([baseline_reports[i] for i in pairs[:, 0]], [baseline_reports[j] for j in pairs[:, 1]])
        self.baseline = float(raw.mean())

    @torch.no_grad()
    def _embed(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=256, return_tensors="pt").to(self.device)
        hidden = self.model(**batch, output_hidden_states=True).hidden_states[self.layer]
        mask = batch["attention_mask"]
        weights = mask.float().clone()
        weights[:, 0] = 0.0  # BOS, and below EOS: weight 0, as bert-score does for [CLS] / [SEP]
        lengths = mask.sum(dim=1)
        weights[torch.arange(len(texts)), lengths - 1] = 0.0
        return hidden.float(), mask, weights

    def raw_f1(self, candidates: Sequence[str], references: Sequence[str]) -> np.ndarray:
        from bert_score.utils import greedy_cos_idf

        scores = np.zeros(len(candidates))
        keep = [i for i, (c, r) in enumerate(zip(candidates, references)) if c.strip() and r.strip()]
        for start in range(0, len(keep), 64):
            index = keep[start:start + 64]
            ref, ref_mask, ref_w = self._embed([references[i] for i in index])
            hyp, hyp_mask, hyp_w = self._embed([candidates[i] for i in index])
            _, _, f1 = greedy_cos_idf(ref, ref_mask, ref_w, hyp, hyp_mask, hyp_w)
            scores[index] = f1.cpu().numpy()
        return scores

    def __call__(self, candidates: Sequence[str], references: Sequence[str]) -> np.ndarray:
        raw = self.raw_f1(candidates, references)
        return np.where(raw == 0, 0.0, (raw - self.baseline) / (1 - self.baseline))


# ---------------------------------------------------------------- the scorer


class RadCliQScorer:
    """The four RadCliQ features of (candidate, reference) pairs from the configured backends, and RadCliQ."""

    def __init__(self, cfg: RewardsConfig, baseline_reports: Sequence[str], device: str = "cpu"):
        self.backends = cfg.radcliq_backends
        if self.backends == "offline":
            from radrl.models.weights import embedded_path

            self.bertscore = LocalBertScore(embedded_path("decoder"), cfg.bertscore_layer, baseline_reports, device)
            self.names = {"radgraph": "rule entity/relation F1", "bertscore": "bertscore[embedded report LM]",
                          "chexbert": "labeler agreement", "bleu2": "BLEU-2"}
        else:
            self._load_official(cfg, device)

    def _load_official(self, cfg: RewardsConfig, device: str) -> None:
        from radrl.models.weights import MissingWeightsError

        try:
            from bert_score import BERTScorer
            from f1chexbert.f1chexbert import bert_labeler
            from radgraph import RadGraph
        except ImportError as error:
            raise MissingWeightsError(f"rewards.radcliq_backends = 'official' needs the packages of "
                                      f"`pip install -e '.[radcliq]'` ({error})") from error
        if cfg.chexbert_weights is None or not Path(cfg.chexbert_weights).is_file():
            raise MissingWeightsError(f"rewards.chexbert_weights: '{cfg.chexbert_weights}' is not a file; give the "
                                      "path of chexbert.pth (StanfordAIMI/RRG_scorers on the HF hub)")
        try:
            self.bert = BERTScorer(model_type=cfg.bertscore_model, num_layers=5, rescale_with_baseline=True,
                                   lang="en", device=device)
            # radgraph picks cuda:0 whenever CUDA is visible; say which (a Ray actor sees only its own GPUs)
            self.radgraph = RadGraph(model_type=cfg.radgraph_model, cuda=0 if device.startswith("cuda") else -1)
            self.chexbert = bert_labeler(inference=True)
            state = torch.load(cfg.chexbert_weights, map_location="cpu")["model_state_dict"]
            self.chexbert.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
            self.chexbert.to(device).eval()
        except OSError as error:
            raise MissingWeightsError(f"RadCliQ official backends: could not load a model ({error}); they must be in "
                                      "the local Hugging Face cache (or set HF_HUB_OFFLINE=0 where downloads work)")
        from transformers import BertTokenizer

        self.chexbert_tokenizer = BertTokenizer.from_pretrained("bert-base-uncased")
        self.device = device
        self.names = {"radgraph": "RadGraph", "bertscore": f"BERTScore[{cfg.bertscore_model} L5, rescaled]",
                      "chexbert": "CheXbert [CLS] cosine", "bleu2": "BLEU-2"}

    def features(self, candidates: Sequence[str], references: Sequence[str]) -> np.ndarray:
        """[N, 4] features in FEATURES order."""
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidate reports for {len(references)} references")
        bleu = [bleu2(c, r) for c, r in zip(candidates, references)]
        # BERTScore's input, as the official code prepares it
        spaced = [normalize_spaces(c) for c in candidates], [normalize_spaces(r) for r in references]
        if self.backends == "offline":
            graph = [graph_f1(rule_graph(c), rule_graph(r)) for c, r in zip(candidates, references)]
            bert = self.bertscore(*spaced)
            labels = label_agreement(candidates, references)
        else:
            graph = self._official_graph(candidates, references)
            bert = self.bert.score(*spaced)[2].numpy()
            labels = self._official_chexbert(candidates, references)
        return np.stack([np.asarray(graph), np.asarray(bert), np.asarray(labels), np.asarray(bleu)], axis=1)

    def _official_graph(self, candidates, references) -> list[float]:
        def graph(annotation: dict) -> tuple[set, set]:
            entities = annotation.get("entities", {})
            nodes = {key: (e["tokens"].lower(), e["label"]) for key, e in entities.items()}
            edges = {(*nodes[key], relation, *nodes[target]) for key, e in entities.items()
                     for relation, target in e.get("relations", []) if target in nodes}
            return set(nodes.values()), edges

        out = self.radgraph(list(candidates) + list(references))
        n = len(candidates)
        return [graph_f1(graph(out[str(i)]), graph(out[str(n + i)])) for i in range(n)]

    @torch.no_grad()
    def _official_chexbert(self, candidates, references) -> np.ndarray:
        def cls(texts):
            batch = self.chexbert_tokenizer(list(texts), padding=True, truncation=True, max_length=512,
                                            return_tensors="pt").to(self.device)
            return self.chexbert.bert(batch["input_ids"], attention_mask=batch["attention_mask"])[0][:, 0]

        return torch.nn.functional.cosine_similarity(cls(candidates), cls(references)).cpu().numpy()

    def score(self, candidates: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
        """Per pair: each feature, RadCliQ v0 and v1."""
        features = self.features(candidates, references)
        result = {name: features[:, i] for i, name in enumerate(FEATURES)}
        result.update(radcliq_v0=radcliq(features, "v0"), radcliq_v1=radcliq(features, "v1"))
        return result


def bleu4(candidates: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 of the candidates against one reference each."""
    with warnings.catch_warnings():  # nltk warns (and returns ~1e-155) when no 4-gram matches: that is 0
        warnings.simplefilter("ignore")
        score = corpus_bleu([[report_tokens(r)] for r in references], [report_tokens(c) for c in candidates])
    return float(score) if score > 1e-12 else 0.0


def sentence_bleu4(candidate: str, reference: str) -> float:
    """BLEU-4 of one report (the 'BLEU-4 reward' of the LM-RRG ablation); 0 without a matching 4-gram."""
    return bleu4([candidate], [reference])
