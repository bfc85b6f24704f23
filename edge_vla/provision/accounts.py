"""The service user and its groups, written straight into a rootfs's /etc files.

A rootfs staged before flashing has no running system to call useradd in (and an aarch64 rootfs
cannot run its own binaries on an x86 host), so we edit etc/passwd, etc/group, etc/shadow and
etc/gshadow as text: append what is absent, never touch what is there. IDs are picked like
`useradd --system`: the highest free id below 1000.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_vla.provision.errors import InstallError

SYSTEM_ID_MAX = 999
SYSTEM_ID_MIN = 100


@dataclass(frozen=True)
class Account:
    uid: int
    gid: int


def _read(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else []


def _ids(lines: list[str], field: int = 2) -> set[int]:
    out = set()
    for line in lines:
        parts = line.split(":")
        if len(parts) > field and parts[field].isdigit():
            out.add(int(parts[field]))
    return out


def _entry(lines: list[str], name: str) -> list[str] | None:
    for line in lines:
        parts = line.split(":")
        if parts[0] == name:
            return parts
    return None


def _free_id(*taken: set[int]) -> int:
    used = set().union(*taken)
    for candidate in range(SYSTEM_ID_MAX, SYSTEM_ID_MIN - 1, -1):
        if candidate not in used:
            return candidate
    raise InstallError(f"no free system id in {SYSTEM_ID_MIN}..{SYSTEM_ID_MAX}; free one in etc/passwd or etc/group")


def _text(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode() if lines else b""


def plan_accounts(root: Path, user: str, groups: Sequence[str]) -> tuple[dict[Path, bytes], Account | None]:
    """New contents for the /etc files that must change (empty when the user and groups are in place),
    and the user's uid/gid as they will be (None when it cannot be known: no etc/passwd)."""
    etc = root / "etc"
    if not (etc / "passwd").is_file() or not (etc / "group").is_file():
        raise InstallError(
            f"{etc} has no passwd/group: {root} is not a root filesystem. For an L4T image pass "
            "Linux_for_Tegra/rootfs after running apply_binaries.sh"
        )
    passwd, group = _read(etc / "passwd"), _read(etc / "group")
    shadow, gshadow = _read(etc / "shadow"), _read(etc / "gshadow")
    has_shadow, has_gshadow = (etc / "shadow").is_file(), (etc / "gshadow").is_file()
    new_passwd, new_group = list(passwd), list(group)
    new_shadow, new_gshadow = list(shadow), list(gshadow)

    # Supplementary groups first (dialout/plugdev/video exist on Ubuntu, but not on every rootfs).
    for name in [*groups, user]:
        if _entry(new_group, name) is None:
            gid = _free_id(_ids(new_group), _ids(new_passwd, 3))
            if name == user and (u := _entry(new_passwd, user)) is not None:
                gid = int(u[3])  # the user exists with a primary group id but the group line is missing
            new_group.append(f"{name}:x:{gid}:")
            if has_gshadow:
                new_gshadow.append(f"{name}:!::")

    own_gid = int(_entry(new_group, user)[2])  # type: ignore[index]
    existing = _entry(new_passwd, user)
    if existing is None:
        uid = own_gid if own_gid not in _ids(new_passwd) else _free_id(_ids(new_passwd), _ids(new_group))
        new_passwd.append(f"{user}:x:{uid}:{own_gid}:edge-vla robot policy:/var/lib/edge-vla:/usr/sbin/nologin")
        if has_shadow and _entry(new_shadow, user) is None:
            new_shadow.append(f"{user}:!:::::::")  # locked: the service never logs in
        account = Account(uid, own_gid)
    else:
        account = Account(int(existing[2]), int(existing[3]))

    # Membership of the supplementary groups.
    for i, line in enumerate(new_group):
        parts = line.split(":")
        if len(parts) == 4 and parts[0] in groups:
            members = [m for m in parts[3].split(",") if m]
            if user not in members:
                parts[3] = ",".join([*members, user])
                new_group[i] = ":".join(parts)

    changes: dict[Path, bytes] = {}
    for path, old, new, present in ((etc / "passwd", passwd, new_passwd, True), (etc / "group", group, new_group, True),
                                    (etc / "shadow", shadow, new_shadow, has_shadow),
                                    (etc / "gshadow", gshadow, new_gshadow, has_gshadow)):
        if present and new != old:
            changes[path] = _text(new)
    return changes, account
