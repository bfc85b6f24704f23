import os

import numpy as np
import pytest
import torch

from edge_vla.errors import ConfigError, ObservationError
from edge_vla.runtime.policy import Policy
from edge_vla.runtime.types import Observation
from edge_vla.sim.env import ReachEnv


@pytest.fixture(scope="module")
def obs():
    return ReachEnv().reset(123)


def torch_actions(model, obs, noise, steps, solver="euler"):
    from edge_vla.export.data import observation_tensors

    images, tokens, state = observation_tensors(obs, model.config)
    out = model.sample(images, tokens, state, torch.from_numpy(noise), steps=steps, solver=solver)
    return out[0].numpy()


def replay_noise(seed, cfg):
    noise = np.zeros((1, cfg.chunk_len, cfg.action_dim), dtype=np.float32)
    np.random.default_rng(seed).standard_normal(out=noise, dtype=np.float32)
    return noise


@pytest.mark.parametrize(("solver", "steps"), [("euler", 10), ("euler", 2), ("heun", 3), ("midpoint", 4)])
def test_policy_matches_pytorch_sampler(tiny_bundle, tiny_model, obs, solver, steps):
    policy = Policy.load(tiny_bundle, steps=steps, solver=solver, seed=5)
    chunk = policy.infer(obs)
    expected = torch_actions(tiny_model, obs, replay_noise(5, tiny_model.config), steps, solver)
    np.testing.assert_allclose(chunk.actions, expected, atol=2e-5, rtol=1e-5)
    assert chunk.actions.shape == (8, 2) and chunk.actions.dtype == np.float32
    assert chunk.action_period_s == pytest.approx(0.1)


def test_reset_replays_the_same_chunk(tiny_bundle, obs):
    policy = Policy.load(tiny_bundle, seed=1)
    a = policy.infer(obs).actions.copy()
    b = policy.infer(obs).actions.copy()
    policy.reset()
    c = policy.infer(obs).actions
    np.testing.assert_array_equal(a, c)
    assert not np.array_equal(a, b)  # fresh noise per chunk


def test_timings_cover_every_stage(tiny_bundle, obs, monkeypatch):
    # the stepping path's stages; a one-call onnxruntime chunk is timed as "chunk_graph" (test_ort_chunk.py)
    monkeypatch.setenv("EDGE_VLA_ORT_CHUNK", "off")
    chunk = Policy.load(tiny_bundle, steps=3).infer(obs)
    t = chunk.timings_ms
    assert {"preprocess", "prefix", "step_0", "step_1", "step_2", "postprocess", "total"} <= set(t)
    parts = t["preprocess"] + t["prefix"] + t["ode_total"] + t["postprocess"]
    assert parts <= t["total"] + 1e-6
    assert all(v >= 0 for v in t.values())


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_bundles_stay_close(request, precision, tiny_model, obs):
    bundle = request.getfixturevalue(f"tiny_bundle_{precision}")
    policy = Policy.load(bundle, seed=3)
    got = policy.infer(obs).actions
    expected = torch_actions(tiny_model, obs, replay_noise(3, tiny_model.config), 10)
    rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert rel < {"fp16": 1e-2, "int8": 8e-2}[precision]


def test_bad_observations_are_rejected(tiny_bundle, obs):
    policy = Policy.load(tiny_bundle)
    img = obs.images[0]
    cases = {
        "expected 1 camera": Observation([img, img], obs.instruction, obs.state),
        "expected a uint8 RGB image of shape": Observation([img[:32]], obs.instruction, obs.state),
        "got float32": Observation([img.astype(np.float32)], obs.instruction, obs.state),
        "instruction is missing": Observation([img], "", obs.state),
        "NaN or Inf": Observation([img], obs.instruction, np.array([np.nan, 0.0], np.float32)),
        "state must have shape": Observation([img], obs.instruction, np.zeros(3, np.float32)),
        "at most": Observation([img], "x" * 100, obs.state),
    }
    for message, bad in cases.items():
        with pytest.raises(ObservationError, match=message):
            policy.infer(bad)
    policy.infer(obs)  # still works afterwards


def test_step_count_and_backend_are_validated(tiny_bundle):
    with pytest.raises(ConfigError, match="allows 1..20"):
        Policy.load(tiny_bundle, steps=100)
    with pytest.raises(ConfigError, match=r"time-conditioning tables for \[1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20\]"):
        Policy.load(tiny_bundle, steps=7)
    with pytest.raises(ConfigError, match="unknown backend"):
        Policy.load(tiny_bundle, backend="magic")
    with pytest.raises(ConfigError, match="unknown solver"):
        Policy.load(tiny_bundle, solver="rk45")


def test_trusted_keys_refuse_unsigned_and_accept_signed(tiny_bundle, tmp_path, obs):
    import shutil

    from edge_vla.errors import BundleError
    from edge_vla.provision.signing import generate_keypair, sign_bundle

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    secret, public, _ = generate_keypair(tmp_path / "key")
    with pytest.raises(BundleError, match="unsigned"):
        Policy.load(b, trusted_keys=[public])
    sign_bundle(b, secret)
    Policy.load(b, trusted_keys=[public]).infer(obs)


def test_closed_policy_refuses_to_infer(tiny_bundle, obs):
    from edge_vla.errors import EdgeVlaError

    with Policy.load(tiny_bundle) as policy:
        policy.infer(obs)
    assert policy.backend.closed
    policy.close()  # idempotent
    with pytest.raises(EdgeVlaError, match="was closed"):
        policy.infer(obs)


def test_default_thread_count_follows_the_affinity_mask_not_the_machine(tiny_bundle):
    """Under `taskset -c 0` (a robot whose service is confined to one core) the default intra-op pool must have one
    thread, not os.cpu_count(): two threads on one core just preempt each other. Control: the same load unconfined."""
    import subprocess
    import sys

    probe = ("import onnxruntime as ort, edge_vla.runtime.ort_backend as ob\n"
             "seen = []\n"
             "orig = ob._session\n"
             "def spy(model, threads, providers, path):\n"
             "    s = orig(model, threads, providers, path)\n"
             "    seen.append(s.get_session_options().intra_op_num_threads)\n"
             "    return s\n"
             "ob._session = spy\n"
             "from edge_vla import Policy\n"
             f"Policy.load({str(tiny_bundle)!r}, backend='onnxruntime').close()\n"
             "print(max(seen))\n")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs for the control case")
    pinned = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120)
    free = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert pinned.returncode == 0 and free.returncode == 0, pinned.stderr[-2000:] + free.stderr[-2000:]
    assert int(pinned.stdout.split()[-1]) == 1
    assert int(free.stdout.split()[-1]) == len(os.sched_getaffinity(0))
