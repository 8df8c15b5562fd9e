"""The pretraining command as processes: killed and resumed, stopped by SIGTERM, two processes.

Apart from tests/test_trainer.py (the in-process runs), so pytest-xdist (`--dist=loadfile`)
can run the two files side by side.
"""

import os
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from test_trainer import ONE_DEVICE, STEPS, _final_params, _main
from unimedi_jax.train import checkpoint, trainer, writers


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def _wait_for(path, proc, timeout=300):
    start = time.time()
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {path} appeared:\n{proc.stdout.read()}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, data_dir):
    """The command killed after its first checkpoint and run again ends where it ends
    uninterrupted; on one device (the sharded resume on 8 devices:
    `test_damaged_latest_checkpoint_falls_back_to_the_previous`)."""
    whole, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    proc = _main(whole, data_dir, "--config.eval_at_end=False", env=ONE_DEVICE)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    proc = _main(killed, data_dir, "--config.eval_at_end=False", env=ONE_DEVICE)
    _wait_for(killed / "checkpoints" / "10", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = checkpoint.Checkpointer(str(killed)).latest_step()
    assert latest is not None and latest < STEPS, "the kill came too late to test a resume"
    proc = _main(killed, data_dir, "--config.eval_at_end=False", env=ONE_DEVICE)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert f"Resuming from the checkpoint of step {latest}" in out
    for a, b in zip(_final_params(killed), _final_params(whole)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    resumed = [r["loss"] for r in writers.read_metrics(killed) if "loss" in r]
    uninterrupted = [r["loss"] for r in writers.read_metrics(whole) if "loss" in r]
    np.testing.assert_allclose(resumed, uninterrupted, rtol=1e-5)


def test_sigterm_saves_and_exits_cleanly(tmp_path, data_dir):
    proc = _main(tmp_path, data_dir, "--config.eval_at_end=False", env=ONE_DEVICE)
    _wait_for(tmp_path / "metrics.jsonl", proc)
    while not any("loss" in r for r in writers.read_metrics(tmp_path)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    step = checkpoint.Checkpointer(str(tmp_path)).latest_step()
    assert step is not None and 5 <= step < STEPS
    assert "rerun the command to resume" in out


MULTI_PROCESS_TIMEOUT_S = 300  # a healthy run takes about 60-90 s on 2 busy cores


def _run_all(procs, logs, timeout):
    """Waits for all `procs` (output in the files `logs`). Once one fails or `timeout` s pass,
    the rest dump their Python stacks (SIGABRT with faulthandler on) and stop, and the test
    fails with every process's output."""
    deadline = time.time() + timeout
    while (any(p.poll() is None for p in procs) and time.time() < deadline
           and not any(p.poll() for p in procs)):
        time.sleep(0.2)
    stopped = [i for i, p in enumerate(procs) if p.poll() is None]
    for i in stopped:
        procs[i].send_signal(signal.SIGABRT)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    outs = [log.read_text() for log in logs]
    report = "\n".join(f"----- process {i} (exit {p.returncode}) -----\n{out}"
                       for i, (p, out) in enumerate(zip(procs, outs)))
    assert not stopped and all(p.returncode == 0 for p in procs), (
        f"processes {stopped} were stopped (timeout {timeout} s or a failed peer):\n{report}")
    return outs


def test_two_processes_on_localhost(tmp_path, data_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The session's persistent compilation cache stays set, as a user's may be: multi-process CPU
    # runs must not load executables from it (see `train.sharding.compile_cpu_collectives_afresh`).
    env = {"XLA_FLAGS": os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=2"),
           "PYTHONFAULTHANDLER": "1"}
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    procs = []
    for i, log in enumerate(logs):
        with open(log, "w") as f:  # a file, not a pipe: a full pipe would block the process
            procs.append(_main(tmp_path / "work", data_dir,
                               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                               f"--process_id={i}", "--config.total_steps=4",
                               "--config.checkpoint_every_steps=2",
                               "--config.log_every_steps=2", env=env, stdout=f))
    outs = _run_all(procs, logs, MULTI_PROCESS_TIMEOUT_S)
    assert all("persistent compilation cache off" in out for out in outs)
    workdir = tmp_path / "work"
    rows = [r for r in writers.read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4] and all(np.isfinite(r["loss"]) for r in rows)
    assert checkpoint.Checkpointer(str(workdir)).latest_step() == 4
    assert (workdir / trainer.EVAL_SUMMARY).exists()
