//! The actors: snapshot shards (batching into the sinks), the two task caches, the task
//! registry, the task log writer, the instance registry and retention.

pub mod bounded;
pub mod instances;
pub mod retention;
pub mod shard;
pub mod sink;
pub mod supervision;
pub mod task_by_id;
pub mod task_cache;
pub mod task_log;
pub mod task_registry;
