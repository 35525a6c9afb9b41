//! The differential flame graph: two flame trees (two tasks, two ranges, two segments)
//! merged by frame path into one tree whose nodes carry both sides' samples and their
//! shares of each side's total, so a viewer can colour what got hotter or cooler.

use std::fmt::Write as _;

use super::flame::NodeId;
use super::FlameTree;

fn share(samples: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        samples as f64 / total as f64
    }
}

/// The diff as JSON: `{"base_total", "target_total", "tip", "tree"}` where every node
/// of `tree` is `{"name", "base", "target", "base_share", "target_share", "delta",
/// "children"}` (`delta` = target_share − base_share; shares are of each side's total).
/// Children are ordered by their larger share, hottest first. Both sides empty gives an
/// empty root and the tip `Data not found`.
pub fn diff_json(base: &FlameTree, target: &FlameTree) -> String {
    let (base_total, target_total) = (base.total(), target.total());
    let mut out = String::new();
    let tip = if base_total == 0 && target_total == 0 {
        "\"Data not found\""
    } else {
        "null"
    };
    let _ = write!(
        out,
        "{{\"base_total\":{base_total},\"target_total\":{target_total},\"tip\":{tip},\"tree\":"
    );
    enum Step {
        Open(Option<NodeId>, Option<NodeId>, bool),
        Close,
    }
    let mut steps = vec![Step::Open(Some(base.root()), Some(target.root()), true)];
    while let Some(step) = steps.pop() {
        let (base_node, target_node, first) = match step {
            Step::Close => {
                out.push_str("]}");
                continue;
            }
            Step::Open(base_node, target_node, first) => (base_node, target_node, first),
        };
        if !first {
            out.push(',');
        }
        let name = match (base_node, target_node) {
            (Some(node), _) => base.name(node),
            (None, Some(node)) => target.name(node),
            (None, None) => unreachable!("a diff node is on at least one side"),
        };
        let base_samples = base_node.map_or(0, |node| base.value(node));
        let target_samples = target_node.map_or(0, |node| target.value(node));
        let base_share = share(base_samples, base_total);
        let target_share = share(target_samples, target_total);
        out.push_str("{\"name\":");
        out.push_str(&serde_json::to_string(name).expect("a str serialises"));
        let _ = write!(
            out,
            ",\"base\":{base_samples},\"target\":{target_samples},\"base_share\":{},\
             \"target_share\":{},\"delta\":{},\"children\":[",
            json_number(base_share),
            json_number(target_share),
            json_number(target_share - base_share)
        );
        steps.push(Step::Close);

        // Children of both sides matched by frame name, through a map: a node can have
        // many thousands of children.
        let mut target_children: std::collections::HashMap<&str, NodeId> = target_node
            .map(|node| {
                target
                    .sorted_children(node)
                    .into_iter()
                    .map(|child| (target.name(child), child))
                    .collect()
            })
            .unwrap_or_default();
        let mut children: Vec<(Option<NodeId>, Option<NodeId>, f64)> = Vec::new();
        if let Some(node) = base_node {
            for child in base.sorted_children(node) {
                let partner = target_children.remove(base.name(child));
                let larger = share(base.value(child), base_total)
                    .max(partner.map_or(0.0, |p| share(target.value(p), target_total)));
                children.push((Some(child), partner, larger));
            }
        }
        let mut target_only: Vec<NodeId> = target_children.into_values().collect();
        // The hash map lost the order: hottest first, then by name, as everywhere.
        target_only.sort_by(|&a, &b| {
            target
                .value(b)
                .cmp(&target.value(a))
                .then_with(|| target.name(a).cmp(target.name(b)))
        });
        for child in target_only {
            children.push((None, Some(child), share(target.value(child), target_total)));
        }
        children.sort_by(|a, b| b.2.total_cmp(&a.2));
        for (index, (base_child, target_child, _)) in children.into_iter().enumerate().rev() {
            steps.push(Step::Open(base_child, target_child, index == 0));
        }
    }
    out.push('}');
    out
}

/// Shares rounded to six places, as JSON numbers.
fn json_number(value: f64) -> String {
    let rounded = (value * 1e6).round() / 1e6;
    if rounded == 0.0 {
        "0".to_string()
    } else {
        rounded.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn tree(stacks: &[(&[&str], u64)]) -> FlameTree {
        let mut tree = FlameTree::new(100);
        for (stack, count) in stacks {
            tree.add(stack, *count);
        }
        tree
    }

    #[test]
    fn test_diff_shares_by_side() {
        let base = tree(&[(&["m", "a"], 3), (&["m", "b"], 1)]);
        let target = tree(&[(&["m", "a"], 1), (&["m", "c"], 3)]);
        let value: Value = serde_json::from_str(&diff_json(&base, &target)).unwrap();
        assert_eq!(
            value,
            json!({
                "base_total": 4, "target_total": 4, "tip": null,
                "tree": {"name": "all", "base": 4, "target": 4, "base_share": 1,
                    "target_share": 1, "delta": 0, "children": [
                    {"name": "m", "base": 4, "target": 4, "base_share": 1, "target_share": 1,
                     "delta": 0, "children": [
                        {"name": "a", "base": 3, "target": 1, "base_share": 0.75,
                         "target_share": 0.25, "delta": -0.5, "children": []},
                        {"name": "c", "base": 0, "target": 3, "base_share": 0,
                         "target_share": 0.75, "delta": 0.75, "children": []},
                        {"name": "b", "base": 1, "target": 0, "base_share": 0.25,
                         "target_share": 0, "delta": -0.25, "children": []}
                    ]}
                ]}
            })
        );
    }

    #[test]
    fn test_diff_both_sides_empty() {
        let empty = FlameTree::new(10);
        let value: Value = serde_json::from_str(&diff_json(&empty, &empty)).unwrap();
        assert_eq!(value["tip"], "Data not found");
        assert_eq!(value["tree"]["children"], json!([]));
        assert_eq!(value["base_total"], 0);
    }
}
