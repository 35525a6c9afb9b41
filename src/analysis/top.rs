//! The hottest frames of a flame graph, like `pprof -top`: per frame the samples that
//! end in it (self) and the samples that pass through it (total, a recursive frame
//! counted once per sample).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::flame::NodeId;
use super::FlameTree;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameSamples {
    pub frame: String,
    pub self_samples: u64,
    pub total_samples: u64,
}

/// Every frame of the tree, by self samples, then total samples, then name.
pub fn top_frames(tree: &FlameTree) -> Vec<FrameSamples> {
    let mut by_frame: HashMap<&str, (u64, u64)> = HashMap::new();
    // How often each frame is on the path from the root to the current node.
    let mut on_path: HashMap<&str, u32> = HashMap::new();
    // (node, entering): a node is left after all its children were visited.
    let mut pending: Vec<(NodeId, bool)> = tree
        .sorted_children(tree.root())
        .into_iter()
        .map(|child| (child, true))
        .collect();
    while let Some((node, entering)) = pending.pop() {
        let name = tree.name(node);
        if !entering {
            if let Some(count) = on_path.get_mut(name) {
                *count -= 1;
            }
            continue;
        }
        let entry = by_frame.entry(name).or_default();
        entry.0 += tree.self_value(node);
        let depth = on_path.entry(name).or_default();
        if *depth == 0 {
            entry.1 += tree.value(node);
        }
        *depth += 1;
        pending.push((node, false));
        pending.extend(
            tree.sorted_children(node)
                .into_iter()
                .map(|child| (child, true)),
        );
    }
    let mut frames: Vec<FrameSamples> = by_frame
        .into_iter()
        .map(|(frame, (self_samples, total_samples))| FrameSamples {
            frame: frame.to_string(),
            self_samples,
            total_samples,
        })
        .collect();
    frames.sort_by(|a, b| {
        b.self_samples
            .cmp(&a.self_samples)
            .then(b.total_samples.cmp(&a.total_samples))
            .then_with(|| a.frame.cmp(&b.frame))
    });
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_top_self_and_total_with_recursion() {
        let mut tree = FlameTree::new(100);
        tree.add(&["main", "rec", "rec", "leaf"], 3);
        tree.add(&["main", "rec"], 2);
        tree.add(&["main", "other", "leaf"], 1);
        let top = top_frames(&tree);
        let rows: Vec<(&str, u64, u64)> = top
            .iter()
            .map(|f| (f.frame.as_str(), f.self_samples, f.total_samples))
            .collect();
        assert_eq!(
            rows,
            [
                ("leaf", 4, 4),
                ("rec", 2, 5),
                ("main", 0, 6),
                ("other", 0, 1)
            ]
        );
    }
}
