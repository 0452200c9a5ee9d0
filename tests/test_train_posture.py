"""`radrl train-posture`: the paper's unsupervised alignment training, on films it can read, into the file the real
CXRL config loads."""

import json

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from radrl.cli import DEFAULT_CONFIG, app
from radrl.config import load_config
from radrl.data.phantom import Posture, render_phantom
from radrl.models.posture import build_posture

from real_size import write_mimic


def test_train_posture_on_a_mimic_tree_writes_the_file_the_real_config_loads(tmp_path):
    root = write_mimic(tmp_path / "mimic-cxr-jpg")
    out = tmp_path / "posture_resnet18.safetensors"
    result = CliRunner().invoke(app, ["train-posture", str(root), "--out", str(out), "--image-size", "64",
                                      "--epochs", "1", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["films"] == 12 and summary["canonical_films"] == 12  # the train split only, one film per study
    assert out.with_suffix(".canonical.png").is_file()
    cfg = load_config(DEFAULT_CONFIG.parent / "cxrl_roentgen_mimic.yaml", [f"models.posture.weights={out}"])
    model = build_posture(cfg.models.posture)  # the real config's arch (resnet18) reads it
    assert model(torch.rand(2, 1, 512, 512)).shape == (2, 5)  # at the real config's image size

    empty = CliRunner().invoke(app, ["train-posture", str(tmp_path / "nothing")])
    assert empty.exit_code == 1 and "not a folder" in empty.output


def test_alignment_training_lowers_the_loss_and_finds_the_tilt_of_phantoms(tmp_path):
    """Films in random postures: training lowers the L2 to the canonical film below the upright start, and the
    predicted rotation follows the true one."""
    films_dir = tmp_path / "films"
    films_dir.mkdir()
    rng = np.random.default_rng(0)
    postures = [Posture.sample(rng, spread=1.5) for _ in range(96)]
    for i, posture in enumerate(postures):
        pixels = render_phantom((), posture, size=32, seed=i)
        Image.fromarray((pixels * 255).round().astype(np.uint8), mode="L").save(films_dir / f"{i:03d}.png")
    from radrl.models.posture_training import Films, posture_image_files, train_posture_regressor

    summary = train_posture_regressor(films_dir, tmp_path / "out" / "p.safetensors", arch="tiny", image_size=32,
                                      epochs=8, batch_size=16, lr=1e-3)
    assert summary["alignment_l2_per_epoch"][-1] < 0.8 * summary["alignment_l2_upright"]
    model = build_posture(load_config(None, [f"models.posture.weights={tmp_path / 'out' / 'p.safetensors'}",
                                             "models.posture.arch=tiny"]).models.posture)
    films = Films(posture_image_files(films_dir), 32)
    with torch.no_grad():
        predicted = model(torch.stack([films[i] for i in range(len(films))]))[:, 4]
    truth = torch.tensor([p.theta for p in postures])
    assert torch.corrcoef(torch.stack([predicted, truth]))[0, 1] > 0.5
