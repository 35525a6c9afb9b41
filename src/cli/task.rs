//! `skysnap task create|list|show|logs|analyze|top|flamegraph`: readable tables, or
//! `--json` for scripts. Every command is a client of the HTTP API.

use anyhow::{bail, Context as _};
use chrono::DateTime;
use serde_json::{json, Value};

use crate::analysis::stack_tree::{Analysis, StackElement};
use crate::analysis::top::FrameSamples;
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

    /// Sends the request; a non-2xx answer becomes an error with the API's reason.
    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let request = match &self.token_opt {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach skysnap at {}", self.server))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body: Value = response
            .json()
            .await
            .with_context(|| format!("skysnap answered {status} with a body that is not JSON"))?;
        let reason = body
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("no reason given");
        bail!("{status}: {reason}");
    }

    async fn call(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let response = self.send(request).await?;
        let status = response.status();
        response
            .json()
            .await
            .with_context(|| format!("skysnap answered {status} with a body that is not JSON"))
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

impl Client {
    pub async fn segments(&self, id: &str) -> anyhow::Result<Value> {
        self.call(
            self.http
                .get(self.url(&format!("/tasks/{}/segments", encode(id)))),
        )
        .await
    }

    /// The stack trees of a task's segments (`segments` empty: all of them).
    pub async fn analyze(&self, task_id: &str, segments: &[String]) -> anyhow::Result<Value> {
        let query: Vec<(&str, &str)> = if segments.is_empty() {
            vec![("task", task_id)]
        } else {
            segments
                .iter()
                .map(|segment| ("segment", segment.as_str()))
                .collect()
        };
        self.call(self.http.get(self.url("/analysis")).query(&query))
            .await
    }

    /// A task's flame graph in `format` (json, collapsed or pprof) as the API sends it.
    pub async fn flamegraph(
        &self,
        task_id: &str,
        format: &str,
        filter: &FlameFilterArgs,
    ) -> anyhow::Result<Vec<u8>> {
        let mut query = vec![("format", format.to_string())];
        if let Some(segment) = &filter.segment_opt {
            query.push(("segment", segment.clone()));
        }
        if let Some(start) = filter.start_opt {
            query.push(("start", start.to_string()));
        }
        if let Some(end) = filter.end_opt {
            query.push(("end", end.to_string()));
        }
        let url = self.url(&format!("/tasks/{}/flamegraph", encode(task_id)));
        let response = self.send(self.http.get(url).query(&query)).await?;
        Ok(response.bytes().await?.to_vec())
    }
}

/// The filters a task's flame graph takes.
#[derive(Debug, Clone, Default)]
pub struct FlameFilterArgs {
    pub segment_opt: Option<String>,
    pub start_opt: Option<i64>,
    pub end_opt: Option<i64>,
}

/// The stack trees, indented, one node a line with its snapshots, duration and self
/// duration; hottest branches first (the API's order), cut below `max_depth` frames
/// with a line that says how many frames are hidden there.
pub fn analysis_text(analysis: &Analysis, max_depth: usize) -> String {
    let mut out = String::new();
    if let Some(tip) = &analysis.tip {
        out.push_str(&format!("tip: {tip}\n"));
    }
    if analysis.trees.is_empty() {
        return out.trim_end().to_string();
    }
    out.push_str(&format!(
        "{:>8}  {:>10}  {:>10}  FRAME\n",
        "SAMPLES", "DURATION", "SELF"
    ));
    for tree in &analysis.trees {
        // Children by parent, in the API's order (ids are breadth first, hottest first).
        let mut children: std::collections::HashMap<u32, Vec<&StackElement>> =
            std::collections::HashMap::new();
        for element in &tree.elements {
            children.entry(element.parent_id).or_default().push(element);
        }
        let descendants = |id: u32| -> usize {
            let mut count = 0;
            let mut pending = vec![id];
            while let Some(node) = pending.pop() {
                for child in children.get(&node).into_iter().flatten() {
                    count += 1;
                    pending.push(child.id);
                }
            }
            count
        };
        let mut pending: Vec<(&StackElement, usize)> = children
            .get(&0)
            .into_iter()
            .flatten()
            .rev()
            .map(|root| (*root, 0))
            .collect();
        while let Some((element, depth)) = pending.pop() {
            out.push_str(&format!(
                "{:>8}  {:>8}ms  {:>8}ms  {}{}\n",
                element.count,
                element.duration,
                element.duration_child_excluded,
                "  ".repeat(depth),
                element.code_signature
            ));
            if depth + 1 >= max_depth {
                let hidden = descendants(element.id);
                if hidden > 0 {
                    out.push_str(&format!(
                        "{:>8}  {:>10}  {:>10}  {}… {hidden} more\n",
                        "",
                        "",
                        "",
                        "  ".repeat(depth + 1)
                    ));
                }
                continue;
            }
            for child in children.get(&element.id).into_iter().flatten().rev() {
                pending.push((child, depth + 1));
            }
        }
    }
    out.trim_end().to_string()
}

/// `pprof -top` style: the `limit` frames with the most self samples.
pub fn top_text(frames: &[FrameSamples], total: u64, limit: usize) -> String {
    let percent = |samples: u64| {
        if total == 0 {
            0.0
        } else {
            100.0 * samples as f64 / total as f64
        }
    };
    let mut running = 0;
    let rows: Vec<Vec<String>> = frames
        .iter()
        .take(limit)
        .map(|frame| {
            running += frame.self_samples;
            vec![
                frame.self_samples.to_string(),
                format!("{:.2}%", percent(frame.self_samples)),
                format!("{:.2}%", percent(running)),
                frame.total_samples.to_string(),
                format!("{:.2}%", percent(frame.total_samples)),
                frame.frame.clone(),
            ]
        })
        .collect();
    let mut out = format!(
        "{total} snapshots, {} frames, showing the top {}\n",
        frames.len(),
        rows.len()
    );
    out.push_str(&table(
        &["SELF", "SELF%", "SUM%", "TOTAL", "TOTAL%", "FRAME"],
        &rows,
    ));
    out
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

    fn element(id: u32, parent_id: u32, code_signature: &str, count: u32) -> StackElement {
        StackElement {
            id,
            parent_id,
            code_signature: code_signature.into(),
            count,
            duration: i64::from(count) * 10,
            duration_child_excluded: 5,
        }
    }

    #[test]
    fn test_cli_analysis_text_indents_and_cuts() {
        let analysis = Analysis {
            trees: vec![crate::analysis::stack_tree::StackTree {
                elements: vec![
                    element(1, 0, "main", 4),
                    element(2, 1, "hot", 3),
                    element(3, 1, "cold", 1),
                    element(4, 2, "deep", 3),
                    element(5, 4, "deeper", 3),
                ],
            }],
            tip: None,
        };
        let text = analysis_text(&analysis, 2);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                " SAMPLES    DURATION        SELF  FRAME",
                "       4        40ms         5ms  main",
                "       3        30ms         5ms    hot",
                "                                      … 2 more",
                "       1        10ms         5ms    cold",
            ]
        );
    }

    #[test]
    fn test_cli_top_text_percentages() {
        let frames = vec![
            FrameSamples {
                frame: "leaf".into(),
                self_samples: 3,
                total_samples: 3,
            },
            FrameSamples {
                frame: "main".into(),
                self_samples: 1,
                total_samples: 4,
            },
        ];
        assert_eq!(
            top_text(&frames, 4, 1),
            "4 snapshots, 2 frames, showing the top 1\n\
             SELF  SELF%   SUM%    TOTAL  TOTAL%  FRAME\n\
             3     75.00%  75.00%  3      75.00%  leaf"
        );
    }

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
