"""Config loading: YAML + dotted overrides, strict keys and types, clear errors."""

import pytest
import yaml

from scaling_jax.config import Config, load_config, save_config, to_dict
from scaling_jax.errors import ConfigError


def test_overrides_apply_with_yaml_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  layers: 3\ntrain:\n  steps: 10\noptimizer:\n  warmup_steps: 2\n")
    cfg = load_config(str(path), ["model.layers=4", "optimizer.lr=1e-3", "model.tie_embeddings=false",
                                  "mesh.rules=[[embed, null]]"])
    assert cfg.model.layers == 4 and cfg.train.steps == 10 and cfg.optimizer.lr == 1e-3
    assert cfg.model.tie_embeddings is False and cfg.mesh.rules == [["embed", None]]


def test_section_scalar_override_selects_its_name():
    assert load_config(None, ["objective=causal"]).objective.name == "causal"


@pytest.mark.parametrize("override, message", [
    (["model.layer=4"], "unknown config key 'model.layer'; did you mean 'model.layers'"),
    (["model.layers=four"], "model.layers must be int"),
    (["model.layers=-2"], "model.layers must be > 0"),
    (["model.heads=3", "model.kv_heads=2"], "must divide model.heads"),
    (["data.seq_len=4096"], "exceeds model.max_seq_len"),
    (["model.mlp=relu"], "is not one of geglu, swiglu"),
    (["model.series=passuntil:1", "model.layers=2"], "conflicts with model.series"),
    (["model.series=gpt:7"], "model.series='gpt:7' is unknown"),
    (["layers"], "is not key=value"),
])
def test_bad_fields_name_the_field_and_the_fix(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, override)


def test_missing_or_malformed_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_series_fills_the_shape_and_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.series=passuntil:2"])
    assert (cfg.model.layers, cfg.model.heads, cfg.model.d_model, cfg.model.d_ff) == (8, 5, 320, 800)
    assert cfg.model.vocab_size == 384  # from the byte tokenizer
    save_config(cfg, str(tmp_path / "config.yaml"))
    again = load_config(str(tmp_path / "config.yaml"))
    assert to_dict(again) == to_dict(cfg)


def test_shipped_defaults_yaml_matches_the_dataclasses():
    with open("configs/defaults.yaml") as f:
        shipped = yaml.safe_load(f)
    assert shipped == to_dict(Config())


def test_parsing_a_config_builds_no_tokenizer_and_imports_nothing_heavy():
    """Byte vocabularies are known from the spec; any other tokenizer is read only where it is built."""
    import subprocess
    import sys

    code = ("import sys; from scaling_jax.config import load_config; "
            "c = load_config(None, ['data.tokenizer=seqio:no_such_task', 'data.source=seqio:no_such_task']); "
            "b = load_config(None, ['data.tokenizer=byte:512']); "
            "print(c.model.vocab_size, b.model.vocab_size, "
            "sorted(m for m in ('tensorflow', 'seqio', 'jax', 'sentencepiece', 'tokenizers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["0", "512"] and out[2:] == ["[]"]
