"""Identity files are checked before connecting, each problem with the exact fix; host keys
are pinned in megafleet's own known_hosts."""

import os
import shutil
import subprocess
import threading

import paramiko
import pytest

from megafleet.ssh.errors import IdentityProblem
from megafleet.ssh.keys import load_identity, public_blob
from megafleet.ssh.known_hosts import KnownHosts, host_id

needs_keygen = pytest.mark.skipif(not shutil.which("ssh-keygen"), reason="needs ssh-keygen")


def keygen(path, kind="ed25519", passphrase="", fmt=None):
    args = ["ssh-keygen", "-q", "-t", kind, "-N", passphrase, "-f", str(path)]
    if fmt:
        args += ["-m", fmt]
    subprocess.run(args, check=True, capture_output=True)
    return path


@needs_keygen
def test_good_keys_load_with_their_fingerprint(tmp_path):
    ed = load_identity(str(keygen(tmp_path / "ed")), "h")
    rsa = load_identity(str(keygen(tmp_path / "rsa", "rsa", fmt="PEM")), "h")
    assert ed.source == "file" and ed.pkey.get_name() == "ssh-ed25519"
    assert rsa.pkey.get_name() == "ssh-rsa" and rsa.fingerprint.startswith("SHA256:")
    assert load_identity(None, "h").source == "default"


def test_missing_key_is_named(tmp_path):
    with pytest.raises(IdentityProblem) as e:
        load_identity(str(tmp_path / "nope"), "gpu1")
    assert e.value.problem == "missing" and str(tmp_path / "nope") in e.value.message
    assert e.value.message.startswith("gpu1: ") and e.value.exit_code == 3


@needs_keygen
def test_key_readable_by_others_prints_the_chmod(tmp_path, monkeypatch):
    key = keygen(tmp_path / "id")
    key.chmod(0o644)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(IdentityProblem) as e:
        load_identity("id", "gpu1")  # a relative path: the fix must name the absolute one
    assert e.value.problem == "permissions" and "0644" in e.value.message
    assert e.value.hint == f"chmod 600 {key}"


@needs_keygen
def test_public_key_given_instead_of_private(tmp_path):
    keygen(tmp_path / "id")
    with pytest.raises(IdentityProblem) as e:
        load_identity(str(tmp_path / "id.pub"), "h")
    assert e.value.problem == "public_key" and e.value.hint.endswith(str(tmp_path / "id"))


@needs_keygen
def test_passphrase_key_without_agent_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    key = keygen(tmp_path / "id", passphrase="correct horse")
    with pytest.raises(IdentityProblem) as e:
        load_identity(str(key), "h")
    assert e.value.problem == "passphrase" and "never prompts" in e.value.message
    assert f"ssh-add {key}" in e.value.hint


@needs_keygen
@pytest.mark.skipif(not shutil.which("ssh-agent"), reason="needs ssh-agent")
def test_passphrase_key_held_by_the_agent_is_used_through_it(tmp_path, monkeypatch):
    key = keygen(tmp_path / "id", passphrase="correct horse")
    with ssh_agent(tmp_path, monkeypatch) as add:
        with pytest.raises(IdentityProblem, match="agent does not hold it"):
            load_identity(str(key), "h")
        add(key, "correct horse")
        ident = load_identity(str(key), "h")
    assert ident.source == "agent" and isinstance(ident.pkey, paramiko.AgentKey)
    assert (
        ident.fingerprint
        == subprocess.run(
            ["ssh-keygen", "-lf", str(key) + ".pub"], capture_output=True, text=True
        ).stdout.split()[1]
    )


class ssh_agent:
    """A real ssh-agent for one test; `add(key, passphrase)` loads a key without a terminal."""

    def __init__(self, tmp_path, monkeypatch):
        self.tmp, self.mp = tmp_path, monkeypatch

    def __enter__(self):
        sock = self.tmp / "agent.sock"
        self.proc = subprocess.Popen(
            ["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL
        )
        for _ in range(100):
            if sock.exists():
                break
            threading.Event().wait(0.02)
        self.mp.setenv("SSH_AUTH_SOCK", str(sock))
        return self.add

    def add(self, key, passphrase):
        askpass = self.tmp / "askpass.sh"
        askpass.write_text(f"#!/bin/sh\necho '{passphrase}'\n")
        askpass.chmod(0o700)
        env = dict(os.environ, SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")
        subprocess.run(
            ["ssh-add", str(key)],
            env=env,
            check=True,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=10,
        )

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(5)


@needs_keygen
def test_unsupported_key_type_is_named(tmp_path):
    try:
        key = keygen(tmp_path / "dsa", "dsa")
    except subprocess.CalledProcessError:
        pytest.skip("this ssh-keygen cannot make DSA keys")
    with pytest.raises(IdentityProblem) as e:
        load_identity(str(key), "h")
    assert e.value.problem == "unsupported_type" and "DSA key" in e.value.message
    assert "ssh-keygen -t ed25519" in e.value.hint


def test_a_file_that_is_not_a_key(tmp_path):
    junk = tmp_path / "junk"
    junk.write_text("hello\n")
    junk.chmod(0o600)
    with pytest.raises(IdentityProblem, match="not a private key megafleet can read"):
        load_identity(str(junk), "h")


@needs_keygen
def test_public_blob_from_an_encrypted_openssh_key_without_pub_file(tmp_path):
    key = keygen(tmp_path / "id", passphrase="secret phrase")
    blob = public_blob(key)
    (tmp_path / "id.pub").unlink()
    assert public_blob(key) == blob and blob.startswith(b"\x00\x00\x00\x0bssh-ed25519")


def test_known_hosts_pin_lookup_replace_forget(tmp_path):
    store = KnownHosts(tmp_path / "kh")
    a, b = paramiko.ECDSAKey.generate(), paramiko.ECDSAKey.generate()
    hid = host_id("10.0.0.5", 2222)
    assert hid == "[10.0.0.5]:2222" and host_id("h", 22) == "h"
    store.pin(hid, a)
    assert store.lookup(hid) == {a.get_name(): a}
    assert (tmp_path / "kh").stat().st_mode & 0o777 == 0o600
    store.pin(hid, b, replace=True)
    assert store.lookup(hid) == {b.get_name(): b}
    assert store.lookup("other") == {}
    assert store.forget(hid) and store.lookup(hid) == {} and not store.forget(hid)


def test_parallel_pins_all_survive(tmp_path):
    store = KnownHosts(tmp_path / "kh")
    keys = {f"10.0.0.{i}": paramiko.ECDSAKey.generate() for i in range(8)}
    threads = [threading.Thread(target=store.pin, args=(h, k)) for h, k in keys.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(KnownHosts(tmp_path / "kh").lookup(h) == {k.get_name(): k} for h, k in keys.items())
