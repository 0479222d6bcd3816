"""The default config's promise: a span answered 200 survives a crash of calltrace.

The sqlite exporter's sending queue is on disk (``sending_queue.storage: ./data/queue``
in ``collector.yaml``). Here the database is held locked so nothing can be delivered,
requests are answered 200 from the disk queue, the collector is SIGKILLed, and after a
restart every acknowledged span is in the database.
"""

from __future__ import annotations

import shutil
import sqlite3
import time

import requests

from collector.calls import call_id_for
from collector.keys import KeyStore
from tests.collector_process import CollectorProcess
from tests.support import ROOT, fixture_requests, free_port, query


def test_sigkill_loses_nothing_acknowledged_with_the_default_config(tmp_path):
    shutil.copy(ROOT / "collector.yaml", tmp_path / "collector.yaml")
    (tmp_path / "data").mkdir()
    db = tmp_path / "data" / "calltrace.db"
    key, _ = KeyStore(db).create("acme")
    port = free_port()
    collector = CollectorProcess(
        tmp_path / "collector.yaml",
        tmp_path,
        port,
        env={"CALLTRACE_HTTP_ENDPOINT": f"127.0.0.1:{port}"},
    )
    collector.start()
    # Another writer holds the database: the exporter can deliver nothing for now.
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        headers = {"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {key}"}
        for path in fixture_requests("livekit"):
            response = requests.post(
                f"{collector.base}/v1/traces", data=path.read_bytes(), headers=headers, timeout=30
            )
            assert response.status_code == 200, response.text
        collector.kill()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert query(db, "SELECT count(*) FROM spans")[0][0] == 0  # nothing was delivered

    collector.start()
    try:
        deadline = time.monotonic() + 30
        while query(db, "SELECT count(*) FROM spans")[0][0] < 53:
            assert time.monotonic() < deadline, collector.log()
            time.sleep(0.1)
    finally:
        assert collector.stop() == 0
    assert (
        query(
            db, "SELECT count(*) FROM spans WHERE call_id = ?", call_id_for("acme", "RM_test123")
        )[0][0]
        == 53
    )
