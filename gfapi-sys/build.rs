//! Bindings come from the header installed with the library, never from
//! hand-written prototypes: gfapi 6.0 changed the signatures of several
//! calls (glfs_pwrite, glfs_ftruncate, glfs_fsync and the async callback
//! gained `struct glfs_stat` arguments) while libgfapi.so.0 still exports
//! the old versions under older symbol versions, so stale prototypes link
//! cleanly and pass wrong arguments at run time. An unversioned reference
//! binds to the default (newest) version, which is the one glfs.h declares.

use std::env;
use std::path::PathBuf;

/// glusterfs-api reports 7.x for GlusterFS x (10.3 -> 7.10.3); 7.6 is
/// GlusterFS 6, the first release with the signatures bound here.
const MIN_VERSION: &str = "7.6";

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    let lib = pkg_config::Config::new()
        .atleast_version(MIN_VERSION)
        .probe("glusterfs-api")
        .unwrap_or_else(|e| {
            panic!(
                "gfapi-sys: libgfapi >= GlusterFS 6 (pkg-config glusterfs-api >= {MIN_VERSION}) \
                 not found; on Debian install libglusterfs-dev: {e}"
            )
        });
    let mut builder = bindgen::Builder::default()
        .header("wrapper.h")
        .allowlist_function("glfs_.*")
        .allowlist_type("glfs_.*")
        .allowlist_var("GFAPI_.*")
        // libc's own definitions are used for these, so values pass between
        // gfapi and the rest of the program without casts.
        .blocklist_type("stat")
        .blocklist_type("statvfs")
        .blocklist_type("iovec")
        .blocklist_type("timespec")
        .blocklist_type("dirent")
        .blocklist_type("flock")
        .raw_line("use libc::{dirent, flock, iovec, stat, statvfs, timespec};")
        .derive_default(true)
        .layout_tests(true)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    for p in &lib.include_paths {
        builder = builder.clang_arg(format!("-I{}", p.display()));
    }
    let bindings = builder
        .generate()
        .expect("gfapi-sys: bindgen could not process glfs.h (is libclang-dev installed?)");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("bindings.rs");
    bindings
        .write_to_file(&out)
        .expect("gfapi-sys: writing bindings.rs");
}
