"""`radrl bootstrap`: a quick plan runs end to end, and the shipped quality report is what the
shipped files measure."""

import json

import numpy as np
import pytest
import torch

from radrl.bootstrap import (
    BootstrapPlan,
    classifier_auroc,
    held_out_specs,
    posture_errors,
    run_bootstrap,
    target_matrix,
)
from radrl.data.embedded import render_specs
from radrl.models.classifier import load_tiny_classifier
from radrl.models.posture import load_posture
from radrl.models.weights import EMBEDDED_DIR, embedded_path


def test_shipped_classifier_auroc_is_remeasured_from_the_shipped_file():
    quality = json.loads(embedded_path("quality.json").read_text())
    plan = BootstrapPlan(**quality["plan"])
    classifier = load_tiny_classifier(embedded_path("classifier.safetensors"))
    specs = held_out_specs(plan, quality["seed"])
    images = torch.from_numpy(render_specs(specs, quality["image_size"]))
    aurocs = classifier_auroc(classifier, images, target_matrix(specs, classifier.chexpert_names()))
    assert np.mean(list(aurocs.values())) == pytest.approx(quality["classifier_auroc"]["mean"], abs=1e-5)
    posture = posture_errors(load_posture(embedded_path("posture.safetensors"), "tiny"), images, specs)
    assert posture["mae_r_align"] == pytest.approx(quality["posture"]["mae_r_align"], abs=1e-5)


def test_shipped_models_are_small_and_useful():
    total = sum(f.stat().st_size for f in EMBEDDED_DIR.rglob("*") if f.is_file())
    assert total < 40e6
    quality = json.loads(embedded_path("quality.json").read_text())
    assert quality["classifier_auroc"]["mean"] > 0.75
    assert quality["posture"]["mae_r_align"] < abs(quality["posture"]["r_align_truth_mean"])


@pytest.mark.slow
def test_quick_bootstrap_writes_every_model(tmp_path):
    quality = run_bootstrap(tmp_path / "tiny", BootstrapPlan.quick())
    written = {p.name for p in (tmp_path / "tiny").iterdir()}
    assert written == {"tokenizer", "classifier.safetensors", "classifier_op_threshs.json", "posture.safetensors",
                       "clip", "decoder", "diffusion", "quality.json", "samples.png"}
    assert not (tmp_path / "tiny.partial").exists()
    assert json.loads((tmp_path / "tiny" / "quality.json").read_text()) == quality
    assert set(quality) >= {"classifier_auroc", "posture", "clip_retrieval", "decoder_perplexity", "diffusion"}
