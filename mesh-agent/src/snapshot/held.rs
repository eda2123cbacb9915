//! [`Held`]: objects of one kind a compile read, held and sorted by address, so the
//! next compile finds which of them came and went by walking two sorted lists, without
//! reading the objects (each a cache miss at 10,000) or hashing their names.
//!
//! An address stands for the object only while the object is held: the list holds a
//! reference to each, so no address in it can be another object's.

use std::sync::Arc;

/// Objects by address, sorted by it, each once.
#[derive(Debug)]
pub(super) struct Held<T> {
    sorted: Arc<[(usize, Arc<T>)]>,
}

impl<T> Clone for Held<T> {
    fn clone(&self) -> Self {
        Self { sorted: self.sorted.clone() }
    }
}

impl<T> Default for Held<T> {
    fn default() -> Self {
        Self { sorted: Arc::from(Vec::new()) }
    }
}

/// What differs between two [`Held`] lists.
pub(super) struct Difference<'a, T> {
    /// In the earlier list only.
    pub(super) gone: Vec<&'a Arc<T>>,
    /// In the later list only.
    pub(super) came: Vec<&'a Arc<T>>,
}

impl<T> Held<T> {
    /// `objects`, held.
    pub(super) fn of<'a>(objects: impl Iterator<Item = &'a Arc<T>>) -> Self
    where
        T: 'a,
    {
        let mut sorted: Vec<(usize, Arc<T>)> = objects.map(|o| (Arc::as_ptr(o) as usize, o.clone())).collect();
        sorted.sort_unstable_by_key(|(address, _)| *address);
        sorted.dedup_by_key(|(address, _)| *address);
        Self { sorted: sorted.into() }
    }

    /// How many.
    pub(super) fn len(&self) -> usize {
        self.sorted.len()
    }

    /// Every object, in address order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &Arc<T>> {
        self.sorted.iter().map(|(_, o)| o)
    }

    /// The objects of `self` that `now` does not hold, and those of `now` that `self`
    /// does not.
    pub(super) fn difference<'a>(&'a self, now: &'a Held<T>) -> Difference<'a, T> {
        let (mut gone, mut came) = (Vec::new(), Vec::new());
        let (mut was, mut is) = (self.sorted.iter().peekable(), now.sorted.iter().peekable());
        loop {
            match (was.peek(), is.peek()) {
                (None, None) => break,
                (Some(a), Some(b)) if a.0 == b.0 => {
                    was.next();
                    is.next();
                }
                (Some(a), Some(b)) if a.0 < b.0 => {
                    gone.push(&a.1);
                    was.next();
                }
                (Some(a), None) => {
                    gone.push(&a.1);
                    was.next();
                }
                (_, Some(b)) => {
                    came.push(&b.1);
                    is.next();
                }
            }
        }
        Difference { gone, came }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_difference_names_what_went_and_what_came_once_each() {
        let objects: Vec<Arc<u32>> = (0..10).map(Arc::new).collect();
        let was = Held::of(objects[..7].iter());
        // 0 and 1 go, 7..10 come; 5 is listed twice and held once.
        let now = Held::of(objects[2..].iter().chain([&objects[5]]));
        assert_eq!(now.len(), 8);
        let d = was.difference(&now);
        let mut gone: Vec<u32> = d.gone.iter().map(|o| ***o).collect();
        let mut came: Vec<u32> = d.came.iter().map(|o| ***o).collect();
        gone.sort();
        came.sort();
        assert_eq!((gone, came), (vec![0, 1], vec![7, 8, 9]));
        let copy = was.clone();
        let same = was.difference(&copy);
        assert!(same.gone.is_empty() && same.came.is_empty());
    }
}
