//! The DMTCP engine, shim side: find the node's DMTCP, rewrite a container's OCI spec so that
//! `mig-restore-hook` runs it under DMTCP, refuse programs DMTCP cannot wrap, and ask the hook
//! for checkpoints.
//!
//! DMTCP checkpoints from inside the container (it is preloaded into the application), so the
//! shim does not run DMTCP itself. It mounts the node's DMTCP and the hook into the container
//! and talks to the hook over a unix socket in a bind-mounted host dir, which works whatever
//! the container's network namespace:
//!
//! ```text
//!  host                                   container
//!  <ctl dir>/ctl.sock  <---------------->  /.mig/ctl/ctl.sock   mig-restore-hook (PID 1)
//!  <ckpt dir>/ckpt_*.dmtcp  <----------->  /.mig/ckpt             |- dmtcp_coordinator
//!  DMTCP install (ro)  ----------------->  /.mig/dmtcp            '- dmtcp_launch ENTRYPOINT
//!  staged deps (ro)    ----------------->  /.mig/deps                (or the restored process)
//! ```
//!
//! The protocol (one line each way; the hook's `protocol.rs` is the server side):
//! `checkpoint [TIMEOUT_MS]` -> `ok IMAGE...` (the application runs on),
//! `checkpoint-stop [TIMEOUT_MS]` -> `ok IMAGE...` (DMTCP ended the application with its image;
//! the hook exits next) or `error stopped=yes|no MESSAGE`, `status` -> `ok state=.. mode=..
//! dmtcp=.. peers=.. port=..`, `version` -> `ok dmtcp=4.2.0 hook=0.1.0`, failures -> `error
//! MESSAGE`; `%`, space, tab, CR and LF inside a token are percent-encoded.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use oci_spec::runtime::{Mount, Spec};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Where things are inside a DMTCP container. The hook defaults to the same paths.
pub mod container_path {
    /// The hook binary, the container's new PID 1.
    pub const HOOK: &str = "/.mig/restore-hook";
    /// The node's DMTCP installation (`bin/`, `lib/dmtcp/`), read-only.
    pub const DMTCP: &str = "/.mig/dmtcp";
    /// Libraries DMTCP needs that the image may lack, read-only. Not nested in `/.mig/dmtcp`:
    /// runc cannot create a mountpoint inside a read-only bind mount.
    pub const DEPS: &str = "/.mig/deps";
    /// DMTCP's writable temp dir.
    pub const TMP: &str = "/.mig/tmp";
    /// Checkpoint images.
    pub const CKPT: &str = "/.mig/ckpt";
    /// Holds the control socket.
    pub const CTL: &str = "/.mig/ctl";
}

/// The file in the node's state dir that remembers its DMTCP installation (see
/// [`DmtcpInstall::discover_staged`]).
pub const INSTALL_CACHE: &str = "dmtcp-install.json";
/// The control socket's name inside [`InjectDirs::ctl`].
pub const CTL_SOCKET: &str = "ctl.sock";
/// The coordinator port for containers with their own network namespace. With host
/// networking pass a free port, or 0 to let the coordinator pick one.
pub const DEFAULT_COORD_PORT: u16 = 7779;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// DMTCP programs the hook runs; an installation without them is unusable.
const REQUIRED: [&str; 6] = [
    "bin/dmtcp_launch",
    "bin/dmtcp_restart",
    "bin/dmtcp_command",
    "bin/dmtcp_coordinator",
    "bin/mtcp_restart",
    "lib/dmtcp/libdmtcp.so",
];
/// Libraries never injected: the application already runs on the image's own libc and loader,
/// and a second copy cannot be loaded next to them. (libm and the rest may be missing from a
/// minimal image and are injected; the hook only uses what the image lacks.)
const IMAGE_OWN: [&str; 3] = ["libc.so", "ld-linux", "linux-vdso"];

/// Errors of the DMTCP engine.
#[derive(Debug, thiserror::Error)]
pub enum DmtcpError {
    #[error("DMTCP not found: {searched} (install it or set MIG_DMTCP_DIR)")]
    NotFound { searched: String },
    #[error("DMTCP installation {dir} is incomplete: {missing} is missing")]
    Incomplete { dir: PathBuf, missing: String },
    #[error("running {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr_tail}")]
    Command {
        command: String,
        status: String,
        stderr_tail: String,
    },
    #[error("cannot tell DMTCP's version from {command}: {output}")]
    Version { command: String, output: String },
    #[error("{object} needs {library}, which is not found on this node")]
    MissingLibrary { object: PathBuf, library: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid OCI spec: {0}")]
    Spec(String),
    #[error("cannot find entrypoint {program:?} in the container's PATH {path:?}")]
    EntrypointNotFound { program: String, path: String },
    /// Statically linked, setuid, or not a program (the check shared with the hook).
    #[error(transparent)]
    Unwrappable(#[from] mig_elf::Unwrappable),
    #[error("{path} is neither an ELF executable nor a #! script")]
    NotExecutable { path: PathBuf },
    #[error(
        "restore-hook {path} is dynamically linked; build it with \
         RUSTFLAGS='-C target-feature=+crt-static' --target x86_64-unknown-linux-gnu"
    )]
    HookNotStatic { path: PathBuf },
    #[error("control socket {socket}: {source}")]
    Control {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {socket}: no reply to {request:?} within {timeout:?}")]
    Timeout {
        socket: PathBuf,
        request: String,
        timeout: Duration,
    },
    #[error("restore-hook refused {request:?}: {message}")]
    Hook { request: String, message: String },
    /// A `checkpoint-stop` the hook reports failed; `stopped`: DMTCP had already begun ending
    /// the application, which is gone without a checkpoint (else it keeps running).
    #[error("restore-hook: checkpoint-stop failed ({}): {message}",
        if *stopped { "DMTCP had begun ending the application" } else { "the application keeps running" })]
    StopFailed { stopped: bool, message: String },
    #[error("restore-hook sent a malformed reply {reply:?}")]
    Protocol { reply: String },
}

pub type Result<T, E = DmtcpError> = std::result::Result<T, E>;

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DmtcpError {
    let path = path.to_path_buf();
    move |source| DmtcpError::Io { what, path, source }
}

/// The node's DMTCP installation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DmtcpInstall {
    /// The installation root (holds `bin/` and `lib/dmtcp/`).
    pub dir: PathBuf,
    /// DMTCP's version: images must be restarted by the version that wrote them (the image
    /// format changed in 4.0), so it belongs in the checkpoint's manifest.
    pub version: String,
    /// Shared libraries DMTCP's programs and libraries need, besides libc and the loader.
    pub deps: Vec<PathBuf>,
    /// The node-side dir the deps were copied to by [`DmtcpInstall::stage_deps`].
    pub deps_dir: Option<PathBuf>,
}

impl DmtcpInstall {
    /// Finds DMTCP in `configured_dir`, else in `$MIG_DMTCP_DIR`, else as the install root of
    /// the `dmtcp_launch` on `PATH`; reads its version and the libraries it links against.
    ///
    /// Blocking (it runs `dmtcp_launch --version` and `ldd`): call it once at start-up.
    pub fn discover(configured_dir: Option<&Path>) -> Result<Self> {
        Self::discover_in(install_dir(configured_dir)?)
    }

    /// [`Self::discover`], then [`Self::stage_deps`] into `deps_dir`, remembered in the file
    /// `cache` for as long as the installation's programs and libraries (size, mtime) and the
    /// boot are the same: every container's shim needs the installation at create, and
    /// discovering it runs `ldd` on each of DMTCP's objects (~200 ms of each DMTCP container's
    /// create and start, measured here), so only the first shim of a boot does.
    ///
    /// Blocking, as [`Self::discover`].
    pub fn discover_staged(
        configured_dir: Option<&Path>,
        deps_dir: &Path,
        cache: &Path,
    ) -> Result<Self> {
        let dir = install_dir(configured_dir)?;
        let key = CacheKey::of(&dir);
        if let Some(install) = key
            .as_ref()
            .and_then(|k| read_install_cache(cache, k, deps_dir))
        {
            return Ok(install);
        }
        let install = Self::discover_in(dir)?.stage_deps(deps_dir)?;
        if let Some(key) = key {
            write_install_cache(cache, key, &install);
        }
        Ok(install)
    }

    fn discover_in(dir: PathBuf) -> Result<Self> {
        if !dir.is_dir() {
            return Err(DmtcpError::NotFound {
                searched: format!("{} is not a directory", dir.display()),
            });
        }
        if let Some(missing) = REQUIRED.iter().find(|r| !dir.join(r).is_file()) {
            return Err(DmtcpError::Incomplete {
                dir,
                missing: (*missing).to_owned(),
            });
        }
        let version = read_version(&dir.join("bin/dmtcp_launch"))?;
        let deps = find_deps(&dir)?;
        Ok(Self {
            dir,
            version,
            deps,
            deps_dir: None,
        })
    }

    /// Copies [`Self::deps`] into the node-side `dir` (named by soname), which [`inject`]
    /// then mounts. Each file is replaced by rename, so running containers keep their copy.
    pub fn stage_deps(mut self, dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        for dep in &self.deps {
            let Some(name) = dep.file_name() else {
                continue;
            };
            let dest = dir.join(name);
            let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
            fs::copy(dep, &tmp).map_err(io_err("copying", dep))?;
            fs::rename(&tmp, &dest).map_err(io_err("installing", &dest))?;
        }
        self.deps_dir = Some(dir.to_path_buf());
        Ok(self)
    }
}

/// The installation root: `configured_dir`, else `$MIG_DMTCP_DIR`, else that of the
/// `dmtcp_launch` on `PATH`.
fn install_dir(configured_dir: Option<&Path>) -> Result<PathBuf> {
    if let Some(dir) = configured_dir
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("MIG_DMTCP_DIR").map(PathBuf::from))
    {
        return Ok(dir);
    }
    let launch =
        crate::node_cache::find_on_path("dmtcp_launch").ok_or_else(|| DmtcpError::NotFound {
            searched: "no dmtcp_launch on PATH".into(),
        })?;
    let launch = fs::canonicalize(&launch).map_err(io_err("resolving", &launch))?;
    launch
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| DmtcpError::NotFound {
            searched: format!("{} has no install root", launch.display()),
        })
}

/// What a cached [`DmtcpInstall`] was discovered from: the installation's dir, the size and
/// mtime of each of its [`REQUIRED`] files, and the boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CacheKey {
    dir: PathBuf,
    stamps: Vec<(u64, i128)>,
    boot_id: String,
}

impl CacheKey {
    /// `None` when a required file is missing (discovery then says which) or the boot is
    /// unknown.
    fn of(dir: &Path) -> Option<Self> {
        let stamps = REQUIRED
            .iter()
            .map(|r| {
                let m = fs::metadata(dir.join(r)).ok()?;
                Some((m.size(), mig_checkpoint::mtime_ns(&m)))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            dir: dir.to_path_buf(),
            stamps,
            boot_id: mig_checkpoint::boot_id()?,
        })
    }
}

/// A discovered and staged installation as cached on disk.
#[derive(Debug, Serialize, Deserialize)]
struct CachedInstall {
    key: CacheKey,
    install: DmtcpInstall,
}

/// The cached installation, if it was discovered from `key` and staged into `deps_dir`, whose
/// copies are all still there.
fn read_install_cache(cache: &Path, key: &CacheKey, deps_dir: &Path) -> Option<DmtcpInstall> {
    let cached: CachedInstall = crate::node_cache::read(cache)?;
    let staged = cached.install.deps_dir.as_deref() == Some(deps_dir)
        && cached.install.deps.iter().all(|d| {
            d.file_name()
                .is_some_and(|name| deps_dir.join(name).is_file())
        });
    (cached.key == *key && staged).then_some(cached.install)
}

/// Best effort: a cache that cannot be written means discovering again next time.
fn write_install_cache(cache: &Path, key: CacheKey, install: &DmtcpInstall) {
    let cached = CachedInstall {
        key,
        install: install.clone(),
    };
    crate::node_cache::write(cache, &cached, "the DMTCP installation");
}

/// How [`DmtcpInstall::discover`] runs `dmtcp_launch --version` and `ldd`. Inside the shim's
/// server every child is reaped by the shim library, so a plain `Command::output` can lose its
/// exit status to it; the shim installs a runner that goes through the library's exit monitor.
static RUNNER: std::sync::OnceLock<fn(&mut Command) -> std::io::Result<std::process::Output>> =
    std::sync::OnceLock::new();

/// Installs the command runner used by [`DmtcpInstall::discover`] (once per process).
pub fn set_command_runner(runner: fn(&mut Command) -> std::io::Result<std::process::Output>) {
    let _ = RUNNER.set(runner);
}

fn run(cmd: &mut Command) -> Result<std::process::Output> {
    let command = format!("{cmd:?}");
    let runner = RUNNER.get().copied().unwrap_or(Command::output);
    let out = runner(cmd).map_err(|source| DmtcpError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(DmtcpError::Command {
            command,
            status: out.status.to_string(),
            stderr_tail: tail(&out.stderr, 5),
        });
    }
    Ok(out)
}

fn read_version(launch: &Path) -> Result<String> {
    let mut cmd = Command::new(launch);
    cmd.arg("--version");
    let out = run(&mut cmd)?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_version(&text).ok_or_else(|| DmtcpError::Version {
        command: format!("{cmd:?}"),
        output: tail(&out.stdout, 3),
    })
}

/// Parses `dmtcp_launch --version` (`dmtcp_launch (DMTCP) 4.2.0`).
fn parse_version(text: &str) -> Option<String> {
    let v = text.lines().next()?.split("(DMTCP)").nth(1)?.trim();
    (!v.is_empty()).then(|| v.to_owned())
}

/// The libraries every dynamic object of the installation links against, minus [`IMAGE_OWN`].
fn find_deps(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut objects = Vec::new();
    for sub in ["bin", "lib/dmtcp"] {
        let d = dir.join(sub);
        for entry in fs::read_dir(&d).map_err(io_err("listing", &d))? {
            let path = entry.map_err(io_err("listing", &d))?.path();
            if path.is_file() && is_dynamic_elf(&path) {
                objects.push(path);
            }
        }
    }
    objects.sort();
    let mut deps: BTreeMap<String, PathBuf> = BTreeMap::new();
    for object in objects {
        let out = run(Command::new("ldd").arg(&object))?;
        for (name, path) in parse_ldd(&String::from_utf8_lossy(&out.stdout)) {
            if IMAGE_OWN.iter().any(|own| name.starts_with(own)) {
                continue;
            }
            match path {
                Some(p) => {
                    deps.entry(name).or_insert(p);
                }
                None => {
                    return Err(DmtcpError::MissingLibrary {
                        object,
                        library: name,
                    });
                }
            }
        }
    }
    Ok(deps.into_values().collect())
}

/// `(soname, resolved path or None when "not found")` for each `name => path` line of `ldd`.
fn parse_ldd(text: &str) -> Vec<(String, Option<PathBuf>)> {
    text.lines()
        .filter_map(|line| {
            let (name, rest) = line.trim().split_once(" => ")?;
            let target = rest.split_whitespace().next()?;
            let path = target.starts_with('/').then(|| PathBuf::from(target));
            Some((name.to_owned(), path))
        })
        .collect()
}

fn is_dynamic_elf(path: &Path) -> bool {
    // With PT_INTERP, or ET_DYN without it: a shared library (lib/dmtcp/*.so).
    mig_elf::read_head(path)
        .is_ok_and(|h| mig_elf::has_interp(&h) == Some(true) || mig_elf::is_shared_object(&h))
}

/// Host-side dirs of one container, bind-mounted read-write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectDirs {
    /// DMTCP's temp dir; per container and fresh (a restart must not see the old one).
    pub tmp: PathBuf,
    /// The checkpoint images: written by a checkpoint, read at restart when not empty.
    pub ckpt: PathBuf,
    /// Holds the control socket [`CTL_SOCKET`].
    pub ctl: PathBuf,
}

impl InjectDirs {
    /// The control socket as seen from the host.
    pub fn ctl_socket(&self) -> PathBuf {
        self.ctl.join(CTL_SOCKET)
    }
}

fn bind(source: &Path, destination: &str, read_only: bool) -> Mount {
    let mut m = Mount::default();
    m.set_destination(PathBuf::from(destination));
    m.set_typ(Some("bind".into()));
    m.set_source(Some(source.to_path_buf()));
    let mode = if read_only { "ro" } else { "rw" };
    m.set_options(Some(
        ["rbind", mode, "nosuid", "nodev"]
            .map(String::from)
            .to_vec(),
    ));
    m
}

/// Rewrites `spec` so the container's process runs under DMTCP through the hook: mounts the
/// hook, DMTCP and its deps read-only and `dirs` read-write under `/.mig`, replaces
/// `process.args` with `/.mig/restore-hook -- ARGS...` and adds the hook's environment.
///
/// Idempotent (a spec already rewritten is rewritten again, not wrapped twice). The dirs must
/// be writable by the container's `process.user`. Whether the container restarts from a
/// checkpoint is decided by the hook: it restarts when `dirs.ckpt` holds one.
pub fn inject(
    spec: &mut Spec,
    install: &DmtcpInstall,
    hook_binary: &Path,
    dirs: &InjectDirs,
    port: u16,
) -> Result<()> {
    let process = spec
        .process_mut()
        .as_mut()
        .ok_or_else(|| DmtcpError::Spec("no process".into()))?;
    let args = process.args().clone().unwrap_or_default();
    if args.is_empty() {
        return Err(DmtcpError::Spec("process.args is empty".into()));
    }
    if args[0] != container_path::HOOK {
        let mut wrapped = vec![container_path::HOOK.to_owned(), "--".to_owned()];
        wrapped.extend(args);
        process.set_args(Some(wrapped));
    }
    let mut vars = vec![
        ("MIG_DMTCP_DIR", container_path::DMTCP.to_owned()),
        ("DMTCP_TMPDIR", container_path::TMP.to_owned()),
        ("MIG_CKPT_DIR", container_path::CKPT.to_owned()),
        ("MIG_CTL_DIR", container_path::CTL.to_owned()),
        ("MIG_COORD_PORT", port.to_string()),
    ];
    if install.deps_dir.is_some() {
        vars.push(("MIG_DMTCP_DEPS", container_path::DEPS.to_owned()));
    }
    let mut env: Vec<String> = process
        .env()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| {
            let key = e.split('=').next().unwrap_or_default();
            !vars.iter().any(|(k, _)| *k == key)
        })
        .collect();
    env.extend(vars.iter().map(|(k, v)| format!("{k}={v}")));
    process.set_env(Some(env));

    let mut mounts: Vec<Mount> = spec
        .mounts()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| !m.destination().starts_with("/.mig"))
        .collect();
    mounts.push(bind(hook_binary, container_path::HOOK, true));
    mounts.push(bind(&install.dir, container_path::DMTCP, true));
    if let Some(deps) = &install.deps_dir {
        mounts.push(bind(deps, container_path::DEPS, true));
    }
    mounts.push(bind(&dirs.tmp, container_path::TMP, false));
    mounts.push(bind(&dirs.ckpt, container_path::CKPT, false));
    mounts.push(bind(&dirs.ctl, container_path::CTL, false));
    spec.set_mounts(Some(mounts));
    Ok(())
}

/// Checks the hook binary is static: it runs in images that may have no (or another) libc.
pub fn check_hook_binary(path: &Path) -> Result<()> {
    let head = mig_elf::read_head(path).map_err(io_err("reading restore-hook", path))?;
    match mig_elf::has_interp(&head) {
        Some(false) => Ok(()),
        Some(true) => Err(DmtcpError::HookNotStatic {
            path: path.to_path_buf(),
        }),
        None => Err(DmtcpError::NotExecutable {
            path: path.to_path_buf(),
        }),
    }
}

/// Refuses, at create, an entrypoint DMTCP cannot wrap: statically linked or setuid/setgid
/// (following `#!` interpreters). `spec`'s first arg is resolved inside `rootfs` through the
/// spec's `PATH`, with symlinks resolved relative to `rootfs`. Call it on the original spec,
/// before [`inject`]. The hook checks again at start.
pub fn check_wrappable(rootfs: &Path, spec: &Spec) -> Result<()> {
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| DmtcpError::Spec("no process".into()))?;
    let program = process
        .args()
        .as_ref()
        .and_then(|a| a.first())
        .ok_or_else(|| DmtcpError::Spec("process.args is empty".into()))?;
    let path_var = process
        .env()
        .iter()
        .flatten()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    let candidates: Vec<PathBuf> = if program.contains('/') {
        vec![process.cwd().join(program)]
    } else {
        path_var
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join(program))
            .collect()
    };
    let found = candidates
        .iter()
        .filter_map(|c| resolve_in_root(rootfs, c))
        .find(|host| {
            host.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| DmtcpError::EntrypointNotFound {
            program: program.clone(),
            path: path_var.to_owned(),
        })?;
    check_program(rootfs, &found)
}

/// Checks one program (a host path inside `rootfs`); errors name the container path.
fn check_program(rootfs: &Path, host_path: &Path) -> Result<()> {
    mig_elf::check_wrappable(
        host_path,
        |interp| resolve_in_root(rootfs, interp),
        |p| Path::new("/").join(p.strip_prefix(rootfs).unwrap_or(p)),
    )?;
    Ok(())
}

/// Resolves the container path `path` to a host path under `rootfs`, following symlinks as
/// the container would see them (absolute targets are relative to `rootfs`, `..` stops at
/// it). `None` when a component is missing or there are too many links.
fn resolve_in_root(rootfs: &Path, path: &Path) -> Option<PathBuf> {
    // A stack: the next component to resolve is at the end.
    let mut pending: Vec<PathBuf> = parts(path).into_iter().rev().collect();
    let mut resolved: Vec<PathBuf> = Vec::new();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        if part.as_os_str() == ".." {
            resolved.pop();
            continue;
        }
        let mut host = rootfs.to_path_buf();
        host.extend(&resolved);
        host.push(&part);
        if fs::symlink_metadata(&host).ok()?.file_type().is_symlink() {
            links += 1;
            if links > 40 {
                return None;
            }
            let target = fs::read_link(&host).ok()?;
            if target.is_absolute() {
                resolved.clear();
            }
            pending.extend(parts(&target).into_iter().rev());
        } else {
            resolved.push(part);
        }
    }
    let mut host = rootfs.to_path_buf();
    host.extend(&resolved);
    Some(host)
}

/// The normal and `..` components of `path` (root and `.` dropped).
fn parts(path: &Path) -> Vec<PathBuf> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(PathBuf::from(n)),
            Component::ParentDir => Some(PathBuf::from("..")),
            _ => None,
        })
        .collect()
}

/// Asks the hook behind `ctl_socket` to checkpoint and waits until every image is complete.
///
/// Returns the image names inside the container's checkpoint dir (the host-side
/// [`InjectDirs::ckpt`]); after success that dir holds exactly this checkpoint (images plus
/// the hook's `mig-images.txt` manifest), so ship the whole dir.
pub async fn checkpoint(ctl_socket: &Path, timeout: Duration) -> Result<Vec<PathBuf>> {
    let request = format!("checkpoint {}", timeout.as_millis());
    // The hook enforces `timeout` itself; the margin covers its reply.
    let tokens = call(ctl_socket, &request, timeout + Duration::from_secs(5)).await?;
    Ok(tokens.into_iter().map(PathBuf::from).collect())
}

/// Asks the hook behind `ctl_socket` for a checkpoint that ends the application: DMTCP
/// writes every process's image and ends the process instead of resuming it, so nothing the
/// application does after its memory image reaches its files (the checkpoint for a stop).
///
/// Returns the image names (as [`checkpoint`]) once the images are complete and the
/// application is gone; the hook, the container's init, exits right after replying (status
/// 137). [`DmtcpError::StopFailed`] tells whether a failure left the application running;
/// other errors (no reply, timeout) leave that unknown: ask [`status`].
pub async fn checkpoint_and_stop(ctl_socket: &Path, timeout: Duration) -> Result<Vec<PathBuf>> {
    let request = format!("checkpoint-stop {}", timeout.as_millis());
    match call(ctl_socket, &request, timeout + Duration::from_secs(5)).await {
        Ok(tokens) => Ok(tokens.into_iter().map(PathBuf::from).collect()),
        Err(DmtcpError::Hook { message, .. }) => Err(stop_failure(message)),
        Err(e) => Err(e),
    }
}

fn stop_failure(message: String) -> DmtcpError {
    for (prefix, stopped) in [("stopped=yes ", true), ("stopped=no ", false)] {
        if let Some(rest) = message.strip_prefix(prefix) {
            return DmtcpError::StopFailed {
                stopped,
                message: rest.to_owned(),
            };
        }
    }
    // A hook without `checkpoint-stop` refuses the request before touching anything.
    DmtcpError::StopFailed {
        stopped: false,
        message,
    }
}

/// The versions the hook reports (`dmtcp`, `hook`), for the checkpoint's manifest.
pub async fn version(ctl_socket: &Path) -> Result<BTreeMap<String, String>> {
    let tokens = call(ctl_socket, "version", Duration::from_secs(10)).await?;
    Ok(key_values(tokens))
}

/// The hook's state: `state` (running|checkpointing), `mode` (launch|restart), `dmtcp`,
/// `peers`, `port`.
pub async fn status(ctl_socket: &Path) -> Result<BTreeMap<String, String>> {
    let tokens = call(ctl_socket, "status", Duration::from_secs(10)).await?;
    Ok(key_values(tokens))
}

fn key_values(tokens: Vec<String>) -> BTreeMap<String, String> {
    tokens
        .into_iter()
        .filter_map(|t| t.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

async fn call(socket: &Path, request: &str, timeout: Duration) -> Result<Vec<String>> {
    let control = |source| DmtcpError::Control {
        socket: socket.to_path_buf(),
        source,
    };
    let exchange = async {
        let mut stream = UnixStream::connect(socket).await.map_err(control)?;
        stream
            .write_all(format!("{request}\n").as_bytes())
            .await
            .map_err(control)?;
        let mut line = String::new();
        BufReader::new(stream)
            .read_line(&mut line)
            .await
            .map_err(control)?;
        Ok::<_, DmtcpError>(line)
    };
    let line = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| DmtcpError::Timeout {
            socket: socket.to_path_buf(),
            request: request.to_owned(),
            timeout,
        })??;
    parse_reply(request, &line)
}

/// Parses one reply line into its (decoded) tokens.
fn parse_reply(request: &str, line: &str) -> Result<Vec<String>> {
    let malformed = || DmtcpError::Protocol {
        reply: line.to_owned(),
    };
    let line = line.strip_suffix('\n').ok_or_else(malformed)?;
    if line == "ok" {
        return Ok(Vec::new());
    }
    if let Some(rest) = line.strip_prefix("ok ") {
        return rest
            .split(' ')
            .map(|t| decode(t).ok_or_else(malformed))
            .collect();
    }
    if let Some(message) = line.strip_prefix("error ") {
        return Err(DmtcpError::Hook {
            request: request.to_owned(),
            message: message.to_owned(),
        });
    }
    Err(malformed())
}

fn decode(token: &str) -> Option<String> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn tail(bytes: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Write;
    use std::os::unix::fs::symlink;

    fn install() -> DmtcpInstall {
        DmtcpInstall {
            dir: "/opt/dmtcp".into(),
            version: "4.2.0".into(),
            deps: vec!["/lib/x86_64-linux-gnu/libatomic.so.1".into()],
            deps_dir: Some("/run/mig/dmtcp-deps".into()),
        }
    }

    fn dirs() -> InjectDirs {
        InjectDirs {
            tmp: "/run/mig/c1/tmp".into(),
            ckpt: "/var/lib/mig/c1/ckpt".into(),
            ctl: "/run/mig/c1/ctl".into(),
        }
    }

    fn spec_with(args: &[&str], env: &[&str]) -> Spec {
        let mut spec = Spec::default();
        let p = spec.process_mut().as_mut().unwrap();
        p.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
        p.set_env(Some(env.iter().map(|s| s.to_string()).collect()));
        spec
    }

    #[test]
    fn inject_rewrites_args_env_and_mounts() {
        let mut spec = spec_with(
            &["redis-server", "--port", "6379"],
            &["PATH=/bin", "DMTCP_TMPDIR=/x"],
        );
        let default_mounts = spec.mounts().as_ref().unwrap().len();
        let hook = Path::new("/usr/local/bin/mig-restore-hook");
        inject(&mut spec, &install(), hook, &dirs(), 7779).unwrap();
        // Twice: idempotent.
        inject(&mut spec, &install(), hook, &dirs(), 7779).unwrap();

        let p = spec.process().as_ref().unwrap();
        assert_eq!(
            p.args().as_ref().unwrap(),
            &["/.mig/restore-hook", "--", "redis-server", "--port", "6379"]
        );
        let env = p.env().as_ref().unwrap();
        assert!(env.contains(&"PATH=/bin".to_owned()));
        for e in [
            "MIG_DMTCP_DIR=/.mig/dmtcp",
            "MIG_DMTCP_DEPS=/.mig/deps",
            "DMTCP_TMPDIR=/.mig/tmp",
            "MIG_CKPT_DIR=/.mig/ckpt",
            "MIG_CTL_DIR=/.mig/ctl",
            "MIG_COORD_PORT=7779",
        ] {
            assert_eq!(env.iter().filter(|v| *v == e).count(), 1, "{e} in {env:?}");
        }
        assert!(!env.contains(&"DMTCP_TMPDIR=/x".to_owned()));

        let mounts = spec.mounts().as_ref().unwrap();
        assert_eq!(mounts.len(), default_mounts + 6);
        let find = |dst: &str| {
            mounts
                .iter()
                .find(|m| m.destination() == Path::new(dst))
                .unwrap_or_else(|| panic!("no mount at {dst}"))
        };
        let hook_mount = find("/.mig/restore-hook");
        assert_eq!(hook_mount.source().as_deref(), Some(hook));
        assert!(
            hook_mount
                .options()
                .as_ref()
                .unwrap()
                .contains(&"ro".to_owned())
        );
        assert_eq!(
            find("/.mig/dmtcp").source().as_deref(),
            Some(Path::new("/opt/dmtcp"))
        );
        assert_eq!(
            find("/.mig/deps").source().as_deref(),
            Some(Path::new("/run/mig/dmtcp-deps"))
        );
        let ckpt = find("/.mig/ckpt");
        assert_eq!(
            ckpt.source().as_deref(),
            Some(Path::new("/var/lib/mig/c1/ckpt"))
        );
        assert!(ckpt.options().as_ref().unwrap().contains(&"rw".to_owned()));
        assert_eq!(find("/.mig/tmp").typ().as_deref(), Some("bind"));
        assert_eq!(
            find("/.mig/ctl").source().as_deref(),
            Some(Path::new("/run/mig/c1/ctl"))
        );
        assert_eq!(dirs().ctl_socket(), Path::new("/run/mig/c1/ctl/ctl.sock"));
    }

    #[test]
    fn inject_without_staged_deps_or_args() {
        let mut spec = spec_with(&["app"], &[]);
        let mut bare = install();
        bare.deps_dir = None;
        inject(&mut spec, &bare, Path::new("/hook"), &dirs(), 0).unwrap();
        let mounts = spec.mounts().as_ref().unwrap();
        assert!(
            !mounts
                .iter()
                .any(|m| m.destination() == Path::new("/.mig/deps"))
        );
        let env = spec.process().as_ref().unwrap().env().as_ref().unwrap();
        assert!(env.contains(&"MIG_COORD_PORT=0".to_owned()));
        assert!(!env.iter().any(|e| e.starts_with("MIG_DMTCP_DEPS=")));

        let mut empty = spec_with(&[], &[]);
        assert!(matches!(
            inject(&mut empty, &bare, Path::new("/hook"), &dirs(), 0),
            Err(DmtcpError::Spec(_))
        ));
    }

    /// A minimal little-endian ELF64 image with program headers of `types` (3 = PT_INTERP).
    fn elf64(e_type: u16, types: &[u32]) -> Vec<u8> {
        let mut v = vec![0u8; 64];
        v[..4].copy_from_slice(b"\x7fELF");
        v[4] = 2;
        v[5] = 1;
        v[16..18].copy_from_slice(&e_type.to_le_bytes());
        v[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        v[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        v[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            v.extend(ph);
        }
        v
    }

    fn put(root: &Path, path: &str, content: &[u8], mode: u32) {
        let p = root.join(path.trim_start_matches('/'));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        File::create(&p).unwrap().write_all(content).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn wrappable_entrypoints() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        put(root, "/bin/busybox", &elf64(2, &[1]), 0o755);
        put(root, "/usr/bin/app", &elf64(3, &[6, 3, 1]), 0o755);
        put(root, "/usr/bin/su", &elf64(3, &[3]), 0o4755);
        put(root, "/usr/bin/script", b"#!/bin/sh -e\necho\n", 0o755);
        put(root, "/usr/bin/pyscript", b"#!/usr/bin/app\n", 0o755);
        // An absolute symlink must resolve inside the rootfs, not on the host.
        symlink("/bin/busybox", root.join("bin/sh")).unwrap();
        symlink("../../usr/bin/app", root.join("bin/app-link")).unwrap();
        let path = "PATH=/usr/local/bin:/usr/bin:/bin";

        assert!(check_wrappable(root, &spec_with(&["app"], &[path])).is_ok());
        assert!(check_wrappable(root, &spec_with(&["/bin/app-link"], &[path])).is_ok());
        assert!(check_wrappable(root, &spec_with(&["pyscript"], &[path])).is_ok());
        match check_wrappable(root, &spec_with(&["sh"], &[path])) {
            Err(DmtcpError::Unwrappable(mig_elf::Unwrappable {
                path,
                reason: mig_elf::Reason::Static,
            })) => assert_eq!(path, Path::new("/bin/busybox")),
            other => panic!("unexpected {other:?}"),
        }
        match check_wrappable(root, &spec_with(&["script"], &[path])) {
            Err(
                e @ DmtcpError::Unwrappable(mig_elf::Unwrappable {
                    reason: mig_elf::Reason::Static,
                    ..
                }),
            ) => assert!(
                e.to_string()
                    .starts_with("DMTCP cannot checkpoint statically linked program /bin/busybox")
            ),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            check_wrappable(root, &spec_with(&["su"], &[path])),
            Err(DmtcpError::Unwrappable(mig_elf::Unwrappable {
                reason: mig_elf::Reason::Setuid,
                ..
            }))
        ));
        assert!(matches!(
            check_wrappable(root, &spec_with(&["nothere"], &[path])),
            Err(DmtcpError::EntrypointNotFound { .. })
        ));
        put(root, "/hook", &elf64(3, &[1]), 0o755);
        assert!(check_hook_binary(&root.join("hook")).is_ok());
        assert!(matches!(
            check_hook_binary(&root.join("usr/bin/app")),
            Err(DmtcpError::HookNotStatic { .. })
        ));
    }

    #[test]
    fn ldd_and_version_parsing() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibatomic.so.1 => /lib/x86_64-linux-gnu/libatomic.so.1 (0x00007f)\n\
                   \tlibfoo.so.2 => not found\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(out),
            vec![
                (
                    "libatomic.so.1".into(),
                    Some(PathBuf::from("/lib/x86_64-linux-gnu/libatomic.so.1"))
                ),
                ("libfoo.so.2".into(), None),
            ]
        );
        assert_eq!(
            parse_version("dmtcp_launch (DMTCP) 4.2.0\nLicense").as_deref(),
            Some("4.2.0")
        );
        assert_eq!(parse_version("nope"), None);
    }

    #[test]
    fn reply_parsing() {
        assert_eq!(
            parse_reply("checkpoint", "ok ckpt_a%20b_1.dmtcp ckpt_c.dmtcp\n").unwrap(),
            vec!["ckpt_a b_1.dmtcp", "ckpt_c.dmtcp"]
        );
        assert_eq!(parse_reply("status", "ok\n").unwrap(), Vec::<String>::new());
        match parse_reply("checkpoint", "error no process is running under DMTCP\n") {
            Err(DmtcpError::Hook { message, .. }) => {
                assert_eq!(message, "no process is running under DMTCP")
            }
            other => panic!("unexpected {other:?}"),
        }
        for bad in ["ok a", "ok bad%2", "okay\n", "ok x%zz\n"] {
            assert!(
                matches!(parse_reply("x", bad), Err(DmtcpError::Protocol { .. })),
                "{bad}"
            );
        }
        let kv = key_values(vec!["dmtcp=4.2.0".into(), "hook=0.1.0".into()]);
        assert_eq!(kv.get("dmtcp").map(String::as_str), Some("4.2.0"));
    }

    #[tokio::test]
    async fn checkpoint_client_talks_the_protocol() {
        let t = tempfile::tempdir().unwrap();
        let sock = t.path().join(CTL_SOCKET);
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            BufReader::new(r).read_line(&mut line).await.unwrap();
            w.write_all(b"ok ckpt_counter_1-40000-2.dmtcp\n")
                .await
                .unwrap();
            line
        });
        let images = checkpoint(&sock, Duration::from_millis(1500))
            .await
            .unwrap();
        assert_eq!(images, vec![PathBuf::from("ckpt_counter_1-40000-2.dmtcp")]);
        assert_eq!(server.await.unwrap(), "checkpoint 1500\n");

        // checkpoint-stop: images on success, and whether a failure stopped the application.
        for (answer, expect) in [
            ("ok ckpt_a.dmtcp\n", Ok(vec![PathBuf::from("ckpt_a.dmtcp")])),
            (
                "error stopped=no no process is running under DMTCP\n",
                Err(false),
            ),
            ("error stopped=yes the application exited\n", Err(true)),
            ("error unknown request \"checkpoint-stop\"\n", Err(false)),
        ] {
            let sock = t.path().join("stop.sock");
            let _ = fs::remove_file(&sock);
            let listener = tokio::net::UnixListener::bind(&sock).unwrap();
            let server = tokio::spawn(async move {
                let (stream, _) = listener.accept().await.unwrap();
                let (r, mut w) = stream.into_split();
                let mut line = String::new();
                BufReader::new(r).read_line(&mut line).await.unwrap();
                w.write_all(answer.as_bytes()).await.unwrap();
                line
            });
            let got = checkpoint_and_stop(&sock, Duration::from_millis(2500)).await;
            assert_eq!(server.await.unwrap(), "checkpoint-stop 2500\n");
            match (got, expect) {
                (Ok(images), Ok(want)) => assert_eq!(images, want),
                (Err(DmtcpError::StopFailed { stopped, .. }), Err(want)) => {
                    assert_eq!(stopped, want, "{answer}")
                }
                (got, _) => panic!("{answer}: unexpected {got:?}"),
            }
        }

        // Nobody answering: the client gives up after its timeout.
        let silent = tokio::net::UnixListener::bind(t.path().join("silent.sock")).unwrap();
        let err = call(
            &t.path().join("silent.sock"),
            "status",
            Duration::from_millis(50),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, DmtcpError::Timeout { .. }), "{err}");
        drop(silent);
        assert!(matches!(
            status(&t.path().join("absent.sock")).await,
            Err(DmtcpError::Control { .. })
        ));
    }

    #[test]
    fn install_cache_holds_while_the_install_and_its_staged_deps_do() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("dmtcp");
        for r in REQUIRED {
            put(&dir, r, b"x", 0o755);
        }
        let deps = t.path().join("deps");
        put(&deps, "libatomic.so.1", b"lib", 0o644);
        let cache = t.path().join(INSTALL_CACHE);
        let install = DmtcpInstall {
            dir: dir.clone(),
            version: "4.2.0".into(),
            deps: vec!["/lib/x86_64-linux-gnu/libatomic.so.1".into()],
            deps_dir: Some(deps.clone()),
        };
        let Some(key) = CacheKey::of(&dir) else {
            println!("skipped: no boot id");
            return;
        };
        assert_eq!(read_install_cache(&cache, &key, &deps), None);
        write_install_cache(&cache, key.clone(), &install);
        assert_eq!(read_install_cache(&cache, &key, &deps), Some(install));
        // Staged elsewhere, or a staged copy gone: discover again.
        assert_eq!(
            read_install_cache(&cache, &key, &t.path().join("other")),
            None
        );
        fs::remove_file(deps.join("libatomic.so.1")).unwrap();
        assert_eq!(read_install_cache(&cache, &key, &deps), None);
        put(&deps, "libatomic.so.1", b"lib", 0o644);
        // DMTCP installed again (another size), or a file of it missing.
        put(&dir, "bin/dmtcp_launch", b"xy", 0o755);
        let changed = CacheKey::of(&dir).unwrap();
        assert_ne!(changed, key);
        assert_eq!(read_install_cache(&cache, &changed, &deps), None);
        fs::remove_file(dir.join("bin/dmtcp_restart")).unwrap();
        assert_eq!(CacheKey::of(&dir), None);
    }

    #[test]
    fn discover_real_install_when_present() {
        match DmtcpInstall::discover(None) {
            Ok(install) => {
                assert!(!install.version.is_empty());
                assert!(install.deps.iter().any(|d| d.ends_with("libatomic.so.1")));
                let staged = tempfile::tempdir().unwrap();
                let install = install.stage_deps(staged.path()).unwrap();
                assert!(staged.path().join("libatomic.so.1").is_file());
                assert_eq!(install.deps_dir.as_deref(), Some(staged.path()));

                // Discovered and staged once, then read from the cache.
                let state = tempfile::tempdir().unwrap();
                let (deps, cache) = (state.path().join("deps"), state.path().join(INSTALL_CACHE));
                let first = DmtcpInstall::discover_staged(None, &deps, &cache).unwrap();
                assert_eq!(first.deps_dir.as_deref(), Some(deps.as_path()));
                assert!(cache.is_file());
                let again = DmtcpInstall::discover_staged(None, &deps, &cache).unwrap();
                assert_eq!(again, first);
            }
            Err(e) => println!("skipped: {e}"),
        }
        assert!(matches!(
            DmtcpInstall::discover(Some(Path::new("/nonexistent/dmtcp"))),
            Err(DmtcpError::NotFound { .. })
        ));
    }
}
