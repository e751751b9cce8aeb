"""Run-directory files, always written to a temporary name and renamed: never half-written."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Optional

from oel_ray.errors import InputError
from oel_ray.types import KnowledgeRecord, KnowledgeSnapshot, Trajectory


@contextlib.contextmanager
def atomic_open(path: Path, newline: Optional[str] = None, binary: bool = False) -> Iterator[IO]:
    """A file that appears at `path` whole, or not at all: written under a temporary name beside
    it, synced, then renamed over it. Readable like any new file (mkstemp's are 0600). Text unless
    `binary`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": newline})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(tmp: Path, path: Path) -> None:
    """Make the finished directory `tmp` be `path`, replacing an older `path`, by renames only: a
    reader sees the old directory or the new one, never a mix."""
    old = path.with_name(f".{path.name}.old.{os.getpid()}")
    try:
        try:
            path.rename(old)
        except FileNotFoundError:
            pass  # nothing there yet (or another process moved it away first)
        tmp.rename(path)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


class JsonlWriter:
    """Streams rows to `<name>.partial` as they come; `close()` renames it into place."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.partial = path.with_name(path.name + ".partial")
        self.file = open(self.partial, "w")

    def write(self, rows: Iterable[dict]) -> None:
        for row in rows:
            self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self, ordered: Optional[Iterable[dict]] = None) -> None:
        """Put the file in place: the streamed rows as they came, or `ordered`, the same rows in
        their final order (rows stream in the order games end, which varies from run to run)."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if ordered is None:
            os.replace(self.partial, self.path)
            return
        with atomic_open(self.path) as f:
            f.writelines(json.dumps(row) + "\n" for row in ordered)
        self.partial.unlink()


def read_trajectories(path: Path) -> list[Trajectory]:
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(Trajectory.from_json(json.loads(line)))
            except (ValueError, TypeError, KeyError) as err:
                raise InputError(f"{path}:{number}: not a trajectory row ({err}); delete the file and rerun "
                                 "to play these games again") from None
    return rows


def knowledge_record(path: Path) -> tuple[Optional[KnowledgeRecord], Optional[str]]:
    """knowledge.json as written, or why it is not a knowledge file."""
    try:
        return KnowledgeRecord.from_json(json.loads(Path(path).read_text())), None
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"not a knowledge file ({type(err).__name__}: {err})"


def knowledge_texts(path: Path) -> tuple[list[str], Optional[str]]:
    """knowledge.json's set (the texts the teacher reads) and, where it cannot be used, why not. The
    empty-knowledge control (teacher.context=none) reads one empty text."""
    record, problem = knowledge_record(path)
    problem = problem or record.set_problem()
    return ([], problem) if problem else (record.set, None)


def read_knowledge_set(path: Path) -> list[str]:
    """The round's knowledge texts, refused in one line when unreadable or empty."""
    texts, problem = knowledge_texts(path)
    if problem:
        raise InputError(f"{path}: {problem}; delete it and rerun to extract again")
    return texts


def read_knowledge_chains(path: Path, steps: int) -> list[list[KnowledgeSnapshot]]:
    """Every chain's knowledge (knowledge.json's "chains"), each with at least `steps` + 1 snapshots."""
    record, problem = knowledge_record(path)
    if problem:
        raise InputError(f"{path}: {problem}; delete it and rerun to extract again")
    chains = record.chains
    if not chains or any(len(chain) <= steps for chain in chains):
        raise InputError(f"{path}: its chains do not reach accumulation step {steps}; delete it and rerun "
                         "to extract again")
    return chains


def read_selection(path: Path) -> tuple[int, int]:
    """(chain, step) that knowledge_eval.json's "selected" names (extractor.select=best)."""
    try:
        selected = json.loads(Path(path).read_text())["selected"]
        return int(selected["chain"]), int(selected["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path}: no selected knowledge ({type(err).__name__}: {err}); delete it and rerun to "
                         "evaluate the chains again") from None


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with atomic_open(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
