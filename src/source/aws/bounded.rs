//! Bounded per-scope state. A scope's role and external id come from tenant specs (within what the
//! source policy allows), so every map keyed by them is bounded: at its cap, the least recently
//! used entry that is not in use makes room for a new one.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Instant;

/// Makes room for one more entry in `map`, which holds at most `cap`: removes the least recently
/// used entries among those `evictable` gives a last use for (`None`: in use, kept). Linear in the
/// map's size per entry removed, paid only when a new entry is made at the cap. When every entry
/// is in use the map grows past the cap: what is in use is bounded by the calls in flight, and
/// [`trim`] brings it back once they are done.
pub(super) fn make_room<K: Eq + Hash + Clone, V>(
    map: &mut HashMap<K, V>,
    cap: usize,
    evictable: impl Fn(&V) -> Option<Instant>,
) {
    trim(map, cap.saturating_sub(1), evictable);
}

/// Removes the least recently used entries not in use until `map` holds at most `cap` (or only
/// entries in use are left).
pub(super) fn trim<K: Eq + Hash + Clone, V>(
    map: &mut HashMap<K, V>,
    cap: usize,
    evictable: impl Fn(&V) -> Option<Instant>,
) {
    while map.len() > cap {
        let oldest = map
            .iter()
            .filter_map(|(key, value)| evictable(value).map(|used| (used, key)))
            .min_by_key(|(used, _)| *used)
            .map(|(_, key)| key.clone());
        match oldest {
            Some(key) => map.remove(&key),
            None => return,
        };
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

    #[test]
    fn a_map_grown_past_the_cap_while_in_use_is_trimmed_back_once_released() {
        let start = Instant::now();
        let at = |seconds| start + Duration::from_secs(seconds);
        // A burst: six entries in use at once against a cap of 3.
        let mut map: HashMap<u64, (Instant, bool)> = (0..6).map(|n| (n, (at(n), true))).collect();
        let evictable = |(used, in_use): &(Instant, bool)| (!in_use).then_some(*used);
        trim(&mut map, 3, evictable);
        assert_eq!(map.len(), 6, "all in use: nothing can go");
        for entry in map.values_mut() {
            entry.1 = false;
        }
        trim(&mut map, 3, evictable);
        let mut left: Vec<_> = map.keys().copied().collect();
        left.sort();
        assert_eq!(left, [3, 4, 5], "the three used last stay");
    }
}
