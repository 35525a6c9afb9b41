//! skysnap: an Apache SkyWalking thread-profiling backend.
//!
//! Data flow: `grpc` handlers decode and validate agent messages and hand snapshots to
//! the sharded `actors::shard` actors, which batch them into the `actors::sink`s and so
//! into the `store`; the task caches, registry and log writer sit beside them. `http`
//! serves people, `cli` is its client.

pub mod actors;
pub mod analysis;
pub mod cli;
pub mod config;
pub mod consume;
pub mod grpc;
pub mod http;
pub mod load;
pub mod load_segments;
pub mod load_stacks;
pub mod model;
pub mod pipeline;
pub mod process;
pub mod proto;
pub mod segments;
pub mod server;
pub mod store;
pub mod tasks;
pub mod telemetry;
pub mod upstream;
pub mod wire;
