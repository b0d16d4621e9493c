"""Stored Open Responses: the response objects, their input items (for previous_response_id) and
their event logs (for resumable streams), in SQLite in the data folder, so they survive a restart.

Live runs keep their events in memory (followers wait on a trio.Condition); a run is written to the
store when it is created, when its status changes and when it ends. On start-up, runs that a
restart interrupted are marked failed. A retention bound keeps the newest `max_items`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    status TEXT NOT NULL,
    response TEXT NOT NULL,
    input_items TEXT NOT NULL,
    events TEXT NOT NULL
)
"""
# output items by id, for input items of type item_reference
_ITEMS_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    response_id TEXT NOT NULL,
    item TEXT NOT NULL
)
"""
TERMINAL = {"completed", "incomplete", "failed", "cancelled"}


class ResponseStore:
    def __init__(self, path: Path, *, max_items: int = 10000) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_items = max_items
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        self._db.execute(_ITEMS_SCHEMA)

    def recover(self) -> int:
        """Runs left queued or in progress by a previous process: failed, never in progress forever."""
        with self._lock:
            rows = self._db.execute("SELECT id, response FROM responses WHERE status IN ('queued', 'in_progress')").fetchall()
            for rid, raw in rows:
                resp = json.loads(raw)
                resp["status"] = "failed"
                resp["error"] = {"code": "server_error", "message": "the server restarted while this response was running"}
                resp["completed_at"] = None
                self._db.execute("UPDATE responses SET status = 'failed', response = ? WHERE id = ?", (json.dumps(resp), rid))
        return len(rows)

    def put(self, response: dict[str, Any], input_items: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses (id, created_at, status, response, input_items, events) VALUES (?, ?, ?, ?, ?, ?)",
                (response["id"], response.get("created_at") or time.time(), response["status"], json.dumps(response),
                 json.dumps(input_items), json.dumps(events)),
            )
            self._db.executemany("INSERT OR REPLACE INTO items (id, response_id, item) VALUES (?, ?, ?)",
                                 [(o["id"], response["id"], json.dumps(o)) for o in response.get("output") or []
                                  if isinstance(o, dict) and o.get("id")])
            self._db.execute(
                "DELETE FROM responses WHERE id NOT IN (SELECT id FROM responses ORDER BY created_at DESC LIMIT ?)",
                (self.max_items,),
            )
            self._db.execute("DELETE FROM items WHERE response_id NOT IN (SELECT id FROM responses)")

    def get(self, rid: str) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]] | None:
        with self._lock:
            row = self._db.execute("SELECT response, input_items, events FROM responses WHERE id = ?", (rid,)).fetchone()
        if row is None:
            return None
        return json.loads(row[0]), json.loads(row[1]), json.loads(row[2])

    def item(self, item_id: str) -> dict[str, Any] | None:
        """An output item of a stored response, by its id (msg_..., fc_..., rs_...)."""
        with self._lock:
            row = self._db.execute("SELECT item FROM items WHERE id = ?", (item_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def delete(self, rid: str) -> bool:
        with self._lock:
            self._db.execute("DELETE FROM items WHERE response_id = ?", (rid,))
            return self._db.execute("DELETE FROM responses WHERE id = ?", (rid,)).rowcount > 0

    def close(self) -> None:
        with self._lock:
            self._db.close()
