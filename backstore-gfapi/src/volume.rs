//! A connection to a Gluster volume (a `glfs_t`, gfapi's "virtual
//! mount"), shared by every LUN on the same volume and servers: each
//! connection costs a graph of translators, their threads and a TCP
//! connection to every brick, and tcmu-runner and QEMU share them too.

use crate::url::Server;
use gfapi_sys as sys;
use std::ffi::CString;
use std::io;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

/// How to connect. Defaults match the README.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// How long `glfs_init` (fetching the volfile and building the client
    /// graph) may take before the connection is given up.
    pub init_timeout: Duration,
    /// The client's ping-timeout: how long a brick may stay silent before
    /// its connection is declared dead and its operations fail with
    /// ENOTCONN. Set on our client whatever the volume says (its default
    /// is 42 s), so it stays below the target's command timeout.
    pub ping_timeout_s: u32,
    /// Where gfapi logs; `None`: standard error.
    pub log_file: Option<PathBuf>,
    /// gfapi's log level (gf_loglevel_t: 4 error, 5 warning, 7 info).
    pub log_level: i32,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            init_timeout: Duration::from_secs(30),
            ping_timeout_s: 10,
            log_file: None,
            log_level: 5,
        }
    }
}

/// An initialized `glfs_t`.
pub struct Volume {
    fs: NonNull<sys::glfs_t>,
    name: String,
    servers: Vec<Server>,
}

// SAFETY: gfapi's calls on an initialized glfs_t are thread-safe (its
// fops are dispatched through the graph with their own locking; QEMU and
// tcmu-runner use one glfs_t from many threads). `Volume` only hands the
// pointer to those calls and to `glfs_fini` once, in `drop`.
unsafe impl Send for Volume {}
// SAFETY: as above; `&Volume` only exposes the pointer to gfapi calls.
unsafe impl Sync for Volume {}

type Key = (String, Vec<Server>);

/// Open connections, by (volume, servers). Only connecting and dropping
/// take this lock; the I/O path never does.
static VOLUMES: Mutex<Vec<(Key, Weak<Volume>)>> = Mutex::new(Vec::new());

fn cstring(what: &str, s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} {s:?} contains NUL"),
        )
    })
}

fn last_errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// What the `glfs_init` thread and the thread waiting for it share.
enum InitState {
    Waiting,
    /// The waiter gave up; the init thread cleans up when it returns.
    Abandoned,
    Done(i32, i32),
}

struct SendPtr(NonNull<sys::glfs_t>);
// SAFETY: the pointer moves to the init thread, which is then its only
// user until it hands the result back (or finalizes it itself).
unsafe impl Send for SendPtr {}

impl Volume {
    /// The connection for `volume` on `servers`: an existing one, or a new
    /// one. Blocks for up to `opts.init_timeout` (call it off the reactor
    /// threads; the target does so while building LUNs at startup).
    pub fn connect(
        volume: &str,
        servers: &[Server],
        opts: &ConnectOptions,
    ) -> io::Result<Arc<Volume>> {
        let key: Key = (volume.to_string(), servers.to_vec());
        let mut reg = VOLUMES.lock().unwrap_or_else(|e| e.into_inner());
        reg.retain(|(_, w)| w.strong_count() > 0);
        if let Some(v) = reg
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, w)| w.upgrade())
        {
            return Ok(v);
        }
        let v = Arc::new(Volume::connect_new(volume, servers, opts)?);
        reg.push((key, Arc::downgrade(&v)));
        Ok(v)
    }

    fn connect_new(volume: &str, servers: &[Server], opts: &ConnectOptions) -> io::Result<Volume> {
        let where_ = || {
            let list: Vec<String> = servers.iter().map(|s| s.to_string()).collect();
            format!("gluster volume {volume} on {}", list.join(","))
        };
        if servers.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: no volfile server", where_()),
            ));
        }
        let cvol = cstring("volume", volume)?;
        // SAFETY: glfs_new copies the NUL-terminated name it is given.
        let fs = unsafe { sys::glfs_new(cvol.as_ptr()) };
        let Some(fs) = NonNull::new(fs) else {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("{}: glfs_new failed", where_()),
            ));
        };
        // From here on the handle is finalized on every error path.
        let fail = |msg: String| {
            // SAFETY: `fs` came from glfs_new and nothing else holds it.
            unsafe { sys::glfs_fini(fs.as_ptr()) };
            io::Error::other(msg)
        };
        let tcp = c"tcp";
        for s in servers {
            let host = cstring("host", &s.host).map_err(|e| fail(e.to_string()))?;
            // SAFETY: both strings are NUL-terminated and copied by gfapi.
            let r = unsafe {
                sys::glfs_set_volfile_server(fs.as_ptr(), tcp.as_ptr(), host.as_ptr(), s.port as _)
            };
            if r != 0 {
                let e = io::Error::from_raw_os_error(last_errno());
                return Err(fail(format!("{}: volfile server {s}: {e}", where_())));
            }
        }
        let log = match &opts.log_file {
            Some(p) => {
                cstring("log file", &p.to_string_lossy()).map_err(|e| fail(e.to_string()))?
            }
            // gluster's logging treats "-" as standard error.
            None => c"-".to_owned(),
        };
        // SAFETY: NUL-terminated path, copied by gfapi.
        if unsafe { sys::glfs_set_logging(fs.as_ptr(), log.as_ptr(), opts.log_level) } != 0 {
            let e = io::Error::from_raw_os_error(last_errno());
            return Err(fail(format!(
                "{}: gfapi log {}: {e}",
                where_(),
                log.to_string_lossy()
            )));
        }
        // The protocol/client translators are named VOLUME-client-N.
        let pattern =
            cstring("volume", &format!("{volume}-client-*")).map_err(|e| fail(e.to_string()))?;
        let ping = CString::new(opts.ping_timeout_s.max(1).to_string()).unwrap_or_default();
        // SAFETY: NUL-terminated strings, copied by gfapi.
        let r = unsafe {
            sys::glfs_set_xlator_option(
                fs.as_ptr(),
                pattern.as_ptr(),
                c"ping-timeout".as_ptr(),
                ping.as_ptr(),
            )
        };
        if r != 0 {
            let e = io::Error::from_raw_os_error(last_errno());
            return Err(fail(format!("{}: setting ping-timeout: {e}", where_())));
        }
        // glfs_init blocks while it fetches the volfile and may retry for
        // long when servers are unreachable, so it runs on its own thread
        // and is waited for with a bound. If the bound passes, the thread
        // finalizes the handle itself when init finally returns.
        let state = Arc::new((Mutex::new(InitState::Waiting), Condvar::new()));
        let st = Arc::clone(&state);
        let ptr = SendPtr(fs);
        let spawned = std::thread::Builder::new()
            .name("gfapi-init".into())
            .spawn(move || {
                let ptr = ptr;
                // SAFETY: the handle is configured and used by no other
                // thread while init runs.
                let r = unsafe { sys::glfs_init(ptr.0.as_ptr()) };
                let e = if r != 0 { last_errno() } else { 0 };
                let (m, cv) = &*st;
                let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
                if matches!(*g, InitState::Abandoned) {
                    drop(g);
                    // SAFETY: the waiter gave up and forgot the handle;
                    // this thread is its last user.
                    unsafe { sys::glfs_fini(ptr.0.as_ptr()) };
                } else {
                    *g = InitState::Done(r, e);
                    cv.notify_all();
                }
            });
        if let Err(e) = spawned {
            return Err(fail(format!(
                "{}: cannot start the init thread: {e}",
                where_()
            )));
        }
        let (m, cv) = &*state;
        let g = m.lock().unwrap_or_else(|e| e.into_inner());
        let (mut g, _) = cv
            .wait_timeout_while(g, opts.init_timeout, |s| matches!(s, InitState::Waiting))
            .unwrap_or_else(|e| e.into_inner());
        match *g {
            InitState::Done(0, _) => {}
            InitState::Done(_, e) => {
                drop(g);
                let e = io::Error::from_raw_os_error(e);
                return Err(fail(format!(
                    "{}: glfs_init failed: {e} (is glusterd reachable and the volume started? \
                     gfapi's log says more)",
                    where_()
                )));
            }
            _ => {
                *g = InitState::Abandoned;
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{}: not connected within {} s (glfs_init still running)",
                        where_(),
                        opts.init_timeout.as_secs_f32()
                    ),
                ));
            }
        }
        drop(g);
        tracing::info!("{}: connected", where_());
        Ok(Volume {
            fs,
            name: volume.to_string(),
            servers: servers.to_vec(),
        })
    }

    pub(crate) fn raw(&self) -> *mut sys::glfs_t {
        self.fs.as_ptr()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn servers(&self) -> &[Server] {
        &self.servers
    }
}

/// How long dropping a connection waits for `glfs_fini`. It took about 9 s
/// here on an idle, healthy volume (it waits for gluster's own timers), and
/// images were already synced and closed by then, so a target shutting
/// down does not wait for it to the end: the thread finishes it if the
/// process lives on.
const FINI_WAIT: Duration = Duration::from_secs(2);

impl Drop for Volume {
    fn drop(&mut self) {
        let ptr = SendPtr(self.fs);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("gfapi-fini".into())
            .spawn(move || {
                let ptr = ptr;
                // SAFETY: the last reference is gone: every image on this
                // volume was closed (or leaked together with a clone of the
                // Arc when its operations never came back), so nothing else
                // uses the handle.
                unsafe { sys::glfs_fini(ptr.0.as_ptr()) };
                let _ = tx.send(());
            });
        match spawned {
            Ok(_) => {
                if rx.recv_timeout(FINI_WAIT).is_err() {
                    tracing::debug!(
                        "gluster volume {}: glfs_fini continues in the background",
                        self.name
                    );
                }
            }
            Err(e) => tracing::warn!("gluster volume {}: not finalized: {e}", self.name),
        }
    }
}
