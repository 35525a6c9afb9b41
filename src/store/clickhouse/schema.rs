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
