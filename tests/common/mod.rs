//! Helpers for the integration tests: the real `skysnap serve` binary on loopback
//! ports, a gRPC client from `proto/`, and small HTTP and metrics readers.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use skysnap::proto::v3::profile_task_client::ProfileTaskClient;
use skysnap::proto::v3::{ProfileTaskCommandQuery, ThreadSnapshot, ThreadStack};
use tonic::transport::Channel;

/// The binary with none of the caller's `SKYSNAP_*` variables (the test command's own
/// `SKYSNAP_TEST_*` among them): skysnap refuses variables it does not know.
pub fn skysnap_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_skysnap"));
    for (name, _) in std::env::vars() {
        if name.starts_with("SKYSNAP_") {
            command.env_remove(name);
        }
    }
    command
}

pub struct Server {
    child: Option<Child>,
    pub grpc: String,
    pub http: String,
    pub metrics: String,
    pub dir: PathBuf,
    /// Keeps the folder until the test ends.
    _temp: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts skysnap in a fresh folder with the given extra environment.
    pub fn start(env: &[(&str, &str)]) -> Server {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().to_path_buf();
        let mut server = Server::start_in(&dir, env);
        server._temp = Some(temp);
        server
    }

    /// Starts skysnap in `dir` (its database is `dir/skysnap.db`).
    pub fn start_in(dir: &Path, env: &[(&str, &str)]) -> Server {
        let stderr = std::fs::File::create(dir.join("stderr.log")).expect("stderr file");
        let mut command = skysnap_command();
        command
            .args([
                "serve",
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .current_dir(dir)
            .env("SKYSNAP_SQLITE_PATH", dir.join("skysnap.db"))
            .env("SKYSNAP_TASKS_LOG_FLUSH_INTERVAL_MS", "20")
            .env("SKYSNAP_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("skysnap binary starts");
        let stdout = child.stdout.take().expect("stdout");
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("skysnap ready") {
                    let _ = sender.send(line);
                }
            }
        });
        let line = match receiver.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "skysnap did not start:\n{}",
                    std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
                );
            }
        };
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|part| part.strip_prefix(&format!("{name}=")))
                .expect("address in ready line")
                .to_string()
        };
        Server {
            grpc: format!("http://{}", field("grpc")),
            http: format!("http://{}", field("http")),
            metrics: format!("http://{}/metrics", field("metrics")),
            dir: dir.to_path_buf(),
            child: Some(child),
            _temp: None,
        }
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.join("skysnap.db")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Waits for the process to exit by itself, at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            if started.elapsed() > timeout {
                let _ = child.kill();
                panic!(
                    "skysnap did not exit within {timeout:?}:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        self.signal("TERM");
        let status = self.wait(Duration::from_secs(30));
        assert!(
            status.success(),
            "skysnap exited {status}:\n{}",
            self.stderr()
        );
    }

    pub async fn profile_client(&self) -> ProfileTaskClient<Channel> {
        ProfileTaskClient::connect(self.grpc.clone())
            .await
            .expect("grpc connects")
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = reqwest::Client::new()
            .get(format!("{}{path}", self.http))
            .send()
            .await
            .expect("http get");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let response = reqwest::Client::new()
            .post(format!("{}{path}", self.http))
            .json(&body)
            .send()
            .await
            .expect("http post");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Creates a task that starts now and returns its JSON.
    pub async fn create_task(&self, service: &str, endpoint: &str) -> Value {
        let (status, task) = self
            .post(
                "/api/v1/tasks",
                serde_json::json!({
                    "service": service,
                    "endpoint_name": endpoint,
                    "duration": 5,
                    "min_duration_threshold": 100,
                    "dump_period": 20,
                    "max_sampling_count": 5,
                }),
            )
            .await;
        assert_eq!(status, 201, "{task}");
        task
    }

    /// The sum of a metric's samples whose labels contain every given `key="value"`.
    pub async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        parse_metric(&self.scrape().await, name, labels)
    }

    /// The `/metrics` text.
    pub async fn scrape(&self) -> String {
        reqwest::get(&self.metrics)
            .await
            .expect("metrics reachable")
            .text()
            .await
            .expect("metrics text")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn parse_metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, l)) => (n, l),
                None => (series, ""),
            };
            if series_name != name || !labels.iter().all(|label| series_labels.contains(label)) {
                return None;
            }
            value.parse::<f64>().ok()
        })
        .sum()
}

pub fn snapshot(task_id: &str, segment_id: &str, sequence: i32) -> ThreadSnapshot {
    ThreadSnapshot {
        task_id: task_id.to_string(),
        trace_segment_id: segment_id.to_string(),
        time: 1_700_000_000_000 + i64::from(sequence) * 20,
        sequence,
        stack: Some(ThreadStack {
            code_signatures: (0..10)
                .map(|depth| {
                    format!(
                        "com.example.Service{depth}.method{depth}:{}",
                        depth * 10 + sequence % 3
                    )
                })
                .collect(),
        }),
    }
}

/// Polls `check` until it returns Some, at most `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < timeout,
            "condition not met within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Rows in the snapshot table, read straight from the SQLite file; 0 while the file
/// exists but skysnap has not created its tables yet (a process that just started).
pub fn snapshot_rows(db: &Path, segment_like: &str) -> i64 {
    let connection = rusqlite::Connection::open(db).expect("open db");
    let counted = connection.query_row(
        "SELECT COUNT(*) FROM profile_thread_snapshot WHERE segment_id LIKE ?1",
        [segment_like],
        |row| row.get(0),
    );
    match counted {
        Ok(rows) => rows,
        Err(error) if error.to_string().contains("no such table") => 0,
        Err(error) => panic!("count snapshot rows in {}: {error}", db.display()),
    }
}

/// The ClickHouse server the test command started (Debian's 18.16 on loopback).
pub fn clickhouse_url() -> String {
    std::env::var("SKYSNAP_TEST_CLICKHOUSE_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:18123".to_string())
}

/// A fresh database name for one test.
pub fn fresh_database(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Runs SQL over ClickHouse's HTTP interface and returns the text answer.
pub async fn clickhouse(sql: &str) -> String {
    let response = reqwest::Client::new()
        .post(clickhouse_url())
        .body(sql.to_string())
        .send()
        .await
        .unwrap_or_else(|error| {
            panic!(
                "ClickHouse is not reachable at {} ({error}); run the tests through ./scripts/test.sh, \
                 which starts it",
                clickhouse_url()
            )
        });
    let status = response.status();
    let text = response.text().await.expect("clickhouse answer");
    assert!(status.is_success(), "clickhouse refused {sql}: {text}");
    text
}

/// A single number answered by ClickHouse.
pub async fn clickhouse_count(sql: &str) -> i64 {
    clickhouse(sql).await.trim().parse().expect("a number")
}

/// The Kafka broker the test command started (Apache Kafka 4.x, KRaft, loopback).
pub fn kafka_brokers() -> String {
    std::env::var("SKYSNAP_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".to_string())
}

/// Creates a fresh topic with the given partitions and returns its name.
pub async fn fresh_topic(prefix: &str, partitions: i32) -> String {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let name = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()
        .expect("kafka admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(&name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await
        .unwrap_or_else(|error| {
            panic!(
                "Kafka is not reachable at {} ({error}); run the tests through ./scripts/test.sh, which starts it",
                kafka_brokers()
            )
        });
    for result in results {
        result.expect("topic created");
    }
    name
}

/// One message read back from a topic.
pub struct TopicMessage {
    pub key: Vec<u8>,
    pub partition: i32,
    pub snapshot: ThreadSnapshot,
}

/// Reads every message now in the topic (up to each partition's end offset), decoding
/// each value as a `ThreadSnapshot`.
pub fn read_topic(topic: &str) -> Vec<TopicMessage> {
    use prost::Message as _;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set(
            "group.id",
            format!("reader-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .create()
        .expect("kafka consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("topic metadata");
    let partitions: Vec<i32> = metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.id())
        .collect();
    let mut assignment = TopicPartitionList::new();
    let mut remaining = 0i64;
    let mut ends = std::collections::HashMap::new();
    for partition in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, *partition, Duration::from_secs(10))
            .expect("watermarks");
        assignment
            .add_partition_offset(topic, *partition, Offset::Beginning)
            .unwrap();
        remaining += high - low;
        ends.insert(*partition, high);
    }
    consumer.assign(&assignment).expect("assign");
    let mut messages = Vec::new();
    let started = Instant::now();
    while (messages.len() as i64) < remaining {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "topic {topic} not read in time"
        );
        let Some(result) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = result.expect("kafka message");
        if message.offset() >= ends[&message.partition()] {
            continue;
        }
        let snapshot = ThreadSnapshot::decode(message.payload().unwrap_or_default())
            .expect("value is a ThreadSnapshot");
        messages.push(TopicMessage {
            key: message.key().unwrap_or_default().to_vec(),
            partition: message.partition(),
            snapshot,
        });
    }
    messages
}

/// `skysnap consume` as a child process.
pub struct Consumer {
    pub child: Child,
    pub dir: PathBuf,
    /// Names this consumer's log and output files.
    id: String,
}

impl Consumer {
    pub fn start(dir: &Path, env: &[(&str, &str)]) -> Consumer {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let stderr =
            std::fs::File::create(dir.join(format!("consume-{id}.log"))).expect("log file");
        let stdout =
            std::fs::File::create(dir.join(format!("consume-{id}.out"))).expect("out file");
        let mut command = skysnap_command();
        command
            .args(["consume", "--metrics-addr", "127.0.0.1:0"])
            .current_dir(dir)
            .env("SKYSNAP_KAFKA_BROKERS", kafka_brokers())
            .env("SKYSNAP_KAFKA_CONSUME_BATCH_WAIT_MS", "100")
            .stdout(stdout)
            .stderr(stderr);
        for (key, value) in env {
            command.env(key, value);
        }
        Consumer {
            child: command.spawn().expect("skysnap consume starts"),
            dir: dir.to_path_buf(),
            id,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("consume-{}.log", self.id)))
            .unwrap_or_default()
    }

    /// This consumer's `/metrics` text (empty before it is ready).
    pub async fn scrape(&self) -> String {
        let out = std::fs::read_to_string(self.dir.join(format!("consume-{}.out", self.id)))
            .unwrap_or_default();
        let Some(addr) = out
            .split_whitespace()
            .find_map(|part| part.strip_prefix("metrics="))
        else {
            return String::new();
        };
        reqwest::get(format!("http://{addr}/metrics"))
            .await
            .expect("consumer metrics")
            .text()
            .await
            .unwrap()
    }

    /// The snapshots this consumer committed, from its `/metrics`.
    pub async fn committed(&self) -> f64 {
        parse_metric(
            &self.scrape().await,
            "skysnap_snapshots_committed_total",
            &[],
        )
    }

    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }

    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                assert!(status.success(), "consume exited {status}:\n{}", self.log());
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "consume did not stop:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which streams of a load were acknowledged and which refused (with their code).
#[derive(Default)]
pub struct LoadOutcome {
    pub acknowledged: Vec<String>,
    pub refused: std::collections::HashMap<String, tonic::Code>,
}

/// Starts `workers` clients that each send streams of `per_stream` snapshots, one fresh
/// segment `<prefix>-<worker>-<round>` per stream, until `until`; a refused stream is
/// noted and the worker goes on after a pause. The outcome can be read during the load.
pub async fn spawn_stream_load(
    server: &Server,
    prefix: &str,
    workers: usize,
    per_stream: i32,
    until: Instant,
) -> (
    std::sync::Arc<std::sync::Mutex<LoadOutcome>>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let outcome = std::sync::Arc::new(std::sync::Mutex::new(LoadOutcome::default()));
    let mut handles = Vec::new();
    for worker in 0..workers {
        let mut client = server.profile_client().await;
        let outcome = outcome.clone();
        let prefix = prefix.to_string();
        handles.push(tokio::spawn(async move {
            let mut round = 0;
            while Instant::now() < until {
                round += 1;
                let segment = format!("{prefix}-{worker}-{round}");
                let messages: Vec<ThreadSnapshot> = (0..per_stream)
                    .map(|n| snapshot(&format!("task-{prefix}"), &segment, n))
                    .collect();
                match client.collect_snapshot(tokio_stream::iter(messages)).await {
                    Ok(_) => outcome.lock().unwrap().acknowledged.push(segment),
                    Err(status) => {
                        outcome
                            .lock()
                            .unwrap()
                            .refused
                            .insert(segment, status.code());
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }));
    }
    (outcome, handles)
}

/// Runs `scripts/services/<name>.sh <action>` (stop or start a shared test server).
pub fn service(name: &str, action: &str) {
    let script = format!("{}/scripts/services/{name}.sh", env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(&script)
        .arg(action)
        .output()
        .expect("service script runs");
    assert!(
        output.status.success(),
        "{name}.sh {action}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs a stream load of 8 workers × 500 snapshots until `load_for` has passed, and
/// stops the shared test server `service_name` for `down_for` from its third second on.
/// Answers how many streams were acknowledged before the outage, and the whole outcome.
pub async fn load_through_outage(
    server: &Server,
    prefix: &str,
    load_for: Duration,
    service_name: &str,
    down_for: Duration,
) -> (usize, LoadOutcome) {
    let (outcome, workers) =
        spawn_stream_load(server, prefix, 8, 500, Instant::now() + load_for).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let acknowledged_before = outcome.lock().unwrap().acknowledged.len();
    service(service_name, "stop");
    tokio::time::sleep(down_for).await;
    service(service_name, "start");
    for worker in workers {
        worker.await.unwrap();
    }
    let outcome = std::mem::take(&mut *outcome.lock().unwrap());
    (acknowledged_before, outcome)
}

/// Polls `getProfileTaskCommands` for (service, instance) until it hands out a command.
pub async fn wait_for_commands(
    client: &ProfileTaskClient<Channel>,
    service: &str,
    instance: &str,
    timeout: Duration,
) {
    eventually(timeout, || {
        let mut client = client.clone();
        let query = ProfileTaskCommandQuery {
            service: service.to_string(),
            service_instance: instance.to_string(),
            last_command_time: -1,
        };
        async move {
            let commands = client
                .get_profile_task_commands(query)
                .await
                .unwrap()
                .into_inner()
                .commands;
            (!commands.is_empty()).then_some(())
        }
    })
    .await
}

/// Ten snapshots of one segment dumped `age_ms` before now, for retention tests.
pub fn aged_segment(segment: &str, age_ms: i64) -> Vec<ThreadSnapshot> {
    let time = chrono::Utc::now().timestamp_millis() - age_ms;
    (0..10)
        .map(|sequence| ThreadSnapshot {
            time,
            ..snapshot("task-ret", segment, sequence)
        })
        .collect()
}

/// A test CA (`ca.pem`) and a certificate for `localhost` it signed (`cert.pem`,
/// `key.pem`), made with the openssl command.
pub fn make_certificates(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            status.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&status.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "1",
        "-subj",
        "/CN=skysnap-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ];
    ca.extend_from_slice(&ec);
    run(&ca);
    let mut csr = vec![
        "req",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "key.pem",
        "-out",
        "leaf.csr",
    ];
    csr.extend_from_slice(&ec);
    run(&csr);
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "leaf.ext",
        "-out",
        "cert.pem",
    ]);
}

/// Creates a topic of the given name (the broker does not create topics by itself).
pub async fn create_topic(name: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()
        .expect("kafka admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await
        .expect("kafka reachable");
    for result in results {
        result.expect("topic created");
    }
}

/// Produces raw messages (key, value; `None` value = a tombstone) and answers where each
/// landed: (partition, offset).
pub async fn produce_raw(topic: &str, messages: &[(&[u8], Option<Vec<u8>>)]) -> Vec<(i32, i64)> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .create()
        .expect("kafka producer");
    let mut placed = Vec::new();
    for (key, value_opt) in messages {
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).key(key);
        if let Some(value) = value_opt {
            record = record.payload(value.as_slice());
        }
        let delivery = producer
            .send(record, Duration::from_secs(10))
            .await
            .unwrap_or_else(|(error, _)| panic!("produce to {topic}: {error}"));
        placed.push((delivery.partition, delivery.offset));
    }
    placed
}

/// One message read back as bytes, with its headers.
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub key_opt: Option<Vec<u8>>,
    pub value_opt: Option<Vec<u8>>,
    pub headers: std::collections::HashMap<String, String>,
    pub partition: i32,
    pub offset: i64,
}

/// Every message now in the topic, as bytes (up to each partition's end offset).
pub fn read_topic_raw(topic: &str) -> Vec<RawMessage> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set(
            "group.id",
            format!("reader-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .create()
        .expect("kafka consumer");
    let mut assignment = TopicPartitionList::new();
    let mut remaining = 0i64;
    let mut ends = std::collections::HashMap::new();
    for (partition, low, high) in watermarks(&consumer, topic) {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .unwrap();
        remaining += high - low;
        ends.insert(partition, high);
    }
    consumer.assign(&assignment).expect("assign");
    let mut messages = Vec::new();
    let started = Instant::now();
    while (messages.len() as i64) < remaining {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "topic {topic} not read in time"
        );
        let Some(result) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = result.expect("kafka message");
        if message.offset() >= ends[&message.partition()] {
            continue;
        }
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|header| {
                        let value = header.value.unwrap_or_default();
                        (
                            header.key.to_string(),
                            String::from_utf8_lossy(value).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        messages.push(RawMessage {
            key_opt: message.key().map(<[u8]>::to_vec),
            value_opt: message.payload().map(<[u8]>::to_vec),
            headers,
            partition: message.partition(),
            offset: message.offset(),
        });
    }
    messages
}

/// (partition, low, high) of each partition of the topic.
fn watermarks(consumer: &impl rdkafka::consumer::Consumer, topic: &str) -> Vec<(i32, i64, i64)> {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("topic metadata");
    metadata.topics()[0]
        .partitions()
        .iter()
        .map(|partition| {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition.id(), Duration::from_secs(10))
                .expect("watermarks");
            (partition.id(), low, high)
        })
        .collect()
}

/// Per partition of the topic: the group's committed offset (`None` before any commit)
/// and the partition's end offset.
pub fn committed_and_end_offsets(
    group: &str,
    topic: &str,
) -> std::collections::BTreeMap<i32, (Option<i64>, i64)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("kafka consumer");
    let ends = watermarks(&consumer, topic);
    let mut partitions = TopicPartitionList::new();
    for (partition, _, _) in &ends {
        partitions.add_partition(topic, *partition);
    }
    let committed = consumer
        .committed_offsets(partitions, Duration::from_secs(10))
        .expect("committed offsets");
    ends.into_iter()
        .map(|(partition, _, high)| {
            let offset =
                committed
                    .find_partition(topic, partition)
                    .and_then(|element| match element.offset() {
                        Offset::Offset(offset) => Some(offset),
                        _ => None,
                    });
            (partition, (offset, high))
        })
        .collect()
}

/// Agents that each send paced streams of `per_stream` snapshots, one after another
/// (paced, so that some stream is always open), until one is refused or `stop_at`
/// passes: the load under which a process is stopped or killed.
pub struct PacedAgents {
    acknowledged: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    refused: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl PacedAgents {
    pub fn start(
        grpc: &str,
        task_id: &str,
        prefix: &str,
        agents: usize,
        per_stream: i32,
        stop_at_opt: Option<Instant>,
    ) -> PacedAgents {
        let acknowledged: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
        let refused: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
        let workers = (0..agents)
            .map(|agent| {
                let (grpc, task_id, prefix) =
                    (grpc.to_string(), task_id.to_string(), prefix.to_string());
                let (acknowledged, refused) = (acknowledged.clone(), refused.clone());
                tokio::spawn(async move {
                    let Ok(mut client) = ProfileTaskClient::connect(grpc).await else {
                        return;
                    };
                    for round in 0.. {
                        if stop_at_opt.is_some_and(|stop_at| Instant::now() > stop_at) {
                            return;
                        }
                        let segment = format!("{prefix}-{agent}-{round}");
                        let messages: Vec<ThreadSnapshot> = (0..per_stream)
                            .map(|n| snapshot(&task_id, &segment, n))
                            .collect();
                        let stream = futures::StreamExt::then(
                            tokio_stream::iter(messages),
                            |message| async move {
                                if message.sequence % 20 == 0 {
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                }
                                message
                            },
                        );
                        match client.collect_snapshot(stream).await {
                            Ok(_) => acknowledged.lock().unwrap().push(segment),
                            Err(_) => {
                                refused.lock().unwrap().push(segment);
                                return;
                            }
                        }
                    }
                })
            })
            .collect();
        PacedAgents {
            acknowledged,
            refused,
            workers,
        }
    }

    /// Waits for every agent to stop; answers the acknowledged and the refused streams.
    pub async fn finish(self, within: Duration) -> (Vec<String>, Vec<String>) {
        let deadline = Instant::now() + within;
        for worker in self.workers {
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::timeout(left, worker)
                .await
                .expect("every agent learns how its last stream ended")
                .unwrap();
        }
        let acknowledged = self.acknowledged.lock().unwrap().clone();
        let refused = self.refused.lock().unwrap().clone();
        (acknowledged, refused)
    }
}
