//! Configuration: one YAML file (every key optional), then `SKYSNAP_<SECTION>_<KEY>`
//! environment variables on top, then CLI flags. Defaults live in the `Default` impls
//! below and nowhere else; `config/skysnap.yaml` documents every key.

use std::net::SocketAddr;
use std::num::NonZero;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

/// Environment variables that start with this prefix configure the service.
pub const ENV_PREFIX: &str = "SKYSNAP_";

/// Environment variables with the prefix that belong to the CLI client, not the service.
const CLIENT_ENV_VARS: &[&str] = &["SKYSNAP_SERVER", "SKYSNAP_CONFIG", "SKYSNAP_LOG"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration key {key}: {message}")]
    Invalid { key: String, message: String },
    #[error("unknown configuration key {key} (from environment variable {variable})")]
    UnknownEnv { key: String, variable: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub grpc: GrpcConfig,
    pub http: HttpConfig,
    pub metrics: MetricsConfig,
    pub store: StoreConfig,
    pub sqlite: SqliteConfig,
    pub clickhouse: ClickHouseConfig,
    pub kafka: KafkaConfig,
    pub pipeline: PipelineConfig,
    pub sink: SinkConfig,
    pub tasks: TasksConfig,
    pub instances: InstancesConfig,
    pub auth: AuthConfig,
    pub retention: RetentionConfig,
    pub shutdown: ShutdownConfig,
    pub analysis: AnalysisConfig,
    pub upstream: UpstreamConfig,
    pub segments: SegmentsConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    /// Where agents connect; port 0 picks a free port (printed at start-up).
    pub addr: SocketAddr,
    /// Largest gRPC message accepted, in bytes; larger ones are refused.
    pub max_message_bytes: usize,
    /// Deepest stack accepted in a snapshot, in frames; deeper snapshots are rejected.
    pub max_stack_depth: NonZero<usize>,
    /// Concurrent HTTP/2 streams per agent connection.
    pub max_concurrent_streams: u32,
    /// `collectSnapshot` streams open at once over all agents; more are refused
    /// RESOURCE_EXHAUSTED at once (the agent retries with its next batch).
    pub max_snapshot_streams: NonZero<usize>,
    /// Bytes of snapshots handed to the shards and not yet committed, over all streams.
    /// A stream that would pass it waits up to `snapshot_bytes_wait_ms` for room, then
    /// ends RESOURCE_EXHAUSTED (what it handed over before is still committed).
    pub max_snapshot_bytes_in_flight: usize,
    /// Milliseconds a stream waits for room under `max_snapshot_bytes_in_flight`.
    pub snapshot_bytes_wait_ms: NonZero<u64>,
    /// PEM certificate chain; with `tls_key_path` it turns TLS on for gRPC.
    pub tls_cert_path: Option<PathBuf>,
    /// PEM private key for `tls_cert_path`.
    pub tls_key_path: Option<PathBuf>,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            addr: "0.0.0.0:11800".parse().expect("valid default address"),
            max_message_bytes: 4 * 1024 * 1024,
            max_stack_depth: NonZero::new(2000).expect("a default above zero"),
            max_concurrent_streams: 1024,
            max_snapshot_streams: NonZero::new(4_096).expect("a default above zero"),
            max_snapshot_bytes_in_flight: 256 * 1024 * 1024,
            snapshot_bytes_wait_ms: NonZero::new(5_000).expect("a default above zero"),
            tls_cert_path: None,
            tls_key_path: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Where the JSON API and `/healthz`, `/readyz` listen; port 0 picks a free port.
    pub addr: SocketAddr,
    /// Most snapshots one `/segments/{id}/snapshots` answer returns.
    pub max_snapshots_per_response: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            addr: "0.0.0.0:12800".parse().expect("valid default address"),
            max_snapshots_per_response: 12_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where Prometheus scrapes `/metrics`; port 0 picks a free port.
    pub addr: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            addr: "0.0.0.0:1234".parse().expect("valid default address"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Sqlite,
    Clickhouse,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite` (embedded, the default) or `clickhouse`.
    pub kind: StoreKind,
    /// Milliseconds any one store call may take before it fails as unavailable: a store
    /// that accepts connections and never answers must not hold a shard, a cache or an
    /// API request. Above the longest honest call (a flame graph's store query streams
    /// and is bounded per item, not in total).
    pub timeout_ms: NonZero<u64>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::default(),
            timeout_ms: NonZero::new(10_000).expect("a default above zero"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqliteConfig {
    /// Database file; its folder is created when missing.
    pub path: PathBuf,
    /// Connections kept open for API reads (writes use one connection of their own).
    pub read_connections: NonZero<usize>,
    /// Milliseconds a call waits for a lock held by another process before it fails
    /// (retriably, so batches are retried within the sink budget).
    pub busy_timeout_ms: u64,
    /// What an acknowledged batch survives (SQLite's `synchronous` in WAL mode).
    pub synchronous: SqliteSynchronous,
}

/// SQLite's `PRAGMA synchronous` in WAL mode, i.e. what an acknowledgement survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SqliteSynchronous {
    /// No fsync at all: a crash of skysnap loses nothing committed, an OS crash or power
    /// loss can lose committed batches and, rarely, corrupt the file.
    Off,
    /// fsync at checkpoints only: a crash of skysnap loses nothing committed; an OS crash
    /// or power loss can lose the batches committed since the last checkpoint (the file
    /// stays consistent). SQLite's recommendation for WAL, and the fastest safe level.
    #[default]
    Normal,
    /// fsync of the WAL at every commit: an acknowledged batch survives a power loss.
    Full,
}

impl SqliteSynchronous {
    pub fn pragma(self) -> &'static str {
        match self {
            SqliteSynchronous::Off => "OFF",
            SqliteSynchronous::Normal => "NORMAL",
            SqliteSynchronous::Full => "FULL",
        }
    }
}

impl Default for SqliteConfig {
    fn default() -> Self {
        SqliteConfig {
            path: PathBuf::from("./data/skysnap.db"),
            read_connections: NonZero::new(4).expect("a default above zero"),
            busy_timeout_ms: 5_000,
            synchronous: SqliteSynchronous::Normal,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseConfig {
    /// HTTP interface of the ClickHouse server. On a cluster, several nodes'
    /// comma-separated: skysnap talks to the first that answers and moves on to the next
    /// when the one it uses stops answering.
    pub url: String,
    pub database: String,
    pub user: Option<String>,
    pub password: Option<String>,
    /// Create the database and tables at start-up (`false` for production, where the
    /// DDL of `skysnap schema` is applied by hand).
    pub create_schema: bool,
    /// Name of a cluster in the servers' `remote_servers`: skysnap's tables are created
    /// `ON CLUSTER` as replicated shard-local tables plus `Distributed` tables over them.
    /// Empty = a single node.
    pub cluster: String,
    /// ZooKeeper (or Keeper) path under which a cluster's replicated tables keep their
    /// state: `<prefix>/{shard}/<database>/<table>_local`, `{shard}` being each server's
    /// macro.
    pub replication_path_prefix: String,
}

/// Letters, digits and `_` only: a name that goes into SQL as it is (a database, a
/// cluster).
pub fn is_plain_name(text: &str) -> bool {
    text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl ClickHouseConfig {
    /// The servers of `url`, in the order given.
    pub fn urls(&self) -> impl Iterator<Item = &str> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
    }
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        ClickHouseConfig {
            url: "http://127.0.0.1:8123".to_string(),
            database: "skysnap".to_string(),
            user: None,
            password: None,
            create_schema: true,
            cluster: String::new(),
            replication_path_prefix: "/clickhouse/tables".to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Comma-separated bootstrap servers; empty turns Kafka off.
    pub brokers: String,
    pub topic: String,
    /// Consumer group of `skysnap consume`.
    pub group_id: String,
    /// Milliseconds librdkafka keeps trying to deliver a message before the batch fails
    /// (and is retried within the sink budget).
    pub message_timeout_ms: u64,
    /// Milliseconds librdkafka waits to fill a produce batch.
    pub linger_ms: u64,
    /// Milliseconds after which a silent consumer leaves its group and its partitions go
    /// to the others (librdkafka's `session.timeout.ms`).
    pub session_timeout_ms: u64,
    /// Snapshots `skysnap consume` commits to the store at once at most.
    pub consume_batch_snapshots: NonZero<usize>,
    /// Milliseconds `skysnap consume` waits to fill a batch before committing it.
    pub consume_batch_wait_ms: u64,
    /// Topic where `skysnap consume` puts what it cannot store — a value that is no
    /// valid `ThreadSnapshot`, a snapshot the store refuses for good — with the reason
    /// in headers, so that one bad message never stops the group; empty = `<topic>.dlq`.
    pub dlq_topic: String,
    /// Further librdkafka settings for producer and consumer alike, e.g.
    /// `security.protocol: ssl`, `sasl.mechanisms: PLAIN`.
    pub properties: std::collections::BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: String::new(),
            topic: "skywalking-profilings".to_string(),
            group_id: "skysnap-consumer".to_string(),
            message_timeout_ms: 10_000,
            linger_ms: 5,
            session_timeout_ms: 45_000,
            consume_batch_snapshots: NonZero::new(10_000).expect("a default above zero"),
            consume_batch_wait_ms: 200,
            dlq_topic: String::new(),
            properties: std::collections::BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PipelineMode {
    /// Receivers write to the store (and copy to Kafka when it is configured).
    #[default]
    Direct,
    /// Receivers write to Kafka only; `skysnap consume` moves the topic into the store.
    Kafka,
    /// Receivers decode, validate and batch snapshots, then drop them: the baseline that
    /// measures skysnap's own cost in benchmarks. Nothing is stored; never for production.
    Discard,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    pub mode: PipelineMode,
    /// Snapshot shard actors, each on its own thread; 0 = one per CPU core.
    pub shards: usize,
    /// A shard's batch closes at this many snapshots; 0 = where the store wants its
    /// INSERTs (ClickHouse 100,000, SQLite 20,000).
    pub batch_max_snapshots: usize,
    /// A shard's batch closes at this many bytes of snapshot data.
    pub batch_max_bytes: NonZero<usize>,
    /// Milliseconds a batch waits after its first snapshot before an idle shard commits
    /// it. 0: group commit at once: a batch commits as soon as the shard has nothing
    /// queued and a commit slot is free, and grows while the slots are busy. More makes
    /// fewer, larger commits at moderate load, at that much added latency.
    /// (`batch_flush_interval_ms`, its name before group commit, is still read.)
    #[serde(alias = "batch_flush_interval_ms")]
    pub batch_linger_ms: u64,
    /// Messages a shard's mailbox holds before senders wait (backpressure).
    pub shard_mailbox_capacity: NonZero<usize>,
    /// Snapshots a stream handler hands to a shard in one message at most.
    pub stream_chunk_snapshots: NonZero<usize>,
    /// Closed batches of one shard that commit at once while the shard fills the next.
    pub shard_commits_in_flight: NonZero<usize>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            mode: PipelineMode::Direct,
            shards: 0,
            // Group commit sizes batches by the load; the caps only bound them.
            batch_max_snapshots: 0,
            batch_max_bytes: NonZero::new(32 * 1024 * 1024).expect("a default above zero"),
            batch_linger_ms: 0,
            shard_mailbox_capacity: NonZero::new(16).expect("a default above zero"),
            stream_chunk_snapshots: NonZero::new(256).expect("a default above zero"),
            // One batch committing while the next fills kept the streams from stalling
            // on each commit (docs/PERFORMANCE.md); more only queues at the store.
            shard_commits_in_flight: NonZero::new(2).expect("a default above zero"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// Attempts per batch before its streams are answered `UNAVAILABLE`.
    pub retry_max_attempts: NonZero<u32>,
    /// First back-off in milliseconds; doubles each attempt, with jitter.
    pub retry_initial_backoff_ms: u64,
    /// Largest back-off in milliseconds.
    pub retry_max_backoff_ms: u64,
    /// Total milliseconds a batch may spend retrying.
    pub retry_budget_ms: u64,
    /// Milliseconds one write attempt may take; past it the attempt counts as a retriable
    /// failure. With the budget it bounds a batch at budget + one attempt (15 s by
    /// default), under the 30 s SkyWalking agents give a stream.
    pub attempt_timeout_ms: NonZero<u64>,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            retry_max_attempts: NonZero::new(8).expect("a default above zero"),
            retry_initial_backoff_ms: 100,
            retry_max_backoff_ms: 2_000,
            retry_budget_ms: 10_000,
            attempt_timeout_ms: NonZero::new(5_000).expect("a default above zero"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TasksConfig {
    /// How often the downstream cache reloads running tasks from the store, in ms.
    pub cache_refresh_interval_ms: NonZero<u64>,
    /// A service's entry expires this many ms after its last write.
    pub cache_expire_ms: u64,
    /// Services the downstream cache holds at most.
    pub cache_max_services: NonZero<usize>,
    /// Tasks the by-id cache holds at most.
    pub by_id_cache_size: NonZero<usize>,
    /// How often pending task logs are written, in ms.
    pub log_flush_interval_ms: NonZero<u64>,
    /// Log keys remembered to skip re-writing a NOTIFIED the store already has.
    pub log_dedup_capacity: usize,
    /// Store reads per second, at most, for task ids of snapshots no cache knows (they
    /// are stored anyway and counted as unknown); a flood of random ids costs the store
    /// no more than this.
    pub unknown_lookups_per_second: u32,
}

impl Default for TasksConfig {
    fn default() -> Self {
        TasksConfig {
            cache_refresh_interval_ms: NonZero::new(10_000).expect("a default above zero"),
            cache_expire_ms: 60_000,
            cache_max_services: NonZero::new(10_000).expect("a default above zero"),
            by_id_cache_size: NonZero::new(10_000).expect("a default above zero"),
            log_flush_interval_ms: NonZero::new(100).expect("a default above zero"),
            log_dedup_capacity: 100_000,
            unknown_lookups_per_second: 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InstancesConfig {
    /// An instance counts as live this many ms after its last heartbeat.
    pub live_window_ms: u64,
    /// Instances remembered at most (the oldest are forgotten first).
    pub max_instances: usize,
}

impl Default for InstancesConfig {
    fn default() -> Self {
        InstancesConfig {
            // The agents' keepAlive runs every 30 s; allow three to go missing.
            live_window_ms: 120_000,
            max_instances: 100_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// When set, every gRPC call needs metadata `authentication: <token>`.
    pub agent_token: Option<String>,
    /// When set, every `/api/` call needs `Authorization: Bearer <token>`.
    pub admin_token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Days records are kept, by time bucket.
    pub days: NonZero<u32>,
    /// How often expired records are looked for, in ms.
    pub check_interval_ms: NonZero<u64>,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            days: NonZero::new(3).expect("a default above zero"),
            check_interval_ms: NonZero::new(600_000).expect("a default above zero"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Milliseconds from SIGTERM to exit: open streams finish, batches flush.
    pub grace_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { grace_ms: 20_000 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnalysisConfig {
    /// Most snapshots one stack-tree analysis reads (SkyWalking's
    /// `maxThreadSnapshotAnalyzeSize`); past it the answer says so in its tip.
    pub max_snapshots: NonZero<usize>,
    /// Most nodes one flame graph holds; past it the rest of a stack is cut and counted
    /// in the root's `truncated_samples`, so memory stays bounded.
    pub max_flamegraph_nodes: usize,
    /// Analysis, flame-graph and diff answers computed at once; more wait up to 10 s,
    /// then get 503. Bounds the CPU, memory and blocking threads they take together.
    pub max_concurrent_requests: NonZero<usize>,
}

impl Default for AnalysisConfig {
    fn default() -> Self {
        AnalysisConfig {
            max_snapshots: NonZero::new(12_000).expect("a default above zero"),
            max_flamegraph_nodes: 200_000,
            max_concurrent_requests: NonZero::new(4).expect("a default above zero"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// SkyWalking OAP gRPC addresses (`host:port`). Set, every gRPC call skysnap does not
    /// own (all but `ProfileTask`) is forwarded to them, round robin; empty, those calls
    /// are answered here and counted.
    pub addresses: Vec<String>,
    /// Sent upstream as the `authentication` metadata in place of the agent's; unset, the
    /// agent's own token (if any) passes through.
    pub token: Option<String>,
    /// Speak TLS to the upstream.
    pub tls: bool,
    /// PEM CA that signed the upstream's certificate; unset, the system's roots.
    pub tls_ca_path: Option<PathBuf>,
    /// PEM client certificate, for an upstream that wants mutual TLS (with `tls_key_path`).
    pub tls_cert_path: Option<PathBuf>,
    /// PEM private key of `tls_cert_path`.
    pub tls_key_path: Option<PathBuf>,
    /// Name checked against the upstream's certificate; unset, the address's host.
    pub tls_domain: Option<String>,
    /// Milliseconds to open a connection to an upstream before the call fails UNAVAILABLE.
    pub connect_timeout_ms: NonZero<u64>,
    /// Milliseconds a forwarded call may wait on the upstream: for it to take request
    /// data it is offered, and, once the agent has sent everything, between reply frames.
    /// Past it the call ends DEADLINE_EXCEEDED and the upstream is marked down.
    pub timeout_ms: NonZero<u64>,
    /// Forwarded calls in flight at once; more are refused RESOURCE_EXHAUSTED at once, so
    /// a stalled upstream holds at most this many of the gRPC server's streams. A Python
    /// agent keeps three streams open for good (segments, logs, meters).
    pub max_concurrent_calls: NonZero<usize>,
    /// Milliseconds between attempts to reconnect to an upstream marked down.
    pub retry_backoff_ms: NonZero<u64>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            addresses: Vec::new(),
            token: None,
            tls: false,
            tls_ca_path: None,
            tls_cert_path: None,
            tls_key_path: None,
            tls_domain: None,
            connect_timeout_ms: NonZero::new(1_000).expect("a default above zero"),
            timeout_ms: NonZero::new(5_000).expect("a default above zero"),
            max_concurrent_calls: NonZero::new(8_192).expect("a default above zero"),
            retry_backoff_ms: NonZero::new(1_000).expect("a default above zero"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentsConfig {
    /// Segment ids with snapshots remembered in memory (the most recent ones), so that a
    /// passing trace segment is matched without a store look-up.
    pub index_capacity: NonZero<usize>,
    /// Trace segments that may belong to a profile task (their service and endpoint have
    /// one) but arrived before any snapshot of theirs, held for a second look.
    pub pending_max_segments: usize,
    /// Milliseconds such a segment waits before it is looked up again (in memory, then in
    /// the store); not found then, it is dropped and counted.
    pub pending_delay_ms: NonZero<u64>,
    /// Most spans kept of one segment (the first ones); the rest are counted.
    pub max_spans: NonZero<usize>,
}

impl Default for SegmentsConfig {
    fn default() -> Self {
        SegmentsConfig {
            index_capacity: NonZero::new(100_000).expect("a default above zero"),
            pending_max_segments: 10_000,
            pending_delay_ms: NonZero::new(5_000).expect("a default above zero"),
            max_spans: NonZero::new(2_000).expect("a default above zero"),
        }
    }
}

impl Config {
    /// Reads the file (when given), applies the process environment, and validates.
    pub fn load(path_opt: Option<&Path>) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Config::load_with_env(path_opt, &env)
    }

    pub fn load_with_env(
        path_opt: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let mut tree = match path_opt {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                let value: Value =
                    serde_yaml::from_str(&text).map_err(|error| ConfigError::Parse {
                        path: path.to_path_buf(),
                        message: error.to_string(),
                    })?;
                match value {
                    Value::Null => Value::Mapping(Mapping::new()),
                    Value::Mapping(_) => value,
                    _ => {
                        return Err(ConfigError::Parse {
                            path: path.to_path_buf(),
                            message: "the top level must be a mapping of sections".to_string(),
                        })
                    }
                }
            }
            None => Value::Mapping(Mapping::new()),
        };
        apply_env(&mut tree, env)?;
        let config: Config = serde_path_to_error::deserialize(tree).map_err(|error| {
            let message = error.inner().to_string();
            // Counts, sizes and intervals are `NonZero`: say it in the reader's words.
            let message = if message.contains("expected a nonzero") {
                "must be greater than zero".to_string()
            } else {
                message
            };
            ConfigError::Invalid {
                key: error.path().to_string(),
                message,
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| {
            Err(ConfigError::Invalid {
                key: key.to_string(),
                message: message.to_string(),
            })
        };
        if self.grpc.max_message_bytes < 1024 {
            return invalid("grpc.max_message_bytes", "must be at least 1024");
        }
        if self.grpc.max_snapshot_bytes_in_flight < self.grpc.max_message_bytes {
            return invalid(
                "grpc.max_snapshot_bytes_in_flight",
                "must be at least grpc.max_message_bytes (one message must fit)",
            );
        }
        if self.grpc.tls_cert_path.is_some() != self.grpc.tls_key_path.is_some() {
            return invalid(
                "grpc.tls_cert_path",
                "grpc.tls_cert_path and grpc.tls_key_path must be set together",
            );
        }
        if self.auth.agent_token.as_deref() == Some("") {
            return invalid(
                "auth.agent_token",
                "must not be empty (leave it unset for no token)",
            );
        }
        if self.auth.admin_token.as_deref() == Some("") {
            return invalid(
                "auth.admin_token",
                "must not be empty (leave it unset for no token)",
            );
        }
        if self.clickhouse.database.is_empty() || !is_plain_name(&self.clickhouse.database) {
            return invalid(
                "clickhouse.database",
                "must be a plain name: letters, digits, _",
            );
        }
        if !is_plain_name(&self.clickhouse.cluster) {
            return invalid(
                "clickhouse.cluster",
                "must be a plain name: letters, digits, _ (or empty for a single node)",
            );
        }
        let prefix = &self.clickhouse.replication_path_prefix;
        if !prefix.starts_with('/') || prefix.contains('\'') || prefix.contains('\\') {
            return invalid(
                "clickhouse.replication_path_prefix",
                "must be a ZooKeeper path starting with / (no quotes or backslashes)",
            );
        }
        if self.clickhouse.urls().next().is_none() {
            return invalid("clickhouse.url", "must name at least one server");
        }
        if self.pipeline.mode == PipelineMode::Kafka && !self.kafka_enabled() {
            return invalid("kafka.brokers", "pipeline.mode kafka needs kafka.brokers");
        }
        if self.pipeline.mode == PipelineMode::Discard && self.kafka_enabled() {
            return invalid(
                "kafka.brokers",
                "pipeline.mode discard writes nowhere; leave kafka.brokers empty",
            );
        }
        if self.analysis.max_flamegraph_nodes < 2 {
            return invalid("analysis.max_flamegraph_nodes", "must be at least 2");
        }
        if let Some(address) = self
            .upstream
            .addresses
            .iter()
            .find(|address| address.trim().is_empty() || address.contains("://"))
        {
            return invalid(
                "upstream.addresses",
                &format!("{address:?} is not host:port (no scheme; set upstream.tls for TLS)"),
            );
        }
        if self.upstream.token.as_deref() == Some("") {
            return invalid(
                "upstream.token",
                "must not be empty (leave it unset to pass the agent's token)",
            );
        }
        if self.upstream.tls_cert_path.is_some() != self.upstream.tls_key_path.is_some() {
            return invalid(
                "upstream.tls_cert_path",
                "upstream.tls_cert_path and upstream.tls_key_path must be set together",
            );
        }
        if !self.upstream.tls
            && (self.upstream.tls_ca_path.is_some() || self.upstream.tls_cert_path.is_some())
        {
            return invalid(
                "upstream.tls",
                "TLS files are set but upstream.tls is false",
            );
        }
        if self.kafka.topic.is_empty() {
            return invalid("kafka.topic", "must not be empty");
        }
        if self.kafka.dlq_topic.trim() == self.kafka.topic.trim() {
            // A dead letter would be read again, refused again, and sent round forever.
            return invalid("kafka.dlq_topic", "must differ from kafka.topic");
        }
        Ok(())
    }

    pub fn kafka_enabled(&self) -> bool {
        !self.kafka.brokers.trim().is_empty()
    }

    /// Shard count after resolving 0 to the number of cores.
    pub fn shard_count(&self) -> usize {
        if self.pipeline.shards > 0 {
            return self.pipeline.shards;
        }
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }
}

/// Kubernetes' service links for a Service named `skysnap…` (`SKYSNAP_SERVICE_HOST`,
/// `SKYSNAP_PORT_11800_TCP_ADDR`, …) share the prefix but are not configuration.
fn is_service_link(variable: &str) -> bool {
    variable.ends_with("_SERVICE_HOST")
        || variable.contains("_SERVICE_PORT")
        || variable.ends_with("_PORT")
        || variable.contains("_PORT_")
}

/// Keys read under an older name too (`<section>_<key>`, as in the variable): the
/// file takes the old name through a serde alias, the environment through this list.
const RENAMED_ENV_KEYS: &[(&str, &str)] = &[(
    "pipeline_batch_flush_interval_ms",
    "pipeline_batch_linger_ms",
)];

/// Writes `SKYSNAP_<SECTION>_<KEY>` variables into the tree. The default configuration
/// tells which keys exist and whether a value is a number, a flag or text, so that a
/// token such as `123` stays text.
fn apply_env(tree: &mut Value, env: &[(String, String)]) -> Result<(), ConfigError> {
    let defaults = serde_yaml::to_value(Config::default()).expect("default config serialises");
    let Value::Mapping(sections) = &defaults else {
        unreachable!("the default config is a mapping")
    };
    for (variable, raw) in env {
        let Some(rest) = variable.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if CLIENT_ENV_VARS.contains(&variable.as_str()) || is_service_link(variable) {
            continue;
        }
        let mut rest = rest.to_ascii_lowercase();
        if let Some((_, renamed)) = RENAMED_ENV_KEYS.iter().find(|(old, _)| *old == rest) {
            rest = renamed.to_string();
        }
        let Some((section, key)) = rest.split_once('_') else {
            return Err(ConfigError::UnknownEnv {
                key: rest,
                variable: variable.clone(),
            });
        };
        let Some(Value::Mapping(default_section)) = sections.get(section) else {
            return Err(ConfigError::UnknownEnv {
                key: format!("{section}.{key}"),
                variable: variable.clone(),
            });
        };
        let Some(default_value) = default_section.get(key) else {
            return Err(ConfigError::UnknownEnv {
                key: format!("{section}.{key}"),
                variable: variable.clone(),
            });
        };
        let value = match default_value {
            Value::Sequence(_) => Value::Sequence(
                raw.split(',')
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .map(|item| Value::String(item.to_string()))
                    .collect(),
            ),
            Value::Number(_) | Value::Bool(_) => {
                serde_yaml::from_str(raw).map_err(|error| ConfigError::Invalid {
                    key: format!("{section}.{key}"),
                    message: format!("{variable}: {error}"),
                })?
            }
            _ => Value::String(raw.clone()),
        };
        let Value::Mapping(root) = tree else {
            unreachable!("the config tree is a mapping")
        };
        let section_value = root
            .entry(Value::String(section.to_string()))
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        if section_value.is_null() {
            *section_value = Value::Mapping(Mapping::new());
        }
        let Value::Mapping(section_map) = section_value else {
            return Err(ConfigError::Invalid {
                key: section.to_string(),
                message: "must be a mapping".to_string(),
            });
        };
        section_map.insert(Value::String(key.to_string()), value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn test_config_defaults_without_file() {
        let config = Config::load_with_env(None, &[]).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.grpc.addr.to_string(), "0.0.0.0:11800");
        assert_eq!(config.http.addr.to_string(), "0.0.0.0:12800");
        assert_eq!(config.metrics.addr.to_string(), "0.0.0.0:1234");
        assert_eq!(config.sqlite.path, PathBuf::from("./data/skysnap.db"));
        assert_eq!(config.kafka.topic, "skywalking-profilings");
        assert_eq!(config.retention.days.get(), 3);
        assert_eq!(config.shutdown.grace_ms, 20_000);
    }

    #[test]
    fn test_config_shipped_file_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/skysnap.yaml");
        let config = Config::load_with_env(Some(&path), &[]).unwrap();
        assert_eq!(config, Config::default());
    }

    #[test]
    fn test_config_env_overrides_file() {
        let f = file("grpc:\n  addr: 127.0.0.1:1\nretention:\n  days: 5\n");
        let config = Config::load_with_env(
            Some(f.path()),
            &env(&[
                ("SKYSNAP_GRPC_ADDR", "127.0.0.1:2"),
                ("SKYSNAP_AUTH_AGENT_TOKEN", "123"),
                ("SKYSNAP_SHUTDOWN_GRACE_MS", "500"),
                ("SKYSNAP_SERVER", "http://ignored"),
                ("SKYSNAP_SERVICE_HOST", "10.0.0.1"),
                ("SKYSNAP_RECEIVER_SERVICE_PORT_GRPC", "11800"),
                ("SKYSNAP_PORT", "tcp://10.0.0.1:11800"),
                ("SKYSNAP_PORT_11800_TCP_ADDR", "10.0.0.1"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.grpc.addr.to_string(), "127.0.0.1:2");
        assert_eq!(config.auth.agent_token.as_deref(), Some("123"));
        assert_eq!(config.shutdown.grace_ms, 500);
        assert_eq!(config.retention.days.get(), 5);
    }

    #[test]
    fn test_config_linger_read_under_its_old_name() {
        let f = file("pipeline:\n  batch_flush_interval_ms: 7\n");
        let config = Config::load_with_env(Some(f.path()), &[]).unwrap();
        assert_eq!(config.pipeline.batch_linger_ms, 7);
        let config = Config::load_with_env(
            None,
            &env(&[("SKYSNAP_PIPELINE_BATCH_FLUSH_INTERVAL_MS", "9")]),
        )
        .unwrap();
        assert_eq!(config.pipeline.batch_linger_ms, 9);
    }

    #[test]
    fn test_config_unknown_key_names_it() {
        let f = file("grpc:\n  adr: 127.0.0.1:1\n");
        let error = Config::load_with_env(Some(f.path()), &[])
            .unwrap_err()
            .to_string();
        assert!(error.contains("grpc"), "{error}");
        assert!(error.contains("adr"), "{error}");

        let error = Config::load_with_env(None, &env(&[("SKYSNAP_GRPC_ADR", "x")]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("grpc.adr"), "{error}");
        assert!(error.contains("SKYSNAP_GRPC_ADR"), "{error}");
    }

    #[test]
    fn test_config_bad_value_names_key() {
        let error = Config::load_with_env(None, &env(&[("SKYSNAP_GRPC_ADDR", "nonsense")]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("grpc.addr"), "{error}");

        let error = Config::load_with_env(None, &env(&[("SKYSNAP_RETENTION_DAYS", "many")]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("retention.days"), "{error}");

        let f = file("pipeline:\n  batch_max_bytes: 0\n");
        let error = Config::load_with_env(Some(f.path()), &[])
            .unwrap_err()
            .to_string();
        assert!(error.contains("pipeline.batch_max_bytes"), "{error}");
        assert!(error.contains("must be greater than zero"), "{error}");

        let error = Config::load_with_env(
            None,
            &env(&[
                ("SKYSNAP_PIPELINE_MODE", "discard"),
                ("SKYSNAP_KAFKA_BROKERS", "127.0.0.1:9092"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("kafka.brokers"), "{error}");
        let config =
            Config::load_with_env(None, &env(&[("SKYSNAP_PIPELINE_MODE", "discard")])).unwrap();
        assert_eq!(config.pipeline.mode, PipelineMode::Discard);

        let f = file("store:\n  kind: postgres\n");
        let error = Config::load_with_env(Some(f.path()), &[])
            .unwrap_err()
            .to_string();
        assert!(error.contains("store.kind"), "{error}");
    }

    #[test]
    fn test_config_clickhouse_cluster_and_servers() {
        let config = Config::load_with_env(
            None,
            &env(&[
                ("SKYSNAP_CLICKHOUSE_CLUSTER", "profiles_2x2"),
                (
                    "SKYSNAP_CLICKHOUSE_URL",
                    "http://ch-1:8123, http://ch-2:8123,",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(config.clickhouse.cluster, "profiles_2x2");
        assert_eq!(
            config.clickhouse.urls().collect::<Vec<_>>(),
            ["http://ch-1:8123", "http://ch-2:8123"]
        );
        assert_eq!(
            config.clickhouse.replication_path_prefix,
            "/clickhouse/tables"
        );
        for (variable, value, key) in [
            (
                "SKYSNAP_CLICKHOUSE_CLUSTER",
                "two words",
                "clickhouse.cluster",
            ),
            ("SKYSNAP_CLICKHOUSE_URL", " , ", "clickhouse.url"),
            (
                "SKYSNAP_CLICKHOUSE_REPLICATION_PATH_PREFIX",
                "tables",
                "clickhouse.replication_path_prefix",
            ),
            (
                "SKYSNAP_CLICKHOUSE_REPLICATION_PATH_PREFIX",
                "/it's",
                "clickhouse.replication_path_prefix",
            ),
        ] {
            let error = Config::load_with_env(None, &env(&[(variable, value)]))
                .unwrap_err()
                .to_string();
            assert!(error.contains(key), "{value}: {error}");
        }
    }

    #[test]
    fn test_config_empty_file_is_defaults() {
        let f = file("");
        assert_eq!(
            Config::load_with_env(Some(f.path()), &[]).unwrap(),
            Config::default()
        );
    }
}
