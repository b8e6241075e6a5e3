//! A connection in login phase fed a sequence of PDUs cut from the input
//! (see `iscsi_fuzz` for the step format), then whatever full feature
//! phase PDUs follow. Byte 0: context (which targets want CHAP, ACLs,
//! whether instatement fails); byte 1: target limits, timers, transport.
//! SCSI commands are completed as soon as they appear. Nothing may panic,
//! and all output must decode with the digests in force.
#![no_main]

use iscsi_fuzz::{config, Driver, FuzzCtx, Input};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    let ctx = FuzzCtx::new(inp.u8());
    let cfg = config(inp.u8());
    let mut d = Driver::new(cfg, ctx, true);
    d.run(&mut inp);
});
