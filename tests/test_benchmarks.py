"""Smoke tests of the benchmark scripts: each runs its smallest setting in a subprocess.

The subprocesses compile with XLA backend optimisation level 0 (the same computation,
compiled faster) on one CPU device (or the devices a scaling worker asks for).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST_XLA = "--xla_backend_optimization_level=0"


def _run(*args: str) -> dict:
    env = dict(os.environ, XLA_FLAGS=FAST_XLA, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _positive(result: dict, keys) -> None:
    for key in keys:
        assert result[key] is not None and result[key] > 0, (key, result[key])


@pytest.fixture(scope="module")
def train_step():
    return _run("benchmarks.train_step", "--preset=tiny", "--compare-torch", "--no-torch-compile",
                "--steps=2", "--rounds=1")


def test_train_step_reports_positive_numbers(train_step):
    _positive(train_step, ["jax_samples_per_s", "torch_samples_per_s", "flops_per_step", "mfu",
                           "peak_bytes", "compile_s", "xla_flops", "peak_matmul_flops"])
    assert "torch_compile_samples_per_s" in train_step
    assert train_step["mfu"] < 1


def test_analytic_flops_match_compiled_hlo(train_step):
    np.testing.assert_allclose(train_step["flops_per_step"], train_step["xla_matmul_flops"],
                               rtol=1e-3)
    assert train_step["xla_flops"] > train_step["xla_matmul_flops"]  # plus elementwise work


def test_torch_reference_follows_the_jax_step(train_step):
    """Same weights, same batch: the losses of the first steps agree, and they change from
    step to step (so the optimiser, EMA and centre updates agree too)."""
    jax_losses, torch_losses = train_step["jax_losses"], train_step["torch_losses"]
    np.testing.assert_allclose(torch_losses, jax_losses, rtol=2e-6)
    assert np.min(np.abs(np.diff(jax_losses))) > 1e-3


def test_compile_paper_config_tiny():
    result = _run("benchmarks.compile_paper_config", "--preset=tiny", "--remat=both")
    assert [r["remat"] for r in result["runs"]] == [False, True]
    for run in result["runs"]:
        _positive(run, ["params", "trainable_params", "flops_per_step", "xla_flops",
                        "peak_bytes", "compile_s"])
    # remat recomputes the forward pass in the backward pass: more executed FLOPs
    assert result["runs"][1]["xla_matmul_flops"] > result["runs"][0]["xla_matmul_flops"]


def test_scaling_fsdp_bytes_match_the_analytic_count():
    result = _run("benchmarks.scaling", "--preset=tiny", "--devices=2", "--modes=fsdp",
                  "--steps=1")
    (run,) = result["runs"]
    _positive(run, ["step_s", "compile_s", "hlo_comm_total"])
    predicted = run["analytic_comm_bytes"]
    for kind in ("all-gather", "reduce-scatter"):
        np.testing.assert_allclose(run["hlo_comm_bytes"][kind], predicted[kind], rtol=0.05)
    assert {(r["devices"], r["mode"]) for r in result["paper"]} == {
        (8, "data"), (8, "fsdp"), (64, "data"), (64, "fsdp")}
