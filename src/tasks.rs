//! Profile task creation rules (SPEC §3, SkyWalking's exact reasons and order).

use serde::Deserialize;

use crate::model::{Task, MINUTE_MS};

/// The body of `POST /api/v1/tasks`. Numbers left out count as 0, so that the rules
/// below answer with SkyWalking's reason rather than a parse error.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTask {
    pub service: Option<String>,
    pub endpoint_name: Option<String>,
    /// Epoch milliseconds; absent or ≤ 0 means now.
    pub start_time: Option<i64>,
    /// Minutes.
    pub duration: Option<i64>,
    /// Milliseconds.
    pub min_duration_threshold: Option<i64>,
    /// Milliseconds.
    pub dump_period: Option<i64>,
    pub max_sampling_count: Option<i64>,
}

pub const OVERLAP_REASON: &str = "current service already has monitor task execute at this time";

/// Checks every rule that needs no store, in SkyWalking's order, and builds the task
/// (the overlap rule is checked by the task registry against the store).
pub fn validate(new_task: &NewTask, id: String, now_ms: i64) -> Result<Task, String> {
    let service = new_task.service.as_deref().unwrap_or("");
    if service.is_empty() {
        return Err("service cannot be null".to_string());
    }
    let endpoint_name = new_task.endpoint_name.as_deref().unwrap_or("").trim();
    if endpoint_name.is_empty() {
        return Err("endpoint name cannot be empty".to_string());
    }
    let duration = new_task.duration.unwrap_or(0);
    let min_duration_threshold = new_task.min_duration_threshold.unwrap_or(0);
    let dump_period = new_task.dump_period.unwrap_or(0);
    let max_sampling_count = new_task.max_sampling_count.unwrap_or(0);
    if duration < 1 {
        return Err("monitor duration must greater than 1 minutes".to_string());
    }
    if min_duration_threshold < 0 {
        return Err("min duration threshold must greater than or equals zero".to_string());
    }
    if max_sampling_count <= 0 {
        return Err("max sampling count must greater than zero".to_string());
    }
    if duration > 15 {
        return Err(
            "The duration of the monitoring task cannot be greater than 15 minutes".to_string(),
        );
    }
    if dump_period < 10 {
        return Err("dump period must be greater than or equals 10 milliseconds".to_string());
    }
    if max_sampling_count >= 10 {
        return Err("max sampling count must less than 10".to_string());
    }
    let min_duration_threshold = i32::try_from(min_duration_threshold)
        .map_err(|_| "min duration threshold is too large".to_string())?;
    let dump_period =
        i32::try_from(dump_period).map_err(|_| "dump period is too large".to_string())?;
    let start_time = match new_task.start_time {
        Some(start_time) if start_time > 0 => start_time,
        _ => now_ms,
    };
    if start_time > i64::MAX / 2 - 15 * MINUTE_MS {
        return Err("start time is too large".to_string());
    }
    Ok(Task {
        id,
        service: service.to_string(),
        endpoint_name: endpoint_name.to_string(),
        start_time,
        // Both bounded above by the rules: 15 and 9.
        duration: duration as i32,
        min_duration_threshold,
        dump_period,
        max_sampling_count: max_sampling_count as i32,
        create_time: now_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> NewTask {
        NewTask {
            service: Some("shop".into()),
            endpoint_name: Some("  /orders ".into()),
            start_time: None,
            duration: Some(5),
            min_duration_threshold: Some(200),
            dump_period: Some(20),
            max_sampling_count: Some(5),
        }
    }

    fn reason(change: impl FnOnce(&mut NewTask)) -> String {
        let mut task = valid();
        change(&mut task);
        validate(&task, "id".into(), 1_000).unwrap_err()
    }

    #[test]
    fn test_validation_accepts_and_defaults_start() {
        let task = validate(&valid(), "id".into(), 1_000).unwrap();
        assert_eq!(task.endpoint_name, "/orders");
        assert_eq!(task.start_time, 1_000);
        assert_eq!(task.create_time, 1_000);
        let mut later = valid();
        later.start_time = Some(5_000);
        assert_eq!(
            validate(&later, "id".into(), 1_000).unwrap().start_time,
            5_000
        );
        later.start_time = Some(-3);
        assert_eq!(
            validate(&later, "id".into(), 1_000).unwrap().start_time,
            1_000
        );
    }

    #[test]
    fn test_validation_reasons_exact() {
        assert_eq!(reason(|t| t.service = None), "service cannot be null");
        assert_eq!(
            reason(|t| t.service = Some(String::new())),
            "service cannot be null"
        );
        assert_eq!(
            reason(|t| t.endpoint_name = Some("   ".into())),
            "endpoint name cannot be empty"
        );
        assert_eq!(
            reason(|t| t.duration = Some(0)),
            "monitor duration must greater than 1 minutes"
        );
        assert_eq!(
            reason(|t| t.min_duration_threshold = Some(-1)),
            "min duration threshold must greater than or equals zero"
        );
        assert_eq!(
            reason(|t| t.max_sampling_count = Some(0)),
            "max sampling count must greater than zero"
        );
        assert_eq!(
            reason(|t| t.duration = Some(16)),
            "The duration of the monitoring task cannot be greater than 15 minutes"
        );
        assert_eq!(
            reason(|t| t.dump_period = Some(9)),
            "dump period must be greater than or equals 10 milliseconds"
        );
        assert_eq!(
            reason(|t| t.max_sampling_count = Some(10)),
            "max sampling count must less than 10"
        );
    }

    #[test]
    fn test_validation_order() {
        // Several rules broken at once: the first in SkyWalking's order wins.
        assert_eq!(
            reason(|t| {
                t.endpoint_name = None;
                t.duration = Some(0);
            }),
            "endpoint name cannot be empty"
        );
        assert_eq!(
            reason(|t| {
                t.duration = Some(20);
                t.max_sampling_count = Some(0);
            }),
            "max sampling count must greater than zero"
        );
        assert_eq!(
            reason(|t| {
                t.dump_period = Some(1);
                t.max_sampling_count = Some(50);
            }),
            "dump period must be greater than or equals 10 milliseconds"
        );
    }
}
