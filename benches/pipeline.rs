//! The hot path, measured with criterion: decoding and validating snapshots, choosing
//! their shard, encoding them for each sink, and the whole in-process pipeline (stream
//! handler's hand-off → shard actors → batch commit) into a no-op sink. Stacks are the
//! load generator's: 40 Java-style frames from a pool of 3,000, 500 per stream.
//!
//! `cargo bench --bench pipeline` measures; `cargo test --benches` runs each once.

use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use prost::Message;

use skysnap::actors::shard::{shard_for, BatchLimits, CloseReason, Flush, Ingest, SnapshotShard};
use skysnap::actors::sink::kafka::encode;
use skysnap::actors::sink::retry::RetryPolicy;
use skysnap::actors::sink::{NullSink, SnapshotSink};
use skysnap::grpc::profile::to_record;
use skysnap::load::{frame_pool, segment_snapshots};
use skysnap::model::SnapshotRecord;
use skysnap::proto::v3::ThreadSnapshot;

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
    group.bench_function("500_snapshots_depth_40", |b| {
        b.iter(|| {
            for bytes in &encoded {
                let snapshot = ThreadSnapshot::decode(bytes.as_slice()).expect("decodes");
                std::hint::black_box(to_record(snapshot, 2_000).expect("valid"));
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

fn bench_pipeline_null_sink(c: &mut Criterion) {
    let system = actix_rt::System::new();
    let shards = system.block_on(async {
        let sinks: Arc<[Arc<dyn SnapshotSink>]> =
            Arc::from(vec![Arc::new(NullSink) as Arc<dyn SnapshotSink>]);
        let limits = BatchLimits {
            max_snapshots: 2_000,
            max_bytes: 8 * 1024 * 1024,
            flush_interval: Duration::from_millis(200),
        };
        let retry = RetryPolicy {
            max_attempts: 1,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
            budget: Duration::from_millis(1),
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
    bench_pipeline_null_sink
);
criterion_main!(benches);
