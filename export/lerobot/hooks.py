"""The few calls the CLIs make when a data option is `lerobot:PATH` (kept here so the CLIs change by a line)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from edge_vla.action_space import ActionSpace
from edge_vla.config import VLAConfig

from ..envs import text_len_for
from .errors import LeRobotDatasetError
from .layout import open_meta
from .reader import (
    RecordedDataset,
    check_feature,
    check_text_len,
    choose_episodes,
    dataset_tasks,
    is_lerobot_source,
    load_dataset,
    parse_source,
    select_cameras,
)

log = logging.getLogger(__name__)


def training_data(source: str, cfg: VLAConfig) -> tuple[VLAConfig, RecordedDataset]:
    """Every size the data decides comes from the dataset: state and action sizes from its features, the
    instruction length from its longest task (all episodes: held-out ones are evaluated with the same model).
    The data is the training split."""
    spec = parse_source(source)
    meta = open_meta(spec.root)
    select_cameras(meta, spec, cfg.num_cameras)
    for key, opt in ((spec.state, "state"), (spec.action, "action")):
        if key not in meta.features:
            raise LeRobotDatasetError(f"{meta.root}: the model needs the {opt} but the dataset has no feature {key!r} "
                                      f"(features: {sorted(meta.features)}); name it with ?{opt}=KEY")
    text_len = max(cfg.max_text_len, text_len_for(dataset_tasks(meta, spec.episodes)))
    if text_len != cfg.max_text_len:
        log.info("%s: instructions up to %d tokens (the longest task and its end mark; preset %r takes %d)",
                 source, text_len, cfg.preset, cfg.max_text_len)
    cfg = dataclasses.replace(cfg, state_dim=meta.dim(spec.state), action_dim=meta.dim(spec.action),
                              max_text_len=text_len).validate()
    ds = load_dataset(spec, cfg.image_size, cfg.num_cameras, cfg.chunk_len, split="train", progress=True,
                      text_limits={"the model": cfg.max_text_len})
    ds.meta["source"] = source
    log.info("%s: %d training frames from %d episodes (%d held out)", source, len(ds), len(ds.meta["episodes"]),
             len(ds.meta["val_episodes"]))
    return cfg, ds


def distill_data(source: str, teacher_config: VLAConfig, student_config: VLAConfig) -> RecordedDataset:
    """Recorded states for offline distillation (the teacher labels them): the training split, read with as
    many cameras as the teacher or the student needs."""
    if teacher_config.image_size != student_config.image_size:
        raise LeRobotDatasetError(f"teacher images are {teacher_config.image_size}px, the student's "
                                  f"{student_config.image_size}px; distill into a preset of the teacher's image size")
    cams = max(teacher_config.num_cameras, student_config.num_cameras)
    ds = load_dataset(source, student_config.image_size, cams, student_config.chunk_len, split="train",
                      state_dim=teacher_config.state_dim, action_dim=teacher_config.action_dim, progress=True,
                      text_limits={"the teacher": teacher_config.max_text_len,
                                   "the student": student_config.max_text_len})
    ds.meta["source"] = source
    return ds


def calibration_data(source: str, cfg: VLAConfig, count: int) -> RecordedDataset:
    """Frames for INT8 calibration / numerics: spread over the training split's episodes."""
    return load_dataset(source, cfg.image_size, cfg.num_cameras, cfg.chunk_len, split="train",
                        state_dim=cfg.state_dim, action_dim=cfg.action_dim, max_episodes=max(4, count // 4),
                        text_limits={"the model": cfg.max_text_len})


def dataset_text_len(source: str) -> int:
    """The instruction length the dataset's longest task needs (tokenizer bytes and the end mark)."""
    spec = parse_source(source)
    return text_len_for(dataset_tasks(open_meta(spec.root), spec.episodes))


def check_calibration_source(source: str, cfg: VLAConfig, count: int) -> None:
    """What calibration_data would refuse, from the metadata alone (no frame decoded): the dataset, its
    cameras, the state and action sizes, the episodes and their tasks against the model."""
    spec = parse_source(source)
    meta = open_meta(spec.root)
    select_cameras(meta, spec, cfg.num_cameras)
    check_feature(meta, spec.state, "state", "state", cfg.state_dim)
    check_feature(meta, spec.action, "action", "action", cfg.action_dim)
    chosen, _ = choose_episodes(meta, spec, "train", max(4, count // 4))
    check_text_len(meta, dataset_tasks(meta, chosen), {"the model": cfg.max_text_len})


def export_defaults(checkpoint_meta: dict[str, Any], calib: str | None) -> tuple[ActionSpace | None, str | None]:
    """For a checkpoint trained or distilled on a LeRobot dataset: the bundle's action space (names, limits,
    period) from that dataset, and the dataset as the calibration/numerics source unless one is given."""
    data = checkpoint_meta.get("dataset") or {}
    if data.get("format") != "lerobot":
        return None, calib
    space = ActionSpace.from_dict(data["action_space"]) if "action_space" in data else None
    if calib is None and is_lerobot_source(data.get("source")):
        calib = data["source"]
        log.info("calibrating and checking numerics on the training dataset %s", calib)
    return space, calib
