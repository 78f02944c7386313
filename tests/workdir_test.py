"""A workdir's saved config against the run that would reuse it."""

import json

import pytest

from minilm_jax import workdir
from minilm_jax.config import DistillConfig


def test_a_run_saved_under_a_field_s_earlier_name_keeps_that_field_frozen(tmp_path):
  """`num_relation_heads` is `relation_heads` now: a v2 run saved with 12 must not resume with 48."""
  saved = json.loads(json.dumps(vars(DistillConfig(version="v2", relation_heads=12))))
  saved["num_relation_heads"] = saved.pop("relation_heads")
  (tmp_path / workdir.CONFIG_FILE).write_text(json.dumps(saved))
  old = workdir.read_config(tmp_path)
  assert old["relation_heads"] == 12 and "num_relation_heads" not in old
  workdir.check_resumable(tmp_path, old, DistillConfig(version="v2", relation_heads=12))
  with pytest.raises(ValueError, match="another configuration .relation_heads: 12 -> 48"):
    workdir.check_resumable(tmp_path, old, DistillConfig(version="v2", relation_heads=48))
