"""The shipped MetaWorld student (export/assets/tiny-mt10), next to the MetaWorld evaluation it runs through."""

import importlib.util

import pytest

from edge_vla.export import assets
from edge_vla.export.checkpoint import load_checkpoint


@pytest.mark.parametrize(("name", "made_by", "steps"), [("tiny-mt10", "edge-vla train", 10),
                                                      ("tiny-mt10-1step", "edge-vla distill", 1)])
def test_the_shipped_metaworld_student_does_an_mt10_task_and_reads_its_front_camera_and_instruction(
        one_torch_thread, name, made_by, steps):
    """tiny-mt10, the MetaWorld MT10 student, and tiny-mt10-1step, the same student reflowed to one ODE step
    (docs/METAWORLD.md): each loads against its provenance, closes a window on held-out seeds through the same
    evaluation `edge-vla evaluate` runs, at its own step count, and its chunk depends on what it is shown: it moves
    well away from the noise, and a blank front camera or another task's instruction changes it."""
    if importlib.util.find_spec("metaworld") is None:  # not importorskip: importing metaworld imports mujoco, which
        pytest.skip("pip install 'edge-vla[metaworld]'")  # must come after edge_vla.sim.metaworld sets MUJOCO_GL
    import dataclasses

    import numpy as np

    from edge_vla.export.envs import dataset_env
    from edge_vla.export.torch_policy import TorchPolicy
    from edge_vla.sim import metaworld

    path = assets.shipped_checkpoint(name)
    model, meta = load_checkpoint(path)
    prov = assets.provenance(name)
    env = dataset_env(meta["dataset"])
    assert env == "metaworld:mt10?cameras=front,gripperPOV" and made_by in prov["command"]
    assert model.config.num_cameras == 2 and model.config.num_steps == steps and prov["measured"]
    policy = TorchPolicy(model, seed=0)
    result = metaworld.evaluate(policy, "metaworld:window-close-v3?cameras=front,gripperPOV", episodes=2,
                                num_cameras=2, name=name)
    assert result.overall.successes == 2, result.overall  # 30/30 in the 300-episode table

    with metaworld.MetaWorldEnv("reach-v3", ("front", "gripperPOV")) as sim:
        sim.reset(1_000_000)
        obs = sim.observation()

    def chunk(o):
        policy.reset(7)
        return np.asarray(policy(o))

    base = chunk(obs)
    policy.reset(7)
    noise = policy.rng.standard_normal(base.shape, dtype=np.float32)  # the draw the chunk started from
    start = noise * model.action_std.numpy() + model.action_mean.numpy()  # in the chunk's (physical) units
    assert np.linalg.norm(base - start) > 0.1 * np.linalg.norm(start)
    blank = dataclasses.replace(obs, images=[np.zeros_like(obs.images[0]), obs.images[1]])
    other_task = dataclasses.replace(obs, instruction=metaworld.instruction("drawer-open-v3"))
    assert np.abs(chunk(blank) - base).max() > 0.05
    assert np.abs(chunk(other_task) - base).max() > 0.05
