"""Test set-up: 8 fake CPU devices so that sharding is exercised on any machine."""
import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from unclip_jax import cpu  # noqa: E402  (imports no JAX)

cpu.apply_xla_flags("auto")  # As the command-line entries do by default.
