"""Test-wide settings: 8 simulated CPU devices (sharding tests), no network, fast compiles.

XLA's backend optimisations are off in tests: the computation is the same, it compiles several
times faster, and tiny test shapes run fast enough unoptimised.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
