"""Ed25519 bundle signatures: manifest.sig over the exact bytes of manifest.json.

The manifest lists the sha256 of every bundle file, so a valid signature plus `Bundle.verify()`
(the hash check) covers the whole bundle: change any graph and its hash no longer matches; change
the manifest to match and the signature no longer verifies.

manifest.sig is JSON: {"format": "edge-vla-signature", "version": 1, "algorithm": "ed25519",
"key_id": <first 16 hex of sha256(raw public key)>, "signature": <base64>}.

Keys: a private key is a PKCS#8 PEM file or a raw 32-byte seed file; a public (trusted) key is a
SubjectPublicKeyInfo PEM file, a raw 32-byte file, or text: 64 hex digits or base64 of the raw key,
optionally prefixed "ed25519:". `python -m edge_vla.provision.signing keygen PATH` makes a pair.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import os
import stat
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_vla.atomic import atomic_write
from edge_vla.bundle import MANIFEST, SIGNATURE
from edge_vla.errors import BundleError, ConfigError
from edge_vla.files import file_kind, read_bounded
from edge_vla.optional import require

SIG_FORMAT = "edge-vla-signature"
SIG_VERSION = 1
# A key or signature file is well under 1 KiB. Anything far larger (or a FIFO, or /dev/zero behind a
# symlink) is not one, and reading it whole would block the runtime's start forever or fill its memory.
MAX_KEY_OR_SIGNATURE_BYTES = 64 * 1024


def _crypto() -> Any:
    require("cryptography")
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _raw_public(pub: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def read_small_file(path: Path, what: str, error: type[Exception] = ConfigError) -> bytes:
    """The bytes of the key or signature file `path`, refusing (with `error`) anything but a regular file of at
    most MAX_KEY_OR_SIGNATURE_BYTES (a symlink is followed: what is read is its target)."""
    return read_bounded(path, MAX_KEY_OR_SIGNATURE_BYTES, what, error,
                        fix="replace it with the key or signature file itself")


def load_private_key(path: str | os.PathLike[str]) -> Any:
    """An Ed25519 private key from a PKCS#8 PEM file or a raw 32-byte seed file."""
    ed25519 = _crypto()
    from cryptography.hazmat.primitives import serialization

    path = Path(path)
    data = read_small_file(path, "signing key")
    if len(data) == 32:
        return ed25519.Ed25519PrivateKey.from_private_bytes(data)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{path} is neither an unencrypted PEM private key nor a raw 32-byte Ed25519 seed ({exc}); "
            "make one with `edge-vla package --keygen PATH`"
        ) from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 key; bundles are signed with Ed25519")
    return key


def _is_private_pem(text: bytes) -> bool:
    """True for any PEM private key block: PKCS#8, encrypted PKCS#8, OpenSSH, PKCS#1/SEC1."""
    first_line = text.split(b"\n", 1)[0]
    return first_line.startswith(b"-----BEGIN") and b"PRIVATE KEY-----" in first_line


def load_public_key(spec: str | os.PathLike[str]) -> bytes:
    """A trusted key (file or text, see the module doc) -> the raw 32-byte public key.

    A private key is refused, never reduced to its public half: whatever is given as a trusted key is
    copied to robots (`edge-vla install --host`), so accepting one would spread the signing key."""
    ed25519 = _crypto()
    from cryptography.hazmat.primitives import serialization

    data: bytes
    path = Path(spec)
    # A path that exists is read as a file even when it is not a regular one (and is then refused).
    is_file = isinstance(spec, os.PathLike) or (len(str(spec)) < 4096 and os.path.lexists(path))
    if is_file:
        name = str(path)
        data = read_small_file(path, "trusted key")
        if len(data) == 32:
            return data
    else:
        name = "given as text"  # never echoed whole: it may be a pasted private key
        data = str(spec).encode()
    text = data.strip()
    if _is_private_pem(text):
        raise ConfigError(f"trusted key {name} is a private key, not a public one: give its public half "
                          "(PATH.pub from keygen); a trusted key is copied to robots, a private key must never be")
    if text.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text)
        except ValueError as exc:
            raise ConfigError(f"trusted key {name}: unreadable PEM public key ({exc})") from exc
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise ConfigError(f"trusted key {name} is a {type(key).__name__}, not an Ed25519 public key")
        return _raw_public(key)
    text = text.removeprefix(b"ed25519:")
    try:
        raw = bytes.fromhex(text.decode()) if len(text) == 64 else base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise ConfigError(f"trusted key {spec!s:.80} is not a PEM, hex or base64 Ed25519 public key") from exc
    if len(raw) != 32:
        raise ConfigError(f"trusted key {spec!s:.80} decodes to {len(raw)} bytes; an Ed25519 public key has 32")
    return raw


def signature_bytes(manifest_bytes: bytes, private_key: Any) -> bytes:
    """The manifest.sig content for `manifest_bytes` (deterministic: Ed25519 has no nonce)."""
    sig = private_key.sign(manifest_bytes)
    doc = {
        "format": SIG_FORMAT,
        "version": SIG_VERSION,
        "algorithm": "ed25519",
        "key_id": key_id(_raw_public(private_key.public_key())),
        "signature": base64.b64encode(sig).decode(),
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def sign_bundle(root: str | os.PathLike[str], key: str | os.PathLike[str] | Any) -> str:
    """Write root/manifest.sig atomically; returns the key id."""
    root = Path(root)
    private = load_private_key(key) if isinstance(key, (str, os.PathLike)) else key
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise BundleError(f"{root} has no {MANIFEST}: not a bundle, nothing to sign")
    data = signature_bytes(manifest.read_bytes(), private)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{SIGNATURE}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # the robot's service user reads it; mkstemp makes 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / SIGNATURE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return json.loads(data)["key_id"]


def read_signature(root: Path, name: str = SIGNATURE) -> dict[str, Any] | None:
    """The parsed signature file root/name, or None when there is none."""
    path = root / name
    if not os.path.lexists(path):
        return None
    data = read_small_file(path, "signature", BundleError)
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}): corrupt signature; re-sign it") from exc
    except RecursionError:  # nested deeper than json's recursion limit: no signature is
        raise BundleError(f"{path} is not a signature (JSON nested too deeply); re-sign it") from None
    if not isinstance(doc, dict) or doc.get("format") != SIG_FORMAT or doc.get("algorithm") != "ed25519":
        raise BundleError(f"{path} is not an edge-vla Ed25519 signature; re-sign it")
    if doc.get("version") != SIG_VERSION:
        raise BundleError(f"{path} has signature version {doc.get('version')!r}; this edge-vla reads {SIG_VERSION}")
    if not isinstance(doc.get("key_id"), str) or not isinstance(doc.get("signature"), str):
        raise BundleError(f"{path} lacks key_id or signature; re-sign it")
    return doc


def _check_trust_anchor(path: Path, st: os.stat_result) -> None:
    """Refuse a trusted key (or its directory) that a user other than root or us could change: that user
    could add their own key and have their bundle run. The rule of ssh's StrictModes."""
    if st.st_uid not in (0, os.geteuid()):
        raise BundleError(f"trusted key path {path} is owned by uid {st.st_uid}, not root: refusing to trust keys "
                          f"another user can replace; sudo chown root:root {path}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise BundleError(f"trusted key path {path} is writable by group or others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}): anyone there could add a key; sudo chmod go-w {path}")


def trusted_keys_from_dir(directory: str | os.PathLike[str] = "/etc/edge-vla/trusted-keys") -> list[Path]:
    """The *.pub files `edge-vla install --trusted-key` puts on a robot (empty when there are none).

    Fails closed: a directory that exists but cannot be listed (the service user lacks permission)
    raises instead of reading as "no keys", which would let the runtime accept unsigned bundles; so do
    a directory or key that is not root's (or ours) alone to write, and a *.pub that is not a regular file."""
    d = Path(directory)
    try:
        names = os.listdir(d)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise BundleError(f"cannot read trusted keys directory {d} ({exc.strerror}): refusing to run without "
                          "knowing which keys to trust; make it readable by the service user "
                          f"(sudo chmod 0755 {d} and 0644 its *.pub)") from exc
    _check_trust_anchor(d, os.stat(d))
    keys = sorted(d / n for n in names if n.endswith(".pub"))
    for key in keys:
        try:
            st = os.stat(key)  # follows a symlink: what is read is its target
        except OSError as exc:
            raise BundleError(f"cannot read trusted key {key} ({exc.strerror}); remove it or fix it") from exc
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"trusted key {key} is not a regular file ({file_kind(st.st_mode)}); remove it")
        _check_trust_anchor(key, st)
    return keys


def verify_signed_file(root: Path, signed: str, sig_name: str, trusted_keys: Sequence[str | Path],
                       what: str, fix: str, data: bytes | None = None) -> str:
    """Check root/sig_name, an Ed25519 signature over the exact bytes of root/signed, against the
    trusted keys; return the key id that verified. `what` names the thing in messages, `fix` says
    how to sign it. Raises BundleError saying why: no trusted keys, unsigned, malformed, unknown
    key, or a signature that does not match (the file was changed after signing).

    `data`: the bytes of root/signed that the caller read and uses. Give them whenever the caller
    parsed the file: the signature is then checked over exactly what is used, where reading the file
    again here could return other bytes (a file swapped between the two reads would pass unsigned)."""
    root = Path(root)
    if not trusted_keys:
        raise BundleError("no trusted keys configured: pass the signer's public key (e.g. robot-signing.pub)")
    ed25519 = _crypto()
    from cryptography.exceptions import InvalidSignature

    doc = read_signature(root, sig_name)
    if doc is None:
        raise BundleError(f"{what} {root} is unsigned (no {sig_name}) but trusted keys are configured; {fix}")
    trusted: dict[str, bytes] = {}
    for spec in trusted_keys:
        raw = load_public_key(spec)
        trusted[key_id(raw)] = raw
    kid = doc["key_id"]
    if kid not in trusted:
        raise BundleError(
            f"{what} {root} is signed by unknown key {kid}; trusted key ids: {', '.join(sorted(trusted))}. "
            "Add the signer's public key to the trusted keys, or re-sign with a trusted key."
        )
    try:
        sig = base64.b64decode(doc["signature"], validate=True)
    except (ValueError, binascii.Error) as exc:
        raise BundleError(f"{root / sig_name}: signature is not base64 ({exc}); {fix}") from exc
    if data is None:
        target = root / signed
        if not target.is_file():
            raise BundleError(f"{what} {root} has a signature but no {signed}; copy it again")
        data = target.read_bytes()
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(trusted[kid]).verify(sig, data)
    except InvalidSignature:
        raise BundleError(
            f"{what} {root}: bad signature: {signed} does not match the signature by key {kid} "
            f"({signed} was changed after signing, or the signature is corrupt). Do not deploy it; {fix}"
        ) from None
    return kid


def verify_bundle_signature(root: Path, trusted_keys: Sequence[str | Path], manifest_bytes: bytes | None = None) -> str:
    """Check root/manifest.sig against the trusted keys; return the key id that verified.

    Checks the signature only: combine with `Bundle.verify()` for the file hashes, and pass the opened
    Bundle's `manifest_bytes` (what it parsed and hashed the files against), so that both checks cover
    the same manifest."""
    return verify_signed_file(root, MANIFEST, SIGNATURE, trusted_keys, "bundle",
                              "re-export and sign it with `edge-vla package BUNDLE --sign KEY`", manifest_bytes)


def generate_keypair(path: str | os.PathLike[str], overwrite: bool = False) -> tuple[Path, Path, str]:
    """Write PATH (PKCS#8 PEM private key, mode 0600) and PATH.pub (PEM public key); returns the key id."""
    ed25519 = _crypto()
    from cryptography.hazmat.primitives import serialization

    priv_path = Path(path)
    pub_path = priv_path.with_name(priv_path.name + ".pub")
    # lexists: a symlink planted at PATH (even a dangling one) is "something there", never written through
    if not overwrite and (os.path.lexists(priv_path) or os.path.lexists(pub_path)):
        raise ConfigError(f"{priv_path} or {pub_path} exists; refusing to overwrite a signing key")
    key = ed25519.Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    # atomic_write: a new file (mkstemp, 0600) renamed over PATH, so a link there is replaced, not followed, and
    # an overwritten key never keeps the old file's (maybe wider) mode.
    with atomic_write(priv_path) as f:
        f.write(priv)
    with atomic_write(pub_path) as f:
        os.fchmod(f.fileno(), 0o644)  # not the umask's: a group-writable copy in trusted-keys would be refused
        f.write(pub)
    return priv_path, pub_path, key_id(_raw_public(key.public_key()))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m edge_vla.provision.signing keygen|sign|verify ...` (small helper for scripts)."""
    parser = argparse.ArgumentParser(prog="python -m edge_vla.provision.signing")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("keygen", help="write PATH and PATH.pub")
    p.add_argument("path")
    p = sub.add_parser("sign", help="write BUNDLE/manifest.sig")
    p.add_argument("bundle")
    p.add_argument("key")
    p = sub.add_parser("verify", help="check BUNDLE/manifest.sig and every file hash")
    p.add_argument("bundle")
    p.add_argument("trusted", nargs="+")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "keygen":
            priv, pub, kid = generate_keypair(args.path)
            print(f"wrote {priv} (keep secret) and {pub} (trust this on robots); key id {kid}")
        elif args.cmd == "sign":
            print(f"signed {args.bundle} with key {sign_bundle(args.bundle, args.key)}")
        else:
            from edge_vla.bundle import Bundle

            bundle = Bundle.open(args.bundle)  # hashes every file against the manifest it read once...
            kid = verify_bundle_signature(bundle.root, args.trusted, bundle.manifest_bytes)  # ...signed over those bytes
            print(f"{args.bundle}: signature by {kid} and every file hash verified")
    except (BundleError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
