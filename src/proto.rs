//! Code generated from `proto/` at build time (see `build.rs`).
//!
//! `skywalking::v3` holds the SkyWalking v3 protocol; the package-less compat
//! `ProfileTask` service that older agents call lands at this module's root (prost puts
//! a package-less file there) and is re-exported as `compat`.

#![allow(clippy::all, missing_docs, non_snake_case)]

include!(concat!(env!("OUT_DIR"), "/skywalking_protocol.rs"));

pub use self::skywalking::v3;

/// pprof's `profile.proto`, which the flame graph is exported as.
pub use self::perftools::profiles as pprof;

/// The package-less `ProfileTask` service (SkyWalking's `ProfileCompat.proto`).
pub mod compat {
    pub use super::{profile_task_client, profile_task_server};
}
