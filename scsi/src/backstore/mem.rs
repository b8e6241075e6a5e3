//! mem backstore
pub struct MemBackstore;
