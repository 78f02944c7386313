"""Fine-tuning a (distilled) encoder on a GLUE task or SQuAD 2.0, as the MiniLM papers do.

`tasks` names a task and loads its featurised train / dev sets (`glue`, `squad`);
`heads` holds the task models, BERT's: pooled [CLS] -> dropout -> dense for
classification (cross-entropy) and regression (STS-B, mean squared error), start/end
logits for extractive QA ([CLS] = no answer), RoBERTa's for RoBERTa / XLM-R students,
exported as Hugging Face `*ForSequenceClassification` / `*ForQuestionAnswering`
directories. `train` fine-tunes (AdamW with warmup and linear decay, one jitted
data-parallel step, length-trimmed batches) and keeps the epoch whose dev score is
best; `score` scores a model on the dev set, during training and for the CLI's
`evaluate` command; `metrics` are the official GLUE and SQuAD 2.0 metrics. Before
anything is written, `checks` refuses config values and workdirs the run cannot use and
`source` names the model handed over (a distill run's step; an unfinished run refused).

SQuAD 2.0 has only its dev file here, so `task="squad2"` fine-tunes on the first
`squad_train_articles` dev articles and scores the rest (`squad.dev_split`): a dev-split
number, not the papers' dev F1.

The baselines that judge a distilled student come from the same config: `num_layers`
keeps the bottom layers of a pre-trained model (the truncated teacher) and
`random_init` replaces its weights by a fresh initialisation of the same shape (a
student without distillation). `run_seeds` repeats a run over seeds and writes the
`summary.json` that `experiments/scripts/report.py` tabulates.

The package re-exports the entry points a user calls: `FinetuneConfig`, `run`, `run_seeds`.
"""

from minilm_jax.finetune.train import FinetuneConfig, run, run_seeds

__all__ = ["FinetuneConfig", "run", "run_seeds"]
