//! The by-id task cache: task id → task, bounded (least recently used goes first),
//! filled from the store on a miss. A miss is never cached, because a task created on
//! another replica a moment ago must be found on the next call.

use std::num::NonZeroUsize;
use std::sync::Arc;

use actix::prelude::*;
use lru::LruCache;

use super::task_cache::TaskCreated;
use crate::metrics;
use crate::model::Task;
use crate::store::{Store, StoreError};

#[derive(Message)]
#[rtype(result = "Result<Option<Task>, StoreError>")]
pub struct GetTask {
    pub id: String,
}

pub struct TaskByIdCache {
    tasks: LruCache<String, Task>,
    store: Arc<dyn Store>,
}

impl TaskByIdCache {
    pub fn new(store: Arc<dyn Store>, capacity: usize) -> TaskByIdCache {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        TaskByIdCache {
            tasks: LruCache::new(capacity),
            store,
        }
    }
}

impl Actor for TaskByIdCache {
    type Context = Context<Self>;
}

impl Handler<GetTask> for TaskByIdCache {
    type Result = ResponseActFuture<Self, Result<Option<Task>, StoreError>>;

    fn handle(&mut self, message: GetTask, _ctx: &mut Self::Context) -> Self::Result {
        if let Some(task) = self.tasks.get(&message.id) {
            metrics::cache_lookup("by_id", true);
            let task = task.clone();
            return Box::pin(fut::ready(Ok(Some(task))));
        }
        metrics::cache_lookup("by_id", false);
        let store = self.store.clone();
        Box::pin(
            async move { store.get_task(&message.id).await }
                .into_actor(self)
                .map(|result, cache, _ctx| {
                    if let Ok(Some(task)) = &result {
                        cache.tasks.put(task.id.clone(), task.clone());
                        metrics::cache_size("by_id", cache.tasks.len());
                    }
                    result
                }),
        )
    }
}

impl Handler<TaskCreated> for TaskByIdCache {
    type Result = ();

    fn handle(&mut self, message: TaskCreated, _ctx: &mut Self::Context) {
        self.tasks.put(message.0.id.clone(), message.0);
        metrics::cache_size("by_id", self.tasks.len());
    }
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
}
