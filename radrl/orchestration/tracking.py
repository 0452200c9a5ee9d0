"""What a person watches: TensorBoard scalars and image grids, a JSONL history, PNG figures."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from radrl.checkpoints import flatten  # noqa: E402
from radrl.eval.figures import image_grid_figure  # noqa: E402

# Metric keys: one namespace per kind, '<kind>/<name>[/<who>]'.
REWARD_KEY = "reward/{name}/{who}"  # who = policy | anchor | rlcf
TOTAL_KEY = "reward/total"
WIN_RATE_KEY = "reward/win_rate_vs_anchor"
TIMING_KEY = "timing/{stage}"
THROUGHPUT_KEY = "throughput/images_per_s"
CXRL_CURVES = (TOTAL_KEY, *(REWARD_KEY.format(name=n, who="rlcf") for n in ("align", "diag", "consist")))


HISTORY_FILE = "metrics.jsonl"  # one JSON object of scalars per iteration, in the run folder
FAULTS_FILE = "faults.jsonl"  # one JSON object per actor failure and its recovery


def read_history(path: Path) -> list[dict]:
    """Every iteration's logged scalars from a run's metrics.jsonl (empty if none were logged)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


class RunTracker:
    """TensorBoard writer plus a metrics.jsonl file in the run folder, and the run's figures."""

    def __init__(self, run_dir: Path, purge_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.history_path = self.run_dir / HISTORY_FILE
        self._open(purge_step)

    def _open(self, purge_step: int | None) -> None:
        # purge_step: a resumed or rolled-back run drops what was logged after its checkpoint, so each iteration
        # is recorded once and curves do not fork.
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step)
        if purge_step is not None and self.history_path.is_file():
            kept = [line for line in self.history_path.read_text().splitlines()
                    if line and json.loads(line)["iteration"] < purge_step]
            self.history_path.write_text("".join(line + "\n" for line in kept))

    def rollback(self, iteration: int) -> None:
        """Forget everything logged after `iteration` (the learner was restored to it): TensorBoard and history."""
        self.writer.close()
        self._open(purge_step=iteration + 1)

    def log_scalars(self, iteration: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, iteration)
        with self.history_path.open("a") as f:
            f.write(json.dumps({"iteration": iteration, **scalars}) + "\n")

    def log_config(self, config: dict, metrics: tuple[str, ...]) -> None:
        """The run's whole config as text, and its flattened values as TensorBoard hparams (the HPARAMS tab then
        lines runs up against `metrics`, tags this run logs as scalars). Written once, at the start of a run."""
        import yaml
        from torch.utils.tensorboard.summary import hparams

        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)
        flat = {key: value if isinstance(value, (bool, int, float, str)) else str(value)
                for key, value in flatten(config).items()}
        for summary in hparams(flat, {key: 0.0 for key in metrics}):
            self.writer.file_writer.add_summary(summary)

    def log_histograms(self, iteration: int, values: dict[str, np.ndarray]) -> None:
        """One histogram per name (rewards, advantages) at this iteration; non-finite values left out."""
        for name, array in values.items():
            array = np.asarray(array, dtype=np.float64)
            if np.isfinite(array).any():
                self.writer.add_histogram(name, array[np.isfinite(array)], iteration)

    def log_text(self, iteration: int, tag: str, markdown: str) -> None:
        self.writer.add_text(tag, markdown, iteration)

    def log_faults(self, iteration: int, faults: list[dict]) -> None:
        """Append actor failures and their recovery to faults.jsonl (an event log: never rolled back)."""
        with (self.run_dir / FAULTS_FILE).open("a") as f:
            for fault in faults:
                f.write(json.dumps({"iteration": iteration, **fault}) + "\n")

    def history(self) -> list[dict]:
        return read_history(self.history_path)

    def log_image_grid(self, iteration: int, reports: list[str], anchor: torch.Tensor, policy: torch.Tensor) -> Path:
        """Anchor (top) vs policy (bottom) for the same reports and noise, titled with the report text."""
        figure = image_grid_figure(reports, {"anchor": anchor, "policy": policy},
                                   f"iteration {iteration}: anchor (top) vs policy (bottom)")
        self.writer.add_figure("samples/anchor_vs_policy", figure, iteration, close=False)
        path = self.run_dir / "grids" / f"iter_{iteration:06d}.png"
        path.parent.mkdir(exist_ok=True)
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return path

    def write_reward_curves(self, keys: tuple[str, ...] = CXRL_CURVES) -> Path | None:
        """reward_curves.png: the given scalars (default: total reward and each RLCF component) per iteration."""
        history = self.history()
        path = self.run_dir / "reward_curves.png"
        keys = [k for k in keys if history and k in history[0]]
        if not keys:  # no training iterations (e.g. learner.iterations = 0): nothing to draw
            return None
        figure, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3), squeeze=False)
        steps = [h["iteration"] for h in history]
        for ax, key in zip(axes[0], keys):
            values = np.array([h[key] for h in history])
            ax.plot(steps, values, lw=0.8, alpha=0.5)
            window = max(1, len(values) // 8)
            ax.plot(steps[window - 1:], np.convolve(values, np.ones(window) / window, mode="valid"), lw=2)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("iteration")
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return path

    def close(self) -> None:
        self.writer.close()
