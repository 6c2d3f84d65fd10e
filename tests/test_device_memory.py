"""A trainer takes 95% of its accelerator's memory for the step (jax's default is 75%), unless the user chose."""

import os

import pytest

from scaling_jax.cli import main
from scaling_jax.parallel.device_memory import MEM_FRACTION_ENV, claim_device_memory


def test_a_trainer_takes_95_percent_unless_the_user_configured_the_allocator():
    env = {}
    assert claim_device_memory(env) and env == {MEM_FRACTION_ENV: "0.95"}
    for users in ({MEM_FRACTION_ENV: "0.5"}, {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
                  {"XLA_PYTHON_CLIENT_ALLOCATOR": "platform"}):
        env = dict(users)
        assert not claim_device_memory(env) and env == users


@pytest.mark.parametrize(("command", "claims"), [("train", True), ("resume", True), ("sweep", True), ("info", False)])
def test_only_the_training_commands_claim_the_device(monkeypatch, tmp_path, command, claims):
    monkeypatch.setenv(MEM_FRACTION_ENV, "unset")  # recorded, so whatever main sets is undone after the test
    monkeypatch.delenv(MEM_FRACTION_ENV)
    assert main([command, str(tmp_path / "missing")]) == 2  # refused after the claim, before any work
    assert (os.environ.get(MEM_FRACTION_ENV) == "0.95") is claims
