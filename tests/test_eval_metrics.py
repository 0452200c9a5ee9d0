"""Evaluation metrics on cases with known answers: FID, AUROC, MS-SSIM, label differences, ablation tables."""

import numpy as np
import pytest
import torch

from radrl.config import load_config
from radrl.eval.ablation import ablation_tables, aggregate, grid
from radrl.eval.image_metrics import fid, ms_ssim, ms_ssim_diversity, ms_ssim_settings, per_class_auroc
from radrl.eval.report import markdown_table
from radrl.eval.rrg_eval import differing_labels
from radrl.models.classifier import tiny_classifier


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return tiny_classifier().eval()


def test_fid_of_identical_sets_is_zero_and_grows_with_a_shift(classifier):
    images = torch.rand(48, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    same = fid(images, images, classifier)
    assert abs(same) < 1e-3
    darker = fid(images, images * 0.5, classifier)
    much_darker = fid(images, images * 0.1, classifier)
    assert 0 < darker < much_darker


def test_fid_needs_two_images_per_set(classifier):
    with pytest.raises(ValueError, match="at least 2 images"):
        fid(torch.rand(1, 1, 32, 32), torch.rand(4, 1, 32, 32), classifier)


def test_auroc_of_a_perfect_and_a_reversed_scorer():
    targets = np.array([[1, 0], [0, 1], [1, np.nan], [0, 0], [1, 1]], dtype=float)
    perfect = np.nan_to_num(targets, nan=0.5) * 0.8 + 0.1
    assert per_class_auroc(perfect, targets, ("a", "b")) == {"a": 1.0, "b": 1.0, "mean": 1.0}
    assert per_class_auroc(1 - perfect, targets, ("a", "b")) == {"a": 0.0, "b": 0.0, "mean": 0.0}


def test_auroc_leaves_out_uncertain_labels_and_one_sided_classes():
    targets = np.array([[1, 1], [0, 1], [np.nan, 1], [0, 1]], dtype=float)
    scores = np.array([[0.9, 0.1], [0.2, 0.3], [0.0, 0.5], [0.4, 0.7]])  # the NaN row would break the ranking
    result = per_class_auroc(scores, targets, ("a", "always"))
    assert result == {"a": 1.0, "mean": 1.0}  # 'always' has no negatives: no AUROC
    with pytest.raises(ValueError, match="no class has both"):
        per_class_auroc(scores[:, 1:], targets[:, 1:], ("always",))


def test_ms_ssim_of_identical_images_is_one_and_of_different_ones_lower():
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(ms_ssim(images, images), torch.ones(3), atol=1e-5)
    assert (ms_ssim(images, images.roll(1, dims=0)) < 0.5).all()
    same = torch.stack([images] * 3, dim=1)  # [3 reports, 3 identical samples]
    assert ms_ssim_diversity(same) == pytest.approx(1.0, abs=1e-5)
    varied = torch.rand(3, 3, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    assert ms_ssim_diversity(varied) < 0.5


def test_ms_ssim_settings_follow_the_image_size():
    assert ms_ssim_settings(256) == (11, (0.0448, 0.2856, 0.3001, 0.2363, 0.1333))
    window, betas = ms_ssim_settings(32)
    assert window == 7 and len(betas) == 3 and sum(betas) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="larger than 24 px"):
        ms_ssim_settings(16)
    with pytest.raises(ValueError, match="samples ≥ 2"):
        ms_ssim_diversity(torch.rand(2, 1, 1, 32, 32))


def test_differing_labels_names_what_was_added_and_missed():
    reference = "There is a large right pleural effusion. No pneumothorax."
    assert differing_labels(reference, reference) == []
    generated = "Cardiomegaly. No pleural effusion."
    assert differing_labels(generated, reference) == ["+Cardiomegaly", "−Pleural Effusion"]


def test_markdown_table_rows_are_metrics_and_columns_models():
    table = markdown_table({"metrics": {"anchor": {"fid": 2.0}, "policy": {"fid": 1.5, "clip": 0.3}},
                            "labels": {"fid": "FID", "clip": "CLIP"}})
    assert table.splitlines() == ["| metric | anchor | policy |", "|---|---|---|", "| FID | 2.0000 | 1.5000 |",
                                  "| CLIP | – | 0.3000 |"]


def results(variant, values, metric="fid"):
    return [{"variant": variant, "seed": s, "metrics": {metric: v}} for s, v in enumerate(values)]


def test_ablation_tables_give_mean_and_std_over_seeds():
    found = results("full", [1.0, 2.0, 3.0]) + results("anchor", [4.0]) + results("no_ace", [1.0, 3.0])
    assert aggregate(found, "full", "fid") == (2.0, 1.0, 3)
    assert aggregate(found, "no_rlcf", "fid") is None
    table = ablation_tables("cxrl", found, seeds=3)
    measured = table.split("the paper")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in measured.splitlines() if line.startswith("| ")}
    assert "2.0000 ± 1.0000" in rows["CXRL (full: LoRA + ACE, RLCF, all rewards)"]
    assert "4.0000 ± 0.0000" in rows["anchor (frozen base)"] and "(n=" not in rows["anchor (frozen base)"]
    assert "2.0000 ± 1.4142 (n=2)" in rows["w/o ACE"]  # a seed missing is flagged
    assert "not run" in rows["w/o RLCF (direct feedback)"]
    assert "| 1.510 |" in table.split("the paper")[1]  # the paper's FID of the full model follows


def test_grids_have_every_variant_per_seed_and_dependent_cells_start_from_their_seeds_supervised_run(tmp_path):
    cxrl = grid(load_config(None, []), seeds=3, out_dir=tmp_path)
    assert len(cxrl) == 1 + 6 * 3 and "anchor" in cxrl and "consist_only_seed2" in cxrl
    rrg_cfg = load_config(None, ["task=rrg", "rollout.samples_per_report=2"])
    rrg = grid(rrg_cfg, seeds=2, out_dir=tmp_path)
    assert list(rrg)[:2] == ["supervised_seed0", "supervised_seed1"]  # before the cells that start from them
    cell = rrg["bleu4_seed1"].config(rrg_cfg, rrg)
    assert cell.rewards.rrg_reward == "bleu4" and cell.seed == 1 and cell.orchestration.local
    assert cell.learner.supervised_checkpoint == tmp_path / "cells" / "supervised_seed1"
    assert rrg["supervised_seed0"].config(rrg_cfg, rrg).learner.iterations == 0
    assert list(grid(rrg_cfg, 1, tmp_path, only=("full",))) == ["supervised_seed0", "full_seed0"]
    with pytest.raises(ValueError, match="unknown rrg variant"):
        grid(rrg_cfg, 1, tmp_path, only=("no_ace",))


def test_ce_f1_change_per_observation_with_a_paired_bootstrap_error():
    import math

    from radrl.eval.text_metrics import ce_f1_changes

    references = ["Small left pleural effusion.", "Moderate right pleural effusion.", "The lungs are clear.",
                  "No acute disease."]
    before = ["The lungs are clear."] * 4  # no effusion written: F1 0
    after = ["Small left pleural effusion.", "The lungs are clear.", "Small pleural effusion.", "No acute disease."]
    changes = ce_f1_changes(before, after, references, resamples=200)
    effusion = changes["Pleural Effusion"]
    assert effusion["change"] == 0.5  # after: 1 hit, 2 written, 2 true → 2·1 / (2 + 2)
    assert effusion["se"] > 0
    assert math.isnan(changes["Pneumothorax"]["change"])  # nobody marks it positive: no F1 either side


def test_macro_ce_f1_averages_the_observations_with_five_positive_references():
    """Cardiomegaly: 5 references, written in 10 reports, all 5 found → F1 = 2·5 / (10 + 5) = 2/3; Pleural Effusion:
    6 references, never written → 0; No Finding has 4 positive references (< 5) and is left out: (2/3 + 0) / 2."""
    from radrl.eval.text_metrics import ce_macro_f1

    references = ["Cardiomegaly."] * 5 + ["Small left pleural effusion."] * 6 + ["The lungs are clear."] * 4
    candidates = ["Cardiomegaly."] * 10 + ["The lungs are clear."] * 5
    assert ce_macro_f1(candidates, references) == pytest.approx(1 / 3)
    assert np.isnan(ce_macro_f1(candidates, references, min_positives=7))  # no observation has 7


def test_macro_ce_f1_change_with_a_paired_bootstrap_error():
    """The macro of the example above (before: 1/3) against reports that write 3 of the 6 effusions and
    cardiomegaly 7 times, its 5 included (after): effusion F1 2·3 / (3 + 6) = 2/3, cardiomegaly 2·5 / (7 + 5) =
    5/6, macro 3/4, a rise of 5/12; the same reports twice change nothing, with no spread."""
    from radrl.eval.text_metrics import ce_macro_f1_change

    references = ["Cardiomegaly."] * 5 + ["Small left pleural effusion."] * 6 + ["The lungs are clear."] * 4
    before = ["Cardiomegaly."] * 10 + ["The lungs are clear."] * 5
    after = (["Cardiomegaly."] * 5 + ["Small left pleural effusion."] * 3 + ["Cardiomegaly."] * 2
             + ["The lungs are clear."] * 5)
    change, se = ce_macro_f1_change(before, after, references, resamples=300)
    assert change == pytest.approx(5 / 12)
    assert 0 < se < 5 / 12
    assert ce_macro_f1_change(before, before, references) == (0.0, 0.0)
    assert all(np.isnan(ce_macro_f1_change(before, after, references, min_positives=7)))


def test_attention_overlaps_by_hand():
    from radrl.eval.region_attention import attention_overlaps
    # 2 images × 3 regions × 4 patches
    attention = np.array([[[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0, 1]],
                          [[1, 0, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0, 1]]])
    overlap = attention_overlaps(attention)
    # image 0: pairs (0,1) 0.5, (0,2) 0, (1,2) 0; image 1: 0, 0, 0.5 → mean 1/6
    assert overlap["between_regions"] == pytest.approx(1 / 6)
    # region 0: 1, region 1: 0, region 2: 1 → 2/3
    assert overlap["between_images"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="≥ 2 images"):
        attention_overlaps(attention[:1])


def test_attention_in_boxes_counts_the_mass_on_each_regions_atlas_box():
    from radrl.eval.region_attention import attention_in_boxes
    from radrl.models.report_generator import REGIONS
    # every region looks at one patch of an 8 × 8 grid: row 3, column 1, i.e. x 0.125-0.25, y 0.375-0.5
    attention = np.zeros((1, 3, 64))
    attention[0, :, 3 * 8 + 1] = 1.0
    # right lung (x 0.12-0.48, y 0.16-0.74): inside; right upper zone (y 0.18-0.36): not; right mid zone
    # (y 0.36-0.54): inside → 2 of 3
    assert REGIONS[:3] == ("right lung", "right upper lung zone", "right mid lung zone")
    assert attention_in_boxes(attention) == pytest.approx(2 / 3)
