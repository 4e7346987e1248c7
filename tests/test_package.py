"""The CPU backend's speed options (unclip_jax.cpu): explicit, and chosen from the CPU."""
import os
import subprocess
import sys

import pytest

from unclip_jax import cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_importing_the_package_leaves_xla_flags_alone():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", "import os, unclip_jax.pipeline; print(os.environ.get('XLA_FLAGS'))"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


def test_convolution_choice_keeps_the_other_flags_and_respects_the_users():
    flag = f"{cpu.YNN_FUSION_FLAG}={cpu.YNN_FUSION_TYPES}"
    assert cpu.xla_flags("--a=1", "0.10.2", "auto") == f"--a=1 {flag}"
    assert cpu.xla_flags("--a=1", "0.10.2", "xla_default") == "--a=1"
    assert cpu.xla_flags("", "0.99.0", "auto") == ""  # XLA aborts on flags it does not know
    assert cpu.xla_flags("", "0.99.0", "eigen") == flag  # asked for explicitly
    mine = f"{cpu.YNN_FUSION_FLAG}=individual_dot"
    assert cpu.xla_flags(mine, "0.10.2", "eigen") == mine
    with pytest.raises(ValueError, match="xla_cpu_convolutions='fast'"):
        cpu.xla_flags("", "0.10.2", "fast")


def test_auto_matmul_dtype_follows_the_backend_and_the_cpu(monkeypatch):
    assert cpu.matmul_dtype("") is None and cpu.matmul_dtype("float32") == "float32"
    monkeypatch.setattr(cpu, "cpu_features", lambda: frozenset({"avx2", "amx_bf16"}))
    assert cpu.matmul_dtype("auto") == "bfloat16"  # the tests run on the CPU backend
    monkeypatch.setattr(cpu, "cpu_features", lambda: frozenset({"avx2"}))
    assert cpu.matmul_dtype("auto") is None
    import jax

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(cpu, "cpu_features", lambda: frozenset({"amx_bf16"}))
    assert cpu.matmul_dtype("auto") is None
