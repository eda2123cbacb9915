//! Standalone config source: a directory of YAML files, re-read when it changes.
//!
//! Each file is accepted or rejected whole. A rejected file keeps its last good version
//! in force (or contributes nothing if it never had one), so a typo never takes down
//! traffic that was flowing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::mpsc;

use super::dir_watch::{is_hidden, watch};
use super::file_keys::{FileKeys, Listed};
use super::file_stamp::ReadStamps;
use super::parse::{describe, fail_closed_standins, parse_documents};
use super::references::undefined_subsets;
use super::{Error, Object};

/// File extensions read from the directory.
const EXTENSIONS: &[&str] = &["yaml", "yml", "json"];

/// SHA-256 of a file's text: what a re-read compares, instead of keeping every file's
/// text (9.5 MB at 10,000 Services) only to compare it.
type TextHash = [u8; 32];

fn text_hash(text: &str) -> TextHash {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref().try_into().unwrap_or_default()
}

/// A file's text as read, with its hash (worked out once: compared, then kept).
struct ReadText {
    text: String,
    hash: TextHash,
}

impl ReadText {
    fn of(text: String) -> Self {
        Self { hash: text_hash(&text), text }
    }
}

#[derive(Debug)]
struct FileState {
    /// The hash of the file's text as last read.
    contents: TextHash,
    /// The text itself, kept only while the file waits for a recheck (it is parsed
    /// again then); dropped at the end of every reload otherwise.
    text: Option<String>,
    /// Last good objects of this file.
    good: Arc<Vec<Object>>,
    /// Allow-nothing stand-ins for AuthorizationPolicies of a rejected version that
    /// never had a good one: a broken policy fails closed.
    fail_closed: Vec<Object>,
    /// The error reported for `contents`, if it was rejected.
    error: Option<Error>,
    /// Rejected for a reference to another file's object: tried again whenever
    /// another file changes (the DestinationRule may arrive after the route).
    recheck: bool,
    /// The keys of `good` and `fail_closed`, kept in step by [`FileState::new`] and
    /// [`FileState::set_good`].
    keys: FileKeys,
}

impl FileState {
    fn new(read: ReadText, good: Arc<Vec<Object>>, fail_closed: Vec<Object>, error: Option<Error>) -> Self {
        let keys = FileKeys::of(Listed { good: &good, fail_closed: &fail_closed });
        Self { contents: read.hash, text: Some(read.text), good, fail_closed, error, recheck: false, keys }
    }

    /// Puts `good` in force for this file; returns what was.
    fn set_good(&mut self, good: Arc<Vec<Object>>) -> Arc<Vec<Object>> {
        self.keys = FileKeys::of(Listed { good: &good, fail_closed: &self.fail_closed });
        std::mem::replace(&mut self.good, good)
    }

    fn listed(&self) -> Listed<'_> {
        Listed { good: &self.good, fail_closed: &self.fail_closed }
    }
}

/// The result of one reload.
#[derive(Debug, Default)]
pub struct Reload {
    /// Every object in force, in file order.
    pub objects: Vec<Object>,
    /// Errors found in files that changed since the last reload (each reported once).
    pub new_errors: Vec<Error>,
    /// Whether anything in force changed.
    pub changed: bool,
    /// Why the source cannot be read now (a directory gone, an API server down): what
    /// is in force is the last state read. None while it answers.
    pub unavailable: Option<String>,
}

/// What the agents read of another cluster of the mesh: its Namespaces, Pods, Services
/// and EndpointSlices, never its policies or routes (each cluster's own config governs
/// its own pods, as in Istio's multi-primary mesh).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RemoteObjects {
    /// The cluster's name, as its remote secret gives it.
    pub cluster: String,
    /// Its discovery objects.
    pub objects: Vec<Object>,
}

/// A watched directory of YAML manifests.
#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// Why the directory could not be listed at the last reload.
    unlisted: Option<String>,
    /// The objects in force as of the last reload; None once a file's state changed
    /// ([`Self::files_mut`]).
    in_force: Option<Vec<Object>>,
    /// What each file's metadata was when it was read: a re-read of the directory
    /// reads only the files that may have changed.
    stamps: ReadStamps,
}

impl DirSource {
    /// A source reading `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), files: BTreeMap::new(), unlisted: None, in_force: None, stamps: ReadStamps::default() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Errors currently standing (files whose latest contents are rejected).
    pub fn standing_errors(&self) -> Vec<Error> {
        self.files.values().filter_map(|f| f.error.clone()).collect()
    }

    /// Re-reads the directory.
    pub fn reload(&mut self) -> Reload {
        let mut out = Reload::default();
        let paths = match list(&self.dir) {
            Ok(p) => p,
            Err(e) => {
                // An unreadable directory changes nothing: keep serving what we have,
                // and say so once (not at every reload while it lasts).
                let reason = format!("cannot list config directory: {e}");
                if self.unlisted.as_ref() != Some(&reason) {
                    out.new_errors.push(Error {
                        file: self.dir.clone(),
                        object: None,
                        field: None,
                        reason: reason.clone(),
                    });
                }
                self.unlisted = Some(reason.clone());
                out.unavailable = Some(reason);
                out.objects = self.in_force();
                return out;
            }
        };
        self.unlisted = None;
        // Files accepted alone in this pass, with the version they replace.
        let mut accepted: Vec<(PathBuf, Arc<Vec<Object>>)> = Vec::new();
        let before: Vec<PathBuf> = self.files.keys().cloned().collect();
        for gone in before.iter().filter(|p| !paths.contains(p)) {
            self.files_mut().remove(gone);
            out.changed = true;
        }
        self.stamps.retain(&paths);
        for path in paths {
            let Some(stamp) = self.stamps.check(&path) else { continue };
            let read = match read_text(&path) {
                Ok(text) => ReadText::of(text),
                Err(reason) => {
                    self.stamps.record(&path, None);
                    self.reject_unreadable(&path, reason, &mut out);
                    continue;
                }
            };
            self.stamps.record(&path, stamp);
            if self.files.get(&path).is_some_and(|f| f.contents == read.hash) {
                continue;
            }
            let parsed = parse_documents(&path, &read.text);
            let prev_good = self.files.get(&path).map(|f| f.good.clone());
            let state = match parsed {
                Ok(objects) => {
                    out.changed = true;
                    accepted.push((path.clone(), prev_good.unwrap_or_default()));
                    FileState::new(read, Arc::new(objects), Vec::new(), None)
                }
                Err(mut e) => {
                    let good = prev_good.unwrap_or_default();
                    let fail_closed = fail_closed_standins(&read.text, &good, &mut e);
                    out.new_errors.push(e.clone());
                    out.changed |= !fail_closed.is_empty();
                    FileState::new(read, good, fail_closed, Some(e))
                }
            };
            self.files_mut().insert(path, state);
        }
        if out.changed {
            let retry: Vec<PathBuf> = self.files.iter().filter(|(_, f)| f.recheck).map(|(p, _)| p.clone()).collect();
            for path in retry {
                let f = self.files_mut().get_mut(&path).expect("listed above");
                let Some(text) = f.text.as_deref() else { continue };
                if let Ok(objects) = parse_documents(&path, text) {
                    accepted.push((path.clone(), f.set_good(Arc::new(objects))));
                    f.recheck = false;
                }
            }
        }
        // A file accepted now that routes to an undefined subset is rejected whole; its
        // previous version stays in force, as for any other error.
        let dangling = if accepted.is_empty() {
            Vec::new()
        } else {
            undefined_subsets(self.files.iter().flat_map(|(p, f)| f.good.iter().map(move |o| (p.as_path(), o))))
        };
        for (path, previous) in accepted {
            let Some(f) = self.files_mut().get_mut(&path) else { continue };
            match dangling.iter().find(|e| e.file == path) {
                Some(e) => {
                    if f.error.as_ref() != Some(e) {
                        out.new_errors.push(e.clone());
                    }
                    f.set_good(previous);
                    f.error = Some(e.clone());
                    f.recheck = true;
                }
                None => f.error = None,
            }
        }
        // Duplicates can only appear or go when a file changed; checking only then keeps
        // the periodic re-read from logging the same conflict every few seconds.
        if out.changed {
            out.new_errors.extend(self.duplicates_across_files());
        }
        // (Not `files_mut`: the text is no part of what is in force.)
        for f in self.files.values_mut().filter(|f| !f.recheck) {
            f.text = None;
        }
        out.objects = self.in_force();
        out
    }

    /// The files' states, to change: the objects in force are built again after any
    /// change goes through here (the one way to change them).
    fn files_mut(&mut self) -> &mut BTreeMap<PathBuf, FileState> {
        self.in_force = None;
        &mut self.files
    }

    /// The objects in force: built again only after a file's state changed
    /// ([`Self::files_mut`]), so the periodic re-read of an unchanged directory costs
    /// no walk over every object.
    fn in_force(&mut self) -> Vec<Object> {
        if self.in_force.is_none() {
            self.in_force = Some(self.objects());
        }
        self.in_force.clone().unwrap_or_default()
    }

    /// Records `path` as rejected for `reason` (unreadable, not UTF-8): its last good
    /// version stays in force, and the security policies it meant to define fail
    /// closed, as for any other rejected file.
    fn reject_unreadable(&mut self, path: &Path, reason: String, out: &mut Reload) {
        // The bytes that did decode are enough to tell which policies the file meant.
        let lossy =
            ReadText::of(std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default());
        if self.files.get(path).is_some_and(|f| f.error.is_some() && f.contents == lossy.hash) {
            return;
        }
        let mut e = Error { file: path.to_owned(), object: None, field: None, reason };
        let good = self.files.get(path).map(|f| f.good.clone()).unwrap_or_default();
        let fail_closed = fail_closed_standins(&lossy.text, &good, &mut e);
        out.new_errors.push(e.clone());
        out.changed |= !fail_closed.is_empty();
        self.files_mut().insert(path.to_owned(), FileState::new(lossy, good, fail_closed, Some(e)));
    }

    /// Objects in force; on a name defined in two files, the first file (by name) wins
    /// and the later one is reported.
    fn objects(&self) -> Vec<Object> {
        let files: Vec<&FileState> = self.files.values().collect();
        let mut objects = Vec::new();
        for (i, f) in files.iter().enumerate() {
            let mut hidden: Vec<usize> = f.keys.repeated(false).collect();
            for earlier in &files[..i] {
                hidden.extend(earlier.keys.shared_with(earlier.listed(), &f.keys, f.listed(), false));
            }
            hidden.sort_unstable();
            objects.extend(f.listed().iter().filter(|(p, _)| hidden.binary_search(p).is_err()).map(|(_, o)| o.clone()));
        }
        objects
    }

    /// An error for each good object whose name an earlier good object (of an earlier
    /// file, or of the same file) holds, naming the first file that holds it.
    fn duplicates_across_files(&self) -> Vec<Error> {
        let files: Vec<(&PathBuf, &FileState)> = self.files.iter().collect();
        let mut errors = Vec::new();
        for (i, (path, f)) in files.iter().enumerate() {
            let mut first: BTreeMap<usize, &PathBuf> = BTreeMap::new();
            for (earlier_path, earlier) in &files[..i] {
                for place in earlier.keys.shared_with(earlier.listed(), &f.keys, f.listed(), true) {
                    first.entry(place).or_insert(earlier_path);
                }
            }
            for place in f.keys.repeated(true) {
                first.entry(place).or_insert(path);
            }
            for (place, first) in first {
                let object = f.good[place].key();
                errors.push(Error {
                    file: (*path).clone(),
                    object: Some(describe(&object)),
                    field: Some("metadata.name".into()),
                    reason: format!("already defined in {}; this definition is ignored", first.display()),
                });
            }
        }
        errors
    }
}

/// A file's text; a file that cannot be read or is not UTF-8 is an error to report,
/// never a file to skip: skipping would drop what it defined without a word.
fn read_text(path: &Path) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "not UTF-8 text (invalid byte at offset {}); Kubernetes manifests are UTF-8",
            e.utf8_error().valid_up_to()
        )
    })
}

fn list(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let hidden = is_hidden(&path);
        let ext_ok = path.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTENSIONS.contains(&e));
        if path.is_file() && ext_ok && !hidden {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

impl DirSource {
    /// Watches the directory: see [`watch`].
    pub fn watch(&self) -> notify::Result<(notify::RecommendedWatcher, mpsc::Receiver<()>)> {
        watch(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::super::dir_watch::DEBOUNCE;
    use super::*;

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";

    #[tokio::test]
    async fn reading_the_files_is_no_change_writing_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ns.yaml");
        std::fs::write(&file, NS).unwrap();
        let (_watcher, mut changes) = watch(dir.path()).unwrap();
        // What a reload does: open and read every file.
        let _ = DirSource::new(dir.path()).reload();
        let early = tokio::time::timeout(DEBOUNCE * 4, changes.recv()).await;
        assert!(early.is_err(), "a reload's own reads must not trigger the next one");
        std::fs::write(&file, "apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n").unwrap();
        let got = tokio::time::timeout(DEBOUNCE * 20, changes.recv()).await;
        assert!(matches!(got, Ok(Some(()))), "a write is a change");
    }

    /// The periodic re-read of an unchanged directory hands on the objects it holds
    /// (shared, not copied); a change to any file, or a file gone, builds them anew.
    #[test]
    fn an_unchanged_directory_hands_on_the_same_objects() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), NS).unwrap();
        std::fs::write(dir.path().join("b.yaml"), "apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n").unwrap();
        let mut src = DirSource::new(dir.path());
        let first = src.reload();
        let again = src.reload();
        assert!(!again.changed);
        let same = |a: &Object, b: &Object| matches!((a, b), (Object::Namespace(x), Object::Namespace(y)) if Arc::ptr_eq(x, y));
        assert!(
            first.objects.iter().zip(&again.objects).all(|(a, b)| same(a, b)),
            "shared, not parsed or copied again"
        );
        std::fs::write(dir.path().join("a.yaml"), "apiVersion: v1\nkind: Namespace\nmetadata: {name: c}\n").unwrap();
        let changed = src.reload();
        let names: Vec<_> = changed.objects.iter().map(|o| o.key().2).collect();
        assert_eq!(names, ["c", "b"]);
        assert!(same(&first.objects[1], &changed.objects[1]), "the unchanged file's object is still shared");
        std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
        let names: Vec<_> = src.reload().objects.iter().map(|o| o.key().2).collect();
        assert_eq!(names, ["c"]);
    }

    #[test]
    fn a_directory_gone_keeps_the_last_config_says_so_once_and_catches_up() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("config");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("ns.yaml"), NS).unwrap();
        let mut src = DirSource::new(&dir);
        assert!(src.reload().unavailable.is_none());

        std::fs::remove_dir_all(&dir).unwrap();
        let r = src.reload();
        assert_eq!(r.objects.len(), 1, "the last config keeps serving");
        assert!(!r.changed);
        assert!(r.unavailable.as_deref().is_some_and(|u| u.starts_with("cannot list config directory")), "{r:?}");
        assert_eq!(r.new_errors.len(), 1);
        let r = src.reload();
        assert!(r.new_errors.is_empty(), "an outage is reported once, not at every reload");
        assert!(r.unavailable.is_some());

        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("ns.yaml"), "apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n").unwrap();
        let r = src.reload();
        assert!(r.unavailable.is_none() && r.changed, "caught up when the directory is back");
        assert_eq!(r.objects.len(), 1);
    }

    #[test]
    fn bad_edit_keeps_last_good_version_and_reports_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ns.yaml");
        std::fs::write(&file, NS).unwrap();
        let mut src = DirSource::new(dir.path());
        let r = src.reload();
        assert_eq!(r.objects.len(), 1);
        assert!(r.new_errors.is_empty());

        std::fs::write(&file, "apiVersion: v1\nkind: Namespace\nmetadata: {name: [\n").unwrap();
        let r = src.reload();
        assert_eq!(r.objects.len(), 1, "last good version must stay in force");
        assert_eq!(r.new_errors.len(), 1);
        assert!(!r.changed);

        let r = src.reload();
        assert!(r.new_errors.is_empty(), "an unchanged bad file is reported once");
        assert_eq!(src.standing_errors().len(), 1);

        std::fs::remove_file(&file).unwrap();
        let r = src.reload();
        assert!(r.objects.is_empty() && r.changed);
    }

    #[test]
    fn same_object_in_two_files_first_wins() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), NS).unwrap();
        std::fs::write(dir.path().join("b.yaml"), NS).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let r = DirSource::new(dir.path()).reload();
        assert_eq!(r.objects.len(), 1);
        assert_eq!(r.new_errors.len(), 1);
        assert!(r.new_errors[0].to_string().contains("b.yaml: Namespace a: field metadata.name: already defined in"));
    }

    /// Files of very different sizes, overlapping both ways: the smaller side of each
    /// pair is looked up in the larger, and the result is the same as one walk in file
    /// order would give.
    #[test]
    fn names_shared_by_a_large_and_a_small_file_go_to_the_earlier_file() {
        let ns = |names: std::ops::Range<usize>| -> String {
            names.map(|i| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: n{i}}}\n---\n")).collect()
        };
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), ns(0..3)).unwrap();
        std::fs::write(dir.path().join("b.yaml"), ns(0..500)).unwrap();
        std::fs::write(dir.path().join("c.yaml"), ns(498..502)).unwrap();
        let mut src = DirSource::new(dir.path());
        let r = src.reload();
        let names: Vec<String> = r.objects.iter().map(|o| o.key().2).collect();
        let want: Vec<String> = (0..502).map(|i| format!("n{i}")).collect();
        assert_eq!(names, want, "each name once, from the first file that has it, in file order");
        let errors: Vec<String> = r.new_errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 5, "{errors:#?}");
        for (e, (file, name, first)) in errors.iter().zip([
            ("b.yaml", "n0", "a.yaml"),
            ("b.yaml", "n1", "a.yaml"),
            ("b.yaml", "n2", "a.yaml"),
            ("c.yaml", "n498", "b.yaml"),
            ("c.yaml", "n499", "b.yaml"),
        ]) {
            assert!(e.contains(&format!("{file}: Namespace {name}: field metadata.name")), "{e}");
            assert!(e.contains(&format!("{first}; this definition is ignored")), "{e}");
        }
        // The small file changes: its names are looked up again, the large file's are not re-read.
        std::fs::write(dir.path().join("a.yaml"), ns(600..601)).unwrap();
        let r = src.reload();
        assert_eq!(r.objects.len(), 503);
        assert_eq!(r.objects[0].key().2, "n600");
        assert_eq!(r.new_errors.len(), 2, "{:?}", r.new_errors);
    }

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: myapp, namespace: production}\nspec: {selector: {app: myapp}, ports: [{port: 80}]}\n";
    const VS: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: myapp, namespace: production}\nspec:\n  hosts: [myapp]\n  http:\n  - route: [{destination: {host: myapp, subset: v2}}]\n";
    const DR: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: myapp, namespace: production}\nspec:\n  host: myapp\n  subsets: [{name: v2, labels: {version: v2}}]\n";

    #[test]
    fn route_to_an_undefined_subset_is_rejected_until_the_rule_arrives() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("svc.yaml"), SVC).unwrap();
        std::fs::write(dir.path().join("vs.yaml"), VS).unwrap();
        let mut src = DirSource::new(dir.path());
        let r = src.reload();
        assert_eq!(r.new_errors.len(), 1, "{:?}", r.new_errors);
        let e = r.new_errors[0].to_string();
        assert!(
            e.contains("vs.yaml: VirtualService production/myapp: field spec.http[0].route[0].destination.subset: subset \"v2\" is not defined"),
            "{e}"
        );
        assert_eq!(r.objects.len(), 1, "only the Service is in force");
        let text_kept = |src: &DirSource, name: &str| src.files[&dir.path().join(name)].text.is_some();
        assert!(text_kept(&src, "vs.yaml"), "the route waiting for a recheck keeps its text");
        assert!(!text_kept(&src, "svc.yaml"), "an accepted file keeps only its hash");
        assert!(src.reload().new_errors.is_empty(), "reported once");

        std::fs::write(dir.path().join("dr.yaml"), DR).unwrap();
        let r = src.reload();
        assert!(r.new_errors.is_empty(), "{:?}", r.new_errors);
        assert_eq!(r.objects.len(), 3, "the route is accepted once its subset exists");
        assert!(src.standing_errors().is_empty());
        assert!(!text_kept(&src, "vs.yaml"), "accepted: its text goes");
    }

    const GOOD_AP: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: production}\nspec:\n  selector: {matchLabels: {app: myapp}}\n  rules: [{from: [{source: {ipBlocks: [10.0.0.0/8]}}]}]\n";

    fn policies(objects: &[Object]) -> Vec<(String, bool, bool)> {
        objects
            .iter()
            .filter_map(|o| match o {
                Object::AuthorizationPolicy(a) => {
                    Some((a.metadata.key(), a.is_fail_closed_placeholder(), a.spec.selector.is_some()))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_policy_rejected_before_it_ever_applied_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ap.yaml");
        std::fs::write(&file, GOOD_AP.replace("10.0.0.0/8", "10.0.0.0/99")).unwrap();
        let mut src = DirSource::new(dir.path());
        let r = src.reload();
        assert_eq!(
            policies(&r.objects),
            vec![("production/p".to_string(), true, true)],
            "allow-nothing with its selector"
        );
        let e = r.new_errors[0].to_string();
        assert!(e.contains("ipBlocks[0]") && e.contains("allow nothing until it is fixed"), "{e}");

        // Fixed: the real policy replaces the stand-in.
        std::fs::write(&file, GOOD_AP).unwrap();
        let r = src.reload();
        assert_eq!(policies(&r.objects), vec![("production/p".to_string(), false, true)]);

        // Broken again: the last good version stays, no stand-in.
        std::fs::write(&file, GOOD_AP.replace("10.0.0.0/8", "nonsense")).unwrap();
        let r = src.reload();
        assert_eq!(policies(&r.objects), vec![("production/p".to_string(), false, true)]);
    }

    const GOOD_PA: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: production}\nspec:\n  selector: {matchLabels: {app: myapp}}\n  mtls: {mode: STRICT}\n";

    fn peer_auths(objects: &[Object]) -> Vec<(String, bool, Option<crate::config::security::MtlsMode>)> {
        objects
            .iter()
            .filter_map(|o| match o {
                Object::PeerAuthentication(p) => {
                    Some((p.metadata.key(), p.is_fail_closed_placeholder(), p.spec.mtls.as_ref().map(|m| m.mode)))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_peer_authentication_rejected_before_it_ever_applied_stands_in_as_strict() {
        use crate::config::security::MtlsMode;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pa.yaml");
        // A typo in the mode: Istio's webhook refuses it, and so do we.
        std::fs::write(&file, GOOD_PA.replace("STRICT", "STRCT")).unwrap();
        let mut src = DirSource::new(dir.path());
        let r = src.reload();
        assert_eq!(peer_auths(&r.objects), vec![("production/strict".to_string(), true, Some(MtlsMode::Strict))]);
        let e = r.new_errors[0].to_string();
        assert!(e.contains("refuse plaintext (STRICT) until it is fixed"), "{e}");

        std::fs::write(&file, GOOD_PA).unwrap();
        let r = src.reload();
        assert_eq!(peer_auths(&r.objects), vec![("production/strict".to_string(), false, Some(MtlsMode::Strict))]);

        // Broken after it applied: the last good version stays in force.
        std::fs::write(&file, GOOD_PA.replace("STRICT", "PERMISIVE")).unwrap();
        let r = src.reload();
        assert_eq!(peer_auths(&r.objects), vec![("production/strict".to_string(), false, Some(MtlsMode::Strict))]);
    }

    #[test]
    fn a_file_that_is_not_utf8_is_rejected_and_its_policies_fail_closed() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = GOOD_PA.as_bytes().to_vec();
        bytes.extend_from_slice(b"# caf\xe9\n");
        std::fs::write(dir.path().join("pa.yaml"), &bytes).unwrap();
        let mut src = DirSource::new(dir.path());
        let r = src.reload();
        assert_eq!(r.new_errors.len(), 1, "reported, not skipped");
        let e = r.new_errors[0].to_string();
        assert!(e.contains("pa.yaml") && e.contains("not UTF-8"), "{e}");
        assert_eq!(peer_auths(&r.objects).len(), 1, "the policy it meant stands in, fail closed");
        assert!(peer_auths(&r.objects)[0].1);
        assert!(src.reload().new_errors.is_empty(), "reported once");
        assert_eq!(src.standing_errors().len(), 1);
    }

    #[test]
    fn an_unparseable_policy_file_closes_its_whole_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let broken = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: production\nspec: {selector: [\n";
        std::fs::write(dir.path().join("ap.yaml"), broken).unwrap();
        let r = DirSource::new(dir.path()).reload();
        assert_eq!(policies(&r.objects), vec![("production/p".to_string(), true, false)], "no selector: wider");
    }
}
