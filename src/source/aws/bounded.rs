//! Bounded per-scope state. A scope's role and external id come from tenant specs (within what the
//! source policy allows), so every map keyed by them is bounded: at its cap, the least recently
//! used entry that is not in use makes room for a new one.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Instant;

/// Makes room for one more entry in `map`, which holds at most `cap`: removes the least recently
/// used entry among those `evictable` gives a last use for (`None`: in use, kept). Linear in the
/// map's size, paid only when a new entry is made at the cap. When every entry is in use the map
/// grows past the cap: what is in use is bounded by the calls in flight.
pub(super) fn make_room<K: Eq + Hash + Clone, V>(
    map: &mut HashMap<K, V>,
    cap: usize,
    evictable: impl Fn(&V) -> Option<Instant>,
) {
    if map.len() < cap {
        return;
    }
    let oldest = map
        .iter()
        .filter_map(|(key, value)| evictable(value).map(|used| (used, key)))
        .min_by_key(|(used, _)| *used)
        .map(|(_, key)| key.clone());
    if let Some(key) = oldest {
        map.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn at_the_cap_the_least_recently_used_entry_not_in_use_goes() {
        let start = Instant::now();
        let at = |seconds| start + Duration::from_secs(seconds);
        // (last use, in use)
        let mut map = HashMap::from([
            ("a", (at(1), true)),
            ("b", (at(2), false)),
            ("c", (at(3), false)),
        ]);
        let evictable = |(used, in_use): &(Instant, bool)| (!in_use).then_some(*used);
        make_room(&mut map, 4, evictable);
        assert_eq!(map.len(), 3, "below the cap nothing goes");
        make_room(&mut map, 3, evictable);
        let mut left: Vec<_> = map.keys().copied().collect();
        left.sort();
        assert_eq!(
            left,
            ["a", "c"],
            "b is the oldest not in use; a is older but in use"
        );
        map.insert("d", (at(4), true));
        map.insert("e", (at(5), true));
        map.remove("c");
        make_room(&mut map, 3, evictable);
        assert_eq!(map.len(), 3, "everything in use: kept, past the cap");
    }
}
