//! Room in a bounded map: the downstream task cache (by service) and the instance list
//! (by service and instance) both hold at most a set number of keys, and make room for a
//! new key the same way.

use std::collections::HashMap;
use std::hash::Hash;

/// Makes room for one more key in `map`, which may hold `capacity` keys: when it is
/// full, drops the entries `is_stale` says are stale, then the oldest by `age` until one
/// more fits. Scans the map, so it is meant for maps that rarely fill up.
pub fn make_room<K, V, A>(
    map: &mut HashMap<K, V>,
    capacity: usize,
    is_stale: impl Fn(&V) -> bool,
    age: impl Fn(&V) -> A,
) where
    K: Eq + Hash + Clone,
    A: Ord,
{
    let capacity = capacity.max(1);
    if map.len() < capacity {
        return;
    }
    map.retain(|_, value| !is_stale(value));
    while map.len() >= capacity {
        let oldest = map
            .iter()
            .min_by_key(|(_, value)| age(value))
            .map(|(key, _)| key.clone());
        match oldest {
            Some(key) => map.remove(&key),
            None => break,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_bounded_make_room_drops_stale_then_oldest() {
        // value = age; stale = age below 10.
        let mut map: HashMap<&str, u32> = [("a", 5), ("b", 20), ("c", 30)].into();
        make_room(&mut map, 3, |age| *age < 10, |age| *age);
        assert_eq!(map.len(), 2, "the stale entry made the room");
        assert!(!map.contains_key("a"));

        map.insert("d", 40);
        make_room(&mut map, 3, |age| *age < 10, |age| *age);
        assert_eq!(map.len(), 2, "nothing stale: the oldest went");
        assert!(!map.contains_key("b"));

        make_room(&mut map, 5, |_| true, |age| *age);
        assert_eq!(map.len(), 2, "not full: nothing dropped, stale or not");
    }
}
