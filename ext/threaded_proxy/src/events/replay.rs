//! The per-channel replay ring: the last `event_replay` events that had an
//! id, so a client reconnecting with `Last-Event-ID` gets what it missed.

use std::collections::VecDeque;

use bytes::Bytes;

/// The newest events of one channel that carry an id, oldest first.
#[derive(Default)]
pub struct Ring {
    /// (id, the encoded event as every subscriber got it).
    items: VecDeque<(Box<str>, Bytes)>,
}

impl Ring {
    /// Keeps `event` under `id`, dropping the oldest beyond `capacity`
    /// (0 keeps nothing).
    pub fn push(&mut self, id: &str, event: Bytes, capacity: usize) {
        while self.items.len() >= capacity.max(1) {
            self.items.pop_front();
        }
        if capacity > 0 {
            self.items.push_back((id.into(), event));
        }
    }

    /// The events after the newest one with `last_id`. An id the ring does
    /// not hold (older than the ring, or from before a restart) gets every
    /// event the ring holds: a duplicate is better than a gap.
    pub fn since(&self, last_id: &str) -> impl Iterator<Item = &Bytes> {
        let start = self
            .items
            .iter()
            .rposition(|(id, _)| &**id == last_id)
            .map_or(0, |i| i + 1);
        self.items.range(start..).map(|(_, event)| event)
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(ids: &[&str], capacity: usize) -> Ring {
        let mut ring = Ring::default();
        for id in ids {
            ring.push(id, Bytes::from(format!("e{id}")), capacity);
        }
        ring
    }

    fn since(ring: &Ring, id: &str) -> Vec<String> {
        ring.since(id)
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn replays_what_came_after_the_last_id() {
        let ring = ring(&["1", "2", "3", "4"], 10);
        assert_eq!(since(&ring, "2"), ["e3", "e4"]);
        assert_eq!(since(&ring, "4"), Vec::<String>::new());
    }

    #[test]
    fn keeps_only_the_newest_capacity_events() {
        let ring = ring(&["1", "2", "3", "4", "5"], 3);
        assert_eq!(ring.len(), 3);
        assert_eq!(since(&ring, "3"), ["e4", "e5"]);
        // "1" fell out: everything the ring holds.
        assert_eq!(since(&ring, "1"), ["e3", "e4", "e5"]);
        assert!(self::ring(&["1"], 0).is_empty());
    }

    #[test]
    fn a_repeated_id_replays_from_its_newest_occurrence() {
        let ring = ring(&["a", "b", "a", "c"], 10);
        assert_eq!(since(&ring, "a"), ["ec"]);
    }
}
