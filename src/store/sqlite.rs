//! The embedded store: one SQLite file in WAL mode. Writes go through one connection,
//! reads through a small pool, and every call runs on a blocking thread so that no
//! async thread waits on the disk.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lru::LruCache;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension};
use std::num::NonZeroUsize;

use futures::stream::{BoxStream, StreamExt as _};
use tokio_stream::wrappers::ReceiverStream;

use super::{FilterValue, SnapshotFilter, StackCount, Store, StoreError, TaskFilter};
use crate::config::SqliteSynchronous;
use crate::model::{
    minute_bucket, second_bucket, Operation, ProfiledSegment, ProfiledSpan, SegmentSummary,
    SnapshotRecord, Stack, StackId, Task, TaskLog,
};

/// Segment ids one `IN (…)` look-up carries at most (SQLite allows 32,766 parameters;
/// smaller statements keep each look-up short).
const SEGMENT_LOOKUP_CHUNK: usize = 500;

/// Rows one retention statement deletes at most, so writers never wait long.
const RETENTION_CHUNK_ROWS: i64 = 10_000;

/// Tables, keys and indexes. A profiled segment's spans are a JSON array of span objects
/// and a stack a JSON array of frames, so that `sqlite3` shows them and `json_each` can
/// query them; a segment is one row, so it is never stored half.
///
/// Snapshots are stored as a dictionary, as pprof, Pyroscope and Parca store stacks:
/// each distinct stack once in `profile_stack`, each (task, segment) once in
/// `profile_segment_task`, and each dump as four integers in `profile_snapshot`,
/// keyed by (segment, sequence) in a WITHOUT ROWID table (a row is about 20 bytes). The
/// view `profile_thread_snapshot` joins them back into the rows earlier releases stored,
/// so that SQL written for those still runs. A stack's and a segment's `last_day` is the
/// latest day (yyyyMMdd) of a snapshot that refers to it: retention removes it only
/// after every such snapshot.
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

CREATE TABLE IF NOT EXISTS profile_stack (
    stack_pk INTEGER PRIMARY KEY,
    stack_id BLOB NOT NULL UNIQUE,
    last_day INTEGER NOT NULL,
    frames   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS profile_stack_by_day ON profile_stack (last_day);

CREATE TABLE IF NOT EXISTS profile_segment_task (
    segment_pk INTEGER PRIMARY KEY,
    task_id    TEXT NOT NULL,
    segment_id TEXT NOT NULL,
    first_day  INTEGER NOT NULL,
    last_day   INTEGER NOT NULL,
    UNIQUE (task_id, segment_id)
);
CREATE INDEX IF NOT EXISTS profile_segment_task_by_segment
    ON profile_segment_task (segment_id, task_id);
CREATE INDEX IF NOT EXISTS profile_segment_task_by_first_day
    ON profile_segment_task (first_day);
CREATE INDEX IF NOT EXISTS profile_segment_task_by_last_day
    ON profile_segment_task (last_day);

CREATE TABLE IF NOT EXISTS profile_snapshot (
    segment_pk INTEGER NOT NULL,
    sequence   INTEGER NOT NULL,
    dump_time  INTEGER NOT NULL,
    stack_pk   INTEGER NOT NULL,
    PRIMARY KEY (segment_pk, sequence)
) WITHOUT ROWID;

CREATE VIEW IF NOT EXISTS profile_thread_snapshot AS
SELECT g.task_id AS task_id, g.segment_id AS segment_id, s.sequence AS sequence,
       s.dump_time AS dump_time,
       CAST(strftime('%Y%m%d%H%M%S', s.dump_time / 1000, 'unixepoch') AS INTEGER) AS time_bucket,
       k.frames AS stack, hex(k.stack_id) AS stack_id
FROM profile_snapshot AS s
JOIN profile_segment_task AS g ON g.segment_pk = s.segment_pk
JOIN profile_stack AS k ON k.stack_pk = s.stack_pk;

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
    writer: Arc<Mutex<Writer>>,
    readers: Arc<Vec<Mutex<Connection>>>,
    /// Round-robin start for picking a reader.
    next_reader: AtomicUsize,
}

/// Stacks and segments the writer remembers having written, at most each.
const INTERNED_STACKS: usize = 100_000;
const INTERNED_SEGMENTS: usize = 100_000;

/// The one writing connection and what it remembers of the dictionary: the integer key
/// of each stack and segment it wrote and the days it wrote them for, so that a known
/// stack costs no statement. Only what a committed transaction wrote is remembered.
struct Writer {
    connection: Connection,
    stacks: LruCache<StackId, InternedStack>,
    segments: LruCache<(String, String), InternedSegment>,
}

#[derive(Debug, Clone, Copy)]
struct InternedStack {
    stack_pk: i64,
    last_day: i64,
}

#[derive(Debug, Clone, Copy)]
struct InternedSegment {
    segment_pk: i64,
    first_day: i64,
    last_day: i64,
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

fn lock<T>(connection: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
        let earlier_layout =
            set_aside_earlier_layout(&writer).map_err(|error| map_error(&error))?;
        writer
            .execute_batch(SCHEMA)
            .map_err(|error| map_error(&error))?;
        let mut writer = Writer {
            connection: writer,
            stacks: LruCache::new(NonZeroUsize::new(INTERNED_STACKS).expect("above zero")),
            segments: LruCache::new(NonZeroUsize::new(INTERNED_SEGMENTS).expect("above zero")),
        };
        if earlier_layout {
            migrate_earlier_layout(&mut writer).map_err(|error| map_error(&error))?;
        }
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
            let mut writer = lock(&writer);
            work(&mut writer.connection).map_err(|error| map_error(&error))
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

/// Counts the matching snapshots per stack in SQL (a GROUP BY of integer keys), then
/// reads each distinct stack's frames once and hands it to `sender`. Stops early when
/// the receiver is gone.
fn count_stacks(
    connection: &Connection,
    filter: &SnapshotFilter,
    sender: &tokio::sync::mpsc::Sender<Result<StackCount, StoreError>>,
) -> rusqlite::Result<()> {
    let (where_sql, values) = snapshot_where(filter);
    let mut statement = connection.prepare(&format!(
        "SELECT k.frames, c.count FROM \
         (SELECT s.stack_pk AS stack_pk, COUNT(*) AS count \
          FROM profile_snapshot AS s \
          JOIN profile_segment_task AS g ON g.segment_pk = s.segment_pk \
          {where_sql} GROUP BY s.stack_pk) AS c \
         JOIN profile_stack AS k ON k.stack_pk = c.stack_pk"
    ))?;
    let mut rows = statement.query(rusqlite::params_from_iter(values.iter()))?;
    while let Some(row) = rows.next()? {
        let stack = parse_stack(row.get_ref(0)?.as_str()?)?;
        let count: i64 = row.get(1)?;
        let counted = StackCount {
            stack,
            count: count.max(0) as u64,
        };
        // A caller that went away (a closed HTTP request) stops the scan.
        if sender.blocking_send(Ok(counted)).is_err() {
            return Ok(());
        }
    }
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
        stack: stack.into(),
        encoded: None,
    })
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
        if snapshots.is_empty() {
            return Ok(());
        }
        // Hashing and JSON outside the writer lock: only the statements hold it.
        let batch = SnapshotBatch::new(snapshots);
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || {
            let mut writer = lock(&writer);
            write_snapshot_batch(&mut writer, &batch, |_| Ok(())).map_err(|error| map_error(&error))
        })
        .await
        .map_err(|error| StoreError::Unavailable(format!("sqlite writer thread failed: {error}")))?
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
        let filter = SnapshotFilter {
            segment_id_opt: Some(segment_id.to_string()),
            ..SnapshotFilter::default()
        };
        self.snapshots(&filter, limit).await
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
        let (where_sql, values) = snapshot_where(filter);
        // The order the keys already have: sorting 12,000 rows of 2 KB in a temporary
        // B-tree took 132 ms, reading them in key order 7 ms. With the task fixed, the
        // keys give (segment, sequence); with a segment alone they give (task, sequence),
        // which SQLite cannot tell from the join, so those rows are read as they come
        // (at most 2 × limit + 1) and ordered here; a segment with more falls back to
        // SQL's ORDER BY.
        let order = match (&filter.task_id_opt, &filter.segment_id_opt) {
            (Some(_), Some(_)) => "sequence",
            (Some(_), None) => "segment_id, sequence",
            (None, Some(_)) => "sequence, task_id",
            (None, None) => "task_id, segment_id, sequence",
        };
        let sort_here = filter.task_id_opt.is_none() && filter.segment_id_opt.is_some();
        let cap = if sort_here {
            limit.saturating_mul(2).saturating_add(1)
        } else {
            limit
        };
        let query = move |order_sql: &str, rows_at_most: usize| {
            let mut values = values.clone();
            values.push(rusqlite::types::Value::Integer(
                i64::try_from(rows_at_most).unwrap_or(i64::MAX),
            ));
            let sql = format!(
                "SELECT task_id, segment_id, sequence, dump_time, stack \
                 FROM profile_thread_snapshot {where_sql} {order_sql} LIMIT ?"
            );
            (sql, values)
        };
        let (first_sql, first_values) = if sort_here {
            query("", cap)
        } else {
            query(&format!("ORDER BY {order}"), cap)
        };
        let mut rows = self
            .read(move |connection| {
                let mut statement = connection.prepare_cached(&first_sql)?;
                let rows = statement.query_map(
                    rusqlite::params_from_iter(first_values.iter()),
                    snapshot_from_row,
                )?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        if !sort_here {
            return Ok(rows);
        }
        if rows.len() < cap {
            rows.sort_by(|a, b| (a.sequence, &a.task_id).cmp(&(b.sequence, &b.task_id)));
            rows.truncate(limit);
            return Ok(rows);
        }
        let (sql, values) = query("ORDER BY sequence, task_id", limit);
        self.read(move |connection| {
            let mut statement = connection.prepare_cached(&sql)?;
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
                // Served by the segment index. Not cached: the last chunk's length
                // varies.
                let mut statement = connection.prepare(&format!(
                    "SELECT DISTINCT segment_id FROM profile_segment_task \
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
        let cutoff_day = second_cutoff / 1_000_000;
        // Snapshots by their dump's second, as their time bucket says; then the
        // segments and stacks whose latest snapshot day has passed, which no kept
        // snapshot can refer to any more.
        let first_kept_ms = cutoff_ms - cutoff_ms.rem_euclid(1_000);
        let mut removed = self
            .write(move |connection| {
                delete_chunks(
                    connection,
                    "DELETE FROM profile_snapshot WHERE (segment_pk, sequence) IN \
                     (SELECT s.segment_pk, s.sequence FROM profile_segment_task AS g \
                      JOIN profile_snapshot AS s ON s.segment_pk = g.segment_pk \
                      WHERE g.first_day <= ?1 AND s.dump_time < ?2 LIMIT ?3)",
                    params![cutoff_day, first_kept_ms, RETENTION_CHUNK_ROWS],
                )
            })
            .await?;
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || {
            let mut writer = lock(&writer);
            let dictionary = ["profile_segment_task", "profile_stack"]
                .into_iter()
                .map(|table| {
                    let key = if table == "profile_stack" {
                        "stack_pk"
                    } else {
                        "segment_pk"
                    };
                    delete_chunks(
                        &mut writer.connection,
                        &format!(
                            "DELETE FROM {table} WHERE {key} IN \
                             (SELECT {key} FROM {table} WHERE last_day < ?1 LIMIT ?2)"
                        ),
                        params![cutoff_day, RETENTION_CHUNK_ROWS],
                    )
                })
                .sum::<rusqlite::Result<u64>>()
                .map_err(|error| map_error(&error))?;
            if dictionary > 0 {
                // A remembered key may be one just deleted: forget them all.
                writer.stacks.clear();
                writer.segments.clear();
            }
            Ok::<u64, StoreError>(dictionary)
        })
        .await
        .map_err(|error| {
            StoreError::Unavailable(format!("sqlite writer thread failed: {error}"))
        })??;
        let tables = [
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

/// A batch of snapshots ready for the writer: each distinct stack and segment once,
/// with the days its rows need it for, and each row as indices into them. Built outside
/// the writer lock; a stack's frames are turned into JSON once per batch.
struct SnapshotBatch {
    stacks: Vec<BatchStack>,
    segments: Vec<BatchSegment>,
    rows: Vec<BatchRow>,
}

struct BatchStack {
    stack_id: StackId,
    /// The latest day of a row of this batch that refers to it.
    day: i64,
    /// Written out as JSON only if the store does not have it for `day` yet.
    stack: Stack,
}

struct BatchSegment {
    task_id: String,
    segment_id: String,
    first_day: i64,
    last_day: i64,
}

struct BatchRow {
    segment: usize,
    stack: usize,
    sequence: i32,
    dump_time: i64,
}

impl SnapshotBatch {
    fn new(snapshots: &[SnapshotRecord]) -> SnapshotBatch {
        let mut stacks: Vec<BatchStack> = Vec::new();
        let mut segments: Vec<BatchSegment> = Vec::new();
        let mut stack_index: std::collections::HashMap<StackId, usize> = Default::default();
        let mut segment_index: std::collections::HashMap<(&str, &str), usize> = Default::default();
        let mut rows = Vec::with_capacity(snapshots.len());
        for snapshot in snapshots {
            let day = snapshot.day();
            let stack_id = snapshot.stack_id();
            let stack = *stack_index.entry(stack_id).or_insert_with(|| {
                stacks.push(BatchStack {
                    stack_id,
                    day,
                    stack: snapshot.stack.clone(),
                });
                stacks.len() - 1
            });
            stacks[stack].day = stacks[stack].day.max(day);
            let key = (snapshot.task_id.as_str(), snapshot.segment_id.as_str());
            let segment = *segment_index.entry(key).or_insert_with(|| {
                segments.push(BatchSegment {
                    task_id: snapshot.task_id.clone(),
                    segment_id: snapshot.segment_id.clone(),
                    first_day: day,
                    last_day: day,
                });
                segments.len() - 1
            });
            let entry = &mut segments[segment];
            entry.first_day = entry.first_day.min(day);
            entry.last_day = entry.last_day.max(day);
            rows.push(BatchRow {
                segment,
                stack,
                sequence: snapshot.sequence,
                dump_time: snapshot.dump_time,
            });
        }
        SnapshotBatch {
            stacks,
            segments,
            rows,
        }
    }
}

/// Writes a batch in one transaction: the stacks and segments the writer does not know
/// for these days (an upsert that keeps the latest day, answering the integer key),
/// then one row per snapshot, then `also` (the migration deletes what it moved). A
/// re-sent snapshot keeps its first row.
fn write_snapshot_batch(
    writer: &mut Writer,
    batch: &SnapshotBatch,
    also: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<()>,
) -> rusqlite::Result<()> {
    let Writer {
        connection,
        stacks: known_stacks,
        segments: known_segments,
    } = writer;
    let transaction = connection.transaction()?;
    let mut stack_pks = Vec::with_capacity(batch.stacks.len());
    let mut segment_pks = Vec::with_capacity(batch.segments.len());
    let mut learned_stacks = Vec::new();
    let mut learned_segments = Vec::new();
    {
        let mut upsert_stack = transaction.prepare_cached(
            "INSERT INTO profile_stack (stack_id, last_day, frames) VALUES (?1, ?2, ?3) \
             ON CONFLICT (stack_id) DO UPDATE SET last_day = max(last_day, excluded.last_day) \
             RETURNING stack_pk, last_day",
        )?;
        for stack in &batch.stacks {
            match known_stacks.get(&stack.stack_id) {
                Some(known) if known.last_day >= stack.day => stack_pks.push(known.stack_pk),
                _ => {
                    let interned = upsert_stack.query_row(
                        params![
                            &stack.stack_id.0[..],
                            stack.day,
                            serde_json::to_string(&stack.stack).expect("strings serialise")
                        ],
                        |row| {
                            Ok(InternedStack {
                                stack_pk: row.get(0)?,
                                last_day: row.get(1)?,
                            })
                        },
                    )?;
                    stack_pks.push(interned.stack_pk);
                    learned_stacks.push((stack.stack_id, interned));
                }
            }
        }
        let mut upsert_segment = transaction.prepare_cached(
            "INSERT INTO profile_segment_task (task_id, segment_id, first_day, last_day) \
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT (task_id, segment_id) DO UPDATE SET \
             first_day = min(first_day, excluded.first_day), \
             last_day = max(last_day, excluded.last_day) \
             RETURNING segment_pk, first_day, last_day",
        )?;
        for segment in &batch.segments {
            let key = (segment.task_id.clone(), segment.segment_id.clone());
            match known_segments.get(&key) {
                Some(known)
                    if known.first_day <= segment.first_day
                        && known.last_day >= segment.last_day =>
                {
                    segment_pks.push(known.segment_pk)
                }
                _ => {
                    let interned = upsert_segment.query_row(
                        params![
                            segment.task_id,
                            segment.segment_id,
                            segment.first_day,
                            segment.last_day
                        ],
                        |row| {
                            Ok(InternedSegment {
                                segment_pk: row.get(0)?,
                                first_day: row.get(1)?,
                                last_day: row.get(2)?,
                            })
                        },
                    )?;
                    segment_pks.push(interned.segment_pk);
                    learned_segments.push((key, interned));
                }
            }
        }
        let mut insert = transaction.prepare_cached(
            "INSERT OR IGNORE INTO profile_snapshot (segment_pk, sequence, dump_time, stack_pk) \
             VALUES (?1, ?2, ?3, ?4)",
        )?;
        for row in &batch.rows {
            insert.execute(params![
                segment_pks[row.segment],
                row.sequence,
                row.dump_time,
                stack_pks[row.stack]
            ])?;
        }
    }
    also(&transaction)?;
    transaction.commit()?;
    // Keys of a transaction that rolled back would not exist: remembered after commit.
    for (stack_id, interned) in learned_stacks {
        known_stacks.put(stack_id, interned);
    }
    for (key, interned) in learned_segments {
        known_segments.put(key, interned);
    }
    Ok(())
}

/// The snapshot table of earlier releases (one row per snapshot, its stack as JSON text):
/// renamed aside, before the schema creates the view under its name. Answers whether
/// there are rows to migrate (also after a migration that a crash interrupted).
fn set_aside_earlier_layout(connection: &Connection) -> rusqlite::Result<bool> {
    let kind: Option<String> = connection
        .query_row(
            "SELECT type FROM sqlite_master WHERE name = 'profile_thread_snapshot'",
            [],
            |row| row.get(0),
        )
        .optional()?;
    if kind.as_deref() == Some("table") {
        connection.execute_batch(
            "ALTER TABLE profile_thread_snapshot RENAME TO profile_thread_snapshot_v1",
        )?;
    }
    let aside: Option<String> = connection
        .query_row(
            "SELECT name FROM sqlite_master WHERE name = 'profile_thread_snapshot_v1'",
            [],
            |row| row.get(0),
        )
        .optional()?;
    Ok(aside.is_some())
}

/// Rows of the earlier layout moved per transaction.
const MIGRATION_CHUNK_ROWS: i64 = 10_000;

/// Moves the earlier layout's snapshots into the dictionary, a chunk per transaction
/// (each chunk written and deleted from the old table together, so a crash loses
/// nothing and the next start goes on), then drops the old table.
fn migrate_earlier_layout(writer: &mut Writer) -> rusqlite::Result<()> {
    let total: i64 = writer.connection.query_row(
        "SELECT COUNT(*) FROM profile_thread_snapshot_v1",
        [],
        |row| row.get(0),
    )?;
    tracing::info!(
        snapshots = total,
        "sqlite: moving the snapshots of the earlier layout into the stack dictionary"
    );
    let mut moved = 0i64;
    loop {
        let chunk: Vec<(i64, SnapshotRecord)> = {
            let mut statement = writer.connection.prepare_cached(
                "SELECT rowid, task_id, segment_id, sequence, dump_time, stack \
                 FROM profile_thread_snapshot_v1 ORDER BY rowid LIMIT ?1",
            )?;
            let rows = statement.query_map([MIGRATION_CHUNK_ROWS], |row| {
                Ok((
                    row.get(0)?,
                    SnapshotRecord {
                        task_id: row.get(1)?,
                        segment_id: row.get(2)?,
                        sequence: row.get(3)?,
                        dump_time: row.get(4)?,
                        stack: parse_stack(row.get_ref(5)?.as_str()?)?.into(),
                        encoded: None,
                    },
                ))
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let Some(&(last_rowid, _)) = chunk.last() else {
            break;
        };
        let records: Vec<SnapshotRecord> = chunk.into_iter().map(|(_, record)| record).collect();
        let batch = SnapshotBatch::new(&records);
        // The chunk's delete rides in the same transaction as its inserts.
        write_snapshot_batch(writer, &batch, |transaction| {
            transaction
                .execute(
                    "DELETE FROM profile_thread_snapshot_v1 WHERE rowid <= ?1",
                    [last_rowid],
                )
                .map(|_| ())
        })?;
        moved += records.len() as i64;
        tracing::info!(moved, of = total, "sqlite: migrating snapshots");
    }
    writer
        .connection
        .execute_batch("DROP TABLE profile_thread_snapshot_v1")?;
    tracing::info!(
        snapshots = moved,
        "sqlite: earlier layout migrated and dropped"
    );
    Ok(())
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

/// Runs a chunked DELETE (its last parameter the chunk size) until a chunk comes back
/// short; answers the rows deleted.
fn delete_chunks(
    connection: &mut Connection,
    sql: &str,
    parameters: &[&dyn rusqlite::ToSql],
) -> rusqlite::Result<u64> {
    let mut removed = 0;
    loop {
        let deleted = connection.execute(sql, parameters)?;
        removed += deleted as u64;
        if (deleted as i64) < RETENTION_CHUNK_ROWS {
            return Ok(removed);
        }
    }
}

/// Deletes expired rows of one table chunk by chunk; answers the rows deleted.
fn delete_in_chunks(
    connection: &mut Connection,
    table: &str,
    key: &str,
    cutoff_bucket: i64,
) -> rusqlite::Result<u64> {
    delete_chunks(
        connection,
        &format!(
            "DELETE FROM {table} WHERE ({key}) IN \
             (SELECT {key} FROM {table} WHERE time_bucket < ?1 LIMIT ?2)"
        ),
        params![cutoff_bucket, RETENTION_CHUNK_ROWS],
    )
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
            stack: vec!["a.main:1".to_string(), format!("b.run:{sequence}")].into(),
            encoded: None,
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
                "CREATE TRIGGER refuse BEFORE INSERT ON profile_snapshot \
                 WHEN (SELECT segment_id FROM profile_segment_task \
                       WHERE segment_pk = NEW.segment_pk) = 'bad' \
                 BEGIN SELECT RAISE(ABORT, 'refused'); END;",
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
        admin.execute_batch("DROP TABLE profile_snapshot").unwrap();
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
