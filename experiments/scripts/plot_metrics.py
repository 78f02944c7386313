"""Turns a run's `metrics.jsonl` into a loss-curve plot and a markdown table.

Each training loss term (`loss/<term>`) is a solid line; its held-out evaluation
(`eval/<term>`, when the run has `eval_every`) the dashed line of the same colour.

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
  evals = sorted({k for r in records for k in r if k.startswith("eval/")})
  fig, ax = plt.subplots(figsize=(7, 4))
  for i, k in enumerate(losses):
    term, width = k.removeprefix("loss/"), 2 if k == "loss/total" else 1
    ax.plot(*_curve(records, k), label=term, lw=width, color=f"C{i}")
    if f"eval/{term}" in evals:
      ax.plot(*_curve(records, f"eval/{term}"), label=f"{term} (held-out)", lw=width, ls="--",
              color=f"C{i}")
  ax.set_xlabel("step")
  ax.set_ylabel("KL (nats)")
  ax.set_title(f"{args.name}: distillation losses")
  ax.legend()
  ax.grid(alpha=0.3)
  RESULTS.mkdir(parents=True, exist_ok=True)
  fig.savefig(RESULTS / f"{args.name}-loss.png", dpi=120, bbox_inches="tight")
  cols = ["step", *losses, *evals, "learning_rate", "grad_norm", "tokens_per_sec"]
  every = max(1, len(records) // 10)
  rows = [r for i, r in enumerate(records)
          if i % every == 0 or i == len(records) - 1 or (evals and evals[0] in r)]
  lines = [f"# {args.name}", "", args.note, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    lines.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
  lines += ["", f"![loss]({args.name}-loss.png)", ""]
  (RESULTS / f"{args.name}.md").write_text("\n".join(lines))
  print("\n".join(lines))


def _curve(records: list[dict], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of the records that hold `key`."""
  kept = [r for r in records if key in r]
  return [r["step"] for r in kept], [r[key] for r in kept]


def _cell(value) -> str:
  return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
  main()
