//! The flame-graph tree: (stack, count) pairs merged root first into one tree of sample
//! counts under a root named `all`. Frames are interned once and nodes live in one arena,
//! so a million snapshots of a few thousand distinct stacks cost a few thousand nodes.
//! The tree is bounded: past `max_nodes` a stack's remaining frames are not added, its
//! count stays on the deepest node that exists and is counted as truncated.

use std::fmt::Write as _;
use std::sync::Arc;

/// The name of the root node that every stack hangs from.
pub const ROOT_NAME: &str = "all";

/// Index of a node in the tree's arena; the root is 0.
pub type NodeId = u32;

#[derive(Debug, Clone)]
struct Node {
    name: u32,
    /// Samples whose stack passes through this node.
    value: u64,
    /// Samples whose stack ends at this node.
    self_value: u64,
    children: Vec<NodeId>,
}

/// Maps of the analysis: foldhash, since every frame of every stack is hashed (the
/// standard SipHash took about half of the tree's build time) and the keys are the
/// agents' frames, not an attacker's choice of collisions.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug, Clone)]
pub struct FlameTree {
    names: Vec<Arc<str>>,
    name_ids: FastMap<Arc<str>, u32>,
    nodes: Vec<Node>,
    /// (parent, frame name) → child, so a wide node is not scanned frame by frame.
    edges: FastMap<(NodeId, u32), NodeId>,
    max_nodes: usize,
    /// Samples whose stack was cut short because the tree was full.
    truncated_samples: u64,
}

impl FlameTree {
    /// An empty tree that holds at most `max_nodes` nodes (the root included).
    pub fn new(max_nodes: usize) -> FlameTree {
        let mut tree = FlameTree {
            names: Vec::new(),
            name_ids: FastMap::default(),
            nodes: Vec::new(),
            edges: FastMap::default(),
            max_nodes: max_nodes.max(1),
            truncated_samples: 0,
        };
        let root_name = tree.intern(ROOT_NAME);
        tree.nodes.push(Node {
            name: root_name,
            value: 0,
            self_value: 0,
            children: Vec::new(),
        });
        tree
    }

    fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.name_ids.get(name) {
            return id;
        }
        let id = self.names.len() as u32;
        let name: Arc<str> = Arc::from(name);
        self.names.push(name.clone());
        self.name_ids.insert(name, id);
        id
    }

    /// Adds `count` samples of one root-first stack.
    pub fn add<S: AsRef<str>>(&mut self, stack: &[S], count: u64) {
        if count == 0 {
            return;
        }
        self.nodes[0].value += count;
        let mut current: NodeId = 0;
        for frame in stack {
            let frame = frame.as_ref();
            // A frame is interned only when a node is made for it, so a full tree stops
            // growing its name table too.
            let existing = self
                .name_ids
                .get(frame)
                .and_then(|&name| self.edges.get(&(current, name)).copied());
            let child = match existing {
                Some(child) => child,
                None if self.nodes.len() >= self.max_nodes => {
                    self.truncated_samples += count;
                    break;
                }
                None => {
                    let name = self.intern(frame);
                    let child = self.nodes.len() as NodeId;
                    self.nodes.push(Node {
                        name,
                        value: 0,
                        self_value: 0,
                        children: Vec::new(),
                    });
                    self.nodes[current as usize].children.push(child);
                    self.edges.insert((current, name), child);
                    child
                }
            };
            self.nodes[child as usize].value += count;
            current = child;
        }
        self.nodes[current as usize].self_value += count;
    }

    /// Samples in the tree: the root's value.
    pub fn total(&self) -> u64 {
        self.nodes[0].value
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn truncated_samples(&self) -> u64 {
        self.truncated_samples
    }

    pub fn root(&self) -> NodeId {
        0
    }

    pub fn name(&self, node: NodeId) -> &str {
        &self.names[self.nodes[node as usize].name as usize]
    }

    /// The interned id of the node's frame: equal frames have equal ids.
    pub fn name_id(&self, node: NodeId) -> u32 {
        self.nodes[node as usize].name
    }

    /// Every distinct frame of the tree, by name id.
    pub fn names(&self) -> &[Arc<str>] {
        &self.names
    }

    pub fn value(&self, node: NodeId) -> u64 {
        self.nodes[node as usize].value
    }

    pub fn self_value(&self, node: NodeId) -> u64 {
        self.nodes[node as usize].self_value
    }

    /// Children hottest first, ties by name, so every encoding reads the same way.
    pub fn sorted_children(&self, node: NodeId) -> Vec<NodeId> {
        let mut children = self.nodes[node as usize].children.clone();
        children.sort_by(|&a, &b| {
            self.value(b)
                .cmp(&self.value(a))
                .then_with(|| self.name(a).cmp(self.name(b)))
        });
        children
    }

    /// Frames that writing every stack out costs (the sum of the depths of the nodes
    /// with self samples): what folded stacks and pprof samples grow with.
    pub fn stack_frames(&self) -> u64 {
        let mut frames = 0u64;
        let mut pending: Vec<(NodeId, u64)> = vec![(0, 0)];
        while let Some((node, depth)) = pending.pop() {
            if depth > 0 && self.self_value(node) > 0 {
                frames = frames.saturating_add(depth);
            }
            for &child in &self.nodes[node as usize].children {
                pending.push((child, depth + 1));
            }
        }
        frames
    }

    /// Calls `visit(path, samples)` for every node with self samples: its path of nodes
    /// from the root's child down to it, hottest branches first. Iterative: stacks can
    /// be thousands of frames deep.
    pub fn for_each_path(&self, mut visit: impl FnMut(&[NodeId], u64)) {
        let mut path: Vec<NodeId> = Vec::new();
        // (node, its depth): depth 0 is the root, which is not part of any path.
        let mut pending: Vec<(NodeId, usize)> = vec![(0, 0)];
        while let Some((node, depth)) = pending.pop() {
            path.truncate(depth.saturating_sub(1));
            if depth > 0 {
                path.push(node);
                if self.self_value(node) > 0 {
                    visit(&path, self.self_value(node));
                }
            }
            for &child in self.sorted_children(node).iter().rev() {
                pending.push((child, depth + 1));
            }
        }
    }

    /// Calls `visit(stack, samples)` for every stack that ends somewhere in the tree
    /// (its self samples), root first, hottest branches first.
    pub fn for_each_stack(&self, mut visit: impl FnMut(&[&str], u64)) {
        let mut stack: Vec<&str> = Vec::new();
        self.for_each_path(|path, samples| {
            stack.clear();
            stack.extend(path.iter().map(|&node| self.name(node)));
            visit(&stack, samples);
        });
    }

    /// The tree as JSON for d3-flame-graph style viewers: every node
    /// `{"name", "value", "self", "wall_ms", "children"}`, where `wall_ms` is the sampled
    /// wall time (samples × `dump_period_ms`). The root also says how many samples were
    /// cut short. Written without recursion, since stacks can be thousands deep.
    pub fn to_json(&self, dump_period_ms: i64) -> String {
        let mut out = String::with_capacity(self.nodes.len() * 96);
        let period = u64::try_from(dump_period_ms).unwrap_or(0);
        // Each entry is a node to open, or a marker that closes the one below it.
        enum Step {
            Open(NodeId, bool),
            Close,
        }
        let mut steps = vec![Step::Open(0, true)];
        while let Some(step) = steps.pop() {
            match step {
                Step::Close => out.push_str("]}"),
                Step::Open(node, first) => {
                    if !first {
                        out.push(',');
                    }
                    out.push_str("{\"name\":");
                    out.push_str(
                        &serde_json::to_string(self.name(node)).expect("a str serialises"),
                    );
                    let value = self.value(node);
                    let _ = write!(
                        out,
                        ",\"value\":{value},\"self\":{},\"wall_ms\":{}",
                        self.self_value(node),
                        value.saturating_mul(period)
                    );
                    if node == 0 {
                        let _ = write!(
                            out,
                            ",\"dump_period_ms\":{dump_period_ms},\"truncated_samples\":{}",
                            self.truncated_samples
                        );
                    }
                    out.push_str(",\"children\":[");
                    steps.push(Step::Close);
                    let children = self.sorted_children(node);
                    for (index, &child) in children.iter().enumerate().rev() {
                        steps.push(Step::Open(child, index == 0));
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(stacks: &[(&[&str], u64)]) -> FlameTree {
        let mut tree = FlameTree::new(1_000);
        for (stack, count) in stacks {
            tree.add(stack, *count);
        }
        tree
    }

    #[test]
    fn test_flame_merges_equal_prefixes() {
        let tree = tree(&[
            (&["main", "a", "x"], 3),
            (&["main", "a"], 1),
            (&["main", "b", "x"], 2),
            (&["other"], 1),
        ]);
        assert_eq!(tree.total(), 7);
        let root = tree.sorted_children(tree.root());
        assert_eq!(tree.name(root[0]), "main");
        assert_eq!(tree.value(root[0]), 6);
        assert_eq!(tree.self_value(root[0]), 0);
        let main = tree.sorted_children(root[0]);
        assert_eq!(
            main.iter()
                .map(|&n| (tree.name(n), tree.value(n), tree.self_value(n)))
                .collect::<Vec<_>>(),
            [("a", 4, 1), ("b", 2, 0)]
        );
        // "x" under "a" and "x" under "b" stay two nodes.
        assert_eq!(tree.node_count(), 7);
    }

    #[test]
    fn test_flame_for_each_stack_gives_back_self_samples() {
        let tree = tree(&[(&["m", "a", "x"], 3), (&["m", "a"], 1), (&["m", "b"], 5)]);
        let mut stacks = Vec::new();
        tree.for_each_stack(|stack, count| stacks.push((stack.join(";"), count)));
        assert_eq!(
            stacks,
            [
                ("m;b".to_string(), 5),
                ("m;a".to_string(), 1),
                ("m;a;x".to_string(), 3)
            ]
        );
    }

    #[test]
    fn test_flame_stack_frames() {
        let tree = tree(&[(&["m", "a", "x"], 3), (&["m", "a"], 1), (&["m", "b"], 5)]);
        assert_eq!(tree.stack_frames(), 3 + 2 + 2);
    }

    #[test]
    fn test_flame_json_shape() {
        let tree = tree(&[(&["m", "a\"q"], 2), (&["m"], 1)]);
        let json: serde_json::Value = serde_json::from_str(&tree.to_json(20)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "name": "all", "value": 3, "self": 0, "wall_ms": 60,
                "dump_period_ms": 20, "truncated_samples": 0,
                "children": [{
                    "name": "m", "value": 3, "self": 1, "wall_ms": 60,
                    "children": [{"name": "a\"q", "value": 2, "self": 2, "wall_ms": 40, "children": []}]
                }]
            })
        );
    }

    #[test]
    fn test_flame_json_of_a_deep_stack_needs_no_recursion() {
        let stack: Vec<String> = (0..20_000).map(|i| format!("f{i}")).collect();
        let mut tree = FlameTree::new(100_000);
        tree.add(&stack, 1);
        let json = tree.to_json(10);
        assert!(json.starts_with("{\"name\":\"all\""));
        assert_eq!(json.matches("\"children\":[").count(), 20_001);
        assert!(json.ends_with(&"]}".repeat(20_001)));
    }

    #[test]
    fn test_flame_bounded_nodes_count_truncated_samples() {
        let mut tree = FlameTree::new(3);
        tree.add(&["m", "a", "x"], 2);
        tree.add(&["m", "b"], 1);
        assert_eq!(tree.node_count(), 3);
        // "x" and "b" got no node, so their names were never kept.
        assert_eq!(tree.names.len(), 3);
        assert_eq!(tree.total(), 3);
        assert_eq!(tree.truncated_samples(), 3);
        let m = tree.sorted_children(0)[0];
        assert_eq!(tree.self_value(m), 1);
        let a = tree.sorted_children(m)[0];
        assert_eq!((tree.name(a), tree.self_value(a)), ("a", 2));
    }
}
