"""Test-wide settings (8 simulated CPU devices, no network, fast compiles), the longest test files
first, and the planted images of the segmentation and detection tests.

XLA's backend optimisations are off in tests: the computation is the same, it compiles several
times faster, and tiny test shapes run fast enough unoptimised.
"""

import os
import tempfile

import numpy as np

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests reuse each other's compilations (runs of `main` on several CPU devices compile afresh:
# train.sharding.compile_cpu_collectives_afresh).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "unimedi_jax_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The longest test files first: pytest-xdist (`--dist=loadfile`, pytest.ini) hands out whole
# files in collection order, so these start at once and the short ones fill in around them.
LONGEST_FIRST = ("test_trainer.py", "test_learning.py", "test_trainer_processes.py",
                 "test_benchmarks.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable otherwise


def planted_squares(rng, n: int, size: int, sides: tuple[int, int], mask_value: int) -> dict:
    """n noisy (size, size) images, each holding one bright square of a side in [sides), and its
    mask (mask_value on the square): the planted data of the segmentation and detection tests."""
    images = rng.normal(0, 0.3, (n, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        r, c, s = *rng.integers(0, size - sides[1], 2), rng.integers(*sides)
        images[i, r:r + s, c:c + s] += 1.5
        masks[i, r:r + s, c:c + s] = mask_value
    return {"image": images, "mask": masks}
