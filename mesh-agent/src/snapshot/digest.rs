//! [`ConfigDigest`]: the short hash of a config that `meshctl proxy-status` compares
//! across agents.
//!
//! Each object is hashed alone (SHA-256 of its `Debug` text, stable because config
//! types hold only ordered maps) and the digest is SHA-256 over those hashes sorted, so
//! it depends on what the config holds, not the order it arrived in, and a new
//! snapshot hashes only the objects that are new to it: the others' hashes come from
//! the snapshot it replaces. (Not a sum of the hashes: sums of many chosen terms
//! collide cheaply, and tenants choose objects.)
//!
//! What is taken over is found by address, walking the objects sorted by address
//! beside the predecessor's list (no hashing, no reading an object that did not
//! change), and the sorted hashes are the predecessor's with the hashes of objects
//! gone taken out and those of objects new merged in: a change costs a pass over two
//! sorted lists and the hash of what changed. Looking 20,000 objects up in a map of
//! the predecessor's hashes and sorting 20,000 hashes took as long as the rest of a
//! compile in which one Service changed.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};

use crate::config::{Object, RemoteObjects};

/// The objects a snapshot was compiled from: this cluster's and other clusters'.
type CompiledFrom = (Vec<Object>, Vec<RemoteObjects>);

/// A snapshot's config digest, worked out when first asked for from the objects the
/// snapshot was compiled from (shared with the source: holding them costs a reference
/// each). Empty for the snapshot an agent starts with, before any config.
#[derive(Default)]
pub(crate) struct ConfigDigest {
    compiled_from: Option<Arc<CompiledFrom>>,
    /// The object hashes of the snapshot this one replaced, to take over; dropped once
    /// this digest is known.
    previous: Mutex<Option<Arc<ObjectHashes>>>,
    known: OnceLock<(String, Arc<ObjectHashes>)>,
}

/// Each object's hash, by the object's address, per cluster (None: this one), with
/// the objects themselves: held, an address cannot be another object's while its
/// hash is looked up.
#[derive(Default)]
pub(crate) struct ObjectHashes {
    _held: Option<Arc<CompiledFrom>>,
    sections: HashMap<Option<String>, Section>,
}

/// One cluster's object hashes.
#[derive(Default)]
struct Section {
    /// By the object's address, sorted by it (an object listed twice, twice).
    by_address: Vec<(usize, Hash)>,
    /// Sorted by hash: what the digest hashes.
    sorted: Vec<Hash>,
}

impl ConfigDigest {
    /// The digest of `objects` and `remotes`, taking over what `previous` (the digest of
    /// the snapshot they replace) already hashed.
    pub(crate) fn of(objects: &[Object], remotes: &[RemoteObjects], previous: Option<&ConfigDigest>) -> Self {
        let previous = previous.and_then(ConfigDigest::hashes);
        Self {
            compiled_from: Some(Arc::new((objects.to_vec(), remotes.to_vec()))),
            previous: Mutex::new(previous),
            known: OnceLock::new(),
        }
    }

    /// The digest: the first 8 bytes, in hex, of SHA-256 over this cluster's objects'
    /// hashes in sorted order, then each remote cluster's name and its objects' hashes
    /// in sorted order (clusters by name).
    pub(crate) fn get(&self) -> &str {
        let Some(compiled_from) = &self.compiled_from else { return "" };
        &self
            .known
            .get_or_init(|| {
                let previous = self.previous.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_default();
                digest(compiled_from, &previous)
            })
            .0
    }

    /// The object hashes this digest has (or took over, when not worked out yet).
    fn hashes(&self) -> Option<Arc<ObjectHashes>> {
        match self.known.get() {
            Some((_, hashes)) => Some(hashes.clone()),
            None => self.previous.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

impl std::fmt::Debug for ConfigDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ConfigDigest").field(&self.known.get().map(|(hex, _)| hex)).finish()
    }
}

fn digest(compiled_from: &Arc<CompiledFrom>, previous: &ObjectHashes) -> (String, Arc<ObjectHashes>) {
    let (objects, remotes) = &**compiled_from;
    let mut hasher = TextHasher::default();
    let mut sections = HashMap::new();
    let mut all = ring::digest::Context::new(&ring::digest::SHA256);
    let local = Section::of(objects, previous.sections.get(&None), &mut hasher);
    for h in &local.sorted {
        all.update(h);
    }
    sections.insert(None, local);
    let mut remotes: Vec<&RemoteObjects> = remotes.iter().collect();
    remotes.sort_by(|a, b| a.cluster.cmp(&b.cluster));
    for r in remotes {
        all.update(format!("cluster {}\0", r.cluster).as_bytes());
        let name = Some(r.cluster.clone());
        let section = Section::of(&r.objects, previous.sections.get(&name), &mut hasher);
        for h in &section.sorted {
            all.update(h);
        }
        sections.insert(name, section);
    }
    let hex = all.finish().as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    (hex, Arc::new(ObjectHashes { _held: Some(compiled_from.clone()), sections }))
}

impl Section {
    /// The hashes of `objects`: `previous`'s for the objects it has (by address), new
    /// ones for the rest.
    fn of(objects: &[Object], previous: Option<&Section>, hasher: &mut TextHasher) -> Self {
        let empty = Section::default();
        let previous = previous.unwrap_or(&empty);
        let mut now: Vec<(usize, &Object)> = objects.iter().map(|o| (o.address(), o)).collect();
        now.sort_unstable_by_key(|(address, _)| *address);
        let mut by_address = Vec::with_capacity(now.len());
        let (mut gone, mut came) = (Vec::new(), Vec::new());
        let mut was = previous.by_address.as_slice();
        let mut now = now.as_slice();
        // Address by address: an object listed n times before and m times now.
        while !was.is_empty() || !now.is_empty() {
            let address = match (was.first(), now.first()) {
                (Some((a, _)), Some((b, _))) => *a.min(b),
                (Some((a, _)), None) => *a,
                (None, Some((b, _))) => *b,
                (None, None) => break,
            };
            let before = was.iter().take_while(|(a, _)| *a == address).count();
            let after = now.iter().take_while(|(a, _)| *a == address).count();
            let hash = match (was.first(), now.first()) {
                (Some((_, hash)), _) if before > 0 => *hash,
                (_, Some((_, o))) => hasher.hash(o),
                _ => unreachable!("one of the lists holds the address"),
            };
            for _ in after..before {
                gone.push(hash);
            }
            for _ in before..after {
                came.push(hash);
            }
            by_address.extend(std::iter::repeat_n((address, hash), after));
            was = &was[before..];
            now = &now[after..];
        }
        gone.sort_unstable();
        came.sort_unstable();
        Self { by_address, sorted: patched(&previous.sorted, &gone, &came) }
    }
}

/// `sorted` with one of each of `gone` taken out and `came` merged in (all sorted).
fn patched(sorted: &[Hash], gone: &[Hash], came: &[Hash]) -> Vec<Hash> {
    let mut out = Vec::with_capacity(sorted.len() + came.len());
    let mut gone = gone.iter().peekable();
    let mut came = came.iter().peekable();
    for h in sorted {
        // (Every hash gone is in `sorted`: this only keeps a stray one from stopping the
        // others.)
        while gone.next_if(|g| *g < h).is_some() {}
        if gone.peek() == Some(&h) {
            gone.next();
            continue;
        }
        while let Some(c) = came.next_if(|c| *c < h) {
            out.push(*c);
        }
        out.push(*h);
    }
    out.extend(came);
    out
}

/// One object's SHA-256.
type Hash = [u8; 32];

/// Feeds an object's `Debug` text into SHA-256 a block at a time (`Debug` writes in
/// pieces of a few bytes; one hash update per piece cost more than the hashing), with
/// one buffer for every object.
struct TextHasher {
    context: ring::digest::Context,
    pending: Vec<u8>,
}

impl TextHasher {
    const BLOCK: usize = 16 << 10;

    /// `o`'s hash; the context is fresh between calls (each leaves a new one).
    fn hash(&mut self, o: &Object) -> Hash {
        let _ = write!(self, "{o:?}");
        self.context.update(&self.pending);
        self.pending.clear();
        let context = std::mem::replace(&mut self.context, ring::digest::Context::new(&ring::digest::SHA256));
        context.finish().as_ref().try_into().unwrap_or_default()
    }
}

impl Default for TextHasher {
    fn default() -> Self {
        Self { context: ring::digest::Context::new(&ring::digest::SHA256), pending: Vec::with_capacity(Self::BLOCK) }
    }
}

impl std::fmt::Write for TextHasher {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        if self.pending.len() + s.len() > Self::BLOCK {
            self.context.update(&self.pending);
            self.pending.clear();
        }
        if s.len() > Self::BLOCK {
            self.context.update(s.as_bytes());
        } else {
            self.pending.extend_from_slice(s.as_bytes());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::parse_documents;

    fn services(range: std::ops::Range<usize>, port: u16) -> Vec<Object> {
        let text: String = range
            .map(|i| {
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: n}}\n\
                     spec: {{clusterIP: 10.96.1.{}, ports: [{{port: {port}}}]}}\n---\n",
                    i % 250
                )
            })
            .collect();
        parse_documents(Path::new("services.yaml"), &text).unwrap()
    }

    /// What the digest is, written out apart from the code that takes hashes over:
    /// agents of different versions agree on it for the same config.
    fn by_definition(objects: &[Object]) -> String {
        let mut hashes: Vec<Vec<u8>> = objects
            .iter()
            .map(|o| ring::digest::digest(&ring::digest::SHA256, format!("{o:?}").as_bytes()).as_ref().to_vec())
            .collect();
        hashes.sort();
        let all = ring::digest::digest(&ring::digest::SHA256, &hashes.concat());
        all.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn the_digest_hashes_the_objects_text_hashes_sorted_whatever_their_order() {
        let mut objects = services(0..300, 80);
        let big = format!("{:?}", objects[0]).len();
        assert!(big < TextHasher::BLOCK, "one object fits a block: {big}");
        let want = by_definition(&objects);
        assert_eq!(ConfigDigest::of(&objects, &[], None).get(), want);
        objects.reverse();
        assert_eq!(ConfigDigest::of(&objects, &[], None).get(), want);
        assert_eq!(ConfigDigest::default().get(), "", "no config yet: no digest");
    }

    #[test]
    fn a_digest_takes_over_its_predecessors_hashes_and_stays_right() {
        let kept = services(0..200, 80);
        let first = ConfigDigest::of(&kept, &[], None);
        first.get();
        // 50 objects replaced by new ones of other content; 200 kept as they are.
        let mut next = kept.clone();
        next.truncate(150);
        next.extend(services(150..200, 81));
        let second = ConfigDigest::of(&next, &[], Some(&first));
        drop(first);
        assert_eq!(second.get(), by_definition(&next));
        let hashes = second.hashes().unwrap();
        assert_eq!(hashes.sections[&None].by_address.len(), 200);
        assert!(second.previous.lock().unwrap().is_none(), "the predecessor's hashes are let go");
        // A digest never worked out hands on what it took over.
        let third = ConfigDigest::of(&next, &[], Some(&second));
        let fourth = ConfigDigest::of(&kept, &[], Some(&third));
        assert_eq!(fourth.get(), by_definition(&kept));
    }

    /// Objects listed twice count twice, and other clusters' objects are taken over
    /// cluster by cluster: each digest in a sequence of edits is the one worked out
    /// from nothing.
    #[test]
    fn taken_over_or_not_a_digest_is_the_same_for_repeats_and_other_clusters() {
        let base = services(0..60, 80);
        let remote = |cluster: &str, objects: Vec<Object>| RemoteObjects { cluster: cluster.into(), objects };
        let twice: Vec<Object> = base.iter().chain(&base[..10]).cloned().collect();
        let steps: Vec<(Vec<Object>, Vec<RemoteObjects>)> = vec![
            (base.clone(), vec![]),
            (twice.clone(), vec![]),
            (twice[5..].to_vec(), vec![remote("west", base[..20].to_vec())]),
            (base.clone(), vec![remote("west", base[10..30].to_vec()), remote("east", services(0..5, 81))]),
            (base[..30].to_vec(), vec![remote("east", services(0..5, 81))]),
            (base.clone(), vec![]),
        ];
        let mut previous: Option<ConfigDigest> = None;
        for (i, (objects, remotes)) in steps.iter().enumerate() {
            let next = ConfigDigest::of(objects, remotes, previous.as_ref());
            let fresh = ConfigDigest::of(objects, remotes, None);
            assert_eq!(next.get(), fresh.get(), "step {i}");
            previous = Some(next);
        }
        assert_eq!(ConfigDigest::of(&twice, &[], None).get(), by_definition(&twice));
    }

    #[test]
    fn sorted_hashes_are_patched_one_instance_at_a_time() {
        let h = |b: u8| [b; 32];
        assert_eq!(
            patched(&[h(1), h(2), h(2), h(5)], &[h(2)], &[h(0), h(3), h(9)]),
            [h(0), h(1), h(2), h(3), h(5), h(9)]
        );
        assert_eq!(patched(&[h(1)], &[h(1)], &[]), Vec::<Hash>::new());
    }
}
