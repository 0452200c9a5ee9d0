"""The `radrl` command: help, the labeler agreement table, config validation."""

from typer.testing import CliRunner

from radrl.cli import app

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("bootstrap", "models", "labels", "config"):
        assert command in result.output
    assert "--quick" in runner.invoke(app, ["bootstrap", "--help"]).output


def test_labels_prints_the_agreement_table():
    result = runner.invoke(app, ["labels", "--split", "test"])
    assert result.exit_code == 0, result.output
    assert "Cardiomegaly" in result.output and "macro average" in result.output


def test_config_prints_resolved_values_and_rejects_bad_keys():
    ok = runner.invoke(app, ["config", "configs/cxrl_tiny.yaml", "--set", "learner.lr=1e-5"])
    assert ok.exit_code == 0 and "lr: 1.0e-05" in ok.output
    bad = runner.invoke(app, ["config", "configs/cxrl_tiny.yaml", "--set", "rollout.num_step=3"])
    assert bad.exit_code == 2 and "rollout.num_step: unknown key; did you mean 'num_steps'?" in bad.output


def test_models_prints_the_shipped_quality_report():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    assert "classifier" in result.output and "diffusion/generated" in result.output
