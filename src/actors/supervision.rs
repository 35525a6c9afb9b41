//! Actors that come back after a panic. actix does not catch panics: one in a handler
//! ends the actor's task, its mailbox closes, and every later message to it fails until
//! the process restarts. So each handler body runs under [`guarded`]: a panic is caught,
//! logged once with its cause, counted in `skysnap_actor_panics_total{actor}`, answered
//! with the handler's fallback, and the actor is stopped. It runs under an actix
//! [`Supervisor`](actix::Supervisor), which restarts it in place (same address, same
//! mailbox, queued messages kept) after `Supervised::restarting` has put its state back
//! to what it starts with.
//!
//! The snapshot shards catch their own panics instead (`shard.rs`): a restart would drop
//! their commits in flight, and they need to fail each waiting stream explicitly.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use actix::prelude::*;

use crate::telemetry;

/// The text of a caught panic, for the one log line it gets.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|text| text.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// Logs and counts a panic of `actor`.
pub fn report_panic(actor: &'static str, payload: &(dyn Any + Send)) {
    let message = panic_message(payload);
    tracing::error!(actor, panic = %message, "actor panicked; restarting it");
    metrics::counter!(telemetry::ACTOR_PANICS, "actor" => actor).increment(1);
}

/// Runs one handler body. On a panic: reported, the actor stopped (its supervisor
/// restarts it) and `None` returned, for the handler to answer its fallback. For a
/// handler that answers with a future, use [`caught`] and [`answer_then_restart`]: a
/// restart drops the futures an actor has spawned, its answer among them.
pub fn guarded<A, R>(
    actor_name: &'static str,
    actor: &mut A,
    ctx: &mut Context<A>,
    body: impl FnOnce(&mut A, &mut Context<A>) -> R,
) -> Option<R>
where
    A: Actor<Context = Context<A>>,
{
    let result = caught(actor_name, || body(actor, ctx));
    if result.is_none() {
        ctx.stop();
    }
    result
}

/// Runs `body`; a panic is reported and becomes `None`. The actor is not stopped.
pub fn caught<R>(actor_name: &'static str, body: impl FnOnce() -> R) -> Option<R> {
    match std::panic::catch_unwind(AssertUnwindSafe(body)) {
        Ok(result) => Some(result),
        Err(payload) => {
            report_panic(actor_name, payload.as_ref());
            None
        }
    }
}

/// A fallback answer that restarts the actor once it has been sent.
pub fn answer_then_restart<A, T>(answer: T) -> ResponseActFuture<A, T>
where
    A: Actor<Context = Context<A>>,
    T: 'static,
{
    Box::pin(
        fut::ready(answer).map(|answer, _actor, ctx: &mut Context<A>| {
            ctx.stop();
            answer
        }),
    )
}

/// A future of an actor's handler (a store call, a validation) whose panic would end
/// the actor while it is polled: the panic becomes `Err`, reported.
pub async fn catch_future<T>(
    actor_name: &'static str,
    future: impl Future<Output = T>,
) -> Result<T, ()> {
    futures::FutureExt::catch_unwind(AssertUnwindSafe(future))
        .await
        .map_err(|payload| report_panic(actor_name, payload.as_ref()))
}

#[cfg(test)]
pub mod test_hooks {
    //! Values that make an actor panic in tests, the way a bug would.

    /// A service name, task id or instance name that panics the actor handling it.
    pub const PANIC: &str = "__skysnap_test_panic__";

    pub fn panic_if(value: &str) {
        if value == PANIC {
            panic!("test hook: panic in an actor");
        }
    }
}
