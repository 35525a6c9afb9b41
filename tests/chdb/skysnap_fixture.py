"""Rows and expected query results shared by the ClickHouse tests in tests/chdb.

test_schema.py loads them into chDB (the current engine, in-process) and
test_recipes_clickhouse_server.py into a real server (Debian's 18.16 in scripts/test.sh),
so every recipe of schemas/examples.sql is held to the same exact results on both.

The rows are shaped like the ones skysnap writes: two tasks (so a missing task filter
shows), three segments of the task under test, one crossing a minute boundary, and
re-sent snapshots and a repeated task log, inserted in their own parts so that they are
really stored twice until a merge.
"""

import hashlib
import re
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DDL = ROOT / "schemas" / "clickhouse.sql"
EXAMPLES = ROOT / "schemas" / "examples.sql"
TABLES = ("profile_task", "profile_task_log", "profile_snapshot", "profiled_segment")
FILE_DATABASE = "skysnap"  # the database schemas/clickhouse.sql and examples.sql name

TASK = str(uuid.UUID("3f1c2a4e-8b7d-4c1e-9a0f-5d6e7f809a1b"))
OTHER_TASK = str(uuid.UUID("0b9e8d7c-6a5f-4e3d-8c2b-1a0f9e8d7c6b"))
SEG_A = "a1b2c3d4e5f6.101.17322000000000001"
SEG_B = "a1b2c3d4e5f6.102.17322000000000002"
SEG_C = "a1b2c3d4e5f6.103.17322000000000003"
OTHER_SEG = "other.1.1"

# Wall-clock based so that the 3-day TTLs never consider the rows expired.
START = (int(time.time()) // 60 - 10) * 60_000  # a whole minute, 10 minutes ago
DURATION = 5  # minutes
END = START + DURATION * 60_000
DUMP_PERIOD = 20  # ms, TASK's
OTHER_DUMP_PERIOD = 50  # ms, OTHER_TASK's: a lookup without the task filter shows


def bucket_minute(ms):
    return int(datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y%m%d%H%M"))


def bucket_second(ms):
    return int(datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y%m%d%H%M%S"))


def minute_text(ms):
    """The minute of an epoch-ms time as ClickHouse prints a DateTime('UTC')."""
    return datetime.fromtimestamp(ms // 60_000 * 60, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


# Root-first Java stacks, as the agent reports them.
BASE = [
    "java.lang.Thread.run:750",
    "org.apache.tomcat.util.threads.TaskThread$WrappingRunnable.run:61",
    "java.util.concurrent.ThreadPoolExecutor$Worker.run:624",
    "java.util.concurrent.ThreadPoolExecutor.runWorker:1149",
    "org.apache.tomcat.util.net.SocketProcessorBase.run:49",
    "org.apache.coyote.AbstractProtocol$ConnectionHandler.process:868",
    "org.apache.catalina.connector.CoyoteAdapter.service:343",
    "org.springframework.web.servlet.FrameworkServlet.service:883",
    "org.springframework.web.servlet.DispatcherServlet.doDispatch:1040",
    "org.springframework.web.method.support.InvocableHandlerMethod.invokeForRequest:150",
]
LIST = BASE + ["com.shop.OrderController.list:42"]
DAO = LIST + ["com.shop.OrderDao.query:17", "com.mysql.cj.jdbc.ClientPreparedStatement.executeQuery:1003"]
SOCKET = DAO + ["com.mysql.cj.protocol.ReadAheadInputStream.fill:107", "java.net.SocketInputStream.read:171"]
# A recursive frame: it is in this snapshot twice but must count once per snapshot.
TREE = LIST + ["com.shop.CategoryTree.walk:30", "com.shop.CategoryTree.walk:30", "com.shop.CategoryTree.leaf:55"]
RENDER = LIST + [
    "com.fasterxml.jackson.databind.ObjectMapper.writeValueAsString:3964",
    "com.fasterxml.jackson.databind.ObjectMapper._writeValueAndClose:4719",
    "com.fasterxml.jackson.databind.ser.DefaultSerializerProvider.serializeValue:319",
    "com.fasterxml.jackson.databind.ser.BeanSerializer.serialize:178",
    "com.fasterxml.jackson.core.json.WriterBasedJsonGenerator.writeString:442",
]

# (segment, first dump time, [stack per sequence]); the dumps are DUMP_PERIOD apart.
# SEG_A and SEG_B run in the first minute; SEG_C crosses from the second into the third
# (119_950 .. 120_050 ms after START) and is the longest.
SEGMENTS = [
    (SEG_A, START + 30_000, [DAO, SOCKET, SOCKET, TREE, RENDER]),
    (SEG_B, START + 30_000, [SOCKET, DAO, SOCKET]),
    (SEG_C, START + 119_950, [SOCKET, SOCKET, RENDER, TREE, SOCKET, DAO]),
]


def snapshot_rows(task, segments):
    rows = []
    for segment, first_dump, stacks in segments:
        for seq, stack in enumerate(stacks):
            dump = first_dump + seq * DUMP_PERIOD
            rows.append((task, segment, seq, dump, bucket_second(dump), list(stack)))
    return rows


SNAPSHOTS = snapshot_rows(TASK, SEGMENTS)  # 5 + 3 + 6 = 14 keys
# Another task's snapshots, which no query about TASK may count: in the first and second
# minute, with a leaf of its own.
OTHER_SNAPSHOTS = snapshot_rows(OTHER_TASK, [(OTHER_SEG, START + 59_990, [SOCKET, ["other.Thread.run:1"]])])
# Re-sent by the agent: identical rows with the key of SEG_A sequence 2 and SEG_C sequence 4.
RESENT = [SNAPSHOTS[2], SNAPSHOTS[8 + 4]]
assert RESENT[0][1:3] == (SEG_A, 2) and RESENT[1][1:3] == (SEG_C, 4)

TASK_ROWS = [
    (TASK, "shop", "/orders", START, DURATION, 200, DUMP_PERIOD, 5, START - 5_000, END, bucket_minute(START)),
    (OTHER_TASK, "billing", "/invoices", START, DURATION, 100, OTHER_DUMP_PERIOD, 5, START - 9_000, END,
     bucket_minute(START)),
]
LOGS = [
    (TASK, "shop-1", 1, "NOTIFIED", "shop", START + 1_000, bucket_second(END)),
    (TASK, "shop-1", 2, "EXECUTION_FINISHED", "shop", END + 2_000, bucket_second(END)),
]
RESENT_LOG = LOGS[0]


def profiled_segment_row(segment, trace_id, start, spans):
    """A kept segment as skysnap writes it: one row, the spans as parallel arrays.
    spans: (span_id, parent_span_id, operation_name, peer, type, layer, component, start, end, error)."""
    end = max(span[8] for span in spans)
    columns = list(zip(*spans))
    return (segment, trace_id, "shop", "shop-1", "/orders", start, end, end - start,
            int(any(span[9] for span in spans)), bucket_second(start)) + tuple(list(c) for c in columns)


# SEG_A kept with its three spans, SEG_B with its entry span only; SEG_A sent again by the
# agent with another trace id, in a part of its own: the later row is the one FINAL reads.
SEG_A_SPANS = [
    (2, 1, "Mysql/JDBC/PreparedStatement/executeQuery", "mysql:3306", "Exit", "Database", 5012,
     START + 30_020, START + 30_070, 0),
    (1, 0, "com.shop.OrderController.list", "", "Local", "Unknown", 0, START + 30_010, START + 30_080, 0),
    (0, -1, "/orders", "", "Entry", "Http", 1, START + 30_000, START + 30_090, 0),
]
PROFILED = [
    profiled_segment_row(SEG_A, "trace-a", START + 30_000, SEG_A_SPANS),
    profiled_segment_row(SEG_B, "trace-b", START + 30_000,
                         [(0, -1, "/orders", "", "Entry", "Http", 1, START + 30_000, START + 30_050, 1)]),
]
RESENT_PROFILED = profiled_segment_row(SEG_A, "trace-a-resent", START + 30_000, SEG_A_SPANS)


def lit(v):
    """A ClickHouse literal for a Python value."""
    if isinstance(v, str):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(v, list):
        return "[" + ", ".join(lit(x) for x in v) + "]"
    return str(int(v))


def values(rows):
    return ", ".join("(" + ", ".join(lit(v) for v in row) + ")" for row in rows)


def stack_id(stack):
    """A 16-byte id of a stack, as hex. skysnap uses XXH3-128 of the frames; the recipes
    only need the dictionary and the snapshots to agree, so this fixture uses MD5 of the
    same encoding (each frame as its length, u32 little endian, then its bytes)."""
    digest = hashlib.md5()
    for frame in stack:
        data = frame.encode()
        digest.update(len(data).to_bytes(4, "little") + data)
    return digest.hexdigest().upper()


def dictionary_rows(rows):
    """(profile_stack rows, profile_snapshot rows) of full snapshot rows
    (task, segment, sequence, dump_time, time_bucket, stack): each stack once per day."""
    stacks = {}
    keyed = []
    for task, segment, seq, dump, bucket, stack in rows:
        day = bucket // 1_000_000
        stacks[(stack_id(stack), day)] = stack
        keyed.append(f"({lit(task)}, {lit(segment)}, {seq}, {dump}, {bucket}, unhex('{stack_id(stack)}'))")
    stack_rows = [f"(unhex('{sid}'), {day}, {lit(stack)})" for (sid, day), stack in stacks.items()]
    return ", ".join(stack_rows), ", ".join(keyed)


def insert_statements(database):
    """The INSERTs that load the rows, each re-sent row in a part of its own; snapshots
    as skysnap writes them, each distinct stack into the dictionary first."""
    stacks, snapshots = dictionary_rows(SNAPSHOTS + OTHER_SNAPSHOTS)
    _, resent = dictionary_rows(RESENT)
    return [
        f"INSERT INTO {database}.profile_task VALUES {values(TASK_ROWS)}",
        f"INSERT INTO {database}.profile_task_log VALUES {values(LOGS)}",
        f"INSERT INTO {database}.profile_task_log VALUES {values([RESENT_LOG])}",
        f"INSERT INTO {database}.profile_stack VALUES {stacks}",
        f"INSERT INTO {database}.profile_snapshot VALUES {snapshots}",
        f"INSERT INTO {database}.profile_snapshot VALUES {resent}",
        f"INSERT INTO {database}.profiled_segment VALUES {values(PROFILED)}",
        f"INSERT INTO {database}.profiled_segment VALUES {values([RESENT_PROFILED])}",
    ]


def norm(v):
    """JSON output with 64-bit integers as ints, whether the server quoted them or not."""
    if isinstance(v, list):
        return [norm(x) for x in v]
    if isinstance(v, str) and re.fullmatch(r"-?[0-9]+", v):
        return int(v)
    return v


def ddl_statements(text):
    """The statements of a .sql file: comment lines dropped, split on ';' at line ends."""
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in re.split(r";[ \t]*$", body, flags=re.M) if s.strip()]


def example_queries(text):
    """{name: sql} from examples.sql: blocks of '-- name: x', one '-- ' description, the query."""
    queries = {}
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.strip().splitlines()
        if not lines[0].startswith("-- name:"):
            assert all(line.startswith("--") for line in lines), f"stray text in examples.sql: {block!r}"
            continue
        name = lines[0][len("-- name:"):].strip()
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        assert lines[1].startswith("-- ") and len(lines[1]) > 3, f"{name}: no one-line description"
        sql = "\n".join(lines[2:]).strip()
        assert sql and not sql.lstrip().startswith("--"), f"{name}: query must follow one description line"
        assert sql.endswith(";") and len(re.findall(r";[ \t]*$", sql, re.M)) == 1, f"{name}: one statement ending with ';'"
        assert name not in queries, f"duplicate example {name}"
        queries[name] = sql
    return queries


RECIPES = [
    "segment_snapshots",
    "hottest_frames",
    "collapsed_stacks",
    "hottest_frames_self",
    "snapshots_per_minute",
    "slowest_segments",
    "segments_side_by_side",
]
# The placeholders a person replaces, and what the tests put there by default (SEG_B
# lacks some of SEG_A's frames, so the side-by-side shows zeros).
PLACEHOLDERS = {"'<task>'": TASK, "'<segment>'": SEG_A, "'<segment_a>'": SEG_A, "'<segment_b>'": SEG_B}


def recipe(name, database=FILE_DATABASE, **placeholders):
    """The recipe's SQL with its placeholders filled (e.g. segment=SEG_B) and no ';'."""
    sql = example_queries(EXAMPLES.read_text())[name]
    assert "'<task>'" in sql, f"{name} does not filter by task"
    fill = dict(PLACEHOLDERS)
    fill.update({f"'<{key}>'": value for key, value in placeholders.items()})
    for placeholder, value in fill.items():
        sql = sql.replace(placeholder, lit(value))
    assert not re.search(r"'<[a-z_]+>'", sql), f"{name}: a placeholder left: {sql}"
    if database != FILE_DATABASE:
        sql = sql.replace(f" {FILE_DATABASE}.profile_", f" {database}.profile_")
    return sql.rstrip().rstrip(";")


def _keys(rows):
    """Each snapshot key once, as a re-sent row must count."""
    return {(r[1], r[2]): r for r in rows}.values()


def _frame_counts(snapshots):
    """Per frame: the snapshots whose stack holds it, and its smallest depth in any stack."""
    per_frame, depth = Counter(), {}
    for (_, _, _, _, _, stack) in snapshots:
        per_frame.update(set(stack))
        for i, frame in enumerate(stack):
            depth[frame] = min(i, depth.get(frame, i))
    return per_frame, depth


def expected(name, segment=SEG_A):
    """The rows (JSONCompact, normalised) that recipe `name` returns for TASK on these rows."""
    snapshots = list(_keys(SNAPSHOTS))
    if name == "segment_snapshots":
        return [[seq, dump, stack] for (_, seg, seq, dump, _, stack) in snapshots if seg == segment]
    if name == "hottest_frames":
        # Ties go outermost (smallest depth in any stack) first, then by name.
        per_frame, depth = _frame_counts(snapshots)
        return [[f, n] for f, n in sorted(per_frame.items(), key=lambda kv: (-kv[1], depth[kv[0]], kv[0]))][:20]
    if name == "collapsed_stacks":
        folded = Counter(";".join(stack) for (_, _, _, _, _, stack) in snapshots)
        return [[f"{stack} {n}"] for stack, n in sorted(folded.items(), key=lambda kv: (-kv[1], kv[0]))]
    if name == "hottest_frames_self":
        # Leaves of the 14 snapshots: SocketInputStream.read 2 + 2 + 3, executeQuery 1 + 1 + 1,
        # CategoryTree.leaf 1 + 0 + 1, writeString 1 + 0 + 1 (a tie, by name); self time at
        # TASK's 20 ms period.
        return [
            ["java.net.SocketInputStream.read:171", 7, 50.0, 140],
            ["com.mysql.cj.jdbc.ClientPreparedStatement.executeQuery:1003", 3, 21.4, 60],
            ["com.fasterxml.jackson.core.json.WriterBasedJsonGenerator.writeString:442", 2, 14.3, 40],
            ["com.shop.CategoryTree.leaf:55", 2, 14.3, 40],
        ]
    if name == "snapshots_per_minute":
        # SEG_A and SEG_B in the first minute; SEG_C's six dumps split 3 / 3 across the next
        # two; OTHER_TASK's dumps in the first two minutes are not counted.
        return [
            [minute_text(START), 8, 2],
            [minute_text(START + 60_000), 3, 1],
            [minute_text(START + 120_000), 3, 1],
        ]
    if name == "slowest_segments":
        return [
            [SEG_C, 100, 6, START + 119_950, START + 120_050],
            [SEG_A, 80, 5, START + 30_000, START + 30_080],
            [SEG_B, 40, 3, START + 30_000, START + 30_040],
        ]
    if name == "segments_side_by_side":
        # SEG_A (5 snapshots, one re-sent) against SEG_B (3): the common path, then DAO's
        # and SOCKET's frames, then SEG_A's own frames (RENDER's, TREE's with the recursive
        # walk once per snapshot) by depth and name, at 0 for SEG_B.
        return [[frame, 5, 3] for frame in LIST] + [
            ["com.shop.OrderDao.query:17", 3, 3],
            ["com.mysql.cj.jdbc.ClientPreparedStatement.executeQuery:1003", 3, 3],
            ["com.mysql.cj.protocol.ReadAheadInputStream.fill:107", 2, 2],
            ["java.net.SocketInputStream.read:171", 2, 2],
            ["com.fasterxml.jackson.databind.ObjectMapper.writeValueAsString:3964", 1, 0],
            ["com.shop.CategoryTree.walk:30", 1, 0],
            ["com.fasterxml.jackson.databind.ObjectMapper._writeValueAndClose:4719", 1, 0],
            ["com.fasterxml.jackson.databind.ser.DefaultSerializerProvider.serializeValue:319", 1, 0],
            ["com.shop.CategoryTree.leaf:55", 1, 0],
            ["com.fasterxml.jackson.databind.ser.BeanSerializer.serialize:178", 1, 0],
            ["com.fasterxml.jackson.core.json.WriterBasedJsonGenerator.writeString:442", 1, 0],
        ]
    raise KeyError(name)
