//! Raw FFI bindings to libgfapi, GlusterFS's client library, generated at
//! build time by bindgen from the installed `glusterfs/api/glfs.h` (found
//! through pkg-config `glusterfs-api >= 7.6`, i.e. GlusterFS 6 or later).
//! Only `glfs_*` items are bound. The safe layer is `backstore-gfapi`.

#![allow(non_upper_case_globals, non_camel_case_types, non_snake_case)]
#![allow(clippy::all)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
