//! Live agent instances per service, from ManagementService heartbeats; shown by
//! `GET /api/v1/services`. Bounded: past the limit the longest-silent instance goes.

use std::collections::HashMap;

use actix::prelude::*;

use super::supervision::guarded;
use crate::model::{InstanceInfo, ServiceInstances};

/// A `keepAlive` (no properties) or `reportInstanceProperties` (with them).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Heartbeat {
    pub service: String,
    pub instance: String,
    pub layer: String,
    pub properties_opt: Option<Vec<(String, String)>>,
    pub time_ms: i64,
}

/// Services with the instances seen within the live window, sorted by name.
#[derive(Message)]
#[rtype(result = "Vec<ServiceInstances>")]
pub struct ListServices {
    pub now_ms: i64,
}

pub struct InstanceRegistry {
    /// (service, instance) → what was last heard.
    instances: HashMap<(String, String), InstanceInfo>,
    live_window_ms: i64,
    max_instances: usize,
}

impl InstanceRegistry {
    pub fn new(live_window_ms: u64, max_instances: usize) -> InstanceRegistry {
        InstanceRegistry {
            instances: HashMap::new(),
            live_window_ms: i64::try_from(live_window_ms).unwrap_or(i64::MAX),
            max_instances: max_instances.max(1),
        }
    }

    /// Makes room for one more instance: silent past the live window first, then the
    /// longest silent.
    fn make_room(&mut self, now_ms: i64) {
        let live_window_ms = self.live_window_ms;
        super::bounded::make_room(
            &mut self.instances,
            self.max_instances,
            |info| now_ms.saturating_sub(info.last_seen) > live_window_ms,
            |info| info.last_seen,
        );
    }
}

impl Actor for InstanceRegistry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // The gRPC tap hands heartbeats over with try_send; a burst of agents must fit.
        ctx.set_mailbox_capacity(4_096);
    }
}

impl Supervised for InstanceRegistry {
    /// After a panic the list starts empty; agents' next heartbeats fill it again.
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.instances.clear();
    }
}

const ACTOR: &str = "instances";

impl Handler<Heartbeat> for InstanceRegistry {
    type Result = ();

    fn handle(&mut self, message: Heartbeat, ctx: &mut Self::Context) {
        guarded(ACTOR, self, ctx, |registry, _ctx| registry.record(message));
    }
}

impl Handler<ListServices> for InstanceRegistry {
    type Result = MessageResult<ListServices>;

    fn handle(&mut self, message: ListServices, ctx: &mut Self::Context) -> Self::Result {
        let list = guarded(ACTOR, self, ctx, |registry, _ctx| {
            registry.list(message.now_ms)
        });
        MessageResult(list.unwrap_or_default())
    }
}

impl InstanceRegistry {
    fn record(&mut self, message: Heartbeat) {
        #[cfg(test)]
        super::supervision::test_hooks::panic_if(&message.instance);
        let key = (message.service, message.instance);
        if !self.instances.contains_key(&key) {
            self.make_room(message.time_ms);
        }
        let info = self
            .instances
            .entry(key.clone())
            .or_insert_with(|| InstanceInfo {
                name: key.1.clone(),
                last_seen: message.time_ms,
                layer: String::new(),
                properties: Vec::new(),
            });
        info.last_seen = info.last_seen.max(message.time_ms);
        if !message.layer.is_empty() {
            info.layer = message.layer;
        }
        if let Some(properties) = message.properties_opt {
            info.properties = properties;
        }
    }

    fn list(&self, now_ms: i64) -> Vec<ServiceInstances> {
        let mut services: HashMap<String, Vec<InstanceInfo>> = HashMap::new();
        for ((service, _), info) in &self.instances {
            if now_ms.saturating_sub(info.last_seen) <= self.live_window_ms {
                services
                    .entry(service.clone())
                    .or_default()
                    .push(info.clone());
            }
        }
        let mut list: Vec<ServiceInstances> = services
            .into_iter()
            .map(|(service, mut instances)| {
                instances.sort_by(|a, b| a.name.cmp(&b.name));
                ServiceInstances { service, instances }
            })
            .collect();
        list.sort_by(|a, b| a.service.cmp(&b.service));
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(service: &str, instance: &str, time_ms: i64) -> Heartbeat {
        Heartbeat {
            service: service.into(),
            instance: instance.into(),
            layer: String::new(),
            properties_opt: None,
            time_ms,
        }
    }

    fn names(list: &[ServiceInstances]) -> Vec<String> {
        list.iter()
            .flat_map(|service| {
                service
                    .instances
                    .iter()
                    .map(move |instance| format!("{}/{}", service.service, instance.name))
            })
            .collect()
    }

    #[actix::test]
    async fn test_instances_live_window() {
        let registry = InstanceRegistry::new(1_000, 10).start();
        registry.send(beat("svc", "a", 0)).await.unwrap();
        registry.send(beat("svc", "b", 500)).await.unwrap();
        let list = registry.send(ListServices { now_ms: 1_200 }).await.unwrap();
        assert_eq!(names(&list), ["svc/b"], "a is past the live window");
        registry.send(beat("other", "c", 1_300)).await.unwrap();
        let list = registry.send(ListServices { now_ms: 1_300 }).await.unwrap();
        assert_eq!(names(&list), ["other/c", "svc/b"], "sorted by service");
    }

    #[actix::test]
    async fn test_instances_bound_drops_the_longest_silent() {
        // All three are live: only the bound can take one out.
        let registry = InstanceRegistry::new(1_000, 2).start();
        registry.send(beat("svc", "a", 0)).await.unwrap();
        registry.send(beat("svc", "b", 100)).await.unwrap();
        registry.send(beat("svc", "a", 150)).await.unwrap();
        registry.send(beat("svc", "c", 200)).await.unwrap();
        let list = registry.send(ListServices { now_ms: 300 }).await.unwrap();
        assert_eq!(names(&list), ["svc/a", "svc/c"], "b was silent longest");
    }

    #[actix::test]
    async fn test_instances_restart_after_panic() {
        use crate::actors::supervision::test_hooks::PANIC;
        let registry = Supervisor::start(|_ctx| InstanceRegistry::new(1_000, 10));
        registry.send(beat("svc", "a", 0)).await.unwrap();
        // The panicking heartbeat is answered (not a closed mailbox), and the registry
        // starts over empty rather than dying.
        registry.send(beat("svc", PANIC, 0)).await.unwrap();
        registry.send(beat("svc", "b", 10)).await.unwrap();
        let list = registry.send(ListServices { now_ms: 10 }).await.unwrap();
        let names: Vec<_> = list[0].instances.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["b"], "restarted with a fresh list");
    }
}
