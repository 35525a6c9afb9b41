//! Brendan Gregg's folded stacks, one line per distinct stack: `root;…;leaf count`.
//! flamegraph.pl, inferno and speedscope read it.

use super::FlameTree;

/// A frame as a folded-stack field: `;` separates frames and a line ends the stack,
/// so both become `_` inside a frame (agents do not put them in code signatures).
fn field(frame: &str) -> std::borrow::Cow<'_, str> {
    if frame.contains([';', '\n', '\r']) {
        std::borrow::Cow::Owned(frame.replace([';', '\n', '\r'], "_"))
    } else {
        std::borrow::Cow::Borrowed(frame)
    }
}

/// The tree's stacks, hottest branches first, each with its self samples.
pub fn collapsed(tree: &FlameTree) -> String {
    let mut out = String::new();
    write_collapsed(tree, |chunk| {
        out.push_str(chunk);
        true
    });
    out
}

/// Bytes of folded text handed on at a time by `write_collapsed`.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// Writes the folded stacks in chunks of about `CHUNK_BYTES`, so that a large flame
/// graph is sent as it is written instead of held whole. `emit` answers false to stop.
pub fn write_collapsed(tree: &FlameTree, mut emit: impl FnMut(&str) -> bool) {
    use std::fmt::Write as _;
    // Each distinct frame is made a field once; lines are then plain copies.
    let fields: Vec<std::borrow::Cow<'_, str>> =
        tree.names().iter().map(|name| field(name)).collect();
    let mut out = String::with_capacity(CHUNK_BYTES + 4096);
    let mut open = true;
    tree.for_each_path(|path, count| {
        if !open {
            return;
        }
        for (index, &node) in path.iter().enumerate() {
            if index > 0 {
                out.push(';');
            }
            out.push_str(&fields[tree.name_id(node) as usize]);
        }
        let _ = writeln!(out, " {count}");
        if out.len() >= CHUNK_BYTES {
            open = emit(&out);
            out.clear();
        }
    });
    if open && !out.is_empty() {
        emit(&out);
    }
}

/// Reads folded stacks back into a tree (what `skysnap task top` does with the API's
/// collapsed answer). A line without a count at its end is an error naming the line.
pub fn parse(text: &str, max_nodes: usize) -> Result<FlameTree, String> {
    let mut tree = FlameTree::new(max_nodes);
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (stack, count) = line
            .rsplit_once(' ')
            .and_then(|(stack, count)| Some((stack, count.parse::<u64>().ok()?)))
            .ok_or_else(|| format!("line {} is not `frame;frame count`: {line:?}", index + 1))?;
        let frames: Vec<&str> = stack.split(';').collect();
        tree.add(&frames, count);
    }
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_folded_lines() {
        let mut tree = FlameTree::new(100);
        tree.add(&["a.Main.main:10", "a.B.run:3"], 4);
        tree.add(&["a.Main.main:10"], 1);
        tree.add(&["x;y", "z"], 2);
        assert_eq!(
            collapsed(&tree),
            "a.Main.main:10 1\na.Main.main:10;a.B.run:3 4\nx_y;z 2\n"
        );
    }

    #[test]
    fn test_folded_chunks_add_up() {
        let mut tree = FlameTree::new(100_000);
        for i in 0..5_000 {
            tree.add(&["main".to_string(), format!("frame-{i:05}")], 1);
        }
        let mut chunks = Vec::new();
        write_collapsed(&tree, |chunk| {
            chunks.push(chunk.to_string());
            true
        });
        assert!(chunks.len() > 1);
        assert!(chunks.iter().all(|chunk| chunk.ends_with('\n')));
        assert_eq!(chunks.concat(), collapsed(&tree));
        let mut calls = 0;
        write_collapsed(&tree, |_| {
            calls += 1;
            false
        });
        assert_eq!(calls, 1, "a refused chunk stops the writer");
    }

    #[test]
    fn test_folded_empty_tree() {
        assert_eq!(collapsed(&FlameTree::new(10)), "");
    }

    #[test]
    fn test_folded_parse_round_trip() {
        let text = "a;b 4\na 1\nc d;e 2\n";
        let tree = parse(text, 100).unwrap();
        assert_eq!(tree.total(), 7);
        assert_eq!(collapsed(&tree), "a 1\na;b 4\nc d;e 2\n");
        assert!(parse("a;b\n", 100).unwrap_err().contains("line 1"));
    }
}
