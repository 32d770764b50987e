//! The code a guest may import: a read-only view of its allowed roots that
//! holds their Python sources and nothing else.
//!
//! WASI preopens grant whole directories, so a data file beside an allowed
//! module would be readable. Instead, each guest gets a private directory
//! tree that mirrors its roots with only `*.py` files in it, copied (a hard
//! link would show the guest the file's link count and change time, which
//! every other guest given the same roots moves); that tree is what is preopened,
//! read-only, at the root's own path. Symbolic links are followed only when
//! they stay inside their root, so a link cannot smuggle an outside file in.
//! The view is a snapshot taken at start: files added later appear in the
//! next guest. Guests given the same roots share one view while their files
//! stay as they were (`shared_code_view`: each start surveys the roots,
//! a stat per entry, instead of copying them: a tree of 10,000 modules took
//! 0.7-2.5 s to copy for every guest, a fresh guest per call included); it is
//! removed once no guest uses it and a newer one replaced it, or the master
//! ends. Read-only to every guest, a shared copy shows none of them what
//! the others do: no link count or change time moves, and the access times
//! of its files and directories are set ahead (`copy_in`, `access_ahead`),
//! so that reading them never updates them. What a guest can see is when
//! the copy was made (its change times), which may be before the guest.
//!
//! Installed distributions (`packages=`) get a view of their own: each
//! site-packages root mirrored with exactly the files their RECORD lists
//! (the master names them), preopened read-only at the root's own path. It
//! is shared by the guests given the same list and kept while the master
//! runs and their modules stay as they were (`shared_package_view`), since
//! building it costs a copy per file.

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Component;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{HostError, Result};

/// At most this many files and directories per guest view.
pub const MAX_ENTRIES: usize = 50_000;
/// At most this deep below a root.
pub const MAX_DEPTH: usize = 64;

/// A built view: the directories to preopen, each with its guest path.
#[derive(Debug)]
pub struct CodeView {
    dir: Option<PathBuf>,
    /// (host directory to preopen, path in the guest)
    pub mounts: Vec<(PathBuf, String)>,
}

impl CodeView {
    /// A view of nothing (no allowed roots).
    pub fn empty() -> Self {
        CodeView {
            dir: None,
            mounts: Vec::new(),
        }
    }

    /// An empty view in a fresh directory under `base`.
    fn create(base: &Path) -> Result<CodeView> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = base.join(format!(
            "{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|e| {
            HostError::Spawn(format!(
                "cannot create the guest's code view in {}: {e}; set CPY2PY_CACHE_DIR to a writable directory",
                dir.display()
            ))
        })?;
        Ok(CodeView {
            dir: Some(dir),
            mounts: Vec::new(),
        })
    }

    /// Builds the view of `roots` in a fresh directory under `base`.
    pub fn build(roots: &[PathBuf], base: &Path) -> Result<CodeView> {
        if roots.is_empty() {
            return Ok(Self::empty());
        }
        let mut view = Self::create(base)?;
        let mut entries = 0usize;
        for (index, root) in roots.iter().enumerate() {
            let (real, guest_path) = real_root(root, "sandbox path")?;
            let target = view.next_target(index)?;
            mirror(&real, &target, &mut entries)?;
            view.mounts.push((target, guest_path));
        }
        view.access_ahead()?;
        Ok(view)
    }

    /// Builds the view of installed distributions: for each (root, files),
    /// the root with exactly those files (paths relative to it; a file that
    /// is missing, not a regular file, or a link out of the root is left
    /// out; a path that leaves the root is refused).
    pub fn build_listed(packages: &[(PathBuf, Vec<PathBuf>)], base: &Path) -> Result<CodeView> {
        if packages.is_empty() {
            return Ok(Self::empty());
        }
        let mut view = Self::create(base)?;
        let mut entries = 0usize;
        for (index, (root, files)) in packages.iter().enumerate() {
            let (real, guest_path) = real_root(root, "the package directory")?;
            let target = view.next_target(index)?;
            for file in files {
                entries += 1;
                if entries > MAX_ENTRIES {
                    return Err(HostError::Spawn(format!(
                        "the packages given to the guest hold more than {MAX_ENTRIES} files: give fewer"
                    )));
                }
                let inside = !file.as_os_str().is_empty()
                    && file.components().all(|c| matches!(c, Component::Normal(_)));
                if !inside {
                    return Err(HostError::Spawn(format!(
                        "package file {} is not a plain path inside {}",
                        file.display(),
                        real.display()
                    )));
                }
                link_inside(&real, &real.join(file), &target.join(file))?;
            }
            view.mounts.push((target, guest_path));
        }
        view.access_ahead()?;
        Ok(view)
    }

    /// Sets the access time of each directory of the view a year ahead,
    /// as `copy_in` does for files: a guest listing one (to import a
    /// package of it) then never moves what another guest sees of it.
    fn access_ahead(&self) -> Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let mut pending = vec![dir.clone()];
        while let Some(dir) = pending.pop() {
            for entry in fs::read_dir(&dir)? {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    pending.push(entry.path());
                }
            }
            let times = fs::FileTimes::new().set_accessed(a_year_ahead(SystemTime::now()));
            fs::File::open(&dir)?.set_times(times)?;
        }
        Ok(())
    }

    fn next_target(&self, index: usize) -> Result<PathBuf> {
        let target = self.dir.as_ref().expect("a created view").join(index.to_string());
        fs::create_dir(&target)?;
        Ok(target)
    }
}

/// The real path of an allowed root and its path in the guest (the same).
fn real_root(root: &Path, what: &str) -> Result<(PathBuf, String)> {
    let real = fs::canonicalize(root)
        .map_err(|e| HostError::Spawn(format!("{what} {} cannot be used: {e}", root.display())))?;
    if !real.is_dir() {
        return Err(HostError::Spawn(format!(
            "{what} {} is not a directory: pass directories to import code from",
            root.display()
        )));
    }
    let guest_path = real
        .to_str()
        .ok_or_else(|| {
            HostError::Spawn(format!(
                "{what} {} is not valid UTF-8, which WASI paths must be",
                real.display()
            ))
        })?
        .to_string();
    Ok((real, guest_path))
}

/// Puts `source` (a path inside `root`) at `dest`, with the directories
/// above it, when the file it leads to (through links anywhere along the
/// path, a linked directory too) lies inside the root.
fn link_inside(root: &Path, source: &Path, dest: &Path) -> Result<()> {
    let Ok(resolved) = fs::canonicalize(source) else {
        return Ok(()); // listed, but gone since (or a link to nothing)
    };
    if !resolved.starts_with(root) {
        // (said: a distribution laid out as links into another tree, as
        // Nix's, is then missing files the guest will look for)
        tracing::warn!(
            file = %source.display(),
            leads_to = %resolved.display(),
            "a package file leads out of its installation directory through a link: the guest does not get it"
        );
        return Ok(());
    }
    if !resolved.is_file() {
        return Ok(());
    }
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)?;
    }
    copy_in(&resolved, dest)
}

/// Copies a file into a view (the kernel copies within the file system:
/// `copy_file_range`), with its modification time, which the guest's
/// bytecode checks; one the master may not read stays out. Its access
/// time is set a year ahead: with `relatime` (Linux's default) a read
/// updates an access time only when it is not after the modification time
/// or a day old, so a guest reading a shared file never moves what another
/// guest sees of it.
fn copy_in(source: &Path, dest: &Path) -> Result<()> {
    match fs::copy(source, dest) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    let modified = fs::metadata(source)?.modified()?;
    let times = fs::FileTimes::new()
        .set_modified(modified)
        .set_accessed(a_year_ahead(SystemTime::now().max(modified)));
    fs::File::options().write(true).open(dest)?.set_times(times)?;
    Ok(())
}

fn a_year_ahead(time: SystemTime) -> SystemTime {
    time + Duration::from_secs(365 * 24 * 3600)
}

/// Views of distributions, and of roots, kept for the master's lifetime
/// (each kind), newest last.
const SHARED_VIEWS: usize = 16;

/// The view of `roots` under `base`, shared by every guest given the same
/// roots while no Python source or directory below them was added, removed
/// or changed (its size, times or inode) since it was built: each call
/// surveys the roots (as `CodeView::build` walks them, a stat per entry)
/// and builds a new view only when that survey differs.
pub fn shared_code_view(roots: &[PathBuf], base: &Path) -> Result<Arc<CodeView>> {
    static VIEWS: Mutex<Vec<(u64, u64, Arc<CodeView>)>> = Mutex::new(Vec::new());
    if roots.is_empty() {
        return Ok(Arc::new(CodeView::empty()));
    }
    let mut hasher = DefaultHasher::new();
    (base, roots).hash(&mut hasher);
    let key = hasher.finish();
    let survey = survey(roots)?;
    let mut views = VIEWS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(at) = views
        .iter()
        .position(|(k, s, v)| *k == key && *s == survey && v.intact())
    {
        let entry = views.remove(at);
        let view = Arc::clone(&entry.2);
        views.push(entry);
        return Ok(view);
    }
    views.retain(|(k, _, _)| *k != key); // (guests of an older view keep it until they end)
    let view = Arc::new(CodeView::build(roots, base)?);
    views.push((key, survey, Arc::clone(&view)));
    if views.len() > SHARED_VIEWS {
        views.remove(0);
    }
    Ok(view)
}

/// A digest of what a view of `roots` would hold: every directory and
/// Python source `walk` finds, with each source's size, modification and
/// change times and inode.
fn survey(roots: &[PathBuf]) -> Result<u64> {
    let mut hasher = DefaultHasher::new();
    let mut entries = 0usize;
    for root in roots {
        let (real, _) = real_root(root, "sandbox path")?;
        real.hash(&mut hasher);
        walk(&real, &real, 0, &mut entries, &mut |found, source| {
            found.hash(&mut hasher);
            if let Some(source) = source {
                // the change time too: `cp -p`, `tar x` and `rsync -t` put
                // back an older modification time, and a text of the same size
                let meta = fs::metadata(source)?;
                let since = meta.modified()?.duration_since(UNIX_EPOCH).unwrap_or_default();
                (meta.len(), since, meta.ino(), meta.ctime(), meta.ctime_nsec()).hash(&mut hasher);
            }
            Ok(())
        })?;
    }
    Ok(hasher.finish())
}

/// The view of `packages` under `base`, built once and shared by every
/// guest given the same list while the master runs (read-only to all of
/// them); built again when the master's `stamp` of their files changed (a
/// reinstall, a module edited in place), the stamp that keys their cached
/// bytecode and snapshot too (cpy2py/packages.py, `sources_stamp`): a guest
/// sees the files those caches were made of.
pub fn shared_package_view(
    packages: &[(PathBuf, Vec<PathBuf>)],
    stamp: &str,
    base: &Path,
) -> Result<Arc<CodeView>> {
    static VIEWS: Mutex<Vec<(u64, Arc<CodeView>)>> = Mutex::new(Vec::new());
    let mut hasher = DefaultHasher::new();
    (base, stamp, packages).hash(&mut hasher);
    let key = hasher.finish();
    let mut views = VIEWS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(at) = views.iter().position(|(k, v)| *k == key && v.intact()) {
        let entry = views.remove(at);
        let view = Arc::clone(&entry.1);
        views.push(entry);
        return Ok(view);
    }
    views.retain(|(k, _)| *k != key);
    let view = Arc::new(CodeView::build_listed(packages, base)?);
    views.push((key, Arc::clone(&view)));
    if views.len() > SHARED_VIEWS {
        views.remove(0); // guests still using it keep it until they end
    }
    Ok(view)
}

impl CodeView {
    /// Whether its directory is still there (a cleaner may have removed it).
    fn intact(&self) -> bool {
        self.dir.as_ref().is_none_or(|d| d.is_dir())
    }
}

impl Drop for CodeView {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

fn is_python_source(path: &Path) -> bool {
    path.extension().is_some_and(|ext| ext == "py")
}

/// Copies the Python sources below `root` to `target`.
fn mirror(root: &Path, target: &Path, entries: &mut usize) -> Result<()> {
    walk(root, root, 0, entries, &mut |found, source| {
        let dest = target.join(found);
        match source {
            None => fs::create_dir(&dest)?,
            Some(source) => copy_in(source, &dest)?,
        }
        Ok(())
    })
}

/// Calls `visit` with the path (relative to `root`) of every directory and
/// Python source below `dir` that a view holds, parents first, and for a
/// source the file it leads to (through a link that stays inside the root).
fn walk(
    root: &Path,
    dir: &Path,
    depth: usize,
    entries: &mut usize,
    visit: &mut dyn FnMut(&Path, Option<&Path>) -> Result<()>,
) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(HostError::Spawn(format!(
            "sandbox path {} nests deeper than {MAX_DEPTH} directories: pass a narrower directory",
            root.display()
        )));
    }
    let listing = match fs::read_dir(dir) {
        Ok(listing) => listing,
        // an unreadable subdirectory is simply not part of the view
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for entry in listing {
        let entry = entry?;
        let name = entry.file_name();
        if name == "__pycache__" {
            continue;
        }
        let path = entry.path();
        let mut kind = entry.file_type()?;
        let mut source = path.clone();
        if kind.is_symlink() {
            // followed only if it resolves inside the root
            let Ok(resolved) = fs::canonicalize(&path) else {
                continue;
            };
            if !resolved.starts_with(root) {
                continue;
            }
            kind = fs::metadata(&resolved)?.file_type();
            if kind.is_dir() {
                continue; // a linked directory could loop; its real place is mirrored anyway
            }
            source = resolved;
        }
        *entries += 1;
        if *entries > MAX_ENTRIES {
            return Err(HostError::Spawn(format!(
                "sandbox path {} holds more than {MAX_ENTRIES} files and directories: \
                 pass the directory of the guest's code only",
                root.display()
            )));
        }
        let found = path.strip_prefix(root).unwrap_or(&path);
        if kind.is_dir() {
            visit(found, None)?;
            walk(root, &path, depth + 1, entries, visit)?;
        } else if kind.is_file()
            // a link's target must be a source too: `conf.py -> secret.txt`
            // would show the data file under a module's name
            && is_python_source(&path)
            && is_python_source(&source)
        {
            visit(found, Some(&source))?;
        }
    }
    Ok(())
}

/// Removes views left behind by masters that died without cleaning up.
pub fn remove_stale_views(base: &Path) {
    let Ok(listing) = fs::read_dir(base) else { return };
    for entry in listing.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cpy2py-view-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn only_python_sources_are_in_the_view() {
        let base = scratch("only-py");
        let root = base.join("plugins");
        fs::create_dir_all(root.join("pkg/__pycache__")).unwrap();
        fs::write(root.join("plugin.py"), "X = 1\n").unwrap();
        fs::write(root.join("secret.txt"), "token").unwrap();
        fs::write(root.join("pkg/__init__.py"), "").unwrap();
        fs::write(root.join("pkg/data.json"), "{}").unwrap();
        fs::write(root.join("pkg/__pycache__/x.pyc"), "").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", root.join("outside.py")).unwrap();
        std::os::unix::fs::symlink(root.join("plugin.py"), root.join("alias.py")).unwrap();
        std::os::unix::fs::symlink(root.join("secret.txt"), root.join("conf.py")).unwrap();
        std::os::unix::fs::symlink("pkg/data.json", root.join("data.py")).unwrap();

        let view = CodeView::build(std::slice::from_ref(&root), &base.join("views")).unwrap();
        assert_eq!(view.mounts.len(), 1);
        let (dir, guest) = &view.mounts[0];
        assert_eq!(guest, fs::canonicalize(&root).unwrap().to_str().unwrap());
        assert_eq!(fs::read_to_string(dir.join("plugin.py")).unwrap(), "X = 1\n");
        assert_eq!(fs::read_to_string(dir.join("alias.py")).unwrap(), "X = 1\n");
        assert!(dir.join("pkg/__init__.py").exists());
        assert!(!dir.join("secret.txt").exists());
        assert!(!dir.join("pkg/data.json").exists());
        assert!(!dir.join("pkg/__pycache__").exists());
        assert!(
            !dir.join("outside.py").exists(),
            "a symlink out of the root must not be followed"
        );
        for disguised in ["conf.py", "data.py"] {
            assert!(
                !dir.join(disguised).exists(),
                "{disguised}: a data file must not be seen under a module's name"
            );
        }

        let view_dir = dir.parent().unwrap().to_path_buf();
        drop(view);
        assert!(!view_dir.exists(), "the view is removed with the guest");
        fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn a_package_view_holds_exactly_the_listed_files() {
        let base = scratch("listed");
        let site = base.join("site-packages");
        fs::create_dir_all(site.join("pkg")).unwrap();
        fs::create_dir_all(site.join("pkg-1.0.dist-info")).unwrap();
        fs::create_dir_all(site.join("other")).unwrap();
        fs::write(site.join("pkg/__init__.py"), "X = 1\n").unwrap();
        fs::write(site.join("pkg/data.json"), "{}").unwrap();
        fs::write(site.join("pkg-1.0.dist-info/RECORD"), "").unwrap();
        fs::write(site.join("other/__init__.py"), "SECRET = 1\n").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", site.join("pkg/outside.py")).unwrap();
        // a linked directory along the path leads out of the root too
        fs::create_dir_all(base.join("elsewhere")).unwrap();
        fs::write(base.join("elsewhere/secret.txt"), "secret").unwrap();
        std::os::unix::fs::symlink(base.join("elsewhere"), site.join("pkg/linked")).unwrap();
        std::os::unix::fs::symlink(site.join("pkg"), site.join("pkg/self")).unwrap();
        let listed: Vec<PathBuf> = [
            "pkg/__init__.py",
            "pkg/data.json",
            "pkg-1.0.dist-info/RECORD",
            "pkg/outside.py",
            "pkg/linked/secret.txt",
            "pkg/self/data.json",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();

        let view = CodeView::build_listed(&[(site.clone(), listed)], &base.join("views")).unwrap();
        let (dir, guest) = &view.mounts[0];
        assert_eq!(guest, fs::canonicalize(&site).unwrap().to_str().unwrap());
        assert!(dir.join("pkg/__init__.py").is_file() && dir.join("pkg/data.json").is_file());
        assert!(dir.join("pkg-1.0.dist-info/RECORD").is_file());
        assert!(
            !dir.join("other").exists(),
            "an unlisted distribution must not be there"
        );
        assert!(
            !dir.join("pkg/outside.py").exists(),
            "a link out of the root must not be followed"
        );
        assert!(
            !dir.join("pkg/linked").exists(),
            "a linked directory out of the root must not be followed"
        );
        assert!(
            dir.join("pkg/self/data.json").is_file(),
            "a linked directory inside the root is followed"
        );

        for escape in ["../secret.txt", "/etc/hostname", "pkg/../../x"] {
            let err = CodeView::build_listed(
                &[(site.clone(), vec![PathBuf::from(escape)])],
                &base.join("views"),
            )
            .unwrap_err();
            assert!(err.to_string().contains("not a plain path"), "{err}");
        }
        drop(view);
        fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn guests_given_the_same_roots_share_a_view_until_a_source_changes() {
        let base = scratch("shared");
        let root = base.join("plugins");
        fs::create_dir_all(&root).unwrap();
        fs::write(root.join("plugin.py"), "X = 1\n").unwrap();
        let views = base.join("views");
        let roots = std::slice::from_ref(&root);

        let first = shared_code_view(roots, &views).unwrap();
        let again = shared_code_view(roots, &views).unwrap();
        assert!(
            Arc::ptr_eq(&first, &again),
            "an unchanged tree is not copied again"
        );
        // reading a shared file never moves its access time (set ahead of now)
        let copied = first.mounts[0].0.join("plugin.py");
        for seen in [copied.clone(), first.mounts[0].0.clone()] {
            let accessed = fs::metadata(&seen).unwrap().accessed().unwrap();
            assert!(
                accessed > SystemTime::now() + Duration::from_secs(300 * 24 * 3600),
                "{seen:?}"
            );
        }

        fs::write(root.join("plugin.py"), "X = 22\n").unwrap(); // edited in place
        let edited = shared_code_view(roots, &views).unwrap();
        assert!(!Arc::ptr_eq(&first, &edited));
        assert_eq!(
            fs::read_to_string(edited.mounts[0].0.join("plugin.py")).unwrap(),
            "X = 22\n"
        );
        assert_eq!(
            fs::read_to_string(&copied).unwrap(),
            "X = 1\n",
            "a running guest keeps its view"
        );
        // another text of the same size, its modification time put back (`cp -p`)
        let modified = fs::metadata(root.join("plugin.py")).unwrap().modified().unwrap();
        fs::write(root.join("plugin.py"), "X = 33\n").unwrap();
        let file = fs::File::options()
            .write(true)
            .open(root.join("plugin.py"))
            .unwrap();
        file.set_modified(modified).unwrap();
        let rewritten = shared_code_view(roots, &views).unwrap();
        assert!(!Arc::ptr_eq(&edited, &rewritten));
        assert_eq!(
            fs::read_to_string(rewritten.mounts[0].0.join("plugin.py")).unwrap(),
            "X = 33\n"
        );
        let edited = rewritten;

        fs::write(root.join("added.py"), "").unwrap();
        fs::write(root.join("notes.txt"), "not a source: no new view").unwrap();
        let added = shared_code_view(roots, &views).unwrap();
        assert!(!Arc::ptr_eq(&edited, &added) && added.mounts[0].0.join("added.py").is_file());
        let unchanged = shared_code_view(roots, &views).unwrap();
        assert!(Arc::ptr_eq(&added, &unchanged));
        fs::write(root.join("notes.txt"), "edited, still not a source").unwrap();
        assert!(Arc::ptr_eq(&added, &shared_code_view(roots, &views).unwrap()));

        let first_dir = first.mounts[0].0.clone();
        drop((first, again));
        assert!(
            !first_dir.exists(),
            "a replaced view is removed once no guest holds it"
        );
        fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn a_missing_root_is_a_clear_error() {
        let base = scratch("missing");
        let err = CodeView::build(&[base.join("nope")], &base.join("views")).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        fs::remove_dir_all(base).unwrap();
    }
}
