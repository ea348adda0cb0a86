"""The prediction log: what `ptpipe serve --log PATH` answered, for monitoring (issue 24), and the feedback that
labels it.

    ptpipe serve --log predictions.sqlite [--log-sample 0.1] [--log-retention 7d] [--log-max-rows N] [--log-raw N]
    read_window("predictions.sqlite", "cifar10-cnn", 500)       # the last 500 logged images, oldest first
    ptpipe feedback-export --log predictions.sqlite --model cifar10-cnn --out labelled/   # an image-folder data set

One row per image (a classify request of 4 images is 4 rows) or per text prompt: the model's name and version,
the time, the response id that feedback refers to, the output (class probabilities; none for text), the input's
statistics (drift.IMAGE_STATS of the model's input image, or drift.TEXT_STATS of a prompt), the original width and
height of an uploaded image. Never the raw input, unless `raw_per_hour` > 0: then the first that many inputs of
each model in each clock hour are kept (the model's input image as PNG, or the prompt) for labelling.

Storage: one SQLite file in WAL mode. The request path only appends a tuple to a deque (O(1)); one writer thread
turns the queue into rows (statistics, softmax, PNG), inserts them in one transaction and commits every
`commit_s` (0.5 s), so a killed server loses at most the last ~0.5 s. Readers (read_window, the monitor flow,
`sqlite3` itself) read committed rows while the server writes. Retention (age and row count) runs with each
commit. synchronous=NORMAL: a commit survives the process being killed; an OS crash or power cut may also lose
the commits since the last checkpoint. Several replicas: a file each, or the same two tables on PostgreSQL (not
built here; docs/monitoring.md says what it takes)."""
from __future__ import annotations

import collections
import io
import itertools
import logging
import random
import re
import sqlite3
import struct
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import orjson

from ptpipe import drift, files, inference
from ptpipe.limits import LogOptions
from ptpipe.stage import StageError

log = logging.getLogger("ptpipe.predlog")
MAX_PENDING = 20_000  # records queued, not yet written (~60 MB of 32 x 32 images); past this (a stalled disk) new
# ones are dropped and counted

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    seq INTEGER PRIMARY KEY,        -- insertion order: what row retention counts
    id TEXT NOT NULL,               -- the response id feedback refers to
    model TEXT NOT NULL, version TEXT NOT NULL,
    time REAL NOT NULL,             -- unix seconds, when the server answered
    outputs BLOB NOT NULL,          -- float32 class probabilities (empty for text models)
    stats BLOB NOT NULL,            -- float32, one per name in stat_names
    stat_names TEXT NOT NULL,       -- comma-separated: drift.IMAGE_STATS or drift.TEXT_STATS
    width INTEGER, height INTEGER,  -- an uploaded image's original size (NULL for tensors and text)
    raw BLOB                        -- opt-in (--log-raw): the model's input as PNG, or the prompt (UTF-8)
);
CREATE INDEX IF NOT EXISTS predictions_model_time ON predictions (model, time);
CREATE INDEX IF NOT EXISTS predictions_model_id ON predictions (model, id);
CREATE INDEX IF NOT EXISTS predictions_time ON predictions (time);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY, model TEXT NOT NULL, id TEXT NOT NULL,
    label TEXT NOT NULL,            -- the true class name, or the true next text
    time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_model_id ON feedback (model, id);
CREATE INDEX IF NOT EXISTS feedback_time ON feedback (time);
"""


class Window(NamedTuple):        # the last `size` logged requests of one model, oldest first
    model: str
    ids: list[str]               # the response ids (the feedback endpoint's key)
    times: np.ndarray            # float64 unix seconds
    versions: list[str]          # the model version that answered each
    outputs: np.ndarray          # float32 N x C class probabilities (classifiers); N x 0 for text models
    stats: np.ndarray            # float32 N x F, columns named by stat_names
    stat_names: tuple[str, ...]  # drift.IMAGE_STATS (images) or drift.TEXT_STATS (text)
    labels: list[str | None]     # the feedback's true label (class name / true next text) or None


def connect(path: str | Path, create: bool = False) -> sqlite3.Connection:
    """A connection to the log (WAL, 5 s busy timeout); a missing file is an error unless `create`."""
    if not create and not Path(path).is_file():
        raise StageError(f"no prediction log at {path} (written by `ptpipe serve --log {path}`)")
    try:
        conn = sqlite3.connect(path, timeout=5.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        if create:
            conn.executescript(SCHEMA)
        return conn
    except sqlite3.Error as err:
        raise StageError(f"--log {path}: not a usable SQLite prediction log ({err})") from None


# -- reading ------------------------------------------------------------------------------------

_WINDOW_SQL = """
SELECT p.id, p.time, p.version, p.outputs, p.stats, p.stat_names,
       (SELECT f.label FROM feedback f WHERE f.model = p.model AND f.id = p.id ORDER BY f.seq DESC LIMIT 1)
FROM predictions p WHERE p.model = ? AND p.time <= ? ORDER BY p.time DESC, p.seq DESC LIMIT ?
"""


def read_window(path, model: str, size: int, until: float | None = None) -> Window:
    """The last `size` rows of `model` logged at or before `until` (default: now), oldest first, with the
    latest feedback label of each. Rows of another task than the newest row's (a name reused) are left out."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise StageError(f"window size must be an integer >= 1, got {size!r}")
    conn = connect(path)
    try:
        rows = conn.execute(_WINDOW_SQL, (model, time.time() if until is None else until, size)).fetchall()
    except sqlite3.Error as err:  # another SQLite file, or not one
        raise StageError(f"{path} is not a prediction log ({err})") from None
    finally:
        conn.close()
    rows = rows[::-1]
    names = tuple(rows[-1][5].split(",")) if rows else ()
    width = len(rows[-1][3]) if rows else 0
    rows = [r for r in rows if tuple(r[5].split(",")) == names and len(r[3]) == width]
    n = len(rows)
    return Window(model, [r[0] for r in rows], np.array([r[1] for r in rows], dtype=np.float64),
                  [r[2] for r in rows],
                  np.frombuffer(b"".join(r[3] for r in rows), np.float32).reshape(n, width // 4),
                  np.frombuffer(b"".join(r[4] for r in rows), np.float32).reshape(n, len(names)),
                  names, [r[6] for r in rows])


def has_prediction(path, model: str, id: str) -> bool:
    conn = connect(path)
    try:
        return conn.execute("SELECT 1 FROM predictions WHERE model = ? AND id = ? LIMIT 1", (model, id)).fetchone() \
            is not None
    finally:
        conn.close()


# -- writing --------------------------------------------------------------------------------------

class PredictionLog:
    """The server's writer. `images`, `text`, `ids` and `feedback` are called on the request path and only queue;
    the thread `predlog` writes. `sampled()` draws whether one request is logged."""

    def __init__(self, options: LogOptions):
        self.options = options
        connect(options.path, create=True).close()  # a bad path stops the server's start, named
        self._queue: collections.deque = collections.deque()  # (seq, kind, record), in seq order
        self._seq, self._queued = itertools.count(1), 0
        self._put_lock = threading.Lock()  # numbers and appends in one order: streamed text records from threads
        self._committed = 0  # the seq of the last record committed
        self._raw_hour: dict[str, list[int]] = {}  # model -> [clock hour, raw inputs kept in it]
        self.dropped, self._dropped_said, self._warned = 0, 0, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="predlog", daemon=True)
        self._thread.start()

    def sampled(self) -> bool:
        return self.options.sample >= 1.0 or random.random() < self.options.sample

    def _put(self, kind: str, record: tuple) -> None:
        with self._put_lock:
            if len(self._queue) >= MAX_PENDING:
                self.dropped += 1
                return
            self._queued = next(self._seq)
            self._queue.append((self._queued, kind, record))

    def _raw_quota(self, model: str, n: int) -> int:
        """How many of the next `n` inputs of `model` keep their raw input: the first raw_per_hour of each hour."""
        if not self.options.raw_per_hour:
            return 0
        hour = int(time.time() // 3600)
        slot = self._raw_hour.setdefault(model, [hour, 0])
        if slot[0] != hour:
            slot[:] = [hour, 0]
        take = max(0, min(n, self.options.raw_per_hour - slot[1]))
        slot[1] += take
        return take

    def images(self, model: str, version: str, ids: list[str], images: np.ndarray, logits: np.ndarray,
               uploads: list[bytes] | None = None) -> None:
        """Queue one row per image: uint8 N x 3 x S x S, the model's logits N x C, the uploaded files (their
        header gives the original size). Arrays are not copied: the caller does not change them afterwards."""
        self._put("images", (model, version, time.time(), ids, images, logits, uploads,
                             self._raw_quota(model, len(ids))))

    def text(self, model: str, version: str, id: str, prompt: str, runtime) -> None:
        """Queue one row for a prompt; the writer runs `runtime` (inference.TextGenerator) on it for its bits/char."""
        self._put("text", (model, version, time.time(), id, prompt, runtime, self._raw_quota(model, 1)))

    def ids(self, model: str, version: str, ids: list[str], tokens: np.ndarray, logits: np.ndarray | None) -> None:
        """Queue one row per sequence of token ids (a text model's /v2 infer): N x T ids, N x T x V logits."""
        self._put("ids", (model, version, time.time(), ids, tokens, logits))

    def feedback(self, model: str, id: str, label: str) -> None:
        self._put("feedback", (model, id, label, time.time()))

    def mark(self) -> int:
        """A mark for everything queued so far: `written(mark)` says when it is all committed."""
        return self._queued

    def written(self, mark: int) -> bool:
        return self._committed >= mark

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        self._stop.set()
        self._thread.join(30)

    # -- the writer thread --

    def _run(self) -> None:
        conn = connect(self.options.path)
        try:
            while True:
                stopping = self._stop.wait(self.options.commit_s)
                self._write(conn)
                if stopping and not self._queue:
                    return
        finally:
            conn.close()

    def _write(self, conn: sqlite3.Connection) -> None:
        batch = [self._queue.popleft() for _ in range(len(self._queue))]
        records: dict[str, list] = {"images": [], "text": [], "ids": [], "feedback": []}
        for _, kind, record in batch:
            records[kind].append(record)
        inserts, feedback = [], records.pop("feedback")  # (parameters of _IMAGE_GROUP_SQL | None, rows for _ROW_SQL)
        inserts_of = {"images": _image_rows, "text": lambda group: [(None, _text_rows(group, self._warned))],
                      "ids": lambda group: [(None, _ids_rows(group))]}
        for kind, group in records.items():
            try:
                inserts.extend(inserts_of[kind](group))
            except Exception:  # a bad record (a model that fails on a prompt) costs its commit's rows of that kind
                log.exception("prediction log: %d %s records could not be made into rows", len(group), kind)
        try:
            with conn:  # one transaction: the rows, the feedback and the retention's deletes commit together
                for params, rows in inserts:
                    if params:
                        conn.execute(_IMAGE_GROUP_SQL, params)
                    else:
                        conn.executemany(_ROW_SQL, rows)
                conn.executemany("INSERT INTO feedback (model, id, label, time) VALUES (?, ?, ?, ?)", feedback)
                self._retain(conn)
        except sqlite3.Error:
            log.exception("prediction log: %d records could not be written to %s", len(batch), self.options.path)
        if batch:
            self._committed = batch[-1][0]
        if self.dropped > self._dropped_said:
            log.warning("prediction log: %d records dropped so far (over %d queued: the disk is too slow)",
                        self.dropped, MAX_PENDING)
            self._dropped_said = self.dropped

    def _retain(self, conn: sqlite3.Connection) -> None:
        cutoff = time.time() - self.options.retention_s
        conn.execute("DELETE FROM predictions WHERE time < ?", (cutoff,))
        conn.execute("DELETE FROM feedback WHERE time < ?", (cutoff,))
        conn.execute("DELETE FROM predictions WHERE seq <= (SELECT max(seq) FROM predictions) - ?",
                     (self.options.max_rows,))


# -- records -> rows (in the writer thread) --------------------------------------------------------

# One statement inserts a group's rows: their ids, times and sizes as one JSON array, their probabilities and
# statistics as two blobs cut by row inside SQLite. executemany binds every row from Python and lets go of
# the GIL around every row's insert (1,400 round trips a commit at 3,000 requests/s, each one a wait for
# the event loop, which holds the GIL, at most the switch interval): here, one.
_IMAGE_GROUP_SQL = """
INSERT INTO predictions (id, model, version, time, outputs, stats, stat_names, width, height)
SELECT json_extract(value, '$[1]'), ?2, ?3, json_extract(value, '$[2]'),
       substr(?4, json_extract(value, '$[0]') * ?5 + 1, ?5), substr(?6, json_extract(value, '$[0]') * ?7 + 1, ?7),
       ?8, json_extract(value, '$[3]'), json_extract(value, '$[4]')
FROM json_each(?1)
"""


_ROW_SQL = ("INSERT INTO predictions (id, model, version, time, outputs, stats, stat_names, width, height, raw) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def _image_rows(records: list[tuple]) -> list[tuple[tuple | None, list[tuple]]]:
    """One commit's image records, per group of like records (model, version, image shape, classes: one group
    per model in practice): (the parameters of _IMAGE_GROUP_SQL, []), or (None, rows for _ROW_SQL) for a
    group that keeps raw inputs (rare by design). Statistics and softmax run once per group."""
    groups: dict[tuple, list] = {}
    for r in records:
        groups.setdefault((r[0], r[1], r[4].shape[1:], r[5].shape[1:]), []).append(r)
    names, out = ",".join(drift.IMAGE_STATS), []
    for (model, version, _, _), group in groups.items():
        images, logits = np.concatenate([r[4] for r in group]), np.concatenate([r[5] for r in group])
        probs = inference.softmax(logits.astype(np.float64)).astype(np.float32)
        stats, i, entries, rows, raw_kept = drift.image_stats(images), 0, [], [], any(r[7] for r in group)
        for _, _, t, ids, _, _, uploads, raw in group:
            for k, id in enumerate(ids):
                width, height = _size(uploads[k]) if uploads else (None, None)
                if raw_kept:
                    rows.append((id, model, version, t, probs[i].tobytes(), stats[i].tobytes(), names, width, height,
                                 _png(images[i]) if k < raw else None))
                else:
                    entries.append((i, id, t, width, height))
                i += 1
        out.append(((orjson.dumps(entries).decode(), model, version, probs.tobytes(), probs.shape[1] * 4,
                     stats.tobytes(), stats.shape[1] * 4, names) if entries else None, rows))
    return out


def _text_rows(records: list[tuple], warned: set[str]) -> list[tuple]:
    """`warned`: the models whose bits/char failed already (said once, not per request)."""
    rows = []
    for model, version, t, id, prompt, runtime, raw in records:  # drift.prompt_stats: what the reference holds
        try:
            chars, bits = drift.prompt_stats(runtime.run, runtime.meta, inference.encode(prompt, runtime.vocab))
        except Exception as exc:  # a model drift cannot feed: the row keeps its id and length, bits/char NaN
            if model not in warned:
                warned.add(model)
                log.warning("prediction log: %s's bits/char on a prompt failed, logged as NaN (%s)", model, exc)
            chars, bits = len(prompt), float("nan")
        stats = np.array([chars, bits], dtype=np.float32)
        rows.append((id, model, version, t, b"", stats.tobytes(), ",".join(drift.TEXT_STATS), None, None,
                     prompt.encode("utf-8") if raw else None))
    return rows


def _ids_rows(records: list[tuple]) -> list[tuple]:
    rows = []
    for model, version, t, ids, tokens, logits in records:
        for i, id in enumerate(ids):
            bits = drift.prompt_bits_per_char(logits[i], tokens[i]) if logits is not None else float("nan")
            stats = np.array([tokens.shape[1], bits], dtype=np.float32)
            rows.append((id, model, version, t, b"", stats.tobytes(), ",".join(drift.TEXT_STATS), None, None, None))
    return rows



def _size(upload: bytes) -> tuple[int | None, int | None]:
    """An uploaded image's width and height from its header: a PNG's IHDR directly (1 us), others by Pillow
    (which reads no pixels for this, ~30 us)."""
    if upload[:8] == b"\x89PNG\r\n\x1a\n" and upload[12:16] == b"IHDR" and len(upload) >= 24:
        return struct.unpack(">II", upload[16:24])
    from PIL import Image

    try:
        with Image.open(io.BytesIO(upload)) as img:
            return img.size
    except Exception:  # decoded once already by the request; a header Pillow cannot size is no error here
        return None, None


def _png(image_chw: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image_chw.transpose(1, 2, 0))).save(buf, "PNG")
    return buf.getvalue()


# -- export: the labelled raw inputs as an image-folder data set ----------------------------------

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def export_labelled(path, model: str, out) -> dict[str, int]:
    """Write `model`'s logged raw images that have feedback as `out/<label>/<id>.png` (docs/own-data.md's
    image-folder format), atomically: a temporary folder renamed onto `out`. Returns {label: images}."""
    conn = connect(path)
    try:
        rows = conn.execute(
            "SELECT p.id, p.raw, (SELECT f.label FROM feedback f WHERE f.model = p.model AND f.id = p.id "
            "ORDER BY f.seq DESC LIMIT 1) AS label FROM predictions p WHERE p.model = ? AND p.raw IS NOT NULL "
            "AND p.stat_names = ? AND label IS NOT NULL ORDER BY p.seq", (model, ",".join(drift.IMAGE_STATS))
        ).fetchall()
    finally:
        conn.close()
    if not rows:
        raise StageError(f"--model {model}: no logged raw image of {model} in {path} has feedback (serve with "
                         f"--log-raw N, then POST /v1/models/{model}/feedback); nothing written")
    bad = sorted({label for _, _, label in rows if not label or label.startswith(".") or set(label) & set("/\\\0")})
    if bad:
        raise StageError(f"--model {model}: labels {bad[:5]} cannot be folder names; nothing written")
    counts: dict[str, int] = {}
    with files.atomic_path(out) as tmp:
        for id, raw, label in rows:
            folder = tmp / label
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{_SAFE.sub('_', id)[:100]}-{counts.get(label, 0)}.png").write_bytes(raw)
            counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items()))


def export_main(path, model: str, out) -> None:
    """`ptpipe feedback-export`: the export, then one line per class."""
    counts = export_labelled(path, model, out)
    print(f"{sum(counts.values())} labelled images of {model} -> {out}: "
          + ", ".join(f"{label} {n}" for label, n in counts.items()))
