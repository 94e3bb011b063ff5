//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// Whether the tests run as root; privileged tests print why they skip otherwise.
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Prints the one-line reason a test skips and returns true when not root.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    println!("skipping {test}: needs root (mknod, chown, trusted.* xattrs)");
    true
}

/// Everything about one path in a tree that packing must preserve.
#[derive(Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    pub content: Vec<u8>,
    pub link: Option<String>,
    pub rdev: u64,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Paths (in the tree) sharing this node's inode, hardlinks included, sorted.
    pub links: Vec<String>,
}

/// A comparable snapshot of the tree at `root` (root itself as ".").
pub fn snapshot(root: &Path, ignore_xattr: &dyn Fn(&str) -> bool) -> BTreeMap<String, Node> {
    let mut by_inode: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut out = BTreeMap::new();
    walk(root, root, &mut out, &mut by_inode, ignore_xattr);
    let inode_of: BTreeMap<String, u64> = by_inode
        .iter()
        .flat_map(|(ino, paths)| paths.iter().map(move |p| (p.clone(), *ino)))
        .collect();
    for (path, node) in out.iter_mut() {
        if node.kind != "dir" {
            node.links = by_inode[&inode_of[path]].clone();
            node.links.sort();
        }
    }
    out
}

fn walk(
    root: &Path,
    path: &Path,
    out: &mut BTreeMap<String, Node>,
    by_inode: &mut BTreeMap<u64, Vec<String>>,
    ignore_xattr: &dyn Fn(&str) -> bool,
) {
    let meta = fs::symlink_metadata(path).unwrap();
    let rel = path
        .strip_prefix(root)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let rel = if rel.is_empty() { ".".to_owned() } else { rel };
    let t = meta.file_type();
    let kind = if t.is_dir() {
        "dir"
    } else if t.is_file() {
        "file"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_char_device() {
        "char"
    } else if t.is_block_device() {
        "block"
    } else if t.is_fifo() {
        "fifo"
    } else {
        "other"
    };
    let mut xattrs = BTreeMap::new();
    if let Ok(names) = xattr_names(path) {
        for name in names {
            if !ignore_xattr(&name) {
                xattrs.insert(name.clone(), xattr_value(path, &name));
            }
        }
    }
    by_inode.entry(meta.ino()).or_default().push(rel.clone());
    out.insert(
        rel,
        Node {
            kind,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            content: if t.is_file() {
                fs::read(path).unwrap()
            } else {
                Vec::new()
            },
            link: t
                .is_symlink()
                .then(|| fs::read_link(path).unwrap().to_string_lossy().into_owned()),
            rdev: meta.rdev(),
            xattrs,
            links: Vec::new(),
        },
    );
    if t.is_dir() {
        for entry in fs::read_dir(path).unwrap() {
            walk(root, &entry.unwrap().path(), out, by_inode, ignore_xattr);
        }
    }
}

fn cpath(path: &Path) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap()
}

pub fn xattr_names(path: &Path) -> std::io::Result<Vec<String>> {
    let p = cpath(path);
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid C string and buffer.
    let n = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

pub fn xattr_value(path: &Path, name: &str) -> Vec<u8> {
    let p = cpath(path);
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid C strings and buffer.
    let len =
        unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(len >= 0, "lgetxattr {name} on {}", path.display());
    buf.truncate(len as usize);
    buf
}

pub fn set_xattr(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let p = cpath(path);
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings and buffer.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn mknod_whiteout(path: &Path) {
    let p = cpath(path);
    // SAFETY: valid C string.
    let r = unsafe { libc::mknod(p.as_ptr(), libc::S_IFCHR, libc::makedev(0, 0)) };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

pub fn set_mtime(path: &Path, secs: i64, nanos: i64) {
    let p = cpath(path);
    let t = libc::timespec {
        tv_sec: secs,
        tv_nsec: nanos,
    };
    // SAFETY: valid C string and two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            p.as_ptr(),
            [t, t].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0);
}
