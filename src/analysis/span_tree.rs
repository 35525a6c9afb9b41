//! The span tree of a kept trace segment, as SkyWalking's profile page shows it: each
//! span under its parent, children by start time. Spans come from agents, so the tree
//! holds whatever they send: a parent missing from the segment makes a root, a cycle is
//! broken at its earliest span, and nesting stops at `MAX_SPAN_TREE_DEPTH` levels (deeper
//! spans hang from the last level), so that neither building, serialising nor dropping
//! the tree recurses without bound, and the JSON stays readable by parsers with a nesting
//! limit (serde_json's is 128).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::model::ProfiledSpan;

/// Levels of nesting the tree has at most; a root is level 1. A segment's spans are
/// rarely more than a few levels deep; 50 levels are 102 levels of JSON with the answer's
/// own two.
pub const MAX_SPAN_TREE_DEPTH: usize = 50;

/// One span with the spans under it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpanNode {
    pub span_id: i32,
    /// As the agent sent it, even where the span hangs elsewhere (a missing parent, a
    /// cycle, or past the depth limit).
    pub parent_span_id: i32,
    pub operation_name: String,
    pub peer: String,
    pub span_type: String,
    pub span_layer: String,
    pub component_id: i32,
    pub start_time: i64,
    pub end_time: i64,
    /// `end_time - start_time`, ms.
    pub duration: i64,
    pub is_error: bool,
    /// By start time, then span id.
    pub children: Vec<SpanNode>,
}

/// The roots of the spans' tree, by start time then span id; every span is in it once.
pub fn span_tree(spans: &[ProfiledSpan]) -> Vec<SpanNode> {
    // Everything works on indexes in (start time, span id) order, so that children lists
    // filled in that order are already sorted and the outcome never depends on the order
    // the agent sent the spans in.
    let mut order: Vec<usize> = (0..spans.len()).collect();
    order.sort_by_key(|&index| (spans[index].start_time, spans[index].span_id, index));
    // A span id sent twice: children hang from the first (in that order).
    let mut index_of: HashMap<i32, usize> = HashMap::with_capacity(spans.len());
    for &index in &order {
        index_of.entry(spans[index].span_id).or_insert(index);
    }
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); spans.len()];
    let mut is_root = vec![true; spans.len()];
    for &index in &order {
        let span = &spans[index];
        if span.parent_span_id < 0 {
            continue;
        }
        if let Some(&parent) = index_of.get(&span.parent_span_id) {
            if parent != index {
                children[parent].push(index);
                is_root[index] = false;
            }
        }
    }

    let mut placement = Placement {
        children: &children,
        placed_under: vec![None; spans.len()],
        visited: vec![false; spans.len()],
        roots: Vec::new(),
    };
    for &index in &order {
        if is_root[index] && !placement.visited[index] {
            placement.place_from(index);
        }
    }
    // What no root reached is in a cycle (or under one): its earliest span becomes a root.
    for &index in &order {
        if !placement.visited[index] {
            placement.place_from(index);
        }
    }
    let Placement {
        placed_under,
        mut roots,
        ..
    } = placement;

    let mut placed_children: Vec<Vec<usize>> = vec![Vec::new(); spans.len()];
    for &index in &order {
        if let Some(parent) = placed_under[index] {
            placed_children[parent].push(index);
        }
    }
    roots.sort_by_key(|&index| (spans[index].start_time, spans[index].span_id, index));
    // The nesting is at most MAX_SPAN_TREE_DEPTH deep, so this recursion is bounded.
    roots
        .into_iter()
        .map(|root| node(spans, &placed_children, root))
        .collect()
}

/// Where each span hangs in the answer: under its parent, or, past the depth limit, under
/// its parent's own place (a sibling of its parent at the last level).
struct Placement<'a> {
    /// The spans whose parent each span is, in (start time, span id) order.
    children: &'a [Vec<usize>],
    placed_under: Vec<Option<usize>>,
    visited: Vec<bool>,
    roots: Vec<usize>,
}

impl Placement<'_> {
    /// Places `start` as a root and everything under it not placed yet, without recursion.
    fn place_from(&mut self, start: usize) {
        self.visited[start] = true;
        self.roots.push(start);
        // (span, its level; a root is level 1)
        let mut pending: Vec<(usize, usize)> = vec![(start, 1)];
        while let Some((index, level)) = pending.pop() {
            for &child in &self.children[index] {
                if self.visited[child] {
                    continue;
                }
                self.visited[child] = true;
                if level < MAX_SPAN_TREE_DEPTH {
                    self.placed_under[child] = Some(index);
                    pending.push((child, level + 1));
                } else {
                    self.placed_under[child] = self.placed_under[index];
                    pending.push((child, level));
                }
            }
        }
    }
}

fn node(spans: &[ProfiledSpan], children: &[Vec<usize>], index: usize) -> SpanNode {
    let span = &spans[index];
    SpanNode {
        span_id: span.span_id,
        parent_span_id: span.parent_span_id,
        operation_name: span.operation_name.clone(),
        peer: span.peer.clone(),
        span_type: span.span_type.clone(),
        span_layer: span.span_layer.clone(),
        component_id: span.component_id,
        start_time: span.start_time,
        end_time: span.end_time,
        duration: span.end_time.saturating_sub(span.start_time),
        is_error: span.is_error,
        children: children[index]
            .iter()
            .map(|&child| node(spans, children, child))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(span_id: i32, parent_span_id: i32, start_time: i64, end_time: i64) -> ProfiledSpan {
        ProfiledSpan {
            span_id,
            parent_span_id,
            operation_name: format!("op-{span_id}"),
            peer: String::new(),
            span_type: "Local".into(),
            span_layer: "Unknown".into(),
            component_id: 0,
            start_time,
            end_time,
            is_error: false,
        }
    }

    /// (span id, children) of a tree, for compact assertions.
    fn shape(nodes: &[SpanNode]) -> Vec<(i32, Vec<i32>)> {
        let mut out = Vec::new();
        let mut pending: Vec<&SpanNode> = nodes.iter().rev().collect();
        while let Some(node) = pending.pop() {
            out.push((
                node.span_id,
                node.children.iter().map(|child| child.span_id).collect(),
            ));
            pending.extend(node.children.iter().rev());
        }
        out
    }

    fn depth(nodes: &[SpanNode]) -> usize {
        let mut deepest = 0;
        let mut pending: Vec<(&SpanNode, usize)> = nodes.iter().map(|n| (n, 1)).collect();
        while let Some((node, level)) = pending.pop() {
            deepest = deepest.max(level);
            pending.extend(node.children.iter().map(|child| (child, level + 1)));
        }
        deepest
    }

    fn count(nodes: &[SpanNode]) -> usize {
        let mut total = 0;
        let mut pending: Vec<&SpanNode> = nodes.iter().collect();
        while let Some(node) = pending.pop() {
            total += 1;
            pending.extend(node.children.iter());
        }
        total
    }

    #[test]
    fn test_span_tree_nests_by_parent_and_sorts_children() {
        // As an agent sends them: each span when it ends, the entry span last.
        let spans = vec![
            span(2, 1, 130, 140),
            span(1, 0, 110, 150),
            span(4, 0, 105, 108),
            span(3, 0, 160, 190),
            span(5, 0, 160, 170),
            span(0, -1, 100, 200),
        ];
        let tree = span_tree(&spans);
        assert_eq!(
            shape(&tree),
            vec![
                (0, vec![4, 1, 3, 5]),
                (4, vec![]),
                (1, vec![2]),
                (2, vec![]),
                (3, vec![]),
                (5, vec![]),
            ]
        );
        assert_eq!(tree[0].duration, 100);
        assert_eq!(tree[0].children[1].children[0].operation_name, "op-2");
    }

    #[test]
    fn test_span_tree_missing_parent_is_a_root() {
        let tree = span_tree(&[span(0, -1, 100, 200), span(7, 3, 90, 95)]);
        assert_eq!(shape(&tree), vec![(7, vec![]), (0, vec![])]);
        assert_eq!(tree[0].parent_span_id, 3);
        assert!(span_tree(&[]).is_empty());
    }

    #[test]
    fn test_span_tree_cycle_and_self_parent_keep_every_span() {
        let spans = vec![
            span(1, 2, 10, 20),
            span(2, 1, 11, 20),
            span(3, 3, 12, 20),
            span(4, 2, 13, 20),
        ];
        let tree = span_tree(&spans);
        assert_eq!(
            shape(&tree),
            vec![(1, vec![2]), (2, vec![4]), (4, vec![]), (3, vec![])]
        );
    }

    #[test]
    fn test_span_tree_duplicate_span_ids_keep_every_span() {
        let spans = vec![
            span(0, -1, 100, 200),
            span(1, 0, 110, 120),
            span(1, 0, 130, 140),
            span(2, 1, 115, 118),
        ];
        let tree = span_tree(&spans);
        assert_eq!(count(&tree), 4);
        assert_eq!(
            shape(&tree),
            vec![(0, vec![1, 1]), (1, vec![2]), (2, vec![]), (1, vec![])]
        );
    }

    #[test]
    fn test_span_tree_deep_chain_stops_nesting_at_the_limit() {
        // 100,000 spans, each the parent of the next: a hostile agent's segment.
        let spans: Vec<ProfiledSpan> = (0..100_000)
            .map(|id| span(id, id - 1, i64::from(id), 1_000_000))
            .collect();
        let tree = span_tree(&spans);
        assert_eq!(count(&tree), 100_000);
        assert_eq!(depth(&tree), MAX_SPAN_TREE_DEPTH);
        // The last level holds the rest, in order, each still naming its real parent.
        let mut last_level = &tree[0];
        while last_level.children.len() == 1 {
            last_level = &last_level.children[0];
        }
        assert_eq!(last_level.span_id, (MAX_SPAN_TREE_DEPTH - 2) as i32);
        assert_eq!(
            last_level.children.len(),
            100_000 - (MAX_SPAN_TREE_DEPTH - 1)
        );
        assert_eq!(
            last_level.children[1].parent_span_id,
            last_level.children[0].span_id
        );
        // Serialises and parses back with serde_json's default nesting limit.
        let json = serde_json::to_string(&serde_json::json!({ "spans": tree })).unwrap();
        let _: serde_json::Value = serde_json::from_str(&json).unwrap();
    }
}
