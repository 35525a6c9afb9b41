"""Checks schemas/clickhouse.sql and schemas/examples.sql on a real ClickHouse 26.x engine.

chDB (PyPI `chdb-core`, imported as `chdb`) runs ClickHouse in-process: no server, no
port. The test applies the DDL, inserts the rows of skysnap_fixture.py (shaped like the
ones skysnap writes, re-sent snapshots and a repeated task log in their own parts with
merges stopped, as on a live server before a merge), and checks that FINAL and every
example query count each key once, against the exact results skysnap_fixture.py holds
(test_recipes_clickhouse_server.py holds a real 18.16 server to the same).

    pip install -r tests/chdb/requirements.txt
    python -m pytest tests/chdb -v
"""

import json
import re
import time

import pytest
from chdb import session as chdb_session

from skysnap_fixture import (
    DDL, EXAMPLES, END, LIST, OTHER_SEG, OTHER_TASK, SNAPSHOTS, RECIPES, ROOT, SEG_A, SEG_B, SEG_C, SOCKET,
    START, DURATION, TABLES, TASK, bucket_minute, bucket_second, ddl_statements, example_queries,
    expected, insert_statements, lit, norm, recipe,
)


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

    for statement in insert_statements("skysnap"):
        q(statement, "TSV")
    yield q
    s.close()


def run_example(db, name, fmt="JSONCompactEachRow", **placeholders):
    return db(recipe(name, **placeholders), fmt)


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
    db("CREATE TABLE skysnap.ttl_probe AS skysnap.profile_snapshot", "TSVRaw")
    old_ms = int(time.time() * 1000) - 4 * 86_400_000
    new_ms = int(time.time() * 1000)
    for sequence, ms in enumerate((old_ms, new_ms)):
        db(
            "INSERT INTO skysnap.ttl_probe VALUES "
            f"('ttl-task', 'ttl-seg', {sequence}, {ms}, {bucket_second(ms)}, unhex('{'00' * 16}'))",
            "TSVRaw",
        )
    db("OPTIMIZE TABLE skysnap.ttl_probe FINAL", "TSVRaw")
    rows = db("SELECT sequence FROM skysnap.ttl_probe ORDER BY sequence")
    assert rows == [[1]], rows
    db("DROP TABLE skysnap.ttl_probe", "TSVRaw")


def test_snapshot_codecs_and_low_cardinality_in_effect(db):
    snap = db("SHOW CREATE TABLE skysnap.profile_snapshot", "TSVRaw")
    assert "`stack_id` FixedString(16)" in snap
    assert "`dump_time` Int64 CODEC(Delta(8), ZSTD(1))" in snap
    assert "`frames` Array(String) CODEC(ZSTD(3))" in db("SHOW CREATE TABLE skysnap.profile_stack", "TSVRaw")
    assert "`service` LowCardinality(String)" in db("SHOW CREATE TABLE skysnap.profile_task", "TSVRaw")
    kept = db("SHOW CREATE TABLE skysnap.profiled_segment", "TSVRaw")
    assert "`span_type` Array(LowCardinality(String))" in kept
    assert "`span_start_time` Array(Int64) CODEC(Delta(8), ZSTD(1))" in kept


def test_duplicates_are_really_stored_and_final_counts_each_key_once(db):
    # Raw reads still see the re-sent rows (merges are stopped) ...
    assert db("SELECT count() FROM skysnap.profile_task_log") == [[3]]
    assert db(f"SELECT count() FROM skysnap.profile_thread_snapshot WHERE task_id = {lit(TASK)}") == [[16]]
    # ... FINAL counts each key once.
    assert db("SELECT count() FROM skysnap.profile_task FINAL") == [[2]]
    assert db("SELECT count() FROM skysnap.profile_task_log FINAL") == [[2]]
    assert db(f"SELECT count() FROM skysnap.profile_snapshot FINAL WHERE task_id = {lit(TASK)}") == [[14]]
    rows = db(f"SELECT instance, operation, operation_name FROM skysnap.profile_task_log FINAL "
              f"WHERE task_id = {lit(TASK)} ORDER BY operation_time")
    assert rows == [["shop-1", 1, "NOTIFIED"], ["shop-1", 2, "EXECUTION_FINISHED"]]


def test_profiled_segment_resent_is_replaced_and_spans_unfold(db):
    assert db("SELECT count() FROM skysnap.profiled_segment") == [[3]]
    rows = db("SELECT segment_id, trace_id, endpoint, duration, is_error FROM skysnap.profiled_segment FINAL "
              "ORDER BY segment_id")
    assert rows == [[SEG_A, "trace-a-resent", "/orders", 90, 0], [SEG_B, "trace-b", "/orders", 50, 1]]
    spans = db("SELECT span_id, span_parent_id, span_operation_name, span_end_time - span_start_time "
               "FROM skysnap.profiled_segment FINAL "
               "ARRAY JOIN span_id, span_parent_id, span_operation_name, span_start_time, span_end_time "
               f"WHERE segment_id = {lit(SEG_A)} ORDER BY span_start_time")
    assert spans == [[0, -1, "/orders", 90], [1, 0, "com.shop.OrderController.list", 70],
                     [2, 1, "Mysql/JDBC/PreparedStatement/executeQuery", 50]]


def test_task_row_round_trips(db):
    rows = db("SELECT id, service, endpoint_name, start_time, duration, end_time, time_bucket "
              "FROM skysnap.profile_task FINAL WHERE service = 'shop' ORDER BY create_time DESC")
    assert rows == [[TASK, "shop", "/orders", START, DURATION, END, bucket_minute(START)]]


def test_examples_file_has_the_recipes():
    assert list(example_queries(EXAMPLES.read_text())) == RECIPES


@pytest.mark.parametrize("segment", [SEG_A, SEG_B, SEG_C])
def test_segment_snapshots(db, segment):
    rows = run_example(db, "segment_snapshots", segment=segment)
    assert rows == expected("segment_snapshots", segment=segment)
    assert [r[0] for r in rows] == list(range({SEG_A: 5, SEG_B: 3, SEG_C: 6}[segment]))


def test_hottest_frames(db):
    rows = run_example(db, "hottest_frames")
    assert rows == expected("hottest_frames")
    assert rows[0] == ["java.lang.Thread.run:750", 14]  # the root frame, in all 14 snapshots
    assert [f for f, _ in rows[:len(LIST)]] == LIST  # every snapshot runs through list()
    assert dict(rows)["com.shop.CategoryTree.walk:30"] == 2  # recursive frame, two snapshots
    assert len(rows) == 20  # LIMIT 20 really cut (22 frames)


def test_collapsed_stacks(db):
    out = run_example(db, "collapsed_stacks", fmt="TSVRaw")
    assert [[line] for line in out.splitlines()] == expected("collapsed_stacks")
    assert out.splitlines()[0] == ";".join(SOCKET) + " 7"  # 7 keys; the re-sent copy of one is not counted
    assert sum(int(line.rsplit(" ", 1)[1]) for line in out.splitlines()) == 14
    # One String column named `line`.
    header = run_example(db, "collapsed_stacks", fmt="TSVWithNamesAndTypes").splitlines()[:2]
    assert header == ["line", "String"]


def test_hottest_frames_self(db):
    rows = run_example(db, "hottest_frames_self")
    assert rows == expected("hottest_frames_self")
    assert sum(r[1] for r in rows) == 14  # each of the task's snapshots has one leaf
    header = run_example(db, "hottest_frames_self", fmt="TSVWithNames").splitlines()[0]
    assert header == "frame\tself_samples\tself_percent\tself_ms"


def test_hottest_frames_self_uses_the_tasks_dump_period(db):
    rows = run_example(db, "hottest_frames_self", task=OTHER_TASK)
    assert rows == [["java.net.SocketInputStream.read:171", 1, 50.0, 50], ["other.Thread.run:1", 1, 50.0, 50]]


def test_snapshots_per_minute(db):
    assert run_example(db, "snapshots_per_minute") == expected("snapshots_per_minute")
    header = run_example(db, "snapshots_per_minute", fmt="TSVWithNamesAndTypes").splitlines()[:2]
    assert header == ["minute\tsnapshots\tsegments", "DateTime(\\'UTC\\')\tUInt64\tUInt64"]  # TSV escapes the quotes


def test_slowest_segments(db):
    assert run_example(db, "slowest_segments") == expected("slowest_segments")


def test_segments_side_by_side(db):
    rows = run_example(db, "segments_side_by_side")
    assert rows == expected("segments_side_by_side")
    # The other way round, the same frames with the sides swapped.
    swapped = run_example(db, "segments_side_by_side", segment_a=SEG_B, segment_b=SEG_A)
    assert sorted(swapped) == sorted([f, b, a] for f, a, b in rows)


def test_readme_shows_the_example_queries():
    """The queries users paste from the README are the ones tested above."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Storage (ClickHouse)"):]
    section = section[:section.index("\n## ", 1)]
    for name, sql in example_queries(EXAMPLES.read_text()).items():
        assert sql.strip() in section, f"README's ClickHouse section lacks the {name} query as in schemas/examples.sql"


@pytest.mark.parametrize("table", ("profile_segment_task", "profile_task_service", "profile_stack"))
def test_lookup_indexes_are_fed_by_their_views_and_expire(db, table):
    ddl = db(f"SHOW CREATE TABLE skysnap.{table}", "TSVRaw")
    assert "ENGINE = ReplacingMergeTree" in ddl
    assert re.search(r"^TTL makeDate\(.*day.*\) \+ toIntervalDay\(3\)$", ddl, re.M), ddl
    assert db(f"SELECT count() FROM skysnap.{table}") != [[0]]


def test_lookups_through_the_indexes_answer_as_the_scans(db):
    # The reads skysnap makes by segment alone and by task id alone, each through its
    # index, against the plain scans.
    for segment in (SEG_A, SEG_B, OTHER_SEG):
        keyed = db("SELECT task_id, sequence FROM skysnap.profile_snapshot FINAL "
                   "WHERE task_id IN (SELECT task_id FROM skysnap.profile_segment_task "
                   f"WHERE segment_id = '{segment}') AND segment_id = '{segment}' ORDER BY sequence")
        scanned = db("SELECT task_id, sequence FROM skysnap.profile_snapshot FINAL "
                     f"WHERE segment_id = '{segment}' ORDER BY sequence")
        assert keyed == scanned and scanned, segment
    keyed = db("SELECT id, service FROM skysnap.profile_task FINAL WHERE service IN "
               f"(SELECT service FROM skysnap.profile_task_service WHERE id = '{TASK}') AND id = '{TASK}'")
    assert keyed == [[TASK, "shop"]]


def test_view_joins_each_snapshot_to_its_frames(db):
    """The view gives SQL users every snapshot row with its frames, re-sent rows too."""
    rows = db(f"SELECT segment_id, sequence, stack FROM skysnap.profile_thread_snapshot "
              f"WHERE task_id = {lit(TASK)} ORDER BY segment_id, sequence LIMIT 1 BY segment_id, sequence")
    expected_rows = sorted([[segment, seq, list(stack)] for _, segment, seq, _, _, stack in SNAPSHOTS])
    assert rows == expected_rows
    assert db(f"SELECT count() FROM skysnap.profile_thread_snapshot WHERE task_id = {lit(TASK)}") == [[16]]


def test_cluster_schema_parses_on_the_current_engine(db):
    """schemas/clickhouse-cluster.sql (what `skysnap schema --cluster` prints for a current
    server) is valid syntax for ClickHouse 26.x: each statement goes through its parser
    (formatQuery), as a cluster needs ZooKeeper and remote_servers to run it. The 18.16
    rendering of it runs on the real cluster of scripts/services/clickhouse-cluster.sh."""
    cluster_ddl = (ROOT / "schemas" / "clickhouse-cluster.sql").read_text()
    statements = ddl_statements(cluster_ddl)
    assert len(statements) == 18
    single = ddl_statements(DDL.read_text())
    for statement in statements:
        assert " ON CLUSTER skysnap_cluster" in statement, statement
        formatted = db(f"SELECT formatQuery({lit(statement)})", "TSV")
        assert "ON CLUSTER skysnap_cluster" in formatted, formatted
    engines = [s for s in statements if "ENGINE = Replicated" in s]
    distributed = [s for s in statements if "ENGINE = Distributed(" in s]
    assert len(engines) == len(distributed) == sum(s.startswith("CREATE TABLE") for s in single) == 7
    # A syntax error is caught: the parser is really asked.
    with pytest.raises(Exception):
        db(f"SELECT formatQuery({lit(statements[1].replace('ORDER BY', 'ORDER'))})", "TSV")
