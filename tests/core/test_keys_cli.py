import subprocess
import sys


def calltrace(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "collector", *args], capture_output=True, text=True, timeout=60
    )


def test_keys_create_list_revoke(tmp_path):
    db = str(tmp_path / "keys.db")
    created = calltrace("keys", "--db", db, "create", "--project", "acme")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("ct_") and len(key) > 30
    listing = calltrace("keys", "--db", db, "list")
    assert "acme" in listing.stdout and "active" in listing.stdout
    assert key not in listing.stdout
    key_id = listing.stdout.splitlines()[1].split()[0]
    revoked = calltrace("keys", "--db", db, "revoke", key_id)
    assert revoked.returncode == 0
    assert "revoked" in calltrace("keys", "--db", db, "list").stdout
    assert calltrace("keys", "--db", db, "revoke", key_id).returncode == 1
