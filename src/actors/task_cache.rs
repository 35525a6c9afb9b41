//! The downstream task cache: service → tasks that have not ended, the only source
//! `getProfileTaskCommands` reads. Reloaded from the store on a timer (other replicas'
//! tasks arrive within one interval); a task created here is added at once. An entry
//! expires a fixed time after its last write, and the cache holds a bounded number of
//! services (SkyWalking: 10 s refresh, 1 minute expiry).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::time::Instant;

use super::supervision::{catch_future, guarded};
use crate::model::{now_ms, Task};
use crate::segments::SegmentCapture;
use crate::store::{Store, StoreError};
use crate::telemetry;

struct CacheEntry {
    tasks: Vec<Task>,
    written_at: Instant,
}

/// The cache itself, free of actor and store concerns so that expiry is testable.
pub struct DownstreamCache {
    entries: HashMap<String, CacheEntry>,
    expire_after: Duration,
    max_services: usize,
}

impl DownstreamCache {
    pub fn new(expire_after: Duration, max_services: usize) -> DownstreamCache {
        DownstreamCache {
            entries: HashMap::new(),
            expire_after,
            max_services: max_services.max(1),
        }
    }

    /// Tasks of the service that end at or after `now_ms`; none for a missing or
    /// expired entry.
    pub fn get(&self, service: &str, now: Instant, now_ms: i64) -> Vec<Task> {
        match self.entries.get(service) {
            Some(entry) if now.duration_since(entry.written_at) < self.expire_after => entry
                .tasks
                .iter()
                .filter(|task| task.end_time() >= now_ms)
                .cloned()
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Replaces the service's tasks (a write: the entry's expiry starts again).
    pub fn put(&mut self, service: String, tasks: Vec<Task>, now: Instant) {
        if !self.entries.contains_key(&service) {
            self.make_room(now);
        }
        self.entries.insert(
            service,
            CacheEntry {
                tasks,
                written_at: now,
            },
        );
    }

    /// Adds (or replaces, by id) one task of its service.
    pub fn add(&mut self, task: Task, now: Instant) {
        let mut tasks = match self.entries.remove(&task.service) {
            Some(entry) if now.duration_since(entry.written_at) < self.expire_after => entry.tasks,
            _ => Vec::new(),
        };
        tasks.retain(|known| known.id != task.id);
        tasks.push(task.clone());
        self.put(task.service, tasks, now);
    }

    /// Drops expired entries.
    pub fn purge(&mut self, now: Instant) {
        let expire_after = self.expire_after;
        self.entries
            .retain(|_, entry| now.duration_since(entry.written_at) < expire_after);
    }

    /// Every cached task, expired entries included until the next purge.
    pub fn tasks(&self) -> impl Iterator<Item = &Task> {
        self.entries.values().flat_map(|entry| entry.tasks.iter())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Forgets every entry (a restarted cache starts empty and reloads).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Makes room for one more service: expired entries first, then the oldest write.
    fn make_room(&mut self, now: Instant) {
        let expire_after = self.expire_after;
        super::bounded::make_room(
            &mut self.entries,
            self.max_services,
            |entry| now.duration_since(entry.written_at) >= expire_after,
            |entry| entry.written_at,
        );
    }
}

/// Tasks to hand to the agents of a service.
#[derive(Message)]
#[rtype(result = "Vec<Task>")]
pub struct GetServiceTasks {
    pub service: String,
}

/// A task was created through this replica: visible to agents from now on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct TaskCreated(pub Task);

/// Reload unfinished tasks from the store now; answers with the number loaded.
#[derive(Message)]
#[rtype(result = "Result<usize, StoreError>")]
pub struct Refresh;

pub struct TaskCacheActor {
    cache: DownstreamCache,
    store: Arc<dyn Store>,
    refresh_interval: Duration,
    /// Told the running tasks after every change, to match passing trace segments.
    segments: SegmentCapture,
}

impl TaskCacheActor {
    pub fn new(
        store: Arc<dyn Store>,
        refresh_interval: Duration,
        expire_after: Duration,
        max_services: usize,
        segments: SegmentCapture,
    ) -> TaskCacheActor {
        TaskCacheActor {
            cache: DownstreamCache::new(expire_after, max_services),
            store,
            refresh_interval,
            segments,
        }
    }

    fn publish(&self) {
        telemetry::cache_size("downstream", self.cache.len());
        self.segments.publish_tasks(self.cache.tasks());
    }

    fn apply_refresh(&mut self, tasks: Vec<Task>) -> usize {
        let now = Instant::now();
        let loaded = tasks.len();
        let mut by_service: HashMap<String, Vec<Task>> = HashMap::new();
        for task in tasks {
            by_service
                .entry(task.service.clone())
                .or_default()
                .push(task);
        }
        self.cache.purge(now);
        for (service, tasks) in by_service {
            self.cache.put(service, tasks, now);
        }
        self.publish();
        loaded
    }
}

const ACTOR: &str = "task_cache";

impl Actor for TaskCacheActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.refresh_interval, |_actor, ctx| {
            ctx.notify(Refresh);
        });
    }
}

impl Supervised for TaskCacheActor {
    /// After a panic the cache starts empty and reloads from the store at once.
    fn restarting(&mut self, ctx: &mut Self::Context) {
        self.cache.clear();
        self.publish();
        ctx.notify(Refresh);
    }
}

impl Handler<GetServiceTasks> for TaskCacheActor {
    type Result = MessageResult<GetServiceTasks>;

    /// After a panic the agent gets no command this poll; it polls again.
    fn handle(&mut self, message: GetServiceTasks, ctx: &mut Self::Context) -> Self::Result {
        let tasks = guarded(ACTOR, self, ctx, |actor, _ctx| {
            #[cfg(test)]
            super::supervision::test_hooks::panic_if(&message.service);
            let tasks = actor.cache.get(&message.service, Instant::now(), now_ms());
            telemetry::cache_lookup("downstream", !tasks.is_empty());
            tasks
        });
        MessageResult(tasks.unwrap_or_default())
    }
}

impl Handler<TaskCreated> for TaskCacheActor {
    type Result = ();

    /// After a panic the task still reaches the cache: it is in the store, and the
    /// restarted cache reloads.
    fn handle(&mut self, message: TaskCreated, ctx: &mut Self::Context) {
        guarded(ACTOR, self, ctx, |actor, _ctx| {
            #[cfg(test)]
            super::supervision::test_hooks::panic_if(&message.0.service);
            actor.cache.add(message.0, Instant::now());
            actor.publish();
        });
    }
}

impl Handler<Refresh> for TaskCacheActor {
    type Result = ResponseActFuture<Self, Result<usize, StoreError>>;

    fn handle(&mut self, _message: Refresh, _ctx: &mut Self::Context) -> Self::Result {
        let store = self.store.clone();
        Box::pin(
            catch_future(ACTOR, async move { store.unfinished_tasks(now_ms()).await })
                .into_actor(self)
                .map(|outcome, actor, ctx| {
                    let result = outcome.unwrap_or_else(|()| Err(panicked()));
                    match result {
                        Ok(tasks) => guarded(ACTOR, actor, ctx, |actor, _ctx| {
                            actor.apply_refresh(tasks)
                        })
                        .ok_or_else(panicked),
                        Err(error) => {
                            tracing::warn!(%error, "task cache refresh failed; serving cached tasks");
                            Err(error)
                        }
                    }
                }),
        )
    }
}

fn panicked() -> StoreError {
    StoreError::Unavailable("the task cache panicked and was restarted".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, service: &str, start_time: i64) -> Task {
        Task {
            id: id.into(),
            service: service.into(),
            endpoint_name: "/e".into(),
            start_time,
            duration: 1,
            min_duration_threshold: 0,
            dump_period: 10,
            max_sampling_count: 5,
            create_time: start_time,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn test_task_cache_expires_after_last_write() {
        let mut cache = DownstreamCache::new(Duration::from_secs(60), 10);
        cache.add(task("a", "svc", 0), Instant::now());
        assert_eq!(cache.get("svc", Instant::now(), 0).len(), 1);

        tokio::time::advance(Duration::from_secs(50)).await;
        // A refresh rewrites the entry, so its expiry starts again.
        cache.put("svc".into(), vec![task("a", "svc", 0)], Instant::now());
        tokio::time::advance(Duration::from_secs(50)).await;
        assert_eq!(cache.get("svc", Instant::now(), 0).len(), 1);

        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(cache.get("svc", Instant::now(), 0).is_empty());
        cache.purge(Instant::now());
        assert!(cache.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn test_task_cache_hides_ended_tasks() {
        let mut cache = DownstreamCache::new(Duration::from_secs(60), 10);
        cache.add(task("a", "svc", 0), Instant::now());
        cache.add(task("b", "svc", 100_000), Instant::now());
        // "a" ends at 60,000 ms.
        let ids: Vec<_> = cache
            .get("svc", Instant::now(), 60_001)
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(ids, ["b"]);
        // Re-adding a task replaces it rather than duplicating it.
        cache.add(task("b", "svc", 100_000), Instant::now());
        assert_eq!(cache.get("svc", Instant::now(), 0).len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn test_task_cache_is_bounded() {
        let mut cache = DownstreamCache::new(Duration::from_secs(60), 2);
        cache.add(task("a", "s1", 0), Instant::now());
        tokio::time::advance(Duration::from_secs(1)).await;
        cache.add(task("b", "s2", 0), Instant::now());
        tokio::time::advance(Duration::from_secs(1)).await;
        cache.add(task("c", "s3", 0), Instant::now());
        assert_eq!(cache.len(), 2);
        assert!(cache.get("s1", Instant::now(), 0).is_empty());
        assert_eq!(cache.get("s3", Instant::now(), 0).len(), 1);
    }

    /// A SQLite store holding task "a" of service "svc", running now.
    async fn store_with_running_task() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(crate::store::sqlite::SqliteStore::open(&dir.path().join("db"), 1).unwrap());
        store
            .insert_task(&task("a", "svc", now_ms()))
            .await
            .unwrap();
        (dir, store)
    }

    #[actix::test]
    async fn test_task_cache_refresh_loads_store() {
        let (_dir, store) = store_with_running_task().await;
        store.insert_task(&task("old", "svc", 0)).await.unwrap();
        let (segments, _writer) =
            SegmentCapture::new(&crate::config::SegmentsConfig::default(), store.clone());
        let actor = TaskCacheActor::new(
            store,
            Duration::from_secs(3600),
            Duration::from_secs(60),
            10,
            segments,
        )
        .start();
        assert!(actor
            .send(GetServiceTasks {
                service: "svc".into()
            })
            .await
            .unwrap()
            .is_empty());
        assert_eq!(actor.send(Refresh).await.unwrap().unwrap(), 1);
        let tasks = actor
            .send(GetServiceTasks {
                service: "svc".into(),
            })
            .await
            .unwrap();
        assert_eq!(tasks.len(), 1);
        assert_eq!(tasks[0].id, "a");
    }

    #[actix::test]
    async fn test_task_cache_restart_after_panic_reloads() {
        use crate::actors::supervision::test_hooks::PANIC;
        let (_dir, store) = store_with_running_task().await;
        let (segments, _writer) =
            SegmentCapture::new(&crate::config::SegmentsConfig::default(), store.clone());
        let cache_store = store.clone();
        let actor = Supervisor::start(move |_ctx| {
            TaskCacheActor::new(
                cache_store,
                Duration::from_secs(3600),
                Duration::from_secs(60),
                10,
                segments,
            )
        });
        let panicked = actor
            .send(GetServiceTasks {
                service: PANIC.into(),
            })
            .await
            .unwrap();
        assert!(panicked.is_empty(), "the fallback answer");
        // Nothing refreshes on a timer here (one hour): the task can only come from the
        // reload that the restart starts.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let tasks = actor
                .send(GetServiceTasks {
                    service: "svc".into(),
                })
                .await
                .unwrap();
            if tasks.len() == 1 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the restarted cache did not reload"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
