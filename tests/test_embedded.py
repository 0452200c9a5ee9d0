"""The embedded data set: real IU reports paired with phantoms of their labelled findings."""

import numpy as np

from radrl.data.embedded import embedded_pairs, findings_from_labels, random_specs, render_specs, stable_seed
from radrl.data.iu_reports import iu_split
from radrl.data.labeler import label_vector
from radrl.data.observations import CHEXPERT_OBSERVATIONS, Label


def test_findings_are_the_positive_renderable_labels():
    labels = np.full(len(CHEXPERT_OBSERVATIONS), Label.NOT_MENTIONED, dtype=np.int8)
    labels[CHEXPERT_OBSERVATIONS.index("Cardiomegaly")] = Label.POSITIVE
    labels[CHEXPERT_OBSERVATIONS.index("Pleural Effusion")] = Label.UNCERTAIN
    labels[CHEXPERT_OBSERVATIONS.index("Pleural Other")] = Label.POSITIVE  # not drawn by the renderer
    assert findings_from_labels(labels) == {"Cardiomegaly"}


def test_pairs_keep_report_labels_posture_and_image_together():
    reports = iu_split("val")[:20]
    pairs = embedded_pairs("val", postures_per_report=3, reports=reports)
    assert len(pairs) == 60
    first = pairs[:3]
    assert len({p.report_id for p in first}) == 1 and len({p.phantom.seed for p in first}) == 3
    assert len({tuple(p.phantom.posture.as_array()) for p in first}) == 3
    for pair in pairs:
        assert np.array_equal(pair.labels, label_vector(pair.report))
        assert pair.phantom.findings == findings_from_labels(pair.labels)
    again = embedded_pairs("val", postures_per_report=3, reports=reports)
    assert [p.phantom for p in again] == [p.phantom for p in pairs]  # deterministic


def test_render_specs_is_deterministic_and_parallel_safe():
    specs = random_specs(80, seed=7)
    serial, parallel = render_specs(specs, 32, processes=1), render_specs(specs, 32, processes=2)
    assert serial.shape == (80, 1, 32, 32) and serial.dtype == np.float32
    assert np.array_equal(serial, parallel)


def test_stable_seed_is_stable():
    assert stable_seed("CXR1", 0) == stable_seed("CXR1", 0) != stable_seed("CXR1", 1)
    assert stable_seed("CXR1", 0) == 43376661  # sha256-based: the same in every process and release
