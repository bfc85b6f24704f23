"""Every command block in README.md runs, as written, on the project's own bundles.

How a README block is treated (the README's "Development" section says the same for writers):

- A fenced block tagged ``bash``, ``sh`` or ``console`` is a command block. Command blocks run in README
  order, each as ``bash -euo pipefail``, in one workspace that stands for a fresh checkout after
  ``make demo`` (see `workspace`). In a ``console`` block only the lines after ``$ `` run; the rest is output.
- ``<!-- readme-test: skip (REASON) -->`` on the line before the fence: the block is not run (a Jetson, a
  robot, the network, or minutes of CPU). The reason is required; pytest prints it in its skip report.
- ``<!-- readme-test: background (ready: file PATH | port N) -->``: the block is a second terminal
  (``edge-vla run`` waiting for an operator, ``edge-vla serve``). It starts in the background; the next block
  runs once PATH exists or port N answers. At the end of its README section it gets Ctrl-C (SIGINT); it must
  not have failed on its own before that.
- Any other fence (``text``, ``python``, ...) is not run. Commands may not hide in indented code blocks.

Sizes are shrunk by the substitution table `SUBSTITUTIONS` below (training steps, episodes, durations): the
README shows what a user runs, the test runs the same command smaller. Anything else that differs from a
user's machine is set up by `workspace` and listed there.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = Path(os.environ.get("EDGE_VLA_README", ROOT / "README.md"))
VENV_BIN = Path(sys.executable).parent
COMMAND_LANGS = {"bash", "sh", "console"}
# The limit catches a block that waits for Ctrl-C, not a slow one: the "Train on the sim" block (a latency grid, a
# 2-step train, an RTC evaluation) ran past 180 s twice with a training on the other of two cores.
BLOCK_TIMEOUT_S = float(os.environ.get("EDGE_VLA_README_BLOCK_TIMEOUT", 300))
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class Substitution:
    """A regex applied to each command line whose command matches `applies_to` (a regex on the line)."""

    pattern: str
    replacement: str
    why: str
    applies_to: str = ""
    background_too: bool = True


PORT = _free_port()
# What the test changes in the README's commands, and why. Sizes only: the command, its flags and its paths
# stay as written.
SUBSTITUTIONS: tuple[Substitution, ...] = (
    Substitution(r"--train-steps \d+", "--train-steps 2", "training steps: minutes of CPU per 1000",
                 applies_to=r"edge-vla (train|distill)\b"),
    Substitution(r"--reflow-steps \d+", "--reflow-steps 2", "step-distillation steps", applies_to=r"edge-vla distill\b"),
    Substitution(r"--max-obs \d+", "--max-obs 32", "distillation dataset size", applies_to=r"edge-vla distill\b"),
    Substitution(r"--episodes \d+", "--episodes 2", "sim episodes (data and evaluation)"),
    Substitution(r"--iterations \d+", "--iterations 20", "profile: timed runs per configuration"),
    Substitution(r"--duration \d+(\.\d+)?", "--duration 3", "seconds of closed loop", background_too=False),
    Substitution(r"(-m edge_vla\.onboard\.drill(?: \S+)?)$", r"\1 --duration 2",
                 "drills: seconds of closed loop before the drills (default 15)"),
    Substitution(r"\b8000\b", str(PORT), "port 8000 may be taken on a shared machine: a free port"),
)
NETWORK_SUBSTITUTION = Substitution(
    r"^(edge-vla package \S+ .*)$", r"\1 --online",
    "only when pypi.org is unreachable: the package ships the edge-vla wheel alone instead of downloading "
    "the target's dependency wheels", applies_to=r"^edge-vla package \S+")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    section: str
    directive: str = ""  # "", "skip" or "background"
    reason: str = ""  # skip reason, or the background block's readiness condition
    problems: list[str] = field(default_factory=list)

    @property
    def runs(self) -> bool:
        return self.lang in COMMAND_LANGS and self.directive != "skip"

    def commands(self) -> str:
        if self.lang != "console":
            return self.text
        lines, cont = [], False
        for raw in self.text.splitlines():
            if raw.startswith("$ ") or cont:
                line = raw[2:] if raw.startswith("$ ") and not cont else raw
                lines.append(line)
                cont = line.rstrip().endswith("\\")
        return "\n".join(lines) + "\n"


_FENCE = re.compile(r"^(\s*)(```+)\s*([\w+-]*)\s*$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*readme-test:\s*(\w[\w-]*)\s*(?:\((.*)\))?\s*-->\s*$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_COMMAND_WORD = re.compile(r"^(edge-vla|python|pip|make|\.venv/|git|curl|export|cd)\b")


def parse(readme: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of `readme`, and the problems found outside them (unfenced commands, bad markers)."""
    lines = readme.read_text().splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    section, i, prev_blank = "(top)", 0, True
    while i < len(lines):
        line = lines[i]
        heading = _HEADING.match(line)
        if heading and heading.group(1) in ("##", "###"):
            section = heading.group(2).strip()
        fence = _FENCE.match(line)
        if fence:
            indent, ticks, lang = fence.groups()
            start = i
            body = []
            i += 1
            while i < len(lines) and not re.match(rf"^\s*{ticks}\s*$", lines[i]):
                body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
                i += 1
            block = Block(start + 1, lang.lower(), "\n".join(body) + "\n", section)
            _attach_directive(block, lines, start)
            blocks.append(block)
            i += 1
            prev_blank = False
            continue
        if prev_blank and line.startswith("    ") and _COMMAND_WORD.match(line.strip()):
            problems.append(f"README line {i + 1}: a command in an indented code block; put it in a ```bash fence "
                            f"so the README test runs it (or marks it skipped with a reason): {line.strip()[:80]}")
        if _DIRECTIVE.match(line) and not (i + 1 < len(lines) and _FENCE.match(lines[i + 1])):
            problems.append(f"README line {i + 1}: a readme-test marker must be the line right before a fence")
        prev_blank = not line.strip() or (prev_blank and line.startswith("    "))
        i += 1
    return blocks, problems


def _attach_directive(block: Block, lines: list[str], fence_index: int) -> None:
    if fence_index == 0:
        return
    m = _DIRECTIVE.match(lines[fence_index - 1])
    if not m:
        return
    kind, arg = m.group(1), (m.group(2) or "").strip()
    block.directive, block.reason = kind, arg
    if kind not in ("skip", "background"):
        block.problems.append(f"unknown readme-test marker {kind!r} (use skip (REASON) or background (ready: ...))")
    elif kind == "skip" and not arg:
        block.problems.append("a skip marker needs its reason: <!-- readme-test: skip (needs a Jetson) -->")
    elif kind == "background" and not re.fullmatch(r"ready: (file \S+|port \d+)", arg):
        block.problems.append("a background marker needs its readiness: (ready: file PATH) or (ready: port N)")
    if kind != "skip" and block.lang not in COMMAND_LANGS:
        block.problems.append(f"a {kind} marker on a {block.lang or 'untagged'} block, which never runs")


def substitute(script: str, background: bool, pypi: bool) -> str:
    """Apply `SUBSTITUTIONS` to every line of `script` (continuation lines joined first)."""
    joined = re.sub(r"\\\n\s*", "", script)
    subs = [*SUBSTITUTIONS, *([] if pypi else [NETWORK_SUBSTITUTION])]
    out = []
    for line in joined.splitlines():
        code, sep, comment = _split_comment(line)
        for sub in subs:
            if (background and not sub.background_too) or (sub.applies_to and not re.search(sub.applies_to, code)):
                continue
            code = re.sub(sub.pattern, sub.replacement, code.rstrip())
        out.append(code + sep + comment)
    return "\n".join(out) + "\n"


def _split_comment(line: str) -> tuple[str, str, str]:
    """`cmd --x 1   # why` -> ("cmd --x 1", "   #", " why"); a '#' inside quotes is not a comment."""
    quote = ""
    for j, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (j == 0 or line[j - 1].isspace()):
            k = j
            while k > 0 and line[k - 1].isspace():
                k -= 1
            return line[:k], line[k:j + 1], line[j + 1:]
    return line, "", ""


BLOCKS, PARSE_PROBLEMS = parse(README)


@dataclass
class Background:
    block: Block
    proc: subprocess.Popen
    log: Path
    interrupted: bool = False


@dataclass
class Workspace:
    root: Path
    env: dict[str, str]
    pypi: bool
    background: list[Background] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def end_sections_before(self, section: str) -> None:
        """Ctrl-C the background blocks of earlier sections (their terminal is done)."""
        for bg in [b for b in self.background if b.block.section != section]:
            self.stop(bg)

    def stop(self, bg: Background) -> None:
        if bg in self.background:
            self.background.remove(bg)
        rc = bg.proc.poll()
        if rc is not None:
            _kill_leftovers(bg.proc.pid)
            if rc != 0:
                self.failures.append(f"README line {bg.block.line} (background) exited {rc} on its own:\n"
                                     + _tail(bg.log))
            return
        bg.interrupted = True
        os.killpg(bg.proc.pid, signal.SIGINT)
        try:
            rc = bg.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            report = _group_report(bg.proc.pid)  # before the kill: what each process was doing, and its signals
            os.killpg(bg.proc.pid, signal.SIGKILL)
            bg.proc.wait()
            self.failures.append(f"README line {bg.block.line} (background) ignored Ctrl-C for {STOP_TIMEOUT_S:.0f} s:\n"
                                 + _tail(bg.log) + "\n--- the process group when it was killed ---\n" + report)
            return
        _kill_leftovers(bg.proc.pid)
        if rc not in (0, 130, -signal.SIGINT):
            self.failures.append(f"README line {bg.block.line} (background) exited {rc} after Ctrl-C:\n"
                                 + _tail(bg.log))


def as_from_a_terminal() -> None:
    """In the block's child, before exec: the signals a terminal's shell gives a command. A suite started in the
    background of a script (`make test &`, `nohup`) runs with SIGINT, SIGQUIT and SIGHUP ignored, a child inherits
    that, and Python does not install its Ctrl-C handler where SIGINT is ignored: every background block then
    "ignored Ctrl-C" although a user's terminal would have stopped it."""
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _group_report(pgid: int) -> str:
    """Each process of the group: its command, state, kernel wait channel per thread and signal masks (an
    inherited SIG_IGN for SIGINT shows in SigIgn), plus `py-spy dump` where py-spy is installed."""
    lines = []
    for proc in sorted(Path("/proc").glob("[0-9]*"), key=lambda d: int(d.name)):
        try:
            if os.getpgid(int(proc.name)) != pgid:
                continue
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
            status = [ln for ln in (proc / "status").read_text().splitlines()
                      if ln.startswith(("State", "SigBlk", "SigIgn", "SigCgt"))]
            wchans = sorted({(t / "wchan").read_text() for t in (proc / "task").iterdir()})
        except (OSError, ProcessLookupError):
            continue
        lines.append(f"pid {proc.name}: {cmd}\n  " + "; ".join(status) + f"; wchan {wchans}")
        if shutil.which("py-spy"):  # a diagnosis only: it must not keep the caller from killing the group
            try:
                dump = subprocess.run(["py-spy", "dump", "--pid", proc.name], capture_output=True, text=True,
                                      timeout=30)
                lines.append(dump.stdout[-3000:] + dump.stderr[-500:])
            except (OSError, subprocess.TimeoutExpired) as exc:
                lines.append(f"  py-spy dump failed: {exc}")
    return "\n".join(lines) or "(no process left in the group)"


def _tail(path: Path, n: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-n:]


def _make_fake_l4t_rootfs(root: Path) -> None:
    """The parts of NVIDIA's Linux_for_Tegra/rootfs that `edge-vla install --rootfs` touches."""
    (root / "etc/systemd/system/multi-user.target.wants").mkdir(parents=True)
    (root / "etc/udev/rules.d").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc/group").write_text("root:x:0:\ndialout:x:20:\nvideo:x:44:\nplugdev:x:46:\n")
    (root / "etc/shadow").write_text("root:*:19000:0:99999:7:::\n")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    """A checkout after `make demo`, as far as the README's commands can tell:

    - runs/demo/bundle_fp32 and runs/demo/bundle_int8: the shipped checkpoint exported by the demo's own code
      (`edge_vla.demo.export_bundles`), where `make demo` writes them;
    - export/assets: the checkout's shipped checkpoint (a link);
    - Linux_for_Tegra/rootfs: a minimal fake L4T rootfs (what NVIDIA's BSP unpacks);
    - PATH starts with this venv's bin, as after `source .venv/bin/activate`.
    """
    from edge_vla.demo import export_bundles
    from edge_vla.export.assets import shipped_checkpoint
    from edge_vla.export.checkpoint import load_checkpoint

    root = tmp_path_factory.mktemp("readme")
    model, _ = load_checkpoint(shipped_checkpoint())
    export_bundles(model, root / "runs" / "demo", source=str(shipped_checkpoint()))
    (root / "export").mkdir()
    (root / "export" / "assets").symlink_to(ROOT / "export" / "assets")
    _make_fake_l4t_rootfs(root / "Linux_for_Tegra" / "rootfs")
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1")
    env.pop("EDGE_VLA_CONTROL_SOCKET", None)
    ws = Workspace(root, env, pypi=_pypi_reachable())
    yield ws
    for bg in list(ws.background):
        ws.stop(bg)


def _wait_ready(ws: Workspace, bg: Background) -> None:
    kind, target = bg.block.reason.removeprefix("ready: ").split(" ", 1)
    target = re.sub(r"\b8000\b", str(PORT), target)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if bg.proc.poll() is not None:
            pytest.fail(f"README line {bg.block.line}: background block exited {bg.proc.returncode} before it was "
                        f"ready ({bg.block.reason}):\n{_tail(bg.log)}")
        if kind == "file" and (ws.root / target).exists():
            return
        if kind == "port":
            try:
                socket.create_connection(("127.0.0.1", int(target)), timeout=0.5).close()
                return
            except OSError:
                pass
        time.sleep(0.1)
    pytest.fail(f"README line {bg.block.line}: not ready ({bg.block.reason}) after {READY_TIMEOUT_S:.0f} s:\n"
                f"{_tail(bg.log)}")


def _block_id(block: Block) -> str:
    first = next((ln for ln in block.commands().splitlines() if ln.strip() and not ln.startswith("#")), "")
    words = [w for w in first.split()[:2] if re.fullmatch(r"[\w.-]+", w) and not w.startswith("-")]
    return f"L{block.line}-" + "-".join(words or ["empty"])[:40]


COMMAND_BLOCKS = [b for b in BLOCKS if b.lang in COMMAND_LANGS]


def test_readme_blocks_are_well_formed():
    problems = list(PARSE_PROBLEMS)
    for b in BLOCKS:
        problems += [f"README line {b.line}: {p}" for p in b.problems]
        if not b.lang:
            problems.append(f"README line {b.line}: untagged fence; tag it bash (runs), or text/python (does not)")
    assert not problems, "\n".join(problems)


def test_readme_has_runnable_walkthroughs():
    """A guard against marking everything skipped: most command blocks run."""
    runnable = [b for b in COMMAND_BLOCKS if b.runs]
    assert len(runnable) >= 15, f"only {len(runnable)} README command blocks run"


@pytest.mark.parametrize("block", COMMAND_BLOCKS, ids=_block_id)
def test_readme_block_runs(block: Block, workspace: Workspace):
    if block.directive == "skip":
        pytest.skip(f"README line {block.line}: {block.reason}")
    assert not block.problems, block.problems
    workspace.end_sections_before(block.section)
    script = substitute(block.commands(), block.directive == "background", workspace.pypi)
    if block.directive == "background":
        log = workspace.root / f".readme-bg-{block.line}.log"
        with log.open("w") as fh:
            proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=workspace.root,
                                    env=workspace.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=as_from_a_terminal)
        bg = Background(block, proc, log)
        workspace.background.append(bg)
        _wait_ready(workspace, bg)
        return
    proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=workspace.root, env=workspace.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=as_from_a_terminal)
    try:
        output, _ = proc.communicate(timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole block: bash and whatever it started
        output, _ = proc.communicate()
        pytest.fail(f"README line {block.line}: still running after {BLOCK_TIMEOUT_S:.0f} s (a command that waits "
                    f"for Ctrl-C belongs in a background block)\n--- ran ---\n{script}--- output (tail) ---\n"
                    f"{output[-3000:]}")
    finally:
        _kill_leftovers(proc.pid)
    assert proc.returncode == 0, (f"README line {block.line} ({block.section}) exited {proc.returncode}\n"
                                  f"--- ran ---\n{script}--- output (tail) ---\n{output[-4000:]}")


def _kill_leftovers(pgid: int) -> None:
    """A block's commands must not outlive it (a forgotten `&`): end its process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def test_readme_background_blocks_ended_cleanly(workspace: Workspace):
    """Runs after every block: each background block must have been ready, and must end on Ctrl-C."""
    for bg in list(workspace.background):
        workspace.stop(bg)
    assert not workspace.failures, "\n\n".join(workspace.failures)


USER_DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
# Other changes in flight own these pages now; drop a name here once its references are gone.
ISSUE_REFERENCES_PENDING: set[str] = set()


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: p.name)
def test_user_docs_name_no_issue_numbers(doc: Path):
    if doc.name in ISSUE_REFERENCES_PENDING:
        pytest.skip(f"{doc.name}: edited by another change; its issue references go with it")
    hits = [f"{doc.name}:{n}: {ln.strip()[:100]}" for n, ln in enumerate(doc.read_text().splitlines(), 1)
            if re.search(r"\bissues? \d+", ln, re.IGNORECASE)]
    assert not hits, "user docs describe the product, not the tracker:\n" + "\n".join(hits)


def _github_anchors(markdown: Path) -> set[str]:
    """The #fragments GitHub gives a page's headings: lowercase, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*$", markdown.read_text(), re.MULTILINE):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("doc", USER_DOCS, ids=lambda p: p.name)
def test_user_doc_links_resolve(doc: Path):
    broken = []
    for target, fragment in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", doc.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue
        path = doc.parent / target if target else doc
        if not path.exists():
            broken.append(target)
        elif fragment and path.suffix == ".md" and fragment not in _github_anchors(path):
            broken.append(f"{target}#{fragment}")
    assert not broken, f"{doc.name} links to files or headings that do not exist: {broken}"


def test_demo_suggests_commands_the_readme_runs():
    """The demo's closing suggestions are README commands, so this test runs them too."""
    from edge_vla.demo import next_commands

    readme_commands = {re.sub(r"\s+", " ", ln.split("  #")[0]).strip()
                       for b in COMMAND_BLOCKS if b.runs for ln in re.sub(r"\\\n\s*", "", b.commands()).splitlines()}
    suggested = [re.sub(r"\s+", " ", c).strip() for c in next_commands(Path("runs/demo"))]
    assert suggested, "the demo suggests no next commands"
    missing = [c for c in suggested if c not in readme_commands]
    assert not missing, f"the demo suggests commands the README does not run: {missing}"


def test_substitutions_shrink_only_sizes():
    """A control for the table: it changes the sizes it names and leaves everything else alone."""
    src = ("edge-vla train --preset tiny -o runs/tiny --train-steps 4000 --threads 1   # 39 min\n"
           "edge-vla profile b --steps 1,2,10\n")
    out = substitute(src, background=False, pypi=True)
    assert "--train-steps 2 --threads 1   # 39 min" in out and "profile b --steps 1,2,10" in out
    assert substitute("edge-vla run b --duration 60\n", background=True, pypi=True) == "edge-vla run b --duration 60\n"
    assert "--online" in substitute("edge-vla package b -o p.tar.gz --target x86-cpu\n", False, pypi=False)
    assert shutil.which("bash"), "the README test runs blocks with bash"


@pytest.mark.parametrize("preexec", [None, as_from_a_terminal], ids=["inherited", "as-from-a-terminal"])
def test_blocks_get_ctrl_c_even_from_a_suite_started_in_the_background(preexec):
    """With SIGINT ignored in this process (the suite run as `make test &`), a block's Python still gets its Ctrl-C
    handler through as_from_a_terminal; the control case without it shows the probe sees the inherited SIG_IGN."""
    probe = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        out = subprocess.run(["bash", "-c", f"{sys.executable} -c '{probe}'"], capture_output=True, text=True,
                             check=True, preexec_fn=preexec).stdout.strip()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert out == ("True" if preexec else "False")
