"""Hostile inputs to bundle signing: what a robot must refuse to trust, in one line naming the file.

test_signing.py covers the ordinary refusals (unsigned, unknown key, tampered manifest); here are the
key and signature files an attacker or a slip of the hand puts where edge-vla reads them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_user import SERVICE_UID, as_service_user, needs_service_user, open_dir, service_python

from edge_vla.errors import BundleError, ConfigError
from edge_vla.provision import signing

# What the runtime does at start (Policy.load with the default keys), run as its own process: a hang or
# a memory blow-up there must show up as a test failure, not as a stuck or killed pytest.
LOAD_KEYS_AND_VERIFY = ("import sys\nfrom pathlib import Path\nfrom edge_vla.provision import signing\n"
                        "keys = signing.trusted_keys_from_dir(sys.argv[1])\n"
                        "print('verified by', signing.verify_bundle_signature(Path(sys.argv[2]), keys))")
ADDRESS_SPACE_LIMIT = 1 << 30  # bytes: far above what verifying needs, far below what /dev/zero would take


@pytest.fixture
def robot_dir() -> Iterator[Path]:
    """A directory the service user can reach (tmp_path's parents are 0700)."""
    d = open_dir("edge-vla-signing-hostile-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _signed_bundle(bundle_factory, where: Path, priv: Path) -> Path:
    b = bundle_factory(where / "bundle")
    signing.sign_bundle(b, priv)
    return b


def _keys_dir(where: Path, pub: Path) -> Path:
    keys = where / "trusted-keys"
    keys.mkdir(mode=0o755)
    keys.chmod(0o755)  # explicit: mkdir's mode is cut by the umask
    shutil.copy(pub, keys / "robot.pub")
    (keys / "robot.pub").chmod(0o644)
    return keys


def _verify_as_service_user(keys: Path, bundle: Path):
    sp = service_python()
    return as_service_user([sp.python, "-P", "-c", LOAD_KEYS_AND_VERIFY, str(keys), str(bundle)], timeout=20,
                           env=sp.environ(None, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1"),
                           outside=["prlimit", f"--as={ADDRESS_SPACE_LIMIT}", "--"])


def _last_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else ""


# --- 1. a private key given where a public (trusted) key is expected --------------------------------

def test_a_private_key_is_never_accepted_as_a_trusted_key(bundle: Path, keypair):
    """`--trusted-key robot-signing` (the private half) must be refused, not quietly reduced to its public
    half: the install copies every trusted-key file to the robot, so accepting it puts the fleet's signing
    key on every robot, readable there by whoever can read the ssh user's home."""
    priv, pub = keypair
    kid = signing.sign_bundle(bundle, priv)
    with pytest.raises(ConfigError, match="private key") as err:
        signing.load_public_key(priv)
    assert str(priv) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="private key"):
        signing.verify_bundle_signature(bundle, [priv])  # the check install_host runs before copying keys
    # As text (e.g. pasted into a config), the key is refused and not echoed into the error (and logs).
    secret_body = priv.read_text().splitlines()[1]
    with pytest.raises(ConfigError, match="private key") as err:
        signing.load_public_key(priv.read_text())
    assert secret_body not in str(err.value)
    # Control: its public half verifies the same bundle.
    assert signing.verify_bundle_signature(bundle, [pub]) == kid


def test_an_openssh_private_key_is_refused_as_a_private_key(tmp_path: Path, keypair):
    from cryptography.hazmat.primitives import serialization

    ossh = tmp_path / "id_ed25519"
    ossh.write_bytes(signing.load_private_key(keypair[0]).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    with pytest.raises(ConfigError, match=f"{ossh} is a private key"):
        signing.load_public_key(ossh)


# --- 2. trusted keys that someone other than root can write -----------------------------------------

@needs_service_user
def test_trusted_keys_another_user_can_write_are_refused(bundle_factory, robot_dir: Path, keypair):
    """A key in /etc/edge-vla/trusted-keys that a non-root user can write (or that such a user could have
    put there) is not a trust anchor: that user could add their own key and have their bundle run (and,
    for `edge-vla install` without --trusted-key, installed as root). Refused, like ssh's StrictModes."""
    priv, pub = keypair
    bundle = _signed_bundle(bundle_factory, robot_dir, priv)
    keys = _keys_dir(robot_dir, pub)
    key = keys / "robot.pub"

    ok = _verify_as_service_user(keys, bundle)  # control: root-owned, 0755/0644 keys are trusted
    assert ok.returncode == 0 and "verified by" in ok.stdout, ok.stderr[-2000:]

    key.chmod(0o666)  # world-writable key file
    proc = _verify_as_service_user(keys, bundle)
    assert proc.returncode != 0, proc.stdout
    assert str(key) in _last_line(proc) and "writable" in _last_line(proc), proc.stderr[-2000:]
    key.chmod(0o644)

    keys.chmod(0o777)  # world-writable directory: anyone can drop a new *.pub in
    proc = _verify_as_service_user(keys, bundle)
    assert proc.returncode != 0, proc.stdout
    assert str(keys) in _last_line(proc) and "writable" in _last_line(proc), proc.stderr[-2000:]
    keys.chmod(0o755)

    os.chown(key, 1000, 1000)  # owned by another unprivileged user (the robot's login user, say)
    proc = _verify_as_service_user(keys, bundle)
    assert proc.returncode != 0, proc.stdout
    assert str(key) in _last_line(proc) and "owned by uid 1000" in _last_line(proc), proc.stderr[-2000:]
    os.chown(key, 0, 0)

    ok = _verify_as_service_user(keys, bundle)  # control again: restored, trusted
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_trusted_keys_dir_owned_by_this_user_is_accepted(tmp_path: Path, keypair):
    """A developer's own keys directory (owned by them, not group/world-writable) still works."""
    keys = _keys_dir(tmp_path, keypair[1])
    assert signing.trusted_keys_from_dir(keys) == [keys / "robot.pub"]
    assert os.stat(keys).st_uid == os.geteuid() != SERVICE_UID


def test_keygen_public_key_mode_does_not_depend_on_the_umask(tmp_path: Path):
    """The .pub from keygen is what gets copied into trusted-keys: 0644 whatever the umask (a 0664 copy
    would be group-writable, and refused there)."""
    old = os.umask(0o002)
    try:
        _priv, pub, _ = signing.generate_keypair(tmp_path / "k")
    finally:
        os.umask(old)
    assert pub.stat().st_mode & 0o777 == 0o644


# --- 3. key and signature files that are not small regular files ------------------------------------

@needs_service_user
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "huge"])
def test_a_key_file_that_is_not_a_small_regular_file_is_refused_quickly(bundle_factory, robot_dir: Path,
                                                                        keypair, kind: str):
    """A FIFO in trusted-keys blocked the runtime's start forever; a link to /dev/zero (or a huge file)
    read until memory ran out. Each is refused at once, naming the file; the real key beside it still works."""
    priv, pub = keypair
    bundle = _signed_bundle(bundle_factory, robot_dir, priv)
    keys = _keys_dir(robot_dir, pub)
    bad = keys / "a-bad.pub"  # sorts first: read before the good key
    if kind == "fifo":
        os.mkfifo(bad, 0o644)
    elif kind == "dev-zero":
        bad.symlink_to("/dev/zero")
    else:
        with open(bad, "wb") as f:
            f.truncate(4 << 30)  # sparse: 4 GiB to read, no disk used
        bad.chmod(0o644)
    proc = _verify_as_service_user(keys, bundle)
    assert proc.returncode != 0, proc.stdout
    last = _last_line(proc)
    assert str(bad) in last and ("not a regular file" in last or "too large" in last), proc.stderr[-2000:]
    bad.unlink()
    ok = _verify_as_service_user(keys, bundle)  # control: without it, the same directory verifies
    assert ok.returncode == 0 and "verified by" in ok.stdout, ok.stderr[-2000:]


def test_a_deeply_nested_or_huge_signature_file_is_a_clear_refusal(bundle: Path, keypair):
    priv, pub = keypair
    signing.sign_bundle(bundle, priv)
    sig = bundle / "manifest.sig"
    good = sig.read_bytes()
    sig.write_text("[" * 200_000)  # json's recursion: RecursionError, not a BundleError
    with pytest.raises(BundleError, match="manifest.sig"):
        signing.verify_bundle_signature(bundle, [pub])
    with open(sig, "wb") as f:
        f.truncate(64 << 20)  # sparse; small enough that the old, unbounded read could not hurt the test machine
    with pytest.raises(BundleError, match="too large"):
        signing.verify_bundle_signature(bundle, [pub])
    sig.write_bytes(good)  # control
    assert signing.verify_bundle_signature(bundle, [pub])


def test_keygen_never_writes_through_a_link_planted_at_its_path(tmp_path: Path) -> None:
    """A dangling symlink at PATH read as "nothing there" (Path.exists follows it), and the private key was then
    written wherever the link pointed. Now refused; nothing is written there or at the link's target. Control: a
    fresh path gets the key, 0600, and the public half, 0644."""
    from edge_vla.provision.signing import generate_keypair

    target = tmp_path / "elsewhere" / "stolen"
    target.parent.mkdir()
    planted = tmp_path / "robot-signing"
    planted.symlink_to(target)
    with pytest.raises(ConfigError, match="exists"):
        generate_keypair(planted)
    assert not target.exists() and planted.is_symlink()
    priv, pub, _ = generate_keypair(tmp_path / "fresh")
    assert (priv.stat().st_mode & 0o777, pub.stat().st_mode & 0o777) == (0o600, 0o644)
