//! Creates tasks one at a time, so that two concurrent requests for one service cannot
//! both pass the overlap rule on this replica; then makes the task visible to both
//! caches before answering.

use std::sync::Arc;

use actix::prelude::*;

use super::supervision::catch_future;
use super::task_by_id::TaskByIdCache;
use super::task_cache::{TaskCacheActor, TaskCreated};
use crate::model::{now_ms, Task};
use crate::store::{Store, StoreError};
use crate::tasks::{self, NewTask, OVERLAP_REASON};

#[derive(Debug, thiserror::Error)]
pub enum CreateTaskError {
    /// A creation rule failed; the text is SkyWalking's reason.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Message)]
#[rtype(result = "Result<Task, CreateTaskError>")]
pub struct CreateTask(pub NewTask);

pub struct TaskRegistry {
    store: Arc<dyn Store>,
    downstream: Addr<TaskCacheActor>,
    by_id: Addr<TaskByIdCache>,
}

impl TaskRegistry {
    pub fn new(
        store: Arc<dyn Store>,
        downstream: Addr<TaskCacheActor>,
        by_id: Addr<TaskByIdCache>,
    ) -> TaskRegistry {
        TaskRegistry {
            store,
            downstream,
            by_id,
        }
    }
}

impl Actor for TaskRegistry {
    type Context = Context<Self>;
}

impl Handler<CreateTask> for TaskRegistry {
    type Result = AtomicResponse<Self, Result<Task, CreateTaskError>>;

    fn handle(&mut self, message: CreateTask, _ctx: &mut Self::Context) -> Self::Result {
        let store = self.store.clone();
        let downstream = self.downstream.clone();
        let by_id = self.by_id.clone();
        let create = async move {
            let task = tasks::validate(&message.0, uuid::Uuid::new_v4().to_string(), now_ms())
                .map_err(CreateTaskError::Invalid)?;
            let overlapping = store
                .overlapping_tasks(&task.service, task.start_time, task.end_time())
                .await?;
            if !overlapping.is_empty() {
                return Err(CreateTaskError::Invalid(OVERLAP_REASON.to_string()));
            }
            store.insert_task(&task).await?;
            metrics::counter!(crate::telemetry::TASKS_CREATED).increment(1);
            // Both caches answer before the creator hears back, so an agent polling right
            // after the 201 gets the command.
            let _ = downstream.send(TaskCreated(task.clone())).await;
            let _ = by_id.send(TaskCreated(task.clone())).await;
            Ok(task)
        };
        // Holds no state: a panic in one creation is caught, reported and counted, and
        // answered as a store fault; the next creation runs as usual.
        let create = async move {
            catch_future("task_registry", create)
                .await
                .unwrap_or_else(|()| {
                    Err(CreateTaskError::Store(StoreError::Unavailable(
                        "task creation panicked".into(),
                    )))
                })
        };
        AtomicResponse::new(Box::pin(create.into_actor(self)))
    }
}
