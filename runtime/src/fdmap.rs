//! fd → value, indexed directly for the small fds nearly every program uses and kept in a
//! BTreeMap past them: journaling an open/close pair costs two array stores, not two tree
//! updates. Iterates in fd order; serializes as a map.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;

/// fds below this are stored by index.
const LOW: usize = 1024;

#[derive(Clone, Debug, PartialEq)]
pub struct FdMap<V> {
    low: Vec<Option<V>>,
    high: BTreeMap<i32, V>,
}

impl<V> Default for FdMap<V> {
    fn default() -> Self {
        FdMap {
            low: Vec::new(),
            high: BTreeMap::new(),
        }
    }
}

fn low(fd: i32) -> Option<usize> {
    usize::try_from(fd).ok().filter(|&i| i < LOW)
}

impl<V> FdMap<V> {
    pub fn get(&self, fd: &i32) -> Option<&V> {
        match low(*fd) {
            Some(i) => self.low.get(i)?.as_ref(),
            None => self.high.get(fd),
        }
    }

    pub fn get_mut(&mut self, fd: &i32) -> Option<&mut V> {
        match low(*fd) {
            Some(i) => self.low.get_mut(i)?.as_mut(),
            None => self.high.get_mut(fd),
        }
    }

    pub fn insert(&mut self, fd: i32, v: V) -> Option<V> {
        match low(fd) {
            Some(i) => {
                if self.low.len() <= i {
                    self.low.resize_with(i + 1, || None);
                }
                self.low[i].replace(v)
            }
            None => self.high.insert(fd, v),
        }
    }

    pub fn remove(&mut self, fd: &i32) -> Option<V> {
        match low(*fd) {
            Some(i) => self.low.get_mut(i)?.take(),
            None => self.high.remove(fd),
        }
    }

    /// (fd, value) in ascending fd order.
    pub fn iter(&self) -> impl Iterator<Item = (i32, &V)> {
        self.low
            .iter()
            .enumerate()
            .filter_map(|(i, v)| Some((i as i32, v.as_ref()?)))
            .chain(self.high.iter().map(|(k, v)| (*k, v)))
    }

    pub fn keys(&self) -> impl Iterator<Item = i32> + '_ {
        self.iter().map(|(k, _)| k)
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps the entries for which `keep` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(i32, &mut V) -> bool) {
        for (i, slot) in self.low.iter_mut().enumerate() {
            if slot.as_mut().is_some_and(|v| !keep(i as i32, v)) {
                *slot = None;
            }
        }
        self.high.retain(|k, v| keep(*k, v));
    }

    /// Every value whose fd lies in first..=last.
    pub fn for_range_mut(&mut self, first: i32, last: i32, mut f: impl FnMut(&mut V)) {
        for (i, slot) in self.low.iter_mut().enumerate() {
            if (first..=last).contains(&(i as i32))
                && let Some(v) = slot
            {
                f(v);
            }
        }
        for (_, v) in self.high.range_mut(first.max(0)..=last) {
            f(v);
        }
    }
}

impl<V: Serialize> Serialize for FdMap<V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.len()))?;
        for (k, v) in self.iter() {
            m.serialize_entry(&k, v)?;
        }
        m.end()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for FdMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let m = BTreeMap::<i32, V>::deserialize(d)?;
        let mut out = FdMap::default();
        for (k, v) in m {
            out.insert(k, v);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_a_sorted_map() {
        let mut m = FdMap::default();
        for fd in [5, 3000, 0, 1023, 1024] {
            assert_eq!(m.insert(fd, fd * 10), None);
        }
        assert_eq!(m.insert(5, 7), Some(50));
        assert_eq!(m.keys().collect::<Vec<_>>(), vec![0, 5, 1023, 1024, 3000]);
        assert_eq!(m.remove(&1023), Some(10230));
        assert_eq!(m.remove(&1023), None);
        assert_eq!(m.get(&3000), Some(&30000));
        m.for_range_mut(4, 1024, |v| *v += 1);
        assert_eq!(
            (m.get(&5), m.get(&1024), m.get(&0)),
            (Some(&8), Some(&10241), Some(&0))
        );
        m.retain(|fd, _| fd != 0);
        let bytes = postcard::to_stdvec(&m).unwrap();
        let back: FdMap<i32> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(
            back.iter().collect::<Vec<_>>(),
            m.iter().collect::<Vec<_>>()
        );
        assert_eq!(back.len(), 3);
    }
}
