//! The "ClickHouse limit" baseline: raw RowBinary INSERTs over HTTP with the
//! `clickhouse` crate, of the same snapshots skysnap stores, as full rows (frames in the
//! row, the layout before the stack dictionary, table `raw_thread_snapshot`),
//! with no gRPC and no skysnap pipeline in the way.
//!
//! The snapshots come from the load generator's own functions (`skysnap::load`), are
//! generated before the clock starts, and are written through a borrowing row type, so
//! the timed part is the INSERT cost alone: `--concurrency` tasks each repeat
//! `INSERT` of `--batch` rows until `--seconds` are up.
//!
//!   cargo run --release --example raw_clickhouse -- --seconds 5 --json
//!
//! The database is created with skysnap's DDL for the server's version
//! (`ClickHouseStore::connect`, which renders `schemas/clickhouse.sql` for it) and the
//! full-row table next to it; the table is truncated first unless `--keep`.
//!
//! The pre-generated rows are reused cyclically, so keys repeat across INSERTs; the
//! table is a ReplacingMergeTree, so background merges collapse the repeats. The
//! on-disk figures (`bytes_on_disk`, `rows_on_disk` from `system.parts`, active parts,
//! read as-is right after the run) are therefore per row still on disk, which can be
//! fewer than the rows inserted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use prost::Message as _;
use skysnap::config::{ClickHouseConfig, RetentionConfig};
use skysnap::load::{frame_pool, segment_snapshots};
use skysnap::load_stacks::{RealisticShape, Rng, StackMix};
use skysnap::model::{second_bucket, Stack};
use skysnap::proto::v3::ThreadSnapshot;
use skysnap::store::clickhouse::{ClickHouseStore, SnapshotInsertRow as Row};

/// The full-row layout of skysnap before the stack dictionary (one row per snapshot, its
/// frames in the row): what a raw INSERT of the same rows costs, as the reference the
/// dictionary has to beat.
const TABLE: &str = "raw_thread_snapshot";

fn full_row_ddl(modern: bool) -> String {
    let (delta, frames) = if modern {
        (" CODEC(Delta, ZSTD(1))", " CODEC(ZSTD(3))")
    } else {
        ("", "")
    };
    format!(
        "CREATE TABLE IF NOT EXISTS {TABLE} (task_id String, segment_id String, sequence Int32, \
         dump_time Int64{delta}, time_bucket Int64{delta}, stack Array(String){frames}) \
         ENGINE = ReplacingMergeTree() PARTITION BY intDiv(time_bucket, 1000000) \
         ORDER BY (task_id, segment_id, sequence)"
    )
}
/// The same table on a cluster: a replicated table on each node and a Distributed table
/// over them, sharded as skysnap shards its snapshots (by task and segment).
fn cluster_ddl(modern: bool, database: &str, cluster: &str) -> [String; 2] {
    let local = full_row_ddl(modern)
        .replace(
            &format!("IF NOT EXISTS {TABLE} "),
            &format!("IF NOT EXISTS {database}.{TABLE}_local ON CLUSTER {cluster} "),
        )
        .replace(
            "ENGINE = ReplacingMergeTree()",
            &format!(
                "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{{shard}}/{database}/{TABLE}_local', '{{replica}}')"
            ),
        );
    let distributed = format!(
        "CREATE TABLE IF NOT EXISTS {database}.{TABLE} ON CLUSTER {cluster} AS {database}.{TABLE}_local \
         ENGINE = Distributed({cluster}, {database}, {TABLE}_local, cityHash64(task_id, segment_id))"
    );
    [local, distributed]
}

/// Where the rows go on a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ClusterTarget {
    /// The Distributed table, returning once each shard's replica committed
    /// (`insert_distributed_sync=1`): what skysnap does.
    Distributed,
    /// The Distributed table, returning once the rows are queued on the node it talks to
    /// (`insert_distributed_sync=0`): faster, but an acknowledgement before the commit.
    DistributedAsync,
    /// The replicated table of the node it talks to (one shard): the cost of
    /// replication alone.
    Local,
}

/// Segments generated before the run (at least; more when one round needs more rows).
const MIN_SEGMENTS: usize = 64;

#[derive(Debug, Parser)]
#[command(about = "Raw RowBinary INSERT throughput of skysnap's snapshot rows")]
struct Args {
    /// HTTP interface of the ClickHouse server.
    #[arg(long, default_value = "http://127.0.0.1:18123")]
    url: String,
    /// Database to create the table in.
    #[arg(long, default_value = "skysnap_raw")]
    database: String,
    /// Rows per INSERT (the benchmark sweeps 2,000, 10,000 and 100,000).
    #[arg(long, default_value_t = 2_000)]
    batch: usize,
    /// Which stacks, as `skysnap load --stacks`: `realistic` (Zipf-popular shapes 10 to
    /// 200 frames deep, runs of identical dumps) or `cycle` (--depth frames from --pool).
    #[arg(long, default_value = "realistic")]
    stacks: String,
    /// Stack shapes of the realistic mix (`skysnap load --stack-shapes`).
    #[arg(long, default_value_t = 2000)]
    stack_shapes: usize,
    /// Frames per stack (with --stacks cycle).
    #[arg(long, default_value_t = 40)]
    depth: usize,
    /// Distinct frames the stacks are drawn from (with --stacks cycle).
    #[arg(long, default_value_t = 3000)]
    pool: usize,
    /// Snapshots per segment (the load generator's --batch).
    #[arg(long, default_value_t = 500)]
    segment_snapshots: i32,
    /// Concurrent INSERTs.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Length of the timed run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Keep the table's rows instead of truncating it first.
    #[arg(long)]
    keep: bool,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
    /// A cluster of the servers' remote_servers: the table is made ON CLUSTER as a
    /// replicated table plus a Distributed table over it, and not truncated (use a
    /// fresh --database).
    #[arg(long)]
    cluster: Option<String>,
    /// With --cluster: which table the INSERTs go to.
    #[arg(long, value_enum, default_value_t = ClusterTarget::Distributed)]
    cluster_target: ClusterTarget,
}

/// A pre-generated snapshot with what the run counts for it. Rows of the same stack
/// share its frames.
struct Prepared {
    task_id: Arc<str>,
    segment_id: String,
    sequence: i32,
    dump_time: i64,
    time_bucket: i64,
    stack: Stack,
    encoded_bytes: u64,
    frame_bytes: u64,
}

impl Prepared {
    fn new(task_id: &Arc<str>, snapshot: ThreadSnapshot, stack: Stack) -> Prepared {
        let frame_bytes = stack.frame_bytes() as u64;
        let head = ThreadSnapshot {
            stack: None,
            ..snapshot
        };
        let stack_bytes = skysnap::proto::v3::ThreadStack {
            code_signatures: stack.to_vec(),
        }
        .encoded_len();
        Prepared {
            task_id: task_id.clone(),
            time_bucket: second_bucket(head.time),
            encoded_bytes: (head.encoded_len() + stack_bytes + 3) as u64,
            frame_bytes,
            segment_id: head.trace_segment_id,
            sequence: head.sequence,
            dump_time: head.time,
            stack,
        }
    }

    /// The row as inserted (the store's row type), borrowing from the prepared one.
    fn row(&self) -> Row<'_> {
        Row {
            task_id: &self.task_id,
            segment_id: &self.segment_id,
            sequence: self.sequence,
            dump_time: self.dump_time,
            time_bucket: self.time_bucket,
            stack: &self.stack,
        }
    }
}

/// The rows of `segments` segments of `per_segment` snapshots, stacks as asked.
fn prepare_rows(args: &Args, task_id: &str, run_id: &str, segments: usize) -> Vec<Prepared> {
    let task_id: Arc<str> = Arc::from(task_id);
    let per_segment = args.segment_snapshots as usize;
    let start_ms = skysnap::model::now_ms();
    let mut rows = Vec::with_capacity(segments * per_segment);
    if args.stacks == "cycle" {
        let pool = frame_pool(args.pool);
        for segment in 0..segments {
            let segment_id = format!("{run_id}.raw.{segment}");
            for snapshot in segment_snapshots(
                &task_id,
                &segment_id,
                args.segment_snapshots,
                args.depth,
                &pool,
                segment as u64 + 1,
            ) {
                let stack = Stack::from(
                    snapshot
                        .stack
                        .as_ref()
                        .map(|stack| stack.code_signatures.clone())
                        .unwrap_or_default(),
                );
                rows.push(Prepared::new(&task_id, snapshot, stack));
            }
        }
        return rows;
    }
    let mix = StackMix::realistic(
        RealisticShape {
            shapes: args.stack_shapes,
            ..RealisticShape::default()
        },
        1,
    );
    let stacks: Vec<Stack> = (0..mix.len())
        .map(|index| Stack::from(mix.frames(index)))
        .collect();
    let mut rng = Rng::new(0x5eed);
    for segment in 0..segments {
        let segment_id = format!("{run_id}.raw.{segment}");
        for (sequence, index) in mix.segment(&mut rng, per_segment).into_iter().enumerate() {
            let snapshot = ThreadSnapshot {
                task_id: task_id.to_string(),
                trace_segment_id: segment_id.clone(),
                time: start_ms + sequence as i64 * 10,
                sequence: sequence as i32,
                stack: None,
            };
            rows.push(Prepared::new(&task_id, snapshot, stacks[index].clone()));
        }
    }
    rows
}

#[derive(Default)]
struct Totals {
    rows: AtomicU64,
    inserts: AtomicU64,
    encoded_bytes: AtomicU64,
    frame_bytes: AtomicU64,
}

/// Repeats INSERTs of `batch` rows, taken cyclically from `rows` starting at `start`,
/// until `deadline`; counts only committed INSERTs.
async fn insert_loop(
    client: clickhouse::Client,
    table: &'static str,
    rows: Arc<Vec<Prepared>>,
    start: usize,
    batch: usize,
    deadline: Instant,
    totals: Arc<Totals>,
) -> anyhow::Result<()> {
    let mut next = start % rows.len();
    while Instant::now() < deadline {
        let (mut encoded, mut frames) = (0u64, 0u64);
        let mut insert = client.insert::<Row<'_>>(table).await?;
        for _ in 0..batch {
            let prepared = &rows[next];
            insert.write(&prepared.row()).await?;
            encoded += prepared.encoded_bytes;
            frames += prepared.frame_bytes;
            next = (next + 1) % rows.len();
        }
        insert.end().await?;
        totals.rows.fetch_add(batch as u64, Ordering::Relaxed);
        totals.inserts.fetch_add(1, Ordering::Relaxed);
        totals.encoded_bytes.fetch_add(encoded, Ordering::Relaxed);
        totals.frame_bytes.fetch_add(frames, Ordering::Relaxed);
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.batch == 0 || args.concurrency == 0 || args.segment_snapshots <= 0 || args.depth == 0 {
        anyhow::bail!("--batch, --concurrency, --segment-snapshots and --depth must be positive");
    }
    if args.stacks != "realistic" && args.stacks != "cycle" {
        anyhow::bail!("--stacks is realistic or cycle");
    }
    if !(args.seconds > 0.0 && args.seconds.is_finite()) {
        anyhow::bail!("--seconds must be a positive number");
    }

    // skysnap's own start-up: read the server version, apply the DDL rendered for it
    // (CREATE DATABASE IF NOT EXISTS, then the tables).
    let store_config = ClickHouseConfig {
        url: args.url.clone(),
        database: args.database.clone(),
        create_schema: true,
        cluster: args.cluster.clone().unwrap_or_default(),
        ..ClickHouseConfig::default()
    };
    let store = ClickHouseStore::connect(&store_config, RetentionConfig::default().days.get())
        .await
        .with_context(|| format!("cannot set up {} at {}", args.database, args.url))?;
    let version = store.version();
    drop(store);

    // The same transport as the store (TCP_NODELAY), so the limit is not the Nagle stall.
    let mut client = skysnap::store::clickhouse::nodelay_client()
        .with_url(&args.url)
        .with_validation(false)
        .with_database(&args.database);
    let mut table = TABLE;
    let mut parts_of = "system.parts".to_string();
    let mut parts_table = TABLE.to_string();
    if let Some(cluster) = &args.cluster {
        for statement in cluster_ddl(version.is_modern(), &args.database, cluster) {
            client
                .query(&statement)
                .execute()
                .await
                .context("CREATE TABLE ON CLUSTER")?;
        }
        parts_table = format!("{TABLE}_local");
        match args.cluster_target {
            ClusterTarget::Distributed => {
                client = client.with_setting("insert_distributed_sync", "1");
                parts_of = format!("cluster({cluster}, system, parts)");
            }
            ClusterTarget::DistributedAsync => {
                client = client.with_setting("insert_distributed_sync", "0");
                parts_of = format!("cluster({cluster}, system, parts)");
            }
            ClusterTarget::Local => table = "raw_thread_snapshot_local",
        }
    } else {
        client
            .query(&full_row_ddl(version.is_modern()))
            .execute()
            .await
            .context("CREATE TABLE")?;
    }
    if !args.keep && args.cluster.is_none() {
        client
            .query(&format!("TRUNCATE TABLE {TABLE}"))
            .execute()
            .await
            .context("TRUNCATE")?;
    }

    // Enough distinct rows that one round of concurrent INSERTs repeats none.
    let per_segment = args.segment_snapshots as usize;
    let segments = MIN_SEGMENTS.max((args.batch * args.concurrency).div_ceil(per_segment));
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let task_id = format!("raw-task-{run_id}");
    let rows = prepare_rows(&args, &task_id, &run_id, segments);
    let rows = Arc::new(rows);
    let prepared_rows = rows.len();

    let totals = Arc::new(Totals::default());
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    let stride = prepared_rows / args.concurrency;
    let workers: Vec<_> = (0..args.concurrency)
        .map(|worker| {
            tokio::spawn(insert_loop(
                client.clone(),
                table,
                rows.clone(),
                worker * stride,
                args.batch,
                deadline,
                totals.clone(),
            ))
        })
        .collect();
    for worker in workers {
        worker.await??;
    }
    let seconds = started.elapsed().as_secs_f64();

    let (bytes_on_disk, rows_on_disk): (u64, u64) = client
        .query(&format!(
            "SELECT sum(bytes_on_disk), sum(rows) FROM {parts_of} \
             WHERE database = ? AND table = ? AND active"
        ))
        .bind(args.database.as_str())
        .bind(parts_table.as_str())
        .fetch_one()
        .await
        .context("reading system.parts")?;

    let inserted = totals.rows.load(Ordering::Relaxed);
    let inserts = totals.inserts.load(Ordering::Relaxed);
    let encoded_bytes = totals.encoded_bytes.load(Ordering::Relaxed);
    let frame_bytes = totals.frame_bytes.load(Ordering::Relaxed);
    let rows_per_second = inserted as f64 / seconds;
    let megabytes_per_second = encoded_bytes as f64 / seconds / 1_000_000.0;
    let frame_text_megabytes_per_second = frame_bytes as f64 / seconds / 1_000_000.0;
    let bytes_per_row = if rows_on_disk > 0 {
        bytes_on_disk as f64 / rows_on_disk as f64
    } else {
        0.0
    };

    if args.json {
        let report = serde_json::json!({
            "server_version": version.to_string(),
            "cluster": args.cluster,
            "cluster_target": args.cluster.as_ref().map(|_| format!("{:?}", args.cluster_target)),
            "database": args.database,
            "batch": args.batch,
            "concurrency": args.concurrency,
            "stacks": args.stacks,
            "stack_shapes": args.stack_shapes,
            "depth": args.depth,
            "pool": args.pool,
            "segment_snapshots": args.segment_snapshots,
            "prepared_rows": prepared_rows,
            "rows": inserted,
            "inserts": inserts,
            "seconds": seconds,
            "rows_per_second": rows_per_second,
            "megabytes_per_second": megabytes_per_second,
            "frame_text_megabytes_per_second": frame_text_megabytes_per_second,
            "encoded_bytes": encoded_bytes,
            "frame_text_bytes": frame_bytes,
            "bytes_on_disk": bytes_on_disk,
            "rows_on_disk": rows_on_disk,
            "bytes_per_row": bytes_per_row,
        });
        println!("{report}");
    } else {
        println!(
            "raw_clickhouse: ClickHouse {version}, {}.{TABLE}, {} concurrent INSERTs of {} rows \
             ({} stacks, {prepared_rows} distinct rows)",
            args.database, args.concurrency, args.batch, args.stacks
        );
        println!("  rows inserted       {inserted} in {inserts} INSERTs over {seconds:.2} s");
        println!("  rows/s              {rows_per_second:.0}");
        println!("  MB/s (protobuf)     {megabytes_per_second:.2}");
        println!("  MB/s (frame text)   {frame_text_megabytes_per_second:.2}");
        println!("  bytes on disk       {bytes_on_disk} for {rows_on_disk} rows in active parts");
        println!("  bytes/row on disk   {bytes_per_row:.1}");
    }
    Ok(())
}
