//! The embedded store: one SQLite file in WAL mode. Writes go through one connection,
//! reads through a small pool, and every call runs on a blocking thread so that no
//! async thread waits on the disk.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension};

use futures::stream::{BoxStream, StreamExt as _};
use tokio_stream::wrappers::ReceiverStream;

use super::{FilterValue, SnapshotFilter, StackCount, Store, StoreError, TaskFilter};
use crate::config::SqliteSynchronous;
use crate::model::{
    minute_bucket, second_bucket, Operation, ProfiledSegment, ProfiledSpan, SegmentSummary,
    SnapshotRecord, Task, TaskLog,
};

/// Segment ids one `IN (…)` look-up carries at most (SQLite allows 32,766 parameters;
/// smaller statements keep each look-up short).
const SEGMENT_LOOKUP_CHUNK: usize = 500;

/// Rows one retention statement deletes at most, so writers never wait long.
const RETENTION_CHUNK_ROWS: i64 = 10_000;

/// Distinct stacks, and bytes of their text, that a flame-graph scan counts in memory
/// before it hands them on: the scan's memory stays bounded however many distinct (or
/// deep) stacks a task has.
const STACK_COUNT_FLUSH_ENTRIES: usize = 20_000;
const STACK_COUNT_FLUSH_BYTES: usize = 32 * 1024 * 1024;

/// Rows a flame-graph scan reads between two checks that its reader is still there.
const STACK_COUNT_CHECK_ROWS: u64 = 4_096;

/// Tables, keys and indexes. Stacks are JSON arrays of frames, and a profiled segment's
/// spans a JSON array of span objects, so that `sqlite3` shows them and `json_each` can
/// query them; a segment is one row, so it is never stored half. Snapshot rows (~2 KB) live in a rowid table,
/// appended in arrival order, with the key as a unique index: SQLite advises WITHOUT
/// ROWID only for small rows, and a key-ordered table of 2 KB rows splits pages on
/// most inserts (measured: 3x slower and 2x larger on disk).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS profile_task (
    id                     TEXT PRIMARY KEY,
    service                TEXT NOT NULL,
    endpoint_name          TEXT NOT NULL,
    start_time             INTEGER NOT NULL,
    duration               INTEGER NOT NULL,
    min_duration_threshold INTEGER NOT NULL,
    dump_period            INTEGER NOT NULL,
    max_sampling_count     INTEGER NOT NULL,
    create_time            INTEGER NOT NULL,
    end_time               INTEGER NOT NULL,
    time_bucket            INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS profile_task_by_service ON profile_task (service, start_time);
CREATE INDEX IF NOT EXISTS profile_task_by_end ON profile_task (end_time);

CREATE TABLE IF NOT EXISTS profile_task_log (
    task_id        TEXT NOT NULL,
    instance       TEXT NOT NULL,
    operation      INTEGER NOT NULL,
    operation_name TEXT NOT NULL,
    service        TEXT NOT NULL,
    operation_time INTEGER NOT NULL,
    time_bucket    INTEGER NOT NULL,
    PRIMARY KEY (task_id, instance, operation)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS profile_thread_snapshot (
    task_id     TEXT NOT NULL,
    segment_id  TEXT NOT NULL,
    sequence    INTEGER NOT NULL,
    dump_time   INTEGER NOT NULL,
    time_bucket INTEGER NOT NULL,
    stack       TEXT NOT NULL,
    UNIQUE (task_id, segment_id, sequence)
);
CREATE INDEX IF NOT EXISTS profile_thread_snapshot_by_segment
    ON profile_thread_snapshot (segment_id, sequence);
CREATE INDEX IF NOT EXISTS profile_thread_snapshot_by_bucket
    ON profile_thread_snapshot (time_bucket);

CREATE TABLE IF NOT EXISTS profiled_segment (
    segment_id  TEXT PRIMARY KEY,
    trace_id    TEXT NOT NULL,
    service     TEXT NOT NULL,
    instance    TEXT NOT NULL,
    endpoint    TEXT NOT NULL,
    start_time  INTEGER NOT NULL,
    end_time    INTEGER NOT NULL,
    duration    INTEGER NOT NULL,
    is_error    INTEGER NOT NULL,
    time_bucket INTEGER NOT NULL,
    spans       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS profiled_segment_by_bucket ON profiled_segment (time_bucket);
";

pub struct SqliteStore {
    path: PathBuf,
    writer: Arc<Mutex<Connection>>,
    readers: Arc<Vec<Mutex<Connection>>>,
    /// Round-robin start for picking a reader.
    next_reader: AtomicUsize,
}

fn open_connection(
    path: &Path,
    busy_timeout: Duration,
    synchronous: SqliteSynchronous,
) -> Result<Connection, StoreError> {
    let connection = Connection::open(path).map_err(|error| map_error(&error))?;
    connection
        .busy_timeout(busy_timeout)
        .map_err(|error| map_error(&error))?;
    // 16 KiB pages hold seven ~2 KB snapshot rows where 4 KiB pages held one or two
    // (a no-op on an existing file). WAL lets the API read while a batch commits; any
    // `synchronous` level keeps every committed transaction across a crash of the
    // process, and FULL across an OS crash or power loss too.
    connection
        .execute_batch(&format!(
            "PRAGMA page_size=16384; PRAGMA journal_mode=WAL; PRAGMA synchronous={}; \
             PRAGMA foreign_keys=OFF;",
            synchronous.pragma()
        ))
        .map_err(|error| map_error(&error))?;
    Ok(connection)
}

/// Locked/busy/IO failures may pass; a store that cannot take anything as it is set up
/// (a table missing, read-only, no permission, corrupt) is unusable until fixed; the
/// rest refuses the data itself (a constraint, a type, a size).
fn map_error(error: &rusqlite::Error) -> StoreError {
    let rusqlite::Error::SqliteFailure(failure, _) = error else {
        return StoreError::Rejected(format!("sqlite: {error}"));
    };
    match failure.code {
        ErrorCode::DatabaseBusy
        | ErrorCode::DatabaseLocked
        | ErrorCode::SystemIoFailure
        | ErrorCode::DiskFull
        | ErrorCode::CannotOpen
        | ErrorCode::OutOfMemory => StoreError::Unavailable(format!("sqlite: {error}")),
        // `Unknown` is SQLITE_ERROR: "no such table", "no such column", and SQL the
        // schema does not match: the store's set-up, not a row.
        ErrorCode::Unknown
        | ErrorCode::ReadOnly
        | ErrorCode::PermissionDenied
        | ErrorCode::AuthorizationForStatementDenied
        | ErrorCode::NotADatabase
        | ErrorCode::DatabaseCorrupt
        | ErrorCode::SchemaChanged => StoreError::Unusable(format!("sqlite: {error}")),
        _ => StoreError::Rejected(format!("sqlite: {error}")),
    }
}

fn lock(connection: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    // A panic while holding the lock cannot leave a half-written transaction behind
    // (rusqlite rolls back on drop), so the connection stays usable.
    connection
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SqliteStore {
    /// Opens (creating when missing) the database file and its folder, and the schema.
    pub fn open(path: &Path, read_connections: usize) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with(
            path,
            read_connections,
            Duration::from_secs(5),
            SqliteSynchronous::default(),
        )
    }

    /// Like `open`, with the time a call waits on another process's lock and what a
    /// commit survives.
    pub fn open_with(
        path: &Path,
        read_connections: usize,
        busy_timeout: Duration,
        synchronous: SqliteSynchronous,
    ) -> Result<SqliteStore, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|error| {
                StoreError::Rejected(format!(
                    "cannot create folder {}: {error}",
                    parent.display()
                ))
            })?;
        }
        let writer = open_connection(path, busy_timeout, synchronous)?;
        // The writer's page cache holds the hot index pages of every insert; 64 MiB
        // instead of SQLite's 2 MiB took batch inserts from 43k to 50k rows/s (one
        // thread, 2,000-row transactions). Readers keep the default.
        writer
            .execute_batch("PRAGMA cache_size=-65536;")
            .map_err(|error| map_error(&error))?;
        writer
            .execute_batch(SCHEMA)
            .map_err(|error| map_error(&error))?;
        let readers = (0..read_connections.max(1))
            .map(|_| open_connection(path, busy_timeout, synchronous).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SqliteStore {
            path: path.to_path_buf(),
            writer: Arc::new(Mutex::new(writer)),
            readers: Arc::new(readers),
            next_reader: AtomicUsize::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn write<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || {
            let mut connection = lock(&writer);
            work(&mut connection).map_err(|error| map_error(&error))
        })
        .await
        .map_err(|error| StoreError::Unavailable(format!("sqlite writer thread failed: {error}")))?
    }

    /// Inserts every row in one transaction through one cached statement; `execute`
    /// binds a row's values and runs it.
    async fn insert_rows<R>(
        &self,
        sql: &'static str,
        rows: Vec<R>,
        execute: fn(&mut rusqlite::CachedStatement<'_>, &R) -> Result<usize, rusqlite::Error>,
    ) -> Result<(), StoreError>
    where
        R: Send + 'static,
    {
        if rows.is_empty() {
            return Ok(());
        }
        self.write(move |connection| {
            let transaction = connection.transaction()?;
            {
                let mut statement = transaction.prepare_cached(sql)?;
                for row in &rows {
                    execute(&mut statement, row)?;
                }
            }
            transaction.commit()
        })
        .await
    }

    async fn read<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        let readers = self.readers.clone();
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || {
            with_reader(&readers, start, |connection| {
                work(connection).map_err(|error| map_error(&error))
            })
        })
        .await
        .map_err(|error| StoreError::Unavailable(format!("sqlite reader thread failed: {error}")))?
    }
}

/// Runs `work` on the first free reader from a rotating start, or waits on one if all
/// are busy.
fn with_reader<T>(
    readers: &[Mutex<Connection>],
    start: usize,
    work: impl FnOnce(&Connection) -> T,
) -> T {
    let count = readers.len();
    for offset in 0..count {
        if let Ok(connection) = readers[(start + offset) % count].try_lock() {
            return work(&connection);
        }
    }
    let connection = lock(&readers[start % count]);
    work(&connection)
}

/// `WHERE …` for a snapshot filter, with its parameters as SQLite values.
fn snapshot_where(filter: &SnapshotFilter) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let (where_sql, values) = filter.where_sql();
    let values = values
        .into_iter()
        .map(|value| match value {
            FilterValue::Text(text) => Value::Text(text),
            FilterValue::Number(number) => Value::Integer(number),
        })
        .collect();
    (where_sql, values)
}

fn parse_stack(stack_json: &str) -> rusqlite::Result<Vec<String>> {
    serde_json::from_str(stack_json).map_err(|error| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(error))
    })
}

type StackTextCounts = std::collections::HashMap<Box<str>, u64, foldhash::fast::RandomState>;

/// Scans the matching rows once, counting equal stack texts in a bounded map that is
/// handed to `sender` whenever it fills. Stops early when the receiver is gone.
fn count_stacks(
    connection: &Connection,
    filter: &SnapshotFilter,
    sender: &tokio::sync::mpsc::Sender<Result<StackCount, StoreError>>,
) -> rusqlite::Result<()> {
    let (where_sql, values) = snapshot_where(filter);
    let mut statement = connection.prepare(&format!(
        "SELECT stack FROM profile_thread_snapshot {where_sql}"
    ))?;
    let mut rows = statement.query(rusqlite::params_from_iter(values.iter()))?;
    // foldhash: every row's stack text (about 2 KB) is hashed once.
    let mut counts: StackTextCounts = StackTextCounts::default();
    let mut counted_bytes = 0usize;
    let flush = |counts: &mut StackTextCounts| -> rusqlite::Result<bool> {
        for (stack_json, count) in counts.drain() {
            let stack = parse_stack(&stack_json)?;
            if sender
                .blocking_send(Ok(StackCount { stack, count }))
                .is_err()
            {
                return Ok(false);
            }
        }
        Ok(true)
    };
    let mut rows_read = 0u64;
    while let Some(row) = rows.next()? {
        rows_read += 1;
        // A caller that went away (a closed HTTP request) stops the scan.
        if rows_read.is_multiple_of(STACK_COUNT_CHECK_ROWS) && sender.is_closed() {
            return Ok(());
        }
        let stack_json = row.get_ref(0)?.as_str()?;
        match counts.get_mut(stack_json) {
            Some(count) => *count += 1,
            None => {
                let full = counts.len() >= STACK_COUNT_FLUSH_ENTRIES
                    || counted_bytes + stack_json.len() > STACK_COUNT_FLUSH_BYTES;
                if full {
                    if !flush(&mut counts)? {
                        return Ok(());
                    }
                    counted_bytes = 0;
                }
                counted_bytes += stack_json.len();
                counts.insert(Box::from(stack_json), 1);
            }
        }
    }
    flush(&mut counts)?;
    Ok(())
}

const TASK_COLUMNS: &str = "id, service, endpoint_name, start_time, duration, \
    min_duration_threshold, dump_period, max_sampling_count, create_time";

fn task_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Task> {
    Ok(Task {
        id: row.get(0)?,
        service: row.get(1)?,
        endpoint_name: row.get(2)?,
        start_time: row.get(3)?,
        duration: row.get(4)?,
        min_duration_threshold: row.get(5)?,
        dump_period: row.get(6)?,
        max_sampling_count: row.get(7)?,
        create_time: row.get(8)?,
    })
}

fn query_tasks(
    connection: &Connection,
    sql: &str,
    parameters: &[&dyn rusqlite::ToSql],
) -> rusqlite::Result<Vec<Task>> {
    let mut statement = connection.prepare_cached(sql)?;
    let rows = statement.query_map(parameters, task_from_row)?;
    rows.collect()
}

fn snapshot_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<SnapshotRecord> {
    let stack = parse_stack(row.get_ref(4)?.as_str()?)?;
    Ok(SnapshotRecord {
        task_id: row.get(0)?,
        segment_id: row.get(1)?,
        sequence: row.get(2)?,
        dump_time: row.get(3)?,
        stack,
    })
}

/// A snapshot as the writer thread inserts it.
struct SqliteSnapshotRow {
    task_id: String,
    segment_id: String,
    sequence: i32,
    dump_time: i64,
    time_bucket: i64,
    /// The stack as a JSON array of frame strings, queryable with `json_each`.
    stack_json: String,
}

/// A profiled segment as the writer thread inserts it.
struct SqliteProfiledSegmentRow {
    segment_id: String,
    trace_id: String,
    service: String,
    instance: String,
    endpoint: String,
    start_time: i64,
    end_time: i64,
    duration: i64,
    is_error: bool,
    time_bucket: i64,
    /// The spans as a JSON array of span objects, queryable with `json_each`.
    spans_json: String,
}

#[async_trait]
impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|connection| connection.query_row("SELECT 1", [], |_| Ok(())))
            .await
    }

    async fn insert_task(&self, task: &Task) -> Result<(), StoreError> {
        let task = task.clone();
        self.write(move |connection| {
            connection.execute(
                "INSERT INTO profile_task (id, service, endpoint_name, start_time, duration, \
                 min_duration_threshold, dump_period, max_sampling_count, create_time, end_time, \
                 time_bucket) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    task.id,
                    task.service,
                    task.endpoint_name,
                    task.start_time,
                    task.duration,
                    task.min_duration_threshold,
                    task.dump_period,
                    task.max_sampling_count,
                    task.create_time,
                    task.end_time(),
                    task.time_bucket(),
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn get_task(&self, id: &str) -> Result<Option<Task>, StoreError> {
        let id = id.to_string();
        self.read(move |connection| {
            connection
                .prepare_cached(&format!(
                    "SELECT {TASK_COLUMNS} FROM profile_task WHERE id = ?1"
                ))?
                .query_row([id], task_from_row)
                .optional()
        })
        .await
    }

    async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<Task>, StoreError> {
        let filter = filter.clone();
        self.read(move |connection| {
            query_tasks(
                connection,
                &format!(
                    "SELECT {TASK_COLUMNS} FROM profile_task \
                     WHERE (?1 IS NULL OR service = ?1) AND (?2 IS NULL OR endpoint_name = ?2) \
                     ORDER BY create_time DESC, id"
                ),
                &[&filter.service, &filter.endpoint_name],
            )
        })
        .await
    }

    async fn overlapping_tasks(
        &self,
        service: &str,
        start_time: i64,
        end_time: i64,
    ) -> Result<Vec<Task>, StoreError> {
        let service = service.to_string();
        self.read(move |connection| {
            query_tasks(
                connection,
                &format!(
                    "SELECT {TASK_COLUMNS} FROM profile_task \
                     WHERE service = ?1 AND start_time <= ?3 AND end_time >= ?2"
                ),
                &[&service, &start_time, &end_time],
            )
        })
        .await
    }

    async fn unfinished_tasks(&self, now_ms: i64) -> Result<Vec<Task>, StoreError> {
        self.read(move |connection| {
            query_tasks(
                connection,
                &format!(
                    "SELECT {TASK_COLUMNS} FROM profile_task WHERE end_time >= ?1 \
                     ORDER BY service, create_time"
                ),
                &[&now_ms],
            )
        })
        .await
    }

    async fn insert_task_logs(&self, logs: &[TaskLog]) -> Result<(), StoreError> {
        self.insert_rows(
            "INSERT OR IGNORE INTO profile_task_log (task_id, instance, operation, \
             operation_name, service, operation_time, time_bucket) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            logs.to_vec(),
            |statement, log| {
                statement.execute(params![
                    log.task_id,
                    log.instance,
                    log.operation.code(),
                    log.operation.name(),
                    log.service,
                    log.operation_time,
                    log.time_bucket,
                ])
            },
        )
        .await
    }

    async fn task_logs(&self, task_id: &str) -> Result<Vec<TaskLog>, StoreError> {
        let task_id = task_id.to_string();
        self.read(move |connection| {
            let mut statement = connection.prepare_cached(
                "SELECT task_id, service, instance, operation, operation_time, time_bucket \
                 FROM profile_task_log WHERE task_id = ?1 ORDER BY operation_time, instance, operation",
            )?;
            let rows = statement.query_map([task_id], |row| {
                let code: i64 = row.get(3)?;
                let operation = Operation::from_code(code).ok_or_else(|| {
                    rusqlite::Error::IntegralValueOutOfRange(3, code)
                })?;
                Ok(TaskLog {
                    task_id: row.get(0)?,
                    service: row.get(1)?,
                    instance: row.get(2)?,
                    operation,
                    operation_time: row.get(4)?,
                    time_bucket: row.get(5)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn insert_snapshots(&self, snapshots: &[SnapshotRecord]) -> Result<(), StoreError> {
        // Encode outside the writer lock: only the inserts hold it. The writer thread
        // needs owned rows; the stack goes over as its JSON text, not as forty strings.
        let rows: Vec<SqliteSnapshotRow> = snapshots
            .iter()
            .map(|snapshot| SqliteSnapshotRow {
                task_id: snapshot.task_id.clone(),
                segment_id: snapshot.segment_id.clone(),
                sequence: snapshot.sequence,
                dump_time: snapshot.dump_time,
                time_bucket: snapshot.time_bucket(),
                stack_json: serde_json::to_string(&snapshot.stack).expect("strings serialise"),
            })
            .collect();
        self.insert_rows(
            "INSERT OR IGNORE INTO profile_thread_snapshot \
             (task_id, segment_id, sequence, dump_time, time_bucket, stack) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            rows,
            |statement, row| {
                statement.execute(params![
                    row.task_id,
                    row.segment_id,
                    row.sequence,
                    row.dump_time,
                    row.time_bucket,
                    row.stack_json,
                ])
            },
        )
        .await
    }

    async fn task_segments(&self, task_id: &str) -> Result<Vec<SegmentSummary>, StoreError> {
        let task_id = task_id.to_string();
        self.read(move |connection| {
            // The trace fields come from the kept segment, when there is one.
            let mut statement = connection.prepare_cached(
                "SELECT s.segment_id, s.snapshot_count, s.first_dump_time, s.last_dump_time, \
                 p.trace_id, p.endpoint, p.start_time, p.duration, p.is_error \
                 FROM (SELECT segment_id, COUNT(*) AS snapshot_count, \
                       MIN(dump_time) AS first_dump_time, MAX(dump_time) AS last_dump_time \
                       FROM profile_thread_snapshot WHERE task_id = ?1 GROUP BY segment_id) AS s \
                 LEFT JOIN profiled_segment AS p ON p.segment_id = s.segment_id \
                 ORDER BY s.first_dump_time, s.segment_id",
            )?;
            let rows = statement.query_map([task_id], |row| {
                Ok(SegmentSummary {
                    segment_id: row.get(0)?,
                    snapshot_count: row.get(1)?,
                    first_dump_time: row.get(2)?,
                    last_dump_time: row.get(3)?,
                    trace_id: row.get(4)?,
                    endpoint: row.get(5)?,
                    start_time: row.get(6)?,
                    duration: row.get(7)?,
                    is_error: row.get(8)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn segment_snapshots(
        &self,
        segment_id: &str,
        limit: usize,
    ) -> Result<Vec<SnapshotRecord>, StoreError> {
        let segment_id = segment_id.to_string();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |connection| {
            let mut statement = connection.prepare_cached(
                "SELECT task_id, segment_id, sequence, dump_time, stack \
                 FROM profile_thread_snapshot WHERE segment_id = ?1 \
                 ORDER BY sequence, task_id LIMIT ?2",
            )?;
            let rows = statement.query_map(params![segment_id, limit], snapshot_from_row)?;
            rows.collect()
        })
        .await
    }

    async fn count_snapshots(&self, filter: &SnapshotFilter) -> Result<u64, StoreError> {
        let (where_sql, values) = snapshot_where(filter);
        self.read(move |connection| {
            connection
                .prepare_cached(&format!(
                    "SELECT COUNT(*) FROM profile_thread_snapshot {where_sql}"
                ))?
                .query_row(rusqlite::params_from_iter(values.iter()), |row| {
                    row.get::<_, i64>(0)
                })
                .map(|count| count.max(0) as u64)
        })
        .await
    }

    async fn snapshots(
        &self,
        filter: &SnapshotFilter,
        limit: usize,
    ) -> Result<Vec<SnapshotRecord>, StoreError> {
        let (where_sql, mut values) = snapshot_where(filter);
        // The order an index already has: sorting 12,000 rows of 2 KB in a temporary
        // B-tree took 132 ms, reading them in index order 7 ms. With the task and the
        // segment fixed, each is the (task, segment, sequence) order.
        let order = match (&filter.task_id_opt, &filter.segment_id_opt) {
            (Some(_), Some(_)) => "sequence",
            (Some(_), None) => "segment_id, sequence",
            (None, Some(_)) => "sequence, task_id",
            (None, None) => "task_id, segment_id, sequence",
        };
        values.push(rusqlite::types::Value::Integer(
            i64::try_from(limit).unwrap_or(i64::MAX),
        ));
        self.read(move |connection| {
            let mut statement = connection.prepare_cached(&format!(
                "SELECT task_id, segment_id, sequence, dump_time, stack \
                 FROM profile_thread_snapshot {where_sql} ORDER BY {order} LIMIT ?"
            ))?;
            let rows = statement
                .query_map(rusqlite::params_from_iter(values.iter()), snapshot_from_row)?;
            rows.collect()
        })
        .await
    }

    fn stack_counts(
        &self,
        filter: &SnapshotFilter,
    ) -> BoxStream<'static, Result<StackCount, StoreError>> {
        let (sender, receiver) = tokio::sync::mpsc::channel(64);
        let readers = self.readers.clone();
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed);
        let filter = filter.clone();
        tokio::task::spawn_blocking(move || {
            let outcome = with_reader(&readers, start, |connection| {
                count_stacks(connection, &filter, &sender)
            });
            if let Err(error) = outcome {
                let _ = sender.blocking_send(Err(map_error(&error)));
            }
        });
        ReceiverStream::new(receiver).boxed()
    }

    async fn insert_profiled_segments(
        &self,
        segments: &[ProfiledSegment],
    ) -> Result<(), StoreError> {
        // Encoded outside the writer lock, the spans as one JSON text per segment.
        let rows: Vec<SqliteProfiledSegmentRow> = segments
            .iter()
            .map(|segment| SqliteProfiledSegmentRow {
                segment_id: segment.segment_id.clone(),
                trace_id: segment.trace_id.clone(),
                service: segment.service.clone(),
                instance: segment.instance.clone(),
                endpoint: segment.endpoint.clone(),
                start_time: segment.start_time,
                end_time: segment.end_time,
                duration: segment.duration,
                is_error: segment.is_error,
                time_bucket: segment.time_bucket(),
                spans_json: serde_json::to_string(&segment.spans).expect("spans serialise"),
            })
            .collect();
        // A segment sent again replaces the stored one (a later one in the same batch
        // wins, as in ClickHouse).
        self.insert_rows(
            "INSERT OR REPLACE INTO profiled_segment (segment_id, trace_id, service, \
             instance, endpoint, start_time, end_time, duration, is_error, \
             time_bucket, spans) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            rows,
            |statement, row| {
                statement.execute(params![
                    row.segment_id,
                    row.trace_id,
                    row.service,
                    row.instance,
                    row.endpoint,
                    row.start_time,
                    row.end_time,
                    row.duration,
                    row.is_error,
                    row.time_bucket,
                    row.spans_json,
                ])
            },
        )
        .await
    }

    async fn profiled_segment(
        &self,
        segment_id: &str,
    ) -> Result<Option<ProfiledSegment>, StoreError> {
        let segment_id = segment_id.to_string();
        self.read(move |connection| {
            connection
                .prepare_cached(
                    "SELECT segment_id, trace_id, service, instance, endpoint, start_time, \
                     end_time, duration, is_error, spans \
                     FROM profiled_segment WHERE segment_id = ?1",
                )?
                .query_row([segment_id], |row| {
                    let spans: Vec<ProfiledSpan> = serde_json::from_str(row.get_ref(9)?.as_str()?)
                        .map_err(|error| {
                            rusqlite::Error::FromSqlConversionFailure(
                                9,
                                rusqlite::types::Type::Text,
                                Box::new(error),
                            )
                        })?;
                    Ok(ProfiledSegment {
                        segment_id: row.get(0)?,
                        trace_id: row.get(1)?,
                        service: row.get(2)?,
                        instance: row.get(3)?,
                        endpoint: row.get(4)?,
                        start_time: row.get(5)?,
                        end_time: row.get(6)?,
                        duration: row.get(7)?,
                        is_error: row.get(8)?,
                        spans,
                    })
                })
                .optional()
        })
        .await
    }

    async fn segments_with_snapshots(
        &self,
        segment_ids: &[String],
    ) -> Result<Vec<String>, StoreError> {
        let wanted = distinct_in_order(segment_ids);
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        self.read(move |connection| {
            let mut found = std::collections::HashSet::new();
            for chunk in wanted.chunks(SEGMENT_LOOKUP_CHUNK) {
                let placeholders = vec!["?"; chunk.len()].join(", ");
                // Served by the (segment_id, sequence) index. Not cached: the last
                // chunk's length varies.
                let mut statement = connection.prepare(&format!(
                    "SELECT DISTINCT segment_id FROM profile_thread_snapshot \
                     WHERE segment_id IN ({placeholders})"
                ))?;
                let rows = statement
                    .query_map(rusqlite::params_from_iter(chunk.iter()), |row| {
                        row.get::<_, String>(0)
                    })?;
                for row in rows {
                    found.insert(row?);
                }
            }
            Ok(wanted
                .into_iter()
                .filter(|segment_id| found.contains(segment_id))
                .collect())
        })
        .await
    }

    async fn remove_expired(&self, cutoff_ms: i64) -> Result<u64, StoreError> {
        let minute_cutoff = minute_bucket(cutoff_ms);
        let second_cutoff = second_bucket(cutoff_ms);
        let mut removed = 0;
        let tables = [
            (
                "profile_thread_snapshot",
                "task_id, segment_id, sequence",
                second_cutoff,
            ),
            (
                "profile_task_log",
                "task_id, instance, operation",
                second_cutoff,
            ),
            ("profile_task", "id", minute_cutoff),
            ("profiled_segment", "segment_id", second_cutoff),
        ];
        for (table, key, cutoff_bucket) in tables {
            // One writer-lock hold per table pass; each chunk is its own statement.
            removed += self
                .write(move |connection| delete_in_chunks(connection, table, key, cutoff_bucket))
                .await?;
        }
        Ok(removed)
    }
}

/// The ids once each, in the order first given.
fn distinct_in_order(segment_ids: &[String]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    segment_ids
        .iter()
        .filter(|segment_id| seen.insert(segment_id.as_str()))
        .cloned()
        .collect()
}

/// Deletes expired rows of one table chunk by chunk; answers the rows deleted.
fn delete_in_chunks(
    connection: &mut Connection,
    table: &str,
    key: &str,
    cutoff_bucket: i64,
) -> rusqlite::Result<u64> {
    let sql = format!(
        "DELETE FROM {table} WHERE ({key}) IN \
         (SELECT {key} FROM {table} WHERE time_bucket < ?1 LIMIT ?2)"
    );
    let mut removed = 0;
    loop {
        let deleted = connection.execute(&sql, params![cutoff_bucket, RETENTION_CHUNK_ROWS])?;
        removed += deleted as u64;
        if (deleted as i64) < RETENTION_CHUNK_ROWS {
            return Ok(removed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("sub/skysnap.db"), 2).unwrap();
        (dir, store)
    }

    fn task(id: &str, service: &str, start_time: i64, create_time: i64) -> Task {
        Task {
            id: id.into(),
            service: service.into(),
            endpoint_name: "/e".into(),
            start_time,
            duration: 5,
            min_duration_threshold: 0,
            dump_period: 10,
            max_sampling_count: 5,
            create_time,
        }
    }

    fn snapshot(task: &str, segment: &str, sequence: i32) -> SnapshotRecord {
        SnapshotRecord {
            task_id: task.into(),
            segment_id: segment.into(),
            sequence,
            dump_time: 1_000 + i64::from(sequence),
            stack: vec!["a.main:1".into(), format!("b.run:{sequence}")],
        }
    }

    #[tokio::test]
    async fn test_sqlite_snapshot_dedup_by_key() {
        let (_dir, store) = store();
        store
            .insert_snapshots(&[
                snapshot("t", "s", 0),
                snapshot("t", "s", 1),
                snapshot("t", "s", 1),
            ])
            .await
            .unwrap();
        store
            .insert_snapshots(&[snapshot("t", "s", 0)])
            .await
            .unwrap();
        let rows = store.segment_snapshots("s", 100).await.unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[1].stack,
            vec!["a.main:1".to_string(), "b.run:1".to_string()]
        );
        let segments = store.task_segments("t").await.unwrap();
        assert_eq!(segments.len(), 1);
        assert_eq!(segments[0].snapshot_count, 2);
        assert_eq!(
            (segments[0].first_dump_time, segments[0].last_dump_time),
            (1_000, 1_001)
        );
    }

    #[tokio::test]
    async fn test_sqlite_error_classes_row_refused_or_store_unusable() {
        let (dir, store) = store();
        let admin = rusqlite::Connection::open(dir.path().join("sub/skysnap.db")).unwrap();
        // A rule that refuses one row: that row is rejected, others pass.
        admin
            .execute_batch(
                "CREATE TRIGGER refuse BEFORE INSERT ON profile_thread_snapshot \
                 WHEN NEW.segment_id = 'bad' BEGIN SELECT RAISE(ABORT, 'refused'); END;",
            )
            .unwrap();
        let refused = store
            .insert_snapshots(&[snapshot("t", "bad", 0)])
            .await
            .unwrap_err();
        assert!(matches!(refused, StoreError::Rejected(_)), "{refused:?}");
        assert!(!refused.is_retriable());
        store
            .insert_snapshots(&[snapshot("t", "good", 0)])
            .await
            .unwrap();
        // A missing table: nothing can be stored until it is back, so it is retried.
        admin
            .execute_batch("DROP TABLE profile_thread_snapshot")
            .unwrap();
        let unusable = store
            .insert_snapshots(&[snapshot("t", "good", 1)])
            .await
            .unwrap_err();
        assert!(matches!(unusable, StoreError::Unusable(_)), "{unusable:?}");
        assert!(unusable.is_retriable());
    }

    #[test]
    fn test_sqlite_synchronous_level_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        for (level, pragma_value) in [
            (SqliteSynchronous::Off, 0),
            (SqliteSynchronous::Normal, 1),
            (SqliteSynchronous::Full, 2),
        ] {
            let connection = open_connection(&path, Duration::from_secs(1), level).unwrap();
            let value: i64 = connection
                .query_row("PRAGMA synchronous", [], |row| row.get(0))
                .unwrap();
            assert_eq!(value, pragma_value, "{level:?}");
        }
    }

    #[tokio::test]
    async fn test_sqlite_task_log_dedup_by_key() {
        let (_dir, store) = store();
        let t = task("t", "svc", 1_000, 1_000);
        let log = TaskLog::new(&t, "i1", Operation::Notified, 5);
        store
            .insert_task_logs(&[log.clone(), log.clone()])
            .await
            .unwrap();
        store
            .insert_task_logs(std::slice::from_ref(&log))
            .await
            .unwrap();
        let finished = TaskLog::new(&t, "i1", Operation::ExecutionFinished, 6);
        store.insert_task_logs(&[finished]).await.unwrap();
        let logs = store.task_logs("t").await.unwrap();
        assert_eq!(logs.len(), 2);
        assert_eq!(logs[0], log);
        assert_eq!(logs[1].operation, Operation::ExecutionFinished);
    }

    #[tokio::test]
    async fn test_sqlite_task_queries() {
        let (_dir, store) = store();
        store.insert_task(&task("a", "svc", 0, 10)).await.unwrap();
        store
            .insert_task(&task("b", "svc", 600_000, 20))
            .await
            .unwrap();
        store.insert_task(&task("c", "other", 0, 30)).await.unwrap();
        assert!(store.insert_task(&task("a", "svc", 0, 10)).await.is_err());

        let all = store.list_tasks(&TaskFilter::default()).await.unwrap();
        let ids: Vec<_> = all.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["c", "b", "a"]);
        let svc = store
            .list_tasks(&TaskFilter {
                service: Some("svc".into()),
                endpoint_name: Some("/e".into()),
            })
            .await
            .unwrap();
        assert_eq!(svc.len(), 2);

        assert_eq!(
            store.get_task("b").await.unwrap().unwrap().start_time,
            600_000
        );
        assert!(store.get_task("zz").await.unwrap().is_none());

        // "a" runs [0, 300000]; "b" runs [600000, 900000].
        let overlap = store
            .overlapping_tasks("svc", 300_000, 400_000)
            .await
            .unwrap();
        assert_eq!(overlap.len(), 1);
        assert!(store
            .overlapping_tasks("svc", 300_001, 599_999)
            .await
            .unwrap()
            .is_empty());

        let unfinished = store.unfinished_tasks(300_001).await.unwrap();
        assert_eq!(unfinished.len(), 1);
        assert_eq!(unfinished[0].id, "b");
        store.ping().await.unwrap();
    }
}
