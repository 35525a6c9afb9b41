//! The DDL skysnap applies: `schemas/clickhouse.sql` as written for current servers,
//! with the configured database and retention, and for servers older than 20.1
//! (Debian's 18.16) without what they lack: table TTL (the retention actor drops
//! expired partitions instead), column codecs and LowCardinality.

/// The DDL for current servers, as users read it.
pub const SCHEMA_SQL: &str = include_str!("../../../schemas/clickhouse.sql");

/// Database and retention written in `schemas/clickhouse.sql`.
const FILE_DATABASE: &str = "skysnap";
const FILE_RETENTION: &str = "INTERVAL 3 DAY";

/// A server version, `major.minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion {
    pub major: u32,
    pub minor: u32,
}

impl ServerVersion {
    /// The first version with everything the file uses (TTL since 19.6, codecs and
    /// LowCardinality by default since 19.x; 20.1 is a safe line).
    pub const MODERN: ServerVersion = ServerVersion {
        major: 20,
        minor: 1,
    };

    /// Parses `18.16.1`, `26.1.2.3`, `24.8`.
    pub fn parse(text: &str) -> Option<ServerVersion> {
        let mut parts = text.trim().split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next().unwrap_or("0").parse().ok()?;
        Some(ServerVersion { major, minor })
    }

    pub fn is_modern(self) -> bool {
        self >= ServerVersion::MODERN
    }
}

impl std::fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The schema text for a server, database and retention.
pub fn render(version: ServerVersion, database: &str, retention_days: u32) -> String {
    let mut text = SCHEMA_SQL
        .replace(
            &format!("CREATE DATABASE IF NOT EXISTS {FILE_DATABASE};"),
            &format!("CREATE DATABASE IF NOT EXISTS {database};"),
        )
        .replace(&format!(" {FILE_DATABASE}."), &format!(" {database}."))
        .replace(FILE_RETENTION, &format!("INTERVAL {retention_days} DAY"));
    if version.is_modern() {
        return text;
    }
    text = strip_codecs(&text).replace("LowCardinality(String)", "String");
    let mut lines: Vec<String> = Vec::new();
    for line in text.lines() {
        if line.starts_with("TTL ") {
            // The TTL line closes its statement; the semicolon moves up a line.
            if line.trim_end().ends_with(';') {
                if let Some(previous) = lines.iter_mut().rev().find(|l| !l.trim().is_empty()) {
                    previous.push(';');
                }
            }
            continue;
        }
        lines.push(line.to_string());
    }
    let mut rendered = lines.join("\n");
    rendered.push('\n');
    rendered.replace(
        "-- Rows expire by TTL",
        "-- (Rendered for a server without table TTL: skysnap drops expired partitions.)\n-- Rows expire by TTL",
    )
}

/// A replicated, sharded cluster: the servers' `remote_servers` name and the ZooKeeper
/// (or Keeper) path under which the replicated tables keep their state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cluster<'a> {
    pub name: &'a str,
    /// The path of a table is `<prefix>/{shard}/<database>/<table>_local`.
    pub replication_path_prefix: &'a str,
}

/// The suffix of a cluster's shard-local tables; the `Distributed` table over them takes
/// the plain name, so that every query and every user reads the same names as on one
/// node.
pub const LOCAL_SUFFIX: &str = "_local";

/// How the rows of each table are spread over the shards. A key's rows always go to one
/// shard, so that the replacing merges and `FINAL` see all of them there:
/// a snapshot goes by (task, segment), so a segment's snapshots and its look-up row in
/// `profile_segment_task` are on one shard; a stack goes by its id (the dictionary holds
/// each stack once in the cluster, looked up by id, never joined shard-locally); a task
/// and its look-up row by the task id, its logs by the task id, a kept segment by its id.
pub fn sharding_key(table: &str) -> Option<&'static str> {
    Some(match table {
        "profile_task" | "profile_task_service" => "cityHash64(id)",
        "profile_task_log" => "cityHash64(task_id)",
        "profile_stack" => "cityHash64(stack_id)",
        "profile_snapshot" | "profile_segment_task" => "cityHash64(task_id, segment_id)",
        "profiled_segment" => "cityHash64(segment_id)",
        _ => return None,
    })
}

/// The column a look-up index is read for.
fn index_column(index: &str) -> &'static str {
    if index == "profile_task_service" {
        "service"
    } else {
        "task_id"
    }
}

/// The schema for a cluster: the single-node schema for the server version, made
/// `ON CLUSTER`, each table as `Replicated…MergeTree` shard-local table `<name>_local`
/// plus a `Distributed` table `<name>` over it (sharded by `sharding_key`); the
/// materialized views feed the local tables from the local tables, so that a look-up
/// row lives on the shard of the rows it stands for; the frames view joins the
/// dictionary `GLOBAL`ly (read once, sent to every shard).
pub fn render_cluster(
    version: ServerVersion,
    database: &str,
    retention_days: u32,
    cluster: Cluster<'_>,
) -> String {
    let single = render(version, database, retention_days);
    let on_cluster = format!("ON CLUSTER {}", cluster.name);
    let prefix = cluster.replication_path_prefix.trim_end_matches('/');
    let mut out: Vec<String> = vec![
        format!(
            "-- Rendered for the ClickHouse cluster `{}` (`skysnap schema --cluster {}`): each",
            cluster.name, cluster.name
        ),
        "-- table below is a Replicated…MergeTree table <name>_local on every node, replicated".into(),
        format!("-- through ZooKeeper under {prefix}/{{shard}}/{database}/<name>_local, and a Distributed table <name>"),
        "-- over them that spreads INSERTs by the table's sharding key and reads every shard".into(),
        "-- (one replica each). Read and write the plain names; a key's rows all lie on one".into(),
        "-- shard, so FINAL and LIMIT 1 BY the key stay exact. An IN subquery over another".into(),
        "-- Distributed table is written GLOBAL IN (or reads a _local table that is sharded".into(),
        "-- like the outer one: profile_segment_task with profile_snapshot, profile_task_service".into(),
        "-- with profile_task). Apply it on any one node; each statement runs on all:".into(),
        "--".into(),
        "--   clickhouse-client --multiquery < schemas/clickhouse-cluster.sql".into(),
        "--".into(),
        "-- The single-node schema's notes follow.".into(),
        "--".into(),
    ];
    // The table or view whose statement is being read, and its kind.
    let mut table_opt: Option<String> = None;
    let mut in_materialized_view = false;
    let qualified = |name: &str| format!("{database}.{name}");
    for line in single.lines() {
        let trimmed = line.trim();
        let mut line = line.to_string();
        if trimmed.starts_with("--") {
            // The examples' look-ups by the other key read the local index, which lies
            // on the shard of the rows it stands for.
            for index in ["profile_task_service", "profile_segment_task"] {
                line = line.replace(
                    &format!(
                        "(SELECT {} FROM {database}.{index} WHERE",
                        index_column(index)
                    ),
                    &format!(
                        "(SELECT {} FROM {database}.{index}{LOCAL_SUFFIX} WHERE",
                        index_column(index)
                    ),
                );
            }
            out.push(line);
            continue;
        }
        if let Some(rest) = line.strip_prefix("CREATE DATABASE IF NOT EXISTS ") {
            let name = rest.trim_end_matches(';');
            line = format!("CREATE DATABASE IF NOT EXISTS {name} {on_cluster};");
        } else if let Some(rest) = line.strip_prefix("CREATE TABLE IF NOT EXISTS ") {
            let name = rest
                .trim()
                .strip_prefix(&format!("{database}."))
                .unwrap_or(rest.trim())
                .to_string();
            line = format!(
                "CREATE TABLE IF NOT EXISTS {}{LOCAL_SUFFIX} {on_cluster}",
                qualified(&name)
            );
            table_opt = Some(name);
        } else if let Some(rest) = line.strip_prefix("CREATE MATERIALIZED VIEW IF NOT EXISTS ") {
            line = format!(
                "CREATE MATERIALIZED VIEW IF NOT EXISTS {} {on_cluster}",
                rest.trim()
            );
            in_materialized_view = true;
        } else if let Some(rest) = line.strip_prefix("CREATE VIEW IF NOT EXISTS ") {
            let name = rest.trim().trim_end_matches(" AS");
            line = format!("CREATE VIEW IF NOT EXISTS {name} {on_cluster} AS");
        } else if let Some(engine) = trimmed.strip_prefix("ENGINE = ") {
            if let (Some(table), Some(arguments)) = (&table_opt, engine.strip_suffix("()")) {
                line = format!(
                    "ENGINE = Replicated{arguments}('{prefix}/{{shard}}/{database}/{table}{LOCAL_SUFFIX}', '{{replica}}')"
                );
            }
        } else if in_materialized_view {
            // The view is fed by, and feeds, the shard-local tables.
            for keyword in ["TO ", "FROM "] {
                if let Some(rest) = trimmed.strip_prefix(keyword) {
                    let end = rest.find([' ', ';']).unwrap_or(rest.len());
                    let (name, tail) = rest.split_at(end);
                    line = format!("{keyword}{name}{LOCAL_SUFFIX}{tail}");
                }
            }
        } else if trimmed == "ANY LEFT JOIN" {
            line = "GLOBAL ANY LEFT JOIN".to_string();
        }
        let ends = trimmed.ends_with(';');
        out.push(line);
        if !ends {
            continue;
        }
        in_materialized_view = false;
        if let Some(table) = table_opt.take() {
            let key = sharding_key(&table).unwrap_or("rand()");
            out.push(String::new());
            out.push(format!(
                "CREATE TABLE IF NOT EXISTS {} {on_cluster} AS {}{LOCAL_SUFFIX}",
                qualified(&table),
                qualified(&table)
            ));
            out.push(format!(
                "ENGINE = Distributed({}, {database}, {table}{LOCAL_SUFFIX}, {key});",
                cluster.name
            ));
        }
    }
    let mut rendered = out.join("\n");
    rendered.push('\n');
    rendered
}

/// The table or view a `CREATE … IF NOT EXISTS <database>.<name>` statement makes.
pub fn created_name(statement: &str, database: &str) -> Option<String> {
    let rest = [
        "CREATE TABLE IF NOT EXISTS ",
        "CREATE VIEW IF NOT EXISTS ",
        "CREATE MATERIALIZED VIEW IF NOT EXISTS ",
    ]
    .iter()
    .find_map(|prefix| statement.strip_prefix(prefix))?;
    let name = rest.strip_prefix(database)?.strip_prefix('.')?;
    let end = name
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(name.len());
    Some(name[..end].to_string())
}

/// Removes every ` CODEC(...)` (nested parentheses included).
fn strip_codecs(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(" CODEC(") {
        out.push_str(&rest[..start]);
        let after = &rest[start + " CODEC(".len()..];
        let mut depth = 1;
        let mut end = after.len();
        for (index, ch) in after.char_indices() {
            match ch {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = index + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// The statements of a rendered schema, comments and blank lines dropped.
pub fn statements(schema: &str) -> Vec<String> {
    let mut statements = Vec::new();
    let mut current = String::new();
    for line in schema.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with("--") {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if trimmed.ends_with(';') {
            let statement = current.trim().trim_end_matches(';').to_string();
            statements.push(statement);
            current.clear();
        }
    }
    statements
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_schema_modern_is_the_file() {
        let modern = ServerVersion::parse("26.1.3.4").unwrap();
        assert_eq!(render(modern, "skysnap", 3), SCHEMA_SQL);
        let renamed = render(modern, "prof", 7);
        assert!(renamed.contains("CREATE TABLE IF NOT EXISTS prof.profile_snapshot"));
        assert!(renamed.contains("CREATE VIEW IF NOT EXISTS prof.profile_thread_snapshot"));
        assert!(renamed.contains("FROM prof.profile_stack"));
        assert!(renamed.contains("INTERVAL 7 DAY"));
        assert!(!renamed.contains("skysnap.profile"));
    }

    #[test]
    fn test_schema_legacy_drops_ttl_codecs_low_cardinality() {
        let legacy = render(ServerVersion::parse("18.16.1").unwrap(), "skysnap", 3);
        let statements_text = statements(&legacy).join("\n");
        assert!(!statements_text.contains("TTL"));
        assert!(!statements_text.contains("CODEC"));
        assert!(!statements_text.contains("LowCardinality"));
        assert!(legacy.contains("without table TTL: skysnap drops expired partitions"));
        let statements = statements(&legacy);
        assert_eq!(statements.len(), 11);
        for statement in &statements[1..] {
            assert!(
                statement.contains("ORDER BY") || statement.contains(" VIEW "),
                "{statement}"
            );
            assert!(!statement.contains(';'));
        }
        assert!(statements[10].ends_with("GROUP BY segment_id, task_id, day"));
        assert!(
            statements[3].contains("frames   Array(String)\n"),
            "{}",
            statements[3]
        );
        assert!(
            statements[6].contains("span_type           Array(String),\n"),
            "{}",
            statements[6]
        );
    }

    #[test]
    fn test_schema_statements_of_file() {
        let statements = statements(SCHEMA_SQL);
        assert_eq!(statements.len(), 11);
        assert!(statements[0].starts_with("CREATE DATABASE"));
        // Every table expires by TTL; the views hold no rows of their own.
        for statement in &statements[1..] {
            assert_eq!(
                statement.ends_with("INTERVAL 3 DAY"),
                statement.starts_with("CREATE TABLE"),
                "{statement}"
            );
        }
        assert!(statements[3].starts_with("CREATE TABLE IF NOT EXISTS skysnap.profile_stack"));
        assert!(statements[4].starts_with("CREATE TABLE IF NOT EXISTS skysnap.profile_snapshot"));
        assert!(
            statements[5].starts_with("CREATE VIEW IF NOT EXISTS skysnap.profile_thread_snapshot")
        );
        assert!(statements[6].starts_with("CREATE TABLE IF NOT EXISTS skysnap.profiled_segment"));
        assert!(
            statements[7].starts_with("CREATE TABLE IF NOT EXISTS skysnap.profile_task_service")
        );
        assert!(statements[10]
            .starts_with("CREATE MATERIALIZED VIEW IF NOT EXISTS skysnap.profile_segment_task_mv"));
    }

    const CLUSTER: Cluster<'static> = Cluster {
        name: "prof_cluster",
        replication_path_prefix: "/ch/tables/",
    };

    #[test]
    fn test_schema_cluster_local_and_distributed_tables() {
        for version in ["18.16", "26.1"] {
            let version = ServerVersion::parse(version).unwrap();
            let text = render_cluster(version, "prof", 7, CLUSTER);
            let statements = statements(&text);
            // Each of the seven tables twice (local and Distributed), the database, the
            // frames view and the two materialized views.
            assert_eq!(statements.len(), 18, "{text}");
            for statement in &statements {
                assert!(
                    statement.contains(" ON CLUSTER prof_cluster"),
                    "{statement}"
                );
                assert!(!statement.contains("skysnap"), "{statement}");
            }
            for table in [
                "profile_task",
                "profile_task_log",
                "profile_stack",
                "profile_snapshot",
                "profiled_segment",
                "profile_task_service",
                "profile_segment_task",
            ] {
                let local = statements
                    .iter()
                    .find(|s| {
                        s.starts_with(&format!("CREATE TABLE IF NOT EXISTS prof.{table}_local "))
                    })
                    .unwrap_or_else(|| panic!("no local table {table}"));
                assert!(
                    local.contains(&format!(
                        "ENGINE = ReplicatedReplacingMergeTree('/ch/tables/{{shard}}/prof/{table}_local', '{{replica}}')"
                    )),
                    "{local}"
                );
                assert_eq!(
                    local.contains("INTERVAL 7 DAY"),
                    version.is_modern(),
                    "{local}"
                );
                let distributed = format!(
                    "CREATE TABLE IF NOT EXISTS prof.{table} ON CLUSTER prof_cluster AS prof.{table}_local\n\
                     ENGINE = Distributed(prof_cluster, prof, {table}_local, {})",
                    sharding_key(table).unwrap()
                );
                assert!(statements.contains(&distributed), "{distributed}");
            }
            // A segment's snapshots and its look-up row go to one shard, by one key.
            assert_eq!(
                sharding_key("profile_snapshot"),
                sharding_key("profile_segment_task")
            );
            assert_eq!(
                sharding_key("profile_task"),
                sharding_key("profile_task_service")
            );
            let segment_mv = statements.last().unwrap();
            assert!(segment_mv.starts_with(
                "CREATE MATERIALIZED VIEW IF NOT EXISTS prof.profile_segment_task_mv ON CLUSTER prof_cluster\nTO prof.profile_segment_task_local\n"
            ), "{segment_mv}");
            assert!(
                segment_mv.contains("FROM prof.profile_snapshot_local\n"),
                "{segment_mv}"
            );
            let task_mv = statements
                .iter()
                .find(|s| s.contains("profile_task_service_mv"))
                .unwrap();
            assert!(
                task_mv.contains("TO prof.profile_task_service_local\n"),
                "{task_mv}"
            );
            assert!(
                task_mv.ends_with("FROM prof.profile_task_local"),
                "{task_mv}"
            );
            let view = statements
                .iter()
                .find(|s| s.contains("VIEW IF NOT EXISTS prof.profile_thread_snapshot"))
                .unwrap();
            assert!(
                view.contains("FROM prof.profile_snapshot\nGLOBAL ANY LEFT JOIN"),
                "{view}"
            );
            // The examples in the comments read the look-up indexes shard-locally.
            assert!(text.contains("(SELECT service FROM prof.profile_task_service_local WHERE"));
            assert!(text.contains("(SELECT task_id FROM prof.profile_segment_task_local WHERE"));
        }
    }

    #[test]
    fn test_schema_cluster_file_is_the_rendering() {
        let file = include_str!("../../../schemas/clickhouse-cluster.sql");
        let rendered = render_cluster(
            ServerVersion::MODERN,
            "skysnap",
            3,
            Cluster {
                name: "skysnap_cluster",
                replication_path_prefix: "/clickhouse/tables",
            },
        );
        assert!(
            file == rendered,
            "schemas/clickhouse-cluster.sql is stale: skysnap schema --cluster skysnap_cluster > schemas/clickhouse-cluster.sql"
        );
    }

    #[test]
    fn test_schema_created_names() {
        let text = render_cluster(ServerVersion::MODERN, "skysnap", 3, CLUSTER);
        let names: Vec<String> = statements(&text)
            .iter()
            .filter_map(|statement| created_name(statement, "skysnap"))
            .collect();
        assert_eq!(names.len(), 17);
        assert!(names.contains(&"profile_snapshot_local".to_string()));
        assert!(names.contains(&"profile_snapshot".to_string()));
        assert!(names.contains(&"profile_segment_task_mv".to_string()));
        assert!(names.contains(&"profile_thread_snapshot".to_string()));
        assert_eq!(
            created_name("CREATE DATABASE IF NOT EXISTS skysnap", "skysnap"),
            None
        );
        assert_eq!(
            created_name("CREATE TABLE IF NOT EXISTS other.t (x UInt8)", "skysnap"),
            None
        );
    }

    #[test]
    fn test_server_version_parse() {
        assert_eq!(
            ServerVersion::parse("18.16.1"),
            Some(ServerVersion {
                major: 18,
                minor: 16
            })
        );
        assert!(!ServerVersion::parse("18.16.1").unwrap().is_modern());
        assert!(ServerVersion::parse("20.1").unwrap().is_modern());
        assert_eq!(ServerVersion::parse("x"), None);
    }
}
