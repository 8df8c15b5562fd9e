"""The pretraining job end to end in this process: files, sharding, damaged checkpoints, guards
(the command as processes, killed, stopped or two at once: tests/test_trainer_processes.py)."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import pretrain
from unimedi_jax.train import checkpoint, sharding, trainer, validation, writers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30


def _config(data_dir, **overrides):
    c = pretrain.get_config("test")
    c.data.data_dir = str(data_dir)
    c.total_steps, c.checkpoint_every_steps, c.log_every_steps = STEPS, 10, 5
    for key, value in overrides.items():
        section = c
        *path, last = key.split(".")
        for part in path:
            section = section[part]
        section[last] = value
    return c


def _main(workdir, data_dir, *extra, env=None, stdout=subprocess.PIPE):
    """The user's command for the test config, as a subprocess (output to `stdout`), on the 8
    simulated devices of the tests unless `env` says otherwise."""
    cmd = [sys.executable, "-m", "unimedi_jax.main", "--config=configs/pretrain.py:test",
           f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
           f"--config.total_steps={STEPS}", "--config.checkpoint_every_steps=10",
           "--config.log_every_steps=5", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=stdout, stderr=subprocess.STDOUT, text=True)


def _final_params(workdir):
    return jax.tree.leaves(checkpoint.load_pretrained(str(workdir))[1])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


# One process's CPU as the only device: a run on it keeps the persistent compilation cache
# (`train.sharding.compile_cpu_collectives_afresh`), so repeated runs of the command compile once.
ONE_DEVICE = {"XLA_FLAGS": os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=1")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """An uninterrupted run of the test config on all 8 devices."""
    workdir = tmp_path_factory.mktemp("reference")
    summary = trainer.train_and_evaluate(_config(data_dir), str(workdir))
    return workdir, summary


def test_run_writes_metrics_checkpoints_and_summary(reference):
    workdir, summary = reference
    rows = [r for r in writers.read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(5, STEPS + 1, 5))
    # The language-image loss falls; the distillation terms rise early on, as in DINO (the
    # centring flattens the teacher's initially peaked outputs).
    vl = [r["loss_vl"] for r in rows]
    assert np.mean(vl[-2:]) < np.mean(vl[:2]) - 0.1, vl
    assert all(np.isfinite(r["loss"]) for r in rows) and all(r["finite"] for r in rows)
    assert sorted(os.listdir(workdir / "checkpoints"))[-1] == str(STEPS)
    # The locked text embeddings are written once, not into every step.
    saved = checkpoint.Checkpointer(str(workdir)).manager.item_metadata(STEPS)["state"]
    assert "embeddings" not in saved["params"]["text"], sorted(saved["params"]["text"])
    assert (workdir / checkpoint.FROZEN_DIR).is_dir()
    with open(workdir / trainer.EVAL_SUMMARY) as f:
        saved = json.load(f)
    for key in ("retrieval_r1", "retrieval_r1_findings", "slice_precision",
                "slice_precision_random", "slice_precision_prior", "slice_precision_init"):
        assert 0.0 <= saved[key] <= 1.0, key
    assert saved == pytest.approx(summary) and saved["eval_wall_s"] > 0
    evals = [r for r in writers.read_metrics(workdir) if "eval/retrieval_r1" in r]
    assert [r["step"] for r in evals] == [0, STEPS]


def test_one_device_matches_eight(reference, tmp_path, data_dir):
    workdir, _ = reference
    trainer.train_and_evaluate(_config(data_dir, mesh=[("data", 1)], eval_at_end=False),
                               str(tmp_path))
    one = [r["loss"] for r in writers.read_metrics(tmp_path) if "loss" in r]
    eight = [r["loss"] for r in writers.read_metrics(workdir) if "loss" in r]
    # Reductions are ordered differently across devices; Adam then amplifies float noise in
    # near-zero gradients, so the trajectory (not each parameter) is what can match closely.
    np.testing.assert_allclose(one, eight, rtol=1e-5)
    # The step-0 evaluation: on one device, and split over the eight of the training mesh.
    init_one, init_eight = (json.loads((w / "eval_init.json").read_text())
                            for w in (tmp_path, workdir))
    assert set(init_one) == set(init_eight) and "zero_shot_mean_auroc" in init_one
    for key in set(init_one) - {"eval_wall_s"}:
        np.testing.assert_allclose(init_one[key], init_eight[key], rtol=1e-4, atol=1e-5,
                                   err_msg=key)


def _steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _damaged_copy(workdir, tmp_path, *steps):
    """A copy of `workdir` whose checkpoints of `steps` have their 3 largest files cut in half."""
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    for step in steps:
        paths = sorted((p for p in (copy / "checkpoints" / str(step)).rglob("*") if p.is_file()),
                       key=lambda p: p.stat().st_size)
        for path in paths[-3:]:
            os.truncate(path, path.stat().st_size // 2)
    return copy


def test_damaged_latest_checkpoint_falls_back_to_the_previous(reference, tmp_path, data_dir,
                                                              caplog):
    workdir, _ = reference
    assert _steps(workdir) == [20, STEPS]
    copy = _damaged_copy(workdir, tmp_path, STEPS)
    caplog.set_level(logging.INFO, logger="absl")  # whatever verbosity earlier tests left
    trainer.train_and_evaluate(_config(data_dir, eval_at_end=False), str(copy))
    log = caplog.text
    assert f"step {STEPS} in {copy / 'checkpoints' / str(STEPS)} could not be restored" in log
    assert f"falling back to step 20, {STEPS - 20} steps earlier" in log
    assert "Resuming from the checkpoint of step 20" in log
    assert (copy / checkpoint.DAMAGED_DIR / str(STEPS)).is_dir()
    assert _steps(copy) == [20, STEPS]
    for a, b in zip(_final_params(copy), _final_params(workdir)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    resumed = [r["loss"] for r in writers.read_metrics(copy) if "loss" in r]
    reference_losses = [r["loss"] for r in writers.read_metrics(workdir) if "loss" in r]
    np.testing.assert_allclose(resumed, reference_losses, rtol=1e-5)


def test_every_checkpoint_damaged_is_a_clear_error(reference, tmp_path, data_dir):
    workdir, _ = reference
    copy = _damaged_copy(workdir, tmp_path, 20, STEPS)
    metrics = (copy / "metrics.jsonl").read_text()
    proc = _main(copy, data_dir)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0, out
    assert f"error: No checkpoint in {copy} could be restored (steps tried: {STEPS}, 20;" in out
    assert "delete those step directories" in out
    assert "CheckpointRestoreError" not in out  # the message, not a traceback
    assert _steps(copy) == [20, STEPS]
    assert (copy / "metrics.jsonl").read_text() == metrics  # nothing started afresh


def test_load_pretrained_of_a_damaged_step(reference, tmp_path, caplog):
    workdir, _ = reference
    copy = _damaged_copy(workdir, tmp_path, STEPS)
    with pytest.raises(checkpoint.CheckpointRestoreError,
                       match=re.escape(f"step {STEPS} in {copy / 'checkpoints' / str(STEPS)} "
                                       "could not be restored")):
        checkpoint.load_pretrained(str(copy), STEPS)
    caplog.set_level(logging.WARNING, logger="absl")
    _, params = checkpoint.load_pretrained(str(copy))  # the latest: falls back to step 20
    assert "falling back to step 20" in caplog.text
    for a, b in zip(jax.tree.leaves(params),
                    jax.tree.leaves(checkpoint.load_pretrained(str(workdir), 20)[1])):
        np.testing.assert_array_equal(a, b)
    assert _steps(copy) == [20, STEPS]  # left as it was


def test_nan_in_data_stops_the_run_before_a_checkpoint(tmp_path, data_dir, monkeypatch):
    from unimedi_jax.data import pipeline
    make_mixed = pipeline.make_mixed

    def poisoned(*args, **kwargs):
        it = make_mixed(*args, **kwargs)
        calls = {"n": 0}
        original = it.__next__

        class Poisoned:
            def __next__(self):
                batch = original()
                calls["n"] += 1
                if calls["n"] == 7:  # the batch of step 7
                    batch["ct"]["volume"][0, 0, 0, 0] = np.nan
                return batch

            get_state, set_state = it.get_state, it.set_state

        return Poisoned()

    monkeypatch.setattr(pipeline, "make_mixed", poisoned)
    with pytest.raises(trainer.NonFiniteError, match=r"at step 7: .*loss=nan"):
        trainer.train_and_evaluate(_config(data_dir, eval_at_end=False), str(tmp_path))
    assert checkpoint.Checkpointer(str(tmp_path)).latest_step() is None


def test_metrics_reach_the_host_only_at_log_and_checkpoint_steps(tmp_path, data_dir,
                                                                 monkeypatch):
    """Between log steps the loop reads one device scalar (`finite`) per step, not the metrics;
    the training iterator is closed at the end."""
    from unimedi_jax.data import pipeline
    fetched, closed = [], []
    host, close = sharding.to_host, pipeline.MixedIterator.close
    monkeypatch.setattr(sharding, "to_host", lambda tree: fetched.append(
        isinstance(tree, dict) and "loss" in tree) or host(tree))
    monkeypatch.setattr(pipeline.MixedIterator, "close",
                        lambda self: closed.append(1) or close(self))
    c = _config(data_dir, eval_at_end=False)
    c.total_steps, c.log_every_steps, c.checkpoint_every_steps = 6, 3, 6
    trainer.train_and_evaluate(c, str(tmp_path))
    assert sum(fetched) == 3  # steps 3 and 6 (log) and 6 (checkpoint)
    assert closed == [1]  # the training iterator (and its Grain workers) closed once


def test_sigterm_before_the_first_step_stops_without_a_checkpoint(tmp_path, data_dir,
                                                                  monkeypatch):
    init = trainer._Preemption.__init__

    def requested(self):
        init(self)
        self.requested = True

    monkeypatch.setattr(trainer._Preemption, "__init__", requested)
    assert trainer.train_and_evaluate(_config(data_dir), str(tmp_path)) == {}
    assert checkpoint.Checkpointer(str(tmp_path)).latest_step() is None


@pytest.mark.parametrize("key, value, message", [
    ("model.vit.image_size", 60, r"config.model.vit.image_size=60 is not divisible"),
    ("data.ct.crop_size", (8, 30, 32), r"config.data.ct.crop_size=\(8, 30, 32\) is not divis"),
    ("objective.selection.mode", "best", r"config.objective.selection.mode='best'"),
    ("model.vit.attn_implementation", "flash", r"config.model.vit.attn_implementation='flash'"),
    ("objective.clip.targets", "labels", r"config.objective.clip.targets='labels'"),
    ("objective.sd.modalities", ("ct", "mri"), r"config.objective.sd.modalities=\('ct', 'mri'\)"),
    ("model.text.checkpoint", "/nonexistent/bert", r"config.model.text.checkpoint=.*not a folder"),
    ("method", "simclr", r"config.method='simclr'; choose one of \['drasclr', 'joint', 'unimedi'"),
    ("data.xray.augment", {"flip_prob": 2.0}, r"config.data.xray.augment: Invalid augmentation"),
    ("method", "joint", r"config.method='joint' needs config.objective.joint: start from "
                        r"configs/pretrain_joint.py"),
])
def test_config_errors_name_the_key(key, value, message, tmp_path):
    config = _config(tmp_path)
    section = config
    *path, last = key.split(".")
    for part in path:
        section = section[part]
    section[last] = value
    with pytest.raises(validation.ConfigError, match=message):
        validation.validate_pretrain_config(config)


def test_config_error_at_the_command_line_is_the_message(tmp_path, data_dir):
    proc = _main(tmp_path / "w", data_dir, "--config.objective.masking.keep_ratio=1.5")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    assert "error: config.objective.masking.keep_ratio=1.5" in out
    assert "Traceback" not in out


class _Counting:
    """An iterator of 0, 1, ... that raises at `fail_at`, with a Grain-like get_state."""

    def __init__(self, fail_at=None):
        self.i, self.fail_at = 0, fail_at

    def __next__(self):
        if self.i == self.fail_at:
            raise RuntimeError(f"bad record {self.i}")
        self.i += 1
        return self.i - 1

    def get_state(self):
        return {"next": self.i}


def test_prefetcher_orders_surfaces_errors_and_joins_on_close():
    prefetch = trainer.Prefetcher(_Counting(), lambda b: b * 10, size=2)
    assert [next(prefetch) for _ in range(3)] == [(0, {"next": 1}), (10, {"next": 2}),
                                                  (20, {"next": 3})]
    prefetch.close()  # its queue is full: the thread must still end
    assert not prefetch._thread.is_alive()
    failing = trainer.Prefetcher(_Counting(fail_at=1), lambda b: b, size=1)
    assert next(failing) == (0, {"next": 1})
    with pytest.raises(RuntimeError, match="bad record 1"):
        next(failing)
    failing.close()
    assert not failing._thread.is_alive()


def test_batch_not_divisible_by_devices(tmp_path):
    config = _config(tmp_path)
    config.data.batch_size_ct = 6
    with pytest.raises(validation.ConfigError, match=r"batch_size_ct=6 is not divisible by the "
                                                     r"data-parallel size 8"):
        validation.check_batch_divisible(config, 8)
    config.data.batch_size_ct, config.eval.batch_size = 8, 12  # evaluation runs on the mesh too
    with pytest.raises(validation.ConfigError, match=r"config.eval.batch_size=12 is not divisible"):
        validation.check_batch_divisible(config, 8)


def test_unknown_key_on_the_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "unimedi_jax.main", "--config=configs/pretrain.py:test",
         f"--workdir={tmp_path}", "--config.model.vit.widht=3"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "widht" in proc.stderr
