"""Checks schemas/clickhouse.sql and schemas/examples.sql on a real ClickHouse 26.x engine.

chDB (PyPI `chdb-core`, imported as `chdb`) runs ClickHouse in-process: no server, no
port. The test applies the DDL, inserts rows shaped like the ones skysnap writes
(including a re-sent snapshot and a repeated task log, in their own parts with merges
stopped, as on a live server before a merge), and checks that FINAL and every example
query count each key once, against results computed here in Python.

    pip install -r tests/chdb/requirements.txt
    python -m pytest tests/chdb -v
"""

import json
import re
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest
from chdb import session as chdb_session

ROOT = Path(__file__).resolve().parents[2]
DDL = ROOT / "schemas" / "clickhouse.sql"
EXAMPLES = ROOT / "schemas" / "examples.sql"
TABLES = ("profile_task", "profile_task_log", "profile_thread_snapshot")

TASK = str(uuid.UUID("3f1c2a4e-8b7d-4c1e-9a0f-5d6e7f809a1b"))
OTHER_TASK = str(uuid.UUID("0b9e8d7c-6a5f-4e3d-8c2b-1a0f9e8d7c6b"))
SEG_A = "a1b2c3d4e5f6.101.17322000000000001"
SEG_B = "a1b2c3d4e5f6.102.17322000000000002"

# Wall-clock based so that the 3-day TTLs never consider the rows expired.
START = (int(time.time()) // 60 - 10) * 60_000  # a whole minute, 10 minutes ago
DURATION = 5  # minutes
END = START + DURATION * 60_000
DUMP_PERIOD = 20


def bucket_minute(ms):
    return int(datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y%m%d%H%M"))


def bucket_second(ms):
    return int(datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y%m%d%H%M%S"))


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
# A recursive frame: it is in this snapshot twice but must count once for hottest_frames.
TREE = LIST + ["com.shop.CategoryTree.walk:30", "com.shop.CategoryTree.walk:30", "com.shop.CategoryTree.leaf:55"]
RENDER = LIST + [
    "com.fasterxml.jackson.databind.ObjectMapper.writeValueAsString:3964",
    "com.fasterxml.jackson.databind.ObjectMapper._writeValueAndClose:4719",
    "com.fasterxml.jackson.databind.ser.DefaultSerializerProvider.serializeValue:319",
    "com.fasterxml.jackson.databind.ser.BeanSerializer.serialize:178",
    "com.fasterxml.jackson.core.json.WriterBasedJsonGenerator.writeString:442",
]

# (segment, [stack per sequence]): 5 + 3 snapshots of TASK.
SEGMENTS = [
    (SEG_A, [DAO, SOCKET, SOCKET, TREE, RENDER]),
    (SEG_B, [SOCKET, DAO, SOCKET]),
]


def snapshot_rows(task, segments):
    rows = []
    for segment, stacks in segments:
        first_dump = START + 30_000
        for seq, stack in enumerate(stacks):
            dump = first_dump + seq * DUMP_PERIOD
            rows.append((task, segment, seq, dump, bucket_second(dump), list(stack)))
    return rows


SNAPSHOTS = snapshot_rows(TASK, SEGMENTS)
# Another task's snapshots, which no query about TASK may count.
OTHER_SNAPSHOTS = snapshot_rows(OTHER_TASK, [("other.1.1", [SOCKET, ["other.Thread.run:1"]])])
RESENT = SNAPSHOTS[2]  # SEG_A, sequence 2, re-sent by the agent: an identical row

LOGS = [
    (TASK, "shop-1", 1, "NOTIFIED", "shop", START + 1_000, bucket_second(END)),
    (TASK, "shop-1", 2, "EXECUTION_FINISHED", "shop", END + 2_000, bucket_second(END)),
]
RESENT_LOG = LOGS[0]


def lit(v):
    """A ClickHouse literal for a Python value."""
    if isinstance(v, str):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(v, list):
        return "[" + ", ".join(lit(x) for x in v) + "]"
    return str(int(v))


def norm(v):
    """JSON output with 64-bit integers as ints, whether the server quoted them or not."""
    if isinstance(v, list):
        return [norm(x) for x in v]
    if isinstance(v, str) and re.fullmatch(r"-?[0-9]+", v):
        return int(v)
    return v


def values(rows):
    return ", ".join("(" + ", ".join(lit(v) for v in row) + ")" for row in rows)


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


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    s = chdb_session.Session(str(tmp_path_factory.mktemp("chdb") / "skysnap"))

    def q(sql, fmt="JSONCompactEachRow"):
        out = s.query(sql, fmt)
        text = out.bytes().decode() if hasattr(out, "bytes") else str(out)
        if fmt == "JSONCompactEachRow":
            return [norm(json.loads(line)) for line in text.splitlines() if line.strip()]
        return text

    for stmt in ddl_statements(DDL.read_text()):
        q(stmt, "TSV")  # raises on any error of the DDL
    # As on a live server between an insert and the next merge: keep re-sent rows apart.
    for table in TABLES:
        q(f"SYSTEM STOP MERGES skysnap.{table}", "TSV")

    task = (TASK, "shop", "/orders", START, DURATION, 200, DUMP_PERIOD, 5,
            START - 5_000, END, bucket_minute(START))
    q(f"INSERT INTO skysnap.profile_task VALUES {values([task])}", "TSV")
    q(f"INSERT INTO skysnap.profile_task_log VALUES {values(LOGS)}", "TSV")
    q(f"INSERT INTO skysnap.profile_task_log VALUES {values([RESENT_LOG])}", "TSV")
    q(f"INSERT INTO skysnap.profile_thread_snapshot VALUES {values(SNAPSHOTS + OTHER_SNAPSHOTS)}", "TSV")
    q(f"INSERT INTO skysnap.profile_thread_snapshot VALUES {values([RESENT])}", "TSV")
    yield q
    s.close()


def run_example(db, name, fmt="JSONCompactEachRow", segment=SEG_A):
    sql = example_queries(EXAMPLES.read_text())[name]
    assert "'<task>'" in sql
    sql = sql.replace("'<task>'", lit(TASK)).replace("'<segment>'", lit(segment))
    return db(sql.rstrip().rstrip(";"), fmt)


def test_engine_is_current_clickhouse(db):
    major = int(db("SELECT version()", "TSVRaw").split(".")[0])
    assert major >= 24


@pytest.mark.parametrize("table", TABLES)
def test_show_create_table_has_ttl_and_replacing(db, table):
    ddl = db(f"SHOW CREATE TABLE skysnap.{table}", "TSVRaw")
    assert "ENGINE = ReplacingMergeTree" in ddl
    assert re.search(r"^TTL makeDate\(.*time_bucket.*\) \+ toIntervalDay\(3\)$", ddl, re.M), ddl


def test_ttl_removes_rows_by_time_bucket_day(db):
    """A row whose time bucket is 4 days old goes at the next merge; one of today stays."""
    db("CREATE TABLE skysnap.ttl_probe AS skysnap.profile_thread_snapshot", "TSVRaw")
    old_ms = int(time.time() * 1000) - 4 * 86_400_000
    new_ms = int(time.time() * 1000)
    for sequence, ms in enumerate((old_ms, new_ms)):
        db(
            "INSERT INTO skysnap.ttl_probe VALUES "
            f"('ttl-task', 'ttl-seg', {sequence}, {ms}, {bucket_second(ms)}, ['a.main:1'])",
            "TSVRaw",
        )
    db("OPTIMIZE TABLE skysnap.ttl_probe FINAL", "TSVRaw")
    rows = db("SELECT sequence FROM skysnap.ttl_probe ORDER BY sequence")
    assert rows == [[1]], rows
    db("DROP TABLE skysnap.ttl_probe", "TSVRaw")


def test_snapshot_codecs_and_low_cardinality_in_effect(db):
    snap = db("SHOW CREATE TABLE skysnap.profile_thread_snapshot", "TSVRaw")
    assert "`stack` Array(String) CODEC(ZSTD(3))" in snap
    assert "`dump_time` Int64 CODEC(Delta(8), ZSTD(1))" in snap
    assert "`service` LowCardinality(String)" in db("SHOW CREATE TABLE skysnap.profile_task", "TSVRaw")


def test_duplicates_are_really_stored_and_final_counts_each_key_once(db):
    # Raw reads still see the re-sent rows (merges are stopped) ...
    assert db("SELECT count() FROM skysnap.profile_task_log") == [[3]]
    assert db(f"SELECT count() FROM skysnap.profile_thread_snapshot WHERE task_id = {lit(TASK)}") == [[9]]
    # ... FINAL counts each key once.
    assert db("SELECT count() FROM skysnap.profile_task FINAL") == [[1]]
    assert db("SELECT count() FROM skysnap.profile_task_log FINAL") == [[2]]
    assert db(f"SELECT count() FROM skysnap.profile_thread_snapshot FINAL WHERE task_id = {lit(TASK)}") == [[8]]
    rows = db(f"SELECT instance, operation, operation_name FROM skysnap.profile_task_log FINAL "
              f"WHERE task_id = {lit(TASK)} ORDER BY operation_time")
    assert rows == [["shop-1", 1, "NOTIFIED"], ["shop-1", 2, "EXECUTION_FINISHED"]]


def test_task_row_round_trips(db):
    rows = db("SELECT id, service, endpoint_name, start_time, duration, end_time, time_bucket "
              "FROM skysnap.profile_task FINAL WHERE service = 'shop' ORDER BY create_time DESC")
    assert rows == [[TASK, "shop", "/orders", START, DURATION, END, bucket_minute(START)]]


def test_examples_file_has_the_three_queries():
    assert list(example_queries(EXAMPLES.read_text())) == ["segment_snapshots", "hottest_frames", "collapsed_stacks"]


@pytest.mark.parametrize("segment", [SEG_A, SEG_B])
def test_segment_snapshots(db, segment):
    rows = run_example(db, "segment_snapshots", segment=segment)
    expected = [[seq, dump, stack] for (_, seg, seq, dump, _, stack) in SNAPSHOTS if seg == segment]
    assert rows == expected
    assert [r[0] for r in rows] == list(range({SEG_A: 5, SEG_B: 3}[segment]))


def test_hottest_frames(db):
    # Per frame: the number of distinct snapshots of TASK whose stack holds it; ties go
    # outermost (smallest depth in any stack) first, then by name.
    per_frame, depth = Counter(), {}
    for (_, _, _, _, _, stack) in SNAPSHOTS:
        per_frame.update(set(stack))
        for i, frame in enumerate(stack):
            depth[frame] = min(i, depth.get(frame, i))
    expected = sorted(per_frame.items(), key=lambda kv: (-kv[1], depth[kv[0]], kv[0]))[:20]
    rows = [(frame, int(n)) for frame, n in run_example(db, "hottest_frames")]
    assert rows == expected
    assert rows[0] == ("java.lang.Thread.run:750", 8)  # the root frame
    assert [f for f, _ in rows[:len(LIST)]] == LIST  # every snapshot runs through list()
    assert dict(rows)["com.shop.CategoryTree.walk:30"] == 1  # recursive frame, one snapshot
    assert len(rows) == 20 and len(per_frame) > 20  # LIMIT 20 really cut


def test_collapsed_stacks(db):
    folded = Counter(";".join(stack) for (_, _, _, _, _, stack) in SNAPSHOTS)
    expected = [f"{stack} {n}" for stack, n in sorted(folded.items(), key=lambda kv: (-kv[1], kv[0]))]
    out = run_example(db, "collapsed_stacks", fmt="TSVRaw")
    assert out.splitlines() == expected
    assert out.splitlines()[0] == ";".join(SOCKET) + " 4"  # 4 keys; the re-sent copy of one is not counted
    assert sum(int(line.rsplit(" ", 1)[1]) for line in out.splitlines()) == 8
    # One String column named `line`.
    header = run_example(db, "collapsed_stacks", fmt="TSVWithNamesAndTypes").splitlines()[:2]
    assert header == ["line", "String"]


def test_readme_shows_the_example_queries():
    """The queries users paste from the README are the ones tested above."""
    readme = (ROOT / "README.md").read_text()
    for name, sql in example_queries(EXAMPLES.read_text()).items():
        assert sql.strip() in readme, f"README lacks the {name} query as in schemas/examples.sql"
