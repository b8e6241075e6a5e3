//! null backstore
pub struct NullBackstore;
