"""Startup over a damaged sessions folder (issue 19, items 7, 8, 16): intact states are never deleted, what
cannot be read is quarantined and logged by name, and the server starts and serves the rest."""

from __future__ import annotations

import asyncio
import errno
import json
import logging

import pytest
from safetensors import SafetensorError

from ssmkit.models.cache import ModelCache
from ssmkit.serve.recovery import QUARANTINE
from ssmkit.serve.sessions import SessionDiskFull, SessionStore

from .conftest import ServerProcess, tiny_model

# A damaged record (the session's state file itself is intact), and what the log must say about it.
DAMAGE = {
    "not json": (lambda m: "{", "not valid JSON"),
    "created is text": (lambda m: {**m, "created": "yesterday"}, "created must be an integer"),
    "created missing": (lambda m: {k: v for k, v in m.items() if k != "created"}, "missing field(s) created"),
    "wrong version": (lambda m: {**m, "version": m["version"] + 5}, "state file"),
    "version is text": (lambda m: {**m, "version": "1"}, "version must be"),
    "pending is text": (lambda m: {**m, "pending": "str"}, "pending must be"),
    "pending out of vocab": (lambda m: {**m, "pending": 10**9}, "pending must be"),
    "pending is a bool": (lambda m: {**m, "pending": True}, "pending must be"),
    "a list": (lambda m: [m], "not a JSON object"),
    "other id": (lambda m: {**m, "id": "sess_" + "1" * 32}, "does not match"),
}


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def make_sessions(model, folder, n: int) -> list[str]:
    async def run():
        store = SessionStore(folder, model, memory_budget=1 << 30)
        return [(await store.create(pending=257)).id for _ in range(n)]

    return asyncio.run(run())


def damage(folder, sid: str, how: str) -> None:
    path = folder / f"{sid}.json"
    meta = json.loads(path.read_text())
    new = DAMAGE[how][0](meta)
    path.write_text(new if isinstance(new, str) else json.dumps(new))


def test_damaged_records_are_quarantined_with_their_states_never_deleted(model, tmp_path, caplog):
    sids = make_sessions(model, tmp_path, len(DAMAGE) + 1)
    good, bad = sids[0], dict(zip(DAMAGE, sids[1:]))
    states = {sid: next(tmp_path.glob(f"{sid}.*.safetensors")).read_bytes() for sid in sids}
    for how, sid in bad.items():
        damage(tmp_path, sid, how)
    with caplog.at_level(logging.WARNING, logger="ssmkit.serve"):
        store = SessionStore(tmp_path, model, memory_budget=1 << 30)
    assert [s.id for s in store.list()] == [good]
    quarantined = tmp_path / QUARANTINE
    for how, sid in bad.items():
        # The intact state is kept, byte for byte, beside its record.
        (state,) = quarantined.glob(f"{sid}.*.safetensors")
        assert state.read_bytes() == states[sid], how
        assert (quarantined / f"{sid}.json").is_file(), how
        lines = [r.getMessage() for r in caplog.records if f"{sid}.json" in r.getMessage()]
        assert lines and DAMAGE[how][1] in lines[0], (how, lines)
    # Log lines name files relative to the sessions folder, never by absolute path.
    assert str(tmp_path) not in caplog.text
    # A second start finds the same and moves nothing more.
    again = SessionStore(tmp_path, model, memory_budget=1 << 30)
    assert [s.id for s in again.list()] == [good]


def test_a_state_without_a_record_is_quarantined_unless_an_unacknowledged_create(model, tmp_path):
    sids = make_sessions(model, tmp_path, 2)
    cache = ModelCache.load(next(tmp_path.glob(f"{sids[0]}.*.safetensors")))
    orphan, unacked = "sess_" + "a" * 32, "sess_" + "b" * 32
    cache.save(tmp_path / f"{orphan}.7.safetensors")  # its record went missing: keep it
    cache.save(tmp_path / f"{unacked}.1.safetensors")  # a create that crashed before its record: debris
    (tmp_path / "notes.txt").write_text("not ours")
    store = SessionStore(tmp_path, model, memory_budget=1 << 30)
    assert sorted(s.id for s in store.list()) == sorted(sids)
    assert (tmp_path / QUARANTINE / f"{orphan}.7.safetensors").is_file()
    assert not (tmp_path / f"{unacked}.1.safetensors").exists()
    assert (tmp_path / "notes.txt").is_file()


def test_a_full_disk_is_a_clear_error_and_leaves_the_session_as_it_was(model, tmp_path, monkeypatch):
    """Item 16: a full disk was "internal server error: SafetensorError"."""
    failures = [OSError(errno.ENOSPC, "No space left on device"),
                SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                '"No space left on device" })')]

    async def run():
        store = SessionStore(tmp_path, model, memory_budget=1 << 30)
        session = await store.create(pending=3)
        before = sorted(p.name for p in tmp_path.iterdir())
        for failure in failures:
            def save(self, path, failure=failure):
                path.write_bytes(b"partial")
                raise failure

            monkeypatch.setattr(ModelCache, "save", save)
            with pytest.raises(SessionDiskFull) as info:
                await store.commit(session, model.allocate_cache(1), pending=9)
            assert info.value.code == "disk_full" and "full" in str(info.value)
            assert str(tmp_path) not in str(info.value)
            assert sorted(p.name for p in tmp_path.iterdir()) == before
            assert session.pending == 3 and session.version == 1
        monkeypatch.undo()
        # The free-space check refuses before writing anything.
        monkeypatch.setattr("shutil.disk_usage", lambda path: type("U", (), {"free": 1000})())
        with pytest.raises(SessionDiskFull, match="disk holding the sessions is full"):
            await store.create(pending=1)
        assert sorted(p.name for p in tmp_path.iterdir()) == before

    asyncio.run(run())


def test_the_server_starts_over_damaged_records_and_serves_the_rest(model_dir, tmp_path):
    """Items 7 and 8 with a real server: a bad record used to stop startup (exit 1) or get its state deleted."""
    proc = ServerProcess(model_dir, tmp_path / "sessions", tmp_path / "server.log")
    proc.start()
    try:
        with proc.client(auth=False) as c:
            sids = [c.post("/v1/sessions", json={"prompt": f"session {i}"}).json()["id"] for i in range(3)]
    finally:
        proc.stop(kill=True)
    (folder,) = {p.parent for p in (tmp_path / "sessions").rglob(f"{sids[0]}.json")}
    damage(folder, sids[1], "created is text")
    damage(folder, sids[2], "pending is text")
    proc.start()
    try:
        with proc.client(auth=False) as c:
            assert [s["id"] for s in c.get("/v1/sessions").json()["data"]] == [sids[0]]
            r = c.post(f"/v1/sessions/{sids[0]}/complete", json={"max_tokens": 3})
            assert r.status_code == 200 and r.json()["session"]["tokens"] == len("session 0") + 1 + 3
    finally:
        proc.stop()
    log = proc.log.read_text()
    for sid in sids[1:]:
        assert f"session file {sid}.json cannot be read" in log
        assert (folder / QUARANTINE / f"{sid}.json").is_file()
        assert len(list((folder / QUARANTINE).glob(f"{sid}.*.safetensors"))) == 1
