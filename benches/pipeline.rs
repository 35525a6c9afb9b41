//! The hot path, measured with criterion: decoding and validating snapshots, choosing
//! their shard, encoding them for each sink (SQLite JSON, Kafka protobuf, and a whole
//! 2,000-snapshot ClickHouse RowBinary INSERT), and the whole in-process pipeline
//! (stream handler's hand-off → shard actors → batch commit) into a no-op sink. Stacks
//! are the load generator's: 40 Java-style frames from a pool of 3,000, 500 per stream.
//!
//! `cargo bench --bench pipeline` measures; `cargo test --benches` runs each once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use clickhouse::{Client, Compression};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use futures::StreamExt;
use prost::Message;

use skysnap::actors::shard::{shard_for, BatchLimits, CloseReason, Flush, Ingest, SnapshotShard};
use skysnap::actors::sink::kafka::encode;
use skysnap::actors::sink::retry::RetryPolicy;
use skysnap::actors::sink::{NullSink, SnapshotSink};
use skysnap::load::{frame_pool, segment_snapshots};
use skysnap::model::SnapshotRecord;
use skysnap::model::{to_record, wire_to_record};
use skysnap::proto::v3::ThreadSnapshot;
use skysnap::store::clickhouse::{nodelay_client, SnapshotInsertRow};
use skysnap::wire::decode_snapshot;

const STREAM: usize = 500;

fn stream(seed: u64) -> Vec<ThreadSnapshot> {
    let pool = frame_pool(3_000);
    segment_snapshots(
        "task-bench",
        &format!("segment-{seed}"),
        STREAM as i32,
        40,
        &pool,
        seed,
    )
}

fn records(seed: u64) -> Vec<SnapshotRecord> {
    stream(seed)
        .into_iter()
        .map(|s| to_record(s, 2_000).expect("valid"))
        .collect()
}

fn bench_decode_validate(c: &mut Criterion) {
    let encoded: Vec<Vec<u8>> = stream(1).iter().map(Message::encode_to_vec).collect();
    let mut group = c.benchmark_group("decode_validate");
    group.throughput(Throughput::Elements(STREAM as u64));
    // prost's generated decoder: a `String` per frame, then the record's `Stack`.
    group.bench_function("500_snapshots_depth_40", |b| {
        b.iter(|| {
            for bytes in &encoded {
                let snapshot = ThreadSnapshot::decode(bytes.as_slice()).expect("decodes");
                std::hint::black_box(to_record(snapshot, 2_000).expect("valid"));
            }
        })
    });
    // What the receiver runs: the same record read in place from the message's bytes.
    let messages: Vec<bytes::Bytes> = encoded.iter().cloned().map(bytes::Bytes::from).collect();
    group.bench_function("in_place_500_snapshots_depth_40", |b| {
        b.iter(|| {
            for message in &messages {
                let snapshot = decode_snapshot(message.clone()).expect("decodes");
                std::hint::black_box(wire_to_record(snapshot, 2_000, false).expect("valid"));
            }
        })
    });
    group.finish();
}

fn bench_shard_routing(c: &mut Criterion) {
    let keys: Vec<(String, String)> = (0..STREAM)
        .map(|n| ("task-bench".to_string(), format!("segment-{n}")))
        .collect();
    let mut group = c.benchmark_group("shard_routing");
    group.throughput(Throughput::Elements(STREAM as u64));
    group.bench_function("fnv_500_keys_8_shards", |b| {
        b.iter(|| {
            for (task, segment) in &keys {
                std::hint::black_box(shard_for(task, segment, 8));
            }
        })
    });
    group.finish();
}

fn bench_encoding(c: &mut Criterion) {
    let batch = records(2);
    let mut group = c.benchmark_group("batch_encoding");
    group.throughput(Throughput::Elements(STREAM as u64));
    // SQLite keeps a stack as a JSON array of frames.
    group.bench_function("sqlite_json_stacks", |b| {
        b.iter(|| {
            for record in &batch {
                std::hint::black_box(serde_json::to_string(&record.stack).expect("serialises"));
            }
        })
    });
    // Kafka carries the ThreadSnapshot protobuf bytes.
    group.bench_function("kafka_protobuf", |b| {
        b.iter(|| {
            for record in &batch {
                std::hint::black_box(encode(record));
            }
        })
    });
    group.finish();
}

/// What the loopback endpoint saw of the last INSERT.
#[derive(Default)]
struct EndpointStats {
    body_bytes: AtomicU64,
    decompress: AtomicBool,
}

/// A stand-in for the ClickHouse HTTP interface: accepts any request, drains its body
/// (counting the bytes) and answers 200 with an empty body, as a server does for an
/// INSERT. Keep-alive, like a real server, so the client reuses its pooled connection.
async fn clickhouse_endpoint(stats: Arc<EndpointStats>) -> String {
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri, body: axum::body::Body| {
        let stats = stats.clone();
        async move {
            let mut bytes = 0u64;
            let mut data = body.into_data_stream();
            while let Some(chunk) = data.next().await {
                bytes += chunk.expect("request body").len() as u64;
            }
            stats.body_bytes.store(bytes, Ordering::Relaxed);
            stats.decompress.store(
                uri.query().is_some_and(|q| q.contains("decompress=1")),
                Ordering::Relaxed,
            );
            axum::http::StatusCode::OK
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    format!("http://{addr}")
}

/// One shard batch as full rows (frames in each row: the layout before the stack
/// dictionary, which `ClickHouseStore::insert_snapshots` no longer writes; kept as the
/// encoding cost the dictionary avoids): borrowed rows, `client.insert` (no round trip:
/// validation is off), `write` per row, `end`.
async fn insert_batch(client: &Client, batch: &[SnapshotRecord]) {
    let rows: Vec<SnapshotInsertRow<'_>> = batch.iter().map(SnapshotInsertRow::from).collect();
    let mut insert = client
        .insert::<SnapshotInsertRow<'_>>("profile_thread_snapshot")
        .await
        .expect("insert");
    for row in &rows {
        insert.write(row).await.expect("write");
    }
    insert.end().await.expect("end");
}

/// A client configured as `ClickHouseStore::connect` configures its own (validation
/// off, the store's database, LZ4: the crate's default with its `lz4` feature, named here
/// because that default is `None` whenever the crate's `test-util` feature is on), over
/// the given HTTP transport.
fn store_like(client: Client, url: &str) -> Client {
    client
        .with_url(url)
        .with_validation(false)
        .with_database("skysnap")
        .with_compression(Compression::Lz4)
}

/// The ClickHouse store's INSERT of one shard batch of 2,000 snapshots
/// (`pipeline.batch_max_snapshots`'s default). The `clickhouse` crate has no public
/// RowBinary serializer, so this runs its real `Insert` against a loopback HTTP endpoint
/// that only drains the body: each figure is building the borrowed rows + RowBinary
/// encoding + compression + chunked HTTP/1.1 over loopback, with no ClickHouse server
/// work.
///
/// - `store_client_lz4`: exactly the store's client (`TCP_NODELAY` on): the encoding +
///   LZ4 cost of a batch.
/// - `store_client_uncompressed`: without LZ4, to show what compression costs (the body
///   is ~40× larger, as the frames repeat).
/// - `crate_default_client_lz4`: the crate's default transport, which leaves Nagle's
///   algorithm on, so the INSERT's last small write waits for the peer's delayed ACK
///   (~40 ms on Linux): the reason the store sets `TCP_NODELAY`.
fn bench_clickhouse_encoding(c: &mut Criterion) {
    const BATCH: usize = 2_000;
    let batch: Vec<SnapshotRecord> = (1..=(BATCH / STREAM) as u64).flat_map(records).collect();
    assert_eq!(batch.len(), BATCH);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let stats = Arc::new(EndpointStats::default());
    let url = runtime.block_on(clickhouse_endpoint(stats.clone()));
    let variants = [
        ("store_client_lz4", store_like(nodelay_client(), &url)),
        (
            "store_client_uncompressed",
            store_like(nodelay_client(), &url).with_compression(Compression::None),
        ),
        (
            "crate_default_client_lz4",
            store_like(Client::default(), &url),
        ),
    ];

    let mut group = c.benchmark_group("clickhouse_encoding");
    group.throughput(Throughput::Elements(BATCH as u64));
    for (name, client) in &variants {
        runtime.block_on(insert_batch(client, &batch));
        assert_eq!(
            stats.decompress.load(Ordering::Relaxed),
            name.ends_with("lz4"),
            "the endpoint sees the client's compression"
        );
        eprintln!(
            "clickhouse_encoding/{name}: {} body bytes per batch",
            stats.body_bytes.load(Ordering::Relaxed)
        );
        group.bench_function(*name, |b| {
            b.iter(|| runtime.block_on(insert_batch(client, &batch)))
        });
    }
    group.finish();
}

fn bench_pipeline_null_sink(c: &mut Criterion) {
    let system = actix_rt::System::new();
    let shards = system.block_on(async {
        let sinks: Arc<[Arc<dyn SnapshotSink>]> =
            Arc::from(vec![Arc::new(NullSink) as Arc<dyn SnapshotSink>]);
        let limits = BatchLimits {
            max_snapshots: 20_000,
            max_bytes: 32 * 1024 * 1024,
            linger: Duration::ZERO,
            max_commits_in_flight: 2,
        };
        let retry = RetryPolicy {
            max_attempts: 1,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
            budget: Duration::from_millis(1),
            attempt_timeout: Duration::from_secs(5),
        };
        (0..2)
            .map(|index| {
                let arbiter = actix::Arbiter::new();
                let (sinks, limits, retry) = (sinks.clone(), limits.clone(), retry.clone());
                let shard = SnapshotShard::start_in_arbiter(&arbiter.handle(), move |_| {
                    SnapshotShard::new(index, sinks, limits, retry, 16)
                });
                std::mem::forget(arbiter);
                shard
            })
            .collect::<Vec<_>>()
    });
    let streams = 8;
    let mut group = c.benchmark_group("pipeline_null_sink");
    group.throughput(Throughput::Elements((streams * STREAM) as u64));
    group.bench_function("8_streams_of_500_into_2_shards", |b| {
        b.iter_batched(
            || (0..streams as u64).map(records).collect::<Vec<_>>(),
            |batches| {
                system.block_on(async {
                    let mut receipts = Vec::new();
                    for batch in batches {
                        let shard =
                            shard_for(&batch[0].task_id, &batch[0].segment_id, shards.len());
                        receipts.push(
                            shards[shard]
                                .send(Ingest { records: batch })
                                .await
                                .expect("shard"),
                        );
                    }
                    for shard in &shards {
                        shard
                            .send(Flush {
                                reason: CloseReason::Drain,
                            })
                            .await
                            .expect("shard")
                            .expect("flush");
                    }
                    for receipt in receipts {
                        receipt.await.expect("receipt").expect("committed");
                    }
                })
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_decode_validate,
    bench_shard_routing,
    bench_encoding,
    bench_clickhouse_encoding,
    bench_pipeline_null_sink
);
criterion_main!(benches);
