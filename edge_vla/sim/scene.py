"""A 2-link planar arm over a table with coloured blocks, rendered to RGB with numpy.

The scene is separate from the dynamics so that anything that knows the joint angles (the sim's own
integrator, or a motor-controller emulator) can render cameras and score success.
Units: metres on a 1 m x 1 m table, radians for joints.

Two splits (`SPLITS`, chosen with `--env sim` = `sim:base` or `--env sim:hard`): `base` is the original task
(3 blocks of 4 colours, fixed lighting); `hard` has 5 blocks of 7 colours with confusable pairs
(red/orange, blue/purple, green/cyan), per-block colour jitter, per-episode brightness/contrast, and 1-2
distractors (rings and bars, often in a block's colour) that are never a target. Same templates, same arm.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (230, 210, 40),
}
# The hard split's extra colours: each sits next to one of the base colours (orange~red/yellow, purple~blue,
# cyan~green). Every colour word starts with a different byte, and "reach the purple block" (22 bytes) fits
# the tokenizer's max_text_len of 24 with the end mark.
HARD_COLORS: dict[str, tuple[int, int, int]] = {
    **COLORS,
    "orange": (235, 130, 35),
    "purple": (140, 50, 190),
    "cyan": (40, 190, 200),
}
TEMPLATES = ("reach the {} block", "touch the {} block", "go to the {} block")
TABLE_RGB = (150, 140, 125)
ARM_RGB = (30, 30, 30)
EE_RGB = (250, 250, 250)

BASE = np.array([0.5, 0.05])
LINKS = (0.45, 0.40)
JOINT_NAMES = ("shoulder", "elbow")
JOINT_LOWER = np.array([0.0, -2.6], dtype=np.float32)
JOINT_UPPER = np.array([np.pi, 2.6], dtype=np.float32)
JOINT_VEL_LIMIT = np.array([2.5, 2.5], dtype=np.float32)  # rad/s
JOINT_ACCEL_LIMIT = np.array([20.0, 20.0], dtype=np.float32)  # rad/s^2 (the action space's, enforced onboard)
HOME = np.array([np.pi / 2, 0.0], dtype=np.float32)
BLOCK_HALF = 0.05
SUCCESS_RADIUS = 0.06
NUM_BLOCKS = 3  # the base split's; a scene's own count is len(scene.block_colors)
DISTRACTOR_KINDS = ("ring", "bar")
RING_RADII = (0.032, 0.055)  # inner, outer (m): about a block's size, hollow
BAR_HALF = (0.085, 0.018)  # half length, half width (m)


@dataclass(frozen=True)
class SimSplit:
    """What varies between the sim's splits. `base` must sample and render exactly as before splits existed."""

    name: str
    colors: dict[str, tuple[int, int, int]]
    num_blocks: int
    min_separation: float = 0.2  # between block centres (m)
    color_jitter: float = 0.0  # per block and channel, uniform +- this (0-255 units)
    brightness: float = 0.0  # per episode, added, uniform +- this (0-255 units)
    contrast: float = 0.0  # per episode, gain about mid-grey, uniform 1 +- this
    distractors: tuple[int, int] = (0, 0)  # inclusive range of the count per scene


SPLITS: dict[str, SimSplit] = {
    "base": SimSplit("base", COLORS, NUM_BLOCKS),
    # 5 blocks need a little less spacing to sample quickly; 0.18 m still leaves every other block well outside
    # SUCCESS_RADIUS of the target. Jitter stays below half the gap between the confusable pairs.
    "hard": SimSplit("hard", HARD_COLORS, 5, min_separation=0.18, color_jitter=18.0, brightness=30.0,
                     contrast=0.25, distractors=(1, 2)),
}


def get_split(name: str) -> SimSplit:
    try:
        return SPLITS[name]
    except KeyError:
        raise ValueError(f"unknown sim split {name!r}; use one of {sorted(SPLITS)}") from None


@dataclass(frozen=True)
class Distractor:
    """A shape on the table that is not a block (never named as a target): a ring or a bar."""

    kind: str
    xy: np.ndarray
    color: str
    angle: float = 0.0  # bars only (rad)


def forward_kinematics(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(elbow xy, end-effector xy) for joint angles q = [shoulder, elbow]."""
    a1 = float(q[0])
    a2 = a1 + float(q[1])
    elbow = BASE + LINKS[0] * np.array([np.cos(a1), np.sin(a1)])
    ee = elbow + LINKS[1] * np.array([np.cos(a2), np.sin(a2)])
    return elbow, ee


def inverse_kinematics(target: np.ndarray, q_near: np.ndarray) -> np.ndarray:
    """Joint angles that put the end effector on `target`, choosing the branch nearest `q_near`."""
    d = np.asarray(target, dtype=np.float64) - BASE
    l1, l2 = LINKS
    r2 = float(d @ d)
    c2 = np.clip((r2 - l1 * l1 - l2 * l2) / (2 * l1 * l2), -1.0, 1.0)
    best = None
    for sign in (1.0, -1.0):
        q2 = sign * np.arccos(c2)
        q1 = np.arctan2(d[1], d[0]) - np.arctan2(l2 * np.sin(q2), l1 + l2 * np.cos(q2))
        q = np.array([q1, q2])
        q = np.clip(q, JOINT_LOWER, JOINT_UPPER)
        cost = float(np.abs(q - q_near).sum())
        if best is None or cost < best[0]:
            best = (cost, q)
    assert best is not None
    return best[1].astype(np.float32)


@dataclass(frozen=True)
class Scene:
    """Block positions and colours, and which block the instruction names (plus the hard split's looks)."""

    block_xy: np.ndarray  # [num_blocks, 2]
    block_colors: tuple[str, ...]
    target: int
    instruction: str
    split: str = "base"
    block_rgb: np.ndarray | None = None  # [num_blocks, 3] jittered colours; None: the palette's
    distractors: tuple[Distractor, ...] = ()
    lighting: tuple[float, float] = (1.0, 0.0)  # (contrast gain, brightness offset)

    @classmethod
    def sample(cls, rng: np.random.Generator, split: str = "base") -> Scene:
        spec = get_split(split)
        # The base split's draws, in their original order (datasets and checkpoints depend on them).
        colors = tuple(rng.choice(list(spec.colors), size=spec.num_blocks, replace=False).tolist())
        blocks: list[np.ndarray] = []
        while len(blocks) < spec.num_blocks:
            # Reachable, in front of the base, apart from each other and away from the home pose.
            r = rng.uniform(0.35, 0.75)
            ang = rng.uniform(0.25, np.pi - 0.25)
            p = BASE + r * np.array([np.cos(ang), np.sin(ang)])
            if not (0.08 < p[0] < 0.92 and 0.15 < p[1] < 0.92):
                continue
            if all(np.linalg.norm(p - b) > spec.min_separation for b in blocks):
                blocks.append(p)
        target = int(rng.integers(spec.num_blocks))
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        scene = cls(np.stack(blocks), colors, target, template.format(colors[target]))
        if split == "base":
            return scene
        # Hard split: drawn after everything above, so a layout does not depend on its looks.
        rgb = np.array([spec.colors[c] for c in colors], np.float64)
        rgb = rgb + rng.uniform(-spec.color_jitter, spec.color_jitter, size=rgb.shape)
        lighting = (float(rng.uniform(1 - spec.contrast, 1 + spec.contrast)),
                    float(rng.uniform(-spec.brightness, spec.brightness)))
        distractors: list[Distractor] = []
        count = int(rng.integers(spec.distractors[0], spec.distractors[1] + 1))
        while len(distractors) < count:
            # Anywhere on the table, clear of the blocks and of each other; the colour is any of the split's
            # (most often one a block has, so telling a block from a ring or bar takes its shape).
            p = rng.uniform([0.1, 0.12], [0.9, 0.92])
            if all(np.linalg.norm(p - b) > 0.17 for b in blocks) and all(
                np.linalg.norm(p - d.xy) > 0.2 for d in distractors
            ):
                kind = DISTRACTOR_KINDS[int(rng.integers(len(DISTRACTOR_KINDS)))]
                color = str(rng.choice(list(spec.colors)))
                distractors.append(Distractor(kind, p, color, float(rng.uniform(0, np.pi))))
        return dataclasses.replace(scene, split=split, block_rgb=np.clip(rgb, 0, 255), distractors=tuple(distractors),
                                   lighting=lighting)

    def with_target(self, target: int, template: str | None = None) -> Scene:
        """The same layout with another block named: the counterfactual that makes language matter."""
        if not 0 <= target < len(self.block_colors):
            raise ValueError(f"target must be a block index in [0, {len(self.block_colors)}), got {target}")
        template = template or next(t for t in TEMPLATES if t.format(self.block_colors[self.target]) == self.instruction)
        return dataclasses.replace(self, target=target, instruction=template.format(self.block_colors[target]))

    @property
    def target_xy(self) -> np.ndarray:
        return self.block_xy[self.target]

    def distance(self, q: np.ndarray) -> float:
        return float(np.linalg.norm(forward_kinematics(q)[1] - self.target_xy))

    def reached(self, q: np.ndarray) -> bool:
        return self.distance(q) < SUCCESS_RADIUS

    def render(self, q: np.ndarray, size: int, center: np.ndarray | None = None, extent: float = 1.0) -> np.ndarray:
        """RGB uint8 [size, size, 3] of a square window `extent` metres wide (the whole table by default)."""
        if center is None:
            center = np.array([0.5, 0.5])
        coords = (np.arange(size) + 0.5) / size * extent
        xs = center[0] - extent / 2 + coords
        ys = center[1] + extent / 2 - coords  # image row 0 is the far edge of the table
        px, py = np.meshgrid(xs, ys)
        img = np.empty((size, size, 3), dtype=np.uint8)
        img[:] = TABLE_RGB
        outside = (px < 0) | (px > 1) | (py < 0) | (py > 1)
        img[outside] = (60, 60, 60)
        palette = get_split(self.split).colors
        for d in self.distractors:
            if d.kind == "ring":
                r = np.hypot(px - d.xy[0], py - d.xy[1])
                mask = (r >= RING_RADII[0]) & (r <= RING_RADII[1])
            else:
                u = (px - d.xy[0]) * np.cos(d.angle) + (py - d.xy[1]) * np.sin(d.angle)
                v = -(px - d.xy[0]) * np.sin(d.angle) + (py - d.xy[1]) * np.cos(d.angle)
                mask = (np.abs(u) <= BAR_HALF[0]) & (np.abs(v) <= BAR_HALF[1])
            img[mask] = palette[d.color]
        for i, (xy, color) in enumerate(zip(self.block_xy, self.block_colors)):
            mask = (np.abs(px - xy[0]) <= BLOCK_HALF) & (np.abs(py - xy[1]) <= BLOCK_HALF)
            img[mask] = palette[color] if self.block_rgb is None else np.round(self.block_rgb[i]).astype(np.uint8)
        elbow, ee = forward_kinematics(q)
        width = max(0.018, 1.2 * extent / size)
        for a, b in ((BASE, elbow), (elbow, ee)):
            img[_segment_distance(px, py, a, b) <= width] = ARM_RGB
        img[np.hypot(px - ee[0], py - ee[1]) <= max(0.025, 1.5 * extent / size)] = EE_RGB
        if self.lighting != (1.0, 0.0):
            gain, offset = self.lighting
            img = np.clip((img.astype(np.float32) - 128.0) * gain + 128.0 + offset, 0, 255).round().astype(np.uint8)
        return img

    def cameras(self, q: np.ndarray, size: int, num_cameras: int) -> list[np.ndarray]:
        """Camera 0 sees the whole table; camera 1 is a wrist view, 0.4 m wide, centred on the end effector."""
        views = [self.render(q, size)]
        if num_cameras > 1:
            views.append(self.render(q, size, center=forward_kinematics(q)[1], extent=0.4))
        for _ in range(2, num_cameras):
            views.append(views[0].copy())
        return views


def _segment_distance(px: np.ndarray, py: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = ((px - a[0]) * ab[0] + (py - a[1]) * ab[1]) / max(float(ab @ ab), 1e-12)
    t = np.clip(t, 0.0, 1.0)
    return np.hypot(px - (a[0] + t * ab[0]), py - (a[1] + t * ab[1]))
