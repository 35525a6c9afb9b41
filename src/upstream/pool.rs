//! The upstream OAP channels: one HTTP/2 connection per address (connected lazily,
//! reconnected by tonic), picked round robin among those not marked down. An upstream
//! whose call failed to connect or timed out is marked down and skipped; a prober
//! connects to it on its own every `retry_backoff_ms` and marks it up again once that
//! works, so no agent call is spent finding out.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::UpstreamConfig;
use crate::telemetry::UPSTREAM_CHANNEL_UP;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamConfigError {
    #[error("invalid upstream address {address}: {message}")]
    Address { address: String, message: String },
    #[error("cannot read {key} {path}: {source}")]
    Read {
        key: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("invalid upstream TLS configuration: {0}")]
    Tls(String),
}

/// One upstream address.
pub struct Upstream {
    /// `host:port` as configured; also the `upstream` label of its metrics.
    pub address: String,
    endpoint: Endpoint,
    channel: Channel,
    up: AtomicBool,
    /// A prober is running for this upstream, so a second one is not started.
    probing: AtomicBool,
}

impl Upstream {
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }
}

pub struct UpstreamPool {
    upstreams: Vec<Arc<Upstream>>,
    next: AtomicUsize,
    retry_backoff: Duration,
}

impl UpstreamPool {
    /// Builds the channels (no connection is made yet). Must run inside a tokio runtime.
    pub fn new(config: &UpstreamConfig) -> Result<Arc<UpstreamPool>, UpstreamConfigError> {
        let tls_opt = tls_config(config)?;
        let mut upstreams = Vec::with_capacity(config.addresses.len());
        for address in &config.addresses {
            let scheme = if tls_opt.is_some() { "https" } else { "http" };
            let invalid = |message: String| UpstreamConfigError::Address {
                address: address.clone(),
                message,
            };
            let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
                .map_err(|error| invalid(error.to_string()))?
                .connect_timeout(Duration::from_millis(config.connect_timeout_ms.get()))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_millis(config.timeout_ms.get().max(1000)))
                .keep_alive_while_idle(true)
                .http2_adaptive_window(true);
            if let Some(tls) = &tls_opt {
                endpoint = endpoint
                    .tls_config(tls.clone())
                    .map_err(|error| invalid(error.to_string()))?;
            }
            let channel = endpoint.connect_lazy();
            metrics::gauge!(UPSTREAM_CHANNEL_UP, "upstream" => address.clone()).set(1.0);
            upstreams.push(Arc::new(Upstream {
                address: address.clone(),
                endpoint,
                channel,
                up: AtomicBool::new(true),
                probing: AtomicBool::new(false),
            }));
        }
        Ok(Arc::new(UpstreamPool {
            upstreams,
            next: AtomicUsize::new(0),
            retry_backoff: Duration::from_millis(config.retry_backoff_ms.get()),
        }))
    }

    /// The next upstream that is up, round robin; `None` when every one is down.
    pub fn pick(&self) -> Option<Arc<Upstream>> {
        let count = self.upstreams.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..count)
            .map(|offset| &self.upstreams[(start + offset) % count])
            .find(|upstream| upstream.is_up())
            .cloned()
    }

    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    pub fn mark_up(&self, upstream: &Upstream) {
        if !upstream.up.swap(true, Ordering::AcqRel) {
            tracing::info!(upstream = %upstream.address, "upstream reachable again");
            metrics::gauge!(UPSTREAM_CHANNEL_UP, "upstream" => upstream.address.clone()).set(1.0);
        }
    }

    /// Takes the upstream out of the rotation until a probe connects to it again.
    pub fn mark_down(&self, upstream: &Arc<Upstream>, reason: &str) {
        if upstream.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(upstream = %upstream.address, reason, "upstream marked down");
            metrics::gauge!(UPSTREAM_CHANNEL_UP, "upstream" => upstream.address.clone()).set(0.0);
        }
        if upstream.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let upstream = upstream.clone();
        let backoff = self.retry_backoff;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(backoff).await;
                // A connection of its own: the shared channel reconnects by itself on
                // its next call once this one shows the address answers HTTP/2 again.
                match upstream.endpoint.connect().await {
                    Ok(_probe) => break,
                    Err(error) => {
                        tracing::debug!(upstream = %upstream.address, %error, "upstream probe failed")
                    }
                }
            }
            upstream.probing.store(false, Ordering::Release);
            if !upstream.up.swap(true, Ordering::AcqRel) {
                tracing::info!(upstream = %upstream.address, "upstream reachable again");
                metrics::gauge!(UPSTREAM_CHANNEL_UP, "upstream" => upstream.address.clone())
                    .set(1.0);
            }
        });
    }
}

fn tls_config(config: &UpstreamConfig) -> Result<Option<ClientTlsConfig>, UpstreamConfigError> {
    if !config.tls {
        return Ok(None);
    }
    let read = |key: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|source| UpstreamConfigError::Read {
            key,
            path: path.display().to_string(),
            source,
        })
    };
    let mut tls = ClientTlsConfig::new();
    match &config.tls_ca_path {
        Some(path) => {
            tls = tls.ca_certificate(Certificate::from_pem(read("upstream.tls_ca_path", path)?))
        }
        // No CA of its own: the system's trusted roots (an OAP behind a public CA).
        None => tls = tls.with_native_roots(),
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert_path, &config.tls_key_path) {
        tls = tls.identity(Identity::from_pem(
            read("upstream.tls_cert_path", cert)?,
            read("upstream.tls_key_path", key)?,
        ));
    }
    if let Some(domain) = &config.tls_domain {
        tls = tls.domain_name(domain.clone());
    }
    Ok(Some(tls))
}
