"""Downstream evaluation: GLUE and SQuAD 2.0 fine-tuning and their official metrics."""
