//! Generates the bindings from the installed rdma-core headers, so they
//! always match the library the binary links against.
//!
//! verbs.h puts the data path (`ibv_post_send`, `ibv_post_recv`,
//! `ibv_poll_cq`, `ibv_req_notify_cq`, `ibv_post_srq_recv`, ...) in
//! static inline functions that jump through the provider's ops table;
//! they have no symbol in libibverbs. bindgen's `wrap_static_fns` emits a
//! C file with one exported wrapper per such function, which is compiled
//! here and linked in; the Rust declarations point at those wrappers.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-changed=build.rs");

    let mut include_paths: Vec<PathBuf> = Vec::new();
    for (lib, min) in [("libibverbs", "1.8"), ("librdmacm", "1.2")] {
        let found = pkg_config::Config::new()
            .atleast_version(min)
            .probe(lib)
            .unwrap_or_else(|e| {
                panic!(
                    "{lib} >= {min} not found through pkg-config ({e}); \
                     install libibverbs-dev and librdmacm-dev"
                )
            });
        include_paths.extend(found.include_paths);
    }
    include_paths.sort();
    include_paths.dedup();

    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let wrappers = out.join("static_wrappers");

    let mut builder = bindgen::Builder::default()
        .header("wrapper.h")
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .allowlist_function("ibv_.*|rdma_.*|_+ibv_.*")
        .allowlist_type("ibv_.*|rdma_.*")
        .allowlist_var("IBV_.*|RDMA_.*")
        // The exported symbol takes the pre-1.14 port attribute layout;
        // callers must go through the inline that verbs.h maps the name
        // to (re-exported as `ibv_query_port` in lib.rs).
        .blocklist_function("ibv_query_port")
        .default_enum_style(bindgen::EnumVariation::Consts)
        .bitfield_enum("ibv_access_flags|ibv_send_flags|ibv_qp_attr_mask|ibv_wc_flags")
        .derive_default(true)
        .derive_debug(true)
        .prepend_enum_name(false)
        .layout_tests(true)
        .wrap_static_fns(true)
        .wrap_static_fns_path(&wrappers);
    for p in &include_paths {
        builder = builder.clang_arg(format!("-I{}", p.display()));
    }
    let bindings = builder
        .generate()
        .expect("bindgen could not process verbs.h / rdma_cma.h / rdma_verbs.h");
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("cannot write bindings.rs");

    // bindgen writes `#include "wrapper.h"` into the generated C file.
    let mut cc = cc::Build::new();
    cc.file(wrappers.with_extension("c"))
        .include(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
        .warnings(false);
    for p in &include_paths {
        cc.include(p);
    }
    cc.compile("rdma_sys_static_wrappers");
}
