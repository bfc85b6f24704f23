"""The manifest's description of a bundle's computation, parsed and validated (docs/MANIFEST.md).

    contract = Contract.from_manifest(bundle.manifest, bundle.root)
    contract.step.input_by_role("x_t"), contract.flow.dt(10), contract.time_rows(10)

Every problem is reported at once, as a BundleError that says what is wrong and that re-exporting fixes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_vla.errors import BundleError, ConfigError
from edge_vla.runtime.flow import SOLVERS, Flow

REFERENCE_FAMILY = "edge-vla-reference"
GRAPH_ROLES = ("prefix", "step", "chunk")
OBSERVATION_ROLES = ("images", "image_mask", "tokens", "token_mask", "state")
INPUT_ROLES = {
    "prefix": set(OBSERVATION_ROLES),
    "step": set(OBSERVATION_ROLES) | {"x_t", "time", "time_cond", "prefix", "prefix_mask"},
    "chunk": set(OBSERVATION_ROLES) | {"noise"},
}
OUTPUT_ROLES = {"prefix": {"prefix"}, "step": {"velocity"}, "chunk": {"actions"}}
TIME_KINDS = {"scalar": "time", "table": "time_cond"}  # time_input.kind -> the step input's role
DTYPES = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64,
          "uint8": np.uint8, "bool": np.bool_}


@dataclass(frozen=True)
class IOSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    role: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(DTYPES[self.dtype])


@dataclass(frozen=True)
class GraphContract:
    name: str
    role: str
    file: str
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]
    steps: int | None = None  # the unrolled chunk graph's step count

    def inputs_by_role(self, role: str) -> list[IOSpec]:
        return [s for s in self.inputs if s.role == role]

    def input_by_role(self, role: str) -> IOSpec:
        found = self.inputs_by_role(role)
        if len(found) != 1:
            raise BundleError(f"graph {self.name!r} must have exactly one input with role {role!r}, has {len(found)}")
        return found[0]

    def output_by_role(self, role: str) -> IOSpec:
        found = [s for s in self.outputs if s.role == role]
        if len(found) != 1:
            raise BundleError(f"graph {self.name!r} must have exactly one output with role {role!r}, has {len(found)}")
        return found[0]


@dataclass(frozen=True)
class TimeInput:
    kind: str  # "scalar" | "table"
    input: str
    tables: Mapping[int, str] = field(default_factory=dict)  # step count -> bundle-relative .npy


@dataclass(frozen=True)
class Contract:
    family: str
    prefix: GraphContract
    step: GraphContract
    chunk: GraphContract | None
    flow: Flow
    solvers: tuple[str, ...]
    solver: str
    num_steps: int
    min_steps: int
    max_steps: int
    recommended_min_steps: int
    time_input: TimeInput
    preprocessing: Mapping[str, Any]
    root: Path | None = None
    # Real-time chunking (manifest "rtc"): how many leading actions a prefix may freeze; 0 without RTC.
    rtc_max_delay: int = 0

    # --- parsing ------------------------------------------------------------------------------------
    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], root: Path | None = None) -> Contract:
        problems: list[str] = []
        graphs = {name: _graph(name, g, problems) for name, g in _mapping(manifest, "graphs", problems).items()}
        by_role: dict[str, list[GraphContract]] = {r: [g for g in graphs.values() if g and g.role == r]
                                                   for r in GRAPH_ROLES}
        for role, need in (("prefix", 1), ("step", 1)):
            if len(by_role[role]) != need:
                problems.append(f"needs exactly one graph with role {role!r}, found {len(by_role[role])}")
        if len(by_role["chunk"]) > 1:
            problems.append("at most one graph may have role 'chunk'")
        sampler = _mapping(manifest, "sampler", problems)
        flow = _flow(sampler.get("time", {}), problems)
        raw_solvers = sampler.get("solvers", ())
        solvers = tuple(raw_solvers) if isinstance(raw_solvers, list) else ()
        if not solvers or any(s not in SOLVERS for s in solvers):
            problems.append(f"sampler.solvers must be a non-empty subset of {list(SOLVERS)}, got {raw_solvers!r:.80}")
        solver = sampler.get("solver", "euler")
        if solvers and solver not in solvers:
            problems.append(f"sampler.solver {solver!r} is not among sampler.solvers {list(solvers)}")
        ints = {}
        for key in ("num_steps", "min_steps", "max_steps"):
            v = sampler.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                problems.append(f"sampler.{key} must be a positive integer, got {v!r}")
            ints[key] = v if isinstance(v, int) else 1
        if ints["min_steps"] > ints["max_steps"] or not ints["min_steps"] <= ints["num_steps"] <= ints["max_steps"]:
            problems.append(f"sampler steps: need min_steps <= num_steps <= max_steps, got {ints}")
        time_input = _time_input(sampler.get("time_input"), problems)
        recommended = sampler.get("recommended_min_steps", 1)
        if not isinstance(recommended, int) or isinstance(recommended, bool) or recommended < 1:
            problems.append(f"sampler.recommended_min_steps must be a positive integer, got {recommended!r:.40}")
            recommended = 1
        prep = manifest.get("preprocessing")
        if not isinstance(prep, Mapping) or "kind" not in prep:
            problems.append("preprocessing must be an object with a 'kind'")
            prep = {}
        if len(by_role["prefix"]) != 1 or len(by_role["step"]) != 1:
            raise _invalid(problems)  # nothing to wire; else go on, so every problem is reported at once
        prefix, step = by_role["prefix"][0], by_role["step"][0]
        chunk = by_role["chunk"][0] if by_role["chunk"] else None
        contract = cls(str(manifest.get("family", "")), prefix, step, chunk, flow, solvers, solver,
                       ints["num_steps"], ints["min_steps"], ints["max_steps"],
                       recommended, time_input, prep, root,
                       _rtc_max_delay(manifest.get("rtc"), step, problems))
        contract._check_wiring(problems)
        if not contract.family:
            problems.append("family is missing (e.g. 'edge-vla-reference', 'pi0')")
        if problems:
            raise _invalid(problems)
        return contract

    def _check_wiring(self, problems: list[str]) -> None:
        for g in filter(None, (self.prefix, self.step, self.chunk)):
            for io, allowed in ((g.inputs, INPUT_ROLES[g.role]), (g.outputs, OUTPUT_ROLES[g.role])):
                for s in io:
                    if s.role not in allowed:
                        problems.append(f"graph {g.name!r} IO {s.name!r} has role {s.role!r}; a {g.role} graph "
                                        f"allows {sorted(allowed)}")
        prefix_out = {s.name: s for s in self.prefix.outputs}
        for s in self.step.inputs_by_role("prefix"):
            src = prefix_out.get(s.name)
            if src is None:
                problems.append(f"step input {s.name!r} (role prefix) has no prefix-graph output of that name")
            elif (src.shape, src.dtype) != (s.shape, s.dtype):
                problems.append(f"step input {s.name!r} is {s.dtype}{list(s.shape)} but the prefix output is "
                                f"{src.dtype}{list(src.shape)}")
        for role in ("x_t",):
            if len(self.step.inputs_by_role(role)) != 1:
                problems.append(f"the step graph needs exactly one input with role {role!r}")
        velocity = [s for s in self.step.outputs if s.role == "velocity"]
        x_t = self.step.inputs_by_role("x_t")
        if len(velocity) != 1:
            problems.append("the step graph needs exactly one output with role 'velocity'")
        elif x_t and velocity[0].shape != x_t[0].shape:
            problems.append(f"velocity shape {list(velocity[0].shape)} differs from x_t shape {list(x_t[0].shape)}")
        if x_t and x_t[0].dtype not in ("float32", "float16"):
            problems.append(f"x_t must be float32 or float16, not {x_t[0].dtype}")
        want_role = TIME_KINDS[self.time_input.kind]
        timed = self.step.inputs_by_role(want_role)
        if [s.name for s in timed] != [self.time_input.input]:
            problems.append(f"sampler.time_input names step input {self.time_input.input!r} ({self.time_input.kind}), "
                            f"but the step graph's {want_role!r} inputs are {[s.name for s in timed]}")
        other = "time" if want_role == "time_cond" else "time_cond"
        if self.step.inputs_by_role(other):
            problems.append(f"the step graph has a {other!r} input but sampler.time_input.kind is "
                            f"{self.time_input.kind!r}")
        seen: dict[str, str] = {}
        for g in filter(None, (self.prefix, self.step, self.chunk)):
            for s in g.inputs:
                if s.role in OBSERVATION_ROLES and seen.setdefault(s.role, s.name) != s.name:
                    problems.append(f"role {s.role!r} is input {seen[s.role]!r} in one graph and {s.name!r} in "
                                    f"another; observation inputs must share one name")

    # --- what the runtime asks ----------------------------------------------------------------------
    @property
    def x_t(self) -> IOSpec:
        return self.step.input_by_role("x_t")

    @property
    def velocity(self) -> IOSpec:
        return self.step.output_by_role("velocity")

    @property
    def time(self) -> IOSpec:
        return self.step.input_by_role(TIME_KINDS[self.time_input.kind])

    @property
    def prefix_mask(self) -> IOSpec | None:
        """The step graph's RTC prefix mask input ([1, H]; 1 on frozen positions), or None without RTC."""
        return self.step.input_by_role("prefix_mask") if self.rtc_max_delay else None

    def observation_inputs(self) -> dict[str, IOSpec]:
        """role -> input spec, over every graph (one name per role, checked at parse time)."""
        out: dict[str, IOSpec] = {}
        for g in (self.prefix, self.step):
            for s in g.inputs:
                if s.role in OBSERVATION_ROLES:
                    out.setdefault(s.role, s)
        return out

    def allowed_steps(self) -> list[int]:
        steps = range(self.min_steps, self.max_steps + 1)
        if self.time_input.kind == "table":
            return [n for n in steps if n in self.time_input.tables]
        return list(steps)

    def check_steps(self, steps: int) -> None:
        if not self.min_steps <= steps <= self.max_steps:
            raise ConfigError(f"this bundle allows {self.min_steps}..{self.max_steps} ODE steps, not {steps}")
        if self.time_input.kind == "table" and steps not in self.time_input.tables:
            raise ConfigError(f"this bundle has time-conditioning tables for {sorted(self.time_input.tables)} ODE "
                              f"steps, not {steps}; choose one of those or re-export with that step count")

    def check_solver(self, solver: str) -> None:
        if solver not in SOLVERS:
            raise ConfigError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
        if solver not in self.solvers:
            raise ConfigError(f"this bundle supports the solvers {list(self.solvers)}, not {solver!r}")

    def time_rows(self, steps: int) -> np.ndarray:
        """The step graph's time input for every half-grid slot: [2N + 1, *input shape], the input's dtype."""
        self.check_steps(steps)
        spec = self.time
        if self.time_input.kind == "scalar":
            grid = self.flow.half_grid(steps)
            return np.broadcast_to(grid.reshape((-1,) + (1,) * len(spec.shape)),
                                   (len(grid), *spec.shape)).astype(spec.np_dtype)
        rel = self.time_input.tables[steps]
        if self.root is None:
            raise BundleError("this contract has no bundle root to read its time tables from")
        path = self.root / rel
        try:
            table = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise BundleError(f"cannot read time table {path}: {exc}; re-export the bundle") from exc
        want = (2 * steps + 1, *spec.shape)
        if table.shape != want or table.dtype != spec.np_dtype:
            raise BundleError(f"time table {rel} is {table.dtype}{list(table.shape)}, expected {spec.dtype}"
                              f"{list(want)}; re-export the bundle")
        return table


def _invalid(problems: list[str]) -> BundleError:
    return BundleError("the bundle manifest does not describe a runnable computation: " + "; ".join(problems)
                       + ". Re-export the bundle with this edge-vla version (see docs/MANIFEST.md)")


def _mapping(m: Mapping[str, Any], key: str, problems: list[str]) -> Mapping[str, Any]:
    v = m.get(key)
    if not isinstance(v, Mapping):
        problems.append(f"{key} must be an object")
        return {}
    return v


def _flow(time: Any, problems: list[str]) -> Flow:
    """sampler.time {"start", "end"}: two different finite numbers (0 and 1 where absent)."""
    if not isinstance(time, Mapping):
        problems.append(f"sampler.time must be an object {{'start': T0, 'end': T1}}, got {time!r:.80}")
        return Flow()
    ends = [time.get("start", 0.0), time.get("end", 1.0)]
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in ends):
        problems.append(f"sampler.time start and end must be finite numbers, got {ends!r:.80}")
        return Flow()
    flow = Flow(float(ends[0]), float(ends[1]))
    if flow.start == flow.end:
        problems.append(f"sampler.time start and end are both {flow.start}: the flow has no direction")
    return flow


def _io(graph: str, entries: Any, problems: list[str]) -> tuple[IOSpec, ...]:
    out = []
    for e in entries if isinstance(entries, list) else []:
        if not isinstance(e, Mapping):
            problems.append(f"graph {graph!r}: IO entry {e!r:.80} is not an object")
            continue
        name, shape, dtype, role = (e.get(k) for k in ("name", "shape", "dtype", "role"))
        if not isinstance(name, str) or not isinstance(role, str):
            problems.append(f"graph {graph!r}: IO entry {e!r} lacks a name or role")
            continue
        if not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape):
            problems.append(f"graph {graph!r}: {name!r} has shape {shape!r}; shapes must be static positive ints")
            continue
        if dtype not in DTYPES:
            problems.append(f"graph {graph!r}: {name!r} has unsupported dtype {dtype!r}")
            continue
        extra = {k: v for k, v in e.items() if k not in ("name", "shape", "dtype", "role")}
        out.append(IOSpec(name, tuple(shape), dtype, role, extra))
    return tuple(out)


def _graph(name: str, g: Any, problems: list[str]) -> GraphContract | None:
    if not isinstance(g, Mapping):
        problems.append(f"graph {name!r} must be an object")
        return None
    role = g.get("role")
    if role not in GRAPH_ROLES:
        problems.append(f"graph {name!r} has role {role!r}; expected one of {list(GRAPH_ROLES)}")
        return None
    steps = g.get("steps")
    if role == "chunk" and not (isinstance(steps, int) and steps >= 1):
        problems.append(f"chunk graph {name!r} needs its unrolled step count 'steps'")
    return GraphContract(name, role, str(g.get("file")), _io(name, g.get("inputs"), problems),
                         _io(name, g.get("outputs"), problems), steps if role == "chunk" else None)


def _time_input(v: Any, problems: list[str]) -> TimeInput:
    if not isinstance(v, Mapping) or v.get("kind") not in TIME_KINDS or not isinstance(v.get("input"), str):
        problems.append(f"sampler.time_input must be {{'kind': 'scalar'|'table', 'input': NAME, ...}}, got {v!r}")
        return TimeInput("scalar", "t")
    tables: dict[int, str] = {}
    if v["kind"] == "table":
        raw = v.get("tables")
        if not isinstance(raw, Mapping) or not raw:
            problems.append("sampler.time_input.tables must map step counts to .npy files")
        else:
            for k, rel in raw.items():
                if not str(k).isdigit() or int(k) < 1 or not isinstance(rel, str) or not rel.endswith(".npy"):
                    problems.append(f"sampler.time_input.tables entry {k!r}: {rel!r} is not 'N': 'path.npy'")
                else:
                    tables[int(k)] = rel
    return TimeInput(v["kind"], v["input"], tables)


def _rtc_max_delay(rtc: object, step: GraphContract, problems: list[str]) -> int:
    """The manifest's `rtc` block (None: no real-time chunking) checked against the step graph's inputs."""
    masks = step.inputs_by_role("prefix_mask")
    if rtc is None:
        if masks:
            problems.append(f"the step graph has a prefix_mask input {masks[0].name!r} but the manifest has no "
                            "'rtc' block")
        return 0
    x_t = step.inputs_by_role("x_t")
    horizon = x_t[0].shape[1] if x_t and len(x_t[0].shape) == 3 else 0
    delay = rtc.get("max_delay") if isinstance(rtc, Mapping) else None
    if not isinstance(delay, int) or isinstance(delay, bool) or not 1 <= delay < max(horizon, 2):
        problems.append(f"rtc.max_delay must be an integer in 1..{max(horizon - 1, 1)} (the chunk's actions minus "
                        f"one), got {delay!r}")
        return 0
    name = rtc.get("mask_input")
    if [m.name for m in masks] != [name] or tuple(masks[0].shape) != (1, horizon):
        problems.append(f"rtc.mask_input {name!r} must be the step graph's one prefix_mask input, shape "
                        f"[1, {horizon}]; it has {[(m.name, list(m.shape)) for m in masks]}")
        return 0
    return delay
