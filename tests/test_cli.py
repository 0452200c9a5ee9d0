"""The `radrl` command: help, the labeler agreement table, config validation."""

from typer.testing import CliRunner

from radrl.cli import app

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("bootstrap", "models", "labels", "config", "train", "summarize"):
        assert command in result.output
    assert "--quick" in runner.invoke(app, ["bootstrap", "--help"]).output


def test_labels_prints_the_agreement_table():
    result = runner.invoke(app, ["labels", "--split", "test"])
    assert result.exit_code == 0, result.output
    assert "Cardiomegaly" in result.output and "macro average" in result.output


def test_config_prints_resolved_values_and_rejects_bad_keys():
    ok = runner.invoke(app, ["config", "configs/cxrl_tiny.yaml", "--set", "learner.lr=1e-5"])
    assert ok.exit_code == 0 and "lr: 1.0e-05" in ok.output
    real = runner.invoke(app, ["config", "configs/cxrl_roentgen_mimic.yaml"])  # the README's cluster table
    assert "The roles ask for 22 CPU, 4.75 GPU in total (learner 1 × (4 CPU, 1 GPU); rollout 3 × (4 CPU, 1 GPU); " \
           "rewards 3 × (2 CPU, 0.25 GPU))" in real.output
    bad = runner.invoke(app, ["config", "configs/cxrl_tiny.yaml", "--set", "rollout.num_step=3"])
    assert bad.exit_code == 2 and "rollout.num_step: unknown key; did you mean 'num_steps'?" in bad.output


def test_models_prints_the_shipped_quality_report():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    assert "classifier" in result.output and "diffusion/generated" in result.output


def test_train_runs_in_process_and_prints_the_table(tmp_path):
    result = runner.invoke(app, ["train", "--local", "--set", "learner.iterations=1", "--set", "rollout.num_steps=2",
                                 "--set", "rollout.batch_size=4", "--set", "rollout.samples_per_report=2",
                                 "--set", "learner.batch_size=4", "--set", "logging.eval_reports=4",
                                 "--set", "evaluation.reports=16", "--set", "evaluation.diversity_reports=2",
                                 "--set", "evaluation.diversity_samples=2", "--set", f"logging.run_dir={tmp_path}"])
    assert result.exit_code == 0, result.output
    assert "| r_align |" in result.output and "| total (λ-weighted) |" in result.output
    # then `radrl eval` on the final checkpoint: the image metrics next to the rewards
    assert "FID" in result.output and "MS-SSIM" in result.output and (tmp_path / "eval" / "iter_000001").is_dir()
    summary = runner.invoke(app, ["summarize", str(tmp_path), str(tmp_path)])
    assert summary.exit_code == 0 and "mean ± std" in summary.output


def test_train_rejects_a_bad_config_before_starting_anything():
    result = runner.invoke(app, ["train", "--local", "--set", "rewards.lambda_diagnosis=3"])
    assert result.exit_code == 2 and "rewards.lambda_diagnosis: unknown key; did you mean 'lambda_diag'?" in result.output
