"""Test set-up: 8 fake CPU devices so that sharding is exercised on any machine."""
import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent compilation cache for the run (and the processes its tests start): many tests
# compile the same tiny stages' programs again (a second pipeline over the same workdirs, the
# entry scripts); a fresh directory per run, removed at exit, so nothing is reused across runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache_dir = tempfile.mkdtemp(prefix="unclip_jax_test_compile_cache_")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

from unclip_jax import cpu  # noqa: E402  (imports no JAX)

cpu.apply_xla_flags("auto")  # As the command-line entries do by default.
