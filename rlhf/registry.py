"""The checkpoint registry every stage reads from and writes to.

Layout under the registry root (default `runs/`):

    registry.db                 SQLite (WAL): one row per registered checkpoint
    <stage>/<id>/               the entry's artifacts (model, tokenizer, metrics.jsonl, ...)
    .staging/<stage>-<uuid>/    where a stage writes before registering
    .work/<stage>-<hash>/       trainer checkpoints of a run in progress (for --resume)

A row holds id, stage, parents, path (relative to the root, so a registry folder
can be moved or synced elsewhere), config, metrics, data fingerprints, a sha256
manifest of every artifact file, git commit, library versions and created_at.

Registration is atomic. Under SQLite's write lock (`BEGIN IMMEDIATE`) the staged
folder is verified against its manifest, renamed into `<stage>/<id>/`, and the row
inserted; the commit is the single point at which the entry exists. A crash
before the commit leaves at most a folder with no row, which `cleanup()` removes
(it takes the same lock, so it never races a registration in progress). Loading
an entry re-checks its manifest and refuses a modified or missing file.

References: `stage:latest`, `stage:<id>`, or a bare `<id>`; local paths and hub
ids are handled by `rlhf.models.resolve_model`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rlhf.errors import RegistryError

SCHEMA_VERSION = 1
STAGES = ("pretrain", "sft", "reward", "ppo", "dpo")
_LIBS = ("rlhf", "torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "tokenizers")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY,
    stage TEXT NOT NULL,
    parents TEXT NOT NULL,
    path TEXT NOT NULL,
    config TEXT NOT NULL,
    metrics TEXT NOT NULL,
    data_fingerprints TEXT NOT NULL,
    manifest TEXT NOT NULL,
    git_commit TEXT,
    versions TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_stage ON entries (stage, created_at);
"""


@dataclass(frozen=True)
class Entry:
    """One registered checkpoint. `path` is absolute (resolved against the registry root)."""

    id: str
    stage: str
    parents: list[str]
    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    data_fingerprints: dict[str, str]
    manifest: dict[str, str]
    git_commit: str | None
    versions: dict[str, str]
    created_at: str

    @property
    def ref(self) -> str:
        return f"{self.stage}:{self.id}"

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["path"] = str(self.path)
        return out


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 (hex) of a file's bytes, read `chunk` bytes at a time; artifact manifests and data fingerprints."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def build_manifest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, keyed by its POSIX path relative to `folder`."""
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def check_manifest(folder: Path, manifest: dict[str, str]) -> list[str]:
    """Problems (missing or modified files) of `folder` against `manifest`; [] when intact."""
    problems = []
    if not folder.is_dir():
        return [f"artifact folder {folder} is missing"]
    for rel, digest in manifest.items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(p) != digest:
            problems.append(f"{rel}: modified (sha256 differs from the manifest)")
    return problems


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in _LIBS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _git_commit() -> str | None:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def _new_id() -> str:
    now = _dt.datetime.now(_dt.timezone.utc)
    return f"{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


class Registry:
    """A registry rooted at `root` (created on first use)."""

    def __init__(self, root: str | Path, create: bool = True):
        self.root = Path(root).expanduser().resolve()
        self.db_path = self.root / "registry.db"
        if not create and not self.db_path.exists():
            raise RegistryError(f"no registry at {self.root} (no registry.db); run a stage first or pass --registry")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(f"cannot create registry folder {self.root}: {exc.strerror}") from None
        if not os.access(self.root, os.W_OK):
            raise RegistryError(f"registry folder {self.root} is not writable")
        self._init_db()

    # -------------------------------------------------------------- database

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 60000")
        return conn

    def _init_db(self) -> None:
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open {self.db_path}: {exc}") from None
        try:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("BEGIN IMMEDIATE")
                for stmt in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(stmt)
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if row is None:
                    conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                conn.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                raise RegistryError(f"{self.db_path} is not a usable registry database: {exc}") from None
            version = int(row[0]) if row else SCHEMA_VERSION
            if version > SCHEMA_VERSION:
                raise RegistryError(
                    f"{self.db_path} has schema version {version}, newer than this rlhf supports "
                    f"({SCHEMA_VERSION}); upgrade rlhf to use it (it is never migrated down)"
                )
        finally:
            conn.close()

    @contextmanager
    def _write_lock(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    def _row_to_entry(self, row: tuple) -> Entry:
        (id_, stage, parents, path, config, metrics, data, manifest, git, versions, created) = row
        return Entry(
            id=id_,
            stage=stage,
            parents=json.loads(parents),
            path=self.root / path,
            config=json.loads(config),
            metrics=json.loads(metrics),
            data_fingerprints=json.loads(data),
            manifest=json.loads(manifest),
            git_commit=git,
            versions=json.loads(versions),
            created_at=created,
        )

    # -------------------------------------------------------------- writing

    def staging_dir(self, stage: str) -> Path:
        """A fresh empty folder to write a new entry's artifacts into before `register`."""
        path = self.root / ".staging" / f"{stage}-{uuid.uuid4().hex[:12]}"
        path.mkdir(parents=True)
        (path.parent / f"{path.name}.pid").write_text(str(os.getpid()))
        return path

    def register(
        self,
        stage: str,
        staged: Path,
        *,
        parents: list[str],
        config: dict[str, Any],
        metrics: dict[str, Any],
        data_fingerprints: dict[str, str] | None = None,
    ) -> Entry:
        """Move `staged` into `<stage>/<id>/` and insert its row, atomically (see module docstring)."""
        if stage not in STAGES:
            raise RegistryError(f"unknown stage {stage!r}, expected one of {', '.join(STAGES)}")
        staged = Path(staged)
        manifest = build_manifest(staged)
        if not manifest:
            raise RegistryError(f"nothing to register: {staged} holds no files")
        for p in parents:
            self.get(p, verify=False)  # a parent must exist
        entry_id = _new_id()
        rel = f"{stage}/{entry_id}"
        final = self.root / rel
        row = (
            entry_id,
            stage,
            json.dumps(parents),
            rel,
            json.dumps(config, sort_keys=True, default=str),
            json.dumps(metrics, sort_keys=True, default=_json_number),
            json.dumps(data_fingerprints or {}, sort_keys=True),
            json.dumps(manifest, sort_keys=True),
            _git_commit(),
            json.dumps(_versions(), sort_keys=True),
            _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        with self._write_lock() as conn:
            problems = check_manifest(staged, manifest)
            if problems:
                raise RegistryError(f"staged artifacts changed while registering: {'; '.join(problems)}")
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, final)
            try:
                conn.execute("INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?)", row)
            except BaseException:
                shutil.rmtree(final, ignore_errors=True)
                raise
        (staged.parent / f"{staged.name}.pid").unlink(missing_ok=True)
        return self.get(f"{stage}:{entry_id}", verify=False)

    def cleanup(self) -> list[Path]:
        """Remove folders no row points at and staging folders of dead processes; return what was removed."""
        removed: list[Path] = []
        with self._write_lock() as conn:
            known = {r[0] for r in conn.execute("SELECT path FROM entries")}
            for stage in STAGES:
                stage_dir = self.root / stage
                if not stage_dir.is_dir():
                    continue
                for child in stage_dir.iterdir():
                    if f"{stage}/{child.name}" not in known:
                        shutil.rmtree(child, ignore_errors=True)
                        removed.append(child)
        staging = self.root / ".staging"
        if staging.is_dir():
            for pid_file in staging.glob("*.pid"):
                try:
                    pid = int(pid_file.read_text())
                except (OSError, ValueError):
                    pid = -1
                if pid != os.getpid() and not _alive(pid):
                    folder = pid_file.with_suffix("")
                    shutil.rmtree(folder, ignore_errors=True)
                    pid_file.unlink(missing_ok=True)
                    removed.append(folder)
        return removed

    # -------------------------------------------------------------- reading

    def entries(self, stage: str | None = None) -> list[Entry]:
        conn = self._connect()
        try:
            if stage is None:
                rows = conn.execute("SELECT * FROM entries ORDER BY created_at, rowid").fetchall()
            else:
                rows = conn.execute(
                    "SELECT * FROM entries WHERE stage = ? ORDER BY created_at, rowid", (stage,)
                ).fetchall()
        finally:
            conn.close()
        return [self._row_to_entry(r) for r in rows]

    def get(self, ref: str, stage: str | tuple[str, ...] | None = None, verify: bool = True) -> Entry:
        """Resolve `stage:latest`, `stage:<id>` or `<id>`; check the stage and (by default) the manifest."""
        want, _, key = ref.rpartition(":") if ":" in ref else ("", "", ref)
        conn = self._connect()
        try:
            if key == "latest":
                row = conn.execute(
                    "SELECT * FROM entries WHERE stage = ? ORDER BY created_at DESC, rowid DESC LIMIT 1", (want,)
                ).fetchone()
            else:
                row = conn.execute("SELECT * FROM entries WHERE id = ?", (key,)).fetchone()
        finally:
            conn.close()
        if row is None:
            if key == "latest":
                raise RegistryError(f"{ref}: no '{want}' entry in the registry at {self.root}; run that stage first")
            raise RegistryError(f"{ref}: no entry with id '{key}' in the registry at {self.root}")
        entry = self._row_to_entry(row)
        if want and want != entry.stage:
            raise RegistryError(f"{ref}: entry {entry.id} is a '{entry.stage}' entry, not '{want}'")
        allowed = (stage,) if isinstance(stage, str) else stage
        if allowed and entry.stage not in allowed:
            raise RegistryError(
                f"{ref}: is a '{entry.stage}' entry, but this needs a {' or '.join(repr(s) for s in allowed)} entry"
            )
        if verify:
            problems = check_manifest(entry.path, entry.manifest)
            if problems:
                raise RegistryError(
                    f"{entry.ref}: artifacts fail verification, refusing to load: {'; '.join(problems)}"
                )
        return entry

    def verify(self) -> dict[str, list[str]]:
        """Every entry's manifest problems, keyed by entry ref; entries that pass are left out."""
        return {e.ref: probs for e in self.entries() if (probs := check_manifest(e.path, e.manifest))}

    def lineage(self, ref: str) -> list[Entry]:
        """The entry followed by its ancestors, depth first, each once."""
        seen: dict[str, Entry] = {}
        stack = [ref]
        while stack:
            e = self.get(stack.pop(0), verify=False)
            if e.id in seen:
                continue
            seen[e.id] = e
            stack.extend(e.parents)
        return list(seen.values())

    def find(self, stage: str, config_key: str) -> Entry | None:
        """The latest entry of `stage` whose config fingerprint is `config_key` (for reuse by the pipeline)."""
        for e in reversed(self.entries(stage)):
            if e.config.get("_fingerprint") == config_key:
                return e
        return None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _json_number(x: Any) -> Any:
    """Metrics may hold numpy or torch scalars."""
    if hasattr(x, "item"):
        return x.item()
    return str(x)
