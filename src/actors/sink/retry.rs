//! Bounded retries with jittered exponential back-off: a batch is written again while
//! its failure is retriable, up to a number of attempts and a total time budget.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use super::{SinkError, SnapshotSink};
use crate::config::SinkConfig;
use crate::model::SnapshotRecord;
use crate::telemetry;

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Total time from the first attempt after which no new attempt starts.
    pub budget: Duration,
    /// Longest one attempt may take; a hung sink costs this, not forever.
    pub attempt_timeout: Duration,
}

impl RetryPolicy {
    pub fn from_config(config: &SinkConfig) -> RetryPolicy {
        RetryPolicy {
            max_attempts: config.retry_max_attempts.get(),
            initial_backoff: Duration::from_millis(config.retry_initial_backoff_ms),
            max_backoff: Duration::from_millis(config.retry_max_backoff_ms),
            budget: Duration::from_millis(config.retry_budget_ms),
            attempt_timeout: Duration::from_millis(config.attempt_timeout_ms.get()),
        }
    }

    /// Back-off before attempt `attempt + 1` (attempt counts from 1): the capped
    /// exponential delay, jittered into its upper half so that shards do not retry in step.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(20);
        let capped = self
            .initial_backoff
            .saturating_mul(1 << exponent)
            .min(self.max_backoff);
        let half = capped / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }
}

/// Writes the batch to the sink, retrying retriable failures within the policy.
/// Returns the number of attempts on success, or the last error.
pub async fn write_with_retry(
    sink: &dyn SnapshotSink,
    batch: &[SnapshotRecord],
    policy: &RetryPolicy,
) -> Result<u32, SinkError> {
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let error = match tokio::time::timeout(policy.attempt_timeout, sink.write(batch)).await {
            Ok(Ok(())) => return Ok(attempt),
            Ok(Err(error)) => error,
            Err(_) => SinkError {
                sink: sink.name(),
                message: format!(
                    "no answer within {} ms (sink.attempt_timeout_ms)",
                    policy.attempt_timeout.as_millis()
                ),
                retriable: true,
            },
        };
        telemetry::sink_error(sink.name(), error.retriable);
        if !error.retriable || attempt >= policy.max_attempts {
            return Err(error);
        }
        let delay = policy.backoff(attempt);
        if started.elapsed() + delay > policy.budget {
            return Err(error);
        }
        tracing::warn!(sink = sink.name(), attempt, ?delay, %error, "retrying batch");
        telemetry::sink_retry(sink.name());
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Fails the first `failures` writes, with the given retriability.
    struct FlakySink {
        failures: u32,
        retriable: bool,
        calls: AtomicU32,
    }

    #[async_trait]
    impl SnapshotSink for FlakySink {
        fn name(&self) -> &'static str {
            "flaky"
        }

        async fn write(&self, _batch: &[SnapshotRecord]) -> Result<(), SinkError> {
            let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if call <= self.failures {
                return Err(SinkError {
                    sink: "flaky",
                    message: format!("failure {call}"),
                    retriable: self.retriable,
                });
            }
            Ok(())
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(400),
            budget: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn test_retry_backoff_is_capped_and_jittered() {
        let policy = policy();
        for attempt in 1..10 {
            let delay = policy.backoff(attempt);
            let cap = Duration::from_millis((100u64 << (attempt - 1).min(20)).min(400));
            assert!(
                delay >= cap / 2 && delay <= cap,
                "attempt {attempt}: {delay:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn test_retry_recovers_from_retriable_failures() {
        let sink = FlakySink {
            failures: 3,
            retriable: true,
            calls: AtomicU32::new(0),
        };
        let attempts = write_with_retry(&sink, &[], &policy()).await.unwrap();
        assert_eq!(attempts, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn test_retry_stops_at_final_error() {
        let sink = FlakySink {
            failures: 3,
            retriable: false,
            calls: AtomicU32::new(0),
        };
        let error = write_with_retry(&sink, &[], &policy()).await.unwrap_err();
        assert_eq!(error.message, "failure 1");
        assert_eq!(sink.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn test_retry_gives_up_after_max_attempts_and_budget() {
        let sink = FlakySink {
            failures: 100,
            retriable: true,
            calls: AtomicU32::new(0),
        };
        assert!(write_with_retry(&sink, &[], &policy()).await.is_err());
        assert_eq!(sink.calls.load(Ordering::SeqCst), 5);

        let sink = FlakySink {
            failures: 100,
            retriable: true,
            calls: AtomicU32::new(0),
        };
        let tight = RetryPolicy {
            max_attempts: 100,
            budget: Duration::from_millis(500),
            ..policy()
        };
        let started = Instant::now();
        assert!(write_with_retry(&sink, &[], &tight).await.is_err());
        assert!(started.elapsed() <= Duration::from_millis(500));
        assert!(sink.calls.load(Ordering::SeqCst) >= 2);
    }

    /// Never answers, like a store that took the connection and hung.
    struct HungSink;

    #[async_trait]
    impl SnapshotSink for HungSink {
        fn name(&self) -> &'static str {
            "hung"
        }

        async fn write(&self, _batch: &[SnapshotRecord]) -> Result<(), SinkError> {
            std::future::pending().await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn test_retry_bounds_a_hung_sink_in_time() {
        let bounded = RetryPolicy {
            max_attempts: 100,
            budget: Duration::from_secs(3),
            attempt_timeout: Duration::from_secs(1),
            ..policy()
        };
        let started = tokio::time::Instant::now();
        let error = write_with_retry(&HungSink, &[], &bounded)
            .await
            .unwrap_err();
        assert!(error.retriable);
        assert!(
            error.message.contains("sink.attempt_timeout_ms"),
            "{}",
            error.message
        );
        // No new attempt after the budget; the last one ends within its own limit.
        assert!(
            started.elapsed() <= Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
    }
}
