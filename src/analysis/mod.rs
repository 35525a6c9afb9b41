//! Reading snapshots back: SkyWalking's stack tree of profiled segments, the task flame
//! graph with its folded-stack and pprof encodings, the differential flame graph and the
//! hottest frames, and the span tree of a kept segment. Pure functions over snapshots,
//! (stack, count) pairs or spans: no store and no HTTP in here, so that the API, the CLI,
//! the page and the benches share them.

pub mod diff;
pub mod flame;
pub mod folded;
pub mod pprof;
pub mod span_tree;
pub mod stack_tree;
pub mod top;

pub use flame::FlameTree;
