"""Smoke tests of the benchmark scripts, and checks of the numbers they are built on.

Each script runs its smallest setting in a subprocess, one after the other, with XLA backend
optimisation level 0 (the same computation, compiled faster). The HLO parsers are checked
in-process on programs with known FLOPs and collectives.
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a folder of scripts, not an installed package
from benchmarks import common, device_suite, retrieval_bound, selection_bound

FAST_XLA = "--xla_backend_optimization_level=0"
RUNS = {
    "train_step": ["benchmarks.train_step", "--preset=tiny", "--compare-torch",
                   "--no-torch-compile", "--steps=2", "--rounds=1", "--breakdown", "--profile=5"],
    "compile": ["benchmarks.compile_paper_config", "--preset=tiny", "--remat=both"],
    "scaling": ["benchmarks.scaling", "--preset=tiny", "--devices=2", "--modes=data",
                "--steps=1"],
    "decoders": ["benchmarks.decoders", "--preset=tiny", "--repeats=1"],
    # A memory budget, as an accelerator reports one, so the batch estimate runs too.
    "device_suite": ["benchmarks.device_suite", "--preset=tiny", "--steps=2",
                     "--pipeline_examples=16", "--device_memory_gb=0.005"],
}


@pytest.fixture(scope="module")
def results() -> dict:
    env = dict(os.environ, XLA_FLAGS=FAST_XLA, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = {}
    for name, args in RUNS.items():  # one at a time: the other xdist worker has a core
        proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        stdout, stderr = proc.stdout, proc.stderr
        assert proc.returncode == 0, f"{name}:\n{stderr[-4000:]}"
        out[name] = json.loads(stdout.strip().splitlines()[-1])
    return out


def _positive(result: dict, keys) -> None:
    for key in keys:
        assert result[key] is not None and result[key] > 0, (key, result[key])


def test_train_step_reports_positive_numbers(results):
    r = results["train_step"]
    _positive(r, ["jax_samples_per_s", "torch_samples_per_s", "flops_per_step", "mfu",
                  "peak_bytes", "compile_s", "xla_flops", "peak_matmul_flops"])
    assert r["torch_compile_samples_per_s"] is None  # skipped by --no-torch-compile
    assert r["mfu"] < 1
    assert r["torch_over_jax"] > 0
    for part in ("block", "attention core", "block (torch)", "attention core (torch)"):
        _positive(r["breakdown"][part], ["s", "gflops"])


def test_decoders_time_both_layers_of_both_tasks(results):
    r = results["decoders"]
    for task in ("seg_3d", "seg_2d"):
        for layer in ("conv3/ours", "conv3/flax", "up2/ours", "up2/flax", "unetr"):
            _positive(r[f"{task}/{layer}"], ["fwd_s", "fwd_bwd_s"])


def test_profile_names_the_step_instructions(results):
    """--profile: the traced instructions are the compiled step's, the parts add up to their
    sum, and the tiny step's text tower and backward pass both take time."""
    p = results["train_step"]["profile"]
    assert 0 < len(p["top"]) <= 5
    assert p["top"] == sorted(p["top"], key=lambda row: -row["ms"])
    assert sum(p["parts"].values()) == pytest.approx(p["ms_per_step"], rel=1e-9)
    assert p["parts"]["text"] > 0 and p["parts"]["backward"] > 0
    assert all(row["ms"] > 0 and row["type"] for row in p["top"])


def test_analytic_flops_match_the_compiled_hlo(results):
    r = results["train_step"]
    np.testing.assert_allclose(r["flops_per_step"], r["xla_matmul_flops"], rtol=1e-3)
    assert r["xla_flops"] > r["xla_matmul_flops"]  # cost analysis adds elementwise work


def test_torch_reference_follows_the_jax_step(results):
    """Same weights, same batch: the losses of the first steps agree, and they change from
    step to step (so the optimiser, EMA and centre updates agree too)."""
    r = results["train_step"]
    # float32 rounding, amplified by Adam on gradients at the noise level (|g| ~ eps)
    np.testing.assert_allclose(r["torch_losses"], r["jax_losses"], rtol=1e-5)
    assert np.min(np.abs(np.diff(r["jax_losses"]))) > 1e-3


def test_compile_paper_config_reports_both_remat_settings(results):
    runs = results["compile"]["runs"]
    assert [r["remat"] for r in runs] == [False, True]
    for run in runs:
        _positive(run, ["params", "trainable_params", "flops_per_step", "xla_flops",
                        "peak_bytes", "compile_s"])
    assert runs[0]["params"] == runs[1]["params"]
    # remat recomputes the forward pass in the backward pass: more executed matmul FLOPs
    assert runs[1]["xla_matmul_flops"] > runs[0]["xla_matmul_flops"]


def test_scaling_all_reduces_at_least_the_gradients(results):
    r = results["scaling"]
    (run,) = r["runs"]
    _positive(run, ["step_s", "compile_s", "hlo_comm_total"])
    assert run["nested_collectives"] == []  # all in program order, cached or compiled afresh
    assert run["hlo_comm_bytes"]["all-reduce"] >= run["analytic_comm_bytes"]["all-reduce"] > 0
    assert {(p["devices"], p["mode"]) for p in r["paper"]} == {
        (8, "data"), (8, "fsdp"), (64, "data"), (64, "fsdp")}
    data8 = next(p for p in r["paper"] if p["devices"] == 8 and p["mode"] == "data")
    # data parallel: a ring all-reduce of every trained float32 gradient
    np.testing.assert_allclose(data8["bytes_per_device"]["total"],
                               2 * 7 / 8 * 4 * r["paper_trainable_params"], rtol=1e-9)


def test_device_suite_reports_every_number(results):
    r = results["device_suite"]
    _positive(r, ["step_s", "samples_per_s", "compile_s", "peak_bytes", "flops_per_step",
                  "wall_s"])
    assert r["backend"] == "cpu" and r["peak_bf16_flops"] is None and r["mfu"] is None
    est = r["estimate"]  # the largest multiple of the config's 2:1 ratio within 90% of 5 MB
    assert r["batch_xray"] == 2 * r["batch_ct"] and r["batch_ct"] >= 1
    used = lambda b2, b3: est["fixed_bytes"] + b2 * est["bytes_per_xray"] + b3 * est["bytes_per_ct"]
    assert used(r["batch_xray"], r["batch_ct"]) <= 0.9 * 0.005e9 < used(r["batch_xray"] + 2,
                                                                        r["batch_ct"] + 1)
    assert r["attention"]["xla"]["step_s"] > 0
    assert "error" in r["attention"]["cudnn"]  # no fused attention on the CPU backend
    assert all(v > 0 for v in r["pipeline_records_per_s_per_core"].values())
    assert set(r["pipeline_records_per_s_per_core"]) == {"ct", "xray"}


def test_published_bf16_peaks_match_device_kinds():
    assert device_suite.peak_bf16("NVIDIA H100 PCIe") == 756e12
    assert device_suite.peak_bf16("NVIDIA H100 80GB HBM3") == 989e12
    assert device_suite.peak_bf16("NVIDIA H200") == 989e12
    assert device_suite.peak_bf16("NVIDIA L4") == 121e12
    assert device_suite.peak_bf16("TPU v5 lite") == 197e12
    assert device_suite.peak_bf16("TPU v5p") == 459e12
    assert device_suite.peak_bf16("cpu") is None


# ---------------------------------------------------------------- HLO parsers

def test_hlo_matmul_flops_counts_dots_and_convolutions():
    x, w = jnp.ones((3, 5, 7)), jnp.ones((7, 11))
    images, kernel = jnp.ones((2, 8, 8, 3)), jnp.ones((4, 4, 3, 6))

    def f(x, w, images, kernel):
        conv = jax.lax.conv_general_dilated(images, kernel, (4, 4), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return (x @ w).sum() + conv.sum()

    hlo = jax.jit(f).lower(x, w, images, kernel).compile().as_text()
    dot = 2 * 3 * 5 * 11 * 7
    conv = 2 * (2 * 2 * 2 * 6) * (4 * 4 * 3)
    assert common.hlo_matmul_flops(hlo) == dot + conv


def test_hlo_collective_bytes_of_a_sum_and_a_gather():
    devices = jax.devices()[:4]
    if len(devices) < 4:
        pytest.skip("needs 4 devices (tests/conftest.py simulates 8 CPU devices)")
    mesh = Mesh(np.asarray(devices), ("d",))
    split, whole = NamedSharding(mesh, P("d")), NamedSharding(mesh, P())
    x = jax.device_put(jnp.ones((8, 1000), jnp.float32), split)
    summed = jax.jit(lambda a: a.sum(0), out_shardings=whole).lower(x).compile().as_text()
    gathered = jax.jit(lambda a: a * 2, out_shardings=whole).lower(x).compile().as_text()
    ring = 3 / 4
    assert common.hlo_collective_bytes(summed, 4)["all-reduce"] == 2 * ring * 4 * 1000
    assert common.hlo_collective_bytes(gathered, 4)["all-gather"] == ring * 4 * 8 * 1000


def test_hlo_nested_collectives_finds_a_sum_inside_a_conditional():
    mesh = Mesh(np.asarray(jax.devices()[:2]), ("d",))
    x = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P("d")))
    nested = jax.jit(lambda p, a: jax.lax.cond(p, lambda: a.sum(), lambda: 0.0))
    flat = jax.jit(lambda p, a: jnp.where(p, a.sum(), 0.0))
    assert common.hlo_nested_collectives(nested.lower(True, x).compile().as_text()) == [
        "all-reduce"]
    flat_hlo = flat.lower(True, x).compile().as_text()
    assert "all-reduce" in flat_hlo and common.hlo_nested_collectives(flat_hlo) == []


def test_retrieval_bounds_of_planted_label_sets():
    # Label sets (0,0) x2, (1,0), (0,1) x2, (1,1); the encoder knows column 1.
    labels = np.array([[0, 0], [0, 0], [1, 0], [0, 1], [0, 1], [1, 1]])
    got = retrieval_bound.bounds(labels, [1])
    # Each half (column 1 = 0 / 1) has 3 reports, 2 of the common set: hits 2/3, 2/3, 1/3 each.
    assert got["knows_uniform"] == pytest.approx(5 / 9)
    assert got["knows_mode"] == pytest.approx(4 / 6)
    assert got["baseline"] == pytest.approx(2 / 6)  # tie of two sets of 2: the first
    blind = retrieval_bound.bounds(labels, [])
    assert blind["knows_uniform"] == pytest.approx((4 + 1 + 4 + 1) / 36)
    assert blind["knows_mode"] == pytest.approx(2 / 6)
    assert retrieval_bound.bounds(labels, [0, 1])["knows_uniform"] == 1.0


def test_selection_bounds_equal_enumerating_every_ranking():
    """Each bound against brute force: every order of the slabs an encoder cannot tell apart."""
    rng = np.random.default_rng(0)
    d, k = 6, 3
    truth = rng.random((12, d)) < 0.4
    truth[0] = False  # a volume without a finding slab is skipped
    known = truth & (rng.random((12, d)) < 0.5)
    prior = rng.permutation(d)
    got = selection_bound.bounds(truth, known, k, prior)
    rows = truth.any(axis=1)
    knows_random, knows_prior = [], []
    for t, s in zip(truth[rows], known[rows]):
        seen, rest = np.flatnonzero(s), np.flatnonzero(~s)
        hits = [t[np.concatenate([seen, order])[:k]].mean()
                for order in itertools.permutations(rest)]
        knows_random.append(np.mean(hits))
        by_prior = [i for i in prior if s[i]] + [i for i in prior if not s[i]]
        knows_prior.append(t[by_prior[:k]].mean())
    assert got["volumes"] == rows.sum()
    assert got["knows_random"] == pytest.approx(np.mean(knows_random), abs=1e-12)
    assert got["knows_prior"] == pytest.approx(np.mean(knows_prior), abs=1e-12)
    assert got["random"] == pytest.approx(truth[rows].mean())
    assert got["prior"] == pytest.approx(truth[rows][:, prior[:k]].mean())
    assert got["oracle"] == pytest.approx(np.mean(np.minimum(truth[rows].sum(1), k) / k))
    # Knowing every finding slab is the oracle; knowing none is random selection.
    assert selection_bound.bounds(truth, truth, k, prior)["knows_random"] == pytest.approx(
        got["oracle"])
    assert selection_bound.bounds(truth, ~truth & truth, k, prior)["knows_random"] == (
        pytest.approx(got["random"]))
    with pytest.raises(ValueError, match="subset"):
        selection_bound.bounds(truth, ~truth, k, prior)
