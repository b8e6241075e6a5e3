//! file backstore
pub struct FileBackstore;
