//! The stacks `skysnap load` and the benchmark baselines send. Two mixes:
//!
//! * `realistic` (the default): every segment distinct; its stacks drawn from a pool of
//!   a few thousand stack shapes whose popularity follows a Zipf law (a few code paths
//!   are hot, most are rare), 10 to 200 frames deep, most 30 to 80; a segment stays on
//!   one stack for a run of several dumps (a thread parked in the same frames) and
//!   moves to another variant of its shape, which differs in its deepest frames, between
//!   runs. Many shapes share their outer frames (thread roots, the web framework).
//! * `cycle`: the generator of earlier releases: each stream cycles through 4 segments'
//!   stacks of a fixed depth whose deepest 3 frames change at every dump. Kept so that
//!   earlier figures can be reproduced; it flatters compression.
//!
//! Every distinct stack is encoded once, as the `stack` field of a `ThreadSnapshot`, and
//! sent many times, so that the figures measure the server, not the generator.

use bytes::{Bytes, BytesMut};
use prost::Message as _;

use crate::proto::v3::ThreadStack;

/// A small, fast, seedable generator (xorshift64*), so that loads are reproducible.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..bound` (0 for a bound of 0).
    pub fn below(&mut self, bound: usize) -> usize {
        (self.next_u64() % bound.max(1) as u64) as usize
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Field number of `stack` in `ThreadSnapshot`, the last field of the message.
pub const STACK_FIELD: u32 = 5;

/// A stack encoded as the `stack` field of a `ThreadSnapshot`.
pub fn encode_stack_field(frames: &[String]) -> Bytes {
    let stack = ThreadStack {
        code_signatures: frames.to_vec(),
    };
    let mut field = BytesMut::with_capacity(stack.encoded_len() + 8);
    prost::encoding::message::encode(STACK_FIELD, &stack, &mut field);
    field.freeze()
}

/// Java-style signatures, `package.Class.method:line`.
pub fn frame_pool(size: usize) -> Vec<String> {
    let packages = [
        "org.apache.catalina.core",
        "org.springframework.web.servlet",
        "com.shop.orders",
        "io.netty.channel",
        "java.util.concurrent",
        "com.zaxxer.hikari.pool",
        "com.fasterxml.jackson.databind",
        "org.hibernate.internal",
        "com.shop.payments",
        "reactor.core.publisher",
    ];
    (0..size.max(1))
        .map(|n| {
            let package = packages[n % packages.len()];
            format!(
                "{package}.Component{}.handle{}:{}",
                n / 7,
                n % 13,
                10 + n % 400
            )
        })
        .collect()
}

/// How the realistic mix is drawn; the defaults are what the benchmark sends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RealisticShape {
    /// Distinct stack shapes (code paths).
    pub shapes: usize,
    /// Stacks per shape that differ in their deepest frames (where a thread moves).
    pub variants_per_shape: usize,
    /// Zipf exponent of the shapes' popularity.
    pub zipf_exponent: f64,
    /// Distinct frame signatures the stacks are made of.
    pub frames: usize,
    /// Dumps a segment stays on one stack: uniform in this range, both ends included.
    pub run_min: usize,
    pub run_max: usize,
}

impl Default for RealisticShape {
    fn default() -> RealisticShape {
        RealisticShape {
            shapes: 2_000,
            variants_per_shape: 4,
            zipf_exponent: 1.1,
            frames: 20_000,
            run_min: 2,
            run_max: 8,
        }
    }
}

/// Outer frames shared by many shapes: thread roots and framework chains.
const ENTRY_CHAINS: usize = 16;
const MIN_DEPTH: usize = 10;
const MAX_DEPTH: usize = 200;

/// The realistic mix: distinct stacks, each encoded once, and the Zipf law over shapes.
pub struct StackMix {
    shape: RealisticShape,
    /// Stack `shape * variants_per_shape + variant`, encoded.
    encoded: Vec<Bytes>,
    /// Cumulative popularity of the shapes, rising to 1.
    cumulative: Vec<f64>,
}

impl StackMix {
    pub fn realistic(shape: RealisticShape, seed: u64) -> StackMix {
        let shape = RealisticShape {
            shapes: shape.shapes.max(1),
            variants_per_shape: shape.variants_per_shape.max(1),
            frames: shape.frames.max(1),
            run_min: shape.run_min.max(1),
            run_max: shape.run_max.max(shape.run_min.max(1)),
            ..shape
        };
        let vocabulary = frame_pool(shape.frames);
        let mut rng = Rng::new(seed);
        let pick = |rng: &mut Rng| vocabulary[rng.below(vocabulary.len())].clone();
        let chains: Vec<Vec<String>> = (0..ENTRY_CHAINS)
            .map(|_| {
                let length = 8 + rng.below(23);
                (0..length).map(|_| pick(&mut rng)).collect()
            })
            .collect();
        let mut encoded = Vec::with_capacity(shape.shapes * shape.variants_per_shape);
        for _ in 0..shape.shapes {
            // Depth: 10 + 190 u², so most stacks are 30 to 80 frames, a few near 200.
            let u = rng.unit();
            let depth = (MIN_DEPTH + ((MAX_DEPTH - MIN_DEPTH) as f64 * u * u) as usize)
                .clamp(MIN_DEPTH, MAX_DEPTH);
            let chain = &chains[rng.below(chains.len())];
            let mut base: Vec<String> = chain.iter().take(depth).cloned().collect();
            while base.len() < depth {
                base.push(pick(&mut rng));
            }
            for variant in 0..shape.variants_per_shape {
                let mut stack = base.clone();
                if variant > 0 {
                    // A variant differs from the base in its deepest 1 to 5 frames.
                    let changed = (1 + rng.below(5)).min(stack.len() - 1);
                    let keep = stack.len() - changed;
                    for frame in &mut stack[keep..] {
                        *frame = pick(&mut rng);
                    }
                }
                encoded.push(encode_stack_field(&stack));
            }
        }
        let weights: Vec<f64> = (1..=shape.shapes)
            .map(|rank| 1.0 / (rank as f64).powf(shape.zipf_exponent))
            .collect();
        let total: f64 = weights.iter().sum();
        let mut running = 0.0;
        let cumulative = weights
            .iter()
            .map(|weight| {
                running += weight / total;
                running
            })
            .collect();
        StackMix {
            shape,
            encoded,
            cumulative,
        }
    }

    /// Distinct stacks in the mix.
    pub fn len(&self) -> usize {
        self.encoded.len()
    }

    pub fn is_empty(&self) -> bool {
        self.encoded.is_empty()
    }

    /// Stack `index`, encoded as the `stack` field.
    pub fn encoded(&self, index: usize) -> &Bytes {
        &self.encoded[index]
    }

    /// Stack `index` as frames (decoded again: the mix keeps the encoded form only).
    pub fn frames(&self, index: usize) -> Vec<String> {
        let mut field = self.encoded[index].clone();
        // Skip the field's key and length; what follows is the ThreadStack message.
        let _key = prost::encoding::decode_varint(&mut field).expect("own encoding");
        let _length = prost::encoding::decode_varint(&mut field).expect("own encoding");
        ThreadStack::decode(field)
            .expect("own encoding")
            .code_signatures
    }

    /// A shape by popularity.
    fn popular_shape(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.cumulative
            .partition_point(|&bound| bound < u)
            .min(self.shape.shapes - 1)
    }

    /// The stacks of one segment of `count` dumps, as indices into the mix: one shape,
    /// runs of identical dumps, another variant of the shape between runs.
    pub fn segment(&self, rng: &mut Rng, count: usize) -> Vec<usize> {
        let variants = self.shape.variants_per_shape;
        let base = self.popular_shape(rng) * variants;
        let mut variant = rng.below(variants);
        let mut stacks = Vec::with_capacity(count);
        while stacks.len() < count {
            let run = self.shape.run_min + rng.below(self.shape.run_max - self.shape.run_min + 1);
            for _ in 0..run.min(count - stacks.len()) {
                stacks.push(base + variant);
            }
            if variants > 1 {
                variant = (variant + 1 + rng.below(variants - 1)) % variants;
            }
        }
        stacks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> RealisticShape {
        RealisticShape {
            shapes: 200,
            ..RealisticShape::default()
        }
    }

    #[test]
    fn test_load_stacks_depths_and_shared_roots() {
        let mix = StackMix::realistic(small(), 7);
        assert_eq!(mix.len(), 800);
        let stacks: Vec<Vec<String>> = (0..mix.len()).map(|index| mix.frames(index)).collect();
        assert!(stacks
            .iter()
            .all(|stack| (MIN_DEPTH..=MAX_DEPTH).contains(&stack.len())));
        let deep = stacks.iter().filter(|stack| stack.len() > 100).count();
        let middle = stacks
            .iter()
            .filter(|stack| (30..=80).contains(&stack.len()))
            .count();
        assert!(deep > 0 && middle > deep, "deep {deep}, middle {middle}");
        // Roots come from a few entry chains.
        let roots: std::collections::HashSet<&String> =
            stacks.iter().map(|stack| &stack[0]).collect();
        assert!(roots.len() <= ENTRY_CHAINS, "{}", roots.len());
        // A variant keeps its shape's outer frames and changes only the deepest ones.
        let (base, variant) = (&stacks[0], &stacks[1]);
        assert_eq!(base.len(), variant.len());
        let differing = base.iter().zip(variant).filter(|(a, b)| a != b).count();
        assert!(differing <= 5);
        assert_eq!(base[..base.len() - 5], variant[..variant.len() - 5]);
    }

    #[test]
    fn test_load_stacks_segments_run_and_follow_zipf() {
        let mix = StackMix::realistic(small(), 7);
        let mut rng = Rng::new(3);
        let mut shape_counts = vec![0usize; 200];
        for _ in 0..2_000 {
            let segment = mix.segment(&mut rng, 50);
            assert_eq!(segment.len(), 50);
            let shape = segment[0] / 4;
            assert!(segment.iter().all(|stack| stack / 4 == shape), "one shape");
            // Runs: consecutive dumps repeat; a change is a different variant.
            let changes = segment.windows(2).filter(|pair| pair[0] != pair[1]).count();
            assert!((5..=25).contains(&changes), "{changes} changes in 50 dumps");
            shape_counts[shape] += 1;
        }
        // Zipf: the most popular shape is drawn far more often than a middling one.
        assert!(shape_counts[0] > 10 * shape_counts[100].max(1));
        assert!(shape_counts.iter().filter(|&&count| count > 0).count() > 50);
    }

    #[test]
    fn test_load_stacks_encoding_round_trips() {
        let frames = vec!["a.b:1".to_string(), "c.d:2".to_string()];
        let field = encode_stack_field(&frames);
        let mix = StackMix {
            shape: RealisticShape::default(),
            encoded: vec![field],
            cumulative: vec![1.0],
        };
        assert_eq!(mix.frames(0), frames);
    }
}
