-- Rendered for the ClickHouse cluster `skysnap_cluster` (`skysnap schema --cluster skysnap_cluster`): each
-- table below is a Replicated…MergeTree table <name>_local on every node, replicated
-- through ZooKeeper under /clickhouse/tables/{shard}/skysnap/<name>_local, and a Distributed table <name>
-- over them that spreads INSERTs by the table's sharding key and reads every shard
-- (one replica each). Read and write the plain names; a key's rows all lie on one
-- shard, so FINAL and LIMIT 1 BY the key stay exact. An IN subquery over another
-- Distributed table is written GLOBAL IN (or reads a _local table that is sharded
-- like the outer one: profile_segment_task with profile_snapshot, profile_task_service
-- with profile_task). Apply it on any one node; each statement runs on all:
--
--   clickhouse-client --multiquery < schemas/clickhouse-cluster.sql
--
-- The single-node schema's notes follow.
--
-- skysnap's ClickHouse schema, for current ClickHouse servers (TTL, codecs and
-- LowCardinality available). skysnap applies it at start-up unless
-- `clickhouse.create_schema: false`; then apply it by hand:
--
--   clickhouse-client --multiquery < schemas/clickhouse.sql
--
-- `skysnap schema` prints what skysnap would apply for its configuration (another
-- database name or retention) and, with `--server-version`, for an older server.
--
-- Every table is a ReplacingMergeTree ordered by its key: a re-sent snapshot or a
-- replayed Kafka message collapses at merge time. Until then a query that must count
-- each key once reads the table with FINAL (or LIMIT 1 BY the key), as below.
-- Snapshots are stored as a stack dictionary: each distinct stack once (profile_stack),
-- each dump as its key and the id of its stack (profile_snapshot); the view
-- profile_thread_snapshot joins the frames back.
-- Rows expire by TTL on the day of their time bucket, kept for the configured
-- retention (default 3 days) — the same rule by which skysnap drops whole day
-- partitions on servers without TTL.

CREATE DATABASE IF NOT EXISTS skysnap ON CLUSTER skysnap_cluster;

-- One row per profile task: "profile endpoint E of service S for D minutes".
-- Times are epoch milliseconds; time_bucket is the minute of start_time (yyyyMMddHHmm, UTC).
--   SELECT id, endpoint_name, start_time, duration FROM skysnap.profile_task FINAL
--   WHERE service = 'shop' ORDER BY create_time DESC;
CREATE TABLE IF NOT EXISTS skysnap.profile_task_local ON CLUSTER skysnap_cluster
(
    id                     String,
    service                LowCardinality(String),
    endpoint_name          String,
    start_time             Int64,
    duration               Int32,
    min_duration_threshold Int32,
    dump_period            Int32,
    max_sampling_count     Int32,
    create_time            Int64,
    end_time               Int64,
    time_bucket            Int64
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/skysnap/profile_task_local', '{replica}')
PARTITION BY intDiv(time_bucket, 10000)
ORDER BY (service, id)
TTL makeDate(intDiv(time_bucket, 100000000), intDiv(time_bucket, 1000000) % 100, intDiv(time_bucket, 10000) % 100) + INTERVAL 3 DAY;

CREATE TABLE IF NOT EXISTS skysnap.profile_task ON CLUSTER skysnap_cluster AS skysnap.profile_task_local
ENGINE = Distributed(skysnap_cluster, skysnap, profile_task_local, cityHash64(id));

-- One row per (task, agent instance, operation): NOTIFIED (1) when the task was handed
-- to the instance, EXECUTION_FINISHED (2) when the instance reported it done.
-- time_bucket is the second of the task's end (yyyyMMddHHmmss), so logs expire with
-- their task.
--   SELECT instance, operation_name, operation_time FROM skysnap.profile_task_log FINAL
--   WHERE task_id = '<task>' ORDER BY operation_time;
CREATE TABLE IF NOT EXISTS skysnap.profile_task_log_local ON CLUSTER skysnap_cluster
(
    task_id        String,
    instance       String,
    operation      UInt8,
    operation_name LowCardinality(String),
    service        LowCardinality(String),
    operation_time Int64,
    time_bucket    Int64
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/skysnap/profile_task_log_local', '{replica}')
PARTITION BY intDiv(time_bucket, 1000000)
ORDER BY (task_id, instance, operation)
TTL makeDate(intDiv(time_bucket, 10000000000), intDiv(time_bucket, 100000000) % 100, intDiv(time_bucket, 1000000) % 100) + INTERVAL 3 DAY;

CREATE TABLE IF NOT EXISTS skysnap.profile_task_log ON CLUSTER skysnap_cluster AS skysnap.profile_task_log_local
ENGINE = Distributed(skysnap_cluster, skysnap, profile_task_log_local, cityHash64(task_id));

-- The stack dictionary: each distinct stack once per day in which a snapshot of it was
-- stored. stack_id is the 128-bit XXH3 hash of the frames (each as its length, u32
-- little endian, then its bytes); frames are root first, as the agent formatted them
-- (Java: class.method:line, Python: file.func: line). A stack is written again on each
-- day it is seen, so it expires only with the last day of its snapshots.
--   SELECT any(frames) FROM skysnap.profile_stack WHERE stack_id = unhex('<stack_id>');
CREATE TABLE IF NOT EXISTS skysnap.profile_stack_local ON CLUSTER skysnap_cluster
(
    stack_id FixedString(16),
    day      Int64,
    frames   Array(String) CODEC(ZSTD(3))
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/skysnap/profile_stack_local', '{replica}')
PARTITION BY day
ORDER BY stack_id
TTL makeDate(intDiv(day, 10000), intDiv(day, 100) % 100, day % 100) + INTERVAL 3 DAY;

CREATE TABLE IF NOT EXISTS skysnap.profile_stack ON CLUSTER skysnap_cluster AS skysnap.profile_stack_local
ENGINE = Distributed(skysnap_cluster, skysnap, profile_stack_local, cityHash64(stack_id));

-- One row per thread dump of a profiled segment, keyed by (task, segment, sequence),
-- referring to its stack by id. time_bucket is the second of dump_time (yyyyMMddHHmmss).
CREATE TABLE IF NOT EXISTS skysnap.profile_snapshot_local ON CLUSTER skysnap_cluster
(
    task_id     String,
    segment_id  String,
    sequence    Int32,
    dump_time   Int64 CODEC(Delta, ZSTD(1)),
    time_bucket Int64 CODEC(Delta, ZSTD(1)),
    stack_id    FixedString(16)
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/skysnap/profile_snapshot_local', '{replica}')
PARTITION BY intDiv(time_bucket, 1000000)
ORDER BY (task_id, segment_id, sequence)
TTL makeDate(intDiv(time_bucket, 10000000000), intDiv(time_bucket, 100000000) % 100, intDiv(time_bucket, 1000000) % 100) + INTERVAL 3 DAY;

CREATE TABLE IF NOT EXISTS skysnap.profile_snapshot ON CLUSTER skysnap_cluster AS skysnap.profile_snapshot_local
ENGINE = Distributed(skysnap_cluster, skysnap, profile_snapshot_local, cityHash64(task_id, segment_id));

-- The snapshots with their frames, as one row per dump (the rows of skysnap's earlier
-- layout, stack_id added): one FROM for SQL users. It reads through the dictionary, so
-- a re-sent snapshot that is not merged away yet is a second row: count each key once
-- (LIMIT 1 BY task_id, segment_id, sequence, or uniqExact of the key) rather than with
-- FINAL. On servers before 19.x, add SETTINGS enable_optimize_predicate_expression = 1
-- to a query of the view, or its WHERE reaches the tables only after the join.
--   SELECT sequence, dump_time, stack FROM skysnap.profile_thread_snapshot
--   WHERE task_id = '<task>' AND segment_id = '<segment>'
--   ORDER BY sequence LIMIT 1 BY sequence;
CREATE VIEW IF NOT EXISTS skysnap.profile_thread_snapshot ON CLUSTER skysnap_cluster AS
SELECT task_id, segment_id, sequence, dump_time, time_bucket, stack, stack_id
FROM skysnap.profile_snapshot
GLOBAL ANY LEFT JOIN
(
    SELECT stack_id, any(frames) AS stack
    FROM skysnap.profile_stack
    GROUP BY stack_id
) AS stacks USING stack_id;

-- One row per trace segment that has snapshots, kept with all its spans (a segment is
-- never stored half), so that a profiled request's span tree can be read. The spans are
-- parallel arrays, one element per span in the order the agent sent them; endpoint is
-- the first span's operation name; start_time and end_time are the earliest span start
-- and the latest span end. time_bucket is the second of start_time (yyyyMMddHHmmss).
-- A segment sent again replaces the stored one (at merge time; FINAL until then).
--   SELECT trace_id, endpoint, duration, is_error FROM skysnap.profiled_segment FINAL
--   WHERE segment_id = '<segment>';
--   SELECT span_id, span_parent_id, span_operation_name, span_end_time - span_start_time AS ms
--   FROM skysnap.profiled_segment FINAL
--   ARRAY JOIN span_id, span_parent_id, span_operation_name, span_start_time, span_end_time
--   WHERE segment_id = '<segment>' ORDER BY span_start_time;
CREATE TABLE IF NOT EXISTS skysnap.profiled_segment_local ON CLUSTER skysnap_cluster
(
    segment_id          String,
    trace_id            String,
    service             LowCardinality(String),
    instance            String,
    endpoint            String,
    start_time          Int64,
    end_time            Int64,
    duration            Int64,
    is_error            UInt8,
    time_bucket         Int64,
    span_id             Array(Int32),
    span_parent_id      Array(Int32),
    span_operation_name Array(String) CODEC(ZSTD(3)),
    span_peer           Array(String) CODEC(ZSTD(3)),
    span_type           Array(LowCardinality(String)),
    span_layer          Array(LowCardinality(String)),
    span_component_id   Array(Int32),
    span_start_time     Array(Int64) CODEC(Delta, ZSTD(1)),
    span_end_time       Array(Int64) CODEC(Delta, ZSTD(1)),
    span_is_error       Array(UInt8)
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/skysnap/profiled_segment_local', '{replica}')
PARTITION BY intDiv(time_bucket, 1000000)
ORDER BY segment_id
TTL makeDate(intDiv(time_bucket, 10000000000), intDiv(time_bucket, 100000000) % 100, intDiv(time_bucket, 1000000) % 100) + INTERVAL 3 DAY;

CREATE TABLE IF NOT EXISTS skysnap.profiled_segment ON CLUSTER skysnap_cluster AS skysnap.profiled_segment_local
ENGINE = Distributed(skysnap_cluster, skysnap, profiled_segment_local, cityHash64(segment_id));

-- Which service a task belongs to, by task id: filled from every task INSERT by the
-- materialized view below, so that a read of one task by id (an agent's finish report)
-- uses profile_task's key (service, id) instead of scanning the table:
--   SELECT * FROM skysnap.profile_task FINAL
--   WHERE service IN (SELECT service FROM skysnap.profile_task_service_local WHERE id = '<task>')
--     AND id = '<task>';
-- day is the yyyyMMdd of the task's time bucket, so a row expires with its task.
CREATE TABLE IF NOT EXISTS skysnap.profile_task_service_local ON CLUSTER skysnap_cluster
(
    id      String,
    service String,
    day     Int64
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/skysnap/profile_task_service_local', '{replica}')
PARTITION BY day
ORDER BY (id, service, day)
TTL makeDate(intDiv(day, 10000), intDiv(day, 100) % 100, day % 100) + INTERVAL 3 DAY;

CREATE TABLE IF NOT EXISTS skysnap.profile_task_service ON CLUSTER skysnap_cluster AS skysnap.profile_task_service_local
ENGINE = Distributed(skysnap_cluster, skysnap, profile_task_service_local, cityHash64(id));

CREATE MATERIALIZED VIEW IF NOT EXISTS skysnap.profile_task_service_mv ON CLUSTER skysnap_cluster
TO skysnap.profile_task_service_local
AS SELECT id, service, intDiv(time_bucket, 10000) AS day
FROM skysnap.profile_task_local;

-- Which task a profiled segment's snapshots belong to: one row per (segment, task, day),
-- filled from every snapshot INSERT by the materialized view below. A read of one
-- segment's snapshots (the API and the analysis ask by segment alone) looks the task
-- up here first, so that it uses profile_thread_snapshot's key instead of scanning it:
--   SELECT sequence, dump_time, stack_id FROM skysnap.profile_snapshot FINAL
--   WHERE task_id IN (SELECT task_id FROM skysnap.profile_segment_task_local WHERE segment_id = '<segment>')
--     AND segment_id = '<segment>' ORDER BY sequence;
-- day is the yyyyMMdd of the snapshots' time buckets: a row lives in the partition of
-- the snapshots it stands for, so it expires with them.
CREATE TABLE IF NOT EXISTS skysnap.profile_segment_task_local ON CLUSTER skysnap_cluster
(
    segment_id String,
    task_id    String,
    day        Int64
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/skysnap/profile_segment_task_local', '{replica}')
PARTITION BY day
ORDER BY (segment_id, task_id, day)
TTL makeDate(intDiv(day, 10000), intDiv(day, 100) % 100, day % 100) + INTERVAL 3 DAY;

CREATE TABLE IF NOT EXISTS skysnap.profile_segment_task ON CLUSTER skysnap_cluster AS skysnap.profile_segment_task_local
ENGINE = Distributed(skysnap_cluster, skysnap, profile_segment_task_local, cityHash64(task_id, segment_id));

CREATE MATERIALIZED VIEW IF NOT EXISTS skysnap.profile_segment_task_mv ON CLUSTER skysnap_cluster
TO skysnap.profile_segment_task_local
AS SELECT segment_id, task_id, intDiv(time_bucket, 1000000) AS day
FROM skysnap.profile_snapshot_local
GROUP BY segment_id, task_id, day;
