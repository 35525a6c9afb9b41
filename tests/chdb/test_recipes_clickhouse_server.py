"""Runs every recipe of schemas/examples.sql on a real ClickHouse server (Debian's 18.16 in
scripts/test.sh), on the rows and against the exact results that test_schema.py holds
chDB's current engine to (both from skysnap_fixture.py).

The server is `$SKYSNAP_TEST_CLICKHOUSE_URL`, else
`http://127.0.0.1:${CLICKHOUSE_HTTP_PORT:-18123}` (scripts/services/clickhouse.sh start).
Each run creates a database of its own, applies the DDL skysnap would apply for the
server's version (`skysnap schema --server-version`, or the same rules applied here to
schemas/clickhouse.sql when the binary is not built), and drops the database at the end.
Without SKYSNAP_TEST_CLICKHOUSE_URL and without a server answering, the tests are skipped;
with the variable set, a server that does not answer fails them. Only the standard
library talks to the server (urllib over HTTP).

    scripts/services/clickhouse.sh install && scripts/services/clickhouse.sh start
    python -m pytest tests/chdb/test_recipes_clickhouse_server.py -v
"""

import json
import os
import re
import subprocess
import urllib.error
import urllib.request
import uuid

import pytest

from skysnap_fixture import (
    DDL, FILE_DATABASE, OTHER_TASK, RECIPES, ROOT, SEG_A, SEG_B, SEG_C, TABLES, TASK, ddl_statements,
    expected, insert_statements, lit, norm, recipe,
)

URL_VARIABLE = "SKYSNAP_TEST_CLICKHOUSE_URL"
URL = (os.environ.get(URL_VARIABLE) or f"http://127.0.0.1:{os.environ.get('CLICKHOUSE_HTTP_PORT', '18123')}").rstrip("/")
# The loopback cluster of scripts/services/clickhouse-cluster.sh: the recipes run
# unchanged on its Distributed tables, the schema being `skysnap schema --cluster`.
CLUSTER_VARIABLE = "SKYSNAP_TEST_CLICKHOUSE_CLUSTER_URLS"
CLUSTER_URLS = (os.environ.get(CLUSTER_VARIABLE)
                or ",".join(f"http://127.0.0.1:1813{node}" for node in range(1, 5))).split(",")
CLUSTER_NAME = os.environ.get("SKYSNAP_TEST_CLICKHOUSE_CLUSTER", "skysnap_cluster")
# As skysnap's own client on a cluster: synchronous Distributed INSERTs, replicas in order.
CLUSTER_SETTINGS = "?insert_distributed_sync=1&load_balancing=in_order"
SKYSNAP_BIN = os.environ.get("SKYSNAP_BIN") or str(ROOT / "target" / "debug" / "skysnap")
MODERN = (20, 1)  # as src/store/clickhouse/schema.rs: TTL, codecs and LowCardinality from here


class ServerError(Exception):
    """ClickHouse answered a statement with an error."""


def http_query(sql, timeout=30, url=None):
    request = urllib.request.Request((url or URL + "/"), data=sql.encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read().decode()
    except urllib.error.HTTPError as error:
        raise ServerError(f"{error.read().decode().strip()}\nin: {sql[:400]}") from None


def server_answers(url=URL):
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/ping", timeout=3) as response:
            return response.read().decode().strip() == "Ok."
    except (OSError, urllib.error.URLError):
        return False


def rendered_ddl(version, database, cluster=None):
    """The DDL skysnap would apply to this server, for `database` (on `cluster`)."""
    if cluster:
        assert os.path.exists(SKYSNAP_BIN), f"{SKYSNAP_BIN} renders the cluster DDL: build it"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKYSNAP_")}
        env["SKYSNAP_CLICKHOUSE_DATABASE"] = database
        out = subprocess.run(
            [SKYSNAP_BIN, "schema", "--server-version", version, "--cluster", cluster],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, f"{SKYSNAP_BIN} schema --cluster failed: {out.stderr}"
        return ddl_statements(out.stdout)
    if os.path.exists(SKYSNAP_BIN):
        # Only the database from the environment: `skysnap schema` refuses unknown
        # SKYSNAP_* variables, such as this test's own SKYSNAP_TEST_CLICKHOUSE_URL.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKYSNAP_")}
        env["SKYSNAP_CLICKHOUSE_DATABASE"] = database
        out = subprocess.run(
            [SKYSNAP_BIN, "schema", "--server-version", version],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, f"{SKYSNAP_BIN} schema failed: {out.stderr}"
        return ddl_statements(out.stdout)
    # Not built: the rules of src/store/clickhouse/schema.rs::render, applied here.
    text = DDL.read_text().replace(f" {FILE_DATABASE}.", f" {database}.").replace(
        f"CREATE DATABASE IF NOT EXISTS {FILE_DATABASE};", f"CREATE DATABASE IF NOT EXISTS {database};")
    statements = ddl_statements(text)
    if tuple(int(part) for part in version.split(".")[:2]) >= MODERN:
        return statements
    legacy = []
    for statement in statements:
        statement = re.sub(r" CODEC\((?:[^()]|\([^()]*\))*\)", "", statement)
        statement = statement.replace("LowCardinality(String)", "String")
        legacy.append("\n".join(line for line in statement.splitlines() if not line.startswith("TTL ")))
    return legacy


@pytest.fixture(scope="module", params=["single", "cluster"])
def server(request):
    cluster = CLUSTER_NAME if request.param == "cluster" else None
    url, variable = (CLUSTER_URLS[0], CLUSTER_VARIABLE) if cluster else (URL, URL_VARIABLE)
    if not server_answers(url):
        if os.environ.get(variable):
            pytest.fail(f"{variable} is set but the ClickHouse server at {url} does not answer /ping")
        pytest.skip(f"no ClickHouse server answers at {url} and {variable} is unset "
                    "(start one with scripts/services/clickhouse.sh or clickhouse-cluster.sh start)")
    url = url.rstrip("/") + "/" + (CLUSTER_SETTINGS if cluster else "")

    def run(sql, node_url=None):
        return http_query(sql, url=node_url or url)

    version = run("SELECT version()").strip()
    database = f"skysnap_recipes_{uuid.uuid4().hex[:12]}"
    statements = rendered_ddl(version, database, cluster)
    on_cluster = f" ON CLUSTER {cluster}" if cluster else ""
    assert statements[0] == f"CREATE DATABASE IF NOT EXISTS {database}{on_cluster}", statements[0]
    try:
        for statement in statements:
            run(statement)
        # As on a live server between an insert and the next merge: keep re-sent rows
        # apart (these tables only: the server is shared); on a cluster, on every node.
        for node_url in (CLUSTER_URLS if cluster else [url]):
            for table in TABLES:
                run(f"SYSTEM STOP MERGES {database}.{table}{'_local' if cluster else ''}",
                    node_url.rstrip("/") + "/" if cluster else None)
        for statement in insert_statements(database):
            run(statement)

        def q(sql):
            """The rows of a query, JSONCompact (18.16 has no JSONCompactEachRow), normalised."""
            return norm(json.loads(run(sql + "\nFORMAT JSONCompact"))["data"])

        yield {"query": q, "database": database, "version": version, "cluster": cluster,
               "run": run}
    finally:
        run(f"DROP DATABASE IF EXISTS {database}{on_cluster}")


def run_recipe(server, name, **placeholders):
    return server["query"](recipe(name, server["database"], **placeholders))


def test_profiled_segment_resent_is_replaced(server):
    """A kept segment sent again is read once, as the later row, on this server too."""
    db = server["database"]
    assert server["query"](f"SELECT count() FROM {db}.profiled_segment") == [[3]]
    rows = server["query"](f"SELECT segment_id, trace_id, length(span_id) FROM {db}.profiled_segment FINAL "
                           "ORDER BY segment_id")
    assert rows == [[SEG_A, "trace-a-resent", 3], [SEG_B, "trace-b", 1]]


def test_server_version_and_ddl(server):
    # Which server ran the recipes goes into the test log.
    print(f"ClickHouse {server['version']} (cluster: {server['cluster']}), database {server['database']}")
    local = "_local" if server["cluster"] else ""
    ddl = server["run"](f"SHOW CREATE TABLE {server['database']}.profile_snapshot{local}")
    assert ("ReplicatedReplacingMergeTree" in ddl) == bool(server["cluster"]), ddl
    assert "ReplacingMergeTree" in ddl
    major, minor = (int(part) for part in server["version"].split(".")[:2])
    assert ("TTL" in ddl) == ((major, minor) >= MODERN), ddl


def test_resent_rows_are_stored_twice(server):
    """The recipes below really meet the duplicates: merges are stopped."""
    db = server["database"]
    assert server["query"](f"SELECT count() FROM {db}.profile_thread_snapshot WHERE task_id = {lit(TASK)}") == [[16]]
    assert server["query"](f"SELECT count() FROM {db}.profile_snapshot FINAL WHERE task_id = {lit(TASK)}") == [[14]]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe(server, name):
    assert run_recipe(server, name) == expected(name)


@pytest.mark.parametrize("segment", [SEG_B, SEG_C])
def test_segment_snapshots_of_other_segments(server, segment):
    assert run_recipe(server, "segment_snapshots", segment=segment) == expected("segment_snapshots", segment=segment)


def test_hottest_frames_self_uses_the_tasks_dump_period(server):
    rows = run_recipe(server, "hottest_frames_self", task=OTHER_TASK)
    assert rows == [["java.net.SocketInputStream.read:171", 1, 50.0, 50], ["other.Thread.run:1", 1, 50.0, 50]]


def test_segments_side_by_side_swapped(server):
    rows = run_recipe(server, "segments_side_by_side", segment_a=SEG_B, segment_b=SEG_A)
    assert sorted(rows) == sorted([f, b, a] for f, a, b in expected("segments_side_by_side"))


def test_collapsed_stacks_as_flamegraph_input(server):
    """The TSVRaw lines a person pipes into flamegraph.pl."""
    out = server["run"](recipe("collapsed_stacks", server["database"]) + "\nFORMAT TSVRaw")
    assert [[line] for line in out.splitlines()] == expected("collapsed_stacks")
