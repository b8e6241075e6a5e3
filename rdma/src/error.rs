use std::fmt;
use std::io;

/// What went wrong, naming the verbs or RDMA CM call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// A library call failed with this errno.
    Call { call: &'static str, errno: i32 },
    /// No RDMA device could be opened: no /dev/infiniband, no provider
    /// for the hardware, or the device went away. `errno` is what the
    /// call reported (ENODEV, ENOENT, ...).
    NoDevice { call: &'static str, errno: i32 },
    /// A post was refused at its `index`-th work request (counted over the
    /// whole slice given); the ones before it were posted.
    Post {
        call: &'static str,
        errno: i32,
        index: usize,
    },
    /// The arguments cannot be handed to the call as they are.
    Invalid {
        call: &'static str,
        why: &'static str,
    },
}

impl Error {
    /// The call, from errno as the library left it.
    pub(crate) fn last(call: &'static str) -> Error {
        Error::from_errno(call, io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    pub(crate) fn from_errno(call: &'static str, errno: i32) -> Error {
        Error::Call { call, errno }
    }

    /// Like [`Error::last`] for calls whose failure usually means there
    /// is no usable device.
    pub(crate) fn last_opening(call: &'static str) -> Error {
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        match errno {
            libc::ENODEV | libc::ENOENT | libc::ENXIO | 0 => Error::NoDevice { call, errno },
            _ => Error::Call { call, errno },
        }
    }

    pub fn call(&self) -> &'static str {
        match *self {
            Error::Call { call, .. }
            | Error::NoDevice { call, .. }
            | Error::Post { call, .. }
            | Error::Invalid { call, .. } => call,
        }
    }

    pub fn errno(&self) -> Option<i32> {
        match *self {
            Error::Call { errno, .. }
            | Error::NoDevice { errno, .. }
            | Error::Post { errno, .. } => Some(errno),
            Error::Invalid { .. } => None,
        }
    }

    pub fn is_no_device(&self) -> bool {
        matches!(self, Error::NoDevice { .. })
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::Call { call, errno } => {
                write!(f, "{call} failed: {}", io::Error::from_raw_os_error(errno))
            }
            Error::NoDevice { call, errno } => write!(
                f,
                "no RDMA device ({call}: {}); is an RDMA NIC or soft-RoCE (rdma_rxe) \
                 configured and /dev/infiniband present?",
                io::Error::from_raw_os_error(errno)
            ),
            Error::Post { call, errno, index } => write!(
                f,
                "{call} refused work request {index}: {}",
                io::Error::from_raw_os_error(errno)
            ),
            Error::Invalid { call, why } => write!(f, "{call}: {why}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        match e.errno() {
            Some(errno) if errno != 0 => {
                io::Error::new(io::Error::from_raw_os_error(errno).kind(), e)
            }
            _ => io::Error::other(e),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
