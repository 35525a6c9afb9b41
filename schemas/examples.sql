-- Example queries on skysnap's tables: replace '<task>' (every occurrence), '<segment>',
-- '<segment_a>' and '<segment_b>', paste into clickhouse-client. Each counts a re-sent snapshot
-- (same task_id, segment_id, sequence) once; each runs on ClickHouse 18.16 and current servers.
-- They read the view profile_thread_snapshot, which joins each snapshot to its frames
-- in the stack dictionary; on servers before 19.x add
-- SETTINGS enable_optimize_predicate_expression = 1 so that the task filter reaches the
-- table before the join. Times are epoch milliseconds, minutes UTC. Flame graph:
--   clickhouse-client --format TSVRaw --query "<collapsed_stacks>" | flamegraph.pl > task.svg

-- name: segment_snapshots
-- The thread dumps of one profiled segment, in sequence order, each key once.
SELECT sequence, dump_time, stack
FROM skysnap.profile_thread_snapshot
WHERE task_id = '<task>' AND segment_id = '<segment>'
ORDER BY sequence
LIMIT 1 BY sequence;

-- name: hottest_frames
-- The 20 frames of a task in the most snapshots (each snapshot once), outermost first on ties.
SELECT frame, uniqExact(segment_id, sequence) AS snapshots
FROM skysnap.profile_thread_snapshot
ARRAY JOIN stack AS frame, arrayEnumerate(stack) AS depth
WHERE task_id = '<task>'
GROUP BY frame
ORDER BY snapshots DESC, min(depth), frame
LIMIT 20;

-- name: collapsed_stacks
-- A task's stacks collapsed for flamegraph.pl ("root;...;leaf count"): pipe TSVRaw output into it.
SELECT concat(folded, ' ', toString(count())) AS line
FROM
(
    SELECT segment_id, sequence, arrayStringConcat(stack, ';') AS folded
    FROM skysnap.profile_thread_snapshot
    WHERE task_id = '<task>'
    LIMIT 1 BY segment_id, sequence
)
GROUP BY folded
ORDER BY count() DESC, folded;

-- name: hottest_frames_self
-- The 20 leaf frames of a task by self samples: share of the task's snapshots, self time = samples × dump_period.
WITH
    (SELECT any(dump_period) FROM skysnap.profile_task WHERE id = '<task>') AS dump_period_ms,
    (SELECT uniqExact(segment_id, sequence) FROM skysnap.profile_thread_snapshot WHERE task_id = '<task>') AS task_snapshots
SELECT
    stack[-1] AS frame,
    uniqExact(segment_id, sequence) AS self_samples,
    round(100 * self_samples / task_snapshots, 1) AS self_percent,
    self_samples * dump_period_ms AS self_ms
FROM skysnap.profile_thread_snapshot
WHERE task_id = '<task>'
GROUP BY frame
ORDER BY self_samples DESC, frame
LIMIT 20;

-- name: snapshots_per_minute
-- A task's snapshots per minute of dump time (UTC), with the segments dumped in that minute.
SELECT
    toStartOfMinute(toDateTime(intDiv(dump_time, 1000), 'UTC')) AS minute,
    uniqExact(segment_id, sequence) AS snapshots,
    uniqExact(segment_id) AS segments
FROM skysnap.profile_thread_snapshot
WHERE task_id = '<task>'
GROUP BY minute
ORDER BY minute;

-- name: slowest_segments
-- A task's segments by profiled duration (last - first dump time, ms), with snapshot count and first/last dump time.
SELECT
    segment_id,
    max(dump_time) - min(dump_time) AS duration_ms,
    uniqExact(sequence) AS snapshots,
    min(dump_time) AS first_dump_time,
    max(dump_time) AS last_dump_time
FROM skysnap.profile_thread_snapshot
WHERE task_id = '<task>'
GROUP BY segment_id
ORDER BY duration_ms DESC, segment_id;

-- name: segments_side_by_side
-- Two segments of a task side by side: per frame, the snapshots of each that contain it, outermost first on ties.
SELECT
    frame,
    uniqExactIf(sequence, segment_id = '<segment_a>') AS snapshots_a,
    uniqExactIf(sequence, segment_id = '<segment_b>') AS snapshots_b
FROM skysnap.profile_thread_snapshot
ARRAY JOIN stack AS frame, arrayEnumerate(stack) AS depth
WHERE task_id = '<task>' AND segment_id IN ('<segment_a>', '<segment_b>')
GROUP BY frame
ORDER BY snapshots_a + snapshots_b DESC, min(depth), frame;
