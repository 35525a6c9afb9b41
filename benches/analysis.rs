//! The reading side, measured with criterion: SkyWalking's stack tree of one segment of
//! 12,000 snapshots of 40 frames (the analysis limit), and the task flame graph: the
//! tree built from the (stack, count) pairs a store hands over for a task of a million
//! snapshots, then each of its encodings (JSON tree, folded stacks, gzipped pprof).
//! Stacks are the load generator's (`load::segment_snapshots`: 40 Java-style frames
//! from a pool of 3,000, consecutive snapshots sharing all but the deepest 3 frames).
//!
//! `cargo bench --bench analysis -- analysis` measures; `cargo test --benches` runs each
//! once, on a tenth of the segment and one stream's stacks (an unoptimised build takes
//! seconds over the full size).

use std::collections::HashMap;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use skysnap::analysis::{folded, pprof, stack_tree, FlameTree};
use skysnap::load::{frame_pool, segment_snapshots};
use skysnap::model::to_record;
use skysnap::model::SnapshotRecord;

/// SkyWalking's `maxThreadSnapshotAnalyzeSize`, skysnap's `analysis.max_snapshots`.
const SEGMENT_SNAPSHOTS: i32 = 12_000;
const DEPTH: usize = 40;
const FRAME_POOL: usize = 3_000;
/// `analysis.max_flamegraph_nodes`'s default.
const MAX_NODES: usize = 200_000;
/// The load generator's task: `dump_period` 10 ms, 15 minutes.
const DUMP_PERIOD_MS: i64 = 10;
const TASK_DURATION_MS: i64 = 15 * 60 * 1_000;

/// The shape of the HTTP benchmark's flame-graph task (`benches/run.py --analysis`):
/// `skysnap load --agents 1 --streams 8 --batch 500`, each stream cycling through 4
/// segments' stacks, until a million snapshots are in.
const STREAMS: u64 = 8;
const TEMPLATES_PER_STREAM: u64 = 4;
const STREAM_SNAPSHOTS: i32 = 500;
const TASK_SNAPSHOTS: u64 = 1_000_000;

/// Whether criterion measures (`cargo bench` passes `--bench`) rather than runs each
/// bench once as a test.
fn measuring() -> bool {
    std::env::args().any(|arg| arg == "--bench")
}

fn segment(count: i32, seed: u64) -> Vec<SnapshotRecord> {
    let pool = frame_pool(FRAME_POOL);
    segment_snapshots("task-bench", "segment-bench", count, DEPTH, &pool, seed)
        .into_iter()
        .map(|snapshot| to_record(snapshot, 2_000).expect("valid"))
        .collect()
}

/// The distinct stacks of the load generator's agent 0 with 8 streams (the seeds
/// `skysnap load` uses), each counted as often as it occurs in a task of a million
/// snapshots: what `Store::stack_counts` yields for that task.
fn task_stack_counts(streams: u64) -> Vec<(Vec<String>, u64)> {
    let pool = frame_pool(FRAME_POOL);
    let mut counts: HashMap<Vec<String>, u64> = HashMap::new();
    for stream in 0..streams {
        for template in 0..TEMPLATES_PER_STREAM {
            let seed = (stream << 20) ^ template;
            for snapshot in segment_snapshots("", "", STREAM_SNAPSHOTS, DEPTH, &pool, seed) {
                let stack = snapshot.stack.expect("a stack").code_signatures;
                *counts.entry(stack).or_default() += 1;
            }
        }
    }
    let templates_sent = streams * TEMPLATES_PER_STREAM * STREAM_SNAPSHOTS as u64;
    let rounds = TASK_SNAPSHOTS.div_ceil(templates_sent);
    counts
        .into_iter()
        .map(|(stack, count)| (stack, count * rounds))
        .collect()
}

fn flame_tree(stacks: &[(Vec<String>, u64)]) -> FlameTree {
    let mut tree = FlameTree::new(MAX_NODES);
    for (stack, count) in stacks {
        tree.add(stack, *count);
    }
    tree
}

fn bench_analysis(c: &mut Criterion) {
    let measuring = measuring();
    let (segment_snapshots, streams) = if measuring {
        (SEGMENT_SNAPSHOTS, STREAMS)
    } else {
        (SEGMENT_SNAPSHOTS / 10, 1)
    };
    let records = segment(segment_snapshots, 1);
    let analysis = stack_tree::analyze(&records, records.len() as u64, records.len());
    let stacks = task_stack_counts(streams);
    let tree = flame_tree(&stacks);
    let start_ms = skysnap::model::now_ms();
    if measuring {
        let nodes: usize = analysis.trees.iter().map(|tree| tree.elements.len()).sum();
        eprintln!(
            "analysis: segment of {} snapshots x {DEPTH} frames -> {} tree(s), {nodes} nodes, \
             {} bytes of JSON",
            records.len(),
            analysis.trees.len(),
            serde_json::to_vec(&analysis).expect("serialises").len()
        );
        eprintln!(
            "analysis: flame task of {} snapshots, {} distinct stacks -> {} nodes ({} truncated \
             samples); json {} bytes, collapsed {} bytes, pprof {} bytes (gzipped)",
            tree.total(),
            stacks.len(),
            tree.node_count(),
            tree.truncated_samples(),
            tree.to_json(DUMP_PERIOD_MS).len(),
            folded::collapsed(&tree).len(),
            pprof::encode(&tree, DUMP_PERIOD_MS, start_ms, TASK_DURATION_MS).len()
        );
    }

    let mut group = c.benchmark_group("analysis");
    group.sample_size(20);
    group.throughput(Throughput::Elements(records.len() as u64));
    // The server's work for `GET /api/v1/analysis?segment=` once the rows are read.
    group.bench_function("stack_tree_12000x40", |b| {
        b.iter(|| stack_tree::analyze(&records, records.len() as u64, records.len()))
    });
    group.bench_function("stack_tree_12000x40_to_json", |b| {
        b.iter(|| serde_json::to_vec(&analysis).expect("serialises"))
    });
    group.throughput(Throughput::Elements(stacks.len() as u64));
    group.bench_function("flame_tree_build", |b| b.iter(|| flame_tree(&stacks)));
    group.throughput(Throughput::Elements(tree.node_count() as u64));
    group.bench_function("flame_json", |b| b.iter(|| tree.to_json(DUMP_PERIOD_MS)));
    group.bench_function("flame_collapsed", |b| b.iter(|| folded::collapsed(&tree)));
    group.bench_function("flame_pprof", |b| {
        b.iter(|| pprof::encode(&tree, DUMP_PERIOD_MS, start_ms, TASK_DURATION_MS))
    });
    group.finish();
}

criterion_group!(benches, bench_analysis);
criterion_main!(benches);
