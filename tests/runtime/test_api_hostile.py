"""A hostile caller of the Python API: one Policy shared by two threads, absurd thread and step counts.

Each probe has a control: the same call done right gives the right answer, so a test can tell "refused" or
"made safe" from "ignored"."""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest

from edge_vla.errors import ConfigError
from edge_vla.runtime.policy import Policy
from edge_vla.runtime.types import Observation
from edge_vla.sim.env import ReachEnv


class _ZeroNoise:
    """Noise that does not depend on call order, so each observation has exactly one right chunk even when two
    threads draw from the same Policy in an unknown order."""

    def standard_normal(self, out: np.ndarray, dtype: type) -> np.ndarray:
        out[...] = 0.0
        return out


@pytest.fixture(scope="module")
def two_observations() -> tuple[Observation, Observation]:
    env = ReachEnv()
    first, second = env.reset(1), env.reset(2)
    return first, Observation(second.images, "push blue block left", second.state)


def test_one_policy_shared_by_two_threads_gives_each_its_own_chunk(tiny_bundle, two_observations):
    """Policy.infer writes the observation into shared, bound input buffers and integrates in a shared state
    array. Two threads at once must each get the chunk of their own observation, never a mix of both."""
    a_obs, b_obs = two_observations
    with Policy.load(tiny_bundle, backend="onnxruntime", threads=1) as policy:
        policy.rng = _ZeroNoise()  # type: ignore[assignment]
        want = {"a": policy.infer(a_obs).actions.copy(), "b": policy.infer(b_obs).actions.copy()}
        assert not np.allclose(want["a"], want["b"], atol=1e-4)  # control: the two chunks are distinguishable
        wrong: list[str] = []
        start = threading.Barrier(2)

        def worker(name: str, obs: Observation) -> None:
            start.wait()
            for i in range(60):
                got = policy.infer(obs).actions
                if not np.allclose(got, want[name], atol=1e-5):
                    wrong.append(f"{name}#{i}")

        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads often, as a loaded robot computer does
        try:
            threads = [threading.Thread(target=worker, args=item) for item in (("a", a_obs), ("b", b_obs))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            sys.setswitchinterval(old)
    assert not wrong, f"{len(wrong)} of 120 chunks mixed the two threads' observations: {wrong[:5]}"


@pytest.mark.parametrize("threads", [0, -1, 10**6, 2.5, True])
def test_absurd_thread_counts_are_refused_before_any_session(tiny_bundle, threads):
    """threads=10**6 made onnxruntime start a million threads (the load hung, then ran the machine out of memory);
    0 and -1 were passed through silently and recorded as such."""
    with pytest.raises(ConfigError, match="threads"):
        Policy.load(tiny_bundle, backend="onnxruntime", threads=threads)


def test_a_sane_thread_count_still_loads(tiny_bundle, two_observations):
    """Control for the refusals above: 1 and every CPU this process may use are fine."""
    for n in (1, len(os.sched_getaffinity(0))):
        with Policy.load(tiny_bundle, backend="onnxruntime", threads=n) as policy:
            assert policy.backend.threads == n  # type: ignore[attr-defined]
            policy.infer(two_observations[0])


@pytest.mark.parametrize("steps", [0, 2.7, True, "3"])
def test_a_step_count_that_is_not_a_positive_integer_is_refused(tiny_bundle, steps):
    """steps=0 silently ran the bundle's default 10 steps; 2.7 ran 2 and True ran 1, with no error."""
    with pytest.raises(ConfigError, match="steps"):
        Policy.load(tiny_bundle, backend="onnxruntime", steps=steps)


def test_an_allowed_step_count_is_used_as_given(tiny_bundle):
    """Control: a valid count is applied (not replaced by the default), and None means the bundle's own."""
    with Policy.load(tiny_bundle, backend="onnxruntime", steps=2) as policy:
        assert policy.steps == 2
    with Policy.load(tiny_bundle, backend="onnxruntime", steps=None) as policy:
        assert policy.steps == policy.contract.num_steps


@pytest.mark.parametrize("command", ["profile", "tune"])
def test_the_clis_refuse_an_absurd_thread_count_in_one_line(tiny_bundle, tmp_path, command):
    """`--threads 1000000` hung the first session load (a million threads); now one line, exit 1, no traceback.
    Control: the same profile command with --threads 1 runs to its verdict."""
    import shutil
    import subprocess

    bundle = tmp_path / "bundle"  # a copy: profile writes its report into the bundle's target/ (shared fixture)
    shutil.copytree(tiny_bundle, bundle)
    cli = [sys.executable, "-m", "edge_vla.cli", command, str(bundle)]
    extra = ["-o", str(tmp_path / "out"), "--no-plot", "--no-roofline", "--steps", "1", "--iterations", "2",
             "--warmup", "0"] if command == "profile" else ["--state-dir", str(tmp_path / "state")]
    bad = subprocess.run([*cli, *extra, "--threads", "1000000"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1, bad.stderr
    assert "Traceback" not in bad.stderr and "threads=1000000: give 1.." in bad.stderr
    if command == "profile":
        good = subprocess.run([*cli, *extra, "--threads", "1"], capture_output=True, text=True, timeout=120)
        assert good.returncode == 0 and "verdict" in good.stdout, good.stderr
