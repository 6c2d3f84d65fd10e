"""Memory pre-flight: a model that cannot fit is refused with one line before data loads or the step compiles."""

import time
from pathlib import Path
from types import SimpleNamespace

import jax
import pytest
from conftest import programs_built

from scaling_jax.cli import main
from scaling_jax.config import load_config
from scaling_jax.errors import ConfigError
from scaling_jax.info import describe
from scaling_jax.objectives.base import build_objective
from scaling_jax.parallel.mesh import build_mesh
from scaling_jax.train import memory
from scaling_jax.train.session import build_session
from scaling_jax.train.state import abstract_model
from scaling_jax.train.step import to_global

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
HUGE = "model.series=kaplan:96x12288"  # ~174B params: ~3,078 GiB per device on one device
GIB = 2**30


def test_huge_model_is_refused_in_seconds_naming_both_numbers():
    config = load_config(QUICKSTART, [HUGE])
    mesh = build_mesh(config.mesh, jax.devices()[:1])  # as `scaling-jax train` on one CPU device
    started = time.perf_counter()
    with pytest.raises(ConfigError) as refused:
        memory.preflight(config, mesh)
    took = time.perf_counter() - started
    message = str(refused.value)
    need = memory.memory_per_device(config, 1)["total_estimate"]
    assert "\n" not in message and 3000 * GIB < need < 3200 * GIB
    assert message.startswith(f"model needs ~{need / GIB:.1f} GiB per device (params+grads+AdamW ")
    assert f"but a cpu device has {memory.host_ram_bytes() / GIB:.1f} GiB (host RAM)" in message
    assert "model.series" in message and "mesh.fsdp" in message and "model.remat=full" in message
    assert took < 10, f"pre-flight took {took:.1f} s"  # ~1 s here; the full-RNG trace alone took 15-30 s


def test_simulated_cpu_devices_share_host_ram():
    budget, where = memory.device_budget(jax.devices())
    assert budget == pytest.approx(memory.host_ram_bytes() / 8)
    assert where.startswith("the 8 cpu devices share ")


def test_cli_refuses_the_huge_model_with_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    code = main(["train", QUICKSTART, HUGE, f"train.run_dir={run_dir}"])
    took = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith("error: model needs ~") and "Traceback" not in err
    assert took < 60, f"refusal took {took:.1f} s"  # it used to compile for minutes, then die in XLA
    left = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) if run_dir.exists() else []
    print(f"left in the run dir after the refusal: {left}")  # the trainer's clean-up of failed starts decides


def test_quickstart_passes_without_warning(capsys):
    config = load_config(QUICKSTART, [])
    memory.preflight(config, build_mesh(config.mesh))
    assert capsys.readouterr().err == ""


def test_check_estimate_warns_near_the_limit():
    estimate = {"params_grads_optimizer": 8 * GIB, "activations_estimate": 1.5 * GIB, "total_estimate": 9.5 * GIB}
    assert memory.check_estimate(estimate, 20 * GIB, "a fake device has 20 GiB") is None
    assert memory.check_estimate(estimate, 10 * GIB, "a fake device has 10 GiB").startswith("model needs")
    with pytest.raises(ConfigError, match=r"~9.5 GiB per device .* but a fake device has 9 GiB"):
        memory.check_estimate(estimate, 9 * GIB, "a fake device has 9 GiB")


@pytest.mark.parametrize("objective", ["causal", "mtp"])
def test_estimate_is_what_info_reports(tiny_config, objective):
    config = tiny_config(f"objective={objective}")
    assert memory.memory_per_device(config, 8) == describe(config, 8)["memory_per_device_bytes"]
    # the shapes-only trace (one fixed key) gives the real model's shapes and axes
    build = build_objective(config.objective).build_model
    assert memory._param_shapes(config, build) == abstract_model(config.model, build)[1:]


def test_fused_attention_drops_exactly_the_attention_scores_from_the_estimate(tiny_config):
    """Korthikanti et al.'s per-layer 5*heads*S^2*B bytes are the S x S scores a fused kernel never saves."""
    config = tiny_config("data.seq_len=64")
    m, d = config.model, config.data
    on = {p: memory.activation_bytes(config, 1, p) for p in ("cpu", "tpu", None)}
    assert on["cpu"] == on[None]  # CPU: auto is the XLA path, which materialises the scores
    width = 4 / 2  # float32 compute, in units of the paper's 16-bit bytes
    scores = m.layers * 5 * m.heads * d.seq_len**2 * d.batch_size * width
    assert on["cpu"] - on["tpu"] == pytest.approx(scores)  # TPU: auto is splash
    xla_on_tpu = tiny_config("data.seq_len=64", "model.attention=xla")
    assert memory.activation_bytes(xla_on_tpu, 1, "tpu") == pytest.approx(on["cpu"])


def test_compiled_check_refuses_fake_numbers_over_the_limit():
    analysis = SimpleNamespace(argument_size_in_bytes=10 * GIB, output_size_in_bytes=10 * GIB,
                               alias_size_in_bytes=10 * GIB, temp_size_in_bytes=5 * GIB)
    assert memory.compiled_peak_bytes(analysis) == 15 * GIB
    memory.check_compiled(analysis, 16 * GIB, "a gpu device (fake) has 16.0 GiB")
    with pytest.raises(ConfigError, match=r"needs 15.0 GiB per device .* but a gpu device \(fake\) has 14.0 GiB; use"):
        memory.check_compiled(analysis, 14 * GIB, "a gpu device (fake) has 14.0 GiB")


def test_compiled_check_does_not_compile_the_step_twice(tiny_config):
    session = build_session(tiny_config())
    args = session.compute.abstract_args(session.train_ds[0])
    with programs_built() as built:
        with pytest.raises(ConfigError, match="the compiled train step needs"):
            memory.check_compiled_step(session.step_fn, args, (1.0, "a fake device has 1 byte"))
        assert len(built) == 1
        state, batch = session.init_state(), to_global(session.train_ds[0], session.batch_sharding)
        before = len(built)
        session.step_fn(state, batch)
        during_step = len(built) - before
    assert during_step == 0  # jit's cache served the step compiled for the check
