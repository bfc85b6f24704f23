"""Train a reduced π0 (`PI0ForConditionalGeneration`, small PaliGemma/SigLIP/Gemma configs) on the sim's
demonstrations with π0's own flow-matching loss: `edge-vla train --family pi0`.

The result is an ordinary transformers π0 checkpoint directory (config.json, model.safetensors, the
PI0Processor's tokenizer and processor_config.json with the dataset statistics) plus `robot.json`, the
sidecar the exporter reads for the sim arm's joint names and limits, so `edge-vla export`, `edge-vla
distill --teacher` and `edge-vla evaluate` take it as they take any π0 checkpoint.

- Inputs go through the robot's π0 preprocessing (`Pi0Inputs`: numpy image processing, the checkpoint's
  tokenizer, state normalisation), the same code the exported bundle and the distillation teacher use.
- Loss: `PI0ForConditionalGeneration.forward(..., actions=...)` (its Beta(1.5, 1) time sampling, its noise,
  x_t = t·noise + (1 − t)·action, target noise − action), per element, averaged over the valid action dims.
- Padded dims: actions and state are zero-padded to max_action_dim / max_state_dim as π0 does. The padded
  action dims are made inert (`zero_padded_dims`: action_in_proj ignores them, action_out_proj returns 0
  there) and kept so after every step, so the model's valid outputs do not depend on the padded noise and
  its velocity field on the valid dims is exactly its sampler's (what the distillation teacher needs).
- The tokenizer is a small BPE trained on the sim's instructions (the model is trained from scratch).
- Goal probe (training only, like the edge-vla model's goal head): where the data knows where the named
  block is, a small MLP reads the mean of the VLM's last hidden states over the prompt and regresses that
  position, weighted by `TrainConfig.goal_weight`. Without it the reduced π0 reached 9% success after 3000
  steps (instruction sensitivity 16%: it does not ground the colour word). The probe is not part of π0: it is
  saved beside the checkpoint as `goal_probe.pt` (for --resume) and nothing else reads it.
- Checkpoints are replaced whole or not at all (`write_checkpoint`): written into a staging directory inside -o and
  synced, then renamed in, train_state.json last with the digests of the files it goes with, which --resume checks.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from edge_vla.errors import CheckpointError, ConfigError
from edge_vla.preprocess import STATS_EPS
from edge_vla.progress import progress as progress_bar
from edge_vla.runtime.types import Observation
from edge_vla.sim.dataset import Dataset
from edge_vla.sim.scene import COLORS, JOINT_LOWER, JOINT_NAMES, JOINT_UPPER, JOINT_VEL_LIMIT, TEMPLATES

from ..train import TrainConfig, default_threads, lr_at, split_episodes, task_groups
from .checkpoint import open_pi0
from .exporter import SIDECAR_FILE
from .teacher import Pi0Inputs, zero_padded_dims

log = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.pt"
PROBE_FILE = "goal_probe.pt"
# A save's files are written here (a directory inside -o, so renames stay on one filesystem) before any replaces -o's.
STAGING_PREFIX = ".pi0-save-"
SIM_INSTRUCTIONS = [t.format(c) for t in TEMPLATES for c in COLORS]


def sim_pi0_config(**overrides: Any) -> dict[str, Any]:
    """`PI0Config` keyword arguments for a reduced π0 that trains on one CPU core (~2.3M parameters).

    π0's structure and interfaces (SigLIP -> PaliGemma/Gemma prefix with 1 KV head, a Gemma expert reading
    every language layer's K/V, 32-dim state/action padding, 10 Euler steps) at small widths: SigLIP 4 x 128
    on the sim's 64 px frames (patch 8: 64 image tokens), Gemma 4 x 128, expert 4 x 64, chunk 8 (the sim
    evaluation executes 4 actions per chunk). `overrides` are deep-merged (e.g. from `--pi0-config`)."""
    cfg: dict[str, Any] = {
        "vlm_config": {
            "model_type": "paligemma",
            "text_config": {"model_type": "gemma", "hidden_size": 128, "intermediate_size": 512,
                            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 1,
                            "head_dim": 32},
            "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 128, "intermediate_size": 512,
                              "num_hidden_layers": 4, "num_attention_heads": 4, "patch_size": 8, "image_size": 64,
                              "vision_use_head": False},
            "projection_dim": 128,
        },
        "dit_config": {"model_type": "gemma", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4,
                       "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32},
        "chunk_size": 8, "max_state_dim": 32, "max_action_dim": 32, "num_inference_steps": 10,
    }
    return _merge(cfg, overrides)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


# Named overrides of sim_pi0_config (`--pi0-config NAME`). "wide" costs about what the edge-vla "small"
# teacher costs per chunk (~1.4 GFLOP, 7.2M parameters), for a teacher/student FLOP ratio like issue 8's.
SIM_PI0_SIZES: dict[str, dict[str, Any]] = {
    "reduced": {},
    "wide": {"vlm_config": {"text_config": {"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 8},
                            "vision_config": {"hidden_size": 192, "intermediate_size": 768}, "projection_dim": 256},
             "dit_config": {"hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 8}},
}


def resolve_config(spec: str | None) -> dict[str, Any]:
    """`--pi0-config`: a name from SIM_PI0_SIZES or a JSON file of PI0Config overrides."""
    if not spec:
        return {}
    if spec in SIM_PI0_SIZES:
        return copy.deepcopy(SIM_PI0_SIZES[spec])
    return load_config_file(spec)


def load_config_file(path: str | Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ConfigError(f"--pi0-config {path}: neither a size ({', '.join(SIM_PI0_SIZES)}) nor a JSON file")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--pi0-config {path}: {exc}; pass a JSON object of PI0Config keyword arguments") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--pi0-config {path} must hold a JSON object (PI0Config keyword arguments)")
    return data


def sim_sidecar(num_cameras: int, action_period_s: float) -> dict[str, Any]:
    """The sim arm as the exporter's robot sidecar (joint names, limits, period, cameras)."""
    return {"action": {"names": list(JOINT_NAMES), "units": "rad", "kind": "absolute_joint_position",
                       "lower": JOINT_LOWER.tolist(), "upper": JOINT_UPPER.tolist(),
                       "max_velocity": JOINT_VEL_LIMIT.tolist()},
            "state_names": list(JOINT_NAMES), "cameras": [f"cam{i}" for i in range(num_cameras)],
            "control": {"action_period_s": action_period_s}}


def build_processor(ds: Dataset, cfg: dict[str, Any]):
    """PI0Processor for the sim: BPE tokenizer on the sim's instructions, the image processor at the vision
    tower's size, and the dataset's state/action statistics."""
    from transformers import PI0Processor
    from transformers.models.pi0.image_processing_pi0 import PI0ImageProcessor

    from .testing import build_tokenizer

    vision = cfg["vlm_config"]["vision_config"]
    size, patch = int(vision["image_size"]), int(vision["patch_size"])
    image_processor = PI0ImageProcessor(size={"max_height": size, "max_width": size},
                                        pad_size={"height": size, "width": size}, image_seq_length=(size // patch) ** 2)
    corpus = [*SIM_INSTRUCTIONS, *{str(s) for s in np.unique(ds.instructions)}, "\n"]
    s, a = ds.state_stats(), ds.action_stats()
    return PI0Processor(image_processor=image_processor, tokenizer=build_tokenizer(128, corpus),
                        state_mean=s["mean"], state_std=s["std"], actions_mean=a["mean"], actions_std=a["std"],
                        max_state_dim=int(cfg["max_state_dim"]), chunk_size=int(cfg["chunk_size"]))


def new_model(cfg: dict[str, Any], processor: Any, valid_action_dims: int, seed: int = 0) -> Any:
    from transformers import PI0Config, PI0ForConditionalGeneration

    cfg = _merge(cfg, {"vlm_config": {"image_token_id": int(processor.image_token_id),
                                      "text_config": {"vocab_size": len(processor.tokenizer)}}})
    torch.manual_seed(seed)
    try:
        model = PI0ForConditionalGeneration(PI0Config(**cfg))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid π0 config: {exc}") from exc
    zero_padded_dims(model, valid_action_dims)
    return model


class TrainData:
    """The sim dataset as π0 batches: observations through `Pi0Inputs`, actions normalized and zero-padded."""

    def __init__(self, ds: Dataset, inputs: Pi0Inputs, model_config: Any) -> None:
        chunk, pad = int(model_config.chunk_size), int(model_config.max_action_dim)
        if ds.actions.shape[1] < chunk:
            raise ConfigError(f"dataset chunks hold {ds.actions.shape[1]} actions, π0's chunk_size is {chunk}")
        if ds.images.shape[1] < inputs.shapes.num_cameras:
            raise ConfigError(f"dataset has {ds.images.shape[1]} camera(s), the checkpoint takes "
                              f"{inputs.shapes.num_cameras}; regenerate with `edge-vla make-data --cameras N`")
        mean, std = (np.asarray(v, np.float32) for v in inputs.plan.action_stats)
        actions = (ds.actions[:, :chunk].astype(np.float32) - mean) / (std + np.float32(STATS_EPS))
        self.actions = torch.from_numpy(np.pad(actions, ((0, 0), (0, 0), (0, pad - actions.shape[-1]))))
        self.ds, self.inputs = ds, inputs
        self.valid = int(ds.actions.shape[-1])

    def __len__(self) -> int:
        return len(self.ds)

    def batch(self, idx: Tensor | np.ndarray) -> dict[str, Tensor]:
        ids = np.asarray(idx, dtype=np.int64)
        ds = self.ds
        obs = [Observation(list(ds.images[i]), str(ds.instructions[i]), ds.states[i]) for i in ids]
        return {**self.inputs.torch(obs), "actions": self.actions[torch.from_numpy(ids)]}

    def goals(self, idx: Tensor | np.ndarray) -> Tensor | None:
        """Where the named block is (metres, [B, 2]) for these samples, if the dataset knows it."""
        if self.ds.goals is None:
            return None
        return torch.from_numpy(self.ds.goals[np.asarray(idx, dtype=np.int64)].astype(np.float32))


class GoalProbe(torch.nn.Module):
    """Training-only: the named block's xy from the VLM's last hidden states (mean over the prompt's tokens),
    in table-normalised units like `VLA.flow_loss`'s goal term (centre 0.5 m, scale 0.25 m)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        width = int(model.config.vlm_config.text_config.hidden_size)
        self.head = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, 2))
        self._hidden: Tensor | None = None
        # The VLM runs inside π0's forward; a hook keeps its output without a second prefix pass.
        model.model.vlm.register_forward_hook(self._keep)

    def _keep(self, _module: Any, _inputs: Any, output: Any) -> None:
        self._hidden = output.last_hidden_state

    def loss(self, attention_mask: Tensor, goals: Tensor) -> Tensor:
        if self._hidden is None:
            raise RuntimeError("GoalProbe.loss before a π0 forward pass")
        m = attention_mask.to(self._hidden.dtype)[..., None]
        pooled = (self._hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        self._hidden = None
        return torch.nn.functional.mse_loss(self.head(pooled), (goals - 0.5) / 0.25)


def flow_loss(model: Any, batch: dict[str, Tensor], valid: int, noise: Tensor | None = None,
              timestep: Tensor | None = None) -> Tensor:
    """π0's flow-matching loss from its own forward, per element, averaged over the valid action dims
    (noise and t drawn by π0 when not given)."""
    saved = model.config.loss_reduction
    model.config.loss_reduction = "none"  # per element, so the padded dims can be left out
    try:
        out = model(**batch, noise=noise, timestep=timestep)
    finally:
        model.config.loss_reduction = saved
    return out.loss[..., :valid].mean()


@torch.no_grad()
def validation_loss(model: Any, data: TrainData, idx: Tensor, seed: int = 1234, max_samples: int = 256) -> float:
    """Flow loss on held-out samples at fixed noise and t (comparable between checkpoints)."""
    if len(idx) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    idx = idx[torch.randperm(len(idx), generator=g)[:max_samples]]
    total = 0.0
    for part in idx.split(64):
        b = data.batch(part.numpy())
        noise = torch.randn(b["actions"].shape, generator=g)
        t = torch.rand(len(part), generator=g) * 0.999 + 0.001  # π0's time range
        total += float(flow_loss(model, b, data.valid, noise, t)) * len(part)
    model.train(was_training)
    return total / len(idx)


def train_step(model: Any, opt: torch.optim.Optimizer, batch: dict[str, Tensor], valid: int,
               noise: Tensor | None = None, timestep: Tensor | None = None, probe: GoalProbe | None = None,
               goals: Tensor | None = None, goal_weight: float = 0.0) -> float:
    """One optimizer step; returns the flow loss (the goal term, if any, is trained but not reported)."""
    loss = flow_loss(model, batch, valid, noise, timestep)
    total = loss
    if probe is not None and goals is not None and goal_weight > 0:
        total = loss + goal_weight * probe.loss(batch["attention_mask"], goals)
    opt.zero_grad(set_to_none=True)
    total.backward()
    params = [p for g in opt.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    zero_padded_dims(model, valid)  # AdamW leaves them at 0 already; this makes it an invariant
    return float(loss.detach())


def make_optimizer(model: Any, tc: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)


def init_checkpoint(ds: Dataset, out: Path, cfg: dict[str, Any], seed: int = 0) -> Any:
    """Write step 0 (model, processor, robot.json) so that the directory is a π0 checkpoint from the start."""
    processor = build_processor(ds, cfg)
    valid = int(ds.actions.shape[-1])
    if valid > int(cfg["max_action_dim"]) or ds.states.shape[-1] > int(cfg["max_state_dim"]):
        raise ConfigError(f"the dataset has {ds.states.shape[-1]} state / {valid} action dims, more than the π0 "
                          f"config's max_state_dim {cfg['max_state_dim']} / max_action_dim {cfg['max_action_dim']}")
    model = new_model(cfg, processor, valid, seed)
    sidecar = sim_sidecar(int(ds.meta.get("num_cameras", ds.images.shape[1])), float(ds.meta.get("action_period_s", 0.1)))

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / SIDECAR_FILE).write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")

    write_checkpoint(out, write)
    return model


def write_checkpoint(out: Path, write: Callable[[Path], None], state: dict[str, Any] | None = None) -> None:
    """Put the files `write(staging)` makes into `out` so that a stop at any point leaves a whole checkpoint there.

    They are written into a staging directory inside `out` and fsynced first: a stop while writing (the slow part)
    leaves `out` as it was. `state` (train_state.json, what --resume trusts) goes into the staging directory after
    them, with the digest of every file it was saved with; from then on the save is committed. The files are renamed
    into `out`, the state last, so a stop between renames leaves the rest, state included, in the staging directory,
    and `finish_interrupted_save` completes the save before a resume reads anything."""
    out.mkdir(parents=True, exist_ok=True)
    # Left by an earlier save: one that died before committing, or (in a new training over -o) a committed one of
    # the old run. A resume has completed a committed one before this (finish_interrupted_save).
    _drop_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    try:
        write(staging)
        files = sorted(p for p in staging.iterdir() if p.is_file())
        for p in files:
            _fsync(p)
        if state is not None:  # the commit: only once every file it names is durable
            digests = {p.name: file_digest(p) for p in files}
            (staging / STATE_FILE).write_text(json.dumps({**state, "files": digests}) + "\n", encoding="utf-8")
            _fsync(staging / STATE_FILE)
            _fsync(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _move_in(staging, out)
    staging.rmdir()


def finish_interrupted_save(out: Path) -> bool:
    """Complete a save that was stopped between its renames (its staging directory holds its state: everything was
    written); drop one that was stopped before. True if a save was completed."""
    finished = False
    for staging in sorted(out.glob(STAGING_PREFIX + "*")):
        if (staging / STATE_FILE).is_file():
            _move_in(staging, out)
            log.warning("%s: completed the checkpoint save that was interrupted (step %s)", out,
                        json.loads((out / STATE_FILE).read_text(encoding="utf-8")).get("step"))
            finished = True
    _drop_staging(out)
    return finished


def check_state_files(out: Path, state: dict[str, Any]) -> None:
    """--resume continues the files train_state.json was saved with, or refuses: another step's weights beside this
    state would be trained on as this step's, without a word. (A state from before the digests were kept has none.)"""
    for name, digest in state.get("files", {}).items():
        path = out / name
        if not path.is_file() or file_digest(path) != digest:
            raise CheckpointError(f"--resume: {path} is not the file {STATE_FILE} (step {state.get('step')}) was saved "
                                  "with (replaced or changed since); it cannot be resumed exactly: start a new training "
                                  "with --overwrite, or use its weights as they are (`edge-vla export`)")


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _move_in(staging: Path, out: Path) -> None:
    """Rename the staged files into `out`, the state last and only once the others are durable there."""
    names = sorted(p.name for p in staging.iterdir() if p.name != STATE_FILE)
    for name in names:
        os.replace(staging / name, out / name)
    _fsync(out)
    if (staging / STATE_FILE).is_file():
        os.replace(staging / STATE_FILE, out / STATE_FILE)
        _fsync(out)


def _drop_staging(out: Path) -> None:
    for staging in out.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(staging, ignore_errors=True)


def _fsync(path: Path) -> None:
    """fsync a file's bytes or a directory's entries (the renames into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_training_checkpoint(out: Path, model: Any, opt: torch.optim.Optimizer, probe: GoalProbe | None,
                             state: dict[str, Any]) -> None:
    """The weights (with config.json), optimizer and goal probe of a step, then its train_state.json."""
    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        torch.save(opt.state_dict(), staging / OPTIMIZER_FILE)
        if probe is not None:
            torch.save(probe.state_dict(), staging / PROBE_FILE)

    write_checkpoint(out, write, state)


def text_tokens_needed(inputs_src: Any, instructions: np.ndarray) -> int:
    """Text tokens (bos + instruction + newline) of the dataset's longest prompt: training pads to this,
    not to π0's 48, which the attention mask makes equivalent and which saves prefix compute."""
    tok = inputs_src.load_tokenizer()
    bos = inputs_src.tokenizer_config.get("bos_token") or "<bos>"
    return max(len(tok.encode(f"{bos}{s}\n").ids) for s in np.unique(instructions))


def train_pi0(ds: Dataset, out: str | Path, tc: TrainConfig, config: dict[str, Any] | None = None,
              resume: bool = False, progress: bool = True) -> Path:
    """Train a reduced π0 on `ds`; checkpoints (transformers format + processor + robot.json) land in `out`."""
    threads = tc.threads or default_threads()
    torch.set_num_threads(threads)
    out = Path(out)
    start, state = 0, {}
    if resume and out.is_dir():
        finish_interrupted_save(out)  # before anything of the run is read
    if resume and (out / STATE_FILE).is_file():
        state = json.loads((out / STATE_FILE).read_text(encoding="utf-8"))
        start = int(state["step"])
        check_state_files(out, state)
        model = open_pi0(out).load_model()  # refuses missing/unexpected tensors rather than re-initialising them
        log.info("resuming %s from step %d", out, start)
    else:
        model = init_checkpoint(ds, out, sim_pi0_config(**(config or {})), tc.seed)
    model.train()
    src = open_pi0(out)
    inputs = Pi0Inputs(src, model, max_text_tokens=text_tokens_needed(src, ds.instructions))
    data = TrainData(ds, inputs, model.config)
    opt = make_optimizer(model, tc)
    probe = None
    if ds.goals is not None and tc.goal_weight > 0:
        probe = GoalProbe(model).train()
        if start and (out / PROBE_FILE).is_file():
            probe.load_state_dict(torch.load(out / PROBE_FILE, weights_only=True))
        opt.add_param_group({"params": list(probe.parameters())})
    if start:
        opt.load_state_dict(torch.load(out / OPTIMIZER_FILE, weights_only=True))
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    else:
        torch.manual_seed(tc.seed)
    train_idx, val_idx = split_episodes(ds.episodes, tc.val_fraction, groups=task_groups(ds))
    params = sum(p.numel() for p in model.parameters())
    log.info("π0 %.2fM parameters, %d thread(s), %d train / %d validation samples", params / 1e6, threads,
             len(train_idx), len(val_idx))
    prior_seconds = float(state.get("seconds", 0.0))
    t0 = time.perf_counter()
    losses: list[float] = []
    bar = progress_bar(range(start, tc.steps), desc="train pi0", unit="step", initial=start, enabled=progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        idx = train_idx[torch.randint(0, len(train_idx), (tc.batch_size,))].numpy()
        losses.append(train_step(model, opt, data.batch(idx), data.valid, probe=probe, goals=data.goals(idx),
                                 goal_weight=tc.goal_weight))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        done = step + 1
        if done % tc.checkpoint_every == 0 or done == tc.steps:
            rng = torch.get_rng_state()  # the validation pass must not perturb training (exact resume)
            val = validation_loss(model, data, val_idx)
            seconds = prior_seconds + time.perf_counter() - t0
            state = {"family": "pi0", "step": done, "loss": float(np.mean(losses[-50:])), "val_loss": None if np.isnan(val) else val,
                     "seconds": seconds, "steps_per_s": (done - start) / max(time.perf_counter() - t0, 1e-9),
                     "threads": threads, "batch_size": tc.batch_size, "parameters": params,
                     "dataset": ds.meta, "train": tc.__dict__, "torch_rng": rng.tolist()}
            log.info("step %d: train loss %.4f, validation loss %.4f", done, state["loss"], val)
            save_training_checkpoint(out, model, opt, probe, state)
    model.eval()
    return out
