//! Reading snapshots back: SkyWalking's stack tree of profiled segments, the task flame
//! graph with its folded-stack and pprof encodings, the differential flame graph and the
//! hottest frames. Pure functions over snapshots or (stack, count) pairs: no store and no
//! HTTP in here, so that the API, the CLI, the page and the benches share them.

pub mod diff;
pub mod flame;
pub mod folded;
pub mod pprof;
pub mod stack_tree;
pub mod top;

pub use flame::FlameTree;
