//! Backstore on a regular file or a block device.
//!
//! This first version does each syscall synchronously inside `submit` and
//! queues the completion for `poll`, so a slow disk stalls the reactor
//! that submitted. The interface is already asynchronous; moving the
//! syscalls onto io_uring is a later change that touches only this file.

use super::{Backstore, BackstoreCaps, Extent, Io, IoDone, IoOp};
use rustix::fs::{FallocateFlags, SeekFrom};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

const EINVAL: i32 = 22;
const EIO: i32 = 5;
const ENXIO: i32 = 6;

/// Zero-fill fallback writes go out in pieces of this size so a large
/// WRITE ZEROES does not allocate a buffer the size of the range.
const ZERO_PIECE: u64 = 1 << 20;

pub struct FileBackstore {
    file: File,
    size: u64,
    block_device: bool,
    read_only: bool,
    /// Cleared the first time the filesystem refuses an fallocate mode,
    /// so later requests go straight to the fallback.
    punch_ok: bool,
    zero_range_ok: bool,
    done: VecDeque<IoDone>,
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(EIO)
}

impl FileBackstore {
    /// Open `path`. A missing regular file is created at `size`; an
    /// existing one keeps its length unless `size` asks for more (then it
    /// grows, sparsely). A block device has its own size; a `size` larger
    /// than the device is an error, a smaller one exports a prefix.
    pub fn open(path: &Path, size: Option<u64>) -> io::Result<FileBackstore> {
        FileBackstore::open_with(path, size, false)
    }

    /// Open without write access (for media the process may only read);
    /// every modifying operation then fails with EROFS.
    pub fn open_read_only(path: &Path) -> io::Result<FileBackstore> {
        FileBackstore::open_with(path, None, true)
    }

    fn open_with(path: &Path, size: Option<u64>, read_only: bool) -> io::Result<FileBackstore> {
        let exists = path.exists();
        if !exists && size.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: does not exist and no size given", path.display()),
            ));
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .create(!exists && !read_only)
            .open(path)?;
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        let actual = if block_device {
            file.seek(io::SeekFrom::End(0))?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: not a regular file or block device", path.display()),
            ));
        };
        let size = match size {
            None => actual,
            Some(s) if s <= actual => s,
            Some(s) if !block_device && !read_only => {
                file.set_len(s)?;
                s
            }
            Some(s) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: size {s} exceeds its {actual} bytes", path.display()),
                ))
            }
        };
        Ok(FileBackstore {
            file,
            size,
            block_device,
            read_only,
            punch_ok: true,
            zero_range_ok: !block_device,
            done: VecDeque::new(),
        })
    }

    fn in_range(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.size)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                // Someone shrank the file under us: what is gone reads as
                // zeros, like a hole.
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_zeros(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; len.min(ZERO_PIECE) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZERO_PIECE) as usize;
            self.file.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn unsupported(e: &rustix::io::Errno) -> bool {
        *e == rustix::io::Errno::OPNOTSUPP || *e == rustix::io::Errno::NOSYS
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.punch_ok {
            let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
            match rustix::fs::fallocate(&self.file, flags, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if Self::unsupported(&e) => self.punch_ok = false,
                Err(e) => return Err(e.into()),
            }
        }
        // Deallocated blocks must read as zeros (we report LBPRZ), so
        // without hole punching the range is written with zeros instead.
        self.write_zeros(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.zero_range_ok {
            match rustix::fs::fallocate(&self.file, FallocateFlags::ZERO_RANGE, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if Self::unsupported(&e) => self.zero_range_ok = false,
                Err(e) => return Err(e.into()),
            }
        }
        self.write_zeros(offset, len)
    }

    fn run(&mut self, op: IoOp, buf: &mut [u8]) -> Result<(), i32> {
        let writes = !matches!(op, IoOp::Read { .. } | IoOp::Flush);
        if writes && self.read_only {
            return Err(rustix::io::Errno::ROFS.raw_os_error());
        }
        let r = match op {
            IoOp::Read { offset } => {
                if !self.in_range(offset, buf.len() as u64) {
                    return Err(EINVAL);
                }
                self.read(offset, buf)
            }
            IoOp::Write { offset, fua } => {
                if !self.in_range(offset, buf.len() as u64) {
                    return Err(EINVAL);
                }
                self.file.write_all_at(buf, offset).and_then(|()| {
                    if fua {
                        rustix::fs::fdatasync(&self.file).map_err(io::Error::from)
                    } else {
                        Ok(())
                    }
                })
            }
            IoOp::Flush => rustix::fs::fdatasync(&self.file).map_err(io::Error::from),
            IoOp::Discard { offset, len } => {
                if !self.in_range(offset, len) {
                    return Err(EINVAL);
                }
                self.discard(offset, len)
            }
            IoOp::WriteZeroes { offset, len } => {
                if !self.in_range(offset, len) {
                    return Err(EINVAL);
                }
                self.write_zeroes(offset, len)
            }
        };
        r.map_err(|e| errno(&e))
    }
}

impl Backstore for FileBackstore {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> BackstoreCaps {
        BackstoreCaps {
            discard: !self.read_only,
            write_zeroes: !self.read_only,
            volatile_cache: true,
            extent_status: !self.block_device,
        }
    }

    fn submit(&mut self, io: Io) {
        let Io { tag, op, mut buf } = io;
        let result = self.run(op, &mut buf);
        self.done.push_back(IoDone { tag, result, buf });
    }

    fn poll(&mut self, out: &mut Vec<IoDone>) -> usize {
        let n = self.done.len();
        out.extend(self.done.drain(..));
        n
    }

    fn extent_status(&mut self, offset: u64) -> Result<Extent, i32> {
        if offset >= self.size {
            return Err(EINVAL);
        }
        if self.block_device {
            return Ok(Extent {
                mapped: true,
                len: self.size - offset,
            });
        }
        let pos = i64::try_from(offset).map_err(|_| EINVAL)?;
        // SEEK_DATA lands on `offset` itself when it is in data; otherwise
        // on the next data, or ENXIO when only a hole remains.
        let data = match rustix::fs::seek(&self.file, SeekFrom::Data(pos)) {
            Ok(d) => d.min(self.size),
            Err(e) if e.raw_os_error() == ENXIO => self.size,
            Err(e) => return Err(e.raw_os_error()),
        };
        if data > offset {
            return Ok(Extent {
                mapped: false,
                len: data - offset,
            });
        }
        let hole = match rustix::fs::seek(&self.file, SeekFrom::Hole(pos)) {
            Ok(h) => h.min(self.size),
            Err(e) if e.raw_os_error() == ENXIO => self.size,
            Err(e) => return Err(e.raw_os_error()),
        };
        Ok(Extent {
            mapped: true,
            len: hole.saturating_sub(offset).max(1),
        })
    }

    fn shutdown(&mut self) -> Result<(), i32> {
        if self.read_only {
            return Ok(());
        }
        rustix::fs::fdatasync(&self.file).map_err(|e| e.raw_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(b: &mut FileBackstore, op: IoOp, buf: Vec<u8>) -> IoDone {
        b.submit(Io { tag: 3, op, buf });
        let mut out = Vec::new();
        assert_eq!(b.poll(&mut out), 1);
        out.pop().unwrap()
    }

    #[test]
    fn create_requires_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lun0");
        assert!(FileBackstore::open(&p, None).is_err());
        let b = FileBackstore::open(&p, Some(1 << 20)).unwrap();
        assert_eq!(b.size_bytes(), 1 << 20);
        drop(b);
        let b = FileBackstore::open(&p, None).unwrap();
        assert_eq!(b.size_bytes(), 1 << 20);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
        let mut b = FileBackstore::open_read_only(&p).unwrap();
        assert!(!b.caps().discard);
        b.submit(Io {
            tag: 1,
            op: IoOp::Write {
                offset: 0,
                fua: false,
            },
            buf: vec![0; 512],
        });
        let mut out = Vec::new();
        b.poll(&mut out);
        assert_eq!(out[0].result, Err(rustix::io::Errno::ROFS.raw_os_error()));
        // Growing an existing file.
        let b = FileBackstore::open(&p, Some(2 << 20)).unwrap();
        assert_eq!(b.size_bytes(), 2 << 20);
    }

    #[test]
    fn io_punch_and_extents() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lun0");
        let size = 4 << 20;
        let mut b = FileBackstore::open(&p, Some(size)).unwrap();

        // A fresh sparse file is one hole.
        let e = b.extent_status(0).unwrap();
        assert!(!e.mapped);
        assert_eq!(e.len, size);

        let d = run(
            &mut b,
            IoOp::Write {
                offset: 1 << 20,
                fua: true,
            },
            vec![0x5a; 1 << 20],
        );
        assert_eq!(d.result, Ok(()));
        let d = run(
            &mut b,
            IoOp::Read {
                offset: (1 << 20) - 4,
            },
            vec![1; 8],
        );
        assert_eq!(d.result, Ok(()));
        assert_eq!(d.buf, [0, 0, 0, 0, 0x5a, 0x5a, 0x5a, 0x5a]);
        assert_eq!(run(&mut b, IoOp::Flush, Vec::new()).result, Ok(()));

        // Filesystems allocate in their own blocks; tmpfs and ext4 use 4K
        // pages/blocks, so a 1 MiB aligned write is an exact extent.
        let e = b.extent_status(1 << 20).unwrap();
        assert!(e.mapped);
        assert_eq!(e.len, 1 << 20);
        let e = b.extent_status(0).unwrap();
        assert!(!e.mapped);
        assert_eq!(e.len, 1 << 20);

        let d = run(
            &mut b,
            IoOp::Discard {
                offset: 1 << 20,
                len: 64 << 10,
            },
            Vec::new(),
        );
        assert_eq!(d.result, Ok(()));
        let d = run(&mut b, IoOp::Read { offset: 1 << 20 }, vec![1; 64 << 10]);
        assert!(d.buf.iter().all(|&x| x == 0));
        let d = run(
            &mut b,
            IoOp::Read {
                offset: (1 << 20) + (64 << 10),
            },
            vec![0; 4],
        );
        assert_eq!(d.buf, [0x5a; 4]);

        let d = run(
            &mut b,
            IoOp::WriteZeroes {
                offset: (1 << 20) + 100,
                len: 1000,
            },
            Vec::new(),
        );
        assert_eq!(d.result, Ok(()));
        let d = run(
            &mut b,
            IoOp::Read {
                offset: (1 << 20) + (64 << 10),
            },
            vec![1; 1000],
        );
        assert!(d.buf.iter().all(|&x| x == 0x5a));

        let d = run(&mut b, IoOp::Read { offset: size - 1 }, vec![0; 2]);
        assert_eq!(d.result, Err(EINVAL));
        assert!(b.extent_status(size).is_err());
        assert_eq!(b.shutdown(), Ok(()));
    }
}
