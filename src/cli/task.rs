//! `skysnap task create|list|show|logs`: readable tables, or `--json` for scripts.

use anyhow::{bail, Context as _};
use chrono::DateTime;
use serde_json::{json, Value};

use crate::model::{Task, TaskLog};

pub struct Client {
    server: String,
    token_opt: Option<String>,
    http: reqwest::Client,
}

impl Client {
    pub fn new(server: &str, token_opt: Option<String>) -> Client {
        Client {
            server: server.trim_end_matches('/').to_string(),
            token_opt: token_opt.filter(|token| !token.is_empty()),
            http: reqwest::Client::new(),
        }
    }

    async fn call(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let request = match &self.token_opt {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach skysnap at {}", self.server))?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .with_context(|| format!("skysnap answered {status} with a body that is not JSON"))?;
        if !status.is_success() {
            let reason = body
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no reason given");
            bail!("{status}: {reason}");
        }
        Ok(body)
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.server)
    }

    pub async fn create(&self, body: Value) -> anyhow::Result<Value> {
        self.call(self.http.post(self.url("/tasks")).json(&body))
            .await
    }

    pub async fn list(
        &self,
        service: Option<&str>,
        endpoint: Option<&str>,
    ) -> anyhow::Result<Value> {
        let mut query = Vec::new();
        if let Some(service) = service {
            query.push(("service", service));
        }
        if let Some(endpoint) = endpoint {
            query.push(("endpoint_name", endpoint));
        }
        self.call(self.http.get(self.url("/tasks")).query(&query))
            .await
    }

    pub async fn show(&self, id: &str) -> anyhow::Result<Value> {
        self.call(self.http.get(self.url(&format!("/tasks/{}", encode(id)))))
            .await
    }

    pub async fn logs(&self, id: &str) -> anyhow::Result<Value> {
        self.call(
            self.http
                .get(self.url(&format!("/tasks/{}/logs", encode(id)))),
        )
        .await
    }
}

/// Percent-encodes a path segment.
fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

pub struct NewTaskArgs {
    pub service: String,
    pub endpoint: String,
    pub start_time_opt: Option<i64>,
    pub duration: i64,
    pub min_duration_threshold: i64,
    pub dump_period: i64,
    pub max_sampling_count: i64,
}

pub fn create_body(args: &NewTaskArgs) -> Value {
    json!({
        "service": args.service,
        "endpoint_name": args.endpoint,
        "start_time": args.start_time_opt,
        "duration": args.duration,
        "min_duration_threshold": args.min_duration_threshold,
        "dump_period": args.dump_period,
        "max_sampling_count": args.max_sampling_count,
    })
}

fn time(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// Left-aligned columns, two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (index, cell) in row.iter().enumerate() {
            widths[index] = widths[index].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(index, cell)| format!("{cell:<width$}", width = widths[index]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.clone()));
    }
    out
}

pub fn tasks_table(tasks: &[Task]) -> String {
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|task| {
            vec![
                task.id.clone(),
                task.service.clone(),
                task.endpoint_name.clone(),
                time(task.start_time),
                format!("{}m", task.duration),
                format!("{}ms", task.min_duration_threshold),
                format!("{}ms", task.dump_period),
                task.max_sampling_count.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "SERVICE",
            "ENDPOINT",
            "START",
            "DURATION",
            "THRESHOLD",
            "DUMP PERIOD",
            "MAX SAMPLES",
        ],
        &rows,
    )
}

pub fn task_detail(task: &Task) -> String {
    let rows = vec![
        vec!["id".to_string(), task.id.clone()],
        vec!["service".to_string(), task.service.clone()],
        vec!["endpoint".to_string(), task.endpoint_name.clone()],
        vec!["start".to_string(), time(task.start_time)],
        vec!["end".to_string(), time(task.end_time())],
        vec!["duration".to_string(), format!("{} min", task.duration)],
        vec![
            "min duration threshold".to_string(),
            format!("{} ms", task.min_duration_threshold),
        ],
        vec![
            "dump period".to_string(),
            format!("{} ms", task.dump_period),
        ],
        vec![
            "max sampling count".to_string(),
            task.max_sampling_count.to_string(),
        ],
        vec!["created".to_string(), time(task.create_time)],
    ];
    table(&["FIELD", "VALUE"], &rows)
}

pub fn logs_table(logs: &[TaskLog]) -> String {
    let rows: Vec<Vec<String>> = logs
        .iter()
        .map(|log| {
            vec![
                time(log.operation_time),
                log.operation.name().to_string(),
                log.instance.clone(),
                log.service.clone(),
            ]
        })
        .collect();
    table(&["TIME", "OPERATION", "INSTANCE", "SERVICE"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cli_table_aligns_columns() {
        let out = table(&["A", "LONGER"], &[vec!["wide cell".into(), "x".into()]]);
        assert_eq!(out, "A          LONGER\nwide cell  x");
    }

    #[test]
    fn test_cli_encode_path_segment() {
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
        assert_eq!(encode("abc-123_~."), "abc-123_~.");
    }
}
