//! The by-id task cache: task id → task, bounded (least recently used goes first),
//! filled from the store on a miss. `GetTask` never trusts a cached miss, because a task
//! created on another replica a moment ago must be found on the next call.
//!
//! The unknown-task check of snapshot streams must not wait on the store, nor turn a
//! flood of random task ids into a flood of store reads: it asks `PeekTask` (memory only,
//! with a short negative cache of ids the store did not have) and, for an id neither
//! knows, starts a background `LookUpTask`, at most `tasks.unknown_lookups_per_second`.

use std::num::NonZeroUsize;
use std::sync::Arc;

use actix::prelude::*;
use lru::LruCache;

use super::supervision::{answer_then_restart, catch_future, caught, guarded};
use super::task_cache::TaskCreated;
use crate::model::Task;
use crate::store::{Store, StoreError};
use crate::telemetry;

#[derive(Message)]
#[rtype(result = "Result<Option<Task>, StoreError>")]
pub struct GetTask {
    pub id: String,
}

/// What memory alone says of a task id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peeked {
    Known,
    /// The store did not have it within the negative cache's time.
    Missing,
    /// Neither cache has heard of it.
    NotCached,
}

#[derive(Message)]
#[rtype(result = "Peeked")]
pub struct PeekTask {
    pub id: String,
}

/// Reads the id from the store into the caches (the task, or a negative entry).
#[derive(Message)]
#[rtype(result = "()")]
pub struct LookUpTask {
    pub id: String,
}

/// How long the store's "no such task" is believed by `PeekTask`.
const NEGATIVE_TTL: std::time::Duration = std::time::Duration::from_secs(5);

pub struct TaskByIdCache {
    tasks: LruCache<String, Task>,
    /// Ids the store did not have, and when it said so.
    missing: LruCache<String, std::time::Instant>,
    store: Arc<dyn Store>,
}

impl TaskByIdCache {
    pub fn new(store: Arc<dyn Store>, capacity: usize) -> TaskByIdCache {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        TaskByIdCache {
            tasks: LruCache::new(capacity),
            missing: LruCache::new(capacity),
            store,
        }
    }
}

const ACTOR: &str = "task_by_id";

impl Actor for TaskByIdCache {
    type Context = Context<Self>;
}

impl Supervised for TaskByIdCache {
    /// After a panic the cache starts empty; it fills again from the store.
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.tasks.clear();
        self.missing.clear();
    }
}

impl Handler<PeekTask> for TaskByIdCache {
    type Result = MessageResult<PeekTask>;

    fn handle(&mut self, message: PeekTask, ctx: &mut Self::Context) -> Self::Result {
        let peeked = guarded(ACTOR, self, ctx, |cache, _ctx| {
            #[cfg(test)]
            super::supervision::test_hooks::panic_if(&message.id);
            if cache.tasks.get(&message.id).is_some() {
                return Peeked::Known;
            }
            match cache.missing.get(&message.id) {
                Some(at) if at.elapsed() < NEGATIVE_TTL => Peeked::Missing,
                _ => Peeked::NotCached,
            }
        });
        MessageResult(peeked.unwrap_or(Peeked::NotCached))
    }
}

impl Handler<LookUpTask> for TaskByIdCache {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, message: LookUpTask, _ctx: &mut Self::Context) -> Self::Result {
        let store = self.store.clone();
        let id = message.id;
        Box::pin(
            catch_future(ACTOR, async move {
                let result = store.get_task(&id).await;
                (id, result)
            })
            .into_actor(self)
            .map(|outcome, cache, ctx| {
                let Ok((id, result)) = outcome else {
                    metrics::counter!(telemetry::TASK_LOOKUPS, "result" => "error").increment(1);
                    return;
                };
                guarded(ACTOR, cache, ctx, |cache, _ctx| {
                    let outcome = match result {
                        Ok(Some(task)) => {
                            cache.missing.pop(&id);
                            cache.tasks.put(id, task);
                            "found"
                        }
                        Ok(None) => {
                            cache.missing.put(id, std::time::Instant::now());
                            "missing"
                        }
                        Err(_) => "error",
                    };
                    metrics::counter!(telemetry::TASK_LOOKUPS, "result" => outcome).increment(1);
                });
            }),
        )
    }
}

impl Handler<GetTask> for TaskByIdCache {
    type Result = ResponseActFuture<Self, Result<Option<Task>, StoreError>>;

    fn handle(&mut self, message: GetTask, _ctx: &mut Self::Context) -> Self::Result {
        let cached = caught(ACTOR, || {
            #[cfg(test)]
            super::supervision::test_hooks::panic_if(&message.id);
            self.tasks.get(&message.id).cloned()
        });
        let Some(cached) = cached else {
            return answer_then_restart(Err(panicked()));
        };
        if let Some(task) = cached {
            telemetry::cache_lookup("by_id", true);
            return Box::pin(fut::ready(Ok(Some(task))));
        }
        telemetry::cache_lookup("by_id", false);
        let store = self.store.clone();
        Box::pin(
            catch_future(ACTOR, async move { store.get_task(&message.id).await })
                .into_actor(self)
                .map(|outcome, cache, ctx| {
                    let result = outcome.unwrap_or_else(|()| Err(panicked()))?;
                    if let Some(task) = &result {
                        let task = task.clone();
                        guarded(ACTOR, cache, ctx, |cache, _ctx| {
                            cache.tasks.put(task.id.clone(), task);
                            telemetry::cache_size("by_id", cache.tasks.len());
                        });
                    }
                    Ok(result)
                }),
        )
    }
}

impl Handler<TaskCreated> for TaskByIdCache {
    type Result = ();

    /// After a panic the task is still found: it is in the store, read on a miss.
    fn handle(&mut self, message: TaskCreated, ctx: &mut Self::Context) {
        guarded(ACTOR, self, ctx, |cache, _ctx| {
            #[cfg(test)]
            super::supervision::test_hooks::panic_if(&message.0.id);
            cache.missing.pop(&message.0.id);
            cache.tasks.put(message.0.id.clone(), message.0);
            telemetry::cache_size("by_id", cache.tasks.len());
        });
    }
}

fn panicked() -> StoreError {
    StoreError::Unavailable("the by-id task cache panicked and was restarted".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;

    fn task(id: &str) -> Task {
        Task {
            id: id.into(),
            service: "svc".into(),
            endpoint_name: "/e".into(),
            start_time: 0,
            duration: 1,
            min_duration_threshold: 0,
            dump_period: 10,
            max_sampling_count: 5,
            create_time: 0,
        }
    }

    #[actix::test]
    async fn test_by_id_cache_fills_on_miss_and_never_caches_miss() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("db"), 1).unwrap());
        let cache = TaskByIdCache::new(store.clone(), 2).start();
        assert!(cache
            .send(GetTask { id: "a".into() })
            .await
            .unwrap()
            .unwrap()
            .is_none());
        // Created elsewhere after the miss: found on the next call.
        store.insert_task(&task("a")).await.unwrap();
        let found = cache
            .send(GetTask { id: "a".into() })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found, Some(task("a")));
        cache.send(TaskCreated(task("b"))).await.unwrap();
        let found = cache
            .send(GetTask { id: "b".into() })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.unwrap().id, "b");
    }

    #[actix::test]
    async fn test_by_id_cache_restart_after_panic() {
        use crate::actors::supervision::test_hooks::PANIC;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("db"), 1).unwrap());
        store.insert_task(&task("a")).await.unwrap();
        let cache_store = store.clone();
        let cache = Supervisor::start(move |_ctx| TaskByIdCache::new(cache_store, 10));
        let peeked = cache.send(PeekTask { id: PANIC.into() }).await.unwrap();
        assert_eq!(peeked, Peeked::NotCached, "the fallback answer");
        let result = cache.send(GetTask { id: PANIC.into() }).await.unwrap();
        assert!(
            result.unwrap_err().is_retriable(),
            "a panic is a retriable fault"
        );
        let found = cache
            .send(GetTask { id: "a".into() })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found.map(|task| task.id).as_deref(), Some("a"));
        assert_eq!(
            cache.send(PeekTask { id: "a".into() }).await.unwrap(),
            Peeked::Known
        );
    }
}
