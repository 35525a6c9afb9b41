//! skysnap's fuzz targets. Each takes the fuzzer's bytes, derives a structured input
//! from them (with `arbitrary`, so that a coverage-guided fuzzer steers the structure
//! too), drives one of skysnap's input paths and checks the answer. A panic anywhere
//! is a finding: the AFL++ binaries (`src/bin/{snapshot,kafka_value,config,http}.rs`)
//! and the random driver (`src/bin/random.rs`) install a panic hook that aborts, so a
//! panic on any thread (an actor's, a blocking task's) is seen, not turned into a 500
//! or a dropped stream by tokio or actix.
//!
//! - [`snapshot::snapshot`]: a `ThreadSnapshot` from the wire, then the receiver's
//!   validation (`to_record`), against the rules written out again here.
//! - [`snapshot::kafka_value`]: a Kafka message value as `skysnap consume` decodes it.
//! - [`config::config`]: a YAML file and `SKYSNAP_*` variables through `Config::load_with_env`.
//! - [`http::http`]: any method, path, query and body through the real HTTP
//!   router, in process, against a real SQLite store in a temp dir.

pub mod config;
pub mod gen;
pub mod http;
pub mod snapshot;

/// The named target, for the random driver.
pub fn run_target(name: &str) -> Option<fn(&[u8])> {
    Some(match name {
        "snapshot" => snapshot::snapshot,
        "kafka_value" => snapshot::kafka_value,
        "config" => config::config,
        "http" => http::http,
        _ => return None,
    })
}

/// The target names, in the order the test command runs them.
pub const TARGETS: &[&str] = &["snapshot", "kafka_value", "config", "http"];
