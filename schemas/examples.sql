-- Example queries on skysnap's tables: replace '<task>' and '<segment>', paste into clickhouse-client.
-- Each counts a re-sent snapshot (same task_id, segment_id, sequence) once. Flame graph:
--   clickhouse-client --format TSVRaw --query "<collapsed_stacks>" | flamegraph.pl > task.svg

-- name: segment_snapshots
-- The thread dumps of one profiled segment, in sequence order, each key once.
SELECT sequence, dump_time, stack
FROM skysnap.profile_thread_snapshot FINAL
WHERE task_id = '<task>' AND segment_id = '<segment>'
ORDER BY sequence;

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
