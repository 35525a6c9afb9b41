//! The `skysnap` binary: `serve` runs the backend, `task …` talks to a running one.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use skysnap::analysis::stack_tree::Analysis;
use skysnap::cli::task::{self, Client, FlameFilterArgs, NewTaskArgs};
use skysnap::config::Config;
use skysnap::model::{Task, TaskLog};
use skysnap::store::clickhouse::schema::{self, ServerVersion};

/// Every snapshot is forty-odd small strings allocated on decode and freed after the
/// commit; glibc's allocator spent a quarter of the CPU on them under load (perf).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "skysnap",
    version,
    about = "Apache SkyWalking thread-profiling backend"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the backend: agent gRPC, HTTP API, metrics.
    Serve(ServeArgs),
    /// Move the Kafka snapshot topic into the store (pipeline.mode kafka).
    Consume(ServeArgs),
    /// Create and inspect profile tasks through a running skysnap's HTTP API.
    Task(TaskArgs),
    /// Print the ClickHouse DDL skysnap would apply (for `clickhouse.create_schema: false`).
    Schema(SchemaArgs),
    /// Generate agent load: streams of realistic snapshots, then check they are stored.
    Load(LoadArgs),
}

#[derive(Args)]
struct LoadArgs {
    /// skysnap's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:11800")]
    target: String,
    /// skysnap's HTTP API, for the tasks and the final check.
    #[arg(long, env = "SKYSNAP_SERVER", default_value = "http://127.0.0.1:12800")]
    server: String,
    /// Skip creating tasks and the final check through the HTTP API.
    #[arg(long)]
    no_check: bool,
    /// Agent token (`authentication` metadata).
    #[arg(long)]
    agent_token: Option<String>,
    /// Admin token for the HTTP API.
    #[arg(long, env = "SKYSNAP_AUTH_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Simulated agents (one service and instance each).
    #[arg(long, default_value_t = 4)]
    agents: usize,
    /// Concurrent streams per agent.
    #[arg(long, default_value_t = 2)]
    streams: usize,
    /// Snapshots per stream (the Java agent sends up to 500).
    #[arg(long, default_value_t = 500)]
    batch: i32,
    /// Which stacks: `realistic` (every segment distinct; stacks 10 to 200 frames deep
    /// drawn from --stack-shapes Zipf-popular shapes, each held for runs of 2 to 8 dumps)
    /// or `cycle` (each stream cycles through 4 segments of --depth frames, as earlier
    /// releases did).
    #[arg(long, value_enum, default_value_t = StackMode::Realistic)]
    stacks: StackMode,
    /// Stack shapes (code paths) of the realistic mix; each has 4 variants.
    #[arg(long, default_value_t = 2000)]
    stack_shapes: usize,
    /// Frames per stack (with --stacks cycle).
    #[arg(long, default_value_t = 40)]
    depth: usize,
    /// Distinct frame signatures to draw from (with --stacks cycle).
    #[arg(long, default_value_t = 3000)]
    frame_pool: usize,
    /// Snapshots per second over all streams; 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// How long to send, e.g. 10s, 2m, 10m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: std::time::Duration,
    /// Send trace segments (`TraceSegmentReportService/collect`) instead of snapshots, to
    /// any collector (skysnap or OAP): `--batch` segments per stream, agents x streams
    /// callers at once. Measures forwarding; nothing is checked afterwards.
    #[arg(long)]
    trace_segments: bool,
    /// Spans per trace segment (with --trace-segments).
    #[arg(long, default_value_t = 5)]
    spans: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StackMode {
    Realistic,
    Cycle,
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 10s or 2m"))?;
    match unit {
        "ms" => Ok(std::time::Duration::from_millis(value)),
        "" | "s" => Ok(std::time::Duration::from_secs(value)),
        "m" => Ok(std::time::Duration::from_secs(value * 60)),
        _ => Err(format!("{text:?} is not a duration like 10s or 2m")),
    }
}

fn load(args: LoadArgs) -> anyhow::Result<bool> {
    if args.trace_segments {
        return load_segments(args);
    }
    let options = skysnap::load::LoadOptions {
        target: args.target,
        http_opt: (!args.no_check).then_some(args.server.trim_end_matches('/').to_string()),
        agent_token_opt: args.agent_token,
        admin_token_opt: args.admin_token,
        agents: args.agents,
        streams_per_agent: args.streams,
        snapshots_per_stream: args.batch,
        stacks: match args.stacks {
            StackMode::Realistic => {
                skysnap::load::StackChoice::Realistic(skysnap::load_stacks::RealisticShape {
                    shapes: args.stack_shapes,
                    ..Default::default()
                })
            }
            StackMode::Cycle => skysnap::load::StackChoice::Cycle {
                depth: args.depth,
                frame_pool: args.frame_pool,
            },
        },
        rate: args.rate,
        duration: args.duration,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(skysnap::load::run(options))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", skysnap::load::render(&report));
    }
    Ok(report.missing_opt.unwrap_or(0) == 0)
}

fn load_segments(args: LoadArgs) -> anyhow::Result<bool> {
    let options = skysnap::load_segments::SegmentLoadOptions {
        target: args.target,
        agent_token_opt: args.agent_token,
        concurrency: args.agents.max(1) * args.streams.max(1),
        segments_per_stream: usize::try_from(args.batch.max(1)).unwrap_or(1),
        spans_per_segment: args.spans,
        service: "skysnap-load".into(),
        duration: args.duration,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(skysnap::load_segments::run(options))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", skysnap::load_segments::render(&report));
    }
    Ok(report.errors.is_empty())
}

#[derive(Args)]
struct SchemaArgs {
    /// YAML config file (its clickhouse.database and retention.days are used).
    #[arg(long, env = "SKYSNAP_CONFIG")]
    config: Option<PathBuf>,
    /// The ClickHouse server's version, e.g. 18.16 or 26.1 (default: a current server).
    #[arg(long)]
    server_version: Option<String>,
    /// Render for this cluster of the servers' `remote_servers` (default: the config's
    /// clickhouse.cluster; empty = a single node).
    #[arg(long)]
    cluster: Option<String>,
}

#[derive(Args)]
struct ServeArgs {
    /// YAML config file; without it ./config/skysnap.yaml is read when present.
    #[arg(long, env = "SKYSNAP_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides grpc.addr.
    #[arg(long)]
    grpc_addr: Option<String>,
    /// Overrides http.addr.
    #[arg(long)]
    http_addr: Option<String>,
    /// Overrides metrics.addr.
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Overrides store.kind.
    #[arg(long)]
    store_kind: Option<String>,
    /// Overrides sqlite.path.
    #[arg(long)]
    sqlite_path: Option<String>,
}

#[derive(Args)]
struct TaskArgs {
    /// skysnap's HTTP address.
    #[arg(
        long,
        env = "SKYSNAP_SERVER",
        default_value = "http://127.0.0.1:12800",
        global = true
    )]
    server: String,
    /// Admin token, sent as `Authorization: Bearer <token>`.
    #[arg(
        long,
        env = "SKYSNAP_AUTH_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    token: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: TaskCommand,
}

#[derive(Subcommand)]
enum TaskCommand {
    /// Create a profile task.
    Create {
        #[arg(long)]
        service: String,
        /// Endpoint name exactly as the agent names the entry span (e.g. `/orders`).
        #[arg(long)]
        endpoint: String,
        /// Epoch milliseconds; default now.
        #[arg(long)]
        start_time: Option<i64>,
        /// Minutes, 1 to 15.
        #[arg(long, default_value_t = 5)]
        duration: i64,
        /// Milliseconds a request must have run before its thread is dumped.
        #[arg(long, default_value_t = 200)]
        min_duration_threshold: i64,
        /// Milliseconds between dumps, at least 10.
        #[arg(long, default_value_t = 20)]
        dump_period: i64,
        /// Segments sampled per instance, 1 to 9.
        #[arg(long, default_value_t = 5)]
        max_sampling_count: i64,
    },
    /// List tasks, newest first.
    List {
        #[arg(long)]
        service: Option<String>,
        #[arg(long)]
        endpoint: Option<String>,
    },
    /// Show one task.
    Show { id: String },
    /// Show a task's NOTIFIED / EXECUTION_FINISHED logs.
    Logs { id: String },
    /// SkyWalking's stack tree of a task's segments: snapshots, duration and self
    /// duration per frame, hottest branch first.
    Analyze {
        id: String,
        /// Analyse only this segment (repeatable); default every segment of the task.
        #[arg(long)]
        segment: Vec<String>,
        /// Frames shown below each root before the rest is cut to "… N more".
        #[arg(long, default_value_t = 30)]
        depth: usize,
    },
    /// The hottest frames of a task by self and total snapshots, like `pprof -top`.
    Top {
        id: String,
        /// How many frames to show.
        #[arg(short = 'n', long = "count", default_value_t = 20)]
        count: usize,
        #[command(flatten)]
        filter: FlameFilter,
    },
    /// Download a task's flame graph: folded stacks, gzipped pprof or the JSON tree.
    Flamegraph {
        id: String,
        #[arg(long, default_value = "collapsed", value_parser = ["collapsed", "pprof", "json"])]
        format: String,
        /// File to write; `-` writes to standard output.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        #[command(flatten)]
        filter: FlameFilter,
    },
}

#[derive(Args)]
struct FlameFilter {
    /// Only this segment's snapshots.
    #[arg(long)]
    segment: Option<String>,
    /// Earliest dump time, epoch milliseconds (with --end).
    #[arg(long, requires = "end")]
    start: Option<i64>,
    /// Latest dump time, epoch milliseconds (with --start).
    #[arg(long, requires = "start")]
    end: Option<i64>,
}

impl FlameFilter {
    fn args(self) -> FlameFilterArgs {
        FlameFilterArgs {
            segment_opt: self.segment,
            start_opt: self.start,
            end_opt: self.end,
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SKYSNAP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn load_config(args: ServeArgs) -> anyhow::Result<Config> {
    let default_file = PathBuf::from("config/skysnap.yaml");
    let config_path = args
        .config
        .or_else(|| default_file.exists().then_some(default_file));
    // Flags are applied as their environment variables, so they are checked alike.
    let mut env: Vec<(String, String)> = std::env::vars().collect();
    let flags = [
        ("SKYSNAP_GRPC_ADDR", args.grpc_addr),
        ("SKYSNAP_HTTP_ADDR", args.http_addr),
        ("SKYSNAP_METRICS_ADDR", args.metrics_addr),
        ("SKYSNAP_STORE_KIND", args.store_kind),
        ("SKYSNAP_SQLITE_PATH", args.sqlite_path),
    ];
    for (variable, value) in flags {
        if let Some(value) = value {
            env.retain(|(name, _)| name != variable);
            env.push((variable.to_string(), value));
        }
    }
    let config = Config::load_with_env(config_path.as_deref(), &env)?;
    if let Some(path) = &config_path {
        tracing::info!(config = %path.display(), "configuration read");
    }
    Ok(config)
}

fn schema(args: SchemaArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref())?;
    let version = match args.server_version {
        Some(text) => ServerVersion::parse(&text).ok_or_else(|| {
            anyhow::anyhow!("--server-version {text:?} is not a version like 18.16")
        })?,
        None => ServerVersion::MODERN,
    };
    let cluster = args.cluster.unwrap_or(config.clickhouse.cluster.clone());
    if !skysnap::config::is_plain_name(&cluster) {
        anyhow::bail!("--cluster {cluster:?} is not a plain name: letters, digits, _");
    }
    let database = &config.clickhouse.database;
    let retention_days = config.retention.days.get();
    let text = if cluster.is_empty() {
        schema::render(version, database, retention_days)
    } else {
        schema::render_cluster(
            version,
            database,
            retention_days,
            schema::Cluster {
                name: &cluster,
                replication_path_prefix: &config.clickhouse.replication_path_prefix,
            },
        )
    };
    print!("{text}");
    Ok(())
}

async fn run_task(args: TaskArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.server, args.token);
    let output = match args.command {
        TaskCommand::Create {
            service,
            endpoint,
            start_time,
            duration,
            min_duration_threshold,
            dump_period,
            max_sampling_count,
        } => {
            let body = task::create_body(&NewTaskArgs {
                service,
                endpoint,
                start_time_opt: start_time,
                duration,
                min_duration_threshold,
                dump_period,
                max_sampling_count,
            });
            let value = client.create(body).await?;
            render(&value, args.json, |v| {
                Ok(task::task_detail(&serde_json::from_value::<Task>(v)?))
            })?
        }
        TaskCommand::List { service, endpoint } => {
            let value = client.list(service.as_deref(), endpoint.as_deref()).await?;
            render(&value, args.json, |v| {
                Ok(task::tasks_table(&serde_json::from_value::<Vec<Task>>(v)?))
            })?
        }
        TaskCommand::Show { id } => {
            let value = client.show(&id).await?;
            render(&value, args.json, |v| {
                Ok(task::task_detail(&serde_json::from_value::<Task>(v)?))
            })?
        }
        TaskCommand::Logs { id } => {
            let value = client.logs(&id).await?;
            render(&value, args.json, |v| {
                Ok(task::logs_table(&serde_json::from_value::<Vec<TaskLog>>(
                    v,
                )?))
            })?
        }
        TaskCommand::Analyze { id, segment, depth } => {
            // An unknown task is a clear 404 rather than an empty analysis, and a segment
            // must be one of the task's.
            client.show(&id).await?;
            if !segment.is_empty() {
                let segments = client.segments(&id).await?;
                let known: Vec<&str> = segments
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.get("segment_id").and_then(Value::as_str))
                    .collect();
                if let Some(unknown) = segment.iter().find(|s| !known.contains(&s.as_str())) {
                    anyhow::bail!("segment {unknown} is not a profiled segment of task {id}");
                }
            }
            let value = client.analyze(&id, &segment).await?;
            render(&value, args.json, |v| {
                Ok(task::analysis_text(
                    &serde_json::from_value::<Analysis>(v)?,
                    depth.max(1),
                ))
            })?
        }
        TaskCommand::Top { id, count, filter } => {
            let folded = client.flamegraph(&id, "collapsed", &filter.args()).await?;
            let text = String::from_utf8(folded).context("folded stacks are not UTF-8")?;
            let tree = skysnap::analysis::folded::parse(&text, usize::MAX)
                .map_err(|reason| anyhow::anyhow!("skysnap sent bad folded stacks: {reason}"))?;
            let frames = skysnap::analysis::top::top_frames(&tree);
            if args.json {
                let shown: Vec<_> = frames.iter().take(count).collect();
                serde_json::to_string_pretty(&serde_json::json!({
                    "total_samples": tree.total(),
                    "frames": shown,
                }))?
            } else {
                task::top_text(&frames, tree.total(), count)
            }
        }
        TaskCommand::Flamegraph {
            id,
            format,
            output,
            filter,
        } => {
            let body = client.flamegraph(&id, &format, &filter.args()).await?;
            if output.as_os_str() == "-" {
                use std::io::Write as _;
                std::io::stdout().write_all(&body)?;
                return Ok(());
            }
            std::fs::write(&output, &body)
                .with_context(|| format!("cannot write {}", output.display()))?;
            if args.json {
                serde_json::to_string_pretty(&serde_json::json!({
                    "file": output.display().to_string(),
                    "format": format,
                    "bytes": body.len(),
                }))?
            } else {
                format!(
                    "wrote {} bytes of {format} to {}",
                    body.len(),
                    output.display()
                )
            }
        }
    };
    println!("{output}");
    Ok(())
}

fn render(
    value: &Value,
    json: bool,
    table: impl FnOnce(Value) -> anyhow::Result<String>,
) -> anyhow::Result<String> {
    if json {
        return Ok(serde_json::to_string_pretty(value)?);
    }
    table(value.clone())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Consume(args) => load_config(args).and_then(skysnap::consume::run),
        Command::Serve(args) => load_config(args)
            .and_then(skysnap::server::run)
            .inspect(|clean| {
                if !clean {
                    tracing::error!("shutdown was not clean: see the errors above");
                }
            }),
        Command::Schema(args) => schema(args).map(|()| true),
        Command::Load(args) => load(args),
        Command::Task(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| runtime.block_on(run_task(args)))
            .map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("skysnap: {error:#}");
            ExitCode::FAILURE
        }
    }
}
