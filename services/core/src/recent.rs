//! A map that remembers only its most recent entries: the gateway's resolved tx ids, the API's
//! transaction outcomes and the endorsers' rejected proposals all need "what happened to this id
//! lately", bounded so that memory does not grow with the chain.
//!
//! Built on `hashlink::LinkedHashMap`, which keeps each key once, in insertion order. (A
//! `HashMap` plus a `VecDeque` of keys, as the first two users had before, stores every key twice.)

use std::borrow::Borrow;
use std::hash::Hash;

use hashlink::LinkedHashMap;

/// At most `capacity` entries; inserting a new key past it forgets the oldest. Keyed by strings
/// unless told otherwise (the endorsers key theirs by a 64-bit hash).
#[derive(Debug, Clone)]
pub struct RecentMap<V, K: Hash + Eq = Box<str>> {
    entries: LinkedHashMap<K, V>,
    capacity: usize,
}

impl<V, K: Hash + Eq> RecentMap<V, K> {
    /// `capacity` is raised to 1: a map that forgets what it was just told is of no use.
    pub fn new(capacity: usize) -> Self {
        Self { entries: LinkedHashMap::new(), capacity: capacity.max(1) }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn get<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.entries.get(key)
    }

    /// A known key gets the new value and keeps its age; a new key is the youngest. Returns
    /// whether the key was new.
    pub fn insert<Q: Hash + Eq + ToOwned + ?Sized>(&mut self, key: &Q, value: V) -> bool
    where
        K: Borrow<Q>,
        Q::Owned: Into<K>,
    {
        if let Some(slot) = self.entries.get_mut(key) {
            *slot = value;
            return false;
        }
        self.entries.insert(key.to_owned().into(), value);
        while self.entries.len() > self.capacity {
            self.entries.pop_front();
        }
        true
    }

    pub fn remove<Q: Hash + Eq + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        self.entries.remove(key)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_the_oldest_first_and_replacing_keeps_the_age() {
        let mut m: RecentMap<i32> = RecentMap::new(3);
        assert!(m.insert("a", 1) && m.insert("b", 2) && m.insert("c", 3));
        assert!(!m.insert("a", 10), "a is known");
        assert_eq!(m.get("a"), Some(&10));
        assert!(m.insert("d", 4));
        assert_eq!((m.len(), m.get("a")), (3, None), "a is still the oldest, replaced or not");
        assert_eq!((m.get("b"), m.get("c"), m.get("d")), (Some(&2), Some(&3), Some(&4)));
        assert_eq!(m.remove("c"), Some(3));
        assert!(m.insert("e", 5) && m.insert("f", 6));
        assert_eq!(m.get("b"), None, "removing made room for one, not two");
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn keys_other_than_strings_are_remembered_alike() {
        let mut m: RecentMap<i64, u64> = RecentMap::new(2);
        assert!(m.insert(&7, 1) && m.insert(&8, 2));
        assert!(!m.insert(&7, 3), "7 is known");
        assert!(m.insert(&9, 4));
        assert_eq!((m.get(&7), m.get(&8), m.get(&9)), (None, Some(&2), Some(&4)), "7 was the oldest");
    }

    #[test]
    fn capacity_is_at_least_one() {
        let mut m: RecentMap<()> = RecentMap::new(0);
        m.insert("a", ());
        m.insert("b", ());
        assert_eq!((m.capacity(), m.len(), m.get("b")), (1, 1, Some(&())));
    }
}
