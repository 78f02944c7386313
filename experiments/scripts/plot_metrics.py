"""Turns a run's `metrics.jsonl` into a loss-curve plot and a markdown table.

    python -m experiments.scripts.plot_metrics --workdir runs/demo --name demo

writes `experiments/results/<name>-loss.png` and `experiments/results/<name>.md`.
"""

import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from absl import flags  # noqa: E402

from minilm_jax import cli_flags  # noqa: E402
from minilm_jax.metric_writer import read_metrics  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"


def main(argv=None):
  usage = "usage: python -m experiments.scripts.plot_metrics --workdir DIR --name NAME [--note TEXT]"

  def define(fv):
    flags.DEFINE_string("workdir", None, "the run's folder (metrics.jsonl)", flag_values=fv)
    flags.DEFINE_string("name", None, "results file stem", flag_values=fv)
    flags.DEFINE_string("note", "", "a line under the table (hardware, wall time)", flag_values=fv)

  args = cli_flags.parse("plot_metrics", sys.argv[1:] if argv is None else argv, define, usage,
                         required=("workdir", "name"))
  records = read_metrics(pathlib.Path(args.workdir))
  losses = sorted(k for k in records[0] if k.startswith("loss/"))
  steps = [r["step"] for r in records]
  fig, ax = plt.subplots(figsize=(7, 4))
  for k in losses:
    ax.plot(steps, [r[k] for r in records], label=k.removeprefix("loss/"), lw=2 if k == "loss/total" else 1)
  ax.set_xlabel("step")
  ax.set_ylabel("KL (nats)")
  ax.set_title(f"{args.name}: distillation losses")
  ax.legend()
  ax.grid(alpha=0.3)
  RESULTS.mkdir(parents=True, exist_ok=True)
  fig.savefig(RESULTS / f"{args.name}-loss.png", dpi=120, bbox_inches="tight")
  cols = ["step", *losses, "learning_rate", "grad_norm", "tokens_per_sec"]
  every = max(1, len(records) // 10)
  rows = [r for i, r in enumerate(records) if i % every == 0 or i == len(records) - 1]
  lines = [f"# {args.name}", "", args.note, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
  lines += ["", f"![loss]({args.name}-loss.png)", ""]
  (RESULTS / f"{args.name}.md").write_text("\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
