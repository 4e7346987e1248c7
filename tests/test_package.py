"""The package's import-time XLA option (unclip_jax.cpu_xla_flags)."""
import os

import unclip_jax
from unclip_jax import YNN_FUSION_FLAG, cpu_xla_flags


def test_import_adds_the_cpu_option_and_keeps_the_other_flags():
    flags = os.environ["XLA_FLAGS"]  # conftest's 8 fake devices, then the package's option
    assert "--xla_force_host_platform_device_count=8" in flags
    assert f"{YNN_FUSION_FLAG}={unclip_jax.YNN_FUSION_TYPES}" in flags


def test_a_user_setting_an_unknown_jaxlib_and_the_opt_out_are_respected(monkeypatch):
    monkeypatch.delenv("UNCLIP_JAX_KEEP_XLA_FLAGS", raising=False)
    mine = f"{YNN_FUSION_FLAG}=individual_dot"
    assert cpu_xla_flags(mine, "0.10.2") == mine
    assert cpu_xla_flags("", "0.99.0") == ""  # XLA aborts on flags it does not know
    assert cpu_xla_flags("--a=1", "0.10.2") == f"--a=1 {YNN_FUSION_FLAG}=individual_dot,reduce"
    monkeypatch.setenv("UNCLIP_JAX_KEEP_XLA_FLAGS", "1")
    assert cpu_xla_flags("--a=1", "0.10.2") == "--a=1"
