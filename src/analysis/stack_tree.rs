//! SkyWalking's profile analysis (`ProfileAnalyzer`, `getSegmentsProfileAnalyze`): the
//! snapshots of some segments' time ranges, each key once, grouped by their root frame
//! into one tree per root; children merged by equal code signature. Per node: `count`
//! (snapshots through it), `duration` (over each run of consecutive sequences, last dump
//! time − first dump time, summed) and `duration_child_excluded` (duration − the
//! children's durations). Ids from 1 per tree, breadth first, the root's parent 0.
//!
//! One deliberate difference: a run of consecutive sequences never spans two segments
//! (SkyWalking sorts the sequences of all queried segments together, so sequence 3 of
//! one segment could continue sequence 2 of another). Trees are ordered by count, and
//! children by count then first appearance (SkyWalking's order is a hash map's).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::flame::FastMap;
use crate::model::{SnapshotRecord, Stack};

/// The tip when no snapshot matched.
pub const TIP_DATA_NOT_FOUND: &str = "Data not found";

/// The tip when more snapshots matched than one analysis reads (SkyWalking's words).
pub fn tip_out_of_limit(found: u64, limit: usize) -> String {
    format!(
        "Out of snapshot analyze limit, {found} snapshots found, but analysis first {limit} snapshots only."
    )
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackElement {
    pub id: u32,
    pub parent_id: u32,
    pub code_signature: String,
    pub count: u32,
    /// Milliseconds.
    pub duration: i64,
    /// Milliseconds: `duration` less the children's durations.
    pub duration_child_excluded: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackTree {
    pub elements: Vec<StackElement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Analysis {
    pub trees: Vec<StackTree>,
    pub tip: Option<String>,
}

struct Node<'a> {
    code_signature: &'a str,
    /// Indices (into the sorted snapshots) of the snapshots through this node, in order.
    detected_by: Vec<u32>,
    children: Vec<u32>,
}

struct TreeBuilder<'a> {
    nodes: Vec<Node<'a>>,
    /// (parent, code signature) → child.
    edges: FastMap<(u32, &'a str), u32>,
}

impl<'a> TreeBuilder<'a> {
    fn new(root: &'a str) -> TreeBuilder<'a> {
        TreeBuilder {
            nodes: vec![Node {
                code_signature: root,
                detected_by: Vec::new(),
                children: Vec::new(),
            }],
            edges: FastMap::default(),
        }
    }

    fn add(&mut self, index: u32, stack: &'a Stack) {
        self.nodes[0].detected_by.push(index);
        let mut parent = 0u32;
        for frame in stack.frames().skip(1) {
            let child = match self.edges.get(&(parent, frame)) {
                Some(&child) => child,
                None => {
                    let child = self.nodes.len() as u32;
                    self.nodes.push(Node {
                        code_signature: frame,
                        detected_by: Vec::new(),
                        children: Vec::new(),
                    });
                    self.nodes[parent as usize].children.push(child);
                    self.edges.insert((parent, frame), child);
                    child
                }
            };
            self.nodes[child as usize].detected_by.push(index);
            parent = child;
        }
    }

    fn build(self, snapshots: &[&SnapshotRecord]) -> StackTree {
        let durations: Vec<i64> = self
            .nodes
            .iter()
            .map(|node| run_duration(&node.detected_by, snapshots))
            .collect();
        let mut elements = Vec::with_capacity(self.nodes.len());
        // (node, parent element id), breadth first.
        let mut queue = std::collections::VecDeque::from([(0u32, 0u32)]);
        while let Some((node_index, parent_id)) = queue.pop_front() {
            let node = &self.nodes[node_index as usize];
            let id = elements.len() as u32 + 1;
            let children_duration = node.children.iter().fold(0i64, |sum, &child| {
                sum.saturating_add(durations[child as usize])
            });
            let duration = durations[node_index as usize];
            elements.push(StackElement {
                id,
                parent_id,
                code_signature: node.code_signature.to_string(),
                count: node.detected_by.len() as u32,
                duration,
                duration_child_excluded: duration.saturating_sub(children_duration),
            });
            let mut children = node.children.clone();
            // Hottest first; ties keep the order of first appearance (creation order).
            children.sort_by_key(|&child| {
                (
                    std::cmp::Reverse(self.nodes[child as usize].detected_by.len()),
                    child,
                )
            });
            queue.extend(children.into_iter().map(|child| (child, id)));
        }
        StackTree { elements }
    }
}

/// Over each run of consecutive sequences of one segment: last dump time − first.
fn run_duration(detected_by: &[u32], snapshots: &[&SnapshotRecord]) -> i64 {
    let mut total = 0;
    let mut run: Option<(&SnapshotRecord, &SnapshotRecord)> = None;
    for &index in detected_by {
        let snapshot = snapshots[index as usize];
        run = Some(match run {
            Some((first, last))
                if last.segment_id == snapshot.segment_id
                    && last.task_id == snapshot.task_id
                    && last.sequence.checked_add(1) == Some(snapshot.sequence) =>
            {
                (first, snapshot)
            }
            Some((first, last)) => {
                total = add_run(total, first, last);
                (snapshot, snapshot)
            }
            None => (snapshot, snapshot),
        });
    }
    if let Some((first, last)) = run {
        total = add_run(total, first, last);
    }
    total
}

/// Dump times are the agents' and may be anything positive: saturate, never overflow.
fn add_run(total: i64, first: &SnapshotRecord, last: &SnapshotRecord) -> i64 {
    total.saturating_add(last.dump_time.saturating_sub(first.dump_time))
}

/// Analyses `snapshots` (already cut to the limit by the caller, who read them);
/// `found` is how many matched in all, for the tip.
pub fn analyze(snapshots: &[SnapshotRecord], found: u64, limit: usize) -> Analysis {
    let tip = if found == 0 || snapshots.is_empty() {
        Some(TIP_DATA_NOT_FOUND.to_string())
    } else if found > limit as u64 {
        Some(tip_out_of_limit(found, limit))
    } else {
        None
    };
    // Each key once, stacks that have a root only, in (task, segment, sequence) order so
    // that every node's snapshots come in run order.
    let mut seen = HashSet::with_hasher(foldhash::fast::RandomState::default());
    let mut sorted: Vec<&SnapshotRecord> = snapshots
        .iter()
        .take(limit)
        .filter(|s| !s.stack.is_empty())
        .filter(|s| seen.insert((s.task_id.as_str(), s.segment_id.as_str(), s.sequence)))
        .collect();
    sorted.sort_by(|a, b| {
        (a.task_id.as_str(), a.segment_id.as_str(), a.sequence).cmp(&(
            b.task_id.as_str(),
            b.segment_id.as_str(),
            b.sequence,
        ))
    });
    let mut builders: Vec<TreeBuilder<'_>> = Vec::new();
    let mut by_root: FastMap<&str, usize> = FastMap::default();
    for (index, snapshot) in sorted.iter().enumerate() {
        let Some(root) = snapshot.stack.frame(0) else {
            continue;
        };
        let tree = *by_root.entry(root).or_insert_with(|| {
            builders.push(TreeBuilder::new(root));
            builders.len() - 1
        });
        builders[tree].add(index as u32, &snapshot.stack);
    }
    // Hottest tree first; ties in order of first appearance (the sort is stable).
    builders.sort_by_key(|builder| std::cmp::Reverse(builder.nodes[0].detected_by.len()));
    Analysis {
        trees: builders
            .into_iter()
            .map(|builder| builder.build(&sorted))
            .collect(),
        tip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(segment: &str, sequence: i32, dump_time: i64, stack: &[&str]) -> SnapshotRecord {
        SnapshotRecord {
            task_id: "t".into(),
            segment_id: segment.into(),
            sequence,
            dump_time,
            stack: Stack::from_frames(stack),
            encoded: None,
        }
    }

    fn element(
        id: u32,
        parent_id: u32,
        code_signature: &str,
        count: u32,
        duration: i64,
        duration_child_excluded: i64,
    ) -> StackElement {
        StackElement {
            id,
            parent_id,
            code_signature: code_signature.into(),
            count,
            duration,
            duration_child_excluded,
        }
    }

    /// Two segments with a gap, interleaved, a duplicate, equal frames under different
    /// parents; the expected trees are worked out by hand in the comments.
    #[test]
    fn test_stack_tree_by_hand() {
        let snapshots = vec![
            snapshot("s2", 6, 5000, &["main", "a", "x"]),
            snapshot("s1", 0, 1000, &["main", "a", "x"]),
            snapshot("s1", 1, 1010, &["main", "a", "x"]),
            snapshot("s2", 7, 5010, &["other", "z"]),
            snapshot("s1", 2, 1020, &["main", "b", "x"]),
            snapshot("s1", 4, 1040, &["main", "a"]),
            snapshot("s1", 1, 1010, &["main", "a", "x"]),
            snapshot("s1", 5, 1050, &["main", "a", "y"]),
            snapshot("s2", 8, 5020, &["main", "b"]),
        ];
        let analysis = analyze(&snapshots, 9, 12_000);
        assert_eq!(analysis.tip, None);
        assert_eq!(analysis.trees.len(), 2);
        // main: s1 runs 0-2 (20 ms) and 4-5 (10 ms); s2 6 and 8 alone → 30 (s2's 6 does
        // not continue s1's 4-5: runs are per segment).
        // a: s1 0-1 (10), 4-5 (10), s2 6 → 20; b: s1 2, s2 8 → 0.
        // a/x: s1 0-1 (10), s2 6 → 10; a/y: 0; b/x: 0.
        assert_eq!(
            analysis.trees[0].elements,
            [
                element(1, 0, "main", 7, 30, 10),
                element(2, 1, "a", 5, 20, 10),
                element(3, 1, "b", 2, 0, 0),
                element(4, 2, "x", 3, 10, 10),
                element(5, 2, "y", 1, 0, 0),
                element(6, 3, "x", 1, 0, 0),
            ]
        );
        assert_eq!(
            analysis.trees[1].elements,
            [element(1, 0, "other", 1, 0, 0), element(2, 1, "z", 1, 0, 0)]
        );
    }

    #[test]
    fn test_stack_tree_tips() {
        let empty = analyze(&[], 0, 12_000);
        assert_eq!(empty.trees, []);
        assert_eq!(empty.tip.as_deref(), Some("Data not found"));
        let snapshots: Vec<SnapshotRecord> = (0..3)
            .map(|sequence| snapshot("s", sequence, 100 * i64::from(sequence), &["m"]))
            .collect();
        let cut = analyze(&snapshots, 5, 2);
        assert_eq!(
            cut.tip.as_deref(),
            Some("Out of snapshot analyze limit, 5 snapshots found, but analysis first 2 snapshots only.")
        );
        assert_eq!(cut.trees[0].elements, [element(1, 0, "m", 2, 100, 100)]);
    }

    #[test]
    fn test_stack_tree_extreme_times_saturate() {
        let snapshots = vec![
            snapshot("s", 0, 1, &["m"]),
            snapshot("s", 1, i64::MAX, &["m"]),
            snapshot("s", 3, 1, &["m"]),
            snapshot("s", 4, i64::MAX, &["m"]),
        ];
        let analysis = analyze(&snapshots, 4, 10);
        assert_eq!(analysis.trees[0].elements[0].duration, i64::MAX);
    }
}
