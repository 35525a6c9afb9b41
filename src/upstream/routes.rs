//! Which call a gRPC path is: the metric labels it is counted under (only names from the
//! fixed list below, so a client inventing paths cannot grow the label sets) and whether
//! skysnap reads its messages on the way through.

/// What skysnap does with a call's request messages besides passing them on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tap {
    /// Bytes pass untouched.
    None,
    /// `reportInstanceProperties`: recorded in the live instance list.
    InstanceProperties,
    /// `keepAlive`: recorded in the live instance list.
    InstancePing,
    /// `TraceSegmentReportService/collect`: one `SegmentObject` per message.
    Segment,
    /// `TraceSegmentReportService/collectInSync`: a `SegmentCollection`.
    SegmentCollection,
}

/// A classified path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Service label: a known full service name, or `other`.
    pub service: &'static str,
    /// Method label: a known method of that service, or `other`.
    pub method: &'static str,
    pub tap: Tap,
}

/// The label of everything that is not in [`KNOWN`].
pub const OTHER: &str = "other";

/// SkyWalking agent services and their methods (v3 data-collect protocol, its
/// package-less compat names, and the v10 async-profiler service). Paths outside this
/// list are forwarded (or answered) just the same; they only share the `other` label.
pub const KNOWN: &[(&str, &[&str])] = &[
    (
        "skywalking.v3.ManagementService",
        &["reportInstanceProperties", "keepAlive"],
    ),
    (
        "ManagementService",
        &["reportInstanceProperties", "keepAlive"],
    ),
    (
        "skywalking.v3.TraceSegmentReportService",
        &["collect", "collectInSync"],
    ),
    ("TraceSegmentReportService", &["collect", "collectInSync"]),
    ("skywalking.v3.LogReportService", &["collect"]),
    (
        "skywalking.v3.MeterReportService",
        &["collect", "collectBatch"],
    ),
    ("MeterReportService", &["collect"]),
    ("skywalking.v3.JVMMetricReportService", &["collect"]),
    ("JVMMetricReportService", &["collect"]),
    ("skywalking.v3.CLRMetricReportService", &["collect"]),
    ("CLRMetricReportService", &["collect"]),
    ("skywalking.v3.EventService", &["collect"]),
    (
        "skywalking.v3.ConfigurationDiscoveryService",
        &["fetchConfigurations"],
    ),
    (
        "skywalking.v3.BrowserPerfService",
        &["collectPerfData", "collectErrorLogs"],
    ),
    (
        "BrowserPerfService",
        &["collectPerfData", "collectErrorLogs"],
    ),
    ("skywalking.v3.SpanAttachedEventReportService", &["collect"]),
    ("skywalking.v3.EBPFAccessLogService", &["collect"]),
    ("skywalking.v3.ServiceMeshMetricService", &["collect"]),
    (
        "skywalking.v10.AsyncProfilerTask",
        &["getAsyncProfilerTaskCommands", "collect"],
    ),
];

/// The services skysnap itself answers (never forwarded).
pub const OWNED_SERVICES: &[&str] = &["skywalking.v3.ProfileTask", "ProfileTask"];

/// Classifies `/<service>/<method>`.
pub fn classify(path: &str) -> Route {
    let (service, method) = path
        .strip_prefix('/')
        .and_then(|rest| rest.split_once('/'))
        .unwrap_or(("", ""));
    let Some((known_service, methods)) = KNOWN.iter().find(|(name, _)| *name == service) else {
        return Route {
            service: OTHER,
            method: OTHER,
            tap: Tap::None,
        };
    };
    let Some(known_method) = methods.iter().find(|name| **name == method) else {
        return Route {
            service: known_service,
            method: OTHER,
            tap: Tap::None,
        };
    };
    let tap = match (service.trim_start_matches("skywalking.v3."), method) {
        ("ManagementService", "reportInstanceProperties") => Tap::InstanceProperties,
        ("ManagementService", "keepAlive") => Tap::InstancePing,
        ("TraceSegmentReportService", "collect") => Tap::Segment,
        ("TraceSegmentReportService", "collectInSync") => Tap::SegmentCollection,
        _ => Tap::None,
    };
    Route {
        service: known_service,
        method: known_method,
        tap,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_routes_classify_known_compat_and_unknown_paths() {
        let route = classify("/skywalking.v3.ManagementService/keepAlive");
        assert_eq!(route.service, "skywalking.v3.ManagementService");
        assert_eq!(route.method, "keepAlive");
        assert_eq!(route.tap, Tap::InstancePing);
        assert_eq!(
            classify("/ManagementService/reportInstanceProperties").tap,
            Tap::InstanceProperties
        );
        assert_eq!(
            classify("/TraceSegmentReportService/collectInSync").tap,
            Tap::SegmentCollection
        );
        let route = classify("/skywalking.v10.AsyncProfilerTask/getAsyncProfilerTaskCommands");
        assert_eq!(route.method, "getAsyncProfilerTaskCommands");
        assert_eq!(route.tap, Tap::None);
        let route = classify("/skywalking.v3.LogReportService/somethingNew");
        assert_eq!(
            (route.service, route.method),
            ("skywalking.v3.LogReportService", OTHER)
        );
        for path in ["/made.up.Service/call", "/", "", "no-slash", "/a/b/c"] {
            let route = classify(path);
            assert_eq!((route.service, route.method), (OTHER, OTHER), "{path}");
        }
    }
}
